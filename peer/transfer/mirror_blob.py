"""One blob from the mirror, verified: the last source of every download (the agent's
`peer.agent.fetch.BlobFetcher` after peers and the herd, the mirror-only source of
`peer.download` after the cache).

`from_mirror` fills the blob's journaled partial (resumed if one is on disk) until its
whole-file hash matches the Hub's id; a mismatch is thrown away and fetched once more
from scratch (a new ``attempt``: a herd leader's claim says so, its followers copy the
new one from byte 0), a second one is an `IntegrityError`. It counts into the blob's
`BlobCounters` and, when a reader streams the blob (HF_ENDPOINT mode), moves its
`InFlightBlob`. The caller renames the verified file into place. A caller that will
seed the blob asks for its v2 tree too (``want_tree``): built from the bytes as the
whole-file hash reads them, it is handed over only with a verified file, and makes the
blob's manifest without a second read (`peer.manifests.make_manifest`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peer.cache.partial import PartialBlob, PartialBusy
from peer.errors import IntegrityError
from peer.hub.metadata import RemoteFile, Snapshot
from peer.manifests.merkle import V2Tree, V2TreeBuilder
from peer.transfer.inflight import InFlightBlob
from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

log = logging.getLogger(__name__)


@dataclass
class BlobCounters:
    """One blob of a download: how far it is, and where its bytes came from."""

    size: int
    done: int = 0
    from_peers: int = 0
    from_mirror: int = 0
    reused: int = 0
    resumed: int = 0  # verified pieces found on disk when a swarm download started
    hash_failures: int = 0
    # How often the mirror fetch started over from byte 0 (its hash failed): a herd
    # leader's claim says it, so that its `done` going back is not taken for a lie.
    attempt: int = 0

    def had(self) -> None:
        """Nothing to fetch: the blob was here already (or another process got it)."""
        self.reused = self.done = self.size


@dataclass(frozen=True)
class FromMirror:
    """A blob fetched from the mirror whose whole-file hash matched its id."""

    path: Path  # in the partial dir, for the caller to rename into place
    tree: V2Tree | None  # the v2 tree of those very bytes, when asked for


async def from_mirror(
    mirror: MirrorFetcher,
    snapshot: Snapshot,
    file: RemoteFile,
    partial_dir: Path,
    counters: BlobCounters,
    *,
    done_elsewhere: Callable[[], bool],
    flight: InFlightBlob | None = None,
    want_tree: bool = False,
    in_order: bool = False,
) -> FromMirror | None:
    """The verified file in `partial_dir` (and its v2 tree if ``want_tree``); None when
    another process finished the same blob meanwhile (`done_elsewhere`: counted as
    had). `in_order`: others copy the checked prefix as it grows (a herd leader)."""
    if flight is not None:
        flight.reset()  # a swarm attempt may have gone before: its readers must cut
    for attempt in (1, 2):
        partial = PartialBlob(partial_dir, file.blob_id, file.size, chunk_size_for(file.size))
        while True:
            try:
                partial.open()
                break
            except PartialBusy:
                # Another process fetches this blob: wait for it rather than race it.
                await asyncio.sleep(0.5)
                if done_elsewhere():
                    counters.had()
                    return None
        counters.done = partial.done_bytes()  # resumed: on disk from an earlier run
        # Resumed bytes may be a peer's word (a herd leader's relay, a member stream's
        # pieces checked against that member's manifest): no answer ends on them before
        # the whole-file hash, as none did while that source ran.
        resumed = counters.done > 0

        def got(n: int) -> None:
            counters.from_mirror += n
            counters.done += n

        def prefix(n: int, path: Path = partial.data_path, resumed: bool = resumed) -> None:
            if flight is not None:
                if flight.path != path:
                    flight.start(path, from_peers=resumed)
                flight.advance(n)

        tree = V2TreeBuilder(file.blob_id, file.size) if want_tree else None
        try:
            verdict = await mirror.fetch(
                snapshot,
                file,
                partial,
                on_bytes=got,
                on_prefix=prefix,
                also_hash=tree.update if tree is not None else None,
                in_order=in_order,
            )
        except BaseException:
            partial.close()
            raise
        if verdict.ok:
            counters.done = file.size
            # Only now, with the whole-file hash matched, is the tree the blob's.
            return FromMirror(partial.take_finished(), tree.finish() if tree else None)
        partial.discard()
        counters.hash_failures += 1
        counters.attempt += 1
        counters.done = 0
        if flight is not None:
            flight.reset()  # what a reader got is void: it must cut
        log.warning(
            "%s from the mirror hashed to %s, not %s (attempt %d)",
            file.path,
            verdict.actual,
            file.blob_id,
            attempt,
        )
    raise IntegrityError(
        f"{file.path}: content hash {verdict.actual} does not match the Hub's "
        f"{file.blob_id}, twice",
        hint="the mirror serves corrupt data; nothing was written to the cache. "
        "Try another --mirror",
    )
