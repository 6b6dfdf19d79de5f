"""Paper-style results table from many runs' ``summary.json`` (MAC paper, Tables 1-2).

Each run folder's ``summary.json`` (written by ``macfw.train.train``) is identified by

* its ``dataset`` field, e.g. ``cube-single-play-singletask-task2-v0`` (single-task) or
  ``cube-double-play-oraclerep-v0`` (goal-conditioned): environment and task mode;
* the tasks it evaluated: the keys of ``per_task_success`` (``task1`` .. ``task5``; a single-task
  run evaluates its one task, a goal-conditioned run all five);
* its seed: ``seeds`` in the summary (runs with ``train.num_seeds``), else ``train.seed`` in the
  ``config.gin`` beside it, else an ``-s<k>`` / ``seed<k>`` suffix of the folder name, else 0.

Rows are environments (one table per task mode). Columns: success per task as mean +- std over
seeds, the average over tasks (mean over tasks of the per-task means; std over seeds of each seed's
task average, using the seeds that have every task), the number of seeds, gradient steps, and the
paper's MAC number beside ours (DESIGN §8). ``summary.json`` holds success as a fraction in [0, 1];
the table shows percentages. Std uses ddof=0.

If two runs claim the same (environment, task mode, task, seed), the one with more gradient steps is
kept (ties: the later path) and a warning names both: point the script at one configuration at a time.

Examples::

    python experiments/results_table.py runs/ --out results.md
    python experiments/results_table.py 'runs/st-*' 'runs/gc-*/summary.json' --out results.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: The paper's MAC success (%), mean +- std (DESIGN §8).
PAPER_SINGLETASK = {
    "cube-single": (99, 2),
    "cube-double": (53, 4),
    "scene": (97, 4),
    "puzzle-3x3": (20, 0),
    "puzzle-4x4": (78, 13),
}
PAPER_GOAL = {  # goal-conditioned, 100M-transition datasets, oracle goal representations
    "cube-double": (100, 1),
    "cube-octuple": (30, 6),
    "puzzle-3x3": (100, 0),
    "puzzle-4x5": (99, 3),
    "humanoidmaze-medium": (36, 2),
    "humanoidmaze-giant": (0, 0),
}
PAPER = {"singletask": PAPER_SINGLETASK, "oraclerep": PAPER_GOAL, "goal": {}}
MODE_TITLE = {
    "singletask": "Single-task (reward-based)",
    "oraclerep": "Goal-conditioned (oracle goal representations)",
    "goal": "Goal-conditioned (full-state goals)",
}
PAPER_NOTE = {
    "singletask": "paper: 1M-transition datasets, 5 tasks, 4 seeds",
    "oraclerep": "paper: 100M-transition datasets, 5 evaluation goals",
    "goal": "",
}


def parse_dataset_name(name: str) -> tuple[str, str, str | None]:
    """``(env, task_mode, task)`` from an OGBench dataset name.

    ``cube-single-play-singletask-task2-v0`` -> ``('cube-single', 'singletask', 'task2')``;
    ``cube-single-play-singletask-v0`` -> ``('cube-single', 'singletask', None)``;
    ``humanoidmaze-medium-navigate-oraclerep-v0`` -> ``('humanoidmaze-medium', 'oraclerep', None)``;
    ``cube-single-play-v0`` -> ``('cube-single', 'goal', None)``.
    """
    parts = str(name).split("-")
    for mode in ("singletask", "oraclerep"):
        if mode in parts:
            i = parts.index(mode)
            task = parts[i + 1] if i + 1 < len(parts) and re.fullmatch(r"task\d+", parts[i + 1]) else None
            return "-".join(parts[: i - 1]), mode, task
    return "-".join(parts[:-2]), "goal", None


@dataclass
class Run:
    path: Path
    env: str
    mode: str
    step: int
    #: ``{seed: {task: success fraction or None}}`` and ``{seed: mean over the run's tasks}``
    per_seed_task: dict = field(default_factory=dict)
    per_seed_avg: dict = field(default_factory=dict)


def _seed_of(summary_path: Path) -> int:
    cfg = summary_path.parent / "config.gin"
    if cfg.exists():
        m = re.search(r"^\s*train\.seed\s*=\s*(-?\d+)\s*$", cfg.read_text(errors="replace"), re.M)
        if m:
            return int(m.group(1))
    m = re.search(r"(?:-s|seed[_-]?)(\d+)$", summary_path.parent.name)
    return int(m.group(1)) if m else 0


def load_run(path: Path) -> Run | None:
    """One summary.json as a :class:`Run`; None (with a warning) when it lacks what the table needs."""
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"[results_table] skipping {path}: unreadable ({e})", file=sys.stderr)
        return None
    if "success" not in s or "dataset" not in s:
        print(
            f"[results_table] skipping {path}: no 'success'/'dataset' (unfinished or interrupted run?)", file=sys.stderr
        )
        return None
    env, mode, task = parse_dataset_name(s["dataset"])
    per_task = dict(s.get("per_task_success") or {})
    if not per_task:
        per_task = {task or "task?": float(s["success"])}
    run = Run(path=path, env=env, mode=mode, step=int(s.get("step", 0)))
    if s.get("per_seed_success") is not None:  # train.num_seeds: several seeds in one run
        seeds = s.get("seeds") or list(range(len(s["per_seed_success"])))
        for sd, v in zip(seeds, s["per_seed_success"]):
            # per-task values per seed are not stored; exact when the run has one task
            run.per_seed_task[int(sd)] = (
                {t: float(v) for t in per_task} if len(per_task) == 1 else {t: None for t in per_task}
            )
            run.per_seed_avg[int(sd)] = float(v)
    else:
        sd = _seed_of(path)
        run.per_seed_task[sd] = {t: float(v) for t, v in per_task.items()}
        run.per_seed_avg[sd] = float(np.mean(list(per_task.values())))
    return run


def find_summaries(patterns) -> list[Path]:
    """summary.json files from globs / folders (searched recursively) / files, sorted, unique."""
    found = set()
    for pat in patterns:
        matches = glob.glob(os.path.expanduser(pat), recursive=True) or []
        if not matches:
            print(f"[results_table] warning: {pat!r} matches nothing", file=sys.stderr)
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found.update(q.resolve() for q in p.rglob("summary.json"))
            elif p.name == "summary.json" or p.suffix == ".json":
                found.add(p.resolve())
    return sorted(found)


def aggregate(runs: list[Run]) -> dict:
    """``{(mode, env): {'tasks': {task: {seed: v}}, 'avg': {seed: v}, 'steps': set}}`` (fractions)."""
    table: dict = {}
    owner: dict = {}  # (mode, env, task, seed) -> Run
    for run in sorted(runs, key=lambda r: str(r.path)):
        row = table.setdefault((run.mode, run.env), {"tasks": {}, "steps": set(), "avg_only": {}})
        for sd, tasks in run.per_seed_task.items():
            for t, v in tasks.items():
                k = (run.mode, run.env, t, sd)
                prev = owner.get(k)
                if prev is not None:
                    keep = run if run.step >= prev.step else prev
                    print(
                        f"[results_table] warning: two runs for {run.env} {run.mode} {t} seed {sd}: {prev.path} and "
                        f"{run.path}; keeping {keep.path}",
                        file=sys.stderr,
                    )
                    if keep is prev:
                        continue
                owner[k] = run
                if v is None:  # multi-seed multi-task run: per-seed task values unknown
                    row["avg_only"][sd] = run.per_seed_avg[sd]
                    row["tasks"].setdefault(t, {})
                else:
                    row["tasks"].setdefault(t, {})[sd] = v
        row["steps"].add(run.step)
    for row in table.values():
        tasks = {t: d for t, d in row["tasks"].items()}
        seeds = set().union(*[set(d) for d in tasks.values()]) if tasks else set()
        avg = {}
        for sd in seeds:  # a seed's task average, when it has every task of the row
            if all(sd in d for d in tasks.values()):
                avg[sd] = float(np.mean([d[sd] for d in tasks.values()]))
        avg.update(row.pop("avg_only"))
        row["avg"] = avg
        row["seeds"] = sorted(seeds | set(avg))
    return table


def _task_key(t: str):
    m = re.fullmatch(r"task(\d+)", t)
    return (0, int(m.group(1))) if m else (1, t)


def fmt(values, pct=True) -> str:
    v = np.asarray(list(values), float) * (100.0 if pct else 1.0)
    if len(v) == 0:
        return "—"
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{np.mean(v):.1f} ± {np.std(v):.1f}"


def average_cell(row) -> str:
    """Mean over tasks of the per-task means; +- std over seeds of per-seed task averages."""
    task_means = [np.mean(list(d.values())) for d in row["tasks"].values() if d]
    if not task_means:
        return fmt(row["avg"].values()) if row["avg"] else "—"
    m = float(np.mean(task_means)) * 100
    if len(row["avg"]) >= 2:
        return f"{m:.1f} ± {np.std(np.asarray(list(row['avg'].values())) * 100):.1f}"
    return f"{m:.1f}"


def render(table: dict, sources: list[str]) -> str:
    out = [
        "# MAC results",
        "",
        "Success in % (summary.json `success` x 100): mean ± std over seeds (ddof=0); *average* = mean over "
        "tasks of the per-task means, ± std over seeds of each seed's average over the tasks.",
        "",
    ]
    for mode in ("singletask", "oraclerep", "goal"):
        rows = {env: r for (m, env), r in table.items() if m == mode}
        if not rows:
            continue
        paper = PAPER[mode]
        tasks = sorted({t for r in rows.values() for t in r["tasks"]}, key=_task_key)
        out += [f"## {MODE_TITLE[mode]}", ""]
        head = ["environment", *tasks, "average (ours)", "paper MAC", "seeds", "steps"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" + "---:|" * (len(head) - 1))
        order = [e for e in paper if e in rows] + sorted(e for e in rows if e not in paper)
        for env in order:
            r = rows[env]
            cells = [env]
            for t in tasks:
                d = r["tasks"].get(t)
                cells.append(fmt(d.values()) if d else "—")
            cells.append(average_cell(r))
            cells.append(f"{paper[env][0]} ± {paper[env][1]}" if env in paper else "—")
            cells.append(str(len(r["seeds"])))
            steps = sorted(r["steps"])
            cells.append(str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]}")
            out.append("| " + " | ".join(cells) + " |")
        missing = [e for e in paper if e not in rows]
        note = PAPER_NOTE[mode]
        if missing:
            note += (
                ("; " if note else "")
                + "paper only (no runs here): "
                + ", ".join(f"{e} {paper[e][0]} ± {paper[e][1]}" for e in missing)
            )
        if note:
            out += ["", f"*{note}.*"]
        out.append("")
    out.append(f"<sub>{len(sources)} run(s).</sub>")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("paths", nargs="+", help="run folders / roots (searched recursively), globs, or summary.json files")
    p.add_argument("--out", default=None, help="write the markdown here too")
    args = p.parse_args(argv)
    files = find_summaries(args.paths)
    runs = [r for r in (load_run(f) for f in files) if r is not None]
    if not runs:
        print("[results_table] no usable summary.json found", file=sys.stderr)
        return 1
    text = render(aggregate(runs), [str(r.path) for r in runs])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
