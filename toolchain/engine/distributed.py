"""The runner's side of torchrun: who computes a stage, who waits, how the others catch up.

Rank 0 owns MLflow and every file under output_dir; it decides whether a stage is reused
and tells the others (so a result.json appearing mid-stage cannot make ranks disagree).
A stage's `followers` role says what the other ranks do meanwhile:
    train  join the DDP computation (teacher, distill, finetune), then load rank 0's checkpoint;
    load   wait while rank 0 computes alone (pruning + speedup), then load its checkpoint;
    wait   nothing to load (export, bench).
The process-group helpers themselves are in toolchain/train/ddp.py.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable

from ..tracking import NullStageRun
from ..train import ddp as dist
from .artifacts import StageResult
from .stage import Job, Stage, StageOutput

SHARED_FILES = {"train": ["train_state.pt"], "end": ["model.pt"]}


def lead_stage(cached: bool, stage_dir: Path, followers: str) -> bool:
    """Rank 0 at the start of a stage: tell the others whether it is reused, and hand a DDP
    stage's resume checkpoint to them so every rank restarts at the same epoch."""
    if dist.is_distributed():
        files = _read_files(stage_dir, SHARED_FILES["train"]) if followers == "train" and not cached else {}
        dist.share({"cached": cached, "files": files})
    return cached


@contextmanager
def leading(data, followers: str):
    """Rank 0 computes: with the others (train), or alone while they wait (load, wait)."""
    if dist.is_distributed() and followers != "train":
        with dist.solo(data):
            yield
    else:
        yield


def publish_stage(stage_dir: Path, result: StageResult, followers: str) -> None:
    """Rank 0 at the end of a stage: send the result and the model checkpoint to the others."""
    if not dist.is_distributed():
        return
    files = _read_files(stage_dir, SHARED_FILES["end"]) if followers != "wait" else {}
    dist.share({"result": result.to_json(), "files": files})


def follow_stage(stage: Stage, job: Job, key: str) -> StageOutput:
    """A non-zero rank's side of a stage: join the DDP computation or wait, then load rank 0's
    checkpoint. Works in a private temp folder, never in rank 0's output_dir."""
    start = dist.share()
    with tempfile.TemporaryDirectory(prefix=f"toolchain-rank{dist.rank()}-{stage.name}-") as tmp:
        job = replace(job, run=NullStageRun(), stage_dir=Path(tmp))
        _write_files(job.stage_dir, start["files"])
        if stage.followers == "train" and not start["cached"]:
            stage.compute(job)
        end = dist.share()
        _write_files(job.stage_dir, end["files"])
        result = StageResult.from_json(end["result"])
        model = stage.restore(job, result) if stage.followers in ("train", "load") else None
    return StageOutput(stage.name, key, job.stage_dir, result, model, start["cached"])


def _read_files(directory: Path, names: Iterable[str]) -> Dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in names if (directory / n).is_file()}


def _write_files(directory: Path, files: Dict[str, Any]) -> None:
    for name, data in files.items():
        (directory / name).write_bytes(data)
