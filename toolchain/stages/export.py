"""export: the final model (and, for the bench's speedup ratios, the teacher and the unpruned
student) -> ONNX, gated on parity, with ONNX-measured test accuracy.

The cached files carry the model's content metadata only; publish stamps this run's identity
(run name, recipe hash, PE, MLflow run) into export/<run>/model.onnx and its model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from tqdm.auto import tqdm

from .. import __version__
from ..engine.artifacts import OnnxArtifact, StageResult
from ..engine.stage import MODELS, Job, Sections, Stage, StageOutput, register_stage
from ..fsutil import atomic_write_json, file_sha256, file_sizes
from ..onnx.pooling import REVISION as POOLING_REVISION
from .common import REFERENCES, cpu_batches, cpu_copy, stamp_and_write

if TYPE_CHECKING:  # annotations only
    from ..engine.context import Publication
    from ..tracking import StageRun

PARITY_BATCH = 64


def content_metadata(job: Job, source: StageOutput) -> Dict[str, Any]:
    """What a device needs to feed the model, and what was measured on it."""
    m = source.result.metrics
    return {
        "input_name": "input",
        "input_shape": ["batch", *job.data.input_shape],
        "input_dtype": "float32",
        "normalization_mean": list(job.data.mean),
        "normalization_std": list(job.data.std),
        "preprocessing": job.data.preprocessing,
        "class_names": job.data.class_names,
        # the whole contract (size, frame fit, resize + crop, interpolation, layout, channel order):
        # the device package's infer.py reads exactly these fields
        "preprocess": {k: v for k, v in job.data.contract().items() if k not in ("class_names", "input_shape")},
        "stage": source.name,
        "test_accuracy": m["test_accuracy"],
        "params": m["params"],
        "nonzero_params": m["nonzero_params"],
        "macs": m["macs"],
        "toolchain_version": __version__,
    }


def export_model(job: Job, source: StageOutput, relative: str) -> OnnxArtifact:
    """Export one stage's model, gate on parity, measure its ONNX test accuracy."""
    from ..onnx.export import check_parity, export_onnx, onnx_accuracy

    cfg, path = job.cfg.export, job.stage_dir / relative
    model = cpu_copy(source.model)
    metadata = content_metadata(job, source)
    info = export_onnx(model, path, job.data.example_batch(2).cpu(), cfg, metadata)
    info.pop("path")  # absolute; the artifact's file is relative to the stage folder
    x, _ = next(iter(job.data.val))
    parity = check_parity(
        model, path, x[:PARITY_BATCH].cpu(), cfg.parity_atol, cfg.parity_min_agreement, cfg.parity_rtol
    )
    accuracy = onnx_accuracy(path, cpu_batches(job.data.test))
    return OnnxArtifact(relative, source.name, metadata, parity, info, accuracy, file_sha256(path))


@register_stage
class Export(Stage):
    name = "export"
    consumes = (MODELS,)
    sections = ("export",)
    revision = {"pooling_revision": POOLING_REVISION}  # a changed graph rewrite re-exports cached models

    def inputs(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        final = models[-1]
        roles = {"model": final}
        if cfg.export.references:
            roles.update({role: stage for role, stage in REFERENCES.items() if stage in models and stage != final})
        return roles

    def reads(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        # the final model's PE goes into the file's metadata; the prune stage's budget decision into the card
        return {"final": models[-1], **({"prune": "prune"} if "prune" in ran else {})}

    def compute(self, job: Job) -> StageResult:
        cfg, final = job.cfg.export, job.inputs["model"]
        tqdm.write(f"[export] {final.name} model -> ONNX ({cfg.exporter} exporter, opset {cfg.opset})")
        arts = {"final": export_model(job, final, "model.onnx")}
        for role in REFERENCES:
            if role in job.inputs:
                arts[role] = export_model(job, job.inputs[role], f"references/{role}.onnx")
        f = arts["final"]
        metrics = {
            "onnx_test_accuracy": f.onnx_test_accuracy,
            "torch_test_accuracy": final.result.metrics["test_accuracy"],
            "parity_max_abs_diff": f.parity["max_abs_diff"],
            "parity_top1_agreement": f.parity["top1_agreement"],
            "onnx_file_size_bytes": f.info["file_size_bytes"],
            "onnx_zip_bytes": file_sizes(job.stage_dir / f.file)["zip_bytes"],
        }
        return StageResult(metrics, artifacts=arts)

    def summary_lines(self, entry: Dict[str, Any]) -> List[str]:
        m = entry["metrics"]
        return [
            f"ONNX: test acc {m['onnx_test_accuracy']:.4f} (PyTorch {m['torch_test_accuracy']:.4f}), "
            f"parity max|diff| {m['parity_max_abs_diff']:.2e}, top-1 agreement {m['parity_top1_agreement']:.3f}"
        ]

    def headline(self, output: StageOutput) -> Dict[str, float]:
        m = output.metrics
        return {"onnx_file_bytes": m["onnx_file_size_bytes"], "onnx_zip_bytes": m["onnx_zip_bytes"]}

    def publish(self, pub: Publication, output: StageOutput, child: StageRun) -> Dict[str, float]:
        files = publish_onnx(pub, output)
        pub.summary.add_files(files)
        return {}


def publish_onnx(pub, output: StageOutput) -> Dict[str, Path]:
    """export/<run>/model.onnx (this run's identity stamped in) and model_card.json, logged to
    the parent MLflow run. Written atomically: a reader sees the old file or the new one."""
    from ..onnx.export import log_onnx_to_mlflow

    art = output.result.artifacts["final"]
    onnx_path, card_path = pub.run_dir / "model.onnx", pub.run_dir / "model_card.json"
    metadata = stamp_and_write(pub, output.path(art.file), art.metadata, onnx_path)
    # an INT8 file of an earlier model must not sit next to this one (quantize's publish writes the new one)
    (pub.run_dir / "model_int8.onnx").unlink(missing_ok=True)
    sha = file_sha256(
        onnx_path
    )  # this run's bytes (its identity is stamped in): what `attach` matches a device JSON to
    card = model_card(pub, art, metadata)
    card["files"] = {"model.onnx": {**file_sizes(onnx_path), "sha256": sha}}
    atomic_write_json(card_path, card)
    if pub.tracker.uri is not None:
        # through the tracker: against a server that died, one masked line instead of MLflow's traceback with the URI
        model_uri = pub.tracker._call(
            "logging the ONNX model",
            log_onnx_to_mlflow,
            onnx_path,
            pub.data.example_batch(2).cpu().numpy(),
            run_id=pub.parent.run_id,
        )
        pub.summary.data["mlflow"]["model_uri"] = (
            model_uri  # tracking.register_model registers it when the run finishes
        )
        pub.parent.log_artifact(card_path)
    # references are the cached files as exported: a device timing them gives pe_latency on the device
    refs = {
        f"toolchain.sha256.reference.{role}": a.sha256
        for role, a in output.result.artifacts.items()
        if role != "final" and a.sha256
    }
    pub.parent.set_tags({"toolchain.sha256.model.onnx": sha, **refs})
    return {"model.onnx": onnx_path, "model_card.json": card_path}


def model_card(pub, art: OnnxArtifact, metadata: Dict[str, Any]) -> Dict[str, Any]:
    recipe = pub.recipe
    return {
        "name": recipe.name,
        "model": recipe.student.model,
        "dataset": recipe.data.name,
        **metadata,
        "onnx_test_accuracy": art.onnx_test_accuracy,
        "parity": art.parity,
        "export": art.info,
        "pruning": recipe.prune.model_dump(mode="json") if recipe.prune else None,
        **({"budget": _budget_decision(pub)} if recipe.prune and recipe.prune.budget else {}),
        "mlflow": pub.identity["mlflow"],
    }


def _budget_decision(pub) -> Dict[str, Any]:
    """prune.budget: what the prune stage decided and measured (its budget.json has every probed point)."""
    info = pub.inputs["prune"].result.info if "prune" in pub.inputs else {}
    decision = info.get("budget") or {}
    keys = (
        "kind",
        "target",
        "allocation",
        "sparsity",
        "met",
        "value",
        "low",
        "high",
        "batch_size",
        "threads",
        "retries",
    )
    out = {
        **{k: decision.get(k) for k in keys},
        "predicted": decision.get("predicted"),
        "line": info.get("budget_line"),
    }
    model = decision.get("cost_model") or {}
    if model:  # latency_aware: what the allocation was predicted on, how far off it was, what each group kept
        out["cost_model"] = {
            "basis": (model.get("table") or {}).get("source", f"counted {decision.get('kind')}"),
            "error_pct": model.get("error_pct"),
            "kept": model.get("kept"),
        }
    return out
