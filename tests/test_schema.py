"""The shared msgpack schema (`tracker.schema`) on a protocol of its own, and the two
protocols built on it (`peer.wire`, `tracker.messages`) agreeing on ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import pytest

from peer import wire
from tracker import messages as m
from tracker import schema
from tracker.schema import Codec, Invalid, Limits, SchemaError, UnknownVersion

LIMITS = Limits(max_str=64, max_bin=16, max_array=8, max_map=8)


@dataclass(frozen=True, kw_only=True)
class Msg(schema.Message):
    VERSIONS: ClassVar[frozenset[int]] = frozenset({1, 2})


@dataclass(frozen=True, kw_only=True)
class Part(Msg):
    TYPE: ClassVar[str] = "part"

    name: str


@dataclass(frozen=True, kw_only=True)
class Whole(Msg):
    TYPE: ClassVar[str] = "whole"
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"note"})

    low: int
    high: int = 10
    parts: tuple[Part, ...] = ()
    note: str = ""

    def cross_check(self) -> None:
        if self.low > self.high:
            raise Invalid("whole: low is above high")


Part.SCHEMA = {"name": schema.text(20)}
Whole.SCHEMA = {
    "low": schema.integer(0, 100),
    "high": schema.integer(0, 100),
    "parts": schema.list_of(schema.nested(Part), 4),
    "note": schema.text(20),
}
CODEC = Codec("test", (Part, Whole), LIMITS)


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def decode(data: bytes) -> schema.Message:
    return CODEC.decode_as(data, Msg, max_bytes=1000)


def test_round_trip_in_field_order_and_defaults_left_out_only_when_asked() -> None:
    msg = Whole(low=1, parts=(Part(name="a"),))
    data = CODEC.encode(msg, max_bytes=1000)
    assert list(msgpack.unpackb(data)) == ["type", "version", "low", "high", "parts"]
    assert decode(data) == msg
    noted = Whole(low=1, note="n")
    assert msgpack.unpackb(CODEC.encode(noted, max_bytes=1000))["note"] == "n"
    assert decode(pack({"type": "whole", "version": 2, "low": 3})) == Whole(version=2, low=3)


def test_decode_refuses_what_the_schema_does_not_name() -> None:
    with pytest.raises(SchemaError, match=r"missing fields \['low'\]"):
        decode(pack({"type": "whole", "version": 1}))
    with pytest.raises(SchemaError, match=r"unexpected fields \['x'\]"):
        decode(pack({"type": "whole", "version": 1, "low": 1, "x": 0}))
    with pytest.raises(SchemaError, match="unknown message type"):
        decode(pack({"type": "hole", "version": 1}))
    with pytest.raises(SchemaError, match=r"whole.low: expected an integer, got bool"):
        decode(pack({"type": "whole", "version": 1, "low": True}))
    with pytest.raises(SchemaError, match="low is above high"):
        decode(pack({"type": "whole", "version": 1, "low": 11}))
    with pytest.raises(SchemaError, match="over the 10-byte limit"):
        CODEC.decode_as(pack({"type": "whole", "version": 1, "low": 1}), Msg, max_bytes=10)
    with pytest.raises(SchemaError, match="expected a whole message, got a part"):
        CODEC.decode_as(pack({"type": "part", "version": 1, "name": ""}), Whole, max_bytes=99)


def test_nested_messages_are_checked_and_an_unknown_version_is_not_an_invalid_field() -> None:
    part = {"type": "part", "version": 1, "name": "a"}
    whole = {"type": "whole", "version": 1, "low": 1}
    with pytest.raises(SchemaError, match="item 0: expected a part, got a whole"):
        decode(pack({**whole, "parts": [{**part, "type": "whole"}]}))
    with pytest.raises(SchemaError, match=r"item 1: part.name: expected text"):
        decode(pack({**whole, "parts": [part, {**part, "name": 5}]}))
    with pytest.raises(UnknownVersion, match="a version 3 part arrived") as info:
        decode(pack({**whole, "parts": [{**part, "version": 3}]}))
    assert info.value.version == 3


def test_the_parser_limits_bind_before_any_check() -> None:
    with pytest.raises(SchemaError, match="not a valid msgpack"):
        decode(pack({"type": "part", "version": 1, "name": "x" * 65}))  # max_str
    with pytest.raises(SchemaError, match="not a valid msgpack"):
        decode(pack({"type": "whole", "version": 1, "low": 1, "parts": [{}] * 9}))  # max_array
    with pytest.raises(SchemaError, match="expected a msgpack map"):
        decode(pack([1]))


def test_encode_refuses_our_own_invalid_messages() -> None:
    with pytest.raises(ValueError, match=r"invalid whole.low"):
        CODEC.encode(Whole(low=-1), max_bytes=1000)
    with pytest.raises(ValueError, match=r"invalid part.name"):
        CODEC.encode(Whole(low=1, parts=(Part(name="x" * 21),)), max_bytes=1000)
    with pytest.raises(ValueError, match="low is above high"):
        CODEC.encode(Whole(low=20), max_bytes=1000)
    with pytest.raises(ValueError, match="split it"):
        CODEC.encode(Whole(low=1), max_bytes=5)
    with pytest.raises(ValueError, match="not a test message"):
        CODEC.encode(wire.Health(agent_id="a", bt_port=0, blobs=0), max_bytes=1000)


def test_a_schema_must_name_exactly_its_fields() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Bad(Msg):
        TYPE: ClassVar[str] = "bad"
        OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset({"a"})

        a: int

    Bad.SCHEMA = {"a": schema.integer(0, 1), "b": schema.integer(0, 1)}
    with pytest.raises(TypeError, match="exactly its fields"):
        Codec("bad", (Bad,), LIMITS)
    Bad.SCHEMA = {"a": schema.integer(0, 1)}
    with pytest.raises(TypeError, match="no default"):
        Codec("bad", (Bad,), LIMITS)


def test_blob_ids() -> None:
    assert schema.is_blob_id("a" * 64) and schema.is_blob_id("0" * 40)
    for bad in ("A" * 64, "a" * 63, "a" * 41, "g" * 40, "", "a" * 64 + "\n"):
        assert not schema.is_blob_id(bad), bad


@pytest.mark.parametrize(
    "agent_id", ["h1", "agent-1.lab:7", "a@b", "x" * 128, "", "-a", "x" * 129, "a b", "é"]
)
def test_both_protocols_take_the_same_agent_ids(agent_id: str) -> None:
    def ok(make: Any) -> bool:
        try:
            make()
        except ValueError:
            return False
        return True

    peer = ok(lambda: wire.encode(wire.Health(agent_id=agent_id, bt_port=0, blobs=0)))
    tracker = ok(lambda: m.encode(m.Register(agent_id=agent_id, api_port=1, bt_port=0)))
    assert peer == tracker
    assert peer == (agent_id in ("h1", "agent-1.lab:7", "a@b", "x" * 128))


def test_a_tracker_answer_fits_a_peer_request() -> None:
    assert m.MAX_HELD >= 1 and m.MAX_WHO_BLOBS <= wire.MAX_BLOB_IDS
