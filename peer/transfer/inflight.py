"""What a blob being fetched offers to a reader before it is finished (HF_ENDPOINT mode
streams a shard to its client while the swarm or the mirror is still fetching it).

Two sides, one owner of the state:

- the fetch (`peer.agent.fetch.BlobFetcher`) writes: `InFlightBlob.start`, `advance`,
  `reset`, `moved`, `fail`. ``ready`` is the length of the prefix of ``path`` that is on disk
  and checked so far (swarm: pieces that passed libtorrent's merkle check against the
  manifest, flushed to the file; mirror: bytes received in order and fed to the
  whole-file hash). It reads where the readers are through `has_readers`,
  `lowest_reader_position` (the swarm asks for the pieces right after it) and
  `waiting_count`, and hears of readers coming, going and starting to wait through
  `watching_readers` (so it makes more readable when a reader needs it, without
  polling).
- a reader (`peer.serving.hub_api`) registers with ``async with flight.reader(start)``
  and gets a `FlightReader`: `readable` waits, on the flight's own signal (no polling),
  until bytes past its position may be sent; `advance` says how far it sent.

The blob's last byte is held back until `moved` (the blob was renamed into ``blobs/``,
which happens only after its whole-file hash matched the Hub's blob id): a body the
client receives whole is then a verified one. Bytes from LAN peers (a herd leader's
relay; swarm pieces, checked only against a peer's own manifest in open mode) are held
back more: the last byte of every answer, a ranged one too, waits for that hash, so a
peer's word never makes a complete body (`start(from_peers=True)`). The mirror's own
bytes are not: they are what the client would get from the mirror. A mirror fetch that
resumes on a journal is held back as peers' are: the bytes it found may be a relay's
or a member stream's.

A fetch that changes source mid-way (a swarm result that failed its whole-file hash,
fetched again from the mirror) bumps ``generation``: a reader that already had bytes of
the old one gets `StreamCut` and must cut its connection. A fetch that fails for good
says so (`fail`): every reader ends at once, a relay reader that got nothing yet too
(it would otherwise wait for bytes that never come until its idle cut); one that
follows the fetch (``until``) and sent nothing waits for the fetch's error instead.

It lives in `peer.transfer`, not `peer.cache`: it is the in-memory progress of one
transfer between its producer and its consumers (asyncio signals, reader positions that
steer the swarm), not a part of the cache's layout on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class StreamCut(ConnectionResetError):
    """The bytes a reader sent are void (the fetch failed or started over from another
    source): its connection must end short, never look like a whole body."""


@dataclass(frozen=True)
class Window:
    """Bytes [reader position, end) of ``path`` are checked and may be sent now."""

    path: Path
    end: int


class InFlightBlob:
    def __init__(self, blob_id: str, size: int) -> None:
        self.blob_id = blob_id
        self.size = size
        self._path: Path | None = None
        self._ready = 0
        self._generation = 0
        self._verified = False  # moved into blobs/: the last byte may go out
        self._from_peers = False  # the bytes are a LAN peer's word until verified
        self._failed = False  # the fetch failed for good: every reader ends
        self._readers: set[FlightReader] = set()
        self._waiting = 0  # readers blocked in `readable` right now
        self._watchers: list[Callable[[], None]] = []
        # Replaced at every change: a waiter holds the one current when it looked, so no
        # change between its look and its wait is lost.
        self._changed = asyncio.Event()

    # -- read-only view ----------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def ready(self) -> int:
        return self._ready

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def reader_count(self) -> int:
        return len(self._readers)

    @property
    def has_readers(self) -> bool:
        return bool(self._readers)

    @property
    def waiting_count(self) -> int:
        """Readers waiting for bytes past what is readable now."""
        return self._waiting

    @contextlib.contextmanager
    def watching_readers(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call `callback` whenever a reader comes, goes or starts to wait for bytes,
        while the block runs (the fetch looks at readers only then)."""
        self._watchers.append(callback)
        try:
            yield
        finally:
            self._watchers.remove(callback)

    def lowest_reader_position(self) -> int | None:
        """Where the reader furthest behind is (readers ahead of it wait for the same
        checked prefix), or None without readers."""
        return min((r.position for r in self._readers), default=None)

    # -- the fetch writes --------------------------------------------------------------

    def start(self, path: Path, *, from_peers: bool) -> None:
        """A (new) source writes the blob at `path`, from nothing checked yet;
        `from_peers`: LAN peers send it (no answer ends before the whole-file hash)."""
        if self._path is not None:
            self._generation += 1
        self._path = path
        self._ready = 0
        self._verified = False
        self._from_peers = from_peers
        self._notify()

    def moved(self, path: Path) -> None:
        """The blob's whole-file hash matched and it now lives at `path` (renamed into
        ``blobs/``): the same bytes, and the last one may go out too."""
        if self._path is not None:
            self._path = path
            self._ready = self.size
            self._verified = True
            self._notify()

    def reset(self) -> None:
        """What was ready is void (the source failed): readers that sent some must cut."""
        if self._path is not None:
            self._generation += 1
        self._path = None
        self._ready = 0
        self._verified = False
        self._notify()

    def fail(self) -> None:
        """The fetch failed for good (no source left): what was ready is void, and
        every reader ends now (`StreamCut`), not only those that had bytes."""
        self._failed = True
        self.reset()

    def advance(self, ready: int) -> None:
        if ready > self._ready:
            self._ready = min(ready, self.size)
            self._notify()

    # -- readers -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def reader(
        self, start: int, *, until: asyncio.Future[Any] | None = None
    ) -> AsyncIterator[FlightReader]:
        """A reader from byte `start`, registered (the fetch sees its position) while
        the block runs. `until`: the fetch the reader follows; once it is done, waits
        end (`FlightReader.readable` returns None) and the caller takes its result."""
        r = FlightReader(self, start, until)
        self._readers.add(r)
        self._readers_changed()
        if until is not None:
            until.add_done_callback(r._wake)
        try:
            yield r
        finally:
            self._readers.discard(r)
            self._readers_changed()
            if until is not None:
                until.remove_done_callback(r._wake)

    def _readers_changed(self) -> None:
        for callback in list(self._watchers):
            callback()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _window(self, position: int, end: int) -> Window | None:
        if self._path is None:
            return None
        if self._verified:
            limit = min(end, self._ready)
        else:
            limit = min(end, self._ready, self.size - 1)
            if self._from_peers and limit == end:
                limit = end - 1  # a ranged answer too: its last byte after the hash
        return Window(self._path, limit) if limit > position else None


class FlightReader:
    """One reader of an `InFlightBlob` (made by `InFlightBlob.reader`). Its generation is
    pinned by the first window it gets: from then on, bytes of it may have gone out."""

    def __init__(self, flight: InFlightBlob, start: int, until: asyncio.Future[Any] | None) -> None:
        self._flight = flight
        self._position = start
        self._until = until
        self._generation: int | None = None

    @property
    def blob_id(self) -> str:
        return self._flight.blob_id

    @property
    def size(self) -> int:
        return self._flight.size

    @property
    def position(self) -> int:
        return self._position

    def advance(self, position: int) -> None:
        """The reader sent the bytes before `position`."""
        self._position = max(self._position, position)

    def check(self) -> None:
        """Raise `StreamCut` if what this reader got so far is void."""
        f = self._flight
        # A reader that follows the fetch (`until`) and sent nothing takes its error.
        if f.failed and (self._generation is not None or self._until is None):
            raise StreamCut(f"the fetch of {f.blob_id[:12]} failed")
        if self._generation is not None and (f.generation != self._generation or f.path is None):
            raise StreamCut(f"the fetch of {f.blob_id[:12]} started over from another source")

    def window(self, end: int) -> Window | None:
        """What may be read from the position up to `end` now, or None if nothing yet;
        `StreamCut` if what was read before is void."""
        self.check()
        w = self._flight._window(self._position, end)
        if w is not None and self._generation is None:
            self._generation = self._flight.generation
        return w

    def _wake(self, _: object) -> None:
        self._flight._notify()  # the fetch followed is done: its waiters look again

    async def changed(self) -> None:
        """Until the flight changes (bytes checked, source moved or void), or the fetch
        given as `until` is done."""
        if self._until is None or not self._until.done():
            await self._flight._changed.wait()

    async def readable(self, end: int) -> Window | None:
        """Wait until bytes past the position may be read (up to `end`); None once the
        fetch given as `until` is done (its result is the whole verified blob, or its
        error). Raises `StreamCut` if what was read before is void."""
        while self._until is None or not self._until.done():
            w = self.window(end)
            if w is not None:
                return w
            flight = self._flight
            flight._waiting += 1
            try:
                flight._readers_changed()  # the fetch makes more readable for us
                await self.changed()
            finally:
                flight._waiting -= 1
        # The fetch returned: its result is the verified blob, but bytes this reader sent
        # before may be of a source that went void since (its last send outlasted the
        # refetch): cut, never completed from the verified blob.
        self.check()
        return None
