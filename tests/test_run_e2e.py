"""End to end: ``python -m macfw.run --gin_file gin/smoke.gin --workdir W`` writes every documented output
(DESIGN §6), and a run stopped after a checkpoint then re-run on the same folder ends with exactly the
parameters of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test here shares one end-to-end campaign (the slow tier)

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--gin_file", "gin/smoke.gin"]
SUMMARY_KEYS = {"step", "success", "per_task_success", "episodes", "updates_per_s", "wall_time_s", "param_checksum"}

pytestmark = pytest.mark.slow

# The CSV columns of a MAC smoke run with the default loggers (train.loggers = ('csv', 'tensorboard')),
# as macfw wrote them before loggers became components (2026-12-07): a new MAC metric adds a column here.
TRAIN_COLUMNS = [
    "step",
    "wall_time_s",
    "updates_per_s",
    "critic/loss",
    "critic/q_max",
    "critic/q_mean",
    "critic/q_min",
    "dynamics/loss",
    "flow/distill_loss",
    "flow/loss",
    "flow/vel",
    "optim/grad_norm",
    "policy/loss",
    "reward/loss",
    "reward/pred",
    "reward/pred_max",
    "reward/pred_min",
    "reward/target_mean",
    "rollout/done_rate",
    "rollout/reward_mean",
    "success/accuracy",
    "success/accuracy_0.7",
    "success/accuracy_0.9",
    "success/label_mean",
    "success/loss",
    "success/neg_accuracy",
    "success/pos_accuracy",
    "success/prob",
    "success/prob_max",
    "success/prob_min",
    "total/loss",
    "value/loss",
    "value/max",
    "value/mean",
    "value/min",
    "value/return_max",
    "value/return_mean",
    "value/return_min",
    "value/return_std",
]
EVAL_COLUMNS = ["step", "success", "episodes", "success/task2", "mean_return", "mean_length"]


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env["MACFW_CACHE_DIR"] = str(cache)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "macfw.run", *SMOKE, "--workdir", str(workdir), *extra]


def _popen(cmd, env, log: Path):
    f = open(log, "w")
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    p._log_file = f  # noqa: SLF001  # pyright: ignore[reportAttributeAccessIssue]  (closed with the process)
    return p


def _finish(p, log: Path, timeout=600) -> tuple[int, str]:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        rc = -9
    p._log_file.close()  # noqa: SLF001
    return rc, log.read_text()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def _tensorboard_scalars(workdir: Path) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in the run's event files (TFRecords: length, CRC, an
    ``Event`` protobuf, CRC), in the order written."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(workdir.glob("events.out.tfevents*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            ev = event_pb2.Event()  # pyright: ignore[reportAttributeAccessIssue]  (protobuf: generated at import)
            ev.ParseFromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            out += [(ev.step, v.tag, v.simple_value) for v in ev.summary.value]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: uninterrupted. B: stopped after the step-20 checkpoint (num_steps = 20), then the plain command
    again on the same folder. The dataset is generated once into a shared cache first, so A and the first
    half of B can run side by side."""
    root = tmp_path_factory.mktemp("e2e")
    # the session's dataset cache (tests/conftest.py sets one) so that other tests reuse the tiny dataset
    cache = Path(os.environ.get("MACFW_CACHE_DIR") or root / "cache")
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
        timeout=600,
    )
    assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-3000:]
    assert str(cache) in gen.stdout

    a, b = root / "A", root / "B"
    pa = _popen(_cmd(a), env, root / "A.log")
    pb = _popen(_cmd(b, "--gin_bindings", "train.num_steps = 20"), env, root / "B1.log")
    rc_a, log_a = _finish(pa, root / "A.log")
    rc_b1, log_b1 = _finish(pb, root / "B1.log")
    b1_summary = json.loads((b / "summary.json").read_text()) if (b / "summary.json").exists() else None
    b1_ckpts = sorted(p.name for p in (b / "checkpoints").iterdir()) if (b / "checkpoints").exists() else []
    b1_rows = _rows(b / "train.csv") if (b / "train.csv").exists() else []
    rc_b2, log_b2 = _finish(_popen(_cmd(b), env, root / "B2.log"), root / "B2.log")
    return dict(
        a=a,
        b=b,
        rc_a=rc_a,
        log_a=log_a,
        rc_b1=rc_b1,
        log_b1=log_b1,
        rc_b2=rc_b2,
        log_b2=log_b2,
        b1_summary=b1_summary,
        b1_ckpts=b1_ckpts,
        b1_rows=b1_rows,
    )


def test_smoke_run_writes_documented_outputs(runs):
    a = runs["a"]
    assert runs["rc_a"] == 0, runs["log_a"][-5000:]
    for name in ("config.gin", "train.csv", "eval.csv", "summary.json"):
        assert (a / name).is_file(), name
    config = (a / "config.gin").read_text()
    assert "num_steps = 40" in config and "MAC" in config
    events = list(a.glob("events.out.tfevents*"))
    assert events and events[0].stat().st_size > 0
    ckpts = a / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit())
    assert steps == [20, 40]

    summary = json.loads((a / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["step"] == 40
    assert isinstance(summary["per_task_success"], dict) and summary["per_task_success"]
    assert 0.0 <= summary["success"] <= 1.0
    assert summary["episodes"] >= 1
    assert summary["updates_per_s"] is None or summary["updates_per_s"] > 0
    assert summary["wall_time_s"] > 0
    assert isinstance(summary["param_checksum"], str) and len(summary["param_checksum"]) >= 8

    rows = _rows(a / "train.csv")
    assert [int(float(r["step"])) for r in rows] == [10, 20, 30, 40]
    # each row is the mean of 10 updates; the last 20 updates against the first 10 (a window, not one value)
    first, last = float(rows[0]["dynamics/loss"]), np.mean([float(r["dynamics/loss"]) for r in rows[-2:]])
    assert last < first, (first, last)
    eval_rows = _rows(a / "eval.csv")
    assert [int(float(r["step"])) for r in eval_rows] == [40]
    assert float(eval_rows[0]["success"]) == pytest.approx(summary["success"])


def test_default_loggers_write_the_same_csv_and_tensorboard_as_before(runs):
    """train.csv and eval.csv keep their columns; TensorBoard has every training metric (not the time
    columns) at every logged step with the CSV's value, and eval/success, nothing else."""
    a = runs["a"]
    assert runs["rc_a"] == 0, runs["log_a"][-5000:]
    assert "train.loggers = ('csv', 'tensorboard')" in (a / "config.gin").read_text()
    assert _header(a / "train.csv") == TRAIN_COLUMNS
    assert _header(a / "eval.csv") == EVAL_COLUMNS
    assert not (a / "wandb").exists() and not (a / "wandb_run_id").exists()
    expected = [(int(r["step"]), c, float(r[c])) for r in _rows(a / "train.csv") for c in TRAIN_COLUMNS[3:]]
    expected += [(int(r["step"]), "eval/success", float(r["success"])) for r in _rows(a / "eval.csv")]
    scalars = _tensorboard_scalars(a)
    assert sorted(x[:2] for x in scalars) == sorted(x[:2] for x in expected)
    got = {x[:2]: x[2] for x in scalars}
    for step, tag, v in expected:
        assert got[step, tag] == pytest.approx(v, rel=1e-6, abs=1e-30), (step, tag)


def test_resume_after_checkpoint_matches_uninterrupted_run(runs):
    b = runs["b"]
    assert runs["rc_a"] == 0, runs["log_a"][-5000:]
    assert runs["rc_b1"] == 0, runs["log_b1"][-5000:]
    # the first half stopped at 20 with one checkpoint, as a run killed after its first save
    assert runs["b1_ckpts"] == ["20"]
    assert runs["b1_summary"] is not None and runs["b1_summary"]["step"] == 20
    assert [int(float(r["step"])) for r in runs["b1_rows"]] == [10, 20]

    assert runs["rc_b2"] == 0, runs["log_b2"][-5000:]
    assert "resuming from step 20" in runs["log_b2"]
    summary_a = json.loads((runs["a"] / "summary.json").read_text())
    summary_b = json.loads((b / "summary.json").read_text())
    assert summary_b["step"] == 40
    assert runs["b1_summary"]["param_checksum"] != summary_b["param_checksum"]  # it did train on
    assert summary_b["param_checksum"] == summary_a["param_checksum"]

    steps = [int(float(r["step"])) for r in _rows(b / "train.csv")]
    assert steps == [10, 20, 30, 40], steps
    eval_steps = [int(float(r["step"])) for r in _rows(b / "eval.csv")]
    assert len(eval_steps) == len(set(eval_steps)) and eval_steps[-1] == 40
    assert sorted(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]
    # the resumed run logs the same metrics as the uninterrupted one after the resume point
    rows_a = {int(float(r["step"])): r for r in _rows(runs["a"] / "train.csv")}
    rows_b = {int(float(r["step"])): r for r in _rows(b / "train.csv")}
    for step in (30, 40):
        assert float(rows_b[step]["dynamics/loss"]) == pytest.approx(float(rows_a[step]["dynamics/loss"]), rel=1e-5)
