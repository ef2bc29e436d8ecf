"""Building and checking blob manifests (a blob's piece map plus who made it).

A blob's torrent is the deterministic single-file BitTorrent v2 torrent whose one file
is named by the blob id, with pieces per `piece_size_for`. Because the name is the blob
id (not the repo path) and nothing else varies (no date, no creator, no trackers), two
agents holding the same blob at any path compute the same info-hash and join one swarm.

Trust: `make_manifest` only accepts a `VerifiedBlob`, the value the verification stage
produces after hashing the WHOLE blob against its Hub id. A piece map made from
unverified bytes would make libtorrent accept (and spread) wrong pieces as valid, so
there is deliberately no entry point taking a bare path. A blob just fetched from the
mirror carries the v2 tree its hash follower built from the same bytes
(`peer.manifests.merkle`): its torrent is made from that tree, with no second read of
the file; any other is hashed by libtorrent. Both give the same bytes.

`check_manifest` is what an agent runs on a manifest received from a peer, before
using its torrent: the torrent must be exactly the canonical one for the stated blob
id, size and piece size (only the file's merkle root is free), so a hostile manifest
cannot smuggle trackers, web seeds, extra files, symlinks or another piece size.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer import wire
from peer.errors import IntegrityError, PeerMisbehaved
from peer.manifests.merkle import V2Tree
from peer.manifests.piece_size import piece_size_for
from peer.transfer.swarm import (
    InvalidTorrent,
    TorrentMeta,
    create_v2_torrent_blocking,
    parse_torrent,
)
from peer.verification.hashing import is_blob_id

# The only keys a canonical torrent has: the info dict and the v2 piece layers
# (libtorrent checks the layers against the file's pieces root when parsing).
_TOP_LEVEL_KEYS = frozenset({"info", "piece layers"})


class InvalidManifest(PeerMisbehaved):
    """A manifest whose torrent does not match what it claims."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="the manifest was ignored; ask another peer")


@dataclass(frozen=True)
class VerifiedBlob:
    """Proof that the file at ``path`` was hashed whole and matched ``blob_id``.

    Only the verification stage should construct it, right after that check; holding
    one is the precondition for building a piece map. ``tree``: the v2 tree of the very
    bytes that were hashed, when they were fed to one as they streamed past."""

    blob_id: str
    size: int
    path: Path
    tree: V2Tree | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if type(self.blob_id) is not str or not is_blob_id(self.blob_id):
            raise ValueError(f"{self.blob_id!r} is not a blob id (sha256 or git sha1 hex)")
        if type(self.size) is not int or self.size < 0:
            raise ValueError(f"blob size {self.size!r} is not a non-negative int")
        t = self.tree
        if t is not None and (t.blob_id, t.size) != (self.blob_id, self.size):
            raise ValueError(f"the tree of {t.blob_id} ({t.size} bytes) is not this blob's")


def _build_torrent(blob: VerifiedBlob, piece_size: int) -> bytes:
    path = Path(blob.path)
    if path.name == blob.blob_id:
        return create_v2_torrent_blocking(path, piece_size)
    # The torrent's file name is the basename of what we hash, and it must be the
    # blob id. A symlink under that name in a private temporary directory gives it
    # without copying the blob (libtorrent follows the link).
    with tempfile.TemporaryDirectory(prefix="hfswarm-manifest-") as tmp:
        link = Path(tmp) / blob.blob_id
        os.symlink(path.resolve(), link)
        return create_v2_torrent_blocking(link, piece_size)


def torrent_of_tree(tree: V2Tree) -> bytes:
    """The canonical torrent of a blob from its v2 tree: the bytes libtorrent's
    `create_v2_torrent_blocking` makes from the file (no date, creator or attributes;
    ``piece layers`` empty for a one-piece file)."""
    info = _canonical_info(tree.blob_id, tree.size, tree.piece_size, tree.pieces_root)
    layers = {tree.pieces_root: tree.piece_layer} if tree.piece_layer else {}
    return _bencode({b"info": info, b"piece layers": layers})


def _size_on_disk(path: Path) -> int:
    return os.stat(path).st_size


async def make_manifest(blob: VerifiedBlob, made_by: str) -> wire.Manifest:
    """The manifest of a verified blob, made by agent ``made_by`` (unsigned for now).

    The blob may live at any path (e.g. ``blobs/<id>`` in an HF cache, or a file with
    another name). From the blob's tree when it has one (no read of the file); else
    hashing runs in a worker thread. Raises ``ValueError`` for an empty blob (nothing to
    swarm: fetch it directly) and `IntegrityError` if the file no longer has the
    verified size."""
    if blob.size == 0:
        raise ValueError("an empty blob has no piece map; fetch or copy it directly")
    piece_size = piece_size_for(blob.size)
    if blob.tree is not None:
        torrent = torrent_of_tree(blob.tree)
        total = await asyncio.to_thread(_size_on_disk, blob.path)
        meta = parse_torrent(torrent)  # libtorrent checks the piece layer against the root
    else:
        torrent = await asyncio.to_thread(_build_torrent, blob, piece_size)
        meta = parse_torrent(torrent)
        total = meta.total_size  # what libtorrent found and hashed
    if total != blob.size:
        raise IntegrityError(
            f"blob {blob.blob_id} at {blob.path} has {total} bytes, but {blob.size} were verified",
            hint="the file changed after verification; verify it again before sharing",
        )
    manifest = wire.Manifest(
        blob_id=blob.blob_id,
        size=blob.size,
        piece_size=piece_size,
        info_hash=meta.info_hash,
        torrent=torrent,
        made_by=made_by,
    )
    check_manifest(manifest)  # our own output must pass the rules we apply to peers
    return manifest


def canonical_info_hash(blob_id: str, size: int, piece_size: int, pieces_root: bytes) -> str:
    """The v2 info-hash of the canonical torrent for this blob, given its merkle root."""
    info = _canonical_info(blob_id, size, piece_size, pieces_root)
    return hashlib.sha256(_bencode(info)).hexdigest()


def _canonical_info(blob_id: str, size: int, piece_size: int, pieces_root: bytes) -> Any:
    return {
        b"file tree": {blob_id.encode(): {b"": {b"length": size, b"pieces root": pieces_root}}},
        b"meta version": 2,
        b"name": blob_id.encode(),
        b"piece length": piece_size,
    }


def check_manifest(m: wire.Manifest) -> TorrentMeta:
    """Check that a manifest's torrent is the canonical torrent of the blob it names.

    Raises `InvalidManifest` (a `PeerMisbehaved`) on any mismatch; returns the parsed
    torrent on success. Does not check the signature (cluster signing comes later)."""
    expected_piece = piece_size_for(m.size)
    if m.piece_size != expected_piece:
        raise InvalidManifest(
            f"manifest of {m.blob_id}: piece size {m.piece_size} breaks the piece-size "
            f"rule ({expected_piece} for {m.size} bytes)"
        )
    try:
        meta = parse_torrent(m.torrent)
    except InvalidTorrent as e:
        raise InvalidManifest(f"manifest of {m.blob_id}: {e.message}") from e
    if meta.info_hash != m.info_hash:
        raise InvalidManifest(
            f"manifest of {m.blob_id}: the torrent's info-hash is {meta.info_hash}, "
            f"not {m.info_hash}"
        )
    extra = meta.top_level_keys - _TOP_LEVEL_KEYS
    if extra or "info" not in meta.top_level_keys:
        raise InvalidManifest(
            f"manifest of {m.blob_id}: unexpected torrent keys {sorted(extra)} "
            "(trackers, web seeds and comments are not allowed)"
        )
    if meta.has_v1 or len(meta.files) != 1:
        raise InvalidManifest(
            f"manifest of {m.blob_id}: the torrent must be v2-only with exactly one file"
        )
    (f,) = meta.files
    if (meta.name, f.path, f.size, meta.piece_size) != (
        m.blob_id,
        m.blob_id,
        m.size,
        m.piece_size,
    ):
        raise InvalidManifest(
            f"manifest of {m.blob_id}: the torrent describes {f.path!r} of {f.size} bytes "
            f"in {meta.piece_size}-byte pieces"
        )
    # Everything above could still hide odd attributes or keys inside the info dict;
    # rebuilding the canonical info dict and hashing it rules all of that out.
    if canonical_info_hash(m.blob_id, m.size, m.piece_size, f.pieces_root) != m.info_hash:
        raise InvalidManifest(
            f"manifest of {m.blob_id}: the info dict is not the canonical one "
            "(extra keys or file attributes)"
        )
    return meta


class CheckedManifests:
    """`check_manifest`, remembered for the manifests that passed it (bounded, least
    recently used out): a download's re-survey finds the same offers every 2 s, and
    each check parses the torrent again (1-7 ms of the event loop per offer,
    docs/benchmarks.md 8.30, 8.33). The key is the frozen manifest itself, so every
    field (torrent bytes, info-hash, sizes, maker, signature) must be equal for a hit:
    a manifest changed in any byte is checked again like a new one. Only this check is
    remembered, which reads nothing but the manifest: cluster mode's signature check
    depends on who offers it and on the CRL and is made on every answer (`PeerTable`).
    Failures are not remembered (each bad one raises again). One per agent; not
    thread-safe (the event loop's)."""

    def __init__(
        self, limit: int = 64, check: Callable[[wire.Manifest], TorrentMeta] | None = None
    ) -> None:
        self._limit = limit
        self._check = check or check_manifest
        self._ok: OrderedDict[wire.Manifest, TorrentMeta] = OrderedDict()

    def __call__(self, m: wire.Manifest) -> TorrentMeta:
        meta = self._ok.get(m)
        if meta is not None:
            self._ok.move_to_end(m)
            return meta
        meta = self._check(m)  # raises InvalidManifest: nothing remembered
        self._ok[m] = meta
        if len(self._ok) > self._limit:
            self._ok.popitem(last=False)
        return meta


def manifest_tree(m: wire.Manifest) -> V2Tree:
    """The v2 tree a manifest promises (pieces root and piece layer), to check a blob's
    pieces against as they arrive from the member that signed it. `check_manifest` first;
    the layer is the canonical torrent's last value, and the torrent rebuilt from the
    tree must be the manifest's byte for byte (`InvalidManifest` otherwise)."""
    meta = check_manifest(m)
    (f,) = meta.files
    layer_len = 32 * meta.num_pieces if m.size > m.piece_size else 0
    end = len(m.torrent) - 2  # the torrent ends with the layers dict's and its own "e"
    layer = m.torrent[end - layer_len : end] if layer_len else b""
    tree = V2Tree(m.blob_id, m.size, m.piece_size, f.pieces_root, layer)
    if torrent_of_tree(tree) != m.torrent:
        raise InvalidManifest(f"manifest of {m.blob_id}: its piece layer is not canonical")
    return tree


def _bencode(obj: Any) -> bytes:
    """Canonical bencoding (sorted byte-string keys), enough for an info dict."""
    if type(obj) is int:
        return b"i%de" % obj
    if isinstance(obj, bytes):
        return b"%d:%s" % (len(obj), obj)
    if isinstance(obj, dict):
        items = sorted(obj.items())
        return b"d" + b"".join(_bencode(k) + _bencode(v) for k, v in items) + b"e"
    if isinstance(obj, list):
        return b"l" + b"".join(_bencode(x) for x in obj) + b"e"
    raise TypeError(f"cannot bencode {type(obj).__name__}")
