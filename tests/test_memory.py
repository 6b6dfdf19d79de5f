"""macfw.memory: freed host memory stays mapped, so a block freed and allocated again is not page-faulted
in again (what XLA's per-dispatch buffer gets). Each case runs in a fresh interpreter: the setting is
process-wide and would change this test process's ``malloc``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from macfw.memory import is_glibc

glibc = pytest.mark.skipif(not is_glibc(), reason="macfw.memory acts on glibc's malloc only")

# allocate a 64 MiB block, touch every page, free it; three times; print the applied flag and each
# round's minor page faults (the first round maps the memory in either way)
_PROBE = r"""
import ctypes, json, resource, sys
from macfw.memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
again = retain_freed_memory() if sys.argv[1] == "retain" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 64 << 20
faults = []
for _ in range(3):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"applied": applied, "again": again, "faults": faults}))
"""


def _probe(mode: str, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "MACFW_RETAIN_MEMORY"}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=e, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_retained_memory_is_not_faulted_in_again():
    plain, kept = _probe("plain"), _probe("retain")
    assert kept["applied"] is True and kept["again"] is True  # idempotent
    # malloc's defaults: the block is an mmap, returned on free, so every round maps it in again, as
    # many pages as the first (ratios of rounds: independent of the page size, 4 KiB or huge pages)
    assert plain["faults"][0] > 0 and min(plain["faults"][1:]) >= plain["faults"][0] // 2, plain
    # retained: the second and third rounds reuse the first one's pages
    assert kept["faults"][0] > 0 and max(kept["faults"][1:]) <= kept["faults"][0] // 50, kept


@glibc
@pytest.mark.parametrize("value", ["0", "off"])
def test_environment_variable_turns_it_off(value):
    r = _probe("retain", MACFW_RETAIN_MEMORY=value)
    assert r["applied"] is False
    assert r["faults"][0] > 0 and min(r["faults"][1:]) >= r["faults"][0] // 2, r
