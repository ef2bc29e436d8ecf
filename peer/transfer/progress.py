"""Progress on stderr: bytes, rate, ETA. Silent when quiet or when stderr is not a TTY.

`Progress` draws one line from absolute figures; `ProgressDisplay` feeds it a job's
typed events (`peer.agent.requests`): a download (through an agent, or in this process)
or a publish."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from peer.agent import requests as job


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
    """A job's figures as they come; draws one line at most a few times a second."""

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

    def set(self, done: int, *, fetched: int, files_done: int | None = None) -> None:
        """Absolute figures (from a job's progress events); a file finished draws at once."""
        self.done = done
        self.fetched = fetched
        more_files = files_done is not None and files_done != self.files_done
        if files_done is not None:
            self.files_done = files_done
        self._maybe_draw(force=more_files)

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


class ProgressDisplay:
    """Follows a job's events: the bar starts with `Started`, moves with each `Progress`,
    and is wiped at the end (`close`, also when the job failed)."""

    def __init__(self, *, quiet: bool, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream
        self._bar: Progress | None = None

    def __call__(self, event: job.Event) -> None:
        match event:
            case job.Started(files=files, total=total):
                self.close()
                self._bar = Progress(total, files=files, quiet=self.quiet, stream=self.stream)
            case job.Progress() if self._bar is not None:
                self._bar.set(event.done, fetched=event.fetched, files_done=event.files_done)
            case job.Done() | job.Error():
                self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
