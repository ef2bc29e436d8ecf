"""What a job of the agent is asked for, and what it tells while it runs (the messages
between the CLI, the local API and the agent's jobs; no I/O here).

Requests: `DownloadRequest` (`hfswarm download`, the local API's ``POST /v1/downloads``,
the mirror-only path of `peer.download`) and `PublishRequest` (``POST /v1/publish``).
Events of a download, in order: `Started`, any number of `Progress`, then `Done` or
`Error`. Each is frozen and has its JSON form here; the local API streams that form as
NDJSON, one event a line (older CLIs read it: the fields do not change).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from peer.config import DownloadOptions, HubSettings
from peer.errors import ConfigError, HfswarmError, PeerMisbehaved
from peer.hub.metadata import FileSelection

# A download's own bounds (`DownloadRequest` fields, `DownloadOptions` fields) by flag.
BOUND_FLAGS = {"connections": "--connections", "max_files": "--max-workers"}


@dataclass(frozen=True)
class DownloadRequest:
    """One download; the token is the user's, used for this download only.

    `agent_token` never comes from JSON: the local API sets it when the caller is the
    agent's own user (or root), who may have the agent use its own token. `local_dir`
    never goes to the agent either: it does not write a caller's folder, the CLI copies
    the snapshot there itself (the mirror-only path writes it directly)."""

    repo_id: str
    repo_type: str = "model"
    revision: str = "main"
    selection: FileSelection = field(default_factory=FileSelection)
    token: str | None = None
    agent_token: bool = False
    local_dir: Path | None = None
    # `--connections` / `--max-workers` when given: this download's own bounds, which
    # may lower the agent's own but never raise them (`bounded`).
    connections: int | None = None
    max_files: int | None = None

    @classmethod
    def from_json(cls, d: Any) -> DownloadRequest:
        """A request from the local API's body: hostile input, `agent_token` left False."""
        if not isinstance(d, dict) or not isinstance(d.get("repo_id"), str):
            raise ConfigError("download request needs a repo_id")

        def strs(key: str) -> tuple[str, ...]:
            value = d.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"download request: {key} must be a list of strings")
            return tuple(value)

        if d.get("local_dir"):
            raise ConfigError(
                "the agent does not write into a local dir: it downloads into its cache",
                hint="update hfswarm: `hfswarm download --local-dir` copies the files itself",
            )

        def bound(key: str) -> int | None:
            value = d.get(key)
            if value is None:
                return None
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"download request: {key} must be a positive integer")
            return value

        return cls(
            repo_id=d["repo_id"],
            repo_type=str(d.get("repo_type") or "model"),
            revision=str(d.get("revision") or "main"),
            selection=FileSelection(strs("files"), strs("include"), strs("exclude")),
            token=d.get("token") if isinstance(d.get("token"), str) and d["token"] else None,
            connections=bound("connections"),
            max_files=bound("max_files"),
        )

    def to_json(self) -> dict[str, Any]:
        """The body for the agent: neither `agent_token` nor `local_dir` (see above)."""
        return {
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "files": list(self.selection.files),
            "include": list(self.selection.include),
            "exclude": list(self.selection.exclude),
            "token": self.token,
        } | {k: v for k, v in self.bounds().items() if v is not None}

    def bounds(self) -> dict[str, int | None]:
        return {"connections": self.connections, "max_files": self.max_files}

    def bounded(self, options: DownloadOptions) -> DownloadOptions:
        """`options` lowered to this request's own bounds. Asking for more than
        `options` allow is refused: a caller does not make the agent open more
        connections than its operator set, and a bound is never silently ignored."""
        for key, asked in self.bounds().items():
            allowed, flag = getattr(options, key), BOUND_FLAGS[key]
            if asked is not None and asked > allowed:
                raise ConfigError(
                    f"this download may use at most {flag} {allowed}; {flag} {asked} asks for more",
                    hint=f"pass {flag} {allowed} or less, or --no-agent to download "
                    "in this process from the mirror",
                )
        return replace(
            options,
            connections=self.connections or options.connections,
            max_files=self.max_files or options.max_files,
        )


@dataclass(frozen=True)
class Setup:
    """What every download through an agent uses, whatever its caller's flags say; in
    ``/v1/status``, so that the CLI refuses flags the agent would not honour."""

    mirrors: tuple[str, ...]  # without credentials
    cache_dir: Path
    # The most `--connections` / `--max-workers` a download may ask for (its own,
    # lower bounds are honoured); None from an agent that does not honour them.
    connections: int | None = None
    max_files: int | None = None

    @classmethod
    def of(cls, hub: HubSettings, options: DownloadOptions) -> Setup:
        mirrors = tuple(without_userinfo(m) for m in hub.mirrors)
        return cls(mirrors, hub.cache_dir, options.connections, options.max_files)

    def to_json(self) -> dict[str, Any]:
        return {
            "mirrors": list(self.mirrors),
            "cache_dir": str(self.cache_dir),
            "connections": self.connections,
            "max_files": self.max_files,
        }

    @classmethod
    def from_status(cls, d: dict[str, Any]) -> Setup | None:
        """None from an agent that does not say (older than this CLI)."""
        mirrors, cache_dir = d.get("mirrors"), d.get("cache_dir")
        if not isinstance(mirrors, list) or not isinstance(cache_dir, str):
            return None
        bounds = [d.get(k) for k in ("connections", "max_files")]
        connections, max_files = (b if isinstance(b, int) else None for b in bounds)
        return cls(tuple(str(m) for m in mirrors), Path(cache_dir), connections, max_files)

    def differs(self, hub: HubSettings, *, mirrors: bool, cache_dir: bool) -> list[str]:
        """Which of the caller's explicit choices this agent would not honour."""
        wrong = []
        if mirrors and tuple(without_userinfo(m) for m in hub.mirrors) != self.mirrors:
            wrong.append("--mirror")
        if cache_dir and _resolved(hub.cache_dir) != _resolved(self.cache_dir):
            wrong.append("--cache-dir")
        return wrong

    def exceeded(self, request: DownloadRequest) -> list[str]:
        """The request's bounds this agent would not honour: above its own, or any bound
        at all for an agent that does not take them (it would ignore them)."""
        most = {"connections": self.connections, "max_files": self.max_files}
        wrong = []
        for key, asked in request.bounds().items():
            allowed = most[key]
            if asked is not None and (allowed is None or asked > allowed):
                wrong.append(f"{BOUND_FLAGS[key]} {asked}")
        return wrong


def without_userinfo(url: str) -> str:
    """The URL without a user:password part (to show it)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _resolved(path: Path) -> Path:
    return path.expanduser().resolve()


@dataclass(frozen=True)
class PublishRequest:
    """What `hfswarm publish` asks for: a folder (absolute: the agent reads it) to share
    as ``local/NAME``."""

    path: Path
    repo_id: str
    repo_type: str = "model"

    @classmethod
    def from_json(cls, d: Any) -> PublishRequest:
        if not isinstance(d, dict) or not all(
            isinstance(d.get(k), str) for k in ("path", "repo_id")
        ):
            raise ConfigError("publish request needs a path and a repo_id")
        path = Path(d["path"])
        if not path.is_absolute():
            raise ConfigError(f"publish: {path} is not an absolute path")
        return cls(path=path, repo_id=d["repo_id"], repo_type=str(d.get("repo_type") or "model"))

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "repo_id": self.repo_id, "repo_type": self.repo_type}


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    """Where a download's bytes came from (summed over its blobs)."""

    from_peers: int = 0
    from_mirror: int = 0
    reused: int = 0  # already in the cache, or hashed and linked from another repo
    hash_failures: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "from_peers": self.from_peers,
            "from_mirror": self.from_mirror,
            "reused": self.reused,
            "hash_failures": self.hash_failures,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Counters:
        return cls(*(_int(d, k) for k in ("from_peers", "from_mirror", "reused", "hash_failures")))


@dataclass(frozen=True)
class Started:
    """The job knows its size: a download its commit and files, a publish its files."""

    files: int
    total: int
    commit: str | None = None

    def to_json(self) -> dict[str, Any]:
        head: dict[str, Any] = {"event": "started"}
        if self.commit is not None:
            head["commit"] = self.commit
        return {**head, "files": self.files, "total": self.total}


@dataclass(frozen=True)
class Progress:
    """Bytes done so far. `counters` for a download (not a publish); `files_done` for a
    download run in this process (never on the wire)."""

    done: int
    total: int
    counters: Counters | None = None
    files_done: int | None = None

    def to_json(self) -> dict[str, Any]:
        if self.counters is None:
            return {"event": "progress", "done": self.done, "total": self.total}
        return {"event": "progress", "total": self.total, "done": self.done} | (
            self.counters.to_json()
        )

    @property
    def fetched(self) -> int:
        """Bytes that crossed the network (all of them for a publish's copy)."""
        c = self.counters
        return self.done if c is None else c.from_peers + c.from_mirror


@dataclass(frozen=True)
class Done:
    """A finished download: the snapshot folder (or the local dir the mirror-only path
    filled), and the files as (path, blob id, size), from which the CLI fills
    ``--local-dir`` after an agent's download."""

    path: Path
    commit: str
    files: int
    total: int
    done: int  # below `total` when two paths hold the same blob (fetched once)
    counters: Counters
    entries: tuple[tuple[str, str, int], ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return (
            {"event": "done", "total": self.total, "done": self.done}
            | self.counters.to_json()
            | {
                "path": str(self.path),
                "commit": self.commit,
                "files": self.files,
                "entries": [list(e) for e in self.entries],
                "seconds": self.seconds,
            }
        )

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Done:
        entries = d.get("entries")
        if not isinstance(entries, list):
            raise PeerMisbehaved("the agent's result lists no files", hint="see the agent's log")
        for entry in entries:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and isinstance(entry[1], str)
                and isinstance(entry[2], int)
            ):
                raise PeerMisbehaved(
                    f"the agent listed a malformed file {entry!r}", hint="see the agent's log"
                )
        seconds = d.get("seconds")
        return cls(
            path=Path(_str(d, "path")),
            commit=_str(d, "commit"),
            files=_int(d, "files"),
            total=_int(d, "total"),
            done=_int(d, "done"),
            counters=Counters.from_json(d),
            entries=tuple((e[0], e[1], e[2]) for e in entries),
            seconds=float(seconds) if isinstance(seconds, int | float) else 0.0,
        )


@dataclass(frozen=True)
class Error:
    """A job that failed, as the user should see it (`exit_code` as the CLI's)."""

    kind: str
    exit_code: int
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> Error:
        if isinstance(exc, HfswarmError):
            return cls(type(exc).__name__, exc.exit_code, exc.one_line())
        return cls(
            "InternalError", 1, f"internal error in the agent: {exc!r} (a bug; see the agent's log)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "error",
            "kind": self.kind,
            "exit_code": self.exit_code,
            "message": self.message,
        }


Event = Started | Progress | Done | Error
# How a job tells its events (the local API streams them, the in-process CLI draws them).
Emit = Callable[[Event], Awaitable[None]]


def job_event(d: Any) -> Event | None:
    """An NDJSON line of a download or publish, from the agent (its own checks: it may be an older
    or newer agent). None for an event this CLI does not know (a newer agent's)."""
    if not isinstance(d, dict):
        raise PeerMisbehaved(f"the agent sent {d!r}, not an event", hint="see the agent's log")
    match d.get("event"):
        case "started":
            commit = d.get("commit")
            return Started(
                _int(d, "files"),
                _int(d, "total"),
                commit=commit if isinstance(commit, str) else None,
            )
        case "progress":
            counters = Counters.from_json(d) if "from_peers" in d else None  # a publish: none
            return Progress(_int(d, "done"), _int(d, "total"), counters=counters)
        case "done":
            return Done.from_json(d)
        case "error":
            code = d.get("exit_code")
            return Error(
                str(d.get("kind")), code if isinstance(code, int) else 1, str(d.get("message"))
            )
    return None


def _int(d: dict[str, Any], key: str) -> int:
    value = d.get(key, 0)
    if not isinstance(value, int):
        raise PeerMisbehaved(f"the agent sent {key}={value!r}", hint="see the agent's log")
    return value


def _str(d: dict[str, Any], key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise PeerMisbehaved(f"the agent sent {key}={value!r}", hint="see the agent's log")
    return value


async def iter_ndjson(stream: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The local API's job events (one JSON object a line), as the CLI reads them: kept
    here, not in the server, so that the CLI does not import the agent to follow one."""
    async for line in stream:
        line = line.strip()
        if line:
            yield json.loads(line)
