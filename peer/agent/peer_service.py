"""What this agent tells other agents: the peer API's backend
(`peer.serving.peer_api.PeerBackend`), answered by the agent's parts. Only shared blobs
are named or served (`SeedIndex.manifests_for`, `SeedIndex.shared_path`).

    app = make_peer_app(PeerService(agent_id, bt_port, seeds, blobs, revisions, totals))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from peer import wire
from peer.agent.audit import AuditLog, BlobServed
from peer.agent.fetch import BlobFetcher
from peer.agent.jobs import Totals
from peer.agent.revisions import Revisions
from peer.agent.seeding import SeedIndex
from peer.serving import member_stream
from peer.transfer.inflight import InFlightBlob


class PeerService:
    def __init__(
        self,
        agent_id: str,
        bt_port: int,
        seeds: SeedIndex,
        blobs: BlobFetcher,
        revisions: Revisions,
        totals: Totals,
        *,
        audit: AuditLog | None = None,
        peer_of: Callable[[str], str | None] = lambda _host: None,
        sign: Callable[[wire.Manifest], wire.Manifest] | None = None,
        seeding: str = "always",
        touch: Callable[[Iterable[str]], None] = lambda _: None,
    ) -> None:
        self.sign = sign  # cluster mode: every manifest offered is signed by us
        self.agent_id = agent_id
        self.bt_port = bt_port
        self.seeds = seeds
        self.blobs = blobs
        self.herd = blobs.herd
        self.revisions = revisions
        self.totals = totals
        self.audit = audit or AuditLog(None)
        self.peer_of = peer_of  # address -> the live peer's agent id, if known
        self.seeding = seeding
        self.touch = touch  # a blob served is a blob used (cache eviction is LRU)
        self.stream_port = 0  # cluster mode: the member blob stream's, once it listens

    def health(self) -> wire.Health:
        return wire.Health(
            agent_id=self.agent_id,
            bt_port=self.bt_port,
            blobs=len(self.seeds.held),
            stream_port=self.stream_port,
        )

    def manifests_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]:
        return self._signed(self.seeds.manifests_for(blob_ids))

    def fetching_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]:
        if self.seeding == "none":  # nothing offered, not even what is on its way
            return []
        return self._signed(self.blobs.fetching_for(blob_ids))

    def deals_for(self, blob_ids: tuple[str, ...]) -> list[wire.Deal]:
        return self.blobs.deals_for(blob_ids) if self.seeding != "none" else []

    def _signed(self, manifests: list[wire.Manifest]) -> list[wire.Manifest]:
        return manifests if self.sign is None else [self.sign(m) for m in manifests]

    def claims_for(self, blob_ids: tuple[str, ...]) -> list[wire.Claim]:
        return self.herd.claims_for(blob_ids)

    def verified_blob_path(self, blob_id: str) -> Path | None:
        path = self.seeds.shared_path(blob_id)
        if path is not None:
            self.touch((blob_id,))
        return path

    def relay_of(self, blob_id: str) -> InFlightBlob | None:
        if self.seeding == "none":
            return None
        return self.blobs.relay_of(blob_id)

    def relay_after_lead(self, blob_id: str) -> Path | None:
        if self.seeding == "none" or not self.blobs.led_lately(blob_id):
            return None
        return self.verified_blob_path(blob_id)

    def count_upload(self, n: int, via: str = "http") -> None:
        if via == member_stream.VIA:
            self.totals.bytes_uploaded_member_stream += n
        else:
            self.totals.bytes_uploaded_http += n

    def blob_served(self, blob_id: str, address: str, sent: int, via: str = "http") -> None:
        if sent > 0:
            self.audit.write(
                BlobServed(
                    peer_agent_id=self.peer_of(address),
                    peer_address=address,
                    blob_id=blob_id,
                    bytes=sent,
                    via=via,
                )
            )

    def revision_for(self, request: wire.RevisionRequest) -> wire.RevisionManifest | None:
        return self.revisions.shared(request)
