"""Piece maps: the deterministic per-blob torrent, its piece-size rule, and manifests."""

from peer.manifests.manifest import (
    InvalidManifest,
    VerifiedBlob,
    canonical_info_hash,
    check_manifest,
    make_manifest,
    torrent_of_tree,
)
from peer.manifests.merkle import V2Tree, V2TreeBuilder
from peer.manifests.piece_size import piece_size_for

__all__ = [
    "InvalidManifest",
    "V2Tree",
    "V2TreeBuilder",
    "VerifiedBlob",
    "canonical_info_hash",
    "check_manifest",
    "make_manifest",
    "piece_size_for",
    "torrent_of_tree",
]
