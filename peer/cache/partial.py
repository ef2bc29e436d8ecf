"""A blob being downloaded: a sparse data file plus an append-only journal of finished chunks.

The journal is what makes a download resumable across processes: a chunk index is
appended only after every byte of that chunk was written, so after a kill -9 the next
run re-fetches at most the chunks that were in flight. We do not fsync per chunk: a
kill -9 keeps the page cache, and after a power loss the whole-file hash (always checked
before the blob enters ``blobs/``) catches anything the journal claimed wrongly.

An exclusive flock on the journal keeps two processes from writing the same partial.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from pathlib import Path

from peer.cache.hf_cache import translate_os_error
from peer.errors import LocalError

_MAGIC = b"HFSWJ1\0\0"
_HEADER = struct.Struct("<8sQQ")  # magic, blob size, chunk size
_RECORD = struct.Struct("<I")


class PartialBusy(LocalError):
    """Another process holds this partial download."""


class PartialBlob:
    """Owns ``<dir>/<blob_id>`` (data) and ``<dir>/<blob_id>.journal`` while open."""

    def __init__(self, directory: Path, blob_id: str, size: int, chunk_size: int) -> None:
        self.directory = directory
        self.blob_id = blob_id
        self.size = size
        self.chunk_size = chunk_size
        self.data_path = directory / blob_id
        self.journal_path = directory / f"{blob_id}.journal"
        self.done: set[int] = set()
        self._fd = -1
        self._jfd = -1

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def chunk_range(self, index: int) -> tuple[int, int]:
        """[start, end) of a chunk."""
        start = index * self.chunk_size
        return start, min(self.size, start + self.chunk_size)

    def done_bytes(self) -> int:
        return sum(e - s for s, e in map(self.chunk_range, self.done))

    def open(self) -> None:
        """Lock, then load the journal if it matches this blob, else start afresh."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._jfd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise translate_os_error(exc, "opening the partial download") from exc
        try:
            fcntl.flock(self._jfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._jfd)
            self._jfd = -1
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PartialBusy(f"another process is downloading blob {self.blob_id}") from exc
            raise translate_os_error(exc, "locking the partial download") from exc
        try:
            self.done = self._load_journal()
            if not self.done:
                self._reset_journal()
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size != self.size:
                if self.done:  # data file lost or truncated: journal means nothing now
                    self._reset_journal()
                    self.done = set()
                os.ftruncate(self._fd, 0)
                self._reserve()
        except OSError as exc:
            self.close()
            raise translate_os_error(exc, "preparing the partial download") from exc
        except BaseException:
            self.close()
            raise

    def _reserve(self) -> None:
        # Reserve the space up front so a full disk fails now, not 40 GB in.
        try:
            os.posix_fallocate(self._fd, 0, self.size) if self.size else None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            os.ftruncate(self._fd, self.size)  # filesystem without fallocate

    def _load_journal(self) -> set[int]:
        raw = os.pread(self._jfd, 64 << 20, 0)
        if len(raw) < _HEADER.size:
            return set()
        magic, size, chunk = _HEADER.unpack_from(raw)
        if magic != _MAGIC or size != self.size or chunk != self.chunk_size:
            return set()
        body = raw[_HEADER.size :]
        usable = len(body) - len(body) % _RECORD.size
        if usable != len(body):  # a torn last record (killed mid-append) is dropped
            os.ftruncate(self._jfd, _HEADER.size + usable)
        n = self.n_chunks
        return {i for (i,) in _RECORD.iter_unpack(body[:usable]) if i < n}

    def _reset_journal(self) -> None:
        os.ftruncate(self._jfd, 0)
        os.write(self._jfd, _HEADER.pack(_MAGIC, self.size, self.chunk_size))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise translate_os_error(exc, f"writing blob {self.blob_id}") from exc

    def mark_done(self, index: int) -> None:
        if index in self.done:
            return
        try:
            os.write(self._jfd, _RECORD.pack(index))  # journal is O_APPEND
        except OSError as exc:
            raise translate_os_error(exc, "recording download progress") from exc
        self.done.add(index)

    def contiguous_end(self, start_chunk: int) -> int:
        """Index of the first chunk at or after `start_chunk` that is not done."""
        i = start_chunk
        while i in self.done:
            i += 1
        return i

    def fsync(self) -> None:
        with contextlib.suppress(OSError):
            os.fsync(self._fd)

    def close(self) -> None:
        for attr in ("_fd", "_jfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)

    def take_finished(self) -> Path:
        """Close and hand the data file over (to be renamed); the journal goes away."""
        self.fsync()
        self.close()
        self.journal_path.unlink(missing_ok=True)
        return self.data_path

    def discard(self) -> None:
        self.close()
        for p in (self.data_path, self.journal_path):
            p.unlink(missing_ok=True)

    def __enter__(self) -> PartialBlob:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
