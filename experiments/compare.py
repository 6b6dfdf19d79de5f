"""Every agent on the same data and seeds, and the paper's comparison table from one command (issue 10).

    python experiments/compare.py --agents mac,fql,mopo --envs cube-single,cube-double --tasks 2 \\
        --seeds 0,1,2 --budget quickstart --out out/compare

Each (agent, environment, task, group of consecutive seeds) is one resumable run folder
``OUT/runs/<budget>/<agent>/<env>-task<T>/seeds<a>-<b>`` trained by ``python -m macfw.run`` with
the seeds vmapped in one process (``train.seed = a``, ``train.num_seeds = b - a + 1``; one seed:
``seed<a>``). Re-running the command skips runs that have their ``summary.json`` and resumes
interrupted ones from their newest checkpoint; asking for more seeds later reuses the folders that
hold some of them (``--seeds 0``, then ``--seeds 0,1,2`` trains only ``seeds1-2``). One progress
line is printed per run. ``--table-only`` trains nothing and writes the table from the finished runs.

Config of a run, in order: the agent's Gin file (``gin/mac.gin`` or ``gin/baselines/<agent>.gin``),
the environment (``gin/envs/<env>.gin``), the budget (``--budget``: ``smoke`` =
``gin/smoke_budget.gin``, ``quickstart`` = ``gin/quickstart_budget.gin``, ``paper`` = none: the
agent's own defaults), then per-run bindings: the task (single-task: ``OGBenchDataset.task_id``;
goal-conditioned agents, whose Gin file sets ``OGBenchDataset.task_mode = 'oraclerep'``: that mode
and ``train.eval_task_ids = (T,)``), the seeds, and MAC's own settings at the small budgets (the
method settings of ``gin/smoke.gin``; ``gin/quickstart.gin``'s ``train.execute_steps = 5``).

Writes ``OUT/table.md`` (success % mean +- std over seeds per cell, the paper's figure beside it,
the budget in the caption), ``OUT/table.csv`` (one row per agent and cell) and ``OUT/curves.png``
(success vs gradient steps, mean over seeds, one line per agent, one panel per cell).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUDGETS = {"smoke": "gin/smoke_budget.gin", "quickstart": "gin/quickstart_budget.gin", "paper": None}
#: Evaluations during a run, so that curves.png has points along the way (gradient steps).
EVAL_INTERVAL = {"smoke": 20, "quickstart": 5000, "paper": 100_000}
#: MAC's own settings at the small budgets (so `--agents mac` reproduces gin/smoke.gin and gin/quickstart.gin).
METHOD_EXTRAS = {
    ("mac", "smoke"): ["CHUNK = 5", "RejectionSampler.num_train_candidates = 2",
                       "RejectionSampler.num_act_candidates = 4", "FlowPolicy.flow_steps = 3"],
    ("mac", "quickstart"): ["train.execute_steps = 5"],
}
#: The paper's success (%), (mean, std or None) (DESIGN §8). Single-task: mean over the 5 tasks of the
#: 1M-transition datasets, 1M gradient steps; goal-conditioned: the 100M-transition datasets.
PAPER = {
    ("mac", "singletask"): {"cube-single": (99, 2), "cube-double": (53, 4), "scene": (97, 4), "puzzle-3x3": (20, 0),
                            "puzzle-4x4": (78, 13)},
    ("fql", "singletask"): {"cube-single": (96, None), "cube-double": (29, None), "scene": (56, None),
                            "puzzle-3x3": (30, None), "puzzle-4x4": (17, None)},
    ("mobile", "singletask"): {"cube-single": (81, None), "cube-double": (1, None), "scene": (8, None),
                               "puzzle-3x3": (12, None), "puzzle-4x4": (0, None)},
    ("mac", "oraclerep"): {"cube-double": (100, 1), "cube-octuple": (30, 6), "puzzle-3x3": (100, 0),
                           "puzzle-4x5": (99, 3), "humanoidmaze-medium": (36, 2), "humanoidmaze-giant": (0, 0)},
    ("sharsa", "oraclerep"): {"cube-double": (95, None), "cube-octuple": (19, None), "puzzle-3x3": (100, None),
                              "puzzle-4x5": (91, None), "humanoidmaze-medium": (95, None),
                              "humanoidmaze-giant": (43, None)},
}


@dataclass
class Job:
    agent: str
    env: str
    task: int
    seeds: list[int]
    budget: str
    out: Path

    @property
    def mode(self) -> str:
        return agent_mode(self.agent)

    @property
    def workdir(self) -> Path:
        s = f"seed{self.seeds[0]}" if len(self.seeds) == 1 else f"seeds{self.seeds[0]}-{self.seeds[-1]}"
        return self.out / "runs" / self.budget / self.agent / f"{self.env}-task{self.task}" / s

    @property
    def name(self) -> str:
        return f"{self.agent} {self.env} task{self.task} seeds {','.join(map(str, self.seeds))}"


def agent_file(agent: str) -> Path:
    return REPO / ("gin/mac.gin" if agent == "mac" else f"gin/baselines/{agent}.gin")


def agent_mode(agent: str) -> str:
    """``'oraclerep'`` when the agent's Gin file makes it goal-conditioned, else ``'singletask'``."""
    text = agent_file(agent).read_text()
    return "oraclerep" if re.search(r"^\s*OGBenchDataset\.task_mode\s*=\s*'oraclerep'", text, re.M) else "singletask"


def seed_groups(seeds: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive seeds (each trained vmapped in one process)."""
    groups: list[list[int]] = []
    for s in seeds:
        if groups and s == groups[-1][-1] + 1:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


_RUN_DIR = re.compile(r"^seed(\d+)$|^seeds(\d+)-(\d+)$")


def plan_cell(agent: str, env: str, task: int, seeds: list[int], budget: str, out: Path) -> list[Job]:
    """The runs of one (agent, env, task) cell for ``seeds``: existing run folders whose seeds are all
    requested are reused (finished ones first, then interrupted ones with checkpoints, larger groups
    first; so ``--seeds 0`` then ``--seeds 0,1,2`` trains only seeds 1-2), and the seeds no folder
    covers are grouped into consecutive runs (:func:`seed_groups`)."""
    cell = out / "runs" / budget / agent / f"{env}-task{task}"
    wanted = set(seeds)
    found = []
    for d in sorted(cell.iterdir()) if cell.is_dir() else []:
        m = _RUN_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        group = [int(m.group(1))] if m.group(1) is not None else list(range(int(m.group(2)), int(m.group(3)) + 1))
        finished = (d / "summary.json").exists()
        if set(group) <= wanted and (finished or (d / "checkpoints").is_dir()):
            found.append((not finished, -len(group), group))
    jobs, covered = [], set()
    for _, _, group in sorted(found):
        if covered.isdisjoint(group):
            jobs.append(Job(agent, env, task, group, budget, out))
            covered |= set(group)
    rest = [s for s in seeds if s not in covered]
    jobs += [Job(agent, env, task, g, budget, out) for g in seed_groups(rest)]
    return sorted(jobs, key=lambda j: j.seeds[0])


def command(job: Job) -> list[str]:
    files = [str(agent_file(job.agent)), str(REPO / f"gin/envs/{job.env}.gin")]
    if BUDGETS[job.budget]:
        files.append(str(REPO / BUDGETS[job.budget]))
    binds = ["train.progress = False", f"train.seed = {job.seeds[0]}", f"train.eval_interval = {EVAL_INTERVAL[job.budget]}"]
    if len(job.seeds) > 1:
        binds.append(f"train.num_seeds = {len(job.seeds)}")
    if job.mode == "singletask":
        binds.append(f"OGBenchDataset.task_id = {job.task}")
    else:
        binds += [f"OGBenchDataset.task_mode = '{job.mode}'", f"train.eval_task_ids = ({job.task},)"]
    binds += METHOD_EXTRAS.get((job.agent, job.budget), [])
    cmd = [sys.executable, "-m", "macfw.run"]
    for f in files:
        cmd += ["--gin_file", f]
    for b in binds:
        cmd += ["--gin_bindings", b]
    return cmd + ["--workdir", str(job.workdir)]


def run_all(jobs: list[Job], parallel: int) -> None:
    todo = [j for j in jobs if not (j.workdir / "summary.json").exists()]
    for j in jobs:
        if j not in todo:
            print(f"[compare] {j.name}: done already ({j.workdir})", flush=True)
    running: list[tuple[Job, subprocess.Popen, float]] = []
    failed = []
    while todo or running:
        while todo and len(running) < parallel:
            j = todo.pop(0)
            j.workdir.mkdir(parents=True, exist_ok=True)
            resume = (j.workdir / "checkpoints").is_dir()
            with open(j.workdir / "stdout.log", "a") as log:
                p = subprocess.Popen(command(j), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            running.append((j, p, time.time()))
            print(f"[compare] {j.name}: {'resumed' if resume else 'started'} in {j.workdir}", flush=True)
        for item in list(running):
            j, p, t0 = item
            if p.poll() is None:
                continue
            running.remove(item)
            if p.returncode == 0 and (j.workdir / "summary.json").exists():
                s = json.loads((j.workdir / "summary.json").read_text())
                per = s.get("per_seed_success") or [s["success"]]
                print(f"[compare] {j.name}: finished in {time.time() - t0:.0f} s, success "
                      f"{100 * np.mean(per):.1f} +- {100 * np.std(per):.1f} %", flush=True)
            else:
                failed.append(j)
                print(f"[compare] {j.name}: FAILED (exit {p.returncode}); see {j.workdir / 'stdout.log'}", flush=True)
        time.sleep(1.0)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: " + "; ".join(j.name for j in failed))


# ----------------------------------------------------------------------------------------- results
def collect(jobs: list[Job]) -> list[dict]:
    """One row per (agent, env, task): success over all seeds of its runs."""
    rows: dict[tuple, dict] = {}
    for j in jobs:
        s = json.loads((j.workdir / "summary.json").read_text())
        per = [float(x) for x in (s.get("per_seed_success") or [s["success"]])]
        r = rows.setdefault((j.agent, j.env, j.task), {
            "agent": j.agent, "mode": j.mode, "env": j.env, "task": j.task, "per_seed": [], "seeds": [],
            "steps": s["step"], "wall_time_s": 0.0, "episodes_per_seed": s["episodes"] // len(per)})
        r["per_seed"] += per
        r["seeds"] += j.seeds
        r["wall_time_s"] += float(s["wall_time_s"])
    out = []
    for r in rows.values():
        paper = PAPER.get((r["agent"], r["mode"]), {}).get(r["env"])
        out.append(dict(r, success_mean=100 * float(np.mean(r["per_seed"])),
                        success_std=100 * float(np.std(r["per_seed"])),
                        paper_mean=None if paper is None else paper[0],
                        paper_std=None if paper is None else paper[1]))
    return out


def _paper(r) -> str:
    if r["paper_mean"] is None:
        return "n/a"
    return f"{r['paper_mean']}" + ("" if r["paper_std"] is None else f" +- {r['paper_std']}")


def table_md(rows: list[dict], budget: str) -> str:
    cells = sorted({(r["env"], r["task"]) for r in rows})
    agents = list(dict.fromkeys(r["agent"] for r in rows))
    by = {(r["agent"], r["env"], r["task"]): r for r in rows}
    steps = sorted({r["steps"] for r in rows})
    seeds = sorted({len(r["seeds"]) for r in rows})
    eps = sorted({r["episodes_per_seed"] for r in rows})
    lines = [f"Success rate (%), mean +- std over seeds; our budget: **{budget}** "
             f"({', '.join(map(str, steps))} gradient steps, {'/'.join(map(str, seeds))} seed(s), "
             f"{'/'.join(map(str, eps))} evaluation episodes per seed). In brackets: the paper's figure "
             "(DESIGN §8; single-task: mean over the 5 tasks, 1M-transition datasets, 1M gradient steps, "
             "4 x 1024 networks; goal-conditioned: 100M-transition datasets), not a same-budget number.", "",
             "| agent | mode | " + " | ".join(f"{e} task{t}" for e, t in cells) + " |",
             "|---|---|" + "---|" * len(cells)]
    for a in agents:
        mode = next(r["mode"] for r in rows if r["agent"] == a)
        vals = []
        for e, t in cells:
            r = by.get((a, e, t))
            if r is None:
                vals.append("")
            else:  # one seed has no spread: its value alone, marked n = 1
                ours = (f"{r['success_mean']:.1f} (n = 1)" if len(r["seeds"]) == 1
                        else f"{r['success_mean']:.1f} +- {r['success_std']:.1f}")
                vals.append(f"{ours} ({_paper(r)})")
        lines.append(f"| {a} | {mode} | " + " | ".join(vals) + " |")
    wall = sum(r["wall_time_s"] for r in rows)
    lines += ["", f"Wall time of all runs (sum): {wall / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path, budget: str) -> None:
    fields = ["agent", "mode", "env", "task", "budget", "seeds", "per_seed", "success_mean", "success_std",
              "paper_mean", "paper_std", "steps", "episodes_per_seed", "wall_time_s"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in fields}, "budget": budget, "seeds": " ".join(map(str, r["seeds"])),
                        "per_seed": " ".join(f"{x:.4f}" for x in r["per_seed"])})


def curves(jobs: list[Job], path: Path, budget: str) -> None:
    """Success vs gradient steps (mean over seeds) per agent, one panel per (env, task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(j.env, j.task) for j in jobs})
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 3.6), squeeze=False)
    for ax, (env, task) in zip(axes[0], cells):
        for agent in dict.fromkeys(j.agent for j in jobs):
            series: dict[int, list[float]] = {}
            for j in jobs:
                if (j.agent, j.env, j.task) != (agent, env, task) or not (j.workdir / "eval.csv").exists():
                    continue
                with open(j.workdir / "eval.csv", newline="") as f:
                    for row in csv.DictReader(f):
                        per = [float(v) for k, v in row.items() if k.startswith("success/seed") and v != ""]
                        series.setdefault(int(float(row["step"])), []).extend(per or [float(row["success"])])
            if series:
                xs = sorted(series)
                ax.plot(xs, [100 * np.mean(series[x]) for x in xs], marker="o", label=agent)
        ax.set_title(f"{env} task{task} ({budget} budget)")
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("success rate (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", required=True, help="comma-separated: mac and names of gin/baselines/*.gin")
    p.add_argument("--envs", required=True, help="comma-separated names of gin/envs/*.gin, e.g. cube-single")
    p.add_argument("--tasks", default="2", help="comma-separated task ids (1..5)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; consecutive ones train in one process")
    p.add_argument("--budget", default="smoke", choices=sorted(BUDGETS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once (one process each)")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: write the table from the runs under --out that have finished")
    a = p.parse_args(argv)
    agents = [x.strip() for x in a.agents.split(",") if x.strip()]
    envs = [x.strip() for x in a.envs.split(",") if x.strip()]
    known = ["mac"] + sorted(f.stem for f in (REPO / "gin" / "baselines").glob("*.gin"))
    for ag in agents:
        if not agent_file(ag).is_file():
            p.error(f"unknown agent {ag!r}; known agents: {known}")
    for e in envs:
        if not (REPO / f"gin/envs/{e}.gin").is_file():
            p.error(f"unknown environment {e!r}; known: {sorted(f.stem for f in (REPO / 'gin/envs').glob('*.gin'))}")
    tasks = _ints(a.tasks)
    if not tasks or any(not 1 <= t <= 5 for t in tasks):
        p.error(f"--tasks must be task ids in 1..5, got {a.tasks!r}")
    if a.parallel < 1:
        p.error(f"--parallel must be >= 1, got {a.parallel}")
    out = a.out.absolute()
    seeds = sorted(set(_ints(a.seeds)))
    if not seeds or min(seeds) < 0:
        p.error(f"--seeds must be non-negative integers, got {a.seeds!r}")
    jobs = [j for ag in agents for e in envs for t in tasks for j in plan_cell(ag, e, t, seeds, a.budget, out)]
    t0 = time.time()
    if a.table_only:
        missing = [j for j in jobs if not (j.workdir / "summary.json").exists()]
        for j in missing:
            print(f"[compare] {j.name}: not finished, left out of the table ({j.workdir})", flush=True)
        jobs = [j for j in jobs if j not in missing]
        if not jobs:
            raise SystemExit(f"--table-only: no finished run under {out / 'runs' / a.budget}")
    else:
        run_all(jobs, a.parallel)
    rows = collect(jobs)
    out.mkdir(parents=True, exist_ok=True)
    md = table_md(rows, a.budget)
    (out / "table.md").write_text(md)
    write_csv(rows, out / "table.csv", a.budget)
    curves(jobs, out / "curves.png", a.budget)
    print(md)
    print(f"[compare] wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'curves.png'} "
          f"({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
