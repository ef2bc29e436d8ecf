"""The CLI's side of the agent's local API."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from peer.agent.requests import DownloadRequest, PublishRequest
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
from peer.serving.local_api import iter_ndjson
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

    async def status(self) -> dict[str, Any]:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{self.url}/v1/status", timeout=aiohttp.ClientTimeout(total=5)) as r,
            ):
                r.raise_for_status()
                data: dict[str, Any] = await r.json()
                return data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentUnavailable(
                f"no hfswarm agent answers at {self.url}",
                hint="start one with `hfswarm agent`, or pass --agent URL",
            ) from exc

    async def download(
        self, spec: DownloadRequest, on_event: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        return await self._job("/v1/downloads", spec.to_json(), on_event, "download")

    async def publish(
        self, spec: PublishRequest, on_event: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        return await self._job("/v1/publish", spec.to_json(), on_event, "publish")

    async def _job(
        self,
        route: str,
        body: dict[str, Any],
        on_event: Callable[[dict[str, Any]], None],
        what: str,
    ) -> dict[str, Any]:
        """POST a job and follow its NDJSON events to the final one."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.post(f"{self.url}{route}", json=body) as r,
            ):
                async for event in iter_ndjson(r.content):
                    kind = event.get("event")
                    if kind == "error":
                        code = int(event.get("exit_code", 1))
                        raise AgentReportedError(str(event.get("message")), code)
                    if kind == "done":
                        return event
                    on_event(event)
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
            raise AgentUnavailable(
                f"no hfswarm agent answers at {self.url}",
                hint="start one with `hfswarm agent`, or pass --agent URL",
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AgentUnavailable(
                f"lost the connection to the agent at {self.url}: {exc}",
                hint=f"the agent keeps going; run the {what} again to follow it",
            ) from exc
        raise ConfigError(
            f"the agent ended the {what} without a result", hint="see the agent's log"
        )


def fill_local_dir(local_dir: Path, final: dict[str, Any]) -> int:
    """Copy a finished download from the agent's snapshot into `local_dir`, in THIS
    process (as the user who asked, with their rights: the agent never writes a caller's
    folder), with huggingface_hub's local-dir metadata. Files already current there are
    left alone. Returns how many files were copied."""
    snapshot, commit, entries = Path(str(final["path"])), str(final["commit"]), final["entries"]
    target = LocalDir(local_dir)
    copied = 0
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and is_blob_id(entry[1])
            and isinstance(entry[2], int)
        ):
            raise PeerMisbehaved(
                f"the agent listed a malformed file {entry!r}", hint="see the agent's log"
            )
        path, blob_id, size = entry
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
