"""Learning parity with the authors' code: macfw and the MAC authors' implementation of the same agent,
trained on the same data for the same budget, evaluated the same way (issue 29).

    python experiments/learning_parity.py --reference-dir DIR --agents mopo,mobile,leq \\
        --env cube-single-play-singletask-task2-v0 --steps N --seeds 0,1,2 [--eval-every N] \\
        [--eval-episodes 15] [--hidden 256,256] [--batch-size 256] [--out DIR] [--json OUT] [--dry-run]

DIR is a checkout of the MAC authors' code (kwanyoungpark/MAC), imported from there and never copied
(``pip install -e '.[parity]'`` for flax, distrax, ml_collections). For each agent x seed x
implementation one process trains ``--steps`` gradient steps and records the success rate at every
evaluation (every ``--eval-every`` steps and at the end):

* ``macfw``: ``python -m macfw.run`` with the agent's Gin file and the environment's, exactly as
  ``experiments/compare.py`` builds the command (:func:`compare.run_config`), plus the bindings that
  fix the budget and the shared settings (:func:`macfw_bindings`);
* ``reference``: ``experiments/learning_parity_ref.py``: the authors' ``create``, ``get_config`` and
  data pipeline (their ``utils/datasets.py``) in a loop that mirrors their ``main.py`` (LEQ) or
  ``main_mbpo.py`` (MOPO, MOBILE: their model-rollout buffer), their agent acting through macfw's
  evaluation (that file's docstring lists every step and the two places it must differ from their
  entry points to run at all).

Same on both sides: the dataset file (generated once into macfw's cache as OGBench's recipe makes it,
``--episodes`` x ``--episode-length``, or ``--dataset-path``), network sizes (``--hidden``), batch
size, every hyperparameter (macfw's Gin file against the authors' ``get_config``, both printed with
where each value comes from; MOPO/MOBILE's rollout schedule ``--rollout-freq`` and ``--rollout-starts``
on both), gradient steps, and the evaluation: macfw's :func:`macfw.evaluation.evaluate` on the same
environments and tasks, ``--eval-episodes`` per task, the same episode seeds (``train.eval_seed + step``,
that of a single-seed macfw run) and the same episodes in flight (``evaluate.batch_size``).

Output: per run ``OUT/results/<agent>/<impl>-seed<s>.json`` (collected from its folder once the launch
has ended; a re-run skips finished runs, and a macfw run resumes from its last checkpoint in
``OUT/runs/<agent>/macfw-seed<s>``; a failed run is reported with its log and the others go on); at the
end ``OUT/learning_parity.json`` (and ``--json OUT``): per agent and implementation, per seed the
success % at each evaluation step, the final success's mean and std over the seeds, the settings
table; and ``OUT/table.md``, printed:

    | agent | macfw success % (mean ± std, n seeds) | authors' success % (mean ± std, n seeds) | within spread? |

"Final" is the last evaluation (at ``--steps``); std is the population std over seeds (``np.std``, as
``compare.py``); "within spread" means ``|mean_macfw - mean_authors| <= max(std_macfw, std_authors)``.
Results depend on the settings, so each result file records them and a re-run with other settings in
the same ``--out`` stops with a message instead of mixing them.

Launchers, as ``compare.py``'s (``--launcher``, :mod:`macfw.launch`): ``local`` trains ``--parallel``
runs at once on this machine (default one after the other; on one GPU the processes share its memory,
see :class:`macfw.launch.LocalLauncher`); ``slurm`` submits one job per run with submitit
(``--slurm-*`` flags or ``--slurm-gin``), waits for them and collects the results. Each run's folder
``OUT/runs/<agent>/<impl>-seed<s>`` is its workdir, with its output in ``stdout.log``; both sides write
``summary.json`` there last, so a re-launch skips finished runs and does not submit a run whose job is
still queued. A preempted macfw run resumes from its checkpoint; the authors' side has no checkpoint
and restarts from step 0 (give jobs a time limit above one run). The dataset is generated before
launching, into macfw's cache on this machine (``--dataset-path`` names one on the cluster's shared
file system). ``--dry-run`` prints the dataset, every run's command, its state (done / to run) and the
settings of both sides, and trains nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import compare  # noqa: E402  (experiments/compare.py: the macfw command of a run)
from learning_parity_ref import AGENT_LOOPS, MBPO_FLAGS, EnvName, parse_env_name  # noqa: E402
from parity_cases.common import ReferenceCodeError, load_reference  # noqa: E402

AGENTS = tuple(sorted(AGENT_LOOPS))
IMPLS = ("macfw", "reference")
IMPL_NAMES = {"macfw": "macfw", "reference": "the authors' code (kwanyoungpark/MAC)"}
#: macfw's agent class per agent name (the prefix of its Gin bindings).
AGENT_CLASS = {"mopo": "MOPO", "mobile": "MOBILE", "leq": "LEQ"}
DEFAULT_OUT = Path("out/learning_parity")
WITHIN_SPREAD_RULE = "|mean_macfw - mean_authors| <= max(std_macfw, std_authors) (population std over seeds)"


@dataclasses.dataclass
class Setup:
    """The checked arguments (see the module docstring).

    Attributes:
      ref_dir: the authors' checkout.
      agents: agent names (of :data:`AGENTS`).
      env: the environment and task (single-task names carry their task, resolved if omitted).
      steps: gradient steps per run; eval_every: gradient steps between evaluations.
      seeds: training seeds.
      eval_episodes: episodes per task and evaluation; eval_batch: episodes in flight
        (``evaluate.batch_size``); eval_seed: base of the episode seeds.
      hidden: hidden sizes of every network; batch_size: transitions per gradient step.
      rollout_freq, rollout_starts: MOPO/MOBILE's gradient steps between rollout rounds and start states per round.
      dataset_path: an existing NAME.npz (None: generate ``episodes`` x ``episode_length`` steps, seed
        ``data_seed``, into macfw's cache).
      out: output folder.
    """

    ref_dir: Path
    agents: list[str]
    env: EnvName
    steps: int
    eval_every: int
    seeds: list[int]
    eval_episodes: int
    eval_batch: int
    eval_seed: int
    hidden: tuple[int, ...]
    batch_size: int
    rollout_freq: int
    rollout_starts: int
    dataset_path: Path | None
    episodes: int
    episode_length: int
    data_seed: int
    out: Path

    def dispatch(self, agent: str) -> int:
        """macfw's ``train.steps_per_dispatch`` for ``agent``: the largest divisor of 10 that divides the
        steps, the evaluation interval and (MOPO/MOBILE) the rollout interval, all of which macfw
        requires to be multiples of it."""
        mbpo = AGENT_LOOPS[agent] == "main_mbpo.py"
        return math.gcd(10, self.steps, self.eval_every, self.rollout_freq if mbpo else 10)

    @property
    def eval_steps(self) -> list[int]:
        """The gradient steps evaluated (both sides): multiples of ``eval_every``, and ``steps``."""
        from learning_parity_ref import eval_steps

        return eval_steps(self.steps, self.eval_every)

    def fingerprint(self, agent: str) -> dict:
        """Everything an ``agent`` run's result depends on but its seed (recorded in each result file)."""
        out = {
            "agent": agent,
            "env": self.env.full,
            "steps": self.steps,
            "eval_every": self.eval_every,
            "eval_episodes": self.eval_episodes,
            "eval_batch": self.eval_batch,
            "eval_seed": self.eval_seed,
            "hidden": list(self.hidden),
            "batch_size": self.batch_size,
            "dataset": str(self.dataset_file()),
        }
        if AGENT_LOOPS[agent] == "main_mbpo.py":
            out.update(rollout_freq=self.rollout_freq, rollout_starts=self.rollout_starts)
        return out

    def dataset_file(self) -> Path:
        """The dataset both sides read: ``--dataset-path``, or the cached generated file (maybe not made yet)."""
        if self.dataset_path is not None:
            return self.dataset_path
        from macfw.data.generate import dataset_filename, default_cache_dir

        name = dataset_filename(self.env.base_name, self.episodes, self.episode_length, self.data_seed)
        return default_cache_dir() / "datasets" / name


# ------------------------------------------------------------------------------ the runs
@dataclasses.dataclass
class Run:
    """One (agent, seed, implementation) training run."""

    agent: str
    seed: int
    impl: str
    setup: Setup

    @property
    def name(self) -> str:
        return f"{self.agent} seed {self.seed} {self.impl}"

    @property
    def folder(self) -> Path:
        """Its working folder (macfw: the run's workdir; reference: its log and raw result)."""
        return self.setup.out / "runs" / self.agent / f"{self.impl}-seed{self.seed}"

    @property
    def result_path(self) -> Path:
        return self.setup.out / "results" / self.agent / f"{self.impl}-seed{self.seed}.json"

    @property
    def log_path(self) -> Path:
        """``<folder>/stdout.log``: the run's output (both implementations; :mod:`macfw.launch` appends to it)."""
        return self.folder / "stdout.log"

    def command(self) -> list[str]:
        return macfw_command(self) if self.impl == "macfw" else reference_command(self)

    def spec(self):
        """The run for :mod:`macfw.launch`: its folder is its workdir (both sides write ``summary.json`` there last)."""
        from macfw.launch import RunSpec

        return RunSpec(self.name, self.folder, self.command(), REPO)


def macfw_bindings(setup: Setup, agent: str) -> list[str]:
    """The bindings that put macfw's run on the harness's budget and settings (after compare.py's own:
    seed, task, mode). Units: steps and intervals in gradient steps."""
    E = setup.eval_every
    binds = [
        f"HIDDEN = {tuple(setup.hidden)!r}",
        f"train.batch_size = {setup.batch_size}",
        f"train.num_steps = {setup.steps}",
        f"train.steps_per_dispatch = {setup.dispatch(agent)}",
        f"train.eval_interval = {E}",
        f"train.log_interval = {math.gcd(E, 1000)}",
        f"train.save_interval = {E}",
        f"train.eval_episodes = {setup.eval_episodes}",
        f"train.eval_seed = {setup.eval_seed}",
        f"evaluate.batch_size = {setup.eval_batch}",
        f"OGBenchDataset.dataset_path = {str(setup.dataset_file())!r}",
    ]
    if AGENT_LOOPS[agent] == "main_mbpo.py":
        binds += [
            f"ModelRollouts.rollout_freq = {setup.rollout_freq}",
            f"ModelRollouts.num_starts = {setup.rollout_starts}",
        ]
    return binds


def macfw_job(setup: Setup, agent: str, seed: int) -> compare.Job:
    """The run as ``compare.py`` describes one (``paper`` budget: no budget file; the harness's bindings last)."""
    env = setup.env
    task: int | tuple[int, ...] = env.task if env.mode == "singletask" and env.task is not None else (1, 2, 3, 4, 5)
    return compare.Job(
        agent, env.env, task, [seed], "paper", setup.out, mode=env.mode, extra=macfw_bindings(setup, agent)
    )


def macfw_files_and_bindings(setup: Setup, agent: str, seed: int) -> tuple[list[str], list[str]]:
    """The Gin files and bindings of macfw's run (:func:`compare.run_config`)."""
    return compare.run_config(macfw_job(setup, agent, seed))


def macfw_command(run: Run) -> list[str]:
    """``python -m macfw.run --gin_file ... --gin_bindings ... --workdir <run folder>`` (:func:`compare.command`)."""
    return compare.command(macfw_job(run.setup, run.agent, run.seed), workdir=run.folder)


def reference_command(run: Run) -> list[str]:
    """``python experiments/learning_parity_ref.py ... --workdir <run folder>`` (its raw result:
    ``<folder>/result.json``, then ``<folder>/summary.json``)."""
    s = run.setup
    return [
        sys.executable,
        str(HERE / "learning_parity_ref.py"),
        "--reference-dir",
        str(s.ref_dir),
        "--agent",
        run.agent,
        "--env",
        s.env.full,
        "--dataset-path",
        str(s.dataset_file()),
        "--seed",
        str(run.seed),
        "--steps",
        str(s.steps),
        "--eval-every",
        str(s.eval_every),
        "--eval-episodes",
        str(s.eval_episodes),
        "--eval-batch",
        str(s.eval_batch),
        "--eval-seed",
        str(s.eval_seed),
        "--hidden",
        ",".join(map(str, s.hidden)),
        "--batch-size",
        str(s.batch_size),
        "--rollout-freq",
        str(s.rollout_freq),
        "--rollout-starts",
        str(s.rollout_starts),
        "--workdir",
        str(run.folder),
    ]


def plan_runs(setup: Setup) -> list[Run]:
    """Every run, agent by agent, seed by seed, macfw then the reference."""
    return [Run(a, s, impl, setup) for a in setup.agents for s in setup.seeds for impl in IMPLS]


def run_state(run: Run) -> str:
    """``'done'`` (its result file exists, made with these settings) or ``'to run'``.

    Raises:
      SystemExit: its result file, or its folder's ``settings.json``, was made with other settings (names
        the file, the differing settings and the fix).
    """
    want = run.setup.fingerprint(run.agent)
    for path in (run.result_path, run.folder / "settings.json"):
        if not path.is_file():
            continue
        try:
            got = json.loads(path.read_text())
        except ValueError:
            continue  # a torn write: the run is redone
        got = got.get("settings", got) if path == run.result_path else got
        if got != want:
            diff = ", ".join(f"{k}: {got.get(k)!r} there, {want[k]!r} now" for k in want if got.get(k) != want[k])
            raise SystemExit(
                f"{path} was made with other settings ({diff}). "
                "Use another --out, or delete that run's result and folder to redo it."
            )
        if path == run.result_path:
            return "done"
    return "to run"


# ------------------------------------------------------------------------------ running
def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _write_json(path: Path, data: dict) -> None:
    """``data`` as JSON in ``path`` (its folder made first), atomically (:func:`macfw.logs.write_json_atomic`)."""
    from macfw.logs import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def macfw_result(run: Run) -> dict:
    """The finished macfw run's result: success % at each evaluation, from its ``eval.csv`` (the last row
    of each step, should a resumed run have logged one twice) and ``summary.json``.

    Raises:
      RuntimeError: the run folder has no evaluation rows or no ``summary.json``.
    """
    import csv

    rows: dict[int, dict] = {}
    path = run.folder / "eval.csv"
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows[int(float(row["step"]))] = row
    summary_path = run.folder / "summary.json"
    if not rows or not summary_path.is_file():
        raise RuntimeError(f"{run.folder} has no eval.csv rows or no summary.json: the macfw run did not finish")
    summary = json.loads(summary_path.read_text())
    steps = sorted(rows)
    return {
        "impl": "macfw",
        "agent": run.agent,
        "seed": run.seed,
        "env": run.setup.env.full,
        "steps": steps,
        "success": [100.0 * float(rows[s]["success"]) for s in steps],
        "per_task_success": [
            {k.split("/", 1)[1]: 100.0 * float(v) for k, v in rows[s].items() if k.startswith("success/task") and v}
            for s in steps
        ],
        "wall_time_s": float(summary.get("wall_time_s", float("nan"))),
        "updates_per_s": summary.get("updates_per_s"),
    }


def record(run: Run) -> str | None:
    """Write the result file of a run that has finished (its folder's ``summary.json``): from its
    ``eval.csv`` (macfw) or ``result.json`` (the authors' side), with the settings. Returns None when
    written, else why not (with the log's last lines)."""
    if not (run.folder / "summary.json").is_file():
        return f"did not finish (no {run.folder / 'summary.json'}); {run.log_path}:\n{_tail(run.log_path)}"
    try:
        if run.impl == "macfw":
            result = macfw_result(run)
        else:
            result = json.loads((run.folder / "result.json").read_text())
    except (OSError, ValueError, RuntimeError) as e:
        return f"no result ({e}); {run.log_path}:\n{_tail(run.log_path)}"
    result["settings"] = run.setup.fingerprint(run.agent)
    _write_json(run.result_path, result)
    return None


def train(runs: list[Run], launcher) -> dict[str, str]:
    """Train ``runs`` with ``launcher`` (:mod:`macfw.launch`: local processes or SLURM jobs; a run whose
    folder has ``summary.json`` is not run again) and write each finished run's result file. Returns
    ``{run name: why}`` for the runs without a result."""
    for r in runs:
        r.folder.mkdir(parents=True, exist_ok=True)
        _write_json(r.folder / "settings.json", r.setup.fingerprint(r.agent))
    launcher.launch([r.spec() for r in runs])
    failures: dict[str, str] = {}
    for r in runs:
        why = record(r)
        if why is None:
            res = json.loads(r.result_path.read_text())
            print(
                f"[learning_parity] {r.name}: success {res['success'][-1]:.1f}% at step {res['steps'][-1]}", flush=True
            )
        else:
            failures[r.name] = why
            print(f"[learning_parity] {r.name}: FAILED: {why}", flush=True)
    return failures


# ------------------------------------------------------------------------------ settings of both sides
def setting_specs(agent: str) -> list[tuple[str, str, str]]:
    """``(what, macfw's binding, the authors' key)`` of every setting compared for ``agent``; the
    authors' key is a ``get_config()`` key, ``flag:<name>`` (a ``main_mbpo.py`` flag) or ``harness:<name>``
    (the same harness value on both sides)."""
    A = AGENT_CLASS[agent]
    actor = "LEQActor" if agent == "leq" else "TanhGaussianActor"
    rows = [
        ("dynamics hidden sizes", "GaussianDynamics.hidden_dims", "dynamics_hidden_dims"),
        ("actor hidden sizes", f"{actor}.hidden_dims", "actor_hidden_dims"),
        ("critic hidden sizes", "QCritic.hidden_dims", "value_hidden_dims"),
        ("batch size", "train.batch_size", "batch_size"),
        ("discount", f"{A}.gamma", "discount"),
        ("learning rate", f"{A}.learning_rate", "lr"),
        ("target EMA rate", f"{A}.tau", "tau"),
        ("dynamics members", "dynamics/Ensemble.num", "num_dynamics"),
    ]
    if AGENT_LOOPS[agent] == "main_mbpo.py":
        rows += [
            ("critics", "critic/Ensemble.num", "num_qs"),
            ("penalty weight", f"{A}.beta", "beta"),
            ("target entropy / act_dim (negated)", f"{A}.target_entropy_scale", "target_entropy_multiplier"),
            ("target Q aggregation", f"{A}.q_agg", "q_agg"),
            ("rollout length", "ModelRollouts.rollout_length", "rollout_steps"),
            ("gradient steps between rollout rounds", "ModelRollouts.rollout_freq", "flag:mb_rollout_freq"),
            ("rollout start states per round", "ModelRollouts.num_starts", "flag:mb_batch_size"),
            ("rollout rounds kept", "ModelRollouts.retain_rounds", "flag:mb_retain_epoch"),
            ("real fraction of a batch", "ModelRollouts.real_ratio", "flag:mb_batch_ratio"),
        ]
        if agent == "mobile":
            rows.append(("penalty samples per member", "MOBILE.num_samples", "num_samples"))
    else:
        rows += [
            ("imagined horizon", "LEQ.horizon", "rollout_steps"),
            ("lambda", "LEQ.lam", "lam"),
            ("expectile", "LEQ.expectile", "expectile"),
            ("model-term weight", "LEQ.model_weight", "model_batch_ratio"),
        ]
    rows += [
        ("gradient steps", "train.num_steps", "harness:steps"),
        ("evaluation episodes per task", "train.eval_episodes", "harness:eval_episodes"),
    ]
    return rows


#: macfw bindings set by the harness, and the flag they come from.
MACFW_FLAG_OF = {
    "GaussianDynamics.hidden_dims": "--hidden",
    "TanhGaussianActor.hidden_dims": "--hidden",
    "LEQActor.hidden_dims": "--hidden",
    "QCritic.hidden_dims": "--hidden",
    "train.batch_size": "--batch-size",
    "train.num_steps": "--steps",
    "train.eval_episodes": "--eval-episodes",
    "ModelRollouts.rollout_freq": "--rollout-freq",
    "ModelRollouts.num_starts": "--rollout-starts",
}
#: ``main_mbpo.py`` flags set by the harness, and the flag they come from.
REF_FLAG_OF = {"mb_rollout_freq": "--rollout-freq", "mb_batch_size": "--rollout-starts"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def settings_rows(setup: Setup, agent: str, ref_config: dict | None) -> list[dict]:
    """Each compared setting of ``agent``: ``{what, macfw, macfw_source, reference, reference_source,
    same}``; ``ref_config`` the authors' config as run (None: unknown, the reference not loadable)."""
    from learning_parity_ref import config_overrides

    from macfw import protocol

    files, binds = macfw_files_and_bindings(setup, agent, setup.seeds[0])
    ops = protocol.operative_bindings(files, binds)
    gin_file = protocol.agent_gin_file(agent)
    overrides = config_overrides(agent, setup.env.mode)
    flags = dict(MBPO_FLAGS, mb_rollout_freq=setup.rollout_freq, mb_batch_size=setup.rollout_starts)
    harness = {"steps": setup.steps, "eval_episodes": setup.eval_episodes}
    out = []
    for what, mkey, rkey in setting_specs(agent):
        mine = ops.get(mkey)
        msrc = f"{MACFW_FLAG_OF[mkey]} ({mkey})" if mkey in MACFW_FLAG_OF else f"{gin_file} ({mkey})"
        if rkey.startswith("flag:"):
            name = rkey[5:]
            theirs: Any = flags[name]
            rsrc = f"{REF_FLAG_OF[name]} (main_mbpo.py {name})" if name in REF_FLAG_OF else f"main_mbpo.py flag {name}"
        elif rkey.startswith("harness:"):
            theirs = harness[rkey[8:]]
            rsrc = "--" + rkey[8:].replace("_", "-")
        else:
            theirs = None if ref_config is None else ref_config.get(rkey)
            rsrc = f"{overrides[rkey]} ({rkey})" if rkey in overrides else f"agents/{agent}.py get_config() ({rkey})"
        out.append(
            {
                "what": what,
                "macfw": mine,
                "macfw_source": msrc,
                "reference": theirs,
                "reference_source": rsrc,
                "same": None if theirs is None else _same(mine, theirs),
            }
        )
    return out


def reference_config_plain(setup: Setup, agent: str) -> tuple[dict | None, str]:
    """The authors' config of ``agent`` as the reference runs use it, as plain values, or ``(None, why)``
    when their code cannot be loaded."""
    from learning_parity_ref import plain, reference_config

    try:
        ref = load_reference(setup.ref_dir)
        cfg = reference_config(ref, agent, setup.hidden, setup.batch_size, setup.env.mode)
    except (ReferenceCodeError, ImportError) as e:
        return None, f"{type(e).__name__}: {e}"
    return {k: plain(v) for k, v in cfg.to_dict().items()}, ""


def settings_md(agent: str, rows: list[dict]) -> str:
    """The settings table of ``agent`` (Markdown)."""

    def v(x):
        return "?" if x is None else (str(tuple(x)) if isinstance(x, list) else str(x))

    lines = [
        f"Settings of {agent} (macfw | the authors' code, and where each value comes from):",
        "",
        "| setting | macfw | from | authors' | from | same? |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "?" if r["same"] is None else ("yes" if r["same"] else "**no**")
        cells = [r["what"], v(r["macfw"]), r["macfw_source"], v(r["reference"]), r["reference_source"], same]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ results
def collect(setup: Setup, failures: dict[str, str]) -> dict:
    """The campaign's JSON: settings, and per agent and implementation the per-seed curves and the final
    success's mean and std over the seeds that finished (``failed``: the seeds that did not)."""
    agents: dict[str, Any] = {}
    for agent in setup.agents:
        entry: dict[str, Any] = {}
        for impl in IMPLS:
            per_seed, final, failed = {}, {}, {}
            for seed in setup.seeds:
                run = Run(agent, seed, impl, setup)
                if run.result_path.is_file():
                    r = json.loads(run.result_path.read_text())
                    per_seed[str(seed)] = {"steps": r["steps"], "success": r["success"]}
                    final[str(seed)] = r["success"][-1]
                else:
                    failed[str(seed)] = failures.get(run.name, "not run")
            vals = list(final.values())
            entry[impl] = {
                "per_seed": per_seed,
                "final": final,
                "final_mean": float(np.mean(vals)) if vals else None,
                "final_std": float(np.std(vals)) if vals else None,
                "n_seeds": len(vals),
                "failed": failed,
            }
        m, r = entry["macfw"], entry["reference"]
        if m["n_seeds"] and r["n_seeds"]:
            gap = abs(m["final_mean"] - r["final_mean"])
            entry["gap"] = gap
            entry["within_spread"] = bool(gap <= max(m["final_std"], r["final_std"]))
        else:
            entry["gap"] = entry["within_spread"] = None
        agents[agent] = entry
    return {
        "env": setup.env.full,
        "steps": setup.steps,
        "eval_steps": setup.eval_steps,
        "eval_episodes": setup.eval_episodes,
        "eval_batch": setup.eval_batch,
        "eval_seed": setup.eval_seed,
        "seeds": setup.seeds,
        "hidden": list(setup.hidden),
        "batch_size": setup.batch_size,
        "dataset": str(setup.dataset_file()),
        "rollout_freq": setup.rollout_freq,
        "rollout_starts": setup.rollout_starts,
        "success_unit": "% of evaluation episodes (mean over the tasks evaluated)",
        "within_spread_rule": WITHIN_SPREAD_RULE,
        "agents": agents,
    }


_ERROR_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*$")


def short_reason(why: str) -> str:
    """The exception line of a failure's log tail (``KeyError: 'rewards'``), else its first line."""
    lines = [ln.strip() for ln in why.splitlines() if _ERROR_LINE.match(ln)]
    return (lines[-1] if lines else why.splitlines()[0] if why else "failed")[:160]


def _cell(side: dict) -> str:
    reasons = sorted({short_reason(w) for w in side["failed"].values()})
    if not side["n_seeds"]:
        return f"failed: {'; '.join(reasons)} (see the logs)" if side["failed"] else "-"
    s = f"{side['final_mean']:.1f} ± {side['final_std']:.1f} (n = {side['n_seeds']})"
    if side["failed"]:
        s += f"; seed(s) {', '.join(side['failed'])} failed: {'; '.join(reasons)}"
    return s


def table_md(result: dict) -> str:
    """The campaign's table (Markdown), with its budget and environment."""
    lines = [
        f"Learning parity on {result['env']}: {result['steps']} gradient steps, networks "
        f"{' x '.join(map(str, result['hidden']))}, batch {result['batch_size']}, seeds "
        f"{', '.join(map(str, result['seeds']))}; success % at the last evaluation (step {result['steps']}), "
        f"{result['eval_episodes']} episode(s) per task, mean ± std over seeds; within spread: "
        f"{result['within_spread_rule']}. Dataset: {result['dataset']}.",
        "",
        "| agent | macfw success % (mean ± std, n seeds) | authors' success % (mean ± std, n seeds) | within spread? |",
        "|---|---|---|---|",
    ]
    for agent, e in result["agents"].items():
        if e["within_spread"] is None:
            verdict = "n/a"
        else:
            m, r = e["macfw"], e["reference"]
            bound = max(m["final_std"], r["final_std"])
            verdict = f"{'yes' if e['within_spread'] else '**no**'} (gap {e['gap']:.1f} vs {bound:.1f})"
        lines.append(f"| {agent} | {_cell(e['macfw'])} | {_cell(e['reference'])} | {verdict} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the command line
def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", required=True, help="a checkout of kwanyoungpark/MAC (the authors' code)")
    p.add_argument("--agents", default=",".join(AGENTS), help=f"comma-separated, of {','.join(AGENTS)} (default all)")
    p.add_argument(
        "--env",
        default="cube-single-play-singletask-task2-v0",
        help="OGBench name: <env>-<type>-singletask-task<N>-v0 or <env>-<type>-oraclerep-v0 "
        "(default cube-single-play-singletask-task2-v0)",
    )
    p.add_argument("--steps", type=int, required=True, help="gradient steps per run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--eval-every", type=int, default=None, help="gradient steps between evaluations (default steps/5)")
    p.add_argument("--eval-episodes", type=int, default=15, help="episodes per task and evaluation (default 15)")
    p.add_argument(
        "--eval-batch",
        type=int,
        default=None,
        help="episodes in flight, both sides (evaluate.batch_size; default macfw's: max(8, CPU cores))",
    )
    p.add_argument("--hidden", default="256,256", help="hidden sizes of every network (default 256,256)")
    p.add_argument("--batch-size", type=int, default=256, help="transitions per gradient step (default 256)")
    p.add_argument(
        "--rollout-freq",
        type=int,
        default=MBPO_FLAGS["mb_rollout_freq"],
        help="MOPO/MOBILE: gradient steps between model-rollout rounds (default the authors' "
        f"{MBPO_FLAGS['mb_rollout_freq']})",
    )
    p.add_argument(
        "--rollout-starts",
        type=int,
        default=MBPO_FLAGS["mb_batch_size"],
        help="MOPO/MOBILE: dataset states each rollout round starts from (default the authors' "
        f"{MBPO_FLAGS['mb_batch_size']})",
    )
    p.add_argument("--dataset-path", type=Path, default=None, help="an existing OGBench NAME.npz (default: generate)")
    p.add_argument("--episodes", type=int, default=1000, help="generated episodes (default 1000: OGBench's 1M)")
    p.add_argument("--episode-length", type=int, default=1001, help="steps per generated episode (default 1001)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (default 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--json", type=Path, default=None, help="also write the campaign's JSON here")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the settings; train nothing")
    compare.add_launcher_args(p)
    return p


def _ints(text: str, flag: str, p: argparse.ArgumentParser, minimum: int) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < minimum:
        p.error(f"{flag} must be comma-separated integers >= {minimum}, got {text!r}")
    return out


def check_args(a: argparse.Namespace, p: argparse.ArgumentParser) -> Setup:
    """The arguments checked into a :class:`Setup` (``p.error`` exits, naming the value and the fix)."""
    compare.check_launcher_args(a, p)
    agents = [x.strip() for x in a.agents.split(",") if x.strip()]
    unknown = [x for x in agents if x not in AGENTS]
    if unknown or not agents:
        p.error(f"unknown agent(s) {unknown or a.agents!r}; valid agents: {list(AGENTS)}")
    try:
        env = parse_env_name(a.env)
    except ValueError as e:
        p.error(str(e))
    known_envs = sorted(f.stem for f in (REPO / "gin" / "envs").glob("*.gin"))
    if env.env not in known_envs:
        p.error(f"--env {a.env!r}: macfw has no gin/envs/{env.env}.gin; environments: {known_envs}")
    if env.mode == "singletask" and env.task is None:
        from macfw.data.ogbench_data import default_task_id

        t = default_task_id(env.env)
        env = parse_env_name(f"{env.env}-{env.dataset_type}-singletask-task{t}-v0")
    for flag, v, lo in (
        ("--steps", a.steps, 1),
        ("--eval-episodes", a.eval_episodes, 1),
        ("--batch-size", a.batch_size, 2),
        ("--rollout-freq", a.rollout_freq, 1),
        ("--rollout-starts", a.rollout_starts, 1),
        ("--episodes", a.episodes, 1),
        ("--episode-length", a.episode_length, 2),
        ("--data-seed", a.data_seed, 0),
    ):
        if v < lo:
            p.error(f"{flag} must be an integer >= {lo}, got {v}")
    eval_every = a.eval_every if a.eval_every is not None else max(1, a.steps // 5)
    if not 1 <= eval_every <= a.steps:
        p.error(f"--eval-every must be in 1..--steps ({a.steps}), got {eval_every}")
    if a.eval_batch is not None and a.eval_batch < 1:
        p.error(f"--eval-batch must be an integer >= 1, got {a.eval_batch}")
    seeds = _ints(a.seeds, "--seeds", p, 0)
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds has duplicates: {a.seeds!r}")
    hidden = tuple(_ints(a.hidden, "--hidden", p, 1))
    if a.dataset_path is not None and not a.dataset_path.expanduser().is_file():
        p.error(
            f"--dataset-path {str(a.dataset_path)!r} is not a file; give an OGBench NAME.npz (NAME-val.npz beside it) "
            "or leave it out to generate one"
        )
    if a.json is not None and not a.json.absolute().parent.is_dir():
        p.error(f"--json {str(a.json)!r}: its folder does not exist")
    from macfw.evaluation import DEFAULT_EVAL_SEED, default_batch_size

    return Setup(
        ref_dir=Path(a.reference_dir).expanduser().absolute(),
        agents=agents,
        env=env,
        steps=a.steps,
        eval_every=eval_every,
        seeds=seeds,
        eval_episodes=a.eval_episodes,
        eval_batch=a.eval_batch if a.eval_batch is not None else default_batch_size(),
        eval_seed=DEFAULT_EVAL_SEED,
        hidden=hidden,
        batch_size=a.batch_size,
        rollout_freq=a.rollout_freq,
        rollout_starts=a.rollout_starts,
        dataset_path=None if a.dataset_path is None else a.dataset_path.expanduser().absolute(),
        episodes=a.episodes,
        episode_length=a.episode_length,
        data_seed=a.data_seed,
        out=a.out.absolute(),
    )


def print_plan(setup: Setup, runs: list[Run], states: dict[str, str]) -> None:
    """The dataset, every run (implementation, command, state) and each agent's settings of both sides."""
    data = setup.dataset_file()
    made = "exists" if data.is_file() else f"generated first: {setup.episodes} episodes x {setup.episode_length} steps"
    print(f"[learning_parity] {setup.env.full}, {setup.steps} gradient steps, evaluations at steps {setup.eval_steps}")
    print(f"[learning_parity] dataset (both implementations): {data} ({made})")
    for i, r in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {r.agent} seed {r.seed}, {IMPL_NAMES[r.impl]} [{r.impl}]: {states[r.name]}")
        print(f"  result   {r.result_path}")
        print(f"  command  {shlex.join(r.command())}")
    for agent in setup.agents:
        cfg, why = reference_config_plain(setup, agent)
        print()
        print(settings_md(agent, settings_rows(setup, agent, cfg)), end="")
        if cfg is None:
            print(f"(the authors' get_config() values are shown once their code loads: {why})")


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    setup = check_args(a, p)
    runs = plan_runs(setup)
    states = {r.name: run_state(r) for r in runs}
    if a.dry_run:
        print_plan(setup, runs, states)
        todo = sum(s != "done" for s in states.values())
        print(f"\n{len(runs)} runs ({todo} to run, {len(runs) - todo} done); nothing trained (--dry-run)")
        return 0
    try:
        load_reference(setup.ref_dir)
        launcher = compare.make_launcher(a, prefix="[learning_parity]")
    except (ReferenceCodeError, ValueError, ImportError) as e:  # no checkout; a launcher setting; no submitit
        p.error(str(e))
    print_plan(setup, runs, states)
    if setup.dataset_path is None:
        from macfw.data.generate import ensure_dataset

        ensure_dataset(setup.env.base_name, setup.episodes, episode_length=setup.episode_length, seed=setup.data_seed)
    t0 = time.time()
    todo = []
    for i, r in enumerate(runs, 1):
        if states[r.name] == "done":
            print(f"[learning_parity] [{i}/{len(runs)}] {r.name}: done already ({r.result_path})", flush=True)
        else:
            todo.append(r)
    from macfw.launch import SlurmError

    try:
        failures = train(todo, launcher) if todo else {}
    except SlurmError as e:
        p.error(str(e))
    except KeyboardInterrupt:
        raise SystemExit(
            "[learning_parity] interrupted: the runs were stopped (macfw's runs saved a checkpoint); "
            "re-run the same command to go on"
        ) from None
    result = collect(setup, failures)
    result["settings"] = {ag: settings_rows(setup, ag, reference_config_plain(setup, ag)[0]) for ag in setup.agents}
    result["wall_time_s"] = time.time() - t0
    md = table_md(result)
    setup.out.mkdir(parents=True, exist_ok=True)
    _write_json(setup.out / "learning_parity.json", result)
    if a.json is not None:
        _write_json(a.json, result)
    (setup.out / "table.md").write_text(md)
    print()
    print(md)
    print(
        f"[learning_parity] wrote {setup.out / 'learning_parity.json'}, {setup.out / 'table.md'}"
        + (f", {a.json}" if a.json is not None else "")
        + f" ({time.time() - t0:.0f} s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
