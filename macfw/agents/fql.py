"""MAC-FQL (DESIGN §2.7): MAC whose chunks come from a one-step policy trained to maximise ``Q``.

The paper's ablation of the sampler: instead of rejection sampling from the (distilled) flow
policy, a one-step actor ``pi(s, g, z) -> A`` is trained as in FQL (Park et al., 2025)::

    L_actor = -Q(s, g, clip(pi(s, g, z), -1, 1)) / mean|Q|            (Q-maximisation)
              + alpha * ||pi(s, g, z) - sg(clip(ODE solution of v from z))||^2  (distillation penalty)

with ``z ~ N(0, I)``, ``alpha = 0.3``, the critic under stop-gradient in the first term (the actor's
Q-maximisation never moves ``Q``) and the flow ODE solution of the behaviour policy ``v``, clipped
to ``[-1, 1]`` (the authors' ``agents/mbfql.py``), as the stop-gradient target. Imagined rollouts
and acting use the actor's chunk directly, with no candidates and no ``argmax Q`` (:class:`DirectSampler`).

Gin::

    train.agent = @MACFQL()
    MAC.sampler = @DirectSampler()
    MACFQL.alpha = 0.3
    FQLActor.hidden_dims = %HIDDEN

``MACFQL`` subclasses :class:`~macfw.agents.mac.MAC`, so every ``MAC.*`` binding still applies.
Shapes per example: ``s: (ob_dim,)``, ``g: (goal_dim,)``, ``z, A: (chunk_dim,)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.agents.mac import MAC, Networks, TrainState
from macfw.errors import check, check_choice, check_float
from macfw.nn.mlp import MLP
from macfw.nn.models import HIDDEN
from macfw.registry import register
from macfw.samplers import Sampler
from macfw.spec import Spec


@register("actor")
class FQLActor(eqx.Module):
    """One-step actor ``pi(s, g, z) -> A``: an MLP from state, goal and noise to an (unclipped) chunk.

    Args:
      spec: sizes; input ``ob_dim + goal_dim + chunk_dim``, output ``chunk_dim``.
      hidden_dims: MLP hidden sizes (default 4 x 1024).
      layer_norm: LayerNorm after each hidden activation.
      key: PRNG key.
    """

    net: MLP
    chunk_dim: int = eqx.field(static=True)

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        compute_dtype: str | None = None,
    ):
        self.net = MLP(
            spec.ob_dim + spec.goal_dim + spec.chunk_dim,
            spec.chunk_dim,
            hidden_dims,
            key=key,
            layer_norm=layer_norm,
            compute_dtype=compute_dtype,
            name=type(self).__name__,
        )
        self.chunk_dim = spec.chunk_dim

    def __call__(self, s, g, z) -> Float[Array, " chunk_dim"]:
        return self.net(jnp.concatenate([s, g, z]))

    def noise(self, key) -> Float[Array, " chunk_dim"]:
        return jax.random.normal(key, (self.chunk_dim,))

    def sample(self, s, g, *, key) -> Float[Array, " chunk_dim"]:
        """``pi(s, g, z)`` with ``z ~ N(0, I)`` drawn from ``key`` (not clipped)."""
        return self(s, g, self.noise(key))


@register("sampler")
class DirectSampler(Sampler):
    """No candidates, no critic: ``clip(policy.sample(s, g, key), -1, 1)``, one call.

    With :class:`MACFQL` the ``policy`` it is handed is the one-step actor, so it returns
    ``clip(pi(s, g, z), -1, 1)`` with ``z ~ N(0, I)`` from ``key``. ``acting`` changes nothing.
    """

    def __call__(self, policy, critic, s, g, *, key, acting=False):
        return jnp.clip(policy.sample(s, g, key=key), -1.0, 1.0)


@register("agent")
class MACFQL(MAC):
    """MAC with an FQL one-step actor as the chunk sampler (the MAC-FQL ablation).

    Adds ``nets.actor`` (built by ``actor(spec, key=...)``) trained with the loss in the module
    docstring; everything else (model, flow policy, value, critic, the update) is MAC's. Imagined
    rollouts and acting hand the actor to ``MAC.sampler`` in place of the behaviour policy
    (use :class:`DirectSampler`: the actor's chunk, no rejection sampling).

    The flow policy still trains by flow matching; it only supplies the distillation target (its
    ODE solution, diffrax), so ``FlowPolicy.distill = False`` saves its unused one-step network.

    Args:
      actor: registered actor class (default :class:`FQLActor`).
      alpha: weight of the distillation penalty (paper: 0.3).
      normalize_q_loss: divide the Q term by ``sg(mean |Q|)`` over the batch (as FQL does).
      actor_goals: ``'actor_goals'`` or ``'value_goals'``: the batch goals the actor is trained on
        (the flow policy is trained on the actor goals).
      **kwargs: :class:`MAC`'s arguments (Gin's ``MAC.*`` bindings fill those not given).

    Raises:
      ConfigError: ``alpha < 0``, an unknown ``actor_goals``, or (at :meth:`init`) a ``MAC.policy``
        without a ``solve`` method.
    """

    def __init__(
        self,
        *args,
        actor: Callable = FQLActor,
        alpha: float = 0.3,
        normalize_q_loss: bool = True,
        actor_goals: str = "actor_goals",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.alpha = check_float("MACFQL.alpha", alpha, low=0.0)  # None only with allow_none
        self.actor_goals = check_choice("MACFQL.actor_goals", actor_goals, ("actor_goals", "value_goals"))
        self.factories["actor"] = actor
        self.normalize_q_loss = bool(normalize_q_loss)

    # ------------------------------------------------------------------ building
    def init(self, spec: Spec, key) -> TrainState:
        state = super().init(spec, key)
        check(
            "MAC.policy",
            type(state.nets.policy).__name__,
            callable(getattr(state.nets.policy, "solve", None)),
            "a policy with a solve(s, g, z) method (MACFQL distils the flow ODE solution), e.g. @FlowPolicy",
        )
        key, k_actor = jax.random.split(state.key)
        nets = dataclasses.replace(state.nets, actor=self.factories["actor"](spec, key=k_actor))
        opt_state = self.optimizer().init(eqx.filter(nets, eqx.is_inexact_array))
        return TrainState(step=state.step, nets=nets, target_value=state.target_value, opt_state=opt_state, key=key)

    @staticmethod
    def _actor_view(nets: Networks) -> Networks:
        """``nets`` with the actor in the behaviour policy's slot (what the sampler is handed)."""
        if nets.actor is None:
            raise ValueError("MACFQL needs nets.actor; build the state with MACFQL.init.")
        return dataclasses.replace(nets, policy=nets.actor)

    # ------------------------------------------------------------------ acting and rollouts
    def act(self, nets: Networks, s, g, *, key, acting: bool = True):
        return super().act(self._actor_view(nets), s, g, key=key, acting=acting)

    def rollout(self, nets: Networks, s0, g, key):
        return super().rollout(self._actor_view(nets), s0, g, key)

    # ------------------------------------------------------------------ the loss
    def actor_loss(self, nets: Networks, batch: dict, key) -> tuple[Array, dict]:
        """The FQL actor loss on the batch, its Q and distillation terms; returns ``(loss, metrics)``."""
        s, g = batch["obs"], batch[self.actor_goals]
        B = s.shape[0]
        actor = nets.actor
        if actor is None:
            raise ValueError("MACFQL needs nets.actor; build the state with MACFQL.init.")
        z = jax.vmap(actor.noise)(jax.random.split(key, B))
        # the flow ODE solution (diffrax), clipped to the action range as the authors' mbfql.py
        # sample_flow_actions clips its distillation target
        target = jax.lax.stop_gradient(jnp.clip(jax.vmap(nets.policy.solve)(s, g, z), -1.0, 1.0))
        A = jax.vmap(actor)(s, g, z)
        distill = jnp.mean((A - target) ** 2)
        critic = jax.lax.stop_gradient(nets.critic)  # the Q term trains the actor only
        q = jax.vmap(critic)(s, g, jnp.clip(A, -1.0, 1.0))
        q_loss = -jnp.mean(q)
        if self.normalize_q_loss:
            q_loss = q_loss * jax.lax.stop_gradient(1.0 / (jnp.mean(jnp.abs(q)) + 1e-6))
        loss = q_loss + self.alpha * distill
        return loss, {
            "actor/loss": loss,
            "actor/q_loss": q_loss,
            "actor/distill_loss": distill,
            "actor/q_mean": jnp.mean(q),
            "actor/action_abs_mean": jnp.mean(jnp.abs(A)),
        }

    def loss(self, nets: Networks, target_value, batch: dict, roll: dict, key) -> tuple[Array, dict]:
        """MAC's loss plus :meth:`actor_loss` (DESIGN §2.7, MAC-FQL)."""
        k_mac, k_actor = jax.random.split(key)
        total, metrics = super().loss(nets, target_value, batch, roll, k_mac)
        actor, m_actor = self.actor_loss(nets, batch, k_actor)
        total = total + actor
        metrics = {**metrics, **m_actor, "total/loss": total}
        return total, metrics
