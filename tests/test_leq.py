"""LEQ (macfw.agents.leq): the lambda-return recursion and the expectile weighting on tiny hand-made
rollouts, checked against numbers computed by hand and an independent numpy formula (the
lambda-weighted average of k-step returns); and the actor's gradient: the per-step action gradients
agree with finite differences through the model, the actor loss moves only the actor, and its
gradient reaches the actor through the dynamics model when the critic and reward ignore the action.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.agents.leq import LEQ, LEQActor, critic_objective, expectile_weights, leq_lambda_returns
from macfw.errors import ConfigError
from macfw.nn.ensemble import Ensemble
from macfw.nn.models import GaussianDynamics, QCritic, RewardModel, SuccessModel
from macfw.spec import Spec


# ------------------------------------------------------------------------------ independent reference
def nstep_average(r, m, q, gamma, lam):
    """``Q^lam_t = sum_k lam^k G^(k)_t / sum_k lam^k`` (k = 0 .. H - t) with ``G^(0)_t = q_t`` and
    ``G^(k)_t = sum_{j<k} gamma^j M_{t+j} r_{t+j} + gamma^k M_{t+k} q_{t+k}``, ``M_t = prod_{j<t} m_j``."""
    r, m, q = (np.asarray(x, np.float64) for x in (r, m, q))
    H = r.shape[0]
    M = np.concatenate([np.ones_like(q[:1]), np.cumprod(m, axis=0)], axis=0)
    out = np.zeros_like(q)
    for t in range(H + 1):
        num, den = np.zeros_like(q[0]), 0.0
        for k in range(H - t + 1):
            if k == 0:
                G = q[t]
            else:
                G = sum(gamma**j * M[t + j] * r[t + j] for j in range(k)) + gamma**k * M[t + k] * q[t + k]
            num, den = num + lam**k * G, den + lam**k
        out[t] = num / den
    return out, M


# H = 3, a termination at step 1 (m_1 = 0): alive M = [1, 1, 0, 0].
R = np.array([1.0, 2.0, 3.0], np.float32)
MASK = np.array([1.0, 0.0, 1.0], np.float32)
Q = np.array([10.0, 20.0, 30.0, 40.0], np.float32)


@pytest.mark.parametrize(
    "lam,expected",
    [
        # lam = 1, gamma = .5: k-step returns from t = 0 are G = [10, 1 + .5*20, 1 + .5*2, 2] = [10, 11, 2, 2]
        # -> mean 6.25; from t = 1: [20, 2, 2] -> 8; t = 2 is dead: only q_2 counts, 30 / 2 = 15; t = 3: q_3.
        (1.0, [6.25, 8.0, 15.0, 40.0]),
        # lam = .5: weights 1, .5, .25, .125: t = 0: (10 + 5.5 + .5 + .25) / 1.875; t = 1: (20 + 1 + .5) / 1.75;
        # t = 2: 30 / 1.5.
        (0.5, [16.25 / 1.875, 21.5 / 1.75, 20.0, 40.0]),
    ],
)
def test_lambda_returns_hand_made(lam, expected):
    ret, alive = leq_lambda_returns(jnp.asarray(R), jnp.asarray(MASK), jnp.asarray(Q), discount=0.5, lam=lam)
    np.testing.assert_allclose(np.asarray(ret), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(alive), [1.0, 1.0, 0.0, 0.0])
    # the same numbers with a batch axis (H, B), B = 2
    ret_b, _ = leq_lambda_returns(*(jnp.asarray(np.stack([x, x], 1)) for x in (R, MASK, Q)), discount=0.5, lam=lam)
    np.testing.assert_allclose(np.asarray(ret_b), np.stack([expected, expected], 1), rtol=1e-6)


@pytest.mark.parametrize("lam", [0.3, 0.9, 1.0])
def test_lambda_returns_are_the_weighted_average_of_k_step_returns(lam):
    rng = np.random.default_rng(int(lam * 10))
    H, B, gamma = 6, 5, 0.9
    r = rng.normal(size=(H, B)).astype(np.float32)
    m = (rng.random((H, B)) > 0.25).astype(np.float32)
    q = rng.normal(size=(H + 1, B)).astype(np.float32)
    ret, alive = leq_lambda_returns(jnp.asarray(r), jnp.asarray(m), jnp.asarray(q), discount=gamma, lam=lam)
    want, M = nstep_average(r, m, q, gamma, lam)
    np.testing.assert_allclose(np.asarray(ret), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(alive), M)


def test_expectile_weights():
    w = expectile_weights(jnp.array([1.0, 0.0, -1.0, 2.0]), jnp.array([0.0, 0.0, 0.0, 3.0]), 0.2)
    np.testing.assert_allclose(np.asarray(w), [0.2, 0.8, 0.8, 0.8])  # a tie takes 1 - kappa


def test_critic_objective_weights_the_model_terms_by_discount_and_alive():
    """The hand-made rollout above (lam = 1, gamma = .5) as the critic's model targets for t < H, two
    batch columns; the loss recomputed term by term in numpy."""
    gamma, kappa, beta = 0.5, 0.2, 0.95
    ret, alive = leq_lambda_returns(jnp.asarray(R), jnp.asarray(MASK), jnp.asarray(Q), discount=gamma, lam=1.0)
    T = np.stack([np.asarray(ret)[:3], np.asarray(ret)[:3] - 1.0], 1)  # (H, B=2): [6.25, 8, 15], [5.25, 7, 14]
    A = np.stack([np.asarray(alive)[:3]] * 2, 1)
    q_model = np.array([[7.0, 5.0], [6.0, 9.0], [0.0, 0.0]], np.float32)
    q_model_ema = q_model + np.array([[0.5, -1.0], [0.0, 2.0], [3.0, 3.0]], np.float32)
    q_data, q_data_ema = np.array([1.0, -2.0], np.float32), np.array([1.5, -2.0], np.float32)
    y_data = np.array([0.0, 0.0], np.float32)

    loss, m = critic_objective(
        *(jnp.asarray(x) for x in (q_data, q_data_ema, y_data, q_model, q_model_ema, T, A)),
        discount=gamma,
        expectile=kappa,
        data_expectile=0.5,
        model_weight=beta,
    )

    # data: expectile .5 = half the squared error: (.5 * 1 + .5 * 4) / 2; EMA term: (.25 + 0) / 2
    data, data_reg = (0.5 + 2.0) / 2, 0.25 / 2
    # model: kappa where the target T lies above Q, else 1 - kappa; weights gamma^t M_t = 1, .5, 0
    e = np.array(
        [
            [0.8 * 0.75**2, 0.2 * 0.25**2],  # t = 0: 6.25 < 7, 5.25 > 5
            [0.2 * 2.0**2, 0.8 * 2.0**2],  # t = 1 (weight gamma): 8 > 6, 7 < 9
            [0.0, 0.0],
        ]
    )  # t = 2: dead (alive 0)
    wt = np.array([[1.0], [0.5], [0.0]])
    model = np.mean(wt * e)
    model_reg = np.mean(wt * np.array([[0.25, 1.0], [0.0, 4.0], [9.0, 9.0]]))
    want = (1 - beta) * (data + data_reg) + beta * (model + model_reg)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(m["critic/data_loss"]), data, rtol=1e-6)
    np.testing.assert_allclose(float(m["critic/model_loss"]), model, rtol=1e-6)


def test_bad_bindings_name_the_binding():
    dyn = functools.partial(Ensemble, member=GaussianDynamics, num=2)
    for kw, name in [
        (dict(expectile=1.0), "LEQ.expectile"),
        (dict(lam=1.5), "LEQ.lam"),
        (dict(horizon=0), "LEQ.horizon"),
        (dict(model_weight=-0.1), "LEQ.model_weight"),
        (dict(gamma=1.0), "LEQ.gamma"),
    ]:
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            LEQ(dynamics=dyn, **kw)
    with pytest.raises(ConfigError, match=r"LEQ\.dynamics"):
        LEQ()


# ------------------------------------------------------------------------------ a tiny agent
OB, ACT, HID, HORIZON, B, KAPPA = 3, 2, (8, 8), 3, 4, 0.3


@pytest.fixture(scope="module")
def tiny():
    spec = Spec(ob_dim=OB, act_dim=ACT, goal_dim=0, chunk_len=1)
    member = functools.partial(GaussianDynamics, hidden_dims=HID)
    agent = LEQ(
        dynamics=functools.partial(Ensemble, member=member, num=3),
        success=functools.partial(SuccessModel, hidden_dims=HID),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        reward=functools.partial(RewardModel, hidden_dims=HID),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        actor=functools.partial(LEQActor, hidden_dims=HID, final_init_scale=1.0),
        critic=functools.partial(QCritic, hidden_dims=HID),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        horizon=HORIZON,
        expectile=KAPPA,
        gamma=0.9,
    )
    nets = agent.init(spec, 0).nets
    # no terminations: the returns are smooth in the actions (finite differences)
    nets = eqx.tree_at(lambda n: n.success.net.layers[-1].bias, nets, jnp.full((1,), -30.0))
    s0 = jax.random.normal(jax.random.PRNGKey(1), (B, OB))
    g = jnp.zeros((B, 0))
    key = agent.rollout_noise(nets, jax.random.PRNGKey(2), B)  # the rollouts' draws (member, eps)

    # one compiled program for the actor rollout and the actor loss's gradient (compiles dominate)
    @eqx.filter_jit
    def both(n):
        grads = eqx.filter_grad(lambda n: agent.actor_loss(n, agent.actor_rollout(n, s0, g, key), g)[0])(n)
        return agent.actor_rollout(n, s0, g, key), grads

    aroll = lambda n, *_: both(n)[0]  # noqa: E731
    loss_grad = lambda n: both(n)[1]  # noqa: E731
    returns = eqx.filter_jit(lambda n, d: agent.rollout(jax.lax.stop_gradient(n), s0, g, key, d)["returns"])
    return dict(agent=agent, nets=nets, s0=s0, g=g, key=key, aroll=aroll, loss_grad=loss_grad, returns=returns)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))]


def test_actor_rollout_returns_and_weights(tiny):
    roll = tiny["aroll"](tiny["nets"], tiny["s0"], tiny["g"], tiny["key"])
    ret, q = np.asarray(roll["returns"]), np.asarray(roll["q"])
    assert ret.shape == (HORIZON + 1, B) and roll["grads"].shape == (HORIZON + 1, B, ACT)
    want, _ = nstep_average(roll["rewards"], roll["masks"], q, 0.9, 1.0)
    np.testing.assert_allclose(ret, want, rtol=1e-4, atol=1e-5)
    w = np.asarray(roll["weights"])
    np.testing.assert_allclose(w[:HORIZON], np.where(ret[:HORIZON] > q[:HORIZON], KAPPA, 1 - KAPPA), rtol=1e-6)
    np.testing.assert_array_equal(w[HORIZON], 0.5)


def test_action_gradients_match_finite_differences_through_the_model(tiny):
    """``grads[t] = d Q^lam_t / d a_t`` (later actions follow the actor, the model noise fixed)."""
    roll = tiny["aroll"](tiny["nets"], tiny["s0"], tiny["g"], tiny["key"])
    grads = np.asarray(roll["grads"])
    eps = 1e-3  # the tiny random nets curve strongly: at 1e-2 the central difference is off by a few %
    fd = np.zeros_like(grads)
    zero = jnp.zeros((HORIZON + 1, B, ACT))
    for t in range(HORIZON + 1):
        for j in range(ACT):
            up = np.asarray(tiny["returns"](tiny["nets"], zero.at[t, :, j].set(eps)))[t]
            dn = np.asarray(tiny["returns"](tiny["nets"], zero.at[t, :, j].set(-eps)))[t]
            fd[t, :, j] = (up - dn) / (2 * eps)
    np.testing.assert_allclose(grads, fd, rtol=1e-2, atol=5e-4)  # float32 round-off ~1e-4
    assert np.all(np.abs(grads[0]) > 1e-4)


def test_actor_loss_moves_only_the_actor(tiny):
    g = tiny["loss_grad"](tiny["nets"])
    actor = _leaves(g.actor)
    assert all(np.all(np.isfinite(x)) for x in actor) and sum(np.abs(x).sum() for x in actor) > 0
    for part in (g.critic, g.dynamics, g.reward, g.success):
        assert all(np.all(x == 0) for x in _leaves(part))


def _ignore_action(nets, which):
    """Zero the first-layer weights on the action inputs of the named networks."""
    # inputs [s, g, a] (goal_dim 0) or [s, a]: the action columns start at OB
    for name in which:

        def layer(n, name=name):
            net = getattr(n, name)
            return (net.members.net if name == "dynamics" else net.net).layers[0]

        w = layer(nets).weight
        nets = eqx.tree_at(lambda n: layer(n).weight, nets, w.at[..., OB:].set(0.0))
    return nets


def test_actor_gradient_flows_through_the_model(tiny):
    """With Q and r blind to the action, the actor's gradient comes only through ``s_{t+1} = f(s_t, a_t)``:
    finite and nonzero; blind dynamics too, and it is exactly zero."""
    nets = _ignore_action(tiny["nets"], ["critic", "reward"])
    g = _leaves(tiny["loss_grad"](nets).actor)
    assert all(np.all(np.isfinite(x)) for x in g)
    assert sum(np.abs(x).sum() for x in g) > 1e-6
    g0 = _leaves(tiny["loss_grad"](_ignore_action(nets, ["dynamics"])).actor)
    assert all(np.all(x == 0) for x in g0)


def test_model_terms_train_the_critic(tiny):
    """With ``model_weight = 1`` only the imagined-rollout terms remain, and they move the critic (the
    MAC authors' port evaluates Q there without its trained parameters, so theirs would not)."""
    agent = tiny["agent"]
    only_model = LEQ(
        dynamics=agent.factories["dynamics"], horizon=HORIZON, expectile=KAPPA, gamma=0.9, model_weight=1.0
    )
    only_model.spec = agent.spec
    roll = tiny["aroll"](tiny["nets"], tiny["s0"], tiny["g"], tiny["key"])  # stands in for the critic's rollout
    real = {
        "obs": tiny["s0"],
        "actions": roll["actions"][0],
        "next_obs": roll["states"][1],
        "rewards": jnp.zeros(B),
        "masks": jnp.ones(B),
        "value_goals": tiny["g"],
        "actor_goals": tiny["g"],
    }
    nets = tiny["nets"]
    loss = lambda n: only_model.loss(n, nets.critic, real, jnp.zeros(B), roll, roll, jnp.zeros((3, B, OB)))[0]  # noqa: E731
    grads = eqx.filter_jit(eqx.filter_grad(loss))(nets)
    assert sum(np.abs(x).sum() for x in _leaves(grads.critic)) > 1e-6


def test_one_pass_action_gradients_equal_the_per_step_jacobian(tiny):
    """The default one-reverse-pass action gradients equal the authors' per-step Jacobian blocks, dead
    (terminated) steps included: the success head here terminates some rollouts early."""
    nets = eqx.tree_at(lambda n: n.success.net.layers[-1].bias, tiny["nets"], jnp.full((1,), -0.5))
    chain = tiny["aroll"](nets, tiny["s0"], tiny["g"], tiny["key"])
    per_step = eqx.filter_jit(functools.partial(tiny["agent"].actor_rollout, jacobian="per_step"))(
        nets, tiny["s0"], tiny["g"], tiny["key"]
    )
    alive = np.asarray(chain["alive"])
    assert 0 < alive[1:].mean() < 1, alive  # both live and dead steps are exercised
    np.testing.assert_allclose(np.asarray(chain["grads"]), np.asarray(per_step["grads"]), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(chain["weights"]), np.asarray(per_step["weights"]))


# ------------------------------------------------------------------------------ the update (parity, issue 29)
def _batch(seed=3):
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, (B, OB)).astype(np.float32)
    return {
        "obs": obs,
        "actions": rng.uniform(-1, 1, (B, ACT)).astype(np.float32),
        "next_obs": (obs + 0.1 * rng.normal(size=obs.shape)).astype(np.float32),
        "rewards": rng.uniform(-1, 0, B).astype(np.float32),
        "success": np.array([0, 1, 0, 0], np.float32),
        "value_goals": np.zeros((B, 0), np.float32),
        "actor_goals": np.zeros((B, 0), np.float32),
    }


@pytest.fixture(scope="module")
def updated(tiny):
    """One update from a state whose target critic differs from the critic, with the draws passed in and
    drawn from the state's key."""
    agent = tiny["agent"]
    state = agent.init(agent.spec, 0)
    target = jax.tree_util.tree_map(lambda x: x + 0.1 if eqx.is_inexact_array(x) else x, state.target_critic)
    state = eqx.tree_at(lambda s: s.target_critic, state, target)
    _, k_noise = jax.random.split(state.key)
    noise = agent.draw_noise(state.nets, k_noise, B)
    step = eqx.filter_jit(agent.update)
    return dict(state=state, noise=noise, passed=step(state, _batch(), noise), drawn=step(state, _batch()))


def test_target_critic_is_the_ema_of_the_critic_before_the_step(updated):
    """``Q' <- (1 - tau) Q' + tau Q`` with the critic before the gradient step, as the authors' ``target_update``
    (it reads ``self.network``); the critic after the step gave another target (parity found it: their
    critic EMA terms differed by 1% after 10 updates)."""
    state, (new, _) = updated["state"], updated["passed"]
    tau = 0.005
    want = jax.tree_util.tree_map(
        lambda t, q: (1 - tau) * t + tau * q, _leaves(state.target_critic), _leaves(state.nets.critic)
    )
    for got, w in zip(_leaves(new.target_critic), want):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)
    moved = sum(np.abs(a - b).sum() for a, b in zip(_leaves(new.nets.critic), _leaves(state.nets.critic)))
    assert moved > 0  # the critic did move, so the two rules differ here


def test_update_draws_its_noise_from_the_state_key(updated):
    """``update(state, batch)`` is ``update(state, batch, draw_noise(nets, split(state.key)[1], B))``."""
    (a, ma), (b, mb) = updated["passed"], updated["drawn"]
    for x, y in zip(_leaves(a.nets), _leaves(b.nets)):
        np.testing.assert_array_equal(x, y)
    assert set(ma) == set(mb) and all(float(ma[k]) == float(mb[k]) for k in ma if np.isfinite(float(ma[k])))


def test_model_sample_takes_one_member_per_example(tiny):
    """``s'_b = mean_{m_b}(s_b, a_b) + sigma_{m_b}(s_b, a_b) eps_b``: the member drawn for example ``b`` predicts
    every dimension of its next state (the authors' actor rollout mixed members across dimensions)."""
    from macfw.agents.leq import model_sample

    ens = tiny["nets"].dynamics
    s, a = tiny["s0"], jnp.linspace(-1, 1, B * ACT).reshape(B, ACT)
    member = jnp.array([2, 0, 1, 2])
    eps = jax.random.normal(jax.random.PRNGKey(5), (B, OB))
    got = np.asarray(model_sample(ens, s, a, member, eps))
    for b in range(B):
        mean, log_std = ens.member(int(member[b])).mean_log_std(s[b], a[b])
        np.testing.assert_allclose(got[b], np.asarray(mean + jnp.exp(log_std) * eps[b]), rtol=1e-5, atol=1e-6)


def test_authors_metrics(updated):
    """The metrics the authors' ``total_loss`` logs, under macfw's names, on the tiny update: the success
    head's (labels [0, 1, 0, 0]), the unweighted rollout means and the expectile weights' mean."""
    _, m = updated["passed"]
    for k in (
        "success/prob",
        "success/accuracy",
        "success/pos_accuracy",
        "success/neg_accuracy",
        "critic/q_model_mean",
        "critic/q_model_min",
        "critic/q_model_max",
        "critic/reg_loss_data",
        "critic/reg_loss_model",
        "critic/loss_weight_mean",
        "critic/alive_mean",
        "critic/state_abs_max",
        "critic/reward_model_mean",
        "actor/lambda_return_mean",
        "dynamics/sample_mse",
        "reward/pred",
    ):
        assert np.isfinite(float(m[k])), k
    np.testing.assert_allclose(float(m["success/label_mean"]), 0.25)
    assert float(m["critic/q_model_min"]) <= float(m["critic/q_model_mean"]) <= float(m["critic/q_model_max"])
    assert 0.0 < float(m["critic/loss_weight_mean"]) <= float(m["critic/alive_mean"]) <= 1.0
    assert KAPPA <= float(m["actor/weight_mean"]) <= 1 - KAPPA  # each weight kappa, 1 - kappa or 0.5 (last step)
    # sample_mse is a draw of E|s' - y|^2 = mse + E sigma^2 >= mse on average; here one draw of 4 x 3 x 3
    assert float(m["dynamics/sample_mse"]) > 0 and float(m["dynamics/mse"]) > 0
