"""A cluster's credentials, made with the `cryptography` package.

    DIR/ca.key        the CA's Ed25519 private key (0600; keep it off the members)
    DIR/ca.pem        the CA's self-signed certificate (public)
    DIR/crl.pem       the CA-signed revocation list (public; copy it to every member)
    DIR/members.json  who was enrolled: name -> agent id, serial, not-after (public)

A member's file (`enroll --out FILE`, 0600) is a small TOML header followed by PEM
blocks: the member's private key, its certificate, the CA's certificate. OpenSSL skips
the header, so the same file is the key and certificate chain of the TLS contexts.

    name = "gpu-01"
    agent_id = "<32 hex>"       # sha256(the member key's SubjectPublicKeyInfo)[:16]
    crl = "/etc/hfswarm/crl.pem"
    share = "public"            # or "cluster": private/gated blobs between members
    -----BEGIN PRIVATE KEY----- ...

The agent id is derived from the public key, so a certificate names the id its holder
must use everywhere (peer API health, tracker registrations, mDNS): ids cannot be taken.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peer.errors import ConfigError

SHARE_MODES = ("public", "cluster")
CA_YEARS = 10
MEMBER_DAYS = 365
CRL_DAYS = 3650  # a member keeps working with the last CRL it has; rotation is explicit
_PEM_START = "-----BEGIN "


def agent_id_of_key(public_key: ed25519.Ed25519PublicKey) -> str:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()[:32]


def agent_id_of_cert(cert: x509.Certificate) -> str:
    """The agent id a certificate binds (of its public key); "" for a non-Ed25519 key."""
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return ""
    return agent_id_of_key(key)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 from the start (never readable by others, not even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def check_private_file(path: Path, what: str) -> bytes:
    """The bytes of a file holding a private key, refused if group or others may read
    or write it (the fix in the message)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} {path}: {exc.strerror}", hint="check the path"
        ) from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"{what} {path} is accessible to group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); it holds a private key",
            hint=f"run: chmod 600 {path}",
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} {path}: {exc.strerror}", hint="check its owner"
        ) from None


# --- the CA ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterDir:
    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def members(self) -> Path:
        return self.root / "members.json"

    def init(self, name: str) -> str:
        """A new CA (refuses to overwrite one); its certificate's sha256 fingerprint."""
        if self.ca_key.exists():
            raise ConfigError(
                f"{self.ca_key} exists already",
                hint="use another DIR, or remove the old cluster first",
            )
        self.root.mkdir(parents=True, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hfswarm cluster {name}")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, None)
        )
        _write_private(
            self.ca_key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write_public(self.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
        _write_public(self.members, b"{}\n")
        self._write_crl(key, cert, [])
        return cert.fingerprint(hashes.SHA256()).hex()

    def _load_ca(self) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
        raw = check_private_file(self.ca_key, "the cluster CA key")
        key = serialization.load_pem_private_key(raw, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{self.ca_key} is not an Ed25519 key", hint="run cluster init")
        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the CA certificate {self.ca_cert}: {exc}", hint="run cluster init"
            ) from None
        return key, cert

    def _members(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.members.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def enroll(
        self, name: str, out: Path, *, share: str = "public", crl: Path | None = None
    ) -> str:
        """Issue one member's credentials into `out` (0600); its agent id."""
        if share not in SHARE_MODES:
            raise ConfigError(f"share must be one of {SHARE_MODES}, not {share!r}")
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(
                f"bad member name {name!r}", hint="letters, digits, - and _ (at most 64)"
            )
        ca_key, ca_cert = self._load_ca()
        key = ed25519.Ed25519PrivateKey.generate()
        agent_id = agent_id_of_key(key.public_key())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                        x509.NameAttribute(NameOID.SERIAL_NUMBER, agent_id),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=MEMBER_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # libtorrent's SSL torrents want the torrent's name or "*" here.
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("*")]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, None)
        )
        crl_path = (crl or self.crl).resolve()
        header = (
            "# hfswarm cluster member credentials: private key inside, keep this file 0600\n"
            f"name = {json.dumps(name)}\n"
            f'agent_id = "{agent_id}"\n'
            f"crl = {json.dumps(str(crl_path))}\n"
            f'share = "{share}"\n'
        )
        pem = (
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + cert.public_bytes(serialization.Encoding.PEM)
            + ca_cert.public_bytes(serialization.Encoding.PEM)
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_private(out, header.encode() + pem)
        members = self._members()
        members[name] = {
            "agent_id": agent_id,
            "serial": str(cert.serial_number),
            "not_after": cert.not_valid_after_utc.isoformat(),
        }
        _write_public(self.members, json.dumps(members, indent=1).encode() + b"\n")
        return agent_id

    def revoke(self, *, name: str | None = None, agent_id: str | None = None) -> list[str]:
        """Add every certificate of that member (by name or id) to the CRL; the ids revoked."""
        ca_key, ca_cert = self._load_ca()
        members = self._members()
        hits = [
            (n, m)
            for n, m in members.items()
            if (name is not None and n == name)
            or (agent_id is not None and m.get("agent_id") == agent_id)
        ]
        if not hits:
            raise ConfigError(
                f"no enrolled member {name or agent_id!r} in {self.members}",
                hint="see members.json for names and ids",
            )
        revoked = self._revoked_serials()
        for _, m in hits:
            revoked.add(int(str(m["serial"])))
        self._write_crl(ca_key, ca_cert, sorted(revoked))
        return [str(m["agent_id"]) for _, m in hits]

    def _revoked_serials(self) -> set[int]:
        try:
            crl = x509.load_pem_x509_crl(self.crl.read_bytes())
        except (OSError, ValueError):
            return set()
        return {r.serial_number for r in crl}

    def _write_crl(
        self, key: ed25519.Ed25519PrivateKey, cert: x509.Certificate, serials: list[int]
    ) -> None:
        now = _now()
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(cert.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=CRL_DAYS))
        )
        for s in serials:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build()
            )
        _write_public(self.crl, b.sign(key, None).public_bytes(serialization.Encoding.PEM))


# --- a member -------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One member's credentials, read once at agent start."""

    path: Path  # the file (key + cert chain for the TLS contexts)
    name: str
    agent_id: str
    share: str
    crl: Path
    key: ed25519.Ed25519PrivateKey
    cert: x509.Certificate
    ca: x509.Certificate

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def ca_pem(self) -> str:
        return self.ca.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def load_member(path: Path) -> Member:
    """Read and check a member file: 0600, a key matching a CA-signed certificate, the
    agent id of that key. Every problem is one `ConfigError` with its fix."""
    raw = check_private_file(path, "the cluster credentials file")
    text = raw.decode("utf-8", errors="replace")
    head, _, _ = text.partition(_PEM_START)
    try:
        meta = tomllib.loads(head)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: bad header: {exc}", hint="enroll again") from None
    share = meta.get("share", "public")
    if share not in SHARE_MODES:
        raise ConfigError(f"{path}: share must be 'public' or 'cluster', not {share!r}")
    crl = meta.get("crl")
    if not isinstance(crl, str) or not crl:
        raise ConfigError(f"{path}: no crl path", hint='add a line crl = "/path/to/crl.pem"')
    crl_path = (path.parent / crl).resolve()
    try:
        key = serialization.load_pem_private_key(raw, password=None)
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise ConfigError(
            f"{path}: cannot read its PEM blocks: {exc}", hint="enroll again"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey) or len(certs) < 2:
        raise ConfigError(
            f"{path} must hold an Ed25519 key, the member certificate and the CA certificate",
            hint="enroll again with hfswarm cluster enroll",
        )
    cert, ca = certs[0], certs[-1]
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"{path}: the member certificate is not signed by the CA in the file",
            hint="enroll again",
        ) from None
    agent_id = agent_id_of_key(key.public_key())
    if agent_id_of_cert(cert) != agent_id:
        raise ConfigError(f"{path}: the key does not match the certificate", hint="enroll again")
    if cert.not_valid_after_utc < _now():
        raise ConfigError(
            f"{path}: the member certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            hint="enroll the machine again (see docs/CLUSTER.md, rotation)",
        )
    if not crl_path.is_file():
        raise ConfigError(
            f"the revocation list {crl_path} named in {path} does not exist",
            hint="copy the cluster's crl.pem there",
        )
    return Member(
        path=path,
        name=str(meta.get("name", "")),
        agent_id=agent_id,
        share=share,
        crl=crl_path,
        key=key,
        cert=cert,
        ca=ca,
    )
