"""Chunked, goal-relabelled batch sampling and [-1, 1] scaling (paper §4; DESIGN §2.1).

Everything here is a pure function of arrays, so a batch is sampled on the device inside the
jitted update from the train state's key (no host work per step).

Units: indices ``t`` are environment steps in the flat (compact) OGBench arrays; a chunk spans
``n = chunk_len`` environment steps.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from macfw.data.goals import DEFAULT_GOALS, GoalSampling
from macfw.errors import check

#: The default hindsight relabelling probabilities (DESIGN §2.1); the configured ones are an agent's
#: :class:`~macfw.data.goals.GoalSampling` (Gin: ``GoalSampling.value_p_curgoal`` etc.).
VALUE_GOAL_P_CUR, VALUE_GOAL_P_TRAJ, VALUE_GOAL_P_RAND = DEFAULT_GOALS.probabilities("value")
ACTOR_GOAL_P_TRAJ = DEFAULT_GOALS.actor_p_trajgoal


#: Added to each half-range by :class:`Scaler` (the authors' ``utils/datasets.py`` ``normalize``).
SCALE_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class Scaler:
    """Per-dimension min/max scaling as the authors' ``normalize``: ``(x - mid) / (half + 1e-3)`` with
    ``mid = (lo + hi) / 2``, ``half = (hi - lo) / 2``, so the data land in ``[-1, 1]`` up to the
    ``1e-3`` (``half / (half + 1e-3)`` at the extremes).

    A constant dimension (``half = 0``) maps to 0 on the data and to ``1000 (x - lo)`` off it, as
    theirs. ``lo, hi: (dim,)`` numpy float32. (Before 2026-12-07 macfw divided by ``half`` alone,
    which differs by up to 10% on dimensions whose half-range is near 0.01; parity, issue 29.)
    """

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Scaler:
        x = np.asarray(x, np.float32)
        return cls(lo=x.min(axis=0), hi=x.max(axis=0))

    @property
    def _denominator(self):
        return ((self.hi - self.lo) / 2.0 + SCALE_EPS).astype(np.float32)

    def __call__(self, x):
        xp = jnp if isinstance(x, jax.Array) else np
        mid = (self.lo + self.hi) / 2.0
        return ((x - mid) / self._denominator).astype(xp.float32)

    def inverse(self, y):
        return y * self._denominator + (self.lo + self.hi) / 2.0

    def to_dict(self) -> dict:
        return {"lo": np.asarray(self.lo), "hi": np.asarray(self.hi)}

    @classmethod
    def from_dict(cls, d) -> Scaler:
        return cls(lo=np.asarray(d["lo"], np.float32), hi=np.asarray(d["hi"], np.float32))


def trajectory_ends(valids: np.ndarray) -> np.ndarray:
    """For each index, the index of the final observation of its trajectory: ``(N,)`` int32.

    ``valids`` is OGBench's compact-layout flag: 0 exactly at each trajectory's final
    observation (which has no next state), 1 elsewhere.
    """
    valids = np.asarray(valids)
    ends = np.where(valids < 0.5)[0]
    n = len(valids)
    if len(ends) == 0 or ends[-1] != n - 1:
        ends = np.concatenate([ends, [n - 1]])
    idx = np.searchsorted(ends, np.arange(n), side="left")
    return ends[idx].astype(np.int32)


class ChunkData(eqx.Module):
    """The dataset on the device, ready for jitted sampling.

    Attributes (N transitions in OGBench's compact layout):
      observations: ``(N, ob_dim)`` scaled to [-1, 1].
      actions: ``(N, act_dim)`` clipped to ``[-1 + 1e-5, 1 - 1e-5]``.
      goals: ``(N, goal_dim)`` scaled goal representation of each state (oracle representation,
        or the observation itself); ``(N, 0)`` for single-task data.
      rewards, masks: ``(N,)`` per-step OGBench single-task reward and mask (zeros / ones for
        goal-conditioned data).
      traj_end: ``(N,)`` index of the final observation of each index's trajectory.
      starts: ``(M,)`` valid chunk starts ``t`` (``t + n <= traj_end[t]``).
    """

    observations: Float[Array, "N ob_dim"]
    actions: Float[Array, "N act_dim"]
    goals: Float[Array, "N goal_dim"]
    rewards: Float[Array, " N"]
    masks: Float[Array, " N"]
    traj_end: Int[Array, " N"]
    starts: Int[Array, " M"]

    @property
    def size(self) -> int:
        return int(self.observations.shape[0])


def valid_starts(traj_end: np.ndarray, chunk_len: int) -> np.ndarray:
    """Indices ``t`` whose chunk ``t .. t+n`` lies in one trajectory: ``t + n <= traj_end[t]``.

    Raises:
      ConfigError (a ValueError): no trajectory is longer than ``chunk_len`` steps (names
        ``train.chunk_len`` and the longest chunk the data holds).
    """
    t = np.arange(len(traj_end))
    starts = np.where(t + chunk_len <= traj_end)[0].astype(np.int32)
    longest = int(np.max(traj_end - t)) if len(t) else 0
    check(
        "train.chunk_len",
        chunk_len,
        len(starts) > 0,
        f"at most {longest}, the longest chunk inside one trajectory of the data (or use longer episodes)",
    )
    return starts


def sample_for(spec, data: ChunkData, key, batch_size: int, *, goal_conditioned: bool) -> dict[str, Array]:
    """:func:`sample_batch` for an agent's :class:`~macfw.agents.base.BatchSpec` ``spec`` (its chunk
    length, discount, reward scale, future window and goal sampling)."""
    return sample_batch(
        data,
        key,
        batch_size,
        chunk_len=spec.chunk_len,
        gamma=spec.gamma,
        goal_conditioned=goal_conditioned,
        normalize_reward=spec.normalize_reward,
        future_len=spec.future_len,
        goals=getattr(spec, "goals", None),
    )


def sample_batch(
    data: ChunkData,
    key,
    batch_size: int,
    *,
    chunk_len: int,
    gamma: float,
    goal_conditioned: bool,
    normalize_reward: bool = True,
    future_len: int = 0,
    goals: GoalSampling | None = None,
) -> dict[str, Array]:
    """Sample one training batch (pure and jittable).

    Returns a dict of arrays (B = batch_size):
      ``obs (B, ob_dim)`` = s_t; ``actions (B, n*act_dim)`` = A_t; ``next_obs (B, ob_dim)`` = s_{t+n};
      ``value_goals, actor_goals (B, goal_dim)``; ``success (B,)`` the chunk success label;
      ``rewards (B,)`` chunk reward; ``masks (B,)``; ``idx, value_goal_idx, actor_goal_idx (B,)`` int
      indices (single-task: the goal indices are ``idx``);
      ``next_goals (B, goal_dim)`` the goal representation of s_{t+n} (a subgoal ``n`` steps ahead);
      ``traj_end (B,)`` the index of the final observation of each sample's trajectory;
      with ``future_len > 0`` also ``future_obs (B, future_len, ob_dim)`` = s_{t+1} .. s_{t+future_len}
      (``data.starts`` must then have been built with ``valid_starts(traj_end, max(n, future_len))``).

    Goal-conditioned: the value and actor goals are drawn as ``goals`` says (a
    :class:`~macfw.data.goals.GoalSampling`; None: the defaults, DESIGN §2.1), see
    :func:`goal_indices`. With the defaults: value goal = current state (p 0.2), uniform later
    state of the same trajectory (p 0.5) or random state (p 0.3); actor goal = geometric offset
    ``~ Geom(1 - gamma)`` clipped to the trajectory end (p 0.5) or random state (p 0.5).
    ``success = 1`` iff the value-goal index lies in ``[t, t+n)``; reward ``success - 1``, mask
    ``1 - success``.
    Single-task: reward = ``sum_i gamma^i r_{t+i}`` over the chunk (divided by ``n`` when
    ``normalize_reward``, as the paper's code does), ``success = 1`` iff some step of the chunk
    has OGBench mask 0 (task solved), mask 1; ``goals`` is not used.
    """
    n = chunk_len
    ks = jax.random.split(key, 8)
    N = data.observations.shape[0]
    t = data.starts[jax.random.randint(ks[0], (batch_size,), 0, data.starts.shape[0])]
    steps = t[:, None] + jnp.arange(n)[None, :]
    actions = data.actions[steps].reshape(batch_size, -1)
    end = data.traj_end[t]
    batch = {
        "idx": t,
        "obs": data.observations[t],
        "actions": actions,
        "next_obs": data.observations[t + n],
        "traj_end": end,
    }
    if future_len:
        batch["future_obs"] = data.observations[t[:, None] + 1 + jnp.arange(future_len)[None, :]]
    if goal_conditioned:
        vg, ag = goal_indices(ks, t, end, N, gamma, goals=goals)
        success = ((vg >= t) & (vg < t + n)).astype(jnp.float32)
        batch.update(
            value_goals=data.goals[vg],
            actor_goals=data.goals[ag],
            value_goal_idx=vg,
            actor_goal_idx=ag,
            next_goals=data.goals[t + n],
            success=success,
            rewards=success - 1.0,
            masks=1.0 - success,
        )
    else:
        r = chunk_reward(data.rewards[steps], gamma, normalize_reward)
        success = jnp.any(data.masks[steps] < 0.5, axis=1).astype(jnp.float32)
        empty = jnp.zeros((batch_size, 0), jnp.float32)
        batch.update(
            value_goals=empty,
            actor_goals=empty,
            value_goal_idx=t,
            actor_goal_idx=t,
            next_goals=empty,
            success=success,
            rewards=r,
            masks=jnp.ones_like(r),
        )
    return batch


def _geometric_later(key, t, end, gamma: float):
    """``min(t + Geom(1 - gamma), end)`` (``end`` when ``gamma >= 1``): a later index of the trajectory."""
    offset = jax.random.geometric(key, 1.0 - gamma, t.shape) if gamma < 1.0 else end - t
    return jnp.minimum(t + offset.astype(t.dtype), end)


def _uniform_later(key, t, end):
    """A later index of the trajectory, uniform over ``t + 1 .. end``."""
    return jax.random.randint(key, t.shape, t + 1, end + 1)


def _mix(u, probs: tuple[float, float, float], cur, traj, rand):
    """Per example: ``cur`` where ``u < p_cur``, ``traj`` where ``u < p_cur + p_traj``, else ``rand``
    (``u`` uniform in [0, 1)). The probabilities are static: a choice of probability 0 is never
    made (its comparison is left out), so e.g. ``p_rand = 0`` gives no random goal at all even when
    the three sum to 1 only within rounding."""
    p_cur, p_traj, p_rand = probs
    if p_rand == 0.0:
        out = traj
    elif p_cur + p_traj == 0.0:
        out = rand
    else:
        out = jnp.where(u < p_cur + p_traj, traj, rand)
    if p_cur > 0.0:
        out = jnp.where(u < p_cur, cur, out)
    return out


def goal_indices(ks, t, end, num_rows, gamma: float, row_offset=0, goals: GoalSampling | None = None):
    """Hindsight-relabelled value- and actor-goal indices ``(vg, ag)``, each ``(B,)`` int (DESIGN §2.1).

    ``ks``: the 8 keys of :func:`sample_batch`; ``t, end (B,)`` int: chunk starts and their
    trajectory's final index; ``num_rows``: rows random goals are drawn from (``[row_offset,
    row_offset + num_rows)``), an int or a traced scalar; ``goals``: the
    :class:`~macfw.data.goals.GoalSampling` (None: the defaults). Each goal is ``t`` (its
    ``p_curgoal``), a later index of ``t``'s trajectory (``p_trajgoal``: ``min(t + Geom(1 - gamma),
    end)``, ``end`` when ``gamma >= 1``, with ``*_geom_sample``, else uniform over ``t + 1 .. end``)
    or a random row (``p_randomgoal``). The configuration is static Python: it picks which draws
    are made and the thresholds; the per-example choice is ``jnp.where`` (no branches in the
    compiled code).

    Keys: ``ks[1]`` the value goal's uniform later index, ``ks[2]`` its random row, ``ks[3]`` its
    choice; ``ks[4]`` the actor goal's geometric later index, ``ks[5]`` its random row, ``ks[6]`` its
    choice; only the non-default offsets use new keys: ``fold_in(ks[7], 0)`` the value goal's
    geometric offset (``value_geom_sample``), ``fold_in(ks[7], 1)`` the actor goal's uniform one
    (``actor_geom_sample = False``). So the defaults draw exactly the goals macfw drew before
    :class:`~macfw.data.goals.GoalSampling` existed (tests/test_goal_sampling.py).

    Shared by :func:`sample_batch` and the host sampler (:mod:`macfw.data.host_sampler`), so both
    draw the same goals from the same key.
    """
    goals = DEFAULT_GOALS if goals is None else goals
    batch_size = t.shape[0]
    # value goals
    if goals.value_geom_sample:
        later = _geometric_later(jax.random.fold_in(ks[7], 0), t, end, gamma)
    else:
        later = _uniform_later(ks[1], t, end)
    rand = jax.random.randint(ks[2], (batch_size,), row_offset, row_offset + num_rows)
    u = jax.random.uniform(ks[3], (batch_size,))
    vg = _mix(u, goals.probabilities("value"), t, later, rand)
    # actor goals
    if goals.actor_geom_sample:
        later2 = _geometric_later(ks[4], t, end, gamma)
    else:
        later2 = _uniform_later(jax.random.fold_in(ks[7], 1), t, end)
    rand2 = jax.random.randint(ks[5], (batch_size,), row_offset, row_offset + num_rows)
    ag = _mix(jax.random.uniform(ks[6], (batch_size,)), goals.probabilities("actor"), t, later2, rand2)
    return vg, ag


def chunk_reward(step_rewards, gamma: float, normalize_reward: bool):
    """Single-task chunk reward ``sum_i gamma^i r_{t+i}`` over ``step_rewards (B, n)`` (divided by
    ``n`` when ``normalize_reward``): ``(B,)`` float32. Shared by :func:`sample_batch` and the host
    sampler (the same XLA reduction, so both give the same bits on one backend)."""
    n = step_rewards.shape[1]
    disc = gamma ** jnp.arange(n, dtype=jnp.float32)
    r = jnp.sum(step_rewards * disc[None, :], axis=1)
    if normalize_reward:
        r = r / n
    return r
