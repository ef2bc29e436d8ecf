"""olah 0.5.x (a third-party Hub mirror, from the `clients` test extra) in front of the
project's mirror on loopback: as the `--mirror` of an agent that real clients use as
HF_ENDPOINT, and as the `--mirror` of `hfswarm download` (with and without an agent).
Each runs online, then with the project's mirror stopped, then with olah stopped too.

olah runs as users run it (`python -m olah.server -c olah.toml`), in a process of its
own, always killed at the end; its repos and logs live in tmp_path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from agentkit import agent, config, endpoint, tree_of, write_tree
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
from test_real_clients import run_client, tokenizer_files

from peer.mirror_server import MirrorServer, RepoSource

REPO = "acme/olah-tiny"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Olah:
    proc: asyncio.subprocess.Process
    url: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def olah(root: Path, upstream: str) -> AsyncIterator[Olah]:
    """olah on a free loopback port, proxying (and caching) `upstream` over plain HTTP;
    yields once it answers HTTP."""
    port = _free_port()
    netloc = upstream.removeprefix("http://")
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    toml = (
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{root / "repos"}"\n'
        # The upstream is the project's mirror: plain HTTP, LFS on the same origin.
        f'hf-scheme = "http"\nhf-netloc = "{netloc}"\nhf-lfs-netloc = "{netloc}"\n'
        f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
    )
    await asyncio.to_thread((root / "olah.toml").write_text, toml)
    log = root / "olah.log"
    out = await asyncio.to_thread(open, log, "ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "olah.server", "-c", str(root / "olah.toml"),
            "--log-path", str(root / "logs"),
            cwd=root, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    finally:
        out.close()
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                assert proc.returncode is None, f"olah exited: {log.read_text()[-3000:]}"
                try:
                    async with s.get(url + "/", timeout=aiohttp.ClientTimeout(total=2)):
                        break
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"olah did not answer: {log.read_text()[-3000:]}")
        yield Olah(proc, url, log)
    finally:
        await stop_olah(proc)


async def stop_olah(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def repo_files() -> dict[str, bytes]:
    """One LFS file (several Range blocks), a small git blob, one in a folder, and the
    config and tokenizer transformers loads."""
    return {
        "model.safetensors": random.Random(5).randbytes(3 * 1024 * 1024 + 11),
        "config.json": json.dumps(
            {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 3}
        ).encode(),
        "sub/notes.txt": b"notes\n",
        **tokenizer_files(),
    }


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def assert_cache_holds(cache: Path, files: dict[str, bytes], commit: str) -> None:
    """Every blob named by its hash (sha256 for LFS, git sha1 otherwise), and the cache
    read by huggingface_hub itself: its scan, and downloads with no network."""
    blobs = cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    for blob in blobs.iterdir():
        data = blob.read_bytes()
        want = hashlib.sha256(data).hexdigest() if len(blob.name) == 64 else git_blob_id(data)
        assert blob.name == want, blob
    ids = {
        hashlib.sha256(d).hexdigest() if p.endswith(".safetensors") else git_blob_id(d)
        for p, d in files.items()
    }
    assert {b.name for b in blobs.iterdir()} == ids
    (repo,) = scan_cache_dir(cache).repos
    assert repo.repo_id == REPO and repo.nb_files == len(files)
    (rev,) = repo.revisions
    assert rev.commit_hash == commit and rev.refs == frozenset({"main"})
    for path, data in files.items():
        got = hf_hub_download(REPO, path, cache_dir=cache, local_files_only=True)
        assert Path(got).read_bytes() == data, path


async def cli_download(cache: Path | None, *args: str) -> tuple[int, str, str]:
    """`hfswarm download REPO ...` as a user runs it (from this worktree's code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFSWARM_"))}
    env["PYTHONPATH"] = str(ROOT)
    extra = ("--cache-dir", str(cache)) if cache else ()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "peer.cli.main", "download", REPO, *extra, *args,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def hub_snapshot(hf: str, cache: Path) -> dict[str, bytes]:
    return tree_of(Path(snapshot_download(REPO, endpoint=hf, cache_dir=cache, token=False)))


def hub_file(hf: str, cache: Path, path: str) -> bytes:
    return Path(hf_hub_download(REPO, path, endpoint=hf, cache_dir=cache, token=False)).read_bytes()


LOAD_MODEL = f"""
import json
from transformers import AutoConfig, AutoTokenizer
c = AutoConfig.from_pretrained({REPO!r})
t = AutoTokenizer.from_pretrained({REPO!r})
print(json.dumps({{"model_type": c.model_type, "ids": t("hello world unknown")["input_ids"]}}))
"""


async def test_olah_as_the_agents_mirror_then_without_upstream_then_without_olah(
    tmp_path: Path,
) -> None:
    files = repo_files()
    src = write_tree(tmp_path / "src", files)
    mirror = MirrorServer([RepoSource("model", REPO, src)])
    await mirror.start()
    try:
        commit = mirror.commit_of("model", REPO)
        async with (
            olah(tmp_path / "olah", mirror.url) as o,
            agent(config(tmp_path / "a", "127.0.0.2", (o.url,))) as a,
        ):
            hf = endpoint(a)
            expected_model = {"model_type": "gpt2", "ids": [1, 2, 0]}
            for phase in ("online", "no-upstream", "no-olah"):
                got = await asyncio.gather(
                    asyncio.to_thread(hub_snapshot, hf, tmp_path / f"{phase}/snap"),
                    asyncio.to_thread(hub_file, hf, tmp_path / f"{phase}/one", "model.safetensors"),
                    run_client(LOAD_MODEL, hf, tmp_path / f"{phase}/home"),
                )
                assert got == [files, files["model.safetensors"], expected_model], phase
                if phase == "online":
                    # Everything came through olah, and the agent keeps a cache that
                    # huggingface_hub reads, with the revision recorded for later.
                    assert mirror.stats().requests > 0
                    assert_cache_holds(tmp_path / "a/cache", files, commit)
                    best = a.revisions.book.best("model", REPO, "main")
                    assert best is not None and best.commit == commit
                    await mirror.close()
                elif phase == "no-upstream":
                    await stop_olah(o.proc)
    finally:
        await mirror.close()


async def test_olah_as_the_mirror_of_hfswarm_download_with_and_without_an_agent(
    tmp_path: Path,
) -> None:
    files = repo_files()
    src = write_tree(tmp_path / "src", files)
    mirror = MirrorServer([RepoSource("model", REPO, src)])
    await mirror.start()
    try:
        commit = mirror.commit_of("model", REPO)
        own = tmp_path / "own-cache"
        async with (
            olah(tmp_path / "olah", mirror.url) as o,
            agent(config(tmp_path / "a", "127.0.0.2", (o.url,))) as a,
        ):
            snap_own = own / f"models--{REPO.replace('/', '--')}/snapshots/{commit}"
            snap_agent = tmp_path / f"a/cache/models--{REPO.replace('/', '--')}/snapshots/{commit}"
            for phase in ("online", "no-upstream", "no-olah"):
                alone, via_agent = await asyncio.gather(
                    cli_download(own, "--no-agent", "--mirror", o.url),
                    cli_download(None, "--agent", endpoint(a)),
                )
                for (code, out, err), snap in ((alone, snap_own), (via_agent, snap_agent)):
                    assert code == 0, (phase, err)
                    assert out.strip().splitlines()[-1] == str(snap), (phase, out)
                    assert tree_of(snap) == files, phase
                if phase == "online":
                    assert " 0 B from the mirror" not in alone[2], alone[2]
                    assert_cache_holds(own, files, commit)
                    assert_cache_holds(tmp_path / "a/cache", files, commit)
                    await mirror.close()
                else:
                    # The second time round everything is already local, and says so.
                    assert "0 B from the mirror" in alone[2], (phase, alone[2])
                    assert_cache_holds(own, files, commit)
                if phase == "no-upstream":
                    await stop_olah(o.proc)
            # As `hf download` does, the cached snapshot is the answer while no mirror
            # answers, with a warning that says so.
            assert "cannot reach" in alone[2] and "cached" in alone[2], alone[2]
    finally:
        await mirror.close()
