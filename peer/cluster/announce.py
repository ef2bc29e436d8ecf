"""Signed mDNS records of cluster mode.

A member's TXT record adds ``t`` (Unix time of signing), ``s`` (Ed25519 signature,
base64) and ``c0``..``cN`` (its certificate, DER in base64 in chunks: one TXT string
holds at most 255 bytes). The signature covers the agent id, the BitTorrent port, the
peer API port (the SRV port) and ``t``. The agent signs its record again every
`peer.discovery.mdns.RESIGN_EVERY` s, so a live record stays within
`tracker.signing.SKEW`.
Receivers check it with `check_txt` (the same rules as the tracker: the cluster's CA,
not revoked, the id of the key, recent, a valid signature).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from peer.cluster.credentials import Member
from tracker.signing import Membership, signed_bytes

_CHUNK = 200
_MAX_CHUNKS = 12  # 2400 base64 chars: above tracker.signing.MAX_CERT bytes of DER
CONTEXT = b"hfswarm-mdns"


def _content(agent_id: str, bt_port: int, api_port: int, t: int) -> bytes:
    return signed_bytes(CONTEXT, f"{agent_id}|{bt_port}|{api_port}|{t}".encode())


def signed_txt(member: Member, bt_port: int, api_port: int, now: float) -> dict[str, str]:
    """The cluster part of a member's TXT record (added to the open-mode keys)."""
    t = int(now)
    sig = member.sign(_content(member.agent_id, bt_port, api_port, t))
    cert = base64.b64encode(member.cert_der).decode()
    out = {"t": str(t), "s": base64.b64encode(sig).decode()}
    for i in range(0, len(cert), _CHUNK):
        out[f"c{i // _CHUNK}"] = cert[i : i + _CHUNK]
    return out


def check_txt(
    membership: Membership,
    properties: Mapping[bytes, bytes | None],
    agent_id: str,
    bt_port: int,
    api_port: int,
    now: float,
) -> str:
    """ "" if a member signed this record recently; otherwise why it is ignored."""
    raw_t, raw_s = properties.get(b"t"), properties.get(b"s")
    if raw_t is None or raw_s is None or b"c0" not in properties:
        return "unsigned"
    if not raw_t.isdigit() or len(raw_t) > 12:
        return "bad t"
    parts: list[bytes] = []
    for i in range(_MAX_CHUNKS):
        part = properties.get(f"c{i}".encode())
        if part is None:
            break
        parts.append(part)
    try:
        cert = base64.b64decode(b"".join(parts), validate=True)
        sig = base64.b64decode(raw_s, validate=True)
    except (binascii.Error, ValueError):
        return "bad base64"
    t = int(raw_t)
    return membership.verify(
        agent_id=agent_id,
        cert_der=cert,
        signed_at=float(t),
        signature=sig,
        signed=_content(agent_id, bt_port, api_port, t),
        now=now,
    )
