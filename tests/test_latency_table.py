"""Layer latency table (issue 31): hand-serialised one-layer ONNX models, the spec checks, the
measurement, and the torch-free, onnx-free CLI. Tiny shapes, no timing thresholds."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import blocked_imports_env
from onnx import numpy_helper

from toolchain.bench import latency_table as lt
from toolchain.bench.layer_models import conv_model, linear_model
from toolchain.errors import BenchError

REPO = Path(__file__).resolve().parents[1]


def _conv(cin=4, cout=6, hw=(7, 9), kernel=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, **extra):
    return {
        "op": "conv",
        "cin": cin,
        "cout": cout,
        "height": hw[0],
        "width": hw[1],
        "kernel": list(kernel),
        "stride": list(stride),
        "padding": list(padding),
        "dilation": list(dilation),
        "groups": groups,
        **extra,
    }


def _spec(layers, batch_size=1, threads=1):
    return {"version": 1, "batch_size": batch_size, "threads": threads, "layers": layers}


def _run_and_weights(model: bytes, x: np.ndarray):
    """onnxruntime's output, and W, B parsed back with the onnx package (the test's reference only)."""
    proto = onnx.load_from_string(model)
    onnx.checker.check_model(proto, full_check=True)  # full_check: shape inference agrees with the declared y
    assert proto.ir_version == 8 and [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    weights = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}  # writable, for torch
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    return y, weights["W"], weights["B"]


# ---------------------------------------------------------------- layer_models


@pytest.mark.parametrize(
    "case, layer",
    [
        ("plain", _conv()),
        ("strided padded dilated", _conv(hw=(11, 10), kernel=(3, 5), stride=(2, 3), padding=(1, 2), dilation=(2, 1))),
        ("depthwise", _conv(cin=8, cout=8, groups=8, padding=(1, 1))),
        ("grouped", _conv(cin=6, cout=9, groups=3, kernel=(1, 3), stride=(1, 2))),
    ],
)
def test_conv_model_matches_torch_conv2d(case, layer):
    torch = pytest.importorskip("torch")
    fields = {k: v for k, v in layer.items() if k != "op"}
    model = conv_model(2, **fields, seed=3)
    x = np.random.default_rng(1).standard_normal((2, layer["cin"], layer["height"], layer["width"]), dtype=np.float32)
    y, w, b = _run_and_weights(model, x)
    assert w.shape == (layer["cout"], layer["cin"] // layer["groups"], *layer["kernel"])
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x),
        torch.from_numpy(w),
        torch.from_numpy(b),
        stride=layer["stride"],
        padding=layer["padding"],
        dilation=layer["dilation"],
        groups=layer["groups"],
    ).numpy()
    declared = [d.dim_value for d in onnx.load_from_string(model).graph.output[0].type.tensor_type.shape.dim]
    assert list(y.shape) == list(ref.shape) == declared, case
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert np.abs(b).max() > 0  # the bias is not zeros: the comparison covers it


def test_linear_model_matches_torch_linear():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((3, 20), dtype=np.float32)
    y, w, b = _run_and_weights(linear_model(3, 20, 7), x)
    assert w.shape == (7, 20) and y.shape == (3, 7)
    ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_models_are_byte_identical_to_onnx_serialisation_and_seeded():
    model = conv_model(1, 4, 8, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 2, seed=7)
    assert onnx.load_from_string(model).SerializeToString() == model  # same bytes as the onnx package writes
    assert model == conv_model(1, 4, 8, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 2, seed=7)
    assert model != conv_model(1, 4, 8, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 2, seed=8)


# ---------------------------------------------------------------- keys and spec


def test_layer_key_is_stable_and_ignores_extra_keys():
    conv = _conv(cin=32, cout=16, hw=(28, 28), padding=(1, 1))
    assert lt.layer_key(conv) == "conv:32x16@28x28:k3x3:s1x1:p1x1:d1x1:g1"
    as_tuples = {**conv, "kernel": (3, 3), "name": "features.3.conv", "note": "anything"}
    assert lt.layer_key(as_tuples) == lt.layer_key(conv)
    assert lt.layer_key({"op": "linear", "cin": 1280, "cout": 10, "name": "classifier"}) == "linear:1280x10"
    assert lt.layer_key(_conv(groups=2)) != lt.layer_key(_conv())


@pytest.mark.parametrize(
    "spec, expect",
    [
        (_spec([_conv(), _conv(cin=6, cout=8, groups=4)]), "spec.layers[1].groups: 4 must divide cin 6 and cout 8"),
        (_spec([_conv(hw=(2, 9), kernel=(3, 3))]), "spec.layers[0].kernel:"),
        (_spec([_conv(cin=True)]), "spec.layers[0].cin: expected an integer >= 1"),
        (_spec([_conv(stride=(0, 1))]), "spec.layers[0].stride: expected two integers >= 1"),
        (_spec([_conv(), {"op": "linear", "cin": 8, "name": "fc"}]), "spec.layers[1] (fc): missing field 'cout'"),
        (_spec([{"op": "pool"}]), "spec.layers[0].op: expected one of conv, linear"),
        (_spec([]), "spec.layers: expected a non-empty list"),
        ({**_spec([_conv()]), "version": 2}, "spec.version: expected 1"),
        (_spec([_conv()], batch_size=0), "spec.batch_size: expected an integer >= 1"),
        (_spec([_conv()], threads=-1), "spec.threads: expected an integer >= 0"),
    ],
)
def test_check_spec_names_the_bad_entry_in_one_line(spec, expect):
    with pytest.raises(BenchError) as info:
        lt.check_spec(spec)
    message = str(info.value)
    assert expect in message and "\n" not in message


def test_rounds_visit_layers_in_different_orders():
    orders = lt._orders(["a", "b"], 4, seed=0)
    assert all(sorted(o) == ["a", "b"] for o in orders)
    assert all(orders[i] != orders[i + 1] for i in range(3))


# ---------------------------------------------------------------- measure, load, lookup


def test_measure_table_times_each_distinct_layer_once():
    layers = [_conv(name="a"), {"op": "linear", "cin": 16, "cout": 4}, _conv(name="b")]  # a and b: one key
    calls = []
    table = lt.measure_table(
        _spec(layers, batch_size=2), min_time_s=0.001, rounds=2, progress=lambda *a: calls.append(a)
    )
    assert set(table["entries"]) == {lt.layer_key(layers[0]), "linear:16x4"}
    for entry in table["entries"].values():
        assert entry["ms"] > 0 and entry["runs"] >= 2 * lt.MIN_RUNS and len(entry["round_ms"]) == 2
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert table["batch_size"] == 2 and table["threads"] == 1 and table["version"] == lt.SPEC_VERSION
    assert table["device"]["onnxruntime"] == ort.__version__ and "avx2" in table["device"]["isa"]


def test_lookup_of_a_layer_the_table_lacks_says_rebuild():
    table = {"version": 1, "entries": {"linear:16x4": {"ms": 0.01}}}
    assert lt.lookup(table, {"op": "linear", "cin": 16, "cout": 4, "name": "fc"}) == 0.01
    with pytest.raises(BenchError, match=r"no entry linear:16x5: it was built for another model or spec; rebuild"):
        lt.lookup(table, {"op": "linear", "cin": 16, "cout": 5})


# ---------------------------------------------------------------- CLI, without torch and onnx


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    """PYTHONPATH with fake `torch` and `onnx` packages first: importing either fails loudly."""
    return blocked_imports_env(tmp_path_factory.mktemp("fake_torch_onnx"), ("torch", "onnx"), OMP_NUM_THREADS="1")


def _cli(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "toolchain.bench", *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_a_table_without_torch_or_onnx(no_torch_env, tmp_path):
    layers = [_conv(name="stem"), _conv(cin=6, cout=6, groups=6, padding=(1, 1)), {"op": "linear", "cin": 8, "cout": 3}]
    spec_path, out = tmp_path / "spec.json", tmp_path / "sub" / "table.json"
    spec_path.write_text(json.dumps(_spec(layers + [layers[0]])))
    proc = _cli(no_torch_env, "--latency-table", spec_path, "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "3 distinct layers (4 in the spec)" in proc.stdout and str(out) in proc.stdout
    assert "Traceback" not in proc.stderr and "6/6 layer timings" in proc.stderr
    table = lt.load_table(out)
    assert len(table["entries"]) == 3
    for layer in layers:
        assert lt.lookup(table, layer) == table["entries"][lt.layer_key(layer)]["ms"] > 0


@pytest.mark.parametrize(
    "case, args, expect",
    [
        ("missing spec", ["--latency-table", "{dir}/nope.json", "--json", "{dir}/t.json"], "spec file not found"),
        ("invalid spec", ["--latency-table", "{dir}/bad.json", "--json", "{dir}/t.json"], "spec.layers[0].groups"),
        ("model and table", ["m.onnx", "--latency-table", "{dir}/bad.json", "--json", "{dir}/t.json"], "not both"),
        ("no model", [], "the model file is required"),
        ("table without json", ["--latency-table", "{dir}/bad.json"], "needs --json"),
        ("model option", ["--latency-table", "{dir}/bad.json", "--json", "{dir}/t.json", "--warmup", "3"], "--warmup"),
    ],
)
def test_cli_table_errors_are_one_line(no_torch_env, tmp_path, case, args, expect):
    (tmp_path / "bad.json").write_text(json.dumps(_spec([_conv(cin=6, cout=8, groups=4)])))
    proc = _cli(no_torch_env, *[a.format(dir=tmp_path) for a in args])
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "t.json").exists()


def test_the_remainder_benchmark_reads_every_layer_of_an_exported_file_as_the_table_spec(tmp_path):
    """benchmarks/table_remainder.py times an exported file's layers with this table: every Conv and the
    Gemm become spec entries the checks accept, each with the shape the file has (the strided,
    depthwise and 1x1 convs of a thin mobilenet_v2 at 16x16)."""
    from conftest import benchmark_module

    bench = benchmark_module("table_remainder")
    model = bench.export(0.25, 16, 10, tmp_path / "thin.onnx")
    layers = bench.layer_shapes(model, 16)
    proto = onnx.load_from_string(model)
    assert [layer["name"] for layer in layers] == [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    checked = lt.check_spec({"version": 1, "batch_size": 2, "threads": 1, "layers": layers})["layers"]
    stem, first_dw, gemm = checked[0], checked[1], checked[-1]
    assert (stem["cin"], stem["height"], stem["kernel"], stem["stride"], stem["groups"]) == (3, 16, [3, 3], [2, 2], 1)
    assert first_dw["groups"] == first_dw["cin"] == first_dw["cout"] and first_dw["height"] == 8
    assert (gemm["op"], gemm["cout"]) == ("linear", 10)
    session = ort.InferenceSession(lt._model_bytes(stem, 2), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((2, 3, 16, 16), np.float32)})[0].shape == (2, stem["cout"], 8, 8)
