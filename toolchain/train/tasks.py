"""Task objects: what the loss sees. One training loop (loop.fit) serves them all.

ClassificationTask trains on labels; DistillationTask adds a frozen teacher's logits and,
with feature terms, the outputs of named modules of both models (timm's distillation
task is the model). `loss` returns the total, the logits and every term for logging.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .features import FeatureDistiller, tapped
from .losses import get_loss
from .precision import Precision, autocast

Terms = Dict[str, torch.Tensor]


class ClassificationTask:
    teacher: Optional[nn.Module] = None
    features: Optional[FeatureDistiller] = None  # trainable adapters, kept out of the model
    precision: Precision = Precision()  # set by fit: the forwards' autocast (losses always in fp32)

    def __init__(self, loss_name: str = "ce", warmup_epochs: int = 0, **loss_kwargs):
        self.loss_fn = get_loss(loss_name)
        self.loss_kwargs = loss_kwargs
        self.warmup_epochs = warmup_epochs
        self.epoch = 0  # set by fit; DKD's terms ramp up over warmup_epochs

    def warmup(self) -> float:
        """min(epoch / warmup_epochs, 1) with 1-based epochs, as in mdistiller's DKD."""
        return min((self.epoch + 1) / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def teacher_logits(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Terms]:
        teacher = self.teacher_logits(x)
        with autocast(self.precision.student):
            logits = model(x)
        logits = logits.float()
        terms = self.loss_fn(logits, y, teacher, warmup=self.warmup(), **self.loss_kwargs)
        return terms.pop("total"), logits, terms


class DistillationTask(ClassificationTask):
    def __init__(self, teacher: nn.Module, loss_name: str = "kd", **loss_kwargs):
        super().__init__(loss_name, **loss_kwargs)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision.teacher):
            return self.teacher(x).float()

    def loss(self, model, x, y):
        if self.features is None:
            return super().loss(model, x, y)
        with (
            tapped(self.teacher, self.features.teacher_paths()) as t_feats,
            tapped(model, self.features.student_paths()) as s_feats,
        ):
            total, logits, terms = super().loss(model, x, y)
        feats = self.features.terms(s_feats, t_feats)
        return total + sum(feats.values()), logits, {**terms, **feats}


def make_task(
    cfg,
    teacher: Optional[nn.Module] = None,
    student: Optional[nn.Module] = None,
    input_shape=None,
    section: str = "distill",
) -> ClassificationTask:
    """cfg is a recipe TrainConfig; the recipe schema already checked a teacher is there when needed.

    Feature terms need the student and the data's input shape (their adapters are built from
    the probed shapes); without them (taylor scoring) the task uses the logit loss alone."""
    kwargs = dict(
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        label_smoothing=cfg.label_smoothing,
        dkd_alpha=cfg.dkd.alpha,
        dkd_beta=cfg.dkd.beta,
        ce_weight=cfg.dkd.ce_weight,
        warmup_epochs=cfg.dkd.warmup_epochs,
    )
    if not cfg.needs_teacher:
        return ClassificationTask(cfg.loss, **kwargs)
    task = DistillationTask(teacher, cfg.loss, **kwargs)
    if cfg.features and student is not None and input_shape is not None:
        task.features = FeatureDistiller(cfg.features, student, teacher, input_shape, section)
    return task
