"""What killed processes leave behind, removed at the agent's start.

Every temp file hfswarm writes has a name that says what it is, and nothing here
touches a download that can resume (a mirror partial with its journal, a swarm
partial with its resume data). Other processes may share the cache (`hfswarm
download --no-agent`, another user's client), so a temp file is removed only when
it cannot be in use: its writer's pid is gone, or it is older than `STALE` seconds
(the atomic replaces live for microseconds).

  <repo>/.hfswarm/partial/publish.*           a publish's copy (never resumed)
  <repo>/.hfswarm/partial/<id>.<thread>.adopt.<pid>  a blob reused from another repo
  <repo>/.hfswarm/partial/<id>.<thread>.copy.<pid>  a --local-dir copy
  <repo>/.hfswarm/partial/<id>.journal        an old, unlocked journal whose data
                                              file is gone (killed after the rename)
  <repo>/.hfswarm/partial/<id>[.journal]      an old, unlocked partial of a blob that
                                              is in blobs/ now
A partial data file with no journal whose blob is not in blobs/ stays: a swarm download
resumes from it (libtorrent checks the pieces on disk).
  <repo>/snapshots/**/.<name>.hfswarm-tmp     a snapshot link being replaced
  <repo>/refs/**/.<name>.hfswarm-tmp          a ref being replaced
  <state>/**/.<name>.<pid>.tmp                a state record being replaced
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from tracker.schema import is_blob_id

STALE = 600.0  # seconds: no atomic replace takes this long
_PID_SUFFIX = re.compile(r"\.(adopt|copy)\.(\d+)$")
_STATE_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _old(path: Path, now: float) -> bool:
    try:
        return now - path.lstat().st_mtime > STALE
    except OSError:
        return False


def _orphan_journal(journal: Path, now: float) -> bool:
    """No data file, old, and no process holds it (a partial being opened takes its
    journal's lock before it creates the data file)."""
    if journal.with_name(journal.name.removesuffix(".journal")).exists() or not _old(journal, now):
        return False
    return _unlocked(journal)


def _unlocked(journal: Path) -> bool:
    """No process holds the partial this journal belongs to (`PartialBlob` flocks it)."""
    try:
        fd = os.open(journal, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the lock
    return True


def _debris_of_repo(repo: Path, now: float) -> Iterator[Path]:
    partial = repo / ".hfswarm" / "partial"
    with contextlib.suppress(OSError):
        for entry in partial.iterdir():
            name = entry.name
            if name.startswith("publish."):  # only the agent publishes: never live now
                yield entry
            elif m := _PID_SUFFIX.search(name):
                if not _pid_alive(int(m.group(2))):
                    yield entry
            elif name.endswith(".journal") and _orphan_journal(entry, now):
                yield entry
            elif is_blob_id(name) and (repo / "blobs" / name).exists() and _old(entry, now):
                # a partial of a blob that is in blobs/ now (fetched again another way)
                journal = entry.with_name(f"{name}.journal")
                if not journal.exists() or _unlocked(journal):
                    yield entry
                    if journal.exists():
                        yield journal
    for top in ("snapshots", "refs"):
        with contextlib.suppress(OSError):
            for tmp in (repo / top).rglob(".*.hfswarm-tmp"):
                if _old(tmp, now):
                    yield tmp


def clean_debris(cache_dir: Path, state_dir: Path | None = None, now: float | None = None) -> int:
    """Remove the debris listed above; returns how many files went."""
    now = time.time() if now is None else now
    removed = 0
    found: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(cache_dir):
            if "--" in entry.name and entry.is_dir(follow_symlinks=False):
                found += _debris_of_repo(Path(entry.path), now)
    if state_dir is not None:
        with contextlib.suppress(OSError):
            for tmp in state_dir.rglob(".*.tmp"):
                m = _STATE_TMP.match(tmp.name)
                if m and (not _pid_alive(int(m.group(1))) or _old(tmp, now)):
                    found.append(tmp)
    for path in found:
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed
