"""Generate OGBench manipulation 'play' datasets locally, with OGBench's own scripted oracles.

OGBench (Park et al., 2024, "OGBench: Benchmarking Offline Goal-Conditioned RL") distributes its
datasets as ``.npz`` files downloaded from the internet. Where there is no internet, this module
makes equivalent files itself by running the recipe of OGBench's data-generation script
(``data_gen_scripts/generate_manipspace.py`` in the OGBench repository) with the oracles shipped in
the ``ogbench`` package (``ogbench.manipspace.oracles.plan``):

* the environment is ``gymnasium.make('<env>-v0', terminate_at_goal=False, mode='data_collection',
  max_episode_steps=episode_length)``;
* 'play' data is collected by non-Markovian plan oracles (``CubePlanOracle`` for cube
  environments; cube/button/drawer/window oracles for ``scene``; ``ButtonPlanOracle`` with the
  gripper always closed for ``puzzle``) with ``noise=0.1`` and ``noise_smoothing=0.5``; whenever
  the current oracle finishes, the environment draws a new target (``set_new_target``) and the
  matching oracle takes over, so one episode chains many sub-tasks;
* the per-episode stacking probability ``p_stack`` is 0 for cube-single, U(0, 0.25) for
  cube-double, U(0.05, 0.35) for cube-triple, U(0.1, 0.5) for cube-quadruple, U(0, 0.35) for
  cube-octuple and 0.5 otherwise (unused by puzzle), as in OGBench's script; nothing else differs
  between the environments of one family (the number of cubes or buttons is the environment's);
* ``scene`` episodes in which the cube leaves the visible area (OGBench's "health check") are
  discarded and re-collected, as in OGBench's script.

Every manipulation environment OGBench registers (non-visual) is supported: cube-single, -double,
-triple, -quadruple, -octuple, scene, puzzle-3x3, -4x4, -4x5, -4x6 (:data:`SUPPORTED_ENVS`; a test
checks the list against OGBench's registry). Not generated: the ``visual-*`` variants (64 x 64
images, rendered per step), ``'noisy'`` datasets (OGBench's Markov oracles), and every locomotion
dataset (``pointmaze``/``antmaze``/``humanoidmaze``/``antsoccer``: 'navigate', 'stitch', 'explore'),
which OGBench collected with trained expert policies (a download, ``experts.tar.gz``; pointmaze
with a controller of ``generate_locomaze.py`` that macfw does not implement): asking for one raises
a :class:`~macfw.data.errors.DatasetError` that says where the official files come from
(:func:`locomotion_data_message`).

Units: an *episode* is ``episode_length`` environment steps (default 1001, OGBench's value); a
*transition* is one environment step. The training file holds ``num_episodes`` episodes and the
validation file ``max(1, num_episodes // 10)`` episodes, so a file has
``episodes * episode_length`` rows.

Differences from OGBench's script, none of which changes the data's distribution: every episode is
seeded on its own (global NumPy RNG, which the oracles use, and the environment's RNG) from
``(seed, split, episode index)``, so the result does not depend on the number of worker processes;
episodes run in parallel worker processes; ``terminals`` are stored as float32 (OGBench stores
bool; its loader casts to float32 either way); files are written atomically.

The files load with ``ogbench.make_env_and_datasets(name, dataset_path=str(path))`` for any
dataset name built on the same environment (e.g. ``cube-single-play-v0``,
``cube-single-play-singletask-task2-v0``, ``cube-single-play-oraclerep-v0``): OGBench derives the
environment from the name passed there, and the validation file from the path (``.npz`` ->
``-val.npz``).

Command line::

    python -m macfw.data.generate --dataset cube-single-play-v0 --episodes 1000 \
        [--episode-length 1001] [--seed 0] [--workers N] [--out PATH_OR_DIR]

    # a sharded dataset (OGBench's large-dataset layout; resumable, see generate_shards)
    python -m macfw.data.generate --dataset cube-double-play-v0 --shards 100 --out DIR [--episodes 1000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pathlib
import re
import socket
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, cast

import numpy as np

from macfw.data.errors import DatasetError
from macfw.diskfull import disk_full_error

__all__ = [
    "SUPPORTED_ENVS",
    "SUPPORTED_DATASET_TYPES",
    "base_dataset_name",
    "dataset_filename",
    "default_cache_dir",
    "ensure_dataset",
    "generate_dataset",
    "generate_shards",
    "locomotion_data_message",
    "main",
    "shard_filename",
    "val_dataset_path",
]

#: Environments (without the ``-v0`` suffix) whose datasets can be generated.
SUPPORTED_ENVS: tuple[str, ...] = (
    "cube-single",
    "cube-double",
    "cube-triple",
    "cube-quadruple",
    "cube-octuple",
    "scene",
    "puzzle-3x3",
    "puzzle-4x4",
    "puzzle-4x5",
    "puzzle-4x6",
)

#: Dataset types that can be generated.
SUPPORTED_DATASET_TYPES: tuple[str, ...] = ("play",)

# Per-episode cube-stacking probability: (low, high) of a uniform draw from the global NumPy RNG,
# or a float for a constant (no RNG draw), exactly as in OGBench's generate_manipspace.py.
_P_STACK: dict[str, tuple[float, float] | float] = {
    "cube-single": 0.0,
    "cube-double": (0.0, 0.25),
    "cube-triple": (0.05, 0.35),
    "cube-quadruple": (0.1, 0.5),
    "cube-octuple": (0.0, 0.35),
}
_DEFAULT_P_STACK = 0.5

_NOISE = 0.1
_NOISE_SMOOTHING = 0.5

_TRAIN, _VAL = 0, 1  # split ids, part of each episode's seed

#: OGBench's dataset server (``ogbench.utils.DATASET_URL``): ``<URL>/<name>.npz`` and ``<name>-val.npz``.
#: What a full disk during generation tells the user (files are written under temporary names and removed
#: on failure, so nothing half-written is ever read).
DISK_FULL_FIX = (
    "Free space there (or write elsewhere: --out, or MACFW_CACHE_DIR) and run the same command again: "
    "nothing half-written was kept."
)
OGBENCH_DATASET_URL = "https://rail.eecs.berkeley.edu/datasets/ogbench"
#: Locomotion datasets OGBench publishes as 100M-transition shard directories ``<URL>/<name>-100m-v0/``
#: (OGBench's README, "Additional Features"; seohongpark/horizon-reduction's README).
_LOCOMOTION_100M = ("humanoidmaze-giant-navigate",)
#: OGBench's locomotion dataset types (data_gen_scripts/generate_locomaze.py; 'path' is unpublished).
_LOCOMOTION_TYPES = ("navigate", "stitch", "explore", "path")


# --------------------------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    """Return macfw's cache directory.

    ``$MACFW_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/macfw`` if ``XDG_CACHE_HOME`` is set, else
    ``~/.cache/macfw``. The directory is not created.
    """
    env = os.environ.get("MACFW_CACHE_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "macfw"
    return pathlib.Path.home() / ".cache" / "macfw"


def base_dataset_name(name: str) -> str:
    """Map an OGBench dataset name to the name of the dataset file it loads.

    Single-task and oracle-representation variants read the same data as the plain dataset:
    ``'cube-single-play-singletask-task2-v0'``, ``'cube-single-play-singletask-v0'`` and
    ``'cube-single-play-oraclerep-v0'`` all map to ``'cube-single-play-v0'``. Other names are
    returned unchanged. (Mirrors ``ogbench.make_env_and_datasets``.)
    """
    splits = str(name).split("-")
    if "singletask" in splits:
        pos = splits.index("singletask")
        # Drop 'singletask' and an optional 'task<k>' after it, keep the version.
        return "-".join(splits[:pos] + splits[-1:])
    if "oraclerep" in splits:
        return "-".join(s for s in splits if s != "oraclerep")
    return str(name)


def _is_locomotion(env_stem: str, dataset_type: str) -> bool:
    """OGBench's rule for a locomotion environment ('maze' or 'soccer' in the name), or a locomotion
    dataset type of an environment that is not a manipulation one."""
    return (
        "maze" in env_stem
        or "soccer" in env_stem
        or (dataset_type in _LOCOMOTION_TYPES and env_stem not in SUPPORTED_ENVS)
    )


def locomotion_data_message(dataset_name: str) -> str:
    """One line: why the locomotion dataset ``dataset_name`` cannot be generated here, where OGBench's
    official files come from, and how to point ``OGBenchDataset.dataset_path`` at them.

    ``dataset_name`` is any OGBench name of it (``humanoidmaze-medium-navigate-v0``, its
    ``-oraclerep``/``-singletask`` variants); a name without a locomotion dataset type (e.g.
    ``humanoidmaze-medium-play-v0``) is answered for the ``navigate`` data of that environment.
    """
    base = base_dataset_name(str(dataset_name))
    splits = base.split("-")
    version = splits[-1] if len(splits) > 1 else "v0"
    dtype = splits[-2] if len(splits) >= 3 else ""
    wrong_type = ""
    if dtype in _LOCOMOTION_TYPES:
        env = "-".join(splits[:-2])
    else:
        env = "-".join(splits[:-1]) if len(splits) == 3 else "-".join(splits[:-2])
        if len(splits) > 3:
            wrong_type = (
                f"OGBench has no {dtype!r} data for {env!r} (its locomotion datasets are 'navigate', "
                "'stitch' and, for antmaze, 'explore'; set OGBenchDataset.dataset_type = 'navigate'). "
            )
        dtype = "navigate"
    name = f"{env}-{dtype}-{version}"
    why = (
        "OGBench's locomotion data comes from trained expert policies (SAC agents in OGBench's experts.tar.gz, "
        "a download; data_gen_scripts/generate_locomaze.py), not from scripted oracles"
        if not env.startswith("pointmaze")
        else "OGBench's pointmaze data comes from the subgoal controller of data_gen_scripts/generate_locomaze.py, "
        "which macfw does not implement"
    )
    big = ""
    stem = f"{env}-{dtype}"
    if stem in _LOCOMOTION_100M:
        big = (
            f", or the 100M-transition shards {OGBENCH_DATASET_URL}/{stem}-100m-{version}/ (wget -r -np -nH "
            f"--cut-dirs=2 -A '*.npz' URL; see seohongpark/horizon-reduction's README)"
        )
    return (
        f"{wrong_type}Cannot generate {name!r} here: {why}; macfw generates only the manipulation 'play' "
        f"data of OGBench's scripted oracles ({', '.join(SUPPORTED_ENVS)}). Download the official files from "
        f"OGBench's dataset server, {OGBENCH_DATASET_URL}/{name}.npz and {OGBENCH_DATASET_URL}/{name}-val.npz"
        f"{big}, and set OGBenchDataset.dataset_path to the .npz file (its -val.npz beside it) or to the "
        f"directory of shards {name}-000.npz, {name}-001.npz, ... (each with its -val sibling)."
    )


def _parse_dataset_name(dataset_name: str) -> tuple[str, str, str]:
    """Return (env stem e.g. 'cube-single', dataset type e.g. 'play', version e.g. 'v0').

    Raises:
        DatasetError (a ValueError, :mod:`macfw.data.errors`): a locomotion dataset (see
            :func:`locomotion_data_message`), a ``visual-*`` dataset, a malformed name, an unknown
            environment or an unsupported dataset type.
    """
    if not isinstance(dataset_name, str):
        raise DatasetError(f"dataset name must be a string, got {dataset_name!r}")
    base = base_dataset_name(dataset_name)
    splits = base.split("-")
    supported_envs = ", ".join(f"{e}-v0" for e in SUPPORTED_ENVS)
    if len(splits) >= 3 and _is_locomotion("-".join(splits[:-2]), splits[-2]):
        raise DatasetError(locomotion_data_message(base))
    if base.startswith("visual-") and base[len("visual-") :].split("-")[0] in {e.split("-")[0] for e in SUPPORTED_ENVS}:
        raise DatasetError(
            f"cannot generate {dataset_name!r}: macfw generates state-based datasets only (the "
            f"visual-* variants store 64 x 64 rendered images); use {base[len('visual-') :]!r}, or set "
            "OGBenchDataset.dataset_path to OGBench's official file"
        )
    if base.endswith("-v0") and base[: -len("-v0")] in SUPPORTED_ENVS:
        raise DatasetError(
            f"{dataset_name!r} is an environment name, not a dataset name; pass a dataset name such "
            f"as {base[:-3] + '-play-v0'!r}"
        )
    if len(splits) < 3 or not re.fullmatch(r"v\d+", splits[-1]):
        raise DatasetError(
            f"malformed dataset name {dataset_name!r}: expected '<env>-<type>-v0' such as "
            f"'cube-single-play-v0'; supported environments: {supported_envs}"
        )
    version = splits[-1]
    env_stem = "-".join(splits[:-2])
    dataset_type = splits[-2]
    if env_stem not in SUPPORTED_ENVS or version != "v0":
        raise DatasetError(
            f"unknown environment {env_stem + '-' + version!r} in dataset name {dataset_name!r}; "
            f"supported environments: {supported_envs}"
        )
    if dataset_type not in SUPPORTED_DATASET_TYPES:
        raise DatasetError(
            f"unsupported dataset type {dataset_type!r} in dataset name {dataset_name!r}; "
            f"supported types: {list(SUPPORTED_DATASET_TYPES)} (OGBench's 'noisy' data uses its Markov oracles, not "
            f"generated here); set OGBenchDataset.dataset_type, or OGBenchDataset.dataset_path to an official file"
        )
    return env_stem, dataset_type, version


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def dataset_filename(dataset_name: str, num_episodes: int, episode_length: int, seed: int) -> str:
    """File name of a generated training file, e.g. ``'cube-single-play-e1000-l1001-s0-v0.npz'``.

    ``dataset_name`` is normalised with :func:`base_dataset_name`. The matching validation file
    is :func:`val_dataset_path` of it (``...-v0-val.npz``).

    Raises:
        ValueError: unsupported dataset name, or non-positive sizes / negative seed.
    """
    env_stem, dataset_type, version = _parse_dataset_name(dataset_name)
    num_episodes = _check_int("num_episodes", num_episodes, 1)
    episode_length = _check_int("episode_length", episode_length, 2)
    seed = _check_int("seed", seed, 0)
    return f"{env_stem}-{dataset_type}-e{num_episodes}-l{episode_length}-s{seed}-{version}.npz"


def val_dataset_path(path: str | os.PathLike) -> pathlib.Path:
    """Path of the validation file that belongs to training file ``path``.

    Same rule as OGBench's loader: ``'.npz'`` is replaced by ``'-val.npz'``.
    """
    return pathlib.Path(str(path).replace(".npz", "-val.npz"))


# --------------------------------------------------------------------------------------------
# Episode collection (runs in worker processes, or in-process for workers=1)
# --------------------------------------------------------------------------------------------

_WORKER_CACHE: dict[tuple[str, int], tuple[Any, dict[str, Any], bool]] = {}


def _make_env_and_agents(env_stem: str, episode_length: int):
    """Create the data-collection environment and its oracles (cached per process)."""
    key = (env_stem, episode_length)
    if key in _WORKER_CACHE:
        return _WORKER_CACHE[key]
    with warnings.catch_warnings():
        # Headless machines: glfw warns about a missing DISPLAY on import (no rendering here);
        # gymnasium warns about float32 casting of the action-space bounds.
        warnings.filterwarnings("ignore", message=r".*DISPLAY.*")
        warnings.filterwarnings("ignore", message=r".*precision lowered.*")
        import gymnasium
        import ogbench.manipspace  # noqa: F401  (registers the environments)
        from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
        from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
        from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
        from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

        env = gymnasium.make(
            f"{env_stem}-v0",
            terminate_at_goal=False,
            mode="data_collection",
            max_episode_steps=episode_length,
        )
    kw: dict[str, Any] = dict(env=env, noise=_NOISE, noise_smoothing=_NOISE_SMOOTHING)
    if env_stem.startswith("cube"):
        agents = {"cube": CubePlanOracle(**kw)}
    elif env_stem == "scene":
        agents = {
            "cube": CubePlanOracle(**kw),
            "button": ButtonPlanOracle(**kw),
            "drawer": DrawerPlanOracle(**kw),
            "window": WindowPlanOracle(**kw),
        }
    elif env_stem.startswith("puzzle"):
        agents = {"button": ButtonPlanOracle(gripper_always_closed=True, **kw)}
    else:  # pragma: no cover - guarded by _parse_dataset_name
        raise ValueError(f"unknown environment {env_stem!r}")
    has_button_states = hasattr(env.unwrapped, "_cur_button_states")
    _WORKER_CACHE[key] = (env, agents, has_button_states)
    return _WORKER_CACHE[key]


def _draw_p_stack(env_stem: str) -> float:
    spec = _P_STACK.get(env_stem, _DEFAULT_P_STACK)
    if isinstance(spec, tuple):
        return float(np.random.uniform(*spec))
    return float(spec)


def _scene_is_healthy(qpos: np.ndarray) -> bool:
    """OGBench's scene health check: the cube stays visible unless it is in the drawer."""
    block_xyzs = qpos[:, 14:17]
    if (block_xyzs[:, 1] >= 0.29).any():
        return False  # Block goes too far right.
    if ((block_xyzs[:, 1] <= -0.3) & ((block_xyzs[:, 2] < 0.06) | (block_xyzs[:, 2] > 0.08))).any():
        return False  # Block goes too far left, without being in the drawer.
    return True


def _episode_entropy(seed: int, split: int, index: int, shard: int | None = None) -> list[int]:
    """Seed material of one episode: ``[seed, split, index]``, plus ``shard + 1`` for a shard (a
    trailing 0 would not change a SeedSequence), so shard ``k`` depends only on ``k`` and ``seed``."""
    return [seed, split, index] if shard is None else [seed, split, index, shard + 1]


def _collect_episode(task: tuple) -> tuple[int, int, dict[str, np.ndarray]]:
    """Collect one episode. ``task`` = (env_stem, episode_length, seed, split, index[, shard])."""
    env_stem, episode_length, seed, split, index = task[:5]
    shard = task[5] if len(task) > 5 else None
    env, agents, has_button_states = _make_env_and_agents(env_stem, episode_length)

    np_seed, env_seed = np.random.SeedSequence(_episode_entropy(seed, split, index, shard)).generate_state(2)
    np.random.seed(int(np_seed))
    reset_seed: int | None = int(env_seed)

    while True:  # Re-collect unhealthy scene episodes (RNG streams simply continue).
        ob, info = env.reset(seed=reset_seed)
        reset_seed = None
        p_stack = _draw_p_stack(env_stem)
        agent = agents[info["privileged/target_task"]]
        agent.reset(ob, info)

        obs, acts, terms, qpos, qvel, buttons = [], [], [], [], [], []
        done = False
        while not done:
            action = np.clip(np.asarray(agent.select_action(ob, info)), -1, 1)
            next_ob, _reward, terminated, truncated, info = env.step(action)
            done = bool(terminated or truncated)

            if agent.done:
                agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
                agent = agents[agent_info["privileged/target_task"]]
                agent.reset(agent_ob, agent_info)

            obs.append(ob)
            acts.append(action)
            terms.append(done)
            qpos.append(info["prev_qpos"])
            qvel.append(info["prev_qvel"])
            if has_button_states:
                buttons.append(info["prev_button_states"])
            ob = next_ob

        episode: dict[str, np.ndarray] = {
            "observations": np.asarray(obs, dtype=np.float32),
            "actions": np.asarray(acts, dtype=np.float32),
            "terminals": np.asarray(terms, dtype=np.float32),
            "qpos": np.asarray(qpos, dtype=np.float32),
            "qvel": np.asarray(qvel, dtype=np.float32),
        }
        if has_button_states:
            episode["button_states"] = np.asarray(buttons, dtype=np.int64)
        if env_stem != "scene" or _scene_is_healthy(np.asarray(qpos)):
            return split, index, episode


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _tmp_name(path: pathlib.Path) -> pathlib.Path:
    """``<name>.tmp-<host>-<pid>.npz``: the writer's host and process, so a clean-up can tell a killed
    writer's leftover from a live writer's file (must end in .npz: numpy appends it otherwise)."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}.npz")


def _is_stale_tmp(p: pathlib.Path) -> bool:
    """A temporary file of :func:`_save_atomic` whose writer is gone: written on this host by a process
    that no longer exists, or in the older ``<name>.tmp-<pid>.npz`` form by no living process here.
    Another host's files are left alone (that host's writer may be alive)."""
    tail = p.name.split(".npz.tmp-", 1)[1][: -len(".npz")] if p.name.endswith(".npz") else ""
    host, _, pid = tail.rpartition("-")
    if host and host != socket.gethostname():
        return False
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _save_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = _tmp_name(path)
    try:
        np.savez_compressed(tmp, **cast("dict[str, Any]", arrays))  # (numpy's stub: a key could be allow_pickle)
        os.replace(tmp, path)
    except OSError as e:  # name the file (zipfile's errors do not): a full disk's message says where
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _collect_here(tasks, results, bar) -> None:
    """Collect ``tasks`` one after the other in this process into ``results[split][index]``,
    ticking ``bar``; the global NumPy RNG state (used by the oracles) is restored afterwards."""
    rng_state = np.random.get_state()
    try:
        for task in tasks:
            split, index, episode = _collect_episode(task)
            results[split][index] = episode
            bar.update(1)
    finally:
        np.random.set_state(rng_state)


def _collect_in_pool(tasks, results, bar, workers: int) -> None:
    """Collect ``tasks`` in ``workers`` spawned worker processes into ``results[split][index]``,
    ticking ``bar``.

    Raises:
      RuntimeError: a worker process died (the message says how to guard a script's entry point).
    """
    # 'spawn', not fork: the parent may have imported JAX (not fork-safe).
    # Refer to the worker function through its importable module name (not '__main__'
    # when run with ``python -m``), so spawned children can unpickle it.
    from macfw.data.generate import _collect_episode as collect

    ctx = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        futures = [executor.submit(collect, task) for task in tasks]
        for future in as_completed(futures):
            split, index, episode = future.result()
            results[split][index] = episode
            bar.update(1)
    except BrokenProcessPool as e:
        raise RuntimeError(
            "a dataset-generation worker process died; if this was called from a script, "
            "guard its entry point with `if __name__ == '__main__':` (worker processes are "
            "spawned and re-import the main module), or pass workers=1"
        ) from e
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _concat(episodes: list) -> dict[str, np.ndarray]:
    """The episodes' arrays concatenated along the rows, per key (the keys of the first episode)."""
    return {k: np.concatenate([ep[k] for ep in episodes], axis=0) for k in episodes[0]}


def generate_dataset(
    dataset_name: str,
    out_path: str | os.PathLike,
    num_episodes: int = 1000,
    *,
    episode_length: int = 1001,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Generate an OGBench-format 'play' dataset and its validation file.

    Writes ``out_path`` (training, ``num_episodes`` episodes) and :func:`val_dataset_path` of it
    (validation, ``max(1, num_episodes // 10)`` episodes, seeded differently from the training
    episodes), each a ``np.savez_compressed`` archive with ``N = episodes * episode_length`` rows:

    - ``observations``: (N, ob_dim) float32, the observation the action was taken in;
    - ``actions``: (N, 5) float32, the oracle's action clipped to [-1, 1];
    - ``terminals``: (N,) float32, 1.0 at the last step of each episode, else 0.0;
    - ``qpos``: (N, nq) float32 and ``qvel``: (N, nv) float32, MuJoCo state before the step;
    - ``button_states``: (N, num_buttons) int64, only for ``scene`` and ``puzzle-*``.

    The validation file is written first and the training file last, each atomically, so an
    existing training file implies both files are complete. The result depends only on
    ``(dataset_name, num_episodes, episode_length, seed)``, not on ``workers``.

    Args:
        dataset_name: OGBench dataset name such as ``'cube-single-play-v0'``; single-task and
            oraclerep variants are accepted and normalised with :func:`base_dataset_name`.
        out_path: training file path; must end in ``.npz`` and contain ``.npz`` only once.
            Parent directories are created.
        num_episodes: training episodes (>= 1).
        episode_length: environment steps per episode (>= 2); OGBench uses 1001.
        seed: non-negative base seed.
        workers: worker processes (spawned); default ``os.cpu_count()``; 1 runs in-process
            (the global NumPy RNG state is restored afterwards).
        progress: show a tqdm progress bar counting episodes.

    Returns:
        ``out_path`` as a ``pathlib.Path``.

    Raises:
        ValueError: unknown environment, dataset type other than 'play', malformed name,
            ``num_episodes < 1``, ``episode_length < 2``, negative seed, ``workers < 1``, or an
            ``out_path`` not ending in ``.npz``.
    """
    env_stem, _dataset_type, _version = _parse_dataset_name(dataset_name)
    num_episodes = _check_int("num_episodes", num_episodes, 1)
    episode_length = _check_int("episode_length", episode_length, 2)
    seed = _check_int("seed", seed, 0)
    if workers is None:
        workers = os.cpu_count() or 1
    workers = _check_int("workers", workers, 1)
    out_path = pathlib.Path(out_path)
    if not str(out_path).endswith(".npz") or str(out_path).count(".npz") != 1:
        raise ValueError(
            f"out_path must end in '.npz' and contain '.npz' only once (OGBench finds the "
            f"validation file by replacing '.npz' with '-val.npz'), got {str(out_path)!r}"
        )
    val_path = val_dataset_path(out_path)
    num_val = max(1, num_episodes // 10)

    tasks = [(env_stem, episode_length, seed, _TRAIN, i) for i in range(num_episodes)]
    tasks += [(env_stem, episode_length, seed, _VAL, i) for i in range(num_val)]
    workers = min(workers, len(tasks))
    results: dict[int, list[dict[str, np.ndarray] | None]] = {
        _TRAIN: [None] * num_episodes,
        _VAL: [None] * num_val,
    }

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="episode", desc=base_dataset_name(dataset_name), disable=not progress)
    try:
        if workers == 1:
            _collect_here(tasks, results, bar)
        else:
            _collect_in_pool(tasks, results, bar, workers)
    finally:
        bar.close()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():
        out_path.unlink()  # keep "training file exists => both files complete" true meanwhile
    _save_atomic(val_path, _concat(results[_VAL]))
    results[_VAL] = []
    _save_atomic(out_path, _concat(results[_TRAIN]))
    return out_path


def ensure_dataset(
    dataset_name: str,
    num_episodes: int = 1000,
    *,
    episode_length: int = 1001,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Return the cached dataset file, generating it first if it is missing.

    The path is ``cache_dir / 'datasets' / dataset_filename(...)`` (``cache_dir`` defaults to
    :func:`default_cache_dir`). If the training or validation file is missing, prints one line and
    calls :func:`generate_dataset` (see there for the arrays, their shapes and dtypes); otherwise
    the files are reused as they are. Pass the returned path as ``dataset_path`` (a ``str``) to
    ``ogbench.make_env_and_datasets``.

    Raises:
        ValueError: as :func:`generate_dataset`.
    """
    filename = dataset_filename(dataset_name, num_episodes, episode_length, seed)
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / "datasets" / filename
    if path.exists() and val_dataset_path(path).exists():
        return path
    print(
        f"macfw: generating {num_episodes} episodes x {episode_length} steps of "
        f"{base_dataset_name(dataset_name)} (seed {seed}) into {path}",
        flush=True,
    )
    return generate_dataset(
        dataset_name,
        path,
        num_episodes,
        episode_length=episode_length,
        seed=seed,
        workers=workers,
        progress=progress,
    )


def shard_filename(dataset_name: str, index: int, num_shards: int = 1000) -> str:
    """OGBench's name of shard ``index``: ``'<env>-<type>-v0-003.npz'`` (3 digits, more when needed)."""
    env_stem, dataset_type, version = _parse_dataset_name(dataset_name)
    width = max(3, len(str(max(int(num_shards) - 1, 0))))
    return f"{env_stem}-{dataset_type}-{version}-{int(index):0{width}d}.npz"


def _pool(workers: int):
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def generate_shards(
    dataset_name: str,
    out_dir: str | os.PathLike,
    num_shards: int,
    episodes_per_shard: int = 1000,
    *,
    episode_length: int = 1001,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> list[pathlib.Path]:
    """Generate a sharded OGBench-format 'play' dataset (DESIGN §10): ``num_shards`` training shards
    ``out_dir/<env>-<type>-v0-000.npz``, ``-001.npz``, ... each with its ``-val`` sibling.

    Shard ``k`` holds ``episodes_per_shard`` training episodes and ``max(1, episodes_per_shard //
    10)`` validation episodes (the arrays of :func:`generate_dataset`), each episode seeded from
    ``(seed, split, episode index, k)`` only, so a shard is reproducible from its index and the seed
    (whatever ``num_shards`` and ``workers``). Episodes run in ``workers`` spawned worker processes
    (default ``os.cpu_count()``; 1: in this process), one shard after the other.

    Resumable: a shard whose training file exists is complete (its validation file is written
    first, each file atomically) and is kept; any other shard (missing, or killed while being
    collected or written) is redone from scratch, and leftover temporary files are deleted.

    Returns:
        The training shard paths, by index.

    Raises:
        ValueError: as :func:`generate_dataset`, or ``num_shards < 1``.
    """
    env_stem, _dataset_type, _version = _parse_dataset_name(dataset_name)
    num_shards = _check_int("num_shards", num_shards, 1)
    episodes_per_shard = _check_int("episodes_per_shard", episodes_per_shard, 1)
    episode_length = _check_int("episode_length", episode_length, 2)
    seed = _check_int("seed", seed, 0)
    if workers is None:
        workers = os.cpu_count() or 1
    workers = _check_int("workers", workers, 1)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / shard_filename(dataset_name, k, num_shards) for k in range(num_shards)]
    for p in out_dir.iterdir():  # leftovers of a killed write (see _save_atomic), not a live writer's
        if ".npz.tmp-" in p.name and _is_stale_tmp(p):
            p.unlink(missing_ok=True)
    todo = [k for k, p in enumerate(paths) if not p.exists()]
    num_val = max(1, episodes_per_shard // 10)
    if len(todo) < num_shards:
        print(
            f"macfw: {num_shards - len(todo)} of {num_shards} shard(s) already in {str(out_dir)!r}; "
            f"generating the other {len(todo)}",
            flush=True,
        )
    if not todo:
        return paths
    from tqdm import tqdm

    executor = _pool(min(workers, episodes_per_shard + num_val)) if workers > 1 else None
    try:
        for k in todo:
            tasks = [(env_stem, episode_length, seed, _TRAIN, i, k) for i in range(episodes_per_shard)]
            tasks += [(env_stem, episode_length, seed, _VAL, i, k) for i in range(num_val)]
            results: dict[int, list[dict[str, np.ndarray] | None]] = {
                _TRAIN: [None] * episodes_per_shard,
                _VAL: [None] * num_val,
            }
            bar = tqdm(total=len(tasks), unit="episode", desc=paths[k].name, disable=not progress)
            try:
                if executor is None:
                    _collect_here(tasks, results, bar)
                else:
                    from macfw.data.generate import _collect_episode as collect

                    futures = [executor.submit(collect, task) for task in tasks]
                    try:
                        for future in as_completed(futures):
                            split, index, episode = future.result()
                            results[split][index] = episode
                            bar.update(1)
                    except BrokenProcessPool as e:
                        raise RuntimeError(
                            "a dataset-generation worker process died; if this was called from a script, guard "
                            "its entry point with `if __name__ == '__main__':`, or pass workers=1"
                        ) from e
            finally:
                bar.close()
            _save_atomic(val_dataset_path(paths[k]), _concat(results[_VAL]))
            results[_VAL] = []
            _save_atomic(paths[k], _concat(results[_TRAIN]))
            del results
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see the module docstring. Prints the paths written.

    A value that cannot work (a dataset that cannot be generated, such as locomotion data; a bad size)
    ends the process with one ``<prog>: error: ...`` line on stderr and exit code 2 (no traceback);
    argparse's own usage errors print the usage first, as usual.
    """
    parser = argparse.ArgumentParser(
        prog="python -m macfw.data.generate",
        description="Generate an OGBench-format 'play' dataset (training + validation .npz files) "
        "with OGBench's scripted oracles.",
    )
    parser.add_argument("--dataset", required=True, help="OGBench dataset name, e.g. cube-single-play-v0")
    parser.add_argument(
        "--episodes", type=int, default=1000, help="training episodes (per shard with --shards; default 1000)"
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="write this many OGBench-named shards <env>-<type>-v0-000.npz, ... (with -val siblings) "
        "into the directory --out; resumable",
    )
    parser.add_argument("--episode-length", type=int, default=1001, help="steps per episode (default 1001)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument(
        "--out",
        default=None,
        help="output .npz file, or a directory for the default file name (default: <cache dir>/datasets)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    def fail(e: Exception):
        full = disk_full_error(e, fix=DISK_FULL_FIX)
        if isinstance(e, OSError) and full is None:
            raise e
        parser.exit(2, f"{parser.prog}: error: {full or e}\n")

    if args.shards is not None:
        try:
            _parse_dataset_name(args.dataset)
            out = (
                pathlib.Path(args.out).expanduser()
                if args.out is not None
                else default_cache_dir()
                / "datasets"
                / f"{base_dataset_name(args.dataset)[:-3]}-shards{args.shards}-e{args.episodes}-l{args.episode_length}"
                f"-s{args.seed}-v0"
            )
            if str(out).endswith(".npz"):
                parser.error("--out must be a directory with --shards")
            paths = generate_shards(
                args.dataset,
                out,
                args.shards,
                args.episodes,
                episode_length=args.episode_length,
                seed=args.seed,
                workers=args.workers,
                progress=not args.no_progress,
            )
        except (ValueError, OSError) as e:
            fail(e)
        print(out)
        print(f"{len(paths)} shard(s): {paths[0].name} .. {paths[-1].name}")
        return

    try:
        filename = dataset_filename(args.dataset, args.episodes, args.episode_length, args.seed)
    except ValueError as e:
        fail(e)
    if args.out is None:
        path = default_cache_dir() / "datasets" / filename
    elif str(args.out).endswith(".npz"):
        path = pathlib.Path(args.out).expanduser()
    else:
        path = pathlib.Path(args.out).expanduser() / filename
    try:
        path = generate_dataset(
            args.dataset,
            path,
            args.episodes,
            episode_length=args.episode_length,
            seed=args.seed,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as e:
        fail(e)
    print(path)
    print(val_dataset_path(path))


if __name__ == "__main__":
    main()
