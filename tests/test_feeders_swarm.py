"""Feeders between real agents on loopback (each on its own 127.0.0.x), a real libtorrent
swarm and the project's mirror: one seeder, three downloaders of one blob at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from agentkit import agent, config, fetch, peer_of
from aiohttp import web
from fake_peer import SilentPeer

from peer import wire
from peer.agent.daemon import Agent
from peer.discovery.peer_table import PeerTable
from peer.manifests import VerifiedBlob, make_manifest
from peer.mirror_server import MirrorServer, RepoSource
from peer.scheduling.feeders import feeders_of
from peer.serving.peer_api import make_peer_app
from peer.transfer import events as ev
from peer.transfer.swarm import UnknownTorrent

MiB = 1 << 20
BIG = 24 * MiB
SEEDER = "127.0.0.2"
DOWNLOADERS = ("127.0.0.3", "127.0.0.4", "127.0.0.5")


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[MirrorServer]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "feeders-test"}')
    (src / "model.safetensors").write_bytes(random.Random(5).randbytes(BIG))
    async with MirrorServer([RepoSource("model", "org/m", src)]) as m:
        yield m


@contextlib.asynccontextmanager
async def swarm_of_three(
    tmp_path: Path, mirror: MirrorServer, **kw: Any
) -> AsyncIterator[tuple[Agent, list[Agent], list[contextlib.AsyncExitStack]]]:
    """A seeder holding the repo, uploading at 4 MiB/s (so that the downloaders take
    seconds and trade), and three downloaders that know it and each other (each with
    its own exit stack: closing one stops that agent)."""
    async with agent(config(tmp_path / "a", SEEDER, mirror.url, max_upload_rate=4 * MiB)) as seeder:
        await fetch(seeder)
        ports = {ip: free_port(ip) for ip in DOWNLOADERS}
        stacks = [contextlib.AsyncExitStack() for _ in DOWNLOADERS]
        try:
            downloaders = []
            for k, ip in enumerate(DOWNLOADERS):
                others = tuple((o, p) for o, p in ports.items() if o != ip)
                cfg = config(
                    tmp_path / f"d{k}", ip, mirror.url, peers=(peer_of(seeder), *others), **kw
                )
                cfg = dataclasses.replace(cfg, listen=(ip, ports[ip]))
                downloaders.append(await stacks[k].enter_async_context(agent(cfg)))
            for d in downloaders:
                await d.peers.check_all()  # each knows the others live
            yield seeder, downloaders, stacks
        finally:
            for stack in reversed(stacks):
                await stack.aclose()


async def watch_seeder(seeder: Agent, seen: list[tuple[float, int]]) -> None:
    """Every 0.1 s: how many connections the seeder is sending the big blob over (on
    loopback every agent dials from 127.0.0.1: connections, not hosts, are told apart)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        sending = 0
        for ih in seeder.swarm.torrents():
            with contextlib.suppress(UnknownTorrent):
                sending += sum(1 for p in await seeder.swarm.peers(ih) if p.uploaded_bytes)
        seen.append((loop.time() - start, sending))
        await asyncio.sleep(0.1)


def big_blob_id(tmp_path: Path) -> str:
    return hashlib.sha256((tmp_path / "src/model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("feeders", [1, 0])
async def test_one_feeder_takes_the_blob_from_the_seeder_the_others_from_it(
    tmp_path: Path, mirror: MirrorServer, feeders: int
) -> None:
    """feeders = 1: once the downloaders have met (their first re-survey), only the
    feeder takes the blob from the seeder; the other two drop the seeder and take it
    from the downloaders, and nobody fetches anything from the mirror for want of a
    connected holder. (feeders = 0, as before: the seeder sends to several at once.)"""
    async with swarm_of_three(tmp_path, mirror, feeders=feeders, stall_timeout=5.0) as (
        seeder,
        ds,
        _,
    ):
        before = mirror.stats().blob_bytes
        seen: list[tuple[float, int]] = []
        watching = asyncio.create_task(watch_seeder(seeder, seen))
        results = await asyncio.gather(*(fetch(d) for d in ds))
        watching.cancel()
    assert all(r["from_mirror"] == 0 for r in results), results
    assert mirror.stats().blob_bytes == before  # nothing from the WAN mirror
    for d in ds:
        got = d.config.hub.cache_dir / "models--org--m/blobs" / big_blob_id(tmp_path)
        assert got.stat().st_size == BIG
    # A connection's uploaded_bytes stays while it lasts: the seeder sends over the
    # feeder's connection alone once the others dropped it (by 2 s: their first
    # re-survey is at most 0.5 s after swarming starts), to the end.
    sending = [(round(t, 1), n) for t, n in seen]
    late = [n for t, n in seen if t >= 2.0]
    assert late and max(late) == (1 if feeders else 3), sending


async def test_non_feeders_whose_feeder_is_gone_take_the_holders_back(
    tmp_path: Path, mirror: MirrorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The feeder stops in the middle: the two others, which left the seeder to it,
    connect the seeder again (one becomes the feeder at its next re-survey, or both
    after stall_timeout without progress) and finish from peers, not the mirror."""
    caplog.set_level(logging.DEBUG, logger="peer.agent.fetch")
    async with swarm_of_three(tmp_path, mirror, feeders=1, stall_timeout=5.0) as (
        _seeder,
        ds,
        stacks,
    ):
        blob = big_blob_id(tmp_path)
        feeder = feeders_of([d.agent_id for d in ds], blob, 1)
        (k,) = [i for i, d in enumerate(ds) if d.agent_id in feeder]
        gone, rest = ds[k], [d for i, d in enumerate(ds) if i != k]
        stopping = asyncio.create_task(fetch(gone))
        others = asyncio.gather(*(fetch(d) for d in rest))
        # once it has a third of the blob (the others dropped the seeder by then)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            if any(a.counters.done >= BIG // 3 for a in gone.blobs.active()):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the feeder never got a third of the blob")
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
        await stacks[k].aclose()  # the feeder's agent is gone
        results = await asyncio.wait_for(others, 60)
    assert "holders left to the feeders" in caplog.text
    assert "holders again" in caplog.text
    for d, r in zip(rest, results, strict=True):
        got = d.config.hub.cache_dir / "models--org--m/blobs" / blob
        assert got.stat().st_size == BIG, r
        why = [ln for ln in caplog.text.splitlines() if "mirror" in ln or "holders" in ln]
        assert r["from_mirror"] == 0, "\n".join(why[:20])


async def test_a_late_joiner_that_is_not_a_feeder_never_connects_the_holders(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """Two downloaders are already swarming when the third starts: its first survey
    shows them fetching, so the third, not the blob's feeder, adds its torrent with
    the seeder refused and is never connected to it (before, it connected the seeder
    and dropped it at its first re-survey, a rejoin), and takes the blob from the two
    with nothing from the mirror."""
    async with swarm_of_three(tmp_path, mirror, feeders=1, stall_timeout=5.0) as (
        seeder,
        ds,
        _,
    ):
        blob = big_blob_id(tmp_path)
        (feeder,) = feeders_of([d.agent_id for d in ds], blob, 1)
        late = next(d for d in ds if d.agent_id != feeder)
        early = [d for d in ds if d is not late]
        first = asyncio.gather(*(fetch(d) for d in early))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not all(blob in d.blobs.fetching_ids() for d in early):
            assert loop.time() < deadline, "the first two never started swarming"
            await asyncio.sleep(0.02)
        holder = ev.Endpoint(SEEDER, seeder.swarm.listen_port)
        seen: set[ev.Endpoint] = set()

        async def watch() -> None:
            while True:
                for ih in late.swarm.torrents():
                    with contextlib.suppress(UnknownTorrent):
                        seen.update(p.endpoint for p in await late.swarm.peers(ih))
                await asyncio.sleep(0.02)

        watching = asyncio.create_task(watch())
        result = await fetch(late)
        watching.cancel()
        results = [result, *await first]
    assert seen and holder not in seen, seen
    assert all(r["from_mirror"] == 0 for r in results), results
    got = late.config.hub.cache_dir / "models--org--m/blobs" / blob
    assert got.stat().st_size == BIG


async def test_a_downloaders_deals_go_only_to_askers_that_read_them(tmp_path: Path) -> None:
    """An agent before `wire.Deal` refuses an answer with a `deals` field (its decoder
    refuses unknown fields) and with it every offer of that answer: the blobs the
    downloader holds, the one it fetches, its claims. So a /v1/have answer carries the
    deals only when asked with `wire.DEALS_QUERY` (an older agent ignores the query);
    the agent's own survey asks, and gets each fetching offer's deal."""
    data = random.Random(5).randbytes(2 * MiB + 1)
    blob = hashlib.sha256(data).hexdigest()
    (tmp_path / blob).write_bytes(data)
    manifest = await make_manifest(VerifiedBlob(blob, len(data), tmp_path / blob), "d")
    deal = wire.Deal(blob_id=blob, over="d" * 64)

    class Downloader(SilentPeer):
        def fetching_for(self, ids: tuple[str, ...]) -> list[wire.Manifest]:
            return [manifest] if blob in ids else []

        def deals_for(self, ids: tuple[str, ...]) -> list[wire.Deal]:
            return [deal] if blob in ids else []

    ip = "127.0.0.7"
    runner = web.AppRunner(make_peer_app(Downloader()))
    await runner.setup()
    await web.TCPSite(runner, ip, 0).start()
    port = runner.addresses[0][1]
    try:
        body = wire.encode(wire.HaveRequest(blob_ids=(blob,)))
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://{ip}:{port}/v1/have", data=body) as r,
        ):
            raw = msgpack.unpackb(await r.read(), raw=False)
        assert "deals" not in raw and len(raw["fetching"]) == 1  # what an older agent reads
        async with PeerTable("tester") as table:
            table.offer(ip, port)
            await table.check_all()
            offers = await table.find((blob,))
        assert [(o.complete, o.deal) for o in offers[blob]] == [(False, deal.over)]
    finally:
        await runner.cleanup()
