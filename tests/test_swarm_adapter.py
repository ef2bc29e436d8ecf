"""The libtorrent adapter against real libtorrent sessions on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peer.errors import LocalError
from peer.transfer import events as ev
from peer.transfer import swarm as swarm_module
from peer.transfer.swarm import (
    ALERT_BATCH,
    ALONE_PEER_REQUESTS,
    SHARED_CONFIRM,
    SHARED_HOLD,
    InvalidTorrent,
    RequestBound,
    SwarmError,
    SwarmSession,
    SwarmSettings,
    TorrentExists,
    UnknownTorrent,
    create_v2_torrent,
    info_hash_of,
    parse_torrent,
)

PIECE = 1 << 20
BLOCK = 16 * 1024  # what libtorrent asks for at a time
SIZE = 16 * PIECE + 12_345  # a short last piece on purpose
WAIT = 15.0  # generous per-step bound; the whole file runs in a few seconds


@dataclass(frozen=True)
class Blob:
    blob_id: str
    data: bytes
    seed_dir: Path
    torrent: bytes
    info_hash: str

    @property
    def num_pieces(self) -> int:
        return -(-len(self.data) // PIECE)

    def piece(self, i: int) -> bytes:
        return self.data[i * PIECE : (i + 1) * PIECE]


@pytest.fixture
async def blob(tmp_path: Path) -> Blob:
    data = os.urandom(SIZE)
    blob_id = hashlib.sha256(data).hexdigest()
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    (seed_dir / blob_id).write_bytes(data)
    torrent = await create_v2_torrent(seed_dir / blob_id, PIECE)
    return Blob(blob_id, data, seed_dir, torrent, info_hash_of(torrent))


def settings(host: str = "127.0.0.1", port: int = 0) -> SwarmSettings:
    return SwarmSettings(listen_host=host, listen_port=port)


@asynccontextmanager
async def session(host: str = "127.0.0.1") -> AsyncIterator[SwarmSession]:
    async with SwarmSession(settings(host)) as s:
        yield s


async def next_matching(
    stream: AsyncIterator[ev.SwarmEvent], pred: Callable[[ev.SwarmEvent], bool]
) -> tuple[ev.SwarmEvent, list[ev.SwarmEvent]]:
    """The first event matching ``pred`` and every event seen up to it."""
    seen: list[ev.SwarmEvent] = []
    async with asyncio.timeout(WAIT):
        async for event in stream:
            seen.append(event)
            if pred(event):
                return event, seen
    raise AssertionError(f"stream ended without a match; saw {seen}")


def is_(cls: type, ih: str, **fields: object) -> Callable[[ev.SwarmEvent], bool]:
    def pred(e: ev.SwarmEvent) -> bool:
        return (
            isinstance(e, cls)
            and getattr(e, "info_hash", None) == ih
            and all(getattr(e, k) == v for k, v in fields.items())
        )

    return pred


# --- torrents --------------------------------------------------------------------------


async def test_create_v2_torrent_is_deterministic(blob: Blob, tmp_path: Path) -> None:
    again = await create_v2_torrent(blob.seed_dir / blob.blob_id, PIECE)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copyfile(blob.seed_dir / blob.blob_id, other / blob.blob_id)
    (other / blob.blob_id).chmod(0o755)  # modes must not leak into the info dict
    copied = await create_v2_torrent(other / blob.blob_id, PIECE)
    linked_dir = tmp_path / "linked"
    linked_dir.mkdir()
    (linked_dir / blob.blob_id).symlink_to(blob.seed_dir / blob.blob_id)
    linked = await create_v2_torrent(linked_dir / blob.blob_id, PIECE)
    assert again == blob.torrent
    assert copied == blob.torrent
    assert linked == blob.torrent

    meta = parse_torrent(blob.torrent)
    assert meta.info_hash == blob.info_hash and len(blob.info_hash) == 64
    assert not meta.has_v1
    assert meta.name == blob.blob_id
    assert [(f.path, f.size) for f in meta.files] == [(blob.blob_id, SIZE)]
    assert (meta.piece_size, meta.num_pieces) == (PIECE, blob.num_pieces)
    assert meta.piece_length(0) == PIECE
    assert meta.piece_length(blob.num_pieces - 1) == SIZE % PIECE
    assert meta.top_level_keys == {"info", "piece layers"}
    # No creation date / creator outside the info dict, nothing but the v2 keys inside.
    assert meta.info_keys == {"file tree", "meta version", "name", "piece length"}


async def test_same_content_other_name_is_another_swarm(blob: Blob, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed.bin"
    shutil.copyfile(blob.seed_dir / blob.blob_id, renamed)
    other = await create_v2_torrent(renamed, PIECE)
    assert info_hash_of(other) != blob.info_hash
    assert info_hash_of(await create_v2_torrent(renamed, 2 * PIECE)) != info_hash_of(other)


async def test_create_rejects_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(SwarmError):
        await create_v2_torrent(empty, PIECE)
    with pytest.raises(SwarmError):
        await create_v2_torrent(tmp_path / "missing", PIECE)
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    for bad_size in (0, 3 * 16384, 8192):
        with pytest.raises(SwarmError):
            await create_v2_torrent(small, bad_size)


@pytest.mark.parametrize("junk", [b"", b"garbage", b"i1e", b"d4:infod4:name1:aee", b"l" * 10_000])
def test_parse_torrent_rejects_junk(junk: bytes) -> None:
    with pytest.raises(InvalidTorrent):
        parse_torrent(junk)


def test_parse_torrent_rejects_tampered_piece_layers(blob: Blob) -> None:
    # "piece layers" is outside the info dict (not covered by the info-hash), but
    # libtorrent checks it against each file's pieces root.
    layers_at = blob.torrent.index(b"12:piece layers")
    tampered = bytearray(blob.torrent)
    tampered[layers_at + 200] ^= 0xFF
    with pytest.raises(InvalidTorrent):
        parse_torrent(bytes(tampered))


# --- sessions -------------------------------------------------------------------------------


async def test_download_from_seeder(blob: Blob, tmp_path: Path) -> None:
    dl_dir = tmp_path / "dl"
    async with session() as seeder, session() as leecher:
        assert seeder.listen_port > 0 and leecher.listen_port != seeder.listen_port
        await seeder.add_torrent(blob.torrent, blob.seed_dir, seed_mode=True)
        stream = leecher.subscribe(blob.info_hash)
        # A consumer of a few kinds (the agent's upload watch) sees only those.
        few = leecher.subscribe(kinds=(ev.PeerConnected, ev.TorrentFinished))
        ih = await leecher.add_torrent(blob.torrent, dl_dir)
        assert ih == blob.info_hash
        leecher.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        _, seen = await next_matching(stream, is_(ev.TorrentFinished, ih))
        await leecher.flush_cache(ih)
        stream.close()
        _, seen_few = await next_matching(few, is_(ev.TorrentFinished, ih))
        few.close()
        assert {type(e) for e in seen_few} == {ev.PeerConnected, ev.TorrentFinished}

        finished = sorted(e.piece for e in seen if isinstance(e, ev.PieceFinished))
        assert finished == list(range(blob.num_pieces))
        assert not any(e.fed_by_us for e in seen if isinstance(e, ev.PieceFinished))
        connected = [e for e in seen if isinstance(e, ev.PeerConnected)]
        assert connected and connected[0].endpoint == ev.Endpoint("127.0.0.1", seeder.listen_port)
        assert any(isinstance(e, ev.TorrentAdded) for e in seen)
        assert (dl_dir / blob.blob_id).read_bytes() == blob.data

        status = await leecher.status(ih)
        assert status.is_seeding and status.progress == 1.0
        assert status.pieces_done == status.num_pieces == blob.num_pieces
        assert status.peer_payload_bytes == SIZE
        assert status.fed_bytes == 0
        assert all(await leecher.have_pieces(ih))
        up = await seeder.status(ih)
        assert up.uploaded_payload_bytes >= SIZE


async def test_in_order_pieces_come_in_index_order_until_turned_off(
    blob: Blob, tmp_path: Path
) -> None:
    def inversions(order: list[int]) -> int:
        return sum(1 for i in range(len(order)) for j in range(i) if order[j] > order[i])

    async with session() as seeder:
        await seeder.add_torrent(blob.torrent, blob.seed_dir, seed_mode=True)
        orders = []
        for in_order in (True, False):
            async with session() as leecher:
                stream = leecher.subscribe(blob.info_hash)
                ih = await leecher.add_torrent(
                    blob.torrent, tmp_path / f"dl-{in_order}", paused=True
                )
                leecher.set_in_order(ih, True)
                if not in_order:
                    leecher.set_in_order(ih, False)  # back to rarest first
                leecher.connect_peer(ih, "127.0.0.1", seeder.listen_port)
                leecher.resume(ih)
                _, seen = await next_matching(stream, is_(ev.TorrentFinished, ih))
                stream.close()
                orders.append([e.piece for e in seen if isinstance(e, ev.PieceFinished)])
    # 17 pieces: rarest first (random among equals) averages 68 inversions (sd 12); in
    # order, hashing threads may finish a few pieces late (11 seen on a loaded machine).
    assert inversions(orders[0]) <= 24, orders[0]
    assert inversions(orders[1]) > 24, orders[1]


def slow_seeder() -> SwarmSettings:
    """A rate-limited seeder: keeps a transfer going long enough to look at it."""
    return SwarmSettings(
        listen_host="127.0.0.1", upload_rate_limit=4_000_000, limit_local_peers=True
    )


async def test_peer_snapshots_while_downloading(blob: Blob, tmp_path: Path) -> None:
    async with SwarmSession(slow_seeder()) as seeder, session() as leecher:
        await seeder.add_torrent(blob.torrent, blob.seed_dir, seed_mode=True)
        ih = await leecher.add_torrent(blob.torrent, tmp_path / "slow")
        leecher.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        async with asyncio.timeout(WAIT):
            while True:  # libtorrent has no event for "a block arrived" in our mask
                partial = await leecher.partial_pieces(ih)
                if partial:
                    break
                await asyncio.sleep(0.05)
        assert all(0 <= p.piece < blob.num_pieces for p in partial)
        assert all(p.blocks_total == PIECE // (16 * 1024) for p in partial if p.piece < 16)
        assert any(p.blocks_requested + p.blocks_received > 0 for p in partial)
        (peer,) = await leecher.peers(ih)
        assert peer.endpoint == ev.Endpoint("127.0.0.1", seeder.listen_port)
        assert peer.is_seed and all(peer.pieces) and len(peer.pieces) == blob.num_pieces
        assert await leecher.piece_availability(ih) == (1,) * blob.num_pieces
        status = await leecher.status(ih)
        assert status.state == "downloading" and status.num_peers == 1 and status.num_seeds == 1
        assert not status.is_seeding and 0.0 <= status.progress < 1.0


async def test_a_fed_piece_keeps_the_blocks_a_peer_sent_of_it(blob: Blob, tmp_path: Path) -> None:
    """What the swarm driver's blame rests on: ``add_piece`` fills only the blocks no
    peer has sent yet. A seeder trickling wrong blocks (its file changed after its check:
    it serves what is on disk) makes a right piece fed over them fail (`HashFailed`,
    ``fed_by_us``), the failure counted against it; the same bytes fed again pass."""
    trickler = SwarmSettings(
        listen_host="127.0.0.1", upload_rate_limit=8 << 10, limit_local_peers=True
    )
    seed_dir = tmp_path / "liar"
    shutil.copytree(blob.seed_dir, seed_dir)
    async with SwarmSession(trickler) as seeder, session() as leecher:
        await seeder.add_torrent(blob.torrent, seed_dir)
        (seed_dir / blob.blob_id).write_bytes(os.urandom(SIZE))
        stream = leecher.subscribe(blob.info_hash)
        ih = await leecher.add_torrent(blob.torrent, tmp_path / "dl")
        leecher.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        async with asyncio.timeout(WAIT):
            while True:  # libtorrent has no event for "a block arrived" in our mask
                sent = [p for p in await leecher.partial_pieces(ih) if p.blocks_received]
                if sent:
                    break
                await asyncio.sleep(0.1)
        piece = sent[0].piece
        assert not await leecher.feed_piece(ih, piece, blob.piece(piece))
        failed = [e for e in stream.take() if isinstance(e, ev.HashFailed)]
        assert failed == [ev.HashFailed(ih, piece, fed_by_us=True)]
        assert [p.num_hashfails for p in await leecher.peers(ih)] == [1]
        assert await leecher.feed_piece(ih, piece, blob.piece(piece))
        stream.close()


async def test_a_drivers_look_is_read_in_one_worker_hop(
    blob: Blob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The download's driver samples status, availability, the download queue and the
    # peers' hash failures together: one thread hop (each wakes a worker and the loop).
    async with SwarmSession(slow_seeder()) as seeder, session() as leecher:
        await seeder.add_torrent(blob.torrent, blob.seed_dir, seed_mode=True)
        ih = await leecher.add_torrent(blob.torrent, tmp_path / "slow")
        leecher.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        async with asyncio.timeout(WAIT):
            while True:  # libtorrent has no event for "a block arrived" in our mask
                if (await leecher.look(ih)).partial:
                    break
                await asyncio.sleep(0.05)
        hops = 0
        to_thread = asyncio.to_thread

        async def counted(fn: Callable[..., Any], /, *args: Any) -> Any:
            nonlocal hops
            hops += 1
            return await to_thread(fn, *args)

        monkeypatch.setattr(asyncio, "to_thread", counted)
        look = await leecher.look(ih)
        assert hops == 1
        assert look.state == "downloading" and not look.is_finished
        assert len(look.have) == blob.num_pieces and not all(look.have)
        assert look.availability == (1,) * blob.num_pieces
        assert all(0 <= p.piece < blob.num_pieces for p in look.partial)
        assert look.hashfails == ((ev.Endpoint("127.0.0.1", seeder.listen_port), 0),)
        # Without the peers (the driver's heartbeat): the rest as read, no peer list.
        bare = await leecher.look(ih, peers=False)
        assert hops == 2
        assert bare.hashfails == () and len(bare.have) == blob.num_pieces
        assert bare.availability == (1,) * blob.num_pieces


def test_request_bound_is_shared_only_while_a_torrent_has_several_peers() -> None:
    a, b, c = (ev.Endpoint("10.0.0.1", p) for p in (1, 2, 3))
    bound = RequestBound(alone=2000, shared=32)
    # one peer on each of two torrents (one downloader, all its files): alone
    assert bound.feed(ev.PeerConnected("t1", a)) is None
    assert bound.feed(ev.PeerConnected("t2", a)) is None
    assert bound.feed(ev.PeerConnected("t1", a)) is None  # the same peer again
    assert bound.feed(ev.PeerConnected("t1", b)) == 32  # a second peer of t1
    assert bound.feed(ev.PeerConnected("t2", c)) is None  # (still shared)
    assert bound.feed(ev.PeerDisconnected("t1", b, "gone")) is None  # t2 has two
    assert bound.feed(ev.PeerDisconnected("t2", c, "gone")) == 2000
    assert bound.feed(ev.PeerDisconnected("t9", c, "never connected")) is None
    assert bound.feed(ev.PeerConnected("t2", b)) == 32
    assert bound.feed(ev.TorrentRemoved("t2")) == 2000
    assert bound.bound == 2000
    # Lost alerts may have hidden a disconnect: back to "alone" until peers connect again.
    bound.feed(ev.PeerConnected("t1", a))
    assert bound.feed(ev.PeerConnected("t1", c)) == 32
    assert bound.feed(ev.AlertsDropped(3)) == 2000
    assert bound.feed(ev.PeerDisconnected("t1", c, "gone")) is None
    assert bound.feed(ev.PeerConnected("t1", c)) is None  # (a alone counted now)
    assert bound.feed(ev.PeerConnected("t1", b)) == 32


def test_request_bound_reconnects_a_torrent_whose_peer_was_told_the_alone_bound() -> None:
    a, b, c = (ev.Endpoint("10.0.0.1", p) for p in (1, 2, 3))
    bound = RequestBound(alone=2000, shared=32, hold=5.0)
    assert bound.feed(ev.PeerConnected("t1", a), 0.0) is None  # told 2000 in its handshake
    assert bound.reconnects() == []
    assert bound.feed(ev.PeerConnected("t1", b), 0.1) == 32  # (b was told 2000 too)
    assert bound.reconnects() == ["t1"]  # named once
    assert bound.reconnects() == []
    # Dropped for the reconnect: t1 counts as shared for `hold` more seconds...
    assert bound.feed(ev.PeerDisconnected("t1", a, "paused"), 0.2) is None
    assert bound.feed(ev.PeerDisconnected("t1", b, "paused"), 0.2) is None
    assert bound.next_tick() == 5.2
    assert bound.tick(3.0) is None
    # ...so that they come back told 32: nothing to reconnect this time.
    assert bound.feed(ev.PeerConnected("t1", a), 2.2) is None
    assert bound.feed(ev.PeerConnected("t1", b), 2.3) is None
    assert bound.next_tick() is None  # shared again, for as long as it has two
    assert bound.reconnects() == []
    # A torrent that turns shared while the bound is already short: nothing either.
    assert bound.feed(ev.PeerConnected("t2", c), 2.4) is None
    assert bound.feed(ev.PeerConnected("t2", a), 2.5) is None
    assert bound.reconnects() == []
    # Alone again: the bound lifts when the last hold is over.
    bound.feed(ev.TorrentRemoved("t2"), 3.0)
    assert bound.feed(ev.PeerDisconnected("t1", b, "done"), 10.0) is None
    assert bound.next_tick() == 15.0
    assert bound.tick(14.9) is None
    assert bound.tick(15.0) == 2000
    assert bound.next_tick() is None
    # A newcomer told 2000 next to a peer told 32: nobody is dropped (any host could
    # have the seeder drop its peers each time the hold is over).
    assert bound.feed(ev.PeerConnected("t1", c), 16.0) == 32
    assert bound.reconnects() == []
    # A peer that came while alone on t1, then a second one: t1 again.
    assert bound.feed(ev.PeerDisconnected("t1", a, "done"), 17.0) is None
    assert bound.tick(22.0) == 2000
    assert bound.feed(ev.PeerConnected("t1", b), 23.0) == 32
    assert bound.reconnects() == ["t1"]


async def test_alerts_of_a_fast_download_are_drained_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each drain wakes every subscriber's task: a piece alert every few ms must not
    # make a drain each. 32 MiB in 16 KiB pieces is 2048 piece alerts.
    torrent, src = await random_blob(tmp_path, 32, piece=BLOCK)
    async with session() as seeder, session() as leecher:
        await seeder.add_torrent(torrent, src, seed_mode=True)
        drains = 0
        drain = leecher._drain

        def counted() -> int:
            nonlocal drains
            popped = drain()
            drains += popped > 0  # (a timer that found nothing woke nobody)
            return popped

        monkeypatch.setattr(leecher, "_drain", counted)
        stream = leecher.subscribe(info_hash_of(torrent))
        ih = await leecher.add_torrent(torrent, tmp_path / "dl")
        leecher.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        t0 = asyncio.get_running_loop().time()
        _, seen = await next_matching(stream, is_(ev.TorrentFinished, ih))
        took = asyncio.get_running_loop().time() - t0
        stream.close()
        pieces = sorted(e.piece for e in seen if isinstance(e, ev.PieceFinished))
        assert pieces == list(range(32 * PIECE // BLOCK))  # every alert still delivered
        # At most one drain per batch interval (and the few direct ones), not per piece.
        assert drains <= took / ALERT_BATCH + 20, (drains, took)
        assert drains < len(pieces) / 4, (drains, len(pieces))


async def test_alerts_that_keep_coming_wake_the_loop_once_per_batch_and_a_taker_once_per_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While piece alerts keep coming, the pipe is left unwatched between batches and the
    # timer alone wakes the loop (a timer started at each signal of the pipe woke it
    # twice per batch); a subscriber that takes what came is told once per drain.
    torrent, src = await random_blob(tmp_path, 32, piece=BLOCK)
    counted: list[SwarmSession] = []
    wakes = {"pipe": 0, "timer": 0, "drains": 0}
    on_fd, on_timer, drain = (
        SwarmSession._on_alert_fd,
        SwarmSession._batched_drain,
        SwarmSession._drain,
    )

    def counting(key: str, fn: Callable[[SwarmSession], object]) -> Callable[..., Any]:
        def run(self: SwarmSession) -> Any:
            if self in counted:
                wakes[key] += 1
            return fn(self)

        return run

    # On the class, before the sessions start: the pipe's reader is bound at start.
    monkeypatch.setattr(SwarmSession, "_on_alert_fd", counting("pipe", on_fd))
    monkeypatch.setattr(SwarmSession, "_batched_drain", counting("timer", on_timer))
    monkeypatch.setattr(SwarmSession, "_drain", counting("drains", drain))
    async with session() as seeder, session() as leecher:
        await seeder.add_torrent(torrent, src, seed_mode=True)
        stream = leecher.subscribe(info_hash_of(torrent))
        ready = asyncio.Event()
        told = 0

        def on_ready() -> None:
            nonlocal told
            told += 1
            ready.set()

        stream.on_ready(on_ready)
        counted.append(leecher)
        ih = await leecher.add_torrent(torrent, tmp_path / "dl")
        leecher.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        seen: list[ev.SwarmEvent] = []
        async with asyncio.timeout(WAIT):
            while not any(is_(ev.TorrentFinished, ih)(e) for e in seen):
                await ready.wait()
                ready.clear()
                seen += stream.take()
        stream.close()
        pieces = sorted(e.piece for e in seen if isinstance(e, ev.PieceFinished))
        assert pieces == list(range(32 * PIECE // BLOCK))  # every alert delivered, in order
        assert told <= wakes["drains"] + 2, (told, wakes)
        assert told < len(pieces) / 4, (told, len(pieces))
        total = wakes["pipe"] + wakes["timer"]
        assert wakes["pipe"] * 3 <= total, (told, wakes)


async def test_an_awaited_alert_is_not_held_back_for_the_batch(
    blob: Blob, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Right after a drain the pipe is left unwatched for ALERT_BATCH; someone awaiting an
    # alert (a flush, a fed piece) has it watched again at once.
    monkeypatch.setattr(swarm_module, "ALERT_BATCH", 1.5)
    async with session() as s:
        ih = await s.add_torrent(blob.torrent, blob.seed_dir, seed_mode=True)
        await asyncio.sleep(1.6)  # quiet: the pipe is watched again
        stream = s.subscribe(ih, kinds=(ev.TorrentPaused,))
        s.pause(ih)
        async with asyncio.timeout(WAIT):
            await anext(stream)  # drained at once; the pipe now unwatched for 1.5 s
        t0 = asyncio.get_running_loop().time()
        await s.flush_cache(ih)
        took = asyncio.get_running_loop().time() - t0
        stream.close()
    assert took < 0.5, took


async def test_a_flush_is_answered_by_its_own_cache_flushed_not_an_earlier_ones(
    tmp_path: Path,
) -> None:
    # Two flushes of one torrent can be under way at once (the download driver's, for
    # its hash follower or a reader, and the agent's resume save every 10 s, or the
    # last flush). libtorrent's cache_flushed names no request, and a flush is a fence
    # that covers only the writes queued before it: answered by the earlier flush's
    # alert, the later one returned before the writes queued between the two were
    # fenced (pieces a reader or the whole-file hash then reads). Each round: 56 pieces
    # fed, a flush, 7 more, a second flush; when the second returns, two answers came.
    # (Without the fix the earlier answer resolved both in 2-3 rounds of 8 here: the
    # rounds make the race show, the last piece is never fed so that libtorrent's own
    # flush at the torrent's end does not answer either.)
    torrent, big = await random_blob(tmp_path, 64)
    data = next(big.iterdir()).read_bytes()
    pieces = [data[i * PIECE : (i + 1) * PIECE] for i in range(64)]
    rounds = []
    for r in range(10):
        async with session() as s:
            stream = s.subscribe(kinds=(ev.TorrentChecked, ev.CacheFlushed))
            ih = await s.add_torrent(torrent, tmp_path / f"fed-{r}")
            await next_matching(stream, is_(ev.TorrentChecked, ih))
            stream.take()
            for i in range(56):
                s.add_piece(ih, i, pieces[i])
            first = asyncio.create_task(s.flush_cache(ih))
            await asyncio.sleep(0)  # the first flush asked; its answer not yet in
            for i in range(56, 63):
                s.add_piece(ih, i, pieces[i])
            async with asyncio.timeout(WAIT):
                await s.flush_cache(ih)
                rounds.append(sum(isinstance(e, ev.CacheFlushed) for e in stream.take()))
                await first
            stream.close()
    assert min(rounds) >= 2, rounds  # one answer for each flush asked


async def test_a_flush_that_is_not_urgent_leaves_the_piece_alerts_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A download's driver flushes for its hash follower and its streaming readers while
    # pieces keep coming; an urgent flush has every alert drained at once while it waits
    # (about one loop turn per piece while a reader streamed, docs/benchmarks.md 8.33).
    # Not urgent, the alerts stay in batches, and each flush is still answered.
    torrent, src = await random_blob(tmp_path, 32, piece=BLOCK)
    counted: list[SwarmSession] = []
    on_fd, on_timer = SwarmSession._on_alert_fd, SwarmSession._batched_drain

    def counting(key: str, fn: Callable[[SwarmSession], object]) -> Callable[..., Any]:
        def run(self: SwarmSession) -> Any:
            if self in counted:
                wakes[key] += 1
            return fn(self)

        return run

    monkeypatch.setattr(SwarmSession, "_on_alert_fd", counting("pipe", on_fd))
    monkeypatch.setattr(SwarmSession, "_batched_drain", counting("timer", on_timer))
    got: dict[bool, tuple[dict[str, int], int]] = {}
    for urgent in (False, True):
        wakes = {"pipe": 0, "timer": 0}
        async with session() as seeder, session() as leecher:
            await seeder.add_torrent(torrent, src, seed_mode=True)
            counted[:] = [leecher]
            ih = await leecher.add_torrent(torrent, tmp_path / f"dl-{urgent}")
            # (not urgent itself: this one waits for the end alone)
            done = leecher.expect(is_(ev.TorrentFinished, ih), urgent=False)
            leecher.connect_peer(ih, "127.0.0.1", seeder.listen_port)
            flushes = 0
            async with asyncio.timeout(WAIT):
                while not done.done():
                    await leecher.flush_cache(ih, urgent=urgent)  # back to back
                    flushes += 1
                await done
            counted.clear()
        got[urgent] = (wakes, flushes)
    (calm, calm_flushes), (eager, _) = got[False], got[True]
    assert calm_flushes > 3, got
    # Not urgent: the timer wakes the loop, the pipe only after quiet spells.
    assert calm["pipe"] * 3 <= calm["pipe"] + calm["timer"], got
    # Urgent (as every flush was): the pipe, at once, most of the time.
    assert eager["pipe"] > 2 * calm["pipe"], got


async def random_blob(tmp_path: Path, mib: int, *, piece: int = PIECE) -> tuple[bytes, Path]:
    """A blob of `mib` random MiB in tmp_path/big, and its v2 torrent of `piece`-byte
    pieces."""
    data = os.urandom(mib * PIECE)
    big = tmp_path / "big"
    big.mkdir()
    blob_id = hashlib.sha256(data).hexdigest()
    (big / blob_id).write_bytes(data)
    return await create_v2_torrent(big / blob_id, piece), big


async def test_a_seeder_tells_its_early_peer_the_short_bound_once_it_is_shared(
    blob: Blob, tmp_path: Path
) -> None:
    """libtorrent tells a peer the bound in the handshake, and the peer then keeps at
    most that many requests with us. The downloader that connected while it was alone
    was told 2000; once a second one shares the seeder, the seeder drops and takes back
    both, and each then asks for at most the short bound."""
    bound = 16
    torrent, big = await random_blob(tmp_path, 64)
    # 0.75 MB/s each once shared: under 1 MiB/s, so no whole pieces either.
    slow = SwarmSettings(
        listen_host="127.0.0.1",
        upload_rate_limit=1_500_000,
        limit_local_peers=True,
        shared_peer_requests=bound,
    )

    async def wanted(s: SwarmSession, ih: str) -> int:
        """What `s` keeps asked of the seeder (0 while not connected to it)."""
        snaps = [p for p in await s.peers(ih) if p.is_seed]
        return snaps[0].requests_out if snaps else 0

    async with SwarmSession(slow) as seeder:
        ih = await seeder.add_torrent(torrent, big, seed_mode=True)
        async with session() as one:
            stream = one.subscribe(ih)
            await one.add_torrent(torrent, tmp_path / "alone")
            one.connect_peer(ih, "127.0.0.1", seeder.listen_port)
            async with asyncio.timeout(WAIT):
                while True:
                    if await wanted(one, ih) > 4 * bound:  # 3 s of 1.5 MB/s: ~270
                        break
                    await asyncio.sleep(0.05)
            async with session() as two:
                await two.add_torrent(torrent, tmp_path / "shared")
                two.connect_peer(ih, "127.0.0.1", seeder.listen_port)
                # The seeder drops `one`, which connects again (libtorrent retries a
                # peer after `min_reconnect_time`, 2 s), as does `two`.
                await next_matching(stream, is_(ev.PeerDisconnected, ih))
                await next_matching(stream, is_(ev.PeerConnected, ih))
                async with asyncio.timeout(WAIT):
                    while True:
                        both = len(await seeder.peers(ih)) == 2
                        if both and min(await wanted(one, ih), await wanted(two, ih)) > 0:
                            break
                        await asyncio.sleep(0.05)
                most = 0
                for _ in range(40):  # 2 s
                    most = max(most, await wanted(one, ih), await wanted(two, ih))
                    await asyncio.sleep(0.05)
                # The drop restarted libtorrent's counters; the seeder's total kept on.
                took = sum([(await s.status(ih)).peer_payload_bytes for s in (one, two)])
                sent = (await seeder.status(ih)).uploaded_payload_bytes
    assert 0 < most <= bound, most
    # The two ends count a block at different moments and are read one after the other:
    # a few blocks apart (seen: 2). Without the carried counters it was 1.2 MB short.
    assert took > 0 and sent >= took - 8 * BLOCK, (sent, took)


async def test_a_downloader_asks_a_slow_peer_for_its_queue_not_for_whole_pieces(
    blob: Blob, tmp_path: Path
) -> None:
    """libtorrent asks a peer for whole pieces (up to 8 MiB, past its request queue) when
    the peer sends a piece within `whole_piece_seconds`; from a peer sending 0.5 MB/s
    (a seeder's share when 8 hosts x 4 files share its 100 Mbit/s port) that was 8
    pieces asked up to 20 s ahead. Now the queue stays near 3 s of the rate."""
    torrent, big = await random_blob(tmp_path, 24)
    slow = SwarmSettings(listen_host="127.0.0.1", upload_rate_limit=500_000, limit_local_peers=True)
    async with SwarmSession(slow) as seeder, session() as one:
        ih = await seeder.add_torrent(torrent, big, seed_mode=True)
        await one.add_torrent(torrent, tmp_path / "dl")
        one.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        most, seen = 0, 0
        async with asyncio.timeout(2 * WAIT):
            while seen < 140:  # 7 s connected (the rate takes a few seconds to show)
                snaps = await one.peers(ih)
                if snaps:
                    seen += 1
                    most = max(most, snaps[0].requests_out)
                await asyncio.sleep(0.05)
    # 3 s of 0.5 MB/s is ~92 blocks (~125 measured); with whole pieces 350 in 4 s.
    assert 0 < most <= 200, most


async def test_a_seeder_shared_by_two_downloaders_keeps_each_ones_queue_short(
    blob: Blob, tmp_path: Path
) -> None:
    """With one peer a downloader keeps a deep queue of requests at the seeder (sized to
    its rate); once a second downloader shares the seeder, each may queue at most
    `shared_peer_requests`, so what it asks for is picked close to when it is sent."""
    bound = 16
    torrent, big = await random_blob(tmp_path, 48)
    # A rate-limited seeder: the transfers last, and queues build up at it.
    slow = SwarmSettings(
        listen_host="127.0.0.1",
        upload_rate_limit=3_000_000,
        limit_local_peers=True,
        shared_peer_requests=bound,
    )

    async def deepest(seeder: SwarmSession, ih: str, peers: int, settle: int) -> int:
        """The longest request queue any of `peers` connected peers kept with the
        seeder over 3 s (looked at every 50 ms), once they were all connected and their
        queues were at most `settle` (what was asked before the bound changed is
        served first)."""
        async with asyncio.timeout(WAIT):
            while True:
                snaps = await seeder.peers(ih)
                if len(snaps) == peers and all(p.requests_queued <= settle for p in snaps):
                    break
                await asyncio.sleep(0.05)
        most = 0
        for _ in range(60):
            snaps = await seeder.peers(ih)
            assert len(snaps) == peers
            most = max([most, *(p.requests_queued for p in snaps)])
            await asyncio.sleep(0.05)
        return most

    async with SwarmSession(slow) as seeder:
        ih = await seeder.add_torrent(torrent, big, seed_mode=True)
        async with session() as one:
            await one.add_torrent(torrent, tmp_path / "alone")
            one.connect_peer(ih, "127.0.0.1", seeder.listen_port)
            alone = await deepest(seeder, ih, 1, ALONE_PEER_REQUESTS)
            async with session() as two:
                await two.add_torrent(torrent, tmp_path / "shared")
                two.connect_peer(ih, "127.0.0.1", seeder.listen_port)
                shared = await deepest(seeder, ih, 2, bound + 1)
    assert alone > 4 * bound, alone  # about 3 s of its rate (1.5 MB/s or more): ~300
    assert 0 < shared <= bound + 1, shared  # (libtorrent refuses one past the bound)


async def test_add_piece_without_peers(blob: Blob, tmp_path: Path) -> None:
    async with session() as s:
        stream = s.subscribe(blob.info_hash)
        ih = await s.add_torrent(blob.torrent, tmp_path / "fed")
        await next_matching(stream, is_(ev.TorrentChecked, ih))
        last = blob.num_pieces - 1
        assert await s.feed_piece(ih, 0, blob.piece(0))
        assert await s.feed_piece(ih, last, blob.piece(last))  # short: no v2 tail padding
        have = await s.have_pieces(ih)
        assert [i for i, h in enumerate(have) if h] == [0, last]
        event, _ = await next_matching(stream, is_(ev.PieceFinished, ih, piece=0))
        assert isinstance(event, ev.PieceFinished) and event.fed_by_us

        for i in range(1, last):
            s.add_piece(ih, i, blob.piece(i))
        await next_matching(stream, is_(ev.TorrentFinished, ih))
        await s.flush_cache(ih)
        assert (tmp_path / "fed" / blob.blob_id).read_bytes() == blob.data
        status = await s.status(ih)
        assert status.fed_bytes == SIZE
        assert status.peer_payload_bytes == 0
        # Already had: nothing to do, still True.
        assert await s.feed_piece(ih, 3, blob.piece(3))


async def test_add_piece_with_wrong_data_fails_hash(blob: Blob, tmp_path: Path) -> None:
    async with session() as s:
        stream = s.subscribe(blob.info_hash)
        ih = await s.add_torrent(blob.torrent, tmp_path / "bad")
        await next_matching(stream, is_(ev.TorrentChecked, ih))
        assert not await s.feed_piece(ih, 1, bytes(PIECE))
        event, _ = await next_matching(stream, is_(ev.HashFailed, ih, piece=1))
        assert isinstance(event, ev.HashFailed) and event.fed_by_us
        assert not (await s.have_pieces(ih))[1]
        status = await s.status(ih)
        assert (status.fed_bytes, status.fed_failed_bytes) == (0, PIECE)
        # The piece stays eligible: good data afterwards completes it.
        assert await s.feed_piece(ih, 1, blob.piece(1))
        assert (await s.have_pieces(ih))[1]


async def test_add_piece_while_files_are_checked(blob: Blob, tmp_path: Path) -> None:
    # A full-size file of zeros makes libtorrent hash every piece before it is ready;
    # libtorrent drops add_piece data in that window, the adapter must hold it.
    save = tmp_path / "checking"
    save.mkdir()
    (save / blob.blob_id).write_bytes(bytes(SIZE))
    async with session() as s:
        stream = s.subscribe(blob.info_hash)
        ih = await s.add_torrent(blob.torrent, save)
        s.add_piece(ih, 2, blob.piece(2))
        async with asyncio.timeout(WAIT):
            assert await s.feed_piece(ih, 4, blob.piece(4))
        _, seen = await next_matching(stream, is_(ev.PieceFinished, ih, piece=2))
        assert any(isinstance(e, ev.TorrentChecked) for e in seen)
        have = await s.have_pieces(ih)
        assert [i for i, h in enumerate(have) if h] == [2, 4]


async def test_waiters_fail_when_their_torrent_is_removed(blob: Blob, tmp_path: Path) -> None:
    async with session() as s:
        ih = await s.add_torrent(blob.torrent, tmp_path / "gone")
        tied = s.expect(lambda e: False, info_hash=ih)  # e.g. a feed_piece verdict
        free = s.expect(lambda e: False)
        await s.remove_torrent(ih)
        with pytest.raises(UnknownTorrent):
            await tied
        assert not free.done()
        free.cancel()


async def test_paused_torrents_take_fed_pieces(blob: Blob, tmp_path: Path) -> None:
    async with session() as s:
        ih = await s.add_torrent(blob.torrent, tmp_path / "paused", paused=True)
        async with asyncio.timeout(WAIT):
            assert await s.feed_piece(ih, 0, blob.piece(0))
        status = await s.status(ih)
        assert status.paused and status.pieces_done == 1


async def test_add_piece_validates_before_libtorrent(blob: Blob, tmp_path: Path) -> None:
    # libtorrent silently drops wrong-length data and crashes on a negative index.
    async with session() as s:
        ih = await s.add_torrent(blob.torrent, tmp_path / "v")
        with pytest.raises(SwarmError):
            s.add_piece(ih, 2, blob.piece(2)[:-1])
        with pytest.raises(SwarmError):
            s.add_piece(ih, 2, blob.piece(2) + b"\0")
        last = blob.num_pieces - 1
        with pytest.raises(SwarmError):
            s.add_piece(ih, last, blob.piece(last).ljust(PIECE, b"\0"))  # padded tail
        for bad in (-1, blob.num_pieces, 10**9):
            with pytest.raises(SwarmError):
                s.add_piece(ih, bad, blob.piece(0))
            with pytest.raises(SwarmError):
                s.set_piece_priority(ih, bad, 1)
        with pytest.raises(SwarmError):
            s.add_piece("0" * 64, 0, blob.piece(0))


async def test_resume_data_keeps_verified_pieces(blob: Blob, tmp_path: Path) -> None:
    save = tmp_path / "resume"
    kept = [0, 5, blob.num_pieces - 1]
    async with session() as s:
        ih = await s.add_torrent(blob.torrent, save)
        for i in kept:
            assert await s.feed_piece(ih, i, blob.piece(i))
        resume = await s.save_resume_data(ih)
        await s.remove_torrent(ih)
        assert s.torrents() == ()
    assert isinstance(resume, bytes) and resume

    async with session() as s2:
        stream = s2.subscribe(blob.info_hash)
        ih = await s2.add_torrent(blob.torrent, save, resume_data=resume)
        await next_matching(stream, is_(ev.TorrentChecked, ih))
        have = await s2.have_pieces(ih)
        assert [i for i, h in enumerate(have) if h] == kept
        with pytest.raises(SwarmError):
            await s2.add_torrent(blob.torrent, save, resume_data=b"junk")


async def test_metadata_from_peer_by_info_hash(blob: Blob, tmp_path: Path) -> None:
    async with session() as seeder, session() as leecher:
        await seeder.add_torrent(blob.torrent, blob.seed_dir, seed_mode=True)
        stream = leecher.subscribe(blob.info_hash)
        ih = await leecher.add_by_info_hash(blob.info_hash, tmp_path / "bymeta")
        with pytest.raises(SwarmError):
            await leecher.torrent_meta(ih)  # nothing known yet
        leecher.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        await next_matching(stream, is_(ev.MetadataReceived, ih))
        meta = await leecher.torrent_meta(ih)
        assert meta.name == blob.blob_id and meta.num_pieces == blob.num_pieces
        await next_matching(stream, is_(ev.TorrentFinished, ih))
        await leecher.flush_cache(ih)
        assert (tmp_path / "bymeta" / blob.blob_id).read_bytes() == blob.data


async def test_seed_mode_needs_the_file(blob: Blob, tmp_path: Path) -> None:
    async with session() as s:
        with pytest.raises(SwarmError, match="missing"):
            await s.add_torrent(blob.torrent, tmp_path / "nowhere", seed_mode=True)
        short = tmp_path / "short"
        short.mkdir()
        (short / blob.blob_id).write_bytes(blob.data[:-1])
        with pytest.raises(SwarmError, match="bytes"):
            await s.add_torrent(blob.torrent, short, seed_mode=True)
        assert s.torrents() == ()


async def test_duplicate_add_is_an_error(blob: Blob, tmp_path: Path) -> None:
    async with session() as s:
        await s.add_torrent(blob.torrent, tmp_path / "a")
        with pytest.raises(TorrentExists):
            await s.add_torrent(blob.torrent, tmp_path / "b")
        with pytest.raises(TorrentExists):
            await s.add_by_info_hash(blob.info_hash, tmp_path / "c")


async def test_taken_port_fails_loudly() -> None:
    async with session() as first:
        with pytest.raises(SwarmError, match="cannot listen") as info:
            async with SwarmSession(settings(port=first.listen_port)):
                pass
    # This machine refused, not a bug in hfswarm: exit 5, and the flag that exists.
    assert isinstance(info.value, LocalError) and info.value.exit_code == 5
    assert info.value.hint is not None and "--bt-listen" in info.value.hint


async def test_banned_host_is_blocked(blob: Blob, tmp_path: Path) -> None:
    # Linux routes all of 127/8 to loopback: a second address gives a second "host".
    async with session("127.0.0.2") as seeder, session() as leecher:
        await seeder.add_torrent(blob.torrent, blob.seed_dir, seed_mode=True)
        stream = leecher.subscribe(blob.info_hash)
        ih = await leecher.add_torrent(blob.torrent, tmp_path / "banned")
        leecher.ban_peer("127.0.0.2")
        assert leecher.banned_peers() == {"127.0.0.2"}
        leecher.connect_peer(ih, "127.0.0.2", seeder.listen_port)
        event, _ = await next_matching(stream, is_(ev.PeerBlocked, ih))
        assert isinstance(event, ev.PeerBlocked) and event.endpoint.host == "127.0.0.2"
        assert (await leecher.status(ih)).peer_payload_bytes == 0

        leecher.unban_peer("127.0.0.2")
        leecher.connect_peer(ih, "127.0.0.2", seeder.listen_port)
        await next_matching(stream, is_(ev.TorrentFinished, ih))


async def test_remove_with_files(blob: Blob, tmp_path: Path) -> None:
    async with session() as s:
        ih = await s.add_torrent(blob.torrent, tmp_path / "gone")
        assert await s.feed_piece(ih, 0, blob.piece(0))
        await s.flush_cache(ih)
        assert (tmp_path / "gone" / blob.blob_id).exists()
        await s.remove_torrent(ih, delete_files=True)
        assert not (tmp_path / "gone" / blob.blob_id).exists()
        with pytest.raises(SwarmError):
            await s.status(ih)


def _fds_and_threads() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


async def test_teardown_leaves_nothing_behind(blob: Blob, tmp_path: Path) -> None:
    await asyncio.to_thread(lambda: None)  # warm the default executor's thread
    before = _fds_and_threads()
    async with session() as s:
        stream = s.events()
        waiter = s.expect(lambda e: False)
        await s.add_torrent(blob.torrent, blob.seed_dir, seed_mode=True)
        assert _fds_and_threads()[1] > before[1]  # libtorrent's own threads
    # Subscribers end, waiters fail, libtorrent's threads and the pipe are gone.
    assert [e async for e in stream if False] == []
    with pytest.raises(SwarmError):
        await waiter
    assert _fds_and_threads()[0] == before[0]
    for _ in range(50):  # the executor may still be unwinding its worker
        if _fds_and_threads()[1] <= before[1] + 1:
            break
        await asyncio.sleep(0.05)
    assert _fds_and_threads()[1] <= before[1] + 1


def test_request_bound_a_peer_coming_and_going_cannot_keep_dropping_an_honest_one() -> None:
    """A peer that connects to a seed torrent every time the hold has run out (a hostile
    LAN host: connecting is all it takes) must not have the seeder drop its honest
    downloader again and again: once that peer came back told the short bound, nothing
    is left to fix. Nor may two connections of its own (the first told the alone bound
    while the honest peer was alone on the torrent) do it."""
    honest = ev.Endpoint("10.0.0.1", 1)
    bound = RequestBound(alone=2000, shared=32, hold=5.0)
    bound.feed(ev.PeerConnected("t1", honest), 0.0)  # alone: told 2000
    now, drops = 1.0, 0
    for cycle in range(10):
        port = 1000 + 10 * cycle
        bound.feed(ev.PeerConnected("t1", ev.Endpoint("10.6.6.6", port)), now)
        bound.feed(ev.PeerConnected("t1", ev.Endpoint("10.6.6.6", port + 1)), now + 0.1)
        if bound.reconnects():  # the seeder pauses and resumes t1: all its peers drop
            drops += 1
            bound.feed(ev.PeerDisconnected("t1", honest, "paused"), now + 0.2)
            bound.feed(ev.PeerConnected("t1", honest), now + 2.5)  # back (told 32)
        bound.feed(ev.PeerDisconnected("t1", ev.Endpoint("10.6.6.6", port), "gone"), now + 0.3)
        bound.feed(ev.PeerDisconnected("t1", ev.Endpoint("10.6.6.6", port + 1), "g"), now + 0.3)
        now += 6.0  # past the hold
        bound.tick(now - 0.5)
    assert drops == 1, drops  # the first, legitimate one (honest had been told 2000)


async def test_a_host_connecting_again_and_again_does_not_keep_a_seeders_peer_dropped(
    tmp_path: Path,
) -> None:
    """A LAN host that connects to a seeded torrent each time the seeder's hold is over
    (connecting is all it takes, in open mode) must not have the seeder drop its honest
    downloader each time: that peer is dropped once, to learn the short bound, and then
    keeps its connection."""
    torrent, big = await random_blob(tmp_path, 64)
    slow = SwarmSettings(
        listen_host="127.0.0.1", upload_rate_limit=1_000_000, limit_local_peers=True
    )
    async with SwarmSession(slow) as seeder, session() as one:
        ih = await seeder.add_torrent(torrent, big, seed_mode=True)
        stream = one.subscribe(ih)
        await one.add_torrent(torrent, tmp_path / "honest")
        one.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        await next_matching(stream, is_(ev.PeerConnected, ih))
        drops = 0

        async def count() -> None:
            nonlocal drops
            async for event in stream:
                if isinstance(event, ev.PeerDisconnected) and event.info_hash == ih:
                    drops += 1

        counter = asyncio.create_task(count())
        try:
            for cycle in range(3):
                async with session() as hostile:
                    await hostile.add_torrent(torrent, tmp_path / f"hostile{cycle}")
                    hostile.connect_peer(ih, "127.0.0.1", seeder.listen_port)
                    async with asyncio.timeout(WAIT):
                        while True:
                            if await hostile.peers(ih):
                                break
                            await asyncio.sleep(0.05)
                    await asyncio.sleep(SHARED_CONFIRM + 0.5)  # past the seeder's check
                await asyncio.sleep(SHARED_HOLD + 1.5)  # the seeder's hold is over
        finally:
            counter.cancel()
        connected = len(await one.peers(ih))
    assert (drops, connected) == (1, 1)


def test_request_bound_names_a_torrent_only_if_it_still_has_several_peers_after_confirm() -> None:
    """libtorrent reports a connection before it finds it a duplicate of one it has (a
    seeder dialling an address its one downloader listens on) and closes it at once: a
    torrent is named for a reconnect only if it still has several peers `confirm`
    seconds after the turn, else its one downloader is dropped (and fetches from the
    mirror while it is gone)."""
    one, dup, two = (ev.Endpoint(f"10.0.0.{i}", i) for i in (1, 2, 3))
    bound = RequestBound(alone=2000, shared=32, hold=5.0, confirm=0.5)
    bound.feed(ev.PeerConnected("t1", one), 0.0)  # told 2000
    assert bound.feed(ev.PeerConnected("t1", dup), 1.0) == 32
    assert bound.next_tick() == 1.5  # the check
    assert bound.reconnects() == []
    bound.feed(ev.PeerDisconnected("t1", dup, "duplicate"), 1.01)
    assert bound.tick(1.5) is None
    assert bound.reconnects() == []  # one keeps its connection
    # A second peer that stays: named once the check is due.
    bound.feed(ev.PeerConnected("t1", two), 20.0)
    assert bound.reconnects() == []
    bound.tick(20.4)
    assert bound.reconnects() == []
    bound.tick(20.5)
    assert bound.reconnects() == ["t1"]
    assert bound.next_tick() is None  # shared for as long as it has two
    bound.feed(ev.TorrentRemoved("t1"), 21.0)
    assert bound._confirming == {}


def test_request_bound_drops_a_torrents_peers_at_most_once_per_gap() -> None:
    """Whatever comes and goes (here a peer that connects again only after the hold,
    told the alone bound again each time), a torrent is named for a reconnect at most
    once per `gap`."""
    honest, other = ev.Endpoint("10.0.0.1", 1), ev.Endpoint("10.6.6.6", 2)
    bound = RequestBound(alone=2000, shared=32, hold=5.0, gap=30.0)
    named, now = [], 0.0
    for _ in range(12):  # a minute
        bound.feed(ev.PeerConnected("t1", honest), now)  # told 2000 (alone)
        bound.feed(ev.PeerConnected("t1", other), now + 0.1)
        if bound.reconnects():
            named.append(now)
        bound.feed(ev.PeerDisconnected("t1", honest, "paused"), now + 0.2)
        bound.feed(ev.PeerDisconnected("t1", other, "paused"), now + 0.2)
        bound.tick(now + 5.3)  # back only after the hold
        now += 5.5
    assert named == [0.0, 33.0], named
    bound.feed(ev.TorrentRemoved("t1"), now)
    assert bound._reconnected == {}


async def test_rejoin_leaves_the_banned_peers_out_of_one_torrent_and_keeps_its_pieces(
    tmp_path: Path,
) -> None:
    """`rejoin`: the torrent again from its resume data, the banned holders refused by
    it alone (the way a downloader that is not one of a blob's feeders drops them, as
    the binding has no per-peer disconnect): the pieces it had stay had, its counters
    go on, it completes from the other peers, and the seeder sends it nothing more,
    not even by dialling it again."""
    torrent, big = await random_blob(tmp_path, 24)
    ih = info_hash_of(torrent)
    # 3 MB/s: the feeder takes 8 s, past the seeder's `min_reconnect_time` (2 s)
    slow = SwarmSettings(
        listen_host="127.0.0.1", upload_rate_limit=3_000_000, limit_local_peers=True
    )
    async with (
        SwarmSession(slow) as seeder,
        session("127.0.0.2") as feeder,
        session("127.0.0.3") as other,
    ):
        await seeder.add_torrent(torrent, big, seed_mode=True)
        for s, d in ((feeder, "f"), (other, "o")):
            await s.add_torrent(torrent, tmp_path / d)
            s.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        other.connect_peer(ih, "127.0.0.2", feeder.listen_port)
        async with asyncio.timeout(WAIT):
            while sum(await other.have_pieces(ih)) < 4:  # noqa: ASYNC110 (libtorrent's state)
                await asyncio.sleep(0.05)
        stream = other.subscribe(ih)
        before = await other.status(ih)
        had = sum(await other.have_pieces(ih))
        sent = await other.rejoin(ih, banned=[("127.0.0.1", seeder.listen_port)])
        assert sent == before.uploaded_payload_bytes  # for the caller's removed tally
        assert (await other.status(ih)).paused
        assert sum(await other.have_pieces(ih)) >= had  # nothing fetched again
        other.connect_peer(ih, "127.0.0.1", seeder.listen_port)  # refused: banned here
        other.connect_peer(ih, "127.0.0.2", feeder.listen_port)
        other.resume(ih)
        hosts: set[str] = set()
        async with asyncio.timeout(4 * WAIT):
            while not (await other.status(ih)).is_finished:
                hosts |= {p.endpoint.host for p in await other.peers(ih)}
                await asyncio.sleep(0.1)
        after = await other.status(ih)
        stream.close()
        to_other = [p for p in await seeder.peers(ih) if p.endpoint.host == "127.0.0.3"]
    assert hosts == {"127.0.0.2"}, hosts  # the feeder only, never the seeder again
    assert not to_other
    assert after.peer_payload_bytes >= before.peer_payload_bytes  # carried on


async def test_resume_data_saved_after_a_rejoin_bans_nobody_in_the_next_run(
    blob: Blob, tmp_path: Path
) -> None:
    """A non-feeder's `rejoin` bans the holders for its torrent; libtorrent writes those
    bans into the resume data the agent saves every 10 s and at exit. Added again from
    it (the agent restarted mid-download), the torrent must still take the blob from
    the holder: before, the holder stayed refused and every byte went to the mirror
    (a ``local/*`` blob, with no mirror, could not be had at all)."""
    save = tmp_path / "dl"
    async with session("127.0.0.1") as seeder, session("127.0.0.2") as s:
        await seeder.add_torrent(blob.torrent, blob.seed_dir, seed_mode=True)
        ih = await s.add_torrent(blob.torrent, save, paused=True)
        await s.rejoin(ih, banned=[("127.0.0.1", seeder.listen_port)])
        resume = await s.save_resume_data(ih)
        await s.remove_torrent(ih)
        # the next run, with the holder the agent now wants
        ih = await s.add_torrent(blob.torrent, save, resume_data=resume)
        s.connect_peer(ih, "127.0.0.1", seeder.listen_port)
        async with asyncio.timeout(WAIT):
            while not (await s.status(ih)).is_finished:  # noqa: ASYNC110 (libtorrent's state)
                await asyncio.sleep(0.05)
