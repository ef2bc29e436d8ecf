"""A holder that trickles (real agents on loopback, a real libtorrent swarm, the
project's mirror): the seeder's uploads are capped at 8 KiB/s, one 16 KiB block every
2 s, so the piece libtorrent asks of it stays "alive" for the stall rule for as long as
the trickle lasts. The piece's floor rate (`PolicyConfig.min_piece_rate`) sends it to
the mirror anyway."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agentkit import agent, config, fetch, peer_of

from peer.mirror_server import MirrorServer, RepoSource

MiB = 1 << 20
BIG = 8 * MiB  # 8 pieces of 1 MiB
SEEDER, DOWNLOADER = "127.0.0.2", "127.0.0.3"


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[MirrorServer]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "trickle-test"}')
    (src / "model.safetensors").write_bytes(random.Random(9).randbytes(BIG))
    small = tmp_path / "small"  # a whole 1 MiB piece and a short one
    small.mkdir()
    (small / "model.safetensors").write_bytes(random.Random(10).randbytes(MiB + 100))
    repos = [RepoSource("model", "org/m", src), RepoSource("model", "org/small", small)]
    async with MirrorServer(repos) as m:
        yield m


async def test_a_holder_trickling_a_piece_does_not_hold_the_download(
    tmp_path: Path, mirror: MirrorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The seeder holds the repo and uploads at 8 KiB/s; the downloader knows it and
    runs with the agent's own stall_timeout (5 s). The pieces the seeder is not sending
    go to the mirror after stall_timeout, and the one it trickles too, once its blocks
    fall behind the floor rate: the download ends in about grace + stall_timeout.
    Before, that piece waited for the trickle (1 MiB at 8 KiB/s: 128 s)."""
    caplog.set_level(logging.DEBUG, logger="peer.agent.fetch")
    trickler = config(tmp_path / "s", SEEDER, mirror.url, max_upload_rate=8 << 10)
    async with agent(trickler) as seeder:
        await fetch(seeder)
        cfg = config(tmp_path / "d", DOWNLOADER, mirror.url, peers=(peer_of(seeder),))
        async with agent(dataclasses.replace(cfg, stall_timeout=5.0)) as d:
            before = mirror.stats().blob_bytes
            start = time.monotonic()
            async with asyncio.timeout(60):  # (before: 128 s and more)
                result = await fetch(d)
            took = time.monotonic() - start
            sent = 0
            for ih in seeder.swarm.torrents():
                sent += (await seeder.swarm.status(ih)).uploaded_payload_bytes
    lines = [ln for ln in caplog.text.splitlines() if "from the mirror (" in ln]
    print(f"from an 8 KiB/s holder: {took:.1f} s, {result}, the seeder sent {sent} bytes")
    print("\n".join(lines))
    blob = hashlib.sha256((tmp_path / "src/model.safetensors").read_bytes()).hexdigest()
    assert (tmp_path / "d/cache/models--org--m/blobs" / blob).stat().st_size == BIG
    # It did trickle: blocks came, and the piece they were of went to the mirror too.
    assert 0 < sent < MiB
    assert result["from_mirror"] == BIG and mirror.stats().blob_bytes - before >= BIG
    assert took < 25, "\n".join(lines)


async def test_a_holder_trickling_wrong_blocks_is_banned_and_the_download_ends(
    tmp_path: Path, mirror: MirrorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, with wrong blocks: the seeder's blob changes on disk after it served
    it once (libtorrent checks a seed's pieces only the first time it sends them), then
    it uploads at 8 KiB/s. The mirror's copy of the trickled piece is checked, fed,
    and fails with the seeder's blocks in it (libtorrent keeps them): the seeder is
    banned and the piece fetched again, the download ends with the right bytes."""
    caplog.set_level(logging.DEBUG, logger="peer.agent.fetch")
    blob = hashlib.sha256((tmp_path / "src/model.safetensors").read_bytes()).hexdigest()
    async with agent(config(tmp_path / "s", SEEDER, mirror.url)) as seeder:
        await fetch(seeder)
        first = config(tmp_path / "d1", "127.0.0.4", mirror.url, peers=(peer_of(seeder),))
        async with agent(first) as d1:
            assert (await fetch(d1))["from_peers"] >= BIG  # every piece sent (and checked)
        held = tmp_path / "s/cache/models--org--m/blobs" / blob
        with held.open("r+b") as f:
            f.write(random.Random(1).randbytes(BIG))
        seeder.limits.change(upload=8 << 10)
        cfg = config(tmp_path / "d", DOWNLOADER, mirror.url, peers=(peer_of(seeder),))
        async with agent(dataclasses.replace(cfg, stall_timeout=5.0)) as d:
            start = time.monotonic()
            async with asyncio.timeout(60):
                result = await fetch(d)
            took = time.monotonic() - start
    lines = [ln for ln in caplog.text.splitlines() if "mirror (" in ln or "bann" in ln]
    print(f"from an 8 KiB/s holder of wrong bytes: {took:.1f} s, {result}")
    print("\n".join(lines))
    got = tmp_path / "d/cache/models--org--m/blobs" / blob
    assert hashlib.sha256(got.read_bytes()).hexdigest() == blob
    assert result["hash_failures"] >= 1 and result["from_mirror"] == BIG
    assert any("banning peer" in ln for ln in lines), "\n".join(lines)
    assert took < 25, "\n".join(lines)


async def test_under_a_download_cap_slow_pieces_stay_with_the_peers(
    tmp_path: Path, mirror: MirrorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A downloader capped at 128 KiB/s from LAN peers (`max_download_rate`) takes a
    1 MiB piece in 8 s: slow by the user's choice, not a trickle. The floor is a quarter
    of the cap then, and the piece stays with the seeder (at the full 512 KiB/s floor it
    went to the mirror after 5.3 s: stall_timeout 4 s / (1 - 128 / 512)); so does the
    short piece, while the bytes come at the floor (when only a piece from peers kept
    it waiting, it went to the mirror 4 s after the start when libtorrent left it for
    last)."""
    caplog.set_level(logging.DEBUG, logger="peer.agent.fetch")
    async with agent(config(tmp_path / "s", SEEDER, mirror.url)) as seeder:
        await fetch(seeder, "org/small")
        cfg = config(
            tmp_path / "d",
            DOWNLOADER,
            mirror.url,
            peers=(peer_of(seeder),),
            max_download_rate=128 << 10,
            stall_timeout=4.0,
        )
        async with agent(cfg) as d:
            start = time.monotonic()
            result = await fetch(d, "org/small")
            took = time.monotonic() - start
    lines = [ln for ln in caplog.text.splitlines() if "from the mirror (" in ln]
    print(f"capped at 128 KiB/s: {took:.1f} s, {result}")
    assert result["from_mirror"] == 0 and result["from_peers"] == MiB + 100, "\n".join(lines)
