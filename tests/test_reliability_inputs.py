"""Inputs that gave silently wrong results or a traceback (issue 34): image-folder labels after a
class folder is added, hidden and foreign entries of an image folder, float TIFFs, and the recipe,
model and checkpoint mistakes that must be one line and exit 2."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import photo, photo_folder

from toolchain.cli import run
from toolchain.data.loaders import build_data
from toolchain.errors import DataError
from toolchain.recipe import DataConfig


def folder_cfg(root: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(
        name="imagefolder", root=str(root), cache_dir=str(cache), val_fraction=0.25, image_size=16, batch_size=4, **kw
    )


def labels_by_class(bundle, split: str):
    """{class name: set of labels} over a split, read through the real batches."""
    batches = getattr(bundle, split)
    return {bundle.class_names[int(y)] for y in batches.labels.tolist()}, batches.labels


def assert_one_line_error(capsys, argv, expected: str):
    code = run([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert expected in err, err
    return err


# ---------------------------------------------------------------- item 4: labels follow the class list


def test_a_new_class_folder_that_sorts_first_renumbers_the_labels_even_from_the_same_cache(tmp_path):
    root = photo_folder(tmp_path / "photos", per_class=4, size=(20, 20), classes=("cat", "dog"))
    cache = tmp_path / "cache"
    first = build_data(folder_cfg(root, cache), seed=0)
    assert first.class_names == ["cat", "dog"]
    test_before = first.test.labels.clone()

    photo_folder(tmp_path / "photos", per_class=4, size=(20, 20), classes=("aardvark",))  # sorts first: cat 0 -> 1
    second = build_data(folder_cfg(root, cache), seed=0)
    assert second.class_names == ["aardvark", "cat", "dog"]
    # the test split's files did not change (same decode cache), their labels did: every old label + 1
    old_test = second.test.labels[second.test.labels != 0]
    assert sorted(old_test.tolist()) == sorted((test_before + 1).tolist())
    # and every label is the index of the folder the file sits in
    for split in (second.test,):
        paths = sorted((root / "test").glob("*/*.png"))
        expected = sorted(second.class_names.index(p.parent.name) for p in paths)
        assert sorted(split.labels.tolist()) == expected


# ---------------------------------------------------------------- weak: what an image folder may hold


def test_hidden_entries_are_skipped_and_other_entries_are_counted(tmp_path, capsys):
    root = photo_folder(tmp_path / "photos", per_class=4, size=(20, 20))
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata, not a PNG
    photo(20, 20, seed=9).save(root / "train" / "dog" / "anim.gif")
    (root / "train" / "dog" / "nested").mkdir()
    photo(20, 20, seed=8).save(root / "train" / "dog" / "nested" / "x.png")
    bundle = build_data(folder_cfg(root, tmp_path / "cache"), seed=0)
    assert bundle.class_names == ["cat", "dog"]
    err = capsys.readouterr().err
    assert "1 hidden entries" in err and "1 files of other types" in err and "1 nested folders" in err


def test_a_newline_in_a_class_name_is_one_line(tmp_path):
    root = photo_folder(tmp_path / "photos", per_class=4, size=(20, 20), classes=("cat", "dog\nx"))
    with pytest.raises(DataError, match="control character") as err:
        build_data(folder_cfg(root, tmp_path / "cache"), seed=0)
    assert "\n" not in str(err.value).replace("\\n", "")


def test_a_float_tiff_on_the_unit_scale_is_not_black(tmp_path):
    from PIL import Image

    from toolchain.data.imagefile import read_image

    ramp = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(ramp, "F").save(tmp_path / "ramp.tif")
    pixels = np.asarray(read_image(tmp_path / "ramp.tif", "grey"))
    assert pixels.max() == 255 and pixels.min() == 0


# ---------------------------------------------------------------- items 5 and 9: the preflight runs the forward

USER_NETS = """
import collections

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, outputs, shape="tensor"):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, outputs)
        self.shape = shape

    def forward(self, x):
        features = self.body(x)
        logits = self.head(features)
        if self.shape == "tuple":
            return logits, features
        if self.shape == "dict":
            return {"logits": logits, "features": features}
        if self.shape == "list":
            return [logits]
        if self.shape == "namedtuple":
            return collections.namedtuple("Out", "logits aux")(logits, logits)
        return logits


def wide(num_classes):
    return Net(12)


def narrow(num_classes):
    return Net(7)


def pair(num_classes):
    return Net(num_classes, "tuple")


def as_dict(num_classes):
    return Net(num_classes, "dict")


def as_list(num_classes):
    return Net(num_classes, "list")


def named(num_classes):
    return Net(num_classes, "namedtuple")


def fine(num_classes):
    return Net(num_classes)
"""


def user_model_recipe(tiny_recipe, tmp_path, builder, module):
    (tmp_path / f"{module}.py").write_text(USER_NETS)
    return tiny_recipe(student={"model": f"{module}:{builder}"})


@pytest.mark.parametrize(
    "builder, expected",
    [
        ("wide", "forward returns shape (2, 12) for a batch of 2, but the dataset has 10 classes"),
        ("narrow", "forward returns shape (2, 7) for a batch of 2, but the dataset has 10 classes"),
        ("pair", "forward returns a tuple in train mode, not one logits tensor"),
        ("as_dict", "forward returns a dict with keys logits, features in train mode"),
        ("as_list", "forward returns a list in train mode"),
        ("named", "forward returns a Out in train mode"),
    ],
)
def test_a_student_without_one_logits_tensor_of_the_class_count_is_refused_before_training(
    tiny_recipe, tmp_path, capsys, builder, expected
):
    path = user_model_recipe(tiny_recipe, tmp_path, builder, f"nets_{builder}")
    assert_one_line_error(capsys, ["compress", path], expected)
    assert not list((tmp_path / "export" / ".cache").glob("teacher-*/result.json"))  # nothing trained first


def test_torchvision_googlenet_in_train_mode_is_refused_with_the_way_out(tiny_recipe, tmp_path, capsys):
    path = tiny_recipe(student={"model": "torchvision/googlenet", "kwargs": {"init_weights": False}})
    assert_one_line_error(capsys, ["compress", path], "add kwargs: {aux_logits: false}")


@pytest.mark.slow
def test_inception_v3_at_80_px_names_its_smallest_input(tiny_recipe, tmp_path, capsys):
    path = tiny_recipe(student={"model": "torchvision/inception_v3", "kwargs": {"init_weights": False}})
    recipe = yaml.safe_load(Path(path).read_text())
    recipe["data"]["image_size"] = 80
    Path(path).write_text(yaml.safe_dump(recipe))
    assert_one_line_error(capsys, ["compress", path], "the smallest input it runs on is 299x299")


# ---------------------------------------------------------------- items 13, 12: the recipe file


def cli(*args, timeout=120):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "toolchain", *map(str, args)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_here(capsys, *args):
    """cli() in this process, for a CLI error case where a fresh process adds nothing but ~3 s of
    imports: `python -m toolchain` is run(argv) (toolchain/__main__.py), so the code and the
    stderr line are the same."""
    import types

    capsys.readouterr()
    code = run([str(a) for a in args])
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def one_line(proc, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and expected in proc.stderr, proc.stderr


@pytest.mark.parametrize("seed, ok", [(4294967296, False), (2**64, False), (4294967295, True)])
def test_the_seed_is_bounded_in_the_schema(tiny_recipe, capsys, seed, ok):
    code = run(["validate", str(tiny_recipe()), f"seed={seed}"])
    err = capsys.readouterr().err
    if ok:
        assert code == 0, err
    else:
        assert code == 2 and err.count("\n") == 1 and "seed: Input should be less than or equal to 4294967295" in err, (
            err
        )


BOMB = """name: bomb
student:
  model: mobilenet_v3_small
  kwargs:
    lol:
      a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
      d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
      f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
      g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
      h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
      i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    one_line(
        cli_here(capsys, "validate", tmp_path / "bomb.yaml"), "expands to more than 100,000 values through aliases"
    )
    one_line(cli_here(capsys, "sweep", tmp_path / "bomb.yaml", "--dry-run"), "expands to more than 100,000 values")
    (tmp_path / "self.yaml").write_text("name: x\nstudent: &s {model: mobilenet_v3_small, kwargs: {me: *s}}\n")
    one_line(cli_here(capsys, "validate", tmp_path / "self.yaml"), "a YAML alias refers to a node that contains it")


def test_a_few_aliases_stay_allowed(tiny_recipe, tmp_path):
    text = Path(tiny_recipe()).read_text()
    recipe = yaml.safe_load(text)
    recipe.pop("distill")
    body = yaml.safe_dump(recipe) + "distill: &train {epochs: 1, lr: 0.05, loss: kd}\nfinetune: *train\n"
    (tmp_path / "aliases.yaml").write_text(body)
    assert run(["validate", str(tmp_path / "aliases.yaml")]) == 0


# ---------------------------------------------------------------- items 11, 10 and weak: weight files


def mobilenet_state():
    from toolchain.models.registry import build_model

    return build_model("mobilenet_v3_small", 10).state_dict()


@pytest.mark.parametrize("key", ["weights", "checkpoint"])
def test_a_truncated_safetensors_file_is_one_line(tiny_recipe, tmp_path, capsys, key):
    from safetensors.torch import save_file

    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in mobilenet_state().items()}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    recipe = tiny_recipe(student={"model": "mobilenet_v3_small", key: str(path)})
    assert_one_line_error(capsys, ["compress", recipe], "not a readable .safetensors file, corrupt or truncated")


def test_a_timm_tag_that_does_not_exist_is_one_line_naming_the_tags(tiny_recipe, capsys):
    recipe = tiny_recipe(student={"model": "timm/resnet18.no_such_tag", "weights": "pretrained"})
    assert_one_line_error(
        capsys,
        ["compress", recipe],
        "timm has no pretrained tag 'no_such_tag' for resnet18; use timm/resnet18.<tag> with one of: ",
    )


@pytest.mark.parametrize("layout", ["lightning", "timm_train", "ddp", "plain_loop"])
def test_training_framework_checkpoint_layouts_load(tmp_path, layout):
    from toolchain.models.checkpoint import load_weights
    from toolchain.models.registry import build_model

    state = mobilenet_state()
    saved = {
        "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3, "optimizer_states": [{}]},
        "timm_train": {"epoch": 3, "arch": "x", "state_dict": state, "state_dict_ema": state},
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "plain_loop": {"model_state_dict": state, "optimizer_state_dict": {}},
    }[layout]
    torch.save(saved, tmp_path / "ckpt.pt")
    model = load_weights(build_model("mobilenet_v3_small", 10), tmp_path / "ckpt.pt", "mobilenet_v3_small")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


# ---------------------------------------------------------------- item 14: sweep finds the user's model like compress


def test_sweep_finds_a_user_model_module_next_to_its_recipe(tiny_recipe, tmp_path):
    """A fresh process (no sys.path left over from other tests), run from another folder than the recipe's."""
    (tmp_path / "sweepnets.py").write_text(USER_NETS)
    path = tiny_recipe(student={"model": "sweepnets:fine"}, matrix={"axes": {"distill.lr": [0.05, 0.01]}})
    swept = cli("sweep", path, "--dry-run")
    assert swept.returncode == 0, swept.stderr
    assert "2 variant(s)" in swept.stdout
    plain = tiny_recipe(student={"model": "sweepnets:fine"})
    assert cli("validate", plain).returncode == 0


# ---------------------------------------------------------------- weak: sweeps of 0 or 10^6 variants, Ctrl-C


def test_a_sweep_of_no_variant_or_a_million_is_one_line(tiny_recipe, capsys):
    none = tiny_recipe(matrix={"axes": {"distill.lr": [0.05]}, "exclude": [{"distill.lr": 0.05}]})
    one_line(cli_here(capsys, "sweep", none, "--dry-run"), "the matrix leaves no variant")
    axes = {
        f"data.{k}": list(range(20)) for k in ("subset", "test_subset", "batch_size", "eval_batch_size", "num_workers")
    }
    huge = tiny_recipe(matrix={"axes": axes})
    one_line(cli_here(capsys, "sweep", huge, "--dry-run"), "the axes expand to 3,200,000 variants")


def test_a_ctrl_c_sweep_still_writes_its_record(tiny_recipe, tmp_path, monkeypatch, capsys):
    from toolchain.engine import runner

    calls = []

    def fake(recipe, force=False, recomputed=None):
        calls.append(recipe.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"stages": {}}

    monkeypatch.setattr(runner, "compress", fake)
    path = tiny_recipe(matrix={"axes": {"distill.lr": [0.05, 0.01, 0.02]}})
    assert run(["sweep", str(path)]) == 130
    record = json.loads((tmp_path / "export" / "sweep-recipe.json").read_text())
    assert [v["status"] for v in record["variants"]] == ["FINISHED", "KILLED"]
