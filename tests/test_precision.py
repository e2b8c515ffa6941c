"""Training precision (toolchain/train/precision.py): the `auto` rule on fed timings, bf16 training
on a tiny model, and a resumed stage keeping the precision its first epochs trained in.
No assertion here depends on how fast this machine is: `auto`'s timings are a fake clock."""

import json

import pytest
import torch
import torch.nn as nn
import yaml

from toolchain.cli import run
from toolchain.errors import RecipeError
from toolchain.recipe import TrainConfig, validate_dict
from toolchain.train import precision as prec
from toolchain.train.loop import fit
from toolchain.train.tasks import ClassificationTask, DistillationTask


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


class FakeClock:
    """perf_counter that only moves when a timed call says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fed(monkeypatch, ms):
    """Make every fp32 / bf16 call 'take' ms[precision] milliseconds on the fake clock."""
    clock = FakeClock()
    monkeypatch.setattr(prec.time, "perf_counter", clock)
    monkeypatch.setattr(prec, "bf16_native", lambda: True)

    def make_calls(_model, *_args):
        def make(precision):
            def call():
                clock.now += ms[precision] / 1000

            return call

        return make

    monkeypatch.setattr(prec, "train_step", make_calls)
    monkeypatch.setattr(prec, "forward_call", make_calls)


x, y = batches(1)[0]


@pytest.mark.parametrize(
    "ms, expected",
    [
        ({"fp32": 200, "bf16": 163}, "bf16"),  # resnet18's step on AVX-512 BF16: 1.23x
        ({"fp32": 132, "bf16": 294}, "fp32"),  # mobilenet_v2's step: bf16 is 2.2x slower
        ({"fp32": 100, "bf16": 95}, "fp32"),  # 1.05x: inside the margin, fp32 stays
    ],
)
def test_auto_keeps_bf16_only_where_it_timed_past_the_margin(monkeypatch, ms, expected):
    fed(monkeypatch, ms)
    p = prec.choose("auto", tiny(), tiny(), x, y, on_cpu=True)
    assert p.student == expected and p.teacher == expected
    assert p.measured_ms["student_step_fp32"] == pytest.approx(ms["fp32"])
    assert p.measured_ms["teacher_forward_bf16"] == pytest.approx(ms["bf16"])


def test_auto_without_native_bf16_or_off_cpu_is_fp32_without_timing(monkeypatch):
    monkeypatch.setattr(prec, "bf16_native", lambda: False)
    assert prec.choose("auto", tiny(), None, x, y, on_cpu=True) == prec.Precision()
    monkeypatch.setattr(prec, "bf16_native", lambda: True)
    assert prec.choose("auto", tiny(), None, x, y, on_cpu=False) == prec.Precision()


def test_set_precisions_are_taken_as_set():
    assert prec.choose("fp32", tiny(), tiny(), x, y, on_cpu=True) == prec.Precision()
    assert prec.choose("bf16", tiny(), tiny(), x, y, on_cpu=True) == prec.Precision("bf16", "bf16")
    assert prec.choose("bf16", tiny(), None, x, y, on_cpu=True) == prec.Precision("bf16", "fp32")


def test_the_measurement_leaves_the_model_untouched():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prec._pick(prec.train_step(model, x, y), "student_step", {})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_training_runs_its_forwards_in_bf16_and_its_losses_in_fp32():
    seen = {}
    model, teacher = tiny(0), tiny(1)
    model[0].register_forward_hook(lambda m, i, o: seen.update(student=o.dtype))  # update returns None
    teacher[0].register_forward_hook(lambda m, i, o: seen.update(teacher=o.dtype))
    task = DistillationTask(teacher, "kd", temperature=4.0, alpha=0.9)
    task.precision = prec.Precision("bf16", "bf16")
    loss, logits, _ = task.loss(model, x, y)
    assert seen == {"student": torch.bfloat16, "teacher": torch.bfloat16}
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def cfg(epochs, precision):
    return TrainConfig(epochs=epochs, lr=0.05, precision=precision, channels_last=False)


def test_a_resumed_stage_keeps_the_precision_its_first_epochs_trained_in(tmp_path):
    state = tmp_path / "train_state.pt"

    def killed(epoch, metrics):
        raise KeyboardInterrupt  # after the first epoch's resume checkpoint was written

    with pytest.raises(KeyboardInterrupt):
        fit(
            tiny(),
            ClassificationTask(),
            batches(),
            batches(2, 1),
            cfg(2, "bf16"),
            stage="t",
            state_path=state,
            on_epoch=killed,
        )
    resumed = fit(tiny(), ClassificationTask(), batches(), batches(2, 1), cfg(2, "fp32"), stage="t", state_path=state)
    assert resumed.resumed_from_epoch == 0 and resumed.precision == prec.Precision("bf16", "fp32")
    assert len(resumed.history) == 2 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in resumed.history)


def test_a_resume_checkpoint_keeps_the_best_accuracy_and_history_exactly(tmp_path):
    """The best validation accuracy decides which epoch's weights a stage keeps (ties go to the later
    epoch). Stored in float32, 0.1 came back as 0.10000000149, later epochs that tied it lost, and a
    resumed run shipped other weights than an uninterrupted one (seen as the SIGKILL test's failure on
    a tiny model stuck at chance)."""
    from toolchain.train.loop import FitResult, _restore, _save, make_optimizer, make_scheduler

    model, task, config = tiny(), ClassificationTask(), cfg(3, "fp32")
    optimizer = make_optimizer(model, config, None)
    scheduler = make_scheduler(optimizer, config, 12)
    saved = FitResult(history=[{"val_accuracy": 0.1, "train_loss": 2.302585}], best_val_accuracy=0.1, best_epoch=0)
    _save(tmp_path / "state.pt", model, task, optimizer, scheduler, 0, saved, model.state_dict())
    restored = FitResult()
    _restore(tmp_path / "state.pt", model, task, optimizer, scheduler, restored)
    assert restored.best_val_accuracy == 0.1 and restored.history == saved.history


def test_bf16_with_feature_terms_is_a_recipe_error(tiny_recipe):
    path = tiny_recipe(
        distill={"epochs": 1, "loss": "kd", "precision": "bf16", "features": [{"student": "a", "teacher": "b"}]}
    )
    with pytest.raises(RecipeError, match="precision bf16 with feature distillation"):
        validate_dict(yaml.safe_load(path.read_text()))


def test_a_bf16_distill_stage_records_its_precision(tiny_recipe, tmp_path, warm_cache):
    path = tiny_recipe(distill={"epochs": 1, "lr": 0.05, "loss": "kd", "precision": "bf16"})
    assert run(["compress", str(path)]) == 0
    stages = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]
    assert stages["teacher"]["cached"] and not stages["distill"]["cached"]  # a new setting is a new key
    assert stages["distill"]["metrics"]["bf16_student"] == 1.0 and stages["distill"]["metrics"]["bf16_teacher"] == 1.0
    assert 0.0 <= stages["distill"]["metrics"]["test_accuracy"] <= 1.0
