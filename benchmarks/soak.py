"""Soak: three agents (separate processes) and random faults, then every cache verified.

The project's mirror (in this process, behind a per-client rate cap so a download takes
a few seconds) serves a handful of repos; a LAN tracker (a separate process) lets the
agents find each other across restarts. Each cycle picks, with a seeded RNG, one of:

  download   an agent downloads a repo (`hfswarm download --agent`, in the background)
  evict      a repo leaves an agent's cache (huggingface_hub's delete strategy, as
             `hf cache delete` does), while the agent runs
  kill       kill -9 of an agent, often in the middle of a download
  restart    the killed agents start again (same cache and state dir)
  fault      the mirror misbehaves: down for a few seconds, cut bodies, a 503, a wrong
             Content-Range, a 200 to a Range request, a stall

A download fails the soak only when its agent was not killed under it. At the end every
agent is restarted, the interrupted downloads are run again, the agents stop, and every
cache is checked: every blob hashes to its name, snapshot links and refs resolve, and
huggingface_hub's scan_cache_dir reports nothing. Bytes refetched after kills: for each
download a kill interrupted, what the agent received before the kill and in the
download run again after the restart, minus what it needed.

    python benchmarks/soak.py --cycles 50 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cachecheck import check_cache  # noqa: E402
from huggingface_hub import scan_cache_dir  # noqa: E402

from peer.cli.demo import loopback_agent_command  # noqa: E402
from peer.mirror_server import Fault, RepoSource, ThreadedMirror  # noqa: E402

MiB = 1 << 20


@dataclass
class Agent:
    name: str
    ip: str
    root: Path
    proc: asyncio.subprocess.Process | None = None
    local_url: str = ""
    downloads: dict[str, asyncio.Task[tuple[int, str, float, float]]] = field(default_factory=dict)
    killed_under: set[str] = field(default_factory=set)  # repos whose download a kill cut
    # a download running alone: (bytes of the repo held, bytes received) at its start
    launched: dict[str, tuple[int, int]] = field(default_factory=dict)
    # the one download a kill cut: (held at its start, received from its start to the kill)
    cut_alone: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def cache(self) -> Path:
        return self.root / "cache"


@dataclass
class Tally:
    cycles: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    downloads_ok: int = 0
    downloads_cut: int = 0
    # started while the mirror was down, refused with its one line (exit 3, "cannot reach")
    refused_in_outage: list[str] = field(default_factory=list)
    outages: list[tuple[float, float]] = field(default_factory=list)  # monotonic windows
    failures: list[str] = field(default_factory=list)
    kills: int = 0
    kills_mid_download: int = 0
    refetched: int = 0
    refetch_samples: list[int] = field(default_factory=list)


def make_repos(folder: Path, rnd: random.Random, n: int) -> dict[str, tuple[Path, int]]:
    repos = {}
    for i in range(n):
        d = folder / f"r{i}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"soak": i}))
        size = rnd.choice([3, 12, 24, 40]) * MiB + rnd.randrange(1 << 16)
        (d / "model.safetensors").write_bytes(rnd.randbytes(size))
        if i % 2:
            (d / "extra.bin").write_bytes(rnd.randbytes(rnd.randrange(1, 4) * MiB))
        repos[f"soak/r{i}"] = (d, sum(p.stat().st_size for p in d.iterdir()))
    return repos


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_agent(a: Agent, mirror: str, tracker: str) -> None:
    cmd = loopback_agent_command(a.root, a.ip, mirror, (), "--tracker", tracker)
    log = await asyncio.to_thread(open, a.root.parent / f"{a.name}.log", "ab")
    a.proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=log
    )
    log.close()
    assert a.proc.stdout is not None
    line = await asyncio.wait_for(a.proc.stdout.readline(), 60)
    info: dict[str, Any] = json.loads(line or b"{}")
    if not info.get("ready"):
        raise RuntimeError(f"{a.name} did not start; see its log")
    a.local_url = f"http://{a.ip}:{info['local_port']}"


async def status(a: Agent) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.get(f"{a.local_url}/v1/status") as r,
    ):
        return dict(await r.json())


async def received(a: Agent) -> int:
    """Every byte the agent received since it started: finished blobs and in flight."""
    st = await status(a)
    moving = sum(int(t["from_mirror"]) + int(t["from_peers"]) for t in st.get("transfers", []))
    return int(st["bytes_from_mirror"]) + int(st["bytes_from_peers"]) + moving


async def cli_download(a: Agent, repo: str) -> tuple[int, str, float, float]:
    """Exit code, stderr, start and end (monotonic)."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "peer.cli.main", "download", repo, "--agent", a.local_url,
        "--quiet", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 300)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, "timed out after 300 s", t0, time.monotonic()
    return proc.returncode or 0, err.decode().strip(), t0, time.monotonic()


def held_bytes(a: Agent, repo: str) -> int:
    folder = a.cache / f"models--{repo.replace('/', '--')}" / "blobs"
    return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0


def evict(a: Agent, repo: str) -> bool:
    """huggingface_hub's delete strategy for every revision of `repo` in this cache."""
    try:
        info = scan_cache_dir(a.cache)
    except Exception:
        return False
    revs = [r.commit_hash for ri in info.repos if ri.repo_id == repo for r in ri.revisions]
    if not revs:
        return False
    info.delete_revisions(*revs).execute()
    return True


async def settle(a: Agent, repo: str, tally: Tally) -> None:
    """Collect a finished download of `a`."""
    task = a.downloads.pop(repo)
    code, err, t0, t1 = await task
    if code == 0:
        tally.downloads_ok += 1
    elif repo in a.killed_under:
        tally.downloads_cut += 1
    elif refused_in_outage(tally, code, err, t0, t1):
        tally.refused_in_outage.append(f"{a.name} {repo}: {err.splitlines()[-1]}")
    else:
        tally.failures.append(f"{a.name} {repo}: exit {code}: {err[-300:]}")


def refused_in_outage(tally: Tally, code: int, err: str, started: float, ended: float) -> bool:
    """A download that ran into a mirror outage while it resolved the revision and
    said so in one line: what it must do when no peer can name the revision either
    (metadata is retried for ~1 s only, so that peers' revision manifests are asked
    soon); blob bytes, once flowing, ride an outage out."""
    one_line = len(err.strip().splitlines()) == 1
    during = any(started <= hi and ended >= lo for lo, hi in tally.outages)
    return code == 3 and one_line and "cannot reach" in err and during


async def reap(agents: list[Agent], tally: Tally) -> None:
    for a in agents:
        for repo in [r for r, t in a.downloads.items() if t.done()]:
            await settle(a, repo, tally)


def mirror_fault(m: ThreadedMirror, rnd: random.Random, tally: Tally) -> str:
    kind = rnd.choice(["down", "drop", "status", "bad_range", "ignore_range", "stall"])
    if kind == "down":
        seconds = rnd.uniform(2, 6)
        m.down_for(seconds)
        tally.outages.append((time.monotonic(), time.monotonic() + seconds))
    elif kind == "drop":
        m.add_fault(Fault("drop_after", after_bytes=rnd.randrange(1, 4) * MiB, times=3))
    elif kind == "status":
        m.add_fault(Fault("status", status=rnd.choice([500, 503, 429]), times=2))
    elif kind == "bad_range":
        m.add_fault(Fault("bad_content_range", times=1))
    elif kind == "ignore_range":
        m.add_fault(Fault("ignore_range", times=1))
    else:
        m.add_fault(Fault("stall", after_bytes=MiB, stall_seconds=3, times=1))
    return kind


async def soak(args: argparse.Namespace) -> Tally:
    rnd = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-soak-"))
    print(f"seed {args.seed}; cycles {args.cycles}; work dir {work}", flush=True)
    repos = make_repos(work / "src", rnd, args.repos)
    sources = [RepoSource("model", name, d) for name, (d, _) in repos.items()]
    tally = Tally()
    agents = [Agent(f"agent{i}", f"127.0.0.{i + 2}", work / f"agent{i}") for i in range(3)]
    t_start = time.monotonic()
    with ThreadedMirror(sources, client_rate=args.mirror_rate * MiB) as m:
        port = free_port()
        tlog = await asyncio.to_thread(open, work / "tracker.log", "ab")
        tracker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tracker", "--listen", f"127.0.0.1:{port}", "--ttl", "9",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=tlog,
        )  # fmt: skip
        tlog.close()
        assert tracker.stdout is not None
        url = (await tracker.stdout.readline()).decode().strip()
        try:
            for a in agents:
                await start_agent(a, m.url, url)
            deadline = t_start + args.max_seconds
            for cycle in range(args.cycles):
                if time.monotonic() > deadline:
                    print(f"time bound reached after {cycle} cycles", flush=True)
                    break
                tally.cycles += 1
                await reap(agents, tally)
                alive = [a for a in agents if a.alive]
                dead = [a for a in agents if not a.alive]
                choices = ["download"] * 4 + ["evict", "kill", "fault"] + ["restart"] * 2
                action = rnd.choice(choices)
                if (action == "restart" and not dead) or (action == "kill" and len(alive) < 2):
                    action = "download"
                tally.actions[action] = tally.actions.get(action, 0) + 1
                note = ""
                if action == "download":
                    a = rnd.choice(alive)
                    repo = rnd.choice(sorted(repos))
                    if repo not in a.downloads:
                        a.killed_under.discard(repo)
                        a.launched.pop(repo, None)
                        if not any(not t.done() for t in a.downloads.values()):
                            start = (held_bytes(a, repo), await received(a))
                            a.launched[repo] = start
                        a.downloads[repo] = asyncio.create_task(cli_download(a, repo))
                    note = f"{a.name} {repo}"
                elif action == "evict":
                    a = rnd.choice(agents)
                    repo = rnd.choice(sorted(repos))
                    if repo in a.downloads:
                        note = f"{a.name} {repo}: downloading, left"
                    else:
                        note = f"{a.name} {repo}: {'evicted' if evict(a, repo) else 'not held'}"
                elif action == "kill":
                    busy = [x for x in alive if any(not t.done() for t in x.downloads.values())]
                    # mostly in the middle of a download: that is what a kill can break
                    a = rnd.choice(busy if busy and rnd.random() < 0.8 else alive)
                    running = [r for r, t in a.downloads.items() if not t.done()]
                    a.cut_alone = {}
                    if len(running) == 1 and running[0] in a.launched:
                        # its bytes so far, to count what the kill loses
                        held, at_start = a.launched[running[0]]
                        try:
                            a.cut_alone = {running[0]: (held, await received(a) - at_start)}
                        except (aiohttp.ClientError, TimeoutError):
                            pass
                    assert a.proc is not None
                    a.proc.send_signal(signal.SIGKILL)
                    await a.proc.wait()
                    a.killed_under |= set(running)
                    tally.kills += 1
                    tally.kills_mid_download += bool(running)
                    note = f"{a.name} (downloading {', '.join(running) or 'nothing'})"
                elif action == "restart":
                    for a in dead:
                        await start_agent(a, m.url, url)
                        await redo_cut_downloads(a, repos, tally)
                    note = ", ".join(a.name for a in dead)
                else:
                    note = mirror_fault(m, rnd, tally)
                print(f"cycle {cycle + 1:3}: {action:8} {note}", flush=True)
                await asyncio.sleep(rnd.uniform(0.2, 2.0))
            # the end: everyone back, every cut download done again, all settled
            m.clear_faults()
            for a in agents:
                if not a.alive:
                    await start_agent(a, m.url, url)
                    await redo_cut_downloads(a, repos, tally)
            for a in agents:
                for repo in list(a.downloads):
                    await settle(a, repo, tally)
        finally:
            for a in agents:
                if a.alive and a.proc is not None:
                    a.proc.terminate()
                    await a.proc.wait()
            tracker.kill()
            await tracker.wait()
    print(f"\nwall time {time.monotonic() - t_start:.0f} s; verifying the caches", flush=True)
    for a in agents:
        report = await asyncio.to_thread(check_cache, a.cache)
        print(f"{a.name}: {report.blobs} blobs verified, {len(report.problems)} problems")
        tally.failures += [f"{a.name}: {p}" for p in report.problems]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return tally


async def redo_cut_downloads(a: Agent, repos: dict[str, tuple[Path, int]], tally: Tally) -> None:
    """After a restart: the downloads a kill cut, run again now (the user's retry).
    For a download that ran alone: what it received before the kill and after the
    restart, minus what it needed, is what the kill cost."""
    for repo in sorted(a.killed_under):
        if repo in a.downloads:
            await settle(a, repo, tally)
    cut = sorted(a.killed_under)
    a.killed_under = set()
    for repo in cut:
        code, err, t0, t1 = await cli_download(a, repo)
        if code != 0 and refused_in_outage(tally, code, err, t0, t1):
            tally.refused_in_outage.append(f"{a.name} {repo}: {err.splitlines()[-1]}")
            continue
        if code != 0:
            tally.failures.append(f"{a.name} {repo} after restart: exit {code}: {err[-300:]}")
            continue
        tally.downloads_ok += 1
        if repo in a.cut_alone and len(cut) == 1:
            held, before = a.cut_alone[repo]
            after = await received(a)  # since the restart: this download only
            waste = max(0, before + after - (repos[repo][1] - held))
            tally.refetch_samples.append(waste)
            tally.refetched += waste
    a.cut_alone = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--repos", type=int, default=5)
    ap.add_argument("--mirror-rate", type=int, default=16, help="MiB/s per client")
    ap.add_argument("--max-seconds", type=float, default=900, help="bound on the cycles")
    ap.add_argument("--work", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 16)
    tally = asyncio.run(soak(args))
    print(f"\nseed {args.seed}: {tally.cycles} cycles {dict(sorted(tally.actions.items()))}")
    print(f"downloads: {tally.downloads_ok} complete, {tally.downloads_cut} cut by a kill")
    print(f"downloads started while the mirror was down, refused with one line: "
          f"{len(tally.refused_in_outage)}")  # fmt: skip
    for r in tally.refused_in_outage:
        print(f"  {r}")
    print(f"kills: {tally.kills} ({tally.kills_mid_download} in the middle of a download)")
    samples = ", ".join(f"{b / MiB:.1f}" for b in tally.refetch_samples) or "none"
    print(f"bytes refetched after kills: {tally.refetched / MiB:.1f} MiB in all "
          f"(per measured kill, MiB: {samples})")  # fmt: skip
    print(f"failures: {len(tally.failures)}")
    for f in tally.failures:
        print(f"  {f}")
    sys.exit(1 if tally.failures else 0)


if __name__ == "__main__":
    main()
