"""``python -m macfw.evaluate --workdir DIR``: evaluates a saved checkpoint without training, rebuilt from
the Gin config stored in the checkpoint (no dataset is loaded or generated)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env["MACFW_CACHE_DIR"] = str(cache)
    env.setdefault("JAX_PLATFORMS", "cpu")  # XLA_FLAGS and the compilation cache (tests/conftest.py) are kept
    env.pop("MACFW_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 10-step smoke run (one compiled call), evaluated and saved at step 10."""
    root = tmp_path_factory.mktemp("evalcli")
    w = root / "run"
    env = _env(Path(os.environ.get("MACFW_CACHE_DIR") or root / "cache"))  # the session's (tests/conftest.py)
    cmd = [
        sys.executable,
        "-m",
        "macfw.run",
        "--gin_file",
        "gin/smoke.gin",
        "--gin_bindings",
        "train.num_steps = 10",
        "--gin_bindings",
        "train.eval_interval = 10",
        "--gin_bindings",
        "train.save_interval = 10",
        "--gin_bindings",
        "train.progress = False",
        "--workdir",
        str(w),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return dict(root=root, workdir=w, env=env)


def _evaluate(run, *args, cache_gone=True):
    env = dict(run["env"])
    if cache_gone:  # proves no dataset is loaded or generated
        env["MACFW_CACHE_DIR"] = str(run["root"] / "no_cache_here")
    return subprocess.run(
        [sys.executable, "-m", "macfw.evaluate", "--workdir", str(run["workdir"]), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_runs_own_evaluation(run):
    w = run["workdir"]
    r = _evaluate(run)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((w / "eval_step10.json").read_text())
    assert out["step"] == 10 and out["env_name"] == "cube-single" and out["task_mode"] == "singletask"
    assert out["task_ids"] == [2] and out["episodes_per_task"] == 1 and out["episodes"] == 1
    assert set(out["per_task_success"]) == {"task2"}
    assert "task2: success" in r.stdout and "mean: success" in r.stdout
    assert not (run["root"] / "no_cache_here").exists()
    # same checkpoint, same episodes and seeds as the run's own evaluation at step 10
    with open(w / "eval.csv", newline="") as f:
        row = [x for x in csv.DictReader(f) if int(float(x["step"])) == 10][0]
    assert out["success"] == pytest.approx(float(row["success"]))
    assert out["mean_return"] == pytest.approx(float(row["mean_return"]), rel=1e-6)
    assert out["mean_length"] == pytest.approx(float(row["mean_length"]))


@pytest.mark.slow
def test_evaluate_cli_options_and_errors(run):
    w = run["workdir"]
    r = _evaluate(run, "--step", "10", "--episodes", "2", "--tasks", "2", "--execute_steps", "5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((w / "eval_step10.json").read_text())
    assert out["task_ids"] == [2] and out["episodes"] == 2 and out["execute_steps"] == 5
    assert set(out["per_task_success"]) == {"task2"}
    assert 0.0 <= out["success"] <= 1.0

    # a single-task agent learned task2's rewards: other tasks are refused in one line, nothing written
    before = sorted(p.name for p in w.iterdir())
    for tasks in ("1,3", "2,4", "5"):
        r = _evaluate(run, "--tasks", tasks)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("macfw.evaluate: error:"), lines
        assert "trained single-task on cube-single task2" in lines[0] and "pass 2" in lines[0], lines[0]
    assert sorted(p.name for p in w.iterdir()) == before

    r = _evaluate(run, "--step", "7")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no complete checkpoint step 7" in r.stderr.lower() and "[10]" in r.stderr

    empty = run["root"] / "empty"
    empty.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "macfw.evaluate", "--workdir", str(empty)],
        cwd=REPO,
        env=run["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "No checkpoints" in r.stderr


@pytest.mark.slow
def test_evaluate_cli_skips_an_incomplete_step_and_leaves_the_folder_alone(run, tmp_path):
    w = tmp_path / "copy"
    shutil.copytree(run["workdir"], w)
    half = w / "checkpoints" / "20"  # a newer step without manifest: invisible
    shutil.copytree(w / "checkpoints" / "10", half)
    (half / "macfw_manifest.json").unlink()
    r = _evaluate(dict(run, workdir=w), "--tasks", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (w / "eval_step10.json").is_file() and not (w / "eval_step20.json").exists()
    assert half.is_dir()  # read-only: evaluation never deletes anything


@pytest.mark.slow
def test_evaluate_cli_workers_do_not_change_the_result(run):
    """The trained MAC checkpoint, 3 episodes: its recorded batch size, in this process or in workers."""
    from macfw.evaluation import default_batch_size

    w = run["workdir"]
    outs = []
    for workers in ("1", "2"):
        r = _evaluate(run, "--episodes", "3", "--workers", workers)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out = json.loads((w / "eval_step10.json").read_text())
        assert out["workers"] == int(workers) and out["batch_size"] == default_batch_size()  # the run's own
        assert f"{workers} worker(s)" in r.stdout
        outs.append(out)
    assert len(outs[0]["per_seed"][0]["per_episode"]) == 3
    assert outs[0]["per_seed"][0]["per_episode"] == outs[1]["per_seed"][0]["per_episode"]
    r = _evaluate(run, "--workers", "0")
    assert r.returncode == 2 and "--workers: must be an integer >= 1" in r.stderr
