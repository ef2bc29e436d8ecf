"""Repositories served by the mirror: folders on disk turned into Hub-shaped snapshots.

A folder becomes one revision of one repo. Every file gets the ids the Hub would give it:
the git blob sha1 for regular files; for LFS-style files the sha256 of the content (the
blob id the HF cache names ``blobs/`` by) and, as tree ``oid``, the git sha1 of the LFS
pointer text. Hashing is blocking work: `scan_repos` is meant to run in a thread.
"""

from __future__ import annotations

import hashlib
import os
import types
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from peer.errors import ConfigError
from peer.hub.protocol import (
    REPO_TYPES,
    URL_PREFIX,
    RepoType,
    directory_oids,
    git_oid,
    is_lfs_path,
    iso_date,
)
from peer.verification.hashing import BlobHasher, HashKind

# The marker `generate_model_repo` leaves behind is bookkeeping, not repo content.
GENERATE_MARKER = ".hfswarm-generated.json"
_READ_SIZE = 1024 * 1024


@dataclass(frozen=True, eq=False)
class RepoSource:
    """One repo to serve. ``folder`` is revision ``main``; ``revisions`` adds more.

    Keys of ``revisions`` are branch/tag names or ``refs/pr/N``; each maps to its own
    folder. Paths may be given as ``str``; they are stored as `Path`.
    """

    repo_type: RepoType
    repo_id: str
    folder: Path
    private: bool = False
    gated: bool = False
    revisions: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.repo_type not in REPO_TYPES:
            raise ConfigError(
                f"unknown repo type {self.repo_type!r}",
                hint="use one of: model, dataset, space",
            )
        parts = self.repo_id.split("/")
        if not 1 <= len(parts) <= 2 or not all(parts) or any(p in (".", "..") for p in parts):
            raise ConfigError(
                f"bad repo id {self.repo_id!r}", hint="use the form org/name, e.g. acme/tiny-model"
            )
        if "main" in self.revisions:
            raise ConfigError(
                f"{self.repo_id}: revision 'main' is the repo folder itself",
                hint="pass the main folder as `folder`, and only other revisions in `revisions`",
            )
        # Frozen, so normalise through object.__setattr__ (str paths are accepted for ease).
        object.__setattr__(self, "folder", Path(self.folder))
        object.__setattr__(
            self,
            "revisions",
            types.MappingProxyType({str(k): Path(v) for k, v in self.revisions.items()}),
        )


@dataclass(frozen=True)
class FileEntry:
    """One file of one revision (a `peer.hub.protocol.HubFile`), and where it is on disk."""

    path: str
    size: int
    disk_path: Path
    # The name huggingface_hub gives the blob in its cache (and the resolve ETag):
    # sha256 of the content for LFS files, its git blob sha1 otherwise.
    blob_id: str
    is_lfs: bool

    @property
    def sha256(self) -> str | None:
        """Set for LFS files only."""
        return self.blob_id if self.is_lfs else None


@dataclass(frozen=True)
class Snapshot:
    """The content of one commit: files sorted by path, plus the implied directories."""

    commit: str
    files: tuple[FileEntry, ...]
    by_path: Mapping[str, FileEntry]
    directories: Mapping[str, str]  # directory path -> deterministic tree oid
    last_modified: str  # ISO-8601 like the Hub's `lastModified`


@dataclass(frozen=True)
class HostedRepo:
    source: RepoSource
    by_name: Mapping[str, Snapshot]  # "main", branch/tag names, "refs/pr/N"
    by_commit: Mapping[str, Snapshot]

    @property
    def key(self) -> tuple[RepoType, str]:
        return (self.source.repo_type, self.source.repo_id)

    @property
    def url_id(self) -> str:
        """``datasets/org/name`` style: the repo's resolve-URL prefix, used as a stats key."""
        return URL_PREFIX[self.source.repo_type] + self.source.repo_id

    def lookup(self, revision: str) -> Snapshot | None:
        return self.by_name.get(revision) or self.by_commit.get(revision)


def _hash_file(disk_path: Path, size: int, lfs: bool) -> str:
    """sha256 of the content for LFS files, git blob sha1 otherwise (one pass either way)."""
    h = BlobHasher(HashKind.SHA256 if lfs else HashKind.GIT_SHA1, size)
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)
    seen = 0
    with open(disk_path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            seen += n
    if seen != size:
        raise ConfigError(f"{disk_path} changed size while it was being hashed")
    return h.hexdigest()


def _list_files(folder: Path) -> list[tuple[str, Path, os.stat_result]]:
    """Relative POSIX paths of the files under `folder`, following symlinks (so an HF
    cache snapshot folder can be served as-is). Skipped: `.git`, the top-level `.cache`
    (huggingface_hub's local_dir bookkeeping) and our generate marker."""
    if not folder.is_dir():
        raise ConfigError(
            f"repo folder {folder} does not exist or is not a folder",
            hint="create it, or generate one with `python -m peer.mirror_server generate DIR`",
        )
    found: list[tuple[str, Path, os.stat_result]] = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        rel_root = Path(root).relative_to(folder)
        dirs[:] = sorted(
            d for d in dirs if d != ".git" and not (rel_root == Path(".") and d == ".cache")
        )
        for name in names:
            if rel_root == Path(".") and name == GENERATE_MARKER:
                continue
            disk = Path(root) / name
            st = disk.stat()
            found.append(((rel_root / name).as_posix(), disk, st))
    found.sort(key=lambda t: t[0])
    return found


def _commit_id(source: RepoSource, files: Iterable[FileEntry]) -> str:
    """Deterministic stand-in for a git commit id: same content, same repo -> same id."""
    h = hashlib.sha1(f"hfswarm-mirror\0{source.repo_type}\0{source.repo_id}\0".encode())
    for f in files:
        h.update(f"{f.path}\0{f.blob_id}\n".encode())
    return h.hexdigest()


_HashKey = tuple[str, int, int, bool]


def scan_repos(
    sources: Iterable[RepoSource], *, workers: int = 4
) -> dict[tuple[str, str], HostedRepo]:
    """Walk and hash every revision folder of every repo. Blocking: run it in a thread.

    Files are hashed in parallel (hashlib drops the GIL on large updates); the same disk
    file seen twice (e.g. two revisions sharing a folder) is hashed once.
    """
    sources = list(sources)
    seen: set[tuple[str, str]] = set()
    for s in sources:
        if (s.repo_type, s.repo_id) in seen:
            raise ConfigError(f"repo {s.repo_type}:{s.repo_id} is listed twice")
        seen.add((s.repo_type, s.repo_id))

    listings: dict[tuple[int, str], list[tuple[str, Path, os.stat_result]]] = {}
    jobs: dict[_HashKey, tuple[Path, int, bool]] = {}
    for i, s in enumerate(sources):
        for name, folder in [("main", s.folder), *s.revisions.items()]:
            listing = _list_files(folder)
            listings[(i, name)] = listing
            for rel, disk, st in listing:
                lfs = is_lfs_path(rel, st.st_size)
                key = (str(disk.resolve()), st.st_size, st.st_mtime_ns, lfs)
                jobs.setdefault(key, (disk, st.st_size, lfs))

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mirror-hash") as pool:
        futures = {k: pool.submit(_hash_file, *args) for k, args in jobs.items()}
        digests = {k: f.result() for k, f in futures.items()}

    hosted: dict[tuple[str, str], HostedRepo] = {}
    for i, s in enumerate(sources):
        by_name: dict[str, Snapshot] = {}
        for name, _folder in [("main", s.folder), *s.revisions.items()]:
            entries: list[FileEntry] = []
            newest = 0.0
            for rel, disk, st in listings[(i, name)]:
                lfs = is_lfs_path(rel, st.st_size)
                digest = digests[(str(disk.resolve()), st.st_size, st.st_mtime_ns, lfs)]
                newest = max(newest, st.st_mtime)
                entries.append(FileEntry(rel, st.st_size, disk, digest, lfs))
            files = tuple(entries)
            by_name[name] = Snapshot(
                commit=_commit_id(s, files),
                files=files,
                by_path=types.MappingProxyType({f.path: f for f in files}),
                # Folder ids hash the git tree oids (the LFS pointer's for LFS files).
                directories=types.MappingProxyType(
                    directory_oids((f.path, git_oid(f)) for f in files)
                ),
                last_modified=iso_date(newest),
            )
        hosted[(s.repo_type, s.repo_id)] = HostedRepo(
            source=s,
            by_name=types.MappingProxyType(by_name),
            by_commit=types.MappingProxyType({snap.commit: snap for snap in by_name.values()}),
        )
    return hosted


def parse_repo_type(value: str) -> RepoType:
    if value not in REPO_TYPES:
        raise ConfigError(f"unknown repo type {value!r}", hint="use one of: model, dataset, space")
    return value
