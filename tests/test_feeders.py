"""Feeders (peer.scheduling.feeders) and their place in the swarm driver, on a fake clock."""

from __future__ import annotations

import hashlib
import random

import pytest

from peer.scheduling import policy as pol
from peer.scheduling.feeders import (
    ConnectHolders,
    DropHolders,
    FeederChoice,
    FeederConfig,
    deal_over,
    feeder_rank,
    feeders_of,
)
from peer.transfer import events as ev
from peer.transfer.swarm_download import (
    ConnectPeer,
    FeedMirrorPiece,
    InOrder,
    LowerPieces,
    Members,
    PeerSample,
    PreferPieces,
    Readers,
    ReadersChanged,
    Rejoined,
    StartSwarming,
    SwarmDownload,
    SwarmDownloadConfig,
    SwarmSample,
    TakeSample,
    Wake,
)

T0 = 1000.0
BLOB = "b" * 64
AGENTS = [f"agent-{k}" for k in range(8)]


def ranked() -> list[str]:
    return sorted(AGENTS, key=lambda a: feeder_rank(a, BLOB))


def test_the_feeders_are_the_lowest_ranks_and_differ_from_blob_to_blob() -> None:
    assert feeders_of(AGENTS, BLOB, 2) == frozenset(ranked()[:2])
    assert feeders_of(AGENTS, BLOB, 0) == frozenset()
    others = {feeders_of(AGENTS, f"{k:064x}", 2) for k in range(8)}
    assert len(others) > 1  # each blob its own feeders


def test_a_lone_downloader_feeds_and_never_drops() -> None:
    c = FeederChoice("me", BLOB, T0)
    assert c.feeding and c.is_feeder
    assert c.learn(set(), 0.0, T0 + 1) is None
    assert c.next_wakeup() is None
    assert c.tick(T0 + 99) is None


def test_a_non_feeder_drops_its_holders_once_and_comes_back_on_a_stall() -> None:
    me = ranked()[5]
    c = FeederChoice(me, BLOB, T0, FeederConfig(feeders=2, stall_timeout=5.0))
    assert c.learn(AGENTS, 0.1, T0 + 0.5) == DropHolders()
    assert not c.feeding
    assert c.learn(AGENTS, 0.2, T0 + 2.5) is None  # once
    assert c.next_wakeup() == T0 + 5.5
    c.progress(T0 + 3.0, 4 << 20)  # the other downloaders deliver
    assert c.tick(T0 + 5.5) is None
    assert c.next_wakeup() == T0 + 8.0
    assert c.tick(T0 + 8.0) == ConnectHolders(stalled=True)
    assert c.feeding and c.fallback
    # kept for the rest of the download, whatever the members
    assert c.learn(AGENTS, 0.3, T0 + 9) is None
    assert c.next_wakeup() is None


def test_a_feeder_keeps_its_holders_and_a_non_feeder_that_becomes_one_takes_them_back() -> None:
    r = ranked()
    feeder = FeederChoice(r[0], BLOB, T0)
    assert feeder.learn(AGENTS, 0.0, T0 + 0.5) is None and feeder.feeding
    third = FeederChoice(r[2], BLOB, T0)
    assert third.learn(AGENTS, 0.0, T0 + 0.5) == DropHolders()
    # one feeder gone (no longer fetching, and not complete either) in two surveys in
    # a row: the third feeds
    assert third.learn(set(AGENTS) - {r[0]}, 0.3, T0 + 2.5) is None
    assert third.learn(set(AGENTS) - {r[0]}, 0.3, T0 + 4.5) == ConnectHolders(stalled=False)
    assert third.feeding and not third.fallback


def test_a_feeder_that_finished_stays_a_member_one_that_left_does_not() -> None:
    r = ranked()
    third = FeederChoice(r[2], BLOB, T0)
    assert third.learn(AGENTS, 0.0, T0 + 0.5) == DropHolders()
    # the first feeder finished: it offers the blob whole now, and still feeds
    fetching = set(AGENTS) - {r[0]}
    assert third.learn(fetching, 0.3, T0 + 2.5, present={r[0]}) is None
    assert not third.feeding and r[0] in third.members
    # then it offers nothing (between its download's end and its seed, or gone): kept
    # for one survey; gone in two in a row, the third is a feeder now
    assert third.learn(fetching, 0.4, T0 + 4.5, present=()) is None
    assert third.learn(fetching, 0.5, T0 + 6.5, present=()) == ConnectHolders(stalled=False)


def test_nothing_is_dropped_past_half_the_blob_or_with_feeders_off() -> None:
    me = ranked()[5]
    assert FeederChoice(me, BLOB, T0).learn(AGENTS, 0.5, T0 + 1) is None
    off = FeederChoice(me, BLOB, T0, FeederConfig(feeders=0))
    assert off.is_feeder and off.learn(AGENTS, 0.0, T0 + 1) is None
    with pytest.raises(ValueError):
        FeederConfig(feeders=-1)


# --- the policy: holders away by choice, and holders that vanished ---------------------------


def test_pieces_no_connected_peer_has_wait_for_the_feeders_while_the_blob_progresses() -> None:
    cfg = pol.PolicyConfig(grace_period=2.0, stall_timeout=5.0, mirror_parallel=4)
    p = pol.DownloadPolicy(8, T0, cfg)
    p.handle(pol.HoldersAway(1), T0 + 0.5)
    # The other downloaders have pieces 0-3; 4-7 only the holders we left.
    counts = (1, 1, 1, 1, 0, 0, 0, 0)
    assert p.handle(pol.Availability(counts), T0 + 3.0) == ()  # past the grace
    for k, t in enumerate((4.0, 6.0, 8.0, 12.9)):
        if t < 12:  # a piece from the downloaders (blocks alone are not progress)
            assert p.handle(pol.PieceDone(k, pol.Origin.PEER), T0 + t) == ()
        out = p.handle(pol.Availability(counts), T0 + t)
        assert out == (), t  # progress: the feeders are taking them
    out = p.handle(pol.Availability(counts), T0 + 13.0)  # 5 s without progress
    assert len(out) == 1 and isinstance(out[0], pol.FetchFromMirror)
    assert len(out[0].pieces) == 4 and out[0].stalled == 4  # as stalled, not "nobody"


def test_without_holders_away_the_same_pieces_go_to_the_mirror_after_the_grace() -> None:
    """What the feeders change: the same run with nobody away mirrors pieces 4-7."""
    cfg = pol.PolicyConfig(grace_period=2.0, stall_timeout=5.0, mirror_parallel=4)
    p = pol.DownloadPolicy(8, T0, cfg)
    out = p.handle(pol.Availability((1, 1, 1, 1, 0, 0, 0, 0)), T0 + 3.0)
    assert out and sorted(out[0].pieces) == [4, 5, 6, 7]  # type: ignore[attr-defined]


def test_holders_connected_again_get_a_grace_period_for_their_handshake() -> None:
    cfg = pol.PolicyConfig(grace_period=2.0, stall_timeout=5.0, mirror_parallel=4)
    p = pol.DownloadPolicy(4, T0, cfg)
    p.handle(pol.HoldersAway(1), T0 + 0.5)
    assert p.handle(pol.HoldersAway(0), T0 + 6.0) == ()
    assert p.handle(pol.Availability((0, 0, 0, 0)), T0 + 7.9) == ()
    out = p.handle(pol.Availability((0, 0, 0, 0)), T0 + 8.0)
    assert out and sorted(out[0].pieces) == [0, 1, 2, 3]  # type: ignore[attr-defined]


def test_a_holder_that_vanished_counts_for_stall_timeout_not_the_grace() -> None:
    """A seeder that pauses its torrent to reconnect its peers (`RequestBound`) is gone
    for a moment: its pieces are not sent to the mirror for that."""
    cfg = pol.PolicyConfig(grace_period=2.0, stall_timeout=5.0, mirror_parallel=4)
    p = pol.DownloadPolicy(4, T0, cfg)
    p.handle(pol.Availability((1, 1, 1, 1)), T0 + 1.0)
    assert p.handle(pol.Availability((0, 0, 0, 0), frozenset({0})), T0 + 3.0) == ()
    assert p.handle(pol.Availability((0, 0, 0, 0)), T0 + 7.9) == ()
    # back in time: nothing was mirrored
    assert p.handle(pol.Availability((1, 1, 1, 1), frozenset({1})), T0 + 4.0 + 3.5) == ()
    # gone for good: after stall_timeout
    p2 = pol.DownloadPolicy(4, T0, cfg)
    p2.handle(pol.Availability((1, 1, 1, 1), frozenset({0, 1, 2, 3})), T0 + 1.0)
    p2.handle(pol.Availability((0, 0, 0, 0)), T0 + 3.0)
    assert p2.handle(pol.Availability((0, 0, 0, 0)), T0 + 7.9) == ()
    out = p2.handle(pol.Availability((0, 0, 0, 0)), T0 + 8.0)  # 5 s after it left
    assert out and sorted(out[0].pieces) == [0, 1, 2, 3]  # type: ignore[attr-defined]


# --- in the driver ---------------------------------------------------------------------------

PIECE = 1 << 20
HOLDER = ("10.0.0.1", 7852)
PEER = ("10.0.0.2", 7852)


def sample(
    have: tuple[bool, ...], avail: tuple[int, ...], peers: tuple[tuple[str, int], ...]
) -> SwarmSample:
    return SwarmSample(
        state="downloading",
        is_finished=all(have),
        have=have,
        availability=avail,
        partial=(),
        peers=tuple(PeerSample(ev.Endpoint(h, p), 0) for h, p in peers),
    )


def driver(me: str, n: int = 8) -> SwarmDownload:
    return SwarmDownload(
        n * PIECE,
        PIECE,
        n,
        T0,
        SwarmDownloadConfig(policy=pol.PolicyConfig(grace_period=2.0, stall_timeout=5.0)),
        holders=frozenset({HOLDER}),
        follow_prefix=True,
        feeders=FeederChoice(me, BLOB, T0, FeederConfig(feeders=2, stall_timeout=5.0)),
    )


def running(d: SwarmDownload, n: int = 8) -> None:
    none = (False,) * n
    assert TakeSample() in d.handle(Wake(), T0)
    assert StartSwarming() in d.handle(sample(none, (0,) * n, ()), T0 + 0.05)
    d.handle(Wake(), T0 + 0.3)
    d.handle(sample(none, (1,) * n, (HOLDER,)), T0 + 0.3)  # settled: the policy runs


def dropped_non_feeder() -> SwarmDownload:
    """A running download of a non-feeder that learnt the members and left its
    holders (the rejoin done)."""
    d = driver(ranked()[6])
    running(d)
    d.handle(Members(frozenset(AGENTS)), T0 + 0.5)
    d.handle(Rejoined(), T0 + 0.6)
    return d


def test_a_non_feeder_drops_its_holders_and_sends_nothing_to_the_mirror_meanwhile() -> None:
    d = driver(ranked()[6], 16)
    running(d, 16)
    out = d.handle(Members(frozenset(AGENTS)), T0 + 0.5)
    assert DropHolders() in out
    out = d.handle(Rejoined(), T0 + 0.6)
    assert any(isinstance(a, PreferPieces) for a in out)  # its priorities told again
    # Only the other downloaders now, with half of the pieces; a piece a second comes.
    avail = (1,) * 8 + (0,) * 8
    mirrored: list[int] = []
    for t in range(1, 9):
        acts = [*d.handle(Wake(), T0 + t)]
        have = tuple(i < t - 1 for i in range(16))
        acts += d.handle(sample(have, avail, (PEER,)), T0 + t)
        acts += d.handle(ev.PieceFinished(BLOB_IH, t - 1, False), T0 + t)
        mirrored += [a.piece for a in acts if isinstance(a, FeedMirrorPiece)]
    assert mirrored == []  # 8 s, 6 past the grace: pieces 8-15 wait for the feeders
    assert d.feeders is not None and not d.feeders.feeding


def test_a_late_joiner_that_is_not_a_feeder_starts_without_its_holders() -> None:
    """The first survey already shows the other downloaders (learnt before the torrent
    is added): a non-feeder starts with the holders away, so it has nothing to drop,
    waits for the feeders rather than the mirror while the blob progresses, and takes
    the holders back (the first rejoin) only when the downloaders stall."""
    choice = FeederChoice(ranked()[6], BLOB, T0, FeederConfig(feeders=2, stall_timeout=5.0))
    assert choice.learn(frozenset(AGENTS), 0.0, T0) == DropHolders()
    d = SwarmDownload(
        16 * PIECE,
        PIECE,
        16,
        T0,
        SwarmDownloadConfig(policy=pol.PolicyConfig(grace_period=2.0, stall_timeout=5.0)),
        holders=frozenset({HOLDER}),
        follow_prefix=True,
        feeders=choice,
    )
    none = (False,) * 16
    avail = (1,) * 8 + (0,) * 8
    assert TakeSample() in d.handle(Wake(), T0)
    assert StartSwarming() in d.handle(sample(none, (0,) * 16, ()), T0 + 0.05)
    d.handle(Wake(), T0 + 0.3)
    d.handle(sample(none, avail, (PEER,)), T0 + 0.3)  # settled on a downloader alone
    got: list[object] = []
    for t in range(1, 9):
        got += d.handle(Wake(), T0 + t)
        have = tuple(i < t - 1 for i in range(16))
        got += d.handle(sample(have, avail, (PEER,)), T0 + t)
        got += d.handle(ev.PieceFinished(BLOB_IH, t - 1, False), T0 + t)
    assert not any(isinstance(a, FeedMirrorPiece | DropHolders | ConnectHolders) for a in got)
    for t in range(9, 20):  # the downloaders stop sending
        got += d.handle(Wake(), T0 + t)
        got += d.handle(sample(tuple(i < 8 for i in range(16)), avail, (PEER,)), T0 + t)
        if ConnectHolders(stalled=True) in got:
            break
    assert t == 11  # stall_timeout after the pieces of the floor rate (2.5 MiB) last came
    assert not any(isinstance(a, FeedMirrorPiece) for a in got)


def test_a_non_feeder_does_not_dial_again_the_holder_it_left() -> None:
    d = dropped_non_feeder()
    out = d.handle(ev.PeerDisconnected(BLOB_IH, ev.Endpoint(*HOLDER), "closed"), T0 + 0.7)
    assert not any(isinstance(a, ConnectPeer) for a in out)


def test_a_non_feeder_whose_downloaders_stall_takes_the_holders_back_not_the_mirror() -> None:
    d = dropped_non_feeder()
    have = (False,) * 8
    got: list[object] = []
    t = 1.0
    while t <= 7.0:
        got += d.handle(Wake(), T0 + t)
        got += d.handle(sample(have, (0,) * 8, (PEER,)), T0 + t)
        if ConnectHolders(stalled=True) in got:
            break
        t += 0.5
    assert ConnectHolders(stalled=True) in got
    assert t == 5.5  # dropped at 0.5, nothing from the downloaders since
    assert not any(isinstance(a, FeedMirrorPiece) for a in got)
    # Back with the holders: a grace for their handshake, then the usual policy.
    d.handle(Rejoined(), T0 + t)
    acts = d.handle(Wake(), T0 + t + 1.9)
    acts += d.handle(sample(have, (0,) * 8, ()), T0 + t + 1.9)
    assert not any(isinstance(a, FeedMirrorPiece) for a in acts)
    acts = d.handle(Wake(), T0 + t + 2.0)
    acts += d.handle(sample(have, (0,) * 8, ()), T0 + t + 2.0)
    assert any(isinstance(a, FeedMirrorPiece) for a in acts)


def test_a_feeder_and_a_lone_downloader_are_untouched() -> None:
    d = driver(ranked()[0])
    running(d)
    out = d.handle(Members(frozenset(AGENTS)), T0 + 0.5)
    assert not any(isinstance(a, DropHolders | ConnectHolders) for a in out)  # (its stripe)
    alone = driver("me")
    running(alone)
    assert alone.handle(Members(frozenset()), T0 + 0.5) == ()
    # no holders (a swarm of downloaders only): nothing to drop
    d = SwarmDownload(
        4 * PIECE, PIECE, 4, T0, feeders=FeederChoice(ranked()[6], BLOB, T0), follow_prefix=True
    )
    assert d.feeders is None


def test_in_order_is_told_again_after_a_rejoin() -> None:
    d = SwarmDownload(
        8 * PIECE,
        PIECE,
        8,
        T0,
        holders=frozenset({HOLDER}),
        streaming=True,
        feeders=FeederChoice(ranked()[6], BLOB, T0),
    )
    running(d)
    # a reader streams: pieces in order
    assert InOrder(True) in d.handle(ReadersChanged(Readers(1, 0, 0, 1)), T0 + 0.4)
    assert InOrder(True) in d.handle(Rejoined(), T0 + 1)


BLOB_IH = "c" * 64


def test_the_feeders_of_a_repos_blobs_are_dealt_evenly_and_alike_by_every_agent() -> None:
    """8 agents, 4 shards, 2 feeders a shard: each agent feeds exactly one, and every
    agent works out the same feeders for each shard (its own siblings list, same ids).
    Ranked per blob alone, some agents fed two or three shards."""
    shards = [hashlib.sha256(f"shard {k}".encode()).hexdigest() for k in range(4)]
    dealt = {b: feeders_of(AGENTS, b, 2, shards) for b in shards}
    duties = {a: sum(a in f for f in dealt.values()) for a in AGENTS}
    assert set(duties.values()) == {1}, duties
    for me in AGENTS:
        for b in shards:
            c = FeederChoice(me, b, T0, siblings=shards)
            c.learn(AGENTS, 0.0, T0 + 0.5, deals=dict.fromkeys(AGENTS, deal_over(b, shards)))
            assert c.is_feeder == (me in dealt[b])
    alone = {b: feeders_of(AGENTS, b, 2) for b in shards}
    assert max(sum(a in f for f in alone.values()) for a in AGENTS) >= 2


def feeders_counted(
    views: dict[str, frozenset[str]], blob: str, count: int, said: bool = True
) -> int:
    """How many of ``blob``'s downloaders (the agents whose view holds it) find they
    feed it, each dealing over its own view and told what the others said (``said``)."""
    members = [a for a, v in views.items() if blob in v]
    deals = {a: deal_over(blob, views[a]) for a in members} if said else {}
    fed = 0
    for me in members:
        c = FeederChoice(me, blob, T0, FeederConfig(feeders=count), siblings=views[me])
        c.learn(members, 0.0, T0 + 0.5, deals=deals)
        fed += c.is_feeder
    return fed


def random_views(rng: random.Random) -> tuple[list[str], dict[str, frozenset[str]]]:
    """A repo's swarmed blobs and what each agent fetches of it: the whole repo (the
    CLI), an ``--include`` selection, or one file (HF_ENDPOINT asks one at a time)."""
    blobs = [f"{rng.getrandbits(256):064x}" for _ in range(rng.randint(1, 6))]
    views = {}
    for k in range(rng.randint(2, 10)):
        kind = rng.choice(("whole", "include", "one"))
        if kind == "whole":
            view = set(blobs)
        elif kind == "include":
            view = set(rng.sample(blobs, rng.randint(1, len(blobs))))
        else:
            view = {rng.choice(blobs)}
        views[f"agent-{k}"] = frozenset(view)
    return blobs, views


def test_every_blob_gets_its_feeders_whatever_each_agent_fetches_of_the_repo() -> None:
    """Agents that fetch different selections of a repo each deal over their own list;
    told what the others deal over, they rank per blob where the lists differ, so every
    blob gets exactly min(feeders, downloaders) feeders. Each dealing over its own list
    with no word from the others (before `deal_over` was said), some blobs got none."""
    rng = random.Random(12)
    starved = 0
    for _ in range(800):
        blobs, views = random_views(rng)
        count = rng.choice((1, 2, 3))
        for b in blobs:
            n = sum(b in v for v in views.values())
            assert feeders_counted(views, b, count) == min(count, n), (views, b)
            starved += n > 0 and feeders_counted_blind(views, b, count) == 0
    assert starved > 0  # the test's mixes do reach the case the deal's digest fixes


def feeders_counted_blind(views: dict[str, frozenset[str]], blob: str, count: int) -> int:
    """`feeders_counted` as each agent dealt before `deal_over`: over its own view."""
    members = [a for a, v in views.items() if blob in v]
    return sum(me in feeders_of(members, blob, count, views[me]) for me in members)


def test_a_member_that_says_nothing_or_finished_keeps_the_deal_consistent() -> None:
    """A member whose deal is unknown (an older agent) makes the blob ranked per blob
    alone; a finished member keeps what it said last."""
    shards = [hashlib.sha256(f"shard {k}".encode()).hexdigest() for k in range(4)]
    b = shards[1]
    same = deal_over(b, shards)
    me = AGENTS[0]
    c = FeederChoice(me, b, T0, siblings=shards)
    c.learn(AGENTS[1:], 0.0, T0 + 0.5, deals=dict.fromkeys(AGENTS[1:], same))
    assert c.is_feeder == (me in feeders_of(AGENTS, b, 2, shards))
    c.learn(AGENTS[1:], 0.0, T0 + 1, deals=dict.fromkeys(AGENTS[2:], same))  # none from 1
    assert c.deals[AGENTS[1]] == same  # said before: kept
    c2 = FeederChoice(me, b, T0, siblings=shards)
    c2.learn(AGENTS[1:], 0.0, T0 + 0.5, deals=dict.fromkeys(AGENTS[2:], same))
    assert c2.is_feeder == (me in feeders_of(AGENTS, b, 2))  # agent 1 said nothing
    # a feeder that finished (offers it whole) keeps its word; one that left, not
    c.learn(AGENTS[2:], 0.0, T0 + 2, present={AGENTS[1]})
    assert c.deals.get(AGENTS[1]) == same
    c.learn(AGENTS[3:], 0.0, T0 + 3)
    c.learn(AGENTS[3:], 0.0, T0 + 5)  # gone in two surveys in a row
    assert AGENTS[1] not in c.deals and AGENTS[2] not in c.deals


def test_a_peer_trickling_blocks_cannot_keep_a_non_feeder_off_its_holders() -> None:
    """A fake downloader that ranks first (a member that claims to be fetching) joins
    the swarm, claims every piece and sends one block every 4 s, never a whole piece.
    The non-feeder must take the holders back before any piece goes to the WAN mirror
    for want of them: before, each block counted as progress, so it never did, and
    the policy sent every piece the trickler "held" to the mirror."""
    d = dropped_non_feeder()
    have = (False,) * 8
    got: list[object] = []
    t, blocks = 1.0, 0
    while t <= 60.0 and ConnectHolders(stalled=True) not in got:
        if t % 4 == 0:
            blocks += 1
        s = sample(have, (1,) * 8, (PEER,))
        s = SwarmSample(s.state, s.is_finished, s.have, s.availability, ((0, blocks),), s.peers)
        got += d.handle(Wake(), T0 + t)
        got += d.handle(s, T0 + t)
        t += 0.5
    assert ConnectHolders(stalled=True) in got
    first = got.index(ConnectHolders(stalled=True))
    assert not any(isinstance(a, FeedMirrorPiece) for a in got[:first])


def test_whole_pieces_trickled_below_the_floor_rate_bring_the_holders_back() -> None:
    """The same liar with real bytes: a whole 1 MiB piece every 4 s (256 KiB/s, under
    `MIN_FEED_RATE`) does not keep a non-feeder off its holders; 1 MiB/s does."""
    me = ranked()[5]
    for every, back in ((4.0, True), (1.0, False)):
        c = FeederChoice(me, BLOB, T0, FeederConfig(feeders=2, stall_timeout=5.0))
        assert c.learn(AGENTS, 0.0, T0 + 0.5) == DropHolders()
        t, acts = T0 + 0.5, []
        while t < T0 + 30:
            t += every
            c.progress(t, PIECE)
            acts.append(c.tick(t + every - 0.01))
        assert (ConnectHolders(stalled=True) in acts) is back, every


def test_a_member_that_says_different_deals_to_different_askers_costs_stall_timeout() -> None:
    """A liar (a member) that tells some downloaders it deals over their list and others
    not makes them deal differently: a blob can get no honest feeder where the truth or
    one lie told to all would give it one (as a lie about what it fetches can). Each of
    those non-feeders connects the holders again once nothing came for stall_timeout."""
    shards = [hashlib.sha256(f"shard {k}".encode()).hexdigest() for k in range(4)]
    cfg = FeederConfig(feeders=1, stall_timeout=5.0)
    starved = 0
    for trial in range(100):
        agents = [f"agent-{trial}-{k}" for k in range(4)]
        liar, honest = agents[0], agents[1:]
        for b in shards:
            same = deal_over(b, shards)
            choices = []
            for k, me in enumerate(honest):
                c = FeederChoice(me, b, T0, cfg, siblings=shards)
                deals = dict.fromkeys(honest, same) | {liar: same if k % 2 else "0" * 64}
                c.learn(agents, 0.0, T0 + 0.5, deals=deals)
                choices.append(c)
            if any(c.is_feeder for c in choices):
                continue
            starved += 1
            for c in choices:
                assert c.tick(T0 + 5.4) is None
                assert c.tick(T0 + 5.5) == ConnectHolders(stalled=True)
    assert starved > 0  # the case is reached


# -- a feeder's stripe -------------------------------------------------------------


def test_the_feeders_of_a_blob_take_different_stripes_the_others_none() -> None:
    """Each feeder asked the holders for whatever it lacked, so both feeders of a shard
    often took the same piece from the seeder (1.2-1.3 copies of each shard): with
    stripes each prefers its own share of the pieces."""
    cfg = FeederConfig(feeders=2, stall_timeout=5.0)
    stripes = {}
    for me in AGENTS:
        c = FeederChoice(me, BLOB, T0, cfg)
        assert c.stripe is None  # nobody known yet: no stripe
        c.learn(AGENTS, 0.0, T0 + 0.5)
        stripes[me] = c.stripe
    feeders = [a for a in AGENTS if stripes[a] is not None]
    assert sorted(feeders) == sorted(ranked()[:2])
    assert sorted(stripes[a] for a in feeders) == [(0, 2), (1, 2)]
    # one feeder (or feeders off), a lone downloader: nothing to split
    one = FeederChoice(ranked()[0], BLOB, T0, FeederConfig(feeders=1))
    one.learn(AGENTS, 0.0, T0 + 0.5)
    assert one.is_feeder and one.stripe is None
    alone = FeederChoice("me", BLOB, T0, cfg)
    alone.learn((), 0.0, T0 + 0.5)
    assert alone.stripe is None
    # a non-feeder back on the holders for a stall takes whatever it lacks
    late = FeederChoice(ranked()[5], BLOB, T0, cfg)
    late.learn(AGENTS, 0.0, T0 + 0.5)
    assert late.tick(T0 + 99) == ConnectHolders(stalled=True)
    assert late.stripe is None


def preferred(actions: tuple[object, ...]) -> tuple[set[int], set[int]]:
    up = {i for a in actions if isinstance(a, PreferPieces) for i in a.pieces}
    down = {i for a in actions if isinstance(a, LowerPieces) for i in a.pieces}
    return up, down


def test_a_feeder_prefers_its_stripe_and_lowers_the_other_feeders() -> None:
    for k, me in enumerate(ranked()[:2]):
        d = driver(me)
        running(d)
        up, down = preferred(d.handle(Members(frozenset(AGENTS)), T0 + 0.5))
        mine = {i for i in range(8) if i % 2 == k}
        assert (up, down) == (mine, set(range(8)) - mine)
        # the torrent new to libtorrent (a rejoin): told again
        up, down = preferred(d.handle(Rejoined(), T0 + 1))
        assert (up, down) == (mine, set(range(8)) - mine)
    # a non-feeder prefers every piece, as before
    d = driver(ranked()[6])
    running(d)
    out = d.handle(Members(frozenset(AGENTS)), T0 + 0.5)
    assert DropHolders() in out and preferred(out) == (set(), set())
    assert preferred(d.handle(Rejoined(), T0 + 0.6)) == (set(range(8)), set())


def test_a_feeder_that_stops_being_one_prefers_every_piece_again() -> None:
    me = ranked()[1]
    d = driver(me)
    running(d)
    d.handle(Members(frozenset(AGENTS)), T0 + 0.5)
    d.handle(ev.PieceFinished(BLOB_IH, 1, False), T0 + 0.7)
    # two more downloaders that rank first: no longer a feeder (it drops the holders)
    first = [
        a for a in (f"late-{k}" for k in range(200)) if feeder_rank(a, BLOB) < feeder_rank(me, BLOB)
    ]
    out = d.handle(Members(frozenset({*AGENTS, *first[:2]})), T0 + 2.5)
    assert DropHolders() in out
    assert preferred(out) == ({0, 2, 3, 4, 5, 6, 7}, set())


def test_a_feeders_window_prefers_its_stripe_only() -> None:
    """A blob larger than the preferred window: the pieces preferred as the prefix
    grows are the feeder's stripe."""
    d = striped_big()
    running(d, 64)
    up, down = preferred(d.handle(Members(frozenset(AGENTS)), T0 + 0.5))
    assert (up, down) == ({0, 2, 4, 6}, {1, 3, 5, 7})
    up, down = set(), set()
    for i in range(8):
        u, w = preferred(d.handle(ev.PieceFinished(BLOB_IH, i, False), T0 + 1 + i / 10))
        up |= u
        down |= w
    assert up == {8, 10, 12, 14} and down == set()


def test_a_piece_already_coming_is_not_lowered_by_the_stripe() -> None:
    """Lowered while blocks of it came, a piece waited behind the stripe for its other
    blocks, fell under the floor rate and went to the mirror (benchmarks 8.36)."""
    d = driver(ranked()[0])
    running(d)
    d.handle(Wake(), T0 + 0.4)
    partial = SwarmSample(
        state="downloading",
        is_finished=False,
        have=(False,) * 8,
        availability=(1,) * 8,
        partial=((3, 5), (7, 0)),  # 7: requested, no block yet
        peers=(PeerSample(ev.Endpoint(*HOLDER), 0),),
    )
    d.handle(partial, T0 + 0.4)
    up, down = preferred(d.handle(Members(frozenset(AGENTS)), T0 + 0.5))
    assert (up, down) == ({0, 2, 4, 6}, {1, 5})


def test_another_feeders_piece_that_began_to_come_is_preferred_again() -> None:
    """Left lowered once blocks of it came (from the other feeder, or a downloader whose
    port many share), it came below the policy's floor rate and went to the mirror."""
    d = driver(ranked()[0])
    running(d)
    assert preferred(d.handle(Members(frozenset(AGENTS)), T0 + 0.5))[1] == {1, 3, 5, 7}
    d.handle(Wake(), T0 + 1.5)
    coming = SwarmSample(
        state="downloading",
        is_finished=False,
        have=(False,) * 8,
        availability=(2,) * 8,
        partial=((0, 3), (3, 1)),
        peers=(PeerSample(ev.Endpoint(*HOLDER), 0), PeerSample(ev.Endpoint(*PEER), 0)),
    )
    assert preferred(d.handle(coming, T0 + 1.5)) == ({3}, set())
    d.handle(Wake(), T0 + 2.5)
    assert preferred(d.handle(coming, T0 + 2.5)) == (set(), set())  # once


def striped_big(learnt_before_add: bool = False) -> SwarmDownload:
    """A feeder (rank 0 of 2: pieces i % 2 == 0) of a 64-piece blob, 8-piece window."""
    choice = FeederChoice(ranked()[0], BLOB, T0, FeederConfig(feeders=2, stall_timeout=5.0))
    if learnt_before_add:  # (fetch.py's `_feeder_choice`: its first survey showed them)
        choice.learn(frozenset(AGENTS) - {ranked()[0]}, 0.0, T0, frozenset(), {})
    return SwarmDownload(
        64 * PIECE,
        PIECE,
        64,
        T0,
        SwarmDownloadConfig(
            policy=pol.PolicyConfig(grace_period=2.0, stall_timeout=5.0), prefer_window=8 * PIECE
        ),
        holders=frozenset({HOLDER}),
        follow_prefix=True,
        feeders=choice,
    )


def coming(pieces: tuple[tuple[int, int], ...], n: int = 64) -> SwarmSample:
    return SwarmSample(
        state="downloading",
        is_finished=False,
        have=(False,) * n,
        availability=(2,) * n,
        partial=pieces,
        peers=(PeerSample(ev.Endpoint(*HOLDER), 0), PeerSample(ev.Endpoint(*PEER), 0)),
    )


def test_another_feeders_piece_past_the_first_window_is_preferred_again_once_it_comes() -> None:
    """The window moves on with the prefix and prefers only the feeder's stripe: the
    other feeder's pieces it passes stay at the default, like those the stripe lowered,
    and one of them that begins to come must be preferred again just the same (left
    behind the stripe it fell under the floor rate and went to the mirror, 8.36)."""
    d = striped_big()
    running(d, 64)
    d.handle(Members(frozenset(AGENTS)), T0 + 0.5)
    for i in range(8):
        d.handle(ev.PieceFinished(BLOB_IH, i, False), T0 + 1 + i / 10)
    d.handle(Wake(), T0 + 2.5)
    assert preferred(d.handle(coming(((9, 1), (10, 2))), T0 + 2.5)) == ({9}, set())


def test_a_feeder_that_knew_its_partner_before_the_add_stripes_from_the_start() -> None:
    """The choice learnt the members from the first survey, before the torrent was
    added: the pieces it prefers when swarming starts are its stripe already (not the
    whole window until the first re-survey, both feeders asking the seeder for all)."""
    d = striped_big(learnt_before_add=True)
    assert d.feeders is not None and d.feeders.stripe == (0, 2)
    assert TakeSample() in d.handle(Wake(), T0)
    out = d.handle(sample((False,) * 64, (0,) * 64, ()), T0 + 0.05)
    assert StartSwarming() in out
    up, _ = preferred(out)
    assert up == {0, 2, 4, 6}, up
    # ... and the partner's pieces it skipped come back once they begin to come
    d.handle(Wake(), T0 + 0.3)
    d.handle(sample((False,) * 64, (1,) * 64, (HOLDER,)), T0 + 0.3)
    d.handle(Wake(), T0 + 1.3)
    assert preferred(d.handle(coming(((3, 1),)), T0 + 1.3)) == ({3}, set())
