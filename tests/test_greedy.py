"""The shared allocator (toolchain/greedy.py): the order it takes moves in, when it stops, and that
both budgeted decisions (prune.budget's cost model, the `auto` INT8 search) run it."""

from __future__ import annotations

import itertools

import pytest

from toolchain.greedy import Move, greedy, order


def test_free_moves_go_first_by_gain_then_price_per_unit_of_gain():
    free_small, free_big = Move("fs", 0.1, -0.01), Move("fb", 5.0, 0.0)
    cheap, dear = Move("c", 4.0, 1.0), Move("d", 1.0, 1.0)  # 0.25 and 1.0 per unit of gain
    ranked = sorted([dear, cheap, free_small, free_big], key=order)
    assert [m.key for m in ranked] == ["fb", "fs", "c", "d"]


def _knapsack(items, need):
    """items: name -> (gain, price). Greedy until the gains taken reach `need`."""
    taken = []

    def moves():
        return (Move(n, g, p) for n, (g, p) in items.items() if n not in taken)

    met = greedy(moves, lambda m: taken.append(m.key), lambda: sum(items[n][0] for n in taken) >= need)
    return met, taken


def test_the_greedy_stops_as_soon_as_done_and_reaches_the_least_price_here():
    items = {"a": (3.0, 3.0), "b": (2.0, 1.0), "c": (2.0, 1.5), "d": (0.0, -1.0)}  # d gains nothing: never taken
    met, taken = _knapsack(items, need=4.0)
    assert met and taken == ["b", "c"]  # 2.5 for a gain of 4; every other set reaching 4 costs more
    best = min(
        sum(items[n][1] for n in s)
        for r in range(1, 4)
        for s in itertools.combinations("abc", r)
        if sum(items[n][0] for n in s) >= 4.0
    )
    assert sum(items[n][1] for n in taken) == best
    assert _knapsack(items, need=0.0) == (True, [])  # already done: nothing taken


def test_the_greedy_reports_a_constraint_it_cannot_meet():
    met, taken = _knapsack({"a": (1.0, 1.0), "b": (1.0, 2.0)}, need=5.0)
    assert not met and taken == ["a", "b"]


def test_the_greedy_asks_for_the_moves_again_after_each_step():
    """Prices that depend on what was taken (a pruned layer's cost follows its neighbours' widths)."""
    taken = []

    def moves():
        price_b = 0.5 if "a" in taken else 10.0
        return [Move(k, 1.0, p) for k, p in (("a", 1.0), ("b", price_b), ("c", 2.0)) if k not in taken]

    assert greedy(moves, lambda m: taken.append(m.key), lambda: len(taken) == 2)
    assert taken == ["a", "b"]  # b became the cheapest once a was taken


@pytest.mark.parametrize("module", ["toolchain.prune.costmodel", "toolchain.onnx.sensitivity"])
def test_both_budgeted_decisions_run_the_shared_greedy(module):
    """The issue asks for one allocator: both callers must go through toolchain.greedy.greedy."""
    import importlib

    mod = importlib.import_module(module)
    assert mod.greedy is greedy
