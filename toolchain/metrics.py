"""Model size/compute counters and Performance Efficiency.

Performance Efficiency (PE) as defined in docs/outputs.md:
    retention  = acc / acc_ref
    pe_params  = retention * (1 - nonzero_params / params_ref)   (headline)
    pe_macs    = retention * (1 - macs / macs_ref)
    pe_latency = retention * (1 - latency / latency_ref)         (ORT p50)
`nonzero_params` counts weights that survive weight pruning; MACs count only what the
physical model computes, so weight pruning (zeros in dense tensors) does not lower them.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of Conv and Linear layers for one forward pass at input_shape.

    Counted from the actual output shapes (forward hooks), so a physically pruned
    model reports its real, smaller compute. Norms/activations are ignored (<2%).
    """
    total = 0

    def conv_hook(mod: nn.Conv2d, inputs, output):
        nonlocal total
        kh, kw = mod.kernel_size
        total += output.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, inputs, output):
        nonlocal total
        total += output.numel() * mod.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(*input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


def model_size_bytes(model: nn.Module) -> int:
    """Dense fp32 state_dict size in bytes (what a plain .pt/.onnx weight blob costs)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def model_stats(model: nn.Module, input_shape: Sequence[int]) -> Dict[str, float]:
    params = count_params(model)
    nonzero = count_nonzero_params(model)
    return {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "macs": count_macs(model, input_shape),
        "size_bytes": model_size_bytes(model),
    }


def _gain(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or not reference:
        return None
    return 1.0 - value / reference


def performance_efficiency(
    acc: float,
    acc_ref: float,
    nonzero_params: float,
    params_ref: float,
    macs: Optional[float] = None,
    macs_ref: Optional[float] = None,
    latency: Optional[float] = None,
    latency_ref: Optional[float] = None,
) -> Dict[str, Optional[float]]:
    """PE variants of a compressed model against one reference (see module doc)."""
    retention = acc / acc_ref if acc_ref else 0.0
    out = {"retention": retention}
    for key, gain in (
        ("pe_params", _gain(nonzero_params, params_ref)),
        ("pe_macs", _gain(macs, macs_ref)),
        ("pe_latency", _gain(latency, latency_ref)),
    ):
        out[key] = None if gain is None else retention * gain
    return out
