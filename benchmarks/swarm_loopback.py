"""Swarm benchmark on loopback: agent-to-agent transfer vs curl from the mirror.

Side by side in one run, N rounds, median reported:
  1. curl of the blob from the project's mirror to disk (the reference rate);
  2. 1 seeder -> 1 downloader: `hfswarm download --agent` on a fresh agent;
  3. 1 seeder -> 4 downloaders at once (all done vs the single-downloader time);
and each agent's peak RSS (VmHWM), with a 4 GiB transfer for the memory figure.

    python benchmarks/swarm_loopback.py --size 1GiB --runs 5 --rss-size 4GiB

Every process listens on 127.0.0.x; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import make_repo, parse_size

from peer.cli.demo import loopback_agent_command

REPO = "bench/one-file"
EXE = [sys.executable, "-m", "peer.cli.main"]


class Agent:
    def __init__(self, root: Path, ip: str, mirror: str, peers: list[str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        cmd = loopback_agent_command(root, ip, mirror, peers)
        self.root = root
        self.ip = ip
        self.log = open(root / "agent.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        self.info = json.loads(self.proc.stdout.readline())

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.info['local_port']}"

    @property
    def peer(self) -> str:
        return f"{self.ip}:{self.info['peer_port']}"

    def download(self) -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [*EXE, "download", REPO, "--agent", self.url, "--quiet"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - t0

    def peak_rss_mb(self) -> float:
        return self.mem()["VmHWM"]

    def mem(self) -> dict[str, float]:
        """VmHWM (peak RSS), and RssAnon / RssFile now, in MB. libtorrent maps the
        files it serves, so RSS counts page-cache pages of the blob (RssFile, the
        kernel reclaims them); RssAnon is the agent's own heap."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
        return out

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/v1/status") as r:
            return json.load(r)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class MemSampler:
    """Samples the agents' RssAnon every 50 ms in a thread; `stop` gives the peak (MB)."""

    def __init__(self, agents: list[Agent]) -> None:
        self.agents = agents
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for a in self.agents:
                with contextlib.suppress(OSError):
                    self.peak = max(self.peak, a.mem().get("RssAnon", 0.0))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def start_mirror(folder: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*EXE, "mirror", "serve", "--listen", "127.0.0.1:0", f"model:{REPO}={folder}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def curl(url: str, out: Path) -> float:
    meta = json.load(urllib.request.urlopen(f"{url}/api/models/{REPO}/revision/main"))
    t0 = time.perf_counter()
    subprocess.run(
        ["curl", "-sSf", "-o", str(out), f"{url}/{REPO}/resolve/{meta['sha']}/model.safetensors"],
        check=True,
    )
    return time.perf_counter() - t0


def run(size: int, runs: int, work: Path, fanout: int) -> dict:
    folder = work / f"repo-{size}"
    make_repo(folder, size)
    mirror, url = start_mirror(folder)
    seeder = Agent(work / "seeder", "127.0.0.2", url, [])
    try:
        seeder.download()  # the seeder takes the model from the mirror once
        res: dict[str, list[float]] = {"curl": [], "1->1": [], f"1->{fanout}": []}
        rss: list[float] = []
        anon: list[float] = []
        for r in range(runs):
            out = work / "curl.out"
            res["curl"].append(curl(url, out))
            out.unlink()
            d = Agent(work / f"d-{r}", "127.0.0.3", url, [seeder.peer])
            sampler = MemSampler([d, seeder])
            res["1->1"].append(d.download())
            anon.append(sampler.stop())
            assert d.status()["bytes_from_mirror"] == 0, "a peer download touched the mirror"
            rss.append(d.peak_rss_mb())
            d.stop()
            shutil.rmtree(d.root)
            many = [
                Agent(work / f"m-{r}-{i}", f"127.0.0.{10 + i}", url, [seeder.peer])
                for i in range(fanout)
            ]
            t0 = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [*EXE, "download", REPO, "--agent", a.url, "--quiet"], stdout=subprocess.DEVNULL
                )
                for a in many
            ]
            for p in procs:
                assert p.wait() == 0
            res[f"1->{fanout}"].append(time.perf_counter() - t0)
            rss.extend(a.peak_rss_mb() for a in many)
            for a in many:
                a.stop()
                shutil.rmtree(a.root)
            print(
                f"  run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in res.items()),
                flush=True,
            )
        rss.append(seeder.peak_rss_mb())
    finally:
        seeder.stop()
        mirror.send_signal(signal.SIGTERM)
        mirror.wait()
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "size": size,
        "median_s": med,
        "runs_s": res,
        "peak_rss_mb": max(rss),
        "peak_anon_mb": max(anon),
        "rate_vs_curl": med["curl"] / med["1->1"],
        "fanout_vs_single": med[f"1->{fanout}"] / med["1->1"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fanout", type=int, default=4)
    ap.add_argument("--rss-size", default="4GiB", help="blob size for the memory run")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-swarm-bench-"))
    size = parse_size(args.size)
    print(f"blob {size} bytes, {args.runs} runs, work {work}")
    a = run(size, args.runs, work, args.fanout)
    print(json.dumps(a, indent=1))
    print(f"\n| {size / (1 << 30):.2f} GiB, median of {args.runs} | seconds | MB/s |")
    print("|---|---|---|")
    for k, v in a["median_s"].items():
        print(f"| {k} | {v:.2f} | {size / v / 1e6:.0f} |")
    print(
        f"\nswarm 1->1 rate / curl rate: {a['rate_vs_curl']:.2f}; "
        f"1->{args.fanout} time / 1->1 time: {a['fanout_vs_single']:.2f}; "
        f"peak agent RSS {a['peak_rss_mb']:.0f} MB (anonymous {a['peak_anon_mb']:.0f} MB)"
    )
    if args.rss_size and parse_size(args.rss_size) != size:
        big = parse_size(args.rss_size)
        b = run(big, 1, work, args.fanout)
        print(
            f"\n{big / (1 << 30):.1f} GiB run: 1->1 {b['median_s']['1->1']:.1f} s, "
            f"1->{args.fanout} {b['median_s'][f'1->{args.fanout}']:.1f} s, "
            f"peak agent RSS {b['peak_rss_mb']:.0f} MB (anonymous {b['peak_anon_mb']:.0f} MB)"
        )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main()
