"""MAC's equations against the authors' code (issue 29): the cases the parity harness
(``experiments/parity_cases/mac.py``) caught, on tiny hand-made inputs.

* the distillation target is the flow ODE's solution clipped to [-1, 1] (the authors'
  ``sample_flow_actions`` clips it);
* the target value's EMA averages in the value *before* the gradient step (the authors'
  ``target_update`` reads ``self.network``, the pre-update parameters);
* the update logs the authors' diagnostics (batch max/min/std of values, returns and Q; the success
  head's accuracies at 0.7 and 0.9, per-class accuracies, label mean; the reward head's range; the
  flow's ``||A - z||``), with 0 where the authors' per-class ratio is 0/0.
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.agents.mac import MAC
from macfw.nn.flow import FlowPolicy
from macfw.nn.models import (
    ChunkDynamics,
    QCritic,
    RewardModel,
    StateValue,
    SuccessModel,
    reward_metrics,
    success_metrics,
)
from macfw.samplers import RejectionSampler
from macfw.spec import Spec

HID: dict[str, Any] = dict(hidden_dims=(16, 16))


def _policy_pushed_out_of_range():
    """A tiny FlowPolicy whose velocity field outputs about +3 everywhere: its ODE solution from
    standard normal noise lies well above 1."""
    spec = Spec(ob_dim=3, act_dim=2, goal_dim=1, chunk_len=2)
    pol = FlowPolicy(spec, key=jax.random.PRNGKey(0), flow_steps=4, **HID)
    last = pol.field.layers[-1]
    assert last.bias is not None
    return eqx.tree_at(lambda p: p.field.layers[-1].bias, pol, jnp.full_like(last.bias, 3.0)), spec


def test_distillation_target_is_the_ode_solution_clipped_to_the_action_range():
    pol, spec = _policy_pushed_out_of_range()
    s, g = jnp.linspace(-1, 1, spec.ob_dim), jnp.array([0.5])
    A = jnp.linspace(-0.9, 0.9, spec.chunk_dim)
    z, zd, u = jnp.array([0.3, -0.2, 0.1, 0.4]), jnp.array([0.1, -0.3, 0.2, 0.0]), 0.4
    solution = pol.solve(s, g, zd)
    assert float(jnp.min(solution)) > 1.2  # the unclipped target lies outside [-1, 1]
    clipped = jnp.mean((pol.distilled(s, g, zd) - jnp.clip(solution, -1.0, 1.0)) ** 2)
    unclipped = jnp.mean((pol.distilled(s, g, zd) - solution) ** 2)
    _, m = pol.loss_from_noise(s, g, A, z, u, zd)
    np.testing.assert_allclose(m["flow/distill_loss"], clipped, rtol=1e-6)
    assert abs(float(m["flow/distill_loss"]) - float(unclipped)) > 1.0
    np.testing.assert_allclose(m["flow/vel"], jnp.linalg.norm(A - z), rtol=1e-6)

    # loss(key) draws z, u, z_distill from split(key, 3) and computes the same
    key = jax.random.PRNGKey(7)
    kz, ku, kd = jax.random.split(key, 3)
    total, m_key = pol.loss(s, g, A, key=key)
    zd = jax.random.normal(kd, A.shape)
    want = jnp.mean((pol.distilled(s, g, zd) - jnp.clip(pol.solve(s, g, zd), -1.0, 1.0)) ** 2)
    np.testing.assert_allclose(m_key["flow/distill_loss"], want, rtol=1e-6)
    np.testing.assert_allclose(total, m_key["flow/loss"] + m_key["flow/distill_loss"], rtol=1e-6)


def _tiny_mac(goal_dim: int, tau: float = 0.005):
    h = HID
    agent = MAC(
        dynamics=functools.partial(ChunkDynamics, **h),
        policy=functools.partial(FlowPolicy, flow_steps=3, **h),
        critic=functools.partial(QCritic, **h),
        value=functools.partial(StateValue, **h),
        success=functools.partial(SuccessModel, **h),
        reward=functools.partial(RewardModel, **h),
        sampler=RejectionSampler(num_train_candidates=3, num_act_candidates=4),
        chunk_len=3,
        gamma=0.99,
        horizon=3,
        tau=tau,
        rollout_batch_size=8,
    )
    spec = Spec(ob_dim=4, act_dim=2, goal_dim=goal_dim, chunk_len=3)
    state = agent.init(spec, jax.random.PRNGKey(0))
    from macfw.bench import synthetic_data
    from macfw.data.batches import sample_for

    data = synthetic_data(spec, num_episodes=4, episode_length=30)
    batches = [
        sample_for(agent.batch_spec, data, jax.random.PRNGKey(i), 16, goal_conditioned=goal_dim > 0) for i in range(3)
    ]
    return agent, state, batches


def _leaves(tree):
    return jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))


def test_target_value_ema_averages_in_the_value_before_the_step():
    agent, state, batches = _tiny_mac(goal_dim=2, tau=0.3)
    update = jax.jit(agent.update)
    s1, _ = update(state, batches[0])
    s2, _ = update(s1, batches[1])
    # step 1 from V' = V: (1 - tau) V_0 + tau V_0 = V_0 (the post-step value V_1 would move it)
    for t, v0 in zip(_leaves(s1.target_value), _leaves(state.nets.value)):
        np.testing.assert_allclose(t, v0, rtol=1e-6, atol=1e-7)
    assert any(float(jnp.max(jnp.abs(a - b))) > 1e-5 for a, b in zip(_leaves(state.nets.value), _leaves(s1.nets.value)))
    # step 2: (1 - tau) V'_1 + tau V_1
    for t2, t1, v1 in zip(_leaves(s2.target_value), _leaves(s1.target_value), _leaves(s1.nets.value)):
        np.testing.assert_allclose(t2, 0.7 * t1 + 0.3 * v1, rtol=1e-5, atol=1e-7)


def test_success_metrics_hand_computed():
    prob = jnp.array([0.95, 0.6, 0.3, 0.8])
    label = jnp.array([1.0, 0.0, 0.0, 1.0])
    m = {k: float(v) for k, v in success_metrics(prob, label).items()}
    assert m == pytest.approx(
        {
            "success/prob_max": 0.95,
            "success/prob_min": 0.3,
            "success/accuracy_0.7": 1.0,
            "success/accuracy_0.9": 0.75,
            "success/pos_accuracy": 1.0,
            "success/neg_accuracy": 0.5,
            "success/label_mean": 0.5,
        }
    )
    # no positive label (every single-task batch with masks all 1): the authors' 0/0 is NaN; here 0
    m0 = success_metrics(prob, jnp.zeros(4))
    assert float(m0["success/pos_accuracy"]) == 0.0 and float(m0["success/neg_accuracy"]) == 0.25
    r = reward_metrics(jnp.array([1.0, -2.0, 0.5]), jnp.array([0.0, -1.0, -0.5]))
    assert {k: float(v) for k, v in r.items()} == pytest.approx(
        {"reward/pred_max": 1.0, "reward/pred_min": -2.0, "reward/target_mean": -0.5}
    )


@pytest.mark.parametrize("goal_dim", [0, 2])
def test_update_logs_the_authors_diagnostics(goal_dim):
    agent, state, batches = _tiny_mac(goal_dim)
    _, m = jax.jit(agent.update)(state, batches[0])
    m = {k: float(v) for k, v in m.items()}
    assert all(np.isfinite(v) for v in m.values())
    names = [
        "flow/vel",
        "policy/loss",
        "value/max",
        "value/min",
        "value/return_min",
        "value/return_max",
        "value/return_std",
        "critic/q_max",
        "critic/q_min",
        "success/prob",
        "success/prob_max",
        "success/prob_min",
        "success/accuracy_0.7",
        "success/accuracy_0.9",
        "success/pos_accuracy",
        "success/neg_accuracy",
        "success/label_mean",
    ]
    names += ["reward/pred", "reward/pred_max", "reward/pred_min", "reward/target_mean"] if goal_dim == 0 else []
    assert not [n for n in names if n not in m]
    assert m["policy/loss"] == pytest.approx(m["flow/loss"] + m["flow/distill_loss"], rel=1e-5)
    assert m["value/min"] <= m["value/mean"] <= m["value/max"]
    assert m["value/return_min"] <= m["value/return_mean"] <= m["value/return_max"]
    assert m["critic/q_min"] <= m["critic/q_mean"] <= m["critic/q_max"]
    assert m["success/label_mean"] == pytest.approx(float(jnp.mean(batches[0]["success"])))
    if goal_dim == 0:
        assert m["reward/target_mean"] == pytest.approx(float(jnp.mean(batches[0]["rewards"])), rel=1e-6)
