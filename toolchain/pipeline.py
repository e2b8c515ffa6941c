"""The compress pipeline: stage order, content-keyed caching/resume, summary, error wrapping.

Each stage's output lives in <output_dir>/.cache/<stage>-<key>/ where the key hashes the
stage's recipe section, its input stage's key and the toolchain version. A stage whose
result.json exists is reused (so sweeps share a teacher, and a rerun after a crash
skips finished work); a training stage that was interrupted resumes from its last
epoch checkpoint. Changing one section changes its key and every key after it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from tqdm.auto import tqdm

from . import __version__
from .fsutil import atomic_write_json, ensure_dir
from .recipe import Recipe, recipe_hash, stable_hash, to_yaml
from .tracking import flatten


@dataclass
class Summary:
    """export/<run-name>/summary.json: stage -> metrics, paths, MLflow run id. Rewritten after every stage."""

    path: Path
    data: Dict[str, Any] = field(default_factory=dict)
    owner: bool = True  # under torchrun only rank 0 writes it

    def add_stage(self, name: str, result: Dict[str, Any], run_id: Optional[str], cached: bool) -> None:
        self.data.setdefault("stages", {})[name] = {**result, "mlflow_run_id": run_id, "cached": cached}
        self.write()

    def write(self) -> None:
        if self.owner:
            atomic_write_json(self.path, self.data)


@dataclass
class Context:
    """What the stages share. Models live here between stages; results in `results`."""

    recipe: Recipe
    device: Any
    data: Any
    tracker: Any
    run_dir: Path
    cache_dir: Path
    summary: Summary
    force: bool = False
    # (stage, key) pairs already recomputed under force: a sweep shares one set, so --force
    # recomputes each stage once per sweep (one teacher), not once per variant
    recomputed: Set[Tuple[str, str]] = field(default_factory=set)
    keys: Dict[str, str] = field(default_factory=dict)
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    models: Dict[str, Any] = field(default_factory=dict)
    after_step: Optional[Callable[[], None]] = None
    parent_run: Any = None

    @property
    def input_shape(self):
        return self.data.input_shape


def stage_key(name: str, section: Any, *inputs: str) -> str:
    body = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return stable_hash({"stage": name, "section": body, "inputs": list(inputs), "version": __version__})


def run_cached(ctx: Context, name: str, key: str, params: Dict[str, Any],
               compute: Callable[[Path, Any], Dict[str, Any]], restore: Callable[[Path, Dict[str, Any]], None],
               followers: str = "wait") -> Dict[str, Any]:
    """Run a stage in its child MLflow run, or reuse its finished output.

    Under torchrun only rank 0 runs this body (tracking, cache, files). `followers` says what the
    other ranks do meanwhile: "train" (join the DDP compute), "load" (wait, then load rank 0's
    model), "wait" (nothing to load: export, bench). See toolchain/distributed.py.
    """
    from . import distributed as dist

    ctx.keys[name] = key
    stage_dir = ctx.cache_dir / f"{name}-{key}"
    done_file = stage_dir / "result.json"
    if not dist.is_main():
        return dist.follow_stage(ctx, name, followers, compute, restore)
    force = ctx.force and (name, key) not in ctx.recomputed
    ctx.recomputed.add((name, key))
    with ctx.tracker.stage(name, params=params, tags={"toolchain.stage_key": key}) as run, \
            stage_lock(ctx.cache_dir / f".{name}-{key}.lock"):
        cached = dist.lead_stage(done_file.is_file() and not force, stage_dir, followers)
        if cached:
            result = json.loads(done_file.read_text())
            restore(stage_dir, result)
            _relog_history(run, result)
            tqdm.write(f"[{name}] reused finished output {stage_dir} (use --force to recompute)")
        else:
            if force and stage_dir.exists():
                shutil.rmtree(stage_dir)
            ensure_dir(stage_dir)
            t0 = time.perf_counter()
            with dist.leading(ctx.data, followers):
                result = compute(stage_dir, run)
            result.setdefault("metrics", {})["stage_seconds"] = time.perf_counter() - t0
            atomic_write_json(done_file, result)  # written last: its presence means "complete"
        run.set_tags({"toolchain.cached": cached})
        run.log_metrics(result.get("metrics", {}))
    ctx.results[name] = result
    ctx.summary.add_stage(name, result, run.run_id, cached)
    dist.publish_stage(stage_dir, result, followers, None if cached else restore)
    return result


@contextmanager
def stage_lock(path: Path):
    """Two processes asking for the same stage output (a sweep, a double-started job) take
    turns: the second waits, then finds result.json and reuses it instead of racing."""
    from .fsutil import file_lock

    with file_lock(path):
        yield


def _relog_history(run, result: Dict[str, Any]) -> None:
    for epoch, metrics in enumerate(result.get("history", [])):
        run.log_metrics(metrics, step=epoch)


def plan(recipe: Recipe) -> List[str]:
    """Stage names in the order they run for this recipe."""
    stages = ["teacher"] if recipe.teacher else []
    stages.append("distill")
    if recipe.prune:
        stages.append("prune")
    if recipe.finetune:
        stages.append("finetune")
    if recipe.export:
        stages.append("export")
    if recipe.bench:
        stages.append("bench")
    return stages


def compress(recipe: Recipe, force: bool = False, recomputed: Optional[Set[Tuple[str, str]]] = None) -> Dict[str, Any]:
    """Run every stage of the recipe; returns the summary dict (also in export/<name>/summary.json).

    recomputed: stages already recomputed under force by earlier calls (see Context.recomputed).
    """
    from . import distributed as dist
    from . import stages

    if recipe.matrix is not None:
        from .errors import RecipeError

        raise RecipeError(f"recipe {recipe.name!r} has a matrix section (a sweep of variants); run it with `python -m toolchain sweep RECIPE`")
    with dist.session(recipe.device), make_context(recipe, force, recomputed) as ctx:  # torchrun: process group
        for name in plan(recipe):
            getattr(stages, f"run_{name}")(ctx)
        stages.finish(ctx)
        return ctx.summary.data


def recipe_params(recipe: Recipe) -> Dict[str, Any]:
    return flatten(recipe.model_dump(mode="json"))


def recipe_tags(recipe: Recipe) -> Dict[str, Any]:
    tags = {
        "toolchain.recipe_hash": recipe_hash(recipe),
        "toolchain.version": __version__,
        "dataset": recipe.data.name,
        "student": recipe.student.model,
        "teacher": recipe.teacher.model if recipe.teacher else "none",
        "prune.method": recipe.prune.method if recipe.prune else "none",
        "prune.sparsity": recipe.prune.sparsity if recipe.prune else 0.0,
    }
    return tags


def write_recipe_copy(run_dir: Path, recipe: Recipe) -> Path:
    path = run_dir / "recipe.yaml"
    from .fsutil import atomic_write_text

    atomic_write_text(path, to_yaml(recipe))
    return path


def resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        from .errors import ToolchainError

        raise ToolchainError("device: cuda requested but torch sees no CUDA device; set device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def make_context(recipe: Recipe, force: bool = False, recomputed: Optional[Set[Tuple[str, str]]] = None):
    """Connect tracking first (fail before training), then data, then open the parent run."""
    from . import distributed as dist
    from .data import build_data
    from .tracking import make_tracker

    seed_everything(recipe.seed)
    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)
    run_dir = ensure_dir(Path(recipe.output_dir) / recipe.name)
    cache_dir = ensure_dir(Path(recipe.output_dir) / ".cache")
    # under torchrun a user error on any rank (tracking unreachable on rank 0...) stops every rank
    tracker = dist.agree(lambda: make_tracker(recipe.tracking, dist.is_main()))
    device = dist.agree(lambda: resolve_device(recipe.device))
    data = dist.agree(lambda: build_data(recipe.data, recipe.seed, device, dist.world_size(), dist.rank()))
    stale = tracker.mark_stale_runs(recipe.name) if hasattr(tracker, "mark_stale_runs") else []
    tags = recipe_tags(recipe)
    scale = dist.describe(recipe.data.batch_size)  # world size, backend, effective batch
    tags.update({f"toolchain.{k}": v for k, v in scale.items()})
    if stale:
        tags["toolchain.resumed_after"] = ",".join(stale)
    summary = Summary(run_dir / "summary.json", {"run_name": recipe.name, "recipe_hash": recipe_hash(recipe),
                                                  "toolchain_version": __version__, "status": "RUNNING",
                                                  "distributed": scale}, owner=dist.is_main())
    with tracker.run(recipe.name, recipe_params(recipe), tags) as parent:
        if dist.is_main():
            parent.log_artifact(write_recipe_copy(run_dir, recipe))
        summary.data["mlflow"] = {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                                  "parent_run_id": tracker.parent_run_id}
        summary.write()  # status RUNNING from the start: a crash before the first stage still leaves a trace
        ctx = Context(recipe, device, data, tracker, run_dir, cache_dir, summary, force=force,
                      recomputed=set() if recomputed is None else recomputed, parent_run=parent)
        try:
            yield ctx
        except KeyboardInterrupt:
            _close_summary(summary, "KILLED")
            raise
        except BaseException:
            _close_summary(summary, "FAILED")
            raise
        _close_summary(summary, "FINISHED")


def _close_summary(summary: Summary, status: str) -> None:
    if summary.path.parent.is_dir():
        summary.data["status"] = status
        summary.write()
