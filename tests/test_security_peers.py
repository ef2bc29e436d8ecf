"""Lying and hogging peers are bounded (issue 9, findings 4 and 7).

Pure parts first (the peer table's retry `Schedule` with a fake clock), then real
attacks on real agents: separate `hfswarm agent` processes on loopback, the project's
mirror serving a generated repo, and the attacker as a server or mDNS responder here."""

from __future__ import annotations

import itertools
import random

from peer.discovery.peer_table import RetryPolicy, Schedule

A = ("127.0.0.9", 7851)
POLICY = RetryPolicy()


def schedule() -> Schedule:
    return Schedule(POLICY, random.Random(1))


def run_failing(s: Schedule, key: tuple[str, int], until: float) -> list[float]:
    """Check `key` whenever due and fail it, up to `until`: the times it was tried."""
    tried: list[float] = []
    now = 0.0
    while now <= until and key in s:
        if key in s.due(now):
            tried.append(now)
            s.failed(key, now)
        now += 0.5
    return tried


def test_a_failing_candidate_backs_off_exponentially_with_jitter_up_to_the_cap() -> None:
    s = schedule()
    assert s.offer(A, "static", 0.0)
    tried = run_failing(s, A, 3600.0)
    gaps = [b - a for a, b in itertools.pairwise(tried)]
    # 5, 10, 20, 40 ... s (each +-20 %), never more than the cap (+ jitter).
    for i, gap in enumerate(gaps[:5]):
        expected = POLICY.first_retry * 2**i
        assert expected * 0.75 <= gap <= expected * 1.25 + 0.5, (i, gaps)
    assert max(gaps) <= POLICY.max_backoff * 1.2 + 0.5
    assert len(tried) < 20, tried  # an hour: a handful of tries, not 720
    assert A in s  # static: backed off, never dropped


def test_jitter_spreads_agents_apart() -> None:
    dues = set()
    for seed in range(10):
        s = Schedule(POLICY, random.Random(seed))
        s.offer(A, "tracker", 0.0)
        s.failed(A, 0.0)
        s.failed(A, 1.0)
        dues.add(round(s.next_due() or 0.0, 3))
    assert len(dues) > 5


def test_discovered_candidates_that_keep_failing_are_dropped_and_stay_backed_off() -> None:
    for source in ("tracker", "mdns"):
        s = schedule()
        s.offer(A, source, 0.0)
        tried = run_failing(s, A, 3600.0)
        assert A not in s, source
        assert tried[-1] >= POLICY.drop_after
        # Offered again (the tracker still names it): no fresh start, no check now.
        assert not s.offer(A, source, tried[-1] + 1)
        assert A in s and A not in s.due(tried[-1] + 1)
        assert s.failures(A) == len(tried)


def test_a_success_resets_the_backoff() -> None:
    s = schedule()
    s.offer(A, "tracker", 0.0)
    for t in (0.0, 6.0, 17.0):
        s.failed(A, t)
    s.succeeded(A, 40.0)
    assert s.failures(A) == 0
    assert s.next_due() == 40.0 + POLICY.interval


def test_a_goodbye_means_check_now_and_only_a_failed_check_removes() -> None:
    s = schedule()
    s.offer(A, "mdns", 0.0)
    s.succeeded(A, 0.0)
    s.goodbye(A, 2.0)
    assert s.due(2.0) == [A]
    s.succeeded(A, 2.0)  # it answers: kept, and looked at again soon after
    assert A in s and s.next_due() == 3.0
    s.succeeded(A, 3.0)
    s.succeeded(A, 5.0)
    assert s.next_due() == 5.0 + POLICY.interval  # back to normal
    s.goodbye(A, 20.0)
    assert s.failed(A, 20.0) == "drop" and A not in s
    # A clean exit is not held against it: back on the same address, it is new.
    assert s.offer(A, "mdns", 30.0)


def test_a_static_peer_that_says_goodbye_and_is_gone_is_kept_as_a_candidate() -> None:
    s = schedule()
    s.offer(A, "static", 0.0)
    s.goodbye(A, 1.0)
    assert s.failed(A, 1.0) == "goodbye" and A in s
