"""A fast representative subset of benchmarks/zoo_prune.py (docs/zoo.md): the same prune ->
speedup -> ONNX export -> parity path, at 32x32 with 10 classes, one model per structural
family the engines gained or differ on (depthwise + SE: tests/test_prune_compat.py; both
engines on ShuffleNetV2 and ViT: tests/test_prune_pinned.py)."""

import pytest
from conftest import benchmark_module

zoo = benchmark_module("zoo_prune")


@pytest.mark.parametrize(
    "name, engine",
    [
        # grouped convs in equal blocks, SE; channel shuffle: pinned layers (slow tier; default tier:
        # tests/test_checkpoint.py, test_prune_compat.py, test_prune_pinned.py prune both families)
        pytest.param("regnet_y_400mf", "nni", marks=pytest.mark.slow),
        pytest.param("shufflenet_v2_x0_5", "nni", marks=pytest.mark.slow),
        ("squeezenet1_1", "torch_pruning"),  # concatenations
    ],
)
def test_zoo_families_prune_export_and_pass_parity(name, engine):
    row = zoo.one(name, engine, size=32, num_classes=10)
    assert row["status"] == "ok", row
    assert row["macs_ratio"] < 0.6
