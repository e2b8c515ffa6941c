"""What ships stays true (issue 34): the package's infer.py runs only the files its manifest lists,
refuses a model that does not fit its contract in one line, and a publish is all or nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from toolchain.cli import run

GOLDEN = 2  # of the package's PACKAGED_GOLDEN images, the ones infer.py is run on


@pytest.fixture(scope="module")
def package(packaged_tiny):
    """The package of the session's tiny packaged run (conftest.packaged_tiny, shared with
    tests/test_package.py; each test changes a copy: device_copy)."""
    return packaged_tiny / "package"


@pytest.fixture
def device_copy(package, tmp_path):
    """The package as copied onto a device: a folder of its own, and Python without torch."""
    folder = tmp_path / "device"
    shutil.copytree(package, folder)
    fake = tmp_path / "fake_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch is not on the device')\n")
    env = dict(os.environ, PYTHONPATH=str(fake), PYTHONDONTWRITEBYTECODE="1")
    return folder, env


def infer(folder: Path, env: dict, *args) -> subprocess.CompletedProcess:
    images = [f"golden/images/{i:03d}.png" for i in range(GOLDEN)]
    return subprocess.run(
        [sys.executable, "infer.py", "--json", *map(str, args), *images],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_refusal(proc, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and expected in proc.stderr, proc.stderr
    assert proc.stdout == ""


def tampered(src: Path, dst: Path) -> None:
    """The same graph with the classifier's weights negated: loads fine, gives other answers."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    name = [i for i in proto.graph.initializer if len(i.dims) == 2][-1].name  # the last Gemm/MatMul weight
    for init in proto.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), name))
    onnx.save(proto, str(dst))


# ---------------------------------------------------------------- item 6: infer.py verifies what it runs


def test_infer_refuses_a_tampered_model_and_runs_it_with_no_verify(device_copy):
    folder, env = device_copy
    honest = infer(folder, env, "--model", "model.onnx")
    assert honest.returncode == 0, honest.stderr
    tampered(folder / "model.onnx", folder / "model.onnx")
    one_line_refusal(infer(folder, env, "--model", "model.onnx"), "model.onnx has another sha256 than manifest.json")
    replaced = infer(folder, env, "--model", "model.onnx", "--no-verify")  # replaced on purpose: the user's call
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout) != json.loads(honest.stdout)


def test_infer_refuses_a_corrupted_default_model(device_copy):
    folder, env = device_copy
    default = json.loads((folder / "manifest.json").read_text())["default_model"]
    data = bytearray((folder / default).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / default).write_bytes(bytes(data))
    one_line_refusal(infer(folder, env), f"{default} has another sha256 than manifest.json")


def test_infer_refuses_an_altered_contract(device_copy):
    folder, env = device_copy
    contract = json.loads((folder / "preprocess.json").read_text())
    contract["mean"] = [0.0, 0.0, 0.0]
    (folder / "preprocess.json").write_text(json.dumps(contract))
    one_line_refusal(infer(folder, env), "preprocess.json has another sha256 than manifest.json")


def test_infer_refuses_a_model_from_outside_the_package_unless_told(device_copy, tmp_path):
    folder, env = device_copy
    outside = tmp_path / "mine.onnx"
    tampered(folder / "model.onnx", outside)
    one_line_refusal(infer(folder, env, "--model", outside), "is not a copy of a .onnx file listed in")
    shutil.copyfile(folder / "model.onnx", tmp_path / "copy.onnx")  # an exact copy of a shipped model is fine
    assert infer(folder, env, "--model", tmp_path / "copy.onnx").returncode == 0


def small_model(path: Path, side: int, classes: int) -> None:
    """A real ONNX classifier of another input size or class count: mean over the pixels, then Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((3, classes), np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        ],
        "small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [weight, axes],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.parametrize(
    "side, classes, expected",
    [
        (64, 10, "takes input ['batch', 3, 64, 64], but preprocess.json prepares images as [batch, 3, 32, 32]"),
        (32, 12, "gives 12 scores per image, but preprocess.json names 10"),
    ],
)
def test_a_model_that_does_not_fit_the_contract_is_one_line(device_copy, tmp_path, side, classes, expected):
    folder, env = device_copy
    small_model(tmp_path / "other.onnx", side, classes)
    one_line_refusal(infer(folder, env, "--model", tmp_path / "other.onnx", "--no-verify"), expected)


# ---------------------------------------------------------------- item 7 and weak: attach refuses absurd numbers


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its schema takes seconds); each test makes its own run."""
    from toolchain.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path_factory.mktemp('devices')}/mlflow.db", "devices")
    tracker.connect()
    return tracker


@pytest.fixture
def device_run(store, tmp_path):
    """A finished compress run (the newest named r) shipping model.onnx with a teacher reference (files of a
    few bytes: attach matches sha256 only), and a bench JSON of that file as a device writes it."""
    from toolchain.bench.device import fingerprint
    from toolchain.fsutil import file_sha256

    tracker, uri = store, store.uri
    files = {n: tmp_path / f"{n}.onnx" for n in ("float", "teacher")}
    for i, path in enumerate(files.values()):
        path.write_bytes(bytes([i]) * 64)
    tags = {
        "toolchain.run_name": "r",
        "toolchain.stage": "compress",
        "toolchain.sha256.model.onnx": file_sha256(files["float"]),
        "toolchain.sha256.reference.teacher": file_sha256(files["teacher"]),
    }
    with tracker.run("r", {}, tags) as parent:
        parent.log_metrics({"final.vs_teacher.retention": 0.9})
    data = {
        "device": fingerprint(files["float"], "pi"),
        "results": device_rows(2.0),
        "references": {"teacher": {"sha256": file_sha256(files["teacher"]), "results": device_rows(8.0)}},
    }
    return {
        "uri": uri,
        "client": tracker.client,
        "run_id": parent.run_id,
        "data": data,
        "tmp": tmp_path,
        "tracker": tracker,
        "tags": tags,
    }


def device_rows(p50):
    return [{"provider": "cpu", "batch_size": 1, "p50_ms": p50, "p90_ms": p50 * 1.1, "throughput_img_s": 1000 / p50}]


def attach_cli(capsys, device_run, data, ref="r"):
    path = device_run["tmp"] / "device.json"
    path.write_text(json.dumps(data))
    capsys.readouterr()
    code = run(["attach", ref, str(path), "--tracking-uri", device_run["uri"]])
    out = capsys.readouterr()
    return code, out


def logged(device_run):
    client = device_run["client"]
    metrics = client.get_run(device_run["run_id"]).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith("device.")}, client.list_artifacts(
        device_run["run_id"], "device"
    )


@pytest.mark.parametrize(
    "where, key, value, expected",
    [
        ("results", "p50_ms", 1e300, "p50_ms is 1e+300, outside what a device measures"),
        ("references", "p50_ms", 1e-300, "p50_ms is 1e-300, outside what a device measures"),
        ("results", "p50_ms", float("nan"), "lacks a provider, batch_size or positive"),
        ("results", "p50_ms", float("inf"), "lacks a provider, batch_size or positive"),
        ("results", "p50_ms", -1.0, "lacks a provider, batch_size or positive"),
        ("results", "p50_ms", 0.0, "lacks a provider, batch_size or positive"),
        ("results", "throughput_img_s", 1e12, "throughput_img_s is 1e+12, outside"),
        ("results", "p90_ms", 1.0, "p90_ms 1 is below p50_ms 2"),
    ],
)
def test_attach_refuses_absurd_latencies_in_one_line_and_logs_nothing(device_run, capsys, where, key, value, expected):
    data = json.loads(json.dumps(device_run["data"]))
    row = data["results"][0] if where == "results" else data["references"]["teacher"]["results"][0]
    row[key] = value
    code, out = attach_cli(capsys, device_run, data)
    assert code == 2 and out.err.count("\n") == 1 and expected in out.err and "Traceback" not in out.err, out.err
    assert logged(device_run) == ({}, [])


def test_attach_twice_logs_once(device_run, capsys):
    code, out = attach_cli(capsys, device_run, device_run["data"])
    assert code == 0, out.err
    first = logged(device_run)
    history = device_run["client"].get_metric_history(device_run["run_id"], "device.pi.latency_p50_ms.cpu.bs1")
    code, out = attach_cli(capsys, device_run, device_run["data"])
    assert code == 0 and "already attached" in out.out and "nothing logged" in out.out
    assert logged(device_run)[0] == first[0]
    again = device_run["client"].get_metric_history(device_run["run_id"], "device.pi.latency_p50_ms.cpu.bs1")
    assert len(again) == len(history) == 1


@pytest.mark.parametrize("status", ["FAILED", "RUNNING", "KILLED"])
def test_attach_by_id_to_an_unfinished_run_is_refused(device_run, capsys, status):
    client = device_run["client"]
    other = client.create_run(device_run["tracker"].experiment_id, run_name="r", tags=device_run["tags"])
    if status != "RUNNING":
        client.set_terminated(other.info.run_id, status)
    code, out = attach_cli(capsys, device_run, device_run["data"], ref=other.info.run_id)
    assert code == 2 and out.err.count("\n") == 1 and f"is {status}, not FINISHED" in out.err, out.err
    assert not client.get_run(other.info.run_id).data.metrics


# ---------------------------------------------------------------- item 8: publish is all or nothing


def shipped_state(run_dir: Path) -> dict:
    """sha256 of every file export/<run>/ ships (summary.json is the run's record, not a shipped file)."""
    from toolchain.fsutil import file_sha256

    return {
        p.relative_to(run_dir).as_posix(): file_sha256(p)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "summary.json"
    }


def staging_left(export: Path) -> list:
    return [p.name for p in export.iterdir() if p.name.endswith(".tmp")]


def publish_recipe(tiny_recipe, lr: float, **extra):
    from conftest import fast_bench

    return tiny_recipe(
        teacher=None,
        distill={"epochs": 1, "lr": lr, "loss": "ce"},
        export={"exporter": "dynamo", "opset": 18, "references": False},
        bench=fast_bench(1),
        package={"golden_images": 2},
        **extra,
    )


def start_compress(path: Path) -> subprocess.Popen:
    import signal

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "toolchain", "compress", str(path)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
def test_a_failed_or_killed_rerun_changes_nothing_a_successful_run_shipped(tiny_recipe, tmp_path, capsys):
    import signal
    import time

    export, run_dir = tmp_path / "export", tmp_path / "export" / "tiny"
    assert run(["compress", str(publish_recipe(tiny_recipe, 0.05))]) == 0
    first = json.loads((run_dir / "summary.json").read_text())
    before = shipped_state(run_dir)
    assert {"model.onnx", "model_card.json", "bench.json", "package/manifest.json", "recipe.yaml"} <= set(before)
    assert first["shipped"]["parent_run_id"] == first["mlflow"]["parent_run_id"]

    # another model, then quantize fails (no candidate can clear a 100x speedup, on_miss: error): after export
    failing = publish_recipe(
        tiny_recipe,
        0.02,
        quantize={
            "candidates": ["qdq_u8s8_dw_per_channel"],
            "calibration_images": 32,
            "min_speedup": 100,
            "on_miss": "error",
            "latency": {
                "block_s": 0.005,
                "blocks": 2,
                "min_replicates": 2,
                "max_replicates": 2,
                "isolation": "session",
            },
        },
    )
    capsys.readouterr()
    assert run(["compress", str(failing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert shipped_state(run_dir) == before and staging_left(export) == []
    failed = json.loads((run_dir / "summary.json").read_text())
    assert failed["status"] == "FAILED" and failed["shipped"]["parent_run_id"] == first["mlflow"]["parent_run_id"]
    assert failed["files"] == first["files"] and "previous successful run" in failed["shipped"]["note"]

    # SIGKILL once the new model.onnx is in the staging folder: nothing shipped changes; the next start
    # removes the orphan staging folder
    proc = start_compress(publish_recipe(tiny_recipe, 0.03))
    deadline = time.time() + 300
    while time.time() < deadline and not list(export.glob(".tiny.*.publish.tmp/model.onnx")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert shipped_state(run_dir) == before and len(staging_left(export)) == 1

    # a successful rerun replaces all of it, consistently
    third = publish_recipe(tiny_recipe, 0.03)
    assert run(["compress", str(third)]) == 0
    after = shipped_state(run_dir)
    final = json.loads((run_dir / "summary.json").read_text())
    assert staging_left(export) == [] and final["status"] == "FINISHED"
    assert after["model.onnx"] != before["model.onnx"] and after["package/model.onnx"] != before["package/model.onnx"]
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["files"]["model.onnx"]["sha256"] == after["model.onnx"]
    assert final["files"]["model.onnx"] == str(run_dir / "model.onnx")
    manifest = json.loads((run_dir / "package" / "manifest.json").read_text())
    assert manifest["run"]["recipe_hash"] == final["recipe_hash"]


def test_stale_publish_folders_go_once_their_process_is_gone(tmp_path):
    from toolchain.fsutil import owned_temp_name, remove_stale_temp_files

    live = tmp_path / owned_temp_name("run")  # this process: alive
    dead = tmp_path / owned_temp_name("run").replace(f"-{os.getpid()}-", "-999999999-")
    package = tmp_path / "run" / ".package.abcd1234.tmp"  # a killed package publish: judged by age
    for folder in (live, dead, package):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "model.onnx").write_bytes(b"x")
    old = 0
    os.utime(package, (old, old))
    assert remove_stale_temp_files(tmp_path) == 2
    assert live.is_dir() and not dead.exists() and not package.exists()


# ---------------------------------------------------------------- weak: preflights and a dead server for report


def test_more_golden_images_than_the_test_split_fails_before_training(tiny_recipe, tmp_path, capsys):
    recipe = yaml.safe_load(Path(tiny_recipe()).read_text())
    recipe.update(
        teacher=None,
        distill={"epochs": 1, "lr": 0.05, "loss": "ce"},
        export={"references": False},
        package={"golden_images": 20},
    )
    recipe["data"]["test_subset"] = 10
    path = tmp_path / "golden.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run(["compress", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "package.golden_images is 20 but the test split has 10 images" in err, err
    assert not list((tmp_path / "export" / ".cache").glob("distill-*/result.json"))  # nothing trained


def test_report_against_a_dead_server_is_one_line_without_the_password(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert run(["report", "tests", "--tracking_uri", f"http://alice:Hunter2-s3cret@127.0.0.1:{port}", "--nolog"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is unreachable" in err and "Hunter2" not in err and "alice:***@" in err, err
