"""bench: onnxruntime latency of the exported files (final model and references) in one
interleaved run, plus PyTorch eager on the final model for comparison.

Publish copies the table and numbers into export/<run>/ and derives pe_latency against this
run's references.
"""

from __future__ import annotations

from typing import Any, Dict

from tqdm.auto import tqdm

from ..bench.interleave import interleaved_benchmarks, p50_smallest
from ..bench.ort import result_rows
from ..engine.artifacts import BenchArtifact, StageResult
from ..engine.stage import Job, Stage, StageOutput, register_stage
from ..fsutil import atomic_write_json, atomic_write_text, file_sha256
from .common import REFERENCES, pe_against_references
from .export import cpu_copy

BENCH_ROUNDS = 3  # interleaved timing rounds per model (see bench/interleave.py)


@register_stage
class Bench(Stage):
    name = "bench"
    order = 60
    sections = ("bench",)
    uses_data = False  # times the exported files; their key already covers the data

    def inputs(self, cfg, models, ran):
        return {"export": "export", "model": models[-1], **({"quantize": "quantize"} if "quantize" in ran else {})}

    def compute(self, job: Job) -> StageResult:
        cfg, export = job.cfg.bench, job.inputs["export"]
        files = {role: export.path(art.file) for role, art in export.result.artifacts.items()}
        int8 = job.inputs.get("quantize")
        if int8 is not None and "int8" in int8.result.artifacts:
            files["int8"] = int8.path(int8.result.artifacts["int8"].file)
        tqdm.write(f"[bench] {', '.join(files)}: {BENCH_ROUNDS} interleaved rounds")
        results = interleaved_benchmarks(files, cfg.batch_sizes, rounds=BENCH_ROUNDS, providers=cfg.providers,
                                         intra_op_threads=cfg.intra_op_threads, inter_op_threads=cfg.inter_op_threads,
                                         graph_optimization=cfg.graph_optimization, warmup=cfg.warmup,
                                         iterations=cfg.iterations, time_budget_s=cfg.time_budget_s)
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

    def headline(self, output: StageOutput) -> Dict[str, float]:
        return dict(output.metrics)

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
        final_metrics = run.outputs[final].result.metrics
        pe = pe_against_references(run.outputs, final_metrics, final, latency)
        derived = {k: v for k, v in pe.items() if k.endswith("pe_latency")}
        if "int8" in art.latency_ms:  # same architecture and weights count, its own accuracy and latency
            int8 = {**final_metrics, "test_accuracy": run.outputs["quantize"].result.metrics["int8.test_accuracy"]}
            pe = pe_against_references(run.outputs, int8, final, {**latency, "final": art.latency_ms["int8"]})
            derived.update({f"int8.{k}": v for k, v in pe.items() if k.endswith("pe_latency")})
        return derived


def bench_metrics(results: Dict[str, Any], eager) -> Dict[str, float]:
    """Latency, throughput and speedups of the shipped float model (unprefixed, as the report
    reads them) and of the INT8 model when there is one (prefixed int8.)."""
    out = _model_metrics(results, "final", "")
    if "int8" in results:
        out.update(_model_metrics(results, "int8", "int8.", vs=("teacher", "student", "final")))
    final = _by_key(results["final"])
    for r in result_rows(eager or []):
        ort = final.get(("cpu", r["batch_size"]))
        if ort:
            out[f"torch_eager_p50_ms.bs{r['batch_size']}"] = r["p50_ms"]
            out[f"ort_vs_torch_speedup.bs{r['batch_size']}"] = r["p50_ms"] / ort["p50_ms"]
    return out


def _by_key(results) -> Dict[tuple, dict]:
    return {(r["provider"], r["batch_size"]): r for r in result_rows(results)}


def _model_metrics(results: Dict[str, Any], role: str, prefix: str, vs=("teacher", "student")) -> Dict[str, float]:
    out: Dict[str, float] = {}
    refs = {name: _by_key(results[name]) for name in vs if name in results}
    for (provider, bs), row in _by_key(results[role]).items():
        out[f"{prefix}latency_p50_ms.{provider}.bs{bs}"] = row["p50_ms"]
        out[f"{prefix}throughput.{provider}.bs{bs}"] = row["throughput_img_s"]
        for name, ref in refs.items():
            if (provider, bs) in ref:
                label = "float" if name == "final" else name
                out[f"{prefix}speedup_vs_{label}.{provider}.bs{bs}"] = ref[(provider, bs)]["p50_ms"] / row["p50_ms"]
    return out


def latency_table(results: Dict[str, Any], eager) -> str:
    """One line per (model, provider, batch): p50, p90, throughput, and speedups vs the references."""
    from ..bench.ort import format_environment

    refs = {n: {(r["provider"], r["batch_size"]): r["p50_ms"] for r in result_rows(results[n])} for n in results}
    header = (f"{'model':<8} {'provider':<8} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>9} "
              f"{'vs teacher':>10} {'vs student':>10} {'vs float':>8}")
    lines = ["onnxruntime latency (" + format_environment(results["final"]) + ")", header, "-" * len(header)]
    for name in results:
        for r in result_rows(results[name]):
            k = (r["provider"], r["batch_size"])
            # "vs float" is the INT8 model's column: the float model it was quantized from
            ratios = [refs[ref].get(k, 0) / r["p50_ms"] if ref in refs and ref != name and r["p50_ms"] else None
                      for ref in ("teacher", "student", "final" if name == "int8" else None)]
            cells = [f"{x:.2f}x" if x else "-" for x in ratios]
            lines.append(f"{name:<8} {r['provider']:<8} {r['batch_size']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                         f"{r['throughput_img_s']:>9.0f} {cells[0]:>10} {cells[1]:>10} {cells[2]:>8}")
    for r in result_rows(eager or []):
        ort = refs["final"].get(("cpu", r["batch_size"]))
        if ort:
            lines.append(f"PyTorch eager, final model, batch {r['batch_size']}: p50 {r['p50_ms']:.3f} ms "
                         f"-> onnxruntime is {r['p50_ms'] / ort:.2f}x faster")
    return "\n".join(lines)
