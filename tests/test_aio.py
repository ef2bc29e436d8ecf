"""peer.aio's bridges between the event loop and threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from peer.aio import in_thread


async def test_in_thread_cancelled_twice_still_waits_for_its_thread() -> None:
    """A second cancel (a TaskGroup aborting after a sibling failed, then the agent
    leaving) must not cut the wait short: the thread may hold a partial open and write
    into it, or tell counters and readers things, after its fetch is gone."""
    release = threading.Event()
    running = threading.Event()
    ended = threading.Event()

    def work() -> None:
        running.set()
        release.wait(10)  # stops a while after being told, as a socket's reader does
        ended.set()

    def cancel() -> None:
        threading.Timer(0.5, release.set).start()

    task = asyncio.create_task(in_thread(work, cancel, "test-work"))
    await asyncio.to_thread(running.wait, 5)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()  # again, while the first is being handled
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended.is_set(), "in_thread returned while its thread still ran"


async def test_in_thread_hands_back_the_result_and_the_error() -> None:
    assert await in_thread(lambda: 7, lambda: None, "t") == 7

    def fail() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await in_thread(fail, lambda: None, "t")
