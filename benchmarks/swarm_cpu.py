"""CPU and time of one agent -> agent swarm download against bare libtorrent, per checkout.

One seeder agent takes a blob from the project's mirror once. Then, per round, in turn:
  - bare: a bare libtorrent session (the project's session settings, nothing else) adds
    the blob's torrent, connects to the seeder agent, downloads and flushes;
  - for each ``--checkout``: a fresh agent started from that checkout downloads the blob
    from the same seeder through `hfswarm download --agent` (the CLI from that checkout).
Reported per row: wall time, the downloading process's CPU seconds (user + system; for
the agent, /proc/<pid>/stat before and after the download; for the bare session, its
own getrusage from adding the torrent to the flushed end), medians over the rounds, and
for an agent the time line of its download read from its log (``-v``): the request's
arrival, resolve, peer lookup, swarm start, first and last piece, end of the hash, link.

    python benchmarks/swarm_cpu.py --size 1GiB --runs 5 --checkout /tmp/base --checkout .

Every process listens on 127.0.0.x; nothing leaves the machine. Runs are interleaved,
and the order of the rows turns by one each round (bare, 1, 2; then 1, 2, bare; ...), so
a busy machine hurts every row alike. Before every trial the previous trial's files are
deleted, ``sync`` runs, and the trial waits until the kernel holds little dirty or
under-writeback memory (/proc/meminfo): each trial writes the blob, and writeback left
over from one trial otherwise lands in the next (8.21 saw the bare pair alone spread
1.72-4.20 s). Then it waits until ``--settle`` seconds (3) have passed since the last
trial ended, so that the memory that trial freed is always handed back to the host
(see `settle`). ``--drop-caches`` (root) also empties the page cache before every trial
and reads the seeder's blob back in, so every trial starts from the same cache.
``--hold-freed-memory`` (root; machine-wide while it runs, restored on exit; see
vm_memory.py) holds this VM's free page reporting instead, and touches and frees 1.25x
the blob right before every trial: a probe, which did not make the trials' page-cache
cost stable here (docs/benchmarks.md 8.30). ``--prepare touch`` (8.37) touches and frees
twice the blob's size of memory right before every trial's download, so that the trial
writes into memory the guest holds (see vm_memory.py for ``order`` and ``compact``);
what was done is printed. ``--bare-only --prepare A --prepare B`` runs bare rows only,
one per preparation, to see which keeps the bare pair's spread small. An agent's row
also gives its main thread's CPU and its wake-ups (voluntary context switches: a count,
which the machine's load moves less).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import make_repo, parse_size
from vm_memory import MachinePrep, hold_freed_memory, parse_prep, prefault

REPO = "bench/one-file"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of a live process, keyed "tid name" (main thread: "main"):
    from /proc/.../schedstat (nanoseconds on a CPU) where the kernel has it, else from
    /proc/.../stat (10 ms ticks, too coarse for a main thread's 0.1 s)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        f = stat.rsplit(")", 1)[1].split()
        key = "main" if task.name == str(pid) else f"{task.name} {name}"
        out[key] = (int(f[11]) + int(f[12])) / TICKS
        try:
            out[key] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return out


def wakeups(pid: int) -> int:
    """Voluntary context switches of a live process's main thread (its sleeps)."""
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def dirty_bytes() -> int:
    """Dirty + Writeback of /proc/meminfo, bytes (0 where there is none)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Dirty", "Writeback"):
            total += int(rest.split()[0]) * 1024
    return total


def settle(blob: Path | None, drop_caches: bool, pause: float, quiet: int = 16 << 20) -> float:
    """Before a trial: write back what earlier trials left dirty (sync, then wait until
    Dirty + Writeback is under ``quiet``, 10 s at most), optionally drop the page cache
    and read the seeder's blob back in; then wait until ``pause`` seconds have passed in
    all. The pause is for the memory the last trial freed: on this VM (virtio-balloon
    free page reporting) free memory is handed back to the host about 2 s after it is
    freed, and writing into such memory again costs the writer its page faults on the
    host, counted as its CPU (a 1 GiB file written 0.2-1.0 CPU s right after another was
    deleted, 1.1-2.4 s 6 s after; docs/benchmarks.md 8.23). Returns the seconds spent."""
    t0 = time.perf_counter()
    os.sync()
    while dirty_bytes() > quiet and time.perf_counter() - t0 < 10.0:
        time.sleep(0.05)
    if drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        if blob is not None:  # the seeder serves from the page cache, as in every round
            with open(blob, "rb", buffering=0) as f:
                buf = bytearray(8 << 20)
                while f.readinto(buf):
                    pass
    time.sleep(max(0.0, pause - (time.perf_counter() - t0)))
    return time.perf_counter() - t0


def env_for(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout)}


class Agent:
    def __init__(
        self,
        checkout: Path,
        root: Path,
        ip: str,
        mirror: str,
        peers: list[str],
        level: str = "debug",  # hf_endpoint.py and leader_seed.py read its time line
        extra: tuple[str, ...] = (),
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.checkout, self.root, self.ip = checkout, root, ip
        cmd = [sys.executable, "-m", "peer.cli.main", "agent", "--log-level", level,
               "--cache-dir", str(root / "cache"), "--state-dir", str(root / "state"),
               "--listen", f"{ip}:0", "--local-listen", f"{ip}:0", "--bt-listen", f"{ip}:0",
               "--mirror", mirror, "--no-mdns", "--config", os.devnull]  # fmt: skip
        for p in peers:
            cmd += ["--peer", p]
        cmd += extra
        self.log_path = root / "agent.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
            cwd=checkout, env=env_for(checkout),
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.info = json.loads(self.proc.stdout.readline())

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.info['local_port']}"

    @property
    def peer(self) -> str:
        return f"{self.ip}:{self.info['peer_port']}"

    def download(self, profile: Path | None = None) -> tuple[float, float, float]:
        """(wall s, agent CPU s, CLI CPU s) of one `hfswarm download --agent`; with
        `profile`, py-spy samples the agent's threads meanwhile (collapsed stacks there)."""
        spy = None
        if profile is not None and profile.suffix == ".data":
            spy = subprocess.Popen(
                ["perf", "record", "-F", "499", "-g", "-p", str(self.proc.pid), "-o",
                 str(profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)  # perf attaches
        elif profile is not None:
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(self.proc.pid), "--threads", "--native",
                 "--gil", "--rate", "200", "--format", "raw", "--output", str(profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
        before = cpu_of(self.proc.pid)
        threads_before = threads_cpu(self.proc.pid)
        wakes_before = wakeups(self.proc.pid)
        self.started = time.time()
        t0 = time.perf_counter()
        cli = subprocess.Popen(
            [sys.executable, "-m", "peer.cli.main", "download", REPO, "--agent", self.url,
             "--quiet"],
            stdout=subprocess.DEVNULL, cwd=self.checkout, env=env_for(self.checkout),
        )  # fmt: skip
        _, status, usage = os.wait4(cli.pid, 0)
        cli.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        self.ended = time.time()
        after = threads_cpu(self.proc.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        self.main_wakes = wakeups(self.proc.pid) - wakes_before
        self.main_cpu = after["main"] - threads_before["main"]
        self.threads = {
            k: round(v - threads_before.get(k, 0.0), 2)
            for k, v in after.items()
            if v - threads_before.get(k, 0.0) >= 0.02
        }
        if cli.returncode != 0:
            raise SystemExit(f"download failed ({cli.returncode}); see {self.log_path}")
        return wall, cpu_of(self.proc.pid) - before, usage.ru_utime + usage.ru_stime

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# --- the bare libtorrent downloader (a child process: this file with --bare-child) -------


def bare_child(torrent: Path, seeder: str, out: Path, rate: int) -> None:
    import libtorrent as lt

    from peer.transfer.swarm import SwarmSettings

    settings = SwarmSettings(
        listen_host="127.0.0.9", listen_port=0, download_rate_limit=rate, limit_local_peers=True
    ).to_libtorrent()
    ses = lt.session(settings)
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(torrent.read_bytes()))
    atp.save_path = str(out)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    h = ses.add_torrent(atp)
    host, port = seeder.rsplit(":", 1)
    h.connect_peer((host, int(port)))
    finished = flushed = False
    while not flushed:
        ses.wait_for_alert(1000)
        for a in ses.pop_alerts():
            if isinstance(a, lt.torrent_finished_alert) and not finished:
                finished = True
                h.flush_cache()
            elif isinstance(a, lt.cache_flushed_alert) and finished:
                flushed = True
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    st = h.status()
    if st.total_wanted_done != st.total_wanted:
        raise SystemExit(f"bare download incomplete: {st.total_wanted_done}/{st.total_wanted}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(
        json.dumps({"wall": time.perf_counter() - t0, "cpu": cpu, "bytes": st.total_done}),
        flush=True,
    )


def bare(checkout: Path, torrent: Path, seeder: str, out: Path, rate: int) -> tuple[float, float]:
    out.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        [sys.executable, __file__, "--bare-child", str(torrent), seeder, str(out), str(rate)],
        check=True, capture_output=True, text=True, cwd=checkout, env=env_for(checkout),
    )  # fmt: skip
    got = json.loads(res.stdout.strip().splitlines()[-1])
    if got["cpu"] < 0.01:
        print(res.stdout, res.stderr, file=sys.stderr)
    shutil.rmtree(out)
    return got["wall"], got["cpu"]


# --- the time line of one agent download, from its -v log ---------------------------------

MARKS = [  # (label, a substring of the log line that marks it); first match wins
    ("request at the agent (CLI started up)", ": download asked"),
    ("resolved (tree listed)", "/tree/"),
    ("peer lookup done", "peer offers"),
    ("swarm started", ": swarming"),
    ("first piece", ": first piece"),
    ("last piece", ": all pieces had"),
    ("whole-file hash checked (then fsync, rename)", ": whole-file hash checked"),
    ("hash matched, in blobs/", "hash matched"),
    ("linked (job done)", "Done"),
]


def timeline(log: Path, started: float, ended: float) -> list[tuple[str, float]]:
    """(label, seconds after the CLI started) of each mark found in the agent's log
    (its stamps are local time, ms), and the CLI's exit."""
    lines = log.read_text(errors="replace").splitlines()
    out = [("CLI started", 0.0)]
    for label, needle in MARKS:
        hit = next((ln for ln in lines if needle in ln), None)
        if hit is not None:
            stamp = datetime.datetime.strptime(hit[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((label, stamp - started))
    out.append(("CLI exited", ended - started))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--checkout", action="append", default=[], help="repeatable; default .")
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", action="store_true", help="print the agent's CPU per thread")
    ap.add_argument(
        "--drop-caches", action="store_true",
        help="drop the page cache before every trial (root), then re-read the seeder's blob",
    )  # fmt: skip
    ap.add_argument(
        "--settle", type=float, default=3.0,
        help="seconds from the end of one trial to the start of the next, at least",
    )  # fmt: skip
    ap.add_argument(
        "--log-level", default="info",
        help="the downloading agents' log level (info: as users run them; debug adds the"
        " time line of every step)",
    )  # fmt: skip
    ap.add_argument(
        "--hold-freed-memory", action="store_true",
        help="keep freed memory with this VM during the run and touch 1.25x the blob"
        " before every trial (root; sets page_reporting.min_free_ms machine-wide,"
        " restores it on exit)",
    )  # fmt: skip
    ap.add_argument(
        "--rate", default="0",
        help="cap the downloaders (agents: --max-download-rate; the bare session: the same"
        " libtorrent limit) at this many bytes/s (30MB): a long download on loopback, where"
        " what costs CPU per second rather than per byte shows; 0: no cap",
    )  # fmt: skip
    ap.add_argument(
        "--profile", default=None, metavar="DIR",
        help="profile each agent download (--profiler) into DIR/<checkout>-<round>.txt"
        " (py-spy's collapsed stacks) or .data (perf's)",
    )  # fmt: skip
    ap.add_argument(
        "--profiler", choices=("py-spy", "perf"), default="py-spy",
        help="--profile's tool: py-spy (Python stacks of the threads holding the GIL) or"
        " perf record -g (every thread, libtorrent's too; perf report --sort tid,sym)",
    )  # fmt: skip
    ap.add_argument(
        "--prepare", action="append", default=[], metavar="STEPS",
        help="prepare the machine for every trial: none, or touch / order / compact joined"
        " by + (vm_memory.py; order and compact need root and are machine-wide); repeat"
        " with --bare-only for one bare row per preparation",
    )  # fmt: skip
    ap.add_argument(
        "--bare-only", action="store_true",
        help="no agent rows: the bare pair only (with several --prepare, one row each)",
    )  # fmt: skip
    ap.add_argument("--bare-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_child:
        c = args.bare_child
        bare_child(Path(c[0]), c[1], Path(c[2]), int(c[3]))
        return
    preps = [parse_prep(x) for x in args.prepare] or [frozenset()]
    if len(preps) > 1 and not args.bare_only:
        raise SystemExit("several --prepare: only with --bare-only (one bare row each)")
    with (
        hold_freed_memory(args.hold_freed_memory),
        MachinePrep(preps, parse_size(args.size)) as prep,
    ):
        for line in prep.describe():
            print(f"  machine prepared: {line}", flush=True)
        run(args, prep)


def run(args: argparse.Namespace, prep: MachinePrep) -> None:
    checkouts = [Path(c).resolve() for c in (args.checkout or ["."])]
    # Row name -> its preparation: "bare" and the checkouts share the one given, or with
    # --bare-only and several, one bare row per preparation ("bare touch", ...).
    bare_rows = ["bare"]
    if len(prep.variants) > 1:
        bare_rows = ["bare " + ("+".join(sorted(v)) or "none") for v in prep.variants]
    variant_of = dict(zip(bare_rows, prep.variants, strict=False))
    here = checkouts[-1]
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-cpu-bench-"))
    size = parse_size(args.size)
    rate = parse_size(args.rate) if args.rate != "0" else 0
    extra = ("--max-download-rate", str(rate)) if rate else ()
    profile = Path(args.profile).resolve() if args.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
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
    seeder = Agent(here, work / "seeder", "127.0.0.2", url, [], "info")
    rows: dict[str, dict[str, list[float]]] = {b: {"wall": [], "cpu": []} for b in bare_rows}
    for c in [] if args.bare_only else checkouts:
        rows[str(c)] = {"wall": [], "cpu": [], "cli_cpu": [], "main_cpu": [], "main_wakes": []}
    lines: dict[str, list[list[tuple[str, float]]]] = {}  # per checkout, per round
    try:
        seeder.download()
        blob = max(
            (work / "seeder/cache").glob("models--*/blobs/*"), key=lambda p: p.stat().st_size
        )
        torrent = work / "blob.torrent"
        subprocess.run(
            [sys.executable, "-c",
             "import asyncio, sys; from pathlib import Path;"
             "from peer.manifests import VerifiedBlob, make_manifest;"
             "p = Path(sys.argv[1]);"
             "m = asyncio.run(make_manifest(VerifiedBlob(p.name, p.stat().st_size, p), 'b'));"
             "Path(sys.argv[2]).write_bytes(m.torrent)", str(blob), str(torrent)],
            check=True, cwd=here, env=env_for(here),
        )  # fmt: skip
        bt_seeder = f"127.0.0.2:{seeder.info['bt_port']}"
        order = [*bare_rows, *([] if args.bare_only else map(str, checkouts))]
        waited: list[float] = []
        for r in range(args.runs):
            msg = []
            # The order turns each round: no row always runs first, or right after another.
            for row in order[r % len(order) :] + order[: r % len(order)]:
                variant = variant_of.get(row, prep.variants[0])
                waited.append(settle(blob, args.drop_caches, args.settle))
                prep.before_trial(variant, blob)
                if args.hold_freed_memory:
                    prefault(size + size // 4)
                if row in variant_of:
                    prep.before_download(variant)
                    w, c = bare(here, torrent, bt_seeder, work / "bare", rate)
                    rows[row]["wall"].append(w)
                    rows[row]["cpu"].append(c)
                    msg.append(f"{row} {w:.2f} s / {c:.2f} cpu")
                    continue
                co = Path(row)
                d = Agent(
                    co, work / f"d-{r}", "127.0.0.3", url, [seeder.peer], args.log_level, extra
                )
                spy = None
                if profile is not None:
                    ext = "data" if args.profiler == "perf" else "txt"
                    spy = profile / f"{co.name or 'root'}-{r + 1}.{ext}"
                try:
                    prep.before_download(variant)
                    w, c, cc = d.download(spy)
                finally:
                    d.stop()
                rows[row]["wall"].append(w)
                rows[row]["cpu"].append(c)
                rows[row]["cli_cpu"].append(cc)
                rows[row]["main_cpu"].append(d.main_cpu)
                rows[row]["main_wakes"].append(d.main_wakes)
                lines.setdefault(row, []).append(timeline(d.log_path, d.started, d.ended))
                if args.threads:
                    print(f"    {co.name} threads: {d.threads}", flush=True)
                shutil.rmtree(d.root)
                msg.append(f"{co.name or co} {w:.2f} s / {c:.2f} cpu ({d.main_cpu:.3f} main)")
            print(f"  run {r + 1} (load {os.getloadavg()[0]:.1f}): " + ", ".join(msg), flush=True)
        print(f"  settled before each trial in {min(waited):.2f}-{max(waited):.2f} s", flush=True)
    finally:
        seeder.stop()
        mirror.send_signal(signal.SIGTERM)
        mirror.wait()
    med = {k: {m: statistics.median(v) for m, v in row.items()} for k, row in rows.items()}
    print(json.dumps({"size": size, "runs": rows, "median": med}, indent=1))
    # How far each bare row spread: what decides whether the rows can be ranked at all.
    print(f"\n| bare pair, {size / (1 << 30):.2f} GiB | wall s, median | max / min "
          "| CPU s, median | max / min | wall s per round | CPU s per round |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for k in bare_rows:
        w, c = rows[k]["wall"], rows[k]["cpu"]
        print(
            f"| {k} | {med[k]['wall']:.2f} | {max(w) / min(w):.2f}x | {med[k]['cpu']:.2f}"
            f" | {max(c) / min(c):.2f}x | {', '.join(f'{x:.2f}' for x in w)}"
            f" | {', '.join(f'{x:.2f}' for x in c)} |"
        )
    if args.bare_only:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        return
    b = med["bare"]
    print(f"\n| {size / (1 << 30):.2f} GiB, median of {args.runs} | wall s | CPU s "
          "| wall vs bare | CPU - bare | CLI CPU s | main thread CPU s "
          "| main thread wake-ups |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| bare libtorrent | {b['wall']:.2f} | {b['cpu']:.2f} | 1.00x | +0.00 | - | - | - |")
    for k, m in med.items():
        if k != "bare":
            print(
                f"| agent ({k}) | {m['wall']:.2f} | {m['cpu']:.2f} | {m['wall'] / b['wall']:.2f}x"
                f" | {m['cpu'] - b['cpu']:+.2f} | {m['cli_cpu']:.2f} | {m['main_cpu']:.3f}"
                f" | {m['main_wakes']:.0f} |"
            )
    # Paired by round (the rows of one round ran back to back): what the medians of
    # rows taken from different rounds hide when the machine's load moves.
    print(f"\n| per round | {' | '.join(map(str, range(1, args.runs + 1)))} |")
    print("|---|" + "---|" * args.runs)
    for k, row in rows.items():
        if k != "bare":
            d_cpu = [c - bc for c, bc in zip(row["cpu"], rows["bare"]["cpu"], strict=True)]
            ratio = [w / bw for w, bw in zip(row["wall"], rows["bare"]["wall"], strict=True)]
            print(f"| {k}: CPU - bare s | " + " | ".join(f"{x:+.2f}" for x in d_cpu) + " |")
            print(f"| {k}: wall / bare | " + " | ".join(f"{x:.2f}x" for x in ratio) + " |")
            print(f"| {k}: main thread CPU s | "
                  + " | ".join(f"{x:.3f}" for x in row["main_cpu"]) + " |")  # fmt: skip
    if args.log_level != "debug":
        # At info the log names only the ends: a table of its steps would be dashes.
        print("\n(the time line of each step: --log-level debug)")
        lines = {}
    for k, rounds in lines.items():
        print(f"\ntime line of the last agent download ({k}):")
        for label, at in rounds[-1]:
            print(f"  {at:7.3f} s  {label}")
    if lines:
        # Each step's median over the rounds: the start-up steps do not depend on the
        # machine's load as much as the piece stream does, which this splits off.
        labels = [label for label, _ in next(iter(lines.values()))[-1]] if lines else []
        print("\n| step, s after the CLI started (median of rounds) | "
              + " | ".join(Path(k).name or k for k in lines) + " |")  # fmt: skip
        print("|---|" + "---|" * len(lines))
        for label in labels:
            cells = []
            for rounds in lines.values():
                got = [at for tl in rounds for lb, at in tl if lb == label]
                cells.append(f"{statistics.median(got):.3f}" if got else "-")
            print(f"| {label} | " + " | ".join(cells) + " |")
        spans = [
            ("swarm started", "last piece"),
            ("last piece", "whole-file hash checked (then fsync, rename)"),
            ("whole-file hash checked (then fsync, rename)", "hash matched, in blobs/"),
            ("last piece", "hash matched, in blobs/"),
            ("last piece", "CLI exited"),
        ]
        for a, b in spans:
            cells = []
            for rounds in lines.values():
                got = [
                    dict(tl)[b] - dict(tl)[a] for tl in rounds if a in dict(tl) and b in dict(tl)
                ]
                cells.append(f"{statistics.median(got):.3f}" if got else "-")
            print(f"| {a} -> {b} | " + " | ".join(cells) + " |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
