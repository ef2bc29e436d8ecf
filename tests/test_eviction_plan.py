"""The pure eviction plan (`peer.cache.eviction`): least recently used first, never a
pinned or in-use blob, nothing at all when even that would not make room."""

from __future__ import annotations

from peer.cache.eviction import CachedBlob, plan_eviction

A, B = "models--org--a", "models--org--b"
C1, C2 = "1" * 40, "2" * 40


def blob(name: str, size: int, used: float, *folders: str, links=()) -> CachedBlob:  # type: ignore[no-untyped-def]
    return CachedBlob(
        blob_id=name * 64 if len(name) == 1 else name,
        size=size,
        last_used=used,
        folders=frozenset(folders or (A,)),
        links=frozenset(links),
    )


def ids(plan) -> list[str]:  # type: ignore[no-untyped-def]
    return [b.blob_id[0] for b in plan.evict]


def test_no_quota_or_under_it_evicts_nothing() -> None:
    blobs = [blob("a", 100, 1), blob("b", 100, 2)]
    assert plan_eviction(blobs, quota=0).evict == ()
    plan = plan_eviction(blobs, quota=200)
    assert plan.evict == () and plan.fits and plan.used == 200


def test_least_recently_used_first_until_it_fits() -> None:
    blobs = [blob("a", 100, 30), blob("b", 100, 10), blob("c", 100, 20), blob("d", 100, 40)]
    plan = plan_eviction(blobs, quota=300)
    assert ids(plan) == ["b"] and plan.fits and plan.used == 400 and plan.after == 300
    plan = plan_eviction(blobs, quota=300, incoming=100)
    assert ids(plan) == ["b", "c"] and plan.after == 400 - 200 + 100


def test_ties_go_larger_first_then_by_id() -> None:
    blobs = [blob("a", 10, 5), blob("b", 50, 5), blob("c", 50, 5)]
    assert ids(plan_eviction(blobs, quota=60)) == ["b"]
    assert ids(plan_eviction(blobs, quota=10)) == ["b", "c"]


def test_pinned_repo_and_pinned_snapshot_are_kept() -> None:
    blobs = [
        blob("a", 100, 1, A),
        blob("b", 100, 2, B, links=[(B, C1)]),
        blob("c", 100, 3, B, links=[(B, C2)]),
        blob("d", 100, 4, A),
    ]
    plan = plan_eviction(blobs, quota=200, pins=frozenset({(A, None)}))
    assert ids(plan) == ["b", "c"]
    plan = plan_eviction(blobs, quota=300, pins=frozenset({(B, C1)}))
    assert ids(plan) == ["a"]
    plan = plan_eviction(blobs, quota=100, pins=frozenset({(B, C1)}))
    assert ids(plan) == ["a", "c", "d"]


def test_blob_shared_with_a_pinned_repo_is_kept() -> None:
    # the same blob id in two repo folders (hard links): one of them pinned
    shared = blob("a", 100, 1, A, B, links=[(A, C1), (B, C2)])
    plan = plan_eviction([shared, blob("b", 100, 2)], quota=100, pins=frozenset({(B, C2)}))
    assert ids(plan) == ["b"]


def test_in_use_blobs_are_kept() -> None:
    blobs = [blob("a", 100, 1), blob("b", 100, 2), blob("c", 100, 3)]
    plan = plan_eviction(blobs, quota=150, in_use=frozenset({"a" * 64}))
    assert ids(plan) == ["b", "c"]


def test_no_room_even_after_eviction_evicts_nothing() -> None:
    blobs = [blob("a", 100, 1), blob("b", 100, 2)]
    plan = plan_eviction(
        blobs, quota=250, pins=frozenset({(A, None)}), incoming=100
    )  # everything pinned
    assert plan.evict == () and not plan.fits and plan.after == 300
    plan = plan_eviction([blob("a", 100, 1)], quota=150, incoming=200)  # bigger than quota
    assert plan.evict == () and not plan.fits


def test_best_effort_evicts_what_it_can() -> None:
    blobs = [blob("a", 100, 1), blob("b", 100, 2), blob("c", 100, 3)]
    plan = plan_eviction(blobs, quota=50, in_use=frozenset({"c" * 64}), best_effort=True)
    assert ids(plan) == ["a", "b"] and not plan.fits and plan.after == 100


def test_empty_blobs_free_nothing_and_stay() -> None:
    blobs = [blob("a", 0, 1), blob("b", 100, 2)]
    assert ids(plan_eviction(blobs, quota=50)) == ["b"]
