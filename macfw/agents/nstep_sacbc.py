"""n-step SAC+BC: the model-free, horizon-reduced actor-critic baseline of the MAC paper (DESIGN §9).

The authors' ``agents/ngcsacbc.py`` (MAC repository; identical to ``agents/ngcsacbc.py`` of
seohongpark/horizon-reduction, Park et al. 2025, "Horizon Reduction Makes RL Scalable") with the
n-step targets of their ``HGCDataset`` (``utils/datasets.py``). Goal-conditioned with oracle goal
representations (``OGBenchDataset.task_mode = 'oraclerep'``). One Adam optimiser on the sum of:

1. critic: two ``Q_j(s_t, g, a_t)`` on the *single* data action ``a_t``; with ``k = i_g - t`` the
   offset of the value-goal index inside the window, ``c = 1[0 <= k < n]`` (the goal is reached
   inside the n steps),

       r = gamma^k c,   m = 1 - c,   y = clip(r + gamma^n m agg_j sigmoid(Q'_j(s_{t+n}, g, a')), 0, 1),

   ``a' ~ pi(s_{t+n}, g)`` (a sample of the current actor, no entropy term), ``agg`` the min (or
   mean) over the target critics; BCE of ``sigmoid(Q_j)`` to ``y`` (:func:`nstep_goal_reward`,
   :func:`nstep_target`). ``Q`` thus estimates ``gamma^(steps to reach g)`` in [0, 1] (the authors'
   ``gc_negative = False`` convention: reward 1 at the goal, 0 elsewhere);
2. actor (SAC + BC, :func:`sacbc_actor_loss`): ``E[lambda log pi(a|s, g_a) - q(s, g_a, a)]
   + alpha E[||a - a_t||^2] * sg(E|q|)``, ``a ~ pi`` reparameterised, ``q`` the mean over the
   two critics of their raw outputs (the *logits* with BCE, as the authors'), ``lambda`` and the
   critics constant; the BC term's scale ``E|q|`` (batch mean, stop-gradient) makes ``alpha``
   invariant to the scale of ``q``;
3. temperature: ``lambda (sg(H) - target_entropy)``, target entropy ``-0.5 act_dim``;

then an EMA (tau) of the critic *before* this step's gradient step,
``Q'_{k+1} = (1 - tau) Q'_k + tau Q_k`` (the authors' ``target_update`` reads the agent's
pre-update parameters; found by the parity harness, issue 29: with the updated critic instead the
target biases after one update were ``tau`` times the first step's change where theirs are still 0).

Single-task data (an extension: the paper runs n-step SAC+BC only on the goal-conditioned 100M
oraclerep benchmark): ``r`` = the batch's n-step discounted reward ``sum_{i<n} gamma^i r_{t+i}``
(``BatchSpec.normalize_reward = False``), ``m`` = the batch's mask (1), MSE critic and no clipping
(OGBench single-task rewards are <= 0, outside [0, 1]).

The batch is drawn with ``BatchSpec(chunk_len=n)``, so ``next_obs`` is ``s_{t+n}`` and ``actions``
holds ``a_t .. a_{t+n-1}`` of which only ``a_t`` (the first ``act_dim`` entries) is used. Critic
and actor act on single actions (spec with ``chunk_len = 1``); the agent acts with one action.

Parity with the authors' code (``experiments/parity.py``, issue 29; the same parameters, batches and
draws: every logged metric and the parameters after 10 updates agree to float rounding). The update
takes its random draws as an argument (``update(state, batch, noise)``, :meth:`NStepSACBC.draw_noise`:
the batch-level normals of the two reparameterised actor samples). Found and fixed: the actor's
log-std is hard-clipped as their ``GCActor`` (:class:`~macfw.nn.actors.TanhGaussianActor`), and the
target critic is the EMA of the pre-step critic (above). Deliberate deviation: their
``HGCDataset`` clips the n-step window at the trajectory's final index and scores every shorter
window as reaching the goal (reward ``gamma^steps``, mask 0) whatever the goal; their sampler draws
``t`` up to the trajectory's end, so ``n`` starts per trajectory (2.5% of samples at n = 25 with
OGBench's 1001-step episodes; with OGBench's compact layout their final index is the second-to-last
state, so even the window ending at the last state is cut by one step). macfw samples only windows
inside the trajectory (``t + n <= end``) and scores the goal alone; the harness lists such rows as
the defect ``window_cut_by_trajectory_end_counts_as_success`` with both sides' reward and mask.

Code name -> symbol: ``n`` n (environment steps), ``gamma`` gamma (per environment step),
``alpha`` alpha (BC weight), ``tau`` EMA rate, ``critic`` ``{Q_j}``, ``target_critic`` ``{Q'_j}``,
``actor`` pi, ``temperature`` lambda. Shapes per example: ``s: (ob_dim,)``, ``a: (act_dim,)``,
``g: (goal_dim,)`` (``(0,)`` single-task).
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
from macfw.data.goals import GoalSampling, goal_sampling_for
from macfw.errors import check, check_choice, check_float, check_int
from macfw.nn.actors import TanhGaussianActor, Temperature
from macfw.nn.ensemble import Ensemble
from macfw.nn.gaussian import squashed_sample
from macfw.nn.losses import bce, mse
from macfw.registry import register
from macfw.spec import Spec


# ---------------------------------------------------------------------------------------------- equations
def nstep_goal_reward(
    idx: Int[Array, " B"], value_goal_idx: Int[Array, " B"], n: int, gamma: float
) -> tuple[Float[Array, " B"], Float[Array, " B"], Float[Array, " B"]]:
    """The n-step goal-reaching reward, mask and success of the authors' ``HGCDataset`` (BCE values).

    With ``k = value_goal_idx - idx`` (environment steps from s_t to the value goal's dataset index):
    the goal is reached inside the window when ``0 <= k < n``; then ``reward = gamma^k`` and
    ``mask = 0``; otherwise ``reward = 0`` and ``mask = 1`` (the value goal lies before ``t``, at
    or after ``t + n``, or in another trajectory; a random goal counts by its index only, as theirs).

    Args:
      idx, value_goal_idx: ``(B,)`` int dataset indices of s_t and of the value goal.
      n: window length in environment steps.
      gamma: per-step discount.

    Returns:
      ``(reward, mask, success)``, each ``(B,)`` float32.
    """
    k = value_goal_idx - idx
    success = (k >= 0) & (k < n)
    k_f = jnp.where(success, k, 0).astype(jnp.float32)
    reward = jnp.where(success, jnp.power(jnp.float32(gamma), k_f), 0.0)
    success = success.astype(jnp.float32)
    return reward, 1.0 - success, success


def nstep_target(
    reward: Array, mask: Array, next_q: Array, gamma: float, n: int, clip: tuple[float, float] | None = (0.0, 1.0)
) -> Array:
    """``clip(reward + gamma^n * mask * next_q, *clip)`` elementwise (no clipping when ``clip`` is None).

    ``next_q`` is the aggregated target value at ``s_{t+n}`` (probabilities for BCE critics).
    """
    target = reward + (gamma**n) * mask * next_q
    return target if clip is None else jnp.clip(target, clip[0], clip[1])


def sacbc_actor_loss(
    log_prob: Float[Array, " B"],
    q: Float[Array, " B"],
    actions: Float[Array, "B act_dim"],
    data_actions: Float[Array, "B act_dim"],
    alpha: float,
    temperature: Array,
) -> tuple[Array, dict]:
    """SAC + BC actor loss, scale-normalised as the authors' ``ngcsacbc.actor_loss``.

    ``mean(temperature * log_prob - q) + alpha * mean(||actions - data_actions||^2) * sg(mean|q|)``
    (the squared error summed over action dimensions; ``q`` and ``temperature`` are taken as given,
    the caller stops their gradients). Returns ``(loss, metrics)``.
    """
    sac = jnp.mean(temperature * log_prob - q)
    sq = jnp.sum((actions - data_actions) ** 2, axis=-1)
    bc = alpha * jnp.mean(sq)
    scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(q)))
    loss = sac + bc * scale
    return loss, {
        "actor/loss": loss,
        "actor/sac_loss": sac,
        "actor/bc_loss": bc,
        "actor/bc_scale": scale,
        "actor/scaled_bc_loss": bc * scale,
        "actor/mse": jnp.mean(sq),
        "actor/q_mean": jnp.mean(q),
    }


def critic_values(critic, s: Array, g: Array, a: Array) -> Float[Array, "k B"]:
    """Every critic on a batch, ``(k, B)``: ``s (B, ob_dim)``, ``g (B, goal_dim)``, ``a (B, act_dim)``.

    An :class:`~macfw.nn.ensemble.Ensemble` is evaluated members outside, batch inside (the layout of
    the authors' ``nn.vmap``'d critics): with the batch outside, the hidden activations came out
    ``(B, k, H)`` and every batched product needed a transposing copy (the n-step SAC+BC update at
    2 x 256, batch 256 spent 1.4 ms of op time moving data against the authors' 0.7). Any other
    critic (one returning ``(k,)`` per example) is vmapped over the batch.
    """
    if isinstance(critic, Ensemble):
        return critic.apply(lambda m, *x: jax.vmap(m)(*x), s, g, a)
    return jax.vmap(critic)(s, g, a).T


# ---------------------------------------------------------------------------------------------- the agent
class NStepSACBCNetworks(eqx.Module):
    """Every trained network (what the optimiser updates); equinox Modules used duck-typed (``Any``)."""

    actor: Any
    critic: Any  # Ensemble of QCritic on single actions
    temperature: Any


class NStepSACBCState(eqx.Module):
    """Step, key, networks, the critic's EMA copy and the optimiser state."""

    step: Array
    key: Array
    nets: NStepSACBCNetworks
    target_critic: Any  # a copy of nets.critic
    opt_state: Any


def _sg(tree):
    return jax.lax.stop_gradient(tree)


@register("agent")
class NStepSACBC(Agent):
    """n-step SAC+BC (see the module docstring). ``actor``, ``critic`` and ``temperature`` are
    registered classes built as ``Cls(spec, key=...)`` on a ``chunk_len = 1`` spec; ``critic`` is a
    Gin-scoped ensemble (``gin/baselines/nstep_sacbc.gin``).

    Args:
      actor, critic, temperature: component factories.
      n: the n-step horizon in environment steps (authors: 25; 50 for cube-octuple, humanoidmaze).
        Every sampled ``t`` has ``t + n`` inside its trajectory.
      gamma: per-step discount.
      alpha: BC weight (authors: 0.1; 0.03 for humanoidmaze).
      tau: EMA rate of the target critic (per gradient step).
      learning_rate: Adam step size (one optimiser over every loss).
      target_entropy_scale: target entropy ``-target_entropy_scale * act_dim``.
      q_agg: ``'min'`` or ``'mean'`` over the target critics (authors: min; mean for humanoidmaze).
      value_loss: goal-conditioned critic loss, ``'bce'`` (the authors') or ``'mse'`` (their
        ``'squared'``; targets still clipped to [0, 1]). Single-task data always uses MSE without
        clipping.
      goal_sampling: the hindsight relabelling of goal-conditioned samples (None:
        ``GoalSampling()``, i.e. the ``GoalSampling.*`` Gin bindings; :mod:`macfw.data.goals`).

    Raises:
      ConfigError: a value out of range (names the binding, e.g. ``NStepSACBC.n``).
    """

    acts_in_chunks = False

    def __init__(
        self,
        actor: Callable = TanhGaussianActor,
        critic: Callable | None = None,
        temperature: Callable = Temperature,
        *,
        n: int = 25,
        gamma: float = 0.999,
        alpha: float = 0.1,
        tau: float = 0.005,
        learning_rate: float = 3e-4,
        target_entropy_scale: float = 0.5,
        q_agg: str = "min",
        value_loss: str = "bce",
        goal_sampling: GoalSampling | None = None,
    ):
        name = type(self).__name__
        for slot, f in (("actor", actor), ("critic", critic), ("temperature", temperature)):
            check(
                f"{name}.{slot}",
                f,
                callable(f),
                f"a network class, e.g. @{slot}/Ensemble (see gin/baselines/)"
                if slot == "critic"
                else "a registered network class",
            )
        assert critic is not None  # check() refused a non-callable
        self.factories = dict(actor=actor, critic=critic, temperature=temperature)
        self.n = check_int(f"{name}.n", n, minimum=1)
        self.gamma = check_float(f"{name}.gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
        self.alpha = check_float(f"{name}.alpha", alpha, low=0.0)
        self.tau = check_float(f"{name}.tau", tau, low=0.0, high=1.0, low_open=True)
        self.learning_rate = check_float(f"{name}.learning_rate", learning_rate, low=0.0, low_open=True)
        self.target_entropy_scale = check_float(f"{name}.target_entropy_scale", target_entropy_scale)
        self.q_agg = check_choice(f"{name}.q_agg", q_agg, ("min", "mean"))
        self.value_loss = check_choice(f"{name}.value_loss", value_loss, ("bce", "mse"))
        self.goal_sampling = goal_sampling_for(name, goal_sampling)
        self.spec: Spec | None = None

    @property
    def batch_spec(self) -> BatchSpec:
        """Windows of ``n`` environment steps: ``next_obs = s_{t+n}``; single-task rewards unnormalised."""
        return BatchSpec(
            chunk_len=self.n, gamma=self.gamma, normalize_reward=False, binding="NStepSACBC.n", goals=self.goal_sampling
        )

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    @property
    def _bce(self) -> bool:
        """BCE critic (logits; values are probabilities) on goal-conditioned data."""
        return self._built_spec().goal_conditioned and self.value_loss == "bce"

    # ------------------------------------------------------------------ building
    def init(self, spec: Spec, key) -> NStepSACBCState:
        """Networks on ``dataclasses.replace(spec, chunk_len=1)`` (single actions) and a fresh state."""
        self.spec = spec
        one = dataclasses.replace(spec, chunk_len=1)
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        key, k_a, k_c, k_t = jax.random.split(key, 4)
        f = self.factories
        nets = NStepSACBCNetworks(
            actor=f["actor"](one, key=k_a), critic=f["critic"](one, key=k_c), temperature=f["temperature"](one, key=k_t)
        )
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        target = copy_of(nets.critic)
        return NStepSACBCState(
            step=jnp.zeros((), jnp.int32), key=key, nets=nets, target_critic=target, opt_state=opt_state
        )

    # ------------------------------------------------------------------ acting
    def act(self, nets: NStepSACBCNetworks, s, g, *, key):
        """The actor's mode ``tanh(mean(s, g))``: ``(1, act_dim)`` (the authors evaluate at temperature 0)."""
        return nets.actor.mode(s, g).reshape(1, self._built_spec().act_dim)

    # ------------------------------------------------------------------ the update
    def rewards_and_masks(self, batch: dict) -> tuple[Array, Array]:
        """The n-step reward and mask per example, ``(B,)`` each: goal-conditioned from the indices
        (:func:`nstep_goal_reward`), single-task the batch's n-step discounted reward and mask."""
        if self._built_spec().goal_conditioned:
            r, m, _ = nstep_goal_reward(batch["idx"], batch["value_goal_idx"], self.n, self.gamma)
            return r, m
        return batch["rewards"], batch["masks"]

    def draw_noise(self, key, batch_size: int) -> dict[str, Array]:
        """The update's random draws, at batch level: the standard normal ``eps`` of the reparameterised
        actor samples, ``next_actions`` (``a' ~ pi(s_{t+n}, g)`` of the target) and ``actions``
        (``a ~ pi(s_t, g_a)`` of the actor loss), each ``(B, act_dim)``."""
        k_next, k_act = jax.random.split(key)
        shape = (batch_size, self._built_spec().act_dim)
        return {"next_actions": jax.random.normal(k_next, shape), "actions": jax.random.normal(k_act, shape)}

    @staticmethod
    def sample_actions(actor, s, g, eps) -> tuple[Array, Array, Array]:
        """``a = tanh(mean + std eps)`` per example with its log-density and the pre-squash std:
        ``s: (B, ob_dim)``, ``g: (B, goal_dim)``, ``eps: (B, act_dim)`` -> ``a (B, act_dim)``,
        ``log p (B,)``, ``std (B, act_dim)``."""
        mean, log_std = jax.vmap(actor.mean_log_std)(s, g)
        a, log_p = squashed_sample(mean, log_std, eps)
        return a, log_p, jnp.exp(log_std)

    def target_q(self, nets: NStepSACBCNetworks, target_critic, batch: dict, eps: Array) -> Array:
        """The critic's regression target ``(B,)`` (see the module docstring); ``eps (B, act_dim)`` the
        noise of ``a' ~ pi(s_{t+n}, g)``."""
        a_next, _, _ = self.sample_actions(nets.actor, batch["next_obs"], batch["value_goals"], eps)
        q_next = critic_values(target_critic, batch["next_obs"], batch["value_goals"], a_next)  # (k, B)
        if self._bce:
            q_next = jax.nn.sigmoid(q_next)
        q_next = q_next.min(axis=0) if self.q_agg == "min" else q_next.mean(axis=0)
        r, m = self.rewards_and_masks(batch)
        clip = (0.0, 1.0) if self._built_spec().goal_conditioned else None
        return nstep_target(r, m, q_next, self.gamma, self.n, clip)

    def loss(self, nets: NStepSACBCNetworks, batch: dict, target: Array, eps: Array) -> tuple[Array, dict]:
        """Critic, actor and temperature losses on ``batch`` for a fixed ``target``; ``eps (B, act_dim)``
        the noise of ``a ~ pi(s_t, g_a)``. Returns ``(total, metrics)``."""
        act_dim = self._built_spec().act_dim
        a_data = batch["actions"][:, :act_dim]
        out = critic_values(nets.critic, batch["obs"], batch["value_goals"], a_data)  # (k, B)
        if self._bce:
            critic_loss = jnp.mean(bce(out, target[None, :]))
            q_val = jax.nn.sigmoid(out)
        else:
            critic_loss = jnp.mean(mse(out, target[None, :]))
            q_val = out

        a, log_p, std = self.sample_actions(nets.actor, batch["obs"], batch["actor_goals"], eps)
        q_pi = critic_values(_sg(nets.critic), batch["obs"], batch["actor_goals"], a).mean(axis=0)
        actor_loss, metrics = sacbc_actor_loss(log_p, q_pi, a, a_data, self.alpha, _sg(nets.temperature()))
        temp_loss, m_t = nets.temperature.loss(log_p, -self.target_entropy_scale * act_dim)

        total = critic_loss + actor_loss + temp_loss
        metrics.update(m_t)
        metrics.update(
            {
                "critic/loss": critic_loss,
                "critic/q_mean": q_val.mean(),
                "critic/q_max": q_val.max(),
                "critic/q_min": q_val.min(),
                "critic/q_logit_mean": out.mean(),
                "critic/q_logit_max": out.max(),
                "critic/q_logit_min": out.min(),
                "critic/target_mean": target.mean(),
                "actor/std": std.mean(),
                "total/loss": total,
            }
        )
        return total, metrics

    def update(
        self, state: NStepSACBCState, batch: dict, noise: dict[str, Array] | None = None
    ) -> tuple[NStepSACBCState, dict]:
        """One gradient step on the loop's n-step ``batch`` (pure; jit it). ``noise``: the draws of
        :meth:`draw_noise` (None: drawn from the state's key)."""
        key, k_noise = jax.random.split(state.key)
        if noise is None:
            noise = self.draw_noise(k_noise, batch["obs"].shape[0])
        nets = state.nets
        target = _sg(self.target_q(_sg(nets), _sg(state.target_critic), batch, noise["next_actions"]))

        nets, opt_state, metrics = gradient_step(
            nets, state.opt_state, self.optimizer(), lambda nets: self.loss(nets, batch, target, noise["actions"])
        )
        target_critic = ema(state.target_critic, state.nets.critic, self.tau)  # the critics before this step
        _, mask = self.rewards_and_masks(batch)
        metrics.update({"critic/mask_mean": jnp.mean(mask)})
        return dataclasses.replace(
            state, step=state.step + 1, key=key, nets=nets, target_critic=target_critic, opt_state=opt_state
        ), metrics
