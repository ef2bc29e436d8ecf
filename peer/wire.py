"""Every message hfswarm agents send each other, and its msgpack encoding.

Each message is a frozen dataclass with a ``version`` field. On the wire it is one
msgpack map: ``{"type": <tag>, "version": 1, <field>: <value>, ...}``, bytes as msgpack
``bin``, text as ``str``; a list of messages nests the same maps.

The schema checker is the project's shared one (`tracker.schema`, also behind the
tracker's messages). `decode` treats its input as hostile (it comes from a peer): a total
size, per-string/bin/array/map limits inside the msgpack parser, exact types, exact key
sets (a field with a default may be absent: an older agent does not send what it
lacks; any other field is refused, never silently ignored), id formats and value ranges.
Anything wrong raises `WireError`, a `PeerMisbehaved`: the caller drops the message and
may ban the sender. A message of a version this agent does not speak raises
`UnsupportedVersion` (also a `WireError`).

`encode` runs the same checks on our own messages and raises ``ValueError`` (a bug on
our side, never the peer's fault).

Semantic checks that need libtorrent (does the torrent hash to ``info_hash``?) live in
`peer.manifests.check_manifest`, not here.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

from peer.errors import PeerMisbehaved
from peer.hub.protocol import REPO_TYPES
from tracker import schema
from tracker.schema import Invalid

WIRE_VERSION = 1
SUPPORTED_VERSIONS = frozenset({WIRE_VERSION})

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_TORRENT_BYTES = 4 * 1024 * 1024
MAX_SIGNATURE_BYTES = 1024
MAX_BLOB_IDS = 4096  # per HaveRequest (the parser's bound)
# Ids a peer answers per HaveRequest (more: HTTP 413, ask in batches): 64 manifests held
# plus 64 being fetched, torrents of 128 KiB at most under the piece-size rule, always fit
# one message, and MAX_MANIFESTS never binds.
MAX_HAVE_IDS = 64
MAX_MANIFESTS = 256  # per HaveResponse (the total size limit usually binds first)
MAX_REVISION_FILES = 4096  # per RevisionManifest (the parser's array limit)
MAX_PATH_BYTES = 255  # a file path in a revision, UTF-8 (the parser's string limit: 256)
MAX_TIMESTAMP_MS = 1 << 53  # published_at: milliseconds since the Unix epoch
MAX_BLOB_SIZE = 1 << 50  # 1 PiB: far above any model file, far below int64 overflow
# A herd leader's fetch attempts after the first (a refetch after a hash mismatch): the
# election believes only a few (`HerdConfig.max_restarts`); the wire bounds the number.
MAX_CLAIM_ATTEMPT = 255
MIN_PIECE_SIZE = 16 * 1024  # BitTorrent v2 block size
MAX_PIECE_SIZE = 1 << 30
_MAX_STR = 256  # longest text field on the wire (agent ids, tags), with margin
_MAX_MAP = 16  # most keys in any message map

_REPO_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_REPO_NAME}/)?{_REPO_NAME}")
# Branch and tag names, refs/pr/N, commit ids: what becomes refs/<revision> in the cache.
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+/-]{0,199}")


class WireError(PeerMisbehaved):
    """A peer sent a message that breaks the protocol."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or "the message was dropped; the peer may be banned")


class UnsupportedVersion(WireError):
    """A message of a protocol version this agent does not speak."""


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Message(schema.Message):
    VERSIONS: ClassVar[frozenset[int]] = SUPPORTED_VERSIONS

    version: int = WIRE_VERSION


@dataclass(frozen=True, kw_only=True)
class Manifest(Message):
    """The piece map of one blob: who made it and the torrent that names its swarm.

    ``torrent`` is the deterministic single-file v2 torrent whose file is named
    ``blob_id``; ``info_hash`` is its v2 info-hash. ``signature`` covers
    `manifest_signing_bytes` (empty until cluster signing lands)."""

    TYPE: ClassVar[str] = "manifest"

    blob_id: str
    size: int
    piece_size: int
    info_hash: str
    torrent: bytes
    made_by: str
    signature: bytes = b""


@dataclass(frozen=True, kw_only=True)
class HaveRequest(Message):
    """ "Which of these blobs do you have?" (answered by `HaveResponse`)."""

    TYPE: ClassVar[str] = "have_request"

    blob_ids: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class HaveResponse(Message):
    """The manifests of the requested blobs the peer has and will share, and of those
    it is fetching right now (its swarm serves the pieces it has verified so far)."""

    TYPE: ClassVar[str] = "have_response"

    manifests: tuple[Manifest, ...]
    fetching: tuple[Manifest, ...] = ()
    claims: tuple[Claim, ...] = ()
    # For blobs in ``fetching``: which blobs the peer deals their feeders over. Left
    # out while empty (an older agent decodes an answer that has none).
    deals: tuple[Deal, ...] = ()
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"deals"})


# A /v1/have asked with this query parameter gets the answerer's `Deal`s: an older
# agent ignores the parameter (and answers none), an older asker does not send it (its
# decoder refuses an unknown field, and with it every offer of the answer).
DEALS_QUERY = ("deals", "1")


@dataclass(frozen=True, kw_only=True)
class Deal(Message):
    """A downloader of ``blob_id`` deals its feeders over the blobs whose sorted ids
    hash to ``over`` (`peer.scheduling.feeders.deal_over`): members that say the same
    list deal alike; any difference, and each ranks the blob's feeders per blob alone."""

    TYPE: ClassVar[str] = "deal"

    blob_id: str
    over: str


@dataclass(frozen=True, kw_only=True)
class Claim(Message):
    """The peer wants a blob nobody holds yet and stands in the herd election for who
    fetches it from the mirror (`peer.scheduling.herd`). ``leading``: it is that fetcher
    now, ``done`` bytes so far (followers watch it advance to see the leader is alive);
    ``attempt``: how often its fetch started over from byte 0 (a hash mismatch), so an
    honest restart's ``done`` going back is not taken for a lie. Left out while 0: an
    older agent, which does not know the field, still decodes the claim."""

    TYPE: ClassVar[str] = "claim"
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"attempt"})

    blob_id: str
    size: int
    leading: bool = False
    done: int = 0
    attempt: int = 0


@dataclass(frozen=True, kw_only=True)
class Health(Message):
    """Liveness and capacity of an agent (``bt_port`` 0: not seeding)."""

    TYPE: ClassVar[str] = "health"

    agent_id: str
    bt_port: int
    blobs: int
    # Cluster mode: the port of its member blob stream (`peer.serving.member_stream`);
    # 0: none (open mode, or an older agent). Left out while 0: older agents decode it.
    stream_port: int = 0
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"stream_port"})


@dataclass(frozen=True, kw_only=True)
class StreamRequest(Message):
    """Cluster mode, on the member blob stream: "send me this verified blob from byte
    ``start`` to its end" (answered by a `StreamAnswer`, then the bytes)."""

    TYPE: ClassVar[str] = "stream_request"

    blob_id: str
    start: int


@dataclass(frozen=True, kw_only=True)
class StreamAnswer(Message):
    """``status``: "ok" (``size`` is the whole blob's; bytes ``start``.. follow), "busy"
    (every stream slot taken: swarm it), "absent" (not held, or not shared)."""

    TYPE: ClassVar[str] = "stream_answer"

    status: str
    size: int = 0


@dataclass(frozen=True, kw_only=True)
class RevisionRequest(Message):
    """ "Which commit and files does this revision of this repo name, as you know it?"
    (answered by a `RevisionManifest`, or HTTP 404). ``revision``: a branch, tag,
    ``refs/pr/N`` or a commit id."""

    TYPE: ClassVar[str] = "revision_request"

    repo_type: str
    repo_id: str
    revision: str


@dataclass(frozen=True, kw_only=True)
class RevisionFile(Message):
    """One file of a revision: its path in the repo, its blob id (sha256 for LFS files,
    git blob sha1 otherwise; the name of its blob in the HF cache) and its size."""

    TYPE: ClassVar[str] = "revision_file"

    path: str
    blob_id: str
    size: int


@dataclass(frozen=True, kw_only=True)
class RevisionManifest(Message):
    """What one revision of a repo holds, as an agent knows it: from the mirror (it
    downloaded that revision) or from a publish (``local/*`` repos, whose commit is
    derived from the files: `peer.manifests.revisions.content_commit`).

    ``published_at`` (ms since the Unix epoch, the maker's clock) with ``made_by``
    breaks ties: of two manifests for one revision name, the one with the larger
    ``(published_at, made_by)`` is newer. Files are sorted by path, paths unique.
    ``signature`` covers `revision_signing_bytes` (empty until cluster signing lands).
    Received ones are checked in `peer.manifests.revisions.accept_revision_manifest`."""

    TYPE: ClassVar[str] = "revision_manifest"

    repo_type: str
    repo_id: str
    revision: str
    commit: str
    files: tuple[RevisionFile, ...]
    made_by: str
    published_at: int
    signature: bytes = b""


def _deals(v: Any) -> tuple[Deal, ...]:
    deals: tuple[Deal, ...] = schema.list_of(schema.nested(Deal), MAX_MANIFESTS)(v)
    if len({d.blob_id for d in deals}) != len(deals):
        raise Invalid("a blob's deal is said twice")
    return deals


Manifest.SCHEMA = {
    "blob_id": schema.blob_id,
    "size": schema.integer(1, MAX_BLOB_SIZE),
    "piece_size": schema.power_of_two(MIN_PIECE_SIZE, MAX_PIECE_SIZE),
    "info_hash": schema.sha256_hex,
    "torrent": schema.binary(MAX_TORRENT_BYTES, min_len=1),
    "made_by": schema.agent_id,
    "signature": schema.binary(MAX_SIGNATURE_BYTES),
}
HaveRequest.SCHEMA = {"blob_ids": schema.list_of(schema.blob_id, MAX_BLOB_IDS, unique=True)}
HaveResponse.SCHEMA = {
    "manifests": schema.list_of(schema.nested(Manifest), MAX_MANIFESTS),
    "fetching": schema.list_of(schema.nested(Manifest), MAX_MANIFESTS),
    "claims": schema.list_of(schema.nested(Claim), MAX_BLOB_IDS),
    "deals": _deals,
}
Deal.SCHEMA = {"blob_id": schema.blob_id, "over": schema.sha256_hex}
Claim.SCHEMA = {
    "blob_id": schema.blob_id,
    "size": schema.integer(0, MAX_BLOB_SIZE),
    "leading": schema.boolean,
    "done": schema.integer(0, MAX_BLOB_SIZE),
    "attempt": schema.integer(0, MAX_CLAIM_ATTEMPT),
}
Health.SCHEMA = {
    "agent_id": schema.agent_id,
    "bt_port": schema.integer(0, 65535),
    "blobs": schema.integer(0, 1 << 40),
    "stream_port": schema.integer(0, 65535),
}
StreamRequest.SCHEMA = {
    "blob_id": schema.blob_id,
    "start": schema.integer(0, MAX_BLOB_SIZE),
}
STREAM_STATUSES = ("ok", "busy", "absent")
StreamAnswer.SCHEMA = {
    "status": schema.one_of(STREAM_STATUSES),
    "size": schema.integer(0, MAX_BLOB_SIZE),
}


def _repo_id(v: Any) -> str:
    v = schema.matching(_REPO_ID, "a repo id (org/name or name)")(v)
    if ".." in v or "--" in v:
        raise Invalid(f"{v!r} is not a repo id ('..' and '--' are not allowed)")
    return v


def _revision(v: Any) -> str:
    v = schema.matching(_REVISION, "a revision name")(v)
    if ".." in v or "//" in v or v.endswith("/"):
        raise Invalid(f"{v[:80]!r} is not a revision name")
    return v


def _repo_path(v: Any) -> str:
    """A relative POSIX path that stays inside its snapshot folder."""
    if type(v) is not str:
        raise Invalid(f"expected a path, got {type(v).__name__}")
    try:
        size = len(v.encode("utf-8"))
    except UnicodeEncodeError:
        raise Invalid(f"{v[:80]!r} is not valid UTF-8") from None
    if not 1 <= size <= MAX_PATH_BYTES:
        raise Invalid(f"a path of {size} bytes is outside 1..{MAX_PATH_BYTES}")
    if "\0" in v or "\\" in v or any(p in ("", ".", "..") for p in v.split("/")):
        raise Invalid(f"{v[:80]!r} is not a safe relative path")
    return v


def _revision_files(v: Any) -> tuple[RevisionFile, ...]:
    files: tuple[RevisionFile, ...] = schema.list_of(
        schema.nested(RevisionFile), MAX_REVISION_FILES
    )(v)
    paths = [f.path for f in files]
    if paths != sorted(paths) or len(set(paths)) != len(paths):
        raise Invalid("the files are not sorted by path, or a path repeats")
    return files


RevisionRequest.SCHEMA = {
    "repo_type": schema.one_of(REPO_TYPES),
    "repo_id": _repo_id,
    "revision": _revision,
}
RevisionFile.SCHEMA = {
    "path": _repo_path,
    "blob_id": schema.blob_id,
    "size": schema.integer(0, MAX_BLOB_SIZE),
}
RevisionManifest.SCHEMA = {
    "repo_type": schema.one_of(REPO_TYPES),
    "repo_id": _repo_id,
    "revision": _revision,
    "commit": schema.matching(schema.SHA1_RE, "a commit id (40 lowercase hex)"),
    "files": _revision_files,
    "made_by": schema.agent_id,
    "published_at": schema.integer(0, MAX_TIMESTAMP_MS),
    "signature": schema.binary(MAX_SIGNATURE_BYTES),
}

MESSAGE_TYPES: Mapping[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Manifest,
        HaveRequest,
        HaveResponse,
        Claim,
        Deal,
        Health,
        StreamRequest,
        StreamAnswer,
        RevisionRequest,
        RevisionFile,
        RevisionManifest,
    )
}


# --- decoding and encoding ------------------------------------------------------------------

_CODEC = schema.Codec(
    "wire",
    MESSAGE_TYPES.values(),
    schema.Limits(
        max_str=_MAX_STR,
        max_bin=MAX_TORRENT_BYTES,
        max_array=max(MAX_BLOB_IDS, MAX_MANIFESTS),
        max_map=_MAX_MAP,
    ),
)
M = TypeVar("M", bound=Message)


def decode(data: bytes) -> Message:
    """Parse one message from a peer. Raises `WireError` for anything malformed."""
    return decode_as(data, Message)


def decode_as(data: bytes, kind: type[M]) -> M:
    """`decode`, insisting on one message type."""
    try:
        return _CODEC.decode_as(data, kind, max_bytes=MAX_MESSAGE_BYTES)
    except schema.UnknownVersion as e:
        raise UnsupportedVersion(
            f"from a peer: {e}",
            hint="run the same hfswarm version on every machine (upgrade the older one)",
        ) from None
    except schema.SchemaError as e:
        raise WireError(f"from a peer: {e}") from e.__cause__


def encode(msg: Message) -> bytes:
    """msgpack bytes of one of our messages. Raises ``ValueError`` if it is invalid."""
    return _CODEC.encode(msg, max_bytes=MAX_MESSAGE_BYTES)


# The member blob stream frames its two small messages: a 4-byte big-endian length, then
# the msgpack message; the blob's bytes follow the answer raw.
FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 4096


def encode_frame(msg: Message) -> bytes:
    data = encode(msg)
    return FRAME_HEADER.pack(len(data)) + data


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """`n` bytes off a blocking socket (a frame's part); `ConnectionError` if the peer
    closes first."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"the peer closed the stream after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def read_frame(recv_exactly: Callable[[int], bytes], kind: type[M]) -> M:
    """One framed message of type `kind`; `recv_exactly(n)` returns n bytes or raises.
    A length over `MAX_FRAME_BYTES` is refused before anything more is read."""
    (length,) = FRAME_HEADER.unpack(recv_exactly(FRAME_HEADER.size))
    if not 0 < length <= MAX_FRAME_BYTES:
        raise WireError(f"from a peer: a frame of {length} bytes (at most {MAX_FRAME_BYTES})")
    return decode_as(recv_exactly(length), kind)


def manifest_signing_bytes(m: Manifest) -> bytes:
    """The bytes a manifest signature covers: its encoding with an empty signature.
    Deterministic (fixed field order, canonical msgpack)."""
    return encode(replace(m, signature=b""))


def revision_signing_bytes(m: RevisionManifest) -> bytes:
    """The bytes a revision manifest's signature covers: its encoding with an empty
    signature (deterministic, like `manifest_signing_bytes`)."""
    return encode(replace(m, signature=b""))
