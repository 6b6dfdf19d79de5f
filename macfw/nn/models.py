"""MAC's networks as Equinox modules (paper §4; DESIGN §2.2).

Every module is written for one example and batched with ``jax.vmap``. Each is built from a
:class:`~macfw.spec.Spec` (sizes from the data) plus hyperparameters that Gin binds, and is
registered under its kind so a Gin file can swap it.

Symbols: ``s`` state ``(ob_dim,)``; ``g`` goal ``(goal_dim,)`` (``(0,)`` for single-task);
``A`` flattened action chunk ``(chunk_len * act_dim,)``.
"""

from __future__ import annotations

import abc
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.nn.mlp import MLP
from macfw.registry import register
from macfw.spec import Spec

HIDDEN = (1024, 1024, 1024, 1024)


def _mlp(owner: eqx.Module, in_dim, out_dim, hidden_dims, key, layer_norm=True, **kw) -> MLP:
    """The MLP of network ``owner``; a bad size raises ConfigError naming ``<owner class>.hidden_dims``."""
    return MLP(in_dim, out_dim, hidden_dims, key=key, layer_norm=layer_norm, name=type(owner).__name__, **kw)


# --------------------------------------------------------------------------------------------
# Dynamics
# --------------------------------------------------------------------------------------------
class Dynamics(eqx.Module):
    """Base of the dynamics family: ``f(s_t, A_t) -> s_{t+n}`` (one call jumps ``n`` env steps)."""

    @abc.abstractmethod
    def __call__(self, s: Float[Array, " ob_dim"], A: Float[Array, " chunk_dim"]) -> Float[Array, " ob_dim"]:
        ...

    def loss(self, s, A, s_next, *, key=None) -> tuple[Array, dict]:
        """Mean squared error to the real ``s_{t+n}`` for one example; returns ``(loss, metrics)``."""
        err = jnp.mean((self(s, A) - s_next) ** 2)
        return err, {"dynamics/loss": err}


@register("dynamics")
class ChunkDynamics(Dynamics):
    """Residual action-chunk model ``s_{t+n} = s_t + MLP([s_t, A_t])`` (paper §4.1).

    With ``chunk_len = 1`` this is the classic one-step model.

    Args:
      spec: sizes; input ``ob_dim + chunk_dim``, output ``ob_dim``.
      hidden_dims: MLP hidden sizes (default 4 x 1024).
      layer_norm: LayerNorm after each hidden activation.
      key: PRNG key.
    """

    net: MLP

    def __init__(self, spec: Spec, *, key: PRNGKeyArray, hidden_dims: Sequence[int] = HIDDEN, layer_norm: bool = True,
                 compute_dtype: str | None = None):
        self.net = _mlp(self, spec.ob_dim + spec.chunk_dim, spec.ob_dim, hidden_dims, key, layer_norm, compute_dtype=compute_dtype)

    def __call__(self, s, A):
        return s + self.net(jnp.concatenate([s, A]))


# --------------------------------------------------------------------------------------------
# Scalar heads: critic Q(s, g, A), value V(s, g), success logit c(s, g, A), reward r(s, g, A)
# --------------------------------------------------------------------------------------------
class _Head(eqx.Module):
    net: MLP

    def _out(self, *xs) -> Array:
        return self.net(jnp.concatenate(xs))[0]


class _ChunkHead(_Head):
    """A scalar head on ``(s, g, A)``: inputs ``ob_dim + goal_dim + chunk_dim``, scalar out."""

    def __init__(self, spec: Spec, *, key: PRNGKeyArray, hidden_dims: Sequence[int] = HIDDEN, layer_norm: bool = True,
                 compute_dtype: str | None = None):
        self.net = _mlp(self, spec.ob_dim + spec.goal_dim + spec.chunk_dim, 1, hidden_dims, key, layer_norm, compute_dtype=compute_dtype)

    def __call__(self, s, g, A) -> Float[Array, ""]:
        return self._out(s, g, A)


@register("critic")
class QCritic(_ChunkHead):
    """Chunk critic ``Q(s, g, A) -> R`` (paper §4.2). Inputs ``ob_dim + goal_dim + chunk_dim``; scalar out."""


@register("value")
class StateValue(_Head):
    """State value ``V(s, g) -> R`` fitted to lambda-returns of imagined rollouts (paper §4.2)."""

    def __init__(self, spec: Spec, *, key: PRNGKeyArray, hidden_dims: Sequence[int] = HIDDEN, layer_norm: bool = True,
                 compute_dtype: str | None = None):
        self.net = _mlp(self, spec.ob_dim + spec.goal_dim, 1, hidden_dims, key, layer_norm, compute_dtype=compute_dtype)

    def __call__(self, s, g) -> Float[Array, ""]:
        return self._out(s, g)


@register("success")
class SuccessModel(_ChunkHead):
    """Chunk success logit ``c(s, g, A)``: does the chunk reach the goal (or solve the task)?

    Trained with binary cross-entropy to the chunk success label (DESIGN §2.1).
    """

    def loss(self, s, g, A, label) -> tuple[Array, dict]:
        """BCE for one example; ``label`` in {0, 1}. Returns ``(loss, metrics)``, all scalars."""
        logit = self(s, g, A)
        bce = optax.sigmoid_binary_cross_entropy(logit, label)
        acc = ((logit > 0) == (label > 0.5)).astype(jnp.float32)
        return bce, {"success/loss": bce, "success/accuracy": acc}


@register("reward")
class RewardModel(_ChunkHead):
    """Chunk reward ``r(s, g, A) -> R`` for single-task data (MSE to the chunk reward)."""

    def loss(self, s, g, A, target) -> tuple[Array, dict]:
        err = (self(s, g, A) - target) ** 2
        return err, {"reward/loss": err}
