"""Pretrained weights for a model section: `weights:` and what it implies.

    DEFAULT, IMAGENET1K_V2, ...   a torchvision weights enum member (torchvision/<name> models)
    pretrained                    timm's default pretrained tag, or the tag in timm/<name>.<tag>
    path/to/file.pth|.pt|.safetensors   a state_dict file, for any model reference

Downloads go through the libraries' own caches (torch hub, Hugging Face hub); offline, the
error says which file to put where. When the dataset has another number of classes than the
weights, the classifier layer(s) are re-initialised and the log says which. The weights'
preprocessing (mean/std, input size, crop, interpolation) is exposed to the data layer.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ..errors import CheckpointError, first_line
from .refs import Reference, parse

FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
TIMM_PRETRAINED = "pretrained"


def is_file(weights: Optional[str]) -> bool:
    return bool(weights) and str(weights).lower().endswith(FILE_SUFFIXES)


def check_weights(model_ref: str, weights: str) -> str:
    """Recipe validation (no torch): the form of `weights` fits the model reference."""
    kind = parse(model_ref).kind
    if is_file(weights):
        return weights
    if kind == "torchvision" and weights.isidentifier() and weights.upper() == weights:
        return weights  # the enum member itself is checked when the model is built (needs torchvision)
    if kind == "timm" and weights == TIMM_PRETRAINED:
        return weights
    forms = {"torchvision": "DEFAULT or an enum name such as IMAGENET1K_V1", "timm": "pretrained"}.get(kind)
    library = f"{forms} (downloaded), or " if forms else ""
    raise ValueError(
        f"weights {weights!r} does not fit model {model_ref!r}: use {library}a state_dict file "
        f"({', '.join(FILE_SUFFIXES)})"
    )


# ---------------------------------------------------------------- library weights


def create_pretrained(ref: Reference, weights: str, num_classes: int, kwargs: Dict[str, Any]):
    """A torchvision or timm model with the library's downloaded weights (recipe validation made
    sure the kind fits: enum names for torchvision, `pretrained` for timm)."""
    if ref.kind == "torchvision":
        return _torchvision_pretrained(ref, weights, num_classes, kwargs)
    return _timm_pretrained(ref, num_classes, kwargs)


def _torchvision_pretrained(ref: Reference, weights: str, num_classes: int, kwargs: Dict[str, Any]):
    import torchvision.models as tvm

    enum = torchvision_weights(ref, weights)
    try:  # the builder with weights sets what they need (e.g. inception's transform_input)
        model = tvm.get_model(ref.name, weights=enum, **kwargs)
    except OSError as exc:  # URLError and friends: no network
        name = enum.url.rsplit("/", 1)[-1]
        raise CheckpointError(
            f"model torchvision/{ref.name} weights {enum}: download failed ({first_line(exc)}); offline, put {name} "
            f"(from {enum.url}) at {_torch_hub_dir()}/{name}, or set weights: to a local state_dict file"
        ) from None
    replace_heads(model, len(enum.meta["categories"]), num_classes, f"torchvision/{ref.name}")
    return model


def torchvision_weights(ref: Reference, weights: str):
    import torchvision.models as tvm

    members = tvm.get_model_weights(ref.name)
    if weights not in members.__members__:
        raise CheckpointError(
            f"model torchvision/{ref.name}: no weights {weights!r}; choose one of {', '.join(members.__members__)}"
        )
    return members[weights]


def _torch_hub_dir() -> str:
    import torch.hub

    return str(Path(torch.hub.get_dir()) / "checkpoints")


HF_HOST = "huggingface.co"


def hub_unreachable(host: str = HF_HOST, timeout_s: float = 3.0) -> bool:
    """True when the Hugging Face hub cannot be reached directly (no DNS, no route). Behind a
    proxy or a mirror (HTTPS_PROXY, HF_ENDPOINT) the hub client knows better: not probed."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return False
    except OSError:
        return True


@contextmanager
def _hub_offline_when_unreachable() -> Iterator[None]:
    """Offline, huggingface_hub retries with backoff for ~46 s before failing (measured here);
    in its offline mode a cached file loads and a missing one fails at once."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    if not saved and hub_unreachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _timm_pretrained(ref: Reference, num_classes: int, kwargs: Dict[str, Any]):
    import timm

    cfg = timm_pretrained_cfg(ref)
    try:  # timm drops the classifier weights itself when num_classes differs
        with _hub_offline_when_unreachable():
            model = timm.create_model(ref.name, pretrained=True, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as exc:  # huggingface_hub's LocalEntryNotFoundError is an OSError
        hub_id = cfg.hf_hub_id or ref.name
        raise CheckpointError(
            f"model timm/{ref.name}: pretrained weights not downloadable ({first_line(exc, 120)}); offline, run "
            f"`hf download {hub_id}` where there is internet and copy its folder models--{hub_id.replace('/', '--')} "
            f"into {_hf_cache()}, or download model.safetensors from https://huggingface.co/{hub_id} and set "
            "weights: to its path"
        ) from None
    if cfg.num_classes and cfg.num_classes != num_classes:
        _log(
            f"timm/{ref.name}: classifier {cfg.classifier!r} re-initialised for {num_classes} classes "
            f"(the weights have {cfg.num_classes})"
        )
    return model


def timm_pretrained_cfg(ref: Reference):
    import timm
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(ref.name)
    except RuntimeError:  # timm: "Invalid pretrained tag (x) for arch"
        arch, _, tag = ref.name.partition(".")
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        shown = ", ".join(tags[:8]) + (f" (and {len(tags) - 8} more)" if len(tags) > 8 else "")
        raise CheckpointError(
            f"model timm/{ref.name}: timm has no pretrained tag {tag!r} for {arch}; "
            + (
                f"use timm/{arch}.<tag> with one of: {shown}"
                if tags
                else "it has no pretrained weights at all: set weights: to a local file"
            )
        ) from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise CheckpointError(
            f"model timm/{ref.name}: timm has no pretrained weights for it; "
            "pick a tag from timm.list_models(pretrained=True) or set weights: to a local file"
        )
    return cfg


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


# ---------------------------------------------------------------- local files and heads


def load_pretrained_file(model, path: str, arch: str, num_classes: int):
    """Load a state_dict file into `model`; classifier layers whose class count differs keep their
    fresh initialisation (and the log says so). Any other mismatch is an error."""
    from .checkpoint import load_state_dict_checked, without_wrapper_prefix

    state = without_wrapper_prefix(model, read_state_dict(path))  # before the head check: Lightning's model. prefix
    own = model.state_dict()
    heads = _class_layers(model, num_classes)
    reset = sorted(
        {
            k.rpartition(".")[0]
            for k, v in state.items()
            if k in own and v.shape != own[k].shape and k.rpartition(".")[0] in heads
        }
    )
    if reset:
        _log(
            f"{arch}: weights {Path(path).name}: classifier {', '.join(reset)} re-initialised for {num_classes} classes "
            f"(the file has {state[reset[0] + '.weight'].shape[0]})"
        )
    for layer in reset:
        for key in (f"{layer}.weight", f"{layer}.bias"):
            if key in state:
                state[key] = own[key]
    return load_state_dict_checked(model, state, path, arch)


def read_state_dict(path: str):
    from .checkpoint import extract_state_dict, load_state

    if not Path(path).is_file():
        raise CheckpointError(f"{path}: weights file not found; check weights: in the recipe")
    return extract_state_dict(load_state(path))  # .safetensors too (checkpoint.load_safetensors)


def _class_layers(model, num_classes: int) -> List[str]:
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
    heads = _class_layers(model, weight_classes)
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
    _log(
        f"{arch}: classifier {', '.join(heads)} replaced by a new layer with {num_classes} outputs "
        f"(the weights have {weight_classes})"
    )


def _log(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"  [weights] {text}")
