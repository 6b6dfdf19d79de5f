"""FQL (macfw/agents/fql_baseline.py): the defining equations on tiny hand-made inputs, checked in numpy.

* the one-step policy loss ``alpha * mean (mu - T)^2 - mean_b mean_j Q_j(s, clip(mu))`` with a linear
  critic and a fixed flow target T (and its ``normalize_q_loss`` variant);
* the critic target ``r + gamma m agg_j Q'_j(s', clip(mu(s', z')))`` for ``mean`` and ``min``;
* the Q term never moves the critic (its gradient w.r.t. the critic is exactly zero), in the pure
  function and in the agent's own loss;
* the flow target is the authors' 10-step Euler loop, clipped;
* one update: finite metrics, the target critic an EMA of the new critic; acting in [-1, 1].
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.agents.fql import FQLActor
from macfw.agents.fql_baseline import FQL, fql_actor_loss, fql_critic_target
from macfw.errors import ConfigError
from macfw.nn.ensemble import Ensemble
from macfw.nn.flow import FlowPolicy
from macfw.nn.models import QCritic
from macfw.spec import Spec

B, OB, ACT = 5, 3, 2


class LinearActor(eqx.Module):
    """mu(s, g, z) = W [s, g, z] + c."""

    W: jax.Array
    c: jax.Array

    def __call__(self, s, g, z):
        return self.W @ jnp.concatenate([s, g, z]) + self.c


class LinearCritics(eqx.Module):
    """Q_j(s, g, a) = w_j . [s, g, a] + b_j for j = 1..k: returns (k,)."""

    w: jax.Array  # (k, d)
    b: jax.Array  # (k,)

    def __call__(self, s, g, a):
        return self.w @ jnp.concatenate([s, g, a]) + self.b


def _inputs(goal_dim, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(B, OB)).astype(np.float32)
    g = rng.normal(size=(B, goal_dim)).astype(np.float32)
    z = rng.normal(size=(B, ACT)).astype(np.float32)
    W = (1.5 * rng.normal(size=(ACT, OB + goal_dim + ACT))).astype(np.float32)  # large: some actions leave [-1, 1]
    c = rng.normal(size=(ACT,)).astype(np.float32)
    w = rng.normal(size=(2, OB + goal_dim + ACT)).astype(np.float32)
    b = rng.normal(size=(2,)).astype(np.float32)
    T = rng.uniform(-1, 1, size=(B, ACT)).astype(np.float32)
    return s, g, z, W, c, w, b, T


def _np_q(w, b, s, g, a):  # (B, k)
    return np.concatenate([s, g, a], axis=1) @ w.T + b


@pytest.mark.parametrize("goal_dim", [0, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_actor_loss_is_alpha_distill_minus_q(goal_dim, normalize):
    s, g, z, W, c, w, b, T = _inputs(goal_dim)
    alpha = 3.0
    loss, m = fql_actor_loss(
        LinearActor(jnp.asarray(W), jnp.asarray(c)),
        LinearCritics(jnp.asarray(w), jnp.asarray(b)),
        jnp.asarray(s),
        jnp.asarray(g),
        jnp.asarray(z),
        jnp.asarray(T),
        alpha=alpha,
        normalize_q_loss=normalize,
    )
    a = np.concatenate([s, g, z], axis=1) @ W.T + c
    assert np.any(np.abs(a) > 1.0), "the test should exercise the clip"
    distill = np.mean((a - T) ** 2)  # unclipped actions in the distillation term
    q = _np_q(w, b, s, g, np.clip(a, -1, 1)).mean(axis=1)  # clipped actions, mean over the two critics
    q_loss = -q.mean() / (np.abs(q).mean() if normalize else 1.0)
    np.testing.assert_allclose(float(m["actor/distill_loss"]), distill, rtol=1e-5)
    np.testing.assert_allclose(float(m["actor/q_loss"]), q_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), alpha * distill + q_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_agg", ["mean", "min"])
def test_critic_target(q_agg):
    s, g, z, W, c, w, b, _ = _inputs(2, seed=1)
    rng = np.random.default_rng(2)
    r = rng.normal(size=(B,)).astype(np.float32)
    m = np.array([1, 0, 1, 1, 0], np.float32)
    gamma = 0.9
    y = fql_critic_target(
        LinearCritics(jnp.asarray(w), jnp.asarray(b)),
        LinearActor(jnp.asarray(W), jnp.asarray(c)),
        jnp.asarray(s),
        jnp.asarray(g),
        jnp.asarray(r),
        jnp.asarray(m),
        jnp.asarray(z),
        gamma=gamma,
        q_agg=q_agg,
    )
    a_next = np.clip(np.concatenate([s, g, z], axis=1) @ W.T + c, -1, 1)
    qs = _np_q(w, b, s, g, a_next)
    agg = qs.min(axis=1) if q_agg == "min" else qs.mean(axis=1)
    np.testing.assert_allclose(np.asarray(y), r + gamma * m * agg, rtol=1e-5, atol=1e-6)
    assert np.allclose(np.asarray(y)[m == 0], r[m == 0])  # terminal steps: no bootstrap


def test_actor_loss_gradient_wrt_critic_is_zero():
    s, g, z, W, c, w, b, T = _inputs(2)
    actor, critic = LinearActor(jnp.asarray(W), jnp.asarray(c)), LinearCritics(jnp.asarray(w), jnp.asarray(b))
    args = (jnp.asarray(s), jnp.asarray(g), jnp.asarray(z), jnp.asarray(T))
    g_critic = jax.grad(lambda cr: fql_actor_loss(actor, cr, *args, alpha=1.0)[0])(critic)
    g_actor = jax.grad(lambda ac: fql_actor_loss(ac, critic, *args, alpha=1.0)[0])(actor)
    assert np.all(np.asarray(g_critic.w) == 0) and np.all(np.asarray(g_critic.b) == 0)
    assert np.abs(np.asarray(g_actor.W)).max() > 1e-3


# ---------------------------------------------------------------------------------- the agent
def _agent(**kw):
    return FQL(
        policy=functools.partial(FlowPolicy, hidden_dims=(16,), distill=False, layer_norm=False),
        actor=functools.partial(FQLActor, hidden_dims=(16,), layer_norm=False),
        critic=functools.partial(Ensemble, member=functools.partial(QCritic, hidden_dims=(16,)), num=2),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        **kw,
    )


def _batch(goal_dim, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    return {
        "obs": f(8, OB),
        "actions": jnp.clip(f(8, ACT), -1, 1),
        "next_obs": f(8, OB),
        "rewards": -jnp.ones(8),
        "masks": jnp.ones(8),
        "success": jnp.asarray((rng.uniform(size=8) < 0.3).astype(np.float32)),
        "value_goals": f(8, goal_dim),
        "actor_goals": f(8, goal_dim),
    }


def test_agent_actor_loss_moves_only_the_actor(goal_dim=3):
    agent = _agent()
    state = agent.init(Spec(ob_dim=OB, act_dim=ACT, goal_dim=goal_dim, chunk_len=1), 0)
    params, static = eqx.partition(state.nets, eqx.is_inexact_array)
    grads = jax.jit(jax.grad(lambda p, b: agent.actor_loss(eqx.combine(p, static), b, jax.random.PRNGKey(1))[0]))(
        params, _batch(goal_dim)
    )
    norm = lambda t: max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    assert norm(grads.critic) == 0.0  # the Q term does not train Q
    assert norm(grads.policy) == 0.0  # the flow target is a constant
    assert norm(grads.actor) > 0.0


def test_flow_target_is_the_authors_euler_loop_clipped():
    agent = _agent()
    state = agent.init(Spec(ob_dim=OB, act_dim=ACT, goal_dim=0, chunk_len=1), 0)
    pol = state.nets.policy
    rng = np.random.default_rng(3)
    s, z = jnp.asarray(rng.normal(size=(B, OB)), jnp.float32), jnp.asarray(3 * rng.normal(size=(B, ACT)), jnp.float32)
    g = jnp.zeros((B, 0))
    v = jax.jit(jax.vmap(lambda s_, x_, u: pol.velocity(s_, jnp.zeros(0), x_, u), in_axes=(0, 0, None)))
    x = z
    for i in range(10):  # the authors' compute_flow_actions
        x = x + v(s, x, i / 10) / 10
    got = eqx.filter_jit(agent.flow_target)(pol, s, g, z)
    np.testing.assert_allclose(np.asarray(got), np.clip(np.asarray(x), -1, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("goal_dim", [0, 3])
def test_update_and_act(goal_dim):
    agent = _agent(tau=0.1)
    state = agent.init(Spec(ob_dim=OB, act_dim=ACT, goal_dim=goal_dim, chunk_len=1), 0)
    new, m = jax.jit(agent.update)(state, _batch(goal_dim))
    assert int(new.step) == 1
    for k in ("flow/loss", "critic/loss", "actor/loss", "actor/distill_loss", "total/loss"):
        assert np.isfinite(float(m[k])), k
    np.testing.assert_allclose(
        float(m["total/loss"]), float(m["flow/loss"]) + float(m["critic/loss"]) + float(m["actor/loss"]), rtol=1e-5
    )
    for t_old, t_new, c_new in zip(
        jax.tree_util.tree_leaves(eqx.filter(state.target_critic, eqx.is_inexact_array)),
        jax.tree_util.tree_leaves(eqx.filter(new.target_critic, eqx.is_inexact_array)),
        jax.tree_util.tree_leaves(eqx.filter(new.nets.critic, eqx.is_inexact_array)),
    ):
        np.testing.assert_allclose(
            np.asarray(t_new), 0.9 * np.asarray(t_old) + 0.1 * np.asarray(c_new), rtol=1e-5, atol=1e-6
        )
    acts = jax.vmap(lambda k: agent.act(new.nets, jnp.full((OB,), 0.5), jnp.ones(goal_dim), key=k))(
        jax.random.split(jax.random.PRNGKey(0), 64)
    )
    assert acts.shape == (64, 1, ACT) and float(jnp.abs(acts).max()) <= 1.0
    assert float(acts.std(axis=0).mean()) > 0.0  # a fresh noise per call


@pytest.mark.parametrize(
    "kw, binding",
    [
        ({"alpha": -1.0}, "FQL.alpha"),
        ({"q_agg": "max"}, "FQL.q_agg"),
        ({"gamma": 1.0}, "FQL.gamma"),
        ({"tau": 0.0}, "FQL.tau"),
        ({"normalize_q_loss": 1}, "FQL.normalize_q_loss"),
    ],
)
def test_bad_values_name_their_binding(kw, binding):
    with pytest.raises(ConfigError, match=binding.replace(".", r"\.")):
        _agent(**kw)
