"""Build a device package folder (see toolchain/package/__init__.py for its layout).

Torch-free: the package stage hands in the ONNX files, their content metadata and the raw
8-bit golden images; everything here is numpy, Pillow and onnxruntime.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import __version__
from ..data import imagefile
from ..errors import ToolchainError, first_line
from ..fsutil import atomic_write_json, atomic_write_text, file_sha256
from . import infer

MODEL_FILES = {"float": "model.onnx", "int8": "model_int8.onnx"}  # role -> ONNX file in the package
ORT_CONFIG = "required_operators.config"
MANIFEST = "manifest.json"
GOLDEN = "golden"
PACKAGE_FORMAT = "toolchain-device-package/1"
# the torch-free bench, bundled with the toolchain modules it imports at module level, so
# `python -m toolchain.bench` runs in the package folder on a device without the toolchain
BENCH_ENTRY = ("bench/__main__.py", "bench/cli.py")


class PackageError(ToolchainError):
    """The device package cannot be built, or does not pass its own checks."""


def build_package(
    folder: Path,
    models: Dict[str, Path],
    metadata: Dict[str, Any],
    images: np.ndarray,
    labels: Sequence[int],
    target_platform: str,
) -> Dict[str, Any]:
    """Write the whole package into `folder` (replaced if present); returns the manifest.

    models: role (float, int8) -> ONNX file; images: raw golden images, uint8 (N, C, H, W)."""
    from .readme import device_readme

    if folder.exists():  # a half-built package of an interrupted run
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for role, source in models.items():
        shutil.copyfile(source, folder / MODEL_FILES[role])
    convert_to_ort(folder, target_platform)  # first: the converter takes every .onnx file in the folder
    contract = preprocess_contract(metadata)
    atomic_write_text(folder / "labels.txt", "".join(f"{name}\n" for name in contract["class_names"]))
    atomic_write_json(folder / "preprocess.json", contract)
    shutil.copyfile(infer.__file__, folder / "infer.py")
    shutil.copyfile(imagefile.__file__, folder / "imagefile.py")  # infer.py's preprocessing: the training code
    vendor_bench(folder / "toolchain")
    golden = write_golden(folder, models, contract, images, labels)
    described = describe_models(models)
    readme = device_readme(contract, described, golden, target_platform, bench_batches(models["float"]))
    atomic_write_text(folder / "README.md", readme)
    return write_manifest(folder, described, golden, target_platform)


# ---------------------------------------------------------------- ORT format


# "extended", not the converter's default "all": level "all" on amd64 bakes in NCHWc layouts blocked for
# *this* CPU's vector width (16 floats with AVX-512, 8 with AVX2), and onnxruntime warns that such a model
# "should only be used in the same environment the model was optimized in". A device is another environment.
ORT_LEVEL = "extended"
LEVEL_ENV = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"


@contextlib.contextmanager
def _optimization_level(level: str):
    saved = os.environ.get(LEVEL_ENV)
    os.environ[LEVEL_ENV] = level
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(LEVEL_ENV, None)
        else:
            os.environ[LEVEL_ENV] = saved


def convert_to_ort(folder: Path, target_platform: str) -> None:
    """model*.onnx -> model*.ort (optimised for the target platform) and one required-operators
    config covering every model, for an onnxruntime build reduced to exactly those kernels."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    # its INFO line ("Created config in <absolute cache path>") tells a user nothing
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), _optimization_level(ORT_LEVEL):  # the converter narrates on stdout
            convert_onnx_models_to_ort(
                folder,
                output_dir=folder,
                optimization_styles=[OptimizationStyle.Fixed],
                target_platform=target_platform,
            )
    except Exception as exc:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, ...)
        prefix = "Error converting "  # the converter's own line naming the model that failed
        failed = [
            line[len(prefix) :].split(": ", 1)[0] for line in log.getvalue().splitlines() if line.startswith(prefix)
        ]
        name = Path(failed[-1]).name if failed else "the models"
        raise PackageError(
            f"package: onnxruntime cannot convert {name} to ORT format for {target_platform} "
            f"({first_line(exc)}); try another export.opset, or remove the package section"
        ) from None
    for produced in folder.glob(f"*.{ORT_LEVEL}.*"):  # the converter names non-default levels model.extended.ort
        produced.replace(folder / produced.name.replace(f".{ORT_LEVEL}", ""))
    missing = [n for n in ort_files(folder) + [ORT_CONFIG] if not (folder / n).is_file()]
    if missing:
        raise PackageError(
            f"package: the ORT converter did not write {', '.join(missing)} in {folder}; "
            "check that onnxruntime's tools are installed (pip install -c constraints.txt onnxruntime)"
        )
    # its header names the models by absolute path: a path on this workstation means nothing on a device
    config = folder / ORT_CONFIG
    atomic_write_text(config, config.read_text(encoding="utf-8").replace(f"{folder.resolve()}{os.sep}", ""))


def ort_files(folder: Path) -> List[str]:
    return [Path(name).with_suffix(".ort").name for name in MODEL_FILES.values() if (folder / name).is_file()]


# ---------------------------------------------------------------- the preprocessing contract


def preprocess_contract(metadata: Dict[str, Any]) -> Dict[str, Any]:
    """What a device must do to an image before the model sees it: the export's `preprocess`
    metadata (frame fit, resize, crop, interpolation, mean/std) plus the model's input."""
    contract = {
        "input_name": metadata["input_name"],
        "input_shape": metadata["input_shape"],
        "input_dtype": metadata["input_dtype"],
        **metadata["preprocess"],
        "preprocessing": metadata["preprocessing"],
        "class_names": list(metadata["class_names"]),
    }
    contract["steps"] = contract_steps(contract)
    return contract


def contract_steps(c: Dict[str, Any]) -> List[str]:
    size = lambda hw: f"{hw[1]}x{hw[0]}"  # noqa: E731  (width x height, as image tools say it)
    mode = (
        "convert to grey (8-bit L) and repeat it to the 3 input channels"
        if c["image_mode"] == "grey"
        else "convert to 8-bit RGB (channel order R, G, B)"
    )
    steps = ["apply the EXIF orientation; composite transparency over white", mode]
    steps.append(
        f"zero-pad (centred) to {size(c['frame'])} when it fits, else cover-resize and centre-crop to it"
        if c["fit"] == "pad"
        else f"resize ({c['interpolation']}) keeping the aspect ratio until it covers {size(c['frame'])}, centre-crop to it"
    )
    if c["resize"] != c["frame"]:
        steps.append(f"resize ({c['interpolation']}) to {size(c['resize'])}")
    if c["crop"] != c["resize"]:
        steps.append(f"centre-crop to {size(c['crop'])}")
    return steps + [
        f"divide by {c['pixel_scale']:g}",
        f"subtract mean {c['mean']}, divide by std {c['std']} (per channel)",
        f"lay out as {c['layout']} {c['input_dtype']}, input {c['input_name']!r}",
    ]


# ---------------------------------------------------------------- golden data


def write_golden(
    folder: Path, models: Dict[str, Path], contract: Dict[str, Any], images: np.ndarray, labels: Sequence[int]
) -> Dict[str, Any]:
    """PNG files, their inputs as infer.py prepares them (so PNG -> infer.py -> model is what the
    checks compare), and every shipped ONNX model's output logits on those inputs."""
    out = folder / GOLDEN
    (out / "images").mkdir(parents=True)
    pngs = [write_png(out / "images" / f"{i:03d}.png", image, contract["image_mode"]) for i, image in enumerate(images)]
    inputs = infer.preprocess(pngs, contract)
    np.save(out / "inputs.npy", inputs)
    outputs = {role: onnx_outputs(path, inputs) for role, path in models.items()}
    for role, logits in outputs.items():
        np.save(out / f"outputs_{role}.npy", logits)
    names = contract["class_names"]
    expected = {
        "images": [str(p.relative_to(folder)) for p in pngs],
        "labels": [names[int(y)] for y in labels],
        **{f"{role}_top1": [names[int(c)] for c in logits.argmax(axis=1)] for role, logits in outputs.items()},
    }
    atomic_write_json(out / "expected.json", expected)
    return expected


def write_png(path: Path, image: np.ndarray, mode: str) -> Path:
    from PIL import Image

    # a grey frame has one plane: the file keeps one, as a device camera would give
    pixels = image[0] if mode == "grey" else image.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(pixels), "L" if mode == "grey" else "RGB").save(path)
    return path


def onnx_outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    from ..bench.ort import create_session

    return infer.run_model(create_session(path), inputs)


def bench_batches(path: Path) -> str:
    """The batch sizes the README's bench command can use: a fixed-batch model takes only its own."""
    from ..bench.ort import create_session

    size = infer.fixed_batch(create_session(path))
    return "1,32" if size is None else str(size)


# ---------------------------------------------------------------- vendored bench, manifest


def vendor_bench(target: Path) -> None:
    source = Path(__file__).resolve().parent.parent
    modules = [m for m in bench_modules(source) if Path(m).name != "__init__.py"]
    for relative in modules:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, target / relative)
    # not the toolchain's own __init__ files: importing the bench runs them, and they may import
    # more than the bench needs (torch, through the pipeline's modules)
    for folder in sorted({target, *((target / m).parent for m in modules)}):
        atomic_write_text(
            folder / "__init__.py",
            '"""Torch-free subset of the toolchain: its onnxruntime bench."""\n\n'
            + (f'__version__ = "{__version__}"\n' if folder == target else ""),
        )


def bench_modules(root: Path) -> List[str]:
    """The bench's files and every toolchain file they import at module level, transitively, as
    paths relative to the toolchain folder (imports inside functions are optional features,
    e.g. --mlflow-run-id, that a device does without)."""
    todo, seen = list(BENCH_ENTRY), set()
    while todo:
        relative = todo.pop()
        if relative not in seen:
            seen.add(relative)
            todo += module_level_imports(root, relative)
    return sorted(seen)


def module_level_imports(root: Path, relative: str) -> List[str]:
    package = list(Path(relative).parent.parts)
    found = []
    for node in ast.parse((root / relative).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "toolchain":
            base = node.module.split(".")[1:]
        else:
            continue
        # `from .x import name`: x.py or x/__init__.py; `from . import x`: the module x, or a name of the package
        for parts in [base] + [base + [alias.name] for alias in node.names]:
            for candidate in (Path(*parts).with_suffix(".py") if parts else None, Path(*parts, "__init__.py")):
                if candidate is not None and (root / candidate).is_file():
                    found.append(candidate.as_posix())
                    break
    return found


def describe_models(models: Dict[str, Path]) -> Dict[str, Dict[str, str]]:
    return {
        role: {"onnx": MODEL_FILES[role], "ort": Path(MODEL_FILES[role]).with_suffix(".ort").name} for role in models
    }


def package_files(folder: Path) -> List[str]:
    """Every file of the package but the manifest, as sorted POSIX paths."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts
    )


def write_manifest(
    folder: Path, models: Dict[str, Dict[str, str]], golden: Dict[str, Any], target_platform: str
) -> Dict[str, Any]:
    import onnxruntime

    default = models["int8" if "int8" in models else "float"]["ort"]
    manifest = {
        "format": PACKAGE_FORMAT,
        "toolchain_version": __version__,
        "converted_with_onnxruntime": onnxruntime.__version__,
        "target_platform": target_platform,
        "models": models,
        "default_model": default,
        "ort_config": ORT_CONFIG,
        "golden_images": len(golden["images"]),
        "files": {
            name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
            for name in package_files(folder)
        },
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def replace_files(folder: Path, files: Dict[str, Path], fields: Dict[str, Any]) -> None:
    """Swap package files for other copies (the run's identity-stamped ONNX files) and record
    them, and `fields`, in the manifest, so it stays true for the folder it describes."""
    manifest = read_manifest(folder)
    for name, source in files.items():
        shutil.copyfile(source, folder / name)
        manifest["files"][name] = {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
    atomic_write_json(folder / MANIFEST, {**manifest, **fields})


def read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
