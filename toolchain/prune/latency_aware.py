"""`prune.allocation: latency_aware` (issue 31): kept channels per dependency group, chosen on a cost
model of the budget's own quantity, then measured.

    result, decision = choose(model, cfg, meter, prune_fn, example, tables)

1. The cost model (costmodel.py): the layers whose widths a group decides, each costed by a table of
   single-layer onnxruntime timings at the budget's batch size and threads (latency budgets: measured
   here once and kept in the stage cache, or a device's own table from `prune.budget.device_table`), or
   counted (macs, params, file_bytes); the constant is calibrated on the unpruned student.
2. The allocation: a greedy on that model (costmodel.allocate), the engine prunes once with those counts.
3. The verification: the pruned model is measured as the uniform search measures (budget.py's meters:
   a latency budget by paired replicated comparison with the student). Each measurement refits the
   scale of the model's channel-dependent part (Refit: what the single-layer table misses scales
   with the channels too), and the next target is where the refit model puts the budget, moved by
   the interval's half-width; a miss tightens the target, a model that beats the budget by more than
   3% relaxes it (it pruned more than it had to), and the allocation is repeated, at most
   budget.max_retries times (TargetSearch: never past a target that missed or below one that met);
   the met allocation keeping the most importance ships; a budget never met ships the allocation
   whose decisive end came nearest to it, reported NOT met.
   With a device table nothing here measures the device: the decision is the table's prediction,
   labelled so, and `attach` confirms it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch.nn as nn

from ..metrics import count_macs, count_params
from .budget import LATENCY_KINDS, Decision, Meter, Reading
from .costmodel import CostModel, LayerGraph, TableCost, allocate, count_cost, importance, layer_graph, table_spec
from .registry import PruneError

Tables = Callable[[Dict], Tuple[Dict, Dict]]  # spec -> (table, where it came from)

# In the prune stage's cache key when it allocates latency_aware: bump it when a change here or in
# costmodel.py changes what is chosen, so cached decisions of the old code are recomputed.
REVISION = 4


def choose(
    model: nn.Module, cfg, meter: Meter, prune_fn, example, tables: Tables, gradients=None
) -> Tuple[Any, Decision]:
    """See the module doc. `prune_fn(model, cfg, kept=...)` prunes a copy; the model is not modified;
    `gradients` (the stage's GradientSource) scores channels when the pruner is taylor."""
    b = cfg.budget
    graph = layer_graph(model, example, cfg)
    cost, student, info = cost_model(model, graph, b, meter, tables)
    target = _target(b, student)
    scores = importance(model, graph, cfg.pruner, gradients)
    final = cfg.model_copy(update={"budget": None})
    history: List[Dict[str, Any]] = []
    search, refit = TargetSearch(target), Refit(cost, student)
    best = None  # the met allocation that keeps the most importance: (importance, result, reading, predicted, kept)
    closest = None  # while none is met: the one whose decisive end came nearest the budget (slack, ...)
    narrowest = graph.narrowest()
    while True:
        kept = allocate(cost, scores, search.target)
        if kept is None and b.device_table:  # the prediction is all there is (the preflight checked it)
            raise PruneError(_unreachable(b, _narrowest(b, cost, graph, student)))
        if kept is None:
            # The target is past the model's narrowest allocation (a pessimistic model, or measurements
            # that tightened it); the measurement decides, not the model: the narrowest is tried, once.
            if any(h["kept"] == _named(graph, narrowest) for h in history):
                break
            kept = narrowest
        layers = cost.layers_cost(kept)
        predicted = _in_budget_units(b, refit.cost_of(layers), student)
        named = _named(graph, kept)
        result = prune_fn(model, final, kept=named)
        _check_widths(graph, kept, result.model, cfg.engine)
        reading = _predicted_reading(b, predicted) if b.device_table else _measure(meter, model, result, len(history))
        history.append(_record(reading, predicted, named, len(history), _in_budget_units(b, cost.cost(kept), student)))
        kept_importance = sum(float(s[:k].sum()) for s, k in zip(scores, kept))
        if reading.met and (best is None or kept_importance > best[0]):
            best = (kept_importance, result, reading, predicted, named)
        if closest is None or _slack(b, reading) > closest[0]:
            closest = (_slack(b, reading), result, reading, predicted, named)
        if b.device_table or len(history) > b.max_retries:
            break
        refit.add(layers, _in_model_units(b, reading.value, student))
        if not search.next(reading.met, _slack(b, reading), refit.target_for(_aim(b, reading, student))):
            break
    # a missed budget ships the nearest miss, not the last try (a latency cliff can make a tighter
    # allocation measure slower: 5.08x, then 4.79x, at 5x on the demo)
    _, result, reading, predicted, named = best if best is not None else closest
    retries = len(history) - 1
    latency = b.kind in LATENCY_KINDS
    info.update(predicted=predicted, error_pct=_error_pct(b, predicted, reading), kept=named, refit_scale=refit.alpha)
    decision = Decision(
        b.kind,
        float(b.target),
        cfg.allocation,
        float(result.report["sparsity_achieved"]),
        reading.met,
        reading.value,
        reading.low,
        reading.high,
        predicted,
        len(history),
        retries,
        0,
        b.batch_size if latency else None,
        b.threads if latency else None,
        history,
        reading.detail,
        cost_model=info,
        file=b.file,
    )
    return result, decision


# ---------------------------------------------------------------- the cost model


def cost_model(model: nn.Module, graph: LayerGraph, b, meter: Meter, tables: Tables) -> Tuple[CostModel, float, Dict]:
    """The model of the budget's quantity, calibrated on the student, the student's value in the
    model's units (ms, MACs, parameters, bytes), and what to record about it."""
    info: Dict[str, Any] = {"layers": len(graph.layers), "groups": len(graph.groups), "unmodelled": graph.unmodelled}
    if b.kind in LATENCY_KINDS:
        started = time.perf_counter()
        table, where = tables(table_spec(graph, b.batch_size, b.threads or 0))
        info.update(table=where, table_entries=len(table["entries"]), table_s=round(time.perf_counter() - started, 1))
        cost = CostModel(graph, TableCost(graph, lambda layer: _lookup(table, layer)))
        if b.device_table:  # the device's whole model was never timed: the layers' sum is the prediction
            return cost, cost.cost(graph.full()), info
        student = meter.student_ms(model)
        info["student_ms"] = student
    elif b.kind == "file_bytes":
        cost = CostModel(graph, count_cost("file_bytes_int8" if b.file == "int8" else "file_bytes"))
        student = meter.size(model, "student")
    else:
        cost = CostModel(graph, count_cost(b.kind))
        shape = (1, *meter.example.shape[1:])
        student = float(count_macs(model, shape) if b.kind == "macs" else count_params(model))
    cost.calibrate(student)
    info["constant"] = cost.constant
    return cost, student, info


def _lookup(table: Dict, layer: Dict) -> float:
    from ..bench.latency_table import lookup

    return lookup(table, layer)


def _target(b, student: float) -> float:
    """The budget in the cost model's units."""
    if b.kind == "speedup":
        return student / b.speedup
    if b.kind in ("macs", "params"):
        return student * b.target
    return float(b.target)  # latency_ms, file_bytes


def _in_budget_units(b, cost: float, student: float) -> float:
    if b.kind == "speedup":
        return student / cost
    if b.kind in ("macs", "params"):
        return cost / student
    return cost


def _check_widths(graph: LayerGraph, kept: List[int], pruned: nn.Module, engine: str) -> None:
    """The engine pruned what was allocated, layer by layer, or a one-line PruneError: a model whose
    grouping the engine sees differently (Torch-Pruning couples a grouped conv's input to its
    producer, NNI does not) would otherwise be measured and reported as the allocation it is not."""
    from .targets import in_channels, out_channels

    for layer in graph.layers:
        module = pruned.get_submodule(layer.name)
        got, asked = (in_channels(module), out_channels(module)), layer.widths(kept)
        if got != asked:
            # NNI's own groups are the cost model's, so on nni the only way out is the other allocation
            fix = "prune.allocation: uniform" if engine == "nni" else "prune.engine: nni, or prune.allocation: uniform"
            raise PruneError(
                f"prune.allocation latency_aware: engine {engine} pruned {layer.name} to {got[0]} -> {got[1]} "
                f"channels where the allocation asked {asked[0]} -> {asked[1]} (its dependency groups differ "
                f"from the cost model's here); use {fix}"
            )


def _named(graph: LayerGraph, kept: List[int]) -> Dict[str, int]:
    return {g.name: k for g, k in zip(graph.groups, kept)}


def _predicted_reading(b, predicted: float) -> Reading:
    met = predicted >= b.target if b.kind == "speedup" else predicted <= b.target
    return Reading(predicted, predicted, predicted, met, {"predicted_on": "device table"})


def _measure(meter: Meter, model, result, retries: int) -> Reading:
    meter.label = f"allocation {retries + 1}"
    return meter(model, result.model)


def _record(
    reading: Reading, predicted: float, kept: Dict[str, int], retries: int, predicted_table: float
) -> Dict[str, Any]:
    return {
        "stage": "allocation",
        "retry": retries,
        "predicted": predicted,
        "predicted_table": predicted_table,  # the table alone, before any refit
        "value": reading.value,
        "low": reading.low,
        "high": reading.high,
        "met": reading.met,
        "kept": kept,
    }


def _slack(b, reading: Reading) -> float:
    """How far the measurement's decisive end is from the budget, as a factor on the model's target
    (cost): below 1 a miss by that much, above 1 room to prune less."""
    if b.kind == "speedup":
        seen = reading.low if np.isfinite(reading.low) and reading.low > 0 else reading.value
        return seen / b.speedup
    if b.kind == "latency_ms":
        seen = reading.high if np.isfinite(reading.high) and reading.high > 0 else reading.value
        return b.latency_ms / seen
    return b.target / reading.value


def _in_model_units(b, value: float, student: float) -> float:
    """A reading's value in the cost model's units (ms, MACs, parameters, bytes)."""
    if b.kind == "speedup":
        return student / value
    if b.kind in ("macs", "params"):
        return value * student
    return value


def _aim(b, reading: Reading, student: float) -> float:
    """Where the next allocation should land, in the model's units: the budget, moved by the last
    measurement's half-width so that the interval's decisive end (not its median) meets it."""
    if b.kind == "speedup" and np.isfinite(reading.low) and 0 < reading.low <= reading.value:
        return student / (b.speedup * reading.value / reading.low)
    if b.kind == "latency_ms" and np.isfinite(reading.high) and reading.high >= reading.value > 0:
        return b.latency_ms * reading.value / reading.high
    return _target(b, student)


class Refit:
    """The cost model's variable part rescaled by measurement. Single-layer timings miss what scales
    with the channels outside the timed layers (activations, adds, layout reorders: the table was 12-21%
    pessimistic at batch 32 on the demo), so every measured allocation refits alpha in
    cost = student - alpha * (layers(full) - layers(kept)): least squares through the student's own
    point. Scaling every layer alike leaves the greedy's order alone; it moves where it stops."""

    def __init__(self, cost: CostModel, student: float):
        self.cost, self.student = cost, student
        self.full = cost.layers_cost(cost.graph.full())
        self.points: List[Tuple[float, float]] = []  # (layers cost, measured cost), the model's units
        self.alpha = 1.0  # the table as calibrated: cost.cost()

    def add(self, layers: float, measured: float) -> None:
        self.points.append((layers, measured))
        num = sum((self.student - m) * (self.full - x) for x, m in self.points)
        den = sum((self.full - x) ** 2 for x, _ in self.points)
        if den > 0 and num > 0:
            self.alpha = num / den

    def cost_of(self, layers: float) -> float:
        return self.student - self.alpha * (self.full - layers)

    def target_for(self, aim: float) -> float:
        """The target, in the calibrated table's terms (what allocate compares with), of the
        allocations the refit model puts at `aim`."""
        return self.cost.constant + self.full - (self.student - aim) / self.alpha


class TargetSearch:
    """The cost model's target, corrected by measurement (NetAdapt's "as close to the budget as the
    measurement allows"): a miss tightens it by the shortfall, a model that beats the budget by more
    than `close` relaxes it by the surplus (it pruned more than it needed, which costs accuracy),
    never past a target that already missed or below one that already met (then halfway between)."""

    close = 1.03

    def __init__(self, target: float):
        self.target = target
        self.met_at: Optional[float] = None  # the largest target measured met
        self.missed_at: Optional[float] = None  # the smallest target measured missed

    def next(self, met: bool, slack: float, proposal: Optional[float] = None) -> bool:
        """Move the target after a measurement (to `proposal`, the refit model's, when it moves the
        right way; else by the slack); False when there is nothing left to try."""
        if met:
            self.met_at = max(self.met_at or 0.0, self.target)
            if slack < self.close:
                return False
            proposed = self.target * min(slack, 2.0) * 0.99
            if proposal is not None and self.target < proposal < self.target * 2:
                proposed = proposal
            if self.missed_at is not None:
                proposed = min(proposed, (self.target + self.missed_at) / 2)
        else:
            self.missed_at = min(self.missed_at or float("inf"), self.target)
            proposed = self.target * min(max(slack * 0.99, 0.5), 0.99)
            if proposal is not None and self.target * 0.5 < proposal < self.target:
                proposed = proposal
            if self.met_at is not None:
                proposed = max(proposed, (self.target + self.met_at) / 2)
        self.target = proposed
        return True


def _error_pct(b, predicted: float, reading: Reading) -> Optional[float]:
    """The cost model's error on the final model: (predicted - measured) / measured, in %."""
    if b.device_table or not reading.value:
        return None
    return 100.0 * (predicted - reading.value) / reading.value


def _narrowest(b, cost: CostModel, graph: LayerGraph, student: float) -> float:
    """The cost model's value, in the budget's units, of every group at its narrowest aligned width
    (prune.min_keep's floor where set)."""
    return _in_budget_units(b, cost.cost(graph.narrowest()), student)


def _unreachable(b, narrowest: float) -> str:
    return (
        f"prune.budget.{b.kind} {b.target:g}: the cost model predicts {narrowest:.4g} for the narrowest aligned "
        "allocation, which misses it; relax the budget, or lower prune.align (or prune.min_keep) / shrink prune.exclude"
    )


def predicted_narrowest(b, cost: CostModel, graph: LayerGraph, student: float) -> float:
    """The cost model's value of the narrowest aligned allocation, or a PruneError when it misses the budget."""
    narrowest = _narrowest(b, cost, graph, student)
    if not _predicted_reading(b, narrowest).met:
        raise PruneError(_unreachable(b, narrowest))
    return narrowest


# ---------------------------------------------------------------- tables


def table_key(spec: Dict) -> str:
    """What a measured table depends on: the layer shapes, batch size, threads, onnxruntime and the CPU."""
    import onnxruntime

    from ..bench.device import cpu_features, cpu_model, physical_cores

    what = {
        "spec": spec,
        "onnxruntime": onnxruntime.__version__,
        "cpu": [cpu_model(), physical_cores(), cpu_features()],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def local_tables(cache_dir: Optional[Path], progress: Optional[Callable[[str], None]] = None) -> Tables:
    """Tables measured on this machine, kept under cache_dir (a second budget on the same student,
    batch size and threads measures nothing)."""
    from ..bench.latency_table import load_table, measure_table
    from ..fsutil import atomic_write_json

    def tables(spec: Dict) -> Tuple[Dict, Dict]:
        path = cache_dir / f"{table_key(spec)}.json" if cache_dir else None
        if path is not None and path.exists():
            return load_table(path), {"source": "measured here (cached)", "path": str(path)}
        if progress:
            progress(
                f"[prune] latency table: timing {len(spec['layers'])} layer shapes (once per student, batch, threads)"
            )
        table = measure_table(spec)
        if path is not None:
            atomic_write_json(path, table)
        return table, {"source": "measured here", "path": str(path) if path else None}

    return tables


def device_tables(path: str) -> Tables:
    """The device's own table (python -m toolchain.bench --latency-table on the device)."""
    from ..bench.latency_table import load_table

    def tables(spec: Dict) -> Tuple[Dict, Dict]:
        table = load_table(path)
        for key in ("batch_size", "threads"):
            if table.get(key) != spec[key]:
                raise PruneError(
                    f"prune.budget.device_table {path} was measured at {key} {table.get(key)}, the budget asks "
                    f"{spec[key]}; measure it again with a spec of this budget (python -m toolchain latency-spec)"
                )
        return table, {"source": "device table", "path": path, "device": table.get("device", {})}

    return tables
