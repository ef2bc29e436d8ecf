"""Starting the kernel's writeback of a file's final bytes early, so that the fsync
before the rename into ``blobs/`` (`RepoCache.install_blob`) finds little still dirty.

libtorrent never syncs what it writes, and with gigabytes of RAM the kernel leaves it
dirty for up to 30 s (``vm.dirty_expire_centisecs``), so the fsync at the end used to
write the whole blob at once (0.5-0.6 s per GiB at the end of a swarm download here,
loaded; docs/benchmarks.md 8.20). A swarm download's hash
follower reads each final range once (`PrefixHasher`); asking for that range's
writeback right after spreads the writes over the download.

Only a hint: the fsync stays what makes the blob durable. Linux's
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts the writes without waiting for them
and leaves the page cache as it is (seeding and HF_ENDPOINT readers read the same bytes
right after). Elsewhere, or where the call is refused, nothing is done.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["Writeback", "WritebackWorker", "writeback_for"]

# <linux/fs.h>: start writes of the range's dirty pages, do not wait for them.
SYNC_FILE_RANGE_WRITE = 2
# Ranges queued at most (each holds a duplicated fd): behind a slow disk the hint for a
# further range is dropped, not queued; the kernel's own writeback and the fsync do it.
MAX_PENDING = 4

Writeback = Callable[[int, int, int], bool]


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process itself: libc is in it
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def writeback_for() -> Writeback:
    """The writeback starter of this platform (looked up once, by the caller)."""
    fn = _sync_file_range()
    if fn is None:
        return _nothing

    def start(fd: int, offset: int, length: int) -> bool:
        # EINVAL/ESPIPE (not a regular file), EIO, ...: the fsync will say what matters.
        return length <= 0 or fn(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0

    return start


def _nothing(fd: int, offset: int, length: int) -> bool:
    return False


class WritebackWorker:
    """Starts writebacks on a thread of its own: `sync_file_range` waits while the
    disk's request queue is full (10-60 ms per 32-96 MiB here, loaded), and the hash
    follower that hands the ranges on must not wait with it. Call it like a `Writeback`
    (the fd is duplicated: the caller may close its own at once); `close` when done."""

    def __init__(self, start: Writeback | None = None) -> None:
        self._start = start or writeback_for()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writeback")
        self._lock = threading.Lock()
        self._pending = 0

    def __call__(self, fd: int, offset: int, length: int) -> bool:
        if self._start is _nothing:
            return False  # no writeback on this platform: no copy, no thread
        with self._lock:
            if self._pending >= MAX_PENDING:
                return False
            self._pending += 1
        try:
            dup = os.dup(fd)
        except OSError:
            self._done()
            return False
        try:
            self._pool.submit(self._run, dup, offset, length)
        except RuntimeError:  # closed
            os.close(dup)
            self._done()
            return False
        return True

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, fd: int, offset: int, length: int) -> None:
        try:
            self._start(fd, offset, length)
        finally:
            os.close(fd)
            self._done()

    def close(self) -> None:
        """Blocking: waits for the writebacks already asked for (each only starts
        writes), so that every duplicated fd is closed."""
        self._pool.shutdown(wait=True)
