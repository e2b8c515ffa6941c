"""The bad-input corpus: every user mistake is one line on stderr, exit code 2, no success recorded."""

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from toolchain.cli import run
from toolchain.models.registry import build_model


@pytest.fixture
def base(tiny_recipe):
    """The tiny recipe as a dict (teacher 1 epoch, export/bench off)."""
    return yaml.safe_load(Path(tiny_recipe()).read_text())


def write(tmp_path, recipe, text=None) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(recipe))
    return str(path)


def assert_user_error(capsys, argv, tmp_path, expected: str):
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err and err.count("\n") == 1, err
    assert "Traceback" not in err and expected in err, err
    assert_no_success(tmp_path)


def assert_no_success(tmp_path):
    for summary in (tmp_path / "export").glob("*/summary.json"):
        assert json.loads(summary.read_text())["status"] != "FINISHED"
    db = tmp_path / "mlruns" / "mlflow.db"
    if db.exists():
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        for exp in client.search_experiments():
            assert not client.search_runs(
                [exp.experiment_id], "attributes.status = 'FINISHED' and tags.`toolchain.stage` = 'compress'"
            )


def mutate(recipe, dotted, value):
    node = recipe
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is KeyError:
        node.pop(last)
    else:
        node[last] = value
    return recipe


RECIPE_CASES = [
    ("unknown key", "data.bogus", 1, "data.bogus: unknown key"),
    ("wrong type", "distill.epochs", "three", "distill.epochs"),
    ("negative epochs", "distill.epochs", -1, "greater than or equal to 0"),
    ("sparsity 0", "prune", {"method": "weight", "sparsity": 0}, "prune.sparsity"),
    ("sparsity 1", "prune", {"method": "channel", "sparsity": 1}, "prune.sparsity"),
    ("distill without teacher", "teacher", KeyError, "no teacher section"),
    ("unknown model", "student.model", "resnet1000", "unknown model 'resnet1000'"),
    ("unknown dataset", "data.name", "mnist_fashion", "unknown dataset"),
    ("unknown pruner", "prune", {"method": "channel", "pruner": "magic"}, "unknown pruner 'magic'"),
    ("pruner/method mismatch", "prune", {"method": "weight", "pruner": "l1"}, "prune"),
    ("run name with ..", "name", "..", "name"),
    ("run name with separator", "name", "runs/evil", "name"),
    ("run name escaping", "name", "../../etc", "name"),
    ("negative batch size", "data.batch_size", 0, "data.batch_size"),
    ("bad bench batch", "bench", {"batch_sizes": [0]}, "bench"),
]


@pytest.mark.parametrize("label, key, value, expected", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_mistakes(capsys, tmp_path, base, label, key, value, expected):
    path = write(tmp_path, mutate(base, key, value))
    assert_user_error(capsys, ["compress", path], tmp_path, expected)


def test_malformed_yaml(capsys, tmp_path):
    assert_user_error(
        capsys, ["compress", write(tmp_path, None, "name: x\n  student: [\n")], tmp_path, "malformed YAML"
    )


def test_missing_recipe_file(capsys, tmp_path):
    assert_user_error(capsys, ["compress", str(tmp_path / "nope.yaml")], tmp_path, "recipe file not found")


def test_bad_override(capsys, tmp_path, base):
    assert_user_error(capsys, ["compress", write(tmp_path, base), "distill.epochs"], tmp_path, "section.key=value")


def test_cuda_requested_without_gpu(capsys, tmp_path, base):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_user_error(capsys, ["compress", write(tmp_path, {**base, "device": "cuda"})], tmp_path, "device: cuda")


# ---------------------------------------------------------------- data


def test_missing_dataset_files_offline(capsys, tmp_path, base):
    (tmp_path / "empty").mkdir()
    path = write(tmp_path, mutate(base, "data.root", str(tmp_path / "empty")))
    assert_user_error(capsys, ["compress", path], tmp_path, "apt-get install dataset-fashion-mnist")


def test_corrupt_archive(capsys, tmp_path, base, fmnist_root):
    broken = tmp_path / "broken"
    shutil.copytree(fmnist_root, broken)
    data = (broken / "train-images-idx3-ubyte.gz").read_bytes()
    (broken / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 3])
    path = write(tmp_path, mutate(base, "data.root", str(broken)))
    assert_user_error(capsys, ["compress", path], tmp_path, "not a valid idx file")


def test_cifar_missing_offline(capsys, tmp_path, base):
    path = write(tmp_path, mutate(base, "data", {"name": "cifar10", "root": str(tmp_path / "cifar")}))
    assert_user_error(capsys, ["compress", path], tmp_path, "cifar-10-batches-py")


def test_imagefolder_without_root(capsys, tmp_path, base):
    path = write(tmp_path, mutate(base, "data", {"name": "imagefolder"}))
    assert_user_error(capsys, ["compress", path], tmp_path, "data.root is required")


# ---------------------------------------------------------------- checkpoints


def checkpoint_case(tmp_path, base, make):
    ckpt = tmp_path / "teacher.pt"
    make(ckpt)
    return write(tmp_path, mutate(base, "teacher.checkpoint", str(ckpt)))


def test_checkpoint_for_wrong_architecture(capsys, tmp_path, base):
    path = checkpoint_case(tmp_path, base, lambda p: torch.save(build_model("cifar_resnet32", 10).state_dict(), p))
    assert_user_error(capsys, ["compress", path], tmp_path, "does not fit architecture 'cifar_resnet20'")


def test_truncated_checkpoint(capsys, tmp_path, base):
    def make(p):
        torch.save(build_model("cifar_resnet20", 10).state_dict(), p)
        p.write_bytes(p.read_bytes()[:1000])

    assert_user_error(capsys, ["compress", checkpoint_case(tmp_path, base, make)], tmp_path, "corrupt or truncated")


def test_pickled_model_object_is_refused(capsys, tmp_path, base):
    path = checkpoint_case(tmp_path, base, lambda p: torch.save(build_model("cifar_resnet20", 10), p))
    assert_user_error(capsys, ["compress", path], tmp_path, "refused to load")


# ---------------------------------------------------------------- output


def test_unwritable_output_dir(capsys, tmp_path, base):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = write(tmp_path, mutate(base, "output_dir", str(blocker / "export")))
    assert_user_error(capsys, ["compress", path], tmp_path, "cannot create directory")


# ---------------------------------------------------------------- bench


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    torch.onnx.export(
        model.eval(),
        (torch.randn(2, 3, 32, 32),),
        str(path),
        dynamo=False,
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )
    return path


def test_bench_missing_onnx(capsys, tmp_path):
    assert_user_error(capsys, ["bench", str(tmp_path / "missing.onnx")], tmp_path, "missing.onnx")


def test_bench_corrupt_onnx(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    assert_user_error(capsys, ["bench", str(bad)], tmp_path, "bad.onnx")


def test_bench_wrong_input_shape(capsys, tmp_path, tiny_onnx):
    assert_user_error(capsys, ["bench", str(tiny_onnx), "--input-shape", "1,28,28"], tmp_path, "shape")


def test_bench_unknown_provider(capsys, tmp_path, tiny_onnx):
    assert_user_error(capsys, ["bench", str(tiny_onnx), "--providers", "npu"], tmp_path, "npu")
