"""libtorrent settings one at a time: a bare seeder and a bare downloader (two processes,
libtorrent alone, the project's session settings plus ONE change) moving one blob.

For each variant, interleaved per round (baseline, variant 1, variant 2, ..., then the
next round): a seeder process adds the blob's torrent in seed mode, a downloader process
adds it empty, connects, downloads and flushes. Reported per variant (medians): wall time
from adding the torrent to the flushed end, time to the first piece, the downloader's and
the seeder's CPU seconds, and the ratio to the baseline of the same run.

    python benchmarks/lt_settings.py --size 1GiB --runs 3

A variant is `name=key:value[,key:value]` (`--variant`, repeatable); without any, the
built-in list below runs. The key `ssl:1` is not a libtorrent setting: it makes that
variant run as cluster mode does (the torrent's SSL variant rooted in a cluster CA made
for the run, an SSL-only listen socket, member certificates on both ends). Everything
on 127.0.0.x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import parse_size

VARIANTS: dict[str, dict[str, int | bool]] = {
    "baseline": {},
    "tick_interval 100 ms": {"tick_interval": 100},
    "connection_speed 200": {"connection_speed": 200},
    "send_buffer_watermark 500 KiB (lt default)": {"send_buffer_watermark": 500 * 1024},
    "send_buffer_watermark 16 MiB": {"send_buffer_watermark": 16 << 20},
    "socket buffers 4 MiB": {
        "send_socket_buffer_size": 4 << 20,
        "recv_socket_buffer_size": 4 << 20,
    },
    "aio_threads 2": {"aio_threads": 2},
    "aio_threads 16": {"aio_threads": 16},
    "hashing_threads 1": {"hashing_threads": 1},
    "hashing_threads 4": {"hashing_threads": 4},
    "max_out_request_queue 500": {"max_out_request_queue": 500},
    "max_out_request_queue 5000": {"max_out_request_queue": 5000},
    "request_queue_time 10 s": {"request_queue_time": 10},
    "max_queued_disk_bytes 1 MiB": {"max_queued_disk_bytes": 1 << 20},
    "max_queued_disk_bytes 64 MiB": {"max_queued_disk_bytes": 64 << 20},
}


def settings(ip: str, change: dict[str, int | bool], ssl: Any = None) -> dict[str, object]:
    from peer.transfer.swarm import SwarmSettings

    pack = dict(SwarmSettings(listen_host=ip, listen_port=0, ssl=ssl).to_libtorrent())
    pack.update(change)
    return pack


def ssl_identity(work: Path, name: str) -> Any:
    """Cluster mode's SSL identity for one end (the CA made once per work folder)."""
    from peer.cluster.credentials import ClusterDir, load_member
    from peer.cluster.tls import FFDHE2048_PEM
    from peer.transfer.swarm import SslIdentity

    ca = ClusterDir(work / "ca")
    if not ca.ca_key.exists():
        ca.init("bench")
    member = work / f"{name}.pem"
    if not member.exists():
        ca.enroll(name, member)
    dh = work / "dhparams.pem"
    if not dh.exists():
        dh.write_text(FFDHE2048_PEM)
    m = load_member(member)
    return SslIdentity(m.ca_pem, str(member), str(member), str(dh))


def child(role: str, torrent: Path, folder: Path, change: str, peer: str) -> None:
    """One session: `seed` prints its port and waits for stdin to close; `get`
    downloads from `peer`, flushes and prints its figures."""
    import libtorrent as lt

    from peer.transfer.swarm import _ssl_variant

    ip = "127.0.0.20" if role == "seed" else "127.0.0.21"
    spec = json.loads(change)
    ident = ssl_identity(torrent.parent, role) if spec.pop("ssl", 0) else None
    ses = lt.session(settings(ip, spec, ident))
    data = torrent.read_bytes()
    if ident is not None:
        data = _ssl_variant(data, ident.root_cert_pem)
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(data))
    atp.save_path = str(folder)
    if role == "seed":
        atp.flags |= lt.torrent_flags.seed_mode
        h = ses.add_torrent(atp)
        if ident is not None:
            h.set_ssl_certificate(ident.cert_path, ident.key_path, ident.dh_params_path)
        port = ses.ssl_listen_port() if ident is not None else ses.listen_port()
        print(json.dumps({"port": port}), flush=True)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        sys.stdin.read()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        print(json.dumps({"cpu": cpu}), flush=True)
        return
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    h = ses.add_torrent(atp)
    if ident is not None:
        h.set_ssl_certificate(ident.cert_path, ident.key_path, ident.dh_params_path)
    host, port = peer.rsplit(":", 1)
    h.connect_peer((host, int(port)))
    first = None
    finished = flushed = False
    while not flushed:
        ses.wait_for_alert(1000)
        for a in ses.pop_alerts():
            if isinstance(a, lt.piece_finished_alert) and first is None:
                first = time.perf_counter() - t0
            elif isinstance(a, lt.torrent_finished_alert) and not finished:
                finished = True
                h.flush_cache()
            elif isinstance(a, lt.cache_flushed_alert) and finished:
                flushed = True
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    st = h.status()
    assert st.total_wanted_done == st.total_wanted, "incomplete"
    print(
        json.dumps(
            {
                "wall": time.perf_counter() - t0,
                "first": first,
                "cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
            }
        ),
        flush=True,
    )


def one(torrent: Path, blob_dir: Path, work: Path, change: dict[str, int | bool]) -> dict:
    spec = json.dumps(change)
    seed = subprocess.Popen(
        [sys.executable, __file__, "--child", "seed", str(torrent), str(blob_dir), spec, ""],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert seed.stdout is not None and seed.stdin is not None
    port = json.loads(seed.stdout.readline())["port"]
    out = work / "get"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    got = subprocess.run(
        [sys.executable, __file__, "--child", "get", str(torrent), str(out), spec,
         f"127.0.0.20:{port}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    seed.stdin.close()
    res = json.loads(got.stdout.strip().splitlines()[-1])
    res["seed_cpu"] = json.loads(seed.stdout.readline())["cpu"]
    seed.wait()
    shutil.rmtree(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        role, torrent, folder, change, peer = args.child
        child(role, Path(torrent), Path(folder), change, peer)
        return
    variants = dict(VARIANTS)
    if args.variant:
        variants = {"baseline": {}}
        for v in args.variant:
            name, _, spec = v.partition("=")
            variants[name] = {k: int(x) for k, _, x in (p.partition(":") for p in spec.split(","))}
    work = Path(args.work or tempfile.mkdtemp(prefix="hfswarm-lt-bench-"))
    size = parse_size(args.size)
    from peer.manifests import VerifiedBlob, make_manifest
    from peer.verification.hashing import hash_file

    blob_dir = work / "blob"
    blob_dir.mkdir(parents=True, exist_ok=True)
    src = blob_dir / "src.bin"
    if not src.exists() or src.stat().st_size != size:
        with open(src, "wb") as f:
            block = bytearray(Path("/dev/urandom").open("rb").read(8 << 20))
            left, i = size, 0
            while left:
                block[:8] = i.to_bytes(8, "little")
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
                i += 1
    blob_id = hash_file(src, "0" * 64, size).actual
    named = blob_dir / blob_id
    if not named.exists():
        named.hardlink_to(src)
    manifest = asyncio.run(make_manifest(VerifiedBlob(blob_id, size, named), "bench"))
    torrent = work / "blob.torrent"
    torrent.write_bytes(manifest.torrent)
    rows: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.runs):
        for name, change in variants.items():
            res = one(torrent, blob_dir, work, change)
            rows[name].append(res)
            print(
                f"  run {r + 1} {name}: {res['wall']:.2f} s, first piece {res['first']:.3f} s, "
                f"cpu {res['cpu']:.2f} / seeder {res['seed_cpu']:.2f}",
                flush=True,
            )
    print(json.dumps({"size": size, "rows": rows}, indent=1))
    base = statistics.median(x["wall"] for x in rows["baseline"])
    print(
        f"\n| {size / (1 << 30):.2f} GiB, median of {args.runs} | wall s | vs baseline "
        "| first piece s | downloader CPU s | seeder CPU s | runs (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, v in rows.items():
        wall = statistics.median(x["wall"] for x in v)
        print(
            f"| {name} | {wall:.2f} | {wall / base:.2f}x "
            f"| {statistics.median(x['first'] for x in v):.3f} "
            f"| {statistics.median(x['cpu'] for x in v):.2f} "
            f"| {statistics.median(x['seed_cpu'] for x in v):.2f} | "
            + ", ".join(f"{x['wall']:.2f}" for x in v)
            + " |"
        )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
