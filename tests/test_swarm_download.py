"""The pure swarm driver, driven by a fake swarm (scripted events and state) and a fake
clock, like the policy in test_scheduling_policy.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from peer.scheduling.policy import PolicyConfig
from peer.transfer import events as ev
from peer.transfer.swarm_download import (
    Action,
    BanHost,
    CancelMirrorPiece,
    ConnectPeer,
    Failed,
    FeedMirrorPiece,
    Finished,
    FlushForReaders,
    InOrder,
    Input,
    MirrorPieceError,
    MirrorPieceFed,
    PeerSample,
    Phase,
    PreferPieces,
    Readers,
    ReadersChanged,
    Rejoined,
    SetPieceDeadline,
    StartSwarming,
    SwarmDownload,
    SwarmDownloadConfig,
    SwarmSample,
    TakeSample,
    Wake,
    WatchTheEnd,
)

T0 = 500.0
IH = "ab" * 32
PIECE = 1024
SEED = ev.Endpoint("10.0.0.2", 6881)
OTHER = ev.Endpoint("10.0.0.3", 6881)
HOLDER = frozenset({(SEED.host, SEED.port)})  # the one peer offering the whole blob


@dataclass
class FakeSwarm:
    """What libtorrent would report when sampled; tests change it as the story goes."""

    n: int
    state: str = "downloading"
    finished: bool = False
    have: set[int] = field(default_factory=set)
    peers: dict[ev.Endpoint, int] = field(default_factory=dict)  # -> hash failures
    holders: dict[int, int] = field(default_factory=dict)  # piece -> availability
    partial: dict[int, int] = field(default_factory=dict)  # piece -> blocks received

    def sample(self, peers: bool = True) -> SwarmSample:
        return SwarmSample(
            state=self.state,
            is_finished=self.finished,
            have=tuple(i in self.have for i in range(self.n)),
            availability=tuple(self.holders.get(i, 0) for i in range(self.n)),
            partial=tuple(sorted(self.partial.items())),
            peers=tuple(PeerSample(e, f) for e, f in self.peers.items()) if peers else (),
        )


class Run:
    """A driver, a fake swarm and a fake clock; answers every TakeSample at once (as
    the fetch loop does) and records every other action."""

    def __init__(
        self,
        n: int = 4,
        *,
        size: int | None = None,
        holders: frozenset[tuple[str, int]] = frozenset(),
        streaming: bool = False,
        driver: dict[str, Any] | None = None,
        piece_size: int = PIECE,
        **policy: object,
    ) -> None:
        self.now = T0
        self.swarm = FakeSwarm(n)
        cfg = SwarmDownloadConfig(
            policy=PolicyConfig(**policy),  # type: ignore[arg-type]
            **{"end_watch": 0, **(driver or {})},  # (its own test gives one)
        )
        self.drv = SwarmDownload(
            size if size is not None else n * piece_size - 100,
            piece_size,
            n,
            self.now,
            cfg,
            holders=holders,
            streaming=streaming,
        )
        self.samples = 0
        self.asked: list[bool] = []  # each TakeSample's `peers`
        self.log: list[tuple[float, Action]] = []

    def at(self, t: float, item: Input | None = None) -> list[Action]:
        """Advance to T0 + t and deliver ``item`` (a Wake by default); then, as the
        fetch loop does once no other input waits, a Wake if one is due."""
        assert T0 + t >= self.now, "the fake clock only moves forward"
        self.now = T0 + t
        todo = list(self.drv.handle(item or Wake(), self.now))
        wake = self.drv.next_wakeup()
        if item is not None and wake is not None and wake <= self.now:
            todo += self.drv.handle(Wake(), self.now)
        done: list[Action] = []
        while todo:
            a = todo.pop(0)
            if isinstance(a, TakeSample):
                self.samples += 1
                self.asked.append(a.peers)
                todo += self.drv.handle(self.swarm.sample(a.peers), self.now)
            else:
                done.append(a)
        self.log += [(self.now, a) for a in done]
        return done

    def until(self, t: float, readers: Readers | None = None) -> list[Action]:
        """Wake the driver at each `next_wakeup` up to T0 + t, as the fetch loop would."""
        out: list[Action] = []
        while (wake := self.drv.next_wakeup()) is not None and wake <= T0 + t:
            out += self.at(max(wake, self.now) - T0, Wake(readers))
        self.now = max(self.now, T0 + t)
        return out

    def running(self, t: float = 0.0) -> None:
        """Through the check and the settle: a peer connects at once."""
        assert self.at(t) == [StartSwarming()]
        self.swarm.peers[SEED] = 0
        self.at(t, ev.PeerConnected(IH, SEED))
        assert self.drv.phase is Phase.RUNNING

    def done(self, t: float, piece: int, *, mirror: bool = False) -> list[Action]:
        self.swarm.have.add(piece)
        self.swarm.partial.pop(piece, None)
        return self.at(t, ev.PieceFinished(IH, piece, fed_by_us=mirror))


def fed(actions: list[Action]) -> list[int]:
    return [a.piece for a in actions if isinstance(a, FeedMirrorPiece)]


# --- the happy path --------------------------------------------------------------------------


def test_peers_deliver_every_piece() -> None:
    r = Run(4)
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.running()
    for i in range(3):
        assert r.done(0.1 * (i + 1), i) == []
    assert r.done(0.4, 3) == [Finished()]
    assert r.drv.outcome == Finished()
    assert r.drv.next_wakeup() is None
    assert r.drv.progress.done == 4 * PIECE - 100  # the last piece is short
    assert r.drv.progress.resumed == r.drv.progress.from_mirror == 0
    assert not fed([a for _, a in r.log])
    assert r.at(1.0, ev.PieceFinished(IH, 0, fed_by_us=False)) == []  # over: ignored


def test_what_the_check_finds_counts_as_resumed_and_peers_wait_for_it() -> None:
    r = Run(4, holders=HOLDER)
    r.swarm.state = "checking_files"
    assert r.at(0) == []
    r.swarm.have = {0, 1}
    assert r.at(0.2, ev.StateChanged(IH, "checking_files", "queued_for_checking")) == []
    assert r.drv.phase is Phase.CHECKING
    r.swarm.state = "downloading"
    assert r.at(0.3, ev.TorrentChecked(IH)) == [StartSwarming()]
    assert r.drv.progress.resumed == r.drv.progress.done == 2 * PIECE
    r.swarm.peers[SEED] = 0
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.at(0.4, ev.PeerConnected(IH, SEED))
    assert r.drv.policy is not None and r.drv.policy.done_pieces == {0, 1}
    r.done(0.5, 2)
    assert r.done(0.6, 3) == [Finished()]
    assert r.drv.progress.resumed == 2 * PIECE  # still: peers' pieces are not resumed


def test_a_download_found_complete_on_disk_finishes_without_peers() -> None:
    r = Run(2)
    r.swarm.have, r.swarm.finished = {0, 1}, True
    assert r.at(0) == [Finished()]
    assert r.drv.progress.resumed == 2 * PIECE - 100


def test_libtorrent_finishing_ends_it_even_if_piece_events_were_lost() -> None:
    r = Run(3)
    r.running()
    assert r.at(0.1, ev.EventsDropped(5)) == []
    r.swarm.have, r.swarm.finished = {0, 1, 2}, True
    samples = r.samples
    assert r.at(0.1, ev.TorrentFinished(IH)) == [Finished()]  # a look at once says so
    assert r.samples == samples + 1
    assert r.drv.progress.done == 3 * PIECE - 100


# --- the settle phase ------------------------------------------------------------------------


def test_settle_ends_when_the_holders_are_connected() -> None:
    r = Run(4, holders=HOLDER)
    assert r.at(0) == [StartSwarming()]
    r.swarm.peers[OTHER] = 0  # a peer, but not one that holds the whole blob
    r.at(0.1, ev.PeerConnected(IH, OTHER))
    r.until(1.0)
    assert r.drv.phase is Phase.SETTLING and r.drv.policy is None
    r.swarm.peers[SEED] = 0
    r.at(1.2, ev.PeerConnected(IH, SEED))
    assert r.drv.phase is Phase.SETTLING  # connecting: its bitfield is not in yet
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.until(1.5)
    assert r.drv.phase is Phase.RUNNING
    assert r.drv.policy is not None and r.drv.policy.start == T0 + 1.45  # grace from here


def test_without_holders_any_connected_peer_ends_the_settle() -> None:
    r = Run(4)
    r.at(0)
    r.swarm.peers[OTHER] = 0
    r.at(0.3, ev.PeerConnected(IH, OTHER))
    assert r.drv.phase is Phase.RUNNING


def test_settle_ends_after_five_seconds_whoever_is_connected() -> None:
    r = Run(4, holders=HOLDER, grace_period=2.0)
    r.at(0)
    r.until(4.99)
    assert r.drv.phase is Phase.SETTLING
    wake = r.drv.next_wakeup()
    assert wake is not None and wake <= T0 + 5.0
    r.until(5.0)
    assert r.drv.phase is Phase.RUNNING
    assert r.drv.policy is not None and r.drv.policy.start == T0 + 5.0


# --- the mirror --------------------------------------------------------------------------------


def test_a_stalled_piece_goes_to_the_mirror_after_the_stall_timeout() -> None:
    r = Run(4, grace_period=1.0, stall_timeout=3.0, mirror_parallel=2)
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.running()
    for i in range(3):
        r.done(0.5, i)
    r.swarm.partial[3] = 1  # piece 3 got a block at 1.0, then nothing
    assert r.until(1.0) == []
    assert not fed(r.until(3.9))
    out = r.until(4.0)
    assert fed(out) == [3]
    assert [a.stalled for a in out if isinstance(a, FeedMirrorPiece)] == [True]  # for the log
    assert r.drv.policy is not None and r.drv.policy.mirror_in_flight == {3}
    assert r.at(4.5, MirrorPieceFed(3, PIECE - 100, ok=True)) == []
    assert r.done(4.5, 3, mirror=True) == [Finished()]
    assert r.drv.progress.from_mirror == PIECE - 100


def test_the_mirror_piece_that_ends_the_download_counts_as_the_mirrors() -> None:
    """libtorrent's verdict on a fed piece comes before `feed_piece` returns: the last
    piece finishes the download before its `MirrorPieceFed`, which the finished driver
    ignores. It counted nowhere (an 8 MiB download from a trickling holder: 7 MiB from
    the mirror, 0 from peers); a fed piece a peer completed first counted as the
    mirror's."""
    r = Run(3, grace_period=0.0, stall_timeout=1.0, mirror_parallel=3)
    r.running()  # nobody has anything: every piece goes to the mirror
    assert sorted(fed([a for _, a in r.log])) == [0, 1, 2]
    r.done(0.1, 0, mirror=True)
    r.at(0.1, MirrorPieceFed(0, PIECE, ok=True))
    r.done(0.2, 1)  # a peer's copy won the race
    r.at(0.2, MirrorPieceFed(1, PIECE, ok=True))
    assert r.done(0.3, 2, mirror=True) == [Finished()]
    r.at(0.3, MirrorPieceFed(2, PIECE - 100, ok=True))
    assert r.drv.progress.from_mirror == PIECE + PIECE - 100


def test_a_piece_trickled_below_the_floor_rate_goes_to_the_mirror() -> None:
    """libtorrent's blocks of a piece in flight reach the policy as bytes (16 KiB each):
    a holder sending one block of piece 3 every 2 s (8 KiB/s) keeps it alive for the
    stall rule, but it falls behind the floor rate (512 KiB/s after stall_timeout of
    credit) and the mirror races it. Before, the trickle held it: 1 MiB takes 128 s."""
    r = Run(4, piece_size=1 << 20, grace_period=1.0, stall_timeout=3.0, mirror_parallel=2)
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.running()
    for i in range(3):
        r.done(0.5, i)
    t, out = 1.0, []
    while t < 30 and not fed(out):
        r.swarm.partial[3] = r.swarm.partial.get(3, 0) + 1
        out = r.until(t + 1.99)
        t += 2.0
    assert fed(out) == [3] and [a.stalled for a in out if isinstance(a, FeedMirrorPiece)] == [True]
    # its first block seen at 1.0, its credit 3 s, then its blocks (16 KiB: 1/32 s) at the floor
    assert T0 + 4.0 < r.log[-1][0] <= T0 + 4.2


def test_a_piece_that_failed_its_check_is_judged_by_the_floor_rate_when_it_comes_again() -> None:
    """Piece 7 came whole from two peers and failed its check (nobody to blame); then
    libtorrent starts it again from its first block, and a holder trickles it (one
    block every 2 s) while the other pieces keep coming. Its new blocks are progress
    (from 0 again), so the floor rate sends it to the mirror within stall_timeout and
    a few blocks; before, they counted only past the 64 blocks of the failed copy, so
    the piece waited for the trickle for as long as other pieces came."""
    r = Run(8, piece_size=1 << 20, grace_period=1.0, stall_timeout=3.0, mirror_parallel=2)
    r.swarm.holders = dict.fromkeys(range(8), 1)
    r.running()
    r.swarm.partial[7] = 64  # all of it, seen by the look a new peer brings
    r.at(0.5, ev.PeerConnected(IH, OTHER))
    r.swarm.peers = {SEED: 1, OTHER: 1}
    r.swarm.partial.pop(7)
    r.at(1.0, ev.HashFailed(IH, 7, fed_by_us=False))
    t, out = 2.0, []
    for i in range(7):
        r.swarm.partial[7] = r.swarm.partial.get(7, 0) + 1
        out += r.until(t - 0.01)
        out += r.at(t)
        out += r.done(t + 0.5, i)
        t += 2.0
    assert fed(out) == [7], out
    first = next(when for when, a in r.log if isinstance(a, FeedMirrorPiece))
    assert first <= T0 + 2.0 + 3.0 + 0.5, first - T0


def test_a_mirror_piece_that_fails_is_tried_again_and_a_peer_may_win() -> None:
    r = Run(2, grace_period=0.0, stall_timeout=1.0, backoff_base=0.5)
    r.running()  # nobody has anything: both pieces go to the mirror once the grace ends
    assert sorted(fed([a for _, a in r.log])) == [0, 1]
    assert not [a for _, a in r.log if isinstance(a, FeedMirrorPiece) and a.stalled]
    assert r.at(0.2, MirrorPieceError(0, "503")) == []
    assert fed(r.until(0.7)) == [0]  # after the backoff
    r.swarm.holders = {1: 1}
    assert r.done(0.8, 1) == [CancelMirrorPiece(1)]  # a peer was faster


def test_without_a_mirror_a_stalled_piece_waits_for_peers() -> None:
    """local/*: no mirror exists; a stalled piece must not be sent to one."""
    r = Run(4, grace_period=1.0, stall_timeout=3.0, mirror_enabled=False)
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.running()
    for i in range(3):
        r.done(0.5, i)
    r.swarm.partial[3] = 1
    assert r.until(100.0) == []  # stalled for long: still waiting for its holder
    assert r.drv.outcome is None
    assert r.done(101.0, 3) == [Finished()]
    assert r.drv.progress.from_mirror == 0


def test_without_a_mirror_a_piece_nobody_has_fails_the_download_clearly() -> None:
    r = Run(4, grace_period=1.0, stall_timeout=3.0, mirror_enabled=False)
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.running()
    for i in range(3):
        r.done(0.5, i)
    r.swarm.peers.clear()  # the only holder of piece 3 leaves
    r.swarm.holders = {}
    assert r.at(0.6, ev.PeerDisconnected(IH, SEED, "closed")) == []
    out = r.until(100.0)
    assert len(out) == 1 and isinstance(out[0], Failed)
    assert "no mirror" in out[0].reason and "piece 3" in out[0].reason
    assert r.log[-1][0] == T0 + 4.0  # the grace period (1 s), then the stall timeout
    assert not fed([a for _, a in r.log])
    assert r.drv.next_wakeup() is None


def test_a_holder_that_closed_the_connection_is_dialled_again_at_once_not_too_often() -> None:
    """A seeder drops every peer of a torrent that turns shared (they learn its request
    bound in a new handshake): the download dials it again at once, not at libtorrent's
    next connect round; at most once per `redial_gap`; never a peer that is no holder
    (libtorrent's own business), nor a banned one."""
    r = Run(4, holders=HOLDER)
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.running()
    closed = ev.PeerDisconnected(IH, SEED, "closed")
    assert ConnectPeer(SEED.host, SEED.port) in r.at(0.5, closed)
    assert ConnectPeer(SEED.host, SEED.port) not in r.at(1.0, closed)  # within the gap
    assert ConnectPeer(SEED.host, SEED.port) in r.at(2.6, closed)
    assert not any(
        isinstance(a, ConnectPeer) for a in r.at(2.7, ev.PeerDisconnected(IH, OTHER, "closed"))
    )
    r.swarm.peers[SEED] = 1
    r.at(3.0, ev.HashFailed(IH, 1, fed_by_us=False))  # the seeder sent a bad piece: banned
    assert not any(isinstance(a, ConnectPeer) for a in r.at(5.0, closed))


# --- bad data ------------------------------------------------------------------------------------


def test_a_bad_piece_from_one_peer_bans_that_host() -> None:
    r = Run(4)
    r.running()
    r.swarm.peers[OTHER] = 0
    r.at(0.1, ev.PeerConnected(IH, OTHER))
    r.swarm.peers[OTHER] = 1  # libtorrent counted the failure against it
    samples = r.samples
    out = r.at(0.2, ev.HashFailed(IH, 1, fed_by_us=False))
    assert r.drv.progress.hash_failures == 1
    assert r.samples == samples + 1  # the sender shows in a sample, taken at once
    assert [a for a in out if isinstance(a, BanHost)] == [
        BanHost("10.0.0.3", str(OTHER), "sent piece 1, which failed its hash check")
    ]
    assert r.drv.policy is not None and str(OTHER) in r.drv.policy.banned


def test_after_a_rejoin_a_bad_piece_is_blamed_on_its_sender_again() -> None:
    """Two peers failed a piece together (nobody blamed), then the torrent was added
    again (`Rejoined`: libtorrent's per-peer counts start from 0): the next bad piece
    from one of them is blamed on it, though its count (1) is no higher than before."""
    r = Run(4)
    r.running()
    r.swarm.peers = {SEED: 1, OTHER: 1}
    r.at(0.2, ev.HashFailed(IH, 1, fed_by_us=False))
    r.at(0.3, Rejoined())
    r.swarm.peers = {SEED: 0, OTHER: 1}
    out = r.at(0.5, ev.HashFailed(IH, 2, fed_by_us=False))
    assert [a for a in out if isinstance(a, BanHost)] == [
        BanHost("10.0.0.3", str(OTHER), "sent piece 2, which failed its hash check")
    ]


def test_a_bad_piece_nobody_can_be_blamed_for_bans_nobody() -> None:
    r = Run(4)
    r.running()
    r.swarm.peers = {SEED: 1, OTHER: 1}  # two senders: no way to tell
    out = r.at(0.2, ev.HashFailed(IH, 1, fed_by_us=False))
    assert not [a for a in out if isinstance(a, BanHost)]
    assert r.drv.policy is not None and not r.drv.policy.banned


def test_the_peer_list_is_read_only_to_settle_and_to_find_who_sent_a_bad_piece() -> None:
    r = Run(4, stall_timeout=30.0)
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.running()
    assert r.asked and all(r.asked)  # the check and the settle: who is connected
    r.asked.clear()
    r.until(5.0)
    assert len(r.asked) >= 4 and not any(r.asked)  # running: once a second, without
    r.swarm.peers[OTHER] = 1  # libtorrent counted the failure against it
    out = r.at(5.1, ev.HashFailed(IH, 1, fed_by_us=False))
    assert r.asked[-1] is True
    assert BanHost("10.0.0.3", str(OTHER), "sent piece 1, which failed its hash check") in out
    r.asked.clear()
    r.until(8.0)
    assert r.asked and not any(r.asked)


def test_a_piece_that_fails_while_a_sample_without_peers_is_out_is_blamed_on_the_next() -> None:
    r = Run(4, stall_timeout=30.0)
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.running()
    d = r.drv
    wake = d.next_wakeup()
    assert wake is not None
    asked = [a for a in d.handle(Wake(), wake) if isinstance(a, TakeSample)]
    assert asked == [TakeSample(peers=False)]
    r.swarm.peers[OTHER] = 1
    assert d.handle(ev.HashFailed(IH, 1, fed_by_us=False), wake) == ()
    # The sample asked before the failure comes back without the peers: no verdict yet,
    out = d.handle(r.swarm.sample(peers=False), wake)
    assert not [a for a in out if isinstance(a, BanHost)]
    assert d.next_wakeup() == wake  # ... but another look at once,
    assert d.handle(Wake(), wake) == (TakeSample(peers=True),)
    out = d.handle(r.swarm.sample(peers=True), wake)  # which tells who sent it
    assert [a for a in out if isinstance(a, BanHost)] == [
        BanHost("10.0.0.3", str(OTHER), "sent piece 1, which failed its hash check")
    ]


def test_a_peer_libtorrent_banned_is_banned_session_wide() -> None:
    r = Run(4)
    r.running()
    out = r.at(0.3, ev.PeerBanned(IH, OTHER))
    assert out == [BanHost(OTHER.host, str(OTHER), "sent corrupt data")]


def test_bad_mirror_data_is_not_held_against_peers() -> None:
    """The caller checks a mirror piece against its hash before feeding it: bad data
    is a `MirrorPieceError`, retried after the backoff, nobody banned."""
    r = Run(2, grace_period=0.0, backoff_base=0.5)
    r.running()
    assert sorted(fed([a for _, a in r.log])) == [0, 1]
    assert r.at(0.1, MirrorPieceError(0, "the mirror sent data that fails its hash")) == []
    assert r.drv.progress.hash_failures == 0 and r.drv.progress.from_mirror == 0
    assert fed(r.until(0.59)) == []
    assert fed(r.until(0.6)) == [0]
    assert r.drv.policy is not None and not r.drv.policy.banned


def test_a_fed_piece_spoiled_by_a_peers_blocks_bans_it_and_goes_again_at_once() -> None:
    """libtorrent's add_piece keeps the blocks peers already sent of a piece: a holder
    trickling wrong blocks, raced by the mirror, makes our (checked) copy fail. That is
    the holder's doing: it is banned and the piece is fetched again at once. Before, it
    counted as the mirror's failure (backoff, and 5 of them failed the download)."""
    r = Run(2, piece_size=1 << 20, grace_period=0.0, stall_timeout=3.0, backoff_base=0.5)
    r.swarm.holders = {0: 1, 1: 1}
    r.running()
    r.done(0.1, 1)
    t = 0.5
    while not fed([a for _, a in r.log]):
        r.swarm.partial[0] = r.swarm.partial.get(0, 0) + 1  # a wrong block every 2 s
        r.until(t + 1.99)
        t += 2.0
    r.swarm.peers[SEED] = 1  # libtorrent counted the failure against the trickler
    r.at(t, MirrorPieceFed(0, 1 << 20, ok=False))
    out = r.at(t, ev.HashFailed(IH, 0, fed_by_us=True))
    assert [a for a in out if isinstance(a, BanHost)] == [
        BanHost(SEED.host, str(SEED), "sent blocks of piece 0 that failed its hash check")
    ]
    assert fed(out) == [0]  # at once, not after a backoff
    assert r.drv.progress.hash_failures == 1


# --- timing --------------------------------------------------------------------------------------


def test_next_wakeup_is_honoured_nothing_happens_before_it() -> None:
    r = Run(6, grace_period=2.0, stall_timeout=4.0)
    r.swarm.holders = {0: 1}
    r.running()
    samples = r.samples
    wake = r.drv.next_wakeup()
    assert wake is not None and wake > r.now
    for t in (0.01, 0.2, 0.5, wake - T0 - 0.01):
        assert r.at(t) == []  # a Wake sent early: no action, not even a sample
    assert r.samples == samples
    out = r.at(wake - T0)
    assert r.samples == samples + 1
    # The policy's grace ends at 2.0: the pieces nobody has go to the mirror then, not
    # before, and the driver woke for it on its own.
    assert not fed(out + r.until(1.99))
    mirrored = fed(r.until(2.0))
    assert len(mirrored) == 4 and set(mirrored) <= {1, 2, 3, 4, 5}  # 4 at once, 0 has a holder


def test_at_the_end_of_the_grace_the_policy_decides_on_one_fresh_look() -> None:
    """Peers' bitfields arrive after the settle; the look at the grace's end carries both
    the new holders and the blocks received, and nothing goes to the mirror."""
    r = Run(4, grace_period=2.0, stall_timeout=5.0)
    r.running()  # connected, no bitfield yet: nobody has anything
    assert r.until(1.99) == []
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.swarm.partial = {0: 3, 1: 1}
    assert r.until(2.0) == []
    policy = r.drv.policy
    assert policy is not None and not policy.mirror_in_flight
    assert policy.view(0, r.now).complete_holders + policy.view(0, r.now).partial_holders == 1


def test_it_does_not_poll_while_the_policy_has_nothing_to_decide() -> None:
    r = Run(4, grace_period=1.0, stall_timeout=30.0)
    r.swarm.holders = dict.fromkeys(range(4), 1)
    r.running()
    r.until(10.0)
    assert r.samples <= 2 + 10  # the check, the settle, then at most one a second


# --- streaming readers --------------------------------------------------------------------------


def test_a_reader_waiting_at_the_start_gets_the_prefix_at_once_and_pieces_in_order() -> None:
    r = Run(40, streaming=True)
    r.swarm.holders = dict.fromkeys(range(40), 1)
    r.running()
    r.done(0.05, 0)
    r.done(0.05, 1)
    r.done(0.05, 3)
    assert r.until(0.5, Readers(0, 0, 0)) == []  # no reader: nothing to do
    out = r.at(0.55, ReadersChanged(Readers(1, 10, 0, waiting=1)))  # one comes, waits
    assert FlushForReaders(2 * PIECE) in out  # pieces 0 and 1; piece 2 is missing
    # At the in-order prefix: picked in order, no deadlines (they shuffle the pieces).
    assert InOrder(True) in out
    assert not [a for a in out if isinstance(a, SetPieceDeadline)]
    # A reader that sends what it has is not flushed for.
    later = r.until(0.9, Readers(1, PIECE, 2 * PIECE))
    assert not [a for a in later if isinstance(a, SetPieceDeadline | FlushForReaders)]


def test_a_waiting_reader_is_flushed_for_after_stream_step_or_stream_delay_never_polled() -> None:
    r = Run(40, streaming=True, driver={"stream_step": 4 * PIECE, "stream_delay": 0.1})
    r.swarm.holders = dict.fromkeys(range(40), 1)
    r.running()
    r.at(0.1, ReadersChanged(Readers(1, 0, 0, waiting=1)))  # nothing had yet
    assert r.drv.next_wakeup() > T0 + 0.5  # no reader poll: it waits for pieces
    assert r.done(1.0, 0) == []  # one piece: not worth a flush yet ...
    assert r.drv.next_wakeup() == pytest.approx(T0 + 1.1)
    assert r.at(1.1) == [FlushForReaders(PIECE)]  # ... until stream_delay passed
    r.at(1.15, ReadersChanged(Readers(1, PIECE, PIECE, waiting=1)))  # sent it, waits
    assert [r.done(1.2, i) for i in (1, 2, 3)] == [[], [], []]
    assert r.done(1.2, 4) == [FlushForReaders(5 * PIECE)]  # stream_step: at once
    assert r.drv.next_wakeup() > T0 + 1.5  # and no delayed flush left behind
    # A reader busy sending (not waiting) is not flushed for.
    r.at(1.25, ReadersChanged(Readers(1, 3 * PIECE, 5 * PIECE)))
    assert r.done(1.3, 5) == []
    assert r.drv.next_wakeup() > T0 + 1.5
    flushes = [a for _, a in r.log if isinstance(a, FlushForReaders)]
    assert flushes == [FlushForReaders(PIECE), FlushForReaders(5 * PIECE)]


def test_a_reader_past_the_prefix_gets_deadlines_but_no_flush_that_cannot_serve_it() -> None:
    r = Run(40, streaming=True, driver={"stream_step": PIECE})
    r.swarm.holders = dict.fromkeys(range(40), 1)
    r.running()
    for i in range(4):
        r.done(0.05, i)
    out = r.at(0.1, ReadersChanged(Readers(1, 10 * PIECE, 0, waiting=1)))
    assert not [a for a in out if isinstance(a, FlushForReaders)]
    assert [a.piece for a in out if isinstance(a, SetPieceDeadline)] == list(range(10, 26))
    for i in range(4, 10):
        assert r.done(0.2, i) == []  # the prefix reaches the reader's byte only with 10
    assert r.done(0.2, 10) == [FlushForReaders(11 * PIECE)]


def test_without_readers_the_driver_does_not_wake_for_them() -> None:
    r = Run(40, streaming=True)
    r.swarm.holders = dict.fromkeys(range(40), 1)
    r.running()
    r.done(0.05, 0)
    r.until(0.2, Readers(0, 0, 0))  # a look: nobody reads
    wakes = []
    while (wake := r.drv.next_wakeup()) is not None and wake <= T0 + 3.0:
        wakes.append(wake)
        r.at(wake - T0)
    assert len(wakes) <= 3 + 2  # the heartbeat (1 s)
    # A reader comes and waits: it is served at once, and not looked at again.
    assert FlushForReaders(PIECE) in r.at(3.05, ReadersChanged(Readers(1, 0, 0, waiting=1)))
    assert r.drv.next_wakeup() > T0 + 3.5
    r.at(3.1, ReadersChanged(Readers(0, 0, 0)))  # and goes
    assert r.drv.next_wakeup() > T0 + 3.5


def test_pieces_come_in_order_only_while_a_reader_streams() -> None:
    r = Run(40, streaming=True)
    r.swarm.holders = dict.fromkeys(range(40), 1)
    r.running()
    r.until(0.5, Readers(0, 0, 0))
    assert not [a for _, a in r.log if isinstance(a, InOrder)]  # nobody reads: rarest first
    assert InOrder(True) in r.at(0.6, ReadersChanged(Readers(1, 0, 0, waiting=1)))
    r.at(0.7, ReadersChanged(Readers(2, 0, 0, waiting=2)))
    r.done(0.8, 0)
    r.until(1.5, Readers(1, PIECE, PIECE, waiting=1))
    assert [a for _, a in r.log if isinstance(a, InOrder)] == [InOrder(True)]  # said once
    assert r.at(1.6, ReadersChanged(Readers(0, 0, PIECE))) == [InOrder(False)]
    assert InOrder(True) in r.at(1.7, ReadersChanged(Readers(1, 0, PIECE, waiting=1)))


def test_a_reader_there_before_swarming_has_pieces_in_order_from_the_first_request() -> None:
    r = Run(8, streaming=True)
    r.swarm.state = "checking_files"
    assert r.at(0, ReadersChanged(Readers(1, 0, 0, waiting=1))) == []  # still checking
    r.swarm.state = "downloading"
    out = r.at(0.3, ev.TorrentChecked(IH))
    assert out[:2] == [InOrder(True), StartSwarming()]  # before any peer is connected
    assert [a for _, a in r.log if isinstance(a, InOrder)] == [InOrder(True)]


def test_in_order_nothing_is_preferred_and_after_it_the_window_is_preferred_anew() -> None:
    r = follow_run(12, step=3, window=4)
    r.drv.streaming = True
    assert r.at(0) == [StartSwarming(), PreferPieces((0, 1, 2, 3))]
    assert InOrder(True) in r.at(0.1, ReadersChanged(Readers(1, 0, 0, waiting=1)))
    for i in range(4):
        r.done(0.2, i)
    preferred = [a for _, a in r.log if isinstance(a, PreferPieces)]
    assert preferred == [PreferPieces((0, 1, 2, 3))]  # in order: the window stays put
    # The reader goes: rarest first again, and the window after the prefix preferred
    # anew (InOrder reset every priority).
    assert r.at(0.3, ReadersChanged(Readers(0, 0, 4 * PIECE))) == [
        InOrder(False),
        PreferPieces((4, 5, 6, 7)),
    ]


def test_a_download_nobody_streams_never_asks_for_order() -> None:
    r = Run(8)  # not streaming (the CLI's download): readers are not its business
    r.swarm.holders = dict.fromkeys(range(8), 1)
    r.running()
    r.at(0.1, ReadersChanged(Readers(1, 0, 0, waiting=1)))
    r.until(1.0, Readers(1, 0, 0, waiting=1))
    assert not [a for _, a in r.log if isinstance(a, InOrder)]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        SwarmDownload(10 * PIECE, PIECE, 3, T0)  # 3 pieces cannot hold it
    with pytest.raises(TypeError):
        Run().drv.handle("tick", T0)  # type: ignore[arg-type]


# --- the whole-file hash following the in-order prefix -------------------------------------------


def follow_run(n: int, *, step: int, window: int) -> Run:
    r = Run(n)
    r.drv = SwarmDownload(
        n * PIECE - 100,
        PIECE,
        n,
        r.now,
        SwarmDownloadConfig(hash_step=step * PIECE, prefer_window=window * PIECE, end_watch=0),
        follow_prefix=True,
    )
    r.swarm.holders = dict.fromkeys(range(n), 1)
    return r


def test_the_prefix_is_flushed_for_the_hash_as_it_grows_in_steps() -> None:
    r = follow_run(12, step=3, window=4)
    assert r.at(0) == [StartSwarming(), PreferPieces((0, 1, 2, 3))]
    r.swarm.peers[SEED] = 0
    r.at(0, ev.PeerConnected(IH, SEED))
    # Out of order: 2 and 1 land first, nothing is in order yet.
    assert r.done(0.1, 2) == []
    assert r.done(0.2, 1) == []
    # 0 lands: the prefix is 0-2 (3 pieces = one step): flushed; the window moves on.
    assert r.done(0.3, 0) == [FlushForReaders(3 * PIECE), PreferPieces((4, 5, 6))]
    # Pieces after a hole are not flushed for the hash, nor preferred twice.
    assert r.done(0.4, 5) == []
    assert r.done(0.5, 4) == []  # prefix 0-2 + nothing: 3 is missing
    out = r.done(0.6, 3)  # prefix 0-5: 6 pieces, one more step
    assert out == [FlushForReaders(6 * PIECE), PreferPieces((7, 8, 9))]
    for i in (6, 7, 8, 9, 10):
        r.done(0.7 + i / 100, i)
    flushes = [a.ready for _, a in r.log if isinstance(a, FlushForReaders)]
    assert flushes == [3 * PIECE, 6 * PIECE, 9 * PIECE]
    # The last piece finishes it; the caller flushes and hashes the rest itself.
    assert r.done(1.0, 11) == [Finished()]
    preferred = [p for _, a in r.log if isinstance(a, PreferPieces) for p in a.pieces]
    assert sorted(preferred) == list(range(12)) and len(set(preferred)) == 12


def test_resumed_pieces_count_for_the_prefix_once_swarming_starts() -> None:
    r = follow_run(8, step=2, window=2)
    r.swarm.state = "checking_files"
    r.swarm.have = {0, 1, 2, 5}
    assert r.at(0) == []  # while libtorrent checks, nothing is flushed or preferred
    r.swarm.state = "downloading"
    out = r.at(0.3, ev.TorrentChecked(IH))
    assert out == [StartSwarming(), FlushForReaders(3 * PIECE), PreferPieces((3, 4))]
    assert r.drv.progress.resumed == 4 * PIECE


def test_without_follow_prefix_nothing_is_flushed_or_preferred() -> None:
    r = Run(8)
    r.swarm.holders = dict.fromkeys(range(8), 1)
    r.running()
    for i in range(7):
        r.done(0.1 * i, i)
    assert not [a for _, a in r.log if isinstance(a, FlushForReaders | PreferPieces)]


def test_a_drains_events_handled_together_act_as_one_by_one_and_stop_at_the_end() -> None:
    # The fetch loop hands the driver all the events of one alert drain at once
    # (`handle_all`): the same actions, in the same order, as one event at a time, and
    # nothing for what comes after the download finished.
    one, together = follow_run(8, step=3, window=4), follow_run(8, step=3, window=4)
    for r in (one, together):
        r.at(0)
        r.swarm.peers[SEED] = 0
        r.at(0, ev.PeerConnected(IH, SEED))
        r.swarm.have = set(range(8))
    drain: list[Input] = [ev.PieceFinished(IH, i, False) for i in (2, 1, 0, 4, 3, 5, 6, 7)]
    drain += [ev.PieceFinished(IH, 7, False), ev.PeerDisconnected(IH, SEED, "done")]
    expected = [a for item in drain for a in one.drv.handle(item, T0 + 1)]
    got = together.drv.handle_all(drain, T0 + 1)
    assert list(got) == expected
    assert got[0] == FlushForReaders(3 * PIECE) and got[-1] == Finished()
    assert together.drv.outcome == Finished()
    assert together.drv.next_wakeup() is None
    assert together.drv.handle_all([ev.PieceFinished(IH, 0, False)], T0 + 2) == ()


def test_the_end_of_a_download_is_watched_closely_once() -> None:
    # Once less than `end_watch` is left, the driver asks (once) for the swarm's events
    # at once: the last piece must not wait for an alert batch.
    r = Run(8, driver={"end_watch": 3 * PIECE})
    r.swarm.holders = dict.fromkeys(range(8), 1)
    r.running()
    assert [a for i in range(4) for a in r.done(0.1 * i, i)] == []  # 4 pieces - 100 B left
    assert r.done(0.5, 4) == [WatchTheEnd()]  # 3 pieces - 100 B left
    assert r.done(0.6, 5) == [] and r.done(0.7, 6) == []
    assert r.done(0.8, 7) == [Finished()]
    small = Run(2, driver={"end_watch": 16 << 20})  # all of it under end_watch: at once
    assert small.at(0) == [StartSwarming(), WatchTheEnd()]
