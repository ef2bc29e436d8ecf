"""Cache layout, path safety, the resume journal and the mirror pool, in isolation."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from peer.cache.hf_cache import RepoCache, safe_relpath
from peer.cache.partial import PartialBlob, PartialBusy
from peer.config import HubSettings, default_cache_dir, read_token
from peer.errors import UnsafePath
from peer.transfer.mirror_ranges import MirrorPool, chunk_size_for

SHA = "ab" * 32


@pytest.mark.parametrize(
    "bad", ["../x", "a/../../x", "/etc/passwd", "a//b", "a\0b", "", ".", "a/./b", "a\\..\\b"]
)
def test_unsafe_names_are_refused(bad: str) -> None:
    with pytest.raises(UnsafePath):
        safe_relpath(bad)


def test_safe_names_pass() -> None:
    assert safe_relpath("a/b/c.txt").parts == ("a", "b", "c.txt")
    assert safe_relpath("..hidden/x..y").parts == ("..hidden", "x..y")


def test_symlink_depth_and_refs(tmp_path: Path) -> None:
    repo = RepoCache(tmp_path, "dataset", "org/name")
    assert repo.folder.name == "datasets--org--name"
    (repo.blobs).mkdir(parents=True)
    (repo.blobs / SHA).write_bytes(b"x")
    link = repo.link_snapshot("c" * 40, "a/b/file.bin", SHA)
    assert os.readlink(link) == f"../../../../blobs/{SHA}"
    assert link.read_bytes() == b"x"
    top = repo.link_snapshot("c" * 40, "top.bin", SHA)
    assert os.readlink(top) == f"../../blobs/{SHA}"
    repo.write_ref("refs/pr/3", "c" * 40)
    assert (repo.folder / "refs/refs/pr/3").read_bytes() == b"c" * 40
    repo.write_ref("c" * 40, "c" * 40)  # a commit is not a ref
    assert not (repo.folder / "refs" / ("c" * 40)).exists()


def test_journal_survives_reopen_and_torn_record(tmp_path: Path) -> None:
    p = PartialBlob(tmp_path, SHA, size=10 * 1024, chunk_size=1024)
    with p:
        p.write(0, b"a" * 1024)
        p.mark_done(0)
        p.mark_done(3)
    with open(p.journal_path, "ab") as f:
        f.write(b"\x05\x00")  # a record torn by kill -9
    q = PartialBlob(tmp_path, SHA, size=10 * 1024, chunk_size=1024)
    with q:
        assert q.done == {0, 3}
        q.mark_done(4)
    r = PartialBlob(tmp_path, SHA, size=10 * 1024, chunk_size=1024)
    with r:
        assert r.done == {0, 3, 4}
        assert r.contiguous_end(0) == 1 and r.contiguous_end(3) == 5
    # another blob size or chunk size: the journal does not apply
    s = PartialBlob(tmp_path, SHA, size=10 * 1024, chunk_size=2048)
    with s:
        assert s.done == set()


def test_write_through_puts_every_byte_where_write_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The member stream's writes past the page cache: the whole pages of an aligned
    write go through an O_DIRECT descriptor, a short last page, an unaligned offset and
    a buffer the kernel refuses (off the page grid) through `write`; the file is byte
    for byte what plain writes make."""
    flags: list[int] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flag: int, *args: int) -> int:
        flags.append(flag)
        return real_open(path, flag, *args)

    monkeypatch.setattr(os, "open", spy)
    size = 5 * 4096 + 300
    data = os.urandom(size)
    buf = mmap.mmap(-1, 8 * 4096)  # page-aligned, as the stream's buffers are
    with PartialBlob(tmp_path, SHA, size, chunk_size=1 << 20) as p:
        buf[: 2 * 4096 + 10] = data[: 2 * 4096 + 10]
        p.write_through(0, memoryview(buf)[: 2 * 4096 + 10])  # 2 pages direct, 10 bytes not
        assert any(f & os.O_DIRECT for f in flags)
        rest = data[2 * 4096 + 10 :]
        buf[: len(rest)] = rest
        p.write_through(2 * 4096 + 10, memoryview(buf)[: len(rest)])  # unaligned offset
        buf[1 : 1 + 4096] = data[:4096]
        p.write_through(0, memoryview(buf)[1 : 1 + 4096])  # a buffer off the page grid
    assert p.data_path.read_bytes() == data


def test_partial_is_locked_against_a_second_writer(tmp_path: Path) -> None:
    with PartialBlob(tmp_path, SHA, 100, 10):
        with pytest.raises(PartialBusy):
            PartialBlob(tmp_path, SHA, 100, 10).open()


def test_chunk_size_depends_on_size_only() -> None:
    assert chunk_size_for(0) == 1 << 20
    assert chunk_size_for(100 << 20) == 2 << 20
    assert chunk_size_for(1 << 30) == 16 << 20
    assert chunk_size_for(50 << 30) == 16 << 20


def test_mirror_pool_prefers_first_and_cools_down_failures() -> None:
    pool = MirrorPool(("http://a", "http://b"))
    assert pool.pick(0.0) == "http://a"
    for _ in range(3):
        pool.failed("http://a", 0.0)
    assert pool.pick(0.5) == "http://b"
    assert pool.pick(100.0) == "http://a"  # cool-down over: back to the preferred one
    pool.succeeded("http://a")
    assert pool.pick(0.0) == "http://a"
    assert pool.pick(0.0, exclude={"http://a", "http://b"}) is None


def test_settings_follow_hf_conventions(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "home")}
    assert default_cache_dir(env) == tmp_path / "home" / "hub"
    assert default_cache_dir({**env, "HF_HUB_CACHE": "/x/y"}) == Path("/x/y")
    assert read_token(env) is None
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "token").write_text("hf_file\n")
    assert read_token(env) == "hf_file"
    assert read_token({**env, "HF_TOKEN": "hf_env"}) == "hf_env"
    s = HubSettings.from_env({**env, "HF_ENDPOINT": "http://m:1/"})
    assert s.mirrors == ("http://m:1",) and s.token == "hf_file"
    s = HubSettings.from_env(env, mirrors=["http://a", "http://b", "http://a"], token="t")
    assert s.mirrors == ("http://a", "http://b") and s.token == "t"


def watch_syncs(monkeypatch: pytest.MonkeyPatch, file: Path) -> list[str]:
    """The order of fsyncs (of `file` or else) and renames (of a metadata file or else)
    from now on. A power loss cannot be staged here, so the order is what is checked."""
    inode = file.stat().st_ino
    seen: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        seen.append("fsync file" if os.fstat(fd).st_ino == inode else "fsync other")
        real_fsync(fd)

    def replace(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        seen.append("rename metadata" if str(b).endswith(".metadata") else "rename file")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_install_blob_syncs_the_bytes_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's own fsync (libtorrent's writes are never synced by it), the rename,
    then blobs/ itself, so the rename is kept."""
    repo = RepoCache(tmp_path, "model", "org/name")
    src = tmp_path / "landed"
    src.write_bytes(b"x" * 100_000)
    seen = watch_syncs(monkeypatch, src)
    target = repo.install_blob(src, SHA)
    assert target.read_bytes() == b"x" * 100_000
    assert seen == ["fsync file", "rename file", "fsync other"], seen


def test_local_dir_install_syncs_the_file_and_its_rename_before_the_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--local-dir`: the metadata vouches for the file by size and mtime, so after a
    power loss it must never name a rename or bytes that did not reach the disk."""
    from peer.cache.hf_cache import LocalDir

    out = LocalDir(tmp_path / "out")
    src = tmp_path / "landed"
    src.write_bytes(b"y" * 5000)
    seen = watch_syncs(monkeypatch, src)
    target = out.install(src, "a/w.bin", "c" * 40, SHA)
    assert target.read_bytes() == b"y" * 5000
    assert seen == ["fsync file", "rename file", "fsync other", "rename metadata"], seen
    assert out.is_current("a/w.bin", "c" * 40, SHA, 5000)
