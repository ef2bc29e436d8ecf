"""Sending bytes [start, end) of a verified file: one pread ahead, in a thread, while the
previous chunk is written; each write waits for the client, so a reader that does not
read holds at most two chunks of memory. Shared by the peer API (`/v1/blobs`) and the
Hub API (``resolve``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

from aiohttp import web


async def write_range(
    resp: web.StreamResponse,
    fd: int,
    start: int,
    end: int,
    chunk_size: int,
    on_sent: Callable[[int], None] | None = None,
    throttle: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Write [start, end) of `fd` to a prepared response. Raises ConnectionResetError if
    the file turns out shorter (the caller must then cut the connection, so a short body
    is never taken for a whole one). `throttle(n)` waits for a rate cap's leave."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[bytes] | None = None
    pos = start
    try:
        if pos < end:
            pending = loop.run_in_executor(None, os.pread, fd, min(chunk_size, end - pos), pos)
        while pos < end:
            assert pending is not None
            chunk, pending = await pending, None
            if not chunk:  # cannot happen to a blob in blobs/ (never rewritten)
                raise ConnectionResetError("file shrank while being served")
            nxt = pos + len(chunk)
            if nxt < end:
                pending = loop.run_in_executor(None, os.pread, fd, min(chunk_size, end - nxt), nxt)
            if throttle is not None:
                await throttle(len(chunk))
            await resp.write(chunk)
            if on_sent is not None:
                on_sent(len(chunk))
            pos = nxt
    finally:
        if pending is not None:
            with contextlib.suppress(BaseException):
                await pending


async def send_range(
    request: web.Request,
    fd: int,
    size: int,
    span: tuple[int, int] | None,
    chunk_size: int,
    headers: dict[str, str] | None = None,
    on_sent: Callable[[int], None] | None = None,
    throttle: Callable[[int], Awaitable[None]] | None = None,
) -> web.StreamResponse:
    """The answer to a GET of `fd` (all of it, or `span` as a 206). A client that goes
    away, or is cut off for not reading, gets its connection closed, so a short body is
    never taken for a whole one. The caller closes `fd`."""
    start, end = span if span is not None else (0, size)
    resp = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
    resp.content_type = "application/octet-stream"
    resp.content_length = end - start
    resp.headers["Accept-Ranges"] = "bytes"
    if span is not None:
        resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    try:
        await resp.prepare(request)
        await write_range(resp, fd, start, end, chunk_size, on_sent, throttle)
        await resp.write_eof()
    except ConnectionError:
        if request.transport is not None:
            request.transport.close()
    return resp
