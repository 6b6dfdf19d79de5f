"""The paper's two tables as data: every cell, and the authors' settings of each with its source.

DESIGN §8 lists the paper's headline tables and §11 reads its protocol cell by cell. This module
declares both tables (:data:`TABLES`): the environments, tasks, agents, seeds, evaluation episodes
and gradient steps, and, as Gin bindings, every setting by which a cell differs from its agent's Gin
file (``gin/mac.gin``, ``gin/baselines/<agent>.gin``), each with the line of the authors' code or
README it comes from. ``experiments/compare.py --protocol singletask|goalconditioned`` runs the
cells; :func:`cell_config` gives the Gin files and bindings of one run and :func:`operative_bindings`
the whole configuration they resolve to (``"MAC.gamma": 0.999``).

Sources (fetched snapshots of the public repositories):

* ``MAC``: kwanyoungpark/MAC, the MAC authors' code (``agents/<agent>.py`` ``get_config``,
  ``main.py`` and ``main_mbpo.py`` flags, README commands).
* ``HR``: seohongpark/horizon-reduction, on which the MAC code is built; its README section
  "Reproducing the main results" gives the exact command of every goal-conditioned baseline run on
  cube-octuple, puzzle-4x5, puzzle-4x6 and humanoidmaze-giant, and states that "the default
  hyperparameters in the code are set based on the puzzle-4x5 task".
* ``FQL``: seohongpark/fql, README commands for OGBench (one ``--agent.alpha`` per environment).

A cell is (table, agent, environment, task). Single-task cells train one run per task (the task
picks the reward). Goal-conditioned cells of one (agent, environment) share one run per seed group,
which is evaluated on every requested task, as OGBench's protocol does: training does not depend on
the evaluation task (DESIGN §4).

Units: ``gradient_steps`` and ``rotation_interval`` in gradient steps; ``eval_episodes`` per task
and seed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Where each source lives (the repositories the settings were read from).
SOURCES = {
    "MAC": "kwanyoungpark/MAC",
    "HR": "seohongpark/horizon-reduction",
    "FQL": "seohongpark/fql",
    "DESIGN": "shared/DESIGN.md (the paper as the project reads it)",
}

#: The paper's budgets (paper budget only; smoke and quickstart budgets use their own files).
GRADIENT_STEPS = 1_000_000
EVAL_EPISODES = 15
SEEDS = (0, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One Gin binding of a cell and where it comes from.

    Attributes:
      binding: ``Configurable.parameter`` as written in Gin, e.g. ``'FQL.alpha'`` (scoped:
        ``'critic/Ensemble.num'``).
      value: the Python value (a bool, int, float, str or tuple), e.g. ``1000.0``.
      source: the authors' line it is taken from, e.g. ``'FQL README: python main.py
        --env_name=puzzle-3x3-play-singletask-v0 --agent.alpha=1000'``.
    """

    binding: str
    value: Any
    source: str

    def gin(self) -> str:
        """The binding as a Gin line, e.g. ``"FQL.alpha = 1000.0"``."""
        return f"{self.binding} = {gin_literal(self.value)}"


def gin_literal(value: Any) -> str:
    """A Python value as Gin writes it (``True``, ``0.3``, ``'min'``, ``(1, 2)``).

    Raises:
      TypeError: a value that is not a bool, int, float, str, None or tuple/list of those.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        inner = ", ".join(gin_literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    raise TypeError(f"gin_literal: cannot write {value!r} ({type(value).__name__}) as a Gin value")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Settings that apply to some (agent, environment) pairs of a table.

    Attributes:
      settings: the bindings, applied in order (a later rule overrides an earlier one).
      agents: the agents (as in ``--agents``) it applies to; None: every agent of the table.
      envs: the environments (as in ``gin/envs/``) it applies to; None: every environment.
      paper_budget_only: a budget or data setting (gradient steps, shard rotation): applied at the
        paper budget only, not at ``--budget smoke|quickstart``, which bring their own.
    """

    settings: tuple[Setting, ...]
    agents: tuple[str, ...] | None = None
    envs: tuple[str, ...] | None = None
    paper_budget_only: bool = False

    def applies(self, agent: str, env: str) -> bool:
        return (self.agents is None or agent in self.agents) and (self.envs is None or env in self.envs)


@dataclasses.dataclass(frozen=True)
class Table:
    """One of the paper's tables (DESIGN §8, §11).

    Attributes:
      name: ``'singletask'`` or ``'goalconditioned'`` (``compare.py --protocol``).
      mode: the OGBench task mode of its cells: ``'singletask'`` or ``'oraclerep'``.
      title: what the paper reports.
      envs, tasks, agents, seeds: the cells (agents as in ``compare.py --agents``).
      eval_episodes: evaluation episodes per task and seed.
      gradient_steps: gradient steps per run.
      dataset: which datasets: ``'1M'`` (OGBench's standard files) or ``'100M'`` (directories of
        shards, DESIGN §10).
      rules: the settings of its cells (see :func:`cell_settings`).
    """

    name: str
    mode: str
    title: str
    envs: tuple[str, ...]
    tasks: tuple[int, ...]
    agents: tuple[str, ...]
    seeds: tuple[int, ...]
    eval_episodes: int
    gradient_steps: int
    dataset: str
    rules: tuple[Rule, ...]


def _s(binding: str, value: Any, source: str) -> Setting:
    return Setting(binding, value, source)


# ------------------------------------------------------------------------------ single-task (1M)
_FQL_ALPHA = {  # FQL README, "FQL on state-based OGBench (default tasks)" and "(all tasks)": one alpha per env
    "cube-single": (300.0, "--env_name=cube-single-play-singletask-v0 --agent.alpha=300"),
    "cube-double": (300.0, "--env_name=cube-double-play-singletask-v0 --agent.alpha=300"),
    "scene": (300.0, "--env_name=scene-play-singletask-v0 --agent.alpha=300"),
    "puzzle-3x3": (1000.0, "--env_name=puzzle-3x3-play-singletask-v0 --agent.alpha=1000"),
    "puzzle-4x4": (1000.0, "--env_name=puzzle-4x4-play-singletask-v0 --agent.alpha=1000"),
}

_SINGLETASK_RULES = (
    Rule(
        (
            _s(
                "OGBenchDataset.task_mode",
                "singletask",
                "DESIGN §11: single-task table on OGBench's '-singletask-taskN-v0' tasks",
            ),
        )
    ),
    Rule(
        (
            _s("train.num_steps", GRADIENT_STEPS, "DESIGN §2.6, §11: 1M gradient steps"),
            _s("train.eval_episodes", EVAL_EPISODES, "MAC main.py: flags.DEFINE_integer('eval_episodes', 15, ...)"),
            _s("train.eval_interval", 100_000, "MAC main.py: flags.DEFINE_integer('eval_interval', 100000, ...)"),
            _s("OGBenchDataset.num_episodes", 1000, "DESIGN §3: OGBench's 1M-transition 'play' files (1000 x 1001)"),
        ),
        paper_budget_only=True,
    ),
    *(
        Rule((_s("FQL.alpha", a, f"FQL README: python main.py {cmd}"),), agents=("fql",), envs=(env,))
        for env, (a, cmd) in _FQL_ALPHA.items()
    ),
)

# --------------------------------------------------------------------------- goal-conditioned (100M)
_HR_CMD = "HR README (Reproducing the main results): python main.py --env_name={env}-{kind}-oraclerep-v0 ... "
_GOALS_OCTUPLE = (
    (1.0, 0.0, True),
    "--agent.actor_p_trajgoal=1.0 --agent.actor_p_randomgoal=0.0 --agent.actor_geom_sample=True",
)
_GOALS_PUZZLE = (
    (0.5, 0.5, True),
    "--agent.actor_p_trajgoal=0.5 --agent.actor_p_randomgoal=0.5 --agent.actor_geom_sample=True",
)
_GOALS_HUMANOID = (
    (1.0, 0.0, False),
    "--agent.actor_p_trajgoal=1.0 --agent.actor_p_randomgoal=0.0 --agent.actor_geom_sample=False",
)

#: Per agent and HR-listed environment: ({binding: value}, goal sampling, the command's agent flags).
_HR = {
    "gciql": {
        "cube-octuple": ({"GCIQL.alpha": 10.0}, _GOALS_OCTUPLE, "--agent=agents/gciql.py --agent.alpha=10"),
        "puzzle-4x5": ({"GCIQL.alpha": 1.0}, _GOALS_PUZZLE, "--agent=agents/gciql.py --agent.alpha=1"),
        "humanoidmaze-giant": ({"GCIQL.alpha": 0.3}, _GOALS_HUMANOID, "--agent=agents/gciql.py --agent.alpha=0.3"),
    },
    "nstep_sacbc": {
        "cube-octuple": (
            {"NStepSACBC.q_agg": "min", "NStepSACBC.alpha": 0.1, "NStepSACBC.n": 50},
            _GOALS_OCTUPLE,
            "--agent=agents/ngcsacbc.py --agent.q_agg=min --agent.alpha=0.1 --agent.subgoal_steps=50",
        ),
        "puzzle-4x5": (
            {"NStepSACBC.q_agg": "min", "NStepSACBC.alpha": 0.1, "NStepSACBC.n": 25},
            _GOALS_PUZZLE,
            "--agent=agents/ngcsacbc.py --agent.q_agg=min --agent.alpha=0.1 --agent.subgoal_steps=25",
        ),
        "humanoidmaze-giant": (
            {"NStepSACBC.q_agg": "mean", "NStepSACBC.alpha": 0.03, "NStepSACBC.n": 50},
            _GOALS_HUMANOID,
            "--agent=agents/ngcsacbc.py --agent.q_agg=mean --agent.alpha=0.03 --agent.subgoal_steps=50",
        ),
    },
    "sharsa": {
        "cube-octuple": (
            {"SHARSA.q_agg": "min", "SHARSA.n": 50},
            _GOALS_OCTUPLE,
            "--agent=agents/sharsa.py --agent.q_agg=min --agent.subgoal_steps=50",
        ),
        "puzzle-4x5": (
            {"SHARSA.q_agg": "min", "SHARSA.n": 25},
            _GOALS_PUZZLE,
            "--agent=agents/sharsa.py --agent.q_agg=min --agent.subgoal_steps=25",
        ),
        "humanoidmaze-giant": (
            {"SHARSA.q_agg": "mean", "SHARSA.n": 50},
            _GOALS_HUMANOID,
            "--agent=agents/sharsa.py --agent.q_agg=mean --agent.subgoal_steps=50",
        ),
    },
}

#: Environments of the goal-conditioned table that HR's commands do not list, and what they run.
_HR_UNLISTED = {
    "cube-double": None,  # the agent's defaults (HR: "set based on the puzzle-4x5 task")
    "puzzle-3x3": None,
    "humanoidmaze-medium": "humanoidmaze-giant",  # the humanoidmaze family's values (DESIGN §9)
}


def _kind(env: str) -> str:
    return "navigate" if env.startswith("humanoidmaze") else "play"


def _hr_rules() -> list[Rule]:
    rules = []
    for agent, per_env in _HR.items():
        for env, (binds, (goals, goal_flags), flags) in per_env.items():
            targets = (env,) + tuple(e for e, like in _HR_UNLISTED.items() if like == env)
            for target in targets:
                src = _HR_CMD.format(env=env, kind=_kind(env)) + f"{flags} {goal_flags}"
                if target != env:
                    src = f"not in HR's commands; the humanoidmaze family's values (DESIGN §9), from {env}'s: " + src
                p_traj, p_rand, geom = goals
                settings = [_s(b, v, src) for b, v in binds.items()]
                settings += [
                    _s("GoalSampling.actor_p_trajgoal", p_traj, src),
                    _s("GoalSampling.actor_p_randomgoal", p_rand, src),
                    _s("GoalSampling.actor_geom_sample", geom, src),
                ]
                rules.append(Rule(tuple(settings), agents=(agent,), envs=(target,)))
    return rules


_ROTATION_SRC = (
    "MAC main.py: flags.DEFINE_integer('dataset_replace_interval', 1000, ...) (its README's 100M commands keep it)"
)
_ROTATION_HUMANOID_SRC = (
    "HR README: every humanoidmaze-giant command has --dataset_replace_interval=4000 (the MAC README "
    "has no humanoidmaze command; the same data layout, 4001-step episodes)"
)

_GOALCONDITIONED_RULES = (
    Rule(
        (
            _s(
                "OGBenchDataset.task_mode",
                "oraclerep",
                "DESIGN §11: goal-conditioned table on '-oraclerep-v0' "
                "(MAC README: --env_name=puzzle-4x5-play-oraclerep-v0)",
            ),
        )
    ),
    Rule(
        (
            _s(
                "train.num_steps",
                GRADIENT_STEPS,
                "DESIGN §11: 1M gradient steps (the MAC main.py default is 5M; "
                "DESIGN §2.6: large runs were trained longer)",
            ),
            _s("train.eval_episodes", EVAL_EPISODES, "MAC main.py: flags.DEFINE_integer('eval_episodes', 15, ...)"),
            _s("train.eval_interval", 100_000, "MAC main.py: flags.DEFINE_integer('eval_interval', 100000, ...)"),
            _s(
                "OGBenchDataset.sampling",
                "shard_rotation",
                "MAC main.py: one shard in memory, the next every dataset_replace_interval steps (DESIGN §10)",
            ),
            _s("OGBenchDataset.rotation_interval", 1000, _ROTATION_SRC),
        ),
        paper_budget_only=True,
    ),
    Rule(
        (_s("OGBenchDataset.rotation_interval", 4000, _ROTATION_HUMANOID_SRC),),
        envs=("humanoidmaze-medium", "humanoidmaze-giant"),
        paper_budget_only=True,
    ),
    *_hr_rules(),
)

TABLES: dict[str, Table] = {
    "singletask": Table(
        name="singletask",
        mode="singletask",
        title="Single-task, OGBench's 1M-transition 'play' datasets (DESIGN §8, first table)",
        envs=("cube-single", "cube-double", "scene", "puzzle-3x3", "puzzle-4x4"),
        tasks=(1, 2, 3, 4, 5),
        agents=("mac", "fql", "mopo", "mobile", "leq", "fmpc"),
        seeds=SEEDS,
        eval_episodes=EVAL_EPISODES,
        gradient_steps=GRADIENT_STEPS,
        dataset="1M",
        rules=_SINGLETASK_RULES,
    ),
    "goalconditioned": Table(
        name="goalconditioned",
        mode="oraclerep",
        title="Goal-conditioned with oracle representations, 100M-transition datasets (DESIGN §8, second table)",
        envs=("cube-double", "cube-octuple", "puzzle-3x3", "puzzle-4x5", "humanoidmaze-medium", "humanoidmaze-giant"),
        tasks=(1, 2, 3, 4, 5),
        agents=("mac", "gciql", "nstep_sacbc", "sharsa", "mopo", "mobile", "leq", "fmpc"),
        seeds=SEEDS,
        eval_episodes=EVAL_EPISODES,
        gradient_steps=GRADIENT_STEPS,
        dataset="100M",
        rules=_GOALCONDITIONED_RULES,
    ),
}

#: The paper's success (%), (mean, std or None) per (agent, mode) and environment (DESIGN §8).
#: Single-task: mean over the 5 tasks.
PAPER = {
    ("mac", "singletask"): {
        "cube-single": (99, 2),
        "cube-double": (53, 4),
        "scene": (97, 4),
        "puzzle-3x3": (20, 0),
        "puzzle-4x4": (78, 13),
    },
    ("fql", "singletask"): {
        "cube-single": (96, None),
        "cube-double": (29, None),
        "scene": (56, None),
        "puzzle-3x3": (30, None),
        "puzzle-4x4": (17, None),
    },
    ("mobile", "singletask"): {
        "cube-single": (81, None),
        "cube-double": (1, None),
        "scene": (8, None),
        "puzzle-3x3": (12, None),
        "puzzle-4x4": (0, None),
    },
    ("mac", "oraclerep"): {
        "cube-double": (100, 1),
        "cube-octuple": (30, 6),
        "puzzle-3x3": (100, 0),
        "puzzle-4x5": (99, 3),
        "humanoidmaze-medium": (36, 2),
        "humanoidmaze-giant": (0, 0),
    },
    ("sharsa", "oraclerep"): {
        "cube-double": (95, None),
        "cube-octuple": (19, None),
        "puzzle-3x3": (100, None),
        "puzzle-4x5": (91, None),
        "humanoidmaze-medium": (95, None),
        "humanoidmaze-giant": (43, None),
    },
}


# ----------------------------------------------------------------------------------- queries
def get_table(name: str) -> Table:
    """The table called ``name``.

    Raises:
      KeyError: an unknown name (the message lists the tables).
    """
    if name not in TABLES:
        raise KeyError(f"unknown protocol {name!r}; the paper's tables: {sorted(TABLES)}")
    return TABLES[name]


def cell_settings(table: Table, agent: str, env: str, *, paper_budget: bool = True) -> list[Setting]:
    """The settings by which (``agent``, ``env``) of ``table`` differs from the agent's Gin file, in the
    order they are bound (a later binding of the same name wins; only the last is returned).

    Args:
      paper_budget: include the budget and data settings (False at ``--budget smoke|quickstart``).
    """
    out: dict[str, Setting] = {}
    for rule in table.rules:
        if rule.applies(agent, env) and (paper_budget or not rule.paper_budget_only):
            for s in rule.settings:
                out.pop(s.binding, None)
                out[s.binding] = s
    return list(out.values())


def cell_note(table: Table, agent: str, env: str) -> str:
    """Where a cell's method settings come from, in one sentence (printed by ``--dry-run``)."""
    if table.name == "singletask":
        if agent == "fql":
            return "FQL README: per-environment alpha; other values from gin/baselines/fql.gin (FQL get_config)"
        return f"the authors' get_config defaults for every environment ({agent_gin_file(agent)})"
    if agent in _HR:
        if env in _HR[agent]:
            return "HR README: the exact command for this environment"
        like = _HR_UNLISTED.get(env)
        if like:
            return f"not in HR's commands: {like}'s values (the humanoidmaze family, DESIGN §9)"
        return "not in HR's commands: the agent's defaults (HR README: set based on the puzzle-4x5 task)"
    return f"the MAC authors' get_config defaults for every environment ({agent_gin_file(agent)})"


def agent_gin_file(agent: str) -> str:
    """The agent's Gin file relative to the repository: ``gin/mac.gin`` or ``gin/baselines/<agent>.gin``."""
    return "gin/mac.gin" if agent == "mac" else f"gin/baselines/{agent}.gin"


def dataset_dirname(env: str, table: Table) -> str:
    """The official name of ``env``'s dataset for ``table``: ``cube-double-play-v0.npz`` (1M file) or
    ``cube-double-play-100m-v0`` (a directory of 100M shards, HR README)."""
    kind = _kind(env)
    return f"{env}-{kind}-100m-v0" if table.dataset == "100M" else f"{env}-{kind}-v0.npz"


# --------------------------------------------------------------------------- Gin resolution
def operative_bindings(gin_files: Iterable[str | os.PathLike], gin_bindings: Iterable[str] = ()) -> dict[str, Any]:
    """Every binding the Gin files and bindings configure, as ``{"Configurable.param": value}`` with
    macros resolved (``"MAC.gamma": 0.999``), references written ``"@Name"`` / ``"@Name()"`` (with a
    scope: ``"@critic/Ensemble"``), tuples as lists. Macro definitions themselves are left out.

    Parses with :func:`macfw.run.parse_gin` into Gin's global configuration, which it clears before
    and after.

    Raises:
      registry.UnknownComponentError, GinConfigError, FileNotFoundError: as :func:`macfw.run.parse_gin`.
    """
    import gin
    from gin import config as gin_config

    import macfw.train  # noqa: F401  (registers train())
    from macfw.run import parse_gin

    gin.clear_config()
    try:
        parse_gin([str(f) for f in gin_files], list(gin_bindings))
        config = dict(gin_config._CONFIG)  # noqa: SLF001  ((scope, selector) -> {param: value})
        out = {}
        for (scope, selector), params in sorted(config.items()):
            if selector == "gin.macro":
                continue
            name = _short(selector)
            prefix = f"{scope}/{name}" if scope else name
            for param, value in sorted(params.items()):
                out[f"{prefix}.{param}"] = _resolve(value, config)
        return out
    finally:
        gin.clear_config()


def _short(selector: str) -> str:
    """``macfw.agents.mac.MAC`` -> ``MAC``; ``macfw.train.train`` -> ``train``."""
    return selector.split(".")[-1]


def _resolve(value: Any, config: dict, depth: int = 0) -> Any:
    from gin import config as gin_config

    if depth > 32:
        raise ValueError(f"Gin macro chain too deep at {value!r}")
    if isinstance(value, gin_config.ConfigurableReference):
        scoped = value.scoped_selector  # 'GAMMA/gin.macro', 'critic/macfw.nn.ensemble.Ensemble'
        scope, _, selector = scoped.rpartition("/")
        assert value.configurable is not None  # set when the config was parsed
        if value.configurable.selector == "gin.macro":
            return _resolve(config.get((scope, "gin.macro"), {}).get("value"), config, depth + 1)
        name = f"{scope}/{_short(selector)}" if scope else _short(selector)
        return f"@{name}()" if value.evaluate else f"@{name}"
    if isinstance(value, (tuple, list)):
        return [_resolve(v, config, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, config, depth + 1) for k, v in value.items()}
    return value


def build_config(gin_files: Iterable[str | os.PathLike], gin_bindings: Iterable[str] = ()) -> tuple[Any, Any]:
    """Parse the configuration and build what ``train()`` would: ``(agent, dataset)``, each constructed
    (so every value is checked by the component's own checks) but nothing loaded or trained.

    Raises:
      ConfigError: a value out of range; the errors of :func:`operative_bindings`.
    """
    import gin

    import macfw.train  # noqa: F401
    from macfw.run import parse_gin

    gin.clear_config()
    try:
        parse_gin([str(f) for f in gin_files], list(gin_bindings))
        built = []
        for param in ("train.agent", "train.dataset"):
            ref = gin.query_parameter(param)
            built.append(ref.scoped_configurable_fn() if hasattr(ref, "scoped_configurable_fn") else ref)
        return built[0], built[1]
    finally:
        gin.clear_config()
