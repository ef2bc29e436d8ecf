"""Content ids as the Hub names them, computed while data streams in.

A blob is named by sha256 (LFS files) or by its git blob sha1 (regular files): the
names of ``blobs/`` in the HF cache. Both are whole-file hashes, so they prove a
finished file, never a single piece; pieces are checked by libtorrent's v2 merkle tree.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

# The id formats are defined once, with the wire formats that carry them.
from tracker.schema import SHA1_RE, SHA256_RE, is_blob_id

__all__ = [
    "SHA1_RE",
    "SHA256_RE",
    "BlobHasher",
    "HashKind",
    "PrefixHasher",
    "Verdict",
    "hash_file",
    "is_blob_id",
]

READ_BLOCK = 8 * 1024 * 1024
# The hash follower's reads: a block that stays in the core's L2 cache (1 MiB here)
# between the copy out of the page cache and the hash. 1 GiB from the page cache cost
# 0.750 CPU s in 512 KiB reads against 0.796 s in 8 MiB ones (median of 7 interleaved
# rounds, loaded machine; docs/benchmarks.md 8.20); 0.60 s of it is the sha256.
FOLLOW_BLOCK = 512 * 1024
# Where the kernel can fill a mapping's page tables at once (Linux, MAP_POPULATE), the
# follower hashes the page cache through a read-only mapping instead: no copy at all.
# 1 GiB from the page cache: 0.651 CPU s mapped against 0.695 s in 512 KiB reads, the
# sha256 alone 0.613 s (median of 7 interleaved rounds; docs/benchmarks.md 8.23). At
# most this much is mapped at once (the follower's steps are 32 MiB).
FOLLOW_MAP_FLAGS = mmap.MAP_SHARED | mmap.MAP_POPULATE if hasattr(mmap, "MAP_POPULATE") else None
FOLLOW_WINDOW = 64 * 1024 * 1024


class HashKind(Enum):
    SHA256 = "sha256"
    GIT_SHA1 = "git-sha1"

    @classmethod
    def of_blob_id(cls, blob_id: str) -> HashKind:
        if SHA256_RE.fullmatch(blob_id):
            return cls.SHA256
        if SHA1_RE.fullmatch(blob_id):
            return cls.GIT_SHA1
        raise ValueError(f"not a blob id (sha256 or git sha1 hex): {blob_id!r}")


class BlobHasher:
    """Incremental hasher for one blob; for git ids the header needs the size up front.

    ``also`` is fed the same bytes, in the same order, right after (the mirror fetch's
    v2 tree: one read of the file for both)."""

    def __init__(
        self, kind: HashKind, size: int, also: Callable[[memoryview], None] | None = None
    ) -> None:
        self.kind = kind
        self.size = size
        self.fed = 0
        self._also = also
        self._h: Any
        if kind is HashKind.SHA256:
            self._h = hashlib.sha256()
        else:
            self._h = hashlib.sha1(usedforsecurity=False)
            self._h.update(b"blob %d\0" % size)

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)
        self.fed += len(data)
        if self._also is not None:
            self._also(memoryview(data))

    def update_alone(self, data: bytes | memoryview) -> None:
        """The whole-file hash only: the caller feeds ``also`` itself (the member
        stream, with the leaves it hashed as the bytes landed)."""
        self._h.update(data)
        self.fed += len(data)

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


@dataclass(frozen=True)
class Verdict:
    ok: bool
    expected: str
    actual: str
    size: int


def hash_file(
    path: Path, blob_id: str, size: int, *, start: int = 0, hasher: BlobHasher | None = None
) -> Verdict:
    """Hash a file (blocking: run it in a thread) and compare with its blob id.

    `hasher`/`start` let a caller finish a hash that already covers ``[0, start)``.
    """
    h = hasher or BlobHasher(HashKind.of_blob_id(blob_id), size)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        buf = bytearray(READ_BLOCK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    actual = h.hexdigest()
    on_disk = os.stat(path).st_size
    return Verdict(
        ok=actual == blob_id and on_disk == size, expected=blob_id, actual=actual, size=on_disk
    )


def _only_ours(st: os.stat_result) -> bool:
    """Whether only this process's user (or root) may write the file: a mapped file that
    someone shortens kills the process (SIGBUS) where a read would only come up short.
    libtorrent creates a partial 0666 less the umask: group-writable under umask 002,
    which a cache shared through a setgid group folder hands to the whole group."""
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


class PrefixHasher:
    """The whole-file hash of a file written out of order whose final prefix grows (a
    swarm download: pieces checked, flushed, in order from the first): each byte is
    read once, soon after it landed, instead of in a second pass over the whole file.

    Blocking (run `hash_to` and `verdict` in a thread); one caller at a time. The
    caller vouches that ``[0, end)`` never changes again when it calls `hash_to(end)`.
    ``hashed(fd, offset, length)`` is told each range once it is read (the caller starts
    its writeback there: the range is final, and the fsync at the end finds it written).
    """

    def __init__(
        self,
        path: Path,
        blob_id: str,
        size: int,
        hashed: Callable[[int, int, int], object] | None = None,
    ) -> None:
        self.path = path
        self.blob_id = blob_id
        self.size = size
        self._hashed = hashed
        self._h = BlobHasher(HashKind.of_blob_id(blob_id), size)

    @property
    def position(self) -> int:
        return self._h.fed

    def hash_to(self, end: int) -> None:
        end = min(end, self.size)
        if end <= self._h.fed:
            return
        start = self._h.fed
        with open(self.path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if FOLLOW_MAP_FLAGS is not None and _only_ours(st):
                self._hash_mapped(f.fileno(), min(end, st.st_size))
            if self._h.fed < end:
                self._hash_read(f, end)  # no mapping here, or the file is short
            if self._hashed is not None and self._h.fed > start:
                self._hashed(f.fileno(), start, self._h.fed - start)

    def _hash_mapped(self, fd: int, stop: int) -> None:
        """Hash ``[fed, stop)`` through read-only mappings of the page cache; ``stop`` is
        never past the file's end (a page beyond it would raise SIGBUS). A file shortened
        while it is mapped would too: only its owner can do that (the partial is the
        agent's own, docs/SECURITY.md), and such an owner can end the agent anyway."""
        assert FOLLOW_MAP_FLAGS is not None
        while self._h.fed < stop:
            base = self._h.fed - self._h.fed % mmap.ALLOCATIONGRANULARITY
            length = min(stop - base, FOLLOW_WINDOW)
            try:
                m = mmap.mmap(fd, length, flags=FOLLOW_MAP_FLAGS, prot=mmap.PROT_READ, offset=base)
            except (OSError, ValueError):
                return  # a file system that refuses mappings (some FUSE): read instead
            try:
                with memoryview(m) as view, view[self._h.fed - base :] as part:
                    self._h.update(part)
            finally:
                m.close()

    def _hash_read(self, f: io.FileIO, end: int) -> None:
        f.seek(self._h.fed)
        buf = bytearray(min(FOLLOW_BLOCK, end - self._h.fed))
        view = memoryview(buf)
        while self._h.fed < end:
            n = f.readinto(view[: min(len(buf), end - self._h.fed)])
            if not n:
                break  # shorter than said: the verdict tells
            self._h.update(view[:n])

    def verdict(self) -> Verdict:
        """Hash what is left and compare with the blob id (and the size on disk)."""
        self.hash_to(self.size)
        actual = self._h.hexdigest()
        on_disk = os.stat(self.path).st_size
        ok = actual == self.blob_id and on_disk == self.size and self._h.fed == self.size
        return Verdict(ok=ok, expected=self.blob_id, actual=actual, size=on_disk)
