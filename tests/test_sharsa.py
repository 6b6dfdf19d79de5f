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

from macfw.agents.sharsa import SHARSA, SHARSANetworks, dataset_subgoals, high_actor_targets, sarsa_targets
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
        reward = gamma**steps * success
        out.append((steps, success, reward, reward + gamma**steps * (1.0 - success) * v))
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
    assert out["targets"][3] == pytest.approx(GAMMA**N * 0.6)


def _hgc_high_actor_index(idx, ag_idx, final_idx, n):
    """The authors' HGCDataset high_actor_actions index (compute_high_next_idxs), per example."""
    out = []
    for t, j, end in zip(idx, ag_idx, final_idx):
        steps = min(n, end - t)
        if 0 <= j - t < steps:
            steps = j - t
        out.append(t + steps)
    return np.array(out)


def test_high_actor_target_is_the_actor_goal_where_it_lies_within_n_steps():
    """Parity (issue 29) found macfw's high-level flow always regressing s_{t+n}'s goal; the authors'
    target is the goal representation at t + min(n, d): the actor goal itself when 0 <= d < n."""
    reps = np.arange(200, dtype=np.float32)[:, None] * np.array([[1.0, -0.5]], np.float32)  # goal of each index
    idx = np.array([10, 10, 10, 10, 10, 10, 50])
    ag_idx = np.array([10, 11, 13, 14, 40, 3, 120])  # d = 0, 1, n-1, n, far, before t, random far
    final = idx + 60
    want = reps[_hgc_high_actor_index(idx, ag_idx, final, N)]
    got = high_actor_targets(
        jnp.asarray(idx), jnp.asarray(ag_idx), jnp.asarray(reps[ag_idx]), jnp.asarray(reps[idx + N]), N
    )
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.any(want != reps[idx + N])  # the old target (always s_{t+n}'s goal) differs on these inputs


def test_batches_carry_the_actor_goal_index():
    from macfw.bench import synthetic_data
    from macfw.data.batches import sample_batch

    spec = Spec(ob_dim=3, act_dim=2, goal_dim=2, chunk_len=N)
    data = synthetic_data(spec, num_episodes=4, episode_length=30)
    b = sample_batch(data, jax.random.PRNGKey(0), 64, chunk_len=N, gamma=0.7, goal_conditioned=True)  # short offsets
    np.testing.assert_array_equal(np.asarray(data.goals[b["actor_goal_idx"]]), np.asarray(b["actor_goals"]))
    d = np.asarray(b["actor_goal_idx"] - b["idx"])
    assert np.any((d >= 0) & (d < N)) and np.any(d >= N)


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
    return SHARSA(
        high_actor=flow,
        low_actor=flow,
        value=functools.partial(StateValue, **small),
        critic=functools.partial(Ensemble, member=functools.partial(QCritic, **small), num=2),
        n=N,
        gamma=GAMMA,
        **kw,
    )


def test_value_target_is_min_of_target_heads_at_the_dataset_subgoal_and_critic_uses_v_of_s_t_plus_n():
    agent = _agent(q_agg="min")
    agent.spec = Spec(ob_dim=2, act_dim=1, goal_dim=2, chunk_len=N)
    B = 5
    rng = np.random.default_rng(0)
    batch = {
        k: jnp.asarray(rng.normal(size=(B, 2)), jnp.float32)
        for k in ("obs", "next_obs", "value_goals", "actor_goals", "next_goals")
    }
    batch["idx"] = jnp.array([0, 0, 0, 0, 0])
    batch["value_goal_idx"] = jnp.array([0, 2, 4, 9, -3])  # reached, reached, not, not, not
    batch["actor_goal_idx"] = jnp.array([7, 1, 3, 4, 0])  # not, within, within, not (d = n), within
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
    want = success * GAMMA**steps + GAMMA**steps * (1 - success) * next_v
    np.testing.assert_allclose(np.asarray(tg["targets"]), want, rtol=1e-5)
    within = np.array([False, True, True, False, True])
    np.testing.assert_array_equal(
        np.asarray(tg["high_targets"]), np.where(within[:, None], b["actor_goals"], b["next_goals"]).astype(np.float32)
    )

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
    q1, q2 = w0 + 0.1, 1.0 - w0**2 + 0.3
    best = int(np.argmax(np.minimum(q1, q2)))
    assert best != int(np.argmax(q1)) and best != int(np.argmax(q2)) and best != int(np.argmax(q1 + q2)), (
        "the hand-made heads must make min-Q pick a different candidate than any other rule"
    )
    nets = SHARSANetworks(high_actor=_Candidates(jnp.asarray(rows)), low_actor=_Echo(2), critic=_Critic(), value=None)
    w, cands, q = agent.select_subgoal(nets, s, g, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(q), np.minimum(q1, q2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w), rows[best])
    a = np.asarray(agent.act(nets, s, g, key=jax.random.PRNGKey(1)))
    assert a.shape == (1, 2)
    np.testing.assert_allclose(a[0], 0.5 * rows[best, :2], rtol=1e-6)


def _update_batch(B, key):
    ks = jax.random.split(key, 6)
    return {
        "obs": jax.random.normal(ks[0], (B, 3)),
        "next_obs": jax.random.normal(ks[1], (B, 3)),
        "actions": jax.random.uniform(ks[2], (B, N * 2), minval=-1, maxval=1),
        "value_goals": jax.random.normal(ks[3], (B, 2)),
        "actor_goals": jax.random.normal(ks[4], (B, 2)),
        "next_goals": jax.random.normal(ks[5], (B, 2)),
        "idx": jnp.zeros(B, jnp.int32),
        "value_goal_idx": jnp.arange(B, dtype=jnp.int32) - 4,
        "actor_goal_idx": jnp.arange(B, dtype=jnp.int32)[::-1] - 6,
    }


def test_update_trains_every_part_and_moves_the_target_critic_by_tau():
    agent = _agent(tau=0.25)
    spec = Spec(ob_dim=3, act_dim=2, goal_dim=2, chunk_len=N)
    state = agent.init(spec, 0)
    state = eqx.tree_at(
        lambda st: st.target_critic, state, jax.tree_util.tree_map(lambda x: 0.5 * x, state.target_critic)
    )  # target != critic
    B = 16
    batch = _update_batch(B, jax.random.PRNGKey(1))
    new, metrics = jax.jit(agent.update)(state, batch)
    for k in ("value/loss", "critic/loss", "high_actor/loss", "low_actor/loss", "total/loss"):
        assert np.isfinite(float(metrics[k])), k
    total = sum(float(metrics[k]) for k in ("value/loss", "critic/loss", "high_actor/loss", "low_actor/loss"))
    assert float(metrics["total/loss"]) == pytest.approx(total, rel=1e-5)
    assert float(metrics["critic/success_rate"]) == pytest.approx(4 / 16)  # d in 0..3 of -4..11
    # the authors' metrics: V as probabilities (mean, max, min), the TD targets (mean, max, min)
    assert 0.0 < float(metrics["value/v_min"]) <= float(metrics["value/v_mean"]) <= float(metrics["value/v_max"]) < 1.0
    assert (
        float(metrics["critic/target_min"])
        <= float(metrics["critic/target_mean"])
        <= float(metrics["critic/target_max"])
    )
    # the EMA reads the critic BEFORE this step (the authors' target_update reads self.network, the
    # pre-update parameters); parity found macfw reading the updated critic
    leaves = lambda t: jax.tree_util.tree_leaves(eqx.filter(t, eqx.is_inexact_array))  # noqa: E731
    moved = False
    for old_t, new_t, old_q, new_q in zip(
        leaves(state.target_critic), leaves(new.target_critic), leaves(state.nets.critic), leaves(new.nets.critic)
    ):
        np.testing.assert_allclose(
            np.asarray(new_t), 0.75 * np.asarray(old_t) + 0.25 * np.asarray(old_q), rtol=1e-5, atol=1e-7
        )
        moved |= bool(np.abs(np.asarray(new_q) - np.asarray(old_q)).max() > 1e-4)
    assert moved
    for part in ("high_actor", "low_actor", "critic", "value"):
        before, after = leaves(getattr(state.nets, part)), leaves(getattr(new.nets, part))
        assert any(not np.allclose(x, y) for x, y in zip(before, after)), part
    assert int(new.step) == 1


def test_flow_losses_use_the_given_draws_and_the_high_level_targets():
    """The flow-matching losses from batch-level draws (the authors' x_0 (B, d), t (B, 1)): the high
    flow regresses ``high_targets`` with the actor goals as its goal input, the low flow the first
    action with the subgoal ``next_goals``; written out per example with the networks' velocities."""
    agent = _agent()
    spec = Spec(ob_dim=3, act_dim=2, goal_dim=2, chunk_len=N)
    state = agent.init(spec, 0)
    B = 8
    batch = _update_batch(B, jax.random.PRNGKey(2))
    noise = agent.noise(jax.random.PRNGKey(3), B)
    assert {k: v.shape for k, v in noise.items()} == {"z_high": (B, 2), "u_high": (B,), "z_low": (B, 2), "u_low": (B,)}
    tg = agent.targets(state.nets, state.target_critic, batch)
    _, m = agent.loss(state.nets, batch, tg, noise)
    hi, lo = state.nets.high_actor, state.nets.low_actor

    def fm(policy, s, g, x1, z, u):
        x = (1 - u) * z + u * x1
        return float(jnp.mean((policy.velocity(s, g, x, u) - (x1 - z)) ** 2))

    n = {k: np.asarray(v) for k, v in noise.items()}
    b = {k: np.asarray(v) for k, v in batch.items()}
    w = np.asarray(tg["high_targets"])
    want_hi = np.mean(
        [fm(hi, b["obs"][i], b["actor_goals"][i], w[i], n["z_high"][i], n["u_high"][i]) for i in range(B)]
    )
    want_lo = np.mean(
        [fm(lo, b["obs"][i], b["next_goals"][i], b["actions"][i, :2], n["z_low"][i], n["u_low"][i]) for i in range(B)]
    )
    assert float(m["high_actor/loss"]) == pytest.approx(want_hi, rel=1e-5)
    assert float(m["low_actor/loss"]) == pytest.approx(want_lo, rel=1e-5)
    old = np.mean(
        [fm(hi, b["obs"][i], b["actor_goals"][i], b["next_goals"][i], n["z_high"][i], n["u_high"][i]) for i in range(B)]
    )
    assert abs(old - want_hi) > 1e-3  # the old target (next_goals everywhere) gives another loss here
    # update(noise=...) uses the given draws; without, it draws them from the state's key
    _, m1 = agent.update(state, batch, noise)
    _, m2 = agent.update(state, batch)
    assert float(m1["high_actor/loss"]) == pytest.approx(want_hi, rel=1e-5)
    assert float(m2["high_actor/loss"]) != pytest.approx(want_hi, rel=1e-5)


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
