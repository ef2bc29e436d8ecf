"""Who is out there: the table of peer agents and the calls made to them.

Sources feed candidate addresses (static ``--peer`` now; mDNS and the tracker add theirs
through `offer`). A candidate becomes a peer once its ``/v1/health`` answers, and stays
one while it keeps answering: the table runs its own liveness checks, because a peer
killed with SIGKILL sends no goodbye. Our own address is recognised by agent id and
skipped.

Addresses come from the network, so anyone can name any host:port. A candidate that
fails its check is retried later and later (`Schedule`: exponential, capped, jittered);
one from mDNS or a tracker that kept failing for `RetryPolicy.drop_after` s is dropped,
and remembered for a while so that offering it again does not restart the retries.
Static peers are retried forever. A goodbye (mDNS) is only a reason to check at once:
anyone can send one, so only a failed check removes the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp

from peer import wire
from peer.cluster.tls import Cluster, MemberConnector
from peer.errors import NetworkError, PeerMisbehaved
from peer.verification.hashing import BlobHasher, HashKind

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"


@dataclass(frozen=True)
class PeerInfo:
    agent_id: str
    host: str
    api_port: int
    bt_port: int
    tls: bool = False  # cluster mode: the peer API over mutual TLS
    stream_port: int = 0  # cluster mode: its member blob stream (0: none)

    @property
    def api_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.api_port}"


@dataclass(frozen=True)
class Offer:
    peer: PeerInfo
    manifest: wire.Manifest
    complete: bool = True  # False: the peer is fetching it and serves what it verified
    deal: str = ""  # fetching: what it deals the blob's feeders over ("": not said)


Key = tuple[str, int]

# Sources whose addresses anyone on the LAN can inject: dropped when they keep failing.
DISCOVERED = frozenset({"mdns", "tracker"})


@dataclass(frozen=True)
class RetryPolicy:
    """When candidates are checked. Healthy ones every `interval` s; a failing one after
    `first_retry` * 2^(failures-1) s, at most `max_backoff`, each delay times a random
    factor in 1 +- `jitter` (so a herd does not retry in step). A discovered candidate
    failing for `drop_after` s (and at least `drop_failures` checks) is dropped; offered
    again within `forget_after` s it resumes its backoff where it was."""

    interval: float = 5.0
    first_retry: float = 5.0
    max_backoff: float = 300.0
    jitter: float = 0.2
    drop_after: float = 300.0
    drop_failures: int = 4
    forget_after: float = 3600.0
    forget_max: int = 4096  # dropped candidates remembered at most
    # After a goodbye: checks this many seconds after it; any failure removes the peer.
    goodbye_checks: tuple[float, ...] = (0.0, 1.0, 3.0)


@dataclass
class _Entry:
    source: str
    due: float
    failures: int = 0
    failing_since: float | None = None
    goodbye: list[float] = field(default_factory=list)  # pending re-checks after a goodbye


class Schedule:
    """Pure: which candidates to check when, who backs off, who is dropped.

    Fed with results and `now`; the table does the checking."""

    def __init__(self, policy: RetryPolicy | None = None, rng: random.Random | None = None):
        self.policy = policy or RetryPolicy()
        self._rng = rng or random.Random()
        self._entries: dict[Key, _Entry] = {}
        self._dropped: dict[Key, tuple[_Entry, float]] = {}  # key -> (entry, dropped at)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def keys(self) -> list[Key]:
        return list(self._entries)

    def source(self, key: Key) -> str | None:
        e = self._entries.get(key)
        return e.source if e is not None else None

    def failures(self, key: Key) -> int:
        e = self._entries.get(key) or self._dropped.get(key, (None, 0.0))[0]
        return e.failures if e is not None else 0

    def offer(self, key: Key, source: str, now: float) -> bool:
        """A source names this address. True: it is new and due now."""
        e = self._entries.get(key)
        if e is not None:
            if source == "static":
                e.source = source  # static wins: never dropped
            return False
        self._forget_old(now)
        gone = self._dropped.pop(key, None)
        if gone is not None and source != "static":
            self._entries[key] = gone[0]  # not again from scratch: where its backoff was
            return False
        self._entries[key] = _Entry(source, now)
        return True

    def remove(self, key: Key) -> None:
        self._entries.pop(key, None)

    def goodbye(self, key: Key, now: float) -> None:
        """It said it left: check it now (and a few times soon after)."""
        e = self._entries.get(key)
        if e is not None:
            e.goodbye = [now + t for t in self.policy.goodbye_checks]
            e.due = min(e.due, e.goodbye[0])

    def due(self, now: float) -> list[Key]:
        return [k for k, e in self._entries.items() if e.due <= now]

    def next_due(self) -> float | None:
        return min((e.due for e in self._entries.values()), default=None)

    def succeeded(self, key: Key, now: float) -> None:
        e = self._entries.get(key)
        if e is None:
            return
        e.failures, e.failing_since = 0, None
        e.goodbye = [t for t in e.goodbye if t > now]
        e.due = e.goodbye[0] if e.goodbye else now + self.policy.interval

    def failed(self, key: Key, now: float, *, live: bool = False) -> str:
        """Note a failed check: "retry" (kept, backed off), "goodbye" (it said it left
        and does not answer: not a peer any more, kept only if static) or "drop".
        A `live` peer missing a check is checked again at the normal interval: one
        lost answer must not make a working peer wait minutes."""
        p = self.policy
        e = self._entries.get(key)
        if e is None:
            return "drop"
        e.failures += 1
        if e.failing_since is None:
            e.failing_since = now
        said_goodbye = bool(e.goodbye)
        e.goodbye = []
        delay = (
            p.interval if live else min(p.max_backoff, p.first_retry * 2 ** min(e.failures - 1, 30))
        )
        e.due = now + delay * self._rng.uniform(1 - p.jitter, 1 + p.jitter)
        if e.source in DISCOVERED and (
            said_goodbye
            or (now - e.failing_since >= p.drop_after and e.failures >= p.drop_failures)
        ):
            del self._entries[key]
            if said_goodbye:
                return "drop"  # it left cleanly: may come back afresh
            self._dropped[key] = (e, now)
            while len(self._dropped) > p.forget_max:
                del self._dropped[next(iter(self._dropped))]
            return "drop"
        return "goodbye" if said_goodbye else "retry"

    def _forget_old(self, now: float) -> None:
        old = [k for k, (_, at) in self._dropped.items() if now - at > self.policy.forget_after]
        for k in old:
            del self._dropped[k]


class PeerTable:
    """Candidate addresses -> live peers, with liveness checks every `interval` s and
    backoff for the failing (`Schedule`)."""

    def __init__(
        self,
        self_id: str,
        *,
        interval: float = 5.0,
        timeout: float = 3.0,
        misses_allowed: int = 2,
        policy: RetryPolicy | None = None,
        cluster: Cluster | None = None,
        check_manifest: Callable[[wire.Manifest, str], None] | None = None,
        on_ban: Callable[[str, str, str], None] = lambda _addr, _why, _blob: None,
        ban_for: float = 600.0,
    ) -> None:
        self.self_id = self_id
        # Cluster mode: every call over mutual TLS, and the certificate's agent id must
        # be the one the peer claims (`_member_of`).
        self.cluster = cluster
        self._members: MemberConnector | None = None
        # Cluster mode: a peer whose /v1/have carries a manifest that fails this check
        # (raising PeerMisbehaved; args: manifest, the peer's agent id) is banned for
        # `ban_for` s: its answers are dropped, it is not a live peer.
        self._check_manifest = check_manifest
        self._on_ban = on_ban
        self._ban_for = ban_for
        self._banned: dict[str, float] = {}  # agent id -> banned until (monotonic)
        self.timeout = timeout
        self.misses_allowed = misses_allowed
        self.schedule = Schedule(policy or RetryPolicy(interval=interval))
        self.interval = self.schedule.policy.interval
        self._live: dict[Key, PeerInfo] = {}
        self._inflight: dict[Key, asyncio.Future[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> PeerTable:
        if self.cluster is not None:
            self._members = MemberConnector(self.cluster)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), connector=self._members
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    # -- sources ---------------------------------------------------------------------

    def offer(self, host: str, port: int, source: str = "static") -> None:
        if self.schedule.offer((host, port), source, time.monotonic()):
            self._changed.set()

    def withdraw(self, host: str, port: int) -> None:
        """A source says the peer left (mDNS goodbye). Anyone can say so: check it now,
        and drop it only if it does not answer."""
        self.schedule.goodbye((host, port), time.monotonic())
        self._changed.set()

    def live(self) -> list[PeerInfo]:
        return list(self._live.values())

    def candidates(self) -> list[tuple[str, int]]:
        return self.schedule.keys()

    # -- liveness --------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.check_due()
            self._changed.clear()
            nxt = self.schedule.next_due()
            wait = self.interval if nxt is None else nxt - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.05, wait))

    async def check_all(self) -> None:
        """Check every candidate now, backed off or not (at start, and in tests)."""
        await asyncio.gather(*(self._check(k) for k in self.schedule.keys()))

    async def check_due(self) -> None:
        keys = self.schedule.due(time.monotonic())
        await asyncio.gather(*(self._check(k) for k in keys))

    async def check_new(self) -> None:
        """Check the candidates not yet live that are due (a lookup just offered them;
        those backing off wait for their turn)."""
        keys = [k for k in self.schedule.due(time.monotonic()) if k not in self._live]
        await asyncio.gather(*(self._check(k) for k in keys))

    async def _check(self, key: Key) -> None:
        # Lookups run concurrently (one per blob): one check per address at a time.
        task = self._inflight.get(key)
        if task is None:
            task = self._inflight[key] = asyncio.ensure_future(self._check_once(key))
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        await asyncio.shield(task)

    async def _check_once(self, key: Key) -> None:
        try:
            health = await self._health(*key)
        except (aiohttp.ClientError, TimeoutError, OSError, wire.WireError) as exc:
            outcome = self.schedule.failed(key, time.monotonic(), live=key in self._live)
            if key in self._live and (
                outcome != "retry" or self.schedule.failures(key) > self.misses_allowed
            ):
                log.info("peer %s:%s stopped answering (%s); dropped", *key, exc)
                self._live.pop(key, None)
            if outcome == "drop":
                log.info("candidate %s:%s kept failing (%s); forgotten", *key, exc)
            return
        if health.agent_id == self.self_id:
            self.schedule.remove(key)  # that is us
            return
        if self.is_banned(health.agent_id):
            self.schedule.succeeded(key, time.monotonic())
            self._live.pop(key, None)
            return
        self.schedule.succeeded(key, time.monotonic())
        if key not in self.schedule:
            return  # withdrawn while we asked
        member = self.cluster is not None
        info = PeerInfo(
            health.agent_id,
            key[0],
            key[1],
            health.bt_port,
            tls=member,
            stream_port=health.stream_port if member else 0,  # streams are between members
        )
        if self._live.get(key) != info:
            log.info("peer %s at %s:%s (bt %s)", info.agent_id[:8], *key, info.bt_port)
        self._live[key] = info

    async def _health(self, host: str, port: int) -> wire.Health:
        assert self._session is not None
        h = f"[{host}]" if ":" in host else host
        scheme = "https" if self.cluster is not None else "http"
        async with self._session.get(f"{scheme}://{h}:{port}/v1/health") as r:
            member = self._member_of(r)
            if r.status != 200:
                raise wire.WireError(f"health answered HTTP {r.status}")
            health = wire.decode_as(await r.read(), wire.Health)
        if member is not None and member != health.agent_id:
            raise wire.WireError(
                f"claims agent id {health.agent_id[:8]} but its certificate is {member[:8]}"
            )
        return health

    def _member_of(self, r: aiohttp.ClientResponse, expect: str | None = None) -> str | None:
        """Cluster mode: the agent id of the certificate behind answer `r` (the handshake
        checked the CA, the connector the CRL), which must be `expect` if given. Open
        mode: None."""
        if self._members is None:
            return None
        got = self._members.member_at.get((str(r.url.host), int(r.url.port or 0)), "")
        if expect is not None and got != expect:
            raise wire.WireError(f"its certificate is {got[:8]}, not {expect[:8]}")
        return got

    def is_banned(self, agent_id: str) -> bool:
        until = self._banned.get(agent_id)
        if until is not None and until <= time.monotonic():
            del self._banned[agent_id]
            return False
        return until is not None

    def ban(self, peer: PeerInfo, reason: str, blob_id: str = "") -> None:
        """Stop using this peer for `ban_for` s (it sent something only a liar sends)."""
        if len(self._banned) > 4096:
            self._banned.clear()
        self._banned[peer.agent_id] = time.monotonic() + self._ban_for
        self._live.pop((peer.host, peer.api_port), None)
        log.warning("peer %s at %s banned: %s", peer.agent_id[:8], peer.api_url, reason)
        self._on_ban(peer.host, reason, blob_id)

    def _vetted(self, peer: PeerInfo, answer: wire.HaveResponse) -> wire.HaveResponse | None:
        """Cluster mode: the answer if every manifest in it checks out; else the peer is
        banned and its whole answer dropped (never voted on)."""
        if self._check_manifest is None:
            return answer
        for m in (*answer.manifests, *answer.fetching):
            try:
                self._check_manifest(m, peer.agent_id)
            except PeerMisbehaved as exc:
                self.ban(peer, exc.one_line(), m.blob_id)
                return None
        return answer

    def mark_dead(self, peer: PeerInfo) -> None:
        self._live.pop((peer.host, peer.api_port), None)

    # -- asking peers ----------------------------------------------------------------

    async def find(self, blob_ids: tuple[str, ...]) -> dict[str, list[Offer]]:
        """Ask every live peer which of these blobs it holds; offers per blob id."""
        offers, _, _ = await self.survey(blob_ids)
        return offers

    async def survey(
        self, blob_ids: tuple[str, ...]
    ) -> tuple[dict[str, list[Offer]], dict[str, list[tuple[PeerInfo, wire.Claim]]], set[str]]:
        """`find`, plus the herd claims peers hold on these blobs (peers that want one
        nobody has yet, and which of them fetches it from the mirror), and the agents
        that answered (one with no claim on a blob holds none)."""
        peers = self.live()
        answers = await asyncio.gather(*(self._have(p, blob_ids) for p in peers))
        offers: dict[str, list[Offer]] = {}
        claims: dict[str, list[tuple[PeerInfo, wire.Claim]]] = {}
        answered: set[str] = set()
        wanted = set(blob_ids)
        for peer, raw in zip(peers, answers, strict=True):
            answer = self._vetted(peer, raw) if raw is not None else None
            if answer is None:
                continue
            answered.add(peer.agent_id)
            deals = {d.blob_id: d.over for d in answer.deals}
            for m in answer.manifests:
                if m.blob_id in wanted:
                    offers.setdefault(m.blob_id, []).append(Offer(peer, m))
            for m in answer.fetching:
                if m.blob_id in wanted:
                    offer = Offer(peer, m, False, deals.get(m.blob_id, ""))
                    offers.setdefault(m.blob_id, []).append(offer)
            for c in answer.claims:
                if c.blob_id in wanted:
                    claims.setdefault(c.blob_id, []).append((peer, c))
        return offers, claims, answered

    async def _have(self, peer: PeerInfo, blob_ids: tuple[str, ...]) -> wire.HaveResponse | None:
        """One peer's answer about `blob_ids`, asked in batches of wire.MAX_HAVE_IDS
        (what a peer answers at once); None if it failed to answer any batch."""
        n = wire.MAX_HAVE_IDS
        batches = [blob_ids[i : i + n] for i in range(0, len(blob_ids), n)]
        parts = [await self._have_batch(peer, batch) for batch in batches]
        if not parts or any(p is None for p in parts):
            return None
        return wire.HaveResponse(
            manifests=tuple(m for p in parts if p for m in p.manifests),
            fetching=tuple(m for p in parts if p for m in p.fetching),
            claims=tuple(c for p in parts if p for c in p.claims),
            deals=tuple(d for p in parts if p for d in p.deals),
        )

    async def _have_batch(
        self, peer: PeerInfo, blob_ids: tuple[str, ...]
    ) -> wire.HaveResponse | None:
        assert self._session is not None
        body = wire.encode(wire.HaveRequest(blob_ids=blob_ids))
        try:
            async with self._session.post(
                f"{peer.api_url}/v1/have",
                params=[wire.DEALS_QUERY],
                data=body,
                headers={"Content-Type": MSGPACK},
            ) as r:
                self._member_of(r, peer.agent_id)
                if r.status != 200:
                    return None
                msg = wire.decode_as(await r.read(), wire.HaveResponse)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("peer %s did not answer /v1/have: %s", peer.api_url, exc)
            return None
        except wire.WireError as exc:
            log.warning("peer %s sent a bad /v1/have answer: %s", peer.api_url, exc)
            return None
        return msg

    async def revisions(
        self, request: wire.RevisionRequest
    ) -> list[tuple[PeerInfo, wire.RevisionManifest]]:
        """Ask every live peer for its revision manifest of one repo revision. The
        answers are only well-formed: `peer.manifests.revisions.accept_revision_manifest`
        decides whether one may be used."""
        peers = self.live()
        body = wire.encode(request)
        answers = await asyncio.gather(*(self._revision(p, body) for p in peers))
        return [(p, m) for p, m in zip(peers, answers, strict=True) if m is not None]

    async def _revision(self, peer: PeerInfo, body: bytes) -> wire.RevisionManifest | None:
        assert self._session is not None
        try:
            async with self._session.post(
                f"{peer.api_url}/v1/revisions", data=body, headers={"Content-Type": MSGPACK}
            ) as r:
                self._member_of(r, peer.agent_id)
                if r.status != 200:
                    return None
                return wire.decode_as(await r.read(), wire.RevisionManifest)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("peer %s did not answer /v1/revisions: %s", peer.api_url, exc)
        except wire.WireError as exc:
            log.warning("peer %s sent a bad /v1/revisions answer: %s", peer.api_url, exc)
        return None

    async def fetch_small_blob(self, peer: PeerInfo, blob_id: str, size: int) -> bytes:
        """A whole small blob over HTTP, checked against its id before it is returned."""
        assert self._session is not None
        async with self._session.get(f"{peer.api_url}/v1/blobs/{blob_id}") as r:
            try:
                self._member_of(r, peer.agent_id)
            except wire.WireError as exc:
                raise PeerMisbehaved(f"peer {peer.api_url}: {exc}") from None
            if r.status != 200:
                raise PeerMisbehaved(f"peer {peer.api_url} answered {r.status} for {blob_id}")
            if (r.content_length or 0) > size:
                raise PeerMisbehaved(f"peer {peer.api_url} offers too many bytes for {blob_id}")
            data = await r.read()
        hasher = BlobHasher(HashKind.of_blob_id(blob_id), len(data))
        hasher.update(data)
        if len(data) != size or hasher.hexdigest() != blob_id:
            raise PeerMisbehaved(f"peer {peer.api_url} sent wrong bytes for {blob_id}")
        return data

    @contextlib.asynccontextmanager
    async def relay(
        self, peer: PeerInfo, blob_id: str, start: int, size: int, *, idle: float
    ) -> AsyncIterator[aiohttp.StreamReader]:
        """A herd leader's relay of a blob it fetches (its ``/v1/relay``) from byte
        `start`: the body, bytes [start, size) as the leader gets them, or cut short.
        Not verified: the caller hashes the whole blob. NetworkError: no relay there
        (now); PeerMisbehaved: an answer no honest agent gives."""
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=idle)
        try:
            async with self._session.get(
                f"{peer.api_url}/v1/relay/{blob_id}",
                headers={"Range": f"bytes={start}-"},
                timeout=timeout,
            ) as r:
                try:
                    self._member_of(r, peer.agent_id)
                except wire.WireError as exc:
                    raise PeerMisbehaved(f"peer {peer.api_url}: {exc}") from None
                if r.status != 206:
                    raise NetworkError(f"peer {peer.api_url} relays no {blob_id[:12]} ({r.status})")
                expect = f"bytes {start}-{size - 1}/{size}"
                if r.headers.get("Content-Range") != expect or r.content_length != size - start:
                    raise PeerMisbehaved(f"peer {peer.api_url} relays another range of {blob_id}")
                yield r.content
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise NetworkError(f"the relay from {peer.api_url} broke: {exc!r}") from None
