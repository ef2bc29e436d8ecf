"""The tracker's state, pure: every call takes ``now``; no sockets, no clock, no tasks.

Three tables:

- agents: agent id -> where to reach it (API host/port, BitTorrent port) and when it
  last spoke; a record lives ``ttl`` seconds after its last register or announce;
- per blob id: which agents hold it and which are fetching it, as announced (each
  announce replaces that agent's sets); entries die with their agent;
- per BitTorrent swarm (the 20 bytes an announce carries): peers (ip, port) from
  standard announces, each living ``bt_peer_ttl`` after its last announce.

Nothing here is worth persisting: agents heartbeat every few seconds and announce again
when `register` says ``new`` (or an announce raises `UnknownAgent`), and BitTorrent
clients re-announce on their interval, so a restarted tracker refills itself.

An agent id belongs to the address (``source``: the connection's IP, as the service
sees it) that registered it, for as long as its record lives: a register or announce
for that id from anywhere else raises `AgentIdTaken`, so nobody can move another
agent's record to their own address or empty its sets. The binding lapses with the
record (``ttl`` without a heartbeat); an agent restarting on the same host gets its id
back at once. A heartbeat may carry the counts the agent last announced: if the
tracker holds other counts (anything made it forget), the answer says ``new`` and the
agent announces everything again.

Expiry is driven by the calls themselves: every call first drops what expired. Records
sit in insertion-ordered maps, refreshed by moving to the end, so they stay sorted by
last contact and a sweep costs O(expired) (O(1) when nothing expired), not O(all).
After it, everything in the tables is live, so queries need no per-entry checks. That
order needs ``now`` never to go backwards: the registry clamps it to the highest value
seen (a clock that steps back reads as "no time passed").

Every table is bounded (`Limits`): a full table refuses newcomers rather than growing
without end or evicting live entries (agents and announces get `TrackerFull`; a
BitTorrent peer still gets peers, it is just not listed for others).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from tracker import messages as m
from tracker.announce import BtAnnounce, compact_peer
from tracker.errors import AgentIdTaken, TrackerFull, UnknownAgent


@dataclass(frozen=True)
class Limits:
    max_agents: int = 10_000
    # Sum over agents of held + fetching entries (~100 bytes each): the memory bound.
    max_holdings: int = 2_000_000
    max_held_per_agent: int = m.MAX_HELD
    max_fetching_per_agent: int = m.MAX_FETCHING
    max_answer_peers: int = m.MAX_ANSWER_PEERS
    max_who_blobs: int = m.MAX_WHO_BLOBS
    max_swarms: int = 100_000
    max_peers_per_swarm: int = 2_000
    max_bt_peers: int = 1_000_000
    default_numwant: int = 50
    max_numwant: int = 200

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if type(value) is not int or value < 1:
                raise ValueError(f"tracker limit {name} must be a positive integer")
        if self.max_answer_peers > m.MAX_ANSWER_PEERS or self.max_who_blobs > m.MAX_WHO_BLOBS:
            raise ValueError("answer limits cannot exceed what the wire format carries")


@dataclass(frozen=True)
class AgentInfo:
    agent_id: str
    host: str
    api_port: int
    bt_port: int


@dataclass(frozen=True)
class Registration:
    info: AgentInfo
    # The agent must announce again: the tracker had no live record of it, or its
    # record's counts are not the ones the agent says it announced.
    new: bool


@dataclass(frozen=True)
class Sources:
    blob_id: str
    holders: tuple[AgentInfo, ...]  # a random sample of at most max_answer_peers
    fetchers: tuple[AgentInfo, ...]
    holders_total: int
    fetchers_total: int


@dataclass(frozen=True)
class BtAnswer:
    peers: tuple[bytes, ...]  # compact (6 or 18 bytes each)
    complete: int  # seeds in the swarm
    incomplete: int
    recorded: bool  # False: a table was full, the announcer got peers but is not listed


@dataclass(frozen=True)
class Stats:
    agents: int
    blobs: int
    holdings: int
    swarms: int
    bt_peers: int


@dataclass(slots=True)
class _Agent:
    info: AgentInfo
    source: str  # the address the id is bound to while the record lives
    last_seen: float
    held: frozenset[str] = frozenset()
    fetching: frozenset[str] = frozenset()


@dataclass(slots=True)
class _BtPeer:
    compact: bytes
    seed: bool  # its last announce sent left=0 or event=completed


@dataclass(slots=True)
class _Swarm:
    peers: dict[tuple[str, int], _BtPeer] = field(default_factory=dict)
    seeds: int = 0


class Registry:
    def __init__(
        self,
        *,
        ttl: float,
        announce_interval: int = 300,
        bt_peer_ttl: float | None = None,
        limits: Limits | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < ttl <= m.MAX_SECONDS:
            raise ValueError(f"ttl must be in (0, {m.MAX_SECONDS}] seconds")
        if not 1 <= announce_interval <= int(m.MAX_SECONDS):
            raise ValueError("announce_interval must be 1..86400 seconds")
        self.ttl = ttl
        self.announce_interval = announce_interval
        # One missed re-announce is tolerated, plus slack for a slow client.
        self.bt_peer_ttl = bt_peer_ttl if bt_peer_ttl is not None else 2 * announce_interval + 30
        self.limits = limits or Limits()
        self._rng = rng or random.Random()
        self._now = float("-inf")
        self._agents: OrderedDict[str, _Agent] = OrderedDict()  # oldest heartbeat first
        self._holders: dict[str, set[str]] = {}
        self._fetchers: dict[str, set[str]] = {}
        self._holdings = 0
        self._swarms: dict[bytes, _Swarm] = {}
        # (swarm, ip, port) -> last announce, oldest first: the BitTorrent expiry queue.
        self._bt_order: OrderedDict[tuple[bytes, str, int], float] = OrderedDict()

    @property
    def heartbeat(self) -> float:
        """How often agents should register again: three chances before they expire."""
        return self.ttl / 3

    # -- agents ------------------------------------------------------------------------

    def register(
        self,
        agent_id: str,
        host: str,
        api_port: int,
        bt_port: int,
        now: float,
        *,
        source: str | None = None,
        announced: tuple[int, int] | None = None,
    ) -> Registration:
        """Register or heartbeat from ``source`` (default: ``host``). A known agent's
        ports and host are updated, but only from the address its id is bound to (else
        `AgentIdTaken`). ``announced``: the (held, fetching) counts the agent last had
        accepted; other counts here make the answer ``new``."""
        now = self._advance(now)
        src = host if source is None else source
        info = AgentInfo(agent_id, host, api_port, bt_port)
        agent = self._agents.get(agent_id)
        if agent is None:
            if len(self._agents) >= self.limits.max_agents:
                raise TrackerFull(
                    f"the tracker already tracks {self.limits.max_agents} agents",
                    hint="retry later, or start the tracker with a higher agent limit",
                )
            self._agents[agent_id] = _Agent(info, src, now)
            return Registration(info, new=True)
        self._check_bound(agent_id, agent, src)
        agent.info = info
        self._touch(agent_id, agent, now)
        forgotten = announced is not None and announced != (
            len(agent.held),
            len(agent.fetching),
        )
        return Registration(info, new=forgotten)

    def announce(
        self,
        agent_id: str,
        held: Iterable[str],
        fetching: Iterable[str],
        now: float,
        *,
        source: str,
    ) -> tuple[int, int]:
        """Replace the agent's held and fetching sets; returns their sizes. Raises
        `UnknownAgent` (register first), `AgentIdTaken` (``source`` is not the address
        the id is bound to) or `TrackerFull`. A blob in both sets counts as held (it is
        verified, so the fetch is over)."""
        now = self._advance(now)
        agent = self._agents.get(agent_id)
        if agent is None:
            raise UnknownAgent(
                f"agent {agent_id[:40]} is not registered here",
                hint="register again, then announce again (the tracker restarted or the "
                "agent missed its heartbeats)",
            )
        self._check_bound(agent_id, agent, source)
        new_held = frozenset(held)
        new_fetching = frozenset(fetching) - new_held
        lim = self.limits
        if len(new_held) > lim.max_held_per_agent or len(new_fetching) > lim.max_fetching_per_agent:
            raise TrackerFull(
                f"an announce of {len(new_held)} held / {len(new_fetching)} fetching blobs is "
                f"over the per-agent limit ({lim.max_held_per_agent} / "
                f"{lim.max_fetching_per_agent})",
                hint="announce the most useful blobs only",
            )
        delta = len(new_held) + len(new_fetching) - len(agent.held) - len(agent.fetching)
        if self._holdings + delta > lim.max_holdings:
            raise TrackerFull(
                f"the tracker's index is full ({lim.max_holdings} agent-blob entries)",
                hint="retry later, or start the tracker with a higher limit",
            )
        self._replace(self._holders, agent_id, agent.held, new_held)
        self._replace(self._fetchers, agent_id, agent.fetching, new_fetching)
        agent.held, agent.fetching = new_held, new_fetching
        self._holdings += delta
        self._touch(agent_id, agent, now)
        return len(new_held), len(new_fetching)

    def who(self, blob_ids: Iterable[str], now: float) -> list[Sources]:
        """Live holders and fetchers per blob, only for blobs that have any."""
        self._advance(now)
        out: list[Sources] = []
        seen: set[str] = set()
        for blob_id in blob_ids:
            if blob_id in seen:
                continue
            seen.add(blob_id)
            if len(seen) > self.limits.max_who_blobs:
                raise ValueError(f"who asks for more than {self.limits.max_who_blobs} blobs")
            holders = self._holders.get(blob_id, ())
            fetchers = self._fetchers.get(blob_id, ())
            if holders or fetchers:
                out.append(
                    Sources(
                        blob_id,
                        self._sample(holders),
                        self._sample(fetchers),
                        len(holders),
                        len(fetchers),
                    )
                )
        return out

    def agent(self, agent_id: str, now: float) -> AgentInfo | None:
        self._advance(now)
        a = self._agents.get(agent_id)
        return a.info if a is not None else None

    # -- BitTorrent swarms ---------------------------------------------------------------

    def bt_announce(self, ann: BtAnnounce, now: float) -> BtAnswer:
        """Record (or, on ``stopped``, forget) one peer and pick peers for it: a random
        sample, never itself, and no seeds for a seed (it has nothing to take from them)."""
        now = self._advance(now)
        key = (ann.ip, ann.port)
        swarm = self._swarms.get(ann.info_hash)
        if ann.event == "stopped":
            if swarm is not None:
                self._drop_bt_peer(ann.info_hash, swarm, key)
            return BtAnswer((), *self._swarm_counts(ann.info_hash), recorded=False)
        recorded = self._record_bt_peer(ann, swarm, now)
        swarm = self._swarms.get(ann.info_hash)
        if swarm is None:
            return BtAnswer((), 0, 0, recorded=False)
        lim = self.limits
        want = lim.default_numwant if ann.numwant is None else min(ann.numwant, lim.max_numwant)
        candidates = [
            p.compact for k, p in swarm.peers.items() if k != key and not (ann.seed and p.seed)
        ]
        if len(candidates) > want:
            candidates = self._rng.sample(candidates, want)
        return BtAnswer(
            tuple(candidates), swarm.seeds, len(swarm.peers) - swarm.seeds, recorded=recorded
        )

    def bt_peers(self, info_hash: bytes, now: float) -> list[tuple[str, int, bool]]:
        """(ip, port, seed) of the live peers of one swarm (for tests and diagnostics)."""
        self._advance(now)
        swarm = self._swarms.get(info_hash)
        if swarm is None:
            return []
        return [(ip, port, p.seed) for (ip, port), p in swarm.peers.items()]

    # -- upkeep --------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Drop every agent and BitTorrent peer whose time is up."""
        now = self._now = max(now, self._now)
        while self._agents:
            agent_id, agent = next(iter(self._agents.items()))
            if self._is_live(agent, now):
                break
            self._drop_agent(agent_id)
        while self._bt_order:
            (info_hash, ip, port), last_seen = next(iter(self._bt_order.items()))
            if now < last_seen + self.bt_peer_ttl:
                break
            swarm = self._swarms.get(info_hash)
            if swarm is None:  # cannot happen: both tables change together
                self._bt_order.popitem(last=False)
                continue
            self._drop_bt_peer(info_hash, swarm, (ip, port))

    def stats(self, now: float) -> Stats:
        self._advance(now)
        blobs = len(self._holders.keys() | self._fetchers.keys())
        return Stats(
            agents=len(self._agents),
            blobs=blobs,
            holdings=self._holdings,
            swarms=len(self._swarms),
            bt_peers=len(self._bt_order),
        )

    # -- internals -----------------------------------------------------------------------

    def _advance(self, now: float) -> float:
        self.expire(now)
        return self._now

    def _check_bound(self, agent_id: str, agent: _Agent, source: str) -> None:
        if agent.source != source:
            # The bound address is not named: it is no business of the refused caller.
            raise AgentIdTaken(
                f"agent id {agent_id[:40]} is registered from another address",
                hint=f"it is freed {self.ttl:g} s after that agent's last heartbeat; if this "
                "is a copy of another agent's state dir, delete its agent id file so this "
                "agent makes its own",
            )

    def _is_live(self, agent: _Agent, now: float) -> bool:
        return now < agent.last_seen + self.ttl

    def _touch(self, agent_id: str, agent: _Agent, now: float) -> None:
        agent.last_seen = now
        self._agents.move_to_end(agent_id)

    def _drop_agent(self, agent_id: str) -> None:
        agent = self._agents.pop(agent_id)
        self._replace(self._holders, agent_id, agent.held, frozenset())
        self._replace(self._fetchers, agent_id, agent.fetching, frozenset())
        self._holdings -= len(agent.held) + len(agent.fetching)

    @staticmethod
    def _replace(
        index: dict[str, set[str]], agent_id: str, old: frozenset[str], new: frozenset[str]
    ) -> None:
        for blob_id in old - new:
            agents = index[blob_id]
            agents.discard(agent_id)
            if not agents:
                del index[blob_id]
        for blob_id in new - old:
            index.setdefault(blob_id, set()).add(agent_id)

    def _sample(self, agent_ids: set[str] | tuple[()]) -> tuple[AgentInfo, ...]:
        # Swept on entry: every agent in an index set is live, so only the sample is
        # looked up (a popular blob has hundreds of holders).
        cap = self.limits.max_answer_peers
        ids = self._rng.sample(list(agent_ids), cap) if len(agent_ids) > cap else agent_ids
        return tuple(self._agents[a].info for a in ids)

    def _record_bt_peer(self, ann: BtAnnounce, swarm: _Swarm | None, now: float) -> bool:
        key = (ann.ip, ann.port)
        order_key = (ann.info_hash, ann.ip, ann.port)
        peer = swarm.peers.get(key) if swarm is not None else None
        if peer is not None and swarm is not None:
            if peer.seed != ann.seed:
                swarm.seeds += 1 if ann.seed else -1
                peer.seed = ann.seed
            self._bt_order[order_key] = now  # its last announce: the expiry queue's value
            self._bt_order.move_to_end(order_key)
            return True
        lim = self.limits
        if len(self._bt_order) >= lim.max_bt_peers or (
            swarm is None and len(self._swarms) >= lim.max_swarms
        ):
            return False
        if swarm is None:
            swarm = self._swarms[ann.info_hash] = _Swarm()
        if len(swarm.peers) >= lim.max_peers_per_swarm:
            return False
        swarm.peers[key] = _BtPeer(compact_peer(ann.ip, ann.port), ann.seed)
        swarm.seeds += ann.seed
        self._bt_order[order_key] = now
        return True

    def _drop_bt_peer(self, info_hash: bytes, swarm: _Swarm, key: tuple[str, int]) -> None:
        peer = swarm.peers.pop(key, None)
        if peer is None:
            return
        swarm.seeds -= peer.seed
        self._bt_order.pop((info_hash, *key), None)
        if not swarm.peers:
            del self._swarms[info_hash]

    def _swarm_counts(self, info_hash: bytes) -> tuple[int, int]:
        swarm = self._swarms.get(info_hash)
        if swarm is None:
            return 0, 0
        return swarm.seeds, len(swarm.peers) - swarm.seeds
