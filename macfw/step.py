"""The compiled training step and where its batches come from, for any :class:`~macfw.agents.base.Agent`.

Units: ``steps_per_dispatch`` (K) gradient steps run per compiled call (``lax.scan``); batch sizes
count samples (chunks for chunk agents, transitions for one-step agents).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from macfw.agents.base import Agent
from macfw.compiler import compiler_options
from macfw.data.batches import sample_for
from macfw.errors import check, check_int
from macfw.spec import Spec


def _spec_of(agent: Agent) -> Spec:
    """``agent.spec``, the sizes :meth:`Agent.init` built the agent for.

    Raises:
      ValueError: ``agent.spec`` is None (the agent was never initialised).
    """
    if agent.spec is None:
        raise ValueError(
            f"{type(agent).__name__}.spec is None: initialise the agent first (agent.init(spec, key), "
            "e.g. through init_state)."
        )
    return agent.spec


def check_batch_size(batch_size: int, mesh) -> int:
    """``batch_size`` (>= 1) if it splits evenly over the devices on ``mesh``'s data axis.

    Raises:
      ConfigError: otherwise (names train.batch_size, the device count and make_mesh.mesh_shape).
    """
    from macfw.parallel import data_axis_size

    n = data_axis_size(mesh)
    batch_size = check_int("train.batch_size", batch_size)
    check(
        "train.batch_size",
        batch_size,
        batch_size % n == 0,
        f"a multiple of the {n} devices on the mesh's data axis (or change make_mesh.mesh_shape)",
    )
    return batch_size


class NonFiniteError(FloatingPointError):
    """A loss or parameter became NaN/Inf; the message names the step and the loss terms."""


def init_state(agent: Agent, spec, seed: int, num_seeds: int | None = None) -> eqx.Module:
    """A fresh state for ``seed``; with ``num_seeds`` S, seeds ``seed .. seed + S - 1`` stacked
    along a leading axis (each identical to a single-seed init with that seed)."""
    if num_seeds is None:
        return agent.init(spec, jax.random.PRNGKey(seed))
    keys = jnp.stack([jax.random.PRNGKey(seed + i) for i in range(num_seeds)])
    state = eqx.filter_vmap(lambda k: agent.init(spec, k))(keys)
    agent.spec = spec
    return state


class TrainStep:
    """``step(data, state) -> (state, metrics)``: ``steps_per_dispatch`` agent updates in one compiled call.

    One ``jax.jit`` with explicit shardings: the state (whatever the agent keeps: parameters,
    optimiser state, targets, buffers, key) and the on-device dataset replicated over the mesh,
    every batch sharded along its ``data`` axis, the state donated, compiled with
    :func:`macfw.compiler.compiler_options` (on the CPU: 512-bit vectors). Batches follow the agent's
    :attr:`~macfw.agents.base.Agent.batch_spec`; they are sampled on the device from the state's
    key (``host_batches=False``), or passed in, stacked ``(K, B, ...)``, by :class:`HostBatches`.
    With ``num_seeds`` the state carries a leading seed axis and the update is vmapped over it.
    Metrics are averaged over the K updates on the device; ``guard/finite`` is 1 when every loss
    and every parameter of ``state.nets`` is finite, and ``guard/first_bad`` is the index
    (0..K-1) of the first update of the dispatch that was not. ``debug_nan_at_step=N`` (tests
    only) multiplies the observations of the batch of gradient step N by NaN.

    Raises:
      ConfigError: ``batch_size`` not divisible by the number of devices on the data axis.
    """

    def __init__(
        self,
        agent: Agent,
        template: eqx.Module,
        *,
        batch_size: int,
        steps_per_dispatch: int,
        mesh=None,
        host_batches: bool = False,
        num_seeds: int | None = None,
        debug_nan_at_step: int | None = None,
    ):
        from macfw.parallel import batch_sharded, make_mesh, replicated

        self.mesh = mesh if mesh is not None else make_mesh()
        check_batch_size(batch_size, self.mesh)
        self.agent, self.K, self.host_batches, self.num_seeds = agent, int(steps_per_dispatch), host_batches, num_seeds
        self.batch_size = batch_size
        _, self.static = eqx.partition(template, eqx.is_array)
        goal_conditioned = _spec_of(agent).goal_conditioned
        bspec = agent.batch_spec
        bshard = batch_sharded(self.mesh)

        def constrain(batch):
            return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, bshard), batch)

        def one(data_or_batch, st):
            if host_batches:
                batch = data_or_batch
            else:
                k_batch, k_next = jax.random.split(st.key)
                with jax.named_scope("sampling"):  # a phase of macfw.profiling's table
                    batch = sample_for(bspec, data_or_batch, k_batch, batch_size, goal_conditioned=goal_conditioned)
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
            st: Any = eqx.combine(arrays, self.static)  # an agent state: step, key, nets (macfw.agents.base)
            if host_batches:
                st, metrics = jax.lax.scan(lambda c, b: one(b, c), st, data)
            else:
                st, metrics = jax.lax.scan(lambda c, _: one(data, c), st, None, length=self.K)
            ok = metrics["guard/finite"].reshape(metrics["guard/finite"].shape[0], -1).min(axis=1) >= 1.0  # (K,)
            params_ok = jnp.all(
                jnp.stack(
                    [
                        jnp.all(jnp.isfinite(x))
                        for x in jax.tree_util.tree_leaves(eqx.filter(st.nets, eqx.is_inexact_array))
                    ]
                )
            )
            metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)
            metrics["guard/finite"] = (metrics["guard/finite"] >= 1.0) & params_ok
            metrics["guard/first_bad"] = jnp.argmin(ok).astype(jnp.int32)
            return eqx.partition(st, eqx.is_array)[0], metrics

        repl = replicated(self.mesh)
        data_sharding = repl
        if host_batches:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            spec = P(None, None, "data") if num_seeds is not None else P(None, "data")
            data_sharding = NamedSharding(self.mesh, spec)
        #: XLA options of the compiled step (:func:`macfw.compiler.compiler_options`: 512-bit vectors on the CPU)
        self.compiler_options = compiler_options(self.mesh.devices.flat[0].platform)
        self._jit = jax.jit(
            run,
            in_shardings=(data_sharding, repl),
            out_shardings=(repl, repl),
            donate_argnums=(1,),
            compiler_options=self.compiler_options,
        )

    def _placed(self, data, state):
        """The dataset (device mode) and the state's arrays, replicated on the mesh.

        Inputs not yet placed there (a state fresh from ``agent.init``) have another type than the
        step's outputs, so feeding the outputs back would trace and compile the step a second time.
        Placing them first (a no-op for arrays already there) compiles it once.
        """
        from macfw.parallel import put_replicated

        arrays = put_replicated(eqx.partition(state, eqx.is_array)[0], self.mesh)
        return (data if self.host_batches else put_replicated(data, self.mesh)), arrays

    def __call__(self, data, state):
        arrays, metrics = self._jit(*self._placed(data, state))
        return eqx.combine(arrays, self.static), metrics

    def lower(self, data, state):
        return self._jit.lower(*self._placed(data, state))


def make_train_step(
    agent: Agent,
    *,
    batch_size: int,
    steps_per_dispatch: int,
    template=None,
    mesh=None,
    host_batches: bool = False,
    num_seeds: int | None = None,
    debug_nan_at_step: int | None = None,
) -> TrainStep:
    """Build the compiled step (see :class:`TrainStep`); ``template`` defaults to a fresh init."""
    if template is None:
        template = agent.init(_spec_of(agent), jax.random.PRNGKey(0))
    return TrainStep(
        agent,
        template,
        batch_size=batch_size,
        steps_per_dispatch=steps_per_dispatch,
        mesh=mesh,
        host_batches=host_batches,
        num_seeds=num_seeds,
        debug_nan_at_step=debug_nan_at_step,
    )


#: Refresh start samples (:class:`~macfw.agents.base.RefreshSpec`) come from
#: ``fold_in(PRNGKey(seed + REFRESH_KEY_OFFSET), step)`` (seed ``i`` of vmapped seeds: folded in again).
REFRESH_KEY_OFFSET = 104729


class Refresher:
    """``refresher(data, state, step) -> (state, metrics)``: one :meth:`Agent.refresh` with fresh starts.

    The starts (``refresh_spec().batch_size`` samples of the agent's batch spec) are drawn where
    the data lives (on the devices, or on the host CPU for host-sampled data) from
    ``fold_in(PRNGKey(seed + REFRESH_KEY_OFFSET), step)``, so they depend on nothing but the seed
    and the step (a resumed run draws the same ones). The refresh itself is one compiled call with
    the state replicated on the mesh and donated; with ``num_seeds`` it is vmapped over seeds, each
    seed with its own starts.
    """

    def __init__(self, agent: Agent, template: eqx.Module, *, seed: int, mesh=None, num_seeds: int | None = None):
        from macfw.parallel import make_mesh, replicated

        rs = agent.refresh_spec()
        if rs is None:
            raise ValueError(f"{type(agent).__name__} has no refresh_spec(); there is nothing to refresh.")
        self.mesh = mesh if mesh is not None else make_mesh()
        self.agent, self.spec, self.num_seeds = agent, rs, num_seeds
        self.key = jax.random.PRNGKey(seed + REFRESH_KEY_OFFSET)
        _, self.static = eqx.partition(template, eqx.is_array)
        bspec, gc = agent.batch_spec, _spec_of(agent).goal_conditioned

        def sample(data, key):
            one = lambda k: sample_for(bspec, data, k, rs.batch_size, goal_conditioned=gc)  # noqa: E731
            if num_seeds is None:
                return one(key)
            return jax.vmap(one)(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_seeds)))

        def refresh(arrays, starts):
            st = eqx.combine(arrays, self.static)
            fn = agent.refresh if num_seeds is None else jax.vmap(agent.refresh)
            st, metrics = fn(st, starts)
            return eqx.partition(st, eqx.is_array)[0], metrics

        self._sample = jax.jit(sample)
        repl = replicated(self.mesh)
        self._refresh = jax.jit(refresh, in_shardings=(repl, repl), out_shardings=(repl, repl), donate_argnums=(0,))

    def due(self, step: int) -> bool:
        """Whether the loop refreshes after the dispatch that ends at gradient step ``step``."""
        return step >= self.spec.first and step % self.spec.every == 0

    def __call__(self, data, state, step: int):
        """One refresh after the dispatch ending at gradient step ``step``. ``data``: the on-device
        :class:`~macfw.data.batches.ChunkData`, or a host sampler with ``sample(key, batch_size,
        num_seeds, step)`` (:class:`macfw.data.host_sampler.ShardSampler`: the same starts, drawn
        from memory-mapped shards in the index space of the last trained step)."""
        from macfw.parallel import put_replicated

        key = jax.random.fold_in(self.key, step)
        if hasattr(data, "sample") and callable(data.sample):
            starts = put_replicated(data.sample(key, self.spec.batch_size, self.num_seeds, step=step - 1), self.mesh)
        else:
            starts = put_replicated(self._sample(data, key), self.mesh)
        arrays = put_replicated(eqx.partition(state, eqx.is_array)[0], self.mesh)
        arrays, metrics = self._refresh(arrays, starts)
        return eqx.combine(arrays, self.static), metrics


class HostBatches:
    """Samples ``(K, B, ...)`` batch stacks on the host CPU and prefetches them to the devices.

    For datasets that do not fit in device memory. The sampling key of dispatch ``i`` is
    ``fold_in(key, first step of i)``, so a resumed run draws the same batches without saved state.
    ``batch_spec`` is the agent's :class:`~macfw.agents.base.BatchSpec`.
    """

    def __init__(
        self,
        data,
        *,
        key,
        batch_size: int,
        batch_spec,
        goal_conditioned: bool,
        K: int,
        sharding,
        num_seeds: int | None = None,
    ):
        cpu = jax.local_devices(backend="cpu")[0]
        self.data = jax.device_put(data, cpu)
        self.key = jax.device_put(key, cpu)
        S = num_seeds

        def sample(data, k):
            return sample_for(batch_spec, data, k, batch_size, goal_conditioned=goal_conditioned)

        def sample_k(data, key):
            def one(k):
                if S is None:
                    return sample(data, k)
                return jax.vmap(lambda kk: sample(data, kk))(jax.random.split(k, S))

            return jax.vmap(one)(jax.random.split(key, K))

        self._sample = jax.jit(sample_k)
        self.sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread = None

    def _make(self, step: int):
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            b = self._sample(self.data, jax.random.fold_in(self.key, step))
        return jax.device_put(b, self.sharding)

    def start(self, first_step: int, stride: int, last_step: int):
        def work():
            s = first_step
            while s < last_step:
                self._queue.put(self._make(s))
                s += stride

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def next(self):
        return self._queue.get()


def check_finite(metrics_host: dict, step: int, K: int) -> None:
    """Raise :class:`NonFiniteError` when a dispatch's guard says a loss or parameter was not finite."""
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
        "(earlier checkpoints are intact). Lower the learning rate, set a gradient clip (e.g. MAC.grad_clip), or "
        "check the data for NaN/Inf."
    )
