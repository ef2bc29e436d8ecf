"""What this agent does for the CLI: the local API's backend
(`peer.serving.local_api.LocalBackend`): its status, metrics, downloads and publishes,
pins and live limits, answered by the agent's parts, and the audit lines of what it was
asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from peer.agent.audit import ApiCall, AuditLog, DownloadFinished, Published
from peer.agent.fetch import BlobFetcher
from peer.agent.jobs import DownloadJob, Totals
from peer.agent.limits import LiveLimits
from peer.agent.publish import Publisher
from peer.agent.quota import CacheQuota, PinSpec, cache_bytes
from peer.agent.requests import Done, DownloadRequest, Emit, PublishRequest, Setup
from peer.agent.seeding import SeedIndex
from peer.config import AgentConfig
from peer.discovery.peer_table import PeerTable
from peer.errors import ConfigError
from peer.serving.metrics import MetricsSnapshot
from peer.settings import BadValue, parse_rate
from peer.transfer.swarm import SwarmSession

# (peer API port, local API port): known once the listeners are bound, after this is made.
Ports = Callable[[], tuple[int, int]]
RATE_WINDOW = 5.0  # seconds of samples a transfer's rate is taken over


class TransferRates:
    """Each transfer's rate from the bytes done at the last few status reads (pure: the
    caller passes `now`); before two reads span half a second, its average since start."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def rate(self, key: str, done: int, started: float, now: float) -> float:
        samples = self._samples.setdefault(key, deque())
        samples.append((now, done))
        while len(samples) > 2 and now - samples[0][0] > self.window:
            samples.popleft()
        (t0, d0), (t1, d1) = samples[0], samples[-1]
        if t1 - t0 >= 0.5:
            return max(0.0, (d1 - d0) / (t1 - t0))
        return done / (now - started) if now - started > 0.05 else 0.0

    def keep(self, keys: set[str]) -> None:
        """Forget transfers that ended."""
        for key in set(self._samples) - keys:
            del self._samples[key]


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
        audit: AuditLog | None = None,
        peer_streams: Callable[[], int] = lambda: 0,
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
        self.audit = audit or AuditLog(None)
        self._peer_streams = peer_streams  # /v1/blobs bodies being sent now
        self._rates = TransferRates()
        self.quota = quota
        self.live_limits = limits

    async def _uploaded(self) -> int:
        t = self.totals
        uploaded = t.bytes_uploaded_http + t.bytes_uploaded_member_stream
        uploaded += self.blobs.uploaded_by_removed
        for ih in self.swarm.torrents():
            with contextlib.suppress(Exception):
                uploaded += (await self.swarm.status(ih)).uploaded_payload_bytes
        return uploaded

    def _seeded_repos(self) -> list[dict[str, Any]]:
        """Per repo, the shared blobs held for it and their bytes (a blob in two repos
        counts in both)."""
        repos: dict[str, list[int]] = {}
        for blob_id, held in list(self.seeds.held.items()):
            for key, visibility in self.seeds.provenance(blob_id).repos:
                if visibility.shared:
                    entry = repos.setdefault(key, [0, 0])
                    entry[0] += 1
                    entry[1] += held.manifest.size
        return [
            {"repo": key, "blobs": n, "bytes": size} for key, (n, size) in sorted(repos.items())
        ]

    def _transfers(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        active = self.blobs.active()
        for t in active:
            c = t.counters
            out.append(
                {
                    "repo": t.repo,
                    "file": t.path,
                    "blob": t.blob_id,
                    "size": c.size,
                    "done": c.done,
                    "from_peers": c.from_peers,
                    "from_mirror": c.from_mirror,
                    "rate": round(self._rates.rate(t.blob_id, c.done, t.started, now)),
                    "source": t.source,
                    "seconds": round(now - t.started, 1),
                }
            )
        self._rates.keep({t.blob_id for t in active})
        return out

    async def status(self) -> dict[str, Any]:
        peer_port, local_port = self._ports()
        seeded_repos = self._seeded_repos()
        return {
            "agent_id": self.agent_id,
            "mode": "open" if self.config.cluster is None else "cluster",
            "bytes_from_peers": self.totals.bytes_from_peers,
            "bytes_from_mirror": self.totals.bytes_from_mirror,
            "bytes_uploaded": await self._uploaded(),
            "bytes_uploaded_member_stream": self.totals.bytes_uploaded_member_stream,
            "bytes_served_clients": self.totals.bytes_served_clients,
            "hash_failures": self.totals.hash_failures,
            "bans": self.totals.bans,
            "downloads": self.totals.downloads,
            "active_downloads": self.totals.downloads_running,
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
            "seeded_bytes": sum(h.manifest.size for h in list(self.seeds.held.values())),
            "seeded_repos": seeded_repos,
            "transfers": self._transfers(),
            "seeding": self.config.seeding,
            **(await self.quota.usage()),
            "limits": self.live_limits.current().to_json(),
            **Setup.of(self.config.hub, self.config.download).to_json(),
            "listen": {
                "peer_api": peer_port,
                "local_api": local_port,
                "bittorrent": self.swarm.listen_port,
            },
        }

    async def metrics_snapshot(self) -> MetricsSnapshot:
        herd = self.blobs.herd
        return MetricsSnapshot(
            bytes_from_peers=self.totals.bytes_from_peers,
            bytes_from_mirror=self.totals.bytes_from_mirror,
            bytes_uploaded=await self._uploaded(),
            bytes_uploaded_member_stream=self.totals.bytes_uploaded_member_stream,
            bytes_served_clients=self.totals.bytes_served_clients,
            downloads=self.totals.downloads,
            hash_failures=self.totals.hash_failures,
            bans=self.totals.bans,
            herd_leaderships=herd.leaderships,
            mirror_errors=dict(self.totals.mirror_errors),
            active_downloads=self.totals.downloads_running,
            active_blob_fetches=len(self.blobs.active()),
            streams_to_clients=self.totals.streams_to_clients,
            streams_to_peers=self._peer_streams(),
            herd_leading=herd.leading_count(),
            live_peers=len(self.peers.live()),
            seeded_blobs=len(self.seeds.held),
            seeded_bytes=sum(h.manifest.size for h in list(self.seeds.held.values())),
            cache_size_bytes=await asyncio.to_thread(cache_bytes, self.config.hub.cache_dir),
            cache_quota_bytes=self.quota.limit or None,
        )

    def api_call(self, call: ApiCall) -> None:
        self.audit.write(call)

    async def run_download(self, request: DownloadRequest, emit: Emit) -> Done:
        if request.local_dir is not None:  # never a caller's folder (the CLI copies)
            raise ConfigError(
                "the agent does not write into a local dir: it downloads into its cache",
                hint="the CLI copies the snapshot into --local-dir itself",
            )
        self.totals.downloads_running += 1
        try:
            done = await self.downloads.run(request, emit)
        finally:
            self.totals.downloads_running -= 1
        self.audit.write(
            DownloadFinished(
                via="local_api",
                repo_type=request.repo_type,
                repo_id=request.repo_id,
                revision=request.revision,
                commit=done.commit,
                files=done.files,
                bytes_from_peers=done.counters.from_peers,
                bytes_from_mirror=done.counters.from_mirror,
                bytes_reused=done.counters.reused,
            )
        )
        return done

    async def publish(self, spec: PublishRequest, emit: Emit) -> dict[str, Any]:
        """`hfswarm publish`: a folder into this cache as local/NAME, seeded and shared."""
        done = await self.publisher.run(spec, emit)
        self.audit.write(
            Published(
                repo_type=spec.repo_type,
                repo_id=spec.repo_id,
                commit=str(done.get("commit", "")),
                files=int(done.get("files", 0)),
                bytes=int(done.get("total", 0)),
                source=str(spec.path),
            )
        )
        return done

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
    if isinstance(value, int):
        return value
    try:
        return parse_rate(value)
    except BadValue as exc:
        raise ConfigError(f"the {name} cap: {exc.problem}", hint=exc.hint) from None
