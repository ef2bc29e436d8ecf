"""First fetch through olah (a real HF mirror) in front of the project's mirror: hfswarm
`download --no-agent` vs `hf download` (huggingface_hub's CLI) vs `aria2c -x16 -s16`.

olah (`pip install olah`) runs as users run it (`python -m olah.server -c olah.toml`),
proxying the project's mirror on loopback. Two phases, tools interleaved per round
(their order rotated each round):
  - cold: olah is restarted with an empty repos folder before every tool's run, so
    every byte goes through olah to the upstream;
  - warm: olah has the repo cached (one fill before the phase), nothing goes upstream.
Reported per tool: wall time (median of the rounds), and the upstream GETs of file
bodies (the project's mirror counts them per file) and requests olah answered.

    python benchmarks/olah_first_fetch.py --shards 3 --shard-size 100MB --runs 3 \
        --checkout /path/to/another/checkout   # optional: its hfswarm too, side by side

aria2c is optional (`apt-get install aria2`); it is skipped when not on PATH. Nothing
leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import parse_size

REPO = "bench/olah-repo"
EXE = [sys.executable, "-m", "peer.cli.main"]
HERE = Path(__file__).resolve().parent.parent  # this checkout


def env_for(checkout: Path) -> dict[str, str]:
    """`python -m peer.cli.main` imports that checkout's code (not an installed copy)."""
    return {**os.environ, "PYTHONPATH": str(checkout)}


def make_repo(folder: Path, shards: int, size: int) -> None:
    # The marker lives beside the repo, not in it: the mirror serves every file of the
    # folder, and a marker in it was one more request for hfswarm and `hf download`
    # (aria2c is given the listed files only).
    marker = folder.parent / f".made-{folder.name}"
    (folder / ".made").unlink(missing_ok=True)  # where earlier versions put it
    if marker.exists() and marker.read_text() == f"{shards}x{size}":
        return
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(8 << 20)
    for s in range(shards):
        with open(folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            left, i = size, 0
            while left:
                data = (s.to_bytes(4, "little") + i.to_bytes(8, "little") + block[12:])[
                    : min(left, len(block))
                ]
                f.write(data)
                left -= len(data)
                i += 1
    (folder / "config.json").write_text('{"bench": "olah"}')
    marker.write_text(f"{shards}x{size}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Olah:
    def __init__(self, root: Path, upstream: str) -> None:
        self.root, self.upstream = root, upstream.removeprefix("http://")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, empty: bool) -> None:
        if empty:
            shutil.rmtree(self.root / "repos", ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "olah.toml"
        conf.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.root / "repos"}"\n'
            f'hf-scheme = "http"\nhf-netloc = "{self.upstream}"\n'
            f'hf-lfs-netloc = "{self.upstream}"\n'
            f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
        )
        log = open(self.root / "olah.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "-c", str(conf),
             "--log-path", str(self.root / "logs")],
            cwd=self.root, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (its home page may fail to render)
            except OSError:
                time.sleep(0.1)
        raise SystemExit("olah did not start; see " + str(self.root / "olah.log"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def mirror_gets(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_mirror/stats") as r:
        return sum(json.load(r).get("gets_per_file", {}).values())


def run_tool(
    tool: str, olah: str, work: Path, files: list[str], commit: str, checkouts: dict[str, Path]
) -> float:
    out = work / f"out-{tool.replace(' ', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    cwd = checkouts.get(tool, HERE)
    env = {**env_for(cwd), "HF_ENDPOINT": olah, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_ENABLE_HF_TRANSFER", None)
    if tool.startswith("hfswarm"):
        cmd = [*EXE, "download", REPO, "--no-agent", "--mirror", olah, "--cache-dir", str(out),
               "--quiet"]  # fmt: skip
    elif tool == "hf download":
        cmd = ["hf", "download", REPO, "--cache-dir", str(out)]
    else:
        out.mkdir(parents=True)
        listing = out / "urls.txt"
        listing.write_text(
            "".join(f"{olah}/{REPO}/resolve/{commit}/{f}\n  out={f}\n" for f in files)
        )
        cmd = ["aria2c", "-x16", "-s16", "-j8", "-q", "--dir", str(out), "-i", str(listing),
               "--auto-file-renaming=false", "--allow-overwrite=true"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=cwd)
    took = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--phases", default="cold,warm")
    ap.add_argument("--tools", default="hfswarm,hf download,aria2c")
    ap.add_argument(
        "--checkout",
        action="append",
        default=[],
        help="run hfswarm from this checkout as well (tool hfswarm@<its folder name>)",
    )
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-olah-bench-"))
    folder = work / "repo"
    make_repo(folder, args.shards, parse_size(args.shard_size))
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    tools = [t for t in args.tools.split(",") if t != "aria2c" or shutil.which("aria2c")]
    checkouts = {f"hfswarm@{Path(c).resolve().name}": Path(c).resolve() for c in args.checkout}
    tools = list(checkouts) + tools
    mirror = subprocess.Popen(
        [*EXE, "mirror", "serve", "--listen", "127.0.0.1:0", f"model:{REPO}={folder}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=HERE, env=env_for(HERE),
    )  # fmt: skip
    assert mirror.stdout is not None
    url = mirror.stdout.readline().strip()
    with urllib.request.urlopen(f"{url}/api/models/{REPO}/revision/main") as r:
        commit = json.load(r)["sha"]
    olah = Olah(work / "olah", url)
    res: dict[str, dict[str, list[float]]] = {}
    gets: dict[str, dict[str, list[int]]] = {}
    try:
        for phase in args.phases.split(","):
            if phase == "warm":
                olah.stop()
                olah.start(empty=True)
                # fills olah's cache
                run_tool("hf download", olah.url, work, files, commit, checkouts)
            for r in range(args.runs):
                line = []
                # the order rotates each round: no tool always runs first (or last)
                for tool in tools[r % len(tools) :] + tools[: r % len(tools)]:
                    if phase == "cold":
                        olah.stop()
                        olah.start(empty=True)
                    before = mirror_gets(url)
                    took = run_tool(tool, olah.url, work, files, commit, checkouts)
                    n = mirror_gets(url) - before
                    res.setdefault(phase, {}).setdefault(tool, []).append(took)
                    gets.setdefault(phase, {}).setdefault(tool, []).append(n)
                    line.append(f"{tool} {took:.2f} s ({n} upstream GETs)")
                print(f"  {phase} run {r + 1}: " + ", ".join(line), flush=True)
    finally:
        olah.stop()
        mirror.send_signal(signal.SIGTERM)
        mirror.wait()
    size = sum((folder / f).stat().st_size for f in files)
    print(json.dumps({"bytes": size, "runs_s": res, "upstream_gets": gets}, indent=1))
    for phase, by_tool in res.items():
        ref = statistics.median(by_tool.get("hf download", [float("nan")]))
        print(f"\n| {phase}, {size / 1e6:.0f} MB, median of {args.runs} | s | MB/s "
              "| vs hf download | upstream GETs | runs (s) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for tool, v in by_tool.items():
            m = statistics.median(v)
            print(
                f"| {tool} | {m:.2f} | {size / m / 1e6:.0f} | {m / ref:.2f}x "
                f"| {statistics.median(gets[phase][tool]):.0f} | "
                + ", ".join(f"{x:.2f}" for x in v)
                + " |"
            )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
