"""Decode-once uint8 image cache on disk, for image sets of any size.

Image files are decoded once (in parallel worker processes) to uint8 frames of one size and
appended to a single flat file: <key>.u8 plus a <key>.json header (shape, kept and skipped
files). The key covers the files (paths, sizes, mtimes), the frame size, the fit, the
interpolation and the colour mode, so editing a photo, adding one or changing image_size
makes a new cache, and every other run reuses it. Labels are not part of what is reused:
they come from the current folder listing on every run (a new class folder renumbers them). Both files are written atomically; the
header is written last, so a killed build leaves no cache that looks complete.

Batches are read with os.pread at the images' offsets: the bytes go through the OS page
cache, not into this process's memory, so the process's peak memory does not grow with the
dataset (a memory map would count every touched page in the process's resident set).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DataError
from ..fsutil import atomic_path, atomic_write_json, ensure_dir, file_lock
from . import imagefile

FORMAT_VERSION = 1
CHUNK = 64  # images per worker task: large enough to amortise the process round trip


def default_cache_dir() -> Path:
    base = os.environ.get("TOOLCHAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "toolchain")
    return Path(base) / "images"


def cache_key(paths: Sequence[str], frame, fit: str, interpolation: str, mode: str) -> str:
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    text = json.dumps(
        {
            "v": FORMAT_VERSION,
            "files": stats,
            "frame": list(frame),
            "fit": fit,
            "interpolation": interpolation,
            "mode": mode,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class DiskImages:
    """uint8 frames (N, C, H, W) in a flat file; store[indices] -> uint8 tensor."""

    def __init__(self, data_path: Path, header: dict):
        self.path = data_path
        self.shape = tuple(header["shape"])
        self.labels = torch.tensor(header["labels"], dtype=torch.int64)
        self.kept = torch.tensor(header["kept"], dtype=torch.int64)  # positions in the requested file list
        self.skipped = header.get("skipped", [])
        self.enlarged = header.get("enlarged", 0)
        self.key = header["key"]
        self._item = int(np.prod(self.shape[1:]))
        self._fd: Optional[int] = None

    def __len__(self) -> int:
        return self.shape[0]

    def _file(self) -> int:
        # opened lazily (and per process: loader workers inherit nothing they did not open)
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def __getitem__(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        out = np.empty((len(idx), self._item), dtype=np.uint8)
        fd = self._file()
        for start, first, count in _runs(idx):  # consecutive indices: one read
            data = os.pread(fd, count * self._item, first * self._item)
            out[start : start + count] = np.frombuffer(data, dtype=np.uint8).reshape(count, self._item)
        return torch.from_numpy(out).view(len(idx), *self.shape[1:])


def _runs(idx: List[int]):
    """(position in idx, first index, length) for each run of consecutive indices."""
    start = 0
    while start < len(idx):
        end = start + 1
        while end < len(idx) and idx[end] == idx[end - 1] + 1:
            end += 1
        yield start, idx[start], end - start
        start = end


def _decode_chunk(args) -> List[Tuple[Optional[bytes], bool, Optional[str]]]:
    paths, frame, mode, fit, interpolation = args
    out = []
    for p in paths:
        try:
            pixels, small = imagefile.load_frame(p, frame, mode, fit, interpolation)
            out.append((pixels.tobytes(), small, None))
        except imagefile.ImageFileError as exc:
            out.append((None, False, str(exc)))
    return out


def build_cache(
    paths: Sequence[str],
    labels: Sequence[int],
    frame,
    *,
    mode: str = "RGB",
    fit: str = "cover",
    interpolation: str = "bilinear",
    cache_dir: Optional[str] = None,
    skip_bad: bool = False,
    workers: int = 0,
    desc: str = "images",
) -> DiskImages:
    """Decode `paths` once into a cache file (or reuse it); bad files fail, or are skipped with skip_bad."""
    directory = ensure_dir(Path(cache_dir) if cache_dir else default_cache_dir(), "data.cache_dir")
    key = cache_key(paths, frame, fit, interpolation, mode)
    data_path, header_path = directory / f"{key}.u8", directory / f"{key}.json"
    with file_lock(directory / f"{key}.lock"):  # torchrun ranks and parallel runs: one builds, the others reuse
        header = _read_header(header_path, data_path)
        if header is None:
            header = _build(paths, labels, frame, mode, fit, interpolation, data_path, skip_bad, workers, desc)
            header["key"] = key
            atomic_write_json(header_path, header)
    # The key covers the pixels (files, frame, fit...), not the labels: a class folder added to train/
    # renumbers every class without touching a file. So labels are always the caller's, never the header's.
    return DiskImages(data_path, {**header, "labels": [int(labels[i]) for i in header["kept"]]})


def _read_header(header_path: Path, data_path: Path) -> Optional[dict]:
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
        if data_path.stat().st_size == int(np.prod(header["shape"])):
            return header
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None  # absent, or damaged (killed mid-write, disk trouble): rebuild


def _build(paths, labels, frame, mode, fit, interpolation, data_path, skip_bad, workers, desc) -> dict:
    from tqdm.auto import tqdm

    channels = 1 if mode == "grey" else 3
    kept, skipped, enlarged = [], [], 0
    chunks = [(list(paths[i : i + CHUNK]), tuple(frame), mode, fit, interpolation) for i in range(0, len(paths), CHUNK)]
    workers = workers or min(len(chunks), os.cpu_count() or 1)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(data_path))
        out = stack.enter_context(open(tmp, "wb"))
        bar = stack.enter_context(
            tqdm(
                total=len(paths),
                desc=f"[data] decoding {desc} to {frame[1]}x{frame[0]} (once, cached)",
                unit="img",
                leave=False,
            )
        )
        results = map(_decode_chunk, chunks)
        if workers > 1:
            pool = ProcessPoolExecutor(workers)
            # on a bad file, stop at once instead of decoding the rest of the set first
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            results = pool.map(_decode_chunk, chunks)
        position = 0
        for chunk in results:
            for pixels, small, error in chunk:
                if error is not None:
                    if not skip_bad:
                        raise DataError(
                            f"{error}; remove or replace the file, or set data.skip_bad_images: true to skip it"
                        )
                    skipped.append(error)
                else:
                    out.write(pixels)
                    kept.append(position)
                    enlarged += small
                position += 1
            bar.update(len(chunk))
    if not kept:
        raise DataError(f"imagefolder: none of the {len(paths)} {desc} could be read; see data.skip_bad_images")
    return {
        "shape": [len(kept), channels, int(frame[0]), int(frame[1])],
        "kept": kept,
        "labels": [int(labels[i]) for i in kept],
        "skipped": skipped,
        "enlarged": enlarged,
    }
