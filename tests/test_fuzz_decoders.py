"""Property-based fuzzing (hypothesis) of every decoder that reads from the network:
peer wire messages, tracker messages, manifests, revision manifests, Range headers,
repo paths, mDNS TXT records (and their cluster signatures), signed tracker messages.
Each may only refuse with its package's own error type, never crash with another.

Bounded: about 200 examples per property, no deadline surprises (the whole file runs in
well under 20 s here)."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer import wire
from peer.cache.hf_cache import safe_relpath
from peer.cluster.announce import check_txt
from peer.cluster.credentials import ClusterDir
from peer.discovery.mdns import BadRecord, parse_txt
from peer.errors import HfswarmError, PeerMisbehaved
from peer.hub.protocol import UNSATISFIABLE, parse_range
from peer.manifests import check_manifest
from peer.manifests.manifest import manifest_tree
from peer.manifests.revisions import BadRevisionManifest, accept_revision_manifest
from tracker import messages as m
from tracker.errors import TrackerWireError
from tracker.signing import Membership


@pytest.fixture(scope="module")
def membership(tmp_path_factory: pytest.TempPathFactory) -> Membership:
    d = ClusterDir(tmp_path_factory.mktemp("fuzz-ca"))
    d.init("fuzz")
    return Membership.load(d.ca_cert, d.crl)


FUZZ = settings(
    max_examples=200,
    deadline=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HEX = "0123456789abcdef"
blob_ids = st.one_of(st.text(HEX, min_size=64, max_size=64), st.text(HEX, min_size=40, max_size=40))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=80),
    st.binary(max_size=300),
    blob_ids,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)


def message_maps(types: list[str], fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Maps that look like messages (a known type, version 1 mostly, known field names
    with random values), so the fuzzer gets past the first checks."""
    return st.fixed_dictionaries(
        {"type": st.sampled_from(types), "version": st.sampled_from([1, 1, 1, 0, 2, "1"])},
        optional={f: values for f in fields},
    )


WIRE_TYPES = [
    "manifest", "have_request", "have_response", "claim", "health",
    "revision_request", "revision_file", "revision_manifest", "stream_request",
    "stream_answer",
]  # fmt: skip
WIRE_FIELDS = [
    "blob_id", "size", "piece_size", "info_hash", "torrent", "made_by", "signature",
    "blob_ids", "manifests", "fetching", "claims", "leading", "done", "agent_id", "bt_port",
    "blobs", "repo_type", "repo_id", "revision", "commit", "files", "published_at", "path",
    "stream_port", "start", "status",
]  # fmt: skip
TRACKER_TYPES = [
    "register", "registered", "announce", "announced", "who", "agent", "blob_sources",
    "who_answer", "tracker_health", "problem",
]  # fmt: skip
TRACKER_FIELDS = [
    "agent_id", "api_port", "bt_port", "host", "held", "fetching", "signed_at", "cert",
    "signature", "ttl", "heartbeat", "new", "blob_ids", "holders", "fetchers",
    "holders_total", "fetchers_total", "blobs", "agents", "swarms", "bt_peers", "code",
    "message", "announce_interval",
]  # fmt: skip


def packed(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


wire_bytes = st.one_of(
    st.binary(max_size=2000),
    message_maps(WIRE_TYPES, WIRE_FIELDS).map(packed),
    values.map(packed),
)
tracker_bytes = st.one_of(
    st.binary(max_size=2000),
    message_maps(TRACKER_TYPES, TRACKER_FIELDS).map(packed),
    values.map(packed),
)


@FUZZ
@given(wire_bytes)
def test_peer_wire_decoding_only_raises_wire_errors(data: bytes) -> None:
    try:
        msg = wire.decode(data)
    except wire.WireError:
        return
    # What decodes encodes again (our checks hold for it).
    assert wire.decode(wire.encode(msg)) == msg


@FUZZ
@given(tracker_bytes)
def test_tracker_message_decoding_only_raises_tracker_wire_errors(data: bytes) -> None:
    try:
        msg = m.decode(data)
    except TrackerWireError:
        return
    assert m.decode(m.encode(msg)) == msg


@FUZZ
@given(
    blob_id=blob_ids,
    size=st.integers(1, 1 << 40),
    piece_shift=st.integers(14, 26),
    torrent=st.one_of(
        st.binary(min_size=1, max_size=600),
        st.builds(
            lambda k, v: b"d" + k + v + b"e",
            st.sampled_from([b"4:info", b"8:announce", b"9:piece layers"]),
            st.binary(max_size=300),
        ),
    ),
)
def test_check_manifest_only_raises_invalid_manifest(
    blob_id: str, size: int, piece_shift: int, torrent: bytes
) -> None:
    manifest = wire.Manifest(
        blob_id=blob_id,
        size=size,
        piece_size=1 << piece_shift,
        info_hash="0" * 64,
        torrent=torrent,
        made_by="a" * 32,
    )
    try:
        check_manifest(manifest)
    except PeerMisbehaved:
        pass
    else:
        raise AssertionError("a random torrent passed the manifest check")
    with pytest.raises(PeerMisbehaved):  # the member stream's reading of it
        manifest_tree(manifest)


@FUZZ
@given(
    data=st.one_of(st.binary(max_size=300), wire_bytes.map(lambda b: len(b).to_bytes(4, "big") + b))
)
def test_member_stream_frames_only_raise_wire_errors(data: bytes) -> None:
    """The member stream's frames: a length, then a message; a short read ends in the
    reader's own error (here `EOFError`), never a crash of another kind."""
    view = memoryview(data)

    def recv_exactly(n: int) -> bytes:
        nonlocal view
        if len(view) < n:
            raise EOFError
        out, view = bytes(view[:n]), view[n:]
        return out

    for kind in (wire.StreamRequest, wire.StreamAnswer):
        view = memoryview(data)
        try:
            msg = wire.read_frame(recv_exactly, kind)
        except (wire.WireError, EOFError):
            continue
        assert isinstance(msg, kind)


paths = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(["a", "..", ".", "", "b.bin", "\0", "\\x", "é"]), max_size=5).map(
        "/".join
    ),
)


@FUZZ
@given(
    files=st.lists(
        st.tuples(paths, blob_ids, st.integers(0, 1 << 40)), max_size=6, unique_by=lambda f: f[0]
    ),
    repo_id=st.sampled_from(["local/run", "org/m", "local/x"]),
    revision=st.sampled_from(["main", "v1", "0" * 40]),
    commit=st.text(HEX, min_size=40, max_size=40),
    published_at=st.integers(0, 2**62),
)
def test_revision_manifests_only_raise_their_errors(
    files: list[tuple[str, str, int]], repo_id: str, revision: str, commit: str, published_at: int
) -> None:
    """Through the wire decoder (paths, order, ids), then the acceptance check."""
    raw = {
        "type": "revision_manifest",
        "version": 1,
        "repo_type": "model",
        "repo_id": repo_id,
        "revision": revision,
        "commit": commit,
        "files": [
            {"type": "revision_file", "version": 1, "path": p, "blob_id": b, "size": s}
            for p, b, s in sorted(files)
        ],
        "made_by": "a" * 32,
        "published_at": published_at,
    }
    try:
        msg = wire.decode_as(packed(raw), wire.RevisionManifest)
        accept_revision_manifest(
            msg, repo_type="model", repo_id=repo_id, revision="main", now_ms=int(time.time() * 1000)
        )
    except (wire.WireError, BadRevisionManifest):
        return


@FUZZ
@given(
    header=st.one_of(
        st.none(),
        st.text(max_size=40),
        st.builds(
            lambda a, b, sep: f"bytes={a}{sep}{b}",
            st.one_of(
                st.integers(-5, 2**70).map(str), st.just(""), st.text("0123456789 +-", max_size=8)
            ),
            st.one_of(
                st.integers(-5, 2**70).map(str), st.just(""), st.text("0123456789 +-,", max_size=8)
            ),
            st.sampled_from(["-", ",", "--", " - "]),
        ),
    ),
    size=st.integers(0, 2**64),
)
def test_range_headers_parse_to_a_span_inside_the_body_or_a_refusal(
    header: str | None, size: int
) -> None:
    span = parse_range(header, size)  # never raises
    if span is None or span == UNSATISFIABLE:
        return
    start, end = span
    assert 0 <= start < end <= size


@FUZZ
@given(paths)
def test_repo_paths_are_safe_or_refused_with_unsafe_path(path: str) -> None:
    try:
        p = safe_relpath(path)
    except HfswarmError:
        return
    assert not p.is_absolute() and ".." not in p.parts and "\0" not in path


txt_maps = st.dictionaries(
    st.sampled_from([b"v", b"id", b"bt", b"t", b"s", b"c0", b"c1", b"x"]),
    st.one_of(st.none(), st.binary(max_size=260), st.sampled_from([b"1", b"7852", b"a" * 32])),
    max_size=8,
)


@FUZZ
@given(txt_maps)
def test_mdns_txt_records_parse_or_are_bad_records(props: dict[bytes, bytes | None]) -> None:
    try:
        parse_txt(props)
    except BadRecord:
        return


@FUZZ
@given(txt_maps, st.floats(0, 2e9))
def test_cluster_txt_signatures_are_refused_not_crashed_on(
    membership: Membership, props: dict[bytes, bytes | None], now: float
) -> None:
    why = check_txt(membership, props, "a" * 32, 7852, 7851, now)
    assert why  # nothing random is a member's signature


@FUZZ
@given(
    cert=st.binary(max_size=600),
    signature=st.binary(max_size=64),
    signed_at=st.floats(0, 2e9),
)
def test_signed_tracker_registers_are_refused_not_crashed_on(
    membership: Membership, cert: bytes, signature: bytes, signed_at: float
) -> None:
    msg = m.Register(
        agent_id="a" * 32,
        api_port=7851,
        bt_port=0,
        signed_at=signed_at,
        cert=cert,
        signature=signature,
    )
    assert m.verify(msg, membership, time.time())
