"""Weight (unstructured) pruning with NNI's LevelPruner, made permanent.

NNI scores every weight by |w| and masks the smallest. We take the masks, remove
NNI's wrappers, and multiply the masks into the weights, so the result is a plain
torch model whose zeros are real zeros. During fine-tuning `SparsityKeeper` (the
`after_step` callback) multiplies the masks in again after every optimizer step:
momentum and weight decay would otherwise revive pruned weights.

Global scope: NNI 3.0 ranks a `global_group_id` group with a per-element Python
heap (`_global_threshold_generate`), minutes for a ResNet-50. We compute the same
global magnitude threshold with one torch.kthvalue and hand each layer NNI's
`sparse_threshold` (mask = |w| >= threshold), which is what the heap computes.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn as nn

from . import nni_compat

_MASKS = Dict[str, Dict[str, torch.Tensor]]


class SparsityKeeper:
    """after_step callback: re-applies fixed 0/1 masks to weights (w.mul_(mask))."""

    def __init__(self, pairs: List[tuple]):
        self.pairs = pairs  # [(weight Parameter, bool mask)]

    @torch.no_grad()
    def __call__(self) -> None:
        for weight, mask in self.pairs:
            weight.mul_(mask)


def keep_sparsity(model: nn.Module) -> Callable[[], None]:
    """Snapshot the zeros of every Conv/Linear weight; the callable keeps them zero.

    For resuming fine-tuning of an already weight-pruned model (e.g. from a checkpoint).
    """
    pairs = [
        (m.weight, m.weight.detach() != 0)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and bool((m.weight == 0).any())
    ]
    return SparsityKeeper(pairs)


def global_threshold(targets: Dict[str, nn.Module], sparsity: float) -> float:
    """Smallest |w| that survives when `sparsity` of all target weights are zeroed."""
    scores = torch.cat([m.weight.detach().abs().flatten().float().cpu() for m in targets.values()])
    k = int(scores.numel() * sparsity)
    if k == 0:
        return 0.0
    kth = scores.kthvalue(k).values
    return float(torch.nextafter(kth, torch.tensor(float("inf"))))  # keep only |w| > kth


def level_config(targets: Dict[str, nn.Module], sparsity: float, scope: str) -> List[dict]:
    names = list(targets)
    if scope == "global":
        return [
            {"op_names": names, "target_names": ["weight"], "sparse_threshold": global_threshold(targets, sparsity)}
        ]
    return [{"op_names": names, "target_names": ["weight"], "sparse_ratio": sparsity}]


def level_masks(model: nn.Module, config: List[dict]) -> _MASKS:
    nni_compat.import_nni_quietly()
    from nni.compression.pruning import LevelPruner

    with nni_compat.quiet():
        pruner = LevelPruner(model, config)
        _, masks = pruner.compress()
        pruner.unwrap_model()
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: _MASKS) -> SparsityKeeper:
    """Multiply masks into the weights; the keeper holds them for fine-tuning."""
    pairs = []
    for name, targets in masks.items():
        module = model.get_submodule(name)
        for target, mask in targets.items():
            param = getattr(module, target)
            keep = mask.to(param.device).expand_as(param).bool()
            param.mul_(keep)
            pairs.append((param, keep))
    return SparsityKeeper(pairs)


def level_step(model: nn.Module, targets: Dict[str, nn.Module], sparsity: float, scope: str) -> SparsityKeeper:
    """Prune target weights to `sparsity` (per layer or global) in place."""
    return apply_masks(model, level_masks(model, level_config(targets, sparsity, scope)))
