"""Signed manifests and revision manifests (issue 10): real agents as separate processes,
hostile peers in process (over mutual TLS with a member's credentials in cluster mode).

- A member offering a manifest whose signature does not verify is banned, its offer
  never counted, and the download completes with the right bytes.
- A ``local/*`` name is pinned to the first key that published it: a newer revision
  signed by another key is refused, in open mode (the agent's own key) and in cluster
  mode (another member's key)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from procs import AgentProcess, agent_process
from test_cluster import ROOT, cluster, download, mirror, status

from peer import wire
from peer.cluster.credentials import Member, load_member
from peer.cluster.tls import Cluster
from peer.manifests import VerifiedBlob, make_manifest
from peer.manifests.revisions import content_commit
from peer.manifests.signing import KeyPins, Signatures
from peer.mirror_server import MirrorServer

__all__ = ["mirror"]  # the fixture, used by name

MiB = 1 << 20
MSGPACK = "application/msgpack"


def fake_agent(
    agent_id: str,
    have: Callable[[wire.HaveRequest], wire.HaveResponse],
    revision: Callable[[wire.RevisionRequest], wire.RevisionManifest | None],
) -> web.Application:
    """Looks like an agent's peer API; answers as the test says."""

    async def health(_: web.Request) -> web.Response:
        body = wire.encode(wire.Health(agent_id=agent_id, bt_port=1, blobs=1))
        return web.Response(body=body, content_type=MSGPACK)

    async def have_route(request: web.Request) -> web.Response:
        ask = wire.decode_as(await request.read(), wire.HaveRequest)
        return web.Response(body=wire.encode(have(ask)), content_type=MSGPACK)

    async def revisions(request: web.Request) -> web.Response:
        m = revision(wire.decode_as(await request.read(), wire.RevisionRequest))
        if m is None:
            return web.Response(status=404)
        return web.Response(body=wire.encode(m), content_type=MSGPACK)

    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/have", have_route)
    app.router.add_post("/v1/revisions", revisions)
    return app


@contextlib.asynccontextmanager
async def serve(app: web.Application, host: str, member: Member | None) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ssl = Cluster(member).server_context() if member is not None else None
    site = web.TCPSite(runner, host, 0, ssl_context=ssl)
    await site.start()
    try:
        yield f"{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def garbage_manifest(blob_id: str, size: int) -> wire.Manifest:
    """A canonical piece map of other bytes under `blob_id`'s name: passes
    `check_manifest` (which cannot see content), fails the blob hash later."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / blob_id
        path.write_bytes(random.Random(5).randbytes(size))
        return await make_manifest(VerifiedBlob(blob_id, size, path), made_by="0" * 32)


async def test_a_member_serving_a_forged_manifest_is_banned_and_the_download_completes(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    lab = cluster(tmp_path, "lab", "a", "b", "evil")
    evil = load_member(lab["evil"])
    repo = tmp_path / "repo"
    shard = (repo / "model.safetensors").read_bytes()
    shard_id = hashlib.sha256(shard).hexdigest()
    forged = await garbage_manifest(shard_id, len(shard))
    # Signed by the evil member... over another manifest: the signature does not verify.
    signer = Signatures(evil.agent_id, evil.key, KeyPins(tmp_path / "pins"), cert_der=evil.cert_der)
    other = signer.sign_manifest(replace(forged, info_hash="1" * 64))
    forged = replace(forged, made_by=evil.agent_id, signature=other.signature)
    asked: list[int] = []

    def have(ask: wire.HaveRequest) -> wire.HaveResponse:
        asked.append(1)
        return wire.HaveResponse(manifests=(forged,) if shard_id in ask.blob_ids else ())

    app = fake_agent(evil.agent_id, have, lambda _: None)
    flags_a = ["-v", "--cluster", str(lab["a"])]
    async with (
        agent_process(tmp_path / "a", "127.0.0.2", mirror.url, *flags_a) as a,
        serve(app, "127.0.0.40", evil) as evil_addr,
    ):
        await download(a)
        async with agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "-v", "--cluster", str(lab["b"]),
            peers=[a.peer_addr, evil_addr],
        ) as b:  # fmt: skip
            assert {p["agent_id"] for p in (await status(b))["peers"]} == {
                a.info["agent_id"],
                evil.agent_id,
            }
            got = await download(b)
            s = await status(b)
            assert asked, "the evil member was never asked"
            assert s["bans"] >= 1 and s["hash_failures"] == 0, s
            assert evil.agent_id not in {p["agent_id"] for p in s["peers"]}
            assert got["from_peers"] > len(shard) // 2, got
            snap = Path(got["path"])
            assert (snap / "model.safetensors").read_bytes() == shard
            assert "banned" in b.log.read_text()


async def publish(a: AgentProcess, folder: Path, name: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "python", "-m", "peer.cli.main", "publish", str(folder), "--repo", name,
        "--agent", a.local_url, "--quiet",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode().strip().splitlines()[-1]


async def local_download(p: AgentProcess, name: str) -> dict[str, Any]:
    last: dict[str, Any] = {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{p.local_url}/v1/downloads", json={"repo_id": name}) as r,
    ):
        async for line in r.content:
            if line.strip():
                last = json.loads(line)
    return last


async def hijack_is_refused(tmp_path: Path, mirror: MirrorServer, *, mode: str) -> None:
    """A publishes local/run; B fetches it (pinning A's key); a hijacker offers a newer
    revision of local/run signed by its own key; B keeps A's and says why."""
    if mode == "cluster":
        lab = cluster(tmp_path, "lab", "a", "b", "evil")
        flags_a, flags_b = ["--cluster", str(lab["a"])], ["--cluster", str(lab["b"])]
        evil: Member | None = load_member(lab["evil"])
        assert evil is not None
        hijacker = Signatures(
            evil.agent_id, evil.key, KeyPins(tmp_path / "p"), cert_der=evil.cert_der
        )
        hijacker_id = evil.agent_id
    else:
        flags_a = flags_b = []
        evil = None
        hijacker_id = "e" * 32
        hijacker = Signatures(hijacker_id, Ed25519PrivateKey.generate(), KeyPins(tmp_path / "p"))
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text('{"step": 1}')
    (src / "weights.bin").write_bytes(random.Random(1).randbytes(300_000))
    theirs = (b'{"step": "hijacked"}', hashlib.sha1(b'blob 20\0{"step": "hijacked"}').hexdigest())
    files = (wire.RevisionFile(path="config.json", blob_id=theirs[1], size=len(theirs[0])),)

    def revision(ask: wire.RevisionRequest) -> wire.RevisionManifest | None:
        m = wire.RevisionManifest(
            repo_type=ask.repo_type, repo_id=ask.repo_id, revision=ask.revision,
            commit=content_commit(files), files=files, made_by=hijacker_id,
            published_at=int(time.time() * 1000) + 30 * 60 * 1000,  # "newer"
        )  # fmt: skip
        return hijacker.sign_revision(m)

    app = fake_agent(hijacker_id, lambda _: wire.HaveResponse(), revision)
    async with agent_process(tmp_path / "a", "127.0.0.2", mirror.url, "-v", *flags_a) as a:
        commit = await publish(a, src, "local/run")
        async with agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "-v", *flags_b, peers=[a.peer_addr]
        ) as b:
            first = await local_download(b, "local/run")
            assert first["event"] == "done" and first["commit"] == commit, first
        async with (
            serve(app, "127.0.0.41", evil) as hijacker_addr,
            agent_process(
                tmp_path / "b", "127.0.0.3", mirror.url, "-v", *flags_b,
                peers=[a.peer_addr, hijacker_addr],
            ) as b,
        ):  # fmt: skip
            assert len((await status(b))["peers"]) == 2
            again = await local_download(b, "local/run")
            assert again["event"] == "done" and again["commit"] == commit, again
            assert (Path(again["path"]) / "config.json").read_text() == '{"step": 1}'
            assert "was first published with key" in b.log.read_text()


async def test_a_hijacking_local_manifest_is_refused_in_open_mode(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    await hijack_is_refused(tmp_path, mirror, mode="open")


async def test_a_hijacking_local_manifest_is_refused_in_cluster_mode(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    await hijack_is_refused(tmp_path, mirror, mode="cluster")


def test_own_unsigned_revisions_kept_from_before_signing_are_signed_not_dropped(
    tmp_path: Path,
) -> None:
    """An agent upgraded to signed manifests keeps its earlier publishes (signed at
    start); someone else's unsigned local/* manifest is dropped."""
    from peer.agent.revisions import Revisions, _key
    from peer.agent.state import StateDir

    state = StateDir(tmp_path / "state")
    me = state.agent_id()
    files = (wire.RevisionFile(path="a.txt", blob_id="0" * 40, size=3),)

    def manifest(made_by: str) -> wire.RevisionManifest:
        return wire.RevisionManifest(
            repo_type="model", repo_id=f"local/{made_by[:4]}", revision="main",
            commit=content_commit(files), files=files, made_by=made_by,
            published_at=int(time.time() * 1000),
        )  # fmt: skip

    for m in (manifest(me), manifest("f" * 32)):
        state.save_revision(_key(m), wire.encode(m))
    signatures = Signatures(me, Ed25519PrivateKey.generate(), KeyPins(tmp_path / "pins"))
    revisions = Revisions(state, None, me, signatures=signatures)  # type: ignore[arg-type]
    assert revisions.load() == 1
    best = revisions.book.best("model", f"local/{me[:4]}", "main")
    assert best is not None and best.signature
    stored = [wire.decode_as(d, wire.RevisionManifest) for _, d in state.revision_records()]
    assert [m.made_by for m in stored] == [me] and stored[0].signature
