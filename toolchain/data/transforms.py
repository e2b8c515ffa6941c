"""The preprocessing policy: stored uint8 frames -> model-sized uint8 batches, and its contract.

Every image is stored once as a uint8 *frame* (a dataset's native 32x32, or a photo decoded
to resize = image_size / crop_pct, see cache.py). From the frame:

- evaluation: resize to `resize` (skipped when the frame already is that size), centre-crop
  to image_size: torchvision's Resize(size / crop_pct) + CenterCrop(size);
- training: RandomResizedCrop (scale, ratio) of the frame, or the CIFAR pad-and-crop, or
  the evaluation view, then a horizontal flip.

Random parameters are drawn per batch from one generator in batch order (`plan`), so the
pixels a step sees do not depend on how many loader workers apply them (`apply`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

Size = Tuple[int, int]
CIFAR_PAD = 4  # the standard CIFAR augmentation at 32x32: pad 4, random 32x32 crop


@dataclass(frozen=True)
class Policy:
    size: Size  # model input (height, width)
    frame: Size  # stored frame
    resize: Size  # evaluation resize before the centre crop
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str = "bilinear"
    train_crop: str = "none"  # none | pad | random_resized
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    image_mode: str = "RGB"  # RGB | grey (one plane, repeated to 3 channels at batch time)
    fit: str = "cover"  # how a file becomes the frame (imagefile.fit_frame)
    channels: int = 3

    # ------------------------------------------------------------ evaluation

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, frame) -> uint8 (N, C, size)."""
        if tuple(x.shape[-2:]) != self.resize:
            x = _resize(x, self.resize, self.interpolation)
        return _center_crop(x, self.size)

    # ------------------------------------------------------------ training

    def plan(self, n: int, generator: torch.Generator, augment: bool) -> Dict[str, torch.Tensor]:
        """The random parameters of one training batch (drawn in the main process)."""
        if not augment:
            return {}
        params = {"flip": torch.rand(n, generator=generator) < 0.5} if self.hflip else {}
        if self.train_crop == "pad":
            params["offsets"] = torch.randint(0, 2 * self._pad() + 1, (n, 2), generator=generator)
        elif self.train_crop == "random_resized":
            params["boxes"] = torch.tensor([self._box(generator) for _ in range(n)], dtype=torch.int64)
        return params

    def apply(self, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 frames + planned parameters -> uint8 (N, C, size)."""
        if "boxes" in params:
            x = torch.stack(
                [
                    _resized_crop(img, box, self.size, self.interpolation)
                    for img, box in zip(x, params["boxes"].tolist())
                ]
            )
        elif "offsets" in params:
            x = self._pad_crop(self._to_size(x), params["offsets"].tolist())
        else:
            x = self.eval_view(x)
        if "flip" in params:
            x = torch.where(params["flip"][:, None, None, None], x.flip(3), x)
        return x

    def _pad(self) -> int:
        return max(1, round(CIFAR_PAD * min(self.size) / 32))

    def _to_size(self, x: torch.Tensor) -> torch.Tensor:
        return x if tuple(x.shape[-2:]) == self.size else _resize(x, self.size, self.interpolation)

    def _pad_crop(self, x: torch.Tensor, offsets: List[List[int]]) -> torch.Tensor:
        p = self._pad()
        padded = F.pad(x, (p, p, p, p))
        h, w = self.size
        return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])

    def _box(self, g: torch.Generator) -> Tuple[int, int, int, int]:
        """torchvision RandomResizedCrop.get_params on the frame, with our generator."""
        height, width = self.frame
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(g, *self.scale)
            aspect = math.exp(_uniform(g, *log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                return top, left, h, w
        # fallback: the largest centred crop within the ratio range
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    # ------------------------------------------------------------ the contract

    def contract(self) -> Dict[str, object]:
        """What a device must do to an image file (imagefile.model_input reads exactly this)."""
        return {
            "image_mode": self.image_mode,
            "frame": list(self.frame),
            "fit": self.fit,
            "resize": list(self.resize),
            "crop": list(self.size),
            "interpolation": self.interpolation,
            "pixel_scale": 255.0,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": "NCHW",
            "channel_order": "RGB",
        }

    def describe(self) -> str:
        h, w = self.size
        steps = [
            f"{'grey' if self.image_mode == 'grey' else 'RGB'} {self.fit}-fitted to a {self.frame[1]}x{self.frame[0]} frame"
        ]
        if self.resize != self.frame:
            steps.append(f"resized to {self.resize[1]}x{self.resize[0]} ({self.interpolation})")
        if self.resize != self.size:
            steps.append(f"centre-cropped to {w}x{h}")
        return ", ".join(steps) + ", /255, normalised"


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=g))


def _resize(x: torch.Tensor, size: Size, interpolation: str) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    mode = {
        "nearest": InterpolationMode.NEAREST,
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
    }[interpolation]
    return resize(x, list(size), interpolation=mode, antialias=interpolation != "nearest")


def _resized_crop(img: torch.Tensor, box, size: Size, interpolation: str) -> torch.Tensor:
    top, left, h, w = box
    return _resize(img[:, top : top + h, left : left + w], size, interpolation)


def _center_crop(x: torch.Tensor, size: Size) -> torch.Tensor:
    from .imagefile import crop_offset

    h, w = size
    top, left = crop_offset(x.shape[-2], h), crop_offset(x.shape[-1], w)
    return x[..., top : top + h, left : left + w]


@dataclass
class PolicyDefaults:
    """What a dataset (or, later, a model's pretrained weights) proposes; the recipe overrides it."""

    image_size: Size
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    train_crop: str = "none"
    native_frame: Optional[Size] = None  # arrays: the frame is their native size, whatever image_size is
    image_mode: str = "RGB"
    fit: str = "cover"


def as_size(value) -> Size:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def make_policy(cfg, defaults: PolicyDefaults, overrides: Optional[Dict[str, object]] = None) -> Policy:
    """cfg: the recipe's DataConfig (None fields take the defaults); overrides: a model's weights' preprocessing."""
    base = {**defaults.__dict__, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    pick = lambda key: getattr(cfg, key) if getattr(cfg, key) is not None else base[key]  # noqa: E731
    size = as_size(pick("image_size"))
    crop_pct = float(pick("crop_pct"))
    resize = (int(math.floor(size[0] / crop_pct + 1e-6)), int(math.floor(size[1] / crop_pct + 1e-6)))
    frame = defaults.native_frame or resize
    return Policy(
        size=size,
        frame=frame,
        resize=resize,
        mean=tuple(pick("mean")),
        std=tuple(pick("std")),
        interpolation=pick("interpolation"),
        train_crop=pick("train_crop"),
        scale=tuple(cfg.crop_scale),
        ratio=tuple(cfg.crop_ratio),
        hflip=cfg.hflip,
        image_mode=defaults.image_mode,
        fit=defaults.fit,
    )
