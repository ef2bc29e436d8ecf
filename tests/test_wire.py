"""Wire messages: round trips, and decode() against hostile input."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from peer import wire
from peer.errors import PeerMisbehaved
from peer.wire import (
    Claim,
    HaveRequest,
    HaveResponse,
    Health,
    Manifest,
    UnsupportedVersion,
    WireError,
    decode,
    decode_as,
    encode,
)

SHA256 = "a" * 64
SHA1 = "b" * 40
IH = "c" * 64


def manifest(**changes: Any) -> Manifest:
    base = Manifest(
        blob_id=SHA256,
        size=3 * 2**20 + 1,
        piece_size=2**20,
        info_hash=IH,
        torrent=b"d4:infod...ee",
        made_by="agent-1.lab:7",
        signature=b"",
    )
    return dataclasses.replace(base, **changes)


def as_map(msg: wire.Message) -> dict[str, Any]:
    out: dict[str, Any] = msgpack.unpackb(encode(msg), raw=False)
    return out


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def rejected(data: bytes, match: str | None = None) -> WireError:
    with pytest.raises(WireError, match=match) as info:
        decode(data)
    assert isinstance(info.value, PeerMisbehaved)
    return info.value


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        manifest(),
        manifest(blob_id=SHA1, signature=b"\x00" * 64),
        HaveRequest(blob_ids=(SHA256, SHA1)),
        HaveRequest(blob_ids=()),
        HaveResponse(manifests=(manifest(), manifest(blob_id=SHA1))),
        HaveResponse(manifests=()),
        Health(agent_id="h1", bt_port=6881, blobs=12),
        Health(agent_id="h1", bt_port=0, blobs=0),
    ],
)
def test_round_trip(msg: wire.Message) -> None:
    data = encode(msg)
    assert decode(data) == msg
    assert decode_as(data, type(msg)) == msg
    assert encode(decode(data)) == data  # canonical: same bytes again


def test_encoding_is_deterministic_and_tagged() -> None:
    m = manifest()
    assert encode(m) == encode(manifest())
    got = as_map(m)
    assert got["type"] == "manifest" and got["version"] == wire.WIRE_VERSION
    assert isinstance(got["torrent"], bytes)  # msgpack bin, not str


def test_signing_bytes_ignore_the_signature() -> None:
    a = wire.manifest_signing_bytes(manifest(signature=b"x" * 64))
    assert a == wire.manifest_signing_bytes(manifest())
    assert a != wire.manifest_signing_bytes(manifest(size=5))


def test_decode_as_insists_on_the_type() -> None:
    with pytest.raises(WireError, match="expected"):
        decode_as(encode(HaveRequest(blob_ids=())), Health)


# --- our own bugs are ValueErrors, not the peer's fault --------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        manifest(blob_id="nothex"),
        manifest(size=0),
        manifest(piece_size=3 * 2**20),
        Health(agent_id="", bt_port=1, blobs=0),
        Health(agent_id="a", bt_port=70000, blobs=0),
        HaveRequest(blob_ids=(SHA1, SHA1)),
    ],
)
def test_encode_refuses_invalid_messages(msg: wire.Message) -> None:
    with pytest.raises(ValueError):
        encode(msg)


def test_encode_refuses_oversize_messages() -> None:
    big = manifest(torrent=b"x" * wire.MAX_TORRENT_BYTES)
    many = HaveResponse(manifests=tuple(big for _ in range(9)))  # ~36 MiB
    with pytest.raises(ValueError, match="split"):
        encode(many)


# --- hostile input ---------------------------------------------------------------------------


def test_truncated_messages_are_rejected() -> None:
    data = encode(HaveResponse(manifests=(manifest(),)))
    for cut in (1, 5, len(data) // 2, len(data) - 1):
        rejected(data[:cut])
    rejected(b"")


def test_trailing_garbage_is_rejected() -> None:
    rejected(encode(manifest()) + b"\x00")


@pytest.mark.parametrize("obj", [[1, 2], "manifest", 7, None, b"bytes"])
def test_non_map_top_level_is_rejected(obj: Any) -> None:
    rejected(pack(obj))


def test_unknown_type_is_rejected() -> None:
    m = as_map(manifest()) | {"type": "gimme_root"}
    rejected(pack(m), match="unknown message type")
    rejected(pack({k: v for k, v in as_map(manifest()).items() if k != "type"}))


def test_unknown_version_says_what_to_do() -> None:
    m = as_map(manifest()) | {"version": 2}
    with pytest.raises(UnsupportedVersion) as info:
        decode(pack(m))
    assert "version 2" in info.value.message
    assert info.value.hint and "upgrade" in info.value.hint
    rejected(pack(as_map(manifest()) | {"version": "1"}), match="version")
    rejected(pack({k: v for k, v in as_map(manifest()).items() if k != "version"}))


def test_missing_and_extra_fields_are_rejected() -> None:
    m = as_map(manifest())
    rejected(pack({k: v for k, v in m.items() if k != "made_by"}), match="missing")
    rejected(pack(m | {"comment": "hi"}), match="unexpected")


def test_fields_with_a_default_may_be_absent() -> None:
    # An older agent sends no "claims" (and no signature): still understood.
    m = as_map(manifest())
    assert decode(pack({k: v for k, v in m.items() if k != "signature"})) == manifest()
    answer = HaveResponse(manifests=(manifest(),))
    legacy = {k: v for k, v in as_map(answer).items() if k != "claims"}
    assert decode(pack(legacy)) == answer


def test_claims_round_trip_and_are_checked() -> None:
    claim = Claim(blob_id="c" * 64, size=10, leading=True, done=4)
    answer = HaveResponse(manifests=(), claims=(claim,))
    assert decode(encode(answer)) == answer
    bad = as_map(answer)
    bad["claims"][0]["leading"] = 1  # an int is not a bool
    rejected(pack(bad), match="leading")


def test_a_claims_attempt_is_optional_small_and_left_out_while_0() -> None:
    """A leader's restarts (`Claim.attempt`): an older agent neither sends the field nor
    knows it, so a first attempt's claim is encoded without it; a restarted one carries
    it, bounded."""
    first = Claim(blob_id="c" * 64, size=10, leading=True, done=4)
    assert "attempt" not in as_map(HaveResponse(manifests=(), claims=(first,)))["claims"][0]
    again = dataclasses.replace(first, done=0, attempt=1)
    answer = HaveResponse(manifests=(), claims=(again,))
    assert as_map(answer)["claims"][0]["attempt"] == 1
    assert decode(encode(answer)) == answer
    for value in (-1, wire.MAX_CLAIM_ATTEMPT + 1, True, 1.0):
        bad = as_map(answer)
        bad["claims"][0]["attempt"] = value
        rejected(pack(bad), match="attempt")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", True),  # bool is not an int
        ("size", 1.0),
        ("size", "12"),
        ("size", -1),
        ("size", 0),
        ("size", 2**60),
        ("piece_size", 3 * 2**20),
        ("piece_size", 8192),
        ("piece_size", 2**31),
        ("blob_id", SHA256.upper()),
        ("blob_id", "a" * 63),
        ("blob_id", "a" * 41),
        ("blob_id", b"a" * 64),  # bin, not str
        ("info_hash", SHA1),  # a v2 info-hash is sha256
        ("info_hash", "z" * 64),
        ("torrent", "text, not bytes"),
        ("torrent", b""),
        ("made_by", ""),
        ("made_by", "has space"),
        ("made_by", "-leading-dash"),
        ("made_by", 17),
        ("signature", "sig"),
        ("signature", b"s" * (wire.MAX_SIGNATURE_BYTES + 1)),
    ],
)
def test_manifest_field_types_and_ranges(field: str, value: Any) -> None:
    rejected(pack(as_map(manifest()) | {field: value}), match=field)


def test_health_fields() -> None:
    h = as_map(Health(agent_id="h1", bt_port=1, blobs=1))
    rejected(pack(h | {"bt_port": 65536}))
    rejected(pack(h | {"bt_port": False}))
    rejected(pack(h | {"blobs": -1}))
    rejected(pack(h | {"agent_id": "x" * 129}))


def test_oversize_torrent_is_rejected_by_the_parser() -> None:
    m = as_map(manifest()) | {"torrent": b"x" * (wire.MAX_TORRENT_BYTES + 1)}
    rejected(pack(m))


def test_oversize_message_is_rejected_before_parsing() -> None:
    rejected(b"\x00" * (wire.MAX_MESSAGE_BYTES + 1), match="limit")


def test_huge_lists_are_rejected() -> None:
    ids = [f"{i:064x}" for i in range(wire.MAX_BLOB_IDS + 1)]
    rejected(pack({"type": "have_request", "version": 1, "blob_ids": ids}))
    ok = ids[: wire.MAX_BLOB_IDS]
    got = decode(pack({"type": "have_request", "version": 1, "blob_ids": ok}))
    assert isinstance(got, HaveRequest) and len(got.blob_ids) == wire.MAX_BLOB_IDS


def test_lying_length_prefix_is_rejected_without_allocating() -> None:
    # array32 header claiming 2**31 items, then nothing: must fail fast, not allocate.
    rejected(b"\x81\xa4type\xdd\x80\x00\x00\x00")
    # bin32 header claiming 2 GiB.
    rejected(b"\x81\xa1t\xc6\x7f\xff\xff\xff")


def test_deep_nesting_is_rejected() -> None:
    rejected(b"\x91" * 100_000 + b"\xc0")


def test_duplicate_and_bad_blob_ids_in_requests() -> None:
    base = {"type": "have_request", "version": 1}
    rejected(pack(base | {"blob_ids": [SHA1, SHA1]}), match="duplicate")
    rejected(pack(base | {"blob_ids": [SHA1, "nope"]}), match="item 1")
    rejected(pack(base | {"blob_ids": {"a": 1}}))
    rejected(pack(base | {"blob_ids": SHA1}))


def test_nested_manifests_are_checked_too() -> None:
    bad = as_map(manifest()) | {"size": -5}
    rejected(
        pack({"type": "have_response", "version": 1, "manifests": [bad], "fetching": []}),
        match="size",
    )
    health = as_map(Health(agent_id="h", bt_port=1, blobs=0))
    rejected(
        pack({"type": "have_response", "version": 1, "manifests": [health], "fetching": []}),
        match="expected a manifest",
    )
    future = as_map(manifest()) | {"version": 9}
    with pytest.raises(UnsupportedVersion):
        decode(pack({"type": "have_response", "version": 1, "manifests": [future], "fetching": []}))


def test_non_string_keys_ext_types_and_bad_utf8() -> None:
    rejected(pack({1: 2}))
    rejected(pack({"type": msgpack.ExtType(1, b"x")}))
    rejected(b"\x81\xa4type\xa2\xff\xfe")  # str with invalid UTF-8
    m = as_map(manifest())
    rejected(pack(m | {"size": msgpack.Timestamp(1)}))


def test_fetching_manifests_are_checked_like_held_ones() -> None:
    good = manifest()
    msg = HaveResponse(manifests=(), fetching=(good,))
    assert decode_as(encode(msg), HaveResponse).fetching == (good,)
    bad = as_map(good) | {"info_hash": "zz"}
    rejected(pack({"type": "have_response", "version": 1, "manifests": [], "fetching": [bad]}))


def test_a_downloaders_deals_are_optional_checked_and_said_once_per_blob() -> None:
    """`HaveResponse.deals` (what a downloader deals a blob's feeders over): left out
    while empty, so an older agent decodes the answer; a sha256 per blob, each blob once,
    as many as manifests at most."""
    assert "deals" not in as_map(HaveResponse(manifests=(), fetching=(manifest(),)))
    deal = wire.Deal(blob_id=SHA256, over="d" * 64)
    answer = HaveResponse(manifests=(), fetching=(manifest(),), deals=(deal,))
    assert decode_as(encode(answer), HaveResponse) == answer
    for field, value in (("over", "D" * 64), ("over", "d" * 63), ("over", 5), ("blob_id", "x")):
        bad = as_map(answer)
        bad["deals"][0][field] = value
        rejected(pack(bad))
    twice = as_map(answer)
    twice["deals"].append(twice["deals"][0] | {"over": "e" * 64})
    rejected(pack(twice), match="twice")
    many = as_map(answer)
    many["deals"] = [many["deals"][0] | {"blob_id": f"{k:064x}"} for k in range(257)]
    rejected(pack(many))
