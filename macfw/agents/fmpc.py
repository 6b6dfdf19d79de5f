"""FMPC: flow-matching model predictive control, as the MAC paper runs it (DESIGN §9; the authors'
``agents/fmpc.py``, "a flow version of DMPC", Zhou et al. 2025).

No imagined training rollouts: every network trains on dataset samples, jointly, with one Adam
optimiser on the sum of four losses (``L`` = :attr:`FMPC.future_len`, default 32 environment steps):

1. future model ``p(X | s_t, a_t)`` (:class:`FutureFlow`): flow matching on the flattened future
   ``X = (s_{t+1}, ..., s_{t+L})`` (``L * ob_dim`` floats), sampled with a diffrax ODE solve (10 Euler
   steps);
2. behaviour policy ``pi(a | s, g_a)``: flow matching on the single action ``a_t``
   (:class:`~macfw.nn.flow.FlowPolicy` with a ``chunk_len = 1`` spec; the authors sample it by
   solving the ODE, 10 Euler steps, no distilled network);
3. value ``V(s_t, g)``; goal-conditioned: BCE to ``1[g appears at or after t in s_t's trajectory]``
   (the authors' ``returns_to_go``); single-task: see below;
4. critic ``Q(X, g, a_t)`` on the *real* future: target ``r + gamma^L m V(s_{t+L}, g)`` under
   stop-gradient (:func:`critic_target`).

Acting (:meth:`FMPC.act`): draw ``num_samples`` (64) actions from ``pi``, predict each one's future with
the model, return the action of the highest ``Q(X_i, g, a_i)``.

Rewards over the ``L``-step window (the batch is sampled with ``chunk_len = L``, so its ``rewards``,
``masks``, ``success`` and ``next_obs = s_{t+L}`` all span the window):

* goal-conditioned: ``c = 1[t <= value_goal_idx < t + L]``, ``r = c``, ``m = 1 - c`` (the authors'
  ``gc_negative = False``: values are probabilities in [0, 1], fitted by BCE; targets clipped to [0, 1]);
* single-task: ``r = sum_{i<L} gamma^i r_{t+i}`` (divided by ``L`` with ``normalize_reward``, the
  authors' scale), ``m = 1``. Rewards are not probabilities here, so V and Q regress with MSE whatever
  ``value_loss`` says, and V is the behaviour value by ``L``-step TD against its EMA copy ``V'``:
  ``V(s_t) <- r + gamma^L V'(s_{t+L})`` (the authors' single-task target, an undiscounted return-to-go
  clipped to [0, 1], is identically 0 for OGBench's non-positive rewards; see :meth:`FMPC.targets`).

Parity with the authors' code (``experiments/parity.py``, issue 29; the same parameters, batches and
draws, goal-conditioned and single-task: every logged metric and the parameters after 10 updates agree
to float rounding, 8e-6 at most). The update takes its random draws as an argument
(``update(state, batch, noise)``, :meth:`FMPC.draw_noise`: the batch-level flow-matching noise and
flow times of the future model and the policy). Deliberate deviations from their code, each measured
there and listed by name with both sides' values:

* ``critic_target_bootstraps_value_logit``: their critic target is ``clip(r + gamma^L m V, 0, 1)``
  with ``V`` the value network's raw output, a logit under their BCE value loss; macfw bootstraps
  ``sigmoid(V)`` (:meth:`FMPC.targets`). On the harness's first batch their critic loss is 0.866
  against 0.893 with the probability, and after 10 updates their parameters are 0.85 (relative)
  away from the bootstrapped-probability ones.
* ``return_to_go_excludes_the_trajectory_end``: their value label ``1[t <= g_idx < final]`` (with
  OGBench's compact layout ``final`` is the second-to-last state) says a goal at the trajectory's last
  two states is not later in it; macfw's is ``1[t <= g_idx <= end]`` (:func:`goal_later_label`).
* ``singletask_value_target_is_a_clipped_return_to_go``: see the single-task paragraph above (their
  return-to-go is also a ``(L + 1, B)`` array broadcast against ``V``'s ``(B,)``).

Code name -> symbol: ``future_len`` L, ``num_samples`` N, ``gamma`` gamma, ``tau`` EMA rate of
``V'``, ``model`` p, ``policy`` pi, ``critic`` Q, ``value`` V, ``target_value`` V'. Shapes per example:
``s: (ob_dim,)``, ``a: (act_dim,)``, ``X: (L * ob_dim,)``, ``g: (goal_dim,)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.agents.base import Agent, BatchSpec, copy_of, ema, gradient_step
from macfw.data.goals import GoalSampling, goal_sampling_for
from macfw.errors import check, check_choice, check_float, check_int
from macfw.nn import losses
from macfw.nn.flow import FlowPolicy, resolve_solver, solve_flow
from macfw.nn.mlp import MLP
from macfw.nn.models import HIDDEN, QCritic, StateValue
from macfw.registry import register
from macfw.spec import Spec

VALUE_LOSSES = ("bce", "mse")


# --------------------------------------------------------------------------------------------
# The future model
# --------------------------------------------------------------------------------------------
@register("future_model")
class FutureFlow(eqx.Module):
    """Flow-matching model of the flattened future ``X = (s_{t+1}, ..., s_{t+L})`` given ``(s_t, a_t)``.

    Velocity field ``v(s, a, x, u) = MLP([s, a, x, u])`` (the authors' ``DynamicsVectorField``; not
    residual). Flow matching: ``x = (1 - u) z + u X``, target velocity ``X - z``, ``z ~ N(0, I)``,
    ``u ~ U[0, 1]``. Sampling solves ``dx/du = v`` from ``x(0) = z`` to ``x(1)`` with diffrax
    (:func:`~macfw.nn.flow.solve_flow`).

    Args:
      spec: sizes (``spec.act_dim`` is the single action; ``chunk_len`` is ignored).
      future_len: L, environment steps predicted (set by :class:`FMPC` from ``FMPC.future_len``).
      hidden_dims: MLP hidden sizes (default 4 x 1024).
      layer_norm: LayerNorm after each hidden activation.
      flow_steps: fixed ODE steps from noise to a future (default 10).
      solver: diffrax solver name (see :data:`macfw.nn.flow.SOLVERS`) or instance (default Euler).
      key: PRNG key.

    Raises:
      ConfigError: ``future_len`` or ``flow_steps`` below 1, an unknown ``solver``, bad ``hidden_dims``.
    """

    field: MLP
    future_dim: int = eqx.field(static=True)
    flow_steps: int = eqx.field(static=True)
    solver: Any = eqx.field(static=True)

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        future_len: int = 32,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        flow_steps: int = 10,
        solver: str = "euler",
        compute_dtype: str | None = None,
    ):
        future_len = check_int("FMPC.future_len", future_len)
        self.flow_steps = check_int("FutureFlow.flow_steps", flow_steps)
        check("FutureFlow.solver", solver, _solver_ok(solver), "a diffrax solver name such as 'euler', or an instance")
        self.solver = solver
        self.future_dim = future_len * spec.ob_dim
        d_in = spec.ob_dim + spec.act_dim + self.future_dim + 1
        self.field = MLP(
            d_in,
            self.future_dim,
            hidden_dims,
            key=key,
            layer_norm=layer_norm,
            compute_dtype=compute_dtype,
            name=type(self).__name__,
        )

    def velocity(self, s, a, x, u) -> Float[Array, " future_dim"]:
        """``v(s, a, x, u)``: ``x: (L * ob_dim,)``, ``u`` scalar flow time."""
        u = jnp.reshape(jnp.asarray(u, x.dtype), (1,))
        return self.field(jnp.concatenate([s, a, x, u]))

    def predict(self, s, a, z) -> Float[Array, " future_dim"]:
        """The ODE solution ``x(1)`` from noise ``z: (L * ob_dim,)``."""
        return solve_flow(self.velocity, s, a, z, num_steps=self.flow_steps, solver=self.solver)

    def sample(self, s, a, *, key: PRNGKeyArray) -> Float[Array, " future_dim"]:
        """A future drawn from the model: ``(L * ob_dim,)``."""
        return self.predict(s, a, jax.random.normal(key, (self.future_dim,)))

    def flow_loss(self, s, a, X, z, u) -> tuple[Array, dict]:
        """Flow-matching loss for one example from given noise ``z: (L * ob_dim,)`` and flow time ``u``
        (scalar); ``X: (L * ob_dim,)`` the real flattened future. Metrics: the loss and ``|X - z|``
        (the target velocity's norm, the authors' ``vel``)."""
        x = (1.0 - u) * z + u * X
        err = jnp.mean((self.velocity(s, a, x, u) - (X - z)) ** 2)
        return err, {"dynamics/loss": err, "dynamics/vel": jnp.linalg.norm(X - z)}

    def loss(self, s, a, X, *, key: PRNGKeyArray) -> tuple[Array, dict]:
        """:meth:`flow_loss` with ``z ~ N(0, I)``, ``u ~ U[0, 1]`` drawn from ``key``."""
        kz, ku = jax.random.split(key)
        return self.flow_loss(s, a, X, jax.random.normal(kz, X.shape, X.dtype), jax.random.uniform(ku, dtype=X.dtype))


def _solver_ok(solver) -> bool:
    try:
        resolve_solver(solver)
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Equations (pure functions; tests pin them)
# --------------------------------------------------------------------------------------------
def critic_target(r: Array, m: Array, v_next: Array, *, gamma: float, future_len: int, clip01: bool = False) -> Array:
    """FMPC's critic target ``r + gamma^L m v_next`` (elementwise), clipped to [0, 1] when ``clip01``.

    ``v_next`` is ``V(s_{t+L}, g)`` as a value (a probability for BCE heads: the sigmoid of the logit).
    """
    target = r + (gamma**future_len) * m * v_next
    return jnp.clip(target, 0.0, 1.0) if clip01 else target


def goal_later_label(idx: Array, value_goal_idx: Array, traj_end: Array | None = None) -> Array:
    """The goal-conditioned value label ``1[t <= value_goal_idx <= traj_end(t)]``: the goal is s_t or a
    later state of s_t's trajectory (float32, elementwise).

    The loop's batches carry ``traj_end``. Without it a goal at or after ``t`` counts as later in the
    trajectory: exact for the current-state and same-trajectory goals (70% of value goals), wrong for
    random goals drawn after ``t`` in another trajectory.
    """
    later = value_goal_idx >= idx
    if traj_end is not None:
        later = later & (value_goal_idx <= traj_end)
    return later.astype(jnp.float32)


def _sg(tree):
    return jax.lax.stop_gradient(tree)


# --------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------
class FMPCNetworks(eqx.Module):
    """Every trained network of FMPC (what the optimiser updates); equinox Modules used duck-typed (``Any``)."""

    model: Any  # FutureFlow: p(X | s, a)
    policy: Any  # FlowPolicy over single actions: pi(a | s, g_a)
    critic: Any  # QCritic on (X, g, a)
    value: Any  # StateValue V(s, g)


class FMPCState(eqx.Module):
    """Step, key, networks, the value's EMA copy ``V'`` (single-task TD) and the optimiser state."""

    step: Array
    key: Array
    nets: FMPCNetworks
    target_value: Any  # a copy of nets.value
    opt_state: Any


@register("agent")
class FMPC(Agent):
    """FMPC (see the module docstring). Component arguments are registered classes built as
    ``Cls(spec, key=...)`` (``model`` also gets ``future_len=``); ``gin/baselines/fmpc.gin`` holds the
    authors' defaults.

    Args:
      model, policy, critic, value: component factories (:class:`FutureFlow`, FlowPolicy, QCritic,
        StateValue). The policy is built for single actions (``chunk_len = 1``), the critic for inputs
        ``(L * ob_dim) + goal_dim + act_dim``.
      future_len: L, environment steps of the modelled future and of the critic's n-step target (the
        authors' ``action_chunking``, 32). Samples need ``t + L`` inside the trajectory.
      num_samples: N, actions drawn from the policy per decision (64).
      gamma: per-step discount (``gamma^L`` per window).
      tau: EMA rate of ``V'`` (used by the single-task value target).
      learning_rate: Adam step size (one optimiser over every loss).
      value_loss: ``'bce'`` (the authors': V and Q are logits of probabilities) or ``'mse'``, for
        goal-conditioned data; single-task data always uses MSE.
      normalize_reward: divide the single-task window reward by L (the authors' mean over the window).
      goal_sampling: the hindsight relabelling of goal-conditioned samples (None:
        ``GoalSampling()``, i.e. the ``GoalSampling.*`` Gin bindings; :mod:`macfw.data.goals`).

    Raises:
      ConfigError: a value out of range.
    """

    acts_in_chunks = False

    def __init__(
        self,
        model: Callable = FutureFlow,
        policy: Callable | None = None,
        critic: Callable = QCritic,
        value: Callable = StateValue,
        *,
        future_len: int = 32,
        num_samples: int = 64,
        gamma: float = 0.999,
        tau: float = 0.005,
        learning_rate: float = 3e-4,
        value_loss: str = "bce",
        normalize_reward: bool = True,
        goal_sampling: GoalSampling | None = None,
    ):
        name = type(self).__name__
        policy = functools.partial(FlowPolicy, distill=False) if policy is None else policy
        for slot, f in (("model", model), ("policy", policy), ("critic", critic), ("value", value)):
            check(f"{name}.{slot}", f, callable(f), "a network class, e.g. @FutureFlow (see gin/baselines/fmpc.gin)")
        self.factories = dict(model=model, policy=policy, critic=critic, value=value)
        self.future_len = check_int(f"{name}.future_len", future_len)
        self.num_samples = check_int(f"{name}.num_samples", num_samples)
        self.gamma = check_float(f"{name}.gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
        self.tau = check_float(f"{name}.tau", tau, low=0.0, high=1.0, low_open=True)
        self.learning_rate = check_float(f"{name}.learning_rate", learning_rate, low=0.0, low_open=True)
        self.value_loss = check_choice(f"{name}.value_loss", value_loss, VALUE_LOSSES)
        check(f"{name}.normalize_reward", normalize_reward, isinstance(normalize_reward, bool), "True or False")
        self.normalize_reward = normalize_reward
        self.goal_sampling = goal_sampling_for(name, goal_sampling)
        self.spec: Spec | None = None

    @property
    def batch_spec(self) -> BatchSpec:
        """Windows of L steps: ``rewards``/``masks``/``success``/``next_obs`` span ``[t, t+L)`` and
        ``future_obs`` holds ``s_{t+1..t+L}``; the actions' first ``act_dim`` floats are ``a_t``."""
        return BatchSpec(
            chunk_len=self.future_len,
            gamma=self.gamma,
            normalize_reward=self.normalize_reward,
            future_len=self.future_len,
            binding="FMPC.future_len",
            goals=self.goal_sampling,
        )

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    @property
    def _bce(self) -> bool:
        return self._built_spec().goal_conditioned and self.value_loss == "bce"

    # ------------------------------------------------------------------ building
    def init(self, spec: Spec, key) -> FMPCState:
        self.spec = spec
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        key, *ks = jax.random.split(key, 5)
        one = dataclasses.replace(spec, chunk_len=1)
        future = dataclasses.replace(one, ob_dim=self.future_len * spec.ob_dim)
        f = self.factories
        nets = FMPCNetworks(
            model=f["model"](one, key=ks[0], future_len=self.future_len),
            policy=f["policy"](one, key=ks[1]),
            critic=f["critic"](future, key=ks[2]),
            value=f["value"](one, key=ks[3]),
        )
        check(
            "FMPC.policy",
            type(nets.policy).__name__,
            hasattr(nets.policy, "flow_loss") and getattr(nets.policy, "one_step", None) is None,
            "a flow policy trained by flow matching alone, sampled by solving its ODE (the authors'): "
            "@FlowPolicy with FlowPolicy.distill = False",
        )
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        target = copy_of(nets.value)
        return FMPCState(step=jnp.zeros((), jnp.int32), key=key, nets=nets, target_value=target, opt_state=opt_state)

    # ------------------------------------------------------------------ what a sample holds for FMPC
    def training_inputs(self, batch: dict) -> dict[str, Array]:
        """FMPC's view of a loop batch (:attr:`batch_spec`), per example ``(B, ...)``:

        ``obs`` s_t; ``action`` a_t ``(act_dim,)``; ``future`` X = s_{t+1..t+L} flattened time-major
        ``(L * ob_dim,)``; ``last`` s_{t+L}; ``value_goals``, ``actor_goals``; ``reward`` r and ``mask`` m
        of the window (module docstring); ``value_label`` the goal-conditioned V target (zeros for
        single-task data). Uses ``batch['traj_end']`` for the label when the batch has it.
        """
        B = batch["obs"].shape[0]
        spec = self._built_spec()
        ob_dim, act_dim = spec.ob_dim, spec.act_dim
        fut = batch["future_obs"]
        if spec.goal_conditioned:
            reward, label = (
                batch["success"],
                goal_later_label(batch["idx"], batch["value_goal_idx"], batch.get("traj_end")),
            )
        else:
            reward, label = batch["rewards"], jnp.zeros((B,), jnp.float32)
        return {
            "obs": batch["obs"],
            "action": batch["actions"][:, :act_dim],
            "future": fut.reshape(B, self.future_len * ob_dim),
            "last": fut[:, -1],
            "value_goals": batch["value_goals"],
            "actor_goals": batch["actor_goals"],
            "reward": reward,
            "mask": batch["masks"],
            "value_label": label,
        }

    def targets(self, nets: FMPCNetworks, target_value, inputs: dict) -> dict[str, Array]:
        """Regression targets ``(B,)`` under stop-gradient: ``q`` for Q (:func:`critic_target` with
        ``V(s_{t+L}, g)`` of the current value network, as the authors; through the sigmoid for BCE
        heads) and ``v`` for V (goal-conditioned: ``value_label``; single-task:
        ``r + gamma^L m V'(s_{t+L})``)."""
        nets, target_value = _sg(nets), _sg(target_value)
        g = inputs["value_goals"]
        v_next = jax.vmap(nets.value)(inputs["last"], g)
        if self._bce:
            v_next = jax.nn.sigmoid(v_next)
        q = critic_target(
            inputs["reward"], inputs["mask"], v_next, gamma=self.gamma, future_len=self.future_len, clip01=self._bce
        )
        if self._built_spec().goal_conditioned:
            v = inputs["value_label"]
        else:
            v = critic_target(
                inputs["reward"],
                inputs["mask"],
                jax.vmap(target_value)(inputs["last"], g),
                gamma=self.gamma,
                future_len=self.future_len,
            )
        return {"q": q, "v": v}

    # ------------------------------------------------------------------ the update
    def draw_noise(self, key, batch_size: int) -> dict[str, Array]:
        """The update's random draws, at batch level: the flow-matching noise and flow times of the
        future model (``model_z (B, L * ob_dim)``, ``model_u (B,)``) and of the policy (``policy_z
        (B, act_dim)``, ``policy_u (B,)``); normals and uniforms on [0, 1)."""
        kz, ku, pz, pu = jax.random.split(key, 4)
        B = batch_size
        spec = self._built_spec()
        return {
            "model_z": jax.random.normal(kz, (B, self.future_len * spec.ob_dim)),
            "model_u": jax.random.uniform(ku, (B,)),
            "policy_z": jax.random.normal(pz, (B, spec.act_dim)),
            "policy_u": jax.random.uniform(pu, (B,)),
        }

    def loss(self, nets: FMPCNetworks, inputs: dict, targets: dict, noise: dict) -> tuple[Array, dict]:
        """The four losses on one batch of :meth:`training_inputs` with the draws ``noise``
        (:meth:`draw_noise`); ``(total, metrics)``."""
        model_l, m_model = jax.vmap(nets.model.flow_loss)(
            inputs["obs"], inputs["action"], inputs["future"], noise["model_z"], noise["model_u"]
        )
        policy_l = jax.vmap(nets.policy.flow_loss)(
            inputs["obs"], inputs["actor_goals"], inputs["action"], noise["policy_z"], noise["policy_u"]
        )
        g = inputs["value_goals"]
        v = jax.vmap(nets.value)(inputs["obs"], g)
        q = jax.vmap(nets.critic)(inputs["future"], g, inputs["action"])
        reg = losses.bce if self._bce else losses.mse
        value_l = jnp.mean(reg(v, targets["v"]))
        critic_l = jnp.mean(reg(q, targets["q"]))
        if self._bce:
            v, q = jax.nn.sigmoid(v), jax.nn.sigmoid(q)
        total = model_l.mean() + policy_l.mean() + value_l + critic_l
        metrics = {k: jnp.mean(x) for k, x in m_model.items()}
        metrics.update(
            {
                "flow/loss": policy_l.mean(),
                "flow/vel": jnp.linalg.norm(inputs["action"] - noise["policy_z"], axis=-1).mean(),
                "value/loss": value_l,
                "value/v_mean": v.mean(),
                "value/v_max": v.max(),
                "value/v_min": v.min(),
                "value/target_mean": targets["v"].mean(),
                "critic/loss": critic_l,
                "critic/q_mean": q.mean(),
                "critic/q_max": q.max(),
                "critic/q_min": q.min(),
                "critic/target_mean": targets["q"].mean(),
                "total/loss": total,
            }
        )
        return total, metrics

    def update(self, state: FMPCState, batch: dict, noise: dict[str, Array] | None = None) -> tuple[FMPCState, dict]:
        """One gradient step on a loop batch (pure; jit it). ``noise``: the draws of :meth:`draw_noise`
        (None: drawn from the state's key)."""
        key, k_loss = jax.random.split(state.key)
        if noise is None:
            noise = self.draw_noise(k_loss, batch["obs"].shape[0])
        inputs = self.training_inputs(batch)
        targets = self.targets(state.nets, state.target_value, inputs)
        nets, opt_state, metrics = gradient_step(
            state.nets, state.opt_state, self.optimizer(), lambda nets: self.loss(nets, inputs, targets, noise)
        )
        target = ema(state.target_value, nets.value, self.tau)
        return dataclasses.replace(
            state, step=state.step + 1, key=key, nets=nets, target_value=target, opt_state=opt_state
        ), metrics

    # ------------------------------------------------------------------ acting
    def candidates(self, nets: FMPCNetworks, s, g, *, key) -> tuple[Array, Array]:
        """``num_samples`` actions ``clip(pi(s, g), -1, 1)``: ``(N, act_dim)``, and a predicted future
        for each, ``(N, L * ob_dim)`` (independent model noise per candidate)."""
        ka, kx = jax.random.split(key)
        actions = jnp.clip(nets.policy.sample_many(s, g, self.num_samples, key=ka), -1.0, 1.0)
        futures = jax.vmap(lambda a, k: nets.model.sample(s, a, key=k))(actions, jax.random.split(kx, self.num_samples))
        return actions, futures

    def act(self, nets: FMPCNetworks, s, g, *, key):
        """The candidate action of the highest ``Q(X_i, g, a_i)``: ``(1, act_dim)`` in [-1, 1]."""
        actions, futures = self.candidates(nets, s, g, key=key)
        q = jax.vmap(lambda X, a: nets.critic(X, g, a))(futures, actions)
        return actions[jnp.argmax(q)].reshape(1, self._built_spec().act_dim)
