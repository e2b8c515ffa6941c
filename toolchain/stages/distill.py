"""distill: train the student, with KD from the teacher when its loss needs one."""

from __future__ import annotations

from ..engine.stage import register_stage
from .common import ModelStage, arch_of, file_digest, finalize, initial_model, teacher_role, train


@register_stage
class Distill(ModelStage):
    name = "distill"
    order = 20
    sections = ("student", "distill")

    def enabled(self, recipe) -> bool:
        return True

    def inputs(self, cfg, models, ran):
        return teacher_role(cfg.distill, models)

    def fingerprint(self, cfg):
        return {"checkpoint": file_digest(cfg.student.checkpoint)}

    def compute(self, job):
        model = initial_model(job, job.cfg.student)
        return finalize(job, model, arch_of(job.cfg.student), train(job, model, job.cfg.distill, "distill"))
