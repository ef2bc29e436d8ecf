"""The CLI around the agent: its defaults, a named agent that is not there, and the demo
end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import procs
import pytest

from peer.cli.main import agent_config, build_parser
from peer.config import AgentConfig, DownloadOptions, format_hostport
from peer.scheduling.herd import HerdConfig
from peer.scheduling.policy import PolicyConfig


def hfswarm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peer.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_agent_flags_default_to_agent_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    config = agent_config(build_parser().parse_args(["agent", "--cache-dir", str(tmp_path)]))
    assert config.download == DownloadOptions(quiet=True)
    assert config == AgentConfig(
        hub=config.hub, state_dir=config.state_dir, download=config.download
    )
    # The pure cores start from the same values (the policy's stall timeout was 10 s).
    assert PolicyConfig().stall_timeout == config.stall_timeout
    assert PolicyConfig().grace_period == config.peer_grace
    assert HerdConfig().settle == config.herd_settle
    assert HerdConfig().leader_timeout == config.herd_leader_timeout


def test_the_agent_help_prints_the_real_defaults() -> None:
    done = hfswarm("agent", "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for where in (AgentConfig.listen, AgentConfig.local_listen):
        assert f"(default {format_hostport(where)})" in text
    assert f"BitTorrent port; default: listen's host, port {AgentConfig.bt_listen[1]}" in text
    for seconds in (
        AgentConfig.stall_timeout,
        AgentConfig.herd_settle,
        AgentConfig.herd_leader_timeout,
    ):
        assert f"(default {seconds})" in text
    assert f"(default {DownloadOptions.connections})" in text


def test_a_named_agent_that_is_not_running_is_a_clear_network_error() -> None:
    done = hfswarm("download", "org/x", "--agent", "http://127.0.0.1:9")
    assert done.returncode == 3
    assert "no hfswarm agent answers at http://127.0.0.1:9" in done.stderr
    assert "hfswarm agent" in done.stderr  # says what to do
    done = hfswarm("status", "--agent", "http://127.0.0.1:9")
    assert done.returncode == 3


def test_demo_moves_the_model_from_the_mirror_once_then_between_agents(tmp_path: Path) -> None:
    done = hfswarm("demo", "--size-mb", "24", "--dir", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr
    rows = {
        m.group(1): m.groups()[1:]
        for m in re.finditer(
            r"^agent (\d)\s+[\d.]+s\s+([\d.]+ [KMG]?B)\s+([\d.]+ [KMG]?B)", done.stdout, re.M
        )
    }
    assert set(rows) == {"1", "2", "3"}, done.stdout
    assert rows["1"][0] == "0 B"  # agent 1: everything from the mirror
    assert rows["2"][1] == rows["3"][1] == "0 B"  # agents 2 and 3: nothing from it
    assert "(1.00x its size)" in done.stdout  # the mirror sent the model once for 3 copies


async def test_the_agent_keeps_what_start_up_made_out_of_the_collectors_full_passes(
    tmp_path: Path,
) -> None:
    # A full pass walked the agent's start-up objects again during each long download
    # (30-70 ms, docs/benchmarks.md 8.33): once up, the agent freezes them.
    cmd = [*procs.loopback_agent_command(tmp_path / "a", "127.0.0.1", "http://127.0.0.1:9")]
    cmd += ["--log-level", "debug"]
    async with procs.agent_process(tmp_path / "a", "127.0.0.1", "", cmd=cmd) as a:
        pass  # (frozen right after its "ready" line, before it serves anything)
    m = re.search(r"(\d+) start-up objects frozen", a.log.read_text())
    assert m is not None, a.log.read_text()[-2000:]
    assert int(m[1]) > 10_000  # modules, classes, aiohttp's and libtorrent's tables
