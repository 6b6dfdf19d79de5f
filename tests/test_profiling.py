"""The profile of an update (``python -m macfw.bench --profile``, :mod:`macfw.profiling`): phases from
the named scopes, kinds of operations, matrix-product FLOPs from the compiled program's shapes, and
the command end to end at the tiny preset (its rollout's FLOPs against a count by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from macfw import profiling
from macfw.profiling import kind_of, parse_hlo, phase_of

TIMEOUT = float(os.environ.get("MACFW_TEST_SUBPROCESS_TIMEOUT", "480"))


def test_phase_is_the_innermost_named_scope_and_loss_only_as_a_fallback():
    assert phase_of("jit(run)/while/body/closed_call/rollout/while/body/vmap()/dot_general") == "rollout"
    assert phase_of("jit(run)/while/body/loss/transpose(jvp(value_critic))/vmap()/dot_general") == "value_critic"
    assert phase_of("jit(run)/loss/model_losses/vmap()/loss/mul") == "model_losses"  # a function named loss inside
    assert phase_of("jit(run)/while/body/loss/add_any") == "loss"
    assert phase_of("jit(run)/while/body/optimizer/mul") == "optimizer"
    assert phase_of("jit(run)/while/body/sampling/gather") == "sampling"
    assert phase_of("jit(run)/while/body/closed_call/mul") == "other"
    assert phase_of("jit(run)/model_losses_extra/mul") == "other"  # whole components only
    # a rollout inside the loss (LEQ's actor) is the rollout
    assert phase_of("jit(run)/loss/transpose(jvp(rollout))/while/body/dot_general") == "rollout"


def test_kinds_of_operations():
    assert kind_of("jit(run)/vmap()/dot_general", "fusion") == "matrix products"
    assert kind_of("", "dot") == "matrix products"
    assert kind_of("jit(run)/vmap(jit(_normal))/jit(_normal_real)/erf_inv", "fusion") == "random numbers"
    assert kind_of("jit(run)/jit(threefry2x32)/add", "fusion") == "random numbers"
    assert kind_of("jit(run)/vmap()/reduce_sum", "fusion") == "reductions"
    assert kind_of("jit(run)/argmax", "fusion") == "reductions"
    assert kind_of("jit(run)/jit(dynamic_update_index_in_dim)/dynamic_update_slice", "fusion") == "data movement"
    assert kind_of("", "copy") == "data movement"
    assert kind_of("jit(run)/vmap()/tanh", "fusion") == "elementwise"


def test_parse_hlo_counts_every_product_once_per_execution_with_its_phase():
    """``x @ w1`` outside any scope, and inside a 3-step scan under ``rollout`` one ``(8, 16) x (16, 16)``
    product per step: the parsed ops carry the product's FLOPs once (the trace multiplies by executions)."""

    def f(x, w1, w2):
        y = jnp.tanh(x @ w1)  # (8, 32) x (32, 16): 2 * 8 * 16 * 32 FLOPs

        def body(h, _):
            return jnp.tanh(h @ w2), None

        with jax.named_scope("rollout"):
            y, _ = jax.lax.scan(body, y, None, length=3)
        return y.sum()

    x, w1, w2 = jnp.ones((8, 32)), jnp.ones((32, 16)) * 0.01, jnp.ones((16, 16)) * 0.01
    text = jax.jit(f).lower(x, w1, w2).compile().as_text()
    assert text is not None
    module, ops = parse_hlo(text)
    assert module.startswith("jit_f")
    mm = {n: o for n, o in ops.items() if o.kind == "matrix products" and o.flops > 0}
    by_phase = {}
    for o in mm.values():
        by_phase[o.phase] = by_phase.get(o.phase, 0.0) + o.flops
    assert by_phase == {"other": 2 * 8 * 16 * 32, "rollout": 2 * 8 * 16 * 16}, (by_phase, mm)
    assert any(o.kind == "loop" for o in ops.values())  # the scan's while: left out of the table
    assert all(o.flops == 0 for o in ops.values() if o.kind != "matrix products")


_FUSED_PRODUCT_HLO = """HloModule jit_f, entry_computation_layout={(f32[8,16]{1,0}, f32[16,16]{1,0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_computation.1 (param_0: f32[8,16], param_1: f32[16,16]) -> f32[8] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[16,16]{1,0} parameter(1)
  %dot.1 = f32[8,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, \
metadata={op_name="jit(f)/rollout/vmap()/dot_general"}
  %c = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%dot.1, %c), dimensions={1}, to_apply=%add, metadata={op_name="jit(f)/reduce_sum"}
}

%fused_computation.2 (param_0: f32[8,16]) -> f32[8] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %reduce.2 = f32[8]{0} reduce(%param_0, %c), dimensions={1}, to_apply=%add, metadata={op_name="jit(f)/reduce_sum"}
}

ENTRY %main (x: f32[8,16], w: f32[16,16]) -> f32[8] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,16]{1,0} parameter(1)
  %ynn_fusion.1 = f32[8]{0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.1, \
metadata={op_name="jit(f)/reduce_sum"}
  ROOT %reduce_fusion.2 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_computation.2, \
metadata={op_name="jit(f)/reduce_sum"}
}
"""


def test_a_fusion_around_a_product_is_the_product_in_its_phase():
    """XLA's CPU backend may fuse a product with what reads or feeds it under a root named otherwise
    (MAC's rollout heads: the LayerNorm fold's column sums, a ``reduce_sum`` outside any scope): the
    fusion counts as a matrix product, with its FLOPs, in the product's phase; a reduction without a
    product stays a reduction."""
    module, ops = parse_hlo(_FUSED_PRODUCT_HLO)
    assert module == "jit_f"
    fused, plain = ops["ynn_fusion.1"], ops["reduce_fusion.2"]
    assert (fused.kind, fused.phase, fused.flops) == ("matrix products", "rollout", 2 * 8 * 16 * 16)
    assert (plain.kind, plain.phase, plain.flops) == ("reductions", "other", 0.0)


def test_breakdown_sums_op_time_per_update_and_skips_loops_and_unknown_ops():
    ops = {
        "a": profiling.Op("rollout", "matrix products", 1e6),
        "b": profiling.Op("rollout", "elementwise", 0.0),
        "w": profiling.Op("rollout", "loop", 0.0),
        "c": profiling.Op("optimizer", "elementwise", 0.0),
    }
    times = {"a": (4000.0, 20), "b": (1000.0, 20), "w": (9000.0, 10), "c": (500.0, 10), "zzz": (70.0, 1)}
    r = profiling.breakdown(ops, times, updates=10, peak_flops=1e10)
    rows = r["phases"]
    assert list(rows) == ["rollout", "optimizer"]
    assert rows["rollout"]["matrix products"] == pytest.approx(0.4)  # 4000 us over 10 updates
    assert rows["rollout"]["total"] == pytest.approx(0.5)  # the loop's 9000 us are not counted
    assert rows["rollout"]["matmul_flops"] == pytest.approx(2e6)  # 20 executions x 1e6 / 10 updates
    assert rows["rollout"]["matmul_fraction_of_peak"] == pytest.approx(2e6 / 0.4e-3 / 1e10)
    assert rows["optimizer"]["matmul_fraction_of_peak"] is None
    assert r["op_time_ms"] == pytest.approx(0.55) and r["matched_ops"] == 3 and r["unmatched_ops"] == 1
    assert [o["name"] for o in r["top_ops"]] == ["a", "b", "c"] and r["top_ops"][0]["executions"] == 2
    assert "| rollout | 0.50 |" in profiling.format_table(
        dict(r, agent="X", preset="p", wall_ms=1.0, matmul_peak_flops=1e10)
    )


def test_wall_time_per_phase_counts_concurrent_operations_once():
    """A phase's ``wall`` is the time during which at least one of its operations ran: two of its ops
    running side by side count once, ops of other phases do not shorten it, and ``busy_ms`` is the
    union over every op; loops and unknown ops are left out."""
    assert profiling.covered([]) == 0.0
    assert profiling.covered([(0.0, 10.0), (5.0, 12.0), (20.0, 25.0), (21.0, 22.0)]) == pytest.approx(17.0)
    assert profiling.covered([(3.0, 4.0), (0.0, 1.0)]) == pytest.approx(2.0)  # any order
    ops = {
        "a": profiling.Op("rollout", "matrix products", 0.0),
        "b": profiling.Op("rollout", "elementwise", 0.0),
        "c": profiling.Op("value_critic", "elementwise", 0.0),
        "w": profiling.Op("rollout", "loop", 0.0),
    }
    # microseconds, over 2 updates: a and b overlap by 400 us; c runs partly beside b; the loop spans all
    spans = [("a", 0.0, 1000.0), ("b", 600.0, 1600.0), ("c", 1500.0, 2500.0), ("w", 0.0, 5000.0), ("zzz", 0.0, 9000.0)]
    r = profiling.breakdown(ops, profiling.op_times(spans), updates=2, peak_flops=1e10, spans=spans)
    assert r["phases"]["rollout"]["total"] == pytest.approx(1.0)  # 2000 us of op time / 2 updates
    assert r["phases"]["rollout"]["wall"] == pytest.approx(0.8)  # 0..1600 us
    assert r["phases"]["value_critic"]["wall"] == pytest.approx(0.5)
    assert r["busy_ms"] == pytest.approx(1.25)  # 0..2500 us
    table = profiling.format_table(dict(r, agent="X", preset="p", wall_ms=1.5, matmul_peak_flops=1e10))
    assert "| phase | wall | total |" in table and "| rollout | 0.80 | 1.00 |" in table
    assert "some operation running for 1.25 ms" in table
    plain = profiling.breakdown(ops, profiling.op_times(spans), updates=2, peak_flops=1e10)
    assert "wall" not in plain["phases"]["rollout"] and "busy_ms" not in plain


def _mlp_macs(i: int, o: int, h: int = 32) -> int:
    return i * h + h * h + h * o


@pytest.mark.slow
def test_profile_command_at_the_tiny_preset(tmp_path):
    """``python -m macfw.bench --preset tiny --profile`` (it restarts itself with the CPU trace flag):
    MAC's phases are all there, and the rollout's matrix-product FLOPs per update lie between the
    count with the state's products shared across the candidates and the count without.

    Tiny preset: 2 x 32 networks, chunk 5 x 5 actions, 16 rollout states, H = 3, N = 2 candidates,
    ob_dim 28, no goal. Per step: policy mu (53 -> 25) and critic (53 -> 1) on 16 x 2 candidates,
    success and reward (53 -> 1) and dynamics (53 -> 28) on the 16 chosen chunks. The products with one
    output (the critic's, success's and reward's last layers) may not count: XLA may rewrite a
    matrix-vector product as a multiply and a reduction."""
    out_json = tmp_path / "profile.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACFW_")}
    env["XLA_FLAGS"] = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device") and "traceme" not in f
    )
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "macfw.bench",
            "--preset",
            "tiny",
            "--profile",
            "--dispatches",
            "2",
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        cwd=str(Path(__file__).parents[1]),
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert "| rollout |" in p.stdout and "matrix products" in p.stdout
    r = json.loads(out_json.read_text())
    assert r["agent"] == "MAC" and r["steps_per_dispatch"] == 2 and r["dispatches"] == 2
    assert {"rollout", "model_losses", "value_critic", "optimizer"} <= set(r["phases"])
    assert r["matched_ops"] > 50 and r["wall_ms"] > 0
    assert r["op_time_ms"] == pytest.approx(sum(row["total"] for row in r["phases"].values()), rel=1e-6)
    for row in r["phases"].values():
        assert row["total"] == pytest.approx(sum(row[k] for k in profiling.KINDS), rel=1e-6, abs=1e-9)
        assert 0.0 < row["wall"] <= row["total"] * (1 + 1e-6)  # concurrent ops of a phase count once
    assert r["busy_ms"] <= sum(row["wall"] for row in r["phases"].values()) * (1 + 1e-6)
    assert r["busy_ms"] <= r["wall_ms"]  # the ops ran within the profiled dispatches
    assert "| phase | wall | total |" in p.stdout
    B, N, H = 16, 2, 3
    heads = 2 * _mlp_macs(53, 1) + _mlp_macs(53, 28)
    shared = B * 28 * 32 * 2 + B * N * (25 * 32 + 32 * 32 + 32 * 25) + B * N * (25 * 32 + 32 * 32 + 32) + B * heads
    shared -= B * N * 32 + 2 * B * 32  # the one-output last layers
    reference = B * N * (_mlp_macs(53, 25) + _mlp_macs(53, 1)) + B * heads
    roll = r["phases"]["rollout"]["matmul_flops"]
    assert 2 * H * shared * (1 - 1e-6) <= roll <= 2 * H * reference * (1 + 1e-6), (
        roll,
        2 * H * shared,
        2 * H * reference,
    )
