"""The swarms' re-surveys asked together (peer/agent/survey.py): blobs asked about at
the same moment become one question to the peers; every asker gets its own blob's
offers, or the failure."""

from __future__ import annotations

import asyncio

import pytest

from peer.agent.survey import SurveyBatch
from peer.discovery.peer_table import Offer


def test_blobs_asked_together_are_one_question_and_each_gets_its_own_answer() -> None:
    asked: list[tuple[str, ...]] = []
    marker: dict[str, list[Offer]] = {}

    async def ask(ids: tuple[str, ...]) -> dict[str, list[Offer]]:
        asked.append(ids)
        # An offer list per blob, told apart by identity (no peer needed for that).
        return {b: marker.setdefault(b, []) for b in ids if b != "none"}

    async def main() -> None:
        batch = SurveyBatch(ask, window=0.05)
        got = await asyncio.gather(*(batch.offers(b) for b in ("a", "b", "c", "none")))
        assert asked == [("a", "b", "c", "none")]
        assert got[0] is marker["a"] and got[1] is marker["b"] and got[2] is marker["c"]
        assert got[3] == []
        assert batch.asked == 1
        await batch.offers("a")  # later: a question of its own
        assert asked[1:] == [("a",)]

    asyncio.run(main())


def test_a_failed_question_fails_every_asker_and_a_gone_asker_is_skipped() -> None:
    calls: list[tuple[str, ...]] = []

    async def ask(ids: tuple[str, ...]) -> dict[str, list[Offer]]:
        calls.append(ids)
        raise OSError("peer table unreachable")

    async def main() -> None:
        batch = SurveyBatch(ask, window=0.05)
        gone = asyncio.create_task(batch.offers("x"))
        await asyncio.sleep(0)
        gone.cancel()  # its swarm ended before the question went out
        results = await asyncio.gather(batch.offers("a"), batch.offers("b"), return_exceptions=True)
        assert [type(r) for r in results] == [OSError, OSError]
        assert calls == [("a", "b")]  # "x": nobody waits for it any more

    asyncio.run(main())


@pytest.mark.parametrize("window", [0.0, 0.02])
def test_askers_apart_by_more_than_the_window_ask_separately(window: float) -> None:
    calls: list[tuple[str, ...]] = []

    async def ask(ids: tuple[str, ...]) -> dict[str, list[Offer]]:
        calls.append(ids)
        return {}

    async def main() -> None:
        batch = SurveyBatch(ask, window=window)
        await batch.offers("a")
        await asyncio.sleep(window + 0.01)
        await batch.offers("b")

    asyncio.run(main())
    assert calls == [("a",), ("b",)]
