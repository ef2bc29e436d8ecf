"""The standard Hugging Face cache, written exactly as huggingface_hub writes it.

    <root>/models--org--name/blobs/<blob id>              verified content only
    <root>/models--org--name/snapshots/<commit>/<path>    relative symlink -> ../../blobs/<id>
    <root>/models--org--name/refs/<revision>              the commit, NO trailing newline
    <root>/models--org--name/.hfswarm/partial/            our unverified work in progress

Partial downloads live inside the repo folder so that the final rename into ``blobs/`` is
on the same filesystem (atomic) and `scan_cache_dir` does not warn about a stray folder
at the cache root. Nothing reaches ``blobs/`` before its whole-file hash matched.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from peer.errors import DiskFull, LocalError, UnsafePath
from peer.verification.hashing import SHA1_RE, is_blob_id

REPO_TYPE_PREFIX = {"model": "models", "dataset": "datasets", "space": "spaces"}
_PREFIX_TYPE = {v: k for k, v in REPO_TYPE_PREFIX.items()}


def repo_of_folder(name: str) -> tuple[str, str] | None:
    """``models--org--name`` -> ("model", "org/name"); None for anything else."""
    prefix, sep, rest = name.partition("--")
    parts = rest.split("--")
    if not sep or prefix not in _PREFIX_TYPE or not 1 <= len(parts) <= 2 or not all(parts):
        return None
    return _PREFIX_TYPE[prefix], "/".join(parts)


def _check_commit(commit: str) -> str:
    """Commits name folders: only a 40-hex id may (a hostile mirror could send a path)."""
    if not SHA1_RE.fullmatch(commit):
        raise UnsafePath(
            f"refusing commit id {commit[:80]!r}: not 40 hex digits",
            hint="the mirror or a peer sent a malformed commit; report it to its operator",
        )
    return commit


def safe_relpath(path: str) -> PurePosixPath:
    """Refuse names that could escape the snapshot folder (from a hostile or broken mirror)."""
    if not path or "\0" in path or "\\" in path or path.startswith("/"):
        raise UnsafePath(
            f"refusing unsafe file name from the mirror: {path!r}",
            hint="the mirror sent a path that is absolute or malformed; "
            "report it to the mirror's operator",
        )
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(
            f"refusing unsafe file name from the mirror: {path!r}",
            hint="the path has '..', '.' or empty parts; report it to the mirror's operator",
        )
    return PurePosixPath(path)


def translate_os_error(exc: OSError, what: str) -> LocalError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            f"disk full while {what}",
            hint="free some space (or pick another --cache-dir) and run the same "
            "command again: finished pieces are kept",
        )
    return LocalError(
        f"{what} failed: {exc.strerror or exc}", hint="check that the folder exists and is writable"
    )


def sync_file(path: Path) -> None:
    """Put a file's bytes on disk before it is renamed into ``blobs/``: fsync on any fd
    writes back every dirty page of the file, whoever wrote it (libtorrent's own disk
    threads for a swarm download, which never sync). Without it a power loss after the
    rename could leave a "verified" blob of zeros. Nearly free when the writer synced, so
    an async caller runs it in a thread first (`BlobFetcher._install`): the rename itself
    stays on the loop, in the same step as the readers are moved to the new path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RepoCache:
    """One repository's folder in the cache."""

    root: Path
    repo_type: str
    repo_id: str

    @property
    def folder(self) -> Path:
        return self.root / f"{REPO_TYPE_PREFIX[self.repo_type]}--{self.repo_id.replace('/', '--')}"

    @property
    def blobs(self) -> Path:
        return self.folder / "blobs"

    @property
    def partial_dir(self) -> Path:
        return self.folder / ".hfswarm" / "partial"

    def blob_path(self, blob_id: str) -> Path:
        if not is_blob_id(blob_id):
            raise UnsafePath(f"refusing blob id {blob_id!r}: not a sha256/sha1 hex id")
        return self.blobs / blob_id

    def snapshot_dir(self, commit: str) -> Path:
        return self.folder / "snapshots" / _check_commit(commit)

    def has_blob(self, blob_id: str, size: int) -> bool:
        try:
            return self.blob_path(blob_id).stat().st_size == size
        except OSError:
            return False

    def install_blob(self, verified: Path, blob_id: str) -> Path:
        """Move a file whose hash was just checked into ``blobs/``: its bytes on disk
        first, then an atomic rename, then the folder synced."""
        target = self.blob_path(blob_id)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            sync_file(verified)
            os.replace(verified, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise translate_os_error(exc, f"moving {blob_id} into the cache") from exc
        return target

    def adopt_blob(self, source: Path, blob_id: str) -> Path:
        """Reuse a verified blob from elsewhere: hard link, else copy (then rename)."""
        target = self.blob_path(blob_id)
        # one name per thread: an agent adopts in threads (a copy may take minutes)
        tmp = self.partial_dir / f"{blob_id}.{threading.get_ident()}.adopt.{os.getpid()}"
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
        except OSError as exc:
            raise translate_os_error(exc, f"reusing blob {blob_id}") from exc
        if target.exists():  # someone installed it meanwhile: drop our link
            tmp.unlink(missing_ok=True)
            return target
        return self.install_blob(tmp, blob_id)

    def link_snapshot(self, commit: str, path: str, blob_id: str) -> Path:
        rel = safe_relpath(path)
        link = self.snapshot_dir(commit).joinpath(*rel.parts)
        # ../../blobs from snapshots/<commit>/, plus one level per folder in the path
        target = Path(*([".."] * (len(rel.parts) + 1)), "blobs", blob_id)
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() and os.readlink(link) == str(target):
                return link
            tmp = link.with_name(f".{link.name}.hfswarm-tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, link)
        except OSError as exc:
            raise translate_os_error(exc, f"linking {path} into the snapshot") from exc
        return link

    def write_ref(self, revision: str, commit: str) -> None:
        """refs/<revision> holds the commit with no newline (a newline breaks huggingface_hub)."""
        _check_commit(commit)
        if revision == commit:
            return
        try:
            rel = safe_relpath(revision)
        except UnsafePath:
            raise UnsafePath(
                f"refusing revision name {revision[:80]!r}",
                hint="a revision is a branch, tag, commit or refs/pr/N",
            ) from None
        ref = self.folder.joinpath("refs", *rel.parts)
        try:
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}.hfswarm-tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)
        except OSError as exc:
            raise translate_os_error(exc, f"writing refs/{revision}") from exc


def find_blob_anywhere(root: Path, blob_id: str, size: int) -> Path | None:
    """A blob with this id in any repo of the cache (the same content is one blob)."""
    if not is_blob_id(blob_id):
        return None
    try:
        entries = list(os.scandir(root))
    except OSError:
        return None
    for entry in entries:
        if "--" not in entry.name:
            continue
        candidate = Path(entry.path) / "blobs" / blob_id
        try:
            if candidate.stat().st_size == size:
                return candidate
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class LocalDir:
    """`--local-dir` output: plain files, plus huggingface_hub's download metadata so that
    `hf download --local-dir` recognises them as up to date."""

    root: Path

    @property
    def partial_dir(self) -> Path:
        return self.root / ".cache" / "hfswarm" / "partial"

    def file_path(self, path: str) -> Path:
        return self.root.joinpath(*safe_relpath(path).parts)

    def _metadata_path(self, path: str) -> Path:
        rel = safe_relpath(path)
        return self.root.joinpath(
            ".cache", "huggingface", "download", *rel.parts[:-1], rel.parts[-1] + ".metadata"
        )

    def is_current(self, path: str, commit: str, blob_id: str, size: int) -> bool:
        try:
            lines = self._metadata_path(path).read_text().splitlines()
            st = self.file_path(path).stat()
        except OSError:
            return False
        if len(lines) < 3 or lines[1] != blob_id or st.st_size != size:
            return False
        try:
            return st.st_mtime <= float(lines[2]) + 1
        except ValueError:
            return False

    def install(self, verified: Path, path: str, commit: str, blob_id: str) -> Path:
        target = self.file_path(path)
        meta = self._metadata_path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # The bytes, then the rename, on disk before the metadata that vouches for
            # them: `is_current` trusts a file its metadata names (size and mtime only).
            sync_file(verified)
            os.replace(verified, target)
            _fsync_dir(target.parent)
            meta.parent.mkdir(parents=True, exist_ok=True)
            tmp = meta.with_name(f".{meta.name}.tmp")
            tmp.write_text(f"{commit}\n{blob_id}\n{time.time()}\n")
            os.replace(tmp, meta)
        except OSError as exc:
            raise translate_os_error(exc, f"writing {path} into {self.root}") from exc
        return target

    def copy_in(self, source: Path, path: str, commit: str, blob_id: str) -> Path:
        # one name per thread: files of the same content are copied in at once
        tmp = self.partial_dir / f"{blob_id}.{threading.get_ident()}.copy.{os.getpid()}"
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp)
        except OSError as exc:
            raise translate_os_error(exc, f"copying {path} into {self.root}") from exc
        return self.install(tmp, path, commit, blob_id)
