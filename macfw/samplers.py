"""Action-chunk samplers: how MAC picks a chunk from the behaviour policy (paper §4.2).

Shapes per example: ``s: (ob_dim,)``, ``g: (goal_dim,)``; returns ``A: (chunk_dim,)`` in [-1, 1].
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.errors import check_int
from macfw.registry import register


class Sampler(eqx.Module):
    """Base of the sampler family. ``acting`` selects the test-time setting (e.g. more candidates)."""

    @abc.abstractmethod
    def __call__(
        self, policy, critic, s, g, *, key: PRNGKeyArray, acting: bool = False
    ) -> Float[Array, " chunk_dim"]: ...


def candidates(policy, s, g, num: int, key) -> Float[Array, "num chunk_dim"]:
    """``num`` clipped candidate chunks ``clip(policy.sample_many(s, g, num), -1, 1)``: ``(num, chunk_dim)``.

    ``policy`` is a :class:`~macfw.nn.flow.BehaviorPolicy` (``s: (ob_dim,)``, ``g: (goal_dim,)``).
    """
    return jnp.clip(policy.sample_many(s, g, num, key=key), -1.0, 1.0)


@register("sampler")
class RejectionSampler(Sampler):
    """Rejection sampling: draw N candidates from the behaviour policy, return ``argmax_i Q(s, g, A_i)``.

    Args:
      num_train_candidates: N inside imagined training rollouts (paper: 8).
      num_act_candidates: N when acting in the environment (paper: 32).

    Raises:
      ConfigError: a candidate count below 1.
    """

    num_train_candidates: int = eqx.field(static=True)
    num_act_candidates: int = eqx.field(static=True)

    def __init__(self, num_train_candidates: int = 8, num_act_candidates: int = 32):
        self.num_train_candidates = check_int("RejectionSampler.num_train_candidates", num_train_candidates)
        self.num_act_candidates = check_int("RejectionSampler.num_act_candidates", num_act_candidates)

    def __call__(self, policy, critic, s, g, *, key, acting=False):
        num = self.num_act_candidates if acting else self.num_train_candidates
        cands = candidates(policy, s, g, num, key)
        return cands[jnp.argmax(candidate_values(critic, s, g, cands))]


def candidate_values(critic, s, g, cands: Float[Array, "num chunk_dim"]) -> Float[Array, " num"]:
    """``Q(s, g, A_i)`` for every candidate: ``(num,)``. A critic with a ``many(s, g, As)`` method
    (:class:`~macfw.nn.models.QCritic`) computes the state's share of its first layer once for all
    candidates; any other critic is vmapped over them."""
    many = getattr(critic, "many", None)
    if many is not None:
        return many(s, g, cands)
    return jax.vmap(lambda a: critic(s, g, a))(cands)
