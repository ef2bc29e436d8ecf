"""Who fetches a new blob from the mirror when several agents want it at once.

Pure: `HerdElection.observe(view, now)` takes what the agent saw of its peers' claims
(`Bid`s per blob) and the time, and says, per blob this agent waits for, whether it
should lead (fetch it from the mirror) or keep waiting for the leader's manifest.

The rules, which every agent applies to the same view and so agrees on:

* A blob with a live leader (a bid with ``leading`` whose ``done`` keeps advancing, or
  has reached the size) is followed. A leader that makes no progress for
  ``leader_timeout`` s, or has not been seen for that long, is suspected and ignored
  from then on: it is replaced. Progress must be real: over every ``leader_timeout``
  window a leader must gain ``min_rate`` bytes/s (or reach the size).
* Bids are hostile input. A bid whose size is not the blob's, whose ``done`` is outside
  0..size or goes backwards, or two bids of one agent for one blob, make that agent a
  suspect for the blob: it neither leads nor is elected for it. ``done`` may go back
  only with a larger ``attempt`` (an honest leader's fetch starts over from byte 0 after
  a hash mismatch), at most ``max_restarts`` times, or a liar could restart forever; an
  attempt never goes back.
* A leader that answers a survey (``answered``) without its leading bid has given up
  (its fetch failed: it would have offered the blob had it finished): it is replaced at
  once, not after ``leader_timeout`` as a silent one is.
* A leader with every byte is finishing (hashing, building its manifest): it must be
  done within `HerdConfig.finish_time` (``finish_floor`` plus the size at
  ``finish_rate``), or it is suspected; "done == size" forever stalls nobody.
* Whatever the bids say, a wait ends after `HerdConfig.deadline` (``max_wait`` plus the
  time to fetch the blob at ``min_rate``): then this agent leads it itself.
* Otherwise, once our own claim is ``settle`` s old (time for the herd's claims to meet),
  leaders are chosen for all blobs without one at once: largest blob first, each to the
  candidate with the fewest bytes led so far, ties broken by a hash of (agent, blob).
  So a repo of four shards wanted by four agents gets four different leaders, and every
  agent computes the same assignment.
* An assigned winner that does not start leading within ``start_timeout`` s is
  suspected too (it crashed before it began, or sees the herd differently).

Views can differ for a moment (a claim not yet seen everywhere); the cost is a blob
fetched twice or a short wait, never a blob not fetched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

# Only constants: the agent's defaults are defined once, next to AgentConfig.
from peer.config import HERD_LEADER_TIMEOUT, HERD_SETTLE


@dataclass(frozen=True)
class Bid:
    """One agent's claim on one blob, as seen in a survey (or our own)."""

    agent_id: str
    size: int
    leading: bool = False
    done: int = 0
    attempt: int = 0  # the leader's fetch started over this often (`wire.Claim.attempt`)


class Turn(Enum):
    WAIT = "wait"  # someone else leads (or will): wait for its manifest
    LEAD = "lead"  # fetch it from the mirror now


@dataclass(frozen=True)
class HerdConfig:
    settle: float = HERD_SETTLE
    leader_timeout: float = HERD_LEADER_TIMEOUT
    start_timeout: float = 4.0
    # The slowest leader worth waiting for (bytes/s, averaged over each leader_timeout):
    # 1 Mbit/s, below any mirror link a herd would share, far above a liar's creep.
    min_rate: float = 128 * 1024
    # Every wait ends after max_wait + size / min_rate s, whatever the claims say.
    max_wait: float = 60.0
    # A leader holding every byte must finish (hash, manifest) within
    # finish_floor + size / finish_rate s: 17 min for 50 GB, far above a real hash pass.
    finish_floor: float = 30.0
    finish_rate: float = 50e6
    # A leader whose fetch started over more often than this is not waited for: its
    # mirror keeps sending corrupt bytes (from_mirror itself gives up after one), or it
    # lies to stay leader.
    max_restarts: int = 3

    def finish_time(self, size: int) -> float:
        return self.finish_floor + size / self.finish_rate

    def deadline(self, size: int) -> float:
        """The longest wait for someone else to fetch a blob of `size` bytes."""
        return self.max_wait + size / self.min_rate


def rank(agent_id: str, blob_id: str) -> bytes:
    return hashlib.sha256(f"{agent_id}\0{blob_id}".encode()).digest()


@dataclass
class _Leader:
    done: int
    advanced: float  # when done last grew
    seen: float  # when last seen leading
    mark: tuple[int, float]  # (done, when) at the start of the current rate window
    full_since: float | None = None  # when it was first seen with every byte
    attempt: int = 0


@dataclass
class _Blob:
    size: int
    since: float  # when our claim began
    seen: dict[str, _Leader] = field(default_factory=dict)
    suspects: set[str] = field(default_factory=set)
    assigned: tuple[str, float] | None = None  # winner we expect, since when


class HerdElection:
    def __init__(self, self_id: str, config: HerdConfig | None = None) -> None:
        self.self_id = self_id
        self.config = config or HerdConfig()
        self._blobs: dict[str, _Blob] = {}

    def want(self, blob_id: str, size: int, now: float) -> None:
        self._blobs.setdefault(blob_id, _Blob(size, now))

    def drop(self, blob_id: str) -> None:
        self._blobs.pop(blob_id, None)

    def waiting(self) -> list[str]:
        return list(self._blobs)

    def leader_of(self, blob_id: str) -> str | None:
        """The leader we currently follow for this blob, if any."""
        b = self._blobs.get(blob_id)
        if b is None:
            return None
        live = [a for a in b.seen if a not in b.suspects]
        return min(live) if live else None

    def distrust(self, blob_id: str, agent_id: str) -> None:
        """Count `agent_id` out for this blob now (it relayed bytes that failed the
        hash, and is banned): never wait for it until its timeout."""
        b = self._blobs.get(blob_id)
        if b is not None:
            b.suspects.add(agent_id)

    def suspects(self, blob_id: str) -> frozenset[str]:
        """Agents counted out for this blob (stalled, too slow, gone, or lying)."""
        b = self._blobs.get(blob_id)
        return frozenset(b.suspects) if b is not None else frozenset()

    def observe(
        self,
        view: Mapping[str, Iterable[Bid]],
        now: float,
        *,
        leading: Mapping[str, int] | None = None,
        answered: Collection[str] = (),
    ) -> dict[str, Turn]:
        """`view`: peers' bids per blob id (our own waiting claims are added here);
        `leading`: blob id -> size of blobs we lead now (they count in the spread);
        `answered`: the agents whose answers `view` holds (a leader among them with no
        leading bid gave up)."""
        cfg = self.config
        bids: dict[str, list[Bid]] = {k: list(v) for k, v in view.items()}
        for blob_id, size in (leading or {}).items():
            bids.setdefault(blob_id, []).append(Bid(self.self_id, size, leading=True))
        # 1. Leaders: remember progress, suspect the stalled and the long unseen.
        load: dict[str, int] = {}
        led: set[str] = set()
        for blob_id in set(bids) | set(self._blobs):
            b = self._blobs.get(blob_id)
            current = [x for x in bids.get(blob_id, []) if x.leading]
            if b is None:
                for x in current:  # a blob we do not wait for: counts for the spread only
                    load[x.agent_id] = load.get(x.agent_id, 0) + x.size
                    led.add(blob_id)
                continue
            b.suspects |= self._liars(b, bids.get(blob_id, []))
            for x in current:
                if x.agent_id not in b.suspects:
                    self._progress(b, x, now)
            still = {x.agent_id for x in current}
            b.suspects |= {a for a in b.seen if a in answered and a not in still}
            for agent, lead in b.seen.items():
                if now - lead.advanced > cfg.leader_timeout or now - lead.seen > cfg.leader_timeout:
                    b.suspects.add(agent)
            live = [a for a in b.seen if a not in b.suspects]
            if live:
                led.add(blob_id)
                agent = min(live)
                load[agent] = load.get(agent, 0) + b.size
        # 2. Blobs without a leader: assign them all at once, largest first. A winner
        # that does not start in time is suspected, and the assignment made again.
        while True:
            winners = self._assign(bids, led, dict(load))
            stale = False
            for blob_id, b in self._blobs.items():
                winner = winners.get(blob_id)
                if blob_id in led or now - b.since < cfg.settle or winner is None:
                    b.assigned = None
                elif winner != self.self_id:
                    if b.assigned is None or b.assigned[0] != winner:
                        b.assigned = (winner, now)
                    elif now - b.assigned[1] > cfg.start_timeout:
                        b.suspects.add(winner)  # never started: count it out
                        b.assigned = None
                        stale = True
            if not stale:
                break
        # 3. Our turns. Past the deadline we lead whatever the others claim.
        return {
            blob_id: Turn.LEAD
            if now - b.since >= cfg.deadline(b.size)
            or (
                blob_id not in led
                and now - b.since >= cfg.settle
                and winners.get(blob_id) == self.self_id
            )
            else Turn.WAIT
            for blob_id, b in self._blobs.items()
        }

    def _liars(self, b: _Blob, bids: Iterable[Bid]) -> set[str]:
        """Agents whose bids on this blob cannot be true."""
        out: set[str] = set()
        counted: set[str] = set()
        for x in bids:
            if x.agent_id in counted:
                out.add(x.agent_id)  # two claims of one agent on one blob
            counted.add(x.agent_id)
            if x.size != b.size or not 0 <= x.done <= b.size:
                out.add(x.agent_id)
            if x.attempt > self.config.max_restarts:
                out.add(x.agent_id)
            prev = b.seen.get(x.agent_id)
            if x.leading and prev is not None:
                if x.attempt < prev.attempt:
                    out.add(x.agent_id)
                elif x.done < prev.done and x.attempt == prev.attempt:
                    out.add(x.agent_id)  # bytes done never shrink within one attempt
        return out

    def _progress(self, b: _Blob, x: Bid, now: float) -> None:
        """Note a leader's bid; suspect it if it stalled or crept below `min_rate`."""
        cfg = self.config
        lead = b.seen.get(x.agent_id)
        if lead is None:
            lead = b.seen[x.agent_id] = _Leader(x.done, now, now, (x.done, now), None, x.attempt)
        elif x.attempt > lead.attempt:
            # Started over from byte 0 (`_liars` bounds how often): a new lead, timed anew.
            lead.attempt, lead.done, lead.advanced = x.attempt, x.done, now
            lead.mark, lead.full_since = (x.done, now), None
        # A leader with every byte is finishing (hashing, building its manifest: a minute
        # for a 50 GB blob): only its silence counts against it then (and the deadline).
        if x.done > lead.done or x.done >= b.size:
            lead.advanced = now
        if x.done >= b.size:
            if lead.full_since is None:
                lead.full_since = now
            elif now - lead.full_since > cfg.finish_time(b.size):
                b.suspects.add(x.agent_id)
        lead.done, lead.seen = x.done, now
        mark_done, mark_at = lead.mark
        if now - mark_at >= cfg.leader_timeout:
            need = min(b.size - mark_done, cfg.min_rate * (now - mark_at))
            if x.done - mark_done < need:
                b.suspects.add(x.agent_id)
            lead.mark = (x.done, now)

    def _assign(
        self, bids: Mapping[str, list[Bid]], led: set[str], load: dict[str, int]
    ) -> dict[str, str]:
        open_blobs = sorted(
            (k for k in set(bids) | set(self._blobs) if k not in led),
            key=lambda k: (-self._size(k, bids), k),
        )
        winners: dict[str, str] = {}
        for blob_id in open_blobs:
            b = self._blobs.get(blob_id)
            suspects = b.suspects if b is not None else set()
            candidates = {x.agent_id for x in bids.get(blob_id, []) if not x.leading}
            if b is not None:
                candidates.add(self.self_id)
            candidates -= suspects
            if not candidates:
                continue
            best = min(candidates, key=lambda a: (load.get(a, 0), rank(a, blob_id)))
            winners[blob_id] = best
            load[best] = load.get(best, 0) + self._size(blob_id, bids)
        return winners

    def _size(self, blob_id: str, bids: Mapping[str, list[Bid]]) -> int:
        b = self._blobs.get(blob_id)
        if b is not None:
            return b.size
        return max((x.size for x in bids.get(blob_id, [])), default=0)
