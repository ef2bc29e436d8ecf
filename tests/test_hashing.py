"""The whole-file hash of a file written piece by piece out of order, read once as its
final prefix grows (`PrefixHasher`, behind every swarm download)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from peer.verification import hashing
from peer.verification.hashing import PrefixHasher, hash_file

PIECE = 64 * 1024


def test_following_the_prefix_of_out_of_order_pieces_gives_the_whole_file_hash(
    tmp_path: Path,
) -> None:
    data = random.Random(1).randbytes(40 * PIECE + 123)
    blob = hashlib.sha256(data).hexdigest()
    path = tmp_path / blob
    follower = PrefixHasher(path, blob, len(data))
    # A writer that lands pieces out of order; the follower is told each prefix.
    n = -(-len(data) // PIECE)
    order = list(range(n))
    random.Random(2).shuffle(order)
    have, prefix, seen = [False] * n, 0, []
    with open(path, "wb") as f:
        f.truncate(len(data))
        for i in order:
            f.seek(i * PIECE)
            f.write(data[i * PIECE : (i + 1) * PIECE])
            f.flush()
            have[i] = True
            while prefix < n and have[prefix]:
                prefix += 1
            follower.hash_to(prefix * PIECE)
            seen.append(follower.position)
    assert seen == sorted(seen) and 0 < seen[len(seen) // 2]  # it read as it went
    v = follower.verdict()
    assert v.ok and v.actual == blob and v.size == len(data)
    assert hash_file(path, blob, len(data)).ok


def test_a_git_blob_id_is_followed_too(tmp_path: Path) -> None:
    data = b"hello swarm\n" * 10_000
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
    path = tmp_path / "f"
    path.write_bytes(data)
    follower = PrefixHasher(path, blob, len(data))
    follower.hash_to(50_000)
    follower.hash_to(20_000)  # behind: nothing to do, nothing read twice
    assert follower.position == 50_000
    assert follower.verdict().ok


def test_a_wrong_byte_a_short_file_and_a_longer_file_all_fail(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(10 * PIECE)
    blob = hashlib.sha256(data).hexdigest()
    path = tmp_path / "f"
    bad = bytearray(data)
    bad[7 * PIECE + 5] ^= 1
    path.write_bytes(bytes(bad))
    v = PrefixHasher(path, blob, len(data)).verdict()
    assert not v.ok and v.actual != blob
    path.write_bytes(data[:-10])
    short = PrefixHasher(path, blob, len(data))
    short.hash_to(len(data))
    assert short.position == len(data) - 10 and not short.verdict().ok
    path.write_bytes(data + b"x")
    assert not PrefixHasher(path, blob, len(data)).verdict().ok


def test_each_hashed_range_is_handed_on_once_in_order(tmp_path: Path) -> None:
    # The swarm download starts each range's writeback there (`peer/cache/writeback.py`):
    # only what the follower read (final bytes), every byte once, nothing past the file.
    data = random.Random(4).randbytes(10 * PIECE + 7)
    blob = hashlib.sha256(data).hexdigest()
    path = tmp_path / "f"
    path.write_bytes(data)
    told: list[tuple[int, int]] = []

    def hashed(fd: int, offset: int, length: int) -> None:
        assert os.path.samestat(os.fstat(fd), path.stat())  # an open fd of the file itself
        told.append((offset, length))

    follower = PrefixHasher(path, blob, len(data), hashed=hashed)
    follower.hash_to(3 * PIECE)
    follower.hash_to(3 * PIECE)  # nothing new read: nothing told
    follower.hash_to(2 * PIECE)
    assert told == [(0, 3 * PIECE)]
    assert follower.verdict().ok
    assert told == [(0, 3 * PIECE), (3 * PIECE, len(data) - 3 * PIECE)]
    path.write_bytes(data[:-100])  # short: only what was there
    told.clear()
    short = PrefixHasher(path, blob, len(data), hashed=hashed)
    assert not short.verdict().ok
    assert told == [(0, len(data) - 100)]


def _bytes_read_by_syscalls() -> int:
    """read()/pread() bytes of this process so far (Linux task I/O accounting)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(
    hashing.FOLLOW_MAP_FLAGS is None or not Path("/proc/self/io").exists(),
    reason="the mapped follower needs MAP_POPULATE (Linux); rchar needs /proc/self/io",
)
def test_the_follower_hashes_the_page_cache_in_place_across_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Through read-only mappings, not copied out with read(): steps that start off the
    # page grid, steps that span several mapping windows, and a short file that is
    # mapped only up to its end (a page past it would kill the process with SIGBUS).
    monkeypatch.setattr(hashing, "FOLLOW_WINDOW", 1 << 20)
    data = random.Random(5).randbytes((8 << 20) + 4321)
    blob = hashlib.sha256(data).hexdigest()
    path = tmp_path / "f"
    path.write_bytes(data)
    path.chmod(0o644)  # only ours to write, whatever the umask: mapped
    told: list[tuple[int, int]] = []
    follower = PrefixHasher(path, blob, len(data), hashed=lambda _fd, o, n: told.append((o, n)))
    before = _bytes_read_by_syscalls()
    for end in (5000, 5001, 3 << 20, (3 << 20) + 4097, (7 << 20) + 1, len(data)):
        follower.hash_to(end)
        assert follower.position == end
    assert _bytes_read_by_syscalls() - before < 1 << 20  # not the 8 MiB: nothing copied out
    assert follower.verdict().ok
    assert [o for o, _ in told] == [0, 5000, 5001, 3 << 20, (3 << 20) + 4097, (7 << 20) + 1]
    assert sum(n for _, n in told) == len(data)
    path.write_bytes(data[: (5 << 20) + 10])
    short = PrefixHasher(path, blob, len(data))
    short.hash_to(len(data))
    assert short.position == (5 << 20) + 10
    assert not short.verdict().ok


@pytest.mark.skipif(
    hashing.FOLLOW_MAP_FLAGS is None or not Path("/proc/self/io").exists(),
    reason="the mapped follower needs MAP_POPULATE (Linux); rchar needs /proc/self/io",
)
def test_a_partial_others_may_write_is_read_not_mapped(tmp_path: Path) -> None:
    # libtorrent creates a partial 0666 less the umask: 0664 under umask 002, so a cache
    # shared through a group folder lets the group shorten it. Mapped, that kills the
    # agent (SIGBUS); read, the hash just comes up short. Only a file no one else may
    # write is mapped.
    data = random.Random(6).randbytes(4 << 20)
    blob = hashlib.sha256(data).hexdigest()
    path = tmp_path / "f"
    path.write_bytes(data)
    for mode, copied in ((0o664, True), (0o646, True), (0o644, False)):
        path.chmod(mode)
        follower = PrefixHasher(path, blob, len(data))
        before = _bytes_read_by_syscalls()
        follower.hash_to(len(data))
        read = _bytes_read_by_syscalls() - before
        assert (read >= len(data)) is copied, (oct(mode), read)
        assert follower.verdict().ok
