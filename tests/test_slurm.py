"""SlurmLauncher on a real SLURM cluster (issue 28): a smoke sweep of MAC and SHARSA x seeds 0, 1.

Needs a cluster that runs jobs on this machine's file system: ``sudo bash .ci/slurm-up`` (a
one-node cluster), then ``python -m pytest -q -m slurm tests/test_slurm.py -ra``. Without ``sbatch``
(or when ``sinfo`` does not answer) the tests skip; with ``MACFW_REQUIRE_SLURM=1`` (CI) they fail
instead.

One test, one sweep (about 3 minutes on a 2-core machine): five runs through one SlurmLauncher,
one job each (1 CPU, so two at a time on 2 cores):

- MAC seed 0 is requeued with ``scontrol requeue JOBID`` once its first checkpoint exists (SLURM
  sends SIGTERM; the run saves, the job goes back to the queue, restarts and resumes);
- SHARSA seed 0 gets ``scancel --signal=USR2 JOBID``, what SLURM sends ``signal_delay_s`` before a
  time limit (submitit's checkpoint hook: SIGTERM to the run, which saves; the job requeues itself);
- both then finish with the same ``param_checksum`` as the same runs uninterrupted, trained here with
  LocalLauncher at the same time;
- MAC and SHARSA seed 1 run undisturbed; a fifth run has a bad binding and must be reported as
  failed, naming its logs;
- a second launcher started while the jobs are queued submits nothing (it waits for them), and a
  third after the end finds every run done; every run's job was submitted exactly once.

Two more tests launch the experiment scripts through the cluster: compare.py's goal-conditioned
protocol cell, and (where ``MACFW_PARITY_REF`` names a checkout of the authors' code) issue 29's
learning-parity campaign at a tiny budget.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from macfw.launch import LocalLauncher, RunSpec, SlurmLauncher, job_name, newest_checkpoint, slurm_available

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 600  # gradient steps: ~4 s of training at smoke size, so a run is caught between its checkpoints
SAVE_EVERY = 50  # gradient steps between checkpoints
#: The whole sweep must end within this (seconds); it took 160-190 s on a 2-core machine.
SWEEP_TIMEOUT_S = 540


@pytest.fixture(scope="module")
def cluster():
    why = slurm_available()
    if why is None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            why = "submitit is not installed (pip install -e '.[slurm]')"
    if why is not None:
        if os.environ.get("MACFW_REQUIRE_SLURM") == "1":
            pytest.fail(f"MACFW_REQUIRE_SLURM=1 but no usable SLURM cluster: {why}")
        pytest.skip(f"no SLURM cluster: {why}")


def _spec(out: Path, agent: str, seed: int, extra: tuple[str, ...] = ()) -> RunSpec:
    workdir = out / f"{agent}-seed{seed}"
    files = ["gin/smoke.gin"] if agent == "mac" else ["gin/baselines/sharsa.gin", "gin/smoke_budget.gin"]
    binds = [
        f"train.num_steps = {NUM_STEPS}",
        f"train.save_interval = {SAVE_EVERY}",
        f"train.eval_interval = {NUM_STEPS}",
        "train.progress = False",
        f"train.seed = {seed}",
    ]
    if agent == "sharsa":
        binds.append("SHARSA.n = 5")  # subgoals 5 steps ahead: the smoke's 101-step episodes
    cmd = [sys.executable, "-m", "macfw.run"]
    for f in files:
        cmd += ["--gin_file", f]
    for b in binds + list(extra):
        cmd += ["--gin_bindings", b]
    return RunSpec(f"{agent} seed{seed}", workdir, cmd + ["--workdir", str(workdir)], REPO)


def _in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _checksum(run: RunSpec) -> str:
    return json.loads(run.summary_path.read_text())["param_checksum"]


def test_smoke_sweep_with_requeue_preemption_and_no_duplicates(cluster, tmp_path, capsys):
    out = tmp_path / "slurm"
    mac0, sharsa0, mac1, sharsa1 = (_spec(out, a, s) for s, a in [(0, "mac"), (0, "sharsa"), (1, "mac"), (1, "sharsa")])
    bad = _spec(out, "mac", 9, extra=("train.num_steps = -1",))
    runs = [mac0, sharsa0, mac1, sharsa1, bad]  # the two to preempt first: they run in the first pair of jobs
    refs = [_spec(tmp_path / "local", "mac", 0), _spec(tmp_path / "local", "sharsa", 0)]
    settings: dict[str, Any] = dict(time_min=20, cpus_per_job=1, mem_gb=1, signal_delay_s=90, poll_s=1.0)
    names = {job_name(r.workdir): r for r in runs}
    seen_twice: list = []
    done = threading.Event()

    def queued_jobs() -> dict:
        return {n: jobs for n, jobs in SlurmLauncher.queued().items() if n in names}

    def watch_duplicates():  # no run ever has two jobs in the queue
        while not done.is_set():
            for n, jobs in queued_jobs().items():
                if len(jobs) > 1:
                    seen_twice.append((names[n].name, jobs))
            time.sleep(0.5)

    t0 = time.time()
    try:
        ta, a = _in_thread(lambda: SlurmLauncher(prefix="[A]", **settings).launch(runs))
        tw, _ = _in_thread(watch_duplicates)
        tr, ref = _in_thread(lambda: LocalLauncher(parallel=1, prefix="[ref]").launch(refs))
        while len(queued_jobs()) < len(runs):  # A has submitted all five
            assert time.time() - t0 < 60 and ta.is_alive(), f"A did not submit every run: {a}"
            time.sleep(0.2)
        ids = {names[n]: jobs[0][0] for n, jobs in queued_jobs().items()}
        tb, b = _in_thread(lambda: SlurmLauncher(prefix="[B]", **settings).launch(runs))

        def preempt(run: RunSpec, cmd: list[str]) -> None:  # once the run's first checkpoint exists
            while newest_checkpoint(run.workdir) is None:
                assert time.time() - t0 < 300, f"{run.name}: no checkpoint after 300 s"
                time.sleep(0.1)
            subprocess.run(cmd, check=True, timeout=30)

        preempting = [
            _in_thread(lambda: preempt(mac0, ["scontrol", "requeue", ids[mac0]])),
            _in_thread(lambda: preempt(sharsa0, ["scancel", "--signal=USR2", ids[sharsa0]])),
        ]
        for t, box in preempting:
            t.join(330)
            assert not t.is_alive() and "error" not in box, box
        for t in (ta, tb, tr):
            t.join(max(1.0, SWEEP_TIMEOUT_S - (time.time() - t0)))
        wall = time.time() - t0
    finally:
        done.set()
        left = [n for n in names if n in SlurmLauncher.queued()]
        if left:
            subprocess.run(["scancel", "--name=" + ",".join(left)], timeout=30)
    text = capsys.readouterr().out  # the launchers' progress lines (shown by the assertions that fail)
    (tmp_path / "progress.log").write_text(text)
    assert not (ta.is_alive() or tb.is_alive() or tr.is_alive()), (
        f"the sweep did not end in {SWEEP_TIMEOUT_S} s:\n{text}"
    )
    assert a == {"value": [bad]} and b == {"value": [bad]} and ref == {"value": []}, (a, b, ref, text)

    # every run was one job, submitted once: by A; B waited for all five
    assert not seen_twice, seen_twice
    for r in runs:
        submitted = sorted(p.name for p in (r.workdir / "slurm").glob("*_submission.sh"))
        assert submitted == [f"{ids[r]}_submission.sh"], (r.name, submitted)
        assert f"[B] {r.name}: already in the queue as job {ids[r]}" in text, text
    assert "[B]" in text and not re.search(r"\[B\] .*: submitted", text), text

    # the preempted runs stopped mid-run after saving, were requeued, resumed, and match the references
    for run, ref_run, how in [
        (mac0, refs[0], "SIGTERM: forwarded to macfw.run"),
        (sharsa0, refs[1], "preemption signal: stopping macfw.run"),
    ]:
        log = run.log_path.read_text()
        stop = re.search(r"\[macfw\] stopped by a signal at step (\d+) \(newest checkpoint: step (\d+)\)", log)
        assert stop and int(stop.group(1)) < NUM_STEPS and stop.group(1) == stop.group(2), (run.name, log)
        assert f"[macfw] resuming from step {stop.group(1)}" in log and how in log, (run.name, log)
        assert f"[A] {run.name}: job {ids[run]} requeued" in text, text
        assert json.loads(run.summary_path.read_text())["step"] == NUM_STEPS
        assert _checksum(run) == _checksum(ref_run), (run.name, _checksum(run), _checksum(ref_run))
    job_log = (sharsa0.workdir / "slurm" / f"{ids[sharsa0]}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in job_log and f"Requeued job {ids[sharsa0]}" in job_log, job_log
    for run in (mac1, sharsa1):
        assert "stopped by a signal" not in run.log_path.read_text() and run.finished()
        assert f"[A] {run.name}: finished (job {ids[run]}" in text, text

    # the failure names the error and the logs, which exist
    line = next(ln for ln in text.splitlines() if ln.startswith(f"[A] {bad.name}: FAILED"))
    assert f"job {ids[bad]}" in line and "exited with 2" in line and "train.num_steps" in line, line
    logs = re.findall(r"see (\S+) and (\S+) ", line)
    assert logs and all(Path(p).exists() for p in logs[0]), line

    # a third launch after the end: nothing to do for the finished runs, nothing submitted
    t1 = time.time()
    assert SlurmLauncher(prefix="[C]", **settings).launch(runs[:4]) == []
    again = capsys.readouterr().out
    assert again.count(": done already") == 4 and "submitted" not in again and time.time() - t1 < 5, again
    print(f"sweep: {wall:.0f} s")


def test_compare_runs_a_goal_conditioned_protocol_cell_on_the_cluster(cluster, tmp_path):
    """Issue 28's acceptance command, through compare.py: MAC (goal-conditioned, as the table runs it)
    and SHARSA on puzzle-3x3 task 1, seed 0, smoke budget, one SLURM job each; table.md is written and
    a second invocation submits nothing (both runs are done)."""
    out = tmp_path / "gc"
    cmd = [
        sys.executable,
        str(REPO / "experiments" / "compare.py"),
        "--protocol",
        "goalconditioned",
        "--agents",
        "mac,sharsa",
        "--envs",
        "puzzle-3x3",
        "--tasks",
        "1",
        "--seeds",
        "0",
        "--budget",
        "smoke",
        "--launcher",
        "slurm",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("submitted as job") == 2 and r.stdout.count(": finished (job") == 2, r.stdout
    md = (out / "table.md").read_text()
    assert "| mac | oraclerep |" in md and "| sharsa | oraclerep |" in md and "puzzle-3x3 task1" in md
    for folder in ("mac-oraclerep", "sharsa"):
        s = json.loads((out / "runs" / "smoke" / folder / "puzzle-3x3-task1" / "seed0" / "summary.json").read_text())
        assert s["step"] == 40 and s["dataset"] == "puzzle-3x3-play-oraclerep-v0"
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "submitted" not in r2.stdout and r2.stdout.count("done already") == 2, r2.stdout


@pytest.mark.skipif(
    not os.environ.get("MACFW_PARITY_REF"), reason="set MACFW_PARITY_REF to a checkout of kwanyoungpark/MAC"
)
def test_learning_parity_campaign_on_the_cluster(cluster, tmp_path):
    """Issue 29's learning table as docs/experiments.md launches it on a cluster (``--launcher slurm``),
    at a tiny budget: MOPO, MOBILE and LEQ, seed 0, both implementations, one SLURM job per run (6);
    every job finishes, the table has a row per agent, and a second invocation submits nothing."""
    out = tmp_path / "lp"
    from test_learning_parity import TINY  # the harness's tiny budget (MOPO, seed 0, 50 steps, 2 x 32 networks)

    cmd = [
        sys.executable,
        str(REPO / "experiments" / "learning_parity.py"),
        "--reference-dir",
        os.environ["MACFW_PARITY_REF"],
        *TINY,
        "--agents",  # (a later flag wins: all three agents)
        "mopo,mobile,leq",
        "--launcher",
        "slurm",
        "--slurm-cpus",
        "1",
        "--slurm-time",
        "30",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("submitted as job") == 6 and r.stdout.count(": finished (job") == 6, r.stdout
    result = json.loads((out / "learning_parity.json").read_text())
    for agent in ("mopo", "mobile", "leq"):
        for impl in ("macfw", "reference"):
            side = result["agents"][agent][impl]
            assert side["n_seeds"] == 1 and not side["failed"], (agent, impl, side)
            assert side["per_seed"]["0"]["steps"] == [50]
        assert f"| {agent} | " in (out / "table.md").read_text()
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "submitted" not in r2.stdout and r2.stdout.count("done already") == 6, r2.stdout
