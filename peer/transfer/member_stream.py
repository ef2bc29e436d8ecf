"""Cluster mode: one blob from one member over its member blob stream.

The other end is `peer.serving.member_stream` (why it exists, the frames, the bounds).
This end runs in a thread of its own: OpenSSL decrypts with the GIL released, and each
1 MiB goes to the blob's journaled partial (`peer.cache.partial.PartialBlob`, the one a
swarm or a mirror fetch resumes) and through two hashes as it lands: the whole-file hash
against the blob id, and the blob's v2 tree, each whole piece checked against the piece
layer of the manifest the member signed. So a lying member is caught within one piece
(and banned), the journal only ever claims checked pieces, and the tree that comes out
is the manifest's: the blob is seeded with no second read.

What is on disk before the stream starts (a cut stream, a swarm's pieces, a relay) is
read and hashed first; a piece of it that fails the check throws the partial away and
blames nobody. HF_ENDPOINT readers of the blob follow the checked prefix
(`InFlightBlob`, started as from peers: the last byte waits for the whole-file hash).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import mmap
import os
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from peer import wire
from peer.aio import call_on_loop, in_thread
from peer.cache.partial import PartialBlob
from peer.cluster.tls import Cluster, peer_cert
from peer.discovery.peer_table import PeerInfo
from peer.errors import IntegrityError, NetworkError, PeerMisbehaved
from peer.hub.metadata import RemoteFile
from peer.manifests.merkle import BLOCK_SIZE, V2Tree, V2TreeBuilder
from peer.scheduling.herd import HerdConfig
from peer.transfer.inflight import InFlightBlob
from peer.transfer.mirror_blob import BlobCounters
from peer.transfer.mirror_ranges import chunk_size_for, hash_range
from peer.transfer.rate import Throttle
from peer.verification.hashing import BlobHasher, HashKind

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# The largest prefix on disk hashed after the member's "ok" (about 6 s at this
# machine's 700 MB/s; the sender's write stall is 30 s); larger ones before asking.
ASK_FIRST_UP_TO = 4 << 30
BUFFERS = 8  # chunks between the receiving and the hashing thread (8 MiB per stream)
CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0  # no byte for this long: the member is gone
# A stream slower than the herd's floor rate over a window is dropped: a trickle must not
# hold a blob the swarm could bring.
FLOOR_RATE = HerdConfig.min_rate
FLOOR_WINDOW = 30.0


class MemberBusy(NetworkError):
    """Every stream slot of the member is taken: the swarm brings the blob."""


class StreamCancelled(Exception):
    """The fetch was cancelled: the thread stops where it is."""


@dataclass(frozen=True)
class FromMember:
    path: Path  # the verified data file, to rename into blobs/
    tree: V2Tree  # equal to the manifest's
    received: int  # bytes that came over the stream


class MemberStream:
    """One blob from `peer`, checked against `expected` (the tree of the manifest it
    signed and offered). `fetch` runs the transfer in its own thread."""

    def __init__(
        self,
        cluster: Cluster,
        context: ssl.SSLContext,
        peer: PeerInfo,
        expected: V2Tree,
        file: RemoteFile,
        partial_dir: Path,
        counters: BlobCounters,
        *,
        flight: InFlightBlob | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        if expected.size != file.size or expected.blob_id != file.blob_id:
            raise ValueError("the manifest's tree is of another blob")
        self.cluster = cluster
        self.context = context
        self.peer = peer
        self.expected = expected
        self.file = file
        self.partial_dir = partial_dir
        self.counters = counters
        self.flight = flight
        self.throttle = throttle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        # The receiving thread's wait on the download cap, if it waits (`_wake` ends it).
        self._pending: concurrent.futures.Future[None] | None = None
        self._cancelled = False
        self._stopping = False  # the hashing thread's verdict is in: the receiver stops
        self._received = 0  # counted into `counters.from_peers` so far (on the loop)
        self._start = 0  # where this stream started (in the thread, before any progress)
        self._kept = 0  # of `_received`: checked pieces journaled (on the loop)
        self._got = 0  # bytes taken off the stream (in the thread)

    async def fetch(self) -> FromMember:
        self._loop = asyncio.get_running_loop()
        if self.flight is not None:
            self.flight.start(self.partial_dir / self.file.blob_id, from_peers=True)
        try:
            return await in_thread(self._run, self._cancel, f"member-{self.file.blob_id[:8]}")
        except StreamCancelled:
            raise asyncio.CancelledError from None
        except BaseException as exc:
            # The checked pieces stay in the partial for the next fetch (the swarm counts
            # them as resumed): they are still from peers. A lie's partial is thrown away.
            kept = 0 if isinstance(exc, PeerMisbehaved | IntegrityError) else self._kept
            self.counters.from_peers -= self._received - kept
            self._received = 0
            if self.flight is not None:
                self.flight.reset()  # what a reader got of this stream is void: it cuts
            raise

    def _cancel(self) -> None:
        self._cancelled = True
        self._wake()

    def _wake(self) -> None:
        """Stop the receiving thread wherever it blocks: the socket (its handshake too)
        and the wait on the download cap."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        pending = self._pending
        if pending is not None:
            pending.cancel()

    # -- in the thread -------------------------------------------------------------------

    def _run(self) -> FromMember:
        file = self.file
        partial = PartialBlob(self.partial_dir, file.blob_id, file.size, chunk_size_for(file.size))
        partial.open()  # PartialBusy if another process fetches it
        try:
            return self._copy(partial)
        except (PeerMisbehaved, IntegrityError):
            partial.discard()
            raise
        except (OSError, ssl.SSLError) as exc:  # partial's own errors are LocalErrors
            if self._cancelled:
                raise StreamCancelled from None
            raise NetworkError(
                f"member stream from {self.peer.host}:{self.peer.stream_port}: {exc}"
            ) from exc
        finally:
            partial.close()

    def _copy(self, partial: PartialBlob) -> FromMember:
        file, size = self.file, self.file.size
        check = _PieceCheck(self.expected)
        hasher = BlobHasher(HashKind.of_blob_id(file.blob_id), size, also=check.tree.update)
        # What is on disk already is checked piece by piece as the stream's bytes are,
        # but blames nobody: it is not this member's.
        start = self._start = partial.resume_at(partial.contiguous_end(0))
        # The stream rewrites everything from `start`, checking it piece by piece: what
        # the journal claims past it (a mirror's out-of-order chunks) is claimed again
        # only once checked, or a cut stream would leave unchecked bytes claimed.
        partial.forget_after(start)
        # A prefix up to `ASK_FIRST_UP_TO` is hashed once the member said "ok": a busy
        # member then costs no pass over it (the sender waits meanwhile, well within its
        # write stall). A larger one is hashed first.
        hashed = start == size or start > ASK_FIRST_UP_TO
        if start and hashed:
            self._hash_prefix(partial, hasher, check, start)
            self._progress(check.verified_end)
        # All of it on disk (a fetch killed before its rename): nothing to ask (a member
        # answers "absent" to a start at the end).
        if start < size:
            self._stream(partial, hasher, check, start, prefix_hashed=hashed)
        check.finish(from_stream_at=start)
        actual = hasher.hexdigest()
        if actual != file.blob_id and start == size:
            raise IntegrityError(
                f"{file.path}: the partial on disk hashes to {actual}",
                hint="the partial is thrown away; the blob is fetched again",
            )
        if actual != file.blob_id:
            # Every piece matched the manifest the member signed: that manifest is wrong.
            raise PeerMisbehaved(
                f"member {self.peer.agent_id[:8]} sent {file.path} as signed, but it hashes "
                f"to {actual}, not {file.blob_id}"
            )
        partial.held_to(size)
        self._progress(size)
        return FromMember(partial.take_finished(), self.expected, self._got)

    def _stream(
        self,
        partial: PartialBlob,
        hasher: BlobHasher,
        check: _PieceCheck,
        start: int,
        *,
        prefix_hashed: bool,
    ) -> None:
        file, size = self.file, self.file.size
        with self._connect() as tls:
            tls.sendall(wire.encode_frame(wire.StreamRequest(blob_id=file.blob_id, start=start)))
            answer = wire.read_frame(lambda n: wire.recv_exactly(tls, n), wire.StreamAnswer)
            if answer.status == "busy":
                raise MemberBusy(f"member {self.peer.agent_id[:8]} streams to others now")
            if answer.status != "ok":
                raise NetworkError(f"member {self.peer.agent_id[:8]} does not hold {file.path}")
            if answer.size != size:
                raise PeerMisbehaved(
                    f"member {self.peer.agent_id[:8]} offers {file.path} with "
                    f"{answer.size} bytes, not {size}"
                )
            if start and not prefix_hashed:
                self._hash_prefix(partial, hasher, check, start)
                self._progress(check.verified_end)
            self._receive(tls, partial, hasher, check, start)

    def _hash_prefix(
        self, partial: PartialBlob, hasher: BlobHasher, check: _PieceCheck, end: int
    ) -> None:
        def each() -> None:
            check.pieces(blame_from=None)  # never the member's bytes
            if self._cancelled:
                raise StreamCancelled

        fd = os.open(partial.data_path, os.O_RDONLY)
        try:
            hash_range(fd, hasher, 0, end, each)
        except OSError as exc:  # the partial is shorter than its journal says
            raise IntegrityError(f"{self.file.path}: {exc}") from exc
        finally:
            os.close(fd)

    def _connect(self) -> ssl.SSLSocket:
        peer = self.peer
        sock = socket.create_connection((peer.host, peer.stream_port), timeout=CONNECT_TIMEOUT)
        self._sock = sock
        if self._cancelled:  # cancelled while connecting: `_cancel` found no socket
            sock.close()
            raise StreamCancelled
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            # The handshake after `_sock` is the TLS socket: a cancel must reach it (the
            # plain one is detached by then).
            tls = self.context.wrap_socket(sock, do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        self._sock = tls
        try:
            if self._cancelled:
                raise StreamCancelled
            tls.do_handshake()
        except BaseException:
            tls.close()
            if self._cancelled:
                raise StreamCancelled from None
            raise
        cert = peer_cert(tls)
        try:
            if not call_on_loop(self._loop, self.cluster.admits, cert, peer.host):
                raise NetworkError(
                    f"{peer.host}:{peer.stream_port} is not a member in good standing"
                )
            assert cert is not None
            if cert.agent_id != peer.agent_id:
                raise NetworkError(
                    f"{peer.host}:{peer.stream_port} is member {cert.agent_id[:8]}, not "
                    f"{peer.agent_id[:8]} (the address changed hands?)"
                )
        except BaseException:
            tls.close()
            raise
        if self._cancelled:
            tls.close()
            raise StreamCancelled
        return tls

    def _receive(
        self,
        tls: ssl.SSLSocket,
        partial: PartialBlob,
        hasher: BlobHasher,
        check: _PieceCheck,
        start: int,
    ) -> None:
        """This thread fills 1 MiB buffers (OpenSSL hands out one 16 KiB record per
        read) and hashes each 16 KiB leaf of the v2 tree as soon as it is whole, while
        it is still in the CPU's cache. A second thread feeds the whole-file hash and
        the tree in order and checks the pieces; a third writes the buffers to the
        partial (past the page cache: each write waits for the disk) and only then lets
        the journal and the readers have the checked pieces. Each of them makes long
        calls without the GIL, so they rarely wait on each other (docs/benchmarks.md
        7.10). With one CPU to run on, this thread does it all (threads would only
        trade the GIL)."""
        size = self.file.size
        Item = tuple[mmap.mmap, int, int, list[bytes]]  # buffer, offset, length, leaves
        free: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
        filled: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        # ... then with the verified end once its pieces were checked
        hashed: queue.SimpleQueue[tuple[mmap.mmap, int, int, int] | None] = queue.SimpleQueue()
        failed: list[BaseException] = []
        claimed = check.verified_end

        def hash_one(buf: mmap.mmap, at: int, n: int, leaves: list[bytes]) -> int:
            data = memoryview(buf)[:n]
            hasher.update_alone(data)
            check.tree.update(data, leaves)
            check.pieces(blame_from=start)
            return check.verified_end

        def write_one(buf: mmap.mmap, at: int, n: int, verified: int) -> None:
            nonlocal claimed
            partial.write_through(at, memoryview(buf)[:n])
            # Every byte below `verified` is written now (buffers come in order).
            if verified > claimed:
                partial.held_to(verified)  # the journal: checked pieces only
                partial.let_go(max(claimed, start), verified)
                self._progress(verified)
                claimed = verified
            free.put(buf)

        def fail(exc: BaseException) -> None:  # raised in the receiving thread below
            failed.append(exc)
            free.put(None)  # the receiver stops at its next buffer...
            self._stopping = True
            self._wake()  # ... or now, if it waits for bytes (a liar gone silent)

        def hash_in_order() -> None:
            try:
                while (item := filled.get()) is not None:
                    hashed.put((item[0], item[1], item[2], hash_one(*item)))
            except BaseException as exc:
                fail(exc)
            finally:
                hashed.put(None)

        def write_in_order() -> None:
            try:
                while (done := hashed.get()) is not None:
                    write_one(*done)
            except BaseException as exc:
                fail(exc)

        pipelined = len(os.sched_getaffinity(0)) > 1
        # Anonymous maps: page-aligned, as `write_through`'s O_DIRECT wants.
        for _ in range(BUFFERS if pipelined else 1):
            free.put(mmap.mmap(-1, CHUNK))
        workers = [
            threading.Thread(target=hash_in_order, name="member-hash", daemon=True),
            threading.Thread(target=write_in_order, name="member-write", daemon=True),
        ]
        if pipelined:
            for w in workers:
                w.start()

        def drain() -> None:
            if pipelined:
                filled.put(None)
                for w in workers:
                    w.join()

        sha256 = hashlib.sha256
        try:
            tls.settimeout(IDLE_TIMEOUT)
            pos = start
            window_at, window_pos = time.monotonic(), pos
            while pos < size and (buf := free.get()) is not None:
                view = memoryview(buf)
                want, got = min(CHUNK, size - pos), 0
                # The tree's blocks are the blob's: the first whole one here starts at
                # the first block boundary on or after `pos`.
                leaves: list[bytes] = []
                leaf = -pos % BLOCK_SIZE
                while got < want:
                    try:
                        n = tls.recv_into(view[got:want])
                    except OSError:
                        if self._cancelled:
                            raise StreamCancelled from None
                        raise
                    if self._cancelled:
                        raise StreamCancelled
                    if not n:
                        raise NetworkError(
                            f"the member's stream ended at byte {pos + got} of {size}"
                        )
                    got += n
                    while leaf + BLOCK_SIZE <= got:
                        leaves.append(sha256(view[leaf : leaf + BLOCK_SIZE]).digest())
                        leaf += BLOCK_SIZE
                    now = time.monotonic()
                    if now - window_at >= FLOOR_WINDOW:
                        if pos + got - window_pos < FLOOR_RATE * (now - window_at):
                            raise NetworkError(
                                f"the member's stream moved {pos + got - window_pos} bytes "
                                f"in {now - window_at:.0f} s, below the floor rate"
                            )
                        window_at, window_pos = now, pos + got
                if pipelined:
                    filled.put((buf, pos, got, leaves))
                else:
                    write_one(buf, pos, got, hash_one(buf, pos, got, leaves))
                pos += got
                self._got += got
                if self.throttle is not None and self.throttle.rate > 0:
                    # Our own cap's wait is not the member's slowness: off the floor window.
                    window_at += self._take(self.throttle, got)
        except BaseException:
            drain()
            # A piece's verdict wins over the cut or the silence that followed it: a liar
            # must not escape its ban by closing the stream after its lie.
            if failed and not self._cancelled:
                raise failed[0] from None
            raise
        drain()
        if failed:
            raise failed[0]
        self._progress(check.verified_end)

    def _take(self, throttle: Throttle, n: int) -> float:
        """Wait (on the loop) until the download cap lets `n` bytes go; the seconds it
        took. `_wake` ends the wait (`StreamCancelled`)."""
        assert self._loop is not None
        t0 = time.monotonic()
        pending = asyncio.run_coroutine_threadsafe(throttle.take(n), self._loop)
        self._pending = pending
        try:
            if self._cancelled or self._stopping:
                pending.cancel()
            pending.result()
        except concurrent.futures.CancelledError:
            raise StreamCancelled from None
        finally:
            self._pending = None
        return time.monotonic() - t0

    def _progress(self, verified: int) -> None:
        """Counters and readers, on the loop: `verified` bytes checked, and what was
        taken from the stream so far."""
        assert self._loop is not None
        received = self._got

        def tell() -> None:
            self.counters.from_peers += received - self._received
            self._received = received
            self._kept = min(received, max(self._kept, verified - self._start))
            self.counters.done = max(self.counters.done, verified)
            if self.flight is not None:
                self.flight.advance(verified)

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(tell)


class _PieceCheck:
    """Each whole piece the tree has hashed, against the manifest's piece layer."""

    def __init__(self, expected: V2Tree) -> None:
        self.expected = expected
        self.tree = V2TreeBuilder(expected.blob_id, expected.size)
        if self.tree.piece_size != expected.piece_size:
            raise PeerMisbehaved("the manifest's piece size breaks the piece-size rule")
        self.checked = 0

    @property
    def verified_end(self) -> int:
        return min(self.expected.size, self.checked * self.expected.piece_size)

    def pieces(self, blame_from: int | None) -> None:
        """Check the pieces hashed since last time. A wrong one: the member's fault
        (`PeerMisbehaved`) if all of it came after `blame_from`, else nobody's."""
        layer = self.expected.piece_layer
        while self.checked < self.tree.pieces_hashed:
            i = self.checked
            if self.tree.piece_hash(i) != layer[32 * i : 32 * i + 32]:
                self._wrong(i, blame_from)
            self.checked += 1

    def finish(self, from_stream_at: int) -> None:
        got = self.tree.finish()
        want = self.expected
        if (got.piece_layer, got.pieces_root) != (want.piece_layer, want.pieces_root):
            last = len(self.expected.piece_layer) // 32 - 1
            self._wrong(last, from_stream_at)

    def _wrong(self, index: int, blame_from: int | None) -> None:
        at = index * self.expected.piece_size
        if blame_from is not None and at >= blame_from:
            raise PeerMisbehaved(f"piece {index} does not match the manifest the member signed")
        raise IntegrityError(
            f"piece {index} on disk from before does not match the manifest",
            hint="the partial is thrown away; the blob is fetched again",
        )
