"""From adding a torrent to its first connection and first piece: a running torrent
given a peer vs a torrent added paused, given the peer, then resumed.

Two bare libtorrent sessions in one process, both with the project's settings pack
(`SwarmSettings().to_libtorrent()`); a seeder holds a random blob in seed mode. Per
round, a fresh downloader session waits a random 0-1 s (an agent's session is old, so
the phase of libtorrent's once-a-second rounds is random when a download starts), then:

- running: adds the torrent (not paused) and gives it the seeder with ``connect_peer``
  once ``torrent_checked`` came (what the agent did before 32de697);
- resumed: adds it paused, gives it the seeder once checked, then ``resume()`` (what
  `peer.agent.fetch` does now for a download with nothing on disk).

    python benchmarks/lt_connect.py --rounds 10

Everything listens on 127.0.0.x; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import libtorrent as lt

from peer.transfer.swarm import SwarmSettings, create_v2_torrent_blocking


def one(tor: bytes, out: Path, seeder: tuple[str, int], mode: str) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    ses = lt.session(SwarmSettings(listen_host="127.0.0.7", listen_port=0).to_libtorrent())
    time.sleep(random.uniform(0.0, 1.0))
    ses.pop_alerts()
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(tor))
    atp.save_path = str(out)
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    if mode == "resumed":
        atp.flags |= lt.torrent_flags.paused
    t0 = time.perf_counter()
    h = ses.add_torrent(atp)
    marks: dict[str, float] = {}
    while "first piece" not in marks and time.perf_counter() - t0 < 10:
        ses.wait_for_alert(100)
        for a in ses.pop_alerts():
            t = time.perf_counter() - t0
            if isinstance(a, lt.torrent_checked_alert) and "checked" not in marks:
                marks["checked"] = t
                h.connect_peer(seeder)
                if mode == "resumed":
                    h.resume()
            elif isinstance(a, lt.peer_connect_alert) and "connect" not in marks:
                marks["connect"] = t
            elif isinstance(a, lt.piece_finished_alert) and "first piece" not in marks:
                marks["first piece"] = t
    del ses
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=64)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hfswarm-lt-connect-"))
    try:
        blob = work / "seed" / "blob"
        blob.parent.mkdir()
        blob.write_bytes(os.urandom(args.size_mib << 20))
        tor = create_v2_torrent_blocking(blob, 1 << 20)
        seed = lt.session(SwarmSettings(listen_host="127.0.0.5", listen_port=0).to_libtorrent())
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(lt.bdecode(tor))
        atp.save_path = str(blob.parent)
        atp.flags |= lt.torrent_flags.seed_mode
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        seed.add_torrent(atp)
        time.sleep(0.3)
        seeder = ("127.0.0.5", seed.listen_port())
        res: dict[str, list[dict[str, float]]] = {"running": [], "resumed": []}
        for r in range(args.rounds):
            for mode in res:
                res[mode].append(one(tor, work / "dl", seeder, mode))
            print(
                f"  round {r + 1}: "
                + ", ".join(
                    f"{m} connect {v[-1].get('connect', -1):.3f} s "
                    f"first piece {v[-1].get('first piece', -1):.3f} s"
                    for m, v in res.items()
                ),
                flush=True,
            )
        print(f"\n| after the add, median of {args.rounds} | connected s | first piece s |")
        print("|---|---|---|")
        for mode, runs in res.items():
            conn = statistics.median(x.get("connect", 10.0) for x in runs)
            first = statistics.median(x.get("first piece", 10.0) for x in runs)
            print(f"| {mode} | {conn:.3f} | {first:.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
