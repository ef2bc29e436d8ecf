"""One bare host of benchmarks/lan_swarm.py's `bare-one`/`bare-eight` rows (a child process).

Run in a host's netns with a checkout first on PYTHONPATH (this file puts nothing of its
own tree on sys.path, so the checkout's `SwarmSession` is the one measured):

    python benchmarks/lan_bare.py SPEC.json

SPEC: {"ip", "port", "seeder" (its ip), "torrents": [paths], "out", "peers": [[ip, port]],
"seed" (optional: seed the torrents from "out", which holds the files, and download
nothing), and for a study of one setting at a time, all optional: "lt" (libtorrent
settings put over the project's), "swarm" (`SwarmSettings` fields), "alone" (the request
bound told a torrent's only peer), "super_seed" (with "seed": libtorrent's super-seeding),
"max_uploads" (with "seed": each torrent's own unchoke slots, libtorrent's
`set_max_uploads`; the session's seed choking algorithm is an "lt" setting),
"max_connections" (with "seed": each torrent's own connection cap, libtorrent's
`set_max_connections`: at most that many hosts take a torrent from the seeder at once),
"place" ([k, n]: host k of n takes its stripe first), "feeds" (the torrents, by place, for
which to connect to the seeder; the others only to the hosts)}.
Protocol on stdin/stdout (one JSON object a line): ``ready`` once the torrents are added
and the session listens; on the first line of stdin, connect and download (a seeder:
nothing), then one line of figures; on the second line (or EOF) one line of totals, and
exit.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


async def bare_host(spec: dict[str, Any], torrents: list[bytes]) -> None:
    """One bare host (a child process in its netns, the checkout first on sys.path).

    Adds the torrents, says ``ready``; on the first line of stdin connects every torrent
    to every address in the spec (the seeder and the other hosts) and waits until each
    torrent is finished and flushed, then prints its figures and goes on seeding to the
    others until the second line (or EOF), when it prints its totals and exits."""
    from peer.transfer import events as ev
    from peer.transfer import swarm
    from peer.transfer.swarm import SwarmSession, SwarmSettings

    if "alone" in spec:
        # the bound a torrent's only peer is told (the project's 2000): at the shared
        # bound, a torrent turning shared has no peer to reconnect
        swarm.ALONE_PEER_REQUESTS = int(spec["alone"])  # type: ignore[misc]

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    # The agent's session (peer/agent/daemon.py): defaults, local peers rate-limited
    # like any other (no limit is set, so the same).
    settings = SwarmSettings(
        listen_host=spec["ip"],
        listen_port=spec["port"],
        limit_local_peers=True,
        **spec.get("swarm", {}),  # SwarmSettings fields over the agent's
    )
    if extra := spec.get("lt"):
        made = SwarmSettings.to_libtorrent
        SwarmSettings.to_libtorrent = lambda self: {**made(self), **extra}  # type: ignore[method-assign]
    async with SwarmSession(settings) as s:
        stream = s.subscribe(
            kinds=(ev.PeerConnected, ev.PeerDisconnected, ev.PieceFinished, ev.TorrentFinished)
        )
        seed = bool(spec.get("seed"))
        ihs = [await s.add_torrent(t, spec["out"], seed_mode=seed) for t in torrents]
        if seed and spec.get("super_seed"):
            import libtorrent as lt

            for ih in ihs:
                s._get(ih).handle.set_flags(lt.torrent_flags.super_seeding)
        if seed and (slots := spec.get("max_uploads")):
            # at most `slots` peers of one torrent unchoked at once ("feeders" the
            # seeder picks); the session's unchoke_slots_limit still bounds them all
            for ih in ihs:
                s._get(ih).handle.set_max_uploads(int(slots))
        if seed and (cap := spec.get("max_connections")):
            # at most `cap` peers of one torrent connected at once: the others are
            # refused ("too many connections") and must take it from the ones let in
            for ih in ihs:
                s._get(ih).handle.set_max_connections(int(cap))
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        t0, c0 = time.monotonic(), cpu()
        series: list[list[float]] = []

        async def sample() -> None:
            """Every 0.5 s: [s after go, MB had, MB sent, MB/s from the seeder now]."""
            while True:
                await asyncio.sleep(0.5 - (time.monotonic() - t0) % 0.5)
                got = [await s.status(ih) for ih in ihs]
                from_seeder = 0
                if not seed:
                    for ih in ihs:
                        for p in await s.peers(ih):
                            if p.endpoint.host == spec["seeder"]:
                                from_seeder += p.download_rate
                series.append([
                    round(time.monotonic() - t0, 2),
                    round(sum(g.peer_payload_bytes for g in got) / 1e6, 2),
                    round(sum(g.uploaded_payload_bytes for g in got) / 1e6, 2),
                    round(from_seeder / 1e6, 2),
                ])  # fmt: skip

        sampler = asyncio.create_task(sample())
        if seed:
            await asyncio.to_thread(sys.stdin.readline)
            sampler.cancel()
            got = [await s.status(ih) for ih in ihs]
            print(json.dumps({
                "cpu_s": round(cpu() - c0, 2),
                "uploaded": sum(g.uploaded_payload_bytes for g in got),
                "series": series,
            }), flush=True)  # fmt: skip
            return
        gating = None
        if place := spec.get("place"):
            gating = asyncio.create_task(stripes(s, ihs, *place))
        feeds = spec.get("feeds")  # torrents (by place) to take from the seeder; None: all
        for t, ih in enumerate(ihs):
            for host, port in spec["peers"]:
                if host != spec["seeder"] or feeds is None or t in feeds:
                    s.connect_peer(ih, host, port)
        pending = set(ihs)
        marks: dict[str, float] = {}
        async for e in stream:
            now = round(time.monotonic() - t0, 3)
            if isinstance(e, ev.PeerConnected | ev.PeerDisconnected):
                who = "seeder" if e.endpoint.host == spec["seeder"] else "host"
                what = "connected" if isinstance(e, ev.PeerConnected) else "dropped"
                marks.setdefault(f"{who} {what}", now)
            elif isinstance(e, ev.PieceFinished):
                marks.setdefault("first piece", now)
            elif isinstance(e, ev.TorrentFinished) and e.info_hash in pending:
                if not all(await s.have_pieces(e.info_hash)):
                    continue  # every piece it may take yet (a stripe): not done
                await s.flush_cache(e.info_hash)
                pending.discard(e.info_hash)
                if not pending:
                    break
        took, busy = time.monotonic() - t0, cpu() - c0
        sampler.cancel()
        if gating is not None:
            gating.cancel()
        got = [await s.status(ih) for ih in ihs]
        print(json.dumps({
            "s": round(took, 3), "cpu_own_s": round(busy, 2), "marks": marks, "series": series,
            "from_peers": sum(g.peer_payload_bytes for g in got),
            "uploaded": sum(g.uploaded_payload_bytes for g in got),
        }), flush=True)  # fmt: skip
        await asyncio.to_thread(sys.stdin.readline)
        got = [await s.status(ih) for ih in ihs]
        print(json.dumps({
            "cpu_s": round(cpu() - c0, 2),
            "uploaded": sum(g.uploaded_payload_bytes for g in got),
        }), flush=True)  # fmt: skip


async def stripes(s: Any, ihs: list[str], k: int, n: int) -> None:
    """Host k of n takes only its stripe of each torrent (pieces i with (i + t) % n == k,
    t the torrent's place) until another host has a piece: the seeder is asked for each
    piece by one host, the rest come from the hosts. A piece opens when its
    availability passes the holders of everything (the seeder: 1), and everything opens
    once at most two pieces we may take are missing (nothing left to ask for)."""
    closed: dict[str, set[int]] = {}
    for t, ih in enumerate(ihs):
        meta = await s.torrent_meta(ih)
        closed[ih] = {i for i in range(meta.num_pieces) if (i + t) % n != k}
        for i in closed[ih]:
            s.set_piece_priority(ih, i, 0)
    while any(closed.values()):
        await asyncio.sleep(0.25)
        for ih in ihs:
            if not closed[ih]:
                continue
            have = await s.have_pieces(ih)
            avail = await s.piece_availability(ih)
            left = sum(1 for i, h in enumerate(have) if not h and i not in closed[ih])
            opening = [i for i in closed[ih] if have[i] or left <= 2 or (avail and avail[i] >= 2)]
            for i in opening:
                s.set_piece_priority(ih, i, 4)
                closed[ih].discard(i)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    asyncio.run(bare_host(spec, [Path(t).read_bytes() for t in spec["torrents"]]))


if __name__ == "__main__":
    main()
