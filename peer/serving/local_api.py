"""The agent's local API, for the CLI on this machine (loopback by default; never the
peer-facing listener).

    GET  /v1/status       counters, peers and seeded blobs (JSON)
    POST /v1/downloads    start a download; the answer streams NDJSON events until it ends:
                          {"event": "started", "commit", "files", "total"}
                          {"event": "progress", "done", "total", "from_peers", "from_mirror"}
                          {"event": "done", "path", "commit", ...counters}
                          {"event": "error", "kind", "exit_code", "message"}

The download keeps running in the agent if the client goes away; a new request for the
same repo joins the blobs already in flight instead of fetching them twice.

The agent also mounts the Hub API of HF_ENDPOINT mode here (`peer.serving.hub_api`:
``/api/...`` and ``/{repo}/resolve/...``), after these routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from peer.errors import ConfigError, HfswarmError
from peer.hub.metadata import FileSelection
from peer.serving.hub_api import HubApi, HubBackend


@dataclass(frozen=True)
class DownloadSpec:
    """What the CLI asks for; the token is the user's, used for this download only."""

    repo_id: str
    repo_type: str = "model"
    revision: str = "main"
    selection: FileSelection = field(default_factory=FileSelection)
    token: str | None = None
    local_dir: Path | None = None

    @classmethod
    def from_json(cls, d: Any) -> DownloadSpec:
        if not isinstance(d, dict) or not isinstance(d.get("repo_id"), str):
            raise ConfigError("download request needs a repo_id")

        def strs(key: str) -> tuple[str, ...]:
            value = d.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"download request: {key} must be a list of strings")
            return tuple(value)

        local = d.get("local_dir")
        return cls(
            repo_id=d["repo_id"],
            repo_type=str(d.get("repo_type") or "model"),
            revision=str(d.get("revision") or "main"),
            selection=FileSelection(strs("files"), strs("include"), strs("exclude")),
            token=d.get("token") if isinstance(d.get("token"), str) else None,
            local_dir=Path(local) if isinstance(local, str) and local else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "files": list(self.selection.files),
            "include": list(self.selection.include),
            "exclude": list(self.selection.exclude),
            "token": self.token,
            "local_dir": str(self.local_dir) if self.local_dir else None,
        }


Emit = Callable[[dict[str, Any]], Awaitable[None]]


class LocalBackend(Protocol):
    async def status(self) -> dict[str, Any]: ...

    async def run_download(self, spec: DownloadSpec, emit: Emit) -> dict[str, Any]: ...


def error_event(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, HfswarmError):
        return {
            "event": "error",
            "kind": type(exc).__name__,
            "exit_code": exc.exit_code,
            "message": exc.one_line(),
        }
    return {
        "event": "error",
        "kind": "InternalError",
        "exit_code": 1,
        "message": f"internal error in the agent: {exc!r} (a bug; see the agent's log)",
    }


def make_local_app(backend: LocalBackend, hub: HubBackend | None = None) -> web.Application:
    """The CLI's API; with `hub`, also the Hub API of HF_ENDPOINT mode
    (`peer.serving.hub_api`), mounted after the /v1 routes."""

    async def status(_: web.Request) -> web.Response:
        return web.json_response(await backend.status())

    async def downloads(request: web.Request) -> web.StreamResponse:
        try:
            spec = DownloadSpec.from_json(await request.json())
        except (ValueError, HfswarmError) as exc:
            msg = exc.one_line() if isinstance(exc, HfswarmError) else f"bad JSON: {exc}"
            return web.json_response(
                {"event": "error", "kind": "ConfigError", "exit_code": 2, "message": msg},
                status=400,
            )
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def emit(event: dict[str, Any]) -> None:
            queue.put_nowait(event)

        async def job() -> None:
            try:
                final = await backend.run_download(spec, emit)
                queue.put_nowait({"event": "done", **final})
            except Exception as exc:
                queue.put_nowait(error_event(exc))
            finally:
                queue.put_nowait(None)

        # The job is not tied to this connection: a client that goes away (Ctrl-C)
        # leaves the agent finishing the blobs, which it then seeds.
        task = asyncio.get_running_loop().create_task(job())
        jobs.add(task)
        task.add_done_callback(jobs.discard)
        while (event := await queue.get()) is not None:
            with contextlib.suppress(ConnectionError):
                await resp.write(json.dumps(event).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    jobs: set[asyncio.Task[None]] = set()

    async def cancel_jobs(_: web.Application) -> None:
        for task in list(jobs):
            task.cancel()
        for task in list(jobs):
            with contextlib.suppress(BaseException):
                await task

    app = web.Application()
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/downloads", downloads)
    app.on_shutdown.append(cancel_jobs)
    if hub is not None:
        HubApi(hub).mount(app)
    return app


async def iter_ndjson(stream: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    async for line in stream:
        line = line.strip()
        if line:
            yield json.loads(line)
