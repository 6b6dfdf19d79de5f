"""The authors' side of ``experiments/learning_parity.py`` (issue 29): one agent and one seed trained by the
MAC authors' own code and data pipeline, evaluated by macfw's evaluation.

    python experiments/learning_parity_ref.py --reference-dir DIR --agent mopo \\
        --env cube-single-play-singletask-task2-v0 --dataset-path FILE.npz --seed 0 --steps N \\
        --eval-every E --eval-episodes 15 --hidden 256,256 --batch-size 256 --eval-batch 8 --workdir RUN_DIR \\
        [--rollout-freq 1000] [--rollout-starts 50000]

``learning_parity.py`` starts it, one process per (agent, seed); it is not meant to be run by hand.
The authors' code (kwanyoungpark/MAC) is imported from ``DIR`` (``parity_cases.common.load_reference``),
never copied. Their ``main.py`` and ``main_mbpo.py`` import a module missing from their repository
and need wandb, so this file runs its own loop that mirrors theirs, line for line where it matters:

* data: their ``envs.env_utils.make_env_and_datasets(env_name, dataset_path)`` (OGBench's loader,
  actions clipped to 1 - 1e-5), observation (and ``oracle_reps``) scaling from the validation split's
  min/max (``main.py``'s ``scale``, keys present only), ``<dataset_class>(Dataset.create(scale=scale,
  **train), config)``; ``random.seed(seed)``, ``np.random.seed(seed)``; the agent from their
  ``create(seed, train_dataset.sample(1), config)``;
* LEQ (``main.py``): every step ``agent.update(train_dataset.sample(batch_size))``;
* MOPO, MOBILE (``main_mbpo.py``): ``rng = PRNGKey(seed)``; the fake buffer prefilled with
  ``mb_retain_epoch`` rollout rounds of the untrained agent from ``mb_batch_size`` dataset states,
  built with ``ReplayBuffer(Dataset.create(scale=scale, **fake))`` (which normalises its observations
  a second time: their defect, kept) and marked full; every ``mb_rollout_freq`` steps one more round
  (``add_batch``); every step ``agent.update(real_batch, fake_batch)`` with ``batch_size *
  mb_batch_ratio`` real and the rest fake transitions.

Their config: the agent's ``get_config()`` with the sizes mapped as the parity cases map them
(``parity_cases.mopo.reference_config``, ``parity_cases.leq.ref_config``: every hidden-dims field =
``--hidden``, their ensemble sizes and horizons), ``batch_size = --batch-size``, and, for single-task
data, ``dataset_class = 'CDataset'`` (their class without goals: OGBench's single-task rewards and
masks; the default ``GCDataset`` would relabel goal rewards). ``main_mbpo.py``'s flags keep their
defaults (:data:`MBPO_FLAGS`) except ``--rollout-freq`` (``mb_rollout_freq``) and ``--rollout-starts``
(``mb_batch_size``). Two places differ from their entry points, both only so that it runs:
``main_mbpo.py``'s ``scale`` reads ``oracle_reps`` unguarded, a KeyError on single-task data, so the
scale here has ``main.py``'s guard (``if k in val_dataset``); and the evaluation is macfw's
(:func:`macfw.evaluation.evaluate`, the same environments, episode seeds and episodes-in-flight as
macfw's run), not their ``utils/evaluation.py``: their agent acts through :class:`ReferenceActor`
(their ``sample_actions`` at temperature 0, their ``eval_temperature`` default, on their normalised
observations and goals; a flattened chunk of ``k * act_dim`` actions is executed whole, as their
evaluation does).

Writes ``--out``: ``{"impl": "reference", "agent", "seed", "steps": [...], "success": [...] (%, one per
evaluation), "per_task_success": [...], "metrics": [...] (their update's scalar metrics at each
evaluation), "config": {their config}, "mbpo": {main_mbpo flags or null}, "wall_time_s"}``
(default ``--workdir``'s ``result.json``); with ``--workdir``, then ``summary.json`` (the final success as a
fraction), which :mod:`macfw.launch`'s launchers take as the sign that the run finished, as for a
``macfw.run`` workdir. SIGTERM (Ctrl-C in the harness, a SLURM preemption or requeue) stops the run
with exit 0 and nothing written: the authors' loop has no checkpoint, so a restarted run trains from
step 0 (give SLURM jobs a time limit above one whole run).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import random
import re
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from parity_cases.common import ReferenceCodeError, load_reference  # noqa: E402

#: Agents the learning-parity harness covers, and which of the authors' entry points trains each one.
AGENT_LOOPS = {"mopo": "main_mbpo.py", "mobile": "main_mbpo.py", "leq": "main.py"}

#: ``main_mbpo.py``'s flag defaults (MOPO, MOBILE): rollout starts per round, rounds kept, gradient steps
#: between rounds, real fraction of each batch.
MBPO_FLAGS: dict[str, Any] = {
    "mb_batch_size": 50000,
    "mb_retain_epoch": 5,
    "mb_rollout_freq": 1000,
    "mb_batch_ratio": 0.5,
}

#: Their ``main.py`` / ``main_mbpo.py`` flag ``eval_temperature`` (default 0: the actor's mode).
EVAL_TEMPERATURE = 0.0

_ENV_NAME = re.compile(
    r"^(?P<env>[a-z0-9-]+?)-(?P<type>play|navigate|stitch|explore|noisy)-"
    r"(?:(?P<single>singletask)(?:-task(?P<task>\d+))?|(?P<oracle>oraclerep))-v0$"
)


@dataclasses.dataclass(frozen=True)
class EnvName:
    """An OGBench dataset/environment name taken apart.

    Attributes:
      full: as given, e.g. ``'cube-single-play-singletask-task2-v0'`` (the authors' ``--env_name``).
      env: macfw's environment, e.g. ``'cube-single'`` (``gin/envs/<env>.gin``).
      dataset_type: ``'play'``, ``'navigate'``, ...
      mode: ``'singletask'`` or ``'oraclerep'``.
      task: the single-task task (1..5), or None (OGBench's default task); None for ``'oraclerep'``.
    """

    full: str
    env: str
    dataset_type: str
    mode: str
    task: int | None

    @property
    def base_name(self) -> str:
        """The dataset file's OGBench name, e.g. ``'cube-single-play-v0'``."""
        return f"{self.env}-{self.dataset_type}-v0"


def parse_env_name(name: str) -> EnvName:
    """``'cube-single-play-singletask-task2-v0'`` -> ``EnvName(env='cube-single', dataset_type='play',
    mode='singletask', task=2)``; ``'cube-double-play-oraclerep-v0'`` -> mode ``'oraclerep'``.

    Raises:
      ValueError: a name of another form (names the value and the two accepted forms), or a task outside 1..5.
    """
    m = _ENV_NAME.match(str(name))
    if not m:
        raise ValueError(
            f"--env {name!r} is not an OGBench single-task or oracle-goal name; give "
            "'<env>-<type>-singletask-task<N>-v0' (e.g. cube-single-play-singletask-task2-v0) or "
            "'<env>-<type>-oraclerep-v0' (e.g. cube-double-play-oraclerep-v0)"
        )
    task = None if m.group("task") is None else int(m.group("task"))
    if task is not None and not 1 <= task <= 5:
        raise ValueError(f"--env {name!r}: task {task} is not an OGBench task (1..5)")
    mode = "singletask" if m.group("single") else "oraclerep"
    return EnvName(str(name), m.group("env"), m.group("type"), mode, task)


# ------------------------------------------------------------------------------ the authors' config
def reference_config(ref, agent: str, hidden: tuple[int, ...], batch_size: int, mode: str):
    """The authors' ``get_config()`` of ``agent`` as the harness runs it (an ``ml_collections.ConfigDict``):
    the parity cases' size mapping (every hidden-dims field = ``hidden``), ``batch_size`` and, for
    ``mode == 'singletask'``, ``dataset_class = 'CDataset'`` (see the module docstring).

    Raises:
      ValueError: an agent the harness does not cover (names the covered ones).
    """
    if agent not in AGENT_LOOPS:
        raise ValueError(f"unknown agent {agent!r}; the learning-parity harness covers {sorted(AGENT_LOOPS)}")
    mod = ref.agent(agent)
    if agent in ("mopo", "mobile"):
        from parity_cases.mopo import reference_config as mbpo_config

        cfg = mbpo_config(mod, tuple(hidden), batch_size)
    else:
        from parity_cases.leq import ref_config as leq_config

        cfg = leq_config(mod, tuple(hidden))
        cfg.batch_size = batch_size
    if mode == "singletask":
        cfg.dataset_class = "CDataset"
    return cfg


def config_overrides(agent: str, mode: str) -> dict[str, str]:
    """``{their config key: where the harness's value comes from}`` for the keys it sets (the rest are
    their ``get_config()`` defaults)."""
    out = {
        "actor_hidden_dims": "--hidden",
        "value_hidden_dims": "--hidden",
        "dynamics_hidden_dims": "--hidden",
        "batch_size": "--batch-size",
    }
    if mode == "singletask":
        out["dataset_class"] = "single-task data: their CDataset (no goal relabelling)"
    return out


def plain(x: Any) -> Any:
    """A config value as JSON: tuples and lists as lists, numpy scalars as numbers, others as they are."""
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


# ------------------------------------------------------------------------------ the authors' data
def load_data(ref, env_name: str, dataset_path: str, config) -> tuple[Any, dict, Any]:
    """The authors' training dataset object, their scale and the environment, as ``main.py`` builds them.

    Returns:
      ``(train_dataset, scale, env)``: ``train_dataset`` an instance of ``utils.datasets.<config.dataset_class>``
      (``sample(n)`` -> a dict of arrays with ``n`` rows); ``scale`` ``{key: {'mean', 'std', 'min', 'max'}}``
      (each ``(dim,)``) for ``'observations'`` and, where present, ``'oracle_reps'``; ``env`` their
      (OGBench) environment, unused but for its action size.
    """
    env_utils = importlib.import_module("envs.env_utils")
    datasets = importlib.import_module("utils.datasets")
    env, train, val = env_utils.make_env_and_datasets(env_name, dataset_path=dataset_path)
    scale = {
        k: {
            "mean": val[k].mean(axis=0),
            "std": val[k].std(axis=0),
            "min": val[k].min(axis=0),
            "max": val[k].max(axis=0),
        }
        for k in ("observations", "oracle_reps")
        if k in val
    }
    cls = getattr(datasets, config["dataset_class"])
    return cls(datasets.Dataset.create(scale=scale, **train), config), scale, env


# ------------------------------------------------------------------------------ acting
class ReferenceActor:
    """The authors' agent as a macfw evaluation actor (:data:`macfw.evaluation.Actor`, with a batched form).

    ``batched(obs (E, ob_dim), goals (E, goal_dim) or None, seeds (E,)) -> (E, k, act_dim)``: their
    ``normalize(scale[...], x)`` of the raw observations and goals (float32), then their
    ``sample_actions(observations, goals, seed=PRNGKey(seed_i), temperature=0)`` per row (vmapped, one jit
    per batch shape), clipped to [-1, 1]; their output of ``k * act_dim`` floats is a chunk of ``k``
    actions (``k = 1`` for MOPO, MOBILE, LEQ). ``actor(obs, goal, seed) -> (k, act_dim)``: one row.
    """

    def __init__(self, agent, scale: dict, act_dim: int, normalize: Callable):
        import jax

        self.agent, self.scale, self.act_dim, self.normalize = agent, scale, int(act_dim), normalize

        def act(agent, obs, goals, seeds):
            def one(o, g, s):
                a, _ = agent.sample_actions(
                    observations=o, goals=g, seed=jax.random.PRNGKey(s), temperature=EVAL_TEMPERATURE
                )
                return a

            return jax.vmap(one)(obs, goals, seeds)

        self._act = jax.jit(act)

    def batched(self, obs, goals, seeds) -> np.ndarray:
        o = np.asarray(self.normalize(self.scale["observations"], np.asarray(obs, np.float32)), np.float32)
        g = None
        if goals is not None:
            g = np.asarray(self.normalize(self.scale.get("oracle_reps"), np.asarray(goals, np.float32)), np.float32)
        seeds = np.asarray(seeds, np.int64).astype(np.int32)  # macfw's seeds are in [0, 2**31)
        a = np.clip(np.asarray(self._act(self.agent, o, g, seeds), np.float32), -1.0, 1.0)
        return a.reshape(a.shape[0], -1, self.act_dim)

    def __call__(self, obs, goal, seed) -> np.ndarray:
        goals = None if goal is None else np.asarray(goal)[None]
        return self.batched(np.asarray(obs)[None], goals, np.asarray([seed]))[0]


@dataclasses.dataclass
class EvalSpec:
    """How every evaluation runs (the same as macfw's run: :class:`macfw.train.EvalHook`).

    Attributes:
      env: the environment (:class:`EnvName`).
      task_ids: tasks evaluated (single-task: the trained one; oracle goals: 1..5).
      episodes: episodes per task.
      eval_seed: base seed; the evaluation at gradient step ``t`` uses ``eval_seed + t`` (macfw's
        ``train.eval_seed + step`` of a single-seed run).
      batch_size: episodes in flight (``evaluate.batch_size``; part of the result's definition).
    """

    env: EnvName
    task_ids: tuple[int, ...]
    episodes: int
    eval_seed: int
    batch_size: int


def evaluate_at(actor: ReferenceActor, spec: EvalSpec, step: int, chunk: int) -> dict:
    """macfw's evaluation of ``actor`` at gradient step ``step``: ``{"success": %, "per_task_success":
    {"task<i>": %}, "episodes"}``; a chunk of ``chunk`` actions is executed whole (their evaluation)."""
    from macfw.evaluation import evaluate

    r = evaluate(
        actor,
        spec.env.env,
        task_mode=spec.env.mode,
        task_ids=spec.task_ids,
        episodes_per_task=spec.episodes,
        execute_steps=chunk,
        seed=spec.eval_seed + step,
        batch_size=spec.batch_size,
    )
    return {
        "success": 100.0 * float(r.success),
        "per_task_success": {k: 100.0 * float(v) for k, v in r.per_task_success.items()},
        "episodes": int(r.episodes),
    }


def scalar_metrics(info) -> dict[str, float]:
    """Their update's info dict as plain floats (scalars only)."""
    import jax

    out = {}
    for k, v in jax.device_get(info).items():
        a = np.asarray(v)
        if a.size == 1:
            out[str(k)] = float(a.reshape(()))
    return out


# ------------------------------------------------------------------------------ the loops
def eval_steps(steps: int, every: int) -> list[int]:
    """The gradient steps evaluated: every multiple of ``every`` up to ``steps``, and ``steps`` (macfw's
    loop evaluates at the same steps)."""
    out = list(range(every, steps + 1, every))
    return out if out and out[-1] == steps else out + [steps]


def train_main(agent, train_dataset, batch_size: int, steps: int, at_eval: Callable) -> Any:
    """``main.py``'s loop: ``agent.update(train_dataset.sample(batch_size))`` for steps 1..``steps``;
    ``at_eval(step, agent, info)`` after each step ``at_eval`` asks for (returns True)."""
    for i in range(1, steps + 1):
        agent, info = agent.update(train_dataset.sample(batch_size))
        at_eval(i, agent, info)
    return agent


def train_mbpo(agent, train_dataset, scale: dict, config, flags: dict, seed: int, steps: int, at_eval) -> Any:
    """``main_mbpo.py``'s loop (see the module docstring): the prefilled fake buffer, a rollout round every
    ``flags['mb_rollout_freq']`` steps, ``agent.update(real_batch, fake_batch)`` every step."""
    import jax

    datasets = importlib.import_module("utils.datasets")
    rng = jax.random.PRNGKey(seed)
    fake: dict[str, list] = defaultdict(list)
    for _ in range(flags["mb_retain_epoch"]):
        rng, rollout_rng = jax.random.split(rng)
        batch = train_dataset.sample(flags["mb_batch_size"])
        for k, v in agent.rollout(batch, rollout_rng).items():
            fake[k].append(v)
    fake_data = {k: np.concatenate(v, axis=0) for k, v in fake.items()}
    fake_buffer = datasets.ReplayBuffer(datasets.Dataset.create(scale=scale, **fake_data))
    fake_buffer.size = fake_buffer.max_size
    real_bs = int(config["batch_size"] * flags["mb_batch_ratio"])
    fake_bs = config["batch_size"] - real_bs
    for i in range(1, steps + 1):
        if i % flags["mb_rollout_freq"] == 0:
            rng, rollout_rng = jax.random.split(rng)
            batch = train_dataset.sample(flags["mb_batch_size"])
            fake_buffer.add_batch(agent.rollout(batch, rollout_rng))
        agent, info = agent.update(train_dataset.sample(real_bs), fake_buffer.sample(fake_bs))
        at_eval(i, agent, info)
    return agent


# ------------------------------------------------------------------------------ the command
def _hidden(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(
            f"--hidden must be comma-separated positive sizes such as 256,256; got {text!r}"
        )
    return out


def build_parser() -> argparse.ArgumentParser:
    """The worker's flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", required=True, help="a checkout of kwanyoungpark/MAC")
    p.add_argument("--agent", required=True, choices=sorted(AGENT_LOOPS))
    p.add_argument("--env", required=True, help="e.g. cube-single-play-singletask-task2-v0")
    p.add_argument("--dataset-path", required=True, help="the OGBench-format NAME.npz (NAME-val.npz beside it)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, required=True, help="gradient steps")
    p.add_argument("--eval-every", type=int, required=True, help="gradient steps between evaluations")
    p.add_argument("--eval-episodes", type=int, required=True, help="episodes per task")
    p.add_argument("--eval-batch", type=int, required=True, help="episodes in flight (evaluate.batch_size)")
    p.add_argument("--eval-seed", type=int, required=True, help="the evaluation at step t uses eval_seed + t")
    p.add_argument("--hidden", type=_hidden, required=True, help="hidden sizes of every network, e.g. 256,256")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--rollout-freq", type=int, default=MBPO_FLAGS["mb_rollout_freq"], help="mb_rollout_freq")
    p.add_argument("--rollout-starts", type=int, default=MBPO_FLAGS["mb_batch_size"], help="mb_batch_size")
    p.add_argument("--out", type=Path, default=None, help="the result JSON (default WORKDIR/result.json)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="the run's folder: result.json, then summary.json (macfw.launch's sign of a finished run)",
    )
    return p


class Stopped(Exception):
    """SIGTERM arrived (Ctrl-C in ``learning_parity.py``, a SLURM preemption or requeue)."""


def _stop_on_sigterm(signum, frame) -> None:
    raise Stopped()


def main(argv=None) -> int:
    """Train and evaluate one (agent, seed) with the authors' code; write ``--out`` (and, with ``--workdir``,
    ``summary.json`` after it). SIGTERM stops the run with exit 0 and writes nothing: the authors' loop
    keeps no checkpoint, so a restarted run trains from step 0."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.out is None and a.workdir is None:
        p.error("give --workdir DIR (writes DIR/result.json and DIR/summary.json) or --out FILE.json")
    if a.out is None:
        a.out = a.workdir / "result.json"
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return _main(a)
    except Stopped:
        print(
            f"[reference] {a.agent} seed {a.seed}: SIGTERM, stopped without a result (the authors' loop keeps "
            "no checkpoint: a restart trains from step 0)",
            flush=True,
        )
        return 0


def _main(a: argparse.Namespace) -> int:
    t0 = time.time()
    env = parse_env_name(a.env)
    try:
        ref = load_reference(a.reference_dir)
    except ReferenceCodeError as e:
        raise SystemExit(f"learning_parity_ref.py: {e}") from None
    from macfw import _threefry

    _threefry.unroll_threefry_on_cpu(False)  # their programs as their own JAX lowers them (parity_cases.common)
    from macfw.data.ogbench_data import default_task_id

    config = reference_config(ref, a.agent, a.hidden, a.batch_size, env.mode)
    datasets = importlib.import_module("utils.datasets")
    train_dataset, scale, ref_env = load_data(ref, env.full, a.dataset_path, config)
    act_dim = int(ref_env.action_space.shape[-1])
    ref_env.close()
    random.seed(a.seed)
    np.random.seed(a.seed)
    cls = ref.agent(a.agent)
    agent_cls = {"mopo": "MOPOAgent", "mobile": "MOBILEAgent", "leq": "LEQAgent"}[a.agent]
    agent = getattr(cls, agent_cls).create(a.seed, train_dataset.sample(1), config)
    if env.mode == "singletask":
        task_ids: tuple[int, ...] = (env.task if env.task is not None else default_task_id(env.env),)
    else:
        task_ids = (1, 2, 3, 4, 5)
    spec = EvalSpec(env, task_ids, a.eval_episodes, a.eval_seed, a.eval_batch)
    due = set(eval_steps(a.steps, a.eval_every))
    out: dict[str, Any] = {
        "impl": "reference",
        "agent": a.agent,
        "seed": a.seed,
        "env": a.env,
        "steps": [],
        "success": [],
        "per_task_success": [],
        "metrics": [],
    }

    def at_eval(step: int, agent_, info) -> None:
        if step not in due:
            return
        actor = ReferenceActor(agent_, scale, act_dim, datasets.normalize)
        chunk = int(config.get("action_chunking", 1) or 1)
        r = evaluate_at(actor, spec, step, chunk)
        out["steps"].append(step)
        out["success"].append(r["success"])
        out["per_task_success"].append(r["per_task_success"])
        out["metrics"].append(scalar_metrics(info))
        print(f"[reference] {a.agent} seed {a.seed} step {step}: success {r['success']:.1f}%", flush=True)

    flags = None
    if AGENT_LOOPS[a.agent] == "main_mbpo.py":
        flags = dict(MBPO_FLAGS, mb_rollout_freq=a.rollout_freq, mb_batch_size=a.rollout_starts)
        train_mbpo(agent, train_dataset, scale, config, flags, a.seed, a.steps, at_eval)
    else:
        train_main(agent, train_dataset, config["batch_size"], a.steps, at_eval)
    out["config"] = {k: plain(v) for k, v in config.to_dict().items()} if hasattr(config, "to_dict") else {}
    out["mbpo"] = flags
    out["wall_time_s"] = time.time() - t0
    from macfw.logs import write_json_atomic

    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out, out)
    if a.workdir is not None:  # written last: a run with summary.json has its result
        summary = {
            "impl": "reference",
            "agent": a.agent,
            "seed": a.seed,
            "step": out["steps"][-1],
            "success": out["success"][-1] / 100.0,
            "wall_time_s": out["wall_time_s"],
        }
        a.workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(a.workdir / "summary.json", summary)
    print(f"[reference] wrote {a.out} ({out['wall_time_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
