"""Issue 9, finding 6 and the listener rules, as attacks on a real tracker process
(`python -m tracker`) and real agent processes (`hfswarm agent --tracker URL --no-mdns`)
on loopback. The victim agent is 127.0.0.2, the attacker sends from 127.0.0.9 (another
host on the LAN) or from the victim's own address (another user on the victim's host).
The pure parts (`ConnectionBook`, `RepeatFilter`) are tested in tests/test_tracker.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import procs
import pytest
from agentkit import write_tree
from test_agents import cli, run_agent_process
from yarl import URL

from peer.mirror_server import MirrorServer, RepoSource
from tracker import messages as m
from tracker.announce import compact_peer
from tracker.client import TrackerClient

MSGPACK = "application/msgpack"
VICTIM = "127.0.0.2"
ATTACKER = "127.0.0.9"
TTL = 3.0  # agents heartbeat every ttl/3 = 1 s


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[MirrorServer]:
    rnd = random.Random(9)
    src = write_tree(
        tmp_path / "src",
        {
            "config.json": b'{"model_type": "tracker-attack"}',
            "model.safetensors": rnd.randbytes(2_000_000),
            "tokenizer.bin": rnd.randbytes(300_000),
        },
    )
    async with MirrorServer([RepoSource("model", "org/m", src)]) as mirror:
        yield mirror


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def tracker_process(
    log: Path, port: int = 0, *args: str, nofile: int | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    def limit_fds() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    async with procs.tracker_process(
        log, f"127.0.0.1:{port}", "--ttl", str(TTL), *args, preexec_fn=limit_fds
    ) as started:
        yield started


@contextlib.asynccontextmanager
async def victim_agent(
    tmp_path: Path, mirror: MirrorServer, tracker: str
) -> AsyncIterator[tuple[dict[str, Any], set[str]]]:
    """A real agent that downloaded org/m and registered with the tracker; its info
    line and the blob ids it holds."""
    proc, info = await run_agent_process(
        tmp_path / "victim", VICTIM, mirror.url, "--tracker", tracker
    )
    try:
        code, _, err = await cli(
            "download", "org/m", "--agent", f"http://{VICTIM}:{info['local_port']}", "--quiet"
        )
        assert code == 0, err
        blobs = {p.name for p in (tmp_path / "victim/cache/models--org--m/blobs").iterdir()}
        assert len(blobs) == 3
        yield info, blobs
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def who(url: str, blobs: set[str]) -> dict[str, set[tuple[str, str, int]]]:
    async with TrackerClient(url) as c:
        answer = await c.who(sorted(blobs))
    return {
        b: {(h.agent_id, h.host, h.api_port) for h in answer[b].holders} if b in answer else set()
        for b in blobs
    }


async def until(check: Callable[[], Any], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{what} did not happen within {within} s"
        await asyncio.sleep(0.2)


def named_for_all(url: str, blobs: set[str], me: tuple[str, str, int]) -> Callable[[], Any]:
    async def check() -> bool:
        return all(me in holders for holders in (await who(url, blobs)).values())

    return check


async def post_from(source: str, url: str, msg: m.Message) -> tuple[int, bytes]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.post(url, data=m.encode(msg), headers={"Content-Type": MSGPACK}) as r,
    ):
        return r.status, await r.read()


async def health_time(url: str) -> float:
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.get(f"{url}/v1/health") as r,
    ):
        assert r.status == 200
        m.decode_as(await r.read(), m.TrackerHealth)
    return time.monotonic() - t0


async def test_another_host_cannot_take_over_or_empty_an_agents_registration(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    async with (
        tracker_process(tmp_path / "tracker.log") as (_, url),
        victim_agent(tmp_path, mirror, url) as (info, blobs),
    ):
        me = (info["agent_id"], VICTIM, info["peer_port"])
        await until(named_for_all(url, blobs, me), 10, "the victim's registration")
        vid = info["agent_id"]
        attacks: list[m.Message] = [
            m.Register(agent_id=vid, api_port=1, bt_port=1),  # "I am the victim, here"
            m.Register(agent_id=vid, api_port=1, bt_port=1, host=ATTACKER),
            m.Register(agent_id=vid, api_port=info["peer_port"], bt_port=1, host=VICTIM),
            m.Announce(agent_id=vid, held=()),  # "the victim holds nothing"
        ]
        for attack in attacks:
            path = "/v1/register" if isinstance(attack, m.Register) else "/v1/announce"
            status, body = await post_from(ATTACKER, url + path, attack)
            assert status == 403, (attack, status, body)
            problem = m.decode_as(body, m.Problem)
            assert problem.code == "agent_id_taken"
            assert "registered from another address" in problem.message
        # The victim is still named, at its own address, for everything it holds.
        assert all(holders == {me} for holders in (await who(url, blobs)).values())
        await asyncio.sleep(1.5)  # and after its next heartbeat too
        assert all(holders == {me} for holders in (await who(url, blobs)).values())
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.get(f"http://{VICTIM}:{info['peer_port']}/v1/health") as r:
                assert r.status == 200 and time.monotonic() - t0 < 1.0


async def test_an_agent_whose_sets_were_emptied_announces_them_again(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    # From the victim's own address (another user on its host) the binding cannot tell
    # the two apart: the empty announce is accepted. (The agent listens on 127.0.0.2 but
    # talks to the tracker on 127.0.0.1 from 127.0.0.1: that is the address its id is
    # bound to.) The victim's next heartbeat carries
    # the counts it announced; the tracker's differ, so it announces everything again.
    async with (
        tracker_process(tmp_path / "tracker.log") as (_, url),
        victim_agent(tmp_path, mirror, url) as (info, blobs),
    ):
        me = (info["agent_id"], VICTIM, info["peer_port"])
        await until(named_for_all(url, blobs, me), 10, "the victim's registration")
        status, _ = await post_from("127.0.0.1", url + "/v1/announce", m.Announce(
            agent_id=info["agent_id"], held=()
        ))  # fmt: skip
        assert status == 200
        assert all(not holders for holders in (await who(url, blobs)).values())
        await until(named_for_all(url, blobs, me), 5, "the victim's re-announce")


async def test_an_agent_registers_and_announces_again_after_a_tracker_kill_9(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    port = free_port()
    async with tracker_process(tmp_path / "t1.log", port) as (first, url):
        async with victim_agent(tmp_path, mirror, url) as (info, blobs):
            me = (info["agent_id"], VICTIM, info["peer_port"])
            await until(named_for_all(url, blobs, me), 10, "the first registration")
            first.kill()  # SIGKILL: the registry is gone
            await first.wait()
            async with tracker_process(tmp_path / "t2.log", port) as (_, url2):
                assert url2 == url
                await until(named_for_all(url, blobs, me), 10, "the registration after restart")


async def test_bt_announce_lists_the_senders_address_never_a_forged_ip(tmp_path: Path) -> None:
    info_hash = "%AB" * 20

    async def announce(url: str, source: str, port: int, **extra: str) -> bytes:
        query = (
            f"info_hash={info_hash}&peer_id=-LT2110-{source.replace('.', '')[:12]:0>12}"
            f"&port={port}&left=5&compact=1&numwant=50"
            + "".join(f"&{k}={v}" for k, v in extra.items())
        )
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get(URL(f"{url}/announce?{query}", encoded=True)) as r,
        ):
            assert r.status == 200
            body = await r.read()
        assert b"failure reason" not in body, body
        return body

    async with tracker_process(tmp_path / "tracker.log") as (_, url):
        await announce(url, ATTACKER, 6881, ip="10.1.2.3")
        await announce(url, ATTACKER, 6882, ip="127.0.0.50")
        listed = await announce(url, "127.0.0.1", 6999)
        assert compact_peer(ATTACKER, 6881) in listed
        assert compact_peer(ATTACKER, 6882) in listed
        for forged in ("10.1.2.3", "127.0.0.50"):
            for port in (6881, 6882):
                assert compact_peer(forged, port) not in listed


async def test_idle_and_slow_connections_cannot_starve_the_tracker(tmp_path: Path) -> None:
    # The tracker gets 256 file descriptors; the attack opens more than that: idle
    # connections from ten addresses, and connections sending their headers a byte a
    # second. Health checks from another address are answered within 1 s throughout.
    log = tmp_path / "tracker.log"
    async with tracker_process(log, 0, "--request-timeout", "3", nofile=256) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        held: list[socket.socket] = []

        def connect(source: str) -> None:
            s = socket.socket()
            s.setblocking(False)
            s.bind((source, 0))
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            held.append(s)

        async def slowloris(source: str) -> bool:
            """True when the tracker closed the connection before the headers ended."""
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0)
                )
                try:
                    for byte in b"POST /v1/who HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        if await _closed(reader, 1.0):
                            return True
                finally:
                    writer.close()
                return False
            return True

        try:
            for i in range(40):
                for _ in range(10):
                    connect(f"127.0.0.{100 + i % 10}")
            slow = [asyncio.create_task(slowloris(f"127.0.0.{60 + i}")) for i in range(20)]
            worst = 0.0
            for _ in range(8):
                await asyncio.sleep(0.5)
                worst = max(worst, await health_time(url))
            # Starved, it would wait for the slow headers' 5 s timeout or fail. Under the
            # connect flood the kernel may drop a SYN from the full backlog (64, by
            # design): the client's retransmit comes 1 s later, so 1 s is not starvation.
            assert worst < 2.5, f"/v1/health took {worst:.2f} s under the attack"
            closed = await asyncio.wait_for(asyncio.gather(*slow), 20)
            assert all(closed), "slow headers were not cut off"
            assert await health_time(url) < 2.5
        finally:
            for s in held:
                s.close()
    assert log.stat().st_size < 20_000, log.read_text()[-2000:]


async def _closed(reader: asyncio.StreamReader, wait: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            return await reader.read(1024) == b"" or True
    return False
