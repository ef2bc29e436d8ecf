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
    GET  /v1/relay/{blob id}  a shared blob this agent leads in a herd (fetches from the
                              mirror for the herd), from ``Range: bytes=N-`` to its end:
                              the in-order prefix that arrived from the mirror and went
                              through the whole-file hash so far, then each byte as the
                              prefix grows; the last byte only once the whole blob
                              matched its id (`peer.transfer.inflight`). After the fetch,
                              for `RELAY_GRACE` s: the verified blob (then 404: it is
                              one more seed, through the swarm). Bounded like /v1/blobs (the same
                              `StreamSlots`, upload cap), cut at once when the lead fails,
                              and after `RELAY_IDLE` s without a new byte. The receiver
                              hashes the whole blob itself before using it (these bytes
                              are relayed, not verified, until the last one)
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

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web

from peer import wire
from peer.hub.protocol import UNSATISFIABLE, parse_range
from peer.serving.file_range import send_range, write_range
from peer.serving.limits import StreamSlots
from peer.transfer.inflight import InFlightBlob
from peer.verification.hashing import is_blob_id

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
MAX_REQUEST = 1 << 20
SMALL_BLOB_LIMIT = 16 << 20  # larger blobs go through the swarm, never over this API
READ_CHUNK = 256 << 10  # held per stream (and one read ahead) while the client reads
STREAMS_PER_IP = 8  # an agent fetches --max-workers (4) small blobs at once
STREAMS_TOTAL = 32
# A relay whose leader has had no new byte for this long is cut: the follower goes
# back to its herd, which replaces a stalled leader (`HerdConfig.leader_timeout`).
RELAY_IDLE = 30.0
# Manifests an answer may carry in all: room for the encoding around the torrents.
ANSWER_BUDGET = wire.MAX_MESSAGE_BYTES - (1 << 20)


class PeerBackend(Protocol):
    def health(self) -> wire.Health: ...

    def manifests_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]: ...

    def fetching_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]: ...

    def deals_for(self, blob_ids: tuple[str, ...]) -> list[wire.Deal]:
        """What this agent deals the feeders of the blobs it fetches over."""
        ...

    def claims_for(self, blob_ids: tuple[str, ...]) -> list[wire.Claim]: ...

    def verified_blob_path(self, blob_id: str) -> Path | None: ...

    def relay_of(self, blob_id: str) -> InFlightBlob | None:
        """A shared blob this agent leads for its herd, while it fetches it."""
        ...

    def relay_after_lead(self, blob_id: str) -> Path | None:
        """The verified copy of a shared blob this agent led lately, its fetch over
        (a follower takes the rest from it); None for any other blob."""
        ...

    def count_upload(self, n: int) -> None: ...

    def blob_served(self, blob_id: str, address: str, sent: int) -> None:
        """A /v1/blobs answer ended having sent `sent` bytes to `address` (the audit)."""
        ...

    def revision_for(self, request: wire.RevisionRequest) -> wire.RevisionManifest | None: ...


_OPEN_RANGE = re.compile(r"bytes=(\d{1,19})-")


def _open_range(header: str | None) -> int | None:
    """The start of ``bytes=N-`` (no header: 0); None for any other form."""
    if header is None:
        return 0
    m = _OPEN_RANGE.fullmatch(header.strip())
    return int(m.group(1)) if m else None


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
        offered = {m.blob_id for m in fetching}
        # Only to an asker that reads them (`wire.DEALS_QUERY`): an older agent's
        # decoder refuses an unknown field, and with it the whole answer.
        key, value = wire.DEALS_QUERY
        deals = backend.deals_for(ids) if request.query.get(key) == value else []
        answer = wire.HaveResponse(
            manifests=tuple(held),
            fetching=tuple(fetching),
            claims=tuple(backend.claims_for(ids)),
            deals=tuple(d for d in deals if d.blob_id in offered),
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
            return _unsatisfiable(size)
        with slots.take(request.remote or "") as ok:
            if not ok:
                return _busy()
            return await _stream(request, blob_id, path, size, span)

    async def relay(request: web.Request) -> web.StreamResponse:
        blob_id = request.match_info["blob_id"]
        if not is_blob_id(blob_id):
            return web.Response(status=404, text="not led here")
        flight = backend.relay_of(blob_id)
        path = None if flight is not None else backend.relay_after_lead(blob_id)
        if flight is None and path is None:
            return web.Response(status=404, text="not led here")
        try:
            size = os.stat(path).st_size if path is not None else flight.size if flight else 0
        except OSError:
            return web.Response(status=404, text="not led here")
        start = _open_range(request.headers.get("Range"))
        if start is None:
            return web.Response(status=400, text="ask for one open range: Range: bytes=N-")
        if start >= size:
            return _unsatisfiable(size)
        with slots.take(request.remote or "") as ok:
            if not ok:
                return _busy()
            return await _relay(request, blob_id, flight, path, size, start)

    async def _relay(
        request: web.Request,
        blob_id: str,
        flight: InFlightBlob | None,
        path: Path | None,
        size: int,
        start: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=206)
        resp.content_type = "application/octet-stream"
        resp.content_length = size - start
        resp.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        sent = 0

        def on_sent(n: int) -> None:
            nonlocal sent
            sent += n
            backend.count_upload(n)

        try:
            await resp.prepare(request)
            if flight is not None:
                start = await _relay_flight(resp, flight, start, on_sent)
            if start < size:  # the fetch is over: the rest from the verified blob
                path = path or backend.verified_blob_path(blob_id)
                if path is None:
                    raise ConnectionResetError("the leader's fetch failed")
                await _send_file(resp, path, start, size, on_sent)
            await resp.write_eof()
        except (ConnectionError, TimeoutError):
            # Cut, never ended cleanly: a short body must not look like a whole one.
            if request.transport is not None:
                request.transport.close()
        finally:
            backend.blob_served(blob_id, request.remote or "", sent)
        return resp

    async def _relay_flight(
        resp: web.StreamResponse,
        flight: InFlightBlob,
        start: int,
        on_sent: Callable[[int], None],
    ) -> int:
        """Send the flight's checked prefix from `start` as it grows; where it stopped
        (the size, or short of it once the fetch is over and the blob verified)."""
        pos = start
        async with flight.reader(pos) as reader:
            while pos < flight.size:
                async with asyncio.timeout(RELAY_IDLE):
                    window = await reader.readable(flight.size)
                if window is None:
                    break
                await _send_file(resp, window.path, pos, window.end, on_sent)
                pos = window.end
                reader.advance(pos)
        return pos

    async def _send_file(
        resp: web.StreamResponse,
        path: Path,
        start: int,
        end: int,
        on_sent: Callable[[int], None],
    ) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ConnectionResetError(f"the blob went away: {exc}") from None
        try:
            await write_range(resp, fd, start, end, READ_CHUNK, on_sent, throttle)
        finally:
            os.close(fd)

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
    # No HEAD: these stream the body themselves, and aiohttp would send it after the
    # headers of a HEAD answer too (405 instead; nobody needs the size alone).
    app.router.add_get("/v1/blobs/{blob_id}", blob, allow_head=False)
    app.router.add_get("/v1/relay/{blob_id}", relay, allow_head=False)
    app.router.add_post("/v1/revisions", revisions)
    return app


def _unsatisfiable(size: int) -> web.Response:
    return web.Response(
        status=416,
        text=f"range not satisfiable: the blob has {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )


def _busy() -> web.Response:
    """Over the blob stream slots (per address or in all)."""
    return web.Response(
        status=503,
        text="too many blob downloads from this address or in all; retry later",
        headers={"Retry-After": "5"},
    )
