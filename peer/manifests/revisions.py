"""Revision manifests: which commit and which files (path, blob id, size) a revision of
a repo names, as agents know it. They let an agent resolve a revision without the mirror:
``local/*`` repos published on the LAN (never on any mirror), and any public repo while
the mirror is down.

Where a manifest comes from:
- a publish (`hfswarm publish`): repo ``local/NAME``, revision ``main``, and a commit id
  derived from the files (`content_commit`), so every agent can recompute it;
- the mirror: an agent that downloaded a revision of a PUBLIC repo (neither private nor
  gated, as the mirror said) records what the mirror said, with the time it did;
- a peer: asked over the peer API (``POST /v1/revisions``) and checked here, in
  `accept_revision_manifest`, before anything uses it.

Which one is newer (`is_newer`): the larger ``(published_at, made_by)``. ``published_at``
is the maker's clock in ms: the time of the publish, or the time the mirror answered.
A publish sets it past the newest manifest it knows for that revision, so ``main`` moves
to the new publish even when the publisher's clock is behind; ``made_by`` (agent id)
only breaks exact ties, the same way on every agent. Manifests dated more than
`MAX_CLOCK_SKEW_MS` ahead of our clock are refused (one could pin a revision forever).

Trust: a manifest names blobs by their ids, and every blob is verified against its id
before it enters ``blobs/``, so a lying peer cannot put unverified bytes in the cache.
What it can do without signatures is name other (verified) blobs: for ``local/*`` repos
the commit must match the files, and for mirror repos a peer's manifest is used only
when the mirror cannot answer (network failure or 5xx): the mirror's answer always wins.
Cluster signatures will be required in `accept_revision_manifest`, the one place every
received manifest passes through.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from peer import wire
from peer.errors import PeerMisbehaved
from peer.hub.metadata import FileSelection, RemoteFile, Snapshot, select_files
from peer.verification.hashing import SHA1_RE

LOCAL_NAMESPACE = "local"
MAX_CLOCK_SKEW_MS = 60 * 60 * 1000
KEEP_PER_REVISION = 32  # manifests kept per revision name (older commits stay reachable)
EMPTY_BLOB_IDS = frozenset(
    {
        "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",  # git blob sha1 of b""
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # sha256 of b""
    }
)


class BadRevisionManifest(PeerMisbehaved):
    """A peer's revision manifest that does not hold up; it is ignored."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="the manifest was ignored; other peers are asked too")


def is_local_repo(repo_id: str) -> bool:
    """``local/NAME``: a repo published on the LAN, never looked up on a mirror."""
    return repo_id.startswith(f"{LOCAL_NAMESPACE}/")


def content_commit(files: Iterable[wire.RevisionFile]) -> str:
    """The commit id of a published revision: sha1 over its files sorted by path,
    ``b"hfswarm-revision-v1\\n"`` then one ``path NUL blob_id NUL size LF`` line each
    (UTF-8). Same files, same commit, on every agent; any change of a path, a content
    or a size gives another commit."""
    h = hashlib.sha1(b"hfswarm-revision-v1\n", usedforsecurity=False)
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.blob_id}\0{f.size}\n".encode())
    return h.hexdigest()


def newness(m: wire.RevisionManifest) -> tuple[int, str]:
    return (m.published_at, m.made_by)


def is_newer(a: wire.RevisionManifest, b: wire.RevisionManifest) -> bool:
    """Is `a` newer than `b` (for the same revision name)?"""
    return newness(a) > newness(b)


def accept_revision_manifest(
    m: wire.RevisionManifest,
    *,
    repo_type: str,
    repo_id: str,
    revision: str,
    now_ms: int,
    verify_signature: Callable[[wire.RevisionManifest], None] | None = None,
) -> wire.RevisionManifest:
    """The one check every revision manifest from elsewhere (a peer, or the state dir)
    passes before it is used or passed on. Raises `BadRevisionManifest`.

    The wire decoder has checked the shape already (ids, safe unique sorted paths,
    sizes). Here: it answers what was asked, a ``local/*`` commit matches its files,
    empty files have the empty blob id, it is not dated in the future; and, once
    cluster signing lands, `verify_signature` (raising for a bad or missing signature
    over `wire.revision_signing_bytes`) is where cluster members are required."""
    what = f"{m.repo_type} {m.repo_id}@{m.revision} ({m.commit[:12]}) from {m.made_by[:12]}"
    if (m.repo_type, m.repo_id) != (repo_type, repo_id):
        raise BadRevisionManifest(f"asked for {repo_type} {repo_id}, got {what}")
    if revision not in (m.revision, m.commit):
        raise BadRevisionManifest(f"asked for revision {revision!r}, got {what}")
    if is_local_repo(m.repo_id) and content_commit(m.files) != m.commit:
        raise BadRevisionManifest(f"{what}: the commit does not match the files")
    for f in m.files:
        if f.size == 0 and f.blob_id not in EMPTY_BLOB_IDS:
            raise BadRevisionManifest(f"{what}: empty {f.path!r} with a non-empty blob id")
    if m.published_at > now_ms + MAX_CLOCK_SKEW_MS:
        raise BadRevisionManifest(f"{what}: dated in the future ({m.published_at} ms)")
    if verify_signature is not None:
        verify_signature(m)
    return m


def manifest_of_snapshot(
    snapshot: Snapshot, *, made_by: str, now_ms: int
) -> wire.RevisionManifest | None:
    """What an agent remembers of a revision the mirror described (with ALL its files).
    None: not to be shared (private or gated repos, ``local/*`` names the mirror must
    not define, or a revision too big or odd for the wire)."""
    if snapshot.private or snapshot.gated or is_local_repo(snapshot.repo_id):
        return None
    files = tuple(
        wire.RevisionFile(path=f.path, blob_id=f.blob_id, size=f.size)
        for f in sorted(snapshot.files, key=lambda f: f.path)
    )
    m = wire.RevisionManifest(
        repo_type=snapshot.repo_type,
        repo_id=snapshot.repo_id,
        revision=snapshot.revision,
        commit=snapshot.commit,
        files=files,
        made_by=made_by,
        published_at=now_ms,
    )
    try:
        wire.encode(m)  # every check the receivers will run on it
    except ValueError:
        return None
    return m


def snapshot_of(
    m: wire.RevisionManifest, revision: str, selection: FileSelection | None = None
) -> Snapshot:
    """A `Snapshot` to download from a manifest (no mirror behind it; public by rule)."""
    files = [
        RemoteFile(path=f.path, size=f.size, blob_id=f.blob_id, is_lfs=len(f.blob_id) == 64)
        for f in m.files
    ]
    return Snapshot(
        repo_type=m.repo_type,
        repo_id=m.repo_id,
        revision=revision,
        commit=m.commit,
        files=select_files(files, selection or FileSelection(), repo=m.repo_id, revision=revision),
        mirror="",
    )


@dataclass
class RevisionBook:
    """The manifests an agent knows (pure: no I/O), per repo, keyed by (revision
    name, commit); `best` answers a lookup with the newest that fits."""

    _repos: dict[tuple[str, str], dict[tuple[str, str], wire.RevisionManifest]] = field(
        default_factory=dict
    )

    def add(self, m: wire.RevisionManifest) -> tuple[bool, list[wire.RevisionManifest]]:
        """Keep `m` unless an equal or newer one for its (revision, commit) is known
        (an older one is replaced). Returns (kept, the manifests dropped to make room:
        the oldest of that revision name beyond `KEEP_PER_REVISION`)."""
        known = self._repos.setdefault((m.repo_type, m.repo_id), {})
        key = (m.revision, m.commit)
        old = known.get(key)
        if old is not None and not is_newer(m, old):
            return False, []
        dropped: list[wire.RevisionManifest] = []
        known[key] = m
        same = sorted(
            (x for x in known.values() if x.revision == m.revision), key=newness, reverse=True
        )
        for stale in same[KEEP_PER_REVISION:]:
            del known[(stale.revision, stale.commit)]
            dropped.append(stale)
        return True, dropped

    def best(self, repo_type: str, repo_id: str, revision: str) -> wire.RevisionManifest | None:
        """The newest manifest naming `revision` (a commit id matches any manifest of
        that commit, whatever its revision name)."""
        known = self._repos.get((repo_type, repo_id), {})
        by_commit = SHA1_RE.fullmatch(revision) is not None
        fits = [m for m in known.values() if (m.commit if by_commit else m.revision) == revision]
        return max(fits, key=newness) if fits else None

    def has(self, repo_type: str, repo_id: str, revision: str, commit: str) -> bool:
        return (revision, commit) in self._repos.get((repo_type, repo_id), {})

    def forget(self, repo_type: str, repo_id: str) -> list[wire.RevisionManifest]:
        return list(self._repos.pop((repo_type, repo_id), {}).values())

    def __len__(self) -> int:
        return sum(len(v) for v in self._repos.values())
