"""FQL: Flow Q-Learning (Park, Li, Levine, 2025), the model-free baseline of the MAC paper (DESIGN §9).

Facts from the authors' code (github.com/seohongpark/fql, ``agents/fql.py`` and its ``get_config``).
Everything acts on single actions (``chunk_len = 1``) and trains jointly with one Adam optimiser
on the sum of three losses:

1. flow BC: a velocity field ``v(s, g_a, x, u)`` by flow matching on the dataset action
   (``x = (1 - u) z + u a``, target ``a - z``; :class:`~macfw.nn.flow.FlowPolicy`);
2. critic (two Q's, MSE): target ``y = r + gamma m agg_j Q'_j(s', g_v, clip(mu(s', g_v, z')))``
   with ``z' ~ N(0, I)``, ``agg`` the mean (authors' default ``q_agg = 'mean'``) or min;
   ``m = 1 - success`` (0 where the step solves the task or reaches the goal);
3. one-step policy ``mu(s, g_a, z)`` (:func:`fql_actor_loss`, the paper's Eq. (5))::

       L_mu = alpha * mean ||mu(s, z) - sg(clip(flow(s, z), -1, 1))||^2 - lam * mean_j Q_j(s, clip(mu(s, z)))

   where ``flow(s, z)`` is the ODE solution of ``v`` from noise ``z`` (10 Euler steps, diffrax),
   the Q term does not train the critic (the authors evaluate it with the critic's current
   parameters, outside the differentiated ones; here: stop-gradient) and ``lam = 1`` unless
   ``normalize_q_loss`` (then ``lam = sg(1 / mean |Q|)``; off in the authors' OGBench runs).

The target critic is an EMA (tau) of the critic. Acting: ``clip(mu(s, g, z), -1, 1)`` with a fresh
``z ~ N(0, I)`` per step (the authors' ``sample_actions``).

Goal-conditioned data (``oraclerep``): FQL is single-task in its paper; here ``Q(s, g, a)`` is trained
on the batch's value goals and the flow policy and ``mu`` on its actor goals (the batch's hindsight
relabelling, DESIGN §2.1); rewards ``success - 1`` and masks ``1 - success`` as the batch gives them.

Per-environment alpha (the authors' README commands for OGBench): 300 for cube-* and scene, 1000 for
puzzle-*; ``gin/baselines/fql.gin`` defaults to 300 and ``gin/baselines/fql/{cube,scene,puzzle}.gin``
set each one.

Code name -> symbol: ``policy`` v (the flow BC), ``actor`` mu (the one-step policy), ``critic``
``{Q_j}``, ``target_critic`` ``{Q'_j}``. Shapes per example: ``s: (ob_dim,)``, ``g: (goal_dim,)``
(``(0,)`` single-task), ``a, z: (act_dim,)``. Units: ``gamma`` per environment step; ``tau`` per
gradient step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from macfw.agents.base import Agent, BatchSpec, copy_of, ema, gradient_step
from macfw.agents.fql import FQLActor
from macfw.agents.mbpo import one_step_view
from macfw.data.goals import GoalSampling, goal_sampling_for
from macfw.errors import check, check_choice, check_float
from macfw.nn.flow import FlowPolicy
from macfw.registry import register
from macfw.spec import Spec


class FQLNetworks(eqx.Module):
    """Every trained network of FQL (what the optimiser updates); equinox Modules used duck-typed (``Any``)."""

    policy: Any  # flow BC v(s, g, x, u) (FlowPolicy, distill=False)
    actor: Any  # one-step policy mu(s, g, z) (FQLActor)
    critic: Any  # Ensemble of QCritic: (s, g, a) -> (k,)


class FQLState(eqx.Module):
    """Step, key, networks, the critic's EMA copy and the optimiser state."""

    step: Array
    key: Array
    nets: FQLNetworks
    target_critic: Any  # a copy of nets.critic
    opt_state: Any


def _sg(tree):
    return jax.lax.stop_gradient(tree)


def _q_per_example(critic, s, g, a) -> Array:
    """``critic`` on a batch, as ``(B, k)`` (a scalar critic gives ``k = 1``)."""
    q = jax.vmap(critic)(s, g, a)
    return q.reshape(q.shape[0], -1)


def fql_critic_target(
    target_critic, actor, s_next, g, rewards, masks, z_next, *, gamma: float, q_agg: str = "mean"
) -> Array:
    """FQL's TD target ``r + gamma m agg_j Q'_j(s', g, clip(mu(s', g, z'), -1, 1))``: ``(B,)``.

    Args:
      target_critic: ``(s, g, a) -> (k,)`` (or a scalar), the EMA critic(s).
      actor: the one-step policy ``mu(s, g, z) -> (act_dim,)``.
      s_next: ``(B, ob_dim)``; g: ``(B, goal_dim)`` (the value goals); rewards, masks: ``(B,)``;
      z_next: ``(B, act_dim)`` noise for the next actions.
      gamma: per-step discount.
      q_agg: ``'mean'`` (the authors' default) or ``'min'`` over the target critics.

    Returns:
      ``(B,)`` targets (not stop-gradiented; the caller does).
    """
    a_next = jnp.clip(jax.vmap(actor)(s_next, g, z_next), -1.0, 1.0)
    q_next = _q_per_example(target_critic, s_next, g, a_next)
    q_next = q_next.min(axis=1) if q_agg == "min" else q_next.mean(axis=1)
    return rewards + gamma * masks * q_next


def fql_actor_loss(
    actor, critic, s, g, z, flow_target, *, alpha: float, normalize_q_loss: bool = False
) -> tuple[Array, dict]:
    """FQL's one-step policy loss ``alpha * distill + q_loss`` (paper Eq. (5); authors' ``actor_loss``).

    ``distill = mean_{b, i} (mu(s, g, z) - flow_target)^2`` (mean over the batch and the action
    dimensions) and ``q_loss = -lam * mean_b mean_j Q_j(s, g, clip(mu(s, g, z), -1, 1))`` with
    ``lam = 1``, or ``sg(1 / mean_b |mean_j Q_j|)`` when ``normalize_q_loss``. The critic is under
    stop-gradient: this loss never moves it. The flow BC loss is not part of it (see :class:`FQL`).

    Args:
      actor: ``mu(s, g, z) -> (act_dim,)``.
      critic: ``(s, g, a) -> (k,)`` or a scalar.
      s: ``(B, ob_dim)``; g: ``(B, goal_dim)`` (actor goals); z: ``(B, act_dim)`` noise;
      flow_target: ``(B, act_dim)`` the (clipped) flow ODE solution from the same ``z``; treated
        as a constant (stop-gradient).
      alpha: distillation weight (dimensionless).

    Returns:
      ``(loss, metrics)`` with ``actor/loss``, ``actor/distill_loss``, ``actor/q_loss``, ``actor/q_mean``.
    """
    a = jax.vmap(actor)(s, g, z)
    distill = jnp.mean((a - _sg(flow_target)) ** 2)
    q = _q_per_example(_sg(critic), s, g, jnp.clip(a, -1.0, 1.0)).mean(axis=1)
    q_loss = -jnp.mean(q)
    if normalize_q_loss:
        q_loss = q_loss * _sg(1.0 / jnp.mean(jnp.abs(q)))
    loss = alpha * distill + q_loss
    return loss, {
        "actor/loss": loss,
        "actor/distill_loss": distill,
        "actor/q_loss": q_loss,
        "actor/q_mean": jnp.mean(q),
        "actor/action_abs_mean": jnp.mean(jnp.abs(a)),
    }


@register("agent")
class FQL(Agent):
    """Flow Q-Learning (see the module docstring); Gin: ``gin/baselines/fql.gin``.

    Components are registered classes built as ``Cls(spec, key=...)`` for a ``chunk_len = 1`` spec.

    Args:
      policy: the flow BC (default :class:`~macfw.nn.flow.FlowPolicy`; needs ``loss`` and
        ``solve(s, g, z)``; bind ``FlowPolicy.distill = False``, its own one-step network is unused).
      actor: the one-step policy (default :class:`~macfw.agents.fql.FQLActor`).
      critic: the Q ensemble (``@critic/Ensemble`` of ``QCritic``, 2 members).
      alpha: distillation weight (authors: 300 cube/scene, 1000 puzzle; their config default 10).
      gamma: per-step discount (authors: 0.99).
      tau: EMA rate of the target critic, per gradient step (authors: 0.005).
      learning_rate: Adam step size, one optimiser over every loss (authors: 3e-4).
      q_agg: ``'mean'`` (authors' default) or ``'min'`` over the target critics.
      normalize_q_loss: divide the actor's Q term by ``sg(mean |Q|)`` (authors: off).
      goal_sampling: the hindsight relabelling of goal-conditioned samples (None:
        ``GoalSampling()``, i.e. the ``GoalSampling.*`` Gin bindings; :mod:`macfw.data.goals`).

    Raises:
      ConfigError: a value out of range; at :meth:`init`, a ``policy`` without ``solve``.
    """

    acts_in_chunks = False

    def __init__(
        self,
        policy: Callable = FlowPolicy,
        actor: Callable = FQLActor,
        critic: Callable | None = None,
        *,
        alpha: float = 300.0,
        gamma: float = 0.99,
        tau: float = 0.005,
        learning_rate: float = 3e-4,
        q_agg: str = "mean",
        normalize_q_loss: bool = False,
        goal_sampling: GoalSampling | None = None,
    ):
        name = type(self).__name__
        for slot, f in (("policy", policy), ("actor", actor), ("critic", critic)):
            check(
                f"{name}.{slot}", f, callable(f), "a network class, e.g. @critic/Ensemble (see gin/baselines/fql.gin)"
            )
        assert critic is not None  # check() refused a non-callable
        self.factories = dict(policy=policy, actor=actor, critic=critic)
        self.alpha = check_float(f"{name}.alpha", alpha, low=0.0)
        self.gamma = check_float(f"{name}.gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
        self.tau = check_float(f"{name}.tau", tau, low=0.0, high=1.0, low_open=True)
        self.learning_rate = check_float(f"{name}.learning_rate", learning_rate, low=0.0, low_open=True)
        self.q_agg = check_choice(f"{name}.q_agg", q_agg, ("mean", "min"))
        check(f"{name}.normalize_q_loss", normalize_q_loss, isinstance(normalize_q_loss, bool), "True or False")
        self.normalize_q_loss = normalize_q_loss
        self.goal_sampling = goal_sampling_for(name, goal_sampling)
        self.spec: Spec | None = None

    @property
    def batch_spec(self) -> BatchSpec:
        """One-step transitions (rewards ``r_t``, not divided) with hindsight goals when goal-conditioned."""
        return BatchSpec(chunk_len=1, gamma=self.gamma, normalize_reward=False, goals=self.goal_sampling)

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    # ------------------------------------------------------------------ building
    def init(self, spec: Spec, key) -> FQLState:
        spec = dataclasses.replace(spec, chunk_len=1)
        self.spec = spec
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        key, k_p, k_a, k_c = jax.random.split(key, 4)
        f = self.factories
        nets = FQLNetworks(
            policy=f["policy"](spec, key=k_p), actor=f["actor"](spec, key=k_a), critic=f["critic"](spec, key=k_c)
        )
        check(
            "FQL.policy",
            type(nets.policy).__name__,
            callable(getattr(nets.policy, "solve", None)),
            "a policy with a solve(s, g, z) method (FQL distils the flow ODE solution), e.g. @FlowPolicy",
        )
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        target = copy_of(nets.critic)
        return FQLState(step=jnp.zeros((), jnp.int32), key=key, nets=nets, target_critic=target, opt_state=opt_state)

    def uncounted_flops(self, state: FQLState, batch_size: int) -> float:
        """The distillation target's diffrax ODE loop is counted once by XLA: add ``flow_steps - 1``
        batched velocity evaluations (none for a policy without ``velocity``/``flow_steps``)."""
        pol = state.nets.policy
        if not (hasattr(pol, "velocity") and getattr(pol, "flow_steps", 1) > 1):
            return 0.0
        spec = self._built_spec()
        s, g, x = (jnp.zeros((batch_size, d)) for d in (spec.ob_dim, spec.goal_dim, spec.act_dim))
        vel = jax.jit(jax.vmap(lambda pol, s, g, x: pol.velocity(s, g, x, 0.5), in_axes=(None, 0, 0, 0)))
        ca = vel.lower(pol, s, g, x).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return (pol.flow_steps - 1) * float((ca or {}).get("flops", 0.0))

    # ------------------------------------------------------------------ acting
    def act(self, nets: FQLNetworks, s, g, *, key):
        """``clip(mu(s, g, z), -1, 1)`` with ``z ~ N(0, I)`` from ``key``: ``(1, act_dim)``."""
        act_dim = self._built_spec().act_dim
        z = jax.random.normal(key, (act_dim,))
        return jnp.clip(nets.actor(s, g, z), -1.0, 1.0).reshape(1, act_dim)

    # ------------------------------------------------------------------ the losses
    def flow_target(self, policy, s, g, z) -> Array:
        """``clip(flow(s, g, z), -1, 1)``, the ODE solution of ``v`` from ``z`` clipped as the authors do:
        ``(B, act_dim)``."""
        return jnp.clip(jax.vmap(policy.solve)(s, g, z), -1.0, 1.0)

    def critic_target(self, nets: FQLNetworks, target_critic, batch: dict, key) -> Array:
        """The TD target of :func:`fql_critic_target` on a one-step view of the batch: ``(B,)``."""
        z = jax.random.normal(key, (batch["rewards"].shape[0], self._built_spec().act_dim))
        return fql_critic_target(
            target_critic,
            nets.actor,
            batch["next_obs"],
            batch["value_goals"],
            batch["rewards"],
            batch["masks"],
            z,
            gamma=self.gamma,
            q_agg=self.q_agg,
        )

    def actor_loss(self, nets: FQLNetworks, batch: dict, key) -> tuple[Array, dict]:
        """:func:`fql_actor_loss` on the batch's states and actor goals, with the flow ODE target."""
        s, g = batch["obs"], batch["actor_goals"]
        z = jax.random.normal(key, (s.shape[0], self._built_spec().act_dim))
        target = _sg(self.flow_target(nets.policy, s, g, z))
        return fql_actor_loss(
            nets.actor, nets.critic, s, g, z, target, alpha=self.alpha, normalize_q_loss=self.normalize_q_loss
        )

    def loss(self, nets: FQLNetworks, batch: dict, target_q: Array, key) -> tuple[Array, dict]:
        """Flow BC + critic + actor losses on a one-step view ``batch``; ``(total, metrics)``."""
        k_flow, k_actor = jax.random.split(key)
        B = batch["rewards"].shape[0]
        flow, m_flow = jax.vmap(lambda s, g, a, k: nets.policy.loss(s, g, a, key=k))(
            batch["obs"], batch["actor_goals"], batch["actions"], jax.random.split(k_flow, B)
        )
        flow = jnp.mean(flow)
        q = _q_per_example(nets.critic, batch["obs"], batch["value_goals"], batch["actions"])  # (B, k)
        critic_loss = jnp.mean((q - target_q[:, None]) ** 2)
        actor, m_actor = self.actor_loss(nets, batch, k_actor)
        total = flow + critic_loss + actor
        metrics = {k: jnp.mean(v) for k, v in m_flow.items()}
        metrics.update(m_actor)
        metrics.update(
            {
                "critic/loss": critic_loss,
                "critic/q_mean": q.mean(),
                "critic/q_max": q.max(),
                "critic/q_min": q.min(),
                "critic/target_mean": target_q.mean(),
                "total/loss": total,
            }
        )
        return total, metrics

    def update(self, state: FQLState, batch: dict) -> tuple[FQLState, dict]:
        """One gradient step on the loop's one-step ``batch`` (pure; jit it)."""
        key, k_next, k_loss = jax.random.split(state.key, 3)
        b = one_step_view(batch)  # masks = 1 - success
        target_q = _sg(self.critic_target(_sg(state.nets), _sg(state.target_critic), b, k_next))
        nets, opt_state, metrics = gradient_step(
            state.nets, state.opt_state, self.optimizer(), lambda nets: self.loss(nets, b, target_q, k_loss)
        )
        target = ema(state.target_critic, nets.critic, self.tau)
        return dataclasses.replace(
            state, step=state.step + 1, key=key, nets=nets, target_critic=target, opt_state=opt_state
        ), metrics
