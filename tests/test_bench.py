"""onnxruntime benchmark: statistics, provider checks, input shapes, the torch-free CLI.

The ONNX models here are built with onnx.helper (no torch, milliseconds), so the bench
is tested exactly as it runs on an edge device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import blocked_imports_env
from onnx import TensorProto, helper, numpy_helper

from toolchain.bench import cli as bench_cli
from toolchain.bench import ort as bench
from toolchain.errors import BenchError

REPO = Path(__file__).resolve().parents[1]


def _tiny_onnx(path: Path, batch="batch", hw=(32, 32)) -> Path:
    """Conv(3->8) -> GlobalAveragePool -> Flatten -> Gemm(8->10): a classifier in miniature."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, *hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        initializer=[w, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return _tiny_onnx(tmp_path_factory.mktemp("bench") / "tiny.onnx")


FAST = dict(warmup=2, iterations=20, time_budget_s=0.5)


# ---------------------------------------------------------------- statistics


def test_benchmark_rows_and_environment(model_path):
    res = bench.benchmark(model_path, batch_sizes=(1, 4), intra_op_threads=1, **FAST)
    rows = res["results"]
    assert [(r["provider"], r["batch_size"]) for r in rows] == [("cpu", 1), ("cpu", 4)]
    for r in rows:
        assert r["input_shape"] == [r["batch_size"], 3, 32, 32]
        assert 1 <= r["iterations"] <= 20
        assert all(r[k] > 0 for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "throughput_img_s"))
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["std_ms"] >= 0
    env = res["environment"]
    assert env["onnxruntime"] == ort.__version__
    assert env["providers_active"] == {"cpu": ["CPUExecutionProvider"]}
    assert env["intra_op_threads"] == 1 and env["inter_op_threads"] == 1 and env["graph_optimization"] == "all"
    assert env["cpu_model"] and env["cpu_count"] >= 1 and env["physical_cores"] >= 1
    assert res["input"] == {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "tensor(float)"}
    json.dumps(res)  # results go to --json and MLflow as is


def test_time_calls_counts_warmup_and_iterations():
    calls = []
    times = bench.time_calls(lambda: calls.append(1), warmup=3, iterations=5, time_budget_s=60)
    assert len(times) == 5 and len(calls) == 8


def test_time_budget_ends_timing_before_iterations():
    times = bench.time_calls(lambda: sum(range(20000)), warmup=0, iterations=10**7, time_budget_s=0.05)
    assert 1 <= len(times) < 10**7


def test_latency_stats_known_values():
    s = bench.latency_stats([0.001, 0.002, 0.003, 0.004], batch_size=8)
    assert s["p50_ms"] == pytest.approx(2.5) and s["mean_ms"] == pytest.approx(2.5)
    assert s["min_ms"] == pytest.approx(1.0) and s["iterations"] == 4
    assert s["throughput_img_s"] == pytest.approx(8 * 4 / 0.010)
    assert s["std_ms"] == pytest.approx(np.std([1, 2, 3, 4]))


def test_format_table(model_path):
    res = bench.benchmark(model_path, batch_sizes=(1, 2), **FAST)
    table = bench.format_table(res)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["provider", "batch", "p50"] and len(lines) == 4
    slower = {"results": [dict(r, p50_ms=r["p50_ms"] * 2) for r in res["results"]]}
    assert "2.00x" in bench.format_table(res, reference=slower)


# ---------------------------------------------------------------- providers


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_unavailable_provider_is_a_clear_error(model_path, provider):
    if bench.PROVIDERS[provider] in ort.get_available_providers():
        pytest.skip(f"{provider} is installed here")
    with pytest.raises(BenchError, match="not available") as err:
        bench.benchmark(model_path, providers=(provider,), **FAST)
    msg = str(err.value)
    assert "onnxruntime-gpu" in msg and "CPUExecutionProvider" in msg and "\n" not in msg


def test_provider_that_falls_back_silently_is_an_error(model_path, monkeypatch):
    """ORT falls back to CPU when CUDA libs fail to load; the bench must refuse, not mislabel."""
    real_session = ort.InferenceSession

    def cpu_only_session(path, sess_options=None, providers=None, **kwargs):
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", cpu_only_session)
    with pytest.raises(BenchError, match="activated only CPUExecutionProvider"):
        bench.benchmark(model_path, providers=("cuda",), **FAST)


def test_unknown_provider(model_path):
    with pytest.raises(BenchError, match="unknown provider 'gpu'"):
        bench.benchmark(model_path, providers=("gpu",), **FAST)


# ---------------------------------------------------------------- input shapes


def test_user_input_shape_must_fit(model_path):
    res = bench.benchmark(model_path, batch_sizes=(2,), input_shape=(3, 32, 32), **FAST)
    assert res["results"][0]["input_shape"] == [2, 3, 32, 32]
    with pytest.raises(BenchError, match="does not fit"):
        bench.benchmark(model_path, batch_sizes=(2,), input_shape=(3, 64, 64), **FAST)
    with pytest.raises(BenchError, match="does not fit"):
        bench.benchmark(model_path, batch_sizes=(2,), input_shape=(32, 32), **FAST)


def test_fixed_batch_model_refuses_other_batch_sizes(tmp_path):
    path = _tiny_onnx(tmp_path / "static.onnx", batch=1)
    assert bench.benchmark(path, batch_sizes=(1,), **FAST)["results"][0]["batch_size"] == 1
    with pytest.raises(BenchError, match="fixed batch size of 1"):
        bench.benchmark(path, batch_sizes=(1, 8), **FAST)


def test_dynamic_spatial_dims_need_an_input_shape(tmp_path):
    path = _tiny_onnx(tmp_path / "dyn_hw.onnx", hw=("h", "w"))
    with pytest.raises(BenchError, match="--input-shape"):
        bench.benchmark(path, batch_sizes=(1,), **FAST)
    res = bench.benchmark(path, batch_sizes=(1,), input_shape=(3, 24, 24), **FAST)
    assert res["results"][0]["input_shape"] == [1, 3, 24, 24]


def test_random_input_is_drawn_in_float32_and_seeded():
    x = bench.make_input((2, 3, 4, 4), "tensor(float)", seed=3)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.random.default_rng(3).standard_normal((2, 3, 4, 4), dtype=np.float32))
    assert bench.make_input((2, 3), "tensor(int64)").dtype == np.int64


def test_input_beyond_the_memory_bound_is_refused(model_path, monkeypatch):
    monkeypatch.setattr(bench, "input_bytes_limit", lambda: 40000)
    assert bench.benchmark(model_path, batch_sizes=(3,), **FAST)["results"][0]["batch_size"] == 3  # 36864 bytes
    with pytest.raises(BenchError, match=r"batch size 4: .* 49152 bytes .* over the 40000 bytes") as err:
        bench.benchmark(model_path, batch_sizes=(4,), **FAST)
    assert "\n" not in str(err.value)


def test_recipe_bench_batch_sizes_have_an_upper_bound():
    from toolchain.errors import RecipeError
    from toolchain.recipe import BenchConfig, validate_dict

    assert BenchConfig(batch_sizes=[1, 4096]).batch_sizes == [1, 4096]
    recipe = {
        "name": "b",
        "student": {"model": "cifar_resnet20"},
        "distill": {"loss": "ce"},
        "bench": {"batch_sizes": [1, 100000000]},
    }
    with pytest.raises(RecipeError, match="bench.batch_sizes: batch size 100000000 is above the maximum 4096") as err:
        validate_dict(recipe)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- CLI, without torch


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    """PYTHONPATH with a fake `torch` package first: any import of torch fails loudly."""
    return blocked_imports_env(tmp_path_factory.mktemp("fake_torch"))


def _cli(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "toolchain.bench", *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_runs_without_torch(model_path, no_torch_env, tmp_path):
    out = tmp_path / "res.json"
    proc = _cli(
        no_torch_env,
        model_path,
        "--batch-sizes",
        "1,4",
        "--iterations",
        "5",
        "--time-budget",
        "0.3",
        "--threads",
        "1",
        "--json",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert "p50 ms" in proc.stdout and "img/s" in proc.stdout and "CPUExecutionProvider" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["batch_size"] for r in data["results"]] == [1, 4]
    assert all(r["p50_ms"] > 0 for r in data["results"])


@pytest.mark.parametrize(
    "case, args, expect",
    [
        ("missing file", ["{dir}/nope.onnx"], "not found"),
        ("corrupt file", ["{dir}/corrupt.onnx"], "cannot load"),
        ("wrong input shape", ["{model}", "--input-shape", "3,64,64"], "does not fit"),
        ("unknown provider", ["{model}", "--providers", "gpu"], "unknown provider"),
        ("bad batch sizes", ["{model}", "--batch-sizes", "0"], "--batch-sizes"),
        # 1e8 x 3x32x32 float32: refused before numpy tries to allocate 1.2 TB
        ("batch beyond memory", ["{model}", "--batch-sizes", "100000000"], "would take 1228800000000 bytes"),
        ("json is a directory", ["{model}", "--json", "{dir}"], "is a directory; pass a file path"),
        (
            "json under a file",
            [
                "{model}",
                "--iterations",
                "1",
                "--warmup",
                "0",
                "--batch-sizes",
                "1",
                "--json",
                "{dir}/corrupt.onnx/res.json",
            ],
            "corrupt.onnx is a file",
        ),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(model_path, no_torch_env, tmp_path, case, args, expect):
    (tmp_path / "corrupt.onnx").write_bytes(b"\x00not an onnx model at all\xff" * 10)
    argv = [a.format(dir=tmp_path, model=model_path) for a in args]
    proc = _cli(no_torch_env, *argv)
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "output_dir" not in proc.stderr


def test_main_in_process_unavailable_provider(model_path, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("cuda is installed here")
    assert bench_cli.main([str(model_path), "--providers", "cuda", "--iterations", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnxruntime-gpu" in err


# ---------------------------------------------------------------- PyTorch eager


def test_torch_eager_latency_matches_bench_rows():
    torch = pytest.importorskip("torch")
    from toolchain.bench.torch_eager import torch_eager_latency

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)
    )
    model.train()
    threads = torch.get_num_threads()
    res = torch_eager_latency(model, (3, 32, 32), (1, 3), warmup=1, iterations=5, time_budget_s=0.5, threads=1)
    assert [r["batch_size"] for r in res["results"]] == [1, 3]
    for r in res["results"]:
        assert r["provider"] == "torch_eager" and r["input_shape"] == [r["batch_size"], 3, 32, 32]
        assert set(bench.STAT_KEYS) <= set(r) and 1 <= r["iterations"] <= 5
        assert all(r[k] > 0 for k in bench.STAT_KEYS if k != "std_ms")
    assert res["environment"]["threads"] == 1
    assert model.training and torch.get_num_threads() == threads  # state restored
    assert "1.00x" in bench.format_table(res, reference=res)  # comparable with ORT rows


# ---------------------------------------------------------------- the device fingerprint in --json


def test_json_has_the_device_section(model_path, no_torch_env, tmp_path):
    import socket

    from toolchain.fsutil import file_sha256

    out = tmp_path / "device.json"
    proc = _cli(
        no_torch_env,
        model_path,
        "--batch-sizes",
        "1",
        "--iterations",
        "2",
        "--time-budget",
        "0.2",
        "--threads",
        "1",
        "--json",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    device = json.loads(out.read_text())["device"]
    assert device["model_sha256"] == file_sha256(model_path) and device["model_file"] == model_path.name
    assert device["hostname"] == socket.gethostname() and device["name"]  # default name: from the hostname
    assert set(device["isa"]) == {"avx2", "avx512", "vnni", "amx", "arm_dotprod", "arm_i8mm"}
    assert device["logical_cores"] == os.cpu_count() and 1 <= device["physical_cores"] <= os.cpu_count()
    assert device["onnxruntime"] == ort.__version__ and "CPUExecutionProvider" in device["providers_available"]
    assert device["threads"] == {"intra_op": 1, "intra_op_effective": 1, "inter_op": 1}
    assert device["os"] and device["machine"] and device["cpu_model"]
    assert f"device {device['name']}: " in proc.stdout


def test_json_device_name_hostname_and_reference_timings(model_path, no_torch_env, tmp_path):
    from toolchain.fsutil import file_sha256

    out, reference = tmp_path / "device.json", _tiny_onnx(tmp_path / "teacher.onnx", hw=(16, 16))
    proc = _cli(
        no_torch_env,
        model_path,
        "--batch-sizes",
        "1",
        "--iterations",
        "2",
        "--time-budget",
        "0.2",
        "--name",
        "pi-5",
        "--no-hostname",
        "--reference",
        f"teacher={reference}",
        "--compare-budget",  # the interval's plumbing is checked, not its width: stop after the minimum
        "1",
        "--json",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["device"]["name"] == "pi-5" and "hostname" not in data["device"]
    teacher = data["references"]["teacher"]
    assert teacher["sha256"] == file_sha256(reference) and [r["batch_size"] for r in teacher["results"]] == [1]
    # the ratio is a paired, replicated comparison (fresh torch-free processes too) with its interval
    (ratio,) = data["comparisons"]["cpu"]["ratios"]
    assert (ratio["baseline"], ratio["candidate"], ratio["batch_size"]) == ("teacher", "model", 1)
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"] and ratio["replicates"] >= 2
    assert "faster than teacher (median, 95% interval over" in proc.stdout


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--name", "pi.5"], "--name 'pi.5' is not a device name"),
        (["--reference", "mentor=x.onnx"], "expected teacher=PATH or student=PATH"),
        (["--compare-budget", "0"], "--compare-budget must be > 0 seconds"),
        (["--reference", "teacher={dir}/nope.onnx"], "nope.onnx: ONNX model file not found"),
    ],
)
def test_device_options_bad_input_is_one_line_exit_2(model_path, no_torch_env, tmp_path, args, expect):
    proc = _cli(no_torch_env, model_path, "--iterations", "1", *[a.format(dir=tmp_path) for a in args])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr


def test_device_default_name_is_metric_safe():
    from toolchain.bench.device import default_name

    assert (
        default_name("edge-01.lan") == "edge-01"
        and default_name("my box") == "my-box"
        and default_name("..") == "device"
    )


def test_the_latency_table_notes_other_processes_not_the_comparisons_own_threads():
    from types import SimpleNamespace

    from toolchain.stages.bench import _load_note

    # the demo's bench stage on a quiet machine: its own spinning threads put the load average at 2.8
    quiet = SimpleNamespace(
        environment={"load_average": {"start": 2.8, "end": 2.1}, "cpu_affinity": 2, "other_cpu_load": 0.02}
    )
    shared = SimpleNamespace(
        environment={"load_average": {"start": 1.0, "end": 1.2}, "cpu_affinity": 2, "other_cpu_load": 0.9}
    )
    assert _load_note(quiet) == ""
    assert "other processes kept 0.90 CPUs busy" in _load_note(shared)
    # no /proc/stat (not Linux): the load average above the core count is all there is
    elsewhere = SimpleNamespace(environment={"load_average": {"start": 2.8, "end": 2.1}, "cpu_affinity": 2})
    assert "load average 2.8 on 2 CPUs" in _load_note(elsewhere)
