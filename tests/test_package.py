"""The package stage: a self-checking device package of the shipped model, built in a tiny run,
then used as a device would use it (no torch), and guarded by its manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import PACKAGED_GOLDEN

from toolchain.cli import run
from toolchain.engine.runner import plan
from toolchain.errors import RecipeError
from toolchain.fsutil import file_sha256
from toolchain.package.build import PackageError, build_package
from toolchain.package.verify import damaged_files, verify_package
from toolchain.recipe import validate_dict

GOLDEN = PACKAGED_GOLDEN


@pytest.fixture(scope="module")
def packaged(packaged_tiny):
    """One tiny run (no teacher, 1 epoch ce, export without references, no bench) with a package,
    shared with the publish tests: read it, or change a copy."""
    run_dir = packaged_tiny
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "recipe": run_dir.parents[1] / "recipe.yaml",
        "run_dir": run_dir,
        "package": run_dir / "package",
        "summary": summary,
        "cache": Path(summary["stages"]["export"]["paths"]["final"]).parents[1],
    }


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    """PYTHONPATH with a fake `torch` first, and not the checkout: a device has neither."""
    fake = tmp_path_factory.mktemp("fake_torch")
    (fake / "torch").mkdir()
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch is not on the device')\n")
    env = dict(os.environ, PYTHONPATH=str(fake), PYTHONDONTWRITEBYTECODE="1")
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not on the device" in probe.stderr  # the trap works
    return env


def in_package(folder: Path, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )


def pipeline_tensors(packaged) -> np.ndarray:
    """The pipeline's own first test tensors (its loader's preprocessing, not the package's)."""
    from toolchain.data.loaders import build_data
    from toolchain.recipe import load_recipe

    recipe = load_recipe(packaged["recipe"])
    x, _ = next(iter(build_data(recipe.data, recipe.seed).test))
    return x[:GOLDEN].numpy()


def pipeline_probabilities(packaged) -> np.ndarray:
    """The run's own ONNX model on the pipeline's own test tensors, as softmax probabilities."""
    session = ort.InferenceSession(str(packaged["run_dir"] / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": pipeline_tensors(packaged)})[0].astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- the package a run publishes


def test_package_holds_models_contract_golden_data_and_a_true_manifest(packaged):
    pkg, info = packaged["package"], packaged["summary"]["stages"]["package"]["info"]
    for name in (
        "model.onnx",
        "model.ort",
        "required_operators.config",
        "labels.txt",
        "preprocess.json",
        "infer.py",
        "README.md",
        "golden/inputs.npy",
        "golden/outputs_float.npy",
        "golden/expected.json",
        "toolchain/bench/ort.py",
        "toolchain/bench/cli.py",
        "toolchain/bench/compare.py",
        "manifest.json",
    ):
        assert (pkg / name).is_file(), name
    assert not (pkg / "model_int8.onnx").exists()  # no quantize section: nothing INT8 ships
    assert sorted(p.name for p in (pkg / "golden" / "images").iterdir()) == [f"{i:03d}.png" for i in range(GOLDEN)]
    contract = json.loads((pkg / "preprocess.json").read_text())
    card = json.loads((packaged["run_dir"] / "model_card.json").read_text())
    assert (pkg / "labels.txt").read_text().splitlines() == contract["class_names"] == card["class_names"]
    assert contract["input_shape"][1:] == [3, 32, 32] and contract["mean"] == card["normalization_mean"]
    assert (contract["image_mode"], contract["fit"], contract["layout"]) == ("grey", "pad", "NCHW")
    manifest = json.loads((pkg / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk == info["files"]
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": file_sha256(pkg / name), "bytes": (pkg / name).stat().st_size}, name
    assert manifest["default_model"] == "model.ort" and manifest["run"]["run_name"] == "tiny"
    cached = next(packaged["cache"].glob("package-*/package"))
    hashes = packaged["summary"]["stages"]["package"]["paths"]
    assert damaged_files(cached) == [] and hashes["package"].startswith(str(cached))
    # the published ONNX file is the run's own (identity stamped in), so `attach` accepts a device's timing of it
    assert file_sha256(pkg / "model.onnx") == file_sha256(packaged["run_dir"] / "model.onnx")
    assert packaged["summary"]["files"]["package"] == str(pkg)
    assert "python -m toolchain attach RUN device.json" in (pkg / "README.md").read_text()


def test_golden_inputs_made_from_the_pngs_equal_the_pipelines_tensors(packaged):
    """PNG -> infer.py's preprocessing reproduces the training loader's tensors: the contract holds."""
    np.testing.assert_allclose(
        np.load(packaged["package"] / "golden" / "inputs.npy"), pipeline_tensors(packaged), atol=1e-5, rtol=0
    )


def test_ort_file_loads_as_ort_format_and_reproduces_the_golden_outputs(packaged):
    pkg = packaged["package"]
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.load_model_format", "ORT")
    session = ort.InferenceSession(str(pkg / "model.ort"), sess_options=opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": np.load(pkg / "golden" / "inputs.npy")})[0]
    np.testing.assert_allclose(got, np.load(pkg / "golden" / "outputs_float.npy"), atol=1e-4, rtol=0)
    metrics = packaged["summary"]["stages"]["package"]["metrics"]
    assert metrics["package.float_ort_max_abs_diff"] <= 1e-4 and metrics["package.files"] == len(
        json.loads((pkg / "manifest.json").read_text())["files"]
    )


def test_infer_py_without_torch_prints_the_pipeline_predictions(packaged, no_torch_env):
    pkg = packaged["package"]
    pngs = [f"golden/images/{i:03d}.png" for i in range(GOLDEN)]
    proc = in_package(pkg, no_torch_env, "infer.py", "--json", *pngs)
    assert proc.returncode == 0, proc.stderr
    top = [r["top"] for r in json.loads(proc.stdout)]
    printed = [t[0]["index"] for t in top]
    probabilities = pipeline_probabilities(packaged)
    assert printed == probabilities.argmax(axis=1).tolist()
    for t, p in zip(top, probabilities):  # the whole ranking, not only the winner (a tiny model may favour one class)
        assert [c["index"] for c in t] == np.argsort(-p, kind="stable")[:3].tolist()
        np.testing.assert_allclose([c["probability"] for c in t], np.sort(p)[::-1][:3], atol=1e-4)
    names = json.loads((pkg / "preprocess.json").read_text())["class_names"]
    text = in_package(pkg, no_torch_env, "infer.py", "--model", "model.onnx", "--top-k", "1", *pngs)
    lines = text.stdout.splitlines()
    assert text.returncode == 0 and len(lines) == GOLDEN
    assert all(line.startswith(f"{png}: {names[c]} ") for line, png, c in zip(lines, pngs, printed))
    assert in_package(pkg, no_torch_env, "infer.py", "--help").returncode == 0


def test_infer_py_mistakes_are_one_line(packaged, no_torch_env):
    proc = in_package(packaged["package"], no_torch_env, "infer.py", "missing.png")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot read image missing.png" in proc.stderr


def test_bench_runs_from_the_package_without_torch_or_the_toolchain(packaged, no_torch_env, tmp_path):
    pkg = packaged["package"]
    where = in_package(pkg, no_torch_env, "-c", "import toolchain.bench.ort as m; print(m.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(pkg)  # the bundled copy, not the checkout
    proc = in_package(
        pkg,
        no_torch_env,
        "-m",
        "toolchain.bench",
        "model.ort",
        "--batch-sizes",
        "1",
        "--warmup",
        "0",
        "--iterations",
        "2",
        "--time-budget",
        "0.1",
        "--json",
        tmp_path / "device.json",
    )
    assert proc.returncode == 0, proc.stderr
    device = json.loads((tmp_path / "device.json").read_text())
    assert device["results"][0]["batch_size"] == 1
    # the device's timing of the package's .ort file goes back into the run that shipped it
    from mlflow.tracking import MlflowClient

    mlflow_info = packaged["summary"]["mlflow"]
    assert run(["attach", "tiny", str(tmp_path / "device.json"), "--tracking-uri", mlflow_info["tracking_uri"]]) == 0
    metrics = MlflowClient(mlflow_info["tracking_uri"]).get_run(mlflow_info["parent_run_id"]).data.metrics
    name = device["device"]["name"]
    assert metrics[f"device.{name}.latency_p50_ms.cpu.bs1"] == device["results"][0]["p50_ms"]


def test_package_files_are_mlflow_artifacts_of_the_run(packaged):
    from mlflow.tracking import MlflowClient

    mlflow_info = packaged["summary"]["mlflow"]
    client = MlflowClient(mlflow_info["tracking_uri"])
    names = {a.path for a in client.list_artifacts(mlflow_info["parent_run_id"], "package")}
    assert {"package/manifest.json", "package/model.ort", "package/infer.py", "package/golden"} <= names


# ---------------------------------------------------------------- integrity


def test_an_altered_cached_package_file_is_detected_and_rebuilt(packaged, tmp_path, capsys):
    # the run again from a copy of its stage cache: the other package and publish tests read the original
    import shutil

    import yaml

    recipe = yaml.safe_load(packaged["recipe"].read_text())
    recipe["output_dir"] = str(tmp_path / "export")
    recipe["tracking"]["uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    shutil.copytree(packaged["cache"], tmp_path / "export" / ".cache")
    cached = next((tmp_path / "export" / ".cache").glob("package-*/package"))
    (cached / "labels.txt").write_text("not the classes\n")
    assert damaged_files(cached) == ["labels.txt"]
    capsys.readouterr()
    assert run(["compress", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[package] warning: cache entry" in out and "(package/labels.txt); recomputing the stage" in out
    package = tmp_path / "export" / "tiny" / "package"
    assert damaged_files(cached) == [] and damaged_files(package) == []
    published = (package / "labels.txt").read_text().splitlines()
    assert published == json.loads((package / "preprocess.json").read_text())["class_names"]
    assert "epoch" not in out  # the trained stages came from the copied cache


def test_a_package_that_does_not_match_its_manifest_fails_verification(packaged, tmp_path):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(packaged["package"], copy)
    (copy / "golden" / "images" / "000.png").write_bytes(b"\x89PNG broken")
    (copy / "extra.txt").write_text("not listed")
    with pytest.raises(PackageError) as err:
        verify_package(copy)
    assert (
        str(err.value)
        == f"package: {copy} does not match its manifest (extra.txt, golden/images/000.png); rebuild the package"
    )


# ---------------------------------------------------------------- building: INT8, ARM, failures


def tiny_inputs(packaged):
    from PIL import Image

    from toolchain.onnx.export import read_metadata

    pkg = packaged["package"]
    grey = np.stack([np.asarray(Image.open(p)) for p in sorted((pkg / "golden" / "images").iterdir())])
    images = np.repeat(grey[:, None], 3, axis=1)
    return pkg / "model.onnx", read_metadata(pkg / "model.onnx"), images


def test_an_int8_model_is_packaged_for_arm_and_checked(packaged, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path, metadata, images = tiny_inputs(packaged)
    inputs = np.load(packaged["package"] / "golden" / "inputs.npy")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": inputs}])

        def get_next(self):
            return next(self.batches, None)

    int8 = tmp_path / "int8.onnx"
    quantize_static(
        str(float_path),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    manifest = build_package(
        tmp_path / "pkg", {"float": float_path, "int8": int8}, metadata, images, [0] * len(images), "arm"
    )
    assert manifest["target_platform"] == "arm" and manifest["default_model"] == "model_int8.ort"
    assert {"model_int8.onnx", "model_int8.ort", "golden/outputs_int8.npy"} <= set(manifest["files"])
    checks = verify_package(tmp_path / "pkg")
    assert checks["int8"]["top1_agreement"] == 1.0 and checks["infer_py"]["images"] == len(images)


def test_a_fixed_batch_model_is_packaged_and_runs_any_number_of_images(packaged, tmp_path, no_torch_env):
    """export.dynamic_batch: false gives a model of batch 2: three golden images still run, in groups."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    float_path, metadata, images = tiny_inputs(packaged)
    proto = onnx.load(str(float_path))
    make_dim_param_fixed(proto.graph, proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param, 2)
    fix_output_shapes(proto)
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    build_package(tmp_path / "pkg", {"float": fixed}, metadata, images[:3], [0, 0, 0], "amd64")
    checks = verify_package(tmp_path / "pkg")
    assert checks["bench"]["batch_size"] == 2 and checks["infer_py"]["images"] == 3
    assert "--batch-sizes 2 --json device.json" in (tmp_path / "pkg" / "README.md").read_text()
    one = in_package(tmp_path / "pkg", no_torch_env, "infer.py", "golden/images/000.png")
    assert one.returncode == 0 and one.stdout.startswith("golden/images/000.png: ")


def test_a_converter_failure_is_one_line(packaged, tmp_path):
    _, metadata, images = tiny_inputs(packaged)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(PackageError) as err:
        build_package(tmp_path / "pkg", {"float": broken}, metadata, images, [0] * len(images), "amd64")
    message = str(err.value)
    assert message.startswith("package: onnxruntime cannot convert model.onnx to ORT format for amd64 (")
    assert "\n" not in message and message.endswith("; try another export.opset, or remove the package section")


# ---------------------------------------------------------------- the recipe


def test_unknown_target_platform_is_a_one_line_recipe_error(tiny_recipe, capsys):
    path = tiny_recipe(
        teacher=None,
        distill={"epochs": 1, "loss": "ce"},
        export={"references": False},
        package={"target_platform": "x86"},
    )
    assert run(["compress", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: package.target_platform: Input should be 'amd64' or 'arm' (got 'x86')"]


def test_package_needs_export_and_defaults_to_amd64():
    base = {"name": "p", "student": {"model": "mobilenet_v2"}, "distill": {"loss": "ce"}}
    with pytest.raises(RecipeError, match="package needs the export stage"):
        plan(validate_dict({**base, "export": None, "bench": None, "package": {}}))  # declared: Stage.requires
    assert validate_dict({**base, "package": {}}).package.target_platform == "amd64"
    assert validate_dict(base).package is None


# ---------------------------------------------------------------- the contract on raw images


def test_a_raw_28x28_image_is_padded_like_the_training_data(packaged, tmp_path):
    """A device feeds real Fashion-MNIST-sized files: infer.py zero-pads them as the loader did."""
    from PIL import Image

    from toolchain.package import infer

    contract = json.loads((packaged["package"] / "preprocess.json").read_text())
    raw = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(raw, "L").save(tmp_path / "raw.png")
    padded = np.zeros((32, 32), np.float32)
    padded[2:30, 2:30] = raw / 255.0
    expected = (np.repeat(padded[None], 3, axis=0) - np.float32(contract["mean"][0])) / np.float32(contract["std"][0])
    np.testing.assert_allclose(infer.preprocess_file(tmp_path / "raw.png", contract), expected, atol=1e-6)


def test_more_golden_images_than_the_test_split_is_one_line():
    from types import SimpleNamespace

    import torch

    from toolchain.stages.package import golden_images

    frames = torch.full((3, 1, 32, 32), 128, dtype=torch.uint8)  # the test split's stored (grey) frames
    data = SimpleNamespace(test=SimpleNamespace(images=frames, labels=torch.tensor([0, 1, 2])))
    with pytest.raises(PackageError) as err:
        golden_images(data, 5)
    assert (
        str(err.value)
        == "package.golden_images is 5 but the test split has 3 images; set package.golden_images: 3 or less"
    )
    pixels, labels = golden_images(data, 2)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 1, 32, 32) and (pixels == 128).all() and labels == [0, 1]
