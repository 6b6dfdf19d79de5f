"""The training loop, for any registered :class:`~macfw.agents.base.Agent`.

:func:`train` runs in named phases, each in one place:

1. :func:`check_settings`: every ``train.*`` value, before anything is written;
2. :func:`claim_workdir`: the run folder, locked for the whole run (one writer per folder,
   :mod:`macfw.workdir_lock`), then :func:`build`: the data (to the agent's batch spec), the mesh
   and a fresh state;
3. :func:`restore_or_initialize`: the newest complete checkpoint, or the fresh state;
4. the loop: one compiled, donated call of K updates (:class:`macfw.step.TrainStep`) per
   iteration, then the hooks (:class:`LogHook`, :class:`EvalHook`, :class:`SaveHook`), each
   acting every N gradient steps; the rows of the first two go to the run's loggers
   (``train.loggers``, :mod:`macfw.loggers`: CSV, TensorBoard, Weights & Biases, your own);
5. :func:`summarize`: ``summary.json``.

Units: ``num_steps``, ``log_interval``, ``eval_interval`` and ``save_interval`` count gradient
steps; ``steps_per_dispatch`` gradient steps run per compiled call (``lax.scan``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import equinox as eqx
import gin
import jax
import numpy as np

from macfw import diskfull, registry
from macfw.agents.base import Agent, param_checksum
from macfw.checkpoint import Checkpointer, CheckpointMismatchError
from macfw.data.ogbench_data import LoadedData
from macfw.errors import ConfigError, check, check_float, check_int
from macfw.evaluation import (
    DEFAULT_EPISODES,
    DEFAULT_EVAL_SEED,
    DEFAULT_EXECUTE_STEPS,
    TaskMismatchError,
    eval_row,
    evaluate,
    make_actor,
    merge_results,
    resolve_batch_size,
    resolve_task_ids,
    resolve_workers,
    seed_params,
)
from macfw.loggers import DEFAULT_LOGGERS, make_loggers, open_loggers
from macfw.logs import json_scaler, tqdm_write, versions, write_json_atomic
from macfw.parallel import make_mesh, put_replicated, to_host
from macfw.signals import Preempted, Preemption
from macfw.step import (
    HostBatches,
    NonFiniteError,
    Refresher,
    TrainStep,
    check_batch_size,
    check_finite,
    init_state,
    make_train_step,
)
from macfw.workdir_lock import WorkdirBusyError, WorkdirLock

if TYPE_CHECKING:
    from macfw.data.host_sampler import ShardedBatches

__all__ = [
    "train",
    "TrainStep",
    "make_train_step",
    "HostBatches",
    "init_state",
    "NonFiniteError",
    "ConfigError",
    "WorkdirError",
    "WorkdirBusyError",
    "Preempted",
]

#: Host-mode batches are drawn from ``fold_in(PRNGKey(seed + HOST_KEY_OFFSET), step)``.
HOST_KEY_OFFSET = 7919


class WorkdirError(PermissionError):
    """The run folder cannot be created or written."""


# ------------------------------------------------------------------------------- 1. settings
def check_settings(
    *,
    agent,
    dataset,
    mesh,
    steps_per_dispatch,
    num_steps,
    log_interval,
    eval_interval,
    save_interval,
    batch_size,
    seed,
    num_seeds,
    max_to_keep,
    eval_episodes,
    eval_task_ids,
    execute_steps,
    eval_seed,
    device_data_limit_gb,
    debug_nan_at_step,
    data_on_device=None,
    loggers=DEFAULT_LOGGERS,
) -> dict:
    """Check every ``train.*`` value and the agent's own configuration, before anything is loaded or
    written; returns the checked values by name (``K`` = ``steps_per_dispatch``; ``loggers``: the
    loggers built from their Gin bindings, not yet opened).

    Raises:
      ConfigError: naming the binding, the value received and the allowed range.
    """
    if not isinstance(agent, Agent):
        raise ConfigError(
            f"train.agent = {agent!r} is not an agent: bind a registered one, e.g. train.agent = "
            f"@MAC() (registered agents: {registry.registered('agent')})."
        )
    if dataset is None:
        raise ConfigError("train.dataset = None is not a dataset: bind one, e.g. train.dataset = @OGBenchDataset().")
    K = check_int("train.steps_per_dispatch", steps_per_dispatch)
    for name, v in dict(
        num_steps=num_steps, log_interval=log_interval, eval_interval=eval_interval, save_interval=save_interval
    ).items():
        ok = bool(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 and v % K == 0)
        check(f"train.{name}", v, ok, f"a positive integer multiple of train.steps_per_dispatch = {K}")
    batch_size = check_batch_size(batch_size, mesh)
    max_exec = agent.chunk_len if agent.acts_in_chunks else 1
    out = dict(
        K=K,
        batch_size=batch_size,
        seed=check_int("train.seed", seed, minimum=0),
        num_seeds=check_int("train.num_seeds", num_seeds, allow_none=True),
        max_to_keep=check_int("train.max_to_keep", max_to_keep, allow_none=True, note="None: keep all"),
        eval_episodes=check_int("train.eval_episodes", eval_episodes),
        execute_steps=check_int(
            "train.execute_steps",
            execute_steps,
            maximum=max_exec,
            note=f"actions per decision of {type(agent).__name__}",
        ),
        eval_seed=check_int("train.eval_seed", eval_seed, minimum=0),
        device_data_limit_gb=check_float("train.device_data_limit_gb", device_data_limit_gb, low=0.0, low_open=True),
        debug_nan_at_step=check_int("train.debug_nan_at_step", debug_nan_at_step, allow_none=True),
        loggers=make_loggers(loggers, "train.loggers"),
    )
    check(
        "train.eval_task_ids",
        eval_task_ids,
        eval_task_ids is None
        or (
            isinstance(eval_task_ids, (tuple, list))
            and len(eval_task_ids) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 5 for t in eval_task_ids)
        ),
        "None or a non-empty tuple of task ids in 1..5",
    )
    check(
        "train.data_on_device",
        data_on_device,
        not (data_on_device and getattr(dataset, "sampling", "uniform") == "shard_rotation"),
        "False or None with OGBenchDataset.sampling = 'shard_rotation' (shard rotation samples on the host)",
    )
    agent.check_config(batch_size)
    rs = agent.refresh_spec()
    if rs is not None:
        check(
            rs.binding,
            rs.every,
            rs.every % K == 0,
            f"a positive multiple of train.steps_per_dispatch = {K} (the loop refreshes between compiled calls)",
        )
        check(rs.binding, rs.every, rs.first % rs.every == 0, f"a divisor of the first refresh step {rs.first}")
    _check_eval_tasks_fit(dataset, eval_task_ids)
    return out


def _check_eval_tasks_fit(dataset, eval_task_ids) -> None:
    """Refuse ``train.eval_task_ids`` other than the trained task of single-task data (when the dataset
    names its environment, mode and task).

    Raises:
      TaskMismatchError: see :func:`macfw.evaluation.resolve_task_ids`.
    """
    if eval_task_ids is not None and all(hasattr(dataset, a) for a in ("env_name", "task_mode", "task_id")):
        try:
            resolve_task_ids(
                dataset.env_name, dataset.task_mode, dataset.task_id, eval_task_ids, source="train.eval_task_ids"
            )
        except TaskMismatchError:
            raise
        except Exception:  # e.g. an unknown environment: the data loader names it
            pass


# ------------------------------------------------------------------------------- 2. build
@dataclasses.dataclass
class Run:
    """What every phase and hook of one run shares."""

    workdir: Path
    agent: Agent
    loaded: LoadedData
    mesh: Any
    state: Any
    seed: int
    num_seeds: int | None
    lead: bool
    pre: Preemption
    ckpt: Checkpointer | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    on_device: bool = True  # where batches are sampled (decide_placement)
    data_info: dict = dataclasses.field(default_factory=dict)  # what summary.json says about the data
    pbar: Any = None
    loggers: list = dataclasses.field(default_factory=list)  # open loggers (macfw.loggers); lead process only
    t_start: float = dataclasses.field(default_factory=time.time)


def _not_writable(workdir: Path, e: OSError) -> WorkdirError:
    return WorkdirError(
        f"Workdir {str(workdir)!r} is not writable ({type(e).__name__}: {e}). Pass a writable --workdir."
    )


def open_workdir(workdir) -> Path:
    """Create ``workdir`` and prove it is writable.

    Raises:
      WorkdirError: it cannot be created or written.
    """
    workdir = Path(workdir).absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise _not_writable(workdir, e) from e
    return workdir


def claim_workdir(workdir) -> tuple[Path, WorkdirLock | None]:
    """Create ``workdir``, take its lock (:mod:`macfw.workdir_lock`; the lead process only) and prove it
    is writable (:func:`open_workdir`), before anything in it is read or changed. The other processes
    of a multi-host run learn the lead's outcome, so that all of them stop when it cannot go on.

    Returns:
      the absolute path, and the lock held (None on the other processes): release it when done.

    Raises:
      WorkdirBusyError: another run holds the lock (names its PID and host, and the fix); nothing
        in ``workdir`` was changed.
      WorkdirError: ``workdir`` cannot be created or written.
    """
    workdir = Path(workdir).absolute()
    lead = jax.process_index() == 0
    lock, error = None, None
    if lead:
        try:
            try:
                workdir.mkdir(parents=True, exist_ok=True)
                lock = WorkdirLock(workdir).acquire()
            except OSError as e:
                raise _not_writable(workdir, e) from e
            open_workdir(workdir)
        except (WorkdirBusyError, WorkdirError) as e:
            error = e
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    outcome = _agree_int(0 if error is None else 1 if isinstance(error, WorkdirBusyError) else 2)
    if error is not None:
        if lock is not None:
            lock.release()
        raise error
    if outcome == 1:
        raise WorkdirBusyError(
            f"Workdir {str(workdir)!r} is in use by another run (process 0 of this run found its "
            "lock held; its error names the holder). Wait for that run to finish or stop it, or "
            "pass a different --workdir."
        )
    if outcome == 2:
        raise WorkdirError(
            f"Workdir {str(workdir)!r} could not be opened by process 0 of this run (its error says "
            "why). Pass a writable --workdir."
        )
    if not lead:
        workdir = open_workdir(workdir)
    return workdir, lock


def build(workdir: Path, agent: Agent, dataset, *, mesh, seed: int, num_seeds: int | None, pre: Preemption) -> Run:
    """Load the data the agent's batch spec needs, build the mesh and a fresh state."""
    bspec = agent.batch_spec
    with pre.interruptible():  # loading (or generating) the data may take long
        try:
            loaded = dataset.load(bspec.chunk_len, bspec.window)
        except ConfigError as e:  # trajectories shorter than the agent's window: name the agent's binding
            binding = bspec.binding or f"{type(agent).__name__}.chunk_len"
            raise ConfigError(str(e).replace("train.chunk_len", binding)) from e
    state = put_replicated(init_state(agent, loaded.spec, seed, num_seeds), mesh)
    pre.check()
    return Run(
        workdir=workdir,
        agent=agent,
        loaded=loaded,
        mesh=mesh,
        state=state,
        seed=seed,
        num_seeds=num_seeds,
        lead=jax.process_index() == 0,
        pre=pre,
    )


def is_sharded(data) -> bool:
    """Whether ``data`` is a directory of memory-mapped shards (:class:`macfw.data.shards.ShardedData`)."""
    from macfw.data.shards import ShardedData

    return isinstance(data, ShardedData)


def decide_placement(run: Run, *, data_on_device: bool | None, device_data_limit_gb: float) -> bool:
    """Keep the data on the devices (sample inside the step) or sample on the host: ``data_on_device``
    when set, else on the devices when the dataset (a sharded one materialised) is smaller than
    ``device_data_limit_gb``; sharded data in ``shard_rotation`` mode is always sampled on the host.
    Sets ``run.on_device`` and ``run.data_info``."""
    data = run.loaded.data
    sharded = is_sharded(data)
    nbytes = data.nbytes if sharded else sum(x.nbytes for x in jax.tree_util.tree_leaves(data))
    rotation = sharded and data.sampling == "shard_rotation"
    if data_on_device is not None:
        on_device = bool(data_on_device)
    else:
        on_device = (not rotation) and nbytes < device_data_limit_gb * 2**30
    run.on_device = on_device
    info = {
        "sampler": "device" if on_device else ("host-shards" if sharded else "host"),
        "bytes": int(nbytes),
        "sharded": sharded,
    }
    if sharded:
        info.update(
            num_shards=data.num_shards,
            sampling=data.sampling,
            disk_bytes=data.disk_bytes,
            convert_s=round(data.convert_s, 3),
            scaler_source=data.scaler_source,
        )
        if rotation:
            info["rotation_interval"] = data.rotation_interval
    run.data_info = info
    return on_device


def _check_sampler_meta(run: Run, m: dict, where: str) -> None:
    """Refuse to resume a sharded run on other shards (or, sampled on the host, another sampling): the
    data stream would silently change."""
    saved = m.get("sampler") or {}
    data = run.loaded.data
    if not is_sharded(data) or "shards" not in saved:
        return
    key = lambda lst: [(d.get("name"), d.get("rows"), d.get("size")) for d in lst]  # noqa: E731
    if key(saved["shards"]) != key(data.describe()):
        old, new = key(saved["shards"]), key(data.describe())
        diff = sorted(set(old) ^ set(new))[:4]
        raise CheckpointMismatchError(
            f"{where} was trained on {len(old)} shard(s) but OGBenchDataset.dataset_path now holds {len(new)} "
            f"different ones (e.g. {diff}: name, rows, bytes): the data stream would change. Restore the original "
            "shards (or set OGBenchDataset.max_shards), or start a new --workdir."
        )
    if saved.get("mode") == "host-shards" and not run.on_device:
        for k in ("sampling", "rotation_interval"):
            now = (
                data.sampling
                if k == "sampling"
                else (data.rotation_interval if data.sampling == "shard_rotation" else None)
            )
            if saved.get(k) != now:
                raise CheckpointMismatchError(
                    f"{where} sampled its shards with {k} = {saved.get(k)!r} but the config "
                    f"has {now!r} (OGBenchDataset.{k}). Use the original value or a new "
                    "--workdir."
                )


# ------------------------------------------------------------------------------- 3. restore
def _agree_int(x: int | None) -> int | None:
    """Process 0's value on every process (multi-host); ``x`` itself on a single process."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    v = int(multihost_utils.broadcast_one_to_all(np.array(-1 if x is None else x, np.int64)))
    return None if v < 0 else v


def _check_meta(run: Run, m: dict, s: int) -> None:
    """Refuse a checkpoint written for another agent, other data sizes or another number of seeds."""
    assert run.ckpt is not None  # restore_or_initialize opens it before it restores
    where = f"Checkpoint step {s} in {str(run.ckpt.directory)!r}"
    agent_name = type(run.agent).__name__
    if m.get("agent", agent_name) != agent_name:
        raise CheckpointMismatchError(
            f"{where} was trained by agent {m['agent']!r} but the config has "
            f"train.agent = @{agent_name}(). Use the original agent or a new --workdir."
        )
    saved, now = m.get("spec") or {}, run.loaded.spec.to_dict()
    words = {
        "ob_dim": "observation size",
        "act_dim": "action size",
        "goal_dim": "goal size",
        "chunk_len": "chunk length",
    }
    diffs = [
        f"{words.get(k, k)} ({k}) {saved.get(k)} in the checkpoint but {v} in the configured data"
        for k, v in now.items()
        if k in saved and saved[k] != v
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"{where} does not fit the configured data: " + "; ".join(diffs) + ". Resume with the original dataset "
            "(OGBenchDataset.env_name, task_mode, dataset_path) and chunk length, or start a new --workdir."
        )
    if "num_seeds" in m and m["num_seeds"] != run.num_seeds:
        raise CheckpointMismatchError(
            f"{where} was trained with train.num_seeds={m['num_seeds']!r} but the config "
            f"has {run.num_seeds!r}. Use the original value or a new --workdir."
        )
    _check_sampler_meta(run, m, where)


def restore_or_initialize(run: Run, *, max_to_keep: int | None, async_checkpoints: bool) -> int | None:
    """Open the checkpoints and restore the newest complete step into ``run.state``; returns its step
    (None: a fresh start)."""
    run.ckpt = Checkpointer(run.workdir / "checkpoints", max_to_keep=max_to_keep, async_save=async_checkpoints)
    resume_step = _agree_int(run.ckpt.latest_step())
    if resume_step is not None:
        state, saved_meta = run.ckpt.restore(
            run.state, None if jax.process_count() == 1 else resume_step, check_meta=lambda m, s: _check_meta(run, m, s)
        )
        run.state = put_replicated(state, run.mesh)
        resume_step = current_step(run.state)
        _warn_scaler_change(saved_meta, run.loaded)
        print(f"[macfw] resuming from step {resume_step} in {run.workdir}", flush=True)
    run.pre.check()
    return resume_step


def current_step(state) -> int:
    return int(np.asarray(to_host(state.step)).reshape(-1)[0])


def _warn_scaler_change(saved_meta: dict, loaded: LoadedData) -> None:
    import warnings

    for name, scaler in (("obs_scaler", loaded.obs_scaler), ("goal_scaler", loaded.goal_scaler)):
        saved = saved_meta.get(name)
        if saved is None or scaler is None:
            continue
        d = max(
            float(np.max(np.abs(np.asarray(saved[k], np.float32) - np.asarray(getattr(scaler, k), np.float32))))
            for k in ("lo", "hi")
        )
        if d > 1e-6:
            warnings.warn(
                f"The dataset's {name} differs from the checkpoint's (max |difference| {d:.3g}): the "
                "dataset changed since the checkpoint was written, so the network sees differently "
                "scaled inputs. Use the original dataset, or start a new --workdir.",
                stacklevel=2,
            )


# ------------------------------------------------------------------------------- 4. hooks
class LogHook:
    """The training metrics, every ``every`` gradient steps: a ``'train'`` row (``step``, ``wall_time_s``,
    ``updates_per_s``, the agent's metrics; with several seeds their mean and one per seed) to every
    logger of the run, and the progress bar."""

    def __init__(self, run: Run, every: int, resume_step: int | None):
        self.run, self.every = run, every

    def __call__(self, step: int, m_host: dict, updates_per_s: float, final: bool) -> None:
        run = self.run
        if not run.lead or not (step % self.every == 0 or final):
            return
        m = {k: float(np.mean(v)) for k, v in m_host.items() if not k.startswith("guard/")}
        if run.num_seeds is not None:
            for k, v in m_host.items():
                if not k.startswith("guard/"):
                    m.update({f"{k}/seed{i}": float(x) for i, x in enumerate(np.asarray(v))})
        row = {"wall_time_s": time.time() - run.t_start, "updates_per_s": updates_per_s, **m}
        for lg in run.loggers:
            lg.log(step, row, "train")
        if run.pbar is not None:
            run.pbar.set_postfix(
                {
                    k.split("/")[0][:4] + "/" + k.split("/")[1][:6]: f"{v:.3g}"
                    for k, v in m.items()
                    if k.endswith("/loss") and k.count("/") == 1 and not k.startswith("total")
                }
            )


class EvalHook:
    """Evaluates every seed in the OGBench simulator every ``every`` gradient steps; the ``'eval'`` row
    (``eval.csv``'s columns) goes to every logger of the run."""

    def __init__(
        self,
        run: Run,
        every: int,
        resume_step: int | None,
        *,
        episodes: int,
        task_ids,
        execute_steps: int,
        eval_seed: int,
    ):
        self.run, self.every = run, every
        self.episodes, self.task_ids, self.execute_steps, self.eval_seed = episodes, task_ids, execute_steps, eval_seed
        self.workers = resolve_workers()  # Gin evaluate.workers (default: the CPU cores), checked before training
        self.batch_size = resolve_batch_size()  # Gin evaluate.batch_size: part of the result, saved for re-evaluation
        if isinstance(run.meta.get("eval"), dict):
            run.meta["eval"]["batch_size"] = self.batch_size
        self.last: list | None = None

    def evaluate(self, step: int) -> list:
        run = self.run
        out = []
        for i, params in enumerate(seed_params(run.agent, run.state, run.num_seeds)):
            actor = make_actor(run.agent, params, run.loaded.obs_scaler, run.loaded.goal_scaler)
            out.append(
                evaluate(
                    actor,
                    run.loaded.env_name,
                    task_mode=run.loaded.task_mode,
                    task_ids=self.task_ids,
                    episodes_per_task=self.episodes,
                    execute_steps=self.execute_steps,
                    seed=self.eval_seed + step + 1000 * i,
                    workers=self.workers,
                    batch_size=self.batch_size,
                )
            )
        return out

    def __call__(self, step: int, final: bool) -> bool:
        """Evaluate when due; returns True when a signal abandoned the evaluation (single process: stop)."""
        run = self.run
        if not run.lead or not (step % self.every == 0 or final):
            return False
        try:
            with run.pre.interruptible():  # an evaluation is abandoned at once on a signal
                results = self.evaluate(step)
        except Preempted:
            return jax.process_count() == 1  # else the next pre.agreed() stops every process together
        self.last = results
        row = eval_row(results)
        for lg in run.loggers:
            lg.log(step, row, "eval")
        tqdm_write(run.pbar, f"[macfw] step {step}: success {row['success']:.3f} over {row['episodes']} episodes")
        return False


class SaveHook:
    """A checkpoint every ``every`` gradient steps, at the end, and when the run stops on a signal."""

    def __init__(
        self, run: Run, every: int, resume_step: int | None, sigkill_after: int | None = None, sampler_state=None
    ):
        self.run, self.every, self.last_saved, self.sigkill_after = run, every, resume_step, sigkill_after
        self.sampler_state = sampler_state  # step -> dict (host-sampled shards), saved in the meta's 'sampler'

    def __call__(self, step: int, final: bool, stop: bool) -> None:
        if step % self.every == 0 or final or stop:
            ckpt = self.run.ckpt
            assert ckpt is not None  # opened by restore_or_initialize
            meta: dict[str, Any] = dict(self.run.meta, step=step)
            if self.sampler_state is not None:
                meta["sampler"] = dict(meta["sampler"], state=self.sampler_state(step))
            ckpt.save(step, self.run.state, meta)
            self.last_saved = step
            if step == self.sigkill_after:  # tests only (train.debug_sigkill_after_save)
                import signal

                ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)


def sampler_meta(run: Run, on_device: bool, host=None) -> dict:
    """The checkpoint meta's ``'sampler'`` entry: where batches come from and what fixes their stream.

    Device: the state's key. Host, one file: ``fold_in(PRNGKey(seed + HOST_KEY_OFFSET), dispatch's
    first step)``. Host, shards (:class:`macfw.data.host_sampler.ShardedBatches`): the key data,
    ``fold_in(key, gradient step)`` per step, the sampling mode and interval, the shards (name, rows,
    bytes) and the scaling statistics' source; every checkpoint adds the sampler ``state`` (the step
    and grain's iterator state), so a resumed run continues the same stream bit for bit. Sharded
    data on the device also records its shards.
    """
    data = run.loaded.data
    if on_device:
        out = {"mode": "device", "state": "state.key"}
        if is_sharded(data):
            out.update(shards=data.describe(), scaler_source=data.scaler_source)
        return out
    if host is not None and hasattr(host, "sampler"):
        return {"mode": "host-shards", "key": f"PRNGKey(seed + {HOST_KEY_OFFSET})", **host.sampler.describe()}
    return {"mode": "host", "state": f"derived: fold_in(PRNGKey(seed + {HOST_KEY_OFFSET}), step)"}


def run_meta(run: Run, *, eval_settings: dict, on_device: bool, host=None) -> dict:
    """The JSON meta saved with every checkpoint (see :mod:`macfw.checkpoint`)."""
    loaded = run.loaded
    return {
        "agent": type(run.agent).__name__,
        "batch_spec": dataclasses.asdict(run.agent.batch_spec),
        "spec": loaded.spec.to_dict(),
        "obs_scaler": json_scaler(loaded.obs_scaler),
        "goal_scaler": json_scaler(loaded.goal_scaler) if loaded.goal_scaler else None,
        "dataset_name": loaded.dataset_name,
        "env_name": loaded.env_name,
        "task_mode": loaded.task_mode,
        "task_id": loaded.task_id,
        "chunk_len": loaded.spec.chunk_len,
        "num_seeds": run.num_seeds,
        "seed": run.seed,
        "eval": eval_settings,
        "sampler": sampler_meta(run, on_device, host),
        "gin_config": gin.config_str(),
        "versions": versions(),
    }


# ------------------------------------------------------------------------------- 5. summary
def summarize(run: Run, *, step: int, last_saved, eval_results: list, updates_per_s) -> dict:
    """``summary.json`` (DESIGN §6) after a finished run."""
    res = merge_results(eval_results)
    summary = {
        "step": step,
        "interrupted": False,
        "last_saved_step": last_saved,
        "agent": type(run.agent).__name__,
        "success": res["success"],
        "per_task_success": res["per_task_success"],
        "episodes": res["episodes"],
        "updates_per_s": updates_per_s,
        "wall_time_s": time.time() - run.t_start,
        "param_checksum": param_checksum(jax.tree_util.tree_map(to_host, eqx.filter(run.state, eqx.is_array))),
        "dataset": run.loaded.dataset_name,
        "num_transitions": run.loaded.num_transitions,
        "data": run.data_info,
        "spec": run.loaded.spec.to_dict(),
        "devices": [str(d) for d in jax.devices()],
        "num_processes": jax.process_count(),
        "versions": versions(),
    }
    if run.num_seeds is not None:
        summary["seeds"] = list(range(run.seed, run.seed + run.num_seeds))
        summary["per_seed_success"] = [r.success for r in eval_results]
        summary["per_seed_per_task_success"] = [dict(r.per_task_success) for r in eval_results]
        summary["success_std"] = float(np.std(summary["per_seed_success"]))
    return summary


# ------------------------------------------------------------------------------- the loop
@gin.configurable
def train(
    workdir: str | os.PathLike,
    agent: Agent | None = None,
    dataset=None,
    *,
    seed: int = 0,
    num_seeds: int | None = None,
    num_steps: int = 1_000_000,
    batch_size: int = 1024,
    steps_per_dispatch: int = 1,
    log_interval: int = 1000,
    eval_interval: int = 100_000,
    save_interval: int = 100_000,
    max_to_keep: int | None = 3,
    eval_episodes: int = DEFAULT_EPISODES,
    eval_task_ids: tuple[int, ...] | None = None,
    execute_steps: int = DEFAULT_EXECUTE_STEPS,
    eval_seed: int = DEFAULT_EVAL_SEED,
    async_checkpoints: bool = True,
    progress: bool = True,
    data_on_device: bool | None = None,
    device_data_limit_gb: float = 8.0,
    debug_nan_at_step: int | None = None,
    debug_sigkill_after_save: int | None = None,
    loggers: tuple[str, ...] = DEFAULT_LOGGERS,
) -> dict:
    """Train ``agent`` on ``dataset`` in ``workdir``, resuming from its newest checkpoint; returns the summary.

    Args:
      workdir: run folder (``config.gin``, ``train.csv``, ``eval.csv``, TensorBoard events,
        ``checkpoints/``, ``summary.json``; ``wandb/`` and ``wandb_run_id`` with W&B).
      agent, dataset: a registered agent and dataset (Gin: ``train.agent = @MAC()``). The batch
        (chunk length, n-step targets, future observations) follows ``agent.batch_spec``.
      seed: seed of parameters and of batch sampling.
      num_seeds: train seeds ``seed .. seed + num_seeds - 1`` at once (vmapped, one checkpoint);
        None trains the single seed ``seed``.
      num_steps: total gradient steps.
      batch_size: samples per gradient step (global, over all devices).
      steps_per_dispatch: gradient steps per compiled call; every interval must be a multiple.
      eval_episodes: evaluation episodes per task; ``eval_task_ids`` tasks (None: the run's task
        for single-task data, 1..5 for goal-conditioned data); ``execute_steps`` actions executed
        per decision (at most the chunk length for chunk agents, 1 for single-action agents).
      data_on_device: keep the dataset on the devices and sample inside the step (None: when it
        is smaller than ``device_data_limit_gb``), else sample on the host and prefetch. A
        directory of shards (``OGBenchDataset.dataset_path``) on the devices is materialised from
        its memory maps; on the host it is sampled from them without loading
        (:mod:`macfw.data.host_sampler`), always so with ``OGBenchDataset.sampling =
        'shard_rotation'`` (True is then a ConfigError).
      loggers: the loggers by name (:mod:`macfw.loggers`): ``'csv'`` (``train.csv``,
        ``eval.csv``), ``'tensorboard'``, ``'wandb'`` (Weights & Biases; ``pip install -e
        '.[wandb]'``; offline without a W&B login), or a logger you registered. Only the lead
        process logs.
      debug_nan_at_step: tests only: poison the batch of this gradient step with NaN.
      debug_sigkill_after_save: tests only: SIGKILL this process once the checkpoint of this
        gradient step is complete (a crash between a save and the next dispatch).

    Resuming: the newest complete checkpoint is restored (falling back to an older one if it is
    unreadable). Settings that change an array shape (network sizes, data sizes, chunk length,
    num_seeds, the agent) raise :class:`CheckpointMismatchError`; schedule settings (num_steps,
    intervals) may change freely. SIGTERM/SIGINT: see :class:`macfw.signals.Preemption`; the
    summary then has ``interrupted: True``. Every exit path waits for the last save.

    Raises:
      ConfigError: a value out of range, raised before anything is loaded or written: a ``train.*``
        value (an interval not a positive multiple of ``steps_per_dispatch``, a batch size not
        divisible by the devices, ``execute_steps`` above the agent's actions per decision, an
        unknown logger in ``loggers`` (the registered ones are listed), ``'wandb'`` without the
        wandb package, ...) or a binding of the agent or its networks (:meth:`Agent.check_config`).
      WorkdirError: ``workdir`` is not writable.
      WorkdirBusyError: another run holds ``workdir``'s lock (one writer per run folder,
        :mod:`macfw.workdir_lock`): it is named (PID, host); nothing in ``workdir`` was changed.
      CheckpointMismatchError: the checkpoint does not fit the configured agent or data.
      NonFiniteError: a loss or parameter became NaN/Inf (nothing non-finite is saved).
    """
    o = _Options(**locals())  # the arguments by name: as the first statement, locals() holds them only
    mesh = make_mesh()
    c = _check_options(o, mesh)
    workdir, lock = claim_workdir(workdir)  # before anything in workdir is read or changed
    try:
        return _train_in(workdir, o, mesh, c)
    finally:
        if lock is not None:
            lock.release()  # after the last save and summary.json


@dataclasses.dataclass(frozen=True)
class _Options:
    """:func:`train`'s arguments as passed (``workdir`` before it is claimed); :func:`check_settings`
    checks them."""

    workdir: str | os.PathLike
    agent: Agent | None
    dataset: Any
    seed: int
    num_seeds: int | None
    num_steps: int
    batch_size: int
    steps_per_dispatch: int
    log_interval: int
    eval_interval: int
    save_interval: int
    max_to_keep: int | None
    eval_episodes: int
    eval_task_ids: tuple[int, ...] | None
    execute_steps: int
    eval_seed: int
    async_checkpoints: bool
    progress: bool
    data_on_device: bool | None
    device_data_limit_gb: float
    debug_nan_at_step: int | None
    debug_sigkill_after_save: int | None
    loggers: tuple[str, ...]


@dataclasses.dataclass
class _Progress:
    """The newest step reached and the newest saved, for the summary of a run a signal stops."""

    step: int = 0
    last_saved: int | None = None


@dataclasses.dataclass
class _Outcome:
    """How the run ended: its summary so far (``step``, ``interrupted``, ``last_saved_step``; ``signal``
    when a signal stopped it with nothing new to save) and, after a finished run, what
    :func:`summarize` adds (the lead's last evaluation, the updates per second)."""

    summary: dict
    eval_results: list | None = None
    updates_per_s: float | None = None


@dataclasses.dataclass
class _Loop:
    """What the loop drives: the compiled step, where its batches come from (the dataset on the
    devices, or ``host`` batches), the refresher and the hooks."""

    step_fn: TrainStep
    data: Any
    host: HostBatches | ShardedBatches | None
    refresher: Refresher | None
    logger: LogHook
    evaluator: EvalHook
    saver: SaveHook

    def batches(self):
        """The next dispatch's batches: the dataset on the devices, or the next host-made stack."""
        return self.data if self.host is None else self.host.next()

    def refresh_data(self):
        """What the refresher samples start states from."""
        return self.data if self.host is None else self.host.data


def _check_options(o: _Options, mesh) -> dict:
    """:func:`check_settings` on ``train``'s arguments."""
    return check_settings(
        agent=o.agent,
        dataset=o.dataset,
        mesh=mesh,
        steps_per_dispatch=o.steps_per_dispatch,
        num_steps=o.num_steps,
        log_interval=o.log_interval,
        eval_interval=o.eval_interval,
        save_interval=o.save_interval,
        batch_size=o.batch_size,
        seed=o.seed,
        num_seeds=o.num_seeds,
        max_to_keep=o.max_to_keep,
        eval_episodes=o.eval_episodes,
        eval_task_ids=o.eval_task_ids,
        execute_steps=o.execute_steps,
        eval_seed=o.eval_seed,
        device_data_limit_gb=o.device_data_limit_gb,
        debug_nan_at_step=o.debug_nan_at_step,
        data_on_device=o.data_on_device,
        loggers=o.loggers,
    )


def _train_in(workdir: Path, o: _Options, mesh, c: dict) -> dict:
    """:func:`train` in the claimed ``workdir``: build, restore, the loop and ``summary.json``, all under one
    :class:`Preemption`. A signal with nothing new to save returns an interrupted summary; any other
    error closes what is open (waiting for the last save) and propagates."""
    assert o.agent is not None  # check_settings refused anything but an Agent
    pre = Preemption()
    run: Run | None = None
    progress = _Progress()
    with pre:
        try:
            run = build(workdir, o.agent, o.dataset, mesh=mesh, seed=o.seed, num_seeds=o.num_seeds, pre=pre)
            out = _set_up_and_loop(run, o, c, progress)
        except Preempted as p:
            pre.immediate = False
            out = _Outcome(_preempted_summary(run, p, progress))
        except BaseException:
            pre.immediate = False
            if run is not None:
                _close_quietly([run.pbar, *run.loggers], run.ckpt)
            raise
        pre.immediate = False
        if run is not None:
            _close_quietly([run.pbar, *run.loggers], None)
            if run.ckpt is not None:
                run.ckpt.close()  # waits for the last save; raises its error
    if out.summary.get("interrupted"):
        return out.summary
    assert run is not None  # only a signal (an interrupted summary) stops the run before it is built
    if not run.lead:
        return out.summary
    (workdir / "config.gin").write_text(gin.operative_config_str())
    assert out.eval_results is not None  # the lead evaluates the last step before it finishes
    summary = summarize(
        run,
        step=out.summary["step"],
        last_saved=out.summary["last_saved_step"],
        eval_results=out.eval_results,
        updates_per_s=out.updates_per_s,
    )
    write_json_atomic(workdir / "summary.json", summary)
    return summary


def _preempted_summary(run: Run | None, p: Preempted, progress: _Progress) -> dict:
    """The summary of a run a signal stopped with nothing new to save (set-up, an evaluation), said on the
    console too."""
    summary = {
        "step": progress.step,
        "interrupted": True,
        "last_saved_step": progress.last_saved,
        "signal": int(p.args[0]) if p.args else None,
    }
    last = progress.last_saved
    tqdm_write(
        run.pbar if run else None,
        f"[macfw] signal {summary['signal']}: stopping (nothing new to save); "
        + (f"the newest checkpoint is step {last}" if last is not None else "no checkpoint yet")
        + ". Re-run the same command to resume.",
    )
    return summary


def _set_up_and_loop(run: Run, o: _Options, c: dict, progress: _Progress) -> _Outcome:
    """Restore (or initialize), set up and run the loop; after a full run the lead makes sure the last
    step is evaluated."""
    K = c["K"]
    resume_step, eval_task_ids, on_device = _restore(run, o, progress)
    loop = _make_loop(run, o, c, resume_step=resume_step, eval_task_ids=eval_task_ids, on_device=on_device)
    step = current_step(run.state)
    if o.progress and run.lead:
        from tqdm import tqdm

        run.pbar = tqdm(total=o.num_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    if loop.host is not None:
        loop.host.start(step, K, o.num_steps)

    run.pre.check()  # from here on a signal means: finish the dispatch, save, exit 0
    step, interrupted, updates_per_s = _loop(run, loop, step=step, num_steps=o.num_steps, K=K, progress=progress)
    assert run.ckpt is not None  # opened by restore_or_initialize
    run.ckpt.wait()
    close = getattr(loop.host, "close", None)
    if close is not None:
        close()  # the prefetch threads of host-sampled shards
    summary = {"step": step, "interrupted": interrupted, "last_saved_step": loop.saver.last_saved}
    if not interrupted and run.lead:
        with run.pre.interruptible():
            if loop.evaluator.last is None:  # resumed at (or past) the end, or the last evaluation was abandoned
                loop.evaluator.last = loop.evaluator.evaluate(step)
    return _Outcome(summary, loop.evaluator.last, updates_per_s)


def _restore(run: Run, o: _Options, progress: _Progress) -> tuple[int | None, tuple[int, ...], bool]:
    """The evaluation tasks, the data's placement, the newest checkpoint restored (``progress`` follows
    it) and ``config.gin``; returns the step resumed from (None: a fresh start), the tasks and whether
    the data is on the devices."""
    loaded = run.loaded
    eval_task_ids = resolve_task_ids(loaded.env_name, loaded.task_mode, loaded.task_id, o.eval_task_ids)
    on_device = decide_placement(run, data_on_device=o.data_on_device, device_data_limit_gb=o.device_data_limit_gb)
    resume_step = restore_or_initialize(run, max_to_keep=o.max_to_keep, async_checkpoints=o.async_checkpoints)
    progress.step, progress.last_saved = resume_step or 0, resume_step
    if run.lead:
        (run.workdir / "config.gin").write_text(gin.config_str())
    return resume_step, eval_task_ids, on_device


def _make_loop(
    run: Run, o: _Options, c: dict, *, resume_step: int | None, eval_task_ids: tuple[int, ...], on_device: bool
) -> _Loop:
    """In this order: the compiled step, its batches' source, the refresher, the checkpoint meta, the open
    loggers (the lead's) and the hooks."""
    agent, K = run.agent, c["K"]
    step_fn = TrainStep(
        agent,
        run.state,
        batch_size=o.batch_size,
        steps_per_dispatch=K,
        mesh=run.mesh,
        host_batches=not on_device,
        num_seeds=o.num_seeds,
        debug_nan_at_step=o.debug_nan_at_step,
    )
    data = _device_data(run) if on_device else None
    host = None if on_device else _host_batches(run, o, K)
    refresher = (
        Refresher(agent, run.state, seed=o.seed, mesh=run.mesh, num_seeds=o.num_seeds)
        if agent.refresh_spec() is not None
        else None
    )
    eval_settings = dict(
        episodes=o.eval_episodes, execute_steps=o.execute_steps, seed=o.eval_seed, task_ids=list(eval_task_ids)
    )
    run.meta = run_meta(run, eval_settings=eval_settings, on_device=on_device, host=host)
    if run.lead:  # the others log nothing
        open_loggers(
            c["loggers"], run.workdir, resume_step=resume_step, config_str=gin.config_str(), opened=run.loggers
        )
    logger = LogHook(run, o.log_interval, resume_step)
    evaluator = EvalHook(
        run,
        o.eval_interval,
        resume_step,
        episodes=o.eval_episodes,
        task_ids=eval_task_ids,
        execute_steps=o.execute_steps,
        eval_seed=o.eval_seed,
    )
    saver = SaveHook(
        run,
        o.save_interval,
        resume_step,
        sigkill_after=check_int("train.debug_sigkill_after_save", o.debug_sigkill_after_save, allow_none=True),
        sampler_state=getattr(host, "state", None),
    )
    return _Loop(step_fn, data, host, refresher, logger, evaluator, saver)


def _device_data(run: Run):
    """The dataset on the devices, sampled inside the step (sharded data that fits: all its shards)."""
    data = run.loaded.data
    return put_replicated(data.to_chunk_data(run.agent.batch_spec.window) if is_sharded(data) else data, run.mesh)


def _host_batches(run: Run, o: _Options, K: int) -> HostBatches | ShardedBatches:
    """Batches sampled on the host and prefetched, from ``PRNGKey(seed + HOST_KEY_OFFSET)``: from the memory
    maps of a directory of shards (:class:`macfw.data.host_sampler.ShardedBatches`), else
    :class:`HostBatches`."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    spec = P(None, None, "data") if o.num_seeds is not None else P(None, "data")
    host_key = jax.random.PRNGKey(o.seed + HOST_KEY_OFFSET)
    bspec, goal_conditioned = run.agent.batch_spec, run.loaded.spec.goal_conditioned
    if is_sharded(run.loaded.data):
        from macfw.data.host_sampler import ShardedBatches, ShardSampler

        sampler = ShardSampler(run.loaded.data, batch_spec=bspec, goal_conditioned=goal_conditioned, key=host_key)
        return ShardedBatches(
            sampler,
            batch_size=o.batch_size,
            K=K,
            sharding=NamedSharding(run.mesh, spec),
            num_seeds=o.num_seeds,
            prefetch=getattr(o.dataset, "prefetch", 2),
            threads=getattr(o.dataset, "prefetch_threads", 1),
        )
    return HostBatches(
        run.loaded.data,
        key=host_key,
        batch_size=o.batch_size,
        batch_spec=bspec,
        goal_conditioned=goal_conditioned,
        K=K,
        sharding=NamedSharding(run.mesh, spec),
        num_seeds=o.num_seeds,
    )


def _loop(
    run: Run, loop: _Loop, *, step: int, num_steps: int, K: int, progress: _Progress
) -> tuple[int, bool, float | None]:
    """Dispatch ``K`` gradient steps at a time from ``step`` until ``num_steps`` or a signal (that step
    is saved), the hooks after each dispatch. Returns the step reached, whether a signal stopped the
    loop, and the updates per second (the first dispatch, which compiles, untimed; None: none timed)."""
    assert run.ckpt is not None  # opened by restore_or_initialize
    train_time, timed_steps, first, interrupted = 0.0, 0, True, False
    while step < num_steps:
        t0 = time.perf_counter()
        run.state, metrics = loop.step_fn(loop.batches(), run.state)
        step += K
        m_host = jax.device_get(metrics)  # one small transfer; also the NaN guard
        if not first:
            train_time += time.perf_counter() - t0
            timed_steps += K
        first = False
        check_finite(m_host, step, K)
        if loop.refresher is not None and loop.refresher.due(step):  # e.g. MOPO's model-rollout buffer
            run.state, m_ref = loop.refresher(loop.refresh_data(), run.state, step)
            m_host.update(jax.device_get(m_ref))
        progress.step = step
        run.ckpt.poll()  # a finished asynchronous save becomes visible
        if run.pbar is not None:
            run.pbar.update(K)
        ups = timed_steps / train_time if train_time > 0 else float("nan")
        if _after_dispatch(run, loop, step, m_host, ups, final=step == num_steps, progress=progress):
            interrupted = True
            break
    return step, interrupted, timed_steps / train_time if train_time > 0 else None


def _after_dispatch(
    run: Run, loop: _Loop, step: int, m_host: dict, ups: float, *, final: bool, progress: _Progress
) -> bool:
    """The hooks after a dispatch: log; save; evaluate unless a signal arrived (on any process). Returns
    True when the run stops here (a signal: this step is saved).

    The save comes before the evaluation (and runs in the background while it goes on), so an evaluation
    that crashes or is killed loses no training: the re-run resumes from this step. A signal that
    arrives during the evaluation saves this step if it was not saved already."""
    loop.logger(step, m_host, ups, final)
    stop = run.pre.agreed()
    loop.saver(step, final, stop)
    if not stop:
        stop = loop.evaluator(step, final)
        if stop and loop.saver.last_saved != step:
            loop.saver(step, final, stop)
    progress.last_saved = loop.saver.last_saved
    if stop:
        who = (
            f"signal {run.pre.received}" if run.pre.received is not None else "another process of this run got a signal"
        )
        tqdm_write(run.pbar, f"[macfw] {who}: saving step {step}; exiting. Re-run the same command to resume.")
    return stop


def _close_quietly(objs, ckpt) -> None:
    """Close what is open (the progress bar, the loggers), then the checkpointer: waits for the last save;
    while an exception propagates, never masks it."""
    import warnings

    for obj in objs:
        if obj is not None:
            try:
                obj.close()
            except Exception as e:
                if diskfull.is_disk_full(e):  # the error that stops the run says it, in one line
                    diskfull.note(e)
                    continue
                warnings.warn(
                    f"While stopping, closing {type(obj).__name__} failed ({type(e).__name__}: {e}).", stacklevel=2
                )
    if ckpt is not None:
        try:
            ckpt.close()
        except Exception as e:  # the original error matters more; say what happened to the save
            if diskfull.is_disk_full(e):
                diskfull.note(e)
                return
            warnings.warn(
                f"While stopping, the last checkpoint save failed too ({type(e).__name__}: {e}).", stacklevel=2
            )
