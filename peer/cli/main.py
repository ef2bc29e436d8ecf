"""The `hfswarm` command line. Flags follow `hf download` where they overlap.

Exit codes: 0 ok, 1 a bug in hfswarm, 2 a user error (bad arguments, repo/revision/file
not found, gated, unsafe names), 3 network (mirror unreachable or failing past retries),
4 integrity (data kept failing verification), 5 local (disk full, permissions),
130 interrupted (run the same command again: it resumes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peer.agent.client import AgentClient
    from peer.settings import Effective

from peer.agent.requests import Done, DownloadRequest, Event, Setup
from peer.config import (
    DEFAULT_AGENT_URL,
    AgentConfig,
    DownloadOptions,
    HubSettings,
    default_state_dir,
    parse_hostport,
)
from peer.errors import ConfigError, HfswarmError
from peer.hub.metadata import FileSelection
from peer.hub.protocol import REPO_TYPES
from peer.transfer.progress import ProgressDisplay, human_bytes


def _add_token(p: argparse.ArgumentParser, default: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"read the Hugging Face token from this file; {default}",
    )
    group.add_argument(
        "--token", help="the token itself (every user sees it in `ps`: prefer --token-file)"
    )


def _warn_token_in_ps() -> None:
    print(
        "hfswarm: warning: --token is visible to every user of this machine in `ps`; "
        "use --token-file PATH or the HF_TOKEN environment variable instead",
        file=sys.stderr,
    )


def _explicit_token(args: argparse.Namespace) -> str | None:
    """--token-file or --token; None leaves HF_TOKEN and the token file to HubSettings."""
    if args.token_file:
        from peer.settings import read_token_file

        return read_token_file(Path(args.token_file).expanduser())
    if args.token:
        _warn_token_in_ps()
    return args.token or None


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="download a repo (or some files) into the HF cache",
        description="Download a Hugging Face repo into the standard cache "
        "(or --local-dir), verified and resumable. The last line printed is "
        "the snapshot folder.",
    )
    p.add_argument("repo_id", help="org/name")
    p.add_argument("files", nargs="*", help="only these files (paths in the repo)")
    p.add_argument("--repo-type", default="model", choices=REPO_TYPES)
    p.add_argument("--revision", default="main", help="branch, tag, commit or refs/pr/N")
    p.add_argument("--include", action="append", default=[], metavar="GLOB")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    p.add_argument("--cache-dir", help="default: HF_HUB_CACHE, else HF_HOME/hub")
    p.add_argument("--local-dir", help="write plain files here instead of the cache")
    _add_token(p, "default: HF_TOKEN, else the token file `hf auth login` saved")
    p.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="URL",
        help="HF-style endpoint; repeat for failover, first preferred (default: HF_ENDPOINT)",
    )
    # No argparse default: a value given is this download's own bound, which an agent
    # honours (up to its own) or refuses, never ignores.
    p.add_argument(
        "--connections",
        type=int,
        help="parallel Range connections per file "
        f"(default {DownloadOptions.connections}: public mirrors cap each connection; "
        "an agent's own, which a download may lower)",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        help=f"files at once (default {DownloadOptions.max_files}; an agent's own, which a "
        "download may lower)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the final path")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--agent",
        metavar="URL",
        help="the local agent to ask (default: HFSWARM_AGENT, else "
        f"{DEFAULT_AGENT_URL}); with none running, the download runs in this "
        "process. An agent uses its own mirrors and cache: --mirror or --cache-dir "
        "other than its own are refused",
    )
    where.add_argument(
        "--no-agent",
        action="store_true",
        help="download in this process from the mirror, even if an agent runs",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="with no agent running: peers to ask (their --listen address)",
    )


def _add_agent(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "agent",
        help="run the agent: seed the cache, fetch for the CLI",
        description="Seed every verified blob of the HF cache to LAN peers "
        "and fetch what the CLI asks for: peers first, the mirror for the "
        "rest. Stops cleanly on SIGINT/SIGTERM.",
        epilog=_SETTINGS_EPILOG,
    )
    _add_settings(p)


# Shown under `hfswarm agent --help` and `hfswarm config --help`.
_SETTINGS_EPILOG = (
    "Every setting is also a key of the config file (the flag in snake_case: "
    "--max-upload-rate is max_upload_rate) and an HFSWARM_* environment variable "
    "(HFSWARM_MAX_UPLOAD_RATE; lists comma-separated). Flags win over the environment, "
    "which wins over the file, which wins over the defaults; `hfswarm config` shows "
    "the result and where each value came from."
)


def _add_settings(p: argparse.ArgumentParser) -> None:
    """The agent's settings as flags (generated from `peer.settings.SETTINGS`), the
    config file, and the flags outside the table."""
    from peer.settings import add_flags

    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file (default: HFSWARM_CONFIG, else the first that exists of "
        "$XDG_CONFIG_HOME/hfswarm/agent.toml (~/.config) and /etc/hfswarm/agent.toml)",
    )
    add_flags(p)
    # Not a setting: a token in a file or the environment belongs in token_file / HF_TOKEN.
    p.add_argument(
        "--token", help="the token itself (every user sees it in `ps`: prefer --token-file)"
    )
    p.add_argument(
        "--verbose",
        "-v",
        dest="log_level",
        action="store_const",
        const="info",
        default=argparse.SUPPRESS,
        help="log at info level (--log-level info)",
    )


def _rate_arg(text: str) -> int:
    """The settings table's rate parser (`peer.settings.parse_rate`), for argparse."""
    from peer.settings import BadValue, parse_rate

    try:
        return parse_rate(text)
    except BadValue as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        raise argparse.ArgumentTypeError(exc.problem + hint) from None


def _add_agent_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--agent",
        metavar="URL",
        help=f"the local agent (default: HFSWARM_AGENT, else {DEFAULT_AGENT_URL})",
    )


def _add_cache_commands(sub: argparse._SubParsersAction) -> None:
    for name, text in (
        ("pin", "keep a repo (or one revision of it) in the agent's cache: never evicted"),
        ("unpin", "let the agent's quota evict a repo again"),
    ):
        p = sub.add_parser(name, help=text, description=text + " (the agent's own user only)")
        p.add_argument("repo", metavar="REPO[@REV]", help="org/name, or org/name@revision")
        p.add_argument("--repo-type", default="model", choices=REPO_TYPES)
        _add_agent_arg(p)
    p = sub.add_parser("pins", help="list the repos pinned in the agent's cache")
    _add_agent_arg(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser(
        "prefetch",
        help="warm a repo on this machine through the agent (peers first), in the background",
        description="Ask the agent to download a repo into its cache (peers first, the "
        "mirror for the rest) and return once it has started; the agent finishes it alone. "
        "A download that cannot fit the cache's quota is refused at once.",
    )
    p.add_argument("repo_id", help="org/name")
    p.add_argument("--repo-type", default="model", choices=REPO_TYPES)
    p.add_argument("--revision", default="main", help="branch, tag, commit or refs/pr/N")
    p.add_argument("--include", action="append", default=[], metavar="GLOB")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    p.add_argument("--wait", action="store_true", help="follow it to the end, with progress")
    _add_token(p, "default: HF_TOKEN, else the token file `hf auth login` saved")
    _add_agent_arg(p)
    p = sub.add_parser(
        "limits",
        help="show or change the agent's rate caps while it runs",
        description="Rates like 50MB/s, 1.5MiB/s, or 0 for none. With no option, print "
        "the current caps. A change lasts until the agent stops (its flags set the start).",
    )
    p.add_argument("--upload", type=_rate_arg, metavar="RATE", help="what LAN peers take")
    p.add_argument("--download", type=_rate_arg, metavar="RATE", help="what we take from peers")
    p.add_argument("--mirror", type=_rate_arg, metavar="RATE", help="what we take from mirrors")
    _add_agent_arg(p)
    p.add_argument("--json", action="store_true")


def _add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish",
        help="share a folder on the LAN as repo local/NAME (through the local agent)",
        description="Share a folder (a training checkpoint, say) with the agents of the LAN "
        "as repo local/NAME: the local agent copies it into its HF cache, hashing each file "
        "as the Hub would, seeds it, and moves the repo's main to a commit derived from the "
        "files. Others get it with `hfswarm download local/NAME`, or with any HF tool "
        "through HF_ENDPOINT mode. The last line printed is the commit.",
    )
    p.add_argument("path", help="the folder to share")
    p.add_argument("--repo", required=True, metavar="local/NAME", help="the repo to publish as")
    p.add_argument("--repo-type", default="model", choices=REPO_TYPES)
    p.add_argument(
        "--agent",
        metavar="URL",
        help=f"the local agent (default: HFSWARM_AGENT, else {DEFAULT_AGENT_URL})",
    )
    p.add_argument("--quiet", action="store_true", help="print only the commit")


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="the local agent: transfers in flight, peers, seeded repos, counters",
        description="The local agent's transfers in flight (with rates), peers, seeded repos "
        "and counters, as tables; --json prints /v1/status as it is. The same figures are "
        "on the agent's status page (its local URL in a browser) and at /metrics.",
    )
    p.add_argument("--agent", metavar="URL")
    p.add_argument("--json", action="store_true", help="the machine form (/v1/status)")


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the agent's effective configuration and where each value came from",
        description="The configuration `hfswarm agent` would run with (given the same "
        "flags, environment and config file), one line per setting with its source: "
        "default, env:VARIABLE, file:PATH:LINE or flag.",
        epilog=_SETTINGS_EPILOG,
    )
    _add_settings(p)
    p.add_argument("--json", action="store_true")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="a local mirror, three agents, a model moving between them (no internet needed)",
    )
    p.add_argument("--size-mb", type=int, default=300, help="model size (default 300 MB)")
    p.add_argument("--dir", help="work folder (default: a temp dir, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")


def _add_mirror(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "mirror", add_help=False, help="run the project's local HF-compatible mirror (tests, demos)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfswarm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_download(sub)
    _add_agent(sub)
    _add_publish(sub)
    _add_status(sub)
    _add_cache_commands(sub)
    _add_config(sub)
    _add_demo(sub)
    _add_mirror(sub)
    sub.add_parser(
        "tracker", add_help=False, help="run the LAN tracker for networks mDNS does not reach"
    )
    sub.add_parser(
        "cluster", add_help=False, help="cluster mode: make a CA, enroll and revoke members"
    )
    return parser


def _agent_url(args: argparse.Namespace) -> tuple[str, bool]:
    """The agent to ask, and whether the user named one (then it must answer)."""
    if args.agent:
        return args.agent, True
    env = os.environ.get("HFSWARM_AGENT")
    return (env, True) if env else (DEFAULT_AGENT_URL, False)


async def _run_download(args: argparse.Namespace) -> int:
    from peer.agent.client import AgentClient, AgentUnavailable

    settings = HubSettings.from_env(
        mirrors=args.mirror, token=_explicit_token(args), cache_dir=args.cache_dir
    )
    bounds = {"connections": args.connections, "max_files": args.max_workers}
    options = DownloadOptions.from_env(
        quiet=args.quiet, **{k: v for k, v in bounds.items() if v is not None}
    )
    url, named = _agent_url(args)
    # Always the user's own token (none: anonymous): the agent lends its own only to its
    # own user, and then only when the request carries none.
    request = DownloadRequest(
        repo_id=args.repo_id,
        repo_type=args.repo_type,
        revision=args.revision,
        selection=FileSelection(tuple(args.files), tuple(args.include), tuple(args.exclude)),
        token=settings.token,
        local_dir=Path(args.local_dir) if args.local_dir else None,
        **bounds,
    )
    client = AgentClient(url)
    try:
        if not args.peer and not args.no_agent:
            # No status round trip unless a flag needs the agent's setup checked: the
            # job's own connect tells whether an agent answers.
            if _asks_for_setup(args, request):
                await _agent_honours(args, settings, request, await client.status(), url)
            return await _via_agent(client, request, args.quiet)
    except AgentUnavailable:
        if named:
            raise
    if args.peer:
        return await _embedded(args, settings, options, request)
    if args.repo_id.startswith("local/"):  # published on the LAN: no mirror has it
        raise AgentUnavailable(
            f"{args.repo_id} lives on the LAN only, and no hfswarm agent answers at {url}",
            hint="start one with `hfswarm agent`, or pass --peer HOST:PORT of an agent that has it",
        )
    # Imported only here: it brings the whole download machinery (libtorrent too), which
    # a download through the agent does not need (about 0.3-0.5 s of the CLI's start-up).
    from peer.download import download

    display = ProgressDisplay(quiet=args.quiet)
    try:
        final = await download(settings, options, request, display)
    finally:
        display.close()
    _print_summary(final, args.quiet)  # the mirror-only path wrote --local-dir itself
    return 0


def _asks_for_setup(args: argparse.Namespace, request: DownloadRequest) -> bool:
    """Flags an agent may not honour (its own mirrors, cache and bounds)."""
    return bool(args.mirror or args.cache_dir or any(request.bounds().values()))


async def _agent_honours(
    args: argparse.Namespace,
    settings: HubSettings,
    request: DownloadRequest,
    status: dict[str, Any],
    url: str,
) -> None:
    """An agent downloads from its own mirrors into its own cache, with at most its own
    connections and files at once: flags asking for others are refused (exit 2), not
    ignored."""
    setup = Setup.from_status(status)
    if setup is None:  # an older agent does not say: it cannot honour them either
        asked = (("--mirror", args.mirror), ("--cache-dir", args.cache_dir))
        wrong = [flag for flag, given in asked if given]
        wrong += Setup((), Path()).exceeded(request)  # it takes no bounds at all
        uses = "its own mirrors and cache"
    else:
        wrong = setup.differs(settings, mirrors=bool(args.mirror), cache_dir=bool(args.cache_dir))
        wrong += setup.exceeded(request)
        uses = f"mirrors {', '.join(setup.mirrors) or '(none)'} and cache {setup.cache_dir}"
        if setup.connections is not None and setup.max_files is not None:
            uses += (
                f", at most {setup.connections} connections per file and "
                f"{setup.max_files} files at once"
            )
    if wrong:
        raise ConfigError(
            f"the agent at {url} downloads with {uses}: it cannot honour {' and '.join(wrong)}",
            hint="drop them (or ask for less) to use the agent's, or pass --no-agent to "
            "download in this process from the mirror (without the agent's peers)",
        )


async def _via_agent(client: AgentClient, request: DownloadRequest, quiet: bool) -> int:
    display = ProgressDisplay(quiet=quiet)
    try:
        final = await client.download(request, display)
    finally:
        display.close()
    final = await _fill_local_dir(final, request.local_dir)
    _print_summary(final, quiet)
    return 0


async def _fill_local_dir(final: Done, local_dir: Path | None) -> Done:
    """The agent never writes a caller's folder: this process copies its snapshot into
    `local_dir` (as the user who asked, with their rights). The result names where the
    files are."""
    from peer.agent.client import fill_local_dir

    if local_dir is None:
        return final
    await asyncio.to_thread(fill_local_dir, local_dir, final)
    return replace(final, path=local_dir)


def _print_summary(final: Done, quiet: bool) -> None:
    """Summary on stderr, then the path on stdout: the snapshot, or the local dir."""
    c = final.counters
    if not quiet:
        print(
            f"{final.files} files, {human_bytes(final.total)} at commit "
            f"{final.commit[:12]} in {final.seconds:.1f} s: "
            f"{human_bytes(c.from_peers)} from peers, "
            f"{human_bytes(c.from_mirror)} from the mirror, "
            f"{human_bytes(c.reused)} already local, "
            f"{c.hash_failures} pieces failed verification",
            file=sys.stderr,
        )
    print(final.path)


async def _embedded(
    args: argparse.Namespace,
    settings: HubSettings,
    options: DownloadOptions,
    request: DownloadRequest,
) -> int:
    """No agent running, but peers named: run an agent in this process for the download
    (it seeds to those peers while it lives)."""
    from peer.agent.daemon import Agent

    config = AgentConfig(
        hub=settings,
        state_dir=default_state_dir(settings.cache_dir),
        listen=("127.0.0.1", 0),
        local_listen=("127.0.0.1", 0),
        bt_listen=("0.0.0.0", 0),
        peers=tuple(parse_hostport(p, what="--peer") for p in args.peer),
        mdns=False,
        download=options,
    )
    stop = asyncio.Event()
    async with Agent(config) as agent:
        serve = asyncio.create_task(agent.serve(stop))
        await agent.peers.check_all()
        display = ProgressDisplay(quiet=args.quiet)

        async def emit(event: Event) -> None:
            display(event)

        try:
            # This process is the agent's user; the CLI fills --local-dir below.
            final = await agent.local.run_download(
                replace(request, agent_token=True, local_dir=None), emit
            )
        finally:
            display.close()
            stop.set()
            await serve
    final = await _fill_local_dir(final, request.local_dir)
    _print_summary(final, args.quiet)
    return 0


async def _run_publish(args: argparse.Namespace) -> int:
    from peer.agent.client import AgentClient
    from peer.agent.requests import PublishRequest

    url, _ = _agent_url(args)
    client = AgentClient(url)
    await client.status()  # raises AgentUnavailable at once if nobody is there
    spec = PublishRequest(path=args.path, repo_id=args.repo, repo_type=args.repo_type)
    display = ProgressDisplay(quiet=args.quiet)
    try:
        final = await client.publish(spec, display)
    finally:
        display.close()
    if not args.quiet:
        what = "published" if final["changed"] else "unchanged, main already holds these files"
        print(
            f"{final['repo_id']}: {final['files']} files, {human_bytes(final['total'])} at "
            f"commit {final['commit'][:12]} ({what}) in {final['seconds']:.1f} s; get it "
            f"elsewhere with `hfswarm download {final['repo_id']}`",
            file=sys.stderr,
        )
    print(final["commit"])
    return 0


async def _run_status(args: argparse.Namespace) -> int:
    from peer.agent.client import AgentClient

    url, _ = _agent_url(args)
    status = await AgentClient(url).status()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    from peer.cli.status_table import render_status

    print(render_status(status))
    return 0


async def _run_pins(args: argparse.Namespace) -> int:
    """pin, unpin, pins."""
    from peer.agent.client import AgentClient
    from peer.agent.quota import PinSpec

    url, _ = _agent_url(args)
    client = AgentClient(url)
    if args.command == "pins":
        pins = (await client.call("GET", "/v1/pins"))["pins"]
        if args.json:
            print(json.dumps(pins, indent=2))
            return 0
        for p in pins:
            print(PinSpec.from_json(p))
        return 0
    spec = PinSpec.parse(args.repo, args.repo_type)
    method = "POST" if args.command == "pin" else "DELETE"
    answer = await client.call(method, "/v1/pins", spec.to_json())
    verb = "pinned" if args.command == "pin" else "unpinned"
    print(f"{answer['pin']}: {verb}" if answer["changed"] else f"{answer['pin']}: already {verb}")
    return 0


async def _run_prefetch(args: argparse.Namespace) -> int:
    from peer.agent.client import AgentClient

    url, _ = _agent_url(args)
    request = DownloadRequest(
        repo_id=args.repo_id,
        repo_type=args.repo_type,
        revision=args.revision,
        selection=FileSelection((), tuple(args.include), tuple(args.exclude)),
        token=HubSettings.from_env(token=_explicit_token(args)).token,
    )
    client = AgentClient(url)
    if args.wait:
        return await _via_agent(client, request, quiet=False)
    started = await client.call("POST", "/v1/prefetch", request.to_json())
    print(
        f"{args.repo_id}: {started.get('files', 0)} files, "
        f"{human_bytes(started.get('total', 0))} at commit {str(started.get('commit'))[:12]}: "
        "the agent is fetching it (`hfswarm status` shows it)",
        file=sys.stderr,
    )
    return 0


async def _run_limits(args: argparse.Namespace) -> int:
    from peer.agent.client import AgentClient

    url, _ = _agent_url(args)
    client = AgentClient(url)
    change = {
        k: v
        for k, v in (("upload", args.upload), ("download", args.download), ("mirror", args.mirror))
        if v is not None
    }
    rates = await (
        client.call("POST", "/v1/limits", change) if change else client.call("GET", "/v1/limits")
    )
    if args.json:
        print(json.dumps(rates))
        return 0
    for key in ("upload", "download", "mirror"):
        value = rates[key]
        print(f"{key:9s} {human_bytes(value) + '/s' if value else 'no cap'}")
    return 0


def agent_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Effective:
    """Every agent setting from the flags given, the environment and the config file."""
    from peer.settings import effective, given_flags, unknown_variables

    env = os.environ if env is None else env
    for name in unknown_variables(env):
        print(f"hfswarm: warning: ignoring {name}: no such setting", file=sys.stderr)
    return effective(given_flags(args), env, getattr(args, "config", None))


def agent_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> AgentConfig:
    """The `hfswarm agent` flags, HFSWARM_* variables and config file as an `AgentConfig`
    (the settings' defaults are its own)."""
    from peer.settings import agent_config as from_settings

    env = os.environ if env is None else env
    token = getattr(args, "token", None)
    if token and "token_file" in vars(args):
        raise ConfigError(
            "--token and --token-file both given", hint="pass one (prefer --token-file)"
        )
    if token:
        _warn_token_in_ps()
    return from_settings(agent_settings(args, env), env, token=token or None)


def _run_config(args: argparse.Namespace) -> int:
    eff = agent_settings(args)
    if args.json:
        print(json.dumps(eff.as_json(), indent=2))
    else:
        print(eff.table())
    return 0


async def _run_agent(args: argparse.Namespace) -> int:
    from peer.agent.daemon import Agent
    from peer.logs import install_repeat_filter
    from peer.serving.limits import raise_nofile_limit

    eff = agent_settings(args)  # first: a bad setting stops the agent before anything
    logging.basicConfig(
        level=getattr(logging, eff["log_level"].upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # A flood of bad clients must not fill the disk with identical lines, and the fd
    # limit is as high as we may make it (the listeners' caps derive from it).
    install_repeat_filter(logging.getLogger())
    raise_nofile_limit()
    config = agent_config(args)
    if eff.file:
        logging.getLogger("peer.settings").info("config file %s", eff.file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Agent(config) as agent:
        # One line a supervisor (or a test) can wait for: where everything listens.
        print(
            json.dumps(
                {
                    "ready": True,
                    "agent_id": agent.agent_id,
                    "peer_port": agent.peer_port,
                    "local_port": agent.local_port,
                    "bt_port": agent.swarm.listen_port,
                    "member_port": agent.member_port,
                }
            ),
            flush=True,
        )
        # What start-up made (modules, classes, tables) lives as long as the agent: kept
        # out of the collector's full passes, which walked it again during every long
        # download (30-70 ms a pass; docs/benchmarks.md 8.33).
        gc.freeze()
        logging.getLogger("peer.agent").debug("%d start-up objects frozen", gc.get_freeze_count())
        await agent.serve(stop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tracker"]:
        from tracker.cli import main as tracker_main

        return tracker_main(argv[1:], prog="hfswarm tracker")
    if argv[:1] == ["cluster"]:
        from peer.cluster.cli import main as cluster_main

        return cluster_main(argv[1:], prog="hfswarm cluster")
    if argv[:1] == ["mirror"]:
        from peer.mirror_server.cli import main as mirror_main

        return mirror_main(argv[1:], prog="hfswarm mirror")
    args = build_parser().parse_args(argv)
    for name in ("local_dir", "state_dir"):
        if getattr(args, name, None):
            setattr(args, name, Path(getattr(args, name)).expanduser())
    if args.command == "publish":
        args.path = Path(args.path).expanduser().resolve()  # the agent reads it
    try:
        if args.command == "download":
            return asyncio.run(_run_download(args))
        if args.command == "agent":
            return asyncio.run(_run_agent(args))
        if args.command == "status":
            return asyncio.run(_run_status(args))
        if args.command == "config":
            return _run_config(args)
        if args.command == "publish":
            return asyncio.run(_run_publish(args))
        if args.command in ("pin", "unpin", "pins"):
            return asyncio.run(_run_pins(args))
        if args.command == "prefetch":
            return asyncio.run(_run_prefetch(args))
        if args.command == "limits":
            return asyncio.run(_run_limits(args))
        if args.command == "demo":
            from peer.cli.demo import main as demo_main

            return demo_main(args.dir, args.size_mb, args.keep)
    except HfswarmError as exc:
        print(f"hfswarm: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hfswarm: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            "hfswarm: internal error (a bug in hfswarm); please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
