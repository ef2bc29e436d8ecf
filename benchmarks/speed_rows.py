"""Every row of the speed issue's table in one run: each benchmark of this folder, one
after another, side by side with other checkouts where the benchmark takes them.

    python benchmarks/speed_rows.py --checkout /tmp/base --runs 3            # all rows
    python benchmarks/speed_rows.py --only swarm_cpu,hf_endpoint --runs 5

Each benchmark runs as its own process from this tree (its rows interleaved and rotated
per round, as that benchmark does), its whole output kept in WORK/<name>.log, and its
markdown tables gathered into WORK/report.md, which is also printed at the end with the
`uptime` load before and after each benchmark (the machine is shared: the load says
how far its figures can be trusted). The `lan` benchmarks need root and network
namespaces; without them they are left out with the reason.

Every process listens on 127.0.0.x or inside network namespaces the benchmarks create.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Row:
    name: str
    what: str  # the row(s) it measures
    argv: Callable[[argparse.Namespace, Path], list[str]]
    needs_netns: bool = False


def _checkouts(args: argparse.Namespace) -> list[str]:
    """``--checkout`` for every other tree and this one (benchmarks that take trees)."""
    return [x for c in [*args.checkout, "."] for x in ("--checkout", c)]


def _others(args: argparse.Namespace) -> list[str]:
    """``--checkout`` for every other tree (benchmarks that always run this one)."""
    return [x for c in args.checkout for x in ("--checkout", c)]


ROWS = [
    Row(
        "swarm_cpu",
        "1 GiB agent -> agent vs two bare sessions; the downloading agent's CPU vs bare",
        lambda a, w: [
            *("swarm_cpu.py", "--size", "1GiB", "--runs", str(a.runs)),
            *(*_checkouts(a), "--work", str(w)),
        ],
    ),
    Row(
        "hf_endpoint",
        "HF_ENDPOINT: snapshot_download of 1 GiB through an agent from a peer vs the mirror",
        lambda a, w: [
            *("hf_endpoint.py", "--size", "1GiB", "--runs", str(a.runs), "--ttfb-runs", "0"),
            *(*_checkouts(a), "--work", str(w)),
        ],
    ),
    Row(
        "hf_endpoint_lan",
        "HF_ENDPOINT on a LAN shape: the same call, mirror, seeder and client each on their "
        "own host, links at 1 Gbit/s and 300 Mbit/s",
        lambda a, w: [
            *("hf_endpoint.py", "--size", "1GiB", "--runs", str(a.runs)),
            *("--lan-rate", "1gbit", "--lan-rate", "300mbit", "--work", str(w)),
        ],
        needs_netns=True,
    ),
    Row(
        "mirror_download",
        "first fetch from the project's mirror, unshaped and capped, vs hf download/aria2c/curl",
        lambda a, w: [
            *("mirror_download.py", "--size", "256MiB", "--runs", str(a.runs), "--cap", "20MB"),
            *(*_others(a), "--work", str(w)),
        ],
    ),
    Row(
        "olah_first_fetch",
        "first fetch through olah, cold and warm, vs hf download and aria2c -x16",
        lambda a, w: ["olah_first_fetch.py", "--runs", str(a.runs), *_others(a), "--work", str(w)],
    ),
    Row(
        "swarm_loopback",
        "1 GiB swarm 1 -> 1 on loopback vs curl of the same file from the mirror",
        lambda a, w: [
            *("swarm_loopback.py", "--size", "1GiB", "--runs", str(a.runs), "--fanout", "4"),
            *("--rss-size", "1GiB", "--work", str(w)),
        ],
    ),
    Row(
        "lan_swarm",
        "100 Mbit/s LAN: 1 -> 1 vs curl, 1 seeder -> 8 hosts vs 1 -> 1, bare libtorrent rows",
        lambda a, w: ["lan_swarm.py", "--runs", str(a.runs), *_checkouts(a), "--work", str(w)],
        needs_netns=True,
    ),
    Row(
        "herd_lan",
        "herd of 4 hosts vs one host alone (simulated LAN, WAN 100 Mbit/s shared)",
        lambda a, w: [
            *("herd_lan.py", "--size", "1GB", "--scenarios", "herd,alone", "--runs", str(a.runs)),
            *("--work", str(w), "--svg-dir", str(w)),
        ],
        needs_netns=True,
    ),
]


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    return None


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _tables(text: str) -> str:
    """The markdown tables (and the line before each) of a benchmark's output."""
    lines = text.splitlines()
    keep: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith("|"):
            if not keep or not keep[-1].startswith("|"):
                if i and lines[i - 1].strip() and not lines[i - 1].startswith("|"):
                    keep.append(lines[i - 1])
            keep.append(line)
        elif keep and keep[-1].startswith("|"):
            keep.append("")
    return "\n".join(keep)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", action="append", default=[], help="another tree to compare")
    ap.add_argument("--runs", type=int, default=3, help="rounds per benchmark (>= 3)")
    ap.add_argument("--only", default=",".join(r.name for r in ROWS))
    ap.add_argument("--work", default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="speed-rows-"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",")
    unknown = set(wanted) - {r.name for r in ROWS}
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; known: {[r.name for r in ROWS]}")
    report = [f"# Speed rows, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    failed = 0
    for row in (r for r in ROWS if r.name in wanted):
        report += [f"## {row.name}: {row.what}", ""]
        why = _netns_missing() if row.needs_netns else None
        if why:
            report += [f"left out: {why}", ""]
            print(f"{row.name}: left out ({why})", flush=True)
            continue
        sub = work / row.name
        sub.mkdir(exist_ok=True)
        argv = [sys.executable, str(HERE / row.argv(args, sub)[0]), *row.argv(args, sub)[1:]]
        before, t0 = _load(), time.monotonic()
        print(f"{row.name}: {' '.join(argv[1:])}", flush=True)
        log = work / f"{row.name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with log.open("w") as out:
            done = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        rc = done.returncode
        took = time.monotonic() - t0
        text = log.read_text(errors="replace")
        report += [
            f"`{' '.join(['python', 'benchmarks/' + argv[1].rsplit('/', 1)[-1], *argv[2:]])}`",
            f"({took:.0f} s, load {before} before, {_load()} after, exit {rc}; log {log})",
            "",
            _tables(text) or "(no table: see the log)",
            "",
        ]
        if rc:
            failed += 1
            report += ["last lines of the log:", "```", *text.splitlines()[-15:], "```", ""]
        print(f"{row.name}: exit {rc} in {took:.0f} s", flush=True)
    (work / "report.md").write_text("\n".join(report))
    print("\n".join(report))
    print(f"report: {work / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
