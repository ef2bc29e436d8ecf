"""Load benchmark of the LAN tracker: many simulated agents against one tracker process.

    python benchmarks/tracker_load.py                  # 1000 agents, 60 s steady + 10 s burst
    python benchmarks/tracker_load.py --agents 200 --duration 20 --burst 5 --json

Starts ``python -m tracker`` on 127.0.0.1 (loopback only), then:

1. ramp: every agent registers and announces ``--held`` blob ids, spread over ``--ramp`` s;
2. steady (``--duration`` s): each agent heartbeats every ``--heartbeat`` s, asks ``who``
   for ``--who-size`` blobs every ``--who-every`` s, announces again (a few blobs changed,
   as downloads finish) every ``--announce-every`` s, and sends a BitTorrent announce
   for each of its swarms every ``--bt-interval`` s (0: none); all with random phases;
3. burst (``--burst`` s): ``--burst-workers`` loops send ``who`` back to back: the most
   the tracker answers on this machine (note both processes share the CPU).

Reports requests/s and p50/p99/max latency per endpoint and phase, errors, and the
tracker's RSS and CPU (from /proc). Blob popularity is Zipf-like, so a few blobs have
hundreds of holders (answers are capped at 32 per blob) and most have a handful.
Everything is bounded: at most 5000 agents and 600 s per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracker.client import TrackerClient  # noqa: E402
from tracker.errors import TrackerError  # noqa: E402

MAX_AGENTS = 5000
MAX_SECONDS = 600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONFIG_KEYS = (
    "agents",
    "held",
    "blobs",
    "heartbeat",
    "who_every",
    "who_size",
    "announce_every",
    "bt_interval",
    "duration",
    "burst",
    "burst_workers",
    "connections",
)


@dataclass
class Recorder:
    """Latencies (seconds) and errors per (phase, endpoint)."""

    phase: str = "ramp"
    latencies: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    first_error: dict[str, str] = field(default_factory=dict)

    async def timed(self, endpoint: str, call: Any) -> Any:
        start = time.perf_counter()
        try:
            result = await call
        except (TrackerError, aiohttp.ClientError, TimeoutError) as e:
            self.errors[(self.phase, endpoint)] += 1
            self.first_error.setdefault(endpoint, f"{type(e).__name__}: {e}")
            return None
        self.latencies[(self.phase, endpoint)].append(time.perf_counter() - start)
        return result


@dataclass
class ProcSample:
    t: float
    cpu_s: float
    rss_kib: int
    hwm_kib: int


def sample(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    cpu = (int(parts[11]) + int(parts[12])) / CLK_TCK  # utime + stime
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return ProcSample(
        time.monotonic(),
        cpu,
        int(fields["VmRSS"].split()[0]),
        int(fields["VmHWM"].split()[0]),
    )


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Population:
    """Blob ids with Zipf-like popularity, shared by all simulated agents."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.ids = [hashlib.sha256(f"blob-{i}".encode()).hexdigest() for i in range(size)]
        self.weights = [1.0 / (i + 1) ** 0.8 for i in range(size)]
        self.rng = rng

    def pick(self, n: int) -> list[str]:
        out: dict[str, None] = {}
        while len(out) < n:
            for b in self.rng.choices(self.ids, self.weights, k=n - len(out)):
                out[b] = None
        return list(out)


async def bt_announce(
    session: aiohttp.ClientSession, url: str, blob_id: str, peer_id: bytes, port: int
) -> None:
    # A v2 swarm key is the info-hash cut to 20 bytes; any 20 bytes do for load.
    ih = quote_from_bytes(bytes.fromhex(blob_id)[:20], safe="")
    q = (
        f"info_hash={ih}&peer_id={quote_from_bytes(peer_id, safe='')}&port={port}"
        "&uploaded=0&downloaded=0&left=0&event=started&numwant=50&compact=1"
    )
    async with session.get(URL(f"{url}/announce?{q}", encoded=True)) as r:
        body = await r.read()
        if r.status != 200 or b"failure reason" in body:
            raise TrackerError(f"BitTorrent announce failed: {body[:100]!r}")


async def agent(
    i: int,
    args: argparse.Namespace,
    client: TrackerClient,
    session: aiohttp.ClientSession,
    pop: Population,
    rec: Recorder,
    stop: asyncio.Event,
    ramp_end: float,
) -> None:
    rng = random.Random(args.seed * 100_003 + i)
    agent_id = f"sim-{i:05d}"
    api_port, bt_port = 20_000 + i, 40_000 + i
    peer_id = f"-SIM000-{i:012d}".encode()
    held = pop.pick(args.held)
    await asyncio.sleep(rng.uniform(0, args.ramp))
    reg = await rec.timed("register", client.register(agent_id, api_port, bt_port))
    await rec.timed("announce", client.announce(agent_id, held))
    await asyncio.sleep(max(0.0, ramp_end - time.monotonic()))

    now = time.monotonic()
    due = {
        "heartbeat": now + rng.uniform(0, args.heartbeat),
        "who": now + rng.uniform(0, args.who_every),
        "announce": now + rng.uniform(0, args.announce_every),
    }
    bt_every = args.bt_interval / max(1, len(held)) if args.bt_interval > 0 else 0.0
    if bt_every:
        due["bt"] = now + rng.uniform(0, bt_every)
    bt_next = 0
    while not stop.is_set():
        kind, when = min(due.items(), key=lambda kv: kv[1])
        delay = when - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except TimeoutError:
                pass
        if kind == "heartbeat":
            reg = await rec.timed("register", client.register(agent_id, api_port, bt_port))
            if reg is not None and reg.new:  # expired: announce again, as a real agent does
                await rec.timed("announce", client.announce(agent_id, held))
            due[kind] += args.heartbeat
        elif kind == "who":
            await rec.timed("who", client.who(pop.pick(args.who_size)))
            due[kind] += args.who_every
        elif kind == "announce":
            swap = max(1, len(held) // 10)
            held = held[swap:] + [b for b in pop.pick(swap) if b not in held]
            await rec.timed("announce", client.announce(agent_id, held))
            due[kind] += args.announce_every
        else:
            blob_id = held[bt_next % len(held)]
            bt_next += 1
            await rec.timed(
                "bt_announce", bt_announce(session, client.url, blob_id, peer_id, bt_port)
            )
            due[kind] += bt_every


async def burst_worker(
    client: TrackerClient, pop: Population, args: argparse.Namespace, rec: Recorder, until: float
) -> None:
    while time.monotonic() < until:
        await rec.timed("who", client.who(pop.pick(args.who_size)))


def summarize(rec: Recorder, phase: str, seconds: float) -> dict[str, dict[str, float]]:
    out = {}
    for (ph, endpoint), lat in sorted(rec.latencies.items()):
        if ph != phase or not lat:
            continue
        lat_ms = sorted(x * 1000 for x in lat)
        out[endpoint] = {
            "requests": len(lat),
            "per_s": len(lat) / seconds,
            "p50_ms": statistics.median(lat_ms),
            "p99_ms": lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))],
            "max_ms": lat_ms[-1],
            "errors": rec.errors.get((ph, endpoint), 0),
        }
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "--listen", "127.0.0.1:0",
        "--ttl", str(args.heartbeat * 3), "--max-agents", str(args.agents + 10),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise SystemExit(f"the tracker did not start (first line {url!r})")
        rng = random.Random(args.seed)
        pop = Population(args.blobs, rng)
        rec = Recorder()
        stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=args.connections)
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            TrackerClient(url, session=session) as client,
        ):
            base = sample(proc.pid)
            ramp_end = time.monotonic() + args.ramp + 1.0
            tasks = [
                asyncio.create_task(agent(i, args, client, session, pop, rec, stop, ramp_end))
                for i in range(args.agents)
            ]
            await asyncio.sleep(max(0.0, ramp_end - time.monotonic()))
            after_ramp, gen_start = sample(proc.pid), self_cpu()
            rec.phase = "steady"
            await asyncio.sleep(args.duration)
            after_steady, gen_steady = sample(proc.pid), self_cpu()
            health = await client.health()
            stop.set()
            await asyncio.gather(*tasks)
            rec.phase = "burst"
            burst_start, gen_burst_start = sample(proc.pid), self_cpu()
            until = time.monotonic() + args.burst
            await asyncio.gather(
                *(burst_worker(client, pop, args, rec, until) for _ in range(args.burst_workers))
            )
            after_burst, gen_burst = sample(proc.pid), self_cpu()

        def cpu_pct(a: ProcSample, b: ProcSample) -> float:
            return 100 * (b.cpu_s - a.cpu_s) / (b.t - a.t)

        steady_s = after_steady.t - after_ramp.t
        return {
            "config": {k: getattr(args, k) for k in CONFIG_KEYS},
            "steady": summarize(rec, "steady", steady_s),
            "burst": summarize(rec, "burst", after_burst.t - burst_start.t),
            "ramp": summarize(rec, "ramp", after_ramp.t - base.t),
            "tracker": {
                "rss_idle_mib": base.rss_kib / 1024,
                "rss_after_steady_mib": after_steady.rss_kib / 1024,
                "rss_peak_mib": after_burst.hwm_kib / 1024,
                "cpu_steady_pct": cpu_pct(after_ramp, after_steady),
                "cpu_burst_pct": cpu_pct(burst_start, after_burst),
                "health": {
                    "agents": health.agents,
                    "blobs": health.blobs,
                    "swarms": health.swarms,
                    "bt_peers": health.bt_peers,
                },
            },
            "generator_cpu_steady_pct": 100 * (gen_steady - gen_start) / steady_s,
            "generator_cpu_burst_pct": 100
            * (gen_burst - gen_burst_start)
            / (after_burst.t - burst_start.t),
            "first_errors": rec.first_error,
        }
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def print_report(r: dict[str, Any]) -> None:
    c = r["config"]
    print(
        f"{c['agents']} agents, {c['held']} held blobs each (pool {c['blobs']}), heartbeat "
        f"{c['heartbeat']} s, who({c['who_size']}) every {c['who_every']} s, announce every "
        f"{c['announce_every']} s, BitTorrent announce per swarm every {c['bt_interval']} s"
    )
    for phase in ("ramp", "steady", "burst"):
        print(f"\n{phase}:")
        print(
            f"  {'endpoint':12s} {'requests':>9s} {'req/s':>8s} {'p50 ms':>8s} "
            f"{'p99 ms':>8s} {'max ms':>8s} {'errors':>7s}"
        )
        for ep, s in r[phase].items():
            print(
                f"  {ep:12s} {s['requests']:9d} {s['per_s']:8.1f} {s['p50_ms']:8.2f} "
                f"{s['p99_ms']:8.2f} {s['max_ms']:8.2f} {s['errors']:7d}"
            )
    t = r["tracker"]
    print(
        f"\ntracker: RSS {t['rss_idle_mib']:.1f} MiB idle, {t['rss_after_steady_mib']:.1f} MiB "
        f"after steady, peak {t['rss_peak_mib']:.1f} MiB; CPU {t['cpu_steady_pct']:.1f}% "
        f"steady, {t['cpu_burst_pct']:.1f}% burst (100% = one core)"
    )
    print(f"tracker health at the end of steady: {t['health']}")
    print(
        f"load generator CPU: {r['generator_cpu_steady_pct']:.1f}% steady, "
        f"{r['generator_cpu_burst_pct']:.1f}% burst"
    )
    if r["first_errors"]:
        print(f"first error per endpoint: {r['first_errors']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--held", type=int, default=20, help="blob ids each agent holds")
    p.add_argument("--blobs", type=int, default=5000, help="distinct blob ids in the pool")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds (tracker ttl = 3x)")
    p.add_argument("--who-every", type=float, default=10.0)
    p.add_argument("--who-size", type=int, default=10, help="blob ids per who")
    p.add_argument("--announce-every", type=float, default=30.0)
    p.add_argument("--bt-interval", type=float, default=300.0, help="0: no BitTorrent load")
    p.add_argument("--ramp", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=60.0, help="steady phase, seconds")
    p.add_argument("--burst", type=float, default=10.0, help="burst phase, seconds")
    p.add_argument("--burst-workers", type=int, default=32)
    p.add_argument("--connections", type=int, default=256, help="client connection pool")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    if not 1 <= args.agents <= MAX_AGENTS:
        p.error(f"--agents must be 1..{MAX_AGENTS}")
    for name in ("duration", "burst", "ramp"):
        if not 0 <= getattr(args, name) <= MAX_SECONDS:
            p.error(f"--{name} must be 0..{MAX_SECONDS:.0f} seconds")
    if min(args.heartbeat, args.who_every, args.announce_every) < 0.1:
        p.error("intervals must be at least 0.1 s")
    if not 1 <= args.held <= 16_384 or not 1 <= args.who_size <= 512:
        p.error("--held must be 1..16384 and --who-size 1..512")
    if args.blobs < max(args.held, args.who_size) * 2:
        p.error("--blobs must be at least twice --held and --who-size")
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
