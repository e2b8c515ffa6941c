"""Which layers a prune config touches: op_types, exclude patterns, the classifier."""

from __future__ import annotations

import fnmatch
from typing import Dict, Optional

import torch.nn as nn

from .registry import PruneError


def classifier_name(model: nn.Module) -> Optional[str]:
    """The last Linear (else the last Conv2d): its outputs are the classes, so keep them."""
    last_linear = last_conv = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_linear = name
        elif isinstance(module, nn.Conv2d):
            last_conv = name
    return last_linear or last_conv


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def select_targets(model: nn.Module, op_types, exclude, prune_classifier: bool) -> Dict[str, nn.Module]:
    """Modules to prune, in model order; a PruneError when the config selects none."""
    skip = None if prune_classifier else classifier_name(model)
    targets = {}
    for name, module in model.named_modules():
        if type(module).__name__ not in op_types or name == skip:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        targets[name] = module
    if not targets:
        raise PruneError(
            f"prune: no layer matches op_types {list(op_types)} after exclude {list(exclude)}; "
            "op_types are torch class names such as Conv2d, Linear"
        )
    return targets
