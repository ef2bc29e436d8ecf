"""The `hfswarm` command line. Flags follow `hf download` where they overlap.

Exit codes: 0 ok, 1 a bug in hfswarm, 2 a user error (bad arguments, repo/revision/file
not found, gated, unsafe names), 3 network (mirror unreachable or failing past retries),
4 integrity (data kept failing verification), 5 local (disk full, permissions),
130 interrupted (run the same command again: it resumes).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from peer.config import DownloadOptions, HubSettings
from peer.errors import HfswarmError
from peer.hub.metadata import FileSelection
from peer.transfer.progress import human_bytes


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download a repo (or some files) into the HF cache",
                       description="Download a Hugging Face repo into the standard cache "
                       "(or --local-dir), verified and resumable. The last line printed is "
                       "the snapshot folder.")
    p.add_argument("repo_id", help="org/name")
    p.add_argument("files", nargs="*", help="only these files (paths in the repo)")
    p.add_argument("--repo-type", default="model", choices=["model", "dataset", "space"])
    p.add_argument("--revision", default="main", help="branch, tag, commit or refs/pr/N")
    p.add_argument("--include", action="append", default=[], metavar="GLOB")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    p.add_argument("--cache-dir", help="default: HF_HUB_CACHE, else HF_HOME/hub")
    p.add_argument("--local-dir", help="write plain files here instead of the cache")
    p.add_argument("--token", help="default: HF_TOKEN, else the saved token file")
    p.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="HF-style endpoint; repeat for failover, first preferred "
                   "(default: HF_ENDPOINT)")
    p.add_argument("--connections", type=int, default=16,
                   help="parallel Range connections per file (default 16: public mirrors "
                   "cap each connection)")
    p.add_argument("--max-workers", type=int, default=4, help="files at once (default 4)")
    p.add_argument("--quiet", action="store_true", help="print only the final path")


def _add_mirror(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("mirror", add_help=False,
                   help="run the project's local HF-compatible mirror (tests, demos)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfswarm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_download(sub)
    _add_mirror(sub)
    return parser


async def _run_download(args: argparse.Namespace) -> int:
    from peer.download import DownloadRequest, download

    settings = HubSettings.from_env(mirrors=args.mirror, token=args.token,
                                    cache_dir=args.cache_dir)
    options = DownloadOptions.from_env(connections=args.connections,
                                       max_files=args.max_workers, quiet=args.quiet)
    request = DownloadRequest(
        repo_id=args.repo_id, repo_type=args.repo_type, revision=args.revision,
        selection=FileSelection(tuple(args.files), tuple(args.include), tuple(args.exclude)),
        local_dir=args.local_dir)
    result = await download(settings, options, request)
    if not args.quiet:
        rate = result.bytes_from_mirror / result.seconds if result.seconds > 0 else 0
        print(f"{result.files} files, {human_bytes(result.bytes_total)} at commit "
              f"{result.commit[:12]} in {result.seconds:.1f} s: "
              f"{human_bytes(result.bytes_from_mirror)} from the mirror "
              f"({human_bytes(rate)}/s), {human_bytes(result.bytes_reused)} already local",
              file=sys.stderr)
    print(result.path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mirror"]:
        from peer.mirror_server.cli import main as mirror_main

        return mirror_main(argv[1:], prog="hfswarm mirror")
    args = build_parser().parse_args(argv)
    if getattr(args, "local_dir", None):
        args.local_dir = Path(args.local_dir).expanduser()
    try:
        if args.command == "download":
            return asyncio.run(_run_download(args))
    except HfswarmError as exc:
        print(f"hfswarm: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hfswarm: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("hfswarm: internal error (a bug in hfswarm); please report it with the "
              "traceback above", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
