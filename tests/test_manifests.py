"""Piece-size rule, manifest creation and the checks applied to peers' manifests."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from peer import wire
from peer.errors import IntegrityError, PeerMisbehaved
from peer.manifests import (
    CheckedManifests,
    InvalidManifest,
    VerifiedBlob,
    canonical_info_hash,
    check_manifest,
    make_manifest,
    piece_size_for,
)
from peer.manifests.manifest import _bencode
from peer.manifests.piece_size import MAX_PIECE_SIZE, MIN_PIECE_SIZE, TARGET_PIECES
from peer.transfer.swarm import create_v2_torrent, parse_torrent

MiB = 1 << 20
GiB = 1 << 30

# --- piece-size rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, MiB),
        (1, MiB),
        (100 * 1024, MiB),
        (4 * GiB, MiB),  # exactly 4096 pieces of 1 MiB
        (4 * GiB + 1, 2 * MiB),
        (5 * 10**9, 2 * MiB),
        (20 * 10**9, 8 * MiB),
        (256 * GiB, 64 * MiB),
        (1 << 40, 64 * MiB),  # capped: 16384 pieces
    ],
)
def test_piece_size_examples(size: int, expected: int) -> None:
    assert piece_size_for(size) == expected


@pytest.mark.parametrize("size", [0, 1, 12345, MiB, 3 * GiB, 4 * GiB + 7, 10**12, 1 << 50])
def test_piece_size_properties(size: int) -> None:
    p = piece_size_for(size)
    assert p & (p - 1) == 0 and p >= 16 * 1024
    assert MIN_PIECE_SIZE <= p <= MAX_PIECE_SIZE
    pieces = -(-size // p)
    if p < MAX_PIECE_SIZE:
        assert pieces <= TARGET_PIECES
    if p > MIN_PIECE_SIZE:  # never bigger than needed
        assert -(-size // (p // 2)) > TARGET_PIECES


def test_piece_size_is_monotonic() -> None:
    sizes = [0, 1, MiB, 4 * GiB, 4 * GiB + 1, 9 * GiB, 17 * GiB, 300 * GiB, 1 << 45]
    got = [piece_size_for(s) for s in sizes]
    assert got == sorted(got)


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True, None])
def test_piece_size_rejects_non_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        piece_size_for(bad)  # type: ignore[arg-type]


# --- manifests ----------------------------------------------------------------------------


def _blob(tmp_path: Path, size: int = 3 * MiB + 777, name: str | None = None) -> VerifiedBlob:
    data = os.urandom(size)
    blob_id = hashlib.sha256(data).hexdigest()
    path = tmp_path / (name or blob_id)
    path.write_bytes(data)
    return VerifiedBlob(blob_id, size, path)


async def test_make_manifest_and_check(tmp_path: Path) -> None:
    blob = _blob(tmp_path)
    m = await make_manifest(blob, "agent-1")
    assert (m.blob_id, m.size, m.piece_size, m.made_by) == (blob.blob_id, blob.size, MiB, "agent-1")
    assert m.version == wire.WIRE_VERSION and m.signature == b""
    meta = check_manifest(m)
    assert meta.info_hash == m.info_hash
    assert [(f.path, f.size) for f in meta.files] == [(blob.blob_id, blob.size)]
    # It survives the wire.
    assert wire.decode(wire.encode(m)) == m


async def test_same_blob_at_any_path_gives_one_info_hash(tmp_path: Path) -> None:
    blob = _blob(tmp_path)
    elsewhere = tmp_path / "repo" / "model.safetensors"
    elsewhere.parent.mkdir()
    shutil.copyfile(blob.path, elsewhere)
    elsewhere.chmod(0o755)  # file modes differ between machines; the swarm must not
    a = await make_manifest(blob, "agent-a")
    b = await make_manifest(VerifiedBlob(blob.blob_id, blob.size, elsewhere), "agent-b")
    assert a.info_hash == b.info_hash
    assert a.torrent == b.torrent
    # And it is the torrent of a file named by the blob id, made directly.
    direct = await create_v2_torrent(blob.path, MiB)
    assert direct == a.torrent


async def test_git_sha1_blob_ids_work(tmp_path: Path) -> None:
    data = b"{}\n" * 1000
    blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    path = tmp_path / "config.json"
    path.write_bytes(data)
    m = await make_manifest(VerifiedBlob(blob_id, len(data), path), "a")
    assert check_manifest(m).name == blob_id


async def test_make_manifest_refuses_changed_or_empty_blobs(tmp_path: Path) -> None:
    blob = _blob(tmp_path, size=2 * MiB)
    with pytest.raises(IntegrityError):
        await make_manifest(dataclasses.replace(blob, size=2 * MiB + 1), "a")
    with pytest.raises(ValueError):
        await make_manifest(VerifiedBlob("0" * 64, 0, tmp_path / "empty"), "a")


@pytest.mark.parametrize("bad_id", ["A" * 64, "0" * 63, "g" * 40, "", 5])
def test_verified_blob_needs_a_blob_id(bad_id: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        VerifiedBlob(bad_id, 1, tmp_path)  # type: ignore[arg-type]


# --- hostile manifests ------------------------------------------------------------------------


@pytest.fixture
async def good(tmp_path: Path) -> wire.Manifest:
    return await make_manifest(_blob(tmp_path), "agent-1")


def _reject(m: wire.Manifest) -> InvalidManifest:
    with pytest.raises(InvalidManifest) as info:
        check_manifest(m)
    assert isinstance(info.value, PeerMisbehaved)
    return info.value


async def test_check_rejects_wrong_info_hash(good: wire.Manifest) -> None:
    _reject(dataclasses.replace(good, info_hash="ab" * 32))


async def test_check_rejects_wrong_size_and_piece_size(good: wire.Manifest) -> None:
    _reject(dataclasses.replace(good, size=good.size + 1))
    _reject(dataclasses.replace(good, piece_size=2 * MiB))
    _reject(dataclasses.replace(good, blob_id="cd" * 32))


async def test_check_rejects_garbage_torrent(good: wire.Manifest) -> None:
    _reject(dataclasses.replace(good, torrent=b"d4:spam4:eggse"))
    _reject(dataclasses.replace(good, torrent=good.torrent[:-10]))


async def test_check_rejects_torrent_of_other_blob(tmp_path: Path, good: wire.Manifest) -> None:
    other = await make_manifest(_blob(tmp_path, size=good.size), "agent-1")
    _reject(dataclasses.replace(good, torrent=other.torrent))
    _reject(dataclasses.replace(good, torrent=other.torrent, info_hash=other.info_hash))


async def test_check_rejects_trackers_smuggled_outside_info(good: wire.Manifest) -> None:
    # Keys outside the info dict do not change the info-hash, so only the key check
    # stands between a hostile manifest and libtorrent announcing to evil.example.
    assert good.torrent.startswith(b"d4:info")
    evil = b"d8:announce20:http://evil.example/" + good.torrent[1:]
    assert parse_torrent(evil).info_hash == good.info_hash
    err = _reject(dataclasses.replace(good, torrent=evil))
    assert "announce" in err.message


async def test_check_rejects_non_canonical_info_dict(good: wire.Manifest) -> None:
    # A self-consistent torrent for the same blob whose file carries the executable
    # attribute: libtorrent accepts it, the info-hash matches, names and sizes match.
    root = parse_torrent(good.torrent).files[0].pieces_root
    file_entry = {b"length": good.size, b"pieces root": root}
    info = {
        b"file tree": {good.blob_id.encode(): {b"": file_entry}},
        b"meta version": 2,
        b"name": good.blob_id.encode(),
        b"piece length": good.piece_size,
    }
    head = b"d4:info" + _bencode(info)
    assert good.torrent.startswith(head)
    layers = good.torrent[len(head) :]
    file_entry[b"attr"] = b"x"
    evil_info = _bencode(info)
    evil = b"d4:info" + evil_info + layers
    meta = parse_torrent(evil)
    assert meta.files[0].attributes == "x"
    assert meta.info_hash == hashlib.sha256(evil_info).hexdigest()
    err = _reject(dataclasses.replace(good, torrent=evil, info_hash=meta.info_hash))
    assert "canonical" in err.message


async def test_canonical_info_hash_matches_libtorrent(good: wire.Manifest) -> None:
    meta = parse_torrent(good.torrent)
    root = meta.files[0].pieces_root
    assert len(root) == 32
    got = canonical_info_hash(good.blob_id, good.size, good.piece_size, root)
    assert got == good.info_hash
    assert canonical_info_hash(good.blob_id, good.size + 1, good.piece_size, root) != got


# --- checked once: a re-survey's manifests ------------------------------------------------


async def test_a_manifest_checked_once_is_not_parsed_again(good: wire.Manifest) -> None:
    parsed: list[wire.Manifest] = []

    def counting(m: wire.Manifest) -> object:
        parsed.append(m)
        return check_manifest(m)

    checked = CheckedManifests(check=counting)  # type: ignore[arg-type]
    first = checked(good)
    # The same manifest as each re-survey gets it: decoded afresh from a peer's answer.
    again = [checked(wire.decode_as(wire.encode(good), wire.Manifest)) for _ in range(5)]
    assert len(parsed) == 1
    assert all(meta == first for meta in again)


async def test_a_changed_manifest_from_a_known_peer_is_checked_again_and_rejected(
    tmp_path: Path, good: wire.Manifest
) -> None:
    checked = CheckedManifests()
    checked(good)
    other = await make_manifest(_blob(tmp_path, size=good.size), "agent-1")
    layer = bytearray(good.torrent)
    layer[-5] ^= 1  # a byte of the piece layer: no longer the pieces root's
    changed = [
        dataclasses.replace(good, info_hash="ab" * 32),
        dataclasses.replace(good, size=good.size + 1),
        dataclasses.replace(good, torrent=bytes(layer)),
        dataclasses.replace(good, torrent=other.torrent),
        dataclasses.replace(good, torrent=b"d8:announce20:http://evil.example/" + good.torrent[1:]),
    ]
    for m in changed:
        for _ in range(2):  # a failure is not remembered: the next offer is checked again
            with pytest.raises(InvalidManifest):
                checked(m)
    assert checked(good).info_hash == good.info_hash


async def test_checked_manifests_stay_bounded(good: wire.Manifest) -> None:
    parsed: list[str] = []

    def counting(m: wire.Manifest) -> object:
        parsed.append(m.made_by)
        return check_manifest(m)

    checked = CheckedManifests(limit=2, check=counting)  # type: ignore[arg-type]
    a, b, c = (dataclasses.replace(good, made_by=n) for n in ("a", "b", "c"))
    for m in (a, b, a, c, a, b):  # b was the least recently used when c came
        checked(m)
    assert parsed == ["a", "b", "c", "b"]
