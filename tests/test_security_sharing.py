"""Attacks on what an agent shares (issue "fail closed", findings 1, 3, 9 and the publish
debris of 10): real agents as separate processes on loopback, the project's mirror
serving a public, a private and a gated repo, the attacker on its own loopback address
with plain HTTP, a bare libtorrent session, a hostile peer and a hostile mirror."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from peer import wire
from peer.cli.demo import Proc, _start, _stop, loopback_agent_command
from peer.manifests import VerifiedBlob, make_manifest
from peer.mirror_server import MirrorServer, RepoSource
from peer.transfer.swarm import SwarmSession, SwarmSettings
from peer.verification.hashing import BlobHasher, HashKind
from tracker.client import TrackerClient

MiB = 1 << 20
TOKEN = "hf_agent_owner_token"  # the agent's own token: reads the private and gated repos
ATTACKER = "127.0.0.9"


def sha256(data: bytes) -> str:
    h = BlobHasher(HashKind.SHA256, len(data))
    h.update(data)
    return h.hexdigest()


@dataclass
class Repo:
    repo_id: str
    shard: bytes  # 3 MiB: three pieces, through the swarm
    small: bytes  # 200 KB, LFS-named, below one piece: over peer HTTP

    @property
    def ids(self) -> tuple[str, str]:
        return sha256(self.shard), sha256(self.small)


def make_repo(folder: Path, repo_id: str, seed: int) -> Repo:
    rnd = random.Random(seed)
    folder.mkdir(parents=True)
    repo = Repo(repo_id, rnd.randbytes(3 * MiB), rnd.randbytes(200_000))
    (folder / "config.json").write_text(f'{{"name": "{repo_id}"}}')
    (folder / "model.safetensors").write_bytes(repo.shard)
    (folder / "small.bin").write_bytes(repo.small)
    return repo


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    pub = make_repo(tmp_path / "pub", "org/pub", 1)
    priv = make_repo(tmp_path / "priv", "org/priv", 2)
    gated = make_repo(tmp_path / "gated", "org/gated", 3)
    sources = [
        RepoSource("model", "org/pub", tmp_path / "pub"),
        RepoSource("model", "org/priv", tmp_path / "priv", private=True),
        RepoSource("model", "org/gated", tmp_path / "gated", gated=True),
    ]
    async with MirrorServer(sources, gated_tokens=[TOKEN]) as mirror:
        yield {"mirror": mirror, "pub": pub, "priv": priv, "gated": gated}


@contextlib.asynccontextmanager
async def agent_proc(root: Path, ip: str, mirror: str, *extra: str) -> AsyncIterator[Proc]:
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    cmd = loopback_agent_command(root, ip, mirror, (), "-v", *extra)
    p = await _start(f"agent {ip}", cmd, root / "agent.log", "ready")
    try:
        yield p
    finally:
        await _stop(p)


def local_url(p: Proc, ip: str) -> str:
    return f"http://{ip}:{p.info['local_port']}"


def peer_url(p: Proc, ip: str) -> str:
    return f"http://{ip}:{p.info['peer_port']}"


async def download(p: Proc, ip: str, repo_id: str, **body: Any) -> dict[str, Any]:
    """POST /v1/downloads as the agent's own user (the test runs as the agent's uid):
    the last NDJSON event."""
    import json

    last: dict[str, Any] = {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{local_url(p, ip)}/v1/downloads", json={"repo_id": repo_id, **body}) as r,
    ):
        async for line in r.content:
            if line.strip():
                last = json.loads(line)
    return last


def attacker_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ATTACKER, 0)))


async def assert_healthy(p: Proc, ip: str) -> None:
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as s,
        s.get(f"{peer_url(p, ip)}/v1/health") as r,
    ):
        assert r.status == 200
    assert time.monotonic() - t0 < 1.0


async def bytes_over_swarm(blob: bytes, host: str, bt_port: int, seconds: float) -> int:
    """A bare libtorrent client that knows the blob's torrent (here: made from the bytes
    themselves, the most an attacker could know) asks the agent for it."""
    manifest = await asyncio.to_thread(_manifest_of, blob)
    async with SwarmSession(SwarmSettings(listen_host=ATTACKER, listen_port=0)) as ses:
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"bare-{os.getpid()}-{manifest.blob_id}"
        folder.mkdir(parents=True, exist_ok=True)
        ih = manifest.info_hash
        try:
            await ses.add_torrent(manifest.torrent, folder)
            ses.connect_peer(ih, host, bt_port)
            deadline = time.monotonic() + seconds
            got = 0
            while time.monotonic() < deadline:
                got = (await ses.status(ih)).peer_payload_bytes
                if got >= len(blob):
                    break
                await asyncio.sleep(0.2)
            return got
        finally:
            with contextlib.suppress(Exception):
                await ses.remove_torrent(ih)
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()


def _manifest_of(blob: bytes) -> wire.Manifest:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / sha256(blob)
        path.write_bytes(blob)
        return asyncio.run(make_manifest(VerifiedBlob(path.name, len(blob), path), made_by="x"))


# -- finding 1: private and gated files never leave the agent -----------------------------


async def test_private_and_gated_blobs_reach_no_lan_host(world: dict[str, Any], tmp_path: Path):
    mirror: MirrorServer = world["mirror"]
    pub, priv, gated = world["pub"], world["priv"], world["gated"]
    tracker = await _start(
        "tracker",
        [sys.executable, "-m", "peer.cli.main", "tracker", "--listen", "127.0.0.20:0"],
        tmp_path / "tracker.log",
        "http://",
    )
    try:
        turl = tracker.info["url"]
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        async with agent_proc(
            tmp_path / "a",
            "127.0.0.2",
            mirror.url,
            "--token-file",
            str(token_file),
            "--tracker",
            turl,
        ) as a:
            for repo in ("org/pub", "org/priv", "org/gated"):
                done = await download(a, "127.0.0.2", repo)
                assert done["event"] == "done", done
            # Let the agent announce what it holds (it nudges the tracker on changes).
            await asyncio.sleep(2.5)
            all_ids = [*pub.ids, *priv.ids, *gated.ids]
            async with attacker_session() as s:
                # plain HTTP: the small private and gated files are 404, the public one 200
                for repo, want in ((pub, 200), (priv, 404), (gated, 404)):
                    async with s.get(f"{peer_url(a, '127.0.0.2')}/v1/blobs/{repo.ids[1]}") as r:
                        body = await r.read()
                        assert r.status == want, (repo.repo_id, r.status)
                        assert (body == repo.small) == (want == 200)
                # /v1/have: manifests for the public blobs only, nothing else named
                req = wire.encode(wire.HaveRequest(blob_ids=tuple(all_ids)))
                async with s.post(f"{peer_url(a, '127.0.0.2')}/v1/have", data=req) as r:
                    have = wire.decode_as(await r.read(), wire.HaveResponse)
                offered = {m.blob_id for m in (*have.manifests, *have.fetching)}
                offered |= {c.blob_id for c in have.claims}
                assert offered == set(pub.ids)
            # the tracker names the agent for public blobs only
            async with TrackerClient(turl) as t:
                who = await t.who(all_ids)
            assert set(who) == set(pub.ids)
            # the swarm: a client that knows the torrent gets the public shard, and not
            # one byte of the private or gated ones
            bt = a.info["bt_port"]
            assert await bytes_over_swarm(pub.shard, "127.0.0.2", bt, 10) >= len(pub.shard)
            for repo in (priv, gated):
                assert await bytes_over_swarm(repo.shard, "127.0.0.2", bt, 4) == 0
            # another agent, with no token: the gated repo fails as against the mirror, and
            # no byte of it comes from A; the public repo comes from A
            mirror.reset_stats()
            a_peer = f"127.0.0.2:{a.info['peer_port']}"
            async with agent_proc(tmp_path / "b", "127.0.0.3", mirror.url, "--peer", a_peer) as b:
                refused = await download(b, "127.0.0.3", "org/gated")
                assert refused["event"] == "error" and refused["kind"] == "GatedRepo", refused
                ok = await download(b, "127.0.0.3", "org/pub")
                assert ok["event"] == "done" and ok["from_peers"] > 0
            assert not list((tmp_path / "b/cache").glob("models--org--gated/blobs/*"))
            assert mirror.stats().blob_bytes == 0
            await assert_healthy(a, "127.0.0.2")
    finally:
        await _stop(tracker)
