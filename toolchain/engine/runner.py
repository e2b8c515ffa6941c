"""The runner: plan the stages, key them, run or reuse each, track it, publish it.

Each stage's output lives in <output_dir>/.cache/<stage>-<key>/. The runner alone builds
the key, from exactly what the stage can read: its declared recipe sections (and the files
they name), its input stages' keys, the data key (dataset section, seed, torchrun shards)
and the toolchain version. A folder whose result.json exists is reused (so sweeps share a
teacher, and a rerun after a crash skips finished work); an interrupted training stage
resumes from its last epoch checkpoint. Everything specific to this run (export/<run>/,
summary, MLflow artifacts of the parent run, PE against this run's references) is written
by the stages' publish step, on every run, cache hit or miss.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from tqdm.auto import tqdm

from .. import __version__
from .. import procgroup as dist
from ..errors import RecipeError, ToolchainError
from ..formatting import stable_hash
from ..fsutil import atomic_write_json, atomic_write_text, ensure_dir, file_lock, remove_stale_temp_files
from ..recipe import Recipe, recipe_hash, to_yaml
from ..tracking import NullStageRun, flatten
from . import publish
from .artifacts import StageResult, damaged_files
from .context import RunContext
from .distributed import Coordinator
from .stage import MODELS, STAGES, Job, Sections, Stage, StageOutput
from .summary import Summary, final_table


def plan(recipe: Recipe) -> List[Stage]:
    """The stages this recipe runs, in order; a stage enabled without a stage it requires is a
    one-line RecipeError (checked before anything connects, loads or trains)."""
    from .. import stages  # noqa: F401  (registers every stage)

    enabled = {s.name: s for s in (STAGES.get(n) for n in STAGES.names()) if s.enabled(recipe)}
    for stage in enabled.values():
        for needed, why in stage.requires.items():
            if needed not in enabled:
                section = STAGES.get(needed).sections[0]
                raise RecipeError(
                    f"{stage.name} needs the {needed} stage ({why}); add a{'n' if section[0] in 'aeiou' else ''} "
                    f"{section} section"
                )
    return ordered(enabled)


def consumed(stage: Stage, stages: Dict[str, Stage]) -> Set[str]:
    """The stages among `stages` whose outputs `stage` may read (MODELS: every model stage)."""
    names: Set[str] = set()
    for item in stage.consumes:
        names |= {n for n, s in stages.items() if s.makes_model} if item == MODELS else {item}
    return (names & stages.keys()) - {stage.name}


def ordered(stages: Dict[str, Stage]) -> List[Stage]:
    """Each stage after every stage it consumes; among the stages free to run, the first by name
    (so the order is a property of the declarations, not of import or registration order)."""
    waiting = {name: consumed(stage, stages) for name, stage in stages.items()}
    done: List[Stage] = []
    while waiting:
        free = sorted(name for name, needs in waiting.items() if not needs - {s.name for s in done})
        if not free:
            raise ValueError(f"stages consume each other in a cycle: {', '.join(sorted(waiting))}")
        done.append(stages[free[0]])
        del waiting[free[0]]
    return done


def compress(recipe: Recipe, force: bool = False, recomputed: Optional[Set[Tuple[str, str]]] = None) -> Dict[str, Any]:
    """Run every stage of the recipe; returns the summary dict (also in export/<name>/summary.json).

    recomputed: stages already recomputed under force by earlier calls (see RunContext.recomputed).
    """
    if recipe.matrix is not None:
        raise RecipeError(
            f"recipe {recipe.name!r} has a matrix section (a sweep of variants); run it with `python -m toolchain sweep RECIPE`"
        )
    stages = plan(recipe)
    if os.environ.get("RANK", "0") == "0":  # before the process group exists: torchrun's env says who leads
        remove_stale_temp_files(recipe.output_dir)
    with dist.session(recipe.device), open_run(recipe, force, recomputed) as run:  # torchrun: process group
        for stage in stages:
            stage.preflight(sections_of(recipe, stage, stage.checked), run.data)
        for stage in stages:
            run_stage(run, stage)
        finish(run)
        return run.summary.data


# ---------------------------------------------------------------- keys


def sections_of(recipe: Recipe, stage: Stage, checked: Tuple[str, ...] = ()) -> Sections:
    return Sections(**{name: getattr(recipe, name) for name in (*stage.sections, *checked)})


def stage_key(stage: Stage, cfg: Sections, input_keys: Dict[str, str], data_key: Optional[str]) -> str:
    sections = {n: (_keyed(s) if s is not None else None) for n, s in vars(cfg).items()}
    return stable_hash(
        {
            "stage": stage.name,
            "sections": sections,
            "files": {**stage.revision, **stage.fingerprint(cfg)},  # revisions sit with the content hashes
            "inputs": input_keys,
            "data": data_key,
            "version": __version__,
        }
    )


def _keyed(section) -> Dict[str, Any]:
    """A section's settings that decide the output: fields marked `json_schema_extra={"key": False}`
    (how long a check may take, not what is computed) stay out of the cache key."""
    dump = section.model_dump(mode="json")
    for name, spec in type(section).model_fields.items():
        if isinstance(spec.json_schema_extra, dict) and spec.json_schema_extra.get("key") is False:
            dump.pop(name, None)
    return dump


def dataset_digest(recipe: Recipe, data, **extra) -> str:
    """Which data a run sees: the data section, the seed that splits it, the image files
    (their cache keys: paths, sizes, mtimes) and the resolved preprocessing."""
    return stable_hash(
        {
            "data": recipe.data.model_dump(mode="json"),
            "seed": recipe.seed,
            "files": data.fingerprint,
            "preprocess": data.contract(),
            **extra,
        }
    )


def pretrained_preprocessing(recipe: Recipe):
    """Pretrained library weights bring their preprocessing (size, crop_pct, interpolation, mean/std):
    the data defaults follow the student's (the shipped model), else the teacher's; the recipe's
    data section overrides either."""
    from ..models.resolve import weights_preprocessing

    for section in (recipe.student, recipe.teacher):
        found = weights_preprocessing(section) if section is not None else None
        if found:
            return found
    return None


def data_key(recipe: Recipe, data) -> str:
    # under torchrun each process trains on its 1/N shard: N is part of what the data is
    shards = {"world_size": dist.world_size()} if dist.world_size() > 1 else {}
    return dataset_digest(recipe, data, **shards)


# ---------------------------------------------------------------- one stage


def run_stage(run: RunContext, stage: Stage) -> StageOutput:
    cfg = sections_of(run.recipe, stage)
    models, ran = run.model_stages(), list(run.outputs)
    inputs = {role: _output(run, stage, name) for role, name in stage.inputs(cfg, models, ran).items()}
    reads = {role: _output(run, stage, name) for role, name in stage.reads(cfg, models, ran).items()}
    clash = [r for r in reads if r in inputs and reads[r] is not inputs[r]]
    if clash:
        raise ValueError(f"stage {stage.name}: role {clash[0]!r} names one stage in inputs() and another in reads()")
    key = stage_key(
        stage, cfg, {role: out.key for role, out in inputs.items()}, run.data_key if stage.uses_data else None
    )
    job = Job(
        stage.name,
        cfg,
        inputs,
        run.data,
        run.device,
        run.recipe.seed,
        run.cache_dir / f"{stage.name}-{key}",
        NullStageRun(),
    )
    if not dist.is_main():
        output = Coordinator(stage).follow(job, key)
    else:
        output = _lead(run, stage, job, key, {**inputs, **reads})
    run.outputs[stage.name] = output
    return output


def _output(run: RunContext, stage: Stage, name: str) -> StageOutput:
    """An earlier stage's output, if the stage declared it consumes that stage (the plan's order rests on it)."""
    if name not in consumed(stage, {n: STAGES.get(n) for n in run.outputs}):
        raise ValueError(f"stage {stage.name} reads {name}, which is not in its consumes {stage.consumes}")
    return run.outputs[name]


def _lead(run: RunContext, stage: Stage, job: Job, key: str, published: Dict[str, StageOutput]) -> StageOutput:
    """Rank 0 (or the only process): reuse or compute, track, publish (publish sees `published`:
    the stage's inputs and reads)."""
    coordinator = Coordinator(stage)
    force = run.force and (stage.name, key) not in run.recomputed
    run.recomputed.add((stage.name, key))
    done = job.stage_dir / "result.json"
    # two processes asking for the same stage output (a sweep, a double-started job) take turns:
    # the second waits, then finds result.json and reuses it instead of racing
    with (
        run.tracker.stage(stage.name, stage.params(job.cfg), {"toolchain.stage_key": key}) as child,
        file_lock(run.cache_dir / f".{stage.name}-{key}.lock"),
    ):
        job = replace(job, run=child)
        reusable = None if force else _verified_result(stage.name, job.stage_dir)
        cached = coordinator.begin(reusable is not None, job.stage_dir)
        if cached:
            result = reusable
            model = stage.restore(job, result)
            for epoch, metrics in enumerate(result.history):
                child.log_metrics(metrics, step=epoch)
            tqdm.write(f"[{stage.name}] reused finished output {job.stage_dir} (use --force to recompute)")
        else:
            result = _compute(run, stage, job, force or done.is_file(), coordinator)
            model = result.module
        output = StageOutput(stage.name, key, job.stage_dir, result, model, cached, child.run_id)
        child.set_tags({"toolchain.cached": cached})
        child.log_metrics(result.metrics)
        output.derived = stage.publish(run.publication(published), output, child) or {}
        child.log_metrics(output.derived)
    run.summary.add_stage(output)
    output.model = coordinator.end(job, result, cached, output.model)
    return output


def _verified_result(name: str, stage_dir: Path) -> Optional[StageResult]:
    """The finished result in stage_dir if its result.json parses and every artifact file is
    present with the sha256 recorded when it was written; None (recompute) otherwise."""
    done = stage_dir / "result.json"
    if not done.is_file():
        return None
    try:
        result = StageResult.from_json(json.loads(done.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        tqdm.write(f"[{name}] warning: damaged cache entry {done} ({type(exc).__name__}); recomputing the stage")
        return None
    damaged = damaged_files(stage_dir, result)
    if damaged:
        tqdm.write(
            f"[{name}] warning: cache entry {stage_dir} has missing or altered files ({', '.join(damaged)}); "
            "recomputing the stage"
        )
        return None
    return result


def _compute(run: RunContext, stage: Stage, job: Job, force: bool, coordinator: Coordinator):
    """force: wipe the stage folder first (--force, or a damaged entry)."""
    if force and job.stage_dir.exists():
        shutil.rmtree(job.stage_dir)
    ensure_dir(job.stage_dir)
    t0 = time.perf_counter()
    with coordinator.computing(run.data):
        result = stage.compute(job)
    result.metrics["stage_seconds"] = time.perf_counter() - t0
    atomic_write_json(job.stage_dir / "result.json", result.to_json())  # written last: its presence means "complete"
    return result


# ---------------------------------------------------------------- the run


def finish(run: RunContext) -> None:
    """The headline metrics on the parent run, the optional model registration, the closing table."""
    if not dist.is_main():
        return
    final = run.final_model()
    headline = {f"final.{k}": v for k, v in final.metrics.items() if isinstance(v, (int, float))} if final else {}
    # the same under the plain names the MLflow runs table shows as columns across runs
    headline.update(
        {
            k: headline[f"final.{k}"]
            for k in ("test_accuracy", "vs_teacher.pe_params", "vs_student.pe_params")
            if f"final.{k}" in headline
        }
    )
    for name, output in run.outputs.items():
        headline.update(STAGES.get(name).headline(output))
    run.parent.log_metrics(headline)
    _register_model(run)
    run.summary.data["final_stage"] = final.name if final else None
    run.summary.data["metrics"] = headline  # the parent run's metrics, as sweep and scripts read them
    # the table names the files where they will be once the run is published, not in the staging folder
    shown = Summary(
        run.summary.path,
        {
            **run.summary.data,
            "files": publish.moved_paths(run.summary.data.get("files", {}), run.run_dir, run.publish_dir),
        },
    )
    text = final_table(shown)
    run.summary.data["final_table"] = text
    run.summary.write()
    tqdm.write(text)


def _register_model(run: RunContext) -> None:
    """tracking.register_model: a new registry version of the shipped ONNX model, described by its card."""
    name, model_uri = run.recipe.tracking.register_model, run.summary.data.get("mlflow", {}).get("model_uri")
    if not name:
        return
    if not model_uri:
        tqdm.write(
            f"[mlflow] tracking.register_model {name}: nothing registered, this recipe ships no ONNX model "
            "(add an export section)"
        )
        return
    card_path = run.summary.data.get("files", {}).get("model_card.json")  # still in the staging folder here
    card = json.loads(Path(card_path).read_text()) if card_path else None
    version = run.tracker.register_model(name, model_uri, run.parent.run_id, card)
    run.summary.data["mlflow"]["registered_model"] = {"name": name, "version": str(version.version)}
    tqdm.write(f"[mlflow] registered model {name} version {version.version} ({model_uri})")


def latency_spec(recipe: Recipe) -> Dict[str, Any]:
    """The layer shapes a latency budget's cost model times (prune.budget, latency_aware), for
    `python -m toolchain.bench --latency-table` on the device: the student as the prune stage sees it
    (untrained: shapes do not depend on weights), the budget's batch size and threads."""
    from ..data.loaders import build_data
    from ..models.resolve import architecture
    from ..prune.costmodel import layer_graph, table_spec
    from ..recipe.pruning import LATENCY_BUDGETS

    budget = recipe.prune.budget if recipe.prune is not None else None
    if budget is None or budget.kind not in LATENCY_BUDGETS or recipe.prune.allocation != "latency_aware":
        raise RecipeError(
            "latency-spec needs a latency budget allocated latency_aware (prune.budget.speedup or latency_ms, "
            "prune.allocation: latency_aware)"
        )
    import torch

    data = build_data(
        recipe.data, recipe.seed, torch.device("cpu"), weights_preprocessing=pretrained_preprocessing(recipe)
    )
    example = data.example_batch(2).cpu()
    graph = layer_graph(architecture(recipe.student, data.num_classes).cpu(), example, recipe.prune)
    return table_spec(graph, budget.batch_size, budget.threads or 0)


def recipe_tags(recipe: Recipe) -> Dict[str, Any]:
    return {
        "toolchain.recipe_hash": recipe_hash(recipe),
        "toolchain.version": __version__,
        "dataset": recipe.data.name,
        "student": recipe.student.model,
        "teacher": recipe.teacher.model if recipe.teacher else "none",
        "prune.method": recipe.prune.method if recipe.prune else "none",
        "prune.sparsity": (recipe.prune.sparsity if recipe.prune.budget is None else "budget") if recipe.prune else 0.0,
        # the budget chooses the sparsity in the prune stage (its metric prune.budget.sparsity)
        **(
            {
                "prune.budget": f"{recipe.prune.budget.kind}={recipe.prune.budget.target:g}",
                "prune.allocation": recipe.prune.allocation,
                # attach says whether the device confirms what was predicted on its table
                **({"prune.budget.device_table": "yes"} if recipe.prune.budget.device_table else {}),
            }
            if recipe.prune and recipe.prune.budget
            else {}
        ),
    }


def resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
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
def open_run(recipe: Recipe, force: bool = False, recomputed: Optional[Set[Tuple[str, str]]] = None):
    """Connect tracking first (fail before training), then data, then open the parent run."""
    from ..data.loaders import build_data
    from ..tracking import make_tracker, mask_uri

    seed_everything(recipe.seed)
    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)
    run_dir = ensure_dir(Path(recipe.output_dir) / recipe.name)
    cache_dir = ensure_dir(Path(recipe.output_dir) / ".cache")
    previous = publish.previous_shipment(run_dir)  # whose files export/<run>/ holds until this run succeeds
    # under torchrun a user error on any rank (tracking unreachable on rank 0...) stops every rank
    tracker = dist.agree(lambda: make_tracker(recipe.tracking, dist.is_main()))
    device = dist.agree(lambda: resolve_device(recipe.device))
    data = dist.agree(
        lambda: build_data(
            recipe.data,
            recipe.seed,
            device,
            dist.world_size(),
            dist.rank(),
            weights_preprocessing=pretrained_preprocessing(recipe),
        )
    )
    stale = tracker.mark_stale_runs(recipe.name) if hasattr(tracker, "mark_stale_runs") else []
    scale = dist.describe(recipe.data.batch_size)  # world size, backend, effective batch
    tags = {**recipe_tags(recipe), **{f"toolchain.{k}": v for k, v in scale.items()}}
    if stale:
        tags["toolchain.resumed_after"] = ",".join(stale)
    summary = Summary(
        run_dir / "summary.json",
        {
            "run_name": recipe.name,
            "recipe_hash": recipe_hash(recipe),
            "toolchain_version": __version__,
            "status": "RUNNING",
            "distributed": scale,
            "shipped": _kept(previous, "RUNNING"),
        },
        owner=dist.is_main(),
    )
    # what is logged and written must not carry the tracking password; the real URI connected above
    shown = recipe.model_copy(
        update={"tracking": recipe.tracking.model_copy(update={"uri": mask_uri(recipe.tracking.uri)})}
    )
    staging = publish.staging_dir(run_dir) if dist.is_main() else run_dir  # only rank 0 publishes
    try:
        with tracker.run(recipe.name, flatten(shown.model_dump(mode="json")), tags) as parent:
            yield from _parent_run(
                recipe,
                data,
                tracker,
                parent,
                summary,
                shown,
                device,
                run_dir,
                staging,
                cache_dir,
                previous,
                force,
                recomputed,
            )
    finally:
        if staging != run_dir:
            publish.discard(staging)  # a failed run's half-published files; gone already after a commit


def _kept(previous: Dict[str, Any], status: str) -> Dict[str, Any]:
    """summary.json's `shipped` while the run is not published: export/<run>/ holds the previous files."""
    if previous:
        return {
            **previous,
            "note": f"this run is {status}: export/<run>/ holds the files of the previous successful "
            f"run (parent run {previous.get('parent_run_id')}), unchanged",
        }
    return {"by": None, "files": {}, "note": f"this run is {status}: nothing published in export/<run>/"}


def _parent_run(
    recipe, data, tracker, parent, summary, shown, device, run_dir, staging, cache_dir, previous, force, recomputed
):
    """The body of open_run inside the parent MLflow run: the stages publish into `staging`, which
    replaces run_dir only if the run finishes (engine/publish.py)."""
    if dist.is_main():
        atomic_write_text(staging / "recipe.yaml", to_yaml(shown))
        parent.log_artifact(staging / "recipe.yaml")
        # the UI's Dataset column: which data (digest of the data section and seed) and how it was split
        parent.log_dataset(
            recipe.data.name,
            dataset_digest(recipe, data),
            recipe.data.root or f"{recipe.data.name} (default location)",
            {split: len(getattr(data, split).labels) for split in ("train", "val", "test")},
        )
        parent.log_metrics({f"data.{k}": v for k, v in data.stats.items()})  # skipped / enlarged image files
    summary.data["mlflow"] = {
        "tracking_uri": tracker.display_uri,
        "experiment_id": tracker.experiment_id,
        "parent_run_id": tracker.parent_run_id,
    }
    summary.write()  # status RUNNING from the start: a crash before the first stage still leaves a trace
    run = RunContext(
        recipe,
        device,
        data,
        data_key(recipe, data),
        tracker,
        parent,
        staging,
        cache_dir,
        summary,
        force=force,
        recomputed=set() if recomputed is None else recomputed,
        final_dir=run_dir,
    )
    try:
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        # none of this run's files were published: the summary names the ones export/<run>/ still holds
        summary.data.update(files=previous.get("files", {}), shipped=_kept(previous, status))
        summary.close(status)
        raise
    if dist.is_main():
        _commit(summary, tracker, staging, run_dir)
    summary.close("FINISHED")


def _commit(summary: Summary, tracker, staging: Path, run_dir: Path) -> None:
    """The summary goes in with the files it describes, then the folder is swapped in whole."""
    summary.data["files"] = publish.moved_paths(summary.data.get("files", {}), staging, run_dir)
    summary.data["shipped"] = {
        "by": "run",
        "parent_run_id": tracker.parent_run_id,
        "recipe_hash": summary.data.get("recipe_hash"),
        "files": summary.data["files"],
        "note": "this run's files",
    }
    summary.data["status"] = "FINISHED"
    summary.path = staging / "summary.json"
    summary.write()
    publish.commit(staging, run_dir)
    summary.path = run_dir / "summary.json"
