"""GCIQL (macfw.agents.gciql): the defining equations on tiny hand-made inputs, computed
independently with numpy, and the gradient routing (the actor's loss never moves the critic).

Hand-made networks: linear value ``V(s, g) = w . [s, g]``, linear critics
``Q_j(s, g, a) = c_j . [s, g, a]`` (k = 2) and a linear actor ``mu(s, g) = W [s, g]``, so every
expected number is a few lines of numpy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import equinox as eqx
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.agents.gciql import (
    GCIQL,
    ClippedMeanActor,
    GCIQLNetworks,
    actor_outputs,
    batched_heads,
    critic_target,
    ddpg_bc_loss,
    value_loss,
)
from macfw.errors import ConfigError
from macfw.nn.ensemble import Ensemble
from macfw.nn.models import QCritic, StateValue
from macfw.spec import Spec

REPO = Path(__file__).resolve().parents[1]
GAMMA = 0.9
ALPHA = 0.7
KAPPA = 0.9


# ------------------------------------------------------------------------------ hand-made nets
class LinV(eqx.Module):
    w: jax.Array

    def __call__(self, s, g):
        return jnp.dot(self.w, jnp.concatenate([s, g]))


class LinQ(eqx.Module):
    """Two linear critics at once: ``(k,)`` outputs, like an Ensemble of two."""

    c: jax.Array  # (k, ob + goal + act)
    b: float = 0.0

    def __call__(self, s, g, a):
        return self.c @ jnp.concatenate([s, g, a]) + self.b


class LinActor(eqx.Module):
    W: jax.Array  # (act, ob + goal)

    def mean(self, s, g):
        return self.W @ jnp.concatenate([s, g])

    def __call__(self, s, g):
        return jnp.clip(self.mean(s, g), -1.0, 1.0)


OBS = np.array([[0.5, -1.0], [1.0, 2.0], [-0.5, 0.3]], np.float32)
NEXT = np.array([[0.2, 0.1], [-1.0, 0.5], [0.8, -0.6]], np.float32)
ACT = np.array([[0.3], [-0.8], [0.9]], np.float32)
VG = np.array([[1.0], [0.0], [-2.0]], np.float32)
AG = np.array([[-1.0], [0.5], [2.0]], np.float32)
REW = np.array([-1.0, 0.0, -1.0], np.float32)
SUCC = np.array([0.0, 1.0, 0.0], np.float32)
W_V = np.array([0.4, -0.2, 0.5], np.float32)
C_Q = np.array([[0.3, 0.1, -0.2, 0.6], [-0.1, 0.4, 0.2, -0.5]], np.float32)
C_TQ = np.array([[1.0, -0.5, 0.2, 0.3], [0.2, 0.2, -0.6, 1.1]], np.float32)
W_PI = np.array([[0.8, -0.3, 0.9]], np.float32)


def _batch():
    return {
        k: jnp.asarray(v)
        for k, v in dict(
            obs=OBS,
            next_obs=NEXT,
            actions=ACT,
            value_goals=VG,
            actor_goals=AG,
            rewards=REW,
            success=SUCC,
            masks=1.0 - SUCC,
        ).items()
    }


def _agent_and_nets():
    agent = GCIQL(critic=QCritic, gamma=GAMMA, expectile=KAPPA, alpha=ALPHA)
    agent.spec = Spec(ob_dim=2, act_dim=1, goal_dim=1, chunk_len=1)
    nets = GCIQLNetworks(value=LinV(jnp.asarray(W_V)), critic=LinQ(jnp.asarray(C_Q)), actor=LinActor(jnp.asarray(W_PI)))
    return agent, nets, LinQ(jnp.asarray(C_TQ))


def _np_expectile(pred, target, kappa):
    out = []
    for p, t in zip(pred, target):
        w = kappa if t > p else 1.0 - kappa
        out.append(w * (t - p) ** 2)
    return float(np.mean(out))


# ------------------------------------------------------------------------------ the value loss
def test_value_loss_function_is_the_expectile_against_min_of_target_qs():
    v = np.array([-1.0, 0.5, 2.0, 0.0], np.float32)
    tq = np.array([[0.0, 1.0], [0.2, -0.4], [3.0, 2.5], [-1.0, -1.0]], np.float32)
    want = _np_expectile(v, tq.min(axis=1), KAPPA)
    # by hand: min q = (0, -0.4, 2.5, -1); diffs q - v = (1, -0.9, 0.5, -1)
    # weights (0.9, 0.1, 0.9, 0.1) -> (0.9 + 0.081 + 0.225 + 0.1) / 4
    assert want == pytest.approx((0.9 + 0.081 + 0.225 + 0.1) / 4, rel=1e-6)
    got, m = value_loss(jnp.asarray(v), jnp.asarray(tq), KAPPA)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(m["value/loss"]) == pytest.approx(want, rel=1e-5)


def test_agent_value_part_uses_target_critics_on_data_actions_and_value_goals():
    agent, nets, target = _agent_and_nets()
    x = np.concatenate([OBS, VG], 1)
    v = x @ W_V
    tq = np.concatenate([OBS, VG, ACT], 1) @ C_TQ.T  # (B, 2), the TARGET critics
    want = _np_expectile(v, tq.min(axis=1), KAPPA)
    got, _ = agent.value_part(nets, target, _batch())
    assert float(got) == pytest.approx(want, rel=1e-5)
    # with the online critics instead the answer differs (the test can tell them apart)
    q_online = np.concatenate([OBS, VG, ACT], 1) @ C_Q.T
    assert abs(_np_expectile(v, q_online.min(axis=1), KAPPA) - want) > 1e-2


# ------------------------------------------------------------------------------ the Q target
def test_critic_target_function():
    y = critic_target(jnp.asarray(REW), jnp.asarray(1.0 - SUCC), jnp.array([2.0, 5.0, -3.0]), GAMMA)
    np.testing.assert_allclose(np.asarray(y), [-1.0 + 0.9 * 2.0, 0.0, -1.0 + 0.9 * -3.0], rtol=1e-6)


def test_agent_critic_part_regresses_both_qs_to_r_plus_gamma_m_v_next():
    agent, nets, target = _agent_and_nets()
    next_v = np.concatenate([NEXT, VG], 1) @ W_V  # current V at s' with the value goal
    y = REW + GAMMA * (1.0 - SUCC) * next_v  # success 1 -> no bootstrap
    q = np.concatenate([OBS, VG, ACT], 1) @ C_Q.T  # (B, 2)
    want = float(np.mean(((q - y[:, None]) ** 2).sum(axis=1)))
    got, m = agent.critic_part(nets, _batch())
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(m["critic/target_mean"]) == pytest.approx(float(y.mean()), rel=1e-5, abs=1e-6)
    # the masks come from success, not from the batch's "masks" (single-task batches hold 1 there)
    b = dict(_batch(), masks=jnp.ones(3))
    assert float(agent.critic_part(nets, b)[0]) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------ the actor loss
def _np_actor(W=W_PI, C=C_Q, alpha=ALPHA, b=0.0):
    x = np.concatenate([OBS, AG], 1)  # the ACTOR goals
    mu = x @ W.T  # unclipped mean, (B, 1)
    a = np.clip(mu, -1.0, 1.0)
    q = (np.concatenate([OBS, AG, a], 1) @ C.T + b).min(axis=1)
    q_loss = -q.mean() / (np.abs(q).mean() + 1e-6)
    # -alpha log N(a; mu, I): the squared error plus the Gaussian's constant (the authors' bc_loss)
    bc = alpha * np.mean(0.5 * ((mu - ACT) ** 2).sum(axis=1) + 0.5 * mu.shape[1] * np.log(2 * np.pi))
    return q_loss + bc, q_loss, bc, mu, q


def test_ddpg_bc_function_on_hand_made_inputs():
    q_pi = np.array([[-2.0, -3.0], [1.0, 4.0], [-0.5, 0.5]], np.float32)  # min: (-3, 1, -0.5)
    bc_out = np.array([[0.5, 1.5], [0.0, 0.0], [-1.0, 2.0]], np.float32)
    acts = np.array([[0.0, 1.0], [0.0, -1.0], [1.0, 1.0]], np.float32)
    # -mean(q)/mean|q| = -(-2.5/3)/(4.5/3) = 2.5/4.5 ; bc = -a * mean(log N(a; mu, I))
    #   = a * (mean(0.5 * (0.5, 1, 5)) + 0.5 * 2 * log(2 pi))   (d = 2)
    log2pi = np.log(2 * np.pi)
    bc = 2.0 * (0.5 * (0.5 + 1.0 + 5.0) / 3 + log2pi)
    want = 2.5 / 4.5 + bc
    got, m = ddpg_bc_loss(jnp.asarray(q_pi), jnp.asarray(bc_out), jnp.asarray(acts), 2.0)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(m["actor/q_abs_mean"]) == pytest.approx(1.5, rel=1e-6)
    # the authors' metrics: bc_loss with the Gaussian's constant (parity found it missing: the loss and
    # bc_loss were 2 log(2 pi) = 3.68 lower here), its log-likelihood, the mse per dimension, std 1
    assert float(m["actor/bc_loss"]) == pytest.approx(bc, rel=1e-5)
    assert float(m["actor/loss"]) == pytest.approx(want, rel=1e-5)
    assert float(m["actor/bc_log_prob"]) == pytest.approx(-bc / 2.0, rel=1e-5)
    assert float(m["actor/mse"]) == pytest.approx((0.5 + 1.0 + 5.0) / 6, rel=1e-6)
    assert float(m["actor/std"]) == 1.0


def test_agent_actor_part_ddpg_bc_with_abs_q_normalisation():
    agent, nets, _ = _agent_and_nets()
    want, q_loss, bc, mu, _ = _np_actor()
    assert np.any(np.abs(mu) > 1.0) and np.any(np.abs(mu) < 1.0)  # the clip is exercised both ways
    got, m = agent.actor_part(nets, _batch())
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(m["actor/q_loss"]) == pytest.approx(q_loss, rel=1e-5)
    assert float(m["actor/bc_loss"]) == pytest.approx(bc, rel=1e-5)


def test_abs_q_normaliser_is_a_constant_in_the_actor_gradient():
    """With every Q < 0, -mean(q)/mean|q| is identically 1, so only a stop-gradient normaliser leaves
    a Q-term gradient: -(1 / mean|q|) d mean(q)/dW, computed here by hand."""
    C = np.array([[-2.0, -1.0, -0.5, 0.6], [-2.5, -1.5, -0.2, 0.9]], np.float32)  # with bias -10: all Q < 0
    agent, nets, _ = _agent_and_nets()
    nets = dataclasses.replace(nets, critic=LinQ(jnp.asarray(C), -10.0))
    agent.alpha = 0.0
    _, _, _, mu, q = _np_actor(C=C, alpha=0.0, b=-10.0)
    assert np.all(q < 0)
    x = np.concatenate([OBS, AG], 1)
    a = np.clip(mu, -1.0, 1.0)
    qs = np.concatenate([OBS, AG, a], 1) @ C.T - 10.0
    j = qs.argmin(axis=1)
    inside = (np.abs(mu[:, 0]) < 1.0).astype(np.float32)  # the clip passes no gradient outside
    dq_dW = (C[j, -1] * inside)[:, None] * x  # (B, ob + goal)
    want = -(dq_dW.mean(axis=0)) / np.abs(q).mean()
    grads = jax.grad(lambda n: agent.actor_part(n, _batch())[0])(nets)
    np.testing.assert_allclose(np.asarray(grads.actor.W)[0], want, rtol=1e-4, atol=1e-6)
    assert np.abs(want).max() > 1e-2


def test_actor_loss_does_not_move_the_critic_or_the_value():
    agent, nets, target = _agent_and_nets()
    g = jax.grad(lambda n: agent.actor_part(n, _batch())[0])(nets)
    assert np.all(np.asarray(g.critic.c) == 0.0) and np.all(np.asarray(g.value.w) == 0.0)
    assert np.abs(np.asarray(g.actor.W)).max() > 1e-3
    # and the whole loss gives the critic exactly its own loss's gradient; V gets only the value loss's
    g_all = jax.grad(lambda n: agent.loss(n, target, _batch())[0])(nets)
    g_q = jax.grad(lambda n: agent.critic_part(n, _batch())[0])(nets)
    g_v = jax.grad(lambda n: agent.value_part(n, target, _batch())[0])(nets)
    np.testing.assert_allclose(np.asarray(g_all.critic.c), np.asarray(g_q.critic.c), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_all.value.w), np.asarray(g_v.value.w), rtol=1e-6)
    assert np.all(np.asarray(g_q.value.w) == 0.0)  # V(s') is a stop-gradient target
    assert np.all(np.asarray(g_v.critic.c) == 0.0)  # the value loss reads the target critics


# ------------------------------------------------------------------------------ real networks
def _real_batch(spec, B, key):
    ks = jax.random.split(key, 6)
    succ = (jax.random.uniform(ks[5], (B,)) < 0.3).astype(jnp.float32)
    return dict(
        obs=jax.random.normal(ks[0], (B, spec.ob_dim)),
        next_obs=jax.random.normal(ks[1], (B, spec.ob_dim)),
        actions=jax.random.uniform(ks[2], (B, spec.act_dim), minval=-1, maxval=1),
        value_goals=jax.random.normal(ks[3], (B, spec.goal_dim)),
        actor_goals=jax.random.normal(ks[4], (B, spec.goal_dim)),
        rewards=succ - 1.0,
        success=succ,
        masks=1.0 - succ,
    )


def _real_agent():
    return GCIQL(
        value=lambda spec, key: StateValue(spec, key=key, hidden_dims=(8, 8)),
        critic=lambda spec, key: Ensemble(
            spec,
            key=key,
            num=2,
            member=lambda sp, key: QCritic(sp, key=key, hidden_dims=(8, 8)),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        ),
        actor=lambda spec, key: ClippedMeanActor(spec, key=key, hidden_dims=(8, 8)),
        tau=0.1,
    )


@pytest.mark.parametrize("goal_dim", [3, 0], ids=["goal-conditioned", "single-task"])
def test_update_steps_and_the_target_critic_is_an_ema(goal_dim):
    agent = _real_agent()
    spec = Spec(ob_dim=4, act_dim=2, goal_dim=goal_dim, chunk_len=1)

    # compiled: eager execution of tiny networks is slower than compiling them. (Building the networks
    # in the same program as their gradients gave NaN gradients under tests/conftest.py's XLA flags,
    # --xla_backend_optimization_level=0, so init is a program of its own, as in the training loop.)
    state = eqx.filter_jit(agent.init)(spec, 0)

    @eqx.filter_jit
    def run(state, key):
        batch = _real_batch(spec, 16, key)
        params, static = eqx.partition(state.nets, eqx.is_inexact_array)
        g = jax.grad(lambda p: agent.actor_part(eqx.combine(p, static), batch)[0])(params)
        new, metrics = agent.update(state, batch)
        a = agent.act(new.nets, batch["obs"][0], batch["actor_goals"][0], key=key)
        return new, metrics, g, a

    new, metrics, g, a = run(state, jax.random.PRNGKey(1))
    # the real actor's loss leaves the real critics and value untouched too
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves((g.critic, g.value)))
    assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(g.actor)) > 0.0
    assert int(new.step) == 1
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert {"value/loss", "critic/loss", "actor/loss", "total/loss"} <= set(metrics)
    # the EMA reads the critics BEFORE this step, as the authors' target_update does (it reads
    # self.network, the pre-update parameters); parity found macfw reading the updated critics
    state2 = dataclasses.replace(state, target_critic=jax.tree_util.tree_map(lambda x: 0.5 * x, state.target_critic))
    new2, _, _, _ = run(state2, jax.random.PRNGKey(1))
    moved = False
    for t_new, t_old, c_old, c_new in zip(
        jax.tree_util.tree_leaves(new2.target_critic),
        jax.tree_util.tree_leaves(state2.target_critic),
        jax.tree_util.tree_leaves(state2.nets.critic),
        jax.tree_util.tree_leaves(new2.nets.critic),
    ):
        np.testing.assert_allclose(
            np.asarray(t_new), 0.9 * np.asarray(t_old) + 0.1 * np.asarray(c_old), rtol=1e-5, atol=1e-7
        )
        moved |= bool(np.abs(np.asarray(c_new) - np.asarray(c_old)).max() > 1e-4)  # Adam: about lr
    assert moved  # the update moved the critics, so the two orders give different targets
    assert a.shape == (1, 2) and float(jnp.abs(a).max()) <= 1.0


def test_fast_forms_compute_the_plain_ones():
    """batched_heads (an ensemble members-outer) is vmap over examples; ClippedMeanActor.outputs (one
    network pass) is (actor(s, g), actor.mean(s, g)); values and gradients alike."""
    spec = Spec(ob_dim=4, act_dim=2, goal_dim=3, chunk_len=1)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    ens = Ensemble(spec, key=k1, num=2, member=lambda sp, key: QCritic(sp, key=key, hidden_dims=(8, 8)))  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
    b = _real_batch(spec, 16, k2)
    f_fast = lambda e: batched_heads(e, b["obs"], b["value_goals"], b["actions"])  # noqa: E731
    f_plain = lambda e: jax.vmap(e)(b["obs"], b["value_goals"], b["actions"])  # noqa: E731
    assert f_fast(ens).shape == (16, 2)
    np.testing.assert_allclose(np.asarray(f_fast(ens)), np.asarray(f_plain(ens)), rtol=1e-6, atol=1e-6)
    g1 = jax.grad(lambda e: jnp.sum(jnp.sin(f_fast(e))))(ens)
    g2 = jax.grad(lambda e: jnp.sum(jnp.sin(f_plain(e))))(ens)
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    one = QCritic(spec, key=k3, hidden_dims=(8,))  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
    np.testing.assert_allclose(
        np.asarray(batched_heads(one, b["obs"], b["value_goals"], b["actions"])),
        np.asarray(jax.vmap(one)(b["obs"], b["value_goals"], b["actions"])),
        rtol=1e-6,
    )
    actor = ClippedMeanActor(spec, key=k3, hidden_dims=(8,), final_init_scale=30.0)  # large outputs: the clip acts
    a, mu = jax.vmap(lambda s, g: actor_outputs(actor, s, g))(b["obs"], b["actor_goals"])
    assert float(jnp.abs(mu).max()) > 1.0
    np.testing.assert_array_equal(np.asarray(a), np.asarray(jax.vmap(actor)(b["obs"], b["actor_goals"])))
    np.testing.assert_array_equal(np.asarray(mu), np.asarray(jax.vmap(actor.mean)(b["obs"], b["actor_goals"])))


def test_bad_values_raise_config_errors_naming_the_binding():
    with pytest.raises(ConfigError, match=r"GCIQL\.expectile"):
        GCIQL(critic=QCritic, expectile=1.0)
    with pytest.raises(ConfigError, match=r"GCIQL\.alpha"):
        GCIQL(critic=QCritic, alpha=-1.0)
    with pytest.raises(ConfigError, match=r"GCIQL\.gamma"):
        GCIQL(critic=QCritic, gamma=1.0)
    with pytest.raises(ConfigError, match=r"GCIQL\.critic"):
        GCIQL()
    with pytest.raises(ConfigError, match=r"ClippedMeanActor\.final_init_scale"):
        ClippedMeanActor(
            Spec(ob_dim=1, act_dim=1, goal_dim=0, chunk_len=1),
            key=jax.random.PRNGKey(0),
            hidden_dims=(2,),
            final_init_scale=0.0,
        )


def test_gin_file_holds_the_authors_defaults():
    import macfw.run

    gin.clear_config()
    try:
        macfw.run.parse_gin([str(REPO / "gin" / "baselines" / "gciql.gin")], [])
        q = gin.query_parameter
        assert q("train.agent").selector == "GCIQL"
        assert q("OGBenchDataset.task_mode") == "oraclerep"
        assert (q("%GAMMA"), q("GCIQL.expectile"), q("GCIQL.alpha"), q("GCIQL.tau")) == (0.999, 0.9, 1.0, 0.005)
        assert q("GCIQL.learning_rate") == 3e-4 and q("train.batch_size") == 1024
        assert q("critic/Ensemble.num") == 2
        agent = GCIQL()  # a registered class is Gin-configurable: the file's bindings apply
        assert agent.batch_spec.chunk_len == 1 and agent.gamma == 0.999 and agent.batch_spec.gamma == 0.999
    finally:
        gin.clear_config()
