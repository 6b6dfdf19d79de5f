"""Every out-of-range configured value: one ``macfw: error:`` line naming the binding, the value and the
allowed range, exit code 2, and nothing written to the (existing) workdir.

Each case is a real ``python -m macfw.run`` on gin/smoke.gin with one bad binding, run against its own
existing workdir (a sentinel file and a fake ``checkpoints/`` folder). The checks fire before any data
is loaded, so no case generates data; the subprocesses run three at a time (about 2 s each).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--gin_file", "gin/smoke.gin", "--gin_bindings", "train.progress = False"]
OUT = "is out of range: must be"

# (bindings, regex the one error line must match: binding, value, range). smoke.gin: batch 32, chunk 5,
# steps_per_dispatch 10, one CPU device.
BAD = [
    (["MAC.horizon = 0"], rf"MAC\.horizon = 0 {OUT} an integer >= 1\."),
    (["MAC.gamma = 1.5"], rf"MAC\.gamma = 1\.5 {OUT} a number in \(0\.0, 1\.0\]"),
    (["MAC.lam = -0.1"], rf"MAC\.lam = -0\.1 {OUT} a number in \[0\.0, 1\.0\]"),
    (["MAC.tau = 0"], rf"MAC\.tau = 0 {OUT} a number in \(0\.0, 1\.0\]"),
    (["MAC.learning_rate = -1e-3"], rf"MAC\.learning_rate = -0\.001 {OUT} a number > 0\.0"),
    (["MAC.rollout_batch_size = 0"], rf"MAC\.rollout_batch_size = 0 {OUT} None or an integer >= 1"),
    (["MAC.rollout_batch_size = 100000"],
     rf"MAC\.rollout_batch_size = 100000 {OUT} None or an integer in 1\.\.32 \(train\.batch_size = 32\)"),
    (["train.agent = @MACFQL()", "MACFQL.alpha = -1.0"], rf"MACFQL\.alpha = -1\.0 {OUT} a number >= 0\.0"),
    (["train.batch_size = -3"], rf"train\.batch_size = -3 {OUT} an integer >= 1\."),
    (["train.num_steps = 0"], rf"train\.num_steps = 0 {OUT} a positive integer multiple of "
                              r"train\.steps_per_dispatch = 10"),
    (["train.log_interval = 7"], rf"train\.log_interval = 7 {OUT} a positive integer multiple of "
                                 r"train\.steps_per_dispatch = 10"),
    (["train.steps_per_dispatch = True"], rf"train\.steps_per_dispatch = True {OUT} an integer >= 1"),
    (["train.eval_episodes = 0"], rf"train\.eval_episodes = 0 {OUT} an integer >= 1"),
    (["train.execute_steps = 0"], rf"train\.execute_steps = 0 {OUT} an integer in 1\.\.5 \(actions per decision of MAC\)"),
    (["train.execute_steps = 99"], rf"train\.execute_steps = 99 {OUT} an integer in 1\.\.5"),
    (["make_mesh.mesh_shape = (3,)"], rf"make_mesh\.mesh_shape = \(3,\) {OUT} a shape covering the 1 device\(s\)"),
    (["RejectionSampler.num_train_candidates = 0"], rf"RejectionSampler\.num_train_candidates = 0 {OUT} an integer"),
    (["RejectionSampler.num_act_candidates = -1"], rf"RejectionSampler\.num_act_candidates = -1 {OUT} an integer"),
    (["FlowPolicy.flow_steps = 0"], rf"FlowPolicy\.flow_steps = 0 {OUT} an integer >= 1"),
    (["FlowPolicy.solver = 'rk99'"], rf"FlowPolicy\.solver = 'rk99' {OUT} one of \[.*'euler'"),
    (["QCritic.hidden_dims = (0,)"], rf"QCritic\.hidden_dims = \(0,\) {OUT} a non-empty tuple of positive integers"),
    (["HIDDEN = ()"], rf"\w+\.hidden_dims = \(\) {OUT} a non-empty tuple of positive integers"),
    (["MAC.policy = @GaussianPolicy", "GaussianPolicy.log_std_min = 3.0"],
     rf"GaussianPolicy\.log_std_min = 3\.0 {OUT} a number < 2\.0 \(GaussianPolicy\.log_std_max = 2\.0\)"),
    (["OGBenchDataset.task_id = 9"], rf"OGBenchDataset\.task_id = 9 {OUT} None or an integer in 1\.\.5"),
    (["MAC.chunk_len = 0"], rf"MAC\.chunk_len = 0 {OUT} an integer >= 1"),
    (["OGBenchDataset.task_id = 2", "train.eval_task_ids = (1, 3)"],
     r"trained single-task on cube-single task2 .* cannot be evaluated on task\(s\) \[1, 3\]"),
    (["OGBenchDataset.task_mode = 'goals'"], rf"OGBenchDataset\.task_mode = 'goals' {OUT} one of \['singletask'"),
]
IDS = [b[-1] for b, _ in BAD]


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` (itself included) with its modification time, and each file's bytes."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_mtime_ns, p.read_bytes() if p.is_file() else None)
    return out


def _run(i: int, bindings: list[str], root: Path, env: dict) -> dict:
    workdir = root / f"run{i}"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "sentinel.txt").write_text("an earlier run's file\n")
    (workdir / "checkpoints" / "note").write_text("not a checkpoint\n")
    before = _snapshot(workdir)
    cmd = [sys.executable, "-m", "macfw.run", *SMOKE, *[a for b in bindings for a in ("--gin_bindings", b)],
           "--workdir", str(workdir)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return {"rc": r.returncode, "err": r.stderr, "before": before, "after": _snapshot(workdir)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_bindings")
    env = {k: v for k, v in os.environ.items() if k not in ("MACFW_DEBUG", "JAX_COMPILATION_CACHE_DIR")}
    env.update(MACFW_CACHE_DIR=str(root / "cache"), MACFW_NO_COMPILE_CACHE="1", JAX_PLATFORMS="cpu")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(_run, i, bindings, root, env) for i, (bindings, _) in enumerate(BAD)]
        out = [f.result() for f in futures]
    assert not (root / "cache").exists() or not any((root / "cache").rglob("*.npz")), "a case generated data"
    return out


@pytest.mark.parametrize("i", range(len(BAD)), ids=IDS)
def test_bad_binding_gives_one_line_exit_2_and_writes_nothing(results, i):
    bindings, pattern = BAD[i]
    r = results[i]
    tail = r["err"][-3000:]
    lines = [ln for ln in r["err"].splitlines() if ln.startswith("macfw: error:")]
    assert r["rc"] == 2, f"{bindings}: exit code {r['rc']}, expected 2; stderr:\n{tail}"
    assert "Traceback" not in r["err"], f"{bindings}: a traceback:\n{tail}"
    assert len(lines) == 1, f"{bindings}: {len(lines)} 'macfw: error:' lines, expected 1; stderr:\n{tail}"
    assert re.search(pattern, lines[0]), f"{bindings}: the error line does not match {pattern!r}:\n{lines[0]}"
    assert "Fix the Gin binding" in lines[0], lines[0]
    assert r["after"] == r["before"], f"{bindings}: the existing workdir changed"


def test_table_is_large_enough():
    assert len(BAD) >= 14 and len({tuple(b) for b, _ in BAD}) == len(BAD)
