"""The latency-comparison primitive (bench/compare.py): intervals, the stopping rule, the gate.

Real timings are asserted only against their own intervals (a model against itself reaches 1.0,
a model against itself applied twice reaches 2.0), each within the gate's 10% margin: a known
ratio is only known to that precision (a second pass over the same weights runs with warmer
caches, a per-call overhead is paid once; the fresh-clone CI run measured twice/once at
2.04x [2.01, 2.09] on a loaded machine, and docs/latency.md's A vs A misses lie within 0.90-1.07x).
The stopping and gating rules run on fed replicates with known ratios, so nothing here depends on
how fast this machine is.
"""

import json
import math
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.bench.compare import Plan, Settings, compare, gate, interval, run_replicate
from toolchain.errors import BenchError


def chain_onnx(path, times: int, width: int = 512, depth: int = 2):
    """x -> (MatMul, Tanh) x depth, the whole chain applied `times` times with the same weights:
    times=2 does exactly twice the work of times=1 with one call's fixed overhead."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((width, width)) / math.sqrt(width)).astype(np.float32), f"w{i}")
        for i in range(depth)
    ]
    nodes, x = [], "input"
    for t in range(times):
        for i in range(depth):
            nodes += [
                helper.make_node("MatMul", [x, f"w{i}"], [f"m{t}_{i}"]),
                helper.make_node("Tanh", [f"m{t}_{i}"], [f"h{t}_{i}"]),
            ]
            x = f"h{t}_{i}"
    nodes.append(helper.make_node("Identity", [x], ["out"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    d = tmp_path_factory.mktemp("chains")
    return {"once": str(chain_onnx(d / "once.onnx", 1)), "twice": str(chain_onnx(d / "twice.onnx", 2))}


ONE_THREAD = Settings(intra_op_threads=1, block_s=0.02, blocks=4)
MARGIN = 1.10  # the default quantize gate's margin (min_speedup 1.1): what a decision has to resolve


def reaches(iv, ratio: float) -> bool:
    """The interval, widened by the gate's margin, contains `ratio`."""
    return iv.low / MARGIN <= ratio <= iv.high * MARGIN


# ---------------------------------------------------------------- statistics


def test_interval_contains_its_median_and_narrows_with_agreement():
    wide = interval([1.0, 1.5, 2.0])
    tight = interval([1.49, 1.5, 1.51])
    assert wide.low <= wide.ratio <= wide.high and wide.ratio == 1.5
    assert tight.low <= 1.5 <= tight.high
    assert tight.width < wide.width
    assert interval([2.0] * 4).low == pytest.approx(2.0)


def test_interval_of_one_replicate_claims_nothing():
    iv = interval([1.7])
    assert iv.low == 0 and iv.high == math.inf and gate(iv, 1.1) == "undecided"


def test_interval_refuses_nonsense_ratios():
    for bad in ([], [0.0, 1.0], [float("nan"), 1.0], [-1.0, 2.0]):
        with pytest.raises(BenchError):
            interval(bad)


def test_gate_takes_the_lower_end():
    assert gate(interval([1.3, 1.35, 1.4]), 1.1) == "clears"
    assert gate(interval([0.9, 0.95, 1.0]), 1.1) == "below"
    assert gate(interval([0.97, 1.8, 1.04]), 1.1) == "undecided"  # the processes of issue 29


# ---------------------------------------------------------------- stopping rule (fed replicates)


def _feeder(ratios_per_replicate):
    """A replicate function returning the given ratios for every pair and batch size, in turn."""
    it = iter(ratios_per_replicate)

    def replicate(spec):
        r = next(it)
        keys = [f"{b}|{c}@{bs}" for b, c in spec["pairs"] for bs in spec["batch_sizes"]]
        return {"ratios": {k: r for k in keys}, "medians_ms": {}, "times": {}, "shapes": {}}

    return replicate


FILES = {"float": "f.onnx", "int8": "q.onnx"}


def test_stops_when_converged():
    c = compare(
        FILES,
        [("float", "int8")],
        [1],
        plan=Plan(min_replicates=3, max_replicates=20, target_width=0.05),
        replicate=_feeder([1.50, 1.51, 1.50, 9.0]),
    )
    assert c.stopped == "converged" and len(c.replicates) == 3


def test_keeps_adding_replicates_until_max_when_noisy():
    c = compare(
        FILES,
        [("float", "int8")],
        [1, 32],
        plan=Plan(min_replicates=3, max_replicates=6, budget_s=600),
        replicate=_feeder([0.97, 1.80, 1.04, 1.00, 1.57, 1.03, 5.0]),
    )
    assert c.stopped == "max_replicates" and len(c.replicates) == 6
    assert gate(c.ratio("float", "int8", 32), 1.1) == "undecided"


def test_stops_when_resolved_against_the_gate():
    # wide but entirely above 1.1 after 3 replicates: no need to narrow it further for the decision
    c = compare(
        FILES,
        [("float", "int8")],
        [1],
        plan=Plan(min_replicates=3, max_replicates=20, target_width=0.01),
        replicate=_feeder([1.6, 2.0, 1.8, 1.7]),
        decide_at=1.1,
    )
    assert c.stopped == "resolved" and len(c.replicates) == 3


def test_stops_on_budget_and_says_so():
    fed = _feeder([1.0, 1.3] * 50)  # never converges at target_width 0.001

    def slow(spec):
        time.sleep(0.05)
        return fed(spec)

    c = compare(
        FILES,
        [("float", "int8")],
        [1],
        plan=Plan(min_replicates=2, max_replicates=100, budget_s=0.12, target_width=0.001),
        replicate=slow,
    )
    assert c.stopped == "budget" and 2 <= len(c.replicates) < 100


def _per_pair_feeder(ratio_of, specs):
    """A replicate function: ratio_of(candidate, batch_size, i) for the i-th replicate, with stats rows
    for every file in the spec; records each spec it was handed."""

    def replicate(spec):
        i = len(specs)
        specs.append(spec)
        ratios = {f"{b}|{c}@{bs}": ratio_of(c, bs, i) for b, c in spec["pairs"] for bs in spec["batch_sizes"]}
        keys = [f"{n}@{bs}" for n in spec["files"] for bs in spec["batch_sizes"]]
        return {
            "ratios": ratios,
            "medians_ms": {k: 1.0 + i for k in keys},
            "times": {k: [(1.0 + i) / 1e3] * 3 for k in keys},
            "shapes": {k: [int(k.split("@")[1]), 3] for k in keys},
        }

    return replicate


def test_a_settled_comparison_leaves_the_later_replicates():
    # "slow" is below the gate at batch 32 after 3 replicates: it cannot clear at every batch size, so
    # the later replicates time only float and "noisy", whose batch-1 interval keeps straddling 1.1
    noisy = [0.97, 1.80, 1.04, 1.00, 1.57, 1.03]
    ratio_of = lambda cand, bs, i: (1.5 if bs == 1 else 0.92 + 0.01 * i) if cand == "slow" else noisy[i]  # noqa: E731
    specs = []
    c = compare(
        {"float": "f.onnx", "slow": "s.onnx", "noisy": "n.onnx"},
        [("float", "slow"), ("float", "noisy")],
        [1, 32],
        plan=Plan(min_replicates=3, max_replicates=6, budget_s=600),
        replicate=_per_pair_feeder(ratio_of, specs),
        decide_at=1.1,
    )
    assert c.stopped == "max_replicates" and len(c.replicates) == 6
    assert [sorted(s["files"]) for s in specs[3:]] == [["float", "noisy"]] * 3
    assert all(s["pairs"] == [["float", "noisy"]] for s in specs[3:])
    assert c.ratio("float", "slow", 32).replicates == 3 and gate(c.ratio("float", "slow", 32), 1.1) == "below"
    assert c.ratio("float", "noisy", 1).replicates == 6
    slow, floats = c.stats("slow"), c.stats("float")
    assert [r["p50_ms"] for r in slow] == [2.0, 2.0]  # the median of its own 3 replicates (1, 2, 3 ms)
    assert [r["p50_ms"] for r in floats] == [3.5, 3.5]  # float stayed in all 6
    assert {r["ratio"] for r in c.summary()["ratios"] if r["candidate"] == "slow"} and all(
        r["replicates"] == (3 if r["candidate"] == "slow" else 6) for r in c.summary()["ratios"]
    )


def test_one_batch_size_below_the_gate_resolves_the_comparison():
    # batch 1 straddles, batch 32 is below: the candidate cannot ship whatever batch 1 does
    ratio_of = lambda cand, bs, i: [0.97, 1.80, 1.04, 5.0][i] if bs == 1 else 0.9  # noqa: E731
    c = compare(
        FILES,
        [("float", "int8")],
        [1, 32],
        plan=Plan(min_replicates=3, max_replicates=20, budget_s=600),
        replicate=_per_pair_feeder(ratio_of, []),
        decide_at=1.1,
    )
    assert c.stopped == "resolved" and len(c.replicates) == 3
    assert gate(c.ratio("float", "int8", 1), 1.1) == "undecided"


def test_other_cpu_load_is_the_machines_busy_time_less_this_process_trees():
    from toolchain.bench.compare import other_cpu_load

    # 4 busy CPU-seconds on the machine in 2 s, 2 of them this process's (or its replicates'): 1 CPU other
    assert other_cpu_load((10.0, 1.0), (14.0, 3.0), 2.0) == 1.0
    assert other_cpu_load((10.0, 1.0), (11.0, 2.5), 2.0) == 0.0  # clock granularity: never negative
    assert other_cpu_load(None, (14.0, 3.0), 2.0) is None


def test_a_busy_process_beside_the_comparison_is_measured_as_other_load():
    from toolchain.bench.compare import cpu_clock

    if cpu_clock() is None:
        pytest.skip("no /proc/stat")
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 30: pass"])
    try:
        time.sleep(0.2)
        fed = _feeder([1.5, 1.5, 1.5])

        def idle(spec):  # this process sleeps: the CPU time in these 1.2 s is someone else's
            time.sleep(0.4)
            return fed(spec)

        c = compare(FILES, [("float", "int8")], [1], plan=Plan(min_replicates=3, max_replicates=3), replicate=idle)
    finally:
        spin.kill()
        spin.wait()
    assert c.environment["other_cpu_load"] >= 0.5, c.environment  # one spinning process: about one CPU


def test_unknown_name_in_a_pair_is_one_line():
    with pytest.raises(BenchError, match="only float, int8 have files"):
        compare(FILES, [("float", "teacher")], [1], replicate=_feeder([1.0]))


# ---------------------------------------------------------------- real timings


def test_a_model_against_itself_contains_one(chains):
    files = {"a": chains["once"], "b": chains["once"]}
    c = compare(files, [("a", "b")], [1, 8], ONE_THREAD, Plan(min_replicates=3, max_replicates=4, isolation="session"))
    for bs in (1, 8):
        iv = c.ratio("a", "b", bs)
        assert reaches(iv, 1.0), iv


@pytest.mark.slow  # on an oversubscribed machine (load 6 on 2 cores) wall-clock ratios of unequal calls are distorted
def test_twice_the_work_recovers_two(chains):
    files = {"twice": chains["twice"], "once": chains["once"]}
    settings = Settings(intra_op_threads=1, block_s=0.05, blocks=6)
    c = compare(
        files, [("twice", "once")], [64], settings, Plan(min_replicates=4, max_replicates=6, isolation="session")
    )
    iv = c.ratio("twice", "once", 64)
    assert reaches(iv, 2.0), iv
    assert not reaches(iv, 1.0), iv  # twice the work is resolved as slower, whatever the load
    assert c.replicates and c.stopped in ("converged", "max_replicates", "budget")


def test_stats_rows_have_the_bench_fields(chains):
    c = compare({"a": chains["once"]}, [], [1, 4], ONE_THREAD, Plan(min_replicates=2, isolation="session"))
    rows = c.stats("a")
    assert [r["batch_size"] for r in rows] == [1, 4]
    for r in rows:
        assert r["input_shape"][0] == r["batch_size"]
        assert (
            r["min_ms"] <= r["p50_ms"] <= r["p99_ms"]
            and r["iterations"] >= 2 * ONE_THREAD.blocks * ONE_THREAD.min_calls
        )


def test_replicate_in_a_fresh_process(chains):
    """The default isolation: one python per replicate, spec in and result out as JSON."""
    c = compare(
        {"a": chains["once"], "b": chains["once"]},
        [("a", "b")],
        [2],
        ONE_THREAD,
        Plan(min_replicates=2, max_replicates=2, isolation="process"),
    )
    assert len(c.replicates) == 2 and c.ratio("a", "b", 2).replicates == 2
    summary = c.summary()
    json.dumps(summary)  # recorded as is in candidates.json / bench.json
    assert summary["environment"]["load_average"]["start"] is not None  # recorded: a loaded machine distorts ratios
    assert summary["environment"]["other_cpu_load"] is not None  # Linux: what other processes ran meanwhile
    assert summary["settings"]["intra_op_threads"] == 1 and summary["stopped"] in ("converged", "max_replicates")


def test_worker_error_is_one_line(tmp_path):
    spec = {
        "files": {"a": str(tmp_path / "missing.onnx")},
        "pairs": [],
        "batch_sizes": [1],
        "settings": {},
        "input_shape": None,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "toolchain.bench.compare"], input=json.dumps(spec), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_replicate_rejects_a_shape_the_model_cannot_take(chains):
    with pytest.raises(BenchError, match="does not fit"):
        run_replicate({"a": chains["once"]}, [], [1], ONE_THREAD, input_shape=[3, 32, 32])


# ---------------------------------------------------------------- per-node profile


def test_node_profile_covers_every_op_of_the_optimised_graph(chains):
    from toolchain.bench.profile import format_profile, node_profile

    prof = node_profile(chains["twice"], batch_size=4, settings=ONE_THREAD, runs=5, replicates=2)
    ops = {n["op_type"] for n in prof["nodes"]}
    assert {"MatMul", "Tanh"} <= ops or {"FusedMatMul", "Tanh"} <= ops
    assert prof["total_us"] == pytest.approx(sum(n["us"] for n in prof["nodes"]))
    assert prof["total_us"] == pytest.approx(sum(prof["op_types"].values()))
    assert [n["us"] for n in prof["nodes"]] == sorted((n["us"] for n in prof["nodes"]), reverse=True)
    assert prof["replicates"] == 2 and prof["settings"]["intra_op_threads"] == 1
    assert "per-node profile, batch 4" in format_profile(prof)
    assert len([n for n in prof["nodes"] if n["op_type"] == "Tanh"]) == 4  # both applications of the chain
