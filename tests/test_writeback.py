"""Starting a file's writeback early (`peer/cache/writeback.py`): a hint the kernel takes
for a regular file, and that never fails a download where it cannot be given.

(Whether the kernel then writes the range is not asserted here: /proc/meminfo's Dirty
moves by gigabytes with whatever else runs on the machine. docs/benchmarks.md 8.20
measures its effect: the fsync before the rename into blobs/.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from peer.cache.writeback import MAX_PENDING, WritebackWorker, writeback_for


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_kernel_takes_the_range_of_a_regular_file(tmp_path: Path) -> None:
    start = writeback_for()
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(4 << 20))
    fd = os.open(path, os.O_RDONLY)  # the hash follower's own read-only fd
    try:
        assert start(fd, 0, 4 << 20)
        assert start(fd, 1 << 20, 1 << 20)
        assert start(fd, 0, 0)  # nothing to do is no failure
    finally:
        os.close(fd)


def test_a_pipe_or_a_closed_fd_is_refused_without_an_exception() -> None:
    start = writeback_for()
    r, w = os.pipe()
    try:
        assert start(r, 0, 10) is False
    finally:
        os.close(r)
        os.close(w)
    assert start(r, 0, 10) is False  # closed meanwhile


def test_the_worker_hands_a_copy_of_the_fd_to_its_thread_and_closes_it(tmp_path: Path) -> None:
    # The hash follower closes its fd right after handing the range on; the worker's
    # thread must still reach the file, then close its copy (no fd leaks), and a
    # closed worker refuses without an exception.
    seen: list[tuple[int, int, int]] = []

    def start(fd: int, offset: int, length: int) -> bool:
        seen.append((os.fstat(fd).st_ino, offset, length))
        return True

    path = tmp_path / "blob"
    path.write_bytes(b"x" * 4096)
    fds_before = len(os.listdir("/proc/self/fd")) if sys.platform.startswith("linux") else 0
    worker = WritebackWorker(start)
    for off in (0, 1024, 2048):
        with open(path, "rb") as f:
            assert worker(f.fileno(), off, 1024)
    worker.close()
    assert seen == [(path.stat().st_ino, off, 1024) for off in (0, 1024, 2048)]
    if sys.platform.startswith("linux"):
        assert len(os.listdir("/proc/self/fd")) == fds_before
    with open(path, "rb") as f:
        assert worker(f.fileno(), 0, 10) is False


def test_behind_a_slow_disk_the_worker_drops_hints_instead_of_holding_fds(tmp_path: Path) -> None:
    """`sync_file_range` waits while the disk's queue is full; the ranges handed on
    meanwhile must not pile up, each with a duplicated fd."""
    import threading

    release = threading.Event()
    started: list[tuple[int, int]] = []

    def slow(fd: int, offset: int, length: int) -> bool:
        started.append((offset, length))
        release.wait(10)
        return True

    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fds_before = len(os.listdir("/proc/self/fd"))
    worker = WritebackWorker(slow)
    with path.open("rb") as f:
        taken = [worker(f.fileno(), i * 4096, 4096) for i in range(5000)]
        held = len(os.listdir("/proc/self/fd")) - fds_before
    assert sum(taken) == MAX_PENDING
    assert held <= MAX_PENDING + 1, held  # the pool's thread may hold one more
    release.set()
    worker.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    assert started[0] == (0, 4096)
