"""The member blob stream (cluster mode): the real server (`peer.serving.member_stream`)
and the real client (`peer.transfer.member_stream`) over loopback with mutual TLS and
certificates of real clusters; only the agent around them is left out (its backend is a
table of files here). Real agents use it in tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from peer import wire
from peer.cache.partial import PartialBlob
from peer.cluster.credentials import ClusterDir, Member, load_member
from peer.cluster.tls import Cluster
from peer.config import DownloadOptions, HubSettings
from peer.discovery.peer_table import PeerInfo
from peer.errors import NetworkError, PeerMisbehaved
from peer.hub.metadata import RemoteFile, Snapshot
from peer.manifests import VerifiedBlob, make_manifest
from peer.manifests.manifest import manifest_tree
from peer.manifests.merkle import V2Tree
from peer.mirror_server import MirrorServer, RepoSource
from peer.serving import member_stream as server_side
from peer.serving.member_stream import MemberStreamServer
from peer.transfer.inflight import InFlightBlob
from peer.transfer.member_stream import MemberBusy, MemberStream
from peer.transfer.mirror_blob import BlobCounters, from_mirror
from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for
from peer.transfer.rate import Throttle

MiB = 1 << 20
HOST = "127.0.0.1"


@dataclass
class Held:
    """The agent's side of the server: which verified blobs it shares, what it sent."""

    files: dict[str, Path]
    uploaded: int = 0
    served: list[tuple[str, str, int, str]] = field(default_factory=list)

    def verified_blob_path(self, blob_id: str) -> Path | None:
        return self.files.get(blob_id)

    def count_upload(self, n: int, via: str) -> None:
        assert via == "member-stream"  # the agent counts this way apart
        self.uploaded += n

    def blob_served(self, blob_id: str, address: str, sent: int, via: str) -> None:
        self.served.append((blob_id, address, sent, via))


@dataclass
class Blob:
    path: Path
    file: RemoteFile
    tree: V2Tree


@dataclass
class Lab:
    ca: ClusterDir
    server: Member
    client: Member
    stranger: Member  # a member of another cluster


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("clusters")
    ca = ClusterDir(root / "lab")
    ca.init("lab")
    ca.enroll("server", root / "server.pem")
    ca.enroll("client", root / "client.pem")
    other = ClusterDir(root / "other")
    other.init("other")
    other.enroll("stranger", root / "stranger.pem")
    return Lab(
        ca,
        load_member(root / "server.pem"),
        load_member(root / "client.pem"),
        load_member(root / "stranger.pem"),
    )


async def make_blob(folder: Path, size: int, seed: int = 1) -> Blob:
    data = random.Random(seed).randbytes(size)
    blob_id = hashlib.sha256(data).hexdigest()
    path = folder / f"held-{seed}"
    path.write_bytes(data)
    manifest = await make_manifest(VerifiedBlob(blob_id, size, path), made_by="0" * 32)
    return Blob(path, RemoteFile("model.safetensors", size, blob_id, True), manifest_tree(manifest))


@pytest.fixture
async def blob(tmp_path: Path) -> Blob:
    return await make_blob(tmp_path, 24 * MiB)


def stream(
    member: Member,
    server: Member,
    port: int,
    blob: Blob,
    partial_dir: Path,
    counters: BlobCounters | None = None,
    throttle: Throttle | None = None,
) -> MemberStream:
    cluster = Cluster(member)
    peer = PeerInfo(server.agent_id, HOST, 1, 1, tls=True, stream_port=port)
    return MemberStream(
        cluster,
        cluster.client_context(),
        peer,
        blob.tree,
        blob.file,
        partial_dir,
        counters or BlobCounters(blob.file.size),
        throttle=throttle,
    )


@contextlib.asynccontextmanager
async def serving(member: Member, held: Held, **kw: object) -> AsyncIterator[MemberStreamServer]:
    kw.setdefault("slots", 2)
    async with MemberStreamServer(Cluster(member), HOST, 0, held, **kw) as server:  # type: ignore[arg-type]
        yield server


async def until(cond: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for `cond` (a server's state, seen from its threads), at most `within` s."""
    deadline = time.monotonic() + within
    while not cond() and time.monotonic() < deadline:  # noqa: ASYNC110 (threads change it)
        await asyncio.sleep(0.05)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- a member gets a blob -------------------------------------------------------------


async def test_a_member_streams_a_verified_blob_whose_tree_is_the_manifests(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    held = Held({blob.file.blob_id: blob.path})
    counters = BlobCounters(blob.file.size)
    async with serving(lab.server, held) as server:
        got = await stream(
            lab.client, lab.server, server.port, blob, tmp_path / "partial", counters
        ).fetch()
        await asyncio.sleep(0.1)  # the server's last counts reach the loop
    assert sha256(got.path) == blob.file.blob_id
    assert got.tree == blob.tree and got.received == blob.file.size
    assert counters.from_peers == counters.done == blob.file.size
    assert held.uploaded == blob.file.size
    assert held.served == [(blob.file.blob_id, HOST, blob.file.size, "member-stream")]
    assert server.served == 1


async def test_a_cut_stream_resumes_after_the_checked_pieces(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    """Cancelled mid-way (the thread stops, the partial is closed), the next stream asks
    only for what follows the checked pieces the journal holds."""
    held = Held({blob.file.blob_id: blob.path})
    partial = tmp_path / "partial"
    slow = Throttle(6 * MiB)
    async with serving(lab.server, held, throttle=slow) as server:
        first = asyncio.create_task(
            stream(lab.client, lab.server, server.port, blob, partial).fetch()
        )
        await asyncio.sleep(1.5)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(0.2)
        sent_first = held.uploaded
        assert 0 < sent_first < blob.file.size
        slow.set_rate(0)
        counters = BlobCounters(blob.file.size)
        got = await stream(lab.client, lab.server, server.port, blob, partial, counters).fetch()
        await asyncio.sleep(0.1)
    assert sha256(got.path) == blob.file.blob_id
    (_, _, sent_again, _) = held.served[-1]
    resumed_at = blob.file.size - sent_again
    # Whole pieces only, and some of them: the first stream's checked pieces were kept.
    assert resumed_at > 0 and resumed_at % blob.tree.piece_size == 0, resumed_at
    assert got.received == sent_again == counters.from_peers


async def test_a_stream_the_member_cuts_keeps_its_checked_pieces_counted_from_peers(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    """The member goes away mid-way: the checked pieces stay in the partial for the next
    fetch (which starts after them), so they stay in `from_peers`; the unchecked tail
    does not. Over both fetches every byte is counted once."""
    held = Held({blob.file.blob_id: blob.path})
    partial = tmp_path / "partial"
    counters = BlobCounters(blob.file.size)
    async with serving(lab.server, held, throttle=Throttle(6 * MiB)) as server:
        first = asyncio.create_task(
            stream(lab.client, lab.server, server.port, blob, partial, counters).fetch()
        )
        await asyncio.sleep(1.5)
    with pytest.raises(NetworkError):
        await first
    kept = counters.from_peers
    assert 0 < kept < blob.file.size and kept % blob.tree.piece_size == 0, kept
    async with serving(lab.server, held) as server:
        await stream(lab.client, lab.server, server.port, blob, partial, counters).fetch()
    (_, _, sent_again, _) = held.served[-1]
    assert blob.file.size - sent_again == kept  # the next stream started after them
    assert counters.from_peers == blob.file.size


@pytest.mark.parametrize(
    ("one_cpu", "odd"),
    [(False, 3 * MiB + 300_005), (True, 3 * MiB + 300_005), (True, 0)],
)
async def test_a_stream_from_a_byte_off_the_leaf_grid_gives_the_manifests_tree(
    tmp_path: Path, lab: Lab, one_cpu: bool, odd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiving thread hashes the v2 tree's 16 KiB leaves as they land, on the
    blob's own block grid: a prefix on disk that ends mid-block (a mirror's chunk held
    to an odd byte: journaled, past JOURNAL_STEP in its chunk; written through the page
    cache from there) and a blob whose last block is short still give the manifest's
    tree, with the receiving thread alone (one CPU) too."""
    if one_cpu:
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0})
    blob = await make_blob(tmp_path, 9 * MiB + 777, seed=3)
    data = blob.path.read_bytes()
    partial = tmp_path / "partial"
    pb = PartialBlob(partial, blob.file.blob_id, blob.file.size, chunk_size_for(blob.file.size))
    pb.open()
    pb.write(0, data[:odd])
    pb.held_to(odd)
    pb.close()
    held = Held({blob.file.blob_id: blob.path})
    async with serving(lab.server, held) as server:
        got = await stream(lab.client, lab.server, server.port, blob, partial).fetch()
        await asyncio.sleep(0.1)
    assert sha256(got.path) == blob.file.blob_id
    assert got.tree == blob.tree
    assert got.received == blob.file.size - odd == held.served[-1][2]


async def test_a_busy_member_costs_no_pass_over_the_prefix_on_disk(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    """The prefix a cut stream left is hashed only after a member said "ok": a busy one
    is passed over at once (nothing of the prefix read: no progress reported)."""
    held = Held({blob.file.blob_id: blob.path})
    partial = tmp_path / "partial"
    slow = Throttle(6 * MiB)
    async with serving(lab.server, held, throttle=slow) as server:
        cut = asyncio.create_task(
            stream(lab.client, lab.server, server.port, blob, partial).fetch()
        )
        await asyncio.sleep(1.5)
        cut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cut
        await until(lambda: not server.streams)  # the server saw the cut: its slot is free
        holder = asyncio.create_task(
            stream(lab.client, lab.server, server.port, blob, tmp_path / "other").fetch()
        )
        await until(lambda: server.streams > 0)
        busy = BlobCounters(blob.file.size)
        with pytest.raises(MemberBusy):
            await stream(lab.client, lab.server, server.port, blob, partial, busy).fetch()
        assert busy.done == 0
        slow.set_rate(0)
        await holder
        again = BlobCounters(blob.file.size)
        got = await stream(lab.client, lab.server, server.port, blob, partial, again).fetch()
    assert sha256(got.path) == blob.file.blob_id
    assert again.done == blob.file.size and 0 < again.from_peers < blob.file.size


# -- a lying member ---------------------------------------------------------------------


async def test_a_member_sending_other_bytes_is_caught_within_a_few_pieces(
    tmp_path: Path, lab: Lab
) -> None:
    """The member's manifest is right, its bytes are not: the first piece fails its
    check, the member is to be banned (`PeerMisbehaved`), the partial is thrown away, and
    the stream stops long before the blob's end."""
    blob = await make_blob(tmp_path, 64 * MiB)
    junk = tmp_path / "junk"
    junk.write_bytes(random.Random(99).randbytes(blob.file.size))
    held = Held({blob.file.blob_id: junk})
    partial = tmp_path / "partial"
    counters = BlobCounters(blob.file.size)
    async with serving(lab.server, held) as server:
        with pytest.raises(PeerMisbehaved, match="piece 0 does not match"):
            await stream(lab.client, lab.server, server.port, blob, partial, counters).fetch()
        await asyncio.sleep(0.3)
    assert not (partial / blob.file.blob_id).exists()
    assert not (partial / f"{blob.file.blob_id}.journal").exists()
    assert counters.from_peers == 0 and counters.done == 0
    # 1 piece + the 8 buffers between the threads + what the sockets held.
    assert held.uploaded < blob.file.size // 2, held.uploaded


async def test_a_blob_of_another_size_is_a_lie(tmp_path: Path, lab: Lab, blob: Blob) -> None:
    short = tmp_path / "short"
    short.write_bytes(blob.path.read_bytes()[:-MiB])
    async with serving(lab.server, Held({blob.file.blob_id: short})) as server:
        with pytest.raises(PeerMisbehaved, match="bytes, not"):
            await stream(lab.client, lab.server, server.port, blob, tmp_path / "p").fetch()


async def test_the_member_at_the_address_must_be_the_one_offering(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    async with serving(lab.server, Held({blob.file.blob_id: blob.path})) as server:
        # The client expects the blob from itself (another agent id than the server's).
        with pytest.raises(NetworkError, match="not"):
            await stream(lab.client, lab.client, server.port, blob, tmp_path / "p").fetch()
        assert server.served == 0


# -- who gets a stream ---------------------------------------------------------------------


async def test_a_member_of_another_cluster_gets_nothing(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    held = Held({blob.file.blob_id: blob.path})
    async with serving(lab.server, held) as server:
        with pytest.raises(NetworkError):
            await stream(lab.stranger, lab.server, server.port, blob, tmp_path / "p").fetch()
        await asyncio.sleep(0.2)
    assert held.uploaded == 0 and held.served == []


async def test_a_revoked_member_is_refused_after_the_crl_changes(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    ca = ClusterDir(tmp_path / "lab2")
    ca.init("lab2")
    ca.enroll("server", tmp_path / "s.pem")
    ca.enroll("client", tmp_path / "c.pem")
    server_member, client = load_member(tmp_path / "s.pem"), load_member(tmp_path / "c.pem")
    held = Held({blob.file.blob_id: blob.path})
    async with serving(server_member, held) as server:
        got = await stream(client, server_member, server.port, blob, tmp_path / "p1").fetch()
        assert sha256(got.path) == blob.file.blob_id
        await asyncio.sleep(0.1)
        before = held.uploaded
        assert ca.revoke(name="client") == [client.agent_id]
        with pytest.raises(NetworkError):
            await stream(client, server_member, server.port, blob, tmp_path / "p2").fetch()
        await asyncio.sleep(0.2)
        assert held.uploaded == before


async def test_a_busy_member_says_so(tmp_path: Path, lab: Lab, blob: Blob) -> None:
    """One stream per address at a time: a second one is told "busy" at once (its
    caller swarms the blob), while the first goes on to the end."""
    held = Held({blob.file.blob_id: blob.path})
    slow = Throttle(4 * MiB)
    async with serving(lab.server, held, throttle=slow) as server:
        first = asyncio.create_task(
            stream(lab.client, lab.server, server.port, blob, tmp_path / "p1").fetch()
        )
        await until(lambda: server.streams > 0)  # the first stream holds its slot
        t0 = time.monotonic()
        with pytest.raises(MemberBusy):
            await stream(lab.client, lab.server, server.port, blob, tmp_path / "p2").fetch()
        assert time.monotonic() - t0 < 2.0
        slow.set_rate(0)
        got = await first
    assert sha256(got.path) == blob.file.blob_id


# -- the listener's bounds -----------------------------------------------------------------


async def test_silent_and_trickling_clients_are_cut_at_the_handshake_deadline(
    lab: Lab, blob: Blob
) -> None:
    held = Held({blob.file.blob_id: blob.path})
    context = Cluster(lab.client).client_context()
    async with serving(lab.server, held, handshake_timeout=1.0) as server:

        def silent() -> float:
            t0 = time.monotonic()
            with socket.create_connection((HOST, server.port), timeout=5) as s:
                assert s.recv(1) == b""  # closed by the server, not by our timeout
            return time.monotonic() - t0

        def trickle() -> float:
            """Handshake, then the request frame a byte every 0.3 s."""
            t0 = time.monotonic()
            raw = socket.create_connection((HOST, server.port), timeout=5)
            with context.wrap_socket(raw) as tls:
                frame = wire.encode_frame(wire.StreamRequest(blob_id=blob.file.blob_id, start=0))
                with pytest.raises(OSError):
                    for b in frame:
                        tls.sendall(bytes([b]))
                        time.sleep(0.3)
                    assert tls.recv(1) == b""  # no answer: the deadline passed
                    raise ConnectionResetError
            return time.monotonic() - t0

        waited = await asyncio.gather(asyncio.to_thread(silent), asyncio.to_thread(trickle))
    assert all(w < 4.0 for w in waited), waited
    assert held.uploaded == 0


def _still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


async def test_silent_connections_over_the_cap_make_room_for_a_member(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    """Connections that never send a request fill the address's slots; a member that
    comes then still gets its stream: the oldest silent connection is closed for it."""
    held = Held({blob.file.blob_id: blob.path})
    async with serving(lab.server, held) as server:
        silent = [
            await asyncio.to_thread(socket.create_connection, (HOST, server.port), 5)
            for _ in range(server_side.PER_IP)
        ]
        try:
            await asyncio.sleep(0.3)  # all accepted and counted
            t0 = time.monotonic()
            got = await stream(lab.client, lab.server, server.port, blob, tmp_path / "p").fetch()
            took = time.monotonic() - t0
            still = [_still_open(s) for s in silent]
        finally:
            for s in silent:
                s.close()
    assert sha256(got.path) == blob.file.blob_id
    assert took < 5.0
    assert still == [False] + [True] * (server_side.PER_IP - 1), still


async def test_a_running_stream_is_never_closed_to_make_room(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    """New connections from the same address while a member's stream runs: each one
    evicts the silent one before it, never the stream; over the cap with nothing left
    to evict, a connection is closed at once."""
    held = Held({blob.file.blob_id: blob.path})
    slow = Throttle(8 * MiB)
    async with serving(lab.server, held, throttle=slow) as server:
        fetch = asyncio.create_task(
            stream(lab.client, lab.server, server.port, blob, tmp_path / "p").fetch()
        )
        await until(lambda: server.streams > 0)
        assert server.streams == 1
        extra = [
            await asyncio.to_thread(socket.create_connection, (HOST, server.port), 5)
            for _ in range(server_side.PER_IP + 2)
        ]
        try:
            await asyncio.sleep(0.3)
            open_now = sum(_still_open(s) for s in extra)
            got = await fetch
        finally:
            for s in extra:
                s.close()
    # The stream holds one of the address's slots; the newest silent ones the others.
    assert open_now == server_side.PER_IP - 1, open_now
    assert sha256(got.path) == blob.file.blob_id


async def test_a_member_reading_below_the_floor_rate_gives_its_slot_back(
    lab: Lab, blob: Blob
) -> None:
    held = Held({blob.file.blob_id: blob.path})
    context = Cluster(lab.client).client_context()
    async with serving(lab.server, held, floor_window=1.0) as server:

        def trickle_reader() -> None:
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            raw.settimeout(5)
            raw.connect((HOST, server.port))
            with context.wrap_socket(raw) as tls:
                request = wire.StreamRequest(blob_id=blob.file.blob_id, start=0)
                tls.sendall(wire.encode_frame(request))
                deadline = time.monotonic() + 20
                while not held.served and time.monotonic() < deadline:
                    if not tls.recv(16 << 10):
                        break
                    time.sleep(0.25)  # 64 KiB/s at most: below the 128 KiB/s floor

        t0 = time.monotonic()
        await asyncio.to_thread(trickle_reader)
        took = time.monotonic() - t0
        assert server.streams == 0
    ((_, _, sent, _),) = held.served
    assert sent < blob.file.size // 2, sent
    assert took < 15, took


async def test_an_oversized_request_frame_is_refused_unread(lab: Lab, blob: Blob) -> None:
    context = Cluster(lab.client).client_context()
    held = Held({blob.file.blob_id: blob.path})
    async with serving(lab.server, held) as server:

        def oversized() -> bytes:
            raw = socket.create_connection((HOST, server.port), timeout=5)
            with context.wrap_socket(raw) as tls:
                tls.sendall(wire.FRAME_HEADER.pack(1 << 30))
                try:
                    return tls.recv(1)
                except (ssl.SSLError, OSError):
                    return b""

        assert await asyncio.to_thread(oversized) == b""
    assert held.uploaded == 0


def test_frames_are_bounded_and_typed() -> None:
    good = wire.encode_frame(wire.StreamAnswer(status="ok", size=5))
    data = iter([good[:4], good[4:]])
    assert wire.read_frame(lambda n: next(data), wire.StreamAnswer).size == 5
    too_long = wire.FRAME_HEADER.pack(wire.MAX_FRAME_BYTES + 1)
    with pytest.raises(wire.WireError):
        wire.read_frame(lambda n: too_long, wire.StreamAnswer)
    request = wire.encode_frame(wire.StreamRequest(blob_id="a" * 64, start=0))
    parts = iter([request[:4], request[4:]])
    with pytest.raises(wire.WireError):  # a request where an answer belongs
        wire.read_frame(lambda n: next(parts), wire.StreamAnswer)
    with pytest.raises(wire.WireError):
        wire.decode_as(
            wire.encode(wire.StreamAnswer(status="ok", size=1))[:-1] + b"\xff",
            wire.StreamAnswer,
        )


def test_open_mode_health_carries_no_stream_port() -> None:
    """Older agents refuse unknown fields: an agent without a stream leaves it out."""
    plain = wire.encode(wire.Health(agent_id="a" * 32, bt_port=1, blobs=0))
    assert b"stream_port" not in plain
    member = wire.Health(agent_id="a" * 32, bt_port=1, blobs=0, stream_port=7853)
    assert wire.decode_as(wire.encode(member), wire.Health).stream_port == 7853


# -- review: a liar that cuts, cancellation ------------------------------------------------


@contextlib.contextmanager
def lying_member(
    member: Member, size: int, junk: int, *, then: str, truth: bytes = b""
) -> Iterator[int]:
    """A member (real credentials, the real frames) that answers "ok", sends `truth`
    (the blob's first bytes), then `junk` bytes that are not the blob, then closes the
    stream (`then="close"`) or goes silent (`then="stall"`). Its port."""
    context = Cluster(member).server_context()
    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        # The receiver hangs up once it has seen the lie: the rest may not go out.
        with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
            wire.read_frame(lambda n: wire.recv_exactly(tls, n), wire.StreamRequest)
            tls.sendall(wire.encode_frame(wire.StreamAnswer(status="ok", size=size)))
            tls.sendall(truth + random.Random(5).randbytes(junk))
            if then == "stall":
                stop.wait(60)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("then", ["close", "stall"])
async def test_a_member_that_cuts_its_stream_right_after_a_wrong_piece_is_still_caught(
    tmp_path: Path, lab: Lab, then: str
) -> None:
    """The piece check's verdict wins over the cut that follows it: a liar must not
    escape its ban (and keep being tried) by closing, or going silent, after its lie;
    and a silent one is not waited for until the idle timeout."""
    blob = await make_blob(tmp_path, 64 * MiB)
    partial = tmp_path / "partial"
    with lying_member(lab.server, blob.file.size, 3 * MiB, then=then) as port:
        t0 = time.monotonic()
        with pytest.raises(PeerMisbehaved, match="piece 0 does not match"):
            await stream(lab.client, lab.server, port, blob, partial).fetch()
        took = time.monotonic() - t0
    assert took < 5.0, took
    assert not (partial / blob.file.blob_id).exists()


async def test_a_cancelled_stream_waiting_on_the_download_cap_stops_at_once(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    """The receiving thread waits for the download cap's bucket after each MiB (1 MiB
    at 64 KiB/s: 16 s); a cancel must not wait for it."""
    held = Held({blob.file.blob_id: blob.path})
    cap = Throttle(64 * 1024)
    async with serving(lab.server, held) as server:
        task = asyncio.create_task(
            stream(lab.client, lab.server, server.port, blob, tmp_path / "p", throttle=cap).fetch()
        )
        await asyncio.sleep(1.0)  # the first MiB is in, its wait on the bucket begun
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.monotonic() - t0
    assert took < 2.0, took


async def test_a_cancelled_stream_in_its_handshake_stops_at_once(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    """A member that accepted the connection but never answers the TLS handshake: a
    cancel wakes the thread (not the handshake timeout, 10 s)."""
    listener = socket.create_server((HOST, 0))  # accepts (backlog), never speaks
    try:
        port = listener.getsockname()[1]
        task = asyncio.create_task(
            stream(lab.client, lab.server, port, blob, tmp_path / "p").fetch()
        )
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.monotonic() - t0
    finally:
        listener.close()
    assert took < 2.0, took


async def test_leaving_the_server_wakes_threads_in_their_handshake(lab: Lab) -> None:
    """Silent connections in the TLS handshake: leaving the server shuts them down at
    once (not after the handshake deadline)."""
    server = MemberStreamServer(Cluster(lab.server), HOST, 0, Held({}), slots=2)
    async with server:
        socks = [socket.create_connection((HOST, server.port), timeout=5) for _ in range(3)]
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
    took = time.monotonic() - t0
    for s in socks:
        s.close()
    assert took < 2.0, took


async def test_leaving_the_server_stops_a_stream_waiting_on_the_upload_cap(
    tmp_path: Path, lab: Lab, blob: Blob
) -> None:
    """A stream waits for the upload cap's bucket before each MiB (16 s at 64 KiB/s):
    leaving the server ends that wait, not the join's timeout."""
    held = Held({blob.file.blob_id: blob.path})
    server = MemberStreamServer(
        Cluster(lab.server), HOST, 0, held, slots=2, throttle=Throttle(64 * 1024)
    )
    async with server:
        task = asyncio.create_task(
            stream(lab.client, lab.server, server.port, blob, tmp_path / "p").fetch()
        )
        for _ in range(100):
            if server.streams:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the first MiB waits on the bucket
        t0 = time.monotonic()
    took = time.monotonic() - t0
    with pytest.raises(NetworkError):
        await task
    assert took < 2.0, took


async def test_a_member_revoked_during_its_stream_gets_no_more_bytes(
    tmp_path: Path, blob: Blob
) -> None:
    """The CRL is checked again as a stream runs (a large blob streams for minutes, a
    capped one for hours): once the member is revoked, its stream is cut within a
    second or so."""
    ca = ClusterDir(tmp_path / "lab3")
    ca.init("lab3")
    ca.enroll("server", tmp_path / "s.pem")
    ca.enroll("client", tmp_path / "c.pem")
    server_member, client = load_member(tmp_path / "s.pem"), load_member(tmp_path / "c.pem")
    held = Held({blob.file.blob_id: blob.path})
    slow = Throttle(2 * MiB)  # 12 s for the blob
    async with serving(server_member, held, throttle=slow) as server:
        task = asyncio.create_task(
            stream(client, server_member, server.port, blob, tmp_path / "p").fetch()
        )
        await asyncio.sleep(1.5)
        assert ca.revoke(name="client") == [client.agent_id]
        t0 = time.monotonic()
        with pytest.raises(NetworkError):
            await task
        took = time.monotonic() - t0
        await asyncio.sleep(0.2)
    assert took < 4.0, took
    assert held.uploaded < blob.file.size // 2, held.uploaded


async def test_a_stream_cut_mid_piece_leaves_no_claim_on_the_bytes_it_overwrote(
    tmp_path: Path, lab: Lab
) -> None:
    """An earlier mirror fetch journaled the first half of chunk 0 and all of chunk 2
    (its chunks land out of order); a member stream starts after the half, so it
    rewrites chunk 2 too. A member that sends the right bytes to the end of piece 1,
    then other bytes, and cuts before the piece they are in is whole, gets no verdict:
    what it wrote over chunk 2 (the receiver writes whole 1 MiB buffers, here across
    a piece boundary) was never checked, and the journal must not still claim it (a
    mirror fetch resumes on it: served to HF_ENDPOINT readers, hashed only at the end)."""
    blob = await make_blob(tmp_path, 64 * MiB)
    data = blob.path.read_bytes()
    partial_dir = tmp_path / "partial"
    size, half = blob.file.size, MiB // 2
    with PartialBlob(partial_dir, blob.file.blob_id, size, chunk_size_for(size)) as p:
        assert p.chunk_size == MiB and blob.tree.piece_size == MiB
        p.write(0, data[:half])
        p.advance(0, half)
        p.write(2 * MiB, data[2 * MiB : 3 * MiB])
        p.mark_done(2)
    truth = data[half : 2 * MiB]
    with lying_member(lab.server, size, MiB - MiB // 8, then="close", truth=truth) as port:
        with pytest.raises(NetworkError):
            await stream(lab.client, lab.server, port, blob, partial_dir).fetch()
    with PartialBlob(partial_dir, blob.file.blob_id, size, chunk_size_for(size)) as p:
        claimed = sorted(p.done)
        on_disk = p.data_path.read_bytes()[2 * MiB : 3 * MiB]
    assert claimed == [0, 1], claimed  # the two checked pieces, not chunk 2
    assert on_disk[:half] != data[2 * MiB : 2 * MiB + half]  # what the liar left there


async def test_a_mirror_fetch_resuming_a_cut_streams_pieces_holds_each_answers_last_byte(
    tmp_path: Path, lab: Lab
) -> None:
    """A cut member stream leaves pieces checked only against a member's manifest in the
    journal; the mirror fetch that resumes on them must not hand them to HF_ENDPOINT
    readers as the mirror's own: a ranged answer within them keeps its last byte until
    the whole-file hash (`InFlightBlob.start(from_peers=True)`), as it did while the
    stream ran. (So do bytes a herd leader relayed before its relay broke.)"""
    blob = await make_blob(tmp_path, 24 * MiB)
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(blob.path.read_bytes())
    partial_dir = tmp_path / "partial"
    size = blob.file.size
    held = Held({blob.file.blob_id: blob.path})
    async with serving(lab.server, held, throttle=Throttle(6 * MiB)) as server:
        first = asyncio.create_task(
            stream(lab.client, lab.server, server.port, blob, partial_dir).fetch()
        )
        await asyncio.sleep(1.0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    with PartialBlob(partial_dir, blob.file.blob_id, size, chunk_size_for(size)) as p:
        resumed = p.resume_at(p.contiguous_end(0))
    assert resumed > MiB, resumed
    async with MirrorServer([RepoSource("model", "org/s", src)], rate_cap=2 * MiB) as m:
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{m.url}/api/models/org/s/revision/main") as r,
        ):
            commit = (await r.json())["sha"]
        snap = Snapshot("model", "org/s", "main", commit, (blob.file,), m.url)
        flight = InFlightBlob(blob.file.blob_id, size)
        async with MirrorFetcher(hub, DownloadOptions()) as mf:
            fetch = asyncio.create_task(
                from_mirror(
                    mf,
                    snap,
                    blob.file,
                    partial_dir,
                    BlobCounters(size),
                    done_elsewhere=lambda: False,
                    flight=flight,
                )
            )
            try:
                async with flight.reader(0) as reader:
                    window = await asyncio.wait_for(reader.readable(4096), 10)
                assert not fetch.done()  # the whole-file hash is still to come
            finally:
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fetch
    assert window is not None and window.end == 4095, window


async def test_a_partial_already_whole_on_disk_needs_no_member(tmp_path: Path, lab: Lab) -> None:
    """Every chunk journaled (a fetch killed between its last write and its rename):
    the blob is checked and handed over without asking anyone (a member would answer
    "absent" to a start at the blob's end, and the next source hash it all again)."""
    blob = await make_blob(tmp_path, 8 * MiB)
    size = blob.file.size
    partial_dir = tmp_path / "partial"
    with PartialBlob(partial_dir, blob.file.blob_id, size, chunk_size_for(size)) as p:
        p.write(0, blob.path.read_bytes())
        p.held_to(size)
    with socket.create_server((HOST, 0)) as closed:
        nobody = closed.getsockname()[1]  # nothing listens there once closed
    got = await stream(lab.client, lab.server, nobody, blob, partial_dir).fetch()
    assert sha256(got.path) == blob.file.blob_id and got.received == 0
