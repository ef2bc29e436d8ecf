"""The agent's settings, in one table.

Each `Setting` row is at once a key of the TOML config file, a flag of `hfswarm agent`
(generated from the row), an ``HFSWARM_*`` environment variable, a parser shared by the
three, and a default, which for a key naming an `AgentConfig` field is that field's own.
`resolve` layers them, per key: flags > environment > file > defaults, and remembers where
each value came from (`hfswarm config` prints it). The Hugging Face conventions stay
below all four: HF_ENDPOINT is the default of ``mirrors``, HF_HUB_CACHE / HF_HOME that of
``cache_dir``, and with no ``token_file`` the token is HF_TOKEN, else the file
`hf auth login` wrote. Adding a setting is one row here (and, for the agent to use it, the
`AgentConfig` field of the same name).

The file is flat (top-level keys only); paths in it are relative to its folder. Errors
name the file, the line and the key (tomllib gives no line for a key: `key_lines` finds
it by scanning the text), or the environment variable, or the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peer.config import (
    BT_PORT,
    DEFAULT_ENDPOINT,
    MEMBER_PORT,
    MIN_PIECE_RATE,
    SEEDING_POLICIES,
    AgentConfig,
    DownloadOptions,
    HubSettings,
    default_cache_dir,
    default_state_dir,
    format_hostport,
    listen_host_for_others,
    normalize_endpoint,
    parse_hostport,
)
from peer.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/hfswarm/agent.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")


class BadValue(ValueError):
    """A value a parser refuses: what is wrong, and an example of what fits."""

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


# --- parsers: raw text (flag, environment) or a TOML value in, typed value out ----------


def _text(raw: object, what: str) -> str:
    if isinstance(raw, str):
        return raw.strip()
    raise BadValue(f"expected {what} as a string, got {type(raw).__name__}")


def parse_hostport_value(default_host: str) -> Callable[[object], tuple[str, int]]:
    def parse(raw: object) -> tuple[str, int]:
        try:
            return parse_hostport(_text(raw, "HOST:PORT"), default_host=default_host)
        except ConfigError as exc:
            raise BadValue(exc.message, "e.g. 0.0.0.0:7851, [::]:7851 or :7851") from None

    return parse


def parse_url(raw: object) -> str:
    try:
        return normalize_endpoint(_text(raw, "a URL"))
    except ConfigError as exc:
        raise BadValue(exc.message, "e.g. http://10.0.0.5:8080") from None


def parse_path(raw: object) -> Path:
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    text = _text(raw, "a path")
    if not text:
        raise BadValue("empty path")
    return Path(text).expanduser()


def parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = _text(raw, "true or false").lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise BadValue(f"{text!r} is not true or false", "true/false, yes/no, on/off or 1/0")


def parse_int(low: int, high: int | None = None) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        if isinstance(raw, bool):
            raise BadValue("expected a whole number, got a boolean")
        if isinstance(raw, int):
            number = raw
        else:
            try:
                number = int(_text(raw, "a whole number"))
            except ValueError:
                raise BadValue(f"{raw!r} is not a whole number") from None
        if number < low or (high is not None and number > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise BadValue(f"{number} is out of range: it must be {bounds}")
        return number

    return parse


def parse_seconds(raw: object) -> float:
    if isinstance(raw, bool):
        raise BadValue("expected a number of seconds, got a boolean")
    if isinstance(raw, int | float):
        number = float(raw)
    else:
        text = _text(raw, "a number of seconds")
        try:
            number = float(text.removesuffix("s"))
        except ValueError:
            raise BadValue(f"{text!r} is not a number of seconds", "e.g. 5 or 2.5") from None
    if not 0 <= number < float("inf"):
        raise BadValue(f"{number} seconds: it must be 0 or more")
    return number


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(raw: object) -> int:
    """Bytes: an integer, or text such as ``50MB`` (10**6), ``1.5 GiB`` (2**30), ``0``."""
    if isinstance(raw, bool):
        raise BadValue("expected a size, got a boolean")
    if isinstance(raw, int | float):
        if not 0 <= raw < float("inf"):
            raise BadValue(f"{raw} is negative" if raw < 0 else f"{raw} is not a size")
        return int(raw)
    text = _text(raw, "a size")
    match = _SIZE.fullmatch(text)
    if not match:
        raise BadValue(f"{text!r} is not a size", "e.g. 500000000, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def parse_rate(raw: object) -> int:
    """Bytes per second: a size, optionally followed by ``/s`` (``50MB/s``); 0 is no cap."""
    if isinstance(raw, str):
        raw = raw.strip().removesuffix("/s")
    try:
        return parse_size(raw)
    except BadValue as exc:
        raise BadValue(exc.problem.replace("a size", "a rate"), "e.g. 50MB/s, 50MB or 0") from None


def parse_choice(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        text = _text(raw, " or ".join(choices)).lower()
        if text not in choices:
            raise BadValue(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def parse_text(raw: object) -> str:
    text = _text(raw, "text")
    if not text:
        raise BadValue("empty")
    return text


# --- the table ------------------------------------------------------------------------


def _show(value: Any) -> Any:
    """A value as TOML/JSON would hold it (host:port text, lists, strings for paths)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        if isinstance(value[0], str):
            return format_hostport(value)
    if isinstance(value, tuple | list):
        return [_show(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


Fallback = Callable[[Mapping[str, str], Mapping[str, Any]], tuple[Any, str]]


@dataclass(frozen=True)
class Setting:
    """One row: `key` in the file, ``--key-with-dashes`` (or `flag`), ``HFSWARM_KEY``."""

    key: str
    parse: Callable[[object], Any]
    help: str
    metavar: str = "VALUE"
    # Given several times on the command line, a comma-separated list in the environment,
    # a TOML array in the file; the layer that gives it replaces the others' whole list.
    many: bool = False
    flag: str | None = None  # default: --key-with-dashes
    aliases: tuple[str, ...] = ()  # older spellings of the flag, still accepted
    default: Any = None  # default: AgentConfig's field of the same name
    # Where the value comes from when no layer gives one (the HF conventions), and
    # the source to show for it; runs after the rows above it are resolved.
    fallback: Fallback | None = None

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return "HFSWARM_" + self.key.upper()

    @property
    def default_value(self) -> Any:
        fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
        if self.key in fields and fields[self.key].default is not dataclasses.MISSING:
            return fields[self.key].default
        return self.default

    def parse_one(self, raw: object) -> Any:
        if not self.many:
            return self.parse(raw)
        if isinstance(raw, str):  # the environment: comma-separated
            raw = [part for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list | tuple):
            raise BadValue(f"expected a list, got {type(raw).__name__}", 'e.g. ["a", "b"]')
        return tuple(self.parse(item) for item in raw)


def _mirrors_fallback(env: Mapping[str, str], _: Mapping[str, Any]) -> tuple[Any, str]:
    if env.get("HF_ENDPOINT"):
        return (normalize_endpoint(env["HF_ENDPOINT"]),), "env:HF_ENDPOINT"
    return (DEFAULT_ENDPOINT,), "default"


def _cache_fallback(env: Mapping[str, str], _: Mapping[str, Any]) -> tuple[Any, str]:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        if env.get(name):
            return default_cache_dir(env), f"env:{name}"
    return default_cache_dir(env), "default"


def _state_fallback(_: Mapping[str, str], done: Mapping[str, Any]) -> tuple[Any, str]:
    return default_state_dir(done["cache_dir"]), "default (beside cache_dir)"


def _listen_host_fallback(port: int) -> Fallback:
    # An operator who bound the peer API to one interface expects the other ports there too.
    def fallback(_: Mapping[str, str], done: Mapping[str, Any]) -> tuple[Any, str]:
        return (listen_host_for_others(done["listen"][0]), port), "default (listen's host)"

    return fallback


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen",
        parse_hostport_value("0.0.0.0"),
        "peer-facing API",
        metavar="HOST:PORT",
    ),
    Setting(
        "local_listen",
        parse_hostport_value("127.0.0.1"),
        "API for the CLI on this machine",
        metavar="HOST:PORT",
    ),
    Setting(
        "bt_listen",
        parse_hostport_value("0.0.0.0"),
        f"BitTorrent port; default: listen's host, port {BT_PORT} (every interface when "
        "listen is a host name, not an address)",
        metavar="HOST:PORT",
        fallback=_listen_host_fallback(BT_PORT),
    ),
    Setting(
        "peers",
        parse_hostport_value("0.0.0.0"),
        "static peers (their listen address); the flag is repeatable",
        metavar="HOST:PORT",
        many=True,
        flag="--peer",
    ),
    Setting("mdns", parse_bool, "find peers with multicast DNS (--no-mdns: do not)"),
    Setting(
        "mdns_interfaces",
        parse_text,
        "run mDNS only on these interfaces (IPv4 address or name, e.g. eth0); none: all of them",
        metavar="ADDRESS|NAME",
        many=True,
        flag="--interface",
    ),
    Setting(
        "trackers",
        parse_url,
        "LAN trackers (`hfswarm tracker`) for peers mDNS cannot reach; the flag is repeatable",
        metavar="URL",
        many=True,
        flag="--tracker",
    ),
    Setting(
        "mirrors",
        parse_url,
        "HF-style endpoints for metadata and fallback, first preferred; "
        "default HF_ENDPOINT, else https://huggingface.co",
        metavar="URL",
        many=True,
        flag="--mirror",
        fallback=_mirrors_fallback,
    ),
    Setting(
        "cache_dir",
        parse_path,
        "the HF cache to seed and fill; default HF_HUB_CACHE, else HF_HOME/hub",
        metavar="PATH",
        fallback=_cache_fallback,
    ),
    Setting(
        "state_dir",
        parse_path,
        "the agent's own state; default beside the cache (.../huggingface/hfswarm)",
        metavar="PATH",
        fallback=_state_fallback,
    ),
    Setting(
        "token_file",
        parse_path,
        "read the agent's Hugging Face token from this file; default HF_TOKEN, else the "
        "token file `hf auth login` saved",
        metavar="PATH",
    ),
    Setting(
        "connections",
        parse_int(1, 64),
        "parallel Range connections per file from the mirror",
        metavar="N",
        default=DownloadOptions.connections,
    ),
    Setting(
        "max_upload_rate",
        parse_rate,
        "cap what LAN peers take from this agent (BitTorrent and HTTP), in bytes/s (50MB/s, "
        "50MB, 50000000); 0: no cap; `hfswarm limits --upload` changes it live",
        metavar="RATE",
    ),
    Setting(
        "max_download_rate",
        parse_rate,
        "cap what this agent takes from LAN peers, in bytes/s; 0: no cap; "
        "`hfswarm limits --download` changes it live",
        metavar="RATE",
    ),
    Setting(
        "mirror_max_rate",
        parse_rate,
        "cap what this agent takes from the mirrors (all downloads together), in bytes/s; "
        "0: no cap; `hfswarm limits --mirror` changes it live",
        metavar="RATE",
    ),
    Setting(
        "cache_max_size",
        parse_size,
        "keep the cache's blobs under this size (200GB, 1.5TiB): least recently used blobs "
        "no pin or running download needs are removed; a download that cannot fit is "
        "refused; 0: no limit",
        metavar="SIZE",
    ),
    Setting(
        "seeding",
        parse_choice(*SEEDING_POLICIES),
        "what to offer LAN peers: always (every shareable blob), pinned (only blobs of "
        "pinned repos), none (nothing; this machine is still served)",
        metavar="|".join(SEEDING_POLICIES),
    ),
    Setting(
        "stall_timeout",
        parse_seconds,
        "a piece peers do not deliver for this long goes to the mirror, and so does one "
        f"whose bytes fall behind {MIN_PIECE_RATE / 1024:g} KiB/s (a quarter of "
        "max_download_rate when lower) from its first block after this long",
        metavar="SECONDS",
    ),
    Setting(
        "peer_grace",
        parse_seconds,
        "seconds given to peers to connect and announce their pieces before the mirror is used",
        metavar="SECONDS",
    ),
    Setting(
        "feeders",
        parse_int(0),
        "while several agents download a blob, only this many of them take it from the "
        "agents that hold it whole; the others take it from them (0: every downloader does)",
        metavar="N",
    ),
    Setting(
        "herd_settle",
        parse_seconds,
        "when several agents want a blob nobody has, how long their claims get to meet "
        "before one is elected to fetch it from the mirror",
        metavar="SECONDS",
    ),
    Setting(
        "herd_leader_timeout",
        parse_seconds,
        "replace a herd leader that makes no progress (or is gone) this long",
        metavar="SECONDS",
        aliases=("--leader-timeout",),
    ),
    Setting(
        "audit_log",
        parse_path,
        "the audit log: one JSON line per API call, download, publish, upload to a peer "
        "and ban (rotated at 10 MiB, 5 kept); default STATE_DIR/audit.log",
        metavar="PATH",
    ),
    Setting("audit", parse_bool, "keep the audit log (--no-audit: keep none)"),
    Setting(
        "cluster",
        parse_path,
        "cluster mode: this member's credentials (`hfswarm cluster enroll --out FILE`); "
        "only members are peers, over mutual TLS",
        metavar="FILE",
    ),
    Setting(
        "member_listen",
        parse_hostport_value("0.0.0.0"),
        "cluster mode: the member blob stream's port (members send each other whole blobs "
        f"over mutual TLS there); default: listen's host, port {MEMBER_PORT} (every interface "
        "when listen is a host name, not an address)",
        metavar="HOST:PORT",
        fallback=_listen_host_fallback(MEMBER_PORT),
    ),
    Setting(
        "member_streams",
        parse_int(0, 64),
        "cluster mode: blobs sent at once over the member blob stream (one per member); "
        "other members swarm them meanwhile; 0: members only swarm",
        metavar="N",
    ),
    Setting(
        "log_level",
        parse_choice(*LOG_LEVELS),
        "what the agent logs (-v: info)",
        metavar="|".join(LOG_LEVELS),
        default="warning",
    ),
)

BY_KEY = {s.key: s for s in SETTINGS}


# --- the file -------------------------------------------------------------------------

_TABLE = re.compile(r"\[\[?\s*(\"[^\"]*\"|'[^']*'|[^\].\s]+)")
_KEY = re.compile(r"(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*[.=]")


def key_lines(text: str) -> dict[str, int]:
    """The line of each top-level key (and table header) of a TOML text, found by
    scanning: a line that starts with ``key =`` (or ``key.x =``) before any table, or
    ``[key]``. Lines inside multi-line values rarely start that way; good enough."""
    lines: dict[str, int] = {}
    in_table = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            match = _TABLE.match(stripped)
            if match:
                lines.setdefault(match.group(1).strip("\"'"), number)
                in_table = True
            continue
        if not in_table:
            match = _KEY.match(stripped)
            if match:
                lines.setdefault(match.group(1).strip("\"'"), number)
    return lines


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    values: Mapping[str, Any]
    lines: Mapping[str, int]

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.path}:{line}" if line else str(self.path)


def load_file(path: Path) -> ConfigFile:
    """Read and check one config file: TOML, only known keys (a close match is
    suggested for the others)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist",
            hint="pass an existing file to --config, or none to use the default locations",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}",
            hint="check its permissions (the agent's user must be able to read it)",
        ) from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line N, column M)"
        line = re.search(r"line (\d+)", str(exc))
        where = f"{path}:{line.group(1)}" if line else str(path)
        raise ConfigError(
            f"{where}: not valid TOML: {exc}",
            hint='write one `key = value` per line, e.g. listen = "0.0.0.0:7851"',
        ) from None
    lines = key_lines(text)
    loaded = ConfigFile(path, values, lines)
    for key in values:
        if key not in BY_KEY:
            close = difflib.get_close_matches(key, list(BY_KEY), n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else "the keys are the agent's flags in snake_case: see `hfswarm agent --help`"
            )
            raise ConfigError(f"{loaded.where(key)}: unknown key {key!r}", hint=hint)
    return loaded


def find_config(
    explicit: str | os.PathLike[str] | None,
    env: Mapping[str, str],
    system: Path = SYSTEM_CONFIG,
) -> Path | None:
    """--config FILE (it must exist), else HFSWARM_CONFIG (likewise), else the first of
    $XDG_CONFIG_HOME/hfswarm/agent.toml (~/.config by default) and /etc/hfswarm/agent.toml
    that exists; None: no file."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    if env.get("HFSWARM_CONFIG"):
        return Path(env["HFSWARM_CONFIG"]).expanduser().absolute()
    xdg = env.get("XDG_CONFIG_HOME") or ""
    home = Path(xdg).expanduser() if xdg else Path("~/.config").expanduser()
    for candidate in (home / "hfswarm" / "agent.toml", system):
        if candidate.is_file():
            return candidate
    return None


# --- resolving the layers -------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    value: Any
    source: str  # default / env:HF_HOME / file:PATH:LINE / env:HFSWARM_X / flag


@dataclass(frozen=True)
class Effective:
    """Every setting's value and where it came from."""

    file: Path | None
    values: Mapping[str, Value]

    def __getitem__(self, key: str) -> Any:
        return self.values[key].value

    def as_json(self) -> dict[str, Any]:
        return {
            "config_file": str(self.file) if self.file else None,
            "settings": {
                key: {"value": _show(v.value), "source": v.source} for key, v in self.values.items()
            },
        }

    def table(self) -> str:
        rows = [(k, _display(v.value), v.source) for k, v in self.values.items()]
        width = [max(len(r[i]) for r in [("key", "value", "source"), *rows]) for i in (0, 1)]
        head = f"config file: {self.file or '(none)'}"
        lines = [head, f"{'key':{width[0]}}  {'value':{width[1]}}  source"]
        lines += [f"{k:{width[0]}}  {v:{width[1]}}  {s}" for k, v, s in rows]
        return "\n".join(lines)


def _display(value: Any) -> str:
    shown = _show(value)
    if isinstance(shown, list):
        return ", ".join(str(s) for s in shown) or "(none)"
    if shown is None:
        return "(none)"
    if isinstance(shown, bool):
        return "true" if shown else "false"
    return str(shown)


def resolve(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file: ConfigFile | None,
    table: Sequence[Setting] = SETTINGS,
) -> Effective:
    """Per key: the flag if given, else HFSWARM_KEY, else the file's key, else the
    default (or the row's fallback, the HF conventions). A bad value raises ConfigError
    naming the flag, the variable, or the file, line and key."""
    done: dict[str, Value] = {}
    for s in table:
        if s.key in flags:
            raw, source = flags[s.key], "flag"
            # A repeated flag's problem names the bad item itself.
            where = s.flag_name if s.many else f"{s.flag_name} {_quote(raw)}"
            hint_for = f"fix {s.flag_name}"
        elif env.get(s.env, "").strip():
            raw, source = env[s.env], f"env:{s.env}"
            where, hint_for = f"environment variable {s.env}={raw!r}", f"fix or unset {s.env}"
        elif file is not None and s.key in file.values:
            raw, source = file.values[s.key], f"file:{file.where(s.key)}"
            where = f"{file.where(s.key)}: {s.key} = {_quote(raw)}"
            hint_for = f"fix {s.key} in {file.path}"
        else:
            if s.fallback is not None:
                value, source = s.fallback(env, {k: v.value for k, v in done.items()})
            else:
                value, source = s.default_value, "default"
            done[s.key] = Value(value, source)
            continue
        try:
            value = s.parse_one(raw)
        except BadValue as exc:
            hint = f"{hint_for}: {exc.hint}" if exc.hint else hint_for
            raise ConfigError(f"{where}: {exc.problem}", hint=hint) from None
        if file is not None and source.startswith("file:"):
            value = _beside(value, file.path.parent)
        done[s.key] = Value(value, source)
    return Effective(file.path if file else None, done)


def _quote(raw: object) -> str:
    return repr(raw) if isinstance(raw, str) else str(raw)


def _beside(value: Any, folder: Path) -> Any:
    """A relative path in a file is relative to the file's folder."""
    if isinstance(value, Path) and not value.is_absolute():
        return Path(os.path.normpath(folder / value))
    return value


def effective(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    config: str | os.PathLike[str] | None = None,
    system: Path = SYSTEM_CONFIG,
) -> Effective:
    """Find and load the config file, then resolve every setting."""
    path = find_config(config, env, system)
    return resolve(flags, env, load_file(path) if path else None)


# HFSWARM_* variables that are not agent settings (the CLI's, the demo's).
OTHER_VARIABLES = frozenset({"HFSWARM_AGENT", "HFSWARM_CONFIG", "HFSWARM_DEMO_DIR"})


def unknown_variables(env: Mapping[str, str], table: Sequence[Setting] = SETTINGS) -> list[str]:
    """HFSWARM_* variables no setting reads (a typo would otherwise pass unnoticed), each
    with a close match if there is one."""
    known = {s.env for s in table} | OTHER_VARIABLES
    out = []
    for name in sorted(k for k in env if k.startswith("HFSWARM_") and k not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        out.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return out


# --- into the agent's config ----------------------------------------------------------


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}",
            hint="pass a readable file holding only the token to --token-file",
        ) from None
    if not token:
        raise ConfigError(
            f"the token file {path} is empty",
            hint="put the token in it (e.g. from https://huggingface.co/settings/tokens)",
        )
    return token


def agent_config(eff: Effective, env: Mapping[str, str], token: str | None = None) -> AgentConfig:
    """An `AgentConfig` from the resolved settings: every key naming one of its fields
    passes straight through (so a new row needs no code here); the hub's (mirrors,
    cache, token) and the downloader's go to their own objects. `token` (--token) wins
    over token_file."""
    if token is None and eff["token_file"] is not None:
        token = read_token_file(eff["token_file"])
    hub = HubSettings.from_env(env, mirrors=eff["mirrors"], token=token, cache_dir=eff["cache_dir"])
    own = {"hub", "state_dir", "download"}
    fields = {f.name for f in dataclasses.fields(AgentConfig)} - own
    direct = {key: value.value for key, value in eff.values.items() if key in fields}
    return AgentConfig(
        hub=hub,
        state_dir=eff["state_dir"],
        download=DownloadOptions.from_env(env, connections=eff["connections"], quiet=True),
        **direct,
    )


def markdown(table: Sequence[Setting] = SETTINGS) -> str:
    """The reference table of docs/CONFIGURATION.md (a test keeps the file in sync)."""
    rows = ["| key | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for s in table:
        default = f"`{_display(s.default_value)}`" if s.fallback is None else "see meaning"
        kind = " (list)" if s.many else ""
        flags = [s.flag_name, *s.aliases]
        if s.parse is parse_bool:
            flags.append("--no-" + s.flag_name.removeprefix("--"))
        shown = ", ".join(f"`{f}`" for f in flags)
        rows.append(f"| `{s.key}`{kind} | {shown} | `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows) + "\n"


# --- the command line -----------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, table: Sequence[Setting] = SETTINGS) -> None:
    """One flag per row, its default shown but not set (``SUPPRESS``: a flag left out
    must not hide the environment or the file), read back by `given_flags`."""
    for s in table:
        default = s.default_value if s.fallback is None else None
        shown = f" (default {_display(default)})" if default not in (None, ()) else ""
        names = (s.flag_name, *s.aliases)
        common: dict[str, Any] = {"dest": s.key, "default": argparse.SUPPRESS}
        if s.parse is parse_bool:
            parser.add_argument(
                *names, action=argparse.BooleanOptionalAction, help=s.help + shown, **common
            )
        else:
            parser.add_argument(
                *names,
                action="append" if s.many else "store",
                metavar=s.metavar,
                help=s.help + shown,
                **common,
            )


def given_flags(args: Any, table: Sequence[Setting] = SETTINGS) -> dict[str, Any]:
    return {s.key: getattr(args, s.key) for s in table if hasattr(args, s.key)}


if __name__ == "__main__":  # the reference table of docs/CONFIGURATION.md
    print(markdown(), end="")
