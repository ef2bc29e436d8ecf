"""Faults real LANs and mirrors produce (issue 15): each one with the download or the
agents as separate processes, the project's mirror counting every byte, and at the end
the state of every cache involved (every blob's hash, snapshot links, scan_cache_dir)
and the line the user saw.

The mirror's faults are steered through its control API while a `hfswarm download
--no-agent` runs against it in another process.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cachecheck import assert_cache_ok

from peer.mirror_server import Fault, RepoSource, ThreadedMirror
from peer.verification.hashing import BlobHasher, HashKind

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def make_repo(folder: Path, size: int, seed: int = 15) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "faults"}')
    (folder / "model.safetensors").write_bytes(random.Random(seed).randbytes(size))
    return folder


def sha256(data: bytes) -> str:
    h = BlobHasher(HashKind.SHA256, len(data))
    h.update(data)
    return h.hexdigest()


def download_cmd(mirror: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "peer.cli.main", "download", "org/m", "--no-agent",
            "--mirror", mirror, "--cache-dir", str(cache), "--quiet", *extra]  # fmt: skip


def popen(cmd: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"download ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def check_snapshot(out: str, src: Path, cache: Path) -> None:
    snap = Path(out.strip().splitlines()[-1])
    assert snap.parent.parent.parent == cache
    for rel in ("config.json", "model.safetensors"):
        assert (snap / rel).read_bytes() == (src / rel).read_bytes()
    assert_cache_ok(cache, min_blobs=2)
    partial = cache / "models--org--m" / ".hfswarm" / "partial"
    assert not partial.exists() or not any(partial.iterdir()), list(partial.iterdir())


def model_bytes(m: ThreadedMirror) -> int:
    return m.stats().per_file.get("org/m/model.safetensors", 0)


# -- resume granularity ------------------------------------------------------------------


def test_kill_9_loses_at_most_a_few_mib_whatever_the_chunk_size(tmp_path: Path) -> None:
    """96 MiB: 2 MiB chunks, 16 connections each capped, so the chunks move in waves
    of 16 (32 MiB). Killed in the middle of the third wave (at ~83%), whole-chunk
    journaling lost ~16 MiB (half of every chunk in flight); progress journaled inside
    chunks loses <= 256 KiB per connection, plus what was on the wire."""
    size = 96 * MiB
    src = make_repo(tmp_path / "src", size)
    cache = tmp_path / "cache"
    with ThreadedMirror([RepoSource("model", "org/m", src)], rate_cap=3 * MiB // 2) as m:
        proc = popen(download_cmd(m.url, cache, "--connections", "16"))
        wait_until(lambda: model_bytes(m) >= 80 * MiB, proc, 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = model_bytes(m)
        m.reset_stats()
        m.set_rate_cap(None)
        code, out, err = finish(popen(download_cmd(m.url, cache)))
        second = model_bytes(m)
    assert code == 0, err
    missing = size - first
    print(f"\nkill -9 at {first / MiB:.1f} of {size / MiB:.0f} MiB; missing "
          f"{missing / MiB:.1f} MiB, the restart fetched {second / MiB:.1f} MiB")  # fmt: skip
    assert second <= missing + 6 * MiB, (first, second)
    check_snapshot(out, src, cache)


# -- the mirror misbehaves in the middle of a file ------------------------------------------


@pytest.mark.slow  # ~23 s: the outage must outlast a chunk's whole retry budget
def test_mirror_down_for_a_while_in_the_middle_of_a_file(tmp_path: Path) -> None:
    """Down longer than the whole retry budget of one chunk (6 attempts: 8-16 s of
    backoff): the download rides it out because the mirror was sending this file."""
    outage = float(os.environ.get("HFSWARM_TEST_OUTAGE", "17"))
    size = 32 * MiB
    src = make_repo(tmp_path / "src", size)
    cache = tmp_path / "cache"
    with ThreadedMirror([RepoSource("model", "org/m", src)], client_rate=16 * MiB) as m:
        proc = popen(download_cmd(m.url, cache))
        wait_until(lambda: model_bytes(m) >= 0.4 * size, proc, 60)
        m.down_for(outage)
        t0 = time.monotonic()
        code, out, err = finish(proc)
        took = time.monotonic() - t0
        total = model_bytes(m)
    assert code == 0, err
    assert took >= outage - 1, took  # it really was down
    assert took < outage + 10, took  # and was asked again soon after it came back
    assert total <= size + 6 * MiB, total
    assert "Traceback" not in err
    check_snapshot(out, src, cache)


def run_with_fault(
    tmp_path: Path, fault: Fault, *, at: float = 0.4, size: int = 24 * MiB
) -> tuple[int, str, str, int, Path, Path]:
    """A download with `fault` injected once `at` of the big file was sent. The rate
    is low enough that requests are still made after that (each asks for ~2 s of its
    stream's rate), and a fault with a count must have been used up."""
    src = make_repo(tmp_path / "src", size)
    cache = tmp_path / "cache"
    with ThreadedMirror([RepoSource("model", "org/m", src)], client_rate=4 * MiB) as m:
        proc = popen(download_cmd(m.url, cache, "--connections", "4"))
        wait_until(lambda: model_bytes(m) >= at * size, proc, 60)
        m.add_fault(fault)
        code, out, err = finish(proc)
        total = model_bytes(m)
        fired = fault.times is None or fault not in m.faults()
    assert fired, f"no request after {at:.0%} of the file met the fault: {fault}"
    return code, out, err, total, src, cache


def test_a_200_to_a_range_request_in_the_middle_of_a_file(tmp_path: Path) -> None:
    """One 200 (the whole file) answering a Range request: asked again, not taken as
    'this mirror ignores Range' (which streams the whole file once more)."""
    size = 24 * MiB
    code, out, err, total, src, cache = run_with_fault(
        tmp_path, Fault("ignore_range", path_glob="model.safetensors"), size=size
    )
    assert code == 0, err
    assert total <= size + 6 * MiB, f"{total / MiB:.1f} MiB sent for a {size / MiB} MiB file"
    check_snapshot(out, src, cache)


def test_a_wrong_content_range_once_is_asked_again(tmp_path: Path) -> None:
    code, out, err, total, src, cache = run_with_fault(
        tmp_path, Fault("bad_content_range", path_glob="model.safetensors")
    )
    assert code == 0, err
    assert total <= 24 * MiB + 6 * MiB
    check_snapshot(out, src, cache)


def test_a_mirror_that_keeps_answering_wrong_content_ranges_is_named(tmp_path: Path) -> None:
    code, _, err, _, _, cache = run_with_fault(
        tmp_path, Fault("bad_content_range", path_glob="model.safetensors", times=None)
    )
    assert code == 3, (code, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Content-Range" in err and "model.safetensors" in err, err
    assert "Traceback" not in err and len(lines) <= 2, err
    # nothing unverified in blobs/; what was fetched waits in partial/ for a resume
    report = assert_cache_ok(cache, min_blobs=0)
    assert report.blobs <= 1  # config.json at most
    assert not (cache / "models--org--m" / "snapshots").exists() or not any(
        (cache / "models--org--m" / "snapshots").rglob("model.safetensors")
    )


def test_a_truncated_body_with_a_correct_length_header(tmp_path: Path) -> None:
    """`drop_after`: the Content-Length names the whole span, the body stops short."""
    size = 24 * MiB
    code, out, err, total, src, cache = run_with_fault(
        tmp_path,
        Fault("drop_after", path_glob="model.safetensors", after_bytes=300_000, times=3),
        size=size,
    )
    assert code == 0, err
    assert total <= size + 4 * MiB
    check_snapshot(out, src, cache)


def test_journal_records_progress_inside_a_chunk(tmp_path: Path) -> None:
    import struct

    from peer.cache.partial import JOURNAL_STEP, PartialBlob

    blob = "a" * 64
    chunk = 4 * JOURNAL_STEP
    with PartialBlob(tmp_path, blob, size=3 * chunk, chunk_size=chunk) as p:
        p.write(0, b"x" * (JOURNAL_STEP + 10))
        p.advance(0, JOURNAL_STEP - 1)  # less than one step: not journaled
        assert p.held == {}
        p.advance(0, JOURNAL_STEP + 10)
        p.advance(1, 3 * JOURNAL_STEP)
        p.mark_done(2)
    with open(p.journal_path, "ab") as f:
        f.write(b"\x01\x00\x00")  # a record torn by kill -9
    with PartialBlob(tmp_path, blob, size=3 * chunk, chunk_size=chunk) as q:
        assert q.done == {2} and q.held == {0: JOURNAL_STEP + 10, 1: 3 * JOURNAL_STEP}
        assert q.resume_at(0) == JOURNAL_STEP + 10 and q.resume_at(1) == chunk + 3 * JOURNAL_STEP
        assert q.done_bytes() == chunk + 4 * JOURNAL_STEP + 10
        q.advance(0, JOURNAL_STEP + 20)  # no step further: nothing new
        q.mark_done(0)
    with PartialBlob(tmp_path, blob, size=3 * chunk, chunk_size=chunk) as r:
        assert r.done == {0, 2} and r.held == {1: 3 * JOURNAL_STEP}
    # an older agent's journal (whole chunks, 4-byte records) is carried over
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / blob).write_bytes(b"\0" * 3 * chunk)
    header = struct.pack("<8sQQ", b"HFSWJ1\0\0", 3 * chunk, chunk)
    (v1 / f"{blob}.journal").write_bytes(header + struct.pack("<II", 0, 2))
    with PartialBlob(v1, blob, size=3 * chunk, chunk_size=chunk) as s:
        assert s.done == {0, 2} and s.held == {}
    with PartialBlob(v1, blob, size=3 * chunk, chunk_size=chunk) as t:
        assert t.done == {0, 2}


# -- kill -9 during the final rename, and the debris of killed processes -------------------


def finished_partial(repo_folder: Path, data: bytes) -> Path:
    """What a kill between the whole-file hash and the rename leaves: the partial as
    `from_mirror` hands it over (every chunk journaled, `take_finished` done)."""
    from peer.cache.partial import PartialBlob
    from peer.transfer.mirror_ranges import chunk_size_for

    p = PartialBlob(repo_folder / ".hfswarm" / "partial", sha256(data), len(data),
                    chunk_size_for(len(data)))  # fmt: skip
    p.open()
    p.write(0, data)
    for i in range(p.n_chunks):
        p.mark_done(i)
    return p.take_finished()


def test_killed_during_the_final_rename_the_next_run_renames(tmp_path: Path) -> None:
    size = 24 * MiB
    src = make_repo(tmp_path / "src", size)
    cache = tmp_path / "cache"
    data = (src / "model.safetensors").read_bytes()
    finished_partial(cache / "models--org--m", data)
    with ThreadedMirror([RepoSource("model", "org/m", src)]) as m:
        code, out, err = finish(popen(download_cmd(m.url, cache)))
        assert code == 0, err
        assert model_bytes(m) == 0  # hashed and renamed, not fetched again
    check_snapshot(out, src, cache)


async def agent_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "peer.cli.main", *args, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_an_agent_starts_clean_after_kills(tmp_path: Path) -> None:
    """An agent's cache after kills at the worst moments: a finished partial not yet
    renamed, a publish's copy, an adopt copy of a dead process, a journal whose blob
    was renamed, old temp links and refs, a state record's temp file. At start the
    agent removes the debris and keeps what resumes; the download then renames the
    finished partial without fetching it."""
    from procs import agent_process

    size = 8 * MiB
    src = make_repo(tmp_path / "src", size)
    data = (src / "model.safetensors").read_bytes()
    root = tmp_path / "a"
    folder = root / "cache" / "models--org--m"
    finished_partial(folder, data)
    partial = folder / ".hfswarm" / "partial"
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()  # a pid that is gone
    old = time.time() - 3600
    debris = [
        partial / "publish.0123456789abcdef",
        partial / f"{'b' * 64}.adopt.{proc.pid}",
        partial / f"{'c' * 64}.journal",
        folder / "snapshots" / ("d" * 40) / ".x.bin.hfswarm-tmp",
        folder / "refs" / ".main.hfswarm-tmp",
        root / "state" / "verified" / f".{'e' * 64}.{proc.pid}.tmp",
        partial / sha256(b"{}"),  # a partial of a blob in blobs/ (below)
    ]
    kept = [
        partial / ("f" * 64),  # a swarm partial (its resume data is in the state dir)
        folder / "snapshots" / ("d" * 40) / ".y.bin.hfswarm-tmp",  # young: may be live
    ]
    for path in [*debris, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / sha256(b"{}")).write_bytes(b"{}")
    for path in [*debris[2:5], debris[6]]:
        os.utime(path, (old, old))
    with ThreadedMirror([RepoSource("model", "org/m", src)]) as m:
        async with agent_process(root, "127.0.0.2", m.url, "--log-level", "info") as a:
            gone = [p for p in debris if p.exists()]
            assert gone == [], gone
            assert all(p.exists() for p in kept)
            for p in kept:
                p.unlink()  # (not a real partial: the test made it up)
            code, out, err = await agent_cli("download", "org/m", "--agent", a.local_url, "--quiet")
            assert code == 0, err
            assert model_bytes(m) == 0
        assert "temp file(s) that killed processes left behind" in a.log.read_text()
    check_snapshot(out, src, root / "cache")


# -- trackers and seeders restarting -----------------------------------------------------


def free_port(ip: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def blob_ids(src: Path) -> list[str]:
    from peer.hub.protocol import git_blob_sha1

    return [sha256((src / "model.safetensors").read_bytes()),
            git_blob_sha1((src / "config.json").read_bytes())]  # fmt: skip


async def test_a_restarted_tracker_hears_from_every_agent_again(tmp_path: Path) -> None:
    """The tracker keeps nothing on disk: after a restart (kill -9, same address) the
    running agents register and announce everything they hold again, within a bound
    (the heartbeat, ttl/3 = 2 s here, or the agents' backoff while it was down)."""
    from contextlib import AsyncExitStack

    from procs import agent_process, tracker_process

    from tracker.client import TrackerClient

    src = make_repo(tmp_path / "src", 4 * MiB)
    big = blob_ids(src)[0]
    listen = f"127.0.0.1:{free_port('127.0.0.1')}"
    ttl = ("--ttl", "6")
    with ThreadedMirror([RepoSource("model", "org/m", src)]) as m:
        first = AsyncExitStack()
        _, url = await first.enter_async_context(tracker_process(tmp_path / "t1.log", listen, *ttl))
        flags = ("--tracker", url)
        async with (
            first,
            agent_process(tmp_path / "a", "127.0.0.2", m.url, *flags) as a,
            agent_process(tmp_path / "b", "127.0.0.3", m.url, *flags) as b,
        ):
            for agent in (a, b):
                code, _, err = await agent_cli(
                    "download", "org/m", "--agent", agent.local_url, "--quiet"
                )
                assert code == 0, err
            ids = {a.info["agent_id"], b.info["agent_id"]}

            async def holders() -> set[str]:
                async with TrackerClient(url) as t:
                    who = await t.who([big])
                return {h.agent_id for h in who[big].holders} if big in who else set()

            async def listed_within(seconds: float) -> float:
                t0 = time.monotonic()
                while await holders() != ids:
                    assert time.monotonic() - t0 < seconds, await holders()
                    await asyncio.sleep(0.2)
                return time.monotonic() - t0

            await listed_within(10)
            await first.aclose()  # tracker_process kills it (SIGKILL)
            await asyncio.sleep(1)
            async with tracker_process(tmp_path / "t2.log", listen, *ttl):
                took = await listed_within(15)
            print(f"\nthe restarted tracker listed both agents after {took:.1f} s")
    for root in ("a", "b"):
        assert_cache_ok(tmp_path / root / "cache", min_blobs=2)


def bytes_read(pid: int) -> int:
    """Bytes a process read through read(2) and friends (page cache hits included)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


async def test_a_seeder_killed_and_restarted_seeds_again_without_rehashing(
    tmp_path: Path,
) -> None:
    """kill -9 of a seeding agent, then a restart: its verified-blob records (state
    dir, keyed by the file's fingerprint) let it seed at once, reading nothing of its
    blobs (counted by the kernel: /proc/PID/io rchar). Another agent then takes the
    whole repo from it, nothing from the mirror."""
    import aiohttp
    from procs import agent_process

    from peer.agent.state import Fingerprint, StateDir

    size = 96 * MiB
    src = make_repo(tmp_path / "src", size)
    big = blob_ids(src)[0]
    root = tmp_path / "a"
    blob = root / "cache" / "models--org--m" / "blobs" / big

    async def seeded(url: str) -> int:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/status") as r:
            return int((await r.json())["seeded_bytes"])

    with ThreadedMirror([RepoSource("model", "org/m", src)]) as m:
        async with agent_process(root, "127.0.0.2", m.url) as a:
            code, _, err = await agent_cli("download", "org/m", "--agent", a.local_url, "--quiet")
            assert code == 0, err
            a.proc.send_signal(signal.SIGKILL)
            await a.proc.wait()
        assert StateDir(root / "state").verified(big, Fingerprint.of(blob)) is not None
        t0 = time.monotonic()
        async with agent_process(root, "127.0.0.2", m.url) as a:
            while await seeded(a.local_url) < size:
                assert time.monotonic() - t0 < 30
                await asyncio.sleep(0.05)
            took = time.monotonic() - t0
            read = bytes_read(a.proc.pid)
            m.reset_stats()
            async with agent_process(tmp_path / "b", "127.0.0.3", m.url, peers=(a.peer_addr,)) as b:
                code, _, err = await agent_cli(
                    "download", "org/m", "--agent", b.local_url, "--quiet"
                )
                assert code == 0, err
            assert model_bytes(m) == 0
    t1 = time.monotonic()
    assert (await asyncio.to_thread(hash_blob, blob, big)) and True
    hashing = time.monotonic() - t1
    print(f"\nrestarted seeder: seeding after {took:.2f} s, {read / MiB:.1f} MiB read "
          f"(hashing its {size / MiB:.0f} MiB blob takes {hashing:.2f} s)")  # fmt: skip
    assert read < size / 2, read
    for r in ("a", "b"):
        assert_cache_ok(tmp_path / r / "cache", min_blobs=2)


def hash_blob(path: Path, blob_id: str) -> bool:
    from peer.verification.hashing import hash_file

    return hash_file(path, blob_id, path.stat().st_size).ok


# -- a peer whose connections break every few MB --------------------------------------------


class CuttingProxy:
    """In front of an agent: its peer API (HTTP, the health answer's BitTorrent port
    rewritten to ours) and its BitTorrent port (TCP, every connection cut after
    `cut_every` bytes from the agent)."""

    def __init__(self, ip: str, peer_api: str, bt: tuple[str, int], cut_every: int) -> None:
        self.ip, self.peer_api, self.bt, self.cut_every = ip, peer_api, bt, cut_every
        self.cuts = 0
        self.bt_port = 0
        self.api_port = 0

    async def _pipe(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, budget: list[int] | None
    ) -> None:
        try:
            while data := await r.read(64 << 10):
                if budget is not None:
                    budget[0] -= len(data)
                    if budget[0] <= 0:
                        self.cuts += 1
                        break
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def _bt(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ar, aw = await asyncio.open_connection(*self.bt)
        except OSError:
            cw.close()
            return
        budget = [self.cut_every]
        down = asyncio.ensure_future(self._pipe(ar, cw, budget))
        up = asyncio.ensure_future(self._pipe(cr, aw, None))
        await asyncio.wait([down, up], return_when=asyncio.FIRST_COMPLETED)
        cw.close()
        aw.close()
        await asyncio.gather(down, up, return_exceptions=True)

    async def start(self) -> None:
        import aiohttp
        from aiohttp import web

        from peer import wire

        self._bt_server = await asyncio.start_server(self._bt, self.ip, 0)
        self.bt_port = self._bt_server.sockets[0].getsockname()[1]
        session = aiohttp.ClientSession()

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            async with session.request(
                request.method, self.peer_api + request.path_qs, data=body,
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            ) as r:  # fmt: skip
                data = await r.read()
                if request.path == "/v1/health" and r.status == 200:
                    health = wire.decode_as(data, wire.Health)
                    fixed = wire.Health(
                        agent_id=health.agent_id, bt_port=self.bt_port, blobs=health.blobs
                    )
                    data = wire.encode(fixed)
                return web.Response(status=r.status, body=data, content_type=r.content_type or None)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.ip, 0)
        await site.start()
        self.api_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = session

    async def close(self) -> None:
        self._bt_server.close()
        await self._runner.cleanup()
        await self._session.close()


async def test_a_peer_that_disconnects_every_few_mb(tmp_path: Path) -> None:
    """The seeder's BitTorrent connections break after every 3 MiB: the download
    reconnects to it again and again (verified pieces kept) while the mirror, behind a
    4 MiB/s WAN link, fills the gaps; it finishes, the cache right. (libtorrent waits
    longer before each reconnect, so the mirror's share grows with the cuts.)"""
    from procs import agent_process

    size = 32 * MiB
    src = make_repo(tmp_path / "src", size)
    with ThreadedMirror([RepoSource("model", "org/m", src)]) as m:
        async with agent_process(tmp_path / "a", "127.0.0.2", m.url) as a:
            code, _, err = await agent_cli("download", "org/m", "--agent", a.local_url, "--quiet")
            assert code == 0, err
            proxy = CuttingProxy("127.0.0.4", a.peer_url, ("127.0.0.2", a.info["bt_port"]), 3 * MiB)
            await proxy.start()
            try:
                m.reset_stats()
                m.set_client_rate(4 * MiB)  # the mirror is behind a WAN link, the peer is not
                async with agent_process(
                    tmp_path / "b",
                    "127.0.0.3",
                    m.url,
                    peers=(f"127.0.0.4:{proxy.api_port}",),
                ) as b:
                    code, _, err = await agent_cli(
                        "download", "org/m", "--agent", b.local_url, "--quiet"
                    )
                    assert code == 0, err
            finally:
                await proxy.close()
            from_mirror = model_bytes(m)
    print(f"\n{proxy.cuts} connections cut; {from_mirror / MiB:.1f} MiB from the mirror")
    assert proxy.cuts >= 3, proxy.cuts
    assert from_mirror <= size - 6 * MiB, from_mirror  # the peer kept being used
    for r in ("a", "b"):
        assert_cache_ok(tmp_path / r / "cache", min_blobs=2)


async def test_a_repo_deleted_under_a_running_agent_is_fetched_again(tmp_path: Path) -> None:
    """`hf cache delete` (huggingface_hub's delete strategy) while the agent runs, then
    the same download: the agent notices its blobs are gone and fetches them again
    (found by the soak: it used to link the snapshot to the missing blobs)."""
    from huggingface_hub import scan_cache_dir
    from procs import agent_process

    src = make_repo(tmp_path / "src", 4 * MiB)
    cache = tmp_path / "a" / "cache"
    with ThreadedMirror([RepoSource("model", "org/m", src)]) as m:
        async with agent_process(tmp_path / "a", "127.0.0.2", m.url) as a:
            for round_ in (1, 2):
                code, out, err = await agent_cli(
                    "download", "org/m", "--agent", a.local_url, "--quiet"
                )
                assert code == 0, err
                check_snapshot(out, src, cache)
                if round_ == 1:
                    info = scan_cache_dir(cache)
                    revs = [r.commit_hash for repo in info.repos for r in repo.revisions]
                    info.delete_revisions(*revs).execute()
                    assert not (cache / "models--org--m").exists()
            assert model_bytes(m) == 2 * 4 * MiB
