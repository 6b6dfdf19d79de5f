"""The training loop: one compiled, donated step function; hooks every N steps from plain Python.

Units: ``num_steps``, ``log_interval``, ``eval_interval`` and ``save_interval`` count gradient
steps; ``steps_per_dispatch`` gradient steps run per compiled call (``lax.scan``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import gin
import jax
import jax.numpy as jnp
import numpy as np

from macfw.agents.mac import MAC, TrainState, param_checksum
from macfw.checkpoint import Checkpointer
from macfw.data.batches import Scaler, sample_batch
from macfw.data.ogbench_data import LoadedData, OGBenchDataset, default_task_id
from macfw.errors import ConfigError, check, check_float, check_int  # noqa: F401  (macfw.train.ConfigError)


# ------------------------------------------------------------------------------- step function
class NonFiniteError(FloatingPointError):
    """A loss or parameter became NaN/Inf; the message names the step and the loss terms."""


class WorkdirError(PermissionError):
    """The run folder cannot be created or written."""


class Preempted(BaseException):
    """Raised by the SIGTERM/SIGINT handler while nothing is left to save (setup, evaluation).

    A ``BaseException`` (like ``KeyboardInterrupt``) so that library code's ``except Exception``
    does not swallow it; :func:`train` turns it into a clean, interrupted return.
    """


class TrainStep:
    """``step(data, state) -> (state, metrics)``: ``steps_per_dispatch`` MAC updates in one compiled call.

    One ``jax.jit`` with explicit shardings: the state (parameters, optimiser state, target value,
    key) and the on-device dataset replicated over the mesh, every batch sharded along its
    ``data`` axis, the state donated. Batches are sampled on the device from the state's key
    (``host_batches=False``), or passed in, stacked ``(K, B, ...)``, by a host-side prefetcher.
    With ``num_seeds`` the state carries a leading seed axis and the update is vmapped over it.
    Metrics are averaged over the K updates on the device; ``guard/finite`` is 1 when every loss
    and parameter is finite, and ``guard/first_bad`` is the index (0..K-1) of the first update of
    the dispatch that was not. ``debug_nan_at_step=N`` (tests only) multiplies the observations of
    the batch of gradient step N (the update after which ``state.step == N``) by NaN.
    """

    def __init__(self, agent: MAC, template: TrainState, *, batch_size: int, chunk_len: int, steps_per_dispatch: int,
                 normalize_reward: bool = True, mesh=None, host_batches: bool = False, num_seeds: int | None = None,
                 debug_nan_at_step: int | None = None):
        from macfw.parallel import batch_sharded, make_mesh, replicated

        self.mesh = mesh if mesh is not None else make_mesh()
        check_batch_size(batch_size, self.mesh)
        self.agent, self.K, self.host_batches, self.num_seeds = agent, int(steps_per_dispatch), host_batches, num_seeds
        self.batch_size, self.chunk_len, self.normalize_reward = batch_size, chunk_len, normalize_reward
        _, self.static = eqx.partition(template, eqx.is_array)
        goal_conditioned = agent.spec.goal_conditioned
        bshard = batch_sharded(self.mesh)

        def constrain(batch):
            return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, bshard), batch)

        def one(data_or_batch, st: TrainState):
            if host_batches:
                batch = data_or_batch
            else:
                k_batch, k_next = jax.random.split(st.key)
                batch = sample_batch(data_or_batch, k_batch, batch_size, chunk_len=chunk_len, gamma=agent.gamma,
                                     goal_conditioned=goal_conditioned, normalize_reward=normalize_reward)
                st = eqx.tree_at(lambda s: s.key, st, k_next)
            if debug_nan_at_step is not None:
                poison = jnp.where(st.step + 1 == debug_nan_at_step, jnp.nan, 1.0)
                batch = dict(batch)
                for k in ("obs", "next_obs"):
                    if k in batch:
                        batch[k] = batch[k] * poison.astype(batch[k].dtype)
            if num_seeds is None:
                batch = constrain(batch)
            st, metrics = agent.update(st, batch)
            # Scalars only (losses and the gradient norm): a parameter can only turn non-finite
            # through a non-finite gradient, and the parameters are checked once per dispatch below.
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))
            metrics["guard/finite"] = finite.astype(jnp.float32)
            return st, metrics

        if num_seeds is not None:
            one = jax.vmap(one, in_axes=(0 if host_batches else None, 0))

        def run(data, arrays):
            st = eqx.combine(arrays, self.static)
            if host_batches:
                st, metrics = jax.lax.scan(lambda c, b: one(b, c), st, data)
            else:
                st, metrics = jax.lax.scan(lambda c, _: one(data, c), st, None, length=self.K)
            ok = metrics["guard/finite"].reshape(metrics["guard/finite"].shape[0], -1).min(axis=1) >= 1.0  # (K,)
            params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(
                eqx.filter(st.nets, eqx.is_inexact_array))]))
            metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)
            metrics["guard/finite"] = (metrics["guard/finite"] >= 1.0) & params_ok
            metrics["guard/first_bad"] = jnp.argmin(ok).astype(jnp.int32)
            return eqx.partition(st, eqx.is_array)[0], metrics

        repl = replicated(self.mesh)
        data_sharding = repl
        if host_batches:
            from jax.sharding import NamedSharding, PartitionSpec as P

            spec = P(None, None, "data") if num_seeds is not None else P(None, "data")
            data_sharding = NamedSharding(self.mesh, spec)
        self._jit = jax.jit(run, in_shardings=(data_sharding, repl), out_shardings=(repl, repl), donate_argnums=(1,))

    def _placed(self, data, state: TrainState):
        """The dataset (device mode) and the state's arrays, replicated on the mesh.

        Inputs not yet placed there (a state fresh from ``agent.init``) have another type than the
        step's outputs, so feeding the outputs back would trace and compile the step a second time.
        Placing them first (a no-op for arrays already there) compiles it once.
        """
        from macfw.parallel import put_replicated

        arrays = put_replicated(eqx.partition(state, eqx.is_array)[0], self.mesh)
        return (data if self.host_batches else put_replicated(data, self.mesh)), arrays

    def __call__(self, data, state: TrainState):
        arrays, metrics = self._jit(*self._placed(data, state))
        return eqx.combine(arrays, self.static), metrics

    def lower(self, data, state):
        return self._jit.lower(*self._placed(data, state))


def make_train_step(agent: MAC, *, batch_size: int, chunk_len: int, steps_per_dispatch: int,
                    normalize_reward: bool = True, template: TrainState | None = None, mesh=None,
                    host_batches: bool = False, num_seeds: int | None = None,
                    debug_nan_at_step: int | None = None) -> TrainStep:
    """Build the compiled step (see :class:`TrainStep`); ``template`` defaults to a fresh init."""
    if template is None:
        template = agent.init(agent.spec, jax.random.PRNGKey(0))
    return TrainStep(agent, template, batch_size=batch_size, chunk_len=chunk_len, steps_per_dispatch=steps_per_dispatch,
                     normalize_reward=normalize_reward, mesh=mesh, host_batches=host_batches, num_seeds=num_seeds,
                     debug_nan_at_step=debug_nan_at_step)


class HostBatches:
    """Samples ``(K, B, ...)`` batch stacks on the host CPU and prefetches them to the devices.

    For datasets that do not fit in device memory. The sampling key of dispatch ``i`` is
    ``fold_in(key, first step of i)``, so a resumed run draws the same batches without saved state.
    """

    def __init__(self, data, *, key, batch_size: int, chunk_len: int, gamma: float, goal_conditioned: bool,
                 normalize_reward: bool, K: int, sharding, num_seeds: int | None = None):
        import threading
        import queue

        cpu = jax.devices("cpu")[0]
        self.data = jax.device_put(data, cpu)
        self.key = jax.device_put(key, cpu)
        S = num_seeds

        def sample_k(data, key):
            def one(k):
                if S is None:
                    return sample_batch(data, k, batch_size, chunk_len=chunk_len, gamma=gamma,
                                        goal_conditioned=goal_conditioned, normalize_reward=normalize_reward)
                return jax.vmap(lambda kk: sample_batch(data, kk, batch_size, chunk_len=chunk_len, gamma=gamma,
                                                        goal_conditioned=goal_conditioned,
                                                        normalize_reward=normalize_reward))(jax.random.split(k, S))
            return jax.vmap(one)(jax.random.split(key, K))

        self._sample = jax.jit(sample_k)
        self.sharding = sharding
        self._queue: "queue.Queue" = queue.Queue(maxsize=2)
        self._threading = threading
        self._thread = None

    def _make(self, step: int):
        with jax.default_device(jax.devices("cpu")[0]):
            b = self._sample(self.data, jax.random.fold_in(self.key, step))
        return jax.device_put(b, self.sharding)

    def start(self, first_step: int, stride: int, last_step: int):
        def work():
            s = first_step
            while s < last_step:
                self._queue.put(self._make(s))
                s += stride
        self._thread = self._threading.Thread(target=work, daemon=True)
        self._thread.start()

    def next(self):
        return self._queue.get()


# ------------------------------------------------------------------------------- logging
class CSVLog:
    """Append-only CSV with a fixed header; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.fields: list[str] | None = None
        if path.exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
                fields = list(rows[0].keys()) if rows else None
            if resume_step is None:
                rows = []
            else:
                rows = [r for r in rows if int(float(r["step"])) <= resume_step]
            self.fields = fields if rows else None
            tmp = path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                if rows and fields:
                    w = csv.DictWriter(f, fieldnames=fields)
                    w.writeheader()
                    w.writerows(rows)
            os.replace(tmp, path)

    def write(self, row: dict) -> None:
        if self.fields is None:
            self.fields = list(row.keys())
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writeheader()
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(
                {k: row.get(k, "") for k in self.fields})


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("macfw", "jax", "jaxlib", "equinox", "optax", "diffrax", "orbax-checkpoint", "ogbench", "gin-config"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- evaluation
def make_actor(agent: MAC, nets, obs_scaler: Scaler, goal_scaler: Scaler | None):
    """An evaluation actor ``(obs, goal, seed) -> (n, act_dim)`` chunk that scales inputs like training."""
    act = eqx.filter_jit(lambda nets, s, g, k: agent.act(nets, s, g, key=k, acting=True))
    empty = np.zeros((0,), np.float32)

    def actor(obs, goal, seed):
        s = obs_scaler(np.asarray(obs, np.float32))
        g = empty if goal is None or goal_scaler is None else goal_scaler(np.asarray(goal, np.float32))
        return np.asarray(act(nets, jnp.asarray(s), jnp.asarray(g), jax.random.PRNGKey(seed)))

    return actor


def run_evaluation(agent: MAC, nets, loaded: LoadedData, *, episodes: int, task_ids, execute_steps: int,
                   seed: int, video_path=None):
    from macfw.evaluate import evaluate

    actor = make_actor(agent, nets, loaded.obs_scaler, loaded.goal_scaler)
    if task_ids is None:
        if loaded.task_mode == "singletask":
            task_ids = (loaded.task_id or default_task_id(loaded.env_name),)
        else:
            task_ids = (1, 2, 3, 4, 5)
    return evaluate(actor, loaded.env_name, task_mode=loaded.task_mode, task_ids=tuple(task_ids),
                    episodes_per_task=episodes, execute_steps=execute_steps, seed=seed, video_path=video_path)


# ------------------------------------------------------------------------------- the loop
class _Preemption:
    """SIGTERM/SIGINT handling for the whole of :func:`train`.

    A signal sets a flag. During set-up the flag is checked between phases (workdir, data, init,
    checkpoint restore, compiled-step construction) and the run stops there, exits 0, saving
    nothing (there is nothing new). Inside :meth:`interruptible` blocks (data loading or
    generation, which can take long, and evaluations) a signal raises :class:`Preempted` at once.
    In the training loop the flag makes the loop finish the current dispatch (the first one
    includes compilation), save, wait for the save and exit 0. A second SIGINT there stops at once
    (KeyboardInterrupt), after the last started save is waited for.
    """

    def __init__(self, immediate: bool = False):
        import signal

        self.signal = signal
        self.received: int | None = None
        self.immediate = immediate
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (self.signal.SIGTERM, self.signal.SIGINT):
                self._old[sig] = self.signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = signum
        if self.immediate:
            raise Preempted(signum)
        if not first and signum == self.signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            self.signal.signal(sig, old)

    def check(self) -> None:
        """Raise :class:`Preempted` if a signal has arrived (a safe point)."""
        if self.received is not None:
            raise Preempted(self.received)

    def interruptible(self):
        """Context: a signal (or one that already arrived) raises :class:`Preempted` at once."""
        import contextlib

        @contextlib.contextmanager
        def block():
            self.immediate = True
            try:
                self.check()
                yield
            finally:
                self.immediate = False

        return block()

    def agreed(self) -> bool:
        """True on every process once any process got a signal (multi-host: all save the same step)."""
        flag = self.received is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
        return flag


def _check_finite(metrics_host: dict, step: int, K: int) -> None:
    if np.all(metrics_host.get("guard/finite", True)):
        return
    bad = sorted(k for k, v in metrics_host.items() if not k.startswith("guard/") and not np.all(np.isfinite(v)))
    first = int(np.asarray(metrics_host.get("guard/first_bad", 0)).reshape(-1)[0])
    at = step - K + 1 + first
    where = f"step {at}" if K == 1 else f"step {at} (in the dispatch of steps {step - K + 1}..{step})"
    fin = np.asarray(metrics_host["guard/finite"]).reshape(-1)
    seeds = f" in seed index {[i for i, ok in enumerate(fin) if not ok]}" if fin.size > 1 else ""
    terms = "loss term(s) " + ", ".join(bad) if bad else "a parameter (losses were finite)"
    raise NonFiniteError(
        f"Non-finite value at {where}{seeds}: {terms}. The run stopped; no checkpoint was written for this state "
        "(earlier checkpoints are intact). Lower the learning rate, set MAC.grad_clip, or check the data for NaN/Inf.")


def _agree_int(x: int | None) -> int | None:
    """Process 0's value on every process (multi-host); ``x`` itself on a single process."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    v = int(multihost_utils.broadcast_one_to_all(np.array(-1 if x is None else x, np.int64)))
    return None if v < 0 else v


def _check_schedule(K: int, **values) -> None:
    for name, v in values.items():
        ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 and v % K == 0
        check(f"train.{name}", v, ok, f"a positive integer multiple of train.steps_per_dispatch = {K}")


def check_batch_size(batch_size: int, mesh) -> int:
    """``batch_size`` (>= 1) if it splits evenly over the devices on ``mesh``'s data axis.

    Raises:
      ConfigError: otherwise (names train.batch_size, the device count and make_mesh.mesh_shape).
    """
    from macfw.parallel import data_axis_size

    n = data_axis_size(mesh)
    batch_size = check_int("train.batch_size", batch_size)
    check("train.batch_size", batch_size, batch_size % n == 0,
          f"a multiple of the {n} devices on the mesh's data axis (or change make_mesh.mesh_shape)")
    return batch_size


def init_state(agent: MAC, spec, seed: int, num_seeds: int | None = None) -> TrainState:
    """A fresh train state for ``seed``; with ``num_seeds`` K, seeds ``seed .. seed + K - 1`` stacked
    along a leading axis (each identical to a single-seed init with that seed)."""
    if num_seeds is None:
        return agent.init(spec, jax.random.PRNGKey(seed))
    keys = jnp.stack([jax.random.PRNGKey(seed + i) for i in range(num_seeds)])
    return eqx.filter_vmap(lambda k: agent.init(spec, k))(keys)


@gin.configurable
def train(workdir: str | os.PathLike, agent: MAC | None = None, dataset: OGBenchDataset | None = None, *,
          seed: int = 0, num_seeds: int | None = None, num_steps: int = 1_000_000, batch_size: int = 1024,
          chunk_len: int = 10, normalize_reward: bool = True, steps_per_dispatch: int = 1,
          log_interval: int = 1000, eval_interval: int = 100_000, save_interval: int = 100_000,
          max_to_keep: int | None = 3, eval_episodes: int = 15, eval_task_ids: tuple[int, ...] | None = None,
          execute_steps: int = 1, eval_seed: int = 10_000, async_checkpoints: bool = True, progress: bool = True,
          data_on_device: bool | None = None, device_data_limit_gb: float = 8.0,
          debug_nan_at_step: int | None = None) -> dict:
    """Train MAC in ``workdir``, resuming from its newest checkpoint; returns the summary dict.

    Args:
      workdir: run folder (``config.gin``, ``train.csv``, ``eval.csv``, TensorBoard events,
        ``checkpoints/``, ``summary.json``).
      agent, dataset: the registered agent and dataset (Gin: ``train.agent = @MAC()``).
      seed: seed of parameters and of batch sampling.
      num_seeds: train seeds ``seed .. seed + num_seeds - 1`` at once (vmapped, one checkpoint);
        None trains the single seed ``seed``.
      num_steps: total gradient steps.
      batch_size: chunks per gradient step (global, over all devices).
      chunk_len: action-chunk length n in environment steps.
      steps_per_dispatch: gradient steps per compiled call; every interval must be a multiple.
      eval_episodes: evaluation episodes per task; ``eval_task_ids`` tasks (None: the run's task
        for single-task data, 1..5 for goal-conditioned data); ``execute_steps`` actions executed
        per chunk.
      data_on_device: keep the dataset on the devices and sample inside the step (None: when it
        is smaller than ``device_data_limit_gb``), else sample on the host and prefetch.
      debug_nan_at_step: tests only: poison the batch of this gradient step with NaN.

    Resuming: the newest complete checkpoint is restored (falling back to an older one if it is
    unreadable). Settings that change an array shape (network sizes, data sizes, chunk length,
    num_seeds) raise :class:`CheckpointMismatchError`; schedule settings (num_steps, intervals)
    may change freely. SIGTERM/SIGINT: see :class:`_Preemption`; the summary then has
    ``interrupted: True``. Every exit path (return, exception, signal) waits for the last save.

    Raises:
      ConfigError: a value out of range (raised before anything is loaded or written): an
        interval or ``num_steps`` that is not a positive multiple of ``steps_per_dispatch``, a
        batch size below 1 or not divisible by the devices, ``execute_steps`` outside
        1..``chunk_len``, an agent's ``rollout_batch_size`` above ``batch_size``, a network
        binding its constructor rejects (see ``MAC.check_config``), ...
      WorkdirError: ``workdir`` is not writable.
      CheckpointMismatchError: the checkpoint does not fit the configured model or data.
      NonFiniteError: a loss or parameter became NaN/Inf (nothing non-finite is saved).
    """
    from macfw.checkpoint import CheckpointMismatchError
    from macfw.parallel import make_mesh, put_replicated, to_host

    t_start = time.time()
    # Every configured value is checked before anything is loaded or written (ConfigError).
    K = check_int("train.steps_per_dispatch", steps_per_dispatch)
    _check_schedule(K, num_steps=num_steps, log_interval=log_interval, eval_interval=eval_interval,
                    save_interval=save_interval)
    mesh = make_mesh()
    batch_size = check_batch_size(batch_size, mesh)
    chunk_len = check_int("train.chunk_len", chunk_len)
    seed = check_int("train.seed", seed, minimum=0)
    num_seeds = check_int("train.num_seeds", num_seeds, allow_none=True)
    max_to_keep = check_int("train.max_to_keep", max_to_keep, allow_none=True, note="None: keep all")
    eval_episodes = check_int("train.eval_episodes", eval_episodes)
    execute_steps = check_int("train.execute_steps", execute_steps, maximum=chunk_len,
                              note=f"train.chunk_len = {chunk_len}")
    eval_seed = check_int("train.eval_seed", eval_seed, minimum=0)
    check("train.eval_task_ids", eval_task_ids, eval_task_ids is None or (
        isinstance(eval_task_ids, (tuple, list)) and len(eval_task_ids) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 5 for t in eval_task_ids)),
        "None or a non-empty tuple of task ids in 1..5")
    device_data_limit_gb = check_float("train.device_data_limit_gb", device_data_limit_gb, low=0.0, low_open=True)
    debug_nan_at_step = check_int("train.debug_nan_at_step", debug_nan_at_step, allow_none=True)
    agent = agent if agent is not None else MAC()
    dataset = dataset if dataset is not None else OGBenchDataset()
    check_int("MAC.rollout_batch_size", getattr(agent, "rollout_batch_size", None), maximum=batch_size,
              allow_none=True, note=f"train.batch_size = {batch_size}")
    if hasattr(agent, "check_config"):
        agent.check_config(chunk_len)
    workdir = Path(workdir).absolute()
    lead = jax.process_index() == 0

    # Everything that must be closed on the way out, whatever the way.
    ckpt = tb = pbar = None
    progress_state = {"step": None, "last_saved": None}
    summary: dict = {}
    pre = _Preemption()
    with pre:
        try:
            try:
                workdir.mkdir(parents=True, exist_ok=True)
                probe = workdir / f".write_test_{os.getpid()}"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise WorkdirError(f"Workdir {str(workdir)!r} is not writable ({type(e).__name__}: {e}). "
                                   "Pass a writable --workdir.") from e
            with pre.interruptible():  # loading (or generating) the data may take long
                loaded = dataset.load(chunk_len)
            state = put_replicated(init_state(agent, loaded.spec, seed, num_seeds), mesh)
            pre.check()
            ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=max_to_keep, async_save=async_checkpoints)

            def check_meta(m: dict, s: int) -> None:
                saved, now = m.get("spec") or {}, loaded.spec.to_dict()
                words = {"ob_dim": "observation size", "act_dim": "action size", "goal_dim": "goal size",
                         "chunk_len": "chunk length"}
                diffs = [f"{words.get(k, k)} ({k}) {saved.get(k)} in the checkpoint but {v} in the configured data"
                         for k, v in now.items() if k in saved and saved[k] != v]
                if diffs:
                    raise CheckpointMismatchError(
                        f"Checkpoint step {s} in {str(ckpt.directory)!r} does not fit the configured data: "
                        + "; ".join(diffs) + ". Resume with the original dataset (OGBenchDataset.env_name, "
                        "task_mode, dataset_path) and train.chunk_len, or start a new --workdir.")
                if "num_seeds" in m and m["num_seeds"] != num_seeds:
                    raise CheckpointMismatchError(
                        f"Checkpoint step {s} in {str(ckpt.directory)!r} was trained with train.num_seeds="
                        f"{m['num_seeds']!r} but the config has {num_seeds!r}. Use the original value or a new "
                        "--workdir.")

            resume_step = _agree_int(ckpt.latest_step())
            if resume_step is not None:
                state, saved_meta = ckpt.restore(state, None if jax.process_count() == 1 else resume_step,
                                                 check_meta=check_meta)
                state = put_replicated(state, mesh)
                resume_step = int(np.asarray(to_host(state.step)).reshape(-1)[0])
                _warn_scaler_change(saved_meta, loaded)
                print(f"[macfw] resuming from step {resume_step} in {workdir}", flush=True)
            progress_state.update(step=resume_step or 0, last_saved=resume_step)
            pre.check()
            if lead:
                (workdir / "config.gin").write_text(gin.config_str())

            nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(loaded.data))
            on_device = data_on_device if data_on_device is not None else nbytes < device_data_limit_gb * 2**30
            step_fn = TrainStep(agent, state, batch_size=batch_size, chunk_len=chunk_len, steps_per_dispatch=K,
                                normalize_reward=normalize_reward, mesh=mesh, host_batches=not on_device,
                                num_seeds=num_seeds, debug_nan_at_step=debug_nan_at_step)
            host = None
            data = put_replicated(loaded.data, mesh) if on_device else None
            if not on_device:
                from jax.sharding import NamedSharding, PartitionSpec as P

                spec = P(None, None, "data") if num_seeds is not None else P(None, "data")
                host = HostBatches(loaded.data, key=jax.random.PRNGKey(seed + 7919), batch_size=batch_size,
                                   chunk_len=chunk_len, gamma=agent.gamma,
                                   goal_conditioned=loaded.spec.goal_conditioned, normalize_reward=normalize_reward,
                                   K=K, sharding=NamedSharding(mesh, spec), num_seeds=num_seeds)

            train_log = CSVLog(workdir / "train.csv", resume_step) if lead else None
            eval_log = CSVLog(workdir / "eval.csv", resume_step) if lead else None
            if lead:
                from tensorboardX import SummaryWriter

                tb = SummaryWriter(str(workdir), purge_step=resume_step + 1 if resume_step is not None else None)
            meta = {
                "spec": loaded.spec.to_dict(), "obs_scaler": _json_scaler(loaded.obs_scaler),
                "goal_scaler": _json_scaler(loaded.goal_scaler) if loaded.goal_scaler else None,
                "dataset_name": loaded.dataset_name, "env_name": loaded.env_name, "task_mode": loaded.task_mode,
                "task_id": loaded.task_id, "chunk_len": chunk_len, "num_seeds": num_seeds, "seed": seed,
                "sampler": ({"mode": "device", "state": "TrainState.key"} if on_device else
                            {"mode": "host", "state": "derived: fold_in(PRNGKey(seed + 7919), step)"}),
                "gin_config": gin.config_str(), "versions": versions(),
            }

            def seeds_nets():
                nets = jax.tree_util.tree_map(to_host, eqx.filter(state.nets, eqx.is_array))
                nets = eqx.combine(nets, eqx.filter(state.nets, eqx.is_array, inverse=True))
                if num_seeds is None:
                    return [nets]
                return [jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, nets)
                        for i in range(num_seeds)]

            def do_eval(at_step):
                return [run_evaluation(agent, n, loaded, episodes=eval_episodes, task_ids=eval_task_ids,
                                       execute_steps=execute_steps, seed=eval_seed + at_step + 1000 * i)
                        for i, n in enumerate(seeds_nets())]

            step = int(np.asarray(to_host(state.step)).reshape(-1)[0])
            last_eval = None
            last_saved = resume_step
            train_time, timed_steps = 0.0, 0
            if progress and lead:
                from tqdm import tqdm

                pbar = tqdm(total=num_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
            interrupted = False
            if host is not None:
                host.start(step, K, num_steps)

            pre.check()  # from here on a signal means: finish the dispatch, save, exit 0
            first = True
            while step < num_steps:
                t0 = time.perf_counter()
                state, metrics = step_fn(data if host is None else host.next(), state)
                step += K
                m_host = jax.device_get(metrics)  # one small transfer; also the NaN guard
                if not first:
                    train_time += time.perf_counter() - t0
                    timed_steps += K
                first = False
                _check_finite(m_host, step, K)
                progress_state["step"] = step
                ckpt.poll()  # a finished asynchronous save becomes visible
                if pbar is not None:
                    pbar.update(K)
                if lead and (step % log_interval == 0 or step == num_steps):
                    m = {k: float(np.mean(v)) for k, v in m_host.items() if not k.startswith("guard/")}
                    if num_seeds is not None:
                        for k, v in m_host.items():
                            if not k.startswith("guard/"):
                                m.update({f"{k}/seed{i}": float(x) for i, x in enumerate(np.asarray(v))})
                    ups = timed_steps / train_time if train_time > 0 else float("nan")
                    train_log.write({"step": step, "wall_time_s": time.time() - t_start, "updates_per_s": ups, **m})
                    for k, v in m.items():
                        tb.add_scalar(k, v, step)
                    if pbar is not None:
                        pbar.set_postfix({k.split("/")[0][:4] + "/" + k.split("/")[1][:6]: f"{v:.3g}" for k, v in
                                          m.items() if k in ("dynamics/loss", "flow/loss", "value/loss", "critic/loss")})
                stop = pre.agreed()
                if lead and (step % eval_interval == 0 or step == num_steps) and not stop:
                    try:
                        with pre.interruptible():  # an evaluation is abandoned at once on a signal
                            results = do_eval(step)
                    except Preempted:
                        results = None
                        if jax.process_count() == 1:
                            stop = True  # else the next pre.agreed() stops every process together
                    if results is not None:
                        last_eval = results
                        res = _merge_results(results)
                        eval_log.write({"step": step, **_eval_row(res, results)})
                        tb.add_scalar("eval/success", res["success"], step)
                        tqdm_write(pbar, f"[macfw] step {step}: success {res['success']:.3f} over "
                                         f"{res['episodes']} episodes")
                if step % save_interval == 0 or step == num_steps or stop:
                    ckpt.save(step, state, dict(meta, step=step))
                    last_saved = step
                    progress_state["last_saved"] = step
                if stop:
                    interrupted = True
                    who = (f"signal {pre.received}" if pre.received is not None
                           else "another process of this run got a signal")
                    tqdm_write(pbar, f"[macfw] {who}: saving step {step}; exiting. "
                                     "Re-run the same command to resume.")
                    break
            ckpt.wait()
            progress_state["last_saved"] = last_saved

            summary = {"step": step, "interrupted": interrupted, "last_saved_step": last_saved}
            if not interrupted and lead:
                with pre.interruptible():
                    if last_eval is None:  # resumed at (or past) the end, or the last evaluation was abandoned
                        last_eval = do_eval(step)
        except Preempted as p:
            pre.immediate = False
            summary = {"step": progress_state["step"] or 0, "interrupted": True,
                       "last_saved_step": progress_state["last_saved"], "signal": int(p.args[0]) if p.args else None}
            last = progress_state["last_saved"]
            tqdm_write(pbar, f"[macfw] signal {summary['signal']}: stopping (nothing new to save); "
                             + (f"the newest checkpoint is step {last}" if last is not None else "no checkpoint yet")
                             + ". Re-run the same command to resume.")
        except BaseException:
            pre.immediate = False
            _close_quietly(pbar, tb, ckpt)
            raise
        pre.immediate = False
        _close_quietly(pbar, tb, None)
        if ckpt is not None:
            ckpt.close()  # waits for the last save; raises its error
    if summary.get("interrupted") or not lead:
        return summary

    res = _merge_results(last_eval)
    (workdir / "config.gin").write_text(gin.operative_config_str())
    summary.update({
        "success": res["success"],
        "per_task_success": res["per_task_success"],
        "episodes": res["episodes"],
        "updates_per_s": timed_steps / train_time if train_time > 0 else None,
        "wall_time_s": time.time() - t_start,
        "param_checksum": param_checksum(jax.tree_util.tree_map(to_host, eqx.filter(
            (state.nets, state.target_value), eqx.is_array))),
        "dataset": loaded.dataset_name,
        "num_transitions": loaded.num_transitions,
        "spec": loaded.spec.to_dict(),
        "devices": [str(d) for d in jax.devices()],
        "num_processes": jax.process_count(),
        "versions": versions(),
    })
    if num_seeds is not None:
        summary["seeds"] = list(range(seed, seed + num_seeds))
        summary["per_seed_success"] = [r.success for r in last_eval]
        summary["success_std"] = float(np.std(summary["per_seed_success"]))
    write_json_atomic(workdir / "summary.json", summary)
    return summary


def _close_quietly(pbar, tb, ckpt) -> None:
    """Close what is open while an exception propagates: waits for the last save, never masks the error."""
    import warnings

    for obj in (pbar, tb):
        if obj is not None:
            try:
                obj.close()
            except Exception:
                pass
    if ckpt is not None:
        try:
            ckpt.close()
        except Exception as e:  # the original error matters more; say what happened to the save
            warnings.warn(f"While stopping, the last checkpoint save failed too ({type(e).__name__}: {e}).")


def _warn_scaler_change(saved_meta: dict, loaded: LoadedData) -> None:
    import warnings

    for name, scaler in (("obs_scaler", loaded.obs_scaler), ("goal_scaler", loaded.goal_scaler)):
        saved = saved_meta.get(name)
        if saved is None or scaler is None:
            continue
        d = max(float(np.max(np.abs(np.asarray(saved[k], np.float32) - np.asarray(getattr(scaler, k), np.float32))))
                for k in ("lo", "hi"))
        if d > 1e-6:
            warnings.warn(f"The dataset's {name} differs from the checkpoint's (max |difference| {d:.3g}): the "
                          "dataset changed since the checkpoint was written, so the network sees differently "
                          "scaled inputs. Use the original dataset, or start a new --workdir.")


def _merge_results(results) -> dict:
    """Mean over seeds of success and per-task success; total episodes."""
    tasks = results[0].per_task_success.keys()
    return {
        "success": float(np.mean([r.success for r in results])),
        "per_task_success": {t: float(np.mean([r.per_task_success[t] for r in results])) for t in tasks},
        "episodes": int(sum(r.episodes for r in results)),
        "mean_return": float(np.mean([r.mean_return for r in results])),
        "mean_length": float(np.mean([r.mean_length for r in results])),
    }


def _eval_row(res: dict, results) -> dict:
    row = {"success": res["success"], "episodes": res["episodes"],
           **{f"success/{k}": v for k, v in res["per_task_success"].items()},
           "mean_return": res["mean_return"], "mean_length": res["mean_length"]}
    if len(results) > 1:
        row.update({f"success/seed{i}": r.success for i, r in enumerate(results)})
    return row


def tqdm_write(pbar, msg: str) -> None:
    if pbar is not None:
        pbar.write(msg)
    else:
        print(msg, flush=True)


def _json_scaler(scaler: Scaler) -> dict:
    """:meth:`Scaler.to_dict` as JSON lists (checkpoint meta)."""
    return {k: v.tolist() for k, v in scaler.to_dict().items()}
