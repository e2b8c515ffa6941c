"""Pruning engine: NNI (default) or torch-pruning, behind one registry.

    from toolchain.prune import prune_model, PruneResult, keep_sparsity

The heavy imports (torch, nni, torch_pruning) happen on first attribute access, so
that `toolchain.prune.registry` stays cheap for recipe validation.
"""

_LAZY = {
    "prune_model": ".api",
    "check_prunable": ".api",
    "PruneResult": ".api",
    "GradientSource": ".taylor",
    "keep_sparsity": ".weight",
    "PruneError": ".registry",
    "PRUNERS": ".registry",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name], __name__), name)
