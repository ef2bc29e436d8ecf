"""The agent: one libtorrent session, the peer API, the local API, the peer table, the
seed index, and the downloads it runs for the CLI.

    async with Agent(config) as agent:
        await agent.serve(stop_event)

`Agent.__aenter__` binds every listener (so a port clash fails at once, with a clear
error); `serve` runs the background work (liveness checks, the cache scan that seeds
pre-existing blobs, periodic resume data) in one TaskGroup until `stop` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from peer import wire
from peer.agent.fetch import BlobCounters, BlobFetcher
from peer.agent.jobs import DownloadJob, Totals
from peer.agent.publish import Publisher, clean_debris
from peer.agent.requests import (
    Counters,
    Done,
    DownloadRequest,
    Emit,
    PublishRequest,
    Setup,
)
from peer.agent.revisions import Revisions
from peer.agent.seeding import SeedIndex
from peer.agent.state import StateDir
from peer.aio import primary_error
from peer.cache.hf_cache import RepoCache
from peer.config import AgentConfig
from peer.discovery.mdns import MdnsDiscovery
from peer.discovery.peer_table import PeerTable
from peer.discovery.tracker_source import TrackerSource
from peer.errors import LocalError
from peer.hub.metadata import RemoteFile, Snapshot, anonymous_flags
from peer.manifests.revisions import is_local_repo
from peer.serving.limits import local_limits, nofile_limit, peer_limits, start_listener
from peer.serving.local_api import make_local_app
from peer.serving.peer_api import make_peer_app
from peer.serving.sharing import Access, Visibility
from peer.transfer.inflight import InFlightBlob
from peer.transfer.mirror_ranges import MirrorFetcher
from peer.transfer.swarm import SwarmSession, SwarmSettings
from peer.verification.hashing import hash_file

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state = StateDir(config.state_dir)
        self.agent_id = ""
        self.totals = Totals()
        self._stack = AsyncExitStack()
        self.swarm: SwarmSession
        self.peers: PeerTable
        self.seeds: SeedIndex
        self.blobs: BlobFetcher
        self.revisions: Revisions
        self.downloads: DownloadJob
        self.publisher: Publisher
        self.peer_port = 0
        self.local_port = 0
        self._runners: list[web.AppRunner] = []
        self.trackers: list[TrackerSource] = []

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        try:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
            self.config.hub.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalError(
                f"cannot create {exc.filename}: {exc.strerror}",
                hint="pick writable --cache-dir/--state-dir",
            ) from exc
        self.agent_id = self.state.agent_id()
        if removed := await asyncio.to_thread(clean_debris, self.config.hub.cache_dir):
            log.info("removed %d temp file(s) of interrupted publishes", removed)
        try:
            bt_host, bt_port = self.config.bt_listen
            self.swarm = await self._stack.enter_async_context(
                SwarmSession(
                    SwarmSettings(
                        listen_host=bt_host,
                        listen_port=bt_port,
                        upload_rate_limit=self.config.max_upload_rate,
                        # a cap is meant for the LAN too
                        limit_local_peers=self.config.max_upload_rate > 0,
                        trackers=tuple(f"{u}/announce" for u in self.config.trackers),
                    )
                )
            )
            self.peers = await self._stack.enter_async_context(PeerTable(self.agent_id))
            for host, port in self.config.peers:
                self.peers.offer(host, port, "static")
            self.seeds = SeedIndex(
                self.config.hub.cache_dir,
                self.state,
                self.swarm,
                self.agent_id,
                confirm=self._anonymous_visibility,
            )
            self.blobs = BlobFetcher(self.config, self.swarm, self.peers, self.seeds, self.state)
            self.revisions = Revisions(self.state, self.peers, self.agent_id)
            await asyncio.to_thread(self.revisions.load)
            self.downloads = DownloadJob(self.config, self.revisions, self.blobs, self.totals)
            self.publisher = Publisher(
                self.config.hub.cache_dir, self.seeds, self.revisions, self.agent_id
            )
            self.peer_port = await self._listen(
                make_peer_app(self), self.config.listen, peer_facing=True
            )
            self.local_port = await self._listen(
                make_local_app(self, hub=self), self.config.local_listen
            )
            if self.config.mdns:
                # Goodbyes go out on exit while the peer API is still up (exit stack order).
                await self._stack.enter_async_context(
                    MdnsDiscovery(
                        self.agent_id,
                        self.config.listen[0],
                        self.peer_port,
                        self.swarm.listen_port,
                        on_found=lambda host, port, _id: self.peers.offer(host, port, "mdns"),
                        on_lost=self.peers.withdraw,
                        interfaces=self.config.mdns_interfaces or None,
                    )
                )
            self.trackers = [
                await self._stack.enter_async_context(
                    TrackerSource(
                        url,
                        agent_id=self.agent_id,
                        api_host=self.config.listen[0],
                        api_port=self.peer_port,
                        bt_port=self.swarm.listen_port,
                        peers=self.peers,
                        holdings=lambda: (self.seeds.held.keys(), self.blobs.fetching_ids()),
                    )
                )
                for url in self.config.trackers
            ]
            self.blobs.set_lookups([t.lookup for t in self.trackers])
            self.blobs.herd.on_change = self._claims_changed
            # Know the configured peers before the first request can arrive, and load
            # huggingface_hub now (~0.3 s) rather than during the first download.
            await asyncio.gather(
                self.peers.check_all(),
                asyncio.to_thread(importlib.import_module, "huggingface_hub.hf_api"),
            )
        except BaseException:
            await self._stack.aclose()
            raise
        log.info(
            "agent %s: peers on %s:%d, local API on %s:%d, BitTorrent on %d",
            self.agent_id[:8],
            self.config.listen[0],
            self.peer_port,
            self.config.local_listen[0],
            self.local_port,
            self.swarm.listen_port,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.revisions.close()
        await self.blobs.herd.close()
        await self.blobs.save_all_resume_data()
        await self._stack.aclose()

    async def _listen(
        self, app: web.Application, where: tuple[str, int], *, peer_facing: bool = False
    ) -> int:
        # Caps below the fd limit, header/body/stall timeouts: peer/serving/limits.py.
        nofile = nofile_limit()
        limits = peer_limits(nofile) if peer_facing else local_limits(nofile)
        try:
            runner, port = await start_listener(app, where[0], where[1], limits)
        except OSError as exc:
            raise LocalError(
                f"cannot listen on {where[0]}:{where[1]}: {exc.strerror}",
                hint="choose another port, or stop the agent already using it",
            ) from exc
        self._stack.push_async_callback(runner.cleanup)
        return port

    async def serve(self, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.peers.run()),
                    tg.create_task(self.seeds.scan()),
                    tg.create_task(self.blobs.save_resume_periodically()),
                    *(tg.create_task(t.run()) for t in self.trackers),
                ]
                await stop.wait()
                for t in tasks:
                    t.cancel()
        except BaseExceptionGroup as group:
            raise primary_error(group) from None

    # -- peer API backend ------------------------------------------------------------

    def health(self) -> wire.Health:
        return wire.Health(
            agent_id=self.agent_id, bt_port=self.swarm.listen_port, blobs=len(self.seeds.held)
        )

    def manifests_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]:
        return self.seeds.manifests_for(blob_ids)

    def fetching_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]:
        return self.blobs.fetching_for(blob_ids)

    def stream_of(self, blob_id: str) -> InFlightBlob | None:
        return self.blobs.stream_of(blob_id)

    def claims_for(self, blob_ids: tuple[str, ...]) -> list[wire.Claim]:
        return self.blobs.herd.claims_for(blob_ids)

    def _claims_changed(self) -> None:
        for t in self.trackers:
            t.nudge()

    def verified_blob_path(self, blob_id: str) -> Path | None:
        return self.seeds.shared_path(blob_id)

    def count_upload(self, n: int) -> None:
        self.totals.bytes_uploaded_http += n

    def revision_for(self, request: wire.RevisionRequest) -> wire.RevisionManifest | None:
        return self.revisions.shared(request)

    # -- local API backend -----------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        uploaded = self.totals.bytes_uploaded_http
        for ih in self.swarm.torrents():
            with contextlib.suppress(Exception):
                uploaded += (await self.swarm.status(ih)).uploaded_payload_bytes
        return {
            "agent_id": self.agent_id,
            "bytes_from_peers": self.totals.bytes_from_peers,
            "bytes_from_mirror": self.totals.bytes_from_mirror,
            "bytes_uploaded": uploaded + self.blobs.uploaded_by_removed,
            "hash_failures": self.totals.hash_failures,
            "downloads": self.totals.downloads,
            "peers": [
                {
                    "agent_id": p.agent_id,
                    "host": p.host,
                    "api_port": p.api_port,
                    "bt_port": p.bt_port,
                }
                for p in self.peers.live()
            ],
            "seeded_blobs": len(self.seeds.held),
            **Setup.of(self.config.hub).to_json(),
            "listen": {
                "peer_api": self.peer_port,
                "local_api": self.local_port,
                "bittorrent": self.swarm.listen_port,
            },
        }

    async def _anonymous_visibility(self, repo_type: str, repo_id: str) -> Visibility | None:
        flags = await anonymous_flags(replace(self.config.hub, token=None), repo_type, repo_id)
        return (
            None if flags is None else Visibility.of_mirror_answer(private=flags[0], gated=flags[1])
        )

    async def run_download(self, request: DownloadRequest, emit: Emit) -> Done:
        return await self.downloads.run(request, emit)

    async def publish(self, spec: PublishRequest, emit: Emit) -> dict[str, Any]:
        """`hfswarm publish`: a folder into this cache as local/NAME, seeded and shared."""
        return await self.publisher.run(spec, emit)

    # -- HF_ENDPOINT mode backend (peer/serving/hub_api.py) ----------------------------

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
            async with MirrorFetcher(hub, self.config.download) as mirror:
                path = await self.blobs.obtain(snapshot, file, mirror, counters, access)
            self.totals.add(
                Counters(
                    from_peers=counters.from_peers,
                    from_mirror=counters.from_mirror,
                    hash_failures=counters.hash_failures,
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
