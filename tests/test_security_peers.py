"""Lying and hogging peers are bounded (issue 9, findings 4 and 7).

Pure parts first (the peer table's retry `Schedule` with a fake clock), then real
attacks on real agents: separate `hfswarm agent` processes on loopback, the project's
mirror serving a generated repo, and the attacker as a server or mDNS responder here."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from test_agents import MiB, cli, make_repo, sha256

from peer import wire
from peer.cli.demo import loopback_agent_command
from peer.discovery.peer_table import RetryPolicy, Schedule
from peer.mirror_server import MirrorServer, RepoSource
from peer.mirror_server.repo import git_blob_sha1, is_lfs_path

A = ("127.0.0.9", 7851)
POLICY = RetryPolicy()


def schedule() -> Schedule:
    return Schedule(POLICY, random.Random(1))


def run_failing(s: Schedule, key: tuple[str, int], until: float) -> list[float]:
    """Check `key` whenever due and fail it, up to `until`: the times it was tried."""
    tried: list[float] = []
    now = 0.0
    while now <= until and key in s:
        if key in s.due(now):
            tried.append(now)
            s.failed(key, now)
        now += 0.5
    return tried


def test_a_failing_candidate_backs_off_exponentially_with_jitter_up_to_the_cap() -> None:
    s = schedule()
    assert s.offer(A, "static", 0.0)
    tried = run_failing(s, A, 3600.0)
    gaps = [b - a for a, b in itertools.pairwise(tried)]
    # 5, 10, 20, 40 ... s (each +-20 %), never more than the cap (+ jitter).
    for i, gap in enumerate(gaps[:5]):
        expected = POLICY.first_retry * 2**i
        assert expected * 0.75 <= gap <= expected * 1.25 + 0.5, (i, gaps)
    assert max(gaps) <= POLICY.max_backoff * 1.2 + 0.5
    assert len(tried) < 20, tried  # an hour: a handful of tries, not 720
    assert A in s  # static: backed off, never dropped


def test_jitter_spreads_agents_apart() -> None:
    dues = set()
    for seed in range(10):
        s = Schedule(POLICY, random.Random(seed))
        s.offer(A, "tracker", 0.0)
        s.failed(A, 0.0)
        s.failed(A, 1.0)
        dues.add(round(s.next_due() or 0.0, 3))
    assert len(dues) > 5


def test_discovered_candidates_that_keep_failing_are_dropped_and_stay_backed_off() -> None:
    for source in ("tracker", "mdns"):
        s = schedule()
        s.offer(A, source, 0.0)
        tried = run_failing(s, A, 3600.0)
        assert A not in s, source
        assert tried[-1] >= POLICY.drop_after
        # Offered again (the tracker still names it): no fresh start, no check now.
        assert not s.offer(A, source, tried[-1] + 1)
        assert A in s and A not in s.due(tried[-1] + 1)
        assert s.failures(A) == len(tried)


def test_a_success_resets_the_backoff() -> None:
    s = schedule()
    s.offer(A, "tracker", 0.0)
    for t in (0.0, 6.0, 17.0):
        s.failed(A, t)
    s.succeeded(A, 40.0)
    assert s.failures(A) == 0
    assert s.next_due() == 40.0 + POLICY.interval


def test_a_goodbye_means_check_now_and_only_a_failed_check_removes() -> None:
    s = schedule()
    s.offer(A, "mdns", 0.0)
    s.succeeded(A, 0.0)
    s.goodbye(A, 2.0)
    assert s.due(2.0) == [A]
    s.succeeded(A, 2.0)  # it answers: kept, and looked at again soon after
    assert A in s and s.next_due() == 3.0
    s.succeeded(A, 3.0)
    s.succeeded(A, 5.0)
    assert s.next_due() == 5.0 + POLICY.interval  # back to normal
    s.goodbye(A, 20.0)
    assert s.failed(A, 20.0) == "drop" and A not in s
    # A clean exit is not held against it: back on the same address, it is new.
    assert s.offer(A, "mdns", 30.0)


def test_a_static_peer_that_says_goodbye_and_is_gone_is_kept_as_a_candidate() -> None:
    s = schedule()
    s.offer(A, "static", 0.0)
    s.goodbye(A, 1.0)
    assert s.failed(A, 1.0) == "goodbye" and A in s


# -- real agents ---------------------------------------------------------------------


@asynccontextmanager
async def agent_process(
    root: Path, ip: str, mirror: str, peers: tuple[str, ...] = (), *extra: str
) -> AsyncIterator[dict[str, Any]]:
    """`hfswarm agent` as a separate process (the demo's command line); its ports."""
    log = await asyncio.to_thread(open, root.parent / f"{root.name}.log", "ab")
    proc = await asyncio.create_subprocess_exec(
        *loopback_agent_command(root, ip, mirror, peers, "-v", *extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    try:
        assert proc.stdout is not None
        info: dict[str, Any] = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        info["ip"] = ip
        yield info
        assert proc.returncode is None, "the agent died under attack"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def health_within_1s(info: dict[str, Any]) -> None:
    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.get(f"http://{info['ip']}:{info['peer_port']}/v1/health") as r,
    ):
        assert r.status == 200
        wire.decode_as(await r.read(), wire.Health)
    assert time.monotonic() - t0 < 1.0


async def status(info: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{info['ip']}:{info['local_port']}/v1/status") as r,
    ):
        data: dict[str, Any] = await r.json()
        return data


def blob_ids(src: Path) -> dict[str, int]:
    out = {}
    for p in src.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            rel = p.relative_to(src).as_posix()
            out[sha256(data) if is_lfs_path(rel, len(data)) else git_blob_sha1(data)] = len(data)
    return out


@pytest.fixture
async def repo_mirror(tmp_path: Path) -> AsyncIterator[tuple[MirrorServer, Path]]:
    src = make_repo(tmp_path / "src", big=6 * MiB)
    async with MirrorServer([RepoSource("model", "org/m", src)]) as m:
        yield m, src


Lie = Callable[[str, int, float], wire.Claim]

LIES: dict[str, Lie] = {
    # "Leading, 2**50 bytes done": taken as progress forever by the old election.
    "done_past_size": lambda b, size, _t: wire.Claim(
        blob_id=b, size=size, leading=True, done=2**50
    ),
    # Another size than the blob's, with bytes "done" racing ahead.
    "size_lie": lambda b, _size, t: wire.Claim(
        blob_id=b, size=2**40, leading=True, done=int(t * 100 * MiB)
    ),
    # A real size and a done that creeps forward by 5 bytes a second: always "moving".
    "creep": lambda b, size, t: wire.Claim(
        blob_id=b, size=size, leading=True, done=min(size - 1, int(t * 5))
    ),
}


@asynccontextmanager
async def fake_peer(ip: str, lie: Lie, sizes: dict[str, int]) -> AsyncIterator[int]:
    """Answers like an agent: a health record, and a leading claim for every blob."""
    t0 = time.monotonic()

    async def health(_: web.Request) -> web.Response:
        body = wire.encode(wire.Health(agent_id="fake-leader-0000", bt_port=0, blobs=0))
        return web.Response(body=body, content_type="application/msgpack")

    async def have(request: web.Request) -> web.Response:
        ask = wire.decode_as(await request.read(), wire.HaveRequest)
        claims = tuple(lie(b, sizes.get(b, 1), time.monotonic() - t0) for b in ask.blob_ids)
        body = wire.encode(wire.HaveResponse(manifests=(), claims=claims))
        return web.Response(body=body, content_type="application/msgpack")

    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/have", have)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, ip, 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("lie", sorted(LIES))
async def test_a_lying_herd_leader_cannot_freeze_a_download(
    tmp_path: Path, repo_mirror: tuple[MirrorServer, Path], lie: str
) -> None:
    mirror, src = repo_mirror
    ids = blob_ids(src)
    async with fake_peer("127.0.0.21", LIES[lie], ids) as port:
        async with agent_process(
            tmp_path / "a",
            "127.0.0.22",
            mirror.url,
            (f"127.0.0.21:{port}",),
            "--leader-timeout",
            "3",
        ) as a:
            assert [p["agent_id"] for p in (await status(a))["peers"]] == ["fake-leader-0000"]
            t0 = time.monotonic()
            code, _, err = await asyncio.wait_for(
                cli("download", "org/m", "--agent", f"http://127.0.0.22:{a['local_port']}"),
                60,
            )
            took = time.monotonic() - t0
            assert code == 0, err
            await health_within_1s(a)
    print(f"{lie}: download done in {took:.1f} s despite the fake leader")
    # Before: the wait never ended. Now: the lie is seen at once (or within one
    # leader-timeout window for the creep), far inside the 60 s herd deadline.
    assert took < 20, took
    blobs = tmp_path / "a/cache/models--org--m/blobs"
    for blob, size in ids.items():
        assert (blobs / blob).stat().st_size == size
    big = (src / "model.safetensors").read_bytes()
    assert (blobs / sha256(big)).read_bytes() == big
    assert mirror.stats().blob_bytes == sum(ids.values())
