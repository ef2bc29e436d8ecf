"""A minimal bencode encoder (BEP 3) for tracker responses.

The tracker only ever writes bencode (announce answers); it never parses any, so there
is no decoder here, and libtorrent is not imported (the tracker host needs no
libtorrent). Dictionary keys are sorted as raw bytes, as BEP 3 requires.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

# Mapping keys are invariant, so str-keyed and bytes-keyed dicts are listed apart.
Bencodable = (
    int
    | bytes
    | str
    | Sequence["Bencodable"]
    | Mapping[str, "Bencodable"]
    | Mapping[bytes, "Bencodable"]
)


def bencode(value: Bencodable) -> bytes:
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _key(k: object) -> bytes:
    if isinstance(k, str):
        return k.encode()
    if isinstance(k, bytes):
        return k
    raise TypeError(f"bencode dictionary keys are str or bytes, not {type(k).__name__}")


def _encode(value: Bencodable, out: list[bytes]) -> None:
    # bool is an int subclass; refusing it catches a True that was meant as 1 or b"1".
    if isinstance(value, bool):
        raise TypeError("bencode has no booleans")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, bytes):
        out.append(b"%d:" % len(value))
        out.append(value)
    elif isinstance(value, str):
        _encode(value.encode(), out)
    elif isinstance(value, Mapping):
        items = sorted(((_key(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        if any(a[0] == b[0] for a, b in itertools.pairwise(items)):
            raise ValueError("bencode dictionary has duplicate keys")
        out.append(b"d")
        for k, v in items:
            _encode(k, out)
            _encode(v, out)
        out.append(b"e")
    elif isinstance(value, Sequence):
        out.append(b"l")
        for v in value:
            _encode(v, out)
        out.append(b"e")
    else:
        raise TypeError(f"cannot bencode a {type(value).__name__}")
