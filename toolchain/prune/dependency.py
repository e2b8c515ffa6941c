"""Coupled-channel groups: layers whose output channels must be pruned together.

A residual add needs both branches to keep the same channels; a depthwise conv keeps
exactly the channels its input conv keeps; an SE block's scale multiplies the channels
of the conv it gates. NNI's ChannelDependency finds these sets by tracing the model
(torch.jit). Each set becomes one NNI dependency group: the members' filter scores are
averaged and one mask is shared, so speedup can physically remove the channels.
Pruned layer by layer instead, the coupled channels survive as a union of masks and
little is removed (docs/pruning.md has the measurement). A grouped conv (RegNet, ResNeXt)
adds a divisibility rule, found by NNI's GroupDependency: it and the layers feeding it keep
the same number of channels in every group.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from . import nni_compat
from .speedup import eval_mode


def _parent_convs(graph, node) -> List[str]:
    """The nearest Conv2d/ConvTranspose2d/Linear layers above `node`. NNI's own walks (depthwise
    parents, group parents) re-queue shared nodes, which grows exponentially on ShuffleNet's
    chunk/concat chains (hours at 32x32); this one visits each node once. Same parents."""
    parents, seen = [], set()
    queue = [graph.name_to_node[x] for x in graph.find_predecessors(node.unique_name)]
    while queue:
        current = queue.pop(0)
        if current.unique_name in seen:
            continue
        seen.add(current.unique_name)
        if current.op_type in ("Conv2d", "ConvTranspose2d", "Linear"):
            parents.append(current.name)
            continue
        queue += [graph.name_to_node[x] for x in graph.find_predecessors(current.unique_name)]
    return parents


def _dependencies():
    from nni.compression.utils.shape_dependency import ChannelDependency, GroupDependency

    class Channels(ChannelDependency):
        def _depthwise_get_parent(self, node):
            return _parent_convs(self.graph, node)

    class Groups(GroupDependency):
        def _get_parent_convs(self, node):
            return _parent_convs(self.graph, node)

    return Channels, Groups


def coupled_sets(model: nn.Module, example_input: torch.Tensor) -> Tuple[List[set], Dict[str, int]]:
    """NNI's channel-dependency sets over all Conv2d/Linear layers (singletons included), and
    for layers next to grouped convs the number their kept channels must divide into
    (a grouped conv and the layers feeding it lose the same number of channels per group)."""
    sets, blocks, _ = structure(model, example_input)
    return sets, blocks


# The trace's answers for the last few architectures: a budget search prunes fresh copies of one
# student many times (preflight, cost model, every allocation), and each trace costs a torch.jit
# trace plus NNI's graph build (about 1 s for mobilenet_v2 at 32x32 on 2 cores, more at 224).
_STRUCTURES: "OrderedDict[tuple, tuple]" = OrderedDict()
_STRUCTURES_KEPT = 8


def architecture_key(model: nn.Module, example_input: torch.Tensor) -> tuple:
    """What the traced graph depends on, weights aside: every module's class and configuration
    (repr), the plain attributes a forward may branch on (torchvision's use_res_connect, a user
    flag), the hooks registered, and the input's shape and dtype."""
    modules = []
    for name, m in model.named_modules():
        flags = sorted(
            (k, v)
            for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple, type(None)))
        )
        hooks = (len(m._forward_hooks), len(m._forward_pre_hooks))
        modules.append((name, type(m).__module__, type(m).__qualname__, repr(flags), hooks))
    return (repr(model), tuple(modules), tuple(example_input.shape), str(example_input.dtype))


def structure(model: nn.Module, example_input: torch.Tensor) -> Tuple[List[set], Dict[str, int], Dict[str, List[str]]]:
    """coupled_sets' two answers and, from the same trace, each Conv2d/Linear layer's parents: the
    nearest such layers whose outputs make its input (one coupled set through an add, several
    through a concat; none for the first layer). The cost model derives input widths from them.
    Remembered per architecture_key (copies out, so a caller may change what it gets)."""
    key = architecture_key(model, example_input)
    if key not in _STRUCTURES:
        _STRUCTURES[key] = _trace_structure(model, example_input)
        while len(_STRUCTURES) > _STRUCTURES_KEPT:
            _STRUCTURES.popitem(last=False)
    _STRUCTURES.move_to_end(key)
    sets, blocks, parents = _STRUCTURES[key]
    return [set(s) for s in sets], dict(blocks), {name: list(p) for name, p in parents.items()}


def _trace_structure(model: nn.Module, example_input: torch.Tensor) -> tuple:
    nni_compat.import_nni_quietly()
    channels, groups = _dependencies()

    with eval_mode(model), nni_compat.quiet(), torch.no_grad():
        # NNI's own trace runs torch.jit's trace checker (a second and third forward,
        # ~70% of the time); the graph is the same without it.
        traced = torch.jit.trace(model, example_input, strict=False, check_trace=False)
        found = channels(model, example_input, traced_model=traced)
        sets = [set(s) for s in found.dependency_sets]
        blocks = {
            name: int(n) for name, n in groups(model, example_input, traced_model=traced).dependency.items() if n > 1
        }
    graph = found.graph
    parents = {
        name: _parent_convs(graph, graph.name_to_node[name])
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name in graph.name_to_node
    }
    return sets, blocks, parents


def _grouped_convs(model: nn.Module) -> List[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels]


def channel_groups(
    model: nn.Module, example_input: torch.Tensor, targets: Dict[str, nn.Module], aware: bool
) -> Tuple[List[List[str]], Dict[str, int]]:
    """Groups of target layer names to prune with one shared mask, and each grouped-conv
    neighbour's block count (its kept channels split evenly over that many blocks).

    aware=False: every layer alone (NNI's plain per-layer behaviour; grouped convs need the
    dependency analysis, so they are refused). aware=True: a coupled set is pruned only when
    all its members are targets; a set that touches a kept layer (the classifier, an
    excluded one) stays whole, since its channels could not be removed anyway.
    """
    if not aware:
        grouped = _grouped_convs(model)
        if grouped:
            more = f" and {len(grouped) - 1} more" if len(grouped) > 1 else ""
            raise NotImplementedError(
                f"per-layer (dependency_aware: false) pruning of grouped convs ({grouped[0]}{more})"
            )
        return [[name] for name in targets], {}
    return target_groups(*coupled_sets(model, example_input), targets)


def target_groups(
    sets: List[set], blocks: Dict[str, int], targets: Dict[str, nn.Module]
) -> Tuple[List[List[str]], Dict[str, int]]:
    """The coupled sets made only of targets (members in model order), and their block counts."""
    order = {name: i for i, name in enumerate(targets)}
    groups = [sorted(members, key=order.get) for members in sets if members and members <= targets.keys()]
    return sorted(groups, key=lambda g: order[g[0]]), {n: b for n, b in blocks.items() if n in targets}
