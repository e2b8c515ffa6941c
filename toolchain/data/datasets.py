"""Dataset registry -> splits as in-memory uint8 arrays or image files, and their default preprocessing.

Files are read in their real formats (idx .gz, CIFAR python pickles, image folders),
and pickles through a restricted unpickler that cannot execute code.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..registry import Registry
from .imagefile import EXTENSIONS
from .transforms import PolicyDefaults

DATASETS: Registry = Registry("dataset")


@dataclass
class ArraySource:
    """A split decoded in memory at its native frame: uint8 (N, C, H, W) images, int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class FileSource:
    """A split as image files, decoded to the policy's frame once (cache.py)."""

    paths: List[str]
    labels: torch.Tensor


Source = Union[ArraySource, FileSource]


@dataclass
class RawSplits:
    """What a dataset loader returns: the two splits and the preprocessing it proposes."""

    train: Source
    test: Source
    class_names: List[str]
    defaults: PolicyDefaults
    description: str = ""


# ---------------------------------------------------------------- Fashion-MNIST (idx)

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
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
    roots = (
        [Path(root)] if root else [Path(FASHION_MNIST_DEBIAN), Path.home() / ".cache" / "toolchain" / "fashion_mnist"]
    )
    for r in roots:
        found = {k: _find_idx(r, stem) for k, stem in IDX_FILES.items()}
        if all(found.values()):
            return found
    if download:
        from torchvision.datasets import FashionMNIST

        target = roots[-1]
        for train in (True, False):
            _download_or_fail(
                lambda train=train: FashionMNIST(str(target), train=train, download=True), "fashion_mnist"
            )
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
    labels = lambda y: torch.from_numpy(y.astype(np.int64))  # noqa: E731
    # Fashion-MNIST's 0.2860/0.3530 recomputed over the zero-padded 32x32 frame.
    defaults = PolicyDefaults(
        image_size=(32, 32), mean=(0.2190,) * 3, std=(0.3317,) * 3, native_frame=(32, 32), image_mode="grey", fit="pad"
    )
    return RawSplits(
        ArraySource(pad(arrays["train_x"]), labels(arrays["train_y"])),
        ArraySource(pad(arrays["test_x"]), labels(arrays["test_y"])),
        FASHION_MNIST_CLASSES,
        defaults,
        "28x28 grey zero-padded to 32x32, repeated to 3 channels",
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
    defaults = PolicyDefaults(image_size=(32, 32), mean=mean, std=std, train_crop="pad", native_frame=(32, 32))
    return RawSplits(
        ArraySource(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])),
        ArraySource(test_x, test_y),
        class_names,
        defaults,
        "32x32 RGB",
    )


@DATASETS.register("cifar10")
def cifar10(root: Optional[str] = None, download: bool = False) -> RawSplits:
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar(
        "cifar10",
        "cifar-10-batches-py",
        train,
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        root,
        download,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    )


@DATASETS.register("cifar100")
def cifar100(root: Optional[str] = None, download: bool = False) -> RawSplits:
    return _cifar(
        "cifar100",
        "cifar-100-python",
        ["train"],
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
        root,
        download,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    )


def _download_or_fail(fetch, name: str) -> None:
    try:
        fetch()
    except Exception as exc:  # torchvision raises URLError/RuntimeError/OSError variants offline
        raise DataError(
            f"{name}: download failed ({type(exc).__name__}: {exc}); this machine may be offline, "
            "put the files in data.root instead"
        ) from None


# ---------------------------------------------------------------- image folders


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@DATASETS.register("imagefolder")
def imagefolder(root: Optional[str] = None, download: bool = False) -> RawSplits:
    """root/train/<class>/<image files> and root/test/<class>/... (root/val is accepted for test).
    Files are listed here; they are decoded later, once, at the recipe's image size (cache.py)."""
    if not root:
        raise DataError(
            "imagefolder: data.root is required (a folder with train/<class>/ and test/<class>/ subfolders)"
        )
    base = Path(root)
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    if not (base / "train").is_dir() or test_dir is None:
        raise DataError(f"imagefolder: {base} needs train/<class>/ and test/<class>/ (or val/<class>/) subfolders")
    classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir() and not _hidden(d))
    _check_class_names(classes, base / "train")
    if not classes:
        raise DataError(
            f"imagefolder: no class subfolders in {base / 'train'}; put each class's images in train/<class>/"
        )
    unknown = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not _hidden(d) and d.name not in classes)
    if unknown:
        raise DataError(
            f"imagefolder: {test_dir.name}/{unknown[0]} is not a class of train/ (classes: {', '.join(classes)}); "
            f"add train/{unknown[0]}/ images or remove the folder"
        )
    defaults = PolicyDefaults(
        image_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, train_crop="random_resized"
    )
    return RawSplits(
        _list_files(base / "train", classes, require_all=True),
        _list_files(test_dir, classes, require_all=False),
        classes,
        defaults,
        "RGB photos",
    )


def _hidden(path: Path) -> bool:
    """Names starting with a dot: .ipynb_checkpoints, .DS_Store, macOS AppleDouble ._photo.jpg files
    (metadata, not images): never a class, never an image."""
    return path.name.startswith(".")


def _check_class_names(classes: List[str], where: Path) -> None:
    # labels.txt in the package holds one class name per line: a control character would shift every label
    bad = next((c for c in classes if any(ord(ch) < 32 or ord(ch) == 127 for ch in c)), None)
    if bad is not None:
        raise DataError(
            f"imagefolder: class folder {bad!r} in {where} has a control character (newline, tab...) in "
            "its name; rename the folder (class names become the lines of the package's labels.txt)"
        )


def _list_files(directory: Path, classes: List[str], require_all: bool) -> FileSource:
    paths, labels = [], []
    ignored = {"hidden entries": 0, "files of other types": 0, "nested folders": 0}
    for label, cls in enumerate(classes):
        found = []
        for p in sorted((directory / cls).iterdir()) if (directory / cls).is_dir() else []:
            kind = (
                "hidden entries"
                if _hidden(p)
                else "nested folders"
                if p.is_dir()
                else None
                if p.suffix.lower() in EXTENSIONS and p.is_file()
                else "files of other types"
            )
            if kind:
                ignored[kind] += 1
            else:
                found.append(str(p))
        if not found and require_all:
            raise DataError(
                f"imagefolder: class folder {directory / cls} has no images ({'/'.join(EXTENSIONS)}); "
                "add images or remove the folder"
            )
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataError(f"imagefolder: no images ({'/'.join(EXTENSIONS)}) under {directory}")
    if any(ignored.values()):  # skipped, but never silently: a folder of GIFs would otherwise just vanish
        counts = ", ".join(f"{n} {kind}" for kind, n in ignored.items() if n)
        print(
            f"[data] {directory}: ignored {counts} in the class folders (images are "
            f"{'/'.join(EXTENSIONS)}; names starting with '.' are skipped; subfolders are not read)",
            file=sys.stderr,
        )
    return FileSource(paths, torch.tensor(labels, dtype=torch.int64))
