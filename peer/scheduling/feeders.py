"""Feeders: which downloaders of a blob take it from its complete holders.

When several agents download one blob from one seeder at once, the seeder's port is
what bounds them, and libtorrent lets each downloader ask the seeder for whatever it
lacks: the seeder sent 1.6 copies of the repo to 8 hosts, and 1 -> 8 took 1.5-1.6x the
1 -> 1 time even for bare libtorrent (docs/benchmarks.md 8.22). With feeders, only F of
a blob's downloaders take it from the complete holders; the others take it from the
downloaders alone, so the seeder sends each piece about once (bare: 1.25x).

Each downloader decides for itself: the blob's members are the agents it knows to be
downloading the blob (its re-surveys: offers that are not complete) and itself. The
feeders are dealt blob by blob over the blob's siblings (the other blobs of its repo
that swarm), as if they had the same members: each blob's F members with the fewest
blobs dealt so far, ties broken by sha256(agent id + blob id). So each member feeds
about F x blobs / members of them: ranked per blob alone, one host fed two or three
shards of a repo while others fed none, and the shards it fed came last (benchmarks
8.28).

The deal is only the same for every member if they deal over the same blobs, and
agents that fetch different selections of a repo (`--include`; HF_ENDPOINT asks one
file at a time) do not: dealt over different lists, a blob could get no feeder at all
(its downloaders then wait ``stall_timeout`` for it). So each downloader says, in its
survey answers, which blobs it deals over (`deal_over`: a digest of the sorted list,
`wire.Deal`), and a blob's feeders are dealt over the siblings only when every member
said the same list as this one; otherwise (or a member that said nothing) they are
ranked per blob alone, which every member computes alike.

Nobody is known at the start, so everyone starts as a feeder (a lone downloader, the
1 -> 1 case, stays one); one that learns it is not a feeder drops the complete holders
(`DropHolders`), once, unless it already has most of the blob. (One whose first survey,
before its torrent is added, already shows other downloaders learns them then: a
non-feeder never connects the holders.) The choice sticks: a
non-feeder connects the holders again (`ConnectHolders`) when it becomes a feeder
(members change) or when the blob's verified pieces from peers came slower than
``min_rate`` over the last ``stall_timeout`` (its feeders are gone, stuck or slow; a
peer trickling a block now and then does not count), and then keeps them.

Pure: no sockets, no clock. The driver (`peer.transfer.swarm_download`) feeds members,
progress and ``now``, carries out the actions, and wakes it at `next_wakeup`.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Only constants: the agent's defaults are defined once, next to AgentConfig.
from peer.config import FEEDERS, STALL_TIMEOUT

# A non-feeder's floor rate from peers (bytes/s): a LAN moves 20-200x that.
MIN_FEED_RATE = float(512 << 10)


@dataclass(frozen=True)
class FeederConfig:
    # Downloaders of a blob that take it from its complete holders; 0: every one does.
    feeders: int = FEEDERS
    # A non-feeder with no progress from peers this long connects the holders again.
    stall_timeout: float = STALL_TIMEOUT
    # ... or whose verified pieces from peers come slower than this (bytes/s) over the
    # last stall_timeout: the downloaders are taking the blob, not a member that lies
    # about fetching it and trickles (blocks every few seconds kept it off its holders
    # for good, and froze it: docs/SECURITY.md). 0: any piece is progress.
    min_rate: float = MIN_FEED_RATE
    # Past this share of the blob had, a downloader keeps its holders: dropping them
    # (the torrent is removed and added again) would save little of the seeder's port.
    drop_before: float = 0.5

    def __post_init__(self) -> None:
        if self.feeders < 0:
            raise ValueError("feeders must be >= 0")
        if self.stall_timeout < 0 or self.min_rate < 0 or not 0 <= self.drop_before <= 1:
            raise ValueError("stall_timeout and min_rate must be >= 0 and drop_before in 0-1")


@dataclass(frozen=True)
class DropHolders:
    """Take the blob from the other downloaders only: leave its complete holders."""


@dataclass(frozen=True)
class ConnectHolders:
    """Connect the complete holders again: this downloader became a feeder, or
    (``stalled``) the blob had no progress from peers for ``stall_timeout``."""

    stalled: bool


FeederAction = DropHolders | ConnectHolders


def feeder_rank(agent_id: str, blob_id: str) -> bytes:
    """The order in which a blob's downloaders become its feeders (lowest first)."""
    return hashlib.sha256(f"{agent_id}{blob_id}".encode()).digest()


def deal_over(blob_id: str, siblings: Iterable[str] = ()) -> str:
    """What a downloader of ``blob_id`` says it deals the feeders over: the sha256 (hex)
    of the sorted blob ids, itself among them."""
    return hashlib.sha256("\n".join(sorted({*siblings, blob_id})).encode()).hexdigest()


def feeders_of(
    members: Iterable[str], blob_id: str, count: int, siblings: Iterable[str] = ()
) -> frozenset[str]:
    """The ``count`` feeders among ``members`` (agent ids) of ``blob_id``, dealt over
    the sorted ``siblings`` up to it (each blob's ``count`` members with the fewest blobs
    so far, ties by `feeder_rank`)."""
    pool = set(members)
    duties = dict.fromkeys(pool, 0)
    for blob in sorted(set(siblings) | {blob_id}):
        chosen = sorted(pool, key=lambda a: (duties[a], feeder_rank(a, blob)))[:count]
        if blob == blob_id:
            return frozenset(chosen)
        for a in chosen:
            duties[a] += 1
    raise AssertionError("unreachable: blob_id is among the blobs dealt")


class FeederChoice:
    """Whether this downloader (``self_id``) takes blob ``blob_id`` from the complete
    holders. ``feeding``: the holders are connected (at the start: yes). ``siblings``:
    the other blobs of its repo that swarm (the feeders are dealt over them)."""

    def __init__(
        self,
        self_id: str,
        blob_id: str,
        now: float,
        config: FeederConfig | None = None,
        siblings: Iterable[str] = (),
    ) -> None:
        self.config = config or FeederConfig()
        self.self_id = self_id
        self.blob_id = blob_id
        self.siblings = frozenset(siblings)
        self.deal = deal_over(blob_id, self.siblings)  # said in survey answers
        self.feeding = True
        self.fallback = False  # the holders came back for a stall: kept to the end
        self.members: frozenset[str] = frozenset({self_id})
        self.deals: dict[str, str] = {}  # what each member said it deals over
        self._missed: frozenset[str] = frozenset()  # members the last survey did not see
        self._activity = now  # when we dropped the holders
        self._got: deque[tuple[float, int]] = deque()  # (when, bytes) of verified pieces

    @property
    def is_feeder(self) -> bool:
        """One of the blob's feeders among the members known now (with feeders off,
        everyone is)."""
        return self.config.feeders == 0 or self.self_id in self._chosen()

    def _chosen(self) -> frozenset[str]:
        """The blob's feeders among the members known now."""
        others = self.members - {self.self_id}
        alike = all(self.deals.get(a) == self.deal for a in others)
        siblings = self.siblings if alike else ()
        return feeders_of(self.members, self.blob_id, self.config.feeders, siblings)

    @property
    def stripe(self) -> tuple[int, int] | None:
        """``(k, n)``: this feeder is the k-th of the blob's n feeders (by `feeder_rank`),
        and prefers the pieces ``i % n == k``, so that the feeders ask the holders for
        different pieces and trade the rest: each asked the holders for whatever it
        lacked, and both often for the same piece, so the seeder sent each shard 1.2-1.3
        times to its two feeders (docs/benchmarks.md 8.36). None: not striped (not a
        feeder, a fallback, the only feeder, or feeders off). A preference only: a
        feeder still takes any piece from anyone, so a wrong stripe (members that
        know different members, a liar) costs order, never a piece."""
        if self.config.feeders < 2 or not self.feeding or self.fallback:
            return None
        chosen = self._chosen()
        if self.self_id not in chosen or len(chosen) < 2:
            return None
        ranked = sorted(chosen, key=lambda a: feeder_rank(a, self.blob_id))
        return ranked.index(self.self_id), len(ranked)

    def next_wakeup(self) -> float | None:
        """When a non-feeder would give up on the downloaders (None: it feeds)."""
        if self.feeding:
            return None
        stall = self.config.stall_timeout
        need = max(1.0, self.config.min_rate * stall)
        # the first time the bytes of the last `stall` s are fewer than `need`
        got, at = 0, self._activity
        for when, nbytes in reversed(self._got):
            got += nbytes
            if got >= need:
                at = max(at, when)
                break
        return at + stall

    def progress(self, now: float, nbytes: int) -> None:
        """A piece of ``nbytes`` from peers passed its hash check."""
        self._got.append((now, nbytes))
        while self._got and self._got[0][0] <= now - self.config.stall_timeout:
            self._got.popleft()

    def learn(
        self,
        members: Iterable[str],
        had: float,
        now: float,
        present: Iterable[str] = (),
        deals: Mapping[str, str] | None = None,
    ) -> FeederAction | None:
        """The agents known now to be downloading this blob (a re-survey), the share
        of the blob already had (0-1), the agents that offered it whole (``present``):
        a member that finished stays one (or each feeder finishing would make a
        non-feeder a feeder, and its rejoin drop every connection near the end); one
        that offers nothing in two surveys in a row (gone) does not: one that finished
        offers nothing for a moment, from the end of its download until it seeds, and
        a non-feeder that became a feeder then rejoined near its end; and what members
        said they deal over (`deal_over`; a finished one keeps what it said last)."""
        seen = frozenset(members) | frozenset(present)
        missed = self.members - seen - {self.self_id}
        kept = (self.members & seen) | (missed - self._missed)  # missed once: kept
        self._missed = missed - self._missed
        self.members = frozenset(members) | kept | {self.self_id}
        self.deals = {a: d for a, d in {**self.deals, **(deals or {})}.items() if a in self.members}
        if self.feeding:
            if self.fallback or self.is_feeder or had >= self.config.drop_before:
                return None
            self.feeding = False
            self._activity = now  # the downloaders get their stall_timeout from here
            return DropHolders()
        if self.is_feeder:
            self.feeding = True
            return ConnectHolders(stalled=False)
        return None

    def tick(self, now: float) -> FeederAction | None:
        """Time passed: a non-feeder whose blob stalled connects the holders again."""
        wake = self.next_wakeup()
        if wake is None or now < wake:
            return None
        self.feeding = True
        self.fallback = True
        return ConnectHolders(stalled=True)
