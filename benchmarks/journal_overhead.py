"""What journaling progress inside chunks costs: `hfswarm download --no-agent` of one
1 GiB file from the project's mirror (a separate process on 127.0.0.1), run alternately
by this tree and by another checkout of hfswarm (say the commit before the change,
exported with `git archive`), N runs each; median wall time and the ratio.

    git archive 642ceb0 | tar -x -C /tmp/hfswarm-base
    python benchmarks/journal_overhead.py --base /tmp/hfswarm-base --size 1GiB --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import REPO, make_repo, parse_size, start_mirror

HERE = Path(__file__).resolve().parent.parent


def one_run(tree: Path, url: str, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "peer.cli.main", "download", REPO, "--no-agent",
           "--mirror", url, "--cache-dir", str(out), "--quiet"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the other hfswarm checkout")
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-journal-"))
    make_repo(work / "repo", size)
    mirror, url = start_mirror(work / "repo", None)
    trees = {"this tree": HERE, "base": Path(args.base).resolve()}
    times: dict[str, list[float]] = {name: [] for name in trees}
    try:
        for _ in range(args.runs):
            for name, tree in trees.items():  # interleaved: noise hits both alike
                times[name].append(one_run(tree, url, work / "out"))
    finally:
        mirror.terminate()
        mirror.wait()
        shutil.rmtree(work / "out", ignore_errors=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        runs = " ".join(f"{x:.2f}" for x in t)
        print(f"{name:10} median {med[name]:.2f} s  ({size / med[name] / 1e6:.0f} MB/s)  [{runs}]")
    print(f"ratio this tree / base: {med['this tree'] / med['base']:.3f}")


if __name__ == "__main__":
    main()
