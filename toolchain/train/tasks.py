"""Task objects: what the loss sees. One training loop (loop.fit) serves them all.

ClassificationTask trains on labels; DistillationTask adds a frozen teacher's logits
(timm's distillation task is the model).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .losses import LOSSES, needs_teacher


class ClassificationTask:
    def __init__(self, loss_name: str = "ce", **loss_kwargs):
        self.loss_fn = LOSSES.get(loss_name)
        self.loss_kwargs = loss_kwargs

    def teacher_logits(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        teacher = self.teacher_logits(x)
        logits = model(x)
        return self.loss_fn(logits, y, teacher, **self.loss_kwargs), logits


class DistillationTask(ClassificationTask):
    def __init__(self, teacher: nn.Module, loss_name: str = "kd", **loss_kwargs):
        super().__init__(loss_name, **loss_kwargs)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)


def make_task(cfg, teacher: Optional[nn.Module] = None) -> ClassificationTask:
    """cfg is a recipe TrainConfig; the recipe schema already checked kd has a teacher."""
    if needs_teacher(cfg.loss):
        return DistillationTask(teacher, cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha,
                                label_smoothing=cfg.label_smoothing)
    return ClassificationTask(cfg.loss, label_smoothing=cfg.label_smoothing)
