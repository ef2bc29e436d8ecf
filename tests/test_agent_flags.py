"""`hfswarm download` with a running agent: flags the agent cannot honour (its mirrors
and its cache are its own) are refused with exit 2 and a message naming the agent's,
never silently ignored; the same values as the agent's pass; `--no-agent` downloads
in this process as asked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from agentkit import agent, config, endpoint, write_tree

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
