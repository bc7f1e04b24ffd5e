"""Keep freed memory in a client process for the next training step (glibc's malloc),
instead of handing it back to the kernel and faulting it in again.

Why: glibc serves an allocation above its mmap threshold (128 KiB at start, raised as such
chunks are freed, at most 32 MiB) with a fresh ``mmap``, and trims the free top of its heap
above twice that threshold. A client's local training allocates and frees activations and
gradients of a few MiB every step, so with glibc's defaults much of that memory went back to
the kernel after each step and was faulted in again, page by page, at the next. With the
thresholds fixed below, a client fit of the default scenario (600 samples, ``cnn-small``, 1
torch thread) takes 0.79-0.92 of the time it takes with glibc's defaults, and 850-1,760
minor page faults instead of 21,000-57,000, at the same peak RSS (about 705 MiB):
``python -m benchmarks.process_costs`` (medians of 3 fresh processes each, 10 and 20 fits per
process; how many faults the defaults cause depends on the heap's history), 2026-12-01, this
project's 2-core AMD EPYC machine.
Every runtime trains through :class:`fedsim.engine.client.ClientRuntime`, which calls
:func:`keep_freed_memory` (``runtime.keep_freed_memory: false`` leaves glibc's defaults).

The thresholds: mmap 32 MiB (glibc's own ceiling for its dynamic one: larger blocks are still
mapped and unmapped), heap trim 128 MiB (up to that much free memory stays in the process).
Setting either fixes both, so both are set. Not glibc (musl, macOS, Windows): nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt's parameter numbers (glibc's malloc.h) and the values set
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module docstring);
    True if they were set, False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only (musl has mallopt as a stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    del gnu_get_libc_version
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]
