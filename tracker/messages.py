"""The tracker's agent-index messages (``/v1/...``) and their msgpack encoding.

Same conventions as `peer.wire`: each message is a frozen dataclass with a ``version``
field; on the wire it is one msgpack map ``{"type": <tag>, "version": 1, <field>: ...}``;
a list of messages nests the same maps.

    POST /v1/register  Register       -> Registered      (also the heartbeat)
    POST /v1/announce  Announce       -> Announced       (409 Problem "register_first")
    POST /v1/who       Who            -> WhoAnswer       (BlobSources of AgentAddress)
    GET  /v1/health                   -> TrackerHealth
    any error                         -> Problem         (code + message)

The schema checker is `tracker.schema`, the project's shared one (`peer.wire` uses it
too, so the agent-id and blob-id formats are the same on both protocols). `decode`
treats its input as hostile (a server decodes what any LAN host sent; a client decodes
what a possibly wrong server sent): a total size, per-string/array/map limits inside the
msgpack parser, exact types, exact key sets (a field that has a default may be absent,
so messages of older peers that lack a newer optional field still decode, and `encode`
leaves an ``OMIT_IF_DEFAULT`` field out while it holds its default, so older peers still
decode ours), id formats and ranges. Anything wrong raises `TrackerWireError`; an
unknown version raises `UnsupportedVersion` (also a `TrackerWireError`). `encode` runs
the same checks on our own messages and raises ``ValueError`` (our bug, not the peer's).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

from tracker import schema, signing
from tracker.errors import TrackerWireError, UnsupportedVersion
from tracker.schema import Invalid

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
MAX_HOST_CHARS = 253  # longest DNS name
MAX_PROBLEM_CHARS = 1_000
MAX_SECONDS = 86_400.0
_MAX_STR = 1_024  # longest text field (problem messages); ids and hosts are far shorter
_MAX_MAP = 16

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
        "not_a_member",  # cluster mode: unsigned, stale, or not a member's signature (403)
    }
)


# --- field checkers of this protocol alone (the shared ones: `tracker.schema`) ------------


def _seconds(v: Any) -> float:
    if type(v) is not float:
        raise Invalid(f"expected seconds as a float, got {type(v).__name__}")
    if not (math.isfinite(v) and 0 < v <= MAX_SECONDS):
        raise Invalid(f"{v} is outside (0, {MAX_SECONDS}] seconds")
    return v


def check_host(v: Any) -> str:
    """An address another agent can connect to: an IP literal or a DNS name, never the
    unspecified address (0.0.0.0, ::) nor a multicast one. Raises ValueError."""
    try:
        return _host(v)
    except Invalid as e:
        raise ValueError(str(e)) from None


def _host(v: Any) -> str:
    if type(v) is not str or not 0 < len(v) <= MAX_HOST_CHARS:
        raise Invalid(f"expected a host name or IP address, got {type(v).__name__}")
    if _IPV4.fullmatch(v):
        # The common case, ~10x cheaper than ipaddress (a who answer lists hundreds).
        if v == "0.0.0.0" or 224 <= int(v.split(".", 1)[0]) <= 239:
            raise Invalid(f"{v!r} is not an address a peer can connect to")
        return v
    try:
        ip = ipaddress.ip_address(v)
    except ValueError:
        if not _DNS_NAME.fullmatch(v):
            raise Invalid(f"{v[:80]!r} is neither an IP address nor a host name") from None
        return v
    if ip.is_unspecified or ip.is_multicast:
        raise Invalid(f"{v!r} is not an address a peer can connect to")
    return v


def _host_or_empty(v: Any) -> str:
    # "" in a Register: "use the address you see me at" (the usual case on a LAN).
    return v if v == "" else _host(v)


def _problem_code(v: Any) -> str:
    if type(v) is not str or v not in PROBLEM_CODES:
        raise Invalid(f"unknown problem code {str(v)[:40]!r}")
    return v


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Message(schema.Message):
    VERSIONS: ClassVar[frozenset[int]] = SUPPORTED_VERSIONS

    version: int = VERSION


@dataclass(frozen=True, kw_only=True)
class Register(Message):
    """Register or heartbeat. ``host`` "" means: record the address this request came
    from (a LAN agent often cannot tell which of its addresses others can reach).
    ``bt_port`` 0: the agent does not seed."""

    TYPE: ClassVar[str] = "register"
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset(
        {"held", "fetching", "signed_at", "cert", "signature"}
    )

    agent_id: str
    api_port: int
    bt_port: int
    host: str = ""
    # The counts of the agent's last accepted `Announced` (-1: not told, e.g. an older
    # agent, or none yet). Other counts at the tracker mean it forgot something: it
    # answers ``new`` and the agent announces everything again.
    held: int = -1
    fetching: int = -1
    # Cluster mode (`tracker.signing`): when, by which member certificate, signature.
    signed_at: float = 0.0
    cert: bytes = b""
    signature: bytes = b""


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
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"signed_at", "cert", "signature"})

    agent_id: str
    held: tuple[str, ...]
    fetching: tuple[str, ...] = ()
    signed_at: float = 0.0
    cert: bytes = b""
    signature: bytes = b""

    def cross_check(self) -> None:
        if set(self.held) & set(self.fetching):
            raise Invalid("announce: a blob cannot be both held and fetching")


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

    def cross_check(self) -> None:
        if self.holders_total < len(self.holders) or self.fetchers_total < len(self.fetchers):
            raise Invalid("blob_sources: a total is smaller than the list it counts")


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


_port = schema.integer(1, 65535)
_SIGNED = {
    "signed_at": signing.signed_at_ok,
    "cert": schema.binary(signing.MAX_CERT),
    "signature": schema.binary(signing.SIGNATURE),
}
_count = schema.integer(0, 1 << 40)

Register.SCHEMA = {
    "agent_id": schema.agent_id,
    "api_port": _port,
    "bt_port": schema.integer(0, 65535),
    "host": _host_or_empty,
    "held": schema.integer(-1, MAX_HELD),
    "fetching": schema.integer(-1, MAX_FETCHING),
    **_SIGNED,
}
Registered.SCHEMA = {
    "agent_id": schema.agent_id,
    "host": _host,
    "ttl": _seconds,
    "heartbeat": _seconds,
    "new": schema.boolean,
}
Announce.SCHEMA = {
    "agent_id": schema.agent_id,
    "held": schema.list_of(schema.blob_id, MAX_HELD, unique=True),
    "fetching": schema.list_of(schema.blob_id, MAX_FETCHING, unique=True),
    **_SIGNED,
}
Announced.SCHEMA = {
    "held": schema.integer(0, MAX_HELD),
    "fetching": schema.integer(0, MAX_FETCHING),
}
Who.SCHEMA = {"blob_ids": schema.list_of(schema.blob_id, MAX_WHO_BLOBS, unique=True, min_items=1)}
AgentAddress.SCHEMA = {
    "agent_id": schema.agent_id,
    "host": _host,
    "api_port": _port,
    "bt_port": schema.integer(0, 65535),
}
BlobSources.SCHEMA = {
    "blob_id": schema.blob_id,
    "holders": schema.list_of(schema.nested(AgentAddress), MAX_ANSWER_PEERS),
    "fetchers": schema.list_of(schema.nested(AgentAddress), MAX_ANSWER_PEERS),
    "holders_total": _count,
    "fetchers_total": _count,
}
WhoAnswer.SCHEMA = {"blobs": schema.list_of(schema.nested(BlobSources), MAX_WHO_BLOBS)}
TrackerHealth.SCHEMA = {
    "agents": _count,
    "blobs": _count,
    "swarms": _count,
    "bt_peers": _count,
    "ttl": _seconds,
    "announce_interval": schema.integer(1, int(MAX_SECONDS)),
}
Problem.SCHEMA = {"code": _problem_code, "message": schema.text(MAX_PROBLEM_CHARS)}

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

_CODEC = schema.Codec(
    "tracker",
    MESSAGE_TYPES.values(),
    schema.Limits(
        max_str=_MAX_STR,
        max_bin=signing.MAX_CERT,  # a member certificate (cluster mode) is the largest
        max_array=max(MAX_HELD, MAX_WHO_BLOBS, MAX_ANSWER_PEERS),
        max_map=_MAX_MAP,
    ),
)
M = TypeVar("M", bound=Message)


def decode(data: bytes, *, max_bytes: int = MAX_REQUEST_BYTES) -> Message:
    """Parse one message. Raises `TrackerWireError` for anything malformed."""
    return decode_as(data, Message, max_bytes=max_bytes)


def decode_as(data: bytes, kind: type[M], *, max_bytes: int = MAX_REQUEST_BYTES) -> M:
    """`decode`, insisting on one message type."""
    try:
        return _CODEC.decode_as(data, kind, max_bytes=max_bytes)
    except schema.UnknownVersion as e:
        raise UnsupportedVersion(
            str(e), hint="run the same hfswarm version on the tracker and the agents"
        ) from None
    except schema.SchemaError as e:
        raise TrackerWireError(str(e)) from e.__cause__


def encode(msg: Message, *, max_bytes: int = MAX_RESPONSE_BYTES) -> bytes:
    """msgpack bytes of one of our messages. Raises ``ValueError`` if it is invalid."""
    return _CODEC.encode(msg, max_bytes=max_bytes)


# --- cluster mode: signed registrations and announces (`tracker.signing`) ---------------

Signed = TypeVar("Signed", Register, Announce)


def _to_sign(msg: Register | Announce) -> bytes:
    return signing.signed_bytes(
        f"hfswarm-tracker-{msg.TYPE}".encode(), encode(replace(msg, signature=b""))
    )


def sign(msg: Signed, signer: signing.Signer, now: float) -> Signed:
    """`msg` signed by a member at Unix time `now`."""
    unsigned = replace(msg, signed_at=float(now), cert=signer.cert_der, signature=b"")
    return replace(unsigned, signature=signer.sign(_to_sign(unsigned)))


def verify(msg: Register | Announce, membership: signing.Membership, now: float) -> str:
    """ "" if a member of `membership`'s cluster signed `msg` as its agent id, recently;
    otherwise why not (for a log line and the refusal)."""
    return membership.verify(
        agent_id=msg.agent_id,
        cert_der=msg.cert,
        signed_at=msg.signed_at,
        signature=msg.signature,
        signed=_to_sign(msg),
        now=now,
    )
