"""quantize: static INT8 candidates of the exported model, each measured (validation accuracy
with onnxruntime, p50 latency interleaved with the float model); the fastest one within the
accuracy gate that is faster than float at every batch size ships, else the float model does.

Publish writes export/<run>/model_int8.onnx (this run's identity stamped in) and the card's
`int8` section, and derives the INT8 model's PE against this run's references.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from tqdm.auto import tqdm

from ..bench.device import physical_cores
from ..bench.interleave import interleaved_benchmarks
from ..engine.artifacts import OnnxArtifact, StageResult
from ..engine.stage import Job, Stage, StageOutput, register_stage
from ..fsutil import atomic_write_json, file_sha256, file_sizes
from ..onnx.fold import REVISION as FOLD_REVISION
from ..onnx.gemm_route import REVISION as GEMM_REVISION
from ..onnx.quantize import (CANDIDATES, CalibrationReader, Measured, QuantizeError, choose, cpu_features,
                             needs_reduce_range, preprocess, quantize)
from .common import pe_against_references
from .export import cpu_batches

INT8_FILE = "model_int8.onnx"
ROUNDS = 3
# 2: every candidate calibrates on the same images (1 handed each candidate the next ones)
CALIBRATION_REVISION = 2


@register_stage
class Quantize(Stage):
    name = "quantize"
    order = 55  # after export, before bench (which times the INT8 file next to the float one)
    sections = ("quantize",)

    def inputs(self, cfg, models, ran):
        return {"export": "export"}

    def fingerprint(self, cfg):
        # a changed graph rewrite rebuilds cached candidates
        return {"fold_revision": FOLD_REVISION, "gemm_revision": GEMM_REVISION, "calibration_revision": CALIBRATION_REVISION}

    def preflight(self, cfg, data) -> None:
        available = data.train.num_samples * data.train.num_replicas  # the whole split, also under torchrun
        if cfg.quantize.calibration_images > available:
            raise QuantizeError(f"quantize.calibration_images is {cfg.quantize.calibration_images} but the training "
                                f"split has {available} images; set quantize.calibration_images: {available} or less")

    def compute(self, job: Job) -> StageResult:
        from ..onnx.export import onnx_accuracy

        cfg, export = job.cfg.quantize, job.inputs["export"]
        float_art = export.result.artifacts["final"]
        float_path = export.path(float_art.file)
        features = cpu_features()
        reader = calibration_reader(job, float_art.metadata["input_name"], cfg.calibration_images)
        preprocess(float_path, job.stage_dir / "float_pre.onnx")
        built = build_candidates(job, cfg, reader, needs_reduce_range(features))
        tqdm.write(f"[quantize] measuring float + {len(built)} INT8 candidate(s): validation accuracy, "
                   f"p50 at batch {', '.join(map(str, cfg.batch_sizes))}")
        files = {"float": float_path, **{name: path for name, (path, _) in built.items()}}
        latency = interleaved_benchmarks(files, cfg.batch_sizes, rounds=ROUNDS, warmup=5, iterations=100000,
                                         time_budget_s=cfg.time_per_model_s, intra_op_threads=cfg.intra_op_threads)
        val = {name: onnx_accuracy(path, cpu_batches(job.data.val)) for name, path in files.items()}
        float_run = Measured("float", val["float"], _p50(latency["float"]))
        measured = [Measured(name, val[name], _p50(latency[name]), info) for name, (_, info) in built.items()]
        chosen, reason = choose(float_run, measured, cfg.max_accuracy_drop, cfg.min_speedup)
        table = candidate_table(job, float_run, measured, files)
        float_val = float_run.val_accuracy
        tqdm.write(f"[quantize] {reason}")
        if chosen is None and cfg.on_miss == "error":
            raise QuantizeError(f"quantize: {reason}; loosen quantize.max_accuracy_drop, try other quantize.candidates, "
                                "or set quantize.on_miss: keep_float")
        return self._result(job, float_art, float_val, chosen, reason, table, features)

    def _result(self, job, float_art, float_val, chosen, reason, table, features) -> StageResult:
        info = {"chosen": chosen.name if chosen else None, "reason": reason, "candidates": table,
                "cpu_features": features, "float_val_accuracy": float_val,
                "intra_op_threads": job.cfg.quantize.intra_op_threads or physical_cores()}
        atomic_write_json(job.stage_dir / "candidates.json", info)
        if chosen is None:
            return StageResult({"int8.shipped": 0, "float_val_accuracy": float_val}, info=info)
        row = next(r for r in table if r["name"] == chosen.name)
        shutil.copyfile(job.stage_dir / "candidates" / f"{chosen.name}.onnx", job.stage_dir / INT8_FILE)
        metadata = {**float_art.metadata, "quantization": {"candidate": chosen.name, **CANDIDATES.get(chosen.name).describe()}}
        art = OnnxArtifact(INT8_FILE, float_art.stage, metadata, {}, {**row["sizes"], **chosen.info},
                           row["test_accuracy"], file_sha256(job.stage_dir / INT8_FILE))
        metrics = {"int8.shipped": 1, "float_val_accuracy": float_val, "int8.val_accuracy": row["val_accuracy"],
                   "int8.test_accuracy": row["test_accuracy"], "int8.file_bytes": row["sizes"]["bytes"],
                   "int8.zip_bytes": row["sizes"]["zip_bytes"],
                   **{f"int8.speedup_vs_float.bs{b}": s for b, s in row["speedup_vs_float"].items()}}
        return StageResult(metrics, artifacts={"int8": art}, info=info)

    def headline(self, output: StageOutput) -> Dict[str, float]:
        # int8.test_accuracy, .file_bytes, .zip_bytes, .vs_*.pe_* ...
        return {k: v for k, v in output.metrics.items() if k.startswith("int8.")}

    def publish(self, run, output: StageOutput, child) -> Dict[str, float]:
        from .export import stamp_and_write, update_card

        child.log_dict(output.result.info, "candidates.json")
        path = run.run_dir / INT8_FILE
        art = output.result.artifacts.get("int8")
        if art is None:  # the float model ships: no INT8 file of an earlier run may linger next to it
            path.unlink(missing_ok=True)
            update_card(run, {"int8": {"shipped": False, **_card_fields(output)}})
            return {}
        stamp_and_write(run, output.path(art.file), art.metadata, path)
        run.summary.add_files({INT8_FILE: path})
        sha = file_sha256(path)  # `attach` accepts a device's timing of this file by its hash
        run.parent.set_tags({f"toolchain.sha256.{INT8_FILE}": sha})
        update_card(run, {"int8": {"shipped": True, "file": INT8_FILE, **_card_fields(output)},
                          "files": {INT8_FILE: {**file_sizes(path), "sha256": sha}}})
        final = run.outputs[art.stage].result.metrics
        pe = pe_against_references(run.outputs, {**final, "test_accuracy": art.onnx_test_accuracy}, art.stage)
        return {f"int8.{k}": v for k, v in pe.items()}


def calibration_reader(job: Job, input_name: str, images: int) -> CalibrationReader:
    """Training images with the evaluation preprocessing (no flips or crops), in split order."""
    plain = dataclasses.replace(job.data.train, augment=False, shuffle=False, num_replicas=1, rank=0)
    return CalibrationReader(plain, input_name, images)  # re-iterable: every candidate sees the same images


def build_candidates(job: Job, cfg, reader: CalibrationReader, reduce_range: bool) -> Dict[str, Tuple[Path, dict]]:
    """Quantize each candidate in turn until the search budget is spent. A candidate that
    onnxruntime cannot quantize is reported and skipped, not fatal."""
    built, start = {}, time.perf_counter()
    for name in cfg.candidates:
        if time.perf_counter() - start > cfg.search_budget_s:
            tqdm.write(f"[quantize] search budget ({cfg.search_budget_s:.0f} s) spent: {name} and later not built")
            break
        path = job.stage_dir / "candidates" / f"{name}.onnx"
        try:
            info = quantize(job.stage_dir / "float_pre.onnx", path, CANDIDATES.get(name), reader, reduce_range)
        except QuantizeError as exc:
            tqdm.write(f"[quantize] skipped {exc}")
            continue
        built[name] = (path, info)
    return built


def candidate_table(job: Job, float_run: Measured, measured: List[Measured], files: Dict[str, Path]) -> List[Dict[str, Any]]:
    """Every candidate's numbers (test accuracy reported, validation accuracy used to choose)."""
    from ..onnx.export import onnx_accuracy

    base = float_run.latency_ms
    return [{"name": m.name, "val_accuracy": m.val_accuracy,
             "test_accuracy": onnx_accuracy(files[m.name], cpu_batches(job.data.test)),
             "p50_ms": m.latency_ms, "float_p50_ms": base,
             "speedup_vs_float": {b: base[b] / m.latency_ms[b] for b in m.latency_ms},
             "sizes": file_sizes(files[m.name]), "settings": CANDIDATES.get(m.name).describe()}
            for m in measured]


def _p50(results: Dict[str, Any]) -> Dict[int, float]:
    return {r["batch_size"]: r["p50_ms"] for r in results["results"]}


def _card_fields(output: StageOutput) -> Dict[str, Any]:
    info = output.result.info
    return {"candidate": info["chosen"], "why": info["reason"], "cpu_features": info["cpu_features"],
            "intra_op_threads": info["intra_op_threads"], "float_val_accuracy": info["float_val_accuracy"],
            "candidates": info["candidates"]}
