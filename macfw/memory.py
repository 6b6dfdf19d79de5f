"""Keep freed host memory mapped, so that XLA's per-execution buffers are not page-faulted in again.

On the CPU, every execution of a compiled program allocates its temporary buffer (one block: 43 MB
for MAC's ``cpu-small`` update of 10 gradient steps, from ``Compiled.memory_analysis()``) and frees
it when the dispatch ends. glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MB)
with a fresh ``mmap`` and returns them with ``munmap``, so each dispatch touches new pages: about
10,900 minor page faults and 43-48 ms of system time per ``cpu-small`` dispatch of about 850 ms
(``resource.getrusage``, a 2-core VM, issue 12). :func:`retain_freed_memory` tells glibc to serve
every block from its heap and to keep up to 2 GiB of freed heap memory instead of giving it back:
after the first dispatch the same pages are reused (0 faults, 16-20 ms of system time per
dispatch; about 3% less wall time over six alternated process pairs), and the numbers computed
are the same.

The cost: the process keeps the most host memory it has held (its resident size does not shrink
when arrays are freed, up to 2 GiB of free heap), as JAX's GPU allocator keeps device memory.
``python -m macfw.run`` and ``python -m macfw.bench`` call it at start; set
``MACFW_RETAIN_MEMORY=0`` to leave ``malloc`` as it is. It does nothing where the C library is not
glibc (:func:`is_glibc`; macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# bytes of free heap kept at the heap's top before the rest is returned (mallopt takes an int)
_TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def is_glibc() -> bool:
    """Whether this process runs on Linux with glibc (the ``malloc`` that :func:`retain_freed_memory` tunes)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` serve large blocks from its heap (``M_MMAP_MAX = 0``) and keep freed heap
    memory up to 2 GiB (``M_TRIM_THRESHOLD``) for the rest of the process (module docstring).

    Idempotent. Returns whether the settings are in force: False where the C library is not glibc,
    where ``MACFW_RETAIN_MEMORY=0`` (or ``false``/``no``/``off``) is set, or where ``mallopt``
    refused a setting. It raises nothing: a process without it only runs slower.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("MACFW_RETAIN_MEMORY", "1").strip().lower() in ("0", "false", "no", "off") or not is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


__all__ = ["is_glibc", "retain_freed_memory"]
