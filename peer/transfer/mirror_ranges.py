"""Fetch a blob from HF-style mirrors with parallel HTTP Range requests (aiohttp).

One `MirrorFetcher` holds a connection pool for a whole download. For each blob it
starts one worker streaming a run of the file's journal chunks (chunks are marked done
as their last byte lands), and adds workers while the blob's throughput still grows, up
to N: a new worker takes the second half of what the largest run has not asked for yet
(as aria2 splits), or else of what a run asked for whole before any request's cost was
known has not reached yet (that stream is cut there), but only where that half
takes several times a request's measured cost (time to the response headers) to
fetch; a worker whose run is done does the same. A run's first request, before any
request's cost is known, asks for the whole run; later ones for 0.5 s of the stream's
rate, or for 10 requests' cost of it where requests are dear. A mirror that charges
per request (olah re-checks upstream on each) thus sees one request per file, as from
`hf download`, where it saw 64, and a fast one still gets N streams; a blob much
smaller than one whose first request awaits its answer asks after that answer (olah
answers requests one at a time: a config.json delayed a shard). Every byte
goes straight to the partial file (nothing is buffered whole; progress inside a chunk
is journaled every `JOURNAL_STEP`, and a resumed run starts at the first byte its
chunk lacks, so a kill -9 costs at most that much per stream) and a hashing task
follows the contiguous finished prefix, so the whole-file hash is ready moments after
the last byte lands instead of costing a second pass.

Failure handling, in the order a public mirror exercises it:
- 3xx is followed by hand: Authorization is sent only to the mirror's own origin, and a
  CDN location is remembered for later chunks (and forgotten if it starts failing).
- 429 / 5xx / dropped connections / stalls (no byte for `read_timeout`) are retried from
  the byte where they stopped, with exponential backoff and jitter; Retry-After wins.
- A mirror that keeps failing is cooled down and the next `--mirror` takes over; one
  that was sending this file is ridden out for `outage_grace` after its last byte.
- A 206 with the wrong Content-Range start (a broken proxy) writes nothing and is
  asked again; after `_BROKEN_ANSWERS` of them the mirror is skipped for the span.
- A mirror that ignores Range (200 with the whole body) is detected; the file is then
  taken as one stream from that response instead of N copies of the whole file (one
  such answer in the middle of a file is asked again first: it may be a glitch), and
  the mirror is remembered (`MirrorPool.ignores_range`): its next files are one GET
  each from the start, and single pieces are not asked of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urljoin

import aiohttp

from peer.aio import primary_error
from peer.cache.partial import PartialBlob
from peer.config import DownloadOptions, HubSettings
from peer.errors import (
    GatedRepo,
    HfswarmError,
    MirrorFailed,
    MirrorUnreachable,
    PeerMisbehaved,
    RepoNotFound,
    UserError,
)
from peer.hub.metadata import RemoteFile, Snapshot
from peer.hub.protocol import REDIRECTS, RETRYABLE, error_from_status, origin
from peer.transfer.rate import Throttle
from peer.verification.hashing import READ_BLOCK, BlobHasher, HashKind, Verdict

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
READ_CHUNK = 1 << 20
_OUTAGE_POLL = 4.0  # seconds between tries while riding out an outage
_BROKEN_ANSWERS = 3  # wrong Content-Ranges from one mirror before it is skipped
# A blob starts with one stream (or as many as paid off last time on its mirror), and
# doubles them while its rate grows: olah, cold, took 4.3 s for 300 MB with one stream
# per file and 10.9 s with 4 (docs/benchmarks.md, section 8.4).
# Seconds between looks at the rate: `GROW_COST_RATIO` requests' measured cost, within
# [GROW_EVERY_MIN, GROW_EVERY]. Where requests are cheap (a mirror capping each
# connection) the ramp to N streams takes a few tenths of a second instead of a second
# or two; where they are dear (olah: 0.2-0.7 s to the headers) it stays at the maximum.
GROW_EVERY = 0.25
GROW_EVERY_MIN = 0.06
GROW_COST_RATIO = 5.0
GROW_GAIN = 1.1  # the rate must have grown this much since the last step to grow again
LINEAR_GAIN = 1.7  # grown this much: the streams are each capped, quadruple them
# A stolen half run must take this many times a request's cost to fetch.
STEAL_COST_RATIO = 10.0
# Once a request's cost is known, a request asks for what its stream moves in this many
# seconds (at least this many times a request's cost): long enough to make the request
# cheap, short enough that the rest of a run can go to a new stream without a cut (a
# cut throws away what the connection had in flight).
ASK_SECONDS = 0.5
ASK_COST_RATIO = 10.0
FIRST_ASK = 4  # chunks a blob's first request asks of a mirror known to be cheap
# A blind request is cut for a stealer only if the stolen half takes its stream at least
# this long: the cut throws away what the connection had in flight (1-3 MiB seen on a
# loaded loopback), which must stay a small part of what the new stream gains. A capped
# mirror's streams are slow (a cut pays); a fast one's finish before a cut would.
BLIND_CUT_SECONDS = 0.5
# ... and only if the stolen half is at least this large: the bytes a cut throws away do
# not shrink with the file, so a half of one 1 MiB chunk never pays for them (a 3 MiB
# shard took 4 MiB from the mirror when a 40 ms WAN's first rate sample came in low).
# Larger halves are still cut: on a mirror that caps each connection a 16 MiB blob
# otherwise stays on one slow stream.
BLIND_CUT_MIN_BYTES = 2 << 20
# A blob this many times smaller than one whose first request awaits its answer asks
# only after that answer: olah works through requests one at a time on one event loop
# (0.1-0.2 s of CPU each, an upstream check per request), so a config.json asked
# alongside the shards delayed a shard's first byte by its own cost (docs/benchmarks.md
# 8.25). A small blob is never on the download's critical path; a shard is.
SMALL_BLOB_RATIO = 16


def split_runs(
    chunks: list[int], n: int, begun: set[int] | frozenset[int] = frozenset()
) -> list[_Run]:
    """Consecutive runs over sorted chunk indices (a resumed journal leaves gaps),
    the largest split in halves until there are `n` (or runs of one chunk). A chunk
    in `begun` (partly held, says the journal) starts a run: its run asks only for
    the rest of it, never again for bytes already on disk."""
    runs: list[list[int]] = []
    for c in chunks:
        if runs and runs[-1][1] == c and c not in begun:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    while 0 < len(runs) < n:
        big = max(runs, key=lambda r: r[1] - r[0])
        if big[1] - big[0] < 2:
            break
        mid = (big[0] + big[1]) // 2
        runs.insert(runs.index(big) + 1, [mid, big[1]])
        big[1] = mid
    return [_Run(a, b, 0, a) for a, b in runs]


def chunk_size_for(size: int) -> int:
    """Fixed by the file size alone, so a resumed download finds its journal valid
    whatever --connections says: ~64 chunks per file, 1-16 MiB each."""
    target = max(1, size // 64)
    chunk = 1 << 20
    while chunk < target and chunk < 16 << 20:
        chunk <<= 1
    return chunk


class _Retry(Exception):
    """A transient failure: try again (maybe on another mirror) after `delay`."""

    def __init__(
        self,
        reason: str,
        *,
        retry_after: float | None = None,
        network: bool = False,
        broken: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.network = network
        self.broken = broken  # a wrong answer, not an outage: no riding it out


class _SkipMirror(Exception):
    """This mirror cannot serve this file (404, broken answers): use another one."""

    def __init__(self, error: HfswarmError) -> None:
        super().__init__(error.message)
        self.error = error


class _RangeIgnored(Exception):
    """The mirror answered 200 to a Range request: take the whole body as one stream."""

    def __init__(self, response: aiohttp.ClientResponse, mirror: str) -> None:
        super().__init__("range ignored")
        self.response = response
        self.mirror = mirror


class _RunCut(Exception):
    """Another worker took over the rest of this run: stop its stream here."""


@dataclass(eq=False)
class _Run:
    """Chunks [first, end) of a blob, fetched by one worker from byte `pos` in requests
    up to chunk `asked`: a stealer takes the second half of what was not asked yet and
    lowers `end`, or failing that of what the stream has not reached yet: the stream is
    then cut at `end` (its connection closed, what it had in flight thrown away)."""

    first: int
    end: int
    pos: int  # next byte to write
    marked: int  # chunks before this one are marked done
    asked: int = 0  # chunks before this one are asked of the mirror
    blind: bool = False  # its request asked for the whole run, the cost unknown: may be cut


class MirrorPool:
    """Preferred-first mirror choice with cool-down for failing ones (pure, clock passed in)."""

    def __init__(
        self,
        mirrors: tuple[str, ...],
        ignores_range: set[str] | None = None,
        request_cost: dict[str, float] | None = None,
    ) -> None:
        self.mirrors = mirrors
        self._failures = dict.fromkeys(mirrors, 0)
        self._cool_until = dict.fromkeys(mirrors, 0.0)
        # Mirrors seen answering a Range request with the whole file. The caller may pass
        # a set it keeps across downloads (an agent's jobs share one).
        self.ignores_range = ignores_range if ignores_range is not None else set()
        # Per mirror: streams per blob that still raised the rate last time (the next
        # blob from it starts there).
        self.streams_that_paid: dict[str, int] = {}
        # Per mirror: seconds to a response's headers, last measured (a blob's first
        # requests ask for whole runs only where this is unknown or dear). The caller
        # may pass a dict it keeps across downloads (an agent's jobs share one).
        self.request_cost = request_cost if request_cost is not None else {}

    def pick(self, now: float, exclude: set[str] | frozenset[str] = frozenset()) -> str | None:
        usable = [m for m in self.mirrors if m not in exclude]
        if not usable:
            return None
        ready = [m for m in usable if self._cool_until[m] <= now]
        if ready:
            return ready[0]
        return min(usable, key=lambda m: self._cool_until[m])

    def failed(self, mirror: str, now: float) -> None:
        self._failures[mirror] += 1
        if self._failures[mirror] >= 3:
            self._cool_until[mirror] = now + min(30.0, 2.0 ** (self._failures[mirror] - 2))

    def succeeded(self, mirror: str) -> None:
        self._failures[mirror] = 0
        self._cool_until[mirror] = 0.0


class RangeUnsupported(MirrorFailed):
    """Every mirror answered a piece request with the whole file (Range ignored)."""


@dataclass
class _BlobJob:
    snapshot: Snapshot
    file: RemoteFile
    partial: PartialBlob | None
    pending: deque[int]
    sink: Callable[[int, memoryview], None]
    on_bytes: Callable[[int], None] | None = None
    wake_hasher: asyncio.Event = field(default_factory=asyncio.Event)
    cdn: dict[str, str] = field(default_factory=dict)  # mirror -> remembered redirect target
    excluded: set[str] = field(default_factory=set)
    skip_errors: list[HfswarmError] = field(default_factory=list)
    single_stream: bool = False
    range_ignored: int = 0  # 200 answers to a Range request so far
    fetched: int = 0
    last_byte: float = 0.0  # monotonic time the last body byte arrived
    first_byte: float = 0.0  # ... and the first one (the debug log's time line)
    requests: int = 0  # requests sent for this blob
    runs: list[_Run] = field(default_factory=list)  # not started yet
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # its first answer came
    active: list[_Run] = field(default_factory=list)  # being streamed
    request_cost: float | None = None  # seconds to a response's headers (moving average)
    started: float = field(default_factory=time.monotonic)

    def stream_rate(self) -> float:
        """Bytes/s one stream has moved on average so far."""
        elapsed = max(1e-3, time.monotonic() - self.started)
        return self.fetched / elapsed / max(1, len(self.active))


class MirrorFetcher:
    """Downloads blobs from the configured mirrors; an async context manager."""

    def __init__(
        self,
        settings: HubSettings,
        options: DownloadOptions,
        *,
        mirrors: tuple[str, ...] | None = None,
        on_mirror_error: Callable[[str], None] | None = None,
        throttle: Throttle | None = None,
        ignores_range: set[str] | None = None,
        request_costs: dict[str, float] | None = None,
    ) -> None:
        self.settings = settings
        # the agent's mirror cap, shared by all its fetchers' connections (live)
        self.throttle = throttle or Throttle()
        self.options = options
        # Told the mirror's URL on each failed attempt (the agent's per-mirror metric).
        self.on_mirror_error = on_mirror_error
        self.pool = MirrorPool(mirrors or settings.mirrors, ignores_range, request_costs)
        self._session: aiohttp.ClientSession | None = None
        # Blobs whose first request awaits its answer (`SMALL_BLOB_RATIO`).
        self._opening: list[_BlobJob] = []

    @property
    def has_mirrors(self) -> bool:
        """False for a download no mirror may serve (``local/*``: LAN-only names)."""
        return bool(self.pool.mirrors)

    async def __aenter__(self) -> MirrorFetcher:
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.options.connect_timeout,
            sock_read=self.options.read_timeout,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            auto_decompress=False,
            read_bufsize=READ_CHUNK,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            headers={"User-Agent": self.settings.user_agent, "Accept-Encoding": "identity"},
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    # -- public ----------------------------------------------------------------------

    async def fetch(
        self,
        snapshot: Snapshot,
        file: RemoteFile,
        partial: PartialBlob,
        on_bytes: Callable[[int], None] | None = None,
        on_prefix: Callable[[int], None] | None = None,
        also_hash: Callable[[memoryview], None] | None = None,
        in_order: bool = False,
    ) -> Verdict:
        """Fill `partial` from the mirrors and return the whole-file hash verdict.
        `on_bytes` hears of every byte received for this blob; `on_prefix` of the
        length of the prefix on disk and hashed so far (a reader may stream it);
        `also_hash` is fed every byte in order as it is hashed (the whole file, a
        resumed prefix too: read once from disk; in the hashing thread).
        `in_order`: others copy that prefix as it grows (a herd leader's followers):
        the streams take the chunks in file order, one request each, so the prefix
        grows at the blob's rate rather than at one stream's (halves stolen from the
        end of a run would land far ahead of it)."""
        todo = deque(i for i in range(partial.n_chunks) if i not in partial.done)
        job = _BlobJob(snapshot, file, partial, todo, sink=partial.write, on_bytes=on_bytes)
        job.sink = lambda offset, data: self._run_sink(job, offset, data)
        first = self.pool.pick(time.monotonic())
        start = self.pool.streams_that_paid.get(first or "", 1)
        streams = min(start, self.options.connections)
        if in_order:
            job.runs = [_Run(c, c + 1, 0, c) for c in todo]
        else:
            job.runs = split_runs(list(todo), streams, set(partial.held))
        for r in job.runs:
            r.pos = partial.resume_at(r.first)  # only the rest of a chunk begun earlier
        hasher = BlobHasher(HashKind.of_blob_id(file.blob_id), file.size, also_hash)
        try:
            if todo:
                await self._behind_larger_openings(job)
                self._opening.append(job)
            async with asyncio.TaskGroup() as tg:
                hash_task = tg.create_task(self._hash_follower(job, hasher, on_prefix))
                if todo and self.pool.pick(time.monotonic()) in self.pool.ignores_range:
                    # Known to send whole files: one GET, not N ranges thrown away.
                    job.single_stream = True
                    await self._single_stream(job, None)
                else:
                    workers: set[asyncio.Task[None]] = set()
                    # in order: one run per chunk, `streams` workers take them in turn
                    for _ in range(min(len(job.runs), streams) if in_order else len(job.runs)):
                        workers.add(tg.create_task(self._worker(job)))
                    await self._grow(job, tg, workers, first or "")
                job.wake_hasher.set()
        except BaseExceptionGroup as group:
            raise primary_error(group) from None
        finally:
            self._answered(job)
        digest = hash_task.result()
        now = time.monotonic()
        log.debug(
            "%s: %d B, first byte at %.3f s, last at %.3f s, hashed at %.3f s, %d requests",
            file.path,
            job.fetched,
            job.first_byte - job.started if job.fetched else 0.0,
            job.last_byte - job.started if job.fetched else 0.0,
            now - job.started,
            job.requests,
        )
        return Verdict(
            ok=digest == file.blob_id, expected=file.blob_id, actual=digest, size=file.size
        )

    async def fetch_range(
        self, snapshot: Snapshot, file: RemoteFile, start: int, end: int
    ) -> bytes:
        """Bytes [start, end) of a file, into memory: a piece that no peer could give.
        The caller verifies it (libtorrent hash-checks pieces fed with add_piece)."""
        buf = bytearray(end - start)

        def sink(offset: int, data: memoryview) -> None:
            buf[offset - start : offset - start + len(data)] = data

        job = _BlobJob(snapshot, file, None, deque(), sink=sink)
        job.excluded |= self.pool.ignores_range  # a piece from those costs the whole file
        try:
            if self.pool.mirrors and job.excluded >= set(self.pool.mirrors):
                raise RangeUnsupported(
                    f"{', '.join(self.pool.mirrors)} ignore Range requests",
                    hint="pieces cannot be fetched from it one by one",
                )
            await self._fetch_span(job, start, end)
        except _RangeIgnored as ri:
            ri.response.close()
            self.pool.ignores_range.add(ri.mirror)
            raise RangeUnsupported(
                f"{ri.mirror} ignores Range requests",
                hint="pieces cannot be fetched from it one by one",
            ) from None
        return bytes(buf)

    async def _behind_larger_openings(self, job: _BlobJob) -> None:
        """Wait for the first answers of the blobs `SMALL_BLOB_RATIO` times larger than
        this one that are waiting for theirs (at most `read_timeout`)."""
        size = max(1, job.file.size)
        ahead = [j.answered for j in self._opening if j.file.size >= SMALL_BLOB_RATIO * size]
        if not ahead:
            return
        t0 = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.read_timeout):
                for answered in ahead:
                    await answered.wait()
        job.started = time.monotonic()  # its rate counts from its own start
        log.debug(
            "%s: asks after %d larger blobs' first answers (%.3f s)",
            job.file.path,
            len(ahead),
            job.started - t0,
        )

    def _answered(self, job: _BlobJob) -> None:
        """The blob's first request was answered (or failed, or the blob ended)."""
        job.answered.set()
        with contextlib.suppress(ValueError):
            self._opening.remove(job)

    # -- hashing ---------------------------------------------------------------------

    async def _hash_follower(
        self, job: _BlobJob, hasher: BlobHasher, on_prefix: Callable[[int], None] | None
    ) -> str:
        """Hash the finished prefix as it grows; reads hit the page cache just written."""
        p = job.partial
        assert p is not None
        next_chunk = 0
        while next_chunk < p.n_chunks:
            end_chunk = p.contiguous_end(next_chunk)
            if end_chunk == next_chunk:
                job.wake_hasher.clear()
                if p.contiguous_end(next_chunk) == next_chunk:
                    await job.wake_hasher.wait()
                continue
            start = p.chunk_range(next_chunk)[0]
            stop = p.chunk_range(end_chunk - 1)[1]
            await asyncio.to_thread(hash_file_range, p.data_path, hasher, start, stop)
            next_chunk = end_chunk
            if on_prefix is not None:
                on_prefix(stop)
        return hasher.hexdigest()

    # -- workers ---------------------------------------------------------------------

    async def _grow(
        self, job: _BlobJob, tg: asyncio.TaskGroup, workers: set[asyncio.Task[None]], mirror: str
    ) -> None:
        """Until the workers are done: every `GROW_EVERY` s, while the blob's rate grew
        by `GROW_GAIN` since the last step, double the workers (quadruple them after a
        near-linear gain, `LINEAR_GAIN`; up to --connections),
        each new one on a stolen half run worth a request. Where it stopped paying is
        remembered for the mirror's next blob."""
        if not workers:
            return  # every chunk was had already (a resumed partial)
        growing = True
        last_rate, paid = 0.0, len(workers)
        settle = True  # streams just started: their first interval holds their request
        while True:
            before, t0 = job.fetched, time.monotonic()
            cost = job.request_cost
            look = GROW_EVERY_MIN if cost is None else GROW_COST_RATIO * cost
            done, _ = await asyncio.wait(
                workers, timeout=min(GROW_EVERY, max(GROW_EVERY_MIN, look))
            )
            workers -= done
            if not workers:
                return
            if not growing or job.single_stream:
                continue
            if not job.fetched:
                continue  # the clock starts with the first byte: still settling
            if settle:
                settle = False
                continue
            rate = (job.fetched - before) / max(1e-6, time.monotonic() - t0)
            log.debug(
                "%s: %d streams, %.1f MB/s (before %.1f), request %.3f s",
                job.file.path,
                len(workers),
                rate / 1e6,
                last_rate / 1e6,
                job.request_cost or 0.0,
            )
            if rate <= 0 or rate < last_rate * GROW_GAIN:
                growing = False  # more streams stopped paying: keep these, start there
                self.pool.streams_that_paid[mirror] = paid
                continue
            # Near-linear scaling (each connection capped): grow faster.
            factor = 3 if rate >= last_rate * LINEAR_GAIN else 1
            last_rate, paid = rate, len(workers)
            self.pool.streams_that_paid[mirror] = max(
                paid, self.pool.streams_that_paid.get(mirror, 1)
            )
            for _ in range(min(self.options.connections - len(workers), factor * len(workers))):
                run = self._steal(job, rate / max(1, len(workers)))
                if run is None:
                    break
                workers.add(tg.create_task(self._worker(job, run)))
                settle = True

    def _steal(self, job: _BlobJob, stream_rate: float) -> _Run | None:
        """A run not started yet, or the second half of the largest active run if that
        half takes longer than `STEAL_COST_RATIO` requests (at `stream_rate` B/s); the
        run returned is in `job.active` already."""
        if job.runs:
            job.active.append(job.runs.pop(0))
            return job.active[-1]
        p = job.partial
        assert p is not None
        best: tuple[int, _Run] | None = None
        for r in job.active:
            free = r.end - max(r.asked, r.marked)  # not asked of the mirror yet
            if free >= 2 and (best is None or free > best[0]):
                best = (free, r)
        if best is None and stream_rate > 0:  # nothing left to ask: cut a blind request
            # (it closes its connection, what it had in flight thrown away, once there)
            for r in job.active:
                free = r.end - r.marked - 1  # chunks the stream has not reached yet
                stolen = (free // 2) * p.chunk_size
                worth = stolen >= BLIND_CUT_MIN_BYTES and stolen / stream_rate >= BLIND_CUT_SECONDS
                if r.blind and free >= 2 and worth and (best is None or free > best[0]):
                    best = (free, r)
        if best is None:
            return None
        free, victim = best
        half = free // 2
        cost = job.request_cost or 0.0
        if stream_rate <= 0 or half * p.chunk_size / stream_rate < STEAL_COST_RATIO * cost:
            return None  # a new request costs more than it saves (or nothing moves yet)
        mid = victim.end - half
        victim.end = mid
        # Active at once (after its victim: the victim's bytes up to `mid` find it
        # first), so the next steal of the same look sees what is left.
        job.active.append(_Run(mid, mid + half, p.resume_at(mid), mid))
        return job.active[-1]

    async def _worker(self, job: _BlobJob, run: _Run | None = None) -> None:
        """Fetch `run` (active already), then runs it steals, until none is left."""
        while not job.single_stream:
            if run is None:
                run = self._steal(job, job.stream_rate())
                if run is None:
                    return
            elif run not in job.active:
                job.active.append(run)  # asked again after a 200 (below)
            try:
                await self._fetch_run(job, run)
            except _RangeIgnored as ri:
                if job.single_stream:  # another worker already took the whole stream
                    ri.response.close()
                    return
                job.range_ignored += 1
                if job.range_ignored == 1 and job.partial is not None and job.partial.done:
                    # One 200 in the middle of a file may be a glitch (a proxy, a
                    # cache node): the same run asks again before the mirror is taken
                    # for one that ignores Range (and remembered so).
                    ri.response.close()
                    continue
                self.pool.ignores_range.add(ri.mirror)
                job.single_stream = True
                await self._single_stream(job, ri)
                return
            finally:
                job.active.remove(run)
            run = None

    async def _fetch_run(self, job: _BlobJob, run: _Run) -> None:
        p = job.partial
        assert p is not None
        while run.marked < run.end:
            run.asked = run.marked + self._ask(job, run.end - run.marked)
            run.blind = run.asked == run.end and (job.request_cost is None or not job.fetched)
            try:
                await self._fetch_span(job, run.pos, p.chunk_range(run.asked - 1)[1])
            except _RunCut:
                pass  # the rest is another worker's now; what was had is marked
            self._mark(job, run)

    def _ask(self, job: _BlobJob, left: int) -> int:
        """Chunks the next request of a run asks for: all of them before a request's
        cost is known (a mirror where requests are dear sees one per run), a few if
        the mirror's requests were cheap last time; then what the stream moves in
        `ASK_SECONDS`, or in `ASK_COST_RATIO` requests' time if longer."""
        assert job.partial is not None
        if job.request_cost is None or not job.fetched:
            known = self.pool.request_cost.get(self.pool.pick(time.monotonic()) or "")
            if known is not None and known * ASK_COST_RATIO < ASK_SECONDS:
                return min(left, FIRST_ASK)  # cheap requests: no cut needed to split
            return left
        span = max(ASK_SECONDS, ASK_COST_RATIO * job.request_cost)
        return max(1, min(left, math.ceil(job.stream_rate() * span / job.partial.chunk_size)))

    def _run_sink(self, job: _BlobJob, offset: int, data: memoryview) -> None:
        """Write a run's bytes (runs never overlap: the run whose next byte this is),
        mark its chunks done as their last byte lands, stop at its (maybe lowered) end."""
        p = job.partial
        assert p is not None
        run = next((r for r in job.active if r.pos == offset), None)
        if run is None:
            raise _RunCut()
        last = min(run.end, run.asked)
        stop = p.chunk_range(last - 1)[1] if last > run.first else offset
        take = max(0, min(len(data), stop - offset))
        if take:
            p.write(offset, data[:take])
            run.pos += take
            self._mark(job, run)
            if run.marked < run.end:
                # Progress inside the chunk being filled is journaled too (every
                # JOURNAL_STEP): a kill -9 loses at most that much per stream.
                p.advance(run.marked, run.pos - p.chunk_range(run.marked)[0])
        if take < len(data):
            self._count(job, take)  # the caller counts only what it hands on whole
            raise _RunCut()

    def _mark(self, job: _BlobJob, run: _Run) -> None:
        p = job.partial
        assert p is not None
        while run.marked < run.end and p.chunk_range(run.marked)[1] <= run.pos:
            p.mark_done(run.marked)
            run.marked += 1
            job.wake_hasher.set()

    def _count(self, job: _BlobJob, n: int) -> None:
        if not job.fetched:
            job.first_byte = time.monotonic()
        job.fetched += n
        job.last_byte = time.monotonic()
        if job.on_bytes is not None:
            job.on_bytes(n)

    async def _fetch_span(self, job: _BlobJob, start: int, end: int) -> None:
        """Bytes [start, end) into the job's sink, retried from where they stopped."""
        pos = [start]
        failures = 0
        broken: dict[str, int] = {}  # mirror -> wrong answers to this span
        limit = self.options.max_attempts * len(self.pool.mirrors)
        while pos[0] < end:
            mirror = self.pool.pick(time.monotonic(), job.excluded)
            if mirror is None:
                raise (
                    job.skip_errors[-1]
                    if job.skip_errors
                    else MirrorFailed(f"no mirror could serve {job.file.path}")
                )
            try:
                await self._stream_range(job, mirror, pos, end)
                self.pool.succeeded(mirror)
            except _SkipMirror as sm:
                job.excluded.add(mirror)
                job.skip_errors.append(sm.error)
                self._mirror_failed(mirror)
            except _Retry as r:
                failures += 1
                self._mirror_failed(mirror)
                self.pool.failed(mirror, time.monotonic())
                if r.broken:
                    broken[mirror] = broken.get(mirror, 0) + 1
                    if broken[mirror] >= _BROKEN_ANSWERS:  # not a glitch: skip the mirror
                        job.excluded.add(mirror)
                        job.skip_errors.append(
                            PeerMisbehaved(
                                f"{r.reason} ({broken[mirror]} times)",
                                hint="a proxy or cache in front of the mirror breaks "
                                "Range requests; try another --mirror",
                            )
                        )
                        continue
                delay = self._delay(failures, r.retry_after)
                if failures >= limit:
                    # A mirror that was sending this file moments ago is down for a
                    # while (a restart, a network blip): ride it out for
                    # `outage_grace` after its last byte, then give up.
                    quiet = time.monotonic() - job.last_byte
                    if r.broken or job.fetched == 0 or quiet >= self.options.outage_grace:
                        cls = MirrorUnreachable if r.network else MirrorFailed
                        raise cls(
                            f"gave up on {job.file.path} after {failures} attempts: {r.reason}",
                            hint="the mirror keeps failing; retry later (the "
                            "download resumes) or add another --mirror",
                        ) from None
                    delay = min(delay, _OUTAGE_POLL, self.options.outage_grace - quiet)
                await asyncio.sleep(delay)

    def _mirror_failed(self, mirror: str) -> None:
        if self.on_mirror_error is not None:
            self.on_mirror_error(mirror)

    def _delay(self, failures: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.options.backoff_max)
        base = min(self.options.backoff_max, self.options.backoff_base * 2 ** (failures - 1))
        return base * (0.5 + random.random() / 2)  # jitter: herds do not retry in lockstep

    async def _open(
        self, job: _BlobJob, mirror: str, headers: dict[str, str], method: str = "GET"
    ) -> aiohttp.ClientResponse:
        """Request with redirects followed by hand; Authorization stays on the mirror.
        The blob's first answer (or failure) lets smaller blobs ask (`SMALL_BLOB_RATIO`)."""
        try:
            return await self._follow(job, mirror, headers, method)
        finally:
            self._answered(job)

    async def _follow(
        self, job: _BlobJob, mirror: str, headers: dict[str, str], method: str
    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        url = job.cdn.get(mirror) or job.snapshot.resolve_url(mirror, job.file.path)
        from_cdn = mirror in job.cdn
        home = origin(mirror)
        for _ in range(10):
            h = dict(headers)
            if self.settings.token and origin(url) == home:
                h["Authorization"] = f"Bearer {self.settings.token}"
            try:
                resp = await self._session.request(method, url, headers=h, allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                job.cdn.pop(mirror, None)
                raise _Retry(f"{mirror}: {exc.__class__.__name__}: {exc}", network=True) from exc
            if resp.status in REDIRECTS and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                resp.release()
                job.cdn[mirror] = url
                continue
            if from_cdn and resp.status in (401, 403, 404, 410):
                resp.release()  # expired signed URL: go back to the mirror for a new one
                job.cdn.pop(mirror, None)
                raise _Retry(f"redirect target answered {resp.status}", retry_after=0)
            return resp
        raise _SkipMirror(MirrorFailed(f"{mirror}: too many redirects for {job.file.path}"))

    async def _stream_range(self, job: _BlobJob, mirror: str, pos: list[int], end: int) -> None:
        size = job.file.size
        t0 = time.monotonic()
        job.requests += 1
        resp = await self._open(job, mirror, {"Range": f"bytes={pos[0]}-{end - 1}"})
        took = time.monotonic() - t0
        job.request_cost = took if job.request_cost is None else (job.request_cost + took) / 2
        self.pool.request_cost[mirror] = job.request_cost
        try:
            if resp.status == 200:
                if pos[0] == 0 and end == size:
                    # The whole file asked and sent, but as a 200: a mirror that honours
                    # Range answers 206 even here. Take the body; more streams would
                    # each get the whole file too, and the mirror is remembered.
                    self.pool.ignores_range.add(mirror)
                    job.single_stream = True
                    await self._copy_body(job, resp, pos, end)
                    return
                raise _RangeIgnored(resp, mirror)
            if resp.status == 206:
                said = resp.headers.get("Content-Range", "")
                m = _CONTENT_RANGE.fullmatch(said.strip())
                if m and m.group(3) in ("*", str(size)) and int(m.group(1)) != pos[0]:
                    # Right file, wrong bytes (a broken proxy or cache in front): none
                    # of the body is written; ask again, then give up on the mirror.
                    raise _Retry(
                        f"{mirror} answered Content-Range {said!r} to a request for "
                        f"bytes {pos[0]}-{end - 1} of {job.file.path}",
                        broken=True,
                    )
                if not m or (m.group(3) != "*" and int(m.group(3)) != size):
                    raise _SkipMirror(
                        PeerMisbehaved(
                            f"{mirror} answered a wrong Content-Range for {job.file.path}: "
                            f"{resp.headers.get('Content-Range')!r} (expected bytes {pos[0]}-"
                            f"{end - 1}/{size})",
                            hint="the mirror serves another version of "
                            "this file; try another --mirror",
                        )
                    )
                await self._copy_body(job, resp, pos, end)
                return
            if resp.status == 416:
                raise _SkipMirror(
                    PeerMisbehaved(
                        f"{mirror} says {job.file.path} is shorter than its metadata ({size} B)",
                        hint="the mirror's metadata and files disagree; try another --mirror",
                    )
                )
            if resp.status in RETRYABLE:
                raise _Retry(
                    f"{mirror} answered HTTP {resp.status}",
                    retry_after=_retry_after(resp.headers.get("Retry-After")),
                )
            err = error_from_status(
                resp.status, resp.headers, f"{job.snapshot.repo_id}/{job.file.path}"
            )
            if isinstance(err, (GatedRepo, RepoNotFound)) or len(self.pool.mirrors) == 1:
                raise err
            raise _SkipMirror(err)
        except _RangeIgnored:
            raise
        finally:
            if not resp.closed and resp.status != 200:
                resp.release()

    async def _copy_body(
        self, job: _BlobJob, resp: aiohttp.ClientResponse, pos: list[int], end: int
    ) -> None:
        try:
            async for data in resp.content.iter_chunked(READ_CHUNK):
                take = min(len(data), end - pos[0])
                # the mirror cap: bytes count (and land) once the bucket lets them
                # through; meanwhile the socket fills and TCP slows the sender
                await self.throttle.take(take)
                job.sink(pos[0], memoryview(data)[:take])
                pos[0] += take
                self._count(job, take)
                if pos[0] >= end:
                    break
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
                raise
            raise _Retry(
                f"connection lost after byte {pos[0]}: {exc.__class__.__name__}", network=True
            ) from exc
        finally:
            resp.release() if pos[0] >= end else resp.close()
        if pos[0] < end:
            raise _Retry(f"body ended early at byte {pos[0]} of {end}", network=True)

    async def _single_stream(self, job: _BlobJob, first: _RangeIgnored | None) -> None:
        """The mirror will only send whole files: read one body front to back, writing
        only chunks we lack, and mark chunks as their last byte passes. ``first``: the
        whole-file answer to a Range request, if one came (else this GETs it)."""
        p = job.partial
        assert p is not None
        failures = 0
        pending: _RangeIgnored | None = first
        while len(p.done) < p.n_chunks:
            if pending is None:
                mirror = self.pool.pick(time.monotonic(), job.excluded) or (
                    first.mirror if first is not None else None
                )
                if mirror is None:
                    raise (
                        job.skip_errors[-1]
                        if job.skip_errors
                        else MirrorFailed(f"no mirror could serve {job.file.path}")
                    )
                try:
                    resp = await self._open(job, mirror, {})
                except _Retry as r:
                    failures += 1
                    if failures >= self.options.max_attempts:
                        raise MirrorFailed(f"gave up on {job.file.path}: {r.reason}") from None
                    await asyncio.sleep(self._delay(failures, r.retry_after))
                    continue
                if resp.status not in (200, 206):
                    resp.release()
                    failures += 1
                    if failures >= self.options.max_attempts:
                        raise error_from_status(resp.status, resp.headers, job.file.path)
                    await asyncio.sleep(self._delay(failures, None))
                    continue
                pending = _RangeIgnored(resp, mirror)
            resp = pending.response
            pending = None
            offset = 0
            try:
                async for data in resp.content.iter_chunked(READ_CHUNK):
                    view = memoryview(data)
                    while view:
                        index = offset // p.chunk_size
                        stop = p.chunk_range(index)[1]
                        take = min(len(view), stop - offset)
                        if index not in p.done:
                            await self.throttle.take(take)
                            p.write(offset, view[:take])
                            self._count(job, take)
                        offset += take
                        view = view[take:]
                        p.advance(index, offset - p.chunk_range(index)[0])
                        if offset == stop:
                            p.mark_done(index)
                            job.wake_hasher.set()
                    if offset >= p.size:
                        break
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                failures += 1
                if failures >= self.options.max_attempts:
                    raise MirrorFailed(f"gave up on {job.file.path}: {exc!r}") from exc
                await asyncio.sleep(self._delay(failures, None))
            finally:
                resp.close()
        job.pending.clear()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    return None


def hash_range(
    fd: int,
    hasher: BlobHasher,
    start: int,
    stop: int,
    each: Callable[[], None] | None = None,
) -> None:
    """Hash [start, stop) of the partial file (blocking; runs in a worker thread).

    pread into one reused buffer: the bytes are in the page cache, just written. (An
    mmap of the whole range counted it in our RSS; 8 MiB mmap windows measured slower
    end to end than this.) Hashed bytes are not needed in memory any more: DONTNEED
    starts their writeback now and lets the kernel drop them, so memory stays flat and
    the final fsync has little left to do."""
    buf = bytearray(min(READ_BLOCK, max(0, stop - start)))
    view = memoryview(buf)
    pos = start
    while pos < stop:
        n = os.preadv(fd, [view[: min(len(buf), stop - pos)]], pos)
        if n <= 0:
            raise OSError(f"file shorter than {stop} bytes")
        hasher.update(view[:n])
        pos += n
        if each is not None:  # after every block read (it may raise to stop)
            each()
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_DONTNEED)


def hash_file_range(path: Path, hasher: BlobHasher, start: int, stop: int) -> None:
    """`hash_range` of `path` in a worker thread that owns its fd: a caller cancelled
    meanwhile cannot close it under the read (a thread runs on to its end; its hasher
    is thrown away). One open per range: a range is one or more 1-16 MiB chunks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        hash_range(fd, hasher, start, stop)
    finally:
        os.close(fd)


__all__ = ["MirrorFetcher", "MirrorPool", "RangeUnsupported", "UserError", "chunk_size_for"]
