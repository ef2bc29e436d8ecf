"""benchmarks/lan_swarm.py's round order: every checkout takes every place in turn (a
gain seen with main always in the first place did not hold once the order was mixed;
docs/benchmarks.md 8.15)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from lan_swarm import turned


def test_each_checkout_runs_first_once_every_len_rounds() -> None:
    orders = [turned(range(4), r) for r in range(4)]
    assert orders[0] == [0, 1, 2, 3]
    assert orders[1] == [1, 2, 3, 0]
    for order in orders:
        assert sorted(order) == [0, 1, 2, 3]
    for place in range(4):
        assert sorted(o[place] for o in orders) == [0, 1, 2, 3]
    assert turned(range(4), 5) == orders[1]
    assert turned(range(1), 3) == [0]
