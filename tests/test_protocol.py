"""The paper's tables as data (macfw/protocol.py) and ``experiments/compare.py --protocol`` (issue 28).

The fact table below is written from the authors' sources, independently of macfw/protocol.py: each
row is (table, agent, environment, Gin binding, value, source). The test resolves the operative
configuration of every cell of that (agent, environment) as ``compare.py --dry-run --json`` writes it
and checks the value, so a wrong or missing setting in the protocol, an agent's Gin file or the
command builder fails here.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest

from macfw import protocol

REPO = Path(__file__).resolve().parent.parent

MAC_CFG = "kwanyoungpark/MAC agents/{}.py get_config"
HR = "seohongpark/horizon-reduction README, Reproducing the main results"
FQL_README = "seohongpark/fql README, FQL on state-based OGBench"
FQL_CFG = "seohongpark/fql agents/fql.py get_config"

#: (table, agent, env, binding, value, source). Values are as Gin resolves them (tuples as lists).
FACTS = [
    # FQL, single-task: alpha per environment (README), the rest from its get_config
    ("singletask", "fql", "cube-single", "FQL.alpha", 300.0, FQL_README + ": --agent.alpha=300"),
    ("singletask", "fql", "cube-double", "FQL.alpha", 300.0, FQL_README + ": --agent.alpha=300"),
    ("singletask", "fql", "scene", "FQL.alpha", 300.0, FQL_README + ": --agent.alpha=300"),
    ("singletask", "fql", "puzzle-3x3", "FQL.alpha", 1000.0, FQL_README + ": --agent.alpha=1000"),
    ("singletask", "fql", "puzzle-4x4", "FQL.alpha", 1000.0, FQL_README + ": --agent.alpha=1000"),
    ("singletask", "fql", "cube-double", "FQL.gamma", 0.99, FQL_CFG + ": discount=0.99"),
    ("singletask", "fql", "scene", "train.batch_size", 256, FQL_CFG + ": batch_size=256"),
    ("singletask", "fql", "puzzle-4x4", "FQL.q_agg", "mean", FQL_CFG + ": q_agg='mean'"),
    ("singletask", "fql", "cube-single", "QCritic.hidden_dims", [512] * 4, FQL_CFG + ": value_hidden_dims=(512,)*4"),
    # MAC (one config for every environment)
    ("singletask", "mac", "cube-double", "MAC.gamma", 0.999, MAC_CFG.format("mac") + ": discount=0.999"),
    ("singletask", "mac", "scene", "MAC.rollout_batch_size", 1024, MAC_CFG.format("mac") + ": rollout_batch_size=1024"),
    ("singletask", "mac", "puzzle-4x4", "train.batch_size", 1024, MAC_CFG.format("mac") + ": batch_size=1024"),
    ("goalconditioned", "mac", "puzzle-4x5", "MAC.chunk_len", 10, MAC_CFG.format("mac") + ": action_chunking=10"),
    (
        "goalconditioned",
        "mac",
        "cube-octuple",
        "RejectionSampler.num_train_candidates",
        8,
        MAC_CFG.format("mac") + ": num_samples_train=8",
    ),
    (
        "goalconditioned",
        "mac",
        "cube-double",
        "RejectionSampler.num_act_candidates",
        32,
        MAC_CFG.format("mac") + ": num_samples_test=32",
    ),
    ("goalconditioned", "mac", "humanoidmaze-giant", "MAC.horizon", 10, MAC_CFG.format("mac") + ": rollout_steps=10"),
    (
        "goalconditioned",
        "mac",
        "puzzle-3x3",
        "ChunkDynamics.hidden_dims",
        [1024] * 4,
        MAC_CFG.format("mac") + ": dynamics_hidden_dims=(1024,)*4",
    ),
    (
        "goalconditioned",
        "mac",
        "puzzle-4x5",
        "OGBenchDataset.task_mode",
        "oraclerep",
        "kwanyoungpark/MAC README: --env_name=puzzle-4x5-play-oraclerep-v0",
    ),
    (
        "goalconditioned",
        "mac",
        "puzzle-4x5",
        "OGBenchDataset.rotation_interval",
        1000,
        "kwanyoungpark/MAC main.py: dataset_replace_interval default 1000",
    ),
    (
        "goalconditioned",
        "mac",
        "cube-double",
        "train.eval_episodes",
        15,
        "kwanyoungpark/MAC main.py: eval_episodes default 15",
    ),
    # GCIQL (horizon-reduction commands; defaults set for puzzle-4x5)
    ("goalconditioned", "gciql", "cube-octuple", "GCIQL.alpha", 10.0, HR + ": gciql --agent.alpha=10"),
    (
        "goalconditioned",
        "gciql",
        "cube-octuple",
        "GoalSampling.actor_p_trajgoal",
        1.0,
        HR + ": --agent.actor_p_trajgoal=1.0",
    ),
    (
        "goalconditioned",
        "gciql",
        "cube-octuple",
        "GoalSampling.actor_p_randomgoal",
        0.0,
        HR + ": --agent.actor_p_randomgoal=0.0",
    ),
    (
        "goalconditioned",
        "gciql",
        "cube-octuple",
        "GoalSampling.actor_geom_sample",
        True,
        HR + ": --agent.actor_geom_sample=True",
    ),
    ("goalconditioned", "gciql", "puzzle-4x5", "GCIQL.alpha", 1.0, HR + ": gciql --agent.alpha=1"),
    ("goalconditioned", "gciql", "humanoidmaze-giant", "GCIQL.alpha", 0.3, HR + ": gciql --agent.alpha=0.3"),
    (
        "goalconditioned",
        "gciql",
        "humanoidmaze-giant",
        "GoalSampling.actor_geom_sample",
        False,
        HR + ": --agent.actor_geom_sample=False",
    ),
    (
        "goalconditioned",
        "gciql",
        "humanoidmaze-giant",
        "OGBenchDataset.rotation_interval",
        4000,
        HR + ": --dataset_replace_interval=4000",
    ),
    (
        "goalconditioned",
        "gciql",
        "cube-octuple",
        "OGBenchDataset.rotation_interval",
        1000,
        HR + ": --dataset_replace_interval=1000",
    ),
    ("goalconditioned", "gciql", "puzzle-4x5", "GCIQL.expectile", 0.9, MAC_CFG.format("gciql") + ": expectile=0.9"),
    # n-step SAC+BC (agents/ngcsacbc.py)
    ("goalconditioned", "nstep_sacbc", "cube-octuple", "NStepSACBC.n", 50, HR + ": ngcsacbc --agent.subgoal_steps=50"),
    ("goalconditioned", "nstep_sacbc", "cube-octuple", "NStepSACBC.alpha", 0.1, HR + ": ngcsacbc --agent.alpha=0.1"),
    ("goalconditioned", "nstep_sacbc", "puzzle-4x5", "NStepSACBC.n", 25, HR + ": ngcsacbc --agent.subgoal_steps=25"),
    (
        "goalconditioned",
        "nstep_sacbc",
        "humanoidmaze-giant",
        "NStepSACBC.alpha",
        0.03,
        HR + ": ngcsacbc --agent.alpha=0.03",
    ),
    (
        "goalconditioned",
        "nstep_sacbc",
        "humanoidmaze-giant",
        "NStepSACBC.q_agg",
        "mean",
        HR + ": ngcsacbc --agent.q_agg=mean",
    ),
    (
        "goalconditioned",
        "nstep_sacbc",
        "humanoidmaze-giant",
        "NStepSACBC.n",
        50,
        HR + ": ngcsacbc --agent.subgoal_steps=50",
    ),
    (
        "goalconditioned",
        "nstep_sacbc",
        "humanoidmaze-giant",
        "GoalSampling.actor_p_trajgoal",
        1.0,
        HR + ": --agent.actor_p_trajgoal=1.0",
    ),
    # SHARSA
    ("goalconditioned", "sharsa", "cube-octuple", "SHARSA.n", 50, HR + ": sharsa --agent.subgoal_steps=50"),
    ("goalconditioned", "sharsa", "cube-octuple", "SHARSA.q_agg", "min", HR + ": sharsa --agent.q_agg=min"),
    ("goalconditioned", "sharsa", "puzzle-4x5", "SHARSA.n", 25, HR + ": sharsa --agent.subgoal_steps=25"),
    ("goalconditioned", "sharsa", "humanoidmaze-giant", "SHARSA.q_agg", "mean", HR + ": sharsa --agent.q_agg=mean"),
    ("goalconditioned", "sharsa", "humanoidmaze-giant", "SHARSA.n", 50, HR + ": sharsa --agent.subgoal_steps=50"),
    (
        "goalconditioned",
        "sharsa",
        "humanoidmaze-giant",
        "GoalSampling.actor_p_randomgoal",
        0.0,
        HR + ": --agent.actor_p_randomgoal=0.0",
    ),
    (
        "goalconditioned",
        "sharsa",
        "humanoidmaze-giant",
        "GoalSampling.actor_geom_sample",
        False,
        HR + ": --agent.actor_geom_sample=False",
    ),
    (
        "goalconditioned",
        "sharsa",
        "humanoidmaze-giant",
        "OGBenchDataset.rotation_interval",
        4000,
        HR + ": --dataset_replace_interval=4000",
    ),
    ("goalconditioned", "sharsa", "cube-double", "SHARSA.n", 25, MAC_CFG.format("sharsa") + ": subgoal_steps=25"),
    (
        "goalconditioned",
        "sharsa",
        "puzzle-3x3",
        "GoalSampling.actor_p_trajgoal",
        0.5,
        MAC_CFG.format("sharsa") + ": actor_p_trajgoal=0.5",
    ),
    (
        "goalconditioned",
        "sharsa",
        "cube-double",
        "GoalSampling.value_p_curgoal",
        0.2,
        MAC_CFG.format("sharsa") + ": value_p_curgoal=0.2",
    ),
    # model-based baselines (main_mbpo.py flags, get_config)
    (
        "singletask",
        "mopo",
        "cube-single",
        "ModelRollouts.rollout_freq",
        1000,
        "kwanyoungpark/MAC main_mbpo.py: mb_rollout_freq default 1000",
    ),
    (
        "singletask",
        "mobile",
        "puzzle-3x3",
        "ModelRollouts.num_starts",
        50000,
        "kwanyoungpark/MAC main_mbpo.py: mb_batch_size default 50000",
    ),
    (
        "singletask",
        "mopo",
        "scene",
        "ModelRollouts.retain_rounds",
        5,
        "kwanyoungpark/MAC main_mbpo.py: mb_retain_epoch default 5",
    ),
    (
        "goalconditioned",
        "mopo",
        "cube-double",
        "ModelRollouts.real_ratio",
        0.5,
        "kwanyoungpark/MAC main_mbpo.py: mb_batch_ratio default 0.5",
    ),
    ("goalconditioned", "mopo", "puzzle-4x5", "MOPO.beta", 0.003, MAC_CFG.format("mopo") + ": beta=0.003"),
    ("singletask", "mobile", "cube-double", "MOBILE.num_samples", 5, MAC_CFG.format("mobile") + ": num_samples=5"),
    (
        "goalconditioned",
        "mobile",
        "cube-octuple",
        "ModelRollouts.rollout_length",
        5,
        MAC_CFG.format("mobile") + ": rollout_steps=5",
    ),
    (
        "goalconditioned",
        "leq",
        "puzzle-4x5",
        "LEQ.model_weight",
        0.95,
        MAC_CFG.format("leq") + ": model_batch_ratio=0.95",
    ),
    ("singletask", "leq", "scene", "dynamics/Ensemble.num", 7, MAC_CFG.format("leq") + ": num_dynamics=7"),
    ("singletask", "fmpc", "cube-double", "FMPC.future_len", 32, MAC_CFG.format("fmpc") + ": action_chunking=32"),
    (
        "goalconditioned",
        "fmpc",
        "humanoidmaze-medium",
        "FMPC.num_samples",
        64,
        MAC_CFG.format("fmpc") + ": num_samples=64",
    ),
]

#: The cells each table must hold (DESIGN §8, §11), written here independently of the protocol.
TABLE_CELLS = {
    "singletask": (
        ["mac", "fql", "mopo", "mobile", "leq", "fmpc"],
        ["cube-single", "cube-double", "scene", "puzzle-3x3", "puzzle-4x4"],
    ),
    "goalconditioned": (
        ["mac", "gciql", "nstep_sacbc", "sharsa", "mopo", "mobile", "leq", "fmpc"],
        ["cube-double", "cube-octuple", "puzzle-3x3", "puzzle-4x5", "humanoidmaze-medium", "humanoidmaze-giant"],
    ),
}


def _load_compare():
    spec = importlib.util.spec_from_file_location("experiments_compare_protocol", REPO / "experiments" / "compare.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def compare():
    return _load_compare()


@pytest.fixture(scope="module")
def dry_runs(compare, tmp_path_factory):
    """``compare.py --protocol T --dry-run --json`` of both tables (data dir: an empty folder)."""
    root = tmp_path_factory.mktemp("dry")
    out = {}
    for name in protocol.TABLES:
        path = root / f"{name}.json"
        assert (
            compare.main(
                [
                    "--protocol",
                    name,
                    "--dry-run",
                    "--json",
                    str(path),
                    "--out",
                    str(root / "out"),
                    "--data-dir",
                    str(root / "data"),
                ]
            )
            == 0
        )
        out[name] = json.loads(path.read_text())
    return out


def _default(binding: str):
    """The default of ``Configurable.param`` in its registered class or function (for a value no Gin
    file binds, e.g. a GoalSampling probability at its default)."""
    from gin import config as gin_config

    import macfw.train  # noqa: F401

    name, param = binding.rsplit(".", 1)
    selector = gin_config._REGISTRY.get_match(name.split("/")[-1])  # noqa: SLF001
    assert selector is not None, f"no configurable {name!r}"
    fn = selector.wrapped
    sig = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    default = sig.parameters[param].default
    assert default is not inspect.Parameter.empty, f"{binding} has no default and no binding"
    return default


def test_the_fact_table_is_large_and_cites_sources():
    assert len(FACTS) >= 20
    assert all(src for *_, src in FACTS)
    assert len({(t, a, e, b) for t, a, e, b, _, _ in FACTS}) == len(FACTS)


@pytest.mark.parametrize(
    "table,agent,env,binding,value,source", FACTS, ids=[f"{t[:2]}-{a}-{e}-{b}" for t, a, e, b, *_ in FACTS]
)
def test_every_cell_resolves_the_authors_setting(dry_runs, table, agent, env, binding, value, source):
    cells = [c for c in dry_runs[table] if c["agent"] == agent and c["env"] == env]
    assert len(cells) == 5, f"{table} {agent} {env}: {len(cells)} cells"
    for c in cells:
        got = c["bindings"][binding] if binding in c["bindings"] else _default(binding)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, (
            f"{table} {agent} {env} task{c['task']}: {binding} = {got!r}, the authors' {value!r} ({source})"
        )


@pytest.mark.parametrize("name", sorted(TABLE_CELLS))
def test_dry_run_json_holds_every_cell_of_the_table_once(dry_runs, name):
    agents, envs = TABLE_CELLS[name]
    cells = dry_runs[name]
    keys = [(c["agent"], c["env"], c["task"]) for c in cells]
    assert sorted(keys) == sorted((a, e, t) for a in agents for e in envs for t in range(1, 6))
    mode = "singletask" if name == "singletask" else "oraclerep"
    for c in cells:
        assert set(c) == {"agent", "mode", "env", "task", "seeds", "workdir", "command", "bindings"}
        assert c["mode"] == mode and c["seeds"] == [0, 1, 2, 3] and isinstance(c["task"], int)
        b = c["bindings"]
        assert b["OGBenchDataset.env_name"] == c["env"] and b["OGBenchDataset.task_mode"] == mode
        assert b["train.num_steps"] == 1_000_000 and b["train.num_seeds"] == 4 and b["train.seed"] == 0
        assert c["command"][1:3] == ["-m", "macfw.run"] and c["command"][-2:] == ["--workdir", c["workdir"]]
        assert not any(isinstance(v, str) and "macro" in v for v in b.values()), "a macro left unresolved"
        if mode == "singletask":
            assert b["OGBenchDataset.task_id"] == c["task"]
        else:  # one run per (agent, env) evaluates the five tasks; 100M shards in rotation
            assert b["train.eval_task_ids"] == [1, 2, 3, 4, 5]
            assert b["OGBenchDataset.sampling"] == "shard_rotation"
            assert b["OGBenchDataset.dataset_path"].endswith(
                f"{c['env']}-{'navigate' if 'humanoidmaze' in c['env'] else 'play'}-100m-v0"
            )
    workdirs = {c["workdir"] for c in cells}
    assert len(workdirs) == (len(cells) if mode == "singletask" else len(cells) // 5)
    mac = next(c for c in cells if c["agent"] == "mac")
    assert mac["bindings"]["MAC.gamma"] == 0.999 and mac["bindings"]["train.agent"] == "@MAC()"


def test_every_cell_of_both_tables_builds_at_the_paper_and_smoke_budgets(compare, tmp_path):
    """Every cell's operative config parses and its agent and dataset are constructed (each checks its
    own values); at the smoke budget the method settings stay and the budget's sizes replace the paper's."""
    n = 0
    for table in protocol.TABLES.values():
        for agent in table.agents:
            for env in table.envs:
                for budget in ("paper", "smoke"):
                    job = compare.Job(
                        agent,
                        env,
                        table.tasks if table.mode != "singletask" else 3,
                        [0, 1],
                        budget,
                        tmp_path,
                        mode=table.mode,
                        table=table,
                        data_dir=tmp_path,
                    )
                    files, binds = compare.run_config(job)
                    built_agent, dataset = protocol.build_config(files, binds)
                    assert dataset.env_name == env and dataset.task_mode == table.mode
                    expected_sampling = (
                        "shard_rotation" if (budget == "paper" and table.dataset == "100M") else "uniform"
                    )
                    assert dataset.sampling == expected_sampling
                    if budget == "smoke":
                        ops = protocol.operative_bindings(files, binds)
                        assert ops["train.num_steps"] == 40 and ops["train.batch_size"] == 32
                        for s in protocol.cell_settings(table, agent, env, paper_budget=False):
                            assert ops[s.binding] == (list(s.value) if isinstance(s.value, tuple) else s.value)
                    n += 1
    assert n == 2 * (6 * 5 + 8 * 6)


def _shipped_gin_files() -> set[str]:
    return {str(p.relative_to(REPO)) for p in (REPO / "gin").rglob("*.gin")}


def _composition(rel: str) -> list[str]:
    """How a shipped Gin file is used: after an agent file (environments, budgets, per-env values) or alone."""
    if rel.startswith("gin/envs/") or rel in ("gin/smoke_budget.gin", "gin/quickstart_budget.gin"):
        return ["gin/mac.gin", rel]
    if rel.startswith("gin/baselines/fql/"):
        return ["gin/baselines/fql.gin", rel]
    if rel == "gin/base.gin":
        return [rel, "gin/envs/cube-single.gin"]
    return [rel]


def test_every_shipped_gin_file_builds():
    for rel in sorted(_shipped_gin_files()):
        files = [str(REPO / f) for f in _composition(rel)]
        if rel == "gin/base.gin":  # no agent: the loop and the dataset only
            ops = protocol.operative_bindings(files)
            assert ops["train.dataset"] == "@OGBenchDataset()"
            continue
        if rel == "gin/slurm.gin":  # the cluster's settings: builds the launcher
            import gin

            from macfw.launch import SlurmLauncher

            try:
                assert SlurmLauncher.from_gin(files).gpus_per_job == "auto"
            finally:
                gin.clear_config()
            continue
        agent, dataset = protocol.build_config(files)
        assert agent is not None and dataset is not None, rel


def test_fql_per_environment_files_agree_with_the_protocol():
    table = protocol.TABLES["singletask"]
    for env, family in (
        ("cube-single", "cube"),
        ("cube-double", "cube"),
        ("scene", "scene"),
        ("puzzle-3x3", "puzzle"),
        ("puzzle-4x4", "puzzle"),
    ):
        ops = protocol.operative_bindings(
            [str(REPO / "gin/baselines/fql.gin"), str(REPO / f"gin/baselines/fql/{family}.gin")]
        )
        (alpha,) = [s.value for s in protocol.cell_settings(table, "fql", env) if s.binding == "FQL.alpha"]
        assert ops["FQL.alpha"] == alpha, env


def test_protocol_narrowing_and_errors(compare, tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--protocol", "singletask", "--agents", "sharsa", "--dry-run"])
    err = capsys.readouterr().err
    assert "not in the singletask table" in err and "'mac', 'fql'" in err
    path = tmp_path / "n.json"
    assert (
        compare.main(
            [
                "--protocol",
                "goalconditioned",
                "--agents",
                "mac,sharsa",
                "--envs",
                "puzzle-3x3",
                "--tasks",
                "1",
                "--seeds",
                "0",
                "--budget",
                "smoke",
                "--dry-run",
                "--json",
                str(path),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    cells = json.loads(path.read_text())
    assert [(c["agent"], c["env"], c["task"], c["seeds"]) for c in cells] == [
        ("mac", "puzzle-3x3", 1, [0]),
        ("sharsa", "puzzle-3x3", 1, [0]),
    ]
    mac = cells[0]
    # the smoke budget's env_name does not override the cell's environment; MAC in the table's mode
    assert mac["bindings"]["OGBenchDataset.env_name"] == "puzzle-3x3"
    assert mac["bindings"]["OGBenchDataset.task_mode"] == "oraclerep"
    assert mac["workdir"].endswith("runs/smoke/mac-oraclerep/puzzle-3x3-task1/seed0")
    assert cells[1]["workdir"].endswith("runs/smoke/sharsa/puzzle-3x3-task1/seed0")
    out = capsys.readouterr().out
    assert "2 runs (2 cells" in out and "differs from gin/mac.gin:" in out


def test_dry_run_estimates_accelerator_hours_from_bench_figures(compare, tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"name": "mac", "updates_per_s": 100.0}, {"name": "fql", "updates_per_s": 400.0}]))
    assert (
        compare.main(
            [
                "--protocol",
                "singletask",
                "--agents",
                "mac,fql",
                "--envs",
                "cube-single",
                "--tasks",
                "1,2",
                "--dry-run",
                "--bench",
                str(bench),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # mac: 2 runs x 4 seeds x 1e6 steps / 100 per s; fql: the same / 400 per s
    hours = 2 * 4 * 1e6 / 100 / 3600 + 2 * 4 * 1e6 / 400 / 3600
    assert f"estimated accelerator-hours: {hours:,.0f}" in out and "4 runs (4 cells" in out
    flops = compare.load_flops()
    assert set(flops.get("agents", {})) >= {a for t in protocol.TABLES.values() for a in t.agents}, (
        "experiments/paper_flops.json lacks an agent: python experiments/compare.py --count-flops"
    )


def test_gin_literal_and_cell_settings_order():
    assert protocol.gin_literal((1024,)) == "(1024,)" and protocol.gin_literal("min") == "'min'"
    assert protocol.gin_literal(True) == "True" and protocol.gin_literal((1, 2)) == "(1, 2)"
    with pytest.raises(TypeError, match="cannot write"):
        protocol.gin_literal({1: 2})
    gc = protocol.TABLES["goalconditioned"]
    # the humanoidmaze rotation interval overrides the table's 1000; not at the small budgets
    (rot,) = [
        s for s in protocol.cell_settings(gc, "mac", "humanoidmaze-medium") if s.binding.endswith("rotation_interval")
    ]
    assert rot.value == 4000 and "dataset_replace_interval=4000" in rot.source
    assert not [
        s
        for s in protocol.cell_settings(gc, "mac", "humanoidmaze-medium", paper_budget=False)
        if "rotation" in s.binding or "num_steps" in s.binding
    ]
    with pytest.raises(KeyError, match="goalconditioned"):
        protocol.get_table("gc")
