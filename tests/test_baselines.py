"""Every agent in gin/baselines/ on the smoke budget, through ``python -m macfw.run``: it trains to a
``summary.json`` and a run resumed from its step-20 checkpoint ends with the same ``param_checksum``
as an uninterrupted run. The model-based ones (:data:`FULL`) are resumed after a real SIGKILL and
also run on 4 forced CPU devices (the batch sharded), logging the same losses.

The agents are found by listing gin/baselines/*.gin, so a new baseline is covered by adding its
Gin file. Goal-conditioned agents (whose Gin file sets ``OGBenchDataset.task_mode = 'oraclerep'``;
the smoke budget leaves the mode alone) run goal-conditioned; the others single-task. Subprocesses
run two at a time and share the session's dataset and compilation caches (tests/conftest.py).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test here shares one end-to-end campaign (the slow tier)

REPO = Path(__file__).resolve().parents[1]
BASELINES = sorted(p.stem for p in (REPO / "gin" / "baselines").glob("*.gin"))
pytestmark = pytest.mark.slow


def _cmd(name: str, workdir: Path, *bindings: str) -> list[str]:
    # one evaluation task (task2, cube-single's single task), so goal-conditioned agents evaluate 1 episode, not 5
    cmd = [
        sys.executable,
        "-m",
        "macfw.run",
        "--gin_file",
        f"gin/baselines/{name}.gin",
        "--gin_file",
        "gin/smoke_budget.gin",
        "--gin_bindings",
        "train.progress = False",
        "--gin_bindings",
        "train.eval_task_ids = (2,)",
        "--workdir",
        str(workdir),
    ]
    for b in bindings:
        cmd += ["--gin_bindings", b]
    return cmd


def _env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MACFW_DEBUG"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    return env


def _run(cmd, env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


#: The model-based baselines get the full campaign (SIGKILL and 4 devices); the model-free ones, which
#: have no training-time state beyond parameters, optimiser and targets, a resume from the reference
#: run's step-20 checkpoint (the same check of what a checkpoint holds, two processes fewer) to keep
#: CI within its time.
FULL = {"mopo", "mobile", "leq", "fmpc"}


def _campaign(name: str, root: Path) -> dict:
    """Reference run; a run SIGKILLed after step 20's checkpoint then re-run (model-free agents: a copy of
    the reference's step-20 checkpoint resumed); a 4-device run (model-based agents)."""
    import shutil

    out = {}
    ref, killed, four = root / f"{name}-ref", root / f"{name}-killed", root / f"{name}-4dev"
    out["ref"] = _run(_cmd(name, ref), _env())
    if name in FULL:
        out["killed1"] = _run(_cmd(name, killed, "train.debug_sigkill_after_save = 20"), _env())
    else:
        shutil.copytree(ref / "checkpoints" / "20", killed / "checkpoints" / "20")
        out["killed1"] = subprocess.CompletedProcess([], -9, "", "")  # stands for the killed run
    out["summary_after_kill"] = (killed / "summary.json").exists()
    out["killed2"] = _run(_cmd(name, killed), _env())
    if name in FULL:
        out["four"] = _run(_cmd(name, four), _env(4))
    out["dirs"] = {"ref": ref, "killed": killed, "four": four}
    return out


@pytest.fixture(scope="module")
def campaigns(request, tmp_path_factory):
    """The campaigns of the baselines whose tests were selected (``-k mopo`` runs MOPO's only)."""
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params
    }
    root = tmp_path_factory.mktemp("baselines")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(_campaign, n, root) for n in BASELINES if n in selected}
        return {n: f.result() for n, f in futures.items()}


def _ok(r: subprocess.CompletedProcess, what: str) -> None:
    assert r.returncode == 0, f"{what}: exit code {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def _rows(workdir: Path) -> list[dict]:
    with open(workdir / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_baseline_has_a_gin_file():
    assert FULL | {"fql", "gciql", "nstep_sacbc", "sharsa"} <= set(BASELINES), BASELINES


@pytest.mark.parametrize("name", BASELINES)
def test_smoke_run_writes_its_summary(campaigns, name):
    c = campaigns[name]
    _ok(c["ref"], f"{name} smoke run")
    s = json.loads((c["dirs"]["ref"] / "summary.json").read_text())
    assert s["step"] == 40 and 0.0 <= s["success"] <= 1.0 and s["episodes"] >= 1
    rows = _rows(c["dirs"]["ref"])
    assert [int(float(r["step"])) for r in rows] == [10, 20, 30, 40]
    losses = [k for k in rows[0] if k.endswith("/loss")]
    assert losses and all(np.isfinite(float(r[k])) for r in rows for k in losses), losses


@pytest.mark.parametrize("name", BASELINES)
def test_sigkill_after_a_checkpoint_resumes_to_the_same_checksum(campaigns, name):
    c = campaigns[name]
    assert c["killed1"].returncode == -9, (c["killed1"].returncode, c["killed1"].stderr[-3000:])  # SIGKILL
    assert not c["summary_after_kill"]
    _ok(c["killed2"], f"{name} resumed run")
    assert "resuming from step 20" in c["killed2"].stdout, c["killed2"].stdout[-2000:]
    ref = json.loads((c["dirs"]["ref"] / "summary.json").read_text())
    resumed = json.loads((c["dirs"]["killed"] / "summary.json").read_text())
    assert resumed["param_checksum"] == ref["param_checksum"]
    assert resumed["success"] == ref["success"]


@pytest.mark.parametrize("name", sorted(FULL & set(BASELINES)))
def test_four_devices_log_the_losses_of_one(campaigns, name):
    c = campaigns[name]
    _ok(c["four"], f"{name} on 4 devices")
    s = json.loads((c["dirs"]["four"] / "summary.json").read_text())
    assert len(s["devices"]) == 4
    one, four = _rows(c["dirs"]["ref"]), _rows(c["dirs"]["four"])
    keys = [k for k in one[0] if k.endswith("/loss")]
    for r1, r4 in zip(one, four):
        for k in keys:
            np.testing.assert_allclose(float(r4[k]), float(r1[k]), rtol=2e-3, atol=1e-4, err_msg=f"{name} {k}")
