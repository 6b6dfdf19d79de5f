"""n-step SAC+BC (macfw.agents.nstep_sacbc): the n-step goal reward and mask from the batch indices,
the clipped n-step target (through the agent, with stub critics whose outputs are known), the
scale-normalised BC term of the actor, and one update on single actions. Expected values are
computed independently with numpy from the defining equations (the authors' ngcsacbc.py and
HGCDataset)."""

from __future__ import annotations

import equinox as eqx
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.agents.nstep_sacbc import NStepSACBC, nstep_goal_reward, nstep_target, sacbc_actor_loss
from macfw.data.batches import ChunkData, sample_batch, trajectory_ends, valid_starts
from macfw.errors import ConfigError
from macfw.nn.actors import TanhGaussianActor
from macfw.nn.ensemble import Ensemble
from macfw.nn.models import QCritic
from macfw.spec import Spec

GAMMA, N = 0.999, 25
OB, ACT, GOAL = 4, 3, 2


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _agent(**kw):
    critic = lambda spec, *, key: Ensemble(
        spec,
        key=key,
        member=lambda s, *, key: QCritic(s, key=key, hidden_dims=(8,)),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        num=2,
    )
    actor = lambda spec, *, key: TanhGaussianActor(spec, key=key, hidden_dims=(8,), final_init_scale=0.01)
    return NStepSACBC(actor=actor, critic=critic, n=kw.pop("n", N), gamma=GAMMA, **kw)


def _init(agent, **spec):
    """``agent.init`` for a Spec of these sizes, jitted (it also sets ``agent.spec``)."""
    spec = Spec(ob_dim=OB, act_dim=ACT, **spec)
    return eqx.filter_jit(lambda k: agent.init(spec, k))(jax.random.PRNGKey(0))


def _target(agent, state, stub, batch):
    """``agent.target_q`` with a stub target critic, jitted (one compilation instead of eager dispatch)."""
    eps = jax.random.normal(jax.random.PRNGKey(1), (batch["obs"].shape[0], ACT))
    return np.asarray(jax.jit(lambda nets, b, e: agent.target_q(nets, stub, b, e))(state.nets, batch, eps))


# ------------------------------------------------------------------ the n-step goal reward and mask
def test_goal_reward_and_mask_inside_and_outside_the_window():
    idx = np.array([100, 100, 100, 100, 100, 100, 100])
    vg = np.array([100, 102, 124, 125, 99, 900, 0])  # k = 0, 2, n-1 inside; n, -1, far, before: outside
    k = vg - idx
    inside = (k >= 0) & (k < N)
    want_r = np.where(inside, GAMMA ** np.where(inside, k, 0).astype(np.float64), 0.0)
    r, m, c = nstep_goal_reward(jnp.asarray(idx), jnp.asarray(vg), N, GAMMA)
    np.testing.assert_array_equal(np.asarray(c), inside.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(m), 1.0 - inside.astype(np.float32))
    np.testing.assert_allclose(np.asarray(r), want_r, rtol=1e-6)
    assert np.asarray(r)[0] == 1.0 and np.asarray(r)[3] == 0.0


def test_goal_reward_agrees_with_the_batch_success_label():
    """The index arithmetic matches the sampler's own label (value goal in [t, t+n)) on real batches."""
    rng = np.random.default_rng(0)
    T, E, n = 40, 3, 7
    valids = np.ones(T * E, np.float32)
    valids[T - 1 :: T] = 0.0
    ends = trajectory_ends(valids)
    data = ChunkData(
        observations=jnp.asarray(rng.uniform(-1, 1, (T * E, OB)), jnp.float32),
        actions=jnp.asarray(rng.uniform(-1, 1, (T * E, ACT)), jnp.float32),
        goals=jnp.asarray(rng.uniform(-1, 1, (T * E, GOAL)), jnp.float32),
        rewards=jnp.zeros(T * E),
        masks=jnp.ones(T * E),
        traj_end=jnp.asarray(ends),
        starts=jnp.asarray(valid_starts(ends, n)),
    )
    b, c = jax.jit(
        lambda d, k: (lambda b: (b, nstep_goal_reward(b["idx"], b["value_goal_idx"], n, GAMMA)[2]))(
            sample_batch(d, k, 4096, chunk_len=n, gamma=GAMMA, goal_conditioned=True, normalize_reward=False)
        )
    )(data, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(b["success"]))
    assert 0.2 < float(np.mean(np.asarray(c))) < 0.6  # p_cur 0.2 plus some near trajectory goals


# ------------------------------------------------------------------ the clipped n-step target
def test_nstep_target_and_clipping():
    r = np.array([0.0, 0.0, 0.0, GAMMA**3, 0.9])
    m = np.array([1.0, 1.0, 1.0, 0.0, 1.0])
    q = np.array([0.5, 1.5, -0.3, 0.99, 0.8])
    raw = r + GAMMA**N * m * q
    got = np.asarray(nstep_target(jnp.asarray(r), jnp.asarray(m), jnp.asarray(q), GAMMA, N))
    np.testing.assert_allclose(got, np.clip(raw, 0.0, 1.0), rtol=1e-6)
    assert got[1] == 1.0 and got[2] == 0.0 and got[4] == 1.0  # 0.9 + 0.975 * 0.8 > 1 clipped
    unclipped = nstep_target(r, m, q, GAMMA, N, clip=None)  # pyright: ignore[reportArgumentType]  (numpy in: plain arithmetic)
    np.testing.assert_allclose(np.asarray(unclipped), raw, rtol=1e-6)


def _batch(goal_dim, idx, vg, rewards=None):
    B = len(idx)
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    return {
        "obs": jax.random.uniform(k[0], (B, OB), minval=-1, maxval=1),
        "next_obs": jax.random.uniform(k[1], (B, OB), minval=-1, maxval=1),
        "actions": jax.random.uniform(k[2], (B, N * ACT), minval=-1, maxval=1),
        "value_goals": jax.random.uniform(k[3], (B, goal_dim), minval=-1, maxval=1),
        "actor_goals": jax.random.uniform(k[3], (B, goal_dim), minval=-1, maxval=1),
        "idx": jnp.asarray(idx),
        "value_goal_idx": jnp.asarray(vg),
        "rewards": jnp.asarray(rewards if rewards is not None else np.zeros(B), jnp.float32),
        "masks": jnp.ones(B),
    }


@pytest.mark.parametrize("q_agg", ["min", "mean"])
def test_agent_goal_target_is_sigmoid_then_agg_then_clipped(q_agg):
    agent = _agent(q_agg=q_agg)
    state = _init(agent, goal_dim=GOAL, chunk_len=N)
    logits = np.array([2.0, -1.0], np.float32)  # a stub target critic: the same two logits everywhere
    stub = lambda s, g, a: jnp.asarray(logits) + 0.0 * jnp.sum(a)
    idx = np.array([50, 50, 50, 50])
    vg = np.array([50, 60, 75, 10])  # k = 0, 10 inside; 25 (= n), -40 outside
    got = _target(agent, state, stub, _batch(GOAL, idx, vg))
    sig = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    q_next = sig.min() if q_agg == "min" else sig.mean()
    k = vg - idx
    inside = (k >= 0) & (k < N)
    want = np.clip(np.where(inside, GAMMA ** np.where(inside, k, 0), 0.0) + GAMMA**N * (~inside) * q_next, 0, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_agent_goal_target_clips_to_one():
    agent = _agent()
    state = _init(agent, goal_dim=GOAL, chunk_len=N)
    stub = lambda s, g, a: jnp.array([30.0, 30.0]) + 0.0 * jnp.sum(a)  # sigmoid ~ 1 -> gamma^n < 1, no clip
    np.testing.assert_allclose(_target(agent, state, stub, _batch(GOAL, [0], [500])), [GAMMA**N], rtol=1e-5)
    agent.value_loss = "mse"  # raw values (the authors' 'squared'): 30 * gamma^n clipped to 1
    np.testing.assert_allclose(_target(agent, state, stub, _batch(GOAL, [0], [500])), [1.0])


def test_agent_single_task_target_is_unclipped_nstep_reward():
    agent = _agent()
    state = _init(agent, goal_dim=0, chunk_len=N)
    stub = lambda s, g, a: jnp.array([-40.0, -30.0]) + 0.0 * jnp.sum(a)
    rewards = np.array([-25.0, -3.5, 0.0])
    got = _target(agent, state, stub, _batch(0, [0, 1, 2], [0, 1, 2], rewards))
    np.testing.assert_allclose(got, rewards + GAMMA**N * -40.0, rtol=1e-5)


# ------------------------------------------------------------------ the actor's BC term
def test_actor_bc_term_is_scaled_by_mean_abs_q():
    rng = np.random.default_rng(1)
    B = 6
    log_p = rng.normal(size=B)
    q = rng.normal(size=B) * 5.0
    a = rng.uniform(-1, 1, (B, ACT))
    a_data = rng.uniform(-1, 1, (B, ACT))
    alpha, lam = 0.1, 0.3
    want = np.mean(lam * log_p - q) + alpha * np.mean(np.sum((a - a_data) ** 2, axis=1)) * np.mean(np.abs(q))
    loss, m = sacbc_actor_loss(
        jnp.asarray(log_p), jnp.asarray(q), jnp.asarray(a), jnp.asarray(a_data), alpha, jnp.asarray(lam)
    )
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["actor/bc_scale"]), np.mean(np.abs(q)), rtol=1e-6)
    # scale invariance: with no entropy term, multiplying Q by c multiplies the whole loss by c
    f = lambda qq: sacbc_actor_loss(jnp.zeros(B), qq, jnp.asarray(a), jnp.asarray(a_data), alpha, jnp.asarray(0.0))[0]
    for c in (0.01, 7.0):
        np.testing.assert_allclose(float(f(jnp.asarray(c * q))), c * float(f(jnp.asarray(q))), rtol=1e-5)
    # the scale is a constant: the gradient in q is -1/B (nothing through mean|q|)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(jnp.asarray(q))), -np.ones(B) / B, rtol=1e-6)
    # the gradient in the actions is 2 alpha mean|q| (a - a_data) / B
    g = jax.grad(
        lambda aa: sacbc_actor_loss(jnp.zeros(B), jnp.asarray(q), aa, jnp.asarray(a_data), alpha, jnp.asarray(0.0))[0]
    )(jnp.asarray(a))
    np.testing.assert_allclose(np.asarray(g), 2 * alpha * np.mean(np.abs(q)) * (a - a_data) / B, rtol=1e-5)


# ------------------------------------------------------------------ the actor's distribution (parity, issue 29)
def test_actor_log_std_is_hard_clipped_as_the_authors_gcactor():
    """The authors' GCActor: ``log_std = clip(raw, -5, 2)`` (not a smooth tanh rescaling, which at raw 0
    gave log-std -1.5 instead of 0: the parity harness's first finding). The sample is ``tanh(mean +
    exp(log_std) eps)`` with distrax's tanh-Gaussian log-density."""
    spec = Spec(ob_dim=OB, act_dim=ACT, goal_dim=GOAL, chunk_len=1)
    actor = TanhGaussianActor(spec, key=jax.random.PRNGKey(0), hidden_dims=(8,), final_init_scale=0.01)
    assert actor.log_std_bound == "clip"
    raw = np.array([0.0, -7.0, 3.0], np.float32)  # inside, below, above [-5, 2]
    mean0 = np.array([0.2, -0.1, 0.4], np.float32)
    last = actor.net.layers[-1]
    actor = eqx.tree_at(
        lambda a: (a.net.layers[-1].weight, a.net.layers[-1].bias),
        actor,
        (jnp.zeros_like(last.weight), jnp.asarray(np.concatenate([mean0, raw]))),
    )
    s, g = jnp.ones(OB), jnp.ones(GOAL)
    mean, log_std = actor.mean_log_std(s, g)
    np.testing.assert_allclose(np.asarray(mean), mean0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(log_std), [0.0, -5.0, 2.0], rtol=1e-6)
    eps = np.array([0.3, -1.2, 0.7], np.float32)
    u = mean0 + np.exp([0.0, -5.0, 2.0]) * eps
    want_logp = np.sum(
        -0.5 * eps**2 - np.array([0.0, -5.0, 2.0]) - 0.5 * np.log(2 * np.pi) - np.log(1 - np.tanh(u) ** 2)
    )
    from macfw.nn.gaussian import squashed_sample

    a, logp = squashed_sample(mean, log_std, jnp.asarray(eps))
    np.testing.assert_allclose(np.asarray(a), np.tanh(u), rtol=1e-5)
    np.testing.assert_allclose(float(logp), want_logp, rtol=1e-4)


# ------------------------------------------------------------------ the agent end to end
@pytest.mark.parametrize("goal_dim", [GOAL, 0])
def test_update_uses_only_the_first_action_and_acts_with_one_action(goal_dim):
    n = 5
    agent = _agent(n=n)
    assert agent.batch_spec.chunk_len == n and not agent.batch_spec.normalize_reward and not agent.acts_in_chunks
    state = _init(agent, goal_dim=goal_dim, chunk_len=n)
    b = _batch(goal_dim, [3, 3, 3, 3], [3, 5, 9, 1000], rewards=[-1.0, -2.0, 0.0, -3.0])
    b["actions"] = b["actions"][:, : n * ACT].at[:, ACT:].set(jnp.nan)  # only a_t may be read
    new, metrics = jax.jit(agent.update)(state, b)
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert int(new.step) == 1
    assert {"critic/loss", "actor/loss", "temperature/loss", "total/loss"} <= set(metrics)
    leaves = jax.tree_util.tree_leaves(new.nets)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    a = agent.act(agent.acting_params(new), b["obs"][0], b["value_goals"][0], key=jax.random.PRNGKey(0))
    assert a.shape == (1, ACT)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(new.nets.actor.mode(b["obs"][0], b["value_goals"][0])))


def test_update_takes_its_draws_as_an_argument():
    """``update(state, batch, noise)`` samples the actor from exactly the given batch-level normals (the
    parity harness hands the same arrays to the authors' distrax sample): ``actor/mse`` and the entropy
    are the defining formulas on ``noise['actions']``, and the target uses ``noise['next_actions']``."""
    n = 5
    agent = _agent(n=n)
    state = _init(agent, goal_dim=GOAL, chunk_len=n)
    b = _batch(GOAL, [3, 3, 3, 3], [3, 5, 9, 1000])
    noise = agent.draw_noise(jax.random.PRNGKey(3), 4)
    assert {k: v.shape for k, v in noise.items()} == {"next_actions": (4, ACT), "actions": (4, ACT)}
    _, m = jax.jit(agent.update)(state, b, noise)
    actor = state.nets.actor
    mean, log_std = jax.vmap(actor.mean_log_std)(b["obs"], b["actor_goals"])
    u = np.asarray(mean) + np.exp(np.asarray(log_std)) * np.asarray(noise["actions"])
    a = np.tanh(u)
    np.testing.assert_allclose(
        float(m["actor/mse"]), np.mean(np.sum((a - b["actions"][:, :ACT]) ** 2, axis=1)), rtol=1e-5
    )
    logp = np.sum(
        -0.5 * np.asarray(noise["actions"]) ** 2
        - np.asarray(log_std)
        - 0.5 * np.log(2 * np.pi)
        - np.log(1 - np.tanh(u) ** 2),
        axis=1,
    )
    np.testing.assert_allclose(float(m["temperature/entropy"]), -np.mean(logp), rtol=1e-4)
    np.testing.assert_allclose(float(m["actor/std"]), np.exp(np.asarray(log_std)).mean(), rtol=1e-6)
    other = dict(noise, next_actions=noise["next_actions"] + 1.0)
    _, m2 = jax.jit(agent.update)(state, b, other)
    assert float(m2["actor/mse"]) == float(m["actor/mse"]) and float(m2["critic/target_mean"]) != float(
        m["critic/target_mean"]
    )


def test_target_critic_is_the_ema_of_the_critic_before_the_step():
    """The authors' ``target_update`` reads the pre-update critic: ``Q'_1 = (1 - tau) Q'_0 + tau Q_0``
    (parity, issue 29; the updated critic ``Q_1`` gave target biases ``tau`` times the first step's
    change where theirs stay 0)."""
    n, tau = 5, 0.1
    agent = _agent(n=n, tau=tau)
    state = _init(agent, goal_dim=GOAL, chunk_len=n)
    state = eqx.tree_at(
        lambda s: s.target_critic,
        state,
        jax.tree_util.tree_map(lambda x: x + 0.5 if eqx.is_inexact_array(x) else x, state.target_critic),
    )
    b = _batch(GOAL, [3, 3, 3, 3], [3, 5, 9, 1000])
    new, _ = jax.jit(agent.update)(state, b)
    leaves = lambda t: jax.tree_util.tree_leaves(eqx.filter(t, eqx.is_inexact_array))
    for q0, t0, _q1, t1 in zip(
        leaves(state.nets.critic), leaves(state.target_critic), leaves(new.nets.critic), leaves(new.target_critic)
    ):
        np.testing.assert_allclose(
            np.asarray(t1), (1 - tau) * np.asarray(t0) + tau * np.asarray(q0), rtol=1e-6, atol=1e-7
        )
    assert any(
        not np.allclose(np.asarray(a), np.asarray(c))
        for a, c in zip(leaves(state.nets.critic), leaves(new.nets.critic))
    )


def test_bad_bindings_name_themselves():
    with pytest.raises(ConfigError, match=r"NStepSACBC\.n"):
        _agent(n=0)
    with pytest.raises(ConfigError, match=r"NStepSACBC\.q_agg"):
        _agent(q_agg="max")
    with pytest.raises(ConfigError, match=r"NStepSACBC\.value_loss"):
        _agent(value_loss="huber")
    with pytest.raises(ConfigError, match=r"NStepSACBC\.critic"):
        NStepSACBC(critic=None)
