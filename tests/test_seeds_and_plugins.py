"""Several seeds in one process, and a component registered from outside the package."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import equinox as eqx
import jax
import numpy as np
import pytest

from macfw.agents.base import AgentState
from macfw.bench import PRESETS, build_agent, synthetic_data
from macfw.spec import Spec
from macfw.train import TrainStep, init_state

REPO = Path(__file__).resolve().parents[1]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


@pytest.mark.slow
def test_vmapped_seeds_match_separate_runs():
    p = PRESETS["tiny"]
    agent = build_agent(p)
    spec = Spec(ob_dim=28, act_dim=5, goal_dim=0, chunk_len=agent.chunk_len)
    data = synthetic_data(spec)
    stacked = cast(AgentState, init_state(agent, spec, seed=3, num_seeds=2))
    step = TrainStep(agent, stacked, batch_size=32, steps_per_dispatch=2, num_seeds=2)
    for _ in range(3):
        stacked, metrics = step(data, stacked)
    assert np.asarray(metrics["total/loss"]).shape == (2,)  # per-seed metrics
    single_step = None
    for i, seed in enumerate((3, 4)):
        state = init_state(agent, spec, seed=seed)
        if single_step is None:
            single_step = TrainStep(agent, state, batch_size=32, steps_per_dispatch=2)
        for _ in range(3):
            state, _ = single_step(data, state)
        for a, b in zip(
            _leaves(state),
            _leaves(jax.tree_util.tree_map(lambda x: x[i], eqx.filter(stacked, eqx.is_array))),  # noqa: B023  (called within this iteration)
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the two seeds really differ (the vmapped state is not one seed broadcast)
    w = _leaves(stacked.nets)[0]
    assert not np.allclose(w[0], w[1])


@pytest.mark.slow
def test_user_component_from_outside_module(tmp_path):
    """CONTRIBUTING's walk-through: register TopKMeanSampler in examples/, select it with --gin_file."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO / "examples"),
        MACFW_CACHE_DIR=os.environ.get("MACFW_CACHE_DIR", str(tmp_path / "cache")),
    )
    wd = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "macfw.run",
        "--import",
        "my_components",
        "--gin_file",
        "gin/smoke.gin",
        "--gin_file",
        "examples/topk.gin",
        "--gin_bindings",
        "train.num_steps = 20",
        "--gin_bindings",
        "train.num_seeds = 2",
        "--workdir",
        str(wd),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = (wd / "config.gin").read_text()
    assert "TopKMeanSampler" in cfg
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["per_seed_success"]) == 2
    per_task = summary["per_seed_per_task_success"]  # (compare.py's goal-conditioned tables read it)
    assert [sorted(d) for d in per_task] == [sorted(summary["per_task_success"])] * 2
    assert [float(np.mean(list(d.values()))) for d in per_task] == pytest.approx(summary["per_seed_success"])
    # without the import the name is unknown and the error lists the registered samplers
    r = subprocess.run(cmd[:3] + cmd[5:], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "TopKMeanSampler" in r.stderr and "RejectionSampler" in r.stderr


@pytest.mark.slow
def test_user_agent_in_one_file_trains_resumes_and_evaluates(tmp_path):
    """CONTRIBUTING's "Adding an agent": examples/my_agent.py + examples/chunk_bc.gin, nothing else."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO / "examples"),
        MACFW_CACHE_DIR=os.environ.get("MACFW_CACHE_DIR", str(tmp_path / "cache")),
    )
    wd = tmp_path / "run"
    base = [
        sys.executable,
        "-m",
        "macfw.run",
        "--import",
        "my_agent",
        "--gin_file",
        "examples/chunk_bc.gin",
        "--gin_file",
        "gin/smoke_budget.gin",
        "--gin_bindings",
        "ChunkBC.chunk_len = 5",
        "--gin_bindings",
        "train.progress = False",
        "--workdir",
        str(wd),
    ]
    r = subprocess.run(
        base + ["--gin_bindings", "train.num_steps = 20"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads((wd / "summary.json").read_text())
    assert first["agent"] == "ChunkBC" and first["step"] == 20 and first["spec"]["chunk_len"] == 5
    r = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # smoke: 40 steps
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 20" in r.stdout
    second = json.loads((wd / "summary.json").read_text())
    assert second["step"] == 40 and second["param_checksum"] != first["param_checksum"]
    import csv

    with open(wd / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(x["step"])) for x in rows] == [10, 20, 30, 40]
    assert float(rows[-1]["flow/loss"]) < float(rows[0]["flow/loss"]) + 1.0  # finite, logged under its namespace
    r = subprocess.run(
        [sys.executable, "-m", "macfw.evaluate", "--import", "my_agent", "--workdir", str(wd), "--episodes", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((wd / "eval_step40.json").read_text())["episodes"] == 1
