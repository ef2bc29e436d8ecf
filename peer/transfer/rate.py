"""A token bucket shared by every stream it caps, its rate changed while they run.

The core (`TokenBucket.reserve`) is pure: it is told the time and answers how long a
taker of `n` bytes must wait. Takers queue by going into debt: each reservation moves the
bucket's level down, so the next one waits behind it, and the streams sharing a bucket
share its rate. `Throttle` is the asyncio side: ``await throttle.take(n)`` sleeps as long
as the bucket says; a rate of 0 means no cap (no wait, no bookkeeping).

    bucket = TokenBucket(rate=20_000_000)
    throttle = Throttle(bucket)
    await throttle.take(len(chunk))   # after (or before) moving the chunk
    throttle.set_rate(40_000_000)     # live: the next reservations use it
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# Bytes a bucket may hold when idle: a fraction of a second of its rate, so a stream
# starting after a pause gets a small burst, not a second's worth.
BURST_SECONDS = 0.1
MIN_BURST = 64 * 1024


class TokenBucket:
    """Pure: `now` is always passed in (seconds, monotonic)."""

    def __init__(self, rate: int = 0, now: float = 0.0) -> None:
        if rate < 0:
            raise ValueError("a rate is 0 (none) or more bytes per second")
        self.rate = rate
        self._level = float(self.burst)
        self._at = now

    @property
    def burst(self) -> int:
        return max(MIN_BURST, int(self.rate * BURST_SECONDS))

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._level = min(float(self.burst), self._level + (now - self._at) * self.rate)
            self._at = now

    def reserve(self, n: int, now: float) -> float:
        """Take `n` bytes; the seconds to wait before they may move (0: at once)."""
        if self.rate <= 0 or n <= 0:
            return 0.0
        self._refill(now)
        self._level -= n
        return 0.0 if self._level >= 0 else -self._level / self.rate

    def set_rate(self, rate: int, now: float) -> None:
        """A new rate from `now` on; debt already taken is repaid at the new rate (a
        lower cap takes effect at once instead of after the old debt)."""
        if rate < 0:
            raise ValueError("a rate is 0 (none) or more bytes per second")
        self._refill(now)
        self.rate = rate
        self._level = float(self.burst) if rate == 0 else min(self._level, float(self.burst))


class Throttle:
    """A `TokenBucket` for asyncio streams (the clock is injectable for tests)."""

    def __init__(self, rate: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.bucket = TokenBucket(rate, clock())

    @property
    def rate(self) -> int:
        return self.bucket.rate

    def set_rate(self, rate: int) -> None:
        self.bucket.set_rate(rate, self._clock())

    async def take(self, n: int) -> None:
        if self.bucket.rate <= 0:
            return
        delay = self.bucket.reserve(n, self._clock())
        if delay > 0:
            await asyncio.sleep(delay)
