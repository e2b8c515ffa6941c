"""How a model is trained: the distill / finetune / teacher.train sections, with DKD and feature terms."""

from __future__ import annotations

from typing import List, Literal

from pydantic import Field, field_validator, model_validator

from .base import Section
from .names import _check_name, _loss_needs_teacher, _losses


class DKDConfig(Section):
    alpha: float = Field(
        1.0, ge=0, le=100, description="DKD weight of TCKD, the target-class term (binary target / non-target KL)."
    )
    beta: float = Field(
        8.0,
        ge=0,
        le=100,
        description="DKD weight of NCKD, the non-target-class term (8 in the paper for CIFAR-100, 0.5 for ImageNet; on the Fashion-MNIST demo, 2 epochs, 2 beat KD by 0.5 points and 8 lost 0.6: benchmarks/distill_losses.py).",
    )
    ce_weight: float = Field(1.0, ge=0, le=100, description="DKD weight of the hard-label cross-entropy.")
    warmup_epochs: int = Field(
        0,
        ge=0,
        le=10000,
        description="DKD terms are scaled by min(epoch / warmup_epochs, 1), epochs counted from 1; 0: no warm-up.",
    )


class FeatureConfig(Section):
    student: str = Field(
        ...,
        min_length=1,
        description="Student module path as in model.named_modules(), e.g. features.6 (read by a forward hook).",
    )
    teacher: str = Field(..., min_length=1, description="Teacher module path as in model.named_modules(), e.g. layer2.")
    loss: Literal["mse", "at"] = Field(
        "mse",
        description="mse: feature maps (1x1 conv + BN adapter where channel counts differ); at: attention transfer (channel-free attention maps).",
    )
    weight: float = Field(1.0, gt=0, le=10000, description="Weight of this term in the total loss.")


class TrainConfig(Section):
    epochs: int = Field(2, ge=0, le=10000, description="Training epochs (0 skips training).")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimizer.")
    lr: float = Field(0.1, gt=0, le=10, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (nesterov).")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="Weight decay.")
    schedule: Literal["onecycle", "cosine", "constant"] = Field(
        "onecycle", description="LR schedule, stepped per batch. onecycle converges fastest in few epochs."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy term.")
    channels_last: bool = Field(
        True,
        description="Train in channels-last memory layout (about 2x faster for MobileNet-style depthwise convs on CPU); weights return to the default layout afterwards.",
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="Training forwards in fp32, in bf16 autocast (CPU), or auto: bf16 for the student's step and for "
        "the teacher's forward each only where it timed at least 1.1x faster on the first batch (CPUs with native "
        "bf16; a resnet18 step gains, a mobilenet_v2 step loses 2x: docs/distillation.md). Evaluation, checkpoints "
        "and exports stay fp32.",
    )
    loss: str = Field(
        "ce",
        description="Loss registry name: ce (plain classification), kd (Hinton distillation from the teacher) or dkd (Decoupled KD, Zhao et al. 2022; settings in dkd).",
    )
    temperature: float = Field(
        4.0, gt=0, le=100, description="KD and DKD softmax temperature T (the soft terms are scaled by T^2)."
    )
    alpha: float = Field(
        0.9, ge=0, le=1, description="KD weight of the soft (teacher) term; 1-alpha weights the hard-label CE."
    )
    dkd: DKDConfig = Field(default_factory=DKDConfig, description="Decoupled KD weights and warm-up (loss dkd).")
    features: List[FeatureConfig] = Field(
        default_factory=list,
        max_length=64,
        description="Feature distillation terms, added to the loss: student and teacher module paths read with forward hooks, "
        "with a trained adapter each (not part of the exported model). Needs a teacher section.",
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        return _check_name(_losses, v)

    @model_validator(mode="after")
    def _bf16_without_features(self):
        if self.precision == "bf16" and self.features:
            raise ValueError(
                "precision bf16 with feature distillation terms is not supported (the adapters would see bf16 "
                "feature maps); use precision: fp32 or auto (auto keeps fp32 when features are set)"
            )
        return self

    @property
    def needs_teacher(self) -> bool:
        """The registered loss asks for teacher logits, or a feature term reads teacher modules."""
        return _loss_needs_teacher(self.loss) or bool(self.features)
