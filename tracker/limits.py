"""Bounds on the tracker's listener: connections, time, memory, and its own logs.

The tracker listens on the LAN, so any host may open connections and never finish
them. What bounds what:

- request size: aiohttp's ``client_max_size`` (the service sets it) and its header
  line/field limits;
- header time: aiohttp closes a connection whose next request's headers are not complete
  ``header_timeout`` after it opened or after its last answer (its keep-alive timer,
  which partial headers do not reset); the service passes it in;
- body time: the service reads a body within ``body_timeout`` or answers 408;
- a reader that stops reading: a connection whose answer cannot be written for
  ``write_timeout`` is dropped (the transport's pause_writing/resume_writing);
- file descriptors: `ConnectionBook` caps open connections in total and per source IP;
  when the total is reached, a newcomer takes the oldest connection of the address that
  holds the most (so many connections from one host cannot lock out another host);
- logs: `RepeatFilter` lets one record of a kind through per interval and counts the
  rest (an error per refused or failed connection would fill the disk otherwise).

This module does not import `peer` (the tracker stands alone); `ConnectionBook` and
`RepeatFilter` are pure (``now`` passed in) and tested without sockets.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from tracker import messages as m

log = logging.getLogger(__name__)

# The listen backlog, which is also how many connections asyncio accepts in one go
# before any of them is admitted or refused (and closed).
BACKLOG = 64
# File descriptors kept free beyond the admitted connections: two accept bursts not yet
# refused, plus the tracker's own (listening sockets, the event loop, logs, libraries).
_FD_RESERVE = 2 * BACKLOG + 32


@dataclass(frozen=True)
class ListenerLimits:
    max_connections: int = 512
    max_connections_per_ip: int = 32
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    write_timeout: float = 30.0
    log_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_ip < 1:
            raise ValueError("connection limits must be at least 1")
        for name in ("header_timeout", "body_timeout", "write_timeout", "log_interval"):
            if not 0 < getattr(self, name) <= m.MAX_SECONDS:
                raise ValueError(f"{name} must be in (0, {m.MAX_SECONDS}] seconds")

    def fitted_to_fd_limit(self) -> ListenerLimits:
        """These limits, with the total cut to what the process's descriptor limit
        allows: reaching it would make accept() fail for everyone, health checks too."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft - _FD_RESERVE >= self.max_connections:
            return self
        total = max(1, soft - _FD_RESERVE)
        return ListenerLimits(
            max_connections=total,
            max_connections_per_ip=min(self.max_connections_per_ip, total),
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            write_timeout=self.write_timeout,
            log_interval=self.log_interval,
        )


class ConnectionBook:
    """Open connections per source IP; pure (a connection is any hashable token).

    `admit` says whether a new connection may stay and which one, if any, must make
    room: at the total cap the address holding the most connections gives up its
    oldest, unless the newcomer's address is (nearly) that greedy itself.
    """

    def __init__(self, *, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self._by_ip: dict[str, OrderedDict[Hashable, None]] = {}
        self._ip_of: dict[Hashable, str] = {}

    def __len__(self) -> int:
        return len(self._ip_of)

    def count(self, ip: str) -> int:
        return len(self._by_ip.get(ip, ()))

    def admit(self, conn: Hashable, ip: str) -> tuple[bool, Hashable | None]:
        """(admitted, the connection to close to make room or None)."""
        mine = self.count(ip)
        if mine >= self.max_per_ip:
            return False, None
        evict = None
        if len(self._ip_of) >= self.max_total:
            greedy = max(self._by_ip, key=lambda a: len(self._by_ip[a]))
            if len(self._by_ip[greedy]) <= mine + 1:
                return False, None
            evict = next(iter(self._by_ip[greedy]))
            self.release(evict)
        self._by_ip.setdefault(ip, OrderedDict())[conn] = None
        self._ip_of[conn] = ip
        return True, evict

    def release(self, conn: Hashable) -> None:
        ip = self._ip_of.pop(conn, None)
        if ip is None:
            return
        conns = self._by_ip[ip]
        del conns[conn]
        if not conns:
            del self._by_ip[ip]


def _refusal_bytes() -> bytes:
    body = m.encode(
        m.Problem(
            code="full",
            message="too many open connections to the tracker (from your address or in "
            "total); close idle ones and retry later",
        )
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Content-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_REFUSAL = _refusal_bytes()


class _Guarded(asyncio.Protocol):
    """Wraps one aiohttp connection: admission by `ConnectionBook`, and a write deadline."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        admitted, evict = self._guard.book.admit(self, ip)
        if not admitted:
            self._guard.refused += 1
            log.warning("refused a connection from %s: too many open connections", ip)
            transport.write(_REFUSAL)
            transport.close()
            return
        if isinstance(evict, _Guarded):
            evict.abort()
        self._transport = transport
        self._inner.connection_made(transport)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._transport is not None:
            return self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._transport is None:
            return
        # The peer stopped reading: its answer sits in our memory. Give it a while.
        loop = asyncio.get_running_loop()
        self._write_timer = loop.call_later(self._guard.limits.write_timeout, self.abort)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._transport is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._transport is None:
            return
        self._transport = None
        self._guard.book.release(self)
        self._inner.connection_lost(exc)


class ConnectionGuard:
    """Turns aiohttp's protocol factory into one whose connections obey `limits`."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self.book = ConnectionBook(
            max_total=limits.max_connections, max_per_ip=limits.max_connections_per_ip
        )
        self.refused = 0

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(factory(), self)


class RepeatFilter(logging.Filter):
    """One record per (logger, level, message template, exception type) per ``interval``
    seconds; the next one let through says how many were held back. Pure apart from
    ``clock``."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._seen: dict[tuple[Any, ...], tuple[float, int]] = {}  # key -> (shown at, held)

    def filter(self, record: logging.LogRecord) -> bool:
        exc_type = record.exc_info[0] if record.exc_info else None
        key = (record.name, record.levelno, str(record.msg), exc_type)
        now = self._clock()
        shown = self._seen.get(key)
        if shown is not None and now - shown[0] < self.interval:
            self._seen[key] = (shown[0], shown[1] + 1)
            return False
        if len(self._seen) >= 10_000:  # distinct messages are few; bound it anyway
            self._seen.clear()
        self._seen[key] = (now, 0)
        if shown is not None and shown[1]:
            held, since = shown[1], now - shown[0]
            record.msg = f"{record.msg} ({held} more like this in the last {since:.0f} s)"
        return True
