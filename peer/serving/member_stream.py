"""Cluster mode: the member blob stream, where members send each other whole blobs.

libtorrent's SSL torrents move about half of what open mode does (two 8 KiB TLS records
and two system calls per 16 KiB block), and asyncio's TLS transport costs more CPU still
(docs/benchmarks.md 7.2, 7.8). OpenSSL on blocking sockets, one thread per transfer and
1 MiB writes, moves a blob at close to the plain rate. So in cluster mode a member that
holds a verified, shared blob also serves it here, on a listener of its own
(``member_listen``), over mutual TLS 1.3 with cluster certificates:

    client -> server   StreamRequest(blob_id, start)    one frame (`peer.wire.encode_frame`)
    server -> client   StreamAnswer(status, size)       one frame; with "ok" the bytes
                                                        [start, size) follow, raw

The receiver checks every piece against the manifest the member signed, and the whole
blob against its id (`peer.transfer.member_stream`).

Bounds: at most `MAX_CONNECTIONS` connections (handshakes included), `PER_IP` from one
address; over them the oldest connection that sent no request yet is closed to make
room (else the new one is closed at once). The handshake and the request must arrive
within `HANDSHAKE_TIMEOUT`, the CRL is checked after the handshake (and every second
of a stream), and a write that stalls for `WRITE_STALL`, or a member reading below the
floor rate, ends the stream. At most `slots` streams run at once (``member_streams``),
one per address: a member that finds them taken is told "busy" and swarms the blob
instead, where downloaders trade pieces with each other (a stream serves one). The
agent's upload cap and counters apply (its `Throttle`, taken through the event loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from peer import wire
from peer.aio import call_on_loop
from peer.cluster.tls import Cluster, PeerCert, peer_cert
from peer.transfer.member_stream import FLOOR_RATE, FLOOR_WINDOW
from peer.transfer.rate import Throttle

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read and written at once (OpenSSL cuts its records from them)
MAX_CONNECTIONS = 16
PER_IP = 4
HANDSHAKE_TIMEOUT = 10.0  # TLS handshake plus the request frame, in all
WRITE_STALL = 30.0
SEND_STEP = 256 << 10  # the floor rate is looked at after each
COUNT_EVERY = 8 << 20  # upload counters are told every this many bytes (and at the end)
# The CRL is looked at again this often while a stream runs: a member revoked meanwhile
# gets no more bytes (a blob streams for minutes, a capped one for hours).
RECHECK_EVERY = 1.0
VIA = "member-stream"  # how the audit log and the upload counters name this way


class StreamBackend(Protocol):
    """What the stream asks of the agent; every call runs on the event loop."""

    def verified_blob_path(self, blob_id: str) -> Path | None: ...

    def count_upload(self, n: int, via: str) -> None: ...

    def blob_served(self, blob_id: str, address: str, sent: int, via: str) -> None: ...


class MemberStreamServer:
    """The listener and its threads: ``async with`` binds it, leaving closes every
    connection and waits for the threads."""

    def __init__(
        self,
        cluster: Cluster,
        host: str,
        port: int,
        backend: StreamBackend,
        *,
        slots: int,
        throttle: Throttle | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        floor_window: float = FLOOR_WINDOW,
    ) -> None:
        self.cluster = cluster
        self.host = host
        self.port = port
        self.backend = backend
        self.throttle = throttle
        self.slots = slots
        self.handshake_timeout = handshake_timeout
        self.floor_window = floor_window
        self._context = cluster.server_context()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._open: set[_Conn] = set()  # every connection counted against the caps
        self._threads: set[threading.Thread] = set()
        self._pending: set[concurrent.futures.Future[None]] = set()  # waits on `throttle`
        self._closing = False
        self.served = 0  # streams that ended with every byte sent (for tests and status)

    @property
    def streams(self) -> int:
        with self._lock:
            return sum(c.streaming for c in self._open)

    async def __aenter__(self) -> MemberStreamServer:
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=64)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._spawn(self._accept, "member-stream-accept")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        with self._lock:
            socks = [c.sock for c in self._open]
            pending = list(self._pending)
        for wait in pending:  # a thread waiting on the upload cap stops now
            wait.cancel()
        if self._sock is not None:
            socks.append(self._sock)
        for s in socks:  # wakes every blocked accept, recv and send
            _shut(s)
        if self._sock is not None:
            self._sock.close()
        threads = list(self._threads)

        def join() -> None:
            for t in threads:
                t.join(5.0)

        await asyncio.to_thread(join)

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=self._run, args=(target, *args), name=name, daemon=True)
        self._threads.add(thread)
        thread.start()

    def _run(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except Exception:  # a thread's bug must not pass silently, nor kill the agent
            log.exception("member stream: %s failed", target.__name__)
        finally:
            self._threads.discard(threading.current_thread())

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, addr = self._sock.accept()
            except OSError as exc:
                if self._closing:
                    return
                log.warning("member stream: accept failed: %s", exc)
                threading.Event().wait(0.1)  # EMFILE and the like: do not spin
                continue
            ip = str(addr[0])
            c = _Conn(conn, ip)
            with self._lock:
                room = self._make_room(ip)
                if room:
                    self._open.add(c)
            if not room:
                conn.close()
                continue
            self._spawn(self._serve, f"member-stream-{ip}", c, ip)

    def _make_room(self, ip: str) -> bool:
        """Under the lock: is there room for one more connection from `ip`? When the
        caps are reached, the oldest connection still without a request (no handshake
        done, or no frame sent) is closed to make it: connections nobody can
        authenticate must not keep members out by filling the slots."""
        if sum(c.ip == ip for c in self._open) >= PER_IP:
            pending = [c for c in self._open if c.ip == ip and not c.admitted]
        elif len(self._open) >= MAX_CONNECTIONS:
            pending = [c for c in self._open if not c.admitted]
        else:
            return True
        if not pending:
            return False
        victim = min(pending, key=lambda c: c.since)
        self._open.discard(victim)  # its thread ends on the shutdown; it counts no more
        _shut(victim.sock)
        return True

    def _serve(self, c: _Conn, ip: str) -> None:
        # The handshake and the request share one deadline: a peer trickling bytes must
        # not hold a connection slot by keeping each read under a per-call timeout.
        timer = threading.Timer(self.handshake_timeout, lambda: _shut(c.sock))
        timer.start()
        conn = c.sock
        try:
            conn.settimeout(self.handshake_timeout)
            with self._context.wrap_socket(
                conn, server_side=True, do_handshake_on_connect=False
            ) as tls:
                # `conn` is detached now: the deadline and the shutdown must reach the
                # TLS socket, its handshake included.
                c.sock = tls
                if self._closing:
                    return
                tls.do_handshake()
                cert = peer_cert(tls)
                if not call_on_loop(self._loop, self.cluster.admits, cert, ip):
                    log.info("member stream: %s has no valid member certificate", ip)
                    return
                request = wire.read_frame(lambda n: wire.recv_exactly(tls, n), wire.StreamRequest)
                timer.cancel()
                with self._lock:
                    c.admitted = True
                assert cert is not None
                self._answer(tls, c, cert, request)
        except (OSError, ssl.SSLError, wire.WireError, TimeoutError) as exc:
            if not self._closing:
                log.debug("member stream: %s: %s", ip, exc)
        finally:
            timer.cancel()
            with self._lock:
                self._open.discard(c)
            conn.close()

    def _answer(
        self, tls: ssl.SSLSocket, c: _Conn, cert: PeerCert, request: wire.StreamRequest
    ) -> None:
        ip = c.ip
        path = call_on_loop(self._loop, self.backend.verified_blob_path, request.blob_id)
        fd = -1
        try:
            if path is not None:
                fd = os.open(path, os.O_RDONLY)
        except OSError:
            path = None
        try:
            size = os.fstat(fd).st_size if fd >= 0 else 0
            if path is None or request.start >= size:
                tls.sendall(wire.encode_frame(wire.StreamAnswer(status="absent")))
                return
            with self._lock:
                running = [o for o in self._open if o.streaming]
                free = len(running) < self.slots and all(o.ip != ip for o in running)
                c.streaming = free
            if not free:
                tls.sendall(wire.encode_frame(wire.StreamAnswer(status="busy")))
                return
            try:
                tls.settimeout(WRITE_STALL)
                tls.sendall(wire.encode_frame(wire.StreamAnswer(status="ok", size=size)))
                sent = self._send(tls, ip, cert, fd, request.start, size)
            finally:
                with self._lock:
                    c.streaming = False
            self._tell(self.backend.blob_served, request.blob_id, ip, sent, VIA)
            if request.start + sent == size:
                with self._lock:
                    self.served += 1
        finally:
            if fd >= 0:
                os.close(fd)

    def _send(
        self, tls: ssl.SSLSocket, ip: str, cert: PeerCert, fd: int, start: int, size: int
    ) -> int:
        """Bytes [start, size) of the file to the member while it stays in good
        standing; returns how many went out."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        pos, untold = start, 0
        recheck_at = time.monotonic() + RECHECK_EVERY
        # A member reading slower than the floor rate (our own cap's waits aside) gives
        # its slot back: it would hold a sender's slot for as long as it likes.
        window_at, window_pos = time.monotonic(), pos
        try:
            while pos < size and not self._closing:
                if time.monotonic() >= recheck_at:
                    if not call_on_loop(self._loop, self.cluster.admits, cert, ip):
                        log.info("member stream: %s was revoked; stream cut", ip)
                        break
                    recheck_at = time.monotonic() + RECHECK_EVERY
                n = os.preadv(fd, [view[: min(CHUNK, size - pos)]], pos)
                if n <= 0:
                    break  # the file shrank under us: the receiver's hash will tell
                if self.throttle is not None and self.throttle.rate > 0:
                    t0 = time.monotonic()
                    if not self._take(self.throttle, n):
                        break  # the server is closing
                    window_at += time.monotonic() - t0
                slow = False
                for off in range(0, n, SEND_STEP):  # a slow reader is seen within a step
                    step = min(SEND_STEP, n - off)
                    tls.sendall(view[off : off + step])
                    pos += step
                    untold += step
                    now = time.monotonic()
                    if now - window_at >= self.floor_window:
                        if pos - window_pos < FLOOR_RATE * (now - window_at):
                            slow = True
                            break
                        window_at, window_pos = now, pos
                if slow:
                    log.info("member stream: %s reads below the floor rate; cut", ip)
                    break
                if untold >= COUNT_EVERY:
                    self._tell(self.backend.count_upload, untold, VIA)
                    untold = 0
        finally:
            if untold:
                self._tell(self.backend.count_upload, untold, VIA)
        return pos - start

    def _take(self, throttle: Throttle, n: int) -> bool:
        """Wait (on the loop) until the upload cap lets `n` bytes go; False if the
        server closed meanwhile (`__aexit__` cancels the wait)."""
        assert self._loop is not None
        pending = asyncio.run_coroutine_threadsafe(throttle.take(n), self._loop)
        with self._lock:
            self._pending.add(pending)
        try:
            if self._closing:
                pending.cancel()
            pending.result()
            return True
        except concurrent.futures.CancelledError:
            return False
        finally:
            with self._lock:
                self._pending.discard(pending)

    def _tell(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(fn, *args)


class _Conn:
    """A connection: its socket as it is now (plain, then its TLS wrapper), whence,
    since when, and whether a member's request came on it."""

    def __init__(self, sock: socket.socket, ip: str) -> None:
        self.sock = sock
        self.ip = ip
        self.since = time.monotonic()
        self.admitted = False  # a member's request came on it: never closed for room
        self.streaming = False  # holds one of the stream slots


def _shut(sock: socket.socket) -> None:
    """Wake whatever blocks on `sock` from another thread. The plain socket's shutdown,
    even for a TLS one: `SSLSocket.shutdown` also drops its SSL state, which the thread
    using it may be in the middle of."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
