"""Shared by the tests that run real agents in this process (each on its own 127.0.0.x):
their config, their lifetime, and the calls the tests make of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

from peer.agent.daemon import Agent
from peer.agent.requests import DownloadRequest, Event
from peer.config import AgentConfig, DownloadOptions, HubSettings


def write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def tree_of(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` by relative path (huggingface_hub's .cache left out)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not {".cache", ".git"} & set(p.relative_to(folder).parts)
    }


def config(
    root: Path,
    ip: str,
    mirrors: str | tuple[str, ...],
    peers: tuple[tuple[str, int], ...] = (),
    *,
    token: str | None = None,
    download: DownloadOptions | None = None,
    **kw: Any,
) -> AgentConfig:
    """An agent listening on `ip` (ports picked by the OS), no mDNS unless asked, with
    short timeouts for loopback."""
    return AgentConfig(
        hub=HubSettings(
            mirrors=(mirrors,) if isinstance(mirrors, str) else mirrors,
            token=token,
            cache_dir=root / "cache",
        ),
        state_dir=root / "state",
        listen=(ip, 0),
        local_listen=(ip, 0),
        bt_listen=(ip, 0),
        peers=peers,
        mdns=kw.pop("mdns", False),
        stall_timeout=kw.pop("stall_timeout", 1.5),
        peer_grace=kw.pop("peer_grace", 2.0),
        download=download or DownloadOptions(quiet=True, read_timeout=3.0),
        **kw,
    )


@asynccontextmanager
async def agent(cfg: AgentConfig) -> AsyncIterator[Agent]:
    async with Agent(cfg) as a:
        stop = asyncio.Event()
        task = asyncio.create_task(a.serve(stop))
        await a.peers.check_all()
        try:
            yield a
        finally:
            stop.set()
            await task


def peer_of(a: Agent) -> tuple[str, int]:
    return (a.config.listen[0], a.peer_port)


def endpoint(a: Agent) -> str:
    """The agent's local listener: HF_ENDPOINT for Hub clients."""
    return f"http://{a.config.local_listen[0]}:{a.local_port}"


async def fetch(a: Agent, repo_id: str = "org/m", **kw: Any) -> dict[str, Any]:
    """A download run by the agent, as `hfswarm download --agent` asks for it as the
    agent's own user (who may have the agent use its token)."""

    async def emit(_: Event) -> None:
        return None

    kw.setdefault("agent_token", True)
    done = await a.local.run_download(DownloadRequest(repo_id=repo_id, **kw), emit)
    return done.to_json()  # the "done" line the local API sends


async def snapshot(a: Agent, repo_id: str, cache: Path, **kw: Any) -> Path:
    """huggingface_hub's snapshot_download with the agent as its endpoint."""
    kw.setdefault("token", False)
    path = await asyncio.to_thread(
        snapshot_download, repo_id, endpoint=endpoint(a), cache_dir=cache, **kw
    )
    return Path(path)
