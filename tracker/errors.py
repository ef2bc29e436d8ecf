"""The one error root of the `tracker` package.

`tracker` has its own root instead of reusing `peer.errors.HfswarmError` because the
tracker is a separate service that must not import the agent package (a tracker host
runs no agent; `peer` imports `tracker.messages`/`tracker.client`, never the reverse).
`TrackerError` keeps HfswarmError's interface (``message``, ``hint``, ``one_line()``,
``exit_code``), so a CLI can print either the same way, and an agent translates it at
its edge (``raise NetworkError(...) from exc``).

Who is at fault decides the class, as in `peer.errors`:

- `TrackerWireError`    the other side sent a message that breaks the protocol
- `RegisterFirst`       the tracker does not know this agent (restart, expiry): register
                        again now, then announce again; not an error worth logging
- `AgentIdTaken`        the agent id is bound to another address until its record lapses
- `TrackerFull`         a configured bound was reached; retry later or raise the limit
- `TrackerUnavailable`  no answer (connection refused, timeout); retry later
- `TrackerRefused`      any other refusal, with the tracker's own message
- `TrackerConfigError`  bad arguments or a port that cannot be bound
"""

from __future__ import annotations


class TrackerError(Exception):
    """Root of every error the tracker package raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The single line shown to a user: what happened, then what to do."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


class TrackerWireError(TrackerError):
    """A message that breaks the protocol: dropped, never our bug."""

    exit_code = 3

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or "the message was dropped")


class UnsupportedVersion(TrackerWireError):
    """A message of a protocol version this side does not speak."""


class UnknownAgent(TrackerError):
    """Registry level: an announce from an agent that is not (or no longer) registered."""

    exit_code = 3


class RegisterFirst(UnknownAgent):
    """Client level: the tracker answered 409; register again, then announce again."""


class AgentIdTaken(TrackerError):
    """Another address registered this agent id and its record is live (403): the id is
    bound to that address until ``ttl`` passes without its heartbeat."""

    exit_code = 3


class TrackerFull(TrackerError):
    """A configured bound (agents, holdings, swarms) is reached."""

    exit_code = 3


class TrackerUnavailable(TrackerError):
    exit_code = 3


class TrackerRefused(TrackerError):
    exit_code = 3


class TrackerConfigError(TrackerError):
    exit_code = 2
