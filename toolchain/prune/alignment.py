"""Hardware-aligned channel counts.

onnxruntime/oneDNN CPU kernels work on channel blocks of 8 (16 with AVX-512); a layer
left with 53 channels falls off the fast path and can be slower than the unpruned
one (docs/pruning.md). So the number of channels a layer keeps is rounded to the
nearest multiple of `align` (ties down), never below `align`; layers with `align` channels or
fewer are left alone (pruning them saves nothing worth a slow kernel).
"""

from __future__ import annotations

import math


def kept_channels(channels: int, sparsity: float, align: int) -> int:
    """Channels to keep out of `channels` at `sparsity`, rounded to a multiple of `align`."""
    if channels <= align:
        return channels
    exact = channels * (1.0 - sparsity)
    # Nearest multiple; an exact tie (24 channels at 50% -> 8 or 16) goes to the smaller
    # layer: both miss the target equally, and the smaller one is faster.
    kept = align * math.ceil(exact / align - 0.5)
    return min(channels, max(align, kept))


def nni_sparse_ratio(channels: int, kept: int) -> float:
    """The NNI `sparse_ratio` that prunes exactly channels - kept filters.

    NNI prunes int(channels * ratio) filters; aiming half a filter above the count
    makes float error unable to round it down by one.
    """
    return (channels - kept + 0.5) / channels
