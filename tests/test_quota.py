"""The cache quota, pins, prefetch and the seeding policy, with real agents (separate
processes, `hfswarm agent`), the project's mirror and the real CLI; huggingface_hub's
`scan_cache_dir` judges the cache after every eviction."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agentkit import write_tree
from huggingface_hub import hf_hub_download, scan_cache_dir
from huggingface_hub.errors import HfHubHTTPError
from procs import AgentProcess, agent_process

from peer.agent.quota import PinSpec
from peer.errors import ConfigError
from peer.mirror_server import MirrorServer, RepoSource

MB = 1_000_000


def repo(folder: Path, seed: int, **sizes: int) -> Path:
    rnd = random.Random(seed)
    return write_tree(folder, {f"{name}.bin": rnd.randbytes(n) for name, n in sizes.items()})


async def hf(*args: str) -> tuple[int, str, str]:
    """The CLI as users run it (this worktree's code)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "peer.cli.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def status(a: AgentProcess) -> dict[str, Any]:
    code, out, err = await hf("status", "--agent", a.local_url, "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def listing(cache: Path) -> dict[str, str]:
    """Every entry of the cache: a file's size, a link's target, a folder."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(cache):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(cache))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = f"{p.stat().st_size} bytes"
    return out


def blobs_of(cache: Path, name: str) -> set[str]:
    folder = cache / f"models--org--{name}" / "blobs"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def consistent(cache: Path) -> Any:
    """huggingface_hub sees a clean cache: no warnings, no dangling snapshot link."""
    info = scan_cache_dir(cache)
    assert info.warnings == [], info.warnings
    for link in cache.glob("*/snapshots/*/**/*"):
        assert not link.is_symlink() or link.exists(), f"dangling {link}"
    return info


@pytest.mark.parametrize(
    ("text", "repo_type", "expected"),
    [
        ("org/m", "model", PinSpec("model", "org/m")),
        ("org/m@v1.0", "model", PinSpec("model", "org/m", "v1.0")),
        ("org/m@refs/pr/3", "dataset", PinSpec("dataset", "org/m", "refs/pr/3")),
        ("gpt2", "model", PinSpec("model", "gpt2")),
    ],
)
def test_pin_spec_parses(text: str, repo_type: str, expected: PinSpec) -> None:
    pin = PinSpec.parse(text, repo_type)
    assert pin == expected and PinSpec.from_json(pin.to_json()) == pin


@pytest.mark.parametrize(
    "text", ["", "a/b/c", "org/", "../x", "org/m@", "org/m@../../etc", "org/a--b", "org/m@a//b"]
)
def test_pin_spec_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a repo to pin"):
        PinSpec.parse(text)


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[MirrorServer]:
    src = tmp_path / "src"
    repos = {
        "a": repo(src / "a", 1, weights=4 * MB),
        "b": repo(src / "b", 2, weights=2 * MB),
        "c": repo(src / "c", 3, weights=2 * MB),
        "d": repo(src / "d", 4, tiny=200_000, weights=3 * MB),
        "e": repo(src / "e", 5, weights=3 * MB),
        "f": repo(src / "f", 6, weights=3 * MB),
        "g": repo(src / "g", 7, weights=7 * MB),
    }
    async with MirrorServer([RepoSource("model", f"org/{n}", p) for n, p in repos.items()]) as m:
        yield m


async def test_quota_evicts_lru_never_pinned_or_in_use_and_refuses_what_cannot_fit(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    cache = tmp_path / "a" / "cache"
    async with agent_process(
        tmp_path / "a", "127.0.0.2", mirror.url, "--cache-max-size", "10MB"
    ) as a:
        agent = ["--agent", a.local_url]

        async def download(name: str) -> tuple[int, str, str]:
            return await hf("download", f"org/{name}", *agent, "--quiet")

        assert (await download("a"))[0] == 0
        code, out, err = await hf("pin", "org/a", *agent)
        assert code == 0 and "pinned" in out, err
        for name in ("b", "c"):
            assert (await download(name))[0] == 0
        # 8 MB held; e (3 MB) makes 11 > 10: b, the least recently used unpinned, goes
        assert (await download("e"))[0] == 0
        assert blobs_of(cache, "b") == set() and not (cache / "models--org--b").exists()
        assert blobs_of(cache, "a") and blobs_of(cache, "c") and blobs_of(cache, "e")
        consistent(cache)
        assert (await status(a))["cache_bytes"] == 9 * MB
        code, out, _ = await hf("status", *agent)
        assert "cache 9.0 MB of 10.0 MB quota   seeding always" in out, out

        # g (7 MB) cannot fit: a is pinned, c + e free only 5 MB. Refused before
        # anything moved, with the sizes, and the cache exactly as it was.
        before = listing(cache)
        code, _, err = await download("g")
        assert code == 5, err
        assert "org/g@main needs 7.0 MB more" in err and "10.0 MB quota" in err, err
        assert "pinned or in use" in err and "--cache-max-size" in err, err
        assert listing(cache) == before
        # prefetch is refused the same way, at once
        code, _, err = await hf("prefetch", "org/g", *agent)
        assert code == 5 and "needs 7.0 MB more" in err, err
        assert listing(cache) == before
        # and a Hub client through HF_ENDPOINT hears 507 with the reason
        with pytest.raises(HfHubHTTPError) as refused:
            await asyncio.to_thread(
                hf_hub_download,
                "org/g",
                "weights.bin",
                endpoint=a.local_url,
                cache_dir=tmp_path / "client",
            )
        assert refused.value.response.status_code == 507
        assert "needs 7.0 MB more" in str(refused.value), refused.value
        assert listing(cache) == before

        # d downloads slowly (mirror cap 1 MB/s); once its small file is in, the cache
        # holds a (pinned, 4) + d's tiny blob (in use): f (3 MB) would need one of them.
        code, out, err = await hf("limits", "--mirror", "1MB/s", *agent)
        assert code == 0 and "1.0 MB/s" in out, err
        slow = asyncio.create_task(download("d"))
        try:
            async with asyncio.timeout(20):
                while len(blobs_of(cache, "d")) < 1:
                    assert not slow.done(), await slow
                    await asyncio.sleep(0.05)
            assert blobs_of(cache, "c") == set() and blobs_of(cache, "e") == set()  # LRU, for d
            code, _, err = await download("f")
            assert code == 5 and "needs 3.0 MB more" in err, err
            assert not slow.done(), "d should still be on its way"
            tiny = blobs_of(cache, "d")
        finally:
            code, _, err = await slow
        assert code == 0, err
        assert tiny <= blobs_of(cache, "d") and len(blobs_of(cache, "d")) == 2
        consistent(cache)

        # d done (no longer in use): f now evicts d's weights (its least recently used,
        # larger blob), leaving d's snapshot with the file it still has
        assert (await hf("limits", "--mirror", "0", *agent))[0] == 0
        code, _, err = await download("f")
        assert code == 0, err
        assert blobs_of(cache, "d") == tiny and blobs_of(cache, "a") and blobs_of(cache, "f")
        info = consistent(cache)
        repos = {r.repo_id: r for r in info.repos}
        assert set(repos) == {"org/a", "org/d", "org/f"}
        (d_rev,) = repos["org/d"].revisions
        assert [f.file_name for f in d_rev.files] == ["tiny.bin"]
        assert (await status(a))["cache_bytes"] == 4 * MB + 200_000 + 3 * MB

        # pins are kept in the state dir and listed; unpinned, a may go too
        code, out, _ = await hf("pins", *agent)
        assert out.split() == ["org/a"]
        assert json.loads((tmp_path / "a/state/pins.json").read_text())[0]["repo_id"] == "org/a"
        code, out, _ = await hf("unpin", "org/a", *agent)
        assert code == 0 and "unpinned" in out
        assert (await download("g"))[0] == 0  # 7 MB: a (least recently used) goes
        assert blobs_of(cache, "a") == set() and blobs_of(cache, "g")
        consistent(cache)


async def test_prefetch_warms_the_cache_without_waiting(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    cache = tmp_path / "a" / "cache"
    async with agent_process(tmp_path / "a", "127.0.0.3", mirror.url) as a:
        assert (await hf("limits", "--mirror", "2MB/s", "--agent", a.local_url))[0] == 0
        code, _, err = await hf("prefetch", "org/e", "--agent", a.local_url)
        assert code == 0, err
        assert "the agent is fetching it" in err
        # returned before the 3 MB at 2 MB/s could have moved
        assert not (cache / "models--org--e" / "refs" / "main").exists()
        async with asyncio.timeout(20):
            while not (cache / "models--org--e" / "refs" / "main").exists():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        snap = next((cache / "models--org--e" / "snapshots").iterdir())
        assert (snap / "weights.bin").read_bytes() == (tmp_path / "src/e/weights.bin").read_bytes()
        consistent(cache)
        # --wait follows it to the end
        code, out, err = await hf("prefetch", "org/c", "--wait", "--agent", a.local_url)
        assert code == 0, err
        assert Path(out.strip()).joinpath("weights.bin").stat().st_size == 2 * MB


async def test_seeding_none_and_pinned(tmp_path: Path, mirror: MirrorServer) -> None:
    total = 3 * MB + 200_000
    async with (
        agent_process(tmp_path / "n", "127.0.0.4", mirror.url, "--seeding", "none") as n,
        agent_process(tmp_path / "p", "127.0.0.5", mirror.url, "--seeding", "pinned") as p,
    ):
        for holder in (n, p):
            code, _, err = await hf("download", "org/d", "--agent", holder.local_url, "--quiet")
            assert code == 0, err
            assert (await status(holder))["seeded_blobs"] == 0
        mirror.reset_stats()
        # another agent finds no holder: everything comes from the mirror
        async with agent_process(
            tmp_path / "x", "127.0.0.6", mirror.url, peers=[n.peer_addr, p.peer_addr]
        ) as x:
            code, _, err = await hf("download", "org/d", "--agent", x.local_url)
            assert code == 0, err
            assert mirror.stats().blob_bytes == total
            assert "0 B from peers" in err, err
        # pinned on p: p seeds it, the next agent takes it from p
        code, _, err = await hf("pin", "org/d", "--agent", p.local_url)
        assert code == 0, err
        assert (await status(p))["seeded_blobs"] == 2
        assert (await status(n))["seeded_blobs"] == 0
        mirror.reset_stats()
        async with agent_process(
            tmp_path / "y", "127.0.0.7", mirror.url, peers=[n.peer_addr, p.peer_addr]
        ) as y:
            code, _, err = await hf("download", "org/d", "--agent", y.local_url)
            assert code == 0, err
            assert mirror.stats().blob_bytes == 0, err
        # unpinned: no longer offered
        assert (await hf("unpin", "org/d", "--agent", p.local_url))[0] == 0
        assert (await status(p))["seeded_blobs"] == 0
