"""What a run starts from: the dataset (data) and the models (teacher, student)."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import Section
from .names import _check_name, _datasets, _model_ref
from .training import TrainConfig


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
        from ..models.refs import check_cifar_stem
        from ..models.weights import check_weights

        if self.weights is not None:
            check_weights(self.model, self.weights)
        if self.cifar_stem:
            check_cifar_stem(self.model)
        return self


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
