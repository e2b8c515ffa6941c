"""Coupled-channel groups: layers whose output channels must be pruned together.

A residual add needs both branches to keep the same channels; a depthwise conv keeps
exactly the channels its input conv keeps; an SE block's scale multiplies the channels
of the conv it gates. NNI's ChannelDependency finds these sets by tracing the model
(torch.jit). Each set becomes one NNI dependency group: the members' filter scores are
averaged and one mask is shared, so speedup can physically remove the channels.
Pruned layer by layer instead, the coupled channels survive as a union of masks and
little is removed (docs/pruning.md has the measurement).
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from . import nni_compat
from .speedup import eval_mode


def _grouped_convs(model: nn.Module) -> List[str]:
    """Grouped (not depthwise) convs add divisibility constraints we do not model."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels]


def _channel_dependency():
    from nni.compression.utils.shape_dependency import ChannelDependency

    class VisitedChannelDependency(ChannelDependency):
        """NNI's ChannelDependency whose depthwise-parent walk remembers what it visited: NNI's
        own re-queues shared nodes, which grows exponentially on ShuffleNet's chunk/concat
        chains (hours at 32x32). Same parents, found once each."""

        def _depthwise_get_parent(self, node):
            parents, seen = [], set()
            queue = [self.graph.name_to_node[x] for x in self.graph.find_predecessors(node.unique_name)]
            while queue:
                current = queue.pop(0)
                if current.unique_name in seen:
                    continue
                seen.add(current.unique_name)
                if current.op_type in ("Conv2d", "ConvTranspose2d", "Linear"):
                    parents.append(current.name)
                    continue
                queue += [self.graph.name_to_node[x] for x in self.graph.find_predecessors(current.unique_name)]
            return parents

    return VisitedChannelDependency


def coupled_sets(model: nn.Module, example_input: torch.Tensor) -> List[set]:
    """NNI's channel-dependency sets over all Conv2d/Linear layers (singletons included)."""
    nni_compat.import_nni_quietly()
    ChannelDependency = _channel_dependency()

    with eval_mode(model), nni_compat.quiet(), torch.no_grad():
        # NNI's own trace runs torch.jit's trace checker (a second and third forward,
        # ~70% of the time); the graph is the same without it.
        traced = torch.jit.trace(model, example_input, strict=False, check_trace=False)
        return [set(s) for s in ChannelDependency(model, example_input, traced_model=traced).dependency_sets]


def channel_groups(
    model: nn.Module, example_input: torch.Tensor, targets: Dict[str, nn.Module], aware: bool
) -> List[List[str]]:
    """Groups of target layer names to prune with one shared mask.

    aware=False: every layer alone (NNI's plain per-layer behaviour). aware=True: a
    coupled set is pruned only when all its members are targets; a set that touches a
    kept layer (the classifier, an excluded one) stays whole, since its channels could
    not be removed anyway.
    """
    if not aware:
        return [[name] for name in targets]
    grouped = _grouped_convs(model)
    if grouped:
        more = f" and {len(grouped) - 1} more" if len(grouped) > 1 else ""
        raise NotImplementedError(f"dependency-aware pruning of grouped (non-depthwise) convs ({grouped[0]}{more})")
    order = {name: i for i, name in enumerate(targets)}
    groups = []
    for members in coupled_sets(model, example_input):
        if members and members <= targets.keys():
            groups.append(sorted(members, key=order.get))
    return sorted(groups, key=lambda g: order[g[0]])
