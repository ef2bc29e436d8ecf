"""The operator's examples work as shipped: every config in examples/config loads through
the real settings table, the systemd units pass `systemd-analyze verify`, and
examples/warm-hosts.sh warms a model on a list of hosts through a real agent (ssh
replaced by a script that runs the command here: no ssh server on the test machine),
JOBS at a time, with a summary."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agentkit import write_tree
from procs import agent_process

from peer.mirror_server import RepoSource, ThreadedMirror
from peer.settings import load_file, resolve

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_every_example_config_loads(tmp_path: Path) -> None:
    examples = sorted((ROOT / "examples/config").glob("*.toml"))
    assert {p.name for p in examples} >= {"office.toml", "lab.toml"}
    for path in examples:
        eff = resolve({}, {}, load_file(path))
        assert all(not v.source.startswith("env:HFSWARM") for v in eff.values.values())
        assert eff["local_listen"][0] == "127.0.0.1", path  # the CLI's API stays local
    office = resolve({}, {}, load_file(ROOT / "examples/config/office.toml"))
    assert office["mdns"] is True and office["trackers"] == ()
    lab = resolve({}, {}, load_file(ROOT / "examples/config/lab.toml"))
    assert lab["mdns"] is False and lab["trackers"] and lab["mdns_interfaces"] == ()


@pytest.mark.parametrize("unit", ["hfswarm-agent.service", "hfswarm-tracker.service"])
def test_the_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: package systemd)")
    text = (ROOT / "examples/systemd" / unit).read_text()
    assert "ExecStart=/opt/hfswarm/bin/hfswarm " in text
    # verify checks that ExecStart exists: point it at this Python (an executable).
    copy = write(tmp_path / unit, text.replace("/opt/hfswarm/bin/hfswarm", sys.executable))
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and bad values are only warnings (exit 0): none may name the unit.
    complaints = [line for line in done.stderr.splitlines() if unit in line]
    assert done.returncode == 0 and not complaints, done.stderr
    for key in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert key in text
    if unit == "hfswarm-agent.service":
        for key in ("User=hfswarm", "Environment=HF_HOME=/var/lib/hfswarm/", "ProtectHome=yes"):
            assert key in text
        assert "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK" in text


# `ssh HOST COMMAND` for the test: hosts named good* run COMMAND here, others are
# unreachable as with ssh (exit 255). Each call notes how many run at once.
FAKE_SSH = """#!/usr/bin/env bash
host=$1
mkdir "$RUNS/now.$host"
echo "$(ls -d "$RUNS"/now.* | wc -l)" >>"$RUNS/concurrency"
sleep "${DELAY:-0}"
case $host in
    good*) bash -c "$2"; code=$? ;;
    *) echo "ssh: connect to host $host port 22: Connection refused" >&2; code=255 ;;
esac
rmdir "$RUNS/now.$host"
exit $code
"""


def warm(
    tmp: Path, hosts: list[str], *args: str, jobs: int, delay: float = 0
) -> tuple[subprocess.CompletedProcess[str], int]:
    ssh = write(tmp / "fake-ssh", FAKE_SSH)
    ssh.chmod(0o755)
    runs = tmp / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    hosts_file = write(tmp / "hosts.txt", "# the lab\n" + "\n".join(hosts) + "\n\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFSWARM_"))}
    env |= {
        "SSH": str(ssh), "RUNS": str(runs), "JOBS": str(jobs), "DELAY": str(delay),
        "HFSWARM": f"{sys.executable} -m peer.cli.main", "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    done = subprocess.run(
        ["bash", str(ROOT / "examples/warm-hosts.sh"), str(hosts_file), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    counts = runs / "concurrency"
    peak = max(int(n) for n in counts.read_text().split()) if counts.exists() else 0
    return done, peak


async def test_warm_hosts_warms_every_host_through_its_agent_and_sums_up(
    tmp_path: Path,
) -> None:
    files = {"config.json": b'{"a": 1}', "weights.bin": b"w" * 200_000}
    src = write_tree(tmp_path / "src", files)
    with ThreadedMirror([RepoSource("model", "org/m", src)]) as m:
        async with agent_process(tmp_path / "a", "127.0.0.8", m.url) as a:
            done, peak = await asyncio.to_thread(
                warm, tmp_path, ["good1", "bad1", "good2"], "org/m", "--agent", a.local_url,
                jobs=2,
            )  # fmt: skip
    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stderr
    assert lines[-1] == "2 ok, 1 failed, of 3 hosts"
    assert lines[1] == (
        "FAIL  bad1  exit 255: ssh: connect to host bad1 port 22: Connection refused"
    )
    for line in (lines[0], lines[2]):
        status, host, path = line.split()
        assert status == "ok" and host.startswith("good")
        snapshot = Path(path)
        assert snapshot.is_relative_to(tmp_path / "a/cache")  # the agent's cache
        assert (snapshot / "weights.bin").read_bytes() == files["weights.bin"]
    assert peak <= 2


def test_warm_hosts_runs_jobs_hosts_at_once(tmp_path: Path) -> None:
    hosts = [f"down{i}" for i in range(6)]
    done, peak = warm(tmp_path, hosts, "org/m", jobs=2, delay=0.5)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "0 ok, 6 failed, of 6 hosts"
    assert peak == 2  # in parallel, and never more than JOBS
    done, peak = warm(tmp_path, ["good"], "org/m", jobs=0)
    assert done.returncode == 2 and "JOBS=0 is not a positive number" in done.stderr
