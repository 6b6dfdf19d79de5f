"""MAC's networks as Equinox modules (paper §4; DESIGN §2.2).

Every module is written for one example and batched with ``jax.vmap``. Each is built from a
:class:`~macfw.spec.Spec` (sizes from the data) plus hyperparameters that Gin binds, and is
registered under its kind so a Gin file can swap it.

Symbols: ``s`` state ``(ob_dim,)``; ``g`` goal ``(goal_dim,)`` (``(0,)`` for single-task);
``A`` flattened action chunk ``(chunk_len * act_dim,)``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.errors import check_float
from macfw.nn.mlp import MLP, joint_first_layer
from macfw.registry import register
from macfw.spec import Spec

HIDDEN = (1024, 1024, 1024, 1024)
_LOG_2PI = math.log(2.0 * math.pi)


def _mlp(owner: eqx.Module, in_dim, out_dim, hidden_dims, key, layer_norm=True, **kw) -> MLP:
    """The MLP of network ``owner``; a bad size raises ConfigError naming ``<owner class>.hidden_dims``."""
    return MLP(in_dim, out_dim, hidden_dims, key=key, layer_norm=layer_norm, name=type(owner).__name__, **kw)


# --------------------------------------------------------------------------------------------
# Dynamics
# --------------------------------------------------------------------------------------------
class Dynamics(eqx.Module):
    """Base of the dynamics family: ``f(s_t, A_t) -> s_{t+n}`` (one call jumps ``n`` env steps)."""

    @abc.abstractmethod
    def __call__(self, s: Float[Array, " ob_dim"], A: Float[Array, " chunk_dim"]) -> Float[Array, " ob_dim"]: ...

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
    mlp_input_blocks = ("s", "A")  # the MLP's input, concatenated (see evaluate_jointly)

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        compute_dtype: str | None = None,
    ):
        self.net = _mlp(
            self, spec.ob_dim + spec.chunk_dim, spec.ob_dim, hidden_dims, key, layer_norm, compute_dtype=compute_dtype
        )

    def from_mlp_output(self, s, out) -> Float[Array, " ob_dim"]:
        """``s + out``: the next state from the MLP's output ``(ob_dim,)``."""
        return s + out

    def __call__(self, s, A):
        return self.from_mlp_output(s, self.net(_blocks(self.mlp_input_blocks, s, None, A)))


@register("dynamics")
class GaussianDynamics(Dynamics):
    """Gaussian state-change model ``s' ~ N(s + mu(s, A), diag(sigma(s, A)^2))`` (MOPO/MBPO; DESIGN §9).

    One MLP maps ``[s, A]`` to the mean change and a raw log-std ``l``; the log-std is squashed
    smoothly into ``[log_std_min, log_std_max]`` with a sigmoid,
    ``log sigma = log_std_min + (log_std_max - log_std_min) * sigmoid(l)`` (the authors' [-5, 1]).
    Trained by the negative log-likelihood of the real ``s'`` (summed over dimensions). With
    ``chunk_len = 1`` it is the classic one-step model; with ``n > 1`` an action-chunk model.
    Use several in an :class:`~macfw.nn.ensemble.Ensemble`.

    Args:
      spec: sizes; input ``ob_dim + chunk_dim``, output ``2 * ob_dim``.
      hidden_dims: MLP hidden sizes (default 4 x 1024).
      layer_norm: LayerNorm after each hidden activation.
      log_std_min, log_std_max: range of ``log sigma`` (natural log).
      key: PRNG key.

    Raises:
      ConfigError: ``log_std_min >= log_std_max`` or bad ``hidden_dims``.
    """

    net: MLP
    ob_dim: int = eqx.field(static=True)
    log_std_min: float = eqx.field(static=True)
    log_std_max: float = eqx.field(static=True)

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        log_std_min: float = -5.0,
        log_std_max: float = 1.0,
        compute_dtype: str | None = None,
    ):
        self.log_std_max = check_float("GaussianDynamics.log_std_max", log_std_max)
        self.log_std_min = check_float(
            "GaussianDynamics.log_std_min",
            log_std_min,
            high=self.log_std_max,
            high_open=True,
            note=f"GaussianDynamics.log_std_max = {self.log_std_max}",
        )
        self.net = _mlp(
            self,
            spec.ob_dim + spec.chunk_dim,
            2 * spec.ob_dim,
            hidden_dims,
            key,
            layer_norm,
            compute_dtype=compute_dtype,
        )
        self.ob_dim = spec.ob_dim

    def mean_log_std(self, s, A) -> tuple[Float[Array, " ob_dim"], Float[Array, " ob_dim"]]:
        """Mean ``s + mu(s, A)`` and ``log sigma(s, A)`` of the next state, each ``(ob_dim,)``."""
        out = self.net(jnp.concatenate([s, A]))
        raw = out[self.ob_dim :]
        log_std = self.log_std_min + (self.log_std_max - self.log_std_min) * jax.nn.sigmoid(raw)
        return s + out[: self.ob_dim], log_std

    def __call__(self, s, A):
        """The mean next state ``(ob_dim,)``."""
        return self.mean_log_std(s, A)[0]

    def sample(self, s, A, *, key: PRNGKeyArray) -> Float[Array, " ob_dim"]:
        """A next state drawn from the Gaussian: ``(ob_dim,)``."""
        mean, log_std = self.mean_log_std(s, A)
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)

    def log_prob(self, s, A, s_next) -> Float[Array, ""]:
        """``log N(s_next; mean, sigma^2)`` summed over the ``ob_dim`` dimensions."""
        mean, log_std = self.mean_log_std(s, A)
        z = (s_next - mean) * jnp.exp(-log_std)
        return jnp.sum(-0.5 * z**2 - log_std - 0.5 * _LOG_2PI)

    def loss(self, s, A, s_next, *, key=None) -> tuple[Array, dict]:
        """Negative log-likelihood of the real next state for one example; ``(loss, metrics)``."""
        mean, log_std = self.mean_log_std(s, A)
        z = (s_next - mean) * jnp.exp(-log_std)
        nll = -jnp.sum(-0.5 * z**2 - log_std - 0.5 * _LOG_2PI)
        return nll, {
            "dynamics/loss": nll,
            "dynamics/mse": jnp.mean((mean - s_next) ** 2),
            "dynamics/std_mean": jnp.mean(jnp.exp(log_std)),
        }


# --------------------------------------------------------------------------------------------
# Scalar heads: critic Q(s, g, A), value V(s, g), success logit c(s, g, A), reward r(s, g, A)
# --------------------------------------------------------------------------------------------
def _blocks(names, s, g, A) -> Float[Array, " in_dim"]:
    """``concatenate`` of the named blocks of ``s: (ob_dim,)``, ``g: (goal_dim,)``, ``A: (chunk_dim,)``."""
    parts = {"s": s, "g": g, "A": A}
    return jnp.concatenate([parts[n] for n in names])


class _Head(eqx.Module):
    net: MLP

    def _out(self, *xs) -> Array:
        return self.net(jnp.concatenate(xs))[0]


class _ChunkHead(_Head):
    """A scalar head on ``(s, g, A)``: inputs ``ob_dim + goal_dim + chunk_dim``, scalar out."""

    mlp_input_blocks = ("s", "g", "A")  # the MLP's input, concatenated (see evaluate_jointly)

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        compute_dtype: str | None = None,
    ):
        self.net = _mlp(
            self,
            spec.ob_dim + spec.goal_dim + spec.chunk_dim,
            1,
            hidden_dims,
            key,
            layer_norm,
            compute_dtype=compute_dtype,
        )

    def from_mlp_output(self, s, out) -> Float[Array, ""]:
        """The scalar from the MLP's output ``(1,)``."""
        return out[0]

    def __call__(self, s, g, A) -> Float[Array, ""]:
        return self.from_mlp_output(s, self.net(_blocks(self.mlp_input_blocks, s, g, A)))

    def many(self, s, g, As: Float[Array, "num chunk_dim"]) -> Float[Array, " num"]:
        """The head on ``num`` chunks for one ``(s, g)``: ``(num,)``, equal to ``vmap(lambda A: self(s, g, A))(As)``
        up to float rounding, with the first layer's product of ``[s, g]`` computed once
        (:meth:`~macfw.nn.mlp.MLP.prefix`; the rejection sampler's N candidates, paper §4.2)."""
        pre = self.net.prefix(jnp.concatenate([s, g]))
        return jax.vmap(lambda A: self.net.from_prefix(pre, A)[0])(As)


@register("critic")
class QCritic(_ChunkHead):
    """Chunk critic ``Q(s, g, A) -> R`` (paper §4.2). Inputs ``ob_dim + goal_dim + chunk_dim``; scalar out."""


@register("value")
class StateValue(_Head):
    """State value ``V(s, g) -> R`` fitted to lambda-returns of imagined rollouts (paper §4.2)."""

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        compute_dtype: str | None = None,
    ):
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
        return bce, {"success/loss": bce, "success/accuracy": acc, "success/prob": jax.nn.sigmoid(logit)}


@register("reward")
class RewardModel(_ChunkHead):
    """Chunk reward ``r(s, g, A) -> R`` for single-task data (MSE to the chunk reward)."""

    def loss(self, s, g, A, target) -> tuple[Array, dict]:
        """Squared error for one example; metrics ``reward/loss`` and ``reward/pred`` (the prediction)."""
        pred = self(s, g, A)
        err = (pred - target) ** 2
        return err, {"reward/loss": err, "reward/pred": pred}


def success_metrics(prob: Float[Array, " B"], label: Float[Array, " B"]) -> dict[str, Array]:
    """The success head's diagnostics on a batch, as the authors log them (their ``success_loss``
    info; ``prob = sigmoid(c(s, g, A))``, ``label`` in {0, 1}): ``success/prob_max``, ``prob_min``,
    ``accuracy_0.7``, ``accuracy_0.9`` (``prob > 0.7`` or ``> 0.9`` against ``label > 0.5``),
    ``pos_accuracy`` (``prob > 0.5`` among positive labels), ``neg_accuracy`` (``prob < 0.5`` among
    negative labels) and ``label_mean``. The mean ``success/prob`` and ``success/accuracy`` (at 0.5)
    come from :meth:`SuccessModel.loss`. Where a batch has no positive (or no negative) label the
    authors' ratio is 0/0 = NaN; here it is 0 (a training step must not log NaN: the loop stops on
    non-finite metrics)."""
    pos, neg = label > 0.5, label < 0.5
    frac = lambda hit, among: jnp.sum(hit & among) / jnp.maximum(jnp.sum(among), 1)  # noqa: E731
    return {
        "success/prob_max": jnp.max(prob),
        "success/prob_min": jnp.min(prob),
        "success/accuracy_0.7": jnp.mean((prob > 0.7) == pos),
        "success/accuracy_0.9": jnp.mean((prob > 0.9) == pos),
        "success/pos_accuracy": frac(prob > 0.5, pos),
        "success/neg_accuracy": frac(prob < 0.5, neg),
        "success/label_mean": jnp.mean(label),
    }


def reward_metrics(pred: Float[Array, " B"], target: Float[Array, " B"]) -> dict[str, Array]:
    """The reward head's diagnostics on a batch, as the authors log them (their ``reward_loss`` info):
    ``reward/pred_max``, ``pred_min`` and ``target_mean`` (the mean ``reward/pred`` comes from
    :meth:`RewardModel.loss`)."""
    return {"reward/pred_max": jnp.max(pred), "reward/pred_min": jnp.min(pred), "reward/target_mean": jnp.mean(target)}


#: The classes :func:`evaluate_jointly` may evaluate with one first-layer product (exact classes: a
#: subclass may change its ``__call__``, so it is called as it is).
JOINT_MODELS = (ChunkDynamics, QCritic, SuccessModel, RewardModel)


def evaluate_jointly(models: Sequence[Callable[..., Array]], s, g, A) -> list[Array]:
    """Dynamics ``f(s, A)`` and chunk heads ``h(s, g, A)`` on one state, goal and chunk: ``[m(...) for m in
    models]`` (``s: (ob_dim,)``, ``g: (goal_dim,)``, ``A: (chunk_dim,)``; each result as its own call's).

    When every model is exactly one of :data:`JOINT_MODELS` and their MLPs read the same input (the
    same blocks of ``s, g, A`` once empty ones are dropped: single-task data, ``goal_dim = 0``, makes
    a head's ``[s, g, A]`` the dynamics' ``[s, A]``), the first layers are one matrix product
    (:func:`macfw.nn.mlp.joint_first_layer`; MAC's imagined rollout: success and reward on its
    (state, chunk) pairs after its loop, and all three inside the loop in the reference computation:
    a ``cpu-small`` update 1.04x faster, issue 12). Otherwise, or inside
    :func:`macfw.reference.reference_computation` (``"joint_first_layer"``), each model is called.
    """
    sizes = {"s": s.shape[-1], "g": g.shape[-1], "A": A.shape[-1]}
    joint = cast("list[ChunkDynamics | _ChunkHead]", [m for m in models if type(m) in JOINT_MODELS])
    inputs = {
        tuple(b for b in m.mlp_input_blocks if sizes[b] > 0) for m in joint
    }  # each model's non-empty input blocks
    if len(models) < 2 or len(joint) != len(models) or len(inputs) != 1:
        return [m(s, A) if isinstance(m, Dynamics) else m(s, g, A) for m in models]
    outs = joint_first_layer([m.net for m in joint], _blocks(inputs.pop(), s, g, A))
    return [m.from_mlp_output(s, out) for m, out in zip(joint, outs)]
