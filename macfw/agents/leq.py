"""LEQ: Lower Expectile Q-learning with lambda-returns (Park & Lee, 2024, "Tackling Long-Horizon Tasks
with Model-based Offline RL"), as the MAC paper runs it (DESIGN §9; the MAC authors' ``agents/leq.py``,
whose math follows the LEQ authors' ``algos/leq``: ``lambda_update_q`` and ``DPG_lambda_update_actor``).

Everything trains jointly, one Adam optimiser over the sum of every loss, on one-step transitions
(``BatchSpec(chunk_len=1)``), with no uncertainty penalty:

1. models on the real batch: ensemble NLL of ``s'`` (7 :class:`~macfw.nn.models.GaussianDynamics`),
   success BCE (the label ``1 - m``, ``m = 1 - batch['success']``), reward MSE (single-task);
2. imagined rollouts of ``H`` model steps from *every* batch state, inside the loss: the
   deterministic actor ``a_t = pi(s_t, g)``, ``s_{t+1}`` from a uniformly drawn member per example
   and step (:meth:`~macfw.nn.ensemble.Ensemble.sample`), success ``c_t = 1[sigmoid(c(s_t, g, a_t))
   > 0.5]``, reward ``c_t - 1`` (goal-conditioned) or ``r(s_t, a_t)`` (single-task), mask
   ``1 - c_t``; the goal stays the start sample's (value goal for the critic, actor goal for the
   actor);
3. LEQ's lambda-return (:func:`leq_lambda_returns`): with ``q_t = Q(s_t, g, a_t)``, the alive weights
   ``M_0 = 1``, ``M_{t+1} = M_t (1 - c_t)`` and ``w_{H-1} = 1``, ``w_t = 1 + lam w_{t+1}``::

       Q^lam_H = q_H
       Q^lam_t = (q_t + lam w_t (M_t r_t + gamma M_{t+1} Q^lam_{t+1})) / (1 + lam w_t)

   i.e. the lam-weighted average of the k-step returns ``G^(k)_t``, k = 0 .. H - t (``G^(0)_t = q_t``;
   lam = 1: their plain mean);
4. critic (one Q, :func:`critic_objective`)::

       (1 - beta) [ E expectile_0.5(Q(s, g, a) ; y) + E (Q(s, g, a) - Q'(s, g, a))^2 ]
       + beta E_{t<H} gamma^t M_t [ expectile_kappa(Q(s_t, g, a_t) ; sg Q^lam_t) + (Q - Q')^2 ]

   with ``y = r + gamma m sg Q(s', g, pi(s', g))`` on the data (the *current* critic; ``Q'`` is an
   EMA of ``Q`` that only enters the regulariser), beta = ``model_weight`` (0.95);
5. actor, the deterministic policy gradient of the lambda-returns through the model
   (:meth:`LEQ.actor_rollout`, :func:`actor_surrogate`)::

       grad_theta = E sum_{t=0}^{H} e_t (d Q^lam_t / d a_t) . (d pi_theta(s_t, g) / d theta)

   where ``d Q^lam_t / d a_t`` is the total derivative through the reparameterised model sample,
   reward head, later actions ``pi(s_{t+k})`` and critic (all held fixed), states held fixed, and
   ``e_t = kappa if Q^lam_t > q_t else 1 - kappa`` (``e_H = 0.5``), the expectile weights;

then an EMA (``tau``) of the critic: ``Q' <- (1 - tau) Q' + tau Q`` with ``Q`` the critic *before* this
step's gradient step (the authors' ``target_update`` reads ``self.network``, the pre-update
parameters).

Parity with the MAC authors' code (``experiments/parity.py --agents leq``, issue 29: the same
parameters, batches and draws, every metric of their ``total_loss`` after 1 and 10 updates and the
parameters after 10 agree to 1.3e-5 relative, single-task and goal-conditioned). Deliberate
differences, each a defect of their port (the case lists each with both sides' values):

* ``critic_model_terms_untrained``: their ``critic_loss`` calls the critic on the rollout states
  without its trained parameters, so the ``beta``-weighted model terms of step 4 send no gradient
  at all (only the data terms, weight ``1 - beta``, train their critic: at the parity sizes its
  gradient norm is 0.20 where macfw's is 2.73); here they train the critic as in the LEQ
  authors' ``lambda_update_q``.
* ``actor_rollout_member_per_dimension``: their actor's rollout samples one example at a time,
  where ``jax.random.choice(.., (next_obs.shape[1],))`` draws a member per state *dimension*
  (``ob_dim`` draws, up to 7 members mixed in one state); here one member per example and step
  predicts the whole next state (:func:`model_sample`), as in their critic's rollout.
* ``gc_reward_head_trained_unused``: goal-conditioned, they train a reward head no rollout reads
  (the reward is ``c - 1``); here there is none.

Random draws come in as arrays (:meth:`LEQ.draw_noise`; ``update(state, batch, noise)``), so a
caller can give both implementations the same. The diagonal Jacobian ``d Q^lam_t / d a_t``, which
their ``jacrev`` gets with one reverse pass per ``t``, comes here from one reverse pass (the same
numbers; :meth:`LEQ.actor_rollout`), so the actor costs about a forward and a backward rollout,
not ``H + 1`` backward ones.

Code name -> symbol: ``gamma`` gamma, ``lam`` lam, ``horizon`` H, ``expectile`` kappa,
``data_expectile`` the data term's expectile, ``model_weight`` beta, ``tau`` EMA rate,
``dynamics`` the ensemble, ``critic`` Q, ``target_critic`` Q', ``actor`` pi. Shapes per example:
``s: (ob_dim,)``, ``a: (act_dim,)``, ``g: (goal_dim,)``. Units: ``horizon`` in model steps, which
are environment steps (one-step models).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.agents.base import Agent, BatchSpec, copy_of, ema, gradient_step, vmap_steps
from macfw.agents.mbpo import one_step_view
from macfw.data.goals import GoalSampling, goal_sampling_for
from macfw.errors import check, check_float, check_int
from macfw.nn.actors import DeterministicActor
from macfw.nn.losses import expectile as expectile_loss
from macfw.nn.mlp import MLP
from macfw.nn.models import HIDDEN, QCritic, RewardModel, SuccessModel, reward_metrics, success_metrics
from macfw.registry import register
from macfw.spec import Spec

#: Expectile weight of the last imagined step, where ``Q^lam_H = q_H`` (the authors' value).
LAST_STEP_WEIGHT = 0.5
_LOG_2PI = math.log(2.0 * math.pi)
#: Below this ``d Q^lam_0 / d Q^lam_t`` the one-pass action gradients could underflow in float32.
CHAIN_MIN = 1e-30


def _sg(tree):
    return jax.lax.stop_gradient(tree)


# --------------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------------
@register("actor")
class LEQActor(DeterministicActor):
    """:class:`~macfw.nn.actors.DeterministicActor` ``a = tanh(MLP([s, g]))`` with the last layer's
    initial weights at variance scale ``final_init_scale`` (the authors' ``GCDeterActor``:
    ``default_init(0.01)``, so the first actions are near 0).

    Args:
      spec: sizes; input ``ob_dim + goal_dim``, output ``chunk_dim`` (``act_dim`` for LEQ's
        ``chunk_len = 1`` spec).
      hidden_dims: MLP hidden sizes (default 4 x 1024).
      layer_norm: LayerNorm after each hidden activation.
      final_init_scale: variance scale of the last layer's initial weights (> 0; see
        :class:`~macfw.nn.mlp.MLP`).
      key: PRNG key.

    Raises:
      ConfigError: ``final_init_scale <= 0`` or bad ``hidden_dims``.
    """

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
        scale = check_float("LEQActor.final_init_scale", final_init_scale, low=0.0, low_open=True)
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


# --------------------------------------------------------------------------------------------
# The losses as pure functions of arrays (H = horizon, B = batch; leading axes as stated)
# --------------------------------------------------------------------------------------------
def leq_lambda_returns(
    rewards: Float[Array, "H ..."],
    masks: Float[Array, "H ..."],
    q: Float[Array, "H1 ..."],
    *,
    discount: float,
    lam: float,
) -> tuple[Array, Array]:
    """LEQ's lambda-returns of one imagined rollout (module docstring, step 3).

    Args:
      rewards: ``r_t``, ``(H, ...)``.
      masks: per-step continuation ``1 - c_t`` in {0, 1}, ``(H, ...)``.
      q: ``q_t = Q(s_t, g, a_t)`` for t = 0 .. H, ``(H + 1, ...)``.
      discount: gamma per model step.
      lam: lambda in [0, 1] (0: ``Q^lam_t = q_t``, no model information; 1: equal weights).

    Returns:
      ``returns (H + 1, ...)``: ``Q^lam_t`` (``Q^lam_H = q_H``), and ``alive (H + 1, ...)``: ``M_t``,
      1 while no step before ``t`` terminated. ``Q^lam_t = sum_k lam^k G^(k)_t / sum_k lam^k`` over
      k = 0 .. H - t with ``G^(0)_t = q_t`` and ``G^(k)_t = sum_{j<k} gamma^j M_{t+j} r_{t+j} +
      gamma^k M_{t+k} q_{t+k}`` (the masks absolute from the rollout's start, as the authors'; a
      dead step, ``M_t = 0``, keeps only ``q_t / sum_k lam^k`` and has no critic-loss weight).
    """
    H = rewards.shape[0]
    alive = jnp.concatenate([jnp.ones_like(q[:1]), jnp.cumprod(masks, axis=0)], axis=0)

    def back(carry, x):
        ret_next, w = carry
        q_t, r_t, m_t, m_next = x
        ret = (q_t + lam * w * (m_t * r_t + discount * m_next * ret_next)) / (1.0 + lam * w)
        return (ret, 1.0 + lam * w), ret

    init = (q[H], jnp.ones((), q.dtype))
    _, rets = jax.lax.scan(back, init, (q[:H], rewards, alive[:H], alive[1:]), reverse=True)
    return jnp.concatenate([rets, q[H:]], axis=0), alive


def return_chain(horizon: int, *, discount: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Static coefficients of :func:`leq_lambda_returns` (numpy, ``(H + 1,)`` each):
    ``alpha_t = 1 / (1 + lam w_t)``, the weight of ``q_t`` in ``Q^lam_t`` (``alpha_H = 1``), and
    ``chain_t = prod_{l<t} gamma lam w_l / (1 + lam w_l)``, so that ``d Q^lam_0 / d Q^lam_t = M_t chain_t``."""
    H = horizon
    w = np.array([sum(lam**k for k in range(H - t)) for t in range(H)], np.float64)  # w_t, t < H
    alpha = np.append(1.0 / (1.0 + lam * w), 1.0)
    chain = np.concatenate([[1.0], np.cumprod(discount * lam * w / (1.0 + lam * w))])
    return alpha, chain


def expectile_weights(returns: Array, q: Array, expectile: float) -> Array:
    """``kappa`` where the return exceeds the critic (``returns > q``), else ``1 - kappa`` (elementwise):
    the weights of LEQ's lower-expectile policy objective (kappa < 0.5 trusts low returns more)."""
    return jnp.where(returns > q, expectile, 1.0 - expectile)


def critic_objective(
    q_data: Float[Array, " B"],
    q_data_ema: Float[Array, " B"],
    y_data: Float[Array, " B"],
    q_model: Float[Array, "H B"],
    q_model_ema: Float[Array, "H B"],
    returns: Float[Array, "H B"],
    alive: Float[Array, "H B"],
    *,
    discount: float,
    expectile: float,
    data_expectile: float,
    model_weight: float,
) -> tuple[Array, dict]:
    """LEQ's critic loss (module docstring, step 4) and its parts as metrics.

    Args:
      q_data, q_data_ema: ``Q`` and the EMA ``Q'`` on the data ``(s, g_v, a)``.
      y_data: the data target ``r + gamma m Q(s', g_v, pi(s', g_v))`` (constant).
      q_model, q_model_ema: ``Q`` and ``Q'`` on the imagined ``(s_t, g_v, a_t)``, t = 0 .. H - 1.
      returns: ``Q^lam_t`` for t < H (constant); alive: ``M_t`` for t < H.
      discount: gamma (the model terms are weighted by ``gamma^t M_t``); expectile: kappa of the
        model term; data_expectile: the data term's; model_weight: beta.

    Returns:
      ``(loss, metrics)``; means are over the batch (data) and over ``H x B`` (model; ``critic/q_model_mean``
      unweighted, as the authors').
    """
    H = q_model.shape[0]
    weight = (discount ** jnp.arange(H, dtype=q_model.dtype))[:, None] * alive
    data = jnp.mean(expectile_loss(q_data, y_data, data_expectile))
    data_reg = jnp.mean((q_data_ema - q_data) ** 2)
    model = jnp.mean(weight * expectile_loss(q_model, returns, expectile))
    model_reg = jnp.mean(weight * (q_model_ema - q_model) ** 2)
    loss = (1.0 - model_weight) * (data + data_reg) + model_weight * (model + model_reg)
    return loss, {
        "critic/loss": loss,
        "critic/data_loss": data,
        "critic/model_loss": model,
        "critic/reg_loss": (1.0 - model_weight) * data_reg + model_weight * model_reg,
        "critic/reg_loss_data": data_reg,
        "critic/reg_loss_model": model_reg,
        "critic/loss_weight_mean": weight.mean(),
        "critic/q_data_mean": q_data.mean(),
        "critic/q_model_mean": q_model.mean(),
        "critic/target_data_mean": y_data.mean(),
    }


def actor_surrogate(actions: Float[Array, "H1 B act_dim"], weighted_grads: Float[Array, "H1 B act_dim"]) -> Array:
    """The deterministic-policy-gradient surrogate ``-sum_t mean_b sg(e_t dQ^lam_t/da_t) . pi_theta(s_t)``:
    its gradient w.r.t. the actor's parameters is module docstring step 5 (``actions`` are
    ``pi_theta(sg(s_t), g)``, ``weighted_grads`` the constant ``e_t dQ^lam_t/da_t``)."""
    return -jnp.sum(jnp.mean(jnp.sum(_sg(weighted_grads) * actions, axis=-1), axis=1))


def model_sample(
    dynamics, s: Float[Array, "B ob_dim"], a: Float[Array, "B act_dim"], member: Array, eps: Float[Array, "B ob_dim"]
) -> Float[Array, "B ob_dim"]:
    """The next states of a batch from an ensemble of Gaussian models: example ``b`` takes member
    ``member[b]``'s ``mean + exp(log_std) * eps[b]`` (a reparameterised sample, differentiable in ``s``
    and ``a``). Every member is evaluated on the whole batch and the chosen rows kept (as the
    authors' ``sample_dynamics``). ``dynamics``: an :class:`~macfw.nn.ensemble.Ensemble` of members
    with ``mean_log_std`` (e.g. :class:`~macfw.nn.models.GaussianDynamics`), or one such model
    (``member`` is then ignored)."""
    mean, log_std = _member_stats(dynamics, s, a)  # (k, B, ob_dim)
    rows = jnp.arange(s.shape[0])
    member = member if hasattr(dynamics, "members") else jnp.zeros_like(member)
    return mean[member, rows] + jnp.exp(log_std[member, rows]) * eps


def _member_stats(dynamics, s, a):
    """Every member's ``mean_log_std`` on a batch: ``(k, B, ob_dim)`` each (``k = 1`` for one model)."""
    if hasattr(dynamics, "members"):
        return dynamics.apply(lambda m, s, a: jax.vmap(m.mean_log_std)(s, a), s, a)
    mean, log_std = jax.vmap(dynamics.mean_log_std)(s, a)
    return mean[None], log_std[None]


def model_nll(dynamics, s, a, s_next, eps: Float[Array, "k B ob_dim"]) -> tuple[Array, dict]:
    """The Gaussian ensemble's negative log-likelihood of ``s_next`` (summed over dimensions, mean over
    members and batch; each member sees the whole batch) and its metrics: ``dynamics/mse`` of the
    means, ``dynamics/sample_mse`` of the samples ``mean + sigma * eps``, ``dynamics/std_mean``."""
    mean, log_std = _member_stats(dynamics, s, a)
    z = (s_next[None] - mean) * jnp.exp(-log_std)
    nll = jnp.mean(-jnp.sum(-0.5 * z**2 - log_std - 0.5 * _LOG_2PI, axis=-1))
    sample = _sg(mean + jnp.exp(log_std) * eps)
    return nll, {
        "dynamics/loss": nll,
        "dynamics/mse": jnp.mean((_sg(mean) - s_next[None]) ** 2),
        "dynamics/sample_mse": jnp.mean((sample - s_next[None]) ** 2),
        "dynamics/std_mean": jnp.mean(jnp.exp(_sg(log_std))),
    }


# --------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------
class LEQNetworks(eqx.Module):
    """Every trained network of LEQ (what the optimiser updates); equinox Modules used duck-typed (``Any``)."""

    dynamics: Any  # Ensemble of GaussianDynamics
    success: Any
    reward: Any | None  # None for goal-conditioned data
    actor: Any
    critic: Any


class LEQState(eqx.Module):
    """Step, key, networks, the critic's EMA copy and the optimiser state."""

    step: Array
    key: Array
    nets: LEQNetworks
    target_critic: Any  # a copy of nets.critic
    opt_state: Any


@register("agent")
class LEQ(Agent):
    """LEQ (see the module docstring). Component arguments are registered classes built as
    ``Cls(spec, key=...)``; ``dynamics`` is a Gin-scoped ensemble (``gin/baselines/leq.gin``).

    Args:
      dynamics, success, reward, actor, critic: component factories (``critic`` one Q).
      gamma: per-step discount, in (0, 1).
      lam: lambda of the lambda-returns, in [0, 1].
      horizon: imagined rollout length H in model (= environment) steps.
      expectile: kappa of the model critic term and the actor weights, in (0, 1).
      data_expectile: expectile of the data critic term, in (0, 1).
      model_weight: beta, the weight of the model terms (data terms ``1 - beta``), in [0, 1].
      tau: EMA rate of the target critic.
      learning_rate: Adam step size (one optimiser over every loss).
      unroll_rollout: unroll the H-step rollouts in the compiled program.
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
        actor: Callable = LEQActor,
        critic: Callable = QCritic,
        *,
        gamma: float = 0.999,
        lam: float = 1.0,
        horizon: int = 10,
        expectile: float = 0.5,
        data_expectile: float = 0.5,
        model_weight: float = 0.95,
        tau: float = 0.005,
        learning_rate: float = 3e-4,
        unroll_rollout: bool = False,
        goal_sampling: GoalSampling | None = None,
    ):
        for slot, f in (("dynamics", dynamics), ("actor", actor), ("critic", critic), ("success", success)):
            check(
                f"LEQ.{slot}",
                f,
                callable(f),
                "a network class, e.g. @dynamics/Ensemble for LEQ.dynamics (see gin/baselines/leq.gin)",
            )
        assert dynamics is not None  # check() refused a non-callable
        self.factories = dict(dynamics=dynamics, success=success, reward=reward, actor=actor, critic=critic)
        self.gamma = check_float("LEQ.gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
        self.lam = check_float("LEQ.lam", lam, low=0.0, high=1.0)
        self.horizon = check_int("LEQ.horizon", horizon)
        self.expectile = cast(
            float, check_float("LEQ.expectile", expectile, low=0.0, high=1.0, low_open=True, high_open=True)
        )
        self.data_expectile = cast(
            float, check_float("LEQ.data_expectile", data_expectile, low=0.0, high=1.0, low_open=True, high_open=True)
        )
        self.model_weight = check_float("LEQ.model_weight", model_weight, low=0.0, high=1.0)
        self.tau = check_float("LEQ.tau", tau, low=0.0, high=1.0, low_open=True)
        self.learning_rate = check_float("LEQ.learning_rate", learning_rate, low=0.0, low_open=True)
        self.unroll_rollout = bool(unroll_rollout)
        self.goal_sampling = goal_sampling_for("LEQ", goal_sampling)
        self.spec: Spec | None = None

    @property
    def batch_spec(self) -> BatchSpec:
        """One-step transitions with hindsight-relabelled goals (goal-conditioned data)."""
        return BatchSpec(chunk_len=1, gamma=self.gamma, normalize_reward=False, goals=self.goal_sampling)

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    # ------------------------------------------------------------------ building
    def init(self, spec: Spec, key) -> LEQState:
        self.spec = spec
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        key, *ks = jax.random.split(key, 6)
        f = self.factories
        nets = LEQNetworks(
            dynamics=f["dynamics"](spec, key=ks[0]),
            success=f["success"](spec, key=ks[1]),
            reward=None if spec.goal_conditioned or f["reward"] is None else f["reward"](spec, key=ks[2]),
            actor=f["actor"](spec, key=ks[3]),
            critic=f["critic"](spec, key=ks[4]),
        )
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        target = copy_of(nets.critic)
        return LEQState(step=jnp.zeros((), jnp.int32), key=key, nets=nets, target_critic=target, opt_state=opt_state)

    def for_flop_count(self) -> LEQ:
        """This agent with the rollouts unrolled, so XLA counts every step's FLOPs."""
        import copy

        agent = copy.copy(self)
        agent.unroll_rollout = True
        return agent

    # ------------------------------------------------------------------ acting
    def act(self, nets: LEQNetworks, s, g, *, key):
        """The deterministic action ``pi(s, g)``: ``(1, act_dim)`` in (-1, 1)."""
        return jnp.clip(nets.actor(s, g), -1.0, 1.0).reshape(1, self._built_spec().act_dim)

    # ------------------------------------------------------------------ imagined rollouts
    def rollout_noise(self, nets: LEQNetworks, key, batch_size: int, dtype=jnp.float32) -> dict[str, Array]:
        """The random draws of one imagined rollout of ``batch_size`` examples, drawn at batch level:
        ``member (H, B)`` int32, the ensemble member that predicts step ``t`` of example ``b``
        (uniform over the members), and ``eps (H, B, ob_dim)``, its standard normal noise
        (:func:`model_sample`). :meth:`rollout` is a pure function of them."""
        k_member, k_eps = jax.random.split(key)
        H = self.horizon
        num = getattr(nets.dynamics, "num", 1)
        return {
            "member": jax.random.randint(k_member, (H, batch_size), 0, num, jnp.int32),
            "eps": jax.random.normal(k_eps, (H, batch_size, self._built_spec().ob_dim), dtype),
        }

    def draw_noise(self, nets: LEQNetworks, key, batch_size: int, dtype=jnp.float32) -> dict:
        """Every random draw of one update, at batch level: ``critic`` and ``actor``, the two rollouts'
        (:meth:`rollout_noise`), and ``dynamics (k, B, ob_dim)``, standard normals of the
        ``dynamics/sample_mse`` metric's sample (:meth:`model_losses`)."""
        k_c, k_a, k_d = jax.random.split(key, 3)
        num = getattr(nets.dynamics, "num", 1)
        return {
            "critic": self.rollout_noise(nets, k_c, batch_size, dtype),
            "actor": self.rollout_noise(nets, k_a, batch_size, dtype),
            "dynamics": jax.random.normal(k_d, (num, batch_size, self._built_spec().ob_dim), dtype),
        }

    def rollout(
        self,
        nets: LEQNetworks,
        s0: Float[Array, "B ob_dim"],
        g: Float[Array, "B goal_dim"],
        noise: dict[str, Array],
        delta: Float[Array, "H1 B act_dim"] | None = None,
    ) -> dict[str, Array]:
        """``H`` model steps of the actor from ``s0`` with goals ``g`` (module docstring, step 2).

        Differentiable in its inputs (callers pass stop-gradient networks). ``noise`` is
        :meth:`rollout_noise`'s draws (the next state of step ``t`` is :func:`model_sample` with
        ``noise['member'][t]``, ``noise['eps'][t]``). ``delta`` is added to the action of every step
        (``a_t = pi(s_t, g) + delta_t``), so that ``d Q^lam_t / d a_t`` is ``d returns_t / d delta_t``.

        Returns a dict of ``states (H+1, B, ob_dim)``, ``actions (H+1, B, act_dim)``, ``rewards,
        masks (H, B)``, ``q, returns, alive (H+1, B)`` (see :func:`leq_lambda_returns`).
        """
        H = self.horizon
        goal_conditioned = g.shape[-1] > 0
        dt = s0.dtype
        if goal_conditioned:
            reward_fn = None
        elif nets.reward is None:
            raise ValueError("LEQ on single-task data needs a reward model, got nets.reward = None (LEQ.reward = None)")
        else:
            reward_fn = jax.vmap(nets.reward)

        def act(s, t):
            a = jax.vmap(nets.actor)(s, g)
            return a if delta is None else a + delta[t]

        def step(s, x):
            a = act(s, x["t"])
            s_next = model_sample(nets.dynamics, s, a, x["member"], x["eps"])
            c = (jax.nn.sigmoid(jax.vmap(nets.success)(s, g, a)) > 0.5).astype(dt)
            r = c - 1.0 if reward_fn is None else reward_fn(s, g, a)
            q = jax.vmap(nets.critic)(s, g, a)
            return s_next, (s, {"actions": a, "rewards": r, "masks": 1.0 - c, "q": q})

        xs = {"t": jnp.arange(H), "member": noise["member"], "eps": noise["eps"].astype(dt)}
        with jax.named_scope("rollout"):  # a phase of macfw.profiling's table (as macfw.rollout.imagine)
            s_last, (states, outs) = jax.lax.scan(step, s0, xs, unroll=H if self.unroll_rollout else 1)
        states = jnp.concatenate([states, s_last[None]], axis=0)
        a_last = act(states[H], H)
        q = jnp.concatenate([outs["q"], jax.vmap(nets.critic)(states[H], g, a_last)[None]], axis=0)
        returns, alive = leq_lambda_returns(outs["rewards"], outs["masks"], q, discount=self.gamma, lam=self.lam)
        return {
            "states": states,
            "actions": jnp.concatenate([outs["actions"], a_last[None]], axis=0),
            "rewards": outs["rewards"],
            "masks": outs["masks"],
            "q": q,
            "returns": returns,
            "alive": alive,
        }

    def actor_rollout(
        self, nets: LEQNetworks, s0, g, noise: dict[str, Array], *, jacobian: str = "chain"
    ) -> dict[str, Array]:
        """The rollout for the actor (constant: every network held fixed; ``noise`` as :meth:`rollout`'s)
        and the per-step action gradients ``d Q^lam_t / d a_t`` with their expectile weights ``e_t``
        (module docstring, step 5).

        ``jacobian='per_step'`` takes one reverse pass per step ``t`` (a vmapped VJP seeded with
        ``Q^lam_t``) and keeps the ``t``-th block, as the authors' ``jacrev`` does. ``'chain'`` (the
        default) gets the same numbers from one reverse pass: ``Q^lam_0`` depends on ``a_t`` only
        through ``Q^lam_t``, so ``d Q^lam_0 / d a_t = P_t d Q^lam_t / d a_t`` with ``P_t`` from
        :func:`return_chain`; where ``P_t = 0`` (a dead step, ``M_t = 0``) ``Q^lam_t = alpha_t q_t`` and
        the gradient is ``alpha_t d q_t / d a_t``. It falls back to ``'per_step'`` when some
        ``P_t`` would underflow (lam near 0).

        Returns :meth:`rollout`'s dict plus ``grads (H+1, B, act_dim)`` and ``weights (H+1, B)``.

        Raises:
          ValueError: an unknown ``jacobian``.
        """
        if jacobian not in ("chain", "per_step"):
            raise ValueError(f"jacobian must be 'chain' or 'per_step', got {jacobian!r}.")
        frozen = _sg(nets)
        H, B = self.horizon, s0.shape[0]
        delta = jnp.zeros((H + 1, B, self._built_spec().act_dim), s0.dtype)
        returns, vjp, roll = jax.vjp(
            lambda d: (lambda r: (r["returns"], r))(self.rollout(frozen, s0, g, noise, d)), delta, has_aux=True
        )
        alpha, chain = return_chain(H, discount=self.gamma, lam=self.lam)
        if jacobian == "chain" and chain.min() > CHAIN_MIN:
            (adj,) = vjp(jnp.zeros_like(returns).at[0].set(1.0))  # d Q^lam_0 / d a_t, (H+1, B, act_dim)
            g_steps = jnp.broadcast_to(g, roll["states"].shape[:2] + g.shape[1:])
            dq_da = vmap_steps(
                jax.grad(lambda a, s, gg: frozen.critic(s, gg, a)), roll["actions"], roll["states"], g_steps
            )
            alive = roll["alive"][..., None]
            P = alive * jnp.asarray(chain, returns.dtype)[:, None, None]
            local = jnp.asarray(alpha, returns.dtype)[:, None, None] * dq_da
            grads = jnp.where(alive > 0, adj / jnp.where(alive > 0, P, 1.0), local)
        else:
            seeds = jnp.eye(H + 1, dtype=returns.dtype)[:, :, None] * jnp.ones_like(returns)[None]
            (jac,) = jax.vmap(vjp)(seeds)  # (H+1 seeds, H+1, B, act_dim)
            grads = jac[jnp.arange(H + 1), jnp.arange(H + 1)]
        weights = expectile_weights(returns, roll["q"], self.expectile).at[H].set(LAST_STEP_WEIGHT)
        return _sg(dict(roll, grads=grads, weights=weights))

    def actor_loss(self, nets: LEQNetworks, aroll: dict, g: Float[Array, "B goal_dim"]) -> tuple[Array, dict]:
        """The actor's loss (:func:`actor_surrogate`) on :meth:`actor_rollout`'s states and action gradients,
        with ``pi`` evaluated by ``nets.actor`` (the only network it moves); ``(loss, metrics)``."""
        g_steps = jnp.broadcast_to(g, aroll["states"].shape[:2] + g.shape[1:])
        actions = vmap_steps(nets.actor, aroll["states"], g_steps)  # (H+1, B, act_dim)
        loss = actor_surrogate(actions, aroll["weights"][..., None] * aroll["grads"])
        alive = aroll["alive"]
        return loss, {
            "actor/loss": loss,
            "actor/return_mean": aroll["returns"][0].mean(),
            "actor/lambda_return_mean": aroll["returns"].mean(),
            "actor/weight_mean": jnp.mean(aroll["weights"] * alive) / jnp.mean(alive),
            "actor/grad_norm_mean": jnp.mean(jnp.linalg.norm(aroll["grads"], axis=-1)),
            "actor/abs_action_mean": jnp.abs(aroll["actions"]).mean(),
        }

    # ------------------------------------------------------------------ the update
    def model_losses(self, nets: LEQNetworks, real: dict, dyn_eps: Float[Array, "k B ob_dim"]) -> tuple[Array, dict]:
        """Dynamics NLL, success BCE and (single-task) reward MSE on the real batch, with the authors'
        metrics (``dynamics/*``, ``success/*``, ``reward/*``); ``(loss, metrics)``.

        ``dyn_eps``: standard normal noise of one sample per member and example, the sample of the
        ``dynamics/sample_mse`` metric (the authors' ``dynamics_mse``: one draw of the squared error of
        a model sample; ``dynamics/mse`` is that of the mean)."""
        s, a, vg, s_next = real["obs"], real["actions"], real["value_goals"], real["next_obs"]
        dyn, m = model_nll(nets.dynamics, s, a, s_next, dyn_eps)
        metrics = dict(m)
        label = 1.0 - real["masks"]
        succ, m_s = jax.vmap(nets.success.loss)(s, vg, a, label)
        metrics.update({k: jnp.mean(v) for k, v in m_s.items()}, **success_metrics(_sg(m_s["success/prob"]), label))
        total = dyn + succ.mean()
        if nets.reward is not None:
            rew, m_r = jax.vmap(nets.reward.loss)(s, vg, a, real["rewards"])
            total = total + rew.mean()
            metrics.update(
                {k: jnp.mean(v) for k, v in m_r.items()}, **reward_metrics(_sg(m_r["reward/pred"]), real["rewards"])
            )
        return total, metrics

    def loss(
        self, nets: LEQNetworks, target_critic, real: dict, y_data: Array, croll: dict, aroll: dict, dyn_eps: Array
    ) -> tuple[Array, dict]:
        """Sum of every LEQ loss and namespaced metrics. ``real``: the one-step batch; ``y_data``: the data
        target; ``croll``: the critic's rollout (value goals); ``aroll``: :meth:`actor_rollout` (actor goals);
        ``dyn_eps``: the noise of the ``dynamics/sample_mse`` metric (:meth:`model_losses`)."""
        s, a, vg, ag = real["obs"], real["actions"], real["value_goals"], real["actor_goals"]
        H = self.horizon
        total, metrics = self.model_losses(nets, real, dyn_eps)

        def on_steps(q, st, at):  # Q on the imagined (s_t, g_v, a_t), t < H: (H, B)
            return vmap_steps(q, st, jnp.broadcast_to(vg, st.shape[:2] + vg.shape[1:]), at)

        st, at = croll["states"][:H], croll["actions"][:H]
        q_data = jax.vmap(nets.critic)(s, vg, a)
        q_model = on_steps(nets.critic, st, at)
        critic_loss, m_c = critic_objective(
            q_data,
            jax.vmap(target_critic)(s, vg, a),
            y_data,
            q_model,
            on_steps(target_critic, st, at),
            croll["returns"][:H],
            croll["alive"][:H],
            discount=self.gamma,
            expectile=self.expectile,
            data_expectile=self.data_expectile,
            model_weight=self.model_weight,
        )

        actor_loss, m_a = self.actor_loss(nets, aroll, ag)

        total = total + critic_loss + actor_loss
        metrics.update({**m_c, **m_a})
        alive = croll["alive"][:H]
        r_alive = croll["rewards"] * alive
        metrics.update(
            {
                "critic/q_data_min": q_data.min(),
                "critic/q_data_max": q_data.max(),
                "critic/q_model_min": q_model.min(),
                "critic/q_model_max": q_model.max(),
                "critic/reward_data_mean": real["rewards"].mean(),
                "critic/reward_data_max": real["rewards"].max(),
                "critic/reward_data_min": real["rewards"].min(),
                "critic/reward_model_mean": r_alive.mean(),
                "critic/reward_model_max": r_alive.max(),
                "critic/reward_model_min": r_alive.min(),
                "critic/alive_mean": croll["alive"].mean(),
                "critic/state_abs_max": jnp.max(jnp.abs(croll["states"][:H] * alive[..., None])),
                "rollout/reward_mean": jnp.sum(r_alive) / jnp.sum(alive),
                "rollout/done_rate": 1.0 - croll["alive"][H].mean(),
                "total/loss": total,
            }
        )
        return total, metrics

    def update(self, state: LEQState, batch: dict, noise: dict | None = None) -> tuple[LEQState, dict]:
        """One gradient step on the loop's one-step ``batch`` (pure; jit it).

        ``noise``: every random draw of the update, :meth:`draw_noise`'s dict; None (the training
        loop): drawn from the state's key."""
        key, k_noise = jax.random.split(state.key)
        nets, frozen = state.nets, _sg(state.nets)
        real = one_step_view(batch)
        vg, B = real["value_goals"], real["obs"].shape[0]
        if noise is None:
            noise = self.draw_noise(nets, k_noise, B, real["obs"].dtype)
        a_next = jax.vmap(frozen.actor)(real["next_obs"], vg)
        y_data = real["rewards"] + self.gamma * real["masks"] * jax.vmap(frozen.critic)(real["next_obs"], vg, a_next)
        croll = _sg(self.rollout(frozen, real["obs"], vg, noise["critic"]))
        aroll = self.actor_rollout(nets, real["obs"], real["actor_goals"], noise["actor"])

        nets, opt_state, metrics = gradient_step(
            nets,
            state.opt_state,
            self.optimizer(),
            lambda nets: self.loss(nets, state.target_critic, real, _sg(y_data), croll, aroll, noise["dynamics"]),
        )
        target = ema(state.target_critic, state.nets.critic, self.tau)  # the critic before this step (the authors')
        return dataclasses.replace(
            state, step=state.step + 1, key=key, nets=nets, target_critic=target, opt_state=opt_state
        ), metrics
