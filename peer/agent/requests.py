"""What a job of the agent is asked for, and what it tells while it runs.

Requests: `DownloadRequest` (`hfswarm download`, the local API's ``POST /v1/downloads``,
the mirror-only path of `peer.download`) and `PublishRequest` (``POST /v1/publish``).
Events of a download, in order: `Started`, any number of `Progress`, then `Done` or
`Error`. Each is frozen and has its JSON form here; the local API streams that form as
NDJSON, one event a line (older CLIs read it: the fields do not change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer.errors import ConfigError
from peer.hub.metadata import FileSelection


@dataclass(frozen=True)
class DownloadRequest:
    """One download; the token is the user's, used for this download only.

    `agent_token` never comes from JSON: the local API sets it when the caller is the
    agent's own user (or root), who may have the agent use its own token. `local_dir`
    never goes to the agent either: it does not write a caller's folder, the CLI copies
    the snapshot there itself (the mirror-only path writes it directly)."""

    repo_id: str
    repo_type: str = "model"
    revision: str = "main"
    selection: FileSelection = field(default_factory=FileSelection)
    token: str | None = None
    agent_token: bool = False
    local_dir: Path | None = None

    @classmethod
    def from_json(cls, d: Any) -> DownloadRequest:
        """A request from the local API's body: hostile input, `agent_token` left False."""
        if not isinstance(d, dict) or not isinstance(d.get("repo_id"), str):
            raise ConfigError("download request needs a repo_id")

        def strs(key: str) -> tuple[str, ...]:
            value = d.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"download request: {key} must be a list of strings")
            return tuple(value)

        if d.get("local_dir"):
            raise ConfigError(
                "the agent does not write into a local dir: it downloads into its cache",
                hint="update hfswarm: `hfswarm download --local-dir` copies the files itself",
            )
        return cls(
            repo_id=d["repo_id"],
            repo_type=str(d.get("repo_type") or "model"),
            revision=str(d.get("revision") or "main"),
            selection=FileSelection(strs("files"), strs("include"), strs("exclude")),
            token=d.get("token") if isinstance(d.get("token"), str) and d["token"] else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The body for the agent: neither `agent_token` nor `local_dir` (see above)."""
        return {
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "files": list(self.selection.files),
            "include": list(self.selection.include),
            "exclude": list(self.selection.exclude),
            "token": self.token,
        }


@dataclass(frozen=True)
class PublishRequest:
    """What `hfswarm publish` asks for: a folder (absolute: the agent reads it) to share
    as ``local/NAME``."""

    path: Path
    repo_id: str
    repo_type: str = "model"

    @classmethod
    def from_json(cls, d: Any) -> PublishRequest:
        if not isinstance(d, dict) or not all(
            isinstance(d.get(k), str) for k in ("path", "repo_id")
        ):
            raise ConfigError("publish request needs a path and a repo_id")
        path = Path(d["path"])
        if not path.is_absolute():
            raise ConfigError(f"publish: {path} is not an absolute path")
        return cls(path=path, repo_id=d["repo_id"], repo_type=str(d.get("repo_type") or "model"))

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "repo_id": self.repo_id, "repo_type": self.repo_type}
