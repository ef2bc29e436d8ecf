"""The peer-facing API (``--listen``): what other agents may ask of this one.

    GET  /v1/health           Health (agent id, BitTorrent port, protocol version)
    POST /v1/have             HaveRequest -> HaveResponse: manifests of the blobs we hold
                              (and swarm now), and our herd claims on blobs nobody holds
    GET  /v1/blobs/{blob id}  a small blob (below one piece), Range allowed; the receiver
                              verifies its hash before using it. Streamed from disk; at
                              most `STREAMS_PER_IP` at once per client address and
                              `STREAMS_TOTAL` in all, beyond that 503 with Retry-After.
                              A Range this API does not support or that is invalid
                              (several ranges, reversed, not numbers) is ignored: 200
                              and the whole blob (RFC 9110 allows it; the Hub API does
                              the same); one past the end is 416 with Content-Range
    POST /v1/revisions        RevisionRequest -> RevisionManifest (404: not known here):
                              what a revision of a repo holds, for ``local/*`` publishes
                              and public repos this agent downloaded (never private or
                              gated ones); the receiver checks it before using it

Bodies are msgpack wire messages (`peer.wire`). Only verified blobs are ever offered or
served; everything else is 404. A /v1/have names at most `wire.MAX_HAVE_IDS` blobs (413
beyond: ask in batches), so that every answer fits one wire message. Connections, time
and request sizes are bounded by the listener (`peer.serving.limits`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web

from peer import wire
from peer.hub.protocol import UNSATISFIABLE, parse_range
from peer.serving.file_range import send_range
from peer.serving.limits import StreamSlots
from peer.verification.hashing import is_blob_id

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
MAX_REQUEST = 1 << 20
SMALL_BLOB_LIMIT = 16 << 20  # larger blobs go through the swarm, never over this API
READ_CHUNK = 256 << 10  # held per stream (and one read ahead) while the client reads
STREAMS_PER_IP = 8  # an agent fetches --max-workers (4) small blobs at once
STREAMS_TOTAL = 32
# Manifests an answer may carry in all: room for the encoding around the torrents.
ANSWER_BUDGET = wire.MAX_MESSAGE_BYTES - (1 << 20)


class PeerBackend(Protocol):
    def health(self) -> wire.Health: ...

    def manifests_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]: ...

    def fetching_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]: ...

    def claims_for(self, blob_ids: tuple[str, ...]) -> list[wire.Claim]: ...

    def verified_blob_path(self, blob_id: str) -> Path | None: ...

    def count_upload(self, n: int) -> None: ...

    def blob_served(self, blob_id: str, address: str, sent: int) -> None:
        """A /v1/blobs answer ended having sent `sent` bytes to `address` (the audit)."""
        ...

    def revision_for(self, request: wire.RevisionRequest) -> wire.RevisionManifest | None: ...


def _fit(manifests: list[wire.Manifest], budget: int) -> tuple[list[wire.Manifest], int]:
    """As many manifests as fit `budget` bytes of torrents (all of them unless blobs far
    above 256 GiB are asked about: 64 ids x 128 KiB torrents is 8 MiB), and the budget
    left. Ones left out are simply not offered in this answer."""
    kept = []
    for m in manifests:
        cost = len(m.torrent) + 1024
        if cost > budget:
            log.warning("a /v1/have answer is full; leaving out the manifests beyond it")
            break
        kept.append(m)
        budget -= cost
    return kept, budget


def make_peer_app(
    backend: PeerBackend,
    streams: StreamSlots | None = None,
    throttle: Callable[[int], Awaitable[None]] | None = None,
) -> web.Application:
    """`throttle`: the agent's upload cap, shared with its other peer streams."""
    slots = streams or StreamSlots(total=STREAMS_TOTAL, per_ip=STREAMS_PER_IP)

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
        if len(ids) > wire.MAX_HAVE_IDS:
            return web.Response(
                status=413,
                text=f"ask about at most {wire.MAX_HAVE_IDS} blob ids per /v1/have request "
                f"(this one named {len(ids)}): split it into several requests",
            )
        held, budget = _fit(backend.manifests_for(ids), ANSWER_BUDGET)
        fetching, _ = _fit(backend.fetching_for(ids), budget)
        answer = wire.HaveResponse(
            manifests=tuple(held), fetching=tuple(fetching), claims=tuple(backend.claims_for(ids))
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
        span = parse_range(request.headers.get("Range"), size)
        if span == UNSATISFIABLE:
            return web.Response(
                status=416,
                text=f"range not satisfiable: the blob has {size} bytes",
                headers={"Content-Range": f"bytes */{size}"},
            )
        with slots.take(request.remote or "") as ok:
            if not ok:
                return web.Response(
                    status=503,
                    text="too many blob downloads from this address or in all; retry later",
                    headers={"Retry-After": "5"},
                )
            return await _stream(request, blob_id, path, size, span)

    async def revisions(request: web.Request) -> web.Response:
        try:
            msg = wire.decode_as(await request.read(), wire.RevisionRequest)
        except wire.WireError as exc:
            return web.Response(status=400, text=exc.one_line())
        manifest = backend.revision_for(msg)
        if manifest is None:
            return web.Response(status=404, text="revision not known here")
        return web.Response(body=wire.encode(manifest), content_type=MSGPACK)

    async def _stream(
        request: web.Request, blob_id: str, path: Path, size: int, span: tuple[int, int] | None
    ) -> web.StreamResponse:
        """Bytes [start, end) of a verified blob in `READ_CHUNK` preads, one read ahead;
        each write waits for the client (never the whole range in memory)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return web.Response(status=404, text="not held here")
        sent = 0

        def on_sent(n: int) -> None:
            nonlocal sent
            sent += n
            backend.count_upload(n)

        try:
            return await send_range(
                request, fd, size, span, READ_CHUNK, on_sent=on_sent, throttle=throttle
            )
        finally:
            os.close(fd)
            backend.blob_served(blob_id, request.remote or "", sent)

    app = web.Application(client_max_size=MAX_REQUEST)
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/have", have)
    app.router.add_get("/v1/blobs/{blob_id}", blob)
    app.router.add_post("/v1/revisions", revisions)
    return app
