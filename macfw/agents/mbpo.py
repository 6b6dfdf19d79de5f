"""The MBPO-style buffer of model rollouts that MOPO and MOBILE train on (DESIGN §9).

Every ``rollout_freq`` gradient steps the agent rolls its current policy and dynamics ensemble
``rollout_length`` steps forward from ``num_starts`` dataset states and appends the imagined
transitions to a first-in-first-out buffer that holds the last ``retain_rounds`` rounds; each
gradient step then trains the actor and critic on ``real_ratio`` real and ``1 - real_ratio`` model
transitions, and the models on the real part alone (the authors' ``main_mbpo.py``: ``real_batch``
of ``batch_size * mb_batch_ratio`` transitions, ``fake_batch`` of the rest).

The buffer is a field of the agent's state (:class:`ModelBuffer`, an Equinox pytree), so it is
checkpointed and restored with the parameters and a resumed run continues bit for bit. The loop
calls the agent's ``refresh`` at each rollout step (:class:`~macfw.agents.base.RefreshSpec`).
The first refill happens at gradient step ``first_rollout_step`` (default ``rollout_freq``), after
the models have trained; before it every batch is all real data. (The authors' code fills the
buffer before training, from untrained models: DESIGN §9's known defects.)

Units: ``rollout_freq`` and ``first_rollout_step`` in gradient steps; ``rollout_length`` in model
(environment) steps; ``num_starts`` and the capacity in transitions.
"""

from __future__ import annotations

from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from macfw.agents.base import RefreshSpec
from macfw.errors import check, check_float, check_int
from macfw.registry import add_kind, register
from macfw.spec import Spec

add_kind("buffer")

#: The transition fields a model buffer stores (one-step, as in the batch): name -> per-example shape.
FIELDS = ("obs", "actions", "next_obs", "rewards", "masks", "value_goals", "actor_goals")


@register("buffer")
class ModelRollouts:
    """Settings of the model-rollout buffer (Gin: ``MOPO.rollouts = @ModelRollouts()``).

    Args:
      rollout_freq: gradient steps between rollout rounds (authors: 1000).
      rollout_length: model steps per rollout (authors: 5).
      num_starts: dataset states each round starts from (authors: 50,000).
      retain_rounds: rounds the buffer holds (authors: 5), so its capacity is
        ``num_starts * rollout_length * retain_rounds`` transitions (1.25M by default).
      real_ratio: fraction of each batch that is real data (authors: 0.5); the real part is also the
        models' batch, as the authors' ``real_batch`` (so it must be > 0).
      first_rollout_step: gradient step of the first round (a multiple of ``rollout_freq``;
        None: ``rollout_freq``).

    Raises:
      ConfigError: a value out of range (counts below 1, ``real_ratio`` outside (0, 1], a
        ``first_rollout_step`` that is not a positive multiple of ``rollout_freq``).
    """

    def __init__(
        self,
        rollout_freq: int = 1000,
        rollout_length: int = 5,
        num_starts: int = 50_000,
        retain_rounds: int = 5,
        real_ratio: float = 0.5,
        first_rollout_step: int | None = None,
    ):
        self.rollout_freq = check_int("ModelRollouts.rollout_freq", rollout_freq)
        self.rollout_length = check_int("ModelRollouts.rollout_length", rollout_length)
        self.num_starts = check_int("ModelRollouts.num_starts", num_starts)
        self.retain_rounds = check_int("ModelRollouts.retain_rounds", retain_rounds)
        self.real_ratio = cast(
            float, check_float("ModelRollouts.real_ratio", real_ratio, low=0.0, high=1.0, low_open=True)
        )
        first = self.rollout_freq if first_rollout_step is None else first_rollout_step
        check(
            "ModelRollouts.first_rollout_step",
            first_rollout_step,
            isinstance(first, int) and first >= 1 and first % self.rollout_freq == 0,
            f"None or a positive multiple of ModelRollouts.rollout_freq = {self.rollout_freq}",
        )
        self.first_rollout_step = int(first)

    @property
    def capacity(self) -> int:
        """Transitions the buffer holds: ``num_starts * rollout_length * retain_rounds``."""
        return self.num_starts * self.rollout_length * self.retain_rounds

    def refresh_spec(self) -> RefreshSpec:
        return RefreshSpec(
            every=self.rollout_freq,
            batch_size=self.num_starts,
            first=self.first_rollout_step,
            binding="ModelRollouts.rollout_freq",
        )

    def model_batch_size(self, batch_size: int) -> int:
        """Model transitions in a batch of ``batch_size``: ``round(batch_size * (1 - real_ratio))``."""
        return int(round(batch_size * (1.0 - self.real_ratio)))


class ModelBuffer(eqx.Module):
    """A ring buffer of one-step model transitions (part of the agent state).

    Attributes (C = capacity):
      obs, next_obs: ``(C, ob_dim)``; actions: ``(C, act_dim)``; rewards, masks: ``(C,)``
      (rewards as predicted, before any uncertainty penalty); value_goals, actor_goals:
      ``(C, goal_dim)`` (the start sample's goals; ``(C, 0)`` single-task).
      ptr: next write position (int32); size: filled entries (int32, at most C).
    """

    obs: Float[Array, "C ob_dim"]
    actions: Float[Array, "C act_dim"]
    next_obs: Float[Array, "C ob_dim"]
    rewards: Float[Array, " C"]
    masks: Float[Array, " C"]
    value_goals: Float[Array, "C goal_dim"]
    actor_goals: Float[Array, "C goal_dim"]
    ptr: Int[Array, ""]
    size: Int[Array, ""]

    @classmethod
    def empty(cls, capacity: int, spec: Spec) -> ModelBuffer:
        z = lambda *shape: jnp.zeros((capacity, *shape), jnp.float32)  # noqa: E731
        return cls(
            obs=z(spec.ob_dim),
            actions=z(spec.act_dim),
            next_obs=z(spec.ob_dim),
            rewards=z(),
            masks=z(),
            value_goals=z(spec.goal_dim),
            actor_goals=z(spec.goal_dim),
            ptr=jnp.zeros((), jnp.int32),
            size=jnp.zeros((), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return int(self.rewards.shape[0])

    def add(self, transitions: dict[str, Array]) -> ModelBuffer:
        """Append ``M`` transitions (a dict of :data:`FIELDS`, each ``(M, ...)``, ``M <= C``),
        overwriting the oldest ones."""
        M, C = transitions["rewards"].shape[0], self.capacity
        if M > C:
            raise ValueError(f"Cannot add {M} transitions to a model buffer of capacity {C}.")
        idx = (self.ptr + jnp.arange(M)) % C
        new = {f: getattr(self, f).at[idx].set(transitions[f].astype(jnp.float32)) for f in FIELDS}
        return ModelBuffer(
            **new, ptr=((self.ptr + M) % C).astype(jnp.int32), size=jnp.minimum(self.size + M, C).astype(jnp.int32)
        )

    def sample(self, key, n: int) -> dict[str, Array]:
        """``n`` transitions drawn uniformly (with replacement) from the filled part: each ``(n, ...)``.
        From an empty buffer the indices are 0 (callers mask such samples out)."""
        idx = jax.random.randint(key, (n,), 0, jnp.maximum(self.size, 1))
        return {f: getattr(self, f)[idx] for f in FIELDS}


def one_step_view(batch: dict[str, Array]) -> dict[str, Array]:
    """The loop's batch (:class:`~macfw.agents.base.BatchSpec` with ``chunk_len = 1``) as transitions
    of :data:`FIELDS`: the mask is ``1 - success`` (0 where the step reaches the goal or solves the
    task, as OGBench's masks; 1 everywhere with ``OGBenchDataset.singletask_masks = 'ones'``)."""
    return {
        "obs": batch["obs"],
        "actions": batch["actions"],
        "next_obs": batch["next_obs"],
        "rewards": batch["rewards"],
        "masks": 1.0 - batch["success"],
        "value_goals": batch["value_goals"],
        "actor_goals": batch["actor_goals"],
    }


def mix(real: dict[str, Array], buffer: ModelBuffer, key, num_model: int) -> tuple[dict[str, Array], Array]:
    """A training batch of ``B - num_model`` real and ``num_model`` model transitions (real first).

    While the buffer is empty the model part is the rest of the real batch, so the batch is all real.
    Returns the batch (each field ``(B, ...)``) and ``is_model: (B,)`` (1.0 for buffer samples).
    """
    B = real["rewards"].shape[0]
    if num_model == 0:
        return real, jnp.zeros((B,), jnp.float32)
    n_real = B - num_model
    has = buffer.size > 0
    model = buffer.sample(key, num_model)
    out = {f: jnp.concatenate([real[f][:n_real], jnp.where(has, model[f], real[f][n_real:])], axis=0) for f in FIELDS}
    is_model = jnp.concatenate([jnp.zeros((n_real,)), jnp.full((num_model,), has.astype(jnp.float32))])
    return out, is_model
