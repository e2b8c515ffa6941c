"""Layers channel pruning must keep whole, because the model's own code depends on their
channels in a way neither engine can see.

Vision Transformer: the patch embedding's channels are the token width, which the forward
hard-codes (reshape to hidden_dim, class token, position embedding); pinning it and the
MLP outputs keeps the residual stream, and the MLP's hidden width is what gets pruned.

ShuffleNet's channel_shuffle (view -> transpose -> view) interleaves the halves of a
concatenation, so channel i before it is not channel i after it. Neither engine models
that permutation: Torch-Pruning's reshape rule divides by zero on the view, NNI's
dependency walk couples layers across it by index, which is wrong. What stays safely
prunable is everything the shuffle never sees: the channels inside each branch (1x1 ->
depthwise -> 1x1) and the stem and head. So the layers whose outputs enter a shuffle
(the last conv of each branch) and the depthwise convs that read a shuffle's output
directly are kept, as the classifier is; docs/pruning.md has the MACs this leaves.

One rule per module class; a model without such modules pins nothing.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch.nn as nn


def _torchvision_shufflenet_v2(name: str, block: nn.Module, first: bool) -> List[str]:
    pins = [f"{name}.branch2.5"]
    if len(block.branch1):
        pins.append(f"{name}.branch1.2")
        if not first:  # the first block reads the stem (prunable); later ones read a shuffle
            pins.append(f"{name}.branch1.0")
    return pins


def _torchvision_vit(name: str, model: nn.Module, first: bool) -> List[str]:
    """The patch embedding and every MLP output (they write the residual stream; NNI does not
    trace the stream through attention, so it would prune them apart)."""
    prefix = f"{name}." if name else ""
    mlp_outputs = [f"{prefix}encoder.layers.{block}.mlp.3" for block, _ in model.encoder.layers.named_children()]
    return [f"{prefix}conv_proj", *mlp_outputs]


def _shuffle_blocks() -> tuple:
    from torchvision.models.shufflenetv2 import InvertedResidual

    return (InvertedResidual,)


def _rules() -> Dict[type, Callable[[str, nn.Module, bool], List[str]]]:
    from torchvision.models.vision_transformer import VisionTransformer

    (shufflenet_block,) = _shuffle_blocks()
    return {shufflenet_block: _torchvision_shufflenet_v2, VisionTransformer: _torchvision_vit}


def pinned_layers(model: nn.Module) -> List[str]:
    """Names of layers whose output channels must all stay, in model order."""
    rules = _rules()
    pins: List[str] = []
    seen: set = set()
    for name, module in model.named_modules():
        rule = rules.get(type(module))
        if rule is not None:
            pins += rule(name, module, first=type(module) not in seen)
            seen.add(type(module))
    return pins


def has_channel_shuffle(model: nn.Module) -> bool:
    """A block with a known channel shuffle (its neighbours pinned above): Torch-Pruning then needs
    no index mapping through the shuffle's view (tp_engine.py)."""
    blocks = _shuffle_blocks()
    return any(isinstance(m, blocks) for m in model.modules())
