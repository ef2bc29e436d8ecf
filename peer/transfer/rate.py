"""A token bucket shared by every stream it caps, its rate changed while they run.

The core (`TokenBucket`) is pure: it is told the time and answers how long a taker of
`n` bytes must wait. Takers queue: each reservation is a ticket behind the ones before,
so the streams sharing a bucket share its rate, and a new rate applies to the tickets
already waiting. `Throttle` is the asyncio side: ``await throttle.take(n)`` sleeps until
the bucket lets the bytes go; a rate of 0 means no cap (no wait, no bookkeeping).

    bucket = TokenBucket(rate=20_000_000)
    throttle = Throttle(bucket)
    await throttle.take(len(chunk))   # after (or before) moving the chunk
    throttle.set_rate(40_000_000)     # live: the next reservations use it
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

# Bytes a bucket may hold when idle: a fraction of a second of its rate, so a stream
# starting after a pause gets a small burst, not a second's worth.
BURST_SECONDS = 0.1
MIN_BURST = 64 * 1024


class TokenBucket:
    """Pure: `now` is always passed in (seconds, monotonic).

    Counted in bytes since the start: `issued` (reserved by takers) and `allowed` (what
    the rate has let through so far, never more than a burst ahead of `issued`). A
    taker's ticket is the `issued` count after its bytes; it may go once `allowed`
    reaches it, which a new rate moves closer or further at once."""

    def __init__(self, rate: int = 0, now: float = 0.0) -> None:
        if rate < 0:
            raise ValueError("a rate is 0 (none) or more bytes per second")
        self.rate = rate
        self._issued = 0
        self._allowed = float(self.burst)
        self._at = now

    @property
    def burst(self) -> int:
        return max(MIN_BURST, int(self.rate * BURST_SECONDS))

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._allowed += (now - self._at) * self.rate
            self._at = now
        self._allowed = min(self._allowed, float(self._issued + self.burst))

    def ticket(self, n: int, now: float) -> int:
        """Reserve `n` bytes: the ticket to wait for (`delay`)."""
        self._refill(now)
        if self.rate > 0 and n > 0:
            self._issued += n
        return self._issued

    def delay(self, ticket: int, now: float) -> float:
        """Seconds until `ticket` may go at the current rate (0: now)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        return max(0.0, (ticket - self._allowed) / self.rate)

    def reserve(self, n: int, now: float) -> float:
        """Take `n` bytes; the seconds to wait before they may move (0: at once)."""
        return self.delay(self.ticket(n, now), now)

    def set_rate(self, rate: int, now: float) -> None:
        """A new rate from `now` on; bytes already reserved are let through at the new
        rate (a lower cap takes effect at once, not after the old queue)."""
        if rate < 0:
            raise ValueError("a rate is 0 (none) or more bytes per second")
        self._refill(now)
        if rate == 0:  # nothing waits; start afresh when a cap returns
            self._allowed = float(self._issued)
        self.rate = rate
        self._refill(now)


class Throttle:
    """A `TokenBucket` for asyncio streams (the clock is injectable for tests). Takers
    sleep until their ticket comes up, and wake early to look again when the rate
    changes."""

    def __init__(self, rate: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.bucket = TokenBucket(rate, clock())
        self._changed = asyncio.Event()

    @property
    def rate(self) -> int:
        return self.bucket.rate

    def set_rate(self, rate: int) -> None:
        self.bucket.set_rate(rate, self._clock())
        self._changed.set()
        self._changed = asyncio.Event()

    async def take(self, n: int) -> None:
        if self.bucket.rate <= 0:
            return
        ticket = self.bucket.ticket(n, self._clock())
        while (delay := self.bucket.delay(ticket, self._clock())) > 0:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), delay)
