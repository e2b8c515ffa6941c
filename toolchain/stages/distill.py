"""distill: train the student, distilling from the teacher when its loss or feature terms need one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Sequence

from ..engine.artifacts import StageResult
from ..engine.stage import Job, Sections, register_stage
from .common import ModelStage, arch_of, check_features, finalize, initial_model, model_fingerprint, teacher_role, train

if TYPE_CHECKING:  # annotations only
    from ..data.loaders import DataBundle
    from ..recipe import Recipe


@register_stage
class Distill(ModelStage):
    name = "distill"
    row_label = "KD student"
    consumes = ("teacher",)
    sections = ("student", "distill")
    checked = ("teacher",)  # the feature paths the preflight resolves

    def preflight(self, cfg: Sections, data: DataBundle) -> None:
        super().preflight(cfg, data)
        check_features(cfg.distill, cfg.student, cfg.teacher, data, "distill")

    def enabled(self, recipe: Recipe) -> bool:
        return True

    def inputs(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        return teacher_role(cfg.distill, models)

    def fingerprint(self, cfg: Sections) -> Dict[str, Any]:
        return model_fingerprint(cfg.student)

    def compute(self, job: Job) -> StageResult:
        model = initial_model(job, job.cfg.student)
        extra = {}
        history = train(job, model, job.cfg.distill, "distill", report=extra)
        return finalize(job, model, arch_of(job.cfg.student), history, extra=extra)
