"""Batched, augmented, normalised loaders over uint8 frames, and the seeded split.

Two stores behind one interface (`store[indices] -> uint8 (n, C, H, W)`): built-in datasets
stay in memory at their native size (small: Fashion-MNIST is 60 MB), image folders are
decoded once into a disk cache (cache.py) so memory does not grow with the dataset.

Batches are read and augmented as whole uint8 tensors and normalised after they reach the
training device: on a 2-core machine a per-image PIL pipeline costs more than the model's
forward pass at 32x32 (docs/data.md has the measurements at 96 and 224).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import DataError
from .cache import build_cache
from .datasets import DATASETS, ArraySource, FileSource, Source
from .transforms import Policy, make_policy


class Rows:
    """A split's rows of a store (the in-memory tensor or the disk cache), without copying."""

    def __init__(self, store, rows: torch.Tensor):
        self.store, self.rows = store, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.store[self.rows[idx]]


class _Reader(torch.utils.data.Dataset):
    """What a loader worker does with a planned batch: read the frames, crop, resize, flip (uint8)."""

    def __init__(self, images, labels: torch.Tensor, policy: Policy):
        self.images, self.labels, self.policy = images, labels, policy

    def __getitem__(self, job):
        idx, params = job
        return self.policy.apply(self.images[idx], params), self.labels[idx]


class _Jobs(torch.utils.data.Sampler):
    """The current epoch's planned batches, handed to a persistent DataLoader."""

    def __init__(self, batches: "Batches"):
        self.batches = batches

    def __iter__(self):
        return self.batches._plan()

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class Batches:
    """An epoch-able sequence of (normalised float images, labels) batches.

    Shuffling uses a DistributedSampler (one replica unless running under torchrun),
    seeded and re-seeded per epoch with set_epoch, so every rank sees its own shard.
    """

    images: Rows
    labels: torch.Tensor
    batch_size: int
    policy: Policy
    shuffle: bool = False
    augment: bool = False
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_replicas: int = 1
    rank: int = 0
    num_workers: int = 0

    def __post_init__(self):
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(
            range(len(self.labels)),
            num_replicas=self.num_replicas,
            rank=self.rank,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=False,
        )
        self._generator = torch.Generator().manual_seed(self.seed + 7919 * self.rank)
        self._reader = _Reader(self.images, self.labels, self.policy)
        self._loader = None
        self.mean = torch.tensor(self.policy.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(self.policy.std).view(1, -1, 1, 1)

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

    def _plan(self):
        """(indices, augmentation parameters) per batch, drawn in batch order in this process."""
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if len(idx) <= self._dropped_tail():
                break
            yield idx, self.policy.plan(len(idx), self._generator, self.augment)

    def __iter__(self):
        batches = map(self._reader.__getitem__, self._plan()) if self.num_workers == 0 else iter(self._workers())
        for x, y in batches:
            yield self._normalise(x), y.to(self.device)

    def _workers(self):
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self._reader,
                batch_size=None,
                sampler=_Jobs(self),
                num_workers=self.num_workers,
                persistent_workers=True,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=2,
            )
        return self._loader

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 crosses to the device (4x less than float), then becomes float there
        x = x.to(self.device, non_blocking=True).float().div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


@dataclass
class DataBundle:
    train: Batches
    val: Batches
    test: Batches
    class_names: List[str]
    policy: Policy
    description: str = ""
    fingerprint: str = ""  # the image files' identity (the cache keys); empty for built-in datasets
    stats: Dict[str, int] = field(default_factory=dict)  # skipped / enlarged images

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def mean(self) -> Tuple[float, ...]:
        return self.policy.mean

    @property
    def std(self) -> Tuple[float, ...]:
        return self.policy.std

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (3, *self.policy.size)

    @property
    def preprocessing(self) -> str:
        return f"{self.description}: {self.policy.describe()}" if self.description else self.policy.describe()

    def contract(self) -> Dict[str, object]:
        """The whole preprocessing contract, for the ONNX metadata, the card and the device package."""
        return {**self.policy.contract(), "input_shape": [1, *self.input_shape], "class_names": list(self.class_names)}

    def example_batch(self, n: int = 2) -> torch.Tensor:
        """A real validation batch (unaugmented) for tracing, speedup and parity checks."""
        x, _ = next(iter(self.val))
        return x[:n]


def _seeded_indices(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _check_subsets(cfg, raw) -> None:
    for key, wanted, split in (("subset", cfg.subset, "training"), ("test_subset", cfg.test_subset, "test")):
        available = len((raw.train if split == "training" else raw.test).labels)
        if wanted and wanted > available:  # slicing would quietly use fewer images than asked
            raise DataError(
                f"data.{key} is {wanted} but the {cfg.name} {split} split has only {available} images; "
                f"set data.{key} to {available} or less, or remove it to use all"
            )


@dataclass
class _Split:
    """One split's images as a store, its rows in the store, their labels, and where each row
    came from in the requested order (a skipped bad file leaves a gap)."""

    store: object
    rows: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    stats: Dict[str, int] = field(default_factory=dict)
    key: str = ""


def _load_split(source: Source, idx: torch.Tensor, policy: Policy, cfg, split: str) -> _Split:
    """Arrays are used in place; files are decoded once into the disk cache."""
    if isinstance(source, ArraySource):
        return _Split(source.images, idx, source.labels[idx], torch.arange(len(idx)))
    assert isinstance(source, FileSource)
    cache = build_cache(
        [source.paths[i] for i in idx.tolist()],
        source.labels[idx].tolist(),
        policy.frame,
        mode=policy.image_mode,
        fit=policy.fit,
        interpolation=policy.interpolation,
        cache_dir=cfg.cache_dir,
        skip_bad=cfg.skip_bad_images,
        workers=cfg.num_workers,
        desc=f"{split} images",
    )
    stats = {f"{split}_skipped_images": len(cache.skipped), f"{split}_enlarged_images": cache.enlarged}
    if cache.skipped:
        print(
            f"[data] skipped {len(cache.skipped)} unreadable {split} image file(s) (data.skip_bad_images), "
            f"first: {cache.skipped[0]}",
            file=sys.stderr,
        )
    if cache.enlarged:
        print(
            f"[data] {cache.enlarged} {split} image(s) smaller than the {policy.frame[1]}x{policy.frame[0]} frame "
            "were enlarged to it",
            file=sys.stderr,
        )
    return _Split(cache, torch.arange(len(cache)), cache.labels, cache.kept, stats, cache.key)


def build_data(
    cfg,
    seed: int,
    device: Optional[torch.device] = None,
    num_replicas: int = 1,
    rank: int = 0,
    weights_preprocessing: Optional[Dict[str, object]] = None,
) -> DataBundle:
    """cfg is a recipe DataConfig. Split: seeded val carved from train; test kept for the end.
    weights_preprocessing: the student's pretrained weights' defaults (mean/std, size, crop_pct...)."""
    raw = DATASETS.get(cfg.name)(root=cfg.root, download=cfg.download)
    _check_subsets(cfg, raw)
    policy = make_policy(cfg, raw.defaults, weights_preprocessing)
    order = _seeded_indices(len(raw.train.labels), seed)
    if cfg.subset:
        order = order[: cfg.subset]
    n_val = max(1, int(round(len(order) * cfg.val_fraction)))
    test_idx = (
        _seeded_indices(len(raw.test.labels), seed + 1)[: cfg.test_subset]
        if cfg.test_subset
        else torch.arange(len(raw.test.labels))
    )
    train = _load_split(raw.train, order, policy, cfg, "train")
    test = _load_split(raw.test, test_idx, policy, cfg, "test")
    is_val = train.positions < n_val  # the first n_val of `order` are validation (fewer if bad files were skipped)
    if is_val.all() or not is_val.any():
        raise DataError(
            f"data: {len(train.rows)} usable training images cannot be split into train and validation "
            f"(val_fraction {cfg.val_fraction}); add images or change data.val_fraction"
        )

    def batches(split: _Split, keep: torch.Tensor, **kw) -> Batches:
        return Batches(
            Rows(split.store, split.rows[keep]),
            split.labels[keep],
            kw.pop("batch_size", cfg.eval_batch_size),
            policy,
            seed=seed,
            device=device or torch.device("cpu"),
            **kw,
        )

    return DataBundle(
        train=batches(
            train,
            ~is_val,
            batch_size=cfg.batch_size,
            shuffle=True,
            augment=cfg.augment,
            num_replicas=num_replicas,
            rank=rank,
            num_workers=cfg.num_workers,
        ),
        val=batches(train, is_val),
        test=batches(test, torch.ones(len(test.rows), dtype=torch.bool)),
        class_names=raw.class_names or [str(i) for i in range(int(raw.train.labels.max()) + 1)],
        policy=policy,
        description=raw.description,
        fingerprint=train.key + test.key,
        stats={**train.stats, **test.stats},
    )


def tensor_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std, **kw) -> Batches:
    """Batches over an in-memory uint8 (N, C, H, W) tensor at its own size (tests, benchmarks)."""
    size = tuple(images.shape[-2:])
    flat = lambda v: tuple(float(x) for x in torch.as_tensor(v).flatten())  # noqa: E731
    policy = Policy(
        size=size,
        frame=size,
        resize=size,
        mean=flat(mean),
        std=flat(std),
        image_mode="grey" if images.shape[1] == 1 else "RGB",
    )
    return Batches(Rows(images, torch.arange(len(images))), labels, batch_size, policy, **kw)
