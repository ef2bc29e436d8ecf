"""The LAN tracker: the pure registry with a fake clock, its messages and BitTorrent
announce parsing, the HTTP service on 127.0.0.1:0, the CLI, and real libtorrent
sessions that find each other only through the tracker."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import libtorrent as lt
import msgpack
import pytest
from yarl import URL

from peer.discovery.peer_table import PeerTable
from peer.discovery.tracker_source import Trackers
from tracker import messages as m
from tracker.announce import (
    BadAnnounce,
    BtAnnounce,
    compact_peer,
    encode_answer,
    parse_announce,
    v2_tracker_key,
)
from tracker.bencode import bencode
from tracker.client import TrackerClient, TrackerPresence
from tracker.errors import (
    AgentIdTaken,
    RegisterFirst,
    TrackerFull,
    TrackerUnavailable,
    TrackerWireError,
    UnknownAgent,
)
from tracker.limits import ConnectionBook, RepeatFilter
from tracker.registry import Limits, Registry
from tracker.service import TrackerServer

TTL = 30.0
MSGPACK = "application/msgpack"


def blob(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def registry(**limits: int) -> Registry:
    return Registry(ttl=TTL, announce_interval=60, limits=Limits(**limits), rng=random.Random(7))


def ids_of(sources: Any) -> set[str]:
    return {a.agent_id for a in sources}


# --- registry: agents and blobs ---------------------------------------------------------


def test_agent_expires_after_ttl_without_heartbeat_and_its_blobs_with_it() -> None:
    r = registry()
    assert r.register("a", "10.0.0.1", 7851, 7852, now=0.0).new
    r.announce("a", [blob(1)], [blob(2)], now=0.0, source="10.0.0.1")
    assert r.agent("a", now=TTL - 0.01) is not None
    assert [s.blob_id for s in r.who([blob(1), blob(2)], now=TTL - 0.01)] == [blob(1), blob(2)]
    assert r.agent("a", now=TTL) is None  # the ttl is up exactly ttl after the last word
    assert r.who([blob(1), blob(2)], now=TTL) == []
    stats = r.stats(now=TTL)  # swept: the index holds nothing of it any more
    assert (stats.agents, stats.blobs, stats.holdings) == (0, 0, 0)


def test_heartbeat_and_announce_keep_an_agent_alive() -> None:
    r = registry()
    r.register("a", "10.0.0.1", 7851, 7852, now=0.0)
    r.announce("a", [blob(1)], [], now=0.0, source="10.0.0.1")
    assert not r.register("a", "10.0.0.1", 7851, 7852, now=20.0).new  # heartbeat
    r.announce("a", [blob(1)], [], now=45.0, source="10.0.0.1")  # an announce is a heartbeat too
    assert r.agent("a", now=74.0) is not None
    assert r.agent("a", now=75.0) is None
    # Back after expiry: a fresh record, flagged new so the agent announces again.
    reg = r.register("a", "10.0.0.9", 7851, 7852, now=80.0)
    assert reg.new and reg.info.host == "10.0.0.9"
    assert r.who([blob(1)], now=80.0) == []


def test_register_updates_the_ports_and_host_an_agent_gives_from_its_own_address() -> None:
    r = registry()
    r.register("a", "10.0.0.1", 7851, 7852, now=0.0)
    r.announce("a", [blob(1)], [], now=0.0, source="10.0.0.1")
    r.register("a", "a.lab", 9000, 9001, now=1.0, source="10.0.0.1")  # restarted, named
    (src,) = r.who([blob(1)], now=1.0)
    assert [(h.host, h.api_port, h.bt_port) for h in src.holders] == [("a.lab", 9000, 9001)]


def test_an_agent_id_is_bound_to_the_address_that_registered_it_for_its_ttl() -> None:
    r = registry()
    r.register("victim", "10.0.0.1", 7851, 7852, now=0.0, source="10.0.0.1")
    r.announce("victim", [blob(1)], [], now=0.0, source="10.0.0.1")
    with pytest.raises(AgentIdTaken) as e:  # the hijack: the id, moved to the attacker
        r.register("victim", "10.0.0.66", 1, 1, now=1.0, source="10.0.0.66")
    assert "registered from another address" in e.value.one_line()
    assert "10.0.0.1" not in e.value.one_line()  # the bound address is not disclosed
    with pytest.raises(AgentIdTaken):  # naming the victim's host from elsewhere: the same
        r.register("victim", "10.0.0.1", 1, 1, now=1.0, source="10.0.0.66")
    with pytest.raises(AgentIdTaken):  # nor can it empty the victim's sets
        r.announce("victim", [], [], now=1.0, source="10.0.0.66")
    (src,) = r.who([blob(1)], now=1.0)
    assert [(h.agent_id, h.host, h.api_port) for h in src.holders] == [("victim", "10.0.0.1", 7851)]
    # The victim heartbeats; the binding lives as long as the record.
    assert not r.register("victim", "10.0.0.1", 7851, 7852, now=25.0, source="10.0.0.1").new
    with pytest.raises(AgentIdTaken):
        r.register("victim", "10.0.0.66", 1, 1, now=54.9, source="10.0.0.66")
    # TTL without a heartbeat: the id is free, for anyone (open mode has no keys).
    assert r.register("victim", "10.0.0.2", 1, 1, now=55.0, source="10.0.0.2").new


def test_an_agent_restarting_on_its_host_gets_its_id_back_at_once() -> None:
    r = registry()
    r.register("a", "10.0.0.1", 7851, 7852, now=0.0, source="10.0.0.1")
    r.announce("a", [blob(1)], [], now=0.0, source="10.0.0.1")
    # Restarted with other ports (and counts it never announced to this record).
    reg = r.register("a", "10.0.0.1", 9000, 9001, now=1.0, source="10.0.0.1", announced=(0, 0))
    assert reg.new  # its counts are not the record's: it must announce everything again
    r.announce("a", [blob(2)], [], now=1.0, source="10.0.0.1")
    assert r.who([blob(1)], now=1.0) == []
    assert ids_of(r.who([blob(2)], now=1.0)[0].holders) == {"a"}


def test_a_heartbeat_whose_counts_differ_from_the_record_says_announce_again() -> None:
    r = registry()
    r.register("a", "10.0.0.1", 1, 1, now=0.0)
    r.announce("a", [blob(1), blob(2)], [blob(3)], now=0.0, source="10.0.0.1")
    assert not r.register("a", "10.0.0.1", 1, 1, now=1.0, announced=(2, 1)).new
    assert not r.register("a", "10.0.0.1", 1, 1, now=1.0).new  # an older agent: no counts
    r.announce("a", [], [], now=2.0, source="10.0.0.1")  # say the record lost its sets
    assert r.register("a", "10.0.0.1", 1, 1, now=3.0, announced=(2, 1)).new


def test_announce_replaces_the_agents_sets() -> None:
    r = registry()
    r.register("a", "10.0.0.1", 7851, 7852, now=0.0)
    r.announce("a", [blob(1), blob(2)], [blob(3)], now=0.0, source="10.0.0.1")
    r.announce("a", [blob(2), blob(3)], [blob(4)], now=1.0, source="10.0.0.1")  # blob 3 finished
    got = {s.blob_id: s for s in r.who([blob(i) for i in range(1, 5)], now=1.0)}
    assert set(got) == {blob(2), blob(3), blob(4)}
    assert ids_of(got[blob(3)].holders) == {"a"} and got[blob(3)].fetchers == ()
    assert got[blob(4)].holders == () and ids_of(got[blob(4)].fetchers) == {"a"}
    assert r.stats(now=1.0).holdings == 3
    r.announce("a", [], [], now=2.0, source="10.0.0.1")
    assert r.who([blob(i) for i in range(1, 5)], now=2.0) == []
    assert (r.stats(now=2.0).blobs, r.stats(now=2.0).holdings) == (0, 0)


def test_who_answers_only_live_agents() -> None:
    r = registry()
    r.register("old", "10.0.0.1", 1, 1, now=0.0)
    r.register("young", "10.0.0.2", 2, 2, now=0.0)
    r.announce("old", [blob(1)], [], now=0.0, source="10.0.0.1")
    r.announce("young", [], [blob(1)], now=20.0, source="10.0.0.2")
    (src,) = r.who([blob(1)], now=35.0)
    assert src.holders == () and ids_of(src.fetchers) == {"young"}
    assert (src.holders_total, src.fetchers_total) == (0, 1)
    with pytest.raises(UnknownAgent):
        r.announce("old", [blob(1)], [], now=35.0, source="10.0.0.1")


def test_a_clock_stepping_back_reads_as_no_time_passed() -> None:
    r = registry()
    r.register("a", "10.0.0.1", 1, 1, now=100.0)
    r.register("b", "10.0.0.2", 1, 1, now=50.0)  # recorded at 100: order stays sorted
    r.announce("a", [blob(1)], [], now=10.0, source="10.0.0.1")
    assert ids_of(r.who([blob(1)], now=129.9)[0].holders) == {"a"}
    assert r.agent("b", now=129.9) is not None
    assert r.who([blob(1)], now=130.0) == [] and r.stats(now=130.0).agents == 0


def test_announce_from_an_unknown_agent_is_refused() -> None:
    r = registry()
    with pytest.raises(UnknownAgent) as e:
        r.announce("ghost", [blob(1)], [], now=0.0, source="10.0.0.1")
    assert "register again" in e.value.one_line()
    assert r.who([blob(1)], now=0.0) == []


def test_agent_table_is_bounded_and_expired_agents_free_their_slots() -> None:
    r = registry(max_agents=2)
    r.register("a", "10.0.0.1", 1, 1, now=0.0)
    r.register("b", "10.0.0.2", 1, 1, now=10.0)
    with pytest.raises(TrackerFull):
        r.register("c", "10.0.0.3", 1, 1, now=10.0)
    r.register("b", "10.0.0.2", 1, 1, now=11.0)  # known agents still heartbeat
    assert r.register("c", "10.0.0.3", 1, 1, now=TTL).new  # "a" expired at ttl
    assert r.agent("a", now=TTL) is None


def test_holdings_are_bounded_per_agent_and_in_total() -> None:
    r = registry(max_held_per_agent=3, max_fetching_per_agent=1, max_holdings=5)
    r.register("a", "10.0.0.1", 1, 1, now=0.0)
    r.register("b", "10.0.0.2", 1, 1, now=0.0)
    with pytest.raises(TrackerFull, match="per-agent"):
        r.announce("a", [blob(i) for i in range(4)], [], now=0.0, source="10.0.0.1")
    with pytest.raises(TrackerFull, match="per-agent"):
        r.announce("a", [], [blob(1), blob(2)], now=0.0, source="10.0.0.1")
    r.announce("a", [blob(1), blob(2), blob(3)], [], now=0.0, source="10.0.0.1")
    with pytest.raises(TrackerFull, match="index is full"):
        r.announce("b", [blob(1), blob(2), blob(3)], [], now=0.0, source="10.0.0.2")
    assert r.who([blob(1)], now=0.0)[0].holders_total == 1  # the refused one left no trace
    r.announce("a", [blob(1)], [], now=1.0, source="10.0.0.1")  # shrinking frees room
    r.announce("b", [blob(1), blob(2), blob(3)], [blob(4)], now=1.0, source="10.0.0.2")
    assert r.stats(now=1.0).holdings == 5


def test_who_lists_a_bounded_random_sample_with_true_totals() -> None:
    r = registry(max_answer_peers=4)
    for i in range(10):
        r.register(f"a{i}", f"10.0.0.{i + 1}", 7851, 7852, now=0.0)
        r.announce(f"a{i}", [blob(1)], [], now=0.0, source=f"10.0.0.{i + 1}")
    first = r.who([blob(1)], now=0.0)[0]
    assert len(first.holders) == 4 and first.holders_total == 10
    seen = set()
    for _ in range(20):
        seen |= ids_of(r.who([blob(1)], now=0.0)[0].holders)
    assert len(seen) > 4  # load spreads over the holders, not always the same four


# --- registry: BitTorrent swarms --------------------------------------------------------

IH = bytes(range(20))


def bt(
    ip: str, port: int, *, seed: bool = False, event: str = "", numwant: int | None = None
) -> BtAnnounce:
    return BtAnnounce(IH, b"-XX0000-" + b"x" * 12, ip, port, event, seed, numwant)


def test_bt_peers_find_each_other_and_stopped_leaves() -> None:
    r = registry()
    seed = r.bt_announce(bt("10.0.0.1", 6881, seed=True, event="started"), now=0.0)
    assert seed.peers == () and seed.recorded
    leech = r.bt_announce(bt("10.0.0.2", 6881, event="started"), now=1.0)
    assert leech.peers == (compact_peer("10.0.0.1", 6881),)
    assert (leech.complete, leech.incomplete) == (1, 1)
    # A seed gets the leecher but never another seed.
    r.bt_announce(bt("10.0.0.3", 6881, seed=True), now=1.0)
    again = r.bt_announce(bt("10.0.0.1", 6881, seed=True), now=2.0)
    assert again.peers == (compact_peer("10.0.0.2", 6881),)
    r.bt_announce(bt("10.0.0.2", 6881, event="stopped"), now=3.0)
    assert sorted(p[:2] for p in r.bt_peers(IH, now=3.0)) == [
        ("10.0.0.1", 6881),
        ("10.0.0.3", 6881),
    ]


def test_bt_peers_expire_after_their_ttl_and_empty_swarms_go() -> None:
    r = registry()  # announce_interval 60 -> peers live 2 * 60 + 30 s
    r.bt_announce(bt("10.0.0.1", 6881), now=0.0)
    r.bt_announce(bt("10.0.0.2", 6881), now=100.0)
    assert len(r.bt_peers(IH, now=149.0)) == 2
    answer = r.bt_announce(bt("10.0.0.3", 6881), now=150.0)
    assert answer.peers == (compact_peer("10.0.0.2", 6881),)
    assert r.stats(now=150.0).bt_peers == 2
    r.expire(now=1000.0)
    assert (r.stats(now=1000.0).swarms, r.stats(now=1000.0).bt_peers) == (0, 0)


def test_bt_tables_are_bounded_but_a_refused_peer_still_gets_peers() -> None:
    r = registry(max_peers_per_swarm=2, max_numwant=3)
    r.bt_announce(bt("10.0.0.1", 1), now=0.0)
    r.bt_announce(bt("10.0.0.2", 1), now=0.0)
    late = r.bt_announce(bt("10.0.0.3", 1), now=0.0)
    assert not late.recorded and len(late.peers) == 2
    assert len(r.bt_peers(IH, now=0.0)) == 2
    r2 = registry(max_numwant=3)
    for i in range(10):
        r2.bt_announce(bt(f"10.0.1.{i}", 1), now=0.0)
    assert len(r2.bt_announce(bt("10.0.2.1", 1, numwant=1000), now=0.0).peers) == 3
    assert len(r2.bt_announce(bt("10.0.2.1", 1, numwant=0), now=0.0).peers) == 0


# --- messages -----------------------------------------------------------------------------


def test_messages_round_trip() -> None:
    addr = m.AgentAddress(agent_id="a-1", host="10.0.0.1", api_port=7851, bt_port=0)
    samples: list[m.Message] = [
        m.Register(agent_id="a-1", api_port=7851, bt_port=7852),
        m.Register(agent_id="a-1", api_port=7851, bt_port=7852, host="node7.lab"),
        m.Registered(agent_id="a-1", host="fe80::1", ttl=30.0, heartbeat=10.0, new=True),
        m.Announce(agent_id="a-1", held=(blob(1), "b" * 40), fetching=(blob(2),)),
        m.Announced(held=2, fetching=1),
        m.Who(blob_ids=(blob(1),)),
        m.WhoAnswer(
            blobs=(
                m.BlobSources(
                    blob_id=blob(1),
                    holders=(addr,),
                    fetchers=(),
                    holders_total=5,
                    fetchers_total=0,
                ),
            )
        ),
        m.TrackerHealth(agents=1, blobs=2, swarms=3, bt_peers=4, ttl=30.0, announce_interval=300),
        m.Problem(code="register_first", message="who are you?"),
    ]
    for msg in samples:
        assert m.decode(m.encode(msg)) == msg


def test_optional_fields_keep_older_and_newer_sides_talking() -> None:
    # An older agent's register (no host, no counts) decodes; the defaults stand.
    old = m.decode_as(raw(REGISTER), m.Register)
    assert (old.host, old.held, old.fetching) == ("", -1, -1)
    # Ours leaves the counts out until there are some, so older trackers decode it...
    assert set(msgpack.unpackb(m.encode(m.Register(agent_id="a", api_port=1, bt_port=0)))) == {
        *REGISTER,
        "host",
    }
    # ...and sends them once there are.
    counted = m.Register(agent_id="a", api_port=1, bt_port=0, held=3, fetching=0)
    assert m.decode(m.encode(counted)) == counted


def test_every_message_schema_names_exactly_its_fields() -> None:
    for cls in m.MESSAGE_TYPES.values():
        names = {f.name for f in dataclasses.fields(cls)} - {"version"}
        assert set(cls.SCHEMA) == names, cls.TYPE


def raw(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


REGISTER = {"type": "register", "version": 1, "agent_id": "a", "api_port": 1, "bt_port": 0}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"api_port": True}, "expected an integer"),
        ({"api_port": 0}, "outside 1..65535"),
        ({"host": "0.0.0.0"}, "not an address a peer can connect to"),
        ({"host": "bad host!"}, "neither an IP address nor a host name"),
        ({"agent_id": "-x"}, "not an agent id"),
        ({"extra": 1}, "unexpected fields"),
        ({"type": "nope"}, "unknown message type"),
    ],
)
def test_decode_rejects_invalid_fields(change: dict[str, Any], error: str) -> None:
    with pytest.raises(TrackerWireError, match=error):
        m.decode(raw({**REGISTER, "host": "", **change}))


def test_decode_is_strict_about_versions_sizes_and_shapes() -> None:
    with pytest.raises(m.UnsupportedVersion, match="version 2"):
        m.decode(raw({**REGISTER, "host": "", "version": 2}))
    with pytest.raises(TrackerWireError, match="missing fields"):
        m.decode(raw({k: v for k, v in REGISTER.items() if k != "agent_id"}))
    too_many = [blob(i) for i in range(m.MAX_HELD + 1)]
    with pytest.raises(TrackerWireError):
        m.decode(
            raw(
                {
                    "type": "announce",
                    "version": 1,
                    "agent_id": "a",
                    "held": too_many,
                    "fetching": [],
                }
            ),
            max_bytes=16 * m.MAX_REQUEST_BYTES,
        )
    both = {"type": "announce", "version": 1, "agent_id": "a", "held": [blob(1)]}
    with pytest.raises(TrackerWireError, match="both held and fetching"):
        m.decode(raw({**both, "fetching": [blob(1)]}))
    with pytest.raises(TrackerWireError, match="duplicate"):
        m.decode(raw({**both, "held": [blob(1), blob(1)], "fetching": []}))
    with pytest.raises(TrackerWireError, match="outside 1"):
        m.decode(raw({"type": "who", "version": 1, "blob_ids": []}))
    with pytest.raises(TrackerWireError, match="not a valid msgpack"):
        m.decode(b"\xc1")
    with pytest.raises(TrackerWireError, match="over the"):
        m.decode(b"\x90" * (m.MAX_REQUEST_BYTES + 1))
    with pytest.raises(ValueError, match="refusing to send"):
        m.encode(m.Register(agent_id="a", api_port=70000, bt_port=0))


# --- BitTorrent announce parsing and bencode ------------------------------------------------


def test_bencode_matches_bep3() -> None:
    assert bencode({"b": 1, "a": [b"xy", "z", -3]}) == b"d1:al2:xy1:zi-3ee1:bi1ee"
    assert bencode({b"\xff": b"", b"a": 0}) == b"d1:ai0e1:\xff0:e"  # keys sorted as bytes
    with pytest.raises(TypeError):
        bencode(True)
    answer = bdecode(
        encode_answer(
            [compact_peer("10.0.0.1", 6881), compact_peer("::1", 80)],
            interval=300,
            complete=1,
            incomplete=2,
        )
    )
    assert answer[b"peers"] == bytes([10, 0, 0, 1, 0x1A, 0xE1])
    assert answer[b"peers6"] == bytes(15) + b"\x01\x00\x50"
    assert answer[b"interval"] == 300


def bdecode(data: bytes) -> dict[bytes, Any]:
    """libtorrent's bdecode: an independent check of what our encoder wrote."""
    value: Any = lt.bdecode(data)
    assert isinstance(value, dict), data[:100]
    return value


def query(**params: str) -> str:
    base = {
        "info_hash": "%00" * 19 + "%FF",
        "peer_id": "-LT2110-abcdefghijkl",
        "port": "6881",
        "compact": "1",
    }
    return "&".join(f"{k}={v}" for k, v in {**base, **params}.items())


def test_parse_announce_reads_raw_bytes() -> None:
    ann = parse_announce(query(info_hash="%DB%81+" + "a" * 17, left="0"), "::ffff:10.0.0.7")
    assert ann.info_hash == b"\xdb\x81+" + b"a" * 17  # not UTF-8, "+" is not a space
    assert (ann.ip, ann.port, ann.seed, ann.event) == ("10.0.0.7", 6881, True, "")
    # ip= is ignored, like opentracker: a peer is listed at the address it sent from.
    for forged in ("10.9.9.9", "10.0.0.7", "0.0.0.0", "nonsense"):
        assert parse_announce(query(ip=forged), "10.0.0.7").ip == "10.0.0.7"


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"info_hash": "%00" * 32}, "truncated to 20 bytes"),
        ({"info_hash": "abc"}, "3 bytes, expected 20"),
        ({"compact": "0"}, "compact=1"),
        ({"port": "0"}, "port"),
        ({"port": "x"}, "not a non-negative integer"),
        ({"event": "exploded"}, "unknown event"),
        ({"info_hash": "%G0"}, "malformed"),
    ],
)
def test_parse_announce_refuses_bad_requests(params: dict[str, str], reason: str) -> None:
    with pytest.raises(BadAnnounce, match=reason):
        parse_announce(query(**params), "10.0.0.7")
    with pytest.raises(BadAnnounce, match="repeats"):
        parse_announce(query() + "&port=1", "10.0.0.7")


# --- HTTP service ----------------------------------------------------------------------------


async def post(url: str, body: bytes, content_type: str = MSGPACK) -> tuple[int, m.Problem]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=body, headers={"Content-Type": content_type}) as r,
    ):
        return r.status, m.decode_as(await r.read(), m.Problem)


async def test_register_announce_who_round_trip() -> None:
    async with (
        TrackerServer(host="127.0.0.1", port=0, ttl=TTL) as t,
        TrackerClient(t.url) as c,
    ):
        reg = await c.register("agent-a", api_port=7851, bt_port=7852)
        assert (reg.host, reg.ttl, reg.heartbeat, reg.new) == ("127.0.0.1", TTL, TTL / 3, True)
        assert not (await c.register("agent-a", api_port=7851, bt_port=7852)).new
        await c.register("agent-b", api_port=9001, bt_port=0, host="node-b.lab")
        assert await c.announce("agent-a", [blob(1), blob(2)], [blob(3)]) == m.Announced(
            held=2, fetching=1
        )
        await c.announce("agent-b", [blob(1)])
        got = await c.who([blob(1), blob(3), blob(99)])
        assert set(got) == {blob(1), blob(3)}
        assert {(h.agent_id, h.host, h.api_port, h.bt_port) for h in got[blob(1)].holders} == {
            ("agent-a", "127.0.0.1", 7851, 7852),
            ("agent-b", "node-b.lab", 9001, 0),
        }
        assert ids_of(got[blob(3)].fetchers) == {"agent-a"}
        health = await c.health()
        assert (health.agents, health.blobs) == (2, 3)


async def test_agents_expire_on_the_servers_clock() -> None:
    clock = FakeClock()
    async with (
        TrackerServer(host="127.0.0.1", port=0, ttl=TTL, clock=clock) as t,
        TrackerClient(t.url) as c,
    ):
        await c.register("agent-a", 7851, 7852)
        await c.announce("agent-a", [blob(1)])
        clock.advance(TTL)
        assert await c.who([blob(1)]) == {}
        with pytest.raises(RegisterFirst):
            await c.announce("agent-a", [blob(1)])


async def test_restarted_tracker_answers_409_and_agents_reregister(tmp_path: Path) -> None:
    async with TrackerServer(host="127.0.0.1", port=0) as first, TrackerClient(first.url) as c:
        port = first.port
        await c.register("agent-a", 7851, 7852)
        await c.announce("agent-a", [blob(1)])
    async with TrackerServer(host="127.0.0.1", port=port) as second, TrackerClient(second.url) as c:
        with pytest.raises(RegisterFirst, match="does not know this agent"):
            await c.announce("agent-a", [blob(1)])
        assert (await c.register("agent-a", 7851, 7852)).new  # "announce again now"
        await c.announce("agent-a", [blob(1)])
        assert ids_of((await c.who([blob(1)]))[blob(1)].holders) == {"agent-a"}


async def test_presence_recovers_from_a_tracker_restart_by_itself() -> None:
    held = [blob(1)]
    async with TrackerServer(host="127.0.0.1", port=0) as first:
        url, port = first.url, first.port
        async with TrackerClient(url) as c:
            presence = TrackerPresence(
                c, agent_id="agent-a", api_port=7851, bt_port=7852, holdings=lambda: (held, ())
            )
            assert await presence.step() == pytest.approx(10.0)
            assert blob(1) in await c.who([blob(1)])
            held.append(blob(2))
            presence.changed()
            await presence.step()
            assert blob(2) in await c.who([blob(2)])
            await first.__aexit__(None, None, None)  # the tracker dies, the agent lives on
            with pytest.raises(TrackerUnavailable):
                await presence.step()
            async with TrackerServer(host="127.0.0.1", port=port):
                await presence.step()  # a heartbeat; the answer says "new", so it announces
                assert set(await c.who([blob(1), blob(2)])) == {blob(1), blob(2)}


async def test_trackers_reach_every_source_once_bound_and_nothing_before() -> None:
    held = [blob(1)]
    async with (
        TrackerServer(host="127.0.0.1", port=0) as t1,
        TrackerServer(host="127.0.0.1", port=0) as t2,
        TrackerClient(t2.url) as other,
        PeerTable("agent-a") as peers,
    ):
        await other.register("agent-b", api_port=9001, bt_port=9002)
        await other.announce("agent-b", [blob(7)])
        trackers = Trackers(
            [t1.url, t2.url], agent_id="agent-a", peers=peers, holdings=lambda: (held, ())
        )
        # Made before the agent's listeners: the herd may call both at once, harmlessly.
        await trackers.lookup((blob(7),))
        trackers.nudge()
        assert peers.candidates() == []
        async with trackers.bound("127.0.0.1", 7851, 7852):
            assert [s.url for s in trackers.sources] == [t1.url, t2.url]
            await trackers.lookup((blob(7),))  # only the second tracker knows agent-b
            assert ("127.0.0.1", 9001) in peers.candidates()
            trackers.nudge()
            for s in trackers.sources:
                await s.presence.step()
                async with TrackerClient(s.url) as c:
                    assert ids_of((await c.who([blob(1)]))[blob(1)].holders) == {"agent-a"}
        assert trackers.sources == []


async def test_bad_requests_get_clear_problems() -> None:
    async with TrackerServer(host="127.0.0.1", port=0) as t:
        status, problem = await post(f"{t.url}/v1/register", b"\x93\x01")
        assert status == 400 and problem.code == "bad_message"
        assert "not a valid msgpack message" in problem.message
        status, problem = await post(f"{t.url}/v1/announce", m.encode(m.Who(blob_ids=(blob(1),))))
        assert (status, problem.code) == (400, "bad_message")
        assert "expected a announce message, got a who" in problem.message
        status, problem = await post(f"{t.url}/v1/register", b"{}", "application/json")
        assert (status, problem.code) == (415, "wrong_content_type")
        status, problem = await post(f"{t.url}/v1/who", bytes(m.MAX_REQUEST_BYTES + 1))
        assert (status, problem.code) == (413, "too_large")
        future = raw({**REGISTER, "host": "", "version": 9})
        status, problem = await post(f"{t.url}/v1/register", future)
        assert (status, problem.code) == (400, "unsupported_version")


async def test_bt_announce_over_http_reads_the_raw_query() -> None:
    # Bytes that a decoded query (request.query_string) turns into "%", " ", "+", "&".
    ih = "%25%20%2B%26" + "%00" * 16
    async with TrackerServer(host="127.0.0.1", port=0) as t, aiohttp.ClientSession() as s:

        async def announce(**params: str) -> dict[bytes, Any]:
            # encoded=True: yarl must send the query exactly as written.
            url = URL(f"{t.url}/announce?{query(info_hash=ih, **params)}", encoded=True)
            async with s.get(url) as r:
                assert r.status == 200  # BitTorrent clients read failures from the body
                return bdecode(await r.read())

        first = await announce(left="0", event="started")
        assert first[b"peers"] == b"" and first[b"complete"] == 1
        second = await announce(port="7000", left="5")
        assert second[b"peers"] == compact_peer("127.0.0.1", 6881)
        assert (second[b"interval"], second[b"complete"], second[b"incomplete"]) == (300, 1, 1)
        assert len(t.registry.bt_peers(b"% +&" + bytes(16), t.clock())) == 2
        bad = await announce(compact="0")
        assert b"compact=1" in bad[b"failure reason"]


# --- the CLI -----------------------------------------------------------------------------------


async def test_cli_prints_its_url_first_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "--listen", "127.0.0.1:0", "--ttl", "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        url = line.decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with TrackerClient(url) as c:
            assert (await c.health()).ttl == 5.0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_refuses_a_bad_listen_address() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "--listen", "nonsense",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert b"is not HOST:PORT" in err


# --- real libtorrent ---------------------------------------------------------------------------


async def eventually(pred: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Polls state that has no event to wait on (libtorrent, the registry)."""
    for _ in range(int(seconds / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


LT_SETTINGS: dict[str, Any] = {
    "listen_interfaces": "127.0.0.1:0",
    "enable_dht": False,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "enable_outgoing_utp": False,
    "enable_incoming_utp": False,
    "allow_multiple_connections_per_ip": True,
    "alert_mask": int(
        lt.alert.category_t.tracker_notification | lt.alert.category_t.error_notification
    ),
}


async def test_libtorrent_peers_find_each_other_only_through_the_tracker(tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 999)
    seed_dir, get_dir = tmp_path / "seed", tmp_path / "get"
    seed_dir.mkdir()
    get_dir.mkdir()
    (seed_dir / "blob").write_bytes(data)

    async with TrackerServer(host="127.0.0.1", port=0, ttl=TTL) as t:
        ct = lt.create_torrent(
            lt.list_files(str(seed_dir / "blob")), 64 * 1024, flags=lt.create_torrent.v2_only
        )
        ct.add_tracker(f"{t.url}/announce")
        lt.set_piece_hashes(ct, str(seed_dir))
        ti = lt.torrent_info(lt.bencode(ct.generate()))
        assert not ti.info_hashes().has_v1()
        v2_hex = str(ti.info_hashes().v2)
        key = v2_tracker_key(v2_hex)

        new_session: Any = lt.session  # the stubs miss the dict form of settings_pack
        sessions = [new_session(dict(LT_SETTINGS)) for _ in range(2)]
        handles = []
        for ses, where in zip(sessions, (seed_dir, get_dir), strict=True):
            atp = lt.add_torrent_params()
            atp.ti = lt.torrent_info(ti)
            atp.save_path = str(where)
            handles.append(ses.add_torrent(atp))
        # No connect_peer, no DHT/LSD: the tracker is the only way they can meet.
        started = time.monotonic()
        alerts: list[str] = []
        replies: list[list[int]] = [[], []]  # peers received, per tracker reply, per session

        def pump() -> None:
            for ses, got in zip(sessions, replies, strict=True):
                for a in ses.pop_alerts():
                    alerts.append(f"{a.what()}: {a.message()}")
                    if isinstance(a, lt.tracker_reply_alert):
                        got.append(a.num_peers)

        try:
            async with asyncio.timeout(20):
                while not handles[1].status().is_seeding:
                    await asyncio.sleep(0.05)
                    pump()
        except TimeoutError:
            pytest.fail(f"download did not complete via the tracker; alerts: {alerts[-10:]}")
        elapsed = time.monotonic() - started
        # Seeding means every piece passed its hash; libtorrent 2 hashes from its
        # store buffer, so the last writes may still be on their way to the file.
        handles[1].flush_cache()
        for _ in range(200):  # 10 s at most
            if (get_dir / "blob").read_bytes() == data:
                break
            await asyncio.sleep(0.05)
        assert (get_dir / "blob").read_bytes() == data
        # libtorrent announced the v2 info-hash truncated to 20 bytes (a 32-byte one
        # would have been refused): one swarm, under that key, with both peers.
        assert t.registry.stats(t.clock()).swarms == 1
        ports = {ses.listen_port() for ses in sessions}
        assert {p for _, p, _ in t.registry.bt_peers(key, t.clock())} == ports
        assert max(replies[0] + replies[1]) >= 1  # the tracker handed out peers
        print(f"download via the tracker finished {elapsed:.2f} s after adding the torrents")

        # Removing a torrent announces event=stopped and the swarm empties. Not while
        # the getter's "completed" announce is in flight: libtorrent 2.1.1 then sends
        # no "stopped" at all (seen in about 1 run of 3).
        def completed_answered() -> bool:
            pump()
            return len(replies[1]) >= 2  # started, completed

        await eventually(completed_answered, "the completed announce")
        assert all(seed for _, _, seed in t.registry.bt_peers(key, t.clock()))
        for ses, h in zip(sessions, handles, strict=True):
            ses.remove_torrent(h)
        await eventually(lambda: not t.registry.bt_peers(key, t.clock()), "stopped announces")

        def close() -> None:
            # libtorrent's destructor joins its threads: not on the event loop.
            handles.clear()
            sessions.clear()

        await asyncio.to_thread(close)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Limits(max_agents=0)
    with pytest.raises(ValueError):
        Limits(max_answer_peers=m.MAX_ANSWER_PEERS + 1)
    assert dataclasses.replace(Limits(), max_agents=5).max_agents == 5


async def test_agent_swarm_sessions_announce_to_the_lan_tracker_when_told(tmp_path: Path) -> None:
    """SwarmSettings.trackers go on every torrent; a torrent added with announce=False
    reaches the tracker only after `announce` (a download counts what it resumed first)."""
    from peer.manifests import VerifiedBlob, make_manifest
    from peer.transfer.swarm import SwarmSession, SwarmSettings

    data = os.urandom(3 * 1024 * 1024)
    blob = hashlib.sha256(data).hexdigest()
    (tmp_path / blob).write_bytes(data)
    manifest = await make_manifest(VerifiedBlob(blob, len(data), tmp_path / blob), "t")
    async with TrackerServer(host="127.0.0.1", port=0, ttl=TTL) as t:
        settings = SwarmSettings(
            listen_host="127.0.0.1", listen_port=0, trackers=(f"{t.url}/announce",)
        )
        async with SwarmSession(settings) as s:
            ih = await s.add_torrent(manifest.torrent, tmp_path, seed_mode=True, announce=False)
            key = bytes.fromhex(ih)[:20]
            await asyncio.sleep(1.5)  # libtorrent announces at once when it has a tracker
            assert t.registry.bt_peers(key, t.clock()) == []
            s.announce(ih)
            await eventually(lambda: bool(t.registry.bt_peers(key, t.clock())), "an announce")
            assert t.registry.bt_peers(key, t.clock()) == [("127.0.0.1", s.listen_port, True)]


# --- listener limits (pure) ----------------------------------------------------------------


def test_connection_book_caps_each_address_and_makes_room_from_the_greediest() -> None:
    book = ConnectionBook(max_total=4, max_per_ip=3)
    assert book.admit("a1", "A") == (True, None)
    assert book.admit("a2", "A") == (True, None)
    assert book.admit("a3", "A") == (True, None)
    assert book.admit("a4", "A") == (False, None)  # the per-address cap
    assert book.admit("b1", "B") == (True, None)  # total now 4: full
    assert book.admit("c1", "C") == (True, "a1")  # full: A's oldest makes room
    assert book.admit("d1", "D") == (True, "a2")  # A still holds the most
    assert book.admit("e1", "E") == (False, None)  # one each now: nobody is greedy
    assert book.admit("b2", "B") == (False, None)  # and B may not become so
    book.release("c1")
    assert book.admit("e1", "E") == (True, None)
    assert len(book) == 4 and [book.count(ip) for ip in "ABCDE"] == [1, 1, 0, 1, 1]


def test_repeated_log_records_are_held_back_and_counted() -> None:
    now = [0.0]
    f = RepeatFilter(60.0, lambda: now[0])

    def record(msg: str, exc: type[BaseException] | None = None) -> logging.LogRecord:
        exc_info = (exc, exc(), None) if exc is not None else None
        return logging.LogRecord("t", logging.ERROR, __file__, 1, msg, None, exc_info)

    assert f.filter(record("accept failed", OSError))
    assert not any(f.filter(record("accept failed", OSError)) for _ in range(1000))
    assert f.filter(record("accept failed", ValueError))  # another kind of trouble
    assert f.filter(record("other"))
    now[0] = 61.0
    again = record("accept failed", OSError)
    assert f.filter(again) and "1000 more like this" in again.getMessage()
