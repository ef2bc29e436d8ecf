"""CPU of the page-cache work behind a swarm download, measured alone (docs/benchmarks.md 8.23).

    python benchmarks/page_cache_cpu.py follow --rounds 7 [--busy-threads 2]
    python benchmarks/page_cache_cpu.py rewrite --rounds 6

follow: 1 GiB already in the page cache hashed in 32 MiB steps, as the swarm download's
hash follower does: copied out with ``readinto`` (512 KiB blocks), or through read-only
mappings (with and without ``MAP_POPULATE``), against the sha256 alone; CPU seconds of
the hashing thread, variants interleaved with the order turned each round.
``--busy-threads`` keeps other threads of the process hashing meanwhile (an unmapping
interrupts the cores that run them; in the agent, libtorrent's threads).

rewrite: a 1 GiB file written (1 MiB writes) right after another 1 GiB file was deleted,
or ``--pause`` seconds after: on a VM whose balloon reports free memory to the host,
writing into memory handed back costs the writer its faults on the host.
``--hold-freed-memory`` (root, machine-wide, restored on exit; see vm_memory.py) holds
free page reporting meanwhile, and ``--prefault`` touches and frees 1.25 GiB right before
each timed write: probes, which did not keep the write cheap here (docs/benchmarks.md 8.30).
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vm_memory import hold_freed_memory, prefault

SIZE = 1 << 30
STEP = 32 << 20
BLOCK = 512 << 10


def follow(path: Path, rounds: int, busy: int) -> None:
    with open(path, "wb") as f:
        chunk = os.urandom(8 << 20)
        for _ in range(SIZE // len(chunk)):
            f.write(chunk)
    with open(path, "rb") as f:  # into the page cache
        while f.read(8 << 20):
            pass

    def readinto() -> None:
        h, buf = hashlib.sha256(), bytearray(BLOCK)
        view = memoryview(buf)
        for start in range(0, SIZE, STEP):
            with open(path, "rb", buffering=0) as f:
                f.seek(start)
                fed = 0
                while fed < STEP:
                    n = f.readinto(view[: min(BLOCK, STEP - fed)])
                    h.update(view[:n])
                    fed += n

    def mapped(flags: int) -> Callable[[], None]:
        def run() -> None:
            h = hashlib.sha256()
            for start in range(0, SIZE, STEP):
                with open(path, "rb", buffering=0) as f:
                    m = mmap.mmap(f.fileno(), STEP, flags=flags, prot=mmap.PROT_READ, offset=start)
                    with memoryview(m) as v:
                        h.update(v)
                    m.close()

        return run

    def alone() -> None:
        h, b = hashlib.sha256(), bytes(BLOCK)
        for _ in range(SIZE // BLOCK):
            h.update(b)

    variants: dict[str, Callable[[], None]] = {
        "readinto 512 KiB": readinto,
        "mmap + MAP_POPULATE": mapped(mmap.MAP_SHARED | mmap.MAP_POPULATE),
        "mmap": mapped(mmap.MAP_SHARED),
        "sha256 alone": alone,
    }
    stop = threading.Event()

    def spin() -> None:
        b, h = bytes(1 << 20), hashlib.sha256()
        while not stop.is_set():
            h.update(b)

    spinners = [threading.Thread(target=spin) for _ in range(busy)]
    for t in spinners:
        t.start()
    got: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for r in range(rounds):
            names = list(variants)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.thread_time()
                variants[name]()
                got[name].append(round(time.thread_time() - t0, 3))
    finally:
        stop.set()
        for t in spinners:
            t.join()
    print(f"| 1 GiB from the page cache, load {os.getloadavg()[0]:.1f} | median CPU s | rounds |")
    print("|---|---|---|")
    for name, v in got.items():
        print(f"| {name} | {statistics.median(v):.3f} | {', '.join(map(str, v))} |")


def rewrite(folder: Path, rounds: int, pause: float, pre: bool) -> None:
    buf = os.urandom(1 << 20)

    def write(path: Path) -> tuple[float, float]:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            for _ in range(SIZE // len(buf)):
                f.write(buf)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return time.perf_counter() - t0, cpu

    got: dict[str, list[tuple[float, float]]] = {"right after": [], f"{pause:g} s after": []}
    for r in range(rounds):
        names = list(got) if r % 2 == 0 else list(reversed(got))
        for name in names:
            write(folder / "a")
            os.sync()
            (folder / "a").unlink()
            if name != "right after":
                time.sleep(pause)
            if pre:
                prefault(SIZE + SIZE // 4)
            got[name].append(write(folder / "b"))
            (folder / "b").unlink()
            os.sync()
            time.sleep(0.5)
    print("| 1 GiB written after 1 GiB was freed | CPU s per round | wall s per round |")
    print("|---|---|---|")
    for name, v in got.items():
        cpu = ", ".join(f"{c:.2f}" for _, c in v)
        wall = ", ".join(f"{w:.2f}" for w, _ in v)
        print(f"| {name} | {cpu} | {wall} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["follow", "rewrite"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--busy-threads", type=int, default=0)
    ap.add_argument("--pause", type=float, default=6.0)
    ap.add_argument(
        "--work", default=None, help="a folder on the disk to measure (default: a temp dir)"
    )
    ap.add_argument(
        "--hold-freed-memory", action="store_true",
        help="rewrite: keep freed memory with this VM during the run (root; sets"
        " page_reporting.min_free_ms machine-wide, restores it on exit)",
    )  # fmt: skip
    ap.add_argument(
        "--prefault", action="store_true",
        help="rewrite: touch and free 1.25 GiB of memory right before each timed write",
    )  # fmt: skip
    args = ap.parse_args()
    with (
        hold_freed_memory(args.hold_freed_memory),
        tempfile.TemporaryDirectory(dir=args.work) as tmp,
    ):
        if args.what == "follow":
            follow(Path(tmp) / "blob", args.rounds, args.busy_threads)
        else:
            rewrite(Path(tmp), args.rounds, args.pause, args.prefault)


if __name__ == "__main__":
    main()
