"""What this agent holds, and what of it the LAN may have: every verified blob of its HF
cache, seeded straight from ``blobs/`` (no second copy) when the sharing policy allows.

Each blob has a provenance (`peer.serving.sharing`): the repos it is held for and what
the mirror said of each. Only shared blobs (one of their repos public, published here,
or taken openly from peers) are seeded and offered; the others are kept for this
machine's own callers. A repo the mirror later calls private or gated stops sharing its
blobs at once (its torrents are removed from the session).

The operator's seeding policy (`AgentConfig.seeding`) narrows this further: ``always``
offers every shared blob, ``pinned`` only those of pinned repos (`hfswarm pin`), ``none``
nothing (the agent still serves its own machine's callers). It never widens it: a
private or gated repo's blob is kept whatever the policy says.

Blobs that were in the cache before the agent first ran (written by `hf download`, say)
are verified once, in the background, against their id; the result and the blob's
manifest are remembered in the state dir, keyed by the file's fingerprint, so a restart
re-hashes nothing that did not change. Their repos are then checked with the mirror
anonymously (`confirm`): only a repo any client may read makes them shared. A blob that
fails verification is never offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from peer import wire
from peer.agent.state import Fingerprint, StateDir, VerifiedRecord
from peer.cache.hf_cache import repo_of_folder
from peer.manifests import V2Tree, VerifiedBlob, make_manifest
from peer.manifests.revisions import is_local_repo
from peer.serving.sharing import Provenance, RepoKey, Visibility, repo_key
from peer.transfer.swarm import SwarmError, SwarmSession, TorrentExists
from peer.verification.hashing import hash_file, is_blob_id

log = logging.getLogger(__name__)

# (repo type, repo id) -> what an anonymous client gets from the mirror (None: no answer)
Confirm = Callable[[str, str], Awaitable[Visibility | None]]
# (repo key, what is known of it): what a blob entering the cache is held for
HeldFor = tuple[RepoKey, Visibility] | None
# The repos pinned on this agent (`hfswarm pin`), for the ``pinned`` seeding policy
PinnedRepos = Callable[[], frozenset[RepoKey]]


@dataclass(frozen=True)
class HeldBlob:
    blob_id: str
    path: Path
    manifest: wire.Manifest


class SeedIndex:
    def __init__(
        self,
        cache_root: Path,
        state: StateDir,
        swarm: SwarmSession,
        agent_id: str,
        confirm: Confirm | None = None,
        *,
        policy: str = "always",
        pinned: PinnedRepos = frozenset,
        cluster_share: bool = False,
    ) -> None:
        self.cache_root = cache_root
        self.policy = policy  # always | pinned | none (`peer.config.SEEDING_POLICIES`)
        self.pinned = pinned
        # Cluster mode, share = "cluster": private and gated blobs are held (seeded,
        # offered) too; peers are authenticated members then.
        self.cluster_share = cluster_share
        self.state = state
        self.swarm = swarm
        self.agent_id = agent_id
        self.confirm = confirm
        self.held: dict[str, HeldBlob] = {}  # shared: seeded and offered to the LAN
        self.kept: dict[str, Path] = {}  # verified, for this machine's callers only
        self.rejected: set[Path] = set()
        self._provenance: dict[str, Provenance] = {}
        # v2 trees of blobs being added right now (`add_verified`): their manifests are
        # made from them instead of re-reading the blob
        self._trees: dict[str, V2Tree] = {}
        self._lock = asyncio.Lock()

    # -- what the LAN may have -----------------------------------------------------------

    def manifests_for(self, blob_ids: tuple[str, ...]) -> list[wire.Manifest]:
        return [self.held[b].manifest for b in blob_ids if b in self.held]

    def shared_path(self, blob_id: str) -> Path | None:
        """The blob for a peer: only a shared one."""
        held = self.held.get(blob_id)
        return held.path if held else None

    # -- what this agent holds -------------------------------------------------------------

    def path_of(self, blob_id: str) -> Path | None:
        """A blob this agent verified, shared or not (for its own callers; see
        `peer.serving.sharing.may_serve` before serving it)."""
        held = self.held.get(blob_id)
        return held.path if held else self.kept.get(blob_id)

    def provenance(self, blob_id: str) -> Provenance:
        known = self._provenance.get(blob_id)
        if known is None:
            known = self.state.provenance(blob_id)
            # Remembered for blobs held here only: ids a peer names (of blobs nobody has
            # here) must not grow this map.
            if blob_id in self.held or blob_id in self.kept:
                self._provenance[blob_id] = known
        return known

    async def note(self, blob_id: str, key: RepoKey, visibility: Visibility) -> None:
        """Record what is now known of one repo holding the blob; start or stop sharing
        it if that changed the verdict."""
        async with self._lock:
            await self._note(blob_id, (key, visibility))

    async def _note(
        self, blob_id: str, held_for: HeldFor, verified: wire.Manifest | None = None
    ) -> None:
        """``verified``: the blob's manifest, its record written under this same lock
        (`add_with_manifest`): taken as it is instead of read back."""
        before = self.provenance(blob_id)
        after = before if held_for is None else before.with_repo(*held_for)
        if after != before:
            self._provenance[blob_id] = after
            await asyncio.to_thread(self.state.save_provenance, blob_id, after)
        offered = self._offered(blob_id, after)
        if offered and blob_id in self.kept:
            path = self.kept[blob_id]
            manifest = verified if verified is not None and verified.blob_id == blob_id else None
            if manifest is None:
                fp = await asyncio.to_thread(Fingerprint.of, path)
                record = self.state.verified(blob_id, fp)
                manifest = _decoded(record.manifest) if record is not None else None
                if manifest is None:
                    manifest = await self._make_manifest(
                        path, blob_id, fp, self._trees.get(blob_id)
                    )
            del self.kept[blob_id]
            await self._seed(path, manifest)
        elif not offered and blob_id in self.held:
            held = self.held.pop(blob_id)
            self.kept[blob_id] = held.path
            why = "its repos are private or gated" if not after.shared else "seeding policy"
            log.info("%s is no longer shared: %s", blob_id[:12], why)
            await self._unseed(held)

    def would_offer(self, blob_id: str, size: int, held_for: HeldFor) -> bool:
        """Whether a blob about to be fetched for ``held_for`` would be seeded as things
        stand (worth building its v2 tree while it downloads)."""
        if size == 0 or blob_id in self.held:
            return False
        provenance = self.provenance(blob_id)
        return self._offered(blob_id, provenance.with_repo(*held_for) if held_for else provenance)

    def _offered(self, blob_id: str, provenance: Provenance) -> bool:
        """Shared by the sharing policy, and offered by the seeding policy."""
        if not provenance.shared_in(self.cluster_share) or self.policy == "none":
            return False
        if self.policy == "pinned":
            return bool(self.pinned() & set(self._repos_of(blob_id, provenance)))
        return True

    def _repos_of(self, blob_id: str, provenance: Provenance) -> list[RepoKey]:
        repos = [key for key, _ in provenance.repos]
        path = self.path_of(blob_id)
        if path is not None and (repo := repo_of_folder(path.parent.parent.name)) is not None:
            repos.append(repo_key(*repo))
        return repos

    async def _unseed(self, held: HeldBlob) -> None:
        try:
            await self.swarm.remove_torrent(held.manifest.info_hash)
        except SwarmError as exc:
            log.warning("cannot stop seeding %s: %s", held.blob_id[:12], exc)

    async def apply_policy(self) -> None:
        """The pins changed (or the policy did): seed and unseed to match."""
        async with self._lock:
            for blob_id in [*self.held, *self.kept]:
                try:
                    await self._note(blob_id, None)
                except (SwarmError, OSError) as exc:
                    log.warning("cannot seed %s: %s", blob_id[:12], exc)

    async def uploaded(self) -> dict[str, int]:
        """Bytes each seeded blob sent to peers through the swarm so far (what the
        cache's quota counts as a use)."""
        sent: dict[str, int] = {}
        for blob_id, held in list(self.held.items()):
            with contextlib.suppress(SwarmError):
                status = await self.swarm.status(held.manifest.info_hash)
                sent[blob_id] = status.uploaded_payload_bytes
        return sent

    async def forget(self, blob_id: str) -> None:
        """The blob leaves the cache (evicted): stop seeding it, first, and forget it."""
        async with self._lock:
            held = self.held.pop(blob_id, None)
            if held is not None:
                await self._unseed(held)
            self.kept.pop(blob_id, None)
            self._provenance.pop(blob_id, None)
            await asyncio.to_thread(self.state.forget_verified, blob_id)

    async def drop_vanished(self, blob_id: str) -> None:
        """A blob whose file left the cache while the agent ran (`hf cache delete`):
        no longer held, seeded or offered."""
        async with self._lock:
            path = self.path_of(blob_id)
            if path is None or await asyncio.to_thread(path.exists):
                return
            self.kept.pop(blob_id, None)
            held = self.held.pop(blob_id, None)
            self.state.forget_verified(blob_id)
            log.info("%s left the cache (%s): no longer seeded", blob_id[:12], path)
            if held is not None:
                try:
                    await self.swarm.remove_torrent(held.manifest.info_hash)
                except SwarmError as exc:
                    log.warning("cannot stop seeding %s: %s", blob_id[:12], exc)

    # -- blobs entering the cache ----------------------------------------------------------

    async def add_verified(
        self, path: Path, blob_id: str, held_for: HeldFor = None, tree: V2Tree | None = None
    ) -> None:
        """Hold a blob whose whole hash was just checked (the caller's proof); seed it if
        it is shared (its manifest is made then: from ``tree``, the v2 tree of the bytes
        that were checked, if given)."""
        if tree is not None:
            self._trees[blob_id] = tree
        try:
            await self._add_verified(path, blob_id, held_for)
        finally:
            self._trees.pop(blob_id, None)

    async def _add_verified(self, path: Path, blob_id: str, held_for: HeldFor) -> None:
        async with self._lock:
            if blob_id in self.held:
                await self._note(blob_id, held_for)
                return
            fp = await asyncio.to_thread(Fingerprint.of, path)
            if fp.size == 0:
                raise OSError(f"{blob_id} is empty: nothing to seed")
            self.kept[blob_id] = path
            after = self.provenance(blob_id)
            if held_for is not None:
                after = after.with_repo(*held_for)
            if not self._offered(blob_id, after):
                # kept only: no manifest (a hash pass) for what is never offered
                self.state.remember_verified(VerifiedRecord(blob_id, fp, b""))
            await self._note(blob_id, held_for)

    async def offer_verified(
        self,
        path: Path,
        blob_id: str,
        size: int,
        held_for: HeldFor = None,
        tree: V2Tree | None = None,
    ) -> None:
        """`add_verified` for a blob just put in the cache: an empty blob has nothing to
        seed, and a blob that cannot be seeded is still good to use (logged, not raised)."""
        if size == 0:
            return
        try:
            await self.add_verified(path, blob_id, held_for, tree)
        except (SwarmError, OSError) as exc:
            log.warning("cannot seed %s: %s", blob_id, exc)

    async def add_with_manifest(
        self, path: Path, manifest: wire.Manifest, held_for: HeldFor = None
    ) -> None:
        """Hold a blob just verified whole, whose manifest came with it (from the peers
        it was fetched from: every piece passed that merkle tree and the whole file
        matched its id, so the manifest is right for it, and no re-hash is needed)."""
        async with self._lock:
            if manifest.blob_id not in self.held:
                fp = await asyncio.to_thread(Fingerprint.of, path)
                self.state.remember_verified(
                    VerifiedRecord(manifest.blob_id, fp, wire.encode(manifest))
                )
                self.kept[manifest.blob_id] = path
                # (seeded, if offered, with this manifest: the record just written is
                # not read back, fingerprinted and decoded again; benchmarks 8.37)
                await self._note(manifest.blob_id, held_for, manifest)
            else:
                await self._note(manifest.blob_id, held_for)

    async def _make_manifest(
        self, path: Path, blob_id: str, fp: Fingerprint, tree: V2Tree | None = None
    ) -> wire.Manifest:
        if tree is not None and tree.size != fp.size:
            tree = None  # not the file verified: hashed again (and refused if it changed)
        blob = VerifiedBlob(blob_id, fp.size, path, tree=tree)
        manifest = await make_manifest(blob, made_by=self.agent_id)
        self.state.remember_verified(VerifiedRecord(blob_id, fp, wire.encode(manifest)))
        return manifest

    async def _seed(self, path: Path, manifest: wire.Manifest) -> HeldBlob:
        held = HeldBlob(manifest.blob_id, path, manifest)
        try:
            await self.swarm.add_torrent(manifest.torrent, path.parent, seed_mode=True)
        except TorrentExists:
            pass
        self.held[manifest.blob_id] = held
        return held

    # -- the cache as found at start ------------------------------------------------------

    async def scan(self) -> None:
        """Hold every verified blob of the cache and seed the shared ones; verify the
        unknown ones (slowly: one at a time, in a thread, so a downloading agent is not
        starved); then ask the mirror, anonymously, about repos never confirmed."""
        unconfirmed: dict[tuple[str, str], list[str]] = {}
        for path in await asyncio.to_thread(_cache_blobs, self.cache_root):
            blob_id = path.name
            if blob_id in self.held or blob_id in self.kept or path in self.rejected:
                continue
            try:
                fp = await asyncio.to_thread(Fingerprint.of, path)
            except OSError:
                continue
            if fp.size == 0:
                continue  # an empty blob needs no seeding: anyone can make it
            record = self.state.verified(blob_id, fp)
            if record is None:
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
                self.state.remember_verified(VerifiedRecord(blob_id, fp, b""))
            repo = repo_of_folder(path.parent.parent.name)
            async with self._lock:
                if blob_id in self.held or blob_id in self.kept:
                    continue
                self.kept[blob_id] = path
                try:
                    await self._note(blob_id, None)
                except SwarmError as exc:
                    log.warning("cannot seed %s: %s", path, exc)
            if repo is not None and self.provenance(blob_id).visibility(repo_key(*repo)) is None:
                unconfirmed.setdefault(repo, []).append(blob_id)
        for (repo_type, repo_id), blob_ids in unconfirmed.items():
            await self._confirm(repo_type, repo_id, blob_ids)

    async def _confirm(self, repo_type: str, repo_id: str, blob_ids: list[str]) -> None:
        """Blobs found in a repo's folder, its visibility never recorded: what the mirror
        tells an anonymous client decides (local/* names are never sent to a mirror:
        those stay unshared until published or fetched again)."""
        if self.confirm is None or is_local_repo(repo_id):
            return
        visibility = await self.confirm(repo_type, repo_id)
        if visibility is None:
            log.info("%s %s: mirror did not answer; its blobs stay unshared", repo_type, repo_id)
            return
        for blob_id in blob_ids:
            try:
                await self.note(blob_id, repo_key(repo_type, repo_id), visibility)
            except (SwarmError, OSError) as exc:
                log.warning("cannot seed %s: %s", blob_id, exc)


def _decoded(raw: bytes) -> wire.Manifest | None:
    if not raw:
        return None
    try:
        return wire.decode_as(raw, wire.Manifest)
    except wire.WireError as exc:
        log.warning("stored manifest unusable (%s); making it again", exc)
        return None


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
