"""The piece-size rule: how big the pieces of a blob's torrent are.

    piece_size_for(size) = the smallest power of two >= size / 4096,
                           clamped to [1 MiB, 64 MiB]

The rule is part of a blob's identity. Two agents holding the same blob must build
byte-identical torrents to land in the same swarm, and the piece size is inside the
info dict, so every agent must apply the same rule: changing it is a protocol change
(new wire version). `peer.manifests.check_manifest` rejects manifests that break it.

Why these numbers:

- Power of two, >= 16 KiB: required by BitTorrent v2 (pieces are merkle subtrees of
  16 KiB blocks).
- At least 1 MiB: the mirror fallback fetches whole pieces with HTTP Range requests. A
  WAN mirror at ~40 ms RTT and ~100 Mbit/s moves 1 MiB in ~85 ms, so a request costs
  about half its time in latency at 1 MiB and most of it at 256 KiB; smaller pieces
  would also multiply piece_finished events and per-piece bookkeeping. 1 MiB is still
  fine-grained enough to hand single stalled pieces to the mirror. (Files smaller than
  a piece are one piece; small files go over plain peer HTTP anyway.)
- About 4096 pieces per file at most: the torrent carries 32 bytes per piece in its
  "piece layers", so 4096 pieces keep a torrent (and a manifest) around 128 KiB, and
  per-piece state in the scheduler small. A 5 GB file gets 2 MiB pieces, 20 GB 8 MiB.
- At most 64 MiB: a piece is the unit of retry and of memory held per in-flight
  request; past 64 MiB (files over 256 GiB) the piece count grows instead, and the
  torrent stays far below the 4 MiB wire limit (1 TiB -> 16384 pieces -> 512 KiB).
"""

from __future__ import annotations

MIN_PIECE_SIZE = 1 << 20
MAX_PIECE_SIZE = 64 << 20
TARGET_PIECES = 4096


def piece_size_for(size: int) -> int:
    """Piece size (bytes) of the torrent of a ``size``-byte blob. Pure and total for
    ``size >= 0``; an empty blob gets the minimum (it has no torrent anyway)."""
    if type(size) is not int or size < 0:
        raise ValueError(f"a blob size must be a non-negative int, not {size!r}")
    want = -(-size // TARGET_PIECES)  # ceil(size / TARGET_PIECES)
    piece = MIN_PIECE_SIZE
    while piece < want and piece < MAX_PIECE_SIZE:
        piece <<= 1
    return piece
