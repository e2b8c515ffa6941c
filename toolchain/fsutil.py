"""Atomic file writes (temp file in the same directory + os.replace).

A reader never sees a half-written checkpoint, summary or ONNX file: either the old
file or the complete new one. Torch-free so the edge bench can use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it over `path`."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp_path, path)
    except OSError as exc:
        raise _write_failed(path, exc.strerror or str(exc)) from None
    except RuntimeError as exc:  # torch.save reports a full disk as "PytorchStreamWriter failed writing file"
        if "fail" not in str(exc) or "writ" not in str(exc):
            raise
        raise _write_failed(path, "write failed (disk full?)") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _write_failed(path: Path, reason: str) -> OutputError:
    return OutputError(f"cannot write {path}: {reason}; free disk space or point output_dir at a writable disk")


TEMP_PATTERN = ".*.tmp"  # what atomic_path's temp files look like: .<name>.<random>.tmp
# a run's publish staging folder (engine/publish.py): .<run>.<host>-<pid>-<random>.publish.tmp; it lives as
# long as the run (hours of training), so it is judged by its owner process, not by its age
OWNED_SUFFIX = ".publish.tmp"


def owned_temp_name(stem: str) -> str:
    import re
    import socket
    import uuid

    host = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:32] or "host"
    return f".{stem}.{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}{OWNED_SUFFIX}"


def _owner_gone(path: Path) -> bool:
    """An owned temp folder whose process is gone from this host; another host's is never judged here."""
    import re
    import socket

    match = re.search(r"\.([A-Za-z0-9]+)-(\d+)-[0-9a-f]+" + re.escape(OWNED_SUFFIX) + "$", path.name)
    if not match or match.group(1) != (re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:32] or "host"):
        return False
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def remove_stale_temp_files(directory: str | os.PathLike, older_than_s: float = 3600) -> int:
    """Temp files and folders a killed process left behind (up to a checkpoint's size each; a package
    staging folder; a run's publish staging folder). Only old ones: a concurrent run sharing the folder
    may be writing a fresh one right now; a publish staging folder only once its process is gone."""
    import shutil
    import time

    directory, removed = Path(directory), 0
    if not directory.is_dir():
        return 0
    for tmp in sorted(directory.rglob(TEMP_PATTERN), key=lambda p: len(p.parts)):  # outer folders first
        try:
            if not tmp.exists():
                continue  # inside a folder removed above
            if tmp.name.endswith(OWNED_SUFFIX) and tmp.is_dir():
                stale = _owner_gone(tmp)
            else:
                stale = time.time() - tmp.stat().st_mtime > older_than_s
            if stale and tmp.is_dir():
                shutil.rmtree(tmp)
                removed += 1
            elif stale and tmp.is_file():
                tmp.unlink()
                removed += 1
        except OSError:
            pass  # gone already, or not ours to remove
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def ensure_dir(path: str | os.PathLike, setting: str = "output_dir") -> Path:
    """mkdir -p and check it is writable; `setting` is the recipe key or option that names it,
    so the one-line error says what to change."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create directory {path}: {exc.strerror}; choose a writable {setting}") from None
    if not os.access(path, os.W_OK):
        raise OutputError(f"directory {path} is not writable; fix its permissions or choose another {setting}")
    return path


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock (flock) on `path`, held for the with-block; waits for other holders."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoints can be large)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sizes(path: str | os.PathLike) -> dict:
    """Bytes on disk and deflate-compressed bytes (what a zipped download costs): weight
    pruning's zeros show only in the second number."""
    import zlib

    data = Path(path).read_bytes()
    return {"bytes": len(data), "zip_bytes": len(zlib.compress(data, 6))}
