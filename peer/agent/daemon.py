"""The agent: composes its parts (one libtorrent session, the peer table, the seed index,
the fetcher with its herd, the trackers, revisions) and the backends of its APIs
(`PeerService`, `LocalService`, `HubService`), binds the listeners, runs background work.

    async with Agent(config) as agent:
        await agent.serve(stop_event)

`Agent.__aenter__` binds every listener (so a port clash fails at once, with a clear
error); `serve` runs the background work (liveness checks, the cache scan that seeds
pre-existing blobs, periodic resume data, tracker presence) in one TaskGroup until `stop`
is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

from aiohttp import web

from peer.agent.audit import AuditLog, PeerBanned
from peer.agent.fetch import BlobFetcher
from peer.agent.jobs import DownloadJob, HubService, Totals
from peer.agent.limits import LiveLimits
from peer.agent.local_service import LocalService
from peer.agent.peer_service import PeerService
from peer.agent.publish import Publisher
from peer.agent.quota import CacheQuota, LastUse, Pins
from peer.agent.revisions import Revisions
from peer.agent.seeding import SeedIndex
from peer.agent.state import StateDir
from peer.agent.uploads import UploadWatch, agent_id_at
from peer.aio import primary_error
from peer.cache.debris import clean_debris
from peer.cluster.announce import check_txt, signed_txt
from peer.cluster.credentials import load_member
from peer.cluster.tls import FFDHE2048_PEM, Cluster, PeerCert, peer_cert
from peer.config import AgentConfig
from peer.discovery.mdns import MdnsDiscovery
from peer.discovery.peer_table import PeerTable
from peer.discovery.tracker_source import Trackers
from peer.errors import LocalError
from peer.hub.metadata import anonymous_flags
from peer.hub.metadata import warm_up as hub_warm_up
from peer.manifests.signing import KeyPins, Signatures, load_signing_key
from peer.serving.limits import StreamSlots, local_limits, nofile_limit, peer_limits, start_listener
from peer.serving.local_api import make_local_app
from peer.serving.member_stream import MemberStreamServer
from peer.serving.metrics import AgentMetrics
from peer.serving.peer_api import STREAMS_PER_IP, STREAMS_TOTAL, make_peer_app
from peer.serving.sharing import Visibility
from peer.transfer.rate import Throttle
from peer.transfer.swarm import SslIdentity, SwarmSession, SwarmSettings
from tracker.signing import Membership

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state = StateDir(config.state_dir)
        self.agent_id = ""
        self.totals = Totals()
        # The agent's own Prometheus registry and audit log (nothing process-wide).
        self.metrics = AgentMetrics()
        self.audit = AuditLog(None)
        self.peer_streams = StreamSlots(total=STREAMS_TOTAL, per_ip=STREAMS_PER_IP)
        self._stack = AsyncExitStack()
        self.swarm: SwarmSession
        self.peers: PeerTable
        self.seeds: SeedIndex
        self.blobs: BlobFetcher
        self.revisions: Revisions
        self.downloads: DownloadJob
        self.publisher: Publisher
        self.trackers: Trackers
        self.local: LocalService  # the local API's backend (status, downloads, publish)
        self.pins: Pins
        self.last_use: LastUse
        self.quota: CacheQuota
        self.limits: LiveLimits
        self.peer_port = 0
        self.local_port = 0
        self.member_port = 0  # cluster mode: the member blob stream's
        self._member_streams: Callable[[], int] = lambda: 0  # ... and its streams running
        self.cluster: Cluster | None = None  # cluster mode (`--cluster FILE`)
        self.signatures: Signatures

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        try:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
            self.config.hub.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalError(
                f"cannot create {exc.filename}: {exc.strerror}",
                hint="pick writable --cache-dir/--state-dir",
            ) from exc
        if self.config.cluster is not None:
            # Cluster mode: the id is the member key's (its certificate names it).
            member = await asyncio.to_thread(load_member, self.config.cluster)
            self.cluster = Cluster(member, on_revoked=self._revoked_seen)
            self.agent_id = self.cluster.agent_id
        else:
            self.agent_id = self.state.agent_id()
        self.audit = AuditLog(self.config.audit_path)
        self._stack.callback(self.audit.close)
        if removed := await asyncio.to_thread(
            clean_debris, self.config.hub.cache_dir, self.config.state_dir
        ):
            log.info("removed %d temp file(s) that killed processes left behind", removed)
        try:
            bt_host, bt_port = self.config.bt_listen
            self.swarm = await self._stack.enter_async_context(
                SwarmSession(
                    SwarmSettings(
                        listen_host=bt_host,
                        listen_port=bt_port,
                        upload_rate_limit=self.config.max_upload_rate,
                        download_rate_limit=self.config.max_download_rate,
                        # a cap is meant for the LAN too (and may be set live)
                        limit_local_peers=True,
                        trackers=tuple(f"{u}/announce" for u in self.config.trackers),
                        ssl=await asyncio.to_thread(self._ssl_identity),
                    )
                )
            )
            self.signatures = await asyncio.to_thread(self._signatures)
            self.peers = await self._stack.enter_async_context(
                PeerTable(
                    self.agent_id,
                    cluster=self.cluster,
                    check_manifest=(
                        (lambda m, by: self.signatures.check_manifest(m, by, time.time()))
                        if self.cluster is not None
                        else None
                    ),
                    on_ban=self._banned,
                )
            )
            for host, port in self.config.peers:
                self.peers.offer(host, port, "static")
            self.pins = Pins(self.state)
            self.last_use = LastUse(self.state)
            await asyncio.to_thread(self.pins.load)
            await asyncio.to_thread(self.last_use.load)
            self.seeds = SeedIndex(
                self.config.hub.cache_dir,
                self.state,
                self.swarm,
                self.agent_id,
                confirm=self._anonymous_visibility,
                policy=self.config.seeding,
                pinned=self.pins.repos,
                # share = "cluster": private and gated blobs go to members too
                cluster_share=self.cluster is not None and self.cluster.member.share == "cluster",
            )
            # The herd asks the trackers and nudges them from the start; the sources
            # themselves start once the peer API is bound (they register its port).
            self.trackers = Trackers(
                self.config.trackers,
                agent_id=self.agent_id,
                peers=self.peers,
                holdings=lambda: (self.seeds.held.keys(), self.blobs.fetching_ids()),
                signer=self.cluster.member if self.cluster is not None else None,
            )
            self.blobs = BlobFetcher(
                self.config,
                self.swarm,
                self.peers,
                self.seeds,
                self.state,
                lookups=[self.trackers.lookup] if self.config.trackers else [],
                on_change=self.trackers.nudge,
                on_ban=self._banned,
                cluster=self.cluster,
            )
            self.quota = CacheQuota(
                self.config.hub.cache_dir,
                self.config.cache_max_size,
                self.seeds,
                self.pins,
                self.last_use,
                busy=self.blobs.busy_ids,
                uploaded=self.seeds.uploaded,
            )
            upload = Throttle(self.config.max_upload_rate)  # the peer API's HTTP blobs
            self.limits = LiveLimits(
                self.swarm,
                upload,
                self.blobs.mirror_throttle,
                self.config.max_download_rate,
                member_download=self.blobs.member_download,
            )
            self.revisions = Revisions(
                self.state, self.peers, self.agent_id, signatures=self.signatures
            )
            await asyncio.to_thread(self.revisions.load)
            self.downloads = DownloadJob(
                self.config.hub,
                self.config.download,
                self.revisions,
                self.blobs,
                self.totals,
                quota=self.quota,
                throttle=self.blobs.mirror_throttle,
            )
            self.publisher = Publisher(
                self.config.hub.cache_dir, self.seeds, self.revisions, self.agent_id
            )
            self.local = LocalService(
                self.config,
                self.agent_id,
                swarm=self.swarm,
                peers=self.peers,
                seeds=self.seeds,
                blobs=self.blobs,
                downloads=self.downloads,
                publisher=self.publisher,
                totals=self.totals,
                ports=lambda: (self.peer_port, self.local_port),
                audit=self.audit,
                peer_streams=lambda: self.peer_streams.in_use + self._member_streams(),
                quota=self.quota,
                limits=self.limits,
            )
            peers_api = PeerService(
                self.agent_id,
                self.swarm.listen_port,
                self.seeds,
                self.blobs,
                self.revisions,
                self.totals,
                audit=self.audit,
                peer_of=lambda host: agent_id_at(self.peers, host),
                sign=self.signatures.sign_manifest if self.cluster is not None else None,
                seeding=self.config.seeding,
                touch=self.last_use.touch,
            )
            hub_api = HubService(
                self.config, self.revisions, self.blobs, self.downloads, self.audit
            )
            if self.cluster is not None and self.config.member_streams > 0:
                # Members send each other whole blobs here (`peer.serving.member_stream`).
                host, port = self.config.member_listen
                try:
                    streams = await self._stack.enter_async_context(
                        MemberStreamServer(
                            self.cluster,
                            host,
                            port,
                            peers_api,
                            throttle=upload,
                            slots=self.config.member_streams,
                        )
                    )
                except OSError as exc:
                    raise LocalError(
                        f"cannot listen on {host}:{port} (member_listen): {exc.strerror}",
                        hint="choose another port with --member-listen",
                    ) from exc
                self.member_port = peers_api.stream_port = streams.port
                self._member_streams = lambda: streams.streams
            self.peer_port = await self._listen(
                make_peer_app(peers_api, self.peer_streams, throttle=upload.take),
                self.config.listen,
                peer_facing=True,
            )
            self.local_port = await self._listen(
                make_local_app(self.local, hub=hub_api, metrics=self.metrics),
                self.config.local_listen,
            )
            if self.config.mdns:
                # Goodbyes go out on exit while the peer API is still up (exit stack order).
                await self._stack.enter_async_context(
                    MdnsDiscovery(
                        self.agent_id,
                        self.config.listen[0],
                        self.peer_port,
                        self.swarm.listen_port,
                        on_found=lambda host, port, _id: self.peers.offer(host, port, "mdns"),
                        on_lost=self.peers.withdraw,
                        interfaces=self.config.mdns_interfaces or None,
                        **self._mdns_signing(),
                    )
                )
            await self._stack.enter_async_context(
                self.trackers.bound(self.config.listen[0], self.peer_port, self.swarm.listen_port)
            )
            # Know the configured peers before the first request can arrive, and load
            # huggingface_hub and its session now (~0.3 s) rather than in the first
            # download.
            await asyncio.gather(self.peers.check_all(), asyncio.to_thread(hub_warm_up))
        except BaseException:
            await self._stack.aclose()
            raise
        log.info(
            "agent %s: peers on %s:%d, local API on %s:%d, BitTorrent on %d",
            self.agent_id[:8],
            self.config.listen[0],
            self.peer_port,
            self.config.local_listen[0],
            self.local_port,
            self.swarm.listen_port,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.revisions.close()
        await self.blobs.close()
        await self._stack.aclose()
        await asyncio.to_thread(self.last_use.save)

    async def _listen(
        self, app: web.Application, where: tuple[str, int], *, peer_facing: bool = False
    ) -> int:
        # Caps below the fd limit, header/body/stall timeouts: peer/serving/limits.py.
        nofile = nofile_limit()
        limits = peer_limits(nofile) if peer_facing else local_limits(nofile)
        tls = self.cluster if peer_facing else None
        try:
            runner, port = await start_listener(
                app,
                where[0],
                where[1],
                limits,
                ssl_context=tls.server_context() if tls is not None else None,
                admit=self._admit if tls is not None else None,
            )
        except OSError as exc:
            raise LocalError(
                f"cannot listen on {where[0]}:{where[1]}: {exc.strerror}",
                hint="choose another port, or stop the agent already using it",
            ) from exc
        self._stack.push_async_callback(runner.cleanup)
        return port

    def _ssl_identity(self) -> SslIdentity | None:
        """Cluster mode: SSL torrents rooted in the cluster CA, with the member's key."""
        if self.cluster is None:
            return None
        member = self.cluster.member
        dh = self.config.state_dir / "dhparams.pem"
        if not dh.exists():
            dh.write_text(FFDHE2048_PEM)
        return SslIdentity(member.ca_pem, str(member.path), str(member.path), str(dh))

    def _signatures(self) -> Signatures:
        """Cluster mode: the member's key and certificate, members only. Open mode: the
        agent's own key (made 0600 in the state dir), for local/* publishes."""
        pins = KeyPins(self.config.state_dir / "pins")
        if self.cluster is None:
            key = load_signing_key(self.config.state_dir / "signing_key")
            return Signatures(self.agent_id, key, pins)
        member = self.cluster.member
        return Signatures(
            self.agent_id,
            member.key,
            pins,
            cert_der=member.cert_der,
            membership=Membership(member.ca, member.crl),
        )

    def _mdns_signing(self) -> dict[str, Any]:
        """Cluster mode: our mDNS record signed, and only members' signed records read."""
        if self.cluster is None:
            return {}
        member = self.cluster.member
        membership = Membership(member.ca, member.crl)
        return {
            "sign": lambda bt, api, now: signed_txt(member, bt, api, now),
            "check": lambda props, agent_id, bt, api, now: check_txt(
                membership, props, agent_id, bt, api, now
            ),
        }

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        """Cluster mode, after the handshake: the client's certificate is not revoked."""
        assert self.cluster is not None
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        return self.cluster.admits(peer_cert(transport.get_extra_info("ssl_object")), host)

    def _revoked_seen(self, host: str, cert: PeerCert) -> None:
        """A revoked member showed up at `host` (its TLS connection was refused): keep it
        out of the swarm too (libtorrent checks the CA, not our CRL)."""
        if host in self.swarm.banned_peers():
            return
        log.warning("member %s (%s) at %s is revoked; banned", cert.name, cert.agent_id[:8], host)
        self.swarm.ban_peer(host)
        self._banned(host, f"revoked member {cert.name} ({cert.agent_id[:8]})", "")

    async def serve(self, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.peers.run()),
                    tg.create_task(self._scan_then_keep_quota()),
                    tg.create_task(self.blobs.save_resume_periodically()),
                    tg.create_task(self._watch_uploads().run()),
                    *(tg.create_task(t.run()) for t in self.trackers.sources),
                ]
                await stop.wait()
                for t in tasks:
                    t.cancel()
        except BaseExceptionGroup as group:
            raise primary_error(group) from None

    async def _scan_then_keep_quota(self) -> None:
        """Seed what the cache holds; then keep it within its quota (not before: the
        scan hashes blobs an eviction would pull from under it)."""
        await self.seeds.scan()
        if self.config.cache_max_size > 0:
            await self.quota.run()

    def _watch_uploads(self) -> UploadWatch:
        return UploadWatch(
            self.swarm, self.peers, self._blob_of_torrent, self.audit, on_banned=self._counted_ban
        )

    def _blob_of_torrent(self, info_hash: str) -> str | None:
        """The blob a torrent of this session carries (seeded, or being fetched)."""
        for blob_id, held in list(self.seeds.held.items()):
            if held.manifest.info_hash == info_hash:
                return blob_id
        return next(
            (m.blob_id for m in self.blobs.fetching_manifests() if m.info_hash == info_hash),
            None,
        )

    def _counted_ban(self) -> None:
        self.totals.bans += 1

    def _banned(self, address: str, reason: str, blob_id: str) -> None:
        """Our scheduling policy banned a peer: counted and audited."""
        self.totals.bans += 1
        self.audit.write(
            PeerBanned(peer_address=address, reason=reason, by="policy", blob_id=blob_id)
        )

    async def _anonymous_visibility(self, repo_type: str, repo_id: str) -> Visibility | None:
        flags = await anonymous_flags(replace(self.config.hub, token=None), repo_type, repo_id)
        return (
            None if flags is None else Visibility.of_mirror_answer(private=flags[0], gated=flags[1])
        )
