"""Dataset registry -> in-memory uint8 tensors (N, C, 32, 32) and labels (batching: loaders.py).

Files are read in their real formats (idx .gz, CIFAR python pickles, image folders),
and pickles through a restricted unpickler that cannot execute code.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, first_line
from ..registry import Registry

DATASETS: Registry = Registry("dataset")
IMAGE_SIZE = 32


@dataclass
class RawSplits:
    """What a dataset loader returns: uint8 (N, C, 32, 32) images and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: List[str]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    random_crop: bool = True
    preprocessing: str = ""


# ---------------------------------------------------------------- Fashion-MNIST (idx)

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally .gz): magic (0, 0, dtype 0x08, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("bad magic number")
        dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: not a valid idx file ({exc}); delete it and reinstall/download the dataset") from None


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        for candidate in (root / name, root / "FashionMNIST" / "raw" / name):
            if candidate.is_file():
                return candidate
    return None


def _fashion_mnist_files(root: Optional[str], download: bool) -> dict:
    roots = [Path(root)] if root else [Path(FASHION_MNIST_DEBIAN), Path.home() / ".cache" / "toolchain" / "fashion_mnist"]
    for r in roots:
        found = {k: _find_idx(r, stem) for k, stem in IDX_FILES.items()}
        if all(found.values()):
            return found
    if download:
        from torchvision.datasets import FashionMNIST

        target = roots[-1]
        for train in (True, False):
            _download_or_fail(lambda: FashionMNIST(str(target), train=train, download=True), "fashion_mnist")
        return _fashion_mnist_files(str(target), download=False)
    where = " or ".join(str(r) for r in roots)
    raise DataError(
        f"fashion_mnist: idx files not found in {where}; install them with `apt-get install dataset-fashion-mnist`, "
        "put the four *-ubyte.gz files in data.root, or set data.download=true"
    )


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: Optional[str] = None, download: bool = False) -> RawSplits:
    files = _fashion_mnist_files(root, download)
    arrays = {k: read_idx(p) for k, p in files.items()}
    # 28x28 grey -> pad to 32x32; channels are repeated to 3 at batch time so CIFAR architectures run unchanged.
    pad = lambda x: F.pad(torch.from_numpy(x.copy()).unsqueeze(1), (2, 2, 2, 2))  # noqa: E731
    return RawSplits(
        train_x=pad(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=pad(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        class_names=FASHION_MNIST_CLASSES,
        # Fashion-MNIST's 0.2860/0.3530 recomputed over the zero-padded 32x32 frame.
        mean=(0.2190,) * 3,
        std=(0.3317,) * 3,
        random_crop=False,
        preprocessing="28x28 grey zero-padded to 32x32, repeated to 3 channels, /255, normalised",
    )


# ---------------------------------------------------------------- CIFAR (python pickles)


class _SafeUnpickler(pickle.Unpickler):
    """Only what CIFAR batches contain: builtins and numpy arrays. No code runs."""

    ALLOWED = {
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles spell bytes
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a valid CIFAR python batch ({exc}); re-download the dataset") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in the CIFAR batch, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_arrays(batch: dict, label_key: str, path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}: CIFAR batch lacks data/{label_key} ({exc}); re-download the dataset") from None
    return torch.from_numpy(x.copy()), torch.from_numpy(y)


def _cifar(name: str, folder: str, train_files, test_file, meta_file, label_key, names_key, root, download, mean, std):
    base = Path(root) if root else Path.home() / ".cache" / "toolchain" / name
    directory = base / folder
    if not (directory / test_file).is_file() and download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        _download_or_fail(lambda: cls(str(base), train=True, download=True), name)
    if not (directory / test_file).is_file():
        raise DataError(
            f"{name}: files not found in {directory}; this machine may be offline: copy the extracted "
            f"'{folder}' folder (python version from the CIFAR site) into {base} (or set data.root), or set data.download=true"
        )
    parts = [_cifar_arrays(_load_pickle(directory / f), label_key, directory / f) for f in train_files]
    test_x, test_y = _cifar_arrays(_load_pickle(directory / test_file), label_key, directory / test_file)
    meta = _load_pickle(directory / meta_file)
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    return RawSplits(
        train_x=torch.cat([p[0] for p in parts]),
        train_y=torch.cat([p[1] for p in parts]),
        test_x=test_x,
        test_y=test_y,
        class_names=class_names,
        mean=mean,
        std=std,
        preprocessing="32x32 RGB, /255, normalised",
    )


@DATASETS.register("cifar10")
def cifar10(root: Optional[str] = None, download: bool = False) -> RawSplits:
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar("cifar10", "cifar-10-batches-py", train, "test_batch", "batches.meta", "labels", "label_names",
                  root, download, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@DATASETS.register("cifar100")
def cifar100(root: Optional[str] = None, download: bool = False) -> RawSplits:
    return _cifar("cifar100", "cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names",
                  root, download, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _download_or_fail(fetch, name: str) -> None:
    try:
        fetch()
    except Exception as exc:  # torchvision raises URLError/RuntimeError/OSError variants offline
        raise DataError(f"{name}: download failed ({type(exc).__name__}: {exc}); this machine may be offline, "
                        "put the files in data.root instead") from None


# ---------------------------------------------------------------- image folders


@DATASETS.register("imagefolder")
def imagefolder(root: Optional[str] = None, download: bool = False) -> RawSplits:
    """root/train/<class>/*.png|jpg and root/test/<class>/... (root/val is accepted for test)."""
    if not root:
        raise DataError("imagefolder: data.root is required (a folder with train/<class>/ and test/<class>/ subfolders)")
    base = Path(root)
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    if not (base / "train").is_dir() or test_dir is None:
        raise DataError(f"imagefolder: {base} needs train/<class>/ and test/<class>/ (or val/<class>/) subfolders")
    train_x, train_y, classes = _read_image_folder(base / "train")
    test_x, test_y, _ = _read_image_folder(test_dir, classes)
    return RawSplits(train_x, train_y, test_x, test_y, classes, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                     preprocessing="RGB, resized to 32x32 (bilinear), /255, normalised with ImageNet mean/std")


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as exc:  # PIL raises more than OSError: DecompressionBombError, SyntaxError, ValueError...
        raise DataError(f"imagefolder: cannot read image {path} ({type(exc).__name__}: {first_line(exc)}); "
                        "remove or replace it") from None


def _read_image_folder(directory: Path, classes: Optional[List[str]] = None):
    classes = classes or sorted(d.name for d in directory.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"imagefolder: no class subfolders in {directory}")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((directory / cls).glob("*")):
            if path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".webp"}:
                continue
            images.append(_read_image(path))
            labels.append(label)
    if not images:
        raise DataError(f"imagefolder: no images (.png/.jpg/.jpeg/.bmp/.webp) under {directory}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), classes
