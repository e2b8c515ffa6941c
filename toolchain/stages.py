"""What each stage computes. Orchestration (order, caching, tracking) is in pipeline.py.

Every model stage returns {"metrics": ..., "history": [...], "paths": ...}; metrics
hold val/test accuracy, params, nonzero params, MACs and, for compressed models,
Performance Efficiency against the teacher and the unpruned KD student.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import distributed as dist
from .checkpoint import load_weights, save_state
from .metrics import model_stats, performance_efficiency
from .models import build_model
from .pipeline import Context, run_cached, stage_key
from .train import evaluate, fit, make_task, memory_layout

MODEL_STAGES = ("teacher", "distill", "prune", "finetune")


# ---------------------------------------------------------------- helpers


def reseed(ctx: Context) -> None:
    """Restart torch's RNG from the recipe seed. Each model stage does this first, so its
    output (init, dropout masks) depends only on its cache key, not on which earlier
    stages ran in this process and which were loaded from the cache."""
    torch.manual_seed(ctx.recipe.seed)


def new_model(ctx: Context, model_cfg) -> torch.nn.Module:
    reseed(ctx)
    return build_model(model_cfg.model, ctx.data.num_classes, model_cfg.cifar_stem).to(ctx.device)


def load_stage_model(ctx: Context, model_cfg, path: Path) -> torch.nn.Module:
    model = new_model(ctx, model_cfg)
    load_weights(model.cpu(), path, model_cfg.model)
    return model.to(ctx.device)


def data_key(ctx: Context) -> str:
    # under torchrun each process trains on its 1/N shard: N is part of what the data is
    shards = [f"world_size={dist.world_size()}"] if dist.world_size() > 1 else []
    return stage_key("data", ctx.recipe.data, str(ctx.recipe.seed), *shards)


def file_digest(path: Optional[str]) -> str:
    if not path or not Path(path).is_file():
        return str(path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def train(ctx: Context, model, cfg, stage: str, stage_dir: Optional[Path], run, after_step=None) -> List[Dict[str, float]]:
    """The one training entry point of the pipeline (all stages go through `fit`).

    stage_dir holds the per-epoch resume checkpoint; None disables mid-stage resume.
    """
    task = make_task(cfg, ctx.models.get("teacher"))
    with memory_layout(model, task, cfg.channels_last):
        trained = dist.wrap_for_training(model, ctx.device)
        result = fit(trained, task, ctx.data.train, ctx.data.val, cfg, stage=stage,
                     state_path=None if stage_dir is None else stage_dir / "train_state.pt",
                     on_epoch=lambda epoch, m: run.log_metrics(m, step=epoch), after_step=after_step)
    dist.debug_record(stage, ctx.data.train, model)
    return result.history


def finalize(ctx: Context, name: str, model, stage_dir: Path, history=None, extra=None) -> Dict[str, Any]:
    """Save, evaluate (val for selection, test once for the report), count, score PE."""
    model.eval()
    if not dist.is_main():  # torchrun: rank 0 saves and scores; the others load its checkpoint after the stage
        ctx.models[name] = model
        return {}
    checkpoint = stage_dir / "model.pt"
    save_state({"model": model.state_dict()}, checkpoint)
    metrics = {
        "val_accuracy": evaluate(model, ctx.data.val)["accuracy"],
        "test_accuracy": evaluate(model, ctx.data.test)["accuracy"],
        **model_stats(model, (1, *ctx.input_shape)),
        **(extra or {}),
    }
    metrics.update(pe_against_references(ctx, metrics))
    ctx.models[name] = model
    return {"metrics": metrics, "history": history or [], "paths": {"checkpoint": str(checkpoint)}}


def pe_against_references(ctx: Context, metrics: Dict[str, float], latency: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """PE of a model against the teacher and the unpruned KD student (those present)."""
    out = {}
    for ref in ("teacher", "distill"):
        ref_result = ctx.results.get(ref)
        if ref_result is None:
            continue
        r = ref_result["metrics"]
        pe = performance_efficiency(
            metrics["test_accuracy"], r["test_accuracy"], metrics["nonzero_params"], r["params"],
            metrics["macs"], r["macs"],
            None if latency is None else latency.get("final"), None if latency is None else latency.get(ref),
        )
        label = "teacher" if ref == "teacher" else "student"
        out.update({f"vs_{label}.{k}": v for k, v in pe.items() if v is not None})
    return out


def current_model_stage(ctx: Context) -> str:
    return [s for s in MODEL_STAGES if s in ctx.models][-1]


# ---------------------------------------------------------------- model stages


def run_teacher(ctx: Context) -> None:
    cfg = ctx.recipe.teacher
    key = stage_key("teacher", cfg, data_key(ctx), file_digest(cfg.checkpoint))

    def compute(stage_dir: Path, run) -> Dict[str, Any]:
        model = new_model(ctx, cfg)
        if cfg.checkpoint:
            load_weights(model.cpu(), cfg.checkpoint, cfg.model)
            model.to(ctx.device)
            return finalize(ctx, "teacher", model, stage_dir, extra={"loaded_from_checkpoint": 1})
        return finalize(ctx, "teacher", model, stage_dir, train(ctx, model, cfg.train, "teacher", stage_dir, run))

    def restore(stage_dir: Path, result) -> None:
        ctx.models["teacher"] = load_stage_model(ctx, cfg, stage_dir / "model.pt")

    run_cached(ctx, "teacher", key, {"model": cfg.model}, compute, restore, followers="train")


def run_distill(ctx: Context) -> None:
    r = ctx.recipe
    teacher_key = ctx.keys.get("teacher", "") if r.distill.loss == "kd" else ""
    key = stage_key("distill", {"student": r.student.model_dump(), "train": r.distill.model_dump()},
                    data_key(ctx), teacher_key, file_digest(r.student.checkpoint))

    def compute(stage_dir: Path, run) -> Dict[str, Any]:
        model = new_model(ctx, r.student)
        if r.student.checkpoint:
            load_weights(model.cpu(), r.student.checkpoint, r.student.model)
            model.to(ctx.device)
        return finalize(ctx, "distill", model, stage_dir, train(ctx, model, r.distill, "distill", stage_dir, run))

    def restore(stage_dir: Path, result) -> None:
        ctx.models["distill"] = load_stage_model(ctx, r.student, stage_dir / "model.pt")

    run_cached(ctx, "distill", key, {"student": r.student.model, "loss": r.distill.loss}, compute, restore,
               followers="train")


def run_prune(ctx: Context) -> None:
    from .prune import keep_sparsity, prune_model

    r = ctx.recipe
    cfg = r.prune
    # the teacher is an input too: taylor scores and iterative steps fine-tune with the KD loss
    key = stage_key("prune", {"prune": cfg.model_dump(), "finetune": _step_train_cfg(ctx).model_dump()},
                    ctx.keys["distill"], ctx.keys.get("teacher", ""))

    def compute(stage_dir: Path, run) -> Dict[str, Any]:
        reseed(ctx)  # iterative steps train (dropout)
        step_cfg = _step_train_cfg(ctx)
        finetune_fn = lambda m, epochs, after: train(  # noqa: E731
            ctx, m, step_cfg.model_copy(update={"epochs": epochs}), "prune-step", None, run, after)
        result = prune_model(copy.deepcopy(ctx.models["distill"]), cfg, ctx.data.example_batch(2),
                             finetune_fn=finetune_fn, gradients=_gradient_source(ctx, step_cfg))
        run.log_dict(result.layers, "layers.json")
        extra = {f"prune.{k}": v for k, v in result.report.items() if isinstance(v, (int, float))}
        out = finalize(ctx, "prune", result.model, stage_dir, extra=extra)
        out["layers"] = result.layers
        return out

    def restore(stage_dir: Path, result) -> None:
        ctx.models["prune"] = load_stage_model(ctx, r.student, stage_dir / "model.pt")
        if cfg.method == "weight":
            keep_sparsity(ctx.models["prune"])()
        run_log = result.get("layers")
        if run_log:
            ctx.parent_run.log_dict(run_log, "prune_layers.json")

    run_cached(ctx, "prune", key, flat_section("prune", cfg), compute, restore, followers="load")  # rank 0 prunes


def _gradient_source(ctx: Context, train_cfg):
    """What the taylor pruner scores channels with: training batches and the fine-tuning loss."""
    from .prune import GradientSource

    task = make_task(train_cfg, ctx.models.get("teacher"))
    return GradientSource(ctx.data.train, lambda model, x, y: task.loss(model, x, y)[0], ctx.recipe.prune.taylor_batches)


def _step_train_cfg(ctx: Context):
    """Fine-tuning between iterative pruning steps uses the finetune section (else distill's)."""
    return ctx.recipe.finetune or ctx.recipe.distill


def run_finetune(ctx: Context) -> None:
    from .prune import keep_sparsity

    r = ctx.recipe
    key = stage_key("finetune", r.finetune, ctx.keys["prune"], ctx.keys.get("teacher", ""))

    def compute(stage_dir: Path, run) -> Dict[str, Any]:
        reseed(ctx)
        model = copy.deepcopy(ctx.models["prune"])
        keeper = keep_sparsity(model) if r.prune.method == "weight" else None
        history = train(ctx, model, r.finetune, "finetune", stage_dir, run, after_step=keeper)
        return finalize(ctx, "finetune", model, stage_dir, history)

    def restore(stage_dir: Path, result) -> None:
        ctx.models["finetune"] = load_stage_model(ctx, r.student, stage_dir / "model.pt")

    run_cached(ctx, "finetune", key, flat_section("finetune", r.finetune), compute, restore, followers="train")


def flat_section(name: str, section) -> Dict[str, Any]:
    return {f"{name}.{k}": v for k, v in section.model_dump(mode="json").items()}


# ---------------------------------------------------------------- export and bench


def run_export(ctx: Context) -> None:
    from .export_stage import export_all

    final = current_model_stage(ctx)
    key = stage_key("export", ctx.recipe.export, ctx.keys[final], str(ctx.recipe.bench.references if ctx.recipe.bench else False))
    run_cached(ctx, "export", key, flat_section("export", ctx.recipe.export),
               lambda stage_dir, run: export_all(ctx, final, stage_dir, run),
               lambda stage_dir, result: _publish_artifacts(ctx, stage_dir))


def _publish_artifacts(ctx: Context, stage_dir: Path) -> None:
    from .export_stage import publish

    publish(ctx, stage_dir)


def run_bench(ctx: Context) -> None:
    from .export_stage import bench_all

    key = stage_key("bench", ctx.recipe.bench, ctx.keys["export"])
    run_cached(ctx, "bench", key, flat_section("bench", ctx.recipe.bench),
               lambda stage_dir, run: bench_all(ctx, stage_dir, run), lambda stage_dir, result: None)


# ---------------------------------------------------------------- end of run


def finish(ctx: Context) -> None:
    from .report_table import final_table

    if not dist.is_main():
        return
    text = final_table(ctx)
    ctx.summary.data["final_table"] = text
    ctx.summary.write()
    ctx.parent_run.log_metrics(_headline(ctx))
    tqdm.write(text)


def _headline(ctx: Context) -> Dict[str, float]:
    final = current_model_stage(ctx)
    m = dict(ctx.results[final]["metrics"])
    bench = ctx.results.get("bench", {}).get("metrics", {})
    return {**{f"final.{k}": v for k, v in m.items() if isinstance(v, (int, float))}, **bench}
