"""The torch-pruning engine (chosen only by `prune.engine: torch_pruning`).

Torch-Pruning builds its own dependency graph (always dependency-aware) and rounds
kept channels DOWN to `round_to`; we pass `align` as round_to. Layers that are not
targets (classifier, excluded, other op types) and layers with `align` channels or
fewer are ignored, as in the NNI engine. Importances: l1/l2 magnitude, FPGM.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from .registry import PruneError
from .targets import out_channels


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    return tp.importance.FPGMImportance()


def _ignored(model: nn.Module, targets: Dict[str, nn.Module], align: int) -> List[nn.Module]:
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (name not in targets or out_channels(m) <= align)
    ]


@contextmanager
def _shuffle_views(active: bool) -> Iterator[None]:
    """Torch-Pruning's reshape rule infers 0 channels behind a channel shuffle's 5-D view and
    divides by it. The layers around a shuffle are pinned (pinned.py), so the view needs no
    index mapping: with `active` (the model has known shuffles) such a view gets none. Any
    other model keeps the rule untouched, failure included."""
    import torch_pruning.dependency.index_mapping as index_mapping

    original = index_mapping.update_reshape_index_mapping

    def guarded(graph, node):
        try:
            return original(graph, node)
        except ZeroDivisionError:
            return None

    if active:
        index_mapping.update_reshape_index_mapping = guarded
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


def tp_stepper(
    model: nn.Module,
    targets: Dict[str, nn.Module],
    sparsities: List[float],
    importance: str,
    align: int,
    dependency_aware: bool,
    example_input: torch.Tensor,
    shuffles: bool = False,
    ratios: Optional[Dict[str, float]] = None,
) -> Callable[[float], None]:
    """A prune_step(sparsity) that advances a Torch-Pruning MetaPruner one step. With `ratios` (a
    layer's final pruning ratio, allocation latency_aware) `sparsities` are the fraction of the way
    there at each step, and a layer without one is not pruned."""
    if not dependency_aware:
        raise PruneError(
            "prune.engine torch_pruning is always dependency-aware; set prune.dependency_aware: true or use engine nni"
        )
    try:
        import torch_pruning as tp
    except ImportError:
        raise PruneError(
            "prune.engine torch_pruning needs the torch-pruning package: pip install torch-pruning"
        ) from None

    was_training = model.training
    model.eval()
    with _shuffle_views(shuffles):
        per_layer = None if ratios is None else {model.get_submodule(n): r for n, r in ratios.items()}
        default = sparsities[-1] if ratios is None else 0.0

        def schedule(ratio: float, steps: int) -> List[float]:
            return [0.0] + [p if ratios is None else ratio * p for p in sparsities]

        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            importance=_importance(importance),
            pruning_ratio=default,
            pruning_ratio_dict=per_layer,
            iterative_steps=len(sparsities),
            iterative_pruning_ratio_scheduler=schedule,
            ignored_layers=_ignored(model, targets, align),
            round_to=align if align > 1 else None,
        )
    model.train(was_training)

    def step(sparsity: float) -> None:
        was = model.training
        model.eval()
        with torch.no_grad(), _shuffle_views(shuffles):  # groups are re-mapped at every step
            pruner.step()
        model.train(was)

    return step
