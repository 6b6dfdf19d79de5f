"""FMPC's defining equations (macfw/agents/fmpc.py; DESIGN §9), on hand-made data.

The dataset is OGBench's compact layout built by hand: every observation encodes its own global index
(dimension 0) and trajectory id (dimension 1), and every action the index it was taken at, so what the
agent feeds its networks can be traced back to dataset indices (as tests/test_batches.py does).
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.agents.fmpc import FMPC, FMPCNetworks, FutureFlow, critic_target, goal_later_label
from macfw.data.batches import sample_for
from macfw.data.ogbench_data import OGBenchDataset
from macfw.errors import ConfigError
from macfw.nn.flow import FlowPolicy
from macfw.nn.models import QCritic, StateValue
from macfw.spec import Spec

L = 32  # the authors' future length
LENGTHS = [40, 33, 50, 20, 34, 71, 45]  # observations per trajectory (20 is too short for a 32-step window)
N = sum(LENGTHS)
GAMMA = 0.97
BATCH = 512
TINY = (8,)


def _dataset(seed=0):
    rng = np.random.default_rng(seed)
    idx = np.arange(N, dtype=np.float32)
    tid = np.repeat(np.arange(len(LENGTHS)), LENGTHS).astype(np.float32)
    obs = np.stack([idx, tid, rng.normal(size=N).astype(np.float32)], axis=1)
    act = np.stack([(idx + 0.5) / N * 2 - 1, rng.uniform(-0.9, 0.9, size=N)], axis=1).astype(np.float32)
    terminals = np.zeros(N, np.float32)
    terminals[np.cumsum(LENGTHS) - 1] = 1.0
    solved = rng.random(N) < 0.2
    return {
        "observations": obs,
        "actions": act,
        "terminals": terminals,
        "valids": 1.0 - terminals,
        "oracle_reps": np.stack([idx * 2.0 + 1.0, -tid], axis=1).astype(np.float32),
        "rewards": np.where(solved, 0.0, -1.0).astype(np.float32) + rng.normal(size=N).astype(np.float32) * 0.1,
        "masks": np.where(solved, 0.0, 1.0).astype(np.float32),
    }


def _last_index():
    return np.repeat(np.cumsum(LENGTHS) - 1, LENGTHS)


def _agent(**kw):
    return FMPC(
        model=functools.partial(FutureFlow, hidden_dims=TINY, flow_steps=3),
        policy=functools.partial(FlowPolicy, hidden_dims=TINY, flow_steps=3, distill=False),
        critic=functools.partial(QCritic, hidden_dims=TINY),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        value=functools.partial(StateValue, hidden_dims=TINY),
        gamma=GAMMA,
        **kw,
    )


@functools.cache
def _setup(mode):
    d = _dataset()
    agent = _agent(future_len=L)
    bs = agent.batch_spec
    loaded = OGBenchDataset(task_mode=mode, scale_with="train").prepare(d, d, bs.chunk_len, bs.window)
    state = agent.init(loaded.spec, jax.random.PRNGKey(0))
    sample = jax.jit(lambda k: sample_for(bs, loaded.data, k, BATCH, goal_conditioned=mode != "singletask"))
    batch = jax.device_get(sample(jax.random.PRNGKey(1)))
    return d, agent, loaded, state, batch


def _decode(x, scaler):
    return np.rint(np.asarray(scaler.inverse(np.asarray(x)))[..., 0]).astype(int)


class _SpyModel(eqx.Module):
    """A 'future model' whose loss is the largest deviation of its training target from the dataset's
    flattened s_{t+1..t+L} (and of its action from a_t), with t decoded from the state it is given."""

    table: jax.Array  # (N, ob_dim) scaled observations
    actions: jax.Array  # (N, act_dim)
    mid: float = eqx.field(static=True)  # the scaler's inverse on dimension 0: x = y * half + mid
    half: float = eqx.field(static=True)

    def flow_loss(self, s, a, X, z, u):
        t = jnp.rint(s[0] * self.half + self.mid).astype(jnp.int32)
        want = jax.lax.dynamic_slice_in_dim(self.table, t + 1, L, axis=0).reshape(-1)
        err_x = jnp.max(jnp.abs(X - want))
        err_a = jnp.max(jnp.abs(a - self.actions[t]))
        return err_x + err_a, {"dynamics/loss": err_x, "dynamics/action_err": err_a}


# ---------------------------------------------------------------------------------- the future target
@pytest.mark.parametrize("mode", ["singletask", "oraclerep"])
def test_future_model_target_is_the_flattened_next_32_states(mode):
    d, agent, loaded, state, batch = _setup(mode)
    assert agent.batch_spec.future_len == L and agent.batch_spec.chunk_len == L
    sc = loaded.obs_scaler
    t = batch["idx"]
    assert np.all(t + L <= _last_index()[t])  # the window lies in s_t's trajectory
    inp = jax.device_get(agent.training_inputs(batch))
    assert inp["future"].shape == (BATCH, L * loaded.spec.ob_dim)
    fut = inp["future"].reshape(BATCH, L, -1)
    np.testing.assert_array_equal(_decode(fut, sc), t[:, None] + 1 + np.arange(L)[None, :])
    obs = np.asarray(sc(d["observations"]))
    np.testing.assert_array_equal(inp["future"], obs[t[:, None] + 1 + np.arange(L)].reshape(BATCH, -1))
    np.testing.assert_array_equal(_decode(inp["last"], sc), t + L)
    np.testing.assert_array_equal(inp["action"], np.clip(d["actions"], -1 + 1e-5, 1 - 1e-5)[t])

    # ... and it is what the model is trained on inside the update
    acts = np.clip(d["actions"], -1 + 1e-5, 1 - 1e-5)
    spy = _SpyModel(
        table=jnp.asarray(obs),
        actions=jnp.asarray(acts),
        mid=float((sc.lo[0] + sc.hi[0]) / 2.0),
        half=float((sc.hi[0] - sc.lo[0]) / 2.0),
    )
    spied = FMPC(
        model=lambda spec, *, key, future_len: spy,
        policy=agent.factories["policy"],
        critic=agent.factories["critic"],
        value=agent.factories["value"],
        gamma=GAMMA,
        future_len=L,
    )
    assert spied.batch_spec == agent.batch_spec
    _, metrics = jax.jit(spied.update)(spied.init(loaded.spec, jax.random.PRNGKey(0)), batch)
    assert float(metrics["dynamics/loss"]) == 0.0 and float(metrics["dynamics/action_err"]) == 0.0


def test_update_is_finite_on_both_kinds_of_data():
    for mode in ("singletask", "oraclerep"):
        _, agent, _, state, batch = _setup(mode)
        new, metrics = jax.jit(agent.update)(state, batch)
        assert int(new.step) == 1
        for k in ("dynamics/loss", "flow/loss", "value/loss", "critic/loss", "total/loss"):
            assert np.isfinite(float(metrics[k])), (mode, k)


# ---------------------------------------------------------------------------------- window rewards and labels
def test_singletask_window_reward_and_mask():
    d, agent, loaded, _, batch = _setup("singletask")
    inp = jax.device_get(agent.training_inputs(batch))
    t = batch["idx"]
    disc = GAMMA ** np.arange(L)
    want = np.array([np.sum(d["rewards"][i : i + L] * disc) for i in t]) / L  # the authors' mean over the window
    np.testing.assert_allclose(inp["reward"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(inp["mask"], 1.0)


def test_goal_window_reward_mask_and_value_label():
    _, agent, _, _, batch = _setup("oraclerep")
    t, vg = batch["idx"], batch["value_goal_idx"]
    inp = jax.device_get(agent.training_inputs(batch))
    c = ((vg >= t) & (vg < t + L)).astype(np.float32)
    np.testing.assert_array_equal(inp["reward"], c)
    np.testing.assert_array_equal(inp["mask"], 1.0 - c)
    assert 0.1 < c.mean() < 0.9
    # with the trajectory end: exactly "the goal is s_t or a later state of its trajectory"
    exact = ((vg >= t) & (vg <= _last_index()[t])).astype(np.float32)
    with_end = jax.device_get(agent.training_inputs(dict(batch, traj_end=_last_index()[t])))
    np.testing.assert_array_equal(with_end["value_label"], exact)
    assert 0.0 < exact.mean() < 1.0
    # the loop's batches carry traj_end: their labels are the exact ones
    np.testing.assert_array_equal(np.asarray(batch["traj_end"]), _last_index()[t])
    np.testing.assert_array_equal(inp["value_label"], exact)


def test_goal_later_label_tiny():
    idx = jnp.array([5, 5, 5, 5, 5])
    vg = jnp.array([4, 5, 9, 10, 11])
    np.testing.assert_array_equal(goal_later_label(idx, vg, jnp.full(5, 10)), [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(goal_later_label(idx, vg), [0, 1, 1, 1, 1])


# ---------------------------------------------------------------------------------- the critic target
class _LinearValue(eqx.Module):
    w: jax.Array
    u: jax.Array
    b: float

    def __call__(self, s, g):
        return jnp.dot(self.w, s) + (jnp.dot(self.u, g) if g.shape[0] else 0.0) + self.b


def test_critic_target_equation_tiny():
    r, m, v = np.array([0.0, 1.0, -0.3, 0.5]), np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.5, 0.9, 2.0, 0.8])
    np.testing.assert_allclose(
        critic_target(jnp.asarray(r), jnp.asarray(m), jnp.asarray(v), gamma=0.9, future_len=3),
        r + 0.729 * m * v,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        critic_target(jnp.asarray(r), jnp.asarray(m), jnp.asarray(v), gamma=0.9, future_len=3, clip01=True),
        np.clip(r + 0.729 * m * v, 0.0, 1.0),
        rtol=1e-6,
    )


@pytest.mark.parametrize("goal_dim,value_loss", [(0, "bce"), (2, "bce"), (2, "mse")])
def test_targets_bootstrap_v_at_the_window_end(goal_dim, value_loss):
    gamma, Lt = 0.9, 3
    agent = FMPC(future_len=Lt, gamma=gamma, value_loss=value_loss)
    agent.spec = Spec(ob_dim=2, act_dim=1, goal_dim=goal_dim, chunk_len=Lt)
    V = _LinearValue(w=jnp.array([0.5, -1.0]), u=jnp.array([0.25, 2.0])[:goal_dim], b=0.1)
    V_target = _LinearValue(w=jnp.array([-0.2, 0.3]), u=jnp.array([1.0, -1.0])[:goal_dim], b=-0.4)
    s0 = np.array([[9.0, 9.0], [9.0, -9.0], [-9.0, 9.0]], np.float32)  # s_t: must not be bootstrapped
    last = np.array([[0.2, -0.4], [1.0, 0.5], [-0.6, 0.1]], np.float32)  # s_{t+L}
    g = np.array([[0.3, -0.2], [0.0, 0.1], [-0.5, 0.4]], np.float32)[:, :goal_dim]
    r = np.array([0.0, 1.0, 0.0] if goal_dim else [-0.7, -0.1, 0.0], np.float32)
    m = 1.0 - r if goal_dim else np.ones(3, np.float32)
    inputs = {
        "obs": jnp.asarray(s0),
        "last": jnp.asarray(last),
        "value_goals": jnp.asarray(g),
        "reward": jnp.asarray(r),
        "mask": jnp.asarray(m),
        "value_label": jnp.array([1.0, 0.0, 1.0]),
    }
    nets = FMPCNetworks(model=None, policy=None, critic=None, value=V)
    out = jax.device_get(agent.targets(nets, V_target, inputs))

    def lin(v, x, gg):
        return x @ np.asarray(v.w) + (gg @ np.asarray(v.u) if goal_dim else 0.0) + v.b

    v_next = lin(V, last, g)
    if goal_dim and value_loss == "bce":
        want_q = np.clip(r + gamma**Lt * m / (1 + np.exp(-v_next)), 0.0, 1.0)
    else:
        want_q = r + gamma**Lt * m * v_next
    np.testing.assert_allclose(out["q"], want_q, rtol=1e-5)
    if goal_dim:
        np.testing.assert_array_equal(out["v"], [1.0, 0.0, 1.0])
    else:
        np.testing.assert_allclose(out["v"], r + gamma**Lt * lin(V_target, last, g), rtol=1e-5)


# ---------------------------------------------------------------------------------- acting
class _LinearCritic(eqx.Module):
    c: jax.Array
    d: jax.Array

    def __call__(self, X, g, a):
        return jnp.dot(self.c, X) + jnp.dot(self.d, a)


def test_act_returns_the_candidate_of_highest_q():
    Lt = 4
    agent = _agent(future_len=Lt, num_samples=64)
    spec = Spec(ob_dim=3, act_dim=2, goal_dim=2, chunk_len=Lt)
    state = agent.init(spec, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    critic = _LinearCritic(c=jnp.asarray(rng.normal(size=Lt * 3), jnp.float32), d=jnp.array([3.0, -2.0]))
    nets = eqx.tree_at(lambda n: n.critic, state.nets, critic)
    s, g = jnp.array([0.1, -0.5, 0.3]), jnp.array([0.2, 0.7])
    act = jax.jit(lambda k: agent.act(nets, s, g, key=k))
    cands = jax.jit(lambda k: agent.candidates(nets, s, g, key=k))
    picked = []
    for i in range(8):
        k = jax.random.PRNGKey(100 + i)
        actions, futures = map(np.asarray, cands(k))
        assert actions.shape == (64, 2) and futures.shape == (64, Lt * 3)
        assert np.all(np.abs(actions) <= 1.0)
        q = futures @ np.asarray(critic.c) + actions @ np.asarray(critic.d)
        best = int(np.argmax(q))
        picked.append(best)
        a = np.asarray(act(k))
        assert a.shape == (1, 2)
        np.testing.assert_array_equal(a[0], actions[best])
        assert q[best] > np.median(q)
    assert len(set(picked)) > 1  # not a fixed index


def test_bad_bindings_name_themselves():
    kw: dict[str, Any]
    for kw, name in (
        (dict(future_len=0), "FMPC.future_len"),
        (dict(num_samples=0), "FMPC.num_samples"),
        (dict(value_loss="squared"), "FMPC.value_loss"),
        (dict(gamma=1.0), "FMPC.gamma"),
    ):
        with pytest.raises(ConfigError, match=name):
            FMPC(**kw)
    with pytest.raises(ConfigError, match="FutureFlow.flow_steps"):
        FutureFlow(Spec(ob_dim=2, act_dim=1, goal_dim=0, chunk_len=1), key=jax.random.PRNGKey(0), flow_steps=0)


# ---------------------------------------------------------------------------------- draws passed in (parity, issue 29)
def test_update_takes_its_draws_as_an_argument():
    """``update(state, batch, noise)`` uses exactly the given batch-level draws (the parity harness
    hands the same arrays to the authors' code): the flow-matching losses and target-velocity norms
    are the defining formulas on that noise, and the same noise gives the same step."""
    _, agent, _, state, batch = _setup("oraclerep")
    B = batch["obs"].shape[0]
    noise = agent.draw_noise(jax.random.PRNGKey(5), B)
    assert agent.spec is not None
    assert {k: v.shape for k, v in noise.items()} == {
        "model_z": (B, L * agent.spec.ob_dim),
        "model_u": (B,),
        "policy_z": (B, agent.spec.act_dim),
        "policy_u": (B,),
    }
    step = jax.jit(agent.update)
    new, m = step(state, batch, noise)
    new2, m2 = step(state, batch, noise)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(new.nets), jax.tree_util.tree_leaves(new2.nets))
    )
    inp = agent.training_inputs(batch)
    nets = state.nets
    z, u, X = noise["model_z"], noise["model_u"], inp["future"]
    x = (1 - u[:, None]) * z + u[:, None] * X
    v = jax.vmap(nets.model.velocity)(inp["obs"], inp["action"], x, u)
    np.testing.assert_allclose(float(m["dynamics/loss"]), float(jnp.mean((v - (X - z)) ** 2)), rtol=1e-5)
    np.testing.assert_allclose(float(m["dynamics/vel"]), float(jnp.linalg.norm(X - z, axis=-1).mean()), rtol=1e-5)
    z, u, A = noise["policy_z"], noise["policy_u"], inp["action"]
    x = (1 - u[:, None]) * z + u[:, None] * A
    v = jax.vmap(nets.policy.velocity)(inp["obs"], inp["actor_goals"], x, u)
    np.testing.assert_allclose(float(m["flow/loss"]), float(jnp.mean((v - (A - z)) ** 2)), rtol=1e-5)
    np.testing.assert_allclose(float(m["flow/vel"]), float(jnp.linalg.norm(A - z, axis=-1).mean()), rtol=1e-5)
    other, _ = step(state, batch, agent.draw_noise(jax.random.PRNGKey(6), B))
    assert not np.allclose(
        np.asarray(other.nets.model.field.layers[0].weight), np.asarray(new.nets.model.field.layers[0].weight)
    )


def test_a_distilled_policy_is_refused():
    """FMPC trains its policy by flow matching alone and samples it by solving the ODE (the authors'):
    a FlowPolicy with a one-step network would never be trained, so it is refused by name."""
    agent = FMPC(
        policy=functools.partial(FlowPolicy, hidden_dims=TINY, distill=True),
        model=functools.partial(FutureFlow, hidden_dims=TINY),
        critic=functools.partial(QCritic, hidden_dims=TINY),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        value=functools.partial(StateValue, hidden_dims=TINY),
        future_len=4,
    )
    with pytest.raises(ConfigError, match=r"FMPC\.policy"):
        agent.init(Spec(ob_dim=3, act_dim=2, goal_dim=0, chunk_len=4), jax.random.PRNGKey(0))
    assert (
        FMPC(
            model=functools.partial(FutureFlow, hidden_dims=TINY),
            critic=functools.partial(QCritic, hidden_dims=TINY),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
            value=functools.partial(StateValue, hidden_dims=TINY),
            future_len=4,
        )
        .init(Spec(ob_dim=3, act_dim=2, goal_dim=0, chunk_len=4), jax.random.PRNGKey(0))
        .nets.policy.one_step
        is None
    )
