"""Herd and swarm scaling on a simulated LAN (network namespaces, tests/netlab.py; root).

Every scenario starts fresh processes with empty caches, starts all downloads of a run
at the same moment, and records each host's completion time (all done = the slowest),
the file bytes the mirror itself counted (in total and per client), the machine's CPU
use, and afterwards checks every host's snapshot against the source files.

  A. 4 hosts, LAN 1 Gbit/s, WAN 100 Mbit/s (40 ms RTT) shared by all hosts, a repo of
     4 shards (--size, default 1GB), agents found by mDNS alone:
       herd       `hfswarm download` on h1..h4 at once
       hf4        `hf download` on h1..h4 at once (HF_ENDPOINT = the mirror)
       alone      `hfswarm download` on h1 alone (the single-host time)
       hf1        `hf download` on h1 alone
  B. the same LAN, the mirror capping each client (--cap, default 3MB per second; the
     WAN gives 12.5 MB/s), a smaller repo (--cap-size, default 256MB):
       cap-herd   `hfswarm download` on h1..h4 at once
       cap-alone  `hfswarm download` on h1 alone
       cap-hf4    `hf download` on h1..h4 at once (not in the default set)
  C. swarm scaling, 9 hosts (--scale-size, default 512MB): an agent on h9 takes the repo
     from the mirror once (the seeder), then per run
       swarm8     `hfswarm download` on h1..h8 at once (file bytes from the LAN; the
                  mirror behind the WAN still serves metadata, and pieces that stall)
       http8      `hf download` on h1..h8 at once from the project's mirror server
                  running on h9 (a LAN host with a 1 Gbit/s port like everyone's)
       swarm8-tracker  swarm8 with a LAN tracker on h9 as well (not in the default set)

Runs are interleaved round-robin within a section; medians over --runs (hf4 and
cap-hf4: --runs-hf4, default 1, as 4 copies over the WAN take minutes).

    python benchmarks/herd_lan.py --work /tmp/bench-herd                # the full run
    python benchmarks/herd_lan.py --size 64MB --cap-size 32MB --scale-size 64MB --runs 1
    python benchmarks/herd_lan.py --replot /tmp/bench-herd/results.json  # tables + SVG

Results: WORK/results.json (after every run), markdown tables on stdout, and SVG bar
charts (--svg-dir, default docs/img). Traffic stays inside the namespaces of the Lan.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import netlab  # noqa: E402

from peer.mirror_server.cli import parse_size as mirror_size  # noqa: E402
from peer.mirror_server.generate import generate_model_repo  # noqa: E402

MB = 10**6
HF = [sys.executable, "-m", "huggingface_hub.cli.hf"]
SECTION_A = ["herd", "hf4", "alone", "hf1"]
SECTION_B = ["cap-herd", "cap-alone", "cap-hf4"]
SECTION_C = ["swarm8", "http8", "swarm8-tracker"]
DEFAULT = ["herd", "hf4", "alone", "hf1", "cap-herd", "cap-alone", "swarm8", "http8"]
SLOW = {"hf4", "cap-hf4"}
LABELS = {
    "herd": "hfswarm herd, 4 hosts",
    "hf4": "hf download, 4 hosts",
    "alone": "hfswarm, 1 host alone",
    "hf1": "hf download, 1 host alone",
    "cap-herd": "hfswarm herd, 4 hosts",
    "cap-alone": "hfswarm, 1 host alone",
    "cap-hf4": "hf download, 4 hosts",
    "swarm8": "hfswarm, 1 seeder -> 8 hosts",
    "http8": "hf download, 8 hosts <- 1 HTTP server",
    "swarm8-tracker": "hfswarm + LAN tracker, 1 seeder -> 8 hosts",
}
HTTP_PORT = 8080  # the LAN HTTP server on h9


def parse_size(text: str) -> int:
    """1GB = 10^9, 1GiB = 2^30 (the mirror CLI's parser, but MB decimal as written)."""
    return mirror_size(text)


# -- talking HTTP inside a namespace, from this process ---------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _enter_netns(name: str) -> None:
    """Move the calling thread (only it) into namespace `name`."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a short-lived thread that entered network namespace `name`: much
    cheaper than a process per request (``ip netns exec python ...``)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            _enter_netns(name)
            box["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def get_json(url: str, timeout: float = 10) -> Any:
    with _NO_PROXY.open(url, timeout=timeout) as r:
        return json.load(r)


def post(url: str, timeout: float = 10) -> None:
    req = urllib.request.Request(url, data=b"", method="POST")
    with _NO_PROXY.open(req, timeout=timeout) as r:
        r.read()


class StatsSampler:
    """Polls a mirror's /_mirror/stats every `interval` s from a thread inside its
    namespace: when each file finished leaving the mirror, and the egress over time."""

    def __init__(self, ns: str, url: str, t0: float, interval: float = 0.5) -> None:
        self.samples: list[tuple[float, int, dict[str, int]]] = []
        self._url = f"{url}/_mirror/stats"
        self._t0 = t0
        self._interval = interval
        self._stop = threading.Event()
        self._ns = ns
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _enter_netns(self._ns)
        while True:
            stopping = self._stop.is_set()  # one last sample after the downloads ended
            with contextlib.suppress(Exception):
                s = get_json(self._url)
                self.samples.append(
                    (time.monotonic() - self._t0, s["blob_bytes"], dict(s["per_file"]))
                )
            if stopping:
                return
            self._stop.wait(self._interval)

    def stop(self) -> list[tuple[float, int, dict[str, int]]]:
        self._stop.set()
        self._thread.join()
        return self.samples


class NicSampler:
    """Every `interval` s, the eth0 byte counters (rx, tx) of each host, read from
    /proc/PID/net/dev of a process living in that host's namespace (its agent)."""

    def __init__(self, pids: dict[str, int], t0: float, interval: float = 0.5) -> None:
        self.samples: dict[str, list[tuple[float, int, int]]] = {h: [] for h in pids}
        self.cpu: list[tuple[float, int, int]] = []  # (t, busy, total) of the machine
        self._pids = pids
        self._t0 = t0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            t = time.monotonic() - self._t0
            self.cpu.append((t, *cpu_times()))
            for host, pid in self._pids.items():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
                        name, _, rest = line.partition(":")
                        if name.strip() == "eth0":
                            f = rest.split()
                            self.samples[host].append((t, int(f[0]), int(f[8])))
            if stopping:
                return
            self._stop.wait(self._interval)

    def stop(self) -> dict[str, list[tuple[float, int, int]]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def nic_figures(
    nic: dict[str, list[tuple[float, int, int]]], mirror_done: float | None
) -> dict[str, Any]:
    """Per host: MB received/sent on eth0 during the run, and what it had received by
    the time the mirror had sent its last file byte (when the herd's LAN tail starts);
    plus a coarse timeline [s, rx MB, tx MB] (about one point per second)."""
    out: dict[str, Any] = {}
    for host, rows in nic.items():
        if not rows:
            continue
        _, rx0, tx0 = rows[0]
        fig: dict[str, Any] = {
            "rx_MB": round((rows[-1][1] - rx0) / MB, 1),
            "tx_MB": round((rows[-1][2] - tx0) / MB, 1),
        }
        if mirror_done is not None:
            before = [r for r in rows if r[0] <= mirror_done]
            if before:
                fig["rx_MB_at_mirror_done"] = round((before[-1][1] - rx0) / MB, 1)
        timeline: list[list[float]] = []
        for t, rx, tx in rows:
            if not timeline or t - timeline[-1][0] >= 0.95 or t == rows[-1][0]:
                timeline.append([round(t, 2), round((rx - rx0) / MB, 1), round((tx - tx0) / MB, 1)])
        fig["timeline"] = timeline
        out[host] = fig
    return out


def file_done_times(
    samples: list[tuple[float, int, dict[str, int]]], sizes: dict[str, int]
) -> dict[str, float | None]:
    """Per file key: the first sample at which the mirror had sent all of it."""
    out: dict[str, float | None] = {}
    for key, size in sizes.items():
        t = next((t for t, _, pf in samples if pf.get(key, 0) >= size), None)
        out[key] = None if t is None else round(t, 2)
    return out


def egress_timeline(samples: list[tuple[float, int, dict[str, int]]]) -> list[list[float]]:
    """[seconds, MB of file bytes sent so far], about one point per second."""
    out: list[list[float]] = []
    for t, n, _ in samples:
        if not out or t - out[-1][0] >= 0.95 or t == samples[-1][0]:
            out.append([round(t, 2), round(n / MB, 2)])
    return out


# -- machine CPU ------------------------------------------------------------------------


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    total = sum(f[:8])
    return total - idle, total


def proc_cpu_s(pid: int) -> float | None:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


# -- processes on the hosts -------------------------------------------------------------


def agent_status(a: netlab.AgentProc) -> dict[str, Any]:
    return in_netns(a.host.name, get_json, f"{a.local_url}/v1/status")


def see_each_other(agents: Sequence[netlab.AgentProc]) -> bool:
    ids = {a.agent_id for a in agents}
    for a in agents:
        peers = {p["agent_id"] for p in agent_status(a)["peers"]}
        if not ids - {a.agent_id} <= peers:
            return False
    return True


def start_agents(
    lan: netlab.Lan,
    hosts: Sequence[int],
    work: Path,
    mirror_url: str,
    others: Sequence[netlab.AgentProc] = (),
    trackers: Sequence[str] = (),
) -> list[netlab.AgentProc]:
    agents = [
        netlab.start_agent(lan, i, work / f"h{i}", mirror_url, trackers=trackers) for i in hosts
    ]
    everyone = [*agents, *others]
    if len(everyone) > 1:
        netlab.wait_until(
            lambda: see_each_other(everyone), 60, what="mDNS discovery", interval=0.25
        )
    return agents


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_all(
    procs: dict[int, subprocess.Popen[bytes]], t0: float, timeout: float
) -> dict[int, float]:
    """Host -> seconds from t0 until its process exited; raises on a failure/timeout."""
    times: dict[int, float] = {}
    pending = dict(procs)
    while pending:
        for i, p in list(pending.items()):
            if p.poll() is not None:
                times[i] = time.monotonic() - t0
                del pending[i]
        if pending and time.monotonic() - t0 > timeout:
            stop_all(list(pending.values()), 5)
            raise RuntimeError(f"hosts {sorted(pending)} not done within {timeout:.0f} s")
        time.sleep(0.02)
    return times


def leader_lines(log: Path, t0_wall: float) -> list[tuple[float, str]]:
    """(seconds after t0, file) of the agent's 'herd: leading FILE' log lines."""
    out = []
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if "herd: leading " not in line:
                continue
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            name = line.split("herd: leading ", 1)[1].rsplit(" (", 1)[0]
            out.append((round(stamp - t0_wall, 2), name))
    return out


def keep_logs(work: Path, dest: Path, hosts: Sequence[int]) -> None:
    """Agent and download logs of a run, kept (numbered per run) after its caches go."""
    n = 1
    while (dest / f"run{n}").exists():
        n += 1
    for i in hosts:
        for name in ("agent.log", "download.log"):
            src = work / f"h{i}" / name
            if src.exists():
                (dest / f"run{n}").mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest / f"run{n}" / f"h{i}-{name}")


# -- one run ----------------------------------------------------------------------------


class Section:
    """A Lan, its mirror (in the mirror namespace), one repo."""

    def __init__(
        self, lan: netlab.Lan, mirror: netlab.MirrorProc, repo_id: str, src: Path, work: Path
    ) -> None:
        self.lan = lan
        self.mirror = mirror
        self.repo_id = repo_id
        self.src = src
        self.work = work
        self.sizes = {f"{repo_id}/{p}": n for p, n in netlab.repo_file_sizes(src).items()}
        self.repo_bytes = sum(self.sizes.values())
        self.mirror_bytes_expected = True  # False: the file bytes come from a LAN seeder

    def verify(self, caches: dict[int, Path]) -> dict[str, list[str]]:
        def check(item: tuple[int, Path]) -> tuple[str, list[str]]:
            i, cache = item
            return f"h{i}", netlab.snapshot_problems(cache, self.repo_id, self.src)

        with ThreadPoolExecutor(2) as pool:  # hashlib releases the GIL: both cores
            return {h: p for h, p in pool.map(check, caches.items()) if p}


def run_hfswarm(
    sec: Section,
    hosts: Sequence[int],
    tag: str,
    timeout: float,
    others: Sequence[netlab.AgentProc] = (),
    trackers: Sequence[str] = (),
) -> dict[str, Any]:
    """`hfswarm download` on `hosts` at once, each with a fresh agent (mDNS); the
    runs start once every agent lists all the others (and `others`) as peers."""
    work = sec.work / tag
    shutil.rmtree(work, ignore_errors=True)
    mirror = sec.mirror
    t_start = time.monotonic()
    agents = start_agents(sec.lan, hosts, work, sec.mirror.url, others, trackers)
    ready_s = time.monotonic() - t_start
    mirror.reset_stats()
    cpu0 = cpu_times()
    cpu_agents0 = {a.index: proc_cpu_s(a.proc.pid) or 0.0 for a in agents}
    t0_wall, t0 = time.time(), time.monotonic()
    sampler = StatsSampler(mirror.lan.mirror_ns.name, mirror.url, t0)
    nic = NicSampler({f"h{a.index}": a.proc.pid for a in [*agents, *others]}, t0)
    procs = {}
    for a in agents:
        with open(work / f"h{a.index}" / "download.log", "wb") as out:
            procs[a.index] = a.host.popen(
                a.download_cmd(sec.repo_id), env=a.env, stdout=out, stderr=subprocess.STDOUT
            )
    try:
        times = wait_all(procs, t0, timeout)
    except RuntimeError as exc:
        sampler.stop()
        nic.stop()
        tails = "\n".join(a.log_tail(15) for a in agents)
        raise RuntimeError(f"{tag}: {exc}\n{tails}") from None
    samples = sampler.stop()
    nic_samples = nic.stop()
    cpu_rows = nic.cpu
    cpu1 = cpu_times()
    failed = {i: p.returncode for i, p in procs.items() if p.returncode != 0}
    stats = mirror.stats()
    per_host: dict[str, Any] = {}
    for a in agents:
        st = agent_status(a)
        cpu = proc_cpu_s(a.proc.pid)
        per_host[f"h{a.index}"] = {
            "s": round(times[a.index], 2),
            "from_mirror": st["bytes_from_mirror"],
            "from_peers": st["bytes_from_peers"],
            "uploaded": st["bytes_uploaded"],
            "agent_cpu_s": round(cpu - cpu_agents0[a.index], 1) if cpu is not None else None,
            "led": leader_lines(a.log, t0_wall),
        }
    stop_all([a.proc for a in agents])
    problems = sec.verify({a.index: a.cache for a in agents})
    for i, rc in failed.items():
        problems.setdefault(f"h{i}", []).append(f"exit {rc}: {(work / f'h{i}' / 'download.log')}")
    done = file_done_times(samples, sec.sizes) if samples else {}
    ends = [t for k, t in done.items() if t is not None and sec.sizes[k] > 1 << 20]
    mirror_done = max(ends) if ends and sec.mirror_bytes_expected else None
    keep_logs(work, sec.work.parent / "logs" / tag, [a.index for a in agents])
    shutil.rmtree(work, ignore_errors=True)
    return {
        "all_done_s": round(max(times.values()), 2),
        "hosts": per_host,
        "agents_ready_s": round(ready_s, 2),
        **mirror_figures(stats, sec),
        "mirror_file_done_s": {k.rsplit("/", 1)[1]: v for k, v in done.items()},
        "mirror_egress_timeline": egress_timeline(samples),
        "mirror_done_s": mirror_done,
        "nic": nic_figures(nic_samples, mirror_done),
        "cpu_busy": round((cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1]), 3),
        "cpu_busy_after_mirror_done": busy_between(cpu_rows, mirror_done),
        "problems": problems,
    }


def busy_between(rows: list[tuple[float, int, int]], start: float | None) -> float | None:
    """The machine's CPU use (fraction of all cores) from `start` to the last sample."""
    if start is None:
        return None
    after = [r for r in rows if r[0] >= start]
    if len(after) < 2:
        return None
    return round((after[-1][1] - after[0][1]) / max(1, after[-1][2] - after[0][2]), 3)


def run_hf(
    sec: Section,
    hosts: Sequence[int],
    tag: str,
    timeout: float,
    endpoint: str | None = None,
    stats_from: Any = None,
) -> dict[str, Any]:
    """`hf download` on `hosts` at once, HF_ENDPOINT = the mirror (or `endpoint`)."""
    work = sec.work / tag
    shutil.rmtree(work, ignore_errors=True)
    mirror = stats_from or sec.mirror
    url = endpoint or sec.mirror.url
    mirror.reset_stats()
    caches = {i: work / f"h{i}" / "cache" for i in hosts}
    for i in hosts:
        caches[i].mkdir(parents=True)
    cpu0 = cpu_times()
    t0 = time.monotonic()
    procs = {}
    for i in hosts:
        env = netlab.child_env(
            work / f"h{i}" / "hf-home", HF_ENDPOINT=url, HF_HUB_DISABLE_PROGRESS_BARS="1"
        )
        with open(work / f"h{i}" / "download.log", "wb") as out:
            procs[i] = sec.lan.host(i).popen(
                [*HF, "download", sec.repo_id, "--cache-dir", caches[i], "--quiet"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
    times = wait_all(procs, t0, timeout)
    cpu1 = cpu_times()
    stats = mirror.stats()
    problems = sec.verify(caches)
    for i, p in procs.items():
        if p.returncode != 0:
            log = (work / f"h{i}" / "download.log").read_text(errors="replace")[-800:]
            problems.setdefault(f"h{i}", []).append(f"exit {p.returncode}: {log}")
    shutil.rmtree(work, ignore_errors=True)
    return {
        "all_done_s": round(max(times.values()), 2),
        "hosts": {f"h{i}": {"s": round(t, 2)} for i, t in sorted(times.items())},
        **mirror_figures(stats, sec),
        "cpu_busy": round((cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1]), 3),
        "problems": problems,
    }


def mirror_figures(stats: Any, sec: Section) -> dict[str, Any]:
    return {
        "mirror_file_bytes": stats.blob_bytes,
        "mirror_meta_bytes": stats.meta_bytes,
        "egress_x": round(stats.blob_bytes / sec.repo_bytes, 4),
        "per_client_bytes": dict(sorted(stats.per_client.items())),
    }


class LanHttpServer:
    """The project's mirror server on a LAN host (h9), its counters read from there."""

    def __init__(self, lan: netlab.Lan, i: int, spec: str, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.lan = lan
        self.ns = lan.host(i).name
        out, log = work / "server.out", work / "server.log"
        listen = f"{lan.host_ip(i)}:{HTTP_PORT}"
        with open(out, "wb") as o, open(log, "wb") as e:
            self.proc = lan.host(i).popen(
                [*netlab.HFSWARM, "mirror", "serve", "--listen", listen, spec],
                env=netlab.child_env(work / "hf-home"),
                stdout=o,
                stderr=e,
            )
        self.url, _ = netlab.wait_until(
            lambda: out.read_text().strip() if out.exists() and "\n" in out.read_text() else None,
            60,
            what="the LAN HTTP server",
        )

    def stats(self) -> Any:
        from peer.mirror_server.control import MirrorStats

        return MirrorStats.from_json(in_netns(self.ns, get_json, f"{self.url}/_mirror/stats"))

    def reset_stats(self) -> None:
        in_netns(self.ns, post, f"{self.url}/_mirror/reset")


# -- the sections -----------------------------------------------------------------------


def wan_seconds(nbytes: int) -> float:
    return nbytes / (11.5 * MB)  # a 100mbit netlab WAN measures ~92 Mbit/s (netlab._burst)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.scenarios = args.scenarios
        self.results: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "started": datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "params": {
                "size": args.size,
                "cap_size": args.cap_size,
                "cap": args.cap,
                "scale_size": args.scale_size,
                "runs": args.runs,
                "runs_hf4": args.runs_hf4,
                "lan_rate": "1gbit",
                "wan_rate": "100mbit",
                "wan_rtt_ms": 40,
            },
            "repos": {},
            "runs": {},
            "notes": [],
        }

    def save(self) -> None:
        (self.work / "results.json").write_text(json.dumps(self.results, indent=1))

    def record(self, scenario: str, r: int, res: dict[str, Any]) -> None:
        self.results["runs"].setdefault(scenario, []).append(res)
        self.save()
        hosts = ", ".join(f"{h} {v['s']:.1f}" for h, v in res["hosts"].items())
        bad = f"  PROBLEMS {res['problems']}" if res["problems"] else ""
        print(
            f"  [{time.strftime('%H:%M:%S')}] run {r + 1} {scenario}: all done "
            f"{res['all_done_s']:.2f} s ({hosts}); mirror file bytes "
            f"{res['mirror_file_bytes'] / MB:.1f} MB ({res['egress_x']:.3f}x); "
            f"cpu {res['cpu_busy'] * 100:.0f}%{bad}",
            flush=True,
        )

    def runs_for(self, scenario: str) -> int:
        return self.args.runs_hf4 if scenario in SLOW else self.args.runs

    def rounds(self, names: Sequence[str]) -> list[tuple[int, str]]:
        todo = [s for s in names if s in self.scenarios]
        n = max((self.runs_for(s) for s in todo), default=0)
        return [(r, s) for r in range(n) for s in todo if r < self.runs_for(s)]

    def repo(self, key: str, size: int, seed: int) -> Path:
        folder = self.work / f"repo-{key}-{size}"
        generate_model_repo(folder, total_size=size, shards=4, seed=seed)
        nbytes = sum(netlab.repo_file_sizes(folder).values())
        self.results["repos"][key] = {"tensor_bytes": size, "repo_bytes": nbytes, "shards": 4}
        return folder

    def section_ab(self) -> None:
        a = self.rounds(SECTION_A)
        b = self.rounds(SECTION_B)
        if not a and not b:
            return
        with netlab.Lan(hosts=4, lan_rate="1gbit", wan_rate="100mbit", wan_rtt_ms=40) as lan:
            if a:
                src = self.repo("A", parse_size(self.args.size), 1)
                mirror = netlab.start_mirror(lan, [f"model:bench/herd={src}"], self.work / "mA")
                sec = Section(lan, mirror, "bench/herd", src, self.work / "runs")
                t1 = wan_seconds(sec.repo_bytes) * 3 + 120
                print(f"A: {sec.repo_bytes / MB:.1f} MB repo, 4 hosts, mirror {mirror.url}")
                for r, s in a:
                    if s == "herd":
                        res = run_hfswarm(sec, [1, 2, 3, 4], s, t1)
                    elif s == "alone":
                        res = run_hfswarm(sec, [1], s, t1)
                    elif s == "hf1":
                        res = run_hf(sec, [1], s, t1)
                    else:
                        res = run_hf(sec, [1, 2, 3, 4], s, t1 * 4)
                    self.record(s, r, res)
                stop_all([mirror.proc])
            if b:
                src = self.repo("B", parse_size(self.args.cap_size), 2)
                cap = self.args.cap
                mirror = netlab.start_mirror(
                    lan, [f"model:bench/herd-cap={src}"], self.work / "mB", "--client-rate", cap
                )
                sec = Section(lan, mirror, "bench/herd-cap", src, self.work / "runs")
                t1 = sec.repo_bytes / parse_size(cap) * 3 + 120
                print(f"B: {sec.repo_bytes / MB:.1f} MB repo, mirror capped at {cap}/s per client")
                for r, s in b:
                    if s == "cap-herd":
                        res = run_hfswarm(sec, [1, 2, 3, 4], s, t1)
                    elif s == "cap-alone":
                        res = run_hfswarm(sec, [1], s, t1)
                    else:
                        res = run_hf(sec, [1, 2, 3, 4], s, t1)
                    self.record(s, r, res)
                stop_all([mirror.proc])

    def section_c(self) -> None:
        c = self.rounds(SECTION_C)
        if not c:
            return
        src = self.repo("C", parse_size(self.args.scale_size), 3)
        repo_id = "bench/scale"
        with netlab.Lan(hosts=9, lan_rate="1gbit", wan_rate="100mbit", wan_rtt_ms=40) as lan:
            mirror = netlab.start_mirror(lan, [f"model:{repo_id}={src}"], self.work / "mC")
            sec = Section(lan, mirror, repo_id, src, self.work / "runs")
            sec.mirror_bytes_expected = False
            t1 = wan_seconds(sec.repo_bytes) * 3 + 180
            print(f"C: {sec.repo_bytes / MB:.1f} MB repo, 9 hosts")
            trackers = []
            if "swarm8-tracker" in self.scenarios:  # a LAN tracker on h9, the seeder uses it
                tracker = netlab.start_tracker(lan, 9, self.work / "tracker")
                trackers = [tracker.url]
            seeder = netlab.start_agent(lan, 9, self.work / "seeder", mirror.url, trackers=trackers)
            t0 = time.monotonic()
            seeder.download(repo_id, timeout=t1)
            seed_s = time.monotonic() - t0
            bad = netlab.snapshot_problems(seeder.cache, repo_id, src)
            self.results["seeder"] = {
                "fetch_s": round(seed_s, 2),
                "mirror_file_bytes": mirror.stats().blob_bytes,
                "problems": bad,
            }
            print(f"  seeder h9 took the repo from the mirror in {seed_s:.1f} s {bad or ''}")
            server = LanHttpServer(lan, 9, f"model:{repo_id}={src}", self.work / "h9-http")
            for r, s in c:
                if s.startswith("swarm8"):
                    # fresh agents on h1..h8 find the seeder (and each other) by mDNS,
                    # and with "-tracker" also through the LAN tracker
                    res = run_hfswarm(
                        sec,
                        range(1, 9),
                        s,
                        t1,
                        others=[seeder],
                        trackers=trackers if s == "swarm8-tracker" else (),
                    )
                    res["seeder_uploaded"] = agent_status(seeder)["bytes_uploaded"]
                else:
                    res = run_hf(sec, range(1, 9), s, t1, server.url, stats_from=server)
                self.record(s, r, res)
            stop_all([server.proc, seeder.proc, mirror.proc])
            shutil.rmtree(seeder.cache, ignore_errors=True)  # its log stays


def machine() -> dict[str, Any]:
    import huggingface_hub
    import libtorrent

    mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    return {
        "nproc": os.cpu_count(),
        "mem_gib": round(int(mem) / (1 << 20), 1),
        "python": sys.version.split()[0],
        "libtorrent": libtorrent.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "kernel": os.uname().release,
    }


# -- report -----------------------------------------------------------------------------


def cap_text(cap: str) -> str:
    return f"{parse_size(cap) / MB:g} MB/s"


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[str, Any]) -> str:
    runs: dict[str, list[dict[str, Any]]] = results["runs"]
    repos = results["repos"]
    p = results["params"]
    out: list[str] = []

    def mb(n: float) -> str:
        return f"{n / MB:.1f}"

    def scen_table(names: list[str], base: str | None, base_label: str) -> None:
        out.append(
            f"| scenario | runs | all done, median s | vs {base_label} | mirror file MB, median "
            "| x repo | all done per run (s) |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for s in names:
            if s not in runs:
                continue
            rs = runs[s]
            t = med(rs, "all_done_s")
            vs = f"{t / med(runs[base], 'all_done_s'):.2f}x" if base in runs else "-"
            each = ", ".join(f"{r['all_done_s']:.2f}" for r in rs)
            out.append(
                f"| {LABELS[s]} | {len(rs)} | {t:.2f} | {vs} | {mb(med(rs, 'mirror_file_bytes'))} "
                f"| {med(rs, 'egress_x'):.3f}x | {each} |"
            )

    def per_run(names: list[str], hosts: int) -> None:
        hs = [f"h{i}" for i in range(1, hosts + 1)]
        cols = " | ".join(hs)
        out.append(f"| scenario | run | {cols} | mirror MB per client (all bodies) | CPU busy |")
        out.append("|---|---|" + "---|" * len(hs) + "---|---|")
        for s in names:
            for k, r in enumerate(runs.get(s, []), 1):
                cells = [f"{r['hosts'][h]['s']:.1f}" if h in r["hosts"] else "" for h in hs]
                clients = ", ".join(
                    f"{ip.rsplit('.', 1)[1]}: {mb(n)}" for ip, n in r["per_client_bytes"].items()
                )
                out.append(
                    f"| {s} | {k} | {' | '.join(cells)} | {clients} | {r['cpu_busy'] * 100:.0f}% |"
                )

    if any(s in runs for s in SECTION_A):
        rb = repos["A"]["repo_bytes"]
        out.append(
            f"### A. Herd of 4: {mb(rb)} MB repo (4 shards), LAN {p['lan_rate']}, WAN "
            f"{p['wan_rate']} / {p['wan_rtt_ms']} ms RTT shared by all hosts\n"
        )
        scen_table(SECTION_A, "alone", "single host (hfswarm alone)")
        out.append("\nPer run: seconds until each host was done; mirror file bytes by client.\n")
        per_run(SECTION_A, 4)
        if "herd" in runs and "alone" in runs:
            ratio = med(runs["herd"], "all_done_s") / med(runs["alone"], "all_done_s")
            egress = med(runs["herd"], "egress_x")
            out.append("\n| target | measured | verdict |")
            out.append("|---|---|---|")
            out.append(
                f"| all 4 hosts done within 1.2x the single-host time | {ratio:.2f}x "
                f"| **{'met' if ratio <= 1.2 else 'NOT met'}** |"
            )
            out.append(
                f"| mirror egress within 1.05x the repo size | {egress:.3f}x "
                f"| **{'met' if egress <= 1.05 else 'NOT met'}** |"
            )
            if "hf4" in runs:
                out.append(
                    f"| (reference) `hf download` on 4 hosts: egress | "
                    f"{med(runs['hf4'], 'egress_x'):.3f}x | - |"
                )
        out.append("")
        out.append(herd_detail(runs, ["herd", "alone"]))
    if any(s in runs for s in SECTION_B):
        rb = repos["B"]["repo_bytes"]
        out.append(
            f"\n### B. Mirror capped at {cap_text(p['cap'])} per client: {mb(rb)} MB repo "
            "(4 shards), same LAN and WAN\n"
        )
        scen_table(SECTION_B, "cap-alone", "1 host alone, capped")
        out.append("")
        per_run(SECTION_B, 4)
        if "cap-herd" in runs and "cap-alone" in runs:
            gain = med(runs["cap-alone"], "all_done_s") / med(runs["cap-herd"], "all_done_s")
            out.append(
                f"\nSpread leadership: one host alone / herd of 4 all done = **{gain:.2f}x** "
                "(the herd's 4 leaders pull 4 shards under 4 client caps at once)."
            )
        out.append("")
        out.append(herd_detail(runs, ["cap-herd", "cap-alone"]))
    if any(s in runs for s in SECTION_C):
        rb = repos["C"]["repo_bytes"]
        seed = results.get("seeder", {})
        out.append(f"\n### C. Swarm scaling: {mb(rb)} MB repo (4 shards), 9 hosts, LAN 1 Gbit/s\n")
        if seed:
            out.append(
                f"Seeder (h9) took the repo from the mirror once: {seed['fetch_s']:.1f} s, "
                f"{mb(seed['mirror_file_bytes'])} MB of file bytes.\n"
            )
        scen_table(SECTION_C, "http8", "8 x hf download from h9")
        out.append("")
        per_run(SECTION_C, 8)
        out.append(seeder_share(runs, rb))
        if "swarm8" in runs and "http8" in runs:
            s, h = med(runs["swarm8"], "all_done_s"), med(runs["http8"], "all_done_s")
            out.append(f"\nhttp8 / swarm8 all-done time: **{h / s:.2f}x**")
    problems = {
        f"{s} run {k}": r["problems"] for s, rs in runs.items() for k, r in enumerate(rs, 1)
    }
    bad = {k: v for k, v in problems.items() if v}
    out.append(
        "\nSnapshots: "
        + (
            f"PROBLEMS {bad}"
            if bad
            else f"all {sum(len(r['hosts']) for rs in runs.values() for r in rs)} host "
            "snapshots complete and identical to the source (sha256 per file)."
        )
    )
    return "\n".join(out)


def seeder_share(runs: dict[str, list[dict[str, Any]]], repo_bytes: int) -> str:
    """How much of the 8 copies the seeder itself sent, per swarm run: its eth0 tx (or,
    in results without NIC samples, the growth of its cumulative upload counter)."""
    out = ["\n| scenario | run | seeder (h9) sent MB | share of the 8 copies |"]
    out.append("|---|---|---|---|")
    last = 0
    for s in ("swarm8", "swarm8-tracker"):
        for k, r in enumerate(runs.get(s, []), 1):
            sent = r.get("nic", {}).get("h9", {}).get("tx_MB")
            if sent is None and r.get("seeder_uploaded") is not None and s == "swarm8":
                sent, last = (r["seeder_uploaded"] - last) / MB, r["seeder_uploaded"]
            if sent is not None:
                out.append(f"| {s} | {k} | {sent:.0f} | {sent * MB / (8 * repo_bytes):.0%} |")
    return "\n".join(out) if len(out) > 2 else ""


def herd_detail(runs: dict[str, list[dict[str, Any]]], names: list[str]) -> str:
    """Where the time goes in the hfswarm runs: per host, what it took from where,
    its agent's CPU, which files it led and when; when each file left the mirror."""
    out = [
        "| scenario | run | host | done s | from mirror MB | from peers MB | uploaded MB "
        "| agent CPU s | eth0 rx MB when the mirror was done | led (s after start: file) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in names:
        for k, r in enumerate(runs.get(s, []), 1):
            for h, v in r["hosts"].items():
                led = "; ".join(f"{t:.1f}: {f}" for t, f in v.get("led", [])) or "-"
                nic = r.get("nic", {}).get(h, {})
                at = nic.get("rx_MB_at_mirror_done")
                at_text = "-" if at is None else f"{at:.0f} of {nic['rx_MB']:.0f}"
                out.append(
                    f"| {s} | {k} | {h} | {v['s']:.1f} | {v['from_mirror'] / MB:.1f} "
                    f"| {v['from_peers'] / MB:.1f} | {v['uploaded'] / MB:.1f} "
                    f"| {v['agent_cpu_s']} | {at_text} | {led} |"
                )
    out.append("\nWhen each file had fully left the mirror (s after the downloads started):\n")
    for s in names:
        for k, r in enumerate(runs.get(s, []), 1):
            d = r.get("mirror_file_done_s", {})
            big = {f: t for f, t in d.items() if f.endswith(".safetensors")}
            text = ", ".join(f"{f.split('-')[1] if '-' in f else f}: {t}" for f, t in big.items())
            ends = [t for t in big.values() if t is not None]
            tail = f" (tail {r['all_done_s'] - max(ends):.1f} s)" if ends else ""
            busy = r.get("cpu_busy_after_mirror_done")
            if busy is not None:
                tail += f", CPU busy {busy * 100:.0f}% of 2 cores in the tail"
            out.append(f"- {s} run {k}: shards {text}; all done {r['all_done_s']:.1f} s{tail}")
    return "\n".join(out)


# -- SVG --------------------------------------------------------------------------------

COLORS = {"hfswarm": "#2b7bba", "hf": "#d9822b"}


def svg_panels(title: str, panels: list[dict[str, Any]], width: int = 820) -> str:
    """Horizontal bar charts stacked vertically. Each panel: title, unit, rows of
    (label, median, [runs], colour), optional target (value, label). Bars are medians,
    black ticks the single runs."""
    label_w, right = 280, 90
    bar_h, gap, head = 22, 8, 34
    plot_w = width - label_w - right
    parts: list[str] = []
    y = 40
    for panel in panels:
        rows = panel["rows"]
        vmax = max([max([r[1], *r[2]]) for r in rows] + [panel.get("target", (0, ""))[0]])
        vmax = vmax * 1.05 or 1.0
        parts.append(
            f'<text x="10" y="{y + 16}" font-size="14" font-weight="bold">'
            f"{escape(panel['title'])}</text>"
        )
        y0 = y + head
        y_end = y0 + len(rows) * (bar_h + gap)
        if "target" in panel:
            tv, tl = panel["target"]
            x = label_w + plot_w * tv / vmax
            parts.append(
                f'<line x1="{x:.1f}" y1="{y0 - 6}" x2="{x:.1f}" y2="{y_end}" stroke="#c0392b" '
                'stroke-width="1.5" stroke-dasharray="5,3"/>'
            )
            parts.append(
                f'<text x="{x + 4:.1f}" y="{y0 - 8}" font-size="11" fill="#c0392b">'
                f"{escape(tl)}</text>"
            )
        for j, (label, value, singles, color) in enumerate(rows):
            yy = y0 + j * (bar_h + gap)
            w = plot_w * value / vmax
            parts.append(
                f'<text x="{label_w - 8}" y="{yy + bar_h * 0.7:.1f}" font-size="12" '
                f'text-anchor="end">{escape(label)}</text>'
            )
            parts.append(
                f'<rect x="{label_w}" y="{yy}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>'
            )
            for v in singles:
                x = label_w + plot_w * v / vmax
                parts.append(
                    f'<line x1="{x:.1f}" y1="{yy + 3}" x2="{x:.1f}" y2="{yy + bar_h - 3}" '
                    'stroke="black" stroke-width="1.5"/>'
                )
            x_text = label_w + plot_w * max([value, *singles]) / vmax + 6
            parts.append(
                f'<text x="{x_text:.1f}" y="{yy + bar_h * 0.7:.1f}" font-size="12" '
                'stroke="white" stroke-width="3" paint-order="stroke">'
                f"{escape(panel['fmt'].format(value))}</text>"
            )
        parts.append(
            f'<line x1="{label_w}" y1="{y0 - 4}" x2="{label_w}" y2="{y_end}" stroke="#555"/>'
        )
        y = y_end + 18
    height = y + 24
    note = "bars: median; black ticks: single runs"
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="10" y="22" font-size="16" font-weight="bold">{escape(title)}</text>',
            *parts,
            f'<text x="10" y="{height - 10}" font-size="11" fill="#555">{note}</text>',
            "</svg>",
            "",
        ]
    )


def rows_for(
    runs: dict[str, list[dict[str, Any]]], names: list[str], key: str
) -> list[tuple[str, float, list[float], str]]:
    rows = []
    for s in names:
        if s in runs:
            vals = [r[key] for r in runs[s]]
            color = COLORS["hf" if s.startswith(("hf", "cap-hf", "http")) else "hfswarm"]
            rows.append((LABELS[s], statistics.median(vals), vals, color))
    return rows


def write_svgs(results: dict[str, Any], svg_dir: Path) -> list[Path]:
    runs, repos, p = results["runs"], results["repos"], results["params"]
    written = []
    svg_dir.mkdir(parents=True, exist_ok=True)
    panels = []
    if any(s in runs for s in SECTION_A):
        size = repos["A"]["repo_bytes"] / MB
        time_panel: dict[str, Any] = {
            "title": f"All hosts done (s): {size:.0f} MB repo, WAN 100 Mbit/s shared",
            "fmt": "{:.1f} s",
            "rows": rows_for(runs, SECTION_A, "all_done_s"),
        }
        if "alone" in runs:
            time_panel["target"] = (1.2 * med(runs["alone"], "all_done_s"), "target 1.2x alone")
        panels.append(time_panel)
        panels.append(
            {
                "title": "Mirror egress (file bytes / repo size)",
                "fmt": "{:.2f}x",
                "rows": rows_for(runs, SECTION_A, "egress_x"),
                "target": (1.05, "target 1.05x"),
            }
        )
    if any(s in runs for s in SECTION_B):
        size = repos["B"]["repo_bytes"] / MB
        panels.append(
            {
                "title": f"Mirror capped at {cap_text(p['cap'])} per client: all done (s), "
                f"{size:.0f} MB repo",
                "fmt": "{:.1f} s",
                "rows": rows_for(runs, SECTION_B, "all_done_s"),
            }
        )
    if panels:
        path = svg_dir / "herd_lan.svg"
        path.write_text(svg_panels("hfswarm herd on a simulated LAN (4 hosts)", panels))
        written.append(path)
    if any(s in runs for s in SECTION_C):
        size = repos["C"]["repo_bytes"] / MB
        path = svg_dir / "swarm_scaling.svg"
        path.write_text(
            svg_panels(
                "Swarm scaling: 8 hosts on a 1 Gbit/s LAN",
                [
                    {
                        "title": f"All 8 hosts done (s), {size:.0f} MB repo",
                        "fmt": "{:.1f} s",
                        "rows": rows_for(runs, SECTION_C, "all_done_s"),
                    }
                ],
            )
        )
        written.append(path)
    return written


# -- main -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GB", help="repo size for section A (default 1GB)")
    ap.add_argument("--cap-size", default="256MB", help="repo size for section B")
    ap.add_argument("--cap", default="3MB", help="mirror per-client cap (bytes/s) in section B")
    ap.add_argument("--scale-size", default="512MB", help="repo size for section C")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runs-hf4", type=int, default=1, help="runs of hf4 and cap-hf4")
    ap.add_argument(
        "--scenarios",
        default=",".join(DEFAULT),
        help=f"comma-separated, of {','.join(SECTION_A + SECTION_B + SECTION_C)}",
    )
    ap.add_argument("--work", default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--svg-dir", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--replot", metavar="RESULTS_JSON", help="only print tables and write SVGs")
    args = ap.parse_args()
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SECTION_A + SECTION_B + SECTION_C)
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    if args.replot:
        results = json.loads(Path(args.replot).read_text())
    else:
        reason = netlab.unavailable_reason()
        if reason:
            sys.exit(f"cannot build the simulated LAN: {reason}")
        work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-herd-bench-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"work {work}; scenarios {','.join(args.scenarios)}", flush=True)
        bench = Bench(args, work)
        t0 = time.monotonic()
        try:
            bench.section_ab()
            bench.section_c()
        finally:
            bench.results["wall_s"] = round(time.monotonic() - t0, 1)
            bench.save()
        results = bench.results
        print(f"\nwall time {results['wall_s']:.0f} s; results {work / 'results.json'}")
    print(f"\n`{results['command']}`\n")
    print(report(results))
    for path in write_svgs(results, Path(args.svg_dir)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
