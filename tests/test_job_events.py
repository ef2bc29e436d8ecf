"""The job messages of `peer.agent.requests`: the NDJSON lines they make are the ones the
local API has always sent (older CLIs read them), they read back as they were, and the
CLI's display draws them."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from peer.agent.requests import (
    Counters,
    Done,
    DownloadRequest,
    Error,
    Progress,
    Setup,
    Started,
    job_event,
)
from peer.config import DownloadOptions, HubSettings
from peer.errors import ConfigError, GatedRepo, PeerMisbehaved
from peer.hub.metadata import FileSelection
from peer.transfer.progress import ProgressDisplay

SHA = "a" * 64
DONE = Done(
    path=Path("/c/snapshots/abc"),
    commit="c" * 40,
    files=2,
    total=30,
    done=20,
    counters=Counters(from_peers=5, from_mirror=10, reused=5, hash_failures=1),
    entries=(("a.bin", SHA, 10), ("b.bin", SHA, 10)),
    seconds=1.5,
)


def line(event: Started | Progress | Done | Error) -> str:
    return json.dumps(event.to_json())


def test_wire_lines_are_the_old_ones() -> None:
    assert line(Started(2, 30, commit="c" * 40)) == json.dumps(
        {"event": "started", "commit": "c" * 40, "files": 2, "total": 30}
    )
    assert line(Started(2, 30)) == '{"event": "started", "files": 2, "total": 30}'
    download = Progress(7, 30, counters=Counters(1, 2, 3, 4))
    assert line(download) == json.dumps(
        {
            "event": "progress",
            "total": 30,
            "done": 7,
            "from_peers": 1,
            "from_mirror": 2,
            "reused": 3,
            "hash_failures": 4,
        }
    )
    assert line(Progress(7, 30)) == '{"event": "progress", "done": 7, "total": 30}'
    assert list(DONE.to_json()) == [
        "event",
        "total",
        "done",
        "from_peers",
        "from_mirror",
        "reused",
        "hash_failures",
        "path",
        "commit",
        "files",
        "entries",
        "seconds",
    ]
    assert DONE.to_json()["entries"] == [["a.bin", SHA, 10], ["b.bin", SHA, 10]]
    assert Error.of(GatedRepo("no", hint="ask")).to_json() == {
        "event": "error",
        "kind": "GatedRepo",
        "exit_code": 2,
        "message": GatedRepo("no", hint="ask").one_line(),
    }
    assert Error.of(RuntimeError("x")).exit_code == 1


def test_events_read_back() -> None:
    for event in (Started(2, 30, commit="c" * 40), Started(1, 2), Progress(1, 2), DONE):
        assert job_event(json.loads(line(event))) == event
    assert job_event(json.loads(line(Progress(1, 2, counters=Counters(1, 0, 0, 0))))) == (
        Progress(1, 2, counters=Counters(1, 0, 0, 0))
    )
    assert job_event({"event": "from-a-newer-agent"}) is None
    with pytest.raises(PeerMisbehaved):
        job_event({**DONE.to_json(), "entries": [["a.bin", SHA]]})
    with pytest.raises(PeerMisbehaved):
        job_event({"event": "progress", "done": "7", "total": 30})


def test_download_request_json_keeps_local_dir_and_agent_token_out() -> None:
    request = DownloadRequest(
        "org/m",
        selection=FileSelection(include=("*.json",)),
        token="hf_x",
        agent_token=True,
        local_dir=Path("/tmp/x"),
    )
    body = request.to_json()
    assert "local_dir" not in body and "agent_token" not in body
    back = DownloadRequest.from_json({**body, "agent_token": True})
    assert back == DownloadRequest("org/m", selection=request.selection, token="hf_x")
    with pytest.raises(ConfigError):
        DownloadRequest.from_json({**body, "local_dir": "/home/victim"})


def test_a_requests_bounds_travel_lower_the_agents_and_never_raise_them() -> None:
    request = DownloadRequest("org/m", connections=2, max_files=1)
    body = request.to_json()
    assert (body["connections"], body["max_files"]) == (2, 1)
    assert DownloadRequest.from_json(body) == request
    assert "connections" not in DownloadRequest("org/m").to_json()  # none: the agent's own
    for bad in (0, -1, "4", 2.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            DownloadRequest.from_json({**body, "connections": bad})
    agents = DownloadOptions(connections=8, max_files=4)
    assert request.bounded(agents) == replace(agents, connections=2, max_files=1)
    assert DownloadRequest("org/m").bounded(agents) == agents
    with pytest.raises(ConfigError, match="at most --connections 8"):
        DownloadRequest("org/m", connections=9).bounded(agents)
    with pytest.raises(ConfigError, match="at most --max-workers 4"):
        DownloadRequest("org/m", max_files=5).bounded(agents)
    # What the CLI checks first, from /v1/status: an agent that names no bounds (older
    # than this CLI) would ignore them, so any bound is refused.
    setup = Setup.of(HubSettings(("http://m",), None, Path("/c")), agents)
    status = setup.to_json()
    assert Setup.from_status(status) == setup
    assert setup.exceeded(DownloadRequest("org/m", connections=8, max_files=4)) == []
    assert setup.exceeded(request) == []
    assert setup.exceeded(DownloadRequest("org/m", connections=9)) == ["--connections 9"]
    older = Setup.from_status({"mirrors": ["http://m"], "cache_dir": "/c"})
    assert older is not None and older.exceeded(request) == ["--connections 2", "--max-workers 1"]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_display_draws_the_events_and_wipes_the_bar() -> None:
    out = Tty()
    show = ProgressDisplay(quiet=False, stream=out)
    show(Progress(1, 2))  # before Started: nothing to draw on
    assert out.getvalue() == ""
    show(Started(3, 2_000_000, commit="c" * 40))
    show(Progress(1_000_000, 2_000_000, counters=Counters(from_mirror=1_000_000), files_done=1))
    assert "1.0 MB / 2.0 MB (50.0%)" in out.getvalue() and "files 1/3" in out.getvalue()
    show(DONE)
    assert out.getvalue().endswith("\r")
    quiet = Tty()
    show = ProgressDisplay(quiet=True, stream=quiet)
    show(Started(3, 10))
    show(Progress(5, 10, files_done=1))
    assert quiet.getvalue() == ""
