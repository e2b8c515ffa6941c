"""What the pipeline asks of a model section (model, kwargs, cifar_stem, weights):

    create(model_cfg, num_classes)        the model, weights loaded, heads fitted to the dataset
    build(arch, num_classes, ...)         the bare architecture (refs.py; restoring a checkpoint into it)
    check_model(model_cfg, num_classes)   preflight: it builds, it is an nn.Module, its weights exist
    weights_identity(model_cfg)           what the weights are, for the stage key
    weights_preprocessing(model_cfg)      how the weights expect images, for the data layer

References are parsed in refs.py, weights loaded in weights.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from .refs import build, parse  # noqa: F401  (build: part of this module's API)
from .weights import (create_pretrained, is_file, load_pretrained_file, timm_pretrained_cfg, torchvision_weights)


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


def check_model(model_cfg, num_classes: int) -> None:
    """Build the architecture once (the user's callable imports, runs and returns a Module) and
    resolve its weights, so that a bad reference fails before any training. Library weights
    (DEFAULT, an enum, timm's pretrained) are fetched into the library's cache now: offline, the
    one-line "put this file there" error comes before the teacher trains, not after."""
    if model_cfg.weights and not is_file(model_cfg.weights):
        create(model_cfg, num_classes)
    else:
        architecture(model_cfg, num_classes)
    weights_identity(model_cfg)


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
            raise CheckpointError(f"model {model_cfg.model!r}: weights file {weights} not found; check weights: in the recipe")
        return file_sha256(weights)[:16]
    ref = parse(model_cfg.model)
    if ref.kind == "torchvision":
        enum = torchvision_weights(ref, weights)
        return f"{enum} {enum.url}"
    cfg = timm_pretrained_cfg(ref)
    return f"{cfg.hf_hub_id or cfg.url or cfg.file} {cfg.tag}"


def weights_preprocessing(model_cfg) -> Optional[Dict[str, Any]]:
    """How the library weights expect images: mean, std (3 floats each), image_size [h, w],
    crop_pct, interpolation ("bilinear" | "bicubic" | "nearest"). None without library weights
    (a local file does not say how it was trained)."""
    weights = model_cfg.weights
    if not weights or is_file(weights):
        return None
    ref = parse(model_cfg.model)
    if ref.kind == "torchvision":
        t = torchvision_weights(ref, weights).transforms()
        crop, resize = t.crop_size[0], t.resize_size[0]
        return {"mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std], "image_size": [crop, crop],
                "crop_pct": round(crop / resize, 4), "interpolation": t.interpolation.value}
    from timm.data import resolve_data_config

    cfg = resolve_data_config(pretrained_cfg=timm_pretrained_cfg(ref).to_dict())
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "image_size": list(cfg["input_size"][1:]), "crop_pct": float(cfg["crop_pct"]),
            "interpolation": _interpolation(cfg["interpolation"])}


def _interpolation(name: str) -> str:
    """timm also names 'random' or 'lanczos'; the data layer knows bilinear, bicubic, nearest."""
    return name if name in ("bilinear", "bicubic", "nearest") else "bilinear"
