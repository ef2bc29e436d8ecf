"""`MirrorServer` on its own event loop in a daemon thread, for synchronous callers.

Sync tests drive blocking clients (huggingface_hub, subprocesses) against the mirror;
running the server on the test's own loop would deadlock, so it gets a loop of its own.
The control methods of `MirrorServer` are thread-safe and are simply forwarded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Collection, Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

from peer.mirror_server.control import Fault, MirrorStats
from peer.mirror_server.repo import RepoSource
from peer.mirror_server.server import MirrorServer, RedirectMode

T = TypeVar("T")


class ThreadedMirror:
    """``with ThreadedMirror(repos, ...) as m:`` - same arguments and API as MirrorServer."""

    def __init__(
        self,
        repos: Iterable[RepoSource],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: Collection[str] = (),
        gated_tokens: Collection[str] = (),
        page_size: int = 50,
        redirect: RedirectMode = "none",
        rate_cap: int | None = None,
        client_rate: int | None = None,
        cdn_port: int = 0,
        url_ttl: float = 24 * 3600,
    ) -> None:
        self._server = MirrorServer(
            repos,
            host,
            port,
            tokens=tokens,
            gated_tokens=gated_tokens,
            page_size=page_size,
            redirect=redirect,
            rate_cap=rate_cap,
            client_rate=client_rate,
            cdn_port=cdn_port,
            url_ttl=url_ttl,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ThreadedMirror:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="mirror-server", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._call(self._server.start())
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self._server.close())
        finally:
            self._stop_loop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join()
        loop.close()

    @property
    def server(self) -> MirrorServer:
        return self._server

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def cdn_url(self) -> str:
        return self._server.cdn_url

    def stats(self) -> MirrorStats:
        return self._server.stats()

    def reset_stats(self) -> None:
        self._server.reset_stats()

    def add_fault(self, fault: Fault) -> None:
        self._server.add_fault(fault)

    def clear_faults(self) -> None:
        self._server.clear_faults()

    def faults(self) -> list[Fault]:
        return self._server.faults()

    def down_for(self, seconds: float) -> None:
        self._server.down_for(seconds)

    def set_rate_cap(self, bytes_per_sec: int | None) -> None:
        self._server.set_rate_cap(bytes_per_sec)

    def set_client_rate(self, bytes_per_sec: int | None, burst: int | None = None) -> None:
        self._server.set_client_rate(bytes_per_sec, burst)

    def client_rate_charged(self) -> dict[str, int]:
        return self._server.client_rate_charged()

    def commit_of(self, repo_type: str, repo_id: str, revision: str = "main") -> str:
        return self._server.commit_of(repo_type, repo_id, revision)
