"""The agent's rate caps, changed while it runs (`hfswarm limits`, `POST /v1/limits`).

    upload    what LAN peers take from us: libtorrent's session upload limit (local
              peers held to it too), the peer API's HTTP blobs and the member blob
              stream (one shared bucket)
    download  what we take from LAN peers: libtorrent's session download limit, and a
              bucket for member streams (cluster mode)
    mirror    what we take from the mirrors: one bucket shared by every `MirrorFetcher`

0 is no cap. They start from `AgentConfig` (`--max-upload-rate`, `--max-download-rate`,
`--mirror-max-rate`); a change lasts until the agent stops.
"""

from __future__ import annotations

from dataclasses import dataclass

from peer.errors import ConfigError
from peer.transfer.rate import Throttle
from peer.transfer.swarm import SwarmSession

MAX_RATE = 1 << 40  # bytes/s; anything above is a typo


@dataclass(frozen=True)
class Rates:
    upload: int
    download: int
    mirror: int

    def to_json(self) -> dict[str, int]:
        return {"upload": self.upload, "download": self.download, "mirror": self.mirror}


class LiveLimits:
    def __init__(
        self,
        swarm: SwarmSession,
        upload: Throttle,
        mirror: Throttle,
        download: int,
        member_download: Throttle | None = None,
    ) -> None:
        self.member_download = member_download  # `BlobFetcher.member_download`
        self.swarm = swarm
        self.upload = upload  # the peer API's HTTP blobs
        self.mirror = mirror  # `BlobFetcher.mirror_throttle`
        self._download = download
        swarm.set_rate_limits(upload.rate, download)

    def current(self) -> Rates:
        return Rates(self.upload.rate, self._download, self.mirror.rate)

    def change(
        self, upload: int | None = None, download: int | None = None, mirror: int | None = None
    ) -> Rates:
        """Set the caps given (None: unchanged); the new ones apply to transfers running."""
        for name, value in (("upload", upload), ("download", download), ("mirror", mirror)):
            if value is not None and not 0 <= value <= MAX_RATE:
                raise ConfigError(
                    f"{name} cap {value} is out of range", hint="give bytes/s, 0 for none"
                )
        now = self.current()
        up = now.upload if upload is None else upload
        down = now.download if download is None else download
        self.swarm.set_rate_limits(up, down)
        self.upload.set_rate(up)
        self._download = down
        if self.member_download is not None:
            self.member_download.set_rate(down)
        if mirror is not None:
            self.mirror.set_rate(mirror)
        return self.current()
