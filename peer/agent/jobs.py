"""A download the agent runs for the CLI (the local API, or `hfswarm download --peer` in
process): resolve the revision, decide on whose word it stands (`Access`), get each
blob through `BlobFetcher.obtain` (cache, peers, herd, mirror), link the snapshot, write
the ref, and tell its progress as typed events (`peer.agent.requests`).

    job = DownloadJob(config, revisions, blobs, totals)
    done = await job.run(request, emit)

Never a caller's folder: the CLI copies the snapshot into ``--local-dir`` itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from peer.agent.fetch import BlobCounters, BlobFetcher
from peer.agent.requests import Counters, Done, DownloadRequest, Emit, Progress, Started
from peer.agent.revisions import Revisions
from peer.aio import each_with_ticks
from peer.cache.hf_cache import RepoCache
from peer.config import AgentConfig
from peer.errors import ConfigError, NetworkError
from peer.hub.metadata import RemoteFile, Snapshot
from peer.manifests.revisions import is_local_repo
from peer.serving.sharing import Access, Visibility, repo_key
from peer.transfer.mirror_ranges import MirrorFetcher


@dataclass
class Totals:
    """The agent's counters since it started (`/v1/status`)."""

    bytes_from_peers: int = 0
    bytes_from_mirror: int = 0
    bytes_uploaded_http: int = 0
    hash_failures: int = 0
    downloads: int = 0

    def add(self, counters: Counters) -> None:
        self.bytes_from_peers += counters.from_peers
        self.bytes_from_mirror += counters.from_mirror
        self.hash_failures += counters.hash_failures


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

        async with MirrorFetcher(hub, self.config.download) as mirror:
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
