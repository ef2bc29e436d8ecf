"""Progress on stderr: bytes, rate, ETA. Silent when quiet or when stderr is not a TTY."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    s = max(0, int(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """Counts bytes as they arrive; draws one line at most a few times a second."""

    def __init__(
        self, total: int, *, files: int, quiet: bool = False, stream: TextIO | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = not quiet and self.stream.isatty()
        self.total = total
        self.files_total = files
        self.files_done = 0
        self.done = 0
        self.fetched = 0  # bytes that crossed the network in this run
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        self._rate = 0.0
        self._rate_mark = (self._t0, 0)
        self._width = 0

    def add(self, n: int, *, fetched: bool = True) -> None:
        self.done += n
        if fetched:
            self.fetched += n
        self._maybe_draw()

    def set(self, done: int, *, fetched: int) -> None:
        """Absolute figures (from an agent's progress events)."""
        self.done = done
        self.fetched = fetched
        self._maybe_draw()

    def file_done(self) -> None:
        self.files_done += 1
        self._maybe_draw(force=True)

    def rate(self) -> float:
        return self._rate

    def _maybe_draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if now - self._rate_mark[0] >= 0.5:
            t, b = self._rate_mark
            inst = (self.fetched - b) / (now - t)
            self._rate = inst if self._rate == 0 else 0.6 * self._rate + 0.4 * inst
            self._rate_mark = (now, self.fetched)
        if not self.enabled or (not force and now - self._last_draw < 0.25):
            return
        self._last_draw = now
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / self._rate if self._rate > 0 else 0
        line = (
            f"{human_bytes(self.done)} / {human_bytes(self.total)} ({pct:4.1f}%)  "
            f"{human_bytes(self._rate)}/s  ETA {human_seconds(eta)}  "
            f"files {self.files_done}/{self.files_total}"
        )
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self._t0
