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
