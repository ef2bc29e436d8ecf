"""The CLI's side of the agent's local API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from peer.errors import (
    ConfigError,
    HfswarmError,
    IntegrityError,
    LocalError,
    NetworkError,
    UserError,
)
from peer.serving.local_api import DownloadSpec, PublishSpec, iter_ndjson


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
        self, spec: DownloadSpec, on_event: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        return await self._job("/v1/downloads", spec.to_json(), on_event, "download")

    async def publish(
        self, spec: PublishSpec, on_event: Callable[[dict[str, Any]], None]
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
