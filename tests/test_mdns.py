"""mDNS discovery: record format and address rules as pure functions, then real zeroconf
instances talking multicast over loopback (each with its own sockets and cache, exactly
as separate processes on one host would)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager

import pytest
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from peer.discovery import mdns
from peer.discovery.mdns import (
    SERVICE_TYPE,
    Announcement,
    BadRecord,
    DiscoveryError,
    MdnsDiscovery,
    UnsupportedVersion,
    parse_txt,
    plan_addresses,
    txt_properties,
)
from peer.errors import NetworkError, PeerMisbehaved

LO = "127.0.0.1"
MDNS_GROUP = "224.0.0.251"

# -- TXT records ---------------------------------------------------------------------


def raw(props: Mapping[str, str | None]) -> dict[bytes, bytes | None]:
    return {k.encode(): None if v is None else v.encode() for k, v in props.items()}


def test_txt_round_trip() -> None:
    props = txt_properties("0123abcd" * 4, 7852)
    assert props["v"] == "1"
    assert parse_txt(raw(props)) == Announcement("0123abcd" * 4, 7852)


@pytest.mark.parametrize(
    "props",
    [
        {"v": "1", "bt": "7852"},  # no id
        {"v": "1", "id": None, "bt": "7852"},  # key without a value
        {"v": "1", "id": "", "bt": "7852"},
        {"v": "1", "id": "a.b", "bt": "7852"},  # would break the instance name
        {"v": "1", "id": "x" * 49, "bt": "7852"},  # too long for one DNS label
        {"v": "1", "id": "abc"},  # no bt
        {"v": "1", "id": "abc", "bt": "seven"},
        {"v": "1", "id": "abc", "bt": "0"},
        {"v": "1", "id": "abc", "bt": "65536"},
        {"v": "1", "id": "abc", "bt": "-1"},
        {"v": "1", "id": "abc", "bt": " 80"},  # int() would take these three
        {"v": "1", "id": "abc", "bt": "+80"},
        {"v": "1", "id": "abc", "bt": "٨٠"},
        {"v": "1", "id": "abc", "bt": "000000080"},
    ],
)
def test_txt_junk_is_rejected(props: dict[str, str | None]) -> None:
    with pytest.raises(BadRecord) as info:
        parse_txt(raw(props))
    assert not isinstance(info.value, UnsupportedVersion)
    assert isinstance(info.value, PeerMisbehaved)  # the sender's fault, never ours


@pytest.mark.parametrize("version", [None, "2", "0", "", "1.0"])
def test_txt_other_protocol_version(version: str | None) -> None:
    props: dict[str, str | None] = {"id": "abc", "bt": "7852"}
    if version is not None:
        props["v"] = version
    with pytest.raises(UnsupportedVersion) as info:
        parse_txt(raw(props))
    assert info.value.version == version


# -- which addresses are bound and announced -----------------------------------------

LOCAL = {"lo": [LO], "eth0": ["192.168.1.5"], "docker0": ["172.17.0.1"]}


@pytest.mark.parametrize(
    ("api_host", "interfaces", "advertise", "expected"),
    [
        # default: every real IPv4 address, never loopback
        ("0.0.0.0", None, None, (None, ["192.168.1.5", "172.17.0.1"])),
        ("", None, None, (None, ["192.168.1.5", "172.17.0.1"])),
        # an interface by name or address: that one
        ("0.0.0.0", ["eth0"], None, (["192.168.1.5"], ["192.168.1.5"])),
        ("0.0.0.0", ["192.168.1.5", LO], None, (["192.168.1.5", LO], ["192.168.1.5"])),
        # loopback only (tests, several agents on one host): 127.0.0.1 is then right
        ("0.0.0.0", [LO], None, ([LO], [LO])),
        # a peer API bound to one address announces that address
        ("192.168.1.5", None, None, (None, ["192.168.1.5"])),
        # a peer API on loopback keeps discovery on loopback
        (LO, None, None, ([LO], [LO])),
        ("localhost", None, None, ([LO], [LO])),
        # explicit advertise wins
        ("0.0.0.0", None, ["10.0.0.9"], (None, ["10.0.0.9"])),
    ],
)
def test_plan_addresses(
    api_host: str,
    interfaces: list[str] | None,
    advertise: list[str] | None,
    expected: tuple[list[str] | None, list[str]],
) -> None:
    assert plan_addresses(api_host, interfaces, advertise, LOCAL) == expected


@pytest.mark.parametrize(
    ("api_host", "interfaces", "advertise", "local", "words"),
    [
        ("0.0.0.0", ["203.0.113.77"], None, LOCAL, ["203.0.113.77", "eth0 (192.168.1.5)"]),
        ("0.0.0.0", ["wlan9"], None, LOCAL, ["wlan9", "eth0"]),
        ("0.0.0.0", ["fe80::1"], None, LOCAL, ["IPv6"]),
        ("0.0.0.0", None, None, {"lo": [LO]}, ["no IPv4 address"]),
        (LO, ["eth0"], None, LOCAL, ["cannot reach", "0.0.0.0"]),
        ("::1", None, None, LOCAL, ["IPv6"]),
        ("0.0.0.0", None, ["224.0.0.251"], LOCAL, ["224.0.0.251"]),
    ],
)
def test_plan_addresses_refuses_with_a_way_out(
    api_host: str,
    interfaces: list[str] | None,
    advertise: list[str] | None,
    local: dict[str, list[str]],
    words: list[str],
) -> None:
    with pytest.raises(DiscoveryError) as info:
        plan_addresses(api_host, interfaces, advertise, local)
    assert isinstance(info.value, NetworkError)
    line = info.value.one_line()
    for word in words:
        assert word in line
    assert info.value.hint


async def test_unknown_interface_fails_before_touching_the_network() -> None:
    found: list[object] = []
    d = MdnsDiscovery(
        new_id(),
        "0.0.0.0",
        1,
        2,
        on_found=lambda *a: found.append(a),
        on_lost=lambda *a: None,
        interfaces=["203.0.113.77"],
    )
    with pytest.raises(DiscoveryError) as info:
        async with d:
            pass
    assert "203.0.113.77" in info.value.message and "--no-mdns" in info.value.one_line()
    assert d._azc is None and not found


async def test_zeroconf_socket_errors_become_discovery_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pretend the address is ours, so zeroconf itself fails (ENODEV when it joins the
    # multicast group there) and the translation at the edge is what is tested.
    monkeypatch.setattr(
        mdns, "local_ipv4_by_interface", lambda: {"lo": [LO], "fake0": ["203.0.113.77"]}
    )
    d = MdnsDiscovery(
        new_id(),
        "0.0.0.0",
        1,
        2,
        on_found=lambda *a: None,
        on_lost=lambda *a: None,
        interfaces=["fake0"],
    )
    with pytest.raises(DiscoveryError) as info:
        async with d:
            pass
    assert isinstance(info.value.__cause__, OSError)
    assert "203.0.113.77" in info.value.message
    assert "--interface" in info.value.one_line() and "--no-mdns" in info.value.one_line()
    assert d._azc is None


# -- real multicast on loopback -------------------------------------------------------


def _loopback_multicast_works() -> bool:
    """Send one datagram to the mDNS group through lo (another port than 5353, so no
    responder sees it) and see whether a member socket receives it."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("", 0))
        port = rx.getsockname()[1]
        group = socket.inet_aton(MDNS_GROUP) + socket.inet_aton(LO)
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
        rx.settimeout(0.5)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LO))
        tx.sendto(b"hfswarm-probe", (MDNS_GROUP, port))
        return rx.recv(64) == b"hfswarm-probe"
    except OSError:
        return False
    finally:
        rx.close()
        tx.close()


@pytest.fixture(scope="module")
def loopback_multicast() -> Iterator[None]:
    """Linux delivers multicast on lo even without the MULTICAST flag (measured: lo here
    is <LOOPBACK,UP,LOWER_UP> and it works). Should a kernel refuse, root may set the
    flag for the duration of this module; otherwise the tests skip and say why."""
    if _loopback_multicast_works():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("multicast over loopback does not work here and we are not root")
    changed = subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], check=False)
    if changed.returncode != 0 or not _loopback_multicast_works():
        pytest.skip(
            "multicast over loopback does not work, even with `ip link set lo multicast on`"
        )
    try:
        yield
    finally:
        subprocess.run(["ip", "link", "set", "lo", "multicast", "off"], check=False)


def new_id() -> str:
    # Fresh per test: other agents may be announcing on this host's loopback too, so
    # assertions only look at the ids a test made.
    return uuid.uuid4().hex


def new_port() -> int:
    return random.randint(20000, 60000)


class Recorder:
    def __init__(self) -> None:
        self.found: list[tuple[str, int, str]] = []
        self.lost: list[tuple[str, int]] = []
        self._changed = asyncio.Event()

    def on_found(self, host: str, port: int, agent_id: str) -> None:
        self.found.append((host, port, agent_id))
        self._changed.set()

    def on_lost(self, host: str, port: int) -> None:
        self.lost.append((host, port))
        self._changed.set()

    def found_ids(self, *ids: str) -> list[tuple[str, int, str]]:
        return [f for f in self.found if f[2] in ids]

    async def wait_for(self, what: Callable[[], bool], within: float = 5.0) -> float:
        t0 = time.monotonic()
        async with asyncio.timeout(within):
            while not what():
                self._changed.clear()
                await self._changed.wait()
        return time.monotonic() - t0


def discovery(agent_id: str, port: int, rec: Recorder, bt: int = 7852) -> MdnsDiscovery:
    return MdnsDiscovery(
        agent_id,
        "0.0.0.0",
        port,
        bt,
        on_found=rec.on_found,
        on_lost=rec.on_lost,
        interfaces=[LO],
        advertise=[LO],
    )


@asynccontextmanager
async def registrar() -> AsyncIterator[AsyncZeroconf]:
    """A bare zeroconf responder, to announce records MdnsDiscovery would never make."""
    azc = AsyncZeroconf(interfaces=[LO])
    try:
        yield azc
    finally:
        await azc.async_close()


def record(agent_id: str, port: int, props: dict[str, str]) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"hfswarm-{agent_id}.{SERVICE_TYPE}",
        port=port,
        properties=props,
        server=f"hfswarm-{agent_id}.local.",
        parsed_addresses=[LO],
    )


async def test_two_agents_find_each_other(loopback_multicast: None) -> None:
    a_id, b_id, a_port, b_port = new_id(), new_id(), new_port(), new_port()
    ra, rb = Recorder(), Recorder()
    t0 = time.monotonic()
    async with discovery(a_id, a_port, ra) as a, discovery(b_id, b_port, rb) as b:
        entered = time.monotonic() - t0
        await ra.wait_for(lambda: bool(ra.found_ids(b_id)))
        await rb.wait_for(lambda: bool(rb.found_ids(a_id)))
        found_after = time.monotonic() - t0
        # Let a late self-report or a duplicate show up if there is one.
        await asyncio.sleep(0.5)
        assert ra.found_ids(a_id, b_id) == [(LO, b_port, b_id)]
        assert rb.found_ids(a_id, b_id) == [(LO, a_port, a_id)]
        assert a.announced == b.announced == [LO]
        assert a.known()[b.instance_name] == (b_id, frozenset({(LO, b_port)}))
        assert a.instance_name not in a.known()
        assert not ra.lost and not rb.lost  # nobody left while both were up
    # cooperating_responders: no 1.2 s of probing before the first announcement
    assert entered < 0.5, entered
    print(f"entered both in {entered:.3f} s, found each other after {found_after:.3f} s")


async def test_clean_exit_sends_goodbye(loopback_multicast: None) -> None:
    a_id, b_id, a_port, b_port = new_id(), new_id(), new_port(), new_port()
    ra, rb = Recorder(), Recorder()
    async with discovery(a_id, a_port, ra):
        async with discovery(b_id, b_port, rb):
            await ra.wait_for(lambda: bool(ra.found_ids(b_id)))
            assert (LO, b_port) not in ra.lost
            t0 = time.monotonic()
        exited = time.monotonic() - t0
        took = await ra.wait_for(lambda: (LO, b_port) in ra.lost, 3.0)
        print(f"exit took {exited:.3f} s, goodbye seen {took:.3f} s after it")
        assert ra.lost.count((LO, b_port)) == 1


async def test_other_protocol_versions_and_junk_are_ignored(
    loopback_multicast: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="peer.discovery.mdns")
    ok_id, v2_id, junk_id, watcher_id = new_id(), new_id(), new_id(), new_id()
    ports = {i: new_port() for i in (ok_id, v2_id, junk_id)}
    rec = Recorder()
    async with registrar() as rz:
        for agent_id, props in [
            (v2_id, {"id": v2_id, "bt": "7852", "v": "2"}),
            (junk_id, {"id": junk_id, "bt": "many", "v": "1"}),
            (ok_id, txt_properties(ok_id, 7852)),  # proves the others were reachable
        ]:
            info = record(agent_id, ports[agent_id], props)
            await rz.async_register_service(info, cooperating_responders=True)
        async with discovery(watcher_id, new_port(), rec):
            await rec.wait_for(lambda: bool(rec.found_ids(ok_id)))

            def complained(agent_id: str) -> list[str]:
                return [r.getMessage() for r in caplog.records if agent_id in r.getMessage()]

            await rec.wait_for(lambda: bool(complained(v2_id) and complained(junk_id)), 1.0)
            await asyncio.sleep(0.3)
            assert rec.found_ids(ok_id, v2_id, junk_id) == [(LO, ports[ok_id], ok_id)]
            assert len(complained(v2_id)) == 1 and "version '2'" in complained(v2_id)[0]
            assert len(complained(junk_id)) == 1 and "bt=b'many'" in complained(junk_id)[0]


async def test_a_new_port_is_found_and_the_old_one_withdrawn(loopback_multicast: None) -> None:
    peer_id, old_port, new = new_id(), new_port(), new_port()
    rec = Recorder()
    async with registrar() as rz:
        info = record(peer_id, old_port, txt_properties(peer_id, 7852))
        await rz.async_register_service(info, cooperating_responders=True)
        async with discovery(new_id(), new_port(), rec):
            await rec.wait_for(lambda: (LO, old_port, peer_id) in rec.found)
            # Records younger than one second are not flushed (RFC 6762 §10.2): a real
            # agent does not change its port within a second of starting either.
            await asyncio.sleep(1.1)
            t0 = time.monotonic()
            info.port = new
            await rz.async_update_service(info)
            await rec.wait_for(lambda: (LO, new, peer_id) in rec.found, 3.0)
            # A service has one SRV record, so the old port is gone as soon as it is read.
            await rec.wait_for(lambda: (LO, old_port) in rec.lost, 3.0)
            print(f"port change: found and withdrawn after {time.monotonic() - t0:.3f} s")
            assert (LO, new) not in rec.lost


async def test_a_new_address_is_found_and_the_old_one_withdrawn(loopback_multicast: None) -> None:
    peer_id, port, moved = new_id(), new_port(), "127.0.0.2"
    rec = Recorder()
    async with registrar() as rz:
        info = record(peer_id, port, txt_properties(peer_id, 7852))
        await rz.async_register_service(info, cooperating_responders=True)
        async with discovery(new_id(), new_port(), rec):
            await rec.wait_for(lambda: (LO, port, peer_id) in rec.found)
            await asyncio.sleep(1.1)  # see above: let the first A record age past 1 s
            t0 = time.monotonic()
            info.addresses = [socket.inet_aton(moved)]
            await rz.async_update_service(info)
            await rec.wait_for(lambda: (moved, port, peer_id) in rec.found, 3.0)
            found = time.monotonic() - t0
            # Several A records may coexist, and the replaced one lives one more second
            # (cache flush), so it can only be withdrawn on the second look.
            assert (LO, port) not in rec.lost
            await rec.wait_for(lambda: (LO, port) in rec.lost, 3.0)
            print(
                f"address change: found after {found:.3f} s, old one withdrawn after "
                f"{time.monotonic() - t0:.3f} s"
            )
            assert (moved, port) not in rec.lost
