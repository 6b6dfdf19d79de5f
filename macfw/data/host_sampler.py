"""Host-side batches from memory-mapped shards, prefetched in the background (DESIGN §10).

:class:`ShardSampler` draws whole batches of an agent's :class:`~macfw.agents.base.BatchSpec` from
a :class:`~macfw.data.shards.ShardedData` by vectorised index arithmetic, in three steps:

1. indices (one jitted JAX call on the host CPU): the chunk start ``t``, its trajectory's final row
   and the hindsight goal rows, drawn with the very key use of
   :func:`macfw.data.batches.sample_batch` (``split(key, 8)``, the same ``randint``/``geometric``
   draws via the shared :func:`~macfw.data.batches.goal_indices`, with the spec's
   :class:`~macfw.data.goals.GoalSampling`); the ``r``-th valid start is
   found in the trajectory table (:meth:`ShardedData.index_tables`), not in a column of starts;
2. rows (numpy): one gather per column and shard from the memory maps, only for the batch rows this
   process holds (multi-host: its shard of the global batch);
3. values: observations and goals scaled exactly as :meth:`OGBenchDataset.prepare` scales them
   (numpy), single-task chunk rewards by the shared :func:`~macfw.data.batches.chunk_reward`
   (jitted, the same XLA reduction as the device path).

So on the rows of the concatenated shards the host batch equals ``sample_batch`` of the same key
field for field and bit for bit (tests/test_shards.py), and every agent consumes it unchanged.

Keys and order: the batch of gradient step ``j`` (the update taking ``state.step`` from ``j`` to
``j + 1``) is drawn from ``fold_in(key, j)`` (seed ``i`` of ``num_seeds``: ``split(fold_in(key, j),
S)[i]``), ``key = PRNGKey(seed + macfw.train.HOST_KEY_OFFSET)``. Sampling ``'uniform'``: starts
uniform over the valid starts of all shards, random goals over all rows. ``'shard_rotation'`` (the
authors' scheme, DESIGN §10): step ``j`` samples only shard ``(j // rotation_interval) % S``
(starts and random goals), i.e. one shard for ``rotation_interval`` gradient steps, then the next,
in index order. A batch is a pure function of (key, step, shard list), so the sampler's state is
the step: a resumed run draws the same stream bit for bit, whatever ``steps_per_dispatch``.

:class:`ShardedBatches` serves ``(K, B, ...)`` stacks (``(K, S, B, ...)`` with seeds) placed on the
mesh, produced ahead by grain (``MapDataset`` over gradient steps, ``ReadOptions`` threads and
prefetch buffer; its iterator state goes into every checkpoint with the step).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from macfw.data.batches import chunk_reward, goal_indices

if TYPE_CHECKING:
    import grain

SAMPLINGS = ("uniform", "shard_rotation")


def _cpu():
    """This process's host CPU device (multi-process CPU runs: its own, addressable one)."""
    return jax.local_devices(backend="cpu")[0]


def _draw_one(key, s, tables, *, batch_size: int, gamma: float, goal_conditioned: bool, goals=None):
    """Indices of one batch in index space ``s`` (see the module doc): ``{'t', 'end', 'vg', 'ag'}`` int32
    ``(B,)`` (chunk start, its trajectory's final row, value and actor goal rows, drawn as ``goals``,
    a :class:`~macfw.data.goals.GoalSampling`, says; None: the defaults)."""
    ks = jax.random.split(key, 8)
    lo = tables["space_start"][s]
    r = jax.random.randint(ks[0], (batch_size,), lo, tables["space_start"][s + 1])
    j = jnp.searchsorted(tables["start_cum"], r, side="right") - 1
    t = tables["traj_first"][j] + (r - tables["start_cum"][j])
    end = tables["traj_final"][j]
    out = {"t": t, "end": end}
    if goal_conditioned:
        row_lo = tables["space_rows"][s]
        vg, ag = goal_indices(ks, t, end, tables["space_rows"][s + 1] - row_lo, gamma, row_offset=row_lo, goals=goals)
        out.update(vg=vg, ag=ag)
    return out


class ShardSampler:
    """Batches of ``batch_spec`` from ``data`` on the host (see the module doc).

    Args:
      data: the memory-mapped shards (its ``sampling`` and ``rotation_interval`` apply).
      batch_spec: the agent's :class:`~macfw.agents.base.BatchSpec` (its goal sampling included).
      goal_conditioned: goal-conditioned batches (``data.goal_dim > 0``).
      key: raw key data ``(2,)`` of the batch stream.

    Raises:
      ConfigError: no trajectory is longer than the batch window (``train.chunk_len``).
    """

    def __init__(self, data, *, batch_spec, goal_conditioned: bool, key):
        self.data, self.spec, self.gc = data, batch_spec, bool(goal_conditioned)
        cpu = _cpu()
        t = data.index_tables(batch_spec.window)
        if data.sampling == "shard_rotation":
            space_start, space_rows = t["shard_start_cum"], t["row_offsets"]
        else:
            space_start = np.array([0, t["start_cum"][-1]], np.int32)
            space_rows = np.array([0, data.size], np.int32)
        self.num_spaces = len(space_start) - 1
        self.tables = jax.device_put(
            {
                "space_start": space_start,
                "space_rows": space_rows,
                "start_cum": t["start_cum"],
                "traj_first": t["traj_first"],
                "traj_final": t["traj_final"],
            },
            cpu,
        )
        self.key = jax.device_put(jnp.asarray(key), cpu)
        self.num_starts = int(t["start_cum"][-1])
        self._fields = ("t", "end", "vg", "ag") if self.gc else ("t", "end")
        gamma = batch_spec.gamma
        self._one = functools.partial(
            _draw_one, gamma=gamma, goal_conditioned=self.gc, goals=getattr(batch_spec, "goals", None)
        )
        self._np_tables = {k: np.asarray(v) for k, v in jax.device_get(self.tables).items()}
        self._key_np = np.asarray(jax.device_get(self.key))
        self._draw_steps = jax.jit(self._draw_steps_fn, static_argnames=("K", "batch_size", "num_seeds"))
        self._draw_keys = jax.jit(self._draw_keys_fn, static_argnames=("batch_size",))
        self._reward = jax.jit(lambda r: chunk_reward(r, gamma, batch_spec.normalize_reward))

    # -- 1. indices ------------------------------------------------------------------------------
    def space_of_steps(self, steps: np.ndarray) -> np.ndarray:
        """The index space (shard in rotation mode, else 0) gradient steps ``steps`` sample from."""
        steps = np.asarray(steps, np.int64)
        if self.data.sampling == "shard_rotation":
            return ((steps // self.data.rotation_interval) % self.num_spaces).astype(np.int32)
        return np.zeros(steps.shape, np.int32)

    def _draw_steps_fn(self, first, *, K, batch_size, num_seeds):
        # the key and the index tables are constants of the compiled draw: one scalar argument per call
        tables = {k: jnp.asarray(v) for k, v in self._np_tables.items()}
        steps = first + jnp.arange(K, dtype=jnp.int32)
        if self.data.sampling == "shard_rotation":
            spaces = (steps // self.data.rotation_interval) % self.num_spaces
        else:
            spaces = jnp.zeros((K,), jnp.int32)
        keys = jax.vmap(lambda j: jax.random.fold_in(jnp.asarray(self._key_np), j))(steps.astype(jnp.uint32))
        one = lambda k, s: self._one(k, s, tables, batch_size=batch_size)  # noqa: E731
        if num_seeds is None:
            out = jax.vmap(one)(keys, spaces)
        else:
            out = jax.vmap(lambda k, s: jax.vmap(lambda kk: one(kk, s))(jax.random.split(k, num_seeds)))(keys, spaces)
        return jnp.stack([out[k] for k in self._fields])

    def _draw_keys_fn(self, keys, spaces, tables, *, batch_size):
        one = lambda k, s: self._one(k, s, tables, batch_size=batch_size)  # noqa: E731
        return jax.vmap(one)(keys, spaces)

    def step_indices(self, first_step: int, K: int, batch_size: int, num_seeds: int | None = None) -> dict:
        """Indices of the batches of gradient steps ``first_step .. first_step + K - 1``:
        ``(K, B)`` int arrays (``(K, S, B)`` with seeds)."""
        with jax.default_device(_cpu()):
            out = np.asarray(self._draw_steps(np.int32(first_step), K=K, batch_size=batch_size, num_seeds=num_seeds))
        return dict(zip(self._fields, out))

    def key_indices(self, keys, spaces, batch_size: int) -> dict:
        """Indices of one batch per key: ``keys (M, 2)``, ``spaces (M,)`` -> ``(M, B)`` int arrays."""
        with jax.default_device(_cpu()):
            out = self._draw_keys(
                jax.device_put(jnp.asarray(keys), _cpu()),
                jnp.asarray(np.asarray(spaces, np.int32)),
                self.tables,
                batch_size=batch_size,
            )
        return {k: np.asarray(v) for k, v in out.items()}

    # -- 2. and 3. rows and values ------------------------------------------------------------------
    def gather(self, ind: dict, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """The batch fields (as :func:`~macfw.data.batches.sample_batch`) for indices ``ind`` (arrays
        of any leading shape ``L + (B,)``), only for batch rows ``rows = (lo, hi)`` (default all)."""
        if rows is not None:
            ind = {k: v[..., rows[0] : rows[1]] for k, v in ind.items()}
        lead = ind["t"].shape
        t = ind["t"].reshape(-1).astype(np.int64)
        d, n, fl = self.data, self.spec.chunk_len, self.spec.future_len
        shard = np.searchsorted(d.row_offsets, t, side="right") - 1
        F = len(t)
        if fl:
            w = np.arange(max(n, fl) + 1)
            win = d.obs_scaler(d.take("observations", t[:, None] + w[None, :], shard))
            obs, next_obs, future = win[:, 0], win[:, n], win[:, 1 : 1 + fl]
        else:
            win = d.obs_scaler(d.take("observations", np.stack([t, t + n], axis=1), shard))
            obs, next_obs, future = win[:, 0], win[:, 1], None
        steps = t[:, None] + np.arange(n)[None, :]
        actions = d.take("actions", steps, shard).reshape(F, -1)
        b = {
            "idx": ind["t"].reshape(-1),
            "obs": obs,
            "actions": actions,
            "next_obs": next_obs,
            "traj_end": ind["end"].reshape(-1),
        }
        if future is not None:
            b["future_obs"] = future
        if self.gc:
            vg, ag = ind["vg"].reshape(-1), ind["ag"].reshape(-1)
            if d.task_mode == "oraclerep":
                g = d.goal_scaler(d.take("oracle_reps", np.stack([vg, ag], axis=1)))
                ng = d.goal_scaler(d.take("oracle_reps", (t + n)[:, None], shard))[:, 0]
            else:  # goals are the (scaled) observations
                g = d.obs_scaler(d.take("observations", np.stack([vg, ag], axis=1)))
                ng = next_obs
            success = ((vg >= t) & (vg < t + n)).astype(np.float32)
            b.update(
                value_goals=g[:, 0],
                actor_goals=g[:, 1],
                value_goal_idx=ind["vg"].reshape(-1),
                actor_goal_idx=ind["ag"].reshape(-1),
                next_goals=ng,
                success=success,
                rewards=success - np.float32(1.0),
                masks=np.float32(1.0) - success,
            )
        else:
            with jax.default_device(_cpu()):
                r = np.asarray(self._reward(jax.device_put(d.take("rewards", steps, shard), _cpu())))
            if d.singletask_masks == "ones":
                success = np.zeros(F, np.float32)
            else:
                success = np.any(d.take("masks", steps, shard) < 0.5, axis=1).astype(np.float32)
            empty = np.zeros((F, 0), np.float32)
            b.update(
                value_goals=empty,
                actor_goals=empty,
                value_goal_idx=b["idx"],
                actor_goal_idx=b["idx"],
                next_goals=empty,
                success=success,
                rewards=r,
                masks=np.ones_like(r),
            )
        d.maybe_release()
        return {k: v.reshape(lead + v.shape[1:]) for k, v in b.items()}

    def stack(
        self,
        first_step: int,
        K: int,
        batch_size: int,
        num_seeds: int | None = None,
        rows: tuple[int, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """The batches of gradient steps ``first_step .. + K - 1``: ``(K, [S,] B_rows, ...)`` numpy."""
        return self.gather(self.step_indices(first_step, K, batch_size, num_seeds), rows)

    def sample(self, key, batch_size: int, num_seeds: int | None = None, step: int = 0) -> dict[str, np.ndarray]:
        """One batch from ``key`` (seeds: ``fold_in(key, i)`` each, as :class:`macfw.step.Refresher`),
        in the index space of gradient step ``step``; all rows (replicated use)."""
        key = np.asarray(jax.device_get(key))
        if num_seeds is None:
            keys = key[None]
        else:
            with jax.default_device(_cpu()):
                keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_seeds)))
        spaces = self.space_of_steps(np.full(len(keys), step))
        b = self.gather(self.key_indices(keys, spaces, batch_size))
        return {k: v[0] for k, v in b.items()} if num_seeds is None else b

    def describe(self) -> dict:
        """What fixes the stream (for checkpoints): sampling, interval, key, shards."""
        d = self.data
        return {
            "sampling": d.sampling,
            "rotation_interval": d.rotation_interval if d.sampling == "shard_rotation" else None,
            "key_data": [int(x) for x in np.asarray(jax.device_get(self.key)).reshape(-1)],
            "step_key": "fold_in(key, gradient step)",
            "shards": d.describe(),
            "scaler_source": d.scaler_source,
            "num_valid_starts": self.num_starts,
        }


def process_rows(sharding, global_shape: tuple[int, ...], axis: int) -> tuple[int, int] | None:
    """The rows ``[lo, hi)`` along ``axis`` of a ``global_shape`` array that this process's devices
    hold under ``sharding`` (None when they are not one contiguous block)."""
    spans = set()
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        sl = idx[axis]
        spans.add((sl.start or 0, global_shape[axis] if sl.stop is None else sl.stop))
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = np.zeros(hi - lo, bool)
    for a, b in spans:
        covered[a - lo : b - lo] = True
    return (lo, hi) if covered.all() else None


class ShardedBatches:
    """``(K, B, ...)`` batch stacks from a :class:`ShardSampler`, made ahead in background threads by
    grain and placed on the mesh; the same interface as :class:`macfw.step.HostBatches`.

    Each process gathers only the rows of the global batch its devices hold (:func:`process_rows`)
    and the global array is assembled with ``jax.make_array_from_callback``.

    Args:
      sampler: the :class:`ShardSampler`.
      batch_size: global samples per gradient step; ``K``: gradient steps per stack.
      sharding: the stacks' sharding (batch axis 1, or 2 with ``num_seeds``).
      prefetch: stacks made ahead (grain's ``prefetch_buffer_size``); ``threads``: threads making them.
    """

    def __init__(
        self,
        sampler: ShardSampler,
        *,
        batch_size: int,
        K: int,
        sharding,
        num_seeds: int | None = None,
        prefetch: int = 2,
        threads: int = 1,
    ):
        self.sampler, self.batch_size, self.K, self.sharding, self.num_seeds = (
            sampler,
            batch_size,
            K,
            sharding,
            num_seeds,
        )
        self.prefetch, self.threads = int(prefetch), int(threads)
        self.axis = 2 if num_seeds is not None else 1
        lead = (K, num_seeds, batch_size) if num_seeds is not None else (K, batch_size)
        self.lead = lead
        self.rows = process_rows(sharding, lead, self.axis)
        self._it: grain.DatasetIterator | None = None
        self._first: int | None = None

    @property
    def data(self) -> ShardSampler:
        """What the :class:`macfw.step.Refresher` samples start states from (see :meth:`ShardSampler.sample`)."""
        return self.sampler

    def make(self, step: int):
        """The stack of gradient steps ``step .. step + K - 1``, on the mesh."""
        rows = self.rows if self.rows is not None else (0, self.batch_size)
        local = self.sampler.stack(step, self.K, self.batch_size, self.num_seeds, rows)
        lo = rows[0]
        ax = self.axis

        def place(x):
            shape = self.lead + x.shape[len(self.lead) :]

            def cb(idx):
                idx = list(idx)
                sl = idx[ax]
                idx[ax] = slice((sl.start or 0) - lo, (shape[ax] if sl.stop is None else sl.stop) - lo)
                return x[tuple(idx)]

            return jax.make_array_from_callback(shape, self.sharding, cb)

        if jax.process_count() == 1 and lo == 0 and rows[1] == self.batch_size:
            return jax.device_put(local, self.sharding)  # every row is here: one call for the whole stack
        return {k: place(v) for k, v in local.items()}

    def start(self, first_step: int, stride: int, last_step: int):
        import grain

        self._first = first_step
        ds = grain.MapDataset.range(first_step, last_step, stride).map(self.make)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch))
        self._it = iter(it)
        if hasattr(self._it, "start_prefetch"):
            self._it.start_prefetch()

    def next(self):
        assert self._it is not None, "ShardedBatches.next() before start()"
        return next(self._it)

    def state(self, step: int) -> dict:
        """The sampler's state after the dispatch ending at gradient step ``step`` (for checkpoints)."""
        out: dict[str, Any] = {"step": int(step)}
        if self._it is not None:
            try:
                out["grain"] = {"first_step": self._first, "stride": self.K, **self._it.get_state()}
            except Exception:  # pragma: no cover - iterator without state
                pass
        return out

    def close(self):
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
