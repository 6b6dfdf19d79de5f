"""Flow-matching behaviour policy over action chunks, and its distilled one-step policy.

Paper §4.2 (MAC); flow matching after Lipman et al. (2023), one-step distillation after FQL
(Park et al., 2025). Shapes are per example: ``s: (ob_dim,)``, ``g: (goal_dim,)``,
``x, z, A: (chunk_dim,)``, flow time ``u`` a scalar in [0, 1].
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from macfw.errors import check, check_float, check_int
from macfw.nn.mlp import MLP
from macfw.nn.models import HIDDEN
from macfw.registry import register
from macfw.spec import Spec

#: diffrax solvers selectable by name (any diffrax solver instance may also be passed).
SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
}


class BehaviorPolicy(eqx.Module):
    """Base of the behaviour-policy family: a generative model of dataset action chunks.

    Subclasses implement :meth:`loss` (training on one dataset example) and :meth:`sample`
    (one candidate chunk, *not* clipped; the sampler clips).
    """

    @abc.abstractmethod
    def loss(self, s, g, A, *, key: PRNGKeyArray) -> tuple[Array, dict]: ...

    @abc.abstractmethod
    def sample(self, s, g, *, key: PRNGKeyArray) -> Float[Array, " chunk_dim"]: ...

    def sample_many(self, s, g, num: int, *, key: PRNGKeyArray) -> Float[Array, "num chunk_dim"]:
        """``num`` independent samples for one ``(s, g)``: ``(num, chunk_dim)``, not clipped.

        The default vmaps :meth:`sample` over ``num`` split keys. Policies that map noise to chunks
        override it to draw all the noise in one call (the rejection sampler's candidates: paper
        §4.2), which is cheaper than ``num`` separate draws.
        """
        return jax.vmap(lambda k: self.sample(s, g, key=k))(jax.random.split(key, num))


def resolve_solver(solver: str | diffrax.AbstractSolver) -> diffrax.AbstractSolver:
    """A diffrax solver from a name in :data:`SOLVERS` or an instance (returned as is).

    Raises:
      ConfigError: any other value (names ``FlowPolicy.solver`` and lists the known names).
    """
    check(
        "FlowPolicy.solver",
        solver,
        solver in SOLVERS if isinstance(solver, str) else isinstance(solver, diffrax.AbstractSolver),
        f"one of {sorted(SOLVERS)} or a diffrax solver instance",
    )
    return SOLVERS[solver]() if isinstance(solver, str) else solver


def solve_flow(
    field,
    s,
    g,
    z,
    *,
    num_steps: int = 10,
    solver: str | diffrax.AbstractSolver = "euler",
    adaptive: bool = False,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    max_steps: int = 256,
):
    """Solve ``dx/du = field(s, g, x, u)`` from ``x(0) = z`` to ``x(1)`` with diffrax.

    Args:
      field: callable ``(s, g, x, u) -> (chunk_dim,)`` velocity.
      z: ``(chunk_dim,)`` initial noise.
      num_steps: fixed steps (``dt0 = 1 / num_steps``); with ``adaptive`` the initial step count.
      solver: a name in :data:`SOLVERS` or a diffrax solver instance.
      adaptive: use a PID step-size controller (``rtol``, ``atol``) instead of fixed steps.

    Returns:
      ``x(1)``: ``(chunk_dim,)``.

    Raises:
      ConfigError: unknown solver (see :func:`resolve_solver`) or ``num_steps < 1`` (named as
        :class:`FlowPolicy`'s bindings ``solver`` and ``flow_steps``).
    """
    solver = resolve_solver(solver)
    num_steps = check_int("FlowPolicy.flow_steps", num_steps)
    term = diffrax.ODETerm(lambda u, x, args: field(s, g, x, u))
    if adaptive:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        steps = max_steps
    else:
        controller = diffrax.ConstantStepSize()
        steps = num_steps
    sol = diffrax.diffeqsolve(
        term,
        solver,
        t0=0.0,
        t1=1.0,
        dt0=1.0 / num_steps,
        y0=z,
        stepsize_controller=controller,
        saveat=diffrax.SaveAt(t1=True),
        max_steps=steps,
        throw=False,
    )
    assert sol.ys is not None  # SaveAt(t1=True) saves x(1)
    return sol.ys[-1]


@register("policy")
class FlowPolicy(BehaviorPolicy):
    """Flow-matching action-chunk policy ``v(s, g, x, u)`` with an optional one-step policy ``mu``.

    Flow matching (paper §4.2): ``x = (1 - u) z + u A``, target velocity ``A - z`` with
    ``z ~ N(0, I)``, ``u ~ U[0, 1]``. Distillation: ``mu(s, g, z)`` regresses the ODE solution
    of ``v`` from the same noise ``z`` (target under stop-gradient). :meth:`sample` uses ``mu``
    (one network call) when ``distill`` is on, else solves the ODE with diffrax (the paper's
    "no distillation" ablation).

    Args:
      spec: sizes.
      hidden_dims: hidden sizes of ``v`` and ``mu`` (default 4 x 1024).
      flow_steps: ODE steps from noise to a chunk (default 10 Euler steps).
      solver: diffrax solver name or instance (default ``"euler"``).
      adaptive: adaptive step size (PID controller) instead of ``flow_steps`` fixed steps.
      distill: train and sample from the one-step policy ``mu``.
      distill_weight: weight of the distillation loss.
      key: PRNG key.

    Raises:
      ConfigError: ``flow_steps < 1``, an unknown ``solver``, a negative ``distill_weight`` or bad
        ``hidden_dims``.
    """

    field: MLP
    one_step: MLP | None
    chunk_dim: int = eqx.field(static=True)
    flow_steps: int = eqx.field(static=True)
    solver: str = eqx.field(static=True)
    adaptive: bool = eqx.field(static=True)
    distill_weight: float = eqx.field(static=True)

    def __init__(
        self,
        spec: Spec,
        *,
        key: PRNGKeyArray,
        hidden_dims: Sequence[int] = HIDDEN,
        layer_norm: bool = True,
        flow_steps: int = 10,
        solver: str = "euler",
        adaptive: bool = False,
        distill: bool = True,
        distill_weight: float = 1.0,
        compute_dtype: str | None = None,
    ):
        self.flow_steps = check_int("FlowPolicy.flow_steps", flow_steps)
        resolve_solver(solver)
        self.solver = solver
        self.distill_weight = check_float("FlowPolicy.distill_weight", distill_weight, low=0.0)
        k1, k2 = jax.random.split(key)
        d_in = spec.ob_dim + spec.goal_dim + spec.chunk_dim
        kw: dict[str, Any] = dict(layer_norm=layer_norm, compute_dtype=compute_dtype, name=type(self).__name__)
        self.field = MLP(d_in + 1, spec.chunk_dim, hidden_dims, key=k1, **kw)
        self.one_step = MLP(d_in, spec.chunk_dim, hidden_dims, key=k2, **kw) if distill else None
        self.chunk_dim = spec.chunk_dim
        self.adaptive = bool(adaptive)

    def velocity(self, s, g, x, u) -> Float[Array, " chunk_dim"]:
        """``v(s, g, x, u)``: ``x: (chunk_dim,)``, ``u`` scalar flow time."""
        u = jnp.reshape(jnp.asarray(u, x.dtype), (1,))
        return self.field(jnp.concatenate([s, g, x, u]))

    def solve(self, s, g, z, *, pre=None) -> Float[Array, " chunk_dim"]:
        """The ODE solution ``x(1)`` from noise ``z: (chunk_dim,)`` (diffrax). The velocity field's
        first-layer product of ``[s, g]`` is computed once for every step (``pre: (hidden0,)``, from
        :meth:`state_prefix`, may be passed in when the caller has it). ``s: (ob_dim,)``,
        ``g: (goal_dim,)``."""
        pre = self.state_prefix(s, g) if pre is None else pre
        field = lambda s, g, x, u: self._velocity_from(pre, x, u)  # noqa: E731
        return solve_flow(field, s, g, z, num_steps=self.flow_steps, solver=self.solver, adaptive=self.adaptive)

    def state_prefix(self, s, g) -> Float[Array, " hidden0"]:
        """``v``'s first-layer share of ``[s, g]`` (:meth:`~macfw.nn.mlp.MLP.prefix`), shared by every
        velocity evaluation at this state."""
        return self.field.prefix(jnp.concatenate([s, g]))

    def _velocity_from(self, pre, x, u):
        u = jnp.reshape(jnp.asarray(u, x.dtype), (1,))
        return self.field.from_prefix(pre, jnp.concatenate([x, u]))

    def distilled(self, s, g, z) -> Float[Array, " chunk_dim"]:
        """``mu(s, g, z)``: one network call from noise to a chunk."""
        if self.one_step is None:
            raise ValueError("This FlowPolicy was built with distill=False; use solve() or sample().")
        return self.one_step(jnp.concatenate([s, g, z]))

    def sample(self, s, g, *, key):
        return self.sample_many(s, g, 1, key=key)[0]

    def sample_many(self, s, g, num, *, key):
        """``num`` chunks from noise ``z: (num, chunk_dim)`` drawn in one call (mu, or the ODE solve)."""
        z = jax.random.normal(key, (num, self.chunk_dim))
        one_step = self.one_step
        if one_step is not None:  # mu's first-layer product of [s, g] once for the num draws
            pre = one_step.prefix(jnp.concatenate([s, g]))
            return jax.vmap(lambda zi: one_step.from_prefix(pre, zi))(z)
        pre = self.state_prefix(s, g)
        return jax.vmap(lambda zi: self.solve(s, g, zi, pre=pre))(z)

    def flow_loss(self, s, g, A, z, u, *, pre=None) -> Float[Array, ""]:
        """The flow-matching loss of one example from given noise: ``mean((v(s, g, x, u) - (A - z))^2)``
        with ``x = (1 - u) z + u A`` (``z: (chunk_dim,)``, ``u`` scalar flow time; ``pre``: the
        velocity field's :meth:`state_prefix`, when the caller shares it with other evaluations, as
        :meth:`loss` does with its distillation target; without it one product of the whole input, as
        :meth:`velocity`: at 2 x 256 and batch 256 FMPC's update took 21.0 ms instead of 22.0, best of
        50). :meth:`loss` draws ``z, u`` and calls it; a caller that draws the noise of a whole batch
        at once calls it directly."""
        x = (1.0 - u) * z + u * A
        v = self.velocity(s, g, x, u) if pre is None else self._velocity_from(pre, x, u)
        return jnp.mean((v - (A - z)) ** 2)

    def loss(self, s, g, A, *, key):
        """Flow matching (+ distillation) for one example, its noise drawn from ``key``: ``z ~ N(0, I)``,
        ``u ~ U[0, 1]`` and ``z_distill ~ N(0, I)`` (:meth:`loss_from_noise`)."""
        kz, ku, kd = jax.random.split(key, 3)
        return self.loss_from_noise(
            s, g, A, jax.random.normal(kz, A.shape), jax.random.uniform(ku), jax.random.normal(kd, A.shape)
        )

    def loss_from_noise(self, s, g, A, z, u, z_distill) -> tuple[Array, dict]:
        """:meth:`loss` with its noise passed in (``z``, ``z_distill``: ``(chunk_dim,)``; ``u`` scalar).

        Flow matching (:meth:`flow_loss`) and, with ``distill``, the distillation loss
        ``mean((mu(s, g, z_distill) - sg(clip(x(1), -1, 1)))^2)``: ``x(1)`` the ODE solution from
        ``z_distill``, clipped to the action range as the authors' ``sample_flow_actions`` clips their
        target (the parity case ``experiments/parity_cases/mac.py`` found the unclipped one; the ODE
        solution leaves [-1, 1] where the data's chunks sit at its edges). Metrics: ``flow/loss``,
        ``flow/distill_loss``, ``flow/vel`` (``||A - z||``, the authors' ``bc_actor/vel``).
        """
        pre = self.state_prefix(s, g)  # shared by this velocity and the distillation target's ODE steps
        flow = self.flow_loss(s, g, A, z, u, pre=pre)
        metrics = {"flow/loss": flow, "flow/vel": jnp.linalg.norm(A - z)}
        total = flow
        if self.one_step is not None:
            target = self.solve(s, g, z_distill, pre=jax.lax.stop_gradient(pre))
            target = jax.lax.stop_gradient(jnp.clip(target, -1.0, 1.0))
            distill = jnp.mean((self.distilled(s, g, z_distill) - target) ** 2)
            metrics["flow/distill_loss"] = distill
            total = total + self.distill_weight * distill
        return total, metrics
