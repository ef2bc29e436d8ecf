"""What this agent does for the CLI: the local API's backend
(`peer.serving.local_api.LocalBackend`): its status, downloads and publishes, answered by
the agent's parts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from peer.agent.fetch import BlobFetcher
from peer.agent.jobs import DownloadJob, Totals
from peer.agent.publish import Publisher
from peer.agent.requests import Done, DownloadRequest, Emit, PublishRequest, Setup
from peer.agent.seeding import SeedIndex
from peer.config import AgentConfig
from peer.discovery.peer_table import PeerTable
from peer.errors import ConfigError
from peer.transfer.swarm import SwarmSession

# (peer API port, local API port): known once the listeners are bound, after this is made.
Ports = Callable[[], tuple[int, int]]


class LocalService:
    def __init__(
        self,
        config: AgentConfig,
        agent_id: str,
        *,
        swarm: SwarmSession,
        peers: PeerTable,
        seeds: SeedIndex,
        blobs: BlobFetcher,
        downloads: DownloadJob,
        publisher: Publisher,
        totals: Totals,
        ports: Ports,
    ) -> None:
        self.config = config
        self.agent_id = agent_id
        self.swarm = swarm
        self.peers = peers
        self.seeds = seeds
        self.blobs = blobs
        self.downloads = downloads
        self.publisher = publisher
        self.totals = totals
        self._ports = ports

    async def status(self) -> dict[str, Any]:
        uploaded = self.totals.bytes_uploaded_http
        for ih in self.swarm.torrents():
            with contextlib.suppress(Exception):
                uploaded += (await self.swarm.status(ih)).uploaded_payload_bytes
        peer_port, local_port = self._ports()
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
            **Setup.of(self.config.hub, self.config.download).to_json(),
            "listen": {
                "peer_api": peer_port,
                "local_api": local_port,
                "bittorrent": self.swarm.listen_port,
            },
        }

    async def run_download(self, request: DownloadRequest, emit: Emit) -> Done:
        if request.local_dir is not None:  # never a caller's folder (the CLI copies)
            raise ConfigError(
                "the agent does not write into a local dir: it downloads into its cache",
                hint="the CLI copies the snapshot into --local-dir itself",
            )
        return await self.downloads.run(request, emit)

    async def publish(self, spec: PublishRequest, emit: Emit) -> dict[str, Any]:
        """`hfswarm publish`: a folder into this cache as local/NAME, seeded and shared."""
        return await self.publisher.run(spec, emit)
