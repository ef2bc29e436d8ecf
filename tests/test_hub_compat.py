"""Third-party Hub software in front of and behind the agent: the ids an olah-like mirror
gives LFS files, ``HEAD`` on the API, ``If-Range``, errors a retry cannot fix.

The real huggingface_hub client against a real agent on loopback, the project's mirror
behind it; the "olah-like" mirror is the project's mirror behind a proxy that rewrites
the resolve headers the way olah sends them.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import aiohttp
import pytest
from agentkit import agent, endpoint, write_tree
from agentkit import config as agentkit_config
from aiohttp import web
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from peer.agent.daemon import Agent
from peer.config import DownloadOptions
from peer.hub.protocol import content_id, git_blob_sha1, if_range_allows, listed_id
from peer.mirror_server import Fault, MirrorServer, RepoSource

MiB = 1 << 20
WEIGHTS = random.Random(13).randbytes(3 * MiB)
SMALL = b'{"model_type": "compat"}'

config = partial(
    agentkit_config, download=DownloadOptions(quiet=True, read_timeout=3.0, connect_timeout=2.0)
)

# How the olah-like proxy rewrites a resolve answer's headers.
Rewrite = Callable[[dict[str, str]], dict[str, str]]


def olah_etag(h: dict[str, str]) -> dict[str, str]:
    """olah: an LFS file's sha256 as a plain ETag, no X-Linked-Etag / X-Linked-Size."""
    linked = h.pop("X-Linked-Etag", None)
    h.pop("X-Linked-Size", None)
    if linked is not None:
        h["ETag"] = linked
    return h


def weak_olah_etag(h: dict[str, str]) -> dict[str, str]:
    h = olah_etag(h)
    h["ETag"] = "W/" + h["ETag"]
    return h


def no_content_id(h: dict[str, str]) -> dict[str, str]:
    """A mirror whose ETag names nothing the agent can verify against."""
    h.pop("X-Linked-Etag", None)
    h["ETag"] = '"not-a-content-id"'
    return h


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[MirrorServer]:
    src = write_tree(tmp_path / "src", {"config.json": SMALL, "model.safetensors": WEIGHTS})
    async with MirrorServer([RepoSource("model", "org/m", src)]) as m:
        yield m


async def olah_like(
    upstream: str, rewrite: Rewrite, *, paths_info: bool = True
) -> tuple[web.AppRunner, str]:
    """A proxy in front of the project's mirror that rewrites resolve answers' headers
    (and, without `paths_info`, answers 404 there)."""
    session = aiohttp.ClientSession()

    async def handle(request: web.Request) -> web.StreamResponse:
        if not paths_info and "/paths-info/" in request.path:
            return web.Response(status=404)
        fwd = {
            k: v
            for k, v in request.headers.items()
            if k in ("Range", "Authorization", "Content-Type")
        }
        async with session.request(
            request.method,
            upstream + request.raw_path,
            headers=fwd,
            data=await request.read(),
            allow_redirects=False,
        ) as r:
            body = await r.read()
            keep = ("ETag", "X-Linked-Etag", "X-Linked-Size", "X-Repo-Commit", "Content-Range")
            h = {k: r.headers[k] for k in keep if k in r.headers}
            h.update({k: r.headers[k] for k in r.headers if k.startswith("X-Error")})
            if "/resolve/" in request.path:
                h = rewrite(h)
            if request.method == "HEAD":
                h["Content-Length"] = r.headers.get("Content-Length", "0")
                return web.Response(status=r.status, headers=h)
            return web.Response(status=r.status, body=body, headers=h)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def download(a: Agent, filename: str, cache: Path) -> Path:
    path = await asyncio.to_thread(
        hf_hub_download, "org/m", filename, endpoint=endpoint(a), cache_dir=cache, token=False
    )
    return Path(path)


def test_content_id_forms() -> None:
    sha256 = hashlib.sha256(b"x").hexdigest()
    sha1 = hashlib.sha1(b"x", usedforsecurity=False).hexdigest()
    assert content_id(f'"{sha256}"', f'"{sha1}"') == sha256  # X-Linked-Etag wins
    assert content_id(None, f'"{sha256}"') == sha256  # olah
    assert content_id(None, f'W/"{sha256}"') == sha256
    assert content_id(None, f'"{sha1}"') == sha1
    assert content_id(None, sha1) == sha1
    assert content_id(f'"{sha1}"', None) is None  # a linked id is an LFS sha256
    assert content_id(None, '"abc"') is None
    assert content_id(None, None) is None


def test_listed_id_is_what_paths_info_names() -> None:
    sha256 = hashlib.sha256(b"x").hexdigest()
    sha1 = hashlib.sha1(b"x", usedforsecurity=False).hexdigest()
    lfs = {"type": "file", "path": "w.bin", "oid": sha1, "size": 9, "lfs": {"oid": sha256}}
    git = {"type": "file", "path": "c.json", "oid": sha1, "size": 1}
    answer = [lfs, git, {"type": "directory", "path": "d", "oid": sha1, "size": 0}]
    assert listed_id(answer, "w.bin") == (sha256, 9)  # the LFS sha256, not the pointer's
    assert listed_id(answer, "c.json") == (sha1, 1)
    assert listed_id(answer, "d") is None  # a folder names no blob
    assert listed_id(answer, "gone") is None
    assert listed_id([{**git, "oid": '"abc-10"'}], "c.json") is None
    assert listed_id([{**git, "size": True}], "c.json") is None
    assert listed_id({"error": "x"}, "c.json") is None


def test_if_range_is_a_strong_match_of_our_etag() -> None:
    assert if_range_allows(None, '"abc"')
    assert if_range_allows('"abc"', '"abc"')
    assert not if_range_allows('"abd"', '"abc"')
    assert not if_range_allows('W/"abc"', '"abc"')
    assert not if_range_allows("Sat, 29 Oct 1994 19:43:31 GMT", '"abc"')


@pytest.mark.parametrize("rewrite", [olah_etag, weak_olah_etag])
async def test_an_olah_style_sha256_etag_is_a_content_id(
    tmp_path: Path, mirror: MirrorServer, rewrite: Rewrite
) -> None:
    runner, url = await olah_like(mirror.url, rewrite)
    try:
        async with agent(config(tmp_path / "a", "127.0.0.2", (url,))) as a:
            weights = await download(a, "model.safetensors", tmp_path / "client")
            small = await download(a, "config.json", tmp_path / "client")
            # the agent stored the blob under the sha256 it verified
            sha256 = hashlib.sha256(WEIGHTS).hexdigest()
            assert (tmp_path / "a/cache/models--org--m/blobs" / sha256).is_file()
    finally:
        await runner.cleanup()
    assert weights.read_bytes() == WEIGHTS
    assert small.read_bytes() == SMALL


async def test_an_etag_naming_no_content_is_looked_up_in_paths_info(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """olah offline sends ``"<md5>-<n>"`` as a git file's ETag: the agent takes the id
    from the same mirror's paths-info at the commit the answer named."""
    runner, url = await olah_like(mirror.url, no_content_id)
    try:
        async with (
            agent(config(tmp_path / "a", "127.0.0.2", (url,))) as a,
            aiohttp.ClientSession() as http,
        ):
            for name, data in (("config.json", SMALL), ("model.safetensors", WEIGHTS)):
                assert (await download(a, name, tmp_path / "client")).read_bytes() == data
                async with http.head(f"{endpoint(a)}/org/m/resolve/main/{name}") as r:
                    assert r.status == 200
                    lfs = name.endswith(".safetensors")
                    blob = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
                    assert r.headers["ETag"] == f'"{blob}"'
    finally:
        await runner.cleanup()


async def test_an_unfixable_error_reaches_the_client_at_once(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    runner, url = await olah_like(mirror.url, no_content_id, paths_info=False)
    try:
        async with agent(config(tmp_path / "a", "127.0.0.2", (url,))) as a:
            t0 = time.monotonic()
            with pytest.raises(Exception) as info:
                await download(a, "model.safetensors", tmp_path / "client")
            took = time.monotonic() - t0
            async with aiohttp.ClientSession() as http:
                async with http.head(f"{endpoint(a)}/org/m/resolve/main/config.json") as r:
                    assert r.status == 424
                    assert "no usable content id" in r.headers["X-Error-Message"]
    finally:
        await runner.cleanup()
    assert took < 3.0, took  # no retries with backoff (502 cost 24 s)
    # huggingface_hub raises LocalEntryNotFoundError from the HTTP error that carries
    # the agent's X-Error-Message.
    text = f"{info.value} {info.value.__cause__}"
    assert "no usable content id" in text and "not-a-content-id" in text


async def test_head_on_the_api(tmp_path: Path, mirror: MirrorServer) -> None:
    async with (
        agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a,
        aiohttp.ClientSession() as http,
    ):
        for base in (mirror.url, endpoint(a)):
            for route in ("/api/models/org/m", "/api/models/org/m/revision/main"):
                async with http.get(base + route) as g, http.head(base + route) as h:
                    assert g.status == h.status == 200, (base, route)
                    assert h.headers["Content-Type"] == g.headers["Content-Type"]
                    assert h.headers["Content-Length"] == str(len(await g.read()))
                    assert await h.read() == b""
            async with http.head(base + "/api/models/org/missing") as h:
                assert h.status == 404
                assert h.headers["X-Error-Code"] == "RepoNotFound"


async def _check_if_range(http: aiohttp.ClientSession, url: str, data: bytes) -> None:
    async with http.head(url) as h:
        etag = h.headers["ETag"]
    rng = {"Range": "bytes=10-19"}
    async with http.get(url, headers={**rng, "If-Range": etag}) as r:
        assert r.status == 206, url
        assert await r.read() == data[10:20]
    for stale in (
        '"0000000000000000000000000000000000000000"',
        "W/" + etag,
        "Sat, 29 Oct 1994 19:43:31 GMT",
    ):
        async with http.get(url, headers={**rng, "If-Range": stale}) as r:
            assert r.status == 200, (url, stale)
            assert "Content-Range" not in r.headers
            assert await r.read() == data


async def test_if_range_on_every_resolve_route(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"config.json": SMALL, "model.safetensors": WEIGHTS})
    repos = [RepoSource("model", "org/m", src)]
    async with (
        MirrorServer(repos, redirect="cross-origin") as cdn_mirror,
        MirrorServer(repos) as mirror,
        agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a,
        aiohttp.ClientSession() as http,
    ):
        for base in (mirror.url, endpoint(a)):
            for name, data in (("config.json", SMALL), ("model.safetensors", WEIGHTS)):
                await _check_if_range(http, f"{base}/org/m/resolve/main/{name}", data)
        # the CDN route an LFS redirect points to
        resolve = f"{cdn_mirror.url}/org/m/resolve/main/model.safetensors"
        async with http.head(resolve, allow_redirects=False) as r:
            assert r.status == 302
            location = r.headers["Location"]
        await _check_if_range(http, location, WEIGHTS)


async def test_corrupt_data_after_a_refetch_reaches_the_client_at_once(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    mirror.add_fault(Fault("corrupt", path_glob="config.json", offset=3, times=None))
    async with agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a:
        t0 = time.monotonic()
        with pytest.raises(HfHubHTTPError) as info:
            await download(a, "config.json", tmp_path / "client")
        took = time.monotonic() - t0
    assert took < 3.0, took
    assert info.value.response.status_code == 424
    assert "does not match" in str(info.value) and "twice" in str(info.value)
