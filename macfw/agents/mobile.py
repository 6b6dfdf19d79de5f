"""MOBILE: Model-Bellman Inconsistency penalised offLine policy optimization (Sun et al., 2023), as the
MAC paper runs it (DESIGN §9).

MOPO (:mod:`macfw.agents.mopo`) with the uncertainty ``u(s, a)`` replaced by the spread of the
Bellman target across the dynamics ensemble: for every member ``i`` draw ``num_samples`` next
states ``s'_ij ~ N(mu_i(s, a), sigma_i(s, a)^2)`` and actions ``a'_ij ~ pi(s'_ij, g)``, average the
target critics and the samples, ``Q_i = mean_j mean_c Q'_c(s'_ij, g, a'_ij)``, and take the standard
deviation across members: ``u(s, a) = std_i Q_i``. Everything else (models, buffer, SAC, ``beta``)
is MOPO's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from macfw.agents.mopo import MOPO
from macfw.errors import check_int
from macfw.registry import register


@register("agent")
class MOBILE(MOPO):
    """MOPO with MOBILE's Bellman-inconsistency penalty (see the module docstring).

    Args:
      num_samples: next states drawn per ensemble member (authors: 5).
      **kwargs: :class:`~macfw.agents.mopo.MOPO`'s arguments (``MOBILE.*`` bindings).

    Raises:
      ConfigError: ``num_samples < 1`` or a MOPO argument out of range.
    """

    def __init__(self, *args, num_samples: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_samples = check_int("MOBILE.num_samples", num_samples)

    def penalty(self, nets, target_critic, batch, key):
        """``u(s, a) = std_i mean_j mean_c Q'_c(s'_ij, g_v, a'_ij)`` per transition: ``(B,)``."""
        J, k = self.num_samples, nets.dynamics.num
        B = batch["obs"].shape[0]

        def one(s, a, g, key):
            k_dyn, k_act = jax.random.split(key)
            s_next = nets.dynamics.apply_keyed(  # (k, J, ob_dim): J samples from every member
                lambda m, key: jax.vmap(lambda kj: m.sample(s, a, key=kj))(jax.random.split(key, J)), key=k_dyn)
            flat = s_next.reshape(k * J, -1)
            a_next = jax.vmap(lambda sn, kk: nets.actor.sample(sn, g, key=kk))(flat, jax.random.split(k_act, k * J))
            q = jax.vmap(lambda sn, an: target_critic(sn, g, an).mean())(flat, a_next)  # mean over critics
            return jnp.std(q.reshape(k, J).mean(axis=1))

        u = jax.vmap(one)(batch["obs"], batch["actions"], batch["value_goals"], jax.random.split(key, B))
        return u, {"penalty/member_std_max": jnp.max(u)}

