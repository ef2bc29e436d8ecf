"""A simulated LAN in network namespaces, for the LAN tests and the benchmarks (root only).

    import netlab
    with netlab.Lan(hosts=3, wan_rate="100mbit", wan_rtt_ms=40) as lan:
        mirror = netlab.start_mirror(lan, [f"model:org/m={folder}"], workdir)
        a = netlab.start_agent(lan, 1, workdir / "a", mirror.url)
        a.download("org/m")
        print(mirror.stats().per_client)

Topology (one `Lan`; every name starts with its prefix, so several can coexist):

    h1..hN   hosts: eth0 = 10.77.0.<i>/24, default route via 10.77.0.254, multicast route
    br       switch + router: bridge br0 = 10.77.0.254 with one port vh<i> per host,
             wan0 = 10.78.0.1 toward the mirror, IPv4 forwarding on
    mir      the upstream mirror: wan1 = 10.78.0.2, route to 10.77.0.0/24 via 10.78.0.1

Host ports are shaped with tbf at `lan_rate` in both directions, the WAN link with tbf at
`wan_rate` in both directions plus `wan_rtt_ms` of round-trip delay. The kernel here has
no sch_netem, so the delay is a small userspace delay line between two TUN devices,
a child process of the `Lan` (rtt 0: a plain veth pair). Traffic stays inside these
namespaces: nothing is routed to or from the namespace the tests run in, and children
get an environment without proxy variables.

Processes run in a namespace through ``ip netns exec`` (`Netns.popen` / `Netns.run`).
Leaving the `with` block, for whatever reason (a failed assertion, KeyboardInterrupt,
SIGTERM while the Lan is up), kills every process in its namespaces (SIGTERM, then
SIGKILL after a grace period) and deletes them. Children also get SIGKILL should the
test process itself die (PR_SET_PDEATHSIG), and a later `Lan` removes namespaces left
by a test process that no longer exists.

Above the network sit helpers that start the project's own parts in it: the mirror
server (`start_mirror`), agents (`start_agent`, ``hfswarm agent``), the LAN tracker
(`start_tracker`), and `wait_until`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
HFSWARM = [sys.executable, "-m", "peer.cli.main"]

SUBNET = "10.77.0"
ROUTER_IP = f"{SUBNET}.254"
WAN_ROUTER_IP = "10.78.0.1"
MIRROR_IP = "10.78.0.2"
MAX_HOSTS = 250
# Namespace names are kept to interface-name length (IFNAMSIZ - 1), so they can also
# name interfaces and never get cut in `ip` listings; the longest role is "h250".
_NAME_MAX = 15
_PREFIX_MAX = _NAME_MAX - len(f"h{MAX_HOSTS}")
_OUR_NAME = re.compile(r"nl(?P<pid>[0-9a-z]+)_[0-9a-z]+-(?:h\d+|br|mir)")
_TRACKED_GRACE = 2.0

# The WAN delay line: everything read from one TUN device is written to the other one
# `rtt/2` later. PR_SET_PDEATHSIG: it dies with whoever started it.
_DELAY_LINE = r"""
import collections, ctypes, fcntl, os, select, signal, struct, sys, time
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[4]):
    sys.exit("parent gone")
d = float(sys.argv[1]) / 2000.0
def tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    # TUNSETIFF with IFF_TUN | IFF_NO_PI
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x1001))
    return fd
a, b = tun(sys.argv[2]), tun(sys.argv[3])
peer = {a: b, b: a}
q = {a: collections.deque(), b: collections.deque()}  # packets due to be written into fd
ep = select.epoll()
ep.register(a, select.EPOLLIN)
ep.register(b, select.EPOLLIN)
while True:
    due = [x[0][0] for x in q.values() if x]
    for fd, _ in ep.poll(max(0.0, min(due) - time.monotonic()) if due else -1):
        out = q[peer[fd]]
        t = time.monotonic() + d
        for _ in range(512):
            try:
                out.append((t, os.read(fd, 65536)))
            except BlockingIOError:
                break
    now = time.monotonic()
    for fd, x in q.items():
        while x and x[0][0] <= now:
            try:
                os.write(fd, x.popleft()[1])
            except OSError:
                pass
"""

# One HTTP request from inside a namespace (the mirror's control API is only reachable
# there). No proxies, whatever the environment says.
_HTTP = r"""
import sys, urllib.request, urllib.error
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, data=body.encode() if body else None, method=method,
                             headers={"Content-Type": "application/json"})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=20) as r:
        sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    sys.stderr.write(f"HTTP {e.code}: {e.read().decode(errors='replace')}")
    sys.exit(1)
"""


class LanError(RuntimeError):
    """Building or using the simulated LAN failed; the message names the command."""


# -- can it run here? -------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why a `Lan` cannot be built on this machine, or None. Tests skip with this text.

    Checks root, iproute2 (`ip`, `tc`), /dev/net/tun, and then really tries what the
    Lan needs in a throwaway namespace: a veth pair, a bridge, a tbf qdisc and a TUN
    device opened inside a namespace. Cached: the probe runs once per process.
    """
    return _probe()


@lru_cache(maxsize=1)
def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root; try sudo)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install iproute2 (apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (the WAN delay line needs TUN): modprobe tun"
    name = f"nlprobe{_b36(os.getpid())}"
    _delete_netns(name)
    added = _run(["ip", "netns", "add", name], check=False)
    if added.returncode != 0:
        return f"cannot create a network namespace: {added.stderr.strip()}"
    try:
        steps: list[tuple[list[str], str]] = [
            (["ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
             "cannot create a veth pair (CONFIG_VETH)"),
            (["ip", "-n", name, "link", "add", "b0", "type", "bridge"],
             "cannot create a bridge (CONFIG_BRIDGE)"),
            (["tc", "-n", name, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1mbit",
              "burst", "32k", "latency", "25ms"],
             "cannot add a tbf qdisc (CONFIG_NET_SCH_TBF)"),
            (["ip", "netns", "exec", name, sys.executable, "-c",
              "import fcntl, os, struct; fd = os.open('/dev/net/tun', os.O_RDWR); "
              "fcntl.ioctl(fd, 0x400454CA, struct.pack('16sH', b'nlprobe', 0x1001))"],
             "cannot open a TUN device inside a namespace"),
        ]  # fmt: skip
        for argv, why in steps:
            done = _run(argv, check=False)
            if done.returncode != 0:
                return f"{why}: {done.stderr.strip().splitlines()[-1:] or ['?']}"
    finally:
        _delete_netns(name)
    return None


# -- small process helpers -------------------------------------------------------------


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30
    )
    if check and done.returncode != 0:
        raise LanError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it holds nothing any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _netns_names() -> list[str]:
    done = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _netns_pids(name: str) -> set[int]:
    done = _run(["ip", "netns", "pids", name], check=False)
    return {int(p) for p in done.stdout.split() if p.isdigit()}


def _delete_netns(name: str) -> None:
    _run(["ip", "netns", "del", name], check=False)


def _stop_pids(pids: Iterable[int], grace: float) -> None:
    """SIGTERM, up to `grace` s to exit, then SIGKILL; returns once all are gone."""
    pids = {p for p in pids if p != os.getpid()}
    for p in pids:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in pids:
        if _alive(p):
            _signal(p, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _teardown_names(names: Iterable[str], grace: float = _TRACKED_GRACE) -> None:
    names = [n for n in names if n in set(_netns_names())]
    pids: set[int] = set()
    for n in names:
        pids |= _netns_pids(n)
    _stop_pids(pids, grace)
    for n in names:
        _delete_netns(n)


def cleanup_stale() -> list[str]:
    """Delete namespaces (and kill their processes) that a `Lan` with a default prefix
    left behind when its test process died without tearing down. Only names of the
    form ``nl<pid>_<n>-<role>`` whose pid no longer runs are touched."""
    stale = [
        n for n in _netns_names() if (m := _OUR_NAME.fullmatch(n)) and not _alive(int(m["pid"], 36))
    ]
    if stale:
        _teardown_names(stale, grace=0.5)
    return stale


def child_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment for processes in the LAN: this one without proxies (traffic must
    stay in the namespaces) and without HF_*/HFSWARM_* settings (each part gets its
    mirror, cache and agent on the command line); `home` becomes HF_HOME."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.lower().endswith("_proxy") or k.startswith(("HF_", "HFSWARM_")))
    }
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if home is not None:
        env["HF_HOME"] = str(home)
    env.update(extra)
    return env


# -- the network ------------------------------------------------------------------------


class Netns:
    """One namespace of a `Lan`; `ip` is its address on the LAN or WAN (None: router)."""

    def __init__(self, lan: Lan, name: str, ip: str | None) -> None:
        self.lan = lan
        self.name = name
        self.ip = ip

    def __repr__(self) -> str:
        return f"Netns({self.name!r}, {self.ip!r})"

    def wrap(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """`argv` as a command that runs inside this namespace."""
        cmd = ["ip", "netns", "exec", self.name]
        if shutil.which("setpriv") and threading.current_thread() is threading.main_thread():
            # SIGKILL should the test process die (the thread that forks is the "parent"
            # for PDEATHSIG, so only the main thread, which lives as long as the process).
            cmd += ["setpriv", "--pdeathsig", "KILL", "--"]
        return cmd + [os.fspath(a) for a in argv]

    def popen(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        **kw: Any,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in this namespace. The Lan stops it on teardown at the latest."""
        if not self.lan.is_up:
            raise LanError(f"the LAN is down: cannot start {argv[0]!r} in {self.name}")
        proc = subprocess.Popen(
            self.wrap(argv),
            env=dict(env) if env is not None else child_env(),
            stdin=kw.pop("stdin", subprocess.DEVNULL),
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, we stop them
            **kw,
        )
        self.lan._track(proc)
        return proc

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` here to completion; output captured as text."""
        if not self.lan.is_up:
            raise LanError(f"the LAN is down: cannot run {argv[0]!r} in {self.name}")
        done = subprocess.run(
            self.wrap(argv),
            env=dict(env) if env is not None else child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise LanError(
                f"`{' '.join(map(str, argv))}` in {self.name} exited with {done.returncode}:"
                f" {done.stderr.strip()[-2000:]}"
            )
        return done

    def pids(self) -> set[int]:
        return _netns_pids(self.name)


def _rate_bytes(rate: str) -> int | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps)?", rate.strip().lower())
    if m is None:
        return None
    value = float(m[1]) * 1000 ** " kmgt".index(m[2] or " ")
    return int(value if m[3] == "bps" else value / 8)


def _burst(rate: str, floor: int) -> str:
    """tbf needs burst >= rate / HZ; the lan.sh figures (256k at 1gbit, 64k at 100mbit)
    measured 956 and 92 Mbit/s; scale up for faster links."""
    per_s = _rate_bytes(rate)
    return f"{max(floor, (per_s or 0) // 500) // 1024}k"


class Lan:
    """`with Lan(hosts=N) as lan:` hosts h1..hN, a router and a mirror namespace.

    Rates are tc rates ("1gbit", "100mbit", ...); "0" or None leaves a link unshaped.
    `prefix` (at most 11 characters) names the namespaces; the default is unique per
    process and Lan. Namespaces already there under the same prefix (a crashed run)
    are removed first.
    """

    _count = 0
    _count_lock = threading.Lock()

    def __init__(
        self,
        hosts: int = 3,
        *,
        lan_rate: str | None = "1gbit",
        wan_rate: str | None = "100mbit",
        wan_rtt_ms: float = 40.0,
        prefix: str | None = None,
        python: str = sys.executable,
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise LanError(f"hosts must be 1..{MAX_HOSTS}, not {hosts}")
        if wan_rtt_ms < 0:
            raise LanError("wan_rtt_ms must be >= 0")
        if prefix is None:
            with Lan._count_lock:
                n, Lan._count = Lan._count, Lan._count + 1
            prefix = f"nl{_b36(os.getpid())}_{_b36(n)}-"
        if not re.fullmatch(rf"[A-Za-z0-9_.-]{{1,{_PREFIX_MAX}}}", prefix):
            raise LanError(f"prefix {prefix!r}: use at most {_PREFIX_MAX} of A-Z a-z 0-9 _ . -")
        self.prefix = prefix
        self.lan_rate = lan_rate
        self.wan_rate = wan_rate
        self.wan_rtt_ms = wan_rtt_ms
        self.python = python
        self.router_ip = ROUTER_IP
        self.mirror_ip = MIRROR_IP
        self.hosts = [Netns(self, f"{prefix}h{i}", f"{SUBNET}.{i}") for i in range(1, hosts + 1)]
        self.router_ns = Netns(self, f"{prefix}br", None)
        self.mirror_ns = Netns(self, f"{prefix}mir", MIRROR_IP)
        self.is_up = False
        self.setup_seconds = 0.0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._delay: subprocess.Popen[bytes] | None = None
        self._old_sigterm: Any = None

    # -- access --------------------------------------------------------------------------

    def host(self, i: int) -> Netns:
        """Host i, counted from 1 like its address 10.77.0.i."""
        if not 1 <= i <= len(self.hosts):
            raise LanError(f"no host {i}: this LAN has h1..h{len(self.hosts)}")
        return self.hosts[i - 1]

    def host_ip(self, i: int) -> str:
        ip = self.host(i).ip
        assert ip is not None
        return ip

    @property
    def names(self) -> list[str]:
        return [*(h.name for h in self.hosts), self.router_ns.name, self.mirror_ns.name]

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Lan:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise LanError(f"cannot build the simulated LAN: {reason}")
        t0 = time.monotonic()
        cleanup_stale()
        _teardown_names(self.names, grace=0.5)  # same prefix, left by a crashed run
        self.is_up = True
        atexit.register(self.down)
        self._catch_sigterm()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self.setup_seconds = time.monotonic() - t0

    def down(self) -> None:
        """Stop every process in the namespaces and delete them. Idempotent."""
        if not self.is_up:
            return
        self.is_up = False
        try:
            pids = {p.pid for p in self._procs if p.poll() is None}
            if self._delay is not None and self._delay.poll() is None:
                pids.add(self._delay.pid)
            for n in self.names:
                pids |= _netns_pids(n)
            _stop_pids(pids, _TRACKED_GRACE)
            for p in [*self._procs, *([self._delay] if self._delay else [])]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)  # reap: no zombies left behind
            self._procs.clear()
            self._delay = None
            for n in self.names:
                _delete_netns(n)
        finally:
            atexit.unregister(self.down)
            self._restore_sigterm()

    def stop_processes(self, grace: float = _TRACKED_GRACE) -> None:
        """Stop everything started with `popen` (the LAN itself stays up)."""
        live = [p for p in self._procs if p.poll() is None]
        _stop_pids({p.pid for p in live}, grace)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self._procs.clear()

    def _track(self, proc: subprocess.Popen[bytes]) -> None:
        self._procs = [p for p in self._procs if p.poll() is None]
        self._procs.append(proc)

    def _catch_sigterm(self) -> None:
        """SIGTERM (e.g. a CI timeout) would end the process without unwinding, leaving
        the namespaces behind: turn it into SystemExit while the LAN is up."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, handler)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # -- building ------------------------------------------------------------------------

    def _ns_init(self, ns: Netns) -> None:
        _run(["ip", "netns", "add", ns.name])
        _run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        # No IPv6 DAD (else ~1 s of tentative link-local addresses), no rp_filter.
        _run(["ip", "netns", "exec", ns.name, "sh", "-c",
              "for k in all default; do echo 0 > /proc/sys/net/ipv6/conf/$k/accept_dad;"
              " echo 0 > /proc/sys/net/ipv4/conf/$k/rp_filter; done"])  # fmt: skip

    def _shape(self, ns: Netns, dev: str, rate: str | None, floor: int) -> None:
        if rate in (None, "", "0"):
            return
        assert rate is not None
        _run(["tc", "-n", ns.name, "qdisc", "replace", "dev", dev, "root", "tbf",
              "rate", rate, "burst", _burst(rate, floor), "latency", "25ms"])  # fmt: skip

    def _build(self) -> None:
        br, mir = self.router_ns.name, self.mirror_ns.name
        self._ns_init(self.router_ns)
        self._ns_init(self.mirror_ns)
        _run(["ip", "netns", "exec", br, "sh", "-c",
              "echo 1 > /proc/sys/net/ipv4/ip_forward;"
              " echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6;"
              " for f in /proc/sys/net/bridge/bridge-nf-call-*; do"
              " [ -w \"$f\" ] && echo 0 > \"$f\"; done; true"])  # fmt: skip
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge",
              "stp_state", "0", "mcast_snooping", "0"])  # fmt: skip
        _run(["ip", "-n", br, "addr", "add", f"{ROUTER_IP}/24", "dev", "br0"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        for i, h in enumerate(self.hosts, start=1):
            self._ns_init(h)
            _run(["ip", "link", "add", "name", "eth0", "netns", h.name, "type", "veth",
                  "peer", "name", f"vh{i}", "netns", br])  # fmt: skip
            _run(["ip", "-n", br, "link", "set", f"vh{i}", "master", "br0", "up"])
            _run(["ip", "-n", h.name, "addr", "add", f"{h.ip}/24", "dev", "eth0"])
            _run(["ip", "-n", h.name, "link", "set", "eth0", "up"])
            _run(["ip", "-n", h.name, "route", "add", "default", "via", ROUTER_IP])
            # multicast (mDNS) goes out of eth0 even where a default route would not say so
            _run(["ip", "-n", h.name, "route", "add", "224.0.0.0/4", "dev", "eth0"])
            self._shape(h, "eth0", self.lan_rate, 256 * 1024)
            self._shape(self.router_ns, f"vh{i}", self.lan_rate, 256 * 1024)
        if self.wan_rtt_ms > 0:
            self._start_delay_line()
            _run(["ip", "-n", br, "link", "set", "wan1", "netns", mir])
        else:
            _run(["ip", "link", "add", "name", "wan0", "netns", br, "type", "veth",
                  "peer", "name", "wan1", "netns", mir])  # fmt: skip
        _run(["ip", "-n", br, "addr", "add", WAN_ROUTER_IP, "peer", MIRROR_IP, "dev", "wan0"])
        _run(["ip", "-n", br, "link", "set", "wan0", "up"])
        _run(["ip", "-n", mir, "addr", "add", MIRROR_IP, "peer", WAN_ROUTER_IP, "dev", "wan1"])
        _run(["ip", "-n", mir, "link", "set", "wan1", "up"])
        _run(["ip", "-n", mir, "route", "add", f"{SUBNET}.0/24", "via", WAN_ROUTER_IP,
              "dev", "wan1"])  # fmt: skip
        self._shape(self.router_ns, "wan0", self.wan_rate, 64 * 1024)
        self._shape(self.mirror_ns, "wan1", self.wan_rate, 64 * 1024)

    def _start_delay_line(self) -> None:
        br = self.router_ns.name
        args = [str(self.wan_rtt_ms), "wan0", "wan1", str(os.getpid())]
        self._delay = subprocess.Popen(
            ["ip", "netns", "exec", br, self.python, "-c", _DELAY_LINE, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _run(["ip", "-n", br, "link", "show", "wan1"], check=False).returncode == 0:
                return
            if self._delay.poll() is not None:
                err = self._delay.stderr.read().decode() if self._delay.stderr else ""
                raise LanError(f"the WAN delay line exited: {err.strip()}")
            time.sleep(0.02)
        raise LanError("the WAN delay line did not create its TUN devices within 10 s")


# -- waiting ------------------------------------------------------------------------------


def wait_until(
    check: Callable[[], Any], timeout: float, *, what: str, interval: float = 0.2
) -> tuple[Any, float]:
    """Call `check` until it returns something truthy; (that value, seconds it took).
    AssertionError naming `what` (and the last value) after `timeout` s."""
    t0 = time.monotonic()
    last: Any = None
    while True:
        last = check()
        if last:
            return last, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
        time.sleep(interval)


def _first_line(path: Path, proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """The first complete line a child wrote to `path` (its stdout)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            if "\n" in text:
                return text.split("\n", 1)[0]
        if proc.poll() is not None:
            raise LanError(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise LanError(f"{what} was not ready within {timeout} s")
        time.sleep(0.05)


def _log_tail(path: Path, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


# -- the project's parts in the LAN -------------------------------------------------------


@dataclass
class MirrorProc:
    """`hfswarm mirror serve` in the mirror namespace; its control API, from inside."""

    lan: Lan
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def control(self, method: str, route: str, body: Any = None) -> Any:
        url = f"{self.url}/_mirror/{route}"
        data = "" if body is None else json.dumps(body)
        done = self.lan.mirror_ns.run(
            [self.lan.python, "-I", "-c", _HTTP, method, url, data], timeout=30
        )
        return json.loads(done.stdout)

    def stats(self) -> Any:  # MirrorStats (imported lazily: netlab imports nothing of peer)
        from peer.mirror_server.control import MirrorStats

        return MirrorStats.from_json(self.control("GET", "stats"))

    def reset_stats(self) -> None:
        self.control("POST", "reset")


def start_mirror(
    lan: Lan, specs: Sequence[str], workdir: Path, *extra: str, port: int = 0
) -> MirrorProc:
    """The project's mirror at `lan.mirror_ip` serving `specs` (TYPE:ORG/NAME=FOLDER);
    `extra` are more `hfswarm mirror serve` options (e.g. --client-rate)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out, log = workdir / "mirror.out", workdir / "mirror.log"
    with open(out, "wb") as o, open(log, "wb") as e:
        proc = lan.mirror_ns.popen(
            [*HFSWARM, "mirror", "serve", "--listen", f"{lan.mirror_ip}:{port}", *extra, *specs],
            env=child_env(workdir / "hf-home"),
            stdout=o,
            stderr=e,
        )
    try:
        url = _first_line(out, proc, 120, "the mirror").strip()
    except LanError as exc:
        raise LanError(f"{exc}\n{_log_tail(log)}") from None
    return MirrorProc(lan, proc, url, log)


@dataclass
class AgentProc:
    """``hfswarm agent`` on one host of the LAN, and its CLI (run on that host)."""

    lan: Lan
    index: int
    root: Path
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    log: Path
    env: dict[str, str] = field(repr=False)

    @property
    def host(self) -> Netns:
        return self.lan.host(self.index)

    @property
    def ip(self) -> str:
        return self.lan.host_ip(self.index)

    @property
    def agent_id(self) -> str:
        return str(self.info["agent_id"])

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.info['local_port']}"  # the host's own loopback

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def cli(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``hfswarm ARGS --agent <this agent>`` on the agent's host."""
        return self.host.run(
            [*HFSWARM, *args, "--agent", self.local_url], env=self.env, timeout=timeout, check=check
        )

    def status(self) -> dict[str, Any]:
        """``hfswarm status --json``."""
        status: dict[str, Any] = json.loads(self.cli("status", "--json").stdout)
        return status

    def peer_ids(self) -> set[str]:
        return {p["agent_id"] for p in self.status()["peers"]}

    def download_cmd(self, repo_id: str, *args: str) -> list[str]:
        return [*HFSWARM, "download", repo_id, "--quiet", "--agent", self.local_url, *args]

    def start_download(
        self, repo_id: str, *args: str, out: IO[Any] | None = None
    ) -> subprocess.Popen[bytes]:
        """``hfswarm download`` on this host, not waited for (herds start together)."""
        return self.host.popen(
            self.download_cmd(repo_id, *args),
            env=self.env,
            stdout=out if out is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def download(self, repo_id: str, *args: str, timeout: float = 180) -> Path:
        """``hfswarm download`` to the end; the snapshot folder it printed."""
        done = self.host.run(self.download_cmd(repo_id, *args), env=self.env, timeout=timeout)
        return Path(done.stdout.strip().splitlines()[-1])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        _signal(self.proc.pid, sig)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        return _log_tail(self.log, n)


def start_agent(
    lan: Lan,
    i: int,
    root: Path,
    mirror_url: str,
    *extra: str,
    mdns: bool = True,
    trackers: Sequence[str] = (),
    peers: Sequence[str] = (),
    timeout: float = 60,
) -> AgentProc:
    """``hfswarm agent`` on host i with its cache and state under `root`, on the default
    ports (each host has its own), mDNS on unless `mdns=False`; returns once the agent
    printed its ready line. Logs: root/agent.log. The config file is an empty one: none of
    the machine's settings leak in."""
    root.mkdir(parents=True, exist_ok=True)
    argv: list[str] = [*HFSWARM, "agent", "-v", "--cache-dir", str(root / "cache"),
                       "--state-dir", str(root / "state"), "--mirror", mirror_url,
                       "--config", os.devnull]  # fmt: skip
    if not mdns:
        argv.append("--no-mdns")
    for t in trackers:
        argv += ["--tracker", t]
    for p in peers:
        argv += ["--peer", p]
    argv += extra
    env = child_env(root / "hf-home")
    out, log = root / "agent.out", root / "agent.log"
    with open(out, "wb") as o, open(log, "ab") as e:
        proc = lan.host(i).popen(argv, env=env, stdout=o, stderr=e)
    try:
        line = _first_line(out, proc, timeout, f"the agent on h{i}")
        info = json.loads(line)
        if not info.get("ready"):
            raise LanError(f"the agent on h{i} said {line!r}")
    except (LanError, ValueError) as exc:
        raise LanError(f"{exc}\n{_log_tail(log)}") from None
    return AgentProc(lan, i, root, proc, info, log, env)


_TRACKER_AGENTS = r"""
import sys, urllib.request
from tracker import messages
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1] + "/v1/health", timeout=20) as r:
    print(messages.decode(r.read()).agents)
"""


@dataclass
class TrackerProc:
    """``hfswarm tracker`` on one host of the LAN."""

    lan: Lan
    index: int
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def live_agents(self) -> int:
        """How many agents the tracker counts as live (its /v1/health)."""
        done = self.lan.host(self.index).run([self.lan.python, "-c", _TRACKER_AGENTS, self.url])
        return int(done.stdout.strip())


def start_tracker(
    lan: Lan, i: int, workdir: Path, *extra: str, port: int = 7860, timeout: float = 60
) -> TrackerProc:
    """``hfswarm tracker`` on host i (its URL: http://10.77.0.i:port)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out, log = workdir / f"tracker-h{i}.out", workdir / f"tracker-h{i}.log"
    with open(out, "wb") as o, open(log, "wb") as e:
        proc = lan.host(i).popen(
            [*HFSWARM, "tracker", "--listen", f"{lan.host_ip(i)}:{port}", *extra],
            env=child_env(workdir / "hf-home"),
            stdout=o,
            stderr=e,
        )
    try:
        url = _first_line(out, proc, timeout, f"the tracker on h{i}").strip()
    except LanError as exc:
        raise LanError(f"{exc}\n{_log_tail(log)}") from None
    return TrackerProc(lan, i, proc, url, log)


def repo_file_sizes(folder: Path) -> dict[str, int]:
    """Path in the repo -> size, as a mirror serving `folder` lists it (the generator's
    marker file is not served)."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".hfswarm")
    }


def unique_tag() -> str:
    """A short random tag, e.g. for a prefix a caller wants to choose per run."""
    return uuid.uuid4().hex[:6]


def snapshot_problems(cache: Path, repo_id: str, source: Path) -> list[str]:
    """What is wrong with the snapshot of `repo_id` in the HF cache `cache`, read back
    by huggingface_hub offline, compared file by file (sha256) with the folder the
    mirror serves; [] when it is complete and right."""
    import hashlib

    from huggingface_hub import snapshot_download

    def digest(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    try:
        snap = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception as exc:  # the message is the finding
        return [f"huggingface_hub cannot read {repo_id} offline from {cache}: {exc!r}"]
    want = repo_file_sizes(source)
    got = {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()}
    problems = [f"missing {p}" for p in sorted(set(want) - got)]
    problems += [f"unexpected {p}" for p in sorted(got - set(want))]
    for rel in sorted(set(want) & got):
        if digest(snap / rel) != digest(source / rel):
            problems.append(f"{rel}: content differs from the mirror's")
    return problems
