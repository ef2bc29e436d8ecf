"""Configuration, read once from the environment into frozen objects and passed in.

Nothing in the package reads ``os.environ`` at import time; `HubSettings.from_env` is the
single place that applies the Hugging Face conventions (HF_ENDPOINT, HF_TOKEN and the
token file, HF_HOME / HF_HUB_CACHE / XDG_CACHE_HOME), mirroring huggingface_hub's rules.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer.errors import ConfigError

DEFAULT_ENDPOINT = "https://huggingface.co"


def _hf_home(env: Mapping[str, str]) -> Path:
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface"


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """HF_HUB_CACHE, then the legacy HUGGINGFACE_HUB_CACHE, then HF_HOME/hub."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    return _hf_home(env) / "hub"


def read_token(env: Mapping[str, str]) -> str | None:
    """HF_TOKEN (or the legacy name), else the token file huggingface_hub writes on login."""
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = env.get(key, "").strip()
        if value:
            return value
    path = Path(env["HF_TOKEN_PATH"]).expanduser() if env.get("HF_TOKEN_PATH") else None
    path = path or _hf_home(env) / "token"
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return value or None


def normalize_endpoint(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"mirror URL {url!r} is not an http(s) URL",
            hint="pass something like --mirror http://10.0.0.5:8080",
        )
    return url


@dataclass(frozen=True)
class HubSettings:
    """Where metadata and file bodies come from, and with which credentials."""

    mirrors: tuple[str, ...]
    token: str | None
    cache_dir: Path
    user_agent: str = "hfswarm/0.1"

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        mirrors: Sequence[str] = (),
        token: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> HubSettings:
        """Explicit arguments win over the environment, as with the `hf` CLI."""
        env = os.environ if env is None else env
        chosen = [normalize_endpoint(m) for m in mirrors] or [
            normalize_endpoint(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
        ]
        return cls(
            mirrors=tuple(dict.fromkeys(chosen)),
            token=token or read_token(env),
            cache_dir=Path(cache_dir).expanduser() if cache_dir else default_cache_dir(env),
        )


@dataclass(frozen=True)
class DownloadOptions:
    """How the mirror downloader behaves; defaults suit a WAN mirror."""

    connections: int = 16
    max_files: int = 4
    chunk_size: int = 16 * 1024 * 1024
    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    # A mirror that was sending a file and stops answering is retried this long after
    # its last byte (a restart, a blip) before the download gives up.
    outage_grace: float = 60.0
    quiet: bool = False
    extra_headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> DownloadOptions:
        """HF_HUB_DOWNLOAD_TIMEOUT (seconds without a byte before a connection counts as
        stalled) as in huggingface_hub; explicit overrides win."""
        env = os.environ if env is None else env
        raw = env.get("HF_HUB_DOWNLOAD_TIMEOUT")
        if raw and "read_timeout" not in overrides:
            try:
                overrides["read_timeout"] = float(raw)
            except ValueError:
                raise ConfigError(f"HF_HUB_DOWNLOAD_TIMEOUT={raw!r} is not a number") from None
        return cls(**overrides)

    def __post_init__(self) -> None:
        if not 1 <= self.connections <= 64:
            raise ConfigError("--connections must be between 1 and 64")
        if self.max_files < 1:
            raise ConfigError("--max-workers must be at least 1")


def parse_hostport(
    text: str, *, default_host: str = "0.0.0.0", what: str = "address"
) -> tuple[str, int]:
    """HOST:PORT, [v6]:PORT, or :PORT (the default host)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT", hint="e.g. 0.0.0.0:7851")
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{what} {text!r} has no port number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{what} {text!r}: port out of range")
    return host, number


def listen_host_for_others(listen_host: str) -> str:
    """The host the BitTorrent port and the member stream bind by default: the peer
    API's, when it names one address (libtorrent takes a name for a network device, so
    a host name leaves them on every interface)."""
    try:
        ipaddress.ip_address(listen_host)
    except ValueError:
        return "0.0.0.0"
    return listen_host


def format_hostport(where: tuple[str, int]) -> str:
    """The HOST:PORT text `parse_hostport` reads back ([v6]:PORT for IPv6)."""
    host, port = where
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# What an agent seeds: every shared blob, only those of pinned repos, or nothing (it
# still serves its own machine's clients).
SEEDING_POLICIES = ("always", "pinned", "none")


# The agent's defaults, in one place: `AgentConfig` takes its field defaults from here, the
# CLI (`peer.cli.main`) takes its flag defaults from `AgentConfig`, and the pure cores'
# own configs (`PolicyConfig`, `HerdConfig`) start from the same values.
DEFAULT_LOCAL_LISTEN = ("127.0.0.1", 7850)
DEFAULT_PEER_LISTEN = ("0.0.0.0", 7851)
# The BitTorrent port's and the member stream's default hosts are empty: `AgentConfig`
# makes them `listen`'s host.
BT_PORT = 7852
DEFAULT_BT_LISTEN = ("", BT_PORT)
MEMBER_PORT = 7853
DEFAULT_MEMBER_LISTEN = ("", MEMBER_PORT)
DEFAULT_AGENT_URL = f"http://{format_hostport(DEFAULT_LOCAL_LISTEN)}"
STALL_TIMEOUT = 5.0
# A piece's floor rate from peers (bytes/s), counted from its first block after
# STALL_TIMEOUT of credit (`PolicyConfig.min_piece_rate`): a holder that trickles blocks
# of a piece (a host capped at a few KiB/s, or a liar) kept it from the mirror for as
# long as the trickle lasted (1 MiB at 8 KiB/s: 128 s). A LAN peer sends a piece 4-200x
# faster; one at 2 MB/s split over 4 pieces at once still keeps them.
MIN_PIECE_RATE = float(512 << 10)
PEER_GRACE = 2.0
# Downloaders of a blob that take it from its complete holders (`peer.scheduling.feeders`):
# with one seeder and 8 hosts, 2 made bare libtorrent 1.25x the 1 -> 1 time against 1.60x
# with every host a feeder (docs/benchmarks.md 8.22).
FEEDERS = 2
HERD_SETTLE = 1.0
HERD_LEADER_TIMEOUT = 15.0


def default_state_dir(cache_dir: Path) -> Path:
    """Beside the hub cache: ~/.cache/huggingface/hub -> ~/.cache/huggingface/hfswarm."""
    return cache_dir.parent / "hfswarm"


@dataclass(frozen=True)
class AgentConfig:
    """Everything an `Agent` is told; its field defaults are the CLI's flag defaults."""

    hub: HubSettings
    state_dir: Path
    listen: tuple[str, int] = DEFAULT_PEER_LISTEN
    local_listen: tuple[str, int] = DEFAULT_LOCAL_LISTEN
    bt_listen: tuple[str, int] = DEFAULT_BT_LISTEN
    peers: tuple[tuple[str, int], ...] = ()
    mdns: bool = True
    # mDNS only on these interfaces (IPv4 addresses or names); empty: all of them.
    mdns_interfaces: tuple[str, ...] = ()
    # LAN trackers (their base URLs), for peers mDNS cannot reach.
    trackers: tuple[str, ...] = ()
    download: DownloadOptions = field(default_factory=DownloadOptions)
    # Seconds a piece may make no progress from peers before the mirror is asked for it.
    stall_timeout: float = STALL_TIMEOUT
    # Seconds given to peers to connect and announce their pieces before the mirror is used.
    peer_grace: float = PEER_GRACE
    # Downloaders of a blob that take it from its complete holders while several agents
    # download it; the others take it from them (0: every downloader does).
    feeders: int = FEEDERS
    # Caps in bytes/s (0: none), changed live with `hfswarm limits`: what LAN peers
    # get from us (BitTorrent and HTTP) and take from us, and what the mirror sends us.
    max_upload_rate: int = 0
    max_download_rate: int = 0
    mirror_max_rate: int = 0
    # Bytes of blobs the cache may hold (0: no limit); past it the least recently used
    # blobs no pin, download or stream needs are removed (`peer.agent.quota`).
    cache_max_size: int = 0
    # always | pinned | none (SEEDING_POLICIES)
    seeding: str = "always"
    # Herd: seconds for the claims of agents wanting the same new blob to meet before
    # one is elected to fetch it from the mirror, and how long a leader may make no
    # progress (or stay unseen) before another agent replaces it.
    herd_settle: float = HERD_SETTLE
    herd_leader_timeout: float = HERD_LEADER_TIMEOUT
    # The audit log (one JSON line per event an operator may have to account for:
    # `peer.agent.audit`); None: <state_dir>/audit.log. `audit` False: none at all.
    audit_log: Path | None = None
    audit: bool = True
    # Cluster mode: this member's credentials file (`hfswarm cluster enroll`); None: open.
    cluster: Path | None = None
    # Cluster mode: where the member blob stream listens (`peer.serving.member_stream`).
    # An empty host is `listen`'s: an agent bound to one interface streams only there too.
    member_listen: tuple[str, int] = DEFAULT_MEMBER_LISTEN
    # ... and how many blobs it sends at once (0: none; members swarm them).
    member_streams: int = 2

    @property
    def audit_path(self) -> Path | None:
        """Where the audit log goes, or None when it is off."""
        if not self.audit:
            return None
        return self.audit_log if self.audit_log is not None else Path(self.state_dir) / "audit.log"

    def __post_init__(self) -> None:
        for key in ("bt_listen", "member_listen"):
            host, port = getattr(self, key)
            if not host:
                object.__setattr__(self, key, (listen_host_for_others(self.listen[0]), port))
        if self.seeding not in SEEDING_POLICIES:
            raise ConfigError(
                f"seeding policy {self.seeding!r} is not one of {', '.join(SEEDING_POLICIES)}"
            )
        for name in ("max_upload_rate", "max_download_rate", "mirror_max_rate", "cache_max_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (none) or more")
