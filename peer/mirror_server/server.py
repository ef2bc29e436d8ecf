"""An HF_ENDPOINT-compatible mirror for tests, the demo and benchmarks.

It speaks the subset of the Hub protocol huggingface_hub uses to download (repo info,
paginated tree, HEAD/GET resolve with Range, LFS redirects to a CDN origin, error codes)
and adds what a test needs: byte counters, injected faults and rate caps (per
connection, and per client IP across all its connections).

Routing parses ``request.raw_path`` by hand: revisions arrive URL-encoded
(``refs%2Fpr%2F1``) and repo ids contain ``/``, which a pattern router would mangle.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast, get_args
from urllib.parse import unquote, urlencode, urlsplit

from aiohttp import web

from peer.errors import ConfigError, HfswarmError
from peer.hub.answers import entry_not_found, paths_asked, range_not_satisfiable
from peer.hub.answers import hub_error as _error
from peer.hub.protocol import (
    API_TYPES,
    UNSATISFIABLE,
    URL_TYPES,
    RepoType,
    bearer,
    if_range_allows,
    parse_range,
    paths_info,
    repo_info,
    resolve_headers,
    tree_entries,
    with_last_commit,
)
from peer.mirror_server.control import (
    ClientRate,
    Fault,
    FaultBook,
    FaultPlan,
    MirrorStats,
    Outage,
    RateCap,
    StatsRecorder,
)
from peer.mirror_server.repo import (
    FileEntry,
    HostedRepo,
    RepoSource,
    Snapshot,
    scan_repos,
)

RedirectMode = Literal["none", "same-origin", "cross-origin"]

CHUNK = 1024 * 1024
_MIN_PACED_PIECE = 16 * 1024
_TRUE = frozenset({"1", "true", "True", "yes"})


def _read_at(path: Path, offset: int, n: int) -> bytes:
    # Opening per read keeps each read self-contained: a prefetch abandoned by a
    # disconnect can never race a close of a shared descriptor.
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return f.read(n)


def _discard(fut: asyncio.Future[Any]) -> None:
    """Drop an in-flight read without 'exception never retrieved' noise."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def _flip(chunk: bytes, chunk_start: int, offsets: Iterable[int]) -> bytes:
    hits = [o - chunk_start for o in offsets if chunk_start <= o < chunk_start + len(chunk)]
    if not hits:
        return chunk
    buf = bytearray(chunk)
    for i in hits:
        buf[i] ^= 0xFF
    return bytes(buf)


def _xet_hash(sha256: str) -> str:
    """A well-formed (64 hex) Xet hash for the fake Xet signals; no Xet server knows it."""
    return hashlib.sha256(b"xet\0" + sha256.encode()).hexdigest()


def _display_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class MirrorServer:
    """HF-compatible mirror over folders. Use as ``async with MirrorServer(...) as m``.

    Two listeners: ``url`` (the HF_ENDPOINT) and ``cdn_url`` (another port, hence
    another origin, where cross-origin LFS redirects point). Control methods are
    thread-safe, so `ThreadedMirror` can expose them to another thread.
    """

    def __init__(
        self,
        repos: Iterable[RepoSource],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: Collection[str] = (),
        gated_tokens: Collection[str] = (),
        page_size: int = 50,
        redirect: RedirectMode = "none",
        rate_cap: int | None = None,
        client_rate: int | None = None,
        cdn_port: int = 0,
        url_ttl: float = 24 * 3600,
        xet_signals: bool = False,
    ) -> None:
        if redirect not in get_args(RedirectMode):
            raise ConfigError(
                f"unknown redirect mode {redirect!r}",
                hint="use one of: none, same-origin, cross-origin",
            )
        if page_size < 1:
            raise ConfigError("page_size must be at least 1")
        self._sources = list(repos)
        self._host = host
        self._port = port
        self._cdn_port = cdn_port
        self._gated_tokens = frozenset(gated_tokens)
        # A gated-access token is also a valid token for private repos.
        self._tokens = frozenset(tokens) | self._gated_tokens
        self._page_size = page_size
        self._redirect: RedirectMode = redirect
        self._url_ttl = url_ttl
        # Answer like a Xet-backed Hub repo (X-Xet-* headers, `xetHash` in trees) without
        # serving Xet: a client that believes them fails, so a test can prove that a
        # proxy in front of this mirror (the agent's HF_ENDPOINT mode) strips them.
        self._xet_signals = xet_signals
        self._rate = RateCap(rate_cap)
        self._client_rate = ClientRate(client_rate)
        self._stats = StatsRecorder()
        self._faults = FaultBook()
        self._outage = Outage()
        # Signs CDN URLs so they behave like the Hub's expiring signed URLs.
        self._secret = os.urandom(32)
        self._repos: dict[tuple[str, str], HostedRepo] = {}
        self._blobs: dict[str, FileEntry] = {}  # sha256 -> a file with that content
        self._blob_paths: dict[str, list[str]] = {}  # sha256 -> every repo path holding it
        self._tree_cache: dict[tuple[str, str, bool], list[dict[str, Any]] | None] = {}
        self._reader: ThreadPoolExecutor | None = None
        self._runners: list[web.ServerRunner] = []
        self._url: str | None = None
        self._cdn_url: str | None = None
        self._bound_cdn_port = 0

    # --- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> MirrorServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Hash every repo (in threads), then open both listeners."""
        if self._url is not None:
            raise RuntimeError("MirrorServer already started")
        self._repos = await asyncio.to_thread(scan_repos, self._sources)
        for repo in self._repos.values():
            for snap in repo.by_name.values():
                for f in snap.files:
                    if f.sha256 is not None:
                        self._blobs.setdefault(f.sha256, f)
                        paths = self._blob_paths.setdefault(f.sha256, [])
                        if f.path not in paths:
                            paths.append(f.path)
        self._reader = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mirror-read")
        try:
            main_port = await self._listen(self._handle_main, self._port)
            self._bound_cdn_port = await self._listen(self._handle_cdn, self._cdn_port)
        except BaseException:
            await self.close()
            raise
        shown = _display_host(self._host)
        self._url = f"http://{shown}:{main_port}"
        self._cdn_url = f"http://{shown}:{self._bound_cdn_port}"

    async def _listen(self, handler: Any, port: int) -> int:
        # handler_cancellation: a client that hangs up mid-stall frees its handler at once.
        server = web.Server(handler, handler_cancellation=True, access_log=None)
        # A short shutdown timeout: stalled handlers must not hold a test for 60 s.
        runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self._host, port)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {self._host}:{port}: {e.strerror}",
                hint="pick another port, or 0 for any free port",
            ) from e
        return int(runner.addresses[0][1])

    async def close(self) -> None:
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None
        self._url = self._cdn_url = None

    # --- public control API (thread-safe) ---------------------------------------------

    @property
    def url(self) -> str:
        """The HF_ENDPOINT of this mirror, e.g. ``http://127.0.0.1:PORT``."""
        if self._url is None:
            raise RuntimeError("MirrorServer is not running; use `async with`")
        return self._url

    @property
    def cdn_url(self) -> str:
        """The second listener: a different origin, target of cross-origin redirects."""
        if self._cdn_url is None:
            raise RuntimeError("MirrorServer is not running; use `async with`")
        return self._cdn_url

    def stats(self) -> MirrorStats:
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    def add_fault(self, fault: Fault) -> None:
        self._faults.add(fault)

    def clear_faults(self) -> None:
        self._faults.clear()

    def down_for(self, seconds: float) -> None:
        """Close every connection (new ones and bodies in flight) for `seconds`."""
        self._outage.down_for(seconds)

    def faults(self) -> list[Fault]:
        return self._faults.active()

    def set_rate_cap(self, bytes_per_sec: int | None) -> None:
        """Per connection: each connection's file body at most this many bytes/s."""
        self._rate.set(bytes_per_sec)

    def set_client_rate(self, bytes_per_sec: int | None, burst: int | None = None) -> None:
        """Per client IP: all of one client's file bodies together at most this many
        bytes/s (one token bucket per remote address). Resets the accounting."""
        self._client_rate.set(bytes_per_sec, burst)

    def client_rate_charged(self) -> dict[str, int]:
        """Body bytes each client was charged under the client rate since it was set."""
        return self._client_rate.charged()

    def commit_of(self, repo_type: str, repo_id: str, revision: str = "main") -> str:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"{repo_type}:{repo_id} is not served by this mirror")
        snap = repo.lookup(revision)
        if snap is None:
            raise KeyError(f"{repo_type}:{repo_id} has no revision {revision!r}")
        return snap.commit

    def repos_json(self) -> list[dict[str, Any]]:
        return [
            {
                "repo_type": r.source.repo_type,
                "repo_id": r.source.repo_id,
                "private": r.source.private,
                "gated": r.source.gated,
                "revisions": {name: s.commit for name, s in r.by_name.items()},
            }
            for r in self._repos.values()
        ]

    # --- entry points ----------------------------------------------------------------

    async def _handle_main(self, request: web.BaseRequest) -> web.StreamResponse:
        segs = request.raw_path.partition("?")[0].split("/")[1:]
        if segs[:1] == ["_mirror"]:
            return await self._control(request, segs[1:])
        if self._outage.is_down():
            return _hang_up(request)
        self._stats.request()
        try:
            if segs[:1] == ["api"]:
                resp = await self._api(request, [unquote(s) for s in segs[1:]])
            elif segs[:1] == ["_cdn"] and len(segs) == 2:
                resp = await self._cdn(request, segs[1])
            else:
                resp = await self._resolve_route(request, [unquote(s) for s in segs])
        except HfswarmError as e:
            resp = _error(400, None, e.one_line())
        self._count_meta(request, resp)
        return resp

    async def _handle_cdn(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._outage.is_down():
            return _hang_up(request)
        self._stats.request(cdn_with_authorization="Authorization" in request.headers)
        segs = request.raw_path.partition("?")[0].split("/")[1:]
        if segs[:1] == ["_cdn"] and len(segs) == 2:
            resp = await self._cdn(request, segs[1])
        else:
            resp = _error(404, None, "not found")
        self._count_meta(request, resp)
        return resp

    def _count_meta(self, request: web.BaseRequest, resp: web.StreamResponse) -> None:
        # Streamed file bodies count themselves as they go; this covers the small,
        # fully built bodies (JSON, errors). HEAD answers send no body.
        if isinstance(resp, web.Response) and request.method != "HEAD":
            body = resp.body
            if isinstance(body, bytes | bytearray):
                self._stats.body(_client(request), _url_path(request), len(body))

    # --- access ------------------------------------------------------------------------

    def _denied(
        self, request: web.BaseRequest, repo: HostedRepo, *, content: bool
    ) -> web.Response | None:
        token = bearer(request.headers.get("Authorization"))
        src = repo.source
        if src.private and token not in self._tokens:
            # Like the Hub: a private repo you may not see does not exist.
            return _error(401, "RepoNotFound", f"Repository not found: {repo.url_id}")
        if content and src.gated and token not in self._gated_tokens:
            if token is None:
                return _error(
                    401,
                    "GatedRepo",
                    f"Access to {src.repo_type} {src.repo_id} is restricted. You must have"
                    " access to it and be authenticated to access it. Please log in.",
                )
            return _error(
                403,
                "GatedRepo",
                f"Access to {src.repo_type} {src.repo_id} is restricted and you are not in"
                " the authorized list.",
            )
        return None

    def _find_repo(
        self, repo_type: RepoType, segs: list[str], keyword: str | None
    ) -> tuple[HostedRepo | None, list[str]]:
        """Split ``org/name/<keyword>/rest...`` (or ``name/...``) against known repos."""
        for n in (2, 1):
            if len(segs) < n:
                continue
            if keyword is not None and (len(segs) <= n or segs[n] != keyword):
                continue
            repo = self._repos.get((repo_type, "/".join(segs[:n])))
            if repo is not None:
                return repo, segs[n + 1 :] if keyword is not None else segs[n:]
        return None, []

    @staticmethod
    def _split_revision(
        repo: HostedRepo, segs: list[str]
    ) -> tuple[Snapshot | None, str, list[str]]:
        """Revision, then the rest. An encoded ``refs%2Fpr%2F1`` is one segment; a client
        that did not encode it sends several, so try longer joins of known names too."""
        if not segs:
            return None, "", []
        snap = repo.lookup(segs[0])
        if snap is not None:
            return snap, segs[0], segs[1:]
        for k in range(2, len(segs) + 1):
            candidate = "/".join(segs[:k])
            if candidate in repo.by_name:
                return repo.by_name[candidate], candidate, segs[k:]
        return None, segs[0], segs[1:]

    # --- /api ----------------------------------------------------------------------------

    async def _api(self, request: web.BaseRequest, segs: list[str]) -> web.StreamResponse:
        repo_type = API_TYPES.get(segs[0]) if segs else None
        if repo_type is None:
            return _error(404, None, "unknown API route")
        rest = segs[1:]
        repo, tail = self._find_repo(repo_type, rest, None)
        if repo is None:
            return _error(404, "RepoNotFound", f"Repository not found: {'/'.join(rest[:2])}")
        if denied := self._denied(request, repo, content=False):
            return denied
        action = tail[0] if tail else "revision"
        args = tail[1:]
        if action == "paths-info" and request.method == "POST":
            return await self._paths_info(request, repo, args)
        if request.method not in ("GET", "HEAD"):  # HEAD: olah asks whether a repo exists
            return _error(405, None, "method not allowed")
        if action == "revision":
            rev = "/".join(args) or "main"
            snap = repo.lookup(rev)
            if snap is None:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            blobs = request.query.get("blobs", "") in _TRUE
            return web.json_response(self._info_json(repo, snap, blobs=blobs))
        if action == "tree":
            return self._tree(request, repo, args)
        if action == "refs":
            return web.json_response(self._refs_json(repo, request.query.get("include_prs")))
        return _error(404, None, f"unknown API route {action!r}")

    def _info_json(self, repo: HostedRepo, snap: Snapshot, *, blobs: bool) -> dict[str, Any]:
        src = repo.source
        return repo_info(
            src.repo_type,
            src.repo_id,
            id_seed=repo.url_id,
            commit=snap.commit,
            files=snap.files,
            last_modified=snap.last_modified,
            private=src.private,
            gated="auto" if src.gated else False,
            blobs=blobs,
            xet_enabled=self._xet_signals,
        )

    @staticmethod
    def _refs_json(repo: HostedRepo, include_prs: str | None) -> dict[str, Any]:
        branches, prs = [], []
        for name, snap in repo.by_name.items():
            if name.startswith("refs/pr/"):
                prs.append({"name": name, "ref": name, "targetCommit": snap.commit})
            else:
                ref = {"name": name, "ref": f"refs/heads/{name}", "targetCommit": snap.commit}
                branches.append(ref)
        out: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if include_prs in _TRUE:
            out["pullRequests"] = prs
        return out

    def _tree_entries(
        self, snap: Snapshot, subpath: str, recursive: bool
    ) -> list[dict[str, Any]] | None:
        """Entries under `subpath` sorted by path; None if it is not a directory.

        Snapshots never change, so the listing is computed once per (commit, path, mode).
        """
        key = (snap.commit, subpath, recursive)
        if key in self._tree_cache:
            return self._tree_cache[key]
        result = tree_entries(snap.files, snap.directories, subpath, recursive=recursive)
        self._tree_cache[key] = result
        return result

    def _tree(self, request: web.BaseRequest, repo: HostedRepo, segs: list[str]) -> web.Response:
        snap, rev, sub = self._split_revision(repo, segs or ["main"])
        if snap is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        subpath = "/".join(sub).strip("/")
        recursive = request.query.get("recursive", "") in _TRUE
        entries = self._tree_entries(snap, subpath, recursive)
        if entries is None:
            return entry_not_found(subpath, rev, snap.commit)
        try:
            offset = int(request.query.get("cursor", "0"))
        except ValueError:
            return _error(400, None, "bad cursor")
        page = entries[offset : offset + self._page_size]
        if request.query.get("expand", "") in _TRUE:
            page = with_last_commit(page, snap.commit, "mirror snapshot", snap.last_modified)
        if self._xet_signals:
            page = [{**e, "xetHash": _xet_hash(e["lfs"]["oid"])} if "lfs" in e else e for e in page]
        headers: dict[str, str] = {}
        if offset + self._page_size < len(entries):
            query = [(k, v) for k, v in request.query.items() if k != "cursor"]
            query.append(("cursor", str(offset + self._page_size)))
            raw = request.raw_path.partition("?")[0]
            nxt = f"{request.scheme}://{request.host}{raw}?{urlencode(query)}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        return web.json_response(page, headers=headers)

    async def _paths_info(
        self, request: web.BaseRequest, repo: HostedRepo, segs: list[str]
    ) -> web.Response:
        snap, rev, _ = self._split_revision(repo, segs or ["main"])
        if snap is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        paths = await paths_asked(request)
        if isinstance(paths, web.Response):
            return paths
        return web.json_response(paths_info(snap.by_path, snap.directories, paths))

    # --- resolve -------------------------------------------------------------------------

    async def _resolve_route(self, request: web.BaseRequest, segs: list[str]) -> web.StreamResponse:
        repo_type: RepoType = "model"
        if segs and segs[0] in URL_TYPES:
            repo_type, segs = URL_TYPES[segs[0]], segs[1:]
        if "resolve" not in segs:
            return _error(404, None, "not found")
        repo, tail = self._find_repo(repo_type, segs, "resolve")
        if repo is None:
            return _error(404, "RepoNotFound", f"Repository not found: {'/'.join(segs[:2])}")
        if request.method not in ("GET", "HEAD"):
            return _error(405, None, "method not allowed")
        if denied := self._denied(request, repo, content=True):
            return denied
        snap, rev, path_segs = self._split_revision(repo, tail)
        if snap is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        path = "/".join(path_segs)
        entry = snap.by_path.get(path)
        if entry is None:
            return entry_not_found(path, rev, snap.commit)
        headers = resolve_headers(snap.commit, entry.blob_id, entry.size)
        if entry.sha256 is not None:
            if self._xet_signals:
                route = f"/api/{repo.source.repo_type}s/{repo.source.repo_id}/xet-read-token/"
                headers["X-Xet-Hash"] = _xet_hash(entry.sha256)
                headers["X-Xet-Refresh-Route"] = route + snap.commit
                headers["Link"] = (
                    f'<{request.scheme}://{request.host}{route}{snap.commit}>; rel="xet-auth"'
                )
            if self._redirect != "none":
                # huggingface_hub reads commit, etag and size from the 3xx itself when the
                # target is another origin, so they travel on the redirect.
                location = self._cdn_location(request, repo, entry, snap.commit)
                return web.Response(status=302, headers={**headers, "Location": location})
        file_key = f"{repo.url_id}/{entry.path}"
        return await self._serve_file(request, entry, [entry.path], file_key, headers)

    # --- CDN -----------------------------------------------------------------------------

    def _sign(self, sha256: str, exp: str, repo: str, file: str, commit: str) -> str:
        msg = "\n".join((sha256, exp, repo, file, commit)).encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    def _cdn_location(
        self, request: web.BaseRequest, repo: HostedRepo, entry: FileEntry, commit: str
    ) -> str:
        assert entry.sha256 is not None
        cross = self._redirect == "cross-origin"
        # Only the same-origin target answers X-Repo-Commit: the client follows that
        # redirect and reads the metadata from the final response. A real CDN knows no
        # commits, so the cross-origin one does not pretend to.
        commit = "" if cross else commit
        exp = str(int(time.time() + self._url_ttl))
        query = {"exp": exp, "repo": repo.url_id, "file": entry.path}
        if commit:
            query["commit"] = commit
        query["sig"] = self._sign(entry.sha256, exp, repo.url_id, entry.path, commit)
        if cross:
            # Same host name the client used, other port: reachable, yet another origin.
            hostname = urlsplit(f"//{request.host}").hostname or "127.0.0.1"
            hostname = f"[{hostname}]" if ":" in hostname else hostname
            base = f"{request.scheme}://{hostname}:{self._bound_cdn_port}"
        else:
            base = f"{request.scheme}://{request.host}"
        return f"{base}/_cdn/{entry.sha256}?{urlencode(query)}"

    async def _cdn(self, request: web.BaseRequest, sha256: str) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _error(405, None, "method not allowed")
        q = request.query
        exp, repo_key, file, commit = (q.get(k, "") for k in ("exp", "repo", "file", "commit"))
        expected = self._sign(sha256, exp, repo_key, file, commit)
        if not hmac.compare_digest(expected.encode(), q.get("sig", "").encode()):
            return _error(403, None, "bad signature")
        if not exp.isdigit() or int(exp) < time.time():
            return _error(403, None, "signed URL expired")
        entry = self._blobs.get(sha256)
        if entry is None:
            return _error(404, None, "no such blob")
        # A real CDN knows no commits: only a same-origin redirect target says one.
        headers = resolve_headers(commit, sha256, entry.size) if commit else {"ETag": f'"{sha256}"'}
        paths = [file] if file else self._blob_paths.get(sha256, [])
        file_key = f"{repo_key}/{file}" if file else sha256
        return await self._serve_file(request, entry, paths, file_key, headers)

    # --- bodies --------------------------------------------------------------------------

    async def _serve_file(
        self,
        request: web.BaseRequest,
        entry: FileEntry,
        fault_paths: list[str],
        file_key: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        size = entry.size
        headers = {**headers, "Accept-Ranges": "bytes"}
        span = (
            parse_range(request.headers.get("Range"), size)
            if if_range_allows(request.headers.get("If-Range"), headers["ETag"])
            else None
        )
        if span == UNSATISFIABLE:
            return range_not_satisfiable(size, headers)
        ranged = span is not None
        start, end = cast(tuple[int, int], span) if ranged else (0, size)
        if request.method == "HEAD":
            plan = FaultPlan()
        else:
            self._stats.file_get(file_key)
            plan, start, end = self._faults.plan(
                fault_paths, size=size, start=start, end=end, ranged=ranged
            )
        if plan.status is not None:
            extra = {}
            if plan.status.retry_after is not None:
                ra = plan.status.retry_after
                extra["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            return _error(plan.status.status, None, "injected fault", extra)
        if plan.delay:
            await asyncio.sleep(plan.delay)
        partial = ranged and not plan.ignore_range
        resp = web.StreamResponse(status=206 if partial else 200, headers=headers)
        resp.content_type = "application/octet-stream"
        resp.content_length = end - start
        if partial:
            shift = 1 if plan.bad_content_range else 0
            resp.headers["Content-Range"] = f"bytes {start + shift}-{end - 1}/{size}"
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        await self._stream(request, resp, entry.disk_path, start, end, plan, file_key)
        return resp

    def _read(self, path: Path, offset: int, n: int) -> asyncio.Future[bytes]:
        assert self._reader is not None
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._reader, _read_at, path, offset, n)

    async def _stream(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        disk_path: Path,
        start: int,
        end: int,
        plan: FaultPlan,
        file_key: str,
    ) -> None:
        """Send file bytes [start, end): 1 MiB reads prefetched one ahead, written as
        they come, split only where a fault or a rate cap needs a boundary."""
        loop = asyncio.get_running_loop()
        client, url_path = _client(request), _url_path(request)
        stall_at, drop_at = plan.stall_at, plan.drop_at
        ready_at = 0.0  # rate cap: earliest time the next piece may go out
        pos = start
        pending: asyncio.Future[bytes] | None = None
        try:
            await resp.prepare(request)  # a StreamResponse sends its headers right here
            if pos < end:
                pending = self._read(disk_path, pos, min(CHUNK, end - pos))
            while pos < end:
                assert pending is not None
                chunk, pending = await pending, None
                if len(chunk) != min(CHUNK, end - pos):
                    # The file changed under us: never pad or fake the rest.
                    _close(request)
                    return
                if pos + len(chunk) < end:
                    nxt = pos + len(chunk)
                    pending = self._read(disk_path, nxt, min(CHUNK, end - nxt))
                if plan.corrupt_offsets:
                    chunk = _flip(chunk, pos, plan.corrupt_offsets)
                view = memoryview(chunk)
                if self._outage.is_down():
                    await _flushed(request)
                    _close(request)
                    return
                while view:
                    rel = pos - start
                    if stall_at == rel:
                        stall_at = None
                        await _flushed(request)
                        await asyncio.sleep(plan.stall_seconds)
                        continue
                    if drop_at == rel:
                        await _flushed(request)
                        _close(request)
                        return
                    n = len(view)
                    for stop in (stall_at, drop_at):
                        if stop is not None and rel < stop < rel + n:
                            n = stop - rel
                    cap, client_cap = self._rate.get(), self._client_rate.get()
                    if cap is not None or client_cap is not None:
                        # Pieces of about 1/20 s, so pacing stays smooth.
                        for c in (cap, client_cap):
                            if c is not None:
                                n = min(n, max(_MIN_PACED_PIECE, c // 20))
                        now = loop.time()
                        wait = max(0.0, ready_at - now) if cap is not None else 0.0
                        if client_cap is not None:
                            wait = max(wait, self._client_rate.reserve(client, n, now))
                        if wait > 0:
                            await asyncio.sleep(wait)
                            now += wait
                        if cap is not None:
                            ready_at = now + n / cap
                    await resp.write(view[:n])
                    view = view[n:]
                    pos += n
                    self._stats.body(client, url_path, n, file_key=file_key)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client hung up; the counters hold what was written
        finally:
            if pending is not None:
                _discard(pending)

    # --- /_mirror control ------------------------------------------------------------------

    async def _control(self, request: web.BaseRequest, segs: list[str]) -> web.Response:
        route = (request.method, "/".join(segs))
        try:
            if route == ("GET", "stats"):
                return web.json_response(self.stats().to_json())
            if route == ("POST", "reset"):
                self.reset_stats()
                return web.json_response({"ok": True})
            if route == ("GET", "faults"):
                return web.json_response([f.to_json() for f in self.faults()])
            if route == ("POST", "faults"):
                body = await request.json()
                if not isinstance(body, dict):
                    raise ConfigError("POST /_mirror/faults takes a JSON object of Fault fields")
                self.add_fault(Fault.from_json(body))
                return web.json_response([f.to_json() for f in self.faults()])
            if route == ("DELETE", "faults"):
                self.clear_faults()
                return web.json_response([])
            if route == ("POST", "down"):
                body = await request.json()
                value = body.get("seconds") if isinstance(body, dict) else None
                if not isinstance(value, int | float):
                    raise ConfigError('POST /_mirror/down takes {"seconds": N}')
                self.down_for(float(value))
                return web.json_response({"down_for": value})
            if route == ("POST", "rate_cap"):
                body = await request.json()
                value = body.get("bytes_per_sec") if isinstance(body, dict) else None
                if value is not None and not isinstance(value, int):
                    raise ConfigError("bytes_per_sec must be an integer or null")
                self.set_rate_cap(value)
                return web.json_response({"bytes_per_sec": value})
            if route == ("POST", "client_rate"):
                body = await request.json()
                value = body.get("bytes_per_sec") if isinstance(body, dict) else None
                burst = body.get("burst") if isinstance(body, dict) else None
                for v in (value, burst):
                    if v is not None and not isinstance(v, int):
                        raise ConfigError("bytes_per_sec and burst must be integers or null")
                self.set_client_rate(value, burst)
                return web.json_response({"bytes_per_sec": value, "burst": burst})
            if route == ("GET", "client_rate"):
                return web.json_response(
                    {
                        "bytes_per_sec": self._client_rate.get(),
                        "charged": self.client_rate_charged(),
                    }
                )
            if route == ("GET", "repos"):
                return web.json_response(self.repos_json())
        except (HfswarmError, TypeError, json.JSONDecodeError) as e:
            msg = e.one_line() if isinstance(e, HfswarmError) else str(e)
            return _error(400, None, msg)
        return _error(404, None, f"unknown control route {request.method} {'/'.join(segs)}")


def _client(request: web.BaseRequest) -> str:
    return request.remote or "unknown"


async def _flushed(request: web.BaseRequest, max_wait: float = 10.0) -> None:
    """Wait until the transport has handed every buffered byte to the kernel, so what a
    stall or a drop leaves the client with is exactly what was written before it."""
    transport = request.transport
    deadline = time.monotonic() + max_wait
    # asyncio exposes no "write buffer empty" event (drain only waits for the low-water
    # mark), so poll; this runs once per injected fault, never on the normal path.
    while (  # noqa: ASYNC110
        transport is not None
        and not transport.is_closing()
        and transport.get_write_buffer_size() > 0
        and time.monotonic() < deadline
    ):
        await asyncio.sleep(0.001)


def _hang_up(request: web.BaseRequest) -> web.StreamResponse:
    """Close the connection without an answer (the response is never sent)."""
    _close(request)
    return web.Response(status=503)


def _close(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


def _url_path(request: web.BaseRequest) -> str:
    return unquote(request.raw_path.partition("?")[0])
