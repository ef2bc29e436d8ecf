"""Piece maps: the deterministic per-blob torrent, its piece-size rule, and manifests.

The torrent side (`peer.manifests.manifest`, which needs libtorrent) loads on first
use: a download with no agent only builds v2 trees (`merkle`) and never imports it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peer.manifests.merkle import V2Tree, V2TreeBuilder
from peer.manifests.piece_size import piece_size_for

if TYPE_CHECKING:
    from peer.manifests.manifest import (
        CheckedManifests,
        InvalidManifest,
        VerifiedBlob,
        canonical_info_hash,
        check_manifest,
        make_manifest,
        torrent_of_tree,
    )

_FROM_MANIFEST = frozenset(
    {
        "CheckedManifests",
        "InvalidManifest",
        "VerifiedBlob",
        "canonical_info_hash",
        "check_manifest",
        "make_manifest",
        "torrent_of_tree",
    }
)


def __getattr__(name: str) -> Any:
    if name in _FROM_MANIFEST:
        from peer.manifests import manifest

        return getattr(manifest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckedManifests",
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
