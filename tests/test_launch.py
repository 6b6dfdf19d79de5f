"""macfw.launch without a cluster: RunSpec checks, LocalLauncher, SlurmLauncher's settings, and the
SLURM job's callable (SlurmRun) stopping, requeueing and failing with stand-in commands.

The commands are tiny Python scripts that act like ``python -m macfw.run`` (write ``summary.json``
at the end, save and exit 0 on SIGTERM), so these tests take seconds. The real cluster:
tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from macfw import launch
from macfw.errors import ConfigError
from macfw.launch import LocalLauncher, RunSpec, SlurmLauncher, SlurmRun

#: A stand-in for macfw.run: argv = MODE --workdir DIR. Modes: ok (write summary.json), fail (exit 3),
#: wait (sleep until SIGTERM, then write stopped and exit 0, like a macfw.run that saved; it ignores
#: nothing itself, so surviving a SIGUSR2 to itself shows that the launcher made it ignore the signal).
FAKE_RUN = r"""
import json, os, signal, sys, time
mode, workdir = sys.argv[1], sys.argv[3]
os.makedirs(workdir, exist_ok=True)
if mode == "fail":
    print("macfw: error: something is wrong", flush=True)
    sys.exit(3)
if mode == "wait":
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    open(os.path.join(workdir, "started"), "w").close()
    os.kill(os.getpid(), signal.SIGUSR2)   # as SLURM does: every process of the job gets it
    while not stop:
        time.sleep(0.05)
    open(os.path.join(workdir, "stopped"), "w").close()
    print("[macfw] stopped by a signal", flush=True)
    sys.exit(0)
json.dump({"success": 0.5, "per_seed_success": [0.25, 0.75], "param_checksum": "abc"},
          open(os.path.join(workdir, "summary.json"), "w"))
print("[macfw] done", flush=True)
"""


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)

    def make(name: str, mode: str) -> RunSpec:
        wd = tmp_path / name
        return RunSpec(name, wd, [sys.executable, str(script), mode, "--workdir", str(wd)], tmp_path)

    return make


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- RunSpec
def test_runspec_checks_its_workdir(tmp_path):
    r = RunSpec("a", Path("runs/a"), ["python", "-m", "macfw.run", "--workdir", "runs/a"], tmp_path)
    assert r.workdir == tmp_path / "runs/a" and r.command[-1] == "runs/a" and isinstance(r.command, tuple)
    assert RunSpec("b", tmp_path / "b", ["x", f"--workdir={tmp_path / 'b'}"], tmp_path).workdir == tmp_path / "b"
    with pytest.raises(ValueError, match="no --workdir"):
        RunSpec("c", tmp_path / "c", ["python", "-m", "macfw.run"], tmp_path)
    with pytest.raises(ValueError, match="is not its workdir"):
        RunSpec("d", tmp_path / "d", ["python", "--workdir", str(tmp_path / "other")], tmp_path)
    with pytest.raises(ValueError, match="share the workdir"):
        LocalLauncher().launch([r, RunSpec("e", r.workdir, ["x", "--workdir", str(r.workdir)], tmp_path)])


def test_job_name_is_stable_and_per_workdir(tmp_path):
    a, b = launch.job_name(tmp_path / "a"), launch.job_name(tmp_path / "b")
    assert a.startswith("macfw-") and len(a) == len("macfw-") + 12 and a != b
    os.symlink(tmp_path / "a", tmp_path / "link")  # the same folder by another path: the same name
    (tmp_path / "a").mkdir()
    assert launch.job_name(tmp_path / "link") == a == launch.job_name(str(tmp_path / "x" / ".." / "a"))


# ----------------------------------------------------------------------------- LocalLauncher
def test_local_launcher_runs_skips_and_reports(fake, capsys):
    ok1, ok2, bad = fake("ok1", "ok"), fake("ok2", "ok"), fake("bad", "fail")
    failed = LocalLauncher(parallel=2, poll_s=0.05).launch([ok1, bad, ok2])
    out = capsys.readouterr().out
    assert failed == [bad]
    assert ok1.finished() and ok2.finished() and not bad.finished()
    assert "[launch] ok1: started in" in out and "ok1: finished in" in out and "success 50.0 +- 25.0 %" in out
    assert f"bad: FAILED (exit 3); see {bad.log_path}" in out
    assert "macfw: error: something is wrong" in bad.log_path.read_text()
    # again: the finished runs are skipped, the failed one runs again (and fails again)
    failed = LocalLauncher(poll_s=0.05, prefix="[compare]").launch([ok1, bad, ok2])
    out = capsys.readouterr().out
    assert failed == [bad] and "[compare] ok1: done already" in out and "[compare] ok2: done already" in out
    assert "ok1: started" not in out and "bad: started" in out
    with pytest.raises(ValueError, match="parallel"):
        LocalLauncher(parallel=0)


def test_parallel_runs_do_not_preallocate_gpu_memory(tmp_path, monkeypatch, capsys):
    """Two JAX processes on one GPU: each would take 75% of its memory when it starts, and the second
    fail. With parallel > 1 the runs get XLA_PYTHON_CLIENT_PREALLOCATE=false, unless the user set
    JAX's GPU memory; one run at a time keeps the environment as it is."""
    script = tmp_path / "env_run.py"
    script.write_text(
        "import json, os, sys\n"
        "wd = sys.argv[2]; os.makedirs(wd, exist_ok=True)\n"
        "keys = ('XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION', 'MACFW_TEST_MARK')\n"
        "json.dump({k: os.environ.get(k) for k in keys}, open(os.path.join(wd, 'env.json'), 'w'))\n"
        "json.dump({'success': 0.0}, open(os.path.join(wd, 'summary.json'), 'w'))\n"
    )
    for k in launch.GPU_MEMORY_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MACFW_TEST_MARK", "kept")

    def envs(tag: str, parallel: int) -> list[dict]:
        runs = [
            RunSpec(
                f"{tag}{i}",
                tmp_path / f"{tag}{i}",
                [sys.executable, str(script), "--workdir", str(tmp_path / f"{tag}{i}")],
                tmp_path,
            )
            for i in range(2)
        ]
        assert LocalLauncher(parallel=parallel, poll_s=0.05).launch(runs) == []
        return [json.loads((r.workdir / "env.json").read_text()) for r in runs]

    both = envs("p", 2)
    assert all(e["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and e["MACFW_TEST_MARK"] == "kept" for e in both), both
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in capsys.readouterr().out
    assert all(e["XLA_PYTHON_CLIENT_PREALLOCATE"] is None for e in envs("s", 1))
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".3")  # the user's choice is kept
    chosen = envs("u", 2)
    assert all(
        e["XLA_PYTHON_CLIENT_PREALLOCATE"] is None and e["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".3" for e in chosen
    )


# --------------------------------------------------------------------------- SlurmLauncher
def test_slurm_launcher_settings_from_gin_and_overrides():
    import gin

    gin.clear_config()
    lt = SlurmLauncher.from_gin(
        [Path(__file__).parents[1] / "gin" / "slurm.gin"],
        [
            "SlurmLauncher.partition = 'gpu'",
            "SlurmLauncher.time_min = 30",
            "SlurmLauncher.setup = ['module load cuda']",
            "SlurmLauncher.cpus_per_job = 8",
        ],
        time_min=90,
        cpus_per_job=None,
    )
    assert (lt.partition, lt.time_min, lt.cpus_per_job, lt.setup, lt.gpus_per_job) == (
        "gpu",
        90,
        8,
        ["module load cuda"],
        "auto",
    )
    gin.clear_config()
    assert lt.mem_gb is None and SlurmLauncher().cpus_per_job is None  # by default the partition's own
    for kwargs, binding in [
        (dict(time_min=0), "SlurmLauncher.time_min = 0"),
        (dict(gpus_per_job="two"), "SlurmLauncher.gpus_per_job = 'two'"),
        (dict(mem_gb=-1), "SlurmLauncher.mem_gb = -1"),
        (dict(time_min=1, signal_delay_s=120), "SlurmLauncher.signal_delay_s = 120"),
    ]:
        with pytest.raises(ConfigError, match="^" + binding.replace("(", r"\(")):
            SlurmLauncher(**kwargs)
    assert launch.gres_has_gpu(["gpu:a100:4(S:0-1)", "(null)"]) and launch.gres_has_gpu(["shard:8,gpu:2"])
    assert not launch.gres_has_gpu(["(null)"]) and not launch.gres_has_gpu([])
    assert SlurmLauncher(gpus_per_job=2).resolved_gpus() == 2  # explicit: sinfo is not asked


def test_slurm_launcher_errors_name_the_fix(fake, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(launch.SlurmError, match=r"sbatch is not on PATH.*slurm-up"):
        SlurmLauncher().launch([fake("x", "ok")])
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[slurm\]'"):
        launch._import_submitit()


# ------------------------------------------------------------------ SlurmRun (the job's callable)
def _in_thread(fn):
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, box


def test_slurm_run_reports_success_and_failure(fake):
    ok = fake("ok", "ok")
    assert SlurmRun(ok)()["param_checksum"] == "abc"
    assert SlurmRun(ok)()["param_checksum"] == "abc"  # summary.json there: nothing runs again
    assert ok.log_path.read_text().count("[macfw] done") == 1
    bad = fake("bad", "fail")
    with pytest.raises(
        launch.RunFailed, match=r"exited with 3: macfw: error: something is wrong \(its output: .*stdout.log\)"
    ):
        SlurmRun(bad)()


def test_slurm_run_checkpoint_stops_the_run_and_requeues_itself(fake):
    """submitit's USR2 hook: SIGTERM to the run, wait for it, return a DelayedSubmission of the same run
    (picklable, as submitit writes it); the run itself ignored the USR2 it got."""
    submitit = pytest.importorskip("submitit")
    spec = fake("pre", "wait")
    job = SlurmRun(spec, stop_timeout_s=30)
    t, box = _in_thread(job)
    _wait_for(spec.workdir / "started")
    delayed = job.checkpoint()
    t.join(30)
    assert (spec.workdir / "stopped").exists(), "the run did not get SIGTERM (or died of the USR2 it sent itself)"
    assert isinstance(box.get("error"), launch.RunInterrupted), box
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = pickle.loads(pickle.dumps(delayed)).function
    assert isinstance(again, SlurmRun) and again.spec == spec and again._proc is None
    assert "exited 0 after SIGTERM" in spec.log_path.read_text()


def test_slurm_run_forwards_sigterm(fake):
    """SIGTERM to the job (scontrol requeue, scancel) reaches the run, which saves and exits 0; the job's
    callable then raises (not finished) and leaves SIGTERM's handler as it was."""
    spec = fake("term", "wait")
    before = signal.getsignal(signal.SIGTERM)
    job = SlurmRun(spec)

    def kill_when_started():
        _wait_for(spec.workdir / "started")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)  # a watchdog: a run that never got SIGTERM is killed, and the test fails
        if job._returncode is None:
            assert job._proc is not None
            job._proc.kill()

    threading.Thread(target=kill_when_started, daemon=True).start()
    with pytest.raises(launch.RunInterrupted, match="without .*summary.json"):
        job()  # in the main thread, where the handler goes
    assert (spec.workdir / "stopped").exists()
    assert signal.getsignal(signal.SIGTERM) == before
    assert "SIGTERM: forwarded to macfw.run" in spec.log_path.read_text()
