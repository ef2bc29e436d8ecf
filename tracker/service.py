"""The tracker's HTTP service: the agent index (msgpack) and a BitTorrent HTTP tracker.

    POST /v1/register   Register -> Registered         register, and heartbeat
    POST /v1/announce   Announce -> Announced          409 Problem: register first
    POST /v1/who        Who      -> WhoAnswer
    GET  /v1/health              -> TrackerHealth
    GET  /announce      BitTorrent announce (BEP 3/7/23/52) -> bencoded, compact peers

``async with TrackerServer(host="127.0.0.1", port=0) as t: ... t.url`` runs it. All
state is in one `Registry`, fed with ``clock()``; the handlers only translate between
HTTP and registry calls. Registry calls are short and CPU-only, so they run on the
event loop (no locks, no threads).

Errors answer a msgpack `Problem` (code for programs, message for people) with the HTTP
status that says who must act: 400 bad message, 403 "agent_id_taken" (the id is bound
to another address while its record lives), 408 "too_slow" (the body did not arrive in
time), 409 "register_first" (a restarted tracker; the client re-registers and announces
again), 413 too large, 415 not msgpack, 503 a table (or the connection table) is full.
A BitTorrent announce it cannot use answers 200 with a bencoded ``failure reason``, as
clients expect.

Every request is tied to its connection's source address: an agent id is bound to the
address that registered it (see `tracker.registry`), and a BitTorrent announce lists
the sender's address whatever its ``ip=`` says. The listener is bounded as
`tracker.limits` describes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

from tracker import messages as m
from tracker.announce import BadAnnounce, encode_answer, encode_failure, normalise_ip
from tracker.announce import parse_announce as parse_bt_announce
from tracker.errors import (
    AgentIdTaken,
    TrackerConfigError,
    TrackerFull,
    TrackerWireError,
    UnknownAgent,
)
from tracker.limits import BACKLOG, ConnectionGuard, ListenerLimits
from tracker.registry import AgentInfo, Limits, Registry
from tracker.signing import Membership

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
DEFAULT_PORT = 7860

Clock = Callable[[], float]
M = TypeVar("M", bound=m.Message)


class _Refused(Exception):
    """Internal: stop handling, answer this Problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _problem(status: int, code: str, message: str) -> web.Response:
    body = m.encode(m.Problem(code=code, message=message[: m.MAX_PROBLEM_CHARS]))
    return web.Response(status=status, body=body, content_type=MSGPACK)


def _ok(msg: m.Message) -> web.Response:
    return web.Response(body=m.encode(msg), content_type=MSGPACK)


async def _read_message(request: web.Request, kind: type[M], body_timeout: float) -> M:
    # Insisting on the msgpack content type is not pedantry: a web page in a LAN
    # browser may POST text/plain cross-origin without a CORS preflight, but not
    # application/msgpack. So no drive-by page can register or announce for anyone.
    if request.content_type != MSGPACK:
        raise _Refused(
            415, "wrong_content_type", f"send {kind.TYPE} as {MSGPACK}, not {request.content_type}"
        )
    if (request.content_length or 0) > m.MAX_REQUEST_BYTES:
        raise _Refused(413, "too_large", f"bodies are limited to {m.MAX_REQUEST_BYTES} bytes")
    try:
        async with asyncio.timeout(body_timeout):  # a body sent a byte at a time
            body = await request.read()  # client_max_size also bounds a chunked body
    except web.HTTPRequestEntityTooLarge:
        raise _Refused(
            413, "too_large", f"bodies are limited to {m.MAX_REQUEST_BYTES} bytes"
        ) from None
    except TimeoutError:
        raise _Refused(
            408, "too_slow", f"the body did not arrive within {body_timeout:g} s; send it at once"
        ) from None
    try:
        return m.decode_as(body, kind)
    except m.UnsupportedVersion as e:
        raise _Refused(400, "unsupported_version", e.message) from None
    except TrackerWireError as e:
        raise _Refused(400, "bad_message", f"{request.path}: {e.message}") from None


def _remote_ip(request: web.Request) -> str:
    try:
        return normalise_ip(request.remote or "")
    except ValueError:
        raise _Refused(
            400, "bad_message", "cannot tell your address; send Register with an explicit host"
        ) from None


def _address(info: AgentInfo) -> m.AgentAddress:
    return m.AgentAddress(
        agent_id=info.agent_id, host=info.host, api_port=info.api_port, bt_port=info.bt_port
    )


def make_app(
    registry: Registry,
    clock: Clock,
    limits: ListenerLimits | None = None,
    membership: Membership | None = None,
) -> web.Application:
    body_timeout = (limits or ListenerLimits()).body_timeout

    def members_only(msg: m.Register | m.Announce, source: str) -> None:
        """Cluster mode (``--cluster``): a member's recent signature, or 403."""
        if membership is None:
            return
        why = m.verify(msg, membership, time.time())
        if why:
            log.info(
                "refused a %s from %s for agent %s: %s", msg.TYPE, source, msg.agent_id[:8], why
            )
            raise _Refused(403, "not_a_member", f"this tracker serves one cluster: {why}")

    async def register(request: web.Request) -> web.Response:
        msg = await _read_message(request, m.Register, body_timeout)
        source = _remote_ip(request)
        members_only(msg, source)
        # The default: the address the request came from. A LAN agent often cannot
        # tell which of its addresses others reach; the tracker sees the one that works.
        host = msg.host or source
        announced = (msg.held, msg.fetching) if msg.held >= 0 and msg.fetching >= 0 else None
        reg = registry.register(
            msg.agent_id,
            host,
            msg.api_port,
            msg.bt_port,
            clock(),
            source=source,
            announced=announced,
        )
        return _ok(
            m.Registered(
                agent_id=msg.agent_id,
                host=host,
                ttl=float(registry.ttl),
                heartbeat=float(registry.heartbeat),
                new=reg.new,
            )
        )

    async def announce(request: web.Request) -> web.Response:
        msg = await _read_message(request, m.Announce, body_timeout)
        source = _remote_ip(request)
        members_only(msg, source)
        try:
            held, fetching = registry.announce(
                msg.agent_id, msg.held, msg.fetching, clock(), source=source
            )
        except UnknownAgent as e:
            raise _Refused(409, "register_first", e.one_line()) from None
        return _ok(m.Announced(held=held, fetching=fetching))

    async def who(request: web.Request) -> web.Response:
        msg = await _read_message(request, m.Who, body_timeout)
        if len(msg.blob_ids) > registry.limits.max_who_blobs:
            raise _Refused(
                400, "bad_message", f"ask about at most {registry.limits.max_who_blobs} blobs"
            )
        answer = m.WhoAnswer(
            blobs=tuple(
                m.BlobSources(
                    blob_id=s.blob_id,
                    holders=tuple(map(_address, s.holders)),
                    fetchers=tuple(map(_address, s.fetchers)),
                    holders_total=s.holders_total,
                    fetchers_total=s.fetchers_total,
                )
                for s in registry.who(msg.blob_ids, clock())
            )
        )
        return _ok(answer)

    async def health(_: web.Request) -> web.Response:
        s = registry.stats(clock())
        return _ok(
            m.TrackerHealth(
                agents=s.agents,
                blobs=s.blobs,
                swarms=s.swarms,
                bt_peers=s.bt_peers,
                ttl=float(registry.ttl),
                announce_interval=registry.announce_interval,
            )
        )

    async def bt_announce(request: web.Request) -> web.Response:
        # The raw query: info_hash and peer_id are binary, and request.query would
        # decode them as UTF-8 (and mangle them).
        _, _, query = request.raw_path.partition("?")
        try:
            ann = parse_bt_announce(query, request.remote or "")
        except BadAnnounce as e:
            return web.Response(body=encode_failure(e.message), content_type="text/plain")
        answer = registry.bt_announce(ann, clock())
        warning = None
        if not answer.recorded and ann.event != "stopped":
            warning = "the tracker is full: you got peers but are not listed for others"
        body = encode_answer(
            answer.peers,
            interval=registry.announce_interval,
            complete=answer.complete,
            incomplete=answer.incomplete,
            warning=warning,
        )
        return web.Response(body=body, content_type="text/plain")

    @web.middleware
    async def refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Refused as r:
            return _problem(r.status, r.code, r.message)
        except AgentIdTaken as e:
            return _problem(403, "agent_id_taken", e.one_line())
        except TrackerFull as e:
            return _problem(503, "full", e.one_line())

    app = web.Application(client_max_size=m.MAX_REQUEST_BYTES, middlewares=[refusals])
    app.router.add_post("/v1/register", register)
    app.router.add_post("/v1/announce", announce)
    app.router.add_post("/v1/who", who)
    app.router.add_get("/v1/health", health)
    # ssrf_mitigation in libtorrent refuses tracker URLs on local addresses whose path
    # does not start with /announce: keep this path exactly.
    app.router.add_get("/announce", bt_announce)
    return app


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard):
        super().__init__(runner)
        self._host, self._port, self._guard = host, port, guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.wrap(server),
            self._host,
            self._port,
            reuse_address=True,
            backlog=BACKLOG,
        )


class TrackerServer:
    """The tracker on one TCP port. ``port=0`` picks a free one (see `url`/`port`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: float = 30.0,
        clock: Clock = time.monotonic,
        *,
        announce_interval: int = 300,
        limits: Limits | None = None,
        rng: random.Random | None = None,
        listener: ListenerLimits | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.host = host
        self.membership = membership
        self.listener = (listener or ListenerLimits()).fitted_to_fd_limit()
        self.guard = ConnectionGuard(self.listener)
        self._want_port = port
        self.clock = clock
        self.registry = Registry(
            ttl=ttl, announce_interval=announce_interval, limits=limits, rng=rng
        )
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the tracker is not running")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        app = make_app(self.registry, self.clock, self.listener, self.membership)
        # aiohttp's keep-alive timer runs from a connection's start and from each answer
        # until the next request's headers are complete: it is the header timeout.
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=self.listener.header_timeout,
        )
        await runner.setup()
        site = _GuardedSite(runner, self.host, self._want_port, self.guard)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise TrackerConfigError(
                f"cannot listen on {self.host}:{self._want_port}: {e.strerror or e}",
                hint="choose another --listen address or port, or stop the program using it",
            ) from e
        self._runner = runner
        self._port = runner.addresses[0][1]
        log.info("tracker listening on %s", self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner, self._runner = self._runner, None
        self._port = None
        if runner is not None:
            await runner.cleanup()
