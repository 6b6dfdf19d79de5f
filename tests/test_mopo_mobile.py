"""MOPO's and MOBILE's defining equations on tiny hand-made inputs, and the MBPO model buffer
(DESIGN §9): MOPO's penalty max_i ||sigma_i(s, a)||_2, MOBILE's spread across members of the
Bellman target, the critic target, and the buffer's first-in-first-out and real/model mixing."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.agents.mbpo import ModelBuffer, ModelRollouts, mix
from macfw.agents.mobile import MOBILE
from macfw.agents.mopo import MOPO, MOPONetworks
from macfw.errors import ConfigError
from macfw.nn.ensemble import Ensemble
from macfw.nn.models import GaussianDynamics, QCritic
from macfw.spec import Spec

OB, ACT = 3, 2
SPEC = Spec(ob_dim=OB, act_dim=ACT, goal_dim=0, chunk_len=1)


def _members(means_shift, raw_log_std, **kw):
    """An ensemble of GaussianDynamics whose output ignores the input: next-state mean s + shift_i and
    raw log-std l_i (the last layer's weights zeroed, its bias set)."""
    k = len(means_shift)
    ens = Ensemble(SPEC, key=jax.random.PRNGKey(0), member=lambda spec, key: GaussianDynamics(
        spec, key=key, hidden_dims=(8,), **kw), num=k)
    last = ens.members.net.layers[-1]
    bias = np.concatenate([np.asarray(means_shift, np.float32), np.asarray(raw_log_std, np.float32)], axis=1)
    last = eqx.tree_at(lambda l: (l.weight, l.bias), last, (jnp.zeros_like(last.weight), jnp.asarray(bias)))
    return eqx.tree_at(lambda e: e.members.net.layers[-1], ens, last)


class StubActor(eqx.Module):
    """a(s) = 0.5 everywhere, log-prob 0."""

    def sample(self, s, g, *, key):
        return jnp.full((ACT,), 0.5)

    def sample_and_log_prob(self, s, g, *, key):
        return jnp.full((ACT,), 0.5), jnp.zeros(())


class StubCritics(eqx.Module):
    """Two critics: Q_1 = sum(s) + sum(a), Q_2 = Q_1 + 1."""

    def __call__(self, s, g, a):
        q = jnp.sum(s) + jnp.sum(a)
        return jnp.stack([q, q + 1.0])


def _nets(dynamics):
    return MOPONetworks(dynamics=dynamics, success=None, reward=None, actor=StubActor(), critic=StubCritics(),
                        temperature=None)


def _agent(cls=MOPO, **kw):
    agent = cls(dynamics=GaussianDynamics, critic=QCritic, rollouts=ModelRollouts(num_starts=4, rollout_length=2,
                                                                                   retain_rounds=2, rollout_freq=10),
                **kw)
    agent.spec = SPEC
    return agent


def _batch(B=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"obs": jnp.asarray(rng.normal(size=(B, OB)), jnp.float32),
            "actions": jnp.asarray(rng.uniform(-1, 1, (B, ACT)), jnp.float32),
            "next_obs": jnp.asarray(rng.normal(size=(B, OB)), jnp.float32),
            "rewards": jnp.asarray(rng.normal(size=B), jnp.float32),
            "masks": jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0][:B], jnp.float32),
            "value_goals": jnp.zeros((B, 0)), "actor_goals": jnp.zeros((B, 0))}


def test_mopo_penalty_is_the_largest_member_std_norm():
    raw = np.array([[-1.0, 0.0, 2.0], [3.0, -2.0, 0.5], [0.0, 0.0, 0.0]], np.float32)  # (k, ob_dim)
    dyn = _members(np.zeros((3, OB)), raw)
    u, _ = _agent().penalty(_nets(dyn), None, _batch(), jax.random.PRNGKey(1))
    log_std = -5.0 + 6.0 / (1.0 + np.exp(-raw))  # the sigmoid squash into [-5, 1]
    want = np.max(np.linalg.norm(np.exp(log_std), axis=1))
    np.testing.assert_allclose(np.asarray(u), np.full(5, want), rtol=1e-5)


def test_mobile_penalty_is_the_member_spread_of_the_bellman_target():
    shifts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [-1.0, -1.0, 0.0]], np.float32)
    # (almost) deterministic members: sigma = e^-30
    dyn = _members(shifts, np.zeros((4, OB)), log_std_min=-30.0, log_std_max=-29.0)
    b = _batch()
    agent = _agent(MOBILE, num_samples=3)
    u, _ = agent.penalty(_nets(dyn), StubCritics(), b, jax.random.PRNGKey(2))
    # member i predicts s + shift_i; a' = 0.5; mean over the two critics = sum(s') + sum(a') + 0.5
    s = np.asarray(b["obs"])
    q = s.sum(axis=1)[:, None] + shifts.sum(axis=1)[None, :] + 0.5 * ACT + 0.5  # (B, k)
    np.testing.assert_allclose(np.asarray(u), q.std(axis=1), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(u) > 0.5)


def test_critic_target_uses_min_of_target_critics_and_masks():
    agent = _agent()
    b = _batch()
    t = agent._target_q(_nets(None), StubCritics(), b, jax.random.PRNGKey(3))
    q_min = np.asarray(b["next_obs"]).sum(axis=1) + 0.5 * ACT  # min of (Q1, Q1 + 1)
    want = np.asarray(b["rewards"]) + 0.999 * np.asarray(b["masks"]) * q_min
    np.testing.assert_allclose(np.asarray(t), want, rtol=1e-5)
    # goal-conditioned targets are clipped to [-1 / (1 - gamma), 0]
    agent.spec = dataclasses.replace(SPEC, goal_dim=1)
    gb = dict(b, value_goals=jnp.zeros((5, 1)), rewards=jnp.full((5,), 5.0))
    t = agent._target_q(_nets(None), StubCritics(), gb, jax.random.PRNGKey(3))
    assert np.all(np.asarray(t) <= 0.0) and np.all(np.asarray(t) >= -1.0 / (1 - 0.999))


def test_buffer_is_first_in_first_out_and_mix_is_all_real_until_filled():
    buf = ModelBuffer.empty(5, SPEC)
    real = _batch(4)
    mixed, is_model = mix(real, buf, jax.random.PRNGKey(0), 2)
    np.testing.assert_array_equal(np.asarray(is_model), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(mixed["obs"]), np.asarray(real["obs"]))  # all real before a refill

    def trans(v, M):
        return {"obs": jnp.full((M, OB), v), "actions": jnp.zeros((M, ACT)), "next_obs": jnp.zeros((M, OB)),
                "rewards": jnp.arange(M, dtype=jnp.float32) + v, "masks": jnp.ones(M),
                "value_goals": jnp.zeros((M, 0)), "actor_goals": jnp.zeros((M, 0))}

    buf = buf.add(trans(10.0, 3))
    assert int(buf.size) == 3 and int(buf.ptr) == 3
    buf = buf.add(trans(20.0, 3))  # wraps: overwrites the oldest entry
    assert int(buf.size) == 5 and int(buf.ptr) == 1
    np.testing.assert_array_equal(np.asarray(buf.rewards), [22.0, 11.0, 12.0, 20.0, 21.0])
    mixed, is_model = mix(real, buf, jax.random.PRNGKey(1), 2)
    np.testing.assert_array_equal(np.asarray(is_model), [0, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(mixed["obs"][:2]), np.asarray(real["obs"][:2]))
    assert set(np.asarray(mixed["rewards"][2:]).tolist()) <= {22.0, 11.0, 12.0, 20.0, 21.0}


def test_refresh_adds_one_round_and_is_due_only_after_the_models_trained():
    agent = _agent()
    spec = Spec(ob_dim=OB, act_dim=ACT, goal_dim=0, chunk_len=1)
    state = agent.init(spec, 0)
    assert state.buffer.capacity == 4 * 2 * 2 and int(state.buffer.size) == 0
    rs = agent.refresh_spec()
    assert (rs.every, rs.batch_size, rs.first) == (10, 4, 10)
    b = _batch(4)
    starts = dict(b, success=1.0 - b["masks"])
    state2, metrics = jax.jit(agent.refresh)(state, starts)
    assert int(state2.buffer.size) == 8 and np.isfinite(float(metrics["buffer/rollout_reward_mean"]))
    # the first model step of each rollout starts from the start states
    np.testing.assert_allclose(np.asarray(state2.buffer.obs[:4]), np.asarray(b["obs"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state2.buffer.obs[4:8]), np.asarray(state2.buffer.next_obs[:4]), rtol=1e-6)
    with pytest.raises(ConfigError, match=r"ModelRollouts\.first_rollout_step = 15 is out of range"):
        ModelRollouts(rollout_freq=10, first_rollout_step=15)
