"""Flow matching learns a two-mode action distribution, and both the ODE sampler and the distilled
one-step policy reproduce both modes; diffrax solvers are configurable by name."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from macfw.nn.flow import SOLVERS, FlowPolicy, solve_flow
from macfw.spec import Spec

MODE = 0.7
SPEC = Spec(ob_dim=1, act_dim=1, goal_dim=0, chunk_len=1)
NUM_SAMPLES = 512


def _data(key, n):
    k1, k2 = jax.random.split(key)
    sign = jnp.where(jax.random.bernoulli(k1, 0.5, (n, 1)), 1.0, -1.0)
    return sign * MODE + 0.02 * jax.random.normal(k2, (n, 1))


@pytest.fixture(scope="module")
def trained():
    policy = FlowPolicy(SPEC, key=jax.random.PRNGKey(0), hidden_dims=(64, 64), distill=True)
    params, static = eqx.partition(policy, eqx.is_inexact_array)
    opt = optax.adam(2e-3)
    batch, num_steps = 128, 1500
    s = jnp.zeros((batch, 1))
    g = jnp.zeros((batch, 0))

    @jax.jit
    def train(params, opt_state, key):
        def step(carry, k):
            params, opt_state = carry
            ka, kl = jax.random.split(k)
            A = _data(ka, batch)

            def loss_fn(p):
                pi = eqx.combine(p, static)
                losses, _ = jax.vmap(lambda s_, g_, a_, kk: pi.loss(s_, g_, a_, key=kk))(
                    s, g, A, jax.random.split(kl, batch)
                )
                return losses.mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(key, num_steps))
        return params, losses

    params, losses = train(params, opt.init(params), jax.random.PRNGKey(1))
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    assert losses[-200:].mean() < losses[:50].mean()
    return eqx.combine(params, static)


def _check_two_modes(x, what):
    x = np.asarray(x).reshape(-1)
    assert x.shape == (NUM_SAMPLES,)
    assert np.all(np.isfinite(x)), what
    frac_pos = float(np.mean(x > 0))
    assert 0.25 <= frac_pos <= 0.75, f"{what}: fraction of samples in the + mode {frac_pos:.2f}"
    near = float(np.mean(np.abs(np.abs(x) - MODE) < 0.25))
    assert near >= 0.8, f"{what}: only {near:.2f} of samples near a mode; {np.percentile(x, [5, 25, 50, 75, 95])}"


def _sample_all(policy):
    s = jnp.zeros((1,))
    g = jnp.zeros((0,))
    zs = jax.random.normal(jax.random.PRNGKey(2), (NUM_SAMPLES, 1))

    @eqx.filter_jit
    def run(policy, zs):
        ode = jax.vmap(lambda z: policy.solve(s, g, z))(zs)
        one = jax.vmap(lambda z: policy.distilled(s, g, z))(zs)
        via_sample = jax.vmap(lambda k: policy.sample(s, g, key=k))(
            jax.random.split(jax.random.PRNGKey(3), NUM_SAMPLES)
        )
        midpoint = jax.vmap(lambda z: solve_flow(policy.velocity, s, g, z, num_steps=20, solver="midpoint"))(zs)
        return ode, one, via_sample, midpoint

    return [np.asarray(x) for x in run(policy, zs)]


def test_flow_and_distilled_policy_sample_both_modes(trained):
    ode, one, via_sample, midpoint = _sample_all(trained)
    _check_two_modes(ode, "ODE (euler, 10 steps)")
    _check_two_modes(one, "distilled one-step policy")
    _check_two_modes(via_sample, "policy.sample (distilled)")
    _check_two_modes(midpoint, "ODE (midpoint, 20 steps)")
    # the one-step policy imitates the ODE map from the same noise: the same mode for most noises
    assert np.mean(np.sign(ode) == np.sign(one)) > 0.9
    # a finer solver of the same learned field lands on the same modes
    assert np.mean(np.sign(ode) == np.sign(midpoint)) > 0.9


@pytest.mark.parametrize("solver,steps", [("heun", 4), ("midpoint", 7)])
def test_other_solvers_finite_and_shaped(solver, steps):
    spec = SPEC  # same sizes as the trained policy: its (eagerly compiled) initialisers are reused
    pi = FlowPolicy(
        spec, key=jax.random.PRNGKey(5), hidden_dims=(64, 64), distill=False, solver=solver, flow_steps=steps
    )
    assert pi.one_step is None
    s = jnp.linspace(-1, 1, 5)[:, None]
    g = jnp.zeros((5, 0))
    keys = jax.random.split(jax.random.PRNGKey(1), 5)

    @eqx.filter_jit
    def run(pi, s, g, keys):
        out = jax.vmap(lambda s_, g_, k_: pi.sample(s_, g_, key=k_))(s, g, keys)
        z = jax.random.normal(keys[0], (spec.chunk_dim,))
        return out, pi.solve(s[0], g[0], z), solve_flow(pi.velocity, s[0], g[0], z, num_steps=steps, solver="euler")

    out, ref, euler = map(np.asarray, run(pi, s, g, keys))
    assert out.shape == (5, spec.chunk_dim)
    assert np.all(np.isfinite(out))
    # without distillation, sample() solves the ODE (with the configured solver) from the key's noise
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ref, euler, atol=1e-7)  # the configured solver is used, not euler


def test_unknown_solver_raises():
    with pytest.raises(ValueError) as ei:
        FlowPolicy(SPEC, key=jax.random.PRNGKey(0), hidden_dims=(64, 64), solver="rk99")
    msg = str(ei.value)
    assert "rk99" in msg
    for name in SOLVERS:
        assert name in msg
    with pytest.raises(ValueError) as ei:
        solve_flow(lambda s, g, x, u: x, jnp.zeros(1), jnp.zeros(0), jnp.zeros(1), solver="rk99")
    assert "euler" in str(ei.value) and "heun" in str(ei.value)


def test_bad_flow_steps_raises():
    with pytest.raises(ValueError):
        FlowPolicy(SPEC, key=jax.random.PRNGKey(0), hidden_dims=(64, 64), flow_steps=0)


def test_distilled_requires_distill():
    pi = FlowPolicy(SPEC, key=jax.random.PRNGKey(0), hidden_dims=(64, 64), distill=False)
    with pytest.raises(ValueError):
        pi.distilled(jnp.zeros(1), jnp.zeros(0), jnp.zeros(1))
