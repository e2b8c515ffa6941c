"""What the report reads: an experiment's finished compress runs and their reference child runs,
from MLflow, as table rows (COLUMNS; the teacher and unpruned-student references: REF_COLUMNS).
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ToolchainError
from ..tracking import TAG_PREFIX, _sqlite_path, quiet_library_logs, resolve_uri, retry

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
        from ..tracking import RUN_HTTP_ENV, check_http_server

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


def int8_blocks(experiment: str, tracking_uri: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """run name -> the `auto` INT8 candidate's per-block search (from its quantize child run's
    candidates.json artifact), for the compress runs whose quantize stage built it."""
    import json
    import tempfile

    client, _ = client_for(tracking_uri)
    exp = find_experiment(client, experiment)
    parents = parent_runs(client, exp.experiment_id)
    children = child_runs(client, exp.experiment_id, "quantize", [r.info.run_id for r in parents])
    found: Dict[str, Dict[str, Any]] = {}
    for parent in parents:
        child = children.get(parent.info.run_id)
        if child is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = retry(client.download_artifacts, child.info.run_id, "candidates.json", tmp)
                table = json.loads(open(path).read()).get("candidates", [])
            except Exception:  # a run without the artifact (older toolchain): nothing to show
                continue
        searched = [row["auto"] for row in table if isinstance(row, dict) and "auto" in row]
        if searched:
            found[run_row(parent)["run_name"]] = searched[0]
    return found
