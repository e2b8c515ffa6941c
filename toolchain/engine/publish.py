"""All-or-nothing publishing of export/<run>/.

Every stage's publish step writes into a staging folder beside the run folder,
<output_dir>/.<run>.<host>-<pid>-<tag>.publish.tmp/. Only when the whole run succeeded is the staging
folder swapped in for export/<run>/ (two renames on one filesystem), so a run that fails or is
interrupted after export (quantize.on_miss: error, Ctrl-C, SIGKILL during quantize) changes
nothing a previous successful run shipped: model.onnx, model_int8.onnx, bench.json, package/
and the model card stay that run's, all of them. The run's summary.json always describes the
latest attempt and says, under `shipped`, whose files export/<run>/ holds.

A SIGKILLed run leaves its staging folder behind; fsutil.remove_stale_temp_files removes it at
the next start once its process is gone (the pid is in the name).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict

from ..errors import OutputError
from ..fsutil import ensure_dir, owned_temp_name


def staging_dir(run_dir: Path) -> Path:
    """A fresh, empty staging folder for run_dir, named with host and pid so that a later start can
    tell whether its process still lives (fsutil.remove_stale_temp_files)."""
    return ensure_dir(run_dir.parent / owned_temp_name(run_dir.name))


def previous_shipment(run_dir: Path) -> Dict[str, Any]:
    """Whose files export/<run>/ holds before this run: the last successful run's identity, or nothing."""
    try:
        before = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        before = {}
    if not isinstance(before, dict):
        before = {}
    shipped = before.get("shipped") or {}
    if before.get("status") == "FINISHED":
        shipped = {
            "by": "run",
            "parent_run_id": (before.get("mlflow") or {}).get("parent_run_id"),
            "recipe_hash": before.get("recipe_hash"),
            "files": before.get("files", {}),
        }
    return shipped if shipped.get("by") == "run" else {}


def commit(staging: Path, run_dir: Path) -> None:
    """Swap the complete staging folder in for run_dir; the old folder goes away afterwards."""
    old = run_dir.parent / f".{run_dir.name}.{uuid.uuid4().hex[:8]}.old.tmp"
    try:
        if run_dir.exists():
            os.replace(run_dir, old)
        os.replace(staging, run_dir)
    except OSError as exc:
        if old.exists() and not run_dir.exists():
            os.replace(old, run_dir)  # put the previous files back: nothing half published
        raise OutputError(
            f"cannot publish {run_dir}: {exc.strerror or exc}; the previous files are kept; free disk "
            "space or point output_dir at a writable disk"
        ) from None
    shutil.rmtree(old, ignore_errors=True)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def moved_paths(files: Dict[str, str], staging: Path, run_dir: Path) -> Dict[str, str]:
    """Paths recorded under staging/ as they are after the swap, under run_dir/."""
    prefix = str(staging)
    return {k: str(run_dir) + v[len(prefix) :] if v.startswith(prefix) else v for k, v in files.items()}
