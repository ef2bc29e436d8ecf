"""HF_ENDPOINT mode streams a blob to its client while the agent is still fetching it
(from a peer's swarm or from the mirror), in order, and never lets a client receive a
whole body that failed the whole-file check."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest
from agentkit import agent, config, fetch, peer_of
from huggingface_hub import hf_hub_download
from test_agents import MiB, sha256

from peer.mirror_server import Fault, MirrorServer, RepoSource


def url(a: object, repo: str, path: str) -> str:
    local = a.config.local_listen[0]  # type: ignore[attr-defined]
    return f"http://{local}:{a.local_port}/{repo}/resolve/main/{path}"  # type: ignore[attr-defined]


@pytest.fixture
def shard(tmp_path: Path) -> bytes:
    data = random.Random(9).randbytes(48 * MiB)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(data)
    return data


async def test_a_shard_streams_from_a_peer_while_the_swarm_fetches_it(
    tmp_path: Path, shard: bytes
) -> None:
    blob = sha256(shard)
    async with MirrorServer([RepoSource("model", "org/s", tmp_path / "src")]) as mirror:
        # A holds the shard and uploads at 8 MiB/s: the swarm takes ~6 s.
        slow = config(tmp_path / "a", "127.0.0.2", mirror.url, max_upload_rate=8 * MiB)
        async with agent(slow) as a:
            await fetch(a, "org/s")
            mirror.reset_stats()
            async with (
                agent(config(tmp_path / "b", "127.0.0.3", mirror.url, peers=(peer_of(a),))) as b,
                aiohttp.ClientSession() as client,
                client.get(url(b, "org/s", "model.safetensors")) as r,
            ):
                assert r.status == 200 and r.content_length == len(shard)
                first = await r.content.readexactly(MiB)
                in_blobs = tmp_path / "b/cache/models--org--s/blobs" / blob
                # The first MiB is here, the blob is not verified yet: streamed.
                assert not in_blobs.exists()
                flight = b.blobs.stream_of(blob)
                assert flight is not None and flight.reader_count == 1
                assert flight.ready < len(shard)
                rest = await r.read()
            body = first + rest
    assert body == shard
    assert in_blobs.read_bytes() == shard
    assert mirror.stats().blob_bytes == 0, "every byte came from the peer"


async def test_while_a_client_streams_the_swarm_takes_the_pieces_in_order(
    tmp_path: Path, shard: bytes
) -> None:
    """Rarest first, the pieces after a hole wait unread and the whole-file hash with
    them: a streamed blob is picked in order (libtorrent's sequential download)."""
    blob = sha256(shard)
    async with MirrorServer([RepoSource("model", "org/s", tmp_path / "src")]) as mirror:
        slow = config(tmp_path / "a", "127.0.0.2", mirror.url, max_upload_rate=8 * MiB)
        async with agent(slow) as a:
            await fetch(a, "org/s")
            async with (
                agent(config(tmp_path / "b", "127.0.0.3", mirror.url, peers=(peer_of(a),))) as b,
                aiohttp.ClientSession() as client,
                client.get(url(b, "org/s", "model.safetensors")) as r,
            ):
                await r.content.readexactly(MiB)
                (manifest,) = b.blobs.fetching_for((blob,))
                for _ in range(100):  # about a third of the 48 pieces, at 8 MiB/s
                    await asyncio.sleep(0.05)
                    have = await b.blobs.swarm.have_pieces(manifest.info_hash)
                    if sum(have) >= 16:
                        break
                had = [i for i, h in enumerate(have) if h]
                # In order: the pieces had are the first ones (the ones in flight may
                # finish out of turn: a few holes at the front edge at most).
                assert len(had) >= 8 and max(had) < len(had) + 4, had
                body = MiB + len(await r.read())
    assert body == len(shard)


async def test_mirror_bytes_stream_and_a_failed_hash_cuts_the_connection(
    tmp_path: Path, shard: bytes
) -> None:
    async with MirrorServer([RepoSource("model", "org/s", tmp_path / "src")]) as mirror:
        mirror.set_rate_cap(1 * MiB)  # per connection: ~3 s for the shard
        # One corrupt byte: the first fetch fails its whole-file hash, at the end, after
        # most of the body has been streamed. Near the start, in the part the first
        # request keeps: that request asks for the whole file and is cut for the streams
        # added later, and the fault is spent on the first response covering its offset.
        mirror.add_fault(Fault("corrupt", offset=4096, times=1))
        async with (
            agent(config(tmp_path / "b", "127.0.0.3", mirror.url)) as b,
            aiohttp.ClientSession() as client,
        ):
            got = bytearray()
            with pytest.raises(aiohttp.ClientPayloadError):
                async with client.get(url(b, "org/s", "model.safetensors")) as r:
                    assert r.status == 200
                    async for chunk in r.content.iter_chunked(MiB):
                        got += chunk
            # It streamed (a good part of the body arrived) but never the whole of it.
            assert MiB <= len(got) < len(shard)
            # The agent fetched it again; a new request gets the verified blob.
            async with client.get(url(b, "org/s", "model.safetensors")) as r:
                again = await r.read()
            # huggingface_hub through the same agent: the blob is local now.
            path = await asyncio.to_thread(
                hf_hub_download,
                "org/s",
                "model.safetensors",
                endpoint=f"http://127.0.0.3:{b.local_port}",
                cache_dir=tmp_path / "client",
                token=False,
            )
        assert again == shard
        assert await asyncio.to_thread(Path(path).read_bytes) == shard
