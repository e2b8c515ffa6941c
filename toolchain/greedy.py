"""The one allocator both budgeted decisions run: a marginal-ratio greedy (NetAdapt's; HALP's greedy form).

    met = greedy(moves, take, done)

Both decisions choose per item under a constraint, trading what the constraint needs against an
objective, and neither is separable enough for an exact knapsack (a pruned layer's cost depends on
its neighbours' widths; a float block's accuracy effect on the blocks around it):
- `prune.budget` (prune/costmodel.allocate): items are dependency groups; a move takes one
  alignment step of channels off a group; gain = predicted cost saved (latency, MACs, bytes),
  price = channel importance lost; done = the predicted cost meets the target.
- the `auto` INT8 candidate (onnx/sensitivity.BlockSearch): items are quantizable blocks; a move
  keeps one block in float; gain = its sensitivity (the logits divergence it removes), price = its
  measured latency cost; done = validation accuracy within max_accuracy_drop (measured after each move).
Each step asks for the moves again (a move's gain and price may depend on what was taken), takes
the one with the least price per unit of gain, and stops when `done` holds. A free move (price <= 0:
no importance lost, a float kernel that is not slower) goes first, the largest gain first; a move
that gains nothing is never taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Tuple, TypeVar

K = TypeVar("K")


@dataclass(frozen=True)
class Move(Generic[K]):
    key: K  # what `take` applies (a (group, kept) step; a block)
    gain: float  # progress toward the constraint
    price: float  # what it costs the objective


def order(move: Move) -> Tuple[int, float]:
    """Sort key, smallest first: free moves by gain (largest first), then price per unit of gain."""
    if move.price <= 0:
        return (0, -move.gain)
    return (1, move.price / move.gain)


def greedy(moves: Callable[[], Iterable[Move[K]]], take: Callable[[Move[K]], None], done: Callable[[], bool]) -> bool:
    """Take the best move until `done()`; True when it holds, False when no move with a gain is left."""
    while not done():
        useful = [m for m in moves() if m.gain > 0]
        if not useful:
            return False
        take(min(useful, key=order))
    return True
