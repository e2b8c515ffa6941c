"""distill: train the student, with KD from the teacher when its loss needs one."""

from __future__ import annotations

from ..checkpoint import load_weights
from ..engine.stage import register_stage
from .common import ModelStage, arch_of, finalize, new_model, teacher_role, train
from .teacher import file_digest


@register_stage
class Distill(ModelStage):
    name = "distill"
    order = 20
    sections = ("student", "distill")

    def enabled(self, recipe) -> bool:
        return True

    def inputs(self, cfg, models):
        return teacher_role(cfg.distill, models)

    def fingerprint(self, cfg):
        return {"checkpoint": file_digest(cfg.student.checkpoint)}

    def compute(self, job):
        student = job.cfg.student
        model = new_model(job, student)
        if student.checkpoint:
            load_weights(model.cpu(), student.checkpoint, student.model)
            model.to(job.device)
        return finalize(job, model, arch_of(student), train(job, model, job.cfg.distill, "distill"))
