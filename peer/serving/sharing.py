"""What this agent may offer to other hosts: the sharing policy (pure, no I/O).

Every blob the agent holds has a provenance: the repos it holds it for, each with what
the mirror said of that repo (or how the blob came to be here). Open mode shares a blob
with the LAN only if at least one of those repos makes its bytes public anyway (cluster
mode with ``share = "cluster"`` shares private and gated ones too, with members only:
`Provenance.shared_in`, `Access.mirror_only_in`):

    public    the mirror said: neither private nor gated (to an anonymous check, or in
              the answer to an authorised one)                              -> shared
    local     published on the LAN by this machine's agent (`hfswarm publish`) -> shared
    peers     taken from LAN peers that offered it openly (a LAN-only name,
              or a public repo while the mirror was down)                      -> shared
    private   the mirror said private                                      -> kept here
    gated     the mirror said gated                                        -> kept here

A blob with no provenance (found in the cache, its repo not yet confirmed public) is
not shared: fail closed. "Shared" means everywhere: `/v1/have`, `/v1/blobs`, the
swarm, tracker announces. Kept blobs still serve this machine's own callers, but only
for a request the mirror has just allowed for the same repo with the caller's own token
(`may_serve`).

The newest word on a repo replaces the older one, so a repo the mirror later calls
private or gated stops sharing its blobs (unless another public repo holds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Visibility(StrEnum):
    PUBLIC = "public"
    LOCAL = "local"
    PEERS = "peers"
    PRIVATE = "private"
    GATED = "gated"

    @property
    def shared(self) -> bool:
        return self in (Visibility.PUBLIC, Visibility.LOCAL, Visibility.PEERS)

    @classmethod
    def of_mirror_answer(cls, *, private: bool, gated: bool) -> Visibility:
        return cls.PRIVATE if private else cls.GATED if gated else cls.PUBLIC


# "model/org/name": the repo type and id, as one key
RepoKey = str
MAX_REPOS = 64  # per blob; the oldest word is dropped past it (a blob in 64+ repos is rare)


def repo_key(repo_type: str, repo_id: str) -> RepoKey:
    return f"{repo_type}/{repo_id}"


@dataclass(frozen=True)
class Provenance:
    """Which repos a blob is held for, and what is known of each (newest last)."""

    repos: tuple[tuple[RepoKey, Visibility], ...] = ()

    @property
    def shared(self) -> bool:
        return any(v.shared for _, v in self.repos)

    def shared_in(self, cluster_share: bool) -> bool:
        """Shared with this agent's peers. ``cluster_share`` (cluster mode with
        ``share = "cluster"``, never open mode: peers are then authenticated members):
        private and gated blobs too."""
        return self.shared or (cluster_share and bool(self.repos))

    def visibility(self, key: RepoKey) -> Visibility | None:
        return next((v for k, v in self.repos if k == key), None)

    def with_repo(self, key: RepoKey, visibility: Visibility) -> Provenance:
        """The newest word on `key` replaces the older one."""
        rest = tuple((k, v) for k, v in self.repos if k != key)
        return Provenance((*rest, (key, visibility))[-MAX_REPOS:])


@dataclass(frozen=True)
class Access:
    """On whose word a request for a blob stands.

    ``mirror_allowed``: the mirror has just answered this very repo for this caller with
    the caller's own token (a tree listing, or a resolve HEAD): the caller may read
    every file it lists, whoever else the agent holds the blob for. Otherwise (a
    ``local/*`` name, or a revision peers told of while the mirror is down) the request
    stands on the LAN's word only, and may be served only blobs that are shared anyway.
    """

    repo: RepoKey
    visibility: Visibility | None  # what the mirror said of the repo; None: not asked
    mirror_allowed: bool

    @property
    def mirror_only(self) -> bool:
        """Private or gated: never asked of peers, never claimed in a herd, never seeded."""
        return self.visibility in (Visibility.PRIVATE, Visibility.GATED)

    def mirror_only_in(self, cluster_share: bool) -> bool:
        """`mirror_only`, unless members share private and gated blobs (the mirror has
        still allowed this caller this repo before any member is asked)."""
        return self.mirror_only and not cluster_share


def may_serve(provenance: Provenance, access: Access) -> bool:
    """Whether a blob this agent holds may answer `access`'s request: it is shared on the
    LAN anyway, or the mirror just allowed this caller this repo."""
    return provenance.shared or access.mirror_allowed
