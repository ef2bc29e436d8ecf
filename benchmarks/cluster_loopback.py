"""Cluster mode vs open mode on loopback: one agent-to-agent transfer of a 1-file repo,
side by side, interleaved (open, cluster, open, cluster, ...), median of N; and the
cost of one mutual-TLS handshake to a member's peer API (vs a plain TCP connect).

    python benchmarks/cluster_loopback.py --size 1GiB --runs 3
    python benchmarks/cluster_loopback.py --size 1GiB --runs 3 --pin

Three modes: ``open`` (plain peer API and BitTorrent), ``cluster`` (the peer API over
mutual TLS, the blob over the seeder's member blob stream: threaded mutual TLS), and
``cluster-swarm`` (a cluster seeder with ``--member-streams 0``: the blob as SSL torrents,
libtorrent rooted in the cluster CA, which is what members fall back to when the
stream is busy). Every process listens on 127.0.0.x; nothing leaves the machine.

Each run also prints a time line of the download, from the downloader agent's debug
log: CLI started, revision resolved (the mirror answered), torrent added (swarming),
first piece, last piece, whole-file hash verified, CLI done; the medians per mode come
last, so a constant cost (start-up, handshakes) and a per-byte one (the piece stream)
can be told apart by running two sizes.

``--pin`` runs each seeder on CPU 0 and the downloader (agent and CLI) on CPU 1
(taskset), as two hosts of a LAN would each have their own CPU: on loopback without
it, both ends of the one link, and the encryption and decryption of every byte, share
the same cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
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
from swarm_loopback import EXE, REPO, Agent, start_mirror

from peer.cli.demo import loopback_agent_command
from peer.cluster.credentials import ClusterDir, load_member
from peer.cluster.tls import Cluster

# Downloader debug-log lines that mark the stages of a download (the first of each).
STAGES = (
    ("resolved", "/revision/"),
    ("torrent added", ": swarming "),
    ("stream started", ": member stream from "),
    ("stream verified", "over a member stream, verified"),
    ("first piece", ": first piece"),
    ("last piece", ": all pieces had"),
    ("verified", ": whole-file hash matched"),
)


class ModeAgent(Agent):
    """swarm_loopback's agent, with extra flags (``--cluster FILE``), optionally pinned
    to one CPU together with the `download` CLI it runs."""

    def __init__(
        self,
        root: Path,
        ip: str,
        mirror: str,
        peers: list[str],
        extra: list[str],
        cpu: int | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.ip = ip
        self.pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.log = open(root / "agent.log", "wb")
        self.proc = subprocess.Popen(
            [*self.pin, *loopback_agent_command(root, ip, mirror, peers, *extra)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        self.info = json.loads(self.proc.stdout.readline())
        self.started_at = 0.0  # epoch seconds of the last `download`

    def download(self) -> float:
        self.started_at = time.time()
        t0 = time.perf_counter()
        subprocess.run(
            [*self.pin, *EXE, "download", REPO, "--agent", self.url, "--quiet"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - t0

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the agent used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def timeline(self, took: float) -> dict[str, float]:
        """Seconds from the CLI's start to each stage (`STAGES`) and to its end."""
        self.log.flush()
        out: dict[str, float] = {}
        for line in (self.root / "agent.log").read_text(errors="replace").splitlines():
            for name, mark in STAGES:
                if name not in out and mark in line:
                    at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                    out[name] = round(at.timestamp() - self.started_at, 3)
        out["CLI done"] = round(took, 3)
        return out


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
    ap.add_argument(
        "--pin", action="store_true", help="seeders on CPU 0, the downloader on CPU 1 (taskset)"
    )
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-cluster-bench-"))
    ca = ClusterDir(work / "ca")
    if not ca.ca_key.exists():
        ca.init("bench")
    creds = {n: work / f"{n}.pem" for n in ("seed", "seed2", "down", "probe")}
    for n, p in creds.items():
        ca.enroll(n, p)
    folder = work / f"repo-{size}"
    make_repo(folder, size)
    mirror, url = start_mirror(folder)
    seed_cpu, down_cpu = (0, 1) if args.pin else (None, None)
    seeders = {
        "open": ModeAgent(work / "seed-open", "127.0.0.2", url, [], [], seed_cpu),
        "cluster": ModeAgent(
            work / "seed-cluster",
            "127.0.0.3",
            url,
            [],
            ["--cluster", str(creds["seed"])],
            seed_cpu,
        ),
        "cluster-swarm": ModeAgent(
            work / "seed-cluster-swarm",
            "127.0.0.5",
            url,
            [],
            ["--cluster", str(creds["seed2"]), "--member-streams", "0"],
            seed_cpu,
        ),
    }
    times: dict[str, list[float]] = {m: [] for m in seeders}
    lines: dict[str, list[dict[str, float]]] = {m: [] for m in seeders}
    # CPU seconds of one download: the seeder, the downloader agent, the CLI. Less
    # swayed than wall time by what else runs on the machine.
    cpus: dict[str, list[dict[str, float]]] = {m: [] for m in seeders}
    # Rounds where the downloader fell back to the mirror (a piece stalled): not a pure
    # peer transfer, so reported, not hidden; a crash would lose the other rounds.
    mirror_used: dict[str, list[tuple[int, int]]] = {m: [] for m in seeders}
    load = [os.getloadavg()[0]]
    try:
        for s in seeders.values():
            s.download()
        for r in range(args.runs):
            for mode, seeder in seeders.items():
                extra = ["--log-level", "debug"]  # the time line's marks
                if mode != "open":
                    extra += ["--cluster", str(creds["down"])]
                d = ModeAgent(
                    work / f"d-{mode}-{r}", "127.0.0.4", url, [seeder.peer], extra, down_cpu
                )
                try:
                    s0, a0 = seeder.cpu_s(), d.cpu_s()
                    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    times[mode].append(d.download())
                    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu = {
                        "seeder": seeder.cpu_s() - s0,
                        "downloader": d.cpu_s() - a0,
                        "CLI": c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime,
                    }
                    cpu = {k: round(v, 2) for k, v in cpu.items()}
                    cpus[mode].append({**cpu, "total": round(sum(cpu.values()), 2)})
                    lines[mode].append(d.timeline(times[mode][-1]))
                    print(f"    {mode:13}  " + timeline_row(lines[mode][-1]), flush=True)
                    print(f"    {mode:13}  CPU s: " + timeline_row(cpus[mode][-1]), flush=True)
                    st = d.status()
                    if st["bytes_from_mirror"]:
                        mirror_used[mode].append((r + 1, st["bytes_from_mirror"]))
                        print(f"    {mode:13}  the mirror gave {st['bytes_from_mirror']} bytes")
                    assert st["mode"] == mode.split("-")[0]
                finally:
                    d.stop()
                    shutil.rmtree(d.root)
            print(f"  run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
            load.append(os.getloadavg()[0])
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
        "cluster_swarm_over_open": med["cluster-swarm"] / med["open"],
        "timeline_median_s": {k: median_timeline(v) for k, v in lines.items()},
        "stage_median_s": {k: median_timeline([stages(r) for r in v]) for k, v in lines.items()},
        "cpu_median_s": {k: median_timeline(v) for k, v in cpus.items()},
        "cpu_total_cluster_over_open": (
            statistics.median(c["total"] for c in cpus["cluster"])
            / statistics.median(c["total"] for c in cpus["open"])
        ),
        "cpu_total_cluster_swarm_over_open": (
            statistics.median(c["total"] for c in cpus["cluster-swarm"])
            / statistics.median(c["total"] for c in cpus["open"])
        ),
        "mirror_used_rounds_bytes": mirror_used,
        "pinned": args.pin,
        "load_1min": load,
        "handshake": hs,
        "ssl": ssl.OPENSSL_VERSION,
    }
    print(json.dumps(out, indent=1))
    print("\nmedian time line (s from the CLI's start):")
    for mode, v in out["timeline_median_s"].items():
        print(f"  {mode:13}  " + timeline_row(v))
    print(
        "median time per stage (s; the piece stream is first piece -> last piece, or "
        "stream started -> stream verified):"
    )
    for mode, v in out["stage_median_s"].items():
        print(f"  {mode:13}  " + timeline_row(v))
    print("median CPU seconds of one download:")
    for mode, v in out["cpu_median_s"].items():
        print(f"  {mode:13}  " + timeline_row(v))
    print(
        f"\nmedian of {args.runs}: open {med['open']:.2f} s, cluster {med['cluster']:.2f} s "
        f"({out['cluster_over_open']:.2f}x), cluster-swarm {med['cluster-swarm']:.2f} s "
        f"({out['cluster_swarm_over_open']:.2f}x); TLS handshake "
        f"{hs.get('tls_ms', 0):.2f} ms (TCP {hs.get('tcp_ms', 0):.2f})"
    )
    for mode, used in mirror_used.items():
        if used:
            print(f"{mode}: the mirror gave bytes in round(s) {used} (round, bytes)")


def timeline_row(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in t.items())


def stages(t: dict[str, float]) -> dict[str, float]:
    """The time line as durations: from each mark to the next one."""
    out, prev, at = {}, "CLI start", 0.0
    for k, v in t.items():
        out[f"{prev} -> {k}"] = round(v - at, 3)
        prev, at = k, v
    return out


def median_timeline(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in runs[0] if all(k in r for r in runs)] if runs else []
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}


if __name__ == "__main__":
    main()
