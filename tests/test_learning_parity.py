"""experiments/learning_parity.py (issue 29): macfw and the authors' code trained on the same data and
evaluated the same way.

Fast: the argument checks (a bad value is named with the fix) and ``--dry-run`` (both implementations
planned, nothing trained; no reference checkout needed). Slow, only when a checkout of the authors'
code is given: ``MACFW_PARITY_REF=/path/to/kwanyoungpark-MAC python -m pytest -q -m slow
tests/test_learning_parity.py``: the whole harness at a tiny budget (MOPO, one seed, 50 gradient steps,
2 x 32 networks, 2 evaluation episodes, a 4-episode generated dataset; about 2 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "learning_parity.py"
REF = os.environ.get("MACFW_PARITY_REF")
TINY = [
    "--agents",
    "mopo",
    "--env",
    "cube-single-play-singletask-task2-v0",
    "--steps",
    "50",
    "--seeds",
    "0",
    "--eval-every",
    "50",
    "--eval-episodes",
    "2",
    "--hidden",
    "32,32",
    "--batch-size",
    "32",
    "--rollout-freq",
    "20",
    "--rollout-starts",
    "64",
    "--episodes",
    "4",
    "--episode-length",
    "101",
]


def _module():
    """experiments/learning_parity.py, imported (its folder put on sys.path)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    import learning_parity  # pyright: ignore[reportMissingImports]  (experiments/, put on sys.path above)

    return learning_parity


def _main():
    return _module().main


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--agents", "mopo,sac"], ["['sac']", "valid agents: ['leq', 'mobile', 'mopo']"]),
        (["--env", "cube-single-v0"], ["'cube-single-v0'", "singletask-task<N>-v0", "oraclerep-v0"]),
        (["--env", "antsoccer-arena-navigate-oraclerep-v0"], ["gin/envs/antsoccer-arena.gin", "cube-single"]),
        (["--eval-every", "100"], ["--eval-every must be in 1..--steps (50), got 100"]),
        (["--hidden", "32,x"], ["--hidden must be comma-separated integers >= 1, got '32,x'"]),
        (["--parallel", "0"], ["--parallel must be >= 1, got 0"]),
        (["--slurm-gpus", "two"], ["--slurm-gpus must be 'auto' or an integer >= 0, got 'two'"]),
    ],
)
def test_bad_arguments_are_named_with_the_fix(flags, said, tmp_path, capsys):
    argv = ["--reference-dir", str(tmp_path / "none"), *TINY, "--out", str(tmp_path / "out"), "--dry-run", *flags]
    with pytest.raises(SystemExit) as e:
        _main()(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for text in said:
        assert text in err, err


def test_dry_run_plans_both_implementations_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--reference-dir", str(tmp_path / "none"), *TINY, "--out", str(out), "--dry-run"]
    assert _main()(argv) == 0
    text = capsys.readouterr().out
    assert "mopo seed 0, macfw [macfw]: to run" in text
    assert "mopo seed 0, the authors' code (kwanyoungpark/MAC) [reference]: to run" in text
    assert "-m macfw.run" in text and "learning_parity_ref.py" in text
    assert "'HIDDEN = (32, 32)'" in text and "--hidden 32,32" in text
    assert "| discount | 0.999 | gin/baselines/mopo.gin (MOPO.gamma) |" in text  # the settings of both sides
    assert "2 runs (2 to run, 0 done); nothing trained (--dry-run)" in text
    assert not out.exists()


def test_runs_go_through_a_launcher_and_results_come_from_their_workdirs(tmp_path, capsys):
    """Every run is a macfw.launch RunSpec whose workdir is its folder (the authors' side too: its
    command names --workdir); after the launch, a run with summary.json gets its result file (macfw's
    from eval.csv, the authors' from result.json) and one without is reported with its log."""
    lp = _module()
    argv = ["--reference-dir", str(tmp_path / "none"), *TINY, "--seeds", "0,1", "--out", str(tmp_path / "out")]
    p = lp.build_parser()
    setup = lp.check_args(p.parse_args(argv), p)
    runs = lp.plan_runs(setup)
    assert [r.name for r in runs] == [f"mopo seed {s} {i}" for s in (0, 1) for i in ("macfw", "reference")]
    for r in runs:
        spec = r.spec()
        assert spec.workdir == r.folder and spec.log_path == r.log_path and spec.cwd == lp.REPO
        assert list(spec.command[spec.command.index("--workdir") :][:2]) == ["--workdir", str(r.folder)]

    class Launcher:  # finishes seed 0 of both sides as each would, leaves seed 1 without a summary
        def launch(self, specs):
            self.names = [s.name for s in specs]
            for s in specs:
                (s.workdir / "stdout.log").write_text("last line of the run\n")
                if "seed 0" not in s.name:
                    continue
                if s.name.endswith("macfw"):
                    (s.workdir / "eval.csv").write_text("step,success,success/task2\n50,0.25,0.25\n")
                else:
                    (s.workdir / "result.json").write_text(
                        json.dumps({"impl": "reference", "steps": [50], "success": [40.0]})
                    )
                (s.workdir / "summary.json").write_text(json.dumps({"success": 0.3}))
            return []

    launcher = Launcher()
    failures = lp.train(runs, launcher)
    assert launcher.names == [r.name for r in runs]
    assert sorted(failures) == ["mopo seed 1 macfw", "mopo seed 1 reference"]
    assert "did not finish" in failures["mopo seed 1 macfw"] and "last line of the run" in failures["mopo seed 1 macfw"]
    done = {r.impl: json.loads(r.result_path.read_text()) for r in runs if r.seed == 0}
    assert done["macfw"]["success"] == [25.0] and done["macfw"]["steps"] == [50]
    assert done["reference"]["success"] == [40.0]
    assert all(d["settings"] == setup.fingerprint("mopo") for d in done.values())
    assert [lp.run_state(r) for r in runs] == ["done", "done", "to run", "to run"]
    assert (runs[2].folder / "settings.json").is_file()  # a later run with other settings stops, not mixes
    out = capsys.readouterr().out
    assert "mopo seed 0 macfw: success 25.0% at step 50" in out and "mopo seed 1 reference: FAILED" in out


@pytest.mark.slow
@pytest.mark.skipif(not REF, reason="set MACFW_PARITY_REF to a checkout of kwanyoungpark/MAC")
def test_end_to_end_at_a_tiny_budget(tmp_path):
    out, js = tmp_path / "out", tmp_path / "lp.json"
    cmd = [sys.executable, str(SCRIPT), "--reference-dir", str(REF), *TINY, "--out", str(out), "--json", str(js)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(js.read_text())
    mopo = result["agents"]["mopo"]
    for impl in ("macfw", "reference"):
        side = mopo[impl]
        assert side["n_seeds"] == 1 and not side["failed"], side
        assert side["per_seed"]["0"]["steps"] == [50]
        assert all(0.0 <= x <= 100.0 for x in side["per_seed"]["0"]["success"])
        assert 0.0 <= side["final_mean"] <= 100.0 and side["final_std"] == 0.0
    assert isinstance(mopo["within_spread"], bool)
    assert all(r["same"] for r in result["settings"]["mopo"]), result["settings"]["mopo"]
    assert "| agent | macfw success % (mean ± std, n seeds) | authors' success % (mean ± std, n seeds) |" in p.stdout
    assert "| mopo | " in p.stdout and (out / "table.md").is_file()
    # a re-run skips the finished runs
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == 2, again.stdout[-2000:]
