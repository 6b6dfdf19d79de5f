"""OGBench datasets through OGBench's own loader (``ogbench.make_env_and_datasets``).

A user with the official files sets ``OGBenchDataset.dataset_path``; otherwise macfw generates
the dataset with OGBench's oracles into its cache (see :mod:`macfw.data.generate`) and reuses it.
Locomotion data (``humanoidmaze``/``antmaze``/``pointmaze``/``antsoccer``, dataset type
``'navigate'``) cannot be generated (OGBench collected it with trained expert policies, a
download): it is loaded from the official files only, and without a ``dataset_path`` :meth:`load`
raises a :class:`DatasetError` that says where they come from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import jax.numpy as jnp
import numpy as np

from macfw.data.batches import ChunkData, Scaler, trajectory_ends, valid_starts
from macfw.data.checks import INFO_KEYS, REQUIRED_KEYS, check_dataset_file  # noqa: F401  (re-exported)
from macfw.data.errors import DatasetError, DatasetNotFoundError, UnknownEnvironmentError  # noqa: F401  (re-exported)
from macfw.errors import check_choice, check_int
from macfw.registry import register
from macfw.spec import Spec

if TYPE_CHECKING:
    import gymnasium

TASK_MODES = ("singletask", "oraclerep", "goal")
ACTION_CLIP = 1.0 - 1e-5


@dataclasses.dataclass
class LoadedData:
    """What the training loop needs from a dataset.

    Attributes:
      data: :class:`ChunkData` on the device, or, for a directory of shards, the memory-mapped
        :class:`~macfw.data.shards.ShardedData` (the loop samples it on the host, or materialises
        it with ``to_chunk_data`` when it fits on the devices).
      spec: sizes for building the networks.
      obs_scaler, goal_scaler: [-1, 1] scalers (``goal_scaler`` None for single-task).
      dataset_name: the OGBench name loaded (e.g. ``cube-single-play-singletask-v0``).
      eval_env: the OGBench environment base name (e.g. ``cube-single``) and ``task_mode``.
    """

    data: Any  # ChunkData | macfw.data.shards.ShardedData
    spec: Spec
    obs_scaler: Scaler
    goal_scaler: Scaler | None
    dataset_name: str
    env_name: str
    task_mode: str
    task_id: int | None
    num_transitions: int


#: Single-task mask semantics (see ``OGBenchDataset.singletask_masks``).
SINGLETASK_MASKS = ("ogbench", "ones")


@register("dataset")
class OGBenchDataset:
    """An OGBench dataset, loaded with OGBench's loader and prepared for chunk sampling.

    Args:
      env_name: OGBench environment, e.g. ``"cube-single"``, ``"scene"``, ``"puzzle-3x3"``,
        ``"humanoidmaze-medium"`` (gin/envs/*.gin).
      dataset_type: ``"play"`` (manipulation; generated when ``dataset_path`` is None) or
        ``"navigate"`` (locomotion, e.g. humanoidmaze: OGBench's official files only, episodes of
        2001 steps for humanoidmaze-medium and 4001 for humanoidmaze-giant; the goal of
        ``"oraclerep"`` is the x-y position, ``qpos[:, :2]``).
      task_mode: ``"singletask"`` (reward-based; OGBench relabels rewards), ``"oraclerep"``
        (goal-conditioned with oracle goal representations) or ``"goal"`` (full-state goals).
      task_id: single-task task (1..5); None is OGBench's default task.
      dataset_path: an existing ``NAME.npz`` (with ``NAME-val.npz`` beside it), or a directory of
        OGBench shards ``<env>-<type>-v0-000.npz``, ``-001.npz``, ... (each with its ``-val``
        sibling; DESIGN §10), converted once into memory-mapped stores under the cache
        (:mod:`macfw.data.shards`) and sampled without loading them. None: generate into the cache
        (``num_episodes`` episodes of ``episode_length`` steps, seed ``data_seed``); for data that
        cannot be generated (``"navigate"``) :meth:`load` raises :class:`DatasetError` naming the
        official files (:func:`macfw.data.generate.locomotion_data_message`).
      scale_with: fit the [-1, 1] scaling on the ``"val"`` split (the reference's choice; for
        shards, the first shard's validation file, as the authors) or ``"train"`` (all shards).
      sampling: shards only: ``"uniform"`` over every valid start of every shard, or
        ``"shard_rotation"``: one shard at a time, the next (in index order) every
        ``rotation_interval`` gradient steps (the authors' scheme, 1000 steps; always sampled on
        the host). A single file is one shard, so it takes ``"uniform"`` only.
      max_shards: shards only: use the first ``max_shards`` shards (None: all).
      prefetch, prefetch_threads: shards sampled on the host: batch stacks made ahead, and the
        threads making them (:class:`macfw.data.host_sampler.ShardedBatches`; more threads
        overlap the reads of rows not in the page cache, at the price of more resident memory,
        since each maps pages; the order of the stacks is fixed).
      release_mib: shards only: MiB read from the memory maps after which their pages are
        released from this process's resident set (:meth:`ShardedData.maybe_release`).
      singletask_masks: single-task success/termination labels. ``"ogbench"``: OGBench's masks
        (0 where the task is solved), so the success model learns when a chunk solves the task and
        imagined single-task rollouts terminate there. ``"ones"``: the authors' loader, which sets
        every mask to 1, so the success model learns 0 and single-task rollouts never terminate
        (DESIGN §2.6). Goal-conditioned data ignores it.

    Raises:
      ConfigError (a ValueError): a value out of range: unknown ``task_mode`` / ``scale_with``,
        ``task_id`` outside 1..5, ``num_episodes`` < 1, ``episode_length`` < 2, ``data_seed`` < 0,
        ``workers`` < 1, unknown ``singletask_masks`` or ``sampling``, ``rotation_interval``,
        ``max_shards``, ``prefetch``, ``prefetch_threads`` or ``release_mib`` < 1; at :meth:`load`,
        ``sampling = "shard_rotation"`` with a single file.
      UnknownEnvironmentError (at :meth:`load`): an environment OGBench does not know.
      DatasetError (at :meth:`load`): no ``dataset_path`` for data that cannot be generated.
    """

    def __init__(
        self,
        env_name: str = "cube-single",
        dataset_type: str = "play",
        task_mode: str = "singletask",
        task_id: int | None = None,
        dataset_path: str | None = None,
        num_episodes: int = 1000,
        episode_length: int = 1001,
        data_seed: int = 0,
        cache_dir: str | None = None,
        scale_with: str = "val",
        workers: int | None = None,
        singletask_masks: str = "ogbench",
        sampling: str = "uniform",
        rotation_interval: int = 1000,
        max_shards: int | None = None,
        prefetch: int = 2,
        prefetch_threads: int = 1,
        release_mib: int = 256,
    ):
        self.task_mode = check_choice("OGBenchDataset.task_mode", task_mode, TASK_MODES)
        self.scale_with = check_choice("OGBenchDataset.scale_with", scale_with, ("val", "train"))
        self.task_id = check_int(
            "OGBenchDataset.task_id", task_id, maximum=5, allow_none=True, note="None: the default task"
        )
        self.num_episodes = check_int("OGBenchDataset.num_episodes", num_episodes)
        self.episode_length = check_int("OGBenchDataset.episode_length", episode_length, minimum=2)
        self.data_seed = check_int("OGBenchDataset.data_seed", data_seed, minimum=0)
        self.singletask_masks = check_choice("OGBenchDataset.singletask_masks", singletask_masks, SINGLETASK_MASKS)
        self.workers = check_int("OGBenchDataset.workers", workers, allow_none=True)
        from macfw.data.host_sampler import SAMPLINGS

        self.sampling = check_choice("OGBenchDataset.sampling", sampling, SAMPLINGS)
        self.rotation_interval = check_int(
            "OGBenchDataset.rotation_interval", rotation_interval, note="gradient steps per shard"
        )
        self.max_shards = check_int("OGBenchDataset.max_shards", max_shards, allow_none=True, note="None: all")
        self.prefetch = check_int("OGBenchDataset.prefetch", prefetch)
        self.prefetch_threads = check_int("OGBenchDataset.prefetch_threads", prefetch_threads)
        self.release_mib = check_int("OGBenchDataset.release_mib", release_mib)
        self.env_name = env_name
        self.dataset_type = dataset_type
        self.dataset_path = dataset_path
        self.cache_dir = cache_dir

    # -- names -------------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        """The dataset file's name in OGBench, e.g. ``cube-single-play-v0``."""
        return f"{self.env_name}-{self.dataset_type}-v0"

    @property
    def dataset_name(self) -> str:
        """The name given to ``ogbench.make_env_and_datasets``."""
        if self.task_mode == "singletask":
            task = "" if self.task_id is None else f"-task{int(self.task_id)}"
            return f"{self.env_name}-{self.dataset_type}-singletask{task}-v0"
        if self.task_mode == "oraclerep":
            return f"{self.env_name}-{self.dataset_type}-oraclerep-v0"
        return self.base_name

    def check_env(self) -> None:
        """Raise :class:`UnknownEnvironmentError` (a ValueError) when OGBench has no ``env_name``."""
        import difflib

        import gymnasium
        import ogbench  # noqa: F401  (registers the environments)

        env_id = f"{self.env_name}-v0"
        if not isinstance(self.env_name, str) or env_id not in gymnasium.registry:
            known = sorted(
                {
                    k[:-3]
                    for k in gymnasium.registry
                    if k.endswith("-v0")
                    and "singletask" not in k
                    and not k.startswith("visual")
                    and any(w in k for w in ("cube", "scene", "puzzle", "maze", "soccer"))
                }
            )
            close = difflib.get_close_matches(str(self.env_name), known, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise UnknownEnvironmentError(
                f"OGBench has no environment {self.env_name!r} (no {env_id!r}).{hint} Fix OGBenchDataset.env_name; "
                f"known environments: {known}."
            )

    def resolve_path(self) -> Path:
        """The train file to load (generating it into the cache when no path is configured), or the
        configured directory of shards.

        Raises:
          DatasetNotFoundError / DatasetError: see :func:`check_dataset_file`; or no path is configured
            for data that cannot be generated (locomotion, e.g. ``"navigate"``: the message says where
            OGBench's official files come from and how to bind ``OGBenchDataset.dataset_path``; another
            dataset type such as ``"noisy"``; a ``visual-*`` environment).
        """
        if self.dataset_path is not None:
            path = Path(os.path.expanduser(self.dataset_path))
            if path.is_dir():
                return path
            check_dataset_file(path, self.task_mode)
            return path
        from macfw.data.generate import ensure_dataset

        path = ensure_dataset(
            self.base_name,
            self.num_episodes,
            episode_length=self.episode_length,
            seed=self.data_seed,
            cache_dir=self.cache_dir,
            workers=self.workers,
        )
        check_dataset_file(path, self.task_mode)
        return path

    # -- loading -----------------------------------------------------------------------------
    def load(self, chunk_len: int, window: int | None = None) -> LoadedData:
        """Load, scale and move the data to the device.

        Args:
          chunk_len: action-chunk length ``n`` (environment steps).
          window: environment steps after ``t`` a sample reads (default ``chunk_len``); only
            starts ``t`` with ``t + window`` in the same trajectory are sampled.

        Raises:
          FileNotFoundError / ValueError: see :func:`check_dataset_file` and the class doc.
          DatasetError: the file's observation or action size differs from the environment's.
        """
        import ogbench

        self.check_env()
        path = self.resolve_path()
        if path.is_dir():
            return self.load_sharded(path, chunk_len, window)
        from macfw.errors import check

        check(
            "OGBenchDataset.sampling",
            self.sampling,
            self.sampling == "uniform",
            "'uniform' for a single dataset file ('shard_rotation' needs a directory of shards as "
            "OGBenchDataset.dataset_path)",
        )
        try:
            env, train, val = cast(
                "tuple[gymnasium.Env, dict, dict]",  # (its return type covers env_only / dataset_only too)
                ogbench.make_env_and_datasets(self.dataset_name, dataset_path=str(path), compact_dataset=True),
            )
        except (KeyError, ValueError, IndexError) as e:
            raise DatasetError(
                f"OGBench could not load {str(path)!r} as {self.dataset_name!r} ({type(e).__name__}: {e}). The file "
                "may belong to another environment; fix OGBenchDataset.env_name/task_mode or dataset_path."
            ) from e
        try:
            for what, space, arr in (
                ("observation", env.observation_space, train["observations"]),
                ("action", env.action_space, train["actions"]),
            ):
                want = tuple(getattr(space, "shape", None) or ())
                if want and tuple(np.shape(arr)[1:]) != want:
                    raise DatasetError(
                        f"Dataset file {str(path)!r} has {what}s of size {tuple(np.shape(arr)[1:])} but the OGBench "
                        f"environment {self.env_name!r} has {want}: the file belongs to another environment. Fix "
                        "OGBenchDataset.env_name or OGBenchDataset.dataset_path."
                    )
        finally:
            env.close()
        return self.prepare(train, val, chunk_len, window)

    def load_sharded(self, directory: Path, chunk_len: int, window: int | None = None) -> LoadedData:
        """Convert (once) and memory-map the shards in ``directory`` (see :meth:`load` and
        :func:`macfw.data.shards.open_sharded`); nothing is loaded into memory."""
        import ogbench

        from macfw.data.shards import open_sharded

        env = cast("gymnasium.Env", ogbench.make_env_and_datasets(self.dataset_name, env_only=True))
        try:
            sharded = open_sharded(
                directory,
                base_name=self.base_name,
                dataset_name=self.dataset_name,
                task_mode=self.task_mode,
                singletask_masks=self.singletask_masks,
                scale_with=self.scale_with,
                env=env,
                cache_dir=self.cache_dir,
                max_shards=self.max_shards,
                sampling=self.sampling,
                rotation_interval=self.rotation_interval,
                release_mib=self.release_mib,
            )
            for what, space, got in (
                ("observation", env.observation_space, (sharded.ob_dim,)),
                ("action", env.action_space, (sharded.act_dim,)),
            ):
                want = tuple(getattr(space, "shape", None) or ())
                if want and got != want:
                    raise DatasetError(
                        f"The shards in {str(directory)!r} have {what}s of size {got} but the OGBench environment "
                        f"{self.env_name!r} has {want}: they belong to another environment. Fix "
                        "OGBenchDataset.env_name or OGBenchDataset.dataset_path."
                    )
        finally:
            env.close()
        sharded.index_tables(max(chunk_len, window or 0))  # ConfigError now if no trajectory is long enough
        spec = Spec(ob_dim=sharded.ob_dim, act_dim=sharded.act_dim, goal_dim=sharded.goal_dim, chunk_len=int(chunk_len))
        return LoadedData(
            data=sharded,
            spec=spec,
            obs_scaler=sharded.obs_scaler,
            goal_scaler=sharded.goal_scaler,
            dataset_name=self.dataset_name,
            env_name=self.env_name,
            task_mode=self.task_mode,
            task_id=self.task_id,
            num_transitions=sharded.size,
        )

    def prepare(self, train: dict, val: dict, chunk_len: int, window: int | None = None) -> LoadedData:
        """Turn OGBench's compact dataset dicts into :class:`LoadedData` (see :meth:`load`)."""
        fit_src = val if self.scale_with == "val" else train
        obs_scaler = Scaler.fit(fit_src["observations"])
        obs = obs_scaler(np.asarray(train["observations"], np.float32))
        actions = np.clip(np.asarray(train["actions"], np.float32), -ACTION_CLIP, ACTION_CLIP)
        n = len(obs)
        if self.task_mode == "oraclerep":
            goal_scaler = Scaler.fit(fit_src["oracle_reps"])
            goals = goal_scaler(np.asarray(train["oracle_reps"], np.float32))
        elif self.task_mode == "goal":
            goal_scaler = obs_scaler
            goals = obs
        else:
            goal_scaler = None
            goals = np.zeros((n, 0), np.float32)
        rewards = np.asarray(train.get("rewards", np.zeros(n)), np.float32)
        masks = np.asarray(train.get("masks", np.ones(n)), np.float32)
        if self.task_mode == "singletask" and self.singletask_masks == "ones":
            masks = np.ones(n, np.float32)  # the authors' loader: no success, no termination
        traj_end = trajectory_ends(train["valids"])
        starts = valid_starts(traj_end, max(chunk_len, window or 0))
        data = ChunkData(
            observations=jnp.asarray(obs),
            actions=jnp.asarray(actions),
            goals=jnp.asarray(goals),
            rewards=jnp.asarray(rewards),
            masks=jnp.asarray(masks),
            traj_end=jnp.asarray(traj_end),
            starts=jnp.asarray(starts),
        )
        spec = Spec(
            ob_dim=int(obs.shape[1]),
            act_dim=int(actions.shape[1]),
            goal_dim=int(goals.shape[1]),
            chunk_len=int(chunk_len),
        )
        return LoadedData(
            data=data,
            spec=spec,
            obs_scaler=obs_scaler,
            goal_scaler=goal_scaler,
            dataset_name=self.dataset_name,
            env_name=self.env_name,
            task_mode=self.task_mode,
            task_id=self.task_id,
            num_transitions=n,
        )


@functools.cache
def default_task_id(env_name: str) -> int:
    """OGBench's default single-task task id for ``env_name`` (e.g. 2 for cube-single).

    OGBench resolves it when the environment resets, so one is made (quietly: gymnasium's
    space-precision warnings are not the caller's concern), about 2 s of a run's start. The answer is
    kept in memory and in ``<macfw cache>/ogbench-task-ids.json`` (keyed by environment and ogbench
    version) when the cache folder exists, so later processes skip the environment; a cache that
    cannot be read or written is ignored.
    """
    import warnings

    import gymnasium
    import ogbench  # noqa: F401

    from macfw.logs import versions

    key = f"{env_name}|ogbench {versions()['ogbench']}"
    path = _task_id_cache_path()
    known = _read_json(path)
    if isinstance(known.get(key), int):
        return known[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gymnasium.make(f"{env_name}-singletask-v0")
        try:
            env.reset(seed=0)
            unwrapped: Any = env.unwrapped  # an OGBench single-task environment (not in gymnasium's types)
            task_id = int(unwrapped._reward_task_id)  # noqa: SLF001
        finally:
            env.close()
    _write_json(path, {**_read_json(path), key: task_id})
    return task_id


def _task_id_cache_path():
    from macfw.data.generate import default_cache_dir

    return default_cache_dir() / "ogbench-task-ids.json"


def _read_json(path) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path, obj: dict) -> None:
    from macfw.logs import write_json_atomic

    if not path.parent.is_dir():  # only beside what the cache folder holds already (e.g. datasets): a
        return  # command that needs no data (macfw.evaluate) creates no folder for this
    try:
        write_json_atomic(path, obj)
    except OSError:  # a cache: never fail for it
        pass
