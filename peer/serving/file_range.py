"""Sending bytes [start, end) of a verified file.

- `send_range` / `write_range`: one pread ahead, in a thread, while the previous chunk is
  written; each write waits for the client, so a reader that does not read holds at most
  two chunks of memory. The peer API (`/v1/blobs`, under the upload cap), and the Hub
  API for a blob it holds.
- `FileSender`: by sendfile, the kernel copying page-cache pages to the socket with no
  byte through the agent: the Hub API's answer streamed while its fetch runs. A chunk
  is about a second of the client's pace; the next chunk is asked into the page cache
  in a thread while one goes out, so the loop seldom waits on the disk; and a client
  that took nothing for the listener's ``write_stall`` is cut: sendfile bypasses the
  transport's ``pause_writing``, where the listener's own stall timer lives. (A client
  on loopback spends more CPU reading what sendfile sent than what was written through
  the transport: docs/benchmarks.md 8.24; a held blob goes out by `send_range`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import BinaryIO

from aiohttp import web

# sendfile chunks: at least this much (the first one too), at most `FileSender(most=)`
# and twice the last one, else about PACE_SECONDS of the client's pace on the last one.
SENDFILE_FIRST = 256 << 10
SENDFILE_MOST = 64 << 20
PACE_SECONDS = 1.0
# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_acked at byte 120 (since Linux 4.2).
_BYTES_ACKED = 120
_TCP_INFO_LEN = 256


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


def _will_need(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to read [offset, offset + length) into the page cache (readahead,
    not waited for)."""
    with contextlib.suppress(OSError, AttributeError):  # no fadvise: sendfile reads
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def _acked(transport: asyncio.BaseTransport) -> int | None:
    """Bytes of this connection the client's end acknowledged (Linux's TCP_INFO
    ``tcpi_bytes_acked``: it stops growing when the client stops reading), or None
    where that cannot be known."""
    sock = transport.get_extra_info("socket")
    tcp_info = getattr(socket, "TCP_INFO", None)
    if sock is None or tcp_info is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED + 8:  # a kernel before 4.2
        return None
    return int.from_bytes(info[_BYTES_ACKED : _BYTES_ACKED + 8], sys.byteorder)


class FileSender:
    """Ranges of files out on one response's connection by ``loop.sendfile``, a chunk at
    a time (`send`), paced to the client and bounded in time: a client that took nothing
    for `stall` s while a chunk is out (its acknowledged bytes did not grow) has its
    connection aborted and `send` raises ConnectionResetError."""

    def __init__(self, request: web.BaseRequest, stall: float, most: int = SENDFILE_MOST) -> None:
        self._request = request
        self._stall = stall
        self._most = most
        self._chunk = SENDFILE_FIRST
        self._ahead: asyncio.Future[None] | None = None

    async def send(self, fobj: BinaryIO, pos: int, end: int) -> int:
        """Send bytes from `pos` (one chunk, not past `end`) of `fobj`; how many."""
        transport = self._request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        loop = asyncio.get_running_loop()
        n = min(self._chunk, end - pos)
        if self._ahead is None:
            await loop.run_in_executor(None, _will_need, fobj.fileno(), pos, n)
        else:
            await self._ahead
        nxt = min(self._most, end - pos - n)
        self._ahead = (
            loop.run_in_executor(None, _will_need, fobj.fileno(), pos + n, nxt) if nxt > 0 else None
        )
        t0 = loop.time()
        job = asyncio.ensure_future(loop.sendfile(transport, fobj, pos, n))
        try:
            mark = _acked(transport)
            while not (await asyncio.wait({job}, timeout=self._stall))[0]:
                now = _acked(transport)
                if now is None or now == mark:  # nothing taken for `stall` s
                    job.cancel()  # first: it unregisters its writer from the socket
                    with contextlib.suppress(BaseException):
                        await job
                    transport.abort()  # and what the kernel still holds for it
                    raise ConnectionResetError(f"the client took nothing for {self._stall:.0f} s")
                mark = now  # slower than the pace asked, but reading: on it goes
            try:
                sent = job.result()
            except RuntimeError as exc:  # "Transport is closing": it went during the await
                if transport.is_closing():
                    raise ConnectionResetError("the client went away") from exc
                raise
        finally:
            if not job.done():
                job.cancel()
                with contextlib.suppress(BaseException):
                    await job
        if sent != n:
            raise ConnectionResetError("short send of a checked range")
        pace = n / max(loop.time() - t0, 1e-3)  # a chunk the socket's buffers took: fast
        grown = min(self._most, 2 * self._chunk, int(pace * PACE_SECONDS))
        self._chunk = max(SENDFILE_FIRST, grown)
        return sent

    async def aclose(self) -> None:
        """Wait for the readahead still asked (it holds the file's fd)."""
        if self._ahead is not None:
            with contextlib.suppress(BaseException):
                await self._ahead
            self._ahead = None
