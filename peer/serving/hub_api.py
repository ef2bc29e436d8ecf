"""The Hub API on the agent's local listener: HF_ENDPOINT mode.

    HF_ENDPOINT=http://127.0.0.1:7850 hf download org/name

Every Hub client (huggingface_hub, the `hf` CLI, transformers) then downloads through
the agent unchanged, and the agent takes the bytes from its peers first:

    GET  /api/{models|datasets|spaces}/...        proxied to the mirrors, in their
    POST /api/.../paths-info/{rev}                 failover order (revision, tree, ...)
    HEAD /{prefix}{repo_id}/resolve/{rev}/{path}   metadata asked of the mirror, answered
                                                   here (commit, ETag, size; no redirect)
    GET  /{prefix}{repo_id}/resolve/{rev}/{path}   the verified blob from the agent's cache,
                                                   obtained first if need be (peers, then
                                                   the mirror; seeded and linked into the
                                                   agent's HF cache); Range -> 206 / 416

(``prefix``: "" for models, "datasets/", "spaces/"; revisions arrive URL-encoded, as
``refs%2Fpr%2F1``.) It is mounted on the local app only, never on the peer-facing one.

Credentials and access (fail closed):
- The client's own ``Authorization`` goes to the mirror, for the metadata and for the
  bytes the agent fetches on its behalf. The agent's own token is never lent to a
  client: one that sent none is anonymous to the mirror. The local listener can be
  reached by every user of this machine (and by others if it is bound beyond loopback);
  lending the agent's token would open its private and gated repos to all of them.
- Each resolve asks the mirror first whether this client may read this file (a HEAD with
  its token), even when the blob is already in the agent's cache, so gated and private
  repos stay closed to whoever the mirror refuses. No mirror reachable: 502, no bytes.
- The mirror's answers keep their status, ``X-Error-Code`` and ``X-Error-Message``, so
  huggingface_hub raises RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError
  or EntryNotFoundError as it would against the Hub.
- Never a Xet signal: no ``X-Xet-*`` header is ever sent, keys starting with ``xet`` are
  removed from JSON answers, and of a ``Link`` header only rel="next" survives, rewritten
  to point at this agent (pagination must come back here, with the client's token).
- Only verified bytes are sent: a blob is served from ``blobs/`` once its whole-file hash
  matched its Hub id (checked by the fetch, or here for a blob some other tool put there).

Not yet: streaming while the swarm fetches. A GET for a blob the agent does not hold yet
answers when the whole blob is verified, so a client waits for the whole fetch before
its first byte; huggingface_hub gives up after HF_HUB_DOWNLOAD_TIMEOUT (10 s) without a
byte (then retries a few times, while the agent keeps fetching): raise it for big files
the LAN does not hold yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote, urljoin, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from peer.cache.hf_cache import safe_relpath
from peer.config import REPO_TYPES, AgentConfig
from peer.errors import (
    DiskFull,
    EntryNotFound,
    GatedRepo,
    HfswarmError,
    LocalError,
    RepoNotFound,
    RevisionNotFound,
    UserError,
)
from peer.hub.metadata import URL_PREFIX, RemoteFile, Snapshot
from peer.mirror_server.http_range import UNSATISFIABLE, parse_range
from peer.verification.hashing import SHA1_RE, SHA256_RE

log = logging.getLogger(__name__)

API_TYPES: Mapping[str, str] = {f"{t}s": t for t in REPO_TYPES}
URL_TYPES: Mapping[str, str] = {"datasets": "dataset", "spaces": "space"}
# A mirror answering these is failing, not refusing: the next mirror is asked.
RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Headers of a mirror's answer that a Hub client reads; everything else is dropped
# (X-Xet-* above all). Link and Location are rewritten, not copied.
PASSED_HEADERS = ("X-Error-Code", "X-Error-Message", "X-Repo-Commit", "Retry-After")
READ_CHUNK = 1 << 20
META_TTL = 60.0  # seconds a file's metadata at a commit is reused for the same token
META_ENTRIES = 4096
REF_ENTRIES = 1024


class HubBackend(Protocol):
    """What the Hub API needs of the agent (`peer.agent.daemon.Agent`)."""

    config: AgentConfig

    async def blob_for_client(
        self, snapshot: Snapshot, file: RemoteFile, token: str | None, ref: str | None
    ) -> Path:
        """A verified copy of the file in the agent's cache (obtained if need be), linked
        into the snapshot of `snapshot.commit`; `ref` names the revision, if known."""
        ...


# -- requests ----------------------------------------------------------------------


@dataclass(frozen=True)
class ResolveTarget:
    repo_type: str
    repo_id: str
    revision: str
    path: str

    def url_path(self) -> str:
        return (
            f"/{URL_PREFIX[self.repo_type]}{quote(self.repo_id, safe='/')}/resolve/"
            f"{quote(self.revision, safe='')}/{quote(self.path, safe='/')}"
        )


def _split_repo(segs: list[str], keyword: str) -> tuple[str, list[str]] | None:
    """``org/name/<keyword>/rest`` (or ``name/<keyword>/rest``) -> repo id, rest."""
    for n in (2, 1):
        if len(segs) > n and segs[n] == keyword and all(segs[:n]):
            return "/".join(unquote(s) for s in segs[:n]), segs[n + 1 :]
    return None


def _split_revision(segs: list[str]) -> tuple[str, list[str]]:
    """The revision (one URL-encoded segment), then the rest. A client that did not
    encode ``refs/pr/1`` sends three segments: those are joined back."""
    rev = unquote(segs[0])
    if rev == "refs" and len(segs) >= 3 and segs[1] in ("pr", "convert", "heads", "tags"):
        return "/".join(unquote(s) for s in segs[:3]), segs[3:]
    return rev, segs[1:]


def parse_resolve(raw_path: str) -> ResolveTarget | None:
    """``/{prefix}{repo_id}/resolve/{rev}/{path}`` -> target; None if it is no resolve URL.
    Raises `UserError` for a resolve URL with a bad repo id or an unsafe path."""
    segs = raw_path.partition("?")[0].split("/")[1:]
    repo_type = "model"
    if segs and segs[0] in URL_TYPES:
        repo_type, segs = URL_TYPES[segs[0]], segs[1:]
    split = _split_repo(segs, "resolve")
    if split is None or not split[1]:
        return None
    repo_id, rest = split
    revision, path_segs = _split_revision(rest)
    path = "/".join(unquote(s) for s in path_segs)
    if not revision or not path:
        return None
    if any(p in (".", "..") for p in repo_id.split("/")):
        raise UserError(f"{repo_id!r} is not a repo id")
    safe_relpath(path)
    return ResolveTarget(repo_type, repo_id, revision, path)


def _revision_route(raw_path: str) -> tuple[str, str, str] | None:
    """``/api/{type}s/{repo_id}/revision/{rev}`` -> (type, repo id, revision)."""
    segs = raw_path.partition("?")[0].split("/")[2:]
    if not segs or segs[0] not in API_TYPES:
        return None
    split = _split_repo(segs[1:], "revision")
    if split is None or not split[1]:
        return None
    rev, _ = _split_revision(split[1])
    return API_TYPES[segs[0]], split[0], rev


def _bearer(authorization: str | None) -> str | None:
    scheme, _, value = (authorization or "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


# -- answers -----------------------------------------------------------------------


def hub_error(
    status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An error the way the Hub sends it (huggingface_hub keys on X-Error-Code)."""
    header_safe = message.encode("ascii", "backslashreplace").decode("ascii")
    h = {"X-Error-Message": header_safe, **(headers or {})}
    if code is not None:
        h["X-Error-Code"] = code
    return web.json_response({"error": message}, status=status, headers=h)


class _Answer(Exception):
    """Stop here and send this response (a refusal, or an upstream failure)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.reason)
        self.response = response


def _strip_xet(value: Any) -> Any:
    """Remove every key starting with "xet" (xetHash, xetEnabled, ...) at any depth."""
    if isinstance(value, dict):
        return {k: _strip_xet(v) for k, v in value.items() if not k.lower().startswith("xet")}
    if isinstance(value, list):
        return [_strip_xet(v) for v in value]
    return value


def _next_link(link: str | None, base: str) -> str | None:
    """The rel="next" part of a Link header, pointing at `base` (this agent) instead of
    the mirror; other relations (rel="xet-auth" above all) are dropped."""
    if not link:
        return None
    for part in link.split(","):
        url, _, params = part.partition(";")
        rels = {
            p.strip().partition("=")[2].strip().strip('"')
            for p in params.split(";")
            if p.strip().lower().startswith("rel")
        }
        if "next" in rels:
            target = urlsplit(url.strip().strip("<>"))
            query = f"?{target.query}" if target.query else ""
            return f'<{base}{target.path}{query}>; rel="next"'
    return None


@dataclass(frozen=True)
class Upstream:
    """One mirror's answer, read whole (metadata only: small)."""

    mirror: str
    url: str
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass(frozen=True)
class FileMeta:
    """A file at a commit as the mirror describes it; the blob id names its content."""

    commit: str
    blob_id: str
    size: int
    mirror: str

    @property
    def is_lfs(self) -> bool:
        return len(self.blob_id) == 64


def _normalize_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None


def _file_meta(up: Upstream, target: ResolveTarget) -> FileMeta:
    what = f"{target.repo_id}@{target.revision}/{target.path}"
    commit = up.headers.get("X-Repo-Commit", "")
    linked = _normalize_etag(up.headers.get("X-Linked-Etag"))
    blob_id = linked or _normalize_etag(up.headers.get("ETag")) or ""
    size_text = up.headers.get("X-Linked-Size") or (
        None if up.status in REDIRECTS else up.headers.get("Content-Length")
    )
    problem = None
    if not SHA1_RE.fullmatch(commit):
        problem = "no X-Repo-Commit"
    elif not (SHA256_RE.fullmatch(blob_id) if linked else SHA1_RE.fullmatch(blob_id)):
        problem = f"no usable content id (ETag {blob_id!r})"
    elif size_text is None or not size_text.isdigit():
        problem = "no size"
    if problem is not None:
        raise _Answer(
            hub_error(
                502,
                None,
                f"hfswarm agent: {up.mirror} gave {problem} for {what}: the agent cannot verify "
                "what it would serve (is the agent's --mirror a Hugging Face-style endpoint?)",
            )
        )
    return FileMeta(commit=commit, blob_id=blob_id, size=int(size_text or 0), mirror=up.mirror)


def _passed(up: Upstream) -> dict[str, str]:
    return {
        h: up.headers[h].encode("ascii", "backslashreplace").decode("ascii")
        for h in PASSED_HEADERS
        if h in up.headers
    }


def _refusal(up: Upstream) -> web.Response:
    """The mirror said no: the same status and error headers, so the client raises the
    same error it would raise against the mirror itself."""
    message = up.headers.get("X-Error-Message") or f"{up.mirror} answered HTTP {up.status}"
    return hub_error(up.status, up.headers.get("X-Error-Code"), message, _passed(up))


def _error_response(exc: BaseException, what: str) -> web.Response:
    """An error raised while obtaining a blob, as an HTTP answer."""
    if isinstance(exc, HfswarmError):
        msg = f"hfswarm agent: {exc.one_line()}"
        if isinstance(exc, GatedRepo):
            return hub_error(403, "GatedRepo", msg)
        if isinstance(exc, RepoNotFound):
            return hub_error(404, "RepoNotFound", msg)
        if isinstance(exc, RevisionNotFound):
            return hub_error(404, "RevisionNotFound", msg)
        if isinstance(exc, EntryNotFound):
            return hub_error(404, "EntryNotFound", msg)
        if isinstance(exc, DiskFull):
            return hub_error(507, None, msg)
        if isinstance(exc, LocalError):
            return hub_error(500, None, msg)
        if isinstance(exc, UserError):
            return hub_error(400, None, msg)
        # network trouble, a misbehaving mirror, data that kept failing verification
        return hub_error(502, None, f"{msg} [while fetching {what}]")
    log.error("HF_ENDPOINT request for %s failed", what, exc_info=exc)
    return hub_error(500, None, f"hfswarm agent: internal error ({exc!r}); see the agent's log")


def _bounded_put(d: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > limit:
        d.popitem(last=False)


# -- the API -----------------------------------------------------------------------


class HubApi:
    """The routes of HF_ENDPOINT mode; `mount` adds them to the agent's local app."""

    def __init__(self, backend: HubBackend) -> None:
        self.backend = backend
        self._session: aiohttp.ClientSession | None = None
        # (target, token digest) -> (expiry, metadata): a GET right after its HEAD, or
        # the retries of one download, ask the mirror once. Keyed by the token so one
        # client's access never answers for another's.
        self._meta: OrderedDict[tuple[ResolveTarget, str], tuple[float, FileMeta]] = OrderedDict()
        # (type, repo id, commit) -> the revision name a client resolved to it, so the
        # agent's cache gets refs/<name> like huggingface_hub would write it.
        self._refs: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        # (type, repo id) -> (private, gated), as the revision API last said.
        self._flags: OrderedDict[tuple[str, str], tuple[bool, bool]] = OrderedDict()
        self._tasks: set[asyncio.Task[Path]] = set()

    def mount(self, app: web.Application) -> None:
        """Add the routes last: the local API's own routes (/v1/...) come first."""
        app.router.add_route("*", "/api/{tail:.*}", self.api)
        app.router.add_route("*", "/{tail:.*}", self.resolve)
        app.cleanup_ctx.append(self._client_session)
        app.on_shutdown.append(self._cancel_fetches)

    @property
    def mirrors(self) -> tuple[str, ...]:
        return self.backend.config.hub.mirrors

    async def _client_session(self, _: web.Application) -> AsyncIterator[None]:
        opts = self.backend.config.download
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=opts.connect_timeout, sock_read=opts.read_timeout
            ),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        )
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    async def _cancel_fetches(self, _: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    # -- upstream --------------------------------------------------------------------

    def _headers(self, request: web.Request, **extra: str) -> dict[str, str]:
        ua = request.headers.get("User-Agent")
        agent_ua = self.backend.config.hub.user_agent
        h = {"User-Agent": f"{ua}; {agent_ua}" if ua else agent_ua, **extra}
        if "Authorization" in request.headers:
            h["Authorization"] = request.headers["Authorization"]
        return h

    async def _send(
        self, mirror: str, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> Upstream:
        assert self._session is not None, "the local app is not running"
        async with self._session.request(
            method, URL(url, encoded=True), headers=headers, data=body, allow_redirects=False
        ) as resp:
            data = await resp.read()
            return Upstream(mirror, url, resp.status, resp.headers, data)

    async def _failover(self, attempt: Callable[[str], Awaitable[Upstream]]) -> Upstream:
        """Ask the mirrors in their configured order: the first that answers (anything
        but a failure status) wins; a failing or unreachable one passes to the next."""
        problems: list[str] = []
        last: Upstream | None = None
        for i, mirror in enumerate(self.mirrors):
            try:
                up = await attempt(mirror)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                problems.append(f"{mirror}: {exc.__class__.__name__}: {exc}".rstrip(": "))
                continue
            if up.status in RETRYABLE and i + 1 < len(self.mirrors):
                problems.append(f"{mirror}: HTTP {up.status}")
                last = up
                continue
            return up
        if last is not None:
            return last
        raise _Answer(
            hub_error(
                502,
                None,
                "hfswarm agent: no mirror could be reached ("
                + "; ".join(problems)
                + "); check the network and the agent's --mirror / HF_ENDPOINT",
            )
        )

    # -- /api --------------------------------------------------------------------------

    async def api(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path
        path = raw.partition("?")[0]
        if any(unquote(seg) in (".", "..") for seg in path.split("/")):
            # forwarded as they are, they could reach other routes of the mirror
            return hub_error(400, None, "hfswarm agent: '.' and '..' are not allowed in paths")
        body: bytes | None = None
        extra: dict[str, str] = {}
        if request.method == "POST" and "/paths-info/" in path:
            body = await request.read()
            extra["Content-Type"] = request.headers.get(
                "Content-Type", "application/x-www-form-urlencoded"
            )
        elif request.method not in ("GET", "HEAD"):
            return hub_error(
                405,
                None,
                "hfswarm agent: HF_ENDPOINT mode serves downloads only; "
                "send uploads and other changes to the Hub itself",
            )
        headers = self._headers(request, **extra)
        try:
            up = await self._failover(
                lambda m: self._send(m, request.method, m + raw, headers, body)
            )
        except _Answer as a:
            return a.response
        base = f"{request.scheme}://{request.host}"
        out = _passed(up)
        if up.status in REDIRECTS and "Location" in up.headers:
            # e.g. a renamed repo: the client asks again, here
            target = urlsplit(urljoin(up.url, up.headers["Location"]))
            out["Location"] = f"{base}{target.path}" + (f"?{target.query}" if target.query else "")
        if nxt := _next_link(up.headers.get("Link"), base):
            out["Link"] = nxt
        data = up.body
        content_type = up.headers.get("Content-Type", "application/json")
        if "json" in content_type and data:
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            if parsed is not None:
                parsed = _strip_xet(parsed)
                data = json.dumps(parsed).encode()
                if up.status == 200 and isinstance(parsed, dict):
                    self._remember(raw, parsed)
        out["Content-Type"] = content_type
        return web.Response(status=up.status, body=data, headers=out)

    def _remember(self, raw_path: str, info: dict[str, Any]) -> None:
        """From a revision answer: the revision's commit (for refs/ in the agent's
        cache) and whether the repo is private or gated (for what is done with it)."""
        route = _revision_route(raw_path)
        if route is None:
            return
        repo_type, repo_id, rev = route
        _bounded_put(
            self._flags,
            (repo_type, repo_id),
            (bool(info.get("private")), bool(info.get("gated"))),
            REF_ENTRIES,
        )
        commit = info.get("sha")
        if isinstance(commit, str) and SHA1_RE.fullmatch(commit) and rev != commit:
            _bounded_put(self._refs, (repo_type, repo_id, commit), rev, REF_ENTRIES)

    # -- resolve -----------------------------------------------------------------------

    async def _metadata(self, target: ResolveTarget, request: web.Request) -> FileMeta:
        auth = request.headers.get("Authorization")
        key = (target, hashlib.sha256((auth or "").encode()).hexdigest())
        now = time.monotonic()
        hit = self._meta.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        headers = self._headers(request, **{"Accept-Encoding": "identity"})

        async def attempt(mirror: str) -> Upstream:
            url = mirror + target.url_path()
            for _ in range(10):
                h = dict(headers)
                if _origin(url) != _origin(mirror):
                    h.pop("Authorization", None)
                up = await self._send(mirror, "HEAD", url, h, None)
                if (
                    up.status in REDIRECTS
                    and "X-Repo-Commit" not in up.headers
                    and "Location" in up.headers
                ):
                    url = urljoin(url, up.headers["Location"])  # e.g. a renamed repo
                    continue
                return up
            raise aiohttp.ClientError(f"too many redirects, last to {url}")

        up = await self._failover(attempt)
        if up.status >= 400 or (up.status >= 300 and "X-Repo-Commit" not in up.headers):
            raise _Answer(_refusal(up))
        meta = _file_meta(up, target)
        if SHA1_RE.fullmatch(target.revision):  # a commit: its files never change
            _bounded_put(self._meta, key, (now + META_TTL, meta), META_ENTRIES)
        return meta

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        try:
            target = parse_resolve(request.raw_path)
        except HfswarmError as exc:
            return hub_error(400, None, f"hfswarm agent: {exc.one_line()}")
        if target is None:
            return hub_error(404, None, f"hfswarm agent: no such route {request.path}")
        if request.method not in ("GET", "HEAD"):
            return hub_error(405, None, "hfswarm agent: resolve takes GET and HEAD only")
        try:
            meta = await self._metadata(target, request)
        except _Answer as a:
            return a.response
        headers = {
            "X-Repo-Commit": meta.commit,
            "ETag": f'"{meta.blob_id}"',
            "Accept-Ranges": "bytes",
        }
        if meta.is_lfs:
            headers["X-Linked-Etag"] = f'"{meta.blob_id}"'
            headers["X-Linked-Size"] = str(meta.size)
        if request.method == "HEAD":
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_type = "application/octet-stream"
            resp.content_length = meta.size
            await resp.prepare(request)
            return resp
        span = parse_range(request.headers.get("Range"), meta.size)
        if span == UNSATISFIABLE:
            return hub_error(
                416,
                None,
                "range not satisfiable",
                {**headers, "Content-Range": f"bytes */{meta.size}"},
            )
        try:
            path = await self._obtain(target, meta, _bearer(request.headers.get("Authorization")))
        except _Answer as a:
            return a.response
        return await self._stream(request, path, meta.size, span, headers)

    async def _obtain(self, target: ResolveTarget, meta: FileMeta, token: str | None) -> Path:
        file = RemoteFile(
            path=target.path, size=meta.size, blob_id=meta.blob_id, is_lfs=meta.is_lfs
        )
        # The mirror let an anonymous client read it: public and not gated. With a token
        # it may be either, and a resolve does not say: what the revision API said, else
        # assume both (fail closed).
        private, gated = (
            (False, False)
            if token is None
            else self._flags.get((target.repo_type, target.repo_id), (True, True))
        )
        snapshot = Snapshot(
            repo_type=target.repo_type,
            repo_id=target.repo_id,
            revision=target.revision,
            commit=meta.commit,
            files=(file,),
            mirror=meta.mirror,
            private=private,
            gated=gated,
        )
        ref = (
            target.revision
            if target.revision != meta.commit
            else self._refs.get((target.repo_type, target.repo_id, meta.commit))
        )
        # Not tied to this connection: a client that goes away (Ctrl-C, a read timeout)
        # leaves the agent finishing, verifying and seeding the blob; its retry joins.
        task = asyncio.get_running_loop().create_task(
            self.backend.blob_for_client(snapshot, file, token, ref)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            return await asyncio.shield(task)
        except Exception as exc:
            raise _Answer(_error_response(exc, f"{target.repo_id}/{target.path}")) from exc

    async def _stream(
        self,
        request: web.Request,
        path: Path,
        size: int,
        span: tuple[int, int] | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Bytes [start, end) of a verified blob: 1 MiB preads, one read ahead."""
        start, end = span if span is not None else (0, size)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            return hub_error(500, None, f"hfswarm agent: cannot read its copy of {path}: {exc}")
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[bytes] | None = None
        resp = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
        try:
            if os.fstat(fd).st_size != size:
                return hub_error(
                    500, None, f"hfswarm agent: its copy of {path.name} has the wrong size"
                )
            resp.content_type = "application/octet-stream"
            resp.content_length = end - start
            if span is not None:
                resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            await resp.prepare(request)
            pos = start
            if pos < end:
                pending = loop.run_in_executor(None, os.pread, fd, min(READ_CHUNK, end - pos), pos)
            while pos < end:
                assert pending is not None
                chunk, pending = await pending, None
                if not chunk:  # cannot happen to a blob in blobs/ (never rewritten)
                    raise ConnectionResetError("blob shrank while being served")
                nxt = pos + len(chunk)
                if nxt < end:
                    pending = loop.run_in_executor(
                        None, os.pread, fd, min(READ_CHUNK, end - nxt), nxt
                    )
                await resp.write(chunk)
                pos = nxt
            await resp.write_eof()
        except ConnectionError:
            # The client went away (or the blob could not be read whole): end the
            # connection, so a short body is never taken for a whole one.
            if request.transport is not None:
                request.transport.close()
        finally:
            if pending is not None:
                with contextlib.suppress(BaseException):
                    await pending
            os.close(fd)
        return resp
