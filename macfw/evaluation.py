"""Evaluation of an agent in the OGBench simulator (agent-agnostic).

The agent is seen only through an *actor* callable (see :data:`Actor`)::

    actor(obs, goal, seed) -> chunk
        obs:   (ob_dim,) raw environment observation, e.g. (28,) for ``cube-single``
               (an image (H, W, C) for the ``visual-*`` environments).
        goal:  None in ``'singletask'`` mode; otherwise the raw goal ``info['goal']`` returned by
               ``env.reset``: (3,) for ``cube-single`` with ``'oraclerep'`` (cube position),
               (28,) for ``cube-single`` with ``'goal'`` (a full observation).
        seed:  an int in [0, 2**31) that differs for every decision (use it for a PRNG key).
        chunk: (n, act_dim) action chunk in [-1, 1], n >= 1, e.g. (5, 5) for ``cube-single``.
               A single action of shape (act_dim,) is accepted as a chunk with n = 1.

Protocol (OGBench, Park et al. 2024, "OGBench: Benchmarking Offline Goal-Conditioned RL"):
every environment has 5 evaluation tasks; an episode runs until the environment terminates
(the goal is reached, for environments that terminate at the goal) or is truncated by its own
time limit (``max_episode_steps``, e.g. 200 environment steps for ``cube-single``); the success
of an episode is ``info['success']`` of the *last* step of the episode; the score of an agent is
the mean over tasks of the per-task success rate (the paper averages 15 episodes per task).

Task modes:

* ``'singletask'``: the reward-based single-task environments
  ``{env_name}-singletask-task{i}-v0``; the goal passed to the actor is ``None``.
* ``'oraclerep'``: the goal-conditioned environment ``{env_name}-v0`` made with
  ``use_oracle_rep=True``; each task is selected with ``env.reset(options=dict(task_id=i))`` and
  the actor gets the oracle goal representation ``info['goal']``.
* ``'goal'``: as ``'oraclerep'`` but with full-state goals (``use_oracle_rep`` left off).

Units: episode lengths and ``execute_steps`` count *environment steps* (one action each); the
actor is called once per *decision* (one chunk), so with chunks executed open-loop for
``execute_steps = k`` steps, an episode of T steps takes ceil(T / k) decisions.

Actions are clipped to [-1, 1] before they are executed (as OGBench's own evaluation does).

Command line (a saved checkpoint, without training; :mod:`macfw.evaluate`)::

    python -m macfw.evaluate --workdir DIR [--step N] [--episodes K] [--tasks 1,2,...]
        [--execute_steps E] [--video PATH] [--seed S] [--import MODULE]

Video: rendering uses MuJoCo's offscreen renderer, whose OpenGL backend is chosen from the
``MUJOCO_GL`` environment variable when ``mujoco`` is first imported. On a headless Linux machine
(no ``DISPLAY``) this module sets ``MUJOCO_GL=egl`` if it is imported before ``mujoco``, the
variable is unset and libEGL is installed; otherwise set it yourself (``MUJOCO_GL=egl python -m
...``). With Mesa's software EGL (no GPU) a 200x200 frame takes ~0.4 s on 2 CPU cores, so a
video of 5 tasks x 1 episode x 200 steps takes minutes; use small ``width``/``height``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional


from macfw._mujoco_gl import default_mujoco_gl as _default_mujoco_gl  # noqa: E402

_default_mujoco_gl()

import numpy as np

__all__ = ["Actor", "EvalResult", "TASK_MODES", "TaskMismatchError", "evaluate", "load_checkpoint", "evaluate_checkpoint",
           "resolve_task_ids"]

#: ``actor(obs, goal, seed) -> chunk``; see the module docstring for shapes.
Actor = Callable[[np.ndarray, Optional[np.ndarray], int], np.ndarray]

#: The valid values of ``evaluate(task_mode=...)``.
TASK_MODES: tuple[str, ...] = ("singletask", "oraclerep", "goal")

_SEED_MOD = 2**31


@dataclasses.dataclass
class EvalResult:
    """Result of :func:`evaluate`.

    Attributes:
        success: mean over tasks of the per-task success rate, in [0, 1].
        per_task_success: success rate of each task, keyed ``'task{i}'``, e.g. ``{'task1': 0.4}``.
        episodes: total number of episodes run (tasks x episodes_per_task).
        mean_return: mean undiscounted episode return (sum of environment rewards).
        mean_length: mean episode length in environment steps (not chunks).
        video_paths: the video files written (empty when no video was asked for or writing failed).
    """

    success: float
    per_task_success: dict[str, float]
    episodes: int
    mean_return: float
    mean_length: float
    video_paths: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-Python dict of all fields (JSON-serialisable)."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Environment construction
# ----------------------------------------------------------------------------------------------


def _import_ogbench_envs(env_name: str) -> None:
    """Import the OGBench module that registers ``env_name``'s gymnasium ids."""
    if "maze" in env_name or "soccer" in env_name:
        import ogbench.locomaze  # noqa: F401
    else:
        import ogbench.manipspace  # noqa: F401


def _unknown_env_error(env_id: str, env_name: str, task_mode: str, cause: Any = None) -> ValueError:
    import gymnasium

    prefix = env_name.split("-")[0]
    similar = sorted(k for k in gymnasium.registry if k.startswith(prefix))
    if task_mode == "singletask":
        similar = [k for k in similar if "-singletask-task" in k] or similar
    else:
        similar = [k for k in similar if "singletask" not in k] or similar
    listing = ""
    if similar:
        shown = ", ".join(similar[:25]) + (f", ... ({len(similar)} in all)" if len(similar) > 25 else "")
        listing = f" Registered ids starting with {prefix!r}: {shown}."
    form = (
        f"'{{env_name}}-singletask-task{{i}}-v0'" if task_mode == "singletask" else "'{env_name}-v0'"
    )
    msg = (
        f"Unknown environment id {env_id!r} (env_name={env_name!r}, task_mode={task_mode!r}): "
        f"it is not registered with gymnasium after importing OGBench. env_name must be the "
        f"base OGBench name (e.g. 'cube-single', 'pointmaze-medium'), without '-v0' or "
        f"'-singletask-taskN'; task_mode={task_mode!r} makes {form}.{listing}"
    )
    if cause is not None:
        msg += f" (gymnasium said: {cause})"
    return ValueError(msg)


def _make_env(env_id: str, env_name: str, task_mode: str, kwargs: dict):
    import gymnasium

    _import_ogbench_envs(env_name)
    if env_id not in gymnasium.registry:
        # The name may belong to the other OGBench family (e.g. a maze without 'maze' in it).
        import ogbench.locomaze  # noqa: F401
        import ogbench.manipspace  # noqa: F401
    if env_id not in gymnasium.registry:
        raise _unknown_env_error(env_id, env_name, task_mode)
    try:
        return gymnasium.make(env_id, **kwargs)
    except (gymnasium.error.NameNotFound, gymnasium.error.VersionNotFound,
            gymnasium.error.NamespaceNotFound) as e:  # pragma: no cover - guarded above
        raise _unknown_env_error(env_id, env_name, task_mode, e) from e


# ----------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------


def _episode_seeds(seed: int, task_id: int, episode: int) -> tuple[int, int]:
    """(env reset seed, base of the actor's per-decision seeds) for episode ``episode`` of a task."""
    state = np.random.SeedSequence([int(seed) % 2**32, int(task_id), int(episode)]).generate_state(2)
    return int(state[0]) % _SEED_MOD, int(state[1]) % _SEED_MOD


# ----------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------


def _mp4_writer_available() -> bool:
    for mod in ("imageio_ffmpeg", "av"):
        try:
            __import__(mod)
            return True
        except Exception:
            pass
    return False


def _env_fps(env) -> float:
    fps = (getattr(env, "metadata", None) or {}).get("render_fps")
    if fps:
        return float(fps)
    u = env.unwrapped
    dt = None
    if callable(getattr(u, "control_timestep", None)):  # OGBench manipspace
        try:
            dt = float(u.control_timestep())
        except Exception:
            dt = None
    if dt is None:
        try:
            dt = float(getattr(u, "dt"))
        except Exception:
            dt = None
    return 1.0 / dt if dt and dt > 0 else 20.0


def _gl_hint() -> str:
    current = os.environ.get("MUJOCO_GL")
    return (
        f"MuJoCo offscreen rendering failed (MUJOCO_GL={current!r}). Set MUJOCO_GL before Python "
        "imports mujoco: MUJOCO_GL=egl (headless; needs libEGL, from a GPU driver or Mesa) or "
        "MUJOCO_GL=osmesa (software; needs libOSMesa), or MUJOCO_GL=glfw with a display; e.g. "
        "`MUJOCO_GL=egl python -m macfw.evaluate --video out.mp4`. Or evaluate without "
        "video_path."
    )


def _to_frame(frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] not in (3, 4):
        raise ValueError(f"env.render() returned shape {frame.shape}, expected (H, W, 3)")
    if frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    return frame[..., :3].copy()


def _resolve_video_path(video_path) -> Path:
    path = Path(video_path)
    suffix = path.suffix.lower()
    if suffix not in ("", ".mp4", ".gif"):
        raise ValueError(
            f"video_path={str(video_path)!r} has suffix {path.suffix!r}; use '.mp4' or '.gif' "
            "(or no suffix to pick mp4 when an ffmpeg writer is installed, else gif)."
        )
    if suffix == "":
        path = path.with_suffix(".mp4" if _mp4_writer_available() else ".gif")
    return path


def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    """Write ``frames`` (each (H, W, 3) uint8) to ``path``; mp4 falls back to gif. Returns the path."""
    import imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    # All frames of one file must share a shape (they do: every task's env gets the same kwargs).
    frames = [f for f in frames if f.shape == frames[0].shape]
    if path.suffix.lower() == ".mp4":
        if _mp4_writer_available():
            try:
                imageio.v2.mimwrite(str(path), frames, fps=fps, macro_block_size=1)
                return path
            except Exception as e:  # e.g. codec problems; fall back to gif
                warnings.warn(f"Could not write mp4 {str(path)!r} ({e!r}); writing a gif instead.")
        else:
            warnings.warn(
                f"No mp4 writer (imageio-ffmpeg or PyAV) is installed; writing a gif instead of {str(path)!r}."
            )
        path = path.with_suffix(".gif")
    import imageio.v3 as iio

    iio.imwrite(str(path), np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
    return path


class _Recorder:
    """Collects rendered frames; a rendering failure before any episode finished raises, later ones warn."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.fps: float | None = None
        self.failed = False

    def capture(self, env, episodes_done: int) -> None:
        if self.failed:
            return
        try:
            frame = _to_frame(env.render())
        except Exception as e:
            if episodes_done == 0:
                raise RuntimeError(_gl_hint() + f" Underlying error: {e!r}") from e
            warnings.warn(f"Rendering failed ({e!r}); the video stops here, evaluation goes on.")
            self.failed = True
            return
        if self.fps is None:
            self.fps = _env_fps(env)
        self.frames.append(frame)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def _as_chunk(chunk, act_dim: int) -> np.ndarray:
    a = np.asarray(chunk, dtype=np.float64)
    if a.ndim == 1 and a.shape[0] == act_dim:
        a = a[None]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != act_dim:
        raise ValueError(
            f"The actor returned an array of shape {np.shape(chunk)}; expected an action chunk of "
            f"shape (n, {act_dim}) with n >= 1 (act_dim={act_dim} for this environment)."
        )
    if not np.all(np.isfinite(a)):
        raise ValueError("The actor returned a chunk with non-finite values (nan or inf).")
    return a


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _run_episode(env, actor: Actor, *, task_id: int, episode: int, seed: int, reset_options,
                 oracle_goal: bool, execute_steps: int, act_dim: int,
                 recorder: Optional[_Recorder], episodes_done: int) -> tuple[float, float, int]:
    """Run one episode; returns (success at the last step, undiscounted return, length in env steps)."""
    env_seed, actor_base = _episode_seeds(seed, task_id, episode)
    ob, info = env.reset(seed=env_seed, options=reset_options)
    goal = None
    if oracle_goal:
        if "goal" not in info:
            raise ValueError(
                f"The environment's reset info has no 'goal' (keys: {sorted(info)}); goal-conditioned "
                "evaluation needs an OGBench goal-conditioned environment."
            )
        goal = np.asarray(info["goal"])
    if recorder is not None:
        recorder.capture(env, episodes_done)

    total_return, length, decision = 0.0, 0, 0
    last_info: dict = info
    done = False
    while not done:
        actor_seed = (actor_base + decision) % _SEED_MOD
        decision += 1
        chunk = _as_chunk(actor(np.asarray(ob), goal, int(actor_seed)), act_dim)
        if execute_steps > chunk.shape[0]:
            raise ValueError(
                f"execute_steps={execute_steps} is larger than the chunk length n={chunk.shape[0]} "
                f"returned by the actor (chunk shape {chunk.shape}); use execute_steps <= {chunk.shape[0]}."
            )
        for action in np.clip(chunk[:execute_steps], -1.0, 1.0):
            ob, reward, terminated, truncated, last_info = env.step(action)
            total_return += float(reward)
            length += 1
            if recorder is not None:
                recorder.capture(env, episodes_done)
            if terminated or truncated:
                done = True
                break
    if "success" not in last_info:
        raise ValueError(
            f"The environment does not report info['success'] (step info keys: {sorted(last_info)}); "
            "OGBench environments do."
        )
    return float(last_info["success"]), total_return, length


def evaluate(
    actor: Actor,
    env_name: str,
    *,
    task_mode: str = "singletask",
    task_ids: Iterable[int] = (1, 2, 3, 4, 5),
    episodes_per_task: int = 15,
    execute_steps: int = 1,
    seed: int = 0,
    video_path: str | os.PathLike | None = None,
    video_episodes: int = 1,
    progress: bool = False,
    env_kwargs: dict | None = None,
) -> EvalResult:
    """Evaluate ``actor`` on the OGBench tasks of ``env_name``.

    Args:
        actor: ``actor(obs, goal, seed) -> chunk``: obs (ob_dim,), goal None (singletask) or
            (goal_dim,) (``info['goal']``, e.g. (3,) for cube-single with oraclerep), seed an int
            in [0, 2**31) that differs every decision; chunk (n, act_dim) in [-1, 1], n >= 1
            (clipped to [-1, 1] before execution).
        env_name: OGBench base name, e.g. ``'cube-single'``, ``'puzzle-3x3'``, ``'pointmaze-medium'``.
        task_mode: ``'singletask'`` (``{env_name}-singletask-task{i}-v0``, goal None),
            ``'oraclerep'`` (``{env_name}-v0`` with ``use_oracle_rep=True``, goal = oracle
            representation) or ``'goal'`` (``{env_name}-v0``, goal = full goal observation).
        task_ids: the evaluation tasks (OGBench has 5 per environment, numbered from 1).
        episodes_per_task: episodes per task (the OGBench paper uses 15).
        execute_steps: how many actions of each chunk are executed (environment steps) before the
            actor is called again; 1 re-plans every step, n runs whole chunks open-loop. The rest
            of the chunk is discarded; an episode ending mid-chunk stops execution at once.
        seed: base seed. Episode j of task i resets the env with a seed derived from
            (seed, i, j); the actor's seeds are derived likewise, one per decision.
        video_path: if given, frames of the first ``video_episodes`` episodes of every task are
            rendered (``render_mode='rgb_array'``; size via ``env_kwargs=dict(width=..,
            height=..)``, OGBench's default is 200x200) and written to this file: ``.mp4`` when
            imageio-ffmpeg or PyAV is installed, else a ``.gif`` next to it (same stem). No
            suffix picks the best available. The written files are in ``EvalResult.video_paths``.
        video_episodes: episodes recorded per task (from the first).
        progress: show a tqdm progress bar over episodes.
        env_kwargs: extra keyword arguments for ``gymnasium.make``.

    Returns:
        An :class:`EvalResult`: success = mean over tasks of the per-task success rate, where an
        episode's success is ``info['success']`` at its last step.

    Raises:
        ValueError: unknown task_mode (the valid ones are listed); an environment id unknown to
            OGBench/gymnasium (similar registered ids are listed); episodes_per_task < 1,
            execute_steps < 1, video_episodes < 0, empty or invalid task_ids; a video_path
            suffix other than .mp4/.gif; an actor output that is not an (n, act_dim) chunk or
            is shorter than execute_steps; an environment without ``info['success']``.
        RuntimeError: ``video_path`` was given but MuJoCo cannot render (the message says which
            ``MUJOCO_GL`` to set). This is raised at the first frame, before any episode has
            finished; a later rendering or writing failure only warns, and the evaluation result
            is still returned.
    """
    if task_mode not in TASK_MODES:
        raise ValueError(f"Unknown task_mode {task_mode!r}; valid task modes are {list(TASK_MODES)}.")
    if not isinstance(env_name, str) or not env_name:
        raise ValueError(f"env_name must be a non-empty string such as 'cube-single'; got {env_name!r}.")
    episodes_per_task = _check_int("episodes_per_task", episodes_per_task)
    execute_steps = _check_int("execute_steps", execute_steps)
    video_episodes = _check_int("video_episodes", video_episodes, minimum=0)
    if isinstance(task_ids, (int, np.integer)):
        task_ids = (task_ids,)
    task_ids = list(task_ids)
    if not task_ids:
        raise ValueError("task_ids is empty; pass e.g. task_ids=(1, 2, 3, 4, 5).")
    for t in task_ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
            raise ValueError(f"task_ids must be integers >= 1 (OGBench tasks are 1..5); got {t!r} in {task_ids!r}.")
    task_ids = [int(t) for t in task_ids]
    if len(set(task_ids)) != len(task_ids):
        raise ValueError(f"task_ids has duplicates: {task_ids!r}.")

    out_path = _resolve_video_path(video_path) if video_path is not None else None
    recorder = _Recorder() if out_path is not None and video_episodes > 0 else None

    make_kwargs = dict(env_kwargs or {})
    if recorder is not None:
        make_kwargs.setdefault("render_mode", "rgb_array")
    if task_mode == "oraclerep":
        make_kwargs.setdefault("use_oracle_rep", True)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(task_ids) * episodes_per_task, desc=f"eval {env_name}", unit="ep")

    per_task: dict[str, float] = {}
    returns: list[float] = []
    lengths: list[int] = []
    envs: list = []
    shared_env = None
    try:
        if task_mode != "singletask":
            shared_env = _make_env(f"{env_name}-v0", env_name, task_mode, make_kwargs)
            envs.append(shared_env)
            num_tasks = getattr(shared_env.unwrapped, "num_tasks", None)
            bad = [t for t in task_ids if num_tasks is not None and t > num_tasks]
            if bad:
                raise ValueError(f"task_ids {bad!r} out of range: {env_name!r} has tasks 1..{num_tasks}.")
        for task_id in task_ids:
            if shared_env is None:
                env = _make_env(f"{env_name}-singletask-task{task_id}-v0", env_name, task_mode, make_kwargs)
                envs.append(env)
                reset_options = None
            else:
                env = shared_env
                reset_options = dict(task_id=task_id, render_goal=False)
            act_dim = int(np.prod(env.action_space.shape))
            successes = []
            for episode in range(episodes_per_task):
                rec = recorder if recorder is not None and episode < video_episodes else None
                success, ret, length = _run_episode(
                    env, actor, task_id=task_id, episode=episode, seed=seed,
                    reset_options=reset_options, oracle_goal=shared_env is not None,
                    execute_steps=execute_steps, act_dim=act_dim, recorder=rec,
                    episodes_done=len(returns),
                )
                successes.append(success)
                returns.append(ret)
                lengths.append(length)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(task=task_id, success=f"{np.mean(successes):.2f}")
            per_task[f"task{task_id}"] = float(np.mean(successes))
            if shared_env is None:  # done with this task's env
                envs.remove(env)
                env.close()
    finally:
        if bar is not None:
            bar.close()
        for env in envs:
            try:
                env.close()
            except Exception:
                pass

    video_paths: list[str] = []
    if recorder is not None and recorder.frames:
        try:
            written = _write_video(out_path, recorder.frames, recorder.fps or 20.0)
            video_paths.append(str(written))
        except Exception as e:
            warnings.warn(f"Writing the video to {str(out_path)!r} failed ({e!r}); the evaluation result is kept.")

    return EvalResult(
        success=float(np.mean(list(per_task.values()))),
        per_task_success=per_task,
        episodes=len(returns),
        mean_return=float(np.mean(returns)),
        mean_length=float(np.mean(lengths)),
        video_paths=video_paths,
    )


# ----------------------------------------------------------------------------------------------
# Evaluating a saved checkpoint (command line)
# ----------------------------------------------------------------------------------------------


#: Evaluation defaults (``train.eval_episodes``, ``train.execute_steps``, ``train.eval_seed``).
DEFAULT_EPISODES, DEFAULT_EXECUTE_STEPS, DEFAULT_EVAL_SEED = 15, 1, 10_000


def _run_setting(meta: dict, key: str, binding: str, default):
    """An evaluation setting of a run: its checkpoint's ``meta['eval']``, else its Gin config, else ``default``."""
    import gin

    if key in (meta.get("eval") or {}):
        return meta["eval"][key]
    try:
        return gin.query_parameter(binding)
    except ValueError:
        return default


class TaskMismatchError(ValueError):
    """A single-task run asked to be evaluated on another task than the one it was trained for."""


def resolve_task_ids(env_name: str, task_mode: str, trained_task_id: int | None,
                     task_ids: Iterable[int] | None, *, source: str = "--tasks") -> tuple[int, ...]:
    """The evaluation tasks of a run: ``task_ids`` checked, or the run's default.

    A single-task agent learned the rewards of one task (``OGBenchDataset.task_id``; None is
    OGBench's default task of ``env_name``), so it is evaluated on that task only; a
    goal-conditioned agent on any of OGBench's five evaluation goals (default all five).

    ``source`` names where ``task_ids`` came from in the error (``--tasks`` on the command line,
    ``train.eval_task_ids`` in a Gin config).

    Raises:
      TaskMismatchError: a single-task run and a task id other than the trained one.
    """
    if task_mode == "singletask":
        from macfw.data.ogbench_data import default_task_id

        trained = int(trained_task_id) if trained_task_id is not None else default_task_id(env_name)
        if task_ids is None:
            return (trained,)
        task_ids = tuple(int(t) for t in task_ids)
        if set(task_ids) != {trained}:
            raise TaskMismatchError(
                f"This run was trained single-task on {env_name} task{trained} (its rewards came from that task), so "
                f"it cannot be evaluated on task(s) {sorted(set(task_ids) - {trained})}. "
                + (f"Fix the Gin binding {source}: omit it or set it to ({trained},)" if "." in source
                   else f"Omit {source} or pass {trained}")
                + "; for another task train a run with OGBenchDataset.task_id.")
        return task_ids
    return (1, 2, 3, 4, 5) if task_ids is None else tuple(int(t) for t in task_ids)


def seed_params(agent, state, num_seeds: int | None) -> list:
    """Per seed, :meth:`Agent.acting_params` of ``state`` on the host (one entry without ``num_seeds``)."""
    import equinox as eqx
    import jax

    from macfw.parallel import to_host

    params = agent.acting_params(state)
    params = eqx.combine(jax.tree_util.tree_map(to_host, eqx.filter(params, eqx.is_array)),
                         eqx.filter(params, eqx.is_array, inverse=True))
    if num_seeds is None:
        return [params]
    return [jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, params) for i in range(num_seeds)]


def make_actor(agent, params, obs_scaler, goal_scaler) -> Actor:
    """An :data:`Actor` ``(obs, goal, seed) -> (k, act_dim)`` that scales inputs like training and calls
    :meth:`Agent.act` (compiled once) on ``params`` (:meth:`Agent.acting_params` of one seed)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    act = eqx.filter_jit(lambda p, s, g, k: agent.act(p, s, g, key=k))
    empty = np.zeros((0,), np.float32)

    def actor(obs, goal, seed):
        s = obs_scaler(np.asarray(obs, np.float32))
        g = empty if goal is None or goal_scaler is None else goal_scaler(np.asarray(goal, np.float32))
        return np.asarray(act(params, jnp.asarray(s), jnp.asarray(g), jax.random.PRNGKey(seed)))

    return actor


def merge_results(results: list[EvalResult]) -> dict:
    """Mean over seeds of success and per-task success; total episodes."""
    tasks = results[0].per_task_success.keys()
    return {
        "success": float(np.mean([r.success for r in results])),
        "per_task_success": {t: float(np.mean([r.per_task_success[t] for r in results])) for t in tasks},
        "episodes": int(sum(r.episodes for r in results)),
        "mean_return": float(np.mean([r.mean_return for r in results])),
        "mean_length": float(np.mean([r.mean_length for r in results])),
    }


def eval_row(results: list[EvalResult]) -> dict:
    """One ``eval.csv`` row: merged success, per task, per seed (with several seeds)."""
    res = merge_results(results)
    row = {"success": res["success"], "episodes": res["episodes"],
           **{f"success/{k}": v for k, v in res["per_task_success"].items()},
           "mean_return": res["mean_return"], "mean_length": res["mean_length"]}
    if len(results) > 1:
        row.update({f"success/seed{i}": r.success for i, r in enumerate(results)})
    return row


def load_checkpoint(workdir, step: int | None = None, imports: Iterable[str] = ()):
    """Rebuild a run's agent from its checkpoint and restore the state, without loading any data.

    The agent is built from the Gin config stored in the checkpoint (``meta['gin_config']``, the
    run's ``gin.config_str()``), its sizes from ``meta['spec']``; a template state is initialised
    with the agent and the checkpoint restored onto it (read-only: the folder is not changed).

    Args:
      workdir: the run folder (holds ``checkpoints/``).
      step: the step to restore; None: the newest complete one (falling back to an older one
        if it is unreadable).
      imports: modules to import first (user components named in the stored config).

    Returns:
      ``(agent, state, meta, step)``; with ``num_seeds`` the state has a leading seed axis.

    Raises:
      FileNotFoundError: no complete checkpoint (or not ``step``) in ``workdir/checkpoints``.
    """
    import importlib

    import gin

    import macfw  # noqa: F401  (registers the built-in components and Gin configurables)
    from macfw.checkpoint import Checkpointer
    from macfw.spec import Spec
    from macfw.step import init_state

    for mod in imports:
        importlib.import_module(mod)
    ckdir = Path(workdir) / "checkpoints"
    if not ckdir.is_dir():
        raise FileNotFoundError(f"No checkpoints in {str(workdir)!r} (no folder {str(ckdir)!r}). Pass the --workdir "
                                "of a training run.")
    ckpt = Checkpointer(ckdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"No complete checkpoint in {str(ckdir)!r}.")
        if step is not None and int(step) not in steps:
            raise FileNotFoundError(f"No complete checkpoint step {step} in {str(ckdir)!r}; complete steps: {steps}. "
                                    "Fix --step.")
        meta = ckpt.read_meta(steps[-1] if step is None else int(step))
        gin.clear_config()
        gin.parse_config(meta["gin_config"])
        try:
            ref = gin.query_parameter("train.agent")
        except ValueError:
            ref = None
        agent = ref.scoped_configurable_fn() if hasattr(ref, "scoped_configurable_fn") else ref
        if agent is None:
            raise FileNotFoundError(f"The config stored in {str(ckdir)!r} binds no train.agent; this checkpoint "
                                    "cannot be rebuilt.")
        template = init_state(agent, Spec(**meta["spec"]), 0, meta.get("num_seeds"))
        state, meta = ckpt.restore(template, step)
    finally:
        ckpt.close()
    return agent, state, meta, int(meta["step"])


def evaluate_checkpoint(workdir, step: int | None = None, *, episodes: int | None = None,
                        task_ids: Iterable[int] | None = None, execute_steps: int | None = None,
                        video_path=None, seed: int | None = None, imports: Iterable[str] = (),
                        write_json: bool = True) -> dict:
    """Evaluate a saved checkpoint of ``workdir`` (see :func:`load_checkpoint`); returns the report dict.

    Defaults come from the run's stored config: ``train.eval_episodes``, ``train.execute_steps``,
    ``train.eval_task_ids`` (None: the run's task for single-task data, 1..5 otherwise) and the
    evaluation seed ``train.eval_seed + step + 1000 * seed_index`` (the seed the run used for its
    own evaluation at that step, so the result matches ``eval.csv`` there). With ``num_seeds`` every
    seed is evaluated; ``success`` is the mean over seeds. Writes ``workdir/eval_step{N}.json``.
    """
    from macfw.data.batches import Scaler
    from macfw.logs import write_json_atomic

    agent, state, meta, step = load_checkpoint(workdir, step, imports)
    episodes = int(_run_setting(meta, "episodes", "train.eval_episodes", DEFAULT_EPISODES)
                   if episodes is None else episodes)
    execute_steps = int(_run_setting(meta, "execute_steps", "train.execute_steps", DEFAULT_EXECUTE_STEPS)
                        if execute_steps is None else execute_steps)
    eval_seed = int(_run_setting(meta, "seed", "train.eval_seed", DEFAULT_EVAL_SEED))
    env_name, task_mode = meta["env_name"], meta["task_mode"]
    if task_ids is None:
        task_ids = _run_setting(meta, "task_ids", "train.eval_task_ids", None)
    task_ids = resolve_task_ids(env_name, task_mode, meta.get("task_id"), task_ids)
    obs_scaler = Scaler.from_dict(meta["obs_scaler"])
    goal_scaler = Scaler.from_dict(meta["goal_scaler"]) if meta.get("goal_scaler") else None

    num_seeds = meta.get("num_seeds")
    results = []
    for i, n in enumerate(seed_params(agent, state, num_seeds)):
        s = (eval_seed + step + 1000 * i) if seed is None else int(seed) + 1000 * i
        actor = make_actor(agent, n, obs_scaler, goal_scaler)
        vp = video_path if (video_path is not None and i == 0) else None
        results.append(evaluate(actor, env_name, task_mode=task_mode, task_ids=task_ids, episodes_per_task=episodes,
                                execute_steps=execute_steps, seed=s, video_path=vp))
    tasks = list(results[0].per_task_success)
    report = {
        "workdir": str(Path(workdir).absolute()), "step": step, "env_name": env_name, "task_mode": task_mode,
        "task_ids": list(task_ids), "episodes_per_task": episodes, "execute_steps": execute_steps,
        "success": float(np.mean([r.success for r in results])),
        "per_task_success": {t: float(np.mean([r.per_task_success[t] for r in results])) for t in tasks},
        "episodes": int(sum(r.episodes for r in results)),
        "mean_return": float(np.mean([r.mean_return for r in results])),
        "mean_length": float(np.mean([r.mean_length for r in results])),
        "video_paths": [p for r in results for p in r.video_paths],
        "num_seeds": num_seeds,
        "per_seed": [r.to_dict() for r in results],
    }
    if write_json:
        out = Path(workdir) / f"eval_step{step}.json"
        write_json_atomic(out, report)
        report["json_path"] = str(out)
    return report
