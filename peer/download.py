"""`hfswarm download` with no agent (none running, or ``--no-agent``): the agent's own
`peer.agent.jobs.DownloadJob`, with the mirror as its only source.

This is the "first fetch goes to the mirror" path: the revision from the mirror
(`MirrorSnapshots`), each blob from this cache if it holds it (even under another repo,
hashed first) else from the mirror with parallel Range requests, its whole-file hash
checked before it is renamed into ``blobs/`` (or into ``--local-dir``, which this path
writes directly, as huggingface_hub does: a file current there is not fetched again).
The origin is one more source, as in the agent (`peer.agent.fetch.BlobFetcher` asks it
last, after peers and the herd).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from peer import wire
from peer.agent import requests as job
from peer.agent.jobs import DownloadJob
from peer.agent.requests import DownloadRequest
from peer.cache.hf_cache import LocalDir, RepoCache, find_blob_anywhere, safe_relpath
from peer.cache.partial import PartialBlob
from peer.config import DownloadOptions, HubSettings
from peer.errors import EntryNotFound, NetworkError, UnsafePath
from peer.hub.metadata import FileSelection, RemoteFile, Snapshot, resolve_snapshot, select_files
from peer.serving.sharing import Access, repo_key
from peer.transfer.mirror_blob import BlobCounters, from_mirror
from peer.transfer.mirror_ranges import MirrorFetcher
from peer.verification.hashing import SHA1_RE, hash_file, is_blob_id

log = logging.getLogger(__name__)


async def download(
    settings: HubSettings,
    options: DownloadOptions,
    request: DownloadRequest,
    on_event: Callable[[job.Event], None] = lambda _: None,
) -> job.Done:
    """The download `request` names, from the mirror alone, `on_event` seeing its
    progress (the same events as an agent's download)."""

    async def emit(event: job.Event) -> None:
        on_event(event)

    source = MirrorOnly(settings.cache_dir, options, request.local_dir)
    job_ = DownloadJob(settings, options, MirrorSnapshots(), source, tick=0.25)
    try:
        return await job_.run(request, emit)
    except NoMirrorAnswer as exc:
        # As `hf download` does: no mirror answers, so the snapshot the cache already
        # holds for that revision is the answer (its blobs were verified when written).
        cached = await asyncio.to_thread(cached_snapshot, settings.cache_dir, request)
        if cached is None:
            raise exc.cause from None
        log.warning(
            "hfswarm: warning: %s; using the cached snapshot of %s (commit %s)",
            exc.cause.one_line(),
            request.revision,
            cached.commit[:12],
        )
        return cached


class NoMirrorAnswer(Exception):
    """The revision could not be resolved: no mirror answered (`cause`)."""

    def __init__(self, cause: NetworkError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class MirrorSnapshots:
    """Revisions from the mirror alone (nothing is recorded: no peer asks this process)."""

    async def resolve(
        self,
        hub: HubSettings,
        repo_type: str,
        repo_id: str,
        revision: str,
        selection: FileSelection | None = None,
    ) -> tuple[Snapshot, wire.RevisionManifest | None]:
        try:
            snapshot = await resolve_snapshot(
                hub, repo_type, repo_id, revision, selection or FileSelection()
            )
        except NetworkError as exc:  # `download` may answer from the cache
            raise NoMirrorAnswer(exc) from exc
        return snapshot, None

    def record(self, m: wire.RevisionManifest) -> None:
        pass


class MirrorOnly:
    """The blob source of a download with no agent: this cache (this repo's copy as it
    is, another repo's hashed first), then the mirror. With a local dir, blobs go there
    instead of the cache."""

    def __init__(self, cache_dir: Path, options: DownloadOptions, local_dir: Path | None) -> None:
        self.cache_dir = cache_dir
        self.local_dir = None if local_dir is None else LocalDir(local_dir)
        self._transfers = asyncio.Semaphore(options.max_files)  # blobs at once

    async def access(self, snapshot: Snapshot, mirror: MirrorFetcher) -> Access:
        """The caller's own cache, with their own token: nothing here is shared."""
        return Access(repo_key(snapshot.repo_type, snapshot.repo_id), None, mirror_allowed=True)

    async def obtain(
        self,
        snapshot: Snapshot,
        file: RemoteFile,
        mirror: MirrorFetcher,
        counters: BlobCounters,
        access: Access,
    ) -> Path:
        repo = RepoCache(self.cache_dir, snapshot.repo_type, snapshot.repo_id)
        async with self._transfers:
            if self.local_dir is None and repo.has_blob(file.blob_id, file.size):
                counters.had()
                return repo.blob_path(file.blob_id)
            elsewhere = await asyncio.to_thread(
                find_blob_anywhere, repo.root, file.blob_id, file.size
            )
            if (
                elsewhere is not None
                and (await asyncio.to_thread(hash_file, elsewhere, file.blob_id, file.size)).ok
            ):
                counters.had()
                # a copy where no hard link can be made may take minutes: off the loop
                return await asyncio.to_thread(
                    self._install, repo, snapshot, file, elsewhere, copy=True
                )
            partial_dir = repo.partial_dir if self.local_dir is None else self.local_dir.partial_dir
            finished = await from_mirror(
                mirror,
                snapshot,
                file,
                partial_dir,
                counters,
                done_elsewhere=lambda: (
                    self.local_dir is None and repo.has_blob(file.blob_id, file.size)
                ),
            )
            if finished is None:
                return repo.blob_path(file.blob_id)
            installed = await asyncio.to_thread(
                self._install, repo, snapshot, file, finished.path, copy=False
            )
            PartialBlob.installed(finished.path)
            return installed

    def _install(
        self, repo: RepoCache, snapshot: Snapshot, file: RemoteFile, verified: Path, *, copy: bool
    ) -> Path:
        """A verified file into the cache's blobs/, or to its path in the local dir."""
        if self.local_dir is None:
            if copy:
                return repo.adopt_blob(verified, file.blob_id)
            return repo.install_blob(verified, file.blob_id)
        if copy:
            return self.local_dir.copy_in(verified, file.path, snapshot.commit, file.blob_id)
        return self.local_dir.install(verified, file.path, snapshot.commit, file.blob_id)


def cached_snapshot(cache_dir: Path, request: DownloadRequest) -> job.Done | None:
    """The request answered from the cache alone: the commit its revision names there
    (refs/<revision>, or a commit id), and the selected files of that snapshot. None when
    the cache cannot answer it (no such ref or snapshot, a named file missing, or a
    --local-dir, whose files only a mirror can bring up to date)."""
    if request.local_dir is not None:
        return None
    repo = RepoCache(cache_dir, request.repo_type, request.repo_id)
    commit = request.revision
    if not SHA1_RE.fullmatch(commit):
        try:
            commit = (repo.folder / "refs" / safe_relpath(commit)).read_text().strip()
        except (OSError, UnsafePath):
            return None
        if not SHA1_RE.fullmatch(commit):
            return None
    folder = repo.snapshot_dir(commit)
    files = []
    for link in sorted(folder.rglob("*")):
        blob = os.path.basename(os.readlink(link)) if link.is_symlink() else ""
        if is_blob_id(blob) and link.is_file():  # a link to a blob that is there
            size = link.stat().st_size
            path = link.relative_to(folder).as_posix()
            files.append(RemoteFile(path, size, blob, is_lfs=len(blob) == 64))
    if not files:
        return None
    try:
        chosen = select_files(files, request.selection, repo=request.repo_id, revision=commit)
    except EntryNotFound:
        return None
    total = sum(f.size for f in chosen)
    return job.Done(
        path=folder,
        commit=commit,
        files=len(chosen),
        total=total,
        done=total,
        counters=job.Counters(reused=total),
        entries=tuple((f.path, f.blob_id, f.size) for f in chosen),
        seconds=0.0,
    )
