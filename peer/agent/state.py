"""The agent's state dir: who it is, which blobs it verified, and libtorrent resume data.

    <state>/agent_id                 random id, made once
    <state>/verified/<blob id>       msgpack: the file's fingerprint when it was verified,
                                     and its manifest (so a restart re-hashes nothing)
    <state>/resume/<info hash>       libtorrent resume data of unfinished downloads
    <state>/revisions/<key>          a revision manifest this agent shares (wire bytes;
                                     key: sha256 of repo type, repo id, revision, commit)
    <state>/provenance/<blob id>     msgpack: the repos the blob is held for and what is
                                     known of each (`peer.serving.sharing.Provenance`)

Every write is temp file + rename, so a kill -9 leaves the old or the new record, never a
torn one. A record only says "this file, with this size/mtime/inode, hashed to its id":
if the fingerprint changed, the blob is verified again before it is seeded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import msgpack

from peer.cache.hf_cache import translate_os_error
from peer.serving.sharing import MAX_REPOS, Provenance, Visibility
from peer.verification.hashing import SHA256_RE, is_blob_id


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> Fingerprint:
        st = path.stat()  # follows symlinks: blobs/ entries may point into a shared store
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class VerifiedRecord:
    blob_id: str
    fingerprint: Fingerprint
    manifest: bytes  # wire-encoded Manifest


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise translate_os_error(exc, f"writing {path}") from exc


@dataclass(frozen=True)
class StateDir:
    root: Path

    def agent_id(self) -> str:
        path = self.root / "agent_id"
        with contextlib.suppress(OSError):
            value = path.read_text().strip()
            if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
                return value
        value = secrets.token_hex(16)
        _atomic_write(path, value.encode())
        return value

    # -- verified blobs --------------------------------------------------------------

    def remember_verified(self, record: VerifiedRecord) -> None:
        fp = record.fingerprint
        payload = msgpack.packb(
            {
                "v": 1,
                "size": fp.size,
                "mtime_ns": fp.mtime_ns,
                "inode": fp.inode,
                "manifest": record.manifest,
            }
        )
        _atomic_write(self.root / "verified" / record.blob_id, payload)

    def verified(self, blob_id: str, current: Fingerprint) -> VerifiedRecord | None:
        """The stored record, if the file still looks exactly as when it was verified."""
        if not is_blob_id(blob_id):
            return None
        try:
            raw = (self.root / "verified" / blob_id).read_bytes()
            d = msgpack.unpackb(raw, raw=False)
            fp = Fingerprint(int(d["size"]), int(d["mtime_ns"]), int(d["inode"]))
            manifest = bytes(d["manifest"])
        except (OSError, ValueError, KeyError, TypeError, msgpack.ExtraData):
            return None
        if fp != current:
            return None
        return VerifiedRecord(blob_id, fp, manifest)

    def forget_verified(self, blob_id: str) -> None:
        if is_blob_id(blob_id):
            with contextlib.suppress(OSError):
                (self.root / "verified" / blob_id).unlink()

    # -- provenance ------------------------------------------------------------------

    def save_provenance(self, blob_id: str, provenance: Provenance) -> None:
        if is_blob_id(blob_id):
            payload = msgpack.packb({"v": 1, "repos": [[k, v.value] for k, v in provenance.repos]})
            _atomic_write(self.root / "provenance" / blob_id, payload)

    def provenance(self, blob_id: str) -> Provenance:
        """What was recorded; nothing (not shared) if the record is missing or unreadable."""
        if not is_blob_id(blob_id):
            return Provenance()
        try:
            d = msgpack.unpackb((self.root / "provenance" / blob_id).read_bytes(), raw=False)
            repos = tuple((str(k), Visibility(v)) for k, v in d["repos"][:MAX_REPOS])
        except (OSError, ValueError, KeyError, TypeError, msgpack.ExtraData):
            return Provenance()
        return Provenance(repos)

    # -- resume data -----------------------------------------------------------------

    def save_resume(self, info_hash: str, data: bytes) -> None:
        if SHA256_RE.fullmatch(info_hash):
            _atomic_write(self.root / "resume" / info_hash, data)

    def load_resume(self, info_hash: str) -> bytes | None:
        if not SHA256_RE.fullmatch(info_hash):
            return None
        try:
            return (self.root / "resume" / info_hash).read_bytes()
        except OSError:
            return None

    def drop_resume(self, info_hash: str) -> None:
        if SHA256_RE.fullmatch(info_hash):
            with contextlib.suppress(OSError):
                (self.root / "resume" / info_hash).unlink()

    # -- revision manifests ----------------------------------------------------------

    def save_revision(self, key: str, data: bytes) -> None:
        if SHA256_RE.fullmatch(key):
            _atomic_write(self.root / "revisions" / key, data)

    def revision_records(self) -> list[tuple[str, bytes]]:
        """Every stored revision manifest, as (key, wire bytes)."""
        out: list[tuple[str, bytes]] = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root / "revisions"):
                if SHA256_RE.fullmatch(entry.name):
                    with contextlib.suppress(OSError):
                        out.append((entry.name, Path(entry.path).read_bytes()))
        return out

    def drop_revision(self, key: str) -> None:
        if SHA256_RE.fullmatch(key):
            with contextlib.suppress(OSError):
                (self.root / "revisions" / key).unlink()
