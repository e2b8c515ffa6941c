"""The recipe: YAML -> typed, validated configuration.

This module is the single place where user input is validated. Every model has
extra="forbid" (a typo is an error, not a silently ignored key) and every field a
description (shown by `python -m toolchain validate`). Downstream code trusts it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from .errors import RecipeError
from .formatting import stable_hash

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_name(registry_getter, value: str) -> str:
    registry = registry_getter()
    if value not in registry:
        raise ValueError(registry.unknown_message(value))
    return value


def _model_ref(value: str) -> str:
    from .models.refs import check_reference

    return check_reference(value)


def _datasets():
    from .data.datasets import DATASETS

    return DATASETS


def _losses():
    from .train.losses import LOSSES

    return LOSSES


def _loss_needs_teacher(name: str) -> bool:
    from .train.losses import get_loss

    return get_loss(name).needs_teacher


def _pruners():
    from .prune.registry import PRUNERS

    return PRUNERS


class DataConfig(Section):
    name: str = Field(
        "fashion_mnist", description="Dataset registry name (fashion_mnist, cifar10, cifar100, imagefolder)."
    )
    root: Optional[str] = Field(
        None, description="Where the dataset files are; None uses the dataset's default location."
    )
    download: bool = Field(
        False, description="Allow torchvision to download the dataset when the files are missing (needs internet)."
    )
    val_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Fraction of the training split held out (seeded) for validation / model selection.",
    )
    subset: Optional[int] = Field(
        None, ge=20, description="Use only this many training images (seeded) for quick runs; None uses all."
    )
    test_subset: Optional[int] = Field(None, ge=10, description="Use only this many test images; None uses all.")
    batch_size: int = Field(128, ge=1, le=65536, description="Training batch size (per process under torchrun).")
    eval_batch_size: int = Field(512, ge=1, le=65536, description="Batch size for evaluation.")
    augment: bool = Field(
        True, description="Training augmentation on (train_crop + hflip); false trains on the evaluation view."
    )
    image_size: Optional[Union[int, List[int]]] = Field(
        None,
        description="Model input size: an int for square, or [height, width]. None: the dataset's (32 for CIFAR and Fashion-MNIST, 224 for imagefolder).",
    )
    crop_pct: Optional[float] = Field(
        None,
        gt=0.05,
        le=1,
        description="Evaluation: resize to image_size / crop_pct, then centre-crop image_size. None: the dataset's (1.0 for CIFAR/Fashion-MNIST, 0.875 for imagefolder).",
    )
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = Field(
        None, description="Resampling filter for every resize. None: bilinear."
    )
    train_crop: Optional[Literal["none", "pad", "random_resized"]] = Field(
        None,
        description="Training crop: random_resized (RandomResizedCrop over crop_scale/crop_ratio), pad (CIFAR's pad-and-crop), none (the evaluation view). None: the dataset's (none for Fashion-MNIST, pad for CIFAR, random_resized for imagefolder).",
    )
    crop_scale: List[float] = Field(
        default_factory=lambda: [0.08, 1.0],
        description="random_resized: range of the crop's area as a fraction of the image.",
    )
    crop_ratio: List[float] = Field(
        default_factory=lambda: [3 / 4, 4 / 3],
        description="random_resized: range of the crop's aspect ratio (width / height).",
    )
    hflip: bool = Field(True, description="Random horizontal flip during training.")
    mean: Optional[List[float]] = Field(
        None, description="Per-channel normalisation mean (3 values, on the 0-1 scale). None: the dataset's."
    )
    std: Optional[List[float]] = Field(
        None, description="Per-channel normalisation std (3 values). None: the dataset's."
    )
    num_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="Loader worker processes that read and augment training batches (0: in the training process); also the decoding processes of the image cache (0: one per core). See docs/data.md for what was measured.",
    )
    cache_dir: Optional[str] = Field(
        None,
        description="imagefolder: where the decode-once image cache lives; None: $TOOLCHAIN_CACHE/images or ~/.cache/toolchain/images.",
    )
    skip_bad_images: bool = Field(
        False,
        description="imagefolder: skip (and count, and log) unreadable or truncated image files instead of stopping with an error naming the file.",
    )

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return _check_name(_datasets, v)

    @field_validator("image_size")
    @classmethod
    def _size(cls, v):
        sides = [v] if isinstance(v, int) else v
        if v is not None and (len(sides) not in (1, 2) or any(s < 8 or s > 4096 for s in sides)):
            raise ValueError("give an int or [height, width], each from 8 to 4096")
        return v

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, v: List[float]) -> List[float]:
        if len(v) != 2 or not 0 < v[0] <= v[1]:
            raise ValueError("give [low, high] with 0 < low <= high")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _three(cls, v):
        if v is not None and len(v) != 3:
            raise ValueError("give 3 values, one per RGB channel")
        return v

    @model_validator(mode="after")
    def _scale_is_a_fraction(self) -> "DataConfig":
        if self.crop_scale[1] > 1:
            raise ValueError("crop_scale: the area fraction cannot exceed 1")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std: every value must be > 0")
        return self


class ModelConfig(Section):
    model: str = Field(
        ...,
        description="The architecture: a registry name (resnet18, mobilenet_v2, cifar_resnet20), "
        "torchvision/<name> (any torchvision classifier), timm/<name> (any timm model), or "
        "package.module:callable (your code, importable from PYTHONPATH or the recipe's folder, called "
        "with num_classes= and the kwargs below, returning a torch.nn.Module).",
    )
    kwargs: Dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the model's builder "
        "(torchvision/timm constructor or your callable), e.g. {drop_rate: 0.2}.",
    )
    weights: Optional[str] = Field(
        None,
        description="Initial weights: DEFAULT or an enum name such as IMAGENET1K_V2 (torchvision/<name>), pretrained "
        "(timm/<name>), downloaded into the library's cache; or a state_dict file (.pth, .pt, .safetensors) for any model. "
        "A classifier with another number of classes than the dataset is re-initialised.",
    )
    cifar_stem: bool = Field(
        False,
        description="Registry models: replace the ImageNet stem (stride-2 conv + maxpool) by a stride-1 3x3 conv, as in "
        "CIFAR papers. More accurate on 32x32 inputs, but 10-30x more MACs: meant for GPU runs.",
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _model_ref(v)

    @field_validator("kwargs")
    @classmethod
    def _own_kwargs(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        taken = sorted(set(v) & {"num_classes", "weights", "pretrained", "cifar_stem"})
        if taken:
            raise ValueError(
                f"kwargs cannot set {', '.join(taken)}: the toolchain sets them (num_classes from the "
                "dataset; use the section's weights: / cifar_stem: keys)"
            )
        return v

    @model_validator(mode="after")
    def _weights_fit_model(self) -> "ModelConfig":
        from .models.refs import check_cifar_stem
        from .models.weights import check_weights

        if self.weights is not None:
            check_weights(self.model, self.weights)
        if self.cifar_stem:
            check_cifar_stem(self.model)
        return self


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


class TeacherConfig(ModelConfig):
    checkpoint: Optional[str] = Field(None, description="Load this state_dict (.pt, weights only) instead of training.")
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="How to train the teacher when no checkpoint is given."
    )

    @model_validator(mode="after")
    def _train_or_load(self) -> "TeacherConfig":
        _checkpoint_or_weights(self)
        if self.checkpoint is None and self.train.epochs == 0:
            raise ValueError("teacher needs a checkpoint or train.epochs >= 1")
        if self.train.needs_teacher:
            raise ValueError(
                f"teacher.train cannot distil (loss {self.train.loss}"
                f"{', features' if self.train.features else ''}): the teacher has no teacher; use loss: ce "
                "without features"
            )
        return self


class StudentConfig(ModelConfig):
    checkpoint: Optional[str] = Field(
        None, description="Start the student from this state_dict instead of random init."
    )

    @model_validator(mode="after")
    def _one_start(self) -> "StudentConfig":
        return _checkpoint_or_weights(self)


def _checkpoint_or_weights(section):
    if section.checkpoint and section.weights:
        raise ValueError(
            "set checkpoint (this architecture and dataset, loaded strictly) or weights (pretrained, "
            "heads re-initialised), not both"
        )
    return section


BUDGET_KINDS = ("speedup", "latency_ms", "macs", "params", "file_bytes")
LATENCY_BUDGETS = ("speedup", "latency_ms")


class PruneBudget(Section):
    """What the pruned model must reach (issue 31); the channel sparsity is searched to meet it (docs/pruning.md)."""

    speedup: Optional[float] = Field(
        None,
        gt=1,
        le=1000,
        description="p50 of the unpruned student / p50 of the pruned model (onnxruntime CPU), measured side by side: met when the lower end of the 95% interval over replicates clears it.",
    )
    latency_ms: Optional[float] = Field(
        None,
        gt=0,
        le=1e6,
        description="p50 of the pruned model in milliseconds (onnxruntime CPU): met when the upper end of the 95% interval over replicates is at most this.",
    )
    macs: Optional[float] = Field(
        None,
        gt=0,
        lt=1,
        description="MACs of the pruned model as a fraction of the student's (counted on the physically pruned model).",
    )
    params: Optional[float] = Field(
        None, gt=0, lt=1, description="Parameters of the pruned model as a fraction of the student's."
    )
    file_bytes: Optional[int] = Field(
        None,
        ge=1,
        le=2**40,
        description="Size in bytes of the pruned model's float ONNX file (the INT8 file is not what is budgeted).",
    )
    batch_size: Optional[int] = Field(
        None,
        ge=1,
        le=4096,
        description="speedup / latency_ms: the batch size measured. None: the bench section's first batch size (1 without a bench section).",
    )
    threads: Optional[int] = Field(
        None,
        ge=0,
        le=1024,
        description="speedup / latency_ms: onnxruntime intra-op threads of the measurement (0: one per physical core). None: bench.intra_op_threads (0 without a bench section).",
    )
    latency: Optional[LatencyConfig] = Field(
        None,
        description="speedup / latency_ms: how each candidate is compared with the student (replicated paired blocks). None: the bench section's latency settings.",
    )
    exporter: Optional[Literal["dynamo", "torchscript"]] = Field(
        None,
        description="speedup / latency_ms / file_bytes: exporter of the candidates' ONNX files. None: the export section's.",
    )
    opset: Optional[int] = Field(
        None,
        ge=11,
        le=23,
        description="speedup / latency_ms / file_bytes: ONNX opset of the candidates. None: the export section's.",
    )
    max_retries: int = Field(
        2,
        ge=0,
        le=20,
        description="The chosen model is measured again after it is pruned; while that measurement misses the budget, prune one alignment step further and measure again, at most this many times.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> "PruneBudget":
        given = [k for k in BUDGET_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(BUDGET_KINDS)} (got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in BUDGET_KINDS if getattr(self, k) is not None)

    @property
    def target(self) -> float:
        return getattr(self, self.kind)


class PruneConfig(Section):
    method: Literal["weight", "channel"] = Field(
        ...,
        description="weight: unstructured zeros (smaller when compressed); channel: structured, channels physically removed (faster).",
    )
    pruner: str = Field(
        "l1",
        description="Pruner registry name; weight: level; channel: l1, l2, fpgm, taylor. Omitted: level for method weight, l1 for channel.",
    )
    engine: Literal["nni", "torch_pruning"] = Field(
        "nni", description="Pruning engine. nni is the default; torch_pruning must be chosen explicitly."
    )
    sparsity: float = Field(
        0.5, gt=0, lt=1, description="Target sparsity: fraction of weights (weight) or channels (channel) removed."
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: same sparsity in every layer; global: one threshold across layers (weight only)."
    )
    op_types: List[str] = Field(default_factory=lambda: ["Conv2d", "Linear"], description="Module types to prune.")
    exclude: List[str] = Field(
        default_factory=list, description="Module names (fnmatch patterns) never pruned, in addition to the classifier."
    )
    prune_classifier: bool = Field(
        False,
        description="Weight method: also prune the final classifier layer. Channel method: never removes class outputs (its inputs shrink with the layer before).",
    )
    align: int = Field(
        8,
        ge=1,
        le=256,
        description="Round kept channel counts to a multiple of this (8 for AVX2/NEON, 16 for AVX-512).",
    )
    dependency_aware: bool = Field(
        True, description="Prune coupled channels (residual adds, concats, depthwise groups) together."
    )
    schedule: Literal["one_shot", "iterative"] = Field(
        "one_shot", description="Prune once, or in `steps` increasing steps with fine-tuning between."
    )
    steps: int = Field(3, ge=1, le=100, description="Number of steps for the iterative schedule.")
    step_epochs: int = Field(1, ge=0, le=1000, description="KD fine-tuning epochs between iterative steps.")
    check_time_limit_s: float = Field(
        300,
        gt=0,
        le=86400,
        json_schema_extra={"key": False},
        description="Channel method: before anything trains, the untrained student is pruned once as a check (an architecture the engine cannot handle fails then, in one line); this long at most.",
    )
    taylor_batches: int = Field(
        32,
        ge=1,
        le=100000,
        description="Pruner taylor only: training batches whose (weight x gradient)^2 scores the channels (the fine-tune section's loss, KD when it distils).",
    )
    budget: Optional[PruneBudget] = Field(
        None,
        description="Channel method: what the pruned model must reach (speedup, latency_ms, macs, params or file_bytes); the sparsity is searched to meet it, so sparsity is not set. A budget the most-pruned aligned model misses fails in the preflight.",
    )
    allocation: Literal["uniform"] = Field(
        "uniform",
        description="How a budget is spread over the layers. uniform: one aligned sparsity in every layer, the least one that meets the budget (latency_aware is not built yet).",
    )

    @field_validator("pruner")
    @classmethod
    def _known_pruner(cls, v: str) -> str:
        return _check_name(_pruners, v)

    @model_validator(mode="before")
    @classmethod
    def _default_pruner_for_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and "pruner" not in data and data.get("method") == "weight":
            data = {**data, "pruner": "level"}
        return data

    @model_validator(mode="after")
    def _pruner_fits(self) -> "PruneConfig":
        from .prune.registry import PruneError, check_fit

        try:
            check_fit(self.method, self.pruner, self.engine, self.scope)
        except PruneError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _budget_fits(self) -> "PruneConfig":
        if self.budget is None:
            return self
        if self.method != "channel":
            raise ValueError(
                "prune.budget needs method: channel (weight pruning removes no compute; budget its size "
                "with sparsity instead)"
            )
        if "sparsity" in self.model_fields_set:
            raise ValueError("set prune.budget or prune.sparsity, not both: the budget chooses the sparsity")
        return self

    @model_serializer(mode="wrap")
    def _no_sparsity_under_a_budget(self, handler):
        # the budget chooses the sparsity: a dumped recipe (export/<run>/recipe.yaml) must load again
        data = handler(self)
        if self.budget is not None and isinstance(data, dict):
            data.pop("sparsity", None)
        return data


class ExportConfig(Section):
    exporter: Literal["dynamo", "torchscript"] = Field("dynamo", description="torch.onnx exporter, chosen explicitly.")
    opset: int = Field(18, ge=11, le=23, description="ONNX opset version.")
    dynamic_batch: bool = Field(True, description="Export with a dynamic batch axis.")
    parity_atol: float = Field(
        1e-3,
        gt=0,
        le=1,
        description="Absolute part of the parity tolerance: max abs difference of logits allowed between PyTorch and onnxruntime, plus parity_rtol x the image's largest |logit|.",
    )
    parity_rtol: float = Field(
        1e-3,
        ge=0,
        le=1,
        description="Relative part of the parity tolerance: each logit may differ by parity_atol + parity_rtol x its image's largest |PyTorch logit|, so float32 rounding at large logits does not fail the gate; 0 for an absolute-only gate.",
    )
    parity_min_agreement: float = Field(
        0.99, ge=0, le=1, description="Minimum top-1 agreement between PyTorch and onnxruntime on a validation batch."
    )
    references: bool = Field(
        True,
        description="Also export the teacher and the unpruned KD student, so the bench measures speedup ratios against them in the same run.",
    )


MAX_BENCH_BATCH = 4096


class LatencyConfig(Section):
    """How a latency ratio is measured (bench/compare.py, docs/latency.md): both sides in alternating
    blocks, replicated over fresh processes; the ratio is the median over replicates with a 95% interval."""

    block_s: float = Field(
        0.05, gt=0, le=60, description="Seconds one side runs per block (the first calls of a block are not timed)."
    )
    blocks: int = Field(6, ge=2, le=1000, description="Blocks per side per replicate, order flipped every block.")
    min_replicates: int = Field(
        3,
        ge=2,
        le=1000,
        description="Fresh-process replicates before any stopping rule applies (2 is the least that gives an interval).",
    )
    max_replicates: int = Field(
        10, ge=2, le=1000, description="Stop after this many replicates even if an interval is still wide."
    )
    target_width: float = Field(
        0.10, gt=0, le=10, description="Stop when every interval's high / low - 1 is at most this."
    )
    budget_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="Stop adding replicates once the next one would end after this many seconds; the result says it stopped on budget.",
    )
    isolation: Literal["process", "session"] = Field(
        "process",
        description="process: a fresh Python per replicate (rounds inside one process agreed with each other and not with the next process: docs/latency.md); session: fresh sessions in this process (cheaper; the test suite uses it).",
    )

    @model_validator(mode="after")
    def _replicates_ordered(self) -> "LatencyConfig":
        if self.max_replicates < self.min_replicates:
            raise ValueError(f"max_replicates ({self.max_replicates}) is below min_replicates ({self.min_replicates})")
        return self


class BenchConfig(Section):
    providers: List[Literal["cpu", "cuda", "tensorrt"]] = Field(
        default_factory=lambda: ["cpu"],
        description="onnxruntime execution providers to benchmark; a requested one that is not active is an error.",
    )
    batch_sizes: List[int] = Field(
        default_factory=lambda: [1, 32], description=f"Batch sizes to measure, each 1 to {MAX_BENCH_BATCH}."
    )
    intra_op_threads: int = Field(
        0, ge=0, le=1024, description="onnxruntime intra-op threads (0: one per physical core)."
    )
    inter_op_threads: int = Field(1, ge=1, le=1024, description="onnxruntime inter-op threads.")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimisation level."
    )
    warmup: int = Field(10, ge=0, le=100000, description="Warm-up runs per input shape (not timed).")
    iterations: int = Field(200, ge=1, le=1000000, description="Max timed runs per batch size.")
    time_budget_s: float = Field(
        3.0,
        gt=0,
        le=3600,
        description="Max timed seconds per batch size (whichever of iterations / budget ends first).",
    )
    compare_torch: bool = Field(True, description="Also time PyTorch eager on the same model and batch.")
    latency: LatencyConfig = Field(
        # 0.25 s blocks: with 0.05 s the larger model of a pair stayed slow for more than the untimed
        # first calls after each switch, and the demo's student/final ratio at batch 32 read 3.64x
        # [3.32, 4.22] where an independent 0.25 s harness found 3.23x [3.05, 3.29]; with 0.25 s
        # blocks the stage measured 3.14x [3.01, 3.33] and the harness 3.35x [3.04, 3.45] (docs/latency.md)
        default_factory=lambda: LatencyConfig(block_s=0.25),
        description="How the ratio columns (vs teacher, vs student, vs float) and p50s are measured: replicated paired blocks with intervals (block_s 0.25 by default here).",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _positive_batches(cls, v: List[int]) -> List[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch_sizes must be a non-empty list of integers >= 1")
        if max(v) > MAX_BENCH_BATCH:
            raise ValueError(
                f"batch size {max(v)} is above the maximum {MAX_BENCH_BATCH}; use batch sizes from 1 to "
                f"{MAX_BENCH_BATCH} (`python -m toolchain.bench MODEL.onnx --batch-sizes N` takes larger ones, bounded by memory)"
            )
        return v


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log to MLflow.")
    uri: Optional[str] = Field(
        None,
        description="MLflow tracking URI (sqlite, http(s), postgresql, mysql, mssql, file, databricks); None uses $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db. A password in it is masked (***) in outputs; MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD keep it out of the recipe.",
    )
    experiment: str = Field("toolchain", min_length=1, description="MLflow experiment name.")
    register_model: Optional[str] = Field(
        None,
        min_length=1,
        max_length=256,
        description="Register the shipped ONNX model (the MLflow model on the parent run) under this name in the MLflow "
        "model registry when the run finishes, a new version per run, described by its model card; None registers nothing.",
    )

    @model_validator(mode="after")
    def _registry_needs_tracking(self) -> "TrackingConfig":
        if self.register_model and not self.enabled:
            raise ValueError(
                "register_model needs tracking.enabled: true (the model is registered from its MLflow run)"
            )
        return self


def _quant_candidates():
    from .onnx.quantize import CANDIDATES

    return CANDIDATES


class AutoQuantizeConfig(Section):
    images: int = Field(
        128,
        ge=8,
        le=10000,
        description="Calibration images on which each block's logits divergence is measured (its sensitivity).",
    )
    timed_blocks: int = Field(
        6,
        ge=1,
        le=64,
        description="How many of the most sensitive blocks get their float-fallback latency measured; only "
        "these may be kept in float.",
    )
    timing_budget_s: float = Field(
        30,
        gt=0,
        le=3600,
        description="Seconds the fallback comparison (all-INT8 against each timed block in float) may take.",
    )


class QuantizeConfig(Section):
    candidates: List[str] = Field(
        default_factory=lambda: [
            "auto",
            "qdq_u8s8_dw_per_channel_keep_stem",
            "qdq_u8s8_dw_per_channel_keep_stem_fold",
            "qdq_u8s8_dw_per_channel_keep_stem_fold_gemm",
            "qdq_u8s8_dw_per_channel",
            "qdq_u8s8_dw_per_channel_gemm",
        ],
        min_length=1,
        max_length=16,
        description="INT8 formats to build and measure (`python -m toolchain list quantizers`); the stage ships the fastest "
        "one within max_accuracy_drop that is faster than float at every batch size.",
    )
    calibration_images: int = Field(
        512,
        ge=1,
        le=100000,
        description="Training images (evaluation preprocessing) that calibrate the activation ranges.",
    )
    max_accuracy_drop: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Largest validation-accuracy loss vs the float ONNX model a shipped INT8 model may have.",
    )
    min_speedup: float = Field(
        1.1,
        ge=1.0,
        le=100,
        description="A shipped INT8 model is at least this many times faster than float at every batch size: the lower end of its 95% interval over replicates clears it.",
    )
    on_miss: Literal["keep_float", "error"] = Field(
        "keep_float",
        description="No candidate passes the gate and is faster: ship the float model and say so (keep_float), or fail (error).",
    )
    batch_sizes: List[int] = Field(
        default_factory=lambda: [1, 32],
        description="Batch sizes at which a candidate must be faster than float (onnxruntime CPU p50, paired blocks over fresh-process replicates).",
    )
    latency: LatencyConfig = Field(
        default_factory=LatencyConfig,
        description="How each candidate is compared with float: replicated paired blocks; a candidate ships only where its interval's lower end clears min_speedup at every batch size.",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="onnxruntime intra-op threads of the latency measurement: the device's "
        "(0: one per physical core of this machine). INT8 convolutions scale worse with threads than float "
        "ones (onnxruntime runs a batch's images one after the other), so the choice can differ by thread count.",
    )
    search_budget_s: float = Field(
        600,
        gt=0,
        le=86400,
        description="Stop building new candidates after this many seconds (the ones built are still measured).",
    )
    auto: AutoQuantizeConfig = Field(
        default_factory=AutoQuantizeConfig,
        description="The `auto` candidate: blocks kept in float by their measured sensitivity and "
        "fallback latency (docs/int8.md, 'INT8 layer by layer').",
    )

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, v: List[str]) -> List[str]:
        for name in v:
            _check_name(_quant_candidates, name)
        if len(set(v)) != len(v):
            raise ValueError("candidates: each name once")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: List[int]) -> List[int]:
        if not v or any(b < 1 or b > 4096 for b in v):
            raise ValueError("batch_sizes must be a non-empty list of integers from 1 to 4096")
        return v


class PackageConfig(Section):
    target_platform: Literal["amd64", "arm"] = Field(
        "amd64",
        description="CPU family of the device: the ORT-format files are optimised for it (amd64: x86-64, may use x86-only NCHWc layout nodes; arm: ARM CPUs, without them).",
    )
    golden_images: int = Field(
        4,
        ge=1,
        le=64,
        description="Test images shipped as golden PNG files with their model inputs and outputs, which the package is checked against before it ships.",
    )


DOTTED_KEY_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
SWEEP_FIXED = ("name", "output_dir", "tracking", "matrix")  # shared by every variant of a sweep


def _check_dotted_keys(where: str, mapping: Dict[str, Any]) -> None:
    for key in mapping:
        if not re.fullmatch(DOTTED_KEY_PATTERN, str(key)):
            raise ValueError(f"{where}: {key!r} is not a dotted recipe key like prune.sparsity")
        if str(key).split(".")[0] in SWEEP_FIXED:
            raise ValueError(
                f"{where}: {key!r} cannot vary in a sweep (name, output_dir, tracking are shared: "
                "variants are named <name>-<suffix>, share one cache and one MLflow experiment)"
            )


MAX_VARIANTS = 10_000  # a sweep runs its variants one after the other: more is a typo, not a study


class MatrixRule(Section):
    when: Dict[str, Any] = Field(
        ...,
        min_length=1,
        description="Axis values a variant must have for `set` to apply, e.g. {prune.method: weight}.",
    )
    set: Dict[str, Any] = Field(
        ..., min_length=1, description="Dotted overrides applied to the matching variants, e.g. {prune.sparsity: 0.8}."
    )


class MatrixConfig(Section):
    """A sweep: variants of the recipe around it, run by `python -m toolchain sweep`."""

    axes: Dict[str, List[Any]] = Field(
        default_factory=dict,
        description="Dotted recipe key -> values; the variants are the product of all axes, "
        "e.g. {student.model: [resnet18, mobilenet_v2], prune.method: [weight, channel]}. Axis values name the variants.",
    )
    rules: List[MatrixRule] = Field(
        default_factory=list,
        description="Settings that depend on axis values, applied in order, later rules win: "
        "e.g. when {prune.method: weight} set {prune.sparsity: 0.8}; when {prune.method: channel} set {prune.sparsity: 0.5}.",
    )
    exclude: List[Dict[str, Any]] = Field(
        default_factory=list,
        description="Drop the variants whose axis values match every pair of an entry, e.g. {student.model: densenet121, prune.method: weight}.",
    )
    include: List[Dict[str, Any]] = Field(
        default_factory=list,
        description="Extra variants beyond the product, each a mapping of dotted overrides (rules apply to them too).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "MatrixConfig":
        if not self.axes and not self.include:
            raise ValueError("a matrix needs axes or include entries")
        product = math.prod(len(v) for v in self.axes.values()) if self.axes else 0
        if product + len(self.include) > MAX_VARIANTS:  # counted before anything is expanded (memory)
            raise ValueError(
                f"the axes expand to {product:,} variants (product of their lengths), more than "
                f"{MAX_VARIANTS:,}; split the sweep into several recipes or use fewer axis values"
            )
        _check_dotted_keys("axes", self.axes)
        for key, values in self.axes.items():
            texts = [json.dumps(v, sort_keys=True, default=str) for v in values]
            if not values or len(set(texts)) != len(texts):
                raise ValueError(f"axes.{key}: give a non-empty list of distinct values")
        known = set(self.axes).union(*[set(entry) for entry in self.include])
        for i, rule in enumerate(self.rules):
            _check_dotted_keys(f"rules[{i}].set", rule.set)
            if not set(rule.when) <= known:
                raise ValueError(
                    f"rules[{i}].when: {sorted(set(rule.when) - known)} not an axis or include key; match on those"
                )
        for i, entry in enumerate(self.exclude):
            if not entry or not set(entry) <= set(self.axes):
                raise ValueError(f"exclude[{i}]: give axis keys only (axes: {', '.join(self.axes) or 'none'})")
        for i, entry in enumerate(self.include):
            if not entry:
                raise ValueError(f"include[{i}]: an empty variant; give dotted overrides")
            _check_dotted_keys(f"include[{i}]", entry)
        return self


class Recipe(Section):
    name: str = Field(
        ...,
        pattern=RUN_NAME_PATTERN,
        description="Run name; becomes export/<name>/ (letters, digits, . _ -; no path separators).",
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed for data split, init, shuffling (0 to 2^32 - 1: numpy's seed range)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device; auto picks cuda when available."
    )
    threads: Optional[int] = Field(
        None,
        ge=1,
        le=1024,
        description="torch CPU threads for training and evaluation; None keeps torch's default (one per core). On a machine shared with other jobs, 1 is often faster.",
    )
    output_dir: str = Field("export", description="Where export/<name>/ (summary, ONNX, checkpoints) is written.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and loaders.")
    teacher: Optional[TeacherConfig] = Field(None, description="Teacher: trained here or loaded from a checkpoint.")
    student: StudentConfig = Field(..., description="The student architecture to distil into and compress.")
    distill: TrainConfig = Field(
        default_factory=lambda: TrainConfig(loss="kd"),
        description="Student training (losses kd and dkd, and features, need a teacher).",
    )
    prune: Optional[PruneConfig] = Field(None, description="Pruning stage; omit to skip.")
    finetune: Optional[TrainConfig] = Field(
        None,
        description="Fine-tuning after pruning (loss kd, dkd or ce; features too). "
        "Without a prune section it fine-tunes the unpruned student: the same-budget control.",
    )
    export: Optional[ExportConfig] = Field(
        default_factory=ExportConfig, description="ONNX export with parity gate; null to skip."
    )
    bench: Optional[BenchConfig] = Field(
        default_factory=BenchConfig, description="onnxruntime benchmark; null to skip."
    )
    quantize: Optional[QuantizeConfig] = Field(
        None, description="INT8 quantization of the exported model, measured before it ships; omit to skip."
    )
    package: Optional[PackageConfig] = Field(
        None,
        description="Self-checking device package of the shipped model(s) in export/<name>/package/ (ONNX + ORT format, infer.py, golden data); omit to skip.",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    matrix: Optional[MatrixConfig] = Field(
        None,
        description="Sweep over variants of this recipe; run it with `python -m toolchain sweep` (compress refuses it).",
    )

    @field_validator("name")
    @classmethod
    def _no_dot_names(cls, v: str) -> str:
        if set(v) <= {"."}:
            raise ValueError("run name cannot be '.' or '..'")
        return v

    @model_validator(mode="after")
    def _kd_needs_a_teacher_section(self) -> "Recipe":
        for key, section in (("distill", self.distill), ("finetune", self.finetune)):
            if section is not None and section.needs_teacher and self.teacher is None:
                what = f"loss is {section.loss}" if _loss_needs_teacher(section.loss) else "features is set"
                raise ValueError(
                    f"{key}.{what} but the recipe has no teacher section; add one or set {key}.loss: ce "
                    f"without {key}.features"
                )
        # which stage needs which (bench needs export...) is declared by the stages (Stage.requires)
        # and checked by the engine's plan
        self._resolve_budget()
        return self

    def _resolve_budget(self) -> None:
        """prune.budget's measurement settings left unset take the bench / export sections' (the prune
        stage sees only its own sections, so they are resolved here, into its cache key)."""
        budget = self.prune.budget if self.prune is not None else None
        if budget is None or budget.kind not in (*LATENCY_BUDGETS, "file_bytes"):
            return
        export = self.export or ExportConfig()
        updates = {"exporter": budget.exporter or export.exporter, "opset": budget.opset or export.opset}
        if budget.kind in LATENCY_BUDGETS:
            bench = self.bench
            updates.update(
                batch_size=budget.batch_size or (bench.batch_sizes[0] if bench else 1),
                threads=budget.threads if budget.threads is not None else (bench.intra_op_threads if bench else 0),
                latency=budget.latency or (bench.latency.model_copy() if bench else LatencyConfig()),
            )
        if any(getattr(budget, k) != v for k, v in updates.items()):
            self.prune.budget = budget.model_copy(update=updates)


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply dotted overrides (a.b=value), validate."""
    from .models.refs import add_import_root

    path = Path(path)
    raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item, path)
    add_import_root(path.parent)  # model: package.module:callable may live next to the recipe
    return validate_dict(raw, source=str(path))


def validate_dict(raw: Dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_first_error(exc)}") from None


# A recipe is a few hundred values. YAML aliases (&a / *a) share one parsed node, so 1 KB of nested
# aliases loads in microseconds and then expands to billions of values in whatever walks it (validation,
# copies, hashing); past this many values once expanded, the file is refused before anything walks it.
MAX_EXPANDED_VALUES = 100_000


def _check_expansion(raw: Any, where: str) -> None:
    """Count the values `raw` holds with every alias expanded, without expanding: each shared node is
    sized once (memo by id). A node that contains itself (&a [*a]) is refused too."""
    sizes: Dict[int, int] = {}
    active: set = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise RecipeError(
                f"{where}: a YAML alias refers to a node that contains it (&anchor inside itself); write the values out"
            )
        active.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_VALUES:
                raise RecipeError(
                    f"{where}: the YAML expands to more than {MAX_EXPANDED_VALUES:,} values through "
                    "aliases (&anchor / *alias, an alias bomb?); a recipe needs a few hundred: "
                    "write the values out or use fewer nested aliases"
                )
        active.discard(key)
        sizes[key] = total
        return total

    try:
        size(raw)
    except RecursionError:
        raise RecipeError(f"{where}: the YAML is nested too deeply; a recipe is a few levels of sections") from None


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; pass the path to a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file; a recipe is YAML text") from None
    except RecursionError:
        raise RecipeError(f"{path}: the YAML is nested too deeply; a recipe is a few levels of sections") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the recipe must be a YAML mapping (key: value), got {type(raw).__name__}")
    _check_expansion(raw, str(path))
    return raw


def _apply_override(raw: Dict[str, Any], item: str, path: Path) -> None:
    key, sep, text = str(item).partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise RecipeError(f"{path}: override {item!r} is not of the form section.key=value (e.g. distill.epochs=1)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    _check_expansion(value, f"{path}: override {key}")
    set_dotted(raw, key, value, f"{path}: override")


def set_dotted(raw: Dict[str, Any], key: str, value: Any, where: str) -> None:
    """raw[a][b] = value for key 'a.b', creating missing (or null) sections."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{where} {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key; check the spelling (see `python -m toolchain validate --help` and recipes/)"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    got = err.get("input")
    got_text = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{loc}: {msg}{got_text}"


# ---------------------------------------------------------------- hashing


def recipe_hash(recipe: Recipe) -> str:
    """The recipe's identity, published in summary.json, the ONNX metadata, the card, the package
    manifest and an MLflow tag. It hashes the tracking URI as saved (password masked): hashed raw, a
    dictionary attack (fill each guess into the saved recipe.yaml, hash, compare) would recover it.
    A URI without credentials masks to itself, so such recipes keep the hash they always had."""
    from .tracking import mask_uri

    dump = recipe.model_dump(mode="json")
    dump["tracking"]["uri"] = mask_uri(dump["tracking"]["uri"])
    return stable_hash(dump)


def shown(recipe: Recipe) -> Recipe:
    """The recipe as it may be printed, written or logged: the tracking URI's password masked."""
    from .tracking import mask_uri

    return recipe.model_copy(
        update={"tracking": recipe.tracking.model_copy(update={"uri": mask_uri(recipe.tracking.uri)})}
    )


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
