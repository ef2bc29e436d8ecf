"""HTTP pieces of the Hub protocol shared by the project's mirror and the agent's Hub
API (HF_ENDPOINT mode): the single-range ``Range`` forms the Hub's clients send, and
errors the way the Hub sends them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal

from aiohttp import web


def hub_error(
    status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An error the way the Hub sends it: huggingface_hub keys on X-Error-Code."""
    # Headers are latin-1 on the wire; a path in the message may not be.
    header_safe = message.encode("ascii", "backslashreplace").decode("ascii")
    h = {"X-Error-Message": header_safe, **(headers or {})}
    if code is not None:
        h["X-Error-Code"] = code
    return web.json_response({"error": message}, status=status, headers=h)


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
