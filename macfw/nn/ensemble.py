"""Ensembles of any registered network: ``k`` members stacked along a leading axis, called with ``vmap``.

The baselines' dynamics ensembles (MOPO, MOBILE, LEQ: 7 Gaussian one-step models) and critic
ensembles (two Q's with a min or mean target) are one :class:`Ensemble` each (DESIGN §9). Members
are independent initialisations of the same class, so the ensemble is one pytree whose array
leaves have a leading ``(k,)`` axis; every call evaluates all members at once.

Gin: a slot that takes a network class takes an ensemble through a Gin scope, so two ensembles
of one agent keep separate settings::

    MOPO.dynamics = @dynamics/Ensemble
    dynamics/Ensemble.member = @GaussianDynamics
    dynamics/Ensemble.num = 7
    MOPO.critic = @critic/Ensemble
    critic/Ensemble.member = @QCritic
    critic/Ensemble.num = 2

Shapes: a member maps one example to its output (e.g. ``(ob_dim,)``); the ensemble returns
``(k, ...)`` for the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from macfw import reference
from macfw.errors import check, check_int
from macfw.registry import register
from macfw.spec import Spec


@register("network")
class Ensemble(eqx.Module):
    """``num`` independently initialised members of one network class, evaluated together.

    Args:
      spec: sizes, passed to every member.
      member: a registered network class, built as ``member(spec, key=...)`` (its Gin bindings apply).
      num: ensemble size k (>= 1).
      key: PRNG key (split into one key per member).

    Attributes:
      members: the members' pytree, every array leaf with a leading ``(num,)`` axis.
      num: k.

    Raises:
      ConfigError: ``num < 1`` or a ``member`` that is not callable.
    """

    members: Any
    num: int = eqx.field(static=True)

    def __init__(self, spec: Spec, *, key: PRNGKeyArray, member: Callable | None = None, num: int = 2):
        self.num = check_int("Ensemble.num", num)
        check("Ensemble.member", member, callable(member), "a registered network class, e.g. @GaussianDynamics")
        assert member is not None  # check refused anything not callable
        self.members = eqx.filter_vmap(lambda k: member(spec, key=k))(jax.random.split(key, self.num))

    def member(self, i) -> eqx.Module:
        """Member ``i`` (an int or a traced index) as a plain network."""
        return jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, self.members)

    def apply(self, fn: Callable, *args, **kwargs):
        """``fn(member, *args, **kwargs)`` for every member: outputs stacked ``(num, ...)``.

        ``args`` are shared by every member (not split). Use it for any member method, e.g.
        ``ens.apply(lambda m, s, A: m.loss(s, A, s_next), s, A)``.
        """
        return eqx.filter_vmap(lambda m: fn(m, *args, **kwargs))(self.members)

    def apply_keyed(self, fn: Callable, *args, key: PRNGKeyArray, **kwargs):
        """``fn(member, *args, key=k_i, **kwargs)`` for every member with its own key ``k_i``:
        outputs stacked ``(num, ...)`` (e.g. samples from every member)."""
        keys = jax.random.split(key, self.num)
        return eqx.filter_vmap(lambda m, k: fn(m, *args, key=k, **kwargs))(self.members, keys)

    def over_batch(self, fn: Callable, *args):
        """``fn(member, *row)`` for every member and every row of ``args`` (each ``(B, ...)``): outputs
        ``(num, B, ...)``, members outermost.

        The same values as ``jax.vmap(lambda *row: self.apply(lambda m: fn(m, *row)))(*args)`` with its
        two leading axes swapped, laid out as XLA's CPU products want them: each member's product
        over its rows has the member as the leading batch dimension, where rows outermost left every
        hidden layer's batched product a transposing copy (MOBILE's penalty, 2 x 256 networks on
        4,480 rows: 237 ms against 107 on a loaded 2-core CPU, issue 29). Inside
        :func:`macfw.reference.reference_computation` (``"members_outer"``) the rows-outermost form.
        """
        if reference.active("members_outer"):
            out = jax.vmap(lambda *row: self.apply(lambda m: fn(m, *row)))(*args)
            return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), out)
        return self.apply(lambda m: jax.vmap(lambda *row: fn(m, *row))(*args))

    def __call__(self, *args, **kwargs):
        """Every member's output for the same inputs: ``(num, ...)``."""
        return self.apply(lambda m, *a, **k: m(*a, **k), *args, **kwargs)

    def loss(self, *args, **kwargs):
        """Mean over members of each member's ``loss`` on the same example (each member sees the same
        data, as in the authors' code); metrics averaged over members likewise."""
        losses, metrics = self.apply(lambda m, *a, **k: m.loss(*a, **k), *args, **kwargs)
        return jnp.mean(losses), jax.tree_util.tree_map(jnp.mean, metrics)

    def sample(self, *args, key: PRNGKeyArray, **kwargs):
        """One sample from a uniformly drawn member (the MBPO/MOPO rollout rule): every member's
        ``sample`` is drawn and one is kept, so the cost is k samples."""
        k_member, k_sample = jax.random.split(key)
        outs = self.apply_keyed(lambda m, *a, **k: m.sample(*a, **k), *args, key=k_sample, **kwargs)
        i = jax.random.randint(k_member, (), 0, self.num)
        return jax.tree_util.tree_map(lambda x: x[i], outs)
