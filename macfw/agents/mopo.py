"""MOPO: Model-based Offline Policy Optimization (Yu et al., 2020), as the MAC paper runs it (DESIGN §9).

SAC on a mix of real transitions and transitions imagined by an ensemble of Gaussian one-step
models (an MBPO buffer, :mod:`macfw.agents.mbpo`), with the model reward penalised by the
ensemble's uncertainty. Everything trains jointly with one Adam optimiser on the sum of the losses:

1. models on the real batch: ensemble NLL of ``s'`` (:class:`~macfw.nn.models.GaussianDynamics`,
   7 members), success BCE (termination), reward MSE (single-task);
2. a batch of ``real_ratio`` real and ``1 - real_ratio`` buffer transitions; model rewards become
   ``r - beta * u(s, a)``, MOPO's ``u(s, a) = max_i ||sigma_i(s, a)||_2`` (:meth:`MOPO.penalty`);
3. critic (two Q's, MSE): target ``r + gamma m min_j Q'_j(s', a')``, ``a' ~ pi(s')``, no entropy
   term; goal-conditioned targets clipped to ``[-1 / (1 - gamma), 0]``;
4. SAC actor: ``E[alpha log pi(a|s) - mean_j Q_j(s, a)]``, ``a ~ pi`` reparameterised, alpha and Q
   constant; temperature loss ``alpha (sg(H) - target_entropy)``, target entropy
   ``-0.5 * act_dim``; EMA (tau) of the critic.

Every ``ModelRollouts.rollout_freq`` gradient steps :meth:`MOPO.refresh` rolls the current actor
and a random member per step ``rollout_length`` steps from dataset states into the buffer (goal
rewards ``c - 1`` and masks ``1 - c`` from the success head thresholded at 0.5; single-task
rewards from the reward head); goals stay those of the start sample.

Code name -> symbol: ``gamma`` gamma, ``beta`` beta (penalty weight), ``tau`` EMA rate,
``dynamics`` the ensemble ``{N(mu_i, sigma_i)}``, ``critic`` ``{Q_j}``, ``target_critic``
``{Q'_j}``, ``actor`` pi, ``temperature`` alpha. Shapes per example: ``s: (ob_dim,)``,
``a: (act_dim,)``, ``g: (goal_dim,)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from macfw.agents.base import Agent, BatchSpec, RefreshSpec, copy_of, ema, gradient_step
from macfw.agents.mbpo import ModelBuffer, ModelRollouts, mix, one_step_view
from macfw.data.goals import GoalSampling, goal_sampling_for
from macfw.errors import check, check_choice, check_float
from macfw.nn.actors import TanhGaussianActor, Temperature
from macfw.nn.models import RewardModel, SuccessModel
from macfw.registry import register
from macfw.rollout import imagine
from macfw.spec import Spec


class MOPONetworks(eqx.Module):
    """Every trained network of MOPO/MOBILE (what the optimiser updates)."""

    dynamics: eqx.Module  # Ensemble of GaussianDynamics
    success: eqx.Module
    reward: eqx.Module | None  # None for goal-conditioned data
    actor: eqx.Module
    critic: eqx.Module  # Ensemble of QCritic
    temperature: eqx.Module


class MOPOState(eqx.Module):
    """Step, key, networks, the critic's EMA copy, the optimiser state and the model-rollout buffer."""

    step: Array
    key: Array
    nets: MOPONetworks
    target_critic: eqx.Module
    opt_state: Any
    buffer: ModelBuffer


def _sg(tree):
    return jax.lax.stop_gradient(tree)


@register("agent")
class MOPO(Agent):
    """MOPO (see the module docstring). Component arguments are registered classes built as
    ``Cls(spec, key=...)``; ``dynamics`` and ``critic`` are Gin-scoped ensembles (``gin/baselines/mopo.gin``).

    Args:
      dynamics, success, reward, actor, critic, temperature: component factories.
      rollouts: the model-buffer settings (:class:`~macfw.agents.mbpo.ModelRollouts`).
      gamma: per-step discount.
      beta: weight of the uncertainty penalty.
      tau: EMA rate of the target critic.
      learning_rate: Adam step size (one optimiser over every loss).
      target_entropy_scale: target entropy ``-target_entropy_scale * act_dim``.
      q_agg: ``'min'`` or ``'mean'`` over the target critics.
      goal_sampling: the hindsight relabelling of goal-conditioned samples (None:
        ``GoalSampling()``, i.e. the ``GoalSampling.*`` Gin bindings; :mod:`macfw.data.goals`).

    Raises:
      ConfigError: a value out of range.
    """

    acts_in_chunks = False

    def __init__(self, dynamics: Callable | None = None, success: Callable = SuccessModel,
                 reward: Callable = RewardModel, actor: Callable = TanhGaussianActor, critic: Callable | None = None,
                 temperature: Callable = Temperature, rollouts: ModelRollouts | None = None, *, gamma: float = 0.999,
                 beta: float = 0.003, tau: float = 0.005, learning_rate: float = 3e-4,
                 target_entropy_scale: float = 0.5, q_agg: str = "min",
                 goal_sampling: GoalSampling | None = None):
        name = type(self).__name__
        for slot, f in (("dynamics", dynamics), ("critic", critic)):
            check(f"{name}.{slot}", f, callable(f), f"a network class, e.g. @{slot}/Ensemble (see gin/baselines/)")
        self.factories = dict(dynamics=dynamics, success=success, reward=reward, actor=actor, critic=critic,
                              temperature=temperature)
        self.rollouts = rollouts if rollouts is not None else ModelRollouts()
        self.gamma = check_float(f"{name}.gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
        self.beta = check_float(f"{name}.beta", beta, low=0.0)
        self.tau = check_float(f"{name}.tau", tau, low=0.0, high=1.0, low_open=True)
        self.learning_rate = check_float(f"{name}.learning_rate", learning_rate, low=0.0, low_open=True)
        self.target_entropy_scale = check_float(f"{name}.target_entropy_scale", target_entropy_scale)
        self.q_agg = check_choice(f"{name}.q_agg", q_agg, ("min", "mean"))
        self.goal_sampling = goal_sampling_for(name, goal_sampling)
        self.spec: Spec | None = None

    @property
    def batch_spec(self) -> BatchSpec:
        """One-step transitions with hindsight-relabelled goals (goal-conditioned data)."""
        return BatchSpec(chunk_len=1, gamma=self.gamma, normalize_reward=False, goals=self.goal_sampling)

    def refresh_spec(self) -> RefreshSpec:
        return self.rollouts.refresh_spec()

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    # ------------------------------------------------------------------ building
    def init(self, spec: Spec, key) -> MOPOState:
        self.spec = spec
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        key, *ks = jax.random.split(key, 7)
        f = self.factories
        nets = MOPONetworks(
            dynamics=f["dynamics"](spec, key=ks[0]), success=f["success"](spec, key=ks[1]),
            reward=None if spec.goal_conditioned or f["reward"] is None else f["reward"](spec, key=ks[2]),
            actor=f["actor"](spec, key=ks[3]), critic=f["critic"](spec, key=ks[4]),
            temperature=f["temperature"](spec, key=ks[5]))
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        target = copy_of(nets.critic)
        return MOPOState(step=jnp.zeros((), jnp.int32), key=key, nets=nets, target_critic=target,
                         opt_state=opt_state, buffer=ModelBuffer.empty(self.rollouts.capacity, spec))

    # ------------------------------------------------------------------ acting
    def act(self, nets: MOPONetworks, s, g, *, key):
        """The actor's mode ``tanh(mean(s, g))``: ``(1, act_dim)`` (the authors evaluate at temperature 0)."""
        return nets.actor.mode(s, g).reshape(1, self.spec.act_dim)

    # ------------------------------------------------------------------ the penalty (MOBILE overrides it)
    def penalty(self, nets: MOPONetworks, target_critic, batch: dict, key) -> tuple[Array, dict]:
        """MOPO's uncertainty ``u(s, a) = max_i ||sigma_i(s, a)||_2`` per transition: ``(B,)``."""
        def one(s, a):
            log_std = nets.dynamics.apply(lambda m: m.mean_log_std(s, a)[1])  # (k, ob_dim)
            return jnp.max(jnp.linalg.norm(jnp.exp(log_std), axis=-1))

        u = jax.vmap(one)(batch["obs"], batch["actions"])
        return u, {}

    # ------------------------------------------------------------------ the update
    def _target_q(self, nets, target_critic, batch, key) -> Array:
        """``r + gamma m agg_j Q'_j(s', a')`` with ``a' ~ pi(s', g_v)`` (no entropy term): ``(B,)``."""
        B = batch["rewards"].shape[0]
        a_next, _ = jax.vmap(lambda s, g, k: nets.actor.sample_and_log_prob(s, g, key=k))(
            batch["next_obs"], batch["value_goals"], jax.random.split(key, B))
        q_next = jax.vmap(target_critic)(batch["next_obs"], batch["value_goals"], a_next)  # (B, k)
        q_next = q_next.min(axis=1) if self.q_agg == "min" else q_next.mean(axis=1)
        target = batch["rewards"] + self.gamma * batch["masks"] * q_next
        if self.spec.goal_conditioned:
            target = jnp.clip(target, -1.0 / (1.0 - self.gamma), 0.0)
        return target

    def loss(self, nets: MOPONetworks, real: dict, mixed: dict, target_q: Array, key) -> tuple[Array, dict]:
        """Model losses on ``real``, critic and actor losses on ``mixed``; ``(total, metrics)``."""
        B = mixed["rewards"].shape[0]
        dyn, m = jax.vmap(nets.dynamics.loss)(real["obs"], real["actions"], real["next_obs"])
        succ, m_s = jax.vmap(nets.success.loss)(real["obs"], real["value_goals"], real["actions"], 1.0 - real["masks"])
        total = dyn.mean() + succ.mean()
        metrics = {**m, **m_s}
        if nets.reward is not None:
            rew, m_r = jax.vmap(nets.reward.loss)(real["obs"], real["value_goals"], real["actions"], real["rewards"])
            total = total + rew.mean()
            metrics.update(m_r)
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}

        q = jax.vmap(nets.critic)(mixed["obs"], mixed["value_goals"], mixed["actions"])  # (B, k)
        critic_loss = jnp.mean((q - target_q[:, None]) ** 2)

        a, log_p = jax.vmap(lambda s, g, k: nets.actor.sample_and_log_prob(s, g, key=k))(
            mixed["obs"], mixed["actor_goals"], jax.random.split(key, B))
        q_pi = jax.vmap(_sg(nets.critic))(mixed["obs"], mixed["actor_goals"], a).mean(axis=1)
        alpha = _sg(nets.temperature())
        actor_loss = jnp.mean(alpha * log_p - q_pi)
        temp_loss, m_t = nets.temperature.loss(log_p, -self.target_entropy_scale * self.spec.act_dim)

        total = total + critic_loss + actor_loss + temp_loss
        metrics.update(m_t)
        metrics.update({"critic/loss": critic_loss, "critic/q_mean": q.mean(), "critic/target_mean": target_q.mean(),
                        "actor/loss": actor_loss, "actor/q_mean": q_pi.mean(), "total/loss": total})
        return total, metrics

    def update(self, state: MOPOState, batch: dict) -> tuple[MOPOState, dict]:
        """One gradient step on the loop's one-step ``batch`` and the model buffer (pure; jit it)."""
        key, k_mix, k_pen, k_next, k_loss = jax.random.split(state.key, 5)
        nets = state.nets
        real = one_step_view(batch)
        num_model = self.rollouts.model_batch_size(batch["obs"].shape[0])
        mixed, is_model = mix(real, state.buffer, k_mix, num_model)
        u, m_pen = self.penalty(_sg(nets), _sg(state.target_critic), mixed, k_pen)
        mixed = dict(mixed, rewards=mixed["rewards"] - self.beta * is_model * _sg(u))
        target_q = _sg(self._target_q(_sg(nets), _sg(state.target_critic), mixed, k_next))

        nets, opt_state, metrics = gradient_step(
            nets, state.opt_state, self.optimizer(), lambda nets: self.loss(nets, real, mixed, target_q, k_loss))
        target = ema(state.target_critic, nets.critic, self.tau)
        n_model = jnp.maximum(jnp.sum(is_model), 1.0)
        metrics.update({**m_pen, "penalty/mean": jnp.sum(u * is_model) / n_model,
                        "buffer/size": state.buffer.size.astype(jnp.float32),
                        "buffer/model_fraction": jnp.mean(is_model)})
        return dataclasses.replace(state, step=state.step + 1, key=key, nets=nets, target_critic=target,
                                   opt_state=opt_state), metrics

    # ------------------------------------------------------------------ the model buffer
    def refresh(self, state: MOPOState, starts: dict) -> tuple[MOPOState, dict]:
        """One rollout round: ``rollout_length`` model steps from every start state into the buffer."""
        nets = _sg(state.nets)
        key, k_roll = jax.random.split(state.key)
        s0, vg, ag = starts["obs"], starts["value_goals"], starts["actor_goals"]
        N = s0.shape[0]
        gc = self.spec.goal_conditioned

        def step(s, k):
            ka, kd = jax.random.split(k)
            a = jnp.clip(jax.vmap(lambda s, g, k: nets.actor.sample(s, g, key=k))(s, vg, jax.random.split(ka, N)),
                         -1.0, 1.0)
            s_next = jax.vmap(lambda s, a, k: nets.dynamics.sample(s, a, key=k))(s, a, jax.random.split(kd, N))
            c = (jax.nn.sigmoid(jax.vmap(nets.success)(s, vg, a)) > 0.5).astype(jnp.float32)
            r = c - 1.0 if gc else jax.vmap(nets.reward)(s, vg, a)
            return s_next, {"obs": s, "actions": a, "next_obs": s_next, "rewards": r, "masks": 1.0 - c}

        _, outs = imagine(step, s0, k_roll, self.rollouts.rollout_length)
        H = self.rollouts.rollout_length
        flat = {k: v.reshape(H * N, *v.shape[2:]) for k, v in outs.items()}
        flat["value_goals"] = jnp.tile(vg, (H, 1))
        flat["actor_goals"] = jnp.tile(ag, (H, 1))
        buffer = state.buffer.add(flat)
        metrics = {"buffer/rollout_reward_mean": flat["rewards"].mean(),
                   "buffer/rollout_done_rate": 1.0 - flat["masks"].mean()}
        return dataclasses.replace(state, key=key, buffer=buffer), metrics
