"""Data at scale, measured: memory, disk, conversion and throughput of the sharded on-disk path (DESIGN §10).

``python -m macfw.data.scale_bench --transitions N --json out.json`` does, on one machine and in
one invocation (so the ratios compare like with like on a shared, busy machine):

1. builds ``N`` transitions of **synthetic** shards (OGBench's file layout and keys, the shapes of
   ``--env``'s OGBench environment: ``observations``, ``actions``, ``terminals``, ``qpos``,
   ``qvel``; episodes of 1001 steps; random-walk values, not an oracle's data), shard ``0`` written
   with ``savez_compressed`` and the other full-size shards copied from it (``replicated``);
2. in a child process: converts them into memory-mapped stores (:mod:`macfw.data.shards`, timed)
   and measures the host sampler alone (:class:`~macfw.data.host_sampler.ShardedBatches`, placed
   on the device, no training): ``sampler_batches_per_s`` with the default prefetch threads and
   buffer, also one thread without prefetch and other ``--sampler-configs``;
3. trains the smoke agent (``gin/smoke.gin``: MAC with tiny networks) for ``--steps`` gradient
   steps, ``--repeats`` times each, alternating: on the shards sampled on the host
   (``train.data_on_device = False``) and on the same shards in memory, sampled inside the step
   (``train.data_on_device = True``; at most ``--inmemory-max-shards`` shards, as it must fit);
   each run is a child ``python -m macfw.run``; updates/s are the loop's (compilation excluded).

``peak_rss_bytes`` is the largest peak resident size (``VmHWM``) of the on-disk children
(conversion, sampler, on-disk training); the in-memory runs' is reported apart.

JSON keys: ``peak_rss_bytes``, ``disk_bytes`` (the converted stores), ``convert_s`` (all shards;
``convert_s_per_shard`` too), ``sampler_batches_per_s``, ``updates_per_s_ondisk``,
``updates_per_s_inmemory``, ``ondisk_over_inmemory``, ``synthetic`` (True), and the settings,
per-run figures and commands. The shards and stores (under ``--dir``) are deleted at the end unless
``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    import gymnasium

REPO = Path(__file__).resolve().parents[2]
EPISODE = 1001


def env_shapes(env_name: str) -> dict:
    """Per-row sizes of ``env_name``'s OGBench data: ob_dim, act_dim, nq, nv."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import ogbench

        env = cast("gymnasium.Env", ogbench.make_env_and_datasets(f"{env_name}-play-v0", env_only=True))
        try:
            u: Any = env.unwrapped  # an OGBench MuJoCo environment (its _model is not in gymnasium's types)
            ob_shape, act_shape = env.observation_space.shape, env.action_space.shape
            if ob_shape is None or act_shape is None:
                raise ValueError(
                    f"OGBench environment {env_name!r} has observation shape {ob_shape} and action shape "
                    f"{act_shape}; scale_bench needs both"
                )
            return {
                "ob_dim": int(ob_shape[0]),
                "act_dim": int(act_shape[0]),
                "nq": int(u._model.nq),
                "nv": int(u._model.nv),
            }  # noqa: SLF001
        finally:
            env.close()


def synthetic_shard(rows: int, shapes: dict, seed: int) -> tuple[dict, dict]:
    """A training and a validation dict (OGBench keys) of ``rows`` and ``max(rows // 10, EPISODE)`` rows."""
    rng = np.random.default_rng(seed)

    def part(n):
        ep_start = (np.arange(n) % EPISODE) == 0

        def walk(dim, scale):
            x = rng.normal(size=(n, dim)).astype(np.float32) * scale
            x[ep_start] = rng.normal(size=(int(ep_start.sum()), dim)).astype(np.float32)
            # a random walk restarted at every episode start
            c = np.cumsum(x, axis=0)
            base = np.maximum.accumulate(np.where(ep_start, np.arange(n), 0))
            prev = np.where((base > 0)[:, None], c[np.maximum(base - 1, 0)], np.float32(0.0))
            return (c - prev).astype(np.float32)

        terminals = np.zeros(n, np.float32)
        terminals[(np.arange(n) % EPISODE) == EPISODE - 1] = 1.0
        terminals[-1] = 1.0
        qpos = walk(shapes["nq"], 0.002)
        qpos[:, 14:17] = 0.4 + 0.05 * np.tanh(qpos[:, 14:17])  # cube 0 near the table's centre
        return {
            "observations": walk(shapes["ob_dim"], 0.01),
            "actions": np.tanh(rng.normal(size=(n, shapes["act_dim"]))).astype(np.float32),
            "terminals": terminals,
            "qpos": qpos,
            "qvel": walk(shapes["nv"], 0.01),
        }

    return part(rows), part(max(rows // 10, EPISODE))


def build_shards(out: Path, transitions: int, shard_transitions: int, env_name: str) -> dict:
    """Write the synthetic shards (see the module doc); returns what was built."""
    from macfw.data.generate import shard_filename

    shapes = env_shapes(env_name)
    out.mkdir(parents=True, exist_ok=True)
    num = -(-transitions // shard_transitions)
    sizes = [min(shard_transitions, transitions - k * shard_transitions) for k in range(num)]
    name = f"{env_name}-play-v0"
    t0 = time.perf_counter()
    first_full = None
    for k, rows in enumerate(sizes):
        path = out / shard_filename(name, k, num)
        val = Path(str(path)[:-4] + "-val.npz")
        if path.exists() and val.exists():
            first_full = first_full or (path if rows == shard_transitions else None)
            continue
        if rows == shard_transitions and first_full is not None:  # replicate the first full shard
            shutil.copyfile(Path(str(first_full)[:-4] + "-val.npz"), val)
            shutil.copyfile(first_full, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
            continue
        train, v = synthetic_shard(rows, shapes, seed=k)
        np.savez_compressed(str(val)[:-4] + ".tmp.npz", **v)
        os.replace(str(val)[:-4] + ".tmp.npz", val)
        np.savez_compressed(str(path)[:-4] + ".tmp.npz", **train)
        os.replace(str(path)[:-4] + ".tmp.npz", path)
        if rows == shard_transitions and first_full is None:
            first_full = path
    files = sum(p.stat().st_size for p in out.glob("*.npz"))
    return {
        "num_shards": num,
        "shard_rows": sizes,
        "shapes": shapes,
        "shard_files_bytes": files,
        "build_s": time.perf_counter() - t0,
    }


def _hwm(pid: int) -> int | None:
    """Peak resident size (``VmHWM``) of process ``pid`` in bytes, from ``/proc``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_child(cmd: list[str], env: dict, log: Path, poll_s: float = 0.1) -> tuple[int, int, float]:
    """Run ``cmd``; returns (exit code, peak RSS bytes, wall seconds).

    The peak is the child's own ``VmHWM`` (polled from ``/proc``; it only grows): ``wait4``'s
    ``ru_maxrss`` would report the parent's peak instead, since the child is started with vfork and
    exec keeps the larger of the two.
    """
    t0 = time.perf_counter()
    peak = 0
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        while p.poll() is None:
            peak = max(peak, _hwm(p.pid) or 0)
            time.sleep(poll_s)
    return p.returncode, peak, time.perf_counter() - t0


# --------------------------------------------------------------------------------- child: convert + sampler
def child_convert(args) -> None:
    """Convert the shards and time the sampler alone; writes a JSON to ``args.child_out``."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from macfw.agents.base import BatchSpec
    from macfw.data.host_sampler import ShardedBatches, ShardSampler
    from macfw.data.ogbench_data import OGBenchDataset
    from macfw.parallel import make_mesh

    ds = OGBenchDataset(
        env_name=args.env, task_mode="singletask", dataset_path=str(args.shard_dir), cache_dir=str(args.cache)
    )
    t0 = time.perf_counter()
    loaded = ds.load(args.chunk_len, args.chunk_len)
    load_s = time.perf_counter() - t0
    data = loaded.data
    per_shard = [s.convert_s for s in data.stores]
    spec = BatchSpec(chunk_len=args.chunk_len, gamma=0.999, normalize_reward=True)
    sampler = ShardSampler(data, batch_spec=spec, goal_conditioned=False, key=jax.random.PRNGKey(0))
    mesh = make_mesh()
    K, B = args.steps_per_dispatch, args.batch_size
    # one thread, no prefetch: the sampler's own speed
    sampler.stack(0, K, B)  # compile
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.sampler_seconds:
        jax.block_until_ready(sampler.stack(n * K, K, B))
        n += 1
    sync = n * K / (time.perf_counter() - t0)
    # the pipeline the loop uses: grain prefetch + placement on the device, with the dataset's defaults
    # (other threads x prefetch settings: --child configs, a process of its own)
    default = f"{ds.prefetch_threads}x{ds.prefetch}"
    by_config = {}
    for cfg in [default] if args.child == "convert" else [c for c in args.sampler_configs.split(",") if c]:
        threads, prefetch = (int(x) for x in cfg.split("x"))
        hb = ShardedBatches(
            sampler,
            batch_size=B,
            K=K,
            sharding=NamedSharding(mesh, P(None, "data")),
            threads=threads,
            prefetch=prefetch,
        )
        first = (len(by_config) + 1) * 10**6 * K  # fresh steps: rows not read by the previous config
        hb.start(first, K, first + 10**6 * K)
        jax.block_until_ready(hb.next())
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.sampler_seconds:
            jax.block_until_ready(hb.next())
            n += 1
        by_config[cfg] = n * K / (time.perf_counter() - t0)
        hb.close()
    pipe = by_config.get(default, float("nan"))
    out = {
        "convert_s": float(sum(per_shard)),
        "convert_s_per_shard": per_shard,
        "load_s": load_s,
        "disk_bytes": data.disk_bytes,
        "rows": data.size,
        "sampler_batches_per_s": pipe,
        "sampler_batches_per_s_sync": sync,
        "sampler_batches_per_s_by_threads_x_prefetch": by_config,
        "sampler_default_threads_x_prefetch": default,
        "sampler_batch_size": B,
        "sampler_K": K,
    }
    Path(args.child_out).write_text(json.dumps(out))


# --------------------------------------------------------------------------------- training runs
def train_cmd(args, workdir: Path, on_disk: bool) -> list[str]:
    b = [
        f"OGBenchDataset.env_name = '{args.env}'",
        "OGBenchDataset.task_mode = 'singletask'",
        f"OGBenchDataset.dataset_path = '{args.shard_dir}'",
        f"OGBenchDataset.cache_dir = '{args.cache}'",
        f"train.data_on_device = {not on_disk}",
        f"train.num_steps = {args.steps}",
        f"train.steps_per_dispatch = {args.steps_per_dispatch}",
        f"train.batch_size = {args.batch_size}",
        f"train.log_interval = {args.steps}",
        f"train.eval_interval = {args.steps}",
        f"train.save_interval = {args.steps}",
        "train.eval_episodes = 1",
        "train.progress = False",
        "train.device_data_limit_gb = 1000.0",
    ]
    if not on_disk and args.inmemory_max_shards:
        b.append(f"OGBenchDataset.max_shards = {args.inmemory_max_shards}")
    cmd = [sys.executable, "-m", "macfw.run", "--gin_file", "gin/smoke.gin", "--workdir", str(workdir)]
    for x in b:
        cmd += ["--gin_bindings", x]
    return cmd


def _parser() -> argparse.ArgumentParser:
    """``python -m macfw.data.scale_bench``'s command line."""
    p = argparse.ArgumentParser(
        prog="python -m macfw.data.scale_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--transitions", type=int, required=True, help="transitions in all shards together")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--shard-transitions", type=int, default=1_000_000, help="rows per shard (OGBench: 1001000)")
    p.add_argument("--env", default="cube-double", help="OGBench environment whose shapes the data has")
    p.add_argument("--steps", type=int, default=3000, help="gradient steps per training run")
    p.add_argument("--steps-per-dispatch", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="samples per gradient step (smoke budget: 32)")
    p.add_argument("--chunk-len", type=int, default=5, help="the smoke agent's chunk length (gin/smoke.gin)")
    p.add_argument("--repeats", type=int, default=3, help="training runs of each kind (alternating; medians reported)")
    p.add_argument(
        "--inmemory-max-shards",
        type=int,
        default=5,
        help="at most this many shards in memory for the in-memory runs (0: all)",
    )
    p.add_argument("--sampler-seconds", type=float, default=10.0, help="seconds of sampler-only timing")
    p.add_argument(
        "--sampler-configs",
        default="2x4,4x8",
        help="other prefetch threads x stacks made ahead to time the sampler with, in a process of its "
        "own (the default OGBenchDataset.prefetch_threads x prefetch gives sampler_batches_per_s)",
    )
    p.add_argument("--dir", default=None, help="where shards and stores go (default <cache>/scale_bench/N)")
    p.add_argument("--keep", action="store_true", help="keep the shards and stores")
    p.add_argument("--child", choices=["convert", "configs"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--shard-dir", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    return p


def _settings(args: argparse.Namespace, built: dict) -> dict:
    """The figures' dict, first filled with the settings and what :func:`build_shards` built."""
    return {
        "synthetic": True,
        "data": (
            f"synthetic random-walk shards with {args.env}'s OGBench shapes; shard 0 "
            "generated, further full shards copies of it (replicated)"
        ),
        "transitions": args.transitions,
        "shard_transitions": args.shard_transitions,
        "env": args.env,
        **built,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "steps_per_dispatch": args.steps_per_dispatch,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_avg_start": list(os.getloadavg()),
    }


def _measure_conversion(args: argparse.Namespace, env: dict, runs: Path, out: dict) -> int | None:
    """Step 2 of the module doc in child processes: conversion and the sampler with the default prefetch
    settings, then (``--sampler-configs``) with the others; their figures go into ``out``. Returns the
    first child's peak RSS in bytes, or None when it failed (its log's end printed to stderr)."""
    conv_json = runs / "convert.json"
    cmd = [
        sys.executable,
        "-m",
        "macfw.data.scale_bench",
        "--transitions",
        str(args.transitions),
        "--json",
        "-",
        "--child",
        "convert",
        "--child-out",
        str(conv_json),
        "--shard-dir",
        str(args.shard_dir),
        "--cache",
        str(args.cache),
        "--env",
        args.env,
        "--batch-size",
        str(args.batch_size),
        "--steps-per-dispatch",
        str(args.steps_per_dispatch),
        "--chunk-len",
        str(args.chunk_len),
        "--sampler-seconds",
        str(args.sampler_seconds),
        "--sampler-configs",
        args.sampler_configs,
    ]
    print("scale_bench: converting and timing the sampler ...", flush=True)
    rc, rss, _ = run_child(cmd, env, runs / "convert.log")
    if rc != 0:
        print((runs / "convert.log").read_text()[-4000:], file=sys.stderr)
        return None
    conv = json.loads(conv_json.read_text())
    out.update(conv)
    out["rss_convert_and_sampler_bytes"] = rss
    if args.sampler_configs:
        cfg_json = runs / "configs.json"
        cmd_c = [c if c != "convert" else "configs" for c in cmd]
        cmd_c[cmd_c.index("--child-out") + 1] = str(cfg_json)
        print("scale_bench: timing the sampler with other prefetch settings ...", flush=True)
        rc_c, rss_c, _ = run_child(cmd_c, env, runs / "configs.log")
        if rc_c == 0:
            c = json.loads(cfg_json.read_text())
            out["sampler_batches_per_s_by_threads_x_prefetch"] = {
                conv["sampler_default_threads_x_prefetch"]: conv["sampler_batches_per_s"],
                **c["sampler_batches_per_s_by_threads_x_prefetch"],
            }
            out["rss_sampler_configs_bytes"] = rss_c
    return rss


def _measure_training(
    args: argparse.Namespace, env: dict, runs: Path, out: dict, rss_convert: int, argv: list[str] | None
) -> bool:
    """Step 3 of the module doc: ``--repeats`` alternated training runs on disk and in memory; their
    updates/s, peak RSS and commands go into ``out`` (``rss_convert``: the conversion child's peak, an
    on-disk figure; ``argv``: :func:`main`'s, for ``bench_command``). False when a run failed (its
    log's end printed to stderr)."""
    per = {"ondisk": [], "inmemory": []}
    rss_kind = {"ondisk": [rss_convert], "inmemory": []}
    commands = {}
    for r in range(args.repeats):
        for kind in ("ondisk", "inmemory"):
            wd = runs / f"{kind}-{r}"
            cmd = train_cmd(args, wd, kind == "ondisk")
            commands[kind] = shlex.join(cmd)
            print(f"scale_bench: training run {r + 1}/{args.repeats} {kind} ...", flush=True)
            rc, rss, wall = run_child(cmd, env, runs / f"{kind}-{r}.log")
            if rc != 0:
                print((runs / f"{kind}-{r}.log").read_text()[-4000:], file=sys.stderr)
                return False
            s = json.loads((wd / "summary.json").read_text())
            per[kind].append(float(s["updates_per_s"]))
            rss_kind[kind].append(rss)
            if kind == "inmemory":
                out["inmemory_transitions"] = s["num_transitions"]
            print(
                f"scale_bench:   {s['updates_per_s']:.1f} updates/s, peak RSS {rss / 2**20:.0f} MiB, {wall:.0f} s",
                flush=True,
            )
    up_d, up_m = statistics.median(per["ondisk"]), statistics.median(per["inmemory"])
    out.update(
        updates_per_s_ondisk=up_d,
        updates_per_s_inmemory=up_m,
        ondisk_over_inmemory=up_d / up_m,
        updates_per_s_runs=per,
        peak_rss_bytes=max(rss_kind["ondisk"]),
        peak_rss_bytes_runs=rss_kind,
        peak_rss_bytes_inmemory=max(rss_kind["inmemory"]),
        train_commands=commands,
        load_avg_end=list(os.getloadavg()),
        bench_command=shlex.join(["python", "-m", "macfw.data.scale_bench"] + list(argv or sys.argv[1:])),
    )
    return True


def _report(args: argparse.Namespace, out: dict, built: dict, root: Path) -> None:
    """Write ``out`` as JSON (``--json -``: to stdout), print the one-line summary, remove ``root``
    unless ``--keep``."""
    up_d, up_m = out["updates_per_s_ondisk"], out["updates_per_s_inmemory"]
    text = json.dumps(out, indent=1)
    if args.json == "-":
        print(text)
    else:
        Path(args.json).write_text(text + "\n")
    print(
        f"scale_bench (SYNTHETIC data): {args.transitions} transitions in {built['num_shards']} shard(s): peak RSS "
        f"{out['peak_rss_bytes'] / 2**30:.2f} GiB, stores {out['disk_bytes'] / 2**30:.2f} GiB on disk, converted in "
        f"{out['convert_s']:.1f} s, sampler {out['sampler_batches_per_s']:.0f} batches/s, training "
        f"{up_d:.1f} (on disk) vs {up_m:.1f} (in memory) updates/s = {up_d / up_m:.3f}",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child in ("convert", "configs"):
        child_convert(args)
        return 0
    from macfw.data.generate import default_cache_dir

    root = Path(args.dir) if args.dir else default_cache_dir() / "scale_bench" / str(args.transitions)
    args.shard_dir, args.cache = root / "shards", root / "cache"
    runs = root / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    env = dict(os.environ)
    print(
        f"scale_bench: building {args.transitions} transitions of SYNTHETIC shards ({args.env} shapes, "
        f"{args.shard_transitions} per shard) in {root}",
        flush=True,
    )
    built = build_shards(args.shard_dir, args.transitions, args.shard_transitions, args.env)
    shutil.rmtree(args.cache, ignore_errors=True)  # convert from scratch: convert_s is measured
    out = _settings(args, built)
    rss = _measure_conversion(args, env, runs, out)
    if rss is None:
        return 1
    if not _measure_training(args, env, runs, out, rss, argv):
        return 1
    _report(args, out, built, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
