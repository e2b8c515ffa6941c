"""ONNX export: every model family exports, passes the checker and the parity gate, keeps a
dynamic batch; a changed model is caught; metadata round-trips; MLflow logging works."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from toolchain.errors import ExportError
from toolchain.models.registry import build_model
from toolchain.onnx.export import (
    check_parity,
    export_onnx,
    log_onnx_to_mlflow,
    onnx_accuracy,
    read_metadata,
    write_model_card,
)
from toolchain.recipe import ExportConfig

METADATA = {
    "input_name": "input",
    "input_shape": ["batch", 3, 32, 32],
    "input_dtype": "float32",
    "normalization_mean": [0.5, 0.5, 0.5],
    "class_names": [f"class {i}" for i in range(10)],
    "test_accuracy": 0.875,
    "params": 272474,
    "performance_efficiency": {"vs_teacher.pe_params": 0.61, "missing": None},
    "flag": True,
    "recipe_hash": "0123456789abcdef",
    "numeric_looking_string": "0.9",
}


def _calibrated(name: str) -> torch.nn.Module:
    """A random-init model whose logits depend on the input.

    Random-init MobileNets/EfficientNet give ~1e-10 logits (depthwise convs get a
    fan_out init meant for dense convs), so top-1 agreement would be a coin toss;
    calibrating BatchNorm statistics on random data makes the parity test meaningful.
    """
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: two batches give settled statistics
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, 32, 32))
        model.eval()
        # logits of order 1, like a trained classifier (calibrated EfficientNet gives ~300,
        # where float32 rounding alone exceeds an absolute tolerance of 1e-3)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        scale = model(torch.randn(16, 3, 32, 32)).abs().max().clamp(min=1e-6)
        head.weight.div_(scale)
        head.bias.div_(scale)
    return model


def _ort_run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """cifar_resnet20 exported once (dynamo) and shared by the cheaper tests.

    The example batch is 1 on purpose: the batch axis must stay dynamic anyway.
    """
    model = _calibrated("cifar_resnet20")
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    info = export_onnx(model, path, torch.randn(1, 3, 32, 32), ExportConfig(), METADATA)
    return model, path, info


# ---------------------------------------------------------------- families


@pytest.mark.parametrize(
    "name",
    [
        "cifar_resnet20",
        "mobilenet_v3_small",  # slow tier: larger models
        pytest.param("mobilenet_v2", marks=pytest.mark.slow),
        pytest.param("densenet121", marks=pytest.mark.slow),
        pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    ],
)
def test_family_exports_checks_and_passes_parity(name, resnet, tmp_path):
    if name == "cifar_resnet20":
        model, path, info = resnet
    else:
        model = _calibrated(name)
        path = tmp_path / f"{name}.onnx"
        info = export_onnx(model, path, torch.randn(2, 3, 32, 32), ExportConfig(), METADATA)
    assert info["exporter"] == "dynamo" and info["opset"] == 18
    assert info["input_shape"] == ["batch", 3, 32, 32] and info["output_shape"] == ["batch", 10]
    assert info["file_size_bytes"] == path.stat().st_size > 0
    onnx.checker.check_model(str(path), full_check=True)
    parity = check_parity(model, path, torch.randn(16, 3, 32, 32), atol=1e-3, min_agreement=0.99)
    assert parity["max_abs_diff"] <= 1e-3 and parity["top1_agreement"] == 1.0 and parity["batch_size"] == 16
    for bs in (1, 7):  # dynamic batch: both sizes run and match PyTorch
        x = torch.randn(bs, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_ort_run(path, x.numpy()), expected, atol=1e-3, rtol=1e-3)


def test_torchscript_exporter_and_batch_of_one(tmp_path):
    model = _calibrated("cifar_resnet20").train()  # export must use eval mode and restore train mode
    path = tmp_path / "ts.onnx"
    info = export_onnx(
        model, path, torch.randn(1, 3, 32, 32), ExportConfig(exporter="torchscript", opset=17), {"a": "b"}
    )
    assert model.training
    assert info["exporter"] == "torchscript" and info["opset"] == 17 and info["input_shape"][0] == "batch"
    assert _ort_run(path, np.random.randn(7, 3, 32, 32).astype(np.float32)).shape == (7, 10)
    check_parity(model, path, torch.randn(8, 3, 32, 32), atol=1e-3, min_agreement=0.99)


def test_dynamo_refuses_opsets_below_18(tmp_path):
    with pytest.raises(ExportError, match="opset >= 18.*torchscript"):
        export_onnx(torch.nn.Linear(4, 2), tmp_path / "m.onnx", torch.randn(2, 4), ExportConfig(opset=13), {})
    assert not (tmp_path / "m.onnx").exists()


def test_static_batch_export(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10)).eval()
    model(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    path = tmp_path / "static.onnx"
    info = export_onnx(model, path, torch.randn(1, 3, 32, 32), ExportConfig(dynamic_batch=False), {})
    assert info["input_shape"] == [1, 3, 32, 32] and not info["dynamic_batch"]
    assert _ort_run(path, np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)


# ---------------------------------------------------------------- parity gate / failures


def test_parity_gate_catches_a_changed_model(resnet):
    model, path, _ = resnet
    altered = copy.deepcopy(model)  # the exported model, changed after export
    head = [m for m in altered.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight))
    with pytest.raises(ExportError) as err:
        check_parity(altered, path, torch.randn(32, 3, 32, 32), atol=1e-3, min_agreement=0.99)
    msg = str(err.value)
    assert "parity" in msg and "atol 0.001" in msg and "exporter" in msg and "\n" not in msg


def test_parity_tolerances_are_respected(resnet):
    model, path, _ = resnet
    with pytest.raises(ExportError, match="atol 1e-12"):
        check_parity(model, path, torch.randn(8, 3, 32, 32), atol=1e-12, min_agreement=0.0)


def test_relative_tolerance_admits_large_logits(tmp_path):
    """Logits in the hundreds, off by 2e-4 relative: beyond atol 1e-3, within rtol 1e-3 x the image's scale."""
    torch.manual_seed(0)
    exported = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))
    with torch.no_grad():
        exported[1].weight.mul_(100)
    path = tmp_path / "large.onnx"
    export_onnx(exported, path, torch.randn(2, 3, 4, 4), ExportConfig(exporter="torchscript", opset=17), {})
    model = copy.deepcopy(exported)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 2e-4)  # same argmax, every logit 2e-4 larger in relative terms
    x = torch.randn(8, 3, 4, 4)
    report = check_parity(model, path, x, atol=1e-3, min_agreement=0.99, rtol=1e-3)
    assert report["max_abs_diff"] > 1e-3 and report["outside_tolerance"] == 0 and report["rtol"] == 1e-3
    with pytest.raises(ExportError) as err:
        check_parity(model, path, x, atol=1e-3, min_agreement=0.99, rtol=1e-5)
    msg = str(err.value)
    assert "rtol 1e-05" in msg and "large logits" in msg and "export.parity_rtol" in msg and "\n" not in msg
    assert ExportConfig().parity_rtol == 1e-3


def test_a_small_logit_next_to_huge_ones_is_judged_at_their_scale(tmp_path):
    """Float32 rounding follows the image's largest logits: a logit near 0 computed next to logits
    of 1e6 may be off by 0.5 (per-logit allclose would fail it), a logit off by 2% of that scale is not."""
    exported = torch.nn.Linear(2, 2)
    with torch.no_grad():
        exported.weight.copy_(torch.tensor([[1e6, 0.0], [0.0, 1.0]]))
        exported.bias.zero_()
    path = tmp_path / "huge.onnx"
    export_onnx(exported, path, torch.randn(2, 2), ExportConfig(exporter="torchscript", opset=17), {})
    x = torch.tensor([[1.0, 0.01], [2.0, -0.02]])
    rounded, wrong = copy.deepcopy(exported), copy.deepcopy(exported)
    with torch.no_grad():
        rounded.bias.copy_(torch.tensor([0.0, 0.5]))
        wrong.bias.copy_(torch.tensor([2e4, 0.0]))
    assert check_parity(rounded, path, x, atol=1e-3, min_agreement=1.0, rtol=1e-3)["outside_tolerance"] == 0
    with pytest.raises(ExportError, match="the image's largest"):
        check_parity(wrong, path, x, atol=1e-3, min_agreement=0.0, rtol=1e-3)


class _Boom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        raise RuntimeError("this model cannot be traced")


def test_failed_export_is_export_error_and_leaves_old_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous model")
    for exporter in ("dynamo", "torchscript"):
        with pytest.raises(ExportError, match="cannot be traced.*try export.exporter"):
            export_onnx(_Boom(), path, torch.randn(2, 4), ExportConfig(exporter=exporter), {})
    assert path.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp files left behind


# ---------------------------------------------------------------- metadata, accuracy, card


def test_metadata_round_trip(resnet):
    _, path, _ = resnet
    assert read_metadata(path) == METADATA
    # strings stay plain strings for other tools (Netron, onnxruntime's custom metadata)
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["recipe_hash"] == "0123456789abcdef" and json.loads(meta["class_names"])[0] == "class 0"


def test_onnx_accuracy_with_torch_and_numpy_batches(resnet):
    model, path, _ = resnet
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        p1, p2 = model(x1).argmax(1), model(x2).argmax(1)
    batches = [(x1, p1), (x2.numpy(), ((p2 + 1) % 10).numpy())]  # first all right, second all wrong
    assert onnx_accuracy(path, batches) == pytest.approx(0.5)
    with pytest.raises(ExportError, match="no batches"):
        onnx_accuracy(path, [])


def test_model_card(tmp_path):
    card = {"name": "run", "accuracy": 0.9, "path": Path("x")}
    write_model_card(tmp_path / "model_card.json", card)
    assert json.loads((tmp_path / "model_card.json").read_text()) == {"name": "run", "accuracy": 0.9, "path": "x"}


# ---------------------------------------------------------------- MLflow


def test_log_onnx_to_mlflow(resnet, tmp_path):
    _, path, _ = resnet
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        exp = mlflow.create_experiment("export-test", artifact_location=(tmp_path / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=exp)
        runs = [mlflow.MlflowClient().create_run(exp).info.run_id for _ in range(2)]
        with mlflow.start_run(run_id=runs[1]):  # another run is active: the named one must get the model
            uri = log_onnx_to_mlflow(path, np.random.randn(2, 3, 32, 32).astype(np.float32), run_id=runs[0])
        info = mlflow.models.get_model_info(uri)
        assert info.run_id == runs[0] and info.name == "model"
        assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
        logged = list((tmp_path / "artifacts").rglob("model.onnx"))
        assert len(logged) == 1 and (logged[0].parent / "MLmodel").is_file()
        assert read_metadata(logged[0]) == METADATA  # the logged file is the exported one
    finally:
        mlflow.set_tracking_uri(None)


def test_missing_onnxscript_is_a_clear_error(tmp_path):
    """Fresh interpreter: onnxscript is already imported in this one by earlier exports."""
    code = (
        "import sys; sys.modules['onnxscript'] = None\n"
        "import torch\n"
        "from toolchain.errors import ExportError\n"
        "from toolchain.onnx.export import export_onnx\n"
        "from toolchain.recipe import ExportConfig\n"
        "try:\n"
        f"    export_onnx(torch.nn.Linear(4, 2), r'{tmp_path / 'm.onnx'}', torch.randn(2, 4), ExportConfig(), {{}})\n"
        "except ExportError as exc:\n"
        "    print(exc)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert "needs onnxscript" in proc.stdout and "exporter: torchscript" in proc.stdout, proc.stderr
    assert not (tmp_path / "m.onnx").exists()


class _Pools(torch.nn.Module):
    """Two spatial means (adaptive pool, mean keepdim) and two that are not (over channels; no keepdim)."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True)) + y.mean(1, keepdim=True)
        return self.fc(torch.flatten(self.pool(y), 1)) + y.mean((2, 3)).sum(1, keepdim=True)


@pytest.mark.parametrize("exporter,opset,spatial", [("dynamo", 18, 2), ("torchscript", 13, 1)])
def test_spatial_means_export_as_global_average_pool(exporter, opset, spatial, tmp_path):
    """dynamo writes both spatial means as ReduceMean (axes an input), torchscript the keepdim one
    (axes an attribute); only those become GlobalAveragePool, and the axes constants they read go."""
    torch.manual_seed(0)
    model, path = _Pools().eval(), tmp_path / "pools.onnx"
    info = export_onnx(model, path, torch.randn(2, 3, 16, 16), ExportConfig(exporter=exporter, opset=opset), {})
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert info["pools_rewritten"] == spatial and ops.count("GlobalAveragePool") == 2 and ops.count("ReduceMean") == 2
    read = {name for n in graph.node for name in n.input}
    assert all(i.name in read for i in graph.initializer)
    assert all(n.output[0] in read for n in graph.node if n.op_type == "Constant")
    check_parity(model, path, torch.randn(5, 3, 16, 16), atol=1e-5, min_agreement=1.0)


@pytest.mark.parametrize("exporter,opset", [("dynamo", 18), ("torchscript", 13)])
def test_a_spatial_mean_over_a_one_pixel_map_exports_as_identity(exporter, opset, tmp_path):
    """onnxruntime's INT8 pool loops channel by channel: over a 1x1 map the mean is the identity."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)
    ).eval()
    path = tmp_path / "one_pixel.onnx"
    info = export_onnx(model, path, torch.randn(2, 3, 3, 3), ExportConfig(exporter=exporter, opset=opset), {})
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert info["pools_rewritten"] == 1 and "Identity" in ops
    assert "GlobalAveragePool" not in ops and "ReduceMean" not in ops
    check_parity(model, path, torch.randn(5, 3, 3, 3), atol=1e-5, min_agreement=1.0)
