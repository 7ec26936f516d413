"""glibc malloc settings for XLA:CPU: keep freed memory in the process instead of returning it to the OS.

XLA:CPU allocates each step's temporaries afresh (hundreds of MB for a small GPT). glibc serves
large blocks from threads other than the main one with a fresh mmap, and unmaps them on free, so the
kernel page-faults and zeroes every 4 KiB page of them again on every step: measured at ~200k
faults and ~15-20% of the step time on the CPU benchmark. Three mallopt settings make glibc reuse
them instead: one arena (threads' arenas can only mmap blocks this large), no mmap, no trimming.
The cost is that the process keeps its peak heap, which a training process reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import glob
import os

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # from glibc's malloc.h

_done = False


def runs_on_cpu() -> bool:
    """Whether JAX will compute on this host's CPU: JAX_PLATFORMS says so, or no accelerator is
    attached (checked by device files: JAX's own backends must not be touched before this runs)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*"))


def keep_freed_memory(force: bool = False) -> bool:
    """Apply the settings (once, on glibc, on CPU runs or when ``force``); True when they are in effect.

    Must run before JAX starts its thread pools, i.e. before the first JAX computation: a thread
    that already has its own arena keeps it."""
    global _done
    if _done:
        return True
    if not (force or runs_on_cpu()):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False
    ok = mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    _done = bool(ok)
    return _done
