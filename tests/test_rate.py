"""The token bucket behind every rate cap (`peer.transfer.rate`), on a fake clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from peer.transfer.rate import MIN_BURST, Throttle, TokenBucket

MB = 1_000_000


def drain(bucket: TokenBucket, rate_chunks: int, chunk: int, start: float = 0.0) -> float:
    """Take `rate_chunks` chunks back to back, each when the bucket lets it; the time
    the last one may move."""
    now = start
    for _ in range(rate_chunks):
        now += bucket.reserve(chunk, now)
    return now


def test_no_rate_never_waits() -> None:
    bucket = TokenBucket(0)
    assert drain(bucket, 1000, 10 * MB) == 0.0


def test_sustained_rate_is_the_cap() -> None:
    bucket = TokenBucket(20 * MB)
    # 200 MB at 20 MB/s: 10 s, less the initial burst (0.1 s of the rate)
    end = drain(bucket, 200, MB)
    assert end == pytest.approx(10.0 - 0.1, abs=0.06)


def test_takers_share_one_bucket() -> None:
    bucket = TokenBucket(10 * MB)
    now = 0.0
    waits = []
    for _ in range(10):  # two streams alternating, 1 MB each, taken at the same instant
        waits.append(bucket.reserve(MB, now))
    # they queue: the last waits for all ten (minus the burst)
    assert waits == sorted(waits)
    assert waits[-1] == pytest.approx(1.0 - 0.1, abs=1e-9)


def test_idle_bucket_holds_only_a_small_burst() -> None:
    bucket = TokenBucket(10 * MB)
    assert bucket.reserve(2 * MB, 0.0) == pytest.approx(0.1)  # 2 MB: 1 MB over the burst
    # an hour idle: still only the burst
    assert bucket.reserve(bucket.burst, 3600.0) == 0.0
    assert bucket.reserve(MB, 3600.0) == pytest.approx(0.1)


def test_min_burst_for_slow_rates() -> None:
    bucket = TokenBucket(1000)
    assert bucket.burst == MIN_BURST
    assert bucket.reserve(MIN_BURST, 0.0) == 0.0
    assert bucket.reserve(1000, 0.0) == pytest.approx(1.0)


def test_rate_changes_live() -> None:
    bucket = TokenBucket(20 * MB)
    t = drain(bucket, 100, MB)  # ~5 s at 20 MB/s
    assert t == pytest.approx(4.9, abs=0.06)
    bucket.set_rate(40 * MB, t)
    t2 = drain(bucket, 100, MB, start=t)
    assert t2 - t == pytest.approx(2.5, abs=0.06)  # the same 100 MB twice as fast
    bucket.set_rate(0, t2)  # no cap: nothing waits any more
    assert bucket.reserve(10**9, t2) == 0.0
    bucket.set_rate(5 * MB, t2)
    t3 = drain(bucket, 10, MB, start=t2)
    assert t3 - t2 == pytest.approx(2.0, abs=1e-6)  # a returning cap starts with no burst


def test_lower_rate_applies_to_debt_at_once() -> None:
    bucket = TokenBucket(100 * MB)
    bucket.reserve(50 * MB, 0.0)  # 40 MB of debt past the 10 MB burst
    bucket.set_rate(10 * MB, 0.0)
    assert bucket.reserve(1, 0.0) == pytest.approx(4.0, abs=1e-6)  # 40 MB at 10 MB/s


def test_waiting_tickets_follow_a_new_rate() -> None:
    bucket = TokenBucket(10 * MB)
    first = bucket.ticket(10 * MB, 0.0)
    second = bucket.ticket(10 * MB, 0.0)
    assert bucket.delay(first, 0.0) == pytest.approx(0.9)
    assert bucket.delay(second, 0.0) == pytest.approx(1.9)
    bucket.set_rate(20 * MB, 0.5)  # half a second in: 5 MB let through, 14 MB to go
    assert bucket.delay(first, 0.5) == pytest.approx(0.2)
    assert bucket.delay(second, 0.5) == pytest.approx(0.7)
    bucket.set_rate(0, 0.6)
    assert bucket.delay(second, 0.6) == 0.0


async def test_throttle_wakes_sleepers_when_the_rate_changes() -> None:
    throttle = Throttle(1000)
    await throttle.take(MIN_BURST)  # the burst: at once
    waiter = asyncio.create_task(throttle.take(10_000))  # 10 s at 1000 B/s
    await asyncio.sleep(0.05)
    assert not waiter.done()
    t0 = time.monotonic()
    throttle.set_rate(1_000_000)
    await asyncio.wait_for(waiter, 1.0)
    assert time.monotonic() - t0 < 0.5


def test_negative_rate_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(-1)
