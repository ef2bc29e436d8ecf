"""`hfswarm download` through an agent starts without the agent's own machinery: the
CLI process must not import libtorrent, the servers or the fetch (0.3 s of CPU on every
run, docs/benchmarks.md 8.10), nor aiohttp (0.15 s more: the local API is spoken over
asyncio streams, `peer/agent/local_http.py`, 8.13). Checked in a fresh interpreter
running the real CLI against an agent that does not answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI's download path in-process, then lists what it imported.
PROBE = """
import json, sys
from peer.cli.main import main
try:
    main(["download", "org/model", "--agent", "http://127.0.0.1:9", "--quiet"])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""

HEAVY = (
    "libtorrent",
    "peer.transfer.swarm",
    "peer.agent.fetch",
    "peer.agent.jobs",
    "peer.serving.local_api",
    "peer.serving.hub_api",
    "peer.download",
    "aiohttp",
)


def _modules_after(probe: str) -> tuple[set[str], str]:
    """The modules a fresh interpreter holds after running ``probe``, and its stderr."""
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1])), out.stderr


def test_a_download_through_an_agent_imports_none_of_the_agent() -> None:
    modules, stderr = _modules_after(PROBE)
    assert "peer.agent.client" in modules, stderr  # the agent path did run
    assert "no hfswarm agent answers" in stderr
    assert not [m for m in HEAVY if m in modules]


# The same for a download with no agent: it runs the agent's `DownloadJob` with the
# mirror as its only source, and needs neither peers, the herd nor libtorrent (0.28 s
# of CPU at every start, docs/benchmarks.md 8.25).
NO_AGENT_PROBE = """
import json, sys, tempfile
from peer.cli.main import main
try:
    main(["download", "org/model", "--no-agent", "--mirror", "http://127.0.0.1:9",
          "--cache-dir", tempfile.mkdtemp(), "--quiet"])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""

AGENT_ONLY = (
    "libtorrent",
    "peer.transfer.swarm",
    "peer.manifests.manifest",
    "peer.agent.fetch",
    "peer.agent.herd",
    "peer.agent.revisions",
    "peer.discovery.peer_table",
    "peer.serving.peer_api",
    "peer.cluster.tls",
)


def test_a_download_with_no_agent_imports_none_of_the_swarm() -> None:
    modules, stderr = _modules_after(NO_AGENT_PROBE)
    assert "peer.download" in modules, stderr  # the mirror-only path did run
    assert "127.0.0.1:9" in stderr
    assert not [m for m in AGENT_ONLY if m in modules]
