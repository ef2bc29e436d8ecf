"""The audit log: one JSON line per event an operator may have to account for.

    audit = AuditLog(path)          # None: no audit log (every write is a no-op)
    audit.write(ApiCall(...))
    audit.close()

Events (each line also has ``ts``, UTC ISO 8601 with milliseconds, and ``event``):

    api_call     a call of the local API that acted or was refused: ``uid`` (the caller's,
                 from /proc/net/tcp; null if unknown), ``method``, ``route``, ``asked``
                 (repo_type, repo_id, revision, path: never a token), ``status`` (HTTP),
                 ``outcome`` ("done", "refused", or the error's kind)
    download     a download the agent finished: ``via`` ("local_api" or "hub_api"),
                 repo_type, repo_id, revision, commit, ``files``, ``bytes_from_peers``,
                 ``bytes_from_mirror``, ``bytes_reused``
    publish      ``hfswarm publish``: repo_type, repo_id, commit, ``files``, ``bytes``,
                 ``source`` (the folder read)
    blob_served  bytes of a blob given to a peer: ``peer_agent_id`` (null unless one live
                 peer has that address), ``peer_address``, ``blob_id``, ``bytes``, ``via``
                 ("http": a small blob from /v1/blobs, at the end of the response;
                 "swarm": BitTorrent, when the connection closes)
    peer_banned  ``peer_address``, ``reason``, ``by`` ("policy": this agent's scheduler;
                 "libtorrent": a peer whose piece failed its hash check), ``blob_id`` if known

The file is written 0600 (it names who asked for what), appended to, and rotated by
size: `MAX_BYTES` per file, `BACKUPS` older files (``audit.log.1`` ... ``.5``). Each
`AuditLog` has a logger of its own that does not propagate: nothing global is touched,
and two agents in one process keep two logs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import logging.handlers
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from peer.errors import LocalError

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5


@dataclass(frozen=True)
class AuditEvent:
    event: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class ApiCall(AuditEvent):
    event: ClassVar[str] = "api_call"
    uid: int | None
    method: str
    route: str
    asked: dict[str, str]
    status: int
    outcome: str


@dataclass(frozen=True)
class DownloadFinished(AuditEvent):
    event: ClassVar[str] = "download"
    via: str
    repo_type: str
    repo_id: str
    revision: str
    commit: str
    files: int
    bytes_from_peers: int
    bytes_from_mirror: int
    bytes_reused: int


@dataclass(frozen=True)
class Published(AuditEvent):
    event: ClassVar[str] = "publish"
    repo_type: str
    repo_id: str
    commit: str
    files: int
    bytes: int
    source: str


@dataclass(frozen=True)
class BlobServed(AuditEvent):
    event: ClassVar[str] = "blob_served"
    peer_agent_id: str | None
    peer_address: str
    blob_id: str
    bytes: int
    via: str


@dataclass(frozen=True)
class PeerBanned(AuditEvent):
    event: ClassVar[str] = "peer_banned"
    peer_address: str
    reason: str
    by: str
    blob_id: str | None = None


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """Every file it opens (the first, and each after a rotation) is created 0600."""

    def _open(self) -> io.TextIOWrapper:
        stream = open(  # the handler owns and closes it
            self.baseFilename,
            self.mode,
            encoding=self.encoding,
            errors=self.errors,
            opener=lambda path, flags: os.open(path, flags, 0o600),
        )
        assert isinstance(stream, io.TextIOWrapper)  # a text mode ("a")
        return stream


class AuditLog:
    """Appends audit events to `path` (None: a log that writes nothing)."""

    def __init__(
        self, path: Path | None, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS
    ) -> None:
        self.path = path
        self._handler: logging.Handler | None = None
        # A logger of its own, not registered with `logging` (no global state): it has
        # no parent, so nothing reaches the agent's own log or stderr.
        self._log = logging.Logger("hfswarm.audit")
        self._log.propagate = False
        self._log.setLevel(logging.INFO)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = _PrivateRotatingHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            os.chmod(path, 0o600)  # one made by an older run, or by hand
        except OSError as exc:
            raise LocalError(
                f"cannot open the audit log {path}: {exc.strerror}",
                hint="pick a writable --audit-log PATH (or --no-audit)",
            ) from exc
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._log.addHandler(handler)
        self._handler = handler

    def write(self, event: AuditEvent) -> None:
        if self._handler is None:
            return
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = json.dumps({"ts": now, **event.to_json()}, separators=(",", ":"))
        self._log.info(line)

    def close(self) -> None:
        if self._handler is not None:
            self._log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
