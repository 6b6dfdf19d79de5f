"""The experiment scripts in experiments/ (paper Figures 2-3 and the results table).

results_table runs on hand-written summary.json files (fast); chunk_sweep and model_error run end
to end on tiny generated data (slow: each trains for real, in subprocesses).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXP = REPO / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXP / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One dataset cache for the module: the smoke data (4 x 101 steps of cube-single) is generated once."""
    return tmp_path_factory.mktemp("macfw_cache")


# --------------------------------------------------------------------------------------- results_table
def _write_run(
    root: Path, name: str, *, dataset: str, per_task: dict, seed: int | None = None, step: int = 1000, **extra
):
    d = root / name
    d.mkdir(parents=True)
    s = {
        "step": step,
        "success": float(np.mean(list(per_task.values()))),
        "per_task_success": per_task,
        "episodes": 15 * len(per_task),
        "dataset": dataset,
        "interrupted": False,
        **extra,
    }
    (d / "summary.json").write_text(json.dumps(s))
    if seed is not None:
        (d / "config.gin").write_text(f"train.chunk_len = 10\ntrain.seed = {seed}\n")


def _row(md: str, env: str, section: str) -> list[str]:
    part = md.split(f"## {section}")[1].split("## ")[0]
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == env:
            return cells
    raise AssertionError(f"no row {env!r} in section {section!r}:\n{md}")


def test_results_table_numbers(tmp_path, capsys):
    rt = _load("results_table")
    root = tmp_path / "runs"
    # single-task: 2 envs x 2 seeds x tasks (one run per task, OGBench's single-task protocol)
    cube = {0: [1.0, 0.8, 1.0, 0.6, 1.0], 1: [0.8, 1.0, 1.0, 0.8, 0.6]}
    for seed, vals in cube.items():
        for i, v in enumerate(vals, 1):
            _write_run(
                root,
                f"cs-t{i}-s{seed}",
                dataset=f"cube-single-play-singletask-task{i}-v0",
                per_task={f"task{i}": v},
                seed=seed,
            )
    scene = {0: [0.2, 0.4], 1: [0.6, 0.4]}  # tasks 1 and 2 only
    for seed, vals in scene.items():
        for i, v in enumerate(vals, 1):
            _write_run(
                root / f"seed{seed}",
                f"scene-t{i}-s{seed}",
                dataset=f"scene-play-singletask-task{i}-v0",
                per_task={f"task{i}": v},
            )  # no config.gin: seed from the folder name
    # goal-conditioned: one run evaluates all 5 tasks
    for seed, scale in ((0, 1.0), (1, 0.5)):
        _write_run(
            root,
            f"cd-gc-s{seed}",
            dataset="cube-double-play-oraclerep-v0",
            per_task={f"task{i}": 0.2 * i * scale for i in range(1, 6)},
            seed=seed,
            step=500,
        )
    # an unfinished run is skipped
    (root / "unfinished").mkdir()
    (root / "unfinished" / "summary.json").write_text(json.dumps({"step": 3, "interrupted": True}))

    out = tmp_path / "table.md"
    assert rt.main([str(root), "--out", str(out)]) == 0
    md = out.read_text()
    assert md == capsys.readouterr().out

    st = "Single-task"
    r = _row(md, "cube-single", st)
    # per task: mean +- std (ddof=0) over the 2 seeds, in %
    assert r[1:6] == ["90.0 ± 10.0", "90.0 ± 10.0", "100.0 ± 0.0", "70.0 ± 10.0", "80.0 ± 20.0"]
    # average: seed task-averages 88 and 84 -> 86 +- 2
    assert r[6] == "86.0 ± 2.0"
    assert r[7] == "99 ± 2"  # the paper's number beside ours
    assert r[8] == "2" and r[9] == "1000"
    r = _row(md, "scene", st)
    assert r[1:3] == ["40.0 ± 20.0", "40.0 ± 0.0"] and r[3:6] == ["—", "—", "—"]
    assert r[6] == "40.0 ± 10.0"  # seed averages 30 and 50
    assert r[7] == "97 ± 4"
    gc = "Goal-conditioned (oracle"
    r = _row(md, "cube-double", gc)
    assert r[1] == "15.0 ± 5.0" and r[5] == "75.0 ± 25.0"
    assert r[6] == "45.0 ± 15.0"  # seed averages 60 and 30
    assert r[7] == "100 ± 1" and r[9] == "500"
    # paper-only environments are listed with their numbers
    assert "puzzle-4x4 78 ± 13" in md and "humanoidmaze-giant 0 ± 0" in md
    assert "cube-double 53 ± 4" in md  # single-task cube-double: paper only


def test_results_table_multiseed_run_and_glob(tmp_path, capsys):
    rt = _load("results_table")
    # a train.num_seeds run: seeds and per-seed success inside one summary.json
    _write_run(
        tmp_path,
        "puzzle-3x3-vmapped",
        dataset="puzzle-3x3-play-singletask-v0",
        per_task={"task4": 0.25},
        seeds=[0, 1, 2, 3],
        per_seed_success=[0.0, 0.2, 0.4, 0.4],
    )
    assert rt.main([str(tmp_path / "puzzle-*")]) == 0
    md = capsys.readouterr().out
    r = _row(md, "puzzle-3x3", "Single-task")
    assert r[1] == "25.0 ± 16.6" and r[2] == "25.0 ± 16.6" and r[3] == "20 ± 0" and r[4] == "4"
    assert rt.parse_dataset_name("humanoidmaze-medium-navigate-oraclerep-v0") == (
        "humanoidmaze-medium",
        "oraclerep",
        None,
    )
    assert rt.parse_dataset_name("cube-single-play-singletask-task3-v0") == ("cube-single", "singletask", "task3")


def test_results_table_nothing_found(tmp_path):
    rt = _load("results_table")
    assert rt.main([str(tmp_path)]) == 1


# --------------------------------------------------------------------------------------- chunk_sweep
@pytest.mark.slow
def test_chunk_sweep_smoke(tmp_path, cache_dir, monkeypatch, capsys):
    cs = _load("chunk_sweep")
    monkeypatch.setenv("MACFW_CACHE_DIR", str(cache_dir))
    monkeypatch.chdir(REPO)
    out = tmp_path / "sweep"
    args = [
        "--base",
        "gin/smoke.gin",
        "--chunks",
        "1,5",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--gin_bindings",
        "train.progress = False",
        "--gin_bindings",
        "OGBenchDataset.workers = 1",
    ]
    assert cs.main(args) == 0
    md = (out / "chunk_sweep.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "5"]
    for n, r in zip((1, 5), rows):
        s = json.loads((out / "runs" / f"n{n}-s0" / "summary.json").read_text())
        assert s["spec"]["chunk_len"] == n
        assert f"{s['success'] * 100:.1f} ± 0.0" in r and "1/1" in r and f"s0: {s['success'] * 100:.1f}" in r
    assert (out / "chunk_sweep.png").stat().st_size > 1000
    capsys.readouterr()
    # resumable: finished runs are skipped
    assert cs.main(args) == 0
    assert capsys.readouterr().out.count("skipped") == 2


# --------------------------------------------------------------------------------------- model_error
@pytest.mark.slow
def test_model_error_tiny(tmp_path, cache_dir):
    out = tmp_path / "me"
    env = dict(os.environ, MACFW_CACHE_DIR=str(cache_dir))
    cmd = [
        sys.executable,
        str(EXP / "model_error.py"),
        "--out",
        str(out),
        "--episodes",
        "4",
        "--episode_length",
        "101",
        "--steps",
        "50",
        "--hidden",
        "16,16",
        "--batch",
        "16",
        "--steps_per_dispatch",
        "25",
        "--workers",
        "1",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "model_error.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == ["chunk", "horizon", "error"]
    got = {(int(x["chunk"]), int(x["horizon"])) for x in rows}
    assert got == {(n, h) for n in (1, 10) for h in range(10, 101, 10)} and len(rows) == 20
    errs = np.array([float(x["error"]) for x in rows])
    assert np.all(np.isfinite(errs)) and np.all(errs >= 0)
    assert (out / "model_error.png").stat().st_size > 1000
    assert "open-loop MSE in scaled [-1, 1] observation space" in r.stdout


# --------------------------------------------------------------------------------------- discount_masks
def test_discount_masks_commands_and_table(tmp_path):
    """Each cell is one run with its own GAMMA and mask semantics; the table reads their summaries."""
    dm = _load("discount_masks")
    args = dm.argparse.Namespace(
        out=tmp_path, gin_file=["gin/quickstart.gin"], gin_bindings=["train.num_steps = 20"], seeds=3, parallel=1
    )
    cmd = dm.command(args, 0.999, "ones")
    assert cmd[cmd.index("--workdir") + 1] == str(tmp_path / "gamma0.999-masks-ones")
    binds = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--gin_bindings"]
    assert {
        "GAMMA = 0.999",
        "OGBenchDataset.singletask_masks = 'ones'",
        "train.num_seeds = 3",
        "train.num_steps = 20",
    } <= set(binds)
    for j, (g, m) in enumerate([(g, m) for g in dm.GAMMAS for m in dm.MASKS]):
        d = dm.cell_dir(tmp_path, g, m)
        d.mkdir()
        per_seed = [0.1 * j, 0.1 * j + 0.2, 0.1 * j + 0.4]
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "success": float(np.mean(per_seed)),
                    "per_seed_success": per_seed,
                    "episodes": 90,
                    "step": 15000,
                    "wall_time_s": 100.0,
                    "updates_per_s": 10.0,
                }
            )
        )
    md, data = dm.table(tmp_path)
    assert len(md.strip().splitlines()) == 2 + 4
    cell = data["0.999/ones"]
    assert cell["episodes_per_seed"] == 30 and cell["per_seed"] == pytest.approx([0.3, 0.5, 0.7])
    assert cell["mean"] == pytest.approx(50.0) and cell["std"] == pytest.approx(100 * np.std([0.3, 0.5, 0.7]))
    assert "| 0.999 | ones | 50.0 +- 16.3 | 3 | 30 | 15000 |" in md


# --------------------------------------------------------------------------------------- compare
@pytest.mark.slow
def test_compare_writes_table_csv_curves_and_reruns_without_training(tmp_path):
    out = tmp_path / "cmp"
    cmd = [
        sys.executable,
        str(EXP / "compare.py"),
        "--agents",
        "mac,mopo",
        "--envs",
        "cube-single",
        "--tasks",
        "2",
        "--seeds",
        "0,1",
        "--budget",
        "smoke",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(": started in ") == 2 and r.stdout.count(": finished in ") == 2, r.stdout
    for f in ("table.md", "table.csv", "curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(x["agent"], x["mode"], x["env"], x["task"], x["seeds"]) for x in rows] == [
        ("mac", "singletask", "cube-single", "2", "0 1"),
        ("mopo", "singletask", "cube-single", "2", "0 1"),
    ]
    for x in rows:
        per = [float(v) for v in x["per_seed"].split()]
        assert len(per) == 2 and float(x["success_mean"]) == pytest.approx(100 * np.mean(per), abs=1e-3)
        assert int(x["steps"]) == 40
    md = (out / "table.md").read_text()
    assert "smoke" in md and "(99 +- 2)" in md and "| mopo | singletask |" in md  # the paper's MAC figure beside ours
    summaries = sorted(out.rglob("summary.json"))
    assert len(summaries) == 2
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    # both seeds of a run in one process, evaluated along the way (steps 20 and 40)
    for p in summaries:
        s = json.loads(p.read_text())
        assert s["seeds"] == [0, 1]
        with open(p.parent / "eval.csv", newline="") as f:
            assert [int(float(x["step"])) for x in csv.DictReader(f)] == [20, 40]
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert ": started in " not in r2.stdout and r2.stdout.count("done already") == 2, r2.stdout
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes
    assert (out / "table.md").read_text() == md


def test_compare_table_marks_one_seed_instead_of_a_zero_spread():
    cmp = _load("compare")
    row = dict(
        agent="fql",
        env="cube-single",
        task=2,
        mode="singletask",
        steps=15000,
        episodes_per_seed=30,
        wall_time_s=60.0,
        paper_mean=96,
        paper_std=None,
    )
    md = cmp.table_md(
        [
            dict(row, seeds=[0], per_seed=[0.033], success_mean=3.3, success_std=0.0),
            dict(
                row,
                agent="mac",
                seeds=[0, 1],
                per_seed=[0.35, 0.45],
                success_mean=40.0,
                success_std=5.0,
                paper_mean=99,
                paper_std=2,
            ),
        ],
        "quickstart",
    )
    assert "| fql | singletask | 3.3 (n = 1) (96) |" in md and "+- 0.0" not in md
    assert "| mac | singletask | 40.0 +- 5.0 (99 +- 2) |" in md


def test_compare_reuses_run_folders_that_hold_some_of_the_requested_seeds(tmp_path):
    """``--seeds 0`` then ``--seeds 0,1,2``: the finished ``seed0`` is reused and only seeds 1-2 train
    (one group); an interrupted folder with checkpoints is resumed; folders with an unrequested
    seed, or with neither a summary nor checkpoints, are not used."""
    cmp = _load("compare")
    cell = tmp_path / "runs" / "quickstart" / "fql" / "cube-single-task2"

    def plan(seeds):
        return [j.seeds for j in cmp.plan_cell("fql", "cube-single", 2, seeds, "quickstart", tmp_path)]

    assert plan([0, 1, 2]) == [[0, 1, 2]]  # nothing there yet: one vmapped group
    (cell / "seed0").mkdir(parents=True)
    assert plan([0, 1, 2]) == [[0, 1, 2]]  # an empty folder (never trained) is not a run
    (cell / "seed0" / "summary.json").write_text("{}")
    assert plan([0, 1, 2]) == [[0], [1, 2]]
    assert plan([0, 2, 3]) == [[0], [2, 3]]
    (cell / "seeds1-2" / "checkpoints").mkdir(parents=True)  # interrupted: resumed, not restarted
    assert plan([0, 1, 2]) == [[0], [1, 2]]
    (cell / "seeds0-3" / "checkpoints").mkdir(parents=True)  # holds seed 3, which is not asked for
    assert plan([0, 1, 2]) == [[0], [1, 2]]
    assert plan([0, 1, 2, 3]) == [[0], [1, 2], [3]]  # finished first, then the larger interrupted group...
    (cell / "seeds0-3" / "summary.json").write_text("{}")
    assert plan([0, 1, 2, 3]) == [[0, 1, 2, 3]]  # ...but a finished folder with all four wins
    assert [j.workdir.name for j in cmp.plan_cell("fql", "cube-single", 2, [0, 1, 2], "quickstart", tmp_path)] == [
        "seed0",
        "seeds1-2",
    ]


def test_compare_table_only_trains_nothing_and_tabulates_the_finished_runs(tmp_path, capsys):
    cmp = _load("compare")
    run = tmp_path / "runs" / "quickstart" / "fql" / "cube-single-task2" / "seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(
        json.dumps({"success": 0.1, "per_seed_success": [0.1], "step": 15000, "wall_time_s": 60.0, "episodes": 30})
    )
    (run / "eval.csv").write_text("step,success,success/seed0\n15000,0.1,0.1\n")
    argv = [
        "--agents",
        "fql,mac",
        "--envs",
        "cube-single",
        "--tasks",
        "2",
        "--seeds",
        "0,1",
        "--budget",
        "quickstart",
        "--out",
        str(tmp_path),
        "--table-only",
    ]
    assert cmp.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "fql cube-single task2 seeds 1: not finished" in out and "mac cube-single task2 seeds 0,1: not finished" in out
    )
    md = (tmp_path / "table.md").read_text()
    assert "| fql | singletask | 10.0 (n = 1) (96) |" in md and "| mac |" not in md
    assert not (tmp_path / "runs" / "quickstart" / "mac").exists()  # nothing was started
    assert (tmp_path / "curves.png").stat().st_size > 0
    (run / "summary.json").unlink()
    with pytest.raises(SystemExit, match="no finished run"):
        cmp.main(argv)


def test_compare_table_averages_tasks_per_seed_and_reads_shared_goal_conditioned_runs(tmp_path):
    """The table reports the paper's statistic: per seed the mean over the tasks run, then mean +- std
    over seeds. Single-task: one run per task; goal-conditioned (--protocol): one run evaluated on
    every task, read from summary.json's per_seed_per_task_success."""
    cmp = _load("compare")
    from macfw import protocol

    st = protocol.TABLES["singletask"]
    jobs = []
    for task, per_seed in ((1, [0.2, 0.4]), (2, [0.6, 1.0])):
        j = cmp.Job("mac", "cube-single", task, [0, 1], "smoke", tmp_path, mode="singletask", table=st)
        j.workdir.mkdir(parents=True)
        (j.workdir / "summary.json").write_text(
            json.dumps(
                {
                    "success": float(np.mean(per_seed)),
                    "per_seed_success": per_seed,
                    "step": 40,
                    "wall_time_s": 6.0,
                    "episodes": 2,
                }
            )
        )
        jobs.append(j)
    gc = protocol.TABLES["goalconditioned"]
    g = cmp.Job("mac", "puzzle-3x3", (1, 2), [0, 1], "smoke", tmp_path, mode="oraclerep", table=gc)
    assert g.workdir.parts[-3:] == ("mac-oraclerep", "puzzle-3x3-tasks1-2", "seeds0-1")
    g.workdir.mkdir(parents=True)
    pst = [{"task1": 1.0, "task2": 0.0}, {"task1": 0.5, "task2": 0.5}]
    (g.workdir / "summary.json").write_text(
        json.dumps(
            {
                "success": 0.5,
                "per_seed_success": [0.5, 0.5],
                "per_seed_per_task_success": pst,
                "per_task_success": {"task1": 0.75, "task2": 0.25},
                "step": 40,
                "wall_time_s": 10.0,
                "episodes": 4,
            }
        )
    )
    rows = cmp.collect(jobs + [g])
    by = {(r["mode"], r["env"], r["task"]): r for r in rows}
    assert by[("oraclerep", "puzzle-3x3", 1)]["per_seed"] == [1.0, 0.5]
    assert by[("oraclerep", "puzzle-3x3", 2)]["success_mean"] == pytest.approx(25.0)
    assert by[("oraclerep", "puzzle-3x3", 1)]["episodes_per_seed"] == 1
    cells = cmp.env_cells(rows)
    # single-task: per seed (0.2 + 0.6) / 2 = 0.4 and (0.4 + 1.0) / 2 = 0.7 -> 55 +- 15
    c = cells[("mac", "singletask", "cube-single")]
    assert c["success_mean"] == pytest.approx(55.0) and c["success_std"] == pytest.approx(15.0)
    c = cells[("mac", "oraclerep", "puzzle-3x3")]
    assert c["success_mean"] == pytest.approx(50.0) and c["success_std"] == pytest.approx(0.0)
    md = cmp.table_md(rows, "smoke")
    assert "| mac | singletask | 55.0 +- 15.0 (99 +- 2) |  |" in md
    assert "| mac | oraclerep |  | 50.0 +- 0.0 (100 +- 0) |" in md
    assert "cube-single tasks 1,2" in md and "puzzle-3x3 tasks 1,2" in md
