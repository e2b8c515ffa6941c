"""Export and bench stages: what ships is what was measured.

export: the final model (and, for speedup ratios, the teacher and the unpruned student)
-> ONNX with the parity gate and ONNX-measured test accuracy; the final file is published
as export/<run>/model.onnx with its model card and logged to MLflow.
bench: onnxruntime latency of all of them in one run, plus PyTorch eager for comparison.
"""

from __future__ import annotations

import copy
import shutil
import statistics
from pathlib import Path
from typing import Any, Dict

import torch
from tqdm.auto import tqdm

from . import __version__
from .fsutil import atomic_path, atomic_write_json, atomic_write_text
from .recipe import recipe_hash

REFERENCE_STAGES = {"teacher": "teacher", "student": "distill"}  # artifact name -> model stage
PARITY_BATCH = 64
BENCH_ROUNDS = 3  # interleaved timing rounds per model (see interleaved_benchmarks)


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).cpu().eval()


def _cpu_batches(batches):
    for x, y in batches:
        yield x.cpu(), y.cpu()


def _parity_batch(ctx) -> torch.Tensor:
    x, _ = next(iter(ctx.data.val))
    return x[:PARITY_BATCH].cpu()


def metadata_for(ctx, stage: str) -> Dict[str, Any]:
    """Everything a device needs to feed the model and everything a reviewer needs to trust it."""
    m = ctx.results[stage]["metrics"]
    return {
        "input_name": "input",
        "input_shape": ["batch", *ctx.input_shape],
        "input_dtype": "float32",
        "normalization_mean": list(ctx.data.mean),
        "normalization_std": list(ctx.data.std),
        "preprocessing": ctx.data.preprocessing,
        "class_names": ctx.data.class_names,
        "stage": stage,
        "run_name": ctx.recipe.name,
        "test_accuracy": m["test_accuracy"],
        "params": m["params"],
        "nonzero_params": m["nonzero_params"],
        "macs": m["macs"],
        "performance_efficiency": {k: v for k, v in m.items() if k.startswith("vs_")},
        "recipe_hash": recipe_hash(ctx.recipe),
        "toolchain_version": __version__,
    }


def export_model(ctx, stage: str, path: Path) -> Dict[str, Any]:
    """Export one stage's model, gate on parity, measure its ONNX test accuracy."""
    from .onnx_export import check_parity, export_onnx, onnx_accuracy

    cfg = ctx.recipe.export
    model = _cpu_copy(ctx.models[stage])
    info = export_onnx(model, path, ctx.data.example_batch(2).cpu(), cfg, metadata_for(ctx, stage))
    parity = check_parity(model, path, _parity_batch(ctx), cfg.parity_atol, cfg.parity_min_agreement)
    onnx_acc = onnx_accuracy(path, _cpu_batches(ctx.data.test))
    return {"info": info, "parity": parity, "onnx_test_accuracy": onnx_acc,
            "torch_test_accuracy": ctx.results[stage]["metrics"]["test_accuracy"]}


def export_all(ctx, final: str, stage_dir: Path, run) -> Dict[str, Any]:
    tqdm.write(f"[export] {final} model -> ONNX ({ctx.recipe.export.exporter} exporter, opset {ctx.recipe.export.opset})")
    exported = {"final": export_model(ctx, final, stage_dir / "model.onnx")}
    if ctx.recipe.bench and ctx.recipe.bench.references:
        for name, stage in REFERENCE_STAGES.items():
            if stage in ctx.models and stage != final:
                exported[name] = export_model(ctx, stage, stage_dir / "references" / f"{name}.onnx")
    card = model_card(ctx, final, exported["final"])
    atomic_write_json(stage_dir / "model_card.json", card)
    publish(ctx, stage_dir)
    final_result = exported["final"]
    metrics = {
        "onnx_test_accuracy": final_result["onnx_test_accuracy"],
        "torch_test_accuracy": final_result["torch_test_accuracy"],
        "parity_max_abs_diff": final_result["parity"]["max_abs_diff"],
        "parity_top1_agreement": final_result["parity"]["top1_agreement"],
        "onnx_file_size_bytes": final_result["info"]["file_size_bytes"],
    }
    paths = {"onnx": str(ctx.run_dir / "model.onnx"), "model_card": str(ctx.run_dir / "model_card.json"),
             **{f"reference_{n}": str(stage_dir / "references" / f"{n}.onnx") for n in exported if n != "final"}}
    return {"metrics": metrics, "exported": exported, "final_stage": final, "paths": paths}


def model_card(ctx, stage: str, exported: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "name": ctx.recipe.name,
        "model": ctx.recipe.student.model,
        "stage": stage,
        "dataset": ctx.recipe.data.name,
        **metadata_for(ctx, stage),
        "onnx_test_accuracy": exported["onnx_test_accuracy"],
        "parity": exported["parity"],
        "export": exported["info"],
        "pruning": ctx.recipe.prune.model_dump(mode="json") if ctx.recipe.prune else None,
        "mlflow": ctx.summary.data.get("mlflow"),
    }


def publish(ctx, stage_dir: Path) -> None:
    """Copy the final ONNX + card to export/<run>/ (atomically) and log them to MLflow."""
    from .onnx_export import log_onnx_to_mlflow

    for name in ("model.onnx", "model_card.json"):
        with atomic_path(ctx.run_dir / name) as tmp:
            shutil.copyfile(stage_dir / name, tmp)
    if ctx.tracker.uri is not None:
        log_onnx_to_mlflow(ctx.run_dir / "model.onnx", ctx.data.example_batch(2).cpu().numpy())
        ctx.parent_run.log_artifact(ctx.run_dir / "model_card.json")


# ---------------------------------------------------------------- bench


def bench_all(ctx, stage_dir: Path, run) -> Dict[str, Any]:
    from .stages import pe_against_references

    cfg = ctx.recipe.bench
    export = ctx.results["export"]
    files = {"final": Path(export["paths"]["onnx"])}
    files.update({n: Path(export["paths"][f"reference_{n}"]) for n in REFERENCE_STAGES if f"reference_{n}" in export["paths"]})
    tqdm.write(f"[bench] {', '.join(files)}: {BENCH_ROUNDS} interleaved rounds")
    results = interleaved_benchmarks(files, cfg)
    eager = _torch_eager(ctx) if cfg.compare_torch else None
    metrics = _bench_metrics(results, eager)
    latency = {"final": _p50_smallest(results["final"])}
    for name, stage in REFERENCE_STAGES.items():
        if name in results:
            latency[stage] = _p50_smallest(results[name])
    final_stage = export["final_stage"]
    pe = pe_against_references(ctx, ctx.results[final_stage]["metrics"], latency)
    metrics.update({k: v for k, v in pe.items() if k.endswith("pe_latency")})
    table = latency_table(results, eager)
    atomic_write_text(ctx.run_dir / "latency.txt", table + "\n")
    atomic_write_json(ctx.run_dir / "bench.json", {"onnxruntime": results, "torch_eager": eager})
    run.log_dict({"onnxruntime": results, "torch_eager": eager}, "bench.json")  # the table prints in the final summary
    return {"metrics": metrics, "table": table, "paths": {"bench": str(ctx.run_dir / "bench.json")}}


def interleaved_benchmarks(files: Dict[str, Path], cfg) -> Dict[str, Any]:
    """Time the models in short rounds, in rotated order, and keep the per-row median.

    Timing one model after the other lets a load burst on a shared machine skew one
    side of a speedup ratio; interleaving spreads it over all of them.
    """
    from . import bench

    names = list(files)
    runs: Dict[str, list] = {name: [] for name in names}
    for r in range(BENCH_ROUNDS):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs[name].append(bench.benchmark(
                files[name], cfg.batch_sizes, cfg.providers, cfg.intra_op_threads, cfg.inter_op_threads,
                cfg.graph_optimization, cfg.warmup, max(1, cfg.iterations // BENCH_ROUNDS), cfg.time_budget_s / BENCH_ROUNDS))
    return {name: _median_of_rounds(rounds) for name, rounds in runs.items()}


def _median_of_rounds(rounds: list) -> Dict[str, Any]:
    from .bench import STAT_KEYS

    merged = copy.deepcopy(rounds[0])
    for i, row in enumerate(merged["results"]):
        for key in STAT_KEYS:
            row[key] = float(statistics.median(r["results"][i][key] for r in rounds))
        row["iterations"] = sum(r["results"][i]["iterations"] for r in rounds)
    merged["environment"]["rounds"] = len(rounds)
    return merged


def _torch_eager(ctx) -> Dict[str, Any]:
    from .torch_bench import torch_eager_latency

    cfg = ctx.recipe.bench
    final = ctx.results["export"]["final_stage"]
    return torch_eager_latency(_cpu_copy(ctx.models[final]), ctx.input_shape, cfg.batch_sizes, cfg.warmup,
                               cfg.iterations, cfg.time_budget_s)


def _rows(results) -> list:
    return list(results["results"] if isinstance(results, dict) else results)


def _p50_smallest(results) -> float:
    rows = [r for r in _rows(results) if r["provider"] == "cpu"] or _rows(results)
    return min(rows, key=lambda r: r["batch_size"])["p50_ms"]


def _bench_metrics(results: Dict[str, Any], eager) -> Dict[str, float]:
    out: Dict[str, float] = {}
    final = {(r["provider"], r["batch_size"]): r for r in _rows(results["final"])}
    for (provider, bs), row in final.items():
        out[f"latency_p50_ms.{provider}.bs{bs}"] = row["p50_ms"]
        out[f"throughput.{provider}.bs{bs}"] = row["throughput_img_s"]
        for name in ("teacher", "student"):
            ref = {(r["provider"], r["batch_size"]): r for r in _rows(results.get(name, []))}.get((provider, bs))
            if ref:
                out[f"speedup_vs_{name}.{provider}.bs{bs}"] = ref["p50_ms"] / row["p50_ms"]
    for r in _rows(eager or []):
        ort = final.get(("cpu", r["batch_size"]))
        if ort:
            out[f"torch_eager_p50_ms.bs{r['batch_size']}"] = r["p50_ms"]
            out[f"ort_vs_torch_speedup.bs{r['batch_size']}"] = r["p50_ms"] / ort["p50_ms"]
    return out


def latency_table(results: Dict[str, Any], eager) -> str:
    """One line per (model, provider, batch): p50, p90, throughput, and speedups vs the references."""
    from .bench import format_environment

    refs = {n: {(r["provider"], r["batch_size"]): r["p50_ms"] for r in _rows(results[n])} for n in results}
    header = f"{'model':<8} {'provider':<8} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>9} {'vs teacher':>10} {'vs student':>10}"
    lines = ["onnxruntime latency (" + format_environment(results["final"]) + ")", header, "-" * len(header)]
    for name in results:
        for r in _rows(results[name]):
            k = (r["provider"], r["batch_size"])
            ratios = [refs[ref].get(k, 0) / r["p50_ms"] if ref in refs and r["p50_ms"] else None for ref in ("teacher", "student")]
            cells = [f"{x:.2f}x" if x else "-" for x in ratios]
            lines.append(f"{name:<8} {r['provider']:<8} {r['batch_size']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                         f"{r['throughput_img_s']:>9.0f} {cells[0]:>10} {cells[1]:>10}")
    for r in _rows(eager or []):
        ort = refs["final"].get(("cpu", r["batch_size"]))
        if ort:
            lines.append(f"PyTorch eager, final model, batch {r['batch_size']}: p50 {r['p50_ms']:.3f} ms "
                         f"-> onnxruntime is {r['p50_ms'] / ort:.2f}x faster")
    return "\n".join(lines)
