"""The parity harness times macfw's update as its training loop runs it, several updates per compiled
call (``experiments/parity_cases/common.py``: ``macfw_update(agent, state, steps=K)`` over ``stacked``
batches, issue 29). Those K scanned updates must be the K updates one call each would make, or the
speed column would time another computation. No reference code needed."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))

from parity_cases import mac as mac_case  # noqa: E402  # pyright: ignore[reportMissingImports]  (experiments/ on sys.path above)
from parity_cases.common import Options, macfw_update, stacked, time_updates  # noqa: E402  # pyright: ignore[reportMissingImports]


def _tiny():
    sz = mac_case.Sizes(hidden=(32, 32), batch=16, rollout_batch=8, horizon=3, candidates=2, flow_steps=3, goal_dim=0)
    agent, spec, state = mac_case.build_macfw(sz, 0)
    data = mac_case.make_data(spec, sz, 0)
    batch = jax.tree_util.tree_map(np.asarray, mac_case.macfw_batch(agent, data, jax.random.PRNGKey(3), sz))
    return agent, state, batch


def test_scanned_updates_are_the_single_calls():
    agent, state, batch = _tiny()
    single, arrays_1 = macfw_update(agent, state)
    scanned, arrays_k = macfw_update(agent, state, 3)
    m1 = None
    for _ in range(3):
        arrays_1, m1 = single(arrays_1, batch)
    arrays_k, mk = scanned(arrays_k, stacked(batch, 3))
    for a, b in zip(jax.tree_util.tree_leaves(arrays_1), jax.tree_util.tree_leaves(arrays_k)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert m1 is not None and set(m1) == set(mk)
    np.testing.assert_allclose(float(m1["total/loss"]), float(mk["total/loss"]), rtol=1e-4)
    # and the arrays moved: three updates are not zero updates
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree_util.tree_leaves(arrays_k), jax.tree_util.tree_leaves(macfw_update(agent, state)[1]))
        if np.issubdtype(np.asarray(a).dtype, np.floating)
    )
    assert moved > 0


def test_time_updates_reports_both_sides():
    agent, state, batch = _tiny()
    calls = []

    def reference_update():  # a stand-in for the authors' update: any jitted computation
        calls.append(1)
        return jax.numpy.ones(3) * len(calls)

    flops = {"macfw": 1e6, "reference": 2e6}
    r = time_updates(agent, state, batch, reference_update, flops, Options(pairs=1, steps_per_dispatch=2))
    assert r["steps_per_dispatch"] == 2
    assert set(r["updates_per_s"]) == {"macfw", "reference"} and min(r["updates_per_s"].values()) > 0
    assert r["updates_per_s_single_call"]["macfw"] > 0
    # warm-up (1) + the alternation's warm-up call (2) + one timed pair (2): one reference update per call
    assert len(calls) == 5
    assert r["utilisation"]["reference"] == pytest.approx(
        2e6 * r["updates_per_s"]["reference"] / r["matmul_peak_flops"]
    )
    with pytest.raises(ValueError, match="steps_per_dispatch must be >= 1, got 0"):
        time_updates(agent, state, batch, reference_update, flops, Options(steps_per_dispatch=0))
