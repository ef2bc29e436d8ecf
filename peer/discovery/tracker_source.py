"""A LAN tracker as a discovery source, for networks mDNS does not reach.

The agent stays registered with each tracker and announces the blobs it holds and those
it is fetching (`tracker.client.TrackerPresence` re-registers by itself after a tracker
restart). Before the agent asks its peers for a blob, `lookup` asks the tracker who has
it and offers those agents to the peer table, which checks them like any other peer.
The agent works on without a tracker: tracker errors are logged, never raised.

`Trackers` is the agent's trackers as one source, made before the parts that ask it (the
herd gets `lookup` and `nudge` at construction); its sources start once the peer API is
bound, since they register its port (`bound`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from peer.discovery.peer_table import PeerTable
from tracker.client import TrackerClient, TrackerPresence
from tracker.errors import TrackerError
from tracker.signing import Signer

log = logging.getLogger(__name__)

Holdings = Callable[[], tuple[Iterable[str], Iterable[str]]]


class TrackerSource:
    def __init__(
        self,
        url: str,
        *,
        agent_id: str,
        api_host: str,
        api_port: int,
        bt_port: int,
        peers: PeerTable,
        holdings: Holdings,
        signer: Signer | None = None,
    ) -> None:
        self.url = url
        self.agent_id = agent_id
        self.peers = peers
        self._holdings = holdings
        self._client = TrackerClient(url, signer=signer)
        # 0.0.0.0 is no address to give out: the tracker records where we came from.
        host = "" if api_host in ("", "0.0.0.0", "::") else api_host
        self.presence = TrackerPresence(
            self._client,
            agent_id=agent_id,
            api_port=api_port,
            bt_port=bt_port,
            holdings=holdings,
            host=host,
        )
        self._last: tuple[frozenset[str], frozenset[str]] | None = None

    async def __aenter__(self) -> TrackerSource:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.__aexit__(None, None, None)

    async def run(self) -> None:
        """Heartbeat and announce; re-announce soon after what we hold changes."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.presence.run())
            while True:
                held, fetching = self._holdings()
                now = (frozenset(held), frozenset(fetching))
                if now != self._last:
                    self._last = now
                    self.presence.changed()
                await asyncio.sleep(1.0)

    async def lookup(self, blob_ids: tuple[str, ...]) -> None:
        """Offer the agents the tracker names for these blobs to the peer table."""
        try:
            answer = await self._client.who(blob_ids)
        except TrackerError as exc:
            log.info("tracker %s: %s", self.url, exc.one_line())
            return
        fresh: list[tuple[str, int]] = []
        for sources in answer.values():
            for a in (*sources.holders, *sources.fetchers):
                if a.agent_id != self.agent_id:
                    fresh.append((a.host, a.api_port))
        for host, port in fresh:
            self.peers.offer(host, port, "tracker")
        await self.peers.check_new()

    def nudge(self) -> None:
        """What we hold or fetch changed in a way others wait on (a herd claim):
        announce now rather than on the next look."""
        held, fetching = self._holdings()
        self._last = (frozenset(held), frozenset(fetching))
        self.presence.changed()


class Trackers:
    """All of the agent's trackers (none, with no ``--tracker``): `lookup` and `nudge`
    reach every source; before `bound` there are none, so both do nothing."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        agent_id: str,
        peers: PeerTable,
        holdings: Holdings,
        signer: Signer | None = None,
    ) -> None:
        self.urls = tuple(urls)
        self.signer = signer  # cluster mode: registrations and announces signed
        self.agent_id = agent_id
        self.peers = peers
        self._holdings = holdings
        self.sources: list[TrackerSource] = []

    @asynccontextmanager
    async def bound(self, api_host: str, api_port: int, bt_port: int) -> AsyncIterator[Trackers]:
        """The sources, registering this agent's peer API and BitTorrent ports."""
        async with AsyncExitStack() as stack:
            self.sources = [
                await stack.enter_async_context(
                    TrackerSource(
                        url,
                        agent_id=self.agent_id,
                        api_host=api_host,
                        api_port=api_port,
                        bt_port=bt_port,
                        peers=self.peers,
                        holdings=self._holdings,
                        signer=self.signer,
                    )
                )
                for url in self.urls
            ]
            try:
                yield self
            finally:
                self.sources = []

    async def lookup(self, blob_ids: tuple[str, ...]) -> None:
        await asyncio.gather(*(t.lookup(blob_ids) for t in self.sources))

    def nudge(self) -> None:
        for t in self.sources:
            t.nudge()
