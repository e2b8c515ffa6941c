"""The cost model of `prune.allocation: latency_aware` (issue 31): what a channel-pruned model costs,
from its layers, and the kept channels per dependency group that a budget allows.

    graph = layer_graph(model, example, cfg)              every Conv2d/Linear, and the groups its widths follow
    model = CostModel(graph, layer_cost, constant)        cost(kept) = constant + sum of layer_cost(layer, cin, cout)
    kept = allocate(model, importance(model_, graph, cfg.pruner), target)

Why per layer (HALP's lookup table, NetAdapt's measured table): a network's latency is close to the
sum of its convolutions' latencies, each a function of its two widths; pruning a group changes the
output width of its own layers and the input width of the layers after them. So a table of single
layers, timed with onnxruntime at a few widths each, predicts any allocation without exporting it:
- latency: each layer whose widths can change is timed (bench/latency_table.py: the same code runs on
  the device, torch-free) at the narrowest, a middle and the full width of each of its varying widths
  (all multiples of the group's step; a depthwise conv, whose one width is both, at five), and costs in
  between are interpolated bilinearly: exact for times of the form a + b*cin + c*cout + d*cin*cout,
  the shape of an im2col/GEMM convolution. `constant` is what the sum of layers misses of the whole
  model (the other ops, the session's own overhead), calibrated on the measured unpruned student;
- macs, params, file_bytes: counted per layer (conv: k*k*cin/groups*cout per output pixel; a float
  file holds 4 bytes per parameter), `constant` again calibrated on the student.

Input widths come from the traced graph (dependency.structure): a layer's input is the sum of its parent
groups' widths (several through a concat, one through an add), times a flatten factor (a Linear after a
spatial flatten). A layer whose input width cannot be derived that way is costed at its full input width
and listed in `graph.unmodelled` (the verification measures the real model either way).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..greedy import Move, greedy
from .dependency import structure, target_groups
from .pinned import pinned_layers
from .targets import in_channels, out_channels, select_targets


@dataclass(frozen=True)
class Group:
    members: Tuple[str, ...]
    full: int
    step: int  # kept counts are multiples of this (align, and a grouped conv's block count)
    least: int = 0  # the narrowest kept count allowed (prune.min_keep, a multiple of step); 0: step

    @property
    def name(self) -> str:
        return self.members[0]

    def options(self) -> List[int]:
        """Kept counts, ascending: the multiples of step from `least` (or step) below full, and full."""
        return list(range(max(self.least, self.step), self.full, self.step)) + [self.full]


@dataclass(frozen=True)
class Layer:
    name: str
    op: str  # conv / linear
    cin: int  # full widths
    cout: int
    out_group: Optional[int]  # the group whose kept count is this layer's output width (None: fixed)
    in_groups: Tuple[int, ...]  # the groups whose kept counts sum to the input width
    in_fixed: int  # input channels from parents that are not pruned
    in_scale: int  # input width = in_scale * (in_fixed + sum of in_groups' kept)
    groups: int = 1
    depthwise: bool = False
    height: int = 1  # input spatial size (conv)
    width: int = 1
    kernel: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    out_pixels: int = 1
    out_params: int = 0  # parameters per output channel besides the weights: bias, a following norm's affine

    def widths(self, kept: Sequence[int]) -> Tuple[int, int]:
        cin = self.in_scale * (self.in_fixed + sum(kept[g] for g in self.in_groups)) if self.in_groups else self.cin
        cout = kept[self.out_group] if self.out_group is not None else self.cout
        return cin, cout

    def spec(self, cin: int, cout: int) -> Dict:
        """The layer at these widths, as bench/latency_table.py times it."""
        if self.op == "linear":
            return {"op": "linear", "cin": cin, "cout": cout}
        return {
            "op": "conv",
            "cin": cin,
            "cout": cout,
            "height": self.height,
            "width": self.width,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": cout if self.depthwise else self.groups,
        }

    def params(self, cin: int, cout: int) -> int:
        groups = cout if self.depthwise else self.groups
        return self.kernel[0] * self.kernel[1] * (cin // groups) * cout + self.out_params * cout

    def macs(self, cin: int, cout: int) -> int:
        groups = cout if self.depthwise else self.groups
        return self.out_pixels * self.kernel[0] * self.kernel[1] * (cin // groups) * cout


@dataclass
class LayerGraph:
    groups: List[Group]
    layers: List[Layer]  # only those whose cost can change
    unmodelled: List[str] = field(default_factory=list)

    def full(self) -> List[int]:
        return [g.full for g in self.groups]

    def narrowest(self) -> List[int]:
        return [g.options()[0] for g in self.groups]

    def touching(self) -> List[List[int]]:
        """Per group, the indices of the layers whose widths follow it."""
        out: List[List[int]] = [[] for _ in self.groups]
        for i, layer in enumerate(self.layers):
            for g in {layer.out_group, *layer.in_groups} - {None}:
                out[g].append(i)
        return out


# ---------------------------------------------------------------- the graph


def layer_graph(model: nn.Module, example: torch.Tensor, cfg) -> LayerGraph:
    """The groups the recipe prunes (as prune_model forms them) and every layer whose widths follow one."""
    targets = select_targets(model, cfg.op_types, cfg.exclude, False)
    pinned = set(pinned_layers(model))
    targets = {n: m for n, m in targets.items() if n not in pinned}
    sets, blocks, parents = structure(model, example)
    members, group_blocks = (
        target_groups(sets, blocks, targets) if cfg.dependency_aware else ([[n] for n in targets], {})
    )
    groups = []
    for names in members:
        full = out_channels(targets[names[0]])
        step = math.lcm(cfg.align, *(group_blocks.get(n, 1) for n in names))
        if full > cfg.align:  # the engines leave a layer of align channels or fewer alone
            groups.append(Group(tuple(names), full, step, _least(full, step, cfg.min_keep)))
    group_of = {n: i for i, g in enumerate(groups) for n in g.members}
    set_of = {n: i for i, s in enumerate(sets) for n in s}
    shapes, norms = _input_shapes(model, example[:1])
    graph = LayerGraph(groups, [])
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name in shapes:
            layer = _layer(name, module, shapes[name], parents.get(name, []), group_of, set_of, model, graph)
            if layer is not None:
                bias = 1 if getattr(module, "bias", None) is not None else 0
                graph.layers.append(replace(layer, out_params=bias + norms.get(name, 0)))
    return graph


def _least(full: int, step: int, min_keep: Optional[float]) -> int:
    """The floor prune.min_keep puts on a group: that fraction of its channels, rounded up to the step."""
    return 0 if not min_keep else min(full, math.ceil(min_keep * full / step) * step)


NORMS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.InstanceNorm2d)


def _input_shapes(model: nn.Module, example: torch.Tensor) -> Tuple[Dict[str, Tuple], Dict[str, int]]:
    """Each Conv2d/Linear's input and output shapes, and the affine parameters per channel of a norm
    layer that runs right after it on its channels (they are pruned with its outputs)."""
    shapes, norms, hooks, last = {}, {}, [], [None]

    def record(name):
        def hook(module, inputs, output) -> None:  # None: the output is left as it is
            if isinstance(module, NORMS):
                if last[0] and shapes[last[0]][1][1] == output.shape[1]:
                    norms[last[0]] = sum(p.numel() for p in module.parameters(recurse=False)) // output.shape[1]
                last[0] = None
                return
            shapes.setdefault(name, (inputs[0].shape, output.shape))
            last[0] = name

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, *NORMS)):
            hooks.append(module.register_forward_hook(record(name)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return shapes, norms


def _layer(name, module, shapes, parents, group_of, set_of, model, graph) -> Optional[Layer]:
    out_group = group_of.get(name)
    in_groups, fixed = set(), {}
    for p in parents:  # one width per coupled set: an add's inputs are one set
        if p in group_of:
            in_groups.add(group_of[p])
        else:
            fixed[set_of.get(p, p)] = out_channels(model.get_submodule(p))
    cin, cout = in_channels(module), out_channels(module)
    total = sum(fixed.values()) + sum(graph.groups[g].full for g in in_groups)
    if in_groups and (total == 0 or cin % total):
        graph.unmodelled.append(name)  # an op between the parents and this layer the sum does not describe
        in_groups = set()
    if out_group is None and not in_groups:
        return None  # its cost never changes: part of the constant
    base = dict(
        name=name,
        cin=cin,
        cout=cout,
        out_group=out_group,
        in_groups=tuple(sorted(in_groups)),
        in_fixed=sum(fixed.values()),
        in_scale=cin // total if in_groups else 1,
    )
    if isinstance(module, nn.Linear):
        return Layer(op="linear", **base)
    (_, _, h, w), out = shapes
    return Layer(
        op="conv",
        groups=module.groups,
        depthwise=module.groups > 1 and module.groups == cin == cout,
        height=int(h),
        width=int(w),
        kernel=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=tuple(module.padding) if not isinstance(module.padding, str) else (0, 0),
        dilation=tuple(module.dilation),
        out_pixels=int(out[2] * out[3]),
        **base,
    )


# ---------------------------------------------------------------- layer costs


def _spread(options: List[int], n: int) -> List[int]:
    """n options spread from the first to the last (the ends always included)."""
    if len(options) <= n:
        return options
    return sorted({options[round(i * (len(options) - 1) / (n - 1))] for i in range(n)})


def sample_widths(graph: LayerGraph, layer: Layer) -> Tuple[List[int], List[int]]:
    """The input and output widths a layer is timed at (the table's grid for it)."""
    steps = [graph.groups[g] for g in layer.in_groups]
    if layer.depthwise:
        widths = _spread(graph.groups[layer.out_group].options(), 5) if layer.out_group is not None else [layer.cout]
        return widths, widths
    if layer.out_group is not None:
        couts = _spread(graph.groups[layer.out_group].options(), 3)
    else:
        couts = [layer.cout]
    if steps:
        spreads = [_spread(g.options(), 3) for g in steps]  # narrowest, middle, full of each input group
        cins = sorted(
            {layer.in_scale * (layer.in_fixed + sum(w[min(i, len(w) - 1)] for w in spreads)) for i in range(3)}
        )
    else:
        cins = [layer.cin]
    return cins, couts


def table_spec(graph: LayerGraph, batch_size: int, threads: int) -> Dict:
    """The layer shapes to time (bench/latency_table.py's spec), deduplicated there by shape."""
    layers = []
    for layer in graph.layers:
        cins, couts = sample_widths(graph, layer)
        pairs = zip(cins, couts) if layer.depthwise else ((i, o) for i in cins for o in couts)
        layers += [{"name": layer.name, **layer.spec(i, o)} for i, o in pairs]
    return {"version": 1, "batch_size": batch_size, "threads": threads, "layers": layers}


def _interp(xs: List[int], x: float) -> Tuple[int, int, float]:
    """Bracketing indices in ascending xs and the weight of the upper one (clamped at the ends)."""
    if len(xs) == 1:
        return 0, 0, 0.0
    j = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    t = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
    return j - 1, j, min(max(t, 0.0), 1.0)


class TableCost:
    """A layer's time at any widths, interpolated from its timed grid (see the module doc)."""

    def __init__(self, graph: LayerGraph, lookup: Callable[[Dict], float]):
        self.grids = {}
        for layer in graph.layers:
            cins, couts = sample_widths(graph, layer)
            if layer.depthwise:
                values = np.array([[lookup(layer.spec(c, c)) for c in couts]])
            else:
                values = np.array([[lookup(layer.spec(i, o)) for o in couts] for i in cins])
            self.grids[layer.name] = (cins, couts, values)

    def __call__(self, layer: Layer, cin: int, cout: int) -> float:
        cins, couts, v = self.grids[layer.name]
        if layer.depthwise:
            a, b, t = _interp(couts, cout)
            return float(v[0, a] * (1 - t) + v[0, b] * t)
        i0, i1, s = _interp(cins, cin)
        o0, o1, t = _interp(couts, cout)
        return float(
            v[i0, o0] * (1 - s) * (1 - t) + v[i1, o0] * s * (1 - t) + v[i0, o1] * (1 - s) * t + v[i1, o1] * s * t
        )


def count_cost(kind: str) -> Callable[[Layer, int, int], float]:
    if kind == "macs":
        return lambda layer, cin, cout: float(layer.macs(cin, cout))
    if kind == "params":
        return lambda layer, cin, cout: float(layer.params(cin, cout))
    if kind == "file_bytes_int8":  # int8 weights; an int32 bias per output channel (a norm folds into it)
        return lambda layer, cin, cout: float(layer.params(cin, cout) - layer.out_params * cout) + 4.0 * cout
    return lambda layer, cin, cout: 4.0 * layer.params(cin, cout)  # file_bytes: float32 weights


class CostModel:
    def __init__(self, graph: LayerGraph, layer_cost: Callable[[Layer, int, int], float], constant: float = 0.0):
        self.graph, self.layer_cost, self.constant = graph, layer_cost, constant
        self._touching = graph.touching()

    def layers_cost(self, kept: Sequence[int]) -> float:
        return sum(self.layer_cost(layer, *layer.widths(kept)) for layer in self.graph.layers)

    def cost(self, kept: Sequence[int]) -> float:
        return self.constant + self.layers_cost(kept)

    def calibrate(self, measured_full: float) -> None:
        """The constant that makes the unpruned model's prediction its measurement."""
        self.constant = measured_full - self.layers_cost(self.graph.full())

    def delta(self, kept: List[int], group: int, to: int) -> float:
        """Cost change when `group` goes from its kept count to `to` (only the layers that follow it)."""
        layers = [self.graph.layers[i] for i in self._touching[group]]
        before = sum(self.layer_cost(layer, *layer.widths(kept)) for layer in layers)
        old, kept[group] = kept[group], to
        after = sum(self.layer_cost(layer, *layer.widths(kept)) for layer in layers)
        kept[group] = old
        return after - before


# ---------------------------------------------------------------- importance and allocation


def importance(model: nn.Module, graph: LayerGraph, pruner: str, gradients=None) -> List[np.ndarray]:
    """Per group, its channels' scores in descending order.
    - l1/l2 (fpgm: l2): norms of each member's filters, each member's norms divided by their mean
      (layers differ in scale by their fan-in; a group's scores then average 1 per channel),
      averaged over the members;
    - taylor (with `gradients`, the stage's GradientSource): sum over the members and the batches of
      (weight x gradient)^2 per output channel, an estimate of the loss change, comparable across
      layers as it is (Molchanov et al. 2019; HALP's importance)."""
    if pruner == "taylor" and gradients is not None:
        return _taylor(model, graph, gradients)
    p = 1 if pruner == "l1" else 2
    out = []
    for group in graph.groups:
        scores = np.zeros(group.full)
        for name in group.members:
            w = model.get_submodule(name).weight.detach().float().flatten(1)
            norms = w.abs().sum(1) if p == 1 else w.pow(2).sum(1).sqrt()
            scores += (norms / norms.mean().clamp_min(1e-12)).cpu().numpy()
        out.append(np.sort(scores / len(group.members))[::-1])
    return out


def _taylor(model: nn.Module, graph: LayerGraph, gradients) -> List[np.ndarray]:
    weights = {n: model.get_submodule(n).weight for g in graph.groups for n in g.members}
    totals = {n: torch.zeros(w.shape[0]) for n, w in weights.items()}
    was, device = model.training, next(model.parameters()).device
    model.eval()  # BN keeps its running statistics; gradients flow either way
    try:
        done = 0
        while done < gradients.steps:
            for x, y in gradients.batches:
                model.zero_grad(set_to_none=True)
                gradients.loss(model, x.to(device), y.to(device)).backward()
                for n, w in weights.items():
                    totals[n] += (w.detach() * w.grad).float().pow(2).flatten(1).sum(1).cpu()
                done += 1
                if done >= gradients.steps:
                    break
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return [np.sort(sum(totals[n] for n in g.members).numpy())[::-1] for g in graph.groups]


def allocate(model: CostModel, scores: List[np.ndarray], target: float) -> Optional[List[int]]:
    """Kept channels per group whose predicted cost is at most `target`, or None if even the narrowest
    allocation costs more. The shared greedy (toolchain/greedy.py) on the cost model: from full width,
    repeatedly take one step off the group that loses the least importance per unit of cost saved (its
    next lowest-scored channels), until the prediction meets the target. Exact costs, no separability
    assumed: each step re-prices the layers the group touches at the current widths of their other groups."""
    kept = model.graph.full()
    cost = [model.cost(kept)]
    cumulative = [np.concatenate([[0.0], np.cumsum(s)]) for s in scores]

    def moves():
        for g, group in enumerate(model.graph.groups):
            # the next narrower option that saves anything: a measured table is not monotone
            # everywhere (a kernel's tile boundary, noise), so a step that saves nothing is jumped
            for to in reversed([k for k in group.options() if k < kept[g]]):
                saved = -model.delta(kept, g, to)
                if saved > 0:
                    yield Move((g, to), saved, cumulative[g][kept[g]] - cumulative[g][to])
                    break

    def take(move: Move) -> None:
        g, to = move.key
        kept[g] = to
        cost[0] -= move.gain

    return kept if greedy(moves, take, lambda: cost[0] <= target) else None
