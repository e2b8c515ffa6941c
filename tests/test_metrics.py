"""Performance Efficiency and the counters it is built on, against hand-computed numbers.

PE = (acc / acc_ref) * (1 - cost / cost_ref), cost = nonzero params (headline), MACs or
ORT p50 latency. Weight pruning lowers nonzero params but not MACs; channel pruning both.
"""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from toolchain.bench.compare import p50_smallest as _p50_smallest
from toolchain.engine.artifacts import StageResult
from toolchain.engine.stage import StageOutput
from toolchain.metrics import count_macs, count_nonzero_params, count_params, model_stats, performance_efficiency
from toolchain.stages.common import pe_against_references

INPUT = (1, 3, 8, 8)


def tiny_net(out_channels: int = 4) -> nn.Module:
    """conv 3->C 3x3 pad 1 (bias), global pool, linear C->2. Every parameter set to 1 (no accidental zeros)."""
    model = nn.Sequential(
        nn.Conv2d(3, out_channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(out_channels, 2),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    return model


# ---------------------------------------------------------------- counters


def test_counts_of_the_dense_tiny_net():
    model = tiny_net()
    # conv: 4*3*3*3 weights + 4 biases = 112; linear: 4*2 + 2 = 10
    assert count_params(model) == 122
    assert count_nonzero_params(model) == 122
    # conv: output 4x8x8 = 256 values, each 3*3*3 = 27 MACs -> 6912; linear: 2 outputs x 4 inputs = 8
    assert count_macs(model, INPUT) == 6920


def test_weight_pruning_lowers_nonzero_params_not_macs():
    model = tiny_net()
    with torch.no_grad():
        model[0].weight[:2] = 0  # 2 filters x 27 weights = 54 zeros, tensors stay dense
        model[4].weight[0, :3] = 0  # 3 more in the classifier
    assert count_params(model) == 122
    assert count_nonzero_params(model) == 122 - 54 - 3 == 65
    assert count_macs(model, INPUT) == 6920  # dense kernels compute the zeros too
    stats = model_stats(model, INPUT)
    assert stats["sparsity"] == pytest.approx(57 / 122)
    assert stats["size_bytes"] == 122 * 4  # fp32 state_dict: zeros cost as much as any weight


def test_channel_pruning_lowers_params_and_macs():
    model = tiny_net(out_channels=2)  # half the conv's output channels physically removed
    assert count_params(model) == 2 * 27 + 2 + 2 * 2 + 2 == 62
    assert count_macs(model, INPUT) == 2 * 64 * 27 + 2 * 2 == 3460


def test_grouped_conv_macs():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False))  # depthwise: 1 input channel per output
    assert count_macs(model, (1, 4, 8, 8)) == 4 * 64 * 9


def test_count_macs_leaves_train_mode_alone():
    model = tiny_net().train()
    count_macs(model, INPUT)
    assert model.training


# ---------------------------------------------------------------- PE formulas


def test_pe_hand_computed():
    pe = performance_efficiency(
        acc=0.45,
        acc_ref=0.5,
        nonzero_params=250,
        params_ref=1000,
        macs=400,
        macs_ref=1000,
        latency=2.0,
        latency_ref=4.0,
    )
    assert pe["retention"] == pytest.approx(0.9)
    assert pe["pe_params"] == pytest.approx(0.9 * 0.75)  # 0.675
    assert pe["pe_macs"] == pytest.approx(0.9 * 0.6)  # 0.54
    assert pe["pe_latency"] == pytest.approx(0.9 * 0.5)  # 0.45


def test_pe_of_weight_pruning_against_its_own_student():
    # 80% of weights zeroed, accuracy 0.88 -> 0.86, MACs unchanged, latency 5% worse (dense kernels, noise)
    pe = performance_efficiency(
        acc=0.86,
        acc_ref=0.88,
        nonzero_params=200_000,
        params_ref=1_000_000,
        macs=6_000_000,
        macs_ref=6_000_000,
        latency=0.42,
        latency_ref=0.40,
    )
    retention = 0.86 / 0.88
    assert pe["pe_params"] == pytest.approx(retention * 0.8)
    assert pe["pe_macs"] == 0.0
    assert pe["pe_latency"] == pytest.approx(retention * -0.05)  # slower than the reference: negative


def test_pe_without_optional_costs_or_reference():
    pe = performance_efficiency(acc=0.5, acc_ref=0.5, nonzero_params=10, params_ref=10)
    assert pe == {"retention": 1.0, "pe_params": 0.0, "pe_macs": None, "pe_latency": None}
    assert performance_efficiency(acc=0.5, acc_ref=0.0, nonzero_params=1, params_ref=10)["retention"] == 0.0
    assert performance_efficiency(acc=0.5, acc_ref=0.5, nonzero_params=1, params_ref=0)["pe_params"] is None


def test_perfect_and_useless_compression_bounds():
    assert performance_efficiency(1.0, 1.0, 0, 100)["pe_params"] == 1.0  # nothing left, nothing lost
    assert performance_efficiency(0.0, 1.0, 1, 100)["pe_params"] == 0.0  # tiny but useless


# ---------------------------------------------------------------- what the pipeline logs


def fake_ctx(**results):
    """This run's stage outputs, as the publish step sees them."""
    return {name: StageOutput(name, "key", Path("."), StageResult(metrics=m)) for name, m in results.items()}


def test_pipeline_pe_uses_nonzero_params_against_dense_reference_params():
    teacher = {"test_accuracy": 0.90, "params": 1000, "nonzero_params": 1000, "macs": 5000}
    student = {"test_accuracy": 0.80, "params": 400, "nonzero_params": 400, "macs": 2000}
    pruned = {"test_accuracy": 0.72, "params": 400, "nonzero_params": 100, "macs": 2000}  # weight-pruned student
    out = pe_against_references(
        fake_ctx(teacher=teacher, distill=student),
        pruned,
        "finetune",
        latency={"final": 1.0, "teacher": 4.0, "distill": 1.25},
    )
    assert out["vs_teacher.retention"] == pytest.approx(0.8)
    assert out["vs_teacher.pe_params"] == pytest.approx(0.8 * 0.9)
    assert out["vs_teacher.pe_macs"] == pytest.approx(0.8 * 0.6)
    assert out["vs_teacher.pe_latency"] == pytest.approx(0.8 * 0.75)
    assert out["vs_student.retention"] == pytest.approx(0.9)
    assert out["vs_student.pe_params"] == pytest.approx(0.9 * 0.75)
    assert out["vs_student.pe_macs"] == 0.0  # weight pruning: MACs do not move
    assert out["vs_student.pe_latency"] == pytest.approx(0.9 * 0.2)


def test_pipeline_pe_skips_missing_references_and_latency():
    out = pe_against_references(
        fake_ctx(teacher={"test_accuracy": 1.0, "params": 10, "macs": 10}),
        {"test_accuracy": 0.5, "nonzero_params": 5, "macs": 5},
        "finetune",
    )
    assert out == {"vs_teacher.retention": 0.5, "vs_teacher.pe_params": 0.25, "vs_teacher.pe_macs": 0.25}


def test_pipeline_pe_never_measures_a_model_against_itself():
    """The KD student as the final model (or its INT8 file) has no student reference: PE vs itself is ~0."""
    student = {"test_accuracy": 0.8, "params": 400, "nonzero_params": 400, "macs": 2000}
    out = pe_against_references(
        fake_ctx(teacher={"test_accuracy": 0.9, "params": 1000, "macs": 5000}, distill=student), student, "distill"
    )
    assert set(out) == {"vs_teacher.retention", "vs_teacher.pe_params", "vs_teacher.pe_macs"}


def test_latency_for_pe_is_cpu_p50_at_the_smallest_batch():
    rows = [
        {"provider": "cpu", "batch_size": 32, "p50_ms": 9.0},
        {"provider": "cuda", "batch_size": 1, "p50_ms": 0.1},
        {"provider": "cpu", "batch_size": 1, "p50_ms": 0.5},
        {"provider": "cpu", "batch_size": 4, "p50_ms": 1.5},
    ]
    assert _p50_smallest({"results": rows}) == 0.5
    assert (
        _p50_smallest(
            [{"provider": "cuda", "batch_size": 8, "p50_ms": 0.2}, {"provider": "cuda", "batch_size": 2, "p50_ms": 0.1}]
        )
        == 0.1
    )
