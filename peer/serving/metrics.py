"""Prometheus metrics of one agent, for ``GET /metrics`` on the local listener.

The agent already counts what matters (`peer.agent.jobs.Totals`, its peer table, seed
index, herd, swarm); nothing is incremented twice for Prometheus. At each scrape the
local API's backend reads those parts into one frozen `MetricsSnapshot`
(`LocalService.metrics_snapshot`, async: libtorrent's upload counters are read in a
thread) and `AgentMetrics` renders it through a `CollectorRegistry` of the agent's own
(never prometheus_client's global default registry):

    metrics = AgentMetrics()
    body = metrics.render(await backend.metrics_snapshot())

| metric | type | what |
|---|---|---|
| hfswarm_downloaded_from_peers_bytes_total | counter | blob bytes received from LAN peers |
| hfswarm_downloaded_from_mirror_bytes_total | counter | blob bytes received from the mirrors |
| hfswarm_uploaded_to_peers_bytes_total | counter | blob bytes sent to peers (all three ways) |
| hfswarm_uploaded_over_member_stream_bytes_total | counter | of those, the member stream's |
| hfswarm_served_to_clients_bytes_total | counter | resolve bodies sent to HF_ENDPOINT clients |
| hfswarm_downloads_total | counter | downloads of the local API finished |
| hfswarm_hash_failures_total | counter | pieces or blobs that failed their hash |
| hfswarm_peer_bans_total | counter | peers banned (policy or libtorrent) |
| hfswarm_herd_leaderships_total | counter | blobs this agent led to the mirror |
| hfswarm_mirror_errors_total{mirror} | counter | failed attempts, per mirror URL |
| hfswarm_active_downloads | gauge | local API downloads running |
| hfswarm_active_blob_fetches | gauge | blobs being fetched |
| hfswarm_active_streams{to} | gauge | bodies being sent: to="client", to="peer" (/v1/blobs) |
| hfswarm_herd_leading | gauge | blobs this agent leads now |
| hfswarm_live_peers | gauge | peers answering health checks |
| hfswarm_seeded_blobs | gauge | blobs shared with the LAN |
| hfswarm_seeded_bytes | gauge | their size |
| hfswarm_cache_size_bytes | gauge | bytes in the cache's blobs/ folders (hard links once) |
| hfswarm_cache_quota_bytes | gauge | the cache quota; only when one is set |
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class MetricsSnapshot:
    """The agent's figures at one instant."""

    bytes_from_peers: int = 0
    bytes_from_mirror: int = 0
    bytes_uploaded: int = 0
    bytes_uploaded_member_stream: int = 0  # a part of bytes_uploaded
    bytes_served_clients: int = 0
    downloads: int = 0
    hash_failures: int = 0
    bans: int = 0
    herd_leaderships: int = 0
    mirror_errors: Mapping[str, int] = field(default_factory=dict)
    active_downloads: int = 0
    active_blob_fetches: int = 0
    streams_to_clients: int = 0
    streams_to_peers: int = 0
    herd_leading: int = 0
    live_peers: int = 0
    seeded_blobs: int = 0
    seeded_bytes: int = 0
    cache_size_bytes: int = 0
    cache_quota_bytes: int | None = None


def families(s: MetricsSnapshot) -> Iterator[Metric]:
    """The snapshot as Prometheus metric families (counters get ``_total``)."""

    def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
        return CounterMetricFamily(f"hfswarm_{name}", doc, value=value)

    def gauge(name: str, doc: str, value: int) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"hfswarm_{name}", doc, value=value)

    yield counter(
        "downloaded_from_peers_bytes", "Blob bytes received from LAN peers.", s.bytes_from_peers
    )
    yield counter(
        "downloaded_from_mirror_bytes", "Blob bytes received from the mirrors.", s.bytes_from_mirror
    )
    yield counter(
        "uploaded_to_peers_bytes",
        "Blob bytes sent to LAN peers (BitTorrent, HTTP and the member blob stream).",
        s.bytes_uploaded,
    )
    yield counter(
        "uploaded_over_member_stream_bytes",
        "The part of uploaded_to_peers sent over cluster mode's member blob stream.",
        s.bytes_uploaded_member_stream,
    )
    yield counter(
        "served_to_clients_bytes",
        "File bytes sent to Hub clients of HF_ENDPOINT mode.",
        s.bytes_served_clients,
    )
    yield counter("downloads", "Downloads of the local API finished.", s.downloads)
    yield counter("hash_failures", "Pieces or blobs that failed their hash check.", s.hash_failures)
    yield counter("peer_bans", "Peers banned (by the scheduling policy or libtorrent).", s.bans)
    yield counter(
        "herd_leaderships",
        "Blobs this agent fetched from the mirror as the herd's leader.",
        s.herd_leaderships,
    )
    errors = CounterMetricFamily(
        "hfswarm_mirror_errors", "Failed attempts to get answers of a mirror.", labels=["mirror"]
    )
    for mirror, n in sorted(s.mirror_errors.items()):
        errors.add_metric([mirror], n)
    yield errors
    yield gauge("active_downloads", "Downloads of the local API running.", s.active_downloads)
    yield gauge("active_blob_fetches", "Blobs being fetched.", s.active_blob_fetches)
    streams = GaugeMetricFamily(
        "hfswarm_active_streams",
        "Bodies being sent: to HF_ENDPOINT clients, to peers over HTTP.",
        labels=["to"],
    )
    streams.add_metric(["client"], s.streams_to_clients)
    streams.add_metric(["peer"], s.streams_to_peers)
    yield streams
    yield gauge("herd_leading", "Blobs this agent leads to the mirror now.", s.herd_leading)
    yield gauge("live_peers", "Peers answering health checks.", s.live_peers)
    yield gauge("seeded_blobs", "Blobs shared with the LAN.", s.seeded_blobs)
    yield gauge("seeded_bytes", "Bytes of the blobs shared with the LAN.", s.seeded_bytes)
    yield gauge(
        "cache_size_bytes",
        "Bytes of the blobs in the HF cache (hard links counted once).",
        s.cache_size_bytes,
    )
    if s.cache_quota_bytes is not None:
        yield gauge("cache_quota_bytes", "The cache's size quota.", s.cache_quota_bytes)


class _SnapshotCollector(Collector):
    """Yields the snapshot the current scrape read (scrapes render one at a time)."""

    def __init__(self) -> None:
        self.snapshot = MetricsSnapshot()

    def collect(self) -> Iterator[Metric]:
        return families(self.snapshot)


class AgentMetrics:
    """One agent's registry: its collector only (no process or platform collectors)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector()
        self.registry.register(self._collector)

    def render(self, snapshot: MetricsSnapshot) -> bytes:
        """The text exposition format of `snapshot` (no await in between: not shared)."""
        self._collector.snapshot = snapshot
        return generate_latest(self.registry)
