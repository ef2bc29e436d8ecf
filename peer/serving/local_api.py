"""The agent's local API, for the CLI on this machine (loopback by default; never the
peer-facing listener).

    GET  /v1/status       counters, peers and seeded blobs (JSON)
    POST /v1/downloads    start a download; the answer streams NDJSON events until it ends:
                          {"event": "started", "commit", "files", "total"}
                          {"event": "progress", "done", "total", "from_peers", "from_mirror"}
                          {"event": "done", "path", "commit", ...counters}
                          {"event": "error", "kind", "exit_code", "message"}
    POST /v1/publish      share a folder as repo local/NAME ({"path", "repo_id",
                          "repo_type"}); NDJSON events as above, "done" with the commit.
                          Only for the agent's own user (or root): the agent reads the
                          folder, so another local user could otherwise publish files
                          only the agent's user may read (`peer.serving.caller`)

The download keeps running in the agent if the client goes away; a new request for the
same repo joins the blobs already in flight instead of fetching them twice.

The agent also mounts the Hub API of HF_ENDPOINT mode here (`peer.serving.hub_api`:
``/api/...`` and ``/{repo}/resolve/...``), after these routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from peer.errors import ConfigError, HfswarmError
from peer.hub.metadata import FileSelection
from peer.serving.caller import caller_uid
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


@dataclass(frozen=True)
class PublishSpec:
    """What `hfswarm publish` asks for: a folder (absolute: the agent reads it) to share
    as ``local/NAME``."""

    path: Path
    repo_id: str
    repo_type: str = "model"

    @classmethod
    def from_json(cls, d: Any) -> PublishSpec:
        if not isinstance(d, dict) or not all(
            isinstance(d.get(k), str) for k in ("path", "repo_id")
        ):
            raise ConfigError("publish request needs a path and a repo_id")
        path = Path(d["path"])
        if not path.is_absolute():
            raise ConfigError(f"publish: {path} is not an absolute path")
        return cls(path=path, repo_id=d["repo_id"], repo_type=str(d.get("repo_type") or "model"))

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "repo_id": self.repo_id, "repo_type": self.repo_type}


Emit = Callable[[dict[str, Any]], Awaitable[None]]


class LocalBackend(Protocol):
    async def status(self) -> dict[str, Any]: ...

    async def run_download(self, spec: DownloadSpec, emit: Emit) -> dict[str, Any]: ...

    async def publish(self, spec: PublishSpec, emit: Emit) -> dict[str, Any]: ...


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

    def bad_request(exc: Exception, status: int = 400) -> web.Response:
        msg = exc.one_line() if isinstance(exc, HfswarmError) else f"bad JSON: {exc}"
        return web.json_response(
            {"event": "error", "kind": "ConfigError", "exit_code": 2, "message": msg},
            status=status,
        )

    async def downloads(request: web.Request) -> web.StreamResponse:
        try:
            spec = DownloadSpec.from_json(await request.json())
        except (ValueError, HfswarmError) as exc:
            return bad_request(exc)
        return await run_job(request, lambda emit: backend.run_download(spec, emit))

    async def publish(request: web.Request) -> web.StreamResponse:
        uid = caller_uid(request.transport)
        if uid is None or uid not in (0, os.geteuid()):
            who = "an unidentified caller" if uid is None else f"uid {uid}"
            return bad_request(
                ConfigError(
                    f"the agent publishes only for its own user (uid {os.geteuid()}), "
                    f"not for {who}",
                    hint="run `hfswarm publish` as the agent's user, on the agent's machine "
                    "over loopback",
                ),
                status=403,
            )
        try:
            spec = PublishSpec.from_json(await request.json())
        except (ValueError, HfswarmError) as exc:
            return bad_request(exc)
        return await run_job(request, lambda emit: backend.publish(spec, emit))

    async def run_job(
        request: web.Request, start: Callable[[Emit], Awaitable[dict[str, Any]]]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def emit(event: dict[str, Any]) -> None:
            queue.put_nowait(event)

        async def job() -> None:
            try:
                final = await start(emit)
                queue.put_nowait({**final, "event": "done"})
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
    app.router.add_post("/v1/publish", publish)
    app.on_shutdown.append(cancel_jobs)
    if hub is not None:
        HubApi(hub).mount(app)
    return app


async def iter_ndjson(stream: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    async for line in stream:
        line = line.strip()
        if line:
            yield json.loads(line)
