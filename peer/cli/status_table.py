"""`hfswarm status` for a person: the local agent's `/v1/status` as tables (PURE: the
status JSON in, text out; `--json` prints the JSON itself)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peer.transfer.progress import human_bytes


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; the columns in `right` aligned right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  " + "  ".join(parts).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "-"


def _member_stream_line(s: dict[str, Any]) -> list[str]:
    """Cluster mode: the part of the uploads the member blob stream sent."""
    if s.get("mode") != "cluster" or "bytes_uploaded_member_stream" not in s:
        return []
    sent = int(s["bytes_uploaded_member_stream"])
    return [f"  of the uploads, over the member stream  {human_bytes(sent)}"]


def render_status(s: dict[str, Any]) -> str:
    listen = s.get("listen", {})
    peers_from, mirror_from = int(s["bytes_from_peers"]), int(s["bytes_from_mirror"])
    out = [
        f"agent {s['agent_id']}, {s.get('mode', 'open')} mode  "
        f"(local API :{listen.get('local_api')}, "
        f"peer API :{listen.get('peer_api')}, BitTorrent :{listen.get('bittorrent')})",
        "",
        f"  from peers       {human_bytes(peers_from):>10}    "
        f"saved from the mirror  {human_bytes(peers_from):>10} "
        f"({_percent(peers_from, peers_from + mirror_from)} of what came in)",
        f"  from the mirror  {human_bytes(mirror_from):>10}    "
        f"uploaded to peers      {human_bytes(int(s['bytes_uploaded'])):>10}",
        f"  served to HF_ENDPOINT clients  {human_bytes(int(s.get('bytes_served_clients', 0)))}",
        *_member_stream_line(s),
        f"  downloads {s['downloads']} ({s.get('active_downloads', 0)} running)   "
        f"hash failures {s['hash_failures']}   peers banned {s.get('bans', 0)}",
    ]
    if "cache_bytes" in s:  # the disk and the caps (older agents do not say)
        quota = int(s.get("cache_max_size", 0))
        rates = s.get("limits", {})

        def cap(key: str) -> str:
            value = int(rates.get(key, 0))
            return f"{human_bytes(value)}/s" if value else "no cap"

        out += [
            f"  cache {human_bytes(int(s['cache_bytes']))} of "
            f"{human_bytes(quota) + ' quota' if quota else 'no quota'}   "
            f"seeding {s.get('seeding', 'always')}",
            f"  caps: upload {cap('upload')}   download {cap('download')}   mirror {cap('mirror')}",
        ]
    transfers = s.get("transfers", [])
    out += ["", f"TRANSFERS ({len(transfers)})"]
    if transfers:
        out += table(
            ("REPO", "FILE", "DONE", "SIZE", "%", "RATE", "SOURCE"),
            [
                (
                    t["repo"],
                    t["file"],
                    human_bytes(t["done"]),
                    human_bytes(t["size"]),
                    _percent(t["done"], t["size"]),
                    f"{human_bytes(t['rate'])}/s",
                    t["source"],
                )
                for t in transfers
            ],
            right={2, 3, 4, 5},
        )
    peers = s.get("peers", [])
    out += ["", f"PEERS ({len(peers)})"]
    if peers:
        out += table(
            ("AGENT", "ADDRESS", "BITTORRENT"),
            [
                (p["agent_id"][:12], f"{p['host']}:{p['api_port']}", str(p["bt_port"]))
                for p in peers
            ],
            right={2},
        )
    repos = s.get("seeded_repos", [])
    out += [
        "",
        f"SEEDED REPOS ({len(repos)}; {s['seeded_blobs']} blobs, "
        f"{human_bytes(int(s.get('seeded_bytes', 0)))})",
    ]
    if repos:
        out += table(
            ("REPO", "BLOBS", "SIZE"),
            [(r["repo"], str(r["blobs"]), human_bytes(r["bytes"])) for r in repos],
            right={1, 2},
        )
    return "\n".join(out)
