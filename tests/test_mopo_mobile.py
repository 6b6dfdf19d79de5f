"""MOPO's and MOBILE's defining equations on tiny hand-made inputs, and the MBPO model buffer
(DESIGN §9): MOPO's penalty max_i ||sigma_i(s, a)||_2, MOBILE's spread across members of the
Bellman target, the critic target, and the buffer's first-in-first-out and real/model mixing."""

from __future__ import annotations

import dataclasses
import functools

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
    ens = Ensemble(
        SPEC,
        key=jax.random.PRNGKey(0),
        member=lambda spec, key: GaussianDynamics(spec, key=key, hidden_dims=(8,), **kw),
        num=k,
    )
    last = ens.members.net.layers[-1]
    bias = np.concatenate([np.asarray(means_shift, np.float32), np.asarray(raw_log_std, np.float32)], axis=1)
    last = eqx.tree_at(lambda lin: (lin.weight, lin.bias), last, (jnp.zeros_like(last.weight), jnp.asarray(bias)))
    return eqx.tree_at(lambda e: e.members.net.layers[-1], ens, last)


class StubActor(eqx.Module):
    """a(s) = tanh(atanh(0.5) + e^-30 eps) = 0.5 everywhere."""

    def mean_log_std(self, s, g):
        return jnp.full((ACT,), np.arctanh(0.5), jnp.float32), jnp.full((ACT,), -30.0)


class StubCritics(eqx.Module):
    """Two critics: Q_1 = sum(s) + sum(a), Q_2 = Q_1 + 1."""

    def __call__(self, s, g, a):
        q = jnp.sum(s) + jnp.sum(a)
        return jnp.stack([q, q + 1.0])

    def over_batch(self, fn, *args):  # (members, B), as Ensemble.over_batch with fn = the call
        return jax.vmap(self)(*args).T


def _nets(dynamics):
    return MOPONetworks(
        dynamics=dynamics, success=None, reward=None, actor=StubActor(), critic=StubCritics(), temperature=None
    )


def _ensemble(member, num):
    return lambda spec, key: Ensemble(spec, key=key, member=functools.partial(member, hidden_dims=(8,)), num=num)


def _agent(cls=MOPO, **kw):
    agent = cls(
        dynamics=_ensemble(GaussianDynamics, 3),
        critic=_ensemble(QCritic, 2),
        rollouts=ModelRollouts(num_starts=4, rollout_length=2, retain_rounds=2, rollout_freq=10),
        **kw,
    )
    agent.spec = SPEC
    return agent


def _batch(B=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "obs": jnp.asarray(rng.normal(size=(B, OB)), jnp.float32),
        "actions": jnp.asarray(rng.uniform(-1, 1, (B, ACT)), jnp.float32),
        "next_obs": jnp.asarray(rng.normal(size=(B, OB)), jnp.float32),
        "rewards": jnp.asarray(rng.normal(size=B), jnp.float32),
        "masks": jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0][:B], jnp.float32),
        "value_goals": jnp.zeros((B, 0)),
        "actor_goals": jnp.zeros((B, 0)),
    }


def test_mopo_penalty_is_the_largest_member_std_norm():
    raw = np.array([[-1.0, 0.0, 2.0], [3.0, -2.0, 0.5], [0.0, 0.0, 0.0]], np.float32)  # (k, ob_dim)
    dyn = _members(np.zeros((3, OB)), raw)
    u, _ = _agent().penalty(_nets(dyn), None, _batch(), {})
    log_std = -5.0 + 6.0 / (1.0 + np.exp(-raw))  # the sigmoid squash into [-5, 1]
    want = np.max(np.linalg.norm(np.exp(log_std), axis=1))
    np.testing.assert_allclose(np.asarray(u), np.full(5, want), rtol=1e-5)


def test_mobile_penalty_is_the_member_spread_of_the_bellman_target():
    shifts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [-1.0, -1.0, 0.0]], np.float32)
    # (almost) deterministic members: sigma = e^-30
    dyn = _members(shifts, np.zeros((4, OB)), log_std_min=-30.0, log_std_max=-29.0)
    b = _batch()
    agent = _agent(MOBILE, num_samples=3)
    noise = agent.penalty_noise(_nets(dyn), jax.random.PRNGKey(2), 5)
    assert noise["penalty/next_obs"].shape == (4, 3, 5, OB) and noise["penalty/next_actions"].shape == (4, 3, 5, ACT)
    u, _ = agent.penalty(_nets(dyn), StubCritics(), b, noise)
    # member i predicts s + shift_i; a' = 0.5; mean over the two critics = sum(s') + sum(a') + 0.5
    s = np.asarray(b["obs"])
    q = s.sum(axis=1)[:, None] + shifts.sum(axis=1)[None, :] + 0.5 * ACT + 0.5  # (B, k)
    np.testing.assert_allclose(np.asarray(u), q.std(axis=1), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(u) > 0.5)


def test_critic_target_uses_min_of_target_critics_and_masks():
    agent = _agent()
    b = _batch()
    eps = jax.random.normal(jax.random.PRNGKey(3), (5, ACT))
    t = agent._target_q(_nets(None), StubCritics(), b, eps)
    q_min = np.asarray(b["next_obs"]).sum(axis=1) + 0.5 * ACT  # min of (Q1, Q1 + 1)
    want = np.asarray(b["rewards"]) + 0.999 * np.asarray(b["masks"]) * q_min
    np.testing.assert_allclose(np.asarray(t), want, rtol=1e-5)
    # goal-conditioned targets are clipped to [-1 / (1 - gamma), 0]
    agent.spec = dataclasses.replace(SPEC, goal_dim=1)
    gb = dict(b, value_goals=jnp.zeros((5, 1)), rewards=jnp.full((5,), 5.0))
    t = agent._target_q(_nets(None), StubCritics(), gb, eps)
    assert np.all(np.asarray(t) <= 0.0) and np.all(np.asarray(t) >= -1.0 / (1 - 0.999))


def test_buffer_is_first_in_first_out_and_mix_is_all_real_until_filled():
    buf = ModelBuffer.empty(5, SPEC)
    real = _batch(4)
    mixed, is_model = mix(real, buf, jax.random.PRNGKey(0), 2)
    np.testing.assert_array_equal(np.asarray(is_model), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(mixed["obs"]), np.asarray(real["obs"]))  # all real before a refill

    def trans(v, M):
        return {
            "obs": jnp.full((M, OB), v),
            "actions": jnp.zeros((M, ACT)),
            "next_obs": jnp.zeros((M, OB)),
            "rewards": jnp.arange(M, dtype=jnp.float32) + v,
            "masks": jnp.ones(M),
            "value_goals": jnp.zeros((M, 0)),
            "actor_goals": jnp.zeros((M, 0)),
        }

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


# ---------------------------------------------------------------------------------------------------
# What the parity with the authors' agents/mopo.py and agents/mobile.py found (issue 29)
# ---------------------------------------------------------------------------------------------------
def _small(cls=MOPO, goal_dim=0, **kw):
    """``cls`` with every network 1 x 8 wide, 3 dynamics members, and its state."""
    from macfw.nn.actors import TanhGaussianActor
    from macfw.nn.models import RewardModel, SuccessModel

    P = functools.partial
    agent = cls(
        dynamics=_ensemble(GaussianDynamics, 3),
        critic=_ensemble(QCritic, 2),
        actor=P(TanhGaussianActor, hidden_dims=(8,), final_init_scale=0.01),
        success=P(SuccessModel, hidden_dims=(8,)),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        reward=P(RewardModel, hidden_dims=(8,)),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        rollouts=ModelRollouts(num_starts=4, rollout_length=2, retain_rounds=2, rollout_freq=10),
        **kw,
    )
    spec = Spec(ob_dim=OB, act_dim=ACT, goal_dim=goal_dim, chunk_len=1)
    return agent, agent.init(spec, 0)


def _loop_batch(B=8, seed=0, goal_dim=0):
    b = _batch(5, seed)
    rng = np.random.default_rng(seed)
    out = {
        "obs": rng.normal(size=(B, OB)),
        "actions": rng.uniform(-1, 1, (B, ACT)),
        "next_obs": rng.normal(size=(B, OB)),
        "rewards": rng.normal(size=B),
        "success": (np.arange(B) % 3 == 0).astype(np.float64),
        "value_goals": rng.normal(size=(B, goal_dim)),
        "actor_goals": rng.normal(size=(B, goal_dim)),
    }
    del b
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def test_ensemble_over_batch_equals_every_member_on_every_row_and_the_reference_form():
    from macfw import reference

    member = functools.partial(QCritic, hidden_dims=(8, 8))  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
    ens = Ensemble(SPEC, key=jax.random.PRNGKey(4), member=member, num=3)
    b = _batch(5)
    fast = ens.over_batch(lambda m, s, g, a: m(s, g, a), b["obs"], b["value_goals"], b["actions"])
    with reference.reference_computation(only="members_outer"):
        plain = ens.over_batch(lambda m, s, g, a: m(s, g, a), b["obs"], b["value_goals"], b["actions"])
    rows = jax.vmap(ens)(b["obs"], b["value_goals"], b["actions"])  # (B, k): each row calls every member
    assert fast.shape == (3, 5)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(rows).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(rows).T, rtol=1e-6, atol=1e-6)


def test_target_critics_ema_reads_the_critics_before_the_step():
    """The authors' target_update reads self.network (the pre-update parameters): after one update
    from equal copies the targets are unchanged; after the second they moved by tau toward the
    critics of after the first."""
    agent, state = _small()
    batch = _loop_batch()
    s1, _ = jax.jit(agent.update)(state, batch)
    for t, c in zip(jax.tree_util.tree_leaves(s1.target_critic), jax.tree_util.tree_leaves(state.nets.critic)):
        np.testing.assert_allclose(np.asarray(t), np.asarray(c), rtol=2e-7, atol=1e-9)  # a step moves them ~1e-6
    s2, _ = jax.jit(agent.update)(s1, batch)
    for t2, t1, c1 in zip(
        jax.tree_util.tree_leaves(s2.target_critic),
        jax.tree_util.tree_leaves(s1.target_critic),
        jax.tree_util.tree_leaves(s1.nets.critic),
    ):
        np.testing.assert_allclose(
            np.asarray(t2), 0.995 * np.asarray(t1) + 0.005 * np.asarray(c1), rtol=1e-6, atol=1e-9
        )


def test_models_train_on_the_real_part_of_the_mixed_batch_only():
    """As the authors' real_batch: the loop batch's rows that buffer samples replace never reach the
    models (poisoned with NaN here, the update stays finite) and the penalty sees only model rows."""
    agent, state = _small()
    M = 6
    trans = {
        "obs": jnp.ones((M, OB)),
        "actions": jnp.zeros((M, ACT)),
        "next_obs": jnp.ones((M, OB)),
        "rewards": jnp.zeros(M),
        "masks": jnp.ones(M),
        "value_goals": jnp.zeros((M, 0)),
        "actor_goals": jnp.zeros((M, 0)),
    }
    state = dataclasses.replace(state, buffer=state.buffer.add(trans))
    batch = _loop_batch()
    poisoned = {
        k: v.at[4:].set(jnp.nan) if v.dtype == jnp.float32 and v.ndim and v.shape[-1] else v for k, v in batch.items()
    }
    _, m = jax.jit(agent.update)(state, poisoned)
    assert all(np.isfinite(float(v)) for v in m.values()), {k: float(v) for k, v in m.items()}
    assert float(m["buffer/model_fraction"]) == 0.5
    # the same losses as update_on with the first half as the real batch
    _, m_clean = jax.jit(agent.update)(state, batch)
    assert float(m["dynamics/loss"]) == pytest.approx(float(m_clean["dynamics/loss"]), rel=1e-6)


def test_losses_use_the_given_draws_and_log_the_authors_metrics():
    agent, state = _small()
    nets = state.nets
    b = _loop_batch()
    real = {
        "obs": b["obs"][:4],
        "actions": b["actions"][:4],
        "next_obs": b["next_obs"][:4],
        "rewards": b["rewards"][:4],
        "masks": 1.0 - b["success"][:4],
        "value_goals": b["value_goals"][:4],
        "actor_goals": b["actor_goals"][:4],
    }
    mixed = {k: jnp.concatenate([v, v]) for k, v in real.items()}
    noise = agent.draw_noise(nets, jax.random.PRNGKey(5), 4, 4)
    assert noise["dynamics"].shape == (3, 4, OB) and noise["actions"].shape == (8, ACT)
    _, m = agent.loss(nets, real, mixed, jnp.zeros(8), noise)
    mean, log_std = jax.vmap(lambda i: jax.vmap(nets.dynamics.member(i).mean_log_std)(real["obs"], real["actions"]))(
        jnp.arange(3)
    )  # (k, n, ob)
    sample = mean + jnp.exp(log_std) * noise["dynamics"]
    assert float(m["dynamics/sample_mse"]) == pytest.approx(float(jnp.mean((sample - real["next_obs"]) ** 2)), rel=1e-5)
    # the actor's draws: a = tanh(mean + std * eps), its pre-squash std logged as actor/std_mean
    mu, ls = jax.vmap(nets.actor.mean_log_std)(mixed["obs"], mixed["actor_goals"])
    a = jnp.tanh(mu + jnp.exp(ls) * noise["actions"])
    q_pi = jax.vmap(nets.critic)(mixed["obs"], mixed["actor_goals"], a).mean(axis=1)
    assert float(m["actor/q_mean"]) == pytest.approx(float(q_pi.mean()), rel=1e-5, abs=1e-6)
    assert float(m["actor/std_mean"]) == pytest.approx(float(jnp.mean(jnp.exp(ls))), rel=1e-6)
    for k in (
        "success/accuracy_0.7",
        "success/pos_accuracy",
        "success/label_mean",
        "reward/pred_max",
        "critic/q_max",
        "critic/q_min",
        "temperature/entropy",
    ):
        assert k in m


def test_success_metrics_as_the_authors_log_them_and_zero_without_positives():
    from macfw.agents.mopo import _success_metrics

    logit = jnp.log(jnp.array([0.95, 0.8, 0.6, 0.3, 0.75]) / (1 - jnp.array([0.95, 0.8, 0.6, 0.3, 0.75])))
    label = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0])
    m = {k: float(v) for k, v in _success_metrics(logit, label).items()}
    assert m["success/accuracy"] == pytest.approx(3 / 5)  # p > 0.5: 1, 1, 1, 0, 1 against 1, 1, 0, 0, 0
    assert m["success/accuracy_0.7"] == pytest.approx(4 / 5)  # 1, 1, 0, 0, 1
    assert m["success/accuracy_0.9"] == pytest.approx(4 / 5)  # 1, 0, 0, 0, 0
    assert m["success/pos_accuracy"] == pytest.approx(1.0) and m["success/neg_accuracy"] == pytest.approx(1 / 3)
    assert m["success/label_mean"] == pytest.approx(0.4) and m["success/prob_max"] == pytest.approx(0.95, rel=1e-5)
    m = _success_metrics(logit, jnp.zeros(5))
    assert float(m["success/pos_accuracy"]) == 0.0  # the authors': 0 / 0 = NaN, which stops macfw's loop


def test_rollout_takes_each_steps_member_and_draws():
    """One rollout round is deterministic given its draws: s' = mu_i(s, a) + sigma_i eps with i the
    step's member (the authors draw every member's sample and jax.random.choice one)."""
    shifts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 1.0]], np.float32)
    raw = np.zeros((3, OB), np.float32)
    dyn = _members(shifts, raw)  # log sigma = -5 + 6 sigmoid(0) = -2

    class Head(eqx.Module):
        def __call__(self, s, g, a):
            return jnp.sum(s) - 0.5  # success iff sum(s) > 0.5; reward = sum(s) - 0.5

    agent, _ = _small()
    nets = MOPONetworks(dynamics=dyn, success=Head(), reward=Head(), actor=StubActor(), critic=None, temperature=None)
    b = _batch(4)
    noise = agent.rollout_noise(nets, jax.random.PRNGKey(6), 4)
    assert noise["members"].shape == (2, 4) and noise["dynamics"].shape == (2, 4, OB)
    out = agent.rollout(nets, b, noise)
    s = np.asarray(b["obs"])
    for t in range(2):
        i = np.asarray(noise["members"][t])
        want = s + shifts[i] + np.exp(-2.0) * np.asarray(noise["dynamics"][t])
        np.testing.assert_allclose(np.asarray(out["obs"][4 * t : 4 * t + 4]), s, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(out["next_obs"][4 * t : 4 * t + 4]), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out["actions"][4 * t : 4 * t + 4]), 0.5, rtol=1e-6)
        c = (s.sum(axis=1) - 0.5 > 0).astype(np.float32)
        np.testing.assert_allclose(np.asarray(out["masks"][4 * t : 4 * t + 4]), 1.0 - c)
        np.testing.assert_allclose(np.asarray(out["rewards"][4 * t : 4 * t + 4]), s.sum(axis=1) - 0.5, rtol=1e-5)
        s = want


def test_real_ratio_must_leave_real_transitions_for_the_models():
    with pytest.raises(ConfigError, match=r"ModelRollouts\.real_ratio = 0\.0"):
        ModelRollouts(real_ratio=0.0)
