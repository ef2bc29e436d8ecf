"""`hfswarm download` with a running agent: flags the agent cannot honour (its mirrors
and its cache are its own; more connections or files at once than its own) are refused
with exit 2 and a message naming the agent's, never silently ignored; the same values as
the agent's pass, lower bounds are honoured per download; `--no-agent` downloads in this
process as asked."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from agentkit import agent, config, endpoint, tree_of, write_tree
from procs import agent_process

from peer.cli.main import main
from peer.mirror_server import RepoSource, ThreadedMirror

FILES = {"config.json": b'{"a": 1}', "weights.bin": b"w" * 300_000}


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["download", *args, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


async def test_mirror_and_cache_dir_an_agent_cannot_honour_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_tree(tmp_path / "src", FILES)
    with ThreadedMirror([RepoSource("model", "org/m", src)]) as m:
        async with agent(config(tmp_path / "a", "127.0.0.6", m.url)) as a:
            url = ["--agent", endpoint(a)]
            own_cache = str(a.config.hub.cache_dir)
            other_cache = tmp_path / "mine"

            code, out, err = await cli(capsys, "org/m", *url, "--mirror", "http://127.0.0.9:1")
            assert code == 2 and out == ""
            assert f"mirrors {m.url}" in err and own_cache in err  # names the agent's
            assert "--mirror" in err and "--no-agent" in err  # what to do instead
            code, _, err = await cli(capsys, "org/m", *url, "--cache-dir", str(other_cache))
            assert code == 2 and "cannot honour --cache-dir" in err
            assert a.totals.downloads == 0 and not other_cache.exists()

            # The agent's own values are no conflict.
            code, out, err = await cli(
                capsys, "org/m", *url, "--mirror", m.url + "/", "--cache-dir", own_cache
            )
            assert code == 0, err
            assert Path(out.strip()).is_relative_to(a.config.hub.cache_dir)
            assert a.totals.downloads == 1

            # Without the agent, as asked: this process, from the named mirror, into the
            # named cache.
            code, out, err = await cli(
                capsys, "org/m", "--no-agent", "--mirror", m.url, "--cache-dir", str(other_cache)
            )
            assert code == 0, err
            snap = Path(out.strip())
            assert snap.is_relative_to(other_cache)
            assert (snap / "weights.bin").read_bytes() == FILES["weights.bin"]
            assert a.totals.downloads == 1


MiB = 1 << 20


def hfswarm_download(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as users run it, against a running agent (this worktree's code)."""
    return subprocess.run(
        [sys.executable, "-m", "peer.cli.main", "download", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def job_seconds(stderr: str) -> float:
    """The agent's own time for the download (the summary line), without CLI startup."""
    found = re.search(r" in ([\d.]+) s:", stderr)
    assert found, stderr
    return float(found.group(1))


async def test_connections_and_max_workers_bound_an_agents_download_or_are_refused(
    tmp_path: Path,
) -> None:
    # Each mirror connection sends at most 2 MiB/s: two 4 MiB files (1 MiB chunks) take
    # 0.5 s over the agent's 4 connections each, and at least 4 s over one connection
    # for one file at a time. The rate cap is a hard lower bound; the upper bound for
    # the agent's own parallelism leaves 5x of room.
    rnd = random.Random(7)
    files = {name: rnd.randbytes(4 * MiB) for name in ("a.bin", "b.bin")}
    other = {name: rnd.randbytes(4 * MiB) for name in ("a.bin", "b.bin")}
    repos = [
        RepoSource("model", "org/fast", write_tree(tmp_path / "fast", files)),
        RepoSource("model", "org/slow", write_tree(tmp_path / "slow", other)),
    ]
    with ThreadedMirror(repos, rate_cap=2 * MiB) as m:
        async with agent_process(tmp_path / "a", "127.0.0.7", m.url, "--connections", "4") as a:
            url = ["--agent", a.local_url]
            status = await asyncio.to_thread(
                lambda: json.loads(
                    subprocess.run(
                        [sys.executable, "-m", "peer.cli.main", "status", "--json", *url],
                        capture_output=True,
                        text=True,
                        timeout=60,
                        check=True,
                    ).stdout
                )
            )
            assert (status["connections"], status["max_files"]) == (4, 4)

            # More than the agent allows: refused, nothing fetched.
            for flags in (["--connections", "8"], ["--max-workers", "9"]):
                done = await asyncio.to_thread(hfswarm_download, "org/slow", *url, *flags)
                assert done.returncode == 2, done.stderr
                assert f"cannot honour {' '.join(flags)}" in done.stderr
                assert "at most 4 connections per file and 4 files at once" in done.stderr
                assert "--no-agent" in done.stderr
            assert m.stats().blob_bytes == 0

            fast = await asyncio.to_thread(hfswarm_download, "org/fast", *url)
            assert fast.returncode == 0, fast.stderr
            slow = await asyncio.to_thread(
                hfswarm_download, "org/slow", *url, "--connections", "1", "--max-workers", "1"
            )
            assert slow.returncode == 0, slow.stderr
            snap = Path(slow.stdout.strip().splitlines()[-1])
            assert tree_of(snap) == other
            t_fast, t_slow = job_seconds(fast.stderr), job_seconds(slow.stderr)
            print(f"agent's own bounds: {t_fast:.2f} s; 1 connection, 1 file: {t_slow:.2f} s")
            assert t_slow >= 3.5, "the lowered bounds were not honoured"
            assert t_fast < 2.5, "the agent's own parallelism was lost"
