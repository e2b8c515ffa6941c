"""Attach a device's latency to the compress run that shipped the model it timed.

    python -m toolchain.bench export/RUN/model.onnx --json DEVICE.json      # on the device
    python -m toolchain attach RUN DEVICE.json [--tracking-uri URI] [--experiment NAME]

RUN is a run name (the newest FINISHED compress run of that name) or a parent run id. The JSON's
model sha256 must be one of the files the run shipped (tags toolchain.sha256.model.onnx and
toolchain.sha256.model_int8.onnx, recorded when they were published), so a device's numbers cannot
land on another model's run. On the parent run it logs, with .int8 after the name for the INT8 file:

    device.<name>.latency_p50_ms.<provider>.bs<N>, .latency_p90_ms..., .throughput...
    device.<name>.vs_teacher.pe_latency, .vs_student.pe_latency   when the JSON also times the run's
                                            reference files (bench --reference teacher=PATH ...)
    artifact device/<name>.json (device/<name>.int8.json), tag device.<name>.cpu

Everything is checked before the first MLflow write: a refused JSON logs nothing. Torch-free, and
mlflow is imported only when called: the bench's --mlflow-run-id logs through here from the device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ToolchainError, first_line, run_command

# the run's shipped files, and the ORT-format ones of its device package (reduced onnxruntime builds time those)
SHIPPED = ("model.onnx", "model_int8.onnx", "package/model.ort", "package/model_int8.ort")
SHA_TAG = "toolchain.sha256."  # + shipped file name, or reference.<role>
REFERENCE_ROLES = ("teacher", "student")
RUN_ID = re.compile(r"[0-9a-f]{32}")
SHA256 = re.compile(r"[0-9a-f]{64}")
KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a piece of an MLflow metric name, no dots
ROW_NUMBERS = ("p50_ms", "p90_ms", "throughput_img_s")
# what one timed run of a model on a device can plausibly take: from a microsecond to an hour (ms), and what
# it can plausibly process (images / s); outside, the JSON was edited or the clock broke, and a ratio of two
# such numbers (pe_latency) overflows to a non-finite metric
LATENCY_MS_RANGE = (1e-3, 3.6e6)
THROUGHPUT_RANGE = (1e-4, 1e9)
HOW_TO_BENCH = "python -m toolchain.bench MODEL.onnx --json FILE"


class AttachError(ToolchainError):
    """A device JSON cannot be attached to the run asked for."""


# ---------------------------------------------------------------- the JSON


def load_device_json(path: str) -> Dict[str, Any]:
    """The bench's --json file, checked: a device section, a model sha256, well-formed rows."""
    file = Path(path)
    if not file.is_file():
        raise AttachError(f"{path}: device JSON not found; pass the file written on the device by {HOW_TO_BENCH}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AttachError(
            f"{path}: not valid JSON ({first_line(exc, 120)}); pass the file {HOW_TO_BENCH} wrote, "
            "unedited (copy it again if the transfer was cut)"
        ) from None
    except OSError as exc:
        raise AttachError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from None
    check_device_json(data, path)
    return data


def check_device_json(data: Any, where: str) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("device"), dict):
        raise AttachError(
            f"{where}: no device section (an older toolchain's bench, or another tool's JSON); "
            f"rerun {HOW_TO_BENCH} with this toolchain on the device"
        )
    device = data["device"]
    if not SHA256.fullmatch(str(device.get("model_sha256", ""))):
        raise AttachError(
            f"{where}: device.model_sha256 is missing or not a sha256; rerun {HOW_TO_BENCH} on the device"
        )
    if not KEY_PART.fullmatch(str(device.get("name", ""))):
        raise AttachError(
            f"{where}: device.name {device.get('name')!r} is not a device name (1-64 letters, digits, "
            "'-' or '_'); rerun the bench with --name NAME"
        )
    check_rows(data.get("results"), f"{where}: results")
    refs = data.get("references") or {}
    if not isinstance(refs, dict):
        raise AttachError(f"{where}: references is not an object; rerun the bench with --reference ROLE=PATH")
    for role, entry in refs.items():
        if role not in REFERENCE_ROLES or not isinstance(entry, dict):
            raise AttachError(f"{where}: unknown reference {role!r}; the bench writes {', '.join(REFERENCE_ROLES)}")
        check_rows(entry.get("results"), f"{where}: references.{role}.results")


def check_rows(rows: Any, where: str) -> None:
    if not isinstance(rows, list) or not rows:
        raise AttachError(f"{where}: missing or empty; rerun {HOW_TO_BENCH} on the device")
    for i, row in enumerate(rows):
        ok = (
            isinstance(row, dict)
            and KEY_PART.fullmatch(str(row.get("provider", "")))
            and isinstance(row.get("batch_size"), int)
            and row["batch_size"] >= 1
            and all(_positive(row.get(k)) for k in ROW_NUMBERS)
        )
        if not ok:
            raise AttachError(
                f"{where}[{i}] lacks a provider, batch_size or positive {', '.join(ROW_NUMBERS)}; "
                f"pass the file {HOW_TO_BENCH} wrote, unedited"
            )
        for key, (low, high) in (
            ("p50_ms", LATENCY_MS_RANGE),
            ("p90_ms", LATENCY_MS_RANGE),
            ("throughput_img_s", THROUGHPUT_RANGE),
        ):
            if not low <= row[key] <= high:
                raise AttachError(
                    f"{where}[{i}].{key} is {row[key]:g}, outside what a device measures ({low:g} to "
                    f"{high:g}); nothing logged: pass the file {HOW_TO_BENCH} wrote, unedited"
                )
        if row["p90_ms"] < row["p50_ms"]:
            raise AttachError(
                f"{where}[{i}]: p90_ms {row['p90_ms']:g} is below p50_ms {row['p50_ms']:g}; nothing "
                f"logged: pass the file {HOW_TO_BENCH} wrote, unedited"
            )


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# ---------------------------------------------------------------- the run


def open_store(uri: Optional[str]):
    """An MlflowClient on the store holding the run; creates nothing there."""
    if importlib.util.find_spec("mlflow") is None:
        raise AttachError(
            "mlflow is not installed in this Python; pip install mlflow-skinny (enough to log to a "
            "tracking server), or copy the --json file to a machine with the toolchain and run: "
            "python -m toolchain attach RUN FILE"
        )
    from .tracking import open_existing_store

    return open_existing_store(uri)


def find_run(client, ref: str, experiment: Optional[str] = None):
    """The compress parent run `ref` names: a parent run id, else the newest FINISHED run of that name."""
    from .tracking import mask_uri, retry

    ids = _experiment_ids(client, experiment)
    if RUN_ID.fullmatch(ref):
        run = _get_run(client, ref)
        if run is not None and run.data.tags.get("toolchain.stage") == "compress" and run.info.experiment_id in ids:
            if run.info.status != "FINISHED":  # its shipped files may be half published, or another run's
                raise AttachError(
                    f"run {ref} is {run.info.status}, not FINISHED: what it shipped is not final; "
                    "attach to a finished compress run (rerun compress, then bench its model)"
                )
            return run
    if ids and "'" not in ref:
        query = f"tags.`toolchain.run_name` = '{ref}' and tags.`toolchain.stage` = 'compress' and attributes.status = 'FINISHED'"
        found = retry(client.search_runs, ids, query, max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            return found[0]
    where = mask_uri(client.tracking_uri) + (f", experiment {experiment!r}" if experiment else "")
    raise AttachError(
        f"run {ref!r}: no finished compress run of that name and no parent run with that id in {where}; "
        "check the name or id (export/<run>/summary.json: mlflow.parent_run_id) and --tracking-uri / --experiment"
    )


def _experiment_ids(client, experiment: Optional[str]) -> List[str]:
    from .tracking import mask_uri, retry

    if experiment is None:
        return [e.experiment_id for e in retry(client.search_experiments, max_results=1000)]
    found = retry(client.get_experiment_by_name, experiment)
    if found is None:
        raise AttachError(
            f"experiment {experiment!r} not found in {mask_uri(client.tracking_uri)}; pass the recipe's "
            "tracking.experiment, or leave --experiment out to search them all"
        )
    return [found.experiment_id]


def _get_run(client, run_id: str):
    from .tracking import retry

    try:
        return retry(client.get_run, run_id)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST: then it may still be a run name
        return None


def shipped_file(run, sha: str, where: str) -> str:
    """Which of the run's shipped files the JSON timed; refuses any other model."""
    name = run.data.tags.get("toolchain.run_name", run.info.run_id)
    recorded = {f: run.data.tags[SHA_TAG + f] for f in SHIPPED if run.data.tags.get(SHA_TAG + f)}
    if not recorded:
        raise AttachError(
            f"run {name} ({run.info.run_id}) has no sha256 of its shipped files (compressed by a toolchain "
            "before attach, or without an export section); rerun compress, then bench its new model.onnx"
        )
    for file, digest in recorded.items():
        if digest == sha:
            return file
    shipped = ", ".join(f"{f} {d[:12]}" for f, d in recorded.items())
    raise AttachError(
        f"{where}: it timed a model with sha256 {sha[:12]}, which run {name} did not ship ({shipped}); "
        f"bench export/{name}/model.onnx (or model_int8.onnx) of this run on the device and attach that JSON"
    )


def check_references(run, data: Dict[str, Any], where: str) -> None:
    """Reference timings count only for this run's own teacher / student ONNX files."""
    name = run.data.tags.get("toolchain.run_name", run.info.run_id)
    for role, entry in (data.get("references") or {}).items():
        recorded = run.data.tags.get(f"{SHA_TAG}reference.{role}")
        if entry.get("sha256") != recorded:
            raise AttachError(
                f"{where}: references.{role} timed a file (sha256 {str(entry.get('sha256'))[:12]}) that is "
                f"not run {name}'s {role} ONNX file; bench the one in export/{name}/summary.json "
                f"(stages.export.paths.{role}) with --reference {role}=PATH"
            )


# ---------------------------------------------------------------- metrics


def latency_metrics(prefix: str, rows: List[dict]) -> Dict[str, float]:
    out = {}
    for r in rows:
        key = f"{r['provider']}.bs{r['batch_size']}"
        out[f"{prefix}latency_p50_ms.{key}"] = r["p50_ms"]
        out[f"{prefix}latency_p90_ms.{key}"] = r["p90_ms"]
        out[f"{prefix}throughput.{key}"] = r["throughput_img_s"]
    return out


def _smallest_common(rows: List[dict], ref_rows: List[dict]) -> Optional[Tuple[str, int]]:
    """(provider, batch) that PE latency uses: the smallest CPU batch both were timed at, as in the
    pipeline's pe_latency, else the smallest batch of any provider."""
    common = {(r["provider"], r["batch_size"]) for r in rows} & {(r["provider"], r["batch_size"]) for r in ref_rows}
    cpu = [k for k in common if k[0] == "cpu"]
    return min(cpu or common, key=lambda k: k[1]) if common else None


def pe_latency(run, data: Dict[str, Any], int8: bool) -> Tuple[Dict[str, float], str]:
    """vs_<role>.pe_latency on the device = retention x (1 - p50 / reference p50), both timed there
    (metrics.performance_efficiency's formula; retention is the run's own, logged at compress)."""
    refs = data.get("references") or {}
    if not refs:
        name = run.data.tags.get("toolchain.run_name", "<run>")
        return {}, (
            "no pe_latency: the JSON times only the shipped model; bench it with --reference teacher=PATH "
            f"--reference student=PATH (the run's files: export/{name}/summary.json, stages.export.paths) to get it"
        )
    out, notes = {}, []
    for role, entry in refs.items():
        retention = run.data.metrics.get(f"{'int8' if int8 else 'final'}.vs_{role}.retention")
        key = _smallest_common(data["results"], entry["results"])
        if retention is None or key is None:
            notes.append(
                f"{role}: "
                + (
                    "the run logged no accuracy retention against it"
                    if retention is None
                    else "no provider and batch size timed for both"
                )
            )
            continue
        p50 = {(r["provider"], r["batch_size"]): r["p50_ms"] for r in data["results"]}[key]
        ref = {(r["provider"], r["batch_size"]): r["p50_ms"] for r in entry["results"]}[key]
        out[f"vs_{role}.pe_latency"] = retention * (1 - p50 / ref)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in out.items())
    return out, "; ".join(filter(None, [f"pe_latency on the device: {summary}" if out else "", *notes]))


# ---------------------------------------------------------------- attach


def attach_data(client, run, data: Dict[str, Any], source: str) -> List[str]:
    """Check `data` against `run`, then log it there; returns the lines to print."""
    from mlflow.entities import Metric, RunTag

    from .tracking import retry

    check_device_json(data, source)
    device = data["device"]
    file = shipped_file(run, device["model_sha256"], source)
    check_references(run, data, source)
    int8 = "int8" in file
    label = device["name"] + (".int8" if int8 else "")
    pe, note = pe_latency(run, data, int8)
    metrics = {f"device.{label}.{k}": v for k, v in {**latency_metrics("", data["results"]), **pe}.items()}
    broken = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if broken:  # the row checks should make this impossible; never log a non-finite number anyway
        raise AttachError(
            f"{source}: {broken[0]} would be {metrics[broken[0]]}; nothing logged: pass the file "
            f"{HOW_TO_BENCH} wrote, unedited"
        )
    name = run.data.tags.get("toolchain.run_name", run.info.run_id)
    if all(run.data.metrics.get(k) == float(v) for k, v in metrics.items()):
        return [
            f"{source} is already attached to run {name} (parent run {run.info.run_id}): the same {len(metrics)} "
            "metrics are there; nothing logged"
        ]
    tags = {f"device.{device['name']}.cpu": str(device.get("cpu_model") or "unknown")[:500]}
    run_id, now = run.info.run_id, int(time.time() * 1000)
    # the artifact first: if the store refuses it, no metric claims a JSON that is not there
    retry(client.log_text, run_id, json.dumps(data, indent=2), f"device/{label}.json")
    retry(
        client.log_batch,
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    first = next(iter(sorted(metrics)))
    lines = [
        f"attached {source} to run {name} (parent run {run_id}): device {device['name']}, {file}, "
        f"{len(metrics)} metrics ({first} = {metrics[first]:.4g}), artifact device/{label}.json"
    ]
    verdict = budget_verdict(run, data)
    return lines + ([note] if note else []) + ([verdict] if verdict else [])


def budget_verdict(run, data: Dict[str, Any]) -> Optional[str]:
    """A latency prune.budget checked on the device's own timing of the shipped file: confirmed or
    refuted (a speedup needs the student timed there too: --reference student=PATH)."""
    kind, _, target = run.data.tags.get("prune.budget", "").partition("=")
    batch = run.data.metrics.get("prune.budget.batch_size")
    if kind not in ("speedup", "latency_ms") or batch is None:
        return None
    batch = int(batch)
    basis = "predicted on the device's table" if run.data.tags.get("prune.budget.device_table") else "measured here"
    head = f"prune.budget {kind} {target} at batch {batch} ({basis} at compress)"
    p50 = {r["batch_size"]: r["p50_ms"] for r in data["results"] if r["provider"] == "cpu"}
    if batch not in p50:
        return f"{head}: not checked, the JSON has no CPU timing at batch {batch} (bench with --batch-sizes {batch})"
    if kind == "latency_ms":
        ok, seen = p50[batch] <= float(target), f"p50 {p50[batch]:.3f} ms"
    else:
        student = (data.get("references") or {}).get("student", {}).get("results", [])
        ref = {r["batch_size"]: r["p50_ms"] for r in student if r["provider"] == "cpu"}.get(batch)
        if ref is None:
            return (
                f"{head}: not checked, a speedup needs the student timed on the device too (--reference student=PATH)"
            )
        ok, seen = ref / p50[batch] >= float(target), f"{ref / p50[batch]:.2f}x the student (p50 {p50[batch]:.3f} ms)"
    return f"{head}: {'confirmed' if ok else 'REFUTED'} on the device, {seen} (one bench run, no interval)"


def attach(
    run_ref: str, json_path: str, tracking_uri: Optional[str] = None, experiment: Optional[str] = None
) -> List[str]:
    data = load_device_json(json_path)  # before connecting: a bad file is a second's answer
    client = open_store(tracking_uri)
    return attach_data(client, find_run(client, run_ref, experiment), data, json_path)


# ---------------------------------------------------------------- CLI

_PROG = "python -m toolchain attach"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see {_PROG} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog=_PROG,
        description="Log a device's latency (the --json of python -m toolchain.bench run on "
        "that device) into the MLflow parent run of the compress run that shipped the model.",
    )
    p.add_argument("run", help="run name (newest finished compress run of that name) or parent run id")
    p.add_argument("device_json", help="the file python -m toolchain.bench MODEL.onnx --json FILE wrote on the device")
    p.add_argument(
        "--tracking-uri",
        "--tracking_uri",
        default=None,
        help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db",
    )
    p.add_argument("--experiment", default=None, help="look for RUN only in this experiment (default: all)")
    p.epilog = (
        "Logs device.<name>[.int8].latency_p50_ms|latency_p90_ms|throughput.<provider>.bs<N>, "
        "device.<name>[.int8].vs_teacher|vs_student.pe_latency (when the JSON also times the run's reference files: "
        "bench --reference ROLE=PATH), the JSON as artifact device/<name>[.int8].json and tag device.<name>.cpu."
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        print("\n".join(attach(args.run, args.device_json, args.tracking_uri, args.experiment)))
        return 0

    return run_command(body)
