"""Bounds on every listener of the agent (peer API, local API): connections, time and
memory, so that no client can exhaust the process's fds or stall it.

    runner, port = await start_listener(app, host, port, peer_limits(nofile_limit()))

- Connections: at most `ListenerLimits.max_connections` open at once per listener, and
  `max_per_ip` per source address (peer API). One over the cap is answered with a
  canned 503 and closed at once, before aiohttp ever sees it: no handler, no parser, no
  traceback. The caps are derived from RLIMIT_NOFILE (`raise_nofile_limit` lifts the
  soft limit to the hard one at agent start) so that accepting never hits EMFILE.
- Time: a request head must arrive within `header_timeout` of its first byte (or of the
  connection opening): a one-byte-a-second header (slowloris) is cut off. A request body
  must be complete within `body_timeout` of the head. Between requests aiohttp's
  keep-alive timeout applies. A client that reads nothing of a response for
  `write_stall` seconds is dropped (answers sent by sendfile ask `write_stall_of` and
  bound each chunk themselves: sendfile bypasses the transport's ``pause_writing``).
- Memory: request heads are bounded by aiohttp's line/field/count limits, bodies by each
  app's ``client_max_size``; responses wait for the client (the transport pauses the
  writer), and `StreamSlots` bounds how many large bodies stream at once.

`_Gate` wraps aiohttp's protocol (it forwards every callback), counts, and holds the
timers; a middleware tells it when a request head was complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

FD_RESERVE = 256  # libtorrent's sockets, open blobs, client sessions, logs
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)


@dataclass(frozen=True)
class ListenerLimits:
    name: str  # for logs: "peer API", "local API"
    max_connections: int
    max_per_ip: int  # 0: no per-address cap (the local API: every caller is loopback)
    header_timeout: float = 5.0
    body_timeout: float = 10.0
    keepalive_timeout: float = 20.0  # above aiohttp clients' 15 s pool: they close first
    write_stall: float = 30.0
    max_line: int = 8190
    max_field: int = 8190
    max_headers: int = 64


def nofile_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_nofile_limit() -> int:
    """Lift the soft fd limit to the hard one (a shell's ulimit is often 1024 with a far
    higher hard limit); the limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return nofile_limit()


def peer_limits(nofile: int) -> ListenerLimits:
    """Other hosts: half the fds beyond the reserve, and no address more than 1/8 of that
    (at ulimit 1024: 384 connections, 48 per address)."""
    budget = max(64, nofile - FD_RESERVE)
    total = min(4096, budget // 2)
    return ListenerLimits("peer API", max_connections=total, max_per_ip=max(8, total // 8))


def local_limits(nofile: int) -> ListenerLimits:
    """The CLI and Hub clients on this machine (at ulimit 1024: 192 connections)."""
    budget = max(64, nofile - FD_RESERVE)
    return ListenerLimits("local API", max_connections=min(1024, budget // 4), max_per_ip=0)


@dataclass
class _Counts:
    total: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)

    def take(self, ip: str, total_cap: int, ip_cap: int) -> bool:
        if self.total >= total_cap or (ip_cap and self.per_ip.get(ip, 0) >= ip_cap):
            return False
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def give(self, ip: str) -> None:
        self.total -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


class StreamSlots:
    """How many large bodies stream at once, in total and per client address."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._counts = _Counts()

    @property
    def in_use(self) -> int:
        """Bodies streaming now."""
        return self._counts.total

    @contextlib.contextmanager
    def take(self, ip: str) -> Iterator[bool]:
        """True (and held until the block ends) if a slot was free; False: answer 503."""
        ok = self._counts.take(ip, self.total, self.per_ip)
        try:
            yield ok
        finally:
            if ok:
                self._counts.give(ip)


class _Gate(asyncio.Protocol):
    """aiohttp's protocol behind the caps and timers of one listener."""

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._ip = ""
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._in_request = False

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self._ip = str(peer[0]) if peer else ""
        lim = self._listener.limits
        admit = self._listener.admit
        if admit is not None and not admit(transport):
            # Cluster mode: a certificate the CA issued but revoked since (checked after
            # the handshake; the CA check itself is the handshake's).
            log.info("%s: a revoked certificate from %s; connection closed", lim.name, self._ip)
            transport.abort()
            return
        if not self._listener.counts.take(self._ip, lim.max_connections, lim.max_per_ip):
            log.warning(
                "%s: connection cap reached (%d in all, %d per address); closing new "
                "connections at once (raise `ulimit -n` if this is legitimate load)",
                lim.name,
                lim.max_connections,
                lim.max_per_ip,
            )
            transport.write(BUSY)
            transport.close()
            return
        self._transport = transport
        self._head_timer = self._later(lim.header_timeout, "its request head")
        self._inner = self._listener.make_protocol()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._in_request and self._head_timer is None:
            self._head_timer = self._later(self._listener.limits.header_timeout, "its request head")
        admit = self._listener.admit
        if (
            not self._in_request
            and admit is not None
            and self._transport is not None
            and not admit(self._transport)
        ):
            # A keep-alive connection of a member revoked since it connected.
            self._transport.abort()
            return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is None:
            return
        if self._stall_timer is None:
            self._stall_timer = self._later(self._listener.limits.write_stall, "reading")
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is None:
            return
        self._cancel("_stall_timer")
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for name in ("_head_timer", "_body_timer", "_stall_timer"):
            self._cancel(name)
        if self._inner is not None:
            self._inner.connection_lost(exc)
            self._inner = None
            self._listener.counts.give(self._ip)

    # -- from the middleware -----------------------------------------------------------

    def request_started(self, body_pending: bool) -> None:
        self._in_request = True
        self._cancel("_head_timer")
        if body_pending:
            self._body_timer = self._later(self._listener.limits.body_timeout, "its body")

    def request_done(self) -> None:
        self._in_request = False
        self._cancel("_body_timer")

    # -- timers ------------------------------------------------------------------------

    def _later(self, seconds: float, what: str) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        return loop.call_later(seconds, self._expire, what, seconds)

    def _expire(self, what: str, seconds: float) -> None:
        if self._transport is not None and not self._transport.is_closing():
            log.info(
                "%s: a client at %s took more than %.0f s over %s; connection closed",
                self._listener.limits.name,
                self._ip,
                seconds,
                what,
            )
            self._transport.abort()

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)


def write_stall_of(transport: asyncio.BaseTransport | None) -> float:
    """The `write_stall` of the listener a connection came in on (the default elsewhere):
    for answers sent by sendfile, which bypasses ``pause_writing`` and its timer."""
    gate = transport.get_protocol() if transport is not None else None
    if isinstance(gate, _Gate):
        return gate._listener.limits.write_stall
    return ListenerLimits.write_stall


@dataclass
class _Listener:
    limits: ListenerLimits
    make_protocol: Any  # aiohttp's web.Server: a protocol factory
    counts: _Counts = field(default_factory=_Counts)
    ssl_context: ssl.SSLContext | None = None
    # After the TLS handshake: may this connection go on? (cluster mode: not revoked)
    admit: Callable[[asyncio.BaseTransport], bool] | None = None


@web.middleware
async def _request_bounds(request: web.Request, handler: Any) -> web.StreamResponse:
    gate = request.transport.get_protocol() if request.transport is not None else None
    if not isinstance(gate, _Gate):
        result: web.StreamResponse = await handler(request)
        return result
    gate.request_started(body_pending=not request.content.is_eof())
    try:
        result = await handler(request)
        return result
    except ConnectionError:
        if request.transport is not None and not request.transport.is_closing():
            raise  # not the client's connection: a real error, logged by aiohttp
        # The client went away, or a timer above cut it off: nothing to log or answer.
        return web.Response(status=408)
    finally:
        gate.request_done()


class _GatedSite(web.BaseSite):
    """A TCP site whose connections go through a `_Gate`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, listener: _Listener) -> None:
        # The backlog holds what arrives between two accept rounds; the caps do the rest.
        super().__init__(runner, backlog=1024)
        self._host = host
        self._port = port
        self._listener = listener

    @property
    def name(self) -> str:
        scheme = "https" if self._listener.ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        listener = self._listener
        self._server = await loop.create_server(
            lambda: _Gate(listener),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            ssl=listener.ssl_context,
            # A handshake is bounded like a request head (the caps count from its end).
            ssl_handshake_timeout=listener.limits.header_timeout if listener.ssl_context else None,
        )


async def start_listener(
    app: web.Application,
    host: str,
    port: int,
    limits: ListenerLimits,
    *,
    ssl_context: ssl.SSLContext | None = None,
    admit: Callable[[asyncio.BaseTransport], bool] | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port within `limits` (over TLS with `ssl_context`, each
    connection then passed to `admit` after its handshake); the runner (cleanup is the
    caller's) and the port bound. Raises OSError if the address cannot be bound (the
    runner is cleaned up then)."""
    app.middlewares.append(_request_bounds)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=limits.keepalive_timeout,
        lingering_time=2.0,
        max_line_size=limits.max_line,
        max_field_size=limits.max_field,
        max_headers=limits.max_headers,
    )
    await runner.setup()
    assert runner.server is not None
    site = _GatedSite(
        runner, host, port, _Listener(limits, runner.server, ssl_context=ssl_context, admit=admit)
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound: int = runner.addresses[0][1]
    return runner, bound
