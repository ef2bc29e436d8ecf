"""Getting one blob: from the cache, from peers (small blobs over HTTP, the rest through
the libtorrent swarm with the mirror filling in piece by piece), or from the mirror alone.

The per-piece choice between peers and the mirror is made by the pure policy in
`peer.scheduling.policy`; this module only carries its decisions out and feeds it what
happened. Whatever the path, the whole blob is hashed against its Hub id before it is
renamed into ``blobs/``; a blob that fails is fetched again cleanly from the mirror.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peer import wire
from peer.agent.herd import Herd, Lookup
from peer.agent.herd_copy import LeaderCopy
from peer.agent.seeding import HeldFor, SeedIndex
from peer.agent.state import StateDir
from peer.agent.survey import SurveyBatch
from peer.aio import primary_error
from peer.cache.hf_cache import RepoCache, find_blob_anywhere, sync_file, translate_os_error
from peer.cache.partial import PartialBlob
from peer.cache.writeback import WritebackWorker
from peer.cluster.tls import Cluster
from peer.config import AgentConfig
from peer.discovery.peer_table import Offer, PeerInfo, PeerTable
from peer.errors import HfswarmError, IntegrityError, NetworkError, NotShared, PeerMisbehaved
from peer.hub.metadata import RemoteFile, Snapshot
from peer.manifests import CheckedManifests, V2Tree
from peer.manifests.manifest import manifest_tree
from peer.manifests.merkle import piece_hash
from peer.manifests.revisions import is_local_repo
from peer.scheduling.feeders import (
    ConnectHolders,
    DropHolders,
    FeederChoice,
    FeederConfig,
    deal_over,
)
from peer.scheduling.herd import HerdConfig
from peer.scheduling.policy import PolicyConfig, min_piece_rate_under
from peer.serving.sharing import Access, Provenance, Visibility, may_serve, repo_key
from peer.transfer.events import PieceFinished, TorrentFinished
from peer.transfer.inflight import InFlightBlob
from peer.transfer.member_stream import MemberBusy, MemberStream
from peer.transfer.mirror_blob import BlobCounters, from_mirror
from peer.transfer.mirror_ranges import MirrorFetcher
from peer.transfer.rate import Throttle
from peer.transfer.swarm import (
    EventStream,
    SwarmError,
    SwarmSession,
    TorrentExists,
    UnknownTorrent,
)
from peer.transfer.swarm_download import (
    Action,
    BanHost,
    CancelMirrorPiece,
    ConnectPeer,
    FeedMirrorPiece,
    FlushForReaders,
    InOrder,
    Input,
    LowerPieces,
    Members,
    MirrorPieceError,
    MirrorPieceFed,
    PeerSample,
    PreferPieces,
    Readers,
    ReadersChanged,
    Rejoined,
    SetPieceDeadline,
    StartSwarming,
    SwarmDownload,
    SwarmDownloadConfig,
    SwarmSample,
    TakeSample,
    Wake,
    WatchTheEnd,
)
from peer.transfer.swarm_download import Failed as SwarmFailed
from peer.verification.hashing import PrefixHasher, Verdict, hash_file

log = logging.getLogger(__name__)

# libtorrent prefers pieces at priority 7 over its default 4.
PREFERRED = 7
DEFAULT_PRIORITY = 4
# While a blob swarms, the live peers are asked again this often: those that started
# swarming it since are connected too (downloaders that start together otherwise all see
# only the first seeder, which then sends nearly every byte).
RESURVEY_EVERY = 2.0
# ... and first this soon, with feeders on: until then every downloader feeds (takes the
# blob from its complete holders), the seeder's port spread over all of them.
FIRST_RESURVEY = 0.5
# A follower cut off near the end of a lead (or slower than the leader) takes the rest of
# the blob from the leader for this long after the lead ended; after that the leader's
# copy is one more seed, reached through the swarm like any other.
RELAY_GRACE = 120.0


class HashFollower:
    """Runs a `PrefixHasher` in a thread behind a swarm download: `to(end)` once
    ``[0, end)`` is checked and flushed; `verdict` once every piece is."""

    def __init__(self, hasher: PrefixHasher) -> None:
        self._hasher = hasher
        self._target = 0
        self._task: asyncio.Task[None] | None = None

    def to(self, end: int) -> None:
        self._target = max(self._target, end)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self._hasher.position < self._target:
            before = self._hasher.position
            await asyncio.to_thread(self._hasher.hash_to, self._target)
            if self._hasher.position == before:
                return  # the file is short: the verdict says so

    async def verdict(self) -> Verdict:
        if self._task is not None:
            await self._task
        return await asyncio.to_thread(self._hasher.verdict)

    @property
    def position(self) -> int:
        return self._hasher.position

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass
class ActiveFetch:
    """A blob being fetched, as `/v1/status` shows it (its counters move as bytes land)."""

    repo: str  # repo key, "model/org/name"
    path: str  # the file it was asked for (the first, when several name the blob)
    blob_id: str
    counters: BlobCounters
    started: float  # time.monotonic()
    source: str = "cache"  # cache, peers, herd (waiting for a leader), mirror


# A peer this agent bans: (address, why, blob id)
OnBan = Callable[[str, str, str], None]


def _siblings(snapshot: Snapshot, piece_size: int) -> list[str]:
    """The snapshot's blobs that swarm (a blob's feeders are dealt over them): the same
    for every agent fetching that snapshot."""
    return [f.blob_id for f in snapshot.files if f.size > piece_size]


class BlobFetcher:
    """Runs blob fetches for the agent; concurrent requests for one blob share a task."""

    def __init__(
        self,
        config: AgentConfig,
        swarm: SwarmSession,
        peers: PeerTable,
        seeds: SeedIndex,
        state: StateDir,
        *,
        lookups: Sequence[Lookup] = (),
        on_change: Callable[[], None] = lambda: None,
        on_ban: OnBan = lambda _host, _why, _blob: None,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        # Cluster mode: large blobs come over a member's blob stream when one is free.
        self.cluster = cluster
        self._member_tls = cluster.client_context() if cluster is not None else None
        # The download cap on member streams (libtorrent applies its own to swarms).
        self.member_download = Throttle(config.max_download_rate)
        self.on_ban = on_ban
        self._active: dict[str, ActiveFetch] = {}  # blob id -> what /v1/status shows
        self.swarm = swarm
        self.peers = peers
        self.seeds = seeds
        self.cluster_share = seeds.cluster_share  # members share private/gated blobs
        self.state = state
        self.uploaded_by_removed = 0
        self._inflight: dict[str, asyncio.Future[Path]] = {}
        self._downloading: set[str] = set()  # info-hashes being downloaded (for resume)
        self._swarming: dict[str, wire.Manifest] = {}  # blob id -> manifest, in progress
        self._deals: dict[str, str] = {}  # blob id -> what its feeders are dealt over
        # lookups: extra discovery (trackers) asked before peers, by the fetcher and the
        # herd, with the blob ids; on_change: our herd claims changed (tell the trackers).
        self.herd = Herd(
            peers.self_id,
            peers,
            self._valid,
            config=HerdConfig(settle=config.herd_settle, leader_timeout=config.herd_leader_timeout),
            lookups=lookups,
            on_change=on_change,
        )
        # Blobs being fetched, as far as a reader may stream them (HF_ENDPOINT mode).
        self._flights: dict[str, InFlightBlob] = {}
        self._relayed: set[str] = set()  # blobs led for the herd: followers copy them
        self._led: dict[str, float] = {}  # blob -> when its relay grace ends (monotonic)
        self._flight_added = asyncio.Event()  # replaced at each one: see `flight_of`
        # The mirror cap, shared by every download's `MirrorFetcher` (`hfswarm limits`).
        self.mirror_throttle = Throttle(config.mirror_max_rate)
        # At most this many blobs move at once (a herd wait takes no slot).
        self._transfers = asyncio.Semaphore(config.download.max_files)
        # The swarms' re-surveys, one question per peer for all of them (agent/survey.py).
        self.resurveys = SurveyBatch(self._find)
        # Each re-survey finds the same manifests again: checked once (`_valid`).
        self._check_manifest = CheckedManifests()
        # Swarm downloads start each hashed range's writeback (see `_swarm`).
        self._writeback = WritebackWorker()

    def stream_of(self, blob_id: str) -> InFlightBlob | None:
        return self._flights.get(blob_id)

    def relay_of(self, blob_id: str) -> InFlightBlob | None:
        """A blob this agent leads for its herd, as far as fetched: its followers may
        copy it (`/v1/relay`). Only blobs a herd may see: a private or gated one never
        gets there (open mode fetches it from the mirror alone)."""
        return self._flights.get(blob_id) if blob_id in self._relayed else None

    def led_lately(self, blob_id: str) -> bool:
        """A blob this agent leads for its herd, or led within `RELAY_GRACE`: only
        these go out over `/v1/relay` (any other large blob goes through the swarm)."""
        now = time.monotonic()
        for b in [b for b, until in self._led.items() if until <= now]:
            del self._led[b]
        return blob_id in self._relayed or blob_id in self._led

    async def flight_of(self, blob_id: str, until: asyncio.Future[Any]) -> InFlightBlob | None:
        """The flight of `blob_id` once its fetch registered it; None if `until` (the
        fetch the caller follows) ends first. Waits on a signal, not a clock."""
        while (flight := self._flights.get(blob_id)) is None and not until.done():
            added: asyncio.Future[Any] = asyncio.ensure_future(self._flight_added.wait())
            try:
                await asyncio.wait({added, until}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                added.cancel()
        return flight

    def busy_ids(self) -> set[str]:
        """Blobs being fetched or streamed right now (never evicted)."""
        return {*self._inflight, *self._flights}

    def active(self) -> list[ActiveFetch]:
        """The blobs being fetched now (one entry per blob, whoever asked for it)."""
        return list(self._active.values())

    def _source(self, blob_id: str, source: str) -> None:
        entry = self._active.get(blob_id)
        if entry is not None:
            entry.source = source

    def fetching_ids(self) -> list[str]:
        """Blobs we swarm, or claim in a herd (announced to trackers as fetching)."""
        return list(dict.fromkeys([*self._swarming, *self.herd.claimed_ids()]))

    def fetching_manifests(self) -> list[wire.Manifest]:
        return list(self._swarming.values())

    def fetching_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]:
        """Blobs this agent is swarming now: peers may join and take verified pieces."""
        return [self._swarming[b] for b in blob_ids if b in self._swarming]

    def deals_for(self, blob_ids: tuple[str, ...]) -> list[wire.Deal]:
        """Of those, the blobs it deals each one's feeders over (`feeders.deal_over`)."""
        return [wire.Deal(blob_id=b, over=self._deals[b]) for b in blob_ids if b in self._deals]

    # -- entry point -----------------------------------------------------------------

    async def obtain(
        self,
        snapshot: Snapshot,
        file: RemoteFile,
        mirror: MirrorFetcher,
        counters: BlobCounters,
        access: Access,
    ) -> Path:
        """The verified blob in this repo's ``blobs/``, in the source order: this repo,
        this cache (another repo), peers, the herd, the mirror. `access` says on whose
        word the request stands: a blob this agent holds for a private or gated repo is
        reused only for a request the mirror allowed (`peer.serving.sharing.may_serve`)."""
        repo = RepoCache(self.config.hub.cache_dir, snapshot.repo_type, snapshot.repo_id)
        cached = await self._in_repo(repo, file, access)
        if cached is not None:
            counters.had()
            return cached
        shared = self._inflight.get(file.blob_id)
        if shared is not None:  # another download is fetching this very blob
            source = await asyncio.shield(shared)
            self._check_reuse(file, access)
            return await self._adopt(repo, source, file, counters, access)
        fut: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._inflight[file.blob_id] = fut
        flight = self._flights[file.blob_id] = InFlightBlob(file.blob_id, file.size)
        self._flight_added.set()
        self._flight_added = asyncio.Event()
        self._active[file.blob_id] = ActiveFetch(
            access.repo, file.path, file.blob_id, counters, time.monotonic()
        )
        try:
            path = await self._obtain(repo, snapshot, file, mirror, counters, access)
            fut.set_result(path)
            return path
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            fut.exception()  # retrieved: waiters get it, nobody logs "never retrieved"
            # Its readers end now (a follower's relay too), not at their idle cut.
            flight.fail()
            raise
        finally:
            self._inflight.pop(file.blob_id, None)
            self._flights.pop(file.blob_id, None)
            self._active.pop(file.blob_id, None)

    async def access(self, snapshot: Snapshot, mirror: MirrorFetcher) -> Access:
        """On whose word a download stands (`peer.serving.sharing.Access`). A snapshot
        listed by the mirror with the caller's token: the mirror's word; a private or
        gated one is checked once more with a 1-byte read of one of its files (a gated
        repo lists its files to anyone), before a blob held here is reused for it."""
        key = repo_key(snapshot.repo_type, snapshot.repo_id)
        if not snapshot.mirror or is_local_repo(snapshot.repo_id):
            return Access(key, None, mirror_allowed=False)
        visibility = Visibility.of_mirror_answer(private=snapshot.private, gated=snapshot.gated)
        probe = next((f for f in snapshot.files if f.size > 0), None)
        if visibility is not Visibility.PUBLIC and probe is not None:
            await mirror.fetch_range(snapshot, probe, 0, 1)  # GatedRepo / RepoNotFound
        return Access(key, visibility, mirror_allowed=True)

    async def _in_repo(self, repo: RepoCache, file: RemoteFile, access: Access) -> Path | None:
        """The blob in this repo's ``blobs/``, if this request may have it. On the LAN's
        word alone: only one shared on the LAN anyway. For a request the mirror allowed:
        one this agent verified, or one that another tool put there, hashed first (and
        seeded); a bad one is removed, so that the fetch replaces it."""
        if not repo.has_blob(file.blob_id, file.size):
            return None
        path = repo.blob_path(file.blob_id)
        if not access.mirror_allowed:
            if not self._may_reuse(file, access):
                return None
        elif self.seeds.path_of(file.blob_id) != path and file.size > 0:
            verdict = await asyncio.to_thread(hash_file, path, file.blob_id, file.size)
            if not verdict.ok:
                log.warning(
                    "%s in the cache hashes to %s, not its id: fetching it again",
                    path,
                    verdict.actual,
                )
                with contextlib.suppress(OSError):
                    path.unlink()
                return None
            await self.seeds.offer_verified(path, file.blob_id, file.size, self._held_for(access))
        await self.note(file, access)
        return path

    def _may_reuse(self, file: RemoteFile, access: Access) -> bool:
        return file.size == 0 or may_serve(self.seeds.provenance(file.blob_id), access)

    def _check_reuse(self, file: RemoteFile, access: Access) -> None:
        if not self._may_reuse(file, access):
            raise NotShared(
                f"{file.path} of {access.repo} names a blob this agent holds for a private "
                "or gated repo; it is not served on the LAN's word",
                hint="download it from its own repo, with a token that may read it",
            )

    async def note(self, file: RemoteFile, access: Access) -> None:
        """What the mirror said of this request's repo now holds for the blob too."""
        if file.size > 0 and access.visibility is not None:
            await self.seeds.note(file.blob_id, access.repo, access.visibility)

    async def _adopt(
        self,
        repo: RepoCache,
        source: Path,
        file: RemoteFile,
        counters: BlobCounters,
        access: Access,
    ) -> Path:
        if source.parent != repo.blobs:
            # a copy where no hard link can be made: off the loop, like its fsync
            await asyncio.to_thread(repo.adopt_blob, source, file.blob_id)
        counters.had()
        await self.note(file, access)
        return repo.blob_path(file.blob_id)

    async def _obtain(
        self,
        repo: RepoCache,
        snapshot: Snapshot,
        file: RemoteFile,
        mirror: MirrorFetcher,
        counters: BlobCounters,
        access: Access,
    ) -> Path:
        # 1. Already verified somewhere in this cache (another repo): link it, if this
        # request may have it.
        held = self.seeds.path_of(file.blob_id)
        if held is not None and not await asyncio.to_thread(held.exists):
            await self.seeds.drop_vanished(file.blob_id)  # deleted under the agent
            held = None
        if held is None and access.mirror_allowed:
            other = await asyncio.to_thread(find_blob_anywhere, repo.root, file.blob_id, file.size)
            if (
                other is not None
                and (await asyncio.to_thread(hash_file, other, file.blob_id, file.size)).ok
            ):
                held = other
        if held is not None:
            self._check_reuse(file, access)
            return await self._adopt(repo, held, file, counters, access)
        # A private or gated repo's blob: only the mirror, with the caller's token (no
        # peer offers one, and a herd would wait for a leader that never shares it).
        if access.mirror_only_in(self.cluster_share):
            held_for = self._held_for(access)
            async with self._transfers:
                fetched, tree = await self._from_mirror(
                    repo, snapshot, file, mirror, counters, held_for
                )
            await self.seeds.offer_verified(fetched, file.blob_id, file.size, held_for, tree)
            return fetched
        # 2. Peers that hold it.
        offers = await self._offers(file) if file.size > 0 else []
        log.debug("%s: %d peer offers", file.path, len(offers))
        if offers:
            got = await self._from_peers(repo, snapshot, file, offers, mirror, counters, access)
            if got is not None:
                return got
        # No mirror behind this download (local/*): nobody can lead it from one; the
        # peers were its only source. (An empty blob needs no source: written below.)
        if file.size > 0 and not mirror.has_mirrors:
            raise NetworkError(
                f"no peer could deliver {file.path} (and no mirror may serve it)",
                hint="the agent that published it, or one that downloaded it, must be "
                "running and reachable (`hfswarm status` lists the peers)",
            )
        # 3. Nobody has it: the herd decides who fetches it from the mirror; the others
        # wait for that leader's manifest and swarm it. An agent that seeds nothing
        # stays out (a leader that never shares would hold the others up).
        if self.config.seeding == "none" and file.size > 0:
            self._source(file.blob_id, "mirror")
            held_for = self._held_for(access)
            async with self._transfers:
                path, tree = await self._from_mirror(
                    repo, snapshot, file, mirror, counters, held_for
                )
            await self.seeds.offer_verified(path, file.blob_id, file.size, held_for, tree)
            return path
        self._source(file.blob_id, "herd")
        # While we wait, the leader's relay is copied into our partial (no transfer
        # slot: a copy only follows a leader, and slots held by copies could starve
        # the leaders they wait for).
        copy = LeaderCopy(
            self.peers,
            file,
            repo.partial_dir,
            counters,
            flight=self._flights.get(file.blob_id),
            on_done=lambda: self.herd.release(file.blob_id),
            on_liar=lambda peer, why: self.peers.ban(peer, why, file.blob_id),
            want_tree=self.seeds.would_offer(file.blob_id, file.size, self._held_for(access)),
        )

        def follow(leader: PeerInfo, attempt: int) -> None:
            copy.follow(leader, attempt)
            if copy.running:
                self._source(file.blob_id, "leader")  # /v1/status: copying the relay

        try:
            async with self.herd.turn(file, counters, follow) as turn:
                if copy.running and turn.offers:  # the leader is done: copy to the end
                    await copy.result()
                if copy.finished is not None:
                    return await self._copied(repo, file, copy.finished, copy.tree, access)
                await copy.stop()
                if turn.offers:
                    got = await self._from_peers(
                        repo, snapshot, file, turn.offers, mirror, counters, access
                    )
                    if got is not None:
                        return got
                # 4. The mirror (first fetch of a new model: the rest of it, after what
                # a leader relayed), then seed it at once.
                turn.lead()
                relayed = self._relayable(access)
                if relayed:
                    self._relayed.add(file.blob_id)
                held_for = self._held_for(access)
                async with self._transfers:
                    path, tree = await self._from_mirror(
                        repo,
                        snapshot,
                        file,
                        mirror,
                        counters,
                        held_for,
                        # followers copy its prefix: grow it at the blob's rate
                        in_order=relayed and self.herd.followed(file.blob_id),
                    )
                await self.seeds.offer_verified(path, file.blob_id, file.size, held_for, tree)
                return path
        finally:
            if file.blob_id in self._relayed:
                self._relayed.discard(file.blob_id)
                self._led[file.blob_id] = time.monotonic() + RELAY_GRACE
            await copy.stop()

    def _relayable(self, access: Access) -> bool:
        """Followers may copy what we lead for this request: a blob the mirror called
        shared (or, in a cluster that shares them, private or gated: members only).
        Nothing on the LAN's word alone: it would not be shared once here either."""
        if access.visibility is None:
            return False
        return Provenance(((access.repo, access.visibility),)).shared_in(self.cluster_share)

    async def _copied(
        self,
        repo: RepoCache,
        file: RemoteFile,
        data: Path,
        tree: V2Tree | None,
        access: Access,
    ) -> Path:
        """A blob copied from the herd leader, whose whole-file hash matched: into
        ``blobs/`` and seeded, as if it came from the mirror (its manifest from the v2
        tree built as the copy was hashed, when it will be seeded)."""
        path = await self._install(repo, data, file.blob_id)
        PartialBlob.installed(data)
        flight = self._flights.get(file.blob_id)
        if flight is not None:
            flight.moved(path)
        held_for = self._held_for(access)
        await self.seeds.offer_verified(path, file.blob_id, file.size, held_for, tree)
        return path

    @staticmethod
    async def _install(repo: RepoCache, verified: Path, blob_id: str) -> Path:
        """A checked blob into ``blobs/``: its fsync (a swarm download's whole file may
        still be dirty) in a thread, then the rename on the loop, so no reader of the
        in-flight blob opens the old path between the rename and `flight.moved`."""
        try:
            await asyncio.to_thread(sync_file, verified)
        except OSError as exc:
            raise translate_os_error(exc, f"writing {blob_id} to disk") from exc
        return repo.install_blob(verified, blob_id)

    @staticmethod
    def _held_for(access: Access, *, from_peers: bool = False) -> tuple[str, Visibility] | None:
        """What to record for a blob fetched for `access`: what the mirror said of the
        repo; bytes all from peers who offered them openly: shared as they were; else
        nothing (a revision known from peers only, its bytes from the mirror)."""
        if access.visibility is not None:
            return access.repo, access.visibility
        return (access.repo, Visibility.PEERS) if from_peers else None

    async def _from_peers(
        self,
        repo: RepoCache,
        snapshot: Snapshot,
        file: RemoteFile,
        offers: list[Offer],
        mirror: MirrorFetcher,
        counters: BlobCounters,
        access: Access,
    ) -> Path | None:
        """The blob from peers (None: they could not deliver; the mirror must)."""
        piece_size = offers[0].manifest.piece_size
        complete = [o for o in offers if o.complete]
        self._source(file.blob_id, "peers")
        try:
            async with self._transfers:
                if file.size <= piece_size:
                    if complete:
                        return await self._small_from_peers(repo, file, complete, counters, access)
                    raise IntegrityError("only peers still fetching it have it")
                if self.cluster is not None and complete:
                    got = await self._from_member(repo, file, complete, counters, access)
                    if got is not None:
                        return got
                return await self._swarm(repo, snapshot, file, offers, mirror, counters, access)
        except HfswarmError as exc:
            log.warning(
                "%s: peers could not deliver (%s); fetching it from the mirror",
                file.path,
                exc.one_line(),
            )
            return None

    async def _offers(self, file: RemoteFile) -> list[Offer]:
        found = (await self._find((file.blob_id,))).get(file.blob_id, [])
        return self._valid(file, found)

    async def _find(self, blob_ids: tuple[str, ...]) -> dict[str, list[Offer]]:
        await asyncio.gather(*(lookup(blob_ids) for lookup in self.herd.lookups))
        return await self.peers.find(blob_ids)

    def _valid(self, file: RemoteFile, found: list[Offer]) -> list[Offer]:
        """The offers whose manifests check out for this blob, of its majority swarm."""
        good: list[Offer] = []
        for offer in found:
            try:
                meta = self._check_manifest(offer.manifest)
            except HfswarmError as exc:
                log.warning(
                    "peer %s sent a bad manifest for %s: %s",
                    offer.peer.api_url,
                    file.blob_id,
                    exc.one_line(),
                )
                continue
            if offer.manifest.size != file.size or meta.total_size != file.size:
                log.warning(
                    "peer %s has %s with another size; ignored", offer.peer.api_url, file.blob_id
                )
                continue
            good.append(offer)
        # All honest peers compute one info-hash per blob; keep the most common one.
        if good:
            ihs = [o.manifest.info_hash for o in good]
            best = max(set(ihs), key=ihs.count)
            good = [o for o in good if o.manifest.info_hash == best]
        return good

    # -- mirror ----------------------------------------------------------------------

    async def _from_mirror(
        self,
        repo: RepoCache,
        snapshot: Snapshot,
        file: RemoteFile,
        mirror: MirrorFetcher,
        counters: BlobCounters,
        held_for: HeldFor,
        *,
        in_order: bool = False,
    ) -> tuple[Path, V2Tree | None]:
        """The verified blob from the mirror, installed; with its v2 tree (built as the
        bytes were hashed) when it will be seeded, so its manifest needs no re-read.
        `in_order`: followers copy its prefix as it grows (a herd leader)."""
        self._source(file.blob_id, "mirror")
        flight = self._flights.get(file.blob_id)
        finished = await from_mirror(
            mirror,
            snapshot,
            file,
            repo.partial_dir,
            counters,
            done_elsewhere=lambda: repo.has_blob(file.blob_id, file.size),
            flight=flight,
            want_tree=self.seeds.would_offer(file.blob_id, file.size, held_for),
            in_order=in_order,
        )
        if finished is None:
            return repo.blob_path(file.blob_id), None
        path = await self._install(repo, finished.path, file.blob_id)
        PartialBlob.installed(finished.path)
        if flight is not None:
            flight.moved(path)
        return path, finished.tree

    # -- small blobs from peers ----------------------------------------------------------

    async def _small_from_peers(
        self,
        repo: RepoCache,
        file: RemoteFile,
        offers: list[Offer],
        counters: BlobCounters,
        access: Access,
    ) -> Path:
        last: HfswarmError | None = None
        for offer in offers:
            try:
                data = await self.peers.fetch_small_blob(offer.peer, file.blob_id, file.size)
            except HfswarmError as exc:
                last = exc
                continue
            except Exception as exc:  # network trouble with this peer: try the next
                log.info("small blob from %s failed: %r", offer.peer.api_url, exc)
                continue
            tmp = repo.partial_dir / f"{file.blob_id}.peer.{os.getpid()}"
            try:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)  # verified by fetch_small_blob already
            except OSError as exc:
                raise translate_os_error(exc, f"writing {file.path}") from exc
            counters.from_peers += len(data)
            counters.done = file.size
            path = await self._install(repo, tmp, file.blob_id)
            # Seeded with a manifest made from its bytes, not the peer's: only its id
            # was checked (no piece went through that tree), and any tree for this id
            # and size passes `check_manifest`. (One piece at most: a short hash pass.)
            await self.seeds.offer_verified(
                path, file.blob_id, file.size, self._held_for(access, from_peers=True)
            )
            return path
        raise last or IntegrityError(f"no peer delivered {file.path}")

    # -- cluster mode: a member's blob stream --------------------------------------------

    async def _from_member(
        self,
        repo: RepoCache,
        file: RemoteFile,
        offers: list[Offer],
        counters: BlobCounters,
        access: Access,
    ) -> Path | None:
        """The blob over the member blob stream of one member that holds it, each piece
        checked against the manifest it signed (`peer.transfer.member_stream`); None when
        none could send it (busy with other members, gone): the swarm brings it then,
        from the checked pieces on disk on."""
        assert self.cluster is not None and self._member_tls is not None
        members = [
            o for o in offers if o.peer.stream_port and not self.peers.is_banned(o.peer.agent_id)
        ]
        random.shuffle(members)  # downloaders spread over the holders
        flight = self._flights.get(file.blob_id)
        for offer in members:
            try:
                expected = manifest_tree(offer.manifest)
                stream = MemberStream(
                    self.cluster,
                    self._member_tls,
                    offer.peer,
                    expected,
                    file,
                    repo.partial_dir,
                    counters,
                    flight=flight,
                    throttle=self.member_download,
                )
                log.debug("%s: member stream from %s", file.path, offer.peer.agent_id[:8])
                got = await stream.fetch()
            except PeerMisbehaved as exc:
                self.peers.ban(offer.peer, exc.one_line(), file.blob_id)
                continue
            except MemberBusy as exc:
                log.debug("%s: %s", file.path, exc.one_line())
                continue
            except (NetworkError, IntegrityError) as exc:
                log.info("%s: member stream stopped: %s", file.path, exc.one_line())
                continue
            counters.done = file.size
            path = await self._install(repo, got.path, file.blob_id)
            PartialBlob.installed(got.path)
            log.debug("%s: %d bytes over a member stream, verified", file.path, got.received)
            if flight is not None:
                flight.moved(path)
            await self.seeds.add_with_manifest(
                path, offer.manifest, self._held_for(access, from_peers=counters.from_mirror == 0)
            )
            return path
        return None

    # -- the swarm -------------------------------------------------------------------

    async def _swarm(
        self,
        repo: RepoCache,
        snapshot: Snapshot,
        file: RemoteFile,
        offers: list[Offer],
        mirror: MirrorFetcher,
        counters: BlobCounters,
        access: Access,
    ) -> Path:
        manifest = offers[0].manifest
        ih = manifest.info_hash
        repo.partial_dir.mkdir(parents=True, exist_ok=True)
        stream = self.swarm.subscribe(ih)
        resume = self.state.load_resume(ih)
        data_path = repo.partial_dir / file.blob_id
        if resume is not None and PartialBlob.journal_of(data_path).exists():
            # Another writer opened the file since (a member stream, a herd relay, a
            # mirror fetch: each leaves its journal until the blob is installed) and may
            # have put unchecked bytes under pieces the resume data names as had, which
            # libtorrent would take without reading: it checks the file instead.
            self.state.drop_resume(ih)
            resume = None
        # Nothing on disk to check: added paused, and resumed once its peers are given
        # (`StartSwarming`): libtorrent connects the peers of a torrent it resumes at
        # once, those given to a running one only at its next once-a-second connect
        # round (measured: 0-1 s, 0.5 s on average, before the first piece). A paused
        # torrent does not check its file, so one with something on disk runs.
        fresh = resume is None and not data_path.exists()
        siblings = _siblings(snapshot, manifest.piece_size)
        feeders = self._feeder_choice(file, siblings, offers, fresh)
        # A downloader that the first survey already shows is not a feeder never
        # connects the holders (and so has no rejoin to drop them): they are refused
        # from the torrent's first add.
        holders = {(o.peer.host, o.peer.bt_port) for o in offers if o.complete}
        away = holders if feeders is not None and not feeders.feeding else set()
        if away:
            log.debug("%s: holders left to the feeders from the start", file.path)
        try:
            try:
                await self.swarm.add_torrent(
                    manifest.torrent,
                    repo.partial_dir,
                    resume_data=resume,
                    announce=False,
                    paused=fresh,
                    banned=away,
                )
            except SwarmError:
                if resume is None:
                    raise
                self.state.drop_resume(ih)  # stale resume data: let libtorrent re-check
                await self.swarm.add_torrent(manifest.torrent, repo.partial_dir, announce=False)
        except TorrentExists:
            stream.close()
            raise
        self._downloading.add(ih)
        self._swarming[file.blob_id] = manifest
        self._deals[file.blob_id] = deal_over(file.blob_id, siblings)
        flight = self._flights.get(file.blob_id)
        if flight is not None:
            flight.reset()
            flight.start(data_path, from_peers=True)
        # The whole-file hash reads each byte once, as the in-order prefix of checked,
        # flushed pieces grows (`FlushForReaders`), not in a second pass at the end;
        # each range it read is final, so its writeback starts there (libtorrent never
        # syncs): the fsync before the rename then finds little left to write.
        follower = HashFollower(
            PrefixHasher(data_path, file.blob_id, file.size, hashed=self._writeback)
        )
        log.debug("%s: swarming %s", file.path, ih[:12])
        try:
            await self._drive(
                ih, snapshot, file, offers, mirror, counters, stream, flight, follower, feeders
            )
            log.debug("%s: all pieces had (hashed %d)", file.path, follower.position)
            await self.swarm.flush_cache(ih)
            follower.to(file.size)
            if flight is not None:
                flight.advance(file.size)  # all pieces checked and on disk
            status = await self.swarm.status(ih)
            # Useful bytes: what the blob needed minus what was on disk already and what
            # the mirror supplied. (libtorrent's payload counter also holds the blocks
            # its end game asked of two peers at once.)
            counters.from_peers += max(0, file.size - counters.resumed - status.fed_bytes)
            self.uploaded_by_removed += status.uploaded_payload_bytes
        except BaseException:
            follower.cancel()
            raise
        finally:
            stream.close()
            self._downloading.discard(ih)
            self._swarming.pop(file.blob_id, None)
            self._deals.pop(file.blob_id, None)
            with contextlib.suppress(SwarmError):
                await self.swarm.remove_torrent(ih)
        # libtorrent reports a piece finished before its bytes reach the file (measured:
        # a hash of the finished prefix taken as pieces land did not match), so the
        # follower reads only what a flush_cache made final; the rest after the last.
        try:
            verdict = await follower.verdict()
        except OSError as exc:
            raise translate_os_error(exc, f"hashing {file.path}") from exc
        self.state.drop_resume(ih)
        if not verdict.ok:
            # Every piece passed its merkle check, yet the whole does not match the Hub:
            # the manifest itself was wrong. Never link it; take the mirror's copy.
            counters.hash_failures += 1
            with contextlib.suppress(OSError):
                data_path.unlink()
            raise IntegrityError(
                f"{file.path}: swarm result hashes to {verdict.actual}, not {file.blob_id}",
                hint="refetching from the mirror",
            )
        counters.done = file.size
        log.debug("%s: whole-file hash checked", file.path)
        path = await self._install(repo, data_path, file.blob_id)
        PartialBlob.installed(data_path)  # a cut member stream's journal, if any
        log.debug("%s: whole-file hash matched, in blobs/", file.path)
        if flight is not None:
            flight.moved(path)
        await self.seeds.add_with_manifest(
            path, manifest, self._held_for(access, from_peers=counters.from_mirror == 0)
        )
        return path

    def _feeder_choice(
        self, file: RemoteFile, siblings: list[str], offers: list[Offer], fresh: bool
    ) -> FeederChoice | None:
        """Whether this download takes the blob from its complete holders (None: feeders
        off). A ``fresh`` download (nothing on disk) whose first survey already shows
        other downloaders learns them now, before its torrent is added."""
        cfg = self.config
        if not cfg.feeders:
            return None
        now = time.monotonic()
        choice = FeederChoice(
            self.peers.self_id,
            file.blob_id,
            now,
            FeederConfig(feeders=cfg.feeders, stall_timeout=cfg.stall_timeout),
            siblings=siblings,
        )
        fetching = frozenset(o.peer.agent_id for o in offers if not o.complete)
        if fresh and fetching and any(o.complete for o in offers):
            whole = frozenset(o.peer.agent_id for o in offers if o.complete)
            deals = {o.peer.agent_id: o.deal for o in offers if o.deal}
            choice.learn(fetching, 0.0, now, whole, deals)
        return choice

    async def _drive(
        self,
        ih: str,
        snapshot: Snapshot,
        file: RemoteFile,
        offers: list[Offer],
        mirror: MirrorFetcher,
        counters: BlobCounters,
        stream: EventStream,
        flight: InFlightBlob | None,
        follower: HashFollower,
        feeders: FeederChoice | None,
    ) -> None:
        """Carry out what `SwarmDownload` decides until every piece is had: libtorrent
        pulls from peers on its own; the driver says when to connect them, which pieces
        to also take from the mirror, whom to ban, and when to look at libtorrent."""
        meta = await self.swarm.torrent_meta(ih)
        cfg = self.config
        has_mirror = bool(mirror.pool.mirrors)  # none for a local/* repo
        drv = SwarmDownload(
            file.size,
            meta.piece_size,
            meta.num_pieces,
            time.monotonic(),
            SwarmDownloadConfig(
                policy=PolicyConfig(
                    grace_period=cfg.peer_grace,
                    stall_timeout=cfg.stall_timeout,
                    # this download's bound (a request may lower the agent's)
                    mirror_parallel=max(2, mirror.options.connections // 2),
                    # under a LAN download cap pieces come slowly by choice
                    min_piece_rate=min_piece_rate_under(self.member_download.rate),
                    mirror_enabled=has_mirror,
                    salt=int(self.peers.self_id[:8] or "0", 16),
                )
            ),
            holders=frozenset((o.peer.host, o.peer.bt_port) for o in offers if o.complete),
            streaming=flight is not None,
            follow_prefix=True,
            feeders=feeders,
        )
        base = (counters.from_mirror, counters.hash_failures)
        # What the driver's own tasks post (mirror results, readers); the swarm's events
        # wait in `stream`. Either sets `woken`: the loop takes all that came at once.
        inbox: collections.deque[Input] = collections.deque()
        woken = asyncio.Event()
        stream.on_ready(woken.set)
        mirror_tasks: dict[int, asyncio.Task[None]] = {}
        swarming = asyncio.Event()
        end: asyncio.Future[Any] | None = None  # awaited by nobody: see WatchTheEnd

        def post(item: Input) -> None:
            inbox.append(item)
            woken.set()

        # Every peer known to have the blob, whole or in part; the holders a
        # non-feeder left are not connected (`DropHolders`).
        known = {(o.peer.host, o.peer.bt_port) for o in offers}

        # Rejoins started, and whether none is under way (mirror pieces wait for one).
        rejoins = 0
        rejoined = asyncio.Event()
        rejoined.set()

        def connect_known() -> None:
            away = drv.feeders is not None and not drv.feeders.feeding
            for key in known:
                if not (away and key in drv.holders):
                    self.swarm.connect_peer(ih, *key)

        async def resurvey() -> None:
            await swarming.wait()
            # With feeders, the first soon: the downloaders learn who feeds.
            every = FIRST_RESURVEY if feeders is not None else RESURVEY_EVERY
            while True:
                # On a shared beat, so that the agent's swarms ask together (one batch).
                await asyncio.sleep(every - time.monotonic() % every)
                every = RESURVEY_EVERY
                try:
                    found = self._valid(file, await self.resurveys.offers(file.blob_id))
                except (HfswarmError, OSError) as exc:
                    log.debug("%s: survey failed: %s", file.path, exc)
                    continue
                found = [o for o in found if o.manifest.info_hash == ih]
                fetching = frozenset(o.peer.agent_id for o in found if not o.complete)
                if feeders is not None and fetching != feeders.members - {feeders.self_id}:
                    log.debug("%s: %d others download it", file.path, len(fetching))
                whole = frozenset(o.peer.agent_id for o in found if o.complete)
                deals = frozenset((o.peer.agent_id, o.deal) for o in found if o.deal)
                post(Members(fetching, whole, deals))
                for o in found:
                    key = (o.peer.host, o.peer.bt_port)
                    if key not in known:
                        known.add(key)
                        log.debug("%s: new swarm member %s:%d", file.path, *key)
                        # (a rejoin may be under way: it connects every known peer)
                        with contextlib.suppress(UnknownTorrent):
                            self.swarm.connect_peer(ih, *key)

        layer: list[bytes] = []  # the manifest's piece hashes, read at the first mirror piece

        async def mirror_piece(i: int) -> None:
            start = i * meta.piece_size
            try:
                data = await mirror.fetch_range(snapshot, file, start, start + meta.piece_length(i))
                if not layer:
                    layer.append(manifest_tree(offers[0].manifest).piece_layer)
                # Checked before libtorrent gets it: add_piece keeps the blocks peers
                # sent of the piece, so a fed piece that fails was spoiled by theirs (a
                # trickler raced by the mirror), and they are blamed (`FeedMirrorPiece`).
                got = await asyncio.to_thread(piece_hash, data, meta.piece_size)
                if got != layer[0][32 * i : 32 * i + 32]:
                    raise IntegrityError(f"piece {i} from the mirror fails its hash")
                while True:
                    before = rejoins
                    try:
                        ok = await self.swarm.feed_piece(ih, i, data)
                        break
                    except UnknownTorrent:
                        # A rejoin removed the torrent while the piece came: it goes
                        # to the torrent added again, not back to the WAN.
                        if before == rejoins and rejoined.is_set():
                            raise
                        await rejoined.wait()
            except HfswarmError as exc:
                post(MirrorPieceError(i, exc.one_line()))
            else:
                post(MirrorPieceFed(i, len(data), ok))
            finally:
                mirror_tasks.pop(i, None)

        async def carry_out(actions: tuple[Action, ...]) -> None:
            nonlocal end, rejoins
            todo = list(actions)
            while todo:
                a = todo.pop(0)
                if isinstance(a, TakeSample):
                    sample = await self._sample(ih, a.peers)
                    todo += drv.handle(sample, time.monotonic())
                elif isinstance(a, StartSwarming):
                    # Only now may peers arrive through the trackers: what came before
                    # (libtorrent's check of the disk) was ours.
                    self.swarm.announce(ih)
                    connect_known()  # (not the holders, if left to the feeders)
                    self.swarm.resume(ih)  # added paused (see `_swarm`): connect now
                    swarming.set()
                elif isinstance(a, ConnectPeer):
                    log.debug("%s: holder %s:%d closed: dialled again", file.path, a.host, a.port)
                    with contextlib.suppress(SwarmError):
                        self.swarm.connect_peer(ih, a.host, a.port)
                elif isinstance(a, FeedMirrorPiece):
                    if a.piece not in mirror_tasks:
                        log.debug(
                            "%s: piece %d from the mirror (%s)",
                            file.path,
                            a.piece,
                            "its peers went quiet or too slow" if a.stalled else "no peer has it",
                        )
                        mirror_tasks[a.piece] = asyncio.create_task(mirror_piece(a.piece))
                elif isinstance(a, CancelMirrorPiece):
                    task = mirror_tasks.pop(a.piece, None)
                    if task is not None:
                        task.cancel()
                elif isinstance(a, BanHost):
                    log.warning("banning peer %s: %s", a.peer, a.reason)
                    self.swarm.ban_peer(a.host)
                    self.on_ban(str(a.peer), a.reason, file.blob_id)
                elif isinstance(a, FlushForReaders):
                    # Its answer may come with the next alert batch: not one loop turn
                    # per piece while it is awaited (the last flush is urgent), except
                    # a waiting reader's first bytes (its time to first byte).
                    first = flight is not None and flight.ready == 0 and flight.reader_count
                    await self.swarm.flush_cache(ih, urgent=bool(first))
                    if flight is not None:
                        flight.advance(a.ready)
                    follower.to(a.ready)
                elif isinstance(a, PreferPieces):
                    for i in a.pieces:
                        self.swarm.set_piece_priority(ih, i, PREFERRED)
                elif isinstance(a, LowerPieces):
                    log.debug("%s: %d pieces left to the other feeders", file.path, len(a.pieces))
                    for i in a.pieces:
                        self.swarm.set_piece_priority(ih, i, DEFAULT_PRIORITY)
                elif isinstance(a, SetPieceDeadline):
                    self.swarm.set_piece_deadline(ih, a.piece, a.ms)
                elif isinstance(a, InOrder):
                    self.swarm.set_in_order(ih, a.on)
                elif isinstance(a, DropHolders | ConnectHolders):
                    # Not one of the blob's feeders (or the holders come back): the
                    # torrent again, with the holders refused or not, and the peers.
                    log.debug(
                        "%s: %s", file.path,
                        "holders left to the feeders" if isinstance(a, DropHolders)
                        else "holders again" + (" (stalled)" if a.stalled else ""),
                    )  # fmt: skip
                    dropped = isinstance(a, DropHolders)
                    banned = drv.holders if dropped else frozenset()
                    rejoins += 1
                    rejoined.clear()
                    try:
                        self.uploaded_by_removed += await self.swarm.rejoin(ih, banned=banned)
                        self.swarm.announce(ih)
                        connect_known()
                        self.swarm.resume(ih)
                    finally:
                        rejoined.set()
                    todo += drv.handle(Rejoined(), time.monotonic())
                elif isinstance(a, WatchTheEnd):
                    # While someone waits for an alert the session drains each at once
                    # (no batch): the last pieces reach the driver without delay.
                    end = self.swarm.expect(
                        lambda e: isinstance(e, TorrentFinished) and e.info_hash == ih
                    )
                elif isinstance(a, SwarmFailed):
                    hint = (
                        "retry later, or add another --mirror"
                        if has_mirror
                        else "retry when a peer that holds it is up"
                    )
                    raise IntegrityError(f"{file.path}: {a.reason}", hint=hint)
            p = drv.progress
            counters.resumed, counters.done = p.resumed, p.done
            counters.from_mirror = base[0] + p.from_mirror
            counters.hash_failures = base[1] + p.hash_failures

        def readers_changed() -> None:
            readers = self._readers(flight)
            if readers is not None:
                post(ReadersChanged(readers))

        watching = contextlib.ExitStack()
        if flight is not None:  # a reader that comes or goes: the driver hears of it
            watching.enter_context(flight.watching_readers(readers_changed))
            readers_changed()  # and of those already there (pieces in order from the start)
        try:
            async with asyncio.TaskGroup() as tg:
                surveying = tg.create_task(resurvey())
                first_piece = True
                while drv.outcome is None:
                    # All that came since the last turn in one go (the events of an
                    # alert drain, or of several): one handling, one look at the wake-up,
                    # not a queue hop and a loop turn per piece (docs/benchmarks.md 8.30).
                    woken.clear()
                    came: list[Input] = [*stream.take(), *inbox]
                    inbox.clear()
                    if came:
                        if first_piece and any(isinstance(e, PieceFinished) for e in came):
                            first_piece = False
                            log.debug("%s: first piece", file.path)
                        await carry_out(drv.handle_all(came, time.monotonic()))
                    wake, now = drv.next_wakeup(), time.monotonic()
                    if drv.outcome is not None:
                        break
                    if wake is not None and wake <= now:
                        await carry_out(drv.handle(Wake(self._readers(flight)), now))
                        continue
                    if woken.is_set():
                        continue  # more came while the actions were carried out
                    # asyncio.timeout, not wait_for: wait_for (3.11) makes a task for
                    # each wait, and there is a wait per alert drain.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(None if wake is None else wake - now):
                            await woken.wait()
                surveying.cancel()
        except BaseExceptionGroup as group:
            raise primary_error(group) from None
        finally:
            watching.close()
            if end is not None:
                end.cancel()
                if not end.cancelled():
                    end.exception()  # (a closed session failed it: nobody awaits it)
            for t in list(mirror_tasks.values()):
                t.cancel()

    @staticmethod
    def _readers(flight: InFlightBlob | None) -> Readers | None:
        """Where the streaming readers are (HF_ENDPOINT), through the flight's view."""
        if flight is None:
            return None
        pos = flight.lowest_reader_position()
        return Readers(flight.reader_count, pos or 0, flight.ready, flight.waiting_count)

    async def _sample(self, ih: str, peers: bool = True) -> SwarmSample:
        look = await self.swarm.look(ih, peers=peers)  # one worker hop (was five)
        return SwarmSample(
            state=look.state,
            is_finished=look.is_finished,
            have=look.have,
            availability=look.availability,
            partial=tuple((p.piece, p.blocks_received) for p in look.partial),
            peers=tuple(PeerSample(e, fails) for e, fails in look.hashfails),
        )

    async def close(self) -> None:
        """The agent is shutting down: stop the herd's survey, keep what was fetched."""
        await self.herd.close()
        await self.save_all_resume_data()
        await asyncio.to_thread(self._writeback.close)

    # -- resume ----------------------------------------------------------------------

    async def save_all_resume_data(self) -> None:
        for ih in list(self._downloading):
            with contextlib.suppress(Exception):
                self.state.save_resume(ih, await self.swarm.save_resume_data(ih))

    async def save_resume_periodically(self, every: float = 10.0) -> None:
        while True:
            await asyncio.sleep(every)
            await self.save_all_resume_data()


__all__ = ["ActiveFetch", "BlobCounters", "BlobFetcher", "wire"]
