"""Compress to a budget (prune.budget, issue 31): the one aligned sparsity that meets it.

    decision = choose(model, cfg, example_input, meter, prune_fn)   -> (PruneResult, Decision)
    reading = check_reachable(model, cfg, example_input, meter)    -> the most-pruned model's Reading

`uniform` allocation only: every layer keeps the same aligned fraction, so a model's structure
(and hence its MACs, parameters, file size and latency) depends on the sparsity alone, not on
the weights or the scorer. The structure changes only where some layer's aligned kept count
changes: sparsity_grid() lists those points (for NNI's nearest-multiple rounding and
Torch-Pruning's round-down), and every cost falls (or stays) as the sparsity rises, so the least
sparsity that meets the budget is found by bisection over the grid: about log2(grid) engine runs
(scored by L1: the scores do not change the structure), each measured on the physically pruned
model. The grid point one below the chosen one misses the budget: the choice is within one
alignment step of it.

What "met" means (Meter.__call__ -> Reading):
- macs, params: the pruned model's count / the student's <= the budget (exact, counted on the model);
- file_bytes: the pruned model's float ONNX file (the export section's exporter and opset, without
  the metadata the export stage adds to the shipped file: the run's recipe, hashes, preprocessing,
  a few KB) <= the budget; the INT8 file of the quantize stage is not what is budgeted;
- speedup: p50(student) / p50(pruned), paired blocks replicated (bench/compare.py); met when the
  95% interval's LOWER end clears the budget (an interval straddling it is not met);
- latency_ms: the pruned model's p50 over the same replicates, a 95% t-interval on the replicates'
  p50s (compare.interval); met when its UPPER end is at most the budget.
The chosen sparsity is then pruned with the recipe's own pruner and schedule (a one-shot l1/l2/fpgm
recipe reuses the search's model) and, for latency budgets, measured again;
while that measurement misses (noise), the sparsity moves one grid point up, at most
budget.max_retries times. A budget the most-pruned aligned model measurably misses (even its
interval's favourable end) is unreachable (check_reachable, run in the prune preflight, before
anything trains); one it only fails to prove (a wide interval) is searched and reported as measured.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..metrics import count_macs, count_params
from .pinned import pinned_layers
from .registry import PruneError
from .targets import out_channels, select_targets

LATENCY_KINDS = ("speedup", "latency_ms")
UNITS = {
    "speedup": "x",
    "latency_ms": "ms",
    "macs": "of the student's MACs",
    "params": "of the student's parameters",
    "file_bytes": "bytes",
}


@dataclass
class Reading:
    value: float  # fraction, bytes, speedup ratio or p50 ms
    low: float
    high: float
    met: bool
    detail: Dict[str, Any] = field(default_factory=dict)  # the comparison's summary, for latency budgets

    def text(self, kind: str) -> str:
        if kind == "speedup":
            return f"{self.value:.2f}x [{self.low:.2f}, {self.high:.2f}]"
        if kind == "latency_ms":
            return f"{self.value:.3f} ms [{self.low:.3f}, {self.high:.3f}]"
        if kind == "file_bytes":
            return f"{int(self.value)} bytes"
        return f"{self.value:.4f} {UNITS[kind]}"


@dataclass
class Decision:
    kind: str
    target: float
    allocation: str
    sparsity: float
    met: bool
    value: float
    low: float
    high: float
    predicted: float  # the search's reading of the chosen structure (before the final prune)
    trials: int  # engine runs of the search
    retries: int  # final prunes beyond the first
    grid_points: int
    batch_size: Optional[int] = None
    threads: Optional[int] = None
    history: List[Dict[str, Any]] = field(default_factory=list)  # every measured sparsity, in order
    comparison: Dict[str, Any] = field(default_factory=dict)
    cost_model: Dict[str, Any] = field(default_factory=dict)  # latency_aware: the model, its prediction, kept counts
    file: Optional[str] = None  # file_bytes: the file budgeted, float or int8

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def report(self) -> Dict[str, float]:
        """The numbers that become prune.budget.* metrics."""
        out = {
            "budget.target": self.target,
            "budget.sparsity": self.sparsity,
            "budget.met": float(self.met),
            "budget.value": self.value,
            "budget.low": _finite(self.low),
            "budget.high": _finite(self.high),
            "budget.predicted": self.predicted,
            "budget.trials": self.trials,
            "budget.retries": self.retries,
        }
        if self.batch_size is not None:
            out.update({"budget.batch_size": self.batch_size, "budget.threads": self.threads})
        if self.cost_model.get("error_pct") is not None:  # latency_aware: (predicted - measured) / measured
            out["budget.error_pct"] = self.cost_model["error_pct"]
        return out

    def line(self) -> str:
        where = f" at batch {self.batch_size}, {threads_text(self.threads)}" if self.batch_size is not None else ""
        where += f" ({self.file.upper() if self.file == 'int8' else self.file} file)" if self.file else ""
        sign = ">=" if self.kind == "speedup" else "<="
        reading = Reading(self.value, self.low, self.high, self.met)
        interval = " (95% interval)" if self.kind in ("speedup", "latency_ms") else ""
        on_device = self.cost_model.get("table", {}).get("source") == "device table"
        basis = " predicted on the device table" if on_device else ""
        predicted = f", cost model predicted {value_text(self.kind, self.predicted)}" if self.cost_model else ""
        return (
            f"Budget: {self.kind} {sign} {self.target:g}{where}: {'met' if self.met else 'NOT met'}{basis}, "
            f"{reading.text(self.kind)}{interval} at sparsity {self.sparsity:.3f} ({self.allocation}, "
            f"{self.trials} trials{predicted})"
        )


def value_text(kind: str, value: float) -> str:
    return {"speedup": f"{value:.2f}x", "latency_ms": f"{value:.3f} ms", "file_bytes": f"{int(value)} bytes"}.get(
        kind, f"{value:.4f}"
    )


def threads_text(n: Optional[int]) -> str:
    return "one thread per core" if not n else f"{n} thread{'s' if n > 1 else ''}"


# ---------------------------------------------------------------- the grid


def prunable_channels(model: nn.Module, cfg) -> List[int]:
    """Output channel counts of the layers the recipe prunes (pinned and <= align ones left alone)."""
    targets = select_targets(model, cfg.op_types, cfg.exclude, False)
    pinned = set(pinned_layers(model))
    return sorted({out_channels(m) for n, m in targets.items() if n not in pinned and out_channels(m) > cfg.align})


def sparsity_grid(model: nn.Module, cfg) -> List[float]:
    """Every sparsity where some layer's aligned kept count changes, ascending; the last is the
    most-pruned aligned model (every prunable layer at `align` channels).
    NNI (alignment.kept_channels): nearest multiple, ties down: c(1-s)/a = k + 1/2 -> k*a kept
    (a grouped conv's group keeps multiples of lcm(align, blocks), whose steps this grid does not list:
    the search still works, the one-step guarantee is then per align, not per block).
    Torch-Pruning: int(c(1-s)) rounded down to a multiple: just above 1 - k*a/c -> (k-1)*a kept; its
    grid ends where the narrowest prunable layer reaches align (further, it would keep that layer whole)."""
    a = cfg.align
    points = set()
    for c in prunable_channels(model, cfg):
        for k in range(1, c // a + 1):
            if cfg.engine == "nni":  # just past the tie, so float error cannot round it back up
                s = 1 - (k + 0.5) * a / c + 1e-9
            elif k >= 2:
                s = 1 - k * a / c + 1e-9
            else:
                continue
            if 0 < s < 1:
                points.add(round(s, 12))
    if not points:
        raise PruneError(f"prune.budget: no layer has more than prune.align ({a}) channels to prune; lower prune.align")
    if cfg.engine == "torch_pruning":
        # Torch-Pruning keeps a layer whole where rounding down would leave none: past the narrowest
        # layer's last step the structure would grow again, so the grid ends there (that layer at align)
        cap = round(1 - a / min(prunable_channels(model, cfg)) - 1e-9, 12)
        points = {p for p in points if p < cap} | {cap}
    return sorted(points)


# ---------------------------------------------------------------- meters


class Meter:
    """Measures a pruned model against the student for one budget kind."""

    def __init__(self, budget, example_input: torch.Tensor):
        self.budget, self.kind, self.target = budget, budget.kind, float(budget.target)
        self.example = example_input
        self.label = ""  # what is being measured (the search sets it), for progress lines

    def __call__(self, student: nn.Module, pruned: nn.Module) -> Reading:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CountMeter(Meter):
    """macs / params: fractions of the student, counted on the physically pruned model."""

    def __call__(self, student, pruned) -> Reading:
        shape = (1, *self.example.shape[1:])
        count = (lambda m: count_macs(m, shape)) if self.kind == "macs" else count_params
        value = count(pruned) / count(student)
        return Reading(value, value, value, value <= self.target)


class OnnxMeter(Meter):
    """Exports candidates (the export section's exporter and opset) into a temporary folder."""

    def __init__(self, budget, example_input):
        super().__init__(budget, example_input)
        self._dir = tempfile.TemporaryDirectory(prefix="toolchain-budget-")
        self._count = 0
        self._student: Optional[Tuple[int, str]] = None

    def export(self, model: nn.Module, name: str) -> str:
        from ..onnx.export import export_onnx
        from ..recipe import ExportConfig

        self._count += 1
        path = Path(self._dir.name) / f"{name}-{self._count}.onnx"
        cfg = ExportConfig(exporter=self.budget.exporter or "dynamo", opset=self.budget.opset or 18, references=False)
        # a CPU copy: the caller's model stays where it is (training may be on a GPU)
        export_onnx(
            copy.deepcopy(model).cpu(), path, self.example.cpu(), cfg, {}
        )  # no metadata: file_bytes counts the model
        return str(path)

    def student_ms(self, student: nn.Module) -> float:
        """The student's p50 at the budget's batch size and threads, one session, about a second:
        what the cost model is calibrated on (its decisions are measured again by __call__)."""
        from ..bench.ort import create_session, make_input, model_input, time_calls

        session = create_session(self.student_file(student), intra_op_threads=self.budget.threads or 0)
        spec = model_input(session)
        x = make_input([self.budget.batch_size, *self.example.shape[1:]], spec["dtype"])
        times = time_calls(lambda: session.run(None, {spec["name"]: x}), 5, 10000, 1.0)
        return float(np.median(times) * 1e3)

    def student_file(self, student: nn.Module) -> str:
        if self._student is None or self._student[0] != id(student):
            self._student = (id(student), self.export(student, "student"))
        return self._student[1]

    def close(self) -> None:
        self._dir.cleanup()


# The INT8 file a file_bytes budget measures (budget.file int8): every layer INT8, the quantize stage's
# all-INT8 default; its candidates that keep a few layers float are a few KB larger, and
# quantize.max_file_bytes holds them to the budget exactly.
INT8_SIZE_CANDIDATE = "qdq_u8s8_dw_per_channel"


class FileMeter(OnnxMeter):
    def __call__(self, student, pruned) -> Reading:
        size = self.size(pruned, "candidate")
        return Reading(size, size, size, size <= self.target)

    def size(self, model: nn.Module, name: str) -> float:
        """Bytes of the budgeted file: the float ONNX file, or it quantized to INT8."""
        path = Path(self.export(model, name))
        return float((self._int8(path) if self.budget.file == "int8" else path).stat().st_size)

    def _int8(self, path: Path) -> Path:
        """Calibrated on the example batch: the file's size does not depend on the ranges found."""
        import onnx

        from ..onnx.quantize import CANDIDATES, CalibrationReader, preprocess, quantize

        pre, out = path.with_suffix(".pre.onnx"), path.with_suffix(".int8.onnx")
        preprocess(path, pre)
        name = onnx.load(str(path), load_external_data=False).graph.input[0].name
        reader = CalibrationReader([(self.example.cpu(), None)], name, len(self.example))
        quantize(pre, out, CANDIDATES.get(INT8_SIZE_CANDIDATE), reader)
        return out


class LatencyMeter(OnnxMeter):
    """speedup / latency_ms: the candidate against the student, replicated paired blocks
    (bench/compare.py) at the budget's batch size and threads. `replicate` replaces the timing
    (tests feed it)."""

    def __init__(self, budget, example_input, replicate=None, progress=None):
        super().__init__(budget, example_input)
        self.replicate, self.progress = replicate, progress

    def __call__(self, student, pruned) -> Reading:
        from ..bench.compare import Plan, Settings, compare, interval

        b, lat = self.budget, self.budget.latency
        files = {"student": self.student_file(student), "candidate": self.export(pruned, "candidate")}
        settings = Settings(intra_op_threads=b.threads or 0, block_s=lat.block_s, blocks=lat.blocks)
        plan = Plan(lat.min_replicates, lat.max_replicates, lat.target_width, lat.budget_s, lat.isolation)
        progress = (lambda line: self.progress(f"[prune] budget {self.label}: {line}")) if self.progress else None
        result = compare(
            files,
            [("student", "candidate")],
            [b.batch_size],
            settings,
            plan,
            decide_at=self.target if self.kind == "speedup" else None,
            replicate=self.replicate,
            progress=progress,
        )
        ratio = result.ratio("student", "candidate", b.batch_size)
        p50s = [r["medians_ms"][f"candidate@{b.batch_size}"] for r in result.replicates]
        p50 = interval(p50s)
        detail = {
            "speedup": ratio.as_dict(),
            "p50_ms": p50.as_dict(),
            "stopped": result.stopped,
            "replicates": len(result.replicates),
            "elapsed_s": result.elapsed_s,
        }
        if self.kind == "speedup":
            return Reading(ratio.ratio, ratio.low, ratio.high, ratio.low >= self.target, detail)
        return Reading(p50.ratio, p50.low, p50.high, p50.high <= self.target, detail)


def make_meter(budget, example_input: torch.Tensor, replicate=None, progress=None) -> Meter:
    if budget.kind in ("macs", "params"):
        return CountMeter(budget, example_input)
    if budget.kind == "file_bytes":
        return FileMeter(budget, example_input)
    return LatencyMeter(budget, example_input, replicate, progress)


# ---------------------------------------------------------------- search


PruneFn = Callable[[nn.Module, Any], Any]  # (model, PruneConfig without budget) -> PruneResult


def trial_cfg(cfg, sparsity: float):
    """The structure at `sparsity`: L1 scores (taylor needs training batches; scores do not change
    the structure), one shot (kept counts come from the original channels either way)."""
    return cfg.model_copy(
        update={
            "sparsity": sparsity,
            "budget": None,
            "schedule": "one_shot",
            "pruner": "l1" if cfg.pruner == "taylor" else cfg.pruner,
        }
    )


class Search:
    """Bisection over the grid; each point is pruned and measured at most once."""

    def __init__(self, model: nn.Module, cfg, meter: Meter, prune_fn: PruneFn, grid: List[float]):
        self.model, self.cfg, self.meter, self.prune_fn, self.grid = model, cfg, meter, prune_fn, grid
        self.readings: Dict[int, Reading] = {}
        self.results: Dict[int, Any] = {}
        self.history: List[Dict[str, Any]] = []
        self.trials = 0

    def measure(self, index: int) -> Reading:
        if index not in self.readings:
            self.meter.label = f"trial at sparsity {self.grid[index]:.3f}"
            result = self.prune_fn(self.model, trial_cfg(self.cfg, self.grid[index]))
            self.trials += 1
            reading = self.meter(self.model, result.model)
            self.readings[index] = reading
            self.results = {index: result} if reading.met else self.results  # keep the best met one only
            self.history.append(
                {
                    "sparsity": self.grid[index],
                    "value": reading.value,
                    "low": reading.low,
                    "high": reading.high,
                    "met": reading.met,
                    "stage": "search",
                }
            )
        return self.readings[index]

    def least_meeting(self) -> int:
        """Smallest grid index whose model meets the budget (the last one must: check it first)."""
        last = len(self.grid) - 1
        if not self.measure(last).met:
            if out_of_reach(self.readings[last], self.cfg.budget):
                raise Unreachable(self.grid[last], self.readings[last])
            return last  # unproven, not refuted (a wide interval): the most-pruned model is measured again
        lo, hi = -1, last  # invariant: hi meets; lo does not (or is below the grid)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.measure(mid).met:
                hi = mid
            else:
                lo = mid
        return hi


def out_of_reach(reading: Reading, b) -> bool:
    """Even the interval's favourable end misses the budget: refuted by the measurement, not merely
    unproven (a wide interval straddling the budget is not a reason to refuse a recipe)."""
    if b.kind == "speedup":
        return reading.high < b.target
    if b.kind == "latency_ms":
        return reading.low > b.target
    return not reading.met


class Unreachable(Exception):
    def __init__(self, sparsity: float, reading: Reading):
        super().__init__(sparsity)
        self.sparsity, self.reading = sparsity, reading


def unreachable_message(cfg, model: nn.Module, sparsity: float, reading: Reading) -> str:
    b = cfg.budget
    where = f" at batch {b.batch_size}, {threads_text(b.threads)}" if b.kind in LATENCY_KINDS else ""
    best = {
        "speedup": f"the best reachable is {reading.value:.2f}x (95% interval [{reading.low:.2f}, {reading.high:.2f}])",
        "latency_ms": f"the best reachable is {reading.value:.3f} ms (95% interval [{reading.low:.3f}, {reading.high:.3f}])",
        "file_bytes": f"the best reachable is {int(reading.value)} bytes",
    }.get(b.kind, f"the best reachable is {reading.value:.4f}")
    return (
        f"prune.budget.{b.kind} {b.target:g} cannot be reached by {type(model).__name__}: the most-pruned aligned "
        f"model (sparsity {sparsity:.3f}, every prunable layer at {cfg.align} channels{where}) misses it; {best}; "
        f"relax the budget, or lower prune.align / shrink prune.exclude"
    )


def check_reachable(model: nn.Module, cfg, meter: Meter, prune_fn: PruneFn) -> Reading:
    """The most-pruned aligned model's reading, or a one-line PruneError naming the best reachable value
    when the measurement refutes the budget (out_of_reach)."""
    grid = sparsity_grid(model, cfg)
    search = Search(model, cfg, meter, prune_fn, grid)
    reading = search.measure(len(grid) - 1)
    if out_of_reach(reading, cfg.budget):
        raise PruneError(unreachable_message(cfg, model, grid[-1], reading))
    return reading


def choose(model: nn.Module, cfg, meter: Meter, prune_fn: PruneFn) -> Tuple[Any, Decision]:
    """Search the least aligned sparsity meeting cfg.budget, prune `model` there with the recipe's
    pruner and schedule, measure again, and tighten while it misses (bounded). The model is not modified."""
    grid = sparsity_grid(model, cfg)
    search = Search(model, cfg, meter, prune_fn, grid)
    try:
        index = search.least_meeting()
    except Unreachable as exc:
        raise PruneError(unreachable_message(cfg, model, exc.sparsity, exc.reading)) from None
    predicted = search.readings[index].value
    retries = 0
    while True:
        final = cfg.model_copy(update={"sparsity": grid[index], "budget": None})
        # the trial already is this model (l1/l2/fpgm, one shot): no second engine run; a count or a
        # file size cannot change, a latency is measured again
        same = final == trial_cfg(cfg, grid[index]) and index in search.results
        result = search.results[index] if same else prune_fn(model, final)
        meter.label = f"chosen model at sparsity {grid[index]:.3f}"
        again = not same or meter.kind in LATENCY_KINDS
        reading = meter(model, result.model) if again else search.readings[index]
        search.history.append(
            {
                "sparsity": grid[index],
                "value": reading.value,
                "low": reading.low,
                "high": reading.high,
                "met": reading.met,
                "stage": "final",
            }
        )
        if reading.met or retries >= cfg.budget.max_retries or index == len(grid) - 1:
            break
        index, retries = index + 1, retries + 1
    b = cfg.budget
    latency = b.kind in ("speedup", "latency_ms")
    decision = Decision(
        b.kind,
        float(b.target),
        cfg.allocation,
        grid[index],
        reading.met,
        reading.value,
        reading.low,
        reading.high,
        predicted,
        search.trials,
        retries,
        len(grid),
        b.batch_size if latency else None,
        b.threads if latency else None,
        search.history,
        reading.detail,
        file=b.file,
    )
    return result, decision


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -1.0  # one replicate has no interval; MLflow takes no inf
