"""Quantization-aware distillation: the QDQ graph as a trainable module (onnx/qat.py), its write-back,
the gate (stages/qad.py decide) and the qad stage in the pipeline."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FAST_LATENCY, REDUCE_RANGE, fast_bench, tiny_dw_model
from pydantic import ValidationError

from toolchain.bench.compare import Interval
from toolchain.cli import run
from toolchain.onnx.qat import QatError, QdqModule, load_qdq, write_qdq
from toolchain.onnx.quantize import CANDIDATES, CalibrationReader, preprocess, quantize
from toolchain.recipe import QuantizeConfig
from toolchain.stages.qad import decide

PLAIN = ["qdq_u8s8_per_tensor", "qdq_u8s8_dw_per_channel", "qdq_s8s8_per_channel", "qdq_u8s8_per_channel_keep_stem"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The tiny depthwise model, preprocessed, and each plain QDQ candidate of it (random calibration)."""
    work = tmp_path_factory.mktemp("qat")
    preprocess(tiny_dw_model(work / "float.onnx"), work / "pre.onnx")
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((16, 3, 16, 16)).astype(np.float32), np.zeros(16)) for _ in range(2)]
    for name in PLAIN:
        reader = CalibrationReader(batches, "input", 32)
        quantize(work / "pre.onnx", work / f"{name}.onnx", CANDIDATES.get(name), reader, REDUCE_RANGE)
    return work


def _images(n=64, seed=2):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32))


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("scales", ["learned", "frozen"])
@pytest.mark.parametrize("name", PLAIN)
def test_fake_quant_forward_equals_onnxruntime_on_the_qdq_file(tiny_files, name, scales):
    module = load_qdq(tiny_files / f"{name}.onnx", tiny_files / "pre.onnx", scales).eval()
    x = _images()
    with torch.no_grad():
        ours = module(x).numpy()
    theirs = _ort(tiny_files / f"{name}.onnx", x)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() == 1.0
    step = module.output_step()
    assert step > 0 and np.abs(ours - theirs).max() <= step * 1.001  # within one quantization step of the output


@pytest.mark.parametrize("scales", ["learned", "frozen"])
def test_a_float_conv_after_an_int8_activation_runs_in_float_in_both(tiny_files, tmp_path, scales):
    """A Conv kept float whose input is an INT8 activation gets its own per-axis DequantizeLinear
    (float_fallback.py) so onnxruntime runs it in float; the fake-quant forward must run it in float
    too and follow the shared scale through that copy, or it trains another model than onnxruntime runs."""
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((16, 3, 16, 16)).astype(np.float32), np.zeros(16)) for _ in range(2)]
    path = tmp_path / "pw1_float.onnx"
    candidate = CANDIDATES.get("qdq_u8s8_dw_per_channel")
    reader = CalibrationReader(batches, "input", 32)
    quantize(tiny_files / "pre.onnx", path, candidate, reader, REDUCE_RANGE, float_nodes=["pw1"])
    module = load_qdq(path, tiny_files / "pre.onnx", scales).eval()
    assert module.runtime_int8 == set()  # pw1 reads the depthwise conv's INT8 output through its own DequantizeLinear
    own = [n for n in module.nodes if n.op_type == "DequantizeLinear" and "_per_axis" in n.input[1]]
    assert len(own) == 1 and module.act_scales[own[0].input[1]] in module.act_scales.values()
    x = _images()
    with torch.no_grad():
        ours = module(x).numpy()
    theirs = _ort(path, x)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() == 1.0
    assert np.abs(ours - theirs).max() <= module.output_step() * 1.001


def test_trained_weights_and_learned_scales_written_back_run_the_same_in_onnxruntime(tiny_files, tmp_path):
    name = "qdq_u8s8_dw_per_channel"
    module = load_qdq(tiny_files / f"{name}.onnx", tiny_files / "pre.onnx", "learned")
    before = {k: v.detach().clone() for k, v in module.log_scales.items()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    x, y = _images(32, seed=3), torch.arange(32) % 10
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in module.log_scales.items())  # scales are trained
    written = write_qdq(module, tiny_files / f"{name}.onnx", tmp_path / "qad.onnx")
    assert written == {"weights": 5, "biases": 5, "activation_scales": len(module.act_scales)}
    start, trained = onnx.load(str(tiny_files / f"{name}.onnx")), onnx.load(str(tmp_path / "qad.onnx"))
    assert [n.op_type for n in start.graph.node] == [n.op_type for n in trained.graph.node]  # the same layout
    types = {i.name: i.data_type for i in start.graph.initializer}
    assert types == {i.name: i.data_type for i in trained.graph.initializer}  # int8 stays int8, int32 biases int32
    x = _images(64, seed=4)
    with torch.no_grad():
        ours = module.eval()(x).numpy()
    theirs = _ort(tmp_path / "qad.onnx", x)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() == 1.0
    assert np.abs(ours - theirs).max() <= module.output_step() * 1.001


def test_frozen_scales_are_not_parameters_and_float_blocks_train_too(tiny_files):
    frozen = load_qdq(tiny_files / "qdq_u8s8_per_channel_keep_stem.onnx", tiny_files / "pre.onnx", "frozen")
    learned = load_qdq(tiny_files / "qdq_u8s8_per_channel_keep_stem.onnx", tiny_files / "pre.onnx", "learned")
    assert len(frozen.log_scales) == 0 and len(learned.log_scales) == len(learned.act_scales) > 0
    # keep_stem: the first three convs stay float in the file, and their weights are still trained parameters
    assert len(frozen.params) == len(learned.params) == 10 and len(frozen.weights) == 2  # pw2 and fc in INT8


def test_the_unrounded_float_weights_start_the_training(tiny_files):
    """With the float graph the parameters are its weights; without it, the dequantized INT8 ones."""
    name = "qdq_u8s8_per_tensor"
    pre = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tiny_files / "pre.onnx")).graph.initializer}
    with_float = load_qdq(tiny_files / f"{name}.onnx", tiny_files / "pre.onnx", "frozen")
    without = load_qdq(tiny_files / f"{name}.onnx", None, "frozen")
    spec = next(iter(with_float.weights.values()))
    source = next(k for k, v in with_float._names.items() if v == spec.param).removesuffix("_quantized")
    assert np.array_equal(with_float.params[spec.param].detach().numpy(), pre[source])
    dequantized = without.params[spec.param].detach()
    assert not torch.equal(dequantized, with_float.params[spec.param].detach())
    assert torch.allclose(dequantized, spec.forward(with_float.params[spec.param])[0], atol=1e-6)


def test_an_op_the_module_cannot_run_is_one_line(tiny_files):
    proto = onnx.load(str(tiny_files / "qdq_u8s8_per_tensor.onnx"))
    next(n for n in proto.graph.node if n.op_type == "Flatten").op_type = "LpNormalization"
    with pytest.raises(QatError, match="LpNormalization: choose another quantize.qat.candidate"):
        QdqModule(proto)


def _iv(ratio, low, high):
    return Interval(ratio, low, high, 5, (low, high))


def test_the_gate_rejects_a_qad_file_that_is_slower_or_less_accurate():
    fast, slow = {1: _iv(1.5, 1.4, 1.6), 32: _iv(1.5, 1.4, 1.6)}, {1: _iv(1.5, 1.4, 1.6), 32: _iv(1.02, 0.95, 1.1)}
    ships, why = decide(0.90, 0.895, fast, None, None, 0.01, 1.1)
    assert ships and "1.50x" in why
    ships, why = decide(0.90, 0.895, slow, None, None, 0.01, 1.1)
    assert not ships and "not 1.10x faster" in why
    ships, why = decide(0.90, 0.88, fast, None, None, 0.01, 1.1)
    assert not ships and "loses 0.0200" in why
    slower_than_ptq = {1: _iv(0.8, 0.75, 0.85), 32: _iv(0.9, 0.85, 0.95)}
    ships, why = decide(0.90, 0.90, fast, 0.895, slower_than_ptq, 0.01, 1.1)
    assert not ships and "slower than the shipped post-training file" in why
    same_speed = {1: _iv(1.0, 0.95, 1.05), 32: _iv(1.0, 0.97, 1.03)}
    assert decide(0.90, 0.899, fast, 0.895, same_speed, 0.01, 1.1)[0]  # more accurate, not slower
    assert not decide(0.90, 0.895, fast, 0.895, same_speed, 0.01, 1.1)[0]  # neither: PTQ's file stays
    faster = {1: _iv(1.3, 1.2, 1.4), 32: _iv(1.2, 1.1, 1.3)}
    assert decide(0.90, 0.893, fast, 0.895, faster, 0.01, 1.1)[0]  # faster, within the gate


def test_qat_settings_are_checked_and_stay_out_of_the_post_training_key():
    from toolchain.engine.runner import _keyed

    with pytest.raises(ValidationError, match="qat.candidate 'auto' is not a plain QDQ candidate; one of: "):
        QuantizeConfig(qat={"candidate": "auto"})
    with pytest.raises(ValidationError, match="fp32"):
        QuantizeConfig(qat={"precision": "bf16"})
    assert _keyed(QuantizeConfig(qat={"epochs": 3})) == _keyed(QuantizeConfig())
    assert "qat" not in QuantizeConfig().model_dump()  # recipes without it keep their hash


def test_qat_with_a_kd_loss_needs_a_teacher(tiny_recipe, capsys):
    path = tiny_recipe(
        teacher=None,
        distill={"epochs": 1, "lr": 0.05, "loss": "ce"},
        export={"exporter": "dynamo", "opset": 18, "references": False},
        quantize={"candidates": ["qdq_u8s8_per_tensor"], "qat": {"epochs": 1}},
    )
    assert run(["compress", str(path)]) != 0
    assert "quantize.qat.loss is kd but the recipe has no teacher section" in capsys.readouterr().err


def _fed(monkeypatch, ratio):
    """Every stage comparison answers `ratio` for every pair (what is measured is not under test here)."""
    import toolchain.stages.qad as qad_stage
    import toolchain.stages.quantize as quantize_stage
    from toolchain.bench.compare import compare

    def replicate(spec):
        keys = [f"{name}@{bs}" for name in spec["files"] for bs in spec["batch_sizes"]]
        return {
            "ratios": {f"{b}|{c}@{bs}": ratio for b, c in spec["pairs"] for bs in spec["batch_sizes"]},
            "medians_ms": {k: 1.0 for k in keys},
            "times": {k: [1e-3, 1e-3] for k in keys},
            "shapes": {k: [int(k.rsplit("@", 1)[1]), 1, 28, 28] for k in keys},
        }

    for module in (qad_stage, quantize_stage):
        monkeypatch.setattr(module, "compare", lambda *a, **kw: compare(*a, **kw, replicate=replicate))


def test_qad_stage_trains_the_candidate_and_ships_it_through_the_gate(tiny_recipe, warm_cache, tmp_path, monkeypatch):
    """The warm teacher and student, one QAD epoch with the teacher, fed latency ratios: the QAD file
    ships as model_int8.onnx, the card says which path shipped and why, the bench times it."""
    _fed(monkeypatch, 1.5)
    path = tiny_recipe(  # without references: the teacher's and student's ONNX files are not under test
        export={"exporter": "dynamo", "opset": 18, "references": False},
        quantize={
            "candidates": ["qdq_u8s8_dw_per_channel"],
            "calibration_images": 64,
            "max_accuracy_drop": 1.0,
            "latency": {"min_replicates": 2, "max_replicates": 2},
            "qat": {"when": "always", "epochs": 1, "parity_images": 64},
        },
        bench=fast_bench(1),
    )
    assert run(["compress", str(path)]) == 0
    run_dir = tmp_path / "export" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    qad, card = summary["stages"]["qad"], json.loads((run_dir / "model_card.json").read_text())
    m = qad["metrics"]
    assert m["qad.trained"] == 1 and m["qad.shipped"] == 1 and len(qad["history"]) == 1
    assert m["qad.parity.top1_agreement"] >= 0.98 and 0 < qad["info"]["parity"]["images"] <= 64
    assert card["int8"]["path"] == "qad" and card["int8"]["candidate"] == "qdq_u8s8_dw_per_channel_keep_stem_fold"
    assert card["qad"]["shipped"] and card["int8"]["why"].startswith("QAD ")
    assert card["int8"]["min_speedup"] == QuantizeConfig().min_speedup  # the gate it cleared, for check_claims
    shipped = onnx.load(str(run_dir / "model_int8.onnx"))
    meta = {p.key: p.value for p in shipped.metadata_props}
    assert json.loads(meta["quantization"])["path"] == "qad"
    assert summary["metrics"]["int8.test_accuracy"] == m["qad.test_accuracy"]
    assert "int8" in json.loads((run_dir / "bench.json").read_text())["onnxruntime"]

    # on_miss: post-training INT8 shipped, so nothing is trained and its file stays
    assert run(["compress", str(path), "quantize.qat.when=on_miss", "name=again"]) == 0
    again = json.loads((tmp_path / "export" / "again" / "summary.json").read_text())
    assert again["stages"]["qad"]["metrics"] == {"qad.trained": 0, "stage_seconds": pytest.approx(0, abs=5)}
    assert json.loads((tmp_path / "export" / "again" / "model_card.json").read_text())["int8"]["path"] == "ptq"


def _qad_recipe(tiny_recipe, epochs):
    """Warm-cache teacher and student, then QAD every time (when: always), latency at its cheapest."""
    return tiny_recipe(
        export={"exporter": "dynamo", "opset": 18},
        quantize={
            "candidates": ["qdq_u8s8_dw_per_channel"],
            "calibration_images": 64,
            "max_accuracy_drop": 1.0,
            "latency": FAST_LATENCY,
            "qat": {"when": "always", "epochs": epochs, "parity_images": 64},
        },
    )


def _trained(stage):
    """What QAD's training decides, without what the latency measurement decides."""
    keep = ("qad.start_val_accuracy", "qad.val_accuracy", "qad.test_accuracy", "qad.parity.top1_agreement")
    return {k: stage["metrics"][k] for k in keep}, [
        {k: v for k, v in epoch.items() if "seconds" not in k and "per_second" not in k} for epoch in stage["history"]
    ]


@pytest.mark.slow  # SIGKILL: three CLI subprocesses
def test_sigkill_during_qad_then_rerun_resumes_and_matches(tiny_recipe, warm_cache, tmp_path):
    from test_reliability import start, wait_for

    path = _qad_recipe(tiny_recipe, epochs=3)
    proc = start(path)
    wait_for("qad-*/train_state.pt", tmp_path / "export" / ".cache", timeout=300)  # one QAD epoch done
    proc.kill()
    proc.wait(timeout=30)
    assert not list((tmp_path / "export" / ".cache").glob("qad-*/result.json"))
    resumed = start(path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming after epoch" in out + err
    after = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]["qad"]

    recipe = path.read_text().replace(str(tmp_path / "export"), str(tmp_path / "fresh" / "export"))
    (tmp_path / "fresh.yaml").write_text(recipe)
    shutil.copytree(
        tmp_path / "export" / ".cache", tmp_path / "fresh" / "export" / ".cache", ignore=shutil.ignore_patterns("qad-*")
    )
    uninterrupted = start(tmp_path / "fresh.yaml")
    _, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err[-3000:]
    fresh = json.loads((tmp_path / "fresh" / "export" / "tiny" / "summary.json").read_text())["stages"]["qad"]
    assert fresh["cached"] is False and _trained(fresh)[0] == _trained(after)[0]
    # the epochs before the kill come back from the resume checkpoint, which holds them in float32
    assert _trained(fresh)[1] == [pytest.approx(epoch, rel=1e-6) for epoch in _trained(after)[1]]


@pytest.mark.slow  # torchrun: two processes
def test_torchrun_qad_trains_on_two_processes_and_rank_0_alone_measures(tiny_recipe, warm_cache, tmp_path):
    from test_distributed import torchrun

    path = _qad_recipe(tiny_recipe, epochs=1)
    proc = torchrun(["compress", str(path)], tmp_path, timeout=400)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 0, "\n".join(errors) + proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["distributed"]["world_size"] == 2
    qad = summary["stages"]["qad"]
    assert qad["metrics"]["qad.trained"] == 1 and len(qad["history"]) == 1
    assert qad["metrics"]["qad.parity.top1_agreement"] >= 0.98
    assert proc.stdout.count("[qad] val accuracy: post-training") == 1  # rank 0 alone scored and timed
