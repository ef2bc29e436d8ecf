"""What a blob being fetched offers to a reader before it is finished (HF_ENDPOINT mode
streams a shard to its client while the swarm or the mirror is still fetching it).

`BlobFetcher` advances ``ready``: the length of the prefix of ``path`` that is on disk
and checked so far (swarm: pieces that passed libtorrent's merkle check against the
manifest, flushed to the file; mirror: bytes received in order and fed to the
whole-file hash). The reader must hold back the blob's last byte until the fetch has
returned: only then has the whole-file hash matched the Hub's blob id, and a body the
client receives whole is then a verified one. A fetch that changes source mid-way (a
swarm result that failed its whole-file hash, fetched again from the mirror) bumps
``generation``: a reader that already sent bytes of the old one must cut its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path


class InFlightBlob:
    def __init__(self, blob_id: str, size: int) -> None:
        self.blob_id = blob_id
        self.size = size
        self.path: Path | None = None
        self.ready = 0
        self.generation = 0
        self.readers = 0
        self.read_pos = 0  # where the furthest reader is: the swarm asks for pieces there
        self._changed = asyncio.Event()

    def start(self, path: Path) -> None:
        """A (new) source writes the blob at `path`, from nothing checked yet."""
        if self.path is not None:
            self.generation += 1
        self.path = path
        self.ready = 0
        self._changed.set()

    def moved(self, path: Path) -> None:
        """The same checked bytes now live at `path` (renamed into ``blobs/``)."""
        if self.path is not None:
            self.path = path
            self._changed.set()

    def reset(self) -> None:
        """What was ready is void (the source failed): readers that sent some must cut."""
        if self.path is not None:
            self.generation += 1
        self.path = None
        self.ready = 0
        self._changed.set()

    def advance(self, ready: int) -> None:
        if ready > self.ready:
            self.ready = min(ready, self.size)
            self._changed.set()

    async def wait(self, at_most: float) -> None:
        """Until something changes, or `at_most` seconds."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), at_most)
