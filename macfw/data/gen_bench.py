"""Data-generation throughput by number of worker processes:
``python -m macfw.data.gen_bench [--dataset cube-single-play-v0] [--episodes 8] [--workers 1,2] [--rounds 2]``.

Each round generates the same dataset (``--episodes`` training episodes plus OGBench's validation
tenth, ``--episode-length`` environment steps each, seed 0) once per worker count, in the order
given, into a temporary folder that is removed afterwards; rounds alternate the worker counts so
that a change of machine load hits all of them alike. Reported per worker count: the median
wall time of :func:`macfw.data.generate.generate_dataset` (seconds, worker start-up included) and
its throughput (transitions, i.e. environment steps, per second), then the scaling ratio of each
count against the first (``throughput(w) / throughput(first)``; ideal: ``w / first``). The
generated arrays are also compared across worker counts (they must be equal: the data depends on
the seed only).

Raises ``SystemExit`` with a message when the datasets of two worker counts differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from macfw.data.generate import generate_dataset, val_dataset_path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in (path, val_dataset_path(path)):
        with np.load(p) as z:
            for k in sorted(z.files):
                h.update(k.encode())
                h.update(np.ascontiguousarray(z[k]).tobytes())
    return h.hexdigest()[:16]


def measure(
    dataset: str = "cube-single-play-v0", episodes: int = 8, workers=(1, 2), rounds: int = 2, episode_length: int = 1001
) -> dict:
    """Times :func:`generate_dataset` per worker count (see the module docstring); returns the figures.

    Raises:
      ValueError: ``rounds < 1`` or an empty ``workers``.
    """
    workers = [int(w) for w in workers]
    if rounds < 1 or not workers:
        raise ValueError(f"need rounds >= 1 and at least one worker count, got rounds={rounds}, workers={workers}")
    transitions = (episodes + max(1, episodes // 10)) * episode_length
    times: dict[int, list[float]] = {w: [] for w in workers}
    digests: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="macfw-gen-bench-") as tmp:
        for r in range(rounds):
            for w in workers:
                out = Path(tmp) / f"r{r}-w{w}" / "data.npz"
                t0 = time.perf_counter()
                generate_dataset(dataset, out, episodes, episode_length=episode_length, workers=w, progress=False)
                times[w].append(time.perf_counter() - t0)
                digests.setdefault(w, _digest(out))
                print(f"[gen_bench] round {r}: {w} worker(s) {times[w][-1]:.2f} s", flush=True)
    if len(set(digests.values())) != 1:
        raise SystemExit(f"datasets differ across worker counts: {digests}")
    med = {w: statistics.median(t) for w, t in times.items()}
    tps = {w: transitions / med[w] for w in workers}
    return {
        "dataset": dataset,
        "episodes": episodes,
        "episode_length": episode_length,
        "transitions": transitions,
        "rounds": rounds,
        "seconds": times,
        "median_s": med,
        "transitions_per_s": tps,
        "scaling": {w: tps[w] / tps[workers[0]] for w in workers},
        "digest": digests[workers[0]],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m macfw.data.gen_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", default="cube-single-play-v0")
    ap.add_argument("--episodes", type=int, default=8, help="training episodes per generation")
    ap.add_argument("--episode-length", type=int, default=1001, help="environment steps per episode")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    try:
        workers = [int(x) for x in a.workers.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--workers must be comma-separated integers, got {a.workers!r}")
    r = measure(a.dataset, a.episodes, workers, a.rounds, a.episode_length)
    print(f"\n{r['dataset']}: {r['transitions']} transitions per generation, median of {r['rounds']} rounds")
    print("| workers | seconds | transitions/s | scaling |")
    print("|---|---|---|---|")
    for w in workers:
        print(f"| {w} | {r['median_s'][w]:.2f} | {r['transitions_per_s'][w]:.0f} | {r['scaling'][w]:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
