"""A small HTTP/1.1 client for the agent's local API, on asyncio streams alone.

The CLI talks to one endpoint it knows (JSON in, JSON or NDJSON out, one request per
connection), so it needs none of aiohttp, whose import cost the CLI 0.15-0.2 s of CPU
on every run (docs/benchmarks.md 8.13). Answers are still read as untrusted: bounded
head, lines and bodies; anything malformed is an `AgentHttpError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from peer.errors import NetworkError

MAX_HEAD_LINE = 64 * 1024
MAX_HEADERS = 100
MAX_BODY = 64 * 1024 * 1024  # a `Done` names every file of a snapshot: keep room
CONNECT_TIMEOUT = 5.0
READ_BLOCK = 64 * 1024


class Unreachable(NetworkError):
    """Nothing answered the connect (no request was sent)."""


class AgentHttpError(NetworkError):
    """The connection broke, or the answer was not HTTP as the agent speaks it."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    _reader: asyncio.StreamReader = field(repr=False)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: chunked, by Content-Length, or to the close."""
        r = self._reader
        try:
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                while True:
                    size_line = await r.readline()
                    try:
                        size = int(size_line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        raise AgentHttpError(f"bad chunk size {size_line[:40]!r}") from None
                    if size == 0:
                        for _ in range(MAX_HEADERS + 1):  # trailers, then the blank line
                            if not (await r.readline()).strip():
                                return
                        raise AgentHttpError(f"more than {MAX_HEADERS} trailers")
                    if size < 0 or size > MAX_BODY:
                        raise AgentHttpError(f"a chunk of {size} bytes")
                    yield await r.readexactly(size)
                    await r.readexactly(2)  # CRLF
            elif "content-length" in self.headers:
                try:
                    left = int(self.headers["content-length"])
                except ValueError:
                    raise AgentHttpError("bad Content-Length") from None
                while left > 0:
                    data = await r.read(min(left, READ_BLOCK))
                    if not data:
                        raise AgentHttpError("the answer ended early")
                    left -= len(data)
                    yield data
            else:
                while data := await r.read(READ_BLOCK):
                    yield data
        except asyncio.IncompleteReadError as exc:
            raise AgentHttpError("the answer ended early") from exc
        except ValueError as exc:  # a chunk-size line over the reader's limit
            raise AgentHttpError("a line of the answer is too long") from exc

    async def read(self) -> bytes:
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > MAX_BODY:
                raise AgentHttpError(f"an answer over {MAX_BODY} bytes")
        return bytes(body)

    async def json(self) -> Any:
        return json.loads(await self.read())

    async def lines(self) -> AsyncIterator[bytes]:
        """The body line by line (NDJSON), each as soon as its newline arrives."""
        pending = bytearray()
        async for chunk in self.chunks():
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                yield bytes(pending[: end + 1])
                del pending[: end + 1]
            if len(pending) > MAX_BODY:
                raise AgentHttpError(f"a line over {MAX_BODY} bytes")
        if pending:
            yield bytes(pending)


@contextlib.asynccontextmanager
async def request(
    base_url: str,
    method: str,
    route: str,
    body: Any = None,
    *,
    within: float | None,
) -> AsyncIterator[Response]:
    """One request on its own connection; the answer's head read, its body left to the
    caller. `within` seconds bound all of it, the caller's reading included (None: no
    bound once connected, for a job followed to its end)."""
    url = urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise Unreachable(f"not an http(s) URL: {base_url!r}")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError as exc:
        raise Unreachable(f"bad port in {base_url!r}") from exc
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    if url.port is not None:
        host += f":{url.port}"
    connect_in = CONNECT_TIMEOUT if within is None else min(CONNECT_TIMEOUT, within)
    try:
        async with asyncio.timeout(connect_in):
            reader, writer = await asyncio.open_connection(
                url.hostname,
                port,
                ssl=ssl.create_default_context() if url.scheme == "https" else None,
                limit=MAX_HEAD_LINE,
            )
    except (OSError, TimeoutError) as exc:
        raise Unreachable(f"cannot connect to {base_url}: {exc}") from exc
    try:
        async with asyncio.timeout(within):
            head = [
                f"{method} {url.path.rstrip('/')}{route} HTTP/1.1",
                f"Host: {host}",
                "Accept: application/json",
                "User-Agent: hfswarm",
                "Connection: close",
            ]
            data = b""
            if body is not None:
                data = json.dumps(body).encode()
                head.append("Content-Type: application/json")
            if body is not None or method not in ("GET", "HEAD"):
                head.append(f"Content-Length: {len(data)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            await writer.drain()
            yield await _read_head(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> Response:
    try:
        status_line = await reader.readline()
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise AgentHttpError(f"not an HTTP answer: {status_line[:60]!r}")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise AgentHttpError("the answer's head ended early")
            if not line.strip():
                return Response(int(parts[1]), headers, reader)
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise AgentHttpError(f"a bad header line: {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
    except ValueError as exc:  # a line over the reader's limit
        raise AgentHttpError("a line of the answer's head is too long") from exc
    raise AgentHttpError(f"more than {MAX_HEADERS} headers")
