"""What this agent gave its peers through the swarm, for the audit log: one line per peer
connection that received bytes of a blob, written when the connection closes; and the
peers libtorrent banned on its own (a piece that failed its hash check).

libtorrent counts upload per connection (`PeerSnapshot.uploaded_bytes`) and per torrent
(`TorrentStatus.uploaded_payload_bytes`), but a closed connection is gone from its peer
list. So when one closes, the torrent's total minus what is already accounted for (the
connections closed before) minus what the connections still open have had is what the
closed one took. Bytes sent between the two reads go to the closed connection: a line
can be a few blocks high, never low. A torrent removed before its connections closed (a
download of ours that just finished) is not accounted for here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from peer.agent.audit import AuditLog, BlobServed, PeerBanned
from peer.discovery.peer_table import PeerTable
from peer.transfer import events as ev
from peer.transfer.swarm import SwarmError, SwarmSession

log = logging.getLogger(__name__)

# info-hash -> the blob id its torrent carries (None: not a blob of ours any more)
BlobOf = Callable[[str], str | None]


def agent_id_at(peers: PeerTable, host: str) -> str | None:
    """The agent id of the live peer at `host`, if exactly one is there (several agents
    behind one address cannot be told apart by it)."""
    ids = {p.agent_id for p in peers.live() if p.host == host}
    return ids.pop() if len(ids) == 1 else None


class UploadWatch:
    def __init__(
        self,
        swarm: SwarmSession,
        peers: PeerTable,
        blob_of: BlobOf,
        audit: AuditLog,
        on_banned: Callable[[], None],
    ) -> None:
        self.swarm = swarm
        self.peers = peers
        self.blob_of = blob_of
        self.audit = audit
        self.on_banned = on_banned  # counts libtorrent's bans in the agent's totals
        self._accounted: dict[str, int] = {}  # info-hash -> bytes of closed connections

    async def run(self) -> None:
        stream = self.swarm.subscribe(kinds=(ev.PeerDisconnected, ev.PeerBanned, ev.TorrentRemoved))
        try:
            async for event in stream:
                if isinstance(event, ev.PeerDisconnected):
                    await self._closed(event)
                elif isinstance(event, ev.PeerBanned):
                    self.on_banned()
                    self.audit.write(
                        PeerBanned(
                            peer_address=str(event.endpoint),
                            reason="sent a piece that failed its hash check",
                            by="libtorrent",
                            blob_id=self.blob_of(event.info_hash),
                        )
                    )
                elif isinstance(event, ev.TorrentRemoved):
                    self._accounted.pop(event.info_hash, None)
        finally:
            stream.close()

    async def _closed(self, event: ev.PeerDisconnected) -> None:
        ih = event.info_hash
        try:
            open_now = await self.swarm.peers(ih)
            total = (await self.swarm.status(ih)).uploaded_payload_bytes
        except SwarmError:
            return  # the torrent is gone (see the module docstring)
        accounted = self._accounted.get(ih, 0)
        sent = total - accounted - sum(p.uploaded_bytes for p in open_now)
        if sent <= 0:
            return
        self._accounted[ih] = accounted + sent
        blob_id = self.blob_of(ih)
        if blob_id is None:
            return
        self.audit.write(
            BlobServed(
                peer_agent_id=agent_id_at(self.peers, event.endpoint.host),
                peer_address=str(event.endpoint),
                blob_id=blob_id,
                bytes=sent,
                via="swarm",
            )
        )
