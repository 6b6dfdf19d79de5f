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

An actor may also have a *batched* form, an attribute ``actor.batched`` (see :data:`BatchedActor`)::

    actor.batched(obs, goals, seeds) -> chunks
        obs:    (B, ob_dim), one row per episode in flight (rows of finished episodes are zeros);
        goals:  (B, goal_dim), or None in ``'singletask'`` mode;
        seeds:  (B,) int64, row i the seed ``actor`` would get for that episode's decision;
        chunks: (B, n, act_dim) (or (B, act_dim) for n = 1). :func:`make_actor` builds both forms
                from one vmapped :meth:`Agent.act`.

Episodes in flight and worker processes: ``batch_size`` episodes (B) run at once, in rounds: at
every round each of them gets one decision -- the actor is called once for all of them (its
``batched`` form on B rows, else once per episode) -- then each executes its chunk; a finished
episode's slot takes the next episode at the next round. The slots' environments are stepped
in ``workers`` worker processes (1: in this process). Every episode is seeded by its (task,
episode) alone; which episodes share a round, and in which rows, depends only on B, the seeds and
the outcomes, so the result (per-episode success, return, length) is the same for any number of
workers, in this process included. B is part of the evaluation's definition, like the seed: a
vmapped policy can round differently at another batch size. ``batch_size=1, workers=1`` is the
one-episode-after-the-other path. Gin: ``evaluate.workers`` (default: the number of CPU cores this
process may use) and ``evaluate.batch_size`` (default: that or 8, the larger; more rows per policy
call make a large policy faster on few cores, e.g. 1.7x over one at a time for MAC's paper-size
networks on 2 cores, against 1.15x with 2 rows). A worker imports numpy, gymnasium and
the environment's module only (never macfw or JAX); an environment registered in the calling
process is rebuilt in the workers from its registered spec.

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
        [--execute_steps E] [--video PATH] [--seed S] [--workers W] [--batch_size B] [--import MODULE]

Video: rendering uses MuJoCo's offscreen renderer, whose OpenGL backend is chosen from the
``MUJOCO_GL`` environment variable when ``mujoco`` is first imported. On a headless Linux machine
(no ``DISPLAY``) this module sets ``MUJOCO_GL=egl`` if it is imported before ``mujoco``, the
variable is unset and libEGL is installed; otherwise set it yourself (``MUJOCO_GL=egl python -m
...``). With Mesa's software EGL (no GPU) a 200x200 frame takes ~0.4 s on 2 CPU cores, so a
video of 5 tasks x 1 episode x 200 steps takes minutes; use small ``width``/``height``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gin

from macfw._mujoco_gl import default_mujoco_gl as _default_mujoco_gl  # noqa: E402
from macfw.errors import check_int

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

_default_mujoco_gl()

import numpy as np  # noqa: E402  (after the MuJoCo backend is chosen)

__all__ = [
    "Actor",
    "BatchedActor",
    "EvalResult",
    "PolicyActor",
    "TASK_MODES",
    "TaskMismatchError",
    "default_batch_size",
    "default_workers",
    "evaluate",
    "evaluate_checkpoint",
    "load_checkpoint",
    "make_actor",
    "resolve_batch_size",
    "resolve_task_ids",
    "resolve_workers",
]

#: ``actor(obs, goal, seed) -> chunk``; see the module docstring for shapes.
Actor = Callable[[np.ndarray, np.ndarray | None, int], np.ndarray]

#: ``batched(obs (B, ob_dim), goals (B, goal_dim) or None, seeds (B,)) -> (B, n, act_dim)``: the
#: batched form of an :data:`Actor` (its attribute ``batched``), row i for episode i in flight.
BatchedActor = Callable[[np.ndarray, np.ndarray | None, np.ndarray], np.ndarray]

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
        per_episode: one dict per episode, in (task, episode) order: ``task`` (id), ``episode``
            (index within the task), ``success`` (0 or 1), ``return`` (undiscounted) and
            ``length`` (environment steps).
    """

    success: float
    per_task_success: dict[str, float]
    episodes: int
    mean_return: float
    mean_length: float
    video_paths: list[str] = dataclasses.field(default_factory=list)
    per_episode: list[dict] = dataclasses.field(default_factory=list)

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
    form = "'{env_name}-singletask-task{i}-v0'" if task_mode == "singletask" else "'{env_name}-v0'"
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
    except (
        gymnasium.error.NameNotFound,
        gymnasium.error.VersionNotFound,
        gymnasium.error.NamespaceNotFound,
    ) as e:  # pragma: no cover - guarded above
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
            dt = float(u.dt)
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
                ims: list[ArrayLike] = list(frames)
                imageio.v2.mimwrite(str(path), ims, fps=fps, macro_block_size=1)
                return path
            except Exception as e:  # e.g. codec problems; fall back to gif
                warnings.warn(f"Could not write mp4 {str(path)!r} ({e!r}); writing a gif instead.", stacklevel=2)
        else:
            warnings.warn(
                f"No mp4 writer (imageio-ffmpeg or PyAV) is installed; writing a gif instead of {str(path)!r}.",
                stacklevel=2,
            )
        path = path.with_suffix(".gif")
    import imageio.v3 as iio

    iio.imwrite(str(path), np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
    return path


class _Recorder:
    """Collects rendered frames per episode; a rendering failure before any episode finished raises,
    later ones warn (and the video stops)."""

    def __init__(self) -> None:
        self.frames: dict[Any, list[np.ndarray]] = {}
        self.fps: float | None = None
        self.failed = False

    def capture(self, env, episodes_done: int, key: Any = None) -> None:
        if self.failed:
            return
        try:
            frame = _to_frame(env.render())
        except Exception as e:
            if episodes_done == 0:
                raise RuntimeError(_gl_hint() + f" Underlying error: {e!r}") from e
            warnings.warn(f"Rendering failed ({e!r}); the video stops here, evaluation goes on.", stacklevel=2)
            self.failed = True
            return
        if self.fps is None:
            self.fps = _env_fps(env)
        self.frames.setdefault(key, []).append(frame)

    def ordered(self, keys) -> list[np.ndarray]:
        """The frames of the episodes ``keys``, one episode after the other."""
        return [f for k in keys for f in self.frames.get(k, [])]


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


def _check_chunk_len(chunk: np.ndarray, execute_steps: int) -> None:
    if execute_steps > chunk.shape[0]:
        raise ValueError(
            f"execute_steps={execute_steps} is larger than the chunk length n={chunk.shape[0]} "
            f"returned by the actor (chunk shape {chunk.shape}); use execute_steps <= {chunk.shape[0]}."
        )


def _missing_success_error(keys) -> ValueError:
    return ValueError(
        f"The environment does not report info['success'] (step info keys: {sorted(keys)}); OGBench environments do."
    )


def _missing_goal_error(keys) -> ValueError:
    return ValueError(
        f"The environment's reset info has no 'goal' (keys: {sorted(keys)}); goal-conditioned "
        "evaluation needs an OGBench goal-conditioned environment."
    )


# ----------------------------------------------------------------------------------------------
# Episodes in flight: slots, run in this process or in worker processes
# ----------------------------------------------------------------------------------------------


def default_workers() -> int:
    """The default number of evaluation worker processes: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _bound(name: str):
    try:
        return gin.query_parameter(f"evaluate.{name}")
    except ValueError:  # not bound
        return None


def resolve_workers(workers: int | None = None) -> int:
    """``workers`` checked; None: the Gin binding ``evaluate.workers``, else :func:`default_workers`.

    Raises:
      ConfigError: not an integer >= 1 (the message names ``evaluate.workers``).
    """
    workers = _bound("workers") if workers is None else workers
    return default_workers() if workers is None else check_int("evaluate.workers", workers)


def default_batch_size() -> int:
    """The default number of episodes in flight: :func:`default_workers` or 8, the larger."""
    return max(8, default_workers())


def resolve_batch_size(batch_size: int | None = None) -> int:
    """``batch_size`` checked; None: the Gin binding ``evaluate.batch_size``, else
    :func:`default_batch_size`.

    Raises:
      ConfigError: not an integer >= 1 (the message names ``evaluate.batch_size``).
    """
    batch_size = _bound("batch_size") if batch_size is None else batch_size
    return default_batch_size() if batch_size is None else check_int("evaluate.batch_size", batch_size)


# What a slot does with its env: the same code in this process and in a worker (which runs this source
# as ``python -c``; here it is exec'd once). A slot keeps its episode's return and length and sums
# the rewards step by step.
#
# Workers are plain ``python -c`` children talking over two pipes (multiprocessing.connection), not
# gymnasium.vector.AsyncVectorEnv. Measured on the 2-core machine (under load), 2 workers of
# cube-double-v0 took 23-36 s to start with AsyncVectorEnv and 16-17 s here: multiprocessing's
# non-fork start methods re-import the caller's main module in every worker (12 s for ``macfw.run``,
# and a script without an ``if __name__ == '__main__'`` guard crashes), and AsyncVectorEnv builds a
# throw-away env in the parent (5 s); 'fork' is unsafe in a JAX process. It also steps every env on
# every call (finished ones step throw-away episodes, as OGBench envs cannot be stepped past their
# end), one round trip per environment step, and holds one env per process. A worker here imports
# numpy, gymnasium and the env's own module only, hosts any number of slots, gets one message per
# decision round (it executes the chunks itself) and idles when its slots have no episode.
_SLOT_SOURCE = r'''
import pickle, signal, sys, traceback
from multiprocessing.connection import Connection


def slot_reset(env, st, seed, options, on_frame=None):
    ob, info = env.reset(seed=seed, options=options)
    st["ret"], st["length"] = 0.0, 0
    if on_frame is not None:
        on_frame(env)
    return ob, (info["goal"] if "goal" in info else None), (None if "goal" in info else sorted(info))


def slot_chunk(env, st, actions, on_frame=None):
    """Execute ``actions`` until the episode ends: (ob, done, return, length, success or None, info keys)."""
    done, info = False, {}
    for action in actions:
        ob, reward, terminated, truncated, info = env.step(action)
        st["ret"] += float(reward)
        st["length"] += 1
        if on_frame is not None:
            on_frame(env)
        if terminated or truncated:
            done = True
            break
    success = float(info["success"]) if done and "success" in info else None
    return ob, done, st["ret"], st["length"], success, (sorted(info) if done and success is None else None)


def serve(rx, tx):
    init = rx.recv()
    sys.path[:0] = [p for p in init["sys_path"] if p not in sys.path]
    env_fn = pickle.loads(init["env_fn"])
    envs = [env_fn() for _ in range(init["n"])]
    states = [{} for _ in envs]
    tx.send(("ok", dict(act_shape=tuple(envs[0].action_space.shape),
                        num_tasks=getattr(envs[0].unwrapped, "num_tasks", None))))
    while True:
        cmd, data = rx.recv()
        if cmd == "close":
            for env in envs:
                env.close()
            tx.send(("ok", None))
            return
        try:
            out = [slot_reset(envs[i], states[i], d["seed"], d["options"]) if c == "reset"
                   else slot_chunk(envs[i], states[i], d) for i, c, d in data]
        except Exception as e:
            tb = traceback.format_exc()
            try:
                blob = pickle.dumps(e)
            except Exception:
                blob = None
            tx.send(("error", (blob, tb)))
            continue
        tx.send(("ok", out))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the workers
    _rx, _tx = Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    try:
        serve(_rx, _tx)
    except (EOFError, KeyboardInterrupt, BrokenPipeError):  # the parent went away
        pass
'''

_SLOT_CODE: dict = {}


def _slot_code() -> dict:
    """The functions of :data:`_SLOT_SOURCE`, for the in-process slots."""
    if not _SLOT_CODE:
        _SLOT_CODE["__name__"] = "macfw_evaluation_slots"  # not "__main__": the worker loop is not run
        exec(compile(_SLOT_SOURCE, "<macfw.evaluation slots>", "exec"), _SLOT_CODE)  # noqa: S102
    return _SLOT_CODE


class _LocalSlots:
    """``n`` slots, each with its own env ``env_fn()``, in this process (``on_frame(slot)``: a callback
    ``f(env)`` run after the reset and every step of that slot, or None)."""

    def __init__(self, env_fn: Callable, n: int, on_frame: Callable | None = None):
        self.code, self.on_frame = _slot_code(), on_frame
        self.envs: list = []
        try:
            for _ in range(n):
                self.envs.append(env_fn())
        except BaseException:
            self.close()
            raise
        self.states = [{} for _ in self.envs]
        self.info = dict(
            act_shape=tuple(self.envs[0].action_space.shape),
            num_tasks=getattr(self.envs[0].unwrapped, "num_tasks", None),
        )

    def run(self, cmds: dict) -> dict:
        """``{slot: ('reset', dict(seed, options)) or ('chunk', actions)}`` -> ``{slot: reply}``, in slot order."""
        out = {}
        for i, (c, d) in cmds.items():
            cb = self.on_frame(i) if self.on_frame is not None else None
            out[i] = (
                self.code["slot_reset"](self.envs[i], self.states[i], d["seed"], d["options"], cb)
                if c == "reset"
                else self.code["slot_chunk"](self.envs[i], self.states[i], d, cb)
            )
        return out

    def close(self, kill: bool = False) -> None:
        for env in self.envs:
            try:
                env.close()
            except Exception:
                pass
        self.envs = []


class WorkerDiedError(RuntimeError):
    """An evaluation worker process ended in the middle of a command (killed, or crashed in MuJoCo).

    :func:`evaluate` starts the workers again and re-runs that environment's episodes with the same
    seeds, up to :data:`WORKER_RESTARTS` times; then this error (its message names the worker, its exit
    code and the end of its stderr) reaches the caller."""


#: How often :func:`evaluate` starts dead evaluation workers again before it gives up (per environment id).
WORKER_RESTARTS = 2


class _WorkerSlots:
    """``n`` slots spread over ``workers`` worker processes (slot i in worker ``i % workers``), each
    worker with its own envs ``env_fn()``.

    :meth:`run` sends every worker its slots' commands at once (they run in parallel) and returns the
    replies; an exception in a worker is re-raised here (with the worker's traceback as a note), a
    worker that died raises RuntimeError with the end of its stderr. :meth:`close` ends the workers.
    """

    def __init__(self, env_fn: Callable, n: int, workers: int):
        import subprocess
        import sys
        import tempfile
        from multiprocessing.connection import Connection

        import cloudpickle

        self.workers = workers
        self.procs, self.rx, self.tx, self.logs = [], [], [], []
        blob = cloudpickle.dumps(env_fn)
        try:
            for _ in range(workers):
                p_r, c_w = os.pipe()  # child -> parent
                c_r, p_w = os.pipe()  # parent -> child
                self.rx.append(Connection(p_r, writable=False))
                self.tx.append(Connection(p_w, readable=False))
                self.logs.append(tempfile.TemporaryFile())
                try:
                    self.procs.append(
                        subprocess.Popen(
                            [sys.executable, "-c", _SLOT_SOURCE, str(c_r), str(c_w)],
                            pass_fds=(c_r, c_w),
                            stdin=subprocess.DEVNULL,
                            stdout=self.logs[-1],
                            stderr=self.logs[-1],
                        )
                    )
                finally:
                    os.close(c_r)
                    os.close(c_w)
            for w, tx in enumerate(self.tx):  # every worker builds its envs at once
                tx.send(dict(sys_path=list(sys.path), env_fn=blob, n=len(range(w, n, workers))))
            self.info = self._replies(range(workers))[0]
        except BaseException:
            self.close(kill=True)
            raise

    def _stderr_tail(self, w: int) -> str:
        try:
            self.logs[w].seek(0)
            return self.logs[w].read().decode(errors="replace")[-3000:]
        except Exception:
            return ""

    def _replies(self, ws) -> list:
        import pickle

        out, error = [], None
        for w in ws:
            try:
                status, data = self.rx[w].recv()
            except (EOFError, OSError):
                try:
                    self.procs[w].wait(timeout=10)
                except Exception:
                    pass
                raise WorkerDiedError(
                    f"Evaluation worker {w} died (exit code {self.procs[w].returncode}); its "
                    f"stderr ends with:\n{self._stderr_tail(w)}"
                ) from None
            if status == "error" and error is None:
                blob, tb = data
                try:
                    error = pickle.loads(blob) if blob is not None else None
                except Exception:
                    error = None
                if isinstance(error, BaseException):
                    if sys.version_info >= (3, 11):  # Python 3.10 has no exception notes
                        error.add_note(f"(raised in evaluation worker {w}:\n{tb})")
                else:
                    error = RuntimeError(f"Evaluation worker {w} failed:\n{tb}")
            out.append(data)
        if error is not None:
            raise error
        return out

    def run(self, cmds: dict) -> dict:
        """``{slot: ('reset', dict(seed, options)) or ('chunk', actions)}`` -> ``{slot: reply}``."""
        per: dict[int, list] = {}
        for i, (c, d) in cmds.items():
            per.setdefault(i % self.workers, []).append((i, c, d))
        for w, items in per.items():
            self.tx[w].send(("run", [(i // self.workers, c, d) for i, c, d in items]))
        out = {}
        for w, replies in zip(per, self._replies(list(per))):
            for (i, _, _), r in zip(per[w], replies):
                out[i] = r
        return out

    def close(self, kill: bool = False) -> None:
        """Ask every worker to exit (``kill``: kill them, e.g. after an error mid-command); waits at most
        about a second in all -- a worker still closing its envs then exits on its own."""
        import time

        for tx in self.tx:
            try:
                tx.send(("close", None))
            except Exception:
                pass
        deadline = time.monotonic() + 1.0
        for proc in self.procs:
            if kill:
                proc.kill()
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # still closing: Popen reaps it later
                pass
        for c in self.rx + self.tx:
            try:
                c.close()
            except Exception:
                pass
        for log in self.logs:
            log.close()
        self.procs, self.rx, self.tx, self.logs = [], [], [], []


class _Live:
    """Book-keeping of the episode in a slot."""

    __slots__ = ("job", "actor_base", "decision", "ob", "goal")

    def __init__(self, job, actor_base: int):
        self.job, self.actor_base, self.decision, self.ob, self.goal = job, actor_base, 0, None, None


def _run_slots(
    slots_env,
    num_slots: int,
    jobs: list,
    actor: Actor,
    *,
    seed: int,
    oracle_goal: bool,
    execute_steps: int,
    on_start: Callable,
    on_done: Callable,
) -> None:
    """Run the episodes ``jobs`` (``(task_id, episode)`` pairs of one env id, in order) with
    ``num_slots`` episodes in flight on ``slots_env`` (:class:`_LocalSlots` or :class:`_WorkerSlots`);
    ``on_start(slot, job)`` before each episode's reset, ``on_done(job, (success, return, length))``
    as each one ends.

    Rounds: free slots take the next episodes (in slot order) and are reset with the episode's own
    seed (and ``task_id`` option); every live episode gets one decision -- the actor is called once,
    ``actor.batched`` on all ``num_slots`` rows (free rows zero, so one compiled shape; row i is slot
    i), or a plain actor once per live episode in slot order -- with its episode's per-decision
    seed; then each slot executes its clipped chunk open-loop for ``execute_steps`` steps, stopping
    at its episode's end. The rounds, rows and inputs depend on ``num_slots``, the seeds and the
    episodes' outcomes only, not on where the slots run, so the result is the same in this process
    and in any number of workers. With one slot this is the one-episode-at-a-time path.
    """
    batched = getattr(actor, "batched", None)
    queue = collections.deque(jobs)
    slots: list[_Live | None] = [None] * num_slots
    act_dim = int(np.prod(slots_env.info["act_shape"]))
    ob_proto = goal_proto = None
    while True:
        # 1. free slots take the next episodes
        resets = {}
        for i in range(num_slots):
            if slots[i] is None and queue:
                task_id, episode = job = queue.popleft()
                env_seed, actor_base = _episode_seeds(seed, task_id, episode)
                slots[i] = _Live(job, actor_base)
                on_start(i, job)
                options = dict(task_id=task_id, render_goal=False) if oracle_goal else None
                resets[i] = ("reset", dict(seed=env_seed, options=options))
        for i, (ob, goal, keys) in slots_env.run(resets).items():
            ep = slots[i]
            assert ep is not None  # reset just now
            ep.ob = ob
            if ob_proto is None:
                ob_proto = np.asarray(ob)
            if oracle_goal:
                if goal is None:
                    raise _missing_goal_error(keys)
                ep.goal = np.asarray(goal)
                if goal_proto is None:
                    goal_proto = ep.goal
        live = {i: ep for i, ep in enumerate(slots) if ep is not None}  # slot -> its episode, in slot order
        if not live:
            return

        # 2. one decision for every live episode
        seeds_now = np.zeros(num_slots, np.int64)
        for i, ep in live.items():
            seeds_now[i] = (ep.actor_base + ep.decision) % _SEED_MOD
            ep.decision += 1
        chunks: dict[int, np.ndarray] = {}
        if batched is not None:
            assert ob_proto is not None  # set at the first reset
            ob_batch = np.zeros((num_slots, *ob_proto.shape), ob_proto.dtype)
            goal_batch = None
            if oracle_goal:
                assert goal_proto is not None  # set at the first reset
                goal_batch = np.zeros((num_slots, *goal_proto.shape), goal_proto.dtype)
            for i, ep in live.items():
                ob_batch[i] = ep.ob
                if goal_batch is not None:
                    goal_batch[i] = ep.goal
            out = np.asarray(batched(ob_batch, goal_batch, seeds_now))
            if out.ndim < 2 or out.shape[0] != num_slots:
                raise ValueError(
                    f"The batched actor returned an array of shape {out.shape} for {num_slots} episodes; expected "
                    f"({num_slots}, n, {act_dim}) (act_dim={act_dim} for this environment)."
                )
            for i in live:
                chunks[i] = _as_chunk(out[i], act_dim)
        else:
            for i, ep in live.items():
                chunks[i] = _as_chunk(actor(np.asarray(ep.ob), ep.goal, int(seeds_now[i])), act_dim)
        for i in live:
            _check_chunk_len(chunks[i], execute_steps)

        # 3. every slot executes its chunk open-loop, stopping at its episode's end
        replies = slots_env.run({i: ("chunk", np.clip(chunks[i][:execute_steps], -1.0, 1.0)) for i in live})
        for i, (ob, done, ret, length, success, keys) in replies.items():
            slots[i].ob = ob
            if done:
                if success is None:
                    raise _missing_success_error(keys)
                job, slots[i] = slots[i].job, None
                on_done(job, (success, ret, length))


def _registered_spec(env_id: str, env_name: str, task_mode: str):
    """The gymnasium spec of ``env_id`` (OGBench's envs registered first); the unknown-id error otherwise."""
    import gymnasium

    _import_ogbench_envs(env_name)
    if env_id not in gymnasium.registry:
        import ogbench.locomaze  # noqa: F401
        import ogbench.manipspace  # noqa: F401
    if env_id not in gymnasium.registry:
        raise _unknown_env_error(env_id, env_name, task_mode)
    return gymnasium.spec(env_id)


@gin.configurable(  # pyright: ignore[reportCallIssue]  (gin's untyped decorator factory)
    "evaluate", module="macfw.evaluation", allowlist=["workers", "batch_size"]
)
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
    workers: int | None = None,
    batch_size: int | None = None,
) -> EvalResult:
    """Evaluate ``actor`` on the OGBench tasks of ``env_name``.

    Args:
        actor: ``actor(obs, goal, seed) -> chunk``: obs (ob_dim,), goal None (singletask) or
            (goal_dim,) (``info['goal']``, e.g. (3,) for cube-single with oraclerep), seed an int
            in [0, 2**31) that differs every decision; chunk (n, act_dim) in [-1, 1], n >= 1
            (clipped to [-1, 1] before execution). Optionally with a batched form
            ``actor.batched`` (:data:`BatchedActor`; :func:`make_actor` builds one), then called
            once per decision round for all episodes in flight.
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
            The evaluation then runs in this process (``workers`` is ignored; the result is the same).
        video_episodes: episodes recorded per task (from the first).
        progress: show a tqdm progress bar over episodes.
        env_kwargs: extra keyword arguments for ``gymnasium.make``.
        workers: worker processes that step the environments (Gin ``evaluate.workers``; None: the
            CPU cores this process may use); 1 steps them in this process. Speed only: the result
            does not depend on it. At most ``batch_size`` are used; not POSIX (Windows): always 1.
        batch_size: episodes in flight (Gin ``evaluate.batch_size``; None: the number of CPU cores
            or 8, the larger), i.e. the rows of each ``actor.batched`` call (fewer when a task group
            has fewer episodes); the workers share them (slot i in worker ``i % workers``). Part of the
            evaluation's definition, like ``seed``: a vmapped policy rounds differently for different
            batch sizes, so the same ``seed`` and ``batch_size`` give the same result, other batch
            sizes may differ at float rounding (which a chaotic simulation can turn into another outcome).
            ``batch_size=1`` (with ``workers=1``) runs one episode after the other, as before. Larger batches are
            faster for large policies on few cores.

    Returns:
        An :class:`EvalResult`: success = mean over tasks of the per-task success rate, where an
        episode's success is ``info['success']`` at its last step.

    Raises:
        ValueError: unknown task_mode (the valid ones are listed); an environment id unknown to
            OGBench/gymnasium (similar registered ids are listed); episodes_per_task < 1,
            execute_steps < 1, video_episodes < 0, empty or invalid task_ids; a video_path
            suffix other than .mp4/.gif; an actor output that is not an (n, act_dim) chunk or
            is shorter than execute_steps; an environment without ``info['success']``. An
            exception raised by an environment in a worker is re-raised here.
        ConfigError: ``workers`` or ``batch_size`` (``evaluate.*``) not an integer >= 1.
        RuntimeError: ``video_path`` was given but MuJoCo cannot render (the message says which
            ``MUJOCO_GL`` to set). This is raised at the first frame, before any episode has
            finished; a later rendering or writing failure only warns, and the evaluation result
            is still returned. A worker process that died.
    """
    plan = _check_plan(
        env_name, task_mode, task_ids, episodes_per_task, execute_steps, seed, video_episodes, workers, batch_size
    )
    out_path = _resolve_video_path(video_path) if video_path is not None else None
    recorder = _Recorder() if out_path is not None and plan.video_episodes > 0 else None
    results = _run_episodes(actor, plan, env_kwargs, recorder=recorder, progress=progress)
    video_paths = _save_video(recorder, out_path, plan)
    return _eval_result(results, plan, video_paths)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """:func:`evaluate`'s checked arguments: which episodes run, and how."""

    env_name: str
    task_mode: str
    task_ids: list[int]
    episodes_per_task: int
    execute_steps: int
    seed: int
    video_episodes: int
    workers: int
    batch_size: int

    @property
    def oracle_goal(self) -> bool:
        """Whether the actor gets a goal (``'oraclerep'`` and ``'goal'`` modes)."""
        return self.task_mode != "singletask"

    def groups(self) -> list[tuple[str, list[tuple[int, int]]]]:
        """The ``(task, episode)`` pairs by environment id: one env id for every task in the
        goal-conditioned modes, one per task otherwise."""
        env_name, episodes = self.env_name, range(self.episodes_per_task)
        if self.oracle_goal:
            return [(f"{env_name}-v0", [(t, e) for t in self.task_ids for e in episodes])]
        return [(f"{env_name}-singletask-task{t}-v0", [(t, e) for e in episodes]) for t in self.task_ids]


def _check_plan(
    env_name, task_mode, task_ids, episodes_per_task, execute_steps, seed, video_episodes, workers, batch_size
) -> _Plan:
    """:func:`evaluate`'s arguments checked (``workers`` and ``batch_size`` None: their defaults; one worker
    where not POSIX).

    Raises:
      ValueError: an argument out of range (see :func:`evaluate`).
      ConfigError: ``workers`` or ``batch_size`` not an integer >= 1.
    """
    if task_mode not in TASK_MODES:
        raise ValueError(f"Unknown task_mode {task_mode!r}; valid task modes are {list(TASK_MODES)}.")
    if not isinstance(env_name, str) or not env_name:
        raise ValueError(f"env_name must be a non-empty string such as 'cube-single'; got {env_name!r}.")
    episodes_per_task = _check_int("episodes_per_task", episodes_per_task)
    execute_steps = _check_int("execute_steps", execute_steps)
    video_episodes = _check_int("video_episodes", video_episodes, minimum=0)
    workers = default_workers() if workers is None else check_int("evaluate.workers", workers)
    batch_size = default_batch_size() if batch_size is None else check_int("evaluate.batch_size", batch_size)
    if os.name != "posix":  # the workers' pipes are passed as POSIX file descriptors
        workers = 1
    return _Plan(
        env_name,
        task_mode,
        _check_task_ids(task_ids),
        episodes_per_task,
        execute_steps,
        seed,
        video_episodes,
        workers,
        batch_size,
    )


def _check_task_ids(task_ids) -> list[int]:
    """``task_ids`` (or a single id) as a list of distinct ints >= 1."""
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
    return task_ids


def _run_episodes(
    actor: Actor, plan: _Plan, env_kwargs: dict | None, *, recorder: _Recorder | None, progress: bool
) -> dict[tuple[int, int], tuple[float, float, int]]:
    """Every episode of ``plan``, one environment id after the other (:meth:`_Plan.groups`), recording the
    first ``video_episodes`` of every task into ``recorder``; returns ``(success, return, length)`` by
    ``(task, episode)``."""
    make_kwargs = dict(env_kwargs or {})
    if recorder is not None:
        make_kwargs.setdefault("render_mode", "rgb_array")
    if plan.task_mode == "oraclerep":
        make_kwargs.setdefault("use_oracle_rep", True)
    groups = plan.groups()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.task_ids) * plan.episodes_per_task, desc=f"eval {plan.env_name}", unit="ep")

    results: dict[tuple[int, int], tuple[float, float, int]] = {}
    current: dict[int, tuple[int, int]] = {}  # slot -> its episode

    def on_done(job, res):
        results[job] = res
        if bar is not None:
            bar.update(1)
            done = [results[(job[0], e)][0] for e in range(plan.episodes_per_task) if (job[0], e) in results]
            bar.set_postfix(task=job[0], success=f"{np.mean(done):.2f}")

    def on_frame(slot):
        job = current[slot]
        rec = recorder
        if rec is None or job[1] >= plan.video_episodes:
            return None
        return lambda env: rec.capture(env, len(results), key=job)

    def run_group(env_id: str, jobs: list) -> None:
        num_slots = min(plan.batch_size, len(jobs))
        slots_env = _open_slots(plan, env_id, make_kwargs, num_slots, record=recorder is not None, on_frame=on_frame)
        ok = False
        try:
            num_tasks = slots_env.info["num_tasks"] if plan.oracle_goal else None
            bad = [t for t in plan.task_ids if num_tasks is not None and t > num_tasks]
            if bad:
                raise ValueError(f"task_ids {bad!r} out of range: {plan.env_name!r} has tasks 1..{num_tasks}.")
            _run_slots(
                slots_env,
                num_slots,
                jobs,
                actor,
                seed=plan.seed,
                oracle_goal=plan.oracle_goal,
                execute_steps=plan.execute_steps,
                on_start=current.__setitem__,
                on_done=on_done,
            )
            ok = True
        finally:
            slots_env.close(kill=not ok)

    try:
        for env_id, jobs in groups:
            for attempt in range(WORKER_RESTARTS + 1):
                try:
                    run_group(env_id, jobs)
                    break
                except WorkerDiedError as e:
                    # every episode of this env id again, with the same seeds and slots: the same results
                    for job in jobs:
                        results.pop(job, None)
                    if bar is not None:
                        bar.n = len(results)
                    if attempt == WORKER_RESTARTS:
                        raise
                    warnings.warn(
                        f"{str(e).split(';')[0]}. Starting the workers again and re-running the {len(jobs)} "
                        f"episodes of {env_id} with the same seeds (restart {attempt + 1} of {WORKER_RESTARTS}).",
                        stacklevel=2,
                    )
    finally:
        if bar is not None:
            bar.close()
    return results


def _open_slots(
    plan: _Plan, env_id: str, make_kwargs: dict, num_slots: int, *, record: bool, on_frame: Callable
) -> _LocalSlots | _WorkerSlots:
    """``num_slots`` slots of ``env_id``: in this process (one worker, or a video being recorded), else in
    worker processes."""
    num_workers = 1 if record else min(plan.workers, num_slots)
    if num_workers <= 1:
        make = functools.partial(_make_env, env_id, plan.env_name, plan.task_mode, make_kwargs)
        return _LocalSlots(make, num_slots, on_frame=on_frame)
    import gymnasium

    # The parent's registered spec (an OGBench one names its entry point by module path, so a
    # worker imports OGBench, not macfw); cloudpickle carries a class defined in a script by value.
    spec = _registered_spec(env_id, plan.env_name, plan.task_mode)
    return _WorkerSlots(functools.partial(gymnasium.make, spec, **make_kwargs), num_slots, num_workers)


def _save_video(recorder: _Recorder | None, out_path: Path | None, plan: _Plan) -> list[str]:
    """Write the recorded episodes (the first ``video_episodes`` of every task, in order) as one video; returns
    the written paths (none when nothing was recorded, or when writing failed: that only warns)."""
    video_paths: list[str] = []
    if recorder is None or out_path is None:
        return video_paths
    episodes = range(min(plan.video_episodes, plan.episodes_per_task))
    frames = recorder.ordered([(t, e) for t in plan.task_ids for e in episodes])
    if frames:
        try:
            written = _write_video(out_path, frames, recorder.fps or 20.0)
            video_paths.append(str(written))
        except Exception as e:
            warnings.warn(
                f"Writing the video to {str(out_path)!r} failed ({e!r}); the evaluation result is kept.",
                stacklevel=3,  # evaluate's caller
            )
    return video_paths


def _eval_result(
    results: dict[tuple[int, int], tuple[float, float, int]], plan: _Plan, video_paths: list[str]
) -> EvalResult:
    """The :class:`EvalResult` of the episodes' ``(success, return, length)`` by ``(task, episode)``."""
    task_ids, episodes = plan.task_ids, range(plan.episodes_per_task)
    per_episode = [
        dict(task=t, episode=e, success=results[(t, e)][0], **{"return": results[(t, e)][1]}, length=results[(t, e)][2])
        for t in task_ids
        for e in episodes
    ]
    per_task = {f"task{t}": float(np.mean([results[(t, e)][0] for e in episodes])) for t in task_ids}
    return EvalResult(
        success=float(np.mean(list(per_task.values()))),
        per_task_success=per_task,
        episodes=len(per_episode),
        mean_return=float(np.mean([r["return"] for r in per_episode])),
        mean_length=float(np.mean([r["length"] for r in per_episode])),
        video_paths=video_paths,
        per_episode=per_episode,
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


def resolve_task_ids(
    env_name: str,
    task_mode: str,
    trained_task_id: int | None,
    task_ids: Iterable[int] | None,
    *,
    source: str = "--tasks",
) -> tuple[int, ...]:
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
                + (
                    f"Fix the Gin binding {source}: omit it or set it to ({trained},)"
                    if "." in source
                    else f"Omit {source} or pass {trained}"
                )
                + "; for another task train a run with OGBenchDataset.task_id."
            )
        return task_ids
    return (1, 2, 3, 4, 5) if task_ids is None else tuple(int(t) for t in task_ids)


def seed_params(agent, state, num_seeds: int | None) -> list:
    """Per seed, :meth:`Agent.acting_params` of ``state`` on the host (one entry without ``num_seeds``)."""
    import equinox as eqx
    import jax

    from macfw.parallel import to_host

    params = agent.acting_params(state)
    params = eqx.combine(
        jax.tree_util.tree_map(to_host, eqx.filter(params, eqx.is_array)),
        eqx.filter(params, eqx.is_array, inverse=True),
    )
    if num_seeds is None:
        return [params]
    return [jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, params) for i in range(num_seeds)]  # noqa: B023  (called within this iteration)


_ACT_BATCH = None


def _act_batch_fn():
    """``f(agent, params, s (E, ob_dim), g (E, goal_dim), seeds (E,) int32) -> (E, k, act_dim)``:
    :meth:`Agent.act` vmapped over the rows, row i with key ``PRNGKey(seeds[i])``; compiled once per
    agent and batch shape (the agent is a static argument, hashed by identity)."""
    global _ACT_BATCH
    if _ACT_BATCH is None:
        import equinox as eqx
        import jax

        def act_batch(agent, params, s, g, seeds):
            return jax.vmap(lambda s, g, seed: agent.act(params, s, g, key=jax.random.PRNGKey(seed)))(s, g, seeds)

        _ACT_BATCH = eqx.filter_jit(act_batch)
    return _ACT_BATCH


class PolicyActor:
    """An agent's policy as an :data:`Actor` with a :data:`BatchedActor` form (:func:`make_actor`).

    ``batched(obs (E, ob_dim), goals (E, goal_dim) or None, seeds (E,)) -> (E, k, act_dim)`` scales
    the inputs like training (float32) and calls :meth:`Agent.act` vmapped over the E rows, row i
    with the key ``PRNGKey(seeds[i])`` (compiled once per agent and E). The single form
    ``actor(obs, goal, seed) -> (k, act_dim)`` is the batched one on a batch of one. A row's result
    does not depend on the other rows, but can differ from another E at float rounding (XLA picks
    other kernels for other shapes), hence :func:`evaluate`'s fixed ``batch_size``. Seeds must be
    in [0, 2**31).
    """

    def __init__(self, agent, params, obs_scaler, goal_scaler):
        self.agent, self.params, self.obs_scaler, self.goal_scaler = agent, params, obs_scaler, goal_scaler

    def batched(self, obs, goals, seeds) -> np.ndarray:
        import jax.numpy as jnp

        s = self.obs_scaler(np.asarray(obs, np.float32))
        if goals is None or self.goal_scaler is None:
            g = np.zeros((s.shape[0], 0), np.float32)
        else:
            g = self.goal_scaler(np.asarray(goals, np.float32))
        seeds = np.asarray(seeds, np.int64)
        if seeds.shape != (s.shape[0],) or np.any(seeds < 0) or np.any(seeds >= _SEED_MOD):
            raise ValueError(f"seeds must be {s.shape[0]} integers in [0, 2**31) (one per row of obs); got {seeds!r}.")
        out = _act_batch_fn()(
            self.agent, self.params, jnp.asarray(s), jnp.asarray(g), jnp.asarray(seeds.astype(np.int32))
        )
        return np.asarray(out)

    def __call__(self, obs, goal, seed) -> np.ndarray:
        goals = None if goal is None else np.asarray(goal)[None]
        return self.batched(np.asarray(obs)[None], goals, np.asarray([seed]))[0]


def make_actor(agent, params, obs_scaler, goal_scaler) -> PolicyActor:
    """An :data:`Actor` ``(obs, goal, seed) -> (k, act_dim)`` with a batched form
    ``actor.batched(obs (E, ob_dim), goals (E, goal_dim) or None, seeds (E,)) -> (E, k, act_dim)``
    (:class:`PolicyActor`): scales inputs like training and calls :meth:`Agent.act` (vmapped,
    compiled once per batch size) on ``params`` (:meth:`Agent.acting_params` of one seed). The
    single call is the batched one on a batch of one."""
    return PolicyActor(agent, params, obs_scaler, goal_scaler)


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
    row = {
        "success": res["success"],
        "episodes": res["episodes"],
        **{f"success/{k}": v for k, v in res["per_task_success"].items()},
        "mean_return": res["mean_return"],
        "mean_length": res["mean_length"],
    }
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
        raise FileNotFoundError(
            f"No checkpoints in {str(workdir)!r} (no folder {str(ckdir)!r}). Pass the --workdir of a training run."
        )
    ckpt = Checkpointer(ckdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"No complete checkpoint in {str(ckdir)!r}.")
        if step is not None and int(step) not in steps:
            raise FileNotFoundError(
                f"No complete checkpoint step {step} in {str(ckdir)!r}; complete steps: {steps}. Fix --step."
            )
        meta = ckpt.read_meta(steps[-1] if step is None else int(step))
        gin.clear_config()
        gin.parse_config(meta["gin_config"])
        try:
            ref = gin.query_parameter("train.agent")
        except ValueError:
            ref = None
        agent = ref.scoped_configurable_fn() if ref is not None and hasattr(ref, "scoped_configurable_fn") else ref
        if agent is None:
            raise FileNotFoundError(
                f"The config stored in {str(ckdir)!r} binds no train.agent; this checkpoint cannot be rebuilt."
            )
        template = init_state(agent, Spec(**meta["spec"]), 0, meta.get("num_seeds"))
        state, meta = ckpt.restore(template, step)
    finally:
        ckpt.close()
    return agent, state, meta, int(meta["step"])


def _run_batch_size(meta: dict, batch_size: int | None) -> int:
    """The episodes in flight to re-evaluate a run with: ``batch_size``, else the run's own
    (``meta['eval']['batch_size']``), else (a run from before batched evaluation) its config's
    ``evaluate.batch_size`` or 1, one episode at a time; checked (:func:`resolve_batch_size`)."""
    if batch_size is None:
        batch_size = (meta.get("eval") or {}).get("batch_size")
    if batch_size is None:  # a run from before batched evaluation: one episode at a time, unless configured
        batch_size = _bound("batch_size") or 1
    return resolve_batch_size(batch_size)


def evaluate_checkpoint(
    workdir,
    step: int | None = None,
    *,
    episodes: int | None = None,
    task_ids: Iterable[int] | None = None,
    execute_steps: int | None = None,
    video_path=None,
    seed: int | None = None,
    imports: Iterable[str] = (),
    write_json: bool = True,
    workers: int | None = None,
    batch_size: int | None = None,
) -> dict:
    """Evaluate a saved checkpoint of ``workdir`` (see :func:`load_checkpoint`); returns the report dict.

    Defaults come from the run's stored config: ``train.eval_episodes``, ``train.execute_steps``,
    ``train.eval_task_ids`` (None: the run's task for single-task data, 1..5 otherwise) and the
    evaluation seed ``train.eval_seed + step + 1000 * seed_index`` (the seed the run used for its
    own evaluation at that step, so the result matches ``eval.csv`` there). With ``num_seeds`` every
    seed is evaluated; ``success`` is the mean over seeds. Writes ``workdir/eval_step{N}.json``.
    ``batch_size`` (episodes in flight, part of the result's definition): None takes the run's own
    (``meta['eval']['batch_size']``, recorded by the training loop; for a run from before batched
    evaluation its config's ``evaluate.batch_size``, else 1, the one-at-a-time path it used).
    ``workers`` (speed only): None takes the config's ``evaluate.workers``, else the number of CPU cores.

    Raises:
      ConfigError: ``workers`` or ``batch_size`` (or the stored ``evaluate.*``) not an integer >= 1.
    """
    from macfw.data.batches import Scaler
    from macfw.logs import write_json_atomic

    if workers is not None:
        workers = check_int("evaluate.workers", workers)
    if batch_size is not None:
        batch_size = check_int("evaluate.batch_size", batch_size)
    agent, state, meta, step = load_checkpoint(workdir, step, imports)
    workers = resolve_workers(workers)  # after the stored config is parsed
    batch_size = _run_batch_size(meta, batch_size)
    episodes = int(
        _run_setting(meta, "episodes", "train.eval_episodes", DEFAULT_EPISODES) if episodes is None else episodes
    )
    execute_steps = int(
        _run_setting(meta, "execute_steps", "train.execute_steps", DEFAULT_EXECUTE_STEPS)
        if execute_steps is None
        else execute_steps
    )
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
        results.append(
            evaluate(
                actor,
                env_name,
                task_mode=task_mode,
                task_ids=task_ids,
                episodes_per_task=episodes,
                execute_steps=execute_steps,
                seed=s,
                video_path=vp,
                workers=workers,
                batch_size=batch_size,
            )
        )
    report = {
        "workdir": str(Path(workdir).absolute()),
        "step": step,
        "env_name": env_name,
        "task_mode": task_mode,
        "task_ids": list(task_ids),
        "episodes_per_task": episodes,
        "execute_steps": execute_steps,
        "workers": workers,
        "batch_size": batch_size,
        **merge_results(results),  # success, per_task_success, episodes, mean_return, mean_length
        "video_paths": [p for r in results for p in r.video_paths],
        "num_seeds": num_seeds,
        "per_seed": [r.to_dict() for r in results],
    }
    if write_json:
        out = Path(workdir) / f"eval_step{step}.json"
        write_json_atomic(out, report)
        report["json_path"] = str(out)
    return report
