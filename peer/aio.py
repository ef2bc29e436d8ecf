"""Small asyncio helpers shared across the package."""

from __future__ import annotations

import asyncio

from peer.errors import HfswarmError


def leaf_errors(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(leaf_errors(exc))
        else:
            out.append(exc)
    return out


def primary_error(group: BaseExceptionGroup) -> BaseException:
    """The error to show from a TaskGroup failure: our own errors first (they carry the
    user-facing message), then anything but the cancellations the group caused."""
    leaves = [e for e in leaf_errors(group) if not isinstance(e, asyncio.CancelledError)]
    for exc in leaves:
        if isinstance(exc, HfswarmError):
            return exc
    return leaves[0] if leaves else group
