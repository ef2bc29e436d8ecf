"""Could members move pieces over Python's own mutual TLS instead of SSL torrents?

Issue 10's goal (a 1 GiB member transfer within 1.3x of open mode) is not met by
libtorrent's SSL torrents (docs/benchmarks.md 7.2: two 8 KiB TLS records and two system
calls per 16 KiB block). The way around would be a second piece transport between
members. This measures what Python itself can move: one blob served by one process and
fetched by another over loopback, the fetcher writing to a file and hashing (SHA-256) as
the bytes land, as a real transport must; plain TCP against mutual TLS with the cluster's
own contexts (`peer.cluster.tls.Cluster`: TLS 1.3, Ed25519 member certificates), in two
shapes:

- ``aiohttp``: the agent's stack (an aiohttp server's `FileResponse`, an aiohttp client,
  ranges over N connections): asyncio's SSL transport.
- ``threads``: blocking sockets in a thread on each side, 1 MiB writes and `recv_into`
  (the GIL is released inside OpenSSL): what a threaded transport could reach.

Rounds interleave every (shape, mode); medians of N; CPU per side.

    python benchmarks/tls_transport.py --size 1GiB --runs 3
    python benchmarks/tls_transport.py --size 1GiB --runs 3 --pin

``--pin`` puts the server on CPU 0 and the fetcher on CPU 1 (two hosts of a LAN each
have their own CPU). Every socket is on 127.0.0.x; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import parse_size

from peer.cluster.credentials import ClusterDir, load_member
from peer.cluster.tls import Cluster

HOST = "127.0.0.9"
CHUNK = 1 << 20


def _context(member: Path, server: bool) -> ssl.SSLContext:
    cluster = Cluster(load_member(member))
    return cluster.server_context() if server else cluster.client_context()


def serve(shape: str, tls: bool, blob: Path, member: Path, port: int) -> None:
    """The serving side, in its own process: until killed."""
    ctx = _context(member, True) if tls else None
    if shape == "aiohttp":
        app = web.Application()

        async def get(_: web.Request) -> web.FileResponse:
            return web.FileResponse(blob, chunk_size=CHUNK)

        app.router.add_get("/blob", get)
        web.run_app(app, host=HOST, port=port, ssl_context=ctx, print=None)
        return
    listener = socket.create_server((HOST, port))
    while True:
        conn, _ = listener.accept()
        try:
            with conn:
                out = ctx.wrap_socket(conn, server_side=True) if ctx is not None else conn
                with open(blob, "rb") as f:
                    if ctx is None:
                        out.sendfile(f)  # plain: the kernel copies, as libtorrent's open mode
                    else:
                        buf = bytearray(CHUNK)
                        view = memoryview(buf)
                        while n := f.readinto(buf):
                            out.sendall(view[:n])
                out.close()
        except OSError:  # the start-up probe connects and goes away
            continue


def fetch_threads(tls: bool, member: Path, port: int, out: Path, size: int) -> str:
    ctx = _context(member, False) if tls else None
    sock = socket.create_connection((HOST, port))
    conn = ctx.wrap_socket(sock) if ctx is not None else sock
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    fd = os.open(out, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    pos = 0
    try:
        while n := conn.recv_into(buf):
            os.pwrite(fd, view[:n], pos)
            digest.update(view[:n])
            pos += n
    finally:
        os.close(fd)
        conn.close()
    if pos != size:
        raise SystemExit(f"got {pos} bytes of {size}")
    return digest.hexdigest()


async def fetch_aiohttp(
    tls: bool, member: Path, port: int, out: Path, size: int, conns: int
) -> None:
    ctx = _context(member, False) if tls else False
    fd = os.open(out, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    step = -(-size // conns)
    url = f"{'https' if tls else 'http'}://{HOST}:{port}/blob"

    async def one(http: aiohttp.ClientSession, lo: int) -> None:
        hi = min(size, lo + step) - 1
        digest, pos = hashlib.sha256(), lo
        async with http.get(url, headers={"Range": f"bytes={lo}-{hi}"}) as r:
            if r.status != 206:
                raise SystemExit(f"HTTP {r.status}")
            async for chunk in r.content.iter_chunked(CHUNK):
                os.pwrite(fd, chunk, pos)
                digest.update(chunk)
                pos += len(chunk)
        if pos != hi + 1:
            raise SystemExit(f"range {lo}-{hi} ended at {pos}")

    try:
        connector = aiohttp.TCPConnector(ssl=ctx)
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.gather(*(one(http, lo) for lo in range(0, size, step)))
    finally:
        os.close(fd)


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--conns", type=int, default=2, help="aiohttp range connections")
    ap.add_argument("--pin", action="store_true", help="server on CPU 0, fetcher on CPU 1")
    ap.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        shape, mode, blob, member = args.serve
        serve(shape, mode == "tls", Path(blob), Path(member), int(os.environ["PORT"]))
        return
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="tls-transport-"))
    blob, out = work / "blob", work / "out"
    with open(blob, "wb") as f:
        for left in range(size, 0, -(16 << 20)):
            f.write(os.urandom(min(left, 16 << 20)))
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    cluster = ClusterDir(work / "ca")
    cluster.init("bench")
    cluster.enroll("server", work / "server.member")
    cluster.enroll("fetcher", work / "fetcher.member")
    if args.pin:
        os.sched_setaffinity(0, {1})
    cases = [(shape, mode) for shape in ("threads", "aiohttp") for mode in ("plain", "tls")]
    servers: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
    ports: dict[tuple[str, str], int] = {}
    for i, (shape, mode) in enumerate(cases):
        ports[shape, mode] = port = 18700 + i
        cmd = [sys.executable, __file__, "--serve", shape, mode, str(blob)]
        cmd.append(str(work / "server.member"))
        if args.pin:
            cmd = ["taskset", "-c", "0", *cmd]
        env = os.environ | {"PORT": str(port)}
        servers[shape, mode] = subprocess.Popen(cmd, env=env)
    times: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    cpus: dict[tuple[str, str], list[tuple[float, float]]] = {c: [] for c in cases}
    try:
        for port in ports.values():
            for _ in range(100):
                try:
                    socket.create_connection((HOST, port)).close()
                    break
                except OSError:
                    time.sleep(0.05)
        print(f"{size / 2**30:.2f} GiB, {os.cpu_count()} CPUs, pin={args.pin}")
        for rnd in range(1, args.runs + 1):
            for case in cases:
                shape, mode = case
                tls = mode == "tls"
                s0 = proc_cpu(servers[case].pid)
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.monotonic()
                if shape == "threads":
                    got: list[str] = []
                    job = (tls, work / "fetcher.member", ports[case], out, size)
                    th = threading.Thread(target=lambda j=job, g=got: g.append(fetch_threads(*j)))
                    th.start()
                    th.join()
                    if got != [want]:
                        raise SystemExit("the fetched bytes differ")
                else:
                    asyncio.run(
                        fetch_aiohttp(
                            tls, work / "fetcher.member", ports[case], out, size, args.conns
                        )
                    )
                wall = time.monotonic() - t0
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                time.sleep(0.2)  # the server's last accounting tick
                fetcher = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                server = proc_cpu(servers[case].pid) - s0
                times[case].append(wall)
                cpus[case].append((server, fetcher))
                print(
                    f"round {rnd} {shape:8s} {mode:5s} {wall:6.2f} s  cpu server {server:5.2f}"
                    f" fetcher {fetcher:5.2f}  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        for p in servers.values():
            p.terminate()
            p.wait()
        for p in (blob, out):
            p.unlink(missing_ok=True)
    print(
        f"\n| {args.size}, median of {args.runs} | wall s | vs plain threads | server CPU s "
        "| fetcher CPU s |"
    )
    print("|---|---|---|---|---|")
    base = statistics.median(times["threads", "plain"])
    for case in cases:
        wall = statistics.median(times[case])
        server = statistics.median(c[0] for c in cpus[case])
        fetcher = statistics.median(c[1] for c in cpus[case])
        print(
            f"| {case[0]}, {case[1]} | {wall:.2f} | {wall / base:.2f}x | {server:.2f} "
            f"| {fetcher:.2f} |"
        )


if __name__ == "__main__":
    main()
