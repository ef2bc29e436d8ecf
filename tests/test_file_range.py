"""Files out by sendfile (`peer.serving.file_range.FileSender`, the Hub API's streamed
answers), on a real aiohttp server behind the agent's listener limits and real sockets:
the bytes arrive whole (and by range), a client that reads nothing is cut after the
listener's `write_stall` (sendfile bypasses the transport's pause_writing, where that
timer lives), and a slow client that keeps reading is not."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from peer.serving.file_range import FileSender
from peer.serving.limits import ListenerLimits, start_listener, write_stall_of

MiB = 1 << 20


@dataclass
class Served:
    url: str
    data: bytes
    sent: list[int] = field(default_factory=list)  # bytes each answer counted as sent
    ended: list[float] = field(default_factory=list)  # monotonic time each answer ended


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, size: int, write_stall: float) -> AsyncIterator[Served]:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    app = web.Application()
    runner: web.AppRunner | None = None
    served = Served("", data)

    async def blob(request: web.Request) -> web.StreamResponse:
        span = None
        if "start" in request.query:
            span = (int(request.query["start"]), int(request.query["end"]))
        counted = [0]
        start, end = span if span is not None else (0, size)
        resp = web.StreamResponse(status=206 if span else 200)
        resp.content_length = end - start
        if span is not None:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        sender = FileSender(request, write_stall_of(request.transport))
        try:
            with path.open("rb", buffering=0) as fobj:
                await resp.prepare(request)
                pos = start
                while pos < end:
                    n = await sender.send(fobj, pos, end)
                    counted[0] += n
                    pos += n
                await resp.write_eof()
        except ConnectionError:
            if request.transport is not None:
                request.transport.close()
        finally:
            await sender.aclose()
            served.sent.append(counted[0])
            served.ended.append(time.monotonic())
        return resp

    app.router.add_get("/blob", blob)
    limits = ListenerLimits("test", max_connections=16, max_per_ip=0, write_stall=write_stall)
    runner, port = await start_listener(app, "127.0.0.1", 0, limits)
    served.url = f"http://127.0.0.1:{port}/blob"
    try:
        yield served
    finally:
        await runner.cleanup()


def raw_get(url: str, rcvbuf: int) -> socket.socket:
    """A GET on a socket with a small receive buffer (what the kernel takes for the
    client without it reading stays small)."""
    host_port = url.split("/")[2]
    host, port = host_port.split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    s.sendall(f"GET /blob HTTP/1.1\r\nHost: {host_port}\r\n\r\n".encode())
    return s


async def test_a_file_goes_out_whole_and_by_range(tmp_path: Path) -> None:
    async with (
        serving(tmp_path, 40 * MiB + 123, write_stall=30.0) as srv,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(srv.url) as r:
            assert r.status == 200 and r.content_length == len(srv.data)
            assert await r.read() == srv.data
        start, end = 3 * MiB + 7, 29 * MiB + 11
        async with client.get(srv.url, params={"start": start, "end": end}) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(srv.data)}"
            assert await r.read() == srv.data[start:end]
    assert srv.sent == [len(srv.data), end - start]


async def test_a_client_that_reads_nothing_is_cut_after_the_write_stall(tmp_path: Path) -> None:
    async with serving(tmp_path, 96 * MiB, write_stall=1.0) as srv:
        s = raw_get(srv.url, 64 << 10)
        t0 = time.monotonic()
        try:
            for _ in range(100):  # the answer ends within the stall, plus a chunk's pace
                if srv.ended:
                    break
                await asyncio.sleep(0.1)
            assert srv.ended, "an answer to a client that reads nothing is still going"
            assert srv.ended[0] - t0 < 5.0
            assert srv.sent[0] < len(srv.data)
            # The connection is gone: what the client reads now ends short of the body.
            s.setblocking(False)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.get_running_loop().sock_recv(s, 1 << 20):
                    got += len(chunk)
            assert got < len(srv.data)
        finally:
            s.close()


async def test_a_slow_client_that_keeps_reading_is_not_cut(tmp_path: Path) -> None:
    """About 1 MB/s with a 1 s write_stall: chunks paced on the buffers' fast intake
    take longer than the stall to go out, and must not be taken for a stall."""
    size = 4 * MiB
    async with serving(tmp_path, size, write_stall=1.0) as srv:
        s = raw_get(srv.url, 64 << 10)
        s.setblocking(False)
        loop = asyncio.get_running_loop()
        got = bytearray()
        try:
            while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < size:
                chunk = await asyncio.wait_for(loop.sock_recv(s, 256 << 10), 10)
                assert chunk, f"cut after {len(got)} bytes"
                got += chunk
                await asyncio.sleep(0.1)
        finally:
            s.close()
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == srv.data
    assert srv.sent == [size]


@pytest.mark.parametrize("stall", [2.5])
async def test_the_listeners_write_stall_reaches_the_answer(tmp_path: Path, stall: float) -> None:
    async with serving(tmp_path, MiB, write_stall=stall) as srv:
        seen: list[float] = []
        app = web.Application()

        async def probe(request: web.Request) -> web.Response:
            seen.append(write_stall_of(request.transport))
            return web.Response(text="ok")

        app.router.add_get("/", probe)
        limits = ListenerLimits("t", max_connections=4, max_per_ip=0, write_stall=stall)
        runner, port = await start_listener(app, "127.0.0.1", 0, limits)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.get(f"http://127.0.0.1:{port}/") as r:
                    assert r.status == 200
        finally:
            await runner.cleanup()
    assert srv.url and seen == [stall]
    assert write_stall_of(None) == ListenerLimits.write_stall


async def test_a_client_that_leaves_after_the_headers_is_no_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that takes the headers and resets the connection (a Hub client that
    gave up, Ctrl-C) is a client gone, never an 'Error handling request' with a
    traceback: the transport it closed meanwhile made `loop.sendfile` raise
    RuntimeError, not a ConnectionError."""
    caplog.set_level(logging.ERROR, logger="aiohttp")
    async with serving(tmp_path, 16 * MiB, write_stall=30.0) as srv:
        loop = asyncio.get_running_loop()
        for _ in range(40):
            s = raw_get(srv.url, 64 << 10)
            s.setblocking(False)
            got = b""
            while b"\r\n\r\n" not in got:
                got += await asyncio.wait_for(loop.sock_recv(s, 1 << 20), 10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset, at once
        for _ in range(50):
            if len(srv.ended) == 40:
                break
            await asyncio.sleep(0.1)
    assert len(srv.ended) == 40
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors[:3]
