"""A herd follower copies a blob from its leader while the leader still fetches it.

Without this, a follower waits until the leader has the whole blob, hashed and seeded,
and only then swarms it: a LAN tail after the mirror is done. Instead, as soon as the
herd names a live leader (`peer.agent.herd.Herd`, ``on_leader``), the follower streams
the leader's relay (``/v1/relay``, `peer.serving.peer_api`): the in-order prefix that
reached the leader from the mirror, then each byte as it arrives, to the end. The bytes
go into the follower's own journaled partial (`peer.cache.partial.PartialBlob`, the one
a mirror fetch resumes) and through the whole-file hash as they land.

Nothing is trusted before that hash: relayed bytes are the mirror's word passed on by a
peer. A blob that does not hash to its id is thrown away. Its leader is banned only if
every byte of it came from that leader's relays in this wait (it relayed bytes its own
hash would have refused: only a liar ends a relay that way); a blob whose prefix came
from another leader or from before (a relay cut short, a partial left by a killed
agent) blames nobody, and is copied again from its first byte. A relay that breaks (the
leader stalled, died, or failed) leaves what was copied in the partial: the herd
replaces a stalled leader, and whoever fetches the rest (this agent from the mirror, or
a copy from the next leader) starts where it stopped. A leader whose own fetch started
over (its hash failed: a larger ``attempt`` in its claim) is followed on, from byte 0:
the bytes of its abandoned attempt are thrown away, never resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from peer.cache.partial import PartialBlob
from peer.discovery.peer_table import PeerInfo, PeerTable
from peer.errors import HfswarmError, IntegrityError, NetworkError, PeerMisbehaved
from peer.hub.metadata import RemoteFile
from peer.manifests.merkle import V2Tree, V2TreeBuilder
from peer.scheduling.herd import HerdConfig
from peer.serving.peer_api import RELAY_IDLE
from peer.transfer.inflight import InFlightBlob
from peer.transfer.mirror_blob import BlobCounters
from peer.transfer.mirror_ranges import chunk_size_for, hash_file_range
from peer.verification.hashing import BlobHasher, HashKind

log = logging.getLogger(__name__)

READ_AT_MOST = 1 << 20  # bytes taken off the relay at once (written, hashed, journaled)
# A leader whose relay failed (not there yet, went away) is asked again after this long.
RETRY_AFTER = 1.0
# A relay that moves less than the herd's floor rate over a window is dropped: a trickle
# (a byte now and then keeps the socket's idle timeout at bay) must not hold a follower
# that could swarm the blob (`BlobFetcher` waits for a running copy once peers offer it).
FLOOR_RATE = HerdConfig.min_rate
FLOOR_WINDOW = RELAY_IDLE


class LeaderCopy:
    """One blob's copy from the herd leaders (one relay at a time), for one wait."""

    def __init__(
        self,
        peers: PeerTable,
        file: RemoteFile,
        partial_dir: Path,
        counters: BlobCounters,
        *,
        flight: InFlightBlob | None = None,
        on_done: Callable[[], None] = lambda: None,
        on_liar: Callable[[PeerInfo, str], None] = lambda _peer, _why: None,
        want_tree: bool = False,
    ) -> None:
        self.peers = peers
        self.file = file
        self.partial_dir = partial_dir
        self.counters = counters
        self.flight = flight  # HF_ENDPOINT readers of this blob follow the copy too
        self.on_done = on_done  # the blob is here, verified: the herd wait may end
        self.on_liar = on_liar
        self.finished: Path | None = None  # the verified data file, to rename into blobs/
        # A blob that will be seeded gets its v2 tree from the bytes as they are hashed,
        # as a leader's does: no second read of the blob for its manifest.
        self.want_tree = want_tree
        self.tree: V2Tree | None = None  # with `finished`, when wanted
        self.copied = 0  # bytes taken from leaders that are still counted (from_peers)
        self.relays = 0  # relays started
        self._liars: set[str] = set()  # leaders that relayed wrong bytes: never again
        # Leaders whose relays wrote the bytes in the partial now; None: some of them are
        # from before this wait (a mirror fetch, a killed agent's copy), of no known peer.
        self._written_by: set[str] | None = None
        self._retry_at: dict[str, float] = {}  # leader -> when its relay may be asked again
        # Leader -> its attempt whose bytes this wait wrote into the partial; a later
        # attempt of that leader voids them (`_drop_first`: the next copy starts at 0).
        self._attempts: dict[str, int] = {}
        self._drop_first = False
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # every copy not ended yet
        self._leader: str | None = None  # whom the running copy follows

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def follow(self, leader: PeerInfo, attempt: int = 0) -> None:
        """The herd's live leader for the blob and its attempt (told at every survey):
        copy from it, unless a copy runs, is done, or this leader failed us already. A
        later attempt than the one we copied: its bytes again, from byte 0."""
        agent = leader.agent_id
        if self.finished is not None or agent in self._liars or self.peers.is_banned(agent):
            return
        restarted = attempt > self._attempts.get(agent, attempt)
        if restarted:
            log.info(
                "%s: leader %s started over (attempt %d): copying it again from byte 0",
                self.file.path,
                agent[:8],
                attempt,
            )
            del self._attempts[agent]
            self._drop_first = True
        elif self.running and self._leader == agent:
            return
        elif time.monotonic() < self._retry_at.get(agent, 0.0):
            return
        # A new leader (the herd replaced a stalled one): its relay, from where we are.
        # The copies before it are cancelled now, not by the new task: `stop` may come
        # before that task ever runs.
        previous = set(self._tasks)
        for task in previous:
            task.cancel()
        self.relays += 1
        self._leader = agent
        self._task = asyncio.create_task(self._run(leader, attempt, previous))
        self._tasks.add(self._task)
        self._task.add_done_callback(self._tasks.discard)

    async def result(self) -> Path | None:
        """Wait for the running copy; the verified file, or None (it failed)."""
        if self._task is not None:
            await asyncio.shield(self._task)
        return self.finished

    async def stop(self) -> None:
        """Stop copying (this agent fetches the rest itself): the partial is closed,
        what was copied stays in it for the mirror fetch to resume."""
        self._task = None
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # `wait`, not `await task`: the copies' cancellation is theirs, while ours
            # (the fetch cancelled meanwhile) must go on up, never be swallowed here.
            await asyncio.wait(tasks)
        if self._drop_first:  # an abandoned attempt's bytes: not for the mirror to resume
            self._drop_first = False
            size = self.file.size
            partial = PartialBlob(self.partial_dir, self.file.blob_id, size, chunk_size_for(size))
            with contextlib.suppress(HfswarmError):
                partial.open()
                self._forget(partial)

    async def _run(self, leader: PeerInfo, attempt: int, previous: set[asyncio.Task[None]]) -> None:
        if previous:  # their partial must be closed before ours opens
            await asyncio.wait(previous)
        try:
            self.finished = await self._copy(leader, attempt)
        except PeerMisbehaved as exc:
            self._liars.add(leader.agent_id)
            log.warning("%s: leader %s lied: %s", self.file.path, leader.api_url, exc.one_line())
            self.on_liar(leader, exc.one_line())
        except HfswarmError as exc:
            self._retry_at[leader.agent_id] = time.monotonic() + RETRY_AFTER
            log.info(
                "%s: copy from leader %s stopped: %s",
                self.file.path,
                leader.agent_id[:8],
                exc.one_line(),
            )
        except Exception:  # never leave the wait on a bug here: the herd goes on
            self._liars.add(leader.agent_id)
            log.exception("%s: copy from leader %s failed", self.file.path, leader.api_url)
        if self.finished is not None:
            self.on_done()

    async def _copy(self, leader: PeerInfo, attempt: int) -> Path:
        file = self.file
        size = file.size
        partial = PartialBlob(self.partial_dir, file.blob_id, size, chunk_size_for(size))
        partial.open()  # PartialBusy (a LocalError) if another process fetches it
        if self._drop_first:  # bytes of an attempt its leader abandoned: none is kept
            self._drop_first = False
            self._forget(partial)
            self._written_by = None
            partial = PartialBlob(self.partial_dir, file.blob_id, size, chunk_size_for(size))
            partial.open()
        tree = V2TreeBuilder(file.blob_id, size) if self.want_tree else None
        hasher = BlobHasher(
            HashKind.of_blob_id(file.blob_id), size, also=tree.update if tree else None
        )
        try:
            # Bytes on disk from before (an earlier relay, an interrupted mirror fetch)
            # are hashed, not asked for again: the relay starts after the prefix.
            start = partial.resume_at(partial.contiguous_end(0))
            await asyncio.to_thread(hash_file_range, partial.data_path, hasher, 0, start)
            self.counters.done = partial.done_bytes()
            if start == 0:
                self._written_by = set()  # from here on, every byte is a relay's
            if self.flight is not None:
                self.flight.start(partial.data_path, from_peers=True)
                self.flight.advance(start)
            log.info("%s: copying from leader %s at byte %d", file.path, leader.agent_id[:8], start)
            pos = start
            async with self.peers.relay(
                leader, file.blob_id, start, size, idle=RELAY_IDLE + 5.0
            ) as body:
                # From the first byte: before it, the relay may wait for the leader's
                # prefix to reach us (bounded by the idle timeouts, not by this).
                window_at: float | None = None
                window_pos = pos
                while pos < size:
                    data = await body.read(min(READ_AT_MOST, size - pos))
                    if not data:
                        raise NetworkError(f"the relay ended at byte {pos} of {size}")
                    now = time.monotonic()
                    if window_at is None:
                        window_at = now
                    elif now - window_at >= FLOOR_WINDOW:
                        if pos + len(data) - window_pos < FLOOR_RATE * (now - window_at):
                            raise NetworkError(
                                f"the relay moved {pos + len(data) - window_pos} bytes in "
                                f"{now - window_at:.0f} s, below the herd's floor rate"
                            )
                        window_at, window_pos = now, pos + len(data)
                    # Written and hashed here, not in a thread: a cancelled copy must
                    # never leave a write running into a partial that is closed.
                    if self._written_by is not None:
                        self._written_by.add(leader.agent_id)
                    self._attempts.setdefault(leader.agent_id, attempt)
                    partial.write(pos, data)
                    hasher.update(data)
                    pos += len(data)
                    partial.held_to(pos)
                    self.copied += len(data)
                    self.counters.from_peers += len(data)
                    self.counters.done = max(self.counters.done, pos)
                    if self.flight is not None:
                        self.flight.advance(pos)
            if hasher.hexdigest() != file.blob_id:
                # Blame a leader only for a blob it relayed alone: bytes another peer
                # relayed (or a killed agent left) before would frame an honest one.
                alone = self._written_by == {leader.agent_id}
                self._void(partial)
                self._written_by = None
                wrong = f"relayed bytes of {file.path} hash to {hasher.hexdigest()}"
                if alone:
                    raise PeerMisbehaved(f"{wrong}, not {file.blob_id}")
                raise IntegrityError(
                    f"{wrong}: some were on disk from before or from another leader",
                    hint="thrown away; the blob is copied again from its first byte",
                )
            self.counters.done = size
            self.tree = tree.finish() if tree is not None else None
            return partial.take_finished()
        finally:
            partial.close()

    def _void(self, partial: PartialBlob) -> None:
        """A blob that failed its hash: none of it is kept, or counted as had."""
        self.counters.hash_failures += 1
        self._forget(partial)

    def _forget(self, partial: PartialBlob) -> None:
        """Throw away what the partial holds (and stop counting what we copied)."""
        partial.discard()
        self._attempts.clear()
        self.counters.from_peers -= self.copied
        self.counters.done = 0
        self.copied = 0
        if self.flight is not None:
            self.flight.reset()  # what a reader got is void: it must cut
