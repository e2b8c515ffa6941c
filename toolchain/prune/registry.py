"""Pruner registry (import-light: recipe validation reads it, so no torch/nni here).

Each entry is a PrunerSpec: which method it serves (weight or channel), which engines
implement it, and how each engine names it. The engines (channel.py, weight.py,
tp_engine.py) look the spec up; nothing is chosen silently: the recipe's `engine`
picks the implementation, and a pruner/method/engine mismatch is a PruneError that
lists what fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from ..errors import ToolchainError
from ..registry import Registry


class PruneError(ToolchainError):
    """The prune section asks for something the pruning engines cannot do."""


@dataclass(frozen=True)
class PrunerSpec:
    name: str
    method: str  # "weight" or "channel"
    summary: str
    # engine name -> that engine's name for this criterion (NNI class / torch-pruning importance)
    engines: Dict[str, str] = field(default_factory=dict)


PRUNERS: Registry = Registry("pruner")

_SPECS = (
    PrunerSpec("level", "weight", "smallest-magnitude weights zeroed (NNI LevelPruner)", {"nni": "LevelPruner"}),
    PrunerSpec(
        "l1", "channel", "filters with the smallest L1 norm removed", {"nni": "L1NormPruner", "torch_pruning": "l1"}
    ),
    PrunerSpec(
        "l2", "channel", "filters with the smallest L2 norm removed", {"nni": "L2NormPruner", "torch_pruning": "l2"}
    ),
    PrunerSpec(
        "fpgm",
        "channel",
        "filters nearest the geometric median removed (FPGM)",
        {"nni": "FPGMPruner", "torch_pruning": "fpgm"},
    ),
    PrunerSpec(
        "taylor",
        "channel",
        "filters whose removal changes the training loss least, (weight x gradient)^2 "
        "summed over prune.taylor_batches training batches (Molchanov 2019)",
        {"nni": "TaylorPruner"},
    ),
)
for _spec in _SPECS:
    PRUNERS.register(_spec.name)(_spec)


def fitting(method: str, engine: str | None = None) -> list:
    """Pruner names that serve `method` (and `engine`, when given)."""
    return [
        n
        for n in PRUNERS.names()
        if PRUNERS.get(n).method == method and (engine is None or engine in PRUNERS.get(n).engines)
    ]


def check_fit(method: str, pruner: str, engine: str, scope: str = "layer") -> PrunerSpec:
    """The spec for `pruner`, or a PruneError saying which pruners/engines fit."""
    spec = PRUNERS.get(pruner)
    if spec.method != method:
        raise PruneError(
            f"prune.pruner {pruner!r} is a {spec.method} pruner but prune.method is {method!r}; "
            f"for method {method} use one of: {', '.join(fitting(method))}"
        )
    if engine not in spec.engines:
        raise PruneError(
            f"prune.engine {engine!r} does not implement pruner {pruner!r} (it has: {', '.join(spec.engines)}); "
            f"with engine {engine} use one of: {', '.join(fitting(method, engine)) or 'none for this method'}"
        )
    if scope == "global" and method != "weight":
        raise PruneError("prune.scope 'global' applies to weight pruning only; use scope: layer for channel pruning")
    return spec
