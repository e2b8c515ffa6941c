"""`python -m toolchain report EXPERIMENT`: one table and three plots from MLflow runs.

Reads the finished compress runs (parent runs, tag toolchain.stage=compress) of an
experiment (the newest run per run name), and their teacher / unpruned-student child
runs as references. Writes into --out:
    report.md, report.csv      one row per run: accuracy, params, nonzero params, MACs,
                               ORT latency p50 (smallest batch), PE against the teacher
                               and against the unpruned KD student
    acc_vs_params.png          test accuracy vs nonzero parameters
    acc_vs_latency.png         test accuracy vs ORT p50 latency, Pareto front marked
    pe_by_method.png           PE (params, MACs, latency) by method and architecture
  and when cells repeat over seeds (or a `none` same-budget control ran):
    seeds.csv, paired.csv      mean +/- std per cell; weight - channel and method - control
                               paired by seed, with 95% t intervals (toolchain/stats.py)
    acc_size_by_method.png     accuracy and deflated ONNX size, mean and std over seeds
and logs them to MLflow as the artifacts of a run named `report` in the experiment.
Every number is read from the runs; nothing is recomputed.
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ToolchainError
from .formatting import si
from .fsutil import atomic_write_text, ensure_dir
from .stats import Paired, Spread, paired, spread
from .tracking import TAG_PREFIX, _sqlite_path, quiet_library_logs, resolve_uri, retry

PE_KEYS = ("pe_params", "pe_macs", "pe_latency")
REFS = ("teacher", "student")
COLUMNS = (
    "run_name",
    "dataset",
    "teacher",
    "student",
    "method",
    "sparsity",
    "finetune_loss",
    "seed",
    "test_accuracy",
    "params",
    "nonzero_params",
    "macs",
    "onnx_zip_bytes",
    "int8_zip_bytes",
    "latency_batch",
    "latency_p50_ms",
    "speedup_vs_student",
    "int8_speedup",
    *[f"vs_{ref}.{key}" for ref in REFS for key in ("retention", *PE_KEYS)],
    "run_id",
)
INTERVAL_COLUMNS = ("speedup_vs_student", "int8_speedup")  # each also in the CSV as <name>_lo, <name>_hi
CSV_COLUMNS = (*COLUMNS, *[f"{c}_{end}" for c in INTERVAL_COLUMNS for end in ("lo", "hi")])
REF_COLUMNS = (
    "role",
    "dataset",
    "model",
    "test_accuracy",
    "params",
    "nonzero_params",
    "macs",
    "latency_p50_ms",
    "runs",
)


class ReportError(ToolchainError):
    """The experiment or its runs cannot be reported."""


# ---------------------------------------------------------------- reading MLflow


def client_for(tracking_uri: Optional[str]):
    quiet_library_logs()
    import mlflow

    uri = resolve_uri(tracking_uri)
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ReportError(f"no MLflow store at {uri}; run compress/sweep first or pass --tracking_uri")
    if uri.startswith(("http://", "https://")):
        from .tracking import RUN_HTTP_ENV, check_http_server

        check_http_server(uri)  # a dead server: one line in seconds, not minutes of MLflow's HTTP retries
        for key, value in RUN_HTTP_ENV.items():
            os.environ.setdefault(key, value)  # bounded retries if it dies while the report reads (a value set wins)
    return mlflow.MlflowClient(uri), uri


def find_experiment(client, name: str):
    experiment = retry(client.get_experiment_by_name, name)
    if experiment is None:
        names = [e.name for e in retry(client.search_experiments)]
        raise ReportError(f"MLflow experiment {name!r} not found; experiments: {', '.join(names) or 'none'}")
    return experiment


def parent_runs(client, experiment_id: str) -> List[Any]:
    """Finished compress runs, newest first, one per run name (a rerun replaces the older run)."""
    query = f"tags.`{TAG_PREFIX}stage` = 'compress' and attributes.status = 'FINISHED'"
    runs = _search(client, experiment_id, query)
    newest: Dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        newest.setdefault(run.data.tags.get(f"{TAG_PREFIX}run_name", run.info.run_name), run)
    return sorted(newest.values(), key=lambda r: r.info.start_time)


def child_runs(client, experiment_id: str, stage: str, parent_ids: Sequence[str]) -> Dict[str, Any]:
    """parent run id -> its child run of `stage`."""
    wanted = set(parent_ids)
    runs = _search(client, experiment_id, f"tags.`{TAG_PREFIX}stage` = '{stage}'")
    return {r.data.tags["mlflow.parentRunId"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") in wanted}


def _search(client, experiment_id: str, query: str) -> List[Any]:
    runs, token = [], None
    while True:
        page = retry(client.search_runs, [experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# ---------------------------------------------------------------- rows


def smallest_batch(metrics: Dict[str, float], provider: str = "cpu") -> Optional[int]:
    batches = [int(m.group(1)) for k in metrics if (m := re.fullmatch(rf"latency_p50_ms\.{provider}\.bs(\d+)", k))]
    return min(batches) if batches else None


class Ratio(float):
    """A measured speedup that carries its 95% interval (bench/compare.py) into the report's tables."""

    def __new__(cls, value: float, low: Optional[float], high: Optional[float]):
        obj = super().__new__(cls, value)
        obj.low, obj.high = low, high
        return obj

    def text(self) -> str:
        if self.low is None or self.high is None:
            return f"{float(self):.2f}x"
        return f"{float(self):.2f}x [{self.low:.2f}, {self.high:.2f}]"


def _ratio(metrics: Dict[str, float], name: str) -> Optional[Ratio]:
    """A logged speedup with its _lo / _hi (runs of 0.4 and earlier logged none)."""
    if name not in metrics:
        return None
    return Ratio(metrics[name], metrics.get(f"{name}_lo"), metrics.get(f"{name}_hi"))


def _int8_batches(metrics: Dict[str, float]) -> List[int]:
    """Batch sizes of the quantize stage's speedups (int8.speedup.bs<N>), logged when INT8 shipped."""
    return [int(m.group(1)) for k in metrics if (m := re.fullmatch(r"int8\.speedup\.bs(\d+)", k))]


def run_row(run) -> Dict[str, Any]:
    """One table row from a parent run: final.* metrics, bench metrics, recipe params, tags."""
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    bs = smallest_batch(m)
    row: Dict[str, Any] = {
        "run_name": t.get(f"{TAG_PREFIX}run_name", run.info.run_name),
        "dataset": t.get("dataset"),
        "teacher": t.get("teacher"),
        "student": t.get("student"),
        "method": t.get("prune.method"),
        "sparsity": _number(t.get("prune.sparsity"))
        if t.get("prune.sparsity") != "budget"
        else m.get("prune.budget.sparsity"),
        "finetune_loss": p.get("finetune.loss") if p.get("finetune.loss") not in (None, "None") else "none",
        "seed": _number(p.get("seed")),
        "test_accuracy": m.get("final.test_accuracy"),
        "params": m.get("final.params"),
        "nonzero_params": m.get("final.nonzero_params"),
        "macs": m.get("final.macs"),
        "onnx_zip_bytes": m.get(
            "onnx_zip_bytes"
        ),  # the shipped float file, deflated: where weight pruning's zeros show
        "int8_zip_bytes": m.get("int8.zip_bytes"),  # only when the quantize stage shipped an INT8 file
        "latency_batch": bs,
        "latency_p50_ms": m.get(f"latency_p50_ms.cpu.bs{bs}") if bs else None,
        "speedup_vs_student": _ratio(m, f"speedup_vs_student.cpu.bs{bs}") if bs else None,
        "int8_speedup": _ratio(m, f"int8.speedup.bs{min(_int8_batches(m))}") if _int8_batches(m) else None,
        "run_id": run.info.run_id,
    }
    for ref in REFS:
        for key in ("retention", "pe_params", "pe_macs"):
            row[f"vs_{ref}.{key}"] = m.get(f"final.vs_{ref}.{key}")
        row[f"vs_{ref}.pe_latency"] = m.get(f"vs_{ref}.pe_latency")  # logged by the bench stage
    for column in INTERVAL_COLUMNS:
        value = row[column]
        row[f"{column}_lo"], row[f"{column}_hi"] = (value.low, value.high) if value is not None else (None, None)
    return row


def reference_rows(parents: List[Any], children: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The teacher(s) and the unpruned KD students; latency = speedup x the run's p50, median over runs."""
    groups: Dict[Tuple[str, str, str, float, float], List[Tuple[Any, Any]]] = {}
    for parent in parents:
        for role, stage in (("teacher", "teacher"), ("KD student", "distill")):
            child = children[stage].get(parent.info.run_id)
            if child is None or "test_accuracy" not in child.data.metrics:
                continue
            cm = child.data.metrics
            model = parent.data.tags.get("teacher" if stage == "teacher" else "student")
            key = (role, parent.data.tags.get("dataset"), model, cm["test_accuracy"], cm.get("params"))
            groups.setdefault(key, []).append((parent, child))
    rows = []
    for (role, dataset, model, acc, params), members in groups.items():
        cm = members[0][1].data.metrics
        ref = "teacher" if role == "teacher" else "student"
        latencies = [lat for parent, _ in members if (lat := _reference_latency(parent.data.metrics, ref)) is not None]
        rows.append(
            {
                "role": role,
                "dataset": dataset,
                "model": model,
                "test_accuracy": acc,
                "params": params,
                "nonzero_params": cm.get("nonzero_params"),
                "macs": cm.get("macs"),
                "latency_p50_ms": _median(latencies),
                "runs": len(members),
            }
        )
    return sorted(rows, key=lambda r: (r["dataset"] or "", r["role"] != "teacher", r["model"] or ""))


def _reference_latency(metrics: Dict[str, float], ref: str) -> Optional[float]:
    bs = smallest_batch(metrics)
    if bs is None or f"speedup_vs_{ref}.cpu.bs{bs}" not in metrics:
        return None
    return metrics[f"speedup_vs_{ref}.cpu.bs{bs}"] * metrics[f"latency_p50_ms.cpu.bs{bs}"]


def _median(values: List[float]) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _number(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def collect(experiment: str, tracking_uri: Optional[str] = None):
    """(experiment, run rows, reference rows, tracking uri) for an experiment name."""
    client, uri = client_for(tracking_uri)
    exp = find_experiment(client, experiment)
    parents = parent_runs(client, exp.experiment_id)
    if not parents:
        raise ReportError(
            f"experiment {experiment!r} has no finished compress runs; run `python -m toolchain sweep RECIPE` first"
        )
    ids = [r.info.run_id for r in parents]
    children = {stage: child_runs(client, exp.experiment_id, stage, ids) for stage in ("teacher", "distill")}
    return exp, [run_row(r) for r in parents], reference_rows(parents, children), uri


# ---------------------------------------------------------------- tables


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


def markdown_report(experiment: str, rows, refs, plots: Sequence[str]) -> str:
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


# ---------------------------------------------------------------- plots

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


# ---------------------------------------------------------------- entry point


def make_report(
    experiment: str, out: str | Path = "docs/report", tracking_uri: Optional[str] = None, log_to_mlflow: bool = True
) -> Dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    exp, rows, refs, uri = collect(experiment, tracking_uri)
    out = ensure_dir(out, "--out")
    files = {
        "acc_vs_params": out / "acc_vs_params.png",
        "acc_vs_latency": out / "acc_vs_latency.png",
        "pe_by_method": out / "pe_by_method.png",
    }
    plot_acc_vs_params(rows, refs, files["acc_vs_params"], experiment)
    plot_acc_vs_latency(rows, refs, files["acc_vs_latency"], experiment)
    plot_pe(rows, files["pe_by_method"], experiment)
    plots = [files[k] for k in ("acc_vs_params", "acc_vs_latency", "pe_by_method")]
    if _repeated(rows):
        files["seeds"] = out / "acc_size_by_method.png"
        plot_seeds(rows, files["seeds"], experiment)
        plots.append(files["seeds"])
        for name, table in (
            ("seeds.csv", seed_table(rows)),
            (
                "paired.csv",
                [
                    e
                    for a, b in (("weight", "channel"), ("weight", CONTROL), ("channel", CONTROL))
                    for e in paired_table(rows, a, b)
                ],
            ),
        ):
            flat, columns = stat_csv_rows(table)
            files[name] = out / name
            write_csv(files[name], flat, columns)
    files["csv"] = out / "report.csv"
    files["references_csv"] = out / "references.csv"
    files["markdown"] = out / "report.md"
    write_csv(files["csv"], rows, CSV_COLUMNS)
    write_csv(files["references_csv"], refs, REF_COLUMNS)
    atomic_write_text(files["markdown"], markdown_report(experiment, rows, refs, plots))
    if log_to_mlflow:
        files_run = log_report(uri, exp.experiment_id, list(files.values()), len(rows))
        print(f"[report] logged to MLflow run {files_run} (experiment {experiment})")
    print(f"[report] {len(rows)} runs -> {files['markdown']}, {files['csv']} and {len(plots)} plots in {out}")
    return files


def log_report(uri: str, experiment_id: str, files: List[Path], n_runs: int) -> str:
    """A run named `report` (tag toolchain.stage=report) holding the report files as artifacts."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = retry(
        client.create_run,
        experiment_id,
        run_name="report",
        tags={f"{TAG_PREFIX}stage": "report", f"{TAG_PREFIX}report_runs": str(n_runs)},
    )
    try:
        for path in files:
            retry(client.log_artifact, run.info.run_id, str(path), "report")
    except BaseException:
        retry(client.set_terminated, run.info.run_id, "FAILED")
        raise
    retry(client.set_terminated, run.info.run_id, "FINISHED")
    return run.info.run_id
