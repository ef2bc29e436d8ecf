"""A download the agent runs for the CLI (the local API, or `hfswarm download --peer` in
process): resolve the revision, decide on whose word it stands (`Access`), get each
blob through `BlobFetcher.obtain` (cache, peers, herd, mirror), link the snapshot, write
the ref, and tell its progress as typed events (`peer.agent.requests`). `HubService`
does the same for one file a Hub client (HF_ENDPOINT mode) asks for: the Hub API's
backend (`peer.serving.hub_api.HubBackend`).

    job = DownloadJob(config, revisions, blobs, totals)
    done = await job.run(request, emit)

Never a caller's folder: the CLI copies the snapshot into ``--local-dir`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from peer import wire
from peer.agent.audit import AuditLog, DownloadFinished
from peer.agent.fetch import BlobCounters, BlobFetcher
from peer.agent.requests import Counters, Done, DownloadRequest, Emit, Progress, Started
from peer.agent.revisions import Revisions
from peer.agent.seeding import SeedIndex
from peer.aio import each_with_ticks
from peer.cache.hf_cache import RepoCache
from peer.config import AgentConfig
from peer.errors import ConfigError, NetworkError
from peer.hub.metadata import RemoteFile, Snapshot
from peer.manifests.revisions import is_local_repo
from peer.serving.sharing import Access, Visibility, repo_key
from peer.transfer.inflight import InFlightBlob
from peer.transfer.mirror_ranges import MirrorFetcher
from peer.verification.hashing import hash_file

log = logging.getLogger(__name__)


@dataclass
class Totals:
    """The agent's counters since it started (`/v1/status`, `/metrics`)."""

    bytes_from_peers: int = 0
    bytes_from_mirror: int = 0
    bytes_uploaded_http: int = 0
    bytes_served_clients: int = 0  # resolve bodies written to HF_ENDPOINT clients
    hash_failures: int = 0
    downloads: int = 0
    downloads_running: int = 0  # local API downloads in progress
    bans: int = 0  # peers banned (by our policy or by libtorrent)
    streams_to_clients: int = 0  # resolve bodies being written now
    streams_to_peers: int = 0  # /v1/blobs bodies being written now
    mirror_errors: dict[str, int] = field(default_factory=dict)  # mirror URL -> failures

    def add(self, counters: Counters) -> None:
        self.bytes_from_peers += counters.from_peers
        self.bytes_from_mirror += counters.from_mirror
        self.hash_failures += counters.hash_failures

    def mirror_error(self, mirror: str) -> None:
        self.mirror_errors[mirror] = self.mirror_errors.get(mirror, 0) + 1


class DownloadJob:
    """Runs the agent's downloads; one object for all of them (no state of its own
    between runs but the agent's `totals`)."""

    def __init__(
        self, config: AgentConfig, revisions: Revisions, blobs: BlobFetcher, totals: Totals
    ) -> None:
        self.config = config
        self.revisions = revisions
        self.blobs = blobs
        self.totals = totals

    async def run(self, request: DownloadRequest, emit: Emit) -> Done:
        t0 = time.monotonic()
        if request.local_dir is not None:
            raise ConfigError(
                "the agent does not write into a local dir: it downloads into its cache",
                hint="the CLI copies the snapshot into --local-dir itself",
            )
        # The caller's own token; the agent's only for its own user (`request.agent_token`).
        hub = self.config.hub
        if request.token or not request.agent_token:
            hub = replace(hub, token=request.token)
        # The mirror first; peers' revision manifests if it is down; peers only for local/*.
        snapshot, learned = await self.revisions.resolve(
            hub, request.repo_type, request.repo_id, request.revision, request.selection
        )
        local = is_local_repo(snapshot.repo_id)
        if local:  # no mirror has it: never send its name to one
            hub = replace(hub, mirrors=())
        repo = RepoCache(hub.cache_dir, snapshot.repo_type, snapshot.repo_id)
        await emit(Started(len(snapshot.files), snapshot.total_size, commit=snapshot.commit))
        counters: dict[str, BlobCounters] = {}
        by_blob: dict[str, list[RemoteFile]] = {}
        for f in snapshot.files:
            by_blob.setdefault(f.blob_id, []).append(f)

        async with MirrorFetcher(
            hub, self.config.download, on_mirror_error=self.totals.mirror_error
        ) as mirror:
            access = await access_of(snapshot, mirror)

            async def one(files: list[RemoteFile]) -> None:
                c = counters.setdefault(files[0].blob_id, BlobCounters(files[0].size))
                try:
                    await self.blobs.obtain(snapshot, files[0], mirror, c, access)
                except NetworkError as exc:
                    if not local:
                        raise
                    raise NetworkError(
                        f"no peer could deliver {files[0].path} of {snapshot.repo_id} "
                        f"({exc.one_line()})",
                        hint="the agent that published it, or one that downloaded it, must "
                        "be running and reachable (`hfswarm status` lists the peers)",
                    ) from exc
                for f in files:
                    repo.link_snapshot(snapshot.commit, f.path, f.blob_id)

            await each_with_ticks(
                by_blob.values(), one, lambda: emit(progress(counters, snapshot.total_size)), 0.5
            )
        repo.write_ref(snapshot.revision, snapshot.commit)
        path = repo.snapshot_dir(snapshot.commit)
        path.mkdir(parents=True, exist_ok=True)
        if learned is not None:  # a public revision from the mirror: peers may use it
            self.revisions.record(learned)
        end = progress(counters, snapshot.total_size)
        assert end.counters is not None
        self.totals.downloads += 1
        self.totals.add(end.counters)
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


class HubService:
    """The Hub API's backend: files for Hub clients, from this agent's cache, its peers
    or the mirror with the client's own token; revisions from manifests."""

    def __init__(
        self,
        config: AgentConfig,
        revisions: Revisions,
        blobs: BlobFetcher,
        seeds: SeedIndex,
        totals: Totals,
        audit: AuditLog | None = None,
    ) -> None:
        self.config = config
        self.revisions = revisions
        self.blobs = blobs
        self.seeds = seeds
        self.totals = totals
        self.audit = audit or AuditLog(None)

    def count_served(self, n: int) -> None:
        """Bytes of a resolve body written to a Hub client."""
        self.totals.bytes_served_clients += n

    def count_stream(self, delta: int) -> None:
        """A resolve body started (+1) or ended (-1)."""
        self.totals.streams_to_clients += delta

    def mirror_error(self, mirror: str) -> None:
        self.totals.mirror_error(mirror)

    def stream_of(self, blob_id: str) -> InFlightBlob | None:
        return self.blobs.stream_of(blob_id)

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
        """A verified copy of one file for a Hub client, in this agent's cache: taken as
        it is if this agent verified it (and `access` may have it), else obtained like
        any download (cache, peers, then the mirror with the CLIENT's token, never the
        agent's), then linked into snapshots/<commit>/ (and refs/<ref>) and seeded if
        shared."""
        hub = replace(self.config.hub, token=token)
        if is_local_repo(snapshot.repo_id):  # no mirror has it: never send its name to one
            hub = replace(hub, mirrors=())
        repo = RepoCache(hub.cache_dir, snapshot.repo_type, snapshot.repo_id)
        path = await self._verified_in_repo(repo, file, access)
        if path is None:
            counters = BlobCounters(file.size)
            async with MirrorFetcher(
                hub, self.config.download, on_mirror_error=self.totals.mirror_error
            ) as mirror:
                path = await self.blobs.obtain(snapshot, file, mirror, counters, access)
            self.totals.add(
                Counters(
                    from_peers=counters.from_peers,
                    from_mirror=counters.from_mirror,
                    hash_failures=counters.hash_failures,
                )
            )
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
        repo.link_snapshot(snapshot.commit, file.path, file.blob_id)
        if ref:
            repo.write_ref(ref, snapshot.commit)
        return path

    async def _verified_in_repo(
        self, repo: RepoCache, file: RemoteFile, access: Access
    ) -> Path | None:
        """The blob in this repo's blobs/ if it is known good and `access` may have it.
        One that another tool put there (not verified by this agent yet) is hashed
        first; a bad one is removed, so that the fetch replaces it instead of reusing it."""
        if not access.mirror_allowed:
            return None  # BlobFetcher.obtain decides, by the blob's provenance
        held = self.seeds.path_of(file.blob_id)
        if held is not None and held == repo.blob_path(file.blob_id):
            await self.blobs.note(file, access)
            return held
        if not repo.has_blob(file.blob_id, file.size):
            return None
        path = repo.blob_path(file.blob_id)
        verdict = await asyncio.to_thread(hash_file, path, file.blob_id, file.size)
        if verdict.ok:
            held_for = (access.repo, access.visibility) if access.visibility else None
            await self.seeds.offer_verified(path, file.blob_id, file.size, held_for)
            return path
        log.warning(
            "%s in the cache hashes to %s, not its id: fetching it again", path, verdict.actual
        )
        with contextlib.suppress(OSError):
            path.unlink()
        return None


async def access_of(snapshot: Snapshot, mirror: MirrorFetcher) -> Access:
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


def progress(counters: dict[str, BlobCounters], total: int) -> Progress:
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
    )
