"""olah 0.5.x (a third-party Hub mirror, from the `clients` test extra) in front of the
project's mirror on loopback: as the `--mirror` of an agent that real clients use as
HF_ENDPOINT, and as the `--mirror` of `hfswarm download` (with and without an agent).
Each runs online, then with the project's mirror stopped (olah answers 504), then with
olah restarted offline (serving its cache), then with olah stopped too.

olah runs as users run it (`python -m olah.server -c olah.toml`), in a process of its
own, always killed at the end; its repos and logs live in tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from agentkit import agent, config, endpoint, tree_of, write_tree
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
from test_real_clients import run_client, tokenizer_files

from peer.mirror_server import MirrorServer, RepoSource

REPO = "acme/olah-tiny"
ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, even by SIGKILL itself."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Olah:
    """olah on one loopback port with one repos folder, proxying (and caching) the
    project's mirror over plain HTTP; started again offline (what an operator does when
    the upstream is gone), it serves what it cached."""

    def __init__(self, root: Path, upstream: str) -> None:
        self.root = root
        self.upstream = upstream.removeprefix("http://")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    def _config(self, offline: bool) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "olah.toml"
        path.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.root / "repos"}"\n'
            # The upstream is the project's mirror: plain HTTP, LFS on the same origin.
            f'hf-scheme = "http"\nhf-netloc = "{self.upstream}"\n'
            f'hf-lfs-netloc = "{self.upstream}"\n'
            f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            f"[accessibility]\noffline = {str(offline).lower()}\n"
        )
        return path

    async def start(self, *, offline: bool = False) -> None:
        """`python -m olah.server -c olah.toml`; returns once it answers HTTP."""
        conf = await asyncio.to_thread(self._config, offline)
        log = self.root / "olah.log"
        out = await asyncio.to_thread(open, log, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "olah.server", "-c", str(conf),
                "--log-path", str(self.root / "logs"),
                cwd=self.root, stdout=out, stderr=out, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        finally:
            out.close()
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                if self.proc.returncode is not None:
                    raise AssertionError(f"olah exited: {log.read_text()[-3000:]}")
                try:
                    async with s.get(self.url + "/", timeout=aiohttp.ClientTimeout(total=2)):
                        return
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.1)
        raise AssertionError(f"olah did not answer: {log.read_text()[-3000:]}")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: uvicorn and all
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


@asynccontextmanager
async def olah(root: Path, upstream: str) -> AsyncIterator[Olah]:
    """olah started online on a free loopback port; always stopped at the end."""
    o = Olah(root, upstream)
    try:
        await o.start()
        yield o
    finally:
        await o.stop()


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


PHASES = ("online", "no-upstream", "olah-offline", "no-olah")


async def next_phase(phase: str, mirror: MirrorServer, o: Olah) -> None:
    """From one phase to the next: the project's mirror goes away, then olah is started
    again offline (serving what it cached), then olah goes away too."""
    if phase == "online":
        await mirror.close()
    elif phase == "no-upstream":
        await o.stop()
        await o.start(offline=True)
    elif phase == "olah-offline":
        await o.stop()


async def test_olah_as_the_agents_mirror_then_without_upstream_then_without_olah(
    tmp_path: Path,
) -> None:
    files = repo_files()
    src = write_tree(tmp_path / "src", files)
    expected = [files, files["model.safetensors"], {"model_type": "gpt2", "ids": [1, 2, 0]}]
    mirror = MirrorServer([RepoSource("model", REPO, src)])
    await mirror.start()
    try:
        commit = mirror.commit_of("model", REPO)
        async with (
            olah(tmp_path / "olah", mirror.url) as o,
            agent(config(tmp_path / "a", "127.0.0.2", (o.url,))) as a,
            # Starts empty once olah is offline: all it gets, it gets from olah's cache,
            # whose ETag for a git file (``"<md5>-<n>"``) names no content.
            contextlib.AsyncExitStack() as later,
        ):
            agents = [a]
            for phase in PHASES:
                if phase == "olah-offline":
                    agents.append(
                        await later.enter_async_context(
                            agent(config(tmp_path / "b", "127.0.0.3", (o.url,)))
                        )
                    )
                for n, x in enumerate(agents):
                    hf, home = endpoint(x), tmp_path / f"{phase}-{n}"
                    got = await asyncio.gather(
                        asyncio.to_thread(hub_snapshot, hf, home / "snap"),
                        asyncio.to_thread(hub_file, hf, home / "one", "model.safetensors"),
                        run_client(LOAD_MODEL, hf, home / "home"),
                    )
                    assert got == expected, (phase, n)
                if phase == "online":
                    # Everything came through olah, and the agent keeps a cache that
                    # huggingface_hub reads, with the revision recorded for later.
                    assert mirror.stats().requests > 0
                    assert_cache_holds(tmp_path / "a/cache", files, commit)
                    best = a.revisions.book.best("model", REPO, "main")
                    assert best is not None and best.commit == commit
                if phase == "olah-offline":
                    assert_cache_holds(tmp_path / "b/cache", files, commit)
                await next_phase(phase, mirror, o)
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
        folder = f"models--{REPO.replace('/', '--')}/snapshots/{commit}"
        own, fresh = tmp_path / "own-cache", tmp_path / "fresh-cache"
        async with (
            olah(tmp_path / "olah", mirror.url) as o,
            agent(config(tmp_path / "a", "127.0.0.2", (o.url,))) as a,
        ):
            for phase in PHASES:
                runs = [
                    (own, cli_download(own, "--no-agent", "--mirror", o.url)),
                    (tmp_path / "a/cache", cli_download(None, "--agent", endpoint(a))),
                ]
                if phase == "olah-offline":  # all of it from olah's cache
                    runs.append((fresh, cli_download(fresh, "--no-agent", "--mirror", o.url)))
                results = await asyncio.gather(*(run for _, run in runs))
                for (cache, _), (code, out, err) in zip(runs, results, strict=True):
                    assert code == 0, (phase, cache, err)
                    assert out.strip().splitlines()[-1] == str(cache / folder), (phase, out)
                    assert tree_of(cache / folder) == files, phase
                    assert_cache_holds(cache, files, commit)
                alone = results[0][2]
                if phase == "online":
                    assert "3.1 MB from the mirror" in alone, alone
                else:  # the second time round everything is already local, and says so
                    assert "0 B from the mirror, 3.1 MB already local" in alone, (phase, alone)
                if phase == "olah-offline":
                    assert "3.1 MB from the mirror" in results[2][2], results[2][2]
                await next_phase(phase, mirror, o)
            # As `hf download` does: while no mirror answers, the cached snapshot is the
            # answer, with a warning that says so.
            assert "cannot reach" in alone and "using the cached snapshot" in alone, alone
    finally:
        await mirror.close()
