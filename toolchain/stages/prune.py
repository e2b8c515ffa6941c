"""prune: weight or channel pruning of the KD student (rank 0 alone under torchrun)."""

from __future__ import annotations

import copy
from typing import Dict

from ..engine.stage import register_stage
from ..train.tasks import make_task
from .common import ModelStage, finalize, pe_against_references, reseed, teacher_role, train


def step_train_cfg(cfg):
    """Fine-tuning between iterative steps and taylor scoring use the finetune section (else distill's)."""
    return cfg.finetune or cfg.distill


@register_stage
class Prune(ModelStage):
    name = "prune"
    order = 30
    sections = ("prune", "finetune", "distill")
    checked = ("student",)  # the architecture the preflight prunes
    followers = "load"  # rank 0 prunes; the others load the smaller model

    def preflight(self, cfg, data) -> None:
        """Channel pruning of the untrained architecture once, before the teacher and the student
        train: a model the engine cannot prune fails now, in one line, with the way out."""
        from tqdm import tqdm

        from ..models.resolve import architecture
        from ..prune import check_prunable

        if cfg.prune.method != "channel":
            return
        model = architecture(cfg.student, data.num_classes)
        seconds = check_prunable(model, cfg.prune, data.example_batch(2), cfg.prune.check_time_limit_s)
        tqdm.write(f"[prune] preflight: {cfg.student.model} channel-prunes with engine {cfg.prune.engine} ({seconds:.1f} s)")

    def inputs(self, cfg, models, ran):
        # the teacher is an input too: taylor scores and iterative steps use the KD loss
        return {"model": models[-1], **teacher_role(step_train_cfg(cfg), models)}

    def compute(self, job):
        from ..prune import GradientSource, prune_model

        reseed(job)  # iterative steps train (dropout)
        cfg, step_cfg = job.cfg.prune, step_train_cfg(job.cfg)
        finetune_fn = lambda m, epochs, after: train(  # noqa: E731
            job, m, step_cfg.model_copy(update={"epochs": epochs}), "prune-step", resumable=False, after_step=after)
        task = make_task(step_cfg, job.inputs["teacher"].model if "teacher" in job.inputs else None)
        gradients = GradientSource(job.data.train, lambda model, x, y: task.loss(model, x, y)[0], cfg.taylor_batches)
        source = job.inputs["model"]
        result = prune_model(copy.deepcopy(source.model), cfg, job.data.example_batch(2),
                             finetune_fn=finetune_fn, gradients=gradients)
        extra = {f"prune.{k}": v for k, v in result.report.items() if isinstance(v, (int, float))}
        out = finalize(job, result.model, source.result.model().spec(), extra=extra,
                       keep_zeros=cfg.method == "weight")
        out.info["layers"] = result.layers
        return out

    def publish(self, run, output, child) -> Dict[str, float]:
        if output.result.info.get("layers"):
            child.log_dict(output.result.info["layers"], "layers.json")
        return pe_against_references(run.outputs, output.result.metrics, output.name)
