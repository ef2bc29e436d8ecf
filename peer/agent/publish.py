"""`hfswarm publish PATH --repo local/NAME`: share a folder (a training checkpoint, say)
on the LAN as a repo no mirror has.

The agent copies each file into its HF cache while hashing it, the way the Hub names
content: sha256 for LFS-style files (1 MiB and up, or a weights/data suffix), git blob
sha1 for the others. The copy is what was hashed, so the blob is verified by
construction (a file rewritten in place later never changes a published blob; a file
whose size changes while it is read fails the publish). Then, like any download:

    models--local--NAME/blobs/<blob id>             the copies, seeded at once
    models--local--NAME/snapshots/<commit>/<path>   links, commit = content_commit(files)
    models--local--NAME/refs/main                   the commit

and a `RevisionManifest` for ``main`` is recorded (state dir) and served to peers. It is
dated past the newest ``main`` this agent or its peers know, so ``main`` moves to it
everywhere; publishing the files ``main`` already holds changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peer import wire
from peer.agent.requests import Progress, PublishRequest, Started
from peer.agent.revisions import Revisions
from peer.agent.seeding import SeedIndex
from peer.cache.hf_cache import RepoCache, translate_os_error
from peer.errors import ConfigError, LocalError
from peer.hub.protocol import REPO_TYPES, is_lfs_path
from peer.manifests.revisions import content_commit, is_local_repo
from peer.serving.local_api import Emit
from peer.serving.sharing import Visibility, repo_key
from peer.verification.hashing import READ_BLOCK, BlobHasher, HashKind

log = logging.getLogger(__name__)


def check_publish_repo(repo_type: str, repo_id: str) -> None:
    if repo_type not in REPO_TYPES:
        raise ConfigError(f"unknown repo type {repo_type!r}", hint="use model, dataset or space")
    try:
        wire.encode(wire.RevisionRequest(repo_type=repo_type, repo_id=repo_id, revision="main"))
    except ValueError:
        ok = False
    else:
        ok = is_local_repo(repo_id) and repo_id.count("/") == 1
    if not ok:
        raise ConfigError(
            f"cannot publish as {repo_id!r}",
            hint="publish as local/NAME (letters, digits, '.', '_', '-'; at most 96): "
            "local/* repos live on the LAN only, other names belong to the Hub",
        )


def list_folder(folder: Path) -> list[tuple[str, Path, int]]:
    """(repo path, file, size) for every file under `folder`, sorted by path; symlinks are
    followed (a snapshot folder of the HF cache can be published as is). Skipped:
    ``.git`` folders and the top-level ``.cache`` (huggingface_hub's --local-dir
    bookkeeping). Blocking."""
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder", hint="publish a folder of files")
    found: list[tuple[str, Path, int]] = []
    seen_dirs: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(folder, followlinks=True, onerror=_raise):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        rel_root = Path(root).relative_to(folder)
        dirs[:] = sorted(
            d for d in dirs if d != ".git" and not (rel_root == Path(".") and d == ".cache")
        )
        for name in names:
            disk = Path(root) / name
            if not disk.is_file():
                continue  # sockets, fifos, dangling links: not content
            rel = (rel_root / name).as_posix()
            try:
                wire.encode(wire.RevisionFile(path=rel, blob_id="0" * 40, size=0))
            except ValueError:
                raise ConfigError(
                    f"cannot publish {rel!r}: the path is longer than "
                    f"{wire.MAX_PATH_BYTES} bytes (UTF-8) or not a plain relative path",
                    hint="rename or move it out of the folder",
                ) from None
            found.append((rel, disk, disk.stat().st_size))
    found.sort(key=lambda t: t[0])
    if not found:
        raise ConfigError(f"{folder} holds no files", hint="nothing to publish")
    if len(found) > wire.MAX_REVISION_FILES:
        raise ConfigError(
            f"{folder} holds {len(found)} files; a revision carries at most "
            f"{wire.MAX_REVISION_FILES}",
            hint="pack small files into archives, or publish sub-folders as separate repos",
        )
    return found


def _raise(exc: OSError) -> None:
    raise exc


def copy_hashed(
    src: Path, dst: Path, rel: str, on_bytes: Callable[[int], None]
) -> wire.RevisionFile:
    """Copy `src` to `dst` and return the file's (path, blob id, size): the id of
    exactly the bytes written. Blocking."""
    with open(src, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        kind = HashKind.SHA256 if is_lfs_path(rel, size) else HashKind.GIT_SHA1
        hasher = BlobHasher(kind, size)
        buf = bytearray(READ_BLOCK)
        view = memoryview(buf)
        with open(dst, "wb") as out:
            while n := f.readinto(buf):
                hasher.update(view[:n])
                out.write(view[:n])
                on_bytes(n)
            out.flush()
            os.fsync(out.fileno())
    if hasher.fed != size:
        raise LocalError(
            f"{src} changed size while it was being published",
            hint="publish once the files are written (e.g. after the checkpoint is saved)",
        )
    return wire.RevisionFile(path=rel, blob_id=hasher.hexdigest(), size=size)


class Publisher:
    def __init__(
        self, cache_dir: Path, seeds: SeedIndex, revisions: Revisions, agent_id: str
    ) -> None:
        self.cache_dir = cache_dir
        self.seeds = seeds
        self.revisions = revisions
        self.agent_id = agent_id
        self._lock = asyncio.Lock()

    async def run(self, spec: PublishRequest, emit: Emit) -> dict[str, Any]:
        check_publish_repo(spec.repo_type, spec.repo_id)
        async with self._lock:
            return await self._run(spec, emit)

    async def _run(self, spec: PublishRequest, emit: Emit) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            listing = await asyncio.to_thread(list_folder, spec.path)
        except OSError as exc:
            raise translate_os_error(exc, f"reading {spec.path}") from exc
        total = sum(size for _, _, size in listing)
        await emit(Started(files=len(listing), total=total))
        repo = RepoCache(self.cache_dir, spec.repo_type, spec.repo_id)
        done = [0]

        def count(n: int) -> None:
            done[0] += n

        async def report() -> None:
            while True:
                await asyncio.sleep(0.5)
                await emit(Progress(done=done[0], total=total))

        files: list[wire.RevisionFile] = []
        reporter = asyncio.create_task(report())
        try:
            for rel, disk, _ in listing:
                files.append(await self._add_file(repo, rel, disk, count))
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        commit = content_commit(files)
        for f in files:
            repo.link_snapshot(commit, f.path, f.blob_id)
        previous = await self.revisions.find(spec.repo_type, spec.repo_id, "main")
        changed = previous is None or previous.commit != commit
        if changed:
            now = self.revisions.now_ms()
            self.revisions.record(
                wire.RevisionManifest(
                    repo_type=spec.repo_type,
                    repo_id=spec.repo_id,
                    revision="main",
                    commit=commit,
                    files=tuple(files),
                    made_by=self.agent_id,
                    published_at=max(now, previous.published_at + 1) if previous else now,
                )
            )
        repo.write_ref("main", commit)
        return {
            "event": "done",
            "repo_id": spec.repo_id,
            "repo_type": spec.repo_type,
            "revision": "main",
            "commit": commit,
            "changed": changed,
            "files": len(files),
            "total": sum(f.size for f in files),
            "path": str(repo.snapshot_dir(commit)),
            "seconds": time.monotonic() - t0,
        }

    async def _add_file(
        self, repo: RepoCache, rel: str, disk: Path, count: Callable[[int], None]
    ) -> wire.RevisionFile:
        tmp = repo.partial_dir / f"publish.{secrets.token_hex(8)}"
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            f = await asyncio.to_thread(copy_hashed, disk, tmp, rel, count)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise translate_os_error(exc, f"publishing {disk}") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        target = repo.blob_path(f.blob_id)
        if self.seeds.path_of(f.blob_id) == target:
            tmp.unlink(missing_ok=True)  # this very blob is here, verified and seeded
        else:
            repo.install_blob(tmp, f.blob_id)  # our copy, verified by construction
        # Published by this machine's own user: shared on the LAN, whatever else holds it.
        held_for = (repo_key(repo.repo_type, repo.repo_id), Visibility.LOCAL)
        await self.seeds.offer_verified(target, f.blob_id, f.size, held_for)
        return f
