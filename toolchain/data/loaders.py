"""Batched, normalised, augmented loaders over in-memory uint8 tensors, and the seeded split.

Batches are built, augmented and normalised as whole tensors: on a 2-core machine a
per-image PIL transform pipeline costs more than the model's forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .datasets import DATASETS, IMAGE_SIZE


@dataclass
class Batches:
    """An epoch-able sequence of (normalised float images, labels) batches.

    Shuffling uses a DistributedSampler (one replica unless running under torchrun),
    seeded and re-seeded per epoch with set_epoch, so every rank sees its own shard.
    """

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    mean: torch.Tensor
    std: torch.Tensor
    shuffle: bool = False
    augment: bool = False
    random_crop: bool = False
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_replicas: int = 1
    rank: int = 0

    def __post_init__(self):
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(
            range(len(self.labels)), num_replicas=self.num_replicas, rank=self.rank,
            shuffle=self.shuffle, seed=self.seed, drop_last=False,
        )
        self._generator = torch.Generator().manual_seed(self.seed + 7919 * self.rank)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._generator.manual_seed(self.seed + 7919 * self.rank + 104729 * epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size + (n % self.batch_size > self._dropped_tail())

    def _dropped_tail(self) -> int:
        """Training drops a last batch of one image: BatchNorm cannot normalise a single sample
        (and one image's gradient step is noise). Evaluation keeps every image."""
        return 1 if self.shuffle and self.batch_size > 1 else 0

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if len(idx) <= self._dropped_tail():
                break
            yield self._prepare(self.images[idx]), self.labels[idx].to(self.device)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.augment:
            x = self._augment(x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(x.shape[0], generator=self._generator) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
        if self.random_crop:  # pad 4 + random 32x32 crop, the standard CIFAR augmentation
            padded = F.pad(x, (4, 4, 4, 4))
            offsets = torch.randint(0, 9, (x.shape[0], 2), generator=self._generator).tolist()
            x = torch.stack([padded[i, :, dy : dy + 32, dx : dx + 32] for i, (dy, dx) in enumerate(offsets)])
        return x


@dataclass
class DataBundle:
    train: Batches
    val: Batches
    test: Batches
    class_names: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    preprocessing: str
    input_shape: Tuple[int, int, int] = (3, IMAGE_SIZE, IMAGE_SIZE)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def example_batch(self, n: int = 2) -> torch.Tensor:
        """A real validation batch (unaugmented) for tracing, speedup and parity checks."""
        x, _ = next(iter(self.val))
        return x[:n]


def _seeded_indices(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def build_data(cfg, seed: int, device: torch.device = torch.device("cpu"), num_replicas: int = 1, rank: int = 0) -> DataBundle:
    """cfg is a recipe DataConfig. Split: seeded val carved from train; test kept for the end."""
    from ..errors import DataError

    raw = DATASETS.get(cfg.name)(root=cfg.root, download=cfg.download)
    for key, wanted, split in (("subset", cfg.subset, "training"), ("test_subset", cfg.test_subset, "test")):
        available = len(raw.train_y if split == "training" else raw.test_y)
        if wanted and wanted > available:  # slicing would quietly use fewer images than asked
            raise DataError(f"data.{key} is {wanted} but the {cfg.name} {split} split has only {available} images; "
                            f"set data.{key} to {available} or less, or remove it to use all")
    order = _seeded_indices(len(raw.train_y), seed)
    if cfg.subset:
        order = order[: cfg.subset]
    n_val = max(1, int(round(len(order) * cfg.val_fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    test_idx = _seeded_indices(len(raw.test_y), seed + 1)[: cfg.test_subset] if cfg.test_subset else torch.arange(len(raw.test_y))
    mean, std = torch.tensor(raw.mean).view(1, 3, 1, 1), torch.tensor(raw.std).view(1, 3, 1, 1)

    def eval_batches(x, y) -> Batches:
        return Batches(x, y, cfg.eval_batch_size, mean, std, seed=seed, device=device)

    train = Batches(raw.train_x[train_idx], raw.train_y[train_idx], cfg.batch_size, mean, std, shuffle=True,
                    augment=cfg.augment, random_crop=raw.random_crop, seed=seed, device=device,
                    num_replicas=num_replicas, rank=rank)
    return DataBundle(
        train=train,
        val=eval_batches(raw.train_x[val_idx], raw.train_y[val_idx]),
        test=eval_batches(raw.test_x[test_idx], raw.test_y[test_idx]),
        class_names=raw.class_names or [str(i) for i in range(int(raw.train_y.max()) + 1)],
        mean=raw.mean,
        std=raw.std,
        preprocessing=raw.preprocessing,
    )
