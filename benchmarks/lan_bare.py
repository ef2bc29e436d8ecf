"""One bare host of benchmarks/lan_swarm.py's `bare-one`/`bare-eight` rows (a child process).

Run in a host's netns with a checkout first on PYTHONPATH (this file puts nothing of its
own tree on sys.path, so the checkout's `SwarmSession` is the one measured):

    python benchmarks/lan_bare.py SPEC.json

SPEC: {"ip", "port", "seeder" (its ip), "torrents": [paths], "out", "peers": [[ip, port]],
"seed" (optional: seed the torrents from "out", which holds the files, and download
nothing), "lt" (optional: libtorrent settings put over the project's, for a study of one
setting at a time), "super_seed" (optional, with "seed": libtorrent's super-seeding)}.
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
    from peer.transfer.swarm import SwarmSession, SwarmSettings

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    # The agent's session (peer/agent/daemon.py): defaults, local peers rate-limited
    # like any other (no limit is set, so the same).
    settings = SwarmSettings(
        listen_host=spec["ip"], listen_port=spec["port"], limit_local_peers=True
    )
    if extra := spec.get("lt"):
        made = SwarmSettings.to_libtorrent
        SwarmSettings.to_libtorrent = lambda self: {**made(self), **extra}  # type: ignore[method-assign]
    async with SwarmSession(settings) as s:
        stream = s.subscribe(kinds=(ev.PeerConnected, ev.PieceFinished, ev.TorrentFinished))
        seed = bool(spec.get("seed"))
        ihs = [await s.add_torrent(t, spec["out"], seed_mode=seed) for t in torrents]
        if seed and spec.get("super_seed"):
            import libtorrent as lt

            for ih in ihs:
                s._get(ih).handle.set_flags(lt.torrent_flags.super_seeding)
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        t0, c0 = time.monotonic(), cpu()
        if seed:
            await asyncio.to_thread(sys.stdin.readline)
            got = [await s.status(ih) for ih in ihs]
            print(json.dumps({
                "cpu_s": round(cpu() - c0, 2),
                "uploaded": sum(g.uploaded_payload_bytes for g in got),
            }), flush=True)  # fmt: skip
            return
        for ih in ihs:
            for host, port in spec["peers"]:
                s.connect_peer(ih, host, port)
        pending = set(ihs)
        marks: dict[str, float] = {}
        async for e in stream:
            now = round(time.monotonic() - t0, 3)
            if isinstance(e, ev.PeerConnected):
                key = "seeder connected" if e.endpoint.host == spec["seeder"] else "host connected"
                marks.setdefault(key, now)
            elif isinstance(e, ev.PieceFinished):
                marks.setdefault("first piece", now)
            elif isinstance(e, ev.TorrentFinished) and e.info_hash in pending:
                await s.flush_cache(e.info_hash)
                pending.discard(e.info_hash)
                if not pending:
                    break
        took, busy = time.monotonic() - t0, cpu() - c0
        got = [await s.status(ih) for ih in ihs]
        print(json.dumps({
            "s": round(took, 3), "cpu_own_s": round(busy, 2), "marks": marks,
            "from_peers": sum(g.peer_payload_bytes for g in got),
            "uploaded": sum(g.uploaded_payload_bytes for g in got),
        }), flush=True)  # fmt: skip
        await asyncio.to_thread(sys.stdin.readline)
        got = [await s.status(ih) for ih in ihs]
        print(json.dumps({
            "cpu_s": round(cpu() - c0, 2),
            "uploaded": sum(g.uploaded_payload_bytes for g in got),
        }), flush=True)  # fmt: skip


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    asyncio.run(bare_host(spec, [Path(t).read_bytes() for t in spec["torrents"]]))


if __name__ == "__main__":
    main()
