"""The imagined-rollout engine shared by the model-based agents (MAC, LEQ, MOPO/MOBILE's buffer).

One ``lax.scan`` over model steps: the caller supplies a batched step ``(s, key) -> (s_next, out)``
(pick an action or chunk, predict the next state, label reward and termination) and gets the
visited states and the stacked per-step outputs. Gradients flow through the scan when the step
is differentiable (LEQ's actor loss); MAC wraps it in ``stop_gradient``.

Units: ``horizon`` counts model steps: chunks of ``n`` environment steps for a chunk model
(MAC: H = 10 chunks = 100 environment steps), single environment steps for a one-step model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def imagine(
    step: Callable[[Array, Array], tuple[Array, Any]],
    s0: Float[Array, "B ob_dim"],
    key,
    horizon: int,
    *,
    unroll: bool = False,
) -> tuple[Float[Array, "H1 B ob_dim"], Any]:
    """Roll ``step`` forward ``horizon`` times from ``s0``.

    Args:
      step: ``(s: (B, ob_dim), key) -> (s_next: (B, ob_dim), out)``, ``out`` any pytree of
        ``(B, ...)`` arrays (actions, rewards, masks, ...).
      s0: ``(B, ob_dim)`` start states.
      key: PRNG key, split into one key per step.
      horizon: model steps H (>= 1).
      unroll: unroll the loop in the compiled program (XLA then counts every step's FLOPs and
        may fuse across steps; the program is larger).

    Returns:
      ``states (H + 1, B, ob_dim)`` (``states[0] = s0``) and ``outs``, each leaf ``(H, B, ...)``,
      where ``outs[k]`` is the step from ``states[k]`` to ``states[k + 1]``.
    """

    def body(s, k):
        s_next, out = step(s, k)
        return s_next, (s, out)

    with jax.named_scope("rollout"):  # a phase of macfw.profiling's table
        s_last, (states, outs) = jax.lax.scan(body, s0, jax.random.split(key, horizon), unroll=horizon if unroll else 1)
        return jnp.concatenate([states, s_last[None]], axis=0), outs
