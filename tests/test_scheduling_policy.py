"""The pure scheduling policy, driven by scripted events and a fake clock."""

from __future__ import annotations

import math

import pytest

from peer.scheduling.policy import (
    Availability,
    BanPeer,
    CancelMirror,
    Decision,
    Done,
    DownloadPolicy,
    Event,
    Failed,
    FetchFromMirror,
    HoldersAway,
    MirrorPieceFailed,
    Origin,
    PeerBitfield,
    PeerGone,
    PeerHave,
    PieceDone,
    PieceHashFailed,
    PieceProgress,
    PieceView,
    PolicyConfig,
    Source,
    Tick,
    rank_sources,
)

PEER, MIRROR = Origin.PEER, Origin.MIRROR
T0 = 1000.0  # the clock does not start at zero


class Run:
    """A policy plus a fake clock; records every decision."""

    def __init__(self, num_pieces: int, **cfg: object) -> None:
        self.now = T0
        self.config = PolicyConfig(**cfg)  # type: ignore[arg-type]
        self.policy = DownloadPolicy(num_pieces, self.now, self.config)
        self.log: list[tuple[float, Decision]] = []

    def at(self, t: float, event: Event | None = None) -> tuple[Decision, ...]:
        """Advance to T0 + t and deliver ``event`` (a Tick by default)."""
        assert T0 + t >= self.now, "the fake clock only moves forward"
        self.now = T0 + t
        out = self.policy.handle(event or Tick(), self.now)
        self.log += [(self.now, d) for d in out]
        return out

    def mirrored(self, out: tuple[Decision, ...]) -> list[int]:
        return [p for d in out if isinstance(d, FetchFromMirror) for p in d.pieces]


def everything(n: int) -> frozenset[int]:
    return frozenset(range(n))


# --- the ranking function --------------------------------------------------------------------


def view(**kw: object) -> PieceView:
    base: dict[str, object] = dict(
        complete_holders=0,
        partial_holders=0,
        peers_stalled=False,
        peers_untrusted=False,
        in_grace=False,
        mirror_usable=True,
    )
    return PieceView(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        (
            dict(complete_holders=1, partial_holders=2),
            (Source.COMPLETE_PEER, Source.PARTIAL_PEER, Source.MIRROR, Source.AWAIT_PEERS),
        ),
        (dict(partial_holders=1), (Source.PARTIAL_PEER, Source.MIRROR, Source.AWAIT_PEERS)),
        ({}, (Source.MIRROR, Source.AWAIT_PEERS)),
        (dict(in_grace=True), (Source.AWAIT_PEERS, Source.MIRROR)),
        (
            dict(in_grace=True, complete_holders=1),
            (Source.COMPLETE_PEER, Source.MIRROR, Source.AWAIT_PEERS),
        ),
        (dict(complete_holders=1, peers_stalled=True), (Source.MIRROR, Source.AWAIT_PEERS)),
        (dict(partial_holders=3, peers_untrusted=True), (Source.MIRROR, Source.AWAIT_PEERS)),
        (dict(mirror_usable=False), (Source.AWAIT_PEERS,)),
        (
            dict(complete_holders=1, mirror_usable=False),
            (Source.COMPLETE_PEER, Source.AWAIT_PEERS),
        ),
    ],
)
def test_rank_sources(kw: dict[str, object], expected: tuple[Source, ...]) -> None:
    assert rank_sources(view(**kw)) == expected


# --- grace period and the basic fallback -------------------------------------------------------


def test_nothing_goes_to_the_mirror_during_the_grace_period() -> None:
    r = Run(8, grace_period=2.0, mirror_parallel=3)
    assert r.at(0) == ()
    assert r.policy.next_wakeup() == T0 + 2.0
    assert r.at(1.9) == ()
    out = r.at(2.0)
    assert len(r.mirrored(out)) == 3
    assert r.policy.mirror_in_flight == set(r.mirrored(out))


def test_pieces_peers_announce_during_grace_stay_with_peers() -> None:
    r = Run(6, grace_period=2.0, mirror_parallel=6)
    r.at(0)
    r.at(0.5, PeerBitfield("10.0.0.2:6881", frozenset({0, 1, 2})))
    r.at(1.0, PeerHave("10.0.0.3:6881", 5))
    out = r.at(2.0)
    assert sorted(r.mirrored(out)) == [3, 4]
    assert r.policy.best_source(0, r.now) is Source.PARTIAL_PEER
    assert r.policy.best_source(5, r.now) is Source.PARTIAL_PEER


def test_a_complete_peer_is_the_best_source() -> None:
    r = Run(4, stall_timeout=10.0)  # t=5 below: well within it
    r.at(0, PeerBitfield("seed", everything(4)))
    assert r.policy.best_source(2, r.now) is Source.COMPLETE_PEER
    assert r.mirrored(r.at(5)) == []


def test_mirror_in_flight_is_limited() -> None:
    r = Run(20, grace_period=0.0, mirror_parallel=4)
    out = r.at(0)
    first = r.mirrored(out)
    assert len(first) == 4
    # Each verdict frees exactly one slot.
    out = r.at(1, PieceDone(first[0], MIRROR))
    assert len(r.mirrored(out)) == 1
    out = r.at(2, MirrorPieceFailed(first[1], "HTTP 503"))
    assert len(r.mirrored(out)) == 1
    assert first[1] not in r.mirrored(out)  # it waits for its backoff
    # Never more than 4 in flight over a whole scripted run.
    t = 3.0
    while not r.policy.finished:
        inflight = sorted(r.policy.mirror_in_flight)
        assert 0 < len(inflight) <= 4
        r.at(t, PieceDone(inflight[0], MIRROR))
        t += 0.1
    assert isinstance(r.log[-1][1], Done)


def test_salt_spreads_agents_over_different_pieces() -> None:
    picks = []
    for salt in range(4):
        a = Run(64, grace_period=0.0, mirror_parallel=4, salt=salt)
        b = Run(64, grace_period=0.0, mirror_parallel=4, salt=salt)
        first = a.mirrored(a.at(0))
        assert first == b.mirrored(b.at(0))  # deterministic for one salt
        picks.append(frozenset(first))
    assert len(set(picks)) == 4


def test_pieces_nobody_has_go_to_the_mirror_before_stalled_ones() -> None:
    r = Run(6, grace_period=0.0, stall_timeout=5.0, mirror_parallel=2)
    out = r.at(0, PeerBitfield("p", frozenset({0, 1, 2, 3})))
    assert sorted(r.mirrored(out)) == [4, 5]
    assert [d.stalled for d in out if isinstance(d, FetchFromMirror)] == [0]  # nobody has them
    # Later the peer stalls: its pieces become candidates too.
    r.at(1, PieceDone(4, MIRROR))
    r.at(2, PieceDone(5, MIRROR))
    assert r.policy.mirror_in_flight == set()
    assert r.policy.next_wakeup() == T0 + 5.0
    out = r.at(5.0)
    assert len(r.mirrored(out)) == 2 and set(r.mirrored(out)) <= {0, 1, 2, 3}
    assert [d.stalled for d in out if isinstance(d, FetchFromMirror)] == [2]  # their peer quiet


# --- stalls ---------------------------------------------------------------------------------


def test_a_stalled_piece_goes_to_the_mirror_while_others_flow() -> None:
    r = Run(10, grace_period=1.0, stall_timeout=10.0)
    r.at(0, PeerBitfield("seed", everything(10)))
    r.at(1, PieceProgress(3))
    # The peer keeps delivering other pieces, but piece 3 never progresses again.
    for i, p in enumerate([0, 1, 2, 4, 5, 6, 7, 8]):
        out = r.at(2 + i, PieceDone(p, PEER))
        assert r.mirrored(out) == []
    assert r.at(10.9) == ()
    out = r.at(11.0)
    assert r.mirrored(out) == [3]
    # Piece 9 (never started, peer active recently) stays with the peer.
    assert r.policy.best_source(9, r.now) is Source.COMPLETE_PEER


def test_progress_keeps_a_slow_piece_with_peers() -> None:
    r = Run(2, grace_period=0.0, stall_timeout=5.0)
    r.at(0, PeerBitfield("seed", everything(2)))
    for t in range(1, 30, 2):
        assert r.mirrored(r.at(t, PieceProgress(0))) == []
        assert r.mirrored(r.at(t + 0.5, PieceProgress(1))) == []


def test_silent_peers_lose_everything_to_the_mirror() -> None:
    # Peers announce pieces but never deliver (e.g. they keep us choked).
    r = Run(3, grace_period=2.0, stall_timeout=10.0, mirror_parallel=8)
    r.at(0)
    r.at(4, PeerBitfield("mute", everything(3)))
    assert r.policy.next_wakeup() == T0 + 14.0  # 10 s after the pieces appeared
    assert r.mirrored(r.at(13.9)) == []
    assert sorted(r.mirrored(r.at(14.0))) == [0, 1, 2]


def test_peer_finishing_a_mirrored_piece_cancels_the_fetch() -> None:
    r = Run(3, grace_period=0.0, stall_timeout=1.0, mirror_parallel=1)
    r.at(0, PeerBitfield("seed", everything(3)))
    out = r.at(1.5)
    (p,) = r.mirrored(out)
    out = r.at(1.6, PieceDone(p, PEER))
    assert CancelMirror((p,)) in out
    assert p not in r.policy.mirror_in_flight
    # A late failure report for the cancelled fetch is ignored.
    assert not any(isinstance(d, Failed) for d in r.at(1.7, MirrorPieceFailed(p, "cancelled")))


# --- bad data ---------------------------------------------------------------------------------


def test_peer_sending_a_bad_piece_is_banned_and_the_piece_reopens() -> None:
    r = Run(4, grace_period=1.0, mirror_parallel=4)
    r.at(0, PeerBitfield("liar", everything(4)))
    r.at(0.5, PieceProgress(2))
    out = r.at(2, PieceHashFailed(2, PEER, peer="liar"))
    assert out[0] == BanPeer("liar", "sent piece 2, which failed its hash check")
    # Its pieces are gone with it, and nobody else has them: the mirror takes over.
    assert sorted(r.mirrored(out)) == [0, 1, 2, 3]
    assert r.policy.banned == {"liar"}
    # A banned peer's later announcements are ignored.
    r.at(3, PeerBitfield("liar", everything(4)))
    assert r.policy.view(0, r.now).complete_holders == 0


def test_anonymous_hash_failures_make_peers_untrusted_for_that_piece() -> None:
    r = Run(4, grace_period=0.0, peer_hash_failures_max=2)
    r.at(0, PeerBitfield("a", everything(4)))
    out = r.at(1, PieceHashFailed(1, PEER))  # libtorrent did not say who
    assert not any(isinstance(d, BanPeer) for d in out)
    assert r.mirrored(out) == []
    out = r.at(2, PieceHashFailed(1, PEER))
    assert r.mirrored(out) == [1]
    assert r.policy.best_source(0, r.now) is Source.COMPLETE_PEER


def test_mirror_failures_back_off_then_fail_the_download() -> None:
    r = Run(3, grace_period=0.0, mirror_parallel=3, mirror_max_failures=3, backoff_base=1.0)
    first = r.mirrored(r.at(0))
    assert sorted(first) == [0, 1, 2]
    assert r.mirrored(r.at(1, MirrorPieceFailed(1, "HTTP 500"))) == []
    assert r.policy.next_wakeup() == T0 + 2.0  # backoff 1 s
    assert r.mirrored(r.at(1.99)) == []
    assert r.mirrored(r.at(2.0)) == [1]
    # Bad data from the mirror counts as a failure too; backoff doubles.
    assert r.mirrored(r.at(2.5, PieceHashFailed(1, MIRROR))) == []
    assert r.mirrored(r.at(4.49)) == []
    assert r.mirrored(r.at(4.5)) == [1]
    out = r.at(5, MirrorPieceFailed(1, "connection reset"))
    failed = [d for d in out if isinstance(d, Failed)]
    assert failed and failed[0].piece == 1 and "connection reset" in failed[0].reason
    assert CancelMirror((0, 2)) in out  # the other fetches stop
    assert r.policy.failure == failed[0]
    assert r.at(6, PieceDone(0, MIRROR)) == ()  # terminal
    assert r.policy.next_wakeup() is None


def test_backoff_schedule() -> None:
    cfg = PolicyConfig(backoff_base=0.5, backoff_max=4.0)
    assert [cfg.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_mirror_fetch_without_answer_times_out() -> None:
    r = Run(1, grace_period=0.0, mirror_timeout=30.0, backoff_base=1.0)
    assert r.mirrored(r.at(0)) == [0]
    assert r.policy.next_wakeup() == T0 + 30.0
    out = r.at(30.0)
    assert CancelMirror((0,)) in out
    assert r.mirrored(out) == []
    assert r.mirrored(r.at(31.0)) == [0]


# --- peers coming and going ------------------------------------------------------------------


def test_losing_the_only_holder_sends_its_pieces_to_the_mirror() -> None:
    r = Run(4, grace_period=1.0, stall_timeout=5.0, mirror_parallel=4)
    r.at(0, PeerBitfield("a", frozenset({0, 1})))
    r.at(0, PeerBitfield("b", frozenset({1, 2, 3})))
    assert r.mirrored(r.at(1.0)) == []
    # A holder that vanished may come back (a seeder pausing its torrent to reconnect
    # its peers): its pieces count as held for stall_timeout, not the grace period.
    assert r.mirrored(r.at(2.0, PeerGone("a"))) == []
    # A banned one does not come back: its pieces go at once.
    out = r.at(3.0, PeerGone("b", banned=True))
    assert sorted(r.mirrored(out)) == [1, 2, 3]
    assert r.policy.banned == {"b"}
    assert r.mirrored(r.at(6.9)) == []
    assert r.mirrored(r.at(7.0)) == [0]  # a's piece: 5 s after a left


def test_anonymous_availability_counts() -> None:
    r = Run(3, grace_period=0.0)
    r.at(0, Availability((1, 1, 0)))
    assert r.policy.mirror_in_flight == {2}
    out = r.at(1, Availability((0, 1, 0)))
    assert r.mirrored(out) == []  # its holder left: held for stall_timeout
    assert r.mirrored(r.at(1 + r.config.stall_timeout - 0.01)) == [1]  # quiet since 0
    assert r.mirrored(r.at(1 + r.config.stall_timeout)) == [0]
    with pytest.raises(ValueError):
        r.at(99, Availability((1, 1)))


# --- completion and peer-only downloads ------------------------------------------------------


def test_done_once_when_every_piece_is_there() -> None:
    policy = DownloadPolicy(3, T0, PolicyConfig(), have=[0, 2])
    assert policy.handle(Tick(), T0) == ()
    assert policy.handle(PieceDone(1, PEER), T0 + 1) == (Done(),)
    assert policy.finished
    assert policy.handle(PieceDone(1, PEER), T0 + 2) == ()
    assert policy.handle(Tick(), T0 + 99) == ()


def test_without_a_mirror_a_piece_nobody_has_fails_the_download() -> None:
    r = Run(3, mirror_enabled=False, grace_period=2.0, stall_timeout=5.0)
    r.at(0, PeerBitfield("a", frozenset({0, 1})))
    assert r.policy.next_wakeup() == T0 + 7.0
    assert r.at(5.0, PieceDone(0, PEER)) == ()
    # Deadlines may come early, never late: at 7 the policy sees the peer activity
    # of t=5 and moves its deadline out.
    assert r.at(7.0) == ()
    assert r.policy.next_wakeup() == T0 + 10.0
    out = r.at(10.0)
    assert len(out) == 1 and isinstance(out[0], Failed) and out[0].piece == 2
    assert "no mirror" in out[0].reason


def test_without_a_mirror_peers_that_have_everything_are_enough() -> None:
    r = Run(2, mirror_enabled=False)
    r.at(0, PeerBitfield("a", everything(2)))
    assert r.at(100) == ()
    assert r.policy.next_wakeup() is None
    assert r.at(101, PieceDone(0, PEER)) == ()
    assert r.at(102, PieceDone(1, PEER)) == (Done(),)


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_refused() -> None:
    r = Run(3)
    for event in (PieceDone(3, PEER), PieceProgress(-1), PeerHave("x", 7)):
        with pytest.raises(ValueError):
            r.at(0, event)
    with pytest.raises(ValueError):
        DownloadPolicy(0, T0)
    with pytest.raises(ValueError):
        PolicyConfig(mirror_parallel=0)
    with pytest.raises(TypeError):
        r.policy.handle("tick", T0)  # type: ignore[arg-type]


def test_a_peer_trickling_blocks_of_one_piece_does_not_hold_the_others_from_the_mirror() -> None:
    """One peer claims every piece and sends a block of piece 0 every 4 s (a slow host
    capped at a few KiB/s, or a liar): the pieces nobody works on go to the mirror after
    stall_timeout. Before, each block counted as the swarm's progress and nothing went
    to the mirror for as long as the trickle lasted (an agent took an 8 MiB blob from an
    8 KiB/s holder for minutes, with the mirror idle)."""
    cfg = PolicyConfig(grace_period=2.0, stall_timeout=5.0, mirror_parallel=8)
    p = DownloadPolicy(8, 0.0, cfg)
    mirrored: list[int] = []
    t = 0.5
    while t < 30:
        progressed = frozenset({0}) if t % 4 == 0 else frozenset()
        for d in p.handle(Availability((1,) * 8, progressed), t):
            if isinstance(d, FetchFromMirror):
                mirrored += d.pieces
        t += 0.5
    assert sorted(mirrored) == [1, 2, 3, 4, 5, 6, 7]


class CountingWalks(DownloadPolicy):
    """The real policy, counting the pieces it looks at for changed availability."""

    walked = 0

    def _availability_changed(self, piece: int, before: int, now: float, **kw: bool) -> None:
        self.walked += 1
        super()._availability_changed(piece, before, now, **kw)


def test_counts_as_they_were_are_not_looked_at_and_a_change_still_counts() -> None:
    """Every sample of the swarm brings the counts of every piece, mostly as they were:
    1.5 ms a walk for 1024 pieces, once a second for the whole download (8.33)."""
    cfg = PolicyConfig(grace_period=1.0, stall_timeout=5.0)
    p = CountingWalks(8, 0.0, cfg)
    p.handle(Availability((1,) * 8), 0.0)
    assert p.walked == 8
    p.handle(Availability((1,) * 8, frozenset({3})), 0.5)  # the same counts, progress
    assert p.walked == 8
    assert not p.view(3, 5.2).peers_stalled  # its blocks at 0.5 were heard
    assert p.view(4, 5.2).peers_stalled
    p.handle(Availability((1,) * 7 + (0,)), 1.5)  # piece 7's holder is gone
    assert p.walked == 9  # that piece alone
    view = p.view(7, 1.5)
    assert view.complete_holders + view.partial_holders == 0
    assert view.away_holders == 1  # (held for stall_timeout: it may come back)


def test_without_a_mirror_blocks_still_count_as_the_swarm_alive() -> None:
    """No mirror (a ``local/*`` blob): a piece nobody connected has fails the download
    only once peers went quiet; blocks still coming of another piece keep it waiting
    (there is nothing better to do than wait)."""
    cfg = PolicyConfig(grace_period=2.0, stall_timeout=5.0, mirror_enabled=False)
    p = DownloadPolicy(4, 0.0, cfg)
    t = 0.5
    while t < 20:
        progressed = frozenset({0}) if t % 2 == 0 else frozenset()
        out = p.handle(Availability((1, 1, 1, 0), progressed), t)
        assert not any(isinstance(d, Failed) for d in out), t
        t += 0.5
    out = p.handle(Availability((1, 1, 1, 0)), 25.0)  # quiet for 5 s: it fails
    assert any(isinstance(d, Failed) for d in out)


# --- a piece's floor rate --------------------------------------------------------------------

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 16 * KiB


def send(
    p: DownloadPolicy,
    rates: dict[int, float],
    size: int,
    start: float,
    end: float,
    already: int = 0,
) -> tuple[dict[int, float], dict[int, float]]:
    """Holders of every piece send ``rates[piece]`` bytes/s of each piece from ``start``
    (``already`` bytes of each there), in whole 16 KiB blocks, looked at every 0.5 s (as
    the driver samples libtorrent) until ``end``: when each piece went to the mirror
    (which then wins the race), and when each was had from the peers."""
    mirrored: dict[int, float] = {}
    done: dict[int, float] = {}
    sent = dict.fromkeys(rates, already)
    t = start
    while t <= end:
        progressed = []
        for piece, rate in rates.items():
            blocks = min(size, already + int(rate * (t - start))) // BLOCK * BLOCK
            if blocks > sent[piece] and piece not in done and piece not in mirrored:
                sent[piece] = blocks
                progressed.append((piece, blocks))
        out = list(p.handle(Availability((1,) * p.num_pieces, received=tuple(progressed)), t))
        for piece, n in progressed:
            if n == size:
                done[piece] = t
                out += p.handle(PieceDone(piece, PEER), t)
        for d in out:
            if isinstance(d, FetchFromMirror):
                for piece in d.pieces:
                    mirrored.setdefault(piece, t)
        t += 0.5
    return mirrored, done


@pytest.mark.parametrize(
    ("size", "rate"),
    [(1 * MiB, 8 * KiB), (16 * MiB, 8 * KiB), (16 * MiB, 64 * KiB), (16 * MiB, 256 * KiB)],
)
def test_a_piece_trickled_below_the_floor_rate_goes_to_the_mirror_in_bounded_time(
    size: int, rate: float
) -> None:
    """A holder sends blocks of piece 0 steadily but slowly (a host capped at a few
    KiB/s, or a liar keeping the piece "alive"): once its bytes fall behind the floor
    rate counted from its first block, less stall_timeout of credit, it goes to the
    mirror: within stall_timeout + its size / floor of the first block, whatever the
    trickle, and at stall_timeout / (1 - rate / floor) for a steady one. Before, each
    block kept it with the peer: an 8 KiB/s holder held a 1 MiB piece 128 s, a 16 MiB
    one 34 minutes."""
    floor, stall = 512 * KiB, 5.0
    cfg = PolicyConfig(grace_period=2.0, stall_timeout=stall, min_piece_rate=floor)
    p = DownloadPolicy(2, 0.0, cfg)
    p.handle(PieceDone(1, PEER), 0.5)  # (the swarm delivers otherwise)
    first = 1.0
    mirrored, done = send(p, {0: rate}, size, first, 120.0)
    assert not done and set(mirrored) == {0}
    # (the first block lands BLOCK / rate after `first`: the bounds count from there)
    began = first + math.ceil(BLOCK / rate / 0.5) * 0.5
    assert began + stall <= mirrored[0] <= began + stall + size / floor
    assert mirrored[0] <= began + stall / (1 - rate / floor) + 0.5


@pytest.mark.parametrize("size", [4 * MiB, 16 * MiB])
@pytest.mark.parametrize("at_once", [1, 4])
def test_an_honest_slow_holder_keeps_its_pieces(size: int, at_once: int) -> None:
    """A LAN holder at 2 MB/s, on one piece or split over 4 at once (500 KB/s each,
    just under the floor: the credit covers it), sends every piece itself; nothing goes
    to the mirror. A pause shorter than stall_timeout costs nothing either."""
    cfg = PolicyConfig(grace_period=2.0, stall_timeout=5.0)
    assert cfg.min_piece_rate == 512 * KiB  # the default is what is tested
    p = DownloadPolicy(at_once, 0.0, cfg)
    rates = dict.fromkeys(range(at_once), 2e6 / at_once)
    mirrored, done = send(p, rates, size, 1.0, 200.0)
    assert mirrored == {} and sorted(done) == list(range(at_once))
    assert p.finished


def test_an_honest_holder_pausing_mid_piece_keeps_it() -> None:
    cfg = PolicyConfig(grace_period=2.0, stall_timeout=5.0)
    p = DownloadPolicy(1, 0.0, cfg)
    mirrored, _ = send(p, {0: 2e6}, 16 * MiB, 1.0, 4.0)  # 6 MB in 3 s
    assert p.handle(Tick(), 8.5) == ()  # 4.5 s with nothing
    more, done = send(p, {0: 2e6}, 16 * MiB, 8.5, 60.0, already=6_000_000 // BLOCK * BLOCK)
    assert mirrored == more == {} and list(done) == [0]


def test_the_floor_rate_sets_when_a_trickled_piece_goes() -> None:
    cfg = PolicyConfig(grace_period=0.0, stall_timeout=5.0, min_piece_rate=512 * KiB)
    p = DownloadPolicy(2, 0.0, cfg)
    p.handle(Availability((1, 1)), 0.0)
    p.handle(PieceDone(1, PEER), 0.0)
    p.handle(Availability((1, 1), received=((0, 256 * KiB),)), 1.0)
    p.handle(Availability((1, 1), received=((0, 512 * KiB),)), 3.0)
    p.handle(Availability((1, 1), received=((0, 768 * KiB),)), 5.0)
    # its credit (5 s) plus what it sent at the floor rate (1.5 s), from the first look
    assert p.handle(Tick(), 7.4) == ()
    assert (wake := p.next_wakeup()) is not None and wake <= 1.0 + 5.0 + 1.5
    out = p.handle(Tick(), 7.5)
    assert out == (FetchFromMirror((0,), stalled=1),)  # its peers' piece: for the log


def test_progress_of_unknown_size_keeps_only_the_stall_rule() -> None:
    """`PieceProgress` without bytes (a driver that cannot tell) is a sign of life only:
    the floor needs bytes to judge."""
    r = Run(1, grace_period=0.0, stall_timeout=5.0)
    r.at(0, PeerBitfield("seed", everything(1)))
    for t in range(1, 60, 2):
        assert r.mirrored(r.at(t, PieceProgress(0))) == []
    assert r.mirrored(r.at(61, PieceProgress(0, 16 * KiB))) == []  # the first it can judge
    assert r.mirrored(r.at(63, PieceProgress(0, 32 * KiB))) == []
    assert r.mirrored(r.at(66.0)) == []  # its credit from 61, and 32 KiB at the floor
    assert r.mirrored(r.at(66.0625)) == [0]


def test_without_a_mirror_a_trickled_piece_still_waits_for_its_holder() -> None:
    """local/*: no mirror to race the trickle with; the piece waits and the download
    does not fail while its blocks keep coming."""
    cfg = PolicyConfig(grace_period=2.0, stall_timeout=5.0, mirror_enabled=False)
    p = DownloadPolicy(2, 0.0, cfg)
    p.handle(PieceDone(1, PEER), 0.5)
    t, sent = 1.0, 0
    while sent < MiB:
        sent += BLOCK  # one 16 KiB block every 2 s: 8 KiB/s
        out = p.handle(Availability((1, 1), received=((0, sent),)), t)
        assert not any(isinstance(d, Failed) for d in out), t
        assert not p.view(0, t).peers_stalled
        t += 2.0
    assert p.handle(PieceDone(0, PEER), t) == (Done(),)


def test_a_mirror_copy_spoiled_by_peers_blocks_goes_again_at_once_and_bans_the_sender() -> None:
    """Our copy, checked before it was fed, failed with blocks a peer had sent of the
    piece (`Origin.MIXED`): not the mirror's failure (no backoff, none counted), the
    sender banned, the piece's peers no longer trusted with it; a piece spoiled
    mirror_max_failures times (by senders nobody can name) fails the download."""
    r = Run(2, grace_period=0.0, stall_timeout=5.0, mirror_max_failures=3)
    r.at(0, PeerBitfield("liar", everything(2)))
    r.at(0.5, PeerBitfield("honest", everything(2)))
    r.at(1.0, PieceDone(1, PEER))
    r.at(1.5, PieceProgress(0, 16 * KiB))
    assert r.mirrored(r.at(6.6)) == [0]  # trickled: behind the floor
    out = r.at(7.0, PieceHashFailed(0, Origin.MIXED, "liar"))
    assert BanPeer("liar", "sent blocks of piece 0 that failed its hash check") in out
    assert r.mirrored(out) == [0]  # at once
    assert r.policy.view(0, r.now).peers_untrusted
    assert r.mirrored(r.at(7.5, PieceHashFailed(0, Origin.MIXED))) == [0]
    out = r.at(8.0, PieceHashFailed(0, Origin.MIXED))
    assert isinstance(out[-1], Failed) and "spoiled the mirror's copy 3 times" in out[-1].reason


def test_under_a_download_cap_the_floor_is_a_quarter_of_it() -> None:
    from peer.scheduling.policy import MIN_PIECE_RATE, min_piece_rate_under

    assert min_piece_rate_under(0) == MIN_PIECE_RATE == 512 * KiB  # no cap
    assert min_piece_rate_under(100 << 20) == MIN_PIECE_RATE
    assert min_piece_rate_under(128 * KiB) == 32 * KiB


def one_piece_at_a_time(p: DownloadPolicy, rate: float, size: int, end: float) -> list[int]:
    """A holder of every piece sends them one after another at ``rate``, from t = 1 s,
    looked at every 0.5 s: the pieces that went to the mirror by ``end``."""
    mirrored: list[int] = []
    counts = (1,) * p.num_pieces
    t, piece, start = 1.0, 0, 1.0
    while t <= end and piece < p.num_pieces:
        sent = min(size, int(rate * (t - start))) // BLOCK * BLOCK
        out = list(p.handle(Availability(counts, received=((piece, sent),) if sent else ()), t))
        if sent == size:
            out += p.handle(PieceDone(piece, PEER), t)
            piece, start = piece + 1, t
        mirrored += [q for d in out if isinstance(d, FetchFromMirror) for q in d.pieces]
        t += 0.5
    return mirrored


def test_pieces_slower_than_the_stall_timeout_at_the_floor_keep_the_others_waiting() -> None:
    """Under a LAN download cap of 128 KiB/s (floor 32 KiB/s) each 1 MiB piece takes
    8 s, longer than stall_timeout: the swarm still delivers at 4x the floor, so the
    pieces not yet started wait for it. Before, only a verified piece counted and every
    idle piece went to the mirror stall_timeout after the last one."""
    cfg = PolicyConfig(grace_period=2.0, stall_timeout=5.0, min_piece_rate=32 * KiB)
    p = DownloadPolicy(4, 0.0, cfg)
    assert one_piece_at_a_time(p, 128 * KiB, MiB, 40.0) == []
    assert p.finished


def test_a_trickle_below_the_floor_does_not_keep_the_others_waiting() -> None:
    """Bytes count for the swarm only at the floor rate: a holder trickling piece 0 at
    8 KiB/s holds neither it nor the others (the default floor, 512 KiB/s)."""
    p = DownloadPolicy(4, 0.0, PolicyConfig(grace_period=2.0, stall_timeout=5.0))
    assert sorted(one_piece_at_a_time(p, 8 * KiB, MiB, 20.0)) == [0, 1, 2, 3]


def test_a_piece_begun_before_its_holders_were_left_to_the_feeders_keeps_its_floor_credit() -> None:
    """A non-feeder got 1 MiB of piece 0 from the seeder before it left the holders to
    the feeders (`HoldersAway`); the other pieces come from the downloaders. When one of
    them has piece 0, 11 s later, it may send it at LAN speed: the floor counts from
    then, not from the first block (which would send it to the mirror at once, its
    holder just back and not yet asked). The same when the holders are connected again."""
    for back in ("a downloader has it", "the holders connected again"):
        cfg = PolicyConfig(grace_period=2.0, stall_timeout=5.0, min_piece_rate=512 * KiB)
        p = DownloadPolicy(7, 0.0, cfg)
        counts = (1,) * 7
        assert p.handle(Availability(counts, received=((0, MiB),)), 0.3) == ()
        p.handle(HoldersAway(1), 0.5)
        ready = (0,) + (1,) * 6  # the downloaders have every piece but 0
        for k, t in enumerate((1.0, 3.0, 5.0, 7.0, 9.0, 11.0), start=1):
            assert p.handle(Availability(ready), t) == ()
            assert p.handle(PieceDone(k, PEER), t) == (), t  # the blob makes progress
        if back == "a downloader has it":
            assert p.handle(Availability(counts), 11.5) == (), back
        else:
            assert p.handle(HoldersAway(0), 11.5) == (), back
            assert p.handle(Availability(counts), 11.6) == (), back
        # it comes at 2 MB/s from 12 s: nothing for the mirror
        mirrored, done = send(p, {0: 2e6}, 4 * MiB, 12.0, 20.0, already=MiB)
        assert mirrored == {} and list(done) == [0], back
