"""A blob's BitTorrent v2 merkle tree, built from its bytes as they stream past in
order (the mirror fetch's hash follower feeds it), so that the leader of a first fetch
makes its manifest without reading the blob a second time.

The tree is BEP 52's, as libtorrent builds it for a single file: leaves are the SHA-256
of 16 KiB blocks (the last one short), padded with zero leaves to a power of two; a
piece's hash is the root of its subtree (the last piece padded with zero leaves to a
whole piece); the file's pieces root is the root over the piece hashes, padded with the
root of an all-zero piece. A file of one piece has no piece layer, and its root is the
root of its own blocks (padded to a power of two, not to a piece). The piece size is
`piece_size_for`. tests/test_merkle.py checks the torrent made from it against the one
libtorrent makes from the file, byte for byte, for sizes around every boundary.

A `V2Tree` says nothing about which bytes were fed: only a `VerifiedBlob` (built once
the whole-file hash matched the blob id) may carry one into `make_manifest`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from peer.manifests.piece_size import piece_size_for

BLOCK_SIZE = 16 * 1024  # BEP 52's leaf block
_ZERO = bytes(32)


@dataclass(frozen=True)
class V2Tree:
    """The v2 merkle tree of one blob's bytes: what its torrent needs."""

    blob_id: str
    size: int
    piece_size: int
    pieces_root: bytes  # empty for an empty blob (it has no torrent)
    piece_layer: bytes  # the piece hashes, 32 bytes each; empty for a one-piece file


def _sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def _root(leaves: list[bytes], width: int, pad: bytes) -> bytes:
    """The merkle root over ``leaves`` padded with ``pad`` to ``width`` (a power of two)."""
    layer = leaves + [pad] * (width - len(leaves))
    while len(layer) > 1:
        layer = [_sha256(layer[i] + layer[i + 1]) for i in range(0, len(layer), 2)]
    return layer[0]


def piece_hash(data: bytes | memoryview, piece_size: int) -> bytes:
    """The v2 hash of one piece's bytes (the last piece of a blob may be short): what
    the piece layer holds for it. A piece from elsewhere (the mirror) is checked with it
    before libtorrent gets it, so a piece libtorrent then rejects was spoiled by blocks
    peers had sent of it."""
    view = memoryview(data).cast("B")
    if not 0 < len(view) <= piece_size or piece_size % BLOCK_SIZE:
        raise ValueError(f"{len(view)} bytes are not a piece of {piece_size}")
    leaves = [_sha256(view[i : i + BLOCK_SIZE]) for i in range(0, len(view), BLOCK_SIZE)]
    return _root(leaves, piece_size // BLOCK_SIZE, _ZERO)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class V2TreeBuilder:
    """Feed a blob's bytes in order with `update`; `finish` once all ``size`` are in.

    Holds at most one block's tail and one piece's leaf hashes (<= 4096 x 32 bytes at
    64 MiB pieces), plus 32 bytes per finished piece. Blocking and not thread-safe: the
    caller's hashing thread feeds it, one call at a time."""

    def __init__(self, blob_id: str, size: int, *, piece_size: int | None = None) -> None:
        self.blob_id = blob_id
        self.size = size
        # Another piece size than the rule's only for tests (check_manifest refuses it)
        self.piece_size = piece_size_for(size) if piece_size is None else piece_size
        if self.piece_size < BLOCK_SIZE or self.piece_size & (self.piece_size - 1):
            raise ValueError(f"piece size {self.piece_size} is not a power of two >= 16 KiB")
        self._blocks_per_piece = self.piece_size // BLOCK_SIZE
        self._tail = bytearray()  # the start of a block not yet whole
        self._leaves: list[bytes] = []  # block hashes of the piece in progress
        self._pieces: list[bytes] = []
        self.fed = 0

    def update(self, data: bytes | memoryview, leaves: Sequence[bytes] | None = None) -> None:
        """Feed the next bytes. `leaves`, if given, are the SHA-256 digests of the whole
        blocks of `data` (`whole_blocks`), hashed by the caller already (the member
        stream hashes each block as it lands, while it is in the CPU's cache)."""
        view = memoryview(data).cast("B")
        if leaves is not None and len(leaves) != len(self.whole_blocks(len(view))):
            raise ValueError(f"{len(leaves)} leaves for {len(view)} bytes at {self.fed}")
        self.fed += len(view)
        if self.fed > self.size:
            raise ValueError(f"fed {self.fed} bytes to the tree of a {self.size}-byte blob")
        pos = 0
        if self._tail:
            take = min(BLOCK_SIZE - len(self._tail), len(view))
            self._tail += view[:take]
            pos = take
            if len(self._tail) < BLOCK_SIZE:
                return
            self._leaf(_sha256(self._tail))
            self._tail.clear()
        end = pos + (len(view) - pos) // BLOCK_SIZE * BLOCK_SIZE
        if leaves is None:
            sha256 = hashlib.sha256
            leaves = [
                sha256(view[i : i + BLOCK_SIZE]).digest() for i in range(pos, end, BLOCK_SIZE)
            ]
        # `_leaf` inlined: this loop runs 65,536 times per GiB.
        done, per_piece = self._leaves, self._blocks_per_piece
        for leaf in leaves:
            done.append(leaf)
            if len(done) == per_piece:
                self._pieces.append(_root(done, per_piece, _ZERO))
                done = self._leaves = []
        self._tail += view[end:]

    def whole_blocks(self, n: int) -> range:
        """Where, in the next `n` bytes to feed, the whole blocks `update` hashes start
        (the first block boundary of the blob on or after `fed`, then every block)."""
        first = -self.fed % BLOCK_SIZE
        return range(first, first + max(0, n - first) // BLOCK_SIZE * BLOCK_SIZE, BLOCK_SIZE)

    @property
    def pieces_hashed(self) -> int:
        """Whole pieces hashed so far (the last, short, piece only in `finish`)."""
        return len(self._pieces)

    def piece_hash(self, index: int) -> bytes:
        """The hash of whole piece `index` (< `pieces_hashed`): its subtree's root."""
        return self._pieces[index]

    def _leaf(self, digest: bytes) -> None:
        self._leaves.append(digest)
        if len(self._leaves) == self._blocks_per_piece:
            self._pieces.append(_root(self._leaves, self._blocks_per_piece, _ZERO))
            self._leaves = []

    def finish(self) -> V2Tree:
        """The tree, once exactly ``size`` bytes were fed (`ValueError` otherwise)."""
        if self.fed != self.size:
            raise ValueError(f"fed {self.fed} bytes to the tree of a {self.size}-byte blob")
        if self.size == 0:
            return V2Tree(self.blob_id, 0, self.piece_size, b"", b"")
        if self._tail:
            self._leaf(_sha256(self._tail))
            self._tail.clear()
        if self.size <= self.piece_size:
            # One piece: its leaves padded to a power of two only, no piece layer (a
            # file of exactly one piece was folded into `_pieces` already).
            if self._pieces:
                root = self._pieces[0]
            else:
                root = _root(self._leaves, _pow2_at_least(len(self._leaves)), _ZERO)
            return V2Tree(self.blob_id, self.size, self.piece_size, root, b"")
        if self._leaves:
            self._pieces.append(_root(self._leaves, self._blocks_per_piece, _ZERO))
            self._leaves = []
        zero_piece = _root([], self._blocks_per_piece, _ZERO)
        root = _root(self._pieces, _pow2_at_least(len(self._pieces)), zero_piece)
        return V2Tree(self.blob_id, self.size, self.piece_size, root, b"".join(self._pieces))
