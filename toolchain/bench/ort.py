"""onnxruntime latency benchmark. Torch-free: runs on an edge box with only numpy + onnxruntime.
The command line (`python -m toolchain.bench`) is bench/cli.py.

This module must not import torch, directly or indirectly (only numpy, onnxruntime,
the standard library, toolchain.errors, toolchain.fsutil and bench/device.py; toolchain.attach,
toolchain.tracking and mlflow only when --mlflow-run-id asks for them), so that

    python -m toolchain.bench MODEL.onnx [--batch-sizes 1,32] [--providers cpu] [--threads N]
        [--inter-op-threads N] [--graph-optimization all] [--warmup N] [--iterations N]
        [--time-budget S] [--input-shape 3,32,32] [--json out.json]
        [--name NAME] [--no-hostname] [--reference teacher=PATH --reference student=PATH [--compare-budget S]]
        [--mlflow-run-id ID [--tracking-uri URI]]

works on the deployment device. The JSON holds a `device` section (bench/device.py: CPU, cores,
ISA flags, OS, onnxruntime and its providers, threads, name, hostname, the model's sha256) that
`python -m toolchain attach RUN FILE` checks and logs into the run that shipped the model;
--mlflow-run-id logs it the same way from the device when it reaches the tracking server. A user mistake (missing or corrupt file, an input
shape that does not fit, a batch whose input would take over half the machine's memory,
an unknown or inactive provider, a --json path that cannot be written) is one line on
stderr and exit code 2.

API (used by the pipeline):
    benchmark(onnx_path, batch_sizes=(1, 32), providers=("cpu",), intra_op_threads=0,
              inter_op_threads=1, graph_optimization="all", warmup=10, iterations=200,
              time_budget_s=3.0, input_shape=None) -> dict
        {"model": path, "input": {"name", "shape", "dtype"}, "environment": {...},
         "results": [row, ...]}   one row per (provider, batch size) with
         STAT_KEYS: p50_ms p90_ms p99_ms mean_ms std_ms min_ms throughput_img_s, plus
         provider, batch_size, input_shape, iterations, total_s.
        Each provider gets its own session; a requested provider that is not active
        after session creation raises BenchError (onnxruntime would otherwise fall back to CPU
        silently). Timing: warm-up runs per input shape, then timed runs until `iterations`
        or `time_budget_s`, whichever ends first. Each timed call is session.run() on a numpy
        input, so on GPU providers it includes the host<->device copies (end-to-end latency).
    create_session(onnx_path, provider="cpu", ...) -> onnxruntime.InferenceSession (checked)
    format_table(results, reference=None) -> str      human table; `reference` (another
        results dict, e.g. torch_bench.torch_eager_latency's) adds a p50 speed-up column.
    time_calls(fn, warmup, iterations, time_budget_s) / latency_stats(times_s, batch_size):
        the timing loop and statistics, shared with torch_bench so numbers are comparable.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..errors import BenchError, first_line
from .device import cpu_model, physical_cores  # noqa: F401  (cpu_model: importable from here, as before device.py)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
STAT_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "throughput_img_s")
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}
_GPU_HINT = {
    "cuda": "install the GPU build: pip uninstall onnxruntime && pip install onnxruntime-gpu "
    "(needs a matching CUDA and cuDNN)",
    "tensorrt": "install onnxruntime-gpu and TensorRT libraries on the library path",
}


# ---------------------------------------------------------------- session


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BenchError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def check_provider_name(name: str) -> str:
    if name not in PROVIDERS:
        raise BenchError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    return name


def _graph_opt_level(ort, level: str):
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise BenchError(f"unknown graph optimisation level {level!r}; choose from {', '.join(GRAPH_OPT_LEVELS)}")
    return levels[level]


def _check_model_file(onnx_path: str | os.PathLike) -> Path:
    path = Path(onnx_path)
    if not path.is_file():
        raise BenchError(f"{path}: ONNX model file not found; pass the path to an exported .onnx file")
    return path


def _provider_chain(ort, provider: str) -> List[str]:
    """Requested EP first; CPU last so nodes the EP lacks still run (ORT adds it anyway)."""
    available = ort.get_available_providers()
    wanted = PROVIDERS[check_provider_name(provider)]
    if wanted not in available:
        raise BenchError(
            f"provider {provider} ({wanted}) is not available in this onnxruntime "
            f"{ort.__version__} (available: {', '.join(available)}); {_GPU_HINT.get(provider, '')}".rstrip("; ")
        )
    chain = [wanted]
    if provider == "tensorrt" and PROVIDERS["cuda"] in available:
        chain.append(PROVIDERS["cuda"])  # TensorRT hands unsupported subgraphs to CUDA, not CPU
    if wanted != PROVIDERS["cpu"]:
        chain.append(PROVIDERS["cpu"])
    return chain


def create_session(
    onnx_path: str | os.PathLike,
    provider: str = "cpu",
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
    graph_optimization: str = "all",
):
    """An InferenceSession on `provider` with explicit threads and optimisation level.

    Raises BenchError when the file cannot be loaded or the provider is not active
    after creation (onnxruntime silently falls back to CPU when e.g. CUDA libs are missing).
    """
    ort = _ort()
    path = _check_model_file(onnx_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)  # 0: ORT default, one per physical core
    opts.inter_op_num_threads = int(inter_op_threads)
    opts.graph_optimization_level = _graph_opt_level(ort, graph_optimization)
    opts.log_severity_level = 3  # errors only: EP fallback warnings are checked below instead
    chain = _provider_chain(ort, provider)
    try:
        # enable_fallback=0: otherwise ORT's Python wrapper prints "EP Error" and quietly
        # retries on CPU, at creation and again on a failing run()
        session = ort.InferenceSession(str(path), sess_options=opts, providers=chain, enable_fallback=0)
    except Exception as exc:  # ORT raises pybind-specific types (InvalidProtobuf, Fail, ...)
        if provider == "cpu":
            raise BenchError(
                f"{path}: onnxruntime cannot load this model: {first_line(exc)}; is it an exported ONNX file?"
            ) from None
        raise BenchError(
            f"{path}: onnxruntime cannot create a {provider} session: {first_line(exc)}; {_GPU_HINT[provider]}"
        ) from None
    active = session.get_providers()
    if chain[0] not in active:
        raise BenchError(
            f"provider {provider} ({chain[0]}) was requested but onnxruntime activated only {', '.join(active)} "
            f"(its libraries failed to load); {_GPU_HINT.get(provider, 'check the onnxruntime installation')}"
        )
    return session


# ---------------------------------------------------------------- input


def model_input(session) -> Dict[str, Any]:
    """The model's single input: name, shape (dynamic dims as their name or None), dtype."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BenchError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); the benchmark supports single-input image models"
        )
    inp = inputs[0]
    if inp.type not in _DTYPES:
        raise BenchError(f"input {inp.name!r} has type {inp.type}, which the benchmark cannot feed")
    shape = [d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else None) for d in inp.shape]
    return {"name": inp.name, "shape": shape, "dtype": inp.type}


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def resolve_input_shape(
    model_shape: Sequence[Any], batch_size: int, sample_shape: Optional[Sequence[int]] = None
) -> tuple:
    """Concrete input shape for one batch size: the model's dims, batch dim = batch_size.

    `sample_shape` (per-sample dims, e.g. (3, 32, 32)) fills dynamic dims; it must agree
    with every fixed dim of the model.
    """
    if not model_shape:
        raise BenchError("the model input is a scalar; the benchmark needs a batched input")
    batch_dim, rest = model_shape[0], list(model_shape[1:])
    if isinstance(batch_dim, int) and batch_dim != batch_size:
        raise BenchError(
            f"the model has a fixed batch size of {batch_dim} (input {_fmt_shape(model_shape)}); "
            f"bench with --batch-sizes {batch_dim} or re-export with export.dynamic_batch: true"
        )
    if sample_shape is not None:
        sample_shape = [int(d) for d in sample_shape]
        fits = len(sample_shape) == len(rest) and all(
            not isinstance(m, int) or m == u for m, u in zip(rest, sample_shape)
        )
        if not fits:
            raise BenchError(
                f"input shape {','.join(map(str, sample_shape))} does not fit the model input {_fmt_shape(model_shape)}; "
                f"pass --input-shape with the model's per-sample dims"
            )
        return (batch_size, *sample_shape)
    if not all(isinstance(d, int) for d in rest):
        raise BenchError(
            f"the model input {_fmt_shape(model_shape)} has dynamic dims besides the batch; pass --input-shape C,H,W"
        )
    return (batch_size, *rest)


def input_bytes_limit() -> int:
    """Half the machine's physical memory: the session's activations and outputs need the rest."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return 8 << 30


def check_input_size(shape: Sequence[int], onnx_type: str) -> None:
    nbytes = math.prod(int(d) for d in shape) * np.dtype(_DTYPES[onnx_type]).itemsize
    limit = input_bytes_limit()
    if nbytes > limit:
        raise BenchError(
            f"batch size {shape[0]}: the input {list(shape)} would take {nbytes} bytes ({nbytes / 2**30:.1f} GiB), "
            f"over the {limit} bytes allowed (half of this machine's memory); use smaller batch sizes "
            "(--batch-sizes, or bench.batch_sizes in a recipe)"
        )


def make_input(shape: Sequence[int], onnx_type: str, seed: int = 0) -> np.ndarray:
    check_input_size(shape, onnx_type)
    dtype = _DTYPES[onnx_type]
    if np.issubdtype(dtype, np.floating):
        # drawn in float32: a float64 draw would take twice the input's memory before the cast
        draw = np.random.default_rng(seed).standard_normal(
            shape, dtype=np.float64 if dtype == np.float64 else np.float32
        )
        return draw.astype(dtype, copy=False)
    return np.zeros(shape, dtype=dtype)


# ---------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], warmup: int, iterations: int, time_budget_s: float) -> List[float]:
    """Run fn `warmup` times untimed, then time it until `iterations` or the budget runs out.

    At least one timed call always happens, so a tiny budget still yields a number.
    """
    for _ in range(warmup):
        fn()
    times: List[float] = []
    deadline = time.perf_counter() + time_budget_s
    while len(times) < iterations:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        times.append(end - start)
        if end >= deadline:
            break
    return times


def latency_stats(times_s: Sequence[float], batch_size: int) -> Dict[str, float]:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "throughput_img_s": float(batch_size * len(ms) / (ms.sum() / 1e3)),
        "iterations": int(len(ms)),
        "total_s": float(ms.sum() / 1e3),
    }


# ---------------------------------------------------------------- benchmark


def _bench_session(
    session, inp: Dict[str, Any], provider: str, batch_sizes, input_shape, warmup, iterations, time_budget_s
) -> List[dict]:
    rows = []
    for bs in batch_sizes:
        shape = resolve_input_shape(inp["shape"], int(bs), input_shape)
        feed = {inp["name"]: make_input(shape, inp["dtype"])}
        run = lambda feed=feed: session.run(None, feed)  # noqa: E731
        try:
            run()  # first call outside timing: a shape the graph rejects fails here, clearly
        except Exception as exc:
            raise BenchError(
                f"onnxruntime cannot run the model on input shape {list(shape)}: {first_line(exc)}"
            ) from None
        times = time_calls(run, warmup, iterations, time_budget_s)
        rows.append(
            {"provider": provider, "batch_size": int(bs), "input_shape": list(shape), **latency_stats(times, int(bs))}
        )
    return rows


def benchmark(
    onnx_path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 32),
    providers: Sequence[str] = ("cpu",),
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
    graph_optimization: str = "all",
    warmup: int = 10,
    iterations: int = 200,
    time_budget_s: float = 3.0,
    input_shape: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Latency/throughput of an ONNX model per provider and batch size (see module docstring)."""
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise BenchError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}")
    providers = [check_provider_name(p) for p in providers]
    rows, active, inp = [], {}, None
    for provider in providers:
        session = create_session(onnx_path, provider, intra_op_threads, inter_op_threads, graph_optimization)
        inp = model_input(session)
        active[provider] = session.get_providers()
        rows += _bench_session(session, inp, provider, batch_sizes, input_shape, warmup, iterations, time_budget_s)
        del session  # free GPU memory before the next provider
    env = environment(intra_op_threads, inter_op_threads, graph_optimization)
    env.update(providers_active=active, warmup=warmup, iterations=iterations, time_budget_s=time_budget_s)
    return {"model": str(onnx_path), "input": inp, "environment": env, "results": rows}


# ---------------------------------------------------------------- environment


def environment(
    intra_op_threads: int = 0, inter_op_threads: int = 1, graph_optimization: str = "all"
) -> Dict[str, Any]:
    ort = _ort()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "physical_cores": physical_cores(),
        "intra_op_threads": int(intra_op_threads),
        "intra_op_threads_effective": int(intra_op_threads) or physical_cores(),  # 0: ORT uses one per physical core
        "inter_op_threads": int(inter_op_threads),
        "graph_optimization": graph_optimization,
        "providers_available": ort.get_available_providers(),
    }


# ---------------------------------------------------------------- reporting


def result_rows(results: Dict[str, Any] | Iterable[dict]) -> List[dict]:
    return list(results["results"] if isinstance(results, dict) else results)


def format_table(
    results: Dict[str, Any] | Iterable[dict], reference: Dict[str, Any] | Iterable[dict] | None = None
) -> str:
    """Fixed-width table of the rows; with `reference`, a column ref_p50 / p50 (>1: faster)."""
    rows = result_rows(results)
    ref = {r["batch_size"]: r["p50_ms"] for r in result_rows(reference)} if reference is not None else None
    header = ["provider", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "img/s", "runs"]
    if ref is not None:
        header.append("speedup")
    lines = [header]
    for r in rows:
        cells = [r["provider"], str(r["batch_size"])]
        cells += [f"{r[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")]
        cells += [f"{r['throughput_img_s']:.1f}", str(r["iterations"])]
        if ref is not None:
            base = ref.get(r["batch_size"])
            cells.append(f"{base / r['p50_ms']:.2f}x" if base and r["p50_ms"] > 0 else "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(c) for c in lines[1:]])


def format_environment(results: Dict[str, Any]) -> str:
    env = results.get("environment", {})
    threads = env.get("intra_op_threads", 0) or f"default ({env.get('physical_cores')} physical cores)"
    active = "; ".join(f"{k}: {','.join(v)}" for k, v in env.get("providers_active", {}).items())
    return (
        f"onnxruntime {env.get('onnxruntime')} | {env.get('cpu_model')} ({env.get('cpu_count')} logical CPUs) | "
        f"intra-op threads {threads}, inter-op {env.get('inter_op_threads')} | graph opt {env.get('graph_optimization')} | active {active}"
    )
