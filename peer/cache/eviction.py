"""PURE: which blobs leave the cache when it is over its quota (no I/O; the agent's
`peer.agent.quota` gathers the inputs and carries the plan out).

A candidate is one blob id with every file of it in the cache (one per repo folder that
holds it, hard links counted once), the snapshots that link it, and when it was last
used. Never a candidate: a blob a pin names (a whole repo, or one of its snapshots) and
a blob some running download or stream needs. The rest go least recently used first
(ties: the larger first, then by id, so a plan is deterministic) until what is held, plus
what running downloads still have to bring, plus the new download fits the quota.

If evicting every candidate would still not make room, the plan says so and evicts
nothing: a download that cannot fit is refused with the cache left as it was (unless
asked for its best effort: a cache that grew past its quota by itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# A pin: (repo folder, e.g. "models--org--name"; a snapshot's commit, or None: all)
Pin = tuple[str, str | None]
# A link: (repo folder, commit) of a snapshot holding a symlink to the blob
Link = tuple[str, str]


@dataclass(frozen=True)
class CachedBlob:
    blob_id: str
    size: int  # bytes freed by removing it (its distinct inodes)
    last_used: float  # seconds since the epoch
    folders: frozenset[str]  # the repo folders whose blobs/ hold it
    links: frozenset[Link] = frozenset()


@dataclass(frozen=True)
class EvictionPlan:
    evict: tuple[CachedBlob, ...]
    used: int  # bytes held now
    after: int  # bytes held once `evict` is done, plus what is still to come
    fits: bool  # `after` is within the quota


def is_pinned(blob: CachedBlob, pins: frozenset[Pin]) -> bool:
    return any((f, None) in pins for f in blob.folders) or any(link in pins for link in blob.links)


def plan_eviction(
    blobs: Iterable[CachedBlob],
    *,
    quota: int,
    pins: frozenset[Pin] = frozenset(),
    in_use: frozenset[str] = frozenset(),
    incoming: int = 0,
    best_effort: bool = False,
) -> EvictionPlan:
    """What to evict so that the held blobs plus `incoming` bytes (still to be fetched
    by running and new downloads) fit `quota` (0: no quota, nothing evicted). When they
    cannot fit, nothing is evicted, unless `best_effort` (the cache went over on its
    own, with nothing to refuse): then every candidate goes."""
    held = list(blobs)
    used = sum(b.size for b in held)
    if quota <= 0:
        return EvictionPlan((), used, used + incoming, True)
    excess = used + incoming - quota
    if excess <= 0:
        return EvictionPlan((), used, used + incoming, True)
    candidates = sorted(
        (b for b in held if b.blob_id not in in_use and not is_pinned(b, pins)),
        key=lambda b: (b.last_used, -b.size, b.blob_id),
    )
    chosen: list[CachedBlob] = []
    freed = 0
    for blob in candidates:
        if freed >= excess:
            break
        if blob.size <= 0:
            continue  # frees nothing: an empty blob is left alone
        chosen.append(blob)
        freed += blob.size
    if freed < excess:
        if best_effort:
            return EvictionPlan(tuple(chosen), used, used - freed + incoming, False)
        return EvictionPlan((), used, used + incoming, False)
    return EvictionPlan(tuple(chosen), used, used - freed + incoming, True)
