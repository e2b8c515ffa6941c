"""Loss registry: plain classification and Hinton knowledge distillation."""

import torch.nn.functional as F

from ..registry import Registry

LOSSES: Registry = Registry("loss")


@LOSSES.register("ce")
def cross_entropy(student_logits, targets, teacher_logits=None, *, label_smoothing=0.0, **_):
    return F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)


@LOSSES.register("kd")
def hinton_kd(student_logits, targets, teacher_logits, *, temperature=4.0, alpha=0.9, label_smoothing=0.0):
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    The T^2 factor keeps the soft term's gradient magnitude independent of T
    (Hinton et al., 2015), so alpha means the same thing at every temperature.
    """
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    return alpha * soft + (1 - alpha) * hard


def needs_teacher(name: str) -> bool:
    return name == "kd"
