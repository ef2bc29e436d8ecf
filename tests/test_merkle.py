"""The leader's v2 tree, built while the mirror fetch hashes the bytes in order, must
give the very torrent libtorrent makes from the file: same bytes, same info-hash (the
blob's identity on the wire). Built both ways and compared, for sizes at every boundary
(empty, one byte, a 16 KiB block +- 1, one piece +- 1, many pieces, odd tails), at the
rule's piece size and at small piece sizes (one to a few blocks per piece), fed in
random slices; then through `from_mirror` against the project's mirror (fresh, resumed,
a corrupt first attempt, a mirror that ignores Range)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.errors import IntegrityError
from peer.manifests import (
    V2TreeBuilder,
    VerifiedBlob,
    make_manifest,
    piece_size_for,
    torrent_of_tree,
)
from peer.manifests.merkle import BLOCK_SIZE
from peer.mirror_server import Fault, RepoSource, ThreadedMirror
from peer.transfer.swarm import create_v2_torrent_blocking

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 16 * KiB


def blob_file(folder: Path, data: bytes) -> tuple[str, Path]:
    blob_id = hashlib.sha256(data).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / blob_id
    path.write_bytes(data)
    return blob_id, path


def fed_in_slices(builder: V2TreeBuilder, data: bytes, rnd: random.Random) -> V2TreeBuilder:
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        n = rnd.choice((1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 100 * KiB, 8 * MiB))
        builder.update(view[pos : pos + n])
        pos += n
    return builder


@pytest.mark.parametrize(
    "size",
    [
        1,
        BLOCK - 1,
        BLOCK,
        BLOCK + 1,
        MiB - 1,
        MiB,
        MiB + 1,
        2 * MiB,
        4 * MiB - BLOCK,  # a power-of-two piece count, the last piece one block short
        5 * MiB + 3 * BLOCK + 5,  # odd tail, 6 pieces (the layer padded to 8)
        9 * MiB + 777,  # many pieces, odd tail
    ],
)
async def test_the_manifest_from_the_tree_is_the_one_from_the_file(
    tmp_path: Path, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    blob_id, path = blob_file(tmp_path, data)
    tree = fed_in_slices(V2TreeBuilder(blob_id, size), data, random.Random(-size)).finish()
    assert tree.piece_size == piece_size_for(size)
    assert len(tree.piece_layer) == (0 if size <= tree.piece_size else 32 * -(-size // MiB))
    from_file = await make_manifest(VerifiedBlob(blob_id, size, path), made_by="a")
    from_tree = await make_manifest(VerifiedBlob(blob_id, size, path, tree=tree), made_by="a")
    assert from_tree.torrent == from_file.torrent
    assert from_tree.info_hash == from_file.info_hash
    assert from_tree == from_file


async def test_an_empty_blob_has_no_manifest_either_way(tmp_path: Path) -> None:
    blob_id, path = blob_file(tmp_path, b"")
    tree = V2TreeBuilder(blob_id, 0).finish()
    assert (tree.size, tree.pieces_root, tree.piece_layer) == (0, b"", b"")
    for blob in (VerifiedBlob(blob_id, 0, path), VerifiedBlob(blob_id, 0, path, tree=tree)):
        with pytest.raises(ValueError, match="empty blob"):
            await make_manifest(blob, made_by="a")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    blocks_per_piece=st.sampled_from([1, 2, 4, 8]),
    size=st.integers(min_value=1, max_value=40 * BLOCK + 3),
    slicing=st.integers(min_value=0, max_value=2**32),
)
def test_any_size_and_piece_size_gives_libtorrents_torrent(
    tmp_path: Path, blocks_per_piece: int, size: int, slicing: int
) -> None:
    """Small pieces put every edge (a piece of one block, a last piece of one short
    block, piece counts just past a power of two) within a few hundred KiB."""
    piece = blocks_per_piece * BLOCK
    data = random.Random(slicing).randbytes(size)
    blob_id, path = blob_file(tmp_path / f"{slicing}-{piece}-{size}", data)
    builder = V2TreeBuilder(blob_id, size, piece_size=piece)
    tree = fed_in_slices(builder, data, random.Random(slicing)).finish()
    assert torrent_of_tree(tree) == create_v2_torrent_blocking(path, piece)


def test_the_tree_takes_exactly_the_blobs_bytes() -> None:
    b = V2TreeBuilder("a" * 64, 10)
    b.update(b"12345")
    with pytest.raises(ValueError, match="fed 5 bytes"):
        b.finish()
    with pytest.raises(ValueError, match="fed 11 bytes"):
        b.update(b"123456")
    with pytest.raises(ValueError, match="power of two"):
        V2TreeBuilder("a" * 64, 10, piece_size=3 * BLOCK)


def test_leaves_hashed_by_the_caller_give_the_same_tree() -> None:
    """`update(data, leaves)` with the leaves of `whole_blocks` (the member stream's
    receiving thread hashes them) builds the tree `update(data)` builds, whatever the
    cuts; a wrong count of leaves is refused."""
    rng = random.Random(7)
    for size in (100, BLOCK_SIZE, 3 * BLOCK_SIZE + 5, (5 << 20) + 123):
        data = rng.randbytes(size)
        want = V2TreeBuilder("a" * 64, size, piece_size=4 * BLOCK_SIZE)
        want.update(data)
        got = V2TreeBuilder("a" * 64, size, piece_size=4 * BLOCK_SIZE)
        pos = 0
        while pos < size:
            n = min(size - pos, rng.choice([1, 777, BLOCK_SIZE, 3 * BLOCK_SIZE + 11, 1 << 20]))
            view = memoryview(data)[pos : pos + n]
            got.update(
                view,
                [hashlib.sha256(view[i : i + BLOCK_SIZE]).digest() for i in got.whole_blocks(n)],
            )
            pos += n
        assert got.finish() == want.finish()
    tree = V2TreeBuilder("a" * 64, 4 * BLOCK_SIZE)
    tree.update(bytes(100))
    with pytest.raises(ValueError):  # one whole block in the next 2 blocks' bytes, not two
        tree.update(bytes(2 * BLOCK_SIZE), [bytes(32), bytes(32)])


async def test_a_tree_goes_only_with_its_own_blob(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(MiB + 5)
    blob_id, path = blob_file(tmp_path, data)
    tree = fed_in_slices(V2TreeBuilder(blob_id, len(data)), data, random.Random(2)).finish()
    with pytest.raises(ValueError, match="not this blob's"):
        VerifiedBlob("b" * 64, len(data), path, tree=tree)
    with pytest.raises(ValueError, match="not this blob's"):
        VerifiedBlob(blob_id, len(data) - 1, path, tree=tree)
    # The file changed size since it was verified: refused, as the re-read refuses it.
    with path.open("r+b") as f:
        f.truncate(MiB)
    with pytest.raises(IntegrityError, match="were verified"):
        await make_manifest(VerifiedBlob(blob_id, len(data), path, tree=tree), made_by="a")


# -- through the mirror fetch, against the project's mirror ---------------------------


async def _commit(url: str, repo: str) -> str:
    api = f"{url}/api/models/{repo}/revision/main"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(api).read())
    return str(json.loads(body)["sha"])


@pytest.mark.parametrize("case", ["fresh", "resumed", "corrupt_once", "ignores_range"])
async def test_from_mirror_hands_over_the_tree_of_the_verified_bytes(
    tmp_path: Path, case: str
) -> None:
    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.hub.metadata import RemoteFile, Snapshot
    from peer.transfer.mirror_blob import BlobCounters, from_mirror
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    data = random.Random(case).randbytes(7 * MiB + 12345)
    blob_id = hashlib.sha256(data).hexdigest()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.safetensors").write_bytes(data)
    f = RemoteFile("w.safetensors", len(data), blob_id, True)
    part = tmp_path / "part"
    if case == "resumed":  # an earlier run left the first three chunks and a half
        chunk = chunk_size_for(f.size)
        with PartialBlob(part, f.blob_id, f.size, chunk) as p:
            for i in range(3):
                p.write(i * chunk, data[i * chunk : (i + 1) * chunk])
                p.mark_done(i)
            p.write(3 * chunk, data[3 * chunk : 3 * chunk + chunk // 2])
            p.advance(3, chunk // 2)
    with ThreadedMirror([RepoSource("model", "org/r", tmp_path / "src")]) as m:
        if case == "corrupt_once":
            m.add_fault(Fault("corrupt", offset=5 * MiB + 3, times=1))
        if case == "ignores_range":
            m.add_fault(Fault("ignore_range", times=None))
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        snap = Snapshot("model", "org/r", "main", await _commit(m.url, "org/r"), (f,), m.url)
        counters = BlobCounters(f.size)
        async with MirrorFetcher(hub, DownloadOptions(connections=4)) as mf:
            got = await from_mirror(
                mf, snap, f, part, counters, done_elsewhere=lambda: False, want_tree=True
            )
        served = m.stats().per_file["org/r/w.safetensors"]
    assert got is not None and got.tree is not None
    assert got.path.read_bytes() == data
    assert counters.hash_failures == (1 if case == "corrupt_once" else 0)
    if case == "resumed":
        assert served == f.size - 3 * chunk - chunk // 2  # the prefix was not asked again
    from_tree = await make_manifest(
        VerifiedBlob(blob_id, f.size, got.path, tree=got.tree), made_by="a"
    )
    from_file = await make_manifest(VerifiedBlob(blob_id, f.size, got.path), made_by="a")
    assert from_tree == from_file


async def test_from_mirror_builds_no_tree_unless_asked(tmp_path: Path) -> None:
    from peer.config import DownloadOptions, HubSettings
    from peer.hub.metadata import RemoteFile, Snapshot
    from peer.transfer.mirror_blob import BlobCounters, from_mirror
    from peer.transfer.mirror_ranges import MirrorFetcher

    data = random.Random(3).randbytes(2 * MiB + 1)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(data)
    f = RemoteFile("w.bin", len(data), hashlib.sha256(data).hexdigest(), True)
    with ThreadedMirror([RepoSource("model", "org/r", tmp_path / "src")]) as m:
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        snap = Snapshot("model", "org/r", "main", await _commit(m.url, "org/r"), (f,), m.url)
        async with MirrorFetcher(hub, DownloadOptions()) as mf:
            got = await from_mirror(
                mf, snap, f, tmp_path / "p", BlobCounters(f.size), done_elsewhere=lambda: False
            )
    assert got is not None and got.tree is None and got.path.read_bytes() == data


# -- the agent's seed index: the leader's manifest comes from the tree ----------------


async def test_the_seed_index_makes_the_leaders_manifest_from_the_tree(tmp_path: Path) -> None:
    """White-box proof that the blob is not read again: the file on disk is changed
    (same size) between the fetch and the offer, and the manifest is still the one of
    the bytes that were hashed, i.e. it came from the tree. Without a tree the index
    hashes the file (as it does for blobs found in the cache)."""
    from peer.agent.seeding import SeedIndex
    from peer.agent.state import StateDir
    from peer.serving.sharing import Visibility, repo_key
    from peer.transfer.swarm import SwarmSession, SwarmSettings

    data = random.Random(11).randbytes(3 * MiB + 99)
    blob_id, path = blob_file(tmp_path / "blobs", data)
    tree = fed_in_slices(V2TreeBuilder(blob_id, len(data)), data, random.Random(12)).finish()
    expected = await make_manifest(VerifiedBlob(blob_id, len(data), path), made_by="me")
    other = random.Random(13).randbytes(len(data))
    other_id, other_path = blob_file(tmp_path / "blobs", other)
    path.write_bytes(other)  # what a re-read would now see
    held_for = (repo_key("model", "org/r"), Visibility.PUBLIC)
    async with SwarmSession(SwarmSettings(listen_host="127.0.0.9", listen_port=0)) as swarm:
        state = StateDir(tmp_path / "state")
        seeds = SeedIndex(tmp_path / "cache", state, swarm, "me")
        assert seeds.would_offer(blob_id, len(data), held_for)
        assert not seeds.would_offer(blob_id, 0, held_for)
        await seeds.offer_verified(path, blob_id, len(data), held_for, tree)
        assert seeds.held[blob_id].manifest == expected
        assert not seeds.would_offer(blob_id, len(data), held_for)  # seeded already
        # No tree: made from the file (here the other bytes, under the other id).
        await seeds.offer_verified(other_path, other_id, len(other), held_for)
        made = seeds.held[other_id].manifest
        assert made.info_hash != expected.info_hash
        assert made == await make_manifest(
            VerifiedBlob(other_id, len(other), other_path), made_by="me"
        )
        assert not seeds._trees  # a tree lives only while its blob is being added
        none = SeedIndex(tmp_path / "cache", state, swarm, "me", policy="none")
        assert not none.would_offer(blob_id, len(data), held_for)


async def test_a_swarm_download_is_seeded_with_the_manifest_it_came_with(tmp_path: Path) -> None:
    """At the end of a swarm download the blob is held with the manifest its pieces
    were checked against: its record is written, and not read back, fingerprinted and
    decoded again before the seed is added (a hop and a parse per download; benchmarks
    8.37)."""
    from peer import wire
    from peer.agent.seeding import SeedIndex
    from peer.agent.state import Fingerprint, StateDir
    from peer.serving.sharing import Visibility, repo_key
    from peer.transfer.swarm import SwarmSession, SwarmSettings

    class Counting(StateDir):
        reads = 0

        def verified(self, blob_id: str, current: Fingerprint) -> object:  # type: ignore[override]
            Counting.reads += 1
            return super().verified(blob_id, current)

    data = random.Random(21).randbytes(2 * MiB + 7)
    blob_id, path = blob_file(tmp_path / "blobs", data)
    manifest = await make_manifest(VerifiedBlob(blob_id, len(data), path), made_by="peer")
    held_for = (repo_key("model", "org/r"), Visibility.PUBLIC)
    async with SwarmSession(SwarmSettings(listen_host="127.0.0.9", listen_port=0)) as swarm:
        state = Counting(tmp_path / "state")
        seeds = SeedIndex(tmp_path / "cache", state, swarm, "me")
        await seeds.add_with_manifest(path, manifest, held_for)
        assert seeds.held[blob_id].manifest == manifest
        assert Counting.reads == 0
        # Kept, not offered (private), then fetched for a public repo: the same.
        other = random.Random(22).randbytes(MiB + 3)
        other_id, other_path = blob_file(tmp_path / "blobs", other)
        other_manifest = await make_manifest(
            VerifiedBlob(other_id, len(other), other_path), made_by="peer"
        )
        private = (repo_key("model", "org/p"), Visibility.PRIVATE)
        await seeds.add_with_manifest(other_path, other_manifest, private)
        assert other_id in seeds.kept and other_id not in seeds.held
        await seeds.add_with_manifest(other_path, other_manifest, held_for)
        assert seeds.held[other_id].manifest == other_manifest
        assert Counting.reads == 0
        # The record is there for the next start (read back then, checked against the file).
        record = state.verified(blob_id, Fingerprint.of(path))
        assert record is not None and record.manifest == wire.encode(manifest)


@pytest.mark.parametrize("size", [3 * (64 << 10), 3 * (64 << 10) - 5, 2 * (64 << 10) + 100])
def test_piece_hash_is_the_piece_layers_entry(size: int) -> None:
    """One piece's hash from its bytes alone, the short last piece too (its leaves
    padded with zero hashes to the piece's width), is the tree's layer entry."""
    from peer.manifests.merkle import piece_hash

    piece = 64 << 10
    data = random.Random(size).randbytes(size)
    b = V2TreeBuilder("x", size, piece_size=piece)
    b.update(data)
    layer = b.finish().piece_layer
    for i in range(-(-size // piece)):
        assert piece_hash(data[i * piece : (i + 1) * piece], piece) == layer[32 * i : 32 * i + 32]
    assert piece_hash(b"\0" + data[1:piece], piece) != layer[:32]
    with pytest.raises(ValueError):
        piece_hash(data[: piece + 1], piece)
