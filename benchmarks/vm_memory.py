"""A probe: keep freed memory with this VM during a benchmark (docs/benchmarks.md 8.23,
8.30). Opt-in; it did NOT make the fresh-page cost stable on the VM it was written on.

This VM's balloon reports free memory to the host (free page reporting): memory freed in
the guest is handed back a few seconds later, and the next write into it faults on the
host, inside the writer's copy. A 1 GiB file written into such memory cost its writer
0.2-2.4 CPU s depending on when memory was last freed, so a trial's CPU depended on what
ran before it.

`hold_freed_memory` (opt-in, root, machine-wide) sets the kernel's
``page_reporting.min_free_ms`` (a parameter of this VM's kernel: a page is reported only
after it has been free that long) for the benchmark's duration and restores the old
value on exit; `prefault` touches and frees memory before a trial, so that its writes
would land on memory the guest holds. Reporting did stop (``reported_kib`` stayed put),
but on a quiet machine a 1 GiB write into memory freed 6 s before still cost 0.5-3.0
CPU s with both (8.30): the host takes freed memory back some other way. Kept to re-test
on another VM.

`MachinePrep` (docs/benchmarks.md 8.37) prepares the machine per trial instead, by one of
these steps or several (``touch+order``): ``touch`` touches and frees twice the blob's
size of anonymous memory right before the trial's download, so that the pages the
download's page-cache writes get are ones the guest holds; ``order`` sets free page
reporting's ``page_reporting_order`` to the largest order (10: only free 4 MiB blocks are
handed back) for the trials that use it, and restores the old value at the end (root,
machine-wide); ``compact`` drops the page cache and compacts memory before the trial
(root, machine-wide: it empties every session's page cache).
"""

from __future__ import annotations

import mmap
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIN_FREE_MS = Path("/sys/module/page_reporting/parameters/min_free_ms")
HOLD_MS = 300_000  # the largest value this kernel took (600000 was refused)


@contextmanager
def hold_freed_memory(enabled: bool, ms: int = HOLD_MS) -> Iterator[None]:
    """While in the block, free memory is reported to the host only after ``ms``
    milliseconds free (machine-wide); the old value is written back on exit, also on
    SIGTERM. A no-op when not ``enabled``."""
    if not enabled:
        yield
        return
    try:
        old = MIN_FREE_MS.read_text().strip()
        MIN_FREE_MS.write_text(f"{ms}\n")
    except OSError as e:
        raise SystemExit(
            f"--hold-freed-memory: cannot set {MIN_FREE_MS} ({e.strerror}); it needs root"
            " and a kernel with free page reporting's min_free_ms: run without the flag"
        ) from None
    print(f"  {MIN_FREE_MS} = {ms} (was {old}; restored on exit)", file=sys.stderr, flush=True)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        MIN_FREE_MS.write_text(f"{old}\n")
        signal.signal(signal.SIGTERM, previous)


ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
MAX_ORDER = 10  # MAX_PAGE_ORDER of x86-64: the kernel refuses more
STEPS = ("touch", "order", "compact")


def parse_prep(spec: str) -> frozenset[str]:
    """``none``, or steps joined by ``+`` (``touch+order``)."""
    steps = frozenset() if spec == "none" else frozenset(spec.split("+"))
    if not steps <= set(STEPS):
        raise SystemExit(f"--prepare {spec!r}: none, or {' / '.join(STEPS)} joined by +")
    return steps


class MachinePrep:
    """Prepares the machine before each trial by its variant's steps (see the module's
    docstring); a context manager: whatever it changed machine-wide is written back on
    exit, also on SIGTERM. Say what it does with `describe`."""

    def __init__(self, variants: list[frozenset[str]], blob_size: int) -> None:
        self.variants, self.blob_size = variants, blob_size
        self.old_order: str | None = None

    def __enter__(self) -> MachinePrep:
        if any("order" in v for v in self.variants):
            try:
                self.old_order = ORDER.read_text().strip()
                ORDER.write_text(f"{self.old_order}\n")  # writable? (root)
            except OSError as e:
                raise SystemExit(
                    f"--prepare order: cannot write {ORDER} ({e.strerror}); it needs root and"
                    " a kernel with free page reporting"
                ) from None
            self.previous = signal.getsignal(signal.SIGTERM)

            def on_term(signum: int, frame: object) -> None:
                raise SystemExit(128 + signum)  # unwinds through __exit__

            signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.old_order is not None:
            ORDER.write_text(f"{self.old_order}\n")
            signal.signal(signal.SIGTERM, self.previous)

    def describe(self) -> list[str]:
        out = []
        for v in self.variants:
            if not v:
                out.append("none: the machine as it is")
                continue
            what = []
            if "compact" in v:
                what.append("page cache dropped and memory compacted before each trial (root)")
            if "order" in v:
                what.append(
                    f"{ORDER} = {MAX_ORDER} during each trial (was {self.old_order}; restored"
                    " at the end; root)"
                )
            if "touch" in v:
                what.append(
                    f"{2 * self.blob_size / (1 << 30):.2f} GiB of memory touched and freed"
                    " right before each download"
                )
            out.append(f"{'+'.join(sorted(v))}: " + "; ".join(what))
        return out

    def before_trial(self, variant: frozenset[str], keep: Path | None = None) -> None:
        """Before a trial's processes start: the reporting order, drop and compact (then
        ``keep``, the seeder's blob, is read back into the page cache: the seeder serves
        from it in every trial)."""
        if self.old_order is not None:
            ORDER.write_text(f"{MAX_ORDER if 'order' in variant else self.old_order}\n")
        if "compact" in variant:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            Path("/proc/sys/vm/compact_memory").write_text("1\n")
            if keep is not None:
                with open(keep, "rb", buffering=0) as f:
                    buf = bytearray(8 << 20)
                    while f.readinto(buf):
                        pass

    def before_download(self, variant: frozenset[str]) -> None:
        """Right before the trial's download starts."""
        if "touch" in variant:
            prefault(2 * self.blob_size)


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of anonymous memory page by page, then free it: with reporting
    held, the next ``nbytes`` the kernel hands out are pages the guest holds."""
    if nbytes <= 0:
        return
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        page = mmap.PAGESIZE
        for off in range(0, nbytes, page):
            m[off] = 1
    finally:
        m.close()
