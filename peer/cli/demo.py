"""`hfswarm demo`: a local mirror, three agents on loopback, one model moving between them.

Agent 1 fetches the model from the mirror (the first fetch of a new model), then agents
2 and 3 fetch it at the same time and get it from agent 1 and from each other. The
table at the end shows, per agent, the time taken and the bytes from peers versus from
the mirror, and the mirror's own count of file bytes it served. Nothing leaves the
machine: every process listens on 127.0.0.x.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from peer.errors import HfswarmError, LocalError
from peer.mirror_server.generate import generate_model_repo
from peer.transfer.progress import human_bytes

REPO = "demo/model"


def loopback_agent_command(
    root: Path, ip: str, mirror: str, peers: Sequence[str] = (), *extra: str
) -> list[str]:
    """`hfswarm agent` on one loopback address with every port picked by the kernel,
    state under `root`, mDNS off (multicast must not leave the machine), and static
    peers. The demo, the swarm benchmark and the agent tests all start agents this way;
    the agent prints one JSON line with its ports when it is ready. The config file is
    an empty one: none of this machine's settings leak in."""
    cmd = [sys.executable, "-m", "peer.cli.main", "agent",
           "--cache-dir", str(root / "cache"), "--state-dir", str(root / "state"),
           "--listen", f"{ip}:0", "--local-listen", f"{ip}:0", "--bt-listen", f"{ip}:0",
           "--member-listen", f"{ip}:0",
           "--mirror", mirror, "--no-mdns",
           "--config", os.devnull]  # fmt: skip
    for p in peers:
        cmd += ["--peer", p]
    return [*cmd, *extra]


@dataclass
class Proc:
    name: str
    proc: asyncio.subprocess.Process
    info: dict[str, Any]


async def _start(name: str, cmd: list[str], log: Path, ready: str) -> Proc:
    out = await asyncio.to_thread(open, log, "wb")  # the child keeps it open
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=out)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
    except TimeoutError:
        proc.kill()
        raise LocalError(f"{name} did not start within 60 s", hint=f"see {log}") from None
    if ready not in line.decode():
        await proc.wait()
        raise LocalError(f"{name} failed to start", hint=f"see {log}")
    text = line.decode().strip()
    info = json.loads(text) if text.startswith("{") else {"url": text}
    return Proc(name, proc, info)


async def _stop(p: Proc) -> None:
    if p.proc.returncode is None:
        p.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(p.proc.wait(), 15)
        except TimeoutError:
            p.proc.kill()
            await p.proc.wait()


async def _get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        r.raise_for_status()
        data: dict[str, Any] = await r.json()
        return data


async def _download(exe: list[str], agent: Proc, cache: Path) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *exe,
        "download",
        REPO,
        "--agent",
        f"http://{agent.info['host']}:{agent.info['local_port']}",
        "--cache-dir",
        str(cache),
        "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise LocalError(f"download on {agent.name} failed: {err.decode().strip()}")
    status = await _get_json(f"http://{agent.info['host']}:{agent.info['local_port']}/v1/status")
    status["snapshot"] = out.decode().strip().splitlines()[-1]
    return elapsed, status


async def run_demo(workdir: Path | None, size_mb: int, keep: bool) -> int:
    work = workdir or Path(tempfile.mkdtemp(prefix="hfswarm-demo-"))
    exe = [sys.executable, "-m", "peer.cli.main"]
    print(f"hfswarm demo in {work}")
    print(f"generating a {size_mb} MB model (3 safetensors shards) ...", flush=True)
    model = await asyncio.to_thread(
        generate_model_repo, work / "model", total_size=size_mb * 1_000_000, shards=3, seed=1
    )
    procs: list[Proc] = []
    try:
        mirror = await _start(
            "mirror",
            [*exe, "mirror", "serve", "--listen", "127.0.0.1:0", f"model:{REPO}={model}"],
            work / "mirror.log",
            "http",
        )
        procs.append(mirror)
        url = mirror.info["url"]
        agents: list[Proc] = []
        for i in (1, 2, 3):
            host = f"127.0.0.{i + 1}"
            root = work / f"agent{i}"
            peers = [f"{o.info['host']}:{o.info['peer_port']}" for o in agents]
            cmd = loopback_agent_command(root, host, url, peers)
            agent = await _start(f"agent {i}", cmd, work / f"agent{i}.log", "ready")
            agent.info["host"] = host
            agents.append(agent)
            procs.append(agent)
        print(f"mirror at {url}; agents on 127.0.0.2-4\n")
        print("agent 1 fetches the model (nobody has it yet: from the mirror) ...", flush=True)
        results = {1: await _download(exe, agents[0], work / "agent1" / "cache")}
        print("agents 2 and 3 fetch it at the same time ...", flush=True)
        both = await asyncio.gather(
            _download(exe, agents[1], work / "agent2" / "cache"),
            _download(exe, agents[2], work / "agent3" / "cache"),
        )
        results.update({2: both[0], 3: both[1]})
        served = (await _get_json(f"{url}/_mirror/stats"))["blob_bytes"]
        # Uploads happen after an agent's own download: read them at the very end.
        for i, agent in enumerate(agents, start=1):
            final = await _get_json(
                f"http://{agent.info['host']}:{agent.info['local_port']}/v1/status"
            )
            results[i][1]["bytes_uploaded"] = final["bytes_uploaded"]
    finally:
        await asyncio.gather(*(_stop(p) for p in reversed(procs)))
    total = sum(
        p.stat().st_size
        for p in model.rglob("*")
        if p.is_file() and not p.name.startswith(".hfswarm")
    )
    print(f"\nmodel {REPO}: {human_bytes(total)}\n")
    print(f"{'agent':8s}{'time':>9s}{'from peers':>14s}{'from mirror':>14s}{'uploaded':>12s}")
    for i, (elapsed, st) in results.items():
        print(
            f"{'agent ' + str(i):8s}{elapsed:8.1f}s{human_bytes(st['bytes_from_peers']):>14s}"
            f"{human_bytes(st['bytes_from_mirror']):>14s}"
            f"{human_bytes(st['bytes_uploaded']):>12s}"
        )
    peers = sum(st["bytes_from_peers"] for _, st in results.values())
    print(
        f"\nthe mirror served {human_bytes(served)} of file bytes for 3 copies of the model "
        f"({served / total:.2f}x its size); peers moved {human_bytes(peers)}."
    )
    if not keep and workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"files kept in {work}")
    return 0


def main(workdir: str | None, size_mb: int, keep: bool) -> int:
    try:
        return asyncio.run(run_demo(Path(workdir) if workdir else None, size_mb, keep))
    except HfswarmError as exc:
        print(f"hfswarm demo: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(os.environ.get("HFSWARM_DEMO_DIR"), 300, False))
