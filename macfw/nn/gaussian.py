"""Gaussian behaviour-cloning action-chunk policy: the sampler of the MAC-Gau ablation (DESIGN §2.7).

MAC-Gau replaces the flow-matching behaviour policy by a tanh-squashed Gaussian fitted by maximum
likelihood to the dataset chunks; candidates are still picked by rejection sampling against ``Q``
(``MAC.policy = @GaussianPolicy``, same :class:`~macfw.samplers.RejectionSampler`).

Shapes per example: ``s: (ob_dim,)``, ``g: (goal_dim,)``, ``A: (chunk_dim,)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.errors import check_choice, check_float
from macfw.nn.flow import BehaviorPolicy
from macfw.nn.mlp import MLP
from macfw.nn.models import HIDDEN
from macfw.registry import register
from macfw.spec import Spec

#: Dataset chunks are clipped to ``(-1 + TARGET_EPS, 1 - TARGET_EPS)`` before ``atanh``.
TARGET_EPS = 1e-5
_LOG_2PI = math.log(2.0 * math.pi)


#: How :class:`GaussianPolicy` bounds its log standard deviation.
LOG_STD_BOUNDS = ("tanh", "clip")


def squashed_sample(mean: Array, log_std: Array, eps: Array) -> tuple[Array, Array]:
    """A reparameterised tanh-Gaussian sample from given noise and its log-density.

    ``A = tanh(u)``, ``u = mean + exp(log_std) * eps``; ``log p(A) = sum_i [log N(u_i; mean_i, std_i)
    - log(1 - tanh(u_i)^2)]`` with ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))`` (stable where
    ``|A|`` is near 1; distrax's ``Tanh`` bijector). Elementwise over leading axes, summed over the
    last: ``mean, log_std, eps: (..., d)`` -> ``A: (..., d)``, ``log p: (...)``. The noise is an
    argument so that a caller may draw it for a whole batch at once.
    """
    u = mean + jnp.exp(log_std) * eps
    gauss = -0.5 * eps**2 - log_std - 0.5 * _LOG_2PI
    log_det = 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.tanh(u), jnp.sum(gauss - log_det, axis=-1)


@register("policy")
class GaussianPolicy(BehaviorPolicy):
    """Tanh-squashed Gaussian over action chunks, ``A = tanh(mean(s, g) + std(s, g) * eps)``.

    One MLP maps ``[s, g]`` to the mean and the log standard deviation of the pre-squash Gaussian
    (``2 * chunk_dim`` outputs; a diagonal, state-dependent standard deviation). The network's raw
    log-std output ``l`` is rescaled smoothly into ``[log_std_min, log_std_max]``::

        log_std = log_std_min + (log_std_max - log_std_min) * (tanh(l) + 1) / 2

    (the usual SAC-family bound; ``log_std_bound = 'tanh'``). A hard clip would give zero gradient at
    the bound, so once the log-std sat on ``log_std_min`` a small error of the mean gave a huge NLL
    that the std could no longer absorb; the tanh rescaling keeps a gradient everywhere.
    ``log_std_bound = 'clip'`` is the authors' ``GCActor`` (``clip(l, log_std_min, log_std_max)``),
    the default of :class:`~macfw.nn.actors.TanhGaussianActor`. The loss is the negative log-likelihood of the
    dataset chunk under the squashed distribution, with the tanh Jacobian correction::

        u = atanh(clip(A, -1 + 1e-5, 1 - 1e-5))
        log p(A) = sum_i [ log N(u_i; mean_i, std_i) - log(1 - A_i^2) ]

    Args:
      spec: sizes; input ``ob_dim + goal_dim``, output ``2 * chunk_dim``.
      hidden_dims: MLP hidden sizes (default 4 x 1024).
      layer_norm: LayerNorm after each hidden activation.
      log_std_min, log_std_max: range of the log standard deviation (natural log), reached smoothly.
      state_dependent_std: learn ``log std(s, g)`` (True) or one state-independent vector.
      log_std_bound: ``'tanh'`` (smooth rescaling, above) or ``'clip'`` (hard clip, the authors' SAC actors).
      final_init_scale: variance scale of the last layer's initial weights (SAC actors: 0.01, so the initial
        mean is near 0 and the initial log-std near the middle of its range).
      key: PRNG key.

    Raises:
      ConfigError: ``log_std_min >= log_std_max``, an unknown ``log_std_bound`` or bad ``hidden_dims``.
    """

    net: MLP
    log_std_param: Array | None
    chunk_dim: int = eqx.field(static=True)
    log_std_min: float = eqx.field(static=True)
    log_std_max: float = eqx.field(static=True)
    log_std_bound: str = eqx.field(static=True)

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        log_std_min: float = -5.0,
        log_std_max: float = 2.0,
        state_dependent_std: bool = True,
        final_init_scale: float = 1.0,
        compute_dtype: str | None = None,
        log_std_bound: str = "tanh",
    ):
        name = type(self).__name__
        self.log_std_bound = check_choice(f"{name}.log_std_bound", log_std_bound, LOG_STD_BOUNDS)
        self.log_std_max = check_float("GaussianPolicy.log_std_max", log_std_max)
        self.log_std_min = check_float(
            "GaussianPolicy.log_std_min",
            log_std_min,
            high=self.log_std_max,
            high_open=True,
            note=f"GaussianPolicy.log_std_max = {self.log_std_max}",
        )
        out = 2 * spec.chunk_dim if state_dependent_std else spec.chunk_dim
        self.net = MLP(
            spec.ob_dim + spec.goal_dim,
            out,
            hidden_dims,
            key=key,
            layer_norm=layer_norm,
            final_init_scale=final_init_scale,
            compute_dtype=compute_dtype,
            name=type(self).__name__,
        )
        self.log_std_param = None if state_dependent_std else jnp.zeros((spec.chunk_dim,), jnp.float32)
        self.chunk_dim = spec.chunk_dim

    def mean_log_std(self, s, g) -> tuple[Float[Array, " chunk_dim"], Float[Array, " chunk_dim"]]:
        """Mean and log-std (tanh-rescaled or clipped into ``[log_std_min, log_std_max]``, as
        ``log_std_bound`` says) of the pre-squash Gaussian, each ``(chunk_dim,)``."""
        out = self.net(jnp.concatenate([s, g]))
        if self.log_std_param is None:
            mean, log_std = out[: self.chunk_dim], out[self.chunk_dim :]
        else:
            mean, log_std = out, self.log_std_param
        if self.log_std_bound == "clip":
            return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)
        half = 0.5 * (self.log_std_max - self.log_std_min)
        return mean, self.log_std_min + half * (jnp.tanh(log_std) + 1.0)

    def log_prob(self, s, g, A) -> Float[Array, ""]:
        """Log-density of the chunk ``A: (chunk_dim,)`` under the squashed Gaussian (summed over dims)."""
        mean, log_std = self.mean_log_std(s, g)
        A = jnp.clip(A, -1.0 + TARGET_EPS, 1.0 - TARGET_EPS)
        u = jnp.arctanh(A)
        z = (u - mean) * jnp.exp(-log_std)
        gauss = -0.5 * z**2 - log_std - 0.5 * _LOG_2PI
        log_det = jnp.log1p(-(A**2))  # log |dA/du| = log(1 - tanh(u)^2)
        return jnp.sum(gauss - log_det)

    def sample(self, s, g, *, key):
        return self.sample_many(s, g, 1, key=key)[0]

    def sample_many(self, s, g, num, *, key):
        """``num`` chunks sharing one evaluation of the mean and std network: ``(num, chunk_dim)``."""
        mean, log_std = self.mean_log_std(s, g)
        eps = jax.random.normal(key, (num, *mean.shape), mean.dtype)
        return jnp.tanh(mean + jnp.exp(log_std) * eps)

    def sample_and_log_prob(self, s, g, *, key) -> tuple[Float[Array, " chunk_dim"], Float[Array, ""]]:
        """A reparameterised sample ``A = tanh(mean + std * eps)`` and its log-density (SAC's actor).

        The tanh correction uses ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))``, stable
        where ``|A|`` is near 1. Returns ``A: (chunk_dim,)`` and ``log p(A)`` (scalar).
        """
        mean, log_std = self.mean_log_std(s, g)
        return squashed_sample(mean, log_std, jax.random.normal(key, mean.shape, mean.dtype))

    def mode(self, s, g) -> Float[Array, " chunk_dim"]:
        """``tanh(mean)``: the deterministic chunk."""
        return jnp.tanh(self.mean_log_std(s, g)[0])

    def loss(self, s, g, A, *, key=None):
        nll = -self.log_prob(s, g, A)
        _, log_std = self.mean_log_std(s, g)
        return nll, {
            "policy/loss": nll,
            "policy/nll_per_dim": nll / self.chunk_dim,
            "policy/std_mean": jnp.mean(jnp.exp(log_std)),
        }
