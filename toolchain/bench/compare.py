"""Paired latency comparisons whose intervals survive a second measurement. Torch-free (numpy,
onnxruntime, the standard library), so it runs on the device like ort.py.

Why it is built this way (docs/latency.md has the measurements):
- Two sessions timed run by run (A, B, A, B...) measure each other's spinning intra-op threads,
  so the sides alternate in *blocks* (each runs for `block_s`, order flipped every block) and the
  first calls of every block are not timed.
- Paired blocks inside one process agree with each other and not with the next process (0.97x in
  one, 1.80x in the next), so the unit of replication is a fresh process (or, with
  isolation="session", fresh sessions): one replicate = fresh sessions of every model, its own
  blocks, one ratio of medians per comparison and batch size.
- The result is the median of the replicates' ratios with a 95% t-interval on their logarithms
  (widened to contain the median); replicates are added until every comparison is settled (its
  intervals narrower than `target_width`, or its gate decided against `decide_at`), or the time
  budget is spent. A settled comparison leaves the later replicates, so they time only the
  undecided ones: each interval carries its own replicate count.

API:
    compare(files, pairs, batch_sizes, settings=Settings(), plan=Plan(), decide_at=None) -> Comparison
        files: name -> .onnx path; pairs: [(baseline, candidate), ...]; a ratio > 1 means the
        candidate is faster. Comparison.ratio(base, cand, bs) -> Interval; Comparison.stats(name)
        -> ort.benchmark-style rows (p50/p90/p99 of every timed call, p50 = median of replicates).
    gate(interval, threshold) -> "clears" | "below" | "undecided"
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import BenchError, first_line
from .ort import create_session, environment, latency_stats, make_input, model_input, resolve_input_shape, result_rows

Pair = Tuple[str, str]  # (baseline, candidate)

# two-sided 95% Student t quantiles by degrees of freedom (scipy is not on every device)
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}


@dataclass(frozen=True)
class Settings:
    """How one replicate times: the target's threads, and the block design."""

    intra_op_threads: int = 0  # 0: one per physical core (onnxruntime's default)
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    provider: str = "cpu"
    block_s: float = 0.05  # seconds one side runs per block
    blocks: int = 6  # blocks per side per replicate, order flipped every block
    warmup_calls: int = 2  # untimed calls opening each block (the other session's threads still spin)
    min_calls: int = 3  # timed calls per block even when one call outlasts block_s


@dataclass(frozen=True)
class Plan:
    """How many replicates: at least min_replicates, then until converged, resolved or out of budget."""

    min_replicates: int = 3
    max_replicates: int = 10
    target_width: float = 0.10  # stop when high / low - 1 <= this for every comparison
    budget_s: float = 60.0
    isolation: str = "process"  # "process": a fresh python per replicate; "session": fresh sessions in this one


@dataclass(frozen=True)
class Interval:
    ratio: float  # median over replicates of baseline p50 / candidate p50
    low: float
    high: float
    replicates: int
    spread: Tuple[float, float]  # smallest and largest replicate ratio

    @property
    def width(self) -> float:
        return self.high / self.low - 1 if self.low > 0 else math.inf

    def text(self) -> str:
        return f"{self.ratio:.2f}x [{self.low:.2f}, {self.high:.2f}]"

    def as_dict(self) -> Dict[str, Any]:
        return {
            "ratio": self.ratio,
            "low": self.low,
            "high": self.high,
            "replicates": self.replicates,
            "spread": list(self.spread),
        }


def interval(ratios: Sequence[float]) -> Interval:
    """Median ratio with a 95% t-interval on the log-ratios (one replicate: no width to claim)."""
    xs = [float(r) for r in ratios]
    if not xs or any(not (r > 0 and math.isfinite(r)) for r in xs):
        raise BenchError(f"latency ratios must be positive and finite, got {xs}")
    med = float(statistics.median(xs))
    if len(xs) == 1:
        return Interval(med, 0.0, math.inf, 1, (xs[0], xs[0]))
    logs = np.log(xs)
    df = len(xs) - 1
    half = _t95(df) * float(np.std(logs, ddof=1)) / math.sqrt(len(xs))
    mean = float(np.mean(logs))
    low, high = math.exp(mean - half), math.exp(mean + half)
    return Interval(med, min(low, med), max(high, med), len(xs), (min(xs), max(xs)))


def _t95(df: int) -> float:
    # between table rows, the next smaller df: the wider, conservative quantile
    return _T95[max(k for k in _T95 if k <= df)] if df <= 120 else 1.96


def gate(iv: Interval, threshold: float) -> str:
    """Where an interval lies against a threshold: the decision takes its lower end."""
    if iv.low >= threshold:
        return "clears"
    if iv.high < threshold:
        return "below"
    return "undecided"


@dataclass
class Comparison:
    pairs: List[Pair]
    batch_sizes: List[int]
    settings: Settings
    plan: Plan
    replicates: List[Dict[str, Any]] = field(default_factory=list)
    stopped: str = ""  # converged | resolved | budget | max_replicates
    elapsed_s: float = 0.0
    environment: Dict[str, Any] = field(default_factory=dict)

    def ratio(self, base: str, cand: str, batch_size: int) -> Interval:
        key = _pair_key((base, cand), batch_size)
        return interval([r["ratios"][key] for r in self.replicates if key in r["ratios"]])

    def intervals(self) -> Dict[Tuple[str, str, int], Interval]:
        return {(b, c, bs): self.ratio(b, c, bs) for b, c in self.pairs for bs in self.batch_sizes}

    def stats(self, name: str) -> List[Dict[str, Any]]:
        """ort.benchmark-style rows: p50 = median of the replicates' medians, the tails over every call."""
        rows = []
        for bs in self.batch_sizes:
            key = f"{name}@{bs}"
            timed = [r for r in self.replicates if key in r["times"]]  # a settled comparison left the later ones
            calls = [t for r in timed for t in r["times"][key]]
            row = {
                "provider": self.settings.provider,
                "batch_size": bs,
                "input_shape": timed[0]["shapes"][key],
                **latency_stats(calls, bs),
            }
            row["p50_ms"] = float(statistics.median(r["medians_ms"][key] for r in timed))
            rows.append(row)
        return rows

    def replicates_text(self) -> str:
        """ "6 fresh-process replicates" / "6 fresh-session replicates": what one replicate was."""
        return f"{len(self.replicates)} fresh-{self.plan.isolation} replicates"

    def summary(self) -> Dict[str, Any]:
        """What a stage records: settings, the stopping reason, and each interval."""
        return {
            "settings": asdict(self.settings),
            "plan": asdict(self.plan),
            "stopped": self.stopped,
            "replicates": len(self.replicates),
            "elapsed_s": self.elapsed_s,
            "environment": self.environment,
            "ratios": [
                {"baseline": b, "candidate": c, "batch_size": bs, **iv.as_dict()}
                for (b, c, bs), iv in self.intervals().items()
            ],
        }


def p50_smallest(results) -> float:
    """p50 at the smallest CPU batch (the latency PE uses), else the smallest batch of any provider."""
    rows = [r for r in result_rows(results) if r["provider"] == "cpu"] or result_rows(results)
    return min(rows, key=lambda r: r["batch_size"])["p50_ms"]


def _pair_key(pair: Pair, batch_size: int) -> str:
    return f"{pair[0]}|{pair[1]}@{batch_size}"


# ---------------------------------------------------------------- one replicate


def _timed_block(run: Callable[[], Any], s: Settings) -> List[float]:
    for _ in range(s.warmup_calls):
        run()
    times: List[float] = []
    deadline = time.perf_counter() + s.block_s
    while True:
        start = time.perf_counter()
        run()
        end = time.perf_counter()
        times.append(end - start)
        if end >= deadline and len(times) >= s.min_calls:
            return times


def run_replicate(
    files: Dict[str, str],
    pairs: Sequence[Pair],
    batch_sizes: Sequence[int],
    s: Settings,
    input_shape: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Fresh sessions of every model, then per batch size and comparison: blocks, order flipped
    every block. Models in no pair still get blocks of their own (their stats)."""
    sessions = {
        n: create_session(p, s.provider, s.intra_op_threads, s.inter_op_threads, s.graph_optimization)
        for n, p in files.items()
    }
    times: Dict[str, List[float]] = {}
    pair_times: Dict[str, Dict[str, List[float]]] = {}
    shapes: Dict[str, List[int]] = {}
    for bs in batch_sizes:
        runs = {n: _runner(sess, bs, input_shape, shapes, f"{n}@{bs}") for n, sess in sessions.items()}
        for pair in [*pairs, *((n, n) for n in files if not any(n in p for p in pairs))]:
            sides = list(dict.fromkeys(pair))
            own = {n: [] for n in sides}
            for block in range(s.blocks):
                for n in sides if block % 2 == 0 else sides[::-1]:
                    own[n] += _timed_block(runs[n], s)
            pair_times[_pair_key(pair, bs)] = own
            for n, t in own.items():
                times.setdefault(f"{n}@{bs}", []).extend(t)
    return _replicate_result(pairs, batch_sizes, times, pair_times, shapes)


def _runner(session, batch_size: int, input_shape, shapes: Dict[str, List[int]], key: str) -> Callable[[], Any]:
    inp = model_input(session)
    shape = resolve_input_shape(inp["shape"], batch_size, input_shape)
    feed = {inp["name"]: make_input(shape, inp["dtype"])}
    shapes[key] = list(shape)
    try:
        session.run(None, feed)  # a shape the graph rejects fails here, before any timing
    except Exception as exc:
        raise BenchError(f"onnxruntime cannot run the model on input shape {list(shape)}: {first_line(exc)}") from None
    return lambda: session.run(None, feed)


def _replicate_result(pairs, batch_sizes, times, pair_times, shapes) -> Dict[str, Any]:
    ratios = {}
    for pair in pairs:
        for bs in batch_sizes:
            own = pair_times[_pair_key(pair, bs)]
            ratios[_pair_key(pair, bs)] = float(np.median(own[pair[0]]) / np.median(own[pair[1]]))
    return {
        "ratios": ratios,
        "medians_ms": {k: float(np.median(v)) * 1e3 for k, v in times.items()},
        "times": times,
        "shapes": shapes,
    }


# ---------------------------------------------------------------- replicates


def _spec(files, pairs, batch_sizes, s: Settings, input_shape) -> Dict[str, Any]:
    return {
        "files": {n: str(p) for n, p in files.items()},
        "pairs": [list(p) for p in pairs],
        "batch_sizes": [int(b) for b in batch_sizes],
        "settings": asdict(s),
        "input_shape": list(input_shape) if input_shape else None,
    }


def _replicate_in_process(spec: Dict[str, Any]) -> Dict[str, Any]:
    return run_replicate(
        spec["files"],
        [tuple(p) for p in spec["pairs"]],
        spec["batch_sizes"],
        Settings(**spec["settings"]),
        spec["input_shape"],
    )


def _replicate_in_subprocess(spec: Dict[str, Any]) -> Dict[str, Any]:
    """A fresh interpreter: its own allocator state and thread placement, as a second user's would be."""
    proc = subprocess.run(
        [sys.executable, "-m", "toolchain.bench.compare"], input=json.dumps(spec), capture_output=True, text=True
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise BenchError(f"latency replicate failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return json.loads(proc.stdout)


def compare(
    files: Dict[str, Any],
    pairs: Sequence[Pair],
    batch_sizes: Sequence[int],
    settings: Settings = Settings(),
    plan: Plan = Plan(),
    decide_at: Optional[float] = None,
    input_shape: Optional[Sequence[int]] = None,
    replicate: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Comparison:
    """Replicates until every comparison is settled (_settled: its intervals narrower than
    plan.target_width, or its gate decided against decide_at), or the budget or max_replicates ends
    it. A settled comparison is not timed again (its files leave the later replicates' specs).
    `replicate` replaces the timing (tests feed it known ratios)."""
    pairs = [tuple(p) for p in pairs]
    unknown = sorted({n for p in pairs for n in p} - set(files))
    if unknown:
        raise BenchError(f"comparison names {', '.join(unknown)} but only {', '.join(files)} have files")
    if replicate is None:
        replicate = _replicate_in_subprocess if plan.isolation == "process" else _replicate_in_process
    out = Comparison(
        pairs,
        [int(b) for b in batch_sizes],
        settings,
        plan,
        environment=environment(settings.intra_op_threads, settings.inter_op_threads, settings.graph_optimization),
    )
    load_start, clock_start, start = _load_average(), cpu_clock(), time.perf_counter()
    unpaired = [n for n in files if not any(n in p for p in pairs)]  # stats only: timed in every replicate
    active = list(pairs)
    while True:
        began = time.perf_counter()
        in_play = [n for n in files if n in unpaired or any(n in p for p in active)]
        out.replicates.append(
            replicate(_spec({n: files[n] for n in in_play}, active, batch_sizes, settings, input_shape))
        )
        now = time.perf_counter()
        if len(out.replicates) >= plan.min_replicates:
            active = [p for p in active if not _settled(out, p, decide_at)]
        out.stopped = _stop_reason(out, active, now - start, now - began)
        if progress:
            progress(_progress_line(out))
        if out.stopped:
            out.elapsed_s = now - start
            out.environment["load_average"] = {"start": load_start, "end": _load_average()}
            out.environment["other_cpu_load"] = other_cpu_load(clock_start, cpu_clock(), out.elapsed_s)
            return out


def cpu_clock() -> Optional[Tuple[float, float]]:
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process and its finished children),
    from /proc/stat (Linux; None elsewhere). The replicates are this process's children, so the
    difference of the two is what *other* processes ran during a comparison."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    return busy, own.user + own.system + own.children_user + own.children_system


def other_cpu_load(start: Optional[Tuple[float, float]], end: Optional[Tuple[float, float]], elapsed: float):
    """CPUs kept busy by other processes during the comparison, on average (0.5: half a core). The
    1-minute load average cannot say this: a comparison's own threads (the session timed, the idle
    ones still spinning) pushed it to 2.8 on 2 cores with nothing else running."""
    if start is None or end is None or elapsed <= 0:
        return None
    other = (end[0] - start[0]) - (end[1] - start[1])
    return round(max(0.0, other) / elapsed, 3)


def _load_average() -> Optional[float]:
    """1-minute load average: above the core count, wall-clock ratios of unequal calls are distorted
    (the longer call is preempted more often), so the result records it next to the ratios."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return None


def _settled(out: Comparison, pair: Pair, decide_at: Optional[float]) -> bool:
    """Nothing more to learn for this comparison: every interval is narrow, or its gate is decided.
    The gate (quantize, prune budgets) asks for the lower end to clear decide_at at EVERY batch size,
    so one interval below it decides as well as all of them clearing does."""
    ivs = [out.ratio(*pair, bs) for bs in out.batch_sizes]
    if all(iv.width <= out.plan.target_width for iv in ivs):
        return True
    if decide_at is None:
        return False
    verdicts = {gate(iv, decide_at) for iv in ivs}
    return "below" in verdicts or verdicts == {"clears"}


def _stop_reason(out: Comparison, active: Sequence[Pair], elapsed: float, last: float) -> str:
    n, plan = len(out.replicates), out.plan
    if n >= plan.min_replicates and not active:
        narrow = all(iv.width <= plan.target_width for iv in out.intervals().values())
        return "converged" if narrow else "resolved"  # no pairs at all (stats only): converged
    if n >= plan.max_replicates:
        return "max_replicates"
    if n >= max(2, plan.min_replicates) and elapsed + last > plan.budget_s:
        return "budget"  # the next replicate would end past the budget
    return ""


def _progress_line(out: Comparison) -> str:
    widest = (
        max((iv for iv in out.intervals().values()), key=lambda iv: iv.width, default=None)
        if len(out.replicates) > 1 and out.pairs
        else None
    )
    tail = f", widest {widest.text()}" if widest else ""
    return f"replicate {len(out.replicates)}{tail}{f' -> {out.stopped}' if out.stopped else ''}"


def _worker() -> int:
    """One replicate in this process: the spec as JSON on stdin, the result as JSON on stdout."""
    try:
        result = _replicate_in_process(json.loads(sys.stdin.read()))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
