"""The scheduling policy of one blob download: peers first, mirror fallback.

Pure: no sockets, no libtorrent, no asyncio, no clock. The driver feeds it events
together with ``now`` (any monotonic float, in seconds) and carries out the decisions
it returns; `DownloadPolicy.next_wakeup` says when to send a `Tick` if nothing else
happens. Tests script events against a fake clock.

Who fetches what: libtorrent downloads from peers on its own (it picks pieces and
peers itself). This policy decides which pieces to ALSO fetch from the mirror by HTTP
Range (fed back through ``add_piece``), when to give up on peers for a piece, whom to
ban and when the download has failed.

"Peers first, mirror fallback" is the single ranking function `rank_sources`. It
mirrors kraken's completeness policy (complete peers, then origin, then incomplete
peers), applied per piece: a peer that holds the piece is as good a source for it as a
complete one, so the order is

    complete peers > incomplete peers holding the piece > mirror > peers that may
    announce the piece later

with one twist: during the start-up grace period, "peers may announce it" ranks above
the mirror, since peers are still connecting and sending their bitfields.
Holders known but not connected count as holders too: the blob's complete holders a
downloader leaves to its feeders (`HoldersAway`, `peer.scheduling.feeders`) while the
blob makes progress, and the holders of a piece that just vanished (a seeder pausing
its torrent to reconnect its peers) for ``stall_timeout``; a piece goes to the mirror
only once they stalled, not after the grace period.
Peers holding a piece drop out of the ranking when they stalled (no progress for
``stall_timeout``, or its blocks came slower than ``min_piece_rate``: see `_view`) or
after repeated hash failures on that piece; the mirror drops out while the piece waits
for its retry backoff.

Pieces sent to the mirror are picked "nobody has it" first, then stalled ones, each
in an order scrambled by ``config.salt``, so that agents starting together fetch
different pieces from the mirror and then trade them over the LAN instead of all
pulling the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, IntEnum

# Only constants: the agent's defaults are defined once, next to AgentConfig.
from peer.config import MIN_PIECE_RATE, PEER_GRACE, STALL_TIMEOUT

# --- configuration -----------------------------------------------------------------------


def min_piece_rate_under(download_cap: int) -> float:
    """The floor rate for a download under the agent's LAN download cap (bytes/s, 0:
    none): a quarter of the cap when that is lower, since pieces then come slowly by
    the user's choice (libtorrent may work on a few at once), not a trickler's."""
    if download_cap <= 0:
        return MIN_PIECE_RATE
    return min(MIN_PIECE_RATE, download_cap / 4)


@dataclass(frozen=True)
class PolicyConfig:
    # Time after the start during which a piece nobody has is not yet mirrored.
    grace_period: float = PEER_GRACE
    # A piece whose peer download shows no sign of life this long goes to the mirror.
    stall_timeout: float = STALL_TIMEOUT
    # ... and so does one whose bytes from peers (`PieceProgress.received`) fall behind
    # this rate (bytes/s) counted from its first block, less stall_timeout of credit:
    # it is had within stall_timeout + its size / min_piece_rate of its first block, or
    # the mirror races the peers for it. 0: any block keeps it. Not with no mirror.
    min_piece_rate: float = MIN_PIECE_RATE
    # Mirror pieces in flight at once.
    mirror_parallel: int = 4
    # A mirror fetch with no verdict after this long counts as failed (safety net;
    # the fetcher has its own socket timeouts).
    mirror_timeout: float = 120.0
    # Failures of one piece from the mirror (errors or bad data) before giving up.
    mirror_max_failures: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    # Hash failures of one piece from peers before the mirror takes that piece over.
    peer_hash_failures_max: int = 2
    # False when the blob has no mirror (e.g. a private checkpoint shared peer to peer).
    mirror_enabled: bool = True
    # Per-agent value that scrambles the mirror piece order (e.g. hash of the agent id).
    salt: int = 0

    def __post_init__(self) -> None:
        if self.mirror_parallel < 1 or self.mirror_max_failures < 1:
            raise ValueError("mirror_parallel and mirror_max_failures must be >= 1")
        if self.peer_hash_failures_max < 1:
            raise ValueError("peer_hash_failures_max must be >= 1")
        for name in (
            "grace_period",
            "stall_timeout",
            "min_piece_rate",
            "mirror_timeout",
            "backoff_base",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must be >= backoff_base")

    def backoff(self, failures: int) -> float:
        """Delay before retrying a piece from the mirror after ``failures`` failures."""
        return float(min(self.backoff_max, self.backoff_base * 2 ** max(0, failures - 1)))


# --- the ranking ----------------------------------------------------------------------------


class Source(IntEnum):
    """Where a piece can come from, in order of preference."""

    COMPLETE_PEER = 0
    PARTIAL_PEER = 1
    MIRROR = 2
    AWAIT_PEERS = 3  # nobody has it yet; a peer may announce it


@dataclass(frozen=True)
class PieceView:
    """What the ranking needs to know about one missing piece, at one instant."""

    complete_holders: int  # connected complete peers (seeds)
    partial_holders: int  # connected incomplete peers that have this piece
    peers_stalled: bool  # holders exist but gave no sign of life for stall_timeout
    peers_untrusted: bool  # peers sent bad data for this piece too often
    in_grace: bool  # the download is younger than the grace period
    mirror_usable: bool  # mirror configured, not waiting for a retry, not exhausted
    # holders known but not connected: away by choice (`HoldersAway`), or just vanished
    away_holders: int = 0


def rank_sources(view: PieceView) -> tuple[Source, ...]:
    """The sources able to serve a piece now, best first. Never empty: waiting for
    peers (`Source.AWAIT_PEERS`) is always possible and always listed."""
    ranked: list[Source] = []
    if not (view.peers_stalled or view.peers_untrusted):
        if view.complete_holders > 0 or view.away_holders > 0:
            ranked.append(Source.COMPLETE_PEER)
        if view.partial_holders > 0:
            ranked.append(Source.PARTIAL_PEER)
    if view.in_grace and not ranked:
        ranked.append(Source.AWAIT_PEERS)
    if view.mirror_usable:
        ranked.append(Source.MIRROR)
    if Source.AWAIT_PEERS not in ranked:
        ranked.append(Source.AWAIT_PEERS)
    return tuple(ranked)


# --- inputs ---------------------------------------------------------------------------------


class Origin(Enum):
    PEER = "peer"
    MIRROR = "mirror"  # data we fed with add_piece
    # Data we fed, checked against the piece's hash before, that libtorrent merged with
    # blocks peers had sent of the piece (add_piece keeps those): a failure is theirs.
    MIXED = "mixed"


@dataclass(frozen=True)
class PieceDone:
    """A piece passed its hash check."""

    piece: int
    origin: Origin


@dataclass(frozen=True)
class PieceHashFailed:
    """A piece failed its hash check; ``peer`` when the sender is known (for
    `Origin.MIXED`: the one peer whose blocks were in it)."""

    piece: int
    origin: Origin
    peer: str | None = None


@dataclass(frozen=True)
class PieceProgress:
    """Some blocks of a piece arrived from peers (a sign of life). ``received``: its
    bytes arrived so far, when known (the floor rate, ``min_piece_rate``, judges them;
    unknown, only the stall rule applies)."""

    piece: int
    received: int | None = None


@dataclass(frozen=True)
class PeerBitfield:
    """The full set of pieces a peer has (replaces what was known about it)."""

    peer: str
    pieces: frozenset[int]


@dataclass(frozen=True)
class PeerHave:
    peer: str
    piece: int


@dataclass(frozen=True)
class PeerGone:
    peer: str
    banned: bool = False


@dataclass(frozen=True)
class Availability:
    """Per-piece count of connected peers having each piece, when peers are not known
    by name (libtorrent's piece_availability). Use it or per-peer events, not both.
    ``progressed``: pieces that got blocks since the last look, taken as `PieceProgress`
    before anything is decided (one look at libtorrent is one event, so a decision never
    sees half of it); ``received``: (piece, bytes arrived so far) of those whose bytes
    are known (`PieceProgress.received`)."""

    counts: tuple[int, ...]
    progressed: frozenset[int] = frozenset()
    received: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class HoldersAway:
    """``count`` complete holders of the blob are known (the survey) but left
    unconnected on purpose (this downloader is not one of its feeders; 0: they are
    connected again). While the blob makes progress from peers, a piece no connected
    peer has counts as held by them: the feeders are taking it."""

    count: int


@dataclass(frozen=True)
class MirrorPieceFailed:
    """A mirror fetch of the piece failed (HTTP error, short body, timeout...)."""

    piece: int
    reason: str


@dataclass(frozen=True)
class Tick:
    """Time passed; sent at `DownloadPolicy.next_wakeup`."""


Event = (
    PieceDone
    | PieceHashFailed
    | PieceProgress
    | PeerBitfield
    | PeerHave
    | PeerGone
    | Availability
    | HoldersAway
    | MirrorPieceFailed
    | Tick
)

# --- outputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchFromMirror:
    """Fetch these pieces from the mirror. The first ``len(pieces) - stalled`` no peer
    had once the grace period ended; the last ``stalled`` had peers that went quiet
    for ``stall_timeout`` or sent them below ``min_piece_rate`` (the agent's debug log
    says which, per piece)."""

    pieces: tuple[int, ...]
    stalled: int = 0


@dataclass(frozen=True)
class CancelMirror:
    """Stop these mirror fetches: the pieces came from elsewhere or the download ended."""

    pieces: tuple[int, ...]


@dataclass(frozen=True)
class BanPeer:
    peer: str
    reason: str


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Failed:
    reason: str
    piece: int | None = None


Decision = FetchFromMirror | CancelMirror | BanPeer | Done | Failed


# --- the policy -----------------------------------------------------------------------------


def _scramble(piece: int, salt: int) -> int:
    """splitmix64 of (salt, piece): a cheap, deterministic, salt-dependent order."""
    mask = (1 << 64) - 1
    z = (salt * 0x9E3779B97F4A7C15 + piece + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


class DownloadPolicy:
    """State and decisions for one blob download of ``num_pieces`` pieces.

    Send ``Tick()`` right after creating it (and whenever `next_wakeup` comes), feed
    every event as it happens, and carry out the returned decisions in order. After
    `Done` or `Failed`, further events are ignored."""

    def __init__(
        self,
        num_pieces: int,
        now: float,
        config: PolicyConfig | None = None,
        *,
        have: Iterable[int] = (),
    ) -> None:
        if num_pieces < 1:
            raise ValueError("a download has at least one piece")
        self.config = config or PolicyConfig()
        self.num_pieces = num_pieces
        self.start = now
        self._done: set[int] = set()
        for p in have:
            self._check_piece(p)
            self._done.add(p)
        self._order = sorted(range(num_pieces), key=lambda p: _scramble(p, self.config.salt))
        # Peers: named bitfields, counts per piece, and anonymous counts.
        self._peers: dict[str, frozenset[int]] = {}
        self._named = [0] * num_pieces
        self._anon = [0] * num_pieces
        self._complete_peers = 0
        self._banned: set[str] = set()
        self._available_since: dict[int, float] = {}
        self._last_progress: dict[int, float] = {}
        # Per piece being sent, once its bytes are known: since when, and how many.
        self._first_progress: dict[int, float] = {}
        self._received: dict[int, int] = {}
        # a piece from peers passed its check, or min_piece_rate x stall_timeout more
        # bytes came from them (pieces that take longer than stall_timeout each, under a
        # LAN download cap: the swarm delivers at the floor, if not a piece at a time)
        self._last_peer_activity = now
        self._peer_bytes = 0  # bytes from peers of pieces in flight, as seen
        self._marked_bytes = 0  # ... at the last activity they made
        self._last_block = now  # ... or blocks of one came
        self._peer_hash_failures: dict[int, int] = {}
        self._spoils: dict[int, int] = {}  # our right copy failed, mixed with peers' blocks
        # Holders known but not connected (`HoldersAway`), since when; pieces whose
        # last holder vanished, when; and when the holders were connected again (a new
        # grace period for their handshakes).
        self._away = 0
        self._away_since = now
        self._lost_at: dict[int, float] = {}
        self._back_at = now
        # Mirror.
        self._inflight: dict[int, float] = {}
        self._mirror_failures: dict[int, int] = {}
        self._retry_at: dict[int, float] = {}
        # Evaluation bookkeeping: a full look at the pieces happens only when something
        # may have created a mirror candidate (dirty) or a deadline passed.
        self._dirty = True
        self._next_check = now
        self._finished = False
        self._failed: Failed | None = None

    # -- introspection --

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def failure(self) -> Failed | None:
        return self._failed

    @property
    def done_pieces(self) -> frozenset[int]:
        return frozenset(self._done)

    @property
    def mirror_in_flight(self) -> frozenset[int]:
        return frozenset(self._inflight)

    @property
    def banned(self) -> frozenset[str]:
        return frozenset(self._banned)

    def next_wakeup(self) -> float | None:
        """When to send a `Tick` if no other event comes (None: only events matter)."""
        if self._finished or self._failed:
            return None
        deadlines = [self._next_check]
        deadlines += [t + self.config.mirror_timeout for t in self._inflight.values()]
        soonest = min(deadlines)
        return None if math.isinf(soonest) else soonest

    def view(self, piece: int, now: float) -> PieceView:
        """The ranking input for ``piece`` at ``now`` (public for tests and debugging)."""
        self._check_piece(piece)
        return self._view(piece, now)[0]

    def best_source(self, piece: int, now: float) -> Source | None:
        if piece in self._done:
            return None
        return rank_sources(self.view(piece, now))[0]

    # -- events --

    def handle(self, event: Event, now: float) -> tuple[Decision, ...]:
        """Apply one event at time ``now``; returns what to do, in order."""
        if self._finished or self._failed:
            return ()
        out: list[Decision] = []
        match event:
            case PieceDone(piece=piece, origin=origin):
                self._on_done(piece, origin, now, out)
            case PieceHashFailed(piece=piece, origin=origin, peer=peer):
                self._check_piece(piece)
                if origin is Origin.MIRROR:
                    self._mirror_failed(
                        piece, "the mirror sent data that failed the hash", now, out
                    )
                elif origin is Origin.MIXED:
                    self._spoiled(piece, peer, now, out)
                else:
                    self._peer_hash_failed(piece, peer, now, out)
            case PieceProgress(piece=piece, received=received):
                self._progress(piece, now, received)
            case PeerBitfield(peer=peer, pieces=pieces):
                if peer not in self._banned:
                    for p in pieces:
                        self._check_piece(p)
                    self._set_peer(peer, frozenset(pieces), now)
            case PeerHave(peer=peer, piece=piece):
                self._check_piece(piece)
                if peer not in self._banned:
                    self._set_peer(peer, self._peers.get(peer, frozenset()) | {piece}, now)
            case PeerGone(peer=peer, banned=banned):
                self._drop_peer(peer, now, lost=not banned)
                if banned:
                    self._banned.add(peer)
            case Availability(counts=counts, progressed=progressed, received=received):
                if len(counts) != self.num_pieces:
                    raise ValueError(f"{len(counts)} availability counts, want {self.num_pieces}")
                sizes = dict(received)
                for p in progressed | frozenset(sizes):
                    self._progress(p, now, sizes.get(p))
                for p, c in enumerate(counts):
                    if c == self._anon[p]:
                        # As it was (nearly every piece of every sample): nothing changes
                        # (1.5 ms a walk of 1024 pieces, once a second; benchmarks 8.33).
                        continue
                    before = self._holders(p)
                    self._anon[p] = max(0, int(c))
                    self._availability_changed(p, before, now)
            case HoldersAway(count=count):
                count = max(0, int(count))
                if count and not self._away:
                    self._away_since = now
                elif self._away and not count:
                    self._back_at = now
                    for piece in list(self._first_progress):
                        self._restart_floor(piece, now)
                self._away = count
                self._dirty = True
            case MirrorPieceFailed(piece=piece, reason=reason):
                self._check_piece(piece)
                if piece in self._inflight:
                    self._mirror_failed(piece, reason, now, out)
            case Tick():
                pass
            case _:
                raise TypeError(f"not a policy event: {event!r}")
        if not (self._finished or self._failed):
            self._expire_mirror(now, out)
        if not (self._finished or self._failed) and (self._dirty or now >= self._next_check):
            self._evaluate(now, out)
        return tuple(out)

    # -- event helpers --

    def _check_piece(self, piece: int) -> None:
        if type(piece) is not int or not 0 <= piece < self.num_pieces:
            raise ValueError(f"piece {piece!r} is out of range 0-{self.num_pieces - 1}")

    def _progress(self, piece: int, now: float, received: int | None = None) -> None:
        self._check_piece(piece)
        if piece not in self._done:
            # That piece's own sign of life, not the swarm's: a block now and then is
            # not the swarm delivering (a peer claiming every piece and sending a block
            # every few seconds held every other piece from the mirror: a download
            # froze). Without a mirror, waiting is all there is: it counts there.
            self._last_progress[piece] = now
            self._last_block = now
            if received is not None:
                # Judged from the first bytes known (no earlier: the next check was
                # set without them). The most seen: a count that went back (the
                # torrent added again) must not take credit for bytes that came.
                self._first_progress.setdefault(piece, now)
                before = self._received.get(piece, 0)
                self._received[piece] = max(int(received), before)
                self._peer_bytes += self._received[piece] - before
                step = self.config.min_piece_rate * self.config.stall_timeout
                if self.config.min_piece_rate and self._peer_bytes - self._marked_bytes >= step:
                    self._marked_bytes = self._peer_bytes
                    self._last_peer_activity = now

    def _on_done(self, piece: int, origin: Origin, now: float, out: list[Decision]) -> None:
        self._check_piece(piece)
        if piece in self._done:
            return
        self._done.add(piece)
        self._forget_progress(piece)
        self._lost_at.pop(piece, None)
        if origin is Origin.PEER:
            self._last_peer_activity = now
        if piece in self._inflight:
            del self._inflight[piece]
            self._dirty = True  # a mirror slot is free
            if origin is Origin.PEER:
                out.append(CancelMirror((piece,)))
        if len(self._done) == self.num_pieces:
            self._finished = True
            if self._inflight:
                out.append(CancelMirror(tuple(sorted(self._inflight))))
                self._inflight.clear()
            out.append(Done())

    def _peer_hash_failed(
        self, piece: int, peer: str | None, now: float, out: list[Decision]
    ) -> None:
        if piece in self._done:
            return
        self._peer_hash_failures[piece] = self._peer_hash_failures.get(piece, 0) + 1
        self._forget_progress(piece)  # the partial piece was thrown away
        self._dirty = True
        self._ban(peer, f"sent piece {piece}, which failed its hash check", now, out)

    def _spoiled(self, piece: int, peer: str | None, now: float, out: list[Decision]) -> None:
        """Our right copy of a piece failed with blocks peers had sent of it (a holder
        trickling wrong blocks, raced by the mirror): not the mirror's failure. Its
        peers are not trusted with it any more, so it goes to the mirror again at once,
        the sender banned when known; a piece spoiled this often fails the download
        (several senders at once, none of them known)."""
        self._inflight.pop(piece, None)
        if piece in self._done:
            return
        spoiled = self._spoils[piece] = self._spoils.get(piece, 0) + 1
        failures = max(self._peer_hash_failures.get(piece, 0), self.config.peer_hash_failures_max)
        self._peer_hash_failures[piece] = failures
        self._forget_progress(piece)
        self._dirty = True
        self._ban(peer, f"sent blocks of piece {piece} that failed its hash check", now, out)
        if spoiled >= self.config.mirror_max_failures:
            self._fail(
                f"piece {piece}: blocks peers sent of it spoiled the mirror's copy {spoiled} times",
                piece,
                out,
            )

    def _ban(self, peer: str | None, reason: str, now: float, out: list[Decision]) -> None:
        """The sender of bad data, when known: never used again (`BanPeer`)."""
        if peer is not None and peer not in self._banned:
            self._banned.add(peer)
            self._drop_peer(peer, now, lost=False)
            out.append(BanPeer(peer, reason))

    def _restart_floor(self, piece: int, now: float) -> None:
        """The floor rate judges a piece's bytes from ``now`` on (``stall_timeout`` of
        credit again): the bytes it has count as if they came at the floor."""
        if piece in self._first_progress and self.config.min_piece_rate:
            self._first_progress[piece] = now - self._received[piece] / self.config.min_piece_rate

    def _forget_progress(self, piece: int) -> None:
        self._last_progress.pop(piece, None)
        self._first_progress.pop(piece, None)
        self._received.pop(piece, None)

    def _mirror_failed(self, piece: int, reason: str, now: float, out: list[Decision]) -> None:
        self._inflight.pop(piece, None)
        if piece in self._done:
            return
        failures = self._mirror_failures.get(piece, 0) + 1
        self._mirror_failures[piece] = failures
        self._dirty = True
        if failures >= self.config.mirror_max_failures:
            self._fail(
                f"piece {piece} failed {failures} times from the mirror (last: {reason})",
                piece,
                out,
            )
        else:
            self._retry_at[piece] = now + self.config.backoff(failures)

    def _expire_mirror(self, now: float, out: list[Decision]) -> None:
        limit = self.config.mirror_timeout
        for piece, started in list(self._inflight.items()):
            if now - started >= limit and not self._failed:
                out.append(CancelMirror((piece,)))
                self._mirror_failed(piece, f"no answer after {limit:g} s", now, out)

    def _fail(self, reason: str, piece: int | None, out: list[Decision]) -> None:
        if self._inflight:
            out.append(CancelMirror(tuple(sorted(self._inflight))))
            self._inflight.clear()
        self._failed = Failed(reason, piece)
        out.append(self._failed)

    def _holders(self, piece: int) -> int:
        # Named and anonymous counts describe the same peers when both are fed; the
        # larger one is the better estimate, their sum would double count.
        return max(self._named[piece], self._anon[piece])

    def _availability_changed(
        self, piece: int, before: int, now: float, *, lost: bool = True
    ) -> None:
        after = self._holders(piece)
        if before == 0 and after > 0:
            self._available_since[piece] = now
            self._lost_at.pop(piece, None)
            if self._away:
                # A downloader has it at last: its floor counts from now (the holders
                # left to the feeders could not send it, and it waited by our choice).
                self._restart_floor(piece, now)
        elif before > 0 and after == 0:
            self._available_since.pop(piece, None)
            if lost and piece not in self._done:
                self._lost_at[piece] = now  # held for stall_timeout more
            self._dirty = True  # the piece may have just become a mirror candidate

    def _set_peer(self, peer: str, pieces: frozenset[int], now: float) -> None:
        old = self._peers.get(peer, frozenset())
        if len(old) == self.num_pieces:
            self._complete_peers -= 1
        for p in old - pieces:
            before = self._holders(p)
            self._named[p] -= 1
            self._availability_changed(p, before, now)
        for p in pieces - old:
            before = self._holders(p)
            self._named[p] += 1
            self._availability_changed(p, before, now)
        self._peers[peer] = pieces
        if len(pieces) == self.num_pieces:
            self._complete_peers += 1

    def _drop_peer(self, peer: str, now: float, *, lost: bool = True) -> None:
        """``lost``: the peer may come back (not banned), so its pieces count as held
        for ``stall_timeout``."""
        old = self._peers.pop(peer, None)
        if old is None:
            return
        if len(old) == self.num_pieces:
            self._complete_peers -= 1
        for p in old:
            before = self._holders(p)
            self._named[p] -= 1
            self._availability_changed(p, before, now, lost=lost)
        self._dirty = True

    # -- evaluation --

    def _view(self, piece: int, now: float) -> tuple[PieceView, float]:
        """The piece's ranking input, and the earliest time it could rank the mirror
        first if nothing else happened."""
        cfg = self.config
        holders = self._holders(piece)
        complete = min(self._complete_peers, holders)
        grace_end = max(self.start, self._back_at) + cfg.grace_period
        away = 0
        if holders == 0 and self._away:
            # the feeders take it from the holders we leave to them, while the blob
            # makes progress
            away = self._away
            alive = max(self._away_since, self._last_peer_activity)
        elif holders == 0 and piece in self._lost_at:
            away = 1  # its holder vanished: it may come back (a seeder's reconnect)
            alive = max(self._lost_at[piece], self._last_progress.get(piece, -math.inf))
        elif piece in self._last_progress:
            alive = self._last_progress[piece]
        else:
            since = self._available_since.get(piece, self.start)
            alive = max(since, self._last_peer_activity, self.start)
        stall_at = alive + cfg.stall_timeout
        if holders and piece in self._received and cfg.min_piece_rate and cfg.mirror_enabled:
            # Blocks keep coming, but too slowly: its bytes fell behind the floor rate
            # since its first block (stall_timeout of credit), so a holder trickling
            # blocks holds it for stall_timeout + its size / floor at most.
            behind_at = (
                self._first_progress[piece]
                + cfg.stall_timeout
                + self._received[piece] / cfg.min_piece_rate
            )
            stall_at = min(stall_at, behind_at)
        untrusted = self._peer_hash_failures.get(piece, 0) >= cfg.peer_hash_failures_max
        retry_at = self._retry_at.get(piece, -math.inf)
        exhausted = self._mirror_failures.get(piece, 0) >= cfg.mirror_max_failures
        view = PieceView(
            complete_holders=complete,
            partial_holders=holders - complete,
            peers_stalled=holders + away > 0 and now >= stall_at,
            peers_untrusted=untrusted,
            in_grace=now < grace_end,
            mirror_usable=cfg.mirror_enabled and not exhausted and now >= retry_at,
            away_holders=away,
        )
        if not cfg.mirror_enabled:
            mirror_at = math.inf
        elif holders + away > 0 and not untrusted:
            mirror_at = max(stall_at, retry_at)
        else:
            mirror_at = max(grace_end, retry_at)
        return view, mirror_at

    def _evaluate(self, now: float, out: list[Decision]) -> None:
        self._dirty = False
        cfg = self.config
        if not cfg.mirror_enabled:
            self._check_peer_only(now, out)
            return
        free = cfg.mirror_parallel - len(self._inflight)
        if free <= 0:
            self._next_check = math.inf  # a freed slot marks us dirty
            return
        if len(self._order) > 2 * (self.num_pieces - len(self._done)):
            # Drop finished pieces from the scan order now and then (amortized O(n)),
            # so scans stay proportional to what is still missing.
            self._order = [p for p in self._order if p not in self._done]
        nobody_has: list[int] = []
        stalled: list[int] = []
        next_check = math.inf
        for piece in self._order:
            if piece in self._done or piece in self._inflight:
                continue
            view, mirror_at = self._view(piece, now)
            if rank_sources(view)[0] is Source.MIRROR:
                has_holders = view.complete_holders + view.partial_holders + view.away_holders > 0
                (stalled if has_holders else nobody_has).append(piece)
                if len(nobody_has) >= free:
                    break  # the best class alone fills the free slots
            else:
                next_check = min(next_check, mirror_at)
        chosen = (nobody_has + stalled)[:free]
        for piece in chosen:
            self._inflight[piece] = now
        if chosen:
            out.append(FetchFromMirror(tuple(chosen), max(0, len(chosen) - len(nobody_has))))
        # Slots still free: the scan was complete, so next_check is exact.
        self._next_check = math.inf if len(chosen) >= free else next_check

    def _check_peer_only(self, now: float, out: list[Decision]) -> None:
        """Without a mirror, a piece nobody has fails the download once peers had the
        grace period plus a stall timeout to show up and went quiet."""
        cfg = self.config
        last = max(self._last_peer_activity, self._last_block)
        deadline = max(self.start + cfg.grace_period, last) + cfg.stall_timeout
        orphans = [
            p
            for p in range(self.num_pieces)
            if p not in self._done
            and (
                (self._holders(p) == 0 and not self._away)
                or self._peer_hash_failures.get(p, 0) >= cfg.peer_hash_failures_max
            )
        ]
        if not orphans:
            self._next_check = math.inf
        elif now >= deadline:
            self._fail(
                f"no peer has piece {orphans[0]} (and {len(orphans) - 1} more) and this "
                "download has no mirror",
                orphans[0],
                out,
            )
        else:
            self._next_check = deadline
