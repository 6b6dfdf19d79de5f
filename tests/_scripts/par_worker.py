"""Worker for tests/test_parallel.py: trains the 'tiny' bench preset on synthetic data in a fresh process.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the device count must be fixed before
jax is imported, hence a subprocess). Writes into ``--out``:

* ``params.npz``: every array leaf of ``state.nets`` after ``--dispatches`` dispatches (device-sampled
  batches, global batch ``BATCH``, seed 0); ``state.npz``: every array leaf of the whole train state;
  ``init.npz`` / ``init_params.npz``: the same before training.
* ``info.json``: device/process counts, facts about the compiled step (all-reduces, partitions), the
  shardings of the state, and the results of the optional parts below.

Optional parts: ``--host`` (host-batch mode twice with the same key -> ``host_a.npz``, ``host_b.npz``),
``--errors`` (make_mesh / TrainStep argument errors), ``--ckpt-save DIR`` (Checkpointer save of the
trained state, then ``DIR.done``), ``--ckpt-restore DIR`` (wait for ``DIR.done``, restore onto a fresh
template here -> ``restored.npz``). ``MACFW_COORDINATOR`` etc. make it one process of a
``jax.distributed`` run (via ``macfw.parallel.initialize_distributed``); then files get a ``_p{i}`` suffix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BATCH = 32
SEED = 0


def leaves(tree):
    import equinox as eqx
    import jax

    from macfw.parallel import to_host

    return [to_host(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def save_npz(path, arrays):
    import numpy as np

    np.savez(path, *arrays)


def replicated_over(tree, n: int) -> bool:
    import equinox as eqx
    import jax

    xs = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    return all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == n for x in xs)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dispatches", type=int, default=3)
    ap.add_argument("--host", action="store_true")
    ap.add_argument("--errors", action="store_true")
    ap.add_argument("--ckpt-save", default=None)
    ap.add_argument("--ckpt-restore", default=None)
    ap.add_argument("--wait-s", type=float, default=600.0)
    return ap.parse_args()


def argument_errors(agent, init, mesh, K: int) -> dict:
    """``--errors``: the messages of a bad ``make_mesh`` shape and a batch not divisible by the devices
    (None where no ValueError was raised)."""
    from macfw.parallel import make_mesh
    from macfw.train import TrainStep

    errs = {}
    try:
        make_mesh(mesh_shape=(3,))
        errs["mesh"] = None
    except ValueError as e:
        errs["mesh"] = str(e)
    try:
        TrainStep(agent, init, batch_size=BATCH - 2, steps_per_dispatch=K, mesh=mesh)
        errs["batch"] = None
    except ValueError as e:
        errs["batch"] = str(e)
    return errs


def train_device_sampled(agent, state, data_host, mesh, K: int, dispatches: int, info: dict):
    """The default mode (batches sampled on the devices): ``dispatches`` dispatches from ``state``;
    facts about the compiled step and the results go into ``info``. Returns the trained state."""
    import jax

    from macfw.parallel import put_replicated
    from macfw.train import TrainStep

    data = put_replicated(data_host, mesh)
    info["data_replicated"] = replicated_over(data, jax.device_count())
    step = TrainStep(agent, state, batch_size=BATCH, steps_per_dispatch=K, mesh=mesh)
    t0 = time.perf_counter()
    hlo = step.lower(data, state).compile().as_text()  # the call below reuses this compilation
    assert hlo is not None
    info["compile_s"] = time.perf_counter() - t0
    info["hlo_all_reduce"] = hlo.count("all-reduce(") + hlo.count("all-reduce-start(")
    header = hlo.splitlines()[0] if hlo else ""
    info["hlo_num_partitions"] = (
        int(header.split("num_partitions=")[1].split(",")[0].split("}")[0].strip())
        if "num_partitions=" in header
        else 1
    )
    losses = []
    for _ in range(dispatches):
        state, m = step(data, state)
        losses.append(float(m["total/loss"]))
        info.setdefault("finite", []).append(bool(m["guard/finite"]))
    info["losses"] = losses
    info["step"] = int(to_int(state.step))
    info["state_replicated"] = replicated_over(state, jax.device_count())
    return state


def save_checkpoint(directory: str, step: int, state) -> None:
    """``--ckpt-save``: a Checkpointer save of the trained state, then ``DIR.done``."""
    import jax

    from macfw.checkpoint import Checkpointer

    ck = Checkpointer(directory, max_to_keep=None)
    ck.save(step, state, {"saved_by_devices": jax.device_count()})
    ck.close()
    Path(str(directory) + ".done").write_text("ok")


def train_host_sampled(agent, spec, data_host, mesh, K: int, dispatches: int, fresh_state, info: dict, out, sfx):
    """``--host``: batches sampled on the host and prefetched by HostBatches, twice with the same key
    (the two must agree exactly) -> ``host_a.npz``, ``host_b.npz``."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from macfw.train import HostBatches, TrainStep

    hstep = TrainStep(agent, fresh_state(mesh), batch_size=BATCH, steps_per_dispatch=K, mesh=mesh, host_batches=True)
    for name in ("host_a", "host_b"):
        hb = HostBatches(
            data_host,
            key=jax.random.PRNGKey(SEED + 7919),
            batch_size=BATCH,
            batch_spec=agent.batch_spec,
            goal_conditioned=spec.goal_conditioned,
            K=K,
            sharding=NamedSharding(mesh, P(None, "data")),
        )
        hb.start(0, K, K * dispatches)
        st = fresh_state(mesh)
        hfinite = []
        for i in range(dispatches):
            batch = hb.next()
            if i == 0 and name == "host_a":
                obs = batch["obs"]
                info["host_batch_obs_shape"] = list(obs.shape)
                info["host_batch_shard_shapes"] = sorted({tuple(s.data.shape) for s in obs.addressable_shards})
                info["host_batch_num_shards"] = len(obs.addressable_shards)
            st, m = hstep(batch, st)
            hfinite.append(bool(m["guard/finite"]))
        info[f"{name}_finite"] = hfinite
        info[f"{name}_step"] = int(to_int(st.step))
        save_npz(out / f"{name}{sfx}.npz", leaves(st.nets))


def restore_checkpoint(directory: str, wait_s: float, fresh_state, mesh, info: dict, out, sfx) -> None:
    """``--ckpt-restore``: wait for ``DIR.done`` (written by another process, other device count), restore
    onto a template built here -> ``restored.npz``."""
    import jax

    from macfw.checkpoint import Checkpointer

    done = Path(str(directory) + ".done")
    deadline = time.time() + wait_s
    while not done.exists():
        if time.time() > deadline:
            raise TimeoutError(f"no checkpoint at {directory} after {wait_s} s")
        time.sleep(0.2)
    template = fresh_state(mesh)
    ck = Checkpointer(directory, max_to_keep=None, async_save=False)
    restored, meta = ck.restore(template)
    ck.close()
    info["restored_meta_devices"] = meta.get("saved_by_devices")
    info["restored_replicated"] = replicated_over(restored, jax.device_count())
    save_npz(out / f"restored{sfx}.npz", leaves(restored))


def main() -> int:
    a = parse_args()

    from macfw.parallel import initialize_distributed

    distributed = initialize_distributed()  # reads MACFW_* (no-op without MACFW_COORDINATOR)

    import equinox as eqx
    import jax
    import numpy as np

    from macfw.bench import PRESETS, build_agent, synthetic_data
    from macfw.parallel import make_mesh, put_replicated
    from macfw.spec import Spec

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sfx = f"_p{jax.process_index()}" if distributed else ""
    info: dict = {
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
    }

    p = PRESETS["tiny"]
    K = p["steps_per_dispatch"]
    agent = build_agent(p)
    spec = Spec(ob_dim=28, act_dim=5, goal_dim=0, chunk_len=agent.chunk_len)
    data_host = synthetic_data(spec)
    init = agent.init(spec, jax.random.PRNGKey(SEED))
    init_arrays, static = eqx.partition(init, eqx.is_array)
    init_host = jax.tree_util.tree_map(np.asarray, init_arrays)  # the step donates its state

    def fresh_state(mesh):
        return put_replicated(eqx.combine(jax.tree_util.tree_map(np.array, init_host), static), mesh)

    mesh = make_mesh()
    info["mesh_shape"] = dict(mesh.shape)
    info["K"], info["batch"], info["ob_dim"] = K, BATCH, spec.ob_dim

    if a.errors:
        info["errors"] = argument_errors(agent, init, mesh, K)

    # ---- device-sampled batches (the default mode)
    state = train_device_sampled(agent, fresh_state(mesh), data_host, mesh, K, a.dispatches, info)
    save_npz(out / f"params{sfx}.npz", leaves(state.nets))
    save_npz(out / f"state{sfx}.npz", leaves(state))
    save_npz(out / f"init{sfx}.npz", jax.tree_util.tree_leaves(init_host))
    save_npz(out / f"init_params{sfx}.npz", leaves(init.nets))

    if a.ckpt_save:
        save_checkpoint(a.ckpt_save, info["step"], state)

    # ---- host-sampled batches, prefetched by HostBatches (twice, same key: must agree exactly)
    if a.host:
        train_host_sampled(agent, spec, data_host, mesh, K, a.dispatches, fresh_state, info, out, sfx)
        info["params_shapes"] = [list(x.shape) for x in leaves(state.nets)]

    # ---- restore a checkpoint written by another process (other device count) onto a template built here
    if a.ckpt_restore:
        restore_checkpoint(a.ckpt_restore, a.wait_s, fresh_state, mesh, info, out, sfx)

    (out / f"info{sfx}.json").write_text(json.dumps(info, indent=1))
    print("[par_worker] ok", json.dumps({k: info[k] for k in ("device_count", "process_count", "losses")}), flush=True)
    return 0


def to_int(x):
    from macfw.parallel import to_host

    return to_host(x).reshape(-1)[0]


if __name__ == "__main__":
    sys.exit(main())
