"""The flight of a blob being fetched and its readers (`peer.transfer.inflight`): readers
wait on the flight's signal, never on a clock; the last byte waits for the verified blob;
a source that starts over cuts the readers that had bytes of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from peer.transfer.inflight import InFlightBlob, StreamCut, Window

SIZE = 1000
PART = Path("/partial/blob")
BLOB = Path("/blobs/blob")


async def settle() -> None:
    """Let every ready task run (no clock involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_reader_waits_until_bytes_are_ready_and_is_woken_by_advance() -> None:
    flight = InFlightBlob("b", SIZE)
    async with flight.reader(100) as r:
        waiting = asyncio.create_task(r.readable(SIZE))
        await settle()
        assert not waiting.done()  # nothing written yet
        flight.start(PART, from_peers=False)
        flight.advance(100)  # up to the reader's position: still nothing for it
        await settle()
        assert not waiting.done()
        flight.advance(300)
        await settle()  # woken by the advance itself: no timer was waited for
        assert waiting.done() and waiting.result() == Window(PART, 300)


async def test_readable_returns_at_once_when_bytes_are_ready() -> None:
    flight = InFlightBlob("b", SIZE)
    flight.start(PART, from_peers=False)
    flight.advance(50)
    async with flight.reader(0) as r:
        assert await r.readable(20) == Window(PART, 20)  # never past the asked end
        r.advance(20)
        assert r.window(SIZE) == Window(PART, 50)
        r.advance(50)
        assert r.window(SIZE) is None


async def test_the_last_byte_waits_until_the_blob_is_moved_into_blobs() -> None:
    flight = InFlightBlob("b", SIZE)
    flight.start(PART, from_peers=False)
    flight.advance(SIZE)  # every byte checked, the whole-file hash not yet
    async with flight.reader(0) as r:
        assert r.window(SIZE) == Window(PART, SIZE - 1)
        r.advance(SIZE - 1)
        waiting = asyncio.create_task(r.readable(SIZE))
        await settle()
        assert not waiting.done()
        flight.moved(BLOB)
        await settle()
        assert waiting.result() == Window(BLOB, SIZE)


async def test_a_peer_sourced_answer_never_ends_before_the_whole_file_hash() -> None:
    """Bytes from LAN peers are their word only: a ranged answer over them (a safetensors
    header read, fsspec) gets all but its last byte until the blob is verified, so no
    complete body is ever made of a liar's bytes. The mirror's own bytes are not held."""
    mirror = InFlightBlob("b", SIZE)
    mirror.start(PART, from_peers=False)
    mirror.advance(500)
    peers = InFlightBlob("b", SIZE)
    peers.start(PART, from_peers=True)
    peers.advance(500)
    async with mirror.reader(0) as m, peers.reader(0) as p:
        assert m.window(100) == Window(PART, 100)  # the range [0, 100) complete
        assert p.window(100) == Window(PART, 99)  # its last byte held back
        p.advance(99)
        waiting = asyncio.create_task(p.readable(100))
        peers.advance(SIZE)
        await settle()
        assert not waiting.done()  # every byte on disk: still the peer's word
        peers.moved(BLOB)
        await settle()
        assert waiting.result() == Window(BLOB, 100)
    # A new source resets the rule: the swarm's bytes after a mirror start are held.
    mirror.start(PART, from_peers=True)
    mirror.advance(500)
    async with mirror.reader(0) as m:
        assert m.window(100) == Window(PART, 99)


async def test_a_new_source_cuts_a_reader_that_had_bytes_but_not_one_still_waiting() -> None:
    flight = InFlightBlob("b", SIZE)
    flight.start(PART, from_peers=False)
    flight.advance(400)
    async with flight.reader(0) as sent, flight.reader(500) as waits:
        assert sent.window(SIZE) == Window(PART, 400)  # bytes of this source go out
        sent.advance(400)
        blocked = asyncio.create_task(sent.readable(SIZE))
        assert waits.window(SIZE) is None
        await settle()
        flight.reset()  # the swarm's result failed its hash: the mirror starts over
        await settle()
        with pytest.raises(StreamCut):
            blocked.result()
        with pytest.raises(StreamCut):
            sent.check()
        flight.start(PART, from_peers=False)
        flight.advance(600)
        # Nothing of the old source went to this one: it streams the new one.
        assert waits.window(SIZE) == Window(PART, 600)


async def test_a_failed_fetch_ends_every_reader_at_once_but_lets_a_follower_take_its_error() -> (
    None
):
    """A leader's mirror fetch fails for good: its relay readers end now, one that had
    no byte yet too (it waited for the next before, until its idle cut); a reader that
    follows the fetch (HF_ENDPOINT) and sent nothing takes the fetch's error instead."""
    flight = InFlightBlob("b", SIZE)
    flight.start(PART, from_peers=False)
    flight.advance(400)
    fetch: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
    async with (
        flight.reader(0) as had_bytes,
        flight.reader(400) as relay_at_the_edge,
        flight.reader(400, until=fetch) as follower,
    ):
        assert had_bytes.window(SIZE) == Window(PART, 400)
        had_bytes.advance(400)
        waits = [asyncio.create_task(r.readable(SIZE)) for r in (had_bytes, relay_at_the_edge)]
        following = asyncio.create_task(follower.readable(SIZE))
        await settle()
        assert not any(w.done() for w in [*waits, following])
        flight.fail()
        await settle()
        for w in waits:
            with pytest.raises(StreamCut, match="failed"):
                w.result()
        assert not following.done()  # it waits for the fetch's own error
        fetch.set_exception(OSError("mirror said 404"))
        fetch.exception()
        await settle()
        assert following.result() is None


async def test_a_reader_stops_waiting_when_the_fetch_it_follows_is_done() -> None:
    flight = InFlightBlob("b", SIZE)
    fetch: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
    async with flight.reader(0, until=fetch) as r:
        waiting = asyncio.create_task(r.readable(SIZE))
        await settle()
        assert not waiting.done()
        fetch.set_result(BLOB)  # no bytes ever went through the flight (a cache hit)
        await settle()
        assert waiting.done() and waiting.result() is None
        assert await r.readable(SIZE) is None


async def test_the_fetch_side_sees_the_readers_and_the_lowest_position() -> None:
    flight = InFlightBlob("b", SIZE)
    assert not flight.has_readers and flight.lowest_reader_position() is None
    async with flight.reader(300) as a:
        async with flight.reader(700) as b:
            assert flight.reader_count == 2 and flight.has_readers
            assert flight.lowest_reader_position() == 300
            a.advance(800)
            assert flight.lowest_reader_position() == 700
            a.advance(10)  # positions only move forward
            assert a.position == 800
            b.advance(900)
            assert flight.lowest_reader_position() == 800
        assert flight.reader_count == 1 and flight.lowest_reader_position() == 800
    assert not flight.has_readers and flight.lowest_reader_position() is None


async def test_a_reader_that_leaves_while_waiting_is_unregistered() -> None:
    flight = InFlightBlob("b", SIZE)
    fetch: asyncio.Future[Path] = asyncio.get_running_loop().create_future()

    async def read() -> None:
        async with flight.reader(0, until=fetch) as r:
            await r.readable(SIZE)

    task = asyncio.create_task(read())
    await settle()
    assert flight.reader_count == 1
    task.cancel()  # the client went away
    await settle()
    assert flight.reader_count == 0
    fetch.set_result(BLOB)  # its done-callback was removed with it: nothing to wake
    await settle()


async def test_the_fetch_hears_of_readers_coming_and_going() -> None:
    flight = InFlightBlob("b", SIZE)
    seen: list[int] = []
    with flight.watching_readers(lambda: seen.append(flight.reader_count)):
        async with flight.reader(0) as r:
            r.advance(10)  # a position moving is looked at, not announced
            async with flight.reader(5):
                pass
    async with flight.reader(0):  # no longer watched
        pass
    assert seen == [1, 2, 1, 0]


async def test_a_reader_that_waits_says_so_and_is_counted_until_woken() -> None:
    flight = InFlightBlob("b", SIZE)
    seen: list[tuple[int, int]] = []
    with flight.watching_readers(lambda: seen.append((flight.reader_count, flight.waiting_count))):
        flight.start(PART, from_peers=False)
        async with flight.reader(0) as r:
            waiting = asyncio.create_task(r.readable(SIZE))
            await settle()
            assert flight.waiting_count == 1  # the fetch hears of it: no polling
            flight.advance(400)
            assert await waiting == Window(PART, 400)
            assert flight.waiting_count == 0
            r.advance(400)
            assert r.window(SIZE) is None  # a look alone does not count as waiting
            assert flight.waiting_count == 0
    assert seen == [(1, 0), (1, 1), (0, 0)]


async def test_a_reader_of_a_void_source_is_cut_even_once_the_fetch_it_follows_is_done() -> None:
    """Bytes of a source that went void (a lying swarm's result, fetched again from the
    mirror) reached the client, and the refetch finished before the reader looked again
    (its sendfile chunk took that long): the reader must still be cut, never go on
    with the verified blob's rest and complete a body whose start was the liar's."""
    flight = InFlightBlob("b", SIZE)
    fetch: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
    flight.start(PART, from_peers=True)
    flight.advance(400)
    async with flight.reader(0, until=fetch) as r:
        assert await r.readable(SIZE) == Window(PART, 400)  # the liar's bytes go out ...
        # ... and while they do, the swarm's whole-file hash fails, the mirror
        # fetches the blob again, it is verified and the fetch returns.
        flight.reset()
        flight.start(PART, from_peers=False)
        flight.advance(SIZE)
        flight.moved(BLOB)
        fetch.set_result(BLOB)
        r.advance(400)
        with pytest.raises(StreamCut):
            await r.readable(SIZE)
    # A reader that sent nothing of the void source takes the verified blob.
    async with flight.reader(0, until=fetch) as fresh:
        assert await fresh.readable(SIZE) is None
