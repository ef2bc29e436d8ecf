"""Cluster mode over mDNS (issue 10): members' TXT records are signed and only those are
reported; an open-mode agent's record, another cluster's, a stale one and a tampered
one are ignored. Real zeroconf on loopback, as tests/test_mdns.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from test_mdns import LO, Recorder, loopback_multicast, new_port, record, registrar

from peer.cluster.announce import check_txt, signed_txt
from peer.cluster.credentials import ClusterDir, Member, load_member
from peer.discovery.mdns import MdnsDiscovery, txt_properties
from tracker.signing import Membership

__all__ = ["loopback_multicast"]  # the fixture, used by name


def members(tmp_path: Path, cluster: str, *names: str) -> list[Member]:
    d = ClusterDir(tmp_path / cluster)
    d.init(cluster)
    out = []
    for n in names:
        d.enroll(n, tmp_path / f"{cluster}-{n}.pem")
        out.append(load_member(tmp_path / f"{cluster}-{n}.pem"))
    return out


def discovery(m: Member | None, agent_id: str, port: int, rec: Recorder) -> MdnsDiscovery:
    kw: dict[str, Any] = {}
    if m is not None:
        membership = Membership(m.ca, m.crl)

        def check(p: Mapping[bytes, bytes | None], i: str, bt: int, api: int, now: float) -> str:
            return check_txt(membership, p, i, bt, api, now)

        kw = {"sign": lambda bt, api, now: signed_txt(m, bt, api, now), "check": check}
    return MdnsDiscovery(
        agent_id, "0.0.0.0", port, 7852, on_found=rec.on_found, on_lost=rec.on_lost,
        interfaces=[LO], advertise=[LO], **kw,
    )  # fmt: skip


async def test_only_members_signed_records_are_reported(
    loopback_multicast: None, tmp_path: Path
) -> None:
    a, b = members(tmp_path, "lab", "a", "b")
    (x,) = members(tmp_path, "other", "x")
    outsider_id = "0" * 31 + "1"
    ra, rb, rx, ro = Recorder(), Recorder(), Recorder(), Recorder()
    pa, pb, px, po = new_port(), new_port(), new_port(), new_port()
    stale_id, forged_id = "5" * 32, b.agent_id
    async with (
        discovery(a, a.agent_id, pa, ra),
        discovery(x, x.agent_id, px, rx),
        discovery(None, outsider_id, po, ro),
        registrar() as azc,
    ):
        # A stale record (a member's, signed 10 minutes ago) and a tampered one (b's
        # signature, another API port) are announced by hand.
        stale = txt_properties(a.agent_id, 7852) | signed_txt(a, 7852, 4000, time.time() - 600)
        forged = txt_properties(b.agent_id, 7852) | signed_txt(b, 7852, 4001, time.time())
        await azc.async_register_service(record(stale_id, 4000, stale))
        await azc.async_register_service(record("6" * 32, 4002, forged))
        async with discovery(b, b.agent_id, pb, rb):
            await ra.wait_for(lambda: bool(ra.found_ids(b.agent_id)))
            await rb.wait_for(lambda: bool(rb.found_ids(a.agent_id)))
            # The open-mode agent sees everyone (it checks nothing); let records settle.
            await ro.wait_for(lambda: bool(ro.found_ids(a.agent_id)))
            await asyncio.sleep(2.0)
            ids = (a.agent_id, b.agent_id, x.agent_id, outsider_id, stale_id, forged_id)
            assert ra.found_ids(*ids) == [(LO, pb, b.agent_id)]
            assert rb.found_ids(*ids) == [(LO, pa, a.agent_id)]
            assert rx.found_ids(*ids) == []  # another cluster: nobody of its own here
            assert (LO, 4002, forged_id) not in ra.found and (LO, 4000, a.agent_id) not in ra.found
