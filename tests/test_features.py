"""Feature distillation by module path: hooks, probed adapters, training, resume, export, errors."""

import copy
import json
import signal

import onnx
import pytest
import torch
import torch.nn as nn
import yaml

from tests.test_reliability import start, wait_for
from toolchain.errors import RecipeError
from toolchain.metrics import count_params
from toolchain.models.checkpoint import load_state
from toolchain.models.registry import build_model
from toolchain.prune import prune_model
from toolchain.recipe import PruneConfig, TrainConfig
from toolchain.train.features import tapped
from toolchain.train.loop import fit
from toolchain.train.tasks import make_task

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(width: int, in_ch: int = 1) -> nn.Module:
    """conv (stride 1) -> conv (stride 2) -> pool -> fc: named modules body.0, body.2, head."""
    net = nn.Sequential()
    net.body = nn.Sequential(
        nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()
    )
    net.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.head = nn.Linear(width, 3)
    return net


def feature_cfg(*specs, loss="kd", epochs=1):
    return TrainConfig(
        loss=loss,
        epochs=epochs,
        lr=0.05,
        channels_last=False,
        features=[{"student": s, "teacher": t, "loss": kind} for s, t, kind in specs],
    )


def test_adapters_are_built_from_shapes_probed_at_the_data_input_shape():
    torch.manual_seed(0)
    student, teacher = tiny_net(4), tiny_net(6)
    # student body.0 is 20x20 (stride 1), teacher body.2 is 10x10: the student map is pooled down
    cfg = feature_cfg(("body.0", "body.2", "mse"), ("body.2", "body.2", "at"), ("head", "head", "mse"))
    task = make_task(cfg, teacher, student, input_shape=(1, 20, 20))
    mse, at, logits = task.features.adapters
    assert mse.size == (10, 10) and isinstance(mse.project[0], nn.Conv2d) and mse.project[0].in_channels == 4
    assert mse.project[0].out_channels == 6
    assert isinstance(at.project, nn.Identity) and at.size == (10, 10)  # attention maps need no channel match
    assert isinstance(logits.project, nn.Identity)  # same class count: nothing to learn
    total, _, terms = task.loss(student, torch.randn(5, 1, 20, 20), torch.randint(0, 3, (5,)))
    assert set(terms) == {"ce", "kd", "feat.0", "feat.1", "feat.2"} and torch.isfinite(total)
    assert task.features.num_params() == 4 * 6 + 2 * 6


def test_unknown_module_path_is_one_line_with_close_matches():
    cfg = feature_cfg(("body.0", "body.7", "mse"))
    with pytest.raises(RecipeError) as info:
        make_task(cfg, tiny_net(6), tiny_net(4), input_shape=(1, 8, 8), section="finetune")
    text = str(info.value)
    assert "\n" not in text and text.startswith("finetune.features[0].teacher: no module 'body.7'")
    assert "(close matches: body.3, body.2, body.1)" in text


def test_hooks_capture_named_modules_on_a_pruned_model():
    torch.manual_seed(0)
    teacher = build_model("mobilenet_v3_small", 10)
    pruned = prune_model(
        copy.deepcopy(teacher), PruneConfig(method="channel", sparsity=0.5), torch.randn(2, 3, 32, 32)
    ).model
    cfg = feature_cfg(("features.3", "features.3", "mse"), ("features.9", "features.9", "mse"))
    task = make_task(cfg, teacher, pruned, input_shape=(3, 32, 32))
    small = [task.features.adapters[i].project[0].in_channels for i in (0, 1)]
    full = [teacher.features[i].out_channels if hasattr(teacher.features[i], "out_channels") else None for i in (3, 9)]
    with torch.no_grad(), tapped(pruned, ["features.3", "features.9"]) as found:
        pruned.eval()(torch.randn(2, 3, 32, 32))
    assert [found[p].shape[1] for p in ("features.3", "features.9")] == small
    assert small[0] < 24 and small[1] < 96 and full == [24, 96]  # the pruned widths, mapped back to the teacher's
    assert not pruned.features[3]._forward_hooks  # hooks live only as long as one forward


def test_adapters_train_with_the_student_and_stay_out_of_the_model():
    torch.manual_seed(0)
    student, teacher = tiny_net(4), tiny_net(6)
    params_before = count_params(student)
    keys_before = set(student.state_dict())
    task = make_task(feature_cfg(("body.2", "body.2", "mse"), epochs=2), teacher, student, input_shape=(1, 12, 12))
    initial = copy.deepcopy(task.features.state_dict())
    batches = [(torch.randn(8, 1, 12, 12), torch.randint(0, 3, (8,))) for _ in range(3)]
    result = fit(student, task, batches, batches, feature_cfg(("body.2", "body.2", "mse"), epochs=2), stage="distill")
    trained = task.features.state_dict()
    assert not torch.equal(trained["adapters.0.project.0.weight"], initial["adapters.0.project.0.weight"])
    assert set(student.state_dict()) == keys_before and count_params(student) == params_before
    assert all("loss.feat.0" in h and "loss.kd" in h for h in result.history)


def feature_recipe(tiny_recipe, features, **sections):
    distill = {"epochs": 3, "lr": 0.05, "loss": "kd", "features": features}
    return tiny_recipe(distill=distill, **sections)


GOOD = [{"student": "features.2", "teacher": "layer2", "loss": "mse"}]  # 24x4x4 -> 32x16x16: conv + pool


def test_bad_module_path_is_one_line_exit_2(tiny_recipe, tmp_path, capsys):
    """In process (the CLI's own exit code and stderr); a one-line error from a real process: tests/test_recipe.py."""
    from toolchain.cli import run

    path = feature_recipe(tiny_recipe, [{"student": "feature.2", "teacher": "layer2"}])
    code = run(["compress", str(path)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: distill.features[0].student: no module 'feature.2'")
    assert "features.2" in lines[0]
    assert not list((tmp_path / "export" / ".cache").glob("teacher-*"))  # the preflight caught it: nothing trained


def test_a_bad_finetune_path_fails_before_the_teacher_trains(tiny_recipe, tmp_path, capsys):
    from toolchain.cli import run

    path = tiny_recipe(
        prune={"method": "channel", "sparsity": 0.5},
        finetune={"epochs": 1, "loss": "kd", "features": [{"student": "features.2", "teacher": "layer9"}]},
    )
    assert run(["compress", str(path)]) == 2
    assert "finetune.features[0].teacher: no module 'layer9'" in capsys.readouterr().err
    assert not list((tmp_path / "export" / ".cache").glob("teacher-*"))


@pytest.mark.slow  # SIGKILL: three CLI subprocesses
def test_adapters_resume_after_sigkill_and_never_reach_the_export(tiny_recipe, tmp_path):
    path = feature_recipe(tiny_recipe, GOOD)
    proc = start(path)
    cache = tmp_path / "export" / ".cache"
    state_file = wait_for("distill-*/train_state.pt", cache)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert load_state(state_file)["adapters"]["adapters.0.project.0.weight"].shape == (32, 24, 1, 1)
    resumed = start(path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming after epoch" in out + err, err

    # an uninterrupted run (with export) gives the same student: the adapters were resumed, not re-initialised
    recipe = yaml.safe_load(path.read_text())
    recipe.update(output_dir=str(tmp_path / "fresh"), export={"exporter": "dynamo", "references": False})
    (tmp_path / "fresh.yaml").write_text(yaml.safe_dump(recipe))
    fresh = start(tmp_path / "fresh.yaml")
    _, err = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, err
    stages = {
        name: json.loads((tmp_path / d / "tiny" / "summary.json").read_text())["stages"]["distill"]
        for name, d in (("resumed", "export"), ("fresh", "fresh"))
    }
    assert stages["resumed"]["metrics"]["test_accuracy"] == stages["fresh"]["metrics"]["test_accuracy"]
    assert stages["resumed"]["history"][-1]["loss.feat.0"] == stages["fresh"]["history"][-1]["loss.feat.0"]

    metrics = stages["fresh"]["metrics"]
    assert metrics["params"] == count_params(build_model("mobilenet_v3_small", 10))
    assert metrics["adapter_params"] == 24 * 32 + 2 * 32
    graph = onnx.load(str(tmp_path / "fresh" / "tiny" / "model.onnx")).graph
    onnx_params = sum(int(torch.tensor(list(init.dims)).prod()) for init in graph.initializer)
    assert onnx_params <= metrics["params"]
    assert not [i.name for i in graph.initializer if "adapter" in i.name or "project" in i.name]


@pytest.mark.slow
def test_adapters_stay_equal_across_torchrun_ranks_and_are_rebuilt_after_pruning(tiny_recipe, fmnist_root, tmp_path):
    from tests.test_distributed import torchrun

    path = tiny_recipe(
        distill={"epochs": 1, "lr": 0.05, "loss": "dkd", "features": GOOD},
        prune={"method": "channel", "pruner": "l1", "sparsity": 0.5},
        finetune={"epochs": 1, "lr": 0.01, "loss": "kd", "features": GOOD},
        data={"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 16, "eval_batch_size": 64},
    )
    proc = torchrun(["compress", str(path)], tmp_path, TOOLCHAIN_DIST_DEBUG_DIR=str(tmp_path / "ranks"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rec0, rec1 in zip(*ranks):
        assert rec0["ddp"] and rec0["stage"] == rec1["stage"]
        if rec0["stage"] in ("distill", "finetune"):  # different shards, same adapters: gradients all-reduced
            assert rec0["beside_checksum"] == pytest.approx(rec1["beside_checksum"], rel=1e-6, abs=1e-6)
    stages = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]
    # the finetune adapters map the pruned student's narrower features.2 (pruned from 24 channels) to layer2's 32
    assert stages["finetune"]["metrics"]["adapter_params"] < stages["distill"]["metrics"]["adapter_params"]
    assert "loss.dkd_nckd" in stages["distill"]["history"][0] and "loss.feat.0" in stages["finetune"]["history"][0]
