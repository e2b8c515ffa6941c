"""Pretrained weights for a model section: `weights:` and what it implies.

    DEFAULT, IMAGENET1K_V2, ...   a torchvision weights enum member (torchvision/<name> models)
    pretrained                    timm's default pretrained tag, or the tag in timm/<name>.<tag>
    path/to/file.pth|.pt|.safetensors   a state_dict file, for any model reference

A file is this module's; library weights are the model source's (sources.py: which forms it
accepts, the download, identity and preprocessing), reached through SOURCES. Downloads go through
the libraries' own caches (torch hub, Hugging Face hub); offline, the error says which file to put
where. When the dataset has another number of classes than the weights, the classifier layer(s)
are re-initialised and the log says which (heads.py). The weights' preprocessing (mean/std, input
size, crop, interpolation) is exposed to the data layer.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from ..errors import CheckpointError
from .heads import class_layers, log, replace_heads  # noqa: F401  (replace_heads: part of this module's API)
from .sources import Reference, parse

FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def is_file(weights: Optional[str]) -> bool:
    return bool(weights) and str(weights).lower().endswith(FILE_SUFFIXES)


def check_weights(model_ref: str, weights: str) -> str:
    """Recipe validation (no torch): the form of `weights` fits the model reference."""
    if is_file(weights):
        return weights
    source = parse(model_ref).source
    if source.accepts_weights(weights):
        return weights  # the value itself (e.g. a torchvision enum member) is checked when the model is built
    library = f"{source.weights_forms} (downloaded), or " if source.weights_forms else ""
    raise ValueError(
        f"weights {weights!r} does not fit model {model_ref!r}: use {library}a state_dict file "
        f"({', '.join(FILE_SUFFIXES)})"
    )


# ---------------------------------------------------------------- library weights


def create_pretrained(ref: Reference, weights: str, num_classes: int, kwargs: Dict[str, Any]):
    """A model with its library's downloaded weights (recipe validation made sure the form fits its
    source: enum names for torchvision, `pretrained` for timm). A source whose weights come from the
    Hugging Face hub loads them in the hub's offline mode when the hub cannot be reached."""
    source = ref.source
    with _hub_offline_when_unreachable() if source.hf_hub else nullcontext():
        return source.create_pretrained(ref, weights, num_classes, kwargs)


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


# ---------------------------------------------------------------- local files


def load_pretrained_file(model, path: str, arch: str, num_classes: int):
    """Load a state_dict file into `model`; classifier layers whose class count differs keep their
    fresh initialisation (and the log says so). Any other mismatch is an error."""
    from .checkpoint import load_state_dict_checked, without_wrapper_prefix

    state = without_wrapper_prefix(model, read_state_dict(path))  # before the head check: Lightning's model. prefix
    own = model.state_dict()
    heads = class_layers(model, num_classes)
    reset = sorted(
        {
            k.rpartition(".")[0]
            for k, v in state.items()
            if k in own and v.shape != own[k].shape and k.rpartition(".")[0] in heads
        }
    )
    if reset:
        log(
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
