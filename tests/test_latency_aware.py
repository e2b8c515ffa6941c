"""prune.allocation latency_aware (issue 31): the cost model, the allocator, the stage's decision,
and a device's table from the torch-free bench into an allocation."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import blocked_imports_env

from toolchain.metrics import count_macs, count_params
from toolchain.prune import budget as B
from toolchain.prune import latency_aware as L
from toolchain.prune import prune_model
from toolchain.prune.costmodel import CostModel, Group, Layer, LayerGraph, allocate, count_cost, layer_graph
from toolchain.prune.registry import PruneError
from toolchain.prune.targets import in_channels, out_channels
from toolchain.recipe.pruning import PruneConfig


class Branches(nn.Module):
    """A concat of two pruned branches into a conv, a residual add, a depthwise conv and a Linear
    after a spatial flatten: the input-width rules the cost model derives from the graph."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.left = nn.Conv2d(32, 48, 1)
        self.right = nn.Conv2d(32, 64, 3, padding=1)
        self.mix = nn.Conv2d(112, 64, 1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.pw = nn.Conv2d(64, 64, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64 * 4, 40)
        self.head = nn.Linear(40, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.mix(torch.cat([self.left(x).relu(), self.right(x).relu()], 1))
        x = x + self.pw(self.dw(x).relu())
        return self.head(self.fc(self.pool(x).flatten(1)).relu())


MODELS = {
    "branches": Branches,
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10),  # pinned layers
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=10),  # grouped convs (blocks)
}


@pytest.mark.parametrize("engine", ["nni", "torch_pruning"])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_cost_model_counts_exactly_what_the_engine_prunes(name, engine, one_thread):
    """Random kept counts per group: every layer's predicted widths are the pruned model's, and the
    counted MACs and parameters (calibrated on the unpruned model) are the pruned model's counts."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 32, 32)
    cfg = PruneConfig(method="channel", align=8, engine=engine)
    graph = layer_graph(model, x, cfg)
    assert graph.groups and not graph.unmodelled
    rng = random.Random(0)
    kept = [rng.choice(g.options()) for g in graph.groups]
    pruned = prune_model(model, cfg, x, kept={g.name: k for g, k in zip(graph.groups, kept)}).model
    if (name, engine) == ("regnet_x_400mf", "torch_pruning"):  # couples a grouped conv to its producer
        with pytest.raises(PruneError, match="engine torch_pruning pruned .* use prune.engine: nni"):
            L._check_widths(graph, kept, pruned, engine)
        return
    L._check_widths(graph, kept, pruned, engine)
    for layer in graph.layers:
        module = pruned.get_submodule(layer.name)
        assert (in_channels(module), out_channels(module)) == layer.widths(kept), layer.name
    shape = (1, 3, 32, 32)
    for kind, count in (("macs", lambda m: count_macs(m, shape)), ("params", count_params)):
        cost = CostModel(graph, count_cost(kind))
        cost.calibrate(count(model))
        assert cost.cost(kept) == pytest.approx(count(pruned), rel=1e-9), kind


def test_a_width_the_engine_did_not_prune_as_allocated_is_one_line_with_a_fix_for_that_engine(one_thread):
    """Seen once with engine nni (mobilenet_v2, 32x32, a 3x budget at batch 32: 959 of 960 channels):
    the error names the layer and tells an nni user what they can change (not to switch to nni)."""
    torch.manual_seed(0)
    model = MODELS["mobilenet_v3_small"]().eval()
    graph = layer_graph(model, torch.randn(2, 3, 32, 32), PruneConfig(method="channel", align=8))
    narrower = [g.options()[0] for g in graph.groups]  # what was asked; the unpruned model is what came out
    fixes = {
        "nni": "; use prune.allocation: uniform",
        "torch_pruning": "; use prune.engine: nni, or prune.allocation: uniform",
    }
    for engine, fix in fixes.items():
        with pytest.raises(PruneError) as err:
            L._check_widths(graph, narrower, model, engine)
        message = str(err.value)
        assert f"engine {engine} pruned " in message and message.endswith(fix) and "\n" not in message


def _toy_graph(costs_per_channel, full=(32, 32, 32), step=8):
    """Independent groups, one Linear each, whose cost is linear in its output width."""
    groups = [Group((f"g{i}",), f, step) for i, f in enumerate(full)]
    layers = [Layer(f"g{i}", "linear", 4, f, i, (), 0, 1) for i, f in enumerate(full)]
    per = dict(zip((layer.name for layer in layers), costs_per_channel))
    return CostModel(LayerGraph(groups, layers), lambda layer, cin, cout: per[layer.name] * cout)


def _brute_force(cost, scores, target):
    best = None
    for kept in itertools.product(*(g.options() for g in cost.graph.groups)):
        if cost.cost(kept) <= target + 1e-9:
            value = sum(float(s[:k].sum()) for s, k in zip(scores, kept))
            best = max(best or (value, kept), (value, kept))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_the_allocator_picks_the_known_optimum_on_a_synthetic_table(seed):
    """Costs linear per group and every channel of a group as important as the others: the optimum
    is known (keep the channels that are cheapest per unit of importance), and brute force finds it."""
    rng = np.random.default_rng(seed)
    cost = _toy_graph([1.0, 2.0, 4.0])
    scores = [np.full(32, float(v)) for v in rng.uniform(0.5, 2.0, 3)]
    target = float(rng.choice([56, 96, 128, 160]))
    kept = allocate(cost, scores, target)
    value = sum(float(s[:k].sum()) for s, k in zip(scores, kept))
    assert cost.cost(kept) <= target
    assert value == pytest.approx(_brute_force(cost, scores, target)[0])


def test_the_allocator_prunes_where_latency_is_cheap_to_save():
    """Same importance everywhere, one group 4x as costly per channel: it is cut first."""
    cost = _toy_graph([1.0, 1.0, 4.0])
    kept = allocate(cost, [np.ones(32)] * 3, 32 + 32 + 4 * 8)
    assert kept == [32, 32, 8]
    assert allocate(cost, [np.ones(32)] * 3, 10.0) is None  # narrowest: 8 + 8 + 32


@pytest.mark.parametrize("engine", ["nni", "torch_pruning"])
def test_a_macs_budget_allocated_latency_aware_is_met_and_predicted_exactly(engine, one_thread):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    cfg = PruneConfig(method="channel", pruner="l1", align=16, engine=engine, budget={"macs": 0.5})
    assert cfg.allocation == "latency_aware"
    meter = B.make_meter(cfg.budget, x)
    result, d = L.choose(model, cfg, meter, lambda m, c, kept=None: prune_model(m, c, x, kept=kept), x, None)
    shape = (1, 3, 32, 32)
    measured = count_macs(result.model, shape) / count_macs(model, shape)
    assert d.met and d.value == pytest.approx(measured) and measured <= 0.5
    assert d.predicted == pytest.approx(measured, rel=1e-9) and d.cost_model["error_pct"] == pytest.approx(0, abs=1e-6)
    assert d.allocation == "latency_aware" and len(d.cost_model["kept"]) == d.cost_model["groups"]
    assert "(latency_aware, 1 trials, cost model predicted 0." in d.line()


def test_min_keep_floors_every_group_and_the_narrowest_allocation(one_thread):
    """prune.min_keep: no group of the allocation goes below that fraction of its channels (rounded up
    to align), where without it some do; a floor the budget cannot live with fails in the preflight."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)

    def kept_at(**extra):
        cfg = PruneConfig(method="channel", pruner="l1", align=16, budget={"macs": 0.3}, **extra)
        graph = layer_graph(model, x, cfg)
        _, d = L.choose(
            model, cfg, B.make_meter(cfg.budget, x), lambda m, c, kept=None: prune_model(m, c, x, kept=kept), x, None
        )
        assert d.met
        return {g.name: (d.cost_model["kept"][g.name], g.full) for g in graph.groups}, graph

    floor = lambda full: min(full, -(-full // 64) * 16)  # noqa: E731  (a quarter, rounded up to 16)
    free, _ = kept_at()
    floored, graph = kept_at(min_keep=0.25)
    assert any(k < floor(full) for k, full in free.values())  # without a floor, some groups go below it
    assert all(k >= floor(full) for k, full in floored.values())
    assert graph.narrowest() == [floor(g.full) for g in graph.groups]
    cfg = PruneConfig(method="channel", pruner="l1", align=16, budget={"macs": 0.3}, min_keep=0.9)
    graph = layer_graph(model, x, cfg)
    cost, student, _ = L.cost_model(model, graph, cfg.budget, B.make_meter(cfg.budget, x), None)
    with pytest.raises(PruneError, match="lower prune.align \\(or prune.min_keep\\)"):
        L.predicted_narrowest(cfg.budget, cost, graph, student)


def _choose_fed(slow_calls, max_retries=2, fed=()):
    """latency_aware on mobilenet_v2 with fed comparisons: the candidate's 'latency' is its file size,
    except the first `slow_calls` replicates, which are measured no faster than the student, and the
    allocations with a `fed` speedup (the first allocation the first one, ...)."""
    from test_prune_budget import size_replicate

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    latency = {"block_s": 0.005, "blocks": 2, "min_replicates": 2, "max_replicates": 2, "isolation": "session"}
    cfg = PruneConfig(
        method="channel",
        pruner="l1",
        align=16,
        budget={
            "speedup": 2,
            "batch_size": 1,
            "threads": 1,
            "latency": latency,
            "exporter": "torchscript",
            "opset": 17,
            "max_retries": max_retries,
        },
    )
    honest, calls = size_replicate(), {"n": 0}

    def replicate(spec):
        calls["n"] += 1
        out = honest(spec)
        if calls["n"] <= slow_calls:
            out["ratios"] = {k: 1.0 for k in out["ratios"]}
        allocation = (calls["n"] - 1) // latency["max_replicates"]
        if allocation < len(fed):
            out["ratios"] = {k: fed[allocation] for k in out["ratios"]}
        return out

    meter = B.make_meter(cfg.budget, x, replicate)
    full = {}
    meter.student_ms = lambda student: sum(full.values())  # the table's own unpruned sum: constant 0

    def tables(spec):  # a layer's time: its weights
        from toolchain.bench.latency_table import layer_key

        ms = {layer_key(s): 1e-3 * s["cin"] * s["cout"] / s.get("groups", 1) for s in spec["layers"]}
        for s in spec["layers"]:
            full[s["name"]] = max(full.get(s["name"], 0.0), ms[layer_key(s)])
        return {"entries": {k: {"ms": v} for k, v in ms.items()}}, {"source": "test"}

    try:
        return L.choose(model, cfg, meter, lambda m, c, kept=None: prune_model(m, c, x, kept=kept), x, tables)
    finally:
        meter.close()


def test_a_missed_measurement_tightens_the_target_and_allocates_again(one_thread):
    """The first allocation is measured no faster than the student (fed comparisons): the target drops
    by the shortfall and the second allocation removes more channels; later ones are measured by size."""
    _, d = _choose_fed(slow_calls=2)
    assert d.retries >= 1 and [h["stage"] for h in d.history] == ["allocation"] * (d.retries + 1)
    assert not d.history[0]["met"] and d.history[0]["value"] == pytest.approx(1.0)
    kept = [sum(h["kept"].values()) for h in d.history]
    assert kept[1] < kept[0]


def test_misses_that_tighten_past_the_model_end_on_the_narrowest_allocation_not_an_error(one_thread):
    """Every comparison no faster than the student: the target is tightened past what the cost model can
    reach (a CI run under torchrun raised 'unreachable' here for a budget the preflight had measured
    reachable); the narrowest aligned allocation is tried once, then the search stops, reported not met."""
    _, d = _choose_fed(slow_calls=10**6, max_retries=8)
    narrowest = d.history[-1]["kept"]
    assert not d.met and all(not h["met"] for h in d.history)
    assert [h["kept"] for h in d.history].count(narrowest) == 1 and 1 < len(d.history) < 9
    assert sum(narrowest.values()) < sum(d.history[0]["kept"].values())


def test_a_budget_never_met_ships_the_nearest_miss_not_the_last_try(one_thread):
    """Three allocations, all measured short of 2x, the second nearest (a tighter allocation can measure
    slower, a latency cliff): the decision ships the second, reported not met."""
    _, d = _choose_fed(slow_calls=0, fed=[1.5, 1.8, 1.2])
    assert [round(h["value"], 3) for h in d.history] == [1.5, 1.8, 1.2] and not d.met
    assert d.value == pytest.approx(1.8) and d.cost_model["kept"] == d.history[1]["kept"]
    assert d.history[2]["kept"] != d.history[1]["kept"]


@pytest.mark.slow  # times the tiny student's layers for real (~30 s)
def test_a_device_table_from_the_torch_free_bench_drives_the_allocation(tiny_recipe, tmp_path, capsys):
    """latency-spec -> python -m toolchain.bench --latency-table (torch and onnx unimportable) ->
    prune.budget.device_table: the decision is the device table's prediction, said so."""
    import subprocess
    import sys

    from toolchain.cli import run

    # 1.05x: the tiny student's narrowest allocation is predicted at 1.07x on a table timed on a loaded
    # 2-core AVX2 machine (and the test failed there with 1.1x); what is checked is the device table's path
    budget = {"speedup": 1.05, "batch_size": 1, "threads": 1}
    prune = {"method": "channel", "align": 8, "budget": budget}
    path = tiny_recipe(teacher=None, distill={"epochs": 0, "loss": "ce"}, prune=prune)
    spec = tmp_path / "spec.json"
    assert run(["latency-spec", str(path), "--out", str(spec)]) == 0
    assert "layer shapes at batch 1, threads 1" in capsys.readouterr().out
    env = blocked_imports_env(tmp_path / "fake", ("torch", "onnx"), OMP_NUM_THREADS="1")
    table = tmp_path / "table.json"
    done = subprocess.run(
        [sys.executable, "-m", "toolchain.bench", "--latency-table", str(spec), "--json", str(table)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    prune["budget"] = {**budget, "device_table": str(table)}
    path = tiny_recipe(teacher=None, distill={"epochs": 0, "loss": "ce"}, prune=prune)
    assert run(["compress", str(path)]) == 0
    out = capsys.readouterr().out
    assert "is reachable on the device table" in out
    closing = [line for line in out.splitlines() if line.startswith("Budget: ")]
    assert closing and closing[-1].startswith(
        "Budget: speedup >= 1.05 at batch 1, 1 thread: met predicted on the device table"
    )
    summary = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())
    assert summary["stages"]["prune"]["metrics"]["prune.budget.met"] == 1.0


def test_taylor_scores_are_weight_times_gradient_squared_per_channel():
    """pruner taylor: a group's scores sum (w x dL/dw)^2 over its members' filters and the batches; a
    filter of zeros scores 0."""
    from toolchain.prune import GradientSource
    from toolchain.prune.costmodel import importance

    torch.manual_seed(0)
    model = Branches().eval()
    with torch.no_grad():
        model.left.weight[3].zero_()
    x = torch.randn(2, 3, 8, 8)
    graph = layer_graph(model, x, PruneConfig(method="channel", align=8))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    source = GradientSource(batches, lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb), steps=3)
    scores = importance(model, graph, "taylor", source)
    left = next(i for i, g in enumerate(graph.groups) if "left" in g.members)
    assert [len(s) for s in scores] == [g.full for g in graph.groups]
    assert all((np.diff(s) <= 0).all() for s in scores) and scores[left][-1] == 0.0 and scores[left][0] > 0
    assert not any(p.grad is not None for p in model.parameters())  # left as it was


def test_the_target_tightens_on_a_miss_relaxes_on_a_surplus_and_stays_between_measured_ends():
    search = L.TargetSearch(10.0)
    assert search.next(met=False, slack=0.8) and search.target == pytest.approx(10 * 0.8 * 0.99)  # missed by 20%
    missed, met = 10.0, search.target
    assert search.next(met=True, slack=1.5)  # beat the budget by 50%: relax, but not past the target that missed
    assert met < search.target <= (met + missed) / 2
    assert not search.next(met=True, slack=1.01)  # within 3% of the budget: done
    halving = L.TargetSearch(10.0)  # a tightening step at most halves the target
    halving.next(met=False, slack=0.1)
    assert halving.target == pytest.approx(5.0)


def test_the_refit_recovers_a_scaled_variable_part_and_aims_the_next_target_at_it():
    """A true latency whose channel-dependent part is 1.2x the table's (what the table misses scales with
    the channels): one measured allocation recovers the scale, and the target it proposes gives an
    allocation the truth puts at the aim; proposals only move the target the measurement's way."""
    cost, student = _toy_graph([0.05, 0.1, 0.15]), 20.0
    graph = cost.graph
    cost.calibrate(student)
    full = cost.layers_cost(graph.full())

    def truth(kept):
        return student - 1.2 * (full - cost.layers_cost(kept))

    refit, first = L.Refit(cost, student), [16, 16, 16]
    assert refit.cost_of(cost.layers_cost(first)) == pytest.approx(cost.cost(first))  # alpha 1: the table
    refit.add(cost.layers_cost(first), truth(first))
    assert refit.alpha == pytest.approx(1.2)
    aim = 0.5 * (truth(first) + student)
    kept = allocate(cost, [np.ones(32)] * 3, refit.target_for(aim))
    assert kept is not None and truth(kept) <= aim + 1e-9 and refit.cost_of(cost.layers_cost(kept)) <= aim + 1e-9
    search = L.TargetSearch(8.0)
    assert search.next(met=False, slack=0.9, proposal=9.0) and search.target == pytest.approx(8 * 0.9 * 0.99)
    search = L.TargetSearch(8.0)
    assert search.next(met=False, slack=0.9, proposal=6.5) and search.target == 6.5


def test_a_missing_device_table_is_one_line_before_anything_trains(tiny_recipe, tmp_path, capsys):
    from toolchain.cli import run

    missing = tmp_path / "nowhere" / "table.json"
    budget = {"speedup": 1.5, "batch_size": 1, "threads": 1, "device_table": str(missing)}
    path = tiny_recipe(distill={"epochs": 1, "loss": "ce"}, prune={"method": "channel", "align": 8, "budget": budget})
    assert run(["compress", str(path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "Traceback" not in err, err
    assert not list((tmp_path / "export" / ".cache").glob("teacher-*"))  # failed in the preflight


def test_torch_pruning_allocates_latency_aware_by_default_in_the_stage(tiny_recipe, tmp_path, capsys):
    """A budget with engine torch_pruning and no allocation: latency_aware, the groups' kept counts as
    Torch-Pruning ratios, the budget met and the kept counts in the decision."""
    from toolchain.cli import run

    path = tiny_recipe(
        teacher=None,
        distill={"epochs": 1, "lr": 0.05, "loss": "ce"},
        prune={"method": "channel", "engine": "torch_pruning", "budget": {"macs": 0.5}},
    )
    assert run(["compress", str(path)]) == 0
    prune = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]["prune"]
    budget = prune["info"]["budget"]
    assert budget["allocation"] == "latency_aware" and prune["metrics"]["prune.budget.met"] == 1.0
    assert budget["cost_model"]["error_pct"] == pytest.approx(0, abs=1e-6) and budget["cost_model"]["kept"]
