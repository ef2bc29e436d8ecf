"""Who is out there: the table of peer agents and the calls made to them.

Sources feed candidate addresses (static ``--peer`` now; mDNS and the tracker add theirs
through `offer`). A candidate becomes a peer once its ``/v1/health`` answers, and stays
one while it keeps answering: the table runs its own liveness checks, because a peer
killed with SIGKILL sends no goodbye. Our own address is recognised by agent id and
skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aiohttp

from peer import wire
from peer.errors import PeerMisbehaved
from peer.verification.hashing import BlobHasher, HashKind

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"


@dataclass(frozen=True)
class PeerInfo:
    agent_id: str
    host: str
    api_port: int
    bt_port: int

    @property
    def api_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.api_port}"


@dataclass(frozen=True)
class Offer:
    peer: PeerInfo
    manifest: wire.Manifest
    complete: bool = True  # False: the peer is fetching it and serves what it verified


class PeerTable:
    """Candidate addresses -> live peers, with liveness checks every `interval` s."""

    def __init__(
        self, self_id: str, *, interval: float = 5.0, timeout: float = 3.0, misses_allowed: int = 2
    ) -> None:
        self.self_id = self_id
        self.interval = interval
        self.timeout = timeout
        self.misses_allowed = misses_allowed
        self._candidates: dict[tuple[str, int], str] = {}  # (host, port) -> source
        self._live: dict[tuple[str, int], PeerInfo] = {}
        self._misses: dict[tuple[str, int], int] = {}
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> PeerTable:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    # -- sources ---------------------------------------------------------------------

    def offer(self, host: str, port: int, source: str = "static") -> None:
        key = (host, port)
        if key not in self._candidates:
            self._candidates[key] = source
            self._changed.set()

    def withdraw(self, host: str, port: int) -> None:
        """A source says the peer left (mDNS goodbye); drop it now."""
        self._candidates.pop((host, port), None)
        self._live.pop((host, port), None)

    def live(self) -> list[PeerInfo]:
        return list(self._live.values())

    # -- liveness --------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.check_all()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.interval)

    async def check_all(self) -> None:
        keys = list(self._candidates)
        await asyncio.gather(*(self._check(k) for k in keys))

    async def check_new(self) -> None:
        """Check only the candidates not yet live (a lookup just offered them)."""
        keys = [k for k in self._candidates if k not in self._live]
        await asyncio.gather(*(self._check(k) for k in keys))

    async def _check(self, key: tuple[str, int]) -> None:
        try:
            health = await self._health(*key)
        except (aiohttp.ClientError, TimeoutError, OSError, wire.WireError) as exc:
            misses = self._misses.get(key, 0) + 1
            self._misses[key] = misses
            if key in self._live and misses > self.misses_allowed:
                log.info("peer %s:%s stopped answering (%s); dropped", *key, exc)
                self._live.pop(key, None)
            return
        self._misses[key] = 0
        if health.agent_id == self.self_id:
            self._candidates.pop(key, None)  # that is us
            return
        info = PeerInfo(health.agent_id, key[0], key[1], health.bt_port)
        if self._live.get(key) != info:
            log.info("peer %s at %s:%s (bt %s)", info.agent_id[:8], *key, info.bt_port)
        self._live[key] = info

    async def _health(self, host: str, port: int) -> wire.Health:
        assert self._session is not None
        h = f"[{host}]" if ":" in host else host
        async with self._session.get(f"http://{h}:{port}/v1/health") as r:
            if r.status != 200:
                raise wire.WireError(f"health answered HTTP {r.status}")
            return wire.decode_as(await r.read(), wire.Health)

    def mark_dead(self, peer: PeerInfo) -> None:
        self._live.pop((peer.host, peer.api_port), None)

    # -- asking peers ----------------------------------------------------------------

    async def find(self, blob_ids: tuple[str, ...]) -> dict[str, list[Offer]]:
        """Ask every live peer which of these blobs it holds; offers per blob id."""
        offers, _ = await self.survey(blob_ids)
        return offers

    async def survey(
        self, blob_ids: tuple[str, ...]
    ) -> tuple[dict[str, list[Offer]], dict[str, list[tuple[PeerInfo, wire.Claim]]]]:
        """`find`, plus the herd claims peers hold on these blobs (peers that want one
        nobody has yet, and which of them fetches it from the mirror)."""
        peers = self.live()
        answers = await asyncio.gather(*(self._have(p, blob_ids) for p in peers))
        offers: dict[str, list[Offer]] = {}
        claims: dict[str, list[tuple[PeerInfo, wire.Claim]]] = {}
        wanted = set(blob_ids)
        for peer, answer in zip(peers, answers, strict=True):
            if answer is None:
                continue
            for m, complete in [(m, True) for m in answer.manifests] + [
                (m, False) for m in answer.fetching
            ]:
                if m.blob_id in wanted:
                    offers.setdefault(m.blob_id, []).append(Offer(peer, m, complete))
            for c in answer.claims:
                if c.blob_id in wanted:
                    claims.setdefault(c.blob_id, []).append((peer, c))
        return offers, claims

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
        )

    async def _have_batch(
        self, peer: PeerInfo, blob_ids: tuple[str, ...]
    ) -> wire.HaveResponse | None:
        assert self._session is not None
        body = wire.encode(wire.HaveRequest(blob_ids=blob_ids))
        try:
            async with self._session.post(
                f"{peer.api_url}/v1/have", data=body, headers={"Content-Type": MSGPACK}
            ) as r:
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
