"""Physical channel removal with NNI's ModelSpeedup (through the torch-2.14 shim)."""

from __future__ import annotations

import logging
from typing import Dict

import torch
import torch.nn as nn

from ..train.loop import eval_mode  # trace in eval mode: train-mode BN would fold the dummy batch into running stats
from . import nni_compat

_LOGGER = logging.getLogger(__name__)


def dummy_batch(example_input: torch.Tensor) -> torch.Tensor:
    """Speedup infers masks from batch statistics; it needs a batch of 2 or more."""
    if example_input.shape[0] >= 2:
        return example_input
    return example_input.expand(2, *example_input.shape[1:]).contiguous()


def speedup(
    model: nn.Module, masks: Dict[str, Dict[str, torch.Tensor]], example_input: torch.Tensor, seed: int = 0
) -> nn.Module:
    """Replace masked layers by smaller ones, in place; returns the same model object. `seed` draws
    NNI's random probe tensors (from a forked RNG: the caller's random stream is left as it was)."""
    nni_compat.import_nni_quietly()
    from nni.compression.speedup import ModelSpeedup

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None

    # enable_grad: speedup propagates masks backwards through autograd, and fails
    # (v.grad is None) when a caller runs it under torch.no_grad().
    # the model's own CUDA devices only: fork_rng's default touches (and warns about) every GPU
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with eval_mode(model), nni_compat.patched(), nni_compat.quiet(), torch.enable_grad():
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds every GPU
            for index in devices:
                torch.cuda.default_generators[index].manual_seed(seed)
            # Without a logger of our own, ModelSpeedup forces its module logger to INFO
            # and logs every node it touches.
            ModelSpeedup(model, dummy_batch(example_input), masks, logger=_LOGGER).speedup_model()
    if dtype is not None:
        model.to(dtype)  # NNI rebuilds layers in the default dtype (float32); keep the model's
    return model
