"""The project's HF-compatible mirror, checked with real sockets and real clients.

huggingface_hub (the real client, with an explicit ``endpoint=``) must download from it
and raise its own error types; a raw aiohttp client observes Range handling, every
fault kind, the rate caps and the byte counters.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url

from peer.mirror_server import Fault, MirrorServer, MirrorStats, RepoSource, ThreadedMirror
from peer.mirror_server.cli import main as mirror_main
from peer.mirror_server.cli import parse_size
from peer.mirror_server.control import ClientRate
from peer.mirror_server.generate import generate_model_repo

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def repo_files(folder: Path) -> dict[str, bytes]:
    """What a download of `folder` must reproduce (the generate marker is not content)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".hfswarm")
    }


def assert_snapshot_equals(snapshot: str | Path, folder: Path) -> None:
    want = repo_files(folder)
    got = {
        p.relative_to(snapshot).as_posix(): p.read_bytes()
        for p in sorted(Path(snapshot).rglob("*"))
        if p.is_file()
    }
    assert got.keys() == want.keys()
    for name, data in want.items():
        assert got[name] == data, name


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_model_repo(
        tmp_path_factory.mktemp("model"), total_size=3 * MiB, shards=3, seed=1
    )


@pytest.fixture(scope="session")
def pr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_model_repo(tmp_path_factory.mktemp("pr"), total_size=MiB // 2, seed=2)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dataset")
    write(d / ".gitattributes", b"*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    write(d / "README.md", b"---\nlicense: mit\n---\n# data\n")
    write(d / "data/train-00000-of-00001.parquet", os.urandom(300_000))  # LFS by suffix
    write(d / "data/test.csv", b"a,b\n1,2\n")
    write(d / "data/données 2024.csv", b"x\n3\n")  # quoting: space and non-ASCII
    return d


@pytest.fixture(scope="session")
def blob_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("blob")
    write(d / "blob.bin", os.urandom(2 * MiB))
    write(d / "small.txt", b"0123456789" * 100)
    return d


@pytest.fixture
async def mirror(blob_dir: Path) -> AsyncIterator[MirrorServer]:
    async with MirrorServer([RepoSource("model", "org/blob", blob_dir)]) as m:
        yield m


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --- the real huggingface_hub client ------------------------------------------------------


def test_snapshot_download_model_nested_and_pr_revision(
    model_dir: Path, pr_dir: Path, tmp_path: Path
) -> None:
    src = RepoSource("model", "org/tiny", model_dir, revisions={"refs/pr/1": pr_dir})
    with ThreadedMirror([src]) as m:
        commit = m.commit_of("model", "org/tiny")
        path = snapshot_download("org/tiny", cache_dir=tmp_path, endpoint=m.url, token=False)
        assert Path(path).name == commit
        assert_snapshot_equals(path, model_dir)
        assert (Path(path) / "extra/notes/info.txt").is_symlink()
        storage = tmp_path / "models--org--tiny"
        assert (storage / "refs/main").read_bytes() == commit.encode()
        # LFS blobs are named by sha256, regular files by their git blob sha1.
        shard = (model_dir / "model-00001-of-00003.safetensors").read_bytes()
        assert (storage / "blobs" / hashlib.sha256(shard).hexdigest()).exists()
        cfg = (model_dir / "config.json").read_bytes()
        git = hashlib.sha1(b"blob %d\0" % len(cfg) + cfg).hexdigest()
        assert (storage / "blobs" / git).exists()

        pr = snapshot_download(
            "org/tiny", revision="refs/pr/1", cache_dir=tmp_path, endpoint=m.url, token=False
        )
        pr_commit = m.commit_of("model", "org/tiny", "refs/pr/1")
        assert Path(pr).name == pr_commit != commit
        assert_snapshot_equals(pr, pr_dir)
        assert (storage / "refs/refs/pr/1").read_bytes() == pr_commit.encode()
        # The full commit sha is a revision too.
        by_sha = HfApi(endpoint=m.url).model_info("org/tiny", revision=pr_commit, token=False)
        assert by_sha.sha == pr_commit


def test_snapshot_download_dataset(dataset_dir: Path, tmp_path: Path) -> None:
    with ThreadedMirror([RepoSource("dataset", "org/data", dataset_dir)]) as m:
        path = snapshot_download(
            "org/data", repo_type="dataset", cache_dir=tmp_path, endpoint=m.url, token=False
        )
        assert_snapshot_equals(path, dataset_dir)
        assert Path(path).parent.parent.name == "datasets--org--data"
        info = HfApi(endpoint=m.url).dataset_info("org/data", token=False)
        assert info.sha == m.commit_of("dataset", "org/data")
        assert sorted(s.rfilename for s in info.siblings or []) == sorted(repo_files(dataset_dir))


def test_repo_info_and_paginated_tree(model_dir: Path, pr_dir: Path) -> None:
    src = RepoSource("model", "org/tiny", model_dir, revisions={"refs/pr/1": pr_dir})
    with ThreadedMirror([src], page_size=2) as m:
        api = HfApi(endpoint=m.url, token=False)
        info = api.model_info("org/tiny", files_metadata=True)
        assert info.sha == m.commit_of("model", "org/tiny")
        assert info.private is False and info.gated is False
        by_name = {s.rfilename: s for s in info.siblings or []}
        shard = (model_dir / "model-00002-of-00003.safetensors").read_bytes()
        lfs = by_name["model-00002-of-00003.safetensors"].lfs
        assert lfs is not None and lfs.sha256 == hashlib.sha256(shard).hexdigest()

        m.reset_stats()
        entries = list(api.list_repo_tree("org/tiny", recursive=True))
        files = {e.path for e in entries if e.__class__.__name__ == "RepoFile"}
        dirs = {e.path for e in entries if e.__class__.__name__ == "RepoFolder"}
        assert files == set(repo_files(model_dir))
        assert dirs == {"extra", "extra/notes"}
        pages = -(-len(entries) // 2)
        assert pages >= 5 and m.stats().requests == pages  # every page fetched once

        top = {e.path for e in api.list_repo_tree("org/tiny", path_in_repo="extra")}
        assert top == {"extra/notes"}  # non-recursive: direct children only
        with pytest.raises(EntryNotFoundError):
            list(api.list_repo_tree("org/tiny", path_in_repo="nope"))

        found = api.get_paths_info("org/tiny", ["config.json", "extra", "nope"])
        assert sorted(e.path for e in found) == ["config.json", "extra"]
        refs = api.list_repo_refs("org/tiny", include_pull_requests=True)
        assert [(r.name, r.target_commit) for r in refs.branches] == [("main", info.sha)]
        pr_commit = m.commit_of("model", "org/tiny", "refs/pr/1")
        assert [(r.ref, r.target_commit) for r in refs.pull_requests or []] == [
            ("refs/pr/1", pr_commit)
        ]


def test_error_types_of_the_real_client(model_dir: Path, tmp_path: Path) -> None:
    srcs = [
        RepoSource("model", "org/gated", model_dir, gated=True),
        RepoSource("model", "org/private", model_dir, private=True),
    ]
    with ThreadedMirror(srcs, tokens=["hf_plain"], gated_tokens=["hf_gate"]) as m:

        def fetch(
            repo: str, token: str | bool, filename: str = "config.json", revision: str = "main"
        ) -> str:
            cache = tmp_path / str(token)
            return hf_hub_download(
                repo, filename, revision=revision, cache_dir=cache, endpoint=m.url, token=token
            )

        with pytest.raises(RepositoryNotFoundError) as nope:
            snapshot_download("org/nope", cache_dir=tmp_path, endpoint=m.url, token=False)
        assert not isinstance(nope.value, GatedRepoError)
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download("org/private", cache_dir=tmp_path, endpoint=m.url, token=False)
        with pytest.raises(RepositoryNotFoundError):
            fetch("org/private", False)
        assert (
            Path(fetch("org/private", "hf_plain")).read_bytes()
            == (model_dir / "config.json").read_bytes()
        )

        # Gated: metadata is public, content needs a granted token.
        assert HfApi(endpoint=m.url).model_info("org/gated", token=False).gated == "auto"
        with pytest.raises(GatedRepoError) as anon:
            fetch("org/gated", False)
        assert anon.value.response.status_code == 401
        with pytest.raises(GatedRepoError) as plain:
            fetch("org/gated", "hf_plain")
        assert plain.value.response.status_code == 403
        with pytest.raises(GatedRepoError):
            snapshot_download("org/gated", cache_dir=tmp_path / "s", endpoint=m.url, token=False)
        assert Path(fetch("org/gated", "hf_gate")).exists()

        with pytest.raises(RevisionNotFoundError):
            snapshot_download(
                "org/private", revision="v9", cache_dir=tmp_path, endpoint=m.url, token="hf_plain"
            )
        with pytest.raises(RevisionNotFoundError):
            fetch("org/gated", "hf_gate", revision="nope")
        with pytest.raises(EntryNotFoundError):
            fetch("org/gated", "hf_gate", filename="missing.bin")


@pytest.mark.parametrize("mode", ["same-origin", "cross-origin"])
def test_lfs_redirects(mode: str, model_dir: Path, tmp_path: Path) -> None:
    src = [RepoSource("model", "org/private", model_dir, private=True)]
    with ThreadedMirror(src, tokens=["hf_secret"], redirect=mode) as m:  # type: ignore[arg-type]
        shard = "model-00003-of-00003.safetensors"
        url = hf_hub_url("org/private", shard, endpoint=m.url)
        meta = get_hf_file_metadata(url, token="hf_secret", endpoint=m.url)
        data = (model_dir / shard).read_bytes()
        assert meta.etag == hashlib.sha256(data).hexdigest()
        assert meta.commit_hash == m.commit_of("model", "org/private")
        assert meta.size == len(data)
        base = m.cdn_url if mode == "cross-origin" else m.url
        assert meta.location.startswith(f"{base}/_cdn/{meta.etag}?")

        m.reset_stats()
        path = snapshot_download(
            "org/private", cache_dir=tmp_path, endpoint=m.url, token="hf_secret"
        )
        assert_snapshot_equals(path, model_dir)
        stats = m.stats()
        cdn_bytes = sum(n for p, n in stats.per_path.items() if p.startswith("/_cdn/"))
        assert cdn_bytes == sum(
            len(b) for n, b in repo_files(model_dir).items() if n.endswith(".safetensors")
        )
        # huggingface_hub drops the token for another origin; the CDN listener counts it.
        assert stats.cdn_authorization_seen == 0


# --- raw HTTP: resolve, Range, headers, counters -------------------------------------------


async def test_head_get_and_ranges(
    mirror: MirrorServer, http: aiohttp.ClientSession, blob_dir: Path
) -> None:
    data = (blob_dir / "blob.bin").read_bytes()
    url = f"{mirror.url}/org/blob/resolve/main/blob.bin"
    async with http.head(url) as r:
        assert r.status == 200
        assert r.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert r.headers["X-Linked-Etag"] == r.headers["ETag"]
        assert r.headers["X-Linked-Size"] == r.headers["Content-Length"] == str(len(data))
        assert r.headers["X-Repo-Commit"] == mirror.commit_of("model", "org/blob")
        assert r.headers["Accept-Ranges"] == "bytes"
        assert not [h for h in r.headers if h.lower().startswith("x-xet")]
    for rng, (a, b) in {"bytes=10-19": (10, 20), "bytes=2097000-": (2097000, len(data)),
                        "bytes=-100": (len(data) - 100, len(data)),
                        "bytes=0-99999999": (0, len(data))}.items():  # fmt: skip
        async with http.get(url, headers={"Range": rng}) as r:
            assert r.status == 206, rng
            assert r.headers["Content-Range"] == f"bytes {a}-{b - 1}/{len(data)}"
            assert await r.read() == data[a:b]
    for rng in ("bytes=2097152-", "bytes=-0"):
        async with http.get(url, headers={"Range": rng}) as r:
            assert r.status == 416
            assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    async with http.get(url) as r:
        assert r.status == 200 and await r.read() == data
    small = (blob_dir / "small.txt").read_bytes()
    async with http.head(f"{mirror.url}/org/blob/resolve/main/small.txt") as r:
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(small) + small).hexdigest()
        assert r.headers["ETag"] == f'"{git_sha1}"'
        assert "X-Linked-Etag" not in r.headers


async def test_byte_counters(
    mirror: MirrorServer, http: aiohttp.ClientSession, blob_dir: Path
) -> None:
    api = f"{mirror.url}/api/models/org/blob/revision/main"
    async with http.get(api) as r:
        body = await r.read()
        assert json.loads(body)["sha"] == mirror.commit_of("model", "org/blob")
    path = "/org/blob/resolve/main/blob.bin"
    async with http.get(mirror.url + path, headers={"Range": "bytes=0-999"}) as r:
        assert len(await r.read()) == 1000
    async with http.head(mirror.url + path) as r:
        assert r.status == 200  # HEAD sends no body: counts a request, no bytes
    stats = mirror.stats()
    assert isinstance(stats, MirrorStats)
    assert (stats.meta_bytes, stats.blob_bytes) == (len(body), 1000)
    assert stats.total_bytes == len(body) + 1000
    assert stats.requests == 3
    assert stats.per_client == {"127.0.0.1": len(body) + 1000}
    assert stats.per_path == {"/api/models/org/blob/revision/main": len(body), path: 1000}
    assert stats.per_file == {"org/blob/blob.bin": 1000}
    mirror.reset_stats()
    assert mirror.stats() == MirrorStats()


# --- faults --------------------------------------------------------------------------------


async def test_fault_drop_after(
    mirror: MirrorServer, http: aiohttp.ClientSession, blob_dir: Path
) -> None:
    data = (blob_dir / "blob.bin").read_bytes()
    url = f"{mirror.url}/org/blob/resolve/main/blob.bin"
    mirror.add_fault(Fault("drop_after", path_glob="*.bin", after_bytes=300_000))
    got = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as r:
            assert r.status == 200 and r.content_length == len(data)
            async for chunk in r.content.iter_any():
                got += chunk
    assert bytes(got) == data[:300_000]
    assert mirror.stats().blob_bytes == 300_000  # what was sent, not what was promised
    async with http.get(url) as r:  # times=1: used up
        assert await r.read() == data


async def test_fault_status_with_retry_after(
    mirror: MirrorServer, http: aiohttp.ClientSession
) -> None:
    url = f"{mirror.url}/org/blob/resolve/main/blob.bin"
    mirror.add_fault(Fault("status", status=503, retry_after=2, times=2))
    async with http.head(url) as r:
        assert r.status == 200  # HEAD is never faulted
    for _ in range(2):
        async with http.get(url) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "2"
    async with http.get(url) as r:
        assert r.status == 200


async def test_fault_stall(
    mirror: MirrorServer, http: aiohttp.ClientSession, blob_dir: Path
) -> None:
    data = (blob_dir / "small.txt").read_bytes()
    url = f"{mirror.url}/org/blob/resolve/main/small.txt"
    mirror.add_fault(Fault("stall", path_glob="small.txt", after_bytes=100, stall_seconds=0.8))
    t0 = time.monotonic()
    async with http.get(url) as r:
        first = await r.content.readexactly(100)
        t_first = time.monotonic() - t0
        rest = await r.read()
    assert t_first < 0.5 and time.monotonic() - t0 >= 0.75
    assert first + rest == data


async def test_fault_corrupt_only_when_covered(
    mirror: MirrorServer, http: aiohttp.ClientSession, blob_dir: Path
) -> None:
    data = (blob_dir / "blob.bin").read_bytes()
    url = f"{mirror.url}/org/blob/resolve/main/blob.bin"
    off = MiB + 12345  # in the second 1 MiB read
    mirror.add_fault(Fault("corrupt", path_glob="blob.bin", offset=off))
    async with http.get(url, headers={"Range": "bytes=0-999"}) as r:
        assert await r.read() == data[:1000]  # does not cover the offset: fault kept
    async with http.get(url, headers={"Range": f"bytes={off - 10}-{off + 10}"}) as r:
        got = await r.read()
    assert got[10] == data[off] ^ 0xFF
    assert got[:10] + got[11:] == data[off - 10 : off] + data[off + 1 : off + 11]
    async with http.get(url) as r:
        assert await r.read() == data  # used up


async def test_fault_ignore_range_and_glob(
    mirror: MirrorServer, http: aiohttp.ClientSession, blob_dir: Path
) -> None:
    data = (blob_dir / "blob.bin").read_bytes()
    base = f"{mirror.url}/org/blob/resolve/main"
    mirror.add_fault(Fault("ignore_range", path_glob="*.bin", times=None))
    async with http.get(f"{base}/small.txt", headers={"Range": "bytes=0-9"}) as r:
        assert r.status == 206  # glob does not match
    for _ in range(2):  # times=None: forever
        async with http.get(f"{base}/blob.bin", headers={"Range": "bytes=10-19"}) as r:
            assert r.status == 200 and "Content-Range" not in r.headers
            assert await r.read() == data
    mirror.clear_faults()
    async with http.get(f"{base}/blob.bin", headers={"Range": "bytes=10-19"}) as r:
        assert r.status == 206 and await r.read() == data[10:20]


async def test_rate_cap(mirror: MirrorServer, http: aiohttp.ClientSession) -> None:
    url = f"{mirror.url}/org/blob/resolve/main/blob.bin"
    mirror.set_rate_cap(MiB)
    t0 = time.monotonic()
    async with http.get(url) as r:
        assert len(await r.read()) == 2 * MiB
    assert 1.5 <= time.monotonic() - t0 < 5
    mirror.set_rate_cap(None)
    t0 = time.monotonic()
    async with http.get(url) as r:
        await r.read()
    assert time.monotonic() - t0 < 0.5


def test_client_rate_is_one_bucket_per_client() -> None:
    rate = ClientRate(1000, burst=100)
    assert rate.reserve("10.0.0.1", 100, now=0.0) == 0.0  # a fresh client: its burst
    # more of the same client, at the same moment (e.g. its second connection): queued
    assert rate.reserve("10.0.0.1", 100, now=0.0) == pytest.approx(0.1)
    assert rate.reserve("10.0.0.1", 100, now=0.0) == pytest.approx(0.2)
    assert rate.reserve("10.0.0.2", 100, now=0.0) == 0.0  # another client: its own bucket
    assert rate.reserve("10.0.0.1", 50, now=0.1) == pytest.approx(0.15)  # still in debt
    # Idle for long: the bucket refills to one burst, never more.
    assert rate.reserve("10.0.0.1", 100, now=10.0) == 0.0
    assert rate.reserve("10.0.0.1", 100, now=10.0) == pytest.approx(0.1)
    assert rate.charged() == {"10.0.0.1": 550, "10.0.0.2": 100}
    rate.set(None)  # off: no waiting, accounting starts over
    assert rate.reserve("10.0.0.1", 10**9, now=11.0) == 0.0 and rate.charged() == {}


async def test_client_rate_is_shared_by_all_connections_of_a_client(
    mirror: MirrorServer, blob_dir: Path
) -> None:
    data = (blob_dir / "blob.bin").read_bytes()
    url = f"{mirror.url}/org/blob/resolve/main/blob.bin"
    half = MiB // 2
    mirror.set_client_rate(MiB)

    async def get(session: aiohttp.ClientSession, start: int) -> tuple[bytes, float]:
        t0 = time.monotonic()
        headers = {"Range": f"bytes={start}-{start + half - 1}"}
        async with session.get(url, headers=headers) as r:
            assert r.status == 206
            body = await r.read()
        return body, time.monotonic() - t0

    other_ip = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession() as one, aiohttp.ClientSession(connector=other_ip) as two:
        (a, ta), (b, tb), (c, tc) = await asyncio.gather(get(one, 0), get(one, half), get(two, 0))
    assert a + b == data[:MiB] and c == data[:half]
    # Every body byte was charged to the bucket of the address it went to.
    assert mirror.client_rate_charged() == {"127.0.0.1": MiB, "127.0.0.2": half}
    assert mirror.stats().per_client == {"127.0.0.1": MiB, "127.0.0.2": half}
    # 127.0.0.1's two connections shared 1 MiB/s: about (1 MiB - burst) / rate = 0.9 s
    # for both (a cap per connection would have let each finish in about 0.45 s), while
    # 127.0.0.2 had a bucket of its own.
    assert max(ta, tb) >= 0.75, (ta, tb)
    assert tc < max(ta, tb), (tc, ta, tb)
    mirror.set_client_rate(None)
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as one:
        await asyncio.gather(get(one, 0), get(one, half))
    assert time.monotonic() - t0 < 0.5


async def test_cdn_url_is_signed(blob_dir: Path, http: aiohttp.ClientSession) -> None:
    src = [RepoSource("model", "org/blob", blob_dir)]
    async with MirrorServer(src, redirect="cross-origin") as m:
        url = f"{m.url}/org/blob/resolve/main/blob.bin"
        async with http.get(url, allow_redirects=False) as r:
            assert r.status == 302
            location = r.headers["Location"]
        assert location.startswith(f"{m.cdn_url}/_cdn/")
        async with http.get(location, headers={"Range": "bytes=0-9"}) as r:
            assert r.status == 206
        async with http.get(location.replace("file=blob.bin", "file=other.bin")) as r:
            assert r.status == 403
        # aiohttp, like huggingface_hub, drops Authorization when a redirect changes origin.
        async with http.get(url, headers={"Authorization": "Bearer x"}) as r:
            assert r.status == 200 and len(await r.read()) == 2 * MiB
        assert m.stats().cdn_authorization_seen == 0
        async with http.head(location, headers={"Authorization": "Bearer x"}) as r:
            assert r.status == 200
        assert m.stats().cdn_authorization_seen == 1


async def test_http_control_endpoints(mirror: MirrorServer, http: aiohttp.ClientSession) -> None:
    ctl = f"{mirror.url}/_mirror"
    fault = {"kind": "status", "path_glob": "small.txt", "status": 500, "times": None}
    async with http.post(f"{ctl}/faults", json=fault) as r:
        assert r.status == 200 and mirror.faults() == [Fault(**fault)]  # type: ignore[arg-type]
    async with http.post(f"{ctl}/faults", json={"kind": "nope"}) as r:
        assert r.status == 400
    url = f"{mirror.url}/org/blob/resolve/main/small.txt"
    async with http.get(url) as r:
        assert r.status == 500
    async with http.delete(f"{ctl}/faults") as r:
        assert r.status == 200 and mirror.faults() == []
    async with http.get(url) as r:
        assert r.status == 200 and len(await r.read()) == 1000
    async with http.post(f"{ctl}/rate_cap", json={"bytes_per_sec": 12345}) as r:
        assert r.status == 200
    async with http.post(f"{ctl}/rate_cap", json={"bytes_per_sec": None}) as r:
        assert r.status == 200
    async with http.post(f"{ctl}/client_rate", json={"bytes_per_sec": 4 * MiB}) as r:
        assert r.status == 200
    async with http.get(f"{ctl}/client_rate") as r:
        assert await r.json() == {"bytes_per_sec": 4 * MiB, "charged": {}}
    async with http.post(f"{ctl}/client_rate", json={"bytes_per_sec": "fast"}) as r:
        assert r.status == 400
    async with http.post(f"{ctl}/client_rate", json={"bytes_per_sec": None}) as r:
        assert r.status == 200
    async with http.get(f"{ctl}/stats") as r:
        remote = MirrorStats.from_json(await r.json())
    assert remote == mirror.stats()  # control calls are not counted
    assert remote.blob_bytes == 1000 and remote.requests == 2
    async with http.post(f"{ctl}/reset") as r:
        assert r.status == 200
    assert mirror.stats() == MirrorStats()


# --- generator and command line -------------------------------------------------------------


def test_generate_is_valid_deterministic_and_idempotent(tmp_path: Path) -> None:
    a = generate_model_repo(tmp_path / "a", total_size=2 * MiB + 3, shards=2, seed=7)
    names = sorted(repo_files(a))
    assert names == sorted(
        ["README.md", "config.json", "extra/notes/info.txt", "generation_config.json",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "tokenizer.json"]
    )  # fmt: skip
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2 * MiB + 3
    total = 0
    for tensor, shard in index["weight_map"].items():
        raw = (a / shard).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        begin, end = header[tensor]["data_offsets"]
        assert header[tensor]["dtype"] == "U8" and (8 + n) % 8 == 0
        assert len(raw) == 8 + n + end and begin == 0
        total += end
    assert total == 2 * MiB + 3
    b = generate_model_repo(tmp_path / "b", total_size=2 * MiB + 3, shards=2, seed=7)
    c = generate_model_repo(tmp_path / "c", total_size=2 * MiB + 3, shards=2, seed=8)
    assert repo_files(a) == repo_files(b) != repo_files(c)
    shard = (a / "model-00001-of-00002.safetensors").read_bytes()
    assert len(set(shard[i : i + 4096] for i in range(0, MiB, 4096))) == MiB // 4096

    mtime = (a / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    generate_model_repo(tmp_path / "a", total_size=2 * MiB + 3, shards=2, seed=7)
    assert (a / "model-00001-of-00002.safetensors").stat().st_mtime_ns == mtime
    generate_model_repo(tmp_path / "a", total_size=MiB, shards=1, seed=7)
    assert sorted(p.name for p in a.glob("*.safetensors")) == ["model.safetensors"]


def test_cli_generate_and_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_size("300M") == 300 * MiB and parse_size("1.5k") == 1536
    assert parse_size("10MB") == 10_000_000 and parse_size("42") == 42
    folder = tmp_path / "gen"
    assert mirror_main(["generate", str(folder), "--size", "64K", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert (folder / "model.safetensors").exists()
    assert mirror_main(["serve", "model:bad-spec"]) == 2

    cmd = [
        sys.executable, "-m", "peer.mirror_server", "serve", "--listen", "127.0.0.1:0",
        "--token", "hf_t", "--private", "org/gen", "--client-rate", "64M",
        f"model:org/gen={folder}",
        f"model:org/gen@v1={folder}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.stderr else ""
        api = HfApi(endpoint=url)
        assert api.model_info("org/gen", revision="v1", token="hf_t").sha
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("org/gen", token=False)
        with urllib.request.urlopen(f"{url}/_mirror/client_rate") as r:
            assert json.load(r)["bytes_per_sec"] == 64 * MiB
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


# --- lifecycle -------------------------------------------------------------------------------


async def test_close_does_not_wait_for_a_stalled_client(
    blob_dir: Path, http: aiohttp.ClientSession
) -> None:
    m = MirrorServer([RepoSource("model", "org/blob", blob_dir)])
    await m.start()
    m.add_fault(Fault("stall", stall_seconds=60))
    resp = await http.get(f"{m.url}/org/blob/resolve/main/blob.bin")
    assert resp.status == 200
    t0 = time.monotonic()
    await m.close()
    assert time.monotonic() - t0 < 3
    resp.close()
    with pytest.raises(RuntimeError):
        _ = m.url
