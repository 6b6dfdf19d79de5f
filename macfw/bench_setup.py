"""What :mod:`macfw.bench` and :mod:`macfw.profiling` both build: the presets' sizes, synthetic data,
the agent from its Gin files with its initial state and compiled-on-first-call training step, and the
practical matrix-product peak.

:mod:`macfw.profiling` imports them from here, not from :mod:`macfw.bench` (which imports
:mod:`macfw.profiling`), so the two do not import each other; :mod:`macfw.bench` re-exports them under
their old names (``_setup`` is :func:`setup_agent`, ``_time`` is :func:`time_fn`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from macfw.data.batches import ChunkData, trajectory_ends, valid_starts
from macfw.spec import Spec

REPO = Path(__file__).resolve().parents[1]

#: Sizes (``batch``, ``steps_per_dispatch``) and Gin bindings of each preset.
PRESETS = {
    # MLP 2 x 256, batch 256, rollout batch 256, n = 10, H = 10, N = 8 (DESIGN §7's CPU reference point)
    "cpu-small": dict(
        batch=256,
        steps_per_dispatch=10,
        bindings={
            "HIDDEN": (256, 256),
            "CHUNK": 10,
            "MAC.rollout_batch_size": 256,
            "MAC.horizon": 10,
            "RejectionSampler.num_train_candidates": 8,
            "FlowPolicy.flow_steps": 10,
        },
    ),
    # the paper's defaults (DESIGN §2.6)
    "paper": dict(
        batch=1024,
        steps_per_dispatch=10,
        bindings={
            "HIDDEN": (1024,) * 4,
            "CHUNK": 10,
            "MAC.rollout_batch_size": 1024,
            "MAC.horizon": 10,
            "RejectionSampler.num_train_candidates": 8,
            "FlowPolicy.flow_steps": 10,
        },
    ),
    # tiny, for tests
    "tiny": dict(
        batch=32,
        steps_per_dispatch=2,
        bindings={
            "HIDDEN": (32, 32),
            "CHUNK": 5,
            "MAC.rollout_batch_size": 16,
            "MAC.horizon": 3,
            "RejectionSampler.num_train_candidates": 2,
            "FlowPolicy.flow_steps": 3,
        },
    ),
}


def synthetic_data(
    spec: Spec, num_episodes: int = 20, episode_length: int = 201, seed: int = 0, window: int | None = None
) -> ChunkData:
    """Random data in OGBench's compact layout (sizes matter for speed, values do not); chunk starts
    leave ``window`` steps (default ``spec.chunk_len``) before each trajectory's end."""
    rng = np.random.default_rng(seed)
    n = num_episodes * episode_length
    valids = np.ones(n, np.float32)
    valids[episode_length - 1 :: episode_length] = 0
    ends = trajectory_ends(valids)
    return ChunkData(
        observations=jnp.asarray(rng.uniform(-1, 1, (n, spec.ob_dim)), jnp.float32),
        actions=jnp.asarray(rng.uniform(-1, 1, (n, spec.act_dim)), jnp.float32),
        goals=jnp.asarray(rng.uniform(-1, 1, (n, spec.goal_dim)), jnp.float32),
        rewards=jnp.asarray(-(rng.uniform(size=n) < 0.9).astype(np.float32)),
        masks=jnp.asarray(rng.uniform(size=n) < 0.95, jnp.float32),
        traj_end=jnp.asarray(ends),
        starts=jnp.asarray(valid_starts(ends, max(spec.chunk_len, window or 0))),
    )


def build_agent(preset: dict, *, gin_files=("gin/mac.gin",), gin_bindings=(), compute_dtype=None):
    """The agent that ``gin_files`` bind to ``train.agent``, with ``preset``'s sizes and bindings.

    Gin files are looked up relative to the working directory, then to the macfw checkout.

    Raises:
      FileNotFoundError: a Gin file that exists in neither place.
    """
    import gin

    from macfw.run import parse_gin

    files = []
    for f in gin_files:
        p = Path(f)
        if not p.is_file() and (REPO / f).is_file():
            p = REPO / f
        files.append(str(p))
    binds = {**preset["bindings"], **({"COMPUTE_DTYPE": compute_dtype} if compute_dtype else {})}
    gin.clear_config()
    parse_gin(files, [f"{k} = {v!r}" for k, v in binds.items()] + list(gin_bindings))
    ref = gin.query_parameter("train.agent")
    return ref.scoped_configurable_fn() if hasattr(ref, "scoped_configurable_fn") else ref


def time_fn(fn, *args, repeat=5, min_time=1.0):
    """Mean and best seconds of ``fn(*args)`` after one warm call: at least ``repeat`` runs and
    ``min_time`` seconds (at most 1001 runs)."""
    jax.block_until_ready(fn(*args))  # warm
    best = float("inf")
    t_total, runs = 0.0, 0
    while runs < repeat or t_total < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        best = min(best, dt)
        t_total += dt
        runs += 1
        if runs > 1000:
            break
    return t_total / runs, best


def matmul_peak(dtype=jnp.float32, size: int | None = None) -> float:
    """FLOP/s of a large plain matrix product on the default device (the practical peak)."""
    return peak_meter(dtype, size)(min_time=1.0)


def peak_meter(dtype=jnp.float32, size: int | None = None) -> Callable[..., float]:
    """A compiled, warm ``size x size`` matrix product (2048 on CPU, 8192 on GPU); calling the result
    times it again (``repeat`` runs, at least ``min_time`` seconds) and returns its FLOP/s."""
    if size is None:
        size = 8192 if jax.default_backend() == "gpu" else 2048
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (size, size), dtype)
    b = jax.random.normal(k2, (size, size), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))

    def measure(repeat: int = 3, min_time: float = 0.0) -> float:
        return 2.0 * size**3 / time_fn(f, a, b, repeat=repeat, min_time=min_time)[0]

    return measure


def setup_agent(
    preset: str,
    *,
    gin_files=("gin/mac.gin",),
    gin_bindings=(),
    ob_dim: int = 28,
    act_dim: int = 5,
    goal_dim: int = 0,
    compute_dtype=None,
    steps_per_dispatch: int | None = None,
):
    """The agent at ``preset``'s sizes, synthetic data, its initial state and its compiled-on-first-call
    training step: ``(agent, spec, data, state, step, K, B)`` (K updates per dispatch, batch B)."""
    from macfw.step import make_train_step

    p = PRESETS[preset]
    K = steps_per_dispatch or p["steps_per_dispatch"]
    B = p["batch"]
    agent = build_agent(p, gin_files=gin_files, gin_bindings=gin_bindings, compute_dtype=compute_dtype)
    spec = Spec(ob_dim=ob_dim, act_dim=act_dim, goal_dim=goal_dim, chunk_len=agent.batch_spec.chunk_len)
    data = synthetic_data(spec, window=agent.batch_spec.window)
    state = agent.init(spec, jax.random.PRNGKey(0))
    step = make_train_step(agent, batch_size=B, steps_per_dispatch=K, template=state)
    return agent, spec, data, state, step, K, B
