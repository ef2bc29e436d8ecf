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


def _row(s: float, **kw: object) -> dict[str, object]:
    hosts = {f"h{i}": {"s": s, "cpu_s": 1.0 + i} for i in range(1, 9)}
    return {"s": s, "MBps": 168 / s, "cpu_busy": 0.9, "hosts": hosts, "seeder_cpu_s": 2.0, **kw}


def test_report_sets_each_fan_out_row_against_its_own_one_row_round_by_round() -> None:
    from lan_swarm import report

    results = {
        "repo_bytes": 168 * 2**20,
        "params": {"lan_rate": "100mbit"},
        "runs": {
            "one t": [_row(14.0), _row(15.0)],
            "eight t": [_row(28.0, seeder_share=0.2), _row(24.0, seeder_share=0.25)],
            "bare-one t [ss]": [_row(10.0), _row(20.0)],
            "bare-eight t [ss]": [_row(13.0, seeder_share=0.125), _row(30.0, seeder_share=0.1)],
        },
    }
    text = report(results)
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    # medians 26 / 14.5 = 1.79x; per round 28/14, 24/15
    assert "| 1.79x | 2.00, 1.60 | 20%, 25% |" in rows["eight t"]
    # a variant's fan-out row is set against the same variant's 1 -> 1 row
    assert "| 1.43x | 1.30, 1.50 | 12%, 10% |" in rows["bare-eight t [ss]"]
    # host CPU: the median of the 8 hosts (2..9 s), per run
    assert "| 5.5, 5.5 |" in rows["eight t"]
