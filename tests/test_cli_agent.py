"""The CLI around the agent: a named agent that is not there, and the demo end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def hfswarm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peer.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
