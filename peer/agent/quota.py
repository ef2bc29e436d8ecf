"""The cache's quota, pins and last uses: what `peer.cache.eviction` plans, carried out.

    <state>/pins.json        the pinned repos: [[repo type, repo id, revision or null]]
    <state>/last_used.json   {blob id: seconds since the epoch} when a blob was last
                             downloaded or served (to a local client, a Hub client, a
                             peer over HTTP, or through the swarm: seen when the quota
                             is checked); atime is useless on noatime mounts

`CacheQuota.job()` wraps every download: `admit(snapshot)` reserves the bytes it still
has to fetch and, if the cache would go past `cache_max_size`, evicts least recently used
blobs first, or refuses the download before anything moved (`QuotaExceeded`, the sizes
in its message) leaving the cache as it was. While a job runs, the blobs of its snapshot
and every blob being fetched or streamed are in use and never evicted; so are the blobs
pinned repos link. Evicting a blob unseeds it first (`SeedIndex.forget`), then removes
its snapshot links, the blob, a snapshot left empty and the refs naming it, so that
huggingface_hub's `scan_cache_dir` still finds a consistent cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from peer.agent.seeding import SeedIndex
from peer.agent.state import StateDir, _atomic_write
from peer.cache.eviction import CachedBlob, Pin, plan_eviction
from peer.cache.hf_cache import REPO_TYPE_PREFIX, repo_of_folder
from peer.errors import ConfigError, DiskFull, LocalError
from peer.hub.metadata import Snapshot
from peer.hub.protocol import REPO_TYPES
from peer.serving.sharing import RepoKey, repo_key
from peer.transfer.progress import human_bytes
from peer.verification.hashing import SHA1_RE, is_blob_id

log = logging.getLogger(__name__)

MAX_PINS = 10_000
SAVE_EVERY = 10.0  # seconds between writes of last_used.json while blobs are used


class QuotaExceeded(DiskFull):
    """A download that cannot fit the cache's quota even after eviction (exit 5; a Hub
    client in HF_ENDPOINT mode hears 507)."""


# -- pins ----------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class PinSpec:
    repo_type: str
    repo_id: str
    revision: str | None = None  # None: every revision of the repo

    @classmethod
    def parse(cls, text: str, repo_type: str = "model") -> PinSpec:
        """REPO or REPO@REV, as `hfswarm pin` takes it."""
        repo_id, sep, revision = text.strip().partition("@")
        if repo_type not in REPO_TYPES:
            raise ConfigError(f"repo type {repo_type!r} is not one of {', '.join(REPO_TYPES)}")
        parts = repo_id.split("/")
        if (
            not 1 <= len(parts) <= 2
            or not all(parts)
            or any(p in (".", "..") or "--" in p for p in parts)
            or (sep and not revision)
            or any(p in ("", ".", "..") for p in revision.split("/") if sep)
            or len(text) > 300
        ):
            raise ConfigError(
                f"{text!r} is not a repo to pin", hint="write it as org/name or org/name@revision"
            )
        return cls(repo_type, repo_id, revision or None)

    @property
    def folder(self) -> str:
        return f"{REPO_TYPE_PREFIX[self.repo_type]}--{self.repo_id.replace('/', '--')}"

    @property
    def key(self) -> RepoKey:
        return repo_key(self.repo_type, self.repo_id)

    def __str__(self) -> str:
        name = self.repo_id if self.repo_type == "model" else f"{self.repo_type}:{self.repo_id}"
        return f"{name}@{self.revision}" if self.revision else name

    def to_json(self) -> dict[str, str | None]:
        return {"repo_type": self.repo_type, "repo_id": self.repo_id, "revision": self.revision}

    @classmethod
    def from_json(cls, data: object) -> PinSpec:
        if not isinstance(data, dict):
            raise ConfigError("a pin is a JSON object with repo_type, repo_id, revision")
        repo_id, repo_type, revision = (
            data.get("repo_id"),
            data.get("repo_type", "model"),
            data.get("revision"),
        )
        if not isinstance(repo_id, str) or not isinstance(repo_type, str):
            raise ConfigError("a pin names repo_id and repo_type as strings")
        if revision is not None and not isinstance(revision, str):
            raise ConfigError("a pin's revision is a string or null")
        return cls.parse(f"{repo_id}@{revision}" if revision else repo_id, repo_type)


class Pins:
    """The pinned repos, kept in the state dir (written whole on every change)."""

    def __init__(self, state: StateDir) -> None:
        self.path = state.root / "pins.json"
        self._pins: set[PinSpec] = set()

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise LocalError(
                f"cannot read the pins in {self.path}: {exc}",
                hint="fix or remove the file (then pin the repos again)",
            ) from exc
        try:
            self._pins = {PinSpec.from_json(item) for item in raw}
        except (ConfigError, TypeError) as exc:
            raise LocalError(
                f"a pin in {self.path} is not valid: {exc}",
                hint="fix or remove the file (then pin the repos again)",
            ) from exc

    def all(self) -> list[PinSpec]:
        return sorted(self._pins)

    def add(self, pin: PinSpec) -> bool:
        if pin in self._pins:
            return False
        if len(self._pins) >= MAX_PINS:
            raise ConfigError(f"at most {MAX_PINS} pins", hint="unpin repos you no longer need")
        self._pins.add(pin)
        self._save()
        return True

    def remove(self, pin: PinSpec) -> bool:
        if pin not in self._pins:
            return False
        self._pins.discard(pin)
        self._save()
        return True

    def repos(self) -> frozenset[RepoKey]:
        return frozenset(p.key for p in self._pins)

    def resolved(self, cache_root: Path) -> frozenset[Pin]:
        """As the eviction plan takes them: a revision pin names the commit its ref
        points to now (or the commit itself)."""
        out: set[Pin] = set()
        for p in self._pins:
            if p.revision is None:
                out.add((p.folder, None))
            elif SHA1_RE.fullmatch(p.revision):
                out.add((p.folder, p.revision))
            else:
                with contextlib.suppress(OSError, ValueError):
                    ref = cache_root / p.folder / "refs" / p.revision
                    if ref.resolve().is_relative_to(cache_root.resolve()):
                        commit = ref.read_text().strip()
                        if SHA1_RE.fullmatch(commit):
                            out.add((p.folder, commit))
        return frozenset(out)

    def _save(self) -> None:
        _atomic_write(self.path, json.dumps([p.to_json() for p in self.all()]).encode())


# -- last uses -----------------------------------------------------------------------


class LastUse:
    """When each blob was last used, kept in memory and written now and then."""

    def __init__(self, state: StateDir, clock: Callable[[], float] = time.time) -> None:
        self.path = state.root / "last_used.json"
        self.clock = clock
        self._when: dict[str, float] = {}
        self._dirty = False
        self._saved_at = 0.0

    def load(self) -> None:
        with contextlib.suppress(OSError, ValueError, TypeError):
            raw = json.loads(self.path.read_text())
            self._when = {k: float(v) for k, v in raw.items() if is_blob_id(k)}

    def touch(self, blob_ids: Iterable[str]) -> None:
        now = self.clock()
        used = list(blob_ids)
        if not used:
            return
        for blob_id in used:
            self._when[blob_id] = now
        self._dirty = True
        if now - self._saved_at >= SAVE_EVERY:
            self.save()

    def get(self, blob_id: str) -> float | None:
        return self._when.get(blob_id)

    def forget(self, blob_id: str) -> None:
        if self._when.pop(blob_id, None) is not None:
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            _atomic_write(self.path, json.dumps(self._when).encode())
        except LocalError as exc:
            log.warning("cannot record when blobs were used: %s", exc.one_line())
            return
        self._dirty = False
        self._saved_at = self.clock()


# -- the cache on disk ---------------------------------------------------------------


@dataclass
class _Found:
    inodes: dict[tuple[int, int], int] = field(default_factory=dict)  # (dev, ino) -> size
    folders: set[str] = field(default_factory=set)
    links: set[tuple[str, str]] = field(default_factory=set)
    mtime: float = 0.0


def cache_bytes(root: Path) -> int:
    """Bytes of the blobs in the HF cache; a blob hard-linked into several repos once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    with contextlib.suppress(OSError):
        for folder in os.scandir(root):
            if not repo_of_folder(folder.name):
                continue
            with contextlib.suppress(OSError):
                for e in os.scandir(os.path.join(folder.path, "blobs")):
                    if not is_blob_id(e.name):
                        continue
                    with contextlib.suppress(OSError):
                        st = e.stat()
                        if (st.st_dev, st.st_ino) not in seen:
                            seen.add((st.st_dev, st.st_ino))
                            total += st.st_size
    return total


def scan_cache(root: Path, last_use: Callable[[str], float | None]) -> list[CachedBlob]:
    """Every blob of the cache, with its repo folders, the snapshots linking it, and when
    it was last used (never recorded: when it entered the cache)."""
    found: dict[str, _Found] = {}
    try:
        folders = [e for e in os.scandir(root) if e.is_dir() and repo_of_folder(e.name)]
    except OSError:
        return []
    for folder in folders:
        with contextlib.suppress(OSError):
            for e in os.scandir(os.path.join(folder.path, "blobs")):
                if not is_blob_id(e.name):
                    continue
                with contextlib.suppress(OSError):
                    st = e.stat()
                    f = found.setdefault(e.name, _Found())
                    f.inodes[(st.st_dev, st.st_ino)] = st.st_size
                    f.folders.add(folder.name)
                    f.mtime = max(f.mtime, st.st_mtime)
        snapshots = os.path.join(folder.path, "snapshots")
        with contextlib.suppress(OSError):
            for commit in os.listdir(snapshots):
                for dirpath, _dirs, files in os.walk(os.path.join(snapshots, commit)):
                    for name in files:
                        with contextlib.suppress(OSError):
                            target = os.path.basename(os.readlink(os.path.join(dirpath, name)))
                            if target in found:
                                found[target].links.add((folder.name, commit))
    return [
        CachedBlob(
            blob_id=blob_id,
            size=sum(f.inodes.values()),
            last_used=last_use(blob_id) or f.mtime,
            folders=frozenset(f.folders),
            links=frozenset(f.links),
        )
        for blob_id, f in found.items()
    ]


def remove_blob(root: Path, blob: CachedBlob) -> None:
    """The blob out of every repo folder: its snapshot links first (so no link ever
    dangles), then the blob, then snapshots left empty and the refs naming them."""
    for folder in blob.folders:
        repo = root / folder
        emptied: list[str] = []
        for _folder, commit in (link for link in blob.links if link[0] == folder):
            snap = repo / "snapshots" / commit
            for dirpath, _dirs, files in os.walk(snap, topdown=False):
                for name in files:
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        if os.path.basename(os.readlink(path)) == blob.blob_id:
                            os.unlink(path)
                if dirpath != str(snap):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)  # only if empty
            with contextlib.suppress(OSError):
                os.rmdir(snap)
                emptied.append(commit)
        with contextlib.suppress(FileNotFoundError):
            (repo / "blobs" / blob.blob_id).unlink()
        if emptied:
            _drop_refs(repo / "refs", set(emptied))
        _drop_repo_if_empty(repo)


def _drop_refs(refs: Path, commits: set[str]) -> None:
    for dirpath, _dirs, files in os.walk(refs, topdown=False):
        for name in files:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if Path(path).read_text().strip() in commits:
                    os.unlink(path)
        if dirpath != str(refs):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _drop_repo_if_empty(repo: Path) -> None:
    """A repo folder with no blob and no snapshot left goes (huggingface_hub reports a
    folder without snapshots/ as corrupted); unfinished partials keep it."""
    for sub in ("blobs", "snapshots", ".hfswarm/partial"):
        with contextlib.suppress(OSError):
            if any(os.scandir(repo / sub)):
                return
    for sub in ("blobs", "snapshots", ".hfswarm/partial", ".hfswarm", "refs"):
        with contextlib.suppress(OSError):
            if sub == "refs":
                for dirpath, _dirs, _files in os.walk(repo / "refs", topdown=False):
                    os.rmdir(dirpath)
            else:
                os.rmdir(repo / sub)
    with contextlib.suppress(OSError):
        os.rmdir(repo)


# -- the quota -----------------------------------------------------------------------


class QuotaHold:
    """One running download's claim on the cache (see `CacheQuota.job`)."""

    def __init__(self, quota: CacheQuota) -> None:
        self.quota = quota
        self.blobs: dict[str, int] = {}  # blob id -> size: in use, maybe still to fetch

    async def admit(self, snapshot: Snapshot) -> None:
        what = f"{snapshot.repo_id}@{snapshot.revision}"
        await self.quota.admit(self, {f.blob_id: f.size for f in snapshot.files}, what)


class CacheQuota:
    def __init__(
        self,
        cache_root: Path,
        limit: int,
        seeds: SeedIndex,
        pins: Pins,
        last_use: LastUse,
        busy: Callable[[], Iterable[str]],
        uploaded: Callable[[], Awaitable[dict[str, int]]] | None = None,
    ) -> None:
        self.cache_root = cache_root
        self.limit = limit
        self.seeds = seeds
        self.pins = pins
        self.last_use = last_use
        self.busy = busy  # blobs being fetched or streamed right now
        self.uploaded = uploaded  # bytes each seeded blob sent through the swarm
        self._sent: dict[str, int] = {}
        self._holds: set[QuotaHold] = set()
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def job(self) -> AsyncIterator[QuotaHold]:
        hold = QuotaHold(self)
        self._holds.add(hold)
        try:
            yield hold
        finally:
            self._holds.discard(hold)
            self.last_use.touch(hold.blobs)
            if self.limit > 0 and hold.blobs:
                try:
                    await self.enforce()
                except (LocalError, OSError) as exc:
                    log.warning("cannot bring the cache under its quota: %s", exc)

    def _in_use(self) -> frozenset[str]:
        ids = set(self.busy())
        for hold in self._holds:
            ids.update(hold.blobs)
        return frozenset(ids)

    async def _scan(self) -> list[CachedBlob]:
        if self.uploaded is not None:  # a blob peers took since the last look was used
            sent = await self.uploaded()
            self.last_use.touch(b for b, n in sent.items() if n != self._sent.get(b, 0))
            self._sent = sent
        return await asyncio.to_thread(scan_cache, self.cache_root, self.last_use.get)

    def _incoming(self, held: set[str]) -> int:
        """Bytes running jobs still have to bring in (blobs not in the cache yet)."""
        todo: dict[str, int] = {}
        for hold in self._holds:
            todo.update((b, s) for b, s in hold.blobs.items() if b not in held)
        return sum(todo.values())

    async def admit(self, hold: QuotaHold, blobs: dict[str, int], what: str) -> None:
        self.last_use.touch(blobs)
        if self.limit <= 0:
            hold.blobs.update(blobs)
            return
        async with self._lock:
            cached = await self._scan()
            held = {b.blob_id for b in cached}
            new = {b: s for b, s in blobs.items() if b not in held and b not in hold.blobs}
            need = sum(new.values())
            if need == 0:  # all here already: nothing to make room for, nothing to refuse
                hold.blobs.update(blobs)
                return
            plan = plan_eviction(
                cached,
                quota=self.limit,
                pins=self.pins.resolved(self.cache_root),
                in_use=self._in_use() | frozenset(blobs),
                incoming=self._incoming(held) + need,
            )
            if not plan.fits:
                raise QuotaExceeded(
                    f"{what} needs {human_bytes(need)} more in the cache, which holds "
                    f"{human_bytes(plan.used)} of its {human_bytes(self.limit)} quota "
                    f"(running downloads still bring {human_bytes(self._incoming(held))}), "
                    "and what could be evicted would not make room: the rest is pinned "
                    "or in use",
                    hint="raise --cache-max-size, unpin repos (`hfswarm pins` lists them), "
                    "or download fewer files (--include)",
                )
            await self._evict(plan.evict)
            hold.blobs.update(blobs)

    async def enforce(self) -> int:
        """Evict until the cache is within its quota, as far as pins and use allow.
        Returns the bytes freed."""
        if self.limit <= 0:
            return 0
        async with self._lock:
            cached = await self._scan()
            plan = plan_eviction(
                cached,
                quota=self.limit,
                pins=self.pins.resolved(self.cache_root),
                in_use=self._in_use(),
                incoming=self._incoming({b.blob_id for b in cached}),
                best_effort=True,
            )
            await self._evict(plan.evict)
            if not plan.fits:
                log.warning(
                    "the cache holds %s, over its %s quota: the rest is pinned or in use",
                    human_bytes(plan.after),
                    human_bytes(self.limit),
                )
            return plan.used - plan.after

    async def _evict(self, blobs: Iterable[CachedBlob]) -> None:
        for blob in blobs:
            log.info(
                "quota: evicting %s (%s, %s)",
                blob.blob_id[:12],
                human_bytes(blob.size),
                ", ".join(sorted(blob.folders)),
            )
            await self.seeds.forget(blob.blob_id)
            await asyncio.to_thread(remove_blob, self.cache_root, blob)
            self.last_use.forget(blob.blob_id)
        self.last_use.save()

    async def usage(self) -> dict[str, int]:
        # Only the blobs' sizes: /v1/status is polled every second (the status page),
        # so no walk of the snapshots here.
        used = await asyncio.to_thread(cache_bytes, self.cache_root)
        return {"cache_bytes": used, "cache_max_size": self.limit}

    async def run(self, every: float = 60.0) -> None:
        """Now and then: keep within the quota, write the last uses."""
        while True:
            try:
                await self.enforce()
            except (LocalError, OSError) as exc:
                log.warning("cannot bring the cache under its quota: %s", exc)
            self.last_use.save()
            await asyncio.sleep(every)
