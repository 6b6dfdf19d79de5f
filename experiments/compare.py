"""Every agent on the same data and seeds, and the paper's tables from one command (issues 10, 28).

The paper's tables, cell by cell, with the authors' per-environment settings (macfw/protocol.py)::

    python experiments/compare.py --protocol singletask --dry-run            # every run, its settings, the cost
    python experiments/compare.py --protocol goalconditioned --dry-run --json runs.json
    python experiments/compare.py --protocol goalconditioned --agents mac,sharsa --envs puzzle-3x3 \\
        --tasks 1 --seeds 0 --budget smoke --out out/gc --launcher slurm

Any agents on any environments (each agent's own task mode and Gin file)::

    python experiments/compare.py --agents mac,fql,mopo --envs cube-single,cube-double --tasks 2 \\
        --seeds 0,1,2 --budget quickstart --out out/compare

A run trains one (agent, environment, task) cell for a group of consecutive seeds, vmapped in one
process (``train.seed = a``, ``train.num_seeds = b - a + 1``), in the resumable folder
``OUT/runs/<budget>/<agent>/<env>-task<T>/seeds<a>-<b>`` (one seed: ``seed<a>``). An agent run in a
task mode other than its Gin file's (MAC in the goal-conditioned table) gets ``<agent>-<mode>``.
Goal-conditioned cells of one (agent, environment) share their run, evaluated on every requested
task (``<env>-tasks1-5``): training does not depend on the evaluation task. Re-running the command
skips runs that have their ``summary.json`` and resumes interrupted ones from their newest
checkpoint; asking for more seeds later reuses the folders that hold some of them (``--seeds 0``,
then ``--seeds 0,1,2`` trains only ``seeds1-2``). ``--table-only`` trains nothing and writes the
table from the finished runs.

Config of a run, in order: the agent's Gin file, the budget (``--budget``: ``smoke`` =
``gin/smoke_budget.gin``, ``quickstart`` = ``gin/quickstart_budget.gin``, ``paper`` = none), the
environment (``gin/envs/<env>.gin``), then bindings: the loop's (seed, seeds, evaluation interval),
with ``--protocol`` the cell's settings from macfw/protocol.py (at the paper budget also its
gradient steps, evaluation episodes, data and shard rotation), the task (single-task:
``OGBenchDataset.task_id``; goal-conditioned: ``OGBenchDataset.task_mode`` and
``train.eval_task_ids``), and MAC's own settings at the small budgets (those of ``gin/smoke.gin``;
``gin/quickstart.gin``'s ``train.execute_steps = 5``).

Data at the paper budget with ``--protocol``: single-task cells read ``DATA_DIR/<env>-play-v0.npz``
when it exists and otherwise generate OGBench's 1000-episode file into the cache; goal-conditioned
cells read the 100M directories ``DATA_DIR/<env>-play-100m-v0`` (``-navigate-100m-v0`` for
humanoidmaze), which must exist (``--data-dir``, default OGBench's ``~/.ogbench/data``).

Launchers (``--launcher``): ``local`` runs ``--parallel`` processes on this machine; ``slurm``
submits one job per run with submitit (``pip install -e '.[slurm]'``; partition, time limit,
accelerators, CPUs and memory from ``--slurm-*`` flags or a Gin file, ``--slurm-gin``), requeues
preempted jobs, which resume from their checkpoints, and waits for them; re-running submits only
runs that have no ``summary.json`` and no job in the queue.

``--dry-run`` prints every run (workdir, command, the bindings that differ from the agent's Gin
file, where the cell's settings come from), the number of runs and an estimate of accelerator-hours
at the paper budget: gradient steps x seeds x FLOPs per update (XLA's count, ``macfw.bench``;
``experiments/paper_flops.json``) / an assumed achieved rate (``--accel-tflops``), or, with
``--bench FILE`` (``python -m macfw.bench --all-agents --preset paper --json FILE`` on the cluster's
accelerator), from the measured updates per second. ``--json FILE`` writes the runs as a JSON list,
one entry per cell.

Writes ``OUT/table.md`` (success % mean +- std over seeds per agent and environment, averaged over
the tasks run, as the paper reports it, with the paper's figure beside it), ``OUT/table.csv`` (one
row per agent, environment and task) and ``OUT/curves.png`` (success vs gradient steps, mean over
seeds and tasks, one line per agent, one panel per environment).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout without installing

from macfw import protocol  # noqa: E402
from macfw.protocol import PAPER, Table  # noqa: E402,F401  (PAPER: the paper's figures, kept importable here)

BUDGETS = {"smoke": "gin/smoke_budget.gin", "quickstart": "gin/quickstart_budget.gin", "paper": None}
#: Evaluations during a run, so that curves.png has points along the way (gradient steps).
EVAL_INTERVAL = {"smoke": 20, "quickstart": 5000, "paper": 100_000}
#: MAC's own settings at the small budgets (so `--agents mac` reproduces gin/smoke.gin and gin/quickstart.gin).
METHOD_EXTRAS = {
    ("mac", "smoke"): [
        "CHUNK = 5",
        "RejectionSampler.num_train_candidates = 2",
        "RejectionSampler.num_act_candidates = 4",
        "FlowPolicy.flow_steps = 3",
    ],
    ("mac", "quickstart"): ["train.execute_steps = 5"],
}
DEFAULT_DATA_DIR = "~/.ogbench/data"  # OGBench's own download folder
FLOPS_FILE = REPO / "experiments" / "paper_flops.json"


@dataclass
class Job:
    """One run: an agent on an environment for one task (several for a shared goal-conditioned run)
    and a group of consecutive seeds."""

    agent: str
    env: str
    task: int | tuple[int, ...]
    seeds: list[int]
    budget: str
    out: Path
    mode: str = ""  # '' : the agent's own mode (its Gin file's)
    table: Table | None = None  # --protocol
    data_dir: Path | None = None
    extra: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.mode:
            self.mode = agent_mode(self.agent)

    @property
    def tasks(self) -> tuple[int, ...]:
        return self.task if isinstance(self.task, tuple) else (self.task,)

    @property
    def workdir(self) -> Path:
        return cell_dir(self.out, self.budget, self.agent, self.mode, self.env, self.tasks) / seeds_name(self.seeds)

    @property
    def name(self) -> str:
        t = ",".join(map(str, self.tasks))
        mode = "" if self.mode == agent_mode(self.agent) else f" ({self.mode})"
        tasks = f"task{'s' if len(self.tasks) > 1 else ''}{t}"
        return f"{self.agent}{mode} {self.env} {tasks} seeds {','.join(map(str, self.seeds))}"


def agent_file(agent: str) -> Path:
    return REPO / protocol.agent_gin_file(agent)


def agent_mode(agent: str) -> str:
    """``'oraclerep'`` when the agent's Gin file makes it goal-conditioned, else ``'singletask'``."""
    from macfw.bench import goal_conditioned_by_default

    return "oraclerep" if goal_conditioned_by_default(protocol.agent_gin_file(agent)) else "singletask"


def seeds_name(seeds: list[int]) -> str:
    return f"seed{seeds[0]}" if len(seeds) == 1 else f"seeds{seeds[0]}-{seeds[-1]}"


def tasks_name(tasks: tuple[int, ...]) -> str:
    """``task2``; ``tasks1-5`` (consecutive); ``tasks1_3``."""
    if len(tasks) == 1:
        return f"task{tasks[0]}"
    if list(tasks) == list(range(tasks[0], tasks[-1] + 1)):
        return f"tasks{tasks[0]}-{tasks[-1]}"
    return "tasks" + "_".join(map(str, tasks))


def cell_dir(out: Path, budget: str, agent: str, mode: str, env: str, tasks: tuple[int, ...]) -> Path:
    folder = agent if mode == agent_mode(agent) else f"{agent}-{mode}"
    return out / "runs" / budget / folder / f"{env}-{tasks_name(tasks)}"


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


def plan_cell(agent: str, env: str, task, seeds: list[int], budget: str, out: Path, **job_kw) -> list[Job]:
    """The runs of one (agent, env, task) cell for ``seeds`` (``task``: an int, or a tuple of tasks
    that one goal-conditioned run evaluates): existing run folders whose seeds are all requested are
    reused (finished ones first, then interrupted ones with checkpoints, larger groups first; so
    ``--seeds 0`` then ``--seeds 0,1,2`` trains only seeds 1-2), and the seeds no folder covers are
    grouped into consecutive runs (:func:`seed_groups`). ``job_kw``: the other :class:`Job` fields."""
    probe = Job(agent, env, task, [0], budget, out, **job_kw)
    cell = probe.workdir.parent
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
            jobs.append(Job(agent, env, task, group, budget, out, **job_kw))
            covered |= set(group)
    rest = [s for s in seeds if s not in covered]
    jobs += [Job(agent, env, task, g, budget, out, **job_kw) for g in seed_groups(rest)]
    return sorted(jobs, key=lambda j: j.seeds[0])


# ------------------------------------------------------------------------------------- config
def data_binding(job: Job) -> list[str]:
    """The dataset path of a protocol run at the paper budget (see the module doc); [] otherwise."""
    if job.table is None or job.budget != "paper" or job.data_dir is None:
        return []
    path = job.data_dir / protocol.dataset_dirname(job.env, job.table)
    if job.table.dataset == "1M" and not path.is_file():
        return []  # generated into the cache (OGBenchDataset.num_episodes = 1000)
    return [f"OGBenchDataset.dataset_path = {str(path)!r}"]


def run_config(job: Job) -> tuple[list[str], list[str]]:
    """The Gin files and bindings of ``job``'s run (module doc: the order)."""
    files = [str(agent_file(job.agent))]
    if BUDGETS[job.budget]:
        files.append(str(REPO / BUDGETS[job.budget]))
    files.append(str(REPO / f"gin/envs/{job.env}.gin"))
    binds = [
        "train.progress = False",
        f"train.seed = {job.seeds[0]}",
        f"train.eval_interval = {EVAL_INTERVAL[job.budget]}",
    ]
    if len(job.seeds) > 1:
        binds.append(f"train.num_seeds = {len(job.seeds)}")
    if job.table is not None:
        binds += [
            s.gin() for s in protocol.cell_settings(job.table, job.agent, job.env, paper_budget=job.budget == "paper")
        ]
        binds += data_binding(job)
    if job.mode == "singletask":
        binds += ["OGBenchDataset.task_mode = 'singletask'", f"OGBenchDataset.task_id = {job.tasks[0]}"]
    else:
        binds += [
            f"OGBenchDataset.task_mode = '{job.mode}'",
            f"train.eval_task_ids = {protocol.gin_literal(tuple(job.tasks))}",
        ]
    binds += METHOD_EXTRAS.get((job.agent, job.budget), []) + job.extra
    return files, last_binding_wins(binds)


def last_binding_wins(binds: list[str]) -> list[str]:
    """``binds`` with each ``name = value`` kept once, at its last place with its last value (what Gin
    would bind anyway; the command stays readable)."""
    out: dict[str, str] = {}
    for b in binds:
        name = b.split("=", 1)[0].strip()
        out.pop(name, None)
        out[name] = b
    return list(out.values())


def command(job: Job, workdir: Path | None = None) -> list[str]:
    """``python -m macfw.run --gin_file ... --gin_bindings ... --workdir ...`` of ``job`` (its own
    workdir unless ``workdir`` is given)."""
    files, binds = run_config(job)
    cmd = [sys.executable, "-m", "macfw.run"]
    for f in files:
        cmd += ["--gin_file", f]
    for b in binds:
        cmd += ["--gin_bindings", b]
    return cmd + ["--workdir", str(job.workdir if workdir is None else workdir)]


# ------------------------------------------------------------------------------------ dry run
def load_flops(path: Path = FLOPS_FILE) -> dict:
    """``experiments/paper_flops.json``: FLOPs per update of each agent at the paper's sizes."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_bench(path: Path) -> dict[str, float]:
    """Updates per second per agent from ``python -m macfw.bench --all-agents --json FILE`` (a list of
    rows with ``name`` and ``updates_per_s``) or from one ``python -m macfw.bench --json FILE`` run.

    Raises:
      SystemExit: the file cannot be read or has no such figures (names the file and the command).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"--bench {str(path)!r}: cannot read it ({e}); write it with python -m macfw.bench "
            "--all-agents --preset paper --json FILE on the accelerator"
        ) from None
    rows = data if isinstance(data, list) else [dict(data, name=data.get("name") or "mac")]
    out = {str(r["name"]): float(r["updates_per_s"]) for r in rows if "name" in r and "updates_per_s" in r}
    if not out:
        raise SystemExit(
            f"--bench {str(path)!r} has no 'name'/'updates_per_s' figures; write it with "
            "python -m macfw.bench --all-agents --preset paper --json FILE"
        )
    return out


def estimate_hours(job: Job, steps: int, flops: dict, bench: dict | None, accel_flops: float) -> float | None:
    """Accelerator-hours of ``job`` at ``steps`` gradient steps: measured updates/s (``bench``, per
    agent) or FLOPs per update (``flops['agents'][agent]``) / ``accel_flops``; the seeds of a run are
    vmapped, so they multiply the work. Evaluation and MOPO/MOBILE's rollout rounds are not counted.
    None when neither figure exists for the agent."""
    seeds = len(job.seeds)
    if bench is not None:
        ups = bench.get(job.agent)
        return None if not ups else steps * seeds / ups / 3600.0
    f = flops.get("agents", {}).get(job.agent)
    return None if not f else steps * seeds * float(f) / accel_flops / 3600.0


def dry_run(
    jobs: list[Job], cells: list[dict], *, flops: dict, bench: dict | None, accel_flops: float, json_path: Path | None
) -> None:
    """Print every run and the totals; write the cells as JSON (``json_path``)."""
    base = {}
    total_h, missing, by_agent = 0.0, set(), {}
    for i, j in enumerate(jobs, 1):
        files, binds = run_config(j)
        ops = protocol.operative_bindings(files, binds)
        if j.agent not in base:
            base[j.agent] = protocol.operative_bindings([str(agent_file(j.agent))])
        diff = {k: v for k, v in ops.items() if base[j.agent].get(k, object()) != v}
        for c in cells:
            if c["_job"] is j:
                c["bindings"] = ops
        steps = int(ops.get("train.num_steps", 0))
        h = estimate_hours(j, steps, flops, bench, accel_flops) if j.budget == "paper" else None
        if h is None:
            missing.add(j.agent)
        else:
            total_h += h
            by_agent[j.agent] = by_agent.get(j.agent, 0.0) + h
        print(
            f"[{i}/{len(jobs)}] {j.name} ({j.budget} budget, {steps} gradient steps"
            + (f", ~{h:.1f} accelerator-hours)" if h is not None else ")")
        )
        print(f"  workdir  {j.workdir}")
        print(f"  command  {shlex.join(command(j))}")
        print(
            "  differs from "
            + protocol.agent_gin_file(j.agent)
            + ": "
            + ", ".join(
                f"{k} = {protocol.gin_literal(tuple(v) if isinstance(v, list) else v)}" for k, v in sorted(diff.items())
            )
        )
        if j.table is not None:
            print(f"  settings {protocol.cell_note(j.table, j.agent, j.env)}")
    n_cells = len(cells)
    seeds = sum(len(j.seeds) for j in jobs)
    print(f"\n{len(jobs)} runs ({n_cells} cells; {seeds} seed-runs, seeds vmapped within a run)")
    if jobs and jobs[0].budget == "paper":
        how = (
            "measured updates/s from --bench"
            if bench is not None
            else f"XLA's FLOPs per update ({FLOPS_FILE.name}: {flops.get('command', 'n/a')}) at an assumed "
            f"{accel_flops / 1e12:g} TFLOP/s achieved per accelerator (--accel-tflops)"
        )
        print(
            f"estimated accelerator-hours: {total_h:,.0f} ({total_h / 24:,.1f} accelerator-days; {how}; "
            "evaluation and MOPO/MOBILE's model-rollout rounds not counted)"
            + (f"; no figure for {sorted(missing)}" if missing else "")
        )
        print("  by agent: " + ", ".join(f"{ag} {h:,.0f} h" for ag, h in by_agent.items()))
    else:
        print("estimated accelerator-hours: the estimate covers the paper budget (--budget paper)")
    if json_path is not None:
        rows = [{k: v for k, v in c.items() if not k.startswith("_")} for c in cells]
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"[compare] wrote {len(rows)} cells to {json_path}")


def count_flops(path: Path = FLOPS_FILE) -> dict:
    """Write ``experiments/paper_flops.json``: every table agent's FLOPs per update at its paper
    configuration (its Gin file: 4 x 1024 networks, batch 1024; FQL 4 x 512, batch 256), by XLA's count
    (:func:`macfw.bench.count_flops`), at the bench's default shapes (ob_dim 28, act_dim 5; goal_dim 3 for
    the goal-conditioned agents). Slow (minutes: every agent is compiled)."""
    import datetime
    import platform

    from macfw.bench import count_flops as count
    from macfw.bench import goal_conditioned_by_default

    agents = list(dict.fromkeys(a for t in protocol.TABLES.values() for a in t.agents))
    out = {
        "command": "python experiments/compare.py --count-flops",
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "shapes": "ob_dim 28, act_dim 5, goal_dim 3 (goal-conditioned agents) or 0",
        "agents": {},
        "batch_size": {},
    }
    for ag in agents:
        f = protocol.agent_gin_file(ag)
        r = count(gin_files=(f,), goal_dim=3 if goal_conditioned_by_default(f) else 0)
        out["agents"][ag] = r["flops_per_update"]
        out["batch_size"][ag] = r["batch_size"]
        print(f"[compare] {ag}: {r['flops_per_update']:.4g} FLOP per update (batch {r['batch_size']})", flush=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"[compare] wrote {path}")
    return out


# ------------------------------------------------------------------------------------ launching
def make_launcher(a, prefix: str = "[compare]"):
    """The launcher ``--launcher`` names, with its settings (``--parallel``; ``--slurm-*`` over ``--slurm-gin``)."""
    from macfw.launch import LocalLauncher, SlurmLauncher

    if a.launcher == "local":
        return LocalLauncher(parallel=a.parallel, prefix=prefix)
    gpus = a.slurm_gpus if a.slurm_gpus in (None, "auto") else int(a.slurm_gpus)
    return SlurmLauncher.from_gin(
        a.slurm_gin or [],
        [],
        partition=a.slurm_partition,
        time_min=a.slurm_time,
        gpus_per_job=gpus,
        cpus_per_job=a.slurm_cpus,
        mem_gb=a.slurm_mem_gb,
        prefix=prefix,
    )


def launch(jobs: list[Job], launcher) -> None:
    """Train ``jobs`` with ``launcher`` (:mod:`macfw.launch`) and wait for them.

    Raises:
      SystemExit: some runs failed (names them).
    """
    from macfw.launch import RunSpec

    failed = launcher.launch([RunSpec(j.name, j.workdir, command(j), REPO) for j in jobs])
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: " + "; ".join(r.name for r in failed))


def check_data(jobs: list[Job]) -> None:
    """Before launching: every dataset path a run binds exists.

    Raises:
      SystemExit: names each missing path and how to make or get it.
    """
    missing = sorted(
        {
            b.split("=", 1)[1].strip().strip("'")
            for j in jobs
            for b in data_binding(j)
            if not Path(b.split("=", 1)[1].strip().strip("'")).exists()
        }
    )
    if missing:
        raise SystemExit(
            "missing dataset(s): " + ", ".join(missing) + ". Put OGBench's official directories there (--data-dir), "
            "or make a manipulation one with python -m macfw.data.generate --dataset <env>-play-v0 --shards 100 "
            "--out DIR/<env>-play-100m-v0 (humanoidmaze needs the official files), or use --budget smoke|quickstart."
        )


# ----------------------------------------------------------------------------------------- results
def _per_seed_task(s: dict, task: int, tasks: tuple[int, ...]) -> list[float] | None:
    """Per-seed success of ``task`` from one run's summary (None when only its mean over seeds is known)."""
    pst = s.get("per_seed_per_task_success")
    if pst:
        return [float(x[f"task{task}"]) for x in pst]
    if len(tasks) == 1:
        return [float(x) for x in (s.get("per_seed_success") or [s["success"]])]
    return None


def collect(jobs: list[Job]) -> list[dict]:
    """One row per (agent, mode, env, task): success over all seeds of its runs."""
    rows: dict[tuple, dict] = {}
    for j in jobs:
        s = json.loads((j.workdir / "summary.json").read_text())
        n_seeds = len(s.get("per_seed_success") or [s["success"]])
        for t in j.tasks:
            per = _per_seed_task(s, t, j.tasks)
            r = rows.setdefault(
                (j.agent, j.mode, j.env, t),
                {
                    "agent": j.agent,
                    "mode": j.mode,
                    "env": j.env,
                    "task": t,
                    "per_seed": [],
                    "seeds": [],
                    "task_means": [],
                    "steps": s["step"],
                    "wall_time_s": 0.0,
                    "episodes_per_seed": s["episodes"] // (n_seeds * len(j.tasks)),
                },
            )
            if per is None:
                per_task = s.get("per_task_success", {}).get(f"task{t}", s["success"])
                r["task_means"].append((float(per_task), len(j.seeds)))
                r["per_seed"] = None
            elif r["per_seed"] is not None:
                r["per_seed"] += per
            r["seeds"] += j.seeds
            r["wall_time_s"] += float(s["wall_time_s"]) / len(j.tasks)
    out = []
    for r in rows.values():
        if r["per_seed"] is not None:
            mean, std = float(np.mean(r["per_seed"])), float(np.std(r["per_seed"]))
        else:
            w = np.array([n for _, n in r["task_means"]], float)
            mean, std = float(np.average([m for m, _ in r["task_means"]], weights=w)), float("nan")
        paper = PAPER.get((r["agent"], r["mode"]), {}).get(r["env"])
        out.append(
            dict(
                r,
                success_mean=100 * mean,
                success_std=100 * std,
                paper_mean=None if paper is None else paper[0],
                paper_std=None if paper is None else paper[1],
            )
        )
    return out


def _paper(r) -> str:
    if r["paper_mean"] is None:
        return "n/a"
    return f"{r['paper_mean']}" + ("" if r["paper_std"] is None else f" +- {r['paper_std']}")


def env_cells(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Per (agent, mode, env): the success averaged over its tasks, as the paper reports it. With
    per-seed figures for every task and the same seeds: mean and std over seeds of the per-seed mean
    over tasks; otherwise the mean over tasks of the task means (std unknown: NaN)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["agent"], r["mode"], r["env"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["task"])
        tasks = [r["task"] for r in rs]
        seeds = [sorted(r["seeds"]) for r in rs]
        if all(r["per_seed"] is not None for r in rs) and all(s == seeds[0] for s in seeds):
            order = [np.argsort(r["seeds"]) for r in rs]
            per_seed = np.mean([np.asarray(r["per_seed"])[o] for r, o in zip(rs, order)], axis=0)
            mean, std = 100 * float(np.mean(per_seed)), 100 * float(np.std(per_seed))
        else:
            mean, std = float(np.mean([r["success_mean"] for r in rs])), float("nan")
        out[key] = dict(rs[0], tasks=tasks, success_mean=mean, success_std=std, n_seeds=len(seeds[0]))
    return out


def table_md(rows: list[dict], budget: str) -> str:
    cells = env_cells(rows)
    envs = list(dict.fromkeys(r["env"] for r in sorted(rows, key=lambda r: (r["env"], r["task"]))))
    tasks_of = {e: sorted({r["task"] for r in rows if r["env"] == e}) for e in envs}
    lines_ = list(dict.fromkeys((r["agent"], r["mode"]) for r in rows))
    steps = sorted({r["steps"] for r in rows})
    seeds = sorted({c["n_seeds"] for c in cells.values()})
    eps = sorted({r["episodes_per_seed"] for r in rows})

    def head(e):
        t = tasks_of[e]
        return f"{e} task{t[0]}" if len(t) == 1 else f"{e} tasks {','.join(map(str, t))}"

    lines = [
        f"Success rate (%), mean +- std over seeds of the mean over the tasks run; our budget: **{budget}** "
        f"({', '.join(map(str, steps))} gradient steps, {'/'.join(map(str, seeds))} seed(s), "
        f"{'/'.join(map(str, eps))} evaluation episodes per task and seed). In brackets: the paper's figure "
        "(DESIGN §8; single-task: mean over the 5 tasks, 1M-transition datasets, 1M gradient steps, "
        "4 x 1024 networks; goal-conditioned: 100M-transition datasets), a same-budget number only at the "
        "paper budget with all 5 tasks.",
        "",
        "| agent | mode | " + " | ".join(head(e) for e in envs) + " |",
        "|---|---|" + "---|" * len(envs),
    ]
    for a, mode in lines_:
        vals = []
        for e in envs:
            c = cells.get((a, mode, e))
            if c is None:
                vals.append("")
            elif c["n_seeds"] == 1 or np.isnan(c["success_std"]):  # no spread known: its value alone
                note = "n = 1" if c["n_seeds"] == 1 else "std n/a"
                vals.append(f"{c['success_mean']:.1f} ({note}) ({_paper(c)})")
            else:
                vals.append(f"{c['success_mean']:.1f} +- {c['success_std']:.1f} ({_paper(c)})")
        lines.append(f"| {a} | {mode} | " + " | ".join(vals) + " |")
    wall = sum(r["wall_time_s"] for r in rows)
    lines += ["", f"Wall time of all runs (sum): {wall / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path, budget: str) -> None:
    fields = [
        "agent",
        "mode",
        "env",
        "task",
        "budget",
        "seeds",
        "per_seed",
        "success_mean",
        "success_std",
        "paper_mean",
        "paper_std",
        "steps",
        "episodes_per_seed",
        "wall_time_s",
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    **{k: r.get(k) for k in fields},
                    "budget": budget,
                    "seeds": " ".join(map(str, r["seeds"])),
                    "per_seed": "" if r["per_seed"] is None else " ".join(f"{x:.4f}" for x in r["per_seed"]),
                }
            )


def curves(jobs: list[Job], path: Path, budget: str) -> None:
    """Success vs gradient steps (mean over seeds and the tasks run) per agent, one panel per environment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(j.env for j in jobs))
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for agent, mode in dict.fromkeys((j.agent, j.mode) for j in jobs):
            series: dict[int, list[float]] = {}
            for j in jobs:
                if (j.agent, j.mode, j.env) != (agent, mode, env) or not (j.workdir / "eval.csv").exists():
                    continue
                with open(j.workdir / "eval.csv", newline="") as f:
                    for row in csv.DictReader(f):
                        per = [float(v) for k, v in row.items() if k.startswith("success/seed") and v != ""]
                        series.setdefault(int(float(row["step"])), []).extend(per or [float(row["success"])])
            if series:
                xs = sorted(series)
                label = agent if mode == agent_mode(agent) else f"{agent} ({mode})"
                ax.plot(xs, [100 * np.mean(series[x]) for x in xs], marker="o", label=label)
        ax.set_title(f"{env} ({budget} budget)")
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("success rate (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------- planning
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def plan(a, p: argparse.ArgumentParser) -> tuple[list[Job], list[dict]]:
    """The runs and the cells (one dict per cell, for ``--json``) the arguments ask for."""
    table = protocol.get_table(a.protocol) if a.protocol else None
    known_agents = ["mac"] + sorted(f.stem for f in (REPO / "gin" / "baselines").glob("*.gin"))
    known_envs = sorted(f.stem for f in (REPO / "gin" / "envs").glob("*.gin"))
    agents, envs = _names(a.agents), _names(a.envs)
    if table is None:
        if not agents or not envs:
            p.error("give --agents and --envs, or --protocol singletask|goalconditioned")
    else:
        agents = agents or list(table.agents)
        envs = envs or list(table.envs)
        for what, got, allowed in (("agent", agents, table.agents), ("environment", envs, table.envs)):
            bad = [x for x in got if x not in allowed]
            if bad:
                p.error(f"{what}(s) {bad} are not in the {table.name} table; its {what}s: {list(allowed)}")
    for ag in agents:
        if ag not in known_agents:
            p.error(f"unknown agent {ag!r}; known agents: {known_agents}")
    for e in envs:
        if e not in known_envs:
            p.error(f"unknown environment {e!r}; known: {known_envs}")
    tasks = _ints(a.tasks) if a.tasks else list(table.tasks if table else (2,))
    if not tasks or any(not 1 <= t <= 5 for t in tasks):
        p.error(f"--tasks must be task ids in 1..5, got {a.tasks!r}")
    tasks = sorted(set(tasks))
    seeds = sorted(set(_ints(a.seeds))) if a.seeds else list(table.seeds if table else (0,))
    if not seeds or min(seeds) < 0:
        p.error(f"--seeds must be non-negative integers, got {a.seeds!r}")
    out = a.out.absolute()
    data_dir = Path(a.data_dir).expanduser().absolute()
    jobs, cells = [], []
    for ag in agents:
        mode = table.mode if table else agent_mode(ag)
        kw = dict(mode=mode, table=table, data_dir=data_dir if table else None)
        for e in envs:
            if table is not None and mode != "singletask":  # one run per seed group, evaluated on every task
                groups = [
                    (
                        tuple(tasks),
                        plan_cell(ag, e, tuple(tasks) if len(tasks) > 1 else tasks[0], seeds, a.budget, out, **kw),
                    )
                ]
            else:
                groups = [((t,), plan_cell(ag, e, t, seeds, a.budget, out, **kw)) for t in tasks]
            for ts, js in groups:
                jobs += js
                for j in js:
                    for t in ts:
                        cells.append(
                            {
                                "agent": ag,
                                "mode": "oraclerep" if mode != "singletask" else "singletask",
                                "env": e,
                                "task": t,
                                "seeds": list(j.seeds),
                                "workdir": str(j.workdir),
                                "command": command(j),
                                "bindings": None,
                                "_job": j,
                            }
                        )
    return jobs, cells


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """The launcher flags (``--launcher``, ``--parallel``, ``--slurm-*``), shared with
    ``learning_parity.py``; :func:`check_launcher_args` checks them, :func:`make_launcher` builds the launcher."""
    p.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: processes on this machine; slurm: one SLURM job per run (submitit)",
    )
    p.add_argument("--parallel", type=int, default=1, help="local launcher: runs trained at once (one process each)")
    p.add_argument(
        "--slurm-gin",
        action="append",
        default=None,
        metavar="FILE",
        help="Gin file of SlurmLauncher settings (e.g. a copy of gin/slurm.gin; repeatable)",
    )
    p.add_argument("--slurm-partition", default=None, help="slurm: --partition")
    p.add_argument(
        "--slurm-time",
        type=int,
        default=None,
        help="slurm: time limit per job (minutes); a longer run saves and is requeued",
    )
    p.add_argument(
        "--slurm-gpus", default=None, help="slurm: accelerators per job ('auto': 1 where the nodes have GPUs)"
    )
    p.add_argument("--slurm-cpus", type=int, default=None, help="slurm: CPU cores per job")
    p.add_argument("--slurm-mem-gb", type=float, default=None, help="slurm: host memory per job (GB)")


def check_launcher_args(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Reject out-of-range launcher flags (``p.error`` exits, naming the value received)."""
    if a.parallel < 1:
        p.error(f"--parallel must be >= 1, got {a.parallel}")
    if a.slurm_gpus not in (None, "auto") and not a.slurm_gpus.isdigit():
        p.error(f"--slurm-gpus must be 'auto' or an integer >= 0, got {a.slurm_gpus!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--protocol",
        choices=sorted(protocol.TABLES),
        default=None,
        help="the paper's table: its cells with the authors' settings (macfw/protocol.py)",
    )
    p.add_argument(
        "--agents",
        default=None,
        help="comma-separated: mac and names of gin/baselines/*.gin (with --protocol: default the table's, narrows it)",
    )
    p.add_argument(
        "--envs",
        default=None,
        help="comma-separated names of gin/envs/*.gin, e.g. cube-single (with --protocol: default the table's)",
    )
    p.add_argument("--tasks", default=None, help="comma-separated task ids (1..5; default 2, with --protocol 1-5)")
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds; consecutive ones train in one process (default 0, with --protocol 0-3)",
    )
    p.add_argument(
        "--budget",
        default=None,
        choices=sorted(BUDGETS),
        help="smoke, quickstart, or paper (default smoke; with --protocol paper)",
    )
    p.add_argument("--out", type=Path, default=Path("out/compare"), help="output folder (default out/compare)")
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"with --protocol at the paper budget: where the official datasets are (default {DEFAULT_DATA_DIR})",
    )
    add_launcher_args(p)
    p.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: write the table from the runs under --out that have finished",
    )
    p.add_argument("--dry-run", action="store_true", help="print every run, the totals and the cost; run nothing")
    p.add_argument("--json", type=Path, default=None, help="with --dry-run: write the cells as a JSON list here")
    p.add_argument(
        "--bench",
        type=Path,
        default=None,
        help="--dry-run's estimate from measured updates/s (python -m macfw.bench --all-agents --json)",
    )
    p.add_argument(
        "--accel-tflops",
        type=float,
        default=100.0,
        help="--dry-run's estimate without --bench: achieved TFLOP/s per accelerator (default 100)",
    )
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)  # regenerates paper_flops.json
    return p


def check_args(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Fill in the default ``--budget`` and reject out-of-range or contradictory flags (``p.error`` exits)."""
    if a.budget is None:
        a.budget = "paper" if a.protocol else "smoke"
    check_launcher_args(a, p)
    if a.json is not None and not a.dry_run:
        p.error("--json goes with --dry-run (it writes the planned runs)")
    if a.accel_tflops <= 0:
        p.error(f"--accel-tflops must be > 0, got {a.accel_tflops}")


def finished_jobs(jobs: list[Job], out: Path, budget: str) -> list[Job]:
    """``--table-only``: the runs that have finished (a note for each one left out); exits when none has."""
    missing = [j for j in jobs if not (j.workdir / "summary.json").exists()]
    for j in missing:
        print(f"[compare] {j.name}: not finished, left out of the table ({j.workdir})", flush=True)
    jobs = [j for j in jobs if j not in missing]
    if not jobs:
        raise SystemExit(f"--table-only: no finished run under {out / 'runs' / budget}")
    return jobs


def train(jobs: list[Job], launcher) -> None:
    """Check the datasets, then train every run with ``launcher``; a SLURM failure exits with its message."""
    check_data(jobs)
    from macfw.launch import SlurmError

    try:
        launch(jobs, launcher)
    except SlurmError as e:
        raise SystemExit(f"compare.py: error: {e}") from None


def write_results(jobs: list[Job], out: Path, budget: str, t0: float) -> None:
    """Collect the runs' results; write table.md, table.csv and curves.png under ``out``; print the table."""
    rows = collect(jobs)
    out.mkdir(parents=True, exist_ok=True)
    md = table_md(rows, budget)
    (out / "table.md").write_text(md)
    write_csv(rows, out / "table.csv", budget)
    curves(jobs, out / "curves.png", budget)
    print(md)
    print(
        f"[compare] wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'curves.png'} ({time.time() - t0:.0f} s)",
        flush=True,
    )


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.count_flops:
        count_flops()
        return 0
    check_args(a, p)
    jobs, cells = plan(a, p)
    try:
        launcher = None if (a.dry_run or a.table_only) else make_launcher(a)
    except (ValueError, ImportError) as e:  # a setting out of range (ConfigError), submitit missing
        p.error(str(e))
    if a.dry_run:
        bench = load_bench(a.bench) if a.bench else None
        dry_run(jobs, cells, flops=load_flops(), bench=bench, accel_flops=a.accel_tflops * 1e12, json_path=a.json)
        return 0
    out = a.out.absolute()
    t0 = time.time()
    if a.table_only:
        jobs = finished_jobs(jobs, out, a.budget)
    else:
        train(jobs, launcher)
    write_results(jobs, out, a.budget, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
