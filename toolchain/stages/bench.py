"""bench: onnxruntime latency of the exported files (final model and references) in one
interleaved run, plus PyTorch eager on the final model for comparison.

Publish copies the table and numbers into export/<run>/ and derives pe_latency against this
run's references.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any, Dict

from tqdm.auto import tqdm

from ..bench.ort import result_rows
from ..engine.artifacts import BenchArtifact, StageResult
from ..engine.stage import Job, Stage, StageOutput, register_stage
from ..fsutil import atomic_write_json, atomic_write_text, file_sha256
from .common import REFERENCES, pe_against_references
from .export import cpu_copy

BENCH_ROUNDS = 3  # interleaved timing rounds per model (see interleaved_benchmarks)


@register_stage
class Bench(Stage):
    name = "bench"
    order = 60
    sections = ("bench",)
    uses_data = False  # times the exported files; their key already covers the data

    def inputs(self, cfg, models):
        return {"export": "export", "model": models[-1]}

    def compute(self, job: Job) -> StageResult:
        cfg, export = job.cfg.bench, job.inputs["export"]
        files = {role: export.path(art.file) for role, art in export.result.artifacts.items()}
        tqdm.write(f"[bench] {', '.join(files)}: {BENCH_ROUNDS} interleaved rounds")
        results = interleaved_benchmarks(files, cfg)
        eager = None
        if cfg.compare_torch:
            from ..bench.torch_eager import torch_eager_latency

            shape = tuple(export.result.artifacts["final"].metadata["input_shape"][1:])
            eager = torch_eager_latency(cpu_copy(job.inputs["model"].model), shape, cfg.batch_sizes, cfg.warmup,
                                        cfg.iterations, cfg.time_budget_s)
        path = job.stage_dir / "bench.json"
        atomic_write_json(path, {"onnxruntime": results, "torch_eager": eager})
        art = BenchArtifact(path.name, {role: p50_smallest(r) for role, r in results.items()}, file_sha256(path))
        return StageResult(bench_metrics(results, eager), artifacts={"bench": art}, info={"table": latency_table(results, eager)})

    def publish(self, run, output: StageOutput, child) -> Dict[str, float]:
        art = output.result.artifacts["bench"]
        files = {"latency.txt": run.run_dir / "latency.txt", "bench.json": run.run_dir / "bench.json"}
        atomic_write_text(files["latency.txt"], output.result.info["table"] + "\n")
        atomic_write_text(files["bench.json"], output.path(art.file).read_text())
        child.log_artifact(output.path(art.file))
        run.summary.add_files(files)
        final = run.outputs["export"].result.artifacts["final"].stage
        latency = {"final": art.latency_ms["final"]}
        latency.update({REFERENCES[role]: ms for role, ms in art.latency_ms.items() if role in REFERENCES})
        pe = pe_against_references(run.outputs, run.outputs[final].result.metrics, latency)
        return {k: v for k, v in pe.items() if k.endswith("pe_latency")}


def interleaved_benchmarks(files: Dict[str, Path], cfg) -> Dict[str, Any]:
    """Time the models in short rounds, in rotated order, and keep the per-row median.

    Timing one model after the other lets a load burst on a shared machine skew one
    side of a speedup ratio; interleaving spreads it over all of them.
    """
    from ..bench import ort as bench

    names = list(files)
    runs: Dict[str, list] = {name: [] for name in names}
    for r in range(BENCH_ROUNDS):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs[name].append(bench.benchmark(
                files[name], cfg.batch_sizes, cfg.providers, cfg.intra_op_threads, cfg.inter_op_threads,
                cfg.graph_optimization, cfg.warmup, max(1, cfg.iterations // BENCH_ROUNDS), cfg.time_budget_s / BENCH_ROUNDS))
    return {name: median_of_rounds(rounds) for name, rounds in runs.items()}


def median_of_rounds(rounds: list) -> Dict[str, Any]:
    from ..bench.ort import STAT_KEYS

    merged = copy.deepcopy(rounds[0])
    for i, row in enumerate(merged["results"]):
        for key in STAT_KEYS:
            row[key] = float(statistics.median(r["results"][i][key] for r in rounds))
        row["iterations"] = sum(r["results"][i]["iterations"] for r in rounds)
    merged["environment"]["rounds"] = len(rounds)
    return merged


def p50_smallest(results) -> float:
    rows = [r for r in result_rows(results) if r["provider"] == "cpu"] or result_rows(results)
    return min(rows, key=lambda r: r["batch_size"])["p50_ms"]


def bench_metrics(results: Dict[str, Any], eager) -> Dict[str, float]:
    out: Dict[str, float] = {}
    final = {(r["provider"], r["batch_size"]): r for r in result_rows(results["final"])}
    for (provider, bs), row in final.items():
        out[f"latency_p50_ms.{provider}.bs{bs}"] = row["p50_ms"]
        out[f"throughput.{provider}.bs{bs}"] = row["throughput_img_s"]
        for name in ("teacher", "student"):
            ref = {(r["provider"], r["batch_size"]): r for r in result_rows(results.get(name, []))}.get((provider, bs))
            if ref:
                out[f"speedup_vs_{name}.{provider}.bs{bs}"] = ref["p50_ms"] / row["p50_ms"]
    for r in result_rows(eager or []):
        ort = final.get(("cpu", r["batch_size"]))
        if ort:
            out[f"torch_eager_p50_ms.bs{r['batch_size']}"] = r["p50_ms"]
            out[f"ort_vs_torch_speedup.bs{r['batch_size']}"] = r["p50_ms"] / ort["p50_ms"]
    return out


def latency_table(results: Dict[str, Any], eager) -> str:
    """One line per (model, provider, batch): p50, p90, throughput, and speedups vs the references."""
    from ..bench.ort import format_environment

    refs = {n: {(r["provider"], r["batch_size"]): r["p50_ms"] for r in result_rows(results[n])} for n in results}
    header = f"{'model':<8} {'provider':<8} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>9} {'vs teacher':>10} {'vs student':>10}"
    lines = ["onnxruntime latency (" + format_environment(results["final"]) + ")", header, "-" * len(header)]
    for name in results:
        for r in result_rows(results[name]):
            k = (r["provider"], r["batch_size"])
            ratios = [refs[ref].get(k, 0) / r["p50_ms"] if ref in refs and r["p50_ms"] else None for ref in ("teacher", "student")]
            cells = [f"{x:.2f}x" if x else "-" for x in ratios]
            lines.append(f"{name:<8} {r['provider']:<8} {r['batch_size']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                         f"{r['throughput_img_s']:>9.0f} {cells[0]:>10} {cells[1]:>10}")
    for r in result_rows(eager or []):
        ort = refs["final"].get(("cpu", r["batch_size"]))
        if ort:
            lines.append(f"PyTorch eager, final model, batch {r['batch_size']}: p50 {r['p50_ms']:.3f} ms "
                         f"-> onnxruntime is {r['p50_ms'] / ort:.2f}x faster")
    return "\n".join(lines)
