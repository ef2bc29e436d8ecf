"""Typed events copied out of libtorrent alerts.

A libtorrent alert object dies at the next ``pop_alerts()`` call, so the swarm adapter
(`peer.transfer.swarm`) copies every alert it cares about into one of these frozen
dataclasses at once. They hold plain data only (str, int, bool, bytes, `Endpoint`):
no libtorrent objects, no handles, no timestamps. Whoever consumes them supplies its
own ``now`` (the scheduling policy is driven by a clock it is given).

Every torrent event carries ``info_hash``: the torrent's BitTorrent v2 info-hash
(sha256 of the info dict) as 64 lowercase hex characters. hfswarm only creates
v2-only torrents, so that one string names a swarm everywhere in the program.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A peer's TCP address as libtorrent reported it."""

    host: str
    port: int

    def __str__(self) -> str:
        # Bracket IPv6 literals so "host:port" stays unambiguous.
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SwarmEvent:
    """Base of every event the swarm session emits."""


# --- session-wide events -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listening(SwarmEvent):
    """The BitTorrent TCP listen socket is bound; ``port`` is the real port (even for 0)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ListenFailed(SwarmEvent):
    host: str
    port: int
    message: str


@dataclass(frozen=True, slots=True)
class AlertsDropped(SwarmEvent):
    """libtorrent's alert queue overflowed: some events were lost. Re-query status and
    piece state instead of trusting the event stream alone. ``alert_types`` is how many
    kinds of alert lost some (libtorrent does not count the alerts themselves)."""

    alert_types: int


@dataclass(frozen=True, slots=True)
class EventsDropped(SwarmEvent):
    """This subscriber's queue overflowed and ``count`` events were skipped for it."""

    count: int


# --- per-torrent events ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TorrentEvent(SwarmEvent):
    info_hash: str


@dataclass(frozen=True, slots=True)
class TorrentAdded(TorrentEvent):
    name: str


@dataclass(frozen=True, slots=True)
class TorrentChecked(TorrentEvent):
    """Existing data (or resume data) was checked; piece state is now meaningful."""


@dataclass(frozen=True, slots=True)
class MetadataReceived(TorrentEvent):
    """A torrent added by info-hash alone got its info dict from a peer."""


@dataclass(frozen=True, slots=True)
class MetadataFailed(TorrentEvent):
    message: str


@dataclass(frozen=True, slots=True)
class StateChanged(TorrentEvent):
    """``state``/``previous`` are libtorrent state names: checking_files,
    downloading_metadata, downloading, finished, seeding, checking_resume_data, ..."""

    state: str
    previous: str


@dataclass(frozen=True, slots=True)
class PieceFinished(TorrentEvent):
    """Piece ``piece`` passed its hash check. It may still sit in the write cache.

    ``fed_by_us`` is True when `SwarmSession.add_piece` had supplied data for this
    piece (mirror fallback); the bytes may still partly have come from peers if both
    raced on the same piece."""

    piece: int
    fed_by_us: bool


@dataclass(frozen=True, slots=True)
class HashFailed(TorrentEvent):
    """Piece ``piece`` failed its hash check and was discarded (it is not marked done).

    ``fed_by_us`` is True when the bad data came from `add_piece` (the mirror sent
    garbage), False when it came from peers. libtorrent does not say which peer sent
    it, but when one peer alone contributed it bans that peer itself and a
    `PeerBanned` event precedes this one."""

    piece: int
    fed_by_us: bool


@dataclass(frozen=True, slots=True)
class TorrentFinished(TorrentEvent):
    """Every wanted piece passed its hash check. NOT yet on disk: call
    `SwarmSession.flush_cache` and wait for it before hashing or linking the file."""


@dataclass(frozen=True, slots=True)
class CacheFlushed(TorrentEvent):
    """Outstanding writes of this torrent reached the file (libtorrent also sends this
    on its own, e.g. right after a torrent finishes)."""


@dataclass(frozen=True, slots=True)
class ResumeDataSaved(TorrentEvent):
    """bencoded resume data (``write_resume_data_buf``), including the info dict."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ResumeDataFailed(TorrentEvent):
    message: str


@dataclass(frozen=True, slots=True)
class FastresumeRejected(TorrentEvent):
    """Resume data did not match the files on disk; libtorrent re-checks them instead."""

    message: str


@dataclass(frozen=True, slots=True)
class TorrentError(TorrentEvent):
    """The torrent stopped on an error (typically disk I/O); it needs operator action."""

    message: str


@dataclass(frozen=True, slots=True)
class FileError(TorrentEvent):
    path: str
    message: str


@dataclass(frozen=True, slots=True)
class TorrentPaused(TorrentEvent):
    pass


@dataclass(frozen=True, slots=True)
class TorrentResumed(TorrentEvent):
    pass


@dataclass(frozen=True, slots=True)
class TorrentRemoved(TorrentEvent):
    pass


@dataclass(frozen=True, slots=True)
class FilesDeleted(TorrentEvent):
    pass


@dataclass(frozen=True, slots=True)
class FilesDeleteFailed(TorrentEvent):
    message: str


@dataclass(frozen=True, slots=True)
class PerformanceWarning(TorrentEvent):
    """libtorrent's performance_warning_t name, e.g. outstanding_request_limit_reached."""

    warning: str


# --- per-peer events ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerEvent(TorrentEvent):
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class PeerConnected(PeerEvent):
    pass


@dataclass(frozen=True, slots=True)
class PeerDisconnected(PeerEvent):
    message: str


@dataclass(frozen=True, slots=True)
class PeerBanned(PeerEvent):
    """libtorrent banned the peer (it sent data failing a hash check)."""


@dataclass(frozen=True, slots=True)
class PeerBlocked(PeerEvent):
    """A connection was refused by the IP filter (see `SwarmSession.ban_peer`)."""


@dataclass(frozen=True, slots=True)
class PeerError(PeerEvent):
    message: str
