"""Classifier heads: the layers that produce the class scores, and swapping them when the weights
were trained for another number of classes. Shared by the model sources' library weights
(sources.py) and local weight files (weights.py); every change is said on one `[weights]` log line.
"""

from __future__ import annotations

from typing import List

from ..errors import CheckpointError


def class_layers(model, num_classes: int) -> List[str]:
    """Layers that produce the class scores: Linear (or 1x1-conv heads such as squeezenet's) with
    num_classes outputs."""
    import torch.nn as nn

    return [
        name
        for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)
    ]


def replace_heads(model, weight_classes: int, num_classes: int, arch: str) -> None:
    """Swap the layers with the weights' class count for fresh ones with `num_classes` outputs."""
    import torch.nn as nn

    if weight_classes == num_classes:
        return
    heads = class_layers(model, weight_classes)
    if not heads:
        raise CheckpointError(
            f"{arch}: no Linear/Conv2d layer with the weights' {weight_classes} outputs to replace; "
            "build the model with kwargs that set its classes, or use weights without a head"
        )
    for name in heads:
        old = model.get_submodule(name)
        new = (
            nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
            if isinstance(old, nn.Linear)
            else nn.Conv2d(
                old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=old.bias is not None
            )
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    log(
        f"{arch}: classifier {', '.join(heads)} replaced by a new layer with {num_classes} outputs "
        f"(the weights have {weight_classes})"
    )


def log(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"  [weights] {text}")
