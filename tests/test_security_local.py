"""Issue 9, finding 2 (and the `--token` part of 10): the local API knows its caller.

A real agent runs as a subprocess (root, the agent's user here) with a token, read from
`--token-file`, that the project's mirror accepts for a private repo. The other local
user is a real other uid: the attacking client runs as nobody (65534). Web pages are
played by requests carrying a browser's Origin / a rebound Host header.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peer.cli.demo import loopback_agent_command
from peer.mirror_server import RepoSource
from peer.mirror_server.threaded import ThreadedMirror

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="another local user needs a real other uid: run as root (CI does)"
)

NOBODY = 65534
AGENT_TOKEN = "hf_agent_secret"
USER_TOKEN = "hf_user_secret"
IP = "127.0.0.61"
WORKTREE = Path(__file__).resolve().parent.parent

# The raw client of an attacker: the standard library only, any method, header or body.
ATTACK = r"""
import http.client, json, sys
a = json.loads(sys.argv[1])
c = http.client.HTTPConnection(a["host"], a["port"], timeout=60)
c.request(a["method"], a["path"], body=a.get("body", "").encode(), headers=a.get("headers", {}))
r = c.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode(errors="replace")}))
"""

_libc = ctypes.CDLL(None, use_errno=True)
_CAP_DAC_READ_SEARCH = 2


def _interpreter_hidden_from_others() -> bool:
    """True when some folder above the interpreter is closed to other users (pyenv in
    root's home): nobody could not even start Python."""
    return any(not p.stat().st_mode & 0o001 for p in Path(sys.prefix).resolve().parents)


def _become_nobody() -> None:
    """preexec_fn: the child becomes uid/gid 65534. Where the interpreter lives in a
    folder closed to others, it keeps only CAP_DAC_READ_SEARCH (read any file, write
    none) so that it can start; its uid, the one the agent checks, is nobody's."""
    keep = _interpreter_hidden_from_others()
    if keep:
        _libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: caps survive setuid
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    if keep:
        bit = 1 << _CAP_DAC_READ_SEARCH
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (ctypes.c_uint32 * 6)(bit, bit, bit, 0, 0, 0)  # effective, permitted, inh.
        if _libc.capset(header, data) != 0:
            os._exit(97)
        if _libc.prctl(47, 2, _CAP_DAC_READ_SEARCH, 0, 0) != 0:  # PR_CAP_AMBIENT_RAISE
            os._exit(98)


def run(
    cmd: list[str], *, as_nobody: bool, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=WORKTREE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
        preexec_fn=_become_nobody if as_nobody else None,
    )


@dataclass
class Setup:
    mirror: ThreadedMirror
    source: dict[str, bytes]
    local_port: int
    peer_port: int
    work: Path  # world-readable; subfolders for each test

    def request(
        self,
        method: str,
        path: str,
        *,
        as_nobody: bool,
        body: str = "",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """One request from another process, as nobody or as root."""
        args = {"host": IP, "port": self.local_port, "method": method, "path": path}
        args.update(body=body, headers=headers or {})
        done = run([sys.executable, "-c", ATTACK, json.dumps(args)], as_nobody=as_nobody)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        return int(answer["status"]), str(answer["body"])

    def download_as(self, spec: dict[str, Any], *, as_nobody: bool) -> tuple[int, Any]:
        status, body = self.request(
            "POST",
            "/v1/downloads",
            as_nobody=as_nobody,
            body=json.dumps(spec),
            headers={"Content-Type": "application/json"},
        )
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        return status, lines[-1] if lines else None

    def local(self, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, Any]:
        """A request from this process (root), any headers (Host included)."""
        conn = http.client.HTTPConnection(IP, self.local_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data

    def health_within_1s(self) -> None:
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(IP, self.peer_port, timeout=1)
        try:
            conn.request("GET", "/v1/health")
            status = conn.getresponse().status
        finally:
            conn.close()
        assert status == 200 and time.monotonic() - t0 < 1


def cli(setup: Setup, *args: str, as_nobody: bool, env: dict[str, str]) -> Any:
    url = f"http://{IP}:{setup.local_port}"
    cmd = [sys.executable, "-m", "peer.cli.main", "download", *args, "--agent", url]
    return run(cmd, as_nobody=as_nobody, env=env)


def nobody_dir(parent: Path, name: str) -> Path:
    d = parent / name
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    return d


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    work = Path(tempfile.mkdtemp(prefix="hfswarm-sec-local-"))
    work.chmod(0o755)  # nobody reads the agent's cache (to copy a --local-dir)
    try:
        rnd = random.Random(9)
        source = {"config.json": b'{"secret": true}', "weights.bin": rnd.randbytes(2 << 20)}
        src = work / "src"
        for rel, data in source.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        repos = [RepoSource("model", "org/secret", src, private=True)]
        token_file = work / "agent-token"
        token_file.write_text(f"  {AGENT_TOKEN}\n")
        token_file.chmod(0o600)
        with ThreadedMirror(repos, tokens=[AGENT_TOKEN, USER_TOKEN]) as mirror:
            root = work / "agent"
            cmd = loopback_agent_command(root, IP, mirror.url, (), "--token-file", str(token_file))
            log = (work / "agent.log").open("wb")
            env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, cwd=WORKTREE, env=env)
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline().decode()
                assert '"ready"' in line, (work / "agent.log").read_text()
                info = json.loads(line)
                yield Setup(mirror, source, info["local_port"], info["peer_port"], work)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_another_user_cannot_have_the_agent_use_its_token(setup: Setup) -> None:
    setup.mirror.reset_stats()
    status, final = setup.download_as({"repo_id": "org/secret"}, as_nobody=True)
    assert status == 200
    assert final["event"] == "error" and final["kind"] == "RepoNotFound", final
    assert final["exit_code"] == 2
    assert setup.mirror.stats().blob_bytes == 0  # nothing private left the mirror for it
    setup.health_within_1s()


def test_another_user_cannot_make_the_agent_write_a_folder(setup: Setup) -> None:
    victim = setup.work / "victim-home"
    victim.mkdir()
    setup.mirror.reset_stats()
    status, final = setup.download_as(
        {"repo_id": "org/secret", "local_dir": str(victim)}, as_nobody=True
    )
    assert status == 400 and final["event"] == "error", final
    assert "local dir" in final["message"]
    assert list(victim.iterdir()) == []
    assert setup.mirror.stats().requests == 0  # refused before anything started
    setup.health_within_1s()


def test_the_agents_own_user_gets_the_agents_token(setup: Setup) -> None:
    status, final = setup.download_as({"repo_id": "org/secret"}, as_nobody=False)
    assert status == 200 and final["event"] == "done", final
    snapshot = Path(final["path"])
    assert (snapshot / "weights.bin").read_bytes() == setup.source["weights.bin"]
    assert sorted(e[0] for e in final["entries"]) == sorted(setup.source)


def test_the_cli_sends_the_users_own_token_and_writes_local_dir_itself(setup: Setup) -> None:
    home = nobody_dir(setup.work, "nobody-home")  # no token file in it
    base = {"HOME": str(home), "HF_HOME": str(home / "hf")}
    # No token of its own: the agent does not lend its token to nobody.
    refused = nobody_dir(setup.work, "nobody-refused")
    done = cli(setup, "org/secret", "--local-dir", str(refused), as_nobody=True, env=base)
    assert done.returncode == 2, done.stderr
    assert "org/secret" in done.stderr
    assert list(refused.iterdir()) == []
    # Its own token (HF_TOKEN) reaches the mirror; the CLI process writes the folder.
    target = nobody_dir(setup.work, "nobody-local")
    env = {**base, "HF_TOKEN": USER_TOKEN}
    done = cli(setup, "org/secret", "--local-dir", str(target), "--quiet", as_nobody=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(target)
    for rel, data in setup.source.items():
        assert (target / rel).read_bytes() == data
        assert (target / rel).stat().st_uid == NOBODY  # written by nobody's own process
        meta = target / ".cache/huggingface/download" / f"{rel}.metadata"
        assert meta.stat().st_uid == NOBODY
    # Run again: the files are current, nothing is copied over them.
    before = (target / "weights.bin").stat().st_mtime_ns
    done = cli(setup, "org/secret", "--local-dir", str(target), "--quiet", as_nobody=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (target / "weights.bin").stat().st_mtime_ns == before
    setup.health_within_1s()


def test_web_pages_and_rebound_names_are_refused(setup: Setup) -> None:
    setup.mirror.reset_stats()
    body = json.dumps({"repo_id": "org/secret"}).encode()
    own = f"{IP}:{setup.local_port}"
    # A cross-site form/fetch POST (no preflight for text/plain), as root's browser.
    status, answer = setup.local(
        "POST",
        "/v1/downloads",
        body,
        Host=own,
        **{"Content-Type": "text/plain", "Origin": "https://evil.example"},
    )
    assert status == 403 and answer["event"] == "error", answer
    status, answer = setup.local(
        "POST", "/v1/downloads", body, Host=own, **{"Content-Type": "text/plain"}
    )
    assert status == 415 and answer["event"] == "error", answer
    status, _ = setup.local(
        "POST",
        "/v1/downloads",
        body,
        Host=own,
        **{"Content-Type": "application/json", "Origin": "null"},
    )
    assert status == 403
    # DNS rebinding: a page at evil.example:PORT whose name now points to 127.0.0.x.
    rebound = f"evil.example:{setup.local_port}"
    assert setup.local("GET", "/v1/status", Host=rebound)[0] == 403
    assert setup.local("GET", "/api/models/org/secret/revision/main", Host=rebound)[0] == 403
    assert setup.local("GET", "/org/secret/resolve/main/config.json", Host=rebound)[0] == 403
    assert setup.mirror.stats().requests == 0  # no download, no Hub call started
    # Its own names still work, with and without the port.
    for host in (own, IP, "localhost", f"localhost:{setup.local_port}", "127.0.0.1"):
        assert setup.local("GET", "/v1/status", Host=host)[0] == 200, host
    assert setup.local("GET", "/v1/status", Host=f"{IP}:1")[0] == 403  # another port
    setup.health_within_1s()


@pytest.mark.parametrize("route", ["/v1/downloads", "/v1/publish"])
def test_nested_and_oversized_json_are_bad_requests(setup: Setup, route: str) -> None:
    json_type = {"Content-Type": "application/json"}
    own = f"{IP}:{setup.local_port}"
    status, answer = setup.local("POST", route, b"[" * 100_000, Host=own, **json_type)
    assert status == 400 and answer["event"] == "error", answer
    setup.health_within_1s()
    status, answer = setup.local("POST", route, b" " * (3 << 19), Host=own, **json_type)
    assert status == 400 and answer["event"] == "error", answer
    setup.health_within_1s()


def test_token_on_the_command_line_warns_and_token_file_is_checked(setup: Setup) -> None:
    env = {"HOME": str(setup.work), "HF_HOME": str(setup.work / "no-hf-home")}
    done = cli(setup, "org/secret", "--token", USER_TOKEN, "--quiet", as_nobody=False, env=env)
    assert done.returncode == 0, done.stderr
    assert "visible to every user" in done.stderr and "--token-file" in done.stderr
    token_file = setup.work / "user-token"
    token_file.write_text(USER_TOKEN + "\n")
    done = cli(setup, "org/secret", "--token-file", str(token_file), as_nobody=False, env=env)
    assert done.returncode == 0, done.stderr
    assert "visible to every user" not in done.stderr
    for command in ("download", "agent"):
        missing = str(setup.work / "no-such-token")
        extra = ["org/secret"] if command == "download" else []
        done = run(
            [sys.executable, "-m", "peer.cli.main", command, *extra, "--token-file", missing],
            as_nobody=False,
            env=env,
        )
        assert done.returncode == 2, done.stderr
        assert f"cannot read the token file {missing}" in done.stderr


def test_nested_json_to_the_hub_api_is_a_bad_request(setup: Setup) -> None:
    folder = setup.work / "tiny"
    folder.mkdir()
    (folder / "a.txt").write_text("tiny")
    own = f"{IP}:{setup.local_port}"
    json_type = {"Content-Type": "application/json"}
    spec = json.dumps({"path": str(folder), "repo_id": "local/tiny"}).encode()
    assert setup.local("POST", "/v1/publish", spec, Host=own, **json_type)[0] == 200
    # paths-info of a local/* repo is answered by the agent itself, which parses the body.
    route = "/api/models/local/tiny/paths-info/main"
    status, answer = setup.local("POST", route, b"[" * 100_000, Host=own, **json_type)
    assert status == 400 and answer["event"] == "error", answer
    status, answer = setup.local("POST", route, b'{"paths": ["a.txt"]}', Host=own, **json_type)
    assert status == 200 and [e["path"] for e in answer] == ["a.txt"], answer
    setup.health_within_1s()


def test_only_the_agents_own_user_pins_and_changes_limits(setup: Setup) -> None:
    """Pins keep bytes on the agent's disk (and may make it seed), limits shape its
    traffic: another local user may read them, not change them."""
    pin = json.dumps({"repo_id": "org/secret", "repo_type": "model", "revision": None})
    json_type = {"Content-Type": "application/json"}
    for method, path, body in (
        ("POST", "/v1/pins", pin),
        ("DELETE", "/v1/pins", pin),
        ("POST", "/v1/limits", json.dumps({"upload": "1MB/s"})),
    ):
        status, answer = setup.request(method, path, as_nobody=True, body=body, headers=json_type)
        assert status == 403, (path, answer)
        assert f"not for uid {NOBODY}" in answer, answer
    for path in ("/v1/pins", "/v1/limits"):
        status, answer = setup.request("GET", path, as_nobody=True)
        assert status == 200, answer
    assert json.loads(setup.request("GET", "/v1/pins", as_nobody=True)[1]) == {"pins": []}
    limits = json.loads(setup.request("GET", "/v1/limits", as_nobody=True)[1])
    assert limits == {"upload": 0, "download": 0, "mirror": 0}
    # the agent's own user may
    status, answer = setup.request("POST", "/v1/pins", as_nobody=False, body=pin, headers=json_type)
    assert status == 200 and json.loads(answer)["changed"] is True, answer
    status, answer = setup.request(
        "DELETE", "/v1/pins", as_nobody=False, body=pin, headers=json_type
    )
    assert status == 200 and json.loads(answer)["pins"] == [], answer
    status, answer = setup.request(
        "POST", "/v1/limits", as_nobody=False, body='{"mirror": 0}', headers=json_type
    )
    assert status == 200 and json.loads(answer)["mirror"] == 0, answer
    setup.health_within_1s()
