"""MOBILE: Model-Bellman Inconsistency penalised offLine policy optimization (Sun et al., 2023), as the
MAC paper runs it (DESIGN §9).

MOPO (:mod:`macfw.agents.mopo`) with the uncertainty ``u(s, a)`` replaced by the spread of the
Bellman target across the dynamics ensemble: for every member ``i`` draw ``num_samples`` next
states ``s'_ij ~ N(mu_i(s, a), sigma_i(s, a)^2)`` and actions ``a'_ij ~ pi(s'_ij, g)``, average the
target critics and the samples, ``Q_i = mean_j mean_c Q'_c(s'_ij, g, a'_ij)``, and take the standard
deviation across members: ``u(s, a) = std_i Q_i``. Everything else (models, buffer, SAC, ``beta``)
is MOPO's. As the authors' ``compute_penalty``, only the model transitions of a batch are penalised
(and evaluated), with the current actor and the target critics.

The draws (``s'_ij`` and ``a'_ij``) are made at batch level (:meth:`MOBILE.penalty_noise`), so the
penalty is a deterministic function of them; each member's mean and std are computed once and
shared by its ``J`` samples (the authors evaluate the dynamics on ``J`` copies of the batch: the same
numbers, ``J`` times the work), and every ensemble runs members-outermost
(:meth:`~macfw.nn.ensemble.Ensemble.over_batch`). Parity with the authors' code, what it found and
the deliberate deviations: :mod:`macfw.agents.mopo` (largest relative error 2e-6 for MOBILE; its
update 1.23-1.32x the authors' at ``cpu-small``, issue 29).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from macfw.agents.mopo import MOPO
from macfw.errors import check_int
from macfw.nn.gaussian import squashed_sample
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
        self.num_samples = check_int("MOBILE.num_samples", num_samples)  # None only with allow_none

    def penalty_noise(self, nets, key, n):
        """``next_obs (k, J, n, ob_dim)`` (``s'_ij``) and ``next_actions (k, J, n, act_dim)`` (``a'_ij``),
        standard normals (J = ``num_samples``)."""
        k_dyn, k_act = jax.random.split(key)
        shape = (nets.dynamics.num, self.num_samples, n)
        spec = self._built_spec()
        return {
            "penalty/next_obs": jax.random.normal(k_dyn, (*shape, spec.ob_dim)),
            "penalty/next_actions": jax.random.normal(k_act, (*shape, spec.act_dim)),
        }

    def penalty(self, nets, target_critic, batch, noise):
        """``u(s, a) = std_i mean_j mean_c Q'_c(s'_ij, g_v, a'_ij)`` per model transition: ``(n,)``."""
        eps_s, eps_a = noise["penalty/next_obs"], noise["penalty/next_actions"]
        k, J, n, _ = eps_s.shape
        # members outermost (k, n, ...): each member's products on its rows, batch-major
        mean, log_std = nets.dynamics.over_batch(lambda m, s, a: m.mean_log_std(s, a), batch["obs"], batch["actions"])
        s_next = (mean[:, None] + jnp.exp(log_std)[:, None] * eps_s).reshape(k * J * n, -1)  # (k J n, ob_dim)
        g = jnp.broadcast_to(batch["value_goals"], (k, J, *batch["value_goals"].shape)).reshape(k * J * n, -1)
        mu_a, log_std_a = jax.vmap(nets.actor.mean_log_std)(s_next, g)
        a_next, _ = squashed_sample(mu_a, log_std_a, eps_a.reshape(k * J * n, -1))
        q = target_critic.over_batch(lambda c, s, g, a: c(s, g, a), s_next, g, a_next).mean(axis=0)  # (k J n,)
        u = jnp.std(q.reshape(k, J, n).mean(axis=1), axis=0)
        return u, {"penalty/member_std_max": jnp.max(u)}
