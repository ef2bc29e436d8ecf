"""`SilentPeer`: a peer API backend (`peer.serving.peer_api.PeerBackend`) that holds,
fetches, claims and serves nothing. Tests of lying or half-done peers subclass it and
override only what their peer says."""

from __future__ import annotations

from pathlib import Path

from peer import wire
from peer.transfer.inflight import InFlightBlob


class SilentPeer:
    agent_id = "e" * 32
    bt_port = 0
    blobs = 0

    def health(self) -> wire.Health:
        return wire.Health(agent_id=self.agent_id, bt_port=self.bt_port, blobs=self.blobs)

    def manifests_for(self, ids: tuple[str, ...]) -> list[wire.Manifest]:
        return []

    def fetching_for(self, ids: tuple[str, ...]) -> list[wire.Manifest]:
        return []

    def claims_for(self, ids: tuple[str, ...]) -> list[wire.Claim]:
        return []

    def verified_blob_path(self, blob_id: str) -> Path | None:
        return None

    def relay_of(self, blob_id: str) -> InFlightBlob | None:
        return None

    def relay_after_lead(self, blob_id: str) -> Path | None:
        return None

    def count_upload(self, n: int) -> None:
        return None

    def blob_served(self, blob_id: str, address: str, sent: int) -> None:
        return None

    def revision_for(self, request: wire.RevisionRequest) -> wire.RevisionManifest | None:
        return None
