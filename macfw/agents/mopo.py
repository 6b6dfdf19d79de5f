"""MOPO: Model-based Offline Policy Optimization (Yu et al., 2020), as the MAC paper runs it (DESIGN §9).

SAC on a mix of real transitions and transitions imagined by an ensemble of Gaussian one-step
models (an MBPO buffer, :mod:`macfw.agents.mbpo`), with the model reward penalised by the
ensemble's uncertainty. Everything trains jointly with one Adam optimiser on the sum of the losses:

1. models on the real part of the batch: ensemble NLL of ``s'`` (:class:`~macfw.nn.models.GaussianDynamics`,
   7 members), success BCE (termination), reward MSE (single-task);
2. a batch of ``real_ratio`` real and ``1 - real_ratio`` buffer transitions; model rewards become
   ``r - beta * u(s, a)``, MOPO's ``u(s, a) = max_i ||sigma_i(s, a)||_2`` (:meth:`MOPO.penalty`);
3. critic (two Q's, MSE): target ``r + gamma m min_j Q'_j(s', a')``, ``a' ~ pi(s')``, no entropy
   term; goal-conditioned targets clipped to ``[-1 / (1 - gamma), 0]``;
4. SAC actor: ``E[alpha log pi(a|s) - mean_j Q_j(s, a)]``, ``a ~ pi`` reparameterised, alpha and Q
   constant; temperature loss ``alpha (sg(H) - target_entropy)``, target entropy
   ``-0.5 * act_dim``; EMA (tau) of the critics from the critics *before* this step's gradient
   step, ``Q'_{t+1} = (1 - tau) Q'_t + tau Q_t`` (the authors' order).

Every ``ModelRollouts.rollout_freq`` gradient steps :meth:`MOPO.refresh` rolls the current actor
and a random member per step ``rollout_length`` steps from dataset states into the buffer (goal
rewards ``c - 1`` and masks ``1 - c`` from the success head thresholded at 0.5; single-task
rewards from the reward head); goals stay those of the start sample.

Random draws: every noise of an update is drawn at batch level (:meth:`MOPO.draw_noise`) and the
gradient step (:meth:`MOPO.update_on`) is deterministic given them and the mixed batch; a rollout
round likewise (:meth:`MOPO.rollout_noise`, :meth:`MOPO.rollout`).

Parity with the authors' code (``experiments/parity.py --agents mopo,mobile``, issue 29): the same
initial parameters, mixed batches and draws give every metric of their ``total_loss`` after 1 and
10 updates, the parameters after 10, and one rollout round's transitions within float rounding
(largest relative error 4e-5), single-task and goal-conditioned. It found, and macfw now does as
they do: (1) the target critics' EMA read the critics after the step (theirs: before, a one-step
lag; after one update from equal copies their targets are unchanged); (2) the models trained on
the whole loop batch, twice their ``real_batch`` (now the real part of the mixed batch, as theirs:
half the model-loss work); (3) the penalty was evaluated on the whole mixed batch and masked (now on
the model rows only, as their ``compute_penalty``: the same values, half MOBILE's penalty work);
(4) the SAC actor's log-std was tanh-rescaled (theirs is clipped,
:class:`~macfw.nn.actors.TanhGaussianActor`); (5) metrics they log were missing
(``dynamics/sample_mse``, the success head's thresholded accuracies, ``critic/q_max``, ...).
Deliberate deviations: ``success/pos_accuracy`` and ``neg_accuracy`` are 0 where theirs are 0/0 =
NaN (a batch without positives; macfw's loop stops on a non-finite metric); goal-conditioned macfw
builds no reward head (theirs trains one that nothing reads: defect ``gc_reward_head_trained_unused``
in the parity report); the first rollout round comes after ``first_rollout_step`` updates, not
from the untrained models (DESIGN §9); the actor's mean and log-std heads are one ``(hidden, 2 *
act_dim)`` layer initialised as one matrix (theirs: two ``(hidden, act_dim)`` Dense layers, so an
initial weight scale larger by ``sqrt((h + 2 a) / (h + a))``, 1.0024 at ``h = 1024``, ``a = 5``).

Code name -> symbol: ``gamma`` gamma, ``beta`` beta (penalty weight), ``tau`` EMA rate,
``dynamics`` the ensemble ``{N(mu_i, sigma_i)}``, ``critic`` ``{Q_j}``, ``target_critic``
``{Q'_j}``, ``actor`` pi, ``temperature`` alpha. Shapes per example: ``s: (ob_dim,)``,
``a: (act_dim,)``, ``g: (goal_dim,)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

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
from macfw.nn.gaussian import squashed_sample
from macfw.nn.models import RewardModel, SuccessModel, reward_metrics, success_metrics
from macfw.registry import register
from macfw.spec import Spec


class MOPONetworks(eqx.Module):
    """Every trained network of MOPO/MOBILE (what the optimiser updates); equinox Modules used
    duck-typed (``Any``)."""

    dynamics: Any  # Ensemble of GaussianDynamics
    success: Any
    reward: Any | None  # None for goal-conditioned data
    actor: Any
    critic: Any  # Ensemble of QCritic
    temperature: Any


class MOPOState(eqx.Module):
    """Step, key, networks, the critic's EMA copy, the optimiser state and the model-rollout buffer."""

    step: Array
    key: Array
    nets: MOPONetworks
    target_critic: Any  # a copy of nets.critic
    opt_state: Any
    buffer: ModelBuffer


_LOG_2PI = math.log(2.0 * math.pi)


def _q(critic, s, g, a):
    return critic(s, g, a)


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

    def __init__(
        self,
        dynamics: Callable | None = None,
        success: Callable = SuccessModel,
        reward: Callable = RewardModel,
        actor: Callable = TanhGaussianActor,
        critic: Callable | None = None,
        temperature: Callable = Temperature,
        rollouts: ModelRollouts | None = None,
        *,
        gamma: float = 0.999,
        beta: float = 0.003,
        tau: float = 0.005,
        learning_rate: float = 3e-4,
        target_entropy_scale: float = 0.5,
        q_agg: str = "min",
        goal_sampling: GoalSampling | None = None,
    ):
        name = type(self).__name__
        for slot, f in (("dynamics", dynamics), ("critic", critic)):
            check(f"{name}.{slot}", f, callable(f), f"a network class, e.g. @{slot}/Ensemble (see gin/baselines/)")
        assert dynamics is not None and critic is not None  # check() refused a non-callable
        self.factories = dict(
            dynamics=dynamics, success=success, reward=reward, actor=actor, critic=critic, temperature=temperature
        )
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
            dynamics=f["dynamics"](spec, key=ks[0]),
            success=f["success"](spec, key=ks[1]),
            reward=None if spec.goal_conditioned or f["reward"] is None else f["reward"](spec, key=ks[2]),
            actor=f["actor"](spec, key=ks[3]),
            critic=f["critic"](spec, key=ks[4]),
            temperature=f["temperature"](spec, key=ks[5]),
        )
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        target = copy_of(nets.critic)
        return MOPOState(
            step=jnp.zeros((), jnp.int32),
            key=key,
            nets=nets,
            target_critic=target,
            opt_state=opt_state,
            buffer=ModelBuffer.empty(self.rollouts.capacity, spec),
        )

    # ------------------------------------------------------------------ acting
    def act(self, nets: MOPONetworks, s, g, *, key):
        """The actor's mode ``tanh(mean(s, g))``: ``(1, act_dim)`` (the authors evaluate at temperature 0)."""
        return nets.actor.mode(s, g).reshape(1, self._built_spec().act_dim)

    # ------------------------------------------------------------------ the random draws of one update
    def draw_noise(self, nets: MOPONetworks, key, n_real: int, n_model: int) -> dict[str, Array]:
        """Every random draw of one update, made at batch level (:meth:`update_on` is deterministic
        given them; the parity harness passes the same arrays to the authors' code):

        ``dynamics (k, n_real, ob_dim)``: the ensemble's samples of the real ``s'`` (the
        ``dynamics/sample_mse`` metric); ``next_actions (B, act_dim)``: ``a' ~ pi(s')`` of the critic
        target; ``actions (B, act_dim)``: the actor loss's ``a ~ pi(s)``; and the penalty's
        (:meth:`penalty_noise`), each a standard normal. ``B = n_real + n_model``.
        """
        k_dyn, k_next, k_act, k_pen = jax.random.split(key, 4)
        spec = self._built_spec()
        B, A = n_real + n_model, spec.act_dim
        noise = {
            "dynamics": jax.random.normal(k_dyn, (nets.dynamics.num, n_real, spec.ob_dim)),
            "next_actions": jax.random.normal(k_next, (B, A)),
            "actions": jax.random.normal(k_act, (B, A)),
        }
        noise.update(self.penalty_noise(nets, k_pen, n_model))
        return noise

    # ------------------------------------------------------------------ the penalty (MOBILE overrides it)
    def penalty_noise(self, nets: MOPONetworks, key, n: int) -> dict[str, Array]:
        """The penalty's random draws for ``n`` model transitions (MOPO's penalty draws none)."""
        return {}

    def penalty(self, nets: MOPONetworks, target_critic, batch: dict, noise: dict) -> tuple[Array, dict]:
        """MOPO's uncertainty ``u(s, a) = max_i ||sigma_i(s, a)||_2`` per model transition: ``(n,)``."""
        _, log_std = nets.dynamics.over_batch(lambda m, s, a: m.mean_log_std(s, a), batch["obs"], batch["actions"])
        return jnp.max(jnp.linalg.norm(jnp.exp(log_std), axis=-1), axis=0), {}  # log_std: (k, n, ob_dim)

    # ------------------------------------------------------------------ the update
    def _actor_samples(self, actor, s, g, eps) -> tuple[Array, Array, Array]:
        """``a = tanh(mean + std * eps)``, ``log pi(a | s, g)`` and the pre-squash log-std for a batch:
        ``(B, act_dim)``, ``(B,)``, ``(B, act_dim)``."""
        mean, log_std = jax.vmap(actor.mean_log_std)(s, g)
        return (*squashed_sample(mean, log_std, eps), log_std)

    def _target_q(self, nets, target_critic, batch, eps) -> Array:
        """``r + gamma m agg_j Q'_j(s', a')`` with ``a' = tanh(mean + std * eps)`` from ``pi(s', g_v)``
        (no entropy term): ``(B,)``."""
        a_next, _, _ = self._actor_samples(nets.actor, batch["next_obs"], batch["value_goals"], eps)
        q_next = target_critic.over_batch(_q, batch["next_obs"], batch["value_goals"], a_next)  # (k, B)
        q_next = q_next.min(axis=0) if self.q_agg == "min" else q_next.mean(axis=0)
        target = batch["rewards"] + self.gamma * batch["masks"] * q_next
        if self._built_spec().goal_conditioned:
            target = jnp.clip(target, -1.0 / (1.0 - self.gamma), 0.0)
        return target

    def loss(self, nets: MOPONetworks, real: dict, mixed: dict, target_q: Array, noise: dict) -> tuple[Array, dict]:
        """Model losses on ``real``, critic and actor losses on ``mixed``; ``(total, metrics)``.

        Metrics: the authors' (``agents/mopo.py``'s ``total_loss`` info) under macfw's names, e.g.
        their ``success/accuracy_0.7`` is ``success/accuracy_0.7``, ``critic/q_max`` is
        ``critic/q_max``, ``actor/std`` is ``actor/std_mean`` (see ``experiments/parity_cases/mopo.py``).
        """
        # models on the real transitions: one evaluation of every member gives the NLL and the metrics
        mean, log_std = nets.dynamics.over_batch(
            lambda m, s, a: m.mean_log_std(s, a), real["obs"], real["actions"]
        )  # (k, n, ob_dim) each
        s_next = real["next_obs"][None]
        z = (s_next - mean) * jnp.exp(-log_std)
        dyn = jnp.mean(-jnp.sum(-0.5 * z**2 - log_std - 0.5 * _LOG_2PI, axis=-1))
        sample = mean + jnp.exp(log_std) * noise["dynamics"]
        metrics = {
            "dynamics/loss": dyn,
            "dynamics/mse": jnp.mean((_sg(mean) - s_next) ** 2),
            "dynamics/sample_mse": jnp.mean((_sg(sample) - s_next) ** 2),
            "dynamics/std_mean": jnp.mean(jnp.exp(_sg(log_std))),
        }

        label = 1.0 - real["masks"]
        logit = jax.vmap(nets.success)(real["obs"], real["value_goals"], real["actions"])
        succ = jnp.mean(optax.sigmoid_binary_cross_entropy(logit, label))
        metrics.update(_success_metrics(_sg(logit), label), **{"success/loss": succ})
        total = dyn + succ
        if nets.reward is not None:
            r = jax.vmap(nets.reward)(real["obs"], real["value_goals"], real["actions"])
            rew = jnp.mean((r - real["rewards"]) ** 2)
            total = total + rew
            metrics.update({"reward/loss": rew, "reward/pred": r.mean(), **reward_metrics(r, real["rewards"])})

        q = nets.critic.over_batch(_q, mixed["obs"], mixed["value_goals"], mixed["actions"])  # (k, B)
        critic_loss = jnp.mean((q - target_q[None]) ** 2)

        a, log_p, pi_log_std = self._actor_samples(nets.actor, mixed["obs"], mixed["actor_goals"], noise["actions"])
        q_pi = _sg(nets.critic).over_batch(_q, mixed["obs"], mixed["actor_goals"], a).mean(axis=0)
        alpha = _sg(nets.temperature())
        actor_loss = jnp.mean(alpha * log_p - q_pi)
        temp_loss, m_t = nets.temperature.loss(log_p, -self.target_entropy_scale * self._built_spec().act_dim)

        total = total + critic_loss + actor_loss + temp_loss
        metrics.update(m_t)
        metrics.update(
            {
                "critic/loss": critic_loss,
                "critic/q_mean": q.mean(),
                "critic/q_max": q.max(),
                "critic/q_min": q.min(),
                "critic/target_mean": target_q.mean(),
                "actor/loss": actor_loss,
                "actor/q_mean": q_pi.mean(),
                "actor/std_mean": jnp.mean(jnp.exp(_sg(pi_log_std))),
                "total/loss": total,
            }
        )
        return total, metrics

    def update(self, state: MOPOState, batch: dict) -> tuple[MOPOState, dict]:
        """One gradient step on the loop's one-step ``batch`` and the model buffer (pure; jit it).

        The batch's first ``B - n_model`` transitions are the real part of the mixed batch (and the
        models' batch, as the authors' ``real_batch``); the model part comes from the buffer
        (:func:`~macfw.agents.mbpo.mix`). Then :meth:`update_on` with the draws of :meth:`draw_noise`.
        """
        key, k_mix, k_noise = jax.random.split(state.key, 3)
        real_all = one_step_view(batch)
        B = batch["obs"].shape[0]
        n_model = self.rollouts.model_batch_size(B)
        mixed, is_model = mix(real_all, state.buffer, k_mix, n_model)
        real = {f: v[: B - n_model] for f, v in real_all.items()}
        noise = self.draw_noise(state.nets, k_noise, B - n_model, n_model)
        state, metrics = self.update_on(state, real, mixed, is_model, noise)
        return dataclasses.replace(state, key=key), metrics

    def update_on(
        self, state: MOPOState, real: dict, mixed: dict, is_model: Array, noise: dict
    ) -> tuple[MOPOState, dict]:
        """The gradient step given the real transitions ``real`` (``n_real`` of them, the models'
        batch), the mixed batch ``mixed`` (``B``: ``real`` first, then ``n_model`` buffer
        transitions, flagged by ``is_model: (B,)``) and the draws ``noise`` (:meth:`draw_noise`).
        Deterministic; ``state.key`` is left as it is. The penalty is computed on the model part only.
        """
        nets = state.nets
        n_real = real["obs"].shape[0]
        model_part = {f: v[n_real:] for f, v in mixed.items()}
        u, m_pen = self.penalty(_sg(nets), _sg(state.target_critic), model_part, noise)
        is_m = is_model[n_real:]
        mixed = dict(mixed, rewards=mixed["rewards"].at[n_real:].add(-self.beta * is_m * _sg(u)))
        target_q = _sg(self._target_q(_sg(nets), _sg(state.target_critic), mixed, noise["next_actions"]))

        nets, opt_state, metrics = gradient_step(
            nets, state.opt_state, self.optimizer(), lambda nets: self.loss(nets, real, mixed, target_q, noise)
        )
        # the authors' order: the EMA reads the critics before this step (their target_update reads
        # self.network, the pre-update parameters): Q'_{t+1} = (1 - tau) Q'_t + tau Q_t
        target = ema(state.target_critic, state.nets.critic, self.tau)
        n_m = jnp.maximum(jnp.sum(is_m), 1.0)
        metrics.update(
            {
                **m_pen,
                "penalty/mean": jnp.sum(u * is_m) / n_m,
                "buffer/size": state.buffer.size.astype(jnp.float32),
                "buffer/model_fraction": jnp.mean(is_model),
            }
        )
        return dataclasses.replace(
            state, step=state.step + 1, nets=nets, target_critic=target, opt_state=opt_state
        ), metrics

    # ------------------------------------------------------------------ the model buffer
    def rollout_noise(self, nets: MOPONetworks, key, num: int) -> dict[str, Array]:
        """The random draws of one rollout round from ``num`` start states (standard normals unless
        said): ``actions (H, num, act_dim)`` (``a ~ pi``), ``dynamics (H, num, ob_dim)`` (``s'`` from
        the chosen member) and ``members (H, num)`` int32 (the member of each step, uniform)."""
        H = self.rollouts.rollout_length
        k_a, k_s, k_m = jax.random.split(key, 3)
        spec = self._built_spec()
        return {
            "actions": jax.random.normal(k_a, (H, num, spec.act_dim)),
            "dynamics": jax.random.normal(k_s, (H, num, spec.ob_dim)),
            "members": jax.random.randint(k_m, (H, num), 0, nets.dynamics.num),
        }

    def rollout(self, nets: MOPONetworks, starts: dict, noise: dict) -> dict[str, Array]:
        """One rollout round: ``H`` model steps from every start state with the draws ``noise``
        (:meth:`rollout_noise`); returns the transitions of :data:`~macfw.agents.mbpo.FIELDS`, each
        ``(H * num, ...)``, step-major. Actions ``clip(a, -1, 1)``, ``a ~ pi(s, g_v)``; ``s'`` from
        member ``members[t]``; goal-conditioned ``c = 1[sigmoid(c(s, g_v, a)) > 0.5]``, reward
        ``c - 1``; single-task reward from the reward head; mask ``1 - c``; goals of the start sample."""
        nets = _sg(nets)
        s0, vg, ag = starts["obs"], starts["value_goals"], starts["actor_goals"]
        N, gc = s0.shape[0], self._built_spec().goal_conditioned
        if gc:
            reward_fn = None
        elif nets.reward is None:
            raise ValueError(f"{type(self).__name__} on single-task data needs a reward model, got nets.reward = None")
        else:
            reward_fn = jax.vmap(nets.reward)

        def step(s, nz):
            a, _, _ = self._actor_samples(nets.actor, s, vg, nz["actions"])
            a = jnp.clip(a, -1.0, 1.0)
            mean, log_std = nets.dynamics.over_batch(lambda m, s, a: m.mean_log_std(s, a), s, a)  # (k, N, ob_dim)
            rows = jnp.arange(s.shape[0])
            s_next = mean[nz["members"], rows] + jnp.exp(log_std[nz["members"], rows]) * nz["dynamics"]
            c = (jax.nn.sigmoid(jax.vmap(nets.success)(s, vg, a)) > 0.5).astype(jnp.float32)
            r = c - 1.0 if reward_fn is None else reward_fn(s, vg, a)
            return s_next, {"obs": s, "actions": a, "next_obs": s_next, "rewards": r, "masks": 1.0 - c}

        with jax.named_scope("rollout"):
            _, outs = jax.lax.scan(step, s0, noise)
        H = noise["members"].shape[0]
        flat = {k: v.reshape(H * N, *v.shape[2:]) for k, v in outs.items()}
        flat["value_goals"] = jnp.tile(vg, (H, 1))
        flat["actor_goals"] = jnp.tile(ag, (H, 1))
        return flat

    def refresh(self, state: MOPOState, starts: dict) -> tuple[MOPOState, dict]:
        """One rollout round (:meth:`rollout`): ``rollout_length`` model steps from every start state
        into the buffer."""
        key, k_roll = jax.random.split(state.key)
        flat = self.rollout(state.nets, starts, self.rollout_noise(state.nets, k_roll, starts["obs"].shape[0]))
        buffer = state.buffer.add(flat)
        metrics = {
            "buffer/rollout_reward_mean": flat["rewards"].mean(),
            "buffer/rollout_done_rate": 1.0 - flat["masks"].mean(),
        }
        return dataclasses.replace(state, key=key, buffer=buffer), metrics


def _success_metrics(logit: Array, label: Array) -> dict[str, Array]:
    """The authors' success-head metrics (``agents/mopo.py``'s ``success_loss``) from logits and
    labels ``(n,)``: the mean probability and the accuracy at 0.5, and
    :func:`~macfw.nn.models.success_metrics` (the range, the accuracy at 0.7 and 0.9, per class, the
    label mean; 0 where theirs is 0/0 = NaN: macfw's loop stops on a non-finite metric)."""
    p = jax.nn.sigmoid(logit)
    return {
        "success/prob": p.mean(),
        "success/accuracy": jnp.mean(((p > 0.5) == (label > 0.5)).astype(jnp.float32)),
        **success_metrics(p, label),
    }
