"""The driver of one blob's swarm download: libtorrent's check, settle, then the policy.

Pure: no sockets, no libtorrent, no asyncio, no clock. `peer.agent.fetch` feeds it the
swarm's typed events (`peer.transfer.events`), the results of mirror pieces, samples of
libtorrent's state when it asks for one (`TakeSample`), a `ReadersChanged` when a
streaming reader comes, goes or waits for bytes, and a `Wake` at `next_wakeup`; each
call takes ``now`` and returns the actions to carry out, in order.

Streaming readers (HF_ENDPOINT) are served on their events, never by polling: a reader
that waits gets the in-order prefix flushed for it at once if ``stream_step`` bytes of
it are unflushed, else as soon as that many are, or ``stream_delay`` s after the first
had piece it waits for (a flush is a libtorrent disk fence: one per piece would cost
more than the wait).
While a reader streams, libtorrent picks pieces in order (`InOrder`): rarest first, the
first pieces came up to 0.7 s late and the in-order prefix (what a reader and the
whole-file hash may take) reached the end only with the last piece, so the hash ended
0.24-0.87 s after it (docs/benchmarks.md 8.14).

The phases of one download:

1. checking: libtorrent checks what is on disk (a resumed download). What it finds
   verified counts as resumed, not fetched, so peers are connected only afterwards
   (`StartSwarming`).
2. settling: at most ``settle_limit`` s until the peers holding the whole blob (or any
   peer, if none does) are connected and have said what they hold. The policy's grace
   period must not be spent on libtorrent's own start-up (a connect on its 500 ms tick,
   the handshake), or every piece would look like one nobody has.
3. running: `DownloadPolicy` says which pieces to also take from the mirror and whom to
   ban; it is sampled (availability, per-piece progress) when its `next_wakeup` comes,
   when an event says something changed, and at least every ``heartbeat`` s.

Feeders (`peer.scheduling.feeders`, when given a `FeederChoice` and holders): the
blob's downloaders learned at each re-survey (`Members`) decide whether this one takes
the blob from its complete holders; one that is not a feeder drops them
(`DropHolders`: the caller adds the torrent again without them and says `Rejoined`),
and the policy counts them as holders while the blob makes progress (`HoldersAway`),
so that no piece goes to the mirror for want of a connected holder. A stall brings
them back (`ConnectHolders`).

A download without a mirror (a ``local/*`` repo) runs the policy with
``mirror_enabled=False``: a stalled piece waits for peers, and a piece no peer has fails
the download with the policy's reason once peers had their time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from peer.scheduling import policy as pol
from peer.scheduling.feeders import ConnectHolders, DropHolders, FeederChoice
from peer.transfer import events as ev

CHECKING_STATES = frozenset({"checking_files", "checking_resume_data", "queued_for_checking"})
# What a block of `SwarmSample.partial` holds: libtorrent asks peers for 16 KiB (a piece's
# last block may be shorter).
BLOCK = 16 << 10

# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class SwarmDownloadConfig:
    policy: pol.PolicyConfig = field(default_factory=pol.PolicyConfig)
    # libtorrent's check of the file on disk; after this long peers are connected anyway.
    check_limit: float = 600.0
    settle_limit: float = 5.0
    # While checking or settling, a sample this often if no event says anything changed.
    settle_poll: float = 0.25
    # While running: a sample at least this often, for what no event and no policy
    # deadline announces (a peer that stopped having a piece, libtorrent finishing).
    heartbeat: float = 1.0
    # A streaming reader that waits (`Readers.waiting`) is flushed for once this much
    # of the prefix is unflushed, or this long after the first byte it waits for came.
    stream_step: int = 16 << 20
    stream_delay: float = 0.1
    # Pieces after a reader's position asked of peers in order, 100 ms apart.
    readahead: int = 16
    deadline_step_ms: int = 100
    # The whole-file hash follows the in-order prefix (``follow_prefix``): flush and
    # hand it on each time it grew this much (a flush is a libtorrent disk fence).
    hash_step: int = 32 << 20
    # ... and prefer the pieces this far after the prefix (rarest first among them,
    # so downloaders still trade), or the prefix would only grow at the very end.
    prefer_window: int = 64 << 20
    # A holder that closed our connection is dialled again at once, at most this often.
    redial_gap: float = 2.0
    # Once less than this is left to come, `WatchTheEnd` (the swarm's events at once:
    # alert batches would hold the last piece back for up to 50 ms, and the flushes for
    # the hash with it, leaving more to hash after the last piece; 64 MiB, not 16: at
    # 400 MB/s a batch alone is 20 MB; docs/benchmarks.md 8.37). 0: never.
    end_watch: int = 64 << 20


# --- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSample:
    endpoint: ev.Endpoint
    hashfails: int


@dataclass(frozen=True)
class SwarmSample:
    """libtorrent's state at one instant (taken when the driver asked with `TakeSample`)."""

    state: str
    is_finished: bool
    have: tuple[bool, ...]
    availability: tuple[int, ...]  # empty when libtorrent keeps no piece picker (a seed)
    partial: tuple[tuple[int, int], ...]  # (piece, blocks received) of pieces in flight
    peers: tuple[PeerSample, ...]  # empty unless its `TakeSample` asked for the peers


@dataclass(frozen=True)
class MirrorPieceFed:
    """A mirror piece was fed to libtorrent: ``ok`` if the piece is now had (from this
    data or a peer's), False if the data failed (a `HashFailed` event says so too)."""

    piece: int
    nbytes: int
    ok: bool


@dataclass(frozen=True)
class MirrorPieceError:
    piece: int
    reason: str


@dataclass(frozen=True)
class Readers:
    """The streaming readers' view (HF_ENDPOINT mode, `peer.transfer.inflight`): how
    many, where the one furthest behind is (those ahead wait for the same checked
    prefix), how much of the blob is already readable, and how many readers wait for
    more than that."""

    count: int
    read_pos: int
    ready: int
    waiting: int = 0


@dataclass(frozen=True)
class Wake:
    """Sent at `SwarmDownload.next_wakeup` (and never needed before it), with the
    readers' view if the caller has one."""

    readers: Readers | None = None


@dataclass(frozen=True)
class ReadersChanged:
    """A streaming reader came, went, or began to wait for bytes: the driver never
    looks at readers on its own, so it must hear of each."""

    readers: Readers


@dataclass(frozen=True)
class Members:
    """The agents a re-survey found downloading this blob (agent ids; not complete),
    those it found holding it whole, and what downloaders said they deal the blob's
    feeders over ((agent id, `feeders.deal_over`) pairs)."""

    agents: frozenset[str]
    complete: frozenset[str] = frozenset()
    deals: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Rejoined:
    """The torrent was added again (a `DropHolders` or `ConnectHolders` carried out):
    its piece priorities, deadlines and blocks in flight are gone."""


Input = (
    ev.SwarmEvent
    | SwarmSample
    | MirrorPieceFed
    | MirrorPieceError
    | Wake
    | ReadersChanged
    | Members
    | Rejoined
)

# --- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TakeSample:
    """Read libtorrent's state and send it back as a `SwarmSample`; its ``peers`` only
    if ``peers`` (else left empty): the driver needs them to settle and to find who sent
    a bad piece, and libtorrent's peer list costs about 1 ms per peer to read, once a
    second for as long as the download runs (docs/benchmarks.md 8.33)."""

    peers: bool = True


@dataclass(frozen=True)
class StartSwarming:
    """The check is over: announce to the trackers and connect the offering peers."""


@dataclass(frozen=True)
class ConnectPeer:
    """Dial this peer again now (libtorrent would wait for its next connect round)."""

    host: str
    port: int


@dataclass(frozen=True)
class FeedMirrorPiece:
    """Fetch this piece from the mirror, check it against the piece's hash (the
    manifest's piece layer) and feed it: a fed piece that then fails is blamed on the
    blocks peers had sent of it (libtorrent's add_piece keeps those)."""

    piece: int
    stalled: bool = False  # its peers went quiet or too slow (else none had it after the grace)


@dataclass(frozen=True)
class CancelMirrorPiece:
    piece: int


@dataclass(frozen=True)
class BanHost:
    host: str
    peer: str
    reason: str


@dataclass(frozen=True)
class FlushForReaders:
    """Flush libtorrent's write cache, then ``ready`` bytes of the file are readable."""

    ready: int


@dataclass(frozen=True)
class PreferPieces:
    """Raise these pieces' priority: they come next after the in-order prefix."""

    pieces: tuple[int, ...]


@dataclass(frozen=True)
class LowerPieces:
    """Put these pieces back to the default priority, below the preferred ones: another
    feeder's stripe (`FeederChoice.stripe`)."""

    pieces: tuple[int, ...]


@dataclass(frozen=True)
class SetPieceDeadline:
    piece: int
    ms: int


@dataclass(frozen=True)
class InOrder:
    """Pick pieces in order (libtorrent's sequential download) while ``on``: a reader
    streams the in-order prefix. On, it also drops what `PreferPieces` asked (higher
    priorities come first, rarest first among them), and none is asked meanwhile."""

    on: bool


@dataclass(frozen=True)
class WatchTheEnd:
    """The last ``end_watch`` bytes are coming (sent once): have the swarm's events
    delivered at once from now on, not in batches (the end is the download's wall time)."""


@dataclass(frozen=True)
class Finished:
    """Every piece passed its check (flush the cache before reading the file)."""


@dataclass(frozen=True)
class Failed:
    reason: str


Action = (
    TakeSample
    | StartSwarming
    | ConnectPeer
    | FeedMirrorPiece
    | CancelMirrorPiece
    | BanHost
    | FlushForReaders
    | PreferPieces
    | LowerPieces
    | SetPieceDeadline
    | InOrder
    | DropHolders
    | ConnectHolders
    | WatchTheEnd
    | Finished
    | Failed
)


@dataclass
class SwarmProgress:
    """What the download did so far, in bytes (the caller copies it to its counters)."""

    resumed: int = 0  # verified on disk when the check ended
    done: int = 0
    from_mirror: int = 0  # pieces had from the data we fed (libtorrent's verdict)
    hash_failures: int = 0  # pieces from peers that failed their check


class Phase(Enum):
    CHECKING = "checking"
    SETTLING = "settling"
    RUNNING = "running"
    OVER = "over"


def host_of(peer: str) -> str:
    """The host of a "host:port" (IPv6 in brackets) as `ev.Endpoint` prints it."""
    return peer.rsplit(":", 1)[0].strip("[]")


# Events after which libtorrent's state is worth a look at once.
_LOOK_NOW = (
    ev.TorrentChecked,
    ev.StateChanged,
    ev.TorrentFinished,
    ev.PeerConnected,
    ev.PeerDisconnected,
)


class SwarmDownload:
    """One blob of ``size`` bytes in ``num_pieces`` pieces of ``piece_size`` (a v2
    torrent of one file). ``holders`` are the (host, port) of peers offering the whole
    blob; ``streaming`` when a reader may stream it (`ReadersChanged`, `Wake.readers`);
    ``follow_prefix`` when the caller hashes the in-order prefix as it grows (each
    `FlushForReaders` makes more of it readable; the pieces after it are preferred)."""

    def __init__(
        self,
        size: int,
        piece_size: int,
        num_pieces: int,
        now: float,
        config: SwarmDownloadConfig | None = None,
        *,
        holders: frozenset[tuple[str, int]] = frozenset(),
        streaming: bool = False,
        follow_prefix: bool = False,
        feeders: FeederChoice | None = None,
    ) -> None:
        if piece_size < 1 or not (num_pieces - 1) * piece_size < size <= num_pieces * piece_size:
            raise ValueError(f"{num_pieces} pieces of {piece_size} bytes do not make {size}")
        self.config = config or SwarmDownloadConfig()
        self.size = size
        self.piece_size = piece_size
        self.num_pieces = num_pieces
        self.holders = holders
        self.streaming = streaming
        self.follow_prefix = follow_prefix
        # whether to take the blob from its holders (only if there are some)
        self.feeders = feeders if holders else None
        self.progress = SwarmProgress()
        self.phase = Phase.CHECKING
        self.policy: pol.DownloadPolicy | None = None
        self.outcome: Finished | Failed | None = None
        self._have = [False] * num_pieces
        self._deadline = now + self.config.check_limit  # of the current phase
        self._sampling = False  # a TakeSample is out, its answer not in yet
        self._peers_asked = True  # ... and it asked for the peers
        self._sample_at = now  # the next sample wanted
        self._reconcile = True  # take `have` from the next sample (events may be lost)
        self._starved = False  # a reader waits for bytes past what is flushed
        self._wanted = 0  # ... at this position: a flush helps once the prefix passes it
        self._stream_at: float | None = None  # flush for it then, if not before
        self._asked: set[int] = set()  # pieces given a deadline for a reader
        self._in_order = False  # an InOrder(True) is in force
        self._readers = 0  # streaming readers, as last heard (also while checking)
        self._received: dict[int, int] = {}  # piece -> blocks received, to see progress
        self._coming: frozenset[int] = frozenset()  # in flight at the last sample
        self._lowered: set[int] = set()  # pieces of another feeder's stripe, still lowered
        self._hashfails: dict[str, int] = {}  # peer -> hash failures seen so far
        # pieces that failed with peers' blocks in them (their origin), sender not yet known
        self._blame: list[tuple[int, pol.Origin]] = []
        self._early: list[pol.Event] = []  # for the policy, before it runs
        if self.feeders is not None and not self.feeders.feeding:
            # left to the feeders before the torrent's first add (a late joiner)
            self._early.append(pol.HoldersAway(len(holders)))
        self._prefix = 0  # pieces had in order from the first
        self._flushed = 0  # bytes of that prefix a FlushForReaders made readable
        self._preferred = 0  # pieces before this one were given a PreferPieces
        self._stripe: tuple[int, int] | None = None  # a feeder's (k, n): see `_restripe`
        self._watching_end = False  # a WatchTheEnd was sent
        self._redialed: dict[tuple[str, int], float] = {}  # holder -> when dialled again

    def piece_length(self, piece: int) -> int:
        return min(self.piece_size, self.size - piece * self.piece_size)

    @property
    def have(self) -> tuple[bool, ...]:
        return tuple(self._have)

    def next_wakeup(self) -> float | None:
        """When to send a `Wake` if nothing else comes (None: the download is over, or
        a `TakeSample` is still unanswered)."""
        if self.outcome is not None:
            return None
        times = [self._deadline] if self.phase is not Phase.RUNNING else []
        if not self._sampling:
            times.append(self._sample_at)
            if self.policy is not None:
                # The policy decides on fresh availability: sample when it wants a Tick.
                wake = self.policy.next_wakeup()
                if wake is not None:
                    times.append(wake)
        if self._stream_at is not None:
            times.append(self._stream_at)
        if self.feeders is not None and (wake := self.feeders.next_wakeup()) is not None:
            times.append(wake)
        soonest = min(times, default=math.inf)
        return None if math.isinf(soonest) else soonest

    # -- inputs --

    def handle(self, item: Input, now: float) -> tuple[Action, ...]:
        """Apply one input at ``now``; returns what to do, in order. After `Finished` or
        `Failed`, further inputs are ignored."""
        if self.outcome is not None:
            return ()
        out: list[Action] = []
        match item:
            case Wake(readers=readers):
                self._on_wake(readers, now, out)
            case ReadersChanged(readers=readers):
                self._feed_readers(readers, now, out)
            case SwarmSample():
                self._on_sample(item, now, out)
            case MirrorPieceFed():
                # What counts is libtorrent's verdict (`PieceFinished.fed_by_us`): this
                # comes after it, after `Finished` for the last piece, and says ok when a
                # peer's copy won the race too.
                pass
            case MirrorPieceError(piece=piece, reason=reason):
                self._to_policy(pol.MirrorPieceFailed(piece, reason), now, out)
            case Members(agents=agents, complete=complete, deals=deals):
                if self.feeders is not None and self.phase is not Phase.CHECKING:
                    had = self.progress.done / self.size
                    act = self.feeders.learn(agents, had, now, complete, dict(deals))
                    self._feeder_action(act, now, out)
                    self._restripe(now, out)
            case Rejoined():
                self._on_rejoined(now, out)
            case ev.SwarmEvent():
                self._on_event(item, now, out)
            case _:
                raise TypeError(f"not a swarm download input: {item!r}")
        return tuple(out)

    def handle_all(self, items: Iterable[Input], now: float) -> tuple[Action, ...]:
        """Apply inputs that came together (one alert drain's events, what the driver's
        tasks posted meanwhile) at ``now``, in order; their actions, in order. The caller
        then asks `next_wakeup` once for the lot, not once per event."""
        out: list[Action] = []
        for item in items:
            if self.outcome is not None:
                break
            out += self.handle(item, now)
        return tuple(out)

    def _on_wake(self, readers: Readers | None, now: float, out: list[Action]) -> None:
        if self.feeders is not None and self.phase is not Phase.CHECKING:
            # before the sample below: the policy hears that the holders come back
            # before it looks at pieces nobody connected has
            act = self.feeders.tick(now)
            if act is not None:  # (back on the holders for a stall: no stripe)
                self._feeder_action(act, now, out)
                self._restripe(now, out)
        if self.phase is Phase.CHECKING and now >= self._deadline:
            self._start_swarming(now, out)  # the check took too long: go on anyway
        elif self.phase is Phase.SETTLING and now >= self._deadline:
            self._run(now, out)
            self._look_now(now)  # availability and progress, now the policy runs
        if self.outcome is not None:
            return
        if readers is not None:
            self._feed_readers(readers, now, out)
        if self._stream_at is not None and now >= self._stream_at:
            self._stream_at = None
            self._flush_for_reader(out)
        wake = self.policy.next_wakeup() if self.policy is not None else None
        due = now >= self._sample_at or (wake is not None and now >= wake)
        if due and not self._sampling:
            self._sampling = True
            # The peers only while they decide something: who is connected (until the
            # policy runs) and who sent a bad piece (blame).
            self._peers_asked = self.phase is not Phase.RUNNING or bool(self._blame)
            out.append(TakeSample(self._peers_asked))

    def _on_event(self, e: ev.SwarmEvent, now: float, out: list[Action]) -> None:
        if isinstance(e, ev.PieceFinished):
            if self.feeders is not None and not e.fed_by_us:
                self.feeders.progress(now, self.piece_length(e.piece))
            if not self._have[e.piece]:
                self._have[e.piece] = True
                self.progress.done += self.piece_length(e.piece)
                if e.fed_by_us:
                    self.progress.from_mirror += self.piece_length(e.piece)
                self._follow(now, out)
            origin = pol.Origin.MIRROR if e.fed_by_us else pol.Origin.PEER
            if self.policy is not None:
                self._to_policy(pol.PieceDone(e.piece, origin), now, out)
        elif isinstance(e, ev.HashFailed):
            # Who sent it shows in the next sample: the one peer whose count rose. Ours
            # passed the piece's hash before it was fed (`FeedMirrorPiece`): it failed
            # with wrong blocks a peer had sent of it (a trickler raced by the mirror).
            self.progress.hash_failures += 1
            self._blame.append((e.piece, pol.Origin.MIXED if e.fed_by_us else pol.Origin.PEER))
            # libtorrent starts the piece again from its first block: blocks from 1 up
            # are progress again (the policy forgets the failed copy's bytes too).
            self._received.pop(e.piece, None)
            self._look_now(now)
        elif isinstance(e, ev.PeerBanned):
            # libtorrent banned it for this torrent (it alone sent a bad piece); make
            # that session-wide: no blob should come from that host now.
            out.append(BanHost(e.endpoint.host, str(e.endpoint), "sent corrupt data"))
            self._to_policy(pol.PeerGone(str(e.endpoint), banned=True), now, out)
        elif isinstance(e, ev.EventsDropped | ev.AlertsDropped):
            self._reconcile = True
            self._look_now(now)
        elif isinstance(e, _LOOK_NOW):
            if isinstance(e, ev.PeerDisconnected):
                self._redial(e.endpoint, now, out)
            self._look_now(now)

    def _redial(self, peer: ev.Endpoint, now: float, out: list[Action]) -> None:
        """A holder we take the blob from closed the connection: dial it again at once,
        at most once per `redial_gap`. A seeder drops every peer of a torrent that turns
        shared so that they learn its request bound (`swarm.RequestBound`): libtorrent
        dialled it again about 1 s later, the first second of a 1 -> 8 LAN row."""
        key = (peer.host, peer.port)
        if key not in self.holders or self.phase is Phase.CHECKING:
            return
        if self.feeders is not None and not self.feeders.feeding:
            return  # left to the feeders
        if self.policy is not None and str(peer) in self.policy.banned:
            return
        last = self._redialed.get(key)
        if last is not None and now - last < self.config.redial_gap:
            return
        self._redialed[key] = now
        out.append(ConnectPeer(*key))

    def _on_sample(self, s: SwarmSample, now: float, out: list[Action]) -> None:
        self._sampling = False
        self._coming = frozenset(piece for piece, _ in s.partial)
        if self._lowered & self._coming and not self._in_order:
            # Another feeder's piece began to come (from it, or a downloader whose
            # port is shared by many): preferred again, so the holders may finish it;
            # left lowered, it came below the policy's floor rate and went to the
            # mirror (2-4 MB a round, benchmarks 8.36).
            back = self._lowered & self._coming
            self._lowered -= back
            out.append(PreferPieces(tuple(sorted(back))))
        checking = s.state in CHECKING_STATES
        if len(s.have) == self.num_pieces and (
            self._reconcile or s.is_finished or self.phase is not Phase.RUNNING
        ):
            self._take_have(s.have, now, out)
            self._reconcile = checking
        if self._peers_asked:
            self._resolve_blame(s.peers, now, out)
        if self.outcome is not None:
            return
        if self.phase is Phase.CHECKING and not checking:
            if s.is_finished:
                self.progress.resumed = self.progress.done
                self._finish(Finished(), out)
                return
            self._start_swarming(now, out)
        elif self.phase is not Phase.CHECKING and s.is_finished:
            self._finish(Finished(), out)
            return
        if self.phase is Phase.SETTLING and not checking and self._settled(s):
            self._run(now, out)
        if self.phase is Phase.RUNNING and self.outcome is None:
            self._feed_policy(s, now, out)
        period = self.config.heartbeat if self.phase is Phase.RUNNING else self.config.settle_poll
        self._sample_at = now + period
        if self._blame:
            self._look_now(now)  # a piece failed while a sample without peers was out

    # -- phases --

    def _start_swarming(self, now: float, out: list[Action]) -> None:
        # What the check found verified was there before us: resumed, not fetched.
        self.progress.resumed = self.progress.done
        self.phase = Phase.SETTLING
        self._deadline = now + self.config.settle_limit
        if self.streaming and self._readers and not self._in_order:
            # Before the first requests go out: libtorrent asks for a batch of pieces
            # as soon as the peer is connected, and those would be rarest first.
            self._in_order = True
            out.append(InOrder(True))
        out.append(StartSwarming())
        if self.feeders is not None:
            # (a choice that learnt the members before the add: striped from the first
            # pieces it prefers, not after the first re-survey)
            self._stripe = self.feeders.stripe
        self._follow(now, out)
        if self.streaming:
            self._stream_at = now  # a Wake at once: it brings the readers that came first

    def _settled(self, s: SwarmSample) -> bool:
        connected = {(p.endpoint.host, p.endpoint.port) for p in s.peers}
        if not self.holders or (self.feeders is not None and not self.feeders.feeding):
            return bool(connected)
        # A holder listed is not yet one whose bitfield arrived (libtorrent lists a
        # peer it is still connecting to): until then every piece looks like one nobody
        # has, and the grace period would run out on the handshake.
        return bool(self.holders & connected) and min(s.availability, default=0) > 0

    def _run(self, now: float, out: list[Action]) -> None:
        self.phase = Phase.RUNNING
        self.policy = pol.DownloadPolicy(
            self.num_pieces,
            now,
            self.config.policy,
            have=[i for i, h in enumerate(self._have) if h],
        )
        early, self._early = self._early, []
        for event in early:
            self._to_policy(event, now, out)

    def _finish(self, outcome: Finished | Failed, out: list[Action]) -> None:
        if self.outcome is not None:
            return
        self.phase = Phase.OVER
        self.outcome = outcome
        out.append(outcome)

    def _look_now(self, now: float) -> None:
        self._sample_at = min(self._sample_at, now)

    # -- helpers --

    def _take_have(self, have: tuple[bool, ...], now: float, out: list[Action]) -> None:
        """Pieces libtorrent has that no event told of (before the policy ran, or
        events were lost): count them, and tell the policy."""
        for i, h in enumerate(have):
            if h and not self._have[i]:
                self._have[i] = True
                self.progress.done += self.piece_length(i)
                if self.policy is not None:
                    self._to_policy(pol.PieceDone(i, pol.Origin.PEER), now, out)
        self._follow(now, out)

    def _prefix_bytes(self) -> int:
        """Bytes of the blob had in order from its start (pieces passed their check)."""
        while self._prefix < self.num_pieces and self._have[self._prefix]:
            self._prefix += 1
        return min(self.size, self._prefix * self.piece_size)

    def _flush(self, ready: int, out: list[Action]) -> None:
        self._flushed = ready
        self._starved = False  # until it says it waits again
        self._stream_at = None
        out.append(FlushForReaders(ready))

    def _flush_for_reader(self, out: list[Action]) -> None:
        ready = self._prefix_bytes()
        if self._starved and ready > max(self._flushed, self._wanted):
            self._flush(ready, out)

    def _follow(self, now: float, out: list[Action]) -> None:
        """The in-order prefix grew (or swarming starts): flush it for the caller's
        hash once it grew by ``hash_step`` (for a waiting reader: ``stream_step``, or
        ``stream_delay`` after it first grew), and prefer the pieces right after it."""
        if self.phase is Phase.CHECKING:
            return
        if not self._watching_end and self.size - self.progress.done < self.config.end_watch:
            self._watching_end = True
            out.append(WatchTheEnd())
        ready = self._prefix_bytes()
        grown = ready - self._flushed
        for_reader = self._starved and ready > self._wanted
        # All of it had: the caller flushes and hashes the rest once it is Finished.
        if ready < self.size and grown > 0:
            if (self.follow_prefix and grown >= self.config.hash_step) or (
                for_reader and grown >= self.config.stream_step
            ):
                self._flush(ready, out)
            elif for_reader and self._stream_at is None:
                self._stream_at = now + self.config.stream_delay
        if not self.follow_prefix or self._in_order:
            return  # (in order, the pieces after the prefix come next anyway)
        window = -(-self.config.prefer_window // self.piece_size)
        end = min(self.num_pieces, self._prefix + window)
        start = max(self._preferred, self._prefix)
        if end > start:
            self._preferred = end
            pending = [i for i in range(start, end) if not self._have[i]]
            # Another feeder's pieces stay at the default, lowered like the stripe's
            # (`_restripe`): preferred again once they begin to come (`_on_sample`).
            coming = self._coming | self._received.keys()
            pieces = tuple(i for i in pending if self._mine(i) or i in coming)
            self._lowered.update(i for i in pending if not self._mine(i) and i not in coming)
            if pieces:
                out.append(PreferPieces(pieces))

    def _mine(self, piece: int) -> bool:
        """Whether this download prefers ``piece``: all of them, unless it is a striped
        feeder (then its stripe)."""
        return self._stripe is None or piece % self._stripe[1] == self._stripe[0]

    def _restripe(self, now: float, out: list[Action], again: bool = False) -> None:
        """The feeder's stripe changed (or ``again``: the torrent is new to libtorrent):
        of the pieces preferred so far, its stripe stays preferred and the others go
        back to the default, so that it asks the holders for its stripe first and
        takes the others from the other feeders (`FeederChoice.stripe`)."""
        stripe = self.feeders.stripe if self.feeders is not None else None
        if stripe == self._stripe and not (again and stripe is not None):
            return
        self._stripe = stripe
        self._lowered.clear()
        if self.phase is Phase.CHECKING or self._in_order or not self.follow_prefix:
            return  # (in order: no priorities; `_follow` stripes what it prefers later)
        pending = [i for i in range(self._prefix, self._preferred) if not self._have[i]]
        own = tuple(i for i in pending if self._mine(i))
        # A piece already coming stays preferred: lowered, its missing blocks waited
        # behind the stripe, fell under the policy's floor rate and went to the mirror.
        coming = self._coming | self._received.keys()
        other = tuple(i for i in pending if not self._mine(i) and i not in coming)
        if own:
            out.append(PreferPieces(own))
        if other:
            self._lowered.update(other)
            out.append(LowerPieces(other))

    def _resolve_blame(self, peers: tuple[PeerSample, ...], now: float, out: list[Action]) -> None:
        """The peer whose hash-failure count went up is the sender, if exactly one did."""
        if not self._blame:
            return
        culprits = []
        for p in peers:
            key = str(p.endpoint)
            if p.hashfails > self._hashfails.get(key, 0):
                self._hashfails[key] = p.hashfails
                culprits.append(key)
        pieces, self._blame = self._blame, []
        for k, (piece, origin) in enumerate(pieces):
            sender = culprits[0] if len(culprits) == 1 and k == 0 else None
            self._to_policy(pol.PieceHashFailed(piece, origin, sender), now, out)

    def _feed_policy(self, s: SwarmSample, now: float, out: list[Action]) -> None:
        received: dict[int, int] = {}  # progressed pieces: their bytes so far
        for piece, blocks in s.partial:
            if blocks > self._received.get(piece, 0):
                self._received[piece] = blocks
                received[piece] = min(blocks * BLOCK, self.piece_length(piece))
        if len(s.availability) == self.num_pieces:
            # One event: the policy must not decide on fresh progress and stale holders.
            sizes = tuple(sorted(received.items()))
            self._to_policy(pol.Availability(s.availability, frozenset(received), sizes), now, out)
            return
        for piece, nbytes in sorted(received.items()):
            self._to_policy(pol.PieceProgress(piece, nbytes), now, out)
        self._to_policy(pol.Tick(), now, out)

    def _feeder_action(
        self, action: DropHolders | ConnectHolders | None, now: float, out: list[Action]
    ) -> None:
        if action is None:
            return
        away = len(self.holders) if isinstance(action, DropHolders) else 0
        self._to_policy(pol.HoldersAway(away), now, out)
        out.append(action)

    def _on_rejoined(self, now: float, out: list[Action]) -> None:
        """The torrent is new to libtorrent: what it was told is told again."""
        self._received.clear()
        self._coming = frozenset()
        self._lowered.clear()  # (told again below)
        self._asked.clear()
        # Its peers' hash-failure counts start again from 0: a failure after the rejoin
        # must be seen as a rise (the policy keeps what each peer was blamed for).
        self._hashfails.clear()
        self._reconcile = True
        self._look_now(now)
        if self._in_order:
            out.append(InOrder(True))
        else:
            self._preferred = 0
            self._follow(now, out)
            self._restripe(now, out, again=True)  # (resume data may carry priorities)

    def _to_policy(self, event: pol.Event, now: float, out: list[Action]) -> None:
        if self.policy is None:
            self._early.append(event)
            return
        if self.outcome is not None:
            return
        for d in self.policy.handle(event, now):
            if isinstance(d, pol.FetchFromMirror):
                first_stalled = len(d.pieces) - d.stalled
                out += [FeedMirrorPiece(i, k >= first_stalled) for k, i in enumerate(d.pieces)]
            elif isinstance(d, pol.CancelMirror):
                out += [CancelMirrorPiece(i) for i in d.pieces]
            elif isinstance(d, pol.BanPeer):
                out.append(BanHost(host_of(d.peer), d.peer, d.reason))
            elif isinstance(d, pol.Done):
                self._finish(Finished(), out)
            elif isinstance(d, pol.Failed):
                self._finish(Failed(d.reason), out)

    def _feed_readers(self, r: Readers, now: float, out: list[Action]) -> None:
        """A reader came or waits: make the checked prefix readable for it (flushed to
        the file: now if ``stream_step`` of it is there, else once it is, or after
        ``stream_delay``), have pieces picked in order, and, for a reader past the
        in-order prefix (a Range), ask peers for the pieces just after where it is."""
        self._readers = r.count
        if not self.streaming or self.phase is Phase.CHECKING or r.count == 0:
            self._starved = False
            self._stream_at = None
            if self._in_order and r.count == 0:  # back to rarest first, for the swarm
                self._in_order = False
                self._preferred = 0  # (`InOrder` reset the priorities: prefer anew)
                out.append(InOrder(False))
                self._follow(now, out)
                self._restripe(now, out, again=True)
            return
        if not self._in_order:
            self._in_order = True
            self._lowered.clear()  # (every piece back at the default)
            out.append(InOrder(True))
        self._flushed = max(self._flushed, r.ready)
        self._starved = r.waiting > 0
        self._wanted = r.read_pos
        ready = self._prefix_bytes()
        if self._starved and ready > max(self._flushed, r.read_pos):
            if ready - self._flushed >= self.config.stream_step or r.ready == 0:
                self._flush(ready, out)  # (the first bytes: at once)
            elif self._stream_at is None:
                self._stream_at = now + self.config.stream_delay
        first = r.read_pos // self.piece_size
        if first <= self._prefix:
            # At the in-order prefix, picking in order asks for its next pieces already;
            # deadlines there (time-critical mode) only shuffled them (benchmarks/
            # lt_order.py: the first 16 in random order, the very first 5x later).
            return
        last = min(self.num_pieces, first + self.config.readahead)
        for k, i in enumerate(range(first, last)):
            if not self._have[i] and i not in self._asked:
                self._asked.add(i)
                out.append(SetPieceDeadline(i, self.config.deadline_step_ms * (k + 1)))
