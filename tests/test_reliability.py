"""Resume after SIGKILL, Ctrl-C, non-finite loss, concurrent runs, determinism, safe loading."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from toolchain.cli import run
from toolchain.errors import TrainingError
from toolchain.recipe import TrainConfig
from toolchain.train.loop import fit
from toolchain.train.tasks import ClassificationTask

REPO = Path(__file__).resolve().parents[1]


def summary(tmp_path, name="tiny"):
    return json.loads((tmp_path / "export" / name / "summary.json").read_text())


def metrics_without_timing(stage):
    drop = ("seconds", "images_per_second")
    return {k: v for k, v in stage["metrics"].items() if not any(d in k for d in drop)}


def start(recipe_path, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell's background job (CI runners) ignores SIGINT and children inherit that; restore the
    # default so the child Python turns SIGINT into KeyboardInterrupt as in a terminal.
    return subprocess.Popen(
        [sys.executable, "-m", "toolchain", "compress", str(recipe_path), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(pattern: str, root: Path, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(root.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{pattern} did not appear under {root}")


def slow_recipe(tiny_recipe):
    """Teacher 1 epoch, student 3 epochs: long enough to be interrupted mid-distill."""
    return tiny_recipe(distill={"epochs": 3, "lr": 0.05, "loss": "kd"})


@pytest.mark.slow  # SIGKILL: three CLI subprocesses
def test_sigkill_then_rerun_resumes_and_matches(tiny_recipe, tmp_path):
    path = slow_recipe(tiny_recipe)
    proc = start(path)
    cache = tmp_path / "export" / ".cache"
    wait_for("distill-*/train_state.pt", cache)  # distill finished at least one epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    teacher_result = next(cache.glob("teacher-*/result.json"))
    teacher_mtime = teacher_result.stat().st_mtime
    assert not list(cache.glob("distill-*/result.json"))  # the interrupted stage is not reported done

    resumed = start(path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming after epoch" in out + err
    after = summary(tmp_path)
    assert after["stages"]["teacher"]["cached"] is True and teacher_result.stat().st_mtime == teacher_mtime

    # the killed parent run was closed as KILLED and the resumed run links to it
    client = mlflow.MlflowClient(after["mlflow"]["tracking_uri"])
    parents = client.search_runs([after["mlflow"]["experiment_id"]], "tags.`toolchain.stage` = 'compress'")
    status = {r.info.run_id: r.info.status for r in parents}
    killed = [rid for rid, s in status.items() if s == "KILLED"]
    assert len(killed) == 1 and status[after["mlflow"]["parent_run_id"]] == "FINISHED"
    assert client.get_run(after["mlflow"]["parent_run_id"]).data.tags["toolchain.resumed_after"] == killed[0]

    # an uninterrupted run of the same recipe gives the same numbers
    fresh_dir = tmp_path / "fresh"
    recipe = yaml.safe_load(path.read_text())
    recipe["output_dir"] = str(fresh_dir)
    (tmp_path / "fresh.yaml").write_text(yaml.safe_dump(recipe))
    uninterrupted = start(tmp_path / "fresh.yaml")  # same thread count as the killed run: same float sums
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err
    fresh = json.loads((fresh_dir / "tiny" / "summary.json").read_text())
    assert metrics_without_timing(fresh["stages"]["distill"]) == metrics_without_timing(after["stages"]["distill"])


@pytest.mark.slow  # SIGINT to a CLI subprocess
def test_ctrl_c_marks_run_killed_and_keeps_stage_unfinished(tiny_recipe, tmp_path):
    path = slow_recipe(tiny_recipe)
    proc = start(path)
    wait_for("distill-*/train_state.pt", tmp_path / "export" / ".cache")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err
    s = summary(tmp_path)
    assert s["status"] == "KILLED" and "distill" not in s["stages"]
    client = mlflow.MlflowClient(s["mlflow"]["tracking_uri"])
    runs = {r.info.run_name: r.info.status for r in client.search_runs([s["mlflow"]["experiment_id"]])}
    assert runs == {"tiny": "KILLED", "teacher": "FINISHED", "distill": "KILLED"}


def test_non_finite_loss_names_stage_and_epoch():
    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan")) * self.w

    batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(TrainingError, match=r"distill: loss became nan in epoch 1; lower the learning rate"):
        fit(NaNModel(), ClassificationTask(), batches, batches, TrainConfig(epochs=1), stage="distill")


def test_non_finite_loss_fails_the_run(tiny_recipe, tmp_path, capsys, monkeypatch):
    import toolchain.train.losses as losses

    monkeypatch.setitem(losses.LOSSES._entries, "ce", lambda s, y, t=None, **kw: (s * float("inf")).sum())
    assert run(["compress", str(tiny_recipe())]) == 2
    assert "teacher: loss became" in capsys.readouterr().err
    s = summary(tmp_path)
    assert s["status"] == "FAILED"
    client = mlflow.MlflowClient(s["mlflow"]["tracking_uri"])
    assert {r.info.status for r in client.search_runs([s["mlflow"]["experiment_id"]])} == {"FAILED"}


@pytest.mark.slow  # four CLI subprocesses at once
def test_four_concurrent_runs_on_one_sqlite_store(tiny_recipe, tmp_path):
    base = yaml.safe_load(tiny_recipe(teacher=None, distill={"epochs": 1, "loss": "ce"}).read_text())
    procs = []
    for i in range(4):
        recipe = {**base, "name": f"c{i}", "seed": i}
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        procs.append(start(path))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiments = client.search_experiments()
    assert len(experiments) == 2  # Default + ours: the creation race produced one experiment
    runs = client.search_runs([e.experiment_id for e in experiments])
    parents = sorted(r.info.run_name for r in runs if r.data.tags.get("toolchain.stage") == "compress")
    assert parents == ["c0", "c1", "c2", "c3"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_same_recipe_and_seed_give_same_metrics(tiny_recipe, tmp_path, warm_cache):
    path = tiny_recipe()
    assert run(["compress", str(path)]) == 0
    first = summary(tmp_path)
    assert run(["compress", str(path), "--force"]) == 0
    second = summary(tmp_path)
    assert second["stages"]["distill"]["cached"] is False
    for stage in ("teacher", "distill"):
        assert metrics_without_timing(first["stages"][stage]) == metrics_without_timing(second["stages"][stage])


def test_changing_one_section_recomputes_it_and_later_stages_only(tiny_recipe, tmp_path, warm_cache):
    path = tiny_recipe(prune={"method": "weight", "sparsity": 0.5}, finetune={"epochs": 1, "loss": "kd"})
    assert run(["compress", str(path)]) == 0
    assert run(["compress", str(path), "prune.sparsity=0.6"]) == 0
    cached = {k: v["cached"] for k, v in summary(tmp_path)["stages"].items()}
    assert cached == {"teacher": True, "distill": True, "prune": False, "finetune": False}


@pytest.mark.slow  # 27 s: two pipeline runs (the default tier keeps the other cache-key tests)
def test_a_new_teacher_recomputes_a_prune_stage_that_distils(tiny_recipe, tmp_path, warm_cache):
    """taylor scores channels with the KD loss: the teacher is an input of prune even when
    the student itself was distilled without it (distill.loss: ce)."""
    path = tiny_recipe(
        distill={"epochs": 1, "lr": 0.05, "loss": "ce"},
        prune={"method": "channel", "pruner": "taylor", "taylor_batches": 2},
        finetune={"epochs": 1, "loss": "kd"},
    )
    assert run(["compress", str(path)]) == 0
    assert run(["compress", str(path), "teacher.train.lr=0.02"]) == 0
    cached = {k: v["cached"] for k, v in summary(tmp_path)["stages"].items()}
    assert cached == {"teacher": False, "distill": True, "prune": False, "finetune": False}


def test_source_uses_only_safe_loading():
    """No yaml.load / eval / exec / raw pickle.load; torch.load always with weights_only=True."""
    for file in (REPO / "toolchain").rglob("*.py"):
        text = file.read_text()
        assert not re.search(r"yaml\.load\(|yaml\.unsafe_load|(?<![.\w])eval\(|(?<![.\w])exec\(", text), file
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{file}: {call}"
        for call in re.findall(r"pickle\.loads?\(", text):
            raise AssertionError(f"{file}: raw {call} (use the restricted unpickler)")


def test_a_stage_gives_the_same_result_whether_earlier_stages_ran_or_came_from_the_cache(tiny_recipe, tmp_path):
    """The cache keys a stage by its inputs, so its output must not depend on what ran before it
    in the process (here: dropout in fine-tuning drew from an RNG the distillation had advanced)."""
    path = tiny_recipe(prune={"method": "channel", "sparsity": 0.5}, finetune={"epochs": 1, "loss": "kd"})
    assert run(["compress", str(path)]) == 0
    everything_computed = summary(tmp_path)["stages"]["finetune"]
    for finished in (tmp_path / "export" / ".cache").glob("finetune-*"):
        shutil.rmtree(finished)
    assert run(["compress", str(path)]) == 0
    after_cache = summary(tmp_path)["stages"]
    assert after_cache["distill"]["cached"] is True and after_cache["finetune"]["cached"] is False
    assert metrics_without_timing(after_cache["finetune"]) == metrics_without_timing(everything_computed)
    losses = [
        [epoch["train_loss"] for epoch in stage["history"]] for stage in (after_cache["finetune"], everything_computed)
    ]
    assert losses[0] == losses[1]  # bit-identical training, not just an equal accuracy on tiny data


def test_a_trailing_batch_of_one_is_dropped_in_training_only():
    from toolchain.data.loaders import tensor_batches

    images, labels = torch.zeros(9, 1, 4, 4, dtype=torch.uint8), torch.zeros(9, dtype=torch.int64)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    train = tensor_batches(images, labels, 4, mean, std, shuffle=True)
    assert len(train) == 2 and [len(y) for _, y in train] == [4, 4]  # 9 = 4 + 4 + 1: the 1 is dropped
    evaluation = tensor_batches(images, labels, 4, mean, std)
    assert len(evaluation) == 3 and sum(len(y) for _, y in evaluation) == 9


def test_last_batch_of_one_trains_and_batch_size_one_is_refused(tiny_recipe, tmp_path, capsys):
    """270 training images with batch 269: the second batch holds one image (it crashed BatchNorm)."""
    path = tiny_recipe(teacher=None, distill={"epochs": 1, "lr": 0.05, "loss": "ce"})
    assert run(["compress", str(path), "data.batch_size=269"]) == 0
    capsys.readouterr()
    assert run(["compress", str(path), "data.batch_size=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: distill: data.batch_size is 1 but the model has BatchNorm layers, which cannot train on "
        "one image per batch; set data.batch_size: 2 or more"
    ]


def test_a_damaged_resume_file_restarts_the_stage_with_a_warning(tiny_recipe, tmp_path, capsys):
    path = tiny_recipe(teacher=None, distill={"epochs": 1, "lr": 0.05, "loss": "ce"})
    assert run(["compress", str(path)]) == 0
    clean = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]["distill"]
    stage_dir = Path(clean["paths"]["model"]).parent
    (stage_dir / "result.json").unlink()  # as if killed after the epoch checkpoint, before the end
    (stage_dir / "train_state.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert run(["compress", str(path)]) == 0
    assert "resume file" in capsys.readouterr().out
    again = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]["distill"]
    assert again["metrics"]["test_accuracy"] == clean["metrics"]["test_accuracy"]  # trained from the start, same seed


def test_disk_full_is_one_line_the_summary_says_failed_and_no_temp_file_stays(
    tiny_recipe, tmp_path, capsys, monkeypatch
):
    import errno

    import toolchain.fsutil as fsutil

    real_replace = os.replace

    def full_disk_for_checkpoints(src, dst):
        if str(dst).endswith("model.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", full_disk_for_checkpoints)
    path = tiny_recipe(teacher=None, distill={"epochs": 1, "lr": 0.05, "loss": "ce"})
    assert run(["compress", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write ") and "model.pt: No space left on device" in err[0]
    assert json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["status"] == "FAILED"
    assert not list((tmp_path / "export").rglob(".*.tmp"))


def test_stale_temp_files_of_killed_runs_are_removed_at_the_next_start(tmp_path):
    from toolchain.fsutil import remove_stale_temp_files

    old, fresh = tmp_path / ".cache" / ".model.pt.abc123.tmp", tmp_path / ".model.onnx.def456.tmp"
    old.parent.mkdir()
    old.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_temp_files(tmp_path) == 1
    assert not old.exists() and fresh.exists()  # a concurrent run may be writing the fresh one
