"""MAC: Model-Based RL with Action Chunks (Park, Park, Lee, Levine, ICLR 2026).

The whole update on one screen (DESIGN §2.4), composed from registered parts:

1. model losses on the batch: chunk dynamics ``f``, flow matching + distillation for the
   behaviour policy, success model ``c``, reward model ``r`` (single-task);
2. an imagined rollout of ``H`` chunks without gradient: ``A_k = sampler(s_k, g)``,
   ``s_{k+1} = f(s_k, A_k)``, reward/mask from ``c`` (and ``r``);
3. lambda-returns with ``Gamma = gamma^n`` against the EMA value ``V'``; value loss;
4. critic loss on the first imagined step: ``(Q(s_0, g, A_0) - sg(r_0 + Gamma m_0 V(s_1, g)))^2``;
5. one Adam step on the sum of all losses, then the EMA update of ``V'``.

Code name -> paper symbol: ``chunk_len`` n, ``horizon`` H (chunks), ``gamma`` gamma,
``lam`` lambda, ``tau`` EMA rate, ``dynamics`` f, ``policy`` (v, mu), ``critic`` Q,
``value`` V, ``target_value`` V', ``success`` c, ``reward`` r.

Parity with the authors' code (``experiments/parity.py --agents mac``, issue 29): with the same
parameters, batches and noise, every term the authors' ``MACAgent.update`` logs, the gradients and the
parameters (the target value included) agree to within 3e-5 relative after 1 and 10 updates, both
goal-conditioned and single-task (2 x 64 networks, batch 32, H = 10, N = 8; 2026-12-07). The case
found two differences, now as the authors have them (``tests/test_mac.py``):

* the distillation target is the flow ODE's solution clipped to [-1, 1]
  (:meth:`~macfw.nn.flow.FlowPolicy.loss_from_noise`);
* the EMA of the target value averages in the value *before* the gradient step (the authors'
  ``target_update`` reads the pre-update parameters), so ``V'`` trails ``V`` by one more step.

Deliberate deviations: goal-conditioned, macfw builds no reward head (the authors' batches carry
``rewards = success - 1`` and their ``total_loss`` trains a reward head on them that no loss or
rollout reads: a network's forward and backward pass per update for nothing); the per-class success
accuracies are 0 where the authors' ratio is 0/0 = NaN (every single-task batch has no positive
label; a NaN metric would stop macfw's loop); at ``lam = 1`` the returns use ``V'(s_H)`` alone
(:func:`monte_carlo_returns`, the same values). Data: macfw samples every chunk start ``t`` with
``t + n <= `` the trajectory's final observation (:func:`~macfw.data.batches.valid_starts`); the
authors' ``ACGCDataset`` stops two steps earlier (its compact-layout ``terminal_locs`` mark the last
two observations), so at n = 10 on 1001-step episodes macfw has 2 more starts per 991 (0.2%); and
macfw's later-state goals may be the final observation, theirs stop one before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from macfw import reference
from macfw.agents.base import (
    Agent,
    BatchSpec,
    copy_of,
    ema,
    gradient_step,
    param_checksum,  # noqa: F401  (re-exported)
    vmap_steps,
)
from macfw.data.goals import GoalSampling, goal_sampling_for
from macfw.errors import check_float, check_int
from macfw.nn.flow import FlowPolicy
from macfw.nn.mlp import fold_layer_norms
from macfw.nn.models import (
    ChunkDynamics,
    QCritic,
    RewardModel,
    StateValue,
    SuccessModel,
    evaluate_jointly,
    reward_metrics,
    success_metrics,
)
from macfw.registry import register
from macfw.rollout import imagine
from macfw.samplers import RejectionSampler, Sampler
from macfw.spec import Spec


class Networks(eqx.Module):
    """Every trained network of MAC (the parameters the optimiser updates).

    Each is an :class:`equinox.Module` built by a component factory and used duck-typed (called,
    ``.loss``, ...), hence typed ``Any``.
    """

    dynamics: Any
    policy: Any
    critic: Any
    value: Any
    success: Any
    reward: Any | None
    actor: Any | None = None  # an extra actor (MAC-FQL, macfw.agents.fql); None for MAC


class TrainState(eqx.Module):
    """Everything an update reads and writes.

    Attributes:
      step: gradient steps taken (int32 scalar).
      nets: the trained networks.
      target_value: EMA copy of ``nets.value`` (``V'``).
      opt_state: optax state.
      key: raw PRNG key data ``(2,)`` uint32 (checkpointable as a plain array).
    """

    step: Array
    nets: Networks
    target_value: Any  # a copy of nets.value
    opt_state: Any
    key: Array


def lambda_returns(rewards, masks, values, *, discount: float, lam: float):
    """Lambda-returns of an imagined rollout (DESIGN §2.4 step 3).

    Args:
      rewards, masks: ``(H, ...)`` per chunk step ``r_k``, ``m_k``.
      values: ``(H + 1, ...)`` target values ``V'(s_k)`` for ``k = 0..H``.
      discount: ``Gamma = gamma^n`` (per chunk).
      lam: ``lambda``.

    Returns:
      ``(H, ...)`` targets ``G_k = V'(s_k) + adv_k`` with
      ``delta_k = r_k + Gamma m_k V'(s_{k+1}) - V'(s_k)``,
      ``adv_k = delta_k + Gamma lambda m_k adv_{k+1}``, ``adv_H = 0``.
    """
    deltas = rewards + discount * masks * values[1:] - values[:-1]

    def step(adv_next, x):
        delta, m = x
        adv = delta + discount * lam * m * adv_next
        return adv, adv

    _, advs = jax.lax.scan(step, jnp.zeros_like(values[0]), (deltas, masks), reverse=True)
    return values[:-1] + advs


def monte_carlo_returns(rewards, masks, last_value, *, discount: float):
    """The lambda-returns at ``lambda = 1`` (:func:`lambda_returns`), from the last state's value alone.

    With ``lambda = 1`` the intermediate values cancel: ``G_k = r_k + Gamma m_k G_{k+1}``,
    ``G_H = V'(s_H)``, so ``V'(s_0..s_{H-1})`` need not be computed (MAC's default ``lam = 1.0``
    evaluates ``V'`` on ``B`` states instead of ``(H + 1) B``; issue 12). Equal to
    ``lambda_returns(rewards, masks, values, discount=discount, lam=1.0)`` up to float rounding for
    any ``values`` whose last row is ``last_value`` (``tests/test_lambda_returns.py``).

    Args:
      rewards, masks: ``(H, ...)`` per chunk step ``r_k``, ``m_k``.
      last_value: ``(...)`` ``V'(s_H)``.
      discount: ``Gamma = gamma^n`` (per chunk).

    Returns:
      ``(H, ...)`` returns ``G_k``.
    """

    def step(g_next, x):
        r, m = x
        g = r + discount * m * g_next
        return g, g

    _, returns = jax.lax.scan(step, last_value, (rewards, masks), reverse=True)
    return returns


@register("agent")
class MAC(Agent):
    """The MAC agent: component factories plus the update and acting rules.

    Component arguments are registered classes (Gin: ``MAC.dynamics = @ChunkDynamics``); each is
    called as ``Cls(spec, key=...)`` with hyperparameters bound by Gin. ``sampler`` is an instance.

    Args:
      chunk_len: action-chunk length n in environment steps (the data, model, policy and critic
        all follow it).
      normalize_reward: single-task chunk reward divided by n (the authors' scale; DESIGN §2.1).
      gamma: per-step discount (``Gamma = gamma ** chunk_len`` per chunk).
      lam: lambda of the lambda-returns.
      horizon: imagined rollout length H in chunks (H * n environment steps).
      tau: EMA rate of the target value.
      learning_rate: Adam step size.
      rollout_batch_size: states rolled out per update (None: the whole batch).
      grad_clip: global-norm gradient clipping (None: off).
      unroll_rollout: unroll the H-step rollout loop in the compiled program (larger program;
        lets XLA fuse across steps and count every step's FLOPs).
      goal_sampling: the hindsight relabelling of goal-conditioned samples (None:
        ``GoalSampling()``, i.e. the ``GoalSampling.*`` Gin bindings; :mod:`macfw.data.goals`).
    """

    def __init__(
        self,
        dynamics: Callable = ChunkDynamics,
        policy: Callable = FlowPolicy,
        critic: Callable = QCritic,
        value: Callable = StateValue,
        success: Callable = SuccessModel,
        reward: Callable = RewardModel,
        sampler: Sampler | None = None,
        *,
        chunk_len: int = 10,
        normalize_reward: bool = True,
        gamma: float = 0.99,
        lam: float = 1.0,
        horizon: int = 10,
        tau: float = 0.005,
        learning_rate: float = 3e-4,
        rollout_batch_size: int | None = None,
        grad_clip: float | None = None,
        unroll_rollout: bool = False,
        goal_sampling: GoalSampling | None = None,
    ):
        self._chunk_len = check_int("MAC.chunk_len", chunk_len)
        self.normalize_reward = bool(normalize_reward)
        self.gamma = check_float("MAC.gamma", gamma, low=0.0, high=1.0, low_open=True)
        self.lam = check_float("MAC.lam", lam, low=0.0, high=1.0)
        self.horizon = check_int("MAC.horizon", horizon)
        self.tau = check_float("MAC.tau", tau, low=0.0, high=1.0, low_open=True)
        self.learning_rate = check_float("MAC.learning_rate", learning_rate, low=0.0, low_open=True)
        self.rollout_batch_size = check_int("MAC.rollout_batch_size", rollout_batch_size, allow_none=True)
        self.grad_clip = check_float("MAC.grad_clip", grad_clip, low=0.0, low_open=True, allow_none=True)
        self.factories = dict(
            dynamics=dynamics, policy=policy, critic=critic, value=value, success=success, reward=reward
        )
        self.sampler = sampler if sampler is not None else RejectionSampler()
        self.unroll_rollout = bool(unroll_rollout)
        self.goal_sampling = goal_sampling_for(type(self).__name__, goal_sampling)
        self.spec: Spec | None = None

    acts_in_chunks = True

    @property
    def batch_spec(self) -> BatchSpec:
        """Chunks of ``chunk_len`` steps with hindsight-relabelled goals (DESIGN §2.1)."""
        return BatchSpec(
            chunk_len=self._chunk_len,
            gamma=self.gamma,
            normalize_reward=self.normalize_reward,
            binding="MAC.chunk_len",
            goals=self.goal_sampling,
        )

    # ------------------------------------------------------------------ building
    def optimizer(self) -> optax.GradientTransformation:
        tx = optax.adam(self.learning_rate)
        if self.grad_clip is not None:
            tx = optax.chain(optax.clip_by_global_norm(self.grad_clip), tx)
        return tx

    def init(self, spec: Spec, key) -> TrainState:
        """Build every network for ``spec`` and the optimiser state. ``key``: raw key data or int seed."""
        self.spec = spec
        if isinstance(key, int):
            key = jax.random.PRNGKey(key)
        key, *ks = jax.random.split(key, 7)
        f = self.factories
        nets = Networks(
            dynamics=f["dynamics"](spec, key=ks[0]),
            policy=f["policy"](spec, key=ks[1]),
            critic=f["critic"](spec, key=ks[2]),
            value=f["value"](spec, key=ks[3]),
            success=f["success"](spec, key=ks[4]),
            reward=None if spec.goal_conditioned or f["reward"] is None else f["reward"](spec, key=ks[5]),
        )
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        target = copy_of(nets.value)
        return TrainState(step=jnp.zeros((), jnp.int32), nets=nets, target_value=target, opt_state=opt_state, key=key)

    def check_config(self, batch_size: int) -> None:
        """Also: ``MAC.rollout_batch_size`` at most ``train.batch_size`` (rollouts start from batch states).

        Raises:
          ConfigError: see :meth:`Agent.check_config`.
        """
        check_int(
            "MAC.rollout_batch_size",
            self.rollout_batch_size,
            maximum=batch_size,
            allow_none=True,
            note=f"train.batch_size = {batch_size}",
        )
        super().check_config(batch_size)

    # ------------------------------------------------------------------ acting
    def act(self, nets: Networks, s, g, *, key, acting: bool = True):
        """A chunk for one (scaled) state and goal: ``(chunk_len, act_dim)`` in [-1, 1]."""
        A = self.sampler(nets.policy, nets.critic, s, g, key=key, acting=acting)
        spec = self._built_spec()
        return A.reshape(spec.chunk_len, spec.act_dim)

    # ------------------------------------------------------------------ benchmark hooks
    def for_flop_count(self) -> MAC:
        """This agent with the H-step rollout unrolled, so XLA counts every step's FLOPs."""
        import copy

        agent = copy.copy(self)
        agent.unroll_rollout = True
        return agent

    def uncounted_flops(self, state: TrainState, batch_size: int) -> float:
        """The distillation target's diffrax ODE loop is counted once: add ``flow_steps - 1`` batched
        velocity evaluations (none for a policy without ``velocity``/``flow_steps``)."""
        pol = state.nets.policy
        if not (hasattr(pol, "velocity") and getattr(pol, "flow_steps", 1) > 1):
            return 0.0
        spec = self._built_spec()
        s, g, x = (jnp.zeros((batch_size, d)) for d in (spec.ob_dim, spec.goal_dim, spec.chunk_dim))
        vel = jax.jit(jax.vmap(lambda pol, s, g, x: pol.velocity(s, g, x, 0.5), in_axes=(None, 0, 0, 0)))
        ca = vel.lower(pol, s, g, x).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return (pol.flow_steps - 1) * float((ca or {}).get("flops", 0.0))

    def benchmark_parts(self, state: TrainState, batch):
        """The imagined rollout and the rejection sampler, each over ``rollout_batch_size`` states."""
        Br = self.rollout_batch_size or batch["obs"].shape[0]
        s0, g0 = batch["obs"][:Br], batch["value_goals"][:Br]
        roll = eqx.filter_jit(lambda nets, s, g, k: self.rollout(nets, s, g, k)["states"])
        samp = eqx.filter_jit(
            jax.vmap(lambda nets, s, g, k: self.sampler(nets.policy, nets.critic, s, g, key=k), in_axes=(None, 0, 0, 0))
        )
        return {
            "rollout": (roll, (state.nets, s0, g0, jax.random.PRNGKey(1))),
            "sampler": (samp, (state.nets, s0, g0, jax.random.split(jax.random.PRNGKey(2), Br))),
        }

    # ------------------------------------------------------------------ the update
    def rollout(self, nets: Networks, s0, g, key):
        """Imagined rollout of H chunks (no gradient). ``s0: (B, ob_dim)``, ``g: (B, goal_dim)``.

        Returns dict with ``states (H+1, B, ob_dim)``, ``actions (H, B, chunk_dim)``,
        ``rewards, masks (H, B)``: ``A_k = sampler(s_k, g)``, ``s_{k+1} = f(s_k, A_k)``, ``c_k =
        [sigmoid(c(s_k, g, A_k)) > 0.5]``, ``masks_k = 1 - c_k``, ``rewards_k = c_k - 1`` with goals,
        else ``r(s_k, A_k)`` (DESIGN §2.4 step 2). The loop runs the sampler and the dynamics only;
        the heads label all ``H x B`` pairs after it (``"heads_after_rollout"``, a same-result
        speed-up: :mod:`macfw.reference`).

        Raises:
          ValueError: single-task (``goal_dim = 0``) networks without a reward model.
        """
        # no gradient; LayerNorms folded into the products once, for all H steps (issue 12)
        nets = fold_layer_norms(jax.lax.stop_gradient(nets))
        B = s0.shape[0]
        goal_conditioned = g.shape[-1] > 0
        if goal_conditioned:
            heads = (nets.success,)
        elif nets.reward is None:
            raise ValueError("MAC on single-task data needs a reward model, got nets.reward = None (MAC.reward = None)")
        else:
            heads = (nets.success, nets.reward)

        def labels(logit, rest):
            c = (jax.nn.sigmoid(logit) > 0.5).astype(jnp.float32)
            r = c - 1.0 if goal_conditioned else rest[0]
            return r, 1.0 - c

        if reference.active("heads_after_rollout"):  # the reference: every head inside the loop
            models = (heads[0], nets.dynamics, *heads[1:])

            def one(s, gg, k):
                A = self.sampler(nets.policy, nets.critic, s, gg, key=k)
                logit, s_next, *rest = evaluate_jointly(models, s, gg, A)  # one first-layer product where it can
                return A, s_next, *labels(logit, rest)

            def step_labelled(s, k):
                A, s_next, r, m = jax.vmap(one)(s, g, jax.random.split(k, B))
                return s_next, (A, r, m)

            states, (actions, rewards, masks) = imagine(
                step_labelled, s0, key, self.horizon, unroll=self.unroll_rollout
            )
            return {"states": states, "actions": actions, "rewards": rewards, "masks": masks}

        # Only the dynamics feeds the next step; the success and reward heads label the H x B
        # (state, chunk) pairs after the loop, in products of H x B rows instead of H of B rows each.
        def chunk_step(s, gg, k):
            A = self.sampler(nets.policy, nets.critic, s, gg, key=k)
            return A, nets.dynamics(s, A)

        def step(s, k):
            A, s_next = jax.vmap(chunk_step)(s, g, jax.random.split(k, B))
            return s_next, A

        states, actions = imagine(step, s0, key, self.horizon, unroll=self.unroll_rollout)

        def label(s, gg, A):
            logit, *rest = evaluate_jointly(heads, s, gg, A)  # one first-layer product where it can
            return labels(logit, rest)

        with jax.named_scope("rollout"):
            rewards, masks = vmap_steps(label, states[:-1], jnp.broadcast_to(g, (self.horizon,) + g.shape), actions)
        return {"states": states, "actions": actions, "rewards": rewards, "masks": masks}

    def loss(self, nets: Networks, target_value, batch: dict, roll: dict, key) -> tuple[Array, dict]:
        """Sum of all MAC losses (DESIGN §2.4) and namespaced metrics."""
        B = batch["obs"].shape[0]
        k_flow, _ = jax.random.split(key)
        s, A, vg, ag = batch["obs"], batch["actions"], batch["value_goals"], batch["actor_goals"]

        with jax.named_scope("model_losses"):  # (named scopes: the phases of macfw.profiling's table)
            dyn, m_dyn = jax.vmap(nets.dynamics.loss)(s, A, batch["next_obs"])
            flow, m_flow = jax.vmap(lambda *x: nets.policy.loss(*x[:3], key=x[3]))(
                s, ag, A, jax.random.split(k_flow, B)
            )
            succ, m_succ = jax.vmap(nets.success.loss)(s, vg, A, batch["success"])
            total = dyn.mean() + flow.mean() + succ.mean()
            metrics = {**m_dyn, **m_flow, **m_succ}
            stats = {"policy/loss": flow.mean()}  # the authors' diagnostics (batch statistics beyond means)
            if "success/prob" in m_succ:
                stats.update(success_metrics(m_succ["success/prob"], batch["success"]))
            if nets.reward is not None:
                rew, m_rew = jax.vmap(nets.reward.loss)(s, vg, A, batch["rewards"])
                total = total + rew.mean()
                metrics.update(m_rew)
                if "reward/pred" in m_rew:
                    stats.update(reward_metrics(m_rew["reward/pred"], batch["rewards"]))

        with jax.named_scope("value_critic"):
            # value: lambda-returns against V' on the H+1 imagined states (at lam = 1 only V'(s_H) is needed).
            states, g = roll["states"], roll["goals"]
            discount = self.gamma ** self._built_spec().chunk_len
            g_steps = jnp.broadcast_to(g, states.shape[:2] + g.shape[1:])
            if self.lam == 1.0 and not reference.active("lambda_one"):  # V' on s_H alone: the rest cancels
                returns = monte_carlo_returns(
                    roll["rewards"], roll["masks"], jax.vmap(target_value)(states[-1], g), discount=discount
                )
            else:
                v_targ = vmap_steps(target_value, states, g_steps)  # (H+1, Br)
                returns = lambda_returns(roll["rewards"], roll["masks"], v_targ, discount=discount, lam=self.lam)
            returns = jax.lax.stop_gradient(returns)
            v_pred = vmap_steps(nets.value, states[:-1], g_steps[:-1])  # (H, Br)
            value_loss = jnp.mean((v_pred - returns) ** 2)

            # critic: TD target on the first imagined step with the online value.
            # (V(s_1) is row 1 of v_pred when H > 1: the same network on the same states, not evaluated twice)
            v1 = jax.lax.stop_gradient(v_pred[1] if self.horizon > 1 else jax.vmap(nets.value)(states[1], g))
            q_target = roll["rewards"][0] + discount * roll["masks"][0] * v1
            q = jax.vmap(nets.critic)(states[0], g, roll["actions"][0])
            critic_loss = jnp.mean((q - q_target) ** 2)

        total = total + value_loss + critic_loss
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics.update(stats)
        metrics.update(
            {
                "value/loss": value_loss,
                "value/mean": v_pred.mean(),
                "value/max": v_pred.max(),
                "value/min": v_pred.min(),
                "value/return_mean": returns.mean(),
                "value/return_min": returns.min(),
                "value/return_max": returns.max(),
                "value/return_std": returns.std(),
                "critic/loss": critic_loss,
                "critic/q_mean": q.mean(),
                "critic/q_max": q.max(),
                "critic/q_min": q.min(),
                "rollout/reward_mean": roll["rewards"].mean(),
                "rollout/done_rate": 1.0 - roll["masks"].mean(),
                "total/loss": total,
            }
        )
        return total, metrics

    def update(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One MAC gradient step (pure; jit it). ``batch`` from :func:`macfw.data.batches.sample_batch`."""
        key, k_roll, k_loss = jax.random.split(state.key, 3)
        Br = self.rollout_batch_size or batch["obs"].shape[0]
        s0, g0 = batch["obs"][:Br], batch["value_goals"][:Br]
        roll = self.rollout(state.nets, s0, g0, k_roll)
        roll["goals"] = g0

        nets, opt_state, metrics = gradient_step(
            state.nets,
            state.opt_state,
            self.optimizer(),
            lambda nets: self.loss(nets, state.target_value, batch, roll, k_loss),
        )
        with jax.named_scope("optimizer"):  # V' <- (1 - tau) V' + tau V, V before this step (the authors' order)
            target = ema(state.target_value, state.nets.value, self.tau)
        return TrainState(step=state.step + 1, nets=nets, target_value=target, opt_state=opt_state, key=key), metrics
