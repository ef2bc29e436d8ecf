"""The one error root of the `peer` package.

Every error a user can see derives from `HfswarmError` and carries a message that says
what to do next. Third-party errors (aiohttp, huggingface_hub, OS) are translated at the
edge with ``raise ... from``. The classes split along who is at fault, because that
decides the exit code and whether a retry can help:

- `UserError`       the request cannot succeed as asked (repo not found, gated, bad path)
- `NetworkError`    the mirror or a peer could not be reached; retrying later may work
- `IntegrityError`  data did not match its content id, even after refetching
- `LocalError`      this machine refused (disk full, permissions)
- `PeerMisbehaved`  a remote party sent something invalid; never our bug, never fatal
                    on its own: the caller bans the peer and goes elsewhere
"""

from __future__ import annotations


class HfswarmError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The single line shown to a user: what happened, then what to do."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UserError(HfswarmError):
    exit_code = 2


class NetworkError(HfswarmError):
    exit_code = 3


class IntegrityError(HfswarmError):
    exit_code = 4


class LocalError(HfswarmError):
    exit_code = 5


class PeerMisbehaved(HfswarmError):
    """A peer or mirror sent data that breaks the protocol or fails verification."""

    exit_code = 3


# --- user errors ------------------------------------------------------------------


class RepoNotFound(UserError):
    pass


class GatedRepo(UserError):
    pass


class RevisionNotFound(UserError):
    pass


class EntryNotFound(UserError):
    pass


class NotShared(UserError):
    """A request that stands on the LAN's word (a ``local/*`` name, a revision told by
    peers) names a blob this agent holds only for a private or gated repo."""


class UnsafePath(PeerMisbehaved):
    """A file name from the mirror tries to escape the target folder."""

    exit_code = 2


class ConfigError(UserError):
    pass


# --- network errors ---------------------------------------------------------------


class MirrorUnreachable(NetworkError):
    pass


class MirrorFailed(NetworkError):
    """The mirror answered, but kept failing (5xx, 429, dropped connections) past retries."""


class MirrorDown(MirrorFailed):
    """The mirror answered 5xx past retries: it is failing, not refusing (agents may use
    what their peers know of the revision instead)."""


# --- local errors -----------------------------------------------------------------


class DiskFull(LocalError):
    pass


EXIT_CODES = {
    "ok": 0,
    "bug": 1,
    "user": UserError.exit_code,
    "network": NetworkError.exit_code,
    "integrity": IntegrityError.exit_code,
    "local": LocalError.exit_code,
}
