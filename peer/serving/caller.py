"""Which local user is on the other end of a loopback TCP connection (Linux).

The local API listens on loopback, where every user of the machine can reach it. Most
of its routes are harmless for any of them (a download fetches public bytes into the
agent's cache), but `hfswarm publish PATH` makes the agent READ a folder and share it
on the LAN: the agent must not read for one user what only another may read. So a
publish is allowed only to the agent's own user (or root).

The kernel lists every TCP socket of this network namespace with its owner's uid in
``/proc/net/tcp`` and ``/proc/net/tcp6`` (what identd does): the client's socket is the
one whose local address is the connection's remote end and whose remote address is
ours. Anything that cannot be established (not Linux, not loopback, no entry) is None,
and the caller refuses (fail closed).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path
from typing import Any

_Addr = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]
_ESTABLISHED = "01"


def _normalize(host: str, port: int) -> _Addr | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, port
    return ip, port


def _parse(field: str) -> _Addr | None:
    """``0100007F:1F90`` (IPv4) or 32 hex digits + port (IPv6), as /proc/net/tcp* has
    them: each 32-bit word of the address in host (little-endian) order."""
    hexaddr, _, hexport = field.partition(":")
    try:
        port = int(hexport, 16)
        words = [int(hexaddr[i : i + 8], 16) for i in range(0, len(hexaddr), 8)]
        raw = b"".join(struct.pack("<I", w) for w in words)
        host = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    except (ValueError, OSError, struct.error):
        return None
    return _normalize(host, port)


def uid_of_connection(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid owning the client end of the TCP connection client -> server."""
    want_local, want_remote = _normalize(*client), _normalize(*server)
    if want_local is None or want_remote is None or not want_local[0].is_loopback:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 8 or cols[3] != _ESTABLISHED:
                continue
            if _parse(cols[1]) == want_local and _parse(cols[2]) == want_remote:
                try:
                    return int(cols[7])
                except ValueError:
                    return None
    return None


def caller_uid(transport: Any) -> int | None:
    """The uid of the local process at the other end of an aiohttp request's transport."""
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    sock = transport.get_extra_info("sockname")
    if not peer or not sock:
        return None
    return uid_of_connection((str(peer[0]), int(peer[1])), (str(sock[0]), int(sock[1])))
