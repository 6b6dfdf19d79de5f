"""Long runs that survive anything: checkpoints complete or invisible, SIGKILL/SIGTERM resume to the
same parameters, NaN guard, and one clear line per bad input with earlier checkpoints intact.

Fast tests (in-process, tiny states) exercise :class:`macfw.checkpoint.Checkpointer` directly. The
``slow`` ones run ``python -m macfw.run`` on gin/smoke.gin in subprocesses, side by side (see ``jobs``);
they share one generated dataset (the session's ``MACFW_CACHE_DIR`` from tests/conftest.py, else a
module tmp dir) and one uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from macfw.checkpoint import (
    MANIFEST,
    TMP_MARK,
    Checkpointer,
    CheckpointSaveError,
    NonFiniteStateError,
    manifest_problem,
)

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--gin_file", "gin/smoke.gin", "--gin_bindings", "train.progress = False"]


# ============================================================================ in-process: Checkpointer
def _state(v: float, n: int = 4):
    return {
        "w": jnp.full((3, n), float(v)),
        "key": jnp.array([int(v), int(v) + 1], jnp.uint32),
        "step": jnp.array(int(v), jnp.int32),
    }


def _saved(directory, steps, **kw) -> Checkpointer:
    ck = Checkpointer(directory, max_to_keep=kw.pop("max_to_keep", None), **kw)
    for s in steps:
        ck.save(s, _state(s), {"step": s})
    ck.wait()
    return ck


def test_only_complete_steps_are_listed_and_restored(tmp_path):
    d = tmp_path / "ck"
    _saved(d, [1, 2, 3]).close()
    assert Checkpointer(d, read_only=True).all_steps() == [1, 2, 3]
    for s in (1, 2, 3):
        assert manifest_problem(d / str(s)) is None
        assert (d / str(s) / MANIFEST).is_file()

    # a file removed from the newest step, a file truncated in the middle one
    victim = next(p for p in sorted((d / "3").rglob("*")) if p.is_file() and p.name != MANIFEST and "state" in p.parts)
    victim.unlink()
    trunc = next(
        p for p in sorted((d / "2").rglob("*")) if p.is_file() and p.stat().st_size > 10 and p.name != MANIFEST
    )
    trunc.write_bytes(trunc.read_bytes()[:-5])
    ro = Checkpointer(d, read_only=True)
    assert ro.all_steps() == [1]
    assert ro.latest_step() == 1
    state, meta = ro.restore(_state(0))
    assert meta["step"] == 1 and float(state["w"][0, 0]) == 1.0
    assert (d / "3").exists() and (d / "2").exists()  # read-only: nothing removed

    # a writable Checkpointer removes the broken steps at start, keeps the valid one, and saves step 3 again
    with pytest.warns(UserWarning, match="incomplete checkpoint step 3"):
        ck = Checkpointer(d, max_to_keep=None)
    assert not (d / "3").exists() and not (d / "2").exists()
    assert ck.all_steps() == [1]
    ck.save(3, _state(33), {"step": 3})
    ck.close()
    state, meta = Checkpointer(d, read_only=True).restore(_state(0))
    assert meta["step"] == 3 and float(state["w"][0, 0]) == 33.0


def test_leftover_temporary_folder_is_removed_and_the_step_saves_again(tmp_path):
    d = tmp_path / "ck"
    _saved(d, [10]).close()
    tmp = d / f"20{TMP_MARK}-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"x" * 100)
    half = d / "20"  # a committed-looking folder without manifest (killed before the manifest was written)
    shutil.copytree(d / "10", half)
    (half / MANIFEST).unlink()
    assert Checkpointer(d, read_only=True).all_steps() == [10]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck = Checkpointer(d, max_to_keep=None)
    assert sorted(p.name for p in d.iterdir()) == ["10"]
    assert ck.save(20, _state(20), {"step": 20})
    ck.close()
    ro = Checkpointer(d, read_only=True)
    assert ro.all_steps() == [10, 20]
    assert ro.restore(_state(0))[1]["step"] == 20


def test_unreadable_newest_step_falls_back_with_a_warning(tmp_path):
    d = tmp_path / "ck"
    _saved(d, [1, 2]).close()
    f = d / "2" / "state" / "manifest.ocdbt"  # same size, garbage content: listed, but cannot be read
    f.write_bytes(b"\0" * f.stat().st_size)
    ck = Checkpointer(d, max_to_keep=None)
    assert ck.all_steps() == [1, 2]
    with pytest.warns(UserWarning, match="step 2 .*cannot be restored.*falling back to step 1"):
        state, meta = ck.restore(_state(0))
    assert meta["step"] == 1 and float(state["w"][0, 0]) == 1.0
    assert ck.all_steps() == [1]  # the broken step was moved aside (kept for inspection, never listed)
    assert any(p.name.startswith("2.broken-") for p in d.iterdir())
    ck.close()


def test_deleting_old_steps_never_leaves_a_listed_broken_step(tmp_path):
    d = tmp_path / "ck"
    ck = _saved(d, [1, 2, 3, 4, 5], max_to_keep=2)
    ck.close()
    assert sorted(p.name for p in d.iterdir()) == ["4", "5"]
    # a deletion interrupted after the manifest went but before the folder did
    (d / "4" / MANIFEST).unlink()
    ro = Checkpointer(d, read_only=True)
    assert ro.all_steps() == [5]
    # ... or interrupted half-way through the rename into the trash
    (d / ".macfw-trash").mkdir()
    shutil.copytree(d / "5", d / ".macfw-trash" / "3-1-1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck = Checkpointer(d, max_to_keep=2)
    assert sorted(p.name for p in d.iterdir()) == ["5"]
    ck.close()


def test_asynchronous_save_errors_are_raised_and_leave_older_steps(tmp_path, monkeypatch):
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    d = tmp_path / "ck"
    ck = _saved(d, [1])

    def boom(*a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(async_checkpointer, "_on_commit_callback", boom)
    ck.save(2, _state(2), {"step": 2})
    with pytest.raises(CheckpointSaveError, match="step 2.*disk full"):
        ck.wait()
    monkeypatch.undo()
    assert ck.all_steps() == [1]
    ck.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck = Checkpointer(d, max_to_keep=None)  # removes the unfinished step-2 folder
    assert ck.all_steps() == [1] and sorted(p.name for p in d.iterdir()) == ["1"]
    ck.close()


def test_non_finite_state_is_never_saved(tmp_path):
    d = tmp_path / "ck"
    ck = _saved(d, [1])
    bad = _state(2)
    bad["w"] = bad["w"].at[1, 2].set(jnp.nan)
    with pytest.raises(NonFiniteStateError, match=r"step 2.*\['w'\]"):
        ck.save(2, bad, {"step": 2})
    ck.close()
    assert sorted(p.name for p in d.iterdir()) == ["1"]


def test_restored_leaves_without_target_sharding_follow_the_others(tmp_path):
    d = tmp_path / "ck"
    _saved(d, [1]).close()
    template: dict[str, Any] = _state(0)
    template["key"] = np.zeros(2, np.uint32)  # e.g. a key built on the host
    state, _ = Checkpointer(d, read_only=True).restore(template)
    assert isinstance(state["key"], jax.Array)
    assert state["key"].sharding == state["w"].sharding
    assert np.asarray(state["key"]).tolist() == [1, 2]


def test_shape_mismatch_names_the_component(tmp_path):
    from macfw.checkpoint import CheckpointMismatchError

    d = tmp_path / "ck"
    _saved(d, [1]).close()
    with pytest.raises(CheckpointMismatchError, match=r"component .*\['w'\].*\(3, 4\) in the checkpoint but \(3, 5\)"):
        Checkpointer(d, read_only=True).restore(_state(0, n=5))


# ============================================================================ subprocesses of macfw.run
def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env["MACFW_CACHE_DIR"] = str(cache)
    env.setdefault("JAX_PLATFORMS", "cpu")  # XLA_FLAGS and the compilation cache (tests/conftest.py) are kept
    env.pop("MACFW_DEBUG", None)
    return env


def _cmd(workdir: Path, *bindings: str, gin=SMOKE) -> list[str]:
    extra = [a for b in bindings for a in ("--gin_bindings", b)]
    return [sys.executable, "-m", "macfw.run", *gin, *extra, "--workdir", str(workdir)]


class Proc:
    def __init__(self, cmd, env, log: Path):
        self.log = log
        self._f = open(log, "w")
        self.t0 = time.time()
        self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._f, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout=900) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        self._f.close()
        return rc

    @property
    def text(self) -> str:
        return self.log.read_text()


def _summary(workdir: Path) -> dict:
    return json.loads((workdir / "summary.json").read_text())


def _listed(workdir: Path) -> list[int]:
    return Checkpointer(workdir / "checkpoints", read_only=True).all_steps()


def _snapshot(workdir: Path) -> dict:
    """Every file of the valid checkpoints with size and mtime (to show they were not touched)."""
    root = workdir / "checkpoints"
    out = {}
    for s in _listed(workdir):
        for p in sorted((root / str(s)).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


GIN_LOCK = threading.Lock()  # gin's config is global: in-process runs and restores take turns


def _restores(workdir: Path) -> int:
    """Restore the newest listed step in-process (rebuilt from its stored config); returns its step."""
    from macfw.evaluation import load_checkpoint

    with GIN_LOCK:
        _, state, meta, step = load_checkpoint(workdir)
    assert int(np.asarray(state.step).reshape(-1)[0]) == step
    return step


class Job:
    """A scenario running in a background thread (its subprocesses run side by side with the others)."""

    def __init__(self, fn, *args):
        self._out, self._err = None, None
        self._t = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._t.start()

    def _run(self, fn, *args):
        try:
            self._out = fn(*args)
        except BaseException as e:  # re-raised in the test
            self._err = e

    def result(self, timeout=1800):
        self._t.join(timeout)
        assert not self._t.is_alive(), "scenario timed out"
        if self._err is not None:
            raise self._err
        return self._out


def _wait_for_new_save(workdir: Path, before: set, proc: Proc, timeout: float) -> None:
    """Until a checkpoint folder (temporary or final) not in ``before`` appears, or the process ends."""
    t_end = time.time() + timeout
    ck = workdir / "checkpoints"
    while time.time() < t_end and proc.p.poll() is None:
        if ck.is_dir() and any(p.name not in before and (p.name.isdigit() or TMP_MARK in p.name) for p in ck.iterdir()):
            return
        time.sleep(0.05)


def _scenario_reference(world):
    ref = world["root"] / "ref"
    p = Proc(_cmd(ref), world["env"], world["root"] / "ref.log")
    rc = p.wait()
    assert rc == 0, p.text[-5000:]
    return dict(workdir=ref, checksum=_summary(ref)["param_checksum"])


def _kill_campaign(world, w: Path, rng: random.Random, seed: int) -> dict:
    """Run the killed command in ``w``: SIGKILL it up to three times, each time shortly (uniform in
    [0, 0.6] s) after a new save began (save_interval=10: a save every dispatch; max_to_keep=2: old
    steps are deleted meanwhile), then let it run to the end. Every restart must resume from the
    newest step listed before it, and that step must restore."""
    cmd = _cmd(w, "train.save_interval = 10", "train.max_to_keep = 2")
    kills, history, rc = 0, [], None
    for attempt in range(8):
        listed = _listed(w) if (w / "checkpoints").is_dir() else []
        before = set(os.listdir(w / "checkpoints")) if (w / "checkpoints").is_dir() else set()
        p = Proc(cmd, world["env"], world["root"] / f"{w.name}_{attempt}.log")
        if kills < 3:
            _wait_for_new_save(w, before, p, timeout=900)
            time.sleep(rng.uniform(0.0, 0.6))
            if p.p.poll() is None:
                p.p.send_signal(signal.SIGKILL)
                kills += 1
        rc = p.wait()
        text = p.text
        history.append((listed, rc))
        if listed:
            assert f"resuming from step {listed[-1]} " in text, (seed, listed, text[-3000:])
            assert "cannot be restored" not in text, (seed, text[-3000:])
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, text[-5000:]
        steps = _listed(w)
        if steps:  # the newest listed step restores
            assert _restores(w) == steps[-1]
    return dict(workdir=w, kills=kills, rc=rc, history=history, seed=seed)


def _scenario_sigkill(world):
    """Three SIGKILLs at random moments around saves. The smoke run is short (4 dispatches), so a
    run may finish before its third kill lands: then the campaign is repeated in a fresh folder
    (every campaign's resumes are checked all the same)."""
    seed = int(os.environ.get("MACFW_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    campaigns = []
    for c in range(3):
        r = _kill_campaign(world, world["root"] / f"killed{c}", rng, seed)
        campaigns.append(r["history"])
        if r["kills"] >= 3:
            break
    return dict(r, campaigns=campaigns)


def _scenario_sigterm(world):
    w = world["root"] / "term"
    cmd = _cmd(w, "train.save_interval = 40")  # no scheduled save before the end: the signal's save is the one
    p = Proc(cmd, world["env"], world["root"] / "term1.log")
    csv = w / "train.csv"
    t_end = time.time() + 900
    while p.p.poll() is None and time.time() < t_end:  # training under way: step 10 done and logged
        if csv.exists() and csv.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    p.p.send_signal(signal.SIGTERM)  # the save must be at or after step 10
    rc1, text1 = p.wait(), p.text
    steps = _listed(w)
    summary_after_signal = (w / "summary.json").exists()
    restored = _restores(w) if steps else None
    p2 = Proc(cmd, world["env"], world["root"] / "term2.log")
    rc2 = p2.wait()
    return dict(
        workdir=w,
        rc1=rc1,
        text1=text1,
        steps=steps,
        summary_after_signal=summary_after_signal,
        restored=restored,
        rc2=rc2,
        text2=p2.text,
    )


def _scenario_sigterm_startup(world):
    w = world["root"] / "term_early"
    p = Proc(_cmd(w), world["env"], world["root"] / "term_early.log")
    t_end = time.time() + 900
    while p.p.poll() is None and time.time() < t_end and not (w / "checkpoints").is_dir():
        time.sleep(0.02)  # the checkpoint folder is made during set-up, before compilation
    p.p.send_signal(signal.SIGTERM)
    rc = p.wait()
    return dict(workdir=w, rc=rc, text=p.text, steps=_listed(w) if (w / "checkpoints").is_dir() else [])


def _scenario_nan(world):
    w = world["root"] / "nan"
    p = Proc(
        _cmd(w, "train.save_interval = 10", "train.debug_nan_at_step = 25"), world["env"], world["root"] / "nan.log"
    )
    rc = p.wait()
    return dict(workdir=w, rc=rc, text=p.text)


def _scenario_sigterm_two_processes(world):
    """Two jax.distributed processes (one CPU device each) train one run; only process 1 gets SIGTERM
    once training is under way. Both must stop at the same step, save it together and exit 0."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    w = world["root"] / "term_two"
    env = {k: v for k, v in world["env"].items() if not k.startswith("MACFW_") or k == "MACFW_CACHE_DIR"}
    procs = [
        Proc(
            _cmd(w, "train.num_steps = 400", "train.save_interval = 400", "train.eval_interval = 400")
            + ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
            env,
            world["root"] / f"term_two{i}.log",
        )
        for i in range(2)
    ]
    csv = w / "train.csv"
    t_end = time.time() + 900
    while all(p.p.poll() is None for p in procs) and time.time() < t_end:  # step 10 done and logged
        if csv.exists() and csv.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    procs[1].p.send_signal(signal.SIGTERM)
    rcs = [p.wait() for p in procs]
    return dict(
        workdir=w, rcs=rcs, texts=[p.text for p in procs], steps=_listed(w) if (w / "checkpoints").is_dir() else []
    )


SCENARIOS = {  # scenario -> (function, the tests that need it)
    "reference": (_scenario_reference, ("sigkill", "sigterm_mid", "bad_input", "workdir", "schedule")),
    "sigkill": (_scenario_sigkill, ("sigkill",)),
    "sigterm": (_scenario_sigterm, ("sigterm_mid",)),
    "sigterm_startup": (_scenario_sigterm_startup, ("sigterm_during_startup",)),
    "nan": (_scenario_nan, ("injected_nan",)),
    "sigterm_two": (_scenario_sigterm_two_processes, ("sigterm_two_processes",)),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Generated data (once) for every subprocess."""
    root = tmp_path_factory.mktemp("robust")
    cache = Path(os.environ.get("MACFW_CACHE_DIR") or root / "cache")  # the session's (tests/conftest.py)
    env = _env(cache)
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
    data = Path(gen.stdout.strip().splitlines()[-1])
    return dict(root=root, cache=cache, env=env, data=data)


@pytest.fixture(scope="module")
def jobs(world, request):
    """Every scenario that a selected test needs, started at once, side by side (2 cores stay busy)."""
    selected = " ".join(item.name for item in request.session.items)
    started = {name: Job(fn, world) for name, (fn, users) in SCENARIOS.items() if any(u in selected for u in users)}
    yield started
    for job in started.values():
        try:
            job.result()
        except BaseException:
            pass


@pytest.fixture(scope="module")
def reference(jobs):
    return jobs["reference"].result()


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_same_checksum(jobs, reference):
    """Three SIGKILLs at random moments; the end equals the uninterrupted reference (which saved every
    20 steps and kept every step: save settings do not change the result)."""
    r = jobs["sigkill"].result()
    assert r["kills"] == 3 and r["rc"] == 0, r
    assert _summary(r["workdir"])["param_checksum"] == reference["checksum"], r
    assert _listed(r["workdir"]) == [30, 40]


@pytest.mark.slow
def test_a_checkpoint_holds_everything_a_resume_needs(reference):
    ck = Checkpointer(reference["workdir"] / "checkpoints", read_only=True)
    assert ck.all_steps() == [20, 40]
    meta = ck.read_meta(40)
    assert meta["step"] == 40 and meta["spec"] == {"ob_dim": 28, "act_dim": 5, "goal_dim": 0, "chunk_len": 5}
    assert len(meta["obs_scaler"]["lo"]) == len(meta["obs_scaler"]["hi"]) == 28
    assert meta["sampler"]["mode"] == "device" and "key" in meta["sampler"]["state"]
    assert "ChunkDynamics.hidden_dims" in meta["gin_config"] and "train.num_steps = 40" in meta["gin_config"]
    for pkg in ("macfw", "jax", "equinox", "orbax-checkpoint", "ogbench"):
        assert meta["versions"][pkg] not in ("", None), pkg
    names = meta["leaf_names"]
    for part in (".step", ".key", ".nets.dynamics", ".nets.policy", ".target_value", ".opt_state"):
        assert any(n.startswith(part) for n in names), part
    key = names.index(".key")
    assert meta["leaf_dtypes"][key] == "uint32" and meta["leaf_shapes"][key] == [2]  # raw key data


@pytest.mark.slow
def test_sigterm_mid_run_saves_exits_0_and_resumes_to_the_same_checksum(jobs, reference):
    r = jobs["sigterm"].result()
    assert r["rc1"] == 0, r["text1"][-5000:]
    assert "stopped by a signal" in r["text1"] and "Traceback" not in r["text1"]
    assert len(r["steps"]) == 1 and 10 <= r["steps"][0] < 40, (r["steps"], r["text1"][-3000:])
    assert not r["summary_after_signal"]
    assert r["restored"] == r["steps"][0]
    assert r["rc2"] == 0, r["text2"][-5000:]
    assert f"resuming from step {r['steps'][0]} " in r["text2"]
    assert _summary(r["workdir"])["param_checksum"] == reference["checksum"]


@pytest.mark.slow
def test_sigterm_during_startup_exits_0_without_a_save(jobs):
    r = jobs["sigterm_startup"].result()
    assert r["rc"] == 0, r["text"][-5000:]
    assert "Traceback" not in r["text"] and "stop" in r["text"], r["text"][-5000:]
    assert r["steps"] in ([], [10])  # nothing, or the save of the dispatch under way (a very slow start)


@pytest.mark.slow
def test_sigterm_two_processes_both_save_the_same_step_and_exit_0(jobs):
    r = jobs["sigterm_two"].result()
    logs = "\n".join(t[-3000:] for t in r["texts"])
    assert r["rcs"] == [0, 0], logs
    assert "Traceback" not in logs, logs
    saved = [re.findall(r"saving step (\d+); exiting", t) for t in r["texts"]]
    assert "signal 15: saving step" in r["texts"][1] and "another process of this run got a signal" in r["texts"][0]
    assert len(saved[0]) == len(saved[1]) == 1 and saved[0] == saved[1], saved
    step = int(saved[0][0])
    assert 10 <= step < 400 and r["steps"] == [step], (step, r["steps"])
    assert _restores(r["workdir"]) == step  # the two-process checkpoint restores in one process


@pytest.mark.slow
def test_injected_nan_stops_the_run_naming_the_step_and_saves_nothing_non_finite(jobs):
    r = jobs["nan"].result()
    text = r["text"]
    assert r["rc"] == 3, text[-5000:]
    err = [ln for ln in text.splitlines() if ln.startswith("macfw: error:")]
    assert len(err) == 1 and "Traceback" not in text, text[-5000:]
    assert "Non-finite value at step 25 " in err[0] and "loss" in err[0], err
    assert _listed(r["workdir"]) == [10, 20]  # steps 21..30 never saved
    assert _restores(r["workdir"]) == 20


# ---------------------------------------------------------------------------- bad inputs (in-process main)
def _main(argv, capsys) -> tuple[int, str]:
    import gin

    from macfw import run

    with GIN_LOCK:
        gin.clear_config()
        try:
            rc = run.main(argv)
        finally:
            gin.clear_config()
    out = capsys.readouterr()
    return rc, out.err


@pytest.fixture(scope="module")
def bad_world(world, reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    w = root / "run"
    shutil.copytree(reference["workdir"], w)
    data = world["data"]
    val = Path(str(data).replace(".npz", "-val.npz"))
    files = {}

    def pair(name, make_train, make_val=None):
        t = root / f"{name}.npz"
        v = root / f"{name}-val.npz"
        make_train(t)
        (make_val or (lambda q: shutil.copy(val, q)))(v)
        files[name] = t

    pair("truncated", lambda q: q.write_bytes(data.read_bytes()[: data.stat().st_size // 2]))
    pair("notnpz", lambda q: q.write_text("observations,actions\n1,2\n"))

    def without_actions(q):
        with np.load(data) as f:
            np.savez(q, **{k: f[k] for k in f.files if k != "actions"})

    pair("nokey", without_actions)

    def narrow_obs(src):  # observations of another size than cube-single's
        def make(q):
            with np.load(src) as f:
                arrays = {k: f[k] for k in f.files}
            arrays["observations"] = arrays["observations"][:, :20]
            np.savez(q, **arrays)

        return make

    pair("narrow", narrow_obs(data), narrow_obs(val))
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    return dict(workdir=w, files=files, blocker=blocker, env=world["env"])


BAD = [
    ("unknown_component", ["MAC.dynamics = @ChunkDynamix"], "Unknown component 'ChunkDynamix'.*Registered"),
    ("unknown_binding", ["MAC.learnin_rate = 1e-3"], r"MAC\.learnin_rate.*Did you mean 'MAC\.learning_rate'"),
    (
        "mistyped_value",
        ["train.num_steps = 'forty'"],
        r"train\.num_steps = 'forty' is out of range: must be a positive integer",
    ),
    ("dataset_missing", ["OGBenchDataset.dataset_path = '{root}/nowhere.npz'"], r"nowhere\.npz' does not exist"),
    ("dataset_truncated", ["OGBenchDataset.dataset_path = '{truncated}'"], r"truncated\.npz' is not a readable \.npz"),
    ("dataset_not_npz", ["OGBenchDataset.dataset_path = '{notnpz}'"], r"notnpz\.npz' is not a readable \.npz"),
    ("dataset_missing_key", ["OGBenchDataset.dataset_path = '{nokey}'"], r"lacks the required key\(s\) \['actions'\]"),
    (
        "obs_size_vs_env",
        ["OGBenchDataset.dataset_path = '{narrow}'"],
        r"observations of size \(20,\) but the OGBench environment 'cube-single' has \(28,\)",
    ),
    ("unknown_env", ["OGBenchDataset.env_name = 'cube-singel'"], r"no environment 'cube-singel'.*Did you mean"),
    (
        "shape_vs_checkpoint",
        ["ChunkDynamics.hidden_dims = (16,)"],
        r"component 'nets\.dynamics'.*in the checkpoint but .* in the configured model",
    ),
    ("action_chunk_vs_checkpoint", ["CHUNK = 3"], r"chunk length \(chunk_len\) 5 in the checkpoint but 3"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,bindings,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_one_clear_line_and_keeps_checkpoints(bad_world, capsys, monkeypatch, name, bindings, pattern):
    import re

    w = bad_world["workdir"]
    fmt = {"root": str(w.parent), **{k: str(v) for k, v in bad_world["files"].items()}}
    argv = [*SMOKE, *[a for b in bindings for a in ("--gin_bindings", b.format(**fmt))], "--workdir", str(w)]
    before = _snapshot(w)
    monkeypatch.setenv("MACFW_CACHE_DIR", bad_world["env"]["MACFW_CACHE_DIR"])
    rc, err = _main(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("macfw: error:")]
    assert rc == 2 and len(lines) == 1, (rc, err[-3000:])
    assert re.search(pattern, lines[0]), lines[0]
    assert _snapshot(w) == before  # untouched
    assert _listed(w) == [20, 40] and _restores(w) == 40


@pytest.mark.slow
def test_workdir_not_writable_and_cli_prints_one_line(bad_world):
    target = bad_world["blocker"] / "run"  # a folder inside a regular file cannot be made (even by root)
    r = subprocess.run(_cmd(target), cwd=REPO, env=bad_world["env"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("macfw: error:")]
    assert len(lines) == 1 and "is not writable" in lines[0] and "--workdir" in lines[0], r.stderr[-2000:]

    r = subprocess.run(
        _cmd(bad_world["workdir"], "MAC.dynamics = @Nope"),
        cwd=REPO,
        env=bad_world["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()][-1].startswith("macfw: error: Unknown component 'Nope'")


@pytest.mark.slow
def test_schedule_only_changes_continue(bad_world, capsys, monkeypatch):
    """num_steps and intervals may change on resume (no array shape changes): the run goes on."""
    w = bad_world["workdir"]
    argv = [
        *SMOKE,
        "--gin_bindings",
        "train.num_steps = 50",
        "--gin_bindings",
        "train.save_interval = 50",
        "--gin_bindings",
        "train.log_interval = 50",
        "--gin_bindings",
        "train.eval_interval = 50",
        "--workdir",
        str(w),
    ]
    monkeypatch.setenv("MACFW_CACHE_DIR", bad_world["env"]["MACFW_CACHE_DIR"])
    rc, err = _main(argv, capsys)
    assert rc == 0, err[-3000:]
    assert _listed(w) == [20, 40, 50]
    assert _summary(w)["step"] == 50
