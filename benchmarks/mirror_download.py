"""Mirror download benchmark: hfswarm vs `hf download` vs aria2c -x16 -s16 vs curl.

One 1 GiB LFS file on the project's mirror (a separate process on 127.0.0.1). Every tool
downloads it into a fresh folder; runs are interleaved round-robin so that machine noise
hits every tool alike; the table reports the median of N runs, the ratio to aria2c, and
each process's peak RSS (from wait4). Twice: unshaped, and with the mirror capping each
connection (as public mirrors do).

    python benchmarks/mirror_download.py --size 1GiB --runs 5 --cap 20MB

Needs aria2c (Debian package aria2) and curl; tools that are missing are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

REPO = "bench/one-file"

NOVERIFY = textwrap.dedent("""
    # hfswarm's fetch path with the hash follower replaced by a no-op: the cost of
    # verification is the difference between this and the real `hfswarm download`.
    import asyncio, sys
    from pathlib import Path
    from peer.cache.partial import PartialBlob
    from peer.config import DownloadOptions, HubSettings
    from peer.hub.metadata import resolve_snapshot
    from peer.transfer.mirror_ranges import MirrorFetcher, chunk_size_for

    class NoHash(MirrorFetcher):
        async def _hash_follower(self, job, hasher, on_prefix=None):
            return ""

    async def run(url, out):
        s = HubSettings.from_env({}, mirrors=[url], cache_dir=out)
        snap = await resolve_snapshot(s, "model", sys.argv[3], "main")
        f = max(snap.files, key=lambda f: f.size)
        async with NoHash(s, DownloadOptions(quiet=True)) as fetcher:
            with PartialBlob(Path(out), f.blob_id, f.size, chunk_size_for(f.size)) as p:
                await fetcher.fetch(snap, f, p)
    asyncio.run(run(sys.argv[1], sys.argv[2]))
""")


def parse_size(text: str) -> int:
    text = text.strip().upper().replace("IB", "I")
    units = {
        "KI": 1 << 10,
        "MI": 1 << 20,
        "GI": 1 << 30,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
    }
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * units[suffix])
    return int(text)


def make_repo(folder: Path, size: int) -> None:
    marker = folder / ".size"
    if marker.exists() and marker.read_text() == str(size):
        return
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(8 << 20)
    with open(folder / "model.safetensors", "wb") as f:
        left, i = size, 0
        while left:
            # vary each block so nothing downstream can dedupe or compress it
            data = (i.to_bytes(8, "little") + block[8:])[: min(left, len(block))]
            f.write(data)
            left -= len(data)
            i += 1
    (folder / "config.json").write_text('{"bench": true}')
    marker.write_text(str(size))


def start_mirror(folder: Path, cap: int | None) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [
        sys.executable,
        "-m",
        "peer.mirror_server",
        "serve",
        "--listen",
        "127.0.0.1:0",
        f"model:{REPO}={folder}",
    ]
    if cap:
        cmd += ["--rate-cap", str(cap)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "http://" in line:
            url = line[line.index("http://") :].split()[0].rstrip("/")
            return proc, url
    raise RuntimeError("mirror did not start")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command. GNU time reports the RSS: a
    Python parent's own pages would leak into wait4's figure through fork+exec."""
    with tempfile.NamedTemporaryFile("r") as rss:
        wrapped = ["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd]
        t0 = time.perf_counter()
        proc = subprocess.run(wrapped, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-500:]!r}")
        return elapsed, int(rss.read().split()[-1])


# `--checkout DIR`: that checkout's hfswarm runs too (its code through PYTHONPATH).
CHECKOUTS: dict[str, Path] = {}
HERE = Path(__file__).resolve().parent.parent


def hfswarm_cmd(checkout: Path, *args: str) -> list[str]:
    """This checkout's CLI, whatever `hfswarm` on PATH would import."""
    # -m puts the working directory first on sys.path: run it from the checkout.
    return ["env", "-C", str(checkout), f"PYTHONPATH={checkout}", sys.executable, "-m",
            "peer.cli.main", *args]  # fmt: skip


def tools(url: str, out: Path, file_url: str) -> dict[str, list[str]]:
    extra = {
        f"hfswarm@{c.name}": hfswarm_cmd(
            c,
            "download",
            REPO,
            "model.safetensors",
            "--mirror",
            url,
            "--cache-dir",
            str(out),
            "--quiet",
        )
        for c in CHECKOUTS.values()
    }
    table = {
        **extra,
        "hfswarm": [
            *hfswarm_cmd(HERE),
            "download",
            REPO,
            "model.safetensors",
            "--mirror",
            url,
            "--cache-dir",
            str(out),
            "--quiet",
        ],
        "hfswarm (no verify)": [sys.executable, "-c", NOVERIFY, url, str(out), REPO],
        "hf download": ["hf", "download", REPO, "model.safetensors", "--cache-dir", str(out)],
        "aria2c -x16 -s16": [
            "aria2c",
            "-x16",
            "-s16",
            "-k1M",
            "--file-allocation=none",
            "--console-log-level=warn",
            "--summary-interval=0",
            "-d",
            str(out),
            "-o",
            "model.safetensors",
            file_url,
        ],
        "curl": ["curl", "-sSf", "-o", str(out / "model.safetensors"), file_url],
    }
    return {k: v for k, v in table.items() if shutil.which(v[0])}


def scenario(folder: Path, size: int, runs: int, cap: int | None, work: Path) -> dict:
    mirror, url = start_mirror(folder, cap)
    try:
        meta = json.load(urllib.request.urlopen(f"{url}/api/models/{REPO}/revision/main"))
        file_url = f"{url}/{REPO}/resolve/{meta['sha']}/model.safetensors"
        env = {
            **os.environ,
            "HF_ENDPOINT": url,
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_XET_HIGH_PERFORMANCE": "0",
        }
        names = list(tools(url, work / "probe", file_url))
        results: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
        for r in range(runs):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                out = work / f"run-{r}-{name.split()[0]}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                cmd = tools(url, out, file_url)[name]
                results[name].append(timed(cmd, env))
                shutil.rmtree(out, ignore_errors=True)
                print(f"  run {r + 1} {name:22s} {results[name][-1][0]:7.2f} s", flush=True)
    finally:
        mirror.send_signal(signal.SIGTERM)
        mirror.wait(timeout=10)
    summary = {}
    for name, vals in results.items():
        med = statistics.median(v[0] for v in vals)
        summary[name] = {
            "median_s": med,
            "MBps": size / med / 1e6,
            "peak_rss_MB": max(v[1] for v in vals) / 1024,
            "runs_s": [round(v[0], 3) for v in vals],
        }
    return summary


def print_table(title: str, summary: dict) -> None:
    ref = summary.get("aria2c -x16 -s16", {}).get("median_s")
    print(f"\n### {title}\n")
    print("| tool | median s | MB/s | vs aria2c (time) | peak RSS MB | runs (s) |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        ratio = f"{s['median_s'] / ref:.2f}x" if ref else "-"
        print(
            f"| {name} | {s['median_s']:.2f} | {s['MBps']:.0f} | {ratio} | "
            f"{s['peak_rss_MB']:.0f} | {', '.join(map(str, s['runs_s']))} |"
        )
    if "hfswarm" in summary and "hfswarm (no verify)" in summary:
        v, nv = summary["hfswarm"]["median_s"], summary["hfswarm (no verify)"]["median_s"]
        print(f"\nverification overhead: {100 * (v - nv) / nv:+.1f}% of wall time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cap", default="20MB", help="per-connection cap for the second run")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--checkout", action="append", default=[], help="another checkout's hfswarm")
    args = ap.parse_args()
    for c in args.checkout:
        CHECKOUTS[Path(c).resolve().name] = Path(c).resolve()
    size = parse_size(args.size)
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-bench-"))
    folder = work / "repo"
    make_repo(folder, size)
    print(f"file: {size} bytes; runs: {args.runs}; work: {work}")
    print("\nunshaped loopback")
    a = scenario(folder, size, args.runs, None, work)
    cap = parse_size(args.cap)
    print(f"\nmirror capping each connection at {cap / 1e6:.0f} MB/s")
    b = scenario(folder, size, args.runs, cap, work)
    print_table(f"Unshaped loopback, {size / (1 << 30):.2f} GiB, median of {args.runs}", a)
    print_table(f"Mirror capped at {cap / 1e6:.0f} MB/s per connection, median of {args.runs}", b)


if __name__ == "__main__":
    main()
