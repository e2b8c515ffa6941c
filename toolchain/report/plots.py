"""The report's plots (matplotlib, imported when a plot is drawn): accuracy against nonzero
parameters and against latency (Pareto front marked), PE by method, accuracy and size over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

from ..stats import spread
from .runs import PE_KEYS, REFS

MARKERS = {"weight": "o", "channel": "s", "none": "D"}


def _styles(rows) -> Dict[str, str]:
    import matplotlib.pyplot as plt

    students = sorted({r["student"] for r in rows})
    cmap = plt.get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(students)}


def _scatter(ax, rows, refs, x_key: str, colors) -> None:
    losses = sorted({r["finetune_loss"] for r in rows})
    for r in rows:
        if r.get(x_key) is None or r.get("test_accuracy") is None:
            continue
        hollow = len(losses) > 1 and r["finetune_loss"] != losses[-1]
        color = colors.get(r["student"], "grey")
        ax.scatter(
            r[x_key],
            r["test_accuracy"],
            marker=MARKERS.get(r["method"], "o"),
            s=60,
            edgecolors=color,
            facecolors="none" if hollow else color,
            linewidths=1.5,
            zorder=3,
        )
    for ref in refs:
        if ref.get(x_key) is None:
            continue
        teacher = ref["role"] == "teacher"
        ax.scatter(
            ref[x_key],
            ref["test_accuracy"],
            marker="*" if teacher else "X",
            s=160 if teacher else 80,
            color="black" if teacher else colors.get(ref["model"], "grey"),
            zorder=4,
        )
    _legend(ax, rows, colors, losses)


def _legend(ax, rows, colors, losses) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=c, label=s) for s, c in colors.items()]
    handles += [
        Line2D([], [], marker=MARKERS.get(m, "o"), ls="", color="grey", label=f"{m} pruning")
        for m in sorted({r["method"] for r in rows})
    ]
    if len(losses) > 1:
        handles += [
            Line2D(
                [],
                [],
                marker="o",
                ls="",
                color="grey",
                markerfacecolor="grey" if loss == losses[-1] else "none",
                label=f"fine-tune {loss}",
            )
            for loss in losses
        ]
    handles += [
        Line2D([], [], marker="*", ls="", color="black", markersize=12, label="teacher"),
        Line2D([], [], marker="X", ls="", color="grey", label="KD student (unpruned)"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="best")


def pareto_front(points: List[Tuple[float, float, Any]]) -> List[Tuple[float, float, Any]]:
    """Points (cost, accuracy, label) no other point beats on both: lower cost and higher accuracy."""
    front, best = [], -math.inf
    for cost, acc, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc, label))
            best = acc
    return front


def plot_acc_vs_params(rows, refs, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    _scatter(ax, rows, refs, "nonzero_params", _styles(rows))
    ax.set_xscale("log")
    ax.set_xlabel("nonzero parameters (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title}: accuracy vs nonzero parameters")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_acc_vs_latency(rows, refs, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    _scatter(ax, rows, refs, "latency_p50_ms", _styles(rows))
    prefix = _common_prefix([r["run_name"] for r in rows])
    points = [
        (r["latency_p50_ms"], r["test_accuracy"], r["run_name"][len(prefix) :])
        for r in rows
        if r.get("latency_p50_ms") is not None
    ]
    points += [
        (r["latency_p50_ms"], r["test_accuracy"], f"{r['model']} ({r['role']})")
        for r in refs
        if r.get("latency_p50_ms") is not None
    ]
    front = pareto_front(points)
    if front:
        ax.step(
            [p[0] for p in front],
            [p[1] for p in front],
            where="post",
            color="red",
            lw=1,
            alpha=0.7,
            label="Pareto front",
        )
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=220, facecolors="none", edgecolors="red", zorder=5)
        for cost, acc, label in front:
            ax.annotate(label, (cost, acc), textcoords="offset points", xytext=(6, -10), fontsize=7, color="red")
    bs = next((r["latency_batch"] for r in rows if r.get("latency_batch")), None)
    ax.set_xlabel(f"onnxruntime CPU p50 latency, ms (batch {bs})")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title}: accuracy vs latency (red: Pareto front)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _common_prefix(names: List[str]) -> str:
    """'study-fmnist-' of study-fmnist-resnet18-weight, ...: labels without what every run shares."""
    import os

    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    return prefix[: prefix.rfind("-") + 1]


def plot_pe(rows, path: Path, title: str) -> None:
    """PE by method and architecture; with several seeds a bar is the mean and its error bar one std."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(REFS), len(PE_KEYS), figsize=(5 * len(PE_KEYS), 3.6 * len(REFS)), squeeze=False)
    for i, ref in enumerate(REFS):
        for j, key in enumerate(PE_KEYS):
            _bar_panel(
                axes[i][j],
                rows,
                f"vs_{ref}.{key}",
                f"{key} vs {'teacher' if ref == 'teacher' else 'KD student'}",
                legend=i == 0 and j == 0,
            )
    fig.suptitle(f"{title}: Performance Efficiency by method and architecture (higher is better{_seeds_note(rows)})")
    _save(fig, path)


def plot_seeds(rows, path: Path, title: str) -> None:
    """Accuracy and deflated ONNX size by method and architecture, mean and one std over seeds."""
    import matplotlib.pyplot as plt

    panels = (("test_accuracy", "test accuracy", 1.0), ("onnx_zip_bytes", "float ONNX, deflated (MB)", 1e6))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        _bar_panel(ax, rows, key, label, legend=key == "test_accuracy", scale=scale)
    accs = [r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None]
    if accs:  # accuracy differences are a few points: start the axis near the data, not at 0
        axes[0][0].set_ylim(max(0.0, min(accs) - 0.05), min(1.0, max(accs) + 0.03))
    fig.suptitle(f"{title}: accuracy and shipped size by method{_seeds_note(rows)}")
    _save(fig, path)


def _seeds_note(rows) -> str:
    seeds = {r.get("seed") for r in rows}
    return f"; mean and one std over {len(seeds)} seeds" if len(seeds) > 1 else ""


def _bar_panel(ax, rows, key: str, label: str, legend: bool, scale: float = 1.0) -> None:
    import numpy as np

    students = sorted({r["student"] for r in rows})
    losses = sorted({r["finetune_loss"] for r in rows})
    groups = sorted({(r["method"], r["finetune_loss"]) for r in rows})
    width = 0.8 / max(1, len(groups))
    for g, (method, loss) in enumerate(groups):
        cells = [
            spread(r.get(key) for r in rows if (r["student"], r["method"], r["finetune_loss"]) == (s, method, loss))
            for s in students
        ]
        means = [np.nan if c is None else c.mean / scale for c in cells]
        errors = [0.0 if c is None or c.std is None else c.std / scale for c in cells]
        ax.bar(
            np.arange(len(students)) + (g - (len(groups) - 1) / 2) * width,
            means,
            width,
            yerr=errors if any(errors) else None,
            capsize=3,
            label=method if len(losses) == 1 else f"{method}, ft {loss}",
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(students)))
    ax.set_xticklabels(students, rotation=20, fontsize=8)
    ax.set_title(label, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
