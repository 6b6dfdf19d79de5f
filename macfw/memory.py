"""Keep freed host memory mapped, so that XLA's per-execution buffers are not page-faulted in again.

On the CPU, every execution of a compiled program allocates its temporary buffer (one block: 43 MB
for MAC's ``cpu-small`` update of 10 gradient steps, from ``Compiled.memory_analysis()``) and frees
it when the dispatch ends. glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MB)
with a fresh ``mmap`` and returns them with ``munmap``, so each dispatch touches new pages: about
11,000 minor page faults per ``cpu-small`` dispatch (``resource.getrusage``), measured at 5-10% of
its wall time on a 2-core VM (issue 12). :func:`retain_freed_memory` tells glibc to serve every
block from its heap and to keep up to 2 GiB of freed heap memory instead of giving it back: after the first dispatch the same pages
are reused (0-70 faults per dispatch), and the numbers computed are the same.

The cost: the process keeps the most host memory it has held (its resident size does not shrink
when arrays are freed), as JAX's GPU allocator keeps device memory. ``python -m macfw.run`` and
``python -m macfw.bench`` call it at start; set ``MACFW_RETAIN_MEMORY=0`` to leave ``malloc`` as
it is. It does nothing where the C library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap kept at the heap's top before the rest is returned (mallopt takes an int)

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` serve large blocks from its heap (``M_MMAP_MAX = 0``) and keep freed heap
    memory up to 2 GiB (``M_TRIM_THRESHOLD``) for the rest of the process (module docstring).

    Idempotent. Returns whether the settings are in force: False where the C library is not glibc,
    where ``MACFW_RETAIN_MEMORY=0`` (or ``false``/``no``/``off``) is set, or where ``mallopt``
    refused a setting. It raises nothing: a process without it only runs slower.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("MACFW_RETAIN_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        _applied = False
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = False
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _applied = False
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied


__all__ = ["retain_freed_memory"]
