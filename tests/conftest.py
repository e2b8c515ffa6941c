"""Shared fixtures: tiny datasets written in the real on-disk formats, tiny recipes."""

from __future__ import annotations

import atexit
import gzip
import os
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

# the decode-once image cache of every test (and of the CLI subprocesses they start) stays out of ~/.cache;
# the process that made the folder removes it at exit (every xdist worker imports this file: 300+ folders
# were left in /tmp after a few days of test runs)
if "TOOLCHAIN_CACHE" not in os.environ:
    os.environ["TOOLCHAIN_CACHE"] = tempfile.mkdtemp(prefix="toolchain-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TOOLCHAIN_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def mlflow_template_store(tmp_path_factory):
    """A new SQLite MLflow store starts as a copy of one migrated once per session.

    MLflow builds a fresh store by running its ~60 alembic migrations (5-8 s of DDL and fsyncs on
    a 2-core box); the suite creates about a hundred stores. The migrations run here, once, with
    MLflow's own code; every later store of this process whose file is new or empty is a copy of
    that result, and MLflow then adds its Default experiment itself, with that store's artifact
    root. Subprocesses the tests start are unaffected (they migrate as a user's run would)."""
    try:
        import mlflow.store.db.utils as db_utils
        import mlflow.store.model_registry.sqlalchemy_store as registry_store
    except ImportError:  # no MLflow: nothing to speed up
        yield None
        return
    real = getattr(db_utils, "_initialize_tables", None)
    if real is None or not hasattr(registry_store, "_initialize_tables"):  # another MLflow layout: migrate as usual
        yield None
        return
    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"

    def initialize_from_template(engine):
        url = engine.url
        path = (
            Path(url.database)
            if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
            else None
        )
        if path is None or (path.exists() and path.stat().st_size > 0):
            return real(engine)  # another database, or a file with content: MLflow's own path
        if not template.exists():
            built = db_utils.create_sqlalchemy_engine_with_retry(f"sqlite:///{template}")
            real(built)
            built.dispose()
        engine.dispose()  # no pooled connection keeps the empty file open
        shutil.copyfile(template, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(db_utils, "_initialize_tables", initialize_from_template)
        mp.setattr(registry_store, "_initialize_tables", initialize_from_template)
        yield template


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx format: magic (0, 0, 0x08 ubyte, ndim), big-endian dims, raw bytes; gzipped like the real files."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def class_images(n: int, classes: int, shape, seed: int):
    """Images whose brightness pattern depends on the class, so tiny models can learn something."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    base = rng.integers(0, 60, (n, *shape))
    stripe = (labels[:, None] * (shape[-1] // classes)).astype(int)
    images = base.copy()
    for i in range(n):
        images[i, ..., stripe[i, 0] : stripe[i, 0] + 3] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def photo(w: int, h: int, seed: int):
    """A w x h RGB PIL image of noise (decodes like a photo, not like a flat colour)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def photo_folder(root: Path, per_class: int = 4, size=(60, 40), classes=("cat", "dog")) -> Path:
    """An ImageFolder (root/train|test/<class>/*.png) of noise photos."""
    for split in ("train", "test"):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                photo(*size, seed=100 * c + i + (50 if split == "test" else 0)).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion-mnist")
    for prefix, n, seed in (("train", 300, 0), ("t10k", 100, 1)):
        x, y = class_images(n, 10, (28, 28), seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


def write_cifar(root: Path, classes: int) -> Path:
    """CIFAR python-version layout: pickled dicts with bytes keys, data (N, 3072) uint8."""
    if classes == 10:
        folder, train_files, test_file, meta_file, label_key, names_key = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "batches.meta",
            b"labels",
            b"label_names",
        )
    else:
        folder, train_files, test_file, meta_file, label_key, names_key = (
            "cifar-100-python",
            ["train"],
            "test",
            "meta",
            b"fine_labels",
            b"fine_label_names",
        )
    directory = root / folder
    directory.mkdir(parents=True)
    for i, name in enumerate(train_files + [test_file]):
        x, y = class_images(20, classes, (3, 32, 32), seed=i)
        batch = {b"data": x.reshape(len(x), -1), label_key: [int(v) for v in y], b"batch_label": name.encode()}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {names_key: [f"class{i}".encode() for i in range(classes)]}
    (directory / meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    return root


def tiny_sections(tmp: Path, fmnist_root: Path) -> dict:
    """The tiny pipeline recipe (teacher + KD student on the tiny files, output and MLflow in `tmp`):
    one dict, so the warm stage cache holds exactly the stages a tiny_recipe run asks for."""
    return {
        "name": "tiny",
        "output_dir": str(tmp / "export"),
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32, "eval_batch_size": 64},
        "teacher": {"model": "cifar_resnet20", "train": {"epochs": 1, "lr": 0.05}},
        "student": {"model": "mobilenet_v3_small"},
        "distill": {"epochs": 1, "lr": 0.05, "loss": "kd"},
        "export": None,
        "bench": None,
        "tracking": {"uri": f"sqlite:///{tmp}/mlruns/mlflow.db", "experiment": "tests"},
    }


def tiny_dw_model(path):
    """stem conv 3->8 (stride 2), depthwise 3x3, pointwise 8->16, pointwise 16->16, pool, Gemm: an
    onnx-built mobilenet-like graph (ReLU6 as Clip), random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    def conv(name, x, wname, y, **attrs):
        return helper.make_node("Conv", [x, wname, wname + "_b"], [y], name=name, **attrs)

    inits = [
        w("stem_w", 8, 3, 3, 3),
        w("stem_w_b", 8),
        w("dw_w", 8, 1, 3, 3),
        w("dw_w_b", 8),
        w("pw1_w", 16, 8, 1, 1),
        w("pw1_w_b", 16),
        w("pw2_w", 16, 16, 1, 1),
        w("pw2_w_b", 16),
        w("fc_w", 10, 16),
        w("fc_b", 10),
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]
    nodes = [
        conv("stem", "input", "stem_w", "s", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Clip", ["s", "lo", "hi"], ["s6"], name="clip0"),
        conv("dw", "s6", "dw_w", "d", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["d", "lo", "hi"], ["d6"], name="clip1"),
        conv("pw1", "d6", "pw1_w", "p1", kernel_shape=[1, 1]),
        conv("pw2", "p1", "pw2_w", "p2", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["p2"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_dw",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def packaged_run(tmp: Path, fmnist_root: Path, golden: int) -> Path:
    """One tiny run with a device package (no teacher, 1 epoch ce, export without references, no
    bench) in `tmp`; returns export/tiny/. Shared by the package and publish tests."""
    from toolchain.cli import run

    recipe = {
        "name": "tiny",
        "output_dir": str(tmp / "export"),
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32, "eval_batch_size": 64},
        "student": {"model": "mobilenet_v3_small"},
        "distill": {"epochs": 1, "lr": 0.05, "loss": "ce"},
        "export": {"exporter": "dynamo", "opset": 18, "references": False},
        "bench": None,
        "package": {"target_platform": "amd64", "golden_images": golden},
        "tracking": {"uri": f"sqlite:///{tmp}/mlruns/mlflow.db", "experiment": "tests"},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run(["compress", str(path)]) == 0
    return tmp / "export" / "tiny"


def shared_across_workers(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test session, by whichever pytest-xdist worker asks first (the others
    wait on a lock and get the same folder). For results the tests only read: a test that changes
    one works on a copy."""
    from toolchain.fsutil import file_lock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's folder, under xdist
    folder, done = root / name, root / f"{name}.done"
    with file_lock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


PACKAGED_GOLDEN = 4


@pytest.fixture(scope="session")
def packaged_tiny(tmp_path_factory, fmnist_root) -> Path:
    """export/tiny/ of packaged_run with PACKAGED_GOLDEN golden images, built once per session for
    the package and publish tests (read-only: copy before changing anything)."""
    folder = shared_across_workers(
        tmp_path_factory, "packaged", lambda f: packaged_run(f, fmnist_root, PACKAGED_GOLDEN)
    )
    return folder / "export" / "tiny"


@pytest.fixture
def tiny_recipe(tmp_path, fmnist_root):
    """A recipe dict that runs the whole pipeline in seconds on the tiny Fashion-MNIST files."""

    def make(**sections):
        recipe = tiny_sections(tmp_path, fmnist_root)
        for key, value in sections.items():
            recipe[key] = value
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make


# Whether onnxruntime quantizes weights to 7 bits here, as the quantize stage asks it to on x86 without
# VNNI: its u8s8 kernels there add pairs of products in int16 and saturate with full 8-bit weights, so a
# test that checks exact INT8 arithmetic against onnxruntime (fake quantization, two kernels of one
# function) quantizes as the stage would on the machine it runs on.
def _reduce_range() -> bool:
    from toolchain.bench.device import cpu_features, needs_reduce_range

    return needs_reduce_range(cpu_features())


REDUCE_RANGE = _reduce_range()


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (the scripts are not a package), for tests of their parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The latency comparison at its cheapest (one short block per side, two in-process replicates):
# pipeline tests check what is measured and recorded, not how fast this machine is.
FAST_LATENCY = {"block_s": 0.005, "blocks": 2, "min_replicates": 2, "max_replicates": 2, "isolation": "session"}


def fast_bench(*batch_sizes: int, compare_torch: bool = False) -> dict:
    """A bench section that times a few runs per batch size with FAST_LATENCY (what tests check is the
    plumbing, not the numbers)."""
    return {
        "batch_sizes": list(batch_sizes),
        "warmup": 1,
        "iterations": 3,
        "time_budget_s": 0.1,
        "latency": FAST_LATENCY,
        "compare_torch": compare_torch,
    }


FULL_SECTIONS = {
    "teacher": {"model": "cifar_resnet20", "train": {"epochs": 1, "lr": 0.05}},
    "student": {"model": "mobilenet_v3_small"},
    "distill": {"epochs": 1, "lr": 0.05, "loss": "kd"},
    "prune": {"method": "channel", "pruner": "l1", "sparsity": 0.5},
    "finetune": {"epochs": 1, "lr": 0.01, "loss": "kd"},
    "export": {"exporter": "dynamo", "opset": 18},
    "bench": {"batch_sizes": [1, 2], "warmup": 1, "iterations": 3, "time_budget_s": 0.1, "latency": FAST_LATENCY},
}


@pytest.fixture(scope="session")
def pipeline_runs(tmp_path_factory, fmnist_root):
    """The whole pipeline once on the tiny files (run `tiny`: the smoke test), then `name=copy`
    (every stage reused), then a bench-only change of copy. Read by the tests of
    tests/test_engine.py alone, so the suite pays for one full run (under pytest-xdist's
    --dist loadscope a module runs on one worker)."""
    from toolchain.cli import run

    tmp = tmp_path_factory.mktemp("pipeline")
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp / "export"),
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32, "eval_batch_size": 64},
        **FULL_SECTIONS,
        "tracking": {"uri": f"sqlite:///{tmp}/mlruns/mlflow.db", "experiment": "tests"},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def summary(name):
        import json

        return json.loads((tmp / "export" / name / "summary.json").read_text())

    assert run(["compress", str(path)]) == 0
    tiny = summary("tiny")
    assert run(["compress", str(path), "name=copy"]) == 0
    copy_first = summary("copy")
    assert run(["compress", str(path), "name=copy", "bench.batch_sizes=[1,3]"]) == 0
    return {"tmp": tmp, "tiny": tiny, "copy_first": copy_first, "copy": summary("copy")}


@pytest.fixture(scope="session")
def warm_stages(tmp_path_factory, fmnist_root) -> Path:
    """The stage cache of tiny_recipe()'s default teacher and KD student, trained once per session
    (no tracking: MLflow is not part of a stage's key)."""
    from toolchain.cli import run

    tmp = tmp_path_factory.mktemp("warm")
    recipe = {**tiny_sections(tmp, fmnist_root), "tracking": {"enabled": False}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run(["compress", str(path)]) == 0
    return tmp / "export" / ".cache"


@pytest.fixture
def warm_cache(warm_stages, tmp_path):
    """tmp_path/export/.cache (tiny_recipe's output_dir) holding `warm_stages`' teacher and KD
    student: a test of what happens around those stages reuses them instead of training them
    again. Copies (not links), so a test may damage its entries."""
    cache = tmp_path / "export" / ".cache"
    for entry in sorted(warm_stages.glob("*-*")):
        if entry.is_dir():
            shutil.copytree(entry, cache / entry.name)
    return cache


def blocked_imports_env(folder: Path, names=("torch",), **extra: str) -> dict:
    """os.environ with PYTHONPATH = fake packages `names` in `folder` (importing one raises
    ImportError '<name> must not be imported by the bench') and then the checkout: what a device has.
    Checked here: each import fails that way."""
    import subprocess
    import sys

    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} must not be imported by the bench')\n")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(repo)]), **extra)
    for name in names:
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "must not be imported" in probe.stderr  # the trap works
    return env
