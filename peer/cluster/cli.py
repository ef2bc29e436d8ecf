"""`hfswarm cluster`: make a cluster CA, enroll members, revoke them.

    hfswarm cluster init DIR [--name LAB]
    hfswarm cluster enroll DIR --name NAME --out FILE [--share public|cluster] [--crl PATH]
    hfswarm cluster revoke DIR (--name NAME | --id AGENT_ID)

DIR holds the CA's private key: keep it on one admin machine, not on the members.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from peer.cluster.credentials import SHARE_MODES, ClusterDir
from peer.errors import HfswarmError


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("init", help="make a cluster CA in DIR (its key 0600)")
    p.add_argument("dir")
    p.add_argument("--name", default="lab", help="the cluster's name (in its certificate)")
    p = sub.add_parser("enroll", help="issue one machine's credentials file (0600)")
    p.add_argument("dir")
    p.add_argument("--name", required=True, help="the machine's name (letters, digits, -, _)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write its credentials")
    p.add_argument(
        "--share",
        choices=SHARE_MODES,
        default="public",
        help="public (default): only public blobs are shared; cluster: private and gated "
        "blobs too, between members",
    )
    p.add_argument(
        "--crl",
        metavar="PATH",
        help="where the member will find the revocation list (default: DIR/crl.pem)",
    )
    p = sub.add_parser("revoke", help="put a member on the CA-signed revocation list")
    p.add_argument("dir")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--name")
    who.add_argument("--id", dest="agent_id")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "hfswarm cluster") -> int:
    args = build_parser(prog).parse_args(argv)
    d = ClusterDir(Path(args.dir).expanduser())
    try:
        if args.action == "init":
            fp = d.init(args.name)
            print(f"cluster CA in {d.root} (certificate sha256 {fp}); keep {d.ca_key} private")
        elif args.action == "enroll":
            out = Path(args.out).expanduser()
            crl = Path(args.crl).expanduser() if args.crl else None
            agent_id = d.enroll(args.name, out, share=args.share, crl=crl)
            print(f"{args.name}: agent id {agent_id}, credentials in {out} (0600)")
        elif args.action == "revoke":
            ids = d.revoke(name=args.name, agent_id=args.agent_id)
            print(f"revoked {', '.join(ids)}; copy {d.crl} to every member (agents reload it)")
    except HfswarmError as exc:
        print(f"{prog}: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 5
    return 0
