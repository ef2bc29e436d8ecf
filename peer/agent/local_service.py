"""What this agent does for the CLI: the local API's backend
(`peer.serving.local_api.LocalBackend`): its status, downloads and publishes, pins and
live limits, answered by the agent's parts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from peer.agent.fetch import BlobFetcher
from peer.agent.jobs import DownloadJob, Totals
from peer.agent.limits import LiveLimits
from peer.agent.publish import Publisher
from peer.agent.quota import CacheQuota, PinSpec
from peer.agent.requests import Done, DownloadRequest, Emit, PublishRequest, Setup
from peer.agent.seeding import SeedIndex
from peer.config import AgentConfig, parse_rate
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
        quota: CacheQuota,
        limits: LiveLimits,
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
        self.quota = quota
        self.live_limits = limits

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
            "seeding": self.config.seeding,
            **(await self.quota.usage()),
            "limits": self.live_limits.current().to_json(),
            **Setup.of(self.config.hub).to_json(),
            "listen": {
                "peer_api": peer_port,
                "local_api": local_port,
                "bittorrent": self.swarm.listen_port,
            },
        }

    async def run_download(self, request: DownloadRequest, emit: Emit) -> Done:
        return await self.downloads.run(request, emit)

    async def publish(self, spec: PublishRequest, emit: Emit) -> dict[str, Any]:
        """`hfswarm publish`: a folder into this cache as local/NAME, seeded and shared."""
        return await self.publisher.run(spec, emit)

    async def pins(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.quota.pins.all()]

    async def pin(self, spec: dict[str, Any], add: bool) -> dict[str, Any]:
        """`hfswarm pin` / `unpin`: kept from eviction (and seeded under ``pinned``)."""
        pin = PinSpec.from_json(spec)
        pins = self.quota.pins
        changed = await asyncio.to_thread(pins.add if add else pins.remove, pin)
        if changed and self.config.seeding == "pinned":
            await self.seeds.apply_policy()
        return {"pin": str(pin), "changed": changed, "pins": await self.pins()}

    async def limits(self, change: dict[str, Any] | None) -> dict[str, Any]:
        """The live caps; `change` sets some ({"upload": "50MB/s" or bytes, ...})."""
        if change is not None:
            if not isinstance(change, dict) or not set(change) <= {"upload", "download", "mirror"}:
                raise ConfigError("limits take upload, download and mirror (bytes/s, 0: none)")
            rates = {k: _rate(k, v) for k, v in change.items()}
            self.live_limits.change(**rates)
        return self.live_limits.current().to_json()


def _rate(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"the {name} cap must be bytes/s or a rate like 50MB/s")
    return value if isinstance(value, int) else parse_rate(value, what=f"{name} cap")
