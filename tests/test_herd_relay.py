"""Herd followers copy a shard from its leader while the leader still fetches it from
the mirror (`/v1/relay`, `peer.agent.herd_copy`), and check the whole blob themselves.

Real `hfswarm agent` processes on loopback, the project's mirror with a rate cap so the
leader is slow, and (for the lie) a fake leader served here."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_peer import fake_agent, msgpack, relay_answer
from procs import agent_process, tracker_process
from test_agents import MiB, cli, sha256

from peer import wire
from peer.cache.partial import PartialBlob
from peer.config import DownloadOptions, HubSettings
from peer.hub.metadata import RemoteFile, Snapshot
from peer.manifests import VerifiedBlob, make_manifest
from peer.mirror_server import MirrorServer, RepoSource
from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

BLOB = 16 * MiB


async def status(a: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{a.local_url}/v1/status") as r:
        data: dict[str, Any] = await r.json()
        return data


async def knows_a_peer(a: Any) -> None:
    """Until the agent lists a live peer (at most 10 s; the test's own checks follow)."""
    for _ in range(100):
        if (await status(a))["peers"]:
            return
        await asyncio.sleep(0.1)


async def offered_info_hashes(a: Any, blob_id: str) -> list[str]:
    req = wire.encode(wire.HaveRequest(blob_ids=(blob_id,)))
    async with aiohttp.ClientSession() as s, s.post(f"{a.peer_url}/v1/have", data=req) as r:
        have = wire.decode_as(await r.read(), wire.HaveResponse)
    return [m.info_hash for m in have.manifests if m.blob_id == blob_id]


async def relay_status(a: Any, blob_id: str) -> int:
    headers = {"Range": "bytes=0-"}
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{a.peer_url}/v1/relay/{blob_id}", headers=headers) as r,
    ):
        await r.read()
        return r.status


@pytest.fixture
async def slow_mirror(tmp_path: Path) -> AsyncIterator[tuple[MirrorServer, bytes]]:
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(12).randbytes(BLOB)
    (src / "model.safetensors").write_bytes(data)
    async with MirrorServer([RepoSource("model", "org/relay", src)]) as m:
        yield m, data


async def test_followers_copy_the_leaders_prefix_before_it_is_done(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    mirror, data = slow_mirror
    blob = sha256(data)
    mirror.set_rate_cap(2 * MiB)  # per connection: a 16 MiB blob takes the leader seconds
    ips = ("127.0.0.31", "127.0.0.32", "127.0.0.33")
    one = ("--connections", "1")  # one mirror stream each: the leader is slow
    async with tracker_process(tmp_path / "tracker.log") as (_, tracker):
        via = ("--tracker", tracker, *one)  # they meet through the tracker
        async with (
            agent_process(tmp_path / "a", ips[0], mirror.url, *via) as a,
            agent_process(tmp_path / "b", ips[1], mirror.url, *via) as b,
            agent_process(tmp_path / "c", ips[2], mirror.url, *via) as c,
        ):
            herd = (a, b, c)
            results, final, early = await fetch_all(herd, blob)
            # Each seeds the blob under one info-hash: the followers' manifests come from
            # the v2 tree built as the copy was hashed, the leader's from its mirror fetch.
            offered = [await offered_info_hashes(x, blob) for x in herd]
            # Afterwards only the leader answers the relay (for `RELAY_GRACE`): the
            # followers' copies are seeds like any other, reached through the swarm.
            relays = [await relay_status(x, blob) for x in herd]
    assert sorted(relays) == [206, 404, 404], relays
    assert all(len(o) == 1 for o in offered) and len({h for o in offered for h in o}) == 1, offered
    for code, _, err in results:
        assert code == 0, err
    # Before: a follower got no byte before the leader had the whole blob, hashed and
    # seeded. Now: followers copy while the leader is mid-way.
    assert early, "no follower had bytes from its leader before the leader was done"
    assert any(got >= 2 * MiB and done < BLOB for got, done in early), early
    # One mirror fetch for the herd; the followers' bytes all from the leader.
    assert mirror.stats().blob_bytes == BLOB
    assert sorted(s["bytes_from_mirror"] for s in final) == [0, 0, BLOB]
    assert sorted(s["bytes_from_peers"] for s in final) == [0, BLOB, BLOB]
    for root in ("a", "b", "c"):
        got = tmp_path / root / "cache/models--org--relay/blobs" / blob
        assert got.read_bytes() == data


async def fetch_all(
    herd: tuple[Any, ...], blob: str
) -> tuple[list[tuple[int, str, str]], list[dict[str, Any]], list[tuple[int, int]]]:
    """Download org/relay on every agent at once; their results, their final status, and
    each look that caught a follower with bytes from a peer while the leader's own fetch
    was short of the size: (follower's from_peers, leader's done)."""
    downloads = [
        asyncio.create_task(cli("download", "org/relay", "--agent", x.local_url, "--quiet"))
        for x in herd
    ]
    # Look at all three while they work: a follower with bytes from a peer while
    # the leader's own fetch of the blob is still short of its size.
    early: list[tuple[int, int]] = []  # (follower's from_peers, leader's done)
    t0 = time.monotonic()
    while not all(d.done() for d in downloads) and time.monotonic() - t0 < 60:
        seen = [await status(x) for x in herd]
        rows = [next((t for t in s["transfers"] if t["blob"] == blob), None) for s in seen]
        leading = [r for r in rows if r is not None and r["from_mirror"] > 0]
        following = [r for r in rows if r is not None and r["from_peers"] > 0]
        if len(leading) == 1 and following and leading[0]["done"] < BLOB:
            assert {r["source"] for r in following} <= {"leader", "peers"}, following
            early.append((max(r["from_peers"] for r in following), leading[0]["done"]))
        await asyncio.sleep(0.1)
    results = [await asyncio.wait_for(d, 60) for d in downloads]
    final = [await status(x) for x in herd]
    return results, final, early


@asynccontextmanager
async def lying_leader(ip: str, sizes: dict[str, int]) -> AsyncIterator[tuple[int, list[int]]]:
    """Answers like an agent that leads every blob, at a believable pace, and relays
    bytes of the right length that are not the blob's. Yields its port and the number of
    bytes it relayed."""
    t0 = time.monotonic()
    relayed = [0]

    async def have(request: web.Request) -> web.Response:
        ask = wire.decode_as(await request.read(), wire.HaveRequest)
        done = int((time.monotonic() - t0) * 4 * MiB)
        claims = tuple(
            wire.Claim(blob_id=b, size=sizes[b], leading=True, done=min(done, sizes[b] - 1))
            for b in ask.blob_ids
            if b in sizes
        )
        return msgpack(wire.HaveResponse(manifests=(), claims=claims))

    async def relay(request: web.Request) -> web.StreamResponse:
        size = sizes[request.match_info["blob_id"]]
        resp, start = await relay_answer(request, size)
        junk = random.Random(1).randbytes(size - start)
        await resp.write(junk)
        relayed[0] += len(junk)
        await resp.write_eof()
        return resp

    async with fake_agent(ip, "liar-leader-00000", have, relay) as port:
        yield port, relayed


async def test_a_leader_relaying_wrong_bytes_is_banned_and_the_blob_comes_right(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    mirror, data = slow_mirror
    blob = sha256(data)
    async with (
        lying_leader("127.0.0.34", {blob: BLOB}) as (port, relayed),
        agent_process(
            tmp_path / "a",
            "127.0.0.35",
            mirror.url,
            "--leader-timeout",
            "3",
            peers=(f"127.0.0.34:{port}",),
        ) as a,
    ):
        await knows_a_peer(a)
        code, _, err = await asyncio.wait_for(
            cli("download", "org/relay", "--agent", a.local_url, "--quiet"), 60
        )
        final = await status(a)
    assert code == 0, err
    assert relayed[0] == BLOB, "the agent never copied from the (lying) leader"
    # The relayed bytes failed the whole-file hash: thrown away, the liar banned, and
    # the blob taken from the mirror whole; only its true bytes are in blobs/.
    assert final["bans"] >= 1
    assert final["peers"] == []
    assert final["bytes_from_peers"] == 0
    assert mirror.stats().blob_bytes == BLOB
    got = tmp_path / "a/cache/models--org--relay/blobs" / blob
    assert got.read_bytes() == data
    assert "lied" in a.log.read_text()


@asynccontextmanager
async def cutting_liar(ip: str, blob: str, size: int, cut: int) -> AsyncIterator[int]:
    """Leads `blob` at a believable pace and relays `cut` wrong bytes from the start,
    then sends nothing more (the relay is cut by the follower's idle timeout, or by its
    end): never a whole relay, so never one its follower can blame on it. Yields its
    port."""
    t0 = time.monotonic()

    async def have(request: web.Request) -> web.Response:
        done = min(int((time.monotonic() - t0) * 4 * MiB), size - 1)
        claims = (wire.Claim(blob_id=blob, size=size, leading=True, done=done),)
        return msgpack(wire.HaveResponse(manifests=(), claims=claims))

    async def relay(request: web.Request) -> web.StreamResponse:
        resp, start = await relay_answer(request, size)
        await resp.write(random.Random(2).randbytes(max(0, cut - start)))
        await asyncio.sleep(3600)
        return resp

    async with fake_agent(ip, "cutting-liar-0000", have, relay) as port:
        yield port


async def test_an_honest_leader_is_not_blamed_for_bytes_another_peer_relayed(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    """A liar relays the first 8 MiB of a blob wrong and goes quiet; the follower is
    killed (-9) with them in its partial. Restarted, it follows an honest leader (a real
    agent fetching from the mirror) from where its partial stopped: the whole-file hash
    fails, for bytes the honest leader never sent. It must not ban that leader, and it
    must get the blob right."""
    mirror, data = slow_mirror
    blob = sha256(data)
    cut = 8 * MiB
    f_root, f_ip = tmp_path / "f", "127.0.0.37"
    async with cutting_liar("127.0.0.36", blob, BLOB, cut) as port:
        liar = (f"127.0.0.36:{port}",)
        async with agent_process(f_root, f_ip, mirror.url, "-v", peers=liar) as f:
            await knows_a_peer(f)
            download = asyncio.create_task(
                cli("download", "org/relay", "--agent", f.local_url, "--quiet")
            )
            copied = 0
            for _ in range(300):
                rows = [t for t in (await status(f))["transfers"] if t["blob"] == blob]
                copied = rows[0]["from_peers"] if rows else 0
                if copied >= cut:
                    break
                await asyncio.sleep(0.05)
            f.proc.kill()  # kill -9: the partial and its journal stay as they are
            await download
    assert copied >= cut, "the follower never copied the liar's relay"
    assert mirror.stats().blob_bytes == 0

    mirror.set_rate_cap(4 * MiB)  # per connection: the leader takes seconds
    async with agent_process(tmp_path / "h", "127.0.0.38", mirror.url, "--connections", "1") as h:
        lead = asyncio.create_task(cli("download", "org/relay", "--agent", h.local_url, "--quiet"))
        for _ in range(200):  # h leads (alone): its mirror fetch is under way
            rows = [t for t in (await status(h))["transfers"] if t["blob"] == blob]
            if rows and rows[0]["from_mirror"] > 0:
                break
            await asyncio.sleep(0.05)
        async with agent_process(f_root, f_ip, mirror.url, "-v", peers=(h.peer_addr,)) as f:
            code, _, err = await asyncio.wait_for(
                cli("download", "org/relay", "--agent", f.local_url, "--quiet"), 90
            )
            final = await status(f)
            log = f.log.read_text()
        lead_code, _, lead_err = await asyncio.wait_for(lead, 60)
        final_h = await status(h)
    assert code == 0 and lead_code == 0, (err, lead_err)
    assert "copying from leader" in log and final["hash_failures"] >= 1, log[-3000:]
    assert final["bans"] == 0, log[-3000:]
    assert [p["agent_id"] for p in final["peers"]] == [final_h["agent_id"]]
    got = f_root / "cache/models--org--relay/blobs" / blob
    assert got.read_bytes() == data


async def test_a_ranged_read_through_hf_endpoint_never_completes_on_relayed_bytes(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    """A client reading a range of a shard through HF_ENDPOINT (a safetensors header
    read) while its agent copies the shard from a lying leader: the answer streams, but
    its last byte waits for the whole-file hash, so the liar's bytes never make a
    complete 206."""
    mirror, data = slow_mirror
    blob = sha256(data)
    async with (
        cutting_liar("127.0.0.41", blob, BLOB, 8 * MiB) as port,
        agent_process(tmp_path / "f", "127.0.0.42", mirror.url, peers=(f"127.0.0.41:{port}",)) as f,
    ):
        await knows_a_peer(f)
        url = f"{f.local_url}/org/relay/resolve/main/model.safetensors"
        got = bytearray()
        complete = False
        async with aiohttp.ClientSession() as s:
            with contextlib.suppress(TimeoutError, aiohttp.ClientPayloadError):
                async with (
                    asyncio.timeout(8),
                    s.get(url, headers={"Range": f"bytes=0-{MiB - 1}"}) as r,
                ):
                    assert r.status == 206, r.status
                    while chunk := await r.content.read(65536):
                        got += chunk
                    complete = True
        copied = sum(t["from_peers"] for t in (await status(f))["transfers"])
    assert copied >= MiB, "the agent never copied the liar's relay"
    assert not complete or bytes(got) == data[:MiB], "a complete answer of a liar's bytes"
    assert len(got) == MiB - 1, len(got)  # it streamed all but the last byte


async def test_a_client_paused_across_the_refetch_never_completes_on_relayed_bytes(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    """A client reading a shard through HF_ENDPOINT while its agent copies it from a
    lying leader takes the first bytes, then reads nothing for a while (a slow sink,
    within the write stall): meanwhile the copy fails its hash and the mirror's copy is
    verified. The sendfile chunk that was out when the source went void ends after the
    fetch returned; the answer must be cut there, never be completed from the verified
    blob behind the liar's first bytes."""
    mirror, data = slow_mirror
    blob = sha256(data)
    async with (
        lying_leader("127.0.0.43", {blob: BLOB}) as (port, relayed),
        agent_process(
            tmp_path / "a",
            "127.0.0.44",
            mirror.url,
            "--leader-timeout",
            "3",
            peers=(f"127.0.0.43:{port}",),
        ) as a,
    ):
        await knows_a_peer(a)
        host = a.local_url.split("/")[2]
        ip, tcp = host.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.setblocking(False)
        await loop.sock_connect(s, (ip, int(tcp)))
        await loop.sock_sendall(
            s,
            f"GET /org/relay/resolve/main/model.safetensors HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        got = bytearray()
        try:
            while len(got) < 2 * MiB:  # the liar's first bytes ...
                chunk = await asyncio.wait_for(loop.sock_recv(s, 1 << 16), 20)
                assert chunk, bytes(got[:300])
                got += chunk
            # ... then nothing read until the agent's copy failed and the mirror's is in.
            for _ in range(200):
                if (await status(a))["bans"] and not (await status(a))["transfers"]:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.wait_for(loop.sock_recv(s, 1 << 20), 20):
                    got += chunk
        finally:
            s.close()
        final = await status(a)
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert relayed[0] > 0 and final["bans"] >= 1, (relayed, final)
    assert len(body) < BLOB or body == data, "a complete answer starting with a liar's bytes"
    assert body[:MiB] != data[:MiB], "the client never got the liar's bytes: no test"


async def test_a_leader_trickling_its_relay_cannot_freeze_a_follower(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    """A fake leader claims a believable pace, relays 1 MiB and then a byte every 2 s,
    and once the copy runs offers the blob's manifest (so the herd wait ends with offers
    while the copy still follows it). The follower must not wait for that relay without
    end: it drops it and gets the blob right, from the mirror."""
    mirror, data = slow_mirror
    blob = sha256(data)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / blob).write_bytes(data)
    manifest = await make_manifest(VerifiedBlob(blob, BLOB, tmp_path / "m" / blob), "trickler")
    t0 = time.monotonic()
    relaying = asyncio.Event()

    async def have(request: web.Request) -> web.Response:
        done = min(int((time.monotonic() - t0) * 4 * MiB), BLOB - 1)
        claims = (wire.Claim(blob_id=blob, size=BLOB, leading=True, done=done),)
        offered = (manifest,) if relaying.is_set() else ()
        return msgpack(wire.HaveResponse(manifests=offered, claims=claims))

    async def relay(request: web.Request) -> web.StreamResponse:
        resp, start = await relay_answer(request, BLOB)
        await resp.write(data[start : start + MiB])
        relaying.set()
        for pos in range(start + MiB, BLOB):
            await asyncio.sleep(2)
            await resp.write(data[pos : pos + 1])
        return resp

    async with (
        fake_agent("127.0.0.39", "trickler-0000000", have, relay, bt_port=1) as port,
        agent_process(
            tmp_path / "a", "127.0.0.40", mirror.url, "-v", peers=(f"127.0.0.39:{port}",)
        ) as a,
    ):
        await knows_a_peer(a)
        t1 = time.monotonic()
        code, _, err = await asyncio.wait_for(
            cli("download", "org/relay", "--agent", a.local_url, "--quiet"), 120
        )
        took = time.monotonic() - t1
        log = a.log.read_text()
    assert code == 0, err
    assert relaying.is_set() and "copying from leader" in log, log[-3000:]
    print(f"download with a trickling leader: {took:.1f} s")
    assert took < 60, log[-3000:]
    got = tmp_path / "a/cache/models--org--relay/blobs" / blob
    assert got.read_bytes() == data


async def test_a_banned_leader_is_replaced_at_once(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    """The follower bans a leader whose relay failed the hash: its herd stops waiting
    for it at the next survey, not after the leader timeout (15 s by default) that a
    peer gone silent needs."""
    mirror, data = slow_mirror
    blob = sha256(data)
    async with (
        lying_leader("127.0.0.46", {blob: BLOB}) as (port, relayed),
        agent_process(
            tmp_path / "a", "127.0.0.47", mirror.url, "-v", peers=(f"127.0.0.46:{port}",)
        ) as a,
    ):
        await knows_a_peer(a)
        t0 = time.monotonic()
        code, _, err = await asyncio.wait_for(
            cli("download", "org/relay", "--agent", a.local_url, "--quiet"), 60
        )
        took = time.monotonic() - t0
        final = await status(a)
        log = a.log.read_text()
    assert code == 0, err
    assert relayed[0] == BLOB and final["bans"] == 1, log[-3000:]
    print(f"download with a banned leader: {took:.1f} s")
    assert took < 10, log[-3000:]
    got = tmp_path / "a/cache/models--org--relay/blobs" / blob
    assert got.read_bytes() == data


async def test_a_leader_with_followers_grows_its_prefix_at_the_blobs_rate(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    """The relay is the leader's in-order prefix: fetched as usual (a run per stream,
    halves stolen from the end), it lags the bytes received by up to half the blob;
    in chunk order (`in_order`, a herd leader with followers) by at most a chunk per
    stream."""
    mirror, data = slow_mirror
    mirror.set_rate_cap(1 * MiB)  # per connection: the fetch grows to 4 streams
    f = RemoteFile("model.safetensors", len(data), sha256(data), True)
    hub = HubSettings(mirrors=(mirror.url,), token=None, cache_dir=tmp_path / "c")
    async with aiohttp.ClientSession() as s:
        url = f"{mirror.url}/api/models/org/relay/revision/main"
        async with s.get(url) as r:
            commit = (await r.json())["sha"]
    snap = Snapshot("model", "org/relay", "main", commit, (f,), mirror.url)
    chunk = chunk_size_for(f.size)
    lag = {o: await prefix_lag(hub, snap, f, tmp_path / f"p{o}", in_order=o) for o in (0, 1)}
    print(f"largest lag of the prefix: as usual {lag[0]} B, in order {lag[1]} B")
    assert lag[1] <= 5 * chunk, lag
    assert lag[1] < lag[0], lag


async def prefix_lag(
    hub: HubSettings, snap: Snapshot, f: RemoteFile, folder: Path, *, in_order: int
) -> int:
    """One mirror fetch of `f` (4 streams at most): the most bytes it had received
    beyond its hashed in-order prefix at any moment."""
    got, prefix, worst = 0, 0, 0

    def on_bytes(n: int) -> None:
        nonlocal got, worst
        got += n
        worst = max(worst, got - prefix)

    def on_prefix(n: int) -> None:
        nonlocal prefix
        prefix = n

    with PartialBlob(folder, f.blob_id, f.size, chunk_size_for(f.size)) as p:
        async with MirrorFetcher(hub, DownloadOptions(connections=4)) as mf:
            verdict = await mf.fetch(
                snap, f, p, on_bytes=on_bytes, on_prefix=on_prefix, in_order=bool(in_order)
            )
    assert verdict.ok
    return worst
