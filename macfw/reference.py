"""The reference computation: what an update computes with every same-result speed-up turned off.

Issue 12 made the update faster without changing what it computes. Each speed-up keeps its
plain form, used while tracing inside :func:`reference_computation`:

* :meth:`macfw.nn.mlp.MLP.prefix` / ``from_prefix``: the state's first-layer product shared across
  the rejection sampler's N candidates and the flow ODE's steps -> the plain ``MLP(concat(...))``;
* LayerNorm's closed-form gradient (:func:`macfw.nn.mlp._layer_norm`) -> autodiff of its forward;
* :func:`macfw.agents.base.vmap_steps` (one vmap over ``H * B``) -> two nested vmaps;
* threefry on the CPU written out (:mod:`macfw._threefry`) -> JAX's rolled loop.

``macfw.bench`` counts FLOPs on the reference (what the method computes) and
``python -m macfw.bench --against-reference`` times the two alternately in one process; the tests
compare their outputs. The switch is read while tracing and lowering, and JAX caches a function's
trace: jit a function made inside the context and call it there first (it compiles there).
"""

from __future__ import annotations

import contextlib

_ACTIVE = [False]


def active() -> bool:
    """Whether code is being traced inside :func:`reference_computation`."""
    return _ACTIVE[0]


@contextlib.contextmanager
def reference_computation(*, rolled_threefry: bool = True):
    """Trace (and compile) inside this to get the reference computation (module docstring).

    ``rolled_threefry=False`` keeps the written-out threefry (the same bits): for counting FLOPs,
    since XLA's cost analysis counts a loop body once and the rolled loop would hide 4 of its 5
    iterations' integer operations.
    """
    from macfw import _threefry

    old, was_unrolled = _ACTIVE[0], _threefry.is_unrolled()
    _ACTIVE[0] = True
    if rolled_threefry:
        _threefry.unroll_threefry_on_cpu(False)
    try:
        yield
    finally:
        _ACTIVE[0] = old
        _threefry.unroll_threefry_on_cpu(was_unrolled)
