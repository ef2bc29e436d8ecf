"""hfswarm's own Hugging Face-compatible mirror, for tests, the demo and benchmarks.

    async with MirrorServer([RepoSource("model", "org/x", folder)]) as m:
        snapshot_download("org/x", endpoint=m.url, cache_dir=...)

`ThreadedMirror` is the same server on a background loop for synchronous callers;
``python -m peer.mirror_server serve|generate`` is the command line (see `cli`).
"""

from peer.mirror_server.control import Fault, MirrorStats
from peer.mirror_server.repo import RepoSource
from peer.mirror_server.server import MirrorServer
from peer.mirror_server.threaded import ThreadedMirror

__all__ = ["Fault", "MirrorServer", "MirrorStats", "RepoSource", "ThreadedMirror"]
