"""Signatures on manifests (piece maps) and revision manifests.

The `signature` field of `wire.Manifest` / `wire.RevisionManifest` covers
`wire.manifest_signing_bytes` / `wire.revision_signing_bytes` (the message with an
empty signature) and is one of:

    b"C1" + len(cert) (2 bytes, big-endian) + member certificate (DER) + Ed25519 sig
        cluster mode: the signer is the member the certificate names; its agent id (of
        the certificate's key) must be the manifest's ``made_by``
    b"K1" + Ed25519 public key (32 bytes raw) + Ed25519 sig
        open mode: the agent's own key (``<state>/signing_key``), for ``local/*``
        publishes; trusted on first use per name (`KeyPins`)

`Signatures` is an agent's side of it: it signs what the agent makes, and checks what
peers send, raising the error of the check that called it (`InvalidManifest`,
`BadRevisionManifest`). Cluster mode requires a member's signature on every manifest
and revision manifest; open mode requires a signature on ``local/*`` revision
manifests and pins each name to the first key seen for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from dataclasses import replace
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from peer import wire
from peer.errors import ConfigError
from peer.manifests.manifest import InvalidManifest
from peer.manifests.revisions import BadRevisionManifest, is_local_repo
from tracker.signing import Membership

CLUSTER_TAG = b"C1"
KEY_TAG = b"K1"
SIG = 64
MANIFEST_CONTEXT = b"hfswarm-manifest\0"
REVISION_CONTEXT = b"hfswarm-revision\0"


def _raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class _Bad(Exception):
    """Why a signature is refused (turned into the caller's error)."""


def _split(signature: bytes) -> tuple[str, bytes, bytes]:
    """(kind, cert DER or raw key, signature bytes) of a signature field."""
    tag, rest = signature[:2], signature[2:]
    if tag == CLUSTER_TAG and len(rest) >= 2:
        (n,) = struct.unpack(">H", rest[:2])
        if len(rest) == 2 + n + SIG:
            return "cluster", rest[2 : 2 + n], rest[2 + n :]
    if tag == KEY_TAG and len(rest) == 32 + SIG:
        return "key", rest[:32], rest[32:]
    if not signature:
        raise _Bad("unsigned")
    raise _Bad("malformed signature")


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The agent's own Ed25519 key (open mode), made 0600 on first use; one readable by
    group or others is refused with the fix."""
    try:
        st = path.stat()
    except FileNotFoundError:
        key = ed25519.Ed25519PrivateKey.generate()
        raw = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, raw)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return key
    if st.st_mode & 0o077:
        raise ConfigError(
            f"the agent's signing key {path} is accessible to group or others "
            f"(mode {st.st_mode & 0o777:04o})",
            hint=f"run: chmod 600 {path}",
        )
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the agent's signing key {path}: {exc}",
            hint="remove it to make a new one (local/* names this agent published are "
            "then pinned to the old key on other agents)",
        ) from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key", hint="remove it to make a new one")
    return loaded


class KeyPins:
    """Trust on first use for ``local/*`` names: the first key seen for a name is kept
    in ``<state>/pins/<sha256 of type and name>`` (32 bytes, the raw public key)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, repo_type: str, repo_id: str) -> Path:
        return self.root / hashlib.sha256(f"{repo_type}\0{repo_id}".encode()).hexdigest()

    def pinned(self, repo_type: str, repo_id: str) -> bytes | None:
        with contextlib.suppress(OSError):
            raw = self._path(repo_type, repo_id).read_bytes()
            if len(raw) == 32:
                return raw
        return None

    def pin(self, repo_type: str, repo_id: str, key: bytes) -> None:
        path = self._path(repo_type, repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(key)
        os.replace(tmp, path)


class Signatures:
    """One agent's signing and checking (see the module docstring)."""

    def __init__(
        self,
        agent_id: str,
        key: ed25519.Ed25519PrivateKey,
        pins: KeyPins,
        *,
        cert_der: bytes | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.key = key
        self.pins = pins
        self.cert_der = cert_der  # cluster mode: our member certificate
        self.membership = membership
        self._signed: dict[tuple[str, str], wire.Manifest] = {}

    @property
    def cluster(self) -> bool:
        return self.membership is not None

    def _wrap(self, sig: bytes) -> bytes:
        if self.cert_der is not None:
            return CLUSTER_TAG + struct.pack(">H", len(self.cert_der)) + self.cert_der + sig
        return KEY_TAG + _raw(self.key.public_key()) + sig

    # -- what we make ------------------------------------------------------------------

    def sign_manifest(self, m: wire.Manifest) -> wire.Manifest:
        """`m` as this agent offers it: made by us (the torrent is the same whoever made
        it: the blob is verified here), signed. Cached per blob and info-hash."""
        cached = self._signed.get((m.blob_id, m.info_hash))
        if cached is not None:
            return cached
        ours = replace(m, made_by=self.agent_id, signature=b"")
        sig = self.key.sign(MANIFEST_CONTEXT + wire.manifest_signing_bytes(ours))
        signed = replace(ours, signature=self._wrap(sig))
        if len(self._signed) > 65536:
            self._signed.clear()
        self._signed[(m.blob_id, m.info_hash)] = signed
        return signed

    def sign_revision(self, m: wire.RevisionManifest) -> wire.RevisionManifest:
        unsigned = replace(m, signature=b"")
        sig = self.key.sign(REVISION_CONTEXT + wire.revision_signing_bytes(unsigned))
        return replace(unsigned, signature=self._wrap(sig))

    # -- what peers send ---------------------------------------------------------------

    def _signer_key(self, signature: bytes, made_by: str, signed: bytes, now: float) -> bytes:
        """The raw public key that signed `signed`, after every check of the mode."""
        kind, blob, sig = _split(signature)
        if self.membership is not None:
            if kind != "cluster":
                raise _Bad("not signed by a cluster member")
            member, why = self.membership.member(blob, now)
            if not member:
                raise _Bad(why)
            if member != made_by:
                raise _Bad(f"signed by member {member[:8]}, not by its maker {made_by[:8]}")
            key = x509.load_der_x509_certificate(blob).public_key()
            assert isinstance(key, ed25519.Ed25519PublicKey)
        elif kind == "key":
            key = ed25519.Ed25519PublicKey.from_public_bytes(blob)
        else:
            raise _Bad("a cluster signature, and this agent is in open mode")
        try:
            key.verify(sig, signed)
        except InvalidSignature:
            raise _Bad("bad signature") from None
        return _raw(key)

    def check_manifest(self, m: wire.Manifest, offered_by: str, now: float) -> None:
        """Cluster mode: a member's signature, by the peer that offers it. Raises
        `InvalidManifest`. Open mode: nothing to check (the blob is hashed anyway)."""
        if self.membership is None:
            return
        try:
            self._signer_key(
                m.signature,
                m.made_by,
                MANIFEST_CONTEXT + wire.manifest_signing_bytes(m),
                now,
            )
            if m.made_by != offered_by:
                raise _Bad(f"made by {m.made_by[:8]} but offered by {offered_by[:8]}")
        except _Bad as exc:
            raise InvalidManifest(f"manifest of {m.blob_id}: {exc}") from None

    def check_revision(self, m: wire.RevisionManifest, now: float) -> None:
        """The signature of a revision manifest from elsewhere (the state dir too).
        Raises `BadRevisionManifest`. KeyPins a ``local/*`` name on first use."""
        local = is_local_repo(m.repo_id)
        if self.membership is None and not local:
            return  # open mode, a mirror's revision: the mirror is the authority
        what = f"{m.repo_type} {m.repo_id}@{m.revision} from {m.made_by[:12]}"
        try:
            key = self._signer_key(
                m.signature, m.made_by, REVISION_CONTEXT + wire.revision_signing_bytes(m), now
            )
        except _Bad as exc:
            raise BadRevisionManifest(f"{what}: {exc}") from None
        if local:
            self._check_pin(m, key, what)

    def check_own_revision(self, m: wire.RevisionManifest) -> None:
        """A revision this agent made: a local/* name must be pinned to our key (or to
        none yet). Raises `BadRevisionManifest`."""
        if is_local_repo(m.repo_id):
            what = f"{m.repo_type} {m.repo_id}@{m.revision}"
            self._check_pin(m, _raw(self.key.public_key()), what)

    def _check_pin(self, m: wire.RevisionManifest, key: bytes, what: str) -> None:
        pinned = self.pins.pinned(m.repo_type, m.repo_id)
        if pinned is None:
            self.pins.pin(m.repo_type, m.repo_id, key)
        elif pinned != key:
            raise BadRevisionManifest(
                f"{what}: {m.repo_id} was first published with key {pinned.hex()[:16]}, "
                f"this revision is signed by key {key.hex()[:16]}: refused (if its publisher "
                f"really changed keys, remove {self.pins._path(m.repo_type, m.repo_id)} "
                "on this machine)"
            )
