"""Sweeps: matrix expansion (axes product, rules, exclude/include, names), validation of
every variant before anything runs, directory sweeps, failure handling, and a tiny
sweep end to end that trains the teacher once."""

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from toolchain.cli import run
from toolchain.engine import runner as pipeline
from toolchain.errors import RecipeError, TrainingError
from toolchain.sweep import expand, suffix

BASE = {
    "name": "st",
    "teacher": {"model": "resnet18"},
    "student": {"model": "mobilenet_v2"},
    "prune": {"method": "weight", "sparsity": 0.8},
    "finetune": {"epochs": 1, "loss": "kd"},
}
STUDY_MATRIX = {
    "axes": {"student.model": ["resnet18", "mobilenet_v2"], "prune.method": ["weight", "channel"]},
    "rules": [
        {"when": {"prune.method": "weight"}, "set": {"prune.sparsity": 0.8}},
        {"when": {"prune.method": "channel"}, "set": {"prune.sparsity": 0.5}},
    ],
}


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def with_matrix(tmp_path, matrix, name="recipe.yaml", **base):
    return write(tmp_path / name, {**BASE, "output_dir": str(tmp_path / "export"), **base, "matrix": matrix})


@pytest.fixture
def no_compress(monkeypatch):
    """Record compress calls instead of training."""
    calls = []
    monkeypatch.setattr(
        pipeline, "compress", lambda recipe, force=False, recomputed=None: calls.append(recipe.name) or {"stages": {}}
    )
    return calls


# ---------------------------------------------------------------- expansion


def test_axes_product_rules_and_names(tmp_path):
    variants = expand(with_matrix(tmp_path, STUDY_MATRIX))
    assert [v.name for v in variants] == [
        "st-resnet18-weight",
        "st-resnet18-channel",
        "st-mobilenet_v2-weight",
        "st-mobilenet_v2-channel",
    ]
    by_name = {v.name: v.recipe for v in variants}
    assert by_name["st-resnet18-weight"].prune.sparsity == 0.8 and by_name["st-resnet18-weight"].prune.pruner == "level"
    assert by_name["st-resnet18-channel"].prune.sparsity == 0.5 and by_name["st-resnet18-channel"].prune.pruner == "l1"
    assert by_name["st-mobilenet_v2-channel"].student.model == "mobilenet_v2"
    for v in variants:  # variants are plain recipes: no matrix, the base's other sections untouched
        assert v.recipe.matrix is None and v.recipe.finetune.loss == "kd" and v.recipe.teacher.model == "resnet18"
        assert v.recipe.tracking.experiment == "toolchain" and v.recipe.output_dir == str(tmp_path / "export")


def test_later_rules_win_and_match_several_axes(tmp_path):
    matrix = {
        **STUDY_MATRIX,
        "rules": STUDY_MATRIX["rules"]
        + [
            {
                "when": {"student.model": "mobilenet_v2", "prune.method": "channel"},
                "set": {"prune.engine": "torch_pruning", "prune.sparsity": 0.4},
            }
        ],
    }
    by_name = {v.name: v.recipe for v in expand(with_matrix(tmp_path, matrix))}
    assert (
        by_name["st-mobilenet_v2-channel"].prune.engine == "torch_pruning"
        and by_name["st-mobilenet_v2-channel"].prune.sparsity == 0.4
    )
    assert by_name["st-resnet18-channel"].prune.engine == "nni" and by_name["st-resnet18-channel"].prune.sparsity == 0.5


def test_exclude_and_include(tmp_path):
    matrix = {
        **STUDY_MATRIX,
        "exclude": [{"student.model": "resnet18", "prune.method": "weight"}],
        "include": [{"student.model": "mobilenet_v3_small", "prune.method": "channel"}],
    }
    variants = expand(with_matrix(tmp_path, matrix))
    names = [v.name for v in variants]
    assert "st-resnet18-weight" not in names and len(names) == 4
    assert (
        names[-1] == "st-mobilenet_v3_small-channel" and variants[-1].recipe.prune.sparsity == 0.5
    )  # rules apply to includes


def test_suffix_of_non_string_values():
    assert (
        suffix({"prune.sparsity": 0.8, "data.augment": False, "student.cifar_stem": True, "finetune": None})
        == "sparsity0.8-no_augment-cifar_stem-no_finetune"
    )
    assert suffix({"bench.batch_sizes": [1, 32], "student.model": "a b/c"}) == "batch_sizes1_32-a_b_c"


def test_a_bad_variant_fails_the_sweep_before_anything_runs(tmp_path, no_compress, capsys):
    # pruner l1 fits channel pruning only: the weight variants are invalid
    path = with_matrix(tmp_path, STUDY_MATRIX, prune={"method": "channel", "pruner": "l1"})
    with pytest.raises(RecipeError, match=r"\[variant st-resnet18-weight\].*pruner 'l1' is a channel pruner"):
        expand(path)
    assert run(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert no_compress == [] and len(err.strip().splitlines()) == 1 and "st-resnet18-weight" in err


@pytest.mark.parametrize(
    "matrix, expected",
    [
        ({"axes": {"student.model": ["resnet18"]}, "typo": 1}, "matrix.typo: unknown key"),
        ({"axes": {"tracking.experiment": ["a", "b"]}}, "cannot vary in a sweep"),
        ({"axes": {"name": ["a", "b"]}}, "cannot vary in a sweep"),
        ({"axes": {"student.model": []}}, "non-empty list of distinct values"),
        ({"axes": {"student.model": ["resnet18", "resnet18"]}}, "non-empty list of distinct values"),
        ({"axes": {"student model": ["resnet18"]}}, "not a dotted recipe key"),
        (
            {"axes": {"student.model": ["resnet18"]}, "rules": [{"when": {"seed": 1}, "set": {"seed": 2}}]},
            "not an axis or include key",
        ),
        ({"axes": {"student.model": ["resnet18"]}, "exclude": [{"prune.method": "weight"}]}, "axis keys only"),
        ({}, "needs axes or include"),
        ({"axes": {"student.model": ["resnet9000"]}}, "unknown model 'resnet9000'"),
    ],
)
def test_matrix_errors_are_one_line(tmp_path, matrix, expected):
    with pytest.raises(RecipeError) as info:
        expand(with_matrix(tmp_path, matrix))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_cli_overrides_apply_to_every_variant_but_not_to_axes(tmp_path):
    path = with_matrix(tmp_path, STUDY_MATRIX)
    variants = expand(path, ["finetune.epochs=3", "prune.sparsity=0.6"])
    assert all(
        v.recipe.finetune.epochs == 3 and v.recipe.prune.sparsity == 0.6 for v in variants
    )  # CLI wins over rules
    with pytest.raises(RecipeError, match="is a matrix axis"):
        expand(path, ["prune.method=channel"])


def test_directory_sweep_runs_every_recipe(tmp_path, no_compress, capsys):
    folder = tmp_path / "study"
    folder.mkdir()
    with_matrix(folder, STUDY_MATRIX, name="a.yaml")
    write(folder / "b.yml", {**BASE, "name": "single", "output_dir": str(tmp_path / "export")})
    (folder / "notes.txt").write_text("not a recipe")
    assert run(["sweep", str(folder)]) == 0
    assert no_compress == [
        "st-resnet18-weight",
        "st-resnet18-channel",
        "st-mobilenet_v2-weight",
        "st-mobilenet_v2-channel",
        "single",
    ]
    out = capsys.readouterr().out
    assert "[sweep 1/5] st-resnet18-weight" in out and "[sweep 5/5] single" in out


def test_directory_sweep_rejects_clashing_names(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    with_matrix(folder, STUDY_MATRIX, name="a.yaml")
    write(folder / "b.yaml", {**BASE, "name": "st-resnet18-weight"})
    with pytest.raises(RecipeError, match="also comes from"):
        expand(folder)


def test_compress_refuses_a_matrix_recipe_in_one_line(tmp_path, capsys):
    path = with_matrix(tmp_path, STUDY_MATRIX)
    assert run(["compress", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"python -m toolchain sweep {path}" in err


def test_dry_run_and_only(tmp_path, no_compress, capsys):
    path = with_matrix(tmp_path, STUDY_MATRIX)
    assert run(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "[sweep 4/4] st-mobilenet_v2-channel: student.model=mobilenet_v2 prune.method=channel prune.sparsity=0.5" in out
    )
    assert no_compress == []
    assert run(["sweep", str(path), "--only", "*channel"]) == 0
    assert no_compress == ["st-resnet18-channel", "st-mobilenet_v2-channel"]
    assert run(["sweep", str(path), "--only", "nothing-like-this"]) == 2


def test_a_failed_variant_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(recipe, force=False, recomputed=None):
        calls.append(recipe.name)
        if recipe.name == "st-resnet18-channel":
            raise TrainingError("loss is NaN")
        if recipe.name == "st-mobilenet_v2-weight":
            raise IndexError("a bug somewhere")
        return {"stages": {"finetune": {"metrics": {"test_accuracy": 0.5, "vs_teacher.pe_params": 0.25}}}}

    monkeypatch.setattr(pipeline, "compress", fake)
    assert run(["sweep", str(with_matrix(tmp_path, STUDY_MATRIX))]) == 1
    captured = capsys.readouterr()
    assert len(calls) == 4  # every variant ran
    assert "[sweep 2/4] st-resnet18-channel: FAILED after" in captured.out and "loss is NaN" in captured.out
    assert "IndexError: a bug somewhere" in captured.out and "Traceback" in captured.err  # a bug keeps its traceback
    assert "2 of 4 variants failed: st-resnet18-channel, st-mobilenet_v2-weight" in captured.err
    record = json.loads((tmp_path / "export" / "sweep-recipe.json").read_text())
    assert [v["status"] for v in record["variants"]] == ["FINISHED", "FAILED", "FAILED", "FINISHED"]


def test_study_recipes_expand(tmp_path):
    """The committed study matrices stay valid: 72 + 72 CIFAR variants, 36 Fashion-MNIST ones
    (3 seeds x 4 students x {weight, channel, unpruned control})."""
    study = Path(__file__).resolve().parents[1] / "recipes" / "study"
    variants = expand(study)
    assert len(variants) == 180
    fmnist = [v for v in variants if v.name.startswith("study-fmnist-")]
    assert len(fmnist) == 36 and {v.recipe.tracking.experiment for v in fmnist} == {"study-fmnist"}
    assert {v.recipe.seed for v in variants} == {0, 1, 2}
    assert {(v.recipe.prune.method, v.recipe.prune.sparsity) if v.recipe.prune else None for v in variants} == {
        ("weight", 0.8),
        ("channel", 0.5),
        None,
    }
    assert all(v.recipe.finetune is not None for v in variants)
    assert {v.recipe.finetune.loss for v in variants if "cifar" in v.name} == {"kd", "ce"}
    for path in study.glob("*.yaml"):
        assert path.read_text().startswith("#"), f"{path} needs a comment header"


# ---------------------------------------------------------------- end to end


@pytest.mark.slow  # five compress runs (default tier: the control-variant sweep below)
def test_tiny_sweep_trains_the_teacher_once(tiny_recipe, tmp_path, capsys, one_thread):
    path = tiny_recipe(prune={"method": "weight", "sparsity": 0.5}, finetune={"epochs": 1, "lr": 0.01, "loss": "kd"})
    recipe = yaml.safe_load(path.read_text())
    recipe["data"].update(subset=96, test_subset=32)
    recipe["matrix"] = {
        "axes": {"student.model": ["mobilenet_v3_small", "cifar_resnet20"], "prune.method": ["weight", "channel"]},
        "exclude": [{"student.model": "cifar_resnet20", "prune.method": "channel"}],
    }
    write(path, recipe)
    assert run(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[sweep 1/3] tiny-mobilenet_v3_small-weight" in out and "[sweep 3/3] tiny-cifar_resnet20-weight" in out

    export = tmp_path / "export"
    names = ["tiny-mobilenet_v3_small-weight", "tiny-mobilenet_v3_small-channel", "tiny-cifar_resnet20-weight"]
    summaries = [json.loads((export / n / "summary.json").read_text()) for n in names]
    assert all(s["status"] == "FINISHED" for s in summaries)
    assert [s["stages"]["teacher"]["cached"] for s in summaries] == [False, True, True]
    assert [s["stages"]["distill"]["cached"] for s in summaries] == [
        False,
        True,
        False,
    ]  # one KD student per architecture
    assert len(list((export / ".cache").glob("teacher-*"))) == 1
    assert len({s["stages"]["teacher"]["metrics"]["test_accuracy"] for s in summaries}) == 1
    channel = summaries[1]["stages"]["prune"]["metrics"]
    assert channel["macs"] < summaries[1]["stages"]["distill"]["metrics"]["macs"]

    # --force recomputes each stage once per sweep: still one teacher, not one per variant
    teacher_result = next((export / ".cache").glob("teacher-*")) / "result.json"
    before = teacher_result.stat().st_mtime_ns
    assert run(["sweep", str(path), "--force", "--only", "mobilenet_v3_small"]) == 0
    forced = [json.loads((export / n / "summary.json").read_text())["stages"] for n in names[:2]]
    assert [s["teacher"]["cached"] for s in forced] == [False, True] and teacher_result.stat().st_mtime_ns > before
    assert [s["prune"]["cached"] for s in forced] == [False, False] and [s["distill"]["cached"] for s in forced] == [
        False,
        True,
    ]

    tracking = summaries[0]["mlflow"]
    assert {s["mlflow"]["experiment_id"] for s in summaries} == {tracking["experiment_id"]}
    client = mlflow.MlflowClient(tracking["tracking_uri"])
    parents = client.search_runs([tracking["experiment_id"]], "tags.`toolchain.stage` = 'compress'")
    assert sorted(r.data.tags["toolchain.run_name"] for r in parents) == sorted(names + names[:2])
    assert {r.info.status for r in parents} == {"FINISHED"}


def test_the_control_variant_fine_tunes_the_unpruned_student(tiny_recipe, tmp_path, one_thread):
    """`prune: null` with a finetune section: the same-budget control of a study fine-tunes the
    KD student as long as the pruned variants, from the same cached student."""
    path = tiny_recipe(prune={"method": "weight", "sparsity": 0.5}, finetune={"epochs": 1, "lr": 0.01, "loss": "kd"})
    recipe = yaml.safe_load(path.read_text())
    recipe["data"].update(subset=96, test_subset=32)
    recipe["matrix"] = {
        "axes": {"prune.method": ["weight", "none"]},
        "rules": [{"when": {"prune.method": "none"}, "set": {"prune": None}}],
    }
    write(path, recipe)
    assert run(["sweep", str(path)]) == 0
    weight, control = (
        json.loads((tmp_path / "export" / n / "summary.json").read_text())["stages"]
        for n in ("tiny-weight", "tiny-none")
    )
    assert "prune" not in control and control["distill"]["cached"] and not control["finetune"]["cached"]
    assert control["finetune"]["metrics"]["nonzero_params"] == control["distill"]["metrics"]["nonzero_params"]
    assert weight["finetune"]["metrics"]["nonzero_params"] < control["finetune"]["metrics"]["nonzero_params"]
    client = mlflow.MlflowClient(
        json.loads((tmp_path / "export" / "tiny-none" / "summary.json").read_text())["mlflow"]["tracking_uri"]
    )
    parents = client.search_runs(
        client.get_experiment_by_name("tests").experiment_id,
        "tags.`toolchain.run_name` = 'tiny-none' and tags.`toolchain.stage` = 'compress'",
    )
    assert parents[0].data.tags["prune.method"] == "none", parents[0].data.tags
    assert "final.test_accuracy" in parents[0].data.metrics, sorted(parents[0].data.metrics)


def test_a_reader_that_leaves_early_ends_the_listing_quietly():
    """`sweep --dry-run | head`: the closed pipe ends the command with 141 (as Unix tools), no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolchain", "sweep", "recipes/study/cifar100.yaml", "--dry-run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=root,
    )
    proc.stdout.close()  # before the first line: the write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
