"""HF_ENDPOINT mode benchmark on loopback.

Side by side in one run, N rounds (interleaved, the order rotated each round), median
reported:
  1. `snapshot_download` of the repo straight from the project's mirror;
  2. the same call with the endpoint at a fresh agent whose one peer holds the repo
     (the bytes come from the peer; the mirror answers metadata only), one row per
     ``--checkout`` (the agent's code from that tree; default: this one);
then the time to first byte of a large shard through the endpoint when only a peer
holds it (a plain GET; the agent starts the swarm and streams what is verified).

    python benchmarks/hf_endpoint.py --size 1GiB --runs 5 --ttfb-size 4GiB --ttfb-runs 3
    python benchmarks/hf_endpoint.py --size 1GiB --runs 5 --ttfb-runs 0 \
        --checkout /tmp/base --checkout . [--held] [--nice N] [--timeline [N]]

Every row reports the CPU seconds of each process during the call: the client, the
downloading agent, the seeder, the mirror server. ``--held``: after each agent's call,
one more (a fresh client cache) from the same agent, which now holds the blob: the
client reading a complete blob from the agent, against the mirror row. ``--nice N``: one
more row per checkout with both agents' threads at nice N. A round whose agent took
bytes from the mirror (the swarm stalled) is reported, and that agent's log kept.

What the client spends its CPU on (docs/benchmarks.md 8.29):

    python benchmarks/hf_endpoint.py --size 1GiB --runs 4 --ttfb-runs 0 --held --syscalls \
        --beside cpu --beside memcpy --beside pagecache
    python benchmarks/hf_endpoint.py --size 1GiB --runs 3 --ttfb-runs 0 --held --profile \
        --beside cpu --beside memcpy --beside pagecache

``--syscalls``: the client under `perf stat` (its system calls by kind, user and system
CPU, context switches); ``--profile``: under `perf record` instead (its CPU in the
page-cache write of its own file, the socket receive copy, page zeroing, memmove).
``--beside KIND``: the mirror row again with one process beside the client keeping a core
busy: a bare loop (cpu), a 64 MiB memory copy over and over (memcpy), or 1 GiB files
written into the page cache as libtorrent writes a blob (pagecache).

Every process listens on 127.0.0.x; nothing leaves the machine. Except with
``--lan-rate RATE`` (repeatable; root): the rows instead run on a simulated LAN
(tests/netlab.py), the mirror, the seeder agent and the client with its agent each on
their own host, every link shaped to RATE both ways:

    python benchmarks/hf_endpoint.py --size 1GiB --runs 5 --lan-rate 1gbit --lan-rate 300mbit
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import make_repo, parse_size
from swarm_cpu import Agent as CheckoutAgent
from swarm_cpu import cpu_of, threads_cpu, wakeups
from swarm_loopback import REPO, Agent, start_mirror

CLIENT = """
import json, resource, sys, time
from huggingface_hub import snapshot_download
t0 = time.perf_counter()
snapshot_download(sys.argv[1], endpoint=sys.argv[2], cache_dir=sys.argv[3], token=False)
took = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"s": took, "user": ru.ru_utime, "sys": ru.ru_stime,
                  "vcsw": ru.ru_nvcsw, "ivcsw": ru.ru_nivcsw, "minflt": ru.ru_minflt}))
"""
# `--syscalls`: the client runs under `perf stat`, counting these (kernel tracepoints: a
# count costs next to nothing, unlike strace, which would slow every call it counts).
SYSCALLS = ("recvfrom", "poll", "write", "read", "openat")
PERF_EVENTS = ",".join(f"syscalls:sys_enter_{c}" for c in SYSCALLS)
# `--profile`: the client under `perf record` (cpu-clock, PROFILE_HZ), and the CPU seconds
# it spent in these functions (kernel ones named by what the client does in them).
PROFILE_HZ = 1000
PROFILED = {
    "copy_folio_from_iter_atomic": "write: copy into its file's page cache",
    "clear_page_erms": "zeroing new pages",
    "_copy_to_iter": "recvfrom: copy out of the socket",
    "__memmove_avx512_unaligned_erms": "memmove in user space (httpx joining reads)",
}


# The same call, timed inside the client (wall clock, to line up with the agent's debug
# log): the shard's GET sent, its first and last body chunk written, and the client's CPU.
# httpx hands the body over in 10 MiB chunks, so "first chunk" is 10 MiB in.
TIMED_CLIENT = """
import json, resource, sys, time
from huggingface_hub import file_download, snapshot_download
marks = {}
plain = file_download.http_get
class Timed:
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        marks.setdefault("client: first 10 MiB written", time.time())
        self.n += len(b)
        if self.n >= 512 << 20:
            marks.setdefault("client: 512 MiB written", time.time())
        return self.f.write(b)
    def __getattr__(self, k):
        return getattr(self.f, k)
def http_get(url, temp_file, **kw):
    if not url.endswith(".safetensors"):
        return plain(url, temp_file, **kw)
    marks["client: GET sent"] = time.time()
    plain(url, Timed(temp_file), **kw)
    marks["client: last byte written"] = time.time()
file_download.http_get = http_get
snapshot_download(sys.argv[1], endpoint=sys.argv[2], cache_dir=sys.argv[3], token=False)
marks["client: done"] = time.time()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"marks": marks, "cpu": ru.ru_utime + ru.ru_stime}))
"""
# Lines of the downloading agent's debug log that mark the shard's swarm download.
AGENT_MARKS = {
    "swarming": "agent: swarm started",
    "first piece": "agent: first piece",
    "all pieces had": "agent: last piece",
    "whole-file hash matched": "agent: whole-file hash matched",
}
# The agent's line at the end of a streamed answer (peer.serving.hub_api).
STREAMED = re.compile(
    r": streamed (\d+) bytes in ([\d.]+) s, ([\d.]+) s of it waiting"
    r"[^(]*(?:\((\d+) waits, (\d+) sends\))?"
)


def renice(pid: int, nice: int) -> None:
    """Every thread of `pid` at `nice` (Linux's nice is per thread; a thread a process
    starts later inherits its creator's, as under `nice -n`)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


class Procs:
    """CPU seconds of the long-lived processes during one call (`delta` after `mark`)."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self.start = {k: cpu_of(p) for k, p in pids.items()}

    def delta(self) -> dict[str, float]:
        return {k: round(cpu_of(p) - self.start[k], 2) for k, p in self.pids.items()}


def timeline(
    label: str, endpoint: str, cache: Path, procs: Procs, agent: CheckoutAgent | None
) -> None:
    """One more call (through `agent`, or the mirror without), printed as a time line
    (s after the shard's GET) with the CPU seconds of every process during it."""
    out = subprocess.run(
        [sys.executable, "-c", TIMED_CLIENT, REPO, endpoint, str(cache)],
        check=True,
        capture_output=True,
        text=True,
    )
    cpu = procs.delta()
    shutil.rmtree(cache, ignore_errors=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    marks: dict[str, float] = dict(got["marks"])
    hashed = waited = "?"
    for line in agent.log_path.read_text(errors="replace").splitlines() if agent else []:
        stamp, _, rest = line.partition(" DEBUG peer.agent.fetch: model.safetensors: ")
        for key, name in AGENT_MARKS.items():
            if rest.startswith(key) and name not in marks:
                when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
                marks[name] = when.timestamp()
        if rest.startswith("all pieces had (hashed "):  # the whole-file hash's position
            hashed = f"{int(rest.split()[-1].rstrip(')')) / 1e6:.0f} MB"
        if m := STREAMED.search(line):
            waited = f"{float(m[3]):.2f} s of {float(m[2]):.2f} s"
    t0 = marks["client: GET sent"]
    print(f"\ntime line, {label} (s after the GET):")
    for name, t in sorted(marks.items(), key=lambda kv: kv[1]):
        print(f"  {t - t0:7.3f}  {name}")
    print(f"  CPU s during the call: client {got['cpu']:.2f}, " + _cpu_text(cpu))
    if agent is not None:
        print(
            f"  at the last piece the whole-file hash had read {hashed}; the streamed "
            f"answer waited for checked bytes {waited}"
        )


PROCS = ("client", "agent", "seeder", "mirror")

# `--beside KIND`: the mirror row again with one process beside the client that keeps a
# core busy, each kind in another way, to tell which of what the swarm does beside the
# client slows it: taking a core (cpu), copying memory that stays put (memcpy: 64 MiB
# over and over), or writing new files into the page cache as libtorrent does (pagecache:
# 1 GiB files of 1 MiB writes, each unlinked when written). Its CPU is the "agent" column.
BURNERS = {
    "cpu": "while True: pass",
    "memcpy": "a = bytearray(64 << 20)\nb = bytearray(64 << 20)\nwhile True: b[:] = a",
    "pagecache": (
        "import os, sys\nblock = os.urandom(1 << 20)\nwhile True:\n"
        "    with open(sys.argv[1], 'wb') as f:\n"
        "        for _ in range(1024): f.write(block)\n"
        "    os.unlink(sys.argv[1])"
    ),
}


def cpu_col(rows: list[dict[str, float]], name: str) -> list[float]:
    return [r[name] for r in rows]


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())


def perf_stat(cmd: list[str], out: Path) -> list[str]:
    """`cmd` under `perf stat`, counting `SYSCALLS` into `out`."""
    return ["perf", "stat", "-x", ",", "-o", str(out), "-e", PERF_EVENTS, "--", *cmd]


def read_counts(stat: Path, got: dict[str, float], into: dict[str, float]) -> None:
    """The system-call counts `perf_stat` wrote, and the client's own figures."""
    for line in stat.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_"):
            into[fields[2].removeprefix("syscalls:sys_enter_")] = float(fields[0])
    into.update({k: got[k] for k in ("user", "sys", "vcsw", "ivcsw", "minflt")})


def snapshot(
    endpoint: str,
    cache: Path,
    syscalls: dict[str, float] | None = None,
    profile: dict[str, float] | None = None,
) -> tuple[float, float]:
    """Seconds spent in snapshot_download (a fresh client process and cache), and the
    client process's CPU seconds. `syscalls`: the client under `perf stat`, filled with
    its system-call counts (`SYSCALLS`), its user and system CPU seconds and context
    switches (voluntary: it waited for the socket; involuntary: another took the core).
    `profile`: the client under `perf record` instead, filled with its CPU seconds in
    each of `PROFILED` and in all ("sampled")."""
    cmd = [sys.executable, "-c", CLIENT, REPO, endpoint, str(cache)]
    stat = cache.parent / "perf-stat.csv"
    data = cache.parent / "perf.data"
    if profile is not None:
        hz = str(PROFILE_HZ)
        cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", hz, "-o", str(data), "--", *cmd]
    elif syscalls is not None:
        cmd = perf_stat(cmd, stat)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if profile is not None:
        report = subprocess.run(
            [
                "perf",
                "report",
                "-i",
                str(data),
                "--no-children",
                "--sort",
                "sym",
                "-n",
                "-q",
                "-g",
                "none",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        total = 0
        for line in report.splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[1].isdigit():
                total += int(fields[1])
                if fields[-1] in PROFILED:
                    profile[fields[-1]] = int(fields[1]) / PROFILE_HZ
        profile["sampled"] = total / PROFILE_HZ
        data.unlink()
    if syscalls is not None and profile is None:
        read_counts(stat, got, syscalls)
    return float(got["s"]), got["user"] + got["sys"]


def ttfb(endpoint: str, mirror: str) -> float:
    """Seconds from sending a GET of the shard to holding its first body byte."""
    meta = json.load(urllib.request.urlopen(f"{mirror}/api/models/{REPO}/revision/main"))
    url = f"{endpoint}/{REPO}/resolve/{meta['sha']}/model.safetensors"
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        first = r.read(1)
        took = time.perf_counter() - t0
    assert first, "no body"
    return took


def setup(size: int, work: Path) -> tuple[subprocess.Popen[str], str, Agent]:
    folder = work / f"repo-{size}"
    make_repo(folder, size)
    mirror, url = start_mirror(folder)
    seeder = Agent(work / f"seeder-{size}", "127.0.0.2", url, [])
    seeder.download()  # the peer takes the model from the mirror once
    return mirror, url, seeder


def teardown(mirror: subprocess.Popen[str], seeder: Agent) -> None:
    seeder.stop()
    shutil.rmtree(seeder.root, ignore_errors=True)
    mirror.send_signal(signal.SIGTERM)
    mirror.wait()


def rows_table(
    title: str,
    res: dict[str, list[float]],
    cpu: dict[str, list[dict[str, float]]],
    mirror_s: float,
) -> None:
    """The rows' table: median seconds, against the mirror's, and each process's CPU."""
    head = "CPU s (median): client | agent | seeder | mirror"
    print(f"\n| {title} | s | vs mirror | {head} | runs (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for k, times in res.items():
        if not times:
            continue
        v = statistics.median(times)
        per = {p: statistics.median(cpu_col(cpu[k], p)) for p in cpu[k][0]}
        cols = " | ".join(f"{per[p]:.2f}" if p in per else "-" for p in PROCS)
        runs = ", ".join(f"{x:.2f}" for x in times)
        print(f"| {k} | {v:.2f} | {v / mirror_s:.2f}x | {cols} | {runs} |")


def syscall_table(calls: dict[str, list[dict[str, float]]], size: int) -> None:
    """The client's system calls and CPU per row (medians over the rounds)."""
    print(
        "\n| the client, median per call | recvfrom | KiB per recvfrom | poll | write | "
        "read | user CPU s | system CPU s | voluntary / involuntary switches | minor faults |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, got in calls.items():
        if not got:
            continue
        med = {k: statistics.median(g[k] for g in got) for k in got[0]}
        print(
            f"| {row} | {med['recvfrom']:.0f} | {size / max(med['recvfrom'], 1) / 1024:.0f} | "
            f"{med['poll']:.0f} | {med['write']:.0f} | {med['read']:.0f} | {med['user']:.2f} | "
            f"{med['sys']:.2f} | {med['vcsw']:.0f} / {med['ivcsw']:.0f} | {med['minflt']:.0f} |"
        )


def profile_table(profiles: dict[str, list[dict[str, float]]]) -> None:
    """Where the client's CPU went per row (medians over the rounds, `perf record`)."""
    names = list(PROFILED)
    head = " | ".join(f"{PROFILED[n]} (`{n}`)" for n in names)
    print(f"\n| the client, CPU s, median per call | sampled | {head} |")
    print("|---|---|" + "---|" * len(names))
    for row, got in profiles.items():
        if got:
            med = {k: statistics.median(g.get(k, 0.0) for g in got) for k in ["sampled", *names]}
            cols = " | ".join(f"{med[n]:.2f}" for n in names)
            print(f"| {row} | {med['sampled']:.2f} | {cols} |")


def lan_rows(
    rate: str, checkouts: list[Path], size: int, runs: int, work: Path, syscalls: bool = False
) -> dict[str, list[float]]:
    """The same calls on a simulated LAN (tests/netlab.py; root): the mirror on its own
    host (netlab's `mir`, its link unshaped by delay: rtt 0), the seeder agent on h2, the
    client and its agent on h1, every host's port and the mirror's link shaped to `rate`
    both ways. Rows: the client on h1 straight from the mirror, and through a fresh agent
    on h1 (one per checkout) whose bytes come from the seeder on h2. `runs` rounds, the
    order rotated each round; the table and each round's CPU seconds printed.
    `syscalls`: the client under `perf stat`, as `--syscalls` on loopback."""
    from herd_lan import agent_status, netlab, stop_all
    from lan_swarm import Checkout, start_agent

    folder = work / f"repo-{size}"
    make_repo(folder, size)
    rows = {str(c): f"agent on h1 from the seeder on h2, {rate} ({c.name or c})" for c in checkouts}
    mirror_row = f"straight from the mirror, {rate}"
    link_row = f"curl of the shard from the mirror, {rate} (the link)"
    res: dict[str, list[float]] = {mirror_row: [], **{n: [] for n in rows.values()}}
    res[link_row] = []
    cpu: dict[str, list[dict[str, float]]] = {n: [] for n in res}
    fell_back: dict[str, list[int]] = {}
    calls: dict[str, list[dict[str, float]]] = {n: [] for n in res}

    def client(lan: Any, endpoint: str, home: Path, row: str) -> dict[str, float]:
        cache = home / "client"
        cmd = [sys.executable, "-c", CLIENT, REPO, endpoint, str(cache)]
        stat = home / "perf-stat.csv"
        if syscalls:
            home.mkdir(parents=True, exist_ok=True)
            cmd = perf_stat(cmd, stat)
        out = lan.host(1).run(cmd, env=netlab.child_env(home / "hf-home"), timeout=900)
        shutil.rmtree(cache, ignore_errors=True)
        got: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        if syscalls:
            calls[row].append({})
            read_counts(stat, got, calls[row][-1])
        return got

    with netlab.Lan(hosts=2, lan_rate=rate, wan_rate=rate, wan_rtt_ms=0) as lan:
        mirror = netlab.start_mirror(lan, [f"model:{REPO}={folder}"], work / f"lan-mirror-{rate}")
        seeder_root = work / f"lan-seeder-{rate}"
        seeder = start_agent(lan, 2, seeder_root, mirror.url, Checkout(checkouts[-1]), mdns=False)
        t0 = time.monotonic()
        lan.host(2).run(seeder.download_cmd(REPO), env=seeder.env, timeout=900)
        print(f"seeder on h2 took the repo in {time.monotonic() - t0:.1f} s", flush=True)
        peer = f"{seeder.ip}:{seeder.info['peer_port']}"
        meta = json.loads(
            lan.host(1)
            .run(["curl", "-sS", "--noproxy", "*", f"{mirror.url}/api/models/{REPO}"])
            .stdout
        )
        shard = f"{mirror.url}/{REPO}/resolve/{meta['sha']}/model.safetensors"
        try:
            for r in range(runs):
                order: list[Path | str | None] = [None, "curl", *checkouts]
                order = order[r % len(order) :] + order[: r % len(order)]
                for k, c in enumerate(order):
                    home = work / f"lan-{r}-{k}"
                    procs = Procs(seeder=seeder.proc.pid, mirror=mirror.proc.pid)
                    if c == "curl":  # one TCP stream of the shard, nothing written
                        argv = ["curl", "-sS", "--fail", "--noproxy", "*", "-o", "/dev/null"]
                        t0 = time.monotonic()
                        lan.host(1).run([*argv, shard], timeout=900)
                        res[link_row].append(time.monotonic() - t0)
                        cpu[link_row].append(procs.delta())
                        continue
                    if c is None:
                        got = client(lan, mirror.url, home, mirror_row)
                        res[mirror_row].append(got["s"])
                        cpu[mirror_row].append(
                            {"client": round(got["user"] + got["sys"], 2), **procs.delta()}
                        )
                        shutil.rmtree(home, ignore_errors=True)
                        continue
                    assert isinstance(c, Path)
                    a = start_agent(lan, 1, home / "agent", mirror.url, Checkout(c),
                                    mdns=False, peers=(peer,), level="debug")  # fmt: skip
                    try:
                        procs = Procs(
                            agent=a.proc.pid, seeder=seeder.proc.pid, mirror=mirror.proc.pid
                        )
                        threads = threads_cpu(a.proc.pid)
                        wakes = wakeups(a.proc.pid)
                        got = client(lan, a.local_url, home, rows[str(c)])
                        spent = {
                            k: round(v - threads.get(k, 0.0), 2)
                            for k, v in threads_cpu(a.proc.pid).items()
                            if v - threads.get(k, 0.0) >= 0.05
                        }
                        print(f"  the agent's threads, CPU s: {spent}", flush=True)
                        print(
                            "  the agent's main thread woke (voluntary switches):"
                            f" {wakeups(a.proc.pid) - wakes}",
                            flush=True,
                        )
                        row = rows[str(c)]
                        res[row].append(got["s"])
                        cpu[row].append(
                            {"client": round(got["user"] + got["sys"], 2), **procs.delta()}
                        )
                        took = int(agent_status(a)["bytes_from_mirror"])
                    finally:
                        stop_all([a.proc])
                    for line in a.log.read_text(errors="replace").splitlines():
                        if m := STREAMED.search(line):
                            print(f"  the streamed answer: {m[0].lstrip(': ')}", flush=True)
                    if took:
                        fell_back.setdefault(row, []).append(took)
                        kept = work / f"lan-fell-back-{r}-{k}.log"
                        shutil.copy(a.log, kept)
                        print(f"  the agent of {c} took {took} bytes from the mirror ({kept})")
                    shutil.rmtree(home, ignore_errors=True)
                print(
                    f"  {rate} run {r + 1}: "
                    + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in res.items() if v),
                    flush=True,
                )
        finally:
            stop_all([seeder.proc, mirror.proc])
    print(json.dumps({"lan_rate": rate, "runs_s": res, "cpu_s": cpu}, indent=1))
    title = f"snapshot_download, {size / (1 << 30):.2f} GiB, links {rate}, median of {runs}"
    rows_table(title, res, cpu, statistics.median(res[mirror_row]))
    if syscalls:
        syscall_table(calls, size)
    for k, bad in fell_back.items():
        print(f"NOT FROM A PEER ALONE: {k}: {len(bad)} round(s) took {bad} bytes from the mirror")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ttfb-size", default="4GiB")
    ap.add_argument("--ttfb-runs", type=int, default=3)
    ap.add_argument("--work", default=None)
    ap.add_argument("--checkout", action="append", default=[], help="repeatable; default .")
    ap.add_argument(
        "--timeline",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="then N timed calls per row (interleaved), printed as time lines",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="one more row per checkout with the downloading agent and the seeder at "
        "this nice value (every thread), as `nice -n N hfswarm agent` would run them",
    )
    ap.add_argument(
        "--held",
        action="store_true",
        help="after each agent's call, one more from it while it holds the blob",
    )
    ap.add_argument(
        "--beside",
        action="append",
        default=[],
        choices=sorted(BURNERS),
        help="repeatable: the mirror row again with this kind of load beside the client",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="the client under `perf record`: its CPU seconds in the kernel's page-cache "
        "write, socket receive copy, page zeroing and user-space memmove, per row "
        "(instead of --syscalls' counts)",
    )
    ap.add_argument(
        "--syscalls",
        action="store_true",
        help="the client under `perf stat`: its system calls, user/system CPU and "
        "context switches per row",
    )
    ap.add_argument(
        "--lan-rate",
        action="append",
        default=[],
        metavar="RATE",
        help="repeatable (tc rate: 1gbit, 300mbit): instead of the loopback rows, the "
        "same calls on a simulated LAN whose links are shaped to RATE (root; netns)",
    )
    args = ap.parse_args()
    if (args.syscalls or args.profile) and shutil.which("perf") is None:
        raise SystemExit("--syscalls and --profile run the client under perf: install it first")
    checkouts = [Path(c).resolve() for c in (args.checkout or ["."])]
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-endpoint-bench-"))
    size = parse_size(args.size)
    print(f"repo {size} bytes, {args.runs} runs, work {work}", flush=True)
    if args.lan_rate:
        from herd_lan import netlab

        if (why := netlab.unavailable_reason()) is not None:
            raise SystemExit(f"--lan-rate: no simulated LAN here: {why}")
        for rate in args.lan_rate:
            print(f"load before the {rate} rows: {os.getloadavg()}", flush=True)
            lan_rows(rate, checkouts, size, args.runs, work, args.syscalls)
            print(f"load after the {rate} rows: {os.getloadavg()}", flush=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        return

    mirror, url, seeder = setup(size, work)
    rows = {str(c): f"agent from a peer ({c.name or c})" for c in checkouts}
    held = {str(c): f"agent holding the blob ({c.name or c})" for c in checkouts}
    niced = {
        str(c): f"agent from a peer, agents at nice {args.nice} ({c.name or c})" for c in checkouts
    }
    names = ["mirror"] + [n for c in checkouts for n in (rows[str(c)], held[str(c)])]
    names += [niced[str(c)] for c in checkouts] if args.nice else []
    names += [f"mirror, beside {kind}" for kind in args.beside]
    res: dict[str, list[float]] = {n: [] for n in names}
    # CPU seconds of each process during the call (the machine may be shared: CPU says
    # what each path costs where wall time is noisy).
    cpu: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    calls: dict[str, list[dict[str, float]]] = {n: [] for n in names}  # --syscalls
    profiles: dict[str, list[dict[str, float]]] = {n: [] for n in names}  # --profile

    def client_call(endpoint: str, row: str) -> tuple[float, float]:
        counted: dict[str, float] | None = {} if args.syscalls else None
        sampled: dict[str, float] | None = {} if args.profile else None
        took, client = snapshot(endpoint, work / "client", counted, sampled)
        if counted is not None:
            calls[row].append(counted)
        if sampled is not None:
            profiles[row].append(sampled)
        return took, client

    def mirror_row(beside: str | None = None) -> None:
        row = "mirror" if beside is None else f"mirror, beside {beside}"
        burner = None
        if beside is not None:
            scratch = work / "burner.bin"
            cmd = [sys.executable, "-c", BURNERS[beside], str(scratch)]
            burner = subprocess.Popen(cmd)
        try:
            pids = {"agent": burner.pid} if burner else {}
            procs = Procs(**pids, seeder=seeder.proc.pid, mirror=mirror.pid)
            took, client = client_call(url, row)
            res[row].append(took)
            cpu[row].append({"client": round(client, 2), **procs.delta()})
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
                (work / "burner.bin").unlink(missing_ok=True)

    fell_back: dict[str, list[int]] = {}  # row -> bytes its agent took from the mirror

    def agent_rows(c: Path, tag: str, nice: int) -> None:
        b = CheckoutAgent(c, work / tag, "127.0.0.3", url, [seeder.peer])
        try:
            renice(b.proc.pid, nice)
            renice(seeder.proc.pid, nice)
            if nice:
                rows_now: tuple[str, ...] = (niced[str(c)],)
            else:
                rows_now = (rows[str(c)], held[str(c)]) if args.held else (rows[str(c)],)
            for row in rows_now:
                procs = Procs(agent=b.proc.pid, seeder=seeder.proc.pid, mirror=mirror.pid)
                took, client = client_call(b.url, row)
                res[row].append(took)
                cpu[row].append({"client": round(client, 2), **procs.delta()})
            with urllib.request.urlopen(f"{b.url}/v1/status") as answer:
                status = json.load(answer)
        finally:
            renice(seeder.proc.pid, 0)
            b.stop()
        took = status["bytes_from_mirror"]
        if took:  # the swarm stalled and the agent fell back: that round is no peer's
            fell_back.setdefault(rows_now[0], []).append(took)
            kept = work / f"fell-back-{tag}.log"
            shutil.copy(b.log_path, kept)
            print(f"  the agent of {c} took {took} bytes from the mirror ({rows_now[0]}; {kept})")
        shutil.rmtree(b.root)

    try:
        for r in range(args.runs):
            # None: the mirror row; then each checkout at nice 0 (and at --nice)
            order: list[tuple[Path | str | None, int]] = [(None, 0), *((c, 0) for c in checkouts)]
            order += [(c, args.nice) for c in checkouts] if args.nice else []
            order += [(kind, 0) for kind in args.beside]
            order = order[r % len(order) :] + order[: r % len(order)]  # rotated per round
            for k, (c, nice) in enumerate(order):
                if isinstance(c, str):
                    mirror_row(beside=c)
                elif c is None:
                    mirror_row()
                else:
                    agent_rows(c, f"b-{r}-{k}", nice)
            print(
                f"  run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in res.items() if v),
                flush=True,
            )
        for t in range(args.timeline):
            order = [None, *checkouts]
            order = order[t % len(order) :] + order[: t % len(order)]
            for k, c in enumerate(order):
                if c is None:
                    procs = Procs(seeder=seeder.proc.pid, mirror=mirror.pid)
                    timeline("straight from the mirror", url, work / "client", procs, None)
                    continue
                b = CheckoutAgent(c, work / f"timeline-{t}-{k}", "127.0.0.3", url, [seeder.peer])
                try:
                    procs = Procs(agent=b.proc.pid, seeder=seeder.proc.pid, mirror=mirror.pid)
                    label = f"through an agent of {c.name or c}, from a peer"
                    timeline(label, b.url, work / "client", procs, b)
                finally:
                    b.stop()
                shutil.rmtree(b.root)
    finally:
        teardown(mirror, seeder)
    med = {k: statistics.median(v) for k, v in res.items() if v}
    per_call = {"client_syscalls": calls, "client_profile": profiles}
    got = {"runs_s": res, "cpu_s": cpu, "median_s": med, **per_call}
    print(json.dumps(got, indent=1))
    title = f"snapshot_download, {size / (1 << 30):.2f} GiB, median of {args.runs}"
    rows_table(title, res, cpu, med["mirror"])
    if args.syscalls and not args.profile:
        syscall_table(calls, size)
    if args.profile:
        profile_table(profiles)
    for k, v in fell_back.items():
        print(f"NOT FROM A PEER ALONE: {k}: {len(v)} round(s) took {v} bytes from the mirror")

    if args.ttfb_runs:
        big = parse_size(args.ttfb_size)
        mirror, url, seeder = setup(big, work)
        firsts = []
        try:
            for r in range(args.ttfb_runs):
                b = Agent(work / f"t-{r}", "127.0.0.3", url, [seeder.peer])
                firsts.append(ttfb(b.url, url))
                b.stop()
                shutil.rmtree(b.root)
                print(f"  ttfb run {r + 1}: {firsts[-1]:.2f} s", flush=True)
        finally:
            teardown(mirror, seeder)
        print(
            f"\ntime to first byte, {big / (1 << 30):.1f} GiB shard only a peer holds: "
            f"median {statistics.median(firsts):.2f} s of {firsts}"
        )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
