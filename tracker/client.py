"""The agents' side of the tracker: `TrackerClient` (one call per endpoint) and
`TrackerPresence` (keeps one agent registered and its announce current, across tracker
restarts).

Errors are `tracker.errors` classes: `TrackerUnavailable` (no answer), `RegisterFirst`
(409: the tracker does not know us; register, then announce again), `AgentIdTaken`
(403: another address holds our id for now), `TrackerFull` (503), `TrackerRefused`
(anything else), `TrackerWireError` (a malformed answer). An agent translates them at
its edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self, TypeVar

import aiohttp

from tracker import messages as m
from tracker.errors import (
    AgentIdTaken,
    RegisterFirst,
    TrackerError,
    TrackerFull,
    TrackerRefused,
    TrackerUnavailable,
    TrackerWireError,
)
from tracker.signing import Signer

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
M = TypeVar("M", bound=m.Message)

# Idle pooled connections are closed well before the tracker's own header timeout
# (10 s by default) closes them, so a heartbeat is never sent on a connection the
# tracker is closing at that moment.
POOL_KEEPALIVE = 4.0


class TrackerClient:
    """``async with TrackerClient("http://tracker:7860") as t: await t.register(...)``.
    Pass ``session`` to share a connection pool (it is then not closed here)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        session: aiohttp.ClientSession | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        # Cluster mode: registrations and announces signed by this member.
        self._signer = signer
        self._timeout = timeout
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                connector=aiohttp.TCPConnector(keepalive_timeout=POOL_KEEPALIVE),
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- endpoints -----------------------------------------------------------------------

    async def register(
        self,
        agent_id: str,
        api_port: int,
        bt_port: int,
        host: str = "",
        announced: tuple[int, int] | None = None,
    ) -> m.Registered:
        """Register or heartbeat. ``host`` "": the tracker records our source address.
        ``announced``: the counts of our last accepted announce; the answer is ``new``
        when the tracker holds other counts (it forgot something: announce again)."""
        held, fetching = announced if announced is not None else (-1, -1)
        msg = m.Register(
            agent_id=agent_id,
            api_port=api_port,
            bt_port=bt_port,
            host=host,
            held=held,
            fetching=fetching,
        )
        if self._signer is not None:
            msg = m.sign(msg, self._signer, time.time())
        return await self._call("POST", "/v1/register", msg, m.Registered)

    async def announce(
        self, agent_id: str, held: Iterable[str], fetching: Iterable[str] = ()
    ) -> m.Announced:
        """Replace our held/fetching sets. Raises `RegisterFirst` when the tracker does
        not know us. Sets over the wire limits are cut (the rest stays findable over the
        peer API of agents that are found)."""
        held_t = tuple(dict.fromkeys(held))
        held_set = set(held_t)
        fetching_t = tuple(b for b in dict.fromkeys(fetching) if b not in held_set)
        if len(held_t) > m.MAX_HELD or len(fetching_t) > m.MAX_FETCHING:
            log.warning(
                "announcing %d of %d held and %d of %d fetching blobs (tracker limits)",
                min(len(held_t), m.MAX_HELD),
                len(held_t),
                min(len(fetching_t), m.MAX_FETCHING),
                len(fetching_t),
            )
        msg = m.Announce(
            agent_id=agent_id, held=held_t[: m.MAX_HELD], fetching=fetching_t[: m.MAX_FETCHING]
        )
        if self._signer is not None:
            msg = m.sign(msg, self._signer, time.time())
        return await self._call("POST", "/v1/announce", msg, m.Announced)

    async def who(self, blob_ids: Iterable[str]) -> dict[str, m.BlobSources]:
        """Live holders and fetchers per blob id (blobs nobody has are absent)."""
        ids = tuple(dict.fromkeys(blob_ids))
        out: dict[str, m.BlobSources] = {}
        for start in range(0, len(ids), m.MAX_WHO_BLOBS):
            chunk = ids[start : start + m.MAX_WHO_BLOBS]
            answer = await self._call("POST", "/v1/who", m.Who(blob_ids=chunk), m.WhoAnswer)
            out.update((s.blob_id, s) for s in answer.blobs if s.blob_id in chunk)
        return out

    async def health(self) -> m.TrackerHealth:
        return await self._call("GET", "/v1/health", None, m.TrackerHealth)

    # -- plumbing ------------------------------------------------------------------------

    async def _call(self, method: str, path: str, msg: m.Message | None, kind: type[M]) -> M:
        if self._session is None:
            raise RuntimeError("use TrackerClient as an async context manager")
        body = m.encode(msg, max_bytes=m.MAX_REQUEST_BYTES) if msg is not None else None
        headers = {"Content-Type": MSGPACK} if body is not None else {}
        try:
            async with self._session.request(
                method, self.url + path, data=body, headers=headers
            ) as r:
                data = await _read_limited(r, m.MAX_RESPONSE_BYTES)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise TrackerUnavailable(
                f"the tracker {self.url} did not answer {path}: {type(e).__name__}: {e}",
                hint="check the --tracker URL and that the tracker runs; retrying later",
            ) from e
        if status == 200:
            return m.decode_as(data, kind, max_bytes=m.MAX_RESPONSE_BYTES)
        raise _refusal(self.url, path, status, data)


async def _read_limited(r: aiohttp.ClientResponse, limit: int) -> bytes:
    if (r.content_length or 0) > limit:
        raise TrackerWireError(f"the tracker sent a {r.content_length}-byte answer")
    chunks, size = [], 0
    while chunk := await r.content.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise TrackerWireError(f"the tracker sent an answer over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _refusal(url: str, path: str, status: int, data: bytes) -> TrackerError:
    try:
        problem: m.Problem | None = m.decode_as(data, m.Problem)
    except TrackerWireError:
        problem = None  # not our tracker, or a proxy in between
    text = problem.message if problem else data[:200].decode("utf-8", "replace")
    if status == 409 and problem and problem.code == "register_first":
        return RegisterFirst(f"the tracker {url} does not know this agent: {text}")
    if status == 403 and problem and problem.code == "agent_id_taken":
        return AgentIdTaken(f"the tracker {url} refused this agent's id: {text}")
    if status == 503 and problem and problem.code == "full":
        return TrackerFull(f"the tracker {url} is full: {text}", hint="retrying later")
    return TrackerRefused(
        f"the tracker {url} refused {path} with HTTP {status}: {text}",
        hint="run the same hfswarm version on the tracker and the agents"
        if problem and problem.code == "unsupported_version"
        else None,
    )


Holdings = Callable[[], tuple[Iterable[str], Iterable[str]]]


class TrackerPresence:
    """Keeps one agent registered and its announce current.

    Each `step` heartbeats (register); it announces when the tracker says the record is
    ``new`` (first contact, expiry, tracker restart, or counts other than those of our
    last accepted announce, which every heartbeat carries) or when `changed` was called.
    An announce answered 409 (the tracker restarted between the two calls) is retried
    once in the same step. `run` loops `step` forever, backing off while the tracker is
    unreachable or refuses us; it never raises tracker errors (the agent works without a
    tracker).
    """

    def __init__(
        self,
        client: TrackerClient,
        *,
        agent_id: str,
        api_port: int,
        bt_port: int,
        holdings: Holdings,
        host: str = "",
        max_backoff: float = 30.0,
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.api_port = api_port
        self.bt_port = bt_port
        self.host = host
        self._holdings = holdings
        self._dirty = True
        self._wake = asyncio.Event()
        self._max_backoff = max_backoff
        self.registered: m.Registered | None = None  # the last answer, for status displays
        # The counts of our last accepted announce, sent with each heartbeat so that a
        # tracker that lost them says so. None: nothing accepted yet, or a tracker that
        # predates the field (it refused a register carrying it).
        self._announced: tuple[int, int] | None = None
        self._counts_understood = True

    def changed(self) -> None:
        """The held or fetching set changed: announce at the next step, soon."""
        self._dirty = True
        self._wake.set()

    async def step(self) -> float:
        """One heartbeat (and announce if needed); returns seconds until the next."""
        for _ in range(2):
            reg = await self._register()
            self.registered = reg
            if not (reg.new or self._dirty):
                return reg.heartbeat
            self._dirty = False
            self._announced = None  # until the tracker accepts the new sets
            held, fetching = self._holdings()
            try:
                answer = await self.client.announce(self.agent_id, held, fetching)
                self._announced = (answer.held, answer.fetching)
            except RegisterFirst:
                self._dirty = True  # it restarted between the two calls: once more
                continue
            except BaseException:
                self._dirty = True
                raise
            return reg.heartbeat
        raise TrackerRefused(
            f"the tracker {self.client.url} forgot this agent right after registering it, twice",
            hint="check that only one tracker answers at this URL",
        )

    async def _register(self) -> m.Registered:
        announced = self._announced if self._counts_understood else None
        try:
            return await self.client.register(
                self.agent_id, self.api_port, self.bt_port, self.host, announced
            )
        except TrackerRefused:
            if announced is None:
                raise
            # An older tracker refuses the counts it does not know: heartbeat without.
            self._counts_understood = False
            return await self.client.register(self.agent_id, self.api_port, self.bt_port, self.host)

    async def run(self) -> None:
        backoff = 1.0
        while True:
            self._wake.clear()
            try:
                delay = await self.step()
                backoff = 1.0
            except TrackerError as e:
                log.warning("tracker: %s", e.one_line())
                delay, backoff = backoff, min(backoff * 2, self._max_backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
