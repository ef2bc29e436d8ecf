"""hfswarm's LAN tracker: where agents find each other when multicast (mDNS) does not reach.

Two services on one HTTP port:

- the agent index (msgpack, ``/v1/...``): agents register and heartbeat, announce the
  blobs they hold and fetch, and ask who has which blobs (`tracker.messages`);
- a standard BitTorrent HTTP tracker (``GET /announce``, bencoded, compact peers) for
  the per-blob v2 swarms.

`tracker.registry` is the state (pure: fed with ``now``), `tracker.service` the aiohttp
server, `tracker.client` the agents' side, `tracker.cli` the ``hfswarm tracker`` command.
The package does not import `peer`: a tracker host needs no agent code.
"""
