"""The runner's side of torchrun, in one object: who computes a stage, who waits, how the others catch up.

Rank 0 owns MLflow and every file under output_dir; it decides whether a stage is reused
and tells the others (so a result.json appearing mid-stage cannot make ranks disagree).
A stage's `followers` role says what the other ranks do meanwhile:
    train  join the DDP computation (teacher, distill, finetune), then load rank 0's checkpoint;
    load   wait while rank 0 computes alone (pruning + speedup), then load its checkpoint;
    wait   nothing to load (export, bench).
The process group itself (rank, share, solo) is toolchain/procgroup.py, a leaf module.
Without torchrun every step below is a no-op and the runner's path is the plain one.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from .. import procgroup as pg
from ..tracking import NullStageRun
from .artifacts import StageResult
from .stage import Job, Stage, StageOutput

SHARED_FILES = {"train": ["train_state.pt"], "end": ["model.pt"]}


class Coordinator:
    """The torchrun protocol of one stage. Rank 0 calls begin -> computing -> end; every other
    rank calls follow, which mirrors those three steps (each step is one `share` on both sides)."""

    def __init__(self, stage: Stage):
        self.stage = stage

    @property
    def followers(self) -> str:
        return self.stage.followers

    def begin(self, cached: bool, stage_dir: Path) -> bool:
        """Rank 0 at the start of a stage: tell the others whether it is reused, and hand a DDP
        stage's resume checkpoint to them so every rank restarts at the same epoch."""
        if pg.is_distributed():
            files = _read_files(stage_dir, SHARED_FILES["train"]) if self.followers == "train" and not cached else {}
            pg.share({"cached": cached, "files": files})
        return cached

    @contextmanager
    def computing(self, data):
        """Rank 0 computes: with the others (train), or alone while they wait (load, wait)."""
        if pg.is_distributed() and self.followers != "train":
            with pg.solo(data):
                yield
        else:
            yield

    def end(self, job: Job, result: StageResult, cached: bool, model: Any) -> Any:
        """Rank 0 at the end of a stage: send the result and the model checkpoint to the others;
        returns the model to continue with (after a `load` stage rank 0 too continues from the
        checkpoint, so every rank holds the same modules)."""
        if not pg.is_distributed():
            return model
        files = _read_files(job.stage_dir, SHARED_FILES["end"]) if self.followers != "wait" else {}
        pg.share({"result": result.to_json(), "files": files})
        if self.followers == "load" and not cached:
            return self.stage.restore(job, result)
        return model

    def follow(self, job: Job, key: str) -> StageOutput:
        """A non-zero rank's side of a stage: join the DDP computation or wait, then load rank 0's
        checkpoint. Works in a private temp folder, never in rank 0's output_dir."""
        start = pg.share()
        with tempfile.TemporaryDirectory(prefix=f"toolchain-rank{pg.rank()}-{self.stage.name}-") as tmp:
            job = replace(job, run=NullStageRun(), stage_dir=Path(tmp))
            _write_files(job.stage_dir, start["files"])
            if self.followers == "train" and not start["cached"]:
                self.stage.compute(job)
            end = pg.share()
            _write_files(job.stage_dir, end["files"])
            result = StageResult.from_json(end["result"])
            model: Optional[Any] = self.stage.restore(job, result) if self.followers in ("train", "load") else None
        return StageOutput(self.stage.name, key, job.stage_dir, result, model, start["cached"])


def _read_files(directory: Path, names: Iterable[str]) -> Dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in names if (directory / n).is_file()}


def _write_files(directory: Path, files: Dict[str, Any]) -> None:
    for name, data in files.items():
        (directory / name).write_bytes(data)
