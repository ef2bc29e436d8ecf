"""The swarms' re-surveys of live peers, asked together: while several blobs swarm (the
shards of one repo), each re-survey (peer/agent/fetch.py, every `RESURVEY_EVERY` s) would
ask every live peer about its one blob. Asked at the same moment, they become one
question per peer about all of them: on the simulated LAN's 1 seeder -> 8 hosts, 4 shards
meant 4 requests per peer and per agent every 2 s, each answered with manifests that are
parsed and checked again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from peer.discovery.peer_table import Offer

Ask = Callable[[tuple[str, ...]], Awaitable[dict[str, list[Offer]]]]


class SurveyBatch:
    """`offers(blob_id)`: the live peers' offers for one blob, from one `ask` made for
    every blob asked about within `window` seconds of the first."""

    def __init__(self, ask: Ask, *, window: float = 0.05) -> None:
        self._ask = ask
        self._window = window
        self._waiting: dict[str, list[asyncio.Future[list[Offer]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.asked = 0  # how many `ask` calls were made (tests, benchmarks)

    async def offers(self, blob_id: str) -> list[Offer]:
        future: asyncio.Future[list[Offer]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(blob_id, []).append(future)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            await asyncio.sleep(self._window)
        finally:
            waiting, self._waiting, self._task = self._waiting, {}, None
        live = {b: fs for b, fs in waiting.items() if any(not f.done() for f in fs)}
        if not live:
            return  # every asker gave up (its swarm ended)
        self.asked += 1
        try:
            found = await self._ask(tuple(live))
        except asyncio.CancelledError:
            for f in (f for fs in live.values() for f in fs):
                f.cancel()
            raise
        except Exception as exc:  # each asker handles it as its own survey's failure
            for f in (f for fs in live.values() for f in fs if not f.done()):
                f.set_exception(exc)
            return
        for blob_id, futures in live.items():
            for f in futures:
                if not f.done():
                    f.set_result(found.get(blob_id, []))
