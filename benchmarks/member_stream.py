"""The member blob stream alone, without agents: one `MemberStreamServer` process serves
a blob, and a `MemberStream` in another process fetches it over loopback mutual TLS
(certificates of a cluster made here), with the receiver's hashing thread and with one
thread (as on a host with one CPU). Rounds interleave the two; wall and CPU seconds of
the receiving process per run, medians at the end.

    python benchmarks/member_stream.py --size 1GiB --runs 3

`--tree NAME=DIR` (repeatable) runs the receiver from other source trees instead (a
`git archive` of another commit), interleaved per round with the hashing thread (a
NAME ending in "one thread": with one thread); the server is this tree's.

Everything listens on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pickle
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror_download import parse_size

from peer.cluster.credentials import ClusterDir, load_member
from peer.cluster.tls import Cluster
from peer.discovery.peer_table import PeerInfo
from peer.hub.metadata import RemoteFile
from peer.manifests import VerifiedBlob, make_manifest
from peer.manifests.manifest import manifest_tree
from peer.serving.member_stream import MemberStreamServer
from peer.transfer.member_stream import MemberStream
from peer.transfer.mirror_blob import BlobCounters

HOST = "127.0.0.1"


class Held:
    def __init__(self, blob_id: str, path: Path) -> None:
        self.files = {blob_id: path}

    def verified_blob_path(self, blob_id: str) -> Path | None:
        return self.files.get(blob_id)

    def count_upload(self, n: int) -> None:
        pass

    def blob_served(self, blob_id: str, address: str, sent: int, via: str) -> None:
        pass


async def serve(blob_id: str, path: Path, member: Path, port: int) -> None:
    cluster = Cluster(load_member(member))
    async with MemberStreamServer(cluster, HOST, port, Held(blob_id, path), slots=2) as s:
        print(s.port, flush=True)
        await asyncio.Event().wait()


async def fetch(work: Path, port: int, server_id: str) -> dict[str, float]:
    manifest = pickle.loads((work / "manifest.pkl").read_bytes())
    cluster = Cluster(load_member(work / "client.pem"))
    peer = PeerInfo(server_id, HOST, 1, 1, tls=True, stream_port=port)
    file = RemoteFile("blob", manifest.size, manifest.blob_id, True)
    out = work / "out"
    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    got = await MemberStream(
        cluster,
        cluster.client_context(),
        peer,
        manifest_tree(manifest),
        file,
        out,
        BlobCounters(manifest.size),
    ).fetch()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - t0
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    got.path.unlink()
    return {"wall": wall, "cpu": user + system, "user": user, "sys": system}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--fetch", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        blob_id, path, member, port = args.serve
        asyncio.run(serve(blob_id, Path(path), Path(member), int(port)))
        return
    if args.fetch:
        work, port, server_id = args.fetch
        if os.environ.get("ONE_THREAD"):  # what a one-CPU host runs
            os.sched_getaffinity = lambda _pid: {0}  # type: ignore[assignment]
        print(json.dumps(asyncio.run(fetch(Path(work), int(port), server_id))))
        return
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="member-stream-bench-"))
    try:
        blob = work / "blob"
        with open(blob, "wb") as f:
            for left in range(size, 0, -(16 << 20)):
                f.write(os.urandom(min(left, 16 << 20)))
        blob_id = hashlib.sha256(blob.read_bytes()).hexdigest()
        manifest = asyncio.run(make_manifest(VerifiedBlob(blob_id, size, blob), "0" * 32))
        (work / "manifest.pkl").write_bytes(pickle.dumps(manifest))
        ca = ClusterDir(work / "ca")
        ca.init("bench")
        ca.enroll("server", work / "server.pem")
        ca.enroll("client", work / "client.pem")
        server_id = load_member(work / "server.pem").agent_id
        cmd = [sys.executable, __file__, "--serve", blob_id, str(blob)]
        server = subprocess.Popen(
            [*cmd, str(work / "server.pem"), "0"], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        trees = dict(t.split("=", 1) for t in args.tree)
        modes = list(trees) or ["hashing thread", "one thread"]
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        try:
            for rnd in range(1, args.runs + 1):
                for mode in results:
                    env = dict(os.environ, ONE_THREAD="1" if mode.endswith("one thread") else "")
                    tree = Path(trees.get(mode, Path(__file__).resolve().parent.parent))
                    env["PYTHONPATH"] = str(tree)
                    shutil.rmtree(work / "out", ignore_errors=True)
                    # e.g. FETCH_PREFIX="py-spy record --native -o prof.txt -f raw --" profiles it
                    prefix = shlex.split(os.environ.get("FETCH_PREFIX", ""))
                    r = subprocess.run(
                        [*prefix, sys.executable, __file__, "--fetch", str(work), port, server_id],
                        cwd=tree,
                        capture_output=True,
                        text=True,
                        env=env,
                        check=True,
                    )
                    line = [x for x in r.stdout.splitlines() if x.startswith("{")][-1]
                    results[mode].append(json.loads(line))
                    last = results[mode][-1]
                    print(
                        f"round {rnd} {mode:14s} {last['wall']:.2f} s, CPU {last['cpu']:.2f} s "
                        f"(user {last['user']:.2f}, sys {last['sys']:.2f}), "
                        f"load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait()
        print(f"\n| {args.size}, median of {args.runs} | wall s | receiver CPU s | user | sys |")
        print("|---|---|---|---|---|")
        for mode, rows in results.items():
            med = {k: statistics.median(r[k] for r in rows) for k in ("wall", "cpu", "user", "sys")}
            print(
                f"| {mode} | {med['wall']:.2f} | {med['cpu']:.2f} | {med['user']:.2f} "
                f"| {med['sys']:.2f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
