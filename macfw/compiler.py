"""XLA compiler options for macfw's compiled training step (issue 12).

On the CPU the training step is compiled with ``xla_cpu_prefer_vector_width = 512``: XLA's CPU
backend otherwise asks LLVM for 256-bit vectors even where the processor has AVX-512, so an
update's elementwise passes and reductions (GELU, LayerNorm's moments, the normal draws, Adam)
get half-width vector code (MAC at ``cpu-small``: 1.03-1.05x per update with the option, both
programs alternated in one process on a 2-core AVX-512 CPU, 2026-12-03). It is the same computation
(the same operations on the same numbers; a reduction's partial sums may be grouped differently, so
results agree to float32 rounding, about 2e-5 relative in MAC's metrics after 10 updates). On a
processor without AVX-512 the option changes nothing.

It is a named speed-up (``"wide_vectors"`` in :data:`macfw.reference.SPEEDUPS`): a step built
inside :func:`macfw.reference.reference_computation` gets XLA's default, which is how
``python -m macfw.bench --against-reference --only wide_vectors`` measures it. A vector width set
in ``XLA_FLAGS`` (``XLA_FLAGS=--xla_cpu_prefer_vector_width=256`` restores XLA's default) takes
precedence, and a jaxlib that does not know the option gets none.
"""

from __future__ import annotations

import functools
import os

VECTOR_WIDTH = "xla_cpu_prefer_vector_width"

#: The options :func:`compiler_options` gives a CPU training step.
CPU_OPTIONS = {VECTOR_WIDTH: 512}


@functools.cache
def _accepted(items: tuple) -> bool:
    """Whether this jaxlib's CPU compiler accepts the options ``items`` (compiles a tiny program once)."""
    import jax
    import jax.numpy as jnp

    try:
        x = jax.device_put(jnp.zeros(16, jnp.float32), jax.devices("cpu")[0])
        jax.jit(lambda v: jnp.tanh(v) + 1.0, compiler_options=dict(items)).lower(x).compile()
        return True
    except Exception:  # an unknown option name (another jaxlib) or a backend without a CPU client
        return False


def compiler_options(platform: str) -> dict | None:
    """The XLA compiler options for a training step on devices of ``platform`` (``"cpu"``, ``"gpu"``,
    ...), for ``jax.jit(..., compiler_options=...)``: :data:`CPU_OPTIONS` on the CPU, else None.

    None also inside :func:`macfw.reference.reference_computation` with ``"wide_vectors"`` off,
    when ``XLA_FLAGS`` sets the vector width itself, and when this jaxlib rejects the option.
    """
    from macfw import reference

    if platform != "cpu" or reference.active("wide_vectors") or VECTOR_WIDTH in os.environ.get("XLA_FLAGS", ""):
        return None
    items = tuple(sorted(CPU_OPTIONS.items()))
    return dict(items) if _accepted(items) else None
