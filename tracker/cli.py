"""``hfswarm tracker``: run the LAN tracker until SIGINT/SIGTERM.

    hfswarm tracker --listen 0.0.0.0:7860 --ttl 30

The first stdout line is the tracker's URL, printed once it accepts connections, so a
supervisor or a test can read it and go. Agents then use ``--tracker URL``; BitTorrent
clients use ``URL/announce``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tracker.errors import TrackerConfigError, TrackerError
from tracker.limits import ListenerLimits, RepeatFilter
from tracker.registry import Limits
from tracker.service import DEFAULT_PORT, TrackerServer
from tracker.signing import Membership

DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [v6]:PORT or :PORT (all interfaces)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TrackerConfigError(
            f"--listen {text!r} is not HOST:PORT", hint=f"e.g. {DEFAULT_LISTEN}"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run hfswarm's LAN tracker: agents register and announce their blobs "
        "here, and it is a BitTorrent HTTP tracker (URL/announce) for their swarms. For "
        "networks where multicast (mDNS) does not reach. Stops cleanly on SIGINT/SIGTERM.",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to serve on (default {DEFAULT_LISTEN}; port 0: any free port)",
    )
    p.add_argument(
        "--ttl",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="forget an agent this long after its last heartbeat (default 30; agents "
        "heartbeat every ttl/3)",
    )
    p.add_argument(
        "--announce-interval",
        type=int,
        default=300,
        metavar="SECONDS",
        help="re-announce interval given to BitTorrent clients (default 300: libtorrent "
        "never re-announces sooner unless its min_announce_interval is lowered)",
    )
    p.add_argument("--max-agents", type=int, default=10_000, help="default 10000")
    p.add_argument(
        "--max-connections",
        type=int,
        default=ListenerLimits.max_connections,
        help=f"open connections in total (default {ListenerLimits.max_connections}; cut to "
        "what the file descriptor limit allows)",
    )
    p.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=ListenerLimits.max_connections_per_ip,
        help=f"open connections per source address (default "
        f"{ListenerLimits.max_connections_per_ip})",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=ListenerLimits.header_timeout,
        metavar="SECONDS",
        help=f"a request's headers, and then its body, must arrive within this time "
        f"(default {ListenerLimits.header_timeout:g}); idle connections close after it too",
    )
    p.add_argument(
        "--cluster",
        metavar="CA_CERT",
        help="cluster mode: accept registrations and announces only when signed by a "
        "member of the cluster whose CA certificate this is (DIR/ca.pem of `hfswarm "
        "cluster init`)",
    )
    p.add_argument(
        "--crl",
        metavar="PATH",
        help="with --cluster: the cluster's revocation list (re-read when it changes)",
    )
    p.add_argument("--verbose", "-v", action="store_true")
    return p


async def _serve(host: str, port: int, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with TrackerServer(
        host,
        port,
        ttl=args.ttl,
        announce_interval=args.announce_interval,
        limits=Limits(max_agents=args.max_agents),
        listener=args.listener,
        membership=args.membership,
    ) as server:
        print(server.url, flush=True)
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "hfswarm tracker") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.listener = ListenerLimits(
            max_connections=args.max_connections,
            max_connections_per_ip=args.max_connections_per_ip,
            header_timeout=args.request_timeout,
            body_timeout=args.request_timeout,
        )
    except ValueError as e:
        print(f"{prog}: error: {e} (check --max-connections*, --request-timeout)", file=sys.stderr)
        return TrackerConfigError.exit_code
    args.membership = None
    if args.cluster:
        try:
            args.membership = Membership.load(
                Path(args.cluster), Path(args.crl) if args.crl else None
            )
        except (OSError, ValueError) as e:
            print(
                f"{prog}: error: cannot read the cluster CA certificate {args.cluster}: {e} "
                "(pass DIR/ca.pem of `hfswarm cluster init`)",
                file=sys.stderr,
            )
            return TrackerConfigError.exit_code
    # One line per kind of trouble per interval: a flood of refused or broken
    # connections must not turn into a flood of tracebacks on stderr.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatFilter(args.listener.log_interval, time.monotonic))
    try:
        host, port = parse_listen(args.listen)
        if not 0 < args.ttl <= 86_400:
            raise TrackerConfigError(f"--ttl {args.ttl} is outside (0, 86400] seconds")
        if not 1 <= args.announce_interval <= 86_400:
            raise TrackerConfigError("--announce-interval must be 1..86400 seconds")
        if args.max_agents < 1:
            raise TrackerConfigError("--max-agents must be at least 1")
        return asyncio.run(_serve(host, port, args))
    except TrackerError as e:
        print(f"{prog}: error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C before the handlers were installed
        return 130
