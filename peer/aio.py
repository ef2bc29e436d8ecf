"""Small asyncio helpers shared across the package."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
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


async def in_thread(work: Callable[[], T], cancel: Callable[[], None], name: str) -> T:
    """`work()` in a thread of its own (not the default executor: a long transfer must not
    take one of the few workers `asyncio.to_thread` shares). Cancelled, this calls
    `cancel()` (which must make `work` return or raise soon, e.g. by shutting its socket
    down) and waits for the thread to end before the cancellation goes on: whatever the
    thread holds (a partial, a file) is closed by then."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as exc:  # handed to the awaiting task, raised there
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody awaits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        cancel()
        # Shielded, and again after every further cancel (a TaskGroup aborting twice):
        # awaited bare, a second cancel would cancel `done` and end the wait at once.
        while not done.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(done)
        if not done.cancelled():
            done.exception()  # retrieved: the thread's error goes with the cancel
        raise


def call_on_loop(
    loop: asyncio.AbstractEventLoop | None,
    fn: Callable[..., T],
    *args: Any,
    timeout: float = 10.0,
) -> T:
    """From a worker thread: `fn(*args)` on the event loop (where the agent's state lives),
    its result or its error back here; `TimeoutError` if the loop does not get to it."""
    if loop is None:
        raise RuntimeError("call_on_loop before the loop was known")
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as exc:  # handed to the waiting thread
            done.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return done.result(timeout)
