"""Signed announcements of cluster mode: what a member signs, and what a tracker (or an
agent reading mDNS records) checks. Imports nothing from `peer`, so the tracker still
deploys alone; `peer` signs with the same helpers.

A signed message carries ``signed_at`` (Unix time), ``cert`` (the member's certificate,
DER) and ``signature`` (Ed25519 over `CONTEXT` + the message's own encoding with an
empty signature). It is accepted when the certificate was issued by the cluster CA, is
valid now and not on the CA-signed CRL, binds the agent id the message names (the id is
sha256 of the certificate's public key, first 16 bytes), ``signed_at`` is within `SKEW`
seconds of now, and the signature verifies. Replays within the window are possible:
they repeat what the member said (the peer API's mutual TLS still decides who is a peer).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

log = logging.getLogger(__name__)

SKEW = 300.0  # seconds a signed_at may be off (clocks of a LAN, NTP or not)
MAX_CERT = 2048  # a member certificate is about 400 bytes of DER
SIGNATURE = 64  # Ed25519


class Signer(Protocol):
    """A member's key: its certificate (DER) and signatures with its private key."""

    @property
    def cert_der(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def agent_id_of(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return ""
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()[:32]


def signed_bytes(context: bytes, encoded_without_signature: bytes) -> bytes:
    return context + b"\0" + encoded_without_signature


def signed_at_ok(v: Any) -> float:
    """A schema check for ``signed_at``: a finite, non-negative float."""
    from tracker.schema import Invalid

    if type(v) is not float or not math.isfinite(v) or v < 0:
        raise Invalid("signed_at must be a non-negative float")
    return v


@dataclass
class Membership:
    """The cluster as a verifier sees it: the CA certificate and (optionally) the CRL,
    re-read when its file changes (one whose signature fails is ignored, the last good
    list kept)."""

    ca: x509.Certificate
    crl_path: Path | None = None
    _revoked: frozenset[int] = frozenset()
    _stamp: tuple[int, int] | None = None

    @classmethod
    def load(cls, ca_path: Path, crl_path: Path | None = None) -> Membership:
        """Raises ValueError (unreadable, not a certificate) or OSError."""
        m = cls(x509.load_pem_x509_certificate(ca_path.read_bytes()), crl_path)
        m.refresh()
        return m

    def refresh(self) -> None:
        if self.crl_path is None:
            return
        try:
            st = os.stat(self.crl_path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("revocation list %s unreadable (%s); keeping the last", self.crl_path, exc)
            return
        self._stamp = stamp
        ca_key = self.ca.public_key()
        if crl.issuer != self.ca.subject or not (
            isinstance(ca_key, ed25519.Ed25519PublicKey) and crl.is_signature_valid(ca_key)
        ):
            log.warning(
                "revocation list %s is not signed by the cluster CA; ignored", self.crl_path
            )
            return
        self._revoked = frozenset(r.serial_number for r in crl)

    def member(self, cert_der: bytes, now: float) -> tuple[str, str]:
        """(agent id, "") for a valid member certificate, ("", why not) otherwise."""
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            return "", "the certificate is not one of this cluster's"
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            return "", "the certificate is expired or not yet valid"
        self.refresh()
        if cert.serial_number in self._revoked:
            return "", "the certificate is revoked"
        agent_id = agent_id_of(cert)
        return (agent_id, "") if agent_id else ("", "the certificate's key is not Ed25519")

    def verify(
        self,
        *,
        agent_id: str,
        cert_der: bytes,
        signed_at: float,
        signature: bytes,
        signed: bytes,
        now: float,
    ) -> str:
        """ "" when a member signed `signed` as `agent_id` recently; else why not."""
        if not cert_der or not signature:
            return "unsigned"
        if abs(now - signed_at) > SKEW:
            return f"signed {now - signed_at:+.0f} s off (more than {SKEW:.0f} s: check clocks)"
        member, why = self.member(cert_der, now)
        if not member:
            return why
        if member != agent_id:
            return "the certificate is another agent's"
        cert = x509.load_der_x509_certificate(cert_der)
        key = cert.public_key()
        assert isinstance(key, ed25519.Ed25519PublicKey)
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            return "bad signature"
        return ""
