"""Attacks on what an agent shares (issue "fail closed", findings 1, 3, 9 and the publish
debris of 10): real agents as separate processes on loopback, the project's mirror
serving a public, a private and a gated repo, the attacker on its own loopback address
with plain HTTP, a bare libtorrent session, a hostile peer and a hostile mirror."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from procs import AgentProcess, agent_process, answers_within, tracker_process

from peer import wire
from peer.manifests import VerifiedBlob, make_manifest
from peer.manifests.revisions import content_commit
from peer.manifests.signing import KeyPins, Signatures
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


async def download(p: AgentProcess, repo_id: str, **body: Any) -> dict[str, Any]:
    """POST /v1/downloads as the agent's own user (the test runs as the agent's uid):
    the last NDJSON event."""
    last: dict[str, Any] = {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{p.local_url}/v1/downloads", json={"repo_id": repo_id, **body}) as r,
    ):
        async for line in r.content:
            if line.strip():
                last = json.loads(line)
    return last


def attacker_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ATTACKER, 0)))


async def assert_healthy(p: AgentProcess) -> None:
    await answers_within(f"{p.peer_url}/v1/health")


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
    async with tracker_process(tmp_path / "tracker.log", "127.0.0.20:0") as (_, turl):
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        async with agent_process(
            tmp_path / "a",
            "127.0.0.2",
            mirror.url,
            "--token-file",
            str(token_file),
            "--tracker",
            turl,
        ) as a:
            for repo in ("org/pub", "org/priv", "org/gated"):
                done = await download(a, repo)
                assert done["event"] == "done", done
            # Let the agent announce what it holds (it nudges the tracker on changes).
            await asyncio.sleep(2.5)
            all_ids = [*pub.ids, *priv.ids, *gated.ids]
            async with attacker_session() as s:
                # plain HTTP: the small private and gated files are 404, the public one 200
                for repo, want in ((pub, 200), (priv, 404), (gated, 404)):
                    async with s.get(f"{a.peer_url}/v1/blobs/{repo.ids[1]}") as r:
                        body = await r.read()
                        assert r.status == want, (repo.repo_id, r.status)
                        assert (body == repo.small) == (want == 200)
                # the herd relay: no more than /v1/blobs (a private or gated blob is
                # never led for a herd, and once held it is not shared)
                for repo, want in ((pub, 206), (priv, 404), (gated, 404)):
                    url = f"{a.peer_url}/v1/relay/{repo.ids[0]}"
                    async with s.get(url, headers={"Range": "bytes=1000-"}) as r:
                        body = await r.read()
                        assert r.status == want, (repo.repo_id, r.status)
                        assert (body == repo.shard[1000:]) == (want == 206)
                async with s.get(
                    f"{a.peer_url}/v1/relay/{pub.ids[0]}", headers={"Range": "bytes=0-9"}
                ) as r:
                    assert r.status == 400  # only an open range: the rest of the blob
                # /v1/have: manifests for the public blobs only, nothing else named
                req = wire.encode(wire.HaveRequest(blob_ids=tuple(all_ids)))
                async with s.post(f"{a.peer_url}/v1/have", data=req) as r:
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
            async with agent_process(
                tmp_path / "b", "127.0.0.3", mirror.url, "--peer", a_peer
            ) as b:
                refused = await download(b, "org/gated")
                assert refused["event"] == "error" and refused["kind"] == "GatedRepo", refused
                ok = await download(b, "org/pub")
                assert ok["event"] == "done" and ok["from_peers"] > 0
            assert not list((tmp_path / "b/cache").glob("models--org--gated/blobs/*"))
            assert mirror.stats().blob_bytes == 0
            await assert_healthy(a)


# -- finding 3: a LAN-only name (or a revision told by peers) cannot launder a gated blob --


def hostile_peer_app(files: tuple[wire.RevisionFile, ...]) -> web.Application:
    """Looks like an agent; answers every revision request with a manifest naming
    `files` (the ids of blobs it does not hold: another agent's gated ones)."""
    signer = Signatures("e" * 32, Ed25519PrivateKey.generate(), KeyPins(Path("/nonexistent")))

    async def health(_: web.Request) -> web.Response:
        body = wire.encode(wire.Health(agent_id="e" * 32, bt_port=1, blobs=0))
        return web.Response(body=body, content_type="application/msgpack")

    async def have(_: web.Request) -> web.Response:
        return web.Response(
            body=wire.encode(wire.HaveResponse()), content_type="application/msgpack"
        )

    async def revisions(request: web.Request) -> web.Response:
        ask = wire.decode_as(await request.read(), wire.RevisionRequest)
        commit = content_commit(files) if ask.repo_id.startswith("local/") else "c" * 40
        m = wire.RevisionManifest(
            repo_type=ask.repo_type,
            repo_id=ask.repo_id,
            revision=ask.revision,
            commit=commit,
            files=files,
            made_by="e" * 32,
            published_at=int(time.time() * 1000),
        )
        # Signed with a key of its own: a local/* name is taken on first use (TOFU),
        # so what stops it here is the sharing gate, not the signature.
        m = signer.sign_revision(m)
        return web.Response(body=wire.encode(m), content_type="application/msgpack")

    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/have", have)
    app.router.add_post("/v1/revisions", revisions)
    return app


@contextlib.asynccontextmanager
async def serve(app: web.Application, host: str) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    try:
        yield f"{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_lan_name_cannot_launder_a_gated_blob(tmp_path: Path) -> None:
    gated = make_repo(tmp_path / "gated", "org/gated", 3)
    files = (
        wire.RevisionFile(path="model.safetensors", blob_id=gated.ids[0], size=len(gated.shard)),
        wire.RevisionFile(path="small.bin", blob_id=gated.ids[1], size=len(gated.small)),
    )
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    async with contextlib.AsyncExitStack() as stack:
        mirror = await stack.enter_async_context(
            MirrorServer(
                [RepoSource("model", "org/gated", tmp_path / "gated", gated=True)],
                gated_tokens=[TOKEN],
            )
        )
        hostile = await stack.enter_async_context(serve(hostile_peer_app(files), "127.0.0.30"))
        a = await stack.enter_async_context(
            agent_process(
                tmp_path / "a",
                "127.0.0.2",
                mirror.url,
                "--token-file",
                str(token_file),
                "--peer",
                hostile,
            )
        )
        assert (await download(a, "org/gated"))["event"] == "done"
        endpoint = a.local_url
        async with aiohttp.ClientSession() as s:
            # the mirror's word, without a token: gated, as against the Hub
            async with s.get(f"{endpoint}/org/gated/resolve/main/small.bin") as r:
                assert r.status in (401, 403) and r.headers.get("X-Error-Code") == "GatedRepo"
            # the hostile peer's word: local/alias names the gated blobs
            for path, blob in (("small.bin", gated.small), ("model.safetensors", gated.shard)):
                async with s.get(f"{endpoint}/local/alias/resolve/main/{path}") as r:
                    body = await r.read()
                    assert r.status == 403, (path, r.status, body[:200])
                    assert blob[:4096] not in body
            # the mirror goes down: the peer's word on org/gated itself is not enough either
            await mirror.__aexit__(None, None, None)
            for path, blob in (("small.bin", gated.small), ("model.safetensors", gated.shard)):
                async with s.get(f"{endpoint}/org/gated/resolve/main/{path}") as r:
                    body = await r.read()
                    assert r.status != 200 and blob[:4096] not in body, (path, r.status)
        await assert_healthy(a)


# -- finding 9: a hostile mirror's answers are checked before they touch the disk ---------


def hostile_mirror_app(content: bytes) -> web.Application:
    """Answers any revision of org/x (even one that is a path) with one file."""
    oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    commit = "a" * 40

    async def info(_: web.Request) -> web.Response:
        return web.json_response({"id": "org/x", "sha": commit, "private": False})

    async def tree(_: web.Request) -> web.Response:
        return web.json_response(
            [{"type": "file", "oid": oid, "size": len(content), "path": "config.json"}]
        )

    async def resolve(request: web.Request) -> web.StreamResponse:
        headers = {"X-Repo-Commit": commit, "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(content))
            return web.Response(headers=headers)
        return web.Response(body=content, headers=headers)

    app = web.Application()
    app.router.add_get("/api/models/org/x/revision/{rev:.*}", info)
    app.router.add_get("/api/models/org/x/tree/{rev:.*}", tree)
    app.router.add_route("*", "/org/x/resolve/{rest:.*}", resolve)
    return app


async def test_a_hostile_mirror_cannot_write_outside_the_cache(tmp_path: Path) -> None:
    content = b'{"hostile": true}'
    outside = tmp_path / "outside"
    outside.mkdir()
    async with (
        serve(hostile_mirror_app(content), "127.0.0.40") as mirror,
        agent_process(tmp_path / "a", "127.0.0.2", f"http://{mirror}") as a,
    ):
        # a revision that is an absolute path, through HF_ENDPOINT and through a download
        target = outside / "ref-from-resolve"
        rev = str(target).replace("/", "%2F")
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{a.local_url}/org/x/resolve/{rev}/config.json") as r,
        ):
            await r.read()
        target2 = outside / "ref-from-download"
        done = await download(a, "org/x", revision=str(target2))
        assert done["event"] == "error", done
        assert not target.exists() and not target2.exists()
        assert list(outside.iterdir()) == []
        await assert_healthy(a)


# -- finding 10: a publish killed mid-copy leaves nothing behind once the agent restarts --


async def test_publish_temp_file_is_removed_after_a_kill(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    # sparse: cheap to make, slow enough to copy
    (folder / "model.safetensors").touch()
    await asyncio.to_thread(os.truncate, folder / "model.safetensors", 768 * MiB)
    partial = tmp_path / "a/cache/models--local--run/.hfswarm/partial"
    async with MirrorServer([]) as mirror:
        async with agent_process(tmp_path / "a", "127.0.0.2", mirror.url) as a:
            url = f"{a.local_url}/v1/publish"
            body = {"path": str(folder), "repo_id": "local/run"}
            async with aiohttp.ClientSession() as s:
                pub = asyncio.create_task(s.post(url, json=body))
                deadline = time.monotonic() + 20
                while not list(partial.glob("publish.*")) and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                a.proc.send_signal(signal.SIGKILL)
                await a.proc.wait()
                with contextlib.suppress(aiohttp.ClientError):
                    (await pub).close()
        left = list(partial.glob("publish.*"))
        assert left, "the kill came too late to leave a temp file"
        async with agent_process(tmp_path / "a", "127.0.0.2", mirror.url) as a:
            assert list(partial.glob("publish.*")) == []
            await assert_healthy(a)


async def test_hf_endpoint_with_a_token_shares_only_public_blobs(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """A client with a token (its own, through HF_ENDPOINT) downloads a gated and a
    public file: the agent cannot tell from the resolve alone whether a repo is public,
    so it asks the mirror anonymously; only the public blob is then offered to peers."""
    mirror: MirrorServer = world["mirror"]
    pub, gated = world["pub"], world["gated"]
    async with agent_process(tmp_path / "a", "127.0.0.2", mirror.url) as a:
        endpoint = a.local_url
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=auth) as s:
            for repo in ("org/gated", "org/pub"):
                async with s.get(f"{endpoint}/{repo}/resolve/main/small.bin") as r:
                    assert r.status == 200, (repo, r.status)
                    assert await r.read() == world[repo.split("/")[1]].small
        async with attacker_session() as s:
            req = wire.encode(wire.HaveRequest(blob_ids=(pub.ids[1], gated.ids[1])))
            async with s.post(f"{a.peer_url}/v1/have", data=req) as r:
                have = wire.decode_as(await r.read(), wire.HaveResponse)
            assert [m.blob_id for m in have.manifests] == [pub.ids[1]]
            async with s.get(f"{a.peer_url}/v1/blobs/{gated.ids[1]}") as r:
                assert r.status == 404


async def test_a_lan_name_no_peer_can_deliver_fails_with_that_reason(tmp_path: Path) -> None:
    """A peer names a `local/*` revision whose blob nobody holds: no mirror may serve a
    LAN-only name, so there is nobody to wait for (no herd turn, no mirror): the client
    gets "no peer could deliver" at once (it used to claim the blob in a herd and then
    fail with "no mirror could serve")."""
    ghost = random.Random(5).randbytes(3 * MiB)
    files = (wire.RevisionFile(path="ghost.safetensors", blob_id=sha256(ghost), size=len(ghost)),)
    async with (
        MirrorServer([]) as mirror,
        serve(hostile_peer_app(files), "127.0.0.30") as hostile,
        agent_process(tmp_path / "a", "127.0.0.2", mirror.url, peers=[hostile]) as a,
        aiohttp.ClientSession() as s,
    ):
        t0 = time.monotonic()
        async with s.get(f"{a.local_url}/local/ghost/resolve/main/ghost.safetensors") as r:
            body = await r.read()
        took = time.monotonic() - t0
        assert r.status >= 400 and ghost[:4096] not in body, r.status
        assert b"no peer could deliver" in body, body[:300]
        assert took < 10, took
        assert mirror.stats().requests == 0  # a LAN-only name never reaches a mirror
        await assert_healthy(a)
