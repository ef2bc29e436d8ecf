"""Small asyncio helpers shared across the package."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from peer.errors import HfswarmError

T = TypeVar("T")


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


async def each_with_ticks(
    items: Iterable[T],
    work: Callable[[T], Coroutine[Any, Any, None]],
    tick: Callable[[], Awaitable[None] | None],
    every: float,
) -> None:
    """`work(item)` for every item at once, and `tick()` (progress) every `every` s until
    they are all done; a failure cancels the rest and is raised as the one error a user
    should see (`primary_error`)."""

    async def ticks() -> None:
        while True:
            await asyncio.sleep(every)
            result = tick()
            if result is not None:
                await result

    try:
        async with asyncio.TaskGroup() as tg:
            ticker = tg.create_task(ticks())
            async with asyncio.TaskGroup() as inner:
                for item in items:
                    inner.create_task(work(item))
            ticker.cancel()
    except BaseExceptionGroup as group:
        raise primary_error(group) from None
