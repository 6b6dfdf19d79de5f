"""One writer per workdir (:mod:`macfw.workdir_lock`): a run locks its workdir for its whole life; a
second run on it exits 2 naming the holder and changes nothing; ``kill -9`` never leaves a stale lock;
the Checkpointer cleans up only under the lock; ``macfw.evaluate`` reads beside a run and changes nothing.

The fast tests hold the lock from a tiny child process that loads ``macfw/workdir_lock.py`` by path
(no JAX import). The ``slow`` ones run ``python -m macfw.run`` on gin/smoke.gin: pairs started at once
on one workdir (two rounds side by side), against one uninterrupted reference run.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from macfw.workdir_lock import LOCK_FILE, WorkdirBusyError, WorkdirLock, held_here, read_holder

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
SMOKE = ["--gin_file", "gin/smoke.gin", "--gin_bindings", "train.progress = False"]

_HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("wl", {str(REPO / "macfw" / "workdir_lock.py")!r})
wl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wl)
lock = wl.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _holder(workdir) -> dict:
    """``read_holder(workdir)``, which must find a record."""
    record = read_holder(workdir)
    assert record is not None, f"no holder record in {workdir}"
    return record


def _hold(workdir: Path) -> subprocess.Popen:
    """A child process that holds ``workdir``'s lock until it is killed."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "locked", p.poll()
    return p


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)


def _tree(root: Path) -> dict:
    """Every path under ``root`` with its kind, size and modification time (a folder's changes when an
    entry is added, removed or renamed in it)."""
    out = {}
    for p in sorted([root, *root.rglob("*")]):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("d" if p.is_dir() else "f", st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def _busy_workdir(tmp_path: Path) -> Path:
    """A workdir as a run in progress leaves it: logs, and in checkpoints/ a save under way (a folder
    without manifest and an Orbax temporary folder), which a clean-up would remove."""
    w = tmp_path / "run"
    (w / "checkpoints" / "20" / "state").mkdir(parents=True)
    (w / "checkpoints" / "20" / "state" / "data").write_bytes(b"x" * 100)
    tmp = w / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "data").write_bytes(b"y" * 50)
    (w / "config.gin").write_text("train.num_steps = 40\n")
    (w / "train.csv").write_text("step,x\n10,1.0\n")
    return w


# ============================================================================ fast: the lock itself
def test_lock_is_exclusive_names_its_holder_and_kill_9_frees_it_at_once(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    child = _hold(w)
    try:
        record = _holder(w)
        assert record["pid"] == child.pid and record["host"] == HOST, record
        with pytest.raises(WorkdirBusyError) as e:
            WorkdirLock(w).acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"process {child.pid} on host {HOST!r}" in msg, msg
        assert str(w / LOCK_FILE) in msg and "--workdir" in msg and "Wait for that run" in msg, msg
        assert _holder(w)["pid"] == child.pid  # the refused attempt did not touch the holder's record
        assert not held_here(w)
    finally:
        _kill(child)
    assert (w / LOCK_FILE).exists()  # the file stays; only the flock counted
    t0 = time.monotonic()
    with WorkdirLock(w) as lock:  # no waiting, no stale lock
        assert time.monotonic() - t0 < 1.0
        assert lock.enforced and held_here(w)
        assert _holder(w)["pid"] == os.getpid()
        with pytest.raises(WorkdirBusyError, match=f"process {os.getpid()} "):
            WorkdirLock(w).acquire()  # a second lock object of this same process is refused too
    assert not held_here(w)
    WorkdirLock(w).acquire().release()  # released on exit of the block


def test_a_filesystem_without_locks_warns_and_runs_unprotected(tmp_path, monkeypatch):
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.warns(UserWarning, match="refuses file locks"):
        lock = WorkdirLock(tmp_path).acquire()
    assert not lock.enforced and held_here(tmp_path) and _holder(tmp_path)["pid"] == os.getpid()
    lock.release()
    assert not held_here(tmp_path)


def test_busy_workdir_exits_2_with_one_line_and_changes_nothing(tmp_path, capsys, monkeypatch):
    """In-process callers of train() and the CLI: refused before anything in the workdir is read or
    changed (no config.gin rewrite, no checkpoint clean-up, no CSV append)."""
    import gin

    import macfw.train
    from macfw import run

    w = _busy_workdir(tmp_path)
    child = _hold(w)
    try:
        before = _tree(w)
        monkeypatch.chdir(REPO)
        monkeypatch.setenv("MACFW_NO_COMPILE_CACHE", "1")
        run.parse_gin(["gin/smoke.gin"], [])
        with pytest.raises(WorkdirBusyError, match=f"process {child.pid} on host {HOST!r}"):
            macfw.train.train(w)
        assert _tree(w) == before
        gin.clear_config()

        rc = run.main([*SMOKE, "--workdir", str(w)])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1, (rc, err[-3000:])
        assert lines[0].startswith(
            f"macfw: error: Workdir {str(w)!r} is in use by another run: process {child.pid} on host {HOST!r}"
        ), lines[0]
        assert "--workdir" in lines[0] and "stop it" in lines[0], lines[0]
        assert _tree(w) == before
        assert WorkdirBusyError in run.known_errors()
    finally:
        _kill(child)


def test_checkpointer_cleans_up_only_under_the_lock(tmp_path):
    from macfw.checkpoint import Checkpointer

    w = _busy_workdir(tmp_path)
    ck = w / "checkpoints"
    child = _hold(w)
    try:
        before = _tree(w)
        with pytest.raises(WorkdirBusyError, match=f"process {child.pid} "):
            Checkpointer(ck)  # would remove the holder's save in progress
        ro = Checkpointer(ck, read_only=True)  # reading needs no lock
        assert ro.all_steps() == []
        ro.close()
        assert _tree(w) == before
    finally:
        _kill(child)
    with pytest.warns(UserWarning) as record:
        Checkpointer(ck).close()  # the lock is free: taken for the clean-up, then given back
    said = " ".join(str(r.message) for r in record)
    assert "incomplete checkpoint step 20" in said and "unfinished save" in said, said
    assert sorted(p.name for p in ck.iterdir()) == []
    assert not held_here(w)
    WorkdirLock(w).acquire().release()


# ============================================================================ slow: macfw.run subprocesses
def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env["MACFW_CACHE_DIR"] = str(cache)
    env.setdefault("JAX_PLATFORMS", "cpu")  # XLA_FLAGS and the compilation cache (tests/conftest.py) are kept
    env.pop("MACFW_DEBUG", None)
    return env


def _cmd(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "macfw.run", *SMOKE, "--workdir", str(workdir)]


def _start(cmd, env, log: Path) -> subprocess.Popen:
    out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    p._files = (out, err)  # noqa: SLF001  # pyright: ignore[reportAttributeAccessIssue]  (closed in _finish)
    return p


def _finish(p: subprocess.Popen, log: Path, timeout=900) -> tuple[int, str, str]:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    for f in p._files:  # noqa: SLF001  # pyright: ignore[reportAttributeAccessIssue]  (set in _start)
        f.close()
    return rc, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def _steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The generated smoke data (once), and the uninterrupted reference run, started in the background."""
    root = tmp_path_factory.mktemp("lock")
    env = _env(Path(os.environ.get("MACFW_CACHE_DIR") or root / "cache"))  # the session's (tests/conftest.py)
    gen = subprocess.run(
        [
            sys.executable,
            "-c",
            "import macfw.run, macfw.data.ogbench_data as d; macfw.run.parse_gin(['gin/smoke.gin'], []); "
            "print(d.OGBenchDataset().resolve_path())",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-3000:]
    ref = _start(_cmd(root / "ref"), env, root / "ref")
    return dict(root=root, env=env, ref=ref, ref_result=None)


@pytest.fixture(scope="module")
def reference(world):
    if world["ref_result"] is None:
        rc, out, err = _finish(world["ref"], world["root"] / "ref")
        assert rc == 0, out[-3000:] + err[-3000:]
        world["ref_result"] = dict(
            workdir=world["root"] / "ref",
            checksum=json.loads((world["root"] / "ref" / "summary.json").read_text())["param_checksum"],
        )
    return world["ref_result"]


def _pair(world, i: int, offset: float, first: int) -> dict:
    """Two runs of the same command on a fresh workdir; run ``first`` starts ``offset`` s before the other."""
    w = world["root"] / f"pair{i}"
    procs: dict[int, subprocess.Popen] = {}
    procs[first] = _start(_cmd(w), world["env"], world["root"] / f"pair{i}_{first}")
    time.sleep(offset)
    procs[1 - first] = _start(_cmd(w), world["env"], world["root"] / f"pair{i}_{1 - first}")
    results = [_finish(procs[k], world["root"] / f"pair{i}_{k}") for k in (0, 1)]
    return dict(workdir=w, pids=[procs[k].pid for k in (0, 1)], results=results, offset=offset, first=first)


@pytest.mark.slow
def test_two_runs_started_together_on_one_workdir_one_trains_the_other_exits_2(world, reference):
    """Rounds of two ``macfw.run`` started within 0.5 s of each other on one fresh workdir (start-up takes
    seconds, so they always overlap): exactly one trains, to the reference's parameters, logging each
    step once; the other exits 2 with one line naming the first's PID and host."""
    seed = int(os.environ.get("MACFW_LOCK_SEED", time.time_ns() % 2**31))
    rounds = int(os.environ.get("MACFW_LOCK_ROUNDS", 6))
    rng = random.Random(seed)
    plan = [(i, 0.0 if i == 0 else rng.uniform(0.0, 0.5), rng.randrange(2)) for i in range(rounds)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # two rounds side by side
        pairs = list(pool.map(lambda a: _pair(world, *a), plan))
    for r in pairs:
        where = dict(seed=seed, offset=r["offset"], first=r["first"], workdir=str(r["workdir"]))
        rcs = [res[0] for res in r["results"]]
        logs = "\n".join(f"--- rc {rc}\n{out[-2000:]}\n{err[-2000:]}" for rc, out, err in r["results"])
        assert sorted(rcs) == [0, 2], (where, logs)
        win, lose = rcs.index(0), rcs.index(2)
        _, out_w, _ = r["results"][win]
        _, out_l, err_l = r["results"][lose]
        assert "[macfw] done: step 40" in out_w and "resuming" not in out_w, (where, logs)
        lines = [ln for ln in err_l.splitlines() if ln.strip()]
        assert len(lines) == 1 and not out_l.strip(), (where, logs)
        assert lines[0].startswith(
            f"macfw: error: Workdir {str(r['workdir'])!r} is in use by another run: "
            f"process {r['pids'][win]} on host {HOST!r}"
        ), (where, lines)
        assert "--workdir" in lines[0], lines[0]
        w = r["workdir"]
        assert _steps(w / "train.csv") == [10, 20, 30, 40], (where, (w / "train.csv").read_text())
        assert _steps(w / "eval.csv") == [40], where
        summary = json.loads((w / "summary.json").read_text())
        assert summary["step"] == 40 and summary["param_checksum"] == reference["checksum"], where
        assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["20", "40"], where
        assert _holder(w)["pid"] == r["pids"][win], where


@pytest.mark.slow
def test_evaluate_reads_beside_a_run_holding_the_lock_and_changes_nothing(world, reference, tmp_path):
    w = tmp_path / "run"
    shutil.copytree(reference["workdir"], w)
    ck = w / "checkpoints"
    half = ck / "60"  # a newer step without manifest (a save in progress) and an Orbax temporary folder
    shutil.copytree(ck / "40", half)
    (half / "macfw_manifest.json").unlink()
    shutil.copytree(ck / "20", ck / "80.orbax-checkpoint-tmp-99")
    child = _hold(w)
    try:
        before, lock_before = _tree(ck), (w / LOCK_FILE).read_bytes()
        others = {k: v for k, v in _tree(w).items() if not k.startswith("checkpoints")}
        r = subprocess.run(
            [sys.executable, "-m", "macfw.evaluate", "--workdir", str(w), "--workers", "1"],
            cwd=REPO,
            env=world["env"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "step 40" in r.stdout and (w / "eval_step40.json").is_file()
        assert _tree(ck) == before  # nothing removed, moved or added, not even the unfinished save
        assert (w / LOCK_FILE).read_bytes() == lock_before
        after = {k: v for k, v in _tree(w).items() if not k.startswith("checkpoints") and k != "eval_step40.json"}
        assert {k: v for k, v in after.items() if k != "."} == {k: v for k, v in others.items() if k != "."}
        with pytest.raises(WorkdirBusyError):  # the holder still holds it
            WorkdirLock(w).acquire()
    finally:
        _kill(child)
