"""The project's one msgpack schema: typed messages, and a decoder for hostile input.

Both protocols use it: the agents' peer protocol (`peer.wire`) and the tracker's
(`tracker.messages`). It lives in `tracker` because the tracker is deployable alone and
imports nothing from `peer`, while `peer` already imports `tracker` (for the tracker
client). The blob-id and agent-id formats are defined here, once, for the same reason.

A message is a frozen dataclass deriving `Message`, with a ``TYPE`` tag, a ``version``
and a ``SCHEMA`` that names a check for each of its fields. On the wire it is one msgpack
map ``{"type": <tag>, "version": <n>, <field>: <value>, ...}``, bytes as msgpack ``bin``,
text as ``str``; a list of messages nests the same maps; keys in field order, so an
encoding is deterministic.

`Codec.decode_as` treats its input as hostile: a total size, per-string/bin/array/map
limits inside the msgpack parser itself (a small message cannot claim a huge
allocation), exact types (``True`` is not an int, an int is not a float, a ``str`` is
not ``bytes``), exact key sets (a field with a default may be absent, so an older peer's
message that lacks a newer field still decodes; an unknown field is never silently
ignored), id formats, value ranges and each message's `Message.cross_check`. It raises
`SchemaError` (`UnknownVersion` for a version the message type does not speak), which
never leaves the protocol module: each translates it into its own package's error.
`Codec.encode` runs the same checks on our own messages and raises ``ValueError`` (our
bug, never the peer's fault).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

# Blob ids as the Hub names them (the names of ``blobs/`` in the HF cache): sha256 for
# LFS files, the git blob sha1 otherwise. Also v2 info-hashes (sha256) and commits (sha1).
SHA256_RE = re.compile(r"[0-9a-f]{64}")
SHA1_RE = re.compile(r"[0-9a-f]{40}")
MAX_AGENT_ID_CHARS = 128
AGENT_ID_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:@-]{{0,{MAX_AGENT_ID_CHARS - 1}}}")


def is_blob_id(value: str) -> bool:
    return bool(SHA256_RE.fullmatch(value) or SHA1_RE.fullmatch(value))


class SchemaError(Exception):
    """A message refused by `Codec.decode_as`; ``str()`` says why, in one line."""


class Invalid(SchemaError):
    """One failed check (what the field checkers raise)."""


class UnknownVersion(SchemaError):
    """A message of a version its type does not speak."""

    def __init__(self, type_: str, version: int, supported: Iterable[int]) -> None:
        speaks = ", ".join(map(str, sorted(supported)))
        super().__init__(f"a version {version} {type_} arrived; this side speaks version {speaks}")
        self.version = version


# --- messages -------------------------------------------------------------------------------

Check = Callable[[Any], Any]


@dataclass(frozen=True, kw_only=True)
class Message:
    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[Mapping[str, Check]] = {}
    VERSIONS: ClassVar[frozenset[int]] = frozenset({1})
    # Fields added after a message type shipped: left out of the encoding while they hold
    # their default, so a peer that predates them still decodes the message.
    OMIT_IF_DEFAULT: ClassVar[frozenset[str]] = frozenset()

    version: int = 1

    def cross_check(self) -> None:
        """Rules that span fields (on decode and on encode): raise `Invalid`."""


M = TypeVar("M", bound=Message)


def _defaults(cls: type[Message]) -> Mapping[str, Any]:
    """The fields that may be absent on the wire, with their defaults (only asked when a
    field is absent or an `OMIT_IF_DEFAULT` one is encoded: no cache needed)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "version":
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _from_map(obj: dict[Any, Any], cls: type[M]) -> M:
    """The message of type `cls` in a map whose tag was already checked."""
    version = obj.get("version")
    if type(version) is not int:
        raise Invalid(f"{cls.TYPE}: the version is missing or not an integer")
    if version not in cls.VERSIONS:
        raise UnknownVersion(cls.TYPE, version, cls.VERSIONS)
    expected = {"type", "version", *cls.SCHEMA}
    absent = expected - set(obj)
    missing = sorted(absent - _defaults(cls).keys()) if absent else []
    extra = sorted(str(k)[:40] for k in set(obj) - expected)
    if missing or extra:
        raise Invalid(f"{cls.TYPE}: missing fields {missing}, unexpected fields {extra}")
    values = {}
    for name, check in cls.SCHEMA.items():
        if name not in obj:
            continue  # a defaulted field an older peer did not send: the default stands
        try:
            values[name] = check(obj[name])
        except Invalid as e:
            raise Invalid(f"{cls.TYPE}.{name}: {e}") from None
    msg = cls(version=version, **values)
    msg.cross_check()
    return msg


# --- field checkers ----------------------------------------------------------------------


def integer(lo: int, hi: int) -> Check:
    def check(v: Any) -> int:
        if type(v) is not int:  # bool is an int subclass; floats are not ints
            raise Invalid(f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise Invalid(f"{v} is outside {lo}..{hi}")
        return v

    return check


def power_of_two(lo: int, hi: int) -> Check:
    base = integer(lo, hi)

    def check(v: Any) -> int:
        v = base(v)
        if v & (v - 1):
            raise Invalid(f"{v} is not a power of two")
        return v

    return check


def boolean(v: Any) -> bool:
    if type(v) is not bool:
        raise Invalid(f"expected a boolean, got {type(v).__name__}")
    return v


def binary(max_len: int, *, min_len: int = 0) -> Check:
    def check(v: Any) -> bytes:
        if type(v) is not bytes:
            raise Invalid(f"expected bytes, got {type(v).__name__}")
        if not min_len <= len(v) <= max_len:
            raise Invalid(f"{len(v)} bytes is outside {min_len}..{max_len}")
        return v

    return check


def text(max_chars: int) -> Check:
    def check(v: Any) -> str:
        if type(v) is not str:
            raise Invalid(f"expected text, got {type(v).__name__}")
        if len(v) > max_chars:
            raise Invalid(f"{len(v)} characters is more than {max_chars}")
        return v

    return check


def matching(pattern: re.Pattern[str], what: str) -> Check:
    """Text that matches `pattern` whole; `what` names it in errors ("an agent id")."""

    def check(v: Any) -> str:
        if type(v) is not str:
            raise Invalid(f"expected {what}, got {type(v).__name__}")
        if not pattern.fullmatch(v):
            raise Invalid(f"{v[:80]!r} is not {what}")
        return v

    return check


def one_of(choices: tuple[str, ...]) -> Check:
    def check(v: Any) -> str:
        if type(v) is not str or v not in choices:
            shown = repr(v[:40]) if isinstance(v, str) else type(v).__name__
            raise Invalid(f"{shown} is not one of {', '.join(choices)}")
        return v

    return check


def blob_id(v: Any) -> str:
    if type(v) is not str or not is_blob_id(v):
        shown = repr(v[:80]) if isinstance(v, str) else type(v).__name__
        raise Invalid(f"{shown} is not a blob id (64 or 40 lowercase hex)")
    return v


sha256_hex = matching(SHA256_RE, "a sha256 hex digest (64 lowercase hex)")
agent_id = matching(AGENT_ID_PATTERN, "an agent id")


def list_of(item: Check, max_items: int, *, unique: bool = False, min_items: int = 0) -> Check:
    def check(v: Any) -> tuple[Any, ...]:
        if type(v) not in (list, tuple):
            raise Invalid(f"expected a list, got {type(v).__name__}")
        if not min_items <= len(v) <= max_items:
            raise Invalid(f"{len(v)} items is outside {min_items}..{max_items}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except Invalid as e:
                raise Invalid(f"item {i}: {e}") from None
        if unique and len(set(out)) != len(out):
            raise Invalid("duplicate items")
        return tuple(out)

    return check


def nested(kind: type[Message]) -> Check:
    """A message of type `kind` inside another (decoded, or as is when encoding:
    `Codec.encode` checks it on its own)."""

    def check(v: Any) -> Message:
        if type(v) is kind:
            return v
        if type(v) is not dict:
            raise Invalid(f"expected a {kind.TYPE} map, got {type(v).__name__}")
        tag = v.get("type")
        if tag != kind.TYPE:
            raise Invalid(f"expected a {kind.TYPE}, got a {str(tag)[:40]}")
        return _from_map(v, kind)

    return check


# --- the codec ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What the msgpack parser allocates at most, per item: set them from the schema
    (the longest text, bytes field, list and message), not from the total size."""

    max_str: int
    max_bin: int
    max_array: int
    max_map: int


class Codec:
    """One protocol: its message types (by tag) and its parser limits."""

    def __init__(self, name: str, types: Iterable[type[Message]], limits: Limits) -> None:
        self.name = name
        self.limits = limits
        self.types: Mapping[str, type[Message]] = {cls.TYPE: cls for cls in types}
        for cls in self.types.values():
            names = [f.name for f in dataclasses.fields(cls) if f.name != "version"]
            if set(cls.SCHEMA) != set(names):
                raise TypeError(f"{cls.__name__}.SCHEMA does not name exactly its fields")
            if not cls.OMIT_IF_DEFAULT <= _defaults(cls).keys():
                raise TypeError(f"{cls.__name__}.OMIT_IF_DEFAULT names a field with no default")

    def decode_as(self, data: bytes, kind: type[M], *, max_bytes: int) -> M:
        """Parse one message of type `kind` (the protocol's base `Message`: any type).
        Raises `SchemaError` for anything malformed."""
        if type(data) is not bytes:
            raise TypeError(f"decode() takes bytes, not {type(data).__name__}")
        if len(data) > max_bytes:
            raise SchemaError(f"a {len(data)}-byte message is over the {max_bytes}-byte limit")
        try:
            obj = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=self.limits.max_str,
                max_bin_len=self.limits.max_bin,
                max_array_len=self.limits.max_array,
                max_map_len=self.limits.max_map,
                max_ext_len=0,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            # ExtraData, FormatError, StackError, limits (ValueError), bad UTF-8
            # (UnicodeDecodeError is a ValueError), unhashable keys (TypeError).
            raise SchemaError(f"not a valid msgpack message: {type(e).__name__}: {e}") from e
        if type(obj) is not dict:
            raise SchemaError(f"expected a msgpack map (a message), got a {type(obj).__name__}")
        tag = obj.get("type")
        cls = self.types.get(tag) if type(tag) is str else None
        try:
            if cls is None:
                raise Invalid(f"unknown message type {str(tag)[:40]!r}")
            msg = _from_map(obj, cls)
        except Invalid as e:
            raise SchemaError(f"invalid message: {e}") from None
        if not isinstance(msg, kind):
            raise SchemaError(f"expected a {kind.TYPE} message, got a {msg.TYPE}")
        return msg

    def encode(self, msg: Message, *, max_bytes: int) -> bytes:
        """msgpack bytes of one of our messages. Raises ``ValueError`` if it is invalid."""
        data: bytes = msgpack.packb(self._to_map(msg), use_bin_type=True)
        if len(data) > max_bytes:
            raise ValueError(
                f"a {msg.TYPE} of {len(data)} bytes exceeds the {max_bytes}-byte limit; "
                "split it into several messages"
            )
        return data

    def _to_map(self, msg: Message) -> dict[str, Any]:
        cls = type(msg)
        if self.types.get(cls.TYPE) is not cls:
            raise ValueError(f"{cls.__name__} is not a {self.name} message")
        if msg.version not in cls.VERSIONS:
            raise ValueError(f"cannot encode a version {msg.version} {cls.TYPE}")
        out: dict[str, Any] = {"type": cls.TYPE, "version": msg.version}
        for f in dataclasses.fields(msg):  # field order: the same bytes every time
            if f.name == "version":
                continue
            value = getattr(msg, f.name)
            try:
                cls.SCHEMA[f.name](value)
            except Invalid as e:
                raise ValueError(f"refusing to send an invalid {cls.TYPE}.{f.name}: {e}") from None
            if f.name in cls.OMIT_IF_DEFAULT and value == _defaults(cls)[f.name]:
                continue
            out[f.name] = self._plain(value)
        try:
            msg.cross_check()
        except Invalid as e:
            raise ValueError(f"refusing to send an invalid {cls.TYPE}: {e}") from None
        return out

    def _plain(self, value: Any) -> Any:
        """Nested messages as maps (each checked by `_to_map`), tuples as lists."""
        if isinstance(value, Message):
            return self._to_map(value)
        if isinstance(value, tuple | list):
            # Lists are homogeneous (the schema checked them): all messages or all scalars.
            if value and isinstance(value[0], Message):
                return [self._to_map(v) for v in value]
            return list(value)
        return value
