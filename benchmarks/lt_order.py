"""In what order pieces arrive from one seeder: rarest first, in order, in order with
piece deadlines on the first pieces (what HF_ENDPOINT streaming asked before).

Two bare libtorrent sessions in one process (the project's settings pack); per round and
mode a fresh downloader adds the torrent paused, sets the mode, connects the seeder and
resumes (as the agent does). Printed per mode, median over the rounds: the time to pieces
0, 2 and 10 after the resume, the inversions among the first 16 pieces to finish (0 =
in order), and the time to the whole blob.

    python benchmarks/lt_order.py --size 256MiB --rounds 5

Everything listens on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import parse_size

from peer.transfer import events as ev
from peer.transfer.swarm import SwarmSession, SwarmSettings, create_v2_torrent, info_hash_of

PIECE = 1 << 20
MODES = ("rarest first", "in order", "in order + deadlines")


def settings() -> SwarmSettings:
    return SwarmSettings(listen_host="127.0.0.1", listen_port=0)


async def one(seeder: SwarmSession, torrent: bytes, work: Path, mode: str) -> dict[str, float]:
    async with SwarmSession(settings()) as s:
        stream = s.subscribe(info_hash_of(torrent))
        ih = await s.add_torrent(torrent, work / f"dl-{time.monotonic_ns()}", paused=True)
        if mode != "rarest first":
            s.set_in_order(ih, True)
        s.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        s.resume(ih)
        t0 = time.perf_counter()
        if mode == "in order + deadlines":  # what the driver asked: 16 pieces, 100 ms apart
            for k in range(16):
                s.set_piece_deadline(ih, k, 100 * (k + 1))
        order: list[int] = []
        at: dict[int, float] = {}
        async for e in stream:
            if isinstance(e, ev.PieceFinished):
                order.append(e.piece)
                at[e.piece] = time.perf_counter() - t0
            elif isinstance(e, ev.TorrentFinished) and e.info_hash == ih:
                break
        stream.close()
        total = time.perf_counter() - t0
    first = order[:16]
    inversions = sum(1 for i in range(len(first)) for j in range(i) if first[j] > first[i])
    return {"piece 0": at[0], "piece 2": at[2], "piece 10": at[10], "inv": inversions, "all": total}


async def run(size: int, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="hfswarm-lt-order-"))
    data = os.urandom(size)
    blob = work / "seed" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(data)
    torrent = await create_v2_torrent(blob, PIECE)
    got: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    async with SwarmSession(settings()) as seeder:
        await seeder.add_torrent(torrent, blob.parent, seed_mode=True)
        for r in range(rounds):
            for mode in MODES:
                got[mode].append(await one(seeder, torrent, work, mode))
            print(f"  round {r + 1} done", flush=True)
    print(f"\n| {size >> 20} MiB, 1 MiB pieces, median of {rounds} | piece 0 s | piece 2 s "
          "| piece 10 s | inversions in the first 16 | all s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for mode, rows in got.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {mode} | {med['piece 0']:.3f} | {med['piece 2']:.3f} | {med['piece 10']:.3f} "
              f"| {med['inv']:.0f} | {med['all']:.2f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    asyncio.run(run(parse_size(args.size), args.rounds))


if __name__ == "__main__":
    main()
