"""A blob being downloaded: a sparse data file plus an append-only journal of progress.

The journal is what makes a download resumable across processes. Each record says
"chunk i holds its first k bytes" and is appended only after those bytes were written,
every `JOURNAL_STEP` bytes of a chunk and when it completes (as aria2's control file
does for pieces), so after a kill -9 the next run asks only for the rest of each chunk:
a kill loses at most `JOURNAL_STEP` per connection, whatever the chunk size. We do not
fsync: a kill -9 keeps the page cache, and after a power loss the whole-file hash
(always checked before the blob enters ``blobs/``) catches anything the journal
claimed wrongly. Records are 8 bytes appended with O_APPEND; a torn last one is dropped.

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

_MAGIC = b"HFSWJ2\0\0"
_MAGIC_V1 = b"HFSWJ1\0\0"  # whole chunks only: read, then rewritten as v2
_HEADER = struct.Struct("<8sQQ")  # magic, blob size, chunk size
_RECORD = struct.Struct("<II")  # chunk index, bytes of it held (from its start)
_RECORD_V1 = struct.Struct("<I")
# Progress inside a chunk is journaled every this many bytes: 8 bytes of journal per
# 256 KiB of data (4096 small appends per GiB, measured cheap in docs/benchmarks.md).
JOURNAL_STEP = 256 << 10
# O_DIRECT wants offsets, lengths and buffers aligned to the device's logical block
# (512 or 4096 bytes): a page covers both.
DIRECT_ALIGN = 4096


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
        self.journal_path = self.journal_of(self.data_path)
        self.done: set[int] = set()
        # chunk -> bytes held from its start, for chunks begun but not done
        self.held: dict[int, int] = {}
        self._fd = -1
        self._jfd = -1
        self._dfd = -1  # O_DIRECT, opened by the first `write_through`
        self._direct_ok = True

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def chunk_range(self, index: int) -> tuple[int, int]:
        """[start, end) of a chunk."""
        start = index * self.chunk_size
        return start, min(self.size, start + self.chunk_size)

    def done_bytes(self) -> int:
        return sum(e - s for s, e in map(self.chunk_range, self.done)) + sum(self.held.values())

    def resume_at(self, index: int) -> int:
        """The first byte of chunk `index` still to fetch."""
        return self.chunk_range(index)[0] + self.held.get(index, 0)

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
            self.done, self.held = self._load_journal()
            if not self.done and not self.held:
                self._reset_journal()
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size != self.size:
                if self.done or self.held:  # data file lost or truncated: journal void
                    self._reset_journal()
                    self.done, self.held = set(), {}
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

    def _load_journal(self) -> tuple[set[int], dict[int, int]]:
        raw = os.pread(self._jfd, os.fstat(self._jfd).st_size, 0)
        if len(raw) < _HEADER.size:
            return set(), {}
        magic, size, chunk = _HEADER.unpack_from(raw)
        if magic not in (_MAGIC, _MAGIC_V1) or size != self.size or chunk != self.chunk_size:
            return set(), {}
        record = _RECORD if magic == _MAGIC else _RECORD_V1
        body = raw[_HEADER.size :]
        usable = len(body) - len(body) % record.size
        if usable != len(body):  # a torn last record (killed mid-append) is dropped
            os.ftruncate(self._jfd, _HEADER.size + usable)
        n = self.n_chunks
        held: dict[int, int] = {}
        for fields in record.iter_unpack(body[:usable]):
            i = fields[0]
            if i >= n:
                continue
            length = self._length(i)
            k = fields[1] if record is _RECORD else length
            if k <= length:
                held[i] = max(held.get(i, 0), k)
        done = {i for i, k in held.items() if k == self._length(i)}
        partly = {i: k for i, k in held.items() if i not in done and k > 0}
        if magic == _MAGIC_V1 and done:  # an older agent's journal: carry it over
            self._reset_journal()
            os.write(self._jfd, b"".join(_RECORD.pack(i, self._length(i)) for i in done))
        return done, partly

    def _length(self, index: int) -> int:
        start, end = self.chunk_range(index)
        return end - start

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

    def write_through(self, offset: int, data: memoryview) -> None:
        """`write`, past the page cache (O_DIRECT) where the file system allows it, for
        a copy that writes each byte once in large page-aligned buffers (the member
        stream's `mmap` buffers): no copy into the page cache and nothing dirty left
        for the fsync before the rename (docs/benchmarks.md 7.10). The whole pages from
        a page-aligned `offset` go direct, the rest (a short last page, an unaligned
        resume) through `write`; a file system or buffer that refuses O_DIRECT
        (EINVAL) gets `write` from then on."""
        direct = len(data) // DIRECT_ALIGN * DIRECT_ALIGN if offset % DIRECT_ALIGN == 0 else 0
        done = 0
        if direct and self._direct_ok:
            try:
                if self._dfd < 0:
                    self._dfd = os.open(self.data_path, os.O_WRONLY | os.O_DIRECT)
                while done < direct:
                    done += os.pwrite(self._dfd, data[done:direct], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise translate_os_error(exc, f"writing blob {self.blob_id}") from exc
                self._direct_ok = False
        if done < len(data):
            self.write(offset + done, data[done:])

    def mark_done(self, index: int) -> None:
        if index in self.done:
            return
        self._record(index, self._length(index))
        self.done.add(index)
        self.held.pop(index, None)

    def advance(self, index: int, held: int) -> None:
        """Chunk `index` now has its first `held` bytes written: journaled once
        `JOURNAL_STEP` more than last time are (the caller marks the chunk done)."""
        if index in self.done or held < self.held.get(index, 0) + JOURNAL_STEP:
            return
        if held >= self._length(index):
            return  # mark_done records it
        self._record(index, held)
        self.held[index] = held

    def _record(self, index: int, held: int) -> None:
        try:
            os.write(self._jfd, _RECORD.pack(index, held))  # journal is O_APPEND
        except OSError as exc:
            raise translate_os_error(exc, "recording download progress") from exc

    def held_to(self, pos: int) -> None:
        """Bytes [0, pos) are written: chunks below `pos` done, the one it is in
        journaled up to it (for a copy that writes the blob in order)."""
        index = self.contiguous_end(0)
        while index < self.n_chunks and self.chunk_range(index)[1] <= pos:
            self.mark_done(index)
            index += 1
        if index < self.n_chunks:
            self.advance(index, pos - self.chunk_range(index)[0])

    def forget_after(self, pos: int) -> None:
        """The journal claims nothing past `pos` any more (a copy that writes the blob
        in order from `pos` overwrites what is there before it checks it). Rewritten
        whole; a kill meanwhile only loses claims."""
        done = {i for i in self.done if self.chunk_range(i)[1] <= pos}
        held = {i: min(k, pos - self.chunk_range(i)[0]) for i, k in self.held.items()}
        held = {i: k for i, k in held.items() if k > 0}
        if done == self.done and held == self.held:
            return
        try:
            self._reset_journal()
            records = [_RECORD.pack(i, self._length(i)) for i in sorted(done)]
            records += [_RECORD.pack(i, k) for i, k in sorted(held.items())]
            if records:
                os.write(self._jfd, b"".join(records))
        except OSError as exc:
            raise translate_os_error(exc, "recording download progress") from exc
        self.done, self.held = done, held

    def contiguous_end(self, start_chunk: int) -> int:
        """Index of the first chunk at or after `start_chunk` that is not done."""
        i = start_chunk
        while i in self.done:
            i += 1
        return i

    def let_go(self, start: int, end: int) -> None:
        """Bytes [start, end) are final: their writeback starts now and the kernel may
        drop them (memory stays flat while a large blob lands, and the fsync before the
        rename has little left to do)."""
        if end > start:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def fsync(self) -> None:
        with contextlib.suppress(OSError):
            os.fsync(self._fd)

    def close(self) -> None:
        for attr in ("_fd", "_jfd", "_dfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)

    def take_finished(self) -> Path:
        """Close and hand the data file over (to be renamed). The journal stays until
        the rename is done (`installed`): killed in between, the next run finds every
        chunk done, hashes the file and renames it, instead of fetching it again."""
        self.fsync()
        self.close()
        return self.data_path

    @staticmethod
    def installed(data_path: Path) -> None:
        """The finished data file was renamed into place: its journal goes away (one
        a kill leaves behind is harmless, and removed at the agent's next start)."""
        PartialBlob.journal_of(data_path).unlink(missing_ok=True)

    @staticmethod
    def journal_of(data_path: Path) -> Path:
        """The journal beside a partial's data file (there while a writer may resume)."""
        return data_path.with_name(f"{data_path.name}.journal")

    def discard(self) -> None:
        self.close()
        for p in (self.data_path, self.journal_path):
            p.unlink(missing_ok=True)

    def __enter__(self) -> PartialBlob:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
