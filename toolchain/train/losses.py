"""Loss registry: plain classification, Hinton KD and Decoupled KD (Zhao et al., 2022).

A registered Loss says whether it needs a teacher (the recipe and the stages ask the
entry, never compare names) and returns a dict of terms: "total" is what is optimised,
the others (ce, kd, dkd_tckd, dkd_nckd) are logged as per-epoch means (`loss.<term>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from ..registry import Registry

Terms = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Loss:
    fn: Callable[..., Terms]
    needs_teacher: bool

    def __call__(self, student_logits, targets, teacher_logits=None, **kwargs) -> Terms:
        return self.fn(student_logits, targets, teacher_logits, **kwargs)


LOSSES: Registry[Loss] = Registry("loss")


def register_loss(name: str, needs_teacher: bool):
    def decorator(fn):
        LOSSES.register(name)(Loss(fn, needs_teacher))
        return fn

    return decorator


def get_loss(name: str) -> Loss:
    """The registered loss. A bare function registered with LOSSES.register is a teacher-free
    loss whose result is the total (no terms to log)."""
    entry = LOSSES.get(name)
    if isinstance(entry, Loss):
        return entry
    return Loss(lambda *args, **kwargs: {"total": entry(*args, **kwargs)}, needs_teacher=False)


@register_loss("ce", needs_teacher=False)
def cross_entropy(student_logits, targets, teacher_logits=None, *, label_smoothing=0.0, **_) -> Terms:
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return {"total": ce, "ce": ce}


@register_loss("kd", needs_teacher=True)
def hinton_kd(
    student_logits, targets, teacher_logits, *, temperature=4.0, alpha=0.9, label_smoothing=0.0, **_
) -> Terms:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    The T^2 factor keeps the soft term's gradient magnitude independent of T
    (Hinton et al., 2015), so alpha means the same thing at every temperature.
    """
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if alpha == 0:
        return {"total": hard, "ce": hard}
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    return {"total": alpha * soft + (1 - alpha) * hard, "ce": hard, "kd": soft}


@register_loss("dkd", needs_teacher=True)
def decoupled_kd(
    student_logits,
    targets,
    teacher_logits,
    *,
    temperature=4.0,
    dkd_alpha=1.0,
    dkd_beta=8.0,
    ce_weight=1.0,
    warmup=1.0,
    label_smoothing=0.0,
    **_,
) -> Terms:
    """ce_weight * CE + warmup * (dkd_alpha * TCKD + dkd_beta * NCKD) * T^2 (mdistiller's DKD).

    TCKD: KL between the binary (target, all others) distributions of teacher and student;
    NCKD: KL between their distributions over the non-target classes only. Hinton KD couples
    NCKD to the teacher's target confidence (weight 1 - p_t); DKD weights it freely (beta).
    warmup is the min(epoch / warmup_epochs, 1) factor the task computes.
    """
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, temperature)
    total = ce_weight * ce + warmup * (dkd_alpha * tckd + dkd_beta * nckd)
    return {"total": total, "ce": ce, "dkd_tckd": tckd, "dkd_nckd": nckd}


def dkd_terms(student_logits, teacher_logits, targets, temperature):
    """(TCKD, NCKD), each already scaled by T^2 and averaged over the batch."""
    gt = F.one_hot(targets, student_logits.shape[1]).bool()
    s, t = student_logits / temperature, teacher_logits / temperature
    # binary target / non-target probabilities, in log space so confident students stay finite
    log_bs, log_bt = _binary_log_probs(s, gt), _binary_log_probs(t, gt)
    tckd = F.kl_div(log_bs, log_bt, reduction="batchmean", log_target=True)
    # the target logit masked out (-inf would give 0 * -inf = nan in the KL; a large finite shift does not)
    shift = 1000.0 * gt
    nckd = F.kl_div(
        F.log_softmax(s - shift, dim=1), F.log_softmax(t - shift, dim=1), reduction="batchmean", log_target=True
    )
    return tckd * temperature**2, nckd * temperature**2


def _binary_log_probs(scaled_logits, gt_mask):
    """log [p_target, 1 - p_target] per row, from logits."""
    log_p = F.log_softmax(scaled_logits, dim=1)
    log_target = log_p.masked_fill(~gt_mask, float("-inf")).logsumexp(dim=1)
    log_others = log_p.masked_fill(gt_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target, log_others], dim=1)
