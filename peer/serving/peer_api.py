"""The peer-facing API (``--listen``): what other agents may ask of this one.

    GET  /v1/health           Health (agent id, BitTorrent port, protocol version)
    POST /v1/have             HaveRequest -> HaveResponse: manifests of the blobs we hold
                              (and swarm now), and our herd claims on blobs nobody holds
    GET  /v1/blobs/{blob id}  a small blob (below one piece), Range allowed; the receiver
                              verifies its hash before using it
    POST /v1/revisions        RevisionRequest -> RevisionManifest (404: not known here):
                              what a revision of a repo holds, for ``local/*`` publishes
                              and public repos this agent downloaded (never private or
                              gated ones); the receiver checks it before using it

Bodies are msgpack wire messages (`peer.wire`). Only verified blobs are ever offered or
served; everything else is 404.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Protocol

from aiohttp import web

from peer import wire
from peer.verification.hashing import is_blob_id

MSGPACK = "application/msgpack"
MAX_REQUEST = 1 << 20
SMALL_BLOB_LIMIT = 16 << 20  # larger blobs go through the swarm, never over this API


class PeerBackend(Protocol):
    def health(self) -> wire.Health: ...

    def manifests_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]: ...

    def fetching_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]: ...

    def claims_for(self, blob_ids: tuple[str, ...]) -> list[wire.Claim]: ...

    def verified_blob_path(self, blob_id: str) -> Path | None: ...

    def count_upload(self, n: int) -> None: ...

    def revision_for(self, request: wire.RevisionRequest) -> wire.RevisionManifest | None: ...


def _read(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def make_peer_app(backend: PeerBackend) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.Response(body=wire.encode(backend.health()), content_type=MSGPACK)

    async def have(request: web.Request) -> web.Response:
        try:
            # read() takes the whole body (content.read(n) may stop short); the app's
            # client_max_size refuses anything larger with 413.
            body = await request.read()
            msg = wire.decode_as(body, wire.HaveRequest)
        except wire.WireError as exc:
            return web.Response(status=400, text=exc.one_line())
        ids = tuple(msg.blob_ids)
        answer = wire.HaveResponse(
            manifests=tuple(backend.manifests_for(ids)),
            fetching=tuple(backend.fetching_for(ids)),
            claims=tuple(backend.claims_for(ids)),
        )
        return web.Response(body=wire.encode(answer), content_type=MSGPACK)

    async def blob(request: web.Request) -> web.StreamResponse:
        blob_id = request.match_info["blob_id"]
        path = backend.verified_blob_path(blob_id) if is_blob_id(blob_id) else None
        if path is None:
            return web.Response(status=404, text="not held here")
        try:
            size = os.stat(path).st_size
        except OSError:
            return web.Response(status=404, text="not held here")
        if size > SMALL_BLOB_LIMIT:
            return web.Response(status=413, text="large blobs are served through the swarm")
        start, end = 0, size
        rng = request.http_range
        status = 200
        if rng.start is not None or rng.stop is not None:
            start, stop, _ = rng.indices(size)
            end = stop
            if start >= end:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
        data = await asyncio.to_thread(_read, path, start, end)
        headers = {"Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        backend.count_upload(len(data))
        return web.Response(
            status=status, body=data, headers=headers, content_type="application/octet-stream"
        )

    async def revisions(request: web.Request) -> web.Response:
        try:
            msg = wire.decode_as(await request.read(), wire.RevisionRequest)
        except wire.WireError as exc:
            return web.Response(status=400, text=exc.one_line())
        manifest = backend.revision_for(msg)
        if manifest is None:
            return web.Response(status=404, text="revision not known here")
        return web.Response(body=wire.encode(manifest), content_type=MSGPACK)

    app = web.Application(client_max_size=MAX_REQUEST)
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/have", have)
    app.router.add_get("/v1/blobs/{blob_id}", blob)
    app.router.add_post("/v1/revisions", revisions)
    return app
