"""Issue 12: the faster update computes what the reference computation does.

Ten changes made MAC's update (and every MLP's backward pass) faster without changing what is
computed (:data:`macfw.reference.SPEEDUPS`): LayerNorm's closed-form gradient (a custom VJP), the
state's first-layer product shared across the rejection sampler's N candidates and the flow ODE's
steps (``MLP.prefix``), one flattened vmap instead of two nested ones over rollout steps
(``vmap_steps``), JAX's threefry lowered without its loop on the CPU (``macfw._threefry``: the
same bits), the lambda-returns at ``lambda = 1`` from ``V'(s_H)`` alone (``lambda_one``; its
equation is checked in ``test_lambda_returns.py``) and last layers padded to a multiple of 16
outputs (``padded_outputs``), and the rollout's success, reward and dynamics models with one
first-layer product (``joint_first_layer``), and in the rollout each MLP's LayerNorms folded into the
next layer's product (``folded_layer_norm``), and the CPU training step compiled with 512-bit vectors
(``wide_vectors``), and the rollout's success and reward heads run after its loop on all the
(state, chunk) pairs at once (``heads_after_rollout``). (The eleventh, ``members_outer``, is MOPO and
MOBILE's; ``test_mopo_mobile.py`` checks it.) Each is checked against its reference here: alone on
tiny inputs, and all together over 50 MAC updates from a
fixed seed, where the reference is the pre-change computation traced in the same process (so the
comparison holds on any CPU's instruction set).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.nn import mlp as mlp_mod
from macfw.nn.mlp import MLP
from macfw.reference import reference_computation


def _nested_vmap_steps(fn, *args):
    return jax.vmap(jax.vmap(fn))(*args)


def _layer_norm_by_autodiff(x, w, b, eps):
    return mlp_mod._layer_norm_autodiff(x, w, b, eps)


def _inside_loops(jaxpr, primitive: str) -> int:
    """How many equations whose primitive's name starts with ``primitive`` lie inside the scan and
    while loops of the closed ``jaxpr`` (nested calls included)."""
    from jax.extend import core

    def subjaxprs(eqn):
        for v in eqn.params.values():
            for x in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(x, core.ClosedJaxpr):
                    yield x.jaxpr
                elif isinstance(x, core.Jaxpr):
                    yield x

    def count(j, inside: bool) -> int:
        n = 0
        for eqn in j.eqns:
            n += int(inside and eqn.primitive.name.startswith(primitive))
            loop = eqn.primitive.name in ("scan", "while")
            n += sum(count(sub, inside or loop) for sub in subjaxprs(eqn))
        return n

    return count(jaxpr.jaxpr, False)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_gradient_equals_autodiff(affine):
    """The custom VJP's gradients (input, weight, bias) equal autodiff's of the same forward."""
    n = 16
    ln = eqx.nn.LayerNorm(n, use_weight=affine, use_bias=affine)
    if affine:
        ln = eqx.tree_at(
            lambda lin: (lin.weight, lin.bias),
            ln,
            (jax.random.normal(jax.random.PRNGKey(0), (n,)), jax.random.normal(jax.random.PRNGKey(1), (n,))),
        )
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(2), (7, n)) + 1.0
    x = x.at[0].set(2.5)  # a constant row: the variance clamps at 0

    def loss(ln, x, norm_fn):
        w = ln.weight if ln.use_weight else None
        b = ln.bias if ln.use_bias else None
        return jnp.sum(jnp.sin(jax.vmap(lambda r: norm_fn(r, w, b, ln.eps))(x)) * jnp.arange(n))

    fast = lambda r, w, b, eps: mlp_mod._layer_norm_fn(r, w, b, eps)  # noqa: E731
    gx_fast, gx_ref = (jax.grad(loss, argnums=1)(ln, x, f) for f in (fast, _layer_norm_by_autodiff))
    np.testing.assert_allclose(gx_fast, gx_ref, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(gx_ref[1:])).max() > 1e-2  # not a vacuous comparison of zeros
    if affine:
        g_fast, g_ref = (eqx.filter_grad(loss)(ln, x, f) for f in (fast, _layer_norm_by_autodiff))
        np.testing.assert_allclose(g_fast.weight, g_ref.weight, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g_fast.bias, g_ref.bias, rtol=1e-5, atol=1e-5)
    # and the forward is the library's LayerNorm
    np.testing.assert_allclose(jax.vmap(lambda r: mlp_mod._layer_norm(ln, r))(x[1:]), jax.vmap(ln)(x[1:]), atol=2e-5)


def test_prefix_pair_equals_the_plain_call_and_reference_mode_is_the_plain_call():
    m = MLP(7, 3, (16, 16), key=jax.random.PRNGKey(0))
    head = jax.random.normal(jax.random.PRNGKey(1), (4,))
    tails = jax.random.normal(jax.random.PRNGKey(2), (5, 3))
    plain = jax.vmap(lambda t: m(jnp.concatenate([head, t])))(tails)
    pre = m.prefix(head)
    assert pre.shape == (16,)
    shared = jax.vmap(lambda t: m.from_prefix(pre, t))(tails)
    np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-6)
    with reference_computation():
        ref = jax.vmap(lambda t: m.from_prefix(m.prefix(head), t))(tails)
    np.testing.assert_array_equal(ref, plain)  # the very same operations
    with pytest.raises(ValueError, match=r"tail \(9,\)"):
        m.from_prefix(pre, jnp.zeros(9))


@pytest.mark.slow
@pytest.mark.parametrize("out_dim", [50, 28, 16, 1])
def test_padded_output_layer_equals_the_plain_product(out_dim):
    """``padded_outputs``: a last layer of more than 16 outputs, not a multiple of 16, is computed with
    zero rows up to the next multiple and sliced: the same outputs and gradients as the plain product,
    which the reference computation (and every output size of 16 or fewer, or a multiple) uses."""
    m = MLP(12, out_dim, (32, 32), key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 12))
    f = lambda m, x: jax.vmap(m)(x)  # noqa: E731
    fast = f(m, x)
    padded = "pad" in str(jax.make_jaxpr(f)(m, x))
    assert padded == (out_dim in (50, 28)), out_dim
    with reference_computation(only="padded_outputs"):  # (new functions: JAX caches traces)
        f_ref = lambda m, x: jax.vmap(m)(x)  # noqa: E731
        ref = f_ref(m, x)
        assert "pad" not in str(jax.make_jaxpr(f_ref)(m, x))
        g_ref = jax.grad(lambda m: jnp.sum(f_ref(m, x) ** 2))(m)
    assert fast.shape == ref.shape == (6, out_dim)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)
    g_fast = jax.grad(lambda m: jnp.sum(f(m, x) ** 2))(m)
    assert g_fast.layers[-1].weight.shape == (out_dim, 32)
    for a, b in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [(32,), (32, 32), (32, 32, 32)])
def test_layer_norms_folded_into_the_next_product_equal_normalise_then_multiply(hidden):
    """``folded_layer_norm``: ``LN(a) W^T + b`` computed as ``rstd (a (W diag w)^T) - rstd m (W diag w) 1 +
    (W beta + b)`` (:meth:`MLP.with_folded_layer_norms`): the same outputs as normalising first,
    through the plain call and through the shared-prefix pair, with a norm's own scale and offset
    away from 1 and 0 and a last layer that is padded (50 outputs); no LayerNorm is left in its
    program, and in the reference computation the MLP is returned as it is."""
    m = MLP(12, 50, hidden, key=jax.random.PRNGKey(0))
    ks = jax.random.split(jax.random.PRNGKey(3), 2 * len(hidden))
    m = eqx.tree_at(
        lambda m: [n.weight for n in m.norms] + [n.bias for n in m.norms],
        m,
        [1.0 + 0.5 * jax.random.normal(k, (h,)) for k, h in zip(ks[::2], hidden)]
        + [0.5 * jax.random.normal(k, (h,)) for k, h in zip(ks[1::2], hidden)],
    )
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (9, 12)) + 0.5
    f = lambda m, x: jax.vmap(m)(x)  # noqa: E731
    fm = m.with_folded_layer_norms()
    assert m.folded is None and len(fm.folded) == len(hidden) and fm.with_folded_layer_norms() is fm
    assert "custom_vjp_call" in str(jax.make_jaxpr(f)(m, x))  # the plain MLP normalises ...
    assert "custom_vjp_call" not in str(jax.make_jaxpr(f)(fm, x))  # ... the folded one never does
    plain, folded = f(m, x), f(fm, x)
    assert np.abs(np.asarray(plain)).max() > 0.1
    np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-5)
    head, tails = x[0, :5], x[:, 5:]
    shared = jax.vmap(lambda t: fm.from_prefix(fm.prefix(head), t))(tails)
    np.testing.assert_allclose(shared, jax.vmap(lambda t: m(jnp.concatenate([head, t])))(tails), rtol=1e-5, atol=1e-5)
    with reference_computation(only="folded_layer_norm"):
        assert m.with_folded_layer_norms() is m


@pytest.mark.parametrize("kw", [dict(layer_norm=False), dict(compute_dtype="bfloat16")])
def test_layer_norms_are_not_folded_without_norms_or_in_low_precision(kw):
    """Without LayerNorms there is nothing to fold; with a low-precision ``compute_dtype`` the product's
    inputs would be the unnormalised activations and the fold's cancellation would cost bits: the MLP
    comes back as it is."""
    m = MLP(6, 3, (16, 16), key=jax.random.PRNGKey(0), **kw)
    assert m.with_folded_layer_norms() is m


def test_fold_layer_norms_replaces_every_mlp_of_a_tree_and_mac_folds_its_rollout_only():
    """:func:`fold_layer_norms` folds every MLP of MAC's networks and leaves the networks it was given as
    they were; MAC's rollout folds them once, before its loop (no LayerNorm inside it), and its
    states, chunks, rewards and masks equal the unfolded rollout's."""
    from macfw import bench
    from macfw.nn.mlp import fold_layer_norms

    agent, spec, data, state, step, K, B = bench._setup("tiny")
    nets = fold_layer_norms(state.nets)
    mlps = [x for x in jax.tree_util.tree_leaves(nets, is_leaf=lambda x: isinstance(x, MLP)) if isinstance(x, MLP)]
    assert len(mlps) >= 6 and all(m.folded is not None for m in mlps)
    assert all(
        m.folded is None
        for m in jax.tree_util.tree_leaves(state.nets, is_leaf=lambda x: isinstance(x, MLP))
        if isinstance(m, MLP)
    )
    s0, g0 = data.observations[:8], jnp.zeros((8, 0))
    roll = lambda: agent.rollout(state.nets, s0, g0, jax.random.PRNGKey(4))  # noqa: E731
    assert _inside_loops(jax.make_jaxpr(roll)(), "custom_vjp_call") == 0  # no LayerNorm inside the rollout's loop
    fast = roll()
    with reference_computation(only="folded_layer_norm"):
        ref = agent.rollout(state.nets, s0, g0, jax.random.PRNGKey(4))
        roll_ref = lambda: agent.rollout(state.nets, s0, g0, jax.random.PRNGKey(4))  # noqa: E731
        assert _inside_loops(jax.make_jaxpr(roll_ref)(), "custom_vjp_call") > 0
    for k in ("states", "actions", "rewards", "masks"):
        np.testing.assert_allclose(fast[k], ref[k], rtol=1e-4, atol=1e-4, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("goal_dim", [0, 3])
def test_models_evaluated_jointly_equal_their_own_calls(goal_dim):
    """``joint_first_layer``: MAC's rollout evaluates success, reward and dynamics on the chosen chunk
    with one first-layer product when their MLPs read the same input (single-task: ``g`` empty);
    the results are each model's own call's. With a goal the inputs differ and each model is
    called; a subclass (its ``__call__`` may differ) is always called as it is."""
    from macfw.nn.models import ChunkDynamics, RewardModel, SuccessModel, evaluate_jointly
    from macfw.spec import Spec

    spec = Spec(ob_dim=6, act_dim=2, goal_dim=goal_dim, chunk_len=3)
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    models = (
        SuccessModel(spec, key=ks[0], hidden_dims=(16, 16)),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        ChunkDynamics(spec, key=ks[1], hidden_dims=(16, 16)),
        RewardModel(spec, key=ks[2], hidden_dims=(16, 16)),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
    )
    s = jax.random.normal(ks[3], (5, 6))
    g = jax.random.normal(ks[4], (5, goal_dim))
    A = jax.random.normal(ks[5], (5, 6))
    f = lambda ms, s, g, A: jax.vmap(lambda s, g, A: evaluate_jointly(ms, s, g, A))(s, g, A)  # noqa: E731
    joint = f(models, s, g, A)
    own = [jax.vmap(models[0])(s, g, A), jax.vmap(models[1])(s, A), jax.vmap(models[2])(s, g, A)]
    for a, b in zip(joint, own):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    n_dots = str(jax.make_jaxpr(f)(models, s, g, A)).count("dot_general")
    with reference_computation(only="joint_first_layer"):
        f_ref = lambda ms, s, g, A: jax.vmap(lambda s, g, A: evaluate_jointly(ms, s, g, A))(s, g, A)  # noqa: E731
        ref_dots = str(jax.make_jaxpr(f_ref)(models, s, g, A)).count("dot_general")
    assert (n_dots < ref_dots) == (goal_dim == 0), (n_dots, ref_dots)

    class MyDynamics(ChunkDynamics):
        def __call__(self, s, A):
            return super().__call__(s, A) + 1.0

    mine = (models[0], MyDynamics(spec, key=ks[1], hidden_dims=(16, 16)))  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
    out = f(mine, s, g, A)
    np.testing.assert_allclose(out[1], own[1] + 1.0, rtol=1e-5, atol=1e-5)
    assert str(jax.make_jaxpr(f)(mine, s, g, A)).count("dot_general") == ref_dots - 3  # two models called


@pytest.mark.slow
def test_joint_first_layer_equals_separate_calls_with_gradients():
    from macfw.nn.mlp import joint_first_layer

    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    mlps = [MLP(9, o, (16, 16), key=k) for o, k in zip((1, 4, 20), ks)]
    x = jax.random.normal(ks[3], (7, 9))
    loss = lambda ms, fn: sum(jnp.sum(o**2) for o in jax.vmap(lambda x: fn(ms, x))(x))  # noqa: E731
    joint = lambda ms, x: joint_first_layer(ms, x)  # noqa: E731
    sep = lambda ms, x: [m(x) for m in ms]  # noqa: E731
    np.testing.assert_allclose(loss(mlps, joint), loss(mlps, sep), rtol=1e-5)
    g_joint, g_sep = jax.grad(loss)(mlps, joint), jax.grad(loss)(mlps, sep)
    for a, b in zip(jax.tree_util.tree_leaves(g_joint), jax.tree_util.tree_leaves(g_sep)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # one product for the three first layers; MLPs of different compute dtypes are each called
    count = lambda ms, fn: str(jax.make_jaxpr(lambda x: fn(ms, x))(x[0])).count("dot_general")  # noqa: E731
    assert count(mlps, joint) == count(mlps, sep) - 2
    mixed = [mlps[0], MLP(9, 4, (16, 16), key=ks[1], compute_dtype="bfloat16")]
    assert count(mixed, joint) == count(mixed, sep)
    for a, b in zip(joint(mixed, x[0]), sep(mixed, x[0])):
        np.testing.assert_array_equal(a, b)


def test_reference_only_turns_off_the_named_speed_ups_and_names_unknown_ones():
    from macfw import reference

    with reference_computation(only="lambda_one, padded_outputs"):
        assert reference.active() and reference.active("lambda_one") and reference.active("padded_outputs")
        assert not reference.active("prefix") and not reference.active("threefry")
    with reference_computation():
        assert all(reference.active(n) for n in reference.SPEEDUPS)
    assert not reference.active() and not reference.active("prefix")
    with pytest.raises(ValueError, match=r"'fast_gelu'.*lambda_one"):
        reference.active("fast_gelu")
    with pytest.raises(ValueError, match=r"unknown: \['nope'\]"):
        with reference_computation(only="prefix,nope"):
            pass
    with pytest.raises(ValueError, match="got ''"):
        reference.parse_only("")
    assert not reference.active()


def test_vmap_steps_equals_nested_vmaps_and_names_bad_shapes():
    from macfw.agents.base import vmap_steps

    f = lambda s, g: jnp.sum(jnp.tanh(s)) * (1.0 + jnp.sum(g))  # noqa: E731
    s = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5))
    g = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 2))
    np.testing.assert_allclose(vmap_steps(f, s, g), _nested_vmap_steps(f, s, g), rtol=1e-6)
    empty = jnp.zeros((3, 4, 0))  # a single-task goal
    assert vmap_steps(f, s, empty).shape == (3, 4)
    with pytest.raises(ValueError, match=r"\(3, 5, 2\)"):
        vmap_steps(f, s, jnp.zeros((3, 5, 2)))


@pytest.mark.slow
def test_mac_losses_after_50_updates_equal_the_reference_computation():
    """``macfw.bench.against_reference`` at the tiny sizes: MAC from seed 0 on synthetic data, the
    reference computation (traced and compiled inside :func:`~macfw.reference.reference_computation`,
    in this process, so the check holds on any instruction set) against the update as it runs,
    25 dispatches of 2 updates each: every metric after the 50 updates agrees within rtol 1e-4."""
    from macfw import bench

    r = bench.against_reference("tiny", pairs=24)
    assert r["updates"] == 50 and len(r["update_s"]["reference"]) == len(r["update_s"]["current"]) == 24
    assert r["reference_update_s"] > 0 and r["current_update_s"] > 0
    assert r["speedup"] == pytest.approx(r["reference_update_s"] / r["current_update_s"])
    fast, ref = r["metrics"]["current"], r["metrics"]["reference"]
    assert fast.keys() == ref.keys()
    for k in (
        "total/loss",
        "dynamics/loss",
        "flow/loss",
        "flow/distill_loss",
        "success/loss",
        "reward/loss",
        "value/loss",
        "critic/loss",
        "critic/q_mean",
        "value/mean",
    ):
        assert k in fast, sorted(fast)
        assert np.isfinite(fast[k]), (k, fast[k])
    bad = {k: (fast[k], ref[k]) for k in fast if not np.isclose(fast[k], ref[k], rtol=1e-4, atol=1e-5)}
    assert not bad, f"fast vs reference after 50 updates: {bad}"
    assert r["max_rel_diff"] < 1e-3, r["max_rel_diff"]
    # the reference really is a different program (else this test compares a thing with itself)
    assert any(fast[k] != ref[k] for k in fast)
    with pytest.raises(ValueError, match="got 0"):
        bench.against_reference("tiny", pairs=0)


def test_written_out_threefry_gives_the_same_bits_as_jax_rolled_loop():
    """``import macfw`` lowers threefry on the CPU without JAX's rolled loop: the same random numbers
    (bits and normals, split keys), and a program without the while loop the rolled rule makes."""
    from macfw import _threefry

    def draws(k):
        ks = jax.random.split(k, 7)
        return (
            jax.vmap(lambda kk: jax.random.bits(kk, (8, 5)))(ks),
            jax.vmap(lambda kk: jax.random.normal(kk, (8, 5)))(ks),
            jax.random.split(k, 3),
        )

    key = jax.random.PRNGKey(123)
    try:
        assert _threefry.unroll_threefry_on_cpu(False)
        rolled_hlo = jax.jit(lambda k: draws(k)).lower(key).compile().as_text()
        rolled = jax.jit(lambda k: draws(k))(key)
    finally:
        assert _threefry.unroll_threefry_on_cpu(True)
    unrolled_hlo = jax.jit(lambda k: draws(k)).lower(key).compile().as_text()
    unrolled = jax.jit(lambda k: draws(k))(key)
    assert rolled_hlo is not None and unrolled_hlo is not None
    for a, b in zip(rolled, unrolled):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert " while(" in rolled_hlo and " while(" not in unrolled_hlo


def test_reference_computation_switches_every_speed_up_and_restores_them():
    from macfw import _threefry, reference
    from macfw.agents.base import vmap_steps

    assert not reference.active() and _threefry.is_unrolled()
    ln = eqx.nn.LayerNorm(8)
    x = jax.random.normal(jax.random.PRNGKey(0), (8,))
    fast_jaxpr = str(jax.make_jaxpr(lambda x: mlp_mod._layer_norm(ln, x))(x))
    s = jnp.ones((2, 3, 4))
    with reference_computation():
        assert reference.active() and not _threefry.is_unrolled()
        ref_jaxpr = str(jax.make_jaxpr(lambda x: mlp_mod._layer_norm(ln, x))(x))
        nested = str(jax.make_jaxpr(lambda s: vmap_steps(jnp.sum, s))(s))
        hlo = jax.jit(lambda k: jax.random.normal(k, (4,))).lower(jax.random.PRNGKey(0)).compile().as_text()
    assert not reference.active() and _threefry.is_unrolled()
    assert "custom_vjp" in fast_jaxpr and "custom_vjp" not in ref_jaxpr
    assert "reshape" in str(jax.make_jaxpr(lambda s: vmap_steps(jnp.sum, s))(s)) and "reshape" not in nested
    assert hlo is not None
    assert " while(" in hlo


def test_cpu_training_step_is_compiled_with_wide_vectors_and_the_reference_is_not(monkeypatch):
    """``wide_vectors``: a CPU :class:`~macfw.step.TrainStep` gets ``xla_cpu_prefer_vector_width = 512``
    (this jaxlib accepts it); none on another platform, for a step built inside the reference
    computation, when ``XLA_FLAGS`` sets the width itself, or for an option XLA does not know. (That
    it computes the same update is the 50-update comparison above: its reference step has XLA's
    default width.)"""
    from macfw import bench, compiler

    assert compiler.compiler_options("cpu") == {"xla_cpu_prefer_vector_width": 512}
    assert compiler.compiler_options("gpu") is None
    with reference_computation(only="wide_vectors"):
        assert compiler.compiler_options("cpu") is None
    with reference_computation(only="prefix"):
        assert compiler.compiler_options("cpu") == compiler.CPU_OPTIONS
    assert not compiler._accepted((("xla_cpu_no_such_option_for_this_test", 1),))
    with monkeypatch.context() as m:
        m.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
        assert compiler.compiler_options("cpu") is None

    step = bench._setup("tiny")[4]
    assert step.compiler_options == compiler.CPU_OPTIONS
    with reference_computation(only="wide_vectors"):
        assert bench._setup("tiny")[4].compiler_options is None


@pytest.mark.parametrize("goal_dim", [0, 3])
def test_rollout_heads_labelled_after_the_loop_equal_heads_inside_it(goal_dim):
    """``heads_after_rollout``: inside MAC's rollout loop only the sampler and the dynamics run (the
    next state is all the next step reads); the success head (and, single-task, the reward head)
    label the ``H x B`` (state, chunk) pairs after it. The states, chunks, rewards and masks are the
    reference's (every head inside the loop), and the loop holds fewer products."""
    from macfw import bench

    agent, spec, data, state, step, K, B = bench._setup("tiny", goal_dim=goal_dim)
    s0 = data.observations[:8]
    g0 = 0.5 * jax.random.normal(jax.random.PRNGKey(5), (8, goal_dim))
    roll = lambda: agent.rollout(state.nets, s0, g0, jax.random.PRNGKey(4))  # noqa: E731
    fast, fast_dots = roll(), _inside_loops(jax.make_jaxpr(roll)(), "dot_general")
    with reference_computation(only="heads_after_rollout"):  # a new function: JAX caches traces
        roll_ref = lambda: agent.rollout(state.nets, s0, g0, jax.random.PRNGKey(4))  # noqa: E731
        ref, ref_dots = roll_ref(), _inside_loops(jax.make_jaxpr(roll_ref)(), "dot_general")
    # out of the loop: goal-conditioned, the success head's three products; single-task, the three
    # models' joint first layer and the success and reward heads' other two products each, while the
    # dynamics' own first layer comes in
    assert ref_dots - fast_dots == (3 if goal_dim else 1 + 4 - 1), (fast_dots, ref_dots)
    assert 0.0 < float(np.mean(fast["masks"])) <= 1.0 and np.ptp(np.asarray(fast["rewards"])) > 0
    for k in ("states", "actions", "rewards", "masks"):
        assert fast[k].shape == ref[k].shape, k
        np.testing.assert_allclose(fast[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
