"""Actors of the actor-critic baselines (DESIGN §9): SAC's tanh-Gaussian actor with a learned
temperature (MOPO, MOBILE, n-step SAC+BC) and a deterministic tanh actor (LEQ).

Shapes per example: ``s: (ob_dim,)``, ``g: (goal_dim,)`` (``(0,)`` single-task); an action
``a: (chunk_dim,)``, which is one action ``(act_dim,)`` when the agent's spec has ``chunk_len = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.errors import check_float
from macfw.nn.gaussian import GaussianPolicy
from macfw.nn.mlp import MLP
from macfw.nn.models import HIDDEN
from macfw.registry import register
from macfw.spec import Spec


@register("actor")
class TanhGaussianActor(GaussianPolicy):
    """SAC's actor (Haarnoja et al., 2018): ``a = tanh(mean(s, g) + std(s, g) * eps)``.

    The same network as :class:`~macfw.nn.gaussian.GaussianPolicy` (state-dependent log-std,
    tanh-rescaled into ``[log_std_min, log_std_max]``), registered as an actor so that its Gin
    bindings (``TanhGaussianActor.*``) are separate from a behaviour policy's. The actor loss
    uses :meth:`sample_and_log_prob` (reparameterised); acting uses :meth:`mode` or a sample.

    The log-std is hard-clipped into ``[log_std_min, log_std_max]`` by default
    (``log_std_bound = 'clip'``), as the authors' ``GCActor`` of their SAC agents (MOPO, MOBILE,
    n-step SAC+BC); the behaviour policy's smooth tanh rescaling (``'tanh'``) gave a different
    distribution for the same network: at the initial raw output 0 a std of ``exp(-1.5) = 0.22``
    instead of their 1 (parity, issue 29).
    """

    def __init__(self, spec: Spec, *, key: PRNGKeyArray, log_std_bound: str = "clip", **kwargs):
        super().__init__(spec, key=key, log_std_bound=log_std_bound, **kwargs)


@register("temperature")
class Temperature(eqx.Module):
    """SAC's learned entropy temperature ``alpha = exp(log_alpha)`` (a scalar parameter).

    Loss (the authors'): ``alpha * (sg(H) - target_entropy)`` with ``H = -E[log pi(a|s)]``, so
    ``alpha`` grows while the policy's entropy is below the target and shrinks above it.

    Args:
      spec: unused (sizes come from the agent's target entropy).
      init_alpha: initial ``alpha`` (> 0).
      key: unused (keyword-only for the common constructor).

    Raises:
      ConfigError: ``init_alpha <= 0``.
    """

    log_alpha: Array

    def __init__(self, spec: Spec | None = None, *, key: PRNGKeyArray | None = None, init_alpha: float = 1.0):
        init = check_float("Temperature.init_alpha", init_alpha, low=0.0, low_open=True)
        self.log_alpha = jnp.log(jnp.asarray(init, jnp.float32))

    def __call__(self) -> Float[Array, ""]:
        return jnp.exp(self.log_alpha)

    def loss(self, log_probs: Array, target_entropy: float) -> tuple[Array, dict]:
        """``(alpha * (sg(entropy) - target_entropy), metrics)`` for a batch of actor ``log_probs``."""
        entropy = -jax.lax.stop_gradient(jnp.mean(log_probs))
        alpha = self()
        loss = alpha * (entropy - target_entropy)
        return loss, {"temperature/loss": loss, "temperature/alpha": alpha, "temperature/entropy": entropy}


@register("actor")
class DeterministicActor(eqx.Module):
    """A deterministic actor ``a = tanh(MLP([s, g]))`` in ``(-1, 1)`` (LEQ's actor).

    Args:
      spec: sizes; input ``ob_dim + goal_dim``, output ``chunk_dim``.
      hidden_dims: MLP hidden sizes (default 4 x 1024).
      layer_norm: LayerNorm after each hidden activation.
      key: PRNG key.
    """

    net: MLP

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        compute_dtype: str | None = None,
    ):
        self.net = MLP(
            spec.ob_dim + spec.goal_dim,
            spec.chunk_dim,
            hidden_dims,
            key=key,
            layer_norm=layer_norm,
            compute_dtype=compute_dtype,
            name=type(self).__name__,
        )

    def __call__(self, s, g) -> Float[Array, " chunk_dim"]:
        return jnp.tanh(self.net(jnp.concatenate([s, g])))
