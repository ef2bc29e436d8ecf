"""Swarm on a simulated LAN whose host links are 100 Mbit/s (issue 12; root, netns).

The host ports are shaped (tests/netlab.py, `--lan-rate`, default 100mbit), so the link,
not the 2 cores, is the limit. A synthetic repo (`--size`, default 168MB: 4 safetensors
shards plus small files) sits on the project's mirror behind the usual WAN (100 Mbit/s,
40 ms RTT); a seeder agent per checkout (h9, h10, ...; mDNS off, so downloaders reach
it only as `--peer`) takes it from the mirror once. Then per round, interleaved (the
checkouts in an order that turns each round):

    curl   curl on h1 of every file of the repo, one after another, from a plain HTTP
           server (`python -m http.server`) on the first seeder's host: the link's rate
    one    a fresh agent on h1 (mDNS on, the seeder as --peer) runs `hfswarm download`
    eight  fresh agents on h1..h8 at once (they find each other by mDNS, the seeder is
           their --peer); all done = the slowest host. The seeder's share is the growth
           of its `bytes_uploaded` counter (`hfswarm status --json`) over 8 repo copies
    bare-one, bare-eight
           the machine's ceiling for `one` and `eight`: on h1 (h1..h8) a bare
           `SwarmSession` of the checkout (the agent's session settings, nothing of the
           agent: no CLI, mDNS, resolve, driver, re-surveys or hash follower) takes the
           repo's swarmed blobs (the seeder's torrents) from the same seeder agent, every
           host told the seeder's and every other host's address at the start; done =
           every torrent finished and flushed. The seeder's share is over the swarmed
           bytes (the small files go over peer HTTP in the agent rows)

`one` and `eight` run once per `--checkout` (default: this tree); each checkout's code
runs through PYTHONPATH and cwd, its own seeder as well. Every host's snapshot is read
back by huggingface_hub offline and compared with the source afterwards. For `one`, the
time line of the download (resolve, peer lookup, first piece, last piece, hash, link) is
read from the downloading agent's debug log, for the largest shard. Every row records
each host's CPU seconds (agent or bare process) and the seeder's, and the machine's CPU.

    python benchmarks/lan_swarm.py --runs 3 --checkout /tmp/base-d6dc5c8 --checkout .
    python benchmarks/lan_swarm.py --runs 1 --size 64MB --scenarios curl,one
    python benchmarks/lan_swarm.py --runs 3 --scenarios one,bare-one,eight,bare-eight
    python benchmarks/lan_swarm.py --runs 3 --scenarios bare-one,bare-eight --bare-seeder \
        --bare-variant 'base={}' --bare-variant 'feed2={"hosts": {"feeders": 2}}'

A bare variant changes what the bare seeder (``--bare-seeder``) or hosts do, one thing at
a time (benchmarks/lan_bare.py's spec keys): ``lt`` libtorrent settings over the
project's, ``swarm`` `SwarmSettings` fields, ``alone`` the bound told a torrent's only
peer, ``super_seed``, ``max_uploads`` (a bare seeder's unchoke slots per torrent),
``max_connections`` (a bare seeder's connection cap per torrent),
``stripe`` (each host its stripe of pieces first), ``feeders`` F (host k takes shard t
from the seeder only if k < F x shards and k % shards == t).

Results: WORK/results.json (after every run) and markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BARE = Path(__file__).resolve().parent / "lan_bare.py"  # run with a checkout's PYTHONPATH
sys.path.insert(0, str(Path(__file__).resolve().parent))
from herd_lan import (  # noqa: E402
    MB,
    agent_status,
    cpu_times,
    machine,
    netlab,
    parse_size,
    proc_cpu_s,
    stop_all,
    wait_all,
)

from peer.mirror_server.generate import generate_model_repo  # noqa: E402

HTTP_PORT = 8080
PEER_PORT = 7851  # the agent's default peer API port
BARE_PORT = 6881  # a bare host's BitTorrent port (the agents are stopped by then)
SCENARIOS = ["curl", "one", "eight", "bare-one", "bare-eight"]
# A download's steps in the downloading agent's debug log (peer/agent/fetch.py): text in
# the line, step, and whether the time line shows its first or its last occurrence over
# the repo's files (first piece of any shard ... last shard's hash).
STEPS = [
    ("download asked", "the request reached the agent", "first"),
    ("connect_tcp.started", "resolve: first request to the mirror", "first"),
    ("peer offers", "peer lookup done (first file)", "first"),
    ("swarming", "first swarm started", "first"),
    ("swarming", "last swarm started", "last"),
    ("first piece", "first piece", "first"),
    ("all pieces had", "last piece (last file)", "last"),
    ("whole-file hash matched", "hash matched, blob linked (last file)", "last"),
    ("download done in", "the agent's job done", "last"),
]


class Checkout:
    """A tree of the project's code: its agents and CLI run with it first on sys.path."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.name = "this tree" if self.path == ROOT else self.path.name

    def env(self, home: Path) -> dict[str, str]:
        env = netlab.child_env(home)
        env["PYTHONPATH"] = str(self.path)
        return env


def start_agent(
    lan: netlab.Lan,
    i: int,
    root: Path,
    mirror_url: str,
    co: Checkout,
    *,
    mdns: bool,
    peers: tuple[str, ...] = (),
    level: str = "info",
) -> netlab.AgentProc:
    """netlab.start_agent, with the checkout's code (cwd + PYTHONPATH)."""
    root.mkdir(parents=True, exist_ok=True)
    argv = [*netlab.HFSWARM, "agent", "--log-level", level, "--cache-dir", str(root / "cache"),
            "--state-dir", str(root / "state"), "--mirror", mirror_url,
            "--config", os.devnull]  # fmt: skip
    if not mdns:
        argv.append("--no-mdns")
    for p in peers:
        argv += ["--peer", p]
    env = co.env(root / "hf-home")
    out, log = root / "agent.out", root / "agent.log"
    with open(out, "wb") as o, open(log, "ab") as e:
        proc = lan.host(i).popen(argv, env=env, stdout=o, stderr=e, cwd=co.path)
    line, _ = netlab.wait_until(
        lambda: out.read_text().strip() or proc.poll() is not None, 60, what=f"agent on h{i}"
    )
    if proc.poll() is not None:
        raise RuntimeError(f"the agent on h{i} exited:\n{netlab._log_tail(log)}")
    info = json.loads(str(line).splitlines()[0])
    return netlab.AgentProc(lan, i, root, proc, info, log, env)


def turned(items: range, r: int) -> list[int]:
    """``items`` started at position ``r`` (mod its length): round r's order."""
    k = r % len(items) if len(items) else 0
    return [*items[k:], *items[:k]]


def timeline(log: Path, t0_wall: float) -> list[tuple[float, str]]:
    """(seconds after the CLI started, step) of one download, from the agent's log."""
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            t = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0_wall
        except ValueError:
            continue
        if t < -0.01:
            continue
        for text, step, which in STEPS:
            if text in line and (which == "last" or step not in found):
                found[step] = round(t, 3)
    return sorted((t, step) for step, t in found.items())


# --- bare hosts: a `SwarmSession` of the checkout (benchmarks/lan_bare.py) ------------


def make_torrents(co: Checkout, cache: Path, dest: Path) -> tuple[list[Path], int]:
    """The torrents the seeder agent seeds for the repo's swarmed blobs (those larger
    than one piece: the agent moves the others over peer HTTP), made by the checkout,
    and the blobs' bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    blobs = [b for b in cache.glob("models--*/blobs/*") if b.stat().st_size > 1 << 20]
    subprocess.run(
        [sys.executable, "-c",
         "import asyncio, sys; from pathlib import Path;"
         "from peer.manifests import VerifiedBlob, make_manifest;"
         "d = Path(sys.argv[1]);"
         "[(d / (p.name + '.torrent')).write_bytes(asyncio.run(make_manifest("
         "VerifiedBlob(p.name, p.stat().st_size, p), 'bench')).torrent)"
         " for p in map(Path, sys.argv[2:])]", str(dest), *map(str, blobs)],
        check=True, cwd=co.path, env={**os.environ, "PYTHONPATH": str(co.path)},
    )  # fmt: skip
    return sorted(dest.glob("*.torrent")), sum(b.stat().st_size for b in blobs)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.checkouts = [Checkout(Path(c)) for c in args.checkout]
        self.results: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "started": datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "params": {"size": args.size, "lan_rate": args.lan_rate, "runs": args.runs},
            "checkouts": [str(c.path) for c in self.checkouts],
            "runs": {},
        }

    def save(self) -> None:
        (self.work / "results.json").write_text(json.dumps(self.results, indent=1))

    def record(self, key: str, res: dict[str, Any]) -> None:
        self.results["runs"].setdefault(key, []).append(res)
        self.save()
        extra = f"; seeder share {res['seeder_share']:.0%}" if "seeder_share" in res else ""
        if "hosts" in res:
            per = [h["cpu_s"] for h in res["hosts"].values()]
            extra += (
                f"; host cpu s median {statistics.median(per):.2f} (max {max(per):.2f}), "
                f"seeder {res['seeder_cpu_s']:.2f}"
            )
        bad = f"  PROBLEMS {res['problems']}" if res.get("problems") else ""
        print(
            f"  [{time.strftime('%H:%M:%S')}] {key}: {res['s']:.2f} s "
            f"({res['MBps']:.2f} MB/s){extra}; cpu {res['cpu_busy'] * 100:.0f}%{bad}",
            flush=True,
        )
        for t, step in res.get("timeline", []):
            print(f"      {t:7.3f} s  {step}", flush=True)

    def run(self) -> None:
        a = self.args
        nco = len(self.checkouts)
        src = self.work / f"repo-{a.size}"
        generate_model_repo(src, total_size=parse_size(a.size), shards=a.shards, seed=12)
        sizes = netlab.repo_file_sizes(src)
        self.repo_bytes = sum(sizes.values())
        self.results["repo_bytes"] = self.repo_bytes
        self.results["files"] = sizes
        repo_id = "bench/lan"
        with netlab.Lan(hosts=8 + nco, lan_rate=a.lan_rate, wan_rate="100mbit") as lan:
            mirror = netlab.start_mirror(lan, [f"model:{repo_id}={src}"], self.work / "mirror")
            self.lan, self.src, self.repo_id, self.mirror = lan, src, repo_id, mirror
            seeders = []
            for k, co in enumerate(self.checkouts):
                i = 9 + k
                s = start_agent(lan, i, self.work / f"seeder{k}", mirror.url, co, mdns=False)
                t0 = time.monotonic()
                lan.host(i).run(self.cmd(s, co), env=s.env, timeout=600)
                bad = netlab.snapshot_problems(s.cache, repo_id, src)
                print(f"seeder h{i} ({co.name}) took the repo in {time.monotonic() - t0:.1f} s"
                      f" {bad or ''}", flush=True)  # fmt: skip
                seeders.append(s)
            if any(sc.startswith("bare-") for sc in a.scenarios):
                made = [
                    make_torrents(co, s.cache, self.work / f"torrents{k}")
                    for k, (co, s) in enumerate(zip(self.checkouts, seeders, strict=True))
                ]
                self.torrents = [t for t, _ in made]
                self.swarmed = made[0][1]
            http = lan.host(9).popen(
                [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind",
                 lan.host_ip(9), "--directory", str(src)],
                env=netlab.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)
            for r in range(a.runs):
                for scen in a.scenarios:
                    if scen == "curl":
                        self.record("curl", self.run_curl())
                        continue
                    # The checkouts' order turns each round, so that none keeps the
                    # first place (8.15: a gain seen with main always first did not hold
                    # once the order was mixed).
                    for k in turned(range(nco), r):
                        co = self.checkouts[k]
                        hosts = [1] if scen.endswith("one") else list(range(1, 9))
                        tag = f"{scen}-{k}-r{r}"
                        if not scen.startswith("bare-"):
                            res = self.run_agents(co, seeders[k], hosts, tag)
                            self.record(f"{scen} {co.name}", res)
                            continue
                        for v in turned(range(len(a.variants)), r):
                            name, variant = a.variants[v]
                            res = self.run_bare(
                                co, seeders[k], self.torrents[k], hosts, f"{tag}-v{v}", variant
                            )
                            self.record(f"{scen} {co.name}{f' [{name}]' if name else ''}", res)
            stop_all([http, *(s.proc for s in seeders), mirror.proc])

    def cmd(self, agent: netlab.AgentProc, co: Checkout) -> list[str]:
        return [*agent.download_cmd(self.repo_id)]

    def run_curl(self) -> dict[str, Any]:
        base = f"http://{self.lan.host_ip(9)}:{HTTP_PORT}"
        argv = ["curl", "-sS", "--fail", "--noproxy", "*"]
        for p in self.results["files"]:
            argv += ["-o", "/dev/null", f"{base}/{p}"]
        c0, t0 = cpu_times(), time.monotonic()
        self.lan.host(1).run(argv, timeout=600)
        s = time.monotonic() - t0
        c1 = cpu_times()
        return {
            "s": round(s, 3),
            "MBps": round(self.repo_bytes / s / MB, 3),
            "cpu_busy": round((c1[0] - c0[0]) / max(1, c1[1] - c0[1]), 3),
        }

    def run_agents(
        self, co: Checkout, seeder: netlab.AgentProc, hosts: list[int], tag: str
    ) -> dict[str, Any]:
        work = self.work / "runs" / tag
        shutil.rmtree(work, ignore_errors=True)
        peer = f"{seeder.ip}:{PEER_PORT}"
        agents = [
            # debug: the time line of a download is read from the agent's log
            start_agent(
                self.lan,
                i,
                work / f"h{i}",
                self.mirror.url,
                co,
                mdns=True,
                peers=(peer,),
                level="debug",
            )
            for i in hosts
        ]
        ids = {a.agent_id for a in agents} | {seeder.agent_id}

        def ready() -> bool:
            for a in agents:
                seen = {p["agent_id"] for p in agent_status(a)["peers"]}
                if not ids - {a.agent_id} <= seen:
                    return False
            return True

        netlab.wait_until(ready, 60, what="peers seen", interval=0.25)
        up0 = agent_status(seeder)["bytes_uploaded"]
        cpu0 = {a.index: proc_cpu_s(a.proc.pid) or 0.0 for a in [*agents, seeder]}
        c0 = cpu_times()
        t0_wall, t0 = time.time(), time.monotonic()
        procs = {}
        for a in agents:
            with open(work / f"h{a.index}" / "download.log", "wb") as out:
                procs[a.index] = a.host.popen(
                    self.cmd(a, co), env=a.env, stdout=out, stderr=subprocess.STDOUT, cwd=co.path
                )
        times = wait_all(procs, t0, 600)
        c1 = cpu_times()
        up1 = agent_status(seeder)["bytes_uploaded"]
        cpu1 = {a.index: proc_cpu_s(a.proc.pid) or 0.0 for a in [*agents, seeder]}
        per_host: dict[str, Any] = {}
        for a in agents:
            st = agent_status(a)
            per_host[f"h{a.index}"] = {
                "s": round(times[a.index], 2),
                "from_peers": st["bytes_from_peers"],
                "from_mirror": st["bytes_from_mirror"],
                "uploaded": st["bytes_uploaded"],
                "cpu_s": round(cpu1[a.index] - cpu0[a.index], 2),
            }
        stop_all([a.proc for a in agents])
        problems = {
            f"h{a.index}": p
            for a in agents
            if (p := netlab.snapshot_problems(a.cache, self.repo_id, self.src))
        }
        for i, p in procs.items():
            if p.returncode != 0:
                problems.setdefault(f"h{i}", []).append(f"exit {p.returncode}")
        s = max(times.values())
        res: dict[str, Any] = {
            "s": round(s, 3),
            "MBps": round(self.repo_bytes / s / MB, 3),
            "hosts": per_host,
            "machine_cpu_s": round((c1[0] - c0[0]) / os.sysconf("SC_CLK_TCK"), 2),
            "cpu_busy": round((c1[0] - c0[0]) / max(1, c1[1] - c0[1]), 3),
            "seeder_cpu_s": round(cpu1[seeder.index] - cpu0[seeder.index], 2),
            "problems": problems,
        }
        if len(hosts) == 1:
            res["timeline"] = [
                (0.0, "CLI started"),
                *timeline(agents[0].log, t0_wall),
                (round(s, 3), "CLI exited"),
            ]
        else:
            res["seeder_uploaded"] = up1 - up0
            res["seeder_share"] = round((up1 - up0) / (len(hosts) * self.repo_bytes), 4)
        keep = self.work / "logs" / tag
        keep.mkdir(parents=True, exist_ok=True)
        for a in agents:
            shutil.copy(a.log, keep / f"h{a.index}-agent.log")
        shutil.rmtree(work, ignore_errors=True)
        return res

    def run_bare(
        self,
        co: Checkout,
        seeder: netlab.AgentProc,
        torrents: list[Path],
        hosts: list[int],
        tag: str,
        variant: dict[str, Any],
    ) -> dict[str, Any]:
        """`bare-one`/`bare-eight`: bare sessions on `hosts` take the torrents from the
        seeder (the agent, or with ``--bare-seeder`` a bare session on its host seeding
        its blobs) and from each other, all told every address at once. `variant`: what
        the bare seeder and the hosts change (``seeder``, ``hosts``: benchmarks/lan_bare.py's
        optional spec keys ``lt``, ``swarm``, ``alone``, ``super_seed``, ``max_uploads``,
        ``max_connections``)."""
        work = self.work / "runs" / tag
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        bare_seeder = self.args.bare_seeder
        bt = (seeder.ip, BARE_PORT if bare_seeder else int(seeder.info["bt_port"]))
        procs: dict[int, subprocess.Popen[bytes]] = {}

        def start(i: int, spec: dict[str, Any]) -> None:
            (work / f"h{i}.json").write_text(json.dumps(spec))
            with open(work / f"h{i}.err", "wb") as err:  # the child keeps its own fd
                procs[i] = self.lan.host(i).popen(
                    [sys.executable, str(BARE), str(work / f"h{i}.json")],
                    env=co.env(work / "hf-home"), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=err, cwd=co.path,
                )  # fmt: skip

        if bare_seeder:
            blobs = next(seeder.cache.glob("models--*/blobs"))
            start(seeder.index, {
                "ip": seeder.ip, "port": BARE_PORT, "seeder": seeder.ip, "seed": True,
                "torrents": [str(t) for t in torrents], "out": str(blobs), "peers": [],
                **variant.get("seeder", {}),
            })  # fmt: skip
        extra = dict(variant.get("hosts", {}))
        striped = extra.pop("stripe", False)  # each host its stripe first (lan_bare.py)
        # "feeders": F: host k takes torrent t from the seeder only if k % (F x torrents)
        # is t (F feeders a torrent; hosts past F x torrents take all from the hosts)
        feeders = extra.pop("feeders", 0)
        for k, i in enumerate(hosts):
            others = [[self.lan.host_ip(j), BARE_PORT] for j in hosts if j != i]
            start(i, {
                "ip": self.lan.host_ip(i), "port": BARE_PORT, "seeder": seeder.ip,
                "torrents": [str(t) for t in torrents], "out": str(work / f"h{i}"),
                "peers": [list(bt), *others], **extra,
                **({"place": [k, len(hosts)]} if striped else {}),
                **({"feeds": [
                    t for t in range(len(torrents)) if k < feeders * len(torrents)
                    and k % len(torrents) == t
                ]} if feeders and len(hosts) > 1 else {}),
            })  # fmt: skip

        def line(i: int) -> dict[str, Any]:
            pipe = procs[i].stdout
            raw = pipe.readline() if pipe is not None else b""
            if not raw:
                err = (work / f"h{i}.err").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the bare host h{i} exited: {err}")
            got: dict[str, Any] = json.loads(raw)
            return got

        def say(i: int) -> None:
            pipe = procs[i].stdin
            assert pipe is not None
            pipe.write(b"go\n")
            pipe.flush()

        for i in procs:
            line(i)  # ready: torrents added, listening
        up0 = agent_status(seeder)["bytes_uploaded"]
        seeder_cpu0 = proc_cpu_s(seeder.proc.pid) or 0.0
        c0 = cpu_times()
        for i in procs:
            say(i)
        done = {i: line(i) for i in hosts}  # each says when it has every torrent flushed
        c1 = cpu_times()
        if bare_seeder:
            say(seeder.index)
            got = line(seeder.index)
            seeder_cpu, seeder_up = got["cpu_s"], got["uploaded"]
            # [s after go, MB had, MB sent, -] every 0.5 s: the seeder's port over time
            seeder_series = got["series"]
        else:
            seeder_series = []
            seeder_up = agent_status(seeder)["bytes_uploaded"] - up0
            seeder_cpu = (proc_cpu_s(seeder.proc.pid) or 0.0) - seeder_cpu0
        for i in hosts:
            say(i)
        final = {i: line(i) for i in hosts}
        stop_all(list(procs.values()))
        problems: dict[str, list[str]] = {}
        for i in hosts:
            for t in torrents:
                blob = t.name.removesuffix(".torrent")
                f = work / f"h{i}" / blob
                if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != blob:
                    problems.setdefault(f"h{i}", []).append(f"{blob[:12]} wrong or missing")
        s = max(d["s"] for d in done.values())
        n = len(hosts)
        res: dict[str, Any] = {
            "s": round(s, 3),
            "MBps": round(self.swarmed / s / MB, 3),
            "hosts": {
                f"h{i}": {
                    **done[i],
                    "cpu_s": final[i]["cpu_s"],
                    "uploaded_total": final[i]["uploaded"],
                }
                for i in hosts
            },
            "cpu_busy": round((c1[0] - c0[0]) / max(1, c1[1] - c0[1]), 3),
            "machine_cpu_s": round((c1[0] - c0[0]) / os.sysconf("SC_CLK_TCK"), 2),
            "seeder_cpu_s": round(seeder_cpu, 2),
            "seeder_series": seeder_series,
            "problems": problems,
        }
        if n > 1:
            res["seeder_uploaded"] = seeder_up
            res["seeder_share"] = round(seeder_up / (n * self.swarmed), 4)
        shutil.rmtree(work, ignore_errors=True)
        return res


def host_cpu(h: dict[str, Any]) -> float:
    """A host's CPU seconds over the row (agent process, or bare process)."""
    return float(h.get("cpu_s", h.get("agent_cpu_s", 0.0)))


def report(results: dict[str, Any]) -> str:
    runs = results["runs"]
    out = [
        f"repo {results['repo_bytes'] / MB:.1f} MB; host links {results['params']['lan_rate']}"
        " (bare rows move the swarmed blobs only)",
        "",
        "| scenario | runs | median s | MB/s | x curl's rate | per run (s) |",
        "|---|---|---|---|---|---|",
    ]
    curl = statistics.median(r["MBps"] for r in runs["curl"]) if "curl" in runs else None
    one = {k: statistics.median(r["s"] for r in v) for k, v in runs.items()}
    for key, rs in runs.items():
        med = one[key]
        rate = statistics.median(r["MBps"] for r in rs)
        ratio = f"{rate / curl:.2f}x" if curl else "-"
        per = ", ".join(f"{r['s']:.2f}" for r in rs)
        out.append(f"| {key} | {len(rs)} | {med:.2f} | {rate:.2f} | {ratio} | {per} |")
    fan = [k for k in runs if k.startswith(("eight ", "bare-eight "))]
    if fan:
        out += [
            "",
            "| 1 -> 8 row | vs its 1 -> 1 (medians) | per round | seeder share | "
            "host CPU s (median of hosts, per run) | seeder CPU s | machine CPU busy | "
            "MB from the WAN mirror |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for key in fan:
        rs = runs[key]
        kind, tree = key.split(" ", 1)
        alone = runs.get(("one " if kind == "eight" else "bare-one ") + tree, [])
        x = f"{one[key] / statistics.median(r['s'] for r in alone):.2f}x" if alone else "-"
        per = ", ".join(f"{e['s'] / o['s']:.2f}" for e, o in zip(rs, alone, strict=False))
        shares = ", ".join(f"{r['seeder_share']:.0%}" for r in rs)
        cpu = ", ".join(
            f"{statistics.median(host_cpu(h) for h in r['hosts'].values()):.1f}" for r in rs
        )
        seeder = ", ".join(f"{r.get('seeder_cpu_s', 0):.1f}" for r in rs)
        busy = ", ".join(f"{r['cpu_busy']:.0%}" for r in rs)
        # pieces that stalled 5 s on peers go to the WAN mirror (the agents' counters)
        wan = ", ".join(
            f"{sum(h.get('from_mirror', 0) for h in r['hosts'].values()) / MB:.1f}" for r in rs
        )
        out.append(
            f"| {key} | {x} | {per} | {shares} | {cpu} | {seeder} | {busy} | "
            f"{wan if kind == 'eight' else '-'} |"
        )
    bare = [k for k in runs if k.startswith("bare-eight ")]
    for key in bare:
        marks: dict[str, list[float]] = {}
        for r in runs[key]:
            for h in r["hosts"].values():
                for m, t in h.get("marks", {}).items():
                    marks.setdefault(m, []).append(t)
        text = ", ".join(f"{m} {statistics.median(ts):.2f} s" for m, ts in marks.items())
        out.append(f"\n{key}, medians over hosts and runs, s after go: {text}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="168MB", help="tensor bytes of the repo (default 168MB)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--lan-rate", default="100mbit", help="every host port (tc tbf rate)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"of {','.join(SCENARIOS)}")
    ap.add_argument("--checkout", action="append", default=None, help="repeatable; default .")
    ap.add_argument("--work", default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--replot", metavar="RESULTS_JSON", help="only print the tables")
    ap.add_argument(
        "--bare-seeder",
        action="store_true",
        help="bare rows: a bare session seeds the seeder agent's blobs (default: the agent)",
    )
    ap.add_argument(
        "--bare-variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='repeatable; bare rows once per variant, e.g. s8={"seeder": {"lt": '
        '{"unchoke_slots_limit": 8}}} or ss={"seeder": {"super_seed": true}} (a bare seeder); '
        "keys of seeder/hosts: lt, swarm, alone, super_seed, max_uploads, max_connections "
        "(benchmarks/lan_bare.py)",
    )
    args = ap.parse_args()
    args.variants = [("", {})] if not args.bare_variant else []
    for text in args.bare_variant:
        name, _, spec = text.partition("=")
        args.variants.append((name, json.loads(spec or "{}")))
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.checkout = args.checkout or [str(ROOT)]
    if set(args.scenarios) - set(SCENARIOS):
        ap.error(f"scenarios are {','.join(SCENARIOS)}")
    if args.replot:
        print(report(json.loads(Path(args.replot).read_text())))
        return
    reason = netlab.unavailable_reason()
    if reason:
        sys.exit(f"cannot build the simulated LAN: {reason}")
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-lan-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    t0 = time.monotonic()
    try:
        bench.run()
    finally:
        bench.results["wall_s"] = round(time.monotonic() - t0, 1)
        bench.save()
    print(f"\nwall time {bench.results['wall_s']:.0f} s; results {work / 'results.json'}")
    print(f"\n`{bench.results['command']}`\n")
    print(report(bench.results))


if __name__ == "__main__":
    main()
