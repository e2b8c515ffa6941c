"""prune.budget (issue 31): the schema, the uniform search that meets a budget within one alignment
step, latency budgets decided on fed comparison intervals, an unreachable budget failing in the
preflight before the teacher trains, and the decision reported (metrics, budget.json, closing line)."""

import pytest
import yaml

from toolchain.errors import RecipeError
from toolchain.recipe import PruneConfig, to_yaml, validate_dict

BASE = {"name": "t", "student": {"model": "mobilenet_v2"}, "distill": {"loss": "ce"}}


def recipe(prune, **sections):
    return validate_dict({**BASE, "prune": prune, **sections})


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize("prune, message", [
    ({"method": "channel", "sparsity": 0.3, "budget": {"macs": 0.5}},
     "prune: set prune.budget or prune.sparsity, not both: the budget chooses the sparsity"),
    ({"method": "channel", "budget": {"macs": 0.5, "speedup": 2}},
     "prune.budget: give exactly one of speedup, latency_ms, macs, params, file_bytes (got speedup, macs)"),
    ({"method": "channel", "budget": {"batch_size": 1}},
     "prune.budget: give exactly one of speedup, latency_ms, macs, params, file_bytes (got none)"),
    ({"method": "weight", "budget": {"params": 0.5}}, "prune: prune.budget needs method: channel"),
    ({"method": "channel", "budget": {"macs": 1.5}}, "prune.budget.macs: Input should be less than 1"),
    ({"method": "channel", "budget": {"speedup": 0.5}}, "prune.budget.speedup: Input should be greater than 1"),
    ({"method": "channel", "allocation": "latency_aware", "budget": {"speedup": 2}},
     "prune.allocation: Input should be 'uniform'"),
])
def test_budget_schema_errors_are_one_line(prune, message):
    with pytest.raises(RecipeError) as info:
        recipe(prune)
    text = str(info.value)
    assert "\n" not in text and message in text, text


def test_latency_budget_defaults_come_from_the_bench_and_export_sections():
    r = recipe({"method": "channel", "budget": {"speedup": 2}},
               bench={"batch_sizes": [32, 1], "intra_op_threads": 2, "latency": {"min_replicates": 4}},
               export={"exporter": "torchscript", "opset": 17})
    b = r.prune.budget
    assert (b.kind, b.target, b.batch_size, b.threads, b.exporter, b.opset) == ("speedup", 2.0, 32, 2, "torchscript", 17)
    assert b.latency.min_replicates == 4
    own = recipe({"method": "channel", "budget": {"latency_ms": 3, "batch_size": 8, "threads": 1}}).prune.budget
    assert (own.batch_size, own.threads, own.exporter) == (8, 1, "dynamo")
    no_bench = recipe({"method": "channel", "budget": {"speedup": 2}}, bench=None).prune.budget
    assert (no_bench.batch_size, no_bench.threads, no_bench.latency.min_replicates) == (1, 0, 3)
    proxy = recipe({"method": "channel", "budget": {"macs": 0.3}}).prune.budget
    assert (proxy.batch_size, proxy.threads, proxy.latency, proxy.exporter) == (None, None, None, None)  # not in its key


def test_a_budget_recipe_dumps_without_sparsity_and_loads_again():
    r = recipe({"method": "channel", "budget": {"params": 0.4}})
    dumped = yaml.safe_load(to_yaml(r))
    assert "sparsity" not in dumped["prune"] and dumped["prune"]["allocation"] == "uniform"
    assert validate_dict(dumped) == r
    assert recipe({"method": "channel", "sparsity": 0.3}).model_dump()["prune"]["sparsity"] == 0.3
    assert PruneConfig(method="channel", budget={"macs": 0.5}).budget.kind == "macs"
