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

from peer.cache.writeback import writeback_for


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
