"""Cluster mode vs open mode on loopback: one agent-to-agent transfer of a 1-file repo,
side by side, interleaved (open, cluster, open, cluster, ...), median of N; and the
cost of one mutual-TLS handshake to a member's peer API (vs a plain TCP connect).

    python benchmarks/cluster_loopback.py --size 1GiB --runs 3

In cluster mode the pieces travel as SSL torrents (libtorrent, rooted in the cluster
CA) and the peer API over mutual TLS; in open mode both are plain. Every process
listens on 127.0.0.x; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import make_repo, parse_size
from swarm_loopback import Agent, start_mirror

from peer.cli.demo import loopback_agent_command
from peer.cluster.credentials import ClusterDir, load_member
from peer.cluster.tls import Cluster

EXE = [sys.executable, "-m", "peer.cli.main"]


class ModeAgent(Agent):
    """swarm_loopback's agent, with extra flags (``--cluster FILE``)."""

    def __init__(
        self, root: Path, ip: str, mirror: str, peers: list[str], extra: list[str]
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.ip = ip
        self.log = open(root / "agent.log", "wb")
        self.proc = subprocess.Popen(
            loopback_agent_command(root, ip, mirror, peers, *extra),
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        self.info = json.loads(self.proc.stdout.readline())


def handshakes(cluster: Cluster, host: str, port: int, n: int) -> dict[str, float]:
    """Median ms of n fresh connections: TCP connect alone, and connect + TLS 1.3
    mutual handshake with the member certificate."""
    ctx = cluster.client_context()
    tcp, tls = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection((host, port))
        tcp.append(time.perf_counter() - t0)
        s.close()
        t0 = time.perf_counter()
        s = socket.create_connection((host, port))
        w = ctx.wrap_socket(s, server_hostname=None)
        w.do_handshake()
        tls.append(time.perf_counter() - t0)
        w.close()
    return {"tcp_ms": statistics.median(tcp) * 1e3, "tls_ms": statistics.median(tls) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--handshakes", type=int, default=200)
    ap.add_argument("--work", help="work folder (default: a temp dir, removed)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-cluster-bench-"))
    ca = ClusterDir(work / "ca")
    if not ca.ca_key.exists():
        ca.init("bench")
    creds = {n: work / f"{n}.pem" for n in ("seed", "down", "probe")}
    for n, p in creds.items():
        ca.enroll(n, p)
    folder = work / f"repo-{size}"
    make_repo(folder, size)
    mirror, url = start_mirror(folder)
    seeders = {
        "open": ModeAgent(work / "seed-open", "127.0.0.2", url, [], []),
        "cluster": ModeAgent(
            work / "seed-cluster", "127.0.0.3", url, [], ["--cluster", str(creds["seed"])]
        ),
    }
    times: dict[str, list[float]] = {"open": [], "cluster": []}
    try:
        for s in seeders.values():
            s.download()
        for r in range(args.runs):
            for mode, seeder in seeders.items():
                extra = ["--cluster", str(creds["down"])] if mode == "cluster" else []
                d = ModeAgent(work / f"d-{mode}-{r}", "127.0.0.4", url, [seeder.peer], extra)
                try:
                    times[mode].append(d.download())
                    st = d.status()
                    assert st["bytes_from_mirror"] == 0, f"{mode}: the mirror was used"
                    assert st["mode"] == mode
                finally:
                    d.stop()
                    shutil.rmtree(d.root)
            print(f"  run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        probe = Cluster(load_member(creds["probe"]))
        seeder = seeders["cluster"]
        hs = handshakes(probe, seeder.ip, int(seeder.info["peer_port"]), args.handshakes)
    finally:
        for s in seeders.values():
            s.stop()
        mirror.send_signal(signal.SIGTERM)
        mirror.wait()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "size": size,
        "runs_s": times,
        "median_s": med,
        "median_MBps": {k: size / v / 1e6 for k, v in med.items()},
        "cluster_over_open": med["cluster"] / med["open"],
        "handshake": hs,
        "ssl": ssl.OPENSSL_VERSION,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
