"""HF_ENDPOINT mode: the real huggingface_hub client (and the `hf` CLI) pointed at a real
agent's local port, the project's mirror behind it, libtorrent between agents.

The client's cache is always a folder of its own, distinct from the agent's cache.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agentkit import agent, endpoint, snapshot, tree_of, write_tree
from agentkit import config as agentkit_config
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from yarl import URL

from peer.agent.daemon import Agent
from peer.agent.requests import DownloadRequest
from peer.config import DownloadOptions
from peer.mirror_server import MirrorServer, RepoSource

MiB = 1 << 20
BIG = 24 * MiB
READER = "hf_reader_token"  # a valid token, without access to the gated repo
GATED_OK = "hf_gated_access_token"  # a token that was granted access to the gated repo


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    rnd = random.Random(5)
    return {
        "model": write_tree(
            tmp_path / "src/model",
            {
                "config.json": b'{"model_type": "hf-endpoint-test"}',
                "model.safetensors": rnd.randbytes(BIG),
                "small.bin": rnd.randbytes(300_000),
                "nested/dir/readme.txt": b"nested\n",
            },
        ),
        "pr": write_tree(
            tmp_path / "src/pr",
            {
                "config.json": b'{"model_type": "hf-endpoint-test", "pr": 1}',
                "model.safetensors": rnd.randbytes(3 * MiB),
            },
        ),
        "dataset": write_tree(
            tmp_path / "src/dataset",
            {
                "README.md": b"# a dataset\n",
                "data/train/part-0.parquet": rnd.randbytes(2 * MiB),
                "data/test/part-0.parquet": rnd.randbytes(700_000),
                "data/empty.txt": b"",
            },
        ),
        "gated": write_tree(
            tmp_path / "src/gated",
            {"config.json": b'{"gated": true}', "weights.bin": rnd.randbytes(MiB)},
        ),
        "private": write_tree(tmp_path / "src/private", {"config.json": b"{}"}),
    }


@pytest.fixture
async def mirror(sources: dict[str, Path]) -> AsyncIterator[MirrorServer]:
    repos = [
        RepoSource("model", "org/m", sources["model"], revisions={"refs/pr/1": sources["pr"]}),
        RepoSource("dataset", "org/d", sources["dataset"]),
        RepoSource("model", "org/gated", sources["gated"], gated=True),
        RepoSource("model", "org/private", sources["private"], private=True),
    ]
    # Small pages: every tree listing needs the Link header; Xet signals: the agent
    # must strip them (hf_xet is installed, so a client that saw them would use Xet).
    async with MirrorServer(
        repos, tokens=[READER], gated_tokens=[GATED_OK], page_size=2, xet_signals=True
    ) as m:
        yield m


# Fewer retries against a dead mirror than the default: these tests wait for them.
config = partial(
    agentkit_config, download=DownloadOptions(quiet=True, read_timeout=3.0, connect_timeout=2.0)
)


async def download(a: Agent, repo_id: str, filename: str, cache: Path, **kw: Any) -> Path:
    kw.setdefault("token", False)
    path = await asyncio.to_thread(
        hf_hub_download, repo_id, filename, endpoint=endpoint(a), cache_dir=cache, **kw
    )
    return Path(path)


async def test_snapshot_download_of_a_model_and_a_dataset_through_the_agent(
    tmp_path: Path, mirror: MirrorServer, sources: dict[str, Path]
) -> None:
    client = tmp_path / "client-cache"
    async with agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a:
        model = await snapshot(a, "org/m", client)
        data = await snapshot(a, "org/d", client, repo_type="dataset")
        single = await download(a, "org/m", "nested/dir/readme.txt", tmp_path / "other-client")
        status = await a.local.status()
    assert tree_of(model) == tree_of(sources["model"])
    assert tree_of(data) == tree_of(sources["dataset"])
    assert single.read_bytes() == b"nested\n"
    assert scan_cache_dir(client).warnings == []
    # The agent fetched (from the mirror: it has no peers), verified and kept every blob
    # in its own HF cache, with the snapshot links and refs/main huggingface_hub writes.
    total = sum(len(b) for s in ("model", "dataset") for b in tree_of(sources[s]).values())
    assert status["bytes_from_mirror"] == total
    agent_cache = tmp_path / "a/cache"
    commit = mirror.commit_of("model", "org/m")
    assert (agent_cache / "models--org--m/refs/main").read_text() == commit
    kept = Path(
        await asyncio.to_thread(
            snapshot_download, "org/m", cache_dir=agent_cache, local_files_only=True
        )
    )
    assert tree_of(kept) == tree_of(sources["model"])
    assert scan_cache_dir(agent_cache).warnings == []
    # huggingface_hub never asks for the body of an empty file: 3 blobs, not 4
    assert len(list((agent_cache / "datasets--org--d/blobs").iterdir())) == 3
    assert status["seeded_blobs"] == 7


async def test_metadata_is_the_mirrors_with_links_rewritten_and_no_xet_signal(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    async with (
        agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a,
        aiohttp.ClientSession() as http,
    ):
        base = endpoint(a)
        # The mirror itself does send Xet signals (else this test would prove nothing).
        async with http.head(f"{mirror.url}/org/m/resolve/main/model.safetensors") as r:
            assert "X-Xet-Hash" in r.headers
        entries: list[dict[str, Any]] = []
        url: str | None = f"{base}/api/models/org/m/tree/main?recursive=true&expand=false"
        pages = 0
        while url:
            async with http.get(url) as r:
                assert r.status == 200
                entries += await r.json()
                link = r.headers.get("Link")
            pages += 1
            url = None
            if link:
                assert link.startswith(f"<{base}/api/models/org/m/tree/main?"), link
                url = link.split(";")[0].strip("<>")
        assert pages == 3  # 6 entries, pages of 2: every page came through the agent
        assert {e["path"] for e in entries} == {
            "config.json",
            "model.safetensors",
            "small.bin",
            "nested",
            "nested/dir",
            "nested/dir/readme.txt",
        }
        assert not [e for e in entries if any(k.lower().startswith("xet") for k in e)]
        paths_info = f"{base}/api/models/org/m/paths-info/main"
        async with http.post(paths_info, data={"paths": "nested/dir/readme.txt"}) as r:
            assert r.status == 200
            assert [e["size"] for e in await r.json()] == [7]
        async with http.get(f"{base}/api/models/org/m/revision/refs%2Fpr%2F1") as r:
            info = await r.json()
            assert r.status == 200
            assert info["sha"] == mirror.commit_of("model", "org/m", "refs/pr/1")
            assert "xetEnabled" not in info
        async with http.head(f"{base}/org/m/resolve/main/model.safetensors") as r:
            assert r.status == 200
            assert not [h for h in r.headers if h.lower().startswith("x-xet")]
            assert "xet" not in r.headers.get("Link", "")
            blob = r.headers["X-Linked-Etag"].strip('"')
            assert r.headers["ETag"] == f'"{blob}"'
            assert r.headers["X-Linked-Size"] == r.headers["Content-Length"] == str(BIG)
            assert r.headers["X-Repo-Commit"] == mirror.commit_of("model", "org/m")
            assert r.headers["Accept-Ranges"] == "bytes"
        async with http.head(f"{base}/org/m/resolve/main/nested/dir/readme.txt") as r:
            assert r.status == 200 and r.headers["Content-Length"] == "7"
            assert "X-Linked-Etag" not in r.headers and len(r.headers["ETag"]) == 42
        # A HEAD is metadata only: nothing was fetched.
        assert mirror.stats().blob_bytes == 0


async def test_pr_revision(tmp_path: Path, mirror: MirrorServer, sources: dict[str, Path]) -> None:
    client = tmp_path / "client-cache"
    pr_commit = mirror.commit_of("model", "org/m", "refs/pr/1")
    async with agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a:
        config_json = await download(a, "org/m", "config.json", client, revision="refs/pr/1")
        assert config_json.read_bytes() == (sources["pr"] / "config.json").read_bytes()
        snap = await snapshot(a, "org/m", client, revision="refs/pr/1")
    assert snap.name == pr_commit
    assert tree_of(snap) == tree_of(sources["pr"])
    assert (client / "models--org--m/refs/refs/pr/1").read_text() == pr_commit
    # The agent's cache has the PR's ref too (written as huggingface_hub writes it).
    assert (tmp_path / "a/cache/models--org--m/refs/refs/pr/1").read_text() == pr_commit


async def test_gated_and_private_repos_need_the_clients_own_token(
    tmp_path: Path, mirror: MirrorServer, sources: dict[str, Path]
) -> None:
    # The agent itself holds a token with access: it must never lend it to a client.
    cfg = config(tmp_path / "a", "127.0.0.2", (mirror.url,), token=GATED_OK)
    async with agent(cfg) as a:
        with pytest.raises(GatedRepoError):
            await download(a, "org/gated", "weights.bin", tmp_path / "c1")
        with pytest.raises(GatedRepoError):
            await snapshot(a, "org/gated", tmp_path / "c1")
        with pytest.raises(GatedRepoError):  # a valid token without access: 403
            await download(a, "org/gated", "weights.bin", tmp_path / "c2", token=READER)
        assert mirror.stats().blob_bytes == 0
        got = await snapshot(a, "org/gated", tmp_path / "c3", token=GATED_OK)
        assert tree_of(got) == tree_of(sources["gated"])
        # Now the agent holds the blob; still no byte of it without access.
        with pytest.raises(GatedRepoError):
            await download(a, "org/gated", "weights.bin", tmp_path / "c4")
        with pytest.raises(RepositoryNotFoundError):
            await download(a, "org/private", "config.json", tmp_path / "c5")
        private = await download(a, "org/private", "config.json", tmp_path / "c6", token=READER)
        assert private.read_bytes() == b"{}"


async def test_errors_reach_the_client_as_the_hubs(tmp_path: Path, mirror: MirrorServer) -> None:
    async with agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a:
        c = tmp_path / "client"
        with pytest.raises(RevisionNotFoundError):
            await download(a, "org/m", "config.json", c, revision="no-such-branch")
        with pytest.raises(RevisionNotFoundError):
            await snapshot(a, "org/m", c, revision="no-such-branch")
        with pytest.raises(EntryNotFoundError):
            await download(a, "org/m", "nested/missing.txt", c)
        with pytest.raises(RepositoryNotFoundError):
            await download(a, "org/nope", "config.json", c)
        with pytest.raises(RepositoryNotFoundError):
            await snapshot(a, "org/nope", c, repo_type="dataset")


async def test_mirror_failover_and_no_mirror_at_all(tmp_path: Path, mirror: MirrorServer) -> None:
    # A port nobody listens on (bound, then closed).
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead = f"http://127.0.0.1:{probe.sockets[0].getsockname()[1]}"
    probe.close()
    await probe.wait_closed()
    async with agent(config(tmp_path / "a", "127.0.0.2", (dead, mirror.url))) as a:
        got = await download(a, "org/m", "small.bin", tmp_path / "c1")
        assert got.stat().st_size == 300_000
    async with (
        agent(config(tmp_path / "b", "127.0.0.3", (dead,))) as b,
        aiohttp.ClientSession() as http,
    ):
        for method, path in (
            ("HEAD", "/org/m/resolve/main/config.json"),
            ("GET", "/org/m/resolve/main/config.json"),
            ("GET", "/api/models/org/m/revision/main"),
        ):
            async with http.request(method, endpoint(b) + path) as r:
                assert r.status == 502
                assert dead in r.headers["X-Error-Message"]
                assert "mirror" in r.headers["X-Error-Message"]


async def test_blobs_come_from_a_peer_and_the_mirror_sends_metadata_only(
    tmp_path: Path, mirror: MirrorServer, sources: dict[str, Path]
) -> None:
    total = sum(len(b) for b in tree_of(sources["model"]).values())
    async with agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a:

        async def emit(_: dict[str, Any]) -> None:
            return None

        await a.local.run_download(DownloadRequest(repo_id="org/m"), emit)  # A holds the model
        mirror.reset_stats()
        peer = (a.config.listen[0], a.peer_port)
        async with agent(config(tmp_path / "b", "127.0.0.3", (mirror.url,), peers=(peer,))) as b:
            got = await snapshot(b, "org/m", tmp_path / "client-cache")
            status = await b.local.status()
    assert tree_of(got) == tree_of(sources["model"])
    stats = mirror.stats()
    assert stats.blob_bytes == 0, "the mirror must serve metadata only"
    assert stats.meta_bytes > 0
    assert status["bytes_from_peers"] == total and status["bytes_from_mirror"] == 0


async def test_range_requests(
    tmp_path: Path, mirror: MirrorServer, sources: dict[str, Path]
) -> None:
    data = (sources["model"] / "model.safetensors").read_bytes()
    async with (
        agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a,
        aiohttp.ClientSession() as http,
    ):
        url = f"{endpoint(a)}/org/m/resolve/main/model.safetensors"
        async with http.get(url, headers={"Range": "bytes=100-199"}) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes 100-199/{BIG}"
            assert await r.read() == data[100:200]
        async with http.get(url, headers={"Range": "bytes=-10"}) as r:
            assert r.status == 206 and await r.read() == data[-10:]
        async with http.get(url, headers={"Range": f"bytes={BIG}-"}) as r:
            assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{BIG}"
        async with http.get(url) as r:
            assert r.status == 200 and await r.read() == data
        async with http.get(f"{endpoint(a)}/datasets/org/d/resolve/main/data/empty.txt") as r:
            assert r.status == 200 and r.headers["Content-Length"] == "0"
            assert await r.read() == b""
        # What hf_hub_download does to resume after a dropped connection: http_get with
        # resume_size sends Range: bytes=N-; honoured, only the rest arrives.
        buf = io.BytesIO()
        n = 5 * MiB + 123
        await asyncio.to_thread(http_get, url, buf, resume_size=n, expected_size=BIG)
        assert buf.getvalue() == data[n:]


async def test_the_peer_listener_does_not_serve_the_hub_api(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    async with (
        agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a,
        aiohttp.ClientSession() as http,
    ):
        peer = f"http://{a.config.listen[0]}:{a.peer_port}"
        for path in ("/api/models/org/m/revision/main", "/org/m/resolve/main/config.json"):
            async with http.get(peer + path) as r:
                assert r.status == 404
            async with http.get(endpoint(a) + path) as r:
                assert r.status == 200
        # Dot segments are never forwarded to the mirror (its other routes stay out of reach).
        for path in ("/api/%2E%2E/_mirror/stats", "/api/models/%2e%2e/%2e%2e/_mirror/stats"):
            async with http.get(URL(endpoint(a) + path, encoded=True)) as r:
                assert r.status == 400, await r.text()


@pytest.mark.skipif(shutil.which("hf") is None, reason="the hf CLI is not installed")
async def test_hf_cli_with_hf_endpoint(
    tmp_path: Path, mirror: MirrorServer, sources: dict[str, Path]
) -> None:
    async with agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(HF_ENDPOINT=endpoint(a), HF_HOME=str(tmp_path / "hf-home"))
        out = {}
        for repo, extra in (("org/m", ()), ("org/d", ("--repo-type", "dataset"))):
            proc = await asyncio.create_subprocess_exec(
                "hf",
                "download",
                repo,
                *extra,
                "--cache-dir",
                str(tmp_path / "client-cache"),
                "--quiet",  # stdout: the snapshot folder
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await proc.communicate()
            assert proc.returncode == 0, stderr.decode()
            out[repo] = Path(stdout.decode().strip().splitlines()[-1])
    assert tree_of(out["org/m"]) == tree_of(sources["model"])
    assert tree_of(out["org/d"]) == tree_of(sources["dataset"])


def test_json_is_reencoded_without_xet_keys() -> None:
    from peer.serving.hub_api import _next_link, _strip_xet

    assert _strip_xet([{"path": "a", "xetHash": "x", "lfs": {"oid": "o"}}]) == [
        {"path": "a", "lfs": {"oid": "o"}}
    ]
    link = (
        '<http://m:1/x>; rel="xet-auth", <http://m:1/api/models/o/n/tree/main?cursor=2>; rel="next"'
    )
    assert (
        _next_link(link, "http://a:2")
        == '<http://a:2/api/models/o/n/tree/main?cursor=2>; rel="next"'
    )
    assert _next_link('<http://m:1/x>; rel="xet-auth"', "http://a:2") is None
    assert json.dumps(_strip_xet({"xetEnabled": True, "sha": "s"})) == '{"sha": "s"}'


async def test_client_and_agent_sharing_one_cache(
    tmp_path: Path, mirror: MirrorServer, sources: dict[str, Path]
) -> None:
    """The default set-up: the agent and `hf download` of one user, one HF cache."""
    cfg = config(tmp_path / "a", "127.0.0.2", (mirror.url,))
    async with agent(cfg) as a:
        got = await snapshot(a, "org/m", cfg.hub.cache_dir)
        again = await snapshot(a, "org/m", cfg.hub.cache_dir)
        blob_bytes = mirror.stats().blob_bytes
    assert got == again and tree_of(got) == tree_of(sources["model"])
    # Each file once, plus what a stream cut for a stealer had in flight (an agent's
    # first request asks for a whole run; on a loaded machine the cut comes before it
    # ends: 3 MiB once in CI); a second fetch of the 24 MiB shard would exceed it.
    total = sum(len(b) for b in tree_of(sources["model"]).values())
    assert total <= blob_bytes < total + 8 * MiB, (blob_bytes, total)
    report = scan_cache_dir(cfg.hub.cache_dir)
    assert report.warnings == [] and [r.repo_id for r in report.repos] == ["org/m"]


async def test_a_resolve_by_name_teaches_the_agent_the_revision(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """hf_hub_download by name: the resolve answer's X-Repo-Commit names main's commit.
    A public repo's revision is recorded for peers; a gated one never is."""
    commit = mirror.commit_of("model", "org/m")
    async with agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a:
        await download(a, "org/m", "config.json", tmp_path / "client")
        await download(a, "org/gated", "config.json", tmp_path / "client", token=GATED_OK)
        assert (tmp_path / "a/cache/models--org--m/refs/main").read_text() == commit
        for _ in range(200):
            if a.revisions.book.best("model", "org/m", "main") is not None:
                break
            await asyncio.sleep(0.05)
        best = a.revisions.book.best("model", "org/m", "main")
        assert best is not None and best.commit == commit
        assert a.revisions.book.best("model", "org/gated", "main") is None
        # by commit, after the name: refs/main was learned, not only from the name's URL
        shutil.rmtree(tmp_path / "a/cache/models--org--m/refs")
        await download(a, "org/m", "small.bin", tmp_path / "client", revision=commit)
        assert (tmp_path / "a/cache/models--org--m/refs/main").read_text() == commit
