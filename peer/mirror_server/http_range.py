"""Parsing of the single-range ``Range`` header forms the Hub's clients send."""

from __future__ import annotations

import re
from typing import Final, Literal

UNSATISFIABLE: Final = "unsatisfiable"

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def parse_range(header: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """Byte span ``[start, end)`` asked for by `header`, for a body of `size` bytes.

    ``None`` means "serve the whole body with 200": no header, a syntax we do not
    support (multiple ranges) or an invalid one - RFC 9110 lets a server ignore those.
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header)
    if m is None:
        return None
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:  # suffix form: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return (max(0, size - n), size)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    end = min(int(last) + 1, size) if last else size
    return (start, end)
