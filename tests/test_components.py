"""Every registered component builds from a Spec and has its documented per-example shapes; the registry
resolves names (built-in and user-registered) from Python and from Gin, and reports unknown names clearly."""

from __future__ import annotations

from typing import cast

import equinox as eqx
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import macfw
import macfw.run
from macfw import registry
from macfw.agents.mac import MAC
from macfw.nn.flow import FlowPolicy
from macfw.nn.models import QCritic
from macfw.samplers import RejectionSampler, candidates
from macfw.spec import Spec

HID = (32, 32)
B = 6
OB, ACT, N = 7, 3, 5
CHUNK = ACT * N


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


# A user-defined sampler registered from a module outside macfw (this test module). Registered once,
# at import time: Gin refuses to register the same configurable name twice.
@macfw.register("sampler")
class MyTestSampler(RejectionSampler):
    """Returns the first candidate (ignores the critic)."""

    def __call__(self, policy, critic, s, g, *, key, acting=False):
        num = self.num_act_candidates if acting else self.num_train_candidates
        return candidates(policy, s, g, num, key)[0]


def _spec(goal_dim):
    return Spec(ob_dim=OB, act_dim=ACT, goal_dim=goal_dim, chunk_len=N)


def _inputs(goal_dim, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    s = jax.random.uniform(ks[0], (B, OB), minval=-1, maxval=1)
    g = jax.random.uniform(ks[1], (B, goal_dim), minval=-1, maxval=1)
    A = jax.random.uniform(ks[2], (B, CHUNK), minval=-1, maxval=1)
    return s, g, A


def _build(kind, name, spec, seed=1):
    cls = registry.get(kind, name)
    return cls(spec, key=jax.random.PRNGKey(seed), hidden_dims=HID)


def _names(kind):
    """Registered names of ``kind`` (not the test-only classes defined in this module)."""
    names = [n for n in registry.registered(kind) if registry.get(kind, n).__module__ != __name__]
    assert names, f"no component registered under {kind!r}"
    return names


GOAL_DIMS = pytest.mark.parametrize("goal_dim", [4, 0], ids=["goal4", "goal0"])


# ------------------------------------------------------------------------------------ shapes
@GOAL_DIMS
def test_dynamics_shapes(goal_dim):
    s, g, A = _inputs(goal_dim)

    @eqx.filter_jit
    def run(f, s, A):
        return jax.vmap(f)(s, A), jax.vmap(f)(s, -A), jax.vmap(f.loss)(s, A, s)[0]

    for name in _names("dynamics"):
        f = _build("dynamics", name, _spec(goal_dim))
        out, out2, loss = map(np.asarray, run(f, s, A))
        assert out.shape == (B, OB), name
        assert np.all(np.isfinite(out)), name
        assert not np.allclose(out, out2), name  # depends on the chunk, not only on the state
        assert loss.shape == (B,) and np.all(loss >= 0), name


@GOAL_DIMS
@pytest.mark.parametrize("kind", ["critic", "success", "reward"])
def test_chunk_heads_scalar_per_example(kind, goal_dim):
    s, g, A = _inputs(goal_dim)
    for name in _names(kind):
        head = _build(kind, name, _spec(goal_dim))
        out = np.asarray(eqx.filter_jit(lambda h, *x: jax.vmap(h)(*x))(head, s, g, A))
        assert out.shape == (B,), (kind, name, out.shape)
        assert np.all(np.isfinite(out))
        assert np.unique(np.round(out, 6)).size > 1, (kind, name)  # reads its inputs


@GOAL_DIMS
def test_value_scalar_per_example(goal_dim):
    s, g, _ = _inputs(goal_dim)
    for name in _names("value"):
        v = _build("value", name, _spec(goal_dim))
        out = np.asarray(eqx.filter_jit(lambda h, *x: jax.vmap(h)(*x))(v, s, g))
        assert out.shape == (B,), (name, out.shape)
        assert np.all(np.isfinite(out))
        assert np.unique(np.round(out, 6)).size > 1, name


@GOAL_DIMS
def test_policy_sample_and_loss_shapes(goal_dim):
    s, g, A = _inputs(goal_dim)
    keys = jax.random.split(jax.random.PRNGKey(3), B)

    @eqx.filter_jit
    def run(pi, s, g, A, keys):
        out = jax.vmap(lambda s_, g_, k: pi.sample(s_, g_, key=k))(s, g, keys)
        same_s = jax.vmap(lambda k: pi.sample(s[0], g[0], key=k))(keys)
        loss = jax.vmap(lambda s_, g_, a_, k: pi.loss(s_, g_, a_, key=k)[0])(s, g, A, keys)
        return out, same_s, loss

    for name in _names("policy"):
        pi = _build("policy", name, _spec(goal_dim))
        out, same_s, loss = map(np.asarray, run(pi, s, g, A, keys))
        assert out.shape == (B, CHUNK), (name, out.shape)
        assert np.all(np.isfinite(out))
        assert np.unique(np.round(same_s[:, 0], 6)).size > 1, name  # different keys, different samples
        assert loss.shape == (B,), (name, loss.shape)
        assert np.all(np.isfinite(loss))


@GOAL_DIMS
def test_sampler_shapes_and_range(goal_dim):
    spec = _spec(goal_dim)
    s, g, _ = _inputs(goal_dim)
    pi = FlowPolicy(spec, key=jax.random.PRNGKey(4), hidden_dims=HID)
    assert pi.one_step is not None
    # scale the one-step policy's output so that unclipped candidates leave [-1, 1]
    pi = eqx.tree_at(lambda p: p.one_step.layers[-1].weight, pi, pi.one_step.layers[-1].weight * 20.0)
    q = QCritic(spec, key=jax.random.PRNGKey(5), hidden_dims=HID)  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
    keys = jax.random.split(jax.random.PRNGKey(6), B)

    @eqx.filter_jit
    def run(sampler, pi, q, s, g, keys):
        raw = jax.vmap(lambda s_, g_, k: pi.sample(s_, g_, key=k))(s, g, keys)
        outs = [
            jax.vmap(lambda s_, g_, k: sampler(pi, q, s_, g_, key=k, acting=acting))(s, g, keys)  # noqa: B023  (called within this iteration)
            for acting in (False, True)
        ]
        return raw, outs

    for name in _names("sampler"):
        sampler = registry.get("sampler", name)()
        raw, outs = run(sampler, pi, q, s, g, keys)
        assert np.abs(np.asarray(raw)).max() > 1.0  # so the clipping is exercised
        for acting, out in zip((False, True), outs):
            out = np.asarray(out)
            assert out.shape == (B, CHUNK), (name, acting, out.shape)
            assert np.all(np.isfinite(out))
            assert out.min() >= -1.0 and out.max() <= 1.0, (name, acting)


# ------------------------------------------------------------------------------------ registry
def test_unknown_name_lists_registered():
    with pytest.raises(registry.UnknownComponentError) as ei:
        registry.get("sampler", "Nope")
    msg = str(ei.value)
    assert "Nope" in msg and "RejectionSampler" in msg
    # usable as both KeyError and ValueError
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, ValueError)


def test_unknown_kind_raises():
    with pytest.raises(registry.UnknownComponentError) as ei:
        registry.get("no_such_kind", "RejectionSampler")
    assert "no_such_kind" in str(ei.value)


def test_user_registered_sampler_selectable_by_name():
    assert registry.get("sampler", "MyTestSampler") is MyTestSampler
    assert "MyTestSampler" in registry.registered("sampler")
    assert "sampler" in registry.kind_of("MyTestSampler")
    # the built-in one is still there, unchanged
    assert registry.get("sampler", "RejectionSampler") is RejectionSampler


def test_user_registered_sampler_selectable_from_gin():
    gin.parse_config("MAC.sampler = @MyTestSampler()\nMyTestSampler.num_act_candidates = 3")
    agent = MAC()
    assert type(agent.sampler) is MyTestSampler
    assert agent.sampler.num_act_candidates == 3
    # and it is the one the agent uses to act: the first candidate, not the argmax
    spec = _spec(4)
    agent.spec = spec
    pi = FlowPolicy(spec, key=jax.random.PRNGKey(0), hidden_dims=HID)
    q = QCritic(spec, key=jax.random.PRNGKey(1), hidden_dims=HID)  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
    s, g, _ = _inputs(4)
    k = jax.random.PRNGKey(9)
    got = agent.sampler(pi, q, s[0], g[0], key=k, acting=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(candidates(pi, s[0], g[0], 3, k)[0]), rtol=1e-6)


def test_gin_binds_builtin_hyperparameters():
    gin.parse_config("MAC.sampler = @RejectionSampler()\nRejectionSampler.num_train_candidates = 3\nMAC.horizon = 4")
    agent = MAC()
    assert type(agent.sampler) is RejectionSampler
    assert agent.sampler.num_train_candidates == 3
    assert agent.horizon == 4


def test_duplicate_name_from_other_class_raises():
    class RejectionSampler2(RejectionSampler):  # a different class under a taken name
        pass

    with pytest.raises(ValueError, match="already registered"):
        macfw.register("sampler", name="RejectionSampler")(RejectionSampler2)
    assert registry.get("sampler", "RejectionSampler") is RejectionSampler


def test_reregistering_same_class_is_noop():
    assert macfw.register("sampler")(RejectionSampler) is RejectionSampler
    assert cast("list[str]", registry.registered("sampler")).count("RejectionSampler") == 1


def test_parse_gin_unknown_component(tmp_path):
    f = tmp_path / "bad.gin"
    f.write_text("MAC.horizon = 3\nMAC.sampler = @NoSuchSampler()\n")
    with pytest.raises(registry.UnknownComponentError) as ei:
        macfw.run.parse_gin([str(f)], [])
    msg = str(ei.value)
    assert "NoSuchSampler" in msg and "RejectionSampler" in msg


def test_parse_gin_unknown_component_in_binding():
    with pytest.raises(registry.UnknownComponentError) as ei:
        macfw.run.parse_gin([], ["MAC.dynamics = @NoSuchDynamics"])
    msg = str(ei.value)
    assert "NoSuchDynamics" in msg and "ChunkDynamics" in msg


# ------------------------------------------------------------------------------------ MLP numerics
def test_mlp_gelu_and_layer_norm_match_the_reference_functions():
    """The MLP's written-out GELU and one-pass LayerNorm compute jax.nn.gelu and eqx.nn.LayerNorm."""
    from macfw.nn.mlp import MLP, _layer_norm, gelu

    x = jnp.linspace(-8.0, 8.0, 4001)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x), atol=1e-6)
    ln = eqx.nn.LayerNorm(64)
    ln = eqx.tree_at(
        lambda n: (n.weight, n.bias),
        ln,
        (jax.random.normal(jax.random.PRNGKey(0), (64,)), jax.random.normal(jax.random.PRNGKey(1), (64,))),
    )
    for shift in (0.0, 5.0):  # also rows whose mean is large against their spread
        h = jax.random.normal(jax.random.PRNGKey(2), (64,)) + shift
        np.testing.assert_allclose(_layer_norm(ln, h), ln(h), atol=2e-5)
    mlp = MLP(OB, 3, HID, key=jax.random.PRNGKey(3))
    h = jax.random.normal(jax.random.PRNGKey(4), (OB,))
    for layer, norm in zip(mlp.layers[:-1], mlp.norms):
        assert norm is not None
        h = norm(jax.nn.gelu(layer(h)))
    np.testing.assert_allclose(mlp(jax.random.normal(jax.random.PRNGKey(4), (OB,))), mlp.layers[-1](h), atol=2e-5)
