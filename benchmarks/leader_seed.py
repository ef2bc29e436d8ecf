"""The leader's first fetch: CPU and time from the mirror download's start to "seeded".

One blob on the project's mirror (a separate process on 127.0.0.1). Per round, for each
``--checkout`` in turn, a fresh agent started from that checkout (no peers, no mDNS: it
leads) takes the repo through `hfswarm download --agent` (the CLI from that checkout).
The agent answers the job only once the blob is verified, installed and seeded (its
manifest made and its torrent added: `BlobFetcher` awaits `offer_verified`), so the
CLI's exit is "seeded"; right after it, the agent's peer API must offer the blob's
manifest (checked, with its info-hash, which must be the same from every checkout).
Reported per row: wall time, the agent's CPU seconds (/proc/<pid>/stat before and after),
the tail from the last byte received (the agent's /v1/status, polled every 50 ms) to
"seeded", the CLI's CPU, medians over the rounds, and the ratio to the first checkout.

    python benchmarks/leader_seed.py --size 1GiB --runs 5 --checkout /tmp/base --checkout .
    python benchmarks/leader_seed.py --size 1GiB --runs 5 --step   # the step alone

Runs are interleaved (checkout 1, checkout 2, checkout 1, ...), so a busy machine hurts
every row alike. Each agent's blob is new to the page cache only as the mirror sends it
(the hash follower drops what it hashed, so a second pass reads it back).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's peer
from mirror_download import make_repo, parse_size
from swarm_cpu import REPO, Agent, env_for

from peer import wire


def offered_info_hash(agent: Agent, blob_id: str) -> str:
    """The info-hash of the manifest the agent's peer API offers for the blob (its
    seeded torrent); fails if it offers none."""
    body = wire.encode(wire.HaveRequest(blob_ids=(blob_id,)))
    req = urllib.request.Request(
        f"http://{agent.peer}/v1/have",
        data=body,
        headers={"Content-Type": "application/msgpack"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = wire.decode_as(resp.read(), wire.HaveResponse)
    if len(answer.manifests) != 1:
        raise SystemExit(f"the agent does not offer {blob_id} after its download")
    return answer.manifests[0].info_hash


def step(size: int, runs: int, work: Path) -> None:
    """The step itself, in this process (this checkout): the manifest of a verified
    ``size``-byte blob made by re-reading it (what a leader did after the mirror fetch:
    libtorrent hashes the file; pages cached, and dropped as the hash follower leaves
    them) against the tree fed the same bytes in the follower's 8 MiB reads (CPU that
    moves into the follower) plus the manifest made from it. Wall and CPU (getrusage of
    this process: libtorrent's hashing threads included), medians, interleaved."""
    import asyncio
    import hashlib
    import os
    import resource

    from peer.manifests import V2TreeBuilder, VerifiedBlob, make_manifest

    work.mkdir(parents=True, exist_ok=True)
    block = os.urandom(8 << 20)
    whole = hashlib.sha256()
    tmp = work / "blob"
    with open(tmp, "wb") as f:
        left, i = size, 0
        while left:
            data = (i.to_bytes(8, "little") + block[8:])[: min(left, len(block))]
            whole.update(data)
            f.write(data)
            left -= len(data)
            i += 1
        f.flush()
        os.fsync(f.fileno())
    path = tmp.rename(work / whole.hexdigest())
    blob_id = path.name

    def measured(fn: object) -> tuple[float, float, object]:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = fn()  # type: ignore[operator]
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), out

    def reread() -> object:
        return asyncio.run(make_manifest(VerifiedBlob(blob_id, size, path), "b"))

    def dropped() -> object:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return None

    def tree() -> object:
        b = V2TreeBuilder(blob_id, size)
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                b.update(view[:n])
        return asyncio.run(make_manifest(VerifiedBlob(blob_id, size, path, tree=b.finish()), "b"))

    rows: dict[str, dict[str, list[float]]] = {
        k: {"wall": [], "cpu": []}
        for k in ("re-read, in page cache", "re-read, pages dropped", "tree, in page cache")
    }
    manifests = set()
    for r in range(runs):
        for label, fn in (
            ("re-read, in page cache", reread),
            ("re-read, pages dropped", reread),
            ("tree, in page cache", tree),
        ):
            if "dropped" in label:
                dropped()
            else:
                with open(path, "rb") as f:  # warm: as the follower just read it
                    while f.read(8 << 20):
                        pass
            wall, cpu, m = measured(fn)
            manifests.add(m)
            rows[label]["wall"].append(wall)
            rows[label]["cpu"].append(cpu)
        print(f"  round {r + 1}: " + ", ".join(
            f"{k} {v['wall'][-1]:.2f} s / {v['cpu'][-1]:.2f} cpu" for k, v in rows.items()
        ), flush=True)  # fmt: skip
    if len(manifests) != 1:
        raise SystemExit("the tree and the re-read made different manifests")
    print(f"\n| {size / (1 << 30):.2f} GiB, median of {runs} | wall s | CPU s |")
    print("|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {statistics.median(v['wall']):.2f} | {statistics.median(v['cpu']):.2f} |")
    path.unlink()


class LastByte:
    """Polls the agent's /v1/status (every 50 ms, in a thread) for the moment its one
    big transfer has every byte (``done == size``): what follows, to the CLI's exit, is
    the tail after the download (the hash follower catching up, the manifest, seeding)."""

    def __init__(self, agent: Agent, size: int) -> None:
        self.agent, self.size, self.at = agent, size, float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                with urllib.request.urlopen(f"{self.agent.url}/v1/status", timeout=5) as r:
                    status = json.loads(r.read())
            except OSError:
                continue
            if any(t["size"] == self.size and t["done"] >= t["size"] for t in status["transfers"]):
                self.at = time.time()
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--checkout", action="append", default=[], help="repeatable; default .")
    ap.add_argument("--work", default=None)
    ap.add_argument("--step", action="store_true", help="time the manifest step alone")
    args = ap.parse_args()
    if args.step:
        step(parse_size(args.size), args.runs, Path(args.work or tempfile.mkdtemp()))
        return
    checkouts = [Path(c).resolve() for c in (args.checkout or ["."])]
    here = Path(".").resolve()
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-leader-bench-"))
    size = parse_size(args.size)
    folder = work / f"repo-{size}"
    make_repo(folder, size)
    mirror = subprocess.Popen(
        [sys.executable, "-m", "peer.cli.main", "mirror", "serve", "--listen", "127.0.0.1:0",
         f"model:{REPO}={folder}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=here, env=env_for(here),
    )  # fmt: skip
    assert mirror.stdout is not None
    url = mirror.stdout.readline().strip()
    rows = {str(c): {"wall": [], "cpu": [], "cli_cpu": [], "tail": []} for c in checkouts}
    info_hashes: set[str] = set()
    try:
        for r in range(args.runs):
            msg = []
            for k, co in enumerate(checkouts):
                a = Agent(co, work / f"a-{r}-{k}", "127.0.0.4", url, [])
                try:
                    last = LastByte(a, size)
                    w, c, cc = a.download()
                    tail = a.ended - last.stop()
                    blob = max(
                        (a.root / "cache").glob("models--*/blobs/*"),
                        key=lambda p: p.stat().st_size,
                    )
                    t0 = time.perf_counter()
                    info_hashes.add(offered_info_hash(a, blob.name))
                    asked = time.perf_counter() - t0
                finally:
                    a.stop()
                rows[str(co)]["wall"].append(w)
                rows[str(co)]["cpu"].append(c)
                rows[str(co)]["cli_cpu"].append(cc)
                rows[str(co)]["tail"].append(tail)
                shutil.rmtree(a.root)
                msg.append(
                    f"{co.name or co} {w:.2f} s / {c:.2f} cpu / tail {tail:.2f} s"
                    f" (have: {asked:.3f} s)"
                )
            print(f"  run {r + 1}: " + ", ".join(msg), flush=True)
    finally:
        mirror.send_signal(signal.SIGTERM)
        mirror.wait()
    if len(info_hashes) != 1:
        raise SystemExit(f"the checkouts seeded different torrents: {sorted(info_hashes)}")
    med = {k: {m: statistics.median(v) for m, v in row.items()} for k, row in rows.items()}
    print(json.dumps({"size": size, "runs": rows, "median": med}, indent=1))
    first = med[str(checkouts[0])]
    print(f"\n| {size / (1 << 30):.2f} GiB, median of {args.runs} | wall s | agent CPU s "
          "| wall ratio | CPU ratio | last byte -> seeded s | CLI CPU s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for k, m in med.items():
        print(
            f"| {k} | {m['wall']:.2f} | {m['cpu']:.2f} | {m['wall'] / first['wall']:.2f}x"
            f" | {m['cpu'] / first['cpu']:.2f}x | {m['tail']:.2f} | {m['cli_cpu']:.2f} |"
        )
    print(f"\none info-hash from every checkout: {info_hashes.pop()}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
