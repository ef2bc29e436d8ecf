"""S seeders -> K downloaders at once over loopback, bare `SwarmSession`s, per bound.

What `SwarmSettings.shared_peer_requests` (the requests one peer may queue with a torrent
that has several peers) costs where the link is fast and the request queue is what keeps
it busy: each round, for each ``--bound`` in turn (interleaved), a fresh seeder session
seeds a random blob and K fresh downloader sessions (each in its own process, so they do
not share one event loop) fetch it at once; the row is the time until the last one has
all pieces and flushed. ``--bound 2000`` is libtorrent's default (the bound before the
setting existed). The downloaders know only the seeder (no trading), so the seeder's
queue per peer is the whole story.

    python benchmarks/lt_fanout.py --size 512MiB --peers 2 --runs 5 --bound 2000 --bound 32

Everything listens on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import parse_size  # noqa: E402

from peer.transfer import events as ev  # noqa: E402
from peer.transfer.swarm import SwarmSession, SwarmSettings, create_v2_torrent  # noqa: E402

PIECE = 1 << 20


async def download(torrent: bytes, out: Path, ports: list[int], bound: int) -> None:
    """One downloader (a child process): fetch from the seeders at `ports`, flush, exit."""
    settings = SwarmSettings(listen_host="127.0.0.1", shared_peer_requests=bound)
    async with SwarmSession(settings) as s:
        stream = s.subscribe()
        ih = await s.add_torrent(torrent, out)
        for port in ports:
            s.connect_peer(ih, "127.0.0.1", port)
        async with asyncio.timeout(600):
            async for e in stream:
                if isinstance(e, ev.TorrentFinished) and e.info_hash == ih:
                    break
        await s.flush_cache(ih)


async def one_round(
    blob: Path, torrent: bytes, tpath: Path, outs: list[Path], bound: int, seeders: int
) -> float:
    """Seconds until every downloader in `outs` has the blob (and flushed it)."""
    settings = SwarmSettings(listen_host="127.0.0.1", shared_peer_requests=bound)
    async with contextlib.AsyncExitStack() as stack:
        seeds = [await stack.enter_async_context(SwarmSession(settings)) for _ in range(seeders)]
        for seeder in seeds:
            await seeder.add_torrent(torrent, blob.parent, seed_mode=True)
        t0 = time.monotonic()
        ports = ",".join(str(seeder.listen_port) for seeder in seeds)
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--child", str(tpath), str(o), ports, str(bound)
            )
            for o in outs
        ]
        codes = [await p.wait() for p in procs]
        took = time.monotonic() - t0
    if any(codes):
        raise SystemExit(f"a downloader failed: exit codes {codes}")
    return took


def main(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="lt-fanout-"))
    seed = work / "seed"
    seed.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size)
    data = os.urandom(size)
    blob = seed / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    del data
    torrent = asyncio.run(create_v2_torrent(blob, PIECE))
    tpath = work / "blob.torrent"
    tpath.write_bytes(torrent)
    rows: dict[int, list[float]] = {b: [] for b in args.bound}
    for r in range(args.runs):
        order = args.bound[r % len(args.bound) :] + args.bound[: r % len(args.bound)]
        for b in order:
            outs = [work / f"dl{i}" for i in range(args.peers)]
            for o in outs:
                shutil.rmtree(o, ignore_errors=True)
                o.mkdir()
            took = asyncio.run(one_round(blob, torrent, tpath, outs, b, args.seeders))
            for o in outs:
                if (o / blob.name).stat().st_size != size:
                    raise SystemExit(f"{o} is incomplete")
            rows[b].append(took)
            print(f"  round {r + 1} bound {b}: {took:.2f} s", flush=True)
    print(
        f"\n{args.seeders} seeder(s) -> {args.peers} downloader(s) at once, "
        f"{size / 2**20:.0f} MiB, loopback\n"
    )
    print("| bound (blocks) | median s | runs (s) |")
    print("|---|---|---|")
    for b, ts in rows.items():
        print(f"| {b} | {statistics.median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        tor = Path(sys.argv[2]).read_bytes()
        ports = [int(p) for p in sys.argv[4].split(",")]
        asyncio.run(download(tor, Path(sys.argv[3]), ports, int(sys.argv[5])))
        raise SystemExit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512MiB")
    ap.add_argument("--peers", type=int, default=2, help="downloaders")
    ap.add_argument("--seeders", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bound", type=int, action="append", help="repeatable (default 2000, 32)")
    ap.add_argument("--work", help="work folder (default: a temp dir)")
    a = ap.parse_args()
    a.bound = a.bound or [2000, 32]
    main(a)
