"""glibc's malloc thresholds for a process that runs torch on the CPU.

torch's CPU allocator takes every tensor from ``malloc``. glibc serves a block above its mmap
threshold with a fresh ``mmap``, and returns the top of its heap to the kernel once more than
its trim threshold lies free there (``mallopt(3)``). Both start at 128 KiB and follow the
largest block freed (the trim threshold at twice it), so a forward pass that frees several
activation tensors at once still hands most of them back, and the next batch gets them again
as new zeroed pages: one minor page fault per 4 KiB, every batch. A Serve replica of the
quickstart's SmallCNN took about 1,100 faults a batch of 32, and its forward cost a fifth more
CPU than with the heap kept (``bench/serve_load.py`` counts both). Fixed thresholds keep that
memory in the heap for the next batch, at the price of holding up to the trim threshold of
freed memory.
"""

from __future__ import annotations

import ctypes
import platform
import resource
import sys

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)


def keep_freed_heap(mb: int) -> bool:
    """Keep up to ``mb`` MiB of freed memory in the heap, and serve blocks up to half of it
    (at most 32 MiB) from the heap rather than from ``mmap``; ``mb`` = 0 leaves glibc's
    defaults. Process-wide and once (the thresholds stay fixed after it). Whether they were
    set: not on a C library other than glibc (macOS, musl), where it does nothing."""
    if mb <= 0 or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    trim = mb << 20
    return (libc.mallopt(M_MMAP_THRESHOLD, min(trim // 2, MMAP_THRESHOLD_MAX)) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1)


def minor_faults() -> int:
    """This thread's minor page faults so far (Linux; the process's elsewhere)."""
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return resource.getrusage(who).ru_minflt
