"""prune: weight or channel pruning of the KD student (rank 0 alone under torchrun)."""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from ..engine.artifacts import StageResult
from ..engine.stage import Job, Sections, StageOutput, register_stage
from ..train.tasks import make_task
from .common import ModelStage, file_digest, finalize, reseed, teacher_role, train

if TYPE_CHECKING:  # annotations only
    from ..data.loaders import DataBundle
    from ..engine.context import Publication
    from ..tracking import StageRun

# Replaces the latency timing of budget comparisons (bench/compare.py's `replicate`); tests feed it.
REPLICATE = None


def step_train_cfg(cfg):
    """Fine-tuning between iterative steps and taylor scoring use the finetune section (else distill's)."""
    return cfg.finetune or cfg.distill


@register_stage
class Prune(ModelStage):
    name = "prune"
    row_label = "pruned"
    consumes = ("teacher", "distill")
    sections = ("prune", "finetune", "distill")
    checked = ("student",)  # the architecture the preflight prunes
    followers = "load"  # rank 0 prunes; the others load the smaller model

    def preflight(self, cfg: Sections, data: DataBundle) -> None:
        """Channel pruning of the untrained architecture once, before the teacher and the student
        train: a model the engine cannot prune fails now, in one line, with the way out."""
        from tqdm import tqdm

        from ..models.resolve import architecture
        from ..prune import check_prunable

        if cfg.prune.method != "channel":
            return
        model = architecture(cfg.student, data.num_classes)
        if cfg.prune.budget is not None:  # its check prunes the most-pruned aligned model: the structure check too
            self._check_budget(model, cfg.prune, data)
            return
        seconds = check_prunable(model, cfg.prune, data.example_batch(2), cfg.prune.check_time_limit_s)
        tqdm.write(
            f"[prune] preflight: {cfg.student.model} channel-prunes with engine {cfg.prune.engine} ({seconds:.1f} s)"
        )

    def _check_budget(self, model, cfg, data) -> None:
        """An unreachable budget (the most-pruned aligned model measurably misses it) fails now, naming
        the best reachable value."""
        from tqdm import tqdm

        from ..prune import prune_model
        from ..prune.api import check_time_limit
        from ..prune.budget import LATENCY_KINDS, check_reachable, make_meter
        from ..train import ddp as dist

        if cfg.budget.kind in LATENCY_KINDS and not dist.is_main():
            return  # torchrun: rank 0 measures (ranks timing at once would measure each other); its failure ends the job
        example = data.example_batch(2).cpu()
        if cfg.budget.device_table:
            return self._check_device_budget(model.cpu(), cfg, example)
        meter = make_meter(cfg.budget, example, REPLICATE, tqdm.write)

        def prune_once(m, c):
            with check_time_limit(cfg, m, cfg.check_time_limit_s):
                return prune_model(m, c, example)

        started = time.perf_counter()
        try:
            reading = check_reachable(model.cpu(), cfg, meter, prune_once)
        finally:
            meter.close()
        verdict = "is reachable" if reading.met else "may be reachable (the interval straddles it)"
        tqdm.write(
            f"[prune] preflight: {type(model).__name__} channel-prunes with engine {cfg.engine}; budget "
            f"{cfg.budget.kind} {cfg.budget.target:g} {verdict} (most-pruned aligned model: "
            f"{reading.text(cfg.budget.kind)}; {time.perf_counter() - started:.1f} s)"
        )

    def _check_device_budget(self, model, cfg, example) -> None:
        """A device table must hold this student's layer shapes, and its narrowest aligned allocation
        must be predicted to meet the budget."""
        from tqdm import tqdm

        from ..prune.costmodel import layer_graph
        from ..prune.latency_aware import cost_model, device_tables, predicted_narrowest

        started = time.perf_counter()
        graph = layer_graph(model, example, cfg)
        cost, student, _ = cost_model(model, graph, cfg.budget, None, device_tables(cfg.budget.device_table))
        narrowest = predicted_narrowest(cfg.budget, cost, graph, student)  # raises when it misses
        tqdm.write(
            f"[prune] preflight: budget {cfg.budget.kind} {cfg.budget.target:g} is reachable on the device table "
            f"{cfg.budget.device_table} (narrowest aligned allocation predicted {narrowest:.4g}; "
            f"{time.perf_counter() - started:.1f} s)"
        )

    def fingerprint(self, cfg: Sections) -> Dict[str, Any]:
        """latency_aware: the allocation's code revision (recipes without it keep their keys) and,
        a device table being named by path, its content."""
        budget = cfg.prune.budget
        if budget is None or cfg.prune.allocation != "latency_aware":
            return {}
        from ..prune.latency_aware import REVISION

        # file_digest: a missing table keys by its path; the preflight then says it is missing, in one line
        return {
            "allocation_revision": REVISION,
            **({"device_table": file_digest(budget.device_table)} if budget.device_table else {}),
        }

    def inputs(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        # the teacher is an input too: taylor scores and iterative steps use the KD loss
        return {"model": models[-1], **teacher_role(step_train_cfg(cfg), models)}

    def compute(self, job: Job) -> StageResult:
        from ..prune import GradientSource, prune_model

        reseed(job)  # iterative steps train (dropout)
        cfg, step_cfg = job.cfg.prune, step_train_cfg(job.cfg)
        finetune_fn = lambda m, epochs, after: train(  # noqa: E731
            job, m, step_cfg.model_copy(update={"epochs": epochs}), "prune-step", resumable=False, after_step=after
        )
        task = make_task(step_cfg, job.inputs["teacher"].model if "teacher" in job.inputs else None)
        gradients = GradientSource(job.data.train, lambda model, x, y: task.loss(model, x, y)[0], cfg.taylor_batches)
        source = job.inputs["model"]
        example = job.data.example_batch(2)
        prune_fn = lambda m, c, kept=None: prune_model(  # noqa: E731
            m, c, example, finetune_fn=finetune_fn, gradients=gradients, kept=kept
        )
        decision = None
        if cfg.budget is None:
            result = prune_fn(copy.deepcopy(source.model), cfg)
        else:
            model = copy.deepcopy(source.model)
            result, decision = self._to_budget(model, cfg, example, prune_fn, job.stage_dir, gradients)
            result.report.update(decision.report())
        extra = {f"prune.{k}": v for k, v in result.report.items() if isinstance(v, (int, float))}
        out = finalize(job, result.model, source.result.model().spec(), extra=extra, keep_zeros=cfg.method == "weight")
        out.info["layers"] = result.layers
        if decision is not None:
            out.info["budget"] = decision.as_dict()
            out.info["budget_line"] = decision.line()
        return out

    def _to_budget(self, model, cfg, example, prune_fn, stage_dir, gradients):
        from tqdm import tqdm

        from ..prune import budget, latency_aware

        meter = budget.make_meter(cfg.budget, example.cpu(), REPLICATE, tqdm.write)
        try:
            if cfg.allocation == "uniform":
                result, decision = budget.choose(model, cfg, meter, prune_fn)
            else:
                tables = (
                    latency_aware.device_tables(cfg.budget.device_table)
                    if cfg.budget.device_table
                    # next to the stage cache's folders: a table outlives one stage's key
                    else latency_aware.local_tables(stage_dir.parent / "latency-tables", tqdm.write)
                )
                result, decision = latency_aware.choose(model, cfg, meter, prune_fn, example, tables, gradients)
        finally:
            meter.close()
        tqdm.write(f"[prune] {decision.line()}")
        return result, decision

    def summary_lines(self, entry: Dict[str, Any]) -> List[str]:
        line = entry["info"].get("budget_line")  # prune.budget: what was decided
        return [line] if line else []

    def headline(self, output: StageOutput) -> Dict[str, float]:
        """A budget's decision on the parent run too (the runs table, `report`): the chosen sparsity, met or not."""
        m = output.result.metrics
        return {
            k: m[k]
            for k in (
                "prune.budget.sparsity",
                "prune.budget.met",
                "prune.budget.value",
                "prune.budget.low",
                "prune.budget.high",
                "prune.budget.target",
                "prune.budget.batch_size",
                "prune.budget.predicted",
            )
            if k in m
        }

    def publish(self, pub: Publication, output: StageOutput, child: StageRun) -> Dict[str, float]:
        if output.result.info.get("layers"):
            child.log_dict(output.result.info["layers"], "layers.json")
        if output.result.info.get("budget"):
            child.log_dict(output.result.info["budget"], "budget.json")
        return super().publish(pub, output, child)
