"""Every message hfswarm agents send each other, and its msgpack encoding.

Each message is a frozen dataclass with a ``version`` field. On the wire it is one
msgpack map: ``{"type": <tag>, "version": 1, <field>: <value>, ...}``, bytes as msgpack
``bin``, text as ``str``; a list of messages nests the same maps.

`decode` treats its input as hostile (it comes from a peer): it enforces a total size,
per-string/bin/array/map limits inside the msgpack parser itself (so a small message
cannot claim a huge allocation), exact types (``True`` is not an int, a ``str`` is not
``bytes``), exact key sets (a field added later comes with a new version, it is never
silently ignored), id formats and value ranges. Anything wrong raises `WireError`, a
`PeerMisbehaved`: the caller drops the message and may ban the sender. A message of a
version this agent does not speak raises `UnsupportedVersion` (also a `WireError`).

`encode` runs the same checks on our own messages and raises ``ValueError`` (a bug on
our side, never the peer's fault).

Semantic checks that need libtorrent (does the torrent hash to ``info_hash``?) live in
`peer.manifests.check_manifest`, not here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

import msgpack

from peer.errors import PeerMisbehaved

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
MAX_AGENT_ID_CHARS = 128
MAX_REVISION_FILES = 4096  # per RevisionManifest (the parser's array limit)
MAX_PATH_BYTES = 255  # a file path in a revision, UTF-8 (the parser's string limit: 256)
MAX_TIMESTAMP_MS = 1 << 53  # published_at: milliseconds since the Unix epoch
MAX_BLOB_SIZE = 1 << 50  # 1 PiB: far above any model file, far below int64 overflow
MIN_PIECE_SIZE = 16 * 1024  # BitTorrent v2 block size
MAX_PIECE_SIZE = 1 << 30
_MAX_STR = 256  # longest text field on the wire (agent ids, tags), with margin
_MAX_MAP = 16  # most keys in any message map

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_AGENT_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:@-]{{0,{MAX_AGENT_ID_CHARS - 1}}}")
_REPO_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_REPO_NAME}/)?{_REPO_NAME}")
# Branch and tag names, refs/pr/N, commit ids: what becomes refs/<revision> in the cache.
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+/-]{0,199}")
REPO_TYPES = ("model", "dataset", "space")


class WireError(PeerMisbehaved):
    """A peer sent a message that breaks the protocol."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or "the message was dropped; the peer may be banned")


class UnsupportedVersion(WireError):
    """A message of a protocol version this agent does not speak."""


class _Invalid(Exception):
    """One failed check; `decode` turns it into WireError, `encode` into ValueError."""


# --- field checkers ----------------------------------------------------------------------

Check = Callable[[Any], Any]


def _exact_int(lo: int, hi: int) -> Check:
    def check(v: Any) -> int:
        if type(v) is not int:  # bool is an int subclass; floats are not ints
            raise _Invalid(f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise _Invalid(f"{v} is outside {lo}..{hi}")
        return v

    return check


def _power_of_two(lo: int, hi: int) -> Check:
    base = _exact_int(lo, hi)

    def check(v: Any) -> int:
        v = base(v)
        if v & (v - 1):
            raise _Invalid(f"{v} is not a power of two")
        return v

    return check


def _bytes(max_len: int, *, min_len: int = 0) -> Check:
    def check(v: Any) -> bytes:
        if type(v) is not bytes:
            raise _Invalid(f"expected bytes, got {type(v).__name__}")
        if not min_len <= len(v) <= max_len:
            raise _Invalid(f"{len(v)} bytes is outside {min_len}..{max_len}")
        return v

    return check


def _text(pattern: re.Pattern[str], what: str) -> Check:
    def check(v: Any) -> str:
        if type(v) is not str:
            raise _Invalid(f"expected {what}, got {type(v).__name__}")
        if not pattern.fullmatch(v):
            raise _Invalid(f"{v[:80]!r} is not {what}")
        return v

    return check


def _blob_id(v: Any) -> str:
    if type(v) is not str or not (_SHA256.fullmatch(v) or _SHA1.fullmatch(v)):
        shown = repr(v[:80]) if isinstance(v, str) else type(v).__name__
        raise _Invalid(f"{shown} is not a blob id (64 or 40 lowercase hex)")
    return v


_sha256_hex = _text(_SHA256, "a sha256 hex digest (64 lowercase hex)")
_agent_id = _text(_AGENT_ID, "an agent id")


def _list_of(item: Check, max_items: int, *, unique: bool = False) -> Check:
    def check(v: Any) -> tuple[Any, ...]:
        if type(v) not in (list, tuple):
            raise _Invalid(f"expected a list, got {type(v).__name__}")
        if len(v) > max_items:
            raise _Invalid(f"{len(v)} items is more than {max_items}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _Invalid as e:
                raise _Invalid(f"item {i}: {e}") from None
        if unique and len(set(out)) != len(out):
            raise _Invalid("duplicate items")
        return tuple(out)

    return check


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Message:
    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[Mapping[str, Check]] = {}

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


@dataclass(frozen=True, kw_only=True)
class Claim(Message):
    """The peer wants a blob nobody holds yet and stands in the herd election for who
    fetches it from the mirror (`peer.scheduling.herd`). ``leading``: it is that fetcher
    now, ``done`` bytes so far (followers watch it advance to see the leader is alive)."""

    TYPE: ClassVar[str] = "claim"

    blob_id: str
    size: int
    leading: bool = False
    done: int = 0


@dataclass(frozen=True, kw_only=True)
class Health(Message):
    """Liveness and capacity of an agent (``bt_port`` 0: not seeding)."""

    TYPE: ClassVar[str] = "health"

    agent_id: str
    bt_port: int
    blobs: int


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


M = TypeVar("M", bound=Message)


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Invalid(f"expected true or false, got {type(v).__name__}")
    return v


def _nested(kind: type[M]) -> Check:
    def check(v: Any) -> M:
        if type(v) is not dict:
            raise _Invalid(f"expected a {kind.TYPE} map, got {type(v).__name__}")
        msg = _from_map(v)
        if not isinstance(msg, kind):
            raise _Invalid(f"expected a {kind.TYPE}, got a {msg.TYPE}")
        return msg

    return check


def _nested_manifest(v: Any) -> Manifest:
    if type(v) is not dict:
        raise _Invalid(f"expected a manifest map, got {type(v).__name__}")
    msg = _from_map(v)
    if not isinstance(msg, Manifest):
        raise _Invalid(f"expected a manifest, got a {msg.TYPE}")
    return msg


Manifest.SCHEMA = {
    "blob_id": _blob_id,
    "size": _exact_int(1, MAX_BLOB_SIZE),
    "piece_size": _power_of_two(MIN_PIECE_SIZE, MAX_PIECE_SIZE),
    "info_hash": _sha256_hex,
    "torrent": _bytes(MAX_TORRENT_BYTES, min_len=1),
    "made_by": _agent_id,
    "signature": _bytes(MAX_SIGNATURE_BYTES),
}
HaveRequest.SCHEMA = {"blob_ids": _list_of(_blob_id, MAX_BLOB_IDS, unique=True)}
HaveResponse.SCHEMA = {
    "manifests": _list_of(_nested_manifest, MAX_MANIFESTS),
    "fetching": _list_of(_nested_manifest, MAX_MANIFESTS),
    "claims": _list_of(_nested(Claim), MAX_BLOB_IDS),
}
Claim.SCHEMA = {
    "blob_id": _blob_id,
    "size": _exact_int(0, MAX_BLOB_SIZE),
    "leading": _bool,
    "done": _exact_int(0, MAX_BLOB_SIZE),
}
Health.SCHEMA = {
    "agent_id": _agent_id,
    "bt_port": _exact_int(0, 65535),
    "blobs": _exact_int(0, 1 << 40),
}


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(v: Any) -> str:
        if type(v) is not str or v not in choices:
            shown = repr(v[:40]) if isinstance(v, str) else type(v).__name__
            raise _Invalid(f"{shown} is not one of {', '.join(choices)}")
        return v

    return check


def _repo_id(v: Any) -> str:
    v = _text(_REPO_ID, "a repo id (org/name or name)")(v)
    if ".." in v or "--" in v:
        raise _Invalid(f"{v!r} is not a repo id ('..' and '--' are not allowed)")
    return v


def _revision(v: Any) -> str:
    v = _text(_REVISION, "a revision name")(v)
    if ".." in v or "//" in v or v.endswith("/"):
        raise _Invalid(f"{v[:80]!r} is not a revision name")
    return v


def _repo_path(v: Any) -> str:
    """A relative POSIX path that stays inside its snapshot folder."""
    if type(v) is not str:
        raise _Invalid(f"expected a path, got {type(v).__name__}")
    try:
        size = len(v.encode("utf-8"))
    except UnicodeEncodeError:
        raise _Invalid(f"{v[:80]!r} is not valid UTF-8") from None
    if not 1 <= size <= MAX_PATH_BYTES:
        raise _Invalid(f"a path of {size} bytes is outside 1..{MAX_PATH_BYTES}")
    if "\0" in v or "\\" in v or any(p in ("", ".", "..") for p in v.split("/")):
        raise _Invalid(f"{v[:80]!r} is not a safe relative path")
    return v


def _revision_files(v: Any) -> tuple[RevisionFile, ...]:
    files: tuple[RevisionFile, ...] = _list_of(_nested(RevisionFile), MAX_REVISION_FILES)(v)
    paths = [f.path for f in files]
    if paths != sorted(paths) or len(set(paths)) != len(paths):
        raise _Invalid("the files are not sorted by path, or a path repeats")
    return files


RevisionRequest.SCHEMA = {
    "repo_type": _one_of(REPO_TYPES),
    "repo_id": _repo_id,
    "revision": _revision,
}
RevisionFile.SCHEMA = {
    "path": _repo_path,
    "blob_id": _blob_id,
    "size": _exact_int(0, MAX_BLOB_SIZE),
}
RevisionManifest.SCHEMA = {
    "repo_type": _one_of(REPO_TYPES),
    "repo_id": _repo_id,
    "revision": _revision,
    "commit": _text(_SHA1, "a commit id (40 lowercase hex)"),
    "files": _revision_files,
    "made_by": _agent_id,
    "published_at": _exact_int(0, MAX_TIMESTAMP_MS),
    "signature": _bytes(MAX_SIGNATURE_BYTES),
}

MESSAGE_TYPES: Mapping[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Manifest,
        HaveRequest,
        HaveResponse,
        Claim,
        Health,
        RevisionRequest,
        RevisionFile,
        RevisionManifest,
    )
}


# --- decoding -------------------------------------------------------------------------------


def _from_map(obj: dict[Any, Any]) -> Message:
    tag = obj.get("type")
    cls = MESSAGE_TYPES.get(tag) if type(tag) is str else None
    if cls is None:
        raise _Invalid(f"unknown message type {str(tag)[:40]!r}")
    version = obj.get("version")
    if type(version) is not int:
        raise _Invalid(f"{cls.TYPE}: the version is missing or not an integer")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"a peer sent a version {version} {cls.TYPE}; this agent speaks version "
            f"{', '.join(map(str, sorted(SUPPORTED_VERSIONS)))}",
            hint="run the same hfswarm version on every machine (upgrade the older one)",
        )
    expected = {"type", "version", *cls.SCHEMA}
    # Fields with a default may be absent: an older agent does not send what it lacks.
    required = {"type", "version", *(f.name for f in fields(cls) if _is_required(f))}
    if not required <= set(obj) <= expected:
        missing = sorted(required - set(obj))
        extra = sorted(str(k)[:40] for k in set(obj) - expected)
        raise _Invalid(f"{cls.TYPE}: missing fields {missing}, unexpected fields {extra}")
    values = {}
    for name, check in cls.SCHEMA.items():
        if name not in obj:
            continue
        try:
            values[name] = check(obj[name])
        except _Invalid as e:
            raise _Invalid(f"{cls.TYPE}.{name}: {e}") from None
    return cls(version=version, **values)


def _is_required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def decode(data: bytes) -> Message:
    """Parse one message from a peer. Raises `WireError` for anything malformed."""
    if type(data) is not bytes:
        raise TypeError(f"decode() takes bytes, not {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"a peer sent a {len(data)}-byte message; the limit is {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=_MAX_STR,
            max_bin_len=MAX_TORRENT_BYTES,
            max_array_len=max(MAX_BLOB_IDS, MAX_MANIFESTS),
            max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        # ExtraData, FormatError, StackError, limits (ValueError), bad UTF-8
        # (UnicodeDecodeError is a ValueError), unhashable keys (TypeError).
        raise WireError(f"a peer sent a malformed message: {type(e).__name__}: {e}") from e
    if type(obj) is not dict:
        raise WireError(f"a peer sent a {type(obj).__name__} where a message map belongs")
    try:
        return _from_map(obj)
    except _Invalid as e:
        raise WireError(f"a peer sent an invalid message: {e}") from None


def decode_as(data: bytes, kind: type[M]) -> M:
    """`decode`, insisting on one message type."""
    msg = decode(data)
    if not isinstance(msg, kind):
        raise WireError(f"a peer sent a {msg.TYPE} where a {kind.TYPE} was expected")
    return msg


# --- encoding -------------------------------------------------------------------------------


def _to_map(msg: Message) -> dict[str, Any]:
    cls = type(msg)
    if MESSAGE_TYPES.get(cls.TYPE) is not cls:
        raise ValueError(f"{cls.__name__} is not a wire message")
    if msg.version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot encode a version {msg.version} {cls.TYPE}")
    out: dict[str, Any] = {"type": cls.TYPE, "version": msg.version}
    for f in fields(msg):
        if f.name == "version":
            continue
        value = getattr(msg, f.name)
        try:
            cls.SCHEMA[f.name](_plain(value))
        except _Invalid as e:
            raise ValueError(f"refusing to send an invalid {cls.TYPE}.{f.name}: {e}") from None
        out[f.name] = _encodable(value)
    return out


def _plain(value: Any) -> Any:
    """What the checkers see: nested messages as maps, as after a decode."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Message):
        return _to_map(value)
    return value


def _encodable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_encodable(v) for v in value]
    if isinstance(value, Message):
        return _to_map(value)
    return value


def encode(msg: Message) -> bytes:
    """msgpack bytes of one of our messages. Raises ``ValueError`` if it is invalid."""
    data: bytes = msgpack.packb(_to_map(msg), use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"a {msg.TYPE} of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit; "
            "split it into several messages"
        )
    return data


def manifest_signing_bytes(m: Manifest) -> bytes:
    """The bytes a manifest signature covers: its encoding with an empty signature.
    Deterministic (fixed field order, canonical msgpack)."""
    return encode(replace(m, signature=b""))


def revision_signing_bytes(m: RevisionManifest) -> bytes:
    """The bytes a revision manifest's signature covers: its encoding with an empty
    signature (deterministic, like `manifest_signing_bytes`)."""
    return encode(replace(m, signature=b""))
