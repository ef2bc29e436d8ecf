"""The BitTorrent HTTP tracker protocol (BEP 3, 7, 23, 52): parse an announce, bencode
the answer. Pure functions: no sockets, no state (the swarms live in `tracker.registry`).

What libtorrent 2.1.1 sends for a v2-only torrent (measured, see tests/test_tracker.py):

    GET /announce?info_hash=<20 bytes, %-escaped>&peer_id=<20 bytes>&port=N&uploaded=0
        &downloaded=0&left=N&corrupt=0&key=HEX&event=started&numwant=200&compact=1
        &no_peer_id=1&supportcrypto=1&redundant=0

``info_hash`` is the v2 SHA-256 info-hash TRUNCATED to its first 20 bytes (BEP 52);
a hybrid torrent would announce twice, once per hash. Swarms are therefore keyed by
those 20 bytes. The query has to be read raw: its values are arbitrary bytes, and a
framework that decodes the query as UTF-8 mangles them.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from tracker.bencode import bencode
from tracker.errors import TrackerError

EVENTS = frozenset({"", "started", "completed", "stopped", "paused"})  # paused: BEP 21
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DIGITS = re.compile(r"[0-9]{1,20}")
_MAX_QUERY = 4096  # a real announce is ~250 characters
_PORT = struct.Struct(">H")


class BadAnnounce(TrackerError):
    """An announce the tracker cannot use; its message becomes the ``failure reason``."""

    exit_code = 3


@dataclass(frozen=True)
class BtAnnounce:
    info_hash: bytes  # 20 bytes as sent: a v1 info-hash or a truncated v2 one
    peer_id: bytes
    ip: str  # normalised: an IPv4-mapped IPv6 address becomes IPv4
    port: int
    event: str
    seed: bool  # left=0, or event=completed
    numwant: int | None  # None: not asked; the registry applies its default


def v2_tracker_key(info_hash_hex: str) -> bytes:
    """The swarm key of a v2 torrent: its 64-hex SHA-256 info-hash cut to 20 bytes, as
    BitTorrent v2 clients send it to trackers (BEP 52)."""
    raw = bytes.fromhex(info_hash_hex)
    if len(raw) != 32:
        raise ValueError(f"a v2 info-hash is 64 hex digits, got {len(info_hash_hex)}")
    return raw[:20]


def normalise_ip(text: str) -> str:
    """A remote address as peers should see it (``::ffff:10.0.0.5`` -> ``10.0.0.5``)."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _number(params: dict[str, bytes], name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    text = raw.decode("ascii", "replace")
    if not _DIGITS.fullmatch(text):
        raise BadAnnounce(f"{name}={text[:30]!r} is not a non-negative integer")
    return int(text)


def parse_announce(raw_query: str, remote_ip: str) -> BtAnnounce:
    """One announce from the raw (still %-escaped) query string. Raises `BadAnnounce`."""
    if len(raw_query) > _MAX_QUERY:
        raise BadAnnounce(f"announce query of {len(raw_query)} characters is too long")
    if _BAD_ESCAPE.search(raw_query):
        raise BadAnnounce("announce query has a malformed %-escape")
    params: dict[str, bytes] = {}
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        # A literal "+" stays "+": BitTorrent clients %-escape every reserved byte, and
        # reading "+" as a space (HTML forms) would corrupt a binary info_hash.
        key = unquote_to_bytes(name).decode("ascii", "replace")
        if key in params:
            raise BadAnnounce(f"announce repeats the parameter {key[:30]!r}")
        params[key] = unquote_to_bytes(value)

    info_hash = params.get("info_hash")
    if info_hash is None:
        raise BadAnnounce("announce without info_hash")
    if len(info_hash) == 32:
        raise BadAnnounce(
            "info_hash has 32 bytes; announce a v2 torrent with its info-hash truncated "
            "to 20 bytes (BEP 52)"
        )
    if len(info_hash) != 20:
        raise BadAnnounce(f"info_hash has {len(info_hash)} bytes, expected 20")
    peer_id = params.get("peer_id")
    if peer_id is None or len(peer_id) != 20:
        raise BadAnnounce("announce without a 20-byte peer_id")
    port = _number(params, "port")
    if port is None or not 1 <= port <= 65535:
        raise BadAnnounce("announce without a port in 1..65535")
    event = params.get("event", b"").decode("ascii", "replace")
    if event not in EVENTS:
        raise BadAnnounce(f"unknown event {event[:30]!r}")
    compact = params.get("compact")
    if compact is not None and compact != b"1":
        # BEP 23 lets a tracker answer only compact lists; every current client asks.
        raise BadAnnounce("this tracker only sends compact peer lists; announce with compact=1")
    left = _number(params, "left")
    numwant = _number(params, "numwant")

    # ``ip=`` is ignored: the peer is listed at the address its request came from. A
    # tracker hands the address to every peer of the swarm, so honouring ip= would let
    # anyone point a swarm at a third host (or list itself under another's address).
    # opentracker does the same by default (ip= only with WANT_IP_FROM_QUERY_STRING).
    try:
        ip = normalise_ip(remote_ip)
    except ValueError:
        raise BadAnnounce(f"cannot tell the peer's address from {remote_ip[:40]!r}") from None
    return BtAnnounce(
        info_hash=info_hash,
        peer_id=peer_id,
        ip=ip,
        port=port,
        event=event,
        seed=left == 0 or event == "completed",
        numwant=numwant,
    )


def compact_peer(ip: str, port: int) -> bytes:
    """BEP 23 / BEP 7 compact form: 4 (IPv4) or 16 (IPv6) address bytes + 2 port bytes."""
    return ipaddress.ip_address(ip).packed + _PORT.pack(port)


def encode_answer(
    peers: Iterable[bytes],
    *,
    interval: int,
    complete: int,
    incomplete: int,
    warning: str | None = None,
) -> bytes:
    """A successful announce answer; ``peers`` are `compact_peer` values (v4 and v6 are
    split into ``peers`` and ``peers6`` by their length)."""
    listed = list(peers)
    v4 = [p for p in listed if len(p) == 6]
    v6 = [p for p in listed if len(p) == 18]
    answer: dict[str, int | bytes | str] = {
        "interval": interval,
        "complete": complete,
        "incomplete": incomplete,
        "peers": b"".join(v4),
    }
    if v6:
        answer["peers6"] = b"".join(v6)
    if warning:
        answer["warning message"] = warning
    return bencode(answer)


def encode_failure(reason: str) -> bytes:
    return bencode({"failure reason": reason})
