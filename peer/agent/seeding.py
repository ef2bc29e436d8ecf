"""What this agent holds and seeds: every verified blob of its HF cache, straight from
``blobs/`` (no second copy).

Blobs that were in the cache before the agent first ran (written by `hf download`, say)
are verified once, in the background, against their id; the result and the blob's
manifest are remembered in the state dir, keyed by the file's fingerprint, so a restart
re-hashes nothing that did not change. A blob that fails verification is never offered.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from peer import wire
from peer.agent.state import Fingerprint, StateDir, VerifiedRecord
from peer.manifests import VerifiedBlob, make_manifest
from peer.transfer.swarm import SwarmError, SwarmSession, TorrentExists
from peer.verification.hashing import hash_file, is_blob_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldBlob:
    blob_id: str
    path: Path
    manifest: wire.Manifest


class SeedIndex:
    def __init__(
        self, cache_root: Path, state: StateDir, swarm: SwarmSession, agent_id: str
    ) -> None:
        self.cache_root = cache_root
        self.state = state
        self.swarm = swarm
        self.agent_id = agent_id
        self.held: dict[str, HeldBlob] = {}
        self.rejected: set[Path] = set()
        self._lock = asyncio.Lock()

    def manifests_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]:
        return [self.held[b].manifest for b in blob_ids if b in self.held]

    def path_of(self, blob_id: str) -> Path | None:
        held = self.held.get(blob_id)
        return held.path if held else None

    async def add_verified(self, path: Path, blob_id: str) -> HeldBlob:
        """Seed a blob whose whole hash was just checked (the caller's proof)."""
        async with self._lock:
            if blob_id in self.held:
                return self.held[blob_id]
            fp = await asyncio.to_thread(Fingerprint.of, path)
            if fp.size == 0:
                raise OSError(f"{blob_id} is empty: nothing to seed")
            manifest = await make_manifest(
                VerifiedBlob(blob_id, fp.size, path), made_by=self.agent_id
            )
            self.state.remember_verified(VerifiedRecord(blob_id, fp, wire.encode(manifest)))
            return await self._seed(path, manifest)

    async def offer_verified(self, path: Path, blob_id: str, size: int) -> None:
        """`add_verified` for a blob just put in the cache: an empty blob has nothing to
        seed, and a blob that cannot be seeded is still good to use (logged, not raised)."""
        if size == 0:
            return
        try:
            await self.add_verified(path, blob_id)
        except (SwarmError, OSError) as exc:
            log.warning("cannot seed %s: %s", blob_id, exc)

    async def add_with_manifest(self, path: Path, manifest: wire.Manifest) -> HeldBlob:
        """Seed a blob just verified whole, whose manifest came with it (from the peers
        it was fetched from: every piece passed that merkle tree and the whole file
        matched its id, so the manifest is right for it, and no re-hash is needed)."""
        async with self._lock:
            if manifest.blob_id in self.held:
                return self.held[manifest.blob_id]
            fp = await asyncio.to_thread(Fingerprint.of, path)
            self.state.remember_verified(
                VerifiedRecord(manifest.blob_id, fp, wire.encode(manifest))
            )
            return await self._seed(path, manifest)

    async def _seed(self, path: Path, manifest: wire.Manifest) -> HeldBlob:
        held = HeldBlob(manifest.blob_id, path, manifest)
        try:
            await self.swarm.add_torrent(manifest.torrent, path.parent, seed_mode=True)
        except TorrentExists:
            pass
        self.held[manifest.blob_id] = held
        return held

    async def scan(self) -> None:
        """Seed every verified blob of the cache; verify the unknown ones (slowly: one
        at a time, in a thread, so a downloading agent is not starved)."""
        for path in await asyncio.to_thread(_cache_blobs, self.cache_root):
            blob_id = path.name
            if blob_id in self.held or path in self.rejected:
                continue
            try:
                fp = await asyncio.to_thread(Fingerprint.of, path)
            except OSError:
                continue
            if fp.size == 0:
                continue  # an empty blob needs no seeding: anyone can make it
            record = self.state.verified(blob_id, fp)
            if record is not None:
                try:
                    manifest = wire.decode_as(record.manifest, wire.Manifest)
                    async with self._lock:
                        await self._seed(path, manifest)
                    continue
                except (wire.WireError, SwarmError) as exc:
                    log.warning(
                        "stored manifest of %s unusable (%s); verifying again", blob_id, exc
                    )
            verdict = await asyncio.to_thread(hash_file, path, blob_id, fp.size)
            if not verdict.ok:
                log.warning(
                    "cache blob %s does not match its id (hash %s); not seeding it",
                    path,
                    verdict.actual,
                )
                self.rejected.add(path)
                self.state.forget_verified(blob_id)
                continue
            try:
                await self.add_verified(path, blob_id)
            except SwarmError as exc:
                log.warning("cannot seed %s: %s", path, exc)


def _cache_blobs(root: Path) -> list[Path]:
    found: list[Path] = []
    try:
        repos = list(os.scandir(root))
    except OSError:
        return found
    for repo in repos:
        if "--" not in repo.name:
            continue
        try:
            entries = list(os.scandir(os.path.join(repo.path, "blobs")))
        except OSError:
            continue
        for e in entries:
            if is_blob_id(e.name) and e.is_file():  # follows symlinks into a shared store
                found.append(Path(e.path))
    return found
