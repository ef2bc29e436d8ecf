"""Zero-configuration discovery of peer agents with multicast DNS (RFC 6762 / 6763).

Every agent registers one service and browses for the others:

    _hfswarm._tcp.local.    instance  hfswarm-<agent id>
      SRV  port = the peer API port, target hfswarm-<agent id>.local.
      A    the addresses the peer API can be reached on (IPv4)
      TXT  id=<agent id>  bt=<BitTorrent port>  v=<protocol version>

Each resolved peer is handed to the peer table as ``on_found(host, api_port, agent_id)``
(once per IPv4 address); the table then checks it with ``/v1/health`` before using it,
so nothing read from the network is trusted here beyond "worth a try".

What mDNS cannot tell: that a peer died. An agent that exits cleanly sends goodbye
packets (TTL 0) and the others call ``on_lost`` at once. Anyone on the link can send
a goodbye for any name, so ``on_lost`` only means "check it now" (the peer table drops
the peer only if its health check fails), and the name is asked for again once the
cache has let its records go: a peer still there answers and is reported found again.
An agent killed with SIGKILL, or whose machine lost power or network, sends nothing,
and its records stay in every cache for a long time (the PTR lives for minutes to over
an hour). That case belongs to the peer table's liveness checks, which drop a candidate
that stops answering; this module never guesses liveness from timers.

Limits: mDNS stays within one subnet (routers do not forward 224.0.0.251), so networks
of several subnets need the tracker or ``--peer``. Names are not probed for uniqueness
(``cooperating_responders``, see `MdnsDiscovery`): they are derived from the random agent
id, so two agents only collide if a state directory was copied, which is logged.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ifaddr
from zeroconf import Error as ZeroconfError
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peer.errors import NetworkError, PeerMisbehaved

log = logging.getLogger(__name__)

SERVICE_TYPE = "_hfswarm._tcp.local."
PROTOCOL_VERSION = 1
INSTANCE_PREFIX = "hfswarm-"

# The instance name is one DNS label (at most 63 bytes) made of the prefix and the id,
# and the id must survive a round trip through TXT unchanged: a conservative alphabet.
_AGENT_ID = re.compile(r"[A-Za-z0-9_-]{1,48}")
_PORT_DIGITS = re.compile(rb"[0-9]{1,5}")
# RFC 6762 §10.2: records superseded by a cache-flush answer (a peer that changed its
# port or address) stay valid for one more second. A second look after that second
# shows what is really gone.
_FLUSH_GRACE = 1.2
_GOODBYE_TIMEOUT = 2.0

FoundCallback = Callable[[str, int, str], None]
LostCallback = Callable[[str, int], None]
Endpoint = tuple[str, int]
# Cluster mode (`peer.cluster.announce`): the signed part of our TXT record (given bt
# and API ports, now), and the check of a peer's record (properties, agent id, bt port,
# API port, now -> "" or why it is ignored).
TxtSigner = Callable[[int, int, float], dict[str, str]]
TxtCheck = Callable[[Mapping[bytes, bytes | None], str, int, int, float], str]
RESIGN_EVERY = 120.0


class DiscoveryError(NetworkError):
    """Multicast discovery cannot run here (bad interface, port 5353 taken, no address)."""


class BadRecord(PeerMisbehaved):
    """An ``_hfswarm._tcp`` record we cannot use: missing or malformed TXT/SRV data."""


class UnsupportedVersion(BadRecord):
    """A record from an agent speaking another protocol version (or none at all)."""

    def __init__(self, version: str | None) -> None:
        super().__init__(f"protocol version {version!r}, this agent speaks {PROTOCOL_VERSION}")
        self.version = version


@dataclass(frozen=True)
class Announcement:
    """What a peer's TXT record says about it."""

    agent_id: str
    bt_port: int


def valid_agent_id(agent_id: str) -> bool:
    return _AGENT_ID.fullmatch(agent_id) is not None


def txt_properties(agent_id: str, bt_port: int) -> dict[str, str]:
    return {"id": agent_id, "bt": str(bt_port), "v": str(PROTOCOL_VERSION)}


def parse_txt(properties: Mapping[bytes, bytes | None]) -> Announcement:
    """The TXT record of a peer -> `Announcement`; `BadRecord` for anything malformed.

    The version is checked first: another version may lay out the other keys differently,
    so they are not even looked at.
    """
    version = properties.get(b"v")
    if version != str(PROTOCOL_VERSION).encode():
        raise UnsupportedVersion(None if version is None else version.decode(errors="replace"))
    raw_id = properties.get(b"id")
    agent_id = raw_id.decode("ascii", errors="replace") if raw_id is not None else ""
    if not valid_agent_id(agent_id):
        raise BadRecord(f"TXT id={raw_id!r} is not an agent id")
    raw_bt = properties.get(b"bt")
    # int() would accept " 80", "+80" and "٨٠"; a port is plain ASCII digits.
    if raw_bt is None or not _PORT_DIGITS.fullmatch(raw_bt) or not 0 < int(raw_bt) < 65536:
        raise BadRecord(f"TXT bt={raw_bt!r} is not a port number")
    return Announcement(agent_id, int(raw_bt))


# -- addresses ---------------------------------------------------------------------------


def local_ipv4_by_interface() -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses (ifaddr, which zeroconf itself uses)."""
    table: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        ips = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
        if ips:
            table[adapter.name] = ips
    return table


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address if isinstance(address, ipaddress.IPv4Address) else None


def _all_loopback(addresses: Sequence[str]) -> bool:
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def bind_addresses(interfaces: Sequence[str], local: Mapping[str, Sequence[str]]) -> list[str]:
    """``--interface`` values (IPv4 addresses or interface names) -> IPv4 addresses of
    this machine. Checked here because zeroconf either fails with a bare ENODEV or,
    worse, logs a warning and runs without a socket on that interface."""
    known = {ip for ips in local.values() for ip in ips}
    choices = ", ".join(f"{name} ({', '.join(ips)})" for name, ips in sorted(local.items()))
    out: list[str] = []
    for item in interfaces:
        if item in local:
            out.extend(local[item])
            continue
        address = _ipv4(item)
        if address is None:
            hint = "IPv6 is not used for discovery; " if ":" in item else ""
            raise DiscoveryError(
                f"--interface {item!r} is neither an IPv4 address nor an interface name",
                hint=f"{hint}choose one of: {choices}, or run with --no-mdns",
            )
        if str(address) not in known:
            raise DiscoveryError(
                f"--interface {item} is not an address of this machine",
                hint=f"choose one of: {choices}, or run with --no-mdns",
            )
        out.append(str(address))
    if not out:
        raise DiscoveryError(
            f"--interface {', '.join(interfaces)} has no IPv4 address",
            hint=f"choose one of: {choices}, or run with --no-mdns",
        )
    return list(dict.fromkeys(out))


def plan_addresses(
    api_host: str,
    interfaces: Sequence[str] | None,
    advertise: Sequence[str] | None,
    local: Mapping[str, Sequence[str]],
) -> tuple[list[str] | None, list[str]]:
    """(addresses to run mDNS on, None meaning all; addresses to put in our A records).

    The record must name addresses where the peer API answers, so a peer API bound to
    one address announces exactly that one. A peer API on loopback can only be reached
    from this machine: discovery then runs on loopback only (several agents on one host),
    rather than announcing 127.0.0.1 to the LAN, where it would mean every other machine.
    """
    bind = bind_addresses(interfaces, local) if interfaces else None
    # Resolving host names here would block; "localhost" is the one people type.
    api_ip = _ipv4("127.0.0.1" if api_host == "localhost" else api_host)
    if api_ip is None and ":" in api_host and api_host != "::":
        raise DiscoveryError(
            f"the peer API listens on IPv6 {api_host}; mDNS here announces IPv4 only",
            hint="listen on 0.0.0.0 or an IPv4 address, or run with --no-mdns",
        )
    if api_ip is not None and api_ip.is_unspecified:
        api_ip = None
    if api_ip is not None and api_ip.is_loopback:
        if bind is None:
            bind = [str(api_ip)]
        elif not _all_loopback(bind):
            raise DiscoveryError(
                f"the peer API listens on {api_host}, which other machines cannot reach",
                hint="listen on 0.0.0.0 or a LAN address, or run with --no-mdns",
            )

    if advertise:
        out = []
        for item in advertise:
            address = _ipv4(item)
            if address is None or address.is_unspecified or address.is_multicast:
                raise DiscoveryError(
                    f"cannot announce {item!r}: not a unicast IPv4 address",
                    hint="pass the LAN address peers should connect to",
                )
            out.append(str(address))
        return bind, list(dict.fromkeys(out))
    if api_ip is not None:
        return bind, [str(api_ip)]
    if bind is not None:
        if _all_loopback(bind):
            return bind, bind
        return bind, [a for a in bind if not ipaddress.ip_address(a).is_loopback]
    everything = [
        ip for ips in local.values() for ip in ips if not ipaddress.ip_address(ip).is_loopback
    ]
    if not everything:
        raise DiscoveryError(
            "this machine has no IPv4 address besides loopback to announce",
            hint="connect it to the LAN, or run with --no-mdns and name peers with --peer",
        )
    return None, list(dict.fromkeys(everything))


def _socket_error(exc: OSError, bind: Sequence[str] | None) -> DiscoveryError:
    where = ", ".join(bind) if bind else "all interfaces"
    if exc.errno == errno.EADDRINUSE:
        return DiscoveryError(
            f"cannot bind UDP port 5353 for mDNS on {where}: another responder holds it",
            hint="let it share the port (avahi: disallow-other-stacks=no), "
            "or run with --no-mdns and name peers with --peer",
        )
    return DiscoveryError(
        f"cannot join the mDNS multicast group on {where}: {exc.strerror or exc}",
        hint="pick the LAN interface with --interface ADDRESS, or run with --no-mdns",
    )


# -- the service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Known:
    agent_id: str
    endpoints: frozenset[Endpoint]


class MdnsDiscovery:
    """Announce this agent and report the others, for as long as the context is open.

        async with MdnsDiscovery(
            agent_id, "0.0.0.0", api_port, bt_port,
            on_found=lambda host, port, _id: table.offer(host, port, "mdns"),
            on_lost=table.withdraw,
        ):
            ...

    The callbacks run on the event loop and must not block. ``interfaces`` are the IPv4
    addresses or interface names to run mDNS on (None: all); ``advertise`` overrides the
    addresses in our record (None: see `plan_addresses`).
    """

    def __init__(
        self,
        agent_id: str,
        api_host: str,
        api_port: int,
        bt_port: int,
        *,
        on_found: FoundCallback,
        on_lost: LostCallback,
        interfaces: Sequence[str] | None = None,
        advertise: Sequence[str] | None = None,
        resolve_timeout: float = 3.0,
        sign: TxtSigner | None = None,
        check: TxtCheck | None = None,
    ) -> None:
        if not valid_agent_id(agent_id):
            raise ValueError(f"agent id {agent_id!r} cannot be used in an mDNS name")
        self.agent_id = agent_id
        self.api_host = api_host
        self.api_port = api_port
        self.bt_port = bt_port
        self.on_found = on_found
        self.on_lost = on_lost
        self.interfaces = tuple(interfaces) if interfaces else None
        self.advertise = tuple(advertise) if advertise else None
        self.resolve_timeout = resolve_timeout
        self.instance_name = f"{INSTANCE_PREFIX}{agent_id}.{SERVICE_TYPE}"
        self.announced: list[str] = []
        self.bound: list[str] | None = None
        self._azc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._announcing: asyncio.Future[Any] | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._known: dict[str, _Known] = {}
        self._complained: set[str] = set()
        self._accept_loopback = False
        self._sign = sign
        self._check = check
        self._resigning: asyncio.Task[None] | None = None

    def _properties(self) -> dict[str, str]:
        props = txt_properties(self.agent_id, self.bt_port)
        if self._sign is not None:
            props |= self._sign(self.bt_port, self.api_port, time.time())
        return props

    async def _resign(self) -> None:
        """Cluster mode: sign our record again before it grows stale to others."""
        while True:
            await asyncio.sleep(RESIGN_EVERY)
            if self._azc is None or self._info is None:
                return
            self._info = AsyncServiceInfo(
                SERVICE_TYPE,
                self.instance_name,
                port=self.api_port,
                properties=self._properties(),
                server=f"{INSTANCE_PREFIX}{self.agent_id}.local.",
                parsed_addresses=self.announced,
            )
            try:
                await self._azc.async_update_service(self._info)
            except ZeroconfError as exc:
                log.warning("mDNS: could not sign our record again: %r", exc)

    def known(self) -> dict[str, tuple[str, frozenset[Endpoint]]]:
        """Instance name -> (agent id, endpoints reported): for status pages and tests."""
        return {name: (k.agent_id, k.endpoints) for name, k in self._known.items()}

    async def __aenter__(self) -> MdnsDiscovery:
        self.bound, self.announced = plan_addresses(
            self.api_host, self.interfaces, self.advertise, local_ipv4_by_interface()
        )
        # A loopback address in a record only means "this machine" to a listener on the
        # same machine, which is the case only when we run on loopback alone.
        self._accept_loopback = self.bound is not None and _all_loopback(self.bound)
        try:
            self._azc = AsyncZeroconf(
                interfaces=self.bound if self.bound is not None else InterfaceChoice.All,
                ip_version=IPVersion.V4Only,
            )
            await self._azc.zeroconf.async_wait_for_start()
        except OSError as exc:
            await self._close_zeroconf()
            raise _socket_error(exc, self.bound) from exc
        try:
            # zeroconf logs and skips an interface it cannot use; with none left it
            # would run deaf and mute without a word.
            if not self._azc.zeroconf.engine.senders:
                raise DiscoveryError(
                    f"mDNS could not open a socket on {', '.join(self.bound or ['any interface'])}",
                    hint="pick the LAN interface with --interface ADDRESS, or run with --no-mdns",
                )
            self._info = AsyncServiceInfo(
                SERVICE_TYPE,
                self.instance_name,
                port=self.api_port,
                properties=self._properties(),
                # One host name per agent, not the machine's: two agents on one machine
                # must not send goodbyes for each other's address records.
                server=f"{INSTANCE_PREFIX}{self.agent_id}.local.",
                parsed_addresses=self.announced,
            )
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
            )
            # cooperating_responders skips the three probes (about 1.2 s before the
            # first announcement): our names are unique by construction.
            self._announcing = asyncio.ensure_future(
                await self._azc.async_register_service(self._info, cooperating_responders=True)
            )
        except ZeroconfError as exc:
            await self._close_zeroconf()
            raise DiscoveryError(
                f"cannot register {self.instance_name} for mDNS: {exc!r}",
                hint="run with --no-mdns and name peers with --peer",
            ) from exc
        except BaseException:
            await self._close_zeroconf()
            raise
        if self._sign is not None:
            self._resigning = asyncio.ensure_future(self._resign())
        log.info(
            "mDNS: announcing %s on %s (api %d, bt %d)",
            self.agent_id[:8],
            ", ".join(self.announced),
            self.api_port,
            self.bt_port,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Stop reacting first, so no callback reaches a peer table being torn down.
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        await _cancel_all([*self._resolving.values()])
        self._resolving.clear()
        if self._resigning is not None:
            await _cancel_all([self._resigning])
            self._resigning = None
        if self._announcing is not None:
            await _cancel_all([self._announcing])
            self._announcing = None
        if self._azc is not None and self._info is not None:
            try:
                # The outer await only queues the goodbyes; the inner one sends them.
                # Closing without it would leave peers to find out by health checks.
                goodbye = await self._azc.async_unregister_service(self._info)
                await asyncio.wait_for(goodbye, _GOODBYE_TIMEOUT)
            except (OSError, TimeoutError, ZeroconfError) as err:
                log.warning("mDNS: could not send goodbye (%s); peers will notice later", err)
            self._info = None
        await self._close_zeroconf()

    async def _close_zeroconf(self) -> None:
        if self._azc is not None:
            azc, self._azc = self._azc, None
            try:
                await azc.async_close()
            except (OSError, ZeroconfError) as err:
                log.debug("mDNS: error while closing: %s", err)

    # -- browsing --------------------------------------------------------------------

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Called by zeroconf on the loop; it must not raise or block."""
        if name == self.instance_name:
            return
        if state_change is ServiceStateChange.Removed:
            self._stop_resolving(name)
            self._forget(name)
            self._start_resolving(name, look_again=False, delay=_FLUSH_GRACE)
            return
        # Updated fires for new records only, while the ones they replace expire a
        # second later: look again after that second to withdraw what is gone.
        self._start_resolving(name, look_again=state_change is ServiceStateChange.Updated)

    def _start_resolving(self, name: str, *, look_again: bool, delay: float = 0.0) -> None:
        self._stop_resolving(name)
        task = asyncio.get_running_loop().create_task(
            self._resolve(name, look_again, delay), name=f"mdns-resolve {name}"
        )
        self._resolving[name] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._resolving.get(name) is t:
                del self._resolving[name]
            if not t.cancelled() and t.exception() is not None:
                log.error("mDNS: resolving %s failed", name, exc_info=t.exception())

        task.add_done_callback(done)

    def _stop_resolving(self, name: str) -> None:
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()

    async def _resolve(self, name: str, look_again: bool, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        await self._refresh(name)
        if look_again:
            await asyncio.sleep(_FLUSH_GRACE)
            await self._refresh(name)

    async def _refresh(self, name: str) -> None:
        assert self._azc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._azc.zeroconf, self.resolve_timeout * 1000):
            # No answer in time: keep what we knew; a later update or a health check
            # settles it.
            log.debug("mDNS: %s did not resolve within %.1f s", name, self.resolve_timeout)
            return
        try:
            announcement = parse_txt(info.properties)
            if info.port is None or not 0 < info.port < 65536:
                raise BadRecord(f"SRV port {info.port!r} is not a port number")
            if self._check is not None:
                why = self._check(
                    info.properties,
                    announcement.agent_id,
                    announcement.bt_port,
                    info.port,
                    time.time(),
                )
                if why:
                    raise BadRecord(f"not a member's signed record: {why}")
        except UnsupportedVersion as exc:
            self._complain_once(name, logging.INFO, "mDNS: ignoring %s: %s", name, exc)
            self._forget(name)
            return
        except BadRecord as exc:
            self._complain_once(name, logging.WARNING, "mDNS: ignoring %s: %s", name, exc)
            self._forget(name)
            return
        if announcement.agent_id == self.agent_id:
            self._complain_once(
                name,
                logging.WARNING,
                "mDNS: %s announces our own agent id %s (a copied state directory?)",
                name,
                self.agent_id,
            )
            return
        hosts = [
            host
            for host in info.parsed_addresses(IPVersion.V4Only)
            if self._accept_loopback or not ipaddress.ip_address(host).is_loopback
        ]
        self._update(name, announcement.agent_id, frozenset((h, info.port) for h in hosts))

    def _complain_once(self, name: str, level: int, msg: str, *args: object) -> None:
        if name not in self._complained:
            self._complained.add(name)
            log.log(level, msg, *args)

    # -- what we report --------------------------------------------------------------

    def _update(self, name: str, agent_id: str, endpoints: frozenset[Endpoint]) -> None:
        old = self._known.get(name)
        if endpoints:
            self._known[name] = _Known(agent_id, endpoints)
        else:
            self._known.pop(name, None)
        before = old.endpoints if old is not None else frozenset()
        for endpoint in sorted(before - endpoints):
            self._report_lost(endpoint)
        fresh = endpoints if old is None or old.agent_id != agent_id else endpoints - before
        for host, port in sorted(fresh):
            self._call(self.on_found, host, port, agent_id)

    def _forget(self, name: str) -> None:
        old = self._known.pop(name, None)
        if old is not None:
            for endpoint in sorted(old.endpoints):
                self._report_lost(endpoint)

    def _report_lost(self, endpoint: Endpoint) -> None:
        # Another record may still name this address (a restarted agent on the same
        # port, under a new id, while the old record lingers): then it is not gone.
        if not any(endpoint in k.endpoints for k in self._known.values()):
            self._call(self.on_lost, *endpoint)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            # Our bug, not the network's: say so loudly but keep discovering.
            log.exception("mDNS: callback %r%r failed", callback, args)


async def _cancel_all(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel and wait, without swallowing a cancellation aimed at the caller."""
    pending = [f for f in futures if not f.done()]
    for f in pending:
        f.cancel()
    if pending:
        await asyncio.wait(pending)
    for f in futures:
        if f.done() and not f.cancelled() and f.exception() is not None:
            log.debug("mDNS: background step failed: %s", f.exception())


__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Announcement",
    "BadRecord",
    "DiscoveryError",
    "MdnsDiscovery",
    "UnsupportedVersion",
    "parse_txt",
    "plan_addresses",
    "txt_properties",
]
