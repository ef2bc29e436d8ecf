"""Herd coordination: one mirror fetch per new blob for a whole herd of agents.

An agent that wants a blob no peer holds *claims* it: the claim shows in its
``/v1/have`` answers (`wire.Claim`) and in its tracker announcements (as "fetching"),
so peers found by mDNS or through a tracker alike see it. While claims are open, one
poll loop surveys the peers for every waiting blob at once and feeds what it saw to
the pure `HerdElection`, which says per blob: wait (someone leads) or lead. A waiter
ends as soon as any peer offers the blob's manifest (the leader finished, or a follower
already swarms it) and the caller swarms it; or when it is our turn to lead, and the
caller fetches the blob from the mirror inside `leading(...)`, which shows the claim as
``leading`` with the bytes done so followers can tell a working leader from a dead one.
While it waits, a follower may be told of the live leader at each survey (`on_leader`:
it copies the leader's in-flight prefix, `peer.agent.herd_copy`), and may end its wait
itself (`release`) once it has the blob that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from peer import wire
from peer.discovery.peer_table import Offer, PeerInfo, PeerTable
from peer.hub.metadata import RemoteFile
from peer.scheduling.herd import Bid, HerdConfig, HerdElection, Turn
from peer.transfer.mirror_blob import BlobCounters

log = logging.getLogger(__name__)

Validate = Callable[[RemoteFile, list[Offer]], list[Offer]]
Lookup = Callable[[tuple[str, ...]], Awaitable[None]]
# The live leader we follow, and its attempt (its fetch started over this often).
OnLeader = Callable[[PeerInfo, int], None]


@dataclass
class _Lead:
    size: int
    progress: BlobCounters  # bytes done, and the attempt: what our claim shows


class HerdTurn:
    def __init__(self, herd: Herd, file: RemoteFile, progress: BlobCounters) -> None:
        self.offers: list[Offer] = []
        self._herd = herd
        self._file = file
        self._progress = progress

    def lead(self) -> None:
        """We fetch it from the mirror now: say so (with progress) to the herd."""
        self._herd._lead(self._file, self._progress)
        self._herd.on_change()


class Herd:
    def __init__(
        self,
        self_id: str,
        peers: PeerTable,
        validate: Validate,
        *,
        config: HerdConfig | None = None,
        poll: float = 0.25,
        lookups: Sequence[Lookup] = (),
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.peers = peers
        self.poll = poll
        self.election = HerdElection(self_id, config)
        self.lookups = tuple(lookups)  # trackers: who else claims or holds these blobs
        self.on_change = on_change  # our claims changed (trackers announce at once)
        self._waiters: dict[str, tuple[RemoteFile, asyncio.Future[list[Offer]], BlobCounters]] = {}
        self._leading: dict[str, _Lead] = {}
        self._on_leader: dict[str, OnLeader] = {}  # blob id -> told of its live leader
        self._followed: set[str] = set()  # blobs we lead that others claimed too
        self.leaderships = 0  # blobs this agent led to the mirror (alone: every one)
        self._validate = validate  # which offers of a blob to trust (the fetcher's rule)
        self._loop_task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Stop surveying (the agent is shutting down; its peer table closes next)."""
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- what peers see --------------------------------------------------------------

    def claims_for(self, blob_ids: tuple[str, ...]) -> list[wire.Claim]:
        out = []
        for b in blob_ids:
            if b in self._leading:
                lead, p = self._leading[b], self._leading[b].progress
                out.append(
                    wire.Claim(
                        blob_id=b, size=lead.size, leading=True, done=p.done, attempt=p.attempt
                    )
                )
            elif b in self._waiters:
                out.append(wire.Claim(blob_id=b, size=self._waiters[b][0].size))
        return out

    def claimed_ids(self) -> list[str]:
        return [*self._leading, *(b for b in self._waiters if b not in self._leading)]

    def has_company(self) -> bool:
        return bool(self.lookups) or bool(self.peers.live())

    # -- the fetcher's side ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def turn(
        self, file: RemoteFile, progress: BlobCounters, on_leader: OnLeader | None = None
    ) -> AsyncIterator[HerdTurn]:
        """Wait for our turn on a blob nobody holds. ``turn.offers``: peers that have its
        manifest now (swarm it); empty: fetch it from the mirror, after `turn.lead()`,
        which shows the claim as leading (with the `progress`: bytes done, attempt)
        until the block ends (or the caller got it itself and called `release`).
        `on_leader`: called with the live leader we follow (and its attempt), at every
        survey while we wait."""
        turn = HerdTurn(self, file, progress)
        try:
            turn.offers = await self._wait(file, progress, on_leader)
            yield turn
        finally:
            self._leading.pop(file.blob_id, None)
            self._followed.discard(file.blob_id)
            self.on_change()

    async def _wait(
        self, file: RemoteFile, progress: BlobCounters, on_leader: OnLeader | None = None
    ) -> list[Offer]:
        if not self.has_company():
            return []
        existing = self._waiters.get(file.blob_id)
        if existing is not None:
            return await asyncio.shield(existing[1])
        fut: asyncio.Future[list[Offer]] = asyncio.get_running_loop().create_future()
        self._waiters[file.blob_id] = (file, fut, progress)
        if on_leader is not None:
            self._on_leader[file.blob_id] = on_leader
        self.election.want(file.blob_id, file.size, time.monotonic())
        self.on_change()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run())
        # The election ends every wait by its deadline; this bound also holds if the
        # survey loop itself got stuck (a bug, a peer table that never answers).
        bound = self.election.config.deadline(file.size) + 4 * self.poll + 10.0
        try:
            async with asyncio.timeout(bound):
                return await asyncio.shield(fut)
        except TimeoutError:
            if fut.done():
                return fut.result()
            log.warning("herd: no manifest of %s after %.0f s; fetching it", file.path, bound)
            self._lead(file, progress)
            return []
        finally:
            if self._waiters.get(file.blob_id, (None, None, None))[1] is fut:
                self._finish(file.blob_id)
                self.on_change()

    def release(self, blob_id: str) -> None:
        """End our wait on a blob now, with no offers: we have it (copied from the
        leader and verified), so there is nothing to wait for or lead."""
        entry = self._waiters.get(blob_id)
        if entry is not None and not entry[1].done():
            entry[1].set_result([])
            self._finish(blob_id)

    def _lead(self, file: RemoteFile, progress: BlobCounters) -> None:
        if file.blob_id not in self._leading:
            self.leaderships += 1
        self._leading[file.blob_id] = _Lead(file.size, progress)

    def followed(self, blob_id: str) -> bool:
        """We lead this blob and others claimed it when we took it: followers wait."""
        return blob_id in self._followed

    def leading_count(self) -> int:
        return len(self._leading)

    # -- the poll loop ---------------------------------------------------------------

    async def _run(self) -> None:
        while self._waiters:
            try:
                await self._step()
            except Exception:  # never leave waiters hanging on a bug in one survey
                log.exception("herd survey failed")
            await asyncio.sleep(self.poll)

    async def _step(self) -> None:
        ids = tuple(dict.fromkeys([*self._waiters, *self._leading]))
        await asyncio.gather(*(lookup(ids) for lookup in self.lookups))
        found, claims, answered = await self.peers.survey(ids)
        now = time.monotonic()
        for blob_id, (file, fut, _) in list(self._waiters.items()):
            good = self._validate(file, found.get(blob_id, []))
            if good and not fut.done():
                fut.set_result(good)
                self._finish(blob_id)
        view = {
            blob_id: [Bid(p.agent_id, c.size, c.leading, c.done, c.attempt) for p, c in seen]
            for blob_id, seen in claims.items()
        }
        before = {b: self.election.suspects(b) for b in self._waiters}
        for blob_id in self._waiters:  # a banned leader is out at once, not at its timeout
            while (leader := self.election.leader_of(blob_id)) is not None and (
                self.peers.is_banned(leader)
            ):
                self.election.distrust(blob_id, leader)
        turns = self.election.observe(
            view,
            now,
            leading={b: lead.size for b, lead in self._leading.items()},
            answered=answered,
        )
        for blob_id, was in before.items():
            for agent in self.election.suspects(blob_id) - was:
                log.info(
                    "herd: not waiting for %s on %s any more (stalled, too slow, gone, "
                    "gave up, or its claims are impossible)",
                    agent[:8],
                    blob_id[:12],
                )
        for blob_id, turn in turns.items():
            entry = self._waiters.get(blob_id)
            tell = self._on_leader.get(blob_id)
            leader = self.election.leader_of(blob_id)
            if turn is Turn.WAIT and tell is not None and leader is not None:
                for peer, claim in claims.get(blob_id, []):
                    if peer.agent_id == leader and claim.leading:
                        tell(peer, claim.attempt)
                        break
            if turn is Turn.LEAD and entry is not None and not entry[1].done():
                log.info("herd: leading %s (%s)", entry[0].path, blob_id[:12])
                # Leading from this instant: our claim must never vanish in between,
                # or peers would elect someone else.
                self._lead(entry[0], entry[2])
                if claims.get(blob_id):
                    self._followed.add(blob_id)
                entry[1].set_result([])
                self._finish(blob_id)

    def _finish(self, blob_id: str) -> None:
        self._waiters.pop(blob_id, None)
        self._on_leader.pop(blob_id, None)
        self.election.drop(blob_id)
