"""bench: onnxruntime latency of the exported files (final model, references, the INT8 file)
measured by the paired comparison of bench/compare.py: every ratio column (vs teacher, vs student,
vs float) is a median over fresh-process replicates with its 95% interval; p50 is the median of the
replicates' medians, p90/p99 are over every timed call. PyTorch eager on the final model is timed
for comparison.

Publish copies the table and numbers into export/<run>/ and derives pe_latency (with its interval)
against this run's references.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

from tqdm.auto import tqdm

from ..bench.compare import Comparison, Settings, compare, p50_smallest
from ..bench.ort import PROVIDERS, result_rows
from ..engine.artifacts import BenchArtifact, StageResult
from ..engine.stage import MODELS, Job, Sections, Stage, StageOutput, register_stage
from ..fsutil import atomic_write_json, atomic_write_text, file_sha256
from .common import REFERENCES, cpu_copy, int8_roles, latency_plan, pe_against_references, reference_reads, shipped_int8

if TYPE_CHECKING:  # annotations only
    from ..engine.context import Publication
    from ..tracking import StageRun

# ratio columns: (baseline, candidate); the INT8 file is also compared with the float file it came from
COLUMNS = (("teacher", "final"), ("student", "final"), ("teacher", "int8"), ("student", "int8"), ("final", "int8"))
LABELS = {"teacher": "teacher", "student": "student", "final": "float"}
REVISION = 2  # 2: ratios from replicated paired blocks with intervals (1: three interleaved rounds)


@register_stage
class Bench(Stage):
    name = "bench"
    consumes = ("export", "quantize", "qad", MODELS)  # quantize / qad: the INT8 file is timed next to the float one
    requires = {"export": "it measures the exported ONNX file"}
    sections = ("bench",)
    uses_data = False  # times the exported files; their key already covers the data
    revision = {"bench_revision": REVISION}

    def inputs(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        return {"export": "export", "model": models[-1], **int8_roles(ran)}

    def reads(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        return reference_reads(models)  # pe_latency against the teacher and the KD student

    def compute(self, job: Job) -> StageResult:
        cfg, export = job.cfg.bench, job.inputs["export"]
        files = {role: export.path(art.file) for role, art in export.result.artifacts.items()}
        int8 = shipped_int8(job.inputs)
        if int8 is not None:
            files["int8"] = int8[0].path(int8[1].file)
        pairs = [p for p in COLUMNS if p[0] in files and p[1] in files]
        results, comparisons = measure(files, pairs, cfg)
        eager = None
        if cfg.compare_torch:
            from ..bench.torch_eager import torch_eager_latency

            shape = tuple(export.result.artifacts["final"].metadata["input_shape"][1:])
            eager = torch_eager_latency(
                cpu_copy(job.inputs["model"].model),
                shape,
                cfg.batch_sizes,
                cfg.warmup,
                cfg.iterations,
                cfg.time_budget_s,
            )
        path = job.stage_dir / "bench.json"
        atomic_write_json(
            path,
            {
                "onnxruntime": results,
                "torch_eager": eager,
                "comparisons": {p: c.summary() for p, c in comparisons.items()},
            },
        )
        art = BenchArtifact(path.name, {role: p50_smallest(r) for role, r in results.items()}, file_sha256(path))
        metrics = bench_metrics(results, eager, comparisons)
        return StageResult(
            metrics, artifacts={"bench": art}, info={"table": latency_table(results, eager, comparisons)}
        )

    def summary_lines(self, entry: Dict[str, Any]) -> List[str]:
        return ["", entry["info"]["table"]]

    def headline(self, output: StageOutput) -> Dict[str, float]:
        return dict(output.metrics)

    def publish(self, pub: Publication, output: StageOutput, child: StageRun) -> Dict[str, float]:
        art = output.result.artifacts["bench"]
        files = {"latency.txt": pub.run_dir / "latency.txt", "bench.json": pub.run_dir / "bench.json"}
        atomic_write_text(files["latency.txt"], output.result.info["table"] + "\n")
        atomic_write_text(files["bench.json"], output.path(art.file).read_text())
        child.log_artifact(output.path(art.file))
        pub.summary.add_files(files)
        model = pub.inputs["model"]  # the model the exported final file came from
        derived = pe_latency(pub.inputs, model.result.metrics, model.name, output.metrics, "")
        if "int8" in art.latency_ms:  # same architecture and weights count, its own accuracy and latency
            int8 = {
                **model.result.metrics,
                "test_accuracy": shipped_int8(pub.inputs)[1].onnx_test_accuracy,
            }
            derived.update(pe_latency(pub.inputs, int8, model.name, output.metrics, "int8."))
        return derived


def pe_latency(
    outputs, model_metrics: Dict[str, float], own_stage: str, bench: Dict[str, float], prefix: str
) -> Dict[str, float]:
    """pe_latency = retention x (1 - 1 / speedup) at the smallest CPU batch, for the measured speedup
    and for both ends of its interval (keys ..pe_latency, ..pe_latency_lo, ..pe_latency_hi)."""
    batches = sorted(int(k.rsplit("bs", 1)[1]) for k in bench if k.startswith(f"{prefix}latency_p50_ms.cpu.bs"))
    if not batches:
        return {}
    out: Dict[str, float] = {}
    for end in ("", "_lo", "_hi"):
        speedups = {
            stage: bench.get(f"{prefix}speedup_vs_{label}.cpu.bs{batches[0]}{end}")
            for label, stage in REFERENCES.items()
        }
        latency = {"final": 1.0, **{stage: v for stage, v in speedups.items() if v}}  # ratios stand in for p50s
        pe = pe_against_references(outputs, model_metrics, own_stage, latency)
        out.update({f"{prefix}{k}{end}": v for k, v in pe.items() if k.endswith("pe_latency")})
    return out


def measure(files: Dict[str, Any], pairs: List[Tuple[str, str]], cfg) -> Tuple[Dict[str, Any], Dict[str, Comparison]]:
    """One comparison per provider; per model, ort.benchmark-style results from its timed calls."""
    settings, plan = latency_plan(cfg)
    comparisons: Dict[str, Comparison] = {}
    results: Dict[str, Any] = {role: {"model": str(path), "results": []} for role, path in files.items()}
    for provider in cfg.providers:
        tqdm.write(
            f"[bench] {provider}: {', '.join(files)}; ratios {', '.join(f'{a}/{b}' for a, b in pairs) or '-'} "
            f"at batch {', '.join(map(str, cfg.batch_sizes))}, replicated in fresh processes"
        )
        c = compare(
            files,
            pairs,
            cfg.batch_sizes,
            _with_provider(settings, provider),
            plan,
            progress=lambda line, p=provider: tqdm.write(f"[bench] {p} {line}"),
        )
        comparisons[provider] = c
        for role in files:
            results[role]["results"] += c.stats(role)
            results[role]["environment"] = {
                **c.environment,
                "providers_active": {provider: [PROVIDERS[provider]]},
                "replicates": len(c.replicates),
                "stopped": c.stopped,
            }
    return results, comparisons


def _with_provider(settings: Settings, provider: str) -> Settings:
    from dataclasses import replace

    return replace(settings, provider=provider)


def bench_metrics(results: Dict[str, Any], eager, comparisons: Dict[str, Comparison]) -> Dict[str, float]:
    """Latency, throughput and speedups (each with _lo / _hi, its 95% interval) of the shipped float
    model (unprefixed, as the report reads them) and of the INT8 model (prefixed int8.)."""
    out: Dict[str, float] = {}
    for role, prefix in (("final", ""), ("int8", "int8.")):
        for r in result_rows(results.get(role, [])):
            out[f"{prefix}latency_p50_ms.{r['provider']}.bs{r['batch_size']}"] = r["p50_ms"]
            out[f"{prefix}throughput.{r['provider']}.bs{r['batch_size']}"] = r["throughput_img_s"]
    for provider, c in comparisons.items():
        for (base, cand, bs), iv in c.intervals().items():
            name = f"{'int8.' if cand == 'int8' else ''}speedup_vs_{LABELS[base]}.{provider}.bs{bs}"
            out.update({name: iv.ratio, f"{name}_lo": iv.low, f"{name}_hi": iv.high})
    final = {r["batch_size"]: r for r in result_rows(results["final"]) if r["provider"] == "cpu"}
    for r in result_rows(eager or []):
        ort = final.get(r["batch_size"])
        if ort:
            out[f"torch_eager_p50_ms.bs{r['batch_size']}"] = r["p50_ms"]
            out[f"ort_vs_torch_speedup.bs{r['batch_size']}"] = r["p50_ms"] / ort["p50_ms"]
    return out


OTHER_LOAD_NOTE = 0.25  # CPUs kept busy by other processes, on average, above which the table says so


def _load_note(c: Comparison) -> str:
    """Other processes distort wall-clock ratios: say so where the numbers are read. Measured as the CPU
    time other processes used during the comparison (bench/compare.py other_cpu_load); where that is not
    available (not Linux), the 1-minute load average above the core count, which counts the
    comparison's own threads too."""
    other = c.environment.get("other_cpu_load")
    if other is not None:
        return (
            f"; machine shared (other processes kept {other:.2f} CPUs busy on average): re-measure on a quiet one"
            if other > OTHER_LOAD_NOTE
            else ""
        )
    load, cores = c.environment.get("load_average", {}), c.environment.get("cpu_affinity") or 1
    peak = max((v for v in load.values() if v is not None), default=None)
    return (
        f"; machine loaded (load average {peak:.1f} on {cores} CPUs): re-measure on a quiet one"
        if peak and peak > cores
        else ""
    )


def latency_table(results: Dict[str, Any], eager, comparisons: Dict[str, Comparison]) -> str:
    """One line per (model, provider, batch): p50, p90, throughput, and each ratio with its interval."""
    from ..bench.ort import format_environment

    header = (
        f"{'model':<8} {'provider':<8} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>9} "
        f"{'vs teacher':>18} {'vs student':>18} {'vs float':>18}"
    )
    lines = ["onnxruntime latency (" + format_environment(results["final"]) + ")", header, "-" * len(header)]
    for name in results:
        for r in result_rows(results[name]):
            c = comparisons[r["provider"]]
            cells = [
                c.ratio(ref, name, r["batch_size"]).text() if (ref, name) in c.pairs else "-"
                for ref in ("teacher", "student", "final")
            ]
            lines.append(
                f"{name:<8} {r['provider']:<8} {r['batch_size']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                f"{r['throughput_img_s']:>9.0f} {cells[0]:>18} {cells[1]:>18} {cells[2]:>18}"
            )
    for provider, c in comparisons.items():
        lines.append(
            f"{provider}: ratio = median over {c.replicates_text()} [95% interval], "
            f"stopped: {c.stopped} ({c.elapsed_s:.0f} s){_load_note(c)}"
        )
    final = {r["batch_size"]: r["p50_ms"] for r in result_rows(results["final"]) if r["provider"] == "cpu"}
    for r in result_rows(eager or []):
        ort = final.get(r["batch_size"])
        if ort:
            lines.append(
                f"PyTorch eager, final model, batch {r['batch_size']}: p50 {r['p50_ms']:.3f} ms "
                f"-> onnxruntime is {r['p50_ms'] / ort:.2f}x faster (one process, no interval)"
            )
    return "\n".join(lines)
