"""Logging that an attacker cannot turn into a disk filler: identical messages (same
logger, level and first line) pass once per interval; the next one that passes after
the interval says how many were held back.

    install_repeat_filter(logging.getLogger())

This also catches asyncio's "socket.accept() out of system resource" (EMFILE), which
asyncio logs with a traceback on every accept attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Seen:
    since: float  # when the last message of this kind passed
    held: int = 0  # how many were held back since


class RepeatLimiter:
    """The pure core: `admit(key, now)` -> None (drop) or the count of repeats held
    back since the last one passed (0: nothing to report)."""

    def __init__(self, interval: float, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._seen: dict[tuple[str, int, str], _Seen] = {}

    def admit(self, key: tuple[str, int, str], now: float) -> int | None:
        seen = self._seen.get(key)
        if seen is not None and now - seen.since < self.interval:
            seen.held += 1
            return None
        if seen is None and len(self._seen) >= self.max_keys:
            # Many distinct messages: forget the stale ones (they would pass anyway).
            self._seen = {k: s for k, s in self._seen.items() if now - s.since < self.interval}
            if len(self._seen) >= self.max_keys:
                self._seen.pop(next(iter(self._seen)))
        held = seen.held if seen is not None else 0
        self._seen[key] = _Seen(now)
        return held


class RepeatFilter(logging.Filter):
    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._limiter = RepeatLimiter(interval)
        self._clock = clock

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string: let the handler report it
            return True
        first = text.split("\n", 1)[0][:300]
        held = self._limiter.admit((record.name, record.levelno, first), self._clock())
        if held is None:
            return False
        if held:
            record.msg = f"{text} [{held} identical messages held back in the last " + (
                f"{self._limiter.interval:.0f} s]"
            )
            record.args = None
        return True


def install_repeat_filter(logger: logging.Logger, interval: float = 10.0) -> None:
    """On every handler of `logger` (filters on handlers see records of child loggers
    too, which filters on the logger itself do not)."""
    f = RepeatFilter(interval)
    for handler in logger.handlers:
        handler.addFilter(f)
