"""Throughput benchmark of the MAC update: ``python -m macfw.bench --preset cpu-small [--json PATH]``.

Prints updates per second after compilation, the FLOPs of one update from XLA's cost analysis,
the achieved FLOP/s, and a practical peak measured in the same run: the FLOP/s of a large plain
matrix product on the same device. ``utilisation = achieved / peak`` (DESIGN §7). It also times
the imagined rollout alone and the rejection sampler alone.

FLOP counting: XLA's cost analysis counts a loop body once, so the update is compiled for
counting with the H-step rollout unrolled and one gradient step per call, and the diffrax ODE
loop of the distillation target (``flow_steps`` field evaluations, counted once) is corrected by
adding ``flow_steps - 1`` times the cost of one batched velocity evaluation.

On a GPU: ``python -m macfw.bench --preset paper --json bench.json`` (bf16 matrix products
with ``--compute-dtype bfloat16``).
"""

from __future__ import annotations

import argparse
import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from macfw.agents.mac import MAC
from macfw.data.batches import ChunkData, sample_batch, trajectory_ends, valid_starts
from macfw.nn.flow import FlowPolicy
from macfw.nn.models import ChunkDynamics, QCritic, RewardModel, StateValue, SuccessModel
from macfw.samplers import RejectionSampler
from macfw.spec import Spec

PRESETS = {
    # MLP 2 x 256, batch 256, rollout batch 256, n = 10, H = 10, N = 8 (DESIGN §7's CPU reference point)
    "cpu-small": dict(hidden=(256, 256), batch=256, rollout_batch=256, chunk=10, horizon=10, num_train=8,
                      flow_steps=10, steps_per_dispatch=10),
    # the paper's defaults (DESIGN §2.6)
    "paper": dict(hidden=(1024,) * 4, batch=1024, rollout_batch=1024, chunk=10, horizon=10, num_train=8,
                  flow_steps=10, steps_per_dispatch=10),
    # tiny, for tests
    "tiny": dict(hidden=(32, 32), batch=32, rollout_batch=16, chunk=5, horizon=3, num_train=2, flow_steps=3,
                 steps_per_dispatch=2),
}


def synthetic_data(spec: Spec, num_episodes: int = 20, episode_length: int = 201, seed: int = 0) -> ChunkData:
    """Random data in OGBench's compact layout (sizes matter for speed, values do not)."""
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
        traj_end=jnp.asarray(ends), starts=jnp.asarray(valid_starts(ends, spec.chunk_len)),
    )


def build_agent(p: dict, *, gamma=0.99, compute_dtype=None, unroll=False) -> MAC:
    def bind(cls, **kw):
        return lambda spec, key: cls(spec, key=key, hidden_dims=p["hidden"], compute_dtype=compute_dtype, **kw)

    return MAC(dynamics=bind(ChunkDynamics), policy=bind(FlowPolicy, flow_steps=p["flow_steps"]), critic=bind(QCritic),
               value=bind(StateValue), success=bind(SuccessModel), reward=bind(RewardModel),
               sampler=RejectionSampler(p["num_train"], 32), gamma=gamma, horizon=p["horizon"],
               rollout_batch_size=p["rollout_batch"], unroll_rollout=unroll)


def _flops(compiled) -> float:
    compiled = getattr(compiled, "compiled", compiled)  # equinox wraps jax's Compiled
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", 0.0)) if ca else 0.0


def _time(fn, *args, repeat=5, min_time=1.0):
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
    if size is None:
        size = 8192 if jax.default_backend() == "gpu" else 2048
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (size, size), dtype)
    b = jax.random.normal(k2, (size, size), dtype)
    f = jax.jit(lambda a, b: a @ b)
    mean, best = _time(f, a, b)
    return 2.0 * size**3 / mean


def run(preset: str = "cpu-small", *, ob_dim: int = 28, act_dim: int = 5, goal_dim: int = 0, compute_dtype=None,
        steps_per_dispatch: int | None = None, dispatches: int = 5) -> dict:
    p = dict(PRESETS[preset])
    K = steps_per_dispatch or p["steps_per_dispatch"]
    spec = Spec(ob_dim=ob_dim, act_dim=act_dim, goal_dim=goal_dim, chunk_len=p["chunk"])
    data = synthetic_data(spec)
    from macfw.train import make_train_step

    # --- timing: the real training step (K updates per dispatch)
    agent = build_agent(p, compute_dtype=compute_dtype)
    state = agent.init(spec, jax.random.PRNGKey(0))
    step = make_train_step(agent, batch_size=p["batch"], chunk_len=p["chunk"], steps_per_dispatch=K)
    t0 = time.perf_counter()
    state, m = step(data, state)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(dispatches):
        state, m = step(data, state)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    ups = dispatches * K / dt

    # --- FLOPs per update: XLA cost analysis (rollout unrolled; ODE loop corrected)
    agent_c = build_agent(p, compute_dtype=compute_dtype, unroll=True)
    state_c = agent_c.init(spec, jax.random.PRNGKey(0))
    step_c = make_train_step(agent_c, batch_size=p["batch"], chunk_len=p["chunk"], steps_per_dispatch=1)
    t0 = time.perf_counter()
    flops_step = _flops(step_c.lower(data, state_c).compile())
    count_compile_s = time.perf_counter() - t0
    pol = state_c.nets.policy
    B = p["batch"]
    s = jnp.zeros((B, spec.ob_dim)); g = jnp.zeros((B, spec.goal_dim)); x = jnp.zeros((B, spec.chunk_dim))
    vel = jax.jit(jax.vmap(lambda pol, s, g, x: pol.velocity(s, g, x, 0.5), in_axes=(None, 0, 0, 0)))
    flops_vel = _flops(vel.lower(pol, s, g, x).compile())
    flops = flops_step + (p["flow_steps"] - 1) * flops_vel
    peak = matmul_peak(jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32)

    # --- rollout alone and sampler alone
    Br = p["rollout_batch"]
    s0 = data.observations[:Br]; g0 = data.goals[:Br]
    roll = eqx.filter_jit(lambda nets, s, g, k: agent.rollout(nets, s, g, k)["states"])
    roll_mean, _ = _time(roll, state.nets, s0, g0, jax.random.PRNGKey(1))
    samp = eqx.filter_jit(jax.vmap(lambda nets, s, g, k: agent.sampler(nets.policy, nets.critic, s, g, key=k),
                                   in_axes=(None, 0, 0, 0)))
    samp_mean, _ = _time(samp, state.nets, s0, g0, jax.random.split(jax.random.PRNGKey(2), Br))

    achieved = flops * ups
    out = {
        "preset": preset, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "num_devices": jax.device_count(), "compute_dtype": compute_dtype or "float32",
        "steps_per_dispatch": K, "compile_s": compile_s, "count_compile_s": count_compile_s,
        "updates_per_s": ups, "flops_per_update": flops, "achieved_flops": achieved,
        "matmul_peak_flops": peak, "utilisation": achieved / peak,
        "rollout_s": roll_mean, "rollout_per_s": 1.0 / roll_mean,
        "sampler_s": samp_mean, "sampler_calls_per_s": Br / samp_mean,
        "config": {**p, "steps_per_dispatch": K, "ob_dim": ob_dim, "act_dim": act_dim, "goal_dim": goal_dim},
        "versions": {"jax": jax.__version__},
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m macfw.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    ap.add_argument("--compute-dtype", default=None, choices=[None, "bfloat16", "float32"],
                    help="matrix-product dtype (parameters stay float32)")
    ap.add_argument("--steps-per-dispatch", type=int, default=None)
    ap.add_argument("--dispatches", type=int, default=5)
    ap.add_argument("--ob-dim", type=int, default=28)
    ap.add_argument("--act-dim", type=int, default=5)
    ap.add_argument("--goal-dim", type=int, default=0)
    a = ap.parse_args(argv)
    out = run(a.preset, ob_dim=a.ob_dim, act_dim=a.act_dim, goal_dim=a.goal_dim, compute_dtype=a.compute_dtype,
              steps_per_dispatch=a.steps_per_dispatch, dispatches=a.dispatches)
    for k in ("preset", "device", "num_devices", "compute_dtype", "steps_per_dispatch", "compile_s", "updates_per_s",
              "flops_per_update", "achieved_flops", "matmul_peak_flops", "utilisation", "rollout_s", "sampler_s"):
        v = out[k]
        print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
