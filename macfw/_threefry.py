"""JAX's threefry random-bit generator lowered without its loop on the CPU (issue 12's profile).

On the CPU backend JAX lowers ``threefry2x32`` (every ``jax.random`` draw with the default key
implementation) as a ``fori_loop`` of 5 iterations of 4 rounds, so each draw becomes an XLA while
loop that copies its ``uint32`` state every iteration. On other backends JAX uses the same hash
written out. MAC's imagined rollout draws ``N x chunk_dim`` normals per state and step; at the
``cpu-small`` sizes the rolled loop was about 14 ms of a 105 ms update (``jax.profiler`` trace),
and the written-out lowering makes the update about 5% faster (measured alternately in one
process). The bits are identical: the same 20 rounds in the same order
(``tests/test_fast_paths.py``), so every key gives the numbers it gave before.

:func:`unroll_threefry_on_cpu` registers JAX's own written-out lowering for the CPU; ``import
macfw`` calls it unless ``MACFW_ROLLED_THREEFRY=1``. It reaches into JAX's private modules, so it
is best effort: where they differ (another JAX version) it changes nothing and returns False.
"""

from __future__ import annotations

import os

ENV = "MACFW_ROLLED_THREEFRY"


def _module():
    from jax._src.random import threefry2x32 as t  # jax 0.10 / 0.11

    return t


_UNROLLED = [False]


def is_unrolled() -> bool:
    """Whether the written-out rule is the CPU's lowering now."""
    return _UNROLLED[0]


def unroll_threefry_on_cpu(unrolled: bool = True) -> bool:
    """Lower ``threefry2x32`` on the CPU with JAX's written-out rule (``unrolled=False``: JAX's default,
    the rolled loop). Affects programs lowered afterwards. Returns whether the rule was registered
    (False where JAX's private modules are not as expected)."""
    try:
        from jax._src.interpreters import mlir

        t = _module()
        rule = t._threefry2x32_lowering_rule if unrolled else t._threefry2x32_cpu_lowering_rule
        mlir.register_lowering(t.threefry2x32_p, rule, platform="cpu")
    except (ImportError, AttributeError, TypeError):
        return False
    _UNROLLED[0] = bool(unrolled)
    return True


def apply_default() -> bool:
    """What ``import macfw`` does: the written-out rule unless the environment says ``MACFW_ROLLED_THREEFRY=1``."""
    if os.environ.get(ENV, "") == "1":
        return False
    return unroll_threefry_on_cpu(True)
