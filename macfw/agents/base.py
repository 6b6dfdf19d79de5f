"""The agent interface: what the training loop, evaluation, checkpoints and the benchmark rely on.

Every agent (MAC, its ablations, the baselines) subclasses :class:`Agent` and registers under the
``agent`` kind (``@register("agent")``). The loop (:mod:`macfw.train`) knows nothing else about
an agent: it asks for the batch the agent needs (:attr:`Agent.batch_spec`), builds the state
(:meth:`Agent.init`), runs the pure update (:meth:`Agent.update`) ``K`` times per compiled call,
checkpoints the whole state, and evaluates with :meth:`Agent.act` on
:meth:`Agent.acting_params`. Seeds are vmapped over the state and batches are sharded over
devices by the loop, so an agent is written for one seed and one (global) batch.

A state is an :class:`equinox.Module` with at least these fields (:class:`AgentState` has them):

* ``step``: gradient steps taken, int32 scalar;
* ``key``: raw PRNG key data ``(2,)`` uint32 (the loop splits it to sample batches on the device);
* ``nets``: the trained networks (the loop checks them for NaN/Inf once per compiled call).

Anything else an agent must carry between updates (target networks, optimiser state, a buffer of
model rollouts refreshed every K gradient steps) is a field of its state too, so it is
checkpointed and restored exactly like the parameters.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from macfw import reference
from macfw.data.goals import DEFAULT_GOALS, GoalSampling
from macfw.spec import Spec


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What one training sample holds (DESIGN §2.1); the loop samples batches to this spec.

    Every batch (``macfw.data.batches.sample_batch``) holds, per example: ``obs (ob_dim,)`` = s_t;
    ``actions (chunk_len * act_dim,)`` = a_t .. a_{t+n-1}; ``next_obs (ob_dim,)`` = s_{t+n};
    ``rewards ()`` the n-step discounted reward ``sum_i gamma^i r_{t+i}`` (single-task; divided by
    n when ``normalize_reward``), or ``success - 1`` (goal-conditioned); ``masks ()``;
    ``success ()`` the chunk success label; ``value_goals, actor_goals (goal_dim,)`` hindsight
    relabelled goals drawn as ``goals`` says (``(0,)`` single-task); ``next_goals (goal_dim,)``
    the goal representation of s_{t+n}; ``idx``, ``value_goal_idx``, ``actor_goal_idx ()`` the dataset
    indices of s_t, of the value goal and of the actor goal; ``traj_end ()`` the index of the last
    observation of s_t's trajectory; and, when ``future_len > 0``,
    ``future_obs (future_len, ob_dim)`` = s_{t+1} .. s_{t+future_len}.

    Attributes:
      chunk_len: n, environment steps per sample (1: one-step transitions; n-step targets and
        action chunks both use n). Only indices ``t`` with ``t + max(n, future_len)`` in the
        same trajectory are sampled.
      gamma: per-step discount of the n-step reward and of the geometric goal offsets.
      normalize_reward: divide the single-task n-step reward by n (the MAC authors' scale).
      future_len: also return the next ``future_len`` observations (0: none).
      binding: the agent's Gin binding that sets the window (``chunk_len`` or ``future_len``), named
        when the data's trajectories are too short for it (e.g. ``'NStepSACBC.n'``); empty: the
        agent's ``chunk_len``.
      goals: the hindsight relabelling of goal-conditioned samples (a
        :class:`~macfw.data.goals.GoalSampling`: which share of value and actor goals is the
        current state, a later state of the trajectory, or a random state, and the later state's
        offset distribution); default the authors' defaults (DESIGN §2.1). Every macfw agent passes
        its own (Gin: ``GoalSampling.actor_p_trajgoal = 1.0`` etc.), see
        :func:`~macfw.data.goals.goal_sampling_for`. Single-task batches ignore it.
    """

    chunk_len: int = 1
    gamma: float = 0.99
    normalize_reward: bool = False
    future_len: int = 0
    binding: str = ""
    goals: GoalSampling = DEFAULT_GOALS

    @property
    def window(self) -> int:
        """Environment steps after ``t`` a sample reads: ``max(chunk_len, future_len)``."""
        return max(self.chunk_len, self.future_len)


@dataclasses.dataclass(frozen=True)
class RefreshSpec:
    """When the loop calls :meth:`Agent.refresh` and with how many start samples.

    For agents with training-time state that is rebuilt now and then, e.g. MOPO/MOBILE's buffer of
    model rollouts (MBPO). The loop calls ``agent.refresh(state, starts)`` after the dispatch that
    ends at every gradient step ``t`` with ``t >= first`` and ``t % every == 0`` (before that
    step's logging, evaluation and checkpoint, so a checkpoint holds the refreshed state and a
    resumed run continues exactly). ``starts`` is a batch of ``batch_size`` samples of the agent's
    own :attr:`Agent.batch_spec`, drawn from ``fold_in(PRNGKey(seed + REFRESH_KEY_OFFSET), t)``.

    Attributes:
      every: gradient steps between refreshes; a multiple of ``train.steps_per_dispatch``.
      batch_size: start samples per refresh.
      first: the first refresh's gradient step (a multiple of ``every``; the models have trained
        ``first`` steps by then).
      binding: the Gin binding that sets ``every``, named in errors (e.g.
        ``'ModelRollouts.rollout_freq'``).
    """

    every: int
    batch_size: int
    first: int
    binding: str


class AgentState(eqx.Module):
    """A generic agent state (an agent may define its own with at least ``step``, ``key``, ``nets``).

    Attributes:
      step: gradient steps taken (int32 scalar).
      key: raw PRNG key data ``(2,)`` uint32.
      nets: the trained networks (what the optimiser updates).
      opt_state: optax state.
      extra: any other training-time pytree (target networks, a model-rollout buffer, ...).
    """

    step: Array
    key: Array
    nets: Any
    opt_state: Any
    extra: Any = None


class Agent(abc.ABC):
    """Abstract base of every agent (registered under the ``agent`` kind).

    Subclasses set ``self.spec`` in :meth:`init` (sizes come from the data, never from Gin) and
    implement the four abstract members. Hyperparameters are constructor arguments bound by Gin.
    A goal-conditioned agent takes ``goal_sampling: GoalSampling | None = None``, keeps
    ``goal_sampling_for(name, goal_sampling)`` (:mod:`macfw.data.goals`; None builds
    ``GoalSampling()``, so the ``GoalSampling.*`` bindings apply) and puts it in its
    :attr:`batch_spec` (``BatchSpec(..., goals=self.goal_sampling)``).

    Attributes:
      spec: the sizes the agent was built for (None until :meth:`init`).
      acts_in_chunks: True when :meth:`act` returns a whole chunk ``(chunk_len, act_dim)`` (the
        loop may execute up to ``chunk_len`` of its actions); False for one action ``(1, act_dim)``.
    """

    spec: Spec | None = None
    acts_in_chunks: bool = False

    @property
    @abc.abstractmethod
    def batch_spec(self) -> BatchSpec:
        """The batch this agent trains on (see :class:`BatchSpec`)."""

    @property
    def chunk_len(self) -> int:
        """n in environment steps (the data's chunk length)."""
        return self.batch_spec.chunk_len

    @abc.abstractmethod
    def init(self, spec: Spec, key) -> eqx.Module:
        """Build every network for ``spec`` and return a fresh state (``key``: raw key data or an int seed)."""

    @abc.abstractmethod
    def update(self, state: eqx.Module, batch: dict[str, Array]) -> tuple[eqx.Module, dict[str, Array]]:
        """One gradient step: ``(state, batch) -> (state, metrics)``; pure and jittable.

        ``batch`` holds ``(B, ...)`` arrays as described in :class:`BatchSpec`; ``metrics`` are
        scalars with namespaced keys (``dynamics/loss``, ``critic/loss``, ...).
        """

    @abc.abstractmethod
    def act(
        self, params: Any, s: Float[Array, " ob_dim"], g: Float[Array, " goal_dim"], *, key
    ) -> Float[Array, "k act_dim"]:
        """Actions for one scaled observation and goal: ``(chunk_len, act_dim)`` when
        :attr:`acts_in_chunks`, else ``(1, act_dim)``; values in [-1, 1]. ``params`` is
        :meth:`acting_params` of a state."""

    def _built_spec(self) -> Spec:
        """:attr:`spec`, which :meth:`init` sets.

        Raises:
          RuntimeError: :meth:`init` has not been called (``spec`` is None).
        """
        if self.spec is None:
            raise RuntimeError(f"{type(self).__name__}.spec is None: call init(spec, key) first.")
        return self.spec

    def check_config(self, batch_size: int) -> None:
        """Fail on a bad configured value before any data is loaded or anything written.

        Builds every network and the optimiser state abstractly (``jax.eval_shape``: no memory, no
        FLOPs) for a one-unit :class:`Spec`, so a bad network binding (``QCritic.hidden_dims``,
        ``FlowPolicy.flow_steps``, ...) fails now. Subclasses add checks that involve the batch size.

        Also checks that the agent's batches carry the goal sampling configured for it
        (:meth:`check_goal_sampling`).

        Raises:
          ConfigError: a component rejected a configured value, or ``GoalSampling.*`` bindings the
            agent's batches would ignore. Any other error (a component that cannot be built
            abstractly or for these sizes) is left to the real :meth:`init`.
        """
        from macfw.errors import ConfigError

        self.check_goal_sampling()
        spec, saved = Spec(ob_dim=1, act_dim=1, goal_dim=0, chunk_len=self.batch_spec.chunk_len), self.spec
        try:
            eqx.filter_eval_shape(self.init, spec, jax.random.PRNGKey(0))
        except ConfigError:
            raise
        except Exception:
            pass
        finally:
            self.spec = saved

    def check_goal_sampling(self) -> None:
        """Fail when configured goal sampling would be silently ignored: the :attr:`batch_spec`'s
        ``goals`` must be the agent's ``goal_sampling`` (an agent that takes one), else the
        ``GoalSampling()`` of the Gin bindings in force (an agent that does not, e.g. a user's agent
        written before :class:`~macfw.data.goals.GoalSampling` existed, passes only with no
        ``GoalSampling.*`` binding that changes a default).

        Raises:
          ConfigError: names the agent, the goal sampling it would use and the one configured.
        """
        from macfw.errors import ConfigError

        name = type(self).__name__
        got = self.batch_spec.goals
        want = getattr(self, "goal_sampling", None)
        if want is None:
            want = GoalSampling()  # the GoalSampling.* bindings in force (a bad one raises here)
        if got != want:
            raise ConfigError(
                f"{name}.batch_spec.goals = {got!r} is not the goal sampling configured for {name}, {want!r}: "
                f"its batches would ignore the GoalSampling bindings. Give {name} a goal_sampling argument and "
                f"pass it as BatchSpec(..., goals=...) (see macfw.data.goals.goal_sampling_for), or remove the "
                f"GoalSampling bindings."
            )

    def refresh_spec(self) -> RefreshSpec | None:
        """When the loop calls :meth:`refresh` (None: never; the default)."""
        return None

    def refresh(self, state: eqx.Module, starts: dict[str, Array]) -> tuple[eqx.Module, dict[str, Array]]:
        """Rebuild training-time state from a batch of start samples; ``(state, metrics)``, pure and
        jittable (see :class:`RefreshSpec`). Agents with a :meth:`refresh_spec` implement it."""
        raise NotImplementedError(f"{type(self).__name__} declares a refresh_spec but no refresh().")

    def acting_params(self, state: eqx.Module) -> Any:
        """The part of a state :meth:`act` needs (default: ``state.nets``)."""
        return cast(Any, state).nets  # every state has ``nets`` (module docstring)

    # -- benchmark hooks (macfw.bench); the defaults suit an agent without loops in its update
    def for_flop_count(self) -> Agent:
        """An equivalent agent whose compiled update XLA's cost analysis counts in full (XLA counts a
        loop body once, so e.g. an imagined rollout is unrolled); default ``self``."""
        return self

    def uncounted_flops(self, state: eqx.Module, batch_size: int) -> float:
        """FLOPs per update that XLA's count misses even for :meth:`for_flop_count` (default 0)."""
        return 0.0

    def benchmark_parts(self, state: eqx.Module, batch: dict[str, Array]) -> dict[str, tuple[Callable, tuple]]:
        """Named parts of an update that ``macfw.bench`` times alone: ``name -> (jitted fn, args)``."""
        return {}


def copy_of(tree):
    """A copy of every array leaf of ``tree`` (a target network's initial value)."""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def ema(target, online, tau: float):
    """Polyak averaging of a target network: ``(1 - tau) * target + tau * online`` for every floating
    array leaf (other leaves from ``target``); ``tau`` per gradient step."""
    return jax.tree_util.tree_map(
        lambda t, v: (1.0 - tau) * t + tau * v if eqx.is_inexact_array(t) else t, target, online
    )


def gradient_step(
    nets, opt_state, optimizer: optax.GradientTransformation, loss_fn: Callable[[Any], tuple[Array, dict]]
) -> tuple[Any, Any, dict]:
    """One optimiser step on ``loss_fn(nets) -> (loss, metrics)`` w.r.t. every floating array of ``nets``.

    Returns the updated ``nets``, the optimiser state and ``metrics`` with ``optim/grad_norm`` (the
    global gradient norm) added. Every agent's update ends with it (one Adam over the sum of losses).
    """
    params, static = eqx.partition(nets, eqx.is_inexact_array)
    with jax.named_scope("loss"):  # the phases of macfw.profiling's table: forward and backward pass
        (_, metrics), grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static)), has_aux=True)(params)
    with jax.named_scope("optimizer"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        nets = eqx.combine(optax.apply_updates(params, updates), static)
        grad_norm = optax.tree.norm(grads)
    return nets, opt_state, dict(metrics, **{"optim/grad_norm": grad_norm})


def vmap_steps(fn: Callable, *args):
    """``fn``, written for one example, over the first two axes of every argument (e.g. rollout steps
    ``H`` and batch ``B``): ``args[i]: (H, B, ...)``, outputs ``(H, B, ...)``.

    The same values as ``jax.vmap(jax.vmap(fn))``, computed as one ``vmap`` over the ``H * B``
    flattened examples: nested vmaps leave a network's backward pass with two batch axes to
    contract, which XLA's CPU backend ran at about half the speed (MAC's value loss, 2 x 256, H = 10,
    B = 256: 22 ms instead of 10; issue 12's profile). Broadcast per-rollout inputs (a goal ``(B,
    goal_dim)``) to ``(H, B, goal_dim)`` first.

    Raises:
      ValueError: arguments whose first two axes differ (names the shapes received).
    """
    lead = args[0].shape[:2]
    if len(lead) < 2 or any(x.shape[:2] != lead for x in args):
        raise ValueError(
            f"vmap_steps needs arguments with the same two leading axes, got shapes {[tuple(x.shape) for x in args]}"
        )
    if reference.active("vmap_steps"):  # the reference computation: the nested vmaps
        return jax.vmap(jax.vmap(fn))(*args)
    n = lead[0] * lead[1]
    out = jax.vmap(fn)(*(x.reshape((n,) + x.shape[2:]) for x in args))
    return jax.tree_util.tree_map(lambda y: y.reshape(lead + y.shape[1:]), out)


def param_checksum(tree) -> str:
    """SHA-256 (hex, first 16 chars) of every array leaf's bytes, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array)):
        a = np.asarray(leaf)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
