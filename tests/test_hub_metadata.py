"""Resolving a revision talks to the configured mirror and nothing else: huggingface_hub,
left alone, asks huggingface.co for its AI-agent harness list on the first call of a
process (a 3 s timeout; on a LAN with no route out, the first resolve waited for it).
Checked in a fresh interpreter (that probe runs once per process), with every name the
process looks up recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from peer.mirror_server import RepoSource, ThreadedMirror

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import asyncio, json, socket, sys
looked_up = []
real = socket.getaddrinfo
def spy(host, *a, **k):
    looked_up.append(host)
    return real(host, *a, **k)
socket.getaddrinfo = spy
from peer.config import HubSettings
from peer.hub.metadata import resolve_snapshot, warm_up
warm_up()  # what the agent does at start
settings = HubSettings.from_env(mirrors=[sys.argv[1]], token=None, cache_dir=None)
snap = asyncio.run(resolve_snapshot(settings, "model", "org/m", "main"))
print(json.dumps({"files": [f.path for f in snap.files], "hosts": sorted(set(looked_up))}))
"""


def test_a_resolve_looks_up_the_mirror_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DO_NOT_TRACK"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # no harness list cached from an earlier run
    with ThreadedMirror([RepoSource("model", "org/m", src)]) as mirror:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, mirror.url],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["files"] == ["config.json"], out.stderr
    assert got["hosts"] == ["127.0.0.1"], got
