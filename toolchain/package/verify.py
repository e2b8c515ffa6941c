"""A package checks itself before it ships: every file against the manifest, each ORT-format model
against the golden outputs, and infer.py and the bench run as a device would run them (no torch).

Each failure is one PackageError line naming what failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from ..fsutil import file_sha256
from . import infer
from .build import GOLDEN, MANIFEST, PackageError, package_files, read_manifest

FLOAT_ATOL = 1e-4  # a float .ort is the same graph, optimised once more: logits agree to rounding
SUBPROCESS_TIMEOUT_S = 300


def damaged_files(folder: Path, manifest_sha256: Optional[str] = None) -> List[str]:
    """Files that are missing, altered or not in the manifest; the manifest itself when it is
    missing, unreadable or not the one recorded (manifest_sha256)."""
    manifest = read_manifest(folder)
    if manifest is None or (manifest_sha256 and file_sha256(folder / MANIFEST) != manifest_sha256):
        return [MANIFEST]
    listed = manifest.get("files", {})
    bad = [
        name
        for name, entry in listed.items()
        if not (folder / name).is_file() or file_sha256(folder / name) != entry.get("sha256")
    ]
    return sorted(bad + [name for name in package_files(folder) if name not in listed])


def verify_package(folder: Path) -> Dict[str, Any]:
    """Run every check; returns what was measured (for the stage's info and metrics)."""
    bad = damaged_files(folder)
    if bad:
        raise PackageError(f"package: {folder} does not match its manifest ({', '.join(bad)}); rebuild the package")
    manifest = read_manifest(folder)
    inputs = np.load(folder / GOLDEN / "inputs.npy")
    checks = {role: check_ort(folder, files["ort"], role, inputs) for role, files in manifest["models"].items()}
    with no_torch_env() as env:
        checks["infer_py"] = check_infer(folder, manifest, env)
        checks["bench"] = check_bench(folder, manifest["models"]["float"]["ort"], env)
    return checks


# ---------------------------------------------------------------- ORT-format models


def ort_session(path: Path):
    try:
        return infer.session(path)  # what the device runs: ORT format said explicitly
    except infer.InferError as exc:
        raise PackageError(
            f"package: {path.name} does not load as an ORT-format model ({exc}); rebuild the package"
        ) from None


def check_ort(folder: Path, name: str, role: str, inputs: np.ndarray) -> Dict[str, Any]:
    """float: logits within FLOAT_ATOL of the golden ones; int8 (coarser, and its own graph after
    optimisation): the same top-1 class for every golden image."""
    got = infer.run_model(ort_session(folder / name), inputs)
    golden = np.load(folder / GOLDEN / f"outputs_{role}.npy")
    diff = float(np.abs(got - golden).max())
    agree = top1_agrees(golden, got.argmax(axis=1), 0.0 if role == "int8" else FLOAT_ATOL)
    if role == "float" and diff > FLOAT_ATOL:
        raise PackageError(
            f"package: {name} differs from the golden outputs by {diff:.2e} (allowed {FLOAT_ATOL:g}); "
            "the ORT conversion changed the model's numbers: rebuild the package or ship the .onnx file"
        )
    if not agree.all():
        raise PackageError(
            f"package: {name} gives another top-1 class than the golden outputs on "
            f"{int((~agree).sum())} of {len(agree)} golden images; ship {name[:-4]}.onnx instead"
        )
    return {"file": name, "max_abs_diff": diff, "top1_agreement": float(agree.mean())}


def top1_agrees(golden: np.ndarray, predicted: np.ndarray, tol: float) -> np.ndarray:
    """Per image: the predicted class is the golden top-1, or within tol of it (a tie)."""
    chosen = golden[np.arange(len(golden)), predicted]
    return chosen >= golden.max(axis=1) - tol


# ---------------------------------------------------------------- infer.py and the bench, as on a device


@contextmanager
def no_torch_env() -> Iterator[Dict[str, str]]:
    """An environment whose `import torch` fails: the device has no torch, so neither may the checks."""
    with tempfile.TemporaryDirectory(prefix="toolchain-no-torch-") as tmp:
        (Path(tmp) / "torch").mkdir()
        (Path(tmp) / "torch" / "__init__.py").write_text("raise ImportError('a device package must not need torch')\n")
        path = os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH", "")) if p)
        yield {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}


def run_in_package(folder: Path, args: List[str], env: Dict[str, str], what: str) -> str:
    try:
        proc = subprocess.run(
            [sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise PackageError(f"package: {what} did not finish in {SUBPROCESS_TIMEOUT_S} s in {folder}") from None
    if proc.returncode != 0:
        last = " ".join((proc.stderr.strip().splitlines() or ["no output"])[-1].split())[:300]
        raise PackageError(f"package: {what} failed in {folder} (exit {proc.returncode}: {last})")
    return proc.stdout


def check_infer(folder: Path, manifest: Dict[str, Any], env: Dict[str, str]) -> Dict[str, Any]:
    """infer.py on the golden PNG files prints the top-1 classes the float ONNX model gives for them."""
    expected = json.loads((folder / GOLDEN / "expected.json").read_text())
    model = manifest["models"]["float"]["ort"]
    out = run_in_package(folder, ["infer.py", "--model", model, "--json", *expected["images"]], env, "infer.py")
    try:
        printed = [r["top"][0]["index"] for r in json.loads(out)]
    except (ValueError, KeyError, IndexError, TypeError):
        raise PackageError(
            f"package: infer.py printed no per-image JSON results in {folder}; see infer.py --help"
        ) from None
    golden = np.load(folder / GOLDEN / "outputs_float.npy")
    agree = top1_agrees(golden, np.asarray(printed), FLOAT_ATOL) if len(printed) == len(golden) else np.zeros(1, bool)
    if not agree.all():
        names = manifest_names(folder)
        raise PackageError(
            f"package: infer.py {model} prints top-1 {[names[i] for i in printed]} for the golden images "
            f"but the ONNX model gives {expected['float_top1']}; its preprocessing differs from training"
        )
    return {"model": model, "images": len(printed), "top1": [int(i) for i in printed]}


def manifest_names(folder: Path) -> List[str]:
    return json.loads((folder / "preprocess.json").read_text())["class_names"]


def check_bench(folder: Path, model: str, env: Dict[str, str]) -> Dict[str, Any]:
    """The documented `python -m toolchain.bench` works from the package folder, torch-free."""
    batch = infer.fixed_batch(ort_session(folder / model)) or 1
    args = [
        "-m",
        "toolchain.bench",
        model,
        "--batch-sizes",
        str(batch),
        "--warmup",
        "0",
        "--iterations",
        "2",
        "--time-budget",
        "0.1",
    ]
    run_in_package(folder, args, env, "python -m toolchain.bench")
    return {"model": model, "batch_size": batch}
