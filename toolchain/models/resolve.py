"""What the pipeline asks of a model section (model, kwargs, cifar_stem, weights):

    create(model_cfg, num_classes)        the model, weights loaded, heads fitted to the dataset
    build(arch, num_classes, ...)         the bare architecture (refs.py; restoring a checkpoint into it)
    check_model(model_cfg, num_classes)   preflight: it builds, it is an nn.Module, its weights exist
    weights_identity(model_cfg)           what the weights are, for the stage key
    weights_preprocessing(model_cfg)      how the weights expect images, for the data layer

References are parsed in refs.py, weights loaded in weights.py; what differs between the forms of
a reference (registry, torchvision/, timm/, module:callable) is their model source's (sources.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from .refs import build, parse  # noqa: F401  (build: part of this module's API)
from .weights import create_pretrained, is_file, load_pretrained_file


def create(model_cfg, num_classes: int):
    """The section's model with `num_classes` outputs, its `weights:` loaded (heads re-initialised)."""
    weights, kwargs = model_cfg.weights, dict(model_cfg.kwargs)
    if weights and not is_file(weights):
        return create_pretrained(parse(model_cfg.model), weights, num_classes, kwargs)
    model = build(model_cfg.model, num_classes, model_cfg.cifar_stem, kwargs)
    if weights:
        load_pretrained_file(model, weights, model_cfg.model, num_classes)
    return model


def architecture(model_cfg, num_classes: int):
    """The section's architecture with fresh random weights: structure, not weights (what the
    preflight checks prune, probe and resolve)."""
    return build(model_cfg.model, num_classes, model_cfg.cifar_stem, model_cfg.kwargs)


def check_model(model_cfg, num_classes: int, example=None) -> None:
    """Build the architecture once (the user's callable imports, runs and returns a Module) and
    resolve its weights, so that a bad reference fails before any training. Library weights
    (DEFAULT, an enum, timm's pretrained) are fetched into the library's cache now: offline, the
    one-line "put this file there" error comes before the teacher trains, not after.
    example: a real input batch (2 images); the model's forward is then checked on it (check_forward)."""
    if model_cfg.weights and not is_file(model_cfg.weights):
        model = create(model_cfg, num_classes)
    else:
        model = architecture(model_cfg, num_classes)
    weights_identity(model_cfg)
    if example is not None:
        check_forward(model, model_cfg.model, example, num_classes)


def check_forward(model, ref: str, example, num_classes: int) -> None:
    """The rule the whole pipeline relies on (training, distillation, export, the package): in train
    and in eval mode, forward(batch) returns ONE tensor of logits shaped (batch, num_classes). A model
    returning a dict, a tuple, a namedtuple or a list (torchvision googlenet / inception_v3 in train
    mode, a (logits, features) model, a timm features model) is refused here, in one line, before
    anything trains: which element is the logits is the model author's call, not ours.
    `model` is a throw-away copy: its batch-norm statistics move."""
    import torch

    from ..errors import RecipeError, first_line

    shape = tuple(example.shape[1:])
    for mode in ("train", "eval"):
        model.train(mode == "train")
        try:
            with torch.no_grad():
                out = model(example)
        except Exception as exc:  # noqa: BLE001  (any architecture may fail on the data's input)
            text = first_line(exc, 200)
            hint = ""
            if "too small" in text.lower() or "kernel size can't be greater" in text.lower():
                smallest = _smallest_side(model, shape, mode)
                hint = (
                    f"; the smallest input it runs on is {smallest}x{smallest}, set data.image_size to at least that"
                    if smallest
                    else "; set a larger data.image_size"
                )
                if mode == "train" and getattr(model, "aux_logits", False):
                    hint += " (or kwargs: {aux_logits: false}: the auxiliary head needs the largest input)"
            raise RecipeError(
                f"model {ref!r} cannot run ({mode} mode) on the data's {'x'.join(map(str, shape))} "
                f"inputs: {type(exc).__name__}: {text}{hint}"
            ) from None
        if not isinstance(out, torch.Tensor):
            kind = (
                type(out).__name__
                if not isinstance(out, dict)
                else f"dict with keys {', '.join(map(str, list(out)[:4]))}"
            )
            aux = (
                " (torchvision googlenet / inception_v3: add kwargs: {aux_logits: false})"
                if hasattr(model, "aux_logits")
                else ""
            )
            raise RecipeError(
                f"model {ref!r}: forward returns a {kind} in {mode} mode, not one logits tensor; the "
                f"toolchain trains and ships models whose forward returns the (batch, {num_classes}) logits "
                f"tensor{aux}, or wrap it in a module that returns the logits"
            )
        if out.dim() != 2 or out.shape != (example.shape[0], num_classes):
            raise RecipeError(
                f"model {ref!r}: forward returns shape {tuple(out.shape)} for a batch of {example.shape[0]}, "
                f"but the dataset has {num_classes} classes: the head must have {num_classes} outputs "
                f"(the builder is called with num_classes={num_classes}; use it, and do not fix the head's "
                "width in kwargs or in your code)"
            )


def _smallest_side(model, shape, mode: str, limit: int = 1024) -> int:
    """The smallest square input side (doubling, then bisecting) the model runs on; 0 if none up to limit."""
    import torch

    def runs(side: int) -> bool:
        try:
            with torch.no_grad():
                model.train(mode == "train")
                model(torch.zeros(2, shape[0], side, side))
            return True
        except Exception:  # noqa: BLE001
            return False

    low, high = max(shape[1:]), max(shape[1:]) * 2
    while not runs(high):
        low, high = high, high * 2
        if high > limit:
            return 0
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if runs(mid) else (mid, high)
    return high


def weights_identity(model_cfg) -> Optional[str]:
    """What the weights are: the resolved enum member (DEFAULT moves between torchvision
    releases), timm's hub id and tag, or a file's sha256."""
    weights = model_cfg.weights
    if not weights:
        return None
    if is_file(weights):
        from ..errors import CheckpointError
        from ..fsutil import file_sha256

        if not Path(weights).is_file():
            raise CheckpointError(
                f"model {model_cfg.model!r}: weights file {weights} not found; check weights: in the recipe"
            )
        return file_sha256(weights)[:16]
    ref = parse(model_cfg.model)
    return ref.source.weights_identity(ref, weights)


def weights_preprocessing(model_cfg) -> Optional[Dict[str, Any]]:
    """How the library weights expect images: mean, std (3 floats each), image_size [h, w],
    crop_pct, interpolation ("bilinear" | "bicubic" | "nearest"). None without library weights
    (a local file does not say how it was trained)."""
    weights = model_cfg.weights
    if not weights or is_file(weights):
        return None
    ref = parse(model_cfg.model)
    return ref.source.weights_preprocessing(ref, weights)
