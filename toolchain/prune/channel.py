"""Channel (structured) pruning with NNI: aligned, dependency-aware masks -> speedup.

One step = score filters with the NNI pruner (L1/L2/FPGM, or Taylor on training
gradients: taylor.py), mask whole channels so that every coupled group keeps the
same, aligned number, then let ModelSpeedup build the smaller model. Kept counts
come from the ORIGINAL channel counts, so iterative steps land on the same aligned
sizes as a one-shot run.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from ..train.loop import eval_mode
from . import nni_compat
from .alignment import kept_channels, nni_sparse_ratio
from .speedup import speedup
from .targets import out_channels
from .taylor import GradientSource, taylor_masks


def nni_config(
    model: nn.Module,
    groups: List[List[str]],
    original: Dict[str, int],
    sparsity: Union[float, Dict[str, float]],
    align: int,
    blocks: Optional[Dict[str, int]] = None,
) -> List[dict]:
    """One NNI config entry per group that still has channels to drop at `sparsity` (one for every
    group, or per group keyed by its first member: latency_aware allocation).

    A group next to a grouped conv keeps a multiple of its block count as well as of `align`,
    and NNI drops the same number from every block (internal_metric_block, which NNI honours
    only inside a dependency group, so such a group gets an id even when alone)."""
    config = []
    for gid, names in enumerate(groups):
        block = math.lcm(*((blocks or {}).get(n, 1) for n in names))
        current = out_channels(model.get_submodule(names[0]))
        share = sparsity.get(names[0], 0.0) if isinstance(sparsity, dict) else sparsity
        if share <= 0:  # a group kept whole (rounding 24 channels to a multiple of 16 would drop 8)
            continue
        kept = kept_channels(original[names[0]], share, math.lcm(align, block))
        if kept >= current:
            continue
        entry = {"op_names": list(names), "sparse_ratio": nni_sparse_ratio(current, kept)}
        if len(names) > 1 or block > 1:
            entry["dependency_group_id"] = gid
        if block > 1:
            entry["internal_metric_block"] = block
        config.append(entry)
    return config


def channel_masks(
    model: nn.Module, config: List[dict], pruner_class: str, gradients: Optional[GradientSource] = None
) -> Dict[str, Dict[str, torch.Tensor]]:
    """Run the NNI pruner once, then take its wrappers off again (masks only)."""
    if pruner_class == "TaylorPruner":  # scores with training gradients: needs data, not just weights
        with eval_mode(model):
            return taylor_masks(model, config, gradients)
    nni_compat.import_nni_quietly()
    import nni.compression.pruning as nni_pruning

    with eval_mode(model), nni_compat.quiet():
        pruner = getattr(nni_pruning, pruner_class)(model, config)
        _, masks = pruner.compress()
        pruner.unwrap_model()
    return masks


def nni_channel_step(
    model: nn.Module,
    groups: List[List[str]],
    original: Dict[str, int],
    sparsity: Union[float, Dict[str, float]],
    align: int,
    pruner_class: str,
    example_input: torch.Tensor,
    gradients: Optional[GradientSource] = None,
    blocks: Optional[Dict[str, int]] = None,
) -> nn.Module:
    """Prune `model` in place to `sparsity` of its original channels."""
    config = nni_config(model, groups, original, sparsity, align, blocks)
    if not config:
        return model
    masks = channel_masks(model, config, pruner_class, gradients)
    return checked_speedup(model, masks, example_input, groups)


# NNI's speedup infers which channels are dead from randomised probe tensors (its indirect pass
# masks a weight row whose gradient came out exactly zero), and on a rare draw it removes a channel
# of a group nobody masked: 576 -> 575 in mobilenet_v3_small's SE blocks at 32x32 (once in CI; 6 of
# 200 speedups of a hand-made mask), 960 -> 959 in mobilenet_v2. Another draw does not repeat it, so
# the step checks every group's width against its masks and redoes the speedup.
SPEEDUP_ATTEMPTS = 3


def checked_speedup(model: nn.Module, masks, example_input: torch.Tensor, groups: List[List[str]]) -> nn.Module:
    """speedup(), in place, redone with another (seeded) probe draw while a group member comes out
    narrower than its masks keep (unmasked: its present width), up to SPEEDUP_ATTEMPTS draws. A
    narrowing that repeats on the next draw is NNI's own, not the draw's (a ViT's token tensors):
    it is left to the checks after the step, which say so in one line."""
    asked = asked_widths(model, masks, groups)
    before = copy.deepcopy(model)
    previous = None
    for attempt in range(SPEEDUP_ATTEMPTS):
        if attempt:  # speedup replaced submodules of `model`: put the unpruned ones back
            for name, child in copy.deepcopy(before).named_children():
                setattr(model, name, child)
        speedup(model, copy.deepcopy(masks), example_input, seed=attempt)
        narrower = {n: out_channels(model.get_submodule(n)) for n in asked}
        narrower = {n: w for n, w in narrower.items() if w < asked[n]}  # wider: NNI's union of coupled masks
        if not narrower or narrower == previous:
            return model
        previous = narrower
    return model


def asked_widths(model: nn.Module, masks, groups: List[List[str]]) -> Dict[str, int]:
    """The output width each group member must have after the speedup: the rows its weight mask
    keeps, or its present width when the step does not mask it."""
    widths = {}
    for names in groups:
        for name in names:
            mask = masks.get(name, {}).get("weight")
            if mask is None:
                widths[name] = out_channels(model.get_submodule(name))
            else:
                widths[name] = int((mask.reshape(mask.shape[0], -1) != 0).any(dim=1).sum())
    return widths
