"""Issue 14, parts 4 and 5: what an operator sees of a running agent. Real agents on
loopback, the project's mirror, the real huggingface_hub client, Prometheus' own parser,
Debian's headless chromium for the status page, and another real uid for the audit log.

- /metrics parses and its counters move when bytes move: from the mirror, from a peer,
  to a peer, to an HF_ENDPOINT client.
- /v1/status, `hfswarm status` and the status page show a transfer while it runs.
- The audit log has the upload to a peer and another user's refused call.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agentkit import agent, config, endpoint, fetch, peer_of, write_tree
from huggingface_hub import hf_hub_download
from prometheus_client.parser import text_string_to_metric_families

from peer.agent.audit import ApiCall, AuditLog
from peer.agent.daemon import Agent
from peer.hub.metadata import FileSelection
from peer.mirror_server import MirrorServer, RepoSource
from peer.verification.hashing import BlobHasher, HashKind

MiB = 1 << 20
BIG = 8 * MiB  # eight 1 MiB pieces: goes through the swarm between agents
SMALL = 300_000  # below one piece: a peer sends it over HTTP
WORKTREE = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")


def sha256(data: bytes) -> str:
    h = BlobHasher(HashKind.SHA256, len(data))
    h.update(data)
    return h.hexdigest()


@pytest.fixture
def files() -> dict[str, bytes]:
    rnd = random.Random(14)
    return {
        "config.json": b'{"model_type": "observability-test"}',
        "model.safetensors": rnd.randbytes(BIG),
        "small.bin": rnd.randbytes(SMALL),
    }


@asynccontextmanager
async def mirror_of(
    tmp_path: Path, files: dict[str, bytes], **kw: Any
) -> AsyncIterator[MirrorServer]:
    src = write_tree(tmp_path / "src", files)
    async with MirrorServer([RepoSource("model", "org/m", src)], **kw) as m:
        yield m


async def scrape(a: Agent, **headers: str) -> tuple[int, str, dict[str, float]]:
    """GET /metrics: status, content type, and every sample by name{labels}."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{endpoint(a)}/metrics", headers=headers) as r,
    ):
        text = await r.text()
        if r.status != 200:
            return r.status, r.headers.get("Content-Type", ""), {}
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return r.status, r.headers.get("Content-Type", ""), samples


async def status_of(a: Agent) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{endpoint(a)}/v1/status") as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


def audit_lines(a: Agent) -> list[dict[str, Any]]:
    path = a.config.audit_path
    assert path is not None
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def eventually_audited(a: Agent, match: Any, seconds: float = 15.0) -> dict[str, Any]:
    for _ in range(int(seconds * 10)):
        found = [e for e in audit_lines(a) if match(e)]
        if found:
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no such audit line; the log has: {audit_lines(a)}")


# -- metrics -----------------------------------------------------------------------------


async def test_metrics_parse_and_move_when_bytes_move(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    total = sum(len(d) for d in files.values())
    async with (
        mirror_of(tmp_path, files) as mirror,
        agent(config(tmp_path / "a", "127.0.0.141", mirror.url)) as a,
    ):
        status, ctype, m0 = await scrape(a)
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        for name in (
            "hfswarm_downloaded_from_peers_bytes_total",
            "hfswarm_downloaded_from_mirror_bytes_total",
            "hfswarm_uploaded_to_peers_bytes_total",
            "hfswarm_served_to_clients_bytes_total",
            "hfswarm_hash_failures_total",
            "hfswarm_peer_bans_total",
            "hfswarm_herd_leaderships_total",
        ):
            assert m0[name] == 0, name
        assert m0["hfswarm_live_peers"] == 0 and m0["hfswarm_seeded_blobs"] == 0
        assert "hfswarm_cache_quota_bytes" not in m0, "no quota set: no quota gauge"
        assert not any(k.startswith("python_") or k.startswith("process_") for k in m0), (
            "the agent's own registry, not the process-wide default one"
        )

        # From the mirror.
        await fetch(a)
        _, _, m1 = await scrape(a)
        assert m1["hfswarm_downloaded_from_mirror_bytes_total"] == total
        assert m1["hfswarm_downloads_total"] == 1
        assert m1["hfswarm_seeded_blobs"] == 3 and m1["hfswarm_seeded_bytes"] == total
        assert m1["hfswarm_cache_size_bytes"] == total
        assert m1["hfswarm_herd_leaderships_total"] == 3  # alone: it leads every blob
        assert m1["hfswarm_active_downloads"] == 0 and m1["hfswarm_active_blob_fetches"] == 0

        # From a peer (b), and so uploaded by a.
        cfg_b = config(tmp_path / "b", "127.0.0.142", mirror.url, peers=(peer_of(a),))
        async with agent(cfg_b) as b:
            done = await fetch(b)
            assert done["from_peers"] == total, done
            _, _, mb = await scrape(b)
            assert mb["hfswarm_downloaded_from_peers_bytes_total"] == total
            assert mb["hfswarm_downloaded_from_mirror_bytes_total"] == 0
            assert mb["hfswarm_live_peers"] == 1
            _, _, m2 = await scrape(a)
            # BitTorrent counts what it sent (end-game duplicates included): at least all.
            assert m2["hfswarm_uploaded_to_peers_bytes_total"] >= total
            assert m2["hfswarm_live_peers"] == 0  # b knows a; a was not told of b

        # To an HF_ENDPOINT client: the bytes the resolve route wrote.
        before = m2["hfswarm_served_to_clients_bytes_total"]
        got = await asyncio.to_thread(
            hf_hub_download,
            "org/m",
            "model.safetensors",
            endpoint=endpoint(a),
            cache_dir=tmp_path / "client",
            token=False,
        )
        assert await asyncio.to_thread(Path(got).read_bytes) == files["model.safetensors"]
        _, _, m3 = await scrape(a)
        assert m3["hfswarm_served_to_clients_bytes_total"] - before == BIG
        assert (await status_of(a))["bytes_served_clients"] == m3[
            "hfswarm_served_to_clients_bytes_total"
        ]
        assert m3['hfswarm_active_streams{to="client"}'] == 0

        # Read-only, and no web page of another site may read it.
        assert (await scrape(a, Origin="http://evil.example"))[0] == 403
        async with aiohttp.ClientSession() as s, s.post(f"{endpoint(a)}/metrics") as r:
            assert r.status != 200


async def test_mirror_errors_are_counted_per_mirror(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    """A dead mirror first in the list: its failures show under its own URL."""
    async with mirror_of(tmp_path, files) as mirror:
        dead = "http://127.0.0.1:9"  # nothing listens on the discard port
        async with agent(config(tmp_path / "a", "127.0.0.143", (dead, mirror.url))) as a:
            async with aiohttp.ClientSession() as s:
                url = f"{endpoint(a)}/api/models/org/m/revision/main"
                async with s.get(url) as r:
                    assert r.status == 200  # the second mirror answered
            _, _, m = await scrape(a)
            assert m[f'hfswarm_mirror_errors_total{{mirror="{dead}"}}'] >= 1
            assert f'hfswarm_mirror_errors_total{{mirror="{mirror.url}"}}' not in m


# -- a running transfer: /v1/status, `hfswarm status`, the status page ------------------------


@asynccontextmanager
async def slow_transfer(
    tmp_path: Path, files: dict[str, bytes], ip: str, rate: int = MiB
) -> AsyncIterator[tuple[Agent, dict[str, Any]]]:
    """An agent fetching model.safetensors from a mirror capped at `rate` B/s per client
    (so it runs for seconds); yields once /v1/status shows bytes of it done."""
    async with (
        mirror_of(tmp_path, files, client_rate=rate) as mirror,
        agent(config(tmp_path / "a", ip, mirror.url)) as a,
    ):
        job = asyncio.create_task(fetch(a, selection=FileSelection(files=("model.safetensors",))))
        try:
            for _ in range(300):
                running = [
                    t for t in (await status_of(a))["transfers"] if t["file"] == "model.safetensors"
                ]
                if running and 0 < running[0]["done"] < BIG:
                    break
                assert not job.done(), job.result()
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the transfer never showed in /v1/status")
            yield a, running[0]
            mirror.set_client_rate(None)  # let it finish
            done = await asyncio.wait_for(job, 60)
            assert done["from_mirror"] == BIG
            assert (await status_of(a))["transfers"] == []
        finally:
            job.cancel()


async def test_status_and_the_cli_table_show_a_running_transfer(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    async with slow_transfer(tmp_path, files, "127.0.0.144") as (a, t):
        assert t["repo"] == "model/org/m"
        assert t["blob"] == sha256(files["model.safetensors"])
        assert t["size"] == BIG and t["source"] == "mirror"
        await asyncio.sleep(1.5)  # two reads over a second apart: a measured rate
        again = next(x for x in (await status_of(a))["transfers"] if x["blob"] == t["blob"])
        assert again["done"] > t["done"]
        assert 0.3 * MiB < again["rate"] < 3 * MiB, again  # the mirror's cap is 1 MiB/s
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "peer.cli.main", "status", "--agent", endpoint(a),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORKTREE,
        )  # fmt: skip
        out, err = await cli.communicate()
        assert cli.returncode == 0, err.decode()
        text = out.decode()
        assert "TRANSFERS (1)" in text
        row = next(line for line in text.splitlines() if "model.safetensors" in line)
        assert "model/org/m" in row and "mirror" in row and "/s" in row
        assert re.search(r"\b([1-9]\d?)%", row), row  # between 1 and 99 %
        assert "SEEDED REPOS" in text and "PEERS (0)" in text
        as_json = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "peer.cli.main", "status", "--json", "--agent", endpoint(a),
            stdout=subprocess.PIPE, cwd=WORKTREE,
        )  # fmt: skip
        machine = json.loads((await as_json.communicate())[0])
        assert machine["transfers"][0]["file"] == "model.safetensors"


def _chromium_args(profile: Path) -> list[str]:
    args = [
        str(CHROMIUM),
        "--headless=new",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # chromium refuses to run as root with its sandbox
    return args


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
)
async def test_the_status_page_shows_a_running_transfer_in_headless_chromium(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    # 256 KiB/s: the transfer must still run when a cold headless chromium has started
    # (at 1 MiB/s, 8 s, a loaded fresh-clone run once saw it finished first).
    async with slow_transfer(tmp_path, files, "127.0.0.145", rate=256 << 10) as (a, _):
        # The page and its script come with a strict policy.
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{endpoint(a)}/") as r:
                assert r.status == 200 and r.content_type == "text/html"
                assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                page = await r.text()
                assert "<script>" not in page and "http" not in page.replace("http-equiv", "")
            async with s.get(f"{endpoint(a)}/status.js") as r:
                assert r.status == 200 and r.content_type == "text/javascript"
            # The guard still refuses other sites' pages, and takes our own.
            status_url = f"{endpoint(a)}/v1/status"
            async with s.get(status_url, headers={"Origin": "http://evil.example"}) as r:
                assert r.status == 403
            async with s.get(status_url, headers={"Origin": endpoint(a)}) as r:
                assert r.status == 200
                assert r.headers["Content-Security-Policy"].startswith("sandbox")
            # Our own origin may read, never act (a POST from a page of the agent's).
            async with s.post(
                f"{endpoint(a)}/v1/downloads",
                json={"repo_id": "org/m"},
                headers={"Origin": endpoint(a)},
            ) as r:
                assert r.status == 403
            # A repo's file, fetched through HF_ENDPOINT, never runs as a page here.
            async with s.get(f"{endpoint(a)}/org/m/resolve/main/config.json") as r:
                assert r.status == 200 and await r.read() == files["config.json"]
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["Content-Security-Policy"].startswith("sandbox")
        chromium = await asyncio.create_subprocess_exec(
            *_chromium_args(tmp_path / "chromium-profile"),
            "--virtual-time-budget=3000",
            "--dump-dom",
            f"{endpoint(a)}/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(chromium.communicate(), 90)
        assert chromium.returncode == 0, err.decode()[-2000:]
        dom = out.decode()
        assert a.agent_id in dom, dom[:3000]
        row = re.search(r'<tr data-blob="[0-9a-f]{64}">(.*?)</tr>', dom, re.S)
        assert row is not None, dom[:3000]
        assert '<td class="file">model.safetensors</td>' in row.group(1)
        value = re.search(r'<progress max="100" value="([0-9.]+)"', row.group(1))
        assert value is not None, row.group(1)
        assert 0 < float(value.group(1)) < 100


# -- the audit log -----------------------------------------------------------------------------


async def test_the_audit_log_records_uploads_to_a_peer(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    total = sum(len(d) for d in files.values())
    big_id, small_id = sha256(files["model.safetensors"]), sha256(files["small.bin"])
    async with (
        mirror_of(tmp_path, files) as mirror,
        agent(config(tmp_path / "a", "127.0.0.146", mirror.url)) as a,
    ):
        # Through the local API, as the CLI asks: the call and the download are lines.
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{endpoint(a)}/v1/downloads", json={"repo_id": "org/m"}) as r,
        ):
            events = [json.loads(line) for line in (await r.text()).splitlines()]
        assert events[-1]["event"] == "done", events[-1]
        path = a.config.audit_path
        assert path == tmp_path / "a/state/audit.log"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        call = await eventually_audited(a, lambda e: e["event"] == "api_call")
        assert call["uid"] == os.geteuid() and call["route"] == "/v1/downloads"
        assert call["asked"] == {"repo_type": "model", "repo_id": "org/m", "revision": "main"}
        assert call["status"] == 200 and call["outcome"] == "done"
        download = await eventually_audited(a, lambda e: e["event"] == "download")
        assert download["repo_id"] == "org/m" and download["commit"] == events[-1]["commit"]
        assert download["bytes_from_mirror"] == total and download["bytes_from_peers"] == 0
        await status_of(a)  # read-only and polled: not audited
        assert [e["route"] for e in audit_lines(a) if e["event"] == "api_call"] == ["/v1/downloads"]

        async with agent(
            config(tmp_path / "b", "127.0.0.147", mirror.url, peers=(peer_of(a),))
        ) as b:
            assert (await fetch(b))["from_peers"] == total
            big = await eventually_audited(
                a, lambda e: e["event"] == "blob_served" and e["blob_id"] == big_id
            )
            small = await eventually_audited(
                a, lambda e: e["event"] == "blob_served" and e["blob_id"] == small_id
            )
            theirs = await eventually_audited(b, lambda e: e["event"] == "download")
        assert big["via"] == "swarm" and big["bytes"] >= BIG
        # On loopback b's connections leave from 127.0.0.1 (it listens on .147): an
        # address no live peer has, so the line names no agent id (on a LAN, each host's
        # one address names its agent).
        assert re.fullmatch(r"127\.0\.0\.1:\d+", big["peer_address"]), big
        assert small["via"] == "http" and small["bytes"] == SMALL
        assert small["peer_address"] == "127.0.0.1", small
        assert big["peer_agent_id"] is None and small["peer_agent_id"] is None
        assert theirs["bytes_from_peers"] == total and theirs["bytes_from_mirror"] == 0
        for line in path.read_text().splitlines():
            assert set(json.loads(line)) >= {"ts", "event"}


def test_the_audit_log_rotates_by_size_and_stays_private(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", max_bytes=2000, backups=2)
    try:
        for i in range(100):
            log.write(ApiCall(i, "POST", "/v1/downloads", {"repo_id": "org/m"}, 200, "done"))
    finally:
        log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2"]
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert p.stat().st_size <= 2000
        for line in p.read_text().splitlines():
            assert json.loads(line)["event"] == "api_call"
    off = AuditLog(None)
    off.write(ApiCall(0, "GET", "/", {}, 200, "done"))  # no file, no error
    off.close()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="another local user needs a real other uid: run as root (CI does)"
)
async def test_the_audit_log_records_another_users_refused_call(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    from test_security_local import ATTACK, NOBODY, _become_nobody

    async with (
        mirror_of(tmp_path, files) as mirror,
        agent(config(tmp_path / "a", "127.0.0.148", mirror.url)) as a,
    ):
        folder = write_tree(tmp_path / "share", {"weights.bin": b"secret"})
        args = {
            "host": "127.0.0.148",
            "port": a.local_port,
            "method": "POST",
            "path": "/v1/publish",
            "body": json.dumps({"path": str(folder), "repo_id": "local/x"}),
            "headers": {"Content-Type": "application/json"},
        }
        nobody = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ATTACK, json.dumps(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORKTREE,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            preexec_fn=_become_nobody,
        )  # fmt: skip
        out, err = await nobody.communicate()
        assert nobody.returncode == 0, err.decode()
        assert json.loads(out)["status"] == 403
        refused = await eventually_audited(
            a, lambda e: e["event"] == "api_call" and e["route"] == "/v1/publish"
        )
        assert refused["uid"] == NOBODY
        assert refused["status"] == 403 and refused["outcome"] == "refused"
        assert not any(e["event"] == "publish" for e in audit_lines(a))
        # A web page of another site, from the agent's own user: refused, and audited.
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{endpoint(a)}/v1/downloads",
                json={"repo_id": "org/m"},
                headers={"Origin": "http://evil.example"},
            ) as r,
        ):
            assert r.status == 403
        page = await eventually_audited(
            a, lambda e: e["event"] == "api_call" and e["route"] == "/v1/downloads"
        )
        assert page["uid"] == os.geteuid() and page["outcome"] == "refused"
        assert "token" not in json.dumps(audit_lines(a))


def test_ci_installs_chromium_for_the_page_test() -> None:
    """.ci/run (root with apt-get) installs chromium, so the page test never skips in CI."""
    if not (os.environ.get("CI") and os.geteuid() == 0 and shutil.which("apt-get")):
        pytest.skip("only in CI as root with apt-get")
    assert CHROMIUM.exists(), ".ci/run should have installed chromium"


def test_the_audit_log_flags(tmp_path: Path) -> None:
    from peer.cli.main import agent_config, build_parser

    def cfg(*extra: str) -> Any:
        args = ["agent", "--cache-dir", str(tmp_path / "hub"), "--state-dir", str(tmp_path / "s")]
        return agent_config(build_parser().parse_args([*args, *extra]))

    assert cfg().audit_path == tmp_path / "s/audit.log"
    assert cfg("--audit-log", str(tmp_path / "x.log")).audit_path == tmp_path / "x.log"
    assert cfg("--no-audit").audit_path is None


def test_transfer_rates_come_from_the_last_reads() -> None:
    from peer.agent.local_service import TransferRates

    rates = TransferRates(window=5.0)
    assert rates.rate("b", 1000, started=0.0, now=1.0) == 1000  # one read: since start
    assert rates.rate("b", 1100, started=0.0, now=1.2) == 1100 / 1.2  # reads < 0.5 s apart
    assert rates.rate("b", 3000, started=0.0, now=2.0) == 2000  # (3000 - 1000) / 1 s
    for t in range(3, 10):
        rate = rates.rate("b", 3000 + (t - 2) * 500, started=0.0, now=float(t))
    assert rate == 500  # the early, faster reads left the window
    rates.keep(set())
    assert rates.rate("b", 0, started=9.0, now=10.0) == 0  # forgotten: starts over
