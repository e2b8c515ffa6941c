"""quantize: static INT8 candidates of the exported model, each measured: validation accuracy with
onnxruntime, then, for those within the accuracy gate, the speedup over float from the paired,
replicated comparison of bench/compare.py. The fastest one whose interval's lower end clears
min_speedup at every batch size ships; else the float model does, and the reason says whether the
measurement was below the gate or too noisy to decide.

Publish writes export/<run>/model_int8.onnx (this run's identity stamped in) and the card's
`int8` section, and derives the INT8 model's PE against this run's references.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from tqdm.auto import tqdm

from ..bench.compare import Comparison, Interval, compare
from ..bench.device import physical_cores
from ..engine.artifacts import OnnxArtifact, StageResult
from ..engine.stage import MODELS, Job, Sections, Stage, StageOutput, register_stage
from ..fsutil import atomic_write_json, ensure_dir, file_sha256, file_sizes
from ..onnx.float_fallback import REVISION as FLOAT_FALLBACK_REVISION
from ..onnx.fold import REVISION as FOLD_REVISION
from ..onnx.gemm_route import REVISION as GEMM_REVISION
from ..onnx.quantize import (
    CANDIDATES,
    CalibrationReader,
    Candidate,
    Measured,
    QuantizeError,
    choose_within,
    cpu_features,
    needs_reduce_range,
    preprocess,
    quantize,
    within_accuracy,
)
from ..onnx.sensitivity import REVISION as SEARCH_REVISION
from .common import (
    calibration_reader,
    cpu_batches,
    latency_plan,
    pe_against_references,
    reference_reads,
    stamp_and_write,
    update_card,
)

if TYPE_CHECKING:  # annotations only
    from ..data.loaders import DataBundle
    from ..engine.context import Publication
    from ..recipe import QuantizeConfig
    from ..tracking import StageRun

INT8_FILE = "model_int8.onnx"
# 2: every candidate calibrates on the same images (1 handed each candidate the next ones)
CALIBRATION_REVISION = 2
# 2: speedups are replicated paired comparisons with intervals, the gate on their lower end
LATENCY_REVISION = 2


@register_stage
class Quantize(Stage):
    name = "quantize"
    consumes = ("export", MODELS)
    requires = {"export": "it quantizes the exported ONNX file"}
    sections = ("quantize",)
    # a changed graph rewrite, calibration or latency rule rebuilds cached candidates
    revision = {
        "fold_revision": FOLD_REVISION,
        "gemm_revision": GEMM_REVISION,
        "float_fallback_revision": FLOAT_FALLBACK_REVISION,
        "calibration_revision": CALIBRATION_REVISION,
        "latency_revision": LATENCY_REVISION,
        "search_revision": SEARCH_REVISION,
    }

    def inputs(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        return {"export": "export"}

    def reads(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        # the INT8 model's PE: the float model's counts with its own accuracy, against the references
        return {**reference_reads(models), "final": models[-1]}

    def preflight(self, cfg: Sections, data: DataBundle) -> None:
        available = data.train.num_samples * data.train.num_replicas  # the whole split, also under torchrun
        if cfg.quantize.calibration_images > available:
            raise QuantizeError(
                f"quantize.calibration_images is {cfg.quantize.calibration_images} but the training "
                f"split has {available} images; set quantize.calibration_images: {available} or less"
            )

    def compute(self, job: Job) -> StageResult:
        from ..onnx.export import onnx_accuracy

        cfg, export = job.cfg.quantize, job.inputs["export"]
        float_art = export.result.artifacts["final"]
        float_path = export.path(float_art.file)
        features = cpu_features()
        reader = calibration_reader(job, float_art.metadata["input_name"], cfg.calibration_images)
        preprocess(float_path, job.stage_dir / "float_pre.onnx")
        val = {"float": onnx_accuracy(float_path, cpu_batches(job.data.val))}
        built = build_candidates(job, cfg, reader, needs_reduce_range(features), val["float"])
        files = {"float": float_path, **{name: path for name, (path, _) in built.items()}}
        val.update({name: onnx_accuracy(path, cpu_batches(job.data.val)) for name, (path, _) in built.items()})
        sizes = {name: Path(path).stat().st_size for name, path in files.items()}
        fits = {n for n in built if cfg.max_file_bytes is None or sizes[n] <= cfg.max_file_bytes}
        accurate = [
            n for n in built if n in fits and within_accuracy(val["float"], Measured(n, val[n]), cfg.max_accuracy_drop)
        ]
        comparison = compare_with_float(cfg, files, accurate)
        measured = [
            Measured(name, val[name], _speedups(comparison, name, cfg.batch_sizes), info)
            for name, (_, info) in built.items()
        ]
        chosen, reason = choose_within(
            val["float"], measured, cfg.max_accuracy_drop, cfg.min_speedup, sizes, cfg.max_file_bytes
        )
        if comparison is not None:
            reason += f" [{comparison.replicates_text()}, stopped: {comparison.stopped}]"
        table = candidate_table(job, comparison, measured, files)
        tqdm.write(f"[quantize] {reason}")
        if chosen is None and cfg.on_miss == "error":
            raise QuantizeError(
                f"quantize: {reason}; loosen quantize.max_accuracy_drop, try other quantize.candidates, "
                "or set quantize.on_miss: keep_float"
            )
        latency = comparison.summary() if comparison is not None else None
        result = self._result(job, float_art, val["float"], chosen, reason, table, features, latency)
        if cfg.max_file_bytes is not None:  # the shipped file against the limit, shipped either way
            shipped = sizes[chosen.name if chosen else "float"]
            result.metrics.update(
                {
                    "file_limit.max": cfg.max_file_bytes,
                    "file_limit.bytes": shipped,
                    "file_limit.met": float(shipped <= cfg.max_file_bytes),
                }
            )
        return result

    def _result(self, job, float_art, float_val, chosen, reason, table, features, latency) -> StageResult:
        info = {
            "chosen": chosen.name if chosen else None,
            "reason": reason,
            "min_speedup": job.cfg.quantize.min_speedup,
            "candidates": table,
            "cpu_features": features,
            "float_val_accuracy": float_val,
            "latency": latency,
            "intra_op_threads": job.cfg.quantize.intra_op_threads or physical_cores(),
        }
        atomic_write_json(job.stage_dir / "candidates.json", info)
        if chosen is None:
            return StageResult({"int8.shipped": 0, "float_val_accuracy": float_val}, info=info)
        row = next(r for r in table if r["name"] == chosen.name)
        shutil.copyfile(job.stage_dir / "candidates" / f"{chosen.name}.onnx", job.stage_dir / INT8_FILE)
        metadata = {
            **float_art.metadata,
            "quantization": {"candidate": chosen.name, **CANDIDATES.get(chosen.name).describe()},
        }
        art = OnnxArtifact(
            INT8_FILE,
            float_art.stage,
            metadata,
            {},
            {**row["sizes"], **chosen.info},
            row["test_accuracy"],
            file_sha256(job.stage_dir / INT8_FILE),
        )
        metrics = {
            "int8.shipped": 1,
            "float_val_accuracy": float_val,
            "int8.val_accuracy": row["val_accuracy"],
            "int8.test_accuracy": row["test_accuracy"],
            "int8.file_bytes": row["sizes"]["bytes"],
            "int8.zip_bytes": row["sizes"]["zip_bytes"],
        }
        for b, iv in chosen.speedup.items():
            metrics.update(
                {f"int8.speedup.bs{b}": iv.ratio, f"int8.speedup.bs{b}_lo": iv.low, f"int8.speedup.bs{b}_hi": iv.high}
            )
        return StageResult(metrics, artifacts={"int8": art}, info=info)

    def summary_lines(self, entry: Dict[str, Any]) -> List[str]:
        searched = [row["auto"]["line"] for row in entry["info"].get("candidates", []) if "auto" in row]
        return [_int8_line(entry), *_limit_line(entry.get("metrics", {})), *(f"INT8 {line}" for line in searched)]

    def headline(self, output: StageOutput) -> Dict[str, float]:
        # int8.test_accuracy, .file_bytes, .zip_bytes, .vs_*.pe_* ...; file_limit.* under a size limit
        return {k: v for k, v in output.metrics.items() if k.startswith(("int8.", "file_limit."))}

    def publish(self, pub: Publication, output: StageOutput, child: StageRun) -> Dict[str, float]:
        child.log_dict(output.result.info, "candidates.json")
        path = pub.run_dir / INT8_FILE
        art = output.result.artifacts.get("int8")
        if art is None:  # the float model ships: no INT8 file of an earlier run may linger next to it
            path.unlink(missing_ok=True)
            update_card(pub, {"int8": {"shipped": False, **_card_fields(output)}})
            return {}
        stamp_and_write(pub, output.path(art.file), art.metadata, path)
        pub.summary.add_files({INT8_FILE: path})
        sha = file_sha256(path)  # `attach` accepts a device's timing of this file by its hash
        pub.parent.set_tags({f"toolchain.sha256.{INT8_FILE}": sha})
        update_card(
            pub,
            {
                "int8": {"shipped": True, "file": INT8_FILE, **_card_fields(output)},
                "files": {INT8_FILE: {**file_sizes(path), "sha256": sha}},
            },
        )
        final = pub.final().result.metrics
        pe = pe_against_references(pub.inputs, {**final, "test_accuracy": art.onnx_test_accuracy}, art.stage)
        return {f"int8.{k}": v for k, v in pe.items()}


def build_candidates(
    job: Job, cfg: QuantizeConfig, reader: CalibrationReader, reduce_range: bool, float_val: float
) -> Dict[str, Tuple[Path, dict]]:
    """Quantize each candidate in turn until the search budget is spent. A candidate that
    onnxruntime cannot quantize is reported and skipped, not fatal."""
    built, start = {}, time.perf_counter()
    for name in cfg.candidates:
        if time.perf_counter() - start > cfg.search_budget_s:
            tqdm.write(f"[quantize] search budget ({cfg.search_budget_s:.0f} s) spent: {name} and later not built")
            break
        path = job.stage_dir / "candidates" / f"{name}.onnx"
        candidate = CANDIDATES.get(name)
        try:
            if candidate.search:
                info = search_blocks(job, cfg, candidate, reader, reduce_range, float_val, path)
            else:
                info = quantize(job.stage_dir / "float_pre.onnx", path, candidate, reader, reduce_range)
        except QuantizeError as exc:
            tqdm.write(f"[quantize] skipped {exc}")
            continue
        built[name] = (path, info)
    return built


def search_blocks(
    job: Job,
    cfg: QuantizeConfig,
    candidate: Candidate,
    reader: CalibrationReader,
    reduce_range: bool,
    float_val: float,
    path: Path,
) -> Dict[str, Any]:
    """A searched candidate (`auto`, onnx/sensitivity.py) on the validation split, measured with the
    section's latency settings; its info carries the per-block table."""
    from ..onnx.export import onnx_accuracy
    from ..onnx.sensitivity import search

    settings, plan = latency_plan(cfg)
    return search(
        job.stage_dir / "float_pre.onnx",
        path,
        candidate,
        reader,
        reduce_range,
        lambda p: onnx_accuracy(p, cpu_batches(job.data.val)),
        float_val,
        cfg,
        settings,
        plan,
        ensure_dir(job.stage_dir / "auto"),
        progress=lambda line: tqdm.write(f"[quantize] {candidate.name} {line}"),
    )


def compare_with_float(cfg, files: Dict[str, Path], names: List[str]) -> Optional[Comparison]:
    """Each candidate within the accuracy gate against float, in its own paired blocks (its own float
    figure), replicated in fresh processes until every interval is clear of min_speedup or narrow."""
    if not names:
        return None
    settings, plan = latency_plan(cfg)
    tqdm.write(
        f"[quantize] timing float vs {len(names)} candidate(s) within the accuracy gate at batch "
        f"{', '.join(map(str, cfg.batch_sizes))} ({settings.intra_op_threads or physical_cores()} threads), "
        f"replicated in fresh processes"
    )
    return compare(
        {"float": files["float"], **{n: files[n] for n in names}},
        [("float", n) for n in names],
        cfg.batch_sizes,
        settings,
        plan,
        decide_at=cfg.min_speedup,
        progress=lambda line: tqdm.write(f"[quantize] {line}"),
    )


def _speedups(comparison: Optional[Comparison], name: str, batch_sizes) -> Optional[Dict[int, Interval]]:
    if comparison is None or ("float", name) not in comparison.pairs:
        return None
    return {b: comparison.ratio("float", name, b) for b in batch_sizes}


def candidate_table(
    job: Job, comparison: Optional[Comparison], measured: List[Measured], files: Dict[str, Path]
) -> List[Dict[str, Any]]:
    """Every candidate's numbers (test accuracy reported, validation accuracy used to choose); the
    candidates outside the accuracy gate are not timed."""
    from ..onnx.export import onnx_accuracy

    rows = []
    for m in measured:
        row = {
            "name": m.name,
            "val_accuracy": m.val_accuracy,
            "test_accuracy": onnx_accuracy(files[m.name], cpu_batches(job.data.test)),
            "timed": m.speedup is not None,
            "sizes": file_sizes(files[m.name]),
            "settings": CANDIDATES.get(m.name).describe(),
            **({"auto": m.info["auto"]} if "auto" in m.info else {}),  # the per-block table: why these blocks
        }
        if m.speedup is not None:
            row.update(
                p50_ms=_p50(comparison.stats(m.name)),
                float_p50_ms=_p50(comparison.stats("float")),
                speedup_vs_float={b: iv.ratio for b, iv in m.speedup.items()},
                speedup_interval={b: [iv.low, iv.high] for b, iv in m.speedup.items()},
            )
        rows.append(row)
    return rows


def _p50(rows: List[Dict[str, Any]]) -> Dict[int, float]:
    return {r["batch_size"]: r["p50_ms"] for r in rows}


def _card_fields(output: StageOutput) -> Dict[str, Any]:
    info, m = output.result.info, output.result.metrics
    speedup = {
        b: {"ratio": m[f"int8.speedup.bs{b}"], "low": m[f"int8.speedup.bs{b}_lo"], "high": m[f"int8.speedup.bs{b}_hi"]}
        for b in sorted(int(k.split("bs")[1]) for k in m if k.startswith("int8.speedup.bs") and "_" not in k)
    }
    return {
        "candidate": info["chosen"],
        "path": "ptq_per_block" if info["chosen"] == "auto" else "ptq",  # qad: the qad stage's card entry
        "why": info["reason"],
        "min_speedup": info.get("min_speedup"),  # the gate (check_claims re-tests the decision against it)
        "cpu_features": info["cpu_features"],
        "intra_op_threads": info["intra_op_threads"],
        "float_val_accuracy": info["float_val_accuracy"],
        "speedup_vs_float": speedup,
        "latency": info.get("latency"),
        "candidates": info["candidates"],
    }


def _replicates(latency: Dict[str, Any]) -> str:
    return f"{latency['replicates']} fresh-{latency['plan']['isolation']} replicates, stopped: {latency['stopped']}"


def _limit_line(metrics: Dict[str, Any]) -> List[str]:
    """quantize.max_file_bytes: the shipped model file (without the run's metadata) against it."""
    if "file_limit.max" not in metrics:
        return []
    met = "met" if metrics["file_limit.met"] else "NOT met"
    shipped = "INT8" if metrics.get("int8.shipped") else "float"
    return [
        f"File limit: {shipped} model {int(metrics['file_limit.bytes'])} bytes <= {int(metrics['file_limit.max'])}: {met}"
    ]


def _int8_line(quantize: Dict[str, Any]) -> str:
    m, info = quantize["metrics"], quantize["info"]
    if not m.get("int8.shipped"):
        return f"INT8: no post-training candidate ships ({info['reason']})"
    batches = sorted(int(k.split("bs")[1]) for k in m if k.startswith("int8.speedup.bs") and "_" not in k)
    speedups = " / ".join(
        f"{m[f'int8.speedup.bs{b}']:.2f}x [{m[f'int8.speedup.bs{b}_lo']:.2f}, "
        f"{m[f'int8.speedup.bs{b}_hi']:.2f}] at batch {b}"
        for b in batches
    )
    return (
        f"INT8: {info['chosen']}, test acc {m['int8.test_accuracy']:.4f}, val acc {m['int8.val_accuracy']:.4f} "
        f"(float {m['float_val_accuracy']:.4f}), {speedups} faster than float (median, 95% interval over "
        f"{_replicates(info['latency'])})"
    )
