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


# ------------------------------------------------------------------------------- step function
def make_train_step(agent: MAC, *, batch_size: int, chunk_len: int, steps_per_dispatch: int,
                    normalize_reward: bool = True):
    """``step(data, state) -> (state, metrics)``: ``steps_per_dispatch`` updates in one ``lax.scan``.

    Batches are sampled on the device from the state's key; metrics are averaged over the scan.
    The state argument is donated.
    """
    goal_conditioned = agent.spec.goal_conditioned

    def one(data, state: TrainState):
        k_batch, k_next = jax.random.split(state.key)
        batch = sample_batch(data, k_batch, batch_size, chunk_len=chunk_len, gamma=agent.gamma,
                             goal_conditioned=goal_conditioned, normalize_reward=normalize_reward)
        state = eqx.tree_at(lambda s: s.key, state, k_next)
        return agent.update(state, batch)

    @eqx.filter_jit(donate="all-except-first")
    def step(data, state):
        def body(st, _):
            st, metrics = one(data, st)
            return st, metrics

        state, metrics = jax.lax.scan(body, state, None, length=steps_per_dispatch)
        return state, jax.tree_util.tree_map(jnp.mean, metrics)

    return step


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
@gin.configurable
def train(workdir: str | os.PathLike, agent: MAC | None = None, dataset: OGBenchDataset | None = None, *,
          seed: int = 0, num_steps: int = 1_000_000, batch_size: int = 1024, chunk_len: int = 10,
          normalize_reward: bool = True, steps_per_dispatch: int = 1, log_interval: int = 1000,
          eval_interval: int = 100_000, save_interval: int = 100_000, max_to_keep: int | None = 3,
          eval_episodes: int = 15, eval_task_ids: tuple[int, ...] | None = None, execute_steps: int = 1,
          eval_seed: int = 10_000, async_checkpoints: bool = True, progress: bool = True) -> dict:
    """Train MAC in ``workdir``, resuming from its newest checkpoint; returns the summary dict.

    Args:
      workdir: run folder (``config.gin``, ``train.csv``, ``eval.csv``, TensorBoard events,
        ``checkpoints/``, ``summary.json``).
      agent, dataset: the registered agent and dataset (Gin: ``train.agent = @MAC()``).
      seed: seed of parameters and of the on-device batch sampling.
      num_steps: total gradient steps.
      batch_size: transitions (chunks) per gradient step.
      chunk_len: action-chunk length n in environment steps.
      steps_per_dispatch: gradient steps per compiled call; every interval must be a multiple.
      eval_episodes: evaluation episodes per task; ``eval_task_ids`` tasks (None: the run's task
        for single-task data, 1..5 for goal-conditioned data); ``execute_steps`` actions executed
        per chunk.

    Raises:
      ValueError: an interval that is not a positive multiple of ``steps_per_dispatch``.
    """
    t_start = time.time()
    agent = agent if agent is not None else MAC()
    dataset = dataset if dataset is not None else OGBenchDataset()
    K = int(steps_per_dispatch)
    for name, v in (("num_steps", num_steps), ("log_interval", log_interval), ("eval_interval", eval_interval),
                    ("save_interval", save_interval)):
        if v < 1 or v % K:
            raise ValueError(f"train.{name} must be a positive multiple of steps_per_dispatch={K}, got {v}.")
    workdir = Path(workdir).absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"Workdir {str(workdir)!r} is not writable ({e}). Pass a writable --workdir.") from e

    loaded = dataset.load(chunk_len)
    state = agent.init(loaded.spec, jax.random.PRNGKey(seed))
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=max_to_keep, async_save=async_checkpoints)
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        state, _ = ckpt.restore(state, resume_step)
        print(f"[macfw] resuming from step {resume_step} in {workdir}", flush=True)
    (workdir / "config.gin").write_text(gin.config_str())

    train_log = CSVLog(workdir / "train.csv", resume_step)
    eval_log = CSVLog(workdir / "eval.csv", resume_step)
    from tensorboardX import SummaryWriter

    tb = SummaryWriter(str(workdir), purge_step=resume_step + 1 if resume_step is not None else None)

    step_fn = make_train_step(agent, batch_size=batch_size, chunk_len=chunk_len, steps_per_dispatch=K,
                              normalize_reward=normalize_reward)
    meta = {
        "spec": loaded.spec.to_dict(), "obs_scaler": _tolist(loaded.obs_scaler),
        "goal_scaler": _tolist(loaded.goal_scaler) if loaded.goal_scaler else None,
        "dataset_name": loaded.dataset_name, "env_name": loaded.env_name, "task_mode": loaded.task_mode,
        "task_id": loaded.task_id, "chunk_len": chunk_len, "gin_config": gin.config_str(), "versions": versions(),
    }

    step = int(state.step)
    last_eval = None
    train_time, timed_steps = 0.0, 0
    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=num_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    try:
        first = True
        while step < num_steps:
            t0 = time.perf_counter()
            state, metrics = step_fn(loaded.data, state)
            step += K
            if not first:
                jax.block_until_ready(metrics)
                train_time += time.perf_counter() - t0
                timed_steps += K
            first = False
            if pbar is not None:
                pbar.update(K)
            if step % log_interval == 0 or step == num_steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                ups = timed_steps / train_time if train_time > 0 else float("nan")
                row = {"step": step, "wall_time_s": time.time() - t_start, "updates_per_s": ups, **m}
                train_log.write(row)
                for k, v in m.items():
                    tb.add_scalar(k, v, step)
                if pbar is not None:
                    pbar.set_postfix({k.split("/")[0][:4] + "/" + k.split("/")[1][:6]: f"{v:.3g}" for k, v in m.items()
                                      if k in ("dynamics/loss", "flow/loss", "value/loss", "critic/loss")})
            if step % eval_interval == 0 or step == num_steps:
                res = run_evaluation(agent, state.nets, loaded, episodes=eval_episodes, task_ids=eval_task_ids,
                                     execute_steps=execute_steps, seed=eval_seed + step)
                last_eval = res
                row = {"step": step, "success": res.success, "episodes": res.episodes,
                       **{f"success/{k}": v for k, v in res.per_task_success.items()},
                       "mean_return": res.mean_return, "mean_length": res.mean_length}
                eval_log.write(row)
                tb.add_scalar("eval/success", res.success, step)
                for k, v in res.per_task_success.items():
                    tb.add_scalar(f"eval/success_{k}", v, step)
                tqdm_write(pbar, f"[macfw] step {step}: success {res.success:.3f} over {res.episodes} episodes")
            if step % save_interval == 0 or step == num_steps:
                ckpt.save(step, state, dict(meta, step=step))
        ckpt.wait()
    finally:
        if pbar is not None:
            pbar.close()
        tb.close()
        ckpt.close()

    if last_eval is None:  # resumed at (or past) the end: evaluate the final state
        last_eval = run_evaluation(agent, state.nets, loaded, episodes=eval_episodes, task_ids=eval_task_ids,
                                   execute_steps=execute_steps, seed=eval_seed + step)
    (workdir / "config.gin").write_text(gin.operative_config_str())
    summary = {
        "step": step,
        "success": last_eval.success,
        "per_task_success": last_eval.per_task_success,
        "episodes": last_eval.episodes,
        "updates_per_s": timed_steps / train_time if train_time > 0 else None,
        "wall_time_s": time.time() - t_start,
        "param_checksum": param_checksum((state.nets, state.target_value)),
        "dataset": loaded.dataset_name,
        "num_transitions": loaded.num_transitions,
        "spec": loaded.spec.to_dict(),
        "devices": [str(d) for d in jax.devices()],
        "versions": versions(),
    }
    write_json_atomic(workdir / "summary.json", summary)
    return summary


def tqdm_write(pbar, msg: str) -> None:
    if pbar is not None:
        pbar.write(msg)
    else:
        print(msg, flush=True)


def _tolist(scaler: Scaler) -> dict:
    return {"lo": np.asarray(scaler.lo).tolist(), "hi": np.asarray(scaler.hi).tolist()}
