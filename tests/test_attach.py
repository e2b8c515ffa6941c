"""attach: a device's bench JSON (timed where torch cannot be imported) goes into the compress run
that shipped the model, by sha256; another model's JSON, a garbled one, an unknown run are refused
with one line and nothing logged."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import yaml
from conftest import blocked_imports_env
from onnx import TensorProto, helper, numpy_helper

from toolchain.attach import attach_data, find_run
from toolchain.bench import cli as bench_main
from toolchain.bench.device import fingerprint
from toolchain.cli import run
from toolchain.fsutil import file_sha256
from toolchain.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
FAST_BENCH = ["--batch-sizes", "1,2", "--warmup", "1", "--iterations", "3", "--time-budget", "0.2", "--threads", "1"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, fmnist_root):
    """One tiny compress (KD student with plain CE, 1 epoch, ONNX export, no bench), shared by the module."""
    tmp = tmp_path_factory.mktemp("attach")
    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp / "export"),
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32, "eval_batch_size": 64},
        "teacher": None,
        "student": {"model": "mobilenet_v3_small"},
        "distill": {"epochs": 1, "lr": 0.05, "loss": "ce"},
        "export": {"exporter": "torchscript", "opset": 17},
        "bench": None,  # attach is under test (dynamo: test_export.py)
        "tracking": {"uri": uri, "experiment": "tests", "register_model": "tiny-classifier"},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run(["compress", str(path)]) == 0
    summary = json.loads((tmp / "export" / "tiny" / "summary.json").read_text())
    return {
        "tmp": tmp,
        "uri": uri,
        "model": tmp / "export" / "tiny" / "model.onnx",
        "parent": summary["mlflow"]["parent_run_id"],
        "client": mlflow.MlflowClient(uri),
    }


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    """PYTHONPATH with a fake `torch` package first: any import of torch fails (as in test_bench.py)."""
    return blocked_imports_env(tmp_path_factory.mktemp("fake_torch"))


def bench_cli(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "toolchain.bench", *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def device_json(shipped, no_torch_env, tmp_path_factory):
    """The shipped model.onnx timed by the torch-free bench, as on a device named edge-1."""
    out = tmp_path_factory.mktemp("device") / "edge-1.json"
    proc = bench_cli(no_torch_env, shipped["model"], *FAST_BENCH, "--name", "edge-1", "--json", out)
    assert proc.returncode == 0, proc.stderr
    return out


def parent_state(shipped):
    """What a refused attach must leave unchanged: the parent run's metrics, tags and device artifacts."""
    client = shipped["client"]
    data = client.get_run(shipped["parent"]).data
    artifacts = [a.path for a in client.list_artifacts(shipped["parent"], "device")]
    return dict(data.metrics), dict(data.tags), artifacts


def client_run(shipped):
    return shipped["client"].get_run(shipped["parent"])


def test_compress_records_what_attach_and_the_ui_need(shipped):
    client, parent = shipped["client"], client_run(shipped)
    assert parent.data.tags["toolchain.sha256.model.onnx"] == file_sha256(shipped["model"])
    assert "toolchain.sha256.model_int8.onnx" not in parent.data.tags  # no quantize section: nothing else shipped
    m = parent.data.metrics
    assert m["test_accuracy"] == m["final.test_accuracy"] and m["onnx_file_bytes"] > m["onnx_zip_bytes"] > 0
    card = json.loads((shipped["model"].parent / "model_card.json").read_text())
    assert card["files"]["model.onnx"]["sha256"] == file_sha256(shipped["model"])
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == "fashion_mnist" and json.loads(dataset.dataset.profile)["test_rows"] == 100
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    version = client.get_model_version("tiny-classifier", "1")  # tracking.register_model
    assert version.run_id == shipped["parent"] and version.tags["sha256.model.onnx"] == file_sha256(shipped["model"])
    assert "mobilenet_v3_small on fashion_mnist (run tiny)" in version.description


def test_device_json_is_attached_to_the_run_that_shipped_the_model(shipped, device_json, capsys):
    data = json.loads(device_json.read_text())
    assert data["device"]["model_sha256"] == file_sha256(shipped["model"]) and data["device"]["name"] == "edge-1"
    capsys.readouterr()
    assert run(["attach", "tiny", str(device_json), "--tracking-uri", shipped["uri"]]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(
        f"attached {device_json} to run tiny (parent run {shipped['parent']}): device edge-1, model.onnx"
    )
    assert out[1].startswith("no pe_latency: the JSON times only the shipped model")  # no reference timings in it
    parent = client_run(shipped)
    for row in data["results"]:
        key = f"cpu.bs{row['batch_size']}"
        assert parent.data.metrics[f"device.edge-1.latency_p50_ms.{key}"] == pytest.approx(row["p50_ms"])
        assert parent.data.metrics[f"device.edge-1.latency_p90_ms.{key}"] == pytest.approx(row["p90_ms"])
        assert parent.data.metrics[f"device.edge-1.throughput.{key}"] == pytest.approx(row["throughput_img_s"])
    assert not any(k.endswith("pe_latency") and k.startswith("device.") for k in parent.data.metrics)
    assert parent.data.tags["device.edge-1.cpu"] == data["device"]["cpu_model"]
    (device_json.parent / "dl").mkdir(exist_ok=True)
    logged = shipped["client"].download_artifacts(
        shipped["parent"], "device/edge-1.json", str(device_json.parent / "dl")
    )
    assert json.loads(Path(logged).read_text()) == data


def test_a_parent_run_id_names_the_run_too(shipped, device_json, tmp_path):
    data = json.loads(device_json.read_text())
    data["device"]["name"] = "edge-2"
    renamed = tmp_path / "edge-2.json"
    renamed.write_text(json.dumps(data))
    assert (
        run(["attach", shipped["parent"], str(renamed), "--tracking-uri", shipped["uri"], "--experiment", "tests"]) == 0
    )
    assert "device.edge-2.latency_p50_ms.cpu.bs1" in client_run(shipped).data.metrics


def tiny_onnx(path: Path) -> Path:
    """Another model: Conv -> GlobalAveragePool -> Flatten, built with onnx.helper in milliseconds."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"]),
            helper.make_node("GlobalAveragePool", ["c"], ["g"]),
            helper.make_node("Flatten", ["g"], ["logits"]),
        ],
        "other",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def refused_json(case: str, tmp_path: Path, device_json: Path) -> Path:
    out = tmp_path / f"{case}.json"
    if case == "another model":
        assert bench_main.main([str(tiny_onnx(tmp_path / "other.onnx")), *FAST_BENCH, "--json", str(out)]) == 0
    elif case == "garbled":
        out.write_text(device_json.read_text()[:200])  # a copy cut short
    elif case == "no device section":  # what the bench wrote before the device fingerprint
        out.write_text(json.dumps({k: v for k, v in json.loads(device_json.read_text()).items() if k != "device"}))
    elif case in ("unknown run", "unknown experiment"):
        out.write_text(device_json.read_text())
    return out


@pytest.mark.parametrize(
    "case, run_ref, extra, expect",
    [
        ("another model", "tiny", [], "which run tiny did not ship (model.onnx "),
        ("garbled", "tiny", [], "not valid JSON"),
        ("no device section", "tiny", [], "no device section"),
        ("missing", "tiny", [], "device JSON not found"),
        ("unknown run", "no-such-run", [], "run 'no-such-run': no finished compress run of that name"),
        ("unknown run", "0" * 32, [], "no parent run with that id"),
        ("unknown experiment", "tiny", ["--experiment", "nope"], "experiment 'nope' not found"),
    ],
)
def test_refusals_are_one_line_exit_2_and_log_nothing(
    shipped, device_json, tmp_path, capsys, case, run_ref, extra, expect
):
    path = refused_json(case, tmp_path, device_json)
    before = parent_state(shipped)
    capsys.readouterr()
    assert run(["attach", run_ref, str(path), "--tracking-uri", shipped["uri"], *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert parent_state(shipped) == before


def test_a_missing_store_is_refused_without_creating_one(device_json, tmp_path, capsys):
    assert run(["attach", "tiny", str(device_json), "--tracking-uri", f"sqlite:///{tmp_path}/typo.db"]) == 2
    assert "no such database file" in capsys.readouterr().err and not (tmp_path / "typo.db").exists()


def test_bench_logs_into_the_run_itself_when_it_reaches_the_store(shipped, no_torch_env, tmp_path):
    proc = bench_cli(
        no_torch_env,
        shipped["model"],
        *FAST_BENCH,
        "--name",
        "edge-3",
        "--mlflow-run-id",
        "tiny",
        "--tracking-uri",
        shipped["uri"],
    )
    assert proc.returncode == 0, proc.stderr
    assert "attached" in proc.stdout and "device.edge-3.latency_p50_ms.cpu.bs2" in client_run(shipped).data.metrics


def test_bench_without_mlflow_says_so_before_timing(shipped, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert (
        bench_main.main(
            [str(shipped["model"]), *FAST_BENCH, "--mlflow-run-id", "tiny", "--tracking-uri", shipped["uri"]]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert "mlflow is not installed" in captured.err and "pip install mlflow-skinny" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "p50 ms" not in captured.out  # refused before the timing


# ---------------------------------------------------------------- INT8 file and PE latency, on a hand-made run


@pytest.fixture
def store(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "devices")
    tracker.connect()
    return tracker


def shipped_run(store, tmp_path, metrics, reference="teacher", **tags):
    """A finished compress run whose shipped files are float.onnx / int8.onnx and whose reference
    (teacher.onnx by default) is <reference>.onnx; `tags` are added to the run's."""
    files = {n: tmp_path / f"{n}.onnx" for n in ("float", "int8", reference)}
    for i, path in enumerate(files.values()):
        path.write_bytes(bytes([i]) * 64)
    tags = {
        "toolchain.run_name": "r",
        "toolchain.stage": "compress",
        "toolchain.sha256.model.onnx": file_sha256(files["float"]),
        "toolchain.sha256.model_int8.onnx": file_sha256(files["int8"]),
        f"toolchain.sha256.reference.{reference}": file_sha256(files[reference]),
        **tags,
    }
    with store.run("r", {}, tags) as parent:
        parent.log_metrics(metrics)
    return files, store.client.get_run(parent.run_id)


def rows(p50):
    return [{"provider": "cpu", "batch_size": 1, "p50_ms": p50, "p90_ms": p50 * 1.1, "throughput_img_s": 1000 / p50}]


def test_int8_timing_is_prefixed_and_pe_latency_uses_the_device_reference_timing(store, tmp_path):
    files, parent = shipped_run(store, tmp_path, {"int8.vs_teacher.retention": 0.9})
    data = {
        "device": fingerprint(files["int8"], "pi"),
        "results": rows(2.0),
        "references": {"teacher": {"sha256": file_sha256(files["teacher"]), "results": rows(8.0)}},
    }
    lines = attach_data(store.client, find_run(store.client, "r"), data, "pi.json")
    metrics = store.client.get_run(parent.info.run_id).data.metrics
    assert metrics["device.pi.int8.latency_p50_ms.cpu.bs1"] == 2.0
    assert metrics["device.pi.int8.vs_teacher.pe_latency"] == pytest.approx(0.9 * (1 - 2.0 / 8.0))
    assert "model_int8.onnx" in lines[0] and "pe_latency on the device: vs_teacher.pe_latency 0.675" in lines[1]
    assert [a.path for a in store.client.list_artifacts(parent.info.run_id, "device")] == ["device/pi.int8.json"]


def test_a_reference_timing_of_another_file_is_refused(store, tmp_path):
    from toolchain.attach import AttachError

    files, parent = shipped_run(store, tmp_path, {"final.vs_teacher.retention": 0.9})
    data = {
        "device": fingerprint(files["float"], "pi"),
        "results": rows(2.0),
        "references": {"teacher": {"sha256": file_sha256(files["int8"]), "results": rows(8.0)}},
    }
    with pytest.raises(
        AttachError, match="references.teacher timed a file .* that is not run r's teacher ONNX file"
    ) as err:
        attach_data(store.client, find_run(store.client, parent.info.run_id), data, "pi.json")
    assert "\n" not in str(err.value) and not store.client.get_run(parent.info.run_id).data.metrics.keys() - {
        "final.vs_teacher.retention"
    }


@pytest.mark.parametrize(
    "budget, results, references, expect",
    [
        (
            "latency_ms=2.5",
            rows(2.0),
            None,
            "prune.budget latency_ms 2.5 at batch 1 (predicted on the device's table at compress): confirmed on the device, p50 2.000 ms",
        ),
        ("latency_ms=1.5", rows(2.0), None, ": REFUTED on the device, p50 2.000 ms"),
        ("speedup=3", rows(2.0), rows(8.0), ": confirmed on the device, 4.00x the student"),
        ("speedup=3", rows(2.0), None, "not checked, a speedup needs the student timed on the device too"),
    ],
)
def test_attach_confirms_or_refutes_a_latency_budget_on_the_device(
    store, tmp_path, budget, results, references, expect
):
    files, _ = shipped_run(
        store,
        tmp_path,
        {"prune.budget.batch_size": 1.0, "final.vs_student.retention": 0.95},
        reference="student",
        **{"prune.budget": budget, "prune.budget.device_table": "yes"},
    )
    data = {"device": fingerprint(files["float"], "pi"), "results": results}
    if references:
        data["references"] = {"student": {"sha256": file_sha256(files["student"]), "results": references}}
    lines = attach_data(store.client, find_run(store.client, "r"), data, "pi.json")
    assert expect in lines[-1], lines
