"""Every out-of-range configured value: one ``macfw: error:`` line naming the binding, the value and the
allowed range, exit code 2, and nothing written to the (existing) workdir.

Each case is ``macfw.run``'s entry point on gin/smoke.gin with one bad binding, run against its own
existing workdir (a sentinel file and a fake ``checkpoints/`` folder). The checks fire before any data
is loaded, so no case generates data. The cases run one after another in one worker process (this
file run as a script: ``python tests/test_bad_bindings.py --worker CASES.json OUT.json``), calling
``macfw.run.main`` with a fresh Gin config each and capturing its stderr and return value, the exit
code of ``python -m macfw.run``; one case also runs as a real ``python -m macfw.run`` process, so
the command's own exit code and output are checked too. (27 processes took about 55 s of CI.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import traceback
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
    (
        ["MAC.rollout_batch_size = 100000"],
        rf"MAC\.rollout_batch_size = 100000 {OUT} None or an integer in 1\.\.32 \(train\.batch_size = 32\)",
    ),
    (["train.agent = @MACFQL()", "MACFQL.alpha = -1.0"], rf"MACFQL\.alpha = -1\.0 {OUT} a number >= 0\.0"),
    (["train.batch_size = -3"], rf"train\.batch_size = -3 {OUT} an integer >= 1\."),
    (
        ["train.num_steps = 0"],
        rf"train\.num_steps = 0 {OUT} a positive integer multiple of "
        r"train\.steps_per_dispatch = 10",
    ),
    (
        ["train.log_interval = 7"],
        rf"train\.log_interval = 7 {OUT} a positive integer multiple of "
        r"train\.steps_per_dispatch = 10",
    ),
    (["train.steps_per_dispatch = True"], rf"train\.steps_per_dispatch = True {OUT} an integer >= 1"),
    (["train.eval_episodes = 0"], rf"train\.eval_episodes = 0 {OUT} an integer >= 1"),
    (
        ["train.execute_steps = 0"],
        rf"train\.execute_steps = 0 {OUT} an integer in 1\.\.5 \(actions per decision of MAC\)",
    ),
    (["train.execute_steps = 99"], rf"train\.execute_steps = 99 {OUT} an integer in 1\.\.5"),
    (["make_mesh.mesh_shape = (3,)"], rf"make_mesh\.mesh_shape = \(3,\) {OUT} a shape covering the 1 device\(s\)"),
    (["RejectionSampler.num_train_candidates = 0"], rf"RejectionSampler\.num_train_candidates = 0 {OUT} an integer"),
    (["RejectionSampler.num_act_candidates = -1"], rf"RejectionSampler\.num_act_candidates = -1 {OUT} an integer"),
    (["FlowPolicy.flow_steps = 0"], rf"FlowPolicy\.flow_steps = 0 {OUT} an integer >= 1"),
    (["FlowPolicy.solver = 'rk99'"], rf"FlowPolicy\.solver = 'rk99' {OUT} one of \[.*'euler'"),
    (["QCritic.hidden_dims = (0,)"], rf"QCritic\.hidden_dims = \(0,\) {OUT} a non-empty tuple of positive integers"),
    (["HIDDEN = ()"], rf"\w+\.hidden_dims = \(\) {OUT} a non-empty tuple of positive integers"),
    (
        ["MAC.policy = @GaussianPolicy", "GaussianPolicy.log_std_min = 3.0"],
        rf"GaussianPolicy\.log_std_min = 3\.0 {OUT} a number < 2\.0 \(GaussianPolicy\.log_std_max = 2\.0\)",
    ),
    (["OGBenchDataset.task_id = 9"], rf"OGBenchDataset\.task_id = 9 {OUT} None or an integer in 1\.\.5"),
    (["MAC.chunk_len = 0"], rf"MAC\.chunk_len = 0 {OUT} an integer >= 1"),
    (
        ["OGBenchDataset.task_id = 2", "train.eval_task_ids = (1, 3)"],
        r"trained single-task on cube-single task2 .* cannot be evaluated on task\(s\) \[1, 3\]",
    ),
    (["OGBenchDataset.task_mode = 'goals'"], rf"OGBenchDataset\.task_mode = 'goals' {OUT} one of \['singletask'"),
    (
        ["train.loggers = ('csv', 'wandbb')"],
        r"train\.loggers = \('csv', 'wandbb'\) names an unknown logger 'wandbb'\. Registered loggers: "
        r"csv \(CSVLogger\), tensorboard \(TensorBoardLogger\), wandb \(WandbLogger\)\.",
    ),
    (["train.loggers = ('wandb')"], rf"train\.loggers = 'wandb' {OUT} a tuple of logger names.*\('wandb',\)"),
    (
        ["train.loggers = ('csv', 'wandb')", "WandbLogger.mode = 'ofline'"],
        rf"WandbLogger\.mode = 'ofline' {OUT} None .* or one of \['online', 'offline', 'disabled'\]",
    ),
]
IDS = [b[-1] for b, _ in BAD]


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` (itself included) with its modification time, and each file's bytes."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_mtime_ns, p.read_bytes() if p.is_file() else None)
    return out


def _prepare(i: int, root: Path) -> Path:
    workdir = root / f"run{i}"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "sentinel.txt").write_text("an earlier run's file\n")
    (workdir / "checkpoints" / "note").write_text("not a checkpoint\n")
    return workdir


def _argv(bindings: list[str], workdir: Path) -> list[str]:
    return [*SMOKE, *[a for b in bindings for a in ("--gin_bindings", b)], "--workdir", str(workdir)]


def worker(cases: list[dict], out: Path) -> None:
    """Run every case's ``macfw.run.main(argv)`` in this process (Gin cleared before each); write
    ``[{"rc": return value or None, "err": captured stderr plus any traceback}, ...]`` to ``out``."""
    import gin

    import macfw.run

    results = []
    for case in cases:
        gin.clear_config()
        err = io.StringIO()
        rc = None
        with contextlib.redirect_stderr(err):
            try:
                rc = macfw.run.main(case["argv"])
            except BaseException:  # noqa: BLE001  (an escaped exception is a failure the test reports)
                traceback.print_exc()
        results.append({"rc": rc, "err": err.getvalue()})
    out.write_text(json.dumps(results))


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MACFW_DEBUG", "JAX_COMPILATION_CACHE_DIR")}
    env.update(MACFW_CACHE_DIR=str(root / "cache"), MACFW_NO_COMPILE_CACHE="1", JAX_PLATFORMS="cpu")
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_bindings")
    workdirs = [_prepare(i, root) for i in range(len(BAD))]
    before = [_snapshot(w) for w in workdirs]
    cases = root / "cases.json"
    cases.write_text(json.dumps([{"argv": _argv(b, w)} for (b, _), w in zip(BAD, workdirs)]))
    r = subprocess.run(
        [sys.executable, __file__, "--worker", str(cases), str(root / "out.json")],
        cwd=REPO,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"the worker failed:\n{r.stderr[-3000:]}"
    out = json.loads((root / "out.json").read_text())
    for res, b, w in zip(out, before, workdirs):
        res.update(before=b, after=_snapshot(w))
    assert not (root / "cache").exists() or not any((root / "cache").rglob("*.npz")), "a case generated data"
    return out


def test_the_command_itself_exits_2_with_one_error_line_and_writes_nothing(tmp_path):
    """One case as a real ``python -m macfw.run`` process: exit code 2, one error line, no traceback."""
    bindings, pattern = BAD[0]
    workdir = _prepare(0, tmp_path)
    before = _snapshot(workdir)
    r = subprocess.run(
        [sys.executable, "-m", "macfw.run", *_argv(bindings, workdir)],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("macfw: error:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(lines) == 1 and re.search(pattern, lines[0]), r.stderr[-3000:]
    assert _snapshot(workdir) == before


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


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, metavar=("CASES", "OUT"), required=True)
    a = ap.parse_args()
    worker(json.loads(Path(a.worker[0]).read_text()), Path(a.worker[1]))
