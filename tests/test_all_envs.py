"""Every environment of the paper's two tables (issue 28, item 3): gin/envs/*.gin, generation of every
OGBench manipulation environment (cube-octuple and puzzle-4x5 made and loaded here), the one-line error
for locomotion ('navigate') data that cannot be generated, and OGBench's official humanoidmaze files
(one file, and a directory of 4001-step shards sampled by shard rotation) loading and training.

The humanoidmaze files are written here in the official format of OGBench's
``data_gen_scripts/generate_locomaze.py`` (``observations``, ``actions``, ``qpos``, ``qvel`` float32,
``terminals`` bool at each episode's last step; no ``button_states``), sizes taken from the
environment itself, contents random but plausible (the x-y position, ``qpos[:, :2]``, a random walk).
Each training run ends with one evaluation episode (task 1) on OGBench's real humanoidmaze environment,
which the loop always runs at the end (``EvalHook``: no binding skips it); it lasts the environment's own
time limit (2000 steps for humanoidmaze-medium, 4000 for giant) since an untrained agent never reaches
the goal. Measured on 2 busy CPU cores: the simulator alone 2.3 s (medium) and 3.5 s (giant) per
episode; each whole tiny-GCIQL run 20-40 s (compilation included), so the giant run is marked slow.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, cast

import gin
import numpy as np
import pytest

from macfw.data import generate as gen
from macfw.data.ogbench_data import DatasetError, OGBenchDataset

REPO = Path(__file__).resolve().parents[1]
#: The paper's tables (DESIGN §11): goal-conditioned and single-task environments.
PAPER_ENVS = (
    "cube-single",
    "cube-double",
    "cube-octuple",
    "scene",
    "puzzle-3x3",
    "puzzle-4x4",
    "puzzle-4x5",
    "humanoidmaze-medium",
    "humanoidmaze-giant",
)
LENGTH = 60


@contextlib.contextmanager
def _quiet():
    """OGBench's environments warn about float32 casts and a missing DISPLAY: not the test's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _load_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ============================================================================ gin/envs and the env list
def _env_bindings(env: str) -> dict:
    """The OGBenchDataset bindings of gin/envs/<env>.gin, parsed by Gin after the agent's file."""
    import macfw.run

    gin.clear_config()
    try:
        macfw.run.parse_gin([str(REPO / "gin/baselines/gciql.gin"), str(REPO / f"gin/envs/{env}.gin")], [])
        ds = OGBenchDataset()
    finally:
        gin.clear_config()
    return dict(
        env_name=ds.env_name,
        dataset_type=ds.dataset_type,
        num_episodes=ds.num_episodes,
        episode_length=ds.episode_length,
        rotation_interval=ds.rotation_interval,
        task_id=ds.task_id,
    )


@pytest.mark.parametrize("env", PAPER_ENVS + ("puzzle-4x6",))
def test_every_paper_environment_has_a_gin_file_naming_an_ogbench_environment(env):
    b = _env_bindings(env)
    assert b["env_name"] == env and b["task_id"] is None
    OGBenchDataset(env_name=b["env_name"]).check_env()  # registered with OGBench
    if env.startswith("humanoidmaze"):
        # OGBench's navigate data: 1000 episodes of 2001 (medium) / 4001 (giant) steps; the authors rotate
        # humanoidmaze shards every 4000 gradient steps
        assert b["dataset_type"] == "navigate" and b["rotation_interval"] == 4000
        assert b["episode_length"] == {"humanoidmaze-medium": 2001, "humanoidmaze-giant": 4001}[env]
    else:
        assert b["dataset_type"] == "play" and b["episode_length"] == 1001 and b["rotation_interval"] == 1000
        # OGBench's own play-dataset sizes (data_gen_scripts/commands.sh)
        assert b["num_episodes"] == {"puzzle-4x5": 3000, "puzzle-4x6": 5000}.get(env, 1000)
        gen.dataset_filename(f"{env}-play-v0", 1, LENGTH, 0)  # generatable


def test_generation_covers_every_ogbench_manipulation_environment():
    """SUPPORTED_ENVS == OGBench's registered state-based manipulation environments (the visual-*
    variants excepted: image observations); an environment OGBench adds fails here."""
    import gymnasium
    import ogbench.manipspace  # noqa: F401

    registered = {
        k[:-3]
        for k, spec in gymnasium.registry.items()
        if "manipspace" in str(spec.entry_point) and k.endswith("-v0") and "singletask" not in k
    }
    state_based = {e for e in registered if not e.startswith("visual-")}
    assert state_based == set(gen.SUPPORTED_ENVS), sorted(state_based ^ set(gen.SUPPORTED_ENVS))
    assert "cube-octuple" in state_based and {"puzzle-4x5", "puzzle-4x6"} <= state_based
    with pytest.raises(DatasetError, match="state-based"):
        gen.dataset_filename("visual-cube-double-play-v0", 1, LENGTH, 0)


def test_cube_octuple_stacking_probability_is_ogbench_uniform_0_to_0_35():
    """OGBench's generate_manipspace.py draws p_stack ~ U(0.0, 0.35) per cube-octuple episode."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        draws = np.array([gen._draw_p_stack("cube-octuple") for _ in range(2000)])
    finally:
        np.random.set_state(state)
    assert draws.min() >= 0.0 and draws.max() <= 0.35
    assert draws.min() < 0.01 and draws.max() > 0.34  # spans the interval (not cube-double's 0.25, not 0.5)
    assert abs(draws.mean() - 0.175) < 0.01


# ============================================================================ generation of the new ones
@pytest.fixture(scope="module")
def octuple(tmp_path_factory):
    """cube-octuple: 2 training episodes of 60 steps (+1 validation episode) by the command line, in the
    layout of its cache (so OGBenchDataset finds it)."""
    cache = tmp_path_factory.mktemp("octuple-cache")
    with _quiet():
        gen.main(
            [
                "--dataset",
                "cube-octuple-play-v0",
                "--episodes",
                "2",
                "--episode-length",
                str(LENGTH),
                "--workers",
                "1",
                "--out",
                str(cache / "datasets"),
                "--no-progress",
            ]
        )
    return cache


@pytest.mark.slow
def test_cube_octuple_generates_and_loads_through_ogbench_and_macfw(octuple):
    import ogbench

    path = octuple / "datasets" / gen.dataset_filename("cube-octuple-play-v0", 2, LENGTH, 0)
    data = _load_npz(path)
    n = 2 * LENGTH
    assert set(data) == {"observations", "actions", "terminals", "qpos", "qvel"}
    assert data["observations"].shape == (n, 91) and data["actions"].shape == (n, 5)
    assert data["qpos"].shape == (n, 14 + 8 * 7)  # arm/gripper, then 8 free cubes of 7
    assert np.flatnonzero(data["terminals"]).tolist() == [LENGTH - 1, n - 1]
    cubes = data["qpos"][:, 14:].reshape(n, 8, 7)[:, :, :3]
    assert np.abs(cubes[LENGTH - 1] - cubes[0]).max() > 1e-3  # the oracle moved a cube in 60 steps

    with _quiet():
        env, train, val = cast(  # (ogbench's return type is a union over its env_only / dataset_only flags)
            "tuple[Any, dict, dict]",
            ogbench.make_env_and_datasets(
                "cube-octuple-play-oraclerep-v0", dataset_path=str(path), compact_dataset=True
            ),
        )
    env.close()
    assert train["oracle_reps"].shape == (n, 24) and val["observations"].shape == (LENGTH, 91)
    np.testing.assert_allclose(train["oracle_reps"][:, :3], (cubes[:, 0] - [0.425, 0, 0]) * 10, rtol=1e-5, atol=1e-5)

    for mode, goal_dim in (("oraclerep", 24), ("singletask", 0)):
        with _quiet():
            loaded = OGBenchDataset(
                env_name="cube-octuple", task_mode=mode, num_episodes=2, episode_length=LENGTH, cache_dir=str(octuple)
            ).load(5)
        assert (loaded.spec.ob_dim, loaded.spec.act_dim, loaded.spec.goal_dim) == (91, 5, goal_dim)
        assert loaded.num_transitions == n
    assert {p.name for p in (octuple / "datasets").iterdir()} == {path.name, gen.val_dataset_path(path).name}


@pytest.mark.slow
def test_puzzle_4x5_generates_and_loads(tmp_path):
    with _quiet():
        loaded = OGBenchDataset(
            env_name="puzzle-4x5",
            task_mode="oraclerep",
            num_episodes=1,
            episode_length=LENGTH,
            cache_dir=str(tmp_path),
            workers=1,
        ).load(5)
    data = _load_npz(tmp_path / "datasets" / gen.dataset_filename("puzzle-4x5-play-v0", 1, LENGTH, 0))
    assert data["button_states"].shape == (LENGTH, 20) and set(np.unique(data["button_states"])) <= {0, 1}
    assert (loaded.spec.ob_dim, loaded.spec.act_dim, loaded.spec.goal_dim) == (99, 5, 20)  # goal: the 20 buttons


# ============================================================================ locomotion: one clear line
def _assert_locomotion_message(msg: str, name: str):
    assert "\n" not in msg
    for needle in (
        "expert policies",
        "a download",
        f"https://rail.eecs.berkeley.edu/datasets/ogbench/{name}.npz",
        f"{name}-val.npz",
        "OGBenchDataset.dataset_path",
        f"{name}-000.npz",
    ):
        assert needle in msg, (needle, msg)


@pytest.mark.slow
def test_generating_navigate_data_is_one_line_from_the_command_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "macfw.data.generate",
            "--dataset",
            "humanoidmaze-medium-navigate-v0",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m macfw.data.generate: error: Cannot generate"), r.stderr
    _assert_locomotion_message(lines[0], "humanoidmaze-medium-navigate-v0")
    assert "100m" not in lines[0]  # OGBench publishes no 100M humanoidmaze-medium directory
    assert not list(tmp_path.iterdir())
    # giant: OGBench's 100M directory is named too; a sharded request is refused the same way
    giant = gen.locomotion_data_message("humanoidmaze-giant-navigate-oraclerep-v0")
    _assert_locomotion_message(giant, "humanoidmaze-giant-navigate-v0")
    assert "https://rail.eecs.berkeley.edu/datasets/ogbench/humanoidmaze-giant-navigate-100m-v0/" in giant
    with pytest.raises(DatasetError, match="expert policies"):
        gen.generate_shards("humanoidmaze-giant-navigate-v0", tmp_path / "s", 2, workers=1, progress=False)
    assert not (tmp_path / "s").exists()


def test_a_run_without_a_dataset_path_for_navigate_data_stops_with_one_line(tmp_path, capsys):
    import macfw.run

    rc = macfw.run.main(
        [
            "--gin_file",
            str(REPO / "gin/baselines/gciql.gin"),
            "--gin_file",
            str(REPO / "gin/envs/humanoidmaze-medium.gin"),
            "--gin_bindings",
            "train.progress = False",
            "--workdir",
            str(tmp_path / "run"),
        ]
    )
    gin.clear_config()
    out = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("macfw: error: Cannot generate"), out.err
    _assert_locomotion_message(lines[0], "humanoidmaze-medium-navigate-v0")
    # the env file's dataset_type forgotten: the message says which type OGBench has
    with pytest.raises(DatasetError, match="no 'play' data for 'humanoidmaze-medium'.*dataset_type = 'navigate'"):
        OGBenchDataset(env_name="humanoidmaze-medium", task_mode="oraclerep", cache_dir=str(tmp_path)).load(5)
    assert not (tmp_path / "datasets").exists()


# ============================================================================ official humanoidmaze files
def _humanoid_sizes(env: str) -> tuple[int, int, int, int]:
    import ogbench

    with _quiet():
        e = cast(Any, ogbench.make_env_and_datasets(f"{env}-navigate-v0", env_only=True))  # (the env alone)
    try:
        return (e.observation_space.shape[0], e.action_space.shape[0], e.unwrapped.model.nq, e.unwrapped.model.nv)
    finally:
        e.close()


def _navigate_episodes(rng, sizes, episodes: int, length: int) -> dict:
    ob_dim, act_dim, nq, nv = sizes
    out = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    for _ in range(episodes):
        qpos = rng.normal(0, 0.3, (length, nq))
        qpos[:, :2] = rng.uniform(0, 20, 2) + np.cumsum(rng.normal(0, 0.05, (length, 2)), axis=0)  # x-y walk
        qvel = rng.normal(0, 1, (length, nv))
        obs = rng.normal(0, 1, (length, ob_dim))
        obs[:, :2] = qpos[:, :2]
        terminals = np.zeros(length, bool)
        terminals[-1] = True
        for k, v in zip(out, (obs, np.clip(rng.normal(0, 0.5, (length, act_dim)), -1, 1), terminals, qpos, qvel)):
            out[k].append(v)
    return {k: np.concatenate(v).astype(bool if k == "terminals" else np.float32) for k, v in out.items()}


def write_official(path: Path, env: str, episodes: int, length: int, seed: int) -> None:
    """``path`` and its ``-val`` sibling (1 episode) in the format of OGBench's generate_locomaze.py."""
    sizes = _humanoid_sizes(env)
    rng = np.random.default_rng(seed)
    np.savez_compressed(path, **_navigate_episodes(rng, sizes, episodes, length))
    np.savez_compressed(str(path).replace(".npz", "-val.npz"), **_navigate_episodes(rng, sizes, 1, length))


MEDIUM_LEN, GIANT_LEN = 2001, 4001


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """humanoidmaze-medium: one 1M-style file (2 episodes of 2001 steps); humanoidmaze-giant: a 100M-style
    directory of 2 shards (2 episodes of 4001 steps each)."""
    root = tmp_path_factory.mktemp("official")
    medium = root / "humanoidmaze-medium-navigate-v0.npz"
    write_official(medium, "humanoidmaze-medium", 2, MEDIUM_LEN, 0)
    giant = root / "humanoidmaze-giant-navigate-100m-v0"
    giant.mkdir()
    for k in range(2):
        write_official(giant / f"humanoidmaze-giant-navigate-v0-{k:03d}.npz", "humanoidmaze-giant", 2, GIANT_LEN, k + 1)
    return {"medium": medium, "giant": giant}


def test_official_humanoidmaze_file_loads(official, tmp_path):
    """oraclerep: goals are OGBench's x-y (qpos[:, :2]) scaled; no chunk start crosses a 2001-step
    episode; singletask: OGBench's relabelled rewards (0 at the goal, else -1)."""
    path = official["medium"]
    raw = _load_npz(path)
    chunk = 10
    with _quiet():
        ds = OGBenchDataset(
            env_name="humanoidmaze-medium",
            dataset_type="navigate",
            task_mode="oraclerep",
            dataset_path=str(path),
            cache_dir=str(tmp_path),
        )
        loaded = ds.load(chunk)
    assert ds.dataset_name == "humanoidmaze-medium-navigate-oraclerep-v0"
    assert (loaded.spec.ob_dim, loaded.spec.act_dim, loaded.spec.goal_dim) == (69, 21, 2)
    assert loaded.num_transitions == 2 * MEDIUM_LEN
    assert loaded.goal_scaler is not None
    np.testing.assert_allclose(np.asarray(loaded.data.goals), loaded.goal_scaler(raw["qpos"][:, :2]), atol=1e-5)
    starts = np.asarray(loaded.data.starts)
    assert len(starts) == 2 * (MEDIUM_LEN - chunk)  # t + chunk <= the episode's last row
    assert np.all(starts // MEDIUM_LEN == (starts + chunk) // MEDIUM_LEN)

    with _quiet():
        st = OGBenchDataset(
            env_name="humanoidmaze-medium",
            dataset_type="navigate",
            task_mode="singletask",
            task_id=1,
            dataset_path=str(path),
            cache_dir=str(tmp_path),
        ).load(chunk)
    assert st.spec.goal_dim == 0 and set(np.unique(np.asarray(st.data.rewards))) <= {-1.0, 0.0}


def test_official_humanoidmaze_shards_load_and_rotate(official, tmp_path):
    """The 100M-style directory through macfw.data.shards: 4001-step episodes, oracle goals = qpos[:, :2],
    shard_rotation every 4000 gradient steps (the authors' humanoidmaze interval)."""
    import jax

    from macfw.agents.base import BatchSpec
    from macfw.data.host_sampler import ShardSampler
    from macfw.data.shards import parse_shard_name

    assert parse_shard_name("humanoidmaze-giant-navigate-v0-024.npz") == ("humanoidmaze-giant-navigate-v0", 24)
    assert parse_shard_name("humanoidmaze-giant-navigate-v0-024-val.npz") is None

    with _quiet():
        ds = OGBenchDataset(
            env_name="humanoidmaze-giant",
            dataset_type="navigate",
            task_mode="oraclerep",
            dataset_path=str(official["giant"]),
            cache_dir=str(tmp_path),
            sampling="shard_rotation",
            rotation_interval=4000,
        )
        loaded = ds.load(10)
    data = loaded.data
    rows = 2 * GIANT_LEN
    assert data.num_shards == 2 and loaded.num_transitions == 2 * rows and loaded.spec.goal_dim == 2
    firsts = np.arange(4) * GIANT_LEN
    np.testing.assert_array_equal(data.traj, np.stack([firsts, firsts + GIANT_LEN - 1], axis=1))
    for k, store in enumerate(data.stores):
        raw = _load_npz(official["giant"] / f"humanoidmaze-giant-navigate-v0-{k:03d}.npz")
        np.testing.assert_array_equal(store.columns["oracle_reps"], raw["qpos"][:, :2])
        np.testing.assert_array_equal(store.columns["observations"], raw["observations"])
    assert data.rotation_interval == 4000 and "000-val.npz" in data.scaler_source

    spec = BatchSpec(chunk_len=10, gamma=0.99)
    smp = ShardSampler(data, batch_spec=spec, goal_conditioned=True, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(smp.space_of_steps(np.array([0, 3999, 4000, 7999, 8000])), [0, 0, 1, 1, 0])
    idx = smp.stack(3998, 3, 64)["idx"]  # gradient steps 3998, 3999 (shard 0) and 4000 (shard 1)
    assert np.all(idx[:2] < rows) and np.all(idx[2] >= rows)
    assert np.all(idx // GIANT_LEN == (idx + spec.chunk_len) // GIANT_LEN)  # inside one 4001-step episode


def _train(tmp_path, env: str, *bindings) -> dict:
    """A tiny GCIQL run (gin/smoke_budget.gin sizes, 40 gradient steps, one evaluation episode of task 1),
    the environment file after the budget (which binds cube-single)."""
    import macfw.run

    workdir = tmp_path / "run"
    with _quiet():
        rc = macfw.run.main(
            [
                "--gin_file",
                str(REPO / "gin/baselines/gciql.gin"),
                "--gin_file",
                str(REPO / "gin/smoke_budget.gin"),
                "--gin_file",
                str(REPO / f"gin/envs/{env}.gin"),
                *[
                    x
                    for b in (
                        "train.progress = False",
                        "train.eval_task_ids = (1,)",
                        f"OGBenchDataset.cache_dir = '{tmp_path / 'cache'}'",
                        *bindings,
                    )
                    for x in ("--gin_bindings", b)
                ],
                "--workdir",
                str(workdir),
            ]
        )
    assert rc == 0
    return json.loads((workdir / "summary.json").read_text())


@pytest.mark.slow
def test_gciql_trains_on_the_official_humanoidmaze_file(official, tmp_path):
    """40 gradient steps of a tiny GCIQL (gin/smoke_budget.gin sizes) on the 1M-style file, then OGBench's
    humanoidmaze-medium evaluation (one episode, its 2000-step time limit)."""
    s = _train(tmp_path, "humanoidmaze-medium", f"OGBenchDataset.dataset_path = '{official['medium']}'")
    assert s["step"] == 40 and s["dataset"] == "humanoidmaze-medium-navigate-oraclerep-v0"
    assert s["num_transitions"] == 2 * MEDIUM_LEN and s["spec"]["goal_dim"] == 2 and s["episodes"] == 1
    rows = (tmp_path / "run" / "eval.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "mean_length" and float(rows[-1].split(",")[-1]) <= 2000


@pytest.mark.slow
def test_gciql_trains_on_official_humanoidmaze_giant_shards_by_rotation(official, tmp_path):
    """The same run on the 100M-style directory of 4001-step shards, sampled on the host one shard at a
    time (the next every 20 gradient steps here), then OGBench's humanoidmaze-giant evaluation (4000 steps)."""
    s = _train(
        tmp_path,
        "humanoidmaze-giant",
        f"OGBenchDataset.dataset_path = '{official['giant']}'",
        "OGBenchDataset.sampling = 'shard_rotation'",
        "OGBenchDataset.rotation_interval = 20",
    )
    assert s["step"] == 40 and s["dataset"] == "humanoidmaze-giant-navigate-oraclerep-v0"
    assert s["num_transitions"] == 4 * GIANT_LEN and s["spec"]["goal_dim"] == 2
    assert s["data"]["sharded"] and s["data"]["num_shards"] == 2 and s["data"]["sampling"] == "shard_rotation"
    assert s["data"]["rotation_interval"] == 20
