"""What tests steer and observe: injected faults, byte counters and the rate caps.

All of it is shared between the event loop serving requests and whichever thread calls
the control API (`ThreadedMirror` runs the loop in its own thread), so every mutable
piece sits behind one `threading.Lock`. Critical sections are a few dict updates; the
lock is taken once per written chunk (<= 1 MiB), which costs nothing measurable.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from peer.errors import ConfigError

FaultKind = Literal[
    "drop_after", "status", "stall", "corrupt", "ignore_range", "bad_content_range", "delay"
]


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour for file bodies (resolve GET and CDN GET only).

    kind:
      drop_after    send `after_bytes` body bytes, then close the connection.
      status        answer `status` (default 503) instead of the body; `retry_after`
                    adds a Retry-After header.
      stall         send headers and `after_bytes` body bytes, hang `stall_seconds`,
                    then continue normally.
      corrupt       flip (xor 0xFF) the byte at absolute file offset `offset`.
      ignore_range  answer 200 with the whole file although Range was sent.
      bad_content_range  answer 206 with the right bytes but a Content-Range whose
                    start is one byte off (a broken proxy or cache in front).
      delay         hold the answer `stall_seconds` before its headers (a mirror that
                    checks its upstream before it answers, as olah does).
    A truncated body with a correct Content-Length is `drop_after`: the length header
    always names the whole span.

    `path_glob` is an fnmatch pattern on the file's path inside the repo. `times` is
    how many requests it affects (None = forever). A fault is used up only by a request
    it actually changes: `corrupt` when the response covers `offset`, `ignore_range`
    and `bad_content_range` when Range was sent, `drop_after`/`stall` when the body
    is longer than `after_bytes`.
    """

    kind: FaultKind
    path_glob: str = "*"
    times: int | None = 1
    after_bytes: int = 0
    status: int = 503
    retry_after: float | None = None
    stall_seconds: float = 30.0
    offset: int = 0

    def __post_init__(self) -> None:
        if self.kind not in get_args(FaultKind):
            raise ConfigError(
                f"unknown fault kind {self.kind!r}",
                hint=f"use one of: {', '.join(get_args(FaultKind))}",
            )
        if self.times is not None and self.times < 1:
            raise ConfigError("Fault.times must be >= 1, or None for forever")
        if self.after_bytes < 0 or self.offset < 0 or self.stall_seconds < 0:
            raise ConfigError("Fault.after_bytes, offset and stall_seconds must be >= 0")
        if not 100 <= self.status <= 599:
            raise ConfigError(f"Fault.status {self.status} is not an HTTP status")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """Build from the JSON body of ``POST /_mirror/faults``; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FaultPlan:
    """What to do to one body response, decided once before the first byte is sent."""

    status: Fault | None = None
    ignore_range: bool = False
    bad_content_range: bool = False
    corrupt_offsets: frozenset[int] = frozenset()
    stall_at: int | None = None  # body offset (relative to the response) to stall at
    stall_seconds: float = 0.0
    drop_at: int | None = None  # body offset after which the connection is closed
    delay: float = 0.0  # seconds before the headers


class FaultBook:
    """Active faults with their remaining counts. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[list[Any]] = []  # [Fault, remaining | None]

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append([fault, fault.times])

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def active(self) -> list[Fault]:
        with self._lock:
            return [f for f, _ in self._faults]

    def _take(
        self,
        kind: FaultKind,
        paths: list[str],
        pred: Callable[[Fault], bool] | None = None,
        *,
        first_only: bool = True,
    ) -> list[Fault]:
        """Use up matching faults of one kind (caller holds the lock); returns them."""
        taken: list[Fault] = []
        for slot in self._faults:
            fault: Fault = slot[0]
            if fault.kind != kind or not any(
                fnmatch.fnmatchcase(p, fault.path_glob) for p in paths
            ):
                continue
            if pred is not None and not pred(fault):
                continue
            taken.append(fault)
            if slot[1] is not None:
                slot[1] -= 1
            if first_only:
                break
        self._faults = [s for s in self._faults if s[1] is None or s[1] > 0]
        return taken

    def plan(
        self, paths: Iterable[str], *, size: int, start: int, end: int, ranged: bool
    ) -> tuple[FaultPlan, int, int]:
        """Decide the faults for a body covering file bytes [start, end) of `size`.

        Returns the plan and the (possibly widened, by ignore_range) byte span.
        """
        paths = list(paths)
        with self._lock:
            status = self._take("status", paths)
            if status:
                return FaultPlan(status=status[0]), start, end
            ignore = ranged and bool(self._take("ignore_range", paths))
            bad_range = ranged and not ignore and bool(self._take("bad_content_range", paths))
            if ignore:
                start, end = 0, size
            length = end - start
            corrupt = self._take(
                "corrupt", paths, lambda f: start <= f.offset < end, first_only=False
            )
            stall = self._take("stall", paths, lambda f: f.after_bytes < length)
            drop = self._take("drop_after", paths, lambda f: f.after_bytes < length)
            delay = self._take("delay", paths)
        return (
            FaultPlan(
                ignore_range=ignore,
                bad_content_range=bad_range,
                corrupt_offsets=frozenset(f.offset for f in corrupt),
                stall_at=stall[0].after_bytes if stall else None,
                stall_seconds=stall[0].stall_seconds if stall else 0.0,
                drop_at=drop[0].after_bytes if drop else None,
                delay=delay[0].stall_seconds if delay else 0.0,
            ),
            start,
            end,
        )


@dataclass(frozen=True)
class MirrorStats:
    """A snapshot of the counters. Bytes are body bytes actually handed to the socket."""

    total_bytes: int = 0
    blob_bytes: int = 0  # file bodies: resolve GET and CDN GET
    meta_bytes: int = 0  # everything else: /api JSON, error bodies
    requests: int = 0
    per_client: dict[str, int] = field(default_factory=dict)  # remote IP -> bytes
    per_path: dict[str, int] = field(default_factory=dict)  # URL path (decoded) -> bytes
    # Addition: file bytes by ``{url_prefix}{repo_id}/{path}`` whichever URL served them
    # (resolve or CDN), so a test can ask "how much of shard 2 came from the mirror".
    per_file: dict[str, int] = field(default_factory=dict)
    # GETs of a file body by the same key (each Range request is one): what a client
    # costs a mirror that charges per request.
    gets_per_file: dict[str, int] = field(default_factory=dict)
    cdn_authorization_seen: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MirrorStats:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class StatsRecorder:
    """Mutable counters behind a lock; `snapshot()` hands out frozen copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._blob = 0
        self._meta = 0
        self._requests = 0
        self._cdn_auth = 0
        self._per_client: dict[str, int] = {}
        self._per_path: dict[str, int] = {}
        self._per_file: dict[str, int] = {}
        self._gets: dict[str, int] = {}

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def request(self, *, cdn_with_authorization: bool = False) -> None:
        with self._lock:
            self._requests += 1
            self._cdn_auth += cdn_with_authorization

    def file_get(self, file_key: str) -> None:
        with self._lock:
            self._gets[file_key] = self._gets.get(file_key, 0) + 1

    def body(self, client: str, path: str, n: int, *, file_key: str | None = None) -> None:
        if n <= 0:
            return
        with self._lock:
            if file_key is None:
                self._meta += n
            else:
                self._blob += n
                self._per_file[file_key] = self._per_file.get(file_key, 0) + n
            self._per_client[client] = self._per_client.get(client, 0) + n
            self._per_path[path] = self._per_path.get(path, 0) + n

    def snapshot(self) -> MirrorStats:
        with self._lock:
            return MirrorStats(
                total_bytes=self._blob + self._meta,
                blob_bytes=self._blob,
                meta_bytes=self._meta,
                requests=self._requests,
                per_client=dict(self._per_client),
                per_path=dict(self._per_path),
                per_file=dict(self._per_file),
                gets_per_file=dict(self._gets),
                cdn_authorization_seen=self._cdn_auth,
            )


class RateCap:
    """The per-connection body rate limit; read on every chunk so changes apply at once."""

    def __init__(self, bytes_per_sec: int | None) -> None:
        self._lock = threading.Lock()
        self._value: int | None = None
        self.set(bytes_per_sec)

    def set(self, bytes_per_sec: int | None) -> None:
        if bytes_per_sec is not None and bytes_per_sec <= 0:
            raise ConfigError("rate cap must be a positive number of bytes per second, or None")
        with self._lock:
            self._value = bytes_per_sec

    def get(self) -> int | None:
        with self._lock:
            return self._value


class ClientRate:
    """The per-client body rate limit: one token bucket per remote IP, shared by every
    connection of that client (public mirrors cap each client, so opening more
    connections does not buy more bandwidth).

    `reserve` takes `n` bytes from the client's bucket at time `now` and says how long
    to wait before sending them. The bucket may go into debt: a reservation that finds
    it empty waits until its bytes have been paid for, and later reservations queue
    behind it, so parallel connections share the rate in the order they asked. `now`
    is passed in (the event loop's clock in the server; a fake clock in tests).
    Thread-safe, like the rest of the control state.
    """

    MAX_IDLE_BUCKETS = 1024

    def __init__(self, bytes_per_sec: int | None, burst: int | None = None) -> None:
        self._lock = threading.Lock()
        self._rate: int | None = None
        self._burst = 0
        self._buckets: dict[str, list[float]] = {}  # client -> [tokens, last update]
        self._charged: dict[str, int] = {}
        self.set(bytes_per_sec, burst)

    def set(self, bytes_per_sec: int | None, burst: int | None = None) -> None:
        """A new rate (None: no cap); buckets and accounting start over. `burst`
        (bytes a fresh or idle client may send at once) defaults to 1/10 s worth,
        at least 16 KiB."""
        if bytes_per_sec is not None and bytes_per_sec <= 0:
            raise ConfigError("client rate must be a positive number of bytes per second, or None")
        if burst is not None and burst <= 0:
            raise ConfigError("client rate burst must be a positive number of bytes")
        with self._lock:
            self._rate = bytes_per_sec
            self._burst = burst or max(16 * 1024, (bytes_per_sec or 0) // 10)
            self._buckets.clear()
            self._charged.clear()

    def get(self) -> int | None:
        with self._lock:
            return self._rate

    @property
    def burst(self) -> int:
        with self._lock:
            return self._burst

    def reserve(self, client: str, n: int, now: float) -> float:
        """Charge `n` bytes to `client` at `now`; seconds to wait before sending them."""
        with self._lock:
            rate = self._rate
            if rate is None or n <= 0:
                return 0.0
            bucket = self._buckets.get(client)
            if bucket is None:
                if len(self._buckets) >= self.MAX_IDLE_BUCKETS:
                    self._forget_full(now, rate)
                bucket = self._buckets[client] = [float(self._burst), now]
            tokens, last = bucket
            tokens = min(float(self._burst), tokens + max(0.0, now - last) * rate) - n
            bucket[0], bucket[1] = tokens, max(now, last)
            self._charged[client] = self._charged.get(client, 0) + n
            return -tokens / rate if tokens < 0 else 0.0

    def charged(self) -> dict[str, int]:
        """Bytes charged per client since the rate was last set."""
        with self._lock:
            return dict(self._charged)

    def _forget_full(self, now: float, rate: int) -> None:
        # A bucket that has refilled is the same as no bucket (caller holds the lock).
        full = [
            c for c, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * rate >= self._burst
        ]  # fmt: skip
        for c in full:
            del self._buckets[c]


class Outage:
    """The mirror down for a while (`POST /_mirror/down {"seconds": N}`): every
    connection is closed without an answer, bodies being sent are cut. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0

    def down_for(self, seconds: float) -> None:
        if seconds < 0:
            raise ConfigError("an outage lasts >= 0 seconds")
        with self._lock:
            self._until = time.monotonic() + seconds

    def is_down(self) -> bool:
        with self._lock:
            return time.monotonic() < self._until
