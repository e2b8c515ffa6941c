import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolchain.errors import RecipeError
from toolchain.recipe import load_recipe, recipe_hash

BASE = {"name": "r", "student": {"model": "mobilenet_v2"}, "teacher": {"model": "resnet18"}}


def write(tmp_path, obj, text=None):
    path = tmp_path / "recipe.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(obj))
    return path


def error_of(tmp_path, obj=None, text=None, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, obj, text), overrides)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "recipe.yaml") in message
    return message


def test_defaults_fill_in(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.data.name == "fashion_mnist" and recipe.distill.loss == "kd" and recipe.export.exporter == "dynamo"


def test_overrides_apply_with_types(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["distill.epochs=1", "data.subset=2000", "prune.method=weight"])
    assert recipe.distill.epochs == 1 and recipe.data.subset == 2000 and recipe.prune.method == "weight"


def test_hash_ignores_key_order(tmp_path):
    a = load_recipe(write(tmp_path, BASE))
    b = load_recipe(write(tmp_path, dict(reversed(list(BASE.items())))))
    assert recipe_hash(a) == recipe_hash(b)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r.update(bogus=1), "bogus: unknown key"),
        (lambda r: r["student"].update(widht=2), "student.widht: unknown key"),
        (lambda r: r.update(distill={"epochs": "many"}), "distill.epochs"),
        (lambda r: r.update(distill={"epochs": -1}), "distill.epochs: Input should be greater than or equal to 0"),
        (lambda r: r.update(prune={"method": "weight", "pruner": "level", "sparsity": 1.0}), "prune.sparsity"),
        (lambda r: r.update(prune={"method": "weight", "pruner": "level", "sparsity": 0}), "prune.sparsity"),
        (lambda r: r["student"].update(model="mobilenet_v9"), "unknown model 'mobilenet_v9'"),
        (lambda r: r.update(data={"name": "cifar11"}), "unknown dataset 'cifar11'. Did you mean 'cifar10'?"),
        (lambda r: r.pop("teacher"), "distill.loss is kd but the recipe has no teacher"),
        (lambda r: r.update(name="../evil"), "name: String should match pattern"),
        (lambda r: r.update(name="a/b"), "name"),
        (lambda r: r.pop("student"), "student: required key is missing"),
        (lambda r: r["teacher"].update(train={"epochs": 1, "loss": "dkd"}), "teacher.train cannot distil (loss dkd)"),
        (
            lambda r: r["teacher"].update(train={"epochs": 1, "features": [{"student": "a", "teacher": "b"}]}),
            "teacher.train cannot distil (loss ce, features)",
        ),
        (lambda r: r.update(data={"image_size": [32, 32, 3]}), "data.image_size: give an int or [height, width]"),
        (lambda r: r.update(data={"crop_scale": [0.5, 1.5]}), "crop_scale: the area fraction cannot exceed 1"),
        (lambda r: r.update(data={"std": [0.2, 0, 0.2]}), "std: every value must be > 0"),
    ],
)
def test_bad_recipes_name_file_and_key(tmp_path, mutate, expected):
    recipe = yaml.safe_load(yaml.safe_dump(BASE))
    mutate(recipe)
    assert expected in error_of(tmp_path, recipe)


def test_unknown_model_lists_valid_names(tmp_path):
    message = error_of(tmp_path, {**BASE, "student": {"model": "nope"}})
    assert "resnet18" in message and "mobilenet_v2" in message


def test_malformed_yaml_names_line(tmp_path):
    assert "malformed YAML at line 2" in error_of(tmp_path, text="name: x\n  bad: 1\n")


def test_non_mapping_and_missing_file(tmp_path):
    assert "must be a YAML mapping" in error_of(tmp_path, text="- just\n- a list\n")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_bad_override_form(tmp_path):
    assert "section.key=value" in error_of(tmp_path, BASE, overrides=["distill.epochs"])


def test_yaml_tags_are_not_executed(tmp_path):
    text = "name: x\nstudent: !!python/object/apply:os.system ['echo pwned']\n"
    assert "malformed YAML" in error_of(tmp_path, text=text)


def test_cli_validate_prints_resolved_recipe_and_exit_2_on_error(tmp_path):
    good = write(tmp_path, BASE)
    out = subprocess.run(
        [sys.executable, "-m", "toolchain", "validate", str(good), "distill.epochs=3"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "epochs: 3" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "distill": {"epochs": -2}}))
    out = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "distill.epochs" in out.stderr and "Traceback" not in out.stderr


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, runpy; sys.argv=['toolchain','--help']\ntry:\n runpy.run_module('toolchain', run_name='__main__')\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "compress" in out.stdout + out.stderr and "validate" in out.stdout + out.stderr


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    assert load_recipe(path).name


def test_weight_recipe_reuses_the_demo_teacher_and_student():
    # recipes/mobilenet_weight.yaml promises that after `make demo` only its prune stage onwards runs:
    # that holds only while every section before `prune` is identical (the stage cache keys on them).
    demo, weight = (load_recipe(SHIPPED[0].parent / name) for name in ("mobilenet.yaml", "mobilenet_weight.yaml"))
    for section in ("seed", "data", "teacher", "student", "distill"):
        assert getattr(demo, section) == getattr(weight, section), section
