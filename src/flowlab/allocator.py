"""Keep freed activation memory in the process on glibc, so a training step does not page-fault.

PyTorch's CPU allocator hands every tensor straight to ``malloc``. glibc serves blocks above its
mmap threshold (dynamic, up to 32 MiB) with fresh ``mmap`` calls and gives freed memory at the top
of the heap back to the kernel, so the large activations of every training step are new pages,
each touched for the first time: the profile shows plain copies and fills running at a fraction
of memory bandwidth. Raising the mmap threshold to its maximum and disabling heap trimming makes
glibc reuse the same memory step after step (the process keeps its peak footprint, as a GPU
caching allocator does). The same effect as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
in the environment, applied at run time. A no-op on other C libraries and platforms.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the glibc settings once per process; True if they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
