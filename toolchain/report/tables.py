"""The report's tables: cell formatting, the Markdown report, the CSV files, the weight-vs-channel
comparison, and over repeated seeds the mean +/- std per cell and the paired differences.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..formatting import si
from ..fsutil import atomic_write_text
from ..stats import Paired, Spread, paired, spread
from .runs import COLUMNS, PE_KEYS, REF_COLUMNS, Ratio


def fmt(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, Ratio):
        return value.text()
    if not isinstance(value, (int, float)):
        return str(value)
    if column in ("params", "nonzero_params", "macs"):
        return si(value)
    if column.endswith("_bytes"):
        return f"{value / 1e6:.2f} MB"
    if column == "seed":
        return f"{int(value)}"
    if column in ("test_accuracy",) or column.endswith("retention"):
        return f"{value:.4f}"
    if column.startswith("vs_") or ".pe_" in column:
        return f"{value:.3f}"
    if column in ("latency_p50_ms",):
        return f"{value:.3f}"
    if column in ("speedup_vs_student",):
        return f"{value:.2f}x"
    if column in ("latency_batch", "runs"):
        return f"{int(value)}"
    return f"{value:g}"


def markdown_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt_stat(row.get(c), c) for c in columns) + " |" for row in rows]  # plain values: fmt
    return "\n".join(lines)


def method_comparison(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (dataset, student, finetune loss): weight vs channel on PE (vs teacher), and which is higher."""
    groups: Dict[Tuple[str, str, str], Dict[str, Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["student"], row["finetune_loss"]), {})[row["method"]] = row
    out = []
    for (dataset, student, loss), by_method in groups.items():
        if not {"weight", "channel"} <= set(by_method):
            continue
        entry: Dict[str, Any] = {"dataset": dataset, "student": student, "finetune_loss": loss}
        for key in PE_KEYS:
            w, c = (by_method[m].get(f"vs_teacher.{key}") for m in ("weight", "channel"))
            entry[f"weight.{key}"], entry[f"channel.{key}"] = w, c
            entry[f"{key} winner"] = (
                "-" if w is None or c is None else "weight" if w > c else "channel" if c > w else "tie"
            )
        out.append(entry)
    return out


# ---------------------------------------------------------------- repeats (seeds)

SEED_METRICS = (
    "test_accuracy",
    "vs_teacher.pe_params",
    "vs_teacher.pe_macs",
    "vs_teacher.pe_latency",
    "onnx_zip_bytes",
    "int8_zip_bytes",
)
PAIRED_METRICS = SEED_METRICS[:5]
CONTROL = "none"  # a run without a prune section: the unpruned KD student given the same fine-tune


def _cell(row: Dict[str, Any]) -> Tuple[str, str, str]:
    return (row["dataset"], row["student"], row["finetune_loss"])


def seed_table(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (dataset, student, fine-tune loss, method): each metric's spread over the seeds."""
    groups: Dict[Tuple[str, str, str, str], List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((*_cell(row), row["method"]), []).append(row)
    out = []
    for (dataset, student, loss, method), members in sorted(
        groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])
    ):
        entry: Dict[str, Any] = {
            "dataset": dataset,
            "student": student,
            "finetune_loss": loss,
            "method": method,
            "seeds": len(members),
            "int8_shipped": f"{sum(r.get('int8_zip_bytes') is not None for r in members)}/{len(members)}",
        }
        entry.update({key: spread(r.get(key) for r in members) for key in SEED_METRICS})
        out.append(entry)
    return out


def paired_table(
    rows: List[Dict[str, Any]], a: str, b: str, keys: Sequence[str] = PAIRED_METRICS
) -> List[Dict[str, Any]]:
    """Per (dataset, student, fine-tune loss): method a minus method b, paired by seed, with a 95% interval."""
    by_cell: Dict[Tuple[str, str, str], Dict[str, Dict[Any, Dict[str, Any]]]] = {}
    for row in rows:
        by_cell.setdefault(_cell(row), {}).setdefault(row["method"], {})[row["seed"]] = row
    out = []
    for (dataset, student, loss), methods in sorted(by_cell.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        if a not in methods or b not in methods:
            continue
        entry: Dict[str, Any] = {
            "dataset": dataset,
            "student": student,
            "finetune_loss": loss,
            "comparison": f"{a} - {b}",
        }
        for key in keys:
            entry[key] = paired(
                {s: r.get(key) for s, r in methods[a].items()}, {s: r.get(key) for s, r in methods[b].items()}
            )
        entry["pairs"] = max((d.n for d in entry.values() if isinstance(d, Paired)), default=0)
        out.append(entry)
    return out


def _digits(column: str) -> Tuple[float, int, str]:
    """(scale, digits, unit) for a statistic of a column."""
    if column.endswith("_bytes"):
        return 1e6, 2, " MB"
    if column == "test_accuracy":
        return 1.0, 4, ""
    return 1.0, 3, ""


def fmt_stat(value: Any, column: str) -> str:
    if isinstance(value, Spread):
        scale, digits, unit = _digits(column)
        text = Spread(value.n, value.mean / scale, None if value.std is None else value.std / scale).text(digits)
        return text + unit
    if isinstance(value, Paired):
        scale, digits, unit = _digits(column)
        mean = f"{value.mean / scale:+.{digits}f}{unit}"
        if value.low is None:
            return mean
        mark = "**" if value.low > 0 or value.high < 0 else ""  # bold: the interval excludes 0
        return f"{mark}{mean}{mark} [{value.low / scale:+.{digits}f}, {value.high / scale:+.{digits}f}]"
    return fmt(value, column)


def stat_csv_rows(rows: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Spread/Paired cells flattened into .mean/.std/.n or .diff/.low/.high columns for CSV."""
    flat, columns = [], []
    for row in rows:
        out: Dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, Spread):
                out.update({f"{key}.mean": value.mean, f"{key}.std": value.std, f"{key}.n": value.n})
            elif isinstance(value, Paired):
                out.update({f"{key}.diff": value.mean, f"{key}.low": value.low, f"{key}.high": value.high})
            else:
                out[key] = value
        flat.append(out)
        columns += [k for k in out if k not in columns]
    return flat, columns


def write_csv(path: Path, rows: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    atomic_write_text(path, buffer.getvalue())


def markdown_report(
    experiment: str, rows, refs, plots: Sequence[str], int8: Optional[Dict[str, Dict[str, Any]]] = None
) -> str:
    comparison = [] if _repeated(rows) else method_comparison(rows)  # one run per cell; repeats get the paired tables
    parts = [
        f"# Compression report: experiment `{experiment}`",
        "",
        f"{len(rows)} finished compress runs (newest per run name). Accuracy is top-1 on the test split; params and "
        "MACs are of the final model (nonzero params count weight-pruned zeros out, MACs do not); latency is "
        "onnxruntime CPU p50 at the smallest benchmarked batch. PE = (acc / acc_ref) x (1 - cost / cost_ref) against "
        "the teacher (`vs_teacher`) and the unpruned KD student (`vs_student`).",
        "",
        "## Runs",
        "",
        markdown_table(rows, [c for c in COLUMNS if c != "run_id"]),
    ]
    if refs:
        parts += [
            "",
            "## References (unpruned)",
            "",
            "Latency: median over the runs' benchmarks (each benchmarks its references in the same process).",
            "",
            markdown_table(refs, REF_COLUMNS),
        ]
    if comparison:
        cols = (
            ["dataset", "student", "finetune_loss"]
            + [f"{m}.{k}" for k in PE_KEYS for m in ("weight", "channel")]
            + [f"{k} winner" for k in PE_KEYS]
        )
        parts += ["", "## Weight vs channel pruning (PE vs teacher)", "", markdown_table(comparison, cols)]
    if _repeated(rows):
        parts += seed_sections(rows)
    parts += int8_block_sections(int8 or {})
    parts += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(parts) + "\n"


def _repeated(rows: List[Dict[str, Any]]) -> bool:
    """Several seeds of one cell, or a same-budget control: the study sections apply."""
    cells = [(*_cell(r), r["method"]) for r in rows]
    return len(set(cells)) < len(cells) or any(r["method"] == CONTROL for r in rows)


def seed_sections(rows: List[Dict[str, Any]]) -> List[str]:
    spreads = seed_table(rows)
    keys = ["dataset", "student", "finetune_loss", "method", "seeds"]
    parts = [
        "",
        "## Mean ± standard deviation over seeds",
        "",
        "PE against the teacher. Sizes: the shipped float ONNX file, deflated (zip); INT8: only the runs whose "
        "quantize stage shipped an INT8 file (`int8_shipped` of the seeds). `none`: no pruning, the unpruned KD "
        "student given the same fine-tune (the same-budget control).",
        "",
        markdown_table(spreads, keys + list(SEED_METRICS) + ["int8_shipped"]),
    ]
    for a, b, title in (
        ("weight", "channel", "Weight vs channel pruning"),
        ("weight", CONTROL, "Weight pruning vs the control"),
        ("channel", CONTROL, "Channel pruning vs the control"),
    ):
        table = paired_table(rows, a, b)
        if table:
            parts += [
                "",
                f"## {title}, paired by seed",
                "",
                f"Mean of ({a} - {b}) over the seeds both ran, with its 95% t interval; **bold**: the interval "
                "excludes 0 (the difference is resolved at this number of seeds).",
                "",
                markdown_table(table, ["dataset", "student", "finetune_loss", "comparison", "pairs", *PAIRED_METRICS]),
            ]
    return parts


def int8_block_sections(searches: Dict[str, Dict[str, Any]], top: int = 8) -> List[str]:
    """Per run, why the `auto` INT8 candidate kept which blocks in float: the most sensitive blocks and
    every block whose float fallback was timed (measured, all-INT8 / with it float, per batch size)."""
    if not searches:
        return []
    parts = [
        "",
        "## INT8 layer by layer (`auto`)",
        "",
        "Sensitivity: how much keeping the block in float lowers the logits' relative MSE against float; "
        "fallback: p50 all-INT8 / p50 with the block float, median [95% interval] per batch size "
        "(> 1: faster in float); profiled: the block's INT8 kernel time minus its float kernel time, as a "
        "share of the INT8 model's (per-node profile, summed over batch sizes).",
    ]
    for run, search in sorted(searches.items()):
        blocks = search.get("blocks", [])
        shown = [b for i, b in enumerate(blocks) if i < top or b.get("cost") is not None or b.get("kept_float")]
        rows = [
            {
                "block": b["name"],
                "op": b["op"],
                "sensitivity": _num(b.get("sensitivity"), ".2e"),
                "divergence": _num(b.get("divergence"), ".2e"),
                "val acc, only it float": _num(b.get("alone_val_accuracy"), ".4f"),
                "profiled": _num(b.get("profile_gain"), "+.3f"),
                "fallback": " / ".join(
                    f"bs{bs} {r:.2f}x [{lo:.2f}, {hi:.2f}]"
                    for bs, (r, lo, hi) in (b.get("cost_interval") or {}).items()
                )
                or "-",
                "kept float": ("yes" if b.get("kept_float") else "")
                + (" (runs INT8 anyway)" if b.get("runs_int8") else ""),
            }
            for b in shown
        ]
        parts += ["", f"### {run}", "", search.get("line", ""), "", markdown_table(rows, list(rows[0]) if rows else [])]
    return parts


def _num(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)
