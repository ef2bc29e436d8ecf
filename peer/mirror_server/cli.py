"""Command line of the mirror: ``serve`` folders as repos, ``generate`` a synthetic model.

    python -m peer.mirror_server serve --listen 127.0.0.1:8080 model:org/x=DIR
    python -m peer.mirror_server generate DIR --size 300M --shards 3

`main` takes argv so the project CLI can mount it as ``hfswarm mirror ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peer.errors import ConfigError, HfswarmError
from peer.mirror_server.generate import generate_model_repo
from peer.mirror_server.repo import RepoSource, RepoType, parse_repo_type
from peer.mirror_server.server import MirrorServer, RedirectMode

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_SPEC = re.compile(r"(?P<type>[a-z]+):(?P<id>[^@=]+)(?:@(?P<rev>[^=]+))?=(?P<folder>.+)")


def parse_size(text: str) -> int:
    """``300M``/``300MiB`` are binary (MiB), ``300MB`` decimal, a bare number is bytes."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"bad size {text!r}", hint="use e.g. 1048576, 300M, 1.5G or 10MB")
    number, unit, suffix = m.groups()
    power = " kmgt".index(unit.lower()) if unit else 0
    base = 1000 if suffix.lower() == "b" and unit else 1024
    return int(float(number) * base**power)


@dataclass
class _RepoSpec:
    repo_type: RepoType
    repo_id: str
    folder: Path | None = None
    revisions: dict[str, Path] = field(default_factory=dict)


def parse_specs(
    specs: Sequence[str], private: Sequence[str] = (), gated: Sequence[str] = ()
) -> list[RepoSource]:
    """``TYPE:ORG/NAME=FOLDER``; ``TYPE:ORG/NAME@REV=FOLDER`` adds revision REV (a branch,
    tag or ``refs/pr/N``) to the same repo. --private/--gated take ORG/NAME or TYPE:ORG/NAME."""
    repos: dict[tuple[RepoType, str], _RepoSpec] = {}
    for spec in specs:
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise ConfigError(
                f"bad repo spec {spec!r}",
                hint="use TYPE:ORG/NAME=FOLDER (TYPE: model, dataset or space)",
            )
        repo_type = parse_repo_type(m["type"])
        entry = repos.setdefault((repo_type, m["id"]), _RepoSpec(repo_type, m["id"]))
        folder = Path(m["folder"]).expanduser()
        rev = m["rev"]
        if rev is None or rev == "main":
            if entry.folder is not None:
                raise ConfigError(f"{spec}: {repo_type}:{m['id']} already has a main folder")
            entry.folder = folder
        else:
            entry.revisions[rev] = folder
    flags = {"private": set(private), "gated": set(gated)}
    for name, wanted in flags.items():
        known = {r.repo_id for r in repos.values()} | {f"{t}:{i}" for t, i in repos}
        if unknown := wanted - known:
            raise ConfigError(
                f"--{name} names repos that no spec serves: {', '.join(sorted(unknown))}"
            )
    out: list[RepoSource] = []
    for (repo_type, repo_id), entry in repos.items():
        if entry.folder is None:
            raise ConfigError(f"{repo_type}:{repo_id} has revisions but no main folder")
        keys = {repo_id, f"{repo_type}:{repo_id}"}
        out.append(
            RepoSource(
                repo_type,
                repo_id,
                entry.folder,
                private=bool(keys & flags["private"]),
                gated=bool(keys & flags["gated"]),
                revisions=entry.revisions,
            )
        )
    return out


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"bad --listen {text!r}", hint="use HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m peer.mirror_server",
        description="hfswarm's Hugging Face-compatible mirror server",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve folders as Hub repos (HF_ENDPOINT)")
    serve.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (port 0: any)")
    serve.add_argument(
        "--cdn-port", type=int, default=0, help="port of the CDN origin (default: any free)"
    )
    serve.add_argument(
        "--redirect",
        choices=["none", "same-origin", "cross-origin"],
        default="none",
        help="how LFS files are served: directly, or by a redirect to a signed CDN URL",
    )
    serve.add_argument(
        "--rate-cap",
        type=parse_size,
        default=None,
        metavar="BYTES",
        help="per-connection body rate in bytes/s, e.g. 10M",
    )
    serve.add_argument(
        "--client-rate",
        type=parse_size,
        default=None,
        metavar="BYTES",
        help="per-client body rate in bytes/s, shared by all connections from one IP, e.g. 10M",
    )
    serve.add_argument("--page-size", type=int, default=50, help="tree entries per page")
    serve.add_argument("--token", action="append", default=[], help="a valid token (repeatable)")
    serve.add_argument(
        "--gated-token",
        action="append",
        default=[],
        help="a token granted access to gated repos (repeatable)",
    )
    serve.add_argument("--private", action="append", default=[], metavar="ORG/NAME")
    serve.add_argument("--gated", action="append", default=[], metavar="ORG/NAME")
    serve.add_argument(
        "specs", nargs="+", metavar="SPEC", help="TYPE:ORG/NAME=FOLDER or TYPE:ORG/NAME@REV=FOLDER"
    )

    gen = sub.add_parser("generate", help="write a synthetic model repo with safetensors shards")
    gen.add_argument("folder", type=Path)
    gen.add_argument("--size", type=parse_size, required=True, help="tensor bytes, e.g. 300M")
    gen.add_argument("--shards", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    host, port = _parse_listen(args.listen)
    repos = parse_specs(args.specs, args.private, args.gated)
    redirect: RedirectMode = args.redirect
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with MirrorServer(
        repos,
        host,
        port,
        tokens=args.token,
        gated_tokens=args.gated_token,
        page_size=args.page_size,
        redirect=redirect,
        rate_cap=args.rate_cap,
        client_rate=args.client_rate,
        cdn_port=args.cdn_port,
    ) as m:
        # First stdout line is the endpoint, so a parent process can read it and go.
        print(m.url, flush=True)
        print(f"cdn origin: {m.cdn_url}", file=sys.stderr)
        for r in m.repos_json():
            for rev, commit in r["revisions"].items():
                print(f"{r['repo_type']}:{r['repo_id']}@{rev} = {commit}", file=sys.stderr)
        sys.stderr.flush()
        await stop.wait()
    return 0


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
        folder = generate_model_repo(
            args.folder, total_size=args.size, shards=args.shards, seed=args.seed
        )
        print(folder)
        return 0
    except HfswarmError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
