"""teacher: train the teacher (from scratch or from pretrained `weights:`), or load it from a checkpoint."""

from __future__ import annotations

from typing import Any, Dict

from ..engine.artifacts import StageResult
from ..engine.stage import Job, Sections, register_stage
from .common import ModelStage, arch_of, finalize, initial_model, model_fingerprint, train


@register_stage
class Teacher(ModelStage):
    name = "teacher"
    row_label = "teacher"
    sections = ("teacher",)

    def fingerprint(self, cfg: Sections) -> Dict[str, Any]:
        return model_fingerprint(cfg.teacher)

    def compute(self, job: Job) -> StageResult:
        cfg = job.cfg.teacher
        model = initial_model(job, cfg)
        if cfg.checkpoint:
            return finalize(job, model, arch_of(cfg), extra={"loaded_from_checkpoint": 1})
        extra = {}
        history = train(job, model, cfg.train, "teacher", report=extra)
        return finalize(job, model, arch_of(cfg), history, extra=extra)
