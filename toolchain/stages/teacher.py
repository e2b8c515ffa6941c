"""teacher: train the teacher, or load it from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_weights
from ..engine.stage import register_stage
from ..fsutil import file_sha256
from .common import ModelStage, arch_of, finalize, new_model, train


def file_digest(path) -> str:
    """sha256 of a file the recipe names (streamed), so editing the file changes the key."""
    if not path or not Path(path).is_file():
        return str(path)
    return file_sha256(path)[:16]


@register_stage
class Teacher(ModelStage):
    name = "teacher"
    order = 10
    sections = ("teacher",)

    def fingerprint(self, cfg):
        return {"checkpoint": file_digest(cfg.teacher.checkpoint)}

    def compute(self, job):
        cfg = job.cfg.teacher
        model = new_model(job, cfg)
        if cfg.checkpoint:
            load_weights(model.cpu(), cfg.checkpoint, cfg.model)
            return finalize(job, model.to(job.device), arch_of(cfg), extra={"loaded_from_checkpoint": 1})
        return finalize(job, model, arch_of(cfg), train(job, model, cfg.train, "teacher"))
