"""The Hub protocol, the part of it hfswarm speaks on both sides: URL shapes, which files
are LFS and the ids the Hub gives them, the JSON of revision/tree/paths-info answers,
``Range``, and what a mirror's status and ``X-Error-Code`` mean.

The agent's Hub API (`peer.serving.hub_api`, HF_ENDPOINT mode), the project's own mirror
(`peer.mirror_server`) and the mirror fetchers all take it from here, so an answer the
agent renders from a revision manifest is the answer the mirror renders from a folder.
Pure: no sockets (`peer.hub.answers` builds the aiohttp answers).
"""

from __future__ import annotations

import hashlib
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Final, Literal, Protocol
from urllib.parse import quote, urlsplit

from peer.errors import (
    EntryNotFound,
    GatedRepo,
    HfswarmError,
    MirrorFailed,
    RepoNotFound,
    RevisionNotFound,
)
from peer.verification.hashing import SHA1_RE, SHA256_RE, BlobHasher, HashKind

# -- repos and URLs ------------------------------------------------------------------

RepoType = Literal["model", "dataset", "space"]
REPO_TYPES: tuple[RepoType, ...] = ("model", "dataset", "space")
# Resolve URLs carry the type as a path prefix (``/datasets/org/x/resolve/...``)...
URL_PREFIX: Mapping[str, str] = types.MappingProxyType(
    {"model": "", "dataset": "datasets/", "space": "spaces/"}
)
URL_TYPES: Mapping[str, RepoType] = types.MappingProxyType(
    {"datasets": "dataset", "spaces": "space"}
)
# ... the API the plural (``/api/models/org/x/revision/main``).
API_TYPES: Mapping[str, RepoType] = types.MappingProxyType({f"{t}s": t for t in REPO_TYPES})

# A mirror answering these is failing, not refusing: retry, or ask the next mirror.
RETRYABLE: frozenset[int] = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECTS: frozenset[int] = frozenset({301, 302, 303, 307, 308})
# What the agent answers when asking again cannot help (a mirror's answer it cannot
# verify, data that kept failing verification): 424 Failed Dependency, which
# huggingface_hub does not retry, so its user hears the reason at once.
UNFIXABLE: Final = 424


def resolve_path(repo_type: str, repo_id: str, revision: str, path: str) -> str:
    """``/{prefix}{repo_id}/resolve/{revision}/{path}``, encoded as huggingface_hub does
    (``refs/pr/1`` becomes one segment, ``refs%2Fpr%2F1``)."""
    return (
        f"/{URL_PREFIX[repo_type]}{quote(repo_id, safe='/')}/resolve/"
        f"{quote(revision, safe='')}/{quote(path, safe='/')}"
    )


def resolve_headers(commit: str, blob_id: str, size: int) -> dict[str, str]:
    """What a resolve answer says of the file: the commit, and the blob id as ETag (an
    LFS file's also as X-Linked-Etag, with its size: they survive a redirect to a CDN)."""
    headers = {"X-Repo-Commit": commit, "ETag": f'"{blob_id}"'}
    if is_lfs_blob_id(blob_id):
        headers["X-Linked-Etag"] = f'"{blob_id}"'
        headers["X-Linked-Size"] = str(size)
    return headers


def iso_date(seconds: float) -> str:
    """A time as the Hub writes ``lastModified``."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def origin(url: str) -> tuple[str, str]:
    """(scheme, host:port): Authorization never leaves the origin it was meant for."""
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, else None."""
    scheme, _, value = (authorization or "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


# -- Range ---------------------------------------------------------------------------

UNSATISFIABLE: Final = "unsatisfiable"

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def parse_range(header: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """Byte span ``[start, end)`` asked for by `header`, for a body of `size` bytes.

    ``None`` means "serve the whole body with 200": no header, a syntax we do not
    support (multiple ranges) or an invalid one - RFC 9110 lets a server ignore those.
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header)
    if m is None:
        return None
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:  # suffix form: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return (max(0, size - n), size)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    end = min(int(last) + 1, size) if last else size
    return (start, end)


def if_range_allows(if_range: str | None, etag: str) -> bool:
    """Whether a Range may be honoured given the request's ``If-Range`` and the `etag`
    the route sends (RFC 9110 13.1.5): no If-Range, or one that is exactly our strong
    ETag. A weak tag, another tag or a date (we send no Last-Modified) means the
    client's copy may be of other bytes: the whole body, with 200."""
    if if_range is None:
        return True
    value = if_range.strip()
    return not value.startswith("W/") and value == etag


# -- LFS and blob ids ----------------------------------------------------------------

# What the project's mirror and `hfswarm publish` store as LFS: what a default Hub
# .gitattributes sends to LFS (weights and data suffixes), and anything of 1 MiB or more.
LFS_THRESHOLD = 1024 * 1024
LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".parquet"}
    | {".arrow", ".npz", ".ckpt", ".zip", ".tar", ".gz"}
)


def is_lfs_path(path: str, size: int) -> bool:
    return size >= LFS_THRESHOLD or PurePosixPath(path).suffix.lower() in LFS_SUFFIXES


def is_lfs_blob_id(blob_id: str) -> bool:
    """An LFS file's blob is named by its sha256 (64 hex), any other by a git sha1 (40)."""
    return len(blob_id) == 64


def _etag_value(value: str | None) -> str:
    value = (value or "").strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def content_id(linked_etag: str | None, etag: str | None) -> str | None:
    """The blob id a resolve answer names, in every form mirrors send it: the Hub's
    ``X-Linked-Etag`` (an LFS file's sha256); else the ETag, quoted or weak, as the
    sha256 of an LFS file (olah) or the git sha1 of any other. None: no usable id."""
    linked = _etag_value(linked_etag)
    if linked:
        return linked if SHA256_RE.fullmatch(linked) else None
    plain = _etag_value(etag)
    return plain if SHA256_RE.fullmatch(plain) or SHA1_RE.fullmatch(plain) else None


def api_path(repo_type: str, repo_id: str, action: str, revision: str) -> str:
    """``/api/{type}s/{repo_id}/{action}/{revision}``, encoded as huggingface_hub does."""
    return f"/api/{repo_type}s/{quote(repo_id, safe='/')}/{action}/{quote(revision, safe='')}"


def listed_id(answer: Any, path: str) -> tuple[str, int] | None:
    """The blob id and size a paths-info (or tree) answer lists for the file `path`:
    ``lfs.oid`` (the sha256) for an LFS file, else ``oid`` (the git sha1). None: not
    listed, or listed without a usable id."""
    entry = next(
        (
            e
            for e in (answer if isinstance(answer, list) else [])
            if isinstance(e, dict) and e.get("type") == "file" and e.get("path") == path
        ),
        None,
    )
    if entry is None:
        return None
    lfs = entry.get("lfs")
    oid, pattern = (
        (lfs.get("oid"), SHA256_RE) if isinstance(lfs, dict) else (entry.get("oid"), SHA1_RE)
    )
    size = entry.get("size")
    if not isinstance(oid, str) or not pattern.fullmatch(oid):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    return oid, size


def git_blob_sha1(data: bytes) -> str:
    h = BlobHasher(HashKind.GIT_SHA1, len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores for an LFS file; its git sha1 is the tree ``oid``."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


# -- JSON answers ----------------------------------------------------------------------


class HubFile(Protocol):
    """A file of a revision as the renderers need it (`wire.RevisionFile`, the mirror's
    `FileEntry`): its path, size and blob id (sha256 for LFS files, else git sha1)."""

    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def blob_id(self) -> str: ...


def git_oid(f: HubFile) -> str:
    """The file's id in the git tree: its blob id, or the git sha1 of its LFS pointer."""
    if is_lfs_blob_id(f.blob_id):
        return git_blob_sha1(lfs_pointer(f.blob_id, f.size))
    return f.blob_id


def file_entry(f: HubFile) -> dict[str, Any]:
    """A file as tree and paths-info list it: ``oid`` is the git blob id (of the LFS
    pointer for LFS files), ``lfs.oid`` the sha256 the HF cache names the blob by."""
    if is_lfs_blob_id(f.blob_id):
        pointer = lfs_pointer(f.blob_id, f.size)
        return {
            "type": "file",
            "oid": git_blob_sha1(pointer),
            "size": f.size,
            "path": f.path,
            "lfs": {"oid": f.blob_id, "size": f.size, "pointerSize": len(pointer)},
        }
    return {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}


def directory_entry(path: str, oid: str) -> dict[str, Any]:
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def directory_oids(files: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Every folder of a revision given as (file path, file id) pairs, sorted, each with
    a deterministic stand-in for its git tree id (a hash of what is under it)."""
    kids: dict[str, list[str]] = {}
    for path, oid in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            kids.setdefault("/".join(parts[:i]), []).append(f"{path}\0{oid}")
    return {
        d: hashlib.sha1("\n".join(sorted(k)).encode(), usedforsecurity=False).hexdigest()
        for d, k in sorted(kids.items())
    }


def tree_entries(
    files: Iterable[HubFile], directories: Mapping[str, str], subpath: str, *, recursive: bool
) -> list[dict[str, Any]] | None:
    """The entries under `subpath` (all of them, or its direct children), sorted by path;
    None: there is no such folder. Pagination is the caller's."""
    if subpath and subpath not in directories:
        return None
    prefix = f"{subpath}/" if subpath else ""

    def wanted(path: str) -> bool:
        return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

    entries = [file_entry(f) for f in files if wanted(f.path)]
    entries += [directory_entry(d, oid) for d, oid in directories.items() if wanted(d)]
    entries.sort(key=lambda e: str(e["path"]))
    return entries


def with_last_commit(
    entries: Sequence[dict[str, Any]], commit: str, title: str, date: str
) -> list[dict[str, Any]]:
    """Tree entries as ``expand=true`` lists them."""
    last = {"id": commit, "title": title, "date": date}
    return [{**e, "lastCommit": last} for e in entries]


def paths_info(
    by_path: Mapping[str, HubFile], directories: Mapping[str, str], paths: Iterable[str]
) -> list[dict[str, Any]]:
    """The paths-info answer: an entry for each asked path that exists, in asked order."""
    out: list[dict[str, Any]] = []
    for p in paths:
        p = p.strip("/")
        if p in by_path:
            out.append(file_entry(by_path[p]))
        elif p in directories:
            out.append(directory_entry(p, directories[p]))
    return out


def repo_info(
    repo_type: str,
    repo_id: str,
    *,
    id_seed: str,
    commit: str,
    files: Sequence[HubFile],
    last_modified: str,
    private: bool,
    gated: bool | str,
    blobs: bool,
    xet_enabled: bool = False,
) -> dict[str, Any]:
    """The revision answer (``/api/{type}s/{repo}/revision/{rev}``): what huggingface_hub's
    `repo_info` reads; ``blobs``: siblings carry sizes and ids (``?blobs=true``)."""
    siblings: list[dict[str, Any]] = []
    for f in files:
        sib: dict[str, Any] = {"rfilename": f.path}
        if blobs:
            entry = file_entry(f)
            sib.update(size=f.size, blobId=entry["oid"])
            if "lfs" in entry:
                sib["lfs"] = {
                    "sha256": f.blob_id,
                    "size": f.size,
                    "pointerSize": entry["lfs"]["pointerSize"],
                }
        siblings.append(sib)
    info: dict[str, Any] = {
        "_id": hashlib.sha1(id_seed.encode(), usedforsecurity=False).hexdigest()[:24],
        "id": repo_id,
        "author": repo_id.split("/")[0] if "/" in repo_id else None,
        "sha": commit,
        "lastModified": last_modified,
        "createdAt": last_modified,
        "private": private,
        "gated": gated,
        "disabled": False,
        "tags": [],
        "downloads": 0,
        "likes": 0,
        "siblings": siblings,
        "usedStorage": sum(f.size for f in files),
    }
    if xet_enabled:
        info["xetEnabled"] = True
    if repo_type == "model":
        info["modelId"] = repo_id
    elif repo_type == "space":
        info["sdk"] = "static"
    return info


# -- errors --------------------------------------------------------------------------


def error_from_status(status: int, headers: Mapping[str, str] | None, what: str) -> HfswarmError:
    """A mirror's refusal (status, ``X-Error-Code``, ``X-Error-Message``) as our error,
    the way huggingface_hub reads it; `what` names the file asked for."""
    h: Mapping[str, str] = headers if headers is not None else {}
    code = h.get("X-Error-Code")
    msg = h.get("X-Error-Message") or f"HTTP {status}"
    if code == "GatedRepo":
        return GatedRepo(
            f"{what}: {msg}",
            hint="request access on the repo page and pass a "
            "token that has it (--token or HF_TOKEN)",
        )
    if code == "RepoNotFound" or status == 401:
        return RepoNotFound(
            f"{what}: {msg}",
            hint="check the repo id; for a private repo pass --token or set HF_TOKEN",
        )
    if code == "RevisionNotFound":
        return RevisionNotFound(f"{what}: {msg}", hint="check --revision")
    if code == "EntryNotFound" or status == 404:
        return EntryNotFound(
            f"{what}: {msg}", hint="the mirror lacks this file; try another --mirror"
        )
    if status == 403:
        return RepoNotFound(f"{what}: access denied ({msg})", hint="use a token with access")
    return MirrorFailed(f"{what}: HTTP {status} ({msg})", hint="retry later or add --mirror")
