"""Chunked, goal-relabelled batch sampling on a hand-built OGBench compact dataset (DESIGN §2.1).

Every observation encodes its own global index (dimension 0) and trajectory id (dimension 1), and every
action encodes the index it was taken at, so any sampled array can be traced back to dataset indices.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from macfw.data.batches import (
    VALUE_GOAL_P_CUR,
    VALUE_GOAL_P_RAND,
    VALUE_GOAL_P_TRAJ,
    Scaler,
    sample_batch,
    trajectory_ends,
    valid_starts,
)
from macfw.data.ogbench_data import OGBenchDataset

# Observations per trajectory; 3 is too short for a chunk of 3 (needs t + n <= end).
LENGTHS = [9, 3, 14, 6, 25, 4, 11, 30, 17, 8]
N = sum(LENGTHS)
BATCH = 4096
NUM_BATCHES = 4


def _traj_ids():
    return np.repeat(np.arange(len(LENGTHS)), LENGTHS)


def _first_index():
    return np.repeat(np.cumsum([0] + LENGTHS[:-1]), LENGTHS)


def _last_index():
    return np.repeat(np.cumsum(LENGTHS) - 1, LENGTHS)


def _dataset(with_oracle=False, with_rewards=False, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.arange(N, dtype=np.float32)
    tid = _traj_ids().astype(np.float32)
    obs = np.stack([idx, tid, rng.normal(size=N).astype(np.float32)], axis=1)
    act = np.stack([(idx + 0.5) / N * 2 - 1, (tid + 0.5) / len(LENGTHS) * 2 - 1], axis=1).astype(np.float32)
    terminals = np.zeros(N, np.float32)
    terminals[np.cumsum(LENGTHS) - 1] = 1.0
    d = {"observations": obs, "actions": act, "terminals": terminals, "valids": 1.0 - terminals}
    if with_oracle:
        d["oracle_reps"] = np.stack([idx * 2.0 + 1.0, -tid], axis=1).astype(np.float32)
    if with_rewards:
        solved = rng.random(N) < 0.15
        d["rewards"] = np.where(solved, 0.0, -1.0).astype(np.float32) + rng.normal(size=N).astype(np.float32) * 0.1
        d["masks"] = np.where(solved, 0.0, 1.0).astype(np.float32)
    return d


def _decode_obs(x, scaler):
    return np.rint(np.asarray(scaler.inverse(np.asarray(x)))[..., 0]).astype(int)


def _decode_action(a):
    return np.rint((np.asarray(a)[..., 0] + 1) / 2 * N - 0.5).astype(int)


def _batches(loaded, n, gamma, goal_conditioned):
    fn = jax.jit(
        functools.partial(sample_batch, batch_size=BATCH, chunk_len=n, gamma=gamma, goal_conditioned=goal_conditioned)
    )
    out = [jax.device_get(fn(loaded.data, jax.random.PRNGKey(i))) for i in range(NUM_BATCHES)]
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


# ---------------------------------------------------------------------------------- small helpers
def test_trajectory_ends_tiny():
    valids = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0], np.float32)
    np.testing.assert_array_equal(trajectory_ends(valids), [2, 2, 2, 4, 4, 8, 8, 8, 8])
    # a last trajectory cut off without its final flag ends at the last index
    np.testing.assert_array_equal(trajectory_ends(np.array([1, 0, 1, 1])), [1, 1, 3, 3])


def test_valid_starts_tiny():
    ends = trajectory_ends(np.array([1, 1, 0, 1, 0, 1, 1, 1, 0], np.float32))
    np.testing.assert_array_equal(valid_starts(ends, 2), [0, 5, 6])
    np.testing.assert_array_equal(valid_starts(ends, 1), [0, 1, 3, 5, 6, 7])
    np.testing.assert_array_equal(valid_starts(ends, 3), [5])
    with pytest.raises(ValueError):
        valid_starts(ends, 4)  # the longest trajectory has 4 observations: a chunk of 4 needs 5


def test_prepare_raises_when_every_trajectory_is_too_short():
    d = _dataset()
    with pytest.raises(ValueError):
        OGBenchDataset(task_mode="goal").prepare(d, d, max(LENGTHS))


# ---------------------------------------------------------------------------------- goal-conditioned
@pytest.fixture(scope="module", params=["goal", "oraclerep"])
def goal_batches(request):
    mode = request.param
    n, gamma = 3, 0.8
    d = _dataset(with_oracle=mode == "oraclerep")
    loaded = OGBenchDataset(task_mode=mode, scale_with="train").prepare(d, d, n)
    assert loaded.spec.ob_dim == 3 and loaded.spec.act_dim == 2 and loaded.spec.chunk_len == n
    assert loaded.spec.goal_dim == (2 if mode == "oraclerep" else 3)
    b = _batches(loaded, n, gamma, goal_conditioned=True)
    goal_scaler = loaded.goal_scaler
    if mode == "oraclerep":
        assert goal_scaler is not None
        decode_goal = lambda x: np.rint((np.asarray(goal_scaler.inverse(np.asarray(x)))[..., 0] - 1.0) / 2.0).astype(
            int
        )
    else:
        decode_goal = lambda x: _decode_obs(x, goal_scaler)
    return dict(b=b, n=n, loaded=loaded, decode_goal=decode_goal, mode=mode)


def test_chunk_lies_in_one_trajectory(goal_batches):
    b, n, loaded = goal_batches["b"], goal_batches["n"], goal_batches["loaded"]
    tid, last = _traj_ids(), _last_index()
    t = b["idx"]
    assert t.shape == (BATCH * NUM_BATCHES,)
    assert np.all(t + n <= last[t])
    np.testing.assert_array_equal(_decode_obs(b["obs"], loaded.obs_scaler), t)
    np.testing.assert_array_equal(_decode_obs(b["next_obs"], loaded.obs_scaler), t + n)
    a_idx = _decode_action(b["actions"].reshape(len(t), n, -1))
    np.testing.assert_array_equal(a_idx, t[:, None] + np.arange(n)[None, :])
    assert np.all(tid[a_idx] == tid[t][:, None])
    assert np.all(tid[t + n] == tid[t])
    # trajectories too short for a chunk are never sampled, every valid start is
    assert not np.any(np.isin(t, np.where(tid == 1)[0]))
    assert set(t.tolist()) == set(np.where(np.arange(N) + n <= last)[0].tolist())


def test_value_goals_relabelling(goal_batches):
    b, decode_goal = goal_batches["b"], goal_batches["decode_goal"]
    tid, first, last = _traj_ids(), _first_index(), _last_index()
    t, vg = b["idx"], b["value_goal_idx"]
    np.testing.assert_array_equal(decode_goal(b["value_goals"]), vg)
    assert np.all((vg >= 0) & (vg < N))
    total = len(t)
    # expected frequencies: a random goal is uniform over the N states
    in_future = (vg >= t) & (vg <= last[t])  # current state or a later state of the same trajectory
    p_future = VALUE_GOAL_P_CUR + VALUE_GOAL_P_TRAJ + VALUE_GOAL_P_RAND * np.mean((last[t] - t + 1) / N)
    p_past = VALUE_GOAL_P_RAND * np.mean((t - first[t]) / N)  # only random goals land before t
    past = (tid[vg] == tid[t]) & (vg < t)
    tol = lambda p: 5 * np.sqrt(p * (1 - p) / total) + 2e-3
    assert abs(in_future.mean() - p_future) < tol(p_future), (in_future.mean(), p_future)
    assert abs(past.mean() - p_past) < tol(p_past), (past.mean(), p_past)
    # the current state is drawn with p 0.2 (+ a random hit); 'later' excludes t itself
    p_cur = VALUE_GOAL_P_CUR + VALUE_GOAL_P_RAND / N
    assert abs(np.mean(vg == t) - p_cur) < tol(p_cur)
    # 'later' goals cover the whole rest of the trajectory, including its final observation
    assert np.any(vg == last[t])


def test_actor_goals_geometric_within_trajectory(goal_batches):
    b, decode_goal = goal_batches["b"], goal_batches["decode_goal"]
    tid, first, last = _traj_ids(), _first_index(), _last_index()
    t = b["idx"]
    ag = decode_goal(b["actor_goals"])
    total = len(t)
    tol = lambda p: 5 * np.sqrt(p * (1 - p) / total) + 2e-3
    # geometric offsets are >= 1 and clipped to the trajectory end; random goals are uniform
    in_future = (ag > t) & (ag <= last[t])
    p_future = 0.5 + 0.5 * np.mean((last[t] - t) / N)
    past = (tid[ag] == tid[t]) & (ag <= t)
    p_past = 0.5 * np.mean((t - first[t] + 1) / N)
    assert abs(in_future.mean() - p_future) < tol(p_future), (in_future.mean(), p_future)
    assert abs(past.mean() - p_past) < tol(p_past), (past.mean(), p_past)
    # offset 1 has probability (1 - gamma) = 0.2 within the geometric half
    p_next = 0.5 * 0.2 + 0.5 / N
    assert abs(np.mean(ag == t + 1) - p_next) < tol(p_next)


def test_success_reward_mask(goal_batches):
    b, n = goal_batches["b"], goal_batches["n"]
    t, vg = b["idx"], b["value_goal_idx"]
    success = ((vg >= t) & (vg < t + n)).astype(np.float32)
    np.testing.assert_array_equal(b["success"], success)
    np.testing.assert_array_equal(b["rewards"], success - 1.0)
    np.testing.assert_array_equal(b["masks"], 1.0 - success)
    assert 0.2 < success.mean() < 0.6  # both labels occur


def test_actor_goal_gamma_one_is_trajectory_end():
    # gamma = 1: the geometric goal is the final observation of the trajectory
    n = 2
    d = _dataset()
    loaded = OGBenchDataset(task_mode="goal", scale_with="train").prepare(d, d, n)
    fn = jax.jit(functools.partial(sample_batch, batch_size=BATCH, chunk_len=n, gamma=1.0, goal_conditioned=True))
    b = jax.device_get(fn(loaded.data, jax.random.PRNGKey(7)))
    t = b["idx"]
    ag = _decode_obs(b["actor_goals"], loaded.goal_scaler)
    frac_end = np.mean(ag == _last_index()[t])
    assert 0.45 < frac_end < 0.56


# ---------------------------------------------------------------------------------- single-task
def test_singletask_chunk_reward_and_success():
    n, gamma = 4, 0.9
    d = _dataset(with_rewards=True, seed=3)
    loaded = OGBenchDataset(task_mode="singletask", scale_with="train").prepare(d, d, n)
    assert loaded.spec.goal_dim == 0 and loaded.goal_scaler is None
    fn = jax.jit(functools.partial(sample_batch, batch_size=BATCH, chunk_len=n, gamma=gamma, goal_conditioned=False))
    b = jax.device_get(fn(loaded.data, jax.random.PRNGKey(1)))
    t = b["idx"]
    assert np.all(t + n <= _last_index()[t])
    np.testing.assert_array_equal(_decode_obs(b["obs"], loaded.obs_scaler), t)
    assert b["value_goals"].shape == (BATCH, 0) and b["actor_goals"].shape == (BATCH, 0)
    r, m = d["rewards"], d["masks"]
    expected_r = np.array([sum(gamma**i * r[ti + i] for i in range(n)) / n for ti in t])
    np.testing.assert_allclose(b["rewards"], expected_r, rtol=1e-5, atol=1e-6)
    expected_s = np.array([float(np.any(m[ti : ti + n] == 0)) for ti in t])
    np.testing.assert_array_equal(b["success"], expected_s)
    assert 0.1 < expected_s.mean() < 0.9
    np.testing.assert_array_equal(b["masks"], np.ones(BATCH))
    # without normalisation the reward is the plain discounted sum
    fn2 = jax.jit(
        functools.partial(
            sample_batch, batch_size=BATCH, chunk_len=n, gamma=gamma, goal_conditioned=False, normalize_reward=False
        )
    )
    b2 = jax.device_get(fn2(loaded.data, jax.random.PRNGKey(1)))
    np.testing.assert_array_equal(b2["idx"], t)
    np.testing.assert_allclose(b2["rewards"], expected_r * n, rtol=1e-5, atol=1e-5)


def test_singletask_masks_ones_is_the_authors_loader():
    """``singletask_masks='ones'``: every mask 1, so no chunk is a success (the authors' loader); the
    rewards and the sampled indices are those of OGBench's semantics (``'ogbench'``)."""
    n, gamma = 4, 0.9
    d = _dataset(with_rewards=True, seed=3)
    fn = jax.jit(functools.partial(sample_batch, batch_size=BATCH, chunk_len=n, gamma=gamma, goal_conditioned=False))
    out = {}
    for masks in ("ogbench", "ones"):
        loaded = OGBenchDataset(task_mode="singletask", scale_with="train", singletask_masks=masks).prepare(d, d, n)
        out[masks] = jax.device_get(fn(loaded.data, jax.random.PRNGKey(1)))
    ones, ogb = out["ones"], out["ogbench"]
    np.testing.assert_array_equal(ones["idx"], ogb["idx"])
    np.testing.assert_array_equal(ones["rewards"], ogb["rewards"])
    assert ogb["success"].mean() > 0.1  # OGBench's masks mark solved steps
    np.testing.assert_array_equal(ones["success"], np.zeros(BATCH))
    np.testing.assert_array_equal(ones["masks"], np.ones(BATCH))
    with pytest.raises(ValueError, match=r"OGBenchDataset\.singletask_masks = 'none' is out of range"):
        OGBenchDataset(singletask_masks="none")


def test_actions_clipped_and_observations_scaled():
    d = _dataset()
    d["actions"] = d["actions"].copy()
    d["actions"][0, 0] = 1.5
    d["actions"][1, 0] = -1.0
    loaded = OGBenchDataset(task_mode="goal", scale_with="train").prepare(d, d, 3)
    a = np.asarray(loaded.data.actions)
    assert a[0, 0] == pytest.approx(1 - 1e-5) and a[1, 0] == pytest.approx(-1 + 1e-5)
    o = np.asarray(loaded.data.observations)
    half = (d["observations"].max(axis=0) - d["observations"].min(axis=0)) / 2
    np.testing.assert_allclose(o.min(axis=0), -half / (half + 1e-3), rtol=1e-5)
    np.testing.assert_allclose(o.max(axis=0), half / (half + 1e-3), rtol=1e-5)


def test_scaler_round_trip():
    x = np.array([[1.0, -4.0], [3.0, 6.0], [2.0, 2.0]], np.float32)
    sc = Scaler.fit(x)
    y = np.asarray(sc(x))
    # the authors' normalize: (x - mid) / (half-range + 1e-3); half-ranges 1 and 5
    np.testing.assert_allclose(y, [[-1 / 1.001, -5 / 5.001], [1 / 1.001, 5 / 5.001], [0.0, 1 / 5.001]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sc.inverse(y)), x, atol=1e-5)
    sc2 = Scaler.from_dict(sc.to_dict())
    np.testing.assert_allclose(np.asarray(sc2(x)), y)


def test_scaler_constant_dimension_maps_to_zero():
    x = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]], np.float32)
    sc = Scaler.fit(x)
    y = np.asarray(sc(x))
    np.testing.assert_allclose(y[:, 0], [-1 / 1.001, 1 / 1.001, 0.0], rtol=1e-6)
    np.testing.assert_allclose(y[:, 1], 0.0, atol=1e-6)  # 0 on the data; off it (x - lo) / 1e-3, as the authors'
    np.testing.assert_allclose(np.asarray(sc(np.array([[2.0, 5.5]], np.float32)))[0, 1], 500.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sc.inverse(y)), x, atol=1e-5)
