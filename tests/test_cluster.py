"""Cluster mode (issue 10): real agents as separate processes on loopback, members of a
cluster made with `hfswarm cluster`, an outsider in open mode and a member of another
cluster; the project's mirror counting what it serves."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from procs import AgentProcess, agent_process

from peer.cluster.credentials import ClusterDir, load_member
from peer.errors import ConfigError
from peer.mirror_server import MirrorServer, RepoSource

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def hfswarm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peer.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[MirrorServer]:
    rnd = random.Random(10)
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text('{"name": "org/m"}')
    (folder / "model.safetensors").write_bytes(rnd.randbytes(6 * MiB))
    (folder / "small.bin").write_bytes(rnd.randbytes(300_000))
    async with MirrorServer([RepoSource("model", "org/m", folder)]) as m:
        yield m


def cluster(tmp_path: Path, name: str, *members: str, share: str = "public") -> dict[str, Path]:
    """A CA in tmp_path/name made with the CLI, and one credentials file per member."""
    ca = tmp_path / name
    r = hfswarm("cluster", "init", str(ca), "--name", name)
    assert r.returncode == 0, r.stderr
    out = {}
    for m in members:
        out[m] = tmp_path / f"{name}-{m}.pem"
        r = hfswarm(
            "cluster", "enroll", str(ca), "--name", m, "--out", str(out[m]), "--share", share
        )
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(out[m].stat().st_mode) == 0o600
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600
    return out


async def download(p: AgentProcess, repo_id: str = "org/m") -> dict[str, Any]:
    last: dict[str, Any] = {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{p.local_url}/v1/downloads", json={"repo_id": repo_id}) as r,
    ):
        async for line in r.content:
            if line.strip():
                last = json.loads(line)
    assert last.get("event") == "done", last
    return last


async def status(p: AgentProcess) -> dict[str, Any]:
    r = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "peer.cli.main", "status", "--json", "--agent", p.local_url,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await r.communicate()
    assert r.returncode == 0
    result: dict[str, Any] = json.loads(out)
    return result


async def status_text(p: AgentProcess) -> str:
    r = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "peer.cli.main", "status", "--agent", p.local_url,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await r.communicate()
    assert r.returncode == 0
    return out.decode()


async def metrics_of(p: AgentProcess) -> dict[str, float]:
    """The agent's /metrics samples without labels, by name."""
    async with aiohttp.ClientSession() as s, s.get(f"{p.local_url}/metrics") as r:
        text = await r.text()
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines())
        if not name.startswith("#") and "{" not in name
    }


async def peers_of(p: AgentProcess) -> set[str]:
    return {q["agent_id"] for q in (await status(p))["peers"]}


async def wait_for(what: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not await what():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.3)


# -- credentials -------------------------------------------------------------------------


def test_credentials_bind_the_agent_id_to_the_key_and_keys_are_private(tmp_path: Path) -> None:
    files = cluster(tmp_path, "lab", "a")
    m = load_member(files["a"])
    assert len(m.agent_id) == 32 and all(c in "0123456789abcdef" for c in m.agent_id)
    text = files["a"].read_text()
    assert f'agent_id = "{m.agent_id}"' in text and 'share = "public"' in text
    # A second init over the same CA is refused; enrolling into a dir with no CA too.
    assert hfswarm("cluster", "init", str(tmp_path / "lab")).returncode == 2
    r = hfswarm("cluster", "enroll", str(tmp_path / "none"), "--name", "x", "--out", "/dev/null")
    assert r.returncode == 2 and "cluster CA key" in r.stderr
    # A key file others may read is refused, with the fix.
    os.chmod(files["a"], 0o640)
    with pytest.raises(ConfigError) as exc:
        load_member(files["a"])
    assert f"chmod 600 {files['a']}" in exc.value.one_line()
    # Revocation lists the member's serial, signed by the CA.
    os.chmod(files["a"], 0o600)
    assert ClusterDir(tmp_path / "lab").revoke(name="a") == [m.agent_id]
    from peer.cluster.tls import Cluster

    assert Cluster(m).crl.revoked(m.cert.serial_number)


def test_the_agent_refuses_a_key_file_with_group_permissions(tmp_path: Path) -> None:
    files = cluster(tmp_path, "lab", "a")
    os.chmod(files["a"], 0o644)
    r = subprocess.run(
        [sys.executable, "-m", "peer.cli.main", "agent", "--config", os.devnull,
         "--cluster", str(files["a"]), "--state-dir", str(tmp_path / "s"),
         "--cache-dir", str(tmp_path / "c"), "--listen", "127.0.0.1:0",
         "--local-listen", "127.0.0.1:0", "--bt-listen", "127.0.0.1:0", "--no-mdns"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"run: chmod 600 {files['a']}" in r.stderr
    assert "PRIVATE KEY" not in r.stderr + r.stdout


# -- members share; outsiders get nothing ------------------------------------------------


async def test_members_share_and_outsiders_get_nothing(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    lab = cluster(tmp_path, "lab", "a", "b")
    other = cluster(tmp_path, "other", "x")
    total = 6 * MiB + 300_000
    async with agent_process(
        tmp_path / "a", "127.0.0.2", mirror.url, "-v", "--cluster", str(lab["a"])
    ) as a:
        first = await download(a)
        assert first["from_mirror"] >= total - 100
        assert (await status(a))["mode"] == "cluster"
        peer = [a.peer_addr]
        async with (
            agent_process(
                tmp_path / "b",
                "127.0.0.3",
                mirror.url,
                "-v",
                "--cluster",
                str(lab["b"]),
                peers=peer,
            ) as b,
            agent_process(tmp_path / "o", "127.0.0.4", mirror.url, peers=peer) as outsider,
            agent_process(
                tmp_path / "x", "127.0.0.5", mirror.url, "--cluster", str(other["x"]), peers=peer
            ) as foreign,
        ):
            assert await peers_of(b) == {a.info["agent_id"]}
            got = await download(b)
            assert got["from_peers"] > total // 2, got
            # The shard went over a's member blob stream (the small file over its API).
            assert ("member-stream", 6 * MiB) in served_by(tmp_path / "a")
            for stranger in (outsider, foreign):
                r = await download(stranger)
                assert r["from_peers"] == 0 and r["from_mirror"] >= total - 100, r
                assert await peers_of(stranger) == set()
            # The member knows the other member only; the strangers' calls were refused.
            assert await peers_of(a) <= {b.info["agent_id"]}
            s = await status(a)
            assert s["mode"] == "cluster"
            # The stream's bytes are a's uploads, counted apart in status and /metrics.
            assert s["bytes_uploaded_member_stream"] == 6 * MiB, s
            assert s["bytes_uploaded"] >= 6 * MiB
            metrics = await metrics_of(a)
            assert metrics["hfswarm_uploaded_over_member_stream_bytes_total"] == 6 * MiB
            assert metrics["hfswarm_uploaded_to_peers_bytes_total"] == s["bytes_uploaded"]
            assert "of the uploads, over the member stream  6.3 MB" in await status_text(a)
            assert (await status(outsider))["mode"] == "open"
            # A plain-HTTP client gets no answer at all from the member's peer API.
            with pytest.raises(aiohttp.ClientError):
                async with aiohttp.ClientSession() as sess, sess.get(f"{a.peer_url}/v1/health"):
                    pass


def served_by(root: Path) -> list[tuple[str, int]]:
    """(via, bytes) of every large blob the agent under `root` sent, from its audit log."""
    lines = (root / "state" / "audit.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [
        (e["via"], e["bytes"]) for e in events if e["event"] == "blob_served" and e["bytes"] > MiB
    ]


async def test_the_member_stream_listens_on_the_peer_apis_host_by_default(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """No --member-listen: the stream binds --listen's host at port 7853, not every
    interface (an agent bound to one interface is reachable only there)."""
    from peer.cli.demo import loopback_agent_command

    lab = cluster(tmp_path, "lab", "a")
    ip = "127.0.0.77"
    cmd = loopback_agent_command(tmp_path / "a", ip, mirror.url, (), "--cluster", str(lab["a"]))
    at = cmd.index("--member-listen")
    del cmd[at : at + 2]
    async with agent_process(tmp_path / "a", ip, mirror.url, cmd=cmd) as a:
        assert a.info["member_port"] == 7853
        _, writer = await asyncio.open_connection(ip, 7853)
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", 7853)


async def test_members_swarm_when_the_member_stream_is_off(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """`--member-streams 0`: no stream is served, and members get the shard through the
    SSL swarm (the way busy streams fall back to)."""
    lab = cluster(tmp_path, "lab", "a", "b")
    total = 6 * MiB + 300_000
    flags = ["-v", "--member-streams", "0", "--cluster"]
    async with agent_process(tmp_path / "a", "127.0.0.2", mirror.url, *flags, str(lab["a"])) as a:
        await download(a)
        assert a.info["member_port"] == 0
        async with agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, *flags, str(lab["b"]), peers=[a.peer_addr]
        ) as b:
            assert await peers_of(b) == {a.info["agent_id"]}
            got = await download(b)
            assert got["from_peers"] > total // 2, got
            assert "member-stream" not in {via for via, _ in served_by(tmp_path / "a")}
            assert (await status(a))["bytes_uploaded"] >= 6 * MiB
            assert (await status(a))["bytes_uploaded_member_stream"] == 0


async def test_a_hub_client_reads_a_shard_while_a_member_streams_it(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """HF_ENDPOINT mode on a member: huggingface_hub's own download of the shard is
    served as the member stream brings it (its checked pieces), byte for byte."""
    from huggingface_hub import hf_hub_download

    lab = cluster(tmp_path, "lab", "a", "b")
    shard = (tmp_path / "repo" / "model.safetensors").read_bytes()
    async with agent_process(
        tmp_path / "a", "127.0.0.2", mirror.url, "-v", "--cluster", str(lab["a"])
    ) as a:
        await download(a)
        async with agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "-v", "--cluster", str(lab["b"]),
            peers=[a.peer_addr],
        ) as b:  # fmt: skip
            assert await peers_of(b) == {a.info["agent_id"]}
            got = await asyncio.to_thread(
                hf_hub_download,
                "org/m",
                "model.safetensors",
                endpoint=b.local_url,
                cache_dir=tmp_path / "client",
                token=False,
            )
            assert await asyncio.to_thread(Path(got).read_bytes) == shard
            assert ("member-stream", len(shard)) in served_by(tmp_path / "a")
            assert (await status(b))["bytes_from_mirror"] < len(shard) // 2


async def test_a_revoked_member_is_refused_after_the_crl_reload(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """After `hfswarm cluster revoke` and the CRL file's change: the revoked member's
    peer-API connections are refused (both ways), and its address is banned from the
    member's swarm too (libtorrent checks the CA, not the CRL): its SSL torrent client,
    which got pieces before, gets none after."""
    lab = cluster(tmp_path, "lab", "a", "b")
    manifest, ident = await ssl_client_setup(tmp_path, lab)
    async with agent_process(
        tmp_path / "a", "127.0.0.2", mirror.url, "-v", "--cluster", str(lab["a"])
    ) as a:
        await download(a)
        bt = int(a.info["bt_port"])
        before = await swarm_bytes(
            manifest.torrent, "127.0.0.2", bt, ident(lab["b"]), tmp_path / "s1", 15, "127.0.0.3"
        )
        assert before > 0
        async with agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "-v", "--cluster", str(lab["b"]),
            peers=[a.peer_addr],
        ) as b:  # fmt: skip
            assert await peers_of(b) == {a.info["agent_id"]}
            r = hfswarm("cluster", "revoke", str(tmp_path / "lab"), "--name", "b")
            assert r.returncode == 0, r.stderr

            async def b_is_cut_off() -> bool:
                return not await peers_of(b) and (await status(a))["bans"] >= 1

            await wait_for(b_is_cut_off, 30)
            got = await download(b)
            assert got["from_peers"] == 0, got
            assert "revoked" in a.log.read_text()
        after = await swarm_bytes(
            manifest.torrent, "127.0.0.2", bt, ident(lab["b"]), tmp_path / "s2", 5, "127.0.0.3"
        )
        assert after == 0


# -- the tracker in cluster mode ---------------------------------------------------------


async def test_the_tracker_in_cluster_mode_takes_only_members_signed_registrations(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    from procs import tracker_process

    from tracker import messages as m
    from tracker.client import TrackerClient
    from tracker.errors import TrackerRefused

    lab = cluster(tmp_path, "lab", "a", "b")
    other = cluster(tmp_path, "other", "x")
    a, x = load_member(lab["a"]), load_member(other["x"])
    ca = tmp_path / "lab" / "ca.pem"
    async with (
        tracker_process(tmp_path / "t.log", "127.0.0.1:0", "--cluster", str(ca), "-v") as (_, url),
        TrackerClient(url) as plain,
        TrackerClient(url, signer=a) as member,
        TrackerClient(url, signer=x) as foreign,
    ):
        # Unsigned, another cluster's, a member's under another id: refused.
        for client, agent_id in ((plain, a.agent_id), (foreign, x.agent_id), (member, "f" * 32)):
            with pytest.raises(TrackerRefused) as exc:
                await client.register(agent_id, 7851, 0)
            assert "not_a_member" in str(exc.value) or "cluster" in str(exc.value)
        # Stale (10 minutes old) and tampered signatures: refused.
        old = m.sign(
            m.Register(agent_id=a.agent_id, api_port=7851, bt_port=0), a, time.time() - 600
        )
        forged = m.sign(m.Register(agent_id=a.agent_id, api_port=7851, bt_port=0), a, time.time())
        forged = m.Register(**{**forged.__dict__, "api_port": 9999})
        async with aiohttp.ClientSession() as s:
            for msg in (old, forged):
                async with s.post(
                    f"{url}/v1/register",
                    data=m.encode(msg),
                    headers={"Content-Type": "application/msgpack"},
                ) as r:
                    assert r.status == 403
        assert (await plain.health()).agents == 0
        # A member's own signed registration and announce are taken.
        reg = await member.register(a.agent_id, 7851, 0)
        assert reg.agent_id == a.agent_id
        with pytest.raises(TrackerRefused):
            await plain.announce(a.agent_id, ["a" * 64])
        await member.announce(a.agent_id, ["a" * 64])
        who = await plain.who(["a" * 64])
        assert [h.agent_id for h in who["a" * 64].holders] == [a.agent_id]
        # A member agent started with --tracker registers itself (signed by its key).
        async with agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "-v", "--cluster", str(lab["b"]),
            "--tracker", url,
        ):  # fmt: skip

            async def two_agents() -> bool:
                return (await plain.health()).agents == 2

            await wait_for(two_agents, 20)


# -- SSL torrents ------------------------------------------------------------------------


async def swarm_bytes(
    torrent: bytes,
    host: str,
    bt_port: int,
    ssl: Any,
    folder: Path,
    seconds: float,
    listen_host: str = "127.0.0.9",
) -> int:
    """A bare libtorrent session (`ssl`: an SslIdentity, or None) asks for a torrent."""
    from peer.transfer.swarm import SwarmSession, SwarmSettings

    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    async with SwarmSession(SwarmSettings(listen_host=listen_host, ssl=ssl)) as ses:
        ih = await ses.add_torrent(torrent, folder)
        ses.connect_peer(ih, host, bt_port)
        deadline = time.monotonic() + seconds
        got = 0
        while time.monotonic() < deadline:
            got = (await ses.status(ih)).peer_payload_bytes
            if got > 0:
                break
            await asyncio.sleep(0.2)
        await ses.remove_torrent(ih)
        return got


async def ssl_client_setup(
    tmp_path: Path, lab: dict[str, Path]
) -> tuple[Any, Callable[[Path], Any]]:
    """The repo shard's manifest, and SSL identities (the lab's CA as root, a given
    credentials file) for bare libtorrent clients."""
    from peer.cluster.tls import FFDHE2048_PEM
    from peer.manifests import VerifiedBlob, make_manifest
    from peer.transfer.swarm import SslIdentity

    shard = (tmp_path / "repo" / "model.safetensors").read_bytes()
    blob_id = hashlib.sha256(shard).hexdigest()
    await asyncio.to_thread((tmp_path / "blob").mkdir)
    (tmp_path / "blob" / blob_id).write_bytes(shard)
    manifest = await make_manifest(
        VerifiedBlob(blob_id, len(shard), tmp_path / "blob" / blob_id), made_by="0" * 32
    )
    dh = tmp_path / "dh.pem"
    dh.write_text(FFDHE2048_PEM)
    lab_ca = (tmp_path / "lab" / "ca.pem").read_text()

    def ident(cred: Path) -> SslIdentity:
        return SslIdentity(lab_ca, str(cred), str(cred), str(dh))

    return manifest, ident


async def test_ssl_torrents_serve_members_only(tmp_path: Path, mirror: MirrorServer) -> None:
    lab = cluster(tmp_path, "lab", "a", "c")
    other = cluster(tmp_path, "other", "x")
    manifest, ident = await ssl_client_setup(tmp_path, lab)
    async with agent_process(
        tmp_path / "a", "127.0.0.2", mirror.url, "-v", "--cluster", str(lab["a"])
    ) as a:
        await download(a)
        bt = int(a.info["bt_port"])
        # Plain BitTorrent, knowing the torrent: nothing.
        assert await swarm_bytes(manifest.torrent, "127.0.0.2", bt, None, tmp_path / "o", 5) == 0
        # SSL with the cluster's (public) CA, but another cluster's certificate: nothing.
        assert (
            await swarm_bytes(
                manifest.torrent, "127.0.0.2", bt, ident(other["x"]), tmp_path / "x", 5
            )
            == 0
        )
        # A member's certificate: pieces flow (the two above could have had them).
        assert (
            await swarm_bytes(
                manifest.torrent, "127.0.0.2", bt, ident(lab["c"]), tmp_path / "c", 15
            )
            > 0
        )


# -- share = "cluster" -------------------------------------------------------------------


async def test_members_with_share_cluster_share_a_private_repo(tmp_path: Path) -> None:
    """share = "cluster": a private repo's blobs go from member to member (each member's
    own token is still checked by the mirror first); with share = "public" they do not."""
    rnd = random.Random(11)
    folder = tmp_path / "priv"
    folder.mkdir()
    (folder / "config.json").write_text('{"name": "org/priv"}')
    shard = rnd.randbytes(4 * MiB)
    (folder / "model.safetensors").write_bytes(shard)
    token = tmp_path / "token"
    token.write_text("hf_member_token")
    os.chmod(token, 0o600)
    shared = cluster(tmp_path, "lab", "a", "b", share="cluster")
    public = cluster(tmp_path, "lab2", "c", "d")
    async with MirrorServer(
        [RepoSource("model", "org/priv", folder, private=True)], gated_tokens=["hf_member_token"]
    ) as mirror:
        for creds, expect_peers in ((shared, True), (public, False)):
            first, second = sorted(creds)
            flags = ["-v", "--token-file", str(token), "--cluster"]
            async with agent_process(
                tmp_path / f"{first}", "127.0.0.2", mirror.url, *flags, str(creds[first])
            ) as a:
                got_a = await download(a, "org/priv")
                assert got_a["from_mirror"] >= len(shard)
                async with agent_process(
                    tmp_path / f"{second}", "127.0.0.3", mirror.url, *flags, str(creds[second]),
                    peers=[a.peer_addr],
                ) as b:  # fmt: skip
                    got_b = await download(b, "org/priv")
                    snap = Path(got_b["path"])
                    assert (snap / "model.safetensors").read_bytes() == shard
                    if expect_peers:
                        assert got_b["from_peers"] > len(shard) // 2, got_b
                    else:
                        assert got_b["from_peers"] == 0, got_b


async def test_a_member_stream_cut_mid_way_is_finished_by_the_ssl_swarm(
    tmp_path: Path, mirror: MirrorServer
) -> None:
    """b streams the shard from a (its upload capped: ~6 s); a dies mid-way. The swarm
    (c seeds it, c serves no stream) brings the rest, libtorrent checking what the cut
    stream left in the partial; the blob is right and no journal is left behind."""
    lab = cluster(tmp_path, "lab", "a", "b", "c")
    shard = (tmp_path / "repo" / "model.safetensors").read_bytes()
    blob_id = hashlib.sha256(shard).hexdigest()
    capped = ["-v", "--max-upload-rate", str(MiB), "--cluster", str(lab["a"])]
    async with (
        agent_process(tmp_path / "a", "127.0.0.2", mirror.url, *capped) as a,
        agent_process(
            tmp_path / "c", "127.0.0.4", mirror.url, "--member-streams", "0",
            "--cluster", str(lab["c"]),
        ) as c,
    ):  # fmt: skip
        await asyncio.gather(download(a), download(c))
        async with agent_process(
            tmp_path / "b", "127.0.0.3", mirror.url, "-v", "--cluster", str(lab["b"]),
            peers=[a.peer_addr, c.peer_addr],
        ) as b:  # fmt: skip
            assert await peers_of(b) == {a.info["agent_id"], c.info["agent_id"]}
            fetching = asyncio.create_task(download(b))
            await asyncio.sleep(2.5)  # some of the 6 s stream is in
            a.proc.kill()
            got = await fetching
            assert got["from_peers"] > len(shard) // 2, got
            # Every byte is counted where it came from: the cut stream's checked pieces,
            # which the swarm found on disk, are from peers too.
            assert got["from_peers"] + got["from_mirror"] == got["total"], got
            s = await status(b)
            assert s["bytes_from_peers"] + s["bytes_from_mirror"] == got["total"], s
            log = b.log.read_text()
            assert "member stream stopped" in log, log[-3000:]
            blobs = list((tmp_path / "b" / "cache").rglob(f"blobs/{blob_id}"))
            assert len(blobs) == 1 and hashlib.sha256(blobs[0].read_bytes()).hexdigest() == blob_id
            left = list((tmp_path / "b" / "cache").rglob(".hfswarm/partial/*"))
            assert left == [], left
