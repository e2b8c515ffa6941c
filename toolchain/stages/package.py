"""package: a self-checking device package of the shipped model (toolchain/package/), verified
before the stage returns; publish copies it to export/<run>/package/, with the run's own
identity-stamped ONNX files (export/<run>/model.onnx, model_int8.onnx) in place of the cached ones
so that `attach` accepts a device's timing of them.

The package is a folder in the stage's cache entry, described by a PackageArtifact that lists
every file's sha256: the runner verifies them before reusing the entry and rebuilds it when one
was altered, as for any stage.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..engine.artifacts import PackageArtifact, StageResult
from ..engine.stage import Job, Sections, Stage, StageOutput, register_stage
from ..errors import OutputError
from ..fsutil import file_sha256
from ..package.build import MANIFEST, PackageError, build_package, read_manifest, replace_files
from ..package.verify import verify_package
from .common import int8_roles, shipped_int8

if TYPE_CHECKING:  # annotations only
    from ..data.loaders import DataBundle
    from ..engine.context import Publication
    from ..tracking import StageRun

PACKAGE_DIR = "package"


@register_stage
class Package(Stage):
    name = "package"
    consumes = ("export", "quantize", "qad")
    requires = {"export": "it packages the exported ONNX file"}
    sections = ("package",)

    def inputs(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        return {"export": "export", **int8_roles(ran)}

    def preflight(self, cfg: Sections, data: DataBundle) -> None:
        """The golden images come from the test split: too few fails now, not after training."""
        available = len(data.test.labels)
        if cfg.package.golden_images > available:
            raise PackageError(
                f"package.golden_images is {cfg.package.golden_images} but the test split has {available} "
                f"images; set package.golden_images: {available} or less"
            )

    def compute(self, job: Job) -> StageResult:
        cfg, art = job.cfg.package, job.inputs["export"].result.artifacts["final"]
        models = shipped_models(job)
        tqdm.write(
            f"[package] {', '.join(models)} model(s) -> ONNX + ORT format ({cfg.target_platform}), "
            f"{cfg.golden_images} golden images, self-check"
        )
        images, labels = golden_images(job.data, cfg.golden_images)
        folder = job.stage_dir / PACKAGE_DIR
        manifest = build_package(folder, models, art.metadata, images, labels, cfg.target_platform)
        checks = verify_package(folder)
        hashes = {name: entry["sha256"] for name, entry in manifest["files"].items()}
        hashes[MANIFEST] = file_sha256(folder / MANIFEST)
        info = {
            "target_platform": cfg.target_platform,
            "models": manifest["models"],
            "files": sorted(manifest["files"]),
            "checks": checks,
        }
        return StageResult(
            package_metrics(manifest, checks), artifacts={"package": PackageArtifact(PACKAGE_DIR, hashes)}, info=info
        )

    def publish(self, pub: Publication, output: StageOutput, child: StageRun) -> Dict[str, float]:
        # the runner verified every file's sha256 before reusing this entry
        target = publish_folder(
            output.path(PACKAGE_DIR), pub.run_dir / PACKAGE_DIR, lambda staging: ship_run_models(pub, staging)
        )
        pub.summary.add_files({PACKAGE_DIR: target})
        # `attach` accepts a device's timing of the package's ORT-format files by these hashes
        pub.parent.set_tags(
            {f"toolchain.sha256.{PACKAGE_DIR}/{f.name}": file_sha256(f) for f in sorted(target.glob("*.ort"))}
        )
        child.log_dict(output.result.info["checks"], "package_checks.json")
        if pub.tracker.uri is not None:
            for name in [*output.result.info["files"], MANIFEST]:
                pub.parent.log_artifact(target / name, Path(PACKAGE_DIR, name).parent.as_posix())
        return {}


def ship_run_models(pub, folder: Path) -> None:
    """The published package's ONNX files are this run's own export/<run>/model.onnx (and
    model_int8.onnx): the packaged graphs with this run's identity in their metadata, so a device
    timing of them attaches to this run (attach matches a file's sha256 to the run's tags)."""
    models = read_manifest(folder)["models"]
    shipped = {f["onnx"]: pub.run_dir / f["onnx"] for f in models.values() if (pub.run_dir / f["onnx"]).is_file()}
    identity = pub.identity
    replace_files(folder, shipped, {"run": {"run_name": identity["run_name"], "recipe_hash": identity["recipe_hash"]}})


def shipped_models(job: Job) -> Dict[str, Path]:
    """role -> ONNX file: the float model, and the INT8 one when quantize or qad shipped it."""
    export = job.inputs["export"]
    models = {"float": export.path(export.result.artifacts["final"].file)}
    int8 = shipped_int8(job.inputs)
    if int8 is not None:
        models["int8"] = int8[0].path(int8[1].file)
    return models


def golden_images(data, n: int) -> Tuple[np.ndarray, List[int]]:
    """The first n test images as their stored uint8 frames (what a camera file becomes before the
    evaluation resize and crop, so infer.py on the PNG redoes every step) and their labels."""
    import torch

    if len(data.test.labels) < n:
        raise PackageError(
            f"package.golden_images is {n} but the test split has {len(data.test.labels)} images; "
            f"set package.golden_images: {len(data.test.labels)} or less"
        )
    idx = torch.arange(n)
    return data.test.images[idx].numpy(), [int(v) for v in data.test.labels[idx]]


def package_metrics(manifest: Dict[str, Any], checks: Dict[str, Any]) -> Dict[str, float]:
    files = manifest["files"]
    metrics = {
        "package.files": len(files),
        "package.bytes": sum(f["bytes"] for f in files.values()),
        "package.float_ort_max_abs_diff": checks["float"]["max_abs_diff"],
    }
    if "int8" in checks:
        metrics["package.int8_ort_top1_agreement"] = checks["int8"]["top1_agreement"]
    return metrics


def publish_folder(source: Path, target: Path, prepare: Callable[[Path], None]) -> Path:
    """Copy a folder over `target`: built beside it (and `prepare`d there), then swapped in with
    renames, so a reader sees the old package or the new one, never a half-copied mix."""
    tag = uuid.uuid4().hex[:8]
    staging, old = target.parent / f".{target.name}.{tag}.tmp", target.parent / f".{target.name}.{tag}.old"
    try:
        shutil.copytree(source, staging)  # copies the cache folder's permissions too
        prepare(staging)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    except OSError as exc:
        raise OutputError(
            f"cannot write {target}: {exc.strerror or exc}; free disk space or point output_dir at a writable disk"
        ) from None
    finally:
        for leftover in (staging, old):
            shutil.rmtree(leftover, ignore_errors=True)
    return target
