"""Layer latency lookup table (issue 31): measured milliseconds of single Conv / Gemm layers, keyed
by shape, for the prune stage's latency-aware channel allocation (HALP-style).

Torch-free and onnx-free (standard library, numpy, onnxruntime): the table must be measured on the
deployment device, `python -m toolchain.bench --latency-table SPEC.json --json TABLE.json`.

A spec (JSON):
    {"version": 1, "batch_size": 1, "threads": 0,          threads 0 = onnxruntime's default
     "layers": [{"op": "conv", "cin": 32, "cout": 16, "height": 28, "width": 28, "kernel": [3, 3],
                 "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
                {"op": "linear", "cin": 1280, "cout": 10}, ...]}
    Other keys of a layer (e.g. "name") are kept but not part of its key.

API:
    layer_key(layer) -> str          "conv:32x16@28x28:k3x3:s1x1:p1x1:d1x1:g1", "linear:1280x10"
    check_spec(spec) -> dict         the checked spec; BenchError naming the bad entry and field
    load_spec(path) -> dict          read + check_spec
    measure_table(spec, min_time_s=0.05, rounds=2, progress=None, seed=0) -> table dict
    load_table(path) -> dict         read + check a table written by the CLI
    lookup(table, layer) -> float    milliseconds; BenchError when the table lacks the layer

The table: {"version", "batch_size", "threads", "graph_optimization", "min_time_s", "rounds",
"device": {cpu model, cores, ISA flags, onnxruntime...}, "elapsed_s",
"entries": {key: {"ms", "runs", "round_ms", op and shape fields}}}.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..errors import BenchError, first_line
from .device import _runtime, cpu_features, cpu_model, needs_reduce_range, physical_cores
from .layer_models import conv_model, conv_output_size, linear_model
from .ort import _graph_opt_level, _ort

SPEC_VERSION = 1
WARMUP_RUNS = 3
MIN_RUNS = 5
PAIRS = ("kernel", "stride", "padding", "dilation")
SHAPE_FIELDS = {
    "conv": ("cin", "cout", "height", "width", *PAIRS, "groups"),
    "linear": ("cin", "cout"),
}
_REBUILD = "rebuild it with python -m toolchain.bench --latency-table SPEC.json --json TABLE.json"


# ---------------------------------------------------------------- spec


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a channel count


def _field(layer: Dict[str, Any], name: str, where: str, low: int) -> Any:
    """One shape field, an int (or for PAIRS a [h, w] pair) >= low."""
    if name not in layer:
        raise BenchError(f"{where}: missing field {name!r}")
    value = layer[name]
    if name in PAIRS:
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) and v >= low for v in value):
            raise BenchError(f"{where}.{name}: expected two integers >= {low} ([height, width]), got {value!r}")
        return [int(v) for v in value]
    if not _is_int(value) or value < low:
        raise BenchError(f"{where}.{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _check_conv(shape: Dict[str, Any], where: str) -> None:
    groups = shape["groups"]
    if shape["cin"] % groups or shape["cout"] % groups:
        raise BenchError(f"{where}.groups: {groups} must divide cin {shape['cin']} and cout {shape['cout']}")
    for i, dim in enumerate(("height", "width")):
        size = shape[dim] + 2 * shape["padding"][i]
        args = (shape["kernel"][i], shape["stride"][i], shape["padding"][i], shape["dilation"][i])
        if conv_output_size(shape[dim], *args) < 1:
            raise BenchError(
                f"{where}.kernel: {shape['kernel']} with dilation {shape['dilation']} does not fit the padded "
                f"{dim} {size}"
            )


def _check_layer(layer: Any, where: str = "layer") -> Dict[str, Any]:
    """The layer's op and shape fields, checked and as plain ints/lists (its key's input)."""
    if not isinstance(layer, dict):
        raise BenchError(f"{where}: expected an object with op and shape fields, got {type(layer).__name__}")
    op = layer.get("op")
    if op not in SHAPE_FIELDS:
        raise BenchError(f"{where}.op: expected one of {', '.join(SHAPE_FIELDS)}, got {op!r}")
    shape = {"op": op}
    for name in SHAPE_FIELDS[op]:
        shape[name] = _field(layer, name, where, 0 if name == "padding" else 1)
    if op == "conv":
        _check_conv(shape, where)
    return shape


def layer_key(layer: Dict[str, Any]) -> str:
    """Stable key from the op and shape fields only (batch size and threads are the table's)."""
    s = _check_layer(layer)
    if s["op"] == "linear":
        return f"linear:{s['cin']}x{s['cout']}"
    pairs = ":".join(f"{name[0]}{s[name][0]}x{s[name][1]}" for name in PAIRS)  # k, s, p, d
    return f"conv:{s['cin']}x{s['cout']}@{s['height']}x{s['width']}:{pairs}:g{s['groups']}"


def _top_int(spec: Dict[str, Any], name: str, low: int, default: Optional[int] = None) -> int:
    value = spec.get(name, default)
    if not _is_int(value) or value < low:
        raise BenchError(f"spec.{name}: expected an integer >= {low}, got {spec.get(name)!r}")
    return int(value)


def check_spec(spec: Any) -> Dict[str, Any]:
    """The spec, checked: version, batch_size >= 1, threads >= 0 (optional, 0), a non-empty layer
    list of valid layers. Returns a copy whose layers' shape fields are plain ints and lists."""
    if not isinstance(spec, dict):
        raise BenchError(
            f"spec: expected a JSON object with version, batch_size, threads and layers, got {type(spec).__name__}"
        )
    if spec.get("version") != SPEC_VERSION:
        raise BenchError(f"spec.version: expected {SPEC_VERSION}, got {spec.get('version')!r}")
    batch_size, threads = _top_int(spec, "batch_size", 1), _top_int(spec, "threads", 0, default=0)
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise BenchError(f"spec.layers: expected a non-empty list of layers, got {layers!r}"[:300])
    checked = []
    for i, layer in enumerate(layers):
        where = f"spec.layers[{i}]" + (f" ({layer['name']})" if isinstance(layer, dict) and "name" in layer else "")
        checked.append({**layer, **_check_layer(layer, where)})
    return {"version": SPEC_VERSION, "batch_size": batch_size, "threads": threads, "layers": checked}


def _read_json(path: str | os.PathLike, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: cannot read the {what} as JSON: {first_line(exc)}") from None


def load_spec(path: str | os.PathLike) -> Dict[str, Any]:
    spec = _read_json(path, "latency spec")
    try:
        return check_spec(spec)
    except BenchError as exc:
        raise BenchError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- timing


def _model_bytes(shape: Dict[str, Any], batch_size: int) -> bytes:
    fields = {name: shape[name] for name in SHAPE_FIELDS[shape["op"]]}
    return conv_model(batch_size, **fields) if shape["op"] == "conv" else linear_model(batch_size, **fields)


def _session(model: bytes, threads: int):
    """CPU session as the bench's (ort.py): explicit threads, inter-op 1, sequential, all optimisations."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)  # 0: onnxruntime's default, one per physical core
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _graph_opt_level(ort, "all")
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _input(shape: Dict[str, Any], batch_size: int, seed: int) -> np.ndarray:
    dims = (shape["cin"], shape["height"], shape["width"]) if shape["op"] == "conv" else (shape["cin"],)
    return np.random.default_rng(seed).standard_normal((batch_size, *dims), dtype=np.float32)


def _time_runs(run: Callable[[], Any], min_time_s: float) -> List[float]:
    """WARMUP_RUNS untimed, then timed runs until min_time_s has passed and MIN_RUNS were timed."""
    for _ in range(WARMUP_RUNS):
        run()
    times: List[float] = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < MIN_RUNS or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def _time_layer(key: str, shape: Dict[str, Any], spec: Dict[str, Any], min_time_s: float, seed: int) -> List[float]:
    """A fresh session per round: only one layer's weights and thread pool exist at a time, and each
    round gets its own allocations (placement luck is averaged over rounds, not baked into one)."""
    try:
        session = _session(_model_bytes(shape, spec["batch_size"]), spec["threads"])
        feed = {"x": _input(shape, spec["batch_size"], seed)}
        session.run(None, feed)  # outside the timing: a layer onnxruntime rejects fails here, named
    except Exception as exc:  # onnxruntime raises pybind-specific types; numpy MemoryError for huge layers
        raise BenchError(f"layer {key}: onnxruntime cannot run it: {first_line(exc)}") from None
    return _time_runs(lambda: session.run(None, feed), min_time_s)


def _orders(keys: List[str], rounds: int, seed: int) -> List[List[str]]:
    """A seeded shuffle per round, each differing from the previous one, so slow drift (thermal,
    frequency, a neighbour process) does not always land on the same layers."""
    rng, orders = random.Random(seed), []
    for _ in range(rounds):
        order = list(keys)
        rng.shuffle(order)
        if orders and order == orders[-1] and len(order) > 1:
            order = order[1:] + order[:1]
        orders.append(order)
    return orders


def device_section(threads: int) -> Dict[str, Any]:
    """What the table was measured on: bench/device.py's fingerprint fields that decide layer
    latency (no model file and no hostname: the table is about the CPU, not one machine's name)."""
    features = cpu_features()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": {k: v for k, v in features.items() if k not in ("machine", "cpu")},
        "needs_reduce_range": needs_reduce_range(features),
        "os": platform.system(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        **_runtime(),
        "threads": {"intra_op": threads, "intra_op_effective": threads or physical_cores(), "inter_op": 1},
    }


def measure_table(
    spec: Dict[str, Any],
    min_time_s: float = 0.05,
    rounds: int = 2,
    progress: Optional[Callable[[int, int], None]] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Time each distinct layer of the spec (duplicates by layer_key are timed once).

    Each of `rounds` rounds visits the layers in its own seeded order; per layer and round: a fresh
    session, WARMUP_RUNS untimed runs, then timed runs until min_time_s has passed and at least
    MIN_RUNS ran, and that round's median. An entry's "ms" is the median of its per-round medians
    (with 2 rounds, their mean), "round_ms" lists them, "runs" counts all its timed runs.
    progress(done, total) is called after each layer-round (total = rounds x distinct layers).
    """
    spec = check_spec(spec)
    if not _is_int(rounds) or rounds < 1 or not min_time_s >= 0:
        raise BenchError(f"rounds must be an integer >= 1 and min_time_s >= 0, got {rounds!r} and {min_time_s!r}")
    start = time.perf_counter()
    shapes = {}
    for layer in spec["layers"]:
        shapes.setdefault(layer_key(layer), _check_layer(layer))
    round_ms: Dict[str, List[float]] = {key: [] for key in shapes}
    runs = dict.fromkeys(shapes, 0)
    total, done = rounds * len(shapes), 0
    for order in _orders(list(shapes), rounds, seed):
        for key in order:
            times = _time_layer(key, shapes[key], spec, min_time_s, seed)
            round_ms[key].append(statistics.median(times) * 1e3)
            runs[key] += len(times)
            done += 1
            if progress is not None:
                progress(done, total)
    entries = {
        key: {"ms": statistics.median(round_ms[key]), "runs": runs[key], "round_ms": round_ms[key], **shapes[key]}
        for key in shapes
    }
    return {
        "version": SPEC_VERSION,
        "batch_size": spec["batch_size"],
        "threads": spec["threads"],
        "graph_optimization": "all",
        "min_time_s": float(min_time_s),
        "rounds": rounds,
        "device": device_section(spec["threads"]),
        "elapsed_s": round(time.perf_counter() - start, 3),
        "entries": entries,
    }


# ---------------------------------------------------------------- use


def load_table(path: str | os.PathLike) -> Dict[str, Any]:
    """A table the CLI wrote; BenchError for a missing file, another version or no entries."""
    table = _read_json(path, "latency table")
    if not isinstance(table, dict) or table.get("version") != SPEC_VERSION:
        version = table.get("version") if isinstance(table, dict) else None
        raise BenchError(f"{path}: not a version-{SPEC_VERSION} latency table (version {version!r}); {_REBUILD}")
    entries = table.get("entries")
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and "ms" in e for e in entries.values()):
        raise BenchError(f"{path}: the latency table has no valid entries; {_REBUILD}")
    return table


def lookup(table: Dict[str, Any], layer: Dict[str, Any]) -> float:
    """The layer's measured milliseconds (at the table's batch size and threads)."""
    key = layer_key(layer)
    entry = table["entries"].get(key)
    if entry is None:
        raise BenchError(
            f"the latency table has no entry {key}: it was built for another model or spec; "
            f"{_REBUILD}, the spec listing this layer"
        )
    return float(entry["ms"])
