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

Without the mirror (revision, tree, paths-info and resolve metadata answered here from
revision manifests: `HubBackend.revision_manifest`, the agent's and its peers' newest):
- ``local/*`` repos (`hfswarm publish`) always: no mirror has them, none is asked;
- other repos only when no mirror answers (unreachable, or a 5xx): a 401, 403 or 404
  is the mirror's final word, and any answer of the mirror wins over the peers'. Peers
  share manifests of public repos only, so nothing gated or private is served this way.

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

Streaming: a GET for a blob the agent does not hold yet starts the fetch and streams
the file in order as it becomes checked (`peer.transfer.inflight`): swarm pieces that
passed libtorrent's merkle check against the manifest (the swarm is asked for the pieces
right after the reader first), mirror bytes as they are hashed in order. The body's last
byte goes out only once the whole-file hash matched the Hub's blob id; a fetch that fails
or starts over from another source after bytes went out cuts the connection, so a client
never holds a whole body that was not verified. (A Range that ends before the last byte
is answered from checked pieces before the whole-file check; those bytes are what the
manifest's merkle tree, or the mirror itself, vouches for.)
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlencode, urljoin, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from peer import wire
from peer.cache.hf_cache import safe_relpath
from peer.config import AgentConfig
from peer.errors import (
    DiskFull,
    EntryNotFound,
    GatedRepo,
    HfswarmError,
    IntegrityError,
    LocalError,
    NotShared,
    PeerMisbehaved,
    RepoNotFound,
    RevisionNotFound,
    UserError,
)
from peer.hub.answers import entry_not_found, hub_error, paths_asked, range_not_satisfiable
from peer.hub.metadata import RemoteFile, Snapshot
from peer.hub.protocol import (
    API_TYPES,
    REDIRECTS,
    RETRYABLE,
    UNFIXABLE,
    UNSATISFIABLE,
    URL_TYPES,
    api_path,
    bearer,
    content_id,
    directory_oids,
    if_range_allows,
    is_lfs_blob_id,
    iso_date,
    listed_id,
    origin,
    parse_range,
    paths_info,
    repo_info,
    resolve_headers,
    resolve_path,
    tree_entries,
    with_last_commit,
)
from peer.manifests.revisions import is_local_repo
from peer.serving.file_range import FileSender, send_range
from peer.serving.limits import write_stall_of
from peer.serving.sharing import Access, Visibility, repo_key
from peer.transfer.inflight import FlightReader, InFlightBlob
from peer.verification.hashing import SHA1_RE

log = logging.getLogger(__name__)

# Headers of a mirror's answer that a Hub client reads; everything else is dropped
# (X-Xet-* above all). Link and Location are rewritten, not copied.
PASSED_HEADERS = ("X-Error-Code", "X-Error-Message", "X-Repo-Commit", "Retry-After")
READ_CHUNK = 1 << 20
# An in-flight body goes out by sendfile (no copy through the agent) at most this much
# at a time, so the reader's position (which steers the swarm) follows it.
SENDFILE_CHUNK = 8 << 20
# A file up to this size is answered once its fetch returned, never streamed while it
# runs: waiting costs a fraction of a second, and a bad copy then reaches the client as
# a Hub error (424, which it reports) rather than as a cut body (which it retries).
STREAM_ABOVE = 1 << 20
META_TTL = 60.0  # seconds a file's metadata at a commit is reused for the same token
META_ENTRIES = 4096
REF_ENTRIES = 1024


class HubBackend(Protocol):
    """What the Hub API needs of the agent (`peer.agent.jobs.HubService`)."""

    config: AgentConfig

    async def blob_for_client(
        self,
        snapshot: Snapshot,
        file: RemoteFile,
        token: str | None,
        ref: str | None,
        access: Access,
    ) -> Path:
        """A verified copy of the file in the agent's cache (obtained if need be), linked
        into the snapshot of `snapshot.commit`; `ref` names the revision, if known;
        `access`: on whose word the request stands (`peer.serving.sharing`)."""
        ...

    async def revision_manifest(
        self, repo_type: str, repo_id: str, revision: str
    ) -> wire.RevisionManifest | None:
        """The newest manifest the agent or its peers hold for a revision, or None."""
        ...

    def mirror_said(
        self, repo_type: str, repo_id: str, revision: str, commit: str, private: bool, gated: bool
    ) -> None:
        """A revision a client resolved through the mirror (the agent records public ones)."""
        ...

    async def flight_of(self, blob_id: str, until: asyncio.Future[Any]) -> InFlightBlob | None:
        """The blob's fetch in progress (what of it is ready to stream) once it
        registered, or None if `until` (the fetch) ended first."""
        ...

    def count_served(self, n: int) -> None:
        """`n` more bytes of a resolve body went to a client (the agent's counters)."""
        ...

    def count_stream(self, delta: int) -> None:
        """A resolve body started (+1) or ended (-1)."""
        ...

    def mirror_error(self, mirror: str) -> None:
        """A mirror failed to answer (unreachable, or a failure status)."""
        ...


# -- requests ----------------------------------------------------------------------


@dataclass(frozen=True)
class ResolveTarget:
    repo_type: str
    repo_id: str
    revision: str
    path: str

    def url_path(self) -> str:
        return resolve_path(self.repo_type, self.repo_id, self.revision, self.path)


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


@dataclass(frozen=True)
class ApiRoute:
    """An /api route answerable from a revision manifest."""

    repo_type: str
    repo_id: str
    action: str  # "revision", "tree" or "paths-info"
    revision: str
    subpath: str = ""


_MANIFEST_ACTIONS = ("revision", "tree", "paths-info")


def _api_route(raw_path: str) -> ApiRoute | None:
    """``/api/{type}s/{repo_id}[/revision|tree|paths-info/{rev}[/{path}]]`` -> route."""
    segs = raw_path.partition("?")[0].split("/")[2:]
    if not segs or segs[0] not in API_TYPES:
        return None
    repo_type, rest = API_TYPES[segs[0]], segs[1:]
    for action in _MANIFEST_ACTIONS:
        split = _split_repo(rest, action)
        if split is None:
            continue
        repo_id, tail = split
        rev, after = _split_revision(tail) if tail and tail[0] else ("main", [])
        subpath = "/".join(unquote(s) for s in after).strip("/")
        return ApiRoute(repo_type, repo_id, action, rev, subpath)
    if 1 <= len(rest) <= 2 and all(rest):  # repo_info without a revision: main
        return ApiRoute(repo_type, "/".join(unquote(s) for s in rest), "revision", "main")
    return None


def _is_local_api(raw_path: str) -> bool:
    segs = raw_path.partition("?")[0].split("/")[2:]
    return len(segs) >= 3 and segs[0] in API_TYPES and unquote(segs[1]) == "local"


def _directories(m: wire.RevisionManifest) -> dict[str, str]:
    """Every folder of a revision, with a deterministic tree id (of the files' blob ids)."""
    return directory_oids((f.path, f.blob_id) for f in m.files)


def _unknown_revision(repo_type: str, repo_id: str, revision: str) -> web.Response:
    if is_local_repo(repo_id):
        hint = "publish it with `hfswarm publish PATH --repo NAME` on an agent this one reaches"
    else:
        hint = "the mirror cannot be reached, and no peer knows this revision"
    if revision == "main":
        return hub_error(
            404, "RepoNotFound", f"hfswarm agent: no agent knows {repo_type} {repo_id} ({hint})"
        )
    return hub_error(
        404, "RevisionNotFound", f"hfswarm agent: no agent knows {repo_id}@{revision} ({hint})"
    )


def key_of(target: ResolveTarget) -> tuple[str, str]:
    return target.repo_type, target.repo_id


# -- answers -----------------------------------------------------------------------


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
        return is_lfs_blob_id(self.blob_id)


def _file_meta(
    up: Upstream, target: ResolveTarget, listed: tuple[str, int] | None = None
) -> FileMeta:
    """The resolve answer's commit, blob id and size; `listed`: the id and size the
    mirror's paths-info gives the file, for an ETag that names no content (olah offline
    sends ``"<md5>-<n>"`` for git files)."""
    what = f"{target.repo_id}@{target.revision}/{target.path}"
    commit = up.headers.get("X-Repo-Commit", "")
    blob_id = content_id(up.headers.get("X-Linked-Etag"), up.headers.get("ETag"))
    size_text = up.headers.get("X-Linked-Size") or (
        None if up.status in REDIRECTS else up.headers.get("Content-Length")
    )
    if blob_id is None and listed is not None and size_text == str(listed[1]):
        blob_id = listed[0]
    problem = None
    if not SHA1_RE.fullmatch(commit):
        problem = "no X-Repo-Commit"
    elif blob_id is None:
        shown = (up.headers.get("X-Linked-Etag") or up.headers.get("ETag") or "").strip()
        shown = shown.removeprefix("W/").strip('"')
        problem = f"no usable content id (ETag {shown!r}, nor in its paths-info)"
    elif size_text is None or not size_text.isdigit():
        problem = "no size"
    if problem is not None:
        raise _Answer(
            hub_error(
                UNFIXABLE,  # the mirror answered, in a form asking again will not change
                None,
                f"hfswarm agent: {up.mirror} gave {problem} for {what}: the agent cannot verify "
                "what it would serve (is the agent's --mirror a Hugging Face-style endpoint?)",
            )
        )
    return FileMeta(
        commit=commit, blob_id=blob_id or "", size=int(size_text or 0), mirror=up.mirror
    )


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
        if isinstance(exc, NotShared):
            return hub_error(403, None, msg)
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
        if isinstance(exc, IntegrityError | PeerMisbehaved):
            # data that kept failing verification, a mirror breaking the protocol: a
            # client's retry would meet the same, so it hears the reason at once
            return hub_error(UNFIXABLE, None, f"{msg} [while fetching {what}]")
        # network trouble: retrying later may work (huggingface_hub retries 502)
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
                self.backend.mirror_error(mirror)
                continue
            if up.status in RETRYABLE:
                self.backend.mirror_error(mirror)
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
        route = _api_route(raw)
        if route is not None and route.action == "paths-info" and request.method != "POST":
            route = None
        if _is_local_api(raw):
            # local/* repos live on the LAN only: their names never go to a mirror
            wanted = (
                ("POST",) if route is not None and route.action == "paths-info" else ("GET", "HEAD")
            )
            if route is None or request.method not in wanted:
                return hub_error(
                    404,
                    None,
                    "hfswarm agent: local/* repos answer revision, tree and paths-info only",
                )
            return await self._from_manifest(request, route, None)
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
        except _Answer as a:  # no mirror reachable: what the agent and its peers know
            if route is not None:
                return await self._from_manifest(request, route, a.response)
            return a.response
        if route is not None and up.status >= 500:  # the mirror is failing, not refusing
            return await self._from_manifest(request, route, self._proxied(request, up))
        resp = self._proxied(request, up, raw)
        if request.method == "HEAD" and "Content-Length" in up.headers:
            # the length of the body a GET would get, as the mirror said it
            resp.headers["Content-Length"] = up.headers["Content-Length"]
        return resp

    def _proxied(self, request: web.Request, up: Upstream, raw: str | None = None) -> web.Response:
        """The mirror's answer for the client: Link and Location pointing here, Xet keys
        removed; `raw` (the request path) set: a 200 revision answer is remembered."""
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
                if up.status == 200 and isinstance(parsed, dict) and raw is not None:
                    self._remember(raw, parsed)
        out["Content-Type"] = content_type
        return web.Response(status=up.status, body=data, headers=out)

    def _remember(self, raw_path: str, info: dict[str, Any]) -> None:
        """From a repo info answer (``/api/{type}s/{id}``, which is `main`, or with
        ``/revision/{rev}``): the revision's commit (for refs/ in the agent's cache) and
        whether the repo is private or gated (for what is done with it)."""
        route = _api_route(raw_path)
        if route is None or route.action != "revision":
            return
        private, gated = bool(info.get("private")), bool(info.get("gated"))
        _bounded_put(self._flags, (route.repo_type, route.repo_id), (private, gated), REF_ENTRIES)
        commit = info.get("sha")
        if isinstance(commit, str):
            self._learn(route.repo_type, route.repo_id, route.revision, commit, (private, gated))

    def _learn(
        self,
        repo_type: str,
        repo_id: str,
        revision: str,
        commit: str,
        flags: tuple[bool, bool] | None,
    ) -> None:
        """The mirror named `commit` for `revision`: refs/<revision> is written with the
        next file linked for it (a name only, never a commit for itself); the revision is
        recorded if the repo is public (`flags`: private, gated; None: not known, so
        nothing is recorded)."""
        if not SHA1_RE.fullmatch(commit):
            return
        if revision != commit:
            _bounded_put(self._refs, (repo_type, repo_id, commit), revision, REF_ENTRIES)
        if flags is not None:
            private, gated = flags
            self.backend.mirror_said(repo_type, repo_id, revision, commit, private, gated)

    # -- answers from revision manifests (local/*, or no mirror answering) ---------------

    async def _manifest(
        self, repo_type: str, repo_id: str, revision: str, fallback: web.Response | None
    ) -> wire.RevisionManifest:
        """The newest manifest the agent and its peers hold, else `fallback` (what the
        mirror's failure looked like) or a 404, as an `_Answer`."""
        try:
            m = await self.backend.revision_manifest(repo_type, repo_id, revision)
        except HfswarmError as exc:
            raise _Answer(_error_response(exc, f"{repo_id}@{revision}")) from exc
        if m is None:
            raise _Answer(fallback or _unknown_revision(repo_type, repo_id, revision))
        # What huggingface_hub would do with it: refs/<name> for the commit. (Nothing is
        # learned of the repo's visibility: a peer's word is not the mirror's.)
        if revision != m.commit:
            _bounded_put(self._refs, (repo_type, repo_id, m.commit), revision, REF_ENTRIES)
        return m

    async def _from_manifest(
        self, request: web.Request, route: ApiRoute, fallback: web.Response | None
    ) -> web.Response:
        try:
            m = await self._manifest(route.repo_type, route.repo_id, route.revision, fallback)
        except _Answer as a:
            return a.response
        flag = ("1", "true")
        published = iso_date(m.published_at / 1000)
        if route.action == "revision":
            info = repo_info(
                m.repo_type,
                m.repo_id,
                id_seed=f"{m.repo_type}/{m.repo_id}",
                commit=m.commit,
                files=m.files,
                last_modified=published,
                private=False,
                gated=False,
                blobs=request.query.get("blobs", "").lower() in flag,
            )
            return web.json_response(info)
        dirs = _directories(m)
        if route.action == "tree":
            recursive = request.query.get("recursive", "").lower() in flag
            entries = tree_entries(m.files, dirs, route.subpath, recursive=recursive)
            if entries is None:
                return entry_not_found(route.subpath, route.revision, m.commit)
            if request.query.get("expand", "").lower() in flag:
                entries = with_last_commit(entries, m.commit, "published on the LAN", published)
            return web.json_response(entries)
        paths = await paths_asked(request)
        if isinstance(paths, web.Response):
            return paths
        return web.json_response(paths_info({f.path: f for f in m.files}, dirs, paths))

    async def _manifest_meta(
        self, target: ResolveTarget, fallback: web.Response | None
    ) -> FileMeta:
        m = await self._manifest(target.repo_type, target.repo_id, target.revision, fallback)
        entry = next((f for f in m.files if f.path == target.path), None)
        if entry is None:
            raise _Answer(entry_not_found(target.path, target.revision, m.commit))
        return FileMeta(commit=m.commit, blob_id=entry.blob_id, size=entry.size, mirror="")

    # -- resolve -----------------------------------------------------------------------

    async def _metadata(self, target: ResolveTarget, request: web.Request) -> FileMeta:
        if is_local_repo(target.repo_id):  # on the LAN only: no mirror is asked
            return await self._manifest_meta(target, None)
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
                if origin(url) != origin(mirror):
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

        try:
            up = await self._failover(attempt)
        except _Answer as a:  # no mirror reachable: what the agent and its peers know
            return await self._manifest_meta(target, a.response)
        if up.status >= 500:  # the mirror is failing, not refusing
            return await self._manifest_meta(target, _refusal(up))
        if up.status >= 400 or (up.status >= 300 and "X-Repo-Commit" not in up.headers):
            raise _Answer(_refusal(up))
        listed = None
        if content_id(up.headers.get("X-Linked-Etag"), up.headers.get("ETag")) is None:
            listed = await self._listed_id(up, target, headers)
        meta = _file_meta(up, target, listed)
        self._learn_from_resolve(target, meta, anonymous=auth is None)
        if SHA1_RE.fullmatch(target.revision):  # a commit: its files never change
            _bounded_put(self._meta, key, (now + META_TTL, meta), META_ENTRIES)
        return meta

    async def _listed_id(
        self, up: Upstream, target: ResolveTarget, headers: dict[str, str]
    ) -> tuple[str, int] | None:
        """The file's blob id as the same mirror lists it at the commit it just named
        (paths-info, with the client's own credentials). None: no such answer."""
        commit = up.headers.get("X-Repo-Commit", "")
        if not SHA1_RE.fullmatch(commit):
            return None
        url = up.mirror + api_path(target.repo_type, target.repo_id, "paths-info", commit)
        body = urlencode({"paths": target.path, "expand": "false"}).encode()
        form = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
        try:
            answer = await self._send(up.mirror, "POST", url, form, body)
            return listed_id(json.loads(answer.body), target.path) if answer.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None

    def _learn_from_resolve(
        self, target: ResolveTarget, meta: FileMeta, *, anonymous: bool
    ) -> None:
        """A resolve by name: its X-Repo-Commit is the commit of that name. An anonymous
        client's file the mirror gave out is public; with a token, what the revision API
        last said of the repo (nothing is recorded when that is not known)."""
        if SHA1_RE.fullmatch(target.revision):
            return
        flags = (False, False) if anonymous else self._flags.get(key_of(target))
        self._learn(target.repo_type, target.repo_id, target.revision, meta.commit, flags)

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
            **resolve_headers(meta.commit, meta.blob_id, meta.size),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_type = "application/octet-stream"
            resp.content_length = meta.size
            await resp.prepare(request)
            return resp
        span = (
            parse_range(request.headers.get("Range"), meta.size)
            if if_range_allows(request.headers.get("If-Range"), headers["ETag"])
            else None
        )
        if span == UNSATISFIABLE:
            return range_not_satisfiable(meta.size, headers)
        task = self._start_fetch(
            target,
            meta,
            bearer(request.headers.get("Authorization")),
            anonymous="Authorization" not in request.headers,
        )
        self.backend.count_stream(1)
        try:
            return await self._serve(request, target, task, meta, span, headers)
        finally:
            self.backend.count_stream(-1)

    def _start_fetch(
        self, target: ResolveTarget, meta: FileMeta, token: str | None, *, anonymous: bool
    ) -> asyncio.Task[Path]:
        # Not tied to this connection: a client that goes away (Ctrl-C, a read timeout)
        # leaves the agent finishing, verifying and seeding the blob; its retry joins.
        task = asyncio.get_running_loop().create_task(
            self._fetch(target, meta, token, anonymous=anonymous)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _fetch(
        self, target: ResolveTarget, meta: FileMeta, token: str | None, *, anonymous: bool
    ) -> Path:
        file = RemoteFile(
            path=target.path, size=meta.size, blob_id=meta.blob_id, is_lfs=meta.is_lfs
        )
        access = await self._access(target, meta, anonymous=anonymous)
        snapshot = Snapshot(
            repo_type=target.repo_type,
            repo_id=target.repo_id,
            revision=target.revision,
            commit=meta.commit,
            files=(file,),
            mirror=meta.mirror,
            private=access.visibility is Visibility.PRIVATE,
            gated=access.visibility is Visibility.GATED,
        )
        ref = (
            target.revision
            if target.revision != meta.commit
            else self._refs.get((target.repo_type, target.repo_id, meta.commit))
        )
        return await self.backend.blob_for_client(snapshot, file, token, ref, access)

    async def _access(self, target: ResolveTarget, meta: FileMeta, *, anonymous: bool) -> Access:
        """The mirror just allowed this client this file (its resolve HEAD, with the
        client's token): that is the request's standing. Whether the repo is public
        decides what the agent may share of it: anonymous clients only reach public
        repos; for a client with a token, what the revision API said, else a HEAD of
        the same file without the token (what anyone may read)."""
        key = repo_key(target.repo_type, target.repo_id)
        if not meta.mirror:  # from revision manifests: the LAN's word only
            return Access(key, None, mirror_allowed=False)
        flags = (False, False) if anonymous else self._flags.get(key_of(target))
        if flags is None:
            public = await self._anonymous_ok(target, meta)
            flags = (False, False) if public else (False, True)
            if public is not None:  # no answer: not shared this time, asked again next
                _bounded_put(self._flags, key_of(target), flags, REF_ENTRIES)
        private, gated = flags
        return Access(key, Visibility.of_mirror_answer(private=private, gated=gated), True)

    async def _anonymous_ok(self, target: ResolveTarget, meta: FileMeta) -> bool | None:
        url = meta.mirror + target.url_path()
        headers = {"User-Agent": self.backend.config.hub.user_agent}
        try:
            up = await self._send(meta.mirror, "HEAD", url, headers, None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None  # unknown: not shared (fail closed)
        return up.status < 300 or (up.status in REDIRECTS and "X-Repo-Commit" in up.headers)

    async def _serve(
        self,
        request: web.Request,
        target: ResolveTarget,
        task: asyncio.Task[Path],
        meta: FileMeta,
        span: tuple[int, int] | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """The file for a GET: from the finished blob, or streamed in order while the
        fetch runs (see `peer.transfer.inflight`). Until the first byte can go out, a
        failing fetch still gets a proper Hub error answer. Only a request the mirror
        allowed may stream a fetch in progress: one on the LAN's word alone (no mirror
        behind `meta`) waits for the fetch, which checks that the blob is shared; so
        does a small file (`STREAM_ABOVE`)."""
        start, end = span if span is not None else (0, meta.size)
        while meta.mirror and meta.size > STREAM_ABOVE and not task.done():
            flight = await self.backend.flight_of(meta.blob_id, task)
            if flight is None:  # the fetch ended first: its result below
                break
            # Registered, the fetch makes its prefix readable for us.
            async with flight.reader(start, until=task) as reader:
                if await reader.readable(end) is not None:
                    return await self._stream_in_flight(request, task, reader, span, headers)
        try:
            path = await task
        except Exception as exc:
            return _error_response(exc, f"{target.repo_id}/{target.path}")
        return await self._stream(request, path, meta.size, span, headers)

    async def _stream_in_flight(
        self,
        request: web.Request,
        task: asyncio.Task[Path],
        reader: FlightReader,
        span: tuple[int, int] | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Send [start, end) as the fetch makes it ready; the blob's last byte only once
        it is verified (`InFlightBlob.moved`) or the fetch returned. A fetch that fails,
        or starts over from another source after bytes went out, cuts the connection:
        the client never sees a whole body that was not verified."""
        size = reader.size
        start, end = span if span is not None else (0, size)
        resp = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
        resp.content_type = "application/octet-stream"
        resp.content_length = end - start
        if span is not None:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        fobj: BinaryIO | None = None
        fobj_path: Path | None = None
        pos = start
        sender = FileSender(request, write_stall_of(request.transport), most=SENDFILE_CHUNK)
        # For the debug log's time line: time spent waiting for checked bytes (the
        # fetch behind the client) and in sendfile (the client behind the fetch).
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        waited = 0.0
        sends = waits = 0  # sendfile calls; times the fetch had nothing past `pos` yet
        try:
            await resp.prepare(request)
            while pos < end:
                t = loop.time()
                if not task.done() and reader.window(end) is None:
                    waits += 1
                window = await reader.readable(end)
                waited += loop.time() - t
                if window is None:  # the fetch returned
                    path, limit = task.result(), end  # raises if the fetch failed: cut below
                else:
                    path, limit = window.path, window.end
                if fobj is None or fobj_path != path:
                    try:
                        new = os.fdopen(os.open(path, os.O_RDONLY), "rb", buffering=0)
                    except FileNotFoundError:
                        if window is None:
                            raise
                        await reader.changed()  # renamed into blobs/, or void: moved / reset
                        continue
                    await sender.aclose()  # its readahead holds the old fd
                    if fobj is not None:
                        fobj.close()
                    fobj, fobj_path = new, path
                if os.fstat(fobj.fileno()).st_size < limit:
                    raise ConnectionResetError("short read of a checked range")
                # The kernel copies the page-cache pages to the socket (os.sendfile);
                # asyncio falls back to reads where it cannot. A source made void while
                # they went out is caught just after: the connection is cut.
                n = await sender.send(fobj, pos, limit)
                sends += 1
                # The bytes just sent may be of a source now void, also when the fetch
                # returned meanwhile (a refetch shorter than this send): then cut.
                reader.check()
                self.backend.count_served(n)
                pos += n
                reader.advance(pos)
            await resp.write_eof()
            log.debug(
                "%s: streamed %d bytes in %.3f s, %.3f s of it waiting for checked bytes "
                "(%d waits, %d sends)",
                reader.blob_id[:12],
                end - start,
                loop.time() - t0,
                waited,
                waits,
                sends,
            )
        except (Exception, asyncio.CancelledError) as exc:
            # End the connection: a short body is never taken for a whole one.
            if not isinstance(exc, ConnectionResetError | asyncio.CancelledError):
                log.warning("streaming %s stopped: %s", reader.blob_id[:12], exc)
            if request.transport is not None:
                request.transport.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            await sender.aclose()
            if fobj is not None:
                fobj.close()
        return resp

    async def _stream(
        self,
        request: web.Request,
        path: Path,
        size: int,
        span: tuple[int, int] | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Bytes [start, end) of a verified blob: 1 MiB preads, one read ahead, written
        through the transport. Not by sendfile: a client reading what sendfile sent of
        a blob held here spent more CPU and took longer (docs/benchmarks.md 8.24), and
        the answer waits for the client."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            return hub_error(500, None, f"hfswarm agent: cannot read its copy of {path}: {exc}")
        try:
            if os.fstat(fd).st_size != size:
                return hub_error(
                    500, None, f"hfswarm agent: its copy of {path.name} has the wrong size"
                )
            return await send_range(
                request, fd, size, span, READ_CHUNK, headers, on_sent=self.backend.count_served
            )
        finally:
            os.close(fd)
