"""Agents and trackers as separate processes on loopback, for the tests that attack or
kill them: started as users start them (`hfswarm agent`, `hfswarm tracker`), waited for
until they print that they are ready, always stopped (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from peer.cli.demo import loopback_agent_command


@dataclass
class AgentProcess:
    proc: asyncio.subprocess.Process
    ip: str
    info: dict[str, Any]  # the agent's ready line (ports, agent id), plus "ip"
    log: Path  # its stderr

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{self.info['peer_port']}"

    @property
    def local_url(self) -> str:
        return f"http://{self.ip}:{self.info['local_port']}"

    @property
    def peer_addr(self) -> str:
        return f"{self.ip}:{self.info['peer_port']}"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def agent_process(
    root: Path,
    ip: str,
    mirror: str,
    *extra: str,
    peers: Sequence[str] = (),
    cmd: list[str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> AsyncIterator[AgentProcess]:
    """`hfswarm agent` on `ip` (state and cache under `root`, ports from the kernel, mDNS
    off unless `cmd` says otherwise); its stderr goes to ``<root>.log``."""
    cmd = cmd or loopback_agent_command(root, ip, mirror, peers, *extra)
    log = root.parent / f"{root.name}.log"
    err = await asyncio.to_thread(open, log, "ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=err, preexec_fn=preexec_fn
        )
    finally:
        err.close()  # the child has its own copy
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        info: dict[str, Any] = json.loads(line or b"{}")
        assert info.get("ready"), f"the agent did not start: {log.read_text()[-2000:]}"
        info["ip"] = ip
        yield AgentProcess(proc, ip, info, log)
    finally:
        await _stop(proc)


@asynccontextmanager
async def tracker_process(
    log: Path, listen: str = "127.0.0.1:0", *args: str, preexec_fn: Callable[[], None] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`hfswarm tracker`; yields the process and its URL (its first stdout line)."""
    err = await asyncio.to_thread(open, log, "ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tracker", "--listen", listen, *args,
            stdout=asyncio.subprocess.PIPE, stderr=err, preexec_fn=preexec_fn,
        )  # fmt: skip
    finally:
        err.close()
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert url.startswith("http://"), f"the tracker did not start; see {log}"
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def answers_within(url: str, seconds: float = 1.0, local_ip: str | None = None) -> float:
    """GET `url` on a fresh connection (from `local_ip` if given): the time it took.
    Fails if it is not a 200 within `seconds`."""
    t0 = time.monotonic()
    conn = aiohttp.TCPConnector(local_addr=(local_ip, 0) if local_ip else None, force_close=True)
    async with (
        aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=seconds)) as s,
        s.get(url) as r,
    ):
        assert r.status == 200, (url, r.status)
        await r.read()
    took = time.monotonic() - t0
    assert took < seconds, (url, took)
    return took
