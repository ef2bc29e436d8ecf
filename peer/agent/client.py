"""The CLI's side of the agent's local API.

Spoken over the standard library's asyncio streams (`peer/agent/local_http.py`), not
aiohttp: importing aiohttp was half of the CLI's start-up CPU (0.15-0.2 s of 0.37 s on
every `hfswarm download --agent`, docs/benchmarks.md 8.13)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from peer.agent import local_http
from peer.agent.local_http import AgentHttpError, Unreachable
from peer.agent.requests import (
    Done,
    DownloadRequest,
    Event,
    PublishRequest,
    iter_ndjson,
    job_event,
)
from peer.cache.hf_cache import LocalDir, safe_relpath
from peer.errors import (
    ConfigError,
    HfswarmError,
    IntegrityError,
    LocalError,
    NetworkError,
    PeerMisbehaved,
    UserError,
)
from peer.verification.hashing import is_blob_id


class AgentUnavailable(NetworkError):
    pass


class AgentReportedError(HfswarmError):
    """An error the agent reported; keeps the agent's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


_KIND_BASE: dict[int, type[HfswarmError]] = {
    2: UserError,
    3: NetworkError,
    4: IntegrityError,
    5: LocalError,
}


class AgentClient:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _nobody(self, exc: Exception | None = None) -> AgentUnavailable:
        why = f" ({exc.__class__.__name__})" if exc is not None else ""
        return AgentUnavailable(
            f"no hfswarm agent answers at {self.url}{why}",
            hint="start one with `hfswarm agent`, or pass --agent URL",
        )

    async def status(self) -> dict[str, Any]:
        try:
            async with local_http.request(self.url, "GET", "/v1/status", within=5) as r:
                if r.status >= 400:
                    raise self._nobody()
                data: dict[str, Any] = await r.json()
                return data
        except Unreachable as exc:
            raise self._nobody() from exc
        except (AgentHttpError, TimeoutError, OSError, ValueError) as exc:
            raise self._nobody(exc) from exc

    async def call(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        """A short JSON call (pins, limits, prefetch); the agent's error as raised."""
        try:
            async with local_http.request(self.url, method, route, body, within=300) as r:
                data = await r.json()
        except (AgentHttpError, TimeoutError, OSError, ValueError) as exc:
            raise self._nobody(exc) from exc
        if isinstance(data, dict) and data.get("event") == "error":
            raise AgentReportedError(str(data.get("message")), int(data.get("exit_code", 1)))
        if r.status >= 400:
            raise AgentReportedError(f"the agent answered {r.status}", 1)
        return data

    async def download(self, request: DownloadRequest, on_event: Callable[[Event], None]) -> Done:
        """Run a download in the agent (`request.local_dir` is the caller's to fill: see
        `fill_local_dir`), `on_event` seeing its progress."""

        final = await self._job("/v1/downloads", request.to_json(), on_event, "download")
        return Done.from_json(final)

    async def publish(
        self, spec: PublishRequest, on_event: Callable[[Event], None]
    ) -> dict[str, Any]:
        """Run a publish in the agent; the result is its "done" event as sent."""
        return await self._job("/v1/publish", spec.to_json(), on_event, "publish")

    async def _job(
        self,
        route: str,
        body: dict[str, Any],
        on_event: Callable[[Event], None],
        what: str,
    ) -> dict[str, Any]:
        """POST a job and follow its NDJSON events to the final one. An agent that is not
        there (nothing listens) is `AgentUnavailable` with no request sent."""
        try:
            async with local_http.request(self.url, "POST", route, body, within=None) as r:
                async for event in iter_ndjson(r.lines()):
                    kind = event.get("event")
                    if kind == "error":
                        code = int(event.get("exit_code", 1))
                        raise AgentReportedError(str(event.get("message")), code)
                    if kind == "done":
                        return event
                    if (typed := job_event(event)) is not None:
                        on_event(typed)
        except Unreachable as exc:
            raise self._nobody() from exc
        except (AgentHttpError, TimeoutError, OSError) as exc:
            raise AgentUnavailable(
                f"lost the connection to the agent at {self.url}: {exc}",
                hint=f"the agent keeps going; run the {what} again to follow it",
            ) from exc
        raise ConfigError(
            f"the agent ended the {what} without a result", hint="see the agent's log"
        )


def fill_local_dir(local_dir: Path, final: Done) -> int:
    """Copy a finished download from the agent's snapshot into `local_dir`, in THIS
    process (as the user who asked, with their rights: the agent never writes a caller's
    folder), with huggingface_hub's local-dir metadata. Files already current there are
    left alone. Returns how many files were copied."""
    snapshot, commit = final.path, final.commit
    target = LocalDir(local_dir)
    copied = 0
    for path, blob_id, size in final.entries:
        if not is_blob_id(blob_id):
            raise PeerMisbehaved(
                f"the agent listed a malformed blob id {blob_id!r}", hint="see the agent's log"
            )
        if target.is_current(path, commit, blob_id, size):
            continue
        source = snapshot.joinpath(*safe_relpath(path).parts)
        try:
            with source.open("rb"):
                pass
            ok = source.stat().st_size == size
        except OSError as exc:
            raise LocalError(
                f"cannot read {source} from the agent's cache: {exc.strerror}",
                hint="--local-dir is copied from the agent's cache by you, so that cache "
                "must be readable by you: ask the agent's operator to make it so",
            ) from exc
        if not ok:
            raise IntegrityError(
                f"{source} in the agent's cache is not {size} bytes",
                hint="run the download again; the agent re-checks its cache",
            )
        target.copy_in(source, path, commit, blob_id)
        copied += 1
    return copied
