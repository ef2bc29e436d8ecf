"""Which TLS version and cipher suite the servers on loopback pick: every ServerHello
seen on `lo` for SECONDS, read off the wire with a packet socket (root; Linux), one
line per handshake (source port, version, suite), then a count per (port, suite).

    python benchmarks/tls_suites.py 60 &
    python benchmarks/cluster_loopback.py --size 256MiB --runs 1

Run it next to a cluster-mode benchmark: the agents' peer API (Python's ssl) and
libtorrent's SSL torrents (its own static OpenSSL) each show up under their port.
Only the handshake's cleartext header is parsed; nothing is decrypted or stored.
"""

from __future__ import annotations

import collections
import socket
import struct
import sys
import time

ETH_P_ALL = 3
SUITES = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
}


def server_hello(segment: bytes) -> tuple[str, str] | None:
    """(version, suite) of a TCP payload that starts with a TLS ServerHello."""
    if len(segment) < 44 or segment[0] != 0x16 or segment[5] != 0x02:
        return None
    at = 5 + 4 + 2 + 32  # record header, handshake header, legacy version, random
    at += 1 + segment[at]  # session id
    if len(segment) < at + 3:
        return None
    suite = struct.unpack("!H", segment[at : at + 2])[0]
    version = "TLS 1.2"
    ext, i = segment[at + 3 :], 2  # compression method, then the extensions' length
    while i + 4 <= len(ext):
        kind, size = struct.unpack("!HH", ext[i : i + 4])
        if kind == 43 and ext[i + 4 : i + 6] == b"\x03\x04":  # supported_versions
            version = "TLS 1.3"
        i += 4 + size
    return version, SUITES.get(suite, hex(suite))


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
    sock.bind(("lo", 0))
    sock.settimeout(0.5)
    seen: collections.Counter[tuple[int, str, str]] = collections.Counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            # lo hands each packet over twice (outgoing, incoming): count the incoming
            frame, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if addr[2] == socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        if ip[9] != 6:  # TCP
            continue
        tcp = ip[(ip[0] & 15) * 4 :]
        hello = server_hello(tcp[(tcp[12] >> 4) * 4 :])
        if hello is not None:
            port = struct.unpack("!H", tcp[:2])[0]
            print(f"port {port}: {hello[0]} {hello[1]}", flush=True)
            seen[(port, *hello)] += 1
    for (port, version, suite), n in sorted(seen.items()):
        print(f"{n:5d} x  port {port}: {version} {suite}")


if __name__ == "__main__":
    main()
