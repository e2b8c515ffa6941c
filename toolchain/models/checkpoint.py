"""Safe checkpoints: state_dicts only, loaded with torch.load(weights_only=True).

A channel-pruned model has smaller layers than its registry architecture. Instead of
pickling the module (unsafe to load), we store the state_dict and, on load, resize the
registry model's Conv2d / BatchNorm2d / Linear layers to the stored shapes.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn as nn

from ..errors import CheckpointError, first_line
from ..fsutil import atomic_path


def save_state(obj: Dict[str, Any], path: str | Path) -> None:
    """torch.save atomically (temp file + rename): a crash never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_state(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; check the path in the recipe")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled Python objects, not only tensors ({first_line(exc)}); "
            "save the model's state_dict instead: torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first_line(exc)}); re-create it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict (dict of tensors), got {type(obj).__name__}")
    return obj


def extract_state_dict(obj: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Accept a bare state_dict or our {'model': state_dict, ...} container."""
    state = obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_weights(model: nn.Module, path: str | Path, arch: str = "model", resize: bool = False) -> nn.Module:
    """Load a checkpoint into `model`.

    resize=True is for the toolchain's own checkpoints of pruned models: layers are rebuilt
    at the stored shapes. A user's checkpoint loads strictly: a tensor of another shape (an
    ImageNet head on a 10-class model, a 1-channel stem) is an error, never silently resized.
    """
    state = extract_state_dict(load_state(path))
    if resize:
        resize_to_state_dict(model, state)
    else:
        _check_shapes(model, state, path, arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        missing = [k for k in model.state_dict() if k not in state][:3]
        unexpected = [k for k in state if k not in model.state_dict()][:3]
        raise CheckpointError(
            f"{path}: checkpoint does not fit architecture {arch!r} (missing {missing}, unexpected {unexpected}); "
            "check the model name in the recipe or pass the checkpoint made for it"
        ) from None
    return model


def _check_shapes(model: nn.Module, state: Dict[str, torch.Tensor], path, arch: str) -> None:
    expected = model.state_dict()
    if set(expected) != set(state):
        return  # other layer names: another architecture, reported by the strict load below
    wrong = [f"{k} {tuple(v.shape)} in the file vs {tuple(expected[k].shape)} in the model"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(
            f"{path}: {len(wrong)} tensor(s) do not fit {arch!r} as this recipe builds it ({'; '.join(wrong[:3])}"
            f"{'; ...' if len(wrong) > 3 else ''}); pass a state_dict trained for this architecture and dataset "
            "(same number of classes and input channels)")


def resize_to_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Replace Conv2d/BatchNorm2d/Linear modules whose stored weights have other shapes."""
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if weight is None or not hasattr(module, "weight") or module.weight is None:
            continue
        if tuple(weight.shape) == tuple(module.weight.shape):
            continue
        replacement = _resized(module, weight.shape)
        if replacement is not None:
            _set_submodule(model, name, replacement)


def _resized(module: nn.Module, shape) -> nn.Module | None:
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        out_ch = shape[0]
        in_ch = out_ch if depthwise else shape[1] * module.groups
        return nn.Conv2d(in_ch, out_ch, module.kernel_size, module.stride, module.padding, module.dilation,
                         groups=out_ch if depthwise else module.groups, bias=module.bias is not None,
                         padding_mode=module.padding_mode)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
    if isinstance(module, nn.Linear):
        return nn.Linear(shape[1], shape[0], bias=module.bias is not None)
    return None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
