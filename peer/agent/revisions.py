"""What the agent knows of repo revisions, and how it resolves one: the mirror first,
its peers' revision manifests when the mirror cannot answer, peers alone for ``local/*``.

    mirror answers (any status but a failure)   -> the mirror's answer, always; a 401,
                                                   403 or 404 is final
    mirror unreachable, or answering 5xx        -> the newest manifest this agent or a
                                                   live peer holds for that revision
    local/NAME                                  -> never the mirror: the newest manifest
                                                   of this agent and its live peers

Manifests are kept in a `RevisionBook` and in the state dir (``revisions/``), so they
survive a restart and can be served to peers (``POST /v1/revisions``). What is kept and
shared: ``local/*`` publishes, revisions of PUBLIC repos this agent downloaded from the
mirror (the mirror said neither private nor gated), and manifests accepted from peers
(which share only those two kinds). Private and gated repos are never recorded, and a
repo the mirror later calls private or gated is forgotten: nothing about them reaches a
peer, and the agent cannot serve them from peers' knowledge when the mirror is down
(no mirror to check the client's access -> fail closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from peer import wire
from peer.agent.state import StateDir
from peer.config import HubSettings
from peer.discovery.peer_table import PeerTable
from peer.errors import (
    HfswarmError,
    MirrorDown,
    MirrorUnreachable,
    NetworkError,
    RepoNotFound,
    RevisionNotFound,
    UserError,
)
from peer.hub.metadata import FileSelection, Snapshot, check_repo_args, resolve_snapshot
from peer.hub.metadata import select_files as select
from peer.manifests.revisions import (
    BadRevisionManifest,
    RevisionBook,
    accept_revision_manifest,
    is_local_repo,
    manifest_of_snapshot,
    snapshot_of,
)
from peer.manifests.signing import Signatures
from peer.verification.hashing import SHA1_RE

log = logging.getLogger(__name__)


def mirror_is_down(exc: BaseException) -> bool:
    """A failure that lets peers' manifests stand in: no answer, or a 5xx. A refusal
    (401/403/404, gated, not found) or any other answer is the mirror's final word."""
    return isinstance(exc, (MirrorUnreachable, MirrorDown))


def _key(m: wire.RevisionManifest) -> str:
    raw = f"{m.repo_type}\0{m.repo_id}\0{m.revision}\0{m.commit}".encode()
    return hashlib.sha256(raw).hexdigest()


class Revisions:
    def __init__(
        self,
        state: StateDir,
        peers: PeerTable,
        agent_id: str,
        *,
        clock: Callable[[], float] = time.time,
        signatures: Signatures | None = None,
    ) -> None:
        self.state = state
        # Signs what this agent makes; checks peers' (cluster: every manifest; open:
        # local/* ones, each name pinned to its first key).
        self.signatures = signatures
        self.peers = peers
        self.agent_id = agent_id
        self.clock = clock
        self.book = RevisionBook()
        self._tasks: set[asyncio.Task[None]] = set()
        # (type, repo id, revision, commit) being listed: a client asks for many files
        # of one revision at once, and each answer names the same commit.
        self._recording: set[tuple[str, str, str, str]] = set()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _verify(self, m: wire.RevisionManifest) -> None:
        if self.signatures is not None:
            self.signatures.check_revision(m, self.clock())

    # -- the book and the state dir ----------------------------------------------------

    def load(self) -> int:
        """Read the manifests kept in the state dir (each checked again)."""
        now = self.now_ms()
        for key, data in self.state.revision_records():
            try:
                m = wire.decode_as(data, wire.RevisionManifest)
                if self.signatures is not None and m.made_by == self.agent_id and not m.signature:
                    # Ours, kept before manifests were signed: signed now, not lost.
                    m = self.signatures.sign_revision(m)
                    self.state.save_revision(key, wire.encode(m))
                accept_revision_manifest(
                    m,
                    repo_type=m.repo_type,
                    repo_id=m.repo_id,
                    revision=m.revision,
                    now_ms=now,
                    verify_signature=self._verify,
                )
            except (wire.WireError, BadRevisionManifest) as exc:
                log.warning("stored revision manifest %s unusable (%s); dropped", key[:12], exc)
                self.state.drop_revision(key)
                continue
            self.book.add(m)
        return len(self.book)

    def record(self, m: wire.RevisionManifest) -> None:
        if self.signatures is not None and m.made_by == self.agent_id and not m.signature:
            # Ours (a publish, a mirror's revision): signed, and a local/* name must be
            # ours to publish (pinned to our key, or to nobody's yet).
            m = self.signatures.sign_revision(m)
            try:
                self.signatures.check_own_revision(m)
            except BadRevisionManifest as exc:
                raise UserError(
                    exc.message,
                    hint="publish under another local/ name: this one belongs to another agent",
                ) from None
        kept, dropped = self.book.add(m)
        if kept:
            self.state.save_revision(_key(m), wire.encode(m))
        for old in dropped:
            self.state.drop_revision(_key(old))

    def forget(self, repo_type: str, repo_id: str) -> None:
        for m in self.book.forget(repo_type, repo_id):
            self.state.drop_revision(_key(m))

    def shared(self, request: wire.RevisionRequest) -> wire.RevisionManifest | None:
        """The peer API's answer: only shareable manifests are ever in the book."""
        return self.book.best(request.repo_type, request.repo_id, request.revision)

    # -- lookups -----------------------------------------------------------------------

    async def find(
        self, repo_type: str, repo_id: str, revision: str
    ) -> wire.RevisionManifest | None:
        """The newest manifest for a revision that this agent or a live peer holds. A
        commit id is answered from the book when it can be (a commit never changes);
        a name (``main``) always asks the peers too, since it may have moved."""
        if SHA1_RE.fullmatch(revision):
            own = self.book.best(repo_type, repo_id, revision)
            if own is not None:
                return own
        try:
            request = wire.RevisionRequest(repo_type=repo_type, repo_id=repo_id, revision=revision)
            wire.encode(request)
        except ValueError:  # not a name the wire carries (a long or odd revision)
            return self.book.best(repo_type, repo_id, revision)
        now = self.now_ms()
        for peer, m in await self.peers.revisions(request):
            try:
                accept_revision_manifest(
                    m,
                    repo_type=repo_type,
                    repo_id=repo_id,
                    revision=revision,
                    now_ms=now,
                    verify_signature=self._verify,
                )
            except BadRevisionManifest as exc:
                log.warning("peer %s: %s", peer.api_url, exc.one_line())
                continue
            self.record(m)
        return self.book.best(repo_type, repo_id, revision)

    async def resolve(
        self,
        hub: HubSettings,
        repo_type: str,
        repo_id: str,
        revision: str,
        selection: FileSelection | None = None,
    ) -> tuple[Snapshot, wire.RevisionManifest | None]:
        """The snapshot to download, and the manifest to record once it is downloaded
        (None: nothing new to record, or not shareable)."""
        check_repo_args(repo_type, repo_id)
        selection = selection or FileSelection()
        if is_local_repo(repo_id):
            m = await self.find(repo_type, repo_id, revision)
            if m is None:
                raise self._unknown(repo_type, repo_id, revision)
            return snapshot_of(m, revision, selection), None
        try:
            full = await resolve_snapshot(hub, repo_type, repo_id, revision)
        except NetworkError as exc:
            if not mirror_is_down(exc):
                raise
            m = await self.find(repo_type, repo_id, revision)
            if m is None:
                raise type(exc)(
                    f"{exc.message}; no peer knows {repo_id}@{revision} either", hint=exc.hint
                ) from exc
            log.warning(
                "mirror down (%s): %s@%s resolved by peers to %s",
                exc.one_line(),
                repo_id,
                revision,
                m.commit,
            )
            return snapshot_of(m, revision, selection), None
        if full.private or full.gated:
            self.forget(repo_type, repo_id)
        chosen = select(full.files, selection, repo=repo_id, revision=revision)
        manifest = manifest_of_snapshot(full, made_by=self.agent_id, now_ms=self.now_ms())
        return replace(full, files=chosen), manifest

    def _unknown(self, repo_type: str, repo_id: str, revision: str) -> HfswarmError:
        hint = (
            "publish it with `hfswarm publish PATH --repo "
            f"{repo_id}` on some agent, and check that this agent reaches that one "
            "(`hfswarm status` lists its peers)"
        )
        if revision == "main":
            return RepoNotFound(f"no agent on the LAN knows {repo_type} {repo_id}", hint=hint)
        return RevisionNotFound(f"no agent on the LAN knows {repo_id}@{revision}", hint=hint)

    # -- HF_ENDPOINT mode: revisions clients resolved through the mirror ----------------

    def mirror_said(
        self,
        hub: HubSettings,
        repo_type: str,
        repo_id: str,
        revision: str,
        commit: str,
        *,
        private: bool,
        gated: bool,
    ) -> None:
        """A client resolved `revision` to `commit` through the mirror (HF_ENDPOINT
        mode). A private or gated repo is forgotten at once; a public revision not yet
        known is listed in the background, anonymously (what any client may read), and
        recorded so that peers can use it while the mirror is down."""
        if is_local_repo(repo_id):
            return
        if private or gated:
            self.forget(repo_type, repo_id)
            return
        key = (repo_type, repo_id, revision, commit)
        if key in self._recording or self.book.has(*key):
            return
        task = asyncio.get_running_loop().create_task(
            self._record_from_mirror(replace(hub, token=None), repo_type, repo_id, revision)
        )
        self._recording.add(key)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._recording.discard(key))

    async def _record_from_mirror(
        self, hub: HubSettings, repo_type: str, repo_id: str, revision: str
    ) -> None:
        try:
            full = await resolve_snapshot(hub, repo_type, repo_id, revision, attempts=1)
        except HfswarmError as exc:
            log.info("not recording %s@%s: %s", repo_id, revision, exc.one_line())
            return
        if full.private or full.gated:
            self.forget(repo_type, repo_id)
            return
        m = manifest_of_snapshot(full, made_by=self.agent_id, now_ms=self.now_ms())
        if m is not None:
            self.record(m)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
