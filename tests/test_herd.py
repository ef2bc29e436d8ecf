"""A herd of real agents on loopback asking for the same new model at once: each blob
leaves the mirror once, leadership is spread over the herd, and a leader that dies is
replaced. (The same over real network namespaces: tests/test_lan.py.)"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from agentkit import agent, config, fetch, peer_of
from test_agents import MiB, cli, run_agent_process, sha256

from peer.hub.protocol import git_blob_sha1, is_lfs_path
from peer.mirror_server import MirrorServer, RepoSource

SHARD = 6 * MiB


def make_sharded_repo(folder: Path, shards: int = 4, size: int = SHARD) -> dict[str, bytes]:
    rnd = random.Random(11)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config.json": b'{"model_type": "herd-test"}'}
    for i in range(shards):
        files[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = rnd.randbytes(size)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def check_once_each(mirror: MirrorServer, files: dict[str, bytes]) -> None:
    stats = mirror.stats()
    for name, data in files.items():
        assert stats.per_file.get(f"org/herd/{name}", 0) == len(data), (name, stats.per_file)
    assert stats.blob_bytes == sum(len(d) for d in files.values())


def check_complete(root: Path, files: dict[str, bytes]) -> None:
    blobs = root / "cache/models--org--herd/blobs"
    for name, data in files.items():
        blob_id = sha256(data) if is_lfs_path(name, len(data)) else git_blob_sha1(data)
        assert (blobs / blob_id).read_bytes() == data


@pytest.fixture
async def herd_mirror(tmp_path: Path) -> Any:
    files = make_sharded_repo(tmp_path / "src")
    async with MirrorServer([RepoSource("model", "org/herd", tmp_path / "src")]) as m:
        yield m, files


async def test_herd_of_three_fetches_each_blob_from_the_mirror_once(
    tmp_path: Path, herd_mirror: tuple[MirrorServer, dict[str, bytes]]
) -> None:
    mirror, files = herd_mirror
    ips = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    async with (
        agent(config(tmp_path / "a", ips[0], mirror.url, stall_timeout=5.0)) as a,
        agent(config(tmp_path / "b", ips[1], mirror.url, stall_timeout=5.0)) as b,
        agent(config(tmp_path / "c", ips[2], mirror.url, stall_timeout=5.0)) as c,
    ):
        herd = (a, b, c)
        for x in herd:  # static peers: each knows the other two
            for y in herd:
                if x is not y:
                    x.peers.offer(*peer_of(y))
            await x.peers.check_all()
        results = await asyncio.gather(*(fetch(x, "org/herd") for x in herd))
    check_once_each(mirror, files)
    for root in ("a", "b", "c"):
        check_complete(tmp_path / root, files)
    total = sum(len(d) for d in files.values())
    assert sum(r["from_mirror"] for r in results) == total
    # Spread: four shards over three agents, so every agent led at least one shard.
    assert all(r["from_mirror"] >= SHARD for r in results), [r["from_mirror"] for r in results]
    for r in results:
        assert r["from_mirror"] + r["from_peers"] == total


async def test_herd_meets_through_the_tracker_alone(
    tmp_path: Path, herd_mirror: tuple[MirrorServer, dict[str, bytes]]
) -> None:
    from tracker.service import TrackerServer

    mirror, files = herd_mirror
    async with TrackerServer(host="127.0.0.1", port=0, ttl=30.0) as t:
        via = {"trackers": (t.url,), "stall_timeout": 5.0}  # no mDNS, no --peer
        async with (
            agent(config(tmp_path / "a", "127.0.0.2", mirror.url, **via)) as a,
            agent(config(tmp_path / "b", "127.0.0.3", mirror.url, **via)) as b,
            agent(config(tmp_path / "c", "127.0.0.4", mirror.url, **via)) as c,
        ):
            assert a.peers.live() == b.peers.live() == c.peers.live() == []
            results = await asyncio.gather(*(fetch(x, "org/herd") for x in (a, b, c)))
    check_once_each(mirror, files)
    for root in ("a", "b", "c"):
        check_complete(tmp_path / root, files)
    assert sum(1 for r in results if r["from_mirror"] >= SHARD) >= 2, "leadership not spread"


async def test_a_leader_killed_mid_fetch_is_replaced(tmp_path: Path) -> None:
    rnd = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    data = rnd.randbytes(24 * MiB)
    (src / "model.safetensors").write_bytes(data)
    async with MirrorServer([RepoSource("model", "org/slow", src)]) as mirror:
        mirror.set_rate_cap(1 * MiB)  # per connection: the leader (2 connections) is slow
        leader, info = await run_agent_process(
            tmp_path / "a", "127.0.0.2", mirror.url, "--no-mdns", "--connections", "2"
        )
        try:
            agent_url = f"http://127.0.0.2:{info['local_port']}"
            download = asyncio.create_task(
                cli("download", "org/slow", "--agent", agent_url, "--quiet")
            )
            for _ in range(600):  # it leads: alone, nobody to ask
                if mirror.stats().blob_bytes >= 1 * MiB or download.done():
                    break
                await asyncio.sleep(0.05)
            assert not download.done(), await download
            fast = {"herd_leader_timeout": 3.0, "stall_timeout": 5.0}
            async with (
                agent(config(tmp_path / "b", "127.0.0.3", mirror.url, **fast)) as b,
                agent(config(tmp_path / "c", "127.0.0.4", mirror.url, **fast)) as c,
            ):
                for x, y in ((b, c), (c, b)):
                    x.peers.offer("127.0.0.2", info["peer_port"])
                    x.peers.offer(*peer_of(y))
                    await x.peers.check_all()
                followers = asyncio.gather(fetch(b, "org/slow"), fetch(c, "org/slow"))
                await asyncio.sleep(2.5)  # both follow the leader: nothing else moves
                mid = mirror.stats().blob_bytes
                assert b.blobs.herd.election.leader_of(sha256(data)) is not None
                leader.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                rb, rc = await asyncio.wait_for(followers, 60)
                took = time.monotonic() - killed_at
        finally:
            if leader.returncode is None:
                leader.kill()
            await leader.wait()
            download.cancel()
    # Replaced within the leader timeout plus one election, then fetched once more:
    # one follower led, the other copied (or swarmed) it from the new leader. Both had
    # copied the dead leader's prefix: the new leader fetched only the rest.
    assert took < 3.0 + 1.0 + 15.0, took
    new_leader, other = sorted((rb, rc), key=lambda r: r["from_mirror"], reverse=True)
    assert other["from_mirror"] == 0
    assert 0 < new_leader["from_mirror"] < len(data)
    for r in (rb, rc):
        assert r["from_mirror"] + r["from_peers"] == len(data), r
    assert mirror.stats().blob_bytes - mid <= len(data) + 2 * MiB  # A's last bytes in flight
    for root in ("b", "c"):
        got = tmp_path / root / "cache/models--org--slow/blobs" / sha256(data)
        assert got.read_bytes() == data
