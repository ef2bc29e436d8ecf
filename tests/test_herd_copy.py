"""`LeaderCopy` (peer/agent/herd_copy.py) against relays served here on loopback, through
a real `PeerTable`: what runs after the fetch tells it to stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
import traceback
from pathlib import Path

from test_agents import MiB, sha256
from test_herd_relay import cutting_liar

from peer.agent.herd_copy import LeaderCopy
from peer.cache.partial import PartialBlob
from peer.discovery.peer_table import PeerInfo, PeerTable
from peer.hub.metadata import RemoteFile
from peer.manifests.merkle import V2TreeBuilder
from peer.transfer.mirror_blob import BlobCounters
from peer.transfer.mirror_ranges import chunk_size_for


async def test_a_copy_stopped_just_after_a_new_leader_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """The herd names a new leader, and the fetch stops the copy before the task that
    replaces the old one has run: no copy may go on writing the partial after `stop`
    (the fetch opens it next, for the mirror)."""
    data = random.Random(3).randbytes(4 * MiB)
    blob, size = sha256(data), len(data)
    file = RemoteFile("model.safetensors", size, blob, True)
    folder = tmp_path / "partial"
    async with (
        cutting_liar("127.0.0.43", blob, size, MiB) as port_a,
        cutting_liar("127.0.0.44", blob, size, MiB) as port_b,
        PeerTable("tester") as table,
    ):
        counters = BlobCounters(size)
        copy = LeaderCopy(table, file, folder, counters)
        copy.follow(PeerInfo("leader-a", "127.0.0.43", port_a, 0))
        for _ in range(200):
            if counters.from_peers >= MiB:
                break
            await asyncio.sleep(0.02)
        assert counters.from_peers >= MiB, "the copy never started"
        copy.follow(PeerInfo("leader-b", "127.0.0.44", port_b, 0))
        # Not `wait_for`: a stop that swallows its caller's cancellation defeats it.
        stopping = asyncio.create_task(copy.stop())
        done, _ = await asyncio.wait({stopping}, timeout=5)
        if not done:  # a copy went on after `stop`: end it, and fail
            stopping.cancel()
            await asyncio.wait({stopping})
        assert done, "stop() waited on a copy that started after it was called"
        assert not copy.running
        # Free for the mirror fetch: no copy holds it (PartialBusy if one does).
        with PartialBlob(folder, blob, size, chunk_size_for(size)) as partial:
            assert partial.done_bytes() > 0  # what was copied stays, for the mirror


async def test_stop_does_not_swallow_its_callers_cancellation(tmp_path: Path) -> None:
    """A fetch cancelled while it stops its copy (its download cancelled, the agent
    stopping) is cancelled: `stop` must not end normally in its place."""
    data = random.Random(4).randbytes(4 * MiB)
    blob, size = sha256(data), len(data)
    file = RemoteFile("model.safetensors", size, blob, True)
    async with (
        cutting_liar("127.0.0.45", blob, size, MiB) as port,
        PeerTable("tester") as table,
    ):
        counters = BlobCounters(size)
        copy = LeaderCopy(table, file, tmp_path / "partial", counters)
        copy.follow(PeerInfo("leader-a", "127.0.0.45", port, 0))
        for _ in range(200):
            if counters.from_peers >= MiB:
                break
            await asyncio.sleep(0.02)
        stopping = asyncio.create_task(copy.stop())
        await asyncio.sleep(0)  # stop() is waiting for the copy to end
        stopping.cancel()
        await asyncio.wait({stopping})
        assert stopping.cancelled(), "stop() swallowed the cancellation of its caller"


async def test_a_leaders_new_attempt_voids_what_its_old_one_relayed(tmp_path: Path) -> None:
    """The leader's fetch started over (a larger attempt in its claim): what we copied
    of its old attempt is thrown away, even when the fetch stops the copy before the
    new one ran (the mirror fetch must not resume those bytes)."""
    data = random.Random(6).randbytes(4 * MiB)
    blob, size = sha256(data), len(data)
    file = RemoteFile("model.safetensors", size, blob, True)
    folder = tmp_path / "partial"
    async with (
        cutting_liar("127.0.0.49", blob, size, MiB) as port,
        PeerTable("tester") as table,
    ):
        counters = BlobCounters(size)
        copy = LeaderCopy(table, file, folder, counters)
        leader = PeerInfo("leader-a", "127.0.0.49", port, 0)
        copy.follow(leader, 0)
        for _ in range(200):
            if counters.from_peers >= MiB:
                break
            await asyncio.sleep(0.02)
        assert counters.from_peers >= MiB, "the copy never started"
        copy.follow(leader, 0)  # the same attempt: the copy runs on
        assert copy.relays == 1
        copy.follow(leader, 1)  # started over
        await copy.stop()
        assert counters.from_peers == 0 and counters.hash_failures == 0
        with PartialBlob(folder, blob, size, chunk_size_for(size)) as partial:
            assert partial.done_bytes() == 0


def hashing_threads() -> int:
    """Threads inside `hash_range` (a copy hashing the prefix on disk) right now."""
    return sum(
        any(f.name == "hash_range" for f in traceback.extract_stack(frame))
        for frame in sys._current_frames().values()
    )


def fds_on(path: Path) -> int:
    """This process's open fds on `path`."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return n


async def test_a_copy_stopped_while_it_hashes_its_prefix_never_closes_the_fd_under_it(
    tmp_path: Path,
) -> None:
    """A copy first hashes the prefix already on disk, in a thread. Stopped meanwhile,
    that thread runs on to its end (a thread cannot be cancelled): the fd it reads must
    stay open until then. Closed under it, the thread read a closed fd, or whatever
    file took its number."""
    size = 512 * MiB + MiB
    blob = "d" * 64  # a name only: the copy is stopped long before any hash verdict
    file = RemoteFile("model.safetensors", size, blob, True)
    folder = tmp_path / "partial"
    chunk = chunk_size_for(size)
    with PartialBlob(folder, blob, size, chunk) as partial:
        block = random.Random(5).randbytes(chunk)
        for i in range(512 * MiB // chunk):  # a long prefix: its hash takes a while
            partial.write(i * chunk, block)
            partial.mark_done(i)
        data_path = partial.data_path
    # How long that hash takes here: the test needs it to outlast a stop.
    t0 = time.monotonic()
    tree = V2TreeBuilder(blob, size)
    tree.update(block)
    per_chunk = time.monotonic() - t0
    assert per_chunk * (512 * MiB // chunk) > 0.2, per_chunk
    async with PeerTable("tester") as table:
        copy = LeaderCopy(table, file, folder, BlobCounters(size), want_tree=True)
        copy.follow(PeerInfo("leader-a", "127.0.0.48", 9, 0))  # nothing listens there
        for _ in range(2000):
            if hashing_threads():
                break
            await asyncio.sleep(0.001)
        assert hashing_threads(), "the copy never hashed its prefix"
        await copy.stop()
        # The copy is over; its hashing thread is not, and reads through an open fd.
        assert hashing_threads() and fds_on(data_path) >= 1
        for _ in range(1000):
            if not hashing_threads():
                break
            await asyncio.sleep(0.01)
        assert not hashing_threads()
        assert fds_on(data_path) == 0  # and closed once it ended: nothing leaks
    data_path.unlink()  # 512 MiB: not kept with pytest's last temporary folders
