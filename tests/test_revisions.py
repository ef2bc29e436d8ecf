"""Revision manifests: publishing a folder as local/NAME and getting it on other agents
(`hfswarm download`, and huggingface_hub through HF_ENDPOINT mode), and resolving
revisions from peers while the mirror is down. Real agents on loopback, the project's
mirror, the real `hfswarm` CLI and huggingface_hub."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from agentkit import agent, endpoint, fetch, peer_of, snapshot, tree_of, write_tree
from agentkit import config as agentkit_config
from aiohttp import web
from fake_peer import SilentPeer
from huggingface_hub import scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from peer import wire
from peer.agent.revisions import Revisions
from peer.agent.state import StateDir
from peer.config import DownloadOptions, HubSettings
from peer.errors import HfswarmError, NetworkError, RepoNotFound
from peer.manifests import VerifiedBlob, make_manifest
from peer.manifests.revisions import (
    MAX_CLOCK_SKEW_MS,
    BadRevisionManifest,
    RevisionBook,
    accept_revision_manifest,
    content_commit,
)
from peer.mirror_server import MirrorServer, RepoSource
from peer.serving.caller import caller_uid
from peer.serving.peer_api import make_peer_app
from peer.verification.hashing import hash_file

MiB = 1 << 20
GATED_OK = "hf_gated_access_token"


# -- helpers -------------------------------------------------------------------------


def hub_blob_id(path: str, data: bytes) -> str:
    """The id the Hub gives a file: sha256 for LFS-style files, git blob sha1 else."""
    lfs = len(data) >= MiB or Path(path).suffix in {".safetensors", ".bin"}
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def expected_commit(files: dict[str, bytes]) -> str:
    """The documented derivation, spelled out independently of the code."""
    h = hashlib.sha1(b"hfswarm-revision-v1\n")
    for path in sorted(files):
        h.update(f"{path}\0{hub_blob_id(path, files[path])}\0{len(files[path])}\n".encode())
    return h.hexdigest()


# Few retries: several tests wait for a dead mirror to be given up on.
config = partial(
    agentkit_config,
    download=DownloadOptions(
        quiet=True, read_timeout=3.0, connect_timeout=2.0, max_attempts=2, backoff_base=0.05
    ),
)


async def hfswarm(*args: str, user: int | None = None) -> tuple[int, str, str]:
    """The real CLI, in a subprocess (the agents keep running in this event loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFSWARM"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "peer.cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        user=user,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def blobs_are_verified(cache: Path) -> list[str]:
    """Every file in every blobs/ folder hashes to its name: the names of those that do."""
    names = []
    for blob in cache.glob("*/blobs/*"):
        size = blob.stat().st_size
        assert hash_file(blob, blob.name, size).ok, f"{blob} does not match its name"
        names.append(blob.name)
    return names


async def dead_url() -> str:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{probe.sockets[0].getsockname()[1]}"
    probe.close()
    await probe.wait_closed()
    return url


# -- publishing --------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> dict[str, bytes]:
    rnd = random.Random(11)
    return {
        "config.json": b'{"model_type": "published-test", "step": 1000}',
        "model.safetensors": rnd.randbytes(24 * MiB),
        "optimizer.bin": rnd.randbytes(300_000),  # LFS by its suffix, below one piece
        "tokenizer/vocab.txt": b"a\nb\nc\n",
        "empty.txt": b"",
    }


async def test_publish_then_download_elsewhere_and_publish_again(
    tmp_path: Path, checkpoint: dict[str, bytes]
) -> None:
    src = write_tree(tmp_path / "ckpt", checkpoint)
    write_tree(src, {".git/HEAD": b"ref: x", ".cache/huggingface/x": b"bookkeeping"})
    total = sum(len(b) for b in checkpoint.values())
    # A real mirror is configured everywhere: local/* names must never reach it.
    other = write_tree(tmp_path / "other", {"config.json": b"{}"})
    async with MirrorServer([RepoSource("model", "org/other", other)]) as mirror:
        cfg_a = config(tmp_path / "a", "127.0.0.2", (mirror.url,))
        async with agent(cfg_a) as a:
            code, out, err = await hfswarm(
                "publish", str(src), "--repo", "local/ckpt", "--agent", endpoint(a)
            )
            assert code == 0, err
            commit = out.strip().splitlines()[-1]
            assert commit == expected_commit(checkpoint), err
            assert "published" in err
        # The publisher's cache: a normal HF cache repo (it restarted meanwhile: the
        # revision manifest was kept in its state dir).
        a_cache = tmp_path / "a/cache"
        assert (a_cache / "models--local--ckpt/refs/main").read_text() == commit
        kept = Path(snapshot_download("local/ckpt", cache_dir=a_cache, local_files_only=True))
        assert tree_of(kept) == checkpoint
        assert scan_cache_dir(a_cache).warnings == []

        async with agent(cfg_a) as a:
            cfg_b = config(tmp_path / "b", "127.0.0.3", (mirror.url,), peers=(peer_of(a),))
            cfg_c = config(tmp_path / "c", "127.0.0.4", (mirror.url,), peers=(peer_of(a),))
            async with agent(cfg_b) as b, agent(cfg_c) as c:
                # B: `hfswarm download local/ckpt` through its agent.
                t0 = time.monotonic()
                code, out, err = await hfswarm("download", "local/ckpt", "--agent", endpoint(b))
                assert code == 0, err
                got = Path(out.strip().splitlines()[-1])
                assert got.name == commit and tree_of(got) == checkpoint
                status = await b.local.status()
                assert status["bytes_from_peers"] == total and status["bytes_from_mirror"] == 0
                print(f"hfswarm download local/ckpt on B: {time.monotonic() - t0:.1f} s")

                # C: huggingface_hub through C's HF_ENDPOINT (C holds nothing yet).
                t0 = time.monotonic()
                client = tmp_path / "client-cache"
                snap = await snapshot(c, "local/ckpt", client)
                assert snap.name == commit and tree_of(snap) == checkpoint
                assert (client / "models--local--ckpt/refs/main").read_text() == commit
                assert scan_cache_dir(client).warnings == []
                status = await c.local.status()
                assert status["bytes_from_mirror"] == 0
                assert status["bytes_from_peers"] == total
                print(f"snapshot_download local/ckpt via C: {time.monotonic() - t0:.1f} s")

                # Publish again with a changed config and new weights: a new commit,
                # main moves on A, and B and the HF client follow it.
                changed = {
                    **checkpoint,
                    "config.json": b'{"model_type": "published-test", "step": 2000}',
                    "model.safetensors": random.Random(12).randbytes(24 * MiB),
                }
                write_tree(src, changed)
                code, out, err = await hfswarm(
                    "publish", str(src), "--repo", "local/ckpt", "--agent", endpoint(a), "--quiet"
                )
                assert code == 0, err
                commit2 = out.strip()
                assert commit2 == expected_commit(changed) != commit
                assert (a_cache / "models--local--ckpt/refs/main").read_text() == commit2

                code, out, err = await hfswarm("download", "local/ckpt", "--agent", endpoint(b))
                assert code == 0, err
                got2 = Path(out.strip().splitlines()[-1])
                assert got2.name == commit2 and tree_of(got2) == changed
                b_repo = tmp_path / "b/cache/models--local--ckpt"
                assert (b_repo / "refs/main").read_text() == commit2
                assert tree_of(b_repo / "snapshots" / commit) == checkpoint  # old one kept

                snap2 = await snapshot(c, "local/ckpt", client)
                assert snap2.name == commit2 and tree_of(snap2) == changed
                assert (client / "models--local--ckpt/refs/main").read_text() == commit2
                # The old commit stays reachable by its id.
                old = await snapshot(c, "local/ckpt", tmp_path / "client2", revision=commit)
                assert tree_of(old) == checkpoint

                # Publishing the same files again changes nothing.
                code, out, err = await hfswarm(
                    "publish", str(src), "--repo", "local/ckpt", "--agent", endpoint(a)
                )
                assert code == 0 and out.strip().splitlines()[-1] == commit2, err
                assert "unchanged" in err
                # The rest of the read API for local/* (never proxied to the mirror).
                base = f"{endpoint(c)}/api/models/local/ckpt"
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{base}/tree/main/tokenizer") as r:
                        assert r.status == 200
                        assert [e["path"] for e in await r.json()] == ["tokenizer/vocab.txt"]
                    async with http.get(f"{base}/tree/main?recursive=false") as r:
                        top = {e["path"]: e["type"] for e in await r.json()}
                        assert top["tokenizer"] == "directory" and "tokenizer/vocab.txt" not in top
                    async with http.get(f"{base}/tree/main/nope") as r:
                        assert r.status == 404 and r.headers["X-Error-Code"] == "EntryNotFound"
                    async with http.post(
                        f"{base}/paths-info/{commit2}", data={"paths": ["model.safetensors"]}
                    ) as r:
                        (info,) = await r.json()
                        blob = hashlib.sha256(changed["model.safetensors"]).hexdigest()
                        assert info["lfs"]["oid"] == blob and info["size"] == 24 * MiB
                    async with http.get(f"{base}/refs") as r:
                        assert r.status == 404
                    async with http.head(f"{endpoint(c)}/local/ckpt/resolve/main/empty.txt") as r:
                        assert r.status == 200 and r.headers["X-Repo-Commit"] == commit2
                        assert r.headers["Content-Length"] == "0"
                # B now serves the revision too (it downloaded it): peers learn it from B.
                async with aiohttp.ClientSession() as http:
                    req = wire.RevisionRequest(
                        repo_type="model", repo_id="local/ckpt", revision="main"
                    )
                    async with http.post(
                        f"http://127.0.0.3:{b.peer_port}/v1/revisions", data=wire.encode(req)
                    ) as r:
                        assert r.status == 200
                        m = wire.decode_as(await r.read(), wire.RevisionManifest)
                    assert m.commit == commit2 and m.made_by == a.agent_id
        for cache in ("a", "b", "c"):
            blobs_are_verified(tmp_path / cache / "cache")
    assert mirror.stats().requests == 0, "local/* names must never reach the mirror"


async def test_publish_errors_and_unknown_local_repos(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "ckpt", {"a.txt": b"a"})
    (tmp_path / "empty").mkdir()
    async with agent(config(tmp_path / "a", "127.0.0.2", (await dead_url(),))) as a:
        for args, message in (
            (("--repo", "org/ckpt"), "publish as local/NAME"),
            (("--repo", "local/a/b"), "publish as local/NAME"),
            (("--repo", "local/ok", "--agent", "http://127.0.0.1:9"), "no hfswarm agent"),
        ):
            extra = () if "--agent" in args else ("--agent", endpoint(a))
            code, _, err = await hfswarm("publish", str(src), *args, *extra)
            assert code in (2, 3) and message in err, err
        code, _, err = await hfswarm(
            "publish", str(tmp_path / "empty"), "--repo", "local/x", "--agent", endpoint(a)
        )
        assert code == 2 and "holds no files" in err
        code, _, err = await hfswarm("download", "local/nobody-has-it", "--agent", endpoint(a))
        assert code == 2 and "no agent on the LAN knows" in err, err
        with pytest.raises(RepositoryNotFoundError):
            await snapshot(a, "local/nobody-has-it", tmp_path / "client")
    # No agent running at all: a local/* repo is never looked up on the mirror.
    async with MirrorServer([RepoSource("model", "org/x", src)]) as mirror:
        code, _, err = await hfswarm(
            "download", "local/ckpt", "--mirror", mirror.url, "--cache-dir", str(tmp_path / "c")
        )
        assert code == 3 and "lives on the LAN only" in err, err
        assert mirror.stats().requests == 0


def post_as(uid: int, host: str, port: int, path: str, body: bytes) -> bytes:
    """An HTTP POST from a forked child running as `uid` (blocking). Returns the
    response head and body as received."""
    "".encode("idna")  # the child cannot import codecs from a root-only prefix
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become `uid`, send the request, hand back the answer
        code = 1
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                    f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                while chunk := sock.recv(65536):
                    os.write(w, chunk)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to call as another user")
async def test_only_the_agents_own_user_may_publish(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "ckpt", {"a.txt": b"a"})
    body = json.dumps({"path": str(src), "repo_id": "local/x"}).encode()
    async with agent(config(tmp_path / "a", "127.0.0.2", (await dead_url(),))) as a:
        answer = await asyncio.to_thread(
            post_as, 65534, "127.0.0.2", a.local_port, "/v1/publish", body
        )
        assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
        assert b"only for its own user" in answer
        assert not (tmp_path / "a/cache/models--local--x").exists()
        # The same request from the agent's own user is served.
        answer = await asyncio.to_thread(
            post_as, os.geteuid(), "127.0.0.2", a.local_port, "/v1/publish", body
        )
        assert answer.startswith(b"HTTP/1.1 200") and b'"event": "done"' in answer, answer
        assert (tmp_path / "a/cache/models--local--x/refs/main").exists()


async def test_the_caller_of_a_loopback_connection_is_identified() -> None:
    seen: list[int | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(caller_uid(request.transport))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.7", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.7:{port}/") as r:
            assert r.status == 200
    finally:
        await runner.cleanup()
    assert seen == [os.geteuid()]


# -- the mirror down ----------------------------------------------------------------------


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    rnd = random.Random(5)
    return {
        "model": write_tree(
            tmp_path / "src/model",
            {
                "config.json": b'{"model_type": "mirror-down-test"}',
                "model.safetensors": rnd.randbytes(24 * MiB),
                "small.bin": rnd.randbytes(300_000),
                "nested/dir/readme.txt": b"nested\n",
            },
        ),
        "gated": write_tree(
            tmp_path / "src/gated", {"config.json": b'{"gated": 1}', "w.bin": rnd.randbytes(MiB)}
        ),
        "dataset": write_tree(
            tmp_path / "src/dataset",
            {"README.md": b"# data\n", "data/train.parquet": rnd.randbytes(2 * MiB)},
        ),
    }


async def test_mirror_down_revisions_come_from_peers(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    total = sum(len(b) for b in tree_of(sources["model"]).values())
    mirror = MirrorServer(
        [
            RepoSource("model", "org/m", sources["model"]),
            RepoSource("model", "org/gated", sources["gated"], gated=True),
            RepoSource("dataset", "org/d", sources["dataset"]),
        ],
        gated_tokens=[GATED_OK],
    )
    await mirror.start()

    async def unavailable(_: web.Request) -> web.Response:
        return web.Response(status=503, text="down for maintenance")

    failing_app = web.Application()
    failing_app.router.add_route("*", "/{tail:.*}", unavailable)
    failing_runner = web.AppRunner(failing_app)
    await failing_runner.setup()
    await web.TCPSite(failing_runner, "127.0.0.6", 0).start()
    failing = f"http://127.0.0.6:{failing_runner.addresses[0][1]}"
    try:
        url = mirror.url
        commit = mirror.commit_of("model", "org/m")
        # A downloads from the mirror: org/m (public) and org/gated (its token has access).
        cfg_a = dataclasses.replace(
            config(tmp_path / "a", "127.0.0.2", (url,)),
            hub=HubSettings(mirrors=(url,), token=GATED_OK, cache_dir=tmp_path / "a/cache"),
        )
        async with agent(cfg_a) as a:
            await fetch(a, "org/m")
            await fetch(a, "org/gated")
            # Through A's HF_ENDPOINT too: the public dataset is remembered (in the
            # background), the gated repo is not, whoever asks.
            await snapshot(a, "org/d", tmp_path / "a-client", repo_type="dataset")
            await snapshot(a, "org/gated", tmp_path / "a-client", token=GATED_OK)
            for _ in range(100):
                if a.revisions.book.best("dataset", "org/d", "main") is not None:
                    break
                await asyncio.sleep(0.05)
            assert a.revisions.book.best("dataset", "org/d", "main") is not None
            assert a.revisions.book.best("model", "org/gated", "main") is None
            await mirror.close()  # the mirror is gone from here on

            # B's mirror is unreachable; C's answers 503 to everything.
            cfg_b = config(tmp_path / "b", "127.0.0.3", (url,), peers=(peer_of(a),))
            cfg_c = config(tmp_path / "c", "127.0.0.4", (failing,), peers=(peer_of(a),))
            async with agent(cfg_b) as b, agent(cfg_c) as c:
                # `hfswarm download org/m` through B: the revision from A, every byte too.
                t0 = time.monotonic()
                result = await fetch(b, "org/m")
                assert result["commit"] == commit
                assert result["from_peers"] == total and result["from_mirror"] == 0
                got = Path(result["path"])
                assert got.name == commit and tree_of(got) == tree_of(sources["model"])
                assert (tmp_path / "b/cache/models--org--m/refs/main").read_text() == commit
                print(f"run_download with the mirror down: {time.monotonic() - t0:.1f} s")
                data = await fetch(b, "org/d", repo_type="dataset")
                assert tree_of(Path(data["path"])) == tree_of(sources["dataset"])
                assert data["from_mirror"] == 0

                # HF_ENDPOINT through C: revision, tree, resolve all answered without it.
                t0 = time.monotonic()
                snap = await snapshot(c, "org/m", tmp_path / "client")
                assert snap.name == commit and tree_of(snap) == tree_of(sources["model"])
                status = await c.local.status()
                assert status["bytes_from_peers"] == total and status["bytes_from_mirror"] == 0
                print(f"snapshot_download with the mirror down: {time.monotonic() - t0:.1f} s")

                # The gated repo is never shared: A keeps no manifest of it, so nobody can
                # resolve it without the mirror (which would check the client's access).
                async with aiohttp.ClientSession() as http:
                    for repo in ("org/gated", "org/m"):
                        req = wire.RevisionRequest(repo_type="model", repo_id=repo, revision="main")
                        async with http.post(
                            f"http://127.0.0.2:{a.peer_port}/v1/revisions", data=wire.encode(req)
                        ) as r:
                            assert r.status == (404 if repo == "org/gated" else 200)
                with pytest.raises(NetworkError, match="no peer knows org/gated"):
                    await fetch(b, "org/gated")
                with pytest.raises((HfHubHTTPError, LocalEntryNotFoundError)):
                    await snapshot(c, "org/gated", tmp_path / "client3", token=GATED_OK)
                assert not (tmp_path / "c/cache/models--org--gated").exists()
                # C resolves through its 503-answering mirror by peers as well.
                again = await fetch(c, "org/m")
                assert again["commit"] == commit and again["from_mirror"] == 0
    finally:
        await mirror.close()
        await failing_runner.cleanup()


class LyingPeer(SilentPeer):
    """A peer that claims org/m's config.json is a blob it serves, with a date that makes
    its manifest the newest; the bytes it sends for that blob do not match the id."""

    blobs = 1

    def __init__(self, manifest: wire.RevisionManifest, blob: wire.Manifest, path: Path) -> None:
        self.revision = manifest
        self.blob = blob
        self.path = path

    def manifests_for(self, ids: tuple[str, ...]) -> list[wire.Manifest]:
        return [self.blob] if self.blob.blob_id in ids else []

    def verified_blob_path(self, blob_id: str) -> Path | None:
        return self.path if blob_id == self.blob.blob_id else None

    def revision_for(self, request: wire.RevisionRequest) -> wire.RevisionManifest | None:
        # It answers for any repo, even one the mirror does not have.
        return dataclasses.replace(self.revision, repo_id=request.repo_id)


async def test_a_lying_peer_cannot_put_bad_bytes_in_blobs_and_the_mirror_wins(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    real = tree_of(sources["model"])
    # The lie: config.json is blob X (the id of some other content) of that size; the
    # peer serves bytes of that size that are not X.
    claimed = b'{"model_type": "evil", "pad": 00000}'
    evil = b'{"model_type": "EVIL", "pad": 11111}'
    assert len(claimed) == len(evil)
    x = hub_blob_id("config.json", claimed)
    (tmp_path / "liar").mkdir()
    (tmp_path / "liar" / x).write_bytes(evil)
    blob_manifest = await make_manifest(VerifiedBlob(x, len(evil), tmp_path / "liar" / x), "liar")
    files = tuple(
        wire.RevisionFile(
            path=p,
            blob_id=x if p == "config.json" else hub_blob_id(p, data),
            size=len(data) if p != "config.json" else len(evil),
        )
        for p, data in sorted(real.items())
    )
    lie = wire.RevisionManifest(
        repo_type="model",
        repo_id="org/m",
        revision="main",
        commit="1" * 40,
        files=files,
        made_by="e" * 32,
        published_at=int(time.time() * 1000) + MAX_CLOCK_SKEW_MS // 2,  # "newest"
    )
    liar_app = make_peer_app(LyingPeer(lie, blob_manifest, tmp_path / "liar" / x))
    runner = web.AppRunner(liar_app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.5", 0).start()
    liar = ("127.0.0.5", runner.addresses[0][1])
    mirror = MirrorServer([RepoSource("model", "org/m", sources["model"])])
    await mirror.start()
    try:
        url = mirror.url
        commit = mirror.commit_of("model", "org/m")
        async with agent(config(tmp_path / "a", "127.0.0.2", (url,))) as a:
            await fetch(a, "org/m")
            cfg_b = config(tmp_path / "b", "127.0.0.3", (url,), peers=(peer_of(a), liar))
            async with agent(cfg_b) as b:
                assert len(b.peers.live()) == 2
                # The mirror is up: its answer wins, whatever the peers say.
                result = await fetch(b, "org/m")
                assert result["commit"] == commit
                assert tree_of(Path(result["path"])) == real
                snap = await snapshot(b, "org/m", tmp_path / "client")
                assert snap.name == commit and tree_of(snap) == real
                # A 404 from the mirror is final: the peers are not asked.
                with pytest.raises(RepoNotFound):
                    await fetch(b, "org/gone")
                with pytest.raises(RepositoryNotFoundError):
                    await snapshot(b, "org/gone", tmp_path / "client")
                assert b.revisions.book.best("model", "org/gone", "main") is None

                # The mirror goes down: the liar's manifest is the newest B hears of ...
                await mirror.close()
                with pytest.raises(HfswarmError) as failed:
                    await fetch(b, "org/m")
                print("mirror down, lying peer:", failed.value.one_line())
                assert b.revisions.book.best("model", "org/m", "main") == lie
                # ... yet its bytes never reach blobs/ (verified against the id), and
                # main still names the mirror's commit.
                names = blobs_are_verified(tmp_path / "b/cache")
                assert x not in names
                assert (tmp_path / "b/cache/models--org--m/refs/main").read_text() == commit
                # The HF client never gets the liar's bytes either.
                with pytest.raises(Exception):  # noqa: B017 - any failure, no bad bytes
                    await snapshot(b, "org/m", tmp_path / "client2", etag_timeout=5)
                assert x not in blobs_are_verified(tmp_path / "b/cache")
                assert not list((tmp_path / "client2").rglob("config.json"))
    finally:
        await mirror.close()
        await runner.cleanup()


# -- the one check, and the newer rule ------------------------------------------------------


def revision(**changes: Any) -> wire.RevisionManifest:
    files = (
        wire.RevisionFile(path="a.txt", blob_id=hub_blob_id("a.txt", b"a"), size=1),
        wire.RevisionFile(path="w.safetensors", blob_id="d" * 64, size=5),
    )
    base = wire.RevisionManifest(
        repo_type="model",
        repo_id="local/x",
        revision="main",
        commit=content_commit(files),
        files=files,
        made_by="a" * 32,
        published_at=1_700_000_000_000,
    )
    return dataclasses.replace(base, **changes)


def test_accept_revision_manifest() -> None:
    now = 1_700_000_000_000
    ask = {"repo_type": "model", "repo_id": "local/x", "revision": "main", "now_ms": now}
    good = revision()
    assert accept_revision_manifest(good, **ask) is good
    assert accept_revision_manifest(good, **{**ask, "revision": good.commit}) is good
    assert wire.decode(wire.encode(good)) == good
    bad = [
        revision(repo_id="local/y"),
        revision(repo_type="dataset"),
        revision(revision="other"),
        revision(commit="0" * 40),  # a local/* commit must match its files
        revision(published_at=now + MAX_CLOCK_SKEW_MS + 1),
        revision(
            files=(wire.RevisionFile(path="e", blob_id="f" * 40, size=0),),
            commit=content_commit((wire.RevisionFile(path="e", blob_id="f" * 40, size=0),)),
        ),
    ]
    for m in bad:
        with pytest.raises(BadRevisionManifest):
            accept_revision_manifest(m, **ask)
    # Mirror repos: the commit cannot be recomputed, any well-formed answer is accepted.
    hub = revision(repo_id="org/m", commit="0" * 40)
    assert accept_revision_manifest(hub, **{**ask, "repo_id": "org/m"}) is hub


def test_revision_messages_on_the_wire() -> None:
    good = revision()
    req = wire.RevisionRequest(repo_type="dataset", repo_id="org/d", revision="refs/pr/1")
    for msg in (good, req, revision(signature=b"s" * 64), revision(files=())):
        assert wire.decode(wire.encode(msg)) == msg
    # The signature may be absent (it has a default); everything else is required.
    obj = msgpack.unpackb(wire.encode(good), raw=False)
    del obj["signature"]
    assert wire.decode(msgpack.packb(obj, use_bin_type=True)) == good
    f = {"type": "revision_file", "version": 1, "blob_id": "a" * 40, "size": 1}
    hostile: list[tuple[str, Any]] = [
        ("published_at", None),  # missing
        ("published_at", -1),
        ("published_at", True),
        ("commit", "A" * 40),
        ("repo_type", "kernel"),
        ("repo_id", "local/../x"),
        ("repo_id", "org--x/y"),
        ("revision", "main/../../x"),
        ("files", [{**f, "path": "b"}, {**f, "path": "a"}]),  # not sorted
        ("files", [{**f, "path": "a"}, {**f, "path": "a"}]),  # a path twice
        ("files", [{**f, "path": "/abs"}]),
        ("files", [{**f, "path": "a\\b"}]),
        ("files", [{**f, "path": "a//b"}]),
        ("files", [{**f, "path": "x" * 256}]),
        ("files", [{**f, "path": "é" * 128}]),  # 256 bytes
        ("files", [{**f, "path": "a", "size": -1}]),
        ("files", [{**f, "path": "a"}] * (wire.MAX_REVISION_FILES + 1)),
    ]
    for field, value in hostile:
        obj = msgpack.unpackb(wire.encode(good), raw=False)
        if value is None:
            del obj[field]
        else:
            obj[field] = value
        with pytest.raises(wire.WireError):
            wire.decode(msgpack.packb(obj, use_bin_type=True))


def test_the_newest_manifest_wins_and_commits_stay_reachable() -> None:
    book = RevisionBook()
    v1 = revision()
    files2 = (wire.RevisionFile(path="a.txt", blob_id="b" * 40, size=1),)
    v2 = revision(files=files2, commit=content_commit(files2), published_at=v1.published_at + 1)
    assert book.add(v2)[0] and book.add(v1)[0]
    assert book.best("model", "local/x", "main") == v2
    assert book.best("model", "local/x", v1.commit) == v1
    # Same time: the larger agent id breaks the tie, the same way everywhere.
    v1b = dataclasses.replace(v1, published_at=v2.published_at, made_by="b" * 32)
    assert book.add(v1b)[0]
    assert book.best("model", "local/x", "main") == v1b
    assert not book.add(v1)[0]  # older than what is known for that commit
    assert content_commit(reversed(v1.files)) == content_commit(v1.files) == v1.commit


async def test_revisions_are_kept_in_the_state_dir(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    peers: Any = None
    r = Revisions(state, peers, "a" * 32)
    r.record(revision())
    r.record(revision(repo_id="org/m", commit="2" * 40))
    again = Revisions(state, peers, "a" * 32)
    assert again.load() == 2
    assert again.book.best("model", "local/x", "main") == revision()
    again.forget("model", "org/m")
    assert Revisions(state, peers, "a" * 32).load() == 1
    # A damaged record is dropped, not trusted.
    (key,) = [k for k, _ in state.revision_records()]
    (tmp_path / "revisions" / key).write_bytes(b"\x81\xa4type\xa3bad")
    assert Revisions(state, peers, "a" * 32).load() == 0
    assert state.revision_records() == []
