"""The herd election (peer.scheduling.herd), pure: several electors fed the same view
with a fake clock must agree on exactly one leader per blob, spread over the herd."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from peer.scheduling.herd import Bid, HerdConfig, HerdElection, Turn

CFG = HerdConfig(settle=1.0, leader_timeout=10.0, start_timeout=3.0)
AGENTS = ("agent-a", "agent-b", "agent-c", "agent-d")


def blob(i: int) -> str:
    return f"{i:064x}"


def herd(
    agents: Sequence[str], blobs: Mapping[str, int], now: float = 0.0
) -> dict[str, HerdElection]:
    out = {}
    for a in agents:
        e = HerdElection(a, CFG)
        for b, size in blobs.items():
            e.want(b, size, now)
        out[a] = e
    return out


def views(
    electors: Mapping[str, HerdElection],
    blobs: Mapping[str, int],
    leading: Mapping[str, tuple[str, int]] | None = None,
) -> dict[str, dict[str, list[Bid]]]:
    """What each agent sees of the others: a waiting claim on every blob it still
    wants, and a leading claim (with bytes done) where `leading` says so."""
    leading = leading or {}
    out: dict[str, dict[str, list[Bid]]] = {}
    for me in electors:
        view: dict[str, list[Bid]] = {}
        for other, e in electors.items():
            if other == me:
                continue
            for b in e.waiting():
                view.setdefault(b, []).append(Bid(other, blobs[b]))
        for b, (who, done) in leading.items():
            if who != me:
                view.setdefault(b, []).append(Bid(who, blobs[b], leading=True, done=done))
        out[me] = view
    return out


def leaders(turns: Mapping[str, Mapping[str, Turn]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for agent, per_blob in turns.items():
        for b, t in per_blob.items():
            if t is Turn.LEAD:
                out.setdefault(b, []).append(agent)
    return out


def step(
    electors: Mapping[str, HerdElection],
    blobs: Mapping[str, int],
    now: float,
    leading: Mapping[str, tuple[str, int]] | None = None,
) -> dict[str, dict[str, Turn]]:
    seen = views(electors, blobs, leading)
    return {a: e.observe(seen[a], now) for a, e in electors.items()}


def test_alone_it_leads_once_the_claim_has_settled() -> None:
    e = HerdElection("solo", CFG)
    e.want(blob(1), 100, now=0.0)
    assert e.observe({}, 0.5) == {blob(1): Turn.WAIT}
    assert e.observe({}, 1.1) == {blob(1): Turn.LEAD}


def test_four_agents_four_shards_one_leader_each_and_all_different() -> None:
    blobs = {blob(i): 250 for i in range(4)}
    electors = herd(AGENTS, blobs)
    assert leaders(step(electors, blobs, 0.5)) == {}  # still settling
    won = leaders(step(electors, blobs, 1.2))
    assert sorted(won) == sorted(blobs)
    assert all(len(w) == 1 for w in won.values()), won
    assert len({w[0] for w in won.values()}) == 4, "leadership must be spread"


def test_largest_blobs_are_spread_first() -> None:
    # Two agents, two big shards and two small files: each agent leads one big shard.
    blobs = {blob(1): 10, blob(2): 1000, blob(3): 1000, blob(4): 12}
    electors = herd(AGENTS[:2], blobs)
    won = leaders(step(electors, blobs, 2.0))
    assert all(len(w) == 1 for w in won.values())
    assert won[blob(2)] != won[blob(3)]


def test_spread_holds_for_many_herds() -> None:
    # Not luck of one set of names: 50 herds of 4 with 4 equal shards each.
    for n in range(50):
        agents = [f"h{n}-agent-{i}" for i in range(4)]
        blobs = {f"{n:08x}{i:056x}": 100 for i in range(4)}
        won = leaders(step(herd(agents, blobs), blobs, 1.5))
        assert sorted(won) == sorted(blobs)
        assert len({w[0] for w in won.values()}) == 4


def test_a_live_leader_is_followed_by_everyone() -> None:
    blobs = {blob(1): 100}
    electors = herd(AGENTS[1:], blobs)  # a leads; b, c, d wait
    for t in (0.5, 2.0, 5.0, 9.0):
        turns = step(electors, blobs, t, leading={blob(1): ("agent-a", int(t * 10))})
        assert leaders(turns) == {}
        assert electors["agent-b"].leader_of(blob(1)) == "agent-a"


def test_a_stalled_leader_is_replaced_by_exactly_one() -> None:
    blobs = {blob(1): 100}
    electors = herd(AGENTS[1:], blobs)
    step(electors, blobs, 0.5, leading={blob(1): ("agent-a", 40)})
    # Progress stops at 40 bytes: followers keep waiting up to the leader timeout ...
    assert leaders(step(electors, blobs, 10.0, leading={blob(1): ("agent-a", 40)})) == {}
    # ... then exactly one of them takes over.
    won = leaders(step(electors, blobs, 10.6, leading={blob(1): ("agent-a", 40)}))
    assert len(won[blob(1)]) == 1 and won[blob(1)][0] != "agent-a"


def test_progress_keeps_a_slow_leader() -> None:
    # Slow (twice the floor rate) but real progress: never replaced.
    size = 100 * 2**20
    blobs = {blob(1): size}
    electors = herd(AGENTS[1:], blobs)
    for t in (0.5, 8.0, 16.0, 24.0, 32.0, 47.0):
        done = int(t * 2 * CFG.min_rate)
        turns = step(electors, blobs, t, leading={blob(1): ("agent-a", done)})
        assert leaders(turns) == {}, f"replaced at {t} although it advanced"


def test_a_leader_creeping_below_the_floor_rate_is_replaced() -> None:
    # A liar adding a few bytes a second looks alive to a "did it move" check; over a
    # leader_timeout window it must have gained min_rate bytes/s.
    size = 100 * 2**20
    blobs = {blob(1): size}
    electors = herd(AGENTS[1:], blobs)
    for t in (0.5, 3.0, 6.0, 9.0, 10.0):
        assert leaders(step(electors, blobs, t, leading={blob(1): ("agent-a", int(t * 5))})) == {}
    won = leaders(step(electors, blobs, 10.6, leading={blob(1): ("agent-a", 53)}))
    assert len(won[blob(1)]) == 1 and won[blob(1)][0] != "agent-a"
    assert electors["agent-b"].suspects(blob(1)) == {"agent-a"}


def _alone_with(bids: list[Bid], now: float, size: int = 100) -> tuple[HerdElection, Turn]:
    e = HerdElection("agent-b", CFG)
    e.want(blob(1), size, 0.0)
    return e, e.observe({blob(1): bids}, now)[blob(1)]


def test_impossible_claims_are_ignored_and_their_agent_distrusted() -> None:
    for bad in (
        Bid("liar", 100, leading=True, done=2**50),  # past the size
        Bid("liar", 100, leading=True, done=-1),
        Bid("liar", 2**40, leading=True, done=2**39),  # another size than the blob's
        Bid("liar", 2**40),  # a waiting claim of another size is no candidate either
    ):
        e, turn = _alone_with([bad], 1.5)
        assert turn is Turn.LEAD, bad  # as if alone: the liar neither leads nor wins
        assert e.leader_of(blob(1)) is None
        assert e.suspects(blob(1)) == {"liar"}


def test_two_claims_of_one_agent_on_one_blob_distrust_it() -> None:
    e, turn = _alone_with(
        [Bid("liar", 100, leading=True, done=10), Bid("liar", 100, leading=True, done=90)], 1.5
    )
    assert turn is Turn.LEAD and e.suspects(blob(1)) == {"liar"}


def test_a_leader_whose_done_goes_backwards_is_distrusted() -> None:
    e = HerdElection("agent-b", CFG)
    e.want(blob(1), 100, 0.0)
    assert e.observe({blob(1): [Bid("agent-a", 100, leading=True, done=60)]}, 0.5) == {
        blob(1): Turn.WAIT
    }
    assert e.leader_of(blob(1)) == "agent-a"
    turns = e.observe({blob(1): [Bid("agent-a", 100, leading=True, done=20)]}, 1.5)
    assert turns == {blob(1): Turn.LEAD}
    assert e.suspects(blob(1)) == {"agent-a"}


def test_every_wait_ends_at_the_deadline_whatever_the_claims() -> None:
    # A "leader" that claims every byte forever (finishing, never offering a manifest):
    # waited for up to max_wait + size / min_rate, then we fetch it ourselves.
    cfg = HerdConfig(
        settle=1.0, leader_timeout=10.0, start_timeout=3.0, max_wait=60.0, finish_floor=1e9
    )
    size = 10 * 2**20
    deadline = cfg.deadline(size)
    assert deadline == 60.0 + size / cfg.min_rate
    e = HerdElection("agent-b", cfg)
    e.want(blob(1), size, 0.0)
    t = 0.5
    while t < deadline:
        turns = e.observe({blob(1): [Bid("agent-a", size, leading=True, done=size)]}, t)
        assert turns == {blob(1): Turn.WAIT}, t
        t += 5.0
    turns = e.observe({blob(1): [Bid("agent-a", size, leading=True, done=size)]}, deadline)
    assert turns == {blob(1): Turn.LEAD}


def test_a_leader_that_vanished_is_replaced_after_the_timeout() -> None:
    blobs = {blob(1): 100}
    electors = herd(AGENTS[1:], blobs)
    step(electors, blobs, 0.5, leading={blob(1): ("agent-a", 10)})
    # a is gone (SIGKILL): no bid from it any more. A blip is not enough to replace it.
    assert leaders(step(electors, blobs, 1.0)) == {}
    assert leaders(step(electors, blobs, 5.0)) == {}
    won = leaders(step(electors, blobs, 10.6))
    assert len(won[blob(1)]) == 1


def test_a_winner_that_never_starts_is_counted_out() -> None:
    blobs = {blob(1): 100}
    electors = herd(AGENTS, blobs)
    won = leaders(step(electors, blobs, 1.5))
    (first,) = won[blob(1)]
    # The winner crashed before it could start and its claim is gone from every view:
    # the others re-elect among themselves at once, exactly one of them.
    rest = {a: e for a, e in electors.items() if a != first}
    again = leaders(step(rest, blobs, 2.0))
    assert len(again[blob(1)]) == 1 and again[blob(1)][0] != first


def test_a_winner_seen_waiting_but_not_starting_is_suspected() -> None:
    blobs = {blob(1): 100}
    electors = herd(AGENTS[:3], blobs)
    won = leaders(step(electors, blobs, 1.5))
    (first,) = won[blob(1)]
    stuck = electors.pop(first)  # still claims (its bid stays in views) but never leads
    seen_by = {
        a: {blob(1): [Bid(first, 100)] + [Bid(o, 100) for o in electors if o != a]}
        for a in electors
    }
    for t in (2.0, 4.0):
        turns = {a: e.observe(seen_by[a], t) for a, e in electors.items()}
        assert leaders(turns) == {}
    turns = {a: e.observe(seen_by[a], 5.0) for a, e in electors.items()}
    assert len(leaders(turns)[blob(1)]) == 1
    assert stuck.waiting() == [blob(1)]


def test_blobs_led_for_other_repos_count_in_the_spread() -> None:
    # b already leads a big blob x (that a does not want); for the new blob y, the
    # idle agent a is preferred whatever the hash says.
    x, y = blob(10), blob(11)
    a = HerdElection("agent-a", CFG)
    a.want(y, 100, 0.0)
    turns = a.observe(
        {x: [Bid("agent-b", 1000, leading=True, done=5)], y: [Bid("agent-b", 100)]}, 1.5
    )
    assert turns == {y: Turn.LEAD}
    b = HerdElection("agent-b", CFG)
    b.want(y, 100, 0.0)
    turns = b.observe({y: [Bid("agent-a", 100)]}, 1.5, leading={x: 1000})
    assert turns == {y: Turn.WAIT}


def test_a_leader_with_every_byte_is_not_replaced_while_it_finishes() -> None:
    # Hashing and building the manifest of a big blob takes a while after the last
    # byte: no progress then, yet the leader is alive and answering.
    blobs = {blob(1): 100}
    electors = herd(AGENTS[1:], blobs)
    for t in (0.5, 12.0, 20.0, CFG.finish_time(100) - 1):
        turns = step(electors, blobs, t, leading={blob(1): ("agent-a", 100)})
        assert leaders(turns) == {}, f"replaced at {t}"


def test_a_leader_stuck_at_every_byte_is_replaced_after_its_finish_time() -> None:
    cfg = HerdConfig(settle=1.0, leader_timeout=15.0)
    size = 5_000_000_000
    e = HerdElection("a" * 32, cfg)
    e.want(blob(1), size, now=0.0)
    liar = Bid("f" * 32, size, leading=True, done=size)
    t = 0.0
    while t <= cfg.finish_time(size):
        assert e.observe({blob(1): [liar]}, now=t)[blob(1)] is not Turn.LEAD, t
        t += 5.0
    t += 5.0
    assert e.observe({blob(1): [liar]}, now=t)[blob(1)] is Turn.LEAD
    # far sooner than the overall deadline for a blob this big (hours)
    assert cfg.finish_time(size) < cfg.deadline(size) / 10


def test_a_distrusted_leader_is_out_at_once_and_the_follower_leads() -> None:
    """A leader its follower banned (its relay failed the hash) is counted out on the
    spot, though its claims still look live: the follower leads at its next look."""
    size = 1 << 20
    e = HerdElection("agent-b", CFG)
    e.want(blob(1), size, 0.0)
    liar = [Bid("agent-a", size, leading=True, done=size // 4)]
    assert e.observe({blob(1): liar}, 2.0)[blob(1)] is Turn.WAIT
    assert e.leader_of(blob(1)) == "agent-a"
    e.distrust(blob(1), "agent-a")
    assert e.leader_of(blob(1)) is None
    liar = [Bid("agent-a", size, leading=True, done=size // 2)]  # still "progressing"
    assert e.observe({blob(1): liar}, 2.5)[blob(1)] is Turn.LEAD
    assert "agent-a" in e.suspects(blob(1))


def test_a_leader_that_answers_without_its_claim_gave_up_and_is_replaced_at_once() -> None:
    """A leader whose fetch failed drops its claim but still answers surveys: it is out
    at the next look (a leader merely unseen is waited for until the leader timeout)."""
    size = 1 << 20
    e = HerdElection("agent-b", CFG)
    e.want(blob(1), size, 0.0)
    lead = [Bid("agent-a", size, leading=True, done=size // 4)]
    assert e.observe({blob(1): lead}, 2.0, answered={"agent-a"})[blob(1)] is Turn.WAIT
    assert e.leader_of(blob(1)) == "agent-a"
    # Unseen (its answer did not come): still waited for.
    assert e.observe({}, 2.5, answered=set())[blob(1)] is Turn.WAIT
    assert e.leader_of(blob(1)) == "agent-a"
    # It answered, with no claim on the blob: it gave up. We lead at once.
    assert e.observe({}, 3.0, answered={"agent-a"})[blob(1)] is Turn.LEAD
    assert "agent-a" in e.suspects(blob(1))


def test_a_leader_that_gave_up_is_replaced_by_exactly_one_of_its_followers() -> None:
    blobs = {blob(1): 1 << 20}
    followers = herd(AGENTS[1:3], blobs)  # agent-a leads
    for t, done in ((0.5, 1000), (1.5, 200_000), (2.0, 300_000)):
        seen = views(followers, blobs, {blob(1): ("agent-a", done)})
        turns = {a: e.observe(seen[a], t, answered=set(AGENTS)) for a, e in followers.items()}
        assert leaders(turns) == {}, t
    seen = views(followers, blobs)  # its fetch failed: no claim at all now
    turns = {a: e.observe(seen[a], 2.5, answered=set(AGENTS)) for a, e in followers.items()}
    assert len(leaders(turns).get(blob(1), [])) == 1, turns


def test_an_honest_restart_with_a_new_attempt_keeps_the_leader() -> None:
    """A leader whose mirror fetch failed its hash starts over from byte 0 and says so
    (a larger attempt): followed on, timed anew; its done shrinking alone is a lie."""
    size = 4 << 20
    e = HerdElection("agent-b", CFG)
    e.want(blob(1), size, 0.0)
    t, done = 0.5, 0
    while done < size - 1:  # the first attempt, at a believable pace
        bid = Bid("agent-a", size, leading=True, done=done)
        assert e.observe({blob(1): [bid]}, t)[blob(1)] is Turn.WAIT, t
        t, done = t + 1.0, min(size - 1, done + (1 << 20))
    restarted = Bid("agent-a", size, leading=True, done=0, attempt=1)
    assert e.observe({blob(1): [restarted]}, t)[blob(1)] is Turn.WAIT
    assert e.leader_of(blob(1)) == "agent-a" and not e.suspects(blob(1))
    # Timed anew: the rate window starts at the restart, not at the first attempt's mark.
    for i in range(1, 12):
        bid = Bid("agent-a", size, leading=True, done=i * 200_000, attempt=1)
        assert e.observe({blob(1): [bid]}, t + i)[blob(1)] is Turn.WAIT, i
    # Within the new attempt, done going back is a lie again.
    back = Bid("agent-a", size, leading=True, done=100, attempt=1)
    assert e.observe({blob(1): [back]}, t + 12)[blob(1)] is Turn.LEAD
    assert e.suspects(blob(1)) == {"agent-a"}


def test_an_attempt_that_goes_back_or_restarts_past_the_bound_is_a_lie() -> None:
    size = 1 << 20
    cfg = HerdConfig(settle=1.0, leader_timeout=10.0, start_timeout=3.0, max_restarts=3)
    # Back to an earlier attempt (a replay of old claims).
    e = HerdElection("agent-b", cfg)
    e.want(blob(1), size, 0.0)
    e.observe({blob(1): [Bid("agent-a", size, leading=True, done=500, attempt=2)]}, 0.5)
    assert e.leader_of(blob(1)) == "agent-a"
    e.observe({blob(1): [Bid("agent-a", size, leading=True, done=600, attempt=1)]}, 1.0)
    assert e.suspects(blob(1)) == {"agent-a"}
    # Restarting for ever: believed up to max_restarts, then counted out.
    e = HerdElection("agent-b", cfg)
    e.want(blob(1), size, 0.0)
    t = 0.5
    for attempt in range(cfg.max_restarts + 1):
        for done in (0, 300_000, 600_000):
            bid = Bid("agent-a", size, leading=True, done=done, attempt=attempt)
            assert e.observe({blob(1): [bid]}, t)[blob(1)] is Turn.WAIT, (attempt, done)
            t += 0.5
    bid = Bid("agent-a", size, leading=True, done=0, attempt=cfg.max_restarts + 1)
    assert e.observe({blob(1): [bid]}, t)[blob(1)] is Turn.LEAD
    assert e.suspects(blob(1)) == {"agent-a"}
