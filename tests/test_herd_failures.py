"""A herd leader whose mirror fetch fails, or starts over after a hash mismatch: its
followers hear of it at once (the relay ends, the herd moves on), and an honest restart
is not taken for a lie (`wire.Claim.attempt`).

Real `hfswarm agent` processes on loopback and the project's mirror, its faults making
the leader's fetch fail (a 404 after a cut body) or its first attempt corrupt."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from procs import agent_process
from test_agents import MiB, cli, sha256
from test_herd_relay import BLOB, slow_mirror, status

from peer.mirror_server import Fault, MirrorServer

__all__ = ["slow_mirror"]  # the fixture, used by name


async def transfer(a: object, blob: str) -> dict[str, int]:
    rows = [t for t in (await status(a))["transfers"] if t["blob"] == blob]
    return rows[0] if rows else {}


async def read_relay(url: str, ended: list[float]) -> int:
    """Read a relay to its end (whole or cut); when it ended goes into `ended`."""
    got = 0
    try:
        async with aiohttp.ClientSession() as s, s.get(url, headers={"Range": "bytes=0-"}) as r:
            assert r.status == 206, r.status
            while chunk := await r.content.read(1 << 16):
                got += len(chunk)
    except aiohttp.ClientPayloadError:
        pass  # cut short: what a failed lead must look like
    ended.append(time.monotonic())
    return got


async def test_a_leader_whose_mirror_fetch_fails_ends_its_relays_and_a_follower_leads_at_once(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    """The leader's mirror fetch fails mid-way (its body cut, then the mirror says 404).
    Its relays end at once, not after the 30 s idle cut; its follower stops waiting for
    it at the next survey (not after the leader timeout) and takes the rest from the
    mirror itself, resuming what it copied."""
    mirror, data = slow_mirror
    blob = sha256(data)
    mirror.set_rate_cap(MiB)  # per connection: the leader takes 16 s
    one = ("--connections", "1")
    ended: list[float] = []  # when b's download ended
    async with agent_process(tmp_path / "a", "127.0.0.61", mirror.url, *one, "-v") as a:
        lead = asyncio.create_task(cli("download", "org/relay", "--agent", a.local_url, "--quiet"))
        for _ in range(200):  # a leads (alone): its mirror fetch is under way
            if (await transfer(a, blob)).get("from_mirror", 0) > 0:
                break
            await asyncio.sleep(0.05)
        async with agent_process(
            tmp_path / "b", "127.0.0.62", mirror.url, *one, "-v", peers=(a.peer_addr,)
        ) as b:
            follow = asyncio.create_task(
                cli("download", "org/relay", "--agent", b.local_url, "--quiet")
            )
            follow.add_done_callback(lambda _: ended.append(time.monotonic()))
            for _ in range(300):  # b copies a's relay
                if (await transfer(b, blob)).get("from_peers", 0) >= 2 * MiB:
                    break
                await asyncio.sleep(0.05)
            assert (await transfer(b, blob)).get("from_peers", 0) >= 2 * MiB, "b never copied"
            relay_ended: list[float] = []
            reader = asyncio.create_task(read_relay(f"{a.peer_url}/v1/relay/{blob}", relay_ended))
            await asyncio.sleep(0.5)
            assert not reader.done()
            # a's body is cut; its retry gets a 404: its fetch fails. Once: b's own fetch
            # may start before a's CLI has returned here.
            mirror.add_fault(Fault("status", status=404, times=1))
            mirror.down_for(1.5)  # longer than the 1 MiB between its looks
            failed_at = time.monotonic()
            lead_code, _, lead_err = await asyncio.wait_for(lead, 30)
            mirror.clear_faults()
            mirror.set_rate_cap(None)
            relayed = await asyncio.wait_for(reader, 40)
            code, _, err = await asyncio.wait_for(follow, 60)
            final_b = await status(b)
            log_b = b.log.read_text()
    assert lead_code != 0 and "injected fault" in lead_err, lead_err
    assert 0 < relayed < BLOB
    relay_took = relay_ended[0] - failed_at
    b_took = ended[0] - failed_at
    print(f"relay ended {relay_took:.1f} s after the fault; b done after {b_took:.1f} s")
    why = f"{final_b}\n{log_b[-3000:]}"
    assert relay_took < 5, relay_took  # the idle cut would be 30 s
    assert code == 0, (err, why)
    assert b_took < 10, why  # the leader timeout would be 15 s
    assert final_b["bans"] == 0, why
    assert 0 < final_b["bytes_from_peers"] < BLOB, why  # its copy was kept and resumed
    got = tmp_path / "b/cache/models--org--relay/blobs" / blob
    assert got.read_bytes() == data


async def test_a_leader_whose_first_attempt_fails_its_hash_keeps_its_followers(
    tmp_path: Path, slow_mirror: tuple[MirrorServer, bytes]
) -> None:
    """The mirror corrupts one byte of the leader's first fetch: its whole-file hash
    fails and it fetches the blob again from byte 0 (`from_mirror`). Its `done` goes
    back to 0 with a new attempt in its claim: the follower keeps following it (no
    mirror fetch of its own, no ban) and copies the new attempt from its first byte
    (the old attempt's bytes are not kept)."""
    mirror, data = slow_mirror
    blob = sha256(data)
    mirror.set_rate_cap(2 * MiB)  # per connection: each attempt takes 8 s
    mirror.add_fault(Fault("corrupt", offset=BLOB // 2, times=1))
    one = ("--connections", "1")
    async with agent_process(tmp_path / "a", "127.0.0.63", mirror.url, *one, "-v") as a:
        lead = asyncio.create_task(cli("download", "org/relay", "--agent", a.local_url, "--quiet"))
        for _ in range(200):  # a leads (alone): its mirror fetch is under way
            if (await transfer(a, blob)).get("from_mirror", 0) > 0:
                break
            await asyncio.sleep(0.05)
        async with agent_process(
            tmp_path / "b", "127.0.0.64", mirror.url, *one, "-v", peers=(a.peer_addr,)
        ) as b:
            code, _, err = await asyncio.wait_for(
                cli("download", "org/relay", "--agent", b.local_url, "--quiet"), 90
            )
            final_b = await status(b)
            log_b = b.log.read_text()
        lead_code, _, lead_err = await asyncio.wait_for(lead, 60)
        final_a = await status(a)
    sent = mirror.stats().blob_bytes
    print(
        f"leader restarted: follower took {final_b['bytes_from_mirror'] / MiB:.1f} MiB from "
        f"the mirror, the mirror sent {sent / MiB:.1f} MiB in all, bans {final_b['bans']}"
    )
    why = f"{final_a}\n{final_b}\n{log_b[-3000:]}"
    assert lead_code == 0 and code == 0, (lead_err, err, why)
    assert final_a["hash_failures"] == 1, why  # the corrupt first attempt
    assert "copying from leader" in log_b, why
    assert final_b["bans"] == 0 and final_b["bytes_from_mirror"] == 0, why
    assert final_b["bytes_from_peers"] == BLOB, why
    assert sent <= 2 * BLOB  # the leader's two attempts, nobody else
    got = tmp_path / "b/cache/models--org--relay/blobs" / blob
    assert got.read_bytes() == data
