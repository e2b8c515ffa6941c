"""Sparsity schedules: one shot, or an iterative cubic ramp.

Iterative pruning follows Zhu & Gupta (2017, "To prune, or not to prune"): step i of
n prunes to  s_i = s * (1 - (1 - i/n)^3).  The ramp removes most while the network
still has redundancy and slows down as it approaches the target; the last step lands
exactly on the target. Fine-tuning (the pipeline's KD loop) runs between steps.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional

import torch.nn as nn

_LOG = logging.getLogger(__name__)

FinetuneFn = Callable[[nn.Module, int, Optional[Callable[[], None]]], None]


def sparsity_steps(target: float, schedule: str, steps: int) -> List[float]:
    """Sparsity after each step; one_shot is the one-element ramp."""
    if schedule == "one_shot" or steps <= 1:
        return [target]
    return [target * (1.0 - (1.0 - i / steps) ** 3) for i in range(1, steps + 1)]


def run_schedule(
    sparsities: List[float],
    prune_step: Callable[[float], Optional[Callable[[], None]]],
    model_fn: Callable[[], nn.Module],
    finetune_fn: Optional[FinetuneFn],
    step_epochs: int,
) -> Optional[Callable[[], None]]:
    """Prune to each sparsity in turn; fine-tune between steps (not after the last:
    that is the pipeline's own fine-tune stage). Returns the last step's after_step."""
    after_step = None
    if len(sparsities) > 1 and (finetune_fn is None or step_epochs == 0):
        _LOG.warning(
            "iterative pruning without fine-tuning between steps (no finetune_fn or step_epochs 0): "
            "the steps run back to back, which only costs time over one_shot"
        )
    for i, sparsity in enumerate(sparsities):
        after_step = prune_step(sparsity)
        last = i == len(sparsities) - 1
        if not last and finetune_fn is not None and step_epochs > 0:
            finetune_fn(model_fn(), step_epochs, after_step)
    return after_step
