"""GCIQL: goal-conditioned implicit Q-learning with a DDPG+BC actor, the MAC paper's model-free
baseline (Kostrikov et al., 2022; OGBench, Park et al., 2025; DESIGN §9; the authors'
``agents/gciql.py`` with ``actor_loss='ddpgbc'``).

Three networks, trained jointly by one Adam optimiser on the sum of three losses, on one-step
transitions ``(s, a, r, s')`` with hindsight-relabelled goals (``BatchSpec(chunk_len=1)``):

1. value (IQL's expectile regression, expectile ``kappa = 0.9``) against the *target* critics::

       L_V = E[ |kappa - 1[q < V(s, g_v)]| (q - V(s, g_v))^2 ],   q = min_j Q'_j(s, g_v, a)

2. critic (two Q's, MSE, summed over the two members), toward the current value under stop-gradient::

       L_Q = E[ sum_j (Q_j(s, g_v, a) - y)^2 ],   y = r + gamma m sg(V(s', g_v))

3. actor (DDPG+BC), the critic constant (the actor's loss never moves ``Q``)::

       L_pi = -E[q_pi] / sg(E|q_pi| + 1e-6) - alpha E[ log N(a; mu(s, g_a), I) ],
       q_pi = min_j Q_j(s, g_a, clip(mu(s, g_a), -1, 1))

   The authors' actor is a Gaussian with constant unit standard deviation and an unbounded mean
   ``mu`` (no tanh), so their BC term ``-alpha log N(a; mu, I)`` is ``alpha * 0.5 ||mu - a||^2``
   plus the constant ``alpha * 0.5 d log(2 pi)``; macfw reports it with the constant, as they do
   (``actor/bc_loss``, ``actor/loss``, ``actor/bc_log_prob``), so logs compare number for number.
   The action given to ``Q`` (and executed) is ``clip(mu, -1, 1)`` (:class:`ClippedMeanActor`).
   Normalising by ``E|q_pi|`` makes the Q term scale-free.

then an EMA (``tau``) of the critics, in the authors' order: from the critics *before* this
step's gradient step, ``Q'_{t+1} = (1 - tau) Q'_t + tau Q_t`` (their ``target_update`` reads
``self.network``, the pre-update parameters). Rewards are the batch's (``success - 1`` for
goal-conditioned data, the dataset's reward single-task) and masks ``m = 1 - success``
(goal reached / task solved ends the bootstrap). Single-task data runs too: the goals are then
empty (``goal_dim = 0``).

Code name -> symbol: ``expectile`` kappa, ``alpha`` the BC weight, ``gamma`` the per-step
discount, ``tau`` the EMA rate, ``value`` V, ``critic`` ``{Q_j}``, ``target_critic`` ``{Q'_j}``,
``actor`` mu. Shapes per example: ``s: (ob_dim,)``, ``a: (act_dim,)``, ``g: (goal_dim,)``.

Parity with the authors' code (``experiments/parity.py --agents gciql``, issue 29): the same
initial parameters and batches give every logged metric and the parameters after 10 updates within
float rounding. It found two differences, both fixed to the authors' behaviour: the target critics'
EMA read the critics *after* the step (theirs: before, a one-step lag; after one update from equal
copies their targets are unchanged), and ``actor/bc_loss`` / ``actor/loss`` lacked the Gaussian
log-likelihood's constant ``alpha * 0.5 d log(2 pi)`` (4.59 at ``alpha = 1``, ``d = 5``).
Speed (the same computation): the actor's network runs once for its action and its BC mean
(:meth:`ClippedMeanActor.outputs`: XLA's count 762 MFLOP per update at 2 x 256, batch 256, against
839 before and the authors' 758), and the critic ensembles are evaluated members-outer
(:func:`batched_heads`), the authors' layout.
Deliberate deviation in the data, not the losses: macfw samples only ``t`` with ``t + 1`` in the
trajectory (the authors' ``GCDataset`` also draws a trajectory's last state).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.agents.base import Agent, BatchSpec, copy_of, ema, gradient_step
from macfw.data.goals import GoalSampling, goal_sampling_for
from macfw.errors import check, check_float
from macfw.nn.ensemble import Ensemble
from macfw.nn.losses import expectile as expectile_loss
from macfw.nn.mlp import MLP
from macfw.nn.models import HIDDEN, StateValue
from macfw.registry import register
from macfw.spec import Spec

#: Added to ``E|Q|`` before dividing by it (the authors' value).
Q_NORM_EPS = 1e-6
_LOG_2PI = math.log(2.0 * math.pi)


def _sg(tree):
    return jax.lax.stop_gradient(tree)


def batched_heads(critic: Callable[..., Array], *xs) -> Array:
    """``jax.vmap(critic)(*xs)``: a critic (or ensemble of ``k``) on a batch, ``(B, k)`` (``(B,)`` for
    one network). An :class:`~macfw.nn.ensemble.Ensemble` is evaluated members-outer (each member on
    the whole batch, then transposed), as the authors' ``nn.vmap`` over members: the same numbers,
    with the members' activations laid out ``(k, B, hidden)`` like their products. Batch-outer
    (``vmap`` over examples of the members' ``vmap``) gave ``(B, k, hidden)`` elementwise passes
    between ``(k, B, hidden)`` products; one profile of GCIQL at 2 x 256, batch 256 showed 2.0 ms of
    data movement per update against the authors' 1.1, but alternated timings on this shared 2-core
    machine (load 4-10) did not resolve a difference in updates/s (GCIQL and SHARSA, within 5%)."""
    if isinstance(critic, Ensemble):
        return critic.apply(lambda m, *a: jax.vmap(m)(*a), *xs).T
    return jax.vmap(critic)(*xs)


# --------------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------------
@register("actor")
class ClippedMeanActor(eqx.Module):
    """The authors' GCIQL actor: an unbounded mean ``mu(s, g) = MLP([s, g])``, acted as
    ``clip(mu, -1, 1)``.

    It is their ``GCActor`` with ``const_std=True`` (a unit-std Gaussian whose mode is used both
    in the DDPG term and for evaluation at temperature 0), so only the mean is a network; the
    BC term is then a squared error on :meth:`mean` (see :mod:`macfw.agents.gciql`).

    Args:
      spec: sizes; input ``ob_dim + goal_dim``, output ``chunk_dim`` (``act_dim`` for a
        ``chunk_len = 1`` spec).
      hidden_dims: MLP hidden sizes (default 4 x 1024).
      layer_norm: LayerNorm after each hidden activation (the authors': on).
      final_init_scale: variance scale of the last layer's initial weights (the authors'
        ``default_init(0.01)``, so the initial mean is near 0; see :class:`~macfw.nn.mlp.MLP`).
      key: PRNG key.

    Raises:
      ConfigError: ``final_init_scale <= 0`` or bad ``hidden_dims``.
    """

    net: MLP

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        final_init_scale: float = 0.01,
        compute_dtype: str | None = None,
    ):
        scale = check_float("ClippedMeanActor.final_init_scale", final_init_scale, low=0.0, low_open=True)
        self.net = MLP(
            spec.ob_dim + spec.goal_dim,
            spec.chunk_dim,
            hidden_dims,
            key=key,
            layer_norm=layer_norm,
            final_init_scale=scale,
            compute_dtype=compute_dtype,
            name=type(self).__name__,
        )

    def mean(self, s, g) -> Float[Array, " chunk_dim"]:
        """The unbounded mean ``mu(s, g)``: ``(chunk_dim,)`` (what the BC term regresses)."""
        return self.net(jnp.concatenate([s, g]))

    def __call__(self, s, g) -> Float[Array, " chunk_dim"]:
        """The action ``clip(mu(s, g), -1, 1)``: ``(chunk_dim,)``."""
        return jnp.clip(self.mean(s, g), -1.0, 1.0)

    def outputs(self, s, g) -> tuple[Array, Array]:
        """``(clip(mu), mu)`` from one pass of the network (see :func:`actor_outputs`)."""
        mu = self.mean(s, g)
        return jnp.clip(mu, -1.0, 1.0), mu


def actor_outputs(actor: Any, s, g) -> tuple[Array, Array]:
    """``(action given to Q, output the BC term regresses)`` for one example, each ``(act_dim,)``.

    An actor with a ``mean`` method (:class:`ClippedMeanActor`) regresses its unclipped mean and
    acts with its ``__call__``; any other deterministic actor (e.g.
    :class:`~macfw.nn.actors.DeterministicActor`, ``tanh(MLP)``) uses its output for both. An actor
    with an ``outputs`` method gives both from one network pass (:meth:`ClippedMeanActor.outputs`:
    calling ``__call__`` and ``mean`` apart ran the actor's MLP twice in the backward pass, 11% more
    FLOPs per GCIQL update at 2 x 256, batch 256).
    """
    if hasattr(actor, "outputs"):
        return actor.outputs(s, g)
    a = actor(s, g)
    return a, (actor.mean(s, g) if hasattr(actor, "mean") else a)


# --------------------------------------------------------------------------------------------
# The three losses as pure functions of arrays (B = batch size, k = critics)
# --------------------------------------------------------------------------------------------
def value_loss(v: Float[Array, " B"], target_qs: Float[Array, "B k"], expectile: float) -> tuple[Array, dict]:
    """IQL's value loss: mean over the batch of ``expectile(V, min_j Q'_j)``.

    Args:
      v: ``V(s, g_v)`` per example.
      target_qs: the target critics ``Q'_j(s, g_v, a)`` on the data action, ``(B, k)``.
      expectile: kappa in (0, 1); above 0.5 ``V`` approaches an upper expectile of ``min_j Q'_j``.
    """
    q = jnp.min(target_qs, axis=1)
    loss = jnp.mean(expectile_loss(v, q, expectile))
    return loss, {"value/loss": loss, "value/v_mean": v.mean(), "value/v_max": v.max(), "value/v_min": v.min()}


def critic_target(
    rewards: Float[Array, " B"], masks: Float[Array, " B"], next_v: Float[Array, " B"], gamma: float
) -> Float[Array, " B"]:
    """The one-step target ``y = r + gamma m V(s', g_v)`` (``gamma`` per environment step)."""
    return rewards + gamma * masks * next_v


def critic_loss(qs: Float[Array, "B k"], target: Float[Array, " B"]) -> tuple[Array, dict]:
    """``E_batch[ sum_j (Q_j - y)^2 ]`` (the authors' ``((q1 - y)^2 + (q2 - y)^2).mean()``)."""
    loss = jnp.mean(jnp.sum((qs - target[:, None]) ** 2, axis=1))
    return loss, {
        "critic/loss": loss,
        "critic/q_mean": qs.mean(),
        "critic/target_mean": target.mean(),
        "critic/target_max": target.max(),
        "critic/target_min": target.min(),
    }


def ddpg_bc_loss(
    q_pi: Float[Array, "B k"], bc_out: Float[Array, "B d"], data_actions: Float[Array, "B d"], alpha: float
) -> tuple[Array, dict]:
    """DDPG+BC with ``|Q|`` normalisation (OGBench's GCIQL actor):
    ``-E[min_j Q_j] / sg(E|min_j Q_j| + 1e-6) - alpha E[log N(a; bc_out, I)]``, where
    ``-log N(a; mu, I) = 0.5 ||mu - a||^2 + 0.5 d log(2 pi)`` (the authors' unit-std Gaussian: the
    constant moves no gradient, and the reported ``actor/bc_loss`` and ``actor/loss`` are theirs).

    Args:
      q_pi: the critics on the actor's action, ``(B, k)`` (callers hold the critic constant).
      bc_out: the actor output regressed to the data action (the unclipped mean), ``(B, d)``.
      data_actions: the dataset actions, ``(B, d)``.
      alpha: BC weight (>= 0).
    """
    q = jnp.min(q_pi, axis=1)
    q_abs = jnp.mean(jnp.abs(q))
    q_loss = -jnp.mean(q) / _sg(q_abs + Q_NORM_EPS)
    d = bc_out.shape[1]
    sq = jnp.sum((bc_out - data_actions) ** 2, axis=1)
    log_prob = -0.5 * sq - 0.5 * d * _LOG_2PI  # log N(a; bc_out, I) per example
    bc = -alpha * jnp.mean(log_prob)
    loss = q_loss + bc
    return loss, {
        "actor/loss": loss,
        "actor/q_loss": q_loss,
        "actor/bc_loss": bc,
        "actor/q_mean": jnp.mean(q),
        "actor/q_abs_mean": q_abs,
        "actor/bc_log_prob": jnp.mean(log_prob),
        "actor/mse": jnp.mean(sq) / d,
        "actor/std": jnp.ones((), bc_out.dtype),
    }  # the authors' constant unit std, logged as they do


# --------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------
class GCIQLNetworks(eqx.Module):
    """Every trained network of GCIQL (what the optimiser updates); equinox Modules used duck-typed (``Any``)."""

    value: Any  # StateValue V(s, g)
    critic: Any  # Ensemble of QCritic (2)
    actor: Any  # ClippedMeanActor


class GCIQLState(eqx.Module):
    """Step, key, networks, the critics' EMA copy and the optimiser state."""

    step: Array
    key: Array
    nets: GCIQLNetworks
    target_critic: Any  # a copy of nets.critic
    opt_state: Any


@register("agent")
class GCIQL(Agent):
    """GCIQL with a DDPG+BC actor (see the module docstring). Component arguments are registered
    classes built as ``Cls(spec, key=...)`` with a ``chunk_len = 1`` spec; ``critic`` is a
    Gin-scoped ensemble (``gin/baselines/gciql.gin``).

    Args:
      value: the state-value network V(s, g) (:class:`~macfw.nn.models.StateValue`).
      critic: the critics, e.g. ``@critic/Ensemble`` of two :class:`~macfw.nn.models.QCritic`.
      actor: a deterministic actor (:class:`ClippedMeanActor`, the authors'; or
        :class:`~macfw.nn.actors.DeterministicActor`).
      gamma: per-step discount in (0, 1) (the authors': 0.999).
      expectile: IQL's expectile kappa in (0, 1) (0.9).
      alpha: weight of the BC term, >= 0 (1; the authors' per-environment values are in the Gin file).
      tau: EMA rate of the target critics in (0, 1] (0.005).
      learning_rate: Adam step size, one optimiser over every loss (3e-4).
      goal_sampling: the hindsight relabelling of goal-conditioned samples (None:
        ``GoalSampling()``, i.e. the ``GoalSampling.*`` Gin bindings; :mod:`macfw.data.goals`).

    Raises:
      ConfigError: a value out of range (the message names the binding, e.g. ``GCIQL.expectile``).
    """

    acts_in_chunks = False

    def __init__(
        self,
        value: Callable = StateValue,
        critic: Callable | None = None,
        actor: Callable = ClippedMeanActor,
        *,
        gamma: float = 0.999,
        expectile: float = 0.9,
        alpha: float = 1.0,
        tau: float = 0.005,
        learning_rate: float = 3e-4,
        goal_sampling: GoalSampling | None = None,
    ):
        name = type(self).__name__
        for slot, f in (("value", value), ("critic", critic), ("actor", actor)):
            check(
                f"{name}.{slot}",
                f,
                callable(f),
                "a network class, e.g. @critic/Ensemble (see gin/baselines/gciql.gin)",
            )
        assert critic is not None  # check() refused a non-callable
        self.factories = dict(value=value, critic=critic, actor=actor)
        self.gamma = check_float(f"{name}.gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
        self.expectile = cast(
            float, check_float(f"{name}.expectile", expectile, low=0.0, high=1.0, low_open=True, high_open=True)
        )
        self.alpha = check_float(f"{name}.alpha", alpha, low=0.0)
        self.tau = check_float(f"{name}.tau", tau, low=0.0, high=1.0, low_open=True)
        self.learning_rate = check_float(f"{name}.learning_rate", learning_rate, low=0.0, low_open=True)
        self.goal_sampling = goal_sampling_for(name, goal_sampling)
        self.spec: Spec | None = None

    @property
    def batch_spec(self) -> BatchSpec:
        """One-step transitions (``chunk_len = 1``); ``gamma`` also sets the actor goals' geometric offset."""
        return BatchSpec(chunk_len=1, gamma=self.gamma, normalize_reward=False, goals=self.goal_sampling)

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    # ------------------------------------------------------------------ building
    def init(self, spec: Spec, key) -> GCIQLState:
        """Networks for ``spec`` (built with ``chunk_len = 1``), the target critics (a copy) and Adam's state."""
        spec = dataclasses.replace(spec, chunk_len=1)
        self.spec = spec
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        key, k_v, k_q, k_pi = jax.random.split(key, 4)
        f = self.factories
        nets = GCIQLNetworks(
            value=f["value"](spec, key=k_v), critic=f["critic"](spec, key=k_q), actor=f["actor"](spec, key=k_pi)
        )
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        target = copy_of(nets.critic)
        return GCIQLState(step=jnp.zeros((), jnp.int32), key=key, nets=nets, target_critic=target, opt_state=opt_state)

    # ------------------------------------------------------------------ acting
    def act(self, nets: GCIQLNetworks, s, g, *, key):
        """The actor's action for one scaled state and goal: ``(1, act_dim)`` in [-1, 1]
        (deterministic: the authors evaluate at temperature 0, i.e. the clipped mean)."""
        return jnp.clip(nets.actor(s, g), -1.0, 1.0).reshape(1, self._built_spec().act_dim)

    # ------------------------------------------------------------------ the losses
    def value_part(self, nets: GCIQLNetworks, target_critic, batch: dict) -> tuple[Array, dict]:
        """``L_V``: ``V(s, g_v)`` by expectile regression to ``min_j Q'_j(s, g_v, a)`` (target critics, constant)."""
        v = jax.vmap(nets.value)(batch["obs"], batch["value_goals"])
        tq = _sg(batched_heads(target_critic, batch["obs"], batch["value_goals"], batch["actions"]))  # (B, k)
        return value_loss(v, tq, self.expectile)

    def critic_part(self, nets: GCIQLNetworks, batch: dict) -> tuple[Array, dict]:
        """``L_Q``: both ``Q_j(s, g_v, a)`` to ``r + gamma (1 - success) sg(V(s', g_v))``."""
        next_v = _sg(jax.vmap(nets.value)(batch["next_obs"], batch["value_goals"]))
        y = critic_target(batch["rewards"], 1.0 - batch["success"], next_v, self.gamma)
        qs = batched_heads(nets.critic, batch["obs"], batch["value_goals"], batch["actions"])  # (B, k)
        return critic_loss(qs, y)

    def actor_part(self, nets: GCIQLNetworks, batch: dict) -> tuple[Array, dict]:
        """``L_pi``: DDPG+BC on the actor goals, the critics constant (no gradient reaches ``Q``)."""
        a_pi, bc_out = jax.vmap(lambda s, g: actor_outputs(nets.actor, s, g))(batch["obs"], batch["actor_goals"])
        q_pi = batched_heads(_sg(nets.critic), batch["obs"], batch["actor_goals"], a_pi)  # (B, k)
        return ddpg_bc_loss(q_pi, bc_out, batch["actions"], self.alpha)

    def loss(self, nets: GCIQLNetworks, target_critic, batch: dict) -> tuple[Array, dict]:
        """``L_V + L_Q + L_pi`` and every metric."""
        lv, mv = self.value_part(nets, target_critic, batch)
        lq, mq = self.critic_part(nets, batch)
        lp, mp = self.actor_part(nets, batch)
        total = lv + lq + lp
        return total, {**mv, **mq, **mp, "total/loss": total}

    def update(self, state: GCIQLState, batch: dict) -> tuple[GCIQLState, dict]:
        """One gradient step on the loop's one-step ``batch`` (pure; jit it), then the critics' EMA."""
        nets, opt_state, metrics = gradient_step(
            state.nets, state.opt_state, self.optimizer(), lambda nets: self.loss(nets, state.target_critic, batch)
        )
        target = ema(state.target_critic, state.nets.critic, self.tau)  # the critics before this step (the authors')
        return dataclasses.replace(
            state, step=state.step + 1, nets=nets, target_critic=target, opt_state=opt_state
        ), metrics
