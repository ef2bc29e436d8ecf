"""`hfswarm download` against the project's mirror on 127.0.0.1: the foundation issue.

Everything here goes through real sockets, the real CLI entry point, and the real
huggingface_hub reading back what we wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

from peer.cli.main import main
from peer.hub.metadata import RemoteFile, Snapshot
from peer.mirror_server import Fault, RepoSource, ThreadedMirror
from peer.verification.hashing import BlobHasher, HashKind

MiB = 1 << 20


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_repo(folder: Path, big: int = 8 * MiB, seed: int = 1) -> Path:
    rnd = __import__("random").Random(seed)
    write(folder / "config.json", b'{"model_type": "test", "seed": %d}' % seed)
    write(folder / "model.safetensors", rnd.randbytes(big))
    write(folder / "nested/deeper/notes.txt", b"hello from a nested path\n")
    write(folder / "tokenizer.json", b'{"version": "1.0"}')
    return folder


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def _snapshot(mirror_url: str, repo: str, files: Iterable[RemoteFile]) -> Snapshot:
    """``repo``'s main revision on the test mirror, as a `Snapshot` of ``files``."""
    url = f"{mirror_url}/api/models/{repo}/revision/main"
    answer = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())
    return Snapshot("model", repo, "main", json.loads(answer)["sha"], tuple(files), mirror_url)


def blob_of(data: bytes, lfs: bool) -> str:
    h = BlobHasher(HashKind.SHA256 if lfs else HashKind.GIT_SHA1, len(data))
    h.update(data)
    return h.hexdigest()


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "src")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_download_is_read_back_by_huggingface_hub(
    repo_dir: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pr = make_repo(tmp_path / "pr", big=2 * MiB, seed=2)
    src = RepoSource("model", "org/tiny", repo_dir, revisions={"refs/pr/1": pr})
    with ThreadedMirror([src]) as m:
        code, out, err = run_cli(
            "download", "org/tiny", "--mirror", m.url, "--cache-dir", str(cache), capsys=capsys
        )
        assert code == 0, err
        snap = Path(out.strip().splitlines()[-1])
        commit = m.commit_of("model", "org/tiny")
        assert snap == cache / "models--org--tiny" / "snapshots" / commit
        for rel in ("config.json", "model.safetensors", "nested/deeper/notes.txt"):
            assert (snap / rel).read_bytes() == (repo_dir / rel).read_bytes()
            assert (snap / rel).is_symlink() and not os.readlink(snap / rel).startswith("/")
        ref = cache / "models--org--tiny" / "refs" / "main"
        assert ref.read_bytes() == commit.encode()  # no trailing newline

        code, out, err = run_cli(
            "download",
            "org/tiny",
            "--revision",
            "refs/pr/1",
            "--mirror",
            m.url,
            "--cache-dir",
            str(cache),
            "--quiet",
            capsys=capsys,
        )
        assert code == 0, err
        assert out.strip() == str(
            cache
            / "models--org--tiny"
            / "snapshots"
            / m.commit_of("model", "org/tiny", "refs/pr/1")
        )
        assert (cache / "models--org--tiny/refs/refs/pr/1").exists()

    # The real client, offline, finds everything we wrote.
    got = snapshot_download("org/tiny", cache_dir=cache, local_files_only=True)
    assert Path(got) == snap
    found = try_to_load_from_cache("org/tiny", "nested/deeper/notes.txt", cache_dir=cache)
    assert isinstance(found, str) and Path(found).read_bytes() == b"hello from a nested path\n"
    info = scan_cache_dir(cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == "org/tiny" and len(repo.revisions) == 2
    assert "main" in {r for rev in repo.revisions for r in rev.refs}


def test_files_include_exclude_and_local_dir(
    repo_dir: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ThreadedMirror([RepoSource("dataset", "org/data", repo_dir)]) as m:
        common = ["--repo-type", "dataset", "--mirror", m.url, "--cache-dir", str(cache)]
        code, out, _ = run_cli("download", "org/data", "config.json", *common, capsys=capsys)
        snap = Path(out.strip().splitlines()[-1])
        assert code == 0 and sorted(p.name for p in snap.iterdir()) == ["config.json"]

        code, out, _ = run_cli(
            "download",
            "org/data",
            "--include",
            "*.json",
            "--exclude",
            "tok*",
            *common,
            capsys=capsys,
        )
        assert code == 0 and sorted(p.name for p in snap.iterdir()) == ["config.json"]

        code, _, err = run_cli("download", "org/data", "missing.bin", *common, capsys=capsys)
        assert code == 2 and "missing.bin" in err

        local = tmp_path / "local"
        code, out, _ = run_cli(
            "download", "org/data", *common, "--local-dir", str(local), capsys=capsys
        )
        assert code == 0 and out.strip().splitlines()[-1] == str(local)
        assert (local / "model.safetensors").read_bytes() == (
            repo_dir / "model.safetensors"
        ).read_bytes()
        assert not (local / "model.safetensors").is_symlink()
        meta = local / ".cache/huggingface/download/model.safetensors.metadata"
        assert meta.read_text().splitlines()[0] == m.commit_of("dataset", "org/data")
        m.reset_stats()
        code, _, _ = run_cli(
            "download", "org/data", *common, "--local-dir", str(local), capsys=capsys
        )
        assert code == 0 and m.stats().blob_bytes == 0  # up to date: nothing refetched


def test_blob_shared_with_another_repo_is_not_refetched(
    repo_dir: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srcs = [RepoSource("model", "org/a", repo_dir), RepoSource("model", "org/b", repo_dir)]
    with ThreadedMirror(srcs) as m:
        args = ["--mirror", m.url, "--cache-dir", str(cache), "--quiet"]
        assert run_cli("download", "org/a", *args, capsys=capsys)[0] == 0
        first = m.stats().blob_bytes
        assert first >= 8 * MiB
        assert run_cli("download", "org/b", *args, capsys=capsys)[0] == 0
        assert m.stats().blob_bytes == first
    blob = blob_of((repo_dir / "model.safetensors").read_bytes(), lfs=True)
    assert (cache / "models--org--b/blobs" / blob).exists()


@pytest.mark.parametrize(
    "fault",
    [
        Fault("drop_after", path_glob="model.safetensors", after_bytes=300_000, times=3),
        Fault("status", status=429, retry_after=0.2, times=3),
        Fault("status", status=500, times=2),
        Fault("status", status=503, retry_after=0.1, times=4),
        Fault("stall", path_glob="model.safetensors", stall_seconds=30, times=1),
        Fault("corrupt", path_glob="model.safetensors", offset=5 * MiB + 7, times=1),
        Fault("ignore_range", times=None),
    ],
    ids=lambda f: f.kind + str(f.status if f.kind == "status" else ""),
)
def test_recovers_from_mirror_faults(
    fault: Fault,
    tmp_path: Path,
    cache: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    # 24 MiB: big enough that "the whole file once per connection" (what a downloader
    # that misses an ignored Range does) stands far above what closing sockets waste.
    repo_dir = make_repo(tmp_path / "src", big=24 * MiB)
    with ThreadedMirror([RepoSource("model", "org/tiny", repo_dir)]) as m:
        m.add_fault(fault)
        t0 = time.monotonic()
        code, out, err = run_cli(
            "download",
            "org/tiny",
            "--mirror",
            m.url,
            "--cache-dir",
            str(cache),
            "--connections",
            "4",
            capsys=capsys,
        )
        elapsed = time.monotonic() - t0
        assert code == 0, err
        data = (Path(out.strip().splitlines()[-1]) / "model.safetensors").read_bytes()
        assert data == (repo_dir / "model.safetensors").read_bytes()
        served = m.stats().blob_bytes
    total = sum(p.stat().st_size for p in repo_dir.rglob("*") if p.is_file())
    if fault.kind == "ignore_range":
        assert served < 2 * total, "a mirror ignoring Range must not send the file N times"
    elif fault.kind == "corrupt":
        assert served >= 2 * 24 * MiB  # the bad blob was thrown away and fetched again
    else:
        # Far below a second copy of the file: what a stream cut for a stealer had in
        # flight (on loopback, a few MiB of socket buffers each) is all that is extra.
        assert served < total + 8 * MiB
    if fault.kind == "stall":
        assert elapsed < 25  # the stalled connection was abandoned, not waited out


def test_corrupt_mirror_fails_cleanly_and_links_nothing(
    repo_dir: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ThreadedMirror([RepoSource("model", "org/tiny", repo_dir)]) as m:
        m.add_fault(Fault("corrupt", path_glob="model.safetensors", offset=123, times=None))
        code, _, err = run_cli(
            "download", "org/tiny", "--mirror", m.url, "--cache-dir", str(cache), capsys=capsys
        )
    assert code == 4 and "does not match" in err
    blob = blob_of((repo_dir / "model.safetensors").read_bytes(), lfs=True)
    blobs = cache / "models--org--tiny/blobs"
    assert not (blobs / blob).exists()
    assert all(
        p.name != "model.safetensors"
        for p in (cache / "models--org--tiny").rglob("*")
        if "snapshots" in p.parts
    )


def test_failover_to_second_mirror_and_unreachable_mirror(
    repo_dir: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = [RepoSource("model", "org/tiny", repo_dir)]
    with ThreadedMirror(src) as bad, ThreadedMirror(src) as good:
        bad.add_fault(Fault("status", status=503, times=None))
        code, _, err = run_cli(
            "download",
            "org/tiny",
            "--mirror",
            bad.url,
            "--mirror",
            good.url,
            "--cache-dir",
            str(cache),
            capsys=capsys,
        )
        assert code == 0, err
        assert good.stats().blob_bytes >= 8 * MiB
    code, _, err = run_cli(
        "download",
        "org/tiny",
        "--mirror",
        "http://127.0.0.1:9",
        "--cache-dir",
        str(cache / "x"),
        capsys=capsys,
    )
    assert code == 3 and "cannot reach http://127.0.0.1:9" in err


def test_no_mirror_answering_gives_the_cached_snapshot(
    repo_dir: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `hf download` does: the revision's snapshot as the cache holds it, when no
    mirror answers; an error when the cache cannot answer the request."""
    with ThreadedMirror([RepoSource("model", "org/tiny", repo_dir)]) as m:
        url = m.url
        args = ("download", "org/tiny", "--cache-dir", str(cache), "--mirror", url)
        code, out, err = run_cli(*args, "--include", "*.json", capsys=capsys)
        assert code == 0, err
        snap = out.strip().splitlines()[-1]
    gone = ("--cache-dir", str(cache), "--mirror", url)
    for extra in ((), ("--revision", Path(snap).name), ("config.json",), ("--include", "c*")):
        code, out, err = run_cli("download", "org/tiny", *extra, *gone, capsys=capsys)
        assert code == 0 and out.strip().splitlines()[-1] == snap, (extra, err)
    # Not in the cache: the mirror's failure, as before.
    for extra in (("model.safetensors",), ("--revision", "v2"), ("--local-dir", str(tmp_path))):
        code, _, err = run_cli("download", "org/tiny", *extra, *gone, capsys=capsys)
        assert code == 3 and f"cannot reach {url}" in err, (extra, err)


def test_gated_and_private_repos(
    repo_dir: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srcs = [
        RepoSource("model", "org/gated", repo_dir, gated=True),
        RepoSource("model", "org/private", repo_dir, private=True),
    ]
    with ThreadedMirror(srcs, tokens=["hf_good", "hf_nogate"], gated_tokens=["hf_good"]) as m:
        base = ["--mirror", m.url, "--cache-dir", str(cache)]
        code, _, err = run_cli("download", "org/gated", *base, capsys=capsys)
        assert code == 2 and "gated" in err.lower() and "token" in err
        code, _, err = run_cli(
            "download", "org/gated", *base, "--token", "hf_nogate", capsys=capsys
        )
        assert code == 2 and "gated" in err.lower()
        code, _, err = run_cli("download", "org/gated", *base, "--token", "hf_good", capsys=capsys)
        assert code == 0, err
        code, _, err = run_cli("download", "org/private", *base, capsys=capsys)
        assert code == 2 and "not found" in err and "token" in err
        code, _, err = run_cli(
            "download", "org/private", *base, "--token", "hf_good", capsys=capsys
        )
        assert code == 0, err
        code, _, err = run_cli("download", "org/nope", *base, capsys=capsys)
        assert code == 2 and "org/nope" in err
        code, _, err = run_cli("download", "org/gated", *base, "--revision", "v9", capsys=capsys)
        assert code == 2 and "v9" in err


def test_cross_origin_redirect_never_receives_the_token(
    repo_dir: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = [RepoSource("model", "org/private", repo_dir, private=True)]
    with ThreadedMirror(src, tokens=["hf_secret"], redirect="cross-origin") as m:
        code, _, err = run_cli(
            "download",
            "org/private",
            "--mirror",
            m.url,
            "--token",
            "hf_secret",
            "--cache-dir",
            str(cache),
            capsys=capsys,
        )
        assert code == 0, err
        stats = m.stats()
        assert stats.cdn_authorization_seen == 0
        assert stats.blob_bytes >= 8 * MiB  # bodies really came through the other origin


def test_kill_9_mid_download_resumes_without_refetching(tmp_path: Path, cache: Path) -> None:
    size = 48 * MiB
    src = make_repo(tmp_path / "big", big=size)
    with ThreadedMirror([RepoSource("model", "org/big", src)], rate_cap=4 * MiB) as m:
        cmd = [
            sys.executable,
            "-m",
            "peer.cli.main",
            "download",
            "org/big",
            "--mirror",
            m.url,
            "--cache-dir",
            str(cache),
            "--connections",
            "4",
            "--quiet",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while m.stats().blob_bytes < 0.6 * size:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = m.stats().blob_bytes
        m.reset_stats()
        m.set_rate_cap(None)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        second = m.stats().blob_bytes
    # the second run fetched what was missing plus at most the 4 chunks in flight (1 MiB
    # each) and what a cut stream had in flight (a resumed blob's first requests ask for
    # whole runs, the mirror's cost unknown; on loopback a cut wastes up to ~6 MiB of
    # socket buffers), far below the 48 MiB of a download that did not resume
    print(f"kill -9 at {first} of {size} bytes; second run fetched {second}")
    assert second <= size - first + 4 * MiB + 8 * MiB, (first, second)
    snap = Path(done.stdout.strip().splitlines()[-1])
    assert (snap / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_malicious_tree_entry_is_refused(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A hostile mirror: a tiny server whose tree names a file outside the snapshot.
    import asyncio
    import threading

    from aiohttp import web

    commit = "a" * 40
    tree = [{"type": "file", "oid": "b" * 40, "size": 3, "path": "../../x"}]

    async def revision(_: web.Request) -> web.Response:
        return web.json_response({"id": "org/evil", "sha": commit, "siblings": []})

    async def tree_(_: web.Request) -> web.Response:
        return web.json_response(tree)

    app = web.Application()
    app.router.add_get("/api/models/org/evil/revision/{rev}", revision)
    app.router.add_get("/api/models/org/evil/tree/{rev}", tree_)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        code, _, err = run_cli(
            "download",
            "org/evil",
            "--mirror",
            f"http://127.0.0.1:{port}",
            "--cache-dir",
            str(cache),
            capsys=capsys,
        )
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()
    assert code == 2 and "unsafe" in err
    assert not (tmp_path / "x").exists() and not (cache.parent / "x").exists()


def test_full_disk_is_a_clear_error_and_nothing_is_linked(
    tmp_path: Path, repo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (CI runs as root)")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]).returncode:
        pytest.skip("this machine does not allow mounting tmpfs")
    try:
        with ThreadedMirror([RepoSource("model", "org/tiny", repo_dir)]) as m:
            code, _, err = run_cli(
                "download",
                "org/tiny",
                "--mirror",
                m.url,
                "--cache-dir",
                str(small / "cache"),
                capsys=capsys,
            )
        assert code == 5 and "disk full" in err
        assert not list((small / "cache").rglob("blobs/*"))
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_revision_by_tag_and_by_commit(
    repo_dir: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = make_repo(tmp_path / "v1", big=1 * MiB, seed=9)
    with ThreadedMirror([RepoSource("model", "org/t", repo_dir, revisions={"v1.0": v1})]) as m:
        args = ["--mirror", m.url, "--cache-dir", str(cache), "--quiet"]
        code, out, err = run_cli("download", "org/t", "--revision", "v1.0", *args, capsys=capsys)
        assert code == 0, err
        tag_commit = m.commit_of("model", "org/t", "v1.0")
        assert out.strip().endswith(tag_commit)
        assert (cache / "models--org--t/refs/v1.0").read_text() == tag_commit
        main_commit = m.commit_of("model", "org/t")
        code, out, err = run_cli(
            "download", "org/t", "--revision", main_commit, *args, capsys=capsys
        )
        assert code == 0, err
        assert out.strip().endswith(main_commit)
        # a commit is not a ref: nothing is written under refs/ for it
        assert sorted(p.name for p in (cache / "models--org--t/refs").iterdir()) == ["v1.0"]


def test_a_mirror_that_ignores_range_is_detected_once_then_one_get_per_file(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rnd = __import__("random").Random(5)
    src = tmp_path / "src"
    for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
        write(src / name, rnd.randbytes(8 * MiB))
    with ThreadedMirror([RepoSource("model", "org/norange", src)]) as m:
        m.add_fault(Fault("ignore_range", times=None))
        code, out, err = run_cli(
            "download", "org/norange", "--mirror", m.url, "--cache-dir", str(cache),
            "--connections", "8", "--max-workers", "1", "--quiet",
            capsys=capsys,
        )  # fmt: skip
        assert code == 0, err
        gets = m.stats().gets_per_file
        served = m.stats().blob_bytes
    snap = Path(out.strip().splitlines()[-1])
    for name in ("a", "b", "c"):
        assert (snap / f"{name}.safetensors").read_bytes() == (
            src / f"{name}.safetensors"
        ).read_bytes()
    per = sorted(gets[f"org/norange/{n}.safetensors"] for n in ("a", "b", "c"))
    # The file that found out may have sent its 8 ranges; the two after it one GET each.
    assert per[:2] == [1, 1] and 1 <= per[2] <= 8, gets
    assert served < 3 * 8 * MiB + 8 * 8 * MiB


async def test_the_range_memory_outlives_one_fetcher_and_spares_piece_requests(
    tmp_path: Path,
) -> None:
    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.transfer.mirror_ranges import MirrorFetcher, RangeUnsupported, chunk_size_for

    rnd = __import__("random").Random(6)
    src = tmp_path / "src"
    datas = {n: rnd.randbytes(6 * MiB) for n in ("a.bin", "b.bin")}
    for n, d in datas.items():
        write(src / n, d)
    with ThreadedMirror([RepoSource("model", "org/r", src)]) as m:
        m.add_fault(Fault("ignore_range", times=None))
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        opts = DownloadOptions(connections=4)
        files = {n: RemoteFile(n, len(d), blob_of(d, lfs=True), True) for n, d in datas.items()}
        snap = await _snapshot(m.url, "org/r", files.values())
        remembered: set[str] = set()

        async def fetch(name: str) -> bool:
            f = files[name]
            with PartialBlob(tmp_path / "part", f.blob_id, f.size, chunk_size_for(f.size)) as p:
                async with MirrorFetcher(hub, opts, ignores_range=remembered) as mf:
                    return (await mf.fetch(snap, f, p)).ok

        assert await fetch("a.bin")
        assert remembered == {m.url}
        before = m.stats().gets_per_file
        assert await fetch("b.bin")  # a new fetcher, the same memory: one GET
        after = m.stats().gets_per_file
        assert after["org/r/b.bin"] - before.get("org/r/b.bin", 0) == 1
        async with MirrorFetcher(hub, opts, ignores_range=remembered) as mf:
            with pytest.raises(RangeUnsupported):
                await mf.fetch_range(snap, files["a.bin"], 0, MiB)
        assert m.stats().gets_per_file == after  # no whole file sent for one piece


def test_runs_cover_what_is_missing_in_consecutive_pieces() -> None:
    from peer.transfer.mirror_ranges import split_runs

    def spans(chunks: list[int], n: int) -> list[tuple[int, int]]:
        return [(r.first, r.end) for r in split_runs(chunks, n)]

    assert spans(list(range(16)), 1) == [(0, 16)]
    assert spans(list(range(16)), 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    # A resumed journal leaves gaps: runs never span a chunk already had.
    assert spans([0, 1, 2, 5, 6, 9], 1) == [(0, 3), (5, 7), (9, 10)]
    assert spans([0, 1, 2, 3, 7], 3) == [(0, 2), (2, 4), (7, 8)]
    assert spans([3], 8) == [(3, 4)] and spans([], 4) == []
    # A chunk the journal says is partly held starts a run (which asks only its rest).
    assert [(r.first, r.end) for r in split_runs([0, 1, 2, 3, 4], 1, {2})] == [(0, 2), (2, 5)]


def test_a_blind_request_is_cut_only_for_a_stolen_half_worth_the_bytes_thrown_away(
    tmp_path: Path,
) -> None:
    """A cut closes the stream's connection and throws away what it had in flight (up
    to a few MiB, whatever the file's size). On a 3 MiB shard, a low first rate sample
    had the fetcher cut for its last 1 MiB: the mirror sent 4 MiB of it (test_lan's
    first fetch from the mirror once). A larger blob's blind request is still cut."""
    from collections import deque
    from typing import Any, cast

    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.transfer.mirror_ranges import MirrorFetcher, _BlobJob, _Run, chunk_size_for

    hub = HubSettings(mirrors=("http://127.0.0.1:9",), token=None, cache_dir=tmp_path / "c")
    fetcher = MirrorFetcher(hub, DownloadOptions(connections=8))

    def steal(size: int, rate: float) -> tuple[int, int] | None:
        chunk = chunk_size_for(size)
        chunks = -(-size // chunk)
        blob = f"{size:064x}"
        with PartialBlob(tmp_path / f"p{size}", blob, size, chunk) as p:
            job = _BlobJob(
                cast(Any, None), RemoteFile("a.bin", size, blob, True), p, deque(), print
            )
            job.request_cost = 0.01
            # one stream, its request asked for the whole blob (the mirror's cost unknown)
            job.active.append(_Run(0, chunks, 0, 0, asked=chunks, blind=True))
            run = fetcher._steal(job, rate)
            return None if run is None else (run.first, run.end)

    assert steal(3 * MiB + 128, 1 * MiB) is None  # 1 MiB stolen at 1 MiB/s: not worth a cut
    assert steal(64 * MiB, 1 * MiB) == (33, 64)  # half of what its stream has not reached: cut
    assert steal(16 * MiB, 1 * MiB) == (9, 16)  # a capped mirror's 16 MiB blob: cut too


async def test_streams_grow_where_each_connection_is_capped_and_are_remembered(
    tmp_path: Path,
) -> None:
    """A mirror capping every connection: one stream per blob is slow, more streams
    raise the rate, so the fetcher adds them (and starts the next blob there)."""
    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    rnd = __import__("random").Random(8)
    src = tmp_path / "src"
    datas = {n: rnd.randbytes(16 * MiB) for n in ("a.bin", "b.bin")}
    for n, d in datas.items():
        write(src / n, d)
    with ThreadedMirror([RepoSource("model", "org/capped", src)], rate_cap=2 * MiB) as m:
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        files = {n: RemoteFile(n, len(d), blob_of(d, lfs=True), True) for n, d in datas.items()}
        snap = await _snapshot(m.url, "org/capped", files.values())
        async with MirrorFetcher(hub, DownloadOptions(connections=8)) as mf:
            for name, f in files.items():
                with PartialBlob(tmp_path / "p", f.blob_id, f.size, chunk_size_for(f.size)) as p:
                    assert (await mf.fetch(snap, f, p)).ok
                    assert p.data_path.read_bytes() == datas[name]
            paid = mf.pool.streams_that_paid[m.url]
    assert paid >= 2, "more streams raised the rate of a capped mirror: they must be kept"


async def test_streams_reach_the_cap_early_where_requests_are_cheap(tmp_path: Path) -> None:
    """A mirror capping each connection, whose requests cost milliseconds: the rate is
    looked at every few requests' cost (not every 0.25 s), so all `--connections`
    streams run before 1/16 of the file has arrived (the 0.25 s looks of d6dc5c8 had 4
    GETs then; the ramp made a 256 MiB fetch 2x slower than 16 streams from the start)."""
    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    data = __import__("random").Random(11).randbytes(32 * MiB)
    write(tmp_path / "src" / "c.bin", data)
    f = RemoteFile("c.bin", len(data), blob_of(data, lfs=True), True)
    with ThreadedMirror([RepoSource("model", "org/c", tmp_path / "src")], rate_cap=MiB) as m:
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        snap = await _snapshot(m.url, "org/c", (f,))
        got = [0]
        gets_early: list[int] = []

        def on_bytes(n: int) -> None:
            got[0] += n
            if got[0] <= f.size // 16:
                gets_early.append(m.stats().gets_per_file.get("org/c/c.bin", 0))

        with PartialBlob(tmp_path / "p", f.blob_id, f.size, chunk_size_for(f.size)) as p:
            async with MirrorFetcher(hub, DownloadOptions(connections=8)) as mf:
                assert (await mf.fetch(snap, f, p, on_bytes=on_bytes)).ok
            assert p.data_path.read_bytes() == data
    assert gets_early and max(gets_early) >= 8, gets_early[-5:]


async def test_a_blob_is_one_get_until_the_mirrors_request_cost_is_known(tmp_path: Path) -> None:
    """Before any request to a mirror has been timed, a blob's first request asks for
    its whole run: one GET per file, as `hf download` (olah answers each request only
    after a check of its upstream). Once measured cheap, kept per mirror in a dict the
    agent's jobs share, the next blob starts with a few chunks (no cut needed to split
    it)."""
    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    rnd = __import__("random").Random(12)
    src = tmp_path / "src"
    datas = {n: rnd.randbytes(16 * MiB) for n in ("a.bin", "b.bin", "c.bin")}
    for n, d in datas.items():
        write(src / n, d)
    with ThreadedMirror([RepoSource("model", "org/g", src)]) as m:
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        files = {n: RemoteFile(n, len(d), blob_of(d, lfs=True), True) for n, d in datas.items()}
        snap = await _snapshot(m.url, "org/g", files.values())
        costs: dict[str, float] = {}

        async def gets_for(name: str, known: dict[str, float]) -> int:
            f = files[name]
            with PartialBlob(tmp_path / "p", f.blob_id, f.size, chunk_size_for(f.size)) as p:
                async with MirrorFetcher(
                    hub, DownloadOptions(connections=1), request_costs=known
                ) as mf:
                    assert (await mf.fetch(snap, f, p)).ok
            return m.stats().gets_per_file[f"org/g/{name}"]

        assert await gets_for("a.bin", costs) == 1
        assert m.url in costs  # measured, and kept for the next fetcher
        assert await gets_for("b.bin", costs) >= 2  # 4 chunks first, then the rest
        assert await gets_for("c.bin", {}) == 1  # a fetcher that knows nothing: blind


async def test_a_small_blob_asks_after_a_much_larger_blobs_first_answer(tmp_path: Path) -> None:
    """olah answers requests one at a time (an upstream check each, on one event loop):
    a config.json asked alongside the shards delayed a shard's first byte. With the
    mirror holding the shard's answer for 1 s (as olah checking its upstream), the small
    file's request goes out only once the shard's headers are in, so its first byte
    comes after the shard's; a file of similar size does not wait."""
    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    rnd = __import__("random").Random(14)
    src = tmp_path / "src"
    datas = {"big.bin": rnd.randbytes(8 * MiB), "mid.bin": rnd.randbytes(4 * MiB)}
    datas["config.json"] = b'{"small": true}'
    for n, d in datas.items():
        write(src / n, d)
    with ThreadedMirror([RepoSource("model", "org/s", src)]) as m:
        m.add_fault(Fault("delay", path_glob="big.bin", stall_seconds=1.0))
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        files = {n: RemoteFile(n, len(d), blob_of(d, lfs=True), True) for n, d in datas.items()}
        snap = await _snapshot(m.url, "org/s", files.values())
        first_bytes: list[str] = []
        first_at: dict[str, float] = {}

        async def fetch(mf: MirrorFetcher, name: str) -> None:
            f = files[name]

            def on_bytes(n: int) -> None:
                if name not in first_bytes:
                    first_bytes.append(name)
                    first_at[name] = time.monotonic() - t0

            with PartialBlob(tmp_path / name, f.blob_id, f.size, chunk_size_for(f.size)) as p:
                assert (await mf.fetch(snap, f, p, on_bytes=on_bytes)).ok
                assert p.data_path.read_bytes() == datas[name]

        async with MirrorFetcher(hub, DownloadOptions()) as mf:
            t0 = time.monotonic()
            await asyncio.gather(*(fetch(mf, n) for n in ("big.bin", "mid.bin", "config.json")))
        gets = m.stats().gets_per_file
    # mid.bin (half the size) did not wait; config.json asked only once big.bin's answer
    # came (held 1 s). Its first byte may still beat big.bin's on a loaded machine: the
    # rule orders the requests, not the bytes.
    assert first_bytes[0] == "mid.bin", first_bytes
    assert first_at["mid.bin"] < 0.9 <= first_at["config.json"], first_at
    assert gets["org/s/config.json"] == 1


async def test_a_small_blob_waits_for_a_larger_blobs_answer_that_never_comes_at_most_read_timeout(
    tmp_path: Path,
) -> None:
    """A mirror that never answers the shard's request (down behind a proxy that holds
    it, hostile): the small file asks after `read_timeout` at the latest, never for
    as long as the shard's answer is held."""
    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    src = tmp_path / "src"
    datas = {"big.bin": __import__("random").Random(15).randbytes(8 * MiB)}
    datas["config.json"] = b'{"small": true}'
    for n, d in datas.items():
        write(src / n, d)
    with ThreadedMirror([RepoSource("model", "org/s", src)]) as m:
        m.add_fault(Fault("delay", path_glob="big.bin", stall_seconds=3600.0, times=None))
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        files = {n: RemoteFile(n, len(d), blob_of(d, lfs=True), True) for n, d in datas.items()}
        snap = await _snapshot(m.url, "org/s", files.values())
        small = files["config.json"]
        async with MirrorFetcher(hub, DownloadOptions(read_timeout=2.0)) as mf:
            big = files["big.bin"]
            with PartialBlob(tmp_path / "b", big.blob_id, big.size, chunk_size_for(big.size)) as bp:
                shard = asyncio.create_task(mf.fetch(snap, big, bp))
                await asyncio.sleep(0.2)  # its first request is out, unanswered
                t0 = time.monotonic()
                with PartialBlob(tmp_path / "s", small.blob_id, small.size, small.size) as sp:
                    assert (await mf.fetch(snap, small, sp)).ok
                took = time.monotonic() - t0
                shard.cancel()
                with contextlib.suppress(BaseException):
                    await shard
    assert 1.0 < took < 6.0, took  # it waited, for read_timeout (2 s), not for the shard


async def test_a_partial_whose_journal_has_every_chunk_is_hashed_without_a_request(
    tmp_path: Path,
) -> None:
    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.hub.metadata import RemoteFile, Snapshot
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    data = __import__("random").Random(9).randbytes(5 * MiB + 3)
    src = tmp_path / "src"
    write(src / "w.bin", data)
    f = RemoteFile("w.bin", len(data), blob_of(data, lfs=True), True)
    with PartialBlob(tmp_path / "p", f.blob_id, f.size, chunk_size_for(f.size)) as p:
        for i in range(p.n_chunks):  # killed right after its last chunk landed
            a, b = p.chunk_range(i)
            p.write(a, data[a:b])
            p.mark_done(i)
    with ThreadedMirror([RepoSource("model", "org/w", src)]) as m:
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        snap = Snapshot("model", "org/w", "main", "0" * 40, (f,), m.url)
        with PartialBlob(tmp_path / "p", f.blob_id, f.size, chunk_size_for(f.size)) as p:
            async with MirrorFetcher(hub, DownloadOptions()) as mf:
                assert (await mf.fetch(snap, f, p)).ok
        assert m.stats().gets_per_file == {}


async def test_runs_over_chunks_begun_earlier_ask_only_for_their_rest(tmp_path: Path) -> None:
    """A journal that says chunks 3 and 5 hold their first bytes (a kill -9 in the
    middle of them): the resumed runs start there, so the mirror sends what is missing
    (and what a cut stream had in flight), and the runs journal progress inside chunks
    again as bytes land."""
    from peer.cache.partial import JOURNAL_STEP, PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    data = __import__("random").Random(7).randbytes(8 * MiB)
    write(tmp_path / "src" / "a.bin", data)
    f = RemoteFile("a.bin", len(data), blob_of(data, lfs=True), True)
    chunk = chunk_size_for(f.size)
    assert chunk == MiB
    held = {3: 600 << 10, 5: 3 * JOURNAL_STEP}
    with PartialBlob(tmp_path / "p", f.blob_id, f.size, chunk) as p:
        for i in (0, 1):
            p.write(i * chunk, data[i * chunk : (i + 1) * chunk])
            p.mark_done(i)
        for i, k in held.items():
            p.write(i * chunk, data[i * chunk : i * chunk + k])
            p.advance(i, k)
    missing = f.size - 2 * chunk - sum(held.values())
    with ThreadedMirror([RepoSource("model", "org/r", tmp_path / "src")], client_rate=4 * MiB) as m:
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        snap = await _snapshot(m.url, "org/r", (f,))
        with PartialBlob(tmp_path / "p", f.blob_id, f.size, chunk) as p:
            assert p.done == {0, 1} and p.held == held
            journal = p.journal_path.stat().st_size
            async with MirrorFetcher(hub, DownloadOptions(connections=4)) as mf:
                assert (await mf.fetch(snap, f, p)).ok
            assert p.done == set(range(8))
            # 8-byte records: more than one per chunk fetched, so progress inside chunks too
            assert (p.journal_path.stat().st_size - journal) // 8 > 6
        # What a stream cut for a stealer had in flight is sent too; a run that asked
        # again for a held prefix would send at least the smallest of them again.
        sent = m.stats().per_file["org/r/a.bin"]
        assert missing <= sent < missing + min(held.values()), (sent, missing)


def fds_on(path: Path) -> int:
    """This process's open fds on `path`."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass
    return n


async def test_a_mirror_fetch_cancelled_while_it_hashes_never_closes_the_fd_under_it(
    tmp_path: Path,
) -> None:
    """The fetch hashes its prefix in a thread as it grows. Cancelled meanwhile, that
    thread runs on to the end of its range (a thread cannot be cancelled): the fd it
    reads must stay open until then. Closed under it, the thread read a closed fd, or
    whatever file took its number."""
    import threading

    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    data = __import__("random").Random(12).randbytes(8 * MiB)
    write(tmp_path / "src" / "h.bin", data)
    f = RemoteFile("h.bin", len(data), blob_of(data, lfs=True), True)
    inside, release = threading.Event(), threading.Event()

    def also_hash(_: memoryview) -> None:  # in the hashing thread, within its range
        inside.set()
        release.wait(30)

    with ThreadedMirror([RepoSource("model", "org/h", tmp_path / "src")]) as m:
        hub = HubSettings(mirrors=(m.url,), token=None, cache_dir=tmp_path / "c")
        snap = await _snapshot(m.url, "org/h", (f,))
        try:
            with PartialBlob(tmp_path / "p", f.blob_id, f.size, chunk_size_for(f.size)) as p:
                async with MirrorFetcher(hub, DownloadOptions()) as mf:
                    fetching = asyncio.create_task(mf.fetch(snap, f, p, also_hash=also_hash))
                    assert await asyncio.to_thread(inside.wait, 30), "it never hashed"
                    fetching.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await fetching
                data_path = p.data_path
            # The fetch and its partial are closed; the hashing thread is not, and
            # reads through an fd of its own.
            assert fds_on(data_path) == 1
        finally:
            release.set()
        for _ in range(1000):
            if not fds_on(data_path):
                break
            await asyncio.sleep(0.01)
        assert fds_on(data_path) == 0  # and closed once it ended: nothing leaks
