"""The CLI's HTTP client of the local API (`peer/agent/local_http.py`): job events read
line by line as the agent's real local API streams them, and answers that break the
protocol (a hostile or broken server on the other end) refused with `AgentHttpError`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from peer.agent.local_http import AgentHttpError, Unreachable, request
from peer.serving.local_api import guard

IP = "127.0.0.1"


@contextlib.asynccontextmanager
async def aiohttp_server(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, IP, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://{IP}:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(answer: bytes) -> AsyncIterator[str]:
    """Sends `answer` (whatever it is) to each connection once its request head came."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, IP, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{IP}:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_job_events_arrive_one_line_at_a_time_through_the_local_api_guard() -> None:
    """Each NDJSON line is read as soon as it is written (the progress display would
    otherwise freeze), through the guard the agent puts in front of every route (Host,
    Content-Type), with the JSON body the client sent."""
    release = asyncio.Event()
    got: list[object] = []

    async def job(req: web.Request) -> web.StreamResponse:
        got.append(await req.json())
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(req)
        await resp.write(json.dumps({"event": "progress", "n": 1}).encode() + b"\n")
        await release.wait()  # the client must see line 1 before line 2 exists
        await resp.write(b'{"event": "done",' + b' "pad": "' + b"x" * 200_000 + b'"}\n')
        await resp.write_eof()
        return resp

    app = web.Application(middlewares=[guard])
    app.router.add_post("/v1/downloads", job)
    async with aiohttp_server(app) as url:
        async with request(url, "POST", "/v1/downloads", {"repo_id": "a/b"}, within=30) as r:
            assert r.status == 200
            assert "chunked" in r.headers["transfer-encoding"]
            lines = r.lines()
            async with asyncio.timeout(10):  # not held back until the body ends
                first = json.loads(await anext(lines))
            assert first == {"event": "progress", "n": 1}
            release.set()
            second = json.loads(await anext(lines))
            assert second["event"] == "done" and len(second["pad"]) == 200_000
            with pytest.raises(StopAsyncIteration):
                await anext(lines)
    assert got == [{"repo_id": "a/b"}]


async def test_a_json_answer_and_an_agent_that_refuses() -> None:
    async def status(req: web.Request) -> web.Response:
        return web.json_response({"agent_id": "x" * 16})

    app = web.Application(middlewares=[guard])
    app.router.add_get("/v1/status", status)
    async with aiohttp_server(app) as url:
        async with request(url, "GET", "/v1/status", within=5) as r:
            assert (r.status, await r.json()) == (200, {"agent_id": "x" * 16})
        # The Host the client sends for a loopback name passes the guard too.
        async with request(url.replace(IP, "localhost"), "GET", "/v1/status", within=5) as r:
            assert r.status == 200


async def test_nothing_listening_is_unreachable() -> None:
    server = await asyncio.start_server(lambda _r, _w: None, IP, 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(Unreachable):
        async with request(f"http://{IP}:{port}", "GET", "/v1/status", within=5):
            pass
    with pytest.raises(Unreachable):
        async with request("ftp://127.0.0.1:1", "GET", "/v1/status", within=5):
            pass


BROKEN = {
    "not HTTP": b"SSH-2.0-OpenSSH\r\n\r\n",
    "head cut": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
    "header flood": b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"\r\n{}",
    "endless header line": b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 200_000 + b"\r\n\r\n{}",
    "body cut": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",
    "chunk cut": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{}",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "huge chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffff\r\n{}",
}


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_a_broken_answer_is_an_error_not_a_hang(case: str) -> None:
    async with raw_server(BROKEN[case]) as url:
        with pytest.raises(AgentHttpError):
            async with request(url, "GET", "/v1/status", within=10) as r:
                await r.json()


async def test_a_silent_server_times_out() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(serve, IP, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError):
            async with request(f"http://{IP}:{port}", "GET", "/v1/status", within=0.5) as r:
                await r.json()
    finally:
        server.close()
