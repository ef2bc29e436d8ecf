"""Agents on a simulated LAN: each on its own host (a network namespace), the mirror
behind a shaped WAN link (100 Mbit/s, 40 ms RTT), real `hfswarm agent` processes, real
libtorrent, real multicast DNS and the real LAN tracker. Needs root (CI runs as root);
elsewhere these tests skip and say why. The harness is tests/netlab.py.

The mirror counts the bytes it serves per client address and per file: that is how a
test sees who took what from the mirror.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest

from peer.mirror_server.generate import generate_model_repo

MiB = 1 << 20
REPO = "org/m"
HERD_REPO = "org/herd"

REASON = netlab.unavailable_reason()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(REASON is not None, reason=f"simulated LAN unavailable: {REASON}"),
]


@pytest.fixture
def lan() -> Iterator[netlab.Lan]:
    with netlab.Lan(hosts=3, lan_rate="1gbit", wan_rate="100mbit", wan_rtt_ms=40) as lan:
        yield lan


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two shards above one piece each (the swarm path) and the small JSON/text files
    # (the peer-HTTP path for small blobs).
    return generate_model_repo(
        tmp_path_factory.mktemp("small"), total_size=6 * MiB, shards=2, seed=11
    )


@pytest.fixture(scope="module")
def herd_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 32 MiB over a 100 Mbit/s WAN: about 3 s for one copy, so three downloads that
    # start together overlap for their whole length.
    return generate_model_repo(tmp_path_factory.mktemp("herd"), total_size=32 * MiB, shards=4)


def total_size(folder: Path) -> int:
    return sum(netlab.repo_file_sizes(folder).values())


def file_keys(repo_id: str, folder: Path) -> dict[str, int]:
    """The mirror's per-file counter keys for a repo, with the size each must reach."""
    return {f"{repo_id}/{p}": n for p, n in netlab.repo_file_sizes(folder).items()}


def see_each_other(agents: list[netlab.AgentProc]) -> bool:
    for a in agents:
        peers = a.peer_ids()
        if any(b.agent_id not in peers for b in agents if b is not a):
            return False
    return True


def assert_first_from_mirror_second_from_peer(
    mirror: netlab.MirrorProc, first: netlab.AgentProc, second: netlab.AgentProc, src: Path
) -> None:
    total = total_size(src)
    t0 = time.monotonic()
    first.download(REPO)
    t_first = time.monotonic() - t0
    stats = mirror.stats()
    assert stats.per_file == file_keys(REPO, src), "h1 takes every file from the mirror once"
    assert stats.blob_bytes == total
    mirror.reset_stats()

    t0 = time.monotonic()
    second.download(REPO)
    t_second = time.monotonic() - t0
    stats = mirror.stats()
    assert stats.blob_bytes == 0 and stats.per_file == {}, "h2 must take no file bytes"
    assert stats.meta_bytes > 0  # ... only metadata (revision, tree) ...
    assert set(stats.per_client) == {second.ip}  # ... and that for itself
    assert netlab.snapshot_problems(second.cache, REPO, src) == []
    st = second.status()
    assert st["bytes_from_mirror"] == 0, st
    # Exact: a download's torrent announces to the tracker only once the agent has
    # counted what was on disk already (nothing here), so no piece passes as resumed.
    assert st["bytes_from_peers"] == total, st
    print(
        f"\n{total / MiB:.1f} MiB: h1 from the mirror in {t_first:.2f} s, h2 from h1 in "
        f"{t_second:.2f} s (mirror served h2 {stats.meta_bytes} metadata bytes)"
    )


def test_two_agents_find_each_other_with_mdns_alone_and_share(
    lan: netlab.Lan, tmp_path: Path, small_repo: Path
) -> None:
    mirror = netlab.start_mirror(lan, [f"model:{REPO}={small_repo}"], tmp_path / "mirror")
    # No --peer, no --tracker, no --interface: the defaults must do.
    a = netlab.start_agent(lan, 1, tmp_path / "h1", mirror.url)
    b = netlab.start_agent(lan, 2, tmp_path / "h2", mirror.url)
    _, took = netlab.wait_until(lambda: see_each_other([a, b]), 20, what="mDNS discovery")
    # Each knows the other by its LAN address, never a loopback one.
    (peer,) = b.status()["peers"]
    assert (peer["host"], peer["agent_id"]) == (a.ip, a.agent_id)
    print(f"\nfound each other by mDNS within {took:.2f} s of both being ready")
    assert_first_from_mirror_second_from_peer(mirror, a, b, small_repo)


def test_two_agents_without_mdns_meet_through_the_tracker(
    lan: netlab.Lan, tmp_path: Path, small_repo: Path
) -> None:
    mirror = netlab.start_mirror(lan, [f"model:{REPO}={small_repo}"], tmp_path / "mirror")
    tracker = netlab.start_tracker(lan, 3, tmp_path / "tracker")
    a = netlab.start_agent(lan, 1, tmp_path / "h1", mirror.url, mdns=False, trackers=[tracker.url])
    b = netlab.start_agent(lan, 2, tmp_path / "h2", mirror.url, mdns=False, trackers=[tracker.url])
    netlab.wait_until(lambda: tracker.live_agents() == 2, 15, what="both agents registered")
    assert_first_from_mirror_second_from_peer(mirror, a, b, small_repo)
    assert a.agent_id in b.peer_ids()  # the tracker named it


def test_a_sigkilled_agent_is_dropped_by_its_peers_within_30_s(
    lan: netlab.Lan, tmp_path: Path, small_repo: Path
) -> None:
    mirror = netlab.start_mirror(lan, [f"model:{REPO}={small_repo}"], tmp_path / "mirror")
    a = netlab.start_agent(lan, 1, tmp_path / "h1", mirror.url)
    b = netlab.start_agent(lan, 2, tmp_path / "h2", mirror.url)
    netlab.wait_until(lambda: see_each_other([a, b]), 20, what="mDNS discovery")
    a.kill(signal.SIGKILL)  # no goodbye: mDNS caches keep it for many minutes
    a.proc.wait(5)
    t0 = time.monotonic()
    netlab.wait_until(
        lambda: a.agent_id not in b.peer_ids(), 30, what="h2 dropping the killed h1", interval=0.5
    )
    took = time.monotonic() - t0
    print(f"\nh2 stopped listing the SIGKILLed h1 after {took:.1f} s")
    assert took <= 30


def run_herd(agents: list[netlab.AgentProc], repo_id: str) -> list[float]:
    """`hfswarm download` on every host at the same moment; seconds each took."""
    t0 = time.monotonic()
    procs = [a.start_download(repo_id) for a in agents]
    times: list[float] = [0.0] * len(procs)
    outputs: list[tuple[bytes, bytes]] = [(b"", b"")] * len(procs)
    pending = dict(enumerate(procs))
    deadline = t0 + 180
    while pending and time.monotonic() < deadline:
        for i, p in list(pending.items()):
            if p.poll() is not None:
                times[i] = time.monotonic() - t0
                outputs[i] = p.communicate()
                del pending[i]
        time.sleep(0.05)
    for p in pending.values():
        p.kill()
    assert not pending, f"downloads on {[agents[i].index for i in pending]} took over 180 s"
    for a, p, (_, err) in zip(agents, procs, outputs, strict=True):
        assert p.returncode == 0, f"h{a.index}: {err.decode()}\n{a.log_tail()}"
    return times


@pytest.mark.parametrize("discovery", ["mdns", "tracker"])
def test_a_herd_of_three_takes_each_blob_from_the_mirror_once(
    lan: netlab.Lan, tmp_path: Path, herd_repo: Path, discovery: str
) -> None:
    mirror = netlab.start_mirror(lan, [f"model:{HERD_REPO}={herd_repo}"], tmp_path / "mirror")
    tracker = None
    if discovery == "tracker":
        tracker = netlab.start_tracker(lan, 3, tmp_path / "tracker")
    agents = [
        netlab.start_agent(
            lan,
            i,
            tmp_path / f"h{i}",
            mirror.url,
            mdns=tracker is None,
            trackers=[tracker.url] if tracker else [],
        )
        for i in (1, 2, 3)
    ]
    if tracker is not None:
        netlab.wait_until(lambda: tracker.live_agents() == 3, 15, what="3 agents registered")
    else:
        netlab.wait_until(lambda: see_each_other(agents), 20, what="mDNS discovery")

    times = run_herd(agents, HERD_REPO)

    stats = mirror.stats()
    want = file_keys(HERD_REPO, herd_repo)
    statuses = [a.status() for a in agents]
    report = "\n".join(
        [
            f"herd of 3 over {discovery}: {total_size(herd_repo) / MiB:.1f} MiB repo, "
            f"mirror sent {stats.blob_bytes / MiB:.1f} MiB of file bytes "
            f"({stats.blob_bytes / total_size(herd_repo):.2f}x)",
            *(
                f"  h{a.index}: {t:.1f} s, {s['bytes_from_mirror'] / MiB:.1f} MiB from the mirror,"
                f" {s['bytes_from_peers'] / MiB:.1f} MiB from peers"
                for a, t, s in zip(agents, times, statuses, strict=True)
            ),
            *(
                f"  {key}: served {stats.per_file.get(key, 0) / size:.2f}x its size"
                for key, size in want.items()
            ),
        ]
    )
    print("\n" + report)
    for a in agents:
        assert netlab.snapshot_problems(a.cache, HERD_REPO, herd_repo) == [], f"h{a.index}"
    # Every blob left the mirror exactly once, whichever agent fetched it.
    assert stats.per_file == want, report
    assert stats.blob_bytes == total_size(herd_repo)


def test_downloaders_on_100_mbit_links_trade_with_each_other_not_only_with_the_seeder(
    tmp_path: Path, herd_repo: Path
) -> None:
    # benchmarks/lan_swarm.py's 1 -> 8 at a test's size: host ports at 100 Mbit/s, so the
    # seeder's uplink is the narrow part; it is reachable only as --peer (mDNS off), the
    # downloaders find each other by mDNS and start together. Were they to take every
    # piece from the seeder, it would send all 3 copies.
    with netlab.Lan(hosts=4, lan_rate="100mbit", wan_rate="100mbit", wan_rtt_ms=40) as lan:
        mirror = netlab.start_mirror(lan, [f"model:{HERD_REPO}={herd_repo}"], tmp_path / "m")
        seeder = netlab.start_agent(lan, 4, tmp_path / "h4", mirror.url, mdns=False)
        seeder.download(HERD_REPO)
        peer = f"{seeder.ip}:7851"
        agents = [
            netlab.start_agent(lan, i, tmp_path / f"h{i}", mirror.url, peers=[peer])
            for i in (1, 2, 3)
        ]
        netlab.wait_until(
            lambda: see_each_other(agents) and all(seeder.agent_id in a.peer_ids() for a in agents),
            30,
            what="the downloaders know each other and the seeder",
        )
        sent0 = seeder.status()["bytes_uploaded"]
        procs = [a.start_download(HERD_REPO) for a in agents]
        for a, p in zip(agents, procs, strict=True):
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, f"h{a.index}: {err.decode()[-800:]}"
        copies = 3 * total_size(herd_repo)
        seeder_share = (seeder.status()["bytes_uploaded"] - sent0) / copies
        traded = sum(a.status()["bytes_uploaded"] for a in agents) / copies
        for a in agents:
            assert netlab.snapshot_problems(a.cache, HERD_REPO, herd_repo) == []
        print(f"\nseeder sent {seeder_share:.0%} of 3 copies, the downloaders {traded:.0%}")
        assert traded >= 0.15, f"downloaders sent each other {traded:.0%} of the copies"
        assert seeder_share <= 0.85, f"the seeder sent {seeder_share:.0%} of the 3 copies"
