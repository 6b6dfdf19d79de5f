"""SHARSA (macfw.agents.sharsa): the n-step SARSA target of the authors' HGCDataset, the value target
(min of the target heads at the dataset subgoal, no max), acting by the best subgoal under min-Q with
the low-level policy conditioned on it, and one update's EMA, on tiny hand-made inputs."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.agents.sharsa import SHARSA, SHARSANetworks, dataset_subgoals, sarsa_targets
from macfw.errors import ConfigError
from macfw.nn.ensemble import Ensemble
from macfw.nn.flow import FlowPolicy
from macfw.nn.models import QCritic, StateValue
from macfw.spec import Spec

GAMMA, N = 0.9, 4


def _hgc_reference(idx, vg_idx, final_idx, next_v, n, gamma):
    """The authors' HGCDataset high-level value sample, written out per example (gc_negative=False)."""
    out = []
    for t, j, end, v in zip(idx, vg_idx, final_idx, next_v):
        steps = min(n, end - t)  # clip to the trajectory end
        if 0 <= j - t < steps:  # clip to the goal
            steps = j - t
        success = float(steps < n)
        reward = gamma ** steps * success
        out.append((steps, success, reward, reward + gamma ** steps * (1.0 - success) * v))
    return np.array(out)


def test_sarsa_target_is_the_authors_n_step_target():
    idx = np.array([10, 10, 10, 10, 10, 10, 10, 50])
    # goal at t (d=0), inside the n steps (1, n-1), exactly n ahead (not reached), far ahead, before t, random
    vg_idx = np.array([10, 11, 13, 14, 40, 3, 99, 51])
    final = idx + 60  # every sample's t + n lies inside its trajectory (as macfw's sampler guarantees)
    next_v = np.array([0.3, 0.7, 0.1, 0.6, 0.8, 0.25, 0.9, 0.5], np.float32)
    ref = _hgc_reference(idx, vg_idx, final, next_v, N, GAMMA)
    out = sarsa_targets(jnp.asarray(idx), jnp.asarray(vg_idx), jnp.asarray(next_v), n=N, gamma=GAMMA)
    np.testing.assert_array_equal(np.asarray(out["steps"]), ref[:, 0])
    np.testing.assert_array_equal(np.asarray(out["success"]), ref[:, 1])
    np.testing.assert_allclose(np.asarray(out["rewards"]), ref[:, 2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["masks"]), 1.0 - ref[:, 1])
    np.testing.assert_allclose(np.asarray(out["targets"]), ref[:, 3], rtol=1e-6)
    # spot values: reached at d=1 -> gamma; not reached -> gamma^n V(s_{t+n})
    assert out["targets"][1] == pytest.approx(GAMMA)
    assert out["targets"][3] == pytest.approx(GAMMA ** N * 0.6)


def test_dataset_subgoal_is_the_goal_where_reached_else_the_state_n_ahead():
    success = jnp.array([1.0, 0.0, 1.0])
    vg = jnp.arange(6.0).reshape(3, 2)
    ng = -jnp.arange(6.0).reshape(3, 2) - 1.0
    w = np.asarray(dataset_subgoals(success, vg, ng))
    np.testing.assert_array_equal(w, np.where(np.asarray(success)[:, None] > 0.5, np.asarray(vg), np.asarray(ng)))


# ---------------------------------------------------------------------- hand-built networks
class _Value(eqx.Module):
    """V(s, g) logit = s[0] + g[0]."""

    def __call__(self, s, g):
        return s[0] + g[0]


class _Critic(eqx.Module):
    """Two heads of logits on (s, g, w): (w[0] + s[0], 1 - w[0]^2 + g[0])."""

    def __call__(self, s, g, w):
        return jnp.stack([w[0] + s[0], 1.0 - w[0] ** 2 + g[0]])


class _Candidates(eqx.Module):
    """A high-level 'policy' whose candidates are fixed rows (tiled to the requested count)."""

    rows: jax.Array

    def sample_many(self, s, g, num, *, key):
        return jnp.resize(self.rows, (num, self.rows.shape[1]))


class _Echo(eqx.Module):
    """A low-level 'policy' acting 0.5 * subgoal[:act_dim] (so the action reveals its goal input)."""

    act_dim: int = eqx.field(static=True)

    def sample(self, s, g, *, key):
        return 0.5 * g[: self.act_dim]


def _agent(**kw) -> SHARSA:
    small = dict(hidden_dims=(8,))
    flow = functools.partial(FlowPolicy, hidden_dims=(8,), distill=False, flow_steps=2)
    return SHARSA(high_actor=flow, low_actor=flow, value=functools.partial(StateValue, **small),
                  critic=functools.partial(Ensemble, member=functools.partial(QCritic, **small), num=2),
                  n=N, gamma=GAMMA, **kw)


def test_value_target_is_min_of_target_heads_at_the_dataset_subgoal_and_critic_uses_v_of_s_t_plus_n():
    agent = _agent(q_agg="min")
    agent.spec = Spec(ob_dim=2, act_dim=1, goal_dim=2, chunk_len=N)
    B = 5
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.normal(size=(B, 2)), jnp.float32)
             for k in ("obs", "next_obs", "value_goals", "next_goals")}
    batch["idx"] = jnp.array([0, 0, 0, 0, 0])
    batch["value_goal_idx"] = jnp.array([0, 2, 4, 9, -3])  # reached, reached, not, not, not
    nets = SHARSANetworks(high_actor=None, low_actor=None, critic=None, value=_Value())
    tg = agent.targets(nets, _Critic(), batch)

    b = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    success = np.array([1.0, 1.0, 0.0, 0.0, 0.0])
    w = np.where(success[:, None] > 0.5, b["value_goals"], b["next_goals"])
    q1, q2 = sig(w[:, 0] + b["obs"][:, 0]), sig(1.0 - w[:, 0] ** 2 + b["value_goals"][:, 0])
    np.testing.assert_allclose(np.asarray(tg["subgoals"]), w, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(tg["value_targets"]), np.minimum(q1, q2), rtol=1e-5)
    steps = np.array([0, 2, N, N, N])
    next_v = sig(b["next_obs"][:, 0] + b["value_goals"][:, 0])
    want = success * GAMMA ** steps + GAMMA ** steps * (1 - success) * next_v
    np.testing.assert_allclose(np.asarray(tg["targets"]), want, rtol=1e-5)

    mean_agent = _agent(q_agg="mean")
    mean_agent.spec = agent.spec
    tg_mean = mean_agent.targets(nets, _Critic(), batch)
    np.testing.assert_allclose(np.asarray(tg_mean["value_targets"]), (q1 + q2) / 2, rtol=1e-5)


def test_acting_takes_the_subgoal_with_the_highest_min_q_and_acts_toward_it():
    agent = _agent(num_samples=6)
    agent.spec = Spec(ob_dim=2, act_dim=2, goal_dim=3, chunk_len=N)
    w0 = np.array([-1.2, -0.3, 0.2, 0.5, 0.69, 1.6])  # min-Q peaks near 0.695, mean-Q at 0.5
    rows = np.stack([w0, np.linspace(-1, 1, 6), np.linspace(1, -1, 6)], axis=1).astype(np.float32)
    s, g = jnp.array([0.1, -0.2]), jnp.array([0.3, 0.0, 0.0])
    q1, q2 = w0 + 0.1, 1.0 - w0 ** 2 + 0.3
    best = int(np.argmax(np.minimum(q1, q2)))
    assert best != int(np.argmax(q1)) and best != int(np.argmax(q2)) and best != int(np.argmax(q1 + q2)), \
        "the hand-made heads must make min-Q pick a different candidate than any other rule"
    nets = SHARSANetworks(high_actor=_Candidates(jnp.asarray(rows)), low_actor=_Echo(2), critic=_Critic(),
                          value=None)
    w, cands, q = agent.select_subgoal(nets, s, g, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(q), np.minimum(q1, q2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w), rows[best])
    a = np.asarray(agent.act(nets, s, g, key=jax.random.PRNGKey(1)))
    assert a.shape == (1, 2)
    np.testing.assert_allclose(a[0], 0.5 * rows[best, :2], rtol=1e-6)


def test_update_trains_every_part_and_moves_the_target_critic_by_tau():
    agent = _agent(tau=0.25)
    spec = Spec(ob_dim=3, act_dim=2, goal_dim=2, chunk_len=N)
    state = agent.init(spec, 0)
    B = 16
    ks = jax.random.split(jax.random.PRNGKey(1), 6)
    batch = {"obs": jax.random.normal(ks[0], (B, 3)), "next_obs": jax.random.normal(ks[1], (B, 3)),
             "actions": jax.random.uniform(ks[2], (B, N * 2), minval=-1, maxval=1),
             "value_goals": jax.random.normal(ks[3], (B, 2)), "actor_goals": jax.random.normal(ks[4], (B, 2)),
             "next_goals": jax.random.normal(ks[5], (B, 2)), "idx": jnp.zeros(B, jnp.int32),
             "value_goal_idx": jnp.arange(B, dtype=jnp.int32) - 4}
    new, metrics = jax.jit(agent.update)(state, batch)
    for k in ("value/loss", "critic/loss", "high_actor/loss", "low_actor/loss", "total/loss"):
        assert np.isfinite(float(metrics[k])), k
    total = sum(float(metrics[k]) for k in ("value/loss", "critic/loss", "high_actor/loss", "low_actor/loss"))
    assert float(metrics["total/loss"]) == pytest.approx(total, rel=1e-5)
    assert float(metrics["critic/success_rate"]) == pytest.approx(4 / 16)  # d in 0..3 of -4..11
    leaves = lambda t: jax.tree_util.tree_leaves(eqx.filter(t, eqx.is_inexact_array))  # noqa: E731
    for old_t, new_t, new_q in zip(leaves(state.target_critic), leaves(new.target_critic), leaves(new.nets.critic)):
        np.testing.assert_allclose(np.asarray(new_t), 0.75 * np.asarray(old_t) + 0.25 * np.asarray(new_q),
                                   rtol=1e-5, atol=1e-7)
    for part in ("high_actor", "low_actor", "critic", "value"):
        before, after = leaves(getattr(state.nets, part)), leaves(getattr(new.nets, part))
        assert any(not np.allclose(x, y) for x, y in zip(before, after)), part
    assert int(new.step) == 1


def test_bad_values_and_goalless_data_are_config_errors():
    with pytest.raises(ConfigError, match="SHARSA.n"):
        _agent_n0 = SHARSA(critic=QCritic, n=0)  # noqa: F841
    with pytest.raises(ConfigError, match="SHARSA.q_agg"):
        SHARSA(critic=QCritic, q_agg="max")
    with pytest.raises(ConfigError, match="SHARSA.value_loss"):
        SHARSA(critic=QCritic, value_loss="expectile")
    with pytest.raises(ConfigError, match="OGBenchDataset.task_mode"):
        _agent().init(Spec(ob_dim=3, act_dim=2, goal_dim=0, chunk_len=N), 0)
    _agent().check_config(32)  # a goal-conditioned abstract build passes
