import math

import pytest
import torch
import torch.nn.functional as F

from toolchain.errors import RecipeError
from toolchain.recipe import TrainConfig, validate_dict
from toolchain.train.losses import LOSSES, decoupled_kd, dkd_terms, get_loss, hinton_kd
from toolchain.train.tasks import ClassificationTask, DistillationTask, make_task


def logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 10, generator=g) * 3, torch.randint(0, 10, (16,), generator=g)


def test_alpha_zero_equals_cross_entropy():
    s, y = logits(0)
    t, _ = logits(1)
    assert torch.allclose(hinton_kd(s, y, t, temperature=4.0, alpha=0.0)["total"], F.cross_entropy(s, y))


def test_soft_term_is_scaled_by_t_squared():
    s, y = logits(0)
    t, _ = logits(1)
    for temp in (1.0, 2.0, 8.0):
        kl = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean")
        assert torch.allclose(hinton_kd(s, y, t, temperature=temp, alpha=1.0)["total"], kl * temp**2, atol=1e-6)


def test_soft_gradient_magnitude_is_stable_across_temperatures():
    """The reason for T^2: gradient of the soft term stays the same order as T grows."""
    s, y = logits(0)
    t, _ = logits(1)
    norms = []
    for temp in (2.0, 8.0):
        s_ = s.clone().requires_grad_(True)
        hinton_kd(s_, y, t, temperature=temp, alpha=1.0)["total"].backward()
        norms.append(s_.grad.norm().item())
    assert 0.2 < norms[1] / norms[0] < 5


def test_kd_is_zero_when_student_matches_teacher_and_alpha_one():
    s, y = logits(0)
    assert hinton_kd(s, y, s.clone(), temperature=4.0, alpha=1.0)["total"].abs() < 1e-6


def test_kd_reports_its_terms():
    s, y = logits(0)
    t, _ = logits(1)
    terms = hinton_kd(s, y, t, temperature=4.0, alpha=0.9)
    assert set(terms) == {"total", "ce", "kd"}
    assert torch.allclose(terms["total"], 0.9 * terms["kd"] + 0.1 * terms["ce"])


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_is_a_finite_scalar_that_trains(name):
    """Whatever is registered: callable with (student, targets, teacher), a finite scalar total with a gradient."""
    s, y = logits(0)
    s.requires_grad_(True)
    loss = get_loss(name)
    t = torch.randn_like(s) if loss.needs_teacher else None
    total = loss(s, y, t)["total"]
    total.backward()
    assert total.dim() == 0 and torch.isfinite(total) and s.grad.abs().sum() > 0


def test_needs_teacher_is_a_property_of_the_registered_loss():
    assert {n: get_loss(n).needs_teacher for n in LOSSES.names()} == {"ce": False, "kd": True, "dkd": True}
    assert TrainConfig(loss="ce").needs_teacher is False
    assert TrainConfig(loss="ce", features=[{"student": "a", "teacher": "b"}]).needs_teacher is True


# ---------------------------------------------------------------- DKD


def dkd_by_hand(s, t, y, temp):
    """TCKD and NCKD of Zhao et al. (2022), eq. (2)-(4), one sample at a time with plain probabilities."""
    tckd = nckd = 0.0
    for i in range(len(y)):
        ps, pt = F.softmax(s[i] / temp, 0).tolist(), F.softmax(t[i] / temp, 0).tolist()
        k = int(y[i])
        bs, bt = [ps[k], 1 - ps[k]], [pt[k], 1 - pt[k]]
        tckd += sum(b * math.log(b / a) for a, b in zip(bs, bt))
        others = [j for j in range(len(ps)) if j != k]
        qs = [ps[j] / (1 - ps[k]) for j in others]
        qt = [pt[j] / (1 - pt[k]) for j in others]
        nckd += sum(b * math.log(b / a) for a, b in zip(qs, qt))
    n = len(y)
    return tckd / n * temp**2, nckd / n * temp**2


def test_dkd_terms_equal_the_formula_on_hand_made_logits():
    s = torch.tensor([[2.0, 1.0, 0.1, -1.0], [0.5, 0.5, 3.0, 0.0], [-1.0, 2.0, 0.0, 1.0]])
    t = torch.tensor([[3.0, 0.0, 0.5, -2.0], [0.0, 1.0, 2.0, 0.5], [0.0, 4.0, -1.0, 0.0]])
    y = torch.tensor([0, 2, 1])
    for temp in (1.0, 4.0):
        tckd, nckd = dkd_terms(s, t, y, temp)
        want_tckd, want_nckd = dkd_by_hand(s, t, y, temp)
        assert tckd.item() == pytest.approx(want_tckd, rel=1e-4)
        assert nckd.item() == pytest.approx(want_nckd, rel=1e-4)
        terms = decoupled_kd(s, y, t, temperature=temp, dkd_alpha=0.7, dkd_beta=3.0, ce_weight=0.5, warmup=0.25)
        want = 0.5 * F.cross_entropy(s, y).item() + 0.25 * (0.7 * want_tckd + 3.0 * want_nckd)
        assert terms["total"].item() == pytest.approx(want, rel=1e-4)


def test_hinton_kd_is_tckd_plus_nckd_weighted_by_teacher_non_target_mass():
    """The paper's eq. (7), per sample: KD = TCKD + (1 - p_t) * NCKD. DKD frees NCKD's weight."""
    s, y = logits(0)
    t, _ = logits(1)
    for i in range(4):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        kd = hinton_kd(si, yi, ti, temperature=2.0, alpha=1.0)["total"]
        tckd, nckd = dkd_terms(si, ti, yi, 2.0)
        p_target = F.softmax(ti / 2.0, 1)[0, yi[0]]
        assert kd.item() == pytest.approx((tckd + (1 - p_target) * nckd).item(), rel=1e-4, abs=1e-6)


def test_dkd_limits():
    s, y = logits(0)
    t, _ = logits(1)
    ce = F.cross_entropy(s, y)
    tckd, nckd = dkd_terms(s, t, y, 4.0)
    only_tckd = decoupled_kd(s, y, t, dkd_alpha=1.0, dkd_beta=0.0)["total"]
    only_nckd = decoupled_kd(s, y, t, dkd_alpha=0.0, dkd_beta=1.0)["total"]
    assert torch.allclose(only_tckd, ce + tckd) and torch.allclose(only_nckd, ce + nckd)
    perfect = decoupled_kd(s, y, s.clone(), dkd_alpha=1.0, dkd_beta=8.0)  # teacher == student: nothing to learn
    assert perfect["dkd_tckd"].abs() < 1e-5 and perfect["dkd_nckd"].abs() < 1e-5
    assert torch.allclose(perfect["total"], ce, atol=1e-4)
    no_ce = decoupled_kd(s, y, t, ce_weight=0.0, dkd_alpha=1.0, dkd_beta=8.0)["total"]
    assert torch.allclose(no_ce, tckd + 8.0 * nckd)


def test_dkd_stays_finite_for_confident_students():
    s = torch.tensor([[60.0, -60.0, 0.0], [-80.0, 80.0, 0.0]], requires_grad=True)
    t = torch.tensor([[5.0, 0.0, 1.0], [0.0, 9.0, 2.0]])
    total = decoupled_kd(s, torch.tensor([0, 1]), t, temperature=1.0)["total"]
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()


def test_dkd_warm_up_ramps_with_one_based_epochs():
    task = ClassificationTask("ce", warmup_epochs=4)
    ramp = []
    for epoch in range(6):
        task.epoch = epoch
        ramp.append(task.warmup())
    assert ramp == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ClassificationTask("ce").warmup() == 1.0


def test_dkd_task_reports_terms_and_uses_recipe_settings():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    cfg = TrainConfig(
        loss="dkd", temperature=2.0, dkd={"alpha": 0.5, "beta": 2.0, "ce_weight": 0.3, "warmup_epochs": 2}
    )
    task = make_task(cfg, teacher)
    assert isinstance(task, DistillationTask)
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    total, _, terms = task.loss(student, x, y)
    assert set(terms) == {"ce", "dkd_tckd", "dkd_nckd"}
    want = 0.3 * terms["ce"] + 0.5 * (0.5 * terms["dkd_tckd"] + 2.0 * terms["dkd_nckd"])  # epoch 1 of 2: half
    assert torch.allclose(total, want)


# ---------------------------------------------------------------- recipe


def recipe(**distill):
    return {"name": "r", "student": {"model": "mobilenet_v2"}, "distill": distill}


@pytest.mark.parametrize(
    "distill, expected",
    [
        ({"loss": "dkd"}, "distill.loss is dkd but the recipe has no teacher section"),
        (
            {"loss": "ce", "features": [{"student": "features.6", "teacher": "layer2"}]},
            "distill.features is set but the recipe has no teacher section",
        ),
        ({"loss": "dkd", "dkd": {"gamma": 1}}, "distill.dkd.gamma: unknown key"),
        ({"loss": "dkd", "dkd": {"beta": -1}}, "distill.dkd.beta"),
        ({"loss": "kd", "features": [{"student": "a", "teacher": "b", "loss": "l2"}]}, "distill.features.0.loss"),
        ({"loss": "kd", "features": [{"student": "a"}]}, "distill.features.0.teacher: required key is missing"),
    ],
)
def test_recipe_rejects_bad_distillation_settings(distill, expected):
    with pytest.raises(RecipeError, match=expected.replace(".", r"\.")):
        validate_dict(recipe(**distill))


def test_recipe_accepts_dkd_and_features_with_a_teacher():
    r = validate_dict(
        {
            **recipe(
                loss="dkd",
                dkd={"beta": 2.0},
                features=[{"student": "features.6", "teacher": "layer2", "loss": "at", "weight": 100}],
            ),
            "teacher": {"model": "resnet18"},
        }
    )
    assert r.distill.dkd.beta == 2.0 and r.distill.features[0].loss == "at" and r.distill.needs_teacher
