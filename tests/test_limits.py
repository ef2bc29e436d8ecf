"""Live rate caps (`hfswarm limits`) with real agents on loopback: the upload cap holds
for LAN peers (libtorrent is told to limit local peers too) and the mirror cap for the
mirror, each within 15%, and each changes while a transfer runs."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from agentkit import write_tree
from procs import agent_process
from test_quota import hf

from peer.agent.requests import DownloadRequest
from peer.mirror_server import MirrorServer, RepoSource
from peer.serving.local_api import iter_ndjson
from peer.verification.hashing import BlobHasher, HashKind

MB = 1_000_000
SIZE = 128 * 2**20
TOLERANCE = 0.15


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[MirrorServer]:
    src = write_tree(tmp_path / "src", {"weights.bin": random.Random(9).randbytes(SIZE)})
    small = write_tree(tmp_path / "small", {"tokenizer.bin": random.Random(8).randbytes(3 * MB)})
    repos = [RepoSource("model", "org/big", src), RepoSource("model", "org/small", small)]
    async with MirrorServer(repos) as m:
        yield m


def blob_id(path: Path) -> str:
    h = BlobHasher(HashKind.SHA256, path.stat().st_size)
    h.update(path.read_bytes())
    return h.hexdigest()


async def rate_over(counter: Callable[[], Awaitable[int]], seconds: float) -> float:
    """Bytes per second the counter moved over `seconds`."""
    t0, b0 = time.monotonic(), await counter()
    await asyncio.sleep(seconds)
    t1, b1 = time.monotonic(), await counter()
    return (b1 - b0) / (t1 - t0)


async def until(counter: Callable[[], Awaitable[int]], above: int, seconds: float = 30) -> None:
    async with asyncio.timeout(seconds):
        while await counter() <= above:  # noqa: ASYNC110 (a counter in another process)
            await asyncio.sleep(0.05)


def near(measured: float, cap: int) -> bool:
    return abs(measured - cap) <= TOLERANCE * cap


async def test_upload_and_mirror_caps_hold_and_change_live(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    async with agent_process(
        tmp_path / "a", "127.0.0.2", mirror.url, "--max-upload-rate", "10MB/s"
    ) as a:
        code, _, err = await hf("download", "org/big", "--agent", a.local_url, "--quiet")
        assert code == 0, err
        code, out, _ = await hf("limits", "--agent", a.local_url)
        assert code == 0 and "upload    10.0 MB/s" in out and "mirror    no cap" in out, out

        async with aiohttp.ClientSession() as http:

            async def uploaded() -> int:
                async with http.get(f"{a.local_url}/v1/status") as r:
                    return int((await r.json())["bytes_uploaded"])

            async with agent_process(
                tmp_path / "b", "127.0.0.3", mirror.url, "--stall-timeout", "60",
                peers=[a.peer_addr],
            ) as b:  # fmt: skip
                mirror.reset_stats()
                down = asyncio.create_task(
                    hf("download", "org/big", "--agent", b.local_url, "--quiet")
                )
                await until(uploaded, 0)
                await asyncio.sleep(1.0)
                slow = await rate_over(uploaded, 2.5)
                code, out, err = await hf("limits", "--upload", "20MB/s", "--agent", a.local_url)
                assert code == 0 and "upload    20.0 MB/s" in out, err
                await asyncio.sleep(1.0)
                fast = await rate_over(uploaded, 2.5)
                assert (await hf("limits", "--upload", "0", "--agent", a.local_url))[0] == 0
                code, _, err = await down
                assert code == 0, err
                assert mirror.stats().blob_bytes == 0, "B took it all from A"
        assert near(slow, 10 * MB), f"upload at {slow / MB:.1f} MB/s under a 10 MB/s cap"
        assert near(fast, 20 * MB), f"upload at {fast / MB:.1f} MB/s under a 20 MB/s cap"

    # the mirror cap: one bucket for all of the agent's mirror connections, measured by
    # the download's own progress events (bytes received from the mirror)
    async with agent_process(
        tmp_path / "c", "127.0.0.4", mirror.url, "--mirror-max-rate", "5MB/s"
    ) as c:
        seen: list[tuple[float, int]] = [(time.monotonic(), 0)]
        request = DownloadRequest(repo_id="org/big", repo_type="model", revision="main")

        async def follow() -> dict[str, object]:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http,
                http.post(f"{c.local_url}/v1/downloads", json=request.to_json()) as r,
            ):
                async for event in iter_ndjson(r.content):
                    if event["event"] == "progress":
                        seen.append((time.monotonic(), int(event["from_mirror"])))
                    elif event["event"] in ("done", "error"):
                        return event
            raise AssertionError("the download ended without a result")

        async def from_mirror() -> int:
            return seen[-1][1]

        async def mirror_rate(seconds: float) -> float:
            """From the progress events (one per 0.5 s) of a window: their own times."""
            first = len(seen)
            await asyncio.sleep(seconds)
            (t0, b0), (t1, b1) = seen[first - 1], seen[-1]
            return (b1 - b0) / (t1 - t0)

        down = asyncio.create_task(follow())
        await until(from_mirror, 0)
        await asyncio.sleep(1.5)
        slow = await mirror_rate(3.0)
        code, out, err = await hf("limits", "--mirror", "10MB/s", "--agent", c.local_url)
        assert code == 0 and "mirror    10.0 MB/s" in out, err
        await asyncio.sleep(1.0)
        fast = await mirror_rate(3.0)
        assert (await hf("limits", "--mirror", "0", "--agent", c.local_url))[0] == 0
        done = await down
        assert done["event"] == "done", done
    assert near(slow, 5 * MB), f"mirror at {slow / MB:.1f} MB/s under a 5 MB/s cap"
    assert near(fast, 10 * MB), f"mirror at {fast / MB:.1f} MB/s under a 10 MB/s cap"


async def test_upload_cap_holds_for_blobs_served_over_http(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """Blobs up to 16 MiB also go to peers over the peer API: the same cap, live."""
    blob = blob_id(tmp_path / "small" / "tokenizer.bin")
    async with agent_process(
        tmp_path / "a", "127.0.0.5", mirror.url, "--max-upload-rate", "1MB/s"
    ) as a:
        code, _, err = await hf("download", "org/small", "--agent", a.local_url, "--quiet")
        assert code == 0, err
        async with aiohttp.ClientSession() as http:

            async def get() -> float:
                t0 = time.monotonic()
                async with http.get(f"{a.peer_url}/v1/blobs/{blob}") as r:
                    assert r.status == 200
                    assert len(await r.read()) == 3 * MB
                return time.monotonic() - t0

            capped = await get()
            assert (await hf("limits", "--upload", "20MB/s", "--agent", a.local_url))[0] == 0
            faster = await get()
    # 3 MB at 1 MB/s, less the bucket's first 64 KiB; then at 20 MB/s
    assert abs(capped - 2.93) <= TOLERANCE * 2.93, capped
    assert faster < 0.3, faster
