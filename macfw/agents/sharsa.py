"""SHARSA: hierarchical flow BC with a SARSA value over subgoals (Park et al., "Horizon Reduction
Makes RL Scalable", 2025; DESIGN §9). Model-free and goal-conditioned (oracle goal representations).

Three parts, trained jointly with one Adam optimiser on the sum of the four losses, all on dataset
samples only (no imagined data, no sampling inside the update: rejection sampling is test-time only):

1. high-level flow BC policy ``pi_h(w | s, g_a)`` over subgoals ``w`` (``(goal_dim,)``), trained by
   flow matching on the actor goals ``g_a`` at index ``j_a``: ``w`` is the goal representation at
   ``t + min(n, j_a - t)``, i.e. ``g_a`` itself where ``0 <= j_a - t < n`` (the actor goal lies
   within the ``n`` steps), else that of ``s_{t+n}`` (``batch['next_goals']``)
   (:func:`high_actor_targets`; the authors' HGCDataset ``high_actor_actions``);
2. low-level flow BC policy ``pi_l(a | s, w)`` over single actions toward the subgoal ``w`` =
   ``next_goals`` (``a_t = batch['actions'][:, :act_dim]``), trained by flow matching;
3. SARSA values over subgoals (the authors' "high_critic" / "high_value"; BCE, values in [0, 1]):
   with the value goal ``g`` at dataset index ``j`` and the sample at ``t``, ``d = j - t``, the goal
   is reached inside the ``n`` steps when ``0 <= d < n`` (success ``c``), and then

   * subgoal steps ``k = d`` if ``c`` else ``n``; the dataset subgoal ``w_data`` is the goal
     representation at ``t + k`` (``g`` itself if ``c``, else ``next_goals``);
   * reward ``r = c * gamma^k``, mask ``m = 1 - c`` (the authors' HGCDataset, ``gc_negative=False``);
   * critic ``Q_i(s, g, w_data)`` (2 heads) by BCE to ``sg(r + gamma^k m sigmoid(V(s_{t+n}, g)))``
     (:func:`sarsa_targets`);
   * value ``V(s, g)`` by BCE to ``agg_i sigmoid(Q'_i(s, g, w_data))`` with ``Q'`` an EMA (tau) of ``Q``
     and ``agg`` = min (``q_agg``): SARSA-style, on the dataset subgoal, no max over subgoals.

Flow matching (both levels): ``x = (1 - u) z + u x_1``, velocity target ``x_1 - z``, mean squared
error over the batch and the dimensions, with ``z ~ N(0, I)`` and ``u ~ U[0, 1)`` drawn at batch level
(:meth:`SHARSA.noise`, passed to :meth:`SHARSA.loss`; ``update(state, batch, noise)`` takes them too).
The EMA ``Q'`` follows the authors' order: ``Q'_{t+1} = (1 - tau) Q'_t + tau Q_t`` from the critic
*before* the step's gradient step (their ``target_update`` reads the pre-update parameters).

Acting (:meth:`SHARSA.act`): draw ``num_samples`` (32) subgoals from ``pi_h(. | s, g)`` (the flow ODE,
10 Euler steps, not clipped), keep ``argmax_i min_j Q_j(s, g, w_i)`` (the authors take the min of the
two online heads at test time whatever ``q_agg`` is), then one action from ``pi_l(. | s, w*)``,
clipped to [-1, 1]. One action per decision (``acts_in_chunks = False``).

Code name -> symbol: ``n`` n (subgoal steps, environment steps), ``gamma`` gamma, ``tau`` EMA rate,
``high_actor`` pi_h, ``low_actor`` pi_l, ``critic`` {Q_j}, ``target_critic`` {Q'_j}, ``value`` V.
Shapes per example: ``s: (ob_dim,)``, ``g, w: (goal_dim,)``, ``a: (act_dim,)``.

Networks: the flows are :class:`~macfw.nn.flow.FlowPolicy` built for specs whose "chunk" is the
subgoal (``Spec(act_dim=goal_dim, chunk_len=1)``) or one action (``chunk_len=1``); the low-level
flow gets the subgoal in its goal slot. The critic is an :class:`~macfw.nn.ensemble.Ensemble` of
:class:`~macfw.nn.models.QCritic` over ``(s, g, w)``; the value a :class:`~macfw.nn.models.StateValue`.

Parity with the authors' code (``experiments/parity.py --agents sharsa``, issue 29: the same
parameters, their own ``HGCDataset`` batches at macfw's indices, the same flow draws) gives every
logged metric and the parameters after 10 updates within float rounding. It found, and macfw now
follows the authors in: the high-level flow's target where the actor goal lies within ``n`` steps
(macfw regressed ``s_{t+n}``'s goal everywhere; with uniform actor goals on 101-step episodes a third
of a batch), the EMA order (above), and the logged ``value/v_max``, ``value/v_min``,
``critic/target_max``, ``critic/target_min`` (their ``high_value/v_*``, ``high_critic/q_*``).
Deliberate deviation in the data, not the losses: macfw samples only ``t`` with ``t + n`` in the
trajectory, so the authors' clip of the subgoal steps to the trajectory end (which also marks such a
sample a success, ``steps < n``, though the goal was not reached) never applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from macfw.agents.base import Agent, BatchSpec, copy_of, ema, gradient_step
from macfw.agents.gciql import batched_heads
from macfw.data.goals import GoalSampling, goal_sampling_for
from macfw.errors import ConfigError, check, check_choice, check_float, check_int
from macfw.nn.flow import FlowPolicy
from macfw.nn.losses import value_loss as make_value_loss
from macfw.nn.models import StateValue
from macfw.registry import register
from macfw.spec import Spec


class SHARSANetworks(eqx.Module):
    """Every trained network of SHARSA (what the optimiser updates); equinox Modules used duck-typed (``Any``)."""

    high_actor: Any  # flow over subgoals (goal_dim,) given (s, g)
    low_actor: Any  # flow over one action (act_dim,) given (s, subgoal)
    critic: Any  # Ensemble of QCritic on (s, g, subgoal): (num,) logits
    value: Any  # StateValue on (s, g): a logit


class SHARSAState(eqx.Module):
    """Step, key, networks, the critic's EMA copy and the optimiser state."""

    step: Array
    key: Array
    nets: SHARSANetworks
    target_critic: Any  # a copy of nets.critic
    opt_state: Any


def _sg(tree):
    return jax.lax.stop_gradient(tree)


def subgoal_steps(idx: Int[Array, " B"], value_goal_idx: Int[Array, " B"], n: int) -> tuple[Array, Array]:
    """Steps to the dataset subgoal and the success flag of the authors' HGCDataset.

    ``d = value_goal_idx - idx``; success ``c = 1[0 <= d < n]`` (the value goal is reached within the
    ``n`` steps); ``k = d`` if ``c`` else ``n`` (environment steps). The batch only holds samples
    whose ``t + n`` lies in the trajectory, so the authors' clip of ``k`` to the trajectory end never
    applies (see :class:`SHARSA`).

    Returns:
      ``(k, c)``: ``(B,)`` int32 steps and ``(B,)`` float32 success in {0, 1}.
    """
    d = value_goal_idx - idx
    c = (d >= 0) & (d < n)
    return jnp.where(c, d, n).astype(jnp.int32), c.astype(jnp.float32)


def sarsa_targets(idx, value_goal_idx, next_v: Float[Array, " B"], *, n: int, gamma: float) -> dict[str, Array]:
    """The n-step SARSA critic target (HGCDataset's high-level value sample, ``gc_negative=False``).

    Args:
      idx, value_goal_idx: ``(B,)`` dataset indices of ``s_t`` and of the value goal.
      next_v: ``(B,)`` ``V(s_{t+n}, g)`` as a value in [0, 1] (the sigmoid of the BCE logit). It is
        only used where the goal is not reached (``m = 1``), where ``k = n`` and the next state is
        ``s_{t+n}``.
      n: subgoal steps; gamma: per-step discount.

    Returns:
      dict of ``(B,)`` arrays: ``steps`` k, ``success`` c, ``rewards`` ``c gamma^k``, ``masks``
      ``1 - c`` and ``targets`` ``r + gamma^k m next_v``.
    """
    k, c = subgoal_steps(idx, value_goal_idx, n)
    disc = jnp.asarray(gamma, jnp.float32) ** k.astype(jnp.float32)
    r, m = c * disc, 1.0 - c
    return {"steps": k, "success": c, "rewards": r, "masks": m, "targets": r + disc * m * next_v}


def dataset_subgoals(success: Float[Array, " B"], value_goals, next_goals) -> Float[Array, "B goal_dim"]:
    """The subgoal the critic is trained on: the goal representation at ``t + k``, i.e. the value goal
    itself where it is reached inside the ``n`` steps, else ``next_goals`` (``s_{t+n}``'s)."""
    return jnp.where(success[:, None] > 0.5, value_goals, next_goals)


def high_actor_targets(
    idx: Int[Array, " B"], actor_goal_idx: Int[Array, " B"], actor_goals, next_goals, n: int
) -> Float[Array, "B goal_dim"]:
    """The subgoal the high-level flow regresses (the authors' HGCDataset ``high_actor_actions``): the
    goal representation at ``t + min(n, d)`` with ``d = actor_goal_idx - idx``, i.e. the actor goal
    itself where ``0 <= d < n`` (reached inside the ``n`` steps), else ``next_goals`` (``s_{t+n}``'s).
    ``idx, actor_goal_idx: (B,)``; ``actor_goals, next_goals: (B, goal_dim)``."""
    d = actor_goal_idx - idx
    within = (d >= 0) & (d < n)
    return jnp.where(within[:, None], actor_goals, next_goals)


@register("agent")
class SHARSA(Agent):
    """SHARSA (see the module docstring). Component arguments are registered classes built as
    ``Cls(spec, key=...)``; Gin-scoped in ``gin/baselines/sharsa.gin``.

    Args:
      high_actor: flow policy class for subgoals (built for ``Spec(act_dim=goal_dim, chunk_len=1)``).
      low_actor: flow policy class for one action (built for ``chunk_len=1``; goal slot = subgoal).
      critic: critic class on ``(s, g, subgoal)`` returning one logit per head, e.g. an Ensemble of
        2 QCritic (built for the subgoal spec).
      value: value class on ``(s, g)`` (built for the data's spec).
      n: subgoal steps in environment steps (25; 50 for cube-octuple and humanoidmaze).
      gamma: per-step discount (0.999).
      tau: EMA rate of the target critic.
      learning_rate: Adam step size (one optimiser over every loss).
      q_agg: ``'min'`` or ``'mean'`` over the target critic heads in the value target.
      value_loss: ``'bce'`` (the authors': logits, values are sigmoids in [0, 1]) or ``'mse'``.
      num_samples: subgoal candidates per decision when acting (32).
      goal_sampling: the hindsight relabelling of goal-conditioned samples (None:
        ``GoalSampling()``, i.e. the ``GoalSampling.*`` Gin bindings; :mod:`macfw.data.goals`).

    Raises:
      ConfigError: a value out of range; at :meth:`init`, data without goals (SHARSA needs
        ``OGBenchDataset.task_mode = 'oraclerep'`` or ``'goal'``).
    """

    acts_in_chunks = False

    def __init__(
        self,
        high_actor: Callable = FlowPolicy,
        low_actor: Callable = FlowPolicy,
        critic: Callable | None = None,
        value: Callable = StateValue,
        *,
        n: int = 25,
        gamma: float = 0.999,
        tau: float = 0.005,
        learning_rate: float = 3e-4,
        q_agg: str = "min",
        value_loss: str = "bce",
        num_samples: int = 32,
        goal_sampling: GoalSampling | None = None,
    ):
        name = type(self).__name__
        for slot, f in (("high_actor", high_actor), ("low_actor", low_actor), ("critic", critic), ("value", value)):
            check(f"{name}.{slot}", f, callable(f), "a network class (see gin/baselines/sharsa.gin)")
        assert critic is not None  # check() refused a non-callable
        self.factories = dict(high_actor=high_actor, low_actor=low_actor, critic=critic, value=value)
        self.n = check_int(f"{name}.n", n)
        self.gamma = check_float(f"{name}.gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
        self.tau = check_float(f"{name}.tau", tau, low=0.0, high=1.0, low_open=True)
        self.learning_rate = check_float(f"{name}.learning_rate", learning_rate, low=0.0, low_open=True)
        self.q_agg = check_choice(f"{name}.q_agg", q_agg, ("min", "mean"))
        self.value_loss = check_choice(f"{name}.value_loss", value_loss, ("bce", "mse"))
        self.num_samples = check_int(f"{name}.num_samples", num_samples)
        self._loss_fn = make_value_loss(self.value_loss, binding=f"{name}.value_loss")
        self.goal_sampling = goal_sampling_for(name, goal_sampling)
        self.spec: Spec | None = None

    @property
    def batch_spec(self) -> BatchSpec:
        """Samples spanning ``n`` environment steps (``next_obs`` = s_{t+n}, ``next_goals`` its goal
        representation) with hindsight-relabelled goals."""
        return BatchSpec(
            chunk_len=self.n, gamma=self.gamma, normalize_reward=False, binding="SHARSA.n", goals=self.goal_sampling
        )

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    # ------------------------------------------------------------------ building
    @staticmethod
    def subgoal_spec(spec: Spec) -> Spec:
        """The spec of networks whose "action" is a subgoal: ``chunk_dim = goal_dim``."""
        return dataclasses.replace(spec, act_dim=spec.goal_dim, chunk_len=1)

    def init(self, spec: Spec, key) -> SHARSAState:
        check(
            "OGBenchDataset.task_mode",
            "singletask",
            spec.goal_dim > 0,
            "'oraclerep' (or 'goal'): SHARSA is goal-conditioned (subgoals are goal representations)",
        )
        self.spec = spec
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        key, *ks = jax.random.split(key, 5)
        f, sub = self.factories, self.subgoal_spec(spec)
        nets = SHARSANetworks(
            high_actor=f["high_actor"](sub, key=ks[0]),
            low_actor=f["low_actor"](dataclasses.replace(spec, chunk_len=1), key=ks[1]),
            critic=f["critic"](sub, key=ks[2]),
            value=f["value"](spec, key=ks[3]),
        )
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        target = copy_of(nets.critic)
        return SHARSAState(step=jnp.zeros((), jnp.int32), key=key, nets=nets, target_critic=target, opt_state=opt_state)

    def check_config(self, batch_size: int) -> None:
        """Builds every network abstractly for a one-unit goal-conditioned spec (the base class's spec
        has no goal, which SHARSA refuses).

        Raises:
          ConfigError: a component rejected a configured value.
        """
        spec, saved = Spec(ob_dim=1, act_dim=1, goal_dim=1, chunk_len=self.n), self.spec
        try:
            eqx.filter_eval_shape(self.init, spec, jax.random.PRNGKey(0))
        except ConfigError:
            raise
        except Exception:
            pass
        finally:
            self.spec = saved

    # ------------------------------------------------------------------ acting
    def select_subgoal(self, nets: SHARSANetworks, s, g, *, key) -> tuple[Array, Array, Array]:
        """Rejection sampling over subgoals: ``(w*, candidates (N, goal_dim), min-Q (N,))`` with
        ``w* = argmax_i min_j Q_j(s, g, w_i)``, ``w_i ~ pi_h(. | s, g)`` (not clipped)."""
        cands = nets.high_actor.sample_many(s, g, self.num_samples, key=key)
        q = jax.vmap(lambda w: nets.critic(s, g, w))(cands).min(axis=-1)
        return cands[jnp.argmax(q)], cands, q

    def act(self, nets: SHARSANetworks, s, g, *, key):
        """One action toward the best of ``num_samples`` subgoals: ``(1, act_dim)`` in [-1, 1]."""
        k_high, k_low = jax.random.split(key)
        w, _, _ = self.select_subgoal(nets, s, g, key=k_high)
        a = nets.low_actor.sample(s, w, key=k_low)
        return jnp.clip(a, -1.0, 1.0).reshape(1, self._built_spec().act_dim)

    # ------------------------------------------------------------------ the update
    def _prob(self, x: Array) -> Array:
        """A head's output as a value: the sigmoid of a BCE logit, or the MSE output itself."""
        return jax.nn.sigmoid(x) if self.value_loss == "bce" else x

    def targets(self, nets: SHARSANetworks, target_critic, batch: dict) -> dict[str, Array]:
        """The regression targets (no gradient): ``targets`` of the critic (:func:`sarsa_targets` with
        ``V(s_{t+n}, g)``), ``value_targets`` ``agg_j Q'_j(s, g, w_data)``, ``subgoals`` w_data, and
        ``high_targets`` the high-level flow's subgoals (:func:`high_actor_targets`)."""
        nets, target_critic = _sg(nets), _sg(target_critic)
        s, g = batch["obs"], batch["value_goals"]
        next_v = self._prob(jax.vmap(nets.value)(batch["next_obs"], g))
        out = sarsa_targets(batch["idx"], batch["value_goal_idx"], next_v, n=self.n, gamma=self.gamma)
        w = dataset_subgoals(out["success"], g, batch["next_goals"])
        q_t = self._prob(batched_heads(target_critic, s, g, w))  # (B, heads)
        out["value_targets"] = q_t.min(axis=1) if self.q_agg == "min" else q_t.mean(axis=1)
        out["subgoals"] = w
        out["high_targets"] = high_actor_targets(
            batch["idx"], batch["actor_goal_idx"], batch["actor_goals"], batch["next_goals"], self.n
        )
        return jax.tree_util.tree_map(_sg, out)

    def noise(self, key, batch_size: int) -> dict[str, Array]:
        """The flow-matching draws of one update, at batch level (the authors' draws, in their order):
        ``z_high (B, goal_dim)``, ``u_high (B,)`` for the high-level flow, ``z_low (B, act_dim)``,
        ``u_low (B,)`` for the low-level flow; ``z ~ N(0, I)``, ``u ~ U[0, 1)``."""
        k_high, k_low = jax.random.split(key)
        kz_h, ku_h = jax.random.split(k_high)
        kz_l, ku_l = jax.random.split(k_low)
        B, sp = batch_size, self._built_spec()
        return {
            "z_high": jax.random.normal(kz_h, (B, sp.goal_dim)),
            "u_high": jax.random.uniform(ku_h, (B,)),
            "z_low": jax.random.normal(kz_l, (B, sp.act_dim)),
            "u_low": jax.random.uniform(ku_l, (B,)),
        }

    def loss(self, nets: SHARSANetworks, batch: dict, tg: dict, noise: dict) -> tuple[Array, dict]:
        """Value, critic, high- and low-level flow-matching losses on ``batch`` with the draws ``noise``
        (:meth:`noise`); ``(total, metrics)``. The metric names map to the authors' (``value/*`` their
        ``high_value/*``, ``critic/target_*`` their ``high_critic/q_*``, the TD targets)."""
        s, g, w = batch["obs"], batch["value_goals"], tg["subgoals"]
        v = jax.vmap(nets.value)(s, g)
        value = jnp.mean(self._loss_fn(v, tg["value_targets"]))
        q = batched_heads(nets.critic, s, g, w)  # (B, heads), members-outer (see batched_heads)
        critic = jnp.mean(jnp.sum(self._loss_fn(q, tg["targets"][:, None]), axis=1))

        a0 = batch["actions"][:, : self._built_spec().act_dim]
        high = jnp.mean(
            jax.vmap(nets.high_actor.flow_loss)(
                s, batch["actor_goals"], tg["high_targets"], noise["z_high"], noise["u_high"]
            )
        )
        low = jnp.mean(jax.vmap(nets.low_actor.flow_loss)(s, batch["next_goals"], a0, noise["z_low"], noise["u_low"]))
        total = value + critic + high + low
        p_v, y = self._prob(v), tg["targets"]
        metrics = {
            "value/loss": value,
            "value/v_mean": p_v.mean(),
            "value/v_max": p_v.max(),
            "value/v_min": p_v.min(),
            "value/target_mean": tg["value_targets"].mean(),
            "critic/loss": critic,
            "critic/q_mean": self._prob(q).mean(),
            "critic/target_mean": y.mean(),
            "critic/target_max": y.max(),
            "critic/target_min": y.min(),
            "critic/success_rate": tg["success"].mean(),
            "high_actor/loss": high,
            "low_actor/loss": low,
            "total/loss": total,
        }
        return total, metrics

    def update(self, state: SHARSAState, batch: dict, noise: dict | None = None) -> tuple[SHARSAState, dict]:
        """One gradient step on the loop's ``n``-step goal-conditioned ``batch`` (pure; jit it), then the
        critic's EMA. ``noise``: the flow-matching draws (:meth:`noise`); None draws them from the state's key."""
        key, k_loss = jax.random.split(state.key)
        if noise is None:
            noise = self.noise(k_loss, batch["obs"].shape[0])
        tg = self.targets(state.nets, state.target_critic, batch)
        nets, opt_state, metrics = gradient_step(
            state.nets, state.opt_state, self.optimizer(), lambda nets: self.loss(nets, batch, tg, noise)
        )
        target = ema(state.target_critic, state.nets.critic, self.tau)  # the critic before this step (the authors')
        return dataclasses.replace(
            state, step=state.step + 1, key=key, nets=nets, target_critic=target, opt_state=opt_state
        ), metrics
