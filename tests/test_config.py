"""The agent's settings: one table (`peer.settings.SETTINGS`) gives the config file's keys,
the `hfswarm agent` flags and the HFSWARM_* variables; per key, flags > environment >
file > defaults (the HF conventions below all four); `hfswarm config` says where each
value came from; a bad key or value stops the agent with the file, line and key (or the
variable, or the flag); a real agent runs from a config file alone. The examples
(configs, systemd units, warm-hosts.sh) are tested in test_examples.py."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agentkit import write_tree
from procs import agent_process

from peer.cli.main import agent_config, build_parser
from peer.config import AgentConfig, DownloadOptions, HubSettings, default_cache_dir
from peer.errors import ConfigError
from peer.mirror_server import RepoSource, ThreadedMirror
from peer.settings import (
    BY_KEY,
    SETTINGS,
    BadValue,
    effective,
    find_config,
    given_flags,
    key_lines,
    load_file,
    markdown,
    parse_rate,
    parse_size,
    resolve,
)

ROOT = Path(__file__).resolve().parent.parent

# For each setting: a value for the file (TOML), for the environment, for the flag, and
# the typed value each gives. A new row in the table needs a line here (the test below
# says so), so that its three ways in are tried.
SAMPLES: dict[str, tuple[str, str, list[str], tuple[Any, Any, Any]]] = {
    "listen": (
        '"10.0.0.1:1"', "10.0.0.2:2", ["--listen", "[::1]:3"],
        (("10.0.0.1", 1), ("10.0.0.2", 2), ("::1", 3)),
    ),
    "local_listen": (
        '":4"', "127.0.0.2:5", ["--local-listen", "127.0.0.3:6"],
        (("127.0.0.1", 4), ("127.0.0.2", 5), ("127.0.0.3", 6)),
    ),
    "bt_listen": (
        '"0.0.0.0:7"', ":8", ["--bt-listen", "1.2.3.4:9"],
        (("0.0.0.0", 7), ("0.0.0.0", 8), ("1.2.3.4", 9)),
    ),
    "member_listen": (
        '"0.0.0.0:10"', ":11", ["--member-listen", "1.2.3.4:12"],
        (("0.0.0.0", 10), ("0.0.0.0", 11), ("1.2.3.4", 12)),
    ),
    "member_streams": ("0", "3", ["--member-streams", "4"], (0, 3, 4)),
    "peers": (
        '["a:1", "b:2"]', "c:3, d:4", ["--peer", "e:5", "--peer", "f:6"],
        ((("a", 1), ("b", 2)), (("c", 3), ("d", 4)), (("e", 5), ("f", 6))),
    ),
    "mdns": ("false", "yes", ["--no-mdns"], (False, True, False)),
    "mdns_interfaces": (
        '["eth0"]', "eth1,10.0.0.1", ["--interface", "br0"],
        (("eth0",), ("eth1", "10.0.0.1"), ("br0",)),
    ),
    "trackers": (
        '["http://t1:7860"]', "http://t2:7860/", ["--tracker", "https://t3"],
        (("http://t1:7860",), ("http://t2:7860",), ("https://t3",)),
    ),
    "mirrors": (
        '["http://m1:8080", "http://m2"]', "http://m3", ["--mirror", "http://m4"],
        (("http://m1:8080", "http://m2"), ("http://m3",), ("http://m4",)),
    ),
    "cache_dir": (
        '"/c/file"', "/c/env", ["--cache-dir", "/c/flag"],
        (Path("/c/file"), Path("/c/env"), Path("/c/flag")),
    ),
    "state_dir": (
        '"/s/file"', "/s/env", ["--state-dir", "/s/flag"],
        (Path("/s/file"), Path("/s/env"), Path("/s/flag")),
    ),
    "token_file": (
        '"/t/file"', "/t/env", ["--token-file", "/t/flag"],
        (Path("/t/file"), Path("/t/env"), Path("/t/flag")),
    ),
    "cluster": (
        '"/k/file.pem"', "/k/env.pem", ["--cluster", "/k/flag.pem"],
        (Path("/k/file.pem"), Path("/k/env.pem"), Path("/k/flag.pem")),
    ),
    "connections": ("3", "4", ["--connections", "5"], (3, 4, 5)),
    "max_upload_rate": (
        '"50MB/s"', "2MiB", ["--max-upload-rate", "1000"], (50_000_000, 2 * 2**20, 1000),
    ),
    "max_download_rate": (
        '"20MB/s"', "3MiB/s", ["--max-download-rate", "2000"], (20_000_000, 3 * 2**20, 2000),
    ),
    "mirror_max_rate": (
        "5000000", "1MB/s", ["--mirror-max-rate", "7MB"], (5_000_000, 1_000_000, 7_000_000),
    ),
    "cache_max_size": (
        '"200GB"', "1.5TiB", ["--cache-max-size", "500MB"],
        (200 * 10**9, int(1.5 * 2**40), 500 * 10**6),
    ),
    "seeding": ('"pinned"', "none", ["--seeding", "always"], ("pinned", "none", "always")),
    "stall_timeout": ("7", "8.5", ["--stall-timeout", "9"], (7.0, 8.5, 9.0)),
    "peer_grace": ("0.5", "1", ["--peer-grace", "1.5"], (0.5, 1.0, 1.5)),
    "feeders": ("0", "3", ["--feeders", "4"], (0, 3, 4)),
    "herd_settle": ("2", "3", ["--herd-settle", "4"], (2.0, 3.0, 4.0)),
    "herd_leader_timeout": ("20", "30", ["--leader-timeout", "40"], (20.0, 30.0, 40.0)),
    "audit_log": (
        '"/a/file"', "/a/env", ["--audit-log", "/a/flag"],
        (Path("/a/file"), Path("/a/env"), Path("/a/flag")),
    ),
    "audit": ("false", "true", ["--no-audit"], (False, True, False)),
    "log_level": ('"error"', "DEBUG", ["-v"], ("error", "debug", "info")),
}  # fmt: skip


def flags_of(argv: list[str]) -> dict[str, Any]:
    return given_flags(build_parser().parse_args(["agent", *argv]))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def hfswarm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, from this checkout, with no HF_*/HFSWARM_* settings of
    the machine leaking in (and no config file but the one the test names)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFSWARM_"))}
    clean["XDG_CONFIG_HOME"] = "/nonexistent"
    return subprocess.run(
        [sys.executable, "-m", "peer.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_every_setting_has_samples_and_every_agent_field_a_setting() -> None:
    assert set(SAMPLES) == set(BY_KEY), "add a SAMPLES line for each new setting"
    # "Adding a setting is one row": every AgentConfig field the agent is told is a row
    # (the hub's and the downloader's objects are built from rows of their own).
    fields = {f.name for f in dataclasses.fields(AgentConfig)} - {"hub", "download"}
    assert fields <= set(BY_KEY), fields - set(BY_KEY)
    for s in SETTINGS:  # the defaults are AgentConfig's own
        if s.key in fields and s.fallback is None:
            assert s.default_value == getattr(AgentConfig, s.key), s.key
    assert BY_KEY["connections"].default_value == DownloadOptions.connections


@pytest.mark.parametrize("key", list(SAMPLES))
def test_precedence_flags_over_env_over_file_over_defaults(key: str, tmp_path: Path) -> None:
    file_text, env_text, argv, (from_file, from_env, from_flag) = SAMPLES[key]
    s = BY_KEY[key]
    path = write(tmp_path / "agent.toml", f"# comment\n\n{key} = {file_text}\n")
    env = {s.env: env_text}

    # Nothing given: the default (or the HF convention, for the rows that have one).
    nothing = resolve({}, {}, None).values[key]
    if s.fallback is None:
        assert nothing.value == s.default_value and nothing.source == "default"
    # Each layer's sample differs from the one below it, so a layer ignored shows.
    assert nothing.value != from_file != from_env != from_flag

    file = load_file(path)
    got = resolve({}, {}, file).values[key]
    assert (got.value, got.source) == (from_file, f"file:{path}:3")
    got = resolve({}, env, file).values[key]
    assert (got.value, got.source) == (from_env, f"env:{s.env}")
    got = resolve(flags_of(argv), env, file).values[key]
    assert (got.value, got.source) == (from_flag, "flag")
    # Each layer alone, too: nothing below it leaks through.
    assert resolve({}, env, None)[key] == from_env
    assert resolve(flags_of(argv), {}, None)[key] == from_flag


def test_the_hf_conventions_sit_below_every_explicit_layer(tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": "http://hf-endpoint:1/", "HF_HOME": str(tmp_path / "hfhome")}
    eff = resolve({}, env, None)
    assert eff.values["mirrors"].value == ("http://hf-endpoint:1",)
    assert eff.values["mirrors"].source == "env:HF_ENDPOINT"
    assert eff.values["cache_dir"].value == default_cache_dir(env) == tmp_path / "hfhome/hub"
    assert eff.values["cache_dir"].source == "env:HF_HOME"
    assert eff["state_dir"] == tmp_path / "hfhome/hfswarm"  # beside the cache, as before
    file = load_file(write(tmp_path / "a.toml", 'mirrors = ["http://m"]\ncache_dir = "c"\n'))
    eff = resolve({}, env, file)
    assert eff["mirrors"] == ("http://m",)
    assert eff["cache_dir"] == tmp_path / "c"  # relative to the file's folder
    assert eff["state_dir"] == tmp_path / "hfswarm"


def test_the_member_stream_defaults_to_the_peer_apis_host() -> None:
    eff = resolve({"listen": "10.0.0.5:7851"}, {}, None)
    assert eff.values["member_listen"].value == ("10.0.0.5", 7853)
    assert eff.values["member_listen"].source == "default (listen's host)"
    assert resolve({}, {}, None)["member_listen"] == ("0.0.0.0", 7853)
    given = {"listen": "10.0.0.5:7851", "member_listen": "0.0.0.0:9"}
    assert resolve(given, {}, None)["member_listen"] == ("0.0.0.0", 9)  # set: kept
    # An AgentConfig built in code says the same.
    hub = HubSettings(mirrors=(), token=None, cache_dir=Path("c"))
    config = AgentConfig(hub=hub, state_dir=Path("s"), listen=("10.0.0.5", 1))
    assert config.member_listen == ("10.0.0.5", 7853)
    assert AgentConfig(hub=hub, state_dir=Path("s")).member_listen == ("0.0.0.0", 7853)


def test_the_bittorrent_port_defaults_to_the_peer_apis_host() -> None:
    eff = resolve({"listen": "10.0.0.5:7851"}, {}, None)
    assert eff.values["bt_listen"].value == ("10.0.0.5", 7852)
    assert eff.values["bt_listen"].source == "default (listen's host)"
    assert resolve({"listen": "[fd00::5]:1"}, {}, None)["bt_listen"] == ("fd00::5", 7852)
    # libtorrent would take a host name for a network device: every interface then.
    assert resolve({"listen": "lab-7:7851"}, {}, None)["bt_listen"] == ("0.0.0.0", 7852)
    given = {"listen": "10.0.0.5:7851", "bt_listen": ":9"}
    assert resolve(given, {}, None)["bt_listen"] == ("0.0.0.0", 9)  # set: kept
    hub = HubSettings(mirrors=(), token=None, cache_dir=Path("c"))
    config = AgentConfig(hub=hub, state_dir=Path("s"), listen=("10.0.0.5", 1))
    assert (config.bt_listen, config.member_listen) == (("10.0.0.5", 7852), ("10.0.0.5", 7853))
    named = AgentConfig(hub=hub, state_dir=Path("s"), listen=("lab-7", 1))
    assert named.bt_listen == ("0.0.0.0", 7852)


def test_agent_config_from_a_file_environment_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = write(tmp_path / "token", "hf_secret\n")
    path = write(
        tmp_path / "agent.toml",
        f'listen = "127.0.0.5:1"\nmax_upload_rate = "1MB"\ntoken_file = "{token}"\n'
        'mdns = false\npeers = ["127.0.0.6:2"]\nconnections = 2\n',
    )
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    args = build_parser().parse_args(["agent", "--config", str(path), "--herd-settle", "0.25"])
    env = {"HFSWARM_STALL_TIMEOUT": "3", "HF_HOME": str(tmp_path / "hf")}
    config = agent_config(args, env)
    assert config == AgentConfig(
        hub=config.hub,
        state_dir=tmp_path / "hf/hfswarm",
        listen=("127.0.0.5", 1),
        peers=(("127.0.0.6", 2),),
        mdns=False,
        download=DownloadOptions(connections=2, quiet=True),
        max_upload_rate=1_000_000,
        stall_timeout=3.0,
        herd_settle=0.25,
    )
    assert config.hub.token == "hf_secret"
    assert config.hub.cache_dir == tmp_path / "hf/hub"
    # --token beats the file's token_file; --token with --token-file is refused.
    args = build_parser().parse_args(["agent", "--config", str(path), "--token", "hf_flag"])
    assert agent_config(args, env).hub.token == "hf_flag"
    args = build_parser().parse_args(["agent", "--token", "a", "--token-file", str(token)])
    with pytest.raises(ConfigError, match="--token and --token-file"):
        agent_config(args, env)


def test_hfswarm_config_prints_each_value_and_its_source(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        '# the lab\nlisten = "0.0.0.0:9000"\n\nstall_timeout = 8\nmax_upload_rate = "5MB/s"\n',
    )
    env = {"HFSWARM_MAX_UPLOAD_RATE": "7MB", "HF_ENDPOINT": "http://mirror.lan:8080"}
    done = hfswarm("config", "--config", str(path), "--stall-timeout", "9", env=env)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert done.stdout.splitlines()[0] == f"config file: {path}"
    assert rows["listen"][1:] == ["0.0.0.0:9000", f"file:{path}:2"]
    assert rows["stall_timeout"][1:] == ["9.0", "flag"]  # the flag beats line 4
    assert rows["max_upload_rate"][1:] == ["7000000", "env:HFSWARM_MAX_UPLOAD_RATE"]
    assert rows["mirrors"][1:] == ["http://mirror.lan:8080", "env:HF_ENDPOINT"]
    assert rows["bt_listen"][1:] == ["0.0.0.0:7852", "default", "(listen's", "host)"]
    assert set(rows) == set(BY_KEY)

    done = hfswarm("config", "--json", "--config", str(path), env=env)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["config_file"] == str(path)
    assert got["settings"]["listen"] == {"value": "0.0.0.0:9000", "source": f"file:{path}:2"}
    assert got["settings"]["stall_timeout"] == {"value": 8.0, "source": f"file:{path}:4"}
    assert got["settings"]["peers"] == {"value": [], "source": "default"}


def test_an_unknown_key_stops_the_agent_with_file_line_and_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", 'listen = ":7851"\n# caps\nmax_upload_rte = "5MB/s"\n')
    done = hfswarm("agent", "--config", str(path))
    assert done.returncode == 2
    assert f"{path}:3: unknown key 'max_upload_rte'" in done.stderr
    assert "did you mean 'max_upload_rate'?" in done.stderr
    assert "ready" not in done.stdout  # stopped before listening
    # A table is a key too; nothing close: the hint says where the keys are.
    path = write(tmp_path / "b.toml", 'mdns = true\n\n[agent]\nlisten = ":1"\n')
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert info.value.one_line() == (
        f"{path}:3: unknown key 'agent' (the keys are the agent's flags in snake_case: "
        "see `hfswarm agent --help`)"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('stall_timeout = "soon"', "stall_timeout = 'soon': 'soon' is not a number of seconds"),
        ('listen = "nohost"', "listen = 'nohost': address 'nohost' is not HOST:PORT"),
        ('listen = "h:99999"', "port out of range"),
        ('max_upload_rate = "fast"', "max_upload_rate = 'fast': 'fast' is not a rate"),
        ("max_upload_rate = -5", "-5 is negative"),
        ("connections = 100", "100 is out of range: it must be between 1 and 64"),
        ("connections = true", "expected a whole number, got a boolean"),
        ("peers = 5", "expected a list, got int"),
        ('peers = ["a:1", 7]', "expected HOST:PORT as a string, got int"),
        ('mdns = "maybe"', "'maybe' is not true or false"),
        ('mirrors = ["ftp://x"]', "is not an http(s) URL"),
        ('log_level = "loud"', "'loud' is not one of debug, info, warning, error"),
    ],
)
def test_a_bad_value_names_the_file_line_and_key(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "agent.toml", f"# hfswarm\nherd_settle = 2\n{line}\n")
    with pytest.raises(ConfigError) as info:
        resolve({}, {}, load_file(path))
    text = info.value.one_line()
    assert text.startswith(f"{path}:3: {line.split()[0]} = "), text
    assert message in text
    assert f"fix {line.split()[0]} in {path}" in text  # the hint


def test_bad_values_from_the_cli_exit_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", '\n\nbt_listen = "0.0.0.0:port"\n')
    done = hfswarm("agent", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"hfswarm: error: {path}:3: bt_listen = '0.0.0.0:port': address '0.0.0.0:port' has no "
        f"port number (fix bt_listen in {path}: e.g. 0.0.0.0:7851, [::]:7851 or :7851)"
    ]
    done = hfswarm("agent", "--max-upload-rate", "lots")
    assert done.returncode == 2
    assert "--max-upload-rate 'lots': 'lots' is not a rate" in done.stderr
    done = hfswarm("agent", "--peer", "10.0.0.1:7851", "--peer", "10.0.0.2")
    assert done.returncode == 2
    assert "--peer: address '10.0.0.2' is not HOST:PORT" in done.stderr
    # Not valid TOML at all: the line tomllib names.
    path = write(tmp_path / "c.toml", 'listen = ":1"\nmdns = \n')
    done = hfswarm("config", "--config", str(path))
    assert done.returncode == 2 and f"{path}:2: not valid TOML" in done.stderr


def test_a_bad_environment_variable_is_named(tmp_path: Path) -> None:
    env = {"HFSWARM_MAX_UPLOAD_RATE": "fast"}
    with pytest.raises(ConfigError) as info:
        resolve({}, env, None)
    assert info.value.one_line() == (
        "environment variable HFSWARM_MAX_UPLOAD_RATE='fast': 'fast' is not a rate "
        "(fix or unset HFSWARM_MAX_UPLOAD_RATE: e.g. 50MB/s, 50MB or 0)"
    )
    done = hfswarm("config", env={"HFSWARM_LOCAL_LISTEN": "localhost"})
    assert done.returncode == 2
    assert "environment variable HFSWARM_LOCAL_LISTEN='localhost'" in done.stderr
    # A variable no setting reads is named (a typo), with what was meant.
    done = hfswarm("config", env={"HFSWARM_MAX_UPLOAD_RTE": "5MB", "HFSWARM_AGENT": "x"})
    assert done.returncode == 0
    assert done.stderr.strip().splitlines() == [
        "hfswarm: warning: ignoring HFSWARM_MAX_UPLOAD_RTE (did you mean "
        "HFSWARM_MAX_UPLOAD_RATE?): no such setting"
    ]
    # The flag wins, so a bad variable it overrides is never read.
    assert resolve({"max_upload_rate": "1"}, env, None)["max_upload_rate"] == 1


def test_config_given_but_missing_is_an_error(tmp_path: Path) -> None:
    done = hfswarm("agent", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert f"config file {tmp_path / 'nope.toml'} does not exist" in done.stderr
    done = hfswarm("config", env={"HFSWARM_CONFIG": str(tmp_path / "gone.toml")})
    assert done.returncode == 2 and "gone.toml does not exist" in done.stderr


def test_the_config_file_is_found_in_xdg_then_etc(tmp_path: Path) -> None:
    system = tmp_path / "etc/hfswarm/agent.toml"
    xdg = tmp_path / "xdg"
    env = {"XDG_CONFIG_HOME": str(xdg), "HOME": str(tmp_path / "home")}
    assert find_config(None, env, system) is None
    write(system, 'listen = ":1"\n')
    assert find_config(None, env, system) == system
    user = write(xdg / "hfswarm/agent.toml", 'listen = ":2"\n')
    assert find_config(None, env, system) == user  # the user's first
    # Without XDG_CONFIG_HOME: ~/.config.
    home_file = write(tmp_path / "home/.config/hfswarm/agent.toml", "mdns = false\n")
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path / "home")
    try:
        assert find_config(None, {}, system) == home_file
    finally:
        if old_home is not None:
            os.environ["HOME"] = old_home
    # HFSWARM_CONFIG, then --config, win over both.
    other = write(tmp_path / "other.toml", "")
    assert find_config(None, {**env, "HFSWARM_CONFIG": str(other)}, system) == other
    assert find_config(str(system), {**env, "HFSWARM_CONFIG": str(other)}, system) == system
    assert effective({}, env, None, system)["listen"] == ("0.0.0.0", 2)
    # The real CLI, with only XDG_CONFIG_HOME pointing at the file.
    done = hfswarm("config", "--json", env={"XDG_CONFIG_HOME": str(xdg)})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["config_file"] == str(user)
    assert got["settings"]["listen"] == {"value": "0.0.0.0:2", "source": f"file:{user}:1"}


def test_key_lines_finds_top_level_keys_only() -> None:
    text = (
        'listen = ":1"\n'
        "  peers = [\n"
        '    "a:1",\n'
        "  ]\n"
        '"quoted_key" = 1\n'
        "dotted.part = 2\n"
        "[table]\n"
        "listen = 3\n"
        "[[array]]\n"
    )
    assert key_lines(text) == {
        "listen": 1, "peers": 2, "quoted_key": 5, "dotted": 6, "table": 7, "array": 9,
    }  # fmt: skip


def test_sizes_and_rates() -> None:
    assert parse_size("50MB") == parse_rate("50MB/s") == parse_rate(50_000_000)
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size("0") == parse_rate("0/s") == 0
    assert parse_size("10k") == 10_000 and parse_size("2KiB") == 2048
    assert parse_size(1.5e6) == 1_500_000  # a TOML float
    for bad in ("5 XB", "MB", "-5MB", "1e6", float("nan"), float("inf"), -1, True):
        with pytest.raises(BadValue):
            parse_size(bad)


def test_configuration_md_is_generated_from_the_table() -> None:
    text = (ROOT / "docs/CONFIGURATION.md").read_text()
    assert markdown() in text, "regenerate: python -m peer.settings > the table in the doc"


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


async def test_a_real_agent_runs_from_a_config_file_alone(tmp_path: Path) -> None:
    ip = "127.0.0.7"
    ports = {name: free_port(ip) for name in ("listen", "local_listen", "bt_listen")}
    src = write_tree(tmp_path / "src", {"config.json": b"{}"})
    with ThreadedMirror([RepoSource("model", "org/m", src)]) as m:
        path = write(
            tmp_path / "etc/agent.toml",
            "\n".join(
                [f'{name} = "{ip}:{port}"' for name, port in ports.items()]
                + [
                    f'mirrors = ["{m.url}"]',
                    "mdns = false",
                    'cache_dir = "../cache"',  # relative to the file
                    'state_dir = "../state"',
                    'max_upload_rate = "1MB/s"',
                ]
            ),
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFSWARM_"))}
        env |= {"PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "elsewhere")}
        # Nothing but the file: a clean environment, no flag but --config.
        cmd = ["env", "-i", *(f"{k}={v}" for k, v in env.items()),
               sys.executable, "-m", "peer.cli.main", "agent", "--config", str(path)]  # fmt: skip
        async with agent_process(tmp_path / "a", ip, m.url, cmd=cmd) as a:
            assert a.info["local_port"] == ports["local_listen"]
            assert a.info["peer_port"] == ports["listen"]
            assert a.info["bt_port"] == ports["bt_listen"]
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://{ip}:{ports['local_listen']}/v1/status") as r,
            ):
                assert r.status == 200
                status = await r.json()
            assert status["mirrors"] == [m.url]
            assert Path(status["cache_dir"]) == tmp_path / "cache"  # the file's, not HF_HOME
            assert (tmp_path / "state").is_dir()
