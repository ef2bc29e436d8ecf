"""The agent's local API, for the CLI on this machine (loopback by default; never the
peer-facing listener).

    GET  /v1/status       counters, peers, seeded repos and running transfers (JSON)
    GET  /metrics         the same figures for Prometheus (`peer.serving.metrics`)
    GET  /                the status page (`peer.serving.status_page`: /status.js, .css)
    POST /v1/downloads    start a download into the agent's cache; the answer streams
                          NDJSON events until it ends:
                          {"event": "started", "commit", "files", "total"}
                          {"event": "progress", "done", "total", "from_peers", "from_mirror"}
                          {"event": "done", "path", "commit", "entries", ...counters}
                          {"event": "error", "kind", "exit_code", "message"}
                          The mirror is asked with the token in the request; only the
                          agent's own user (or root) gets the agent's token when it sends
                          none. The agent never writes outside its cache on request:
                          `--local-dir` is filled by the CLI from the snapshot ("entries")
    POST /v1/publish      share a folder as repo local/NAME ({"path", "repo_id",
                          "repo_type"}); NDJSON events as above, "done" with the commit.
                          Only for the agent's own user (or root): the agent reads the
                          folder, so another local user could otherwise publish files
                          only the agent's user may read (`peer.serving.caller`)
    POST /v1/prefetch     a download the agent runs in the background ({"repo_id",
                          "repo_type", "revision"}, as /v1/downloads): the answer is its
                          "started" event (or its error, e.g. over the cache's quota),
                          then the agent goes on alone
    GET  /v1/pins         the pinned repos; POST / DELETE /v1/pins {"repo_id",
                          "repo_type", "revision"} pins / unpins one (own user or root:
                          a pin keeps bytes on the agent's disk and may make it seed)
    GET  /v1/limits       the live rate caps; POST /v1/limits {"upload", "download",
                          "mirror"} (bytes/s, 0: none; absent: unchanged) changes them
                          (own user or root)

Every call that acts (a download, a publish, a Hub API file) or is refused goes to the
audit log (`peer.agent.audit`: the caller's uid, what it asked, the outcome); the
read-only pages a browser or Prometheus polls do not.

The download keeps running in the agent if the client goes away; a new request for the
same repo joins the blobs already in flight instead of fetching them twice.

The agent also mounts the Hub API of HF_ENDPOINT mode here (`peer.serving.hub_api`:
``/api/...`` and ``/{repo}/resolve/...``), after these routes.

Every user of the machine, and every web page its browsers show, can reach a loopback
port, so `guard` checks each request before any route: a ``Host`` that is not the
listener's own address or a loopback name (DNS rebinding), an ``Origin`` (a browser
sent it: cross-site) other than our own, or our own on anything but a GET or HEAD
-> 403; the JSON routes take only ``application/json`` (a form or text/plain POST needs
no CORS preflight) -> 415. Every answer but the status page's carries
``X-Content-Type-Options: nosniff`` and ``Content-Security-Policy: sandbox``: a file a
Hub client fetches (any repo's bytes) never runs as a page of the agent's origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

from aiohttp import web

from peer.agent.audit import ApiCall
from peer.agent.requests import Done, DownloadRequest, Emit, Error, Event, PublishRequest
from peer.errors import ConfigError, HfswarmError, UserError
from peer.serving.caller import caller_uid
from peer.serving.hub_api import HubApi, HubBackend, parse_resolve
from peer.serving.metrics import CONTENT_TYPE, AgentMetrics, MetricsSnapshot
from peer.serving.status_page import add_status_page

log = logging.getLogger(__name__)

# Requests are small JSON or a paths-info list; a cap keeps one from filling memory.
MAX_REQUEST_BYTES = 1024 * 1024
JSON_ROUTES = frozenset({"/v1/downloads", "/v1/publish", "/v1/prefetch", "/v1/pins", "/v1/limits"})
# Read-only routes polled by browsers and Prometheus: audited only when refused.
POLLED_ROUTES = frozenset({"/v1/status", "/metrics", "/", "/status.js", "/status.css"})
REFUSED = frozenset({400, 401, 403, 405, 413, 415})


class RequestRefused(UserError):
    """A request the local API does not take from this caller (HTTP 403/415)."""


class LocalBackend(Protocol):
    async def status(self) -> dict[str, Any]: ...

    async def metrics_snapshot(self) -> MetricsSnapshot: ...

    def api_call(self, call: ApiCall) -> None:
        """An audited call (see the module docstring)."""
        ...

    async def run_download(self, request: DownloadRequest, emit: Emit) -> Done: ...

    async def publish(self, request: PublishRequest, emit: Emit) -> dict[str, Any]: ...

    async def pins(self) -> list[dict[str, Any]]: ...

    async def pin(self, spec: dict[str, Any], add: bool) -> dict[str, Any]: ...

    async def limits(self, change: dict[str, Any] | None) -> dict[str, Any]: ...


# Background downloads (`hfswarm prefetch`) at once, over all callers.
MAX_PREFETCHES = 16


def error_event(exc: BaseException) -> dict[str, Any]:
    return Error.of(exc).to_json()


def _split_host(value: str) -> tuple[str, str | None]:
    """``name``, ``name:port``, ``[v6]`` or ``[v6]:port`` -> (name, port or None)."""
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return "", None
        return name, rest[1:] if rest else None
    name, sep, port = value.partition(":")
    return name, port if sep else None


def host_allowed(value: str | None, sockname: Any) -> bool:
    """The Host header names this listener: a loopback name or address, or the exact
    address the connection came in on, and our port if it has one. Anything else is a
    name some DNS resolved to us (rebinding), so a web page could read the answers."""
    if not value or not sockname:
        return False
    name, port = _split_host(value.strip().lower())
    if port is not None and port != str(sockname[1]):
        return False
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name)
        ours = ipaddress.ip_address(str(sockname[0]).split("%", 1)[0])
    except ValueError:
        return False
    return ip.is_loopback or ip == ours


def refusal(status: int, message: str, hint: str) -> web.Response:
    return web.json_response(error_event(RequestRefused(message, hint=hint)), status=status)


@web.middleware
async def guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Before any route (the /v1 API and the Hub API alike): see the module docstring."""
    host = request.headers.get("Host")
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not host_allowed(host, sockname):
        return refusal(
            403,
            f"the agent's local API answers only requests for its own address, not {host!r}",
            "use http://127.0.0.1:PORT (or localhost) as the agent's URL or HF_ENDPOINT",
        )
    origin = request.headers.get("Origin")
    # Our own origin: the status page reading /v1/status (browsers send no Origin on a
    # same-origin GET, but may); never for a request that acts.
    own = origin is not None and origin.lower() == f"http://{host}".lower()
    if origin is not None and not (own and request.method in ("GET", "HEAD")):
        return refusal(
            403,
            f"the agent's local API does not answer web pages (Origin {origin!r})",
            "call it from the hfswarm CLI or a Hub client, not from a browser",
        )
    if (
        request.path in JSON_ROUTES
        and request.method not in ("GET", "HEAD")
        and request.content_type != "application/json"
    ):
        return refusal(
            415,
            f"{request.path} takes a JSON body, not {request.content_type!r}",
            "send Content-Type: application/json (the hfswarm CLI does)",
        )
    try:
        return await handler(request)
    except RecursionError:
        # json.loads on a body nested too deeply (the Hub API's paths-info parses too):
        # the caller's fault, not a 500.
        return refusal(400, "request JSON is nested too deeply", "send a flat JSON body")


# What a route tells the audit line of its request (by id(request), while it runs): what
# was asked ("asked") and how a streamed job ended ("outcome").
Notes = dict[int, dict[str, Any]]


def _audit_middleware(backend: LocalBackend, notes: Notes) -> Any:
    """Outside the guard: sees its refusals as well as what the routes did. The caller's
    uid is read while its connection is surely open: before a route that streams its
    answer (the client may be gone after it), after a refusal (not sent yet)."""

    def resolve_asked(request: web.Request) -> dict[str, str] | None:
        if request.method != "GET" or request.path.startswith(("/v1/", "/api/")):
            return None
        if request.path in POLLED_ROUTES:
            return None
        try:
            target = parse_resolve(request.raw_path)
        except HfswarmError:
            return None
        if target is None:
            return None
        return {
            "repo_type": target.repo_type,
            "repo_id": target.repo_id,
            "revision": target.revision,
            "path": target.path,
        }

    @web.middleware
    async def audit(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        asked = resolve_asked(request)
        acts = request.path in JSON_ROUTES or asked is not None
        uid = caller_uid(request.transport) if acts else None
        note = notes.setdefault(id(request), {})
        try:
            resp = await handler(request)
            status = resp.status
        except web.HTTPException as exc:
            resp, status = exc, exc.status
            if not acts and status not in REFUSED:
                raise
        finally:
            notes.pop(id(request), None)
        if not acts and status not in REFUSED:
            return resp
        if not acts:
            uid = caller_uid(request.transport)
        outcome = note.get("outcome") or (
            "refused" if status in REFUSED else "done" if status < 400 else "error"
        )
        backend.api_call(
            ApiCall(
                uid=uid,
                method=request.method,
                route=request.path if asked is None else "resolve",
                asked=note.get("asked") or asked or {},
                status=status,
                outcome=outcome,
            )
        )
        if isinstance(resp, web.HTTPException):
            raise resp
        return resp

    return audit


async def _harden(_: web.Request, response: web.StreamResponse) -> None:
    """Before the headers go out, on every answer (the status page sets its own policy)."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Content-Security-Policy", "sandbox; default-src 'none'")


def make_local_app(
    backend: LocalBackend, hub: HubBackend | None = None, metrics: AgentMetrics | None = None
) -> web.Application:
    """The CLI's API; with `hub`, also the Hub API of HF_ENDPOINT mode
    (`peer.serving.hub_api`), mounted after the /v1 routes and the status page.
    `metrics`: the agent's own registry (one is made if none is given)."""
    registry = metrics or AgentMetrics()
    notes: Notes = {}

    def note(request: web.Request, key: str, value: Any) -> None:
        if id(request) in notes:
            notes[id(request)][key] = value

    async def status(_: web.Request) -> web.Response:
        return web.json_response(await backend.status())

    async def prometheus(_: web.Request) -> web.Response:
        body = registry.render(await backend.metrics_snapshot())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def bad_request(exc: Exception, status: int = 400) -> web.Response:
        msg = exc.one_line() if isinstance(exc, HfswarmError) else f"bad JSON: {exc}"
        return web.json_response(
            {"event": "error", "kind": "ConfigError", "exit_code": 2, "message": msg},
            status=status,
        )

    async def body(request: web.Request) -> Any:
        """The JSON body; nesting too deep for the parser is a bad request, not a 500."""
        try:
            return await request.json()
        except RecursionError:
            raise ConfigError("request JSON is nested too deeply") from None
        except web.HTTPRequestEntityTooLarge:
            raise ConfigError(
                f"request larger than {MAX_REQUEST_BYTES} bytes",
                hint="a download or publish request is a few hundred bytes; "
                "list many files with --include globs instead",
            ) from None

    def own_user(uid: int | None) -> bool:
        return uid is not None and uid in (0, os.geteuid())

    async def downloads(request: web.Request) -> web.StreamResponse:
        try:
            spec = DownloadRequest.from_json(await body(request))
        except (ValueError, HfswarmError) as exc:
            return bad_request(exc)
        note(
            request,
            "asked",
            {
                "repo_type": spec.repo_type,
                "repo_id": spec.repo_id,
                "revision": spec.revision,
            },
        )
        # Any local user reaches this port: the agent's token (its reach to private and
        # gated repos) is lent only to the agent's own user; others bring their own.
        spec = replace(spec, agent_token=own_user(caller_uid(request.transport)))
        return await run_job(request, lambda emit: backend.run_download(spec, emit))

    def not_own_user(request: web.Request, what: str, command: str) -> web.Response | None:
        uid = caller_uid(request.transport)
        if own_user(uid):
            return None
        who = "an unidentified caller" if uid is None else f"uid {uid}"
        return bad_request(
            ConfigError(
                f"the agent {what} only for its own user (uid {os.geteuid()}), not for {who}",
                hint=f"run `hfswarm {command}` as the agent's user, on the agent's machine "
                "over loopback",
            ),
            status=403,
        )

    async def publish(request: web.Request) -> web.StreamResponse:
        if (refused := not_own_user(request, "publishes", "publish")) is not None:
            return refused
        try:
            spec = PublishRequest.from_json(await body(request))
        except (ValueError, HfswarmError) as exc:
            return bad_request(exc)
        note(
            request,
            "asked",
            {
                "repo_type": spec.repo_type,
                "repo_id": spec.repo_id,
                "path": str(spec.path),
            },
        )
        return await run_job(request, lambda emit: backend.publish(spec, emit))

    async def prefetch(request: web.Request) -> web.Response:
        """Start a download and answer once it has started (or failed to): the rest
        runs in the agent with nobody following it."""
        try:
            spec = DownloadRequest.from_json(await body(request))
        except (ValueError, HfswarmError) as exc:
            return bad_request(exc)
        note(
            request,
            "asked",
            {"repo_type": spec.repo_type, "repo_id": spec.repo_id, "revision": spec.revision},
        )
        if len(prefetches) >= MAX_PREFETCHES:  # nobody follows them: bound them
            return refusal(
                503,
                f"{len(prefetches)} prefetches are running already",
                "wait for some to finish (`hfswarm status` lists the transfers)",
            )
        spec = replace(spec, agent_token=own_user(caller_uid(request.transport)))
        started: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        async def emit(event: Event) -> None:
            if not started.done():
                started.set_result(event.to_json())

        async def job() -> None:
            try:
                await backend.run_download(spec, emit)
            except Exception as exc:
                if not started.done():
                    started.set_result(error_event(exc))
                else:
                    log.warning("prefetch of %s failed: %s", spec.repo_id, exc)

        task = asyncio.get_running_loop().create_task(job())
        jobs.add(task)
        task.add_done_callback(jobs.discard)
        prefetches.add(task)
        task.add_done_callback(prefetches.discard)
        first = await started
        if first.get("event") == "error":
            return web.json_response(first, status=507 if first["exit_code"] == 5 else 400)
        return web.json_response(first, status=202)

    async def pins(_: web.Request) -> web.Response:
        return web.json_response({"pins": await backend.pins()})

    async def pin(request: web.Request) -> web.Response:
        if (refused := not_own_user(request, "pins repos", "pin")) is not None:
            return refused
        try:
            asked = await body(request)
            note(request, "asked", _flat(asked))
            answer = await backend.pin(asked, request.method == "POST")
        except (ValueError, HfswarmError) as exc:
            return bad_request(exc)
        return web.json_response(answer)

    async def limits(request: web.Request) -> web.Response:
        if request.method == "POST":
            if (refused := not_own_user(request, "changes its limits", "limits")) is not None:
                return refused
            try:
                asked = await body(request)
                note(request, "asked", _flat(asked))
                answer = await backend.limits(asked)
            except (ValueError, HfswarmError) as exc:
                return bad_request(exc)
            return web.json_response(answer)
        return web.json_response(await backend.limits(None))

    async def run_job(
        request: web.Request, start: Callable[[Emit], Awaitable[Done | dict[str, Any]]]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def emit(event: Event) -> None:
            queue.put_nowait(event.to_json())

        async def job() -> None:
            try:
                final = await start(emit)
                done = final.to_json() if isinstance(final, Done) else {**final, "event": "done"}
                queue.put_nowait(done)
            except Exception as exc:
                queue.put_nowait(error_event(exc))
            finally:
                queue.put_nowait(None)

        # The job is not tied to this connection: a client that goes away (Ctrl-C)
        # leaves the agent finishing the blobs, which it then seeds.
        task = asyncio.get_running_loop().create_task(job())
        jobs.add(task)
        task.add_done_callback(jobs.discard)
        while (event := await queue.get()) is not None:
            if event.get("event") == "done":
                note(request, "outcome", "done")
            elif event.get("event") == "error":
                note(request, "outcome", str(event.get("kind", "error")))
            with contextlib.suppress(ConnectionError):
                await resp.write(json.dumps(event).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    jobs: set[asyncio.Task[None]] = set()
    prefetches: set[asyncio.Task[None]] = set()  # the jobs nobody follows

    async def cancel_jobs(_: web.Application) -> None:
        for task in list(jobs):
            task.cancel()
        for task in list(jobs):
            with contextlib.suppress(BaseException):
                await task

    app = web.Application(
        middlewares=[_audit_middleware(backend, notes), guard], client_max_size=MAX_REQUEST_BYTES
    )
    app.on_response_prepare.append(_harden)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/metrics", prometheus)
    app.router.add_post("/v1/downloads", downloads)
    app.router.add_post("/v1/publish", publish)
    app.router.add_post("/v1/prefetch", prefetch)
    app.router.add_get("/v1/pins", pins)
    app.router.add_post("/v1/pins", pin)
    app.router.add_delete("/v1/pins", pin)
    app.router.add_get("/v1/limits", limits)
    app.router.add_post("/v1/limits", limits)
    add_status_page(app)
    app.on_shutdown.append(cancel_jobs)
    if hub is not None:
        HubApi(hub).mount(app)
    return app


def _flat(asked: Any) -> dict[str, str]:
    """A small JSON object as the audit line's "asked" (what else: not an object)."""
    if not isinstance(asked, dict):
        return {"body": type(asked).__name__}
    return {str(k)[:64]: str(v)[:256] for k, v in list(asked.items())[:8]}
