"""The tracker's agent-index messages (``/v1/...``) and their msgpack encoding.

Same conventions as `peer.wire`: each message is a frozen dataclass with a ``version``
field; on the wire it is one msgpack map ``{"type": <tag>, "version": 1, <field>: ...}``;
a list of messages nests the same maps.

    POST /v1/register  Register       -> Registered      (also the heartbeat)
    POST /v1/announce  Announce       -> Announced       (409 Problem "register_first")
    POST /v1/who       Who            -> WhoAnswer       (BlobSources of AgentAddress)
    GET  /v1/health                   -> TrackerHealth
    any error                         -> Problem         (code + message)

`decode` treats its input as hostile (a server decodes what any LAN host sent; a client
decodes what a possibly wrong server sent): a total size, per-string/array/map limits
inside the msgpack parser (a small message cannot claim a huge allocation), exact types
(``True`` is not an int, an int is not a float), exact key sets (no unknown field; a
field that has a default may be absent, so messages of older peers that lack a newer
optional field still decode, and `encode` leaves an optional field out while it holds
its default, so older peers still decode ours), id formats and ranges. Anything wrong
raises `TrackerWireError`; an unknown version raises `UnsupportedVersion` (also a
`TrackerWireError`). `encode` runs the same checks on our own messages and raises
``ValueError`` (our bug, not the peer's).

This module does not import `peer`; the agent-id and blob-id formats are the same as in
`peer.wire` (a test checks that they agree).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from tracker.errors import TrackerWireError, UnsupportedVersion

VERSION = 1
SUPPORTED_VERSIONS = frozenset({VERSION})

# Request bounds. An announce carries the whole set of an agent's blobs (a full
# replacement, so a restarted tracker converges in one call): 16384 held ids (about
# 1.1 MB of msgpack) covers a cache of some thousand repos; bigger caches announce their
# most useful blobs. `Who` is bounded so its answer stays a few MB at worst; the client
# splits longer lists.
MAX_HELD = 16_384
MAX_FETCHING = 1_024
MAX_WHO_BLOBS = 512
MAX_ANSWER_PEERS = 32  # holders (and fetchers) listed per blob; totals give the real count
MAX_REQUEST_BYTES = 2 * 1024 * 1024
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_AGENT_ID_CHARS = 128
MAX_HOST_CHARS = 253  # longest DNS name
MAX_PROBLEM_CHARS = 1_000
MAX_SECONDS = 86_400.0
_MAX_STR = 1_024  # longest text field (problem messages); ids and hosts are far shorter
_MAX_MAP = 16

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
AGENT_ID_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:@-]{{0,{MAX_AGENT_ID_CHARS - 1}}}")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")  # no leading zeros, like ipaddress
_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)

PROBLEM_CODES = frozenset(
    {
        "bad_message",  # malformed or invalid body (400)
        "unsupported_version",  # a version this tracker does not speak (400)
        "wrong_content_type",  # not application/msgpack (415)
        "too_large",  # body over MAX_REQUEST_BYTES (413)
        "register_first",  # unknown agent: register again, then announce again (409)
        "full",  # a configured bound is reached (503)
        "agent_id_taken",  # the agent id is bound to another address for now (403)
        "too_slow",  # the body did not arrive in time (408)
    }
)


class _Invalid(Exception):
    """One failed check; `decode` turns it into TrackerWireError, `encode` into ValueError."""


# --- field checkers ----------------------------------------------------------------------

Check = Callable[[Any], Any]


def _int(lo: int, hi: int) -> Check:
    def check(v: Any) -> int:
        if type(v) is not int:  # bool is an int subclass; floats are not ints
            raise _Invalid(f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise _Invalid(f"{v} is outside {lo}..{hi}")
        return v

    return check


def _seconds(v: Any) -> float:
    if type(v) is not float:
        raise _Invalid(f"expected seconds as a float, got {type(v).__name__}")
    if not (math.isfinite(v) and 0 < v <= MAX_SECONDS):
        raise _Invalid(f"{v} is outside (0, {MAX_SECONDS}] seconds")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Invalid(f"expected a boolean, got {type(v).__name__}")
    return v


def _agent_id(v: Any) -> str:
    if type(v) is not str or not AGENT_ID_PATTERN.fullmatch(v):
        shown = repr(v[:80]) if isinstance(v, str) else type(v).__name__
        raise _Invalid(f"{shown} is not an agent id")
    return v


def _blob_id(v: Any) -> str:
    if type(v) is not str or not (_SHA256.fullmatch(v) or _SHA1.fullmatch(v)):
        shown = repr(v[:80]) if isinstance(v, str) else type(v).__name__
        raise _Invalid(f"{shown} is not a blob id (64 or 40 lowercase hex)")
    return v


def check_host(v: Any) -> str:
    """An address another agent can connect to: an IP literal or a DNS name, never the
    unspecified address (0.0.0.0, ::) nor a multicast one. Raises ValueError."""
    try:
        return _host(v)
    except _Invalid as e:
        raise ValueError(str(e)) from None


def _host(v: Any) -> str:
    if type(v) is not str or not 0 < len(v) <= MAX_HOST_CHARS:
        raise _Invalid(f"expected a host name or IP address, got {type(v).__name__}")
    if _IPV4.fullmatch(v):
        # The common case, ~10x cheaper than ipaddress (a who answer lists hundreds).
        if v == "0.0.0.0" or 224 <= int(v.split(".", 1)[0]) <= 239:
            raise _Invalid(f"{v!r} is not an address a peer can connect to")
        return v
    try:
        ip = ipaddress.ip_address(v)
    except ValueError:
        if not _DNS_NAME.fullmatch(v):
            raise _Invalid(f"{v[:80]!r} is neither an IP address nor a host name") from None
        return v
    if ip.is_unspecified or ip.is_multicast:
        raise _Invalid(f"{v!r} is not an address a peer can connect to")
    return v


def _host_or_empty(v: Any) -> str:
    # "" in a Register: "use the address you see me at" (the usual case on a LAN).
    return v if v == "" else _host(v)


def _problem_code(v: Any) -> str:
    if type(v) is not str or v not in PROBLEM_CODES:
        raise _Invalid(f"unknown problem code {str(v)[:40]!r}")
    return v


def _text(max_chars: int) -> Check:
    def check(v: Any) -> str:
        if type(v) is not str:
            raise _Invalid(f"expected text, got {type(v).__name__}")
        if len(v) > max_chars:
            raise _Invalid(f"{len(v)} characters is more than {max_chars}")
        return v

    return check


def _list_of(item: Check, max_items: int, *, unique: bool = False, min_items: int = 0) -> Check:
    def check(v: Any) -> tuple[Any, ...]:
        if type(v) not in (list, tuple):
            raise _Invalid(f"expected a list, got {type(v).__name__}")
        if not min_items <= len(v) <= max_items:
            raise _Invalid(f"{len(v)} items is outside {min_items}..{max_items}")
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
    # Fields added after a message type shipped: left out of the encoding while they hold
    # their default, so a peer that predates them still decodes the message.
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset()

    version: int = VERSION


@dataclass(frozen=True, kw_only=True)
class Register(Message):
    """Register or heartbeat. ``host`` "" means: record the address this request came
    from (a LAN agent often cannot tell which of its addresses others can reach).
    ``bt_port`` 0: the agent does not seed."""

    TYPE: ClassVar[str] = "register"
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"held", "fetching"})

    agent_id: str
    api_port: int
    bt_port: int
    host: str = ""
    # The counts of the agent's last accepted `Announced` (-1: not told, e.g. an older
    # agent, or none yet). Other counts at the tracker mean it forgot something: it
    # answers ``new`` and the agent announces everything again.
    held: int = -1
    fetching: int = -1


@dataclass(frozen=True, kw_only=True)
class Registered(Message):
    """``new`` is True when the tracker had no live record of the agent (first contact,
    expiry, or a tracker restart): the agent must send its `Announce` again now.
    Heartbeat every ``heartbeat`` seconds; the record expires ``ttl`` s after the last."""

    TYPE: ClassVar[str] = "registered"

    agent_id: str
    host: str  # the address recorded (what other agents will be told)
    ttl: float
    heartbeat: float
    new: bool


@dataclass(frozen=True, kw_only=True)
class Announce(Message):
    """The agent's full sets of blobs it holds (verified, offered) and is fetching now;
    each announce replaces the previous one. Also counts as a heartbeat."""

    TYPE: ClassVar[str] = "announce"

    agent_id: str
    held: tuple[str, ...]
    fetching: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Announced(Message):
    TYPE: ClassVar[str] = "announced"

    held: int
    fetching: int


@dataclass(frozen=True, kw_only=True)
class Who(Message):
    """ "Which live agents hold or fetch these blobs?" """

    TYPE: ClassVar[str] = "who"

    blob_ids: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class AgentAddress(Message):
    """Where to reach an agent: its peer API (``host:api_port``) and BitTorrent port."""

    TYPE: ClassVar[str] = "agent"

    agent_id: str
    host: str
    api_port: int
    bt_port: int


@dataclass(frozen=True, kw_only=True)
class BlobSources(Message):
    """Live agents for one blob: at most MAX_ANSWER_PEERS of each kind (a random sample,
    so load spreads over the holders), and how many there are in all."""

    TYPE: ClassVar[str] = "blob_sources"

    blob_id: str
    holders: tuple[AgentAddress, ...]
    fetchers: tuple[AgentAddress, ...]
    holders_total: int
    fetchers_total: int


@dataclass(frozen=True, kw_only=True)
class WhoAnswer(Message):
    """One entry per asked blob that has at least one live holder or fetcher."""

    TYPE: ClassVar[str] = "who_answer"

    blobs: tuple[BlobSources, ...]


@dataclass(frozen=True, kw_only=True)
class TrackerHealth(Message):
    TYPE: ClassVar[str] = "tracker_health"

    agents: int  # live agents
    blobs: int  # blob ids with at least one holder or fetcher
    swarms: int  # BitTorrent info-hashes with at least one peer
    bt_peers: int
    ttl: float
    announce_interval: int


@dataclass(frozen=True, kw_only=True)
class Problem(Message):
    """Any refusal. ``code`` is for programs (see PROBLEM_CODES), ``message`` for people."""

    TYPE: ClassVar[str] = "problem"

    code: str
    message: str


def _nested(kind: type[Message]) -> Check:
    def check(v: Any) -> Message:
        if type(v) is kind:
            return v  # encoding: `_to_map` checks the nested message itself, once
        if type(v) is not dict:
            raise _Invalid(f"expected a {kind.TYPE} map, got {type(v).__name__}")
        msg = _from_map(v)
        if not isinstance(msg, kind):
            raise _Invalid(f"expected a {kind.TYPE}, got a {msg.TYPE}")
        return msg

    return check


_port = _int(1, 65535)
_count = _int(0, 1 << 40)

Register.SCHEMA = {
    "agent_id": _agent_id,
    "api_port": _port,
    "bt_port": _int(0, 65535),
    "host": _host_or_empty,
    "held": _int(-1, MAX_HELD),
    "fetching": _int(-1, MAX_FETCHING),
}
Registered.SCHEMA = {
    "agent_id": _agent_id,
    "host": _host,
    "ttl": _seconds,
    "heartbeat": _seconds,
    "new": _bool,
}
Announce.SCHEMA = {
    "agent_id": _agent_id,
    "held": _list_of(_blob_id, MAX_HELD, unique=True),
    "fetching": _list_of(_blob_id, MAX_FETCHING, unique=True),
}
Announced.SCHEMA = {"held": _int(0, MAX_HELD), "fetching": _int(0, MAX_FETCHING)}
Who.SCHEMA = {"blob_ids": _list_of(_blob_id, MAX_WHO_BLOBS, unique=True, min_items=1)}
AgentAddress.SCHEMA = {
    "agent_id": _agent_id,
    "host": _host,
    "api_port": _port,
    "bt_port": _int(0, 65535),
}
BlobSources.SCHEMA = {
    "blob_id": _blob_id,
    "holders": _list_of(_nested(AgentAddress), MAX_ANSWER_PEERS),
    "fetchers": _list_of(_nested(AgentAddress), MAX_ANSWER_PEERS),
    "holders_total": _count,
    "fetchers_total": _count,
}
WhoAnswer.SCHEMA = {"blobs": _list_of(_nested(BlobSources), MAX_WHO_BLOBS)}
TrackerHealth.SCHEMA = {
    "agents": _count,
    "blobs": _count,
    "swarms": _count,
    "bt_peers": _count,
    "ttl": _seconds,
    "announce_interval": _int(1, int(MAX_SECONDS)),
}
Problem.SCHEMA = {"code": _problem_code, "message": _text(MAX_PROBLEM_CHARS)}

MESSAGE_TYPES: Mapping[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        Registered,
        Announce,
        Announced,
        Who,
        AgentAddress,
        BlobSources,
        WhoAnswer,
        TrackerHealth,
        Problem,
    )
}

# Per message type: the fields that may be absent on the wire (they have a default).
_DEFAULTED: Mapping[type[Message], frozenset[str]] = {
    cls: frozenset(
        f.name
        for f in dataclasses.fields(cls)
        if f.name != "version"
        and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    )
    for cls in MESSAGE_TYPES.values()
}

_FIELD_DEFAULTS: Mapping[tuple[type[Message], str], Any] = {
    (cls, f.name): f.default
    for cls in MESSAGE_TYPES.values()
    for f in dataclasses.fields(cls)
    if f.default is not dataclasses.MISSING
}

M = TypeVar("M", bound=Message)


def _cross_checks(msg: Message) -> None:
    """Rules that span fields (run on decode and on encode)."""
    if isinstance(msg, Announce) and set(msg.held) & set(msg.fetching):
        raise _Invalid("announce: a blob cannot be both held and fetching")
    if isinstance(msg, BlobSources) and (
        msg.holders_total < len(msg.holders) or msg.fetchers_total < len(msg.fetchers)
    ):
        raise _Invalid("blob_sources: a total is smaller than the list it counts")


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
            f"a version {version} {cls.TYPE} arrived; this side speaks tracker protocol "
            f"version {', '.join(map(str, sorted(SUPPORTED_VERSIONS)))}",
            hint="run the same hfswarm version on the tracker and the agents",
        )
    expected = {"type", "version", *cls.SCHEMA}
    missing = sorted(expected - set(obj) - _DEFAULTED[cls])
    extra = sorted(str(k)[:40] for k in set(obj) - expected)
    if missing or extra:
        raise _Invalid(f"{cls.TYPE}: missing fields {missing}, unexpected fields {extra}")
    values = {}
    for name, check in cls.SCHEMA.items():
        if name not in obj:
            continue  # a defaulted field an older peer did not send: the default stands
        try:
            values[name] = check(obj[name])
        except _Invalid as e:
            raise _Invalid(f"{cls.TYPE}.{name}: {e}") from None
    msg = cls(version=version, **values)
    _cross_checks(msg)
    return msg


def decode(data: bytes, *, max_bytes: int = MAX_REQUEST_BYTES) -> Message:
    """Parse one message. Raises `TrackerWireError` for anything malformed."""
    if type(data) is not bytes:
        raise TypeError(f"decode() takes bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise TrackerWireError(f"a {len(data)}-byte message is over the {max_bytes}-byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=_MAX_STR,
            max_bin_len=0,  # no message has a bytes field
            max_array_len=max(MAX_HELD, MAX_WHO_BLOBS, MAX_ANSWER_PEERS),
            max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        # ExtraData, FormatError, StackError, limits (ValueError), bad UTF-8
        # (UnicodeDecodeError is a ValueError), unhashable keys (TypeError).
        raise TrackerWireError(f"not a valid msgpack message: {type(e).__name__}: {e}") from e
    if type(obj) is not dict:
        raise TrackerWireError(f"expected a msgpack map (a message), got a {type(obj).__name__}")
    try:
        return _from_map(obj)
    except _Invalid as e:
        raise TrackerWireError(f"invalid message: {e}") from None


def decode_as(data: bytes, kind: type[M], *, max_bytes: int = MAX_REQUEST_BYTES) -> M:
    """`decode`, insisting on one message type."""
    msg = decode(data, max_bytes=max_bytes)
    if not isinstance(msg, kind):
        raise TrackerWireError(f"expected a {kind.TYPE} message, got a {msg.TYPE}")
    return msg


# --- encoding -------------------------------------------------------------------------------


def _to_map(msg: Message) -> dict[str, Any]:
    cls = type(msg)
    if MESSAGE_TYPES.get(cls.TYPE) is not cls:
        raise ValueError(f"{cls.__name__} is not a tracker message")
    if msg.version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot encode a version {msg.version} {cls.TYPE}")
    out: dict[str, Any] = {"type": cls.TYPE, "version": msg.version}
    for name, check in cls.SCHEMA.items():  # the SCHEMA keys are the fields (a test checks)
        value = getattr(msg, name)
        try:
            check(value)
        except _Invalid as e:
            raise ValueError(f"refusing to send an invalid {cls.TYPE}.{name}: {e}") from None
        if name in cls.OMIT_IF_DEFAULT and value == _FIELD_DEFAULTS[cls, name]:
            continue
        out[name] = _plain(value)
    try:
        _cross_checks(msg)
    except _Invalid as e:
        raise ValueError(f"refusing to send an invalid {cls.TYPE}: {e}") from None
    return out


def _plain(value: Any) -> Any:
    """Nested messages as maps (checked by `_to_map`) and tuples as lists."""
    if isinstance(value, Message):
        return _to_map(value)
    if isinstance(value, tuple | list):
        # Lists are homogeneous (the schema checked them): all messages or all scalars.
        if value and isinstance(value[0], Message):
            return [_to_map(v) for v in value]
        return list(value)
    return value


def encode(msg: Message, *, max_bytes: int = MAX_RESPONSE_BYTES) -> bytes:
    """msgpack bytes of one of our messages. Raises ``ValueError`` if it is invalid."""
    data: bytes = msgpack.packb(_to_map(msg), use_bin_type=True)
    if len(data) > max_bytes:
        raise ValueError(f"a {msg.TYPE} of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    return data
