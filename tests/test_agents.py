"""Real agents on loopback (each on its own 127.0.0.x), a real libtorrent swarm between
them, and the project's mirror counting every byte it serves: the swarm issue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agentkit import agent, config, fetch, peer_of
from fake_peer import SilentPeer
from huggingface_hub import scan_cache_dir, snapshot_download

from peer import wire
from peer.agent.daemon import Agent
from peer.cli.demo import loopback_agent_command
from peer.manifests import VerifiedBlob, make_manifest
from peer.mirror_server import MirrorServer, RepoSource
from peer.serving.peer_api import make_peer_app
from peer.transfer.swarm import SwarmSession, SwarmSettings, UnknownTorrent
from peer.verification.hashing import BlobHasher, HashKind, hash_file

MiB = 1 << 20
BIG = 24 * MiB  # 24 one-MiB pieces


def sha256(data: bytes) -> str:
    h = BlobHasher(HashKind.SHA256, len(data))
    h.update(data)
    return h.hexdigest()


def make_repo(folder: Path, big: int = BIG, seed: int = 3) -> Path:
    rnd = random.Random(seed)
    (folder / "nested/dir").mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "swarm-test"}')
    (folder / "model.safetensors").write_bytes(rnd.randbytes(big))
    (folder / "small.bin").write_bytes(rnd.randbytes(300_000))  # LFS, below one piece
    (folder / "nested/dir/readme.txt").write_text("nested\n")
    return folder


def rot(path: Path, offsets: range) -> None:
    """Overwrite 4 KiB at each offset: the file keeps its size, its content is wrong."""
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off + 1000)
            f.write(b"\xff" * 4096)


def repo_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[MirrorServer]:
    src = make_repo(tmp_path / "src")
    async with MirrorServer([RepoSource("model", "org/m", src)]) as m:
        yield m


async def test_second_agent_takes_everything_from_the_first(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    total = repo_bytes(tmp_path / "src")
    async with agent(config(tmp_path / "a", "127.0.0.2", mirror.url)) as a:
        first = await fetch(a)
        assert first["from_mirror"] == total and first["from_peers"] == 0
        assert mirror.stats().blob_bytes == total
        mirror.reset_stats()
        async with agent(config(tmp_path / "b", "127.0.0.3", mirror.url, peers=(peer_of(a),))) as b:
            second = await fetch(b)
            assert mirror.stats().blob_bytes == 0, "the mirror must serve metadata only"
            assert mirror.stats().meta_bytes > 0
            assert second["from_peers"] == total and second["from_mirror"] == 0
            status = await b.local.status()
            assert status["bytes_from_peers"] == total and len(status["peers"]) == 1
            assert (await a.local.status())["bytes_uploaded"] >= BIG
    cache = tmp_path / "b" / "cache"
    snap = Path(snapshot_download("org/m", cache_dir=cache, local_files_only=True))
    for rel in ("model.safetensors", "small.bin", "nested/dir/readme.txt"):
        assert (snap / rel).read_bytes() == (tmp_path / "src" / rel).read_bytes()
    assert scan_cache_dir(cache).warnings == []


async def test_two_agents_make_the_same_manifest_independently(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    async with (
        agent(config(tmp_path / "a", "127.0.0.2", mirror.url)) as a,
        agent(config(tmp_path / "b", "127.0.0.3", mirror.url)) as b,
    ):
        await asyncio.gather(fetch(a), fetch(b))  # no peers: each from the mirror
        blob = sha256((tmp_path / "src" / "model.safetensors").read_bytes())
        (ma,) = a.seeds.manifests_for((blob,))
        (mb,) = b.seeds.manifests_for((blob,))
        assert ma.made_by != mb.made_by
        assert ma.info_hash == mb.info_hash and ma.torrent == mb.torrent


async def test_half_the_pieces_from_a_peer_the_rest_from_the_mirror(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    data = (tmp_path / "src" / "model.safetensors").read_bytes()
    blob = sha256(data)
    src_dir = tmp_path / "full"
    src_dir.mkdir()
    (src_dir / blob).write_bytes(data)
    manifest = await make_manifest(VerifiedBlob(blob, len(data), src_dir / blob), "half-peer")
    n = len(data) // manifest.piece_size

    class HalfPeer(SilentPeer):  # a peer agent that has fetched the first half of the blob so far
        agent_id = "f" * 32

        def __init__(self, bt_port: int) -> None:
            self.bt_port = bt_port

        def fetching_for(self, ids: tuple[str, ...]) -> list[wire.Manifest]:
            return [manifest] if blob in ids else []  # it does not hold the blob: fetching it

    from aiohttp import web

    async with SwarmSession(SwarmSettings(listen_host="127.0.0.5", listen_port=0)) as half:
        (tmp_path / "half").mkdir()
        ih = await half.add_torrent(manifest.torrent, tmp_path / "half")
        for i in range(n // 2):
            piece = data[i * manifest.piece_size : (i + 1) * manifest.piece_size]
            assert await half.feed_piece(ih, i, piece)
        runner = web.AppRunner(make_peer_app(HalfPeer(half.listen_port)))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.5", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with agent(
                config(tmp_path / "b", "127.0.0.3", mirror.url, peers=(("127.0.0.5", port),))
            ) as b:
                result = await fetch(b)
        finally:
            await runner.cleanup()
    half_bytes = (n // 2) * manifest.piece_size
    assert result["from_peers"] + result["from_mirror"] - 300_000 - 50 <= len(data) + 2 * MiB
    assert half_bytes - 2 * MiB <= result["from_peers"] <= half_bytes
    assert mirror.stats().per_file["org/m/model.safetensors"] <= len(data) - half_bytes + 2 * MiB
    got = tmp_path / "b/cache/models--org--m/blobs" / blob
    assert hash_file(got, blob, len(data)).ok


async def test_three_agents_swarm_and_the_mirror_sends_each_blob_once(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    total = repo_bytes(tmp_path / "src")
    async with agent(config(tmp_path / "a", "127.0.0.2", mirror.url)) as a:
        await fetch(a)
        async with (
            # stall timeout at its default: two downloaders sharing one seeder on a busy
            # 2-core machine can see gaps longer than the 1.5 s used elsewhere here
            agent(
                config(
                    tmp_path / "b", "127.0.0.3", mirror.url, peers=(peer_of(a),), stall_timeout=5.0
                )
            ) as b,
            agent(
                config(
                    tmp_path / "c",
                    "127.0.0.4",
                    mirror.url,
                    peers=(peer_of(a), peer_of(b)),
                    stall_timeout=5.0,
                )
            ) as c,
        ):
            rb, rc = await asyncio.gather(fetch(b), fetch(c))
    assert mirror.stats().blob_bytes == total
    assert rb["from_mirror"] == rc["from_mirror"] == 0
    # useful bytes: what libtorrent's end game fetched twice is not counted
    for r in (rb, rc):
        assert r["from_peers"] == total


async def test_corrupt_seeder_is_banned_and_nothing_bad_is_linked(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    data = (tmp_path / "src" / "model.safetensors").read_bytes()
    blob = sha256(data)
    async with agent(config(tmp_path / "a", "127.0.0.2", mirror.url)) as a:
        await fetch(a)
        # B pulls once, so A's seed-mode check has vouched for every piece ...
        async with agent(config(tmp_path / "b", "127.0.0.3", mirror.url, peers=(peer_of(a),))) as b:
            await fetch(b)
        # ... then A's file rots on disk while A keeps seeding it.
        held = tmp_path / "a/cache/models--org--m/blobs" / blob
        await asyncio.to_thread(rot, held, range(2 * MiB, 6 * MiB, MiB))
        mirror.reset_stats()
        async with agent(config(tmp_path / "c", "127.0.0.4", mirror.url, peers=(peer_of(a),))) as c:
            result = await fetch(c)
            assert "127.0.0.2" in c.swarm.banned_peers()
            assert c.totals.bans >= 1  # /metrics: hfswarm_peer_bans_total
            audit = c.config.audit_path
            assert audit is not None
            lines = [json.loads(x) for x in (await asyncio.to_thread(audit.read_text)).splitlines()]
            bans = [e for e in lines if e["event"] == "peer_banned"]
            assert bans and "127.0.0.2" in bans[0]["peer_address"] and bans[0]["reason"], lines
    assert result["hash_failures"] >= 1
    got = tmp_path / "c/cache/models--org--m/blobs" / blob
    assert got.read_bytes() == data
    assert mirror.stats().blob_bytes > 0  # the bad pieces came from the mirror instead


async def peer_bytes_so_far(a: Agent) -> int:
    """Bytes from peers of the downloads in flight (torrents come and go meanwhile)."""
    total = 0
    for ih in a.swarm.torrents():
        with contextlib.suppress(UnknownTorrent):
            st = await a.swarm.status(ih)
            total += 0 if st.is_seeding else st.peer_payload_bytes
    return total


async def run_agent_process(
    root: Path, ip: str, mirror: str, *extra: str
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        *loopback_agent_command(root, ip, mirror, (), "-v", *extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=await asyncio.to_thread(open, root.parent / f"{root.name}.log", "ab"),
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc, json.loads(line)


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "peer.cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_seeder_killed_mid_transfer_download_finishes_from_mirror(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    data = (tmp_path / "src" / "model.safetensors").read_bytes()
    seeder, info = await run_agent_process(
        tmp_path / "a", "127.0.0.2", mirror.url, "--max-upload-rate", str(4 * MiB)
    )
    try:
        code, _, err = await cli(
            "download", "org/m", "--agent", f"http://127.0.0.2:{info['local_port']}", "--quiet"
        )
        assert code == 0, err
        mirror.reset_stats()
        async with agent(
            config(
                tmp_path / "b", "127.0.0.3", mirror.url, peers=(("127.0.0.2", info["peer_port"]),)
            )
        ) as b:
            task = asyncio.create_task(fetch(b))
            # (the agent's totals grow blob by blob: the small blob from the peer comes
            # first, so they say nothing of the big one's swarm)
            while not task.done():
                if await peer_bytes_so_far(b) > 4 * MiB:
                    break
                await asyncio.sleep(0.05)
            seeder.send_signal(signal.SIGKILL)
            result = await asyncio.wait_for(task, 60)
    finally:
        if seeder.returncode is None:
            seeder.kill()
        await seeder.wait()
    assert result["from_peers"] >= 2 * MiB and result["from_mirror"] >= 8 * MiB
    blob = sha256(data)
    assert (tmp_path / "b/cache/models--org--m/blobs" / blob).read_bytes() == data


async def test_killed_agent_resumes_from_its_verified_pieces(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    data = (tmp_path / "src" / "model.safetensors").read_bytes()
    async with agent(config(tmp_path / "a", "127.0.0.2", mirror.url, max_upload_rate=6 * MiB)) as a:
        await fetch(a)
        mirror.reset_stats()
        peer = f"127.0.0.2:{a.peer_port}"
        b, info = await run_agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "--peer", peer, "--stall-timeout", "30"
        )
        url = f"http://127.0.0.3:{info['local_port']}"
        dl = asyncio.create_task(cli("download", "org/m", "--agent", url, "--quiet"))
        partial = tmp_path / "b/cache/models--org--m/.hfswarm/partial" / sha256(data)
        try:
            while not (partial.exists() and partial.stat().st_blocks * 512 >= 10 * MiB):
                assert not dl.done(), await dl
                await asyncio.sleep(0.05)
        finally:  # killed mid-way (or, if the test fails here, not left behind)
            b.send_signal(signal.SIGKILL)
            await b.wait()
            await dl
        b, info = await run_agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "--peer", peer, "--stall-timeout", "30"
        )
        try:
            code, out, err = await cli(
                "download", "org/m", "--agent", f"http://127.0.0.3:{info['local_port']}"
            )
            assert code == 0, err
            code, st, _ = await cli(
                "status", "--agent", f"http://127.0.0.3:{info['local_port']}", "--json"
            )
        finally:
            b.send_signal(signal.SIGTERM)
            await b.wait()
    status = json.loads(st)
    assert {
        "bytes_from_peers",
        "bytes_from_mirror",
        "bytes_uploaded",
        "hash_failures",
        "peers",
        "seeded_blobs",
    } <= status.keys()
    # The restarted agent fetched what was missing, not the whole blob again.
    assert status["bytes_from_peers"] <= len(data) - 8 * MiB, status
    assert mirror.stats().blob_bytes == 0
    snap = Path(out.strip().splitlines()[-1])
    assert (snap / "model.safetensors").read_bytes() == data
    assert b.returncode == 0  # SIGTERM is a clean exit
    assert (tmp_path / "b/state/agent_id").read_text()


async def test_resume_data_is_not_trusted_over_bytes_another_writer_put_there(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """libtorrent takes the pieces its resume data names as had without reading them.
    A swarm download stopped with its resume data saved, then another writer of the
    same partial (a member stream, a herd relay, a mirror fetch: each leaves its
    journal) put other bytes under a piece it names, and was cut before that piece's
    check: the next swarm must check the file, not seed those bytes as the piece and
    fail the whole-file hash."""
    import libtorrent as lt

    from peer.cache.partial import PartialBlob
    from peer.transfer.mirror_ranges import chunk_size_for

    data = (tmp_path / "src" / "model.safetensors").read_bytes()
    blob = sha256(data)
    async with agent(config(tmp_path / "a", "127.0.0.2", mirror.url, max_upload_rate=MiB)) as a:
        await fetch(a)
        mirror.reset_stats()
        peer = f"127.0.0.2:{a.peer_port}"
        b, info = await run_agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "--peer", peer, "--stall-timeout", "30"
        )
        url = f"http://127.0.0.3:{info['local_port']}"
        dl = asyncio.create_task(cli("download", "org/m", "--agent", url, "--quiet"))
        resume_dir = tmp_path / "b/state/resume"
        try:
            while True:  # saved every 10 s while it swarms
                if resume_dir.exists() and any(resume_dir.iterdir()):
                    break
                assert not dl.done(), await dl
                await asyncio.sleep(0.1)
        finally:
            b.send_signal(signal.SIGKILL)
            await b.wait()
            await dl
        (resume,) = resume_dir.iterdir()
        had = lt.read_resume_data(resume.read_bytes()).have_pieces
        piece = next(i for i in range(len(had)) if had[i])  # 1 MiB pieces
        partial_dir = tmp_path / "b/cache/models--org--m/.hfswarm/partial"
        with PartialBlob(partial_dir, blob, len(data), chunk_size_for(len(data))) as p:
            p.write(piece * MiB, bytes(MiB))  # another writer's bytes, never checked
        b, info = await run_agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "--peer", peer, "--stall-timeout", "30"
        )
        url = f"http://127.0.0.3:{info['local_port']}"
        try:
            code, out, err = await cli("download", "org/m", "--agent", url)
            assert code == 0, err
            code, st, _ = await cli("status", "--agent", url, "--json")
        finally:
            b.send_signal(signal.SIGTERM)
            await b.wait()
    status = json.loads(st)
    assert status["hash_failures"] == 0, status
    # What the check found stayed (every piece but the one rewritten): not all again.
    assert status["bytes_from_peers"] + status["bytes_from_mirror"] < len(data), status
    snap = Path(out.strip().splitlines()[-1])
    assert (snap / "model.safetensors").read_bytes() == data


async def test_blobs_already_in_the_cache_are_verified_once_then_seeded(
    tmp_path: Path, mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "a" / "cache"
    # The cache was filled by huggingface_hub before any agent ran ...
    await asyncio.to_thread(
        snapshot_download, "org/m", cache_dir=cache, endpoint=mirror.url, token=False
    )
    data = (tmp_path / "src" / "model.safetensors").read_bytes()
    blob = sha256(data)
    # ... and one of its blobs rotted on disk since.
    small = (tmp_path / "src" / "small.bin").read_bytes()
    rotten = cache / "models--org--m" / "blobs" / sha256(small)
    rotten.write_bytes(b"\0" * len(small))
    cfg = config(tmp_path / "a", "127.0.0.2", mirror.url)
    async with agent(cfg) as a:
        for _ in range(200):
            if blob in a.seeds.held and a.seeds.rejected:
                break
            await asyncio.sleep(0.05)
        assert blob in a.seeds.held  # verified in the background, now seeded
        assert sha256(small) not in a.seeds.held  # a blob that fails its id is never offered
        assert a.seeds.manifests_for((sha256(small),)) == []
    assert (tmp_path / "a/state/verified" / blob).exists()
    # A restart trusts the record (same size, mtime, inode): seeded without re-hashing.
    calls: list[str] = []
    import peer.agent.seeding as seeding

    real = seeding.hash_file

    def counting(path: Path, blob_id: str, size: int) -> Any:
        calls.append(blob_id)
        return real(path, blob_id, size)

    monkeypatch.setattr(seeding, "hash_file", counting)
    async with agent(cfg) as a:
        for _ in range(200):
            if blob in a.seeds.held:
                break
            await asyncio.sleep(0.05)
        assert blob in a.seeds.held
    assert blob not in calls


async def test_a_download_hashes_a_blob_another_tool_left_before_linking_it(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """The same per-blob step for every entry point: a blob in the repo's blobs/ that
    this agent did not verify is hashed before a download through the agent links it
    (as for a Hub client); a rotten one is fetched again, a good one seeded."""
    cache = tmp_path / "a" / "cache"
    await asyncio.to_thread(
        snapshot_download, "org/m", cache_dir=cache, endpoint=mirror.url, token=False
    )
    small = (tmp_path / "src" / "small.bin").read_bytes()
    big = (tmp_path / "src" / "model.safetensors").read_bytes()
    (cache / "models--org--m" / "blobs" / sha256(small)).write_bytes(b"\0" * len(small))
    mirror.reset_stats()
    # No background scan (it would hash them too): the download meets them first.
    async with Agent(config(tmp_path / "a", "127.0.0.2", mirror.url)) as a:
        done = await fetch(a)
        assert done["from_mirror"] == len(small) and done["reused"] >= len(big)
        assert sha256(big) in a.seeds.held  # hashed by the download, now seeded
    snap = Path(done["path"])
    assert (snap / "small.bin").read_bytes() == small
    assert mirror.stats().blob_bytes == len(small)


async def test_agents_find_each_other_over_mdns_with_no_configuration(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    loop_only = {"mdns": True, "mdns_interfaces": ("127.0.0.1",)}  # multicast stays on lo
    total = repo_bytes(tmp_path / "src")
    async with agent(config(tmp_path / "a", "127.0.0.2", mirror.url, **loop_only)) as a:
        await fetch(a)
        mirror.reset_stats()
        async with agent(config(tmp_path / "b", "127.0.0.3", mirror.url, **loop_only)) as b:
            for _ in range(100):  # no --peer given: only mDNS can introduce them
                if b.peers.live():
                    break
                await asyncio.sleep(0.05)
            assert [p.agent_id for p in b.peers.live()] == [a.agent_id]
            result = await fetch(b)
    assert result["from_peers"] == total and mirror.stats().blob_bytes == 0


async def test_have_request_with_thousands_of_ids_is_read_whole(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    ids = tuple(f"{i:064x}" for i in range(4000))  # ~270 KB: arrives in several reads
    async with agent(config(tmp_path / "a", "127.0.0.2", mirror.url)) as a:
        await fetch(a)
        blob = sha256((tmp_path / "src" / "model.safetensors").read_bytes())
        async with agent(config(tmp_path / "b", "127.0.0.3", mirror.url, peers=(peer_of(a),))) as b:
            found = await b.peers.find((*ids[:-1], blob))
    assert [o.manifest.blob_id for o in found[blob]] == [blob]


async def test_agents_find_each_other_through_the_tracker_alone(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    from tracker.client import TrackerClient
    from tracker.service import TrackerServer

    total = repo_bytes(tmp_path / "src")
    async with TrackerServer(host="127.0.0.1", port=0, ttl=30.0) as t:
        via = {"trackers": (t.url,)}  # no mDNS, no --peer: the tracker is the only way
        async with agent(config(tmp_path / "a", "127.0.0.2", mirror.url, **via)) as a:
            await fetch(a)
            mirror.reset_stats()
            async with (
                agent(config(tmp_path / "b", "127.0.0.3", mirror.url, **via)) as b,
                TrackerClient(t.url) as probe,
            ):
                assert b.peers.live() == []
                for _ in range(100):  # A announces what it holds within a second or two
                    who = await probe.who(tuple(a.seeds.held))
                    if len(who) == len(a.seeds.held):
                        break
                    await asyncio.sleep(0.1)
                result = await fetch(b)
                assert [p.agent_id for p in b.peers.live()] == [a.agent_id]
                # libtorrent announced A's torrents to the tracker itself (BitTorrent
                # /announce; v2 info-hashes truncated to 20 bytes), so plain BitTorrent
                # clients find the swarm there too.
                (big,) = [m for m in a.seeds.manifests_for(tuple(a.seeds.held)) if m.size > MiB]
                key = bytes.fromhex(big.info_hash)[:20]
                for _ in range(50):
                    seeds = t.registry.bt_peers(key, t.clock())
                    if any(port == a.swarm.listen_port for _, port, _ in seeds):
                        break
                    await asyncio.sleep(0.1)
                assert any(port == a.swarm.listen_port for _, port, _ in seeds), seeds
    assert result["from_peers"] == total and mirror.stats().blob_bytes == 0


async def test_a_manifest_for_other_bytes_is_caught_by_the_whole_file_hash(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """Every piece passes the lying peer's merkle tree; the whole-file hash, which
    follows the pieces as they land, still refuses the result (none of it is linked)."""
    data = (tmp_path / "src" / "model.safetensors").read_bytes()
    blob = sha256(data)
    other = random.Random(99).randbytes(len(data))  # same size, other bytes
    lie_dir = tmp_path / "lie"
    lie_dir.mkdir()
    (lie_dir / blob).write_bytes(other)
    manifest = await make_manifest(VerifiedBlob(blob, len(other), lie_dir / blob), "liar")

    class LyingPeer(SilentPeer):  # offers `other` under the id of `data`, and seeds it
        blobs = 1

        def __init__(self, bt_port: int) -> None:
            self.bt_port = bt_port

        def manifests_for(self, ids: tuple[str, ...]) -> list[wire.Manifest]:
            return [manifest] if blob in ids else []

    from aiohttp import web

    async with SwarmSession(SwarmSettings(listen_host="127.0.0.6", listen_port=0)) as liar:
        await liar.add_torrent(manifest.torrent, lie_dir, seed_mode=True)
        runner = web.AppRunner(make_peer_app(LyingPeer(liar.listen_port)))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.6", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with agent(
                config(tmp_path / "b", "127.0.0.3", mirror.url, peers=(("127.0.0.6", port),))
            ) as b:
                result = await fetch(b)
                st = await liar.status(manifest.info_hash)
        finally:
            await runner.cleanup()
    assert st.uploaded_payload_bytes >= len(data) // 2  # the lie was swarmed ...
    assert result["hash_failures"] >= 1  # ... and refused as a whole
    got = tmp_path / "b/cache/models--org--m/blobs" / blob
    assert got.read_bytes() == data  # the mirror's copy, never the liar's
    assert mirror.stats().per_file["org/m/model.safetensors"] == len(data)


async def test_a_download_connects_peers_that_start_swarming_after_it(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """C swarms from the seeder A (slow uploader) and knows B, which is idle when C
    starts; B then fetches from A alone (it does not know C). C's survey during its
    download finds B swarming the blob and connects it: B uploads to C."""
    slow = 3 * MiB  # A's upload cap: C's download takes seconds, B has time to join
    async with agent(config(tmp_path / "a", "127.0.0.2", mirror.url, max_upload_rate=slow)) as a:
        await fetch(a)
        async with agent(config(tmp_path / "b", "127.0.0.3", mirror.url, peers=(peer_of(a),))) as b:
            async with agent(
                config(
                    tmp_path / "c",
                    "127.0.0.4",
                    mirror.url,
                    peers=(peer_of(a), peer_of(b)),
                    stall_timeout=30.0,
                )
            ) as c:
                c_done = asyncio.create_task(fetch(c))
                for _ in range(400):  # until C swarms the big blob
                    if c.swarm.torrents() and c.blobs.fetching_ids():
                        break
                    await asyncio.sleep(0.05)
                await fetch(b)
                result = await c_done
                seeding = 0
                for ih in b.swarm.torrents():
                    with contextlib.suppress(UnknownTorrent):
                        seeding += (await b.swarm.status(ih)).uploaded_payload_bytes
            b_uploaded = b.blobs.uploaded_by_removed + seeding
    assert result["from_peers"] > 0
    assert b_uploaded > 0, "C never traded with B, which started swarming after it"
    got = (
        tmp_path
        / "c/cache/models--org--m/blobs"
        / sha256((tmp_path / "src" / "model.safetensors").read_bytes())
    )
    assert got.stat().st_size == BIG


async def test_a_small_blob_from_a_peer_is_not_seeded_with_a_manifest_its_bytes_never_met(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """A small blob (not above one piece) comes from a peer over HTTP, checked against
    its id alone: no piece of it goes through the manifest's tree. The manifest that
    peer offered (any tree for that id and size passes `check_manifest`) must not be the
    one this agent then seeds and offers to others as its own."""
    data = (tmp_path / "src" / "small.bin").read_bytes()
    blob = sha256(data)
    true_dir, lie_dir = tmp_path / "true", tmp_path / "lie"
    true_dir.mkdir()
    lie_dir.mkdir()
    (true_dir / blob).write_bytes(data)
    (lie_dir / blob).write_bytes(random.Random(98).randbytes(len(data)))
    honest = await make_manifest(VerifiedBlob(blob, len(data), true_dir / blob), "peer")
    bogus = await make_manifest(VerifiedBlob(blob, len(data), lie_dir / blob), "peer")
    assert bogus.info_hash != honest.info_hash

    class LyingPeer(SilentPeer):  # the right bytes, under a tree of other bytes
        blobs = 1

        def manifests_for(self, ids: tuple[str, ...]) -> list[wire.Manifest]:
            return [bogus] if blob in ids else []

        def verified_blob_path(self, blob_id: str) -> Path | None:
            return true_dir / blob if blob_id == blob else None

    from aiohttp import web

    runner = web.AppRunner(make_peer_app(LyingPeer()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.6", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with agent(
            config(tmp_path / "b", "127.0.0.3", mirror.url, peers=(("127.0.0.6", port),))
        ) as b:
            await fetch(b)
            held = b.seeds.held.get(blob)
            offered = b.seeds.held.keys()
    finally:
        await runner.cleanup()
    assert mirror.stats().per_file.get("org/m/small.bin", 0) == 0  # (it came from the peer)
    assert blob in offered and held is not None
    assert held.manifest.info_hash == honest.info_hash, "seeded with the peer's unchecked tree"
