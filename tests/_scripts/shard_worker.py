"""Worker for tests/test_shards_e2e.py: one process of a 2-process ``jax.distributed`` CPU run that
loads a directory of shards (converting it, possibly at the same time as its peer) and draws two
host batch stacks through :class:`macfw.data.host_sampler.ShardedBatches`.

``MACFW_COORDINATOR`` / ``MACFW_NUM_PROCESSES`` / ``MACFW_PROCESS_ID`` make it a process of the run.
Writes ``--out/p{i}.npz`` (this process's addressable rows of every field of both stacks) and
``--out/p{i}.json`` (process index, the batch rows it gathered, the global shapes).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

K, BATCH = 2, 8


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from macfw.parallel import initialize_distributed

    initialize_distributed()
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from macfw.agents.base import BatchSpec
    from macfw.data.host_sampler import ShardedBatches, ShardSampler
    from macfw.data.ogbench_data import OGBenchDataset
    from macfw.parallel import make_mesh

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = OGBenchDataset(
            env_name="cube-single", task_mode="oraclerep", dataset_path=args.shards, cache_dir=args.cache
        ).load(5, 5)
    sampler = ShardSampler(
        loaded.data, batch_spec=BatchSpec(chunk_len=5, gamma=0.99), goal_conditioned=True, key=jax.random.PRNGKey(3)
    )
    hb = ShardedBatches(sampler, batch_size=BATCH, K=K, sharding=NamedSharding(make_mesh(), P(None, "data")))
    hb.start(10, K, 10 + 2 * K)
    out, shapes = {}, {}
    for d in range(2):
        b = hb.next()
        for k, v in b.items():
            shards = sorted(v.addressable_shards, key=lambda s: s.index[1].start or 0)
            out[f"{d}/{k}"] = np.concatenate([np.asarray(s.data) for s in shards], axis=1)
            shapes[k] = list(v.shape)
    i = jax.process_index()
    assert hb.rows is not None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(args.out) / f"p{i}.npz", **out)
    Path(args.out, f"p{i}.json").write_text(
        json.dumps({"process": i, "count": jax.process_count(), "rows": list(hb.rows), "shapes": shapes})
    )
    hb.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
