"""Cluster mode vs open mode between two hosts of a simulated LAN (network namespaces
over veth pairs and a bridge, tests/netlab.py; root): cluster_loopback.py's transfer,
with the seeder and the downloader each in its own namespace instead of on loopback.

    python benchmarks/cluster_lan.py --size 1GiB --runs 3
    python benchmarks/cluster_lan.py --size 1GiB --runs 3 --pin

h1 holds the open-mode seeder, h2 the cluster-mode one, h3 a fresh downloader per run
(open, cluster, open, ... interleaved), given the seeder as `--peer`; 0 bytes may come
from the mirror (in its own namespace behind the router). Links are unshaped: the
namespaces still share this machine's CPUs, so `--pin` puts the seeders on CPU 0 and
the downloader agent and its CLI on CPU 1 (taskset), as two LAN hosts would each have
their own CPU. Also counted: the packets the downloader's LAN port received per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import netlab  # noqa: E402
from mirror_download import make_repo, parse_size  # noqa: E402
from swarm_loopback import REPO  # noqa: E402

from peer.cluster.credentials import ClusterDir  # noqa: E402


def pin(a: netlab.AgentProc, cpu: int | None) -> None:
    """Every thread of the agent on one CPU (threads it starts later inherit it)."""
    if cpu is not None:
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(a.proc.pid)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip


def rx_packets(a: netlab.AgentProc) -> int:
    """Packets the host's LAN port (eth0) has received so far."""
    done = a.host.run(["cat", "/proc/net/dev"])
    for line in done.stdout.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "eth0":
            return int(rest.split()[1])
    raise RuntimeError(f"no eth0 on {a.host.name}")


def download(a: netlab.AgentProc, cpu: int | None) -> float:
    cmd = a.download_cmd(REPO)
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    t0 = time.perf_counter()
    subprocess.run(a.host.wrap(cmd), env=a.env, check=True, stdout=subprocess.DEVNULL,
                   timeout=600)  # fmt: skip
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--work", help="work folder (default: a temp dir, removed)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-cluster-lan-"))
    ca = ClusterDir(work / "ca")
    if not ca.ca_key.exists():
        ca.init("bench")
    creds = {n: work / f"{n}.pem" for n in ("seed", "down")}
    for n, p in creds.items():
        if not p.exists():
            ca.enroll(n, p)
    folder = work / f"repo-{size}"
    make_repo(folder, size)
    seed_cpu, down_cpu = (0, 1) if args.pin else (None, None)
    times: dict[str, list[float]] = {"open": [], "cluster": []}
    packets: dict[str, list[int]] = {"open": [], "cluster": []}  # into the downloader
    load = [os.getloadavg()[0]]
    with netlab.Lan(hosts=3, lan_rate=None, wan_rate=None, wan_rtt_ms=0) as lan:
        mirror = netlab.start_mirror(lan, [f"model:{REPO}={folder}"], work / "mirror")
        seeders = {
            "open": netlab.start_agent(lan, 1, work / "seed-open", mirror.url, mdns=False),
            "cluster": netlab.start_agent(
                lan,
                2,
                work / "seed-cluster",
                mirror.url,
                "--cluster",
                str(creds["seed"]),
                mdns=False,
            ),
        }
        for s in seeders.values():
            pin(s, seed_cpu)
            s.download(REPO, timeout=600)
        for r in range(args.runs):
            for mode, seeder in seeders.items():
                extra = ["--cluster", str(creds["down"])] if mode == "cluster" else []
                peer = f"{seeder.ip}:{seeder.info['peer_port']}"
                root = work / f"d-{mode}-{r}"
                d = netlab.start_agent(lan, 3, root, mirror.url, *extra, mdns=False, peers=[peer])
                try:
                    pin(d, down_cpu)
                    rx0 = rx_packets(d)
                    times[mode].append(download(d, down_cpu))
                    packets[mode].append(rx_packets(d) - rx0)
                    st = d.status()
                    assert st["bytes_from_mirror"] == 0, f"{mode}: the mirror was used"
                    assert st["mode"] == mode
                finally:
                    d.stop()
                    shutil.rmtree(root)
            load.append(os.getloadavg()[0])
            print(
                f"  run {r + 1}: "
                + ", ".join(
                    f"{k} {v[-1]:.2f} s ({packets[k][-1]} packets)" for k, v in times.items()
                )
            )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "size": size,
        "pinned": args.pin,
        "runs_s": times,
        "median_s": med,
        "median_MBps": {k: size / v / 1e6 for k, v in med.items()},
        "cluster_over_open": med["cluster"] / med["open"],
        "rx_packets": packets,
        "load_1min": load,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
