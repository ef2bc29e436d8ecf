"""One `hfswarm download` from the mirror: metadata -> transfer -> verification -> cache.

This is the "first fetch goes to the mirror" path and the fallback of every other path:
resolve the revision, reuse blobs the cache already holds (even from another repo),
fetch the rest with parallel Range requests, check each whole-file hash, and only then
rename the blob into ``blobs/`` and link it into ``snapshots/<commit>/``. A blob whose
hash does not match is thrown away and fetched once more from scratch; a second
mismatch is an `IntegrityError`, and nothing is linked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from peer.agent import requests as job
from peer.agent.requests import DownloadRequest
from peer.aio import each_with_ticks
from peer.cache.hf_cache import LocalDir, RepoCache, find_blob_anywhere, safe_relpath
from peer.cache.partial import PartialBlob, PartialBusy
from peer.config import DownloadOptions, HubSettings
from peer.errors import EntryNotFound, IntegrityError, NetworkError, UnsafePath
from peer.hub.metadata import RemoteFile, Snapshot, resolve_snapshot, select_files
from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for
from peer.transfer.progress import Progress
from peer.verification.hashing import SHA1_RE, Verdict, hash_file, is_blob_id

log = logging.getLogger(__name__)


async def download(
    settings: HubSettings,
    options: DownloadOptions,
    request: DownloadRequest,
    on_event: Callable[[job.Event], None] = lambda _: None,
) -> job.Done:
    """The download `request` names, from the mirror alone, `on_event` seeing its
    progress (the same events as an agent's download)."""
    t0 = time.monotonic()
    settings = replace(settings, token=request.token)  # the caller's, or anonymous
    try:
        snapshot = await resolve_snapshot(
            settings, request.repo_type, request.repo_id, request.revision, request.selection
        )
    except NetworkError as exc:
        # As `hf download` does: no mirror answers, so the snapshot the cache already
        # holds for that revision is the answer (its blobs were verified when written).
        cached = await asyncio.to_thread(cached_snapshot, settings.cache_dir, request)
        if cached is None:
            raise
        log.warning(
            "hfswarm: warning: %s; using the cached snapshot of %s (commit %s)",
            exc.one_line(),
            request.revision,
            cached.commit[:12],
        )
        return cached
    repo = RepoCache(settings.cache_dir, snapshot.repo_type, snapshot.repo_id)
    # Counts only (the fetcher adds to it); `on_event`'s consumer draws.
    progress = Progress(snapshot.total_size, files=len(snapshot.files), quiet=True)
    on_event(job.Started(len(snapshot.files), snapshot.total_size, commit=snapshot.commit))
    reused = 0
    limit = asyncio.Semaphore(options.max_files)
    # One task per blob id: the same content under two paths is fetched once.
    by_blob: dict[str, list[RemoteFile]] = {}
    for f in snapshot.files:
        by_blob.setdefault(f.blob_id, []).append(f)

    async with MirrorFetcher(settings, options, progress) as fetcher:

        def report() -> None:
            on_event(
                job.Progress(
                    progress.done + reused,
                    snapshot.total_size,
                    counters=job.Counters(from_mirror=fetcher.bytes_fetched, reused=reused),
                    files_done=progress.files_done,
                )
            )

        async def one(files: list[RemoteFile]) -> None:
            nonlocal reused
            async with limit:
                got = await _obtain(fetcher, snapshot, repo, files[0], request.local_dir)
            reused += files[0].size if got else 0
            for f in files:
                _place(snapshot, repo, f, request.local_dir)
                progress.file_done()
            report()

        await each_with_ticks(by_blob.values(), one, report, 0.25)

    if request.local_dir is None:
        repo.write_ref(snapshot.revision, snapshot.commit)
        path = repo.snapshot_dir(snapshot.commit)
        path.mkdir(parents=True, exist_ok=True)  # an empty selection still names a snapshot
    else:
        path = request.local_dir
    return job.Done(
        path=path,
        commit=snapshot.commit,
        files=len(snapshot.files),
        total=snapshot.total_size,
        done=snapshot.total_size,
        counters=job.Counters(from_mirror=fetcher.bytes_fetched, reused=reused),
        entries=tuple((f.path, f.blob_id, f.size) for f in snapshot.files),
        seconds=time.monotonic() - t0,
    )


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


async def _obtain(
    fetcher: MirrorFetcher,
    snapshot: Snapshot,
    repo: RepoCache,
    file: RemoteFile,
    local_dir: Path | None,
) -> bool:
    """Make sure the blob exists verified in the repo's ``blobs/`` (or is current in the
    local dir). Returns True when nothing had to be fetched."""
    if local_dir is not None:
        target = LocalDir(local_dir)
        if target.is_current(file.path, snapshot.commit, file.blob_id, file.size):
            return True
    elif repo.has_blob(file.blob_id, file.size):
        return True
    elsewhere = find_blob_anywhere(repo.root, file.blob_id, file.size)
    if elsewhere is not None:
        verdict = await asyncio.to_thread(hash_file, elsewhere, file.blob_id, file.size)
        if verdict.ok:
            if local_dir is None:
                repo.adopt_blob(elsewhere, file.blob_id)
            else:
                LocalDir(local_dir).copy_in(elsewhere, file.path, snapshot.commit, file.blob_id)
            return True
    partial_dir = LocalDir(local_dir).partial_dir if local_dir else repo.partial_dir
    finished = await fetch_verified(
        fetcher,
        snapshot,
        file,
        partial_dir,
        done_elsewhere=lambda: local_dir is None and repo.has_blob(file.blob_id, file.size),
    )
    if finished is None:
        return True
    if local_dir is None:
        repo.install_blob(finished, file.blob_id)
    else:
        LocalDir(local_dir).install(finished, file.path, snapshot.commit, file.blob_id)
    return False


async def fetch_verified(
    fetcher: MirrorFetcher,
    snapshot: Snapshot,
    file: RemoteFile,
    partial_dir: Path,
    *,
    done_elsewhere: Callable[[], bool],
    on_bytes: Callable[[int], None] | None = None,
    on_mismatch: Callable[[Verdict], None] | None = None,
    on_prefix: Callable[[Path, int], None] | None = None,
) -> Path | None:
    """Fetch a blob from the mirror into its journaled partial until its whole-file hash
    matches (a mismatch is thrown away and fetched once more from scratch). Returns the
    verified file for the caller to rename into place, or None when another process
    finished the same blob meanwhile (`done_elsewhere`)."""
    for attempt in (1, 2):
        partial = PartialBlob(partial_dir, file.blob_id, file.size, chunk_size_for(file.size))
        while True:
            try:
                partial.open()
                break
            except PartialBusy:
                # Another process fetches this blob: wait for it rather than race it.
                await asyncio.sleep(0.5)
                if done_elsewhere():
                    return None
        try:
            verdict = await fetcher.fetch(
                snapshot,
                file,
                partial,
                on_bytes=on_bytes,
                on_prefix=None if on_prefix is None else partial_prefix(on_prefix, partial),
            )
        except BaseException:
            partial.close()
            raise
        if verdict.ok:
            return partial.take_finished()
        partial.discard()
        if on_mismatch is not None:
            on_mismatch(verdict)
        log.warning(
            "%s from the mirror hashed to %s, not %s (attempt %d)",
            file.path,
            verdict.actual,
            file.blob_id,
            attempt,
        )
    raise IntegrityError(
        f"{file.path}: content hash {verdict.actual} does not match the Hub's "
        f"{file.blob_id}, twice",
        hint="the mirror serves corrupt data; nothing was written to the cache. "
        "Try another --mirror",
    )


def partial_prefix(
    on_prefix: Callable[[Path, int], None], partial: PartialBlob
) -> Callable[[int], None]:
    return lambda n: on_prefix(partial.data_path, n)


def _place(snapshot: Snapshot, repo: RepoCache, file: RemoteFile, local_dir: Path | None) -> None:
    if local_dir is None:
        repo.link_snapshot(snapshot.commit, file.path, file.blob_id)
    elif not LocalDir(local_dir).is_current(file.path, snapshot.commit, file.blob_id, file.size):
        # a second path with the same content as one just written
        source = _first_copy(local_dir, snapshot, file)
        LocalDir(local_dir).copy_in(source, file.path, snapshot.commit, file.blob_id)


def _first_copy(local_dir: Path, snapshot: Snapshot, file: RemoteFile) -> Path:
    ld = LocalDir(local_dir)
    for other in snapshot.files:
        if other.blob_id == file.blob_id and ld.is_current(
            other.path, snapshot.commit, other.blob_id, other.size
        ):
            return ld.file_path(other.path)
    raise IntegrityError(f"{file.path}: no verified copy to duplicate")
