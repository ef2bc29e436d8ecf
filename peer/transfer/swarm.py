"""The libtorrent adapter: the ONLY module of hfswarm that imports libtorrent.

Everything else talks to the swarm through `SwarmSession` (an async context manager),
a few pure helpers (`create_v2_torrent`, `parse_torrent`, `info_hash_of`) and the typed
events of `peer.transfer.events`. libtorrent errors (``RuntimeError`` from the binding)
are translated into `SwarmError` here, at the edge.

How the pieces fit:

- Alerts reach asyncio through ``set_alert_fd`` on a non-blocking pipe watched with
  ``loop.add_reader``. On a wake-up the pipe is emptied and ``pop_alerts()`` drained
  until it returns nothing; then the pipe is left unwatched for ``ALERT_BATCH`` and
  drained again by a timer, as long as alerts keep coming (one wake-up per batch). Each
  alert is copied at once into a frozen event (an alert object dies at the next
  ``pop_alerts``).
  ``set_alert_notify`` is avoided: it runs a Python callback on libtorrent's thread,
  which must take the GIL there.
- Events fan out to subscribers (`SwarmSession.subscribe`, one bounded queue each) and
  to one-shot waiters (`SwarmSession.expect`), which the adapter also uses itself for
  ``flush_cache`` and ``save_resume_data``.
- Calls that wait for libtorrent's network thread (``add_torrent``, ``status``,
  ``get_peer_info``, ...) run in a worker thread; calls that only post a message
  (``connect_peer``, ``add_piece``, ``flush_cache``, ...) run inline.

libtorrent behaviours measured with the 2.1.1 wheel that this module relies on:

- ``torrent_finished`` fires before the data is written: ``await flush_cache(ih)``
  (which waits for ``cache_flushed``) before hashing, linking or copying the file.
- ``save_resume_data`` only lists pieces that reached the disk: `save_resume_data`
  therefore flushes first.
- ``add_piece`` silently ignores data of the wrong length (no alert at all) and a
  negative piece index crashes the process (segfault): both are checked here. The
  last piece of a file is its real length, without the v2 tail padding.
- ``add_piece`` data given while the torrent checks its files (right after an add,
  after metadata arrives, during a re-check) is dropped without a word: the adapter
  holds it until ``torrent_checked``. Paused torrents do take fed pieces.
- ``list_files`` records the executable bit as a file attribute inside the info dict,
  which would give the same blob different info-hashes on different machines:
  torrents are created with ``no_attributes``. A listen port in use makes libtorrent
  try the next ports (``max_retry_port_bind``) and then any port: both are turned off.
- In ``seed_mode`` libtorrent hashes each piece the first time a peer asks for it; a
  corrupt piece makes the seeder fail that hash, leave seed mode and re-check the
  whole file, so it never reaches the peer.
- When one peer alone sent a piece that fails its hash, libtorrent bans that peer by
  itself (``peer_ban_alert``, just before ``hash_failed_alert``).
- Adding a torrent whose info-hash is already in the session silently returns the
  existing handle (even with another save path) unless ``duplicate_is_error`` is set.
- ``load_torrent_buffer`` moves a torrent's trackers, web seeds and DHT nodes into the
  add-torrent params: they are cleared here, so a hostile torrent cannot make the agent
  contact outside hosts.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import libtorrent as lt

from peer.errors import ConfigError, HfswarmError, LocalError
from peer.transfer import events as ev
from peer.verification.hashing import SHA256_RE

log = logging.getLogger(__name__)

T = TypeVar("T")

BLOCK_SIZE = 16 * 1024  # BitTorrent v2 merkle leaf size; the smallest legal piece size
# Requests one peer may queue with us while it is a torrent's only peer: libtorrent's
# default (`SwarmSettings.shared_peer_requests` once a torrent has more than one).
ALONE_PEER_REQUESTS = 2000
# After a drain, the alert pipe is not watched for this long, and what came meanwhile is
# drained in one go: a fast download posts a piece alert every 2-3 ms, and each drain
# wakes every subscriber's task, so draining at once made a wake-up chain per piece
# (docs/benchmarks.md 8.23). 20 ms, not 5: each batch costs the event loop a wake-up and
# a turn of every subscriber, and at 5 ms a GiB took 450-500 of them (8.30). 50 ms, not
# 20: 144 wake-ups of the downloading agent's main thread per GiB instead of 262 and
# 0.05 s less of its CPU (8.37); a download's last 64 MiB are drained at once
# (`WatchTheEnd`), which keeps its tail within 20 ms of what it was at 20 ms. The first
# alert after a quiet spell is drained at once, and so is every alert while someone
# waits for one urgently (`expect`: a fed piece, the last flush), so the delay falls on
# events nobody awaits: a download's driver sees its pieces up to 50 ms late.
ALERT_BATCH = 0.05
# How long a torrent counts as shared after its peers fell to one: longer than the peers
# of a torrent we drop take to connect again (`min_reconnect_time` 2 s, `RequestBound`).
SHARED_HOLD = 5.0
# A torrent turned shared is reconnected only if it still has several peers this long
# after: a duplicate connection libtorrent closes at once must not drop our downloader
# (it then took a blob's rest from the mirror; docs/benchmarks.md 8.27).
SHARED_CONFIRM = 0.5
# A torrent's peers are dropped for a reconnect at most once in this many seconds,
# whatever comes and goes (a peer slower to connect again than the hold, told the alone
# bound again, must not make it a loop).
RECONNECT_GAP = 30.0
DEFAULT_PRIORITY = 4  # libtorrent's piece priority unless told otherwise


class SwarmError(HfswarmError):
    """libtorrent refused or failed an operation."""


class InvalidTorrent(SwarmError):
    """Bytes that are not a well-formed BitTorrent v2 torrent."""


class UnknownTorrent(SwarmError):
    """An info-hash this session does not hold."""


class TorrentExists(SwarmError):
    """The info-hash is already in the session."""


class SwarmClosed(SwarmError):
    """The session was closed while an operation waited on it."""


class PortUnavailable(SwarmError, LocalError):
    """The listen port cannot be bound (in use, or not this user's to bind): this machine
    refused, so a `LocalError` (exit 5), not a bug."""


def _translate(what: str, exc: BaseException) -> SwarmError:
    return SwarmError(f"{what}: {exc}", hint="see the agent log for the libtorrent error")


# --- settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class SslIdentity:
    """Cluster mode: SSL torrents. Every torrent is added as its SSL variant (the info
    dict carries ``ssl-cert``, the cluster CA, so its info-hash differs from the
    canonical one; this module maps the two and its API speaks the canonical one), the
    session listens with SSL only, and each handle presents the member certificate.
    libtorrent then accepts only peers whose certificate the CA signed (and whose
    subject alternative name is ``*`` or the torrent's name)."""

    root_cert_pem: str
    cert_path: str  # PEM: the member certificate (the member file holds it)
    key_path: str  # PEM: its private key
    dh_params_path: str  # PEM DH parameters (libtorrent insists on a file)


@dataclass(frozen=True)
class SwarmSettings:
    """Session settings; defaults suit a LAN (the libtorrent behaviours they allow for:
    this module's docstring)."""

    listen_host: str = "0.0.0.0"
    # 0 picks a free port; `SwarmSession.listen_port` tells which one was bound.
    listen_port: int = 0
    # Start of the 20-byte peer id (libtorrent's peer_fingerprint); the rest is random.
    peer_id_prefix: str = "-HS0010-"
    # libtorrent's default (500) starves a fast LAN link; ~1500 keeps it busy.
    max_out_request_queue: int = 1500
    # Alerts are drained on every wake-up; the queue only needs to absorb bursts.
    alert_queue_size: int = 10_000
    connections_limit: int = 200
    # Peers served at once; LAN fan-out wants more than libtorrent's default of 8.
    upload_slots: int = 32
    # Requests (16 KiB blocks) one peer may queue with us while a torrent of ours has
    # more than one peer connected (libtorrent's `max_allowed_in_request_queue`; with one
    # peer, its default of 2000). Each downloader sizes its queue at a seeder to its rate
    # and keeps asking for what is rarest when it asks; a deep queue is served seconds
    # later, by which time other downloaders hold those pieces, and a seeder shared by 8
    # hosts on 100 Mbit/s links sent ~1.8 copies of a repo. A short queue keeps the picks
    # fresh: at 32 a loopback seeder shared by 2-4 downloaders took 0.61-0.66x the time.
    # Alone, a peer keeps the deep queue: at 128 a 1 GiB loopback download from one
    # seeder took 1.45x the time (docs/benchmarks.md 8.15, 8.17). A peer learns the bound
    # in its handshake: see `RequestBound` for the peers that came while it was alone.
    shared_peer_requests: int = 32
    # libtorrent picks whole pieces, up to 8 MiB of them at once and past its request
    # queue, from a peer that sends a piece within this many seconds (its default 20).
    # A seeder shared by 8 hosts x 4 files sends each connection ~0.4 MB/s: 20 s made each
    # downloader ask it for 8 pieces ahead, served up to 20 s later, when others held
    # them. At 1 s, pieces are picked whole only from a peer sending >= 1 MiB/s (a lone
    # LAN or loopback transfer keeps them); others get requests as the queue asks.
    whole_piece_seconds: int = 1
    upload_rate_limit: int = 0  # bytes/s, 0 = unlimited
    download_rate_limit: int = 0  # bytes/s, 0 = unlimited
    # libtorrent exempts peers on the local network from rate limits unless told not to.
    limit_local_peers: bool = False
    # Verified pieces libtorrent may hold in memory before writing them (its default,
    # 100 MiB, kept a whole 24 MiB download off the disk until it finished, so a kill -9
    # lost every piece): a kill loses at most this much. 1 MiB against 8 MiB: 0.90x the
    # time and 1.84 vs 2.36 CPU s of a bare 1 GiB loopback download (docs/benchmarks.md).
    max_queued_disk_bytes: int = 1 << 20
    user_agent: str = "hfswarm/0.1"
    start_timeout: float = 10.0
    # BitTorrent announce URLs put on every torrent (LAN trackers' /announce), so
    # libtorrent finds swarm peers through them directly as well.
    trackers: tuple[str, ...] = ()
    ssl: SslIdentity | None = None  # cluster mode: SSL torrents only

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"BitTorrent port {self.listen_port} is out of range 0-65535")
        if not self.listen_host or any(c.isspace() or c == "," for c in self.listen_host):
            raise ConfigError(f"BitTorrent listen host {self.listen_host!r} is not an address")
        if not (self.peer_id_prefix.isascii() and 0 < len(self.peer_id_prefix) <= 20):
            raise ConfigError("the peer-id prefix must be 1-20 ASCII characters")
        for name in (
            "max_out_request_queue",
            "shared_peer_requests",
            "alert_queue_size",
            "connections_limit",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"swarm setting {name} must be at least 1")
        if self.whole_piece_seconds < 0:
            raise ConfigError("swarm setting whole_piece_seconds must be at least 0")
        if self.upload_slots < 1 or self.upload_rate_limit < 0 or self.download_rate_limit < 0:
            raise ConfigError("swarm upload slots must be >= 1 and rate limits >= 0")

    @property
    def listen_interface(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}{'s' if self.ssl is not None else ''}"

    def to_libtorrent(self) -> lt.settings_pack:
        cat = lt.alert.category_t
        alert_mask = (
            cat.status_notification  # state changes, finished, metadata, listen, hash failed
            | cat.error_notification  # torrent/file errors, dropped alerts
            | cat.storage_notification  # cache flushed, resume data, files deleted
            | cat.piece_progress_notification  # piece finished (not per-block alerts)
            | cat.peer_notification  # peer banned, peer errors
            | cat.connect_notification  # peer connected / disconnected
            | cat.ip_block_notification  # connections refused by our ban filter
            | cat.performance_warning
        )
        return {
            "listen_interfaces": self.listen_interface,
            # A taken port must fail loudly: falling back to a random port would leave
            # the agent advertising a port nobody listens on.
            "listen_system_port_fallback": False,
            "max_retry_port_bind": 0,  # nor trying the next ports silently
            # LAN only: peers come from hfswarm's own discovery, never from the
            # internet, and uTP runs ~30x slower than TCP on loopback/LAN.
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "enable_outgoing_tcp": True,
            "enable_incoming_tcp": True,
            "dht_bootstrap_nodes": "",
            # Several agents behind one address (containers, NAT, tests on loopback)
            # otherwise break the swarm with "duplicate peer-id".
            "allow_multiple_connections_per_ip": True,
            "max_out_request_queue": self.max_out_request_queue,
            "whole_pieces_threshold": self.whole_piece_seconds,
            "max_allowed_in_request_queue": ALONE_PEER_REQUESTS,
            "max_queued_disk_bytes": self.max_queued_disk_bytes,
            "alert_mask": int(alert_mask),
            "alert_queue_size": self.alert_queue_size,
            "peer_fingerprint": self.peer_id_prefix,
            "user_agent": self.user_agent,
            "connections_limit": self.connections_limit,
            "unchoke_slots_limit": self.upload_slots,
            "upload_rate_limit": self.upload_rate_limit,
            "download_rate_limit": self.download_rate_limit,
            "ignore_limits_on_local_network": not self.limit_local_peers,
            # LAN timing: libtorrent's defaults are tuned for the internet; a peer that
            # dropped is not retried for a minute. Connections wait for libtorrent's
            # tick: at 100 ms (its default 500) the first piece of a bare 1 GiB loopback
            # download came at 0.11 s instead of 0.51 s, the whole in 0.88x the time.
            "tick_interval": 100,
            "smooth_connects": False,
            "min_reconnect_time": 2,
            "peer_connect_timeout": 5,
            # A seed never dials its peers: downloaders dial the holders they choose
            # (`peer.scheduling.feeders`), and a seed dialling a downloader's listen port
            # again got past the downloader's per-torrent ban of it (`rejoin`): with
            # feeders, the seeder still sent 1.53 copies to 8 hosts (benchmarks 8.28).
            "seeding_outgoing_connections": False,
            # Two hashing threads: piece checks of a fast LAN download keep one busy.
            "hashing_threads": 2,
            # Keep more queued for a peer that drains a 1-10 Gbit link.
            "send_buffer_watermark": 4 * 1024 * 1024,
        }


# --- torrents without a session ------------------------------------------------------


@dataclass(frozen=True)
class TorrentFile:
    path: str
    size: int
    offset: int
    # v2 merkle root over the file's 16 KiB blocks (not sha256 of the file); 32 bytes.
    pieces_root: bytes
    # BEP 47 attributes libtorrent understood: "x" executable, "h" hidden, "l" symlink.
    attributes: str = ""


@dataclass(frozen=True)
class TorrentMeta:
    """What a torrent says about itself; pad files are left out of ``files``."""

    info_hash: str  # v2 info-hash, 64 hex
    has_v1: bool
    name: str
    piece_size: int
    num_pieces: int
    files: tuple[TorrentFile, ...]
    # Keys of the bencoded dicts, for callers that insist on a canonical shape
    # (only filled by `parse_torrent`, empty when read from a live handle).
    top_level_keys: frozenset[str] = frozenset()
    info_keys: frozenset[str] = frozenset()
    _offsets: tuple[int, ...] = field(default=(), repr=False, compare=False)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def piece_length(self, piece: int) -> int:
        """Bytes of real file data in ``piece``: what `add_piece` must be given.

        v2 pieces never span files and the tail padding after a file is not data, so
        the last piece of a file is shorter than ``piece_size``."""
        if not 0 <= piece < self.num_pieces:
            raise SwarmError(f"piece {piece} is out of range 0-{self.num_pieces - 1}")
        start = piece * self.piece_size
        i = bisect.bisect_right(self._offsets, start) - 1
        if i < 0:
            return 0
        f = self.files[i]
        return max(0, min(self.piece_size, f.offset + f.size - start))


def _hex_v2(ihs: Any) -> str | None:
    if ihs is None or not ihs.has_v2():
        return None
    value = bytes(ihs.v2.to_bytes()).hex()
    return None if value == "0" * 64 else value


def _meta_from_ti(ti: Any, top: frozenset[str], info: frozenset[str]) -> TorrentMeta:
    ih = _hex_v2(ti.info_hashes())
    if ih is None:
        raise InvalidTorrent("the torrent is not a BitTorrent v2 torrent (no v2 info-hash)")
    layout = ti.layout()
    attr_bits = (
        (int(layout.flag_executable), "x"),
        (int(layout.flag_hidden), "h"),
        (int(layout.flag_symlink), "l"),
    )
    files = []
    for i in range(layout.num_files()):
        flags = int(layout.file_flags(i))
        if flags & int(layout.flag_pad_file):
            continue
        files.append(
            TorrentFile(
                path=layout.file_path(i),
                size=int(layout.file_size(i)),
                offset=int(layout.file_offset(i)),
                pieces_root=bytes(layout.root(i).to_bytes()),
                attributes="".join(c for bit, c in attr_bits if flags & bit),
            )
        )
    return TorrentMeta(
        info_hash=ih,
        has_v1=bool(ti.info_hashes().has_v1()),
        name=ti.name(),
        piece_size=int(ti.piece_length()),
        num_pieces=int(ti.num_pieces()),
        files=tuple(files),
        top_level_keys=top,
        info_keys=info,
        _offsets=tuple(f.offset for f in files),
    )


def _keys(d: Any) -> frozenset[str]:
    return frozenset(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in d)


def parse_torrent(torrent: bytes) -> TorrentMeta:
    """Parse and validate .torrent bytes (libtorrent also checks the v2 piece layers
    against each file's pieces root). Raises `InvalidTorrent`. Cheap: no I/O."""
    if not isinstance(torrent, bytes | bytearray | memoryview):
        raise InvalidTorrent(f"a torrent must be bytes, not {type(torrent).__name__}")
    data = bytes(torrent)
    try:
        decoded: Any = lt.bdecode(data)
        ti = lt.torrent_info(data)
    except RuntimeError as e:
        raise InvalidTorrent(f"not a valid torrent: {e}") from e
    if not isinstance(decoded, dict) or not isinstance(decoded.get(b"info"), dict):
        raise InvalidTorrent("not a valid torrent: no info dictionary")
    return _meta_from_ti(ti, _keys(decoded), _keys(decoded[b"info"]))


def info_hash_of(torrent: bytes) -> str:
    """The v2 info-hash (64 hex) of .torrent bytes. Raises `InvalidTorrent`."""
    return parse_torrent(torrent).info_hash


def _check_piece_size(piece_size: int) -> None:
    if piece_size < BLOCK_SIZE or piece_size & (piece_size - 1):
        raise SwarmError(f"piece size {piece_size} is not a power of two >= 16 KiB")


def create_v2_torrent_blocking(file_path: str | os.PathLike[str], piece_size: int) -> bytes:
    """Blocking body of `create_v2_torrent` (hashes the whole file)."""
    _check_piece_size(piece_size)
    path = Path(file_path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            raise SwarmError(f"{path} is not a non-empty regular file; cannot make a torrent")
        # no_attributes: list_files records the executable bit ("attr": "x") in the
        # info dict, which would split the swarm between machines that store the same
        # blob with different modes. The flags must go to list_files, by keyword (a
        # positional int is taken for the predicate overload).
        flags = lt.create_torrent.v2_only | lt.create_torrent.no_attributes
        files = lt.list_files(str(path), flags=flags)
        ct = lt.create_torrent(files, piece_size, flags)
        # No date, no creator: the bytes must be identical on every machine.
        ct.set_creation_date(0)
        ct.set_creator("")
        lt.set_piece_hashes(ct, str(path.parent))
        return bytes(lt.bencode(ct.generate()))
    except (RuntimeError, OSError) as e:
        raise _translate(f"cannot create a torrent for {path}", e) from e


async def create_v2_torrent(file_path: str | os.PathLike[str], piece_size: int) -> bytes:
    """Deterministic single-file BitTorrent v2 torrent of ``file_path``.

    The torrent's file name is the basename of ``file_path`` (symlinks are followed),
    and the bytes are identical across runs and machines for the same name, content and
    piece size. Hashing runs in a worker thread."""
    return await asyncio.to_thread(create_v2_torrent_blocking, file_path, piece_size)


# --- snapshots -----------------------------------------------------------------------


@dataclass(frozen=True)
class TorrentStatus:
    info_hash: str
    name: str
    state: str
    paused: bool
    has_metadata: bool
    is_seeding: bool
    is_finished: bool
    progress: float
    num_pieces: int
    pieces_done: int
    # Payload bytes received from peers since the torrent was added to this session.
    peer_payload_bytes: int
    uploaded_payload_bytes: int
    # Bytes given to `add_piece` that passed / failed the hash check.
    fed_bytes: int
    fed_failed_bytes: int
    failed_bytes: int  # libtorrent's total_failed_bytes (peers' bad data)
    num_peers: int
    num_seeds: int
    download_rate: int
    upload_rate: int
    error: str | None


@dataclass(frozen=True)
class PeerSnapshot:
    endpoint: ev.Endpoint
    is_seed: bool
    pieces: tuple[bool, ...]
    downloaded_bytes: int  # from this peer, this connection
    uploaded_bytes: int
    download_rate: int
    num_hashfails: int
    client: str
    requests_queued: int = 0  # its requests waiting with us (blocks)
    # Our requests waiting at it (blocks): libtorrent keeps about 3 s of its rate asked,
    # at most the bound it told us in the handshake.
    requests_out: int = 0


@dataclass(frozen=True)
class TorrentLook:
    """One torrent at one instant, as a download's driver samples it (`SwarmSession.look`)."""

    state: str
    is_finished: bool
    have: tuple[bool, ...]  # pieces that passed their check
    availability: tuple[int, ...]  # per piece, connected peers that have it (empty: a seed)
    partial: tuple[PartialPiece, ...]  # pieces in flight from peers
    # per connected peer, its hash failures (empty unless `look` was asked for the peers)
    hashfails: tuple[tuple[ev.Endpoint, int], ...]


@dataclass(frozen=True)
class PartialPiece:
    """A piece libtorrent is downloading from peers (its download queue)."""

    piece: int
    blocks_total: int
    blocks_requested: int  # asked for, nothing back yet
    blocks_received: int  # arrived (being written or written)


# --- event delivery ---------------------------------------------------------------------


class EventStream:
    """One subscriber's view of the events: ``async for event in stream``, or, for a
    consumer that wants all that came at once (one wake-up per alert drain, not one per
    event), `take` when `on_ready`'s callback said something came.

    Bounded: when the consumer falls ``maxsize`` events behind, further events are
    dropped for it and an `EventsDropped` is delivered before the next one. The stream
    ends when the session closes or `close` is called."""

    def __init__(
        self,
        owner: SwarmSession,
        info_hash: str | None,
        maxsize: int,
        kinds: tuple[type[ev.SwarmEvent], ...] = (),
    ) -> None:
        self._owner = owner
        self.info_hash = info_hash
        self._kinds = kinds
        self._maxsize = maxsize
        self._pending: collections.deque[ev.SwarmEvent] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None  # an `__anext__` waiting
        self._ready: Callable[[], None] | None = None
        self._dropped = 0
        self._closed = False

    def _wants(self, event: ev.SwarmEvent) -> bool:
        if self._kinds and not isinstance(event, self._kinds):
            return False
        if self.info_hash is None or not isinstance(event, ev.TorrentEvent):
            return True
        return event.info_hash == self.info_hash

    def _push(self, event: ev.SwarmEvent) -> None:
        if self._closed or not self._wants(event):
            return
        if len(self._pending) >= self._maxsize:
            self._dropped += 1
            return
        self._pending.append(event)
        if len(self._pending) == 1:  # the rest of this drain joins it: one wake-up
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._ready is not None:
            self._ready()

    def _end(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake()

    def close(self) -> None:
        self._owner._unsubscribe(self)
        self._end()

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop, inside the drain) when an event comes to
        an empty stream, and when the stream ends; then `take` what came."""
        self._ready = callback

    def take(self) -> list[ev.SwarmEvent]:
        """Every event that came since the last take, in order (an `EventsDropped`
        first if some were dropped); empty if none."""
        out: list[ev.SwarmEvent] = []
        if self._dropped:
            out.append(ev.EventsDropped(self._dropped))
            self._dropped = 0
        out += self._pending
        self._pending.clear()
        return out

    @property
    def ended(self) -> bool:
        """Closed, and every event taken."""
        return self._closed and not self._pending and not self._dropped

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ev.SwarmEvent:
        while True:
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                return ev.EventsDropped(dropped)
            if self._pending:
                return self._pending.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# --- the session ------------------------------------------------------------------------


class RequestBound:
    """How many requests one peer may queue with us (see `SwarmSettings.
    shared_peer_requests`), from the session's connect and disconnect events: ``shared``
    while some torrent has more than one peer connected, or had within the last `hold`
    seconds, else ``alone``. Pure; `feed` and `tick` return the new bound when it
    changes, else None, and `reconnects` the torrents whose peers should connect again.

    libtorrent tells a peer the bound once, in the handshake (``reqq``, which then caps
    the peer's own queue with us), and serves what was queued before a change first: a
    peer that connected while a torrent was alone keeps the deep queue after others
    join. A torrent that turns shared while such a peer is on it is named once by
    `reconnects`, so that its peers connect again and are told the short bound; `hold`
    keeps the bound short while they do. Only a peer there before the turn counts (not
    the newcomer, nor a second connection of its own), and a torrent is named at most
    once per `gap`: a host connecting again and again cannot keep our peers dropped.
    A torrent is named only if it still has several peers `confirm` seconds after the
    turn: libtorrent reports some connections it closes a moment later (seen: a seeder
    dialling again the address of a peer it served before, while it serves one)."""

    def __init__(
        self, alone: int, shared: int, hold: float = 0.0, gap: float = 0.0, confirm: float = 0.0
    ) -> None:
        self.alone = alone
        self.shared = shared
        self.hold = hold
        self.gap = gap
        self.confirm = confirm
        self._confirming: dict[str, float] = {}  # torrents turned shared -> check when
        self._reconnected: dict[str, float] = {}  # torrent -> when it was last named
        self.bound = alone
        # info-hash -> connected peers -> the bound they were told in their handshake
        self._peers: dict[str, dict[ev.Endpoint, int]] = {}
        self._crowded: dict[str, float] = {}  # torrents with several peers -> until when
        self._reconnect: list[str] = []

    def feed(
        self,
        event: ev.PeerConnected | ev.PeerDisconnected | ev.TorrentRemoved | ev.AlertsDropped,
        now: float = 0.0,
    ) -> int | None:
        if isinstance(event, ev.AlertsDropped):
            # A lost disconnect would keep the bound for good: start over from "alone"
            # (the next connects count again; at worst a while without the bound).
            self._peers.clear()
            self._crowded.clear()
            self._reconnect.clear()
            self._confirming.clear()
            return self._settle(now)
        ih = event.info_hash
        if isinstance(event, ev.PeerConnected):
            # libtorrent wrote its handshake before we heard of it: the bound in force.
            self._peers.setdefault(ih, {}).setdefault(event.endpoint, self.bound)
        elif isinstance(event, ev.PeerDisconnected):
            self._peers.get(ih, {}).pop(event.endpoint, None)
        else:
            self._peers.pop(ih, None)
            self._crowded.pop(ih, None)
            self._reconnected.pop(ih, None)
            self._confirming.pop(ih, None)
        peers = self._peers.get(ih, {})
        if len(peers) > 1:
            # Only a peer already there when the torrent turns shared is worth the drop:
            # counting the newcomer (told the alone bound too), or a second connection
            # of its own, would let any host that connects each time the hold is over
            # have us drop our other peers again and again.
            turned = self._crowded.get(ih) != math.inf
            self._crowded[ih] = math.inf
            newcomer = event.endpoint if isinstance(event, ev.PeerConnected) else None
            last = self._reconnected.get(ih)
            if (
                turned
                and (last is None or now - last >= self.gap)
                and any(told > self.shared for peer, told in peers.items() if peer != newcomer)
            ):
                self._confirming.setdefault(ih, now + self.confirm)  # `_settle` names it
        else:
            if ih in self._crowded:
                self._crowded[ih] = min(self._crowded[ih], now + self.hold)
            if ih in self._peers and not peers:
                del self._peers[ih]
        return self._settle(now)

    def tick(self, now: float) -> int | None:
        """Lift the bound once the holds of torrents that are alone again are over."""
        return self._settle(now)

    def next_tick(self) -> float | None:
        """When the next hold ends or turn is confirmed (`tick` then), or None."""
        ends = [t for t in self._crowded.values() if t != math.inf]
        ends += self._confirming.values()
        return min(ends) if ends else None

    def _name(self, ih: str, now: float) -> None:
        self._reconnect.append(ih)
        self._reconnected[ih] = now
        peers = self._peers.get(ih, {})
        for endpoint in peers:
            peers[endpoint] = self.shared

    def reconnects(self) -> list[str]:
        """Torrents turned shared with a peer told the alone bound (each named once)."""
        out, self._reconnect = self._reconnect, []
        return out

    def _settle(self, now: float) -> int | None:
        for ih in [ih for ih, at in self._confirming.items() if at <= now]:
            del self._confirming[ih]
            if len(self._peers.get(ih, {})) > 1:  # not a duplicate that came and went
                self._name(ih, now)
        for ih in [ih for ih, until in self._crowded.items() if until <= now]:
            del self._crowded[ih]
        bound = self.shared if self._crowded else self.alone
        if bound == self.bound:
            return None
        self.bound = bound
        return bound


@dataclass
class _Torrent:
    info_hash: str
    handle: Any  # None while libtorrent is still adding it
    meta: TorrentMeta | None
    # libtorrent silently drops add_piece data while it checks files: until the
    # torrent is checked, fed pieces wait here (piece index -> data).
    checked: bool = False
    queued: dict[int, bytes] = field(default_factory=dict)
    # add_piece data not yet judged by the hash check, by piece index -> length.
    fed_pending: dict[int, int] = field(default_factory=dict)
    fed_bytes: int = 0
    fed_failed_bytes: int = 0
    # libtorrent restarts a torrent's byte counters when it resumes: what they had
    # counted before `_reconnect` paused it (payload up, payload down, failed).
    carried: tuple[int, int, int] = (0, 0, 0)
    # One flush_cache at a time (see `flush_cache`).
    flushing: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Waiter:
    predicate: Callable[[ev.SwarmEvent], bool]
    fut: asyncio.Future[Any]
    info_hash: str | None  # fail it if this torrent goes away
    # Its alert drained at once (the pipe watched meanwhile); else it may wait for the
    # next batch, up to ALERT_BATCH.
    urgent: bool = True


# States in which libtorrent has no piece picker and ignores add_piece.
_NOT_READY_STATES = frozenset(
    {
        "queued_for_checking",
        "checking_files",
        "checking_resume_data",
        "downloading_metadata",
        "allocating",
    }
)


class SwarmSession:
    """One libtorrent session, as an async context manager.

    ``async with SwarmSession(settings) as swarm:`` binds the listen port (raising
    `SwarmError` if it cannot), and tears everything down on exit (libtorrent's
    threads are joined in a worker thread, then the alert pipe is closed).

    Torrents are named by their v2 info-hash (64 hex) everywhere in this API.
    """

    def __init__(self, settings: SwarmSettings) -> None:
        self.settings = settings
        self._ses: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pipe: tuple[int, int] | None = None
        self._port: int | None = None
        self._torrents: dict[str, _Torrent] = {}
        self._by_handle: dict[Any, _Torrent] = {}
        self._streams: list[EventStream] = []
        self._waiters: list[_Waiter] = []
        self._banned: set[str] = set()
        self._bound = RequestBound(
            ALONE_PEER_REQUESTS,
            settings.shared_peer_requests,
            hold=SHARED_HOLD,
            gap=RECONNECT_GAP,
            confirm=SHARED_CONFIRM,
        )
        self._bound_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        # Cluster mode: canonical info-hash <-> that of the torrent's SSL variant.
        self._ssl_ih: dict[str, str] = {}
        self._canonical: dict[str, str] = {}
        self._tcp = "tcp" if settings.ssl is None else "tcp_ssl"
        self._handlers: dict[type, Callable[[Any], Iterable[ev.SwarmEvent]]] = {
            lt.listen_succeeded_alert: self._a_listen,
            lt.listen_failed_alert: self._a_listen_failed,
            lt.alerts_dropped_alert: self._a_dropped,
            lt.add_torrent_alert: self._a_added,
            lt.torrent_checked_alert: self._simple(ev.TorrentChecked),
            lt.metadata_received_alert: self._a_metadata,
            lt.metadata_failed_alert: self._with_error(ev.MetadataFailed),
            lt.state_changed_alert: self._a_state,
            lt.piece_finished_alert: self._a_piece_finished,
            lt.hash_failed_alert: self._a_hash_failed,
            lt.torrent_finished_alert: self._simple(ev.TorrentFinished),
            lt.cache_flushed_alert: self._simple(ev.CacheFlushed),
            lt.save_resume_data_alert: self._a_resume,
            lt.save_resume_data_failed_alert: self._with_error(ev.ResumeDataFailed),
            lt.fastresume_rejected_alert: self._with_error(ev.FastresumeRejected),
            lt.torrent_error_alert: self._with_error(ev.TorrentError),
            lt.file_error_alert: self._a_file_error,
            lt.torrent_paused_alert: self._simple(ev.TorrentPaused),
            lt.torrent_resumed_alert: self._simple(ev.TorrentResumed),
            lt.torrent_removed_alert: self._a_removed,
            lt.torrent_deleted_alert: self._simple(ev.FilesDeleted),
            lt.torrent_delete_failed_alert: self._with_error(ev.FilesDeleteFailed),
            lt.performance_alert: self._a_performance,
            lt.peer_connect_alert: self._peer(ev.PeerConnected),
            lt.peer_disconnected_alert: self._peer(ev.PeerDisconnected, with_error=True),
            lt.peer_ban_alert: self._peer(ev.PeerBanned),
            lt.peer_blocked_alert: self._peer(ev.PeerBlocked),
            lt.peer_error_alert: self._peer(ev.PeerError, with_error=True),
        }

    # -- lifecycle --

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            self._ses = await asyncio.to_thread(_new_session, self.settings.to_libtorrent())
        except RuntimeError as e:
            raise _translate("cannot start the BitTorrent session", e) from e
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)  # libtorrent must never block on a full pipe
        self._pipe = (r, w)
        started = self.expect(lambda e: isinstance(e, ev.Listening | ev.ListenFailed))
        self._ses.set_alert_fd(w)
        loop.add_reader(r, self._on_alert_fd)
        # Alerts queued before the fd was set never trigger a write: drain them now.
        self._drain()
        try:
            first = await asyncio.wait_for(started, self.settings.start_timeout)
        except BaseException:
            await self._teardown()
            raise
        if isinstance(first, ev.ListenFailed):
            await self._teardown()
            raise PortUnavailable(
                f"cannot listen for BitTorrent on {self.settings.listen_interface}: "
                f"{first.message}",
                hint="choose another port with --bt-listen HOST:PORT, or stop the program using it",
            )
        self._port = first.port
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._teardown()

    async def _teardown(self) -> None:
        loop, pipe, ses = self._loop, self._pipe, self._ses
        self._ses = None
        if self._bound_timer is not None:
            self._bound_timer.cancel()
            self._bound_timer = None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if loop is not None and pipe is not None:
            loop.remove_reader(pipe[0])
        for stream in self._streams:
            stream._end()
        self._streams.clear()
        for w in self._waiters:
            if not w.fut.done():
                w.fut.set_exception(SwarmClosed("the BitTorrent session was closed"))
        self._waiters.clear()
        self._torrents.clear()
        self._by_handle.clear()
        box = [ses]
        del ses

        def release() -> None:
            # The last reference dies here, so libtorrent's destructor (which joins its
            # network and disk threads) blocks this worker, not the event loop.
            box.clear()

        def close_pipe(_: object = None) -> None:
            if pipe is not None:
                for fd in pipe:
                    with contextlib.suppress(OSError):
                        os.close(fd)

        if loop is None:
            close_pipe()
            return
        done = loop.run_in_executor(None, release)
        try:
            await asyncio.shield(done)
        finally:
            # libtorrent may write to the pipe until it is destroyed: close only after.
            if done.done():
                close_pipe()
            else:
                done.add_done_callback(close_pipe)
        self._pipe = None

    @property
    def listen_port(self) -> int:
        """The TCP port actually bound (meaningful when the settings asked for 0)."""
        if self._port is None:
            raise SwarmError("the BitTorrent session is not started")
        return self._port

    # -- events --

    def subscribe(
        self,
        info_hash: str | None = None,
        *,
        maxsize: int = 10_000,
        kinds: tuple[type[ev.SwarmEvent], ...] = (),
    ) -> EventStream:
        """A new event stream: every event, or one torrent's plus session-wide ones;
        with `kinds`, only events of those types (a consumer that wants a few is not
        woken for each of the ~1000 pieces of every GiB)."""
        stream = EventStream(self, info_hash, maxsize, kinds)
        if self._ses is None:
            stream._end()
        else:
            self._streams.append(stream)
        return stream

    def events(self) -> EventStream:
        return self.subscribe()

    def _unsubscribe(self, stream: EventStream) -> None:
        with contextlib.suppress(ValueError):
            self._streams.remove(stream)

    def expect(
        self,
        predicate: Callable[[ev.SwarmEvent], bool],
        *,
        info_hash: str | None = None,
        urgent: bool = True,
    ) -> asyncio.Future[Any]:
        """A future resolved with the first later event matching ``predicate``.

        Register it BEFORE the action that triggers the event. Cancel it (or let
        ``asyncio.wait_for`` do so) when no longer needed. With ``info_hash``, it fails
        with `UnknownTorrent` if that torrent is removed first (instead of waiting
        forever); it fails with `SwarmClosed` when the session closes. ``urgent``: every
        alert is drained at once while it waits; not urgent, its alert may come with the
        next batch (up to ``ALERT_BATCH`` later), and alerts meanwhile wake nobody one by
        one."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._ses is None:
            fut.set_exception(SwarmClosed("the BitTorrent session is closed"))
        else:
            self._waiters.append(_Waiter(predicate, fut, info_hash, urgent))
            if urgent and self._drain_timer is not None:
                self._listen()  # someone waits for an alert: no batch delay for it
        return fut

    def _urgent_waiting(self) -> bool:
        return any(w.urgent and not w.fut.done() for w in self._waiters)

    async def _await(self, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        finally:
            fut.cancel()  # no-op when resolved; drops it when our caller gave up
            self._waiters = [w for w in self._waiters if w.fut is not fut]

    def _empty_pipe(self) -> None:
        # Before a drain: libtorrent writes again once its queue goes from empty to
        # non-empty, so nothing posted after the drain that follows is lost.
        if self._pipe is not None:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while os.read(self._pipe[0], 4096):
                    pass

    def _on_alert_fd(self) -> None:
        # The first alert after a quiet spell: dispatched at once. Then the pipe is not
        # watched for ALERT_BATCH, and what came meanwhile is drained in one go.
        self._empty_pipe()
        self._drain()
        if not self._urgent_waiting():
            self._stop_listening()

    def _stop_listening(self) -> None:
        if self._loop is None or self._pipe is None or self._ses is None:
            return
        self._loop.remove_reader(self._pipe[0])
        self._drain_timer = self._loop.call_later(ALERT_BATCH, self._batched_drain)

    def _listen(self) -> None:
        """Watch the pipe again, now (alerts posted meanwhile signalled it: a wake-up
        at once)."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self._loop is not None and self._pipe is not None and self._ses is not None:
            self._loop.add_reader(self._pipe[0], self._on_alert_fd)

    def _batched_drain(self) -> None:
        self._drain_timer = None
        if self._loop is None or self._pipe is None or self._ses is None:
            return
        self._empty_pipe()
        if self._drain() and not self._urgent_waiting():
            self._stop_listening()  # alerts keep coming: one wake-up per batch
        else:
            self._listen()  # quiet, or someone waits for an alert urgently: at once

    def _drain(self) -> int:
        """Dispatch every queued alert; how many there were."""
        popped = 0
        while self._ses is not None:
            alerts = self._ses.pop_alerts()
            if not alerts:
                return popped
            popped += len(alerts)
            for alert in alerts:
                handler = self._handlers.get(type(alert))
                if handler is None:
                    continue
                try:
                    produced = list(handler(alert))
                except Exception:
                    # A binding quirk in one alert must not stop the rest.
                    log.exception("could not translate libtorrent %s", type(alert).__name__)
                    continue
                for event in produced:
                    self._dispatch(event)
        return popped

    def _apply_bound(self, bound: int | None) -> None:
        if bound is not None and self._ses is not None:
            # libtorrent checks each incoming request against it: live at once.
            self._ses.apply_settings({"max_allowed_in_request_queue": bound})
            log.debug("a peer may queue %d requests with us", bound)
        if self._bound_timer is not None:
            self._bound_timer.cancel()
            self._bound_timer = None
        for ih in self._bound.reconnects():
            self._reconnect(ih)
        when = self._bound.next_tick()
        if when is not None and self._loop is not None:
            self._bound_timer = self._loop.call_later(
                max(0.0, when - time.monotonic()) + 0.01,
                lambda: self._apply_bound(self._bound.tick(time.monotonic())),
            )

    def _reconnect(self, info_hash: str) -> None:
        """Drop the peers of a torrent we seed that turned shared while one of them had
        been told the alone bound: they connect again (libtorrent retries a peer after
        `min_reconnect_time`) and are told the short one. Only a seed: a torrent we
        still download would lose its own sources for that while."""
        t = self._torrents.get(info_hash)
        if t is None or t.handle is None:
            return
        st = t.handle.status(0)  # once per torrent turning shared: a short blocking call
        if not st.is_seeding:
            return
        up, down, failed = t.carried
        t.carried = (
            up + int(st.total_payload_upload),
            down + int(st.total_payload_download),
            failed + int(st.total_failed_bytes),
        )
        log.debug("%s turned shared: its peers connect again to learn the bound", info_hash)
        t.handle.pause()
        t.handle.resume()

    def _dispatch(self, event: ev.SwarmEvent) -> None:
        if isinstance(event, ev.TorrentChecked | ev.StateChanged):
            self._track_readiness(event)
        elif isinstance(
            event, ev.PeerConnected | ev.PeerDisconnected | ev.TorrentRemoved | ev.AlertsDropped
        ):
            self._apply_bound(self._bound.feed(event, time.monotonic()))
        for stream in self._streams:
            stream._push(event)
        if self._waiters:
            removed = event.info_hash if isinstance(event, ev.TorrentRemoved) else None
            keep = []
            for w in self._waiters:
                if w.fut.done():
                    continue
                if w.predicate(event):
                    w.fut.set_result(event)
                elif removed is not None and w.info_hash == removed:
                    w.fut.set_exception(
                        UnknownTorrent(f"torrent {removed} was removed during the operation")
                    )
                else:
                    keep.append(w)
            self._waiters = keep

    def _track_readiness(self, event: ev.TorrentChecked | ev.StateChanged) -> None:
        t = self._torrents.get(event.info_hash)
        if t is None:
            return
        if isinstance(event, ev.StateChanged) and event.state in _NOT_READY_STATES:
            t.checked = False
            return
        if isinstance(event, ev.TorrentChecked):
            t.checked = True
        if t.checked and t.handle is not None and t.queued:
            queued, t.queued = t.queued, {}
            for piece, data in queued.items():
                self._add_piece_now(t, piece, data)

    # -- alert translation (runs on the event loop, inside _drain) --

    def _ih(self, alert: Any) -> str | None:
        handle = alert.handle
        t = self._by_handle.get(handle)
        if t is not None:
            return t.info_hash
        ihs = getattr(alert, "info_hashes", None)  # removal alerts: the handle is gone
        try:
            ih = _hex_v2(ihs if ihs is not None and not callable(ihs) else handle.info_hashes())
        except RuntimeError:
            return None
        return self._canonical.get(ih, ih) if ih is not None else None

    def _simple(self, cls: Callable[[str], ev.SwarmEvent]) -> Callable[[Any], list[ev.SwarmEvent]]:
        def handler(alert: Any) -> list[ev.SwarmEvent]:
            ih = self._ih(alert)
            return [cls(ih)] if ih else []

        return handler

    def _with_error(
        self, cls: Callable[[str, str], ev.SwarmEvent]
    ) -> Callable[[Any], list[ev.SwarmEvent]]:
        def handler(alert: Any) -> list[ev.SwarmEvent]:
            ih = self._ih(alert)
            return [cls(ih, _error_text(alert))] if ih else []

        return handler

    def _peer(self, cls: Any, *, with_error: bool = False) -> Callable[[Any], list[ev.SwarmEvent]]:
        def handler(alert: Any) -> list[ev.SwarmEvent]:
            ih = self._ih(alert)
            if not ih:
                return []
            host, port = alert.ip
            endpoint = ev.Endpoint(str(host), int(port))
            if with_error:
                return [cls(ih, endpoint, _error_text(alert))]
            return [cls(ih, endpoint)]

        return handler

    def _a_listen(self, alert: Any) -> list[ev.SwarmEvent]:
        if _enum_name(alert.socket_type) != self._tcp:
            return []  # the UDP socket exists for uTP/DHT, both off
        return [ev.Listening(str(alert.address), int(alert.port))]

    def _a_listen_failed(self, alert: Any) -> list[ev.SwarmEvent]:
        if _enum_name(alert.socket_type) != self._tcp:
            return []
        return [ev.ListenFailed(str(alert.address), int(alert.port), _error_text(alert))]

    def _a_dropped(self, alert: Any) -> list[ev.SwarmEvent]:
        dropped = alert.dropped_alerts
        count = sum(1 for x in dropped if x) if isinstance(dropped, list | tuple) else 1
        return [ev.AlertsDropped(count)]

    def _a_added(self, alert: Any) -> list[ev.SwarmEvent]:
        if alert.error.value():
            return []  # `add_torrent` raises synchronously; nothing to announce
        ih = self._ih(alert)
        return [ev.TorrentAdded(ih, str(alert.torrent_name))] if ih else []

    def _a_metadata(self, alert: Any) -> list[ev.SwarmEvent]:
        ih = self._ih(alert)
        return [ev.MetadataReceived(ih)] if ih else []

    def _a_state(self, alert: Any) -> list[ev.SwarmEvent]:
        ih = self._ih(alert)
        if not ih:
            return []
        return [ev.StateChanged(ih, _enum_name(alert.state), _enum_name(alert.prev_state))]

    def _a_piece_finished(self, alert: Any) -> list[ev.SwarmEvent]:
        ih = self._ih(alert)
        if not ih:
            return []
        piece = int(alert.piece_index)
        t = self._torrents.get(ih)
        fed = False
        if t is not None and piece in t.fed_pending:
            t.fed_bytes += t.fed_pending.pop(piece)
            fed = True
        return [ev.PieceFinished(ih, piece, fed)]

    def _a_hash_failed(self, alert: Any) -> list[ev.SwarmEvent]:
        ih = self._ih(alert)
        if not ih:
            return []
        piece = int(alert.piece_index)
        t = self._torrents.get(ih)
        fed = False
        if t is not None and piece in t.fed_pending:
            t.fed_failed_bytes += t.fed_pending.pop(piece)
            fed = True
        return [ev.HashFailed(ih, piece, fed)]

    def _a_resume(self, alert: Any) -> list[ev.SwarmEvent]:
        ih = self._ih(alert)
        if not ih:
            return []
        # The params object dies with the alert: serialize it right here.
        return [ev.ResumeDataSaved(ih, bytes(lt.write_resume_data_buf(alert.params)))]

    def _a_file_error(self, alert: Any) -> list[ev.SwarmEvent]:
        ih = self._ih(alert)
        if not ih:
            return []
        name = alert.filename()
        return [ev.FileError(ih, str(name), _error_text(alert))]

    def _a_removed(self, alert: Any) -> list[ev.SwarmEvent]:
        ih = self._ih(alert)
        return [ev.TorrentRemoved(ih)] if ih else []

    def _a_performance(self, alert: Any) -> list[ev.SwarmEvent]:
        ih = self._ih(alert)
        return [ev.PerformanceWarning(ih, _enum_name(alert.warning_code))] if ih else []

    # -- torrents --

    def _session(self) -> Any:
        if self._ses is None:
            raise SwarmClosed("the BitTorrent session is not running")
        return self._ses

    def _get(self, info_hash: str) -> _Torrent:
        t = self._torrents.get(info_hash)
        if t is None or t.handle is None:
            raise UnknownTorrent(f"torrent {info_hash} is not in this session")
        return t

    def _meta(self, t: _Torrent) -> TorrentMeta:
        """The torrent's layout, read once from libtorrent after metadata arrived."""
        if t.meta is None:
            ti = t.handle.torrent_file()
            if ti is None:
                raise SwarmError(
                    f"torrent {t.info_hash} has no metadata yet",
                    hint="wait for MetadataReceived before using piece-level calls",
                )
            t.meta = _meta_from_ti(ti, frozenset(), frozenset())
        return t.meta

    def torrents(self) -> tuple[str, ...]:
        return tuple(self._torrents)

    async def _add(
        self,
        atp: Any,
        info_hash: str,
        meta: TorrentMeta | None,
        what: str,
        *,
        announce: bool = True,
    ) -> str:
        ses = self._session()
        if info_hash in self._torrents:
            raise TorrentExists(f"torrent {info_hash} is already in this session")
        # Whatever the torrent or resume data said, talk to no tracker, web seed or DHT
        # node: peers come only from hfswarm's discovery (and its LAN trackers).
        atp.trackers = list(self.settings.trackers) if announce else []
        atp.url_seeds = []
        atp.dht_nodes = []
        flags = atp.flags
        # Not auto-managed: libtorrent would otherwise queue (pause) everything past
        # its active_downloads/active_seeds limits, and an agent seeds many blobs.
        flags &= ~lt.torrent_flags.auto_managed
        flags |= lt.torrent_flags.duplicate_is_error
        flags |= lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd
        # Peer exchange would hand us peers we did not authenticate.
        flags |= lt.torrent_flags.disable_pex
        atp.flags = flags
        # Registered before libtorrent sees it, so that alerts dispatched while the
        # add runs in its thread (TorrentChecked above all) find the record.
        t = _Torrent(info_hash, None, meta)
        self._torrents[info_hash] = t
        try:
            handle = await asyncio.to_thread(ses.add_torrent, atp)
        except BaseException as e:
            self._torrents.pop(info_hash, None)
            if isinstance(e, RuntimeError):
                if "already exists" in str(e):
                    raise TorrentExists(f"torrent {info_hash} is already in this session") from e
                raise _translate(what, e) from e
            raise
        t.handle = handle
        self._by_handle[handle] = t
        return info_hash

    async def add_torrent(
        self,
        torrent: bytes,
        save_path: str | os.PathLike[str],
        *,
        seed_mode: bool = False,
        resume_data: bytes | None = None,
        paused: bool = False,
        announce: bool = True,
        banned: Iterable[tuple[str, int]] = (),
    ) -> str:
        """Add a torrent; returns its info-hash. ``announce=False``: not to the session's
        trackers yet (`announce` later), so no peer arrives before the caller is ready.
        ``banned``: (host, port)s this torrent alone refuses (as `rejoin`'s).

        ``save_path`` is the directory that holds (or will hold) the torrent's file,
        named as in the torrent: for hfswarm's per-blob torrents, the file is
        ``save_path/<blob id>``, so a blob in an HF cache seeds straight from
        ``blobs/`` with ``seed_mode=True`` and no copy. Use ``seed_mode`` only for a
        file already verified whole; libtorrent then skips the initial check (it still
        hashes each piece the first time a peer asks for it).

        ``resume_data`` (from `save_resume_data`) restores the verified pieces without
        re-hashing the file."""
        meta = parse_torrent(torrent)
        save = Path(save_path)
        if seed_mode:
            await asyncio.to_thread(_check_files_present, meta, save)
        lt_ih = meta.info_hash
        if self.settings.ssl is not None:
            torrent = _ssl_variant(torrent, self.settings.ssl.root_cert_pem)
            lt_ih = info_hash_of(torrent)
        try:
            if resume_data is not None:
                atp = lt.read_resume_data(bytes(resume_data))
                if _hex_v2(atp.info_hashes) != lt_ih:
                    raise SwarmError(
                        "the resume data belongs to another torrent",
                        hint="drop the stale resume file; the data will be re-checked",
                    )
                atp.ti = lt.torrent_info(bytes(torrent))
            else:
                atp = lt.load_torrent_buffer(bytes(torrent))
        except RuntimeError as e:
            raise _translate("cannot read the torrent or its resume data", e) from e
        # libtorrent saves a torrent's banned peers in its resume data (a `rejoin`'s
        # holders): whom to refuse is this run's choice, not the last.
        atp.banned_peers = [(h, int(p)) for h, p in banned]
        atp.save_path = str(save)
        flags = atp.flags
        if seed_mode:
            flags |= lt.torrent_flags.seed_mode
        flags = flags | lt.torrent_flags.paused if paused else flags & ~lt.torrent_flags.paused
        atp.flags = flags
        ih = await self._add(
            atp, meta.info_hash, meta, f"cannot add torrent {meta.info_hash}", announce=announce
        )
        if self.settings.ssl is not None:
            self._ssl_ih[ih], self._canonical[lt_ih] = lt_ih, ih
            ident = self.settings.ssl
            self._get(ih).handle.set_ssl_certificate(
                ident.cert_path, ident.key_path, ident.dh_params_path
            )
        return ih

    async def add_by_info_hash(
        self, info_hash: str, save_path: str | os.PathLike[str], *, paused: bool = False
    ) -> str:
        """Add a torrent known only by its v2 info-hash; the info dict comes from the
        first peer given with `connect_peer` (a `MetadataReceived` event follows)."""
        if not isinstance(info_hash, str) or not SHA256_RE.fullmatch(info_hash):
            raise SwarmError(f"{info_hash!r} is not a v2 info-hash (64 lowercase hex)")
        if self.settings.ssl is not None:
            raise SwarmError("with SSL torrents, add a torrent with its info dict (add_torrent)")
        atp = lt.add_torrent_params()
        atp.info_hashes = lt.info_hash_t(lt.sha256_hash(bytes.fromhex(info_hash)))
        atp.save_path = str(Path(save_path))
        flags = atp.flags
        atp.flags = flags | lt.torrent_flags.paused if paused else flags & ~lt.torrent_flags.paused
        return await self._add(atp, info_hash, None, f"cannot add torrent {info_hash}")

    async def remove_torrent(self, info_hash: str, *, delete_files: bool = False) -> None:
        """Remove a torrent (and its files if asked) and wait until libtorrent did."""
        t = self._get(info_hash)
        ses = self._session()
        self._drain()
        if delete_files:
            done = self.expect(
                lambda e: (
                    isinstance(e, ev.FilesDeleted | ev.FilesDeleteFailed)
                    and e.info_hash == info_hash
                )
            )
        else:
            done = self.expect(
                lambda e: isinstance(e, ev.TorrentRemoved) and e.info_hash == info_hash
            )
        try:
            ses.remove_torrent(t.handle, lt.session.delete_files if delete_files else 0)
        except RuntimeError as e:
            done.cancel()
            raise _translate(f"cannot remove torrent {info_hash}", e) from e
        del self._torrents[info_hash]
        self._by_handle.pop(t.handle, None)
        # (the SSL mapping stays: the removal alert still names the SSL info-hash)
        result = await self._await(done)
        if isinstance(result, ev.FilesDeleteFailed):
            raise SwarmError(
                f"torrent {info_hash} was removed but its files were not: {result.message}",
                hint="delete them by hand",
            )

    async def rejoin(self, info_hash: str, *, banned: Iterable[tuple[str, int]] = ()) -> int:
        """Remove a torrent and add it again, paused, from its resume data, with the
        ``banned`` (host, port)s refused by this torrent alone (libtorrent matches them
        by address). libtorrent 2.1.1's binding has no per-peer disconnect and its bans
        are session-wide: this is how one torrent drops some peers (a downloader that
        is not one of a blob's feeders drops its complete holders, `peer.scheduling.
        feeders`). Verified pieces stay, blocks in flight are lost; the download counters
        go on from where they were. Returns what the torrent had uploaded: its upload
        counter starts again, as a removed torrent's would (the upload audit counts per
        torrent and forgets a removed one). The caller connects the peers it wants and
        `resume`s."""
        old = self._get(info_hash)
        st = await self.status(info_hash)
        data = await self.save_resume_data(info_hash)
        try:
            atp = lt.read_resume_data(bytes(data))
        except RuntimeError as e:
            raise _translate(f"cannot read the resume data of {info_hash}", e) from e
        atp.banned_peers = [(h, int(p)) for h, p in banned]
        atp.peers = []  # whom to connect is the caller's choice
        atp.flags = atp.flags | lt.torrent_flags.paused
        await self.remove_torrent(info_hash)
        await self._add(
            atp, info_hash, old.meta, f"cannot add torrent {info_hash} again", announce=False
        )
        t = self._get(info_hash)
        t.carried = (0, st.peer_payload_bytes, st.failed_bytes)
        t.fed_bytes, t.fed_failed_bytes = old.fed_bytes, old.fed_failed_bytes
        if self.settings.ssl is not None:
            ident = self.settings.ssl
            t.handle.set_ssl_certificate(ident.cert_path, ident.key_path, ident.dh_params_path)
        return st.uploaded_payload_bytes

    def announce(self, info_hash: str) -> None:
        """Start announcing to the session's trackers (a torrent added without)."""
        handle = self._get(info_hash).handle
        for i, url in enumerate(self.settings.trackers):
            handle.add_tracker({"url": url, "tier": i})  # the binding takes a dict

    def pause(self, info_hash: str) -> None:
        self._get(info_hash).handle.pause()

    def resume(self, info_hash: str) -> None:
        self._get(info_hash).handle.resume()

    def connect_peer(self, info_hash: str, host: str, port: int) -> None:
        """Ask libtorrent to connect to a peer for this torrent (non-blocking; a
        `PeerConnected` or `PeerDisconnected` event tells how it went)."""
        t = self._get(info_hash)
        if not 0 < port <= 65535:
            raise SwarmError(f"peer port {port} is out of range 1-65535")
        try:
            t.handle.connect_peer((host, int(port)))
        except RuntimeError as e:
            raise _translate(f"cannot connect to peer {host}:{port}", e) from e

    def add_piece(self, info_hash: str, piece: int, data: bytes) -> None:
        """Feed a piece fetched elsewhere (mirror Range request). Non-blocking.

        libtorrent hash-checks it: `PieceFinished` (``fed_by_us=True``) if good,
        `HashFailed` (``fed_by_us=True``) if not; then it is served to peers like any
        other piece. ``data`` must be exactly `TorrentMeta.piece_length(piece)` bytes.
        Feeding a piece the torrent already has does nothing (no event). Data fed
        while libtorrent still checks the files is held here until `TorrentChecked`
        (libtorrent itself would drop it without a word)."""
        t = self._get(info_hash)
        meta = self._meta(t)
        expected = meta.piece_length(piece)  # also rejects bad indexes (they segfault)
        if len(data) != expected:
            raise SwarmError(
                f"piece {piece} of {info_hash} must be {expected} bytes, got {len(data)}",
                hint="this is a bug in the caller's Range arithmetic",
            )
        if t.checked:
            self._add_piece_now(t, piece, bytes(data))
        else:
            t.queued[piece] = bytes(data)

    def _add_piece_now(self, t: _Torrent, piece: int, data: bytes) -> None:
        try:
            t.handle.add_piece(piece, data, 0)
        except RuntimeError as e:
            raise _translate(f"cannot add piece {piece} of {t.info_hash}", e) from e
        t.fed_pending[piece] = len(data)

    async def feed_piece(self, info_hash: str, piece: int, data: bytes) -> bool:
        """`add_piece` and wait for the verdict: True if the piece is now had (from
        this data or from a peer), False if this data failed the hash check."""
        t = self._get(info_hash)
        self._meta(t).piece_length(piece)  # a bad index must never reach libtorrent
        # Listen before looking: a peer completing the piece after the check below
        # makes libtorrent drop our data without a word, but its PieceFinished still
        # reaches this waiter.
        verdict = self.expect(
            lambda e: (
                isinstance(e, ev.PieceFinished | ev.HashFailed)
                and e.info_hash == info_hash
                and e.piece == piece
            ),
            info_hash=info_hash,
        )
        try:
            if await self._call(lambda: t.handle.have_piece(piece), "reading piece state"):
                return True
            self.add_piece(info_hash, piece, data)
            result = await self._await(verdict)
        finally:
            verdict.cancel()
        return isinstance(result, ev.PieceFinished) or not result.fed_by_us

    async def have_pieces(self, info_hash: str) -> tuple[bool, ...]:
        """Which pieces passed their hash check (they may still be in the write cache)."""
        t = self._get(info_hash)
        st = await self._call(t.handle.status, "reading torrent status")
        return tuple(bool(x) for x in st.pieces)

    async def piece_availability(self, info_hash: str) -> tuple[int, ...]:
        """Per piece, how many connected peers have it. Empty while we are a seed or
        have no metadata (libtorrent keeps no piece picker then)."""
        t = self._get(info_hash)
        avail = await self._call(t.handle.piece_availability, "reading piece availability")
        return tuple(int(x) for x in avail)

    async def peers(self, info_hash: str) -> tuple[PeerSnapshot, ...]:
        t = self._get(info_hash)
        infos = await self._call(t.handle.get_peer_info, "reading peer list")
        seed_flag = int(lt.peer_info.seed)
        out = []
        for p in infos:
            host, port = p.ip
            client = p.client
            out.append(
                PeerSnapshot(
                    endpoint=ev.Endpoint(str(host), int(port)),
                    is_seed=bool(int(p.flags) & seed_flag),
                    pieces=tuple(bool(x) for x in p.pieces),
                    downloaded_bytes=int(p.total_download),
                    uploaded_bytes=int(p.total_upload),
                    download_rate=int(p.payload_down_speed),
                    num_hashfails=int(p.num_hashfails),
                    client=client.decode("utf-8", "replace")
                    if isinstance(client, bytes)
                    else str(client),
                    requests_queued=int(p.upload_queue_length),
                    requests_out=int(p.download_queue_length),
                )
            )
        return tuple(out)

    async def partial_pieces(self, info_hash: str) -> tuple[PartialPiece, ...]:
        """Pieces in flight from peers and how far along they are. Poll it to tell a
        slow piece from a stalled one (the scheduler's PieceProgress)."""
        t = self._get(info_hash)
        queue = await self._call(t.handle.get_download_queue, "reading the download queue")
        return tuple(_partial_piece(entry) for entry in queue)

    async def look(self, info_hash: str, *, peers: bool = True) -> TorrentLook:
        """What a download's driver samples (`TorrentLook`), read in one worker-thread
        hop instead of one per libtorrent call (each hop wakes a worker and the loop).
        Without ``peers`` its ``hashfails`` stay empty: the peer list is not read."""
        t = self._get(info_hash)

        def read() -> tuple[Any, Any, Any, Any]:
            h = t.handle
            infos = h.get_peer_info() if peers else ()
            return h.status(), h.piece_availability(), h.get_download_queue(), infos

        st, avail, queue, infos = await self._call(read, "reading torrent state")
        return TorrentLook(
            state=_enum_name(st.state),
            is_finished=bool(st.is_finished),
            have=tuple(bool(x) for x in st.pieces),
            availability=tuple(int(x) for x in avail),
            partial=tuple(_partial_piece(entry) for entry in queue),
            hashfails=tuple(
                (ev.Endpoint(str(p.ip[0]), int(p.ip[1])), int(p.num_hashfails)) for p in infos
            ),
        )

    async def status(self, info_hash: str) -> TorrentStatus:
        t = self._get(info_hash)
        st = await self._call(t.handle.status, "reading torrent status")
        errc = st.errc
        return TorrentStatus(
            info_hash=info_hash,
            name=str(st.name),
            state=_enum_name(st.state),
            paused=bool(int(st.flags) & int(lt.torrent_flags.paused)),
            has_metadata=bool(st.has_metadata),
            is_seeding=bool(st.is_seeding),
            is_finished=bool(st.is_finished),
            progress=float(st.progress),
            num_pieces=len(st.pieces),
            pieces_done=int(st.num_pieces),
            peer_payload_bytes=t.carried[1] + int(st.total_payload_download),
            uploaded_payload_bytes=t.carried[0] + int(st.total_payload_upload),
            fed_bytes=t.fed_bytes,
            fed_failed_bytes=t.fed_failed_bytes,
            failed_bytes=t.carried[2] + int(st.total_failed_bytes),
            num_peers=int(st.num_peers),
            num_seeds=int(st.num_seeds),
            download_rate=int(st.download_payload_rate),
            upload_rate=int(st.upload_payload_rate),
            error=errc.message() if errc.value() else None,
        )

    async def torrent_meta(self, info_hash: str) -> TorrentMeta:
        """The torrent's layout (after `MetadataReceived` for torrents added by hash)."""
        t = self._get(info_hash)
        if t.meta is None:
            await asyncio.to_thread(self._meta, t)
        return self._meta(t)

    async def flush_cache(self, info_hash: str, *, urgent: bool = True) -> None:
        """Write this torrent's cached pieces to its file and wait until that is done.

        Call it after `TorrentFinished` (or after feeding pieces) and before hashing,
        linking or copying the file: libtorrent reports pieces finished before it has
        written them. Not ``urgent`` (a flush during a download, for its hash follower
        or a streaming reader): its answer may wait for the next alert batch, up to
        ``ALERT_BATCH``, and the piece alerts meanwhile do not wake the loop one by one
        (urgent, each did: about one loop turn per piece while a reader streamed,
        docs/benchmarks.md 8.33, 8.37)."""
        t = self._get(info_hash)
        # After any flush of this torrent still under way: its answer, which names no
        # request, would answer this one too, and it covers only the writes queued
        # before that flush (the driver's flush and the resume save's met so).
        async with t.flushing:
            if self._get(info_hash) is not t:
                raise UnknownTorrent(f"torrent {info_hash} was removed during the operation")
            # Dispatch what is already queued first, so an older CacheFlushed (libtorrent
            # sends one by itself when a torrent finishes) cannot answer this request.
            self._drain()
            done = self.expect(
                lambda e: isinstance(e, ev.CacheFlushed) and e.info_hash == info_hash,
                info_hash=info_hash,
                urgent=urgent,
            )
            try:
                t.handle.flush_cache()
            except RuntimeError as e:
                done.cancel()
                raise _translate(f"cannot flush torrent {info_hash}", e) from e
            await self._await(done)

    async def save_resume_data(self, info_hash: str) -> bytes:
        """Bencoded resume data (with the info dict) for `add_torrent(resume_data=)`.

        Flushes first: libtorrent leaves pieces still in the write cache out of the
        resume data."""
        t = self._get(info_hash)
        await self.flush_cache(info_hash)
        done = self.expect(
            lambda e: (
                isinstance(e, ev.ResumeDataSaved | ev.ResumeDataFailed) and e.info_hash == info_hash
            ),
            info_hash=info_hash,
        )
        try:
            t.handle.save_resume_data(lt.torrent_handle.save_info_dict)
        except RuntimeError as e:
            done.cancel()
            raise _translate(f"cannot save resume data of {info_hash}", e) from e
        result = await self._await(done)
        if isinstance(result, ev.ResumeDataFailed):
            raise SwarmError(f"cannot save resume data of {info_hash}: {result.message}")
        data: bytes = result.data
        return data

    # -- piece scheduling hooks --

    def set_piece_deadline(self, info_hash: str, piece: int, deadline_ms: int) -> None:
        """Ask libtorrent to fetch ``piece`` from peers within ``deadline_ms`` (time-
        critical mode, for streaming reads)."""
        t = self._get(info_hash)
        self._meta(t).piece_length(piece)
        t.handle.set_piece_deadline(piece, max(0, int(deadline_ms)))

    def set_in_order(self, info_hash: str, on: bool) -> None:
        """Pick pieces in index order (libtorrent's sequential download) while ``on``,
        else rarest first. Turning it on sets every piece back to the default priority:
        libtorrent takes pieces of a higher priority first and rarest first among them,
        out of order (measured: a window of priority-7 pieces came in random order).
        Piece deadlines still come first."""
        t = self._get(info_hash)
        flag = lt.torrent_flags.sequential_download
        if on:
            t.handle.prioritize_pieces([DEFAULT_PRIORITY] * self._meta(t).num_pieces)
            t.handle.set_flags(flag)
        else:
            t.handle.unset_flags(flag)

    def reset_piece_deadline(self, info_hash: str, piece: int) -> None:
        t = self._get(info_hash)
        self._meta(t).piece_length(piece)
        t.handle.reset_piece_deadline(piece)

    def set_piece_priority(self, info_hash: str, piece: int, priority: int) -> None:
        """0 = never fetch from peers, 1-7 = higher is sooner (4 is libtorrent's default)."""
        t = self._get(info_hash)
        self._meta(t).piece_length(piece)
        if not 0 <= priority <= 7:
            raise SwarmError(f"piece priority {priority} is out of range 0-7")
        t.handle.piece_priority(piece, priority)

    # -- peers --

    def ban_peer(self, host: str) -> None:
        """Refuse and drop every connection from/to ``host`` (all ports, all torrents).

        libtorrent's Python binding cannot disconnect a single peer connection, so the
        ban is per IP address through the session's IP filter."""
        self._banned.add(host)
        self._apply_filter()

    def unban_peer(self, host: str) -> None:
        self._banned.discard(host)
        self._apply_filter()

    def set_rate_limits(self, upload: int, download: int) -> None:
        """Change the session's caps (bytes/s, 0: none) while torrents run; peers on the
        local network are held to them too (libtorrent exempts them unless told)."""
        if upload < 0 or download < 0:
            raise ConfigError("rate limits are 0 (none) or more bytes per second")
        try:
            self._session().apply_settings(
                {
                    "upload_rate_limit": upload,
                    "download_rate_limit": download,
                    "ignore_limits_on_local_network": False,
                }
            )
        except RuntimeError as e:
            raise _translate("cannot change the rate limits", e) from e
        self.settings = replace(
            self.settings,
            upload_rate_limit=upload,
            download_rate_limit=download,
            limit_local_peers=True,
        )

    def banned_peers(self) -> frozenset[str]:
        return frozenset(self._banned)

    def _apply_filter(self) -> None:
        ses = self._session()
        f = lt.ip_filter()
        try:
            for host in sorted(self._banned):
                f.add_rule(host, host, 1)  # 1 = blocked
            ses.set_ip_filter(f)
        except RuntimeError as e:
            raise _translate("cannot update the peer ban list", e) from e

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return await asyncio.to_thread(fn)
        except RuntimeError as e:
            raise _translate(what, e) from e


def _ssl_variant(torrent: bytes, root_cert_pem: str) -> bytes:
    """The torrent with the cluster CA in its info dict (libtorrent's SSL torrents)."""
    d: Any = lt.bdecode(bytes(torrent))
    info: Any = d.get(b"info") if isinstance(d, dict) else None
    if not isinstance(info, dict):
        raise InvalidTorrent("the torrent has no info dict")
    info[b"ssl-cert"] = root_cert_pem.encode()
    return bytes(lt.bencode(d))


def _new_session(settings: lt.settings_pack) -> Any:
    return lt.session(settings)


def _check_files_present(meta: TorrentMeta, save: Path) -> None:
    for f in meta.files:
        path = save / f.path
        try:
            size = path.stat().st_size
        except OSError as e:
            raise SwarmError(
                f"cannot seed {meta.info_hash}: {path} is missing ({e.strerror})",
                hint="seed_mode needs the verified file at save_path/<name in the torrent>",
            ) from e
        if size != f.size:
            raise SwarmError(
                f"cannot seed {meta.info_hash}: {path} has {size} bytes, the torrent says {f.size}",
                hint="the file changed after it was verified; verify it again",
            )


def _partial_piece(entry: Any) -> PartialPiece:
    """One entry of libtorrent's download queue."""
    states = [int(b["state"]) for b in entry["blocks"]]
    return PartialPiece(
        piece=int(entry["piece_index"]),
        blocks_total=int(entry["blocks_in_piece"]),
        # libtorrent block states: 0 none, 1 requested, 2 writing, 3 finished
        blocks_requested=sum(1 for x in states if x == 1),
        blocks_received=sum(1 for x in states if x >= 2),
    )


def _enum_name(value: Any) -> str:
    name = getattr(value, "name", None)
    return str(name) if name is not None else str(value)


def _error_text(alert: Any) -> str:
    err = getattr(alert, "error", None)
    try:
        if err is not None and err.value():
            return str(err.message())
    except (AttributeError, RuntimeError):
        pass
    return str(alert.message())
