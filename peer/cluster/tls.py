"""TLS between cluster members: the contexts, the revocation list, the peer check.

Both sides present their member certificate and require one issued by the cluster CA
(TLS 1.3 only; Ed25519). Revocation is checked in Python after the handshake
(`Cluster.admits`): the CRL file is re-read when it changes (its signature checked
against the CA: a CRL the CA did not sign is ignored and the last good one kept), and
a connection whose certificate's serial is on it is closed. Host names are not checked:
members are known by their certificate's agent id, not by address.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from cryptography import x509

from peer.cluster.credentials import Member, agent_id_of_cert

log = logging.getLogger(__name__)

# RFC 7919 ffdhe2048 (public, well known; `openssl genpkey -genparam -algorithm DH
# -pkeyopt dh_param:ffdhe2048`): libtorrent's SSL torrents want a DH parameter file.
FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass
class RevocationList:
    """The CA-signed CRL at `member.crl`, re-read when its mtime/size change."""

    member: Member
    _serials: frozenset[int] = frozenset()
    _stamp: tuple[int, int] | None = None
    _loaded: bool = field(default=False)

    def revoked(self, serial: int) -> bool:
        self.refresh()
        return serial in self._serials

    def refresh(self) -> None:
        try:
            st = os.stat(self.member.crl)
        except OSError as exc:
            if self._loaded:
                return  # keep the last good list
            raise OSError(f"cannot read the revocation list {self.member.crl}: {exc}") from exc
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            crl = x509.load_pem_x509_crl(self.member.crl.read_bytes())
            ok = crl.issuer == self.member.ca.subject and crl.is_signature_valid(
                self.member.ca.public_key()  # type: ignore[arg-type]
            )
        except (OSError, ValueError) as exc:
            log.warning(
                "revocation list %s unreadable (%s); keeping the last one", self.member.crl, exc
            )
            return
        if not ok:
            log.warning(
                "revocation list %s is not signed by the cluster CA; ignored", self.member.crl
            )
            self._stamp = stamp
            return
        self._serials = frozenset(r.serial_number for r in crl)
        self._stamp = stamp
        if self._loaded:
            log.info("revocation list reloaded: %d certificate(s) revoked", len(self._serials))
        self._loaded = True


@dataclass(frozen=True)
class PeerCert:
    agent_id: str
    serial: int
    name: str


def peer_cert(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCert | None:
    """The verified peer certificate of a TLS connection, or None."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
    except ValueError:
        return None
    return PeerCert(agent_id_of_cert(cert), cert.serial_number, name)


class Cluster:
    """A member's view of its cluster: TLS contexts, the CRL, who is admitted."""

    def __init__(
        self, member: Member, on_revoked: Callable[[str, PeerCert], None] | None = None
    ) -> None:
        self.member = member
        # A revoked member seen at an address (the agent bans it in its swarm).
        self._on_revoked = on_revoked
        self.crl = RevocationList(member)
        self.crl.refresh()  # a missing CRL at start is an error (fail closed)

    @property
    def agent_id(self) -> str:
        return self.member.agent_id

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.create_default_context(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        # Only the cluster CA: never the system's roots.
        ctx.load_verify_locations(cadata=self.member.ca_pem)
        ctx.load_cert_chain(self.member.path, self.member.path)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.SERVER_AUTH)

    def admits(self, cert: PeerCert | None, host: str = "") -> bool:
        """A member in good standing (not revoked; an Ed25519 key, so it has an id). A
        revoked one seen at `host` is reported to `on_revoked` (the agent bans that
        address in its swarm: libtorrent checks the CA, not our CRL)."""
        if cert is None or not cert.agent_id:
            return False
        if self.crl.revoked(cert.serial):
            if host and self._on_revoked is not None:
                self._on_revoked(host, cert)
            return False
        return True


class MemberConnector(aiohttp.TCPConnector):
    """aiohttp's connector over mutual TLS that checks, for every request (a pooled
    connection included), that the server's certificate is not revoked, and remembers
    the agent id it binds per address (`member_at`), so callers can compare it with the
    id the peer claims. A small answer releases its connection before the caller sees
    it: this is the one place the certificate is still at hand."""

    def __init__(self, cluster: Cluster, **kw: Any) -> None:
        super().__init__(ssl=cluster.client_context(), **kw)
        self.cluster = cluster
        self.member_at: dict[tuple[str, int], str] = {}

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's own signature)
    ) -> Connection:
        conn = await super().connect(req, traces, timeout)
        transport = conn.transport
        cert = peer_cert(transport.get_extra_info("ssl_object") if transport else None)
        if not self.cluster.admits(cert, str(req.url.host)):
            conn.close()
            raise aiohttp.ClientConnectionError(
                f"{req.url.host}:{req.url.port} has no valid member certificate (revoked?)"
            )
        assert cert is not None
        self.member_at[(str(req.url.host), int(req.url.port or 0))] = cert.agent_id
        return conn
