"""`SilentPeer`: a peer API backend (`peer.serving.peer_api.PeerBackend`) that holds,
fetches, claims and serves nothing. Tests of lying or half-done peers subclass it and
override only what their peer says.

`fake_agent`: a bare peer API over real HTTP for peers whose lie is in the HTTP itself
(a relay that trickles, stops, or sends wrong bytes): it answers /v1/health and takes
the /v1/have and /v1/relay handlers a test writes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from peer import wire
from peer.transfer.inflight import InFlightBlob


class SilentPeer:
    agent_id = "e" * 32
    bt_port = 0
    blobs = 0

    def health(self) -> wire.Health:
        return wire.Health(agent_id=self.agent_id, bt_port=self.bt_port, blobs=self.blobs)

    def manifests_for(self, ids: tuple[str, ...]) -> list[wire.Manifest]:
        return []

    def fetching_for(self, ids: tuple[str, ...]) -> list[wire.Manifest]:
        return []

    def deals_for(self, ids: tuple[str, ...]) -> list[wire.Deal]:
        return []

    def claims_for(self, ids: tuple[str, ...]) -> list[wire.Claim]:
        return []

    def verified_blob_path(self, blob_id: str) -> Path | None:
        return None

    def relay_of(self, blob_id: str) -> InFlightBlob | None:
        return None

    def relay_after_lead(self, blob_id: str) -> Path | None:
        return None

    def count_upload(self, n: int) -> None:
        return None

    def blob_served(self, blob_id: str, address: str, sent: int) -> None:
        return None

    def revision_for(self, request: wire.RevisionRequest) -> wire.RevisionManifest | None:
        return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def msgpack(message: wire.Message) -> web.Response:
    return web.Response(body=wire.encode(message), content_type="application/msgpack")


async def relay_answer(request: web.Request, size: int) -> tuple[web.StreamResponse, int]:
    """A relay's 206 head for the request's ``bytes=N-``, sent: the body is the test's.
    The response and N."""
    start = int(request.headers.get("Range", "bytes=0-")[6:-1])
    resp = web.StreamResponse(status=206)
    resp.content_length = size - start
    resp.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    await resp.prepare(request)
    return resp, start


@asynccontextmanager
async def fake_agent(
    ip: str, agent_id: str, have: Handler, relay: Handler | None = None, *, bt_port: int = 0
) -> AsyncIterator[int]:
    """A peer API on `ip`: /v1/health as `agent_id` (with `bt_port`), /v1/have and
    /v1/relay as the test's handlers say. Yields its port."""

    async def health(_: web.Request) -> web.Response:
        return msgpack(wire.Health(agent_id=agent_id, bt_port=bt_port, blobs=0))

    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/have", have)
    if relay is not None:
        app.router.add_get("/v1/relay/{blob_id}", relay)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, ip, 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
