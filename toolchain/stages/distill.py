"""distill: train the student, distilling from the teacher when its loss or feature terms need one."""

from __future__ import annotations

from ..engine.stage import register_stage
from .common import ModelStage, arch_of, check_features, finalize, initial_model, model_fingerprint, teacher_role, train


@register_stage
class Distill(ModelStage):
    name = "distill"
    row_label = "KD student"
    order = 20
    sections = ("student", "distill")
    checked = ("teacher",)  # the feature paths the preflight resolves

    def preflight(self, cfg, data) -> None:
        super().preflight(cfg, data)
        check_features(cfg.distill, cfg.student, cfg.teacher, data, "distill")

    def enabled(self, recipe) -> bool:
        return True

    def inputs(self, cfg, models, ran):
        return teacher_role(cfg.distill, models)

    def fingerprint(self, cfg):
        return model_fingerprint(cfg.student)

    def compute(self, job):
        model = initial_model(job, job.cfg.student)
        extra = {}
        history = train(job, model, job.cfg.distill, "distill", report=extra)
        return finalize(job, model, arch_of(job.cfg.student), history, extra=extra)
