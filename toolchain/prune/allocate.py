"""Kept channels per dependency group under a cost budget: HALP's multiple-choice knapsack.

    choice = allocate(groups, budget, resolution=2000) -> Allocation | None

Not what `prune.allocation: latency_aware` runs: that is the greedy on the exact cost model
(costmodel.allocate). This exact knapsack needs costs that add up per group, which a network's are
not (a layer between two pruned groups costs cin x cout); priced per group with its neighbours at
full width it kept less importance than the greedy at the same predicted cost, up to 6% less on
resnet18 at 30% of the MACs, never more than 0.04% more (`python benchmarks/budget.py allocators`,
docs/pruning.md). It stays as that benchmark's comparator.

The problem (HALP's, a multiple-choice knapsack): every group g offers options (kept k, cost
c_g(k), importance I_g(k)), kept counts at multiples of align; choose one option per group so
that sum c_g(k_g) <= budget and sum I_g(k_g) is largest. Costs are what the group adds to the
model's latency (or MACs, or bytes) at that width; I_g(k) is the sum of the group's k highest
channel scores (kept_importance). Solved exactly by dynamic programming over costs rounded UP
to `budget / resolution` (so a chosen set never exceeds the budget in the true costs; with a
coarse resolution it may miss a feasible optimum by at most groups x one bucket of cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence


@dataclass(frozen=True)
class Option:
    kept: int
    cost: float
    importance: float


@dataclass(frozen=True)
class GroupTable:
    name: str
    options: Sequence[Option]


@dataclass(frozen=True)
class Allocation:
    kept: Dict[str, int]  # group name -> kept channels
    cost: float  # sum of the chosen options' true costs (<= the budget)
    importance: float


def kept_importance(scores: Sequence[float], kept: int) -> float:
    """Importance a group keeps with `kept` channels: the sum of its `kept` highest channel scores."""
    return float(sum(sorted((float(s) for s in scores), reverse=True)[:kept]))


def options_from(scores: Sequence[float], costs: Dict[int, float]) -> List[Option]:
    """A group's options from its channel scores and its cost table (kept -> cost)."""
    return [Option(k, float(c), kept_importance(scores, k)) for k, c in sorted(costs.items())]


def allocate(groups: Sequence[GroupTable], budget: float, resolution: int = 2000) -> Optional[Allocation]:
    """The most important choice of one option per group whose total cost is at most `budget`;
    None when even the cheapest options exceed it. See the module doc."""
    if not groups:
        return Allocation({}, 0.0, 0.0)
    if any(not g.options for g in groups):
        raise ValueError(f"group {next(g.name for g in groups if not g.options)} has no options")
    if sum(min(o.cost for o in g.options) for g in groups) > budget:
        return None
    floor = sum(min(o.cost for o in g.options) for g in groups)  # every group pays at least its cheapest option
    spare = budget - floor
    step = spare / resolution if spare > 0 else 1.0
    # units[g][i]: option i's cost above the group's cheapest, in buckets rounded up (never optimistic)
    units = []
    for g in groups:
        cheapest = min(o.cost for o in g.options)
        units.append([0 if o.cost <= cheapest else math.ceil((o.cost - cheapest) / step - 1e-9) for o in g.options])
    cap = resolution if spare > 0 else 0
    NEG = -math.inf
    best = [0.0] + [NEG] * cap  # best[u]: largest importance using exactly u buckets over the groups so far
    picks: List[List[int]] = []
    for g, us in zip(groups, units):
        new, pick = [NEG] * (cap + 1), [-1] * (cap + 1)
        for u, value in enumerate(best):
            if value == NEG:
                continue
            for i, (o, du) in enumerate(zip(g.options, us)):
                v, w = value + o.importance, u + du
                if w <= cap and v > new[w]:
                    new[w], pick[w] = v, i
        best = new
        picks.append(pick)
    u = max(range(cap + 1), key=lambda x: best[x])
    chosen = []
    for g, us, pick in zip(reversed(groups), reversed(units), reversed(picks)):
        i = pick[u]
        chosen.append((g, g.options[i]))
        u -= us[i]
    chosen.reverse()
    return Allocation(
        {g.name: o.kept for g, o in chosen}, sum(o.cost for _, o in chosen), sum(o.importance for _, o in chosen)
    )
