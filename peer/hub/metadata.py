"""Hub metadata: which commit a revision names, and which files (with blob ids) it holds.

huggingface_hub's `HfApi` does the talking (revision lookup, paginated recursive tree,
URL-encoded revisions, token handling); it is synchronous, so calls run in a thread.
Its errors are translated here, at the edge, into `peer.errors` classes whose message
says what to do. Mirrors are tried in order: the first that answers wins.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# huggingface_hub is imported where it is used: it costs ~0.3 s at start-up, and a CLI
# that only talks to a running agent never needs it.
if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

from peer.cache.hf_cache import safe_relpath
from peer.config import HubSettings
from peer.errors import (
    ConfigError,
    EntryNotFound,
    GatedRepo,
    HfswarmError,
    MirrorDown,
    MirrorFailed,
    MirrorUnreachable,
    PeerMisbehaved,
    RepoNotFound,
    RevisionNotFound,
    UserError,
)
from peer.hub.protocol import REPO_TYPES, resolve_path
from peer.verification.hashing import SHA1_RE, SHA256_RE


@dataclass(frozen=True)
class RemoteFile:
    """One file of a revision, named by the id its blob has in the HF cache."""

    path: str
    size: int
    blob_id: str  # sha256 for LFS files, git blob sha1 otherwise
    is_lfs: bool


@dataclass(frozen=True)
class Snapshot:
    repo_type: str
    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]
    mirror: str  # the endpoint that answered
    private: bool = False
    gated: bool = False

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def resolve_url(self, mirror: str, path: str) -> str:
        return mirror + resolve_path(self.repo_type, self.repo_id, self.commit, path)


@dataclass(frozen=True)
class FileSelection:
    """Explicit FILES, or --include/--exclude globs (fnmatch, as `hf download`)."""

    files: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def check_repo_args(repo_type: str, repo_id: str) -> None:
    if repo_type not in REPO_TYPES:
        raise ConfigError(
            f"unknown repo type {repo_type!r}", hint="use --repo-type model, dataset or space"
        )
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or any(not p or p in (".", "..") for p in parts):
        raise ConfigError(
            f"{repo_id!r} is not a repo id", hint="repo ids look like org/name (or name)"
        )


def _error_code(exc: hf_errors.HfHubHTTPError) -> str | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    return headers.get("X-Error-Code") or headers.get("x-error-code")


def _status(exc: hf_errors.HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def translate_hub_error(
    exc: Exception, *, repo: str, revision: str, mirror: str, token: str | None
) -> HfswarmError:
    """Map a huggingface_hub / transport exception to one clear, actionable error."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        return GatedRepo(
            f"{repo} is gated: your token has no access" if token else f"{repo} is gated",
            hint="accept its conditions on the Hub, then pass a token with --token or HF_TOKEN"
            if not token
            else "ask for access on the repo page, or use a token that has it",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return RepoNotFound(
            f"repository {repo} not found on {mirror}",
            hint="check the name and --repo-type; if it is private, pass --token or set HF_TOKEN"
            if not token
            else "check the name and --repo-type, and that your token can read it",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return RevisionNotFound(
            f"revision {revision!r} not found in {repo}",
            hint="use a branch, tag, commit or refs/pr/N that exists",
        )
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return EntryNotFound(
            f"file not found in {repo}@{revision}: {exc}",
            hint="list the repo's files and check the path",
        )
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = _status(exc)
        if status == 429 or (status or 0) >= 500:
            return (MirrorDown if status != 429 else MirrorFailed)(
                f"{mirror} answered HTTP {status} for {repo}",
                hint="the mirror is overloaded or failing; retry later or add another --mirror",
            )
        if status == 401 or status == 403:
            return RepoNotFound(
                f"{mirror} refused access to {repo} (HTTP {status})",
                hint="pass a token with --token or HF_TOKEN",
            )
        return MirrorFailed(
            f"{mirror} answered HTTP {status} for {repo}: {exc}",
            hint="check that --mirror/HF_ENDPOINT is a Hugging Face-style endpoint",
        )
    if isinstance(exc, (KeyError, TypeError, ValueError)):
        return PeerMisbehaved(
            f"{mirror} sent metadata hfswarm cannot read: {exc!r}",
            hint="check that --mirror/HF_ENDPOINT is a Hugging Face-style endpoint",
        )
    return MirrorUnreachable(
        f"cannot reach {mirror}: {exc}",
        hint="check the network and the --mirror/HF_ENDPOINT address",
    )


def _remote_file(entry: Any) -> RemoteFile:
    path = str(entry.path)
    safe_relpath(path)
    size = int(entry.size)
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        blob_id = str(lfs.sha256)
        if not SHA256_RE.fullmatch(blob_id):
            raise PeerMisbehaved(f"mirror sent a bad sha256 for {path!r}: {blob_id!r}")
        size = int(lfs.size)
    else:
        blob_id = str(entry.blob_id)
        if not SHA1_RE.fullmatch(blob_id):
            raise PeerMisbehaved(f"mirror sent a bad git oid for {path!r}: {blob_id!r}")
    if size < 0:
        raise PeerMisbehaved(f"mirror sent a negative size for {path!r}")
    return RemoteFile(path=path, size=size, blob_id=blob_id, is_lfs=lfs is not None)


def _hub_api(endpoint: str, token: str | bool) -> HfApi:
    """huggingface_hub's client for one mirror, its user-agent probe off: on its first
    call in a process huggingface_hub asks ``huggingface.co`` for a list of AI-agent
    harnesses (a 3 s timeout), whatever mirror it is given. hfswarm talks to the
    mirrors it was told of, and nothing else; on a LAN with no route out that probe
    cost the first resolve up to 3 s (docs/benchmarks.md 8.13)."""
    from huggingface_hub import HfApi, constants

    constants.HF_HUB_DISABLE_TELEMETRY = True
    return HfApi(endpoint=endpoint, token=token, library_name="hfswarm", library_version="0.1")


def warm_up() -> None:
    """Load huggingface_hub and open its HTTP session (blocking: run it in a thread): an
    agent does it at start, so that its first resolve pays for neither (0.2-0.3 s)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    _hub_api("http://127.0.0.1", False)
    get_session()
    build_hf_headers(token=False)


def _fetch_blocking(
    api: HfApi, repo_type: str, repo_id: str, revision: str, token: str | bool
) -> tuple[str, list[RemoteFile], bool, bool]:
    info = api.repo_info(repo_id, repo_type=repo_type, revision=revision, token=token)
    commit = info.sha
    if not commit or not SHA1_RE.fullmatch(commit):
        raise PeerMisbehaved(f"mirror gave no usable commit for {repo_id}@{revision}")
    entries = api.list_repo_tree(
        repo_id, repo_type=repo_type, revision=commit, recursive=True, expand=False, token=token
    )
    files = [_remote_file(e) for e in entries if e.__class__.__name__ == "RepoFile"]
    gated = bool(getattr(info, "gated", False))
    return commit, files, bool(getattr(info, "private", False)), gated


def _filter_repo_objects() -> Any:
    from huggingface_hub.utils import filter_repo_objects

    return filter_repo_objects


def select_files(
    files: Sequence[RemoteFile], selection: FileSelection, *, repo: str, revision: str
) -> tuple[RemoteFile, ...]:
    if selection.files:
        by_path = {f.path: f for f in files}
        missing = [p for p in selection.files if p not in by_path]
        if missing:
            raise EntryNotFound(
                f"not in {repo}@{revision}: {', '.join(missing)}",
                hint="check the file names (paths are relative to the repo root)",
            )
        chosen: list[RemoteFile] = [by_path[p] for p in dict.fromkeys(selection.files)]
    else:
        chosen = list(
            _filter_repo_objects()(
                files,
                allow_patterns=list(selection.include) or None,
                ignore_patterns=list(selection.exclude) or None,
                key=lambda f: f.path,
            )
        )
    return tuple(chosen)


async def resolve_snapshot(
    settings: HubSettings,
    repo_type: str,
    repo_id: str,
    revision: str,
    selection: FileSelection = FileSelection(),
    *,
    attempts: int = 3,
) -> Snapshot:
    """Ask the mirrors, in order, for a revision's commit and file list."""
    check_repo_args(repo_type, repo_id)
    token: str | bool = settings.token or False
    last: HfswarmError | None = None
    for mirror in settings.mirrors:
        api = _hub_api(mirror, token)
        for attempt in range(attempts):
            try:
                commit, files, private, gated = await asyncio.to_thread(
                    _fetch_blocking, api, repo_type, repo_id, revision, token
                )
            except HfswarmError as exc:
                last = exc
                break
            except Exception as exc:
                err = translate_hub_error(
                    exc, repo=repo_id, revision=revision, mirror=mirror, token=settings.token
                )
                if isinstance(err, UserError):
                    raise err from exc
                last = err
                if attempt + 1 < attempts:
                    await asyncio.sleep(min(4.0, 0.3 * 2**attempt) * (0.5 + random.random()))
                continue
            chosen = select_files(files, selection, repo=repo_id, revision=revision)
            return Snapshot(
                repo_type=repo_type,
                repo_id=repo_id,
                revision=revision,
                commit=commit,
                files=chosen,
                mirror=mirror,
                private=private,
                gated=gated,
            )
    assert last is not None
    raise last


async def anonymous_flags(
    settings: HubSettings, repo_type: str, repo_id: str
) -> tuple[bool, bool] | None:
    """(private, gated) as the mirrors tell a client with NO token: what anyone may read.
    A repo they refuse to show counts as private. None: no mirror answered."""
    from huggingface_hub import errors as hf_errors

    check_repo_args(repo_type, repo_id)
    for mirror in settings.mirrors:
        api = _hub_api(mirror, False)
        try:
            info = await asyncio.to_thread(api.repo_info, repo_id, repo_type=repo_type, token=False)
        except hf_errors.GatedRepoError:
            return False, True
        except hf_errors.RepositoryNotFoundError:
            return True, False
        except Exception as exc:
            err = translate_hub_error(exc, repo=repo_id, revision="main", mirror=mirror, token=None)
            if isinstance(err, UserError):
                return True, False  # refused: not for anyone
            continue
        return bool(getattr(info, "private", False)), bool(getattr(info, "gated", False))
    return None
