"""The Hub protocol's pure helpers (`peer.hub.protocol`, `peer.hub.answers`): Range, the
LFS rule, git ids, the JSON entries as huggingface_hub reads them, error translation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest
from huggingface_hub.hf_api import ModelInfo, RepoFile, RepoFolder

from peer.errors import (
    EntryNotFound,
    GatedRepo,
    MirrorFailed,
    RepoNotFound,
    RevisionNotFound,
)
from peer.hub.answers import entry_not_found, hub_error, range_not_satisfiable
from peer.hub.metadata import _remote_file
from peer.hub.protocol import (
    UNSATISFIABLE,
    bearer,
    directory_oids,
    error_from_status,
    file_entry,
    git_blob_sha1,
    git_oid,
    is_lfs_path,
    iso_date,
    lfs_pointer,
    origin,
    parse_range,
    paths_info,
    repo_info,
    resolve_headers,
    resolve_path,
    tree_entries,
    with_last_commit,
)

MiB = 1 << 20
SHA = hashlib.sha256(b"weights").hexdigest()


@dataclass(frozen=True)
class F:
    path: str
    size: int
    blob_id: str


# -- Range -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "span"),
    [
        (None, 10, None),
        ("", 10, None),
        ("bytes=0-9", 10, (0, 10)),
        ("bytes=2-4", 10, (2, 5)),
        (" bytes = 2 - 4 ", 10, (2, 5)),
        ("bytes=5-", 10, (5, 10)),
        ("bytes=5-100", 10, (5, 10)),  # an end past the body is clipped
        ("bytes=9-9", 10, (9, 10)),
        ("bytes=-3", 10, (7, 10)),  # suffix: the last 3 bytes
        ("bytes=-30", 10, (0, 10)),
        ("bytes=10-", 10, UNSATISFIABLE),
        ("bytes=10-20", 10, UNSATISFIABLE),
        ("bytes=-0", 10, UNSATISFIABLE),
        ("bytes=-5", 0, UNSATISFIABLE),
        ("bytes=0-", 0, UNSATISFIABLE),
        ("bytes=4-2", 10, None),  # invalid: ignored, the whole body
        ("bytes=-", 10, None),
        ("bytes=0-1,4-5", 10, None),  # several ranges: not supported, the whole body
        ("items=0-1", 10, None),
        ("bytes=a-b", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, span: object) -> None:
    assert parse_range(header, size) == span


def test_range_not_satisfiable_names_the_size() -> None:
    r = range_not_satisfiable(1234, {"ETag": '"x"'})
    assert r.status == 416
    assert r.headers["Content-Range"] == "bytes */1234"
    assert r.headers["ETag"] == '"x"'


# -- LFS and git ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "size", "lfs"),
    [
        ("config.json", 10, False),
        ("model.safetensors", 1, True),
        ("MODEL.SafeTensors", 1, True),  # suffixes are case-insensitive
        ("sub/dir/pytorch_model.bin", 0, True),
        ("data.tar.gz", 5, True),
        ("weights.bin/README.md", 5, False),  # a folder's suffix does not count
        ("notes.txt", MiB - 1, False),
        ("notes.txt", MiB, True),  # 1 MiB and up: LFS whatever the name
        ("Makefile", 3 * MiB, True),
    ],
)
def test_lfs_rule(path: str, size: int, lfs: bool) -> None:
    assert is_lfs_path(path, size) is lfs


def test_git_blob_sha1_matches_git() -> None:
    # `git hash-object` of these contents
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_sha1(b"hello world\n") == "3b18e512dba79e4c8300dd08aeb37f8e728b8dad"


def test_lfs_pointer_and_its_tree_oid() -> None:
    pointer = lfs_pointer(SHA, 4096)
    assert pointer == (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{SHA}\nsize 4096\n".encode()
    )
    f = F("w.safetensors", 4096, SHA)
    assert git_oid(f) == hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    plain = F("a.json", 3, git_blob_sha1(b"abc"))
    assert git_oid(plain) == plain.blob_id


# -- JSON entries ------------------------------------------------------------------------


def test_file_entries_as_the_hub_lists_them() -> None:
    plain = F("config.json", 3, git_blob_sha1(b"abc"))
    assert file_entry(plain) == {
        "type": "file",
        "oid": plain.blob_id,
        "size": 3,
        "path": "config.json",
    }
    lfs = F("sub/w.safetensors", 4096, SHA)
    pointer = lfs_pointer(SHA, 4096)
    assert file_entry(lfs) == {
        "type": "file",
        "oid": git_blob_sha1(pointer),
        "size": 4096,
        "path": "sub/w.safetensors",
        "lfs": {"oid": SHA, "size": 4096, "pointerSize": len(pointer)},
    }


@pytest.mark.parametrize(
    "f", [F("config.json", 3, git_blob_sha1(b"abc")), F("sub/w.safetensors", 4096, SHA)]
)
def test_an_entry_reads_back_as_the_same_file(f: F) -> None:
    """What the agent's Hub API and the mirror render, huggingface_hub parses, and the
    agent's own metadata reader (`peer.hub.metadata`) turns back into the same file."""
    parsed = RepoFile(**json.loads(json.dumps(file_entry(f))))
    remote = _remote_file(parsed)
    assert (remote.path, remote.size, remote.blob_id) == (f.path, f.size, f.blob_id)
    assert remote.is_lfs is (len(f.blob_id) == 64)


FILES = (
    F("README.md", 5, git_blob_sha1(b"hello")),
    F("a/b/w.bin", 3, SHA),
    F("a/c.json", 2, git_blob_sha1(b"{}")),
)


def test_directory_oids_cover_every_folder_and_ignore_order() -> None:
    dirs = directory_oids((f.path, f.blob_id) for f in FILES)
    assert list(dirs) == ["a", "a/b"]
    assert dirs == directory_oids((f.path, f.blob_id) for f in reversed(FILES))
    changed = directory_oids(
        (f.path, "0" * 40 if f.path == "a/b/w.bin" else f.blob_id) for f in FILES
    )
    assert changed["a"] != dirs["a"] and changed["a/b"] != dirs["a/b"]


def test_tree_entries() -> None:
    dirs = directory_oids((f.path, f.blob_id) for f in FILES)
    top = tree_entries(FILES, dirs, "", recursive=False)
    assert top is not None
    assert [(e["type"], e["path"]) for e in top] == [("file", "README.md"), ("directory", "a")]
    every = tree_entries(FILES, dirs, "", recursive=True)
    assert every is not None
    assert [e["path"] for e in every] == ["README.md", "a", "a/b", "a/b/w.bin", "a/c.json"]
    sub = tree_entries(FILES, dirs, "a", recursive=False)
    assert sub is not None
    assert [e["path"] for e in sub] == ["a/b", "a/c.json"]
    assert tree_entries(FILES, dirs, "nope", recursive=True) is None
    folder = RepoFolder(**sub[0])
    assert folder.path == "a/b" and folder.tree_id == dirs["a/b"]
    expanded = with_last_commit(sub, "c" * 40, "t", iso_date(0))
    assert RepoFile(**expanded[1]).last_commit is not None
    assert "lastCommit" not in sub[1]  # the listing itself is left alone (it may be cached)


def test_paths_info_keeps_the_asked_order_and_skips_what_is_missing() -> None:
    dirs = directory_oids((f.path, f.blob_id) for f in FILES)
    out = paths_info({f.path: f for f in FILES}, dirs, ["/a/c.json/", "nope", "a", "README.md"])
    assert [(e["type"], e["path"]) for e in out] == [
        ("file", "a/c.json"),
        ("directory", "a"),
        ("file", "README.md"),
    ]


def test_repo_info_reads_as_model_info() -> None:
    info = repo_info(
        "model",
        "org/x",
        id_seed="org/x",
        commit="c" * 40,
        files=FILES,
        last_modified=iso_date(1_700_000_000),
        private=False,
        gated=False,
        blobs=True,
    )
    assert info["lastModified"] == "2023-11-14T22:13:20.000Z"
    assert "xetEnabled" not in info
    parsed = ModelInfo(**json.loads(json.dumps(info)))
    assert parsed.sha == "c" * 40 and parsed.id == "org/x"
    assert parsed.siblings is not None
    by_name = {s.rfilename: s for s in parsed.siblings}
    lfs = by_name["a/b/w.bin"].lfs
    assert lfs is not None and lfs.sha256 == SHA and lfs.size == 3
    assert by_name["a/b/w.bin"].blob_id == git_oid(FILES[1])
    assert by_name["README.md"].lfs is None
    bare = repo_info(
        "space",
        "x",
        id_seed="x",
        commit="c" * 40,
        files=FILES,
        last_modified="",
        private=True,
        gated="auto",
        blobs=False,
        xet_enabled=True,
    )
    assert bare["siblings"][0] == {"rfilename": "README.md"}
    assert bare["author"] is None and bare["sdk"] == "static" and bare["xetEnabled"] is True
    assert "modelId" not in bare


# -- URLs and headers --------------------------------------------------------------------


def test_resolve_path_encodes_revisions_as_one_segment() -> None:
    assert (
        resolve_path("model", "org/x", "main", "a b/c.json") == "/org/x/resolve/main/a%20b/c.json"
    )
    assert (
        resolve_path("dataset", "org/x", "refs/pr/1", "f")
        == "/datasets/org/x/resolve/refs%2Fpr%2F1/f"
    )
    assert resolve_path("space", "x", "v1", "f").startswith("/spaces/x/resolve/")


def test_resolve_headers() -> None:
    plain = git_blob_sha1(b"abc")
    assert resolve_headers("c" * 40, plain, 3) == {"X-Repo-Commit": "c" * 40, "ETag": f'"{plain}"'}
    lfs = resolve_headers("c" * 40, SHA, 4096)
    assert lfs["ETag"] == lfs["X-Linked-Etag"] == f'"{SHA}"'
    assert lfs["X-Linked-Size"] == "4096"


def test_bearer_and_origin() -> None:
    assert bearer("Bearer  hf_abc ") == "hf_abc"
    assert bearer("bearer hf_abc") == "hf_abc"
    assert bearer("Basic dXNlcg==") is None
    assert bearer("Bearer ") is None
    assert bearer(None) is None
    assert origin("http://Mirror:8080/a/b?c") == ("http", "mirror:8080")
    assert origin("https://mirror/x") != origin("http://mirror/x")


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (401, "GatedRepo", GatedRepo),
        (403, "GatedRepo", GatedRepo),
        (401, "RepoNotFound", RepoNotFound),
        (401, None, RepoNotFound),
        (404, "RevisionNotFound", RevisionNotFound),
        (404, "EntryNotFound", EntryNotFound),
        (404, None, EntryNotFound),
        (403, None, RepoNotFound),
        (500, None, MirrorFailed),
        (418, None, MirrorFailed),
    ],
)
def test_error_from_status(status: int, code: str | None, kind: type) -> None:
    headers = {"X-Error-Message": "said the mirror"}
    if code is not None:
        headers["X-Error-Code"] = code
    err = error_from_status(status, headers, "org/x/f")
    assert type(err) is kind
    assert "org/x/f" in err.message and "said the mirror" in err.message


def test_hub_error_is_header_safe_and_keyed_on_the_code() -> None:
    r = hub_error(404, "EntryNotFound", "fichier é absent", {"X-Repo-Commit": "c" * 40})
    assert r.status == 404
    assert r.headers["X-Error-Code"] == "EntryNotFound"
    assert r.headers["X-Error-Message"] == "fichier \\xe9 absent"
    assert r.headers["X-Repo-Commit"] == "c" * 40
    assert r.text is not None and json.loads(r.text) == {"error": "fichier é absent"}
    assert "X-Error-Code" not in hub_error(500, None, "x").headers
    gone = entry_not_found("a/b", "refs/pr/1", "c" * 40)
    assert gone.status == 404 and gone.headers["X-Error-Code"] == "EntryNotFound"
    assert gone.headers["X-Error-Message"] == "a/b does not exist on 'refs/pr/1'"
