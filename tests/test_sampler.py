"""The rejection sampler returns the clipped candidate with the highest Q (paper §4.2, DESIGN §2.3)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.nn.flow import FlowPolicy
from macfw.samplers import RejectionSampler, candidates
from macfw.spec import Spec

SPEC = Spec(ob_dim=7, act_dim=3, goal_dim=4, chunk_len=5)
N_TRAIN, N_ACT = 5, 11


class TargetCritic(eqx.Module):
    """``Q(s, g, A) = -||A - target||^2``: the best candidate is the one closest to ``target``."""

    target: jax.Array

    def __call__(self, s, g, A):
        return -jnp.sum((A - self.target) ** 2)


@pytest.fixture(scope="module")
def setup():
    policy = FlowPolicy(SPEC, key=jax.random.PRNGKey(0), hidden_dims=(32, 32))
    assert policy.one_step is not None
    # widen the one-step policy's outputs so that many raw candidates leave [-1, 1]
    policy = eqx.tree_at(lambda p: p.one_step.layers[-1].weight, policy, policy.one_step.layers[-1].weight * 20.0)
    s = jnp.linspace(-1.0, 1.0, SPEC.ob_dim)
    g = jnp.linspace(0.5, -0.5, SPEC.goal_dim)
    key = jax.random.PRNGKey(42)
    sampler = RejectionSampler(num_train_candidates=N_TRAIN, num_act_candidates=N_ACT)

    @eqx.filter_jit
    def run(critic, key):
        train = sampler(policy, critic, s, g, key=key, acting=False)
        act = sampler(policy, critic, s, g, key=key, acting=True)
        c_train = candidates(policy, s, g, N_TRAIN, key)
        c_act = candidates(policy, s, g, N_ACT, key)
        # the policy's own draws: one-step policy mu on N_ACT noises drawn in one call
        z = jax.random.normal(key, (N_ACT, SPEC.chunk_dim))
        raw = jax.vmap(lambda zi: policy.distilled(s, g, zi))(z)
        return train, act, c_train, c_act, raw

    return run, key


def test_candidates_are_clipped_policy_samples(setup):
    run, key = setup
    _, _, c_train, c_act, raw = map(np.asarray, run(TargetCritic(jnp.zeros(SPEC.chunk_dim)), key))
    assert c_train.shape == (N_TRAIN, SPEC.chunk_dim) and c_act.shape == (N_ACT, SPEC.chunk_dim)
    assert np.mean(np.abs(raw) > 1.0) > 0.2  # the clipping matters
    # (the sampler computes mu's first-layer product of [s, g] once for all draws: float rounding only)
    np.testing.assert_allclose(c_act, np.clip(raw, -1.0, 1.0), rtol=1e-5, atol=1e-5)
    # distinct candidates (so "which one" is a meaningful question)
    assert len({tuple(np.round(c, 5)) for c in c_act}) == N_ACT


@pytest.mark.parametrize("acting", [False, True], ids=["train", "act"])
def test_returns_argmax_q_candidate(setup, acting):
    run, key = setup
    num = N_ACT if acting else N_TRAIN
    rng = np.random.default_rng(0)
    picked = set()
    for trial in range(6):
        k = jax.random.fold_in(key, trial)
        # first call only to read the candidates this key produces
        _, _, c_train, c_act, _ = map(np.asarray, run(TargetCritic(jnp.zeros(SPEC.chunk_dim)), k))
        cands = c_act if acting else c_train
        # a target near one candidate (outside [-1, 1] in places, so clipping affects the scores)
        j = int(rng.integers(num))
        target = cands[j] * 1.3 + 0.05 * rng.normal(size=SPEC.chunk_dim)
        q = -np.sum((cands - target) ** 2, axis=1)
        best = int(np.argmax(q))
        train_out, act_out, *_ = map(np.asarray, run(TargetCritic(jnp.asarray(target, jnp.float32)), k))
        out = act_out if acting else train_out
        assert out.shape == (SPEC.chunk_dim,)
        assert out.min() >= -1.0 and out.max() <= 1.0
        np.testing.assert_allclose(out, cands[best], rtol=1e-6, atol=1e-7)
        picked.add(best)
    assert len(picked) > 1  # the answer moved with the critic: not a fixed index


def test_train_and_act_use_their_own_candidate_counts(setup):
    run, key = setup
    _, _, c_train, c_act, _ = map(np.asarray, run(TargetCritic(jnp.zeros(SPEC.chunk_dim)), key))
    # target = a candidate that only the acting set of N_ACT candidates can contain
    extra = [c for c in c_act if not any(np.allclose(c, d) for d in c_train)]
    assert extra, "acting candidates should include ones the training draw does not"
    target = jnp.asarray(extra[-1])
    train_out, act_out, *_ = map(np.asarray, run(TargetCritic(target), key))
    np.testing.assert_allclose(act_out, extra[-1], rtol=1e-6)
    assert any(np.allclose(train_out, c) for c in c_train)
    assert not np.allclose(train_out, extra[-1])


def test_rejects_bad_candidate_counts():
    with pytest.raises(ValueError):
        RejectionSampler(num_train_candidates=0)
    with pytest.raises(ValueError):
        RejectionSampler(num_act_candidates=0)
