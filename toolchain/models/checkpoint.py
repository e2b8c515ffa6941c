"""Safe checkpoints: state_dicts only, loaded with torch.load(weights_only=True).

A channel-pruned model has smaller layers than its architecture. Instead of pickling the
module (unsafe to load), we store the state_dict and, on load, give a freshly built model of
the same reference the stored shapes (resize_to_state_dict): every parameter and buffer takes
its stored shape in place, so any layer type keeps its class (timm's LayerNorm2d, Conv2dSame,
BatchNormAct2d...), and the attributes forward() reads (channels, groups, normalized_shape)
follow from the shapes and from one traced forward pass.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..errors import CheckpointError, first_line
from ..fsutil import atomic_path


def save_state(obj: Dict[str, Any], path: str | Path) -> None:
    """torch.save atomically (temp file + rename): a crash never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _safetensors_errors() -> tuple:
    try:
        from safetensors import SafetensorError

        return (SafetensorError,)
    except ImportError:
        return ()


def load_state(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; check the path in the recipe")
    if path.suffix.lower() == ".safetensors":
        return load_safetensors(path)
    try:
        # torch.load itself hands a safetensors file (whatever its name) to safetensors: its errors too
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled Python objects, not only tensors ({first_line(exc)}); "
            "save the model's state_dict instead: torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, *_safetensors_errors()) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first_line(exc)}); re-create it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict (dict of tensors), got {type(obj).__name__}")
    return obj


def load_safetensors(path: Path) -> Dict[str, Any]:
    """A .safetensors file (tensors only by design, so nothing to refuse but damage): a truncated or
    garbled file is one line, as for a .pt checkpoint."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001  (SafetensorError, OSError, and the bindings' own errors)
        raise CheckpointError(
            f"{path}: not a readable .safetensors file, corrupt or truncated ({first_line(exc)}); "
            "re-create it (or copy it again if the transfer was cut)"
        ) from None


# where common training frameworks keep the weights in a checkpoint: ours and timm's train.py ("model",
# "state_dict_ema"), Lightning ("state_dict"), plain loops ("model_state_dict", "net")
CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "net", "network")


def extract_state_dict(obj: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Accept a bare state_dict or a training checkpoint that holds one under a CONTAINER_KEYS key;
    DataParallel / DDP's `module.` prefix is dropped."""
    state = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict) and obj[k]), obj)
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def without_wrapper_prefix(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A LightningModule saves its network as `<attribute>.<name>` (model.conv1.weight): when every key
    shares one first component and dropping it gives exactly the model's names, drop it."""
    own = set(model.state_dict())
    if set(state) == own or not state:
        return state
    first = {k.partition(".")[0] for k in state}
    if len(first) == 1 and all("." in k for k in state):
        stripped = {k.partition(".")[2]: v for k, v in state.items()}
        if set(stripped) == own:
            return stripped
    return state


def load_weights(
    model: nn.Module,
    path: str | Path,
    arch: str = "model",
    resize: bool = False,
    example_input: Optional[torch.Tensor] = None,
) -> nn.Module:
    """Load a checkpoint into `model`.

    resize=True is for the toolchain's own checkpoints of pruned models: layers take the stored
    shapes (example_input: a batch for the forward pass that settles grouped convolutions). A
    user's checkpoint loads strictly: a tensor of another shape (an ImageNet head on a 10-class
    model, a 1-channel stem) is an error, never silently resized.
    """
    state = extract_state_dict(load_state(path))
    if resize:
        resize_to_state_dict(model, state, example_input, f"{path} ({arch})")
    return load_state_dict_checked(model, state, path, arch)


def load_state_dict_checked(model: nn.Module, state: Dict[str, torch.Tensor], path, arch: str) -> nn.Module:
    """load_state_dict(strict=True) with one-line errors: which tensors do not fit, and how to fix it."""
    state = without_wrapper_prefix(model, state)
    _check_shapes(model, state, path, arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        missing = [k for k in model.state_dict() if k not in state][:3]
        unexpected = [k for k in state if k not in model.state_dict()][:3]
        raise CheckpointError(
            f"{path}: checkpoint does not fit architecture {arch!r} (missing {missing}, unexpected {unexpected}); "
            "check the model name in the recipe or pass the checkpoint made for it (a bare state_dict, or one under "
            f"{'/'.join(CONTAINER_KEYS)}, with or without a module. prefix)"
        ) from None
    return model


def _check_shapes(model: nn.Module, state: Dict[str, torch.Tensor], path, arch: str) -> None:
    expected = model.state_dict()
    if set(expected) != set(state):
        return  # other layer names: another architecture, reported by the strict load below
    wrong = [
        f"{k} {tuple(v.shape)} in the file vs {tuple(expected[k].shape)} in the model"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: {len(wrong)} tensor(s) do not fit {arch!r} as this recipe builds it ({'; '.join(wrong[:3])}"
            f"{'; ...' if len(wrong) > 3 else ''}); pass a state_dict trained for this architecture and dataset "
            "(same number of classes and input channels)"
        )


def resize_to_state_dict(
    model: nn.Module,
    state: Dict[str, torch.Tensor],
    example_input: Optional[torch.Tensor] = None,
    where: str = "checkpoint",
) -> None:
    """Give every parameter/buffer of `model` the shape it has in `state`, then fix the layer
    attributes forward() reads. Works for any layer type, since modules are kept, not replaced."""
    changed = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        resized = [
            _reshape_tensor(module, key, state[prefix + key])
            for key, tensor in [*module._parameters.items(), *module._buffers.items()]
            if tensor is not None and prefix + key in state and state[prefix + key].shape != tensor.shape
        ]
        if resized:
            _fit_attributes(module)
            changed.append((name, module))
    grouped = [m for _, m in changed if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1]
    if grouped or (changed and example_input is not None):
        _settle_by_forward(model, grouped, example_input, where)


def _reshape_tensor(module: nn.Module, key: str, stored: torch.Tensor) -> str:
    old = module._parameters.get(key)
    empty = torch.empty(stored.shape, dtype=stored.dtype)
    if old is not None:
        module._parameters[key] = nn.Parameter(empty, requires_grad=old.requires_grad)
    else:
        module._buffers[key] = empty
    return key


def _fit_attributes(module: nn.Module) -> None:
    """The shape attributes of torch's layer types (forward() and exporters read them)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = weight.shape[0]
        module.in_channels = weight.shape[1] * module.groups  # grouped: settled by _settle_by_forward
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (weight if weight is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.GroupNorm):
        per_group = module.num_channels // module.num_groups
        module.num_channels = weight.shape[0]
        module.num_groups = max(1, module.num_channels // per_group)  # pruning removes whole groups


def _settle_by_forward(model: nn.Module, grouped, example_input: Optional[torch.Tensor], where: str) -> None:
    """A grouped conv's weight says channels per group, not how many groups: the channels that
    reach it in a forward pass do. Convs run in order, so each sees an already settled input.
    The same pass checks that the rebuilt structure runs at all."""
    if example_input is None:
        raise CheckpointError(f"{where}: restoring pruned grouped convolutions needs an example input batch")

    def settle(module, args):
        channels = args[0].shape[1]
        module.groups, module.in_channels = channels // module.weight.shape[1], channels

    hooks = [m.register_forward_pre_hook(settle) for m in grouped]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    except Exception as exc:  # noqa: BLE001  (any layer may fail; the user needs the one line)
        raise CheckpointError(
            f"{where}: the pruned structure could not be rebuilt ({type(exc).__name__}: "
            f"{first_line(exc)}); recompute the stage with --force"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
