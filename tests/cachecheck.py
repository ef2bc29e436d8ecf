"""The final state of an HF cache after a fault: every blob hashes to its name, every
snapshot link names a blob that is there, and huggingface_hub sees nothing wrong.
Shared by tests/test_faults.py and benchmarks/soak.py."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import scan_cache_dir

from peer.verification.hashing import hash_file


@dataclass
class CacheReport:
    blobs: int = 0
    problems: list[str] = field(default_factory=list)


def check_cache(cache: Path) -> CacheReport:
    """Every repo folder of `cache`: blobs, snapshot links, refs, and scan_cache_dir."""
    report = CacheReport()
    if not cache.exists():
        return report
    for repo in sorted(p for p in cache.iterdir() if "--" in p.name):
        blobs = repo / "blobs"
        for blob in sorted(blobs.iterdir()) if blobs.is_dir() else []:
            report.blobs += 1
            verdict = hash_file(blob, blob.name, blob.stat().st_size)
            if not verdict.ok:
                report.problems.append(f"{blob} hashes to {verdict.actual}")
        for link in (repo / "snapshots").rglob("*") if (repo / "snapshots").is_dir() else []:
            if link.is_symlink():
                target = os.readlink(link)
                if target.startswith("/") or not link.exists():
                    report.problems.append(f"{link} -> {target} (absolute or dangling)")
                elif link.resolve().parent != blobs.resolve():
                    report.problems.append(f"{link} -> {target} (not in blobs/)")
        refs = repo / "refs"
        for ref in refs.rglob("*") if refs.is_dir() else []:
            if ref.is_file() and not (repo / "snapshots" / ref.read_text()).is_dir():
                report.problems.append(f"{ref} names a snapshot that is not there")
    info = scan_cache_dir(cache)
    report.problems += [f"scan_cache_dir: {w}" for w in info.warnings]
    return report


def assert_cache_ok(cache: Path, *, min_blobs: int = 1) -> CacheReport:
    report = check_cache(cache)
    assert not report.problems, report.problems
    assert report.blobs >= min_blobs, f"{cache}: {report.blobs} blobs, expected >= {min_blobs}"
    return report
