"""Interleaved latency rounds: several ONNX files timed in rotated order, per-row medians.
Torch-free, like ort.py."""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any, Dict, Sequence

from .ort import STAT_KEYS, benchmark, result_rows


def interleaved_benchmarks(files: Dict[str, Path], batch_sizes: Sequence[int], *, rounds: int = 3,
                           providers: Sequence[str] = ("cpu",), intra_op_threads: int = 0, inter_op_threads: int = 1,
                           graph_optimization: str = "all", warmup: int = 10, iterations: int = 200,
                           time_budget_s: float = 3.0) -> Dict[str, Any]:
    """Time the models in short rounds, in rotated order, and keep the per-row median.

    Timing one model after the other lets a load burst on a shared machine skew one
    side of a speedup ratio; interleaving spreads it over all of them. iterations and
    time_budget_s are totals per model and batch size, split over the rounds.
    """
    names = list(files)
    runs: Dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs[name].append(benchmark(
                files[name], batch_sizes, providers, intra_op_threads, inter_op_threads, graph_optimization,
                warmup, max(1, iterations // rounds), time_budget_s / rounds))
    return {name: median_of_rounds(runs_of) for name, runs_of in runs.items()}


def median_of_rounds(rounds: list) -> Dict[str, Any]:
    merged = copy.deepcopy(rounds[0])
    for i, row in enumerate(merged["results"]):
        for key in STAT_KEYS:
            row[key] = float(statistics.median(r["results"][i][key] for r in rounds))
        row["iterations"] = sum(r["results"][i]["iterations"] for r in rounds)
    merged["environment"]["rounds"] = len(rounds)
    return merged


def p50_smallest(results) -> float:
    """p50 at the smallest CPU batch (the latency PE uses), else the smallest batch of any provider."""
    rows = [r for r in result_rows(results) if r["provider"] == "cpu"] or result_rows(results)
    return min(rows, key=lambda r: r["batch_size"])["p50_ms"]
