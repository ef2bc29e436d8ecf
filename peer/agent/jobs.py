"""One download job for every entry point: the CLI through the local API, `hfswarm
download --peer` in process, the mirror-only download with no agent (`peer.download`),
and one file a Hub client asks for (HF_ENDPOINT mode, `HubService`).

A job resolves the revision (`SnapshotSource`: the agent's `Revisions`, or the mirror
alone), asks the blob source on whose word the download stands (`Access`), gets each
blob from it (`BlobSource.obtain`: the agent's `BlobFetcher` tries this cache, peers,
the herd, then the mirror; `peer.download.MirrorOnly` this cache, then the mirror),
places every path that names the blob (`Target`: links in the cache's snapshot, or
copies in a ``--local-dir``), writes the ref, and tells its progress as typed events
(`peer.agent.requests`).

    job = DownloadJob(hub, options, revisions, blobs, totals)
    done = await job.run(request, emit)

The agent's job also has the cache's quota (`peer.agent.quota`: a download is admitted,
room made by eviction, or refused before any byte moves) and its mirror cap.

The agent's job never writes a caller's folder: the CLI copies the snapshot into
``--local-dir`` itself (`LocalService.run_download` refuses one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from peer import wire
from peer.agent.audit import AuditLog, DownloadFinished
from peer.agent.requests import Counters, Done, DownloadRequest, Emit, Progress, Started
from peer.aio import each_with_ticks
from peer.cache.hf_cache import LocalDir, RepoCache
from peer.config import AgentConfig, DownloadOptions, HubSettings
from peer.errors import NetworkError
from peer.hub.metadata import FileSelection, RemoteFile, Snapshot
from peer.manifests.revisions import is_local_repo
from peer.serving.sharing import Access
from peer.transfer.inflight import InFlightBlob
from peer.transfer.mirror_blob import BlobCounters
from peer.transfer.mirror_ranges import MirrorFetcher
from peer.transfer.rate import Throttle

# The agent's own parts, named in types only: a download with no agent
# (`peer.download`) runs this job without importing peers, the herd or libtorrent.
if TYPE_CHECKING:
    from peer.agent.fetch import BlobFetcher
    from peer.agent.quota import CacheQuota, QuotaHold
    from peer.agent.revisions import Revisions

log = logging.getLogger(__name__)


@dataclass
class Totals:
    """The agent's counters since it started (`/v1/status`, `/metrics`)."""

    bytes_from_peers: int = 0
    bytes_from_mirror: int = 0
    bytes_uploaded_http: int = 0  # /v1/blobs and /v1/relay bodies
    bytes_uploaded_member_stream: int = 0  # cluster mode's member blob stream
    bytes_served_clients: int = 0  # resolve bodies written to HF_ENDPOINT clients
    hash_failures: int = 0
    downloads: int = 0
    downloads_running: int = 0  # local API downloads in progress
    bans: int = 0  # peers banned (by our policy or by libtorrent)
    streams_to_clients: int = 0  # resolve bodies being written now
    streams_to_peers: int = 0  # /v1/blobs, /v1/relay and member stream bodies being sent now
    mirror_errors: dict[str, int] = field(default_factory=dict)  # mirror URL -> failures

    def add(self, counters: BlobCounters) -> None:
        self.bytes_from_peers += counters.from_peers
        self.bytes_from_mirror += counters.from_mirror
        self.hash_failures += counters.hash_failures

    def mirror_error(self, mirror: str) -> None:
        self.mirror_errors[mirror] = self.mirror_errors.get(mirror, 0) + 1


class SnapshotSource(Protocol):
    """Where a job's revision comes from (`peer.agent.revisions.Revisions`: the mirror,
    else peers' manifests; `peer.download.MirrorSnapshots`: the mirror alone)."""

    async def resolve(
        self,
        hub: HubSettings,
        repo_type: str,
        repo_id: str,
        revision: str,
        selection: FileSelection | None = None,
    ) -> tuple[Snapshot, wire.RevisionManifest | None]:
        """The snapshot, and a manifest to record once it is downloaded (or None)."""
        ...

    def record(self, m: wire.RevisionManifest) -> None: ...


class BlobSource(Protocol):
    """Where a job's blobs come from, in its own order (`BlobFetcher`: this cache,
    peers, the herd, the mirror; `peer.download.MirrorOnly`: this cache, the mirror)."""

    async def access(self, snapshot: Snapshot, mirror: MirrorFetcher) -> Access:
        """On whose word a download of `snapshot` stands."""
        ...

    async def obtain(
        self,
        snapshot: Snapshot,
        file: RemoteFile,
        mirror: MirrorFetcher,
        counters: BlobCounters,
        access: Access,
    ) -> Path:
        """A verified copy of the file's blob (counted into `counters`)."""
        ...


@dataclass(frozen=True)
class Target:
    """Where a job's files go: links in the cache's ``snapshots/<commit>/`` (and the
    ref), or plain copies in a ``--local-dir`` (only the mirror-only job writes one)."""

    repo: RepoCache
    local_dir: LocalDir | None = None

    def current_copy(self, commit: str, files: list[RemoteFile]) -> Path | None:
        """A path of the local dir that already holds this blob at `commit`, if any."""
        if self.local_dir is not None:
            for f in files:
                if self.local_dir.is_current(f.path, commit, f.blob_id, f.size):
                    return self.local_dir.file_path(f.path)
        return None

    def place(self, commit: str, files: list[RemoteFile], blob: Path) -> None:
        """Every path that names the verified `blob`; one already current is left."""
        for f in files:
            if self.local_dir is None:
                self.repo.link_snapshot(commit, f.path, f.blob_id)
            elif not self.local_dir.is_current(f.path, commit, f.blob_id, f.size):
                self.local_dir.copy_in(blob, f.path, commit, f.blob_id)

    def finish(self, ref: str | None, commit: str) -> Path:
        """The folder the download fills: the snapshot (its ref written), or the local dir."""
        if self.local_dir is not None:
            return self.local_dir.root
        if ref:
            self.repo.write_ref(ref, commit)
        path = self.repo.snapshot_dir(commit)
        path.mkdir(parents=True, exist_ok=True)  # an empty selection still names a snapshot
        return path


class DownloadJob:
    """Runs downloads from one blob source; no state of its own between runs but the
    `totals` it adds to and the mirrors seen ignoring Range (each file from them is
    then one GET, not N ranges thrown away)."""

    def __init__(
        self,
        hub: HubSettings,
        options: DownloadOptions,
        snapshots: SnapshotSource,
        blobs: BlobSource,
        totals: Totals | None = None,
        *,
        tick: float = 0.5,
        quota: CacheQuota | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        self.hub = hub
        self.options = options
        self.snapshots = snapshots
        self.blobs = blobs
        self.totals = totals or Totals()
        self.tick = tick  # seconds between progress events while bytes move
        # Mirrors seen ignoring Range, shared by this agent's jobs (one GET per file).
        self.ignores_range: set[str] = set()
        # ... and each mirror's request cost: a blob's first request asks blind for its
        # whole run (cut, wasting what was in flight, where the mirror is fast) only
        # until this agent has measured that mirror once.
        self.request_costs: dict[str, float] = {}
        self.quota = quota  # the agent's: its blobs held while it runs, or refused
        self.throttle = throttle  # the agent's mirror cap, shared by all its downloads

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[QuotaHold | None]:
        """While a download runs, the quota holds its blobs (never evicted)."""
        if self.quota is None:
            yield None
            return
        async with self.quota.job() as hold:
            yield hold

    def mirror(self, hub: HubSettings, options: DownloadOptions) -> MirrorFetcher:
        return MirrorFetcher(
            hub,
            options,
            on_mirror_error=self.totals.mirror_error,
            throttle=self.throttle,
            ignores_range=self.ignores_range,
            request_costs=self.request_costs,
        )

    def hub_for(self, repo_id: str, token: str | None) -> HubSettings:
        """The settings one request runs with: the caller's token; no mirror for a
        local/* repo (no mirror has it: its name is never sent to one)."""
        hub = replace(self.hub, token=token)
        return replace(hub, mirrors=()) if is_local_repo(repo_id) else hub

    async def run(self, request: DownloadRequest, emit: Emit) -> Done:
        async with self.held() as hold:
            return await self._run(request, emit, hold)

    async def _run(self, request: DownloadRequest, emit: Emit, hold: QuotaHold | None) -> Done:
        t0 = time.monotonic()
        log.debug("%s: download asked", request.repo_id)  # the time line's start in the agent
        options = request.bounded(self.options)
        # The caller's own token; the agent's only for its own user (`request.agent_token`).
        token = self.hub.token if request.agent_token and not request.token else request.token
        hub = replace(self.hub, token=token)
        # The mirror first; peers' revision manifests if it is down; peers only for local/*.
        snapshot, learned = await self.snapshots.resolve(
            hub, request.repo_type, request.repo_id, request.revision, request.selection
        )
        hub = self.hub_for(snapshot.repo_id, token)
        if hold is not None:
            await hold.admit(snapshot)  # room made, or refused before anything moves
        target = Target(
            RepoCache(hub.cache_dir, snapshot.repo_type, snapshot.repo_id),
            None if request.local_dir is None else LocalDir(request.local_dir),
        )
        await emit(Started(len(snapshot.files), snapshot.total_size, commit=snapshot.commit))
        counters: dict[str, BlobCounters] = {}
        by_blob: dict[str, list[RemoteFile]] = {}  # one blob under two paths: fetched once
        for f in snapshot.files:
            by_blob.setdefault(f.blob_id, []).append(f)
        files_done = 0
        # A request's own --max-workers bounds its files at once (the source's own cap on
        # blobs that move at once still holds).
        limit = asyncio.Semaphore(request.max_files) if request.max_files else None

        def figures() -> Progress:
            return progress(counters, snapshot.total_size, files_done)

        async with self.mirror(hub, options) as mirror:
            access = await self.blobs.access(snapshot, mirror)

            async def one(files: list[RemoteFile]) -> None:
                nonlocal files_done
                c = counters.setdefault(files[0].blob_id, BlobCounters(files[0].size))
                async with limit or contextlib.nullcontext():
                    await self.obtain_file(snapshot, files, mirror, c, access, target)
                files_done += len(files)

            # Largest first: with N files at once, a slow mirror's seconds-long first
            # answer to a small file then never delays a big one's start.
            largest_first = sorted(by_blob.values(), key=lambda fs: -fs[0].size)
            await each_with_ticks(largest_first, one, lambda: emit(figures()), self.tick)
        path = target.finish(snapshot.revision, snapshot.commit)
        if learned is not None:  # a public revision from the mirror: peers may use it
            self.snapshots.record(learned)
        end = figures()
        assert end.counters is not None
        self.totals.downloads += 1
        log.debug("%s: download done in %.2f s", request.repo_id, time.monotonic() - t0)
        return Done(
            path=path,
            commit=snapshot.commit,
            files=len(snapshot.files),
            total=snapshot.total_size,
            done=end.done,
            counters=end.counters,
            entries=tuple((f.path, f.blob_id, f.size) for f in snapshot.files),
            seconds=time.monotonic() - t0,
        )

    async def obtain_file(
        self,
        snapshot: Snapshot,
        files: list[RemoteFile],
        mirror: MirrorFetcher,
        counters: BlobCounters,
        access: Access,
        target: Target,
    ) -> Path:
        """One blob of a download, placed under every path in `files` (all naming it):
        the step every entry point shares (a Hub client's file is a one-file use)."""
        file = files[0]
        blob = target.current_copy(snapshot.commit, files)
        if blob is not None:  # up to date in the local dir: nothing to fetch
            counters.had()
            target.place(snapshot.commit, files, blob)
            return blob
        try:
            blob = await self.blobs.obtain(snapshot, file, mirror, counters, access)
        except NetworkError as exc:
            if not is_local_repo(snapshot.repo_id):
                raise
            raise NetworkError(
                f"no peer could deliver {file.path} of {snapshot.repo_id} ({exc.one_line()})",
                hint="the agent that published it, or one that downloaded it, must "
                "be running and reachable (`hfswarm status` lists the peers)",
            ) from exc
        self.totals.add(counters)
        target.place(snapshot.commit, files, blob)
        return blob


class HubService:
    """The Hub API's backend (`peer.serving.hub_api.HubBackend`): files for Hub clients,
    each a one-file use of the agent's `DownloadJob` (the client's own token); revisions
    from manifests."""

    def __init__(
        self,
        config: AgentConfig,
        revisions: Revisions,
        blobs: BlobFetcher,
        job: DownloadJob,
        audit: AuditLog | None = None,
    ) -> None:
        self.config = config
        self.revisions = revisions
        self.blobs = blobs  # the job's source: what of a blob in flight may stream
        self.job = job
        self.totals = job.totals
        self.audit = audit or AuditLog(None)

    def count_served(self, n: int) -> None:
        """Bytes of a resolve body written to a Hub client."""
        self.totals.bytes_served_clients += n

    def count_stream(self, delta: int) -> None:
        """A resolve body started (+1) or ended (-1)."""
        self.totals.streams_to_clients += delta

    def mirror_error(self, mirror: str) -> None:
        self.totals.mirror_error(mirror)

    async def flight_of(self, blob_id: str, until: asyncio.Future[Any]) -> InFlightBlob | None:
        return await self.blobs.flight_of(blob_id, until)

    async def revision_manifest(
        self, repo_type: str, repo_id: str, revision: str
    ) -> wire.RevisionManifest | None:
        """What this agent and its peers know of a revision (local/* repos, or any repo
        while the mirror is down): the newest manifest, or None."""
        return await self.revisions.find(repo_type, repo_id, revision)

    def mirror_said(
        self, repo_type: str, repo_id: str, revision: str, commit: str, private: bool, gated: bool
    ) -> None:
        """A client resolved a revision through the mirror: remember public ones."""
        self.revisions.mirror_said(
            self.config.hub, repo_type, repo_id, revision, commit, private=private, gated=gated
        )

    async def blob_for_client(
        self,
        snapshot: Snapshot,
        file: RemoteFile,
        token: str | None,
        ref: str | None,
        access: Access,
    ) -> Path:
        """A verified copy of one file for a Hub client, in this agent's cache, obtained
        like any download's (with the CLIENT's token, never the agent's), linked into
        snapshots/<commit>/ and refs/<ref>."""
        hub = self.job.hub_for(snapshot.repo_id, token)
        target = Target(RepoCache(hub.cache_dir, snapshot.repo_type, snapshot.repo_id))
        counters = BlobCounters(file.size)
        async with self.job.held() as hold, self.job.mirror(hub, self.job.options) as mirror:
            if hold is not None:  # the quota: room made, or refused (507), cache untouched
                await hold.admit(replace(snapshot, files=(file,)))
            # The ref first, as huggingface_hub does: the body may stream to the client
            # while the fetch runs, and the client may look at the cache as soon as it ends.
            target.finish(ref, snapshot.commit)
            path = await self.job.obtain_file(snapshot, [file], mirror, counters, access, target)
        if counters.from_peers or counters.from_mirror:  # fetched now, not had
            self.audit.write(
                DownloadFinished(
                    via="hub_api",
                    repo_type=snapshot.repo_type,
                    repo_id=snapshot.repo_id,
                    revision=snapshot.revision,
                    commit=snapshot.commit,
                    files=1,
                    bytes_from_peers=counters.from_peers,
                    bytes_from_mirror=counters.from_mirror,
                    bytes_reused=counters.reused,
                )
            )
        return path


def progress(counters: dict[str, BlobCounters], total: int, files_done: int) -> Progress:
    """The download's figures: its blobs' counters summed."""
    blobs = counters.values()
    return Progress(
        done=sum(c.done for c in blobs),
        total=total,
        counters=Counters(
            from_peers=sum(c.from_peers for c in blobs),
            from_mirror=sum(c.from_mirror for c in blobs),
            reused=sum(c.reused for c in blobs),
            hash_failures=sum(c.hash_failures for c in blobs),
        ),
        files_done=files_done,
    )
