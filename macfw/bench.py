"""Throughput benchmark of any agent's update: ``python -m macfw.bench --preset cpu-small [--json PATH]``.

Prints updates per second after compilation, the FLOPs of one update from XLA's cost analysis,
the achieved FLOP/s, and a practical peak measured in the same run: the FLOP/s of a large plain
matrix product on the same device, timed right after each dispatch. ``utilisation`` is the median
over dispatches of ``achieved / peak`` for the pair (DESIGN §7), ``utilisation_range`` their spread;
``matmul_peak_flops`` the median peak. It also times
the parts of an update the agent names (:meth:`Agent.benchmark_parts`; MAC: the imagined rollout
and the rejection sampler), as ``<part>_s``.

The agent comes from Gin (default ``gin/mac.gin``; ``--gin_file gin/baselines/mopo.gin`` for
another agent); a preset binds the sizes (``HIDDEN``, batch size) and MAC's rollout settings.
``--all-agents`` benches every agent's Gin file at the preset's sizes and prints one table
(goal-conditioned agents get ``--goal-dim`` goal dimensions, default 3).

FLOP counting: XLA's cost analysis counts a loop body once, so the update is compiled for
counting from :meth:`Agent.for_flop_count` (MAC: the H-step rollout unrolled) with one gradient
step per call, plus :meth:`Agent.uncounted_flops` (MAC: ``flow_steps - 1`` more velocity
evaluations of the distillation target's diffrax ODE loop). ``flops_per_update`` is the count of
the reference computation (traced inside :func:`macfw.reference.reference_computation`: every
network input multiplied in full), what the method computes; the program that runs shares the
state's product across the N candidates and the ODE steps and executes fewer,
``executed_flops_per_update``.
``utilisation`` counts the reference FLOPs (work saved counts as work done), ``hardware_utilisation``
the executed ones.

Against the reference: ``--against-reference`` builds the update twice in one process, once as
the reference computation (:mod:`macfw.reference`: every same-result speed-up off) and once as it
runs, alternates ``--dispatches`` dispatches of each and prints both per-update times, the speed-up
and the largest relative difference of their metrics after the same updates. ``--only NAME[,NAME]``
turns off just those speed-ups in the reference (:data:`macfw.reference.SPEEDUPS`): what each one
saves, measured in one process.

Compile time: ``--compile-time`` starts three fresh processes that each build the agent and time its
first dispatch (compilation plus one dispatch of K updates; seconds of wall time): without JAX's
persistent compilation cache, with an empty cache (compile and write it), and with that cache
filled (what a resumed or repeated ``python -m macfw.run`` gets, which turns the cache on in the
macfw cache folder). It prints the three figures and the ratio cold / warm.

Where the time goes: ``--profile`` runs ``--dispatches`` dispatches under JAX's profiler and prints
op time per gradient step by phase (the update's named scopes: sampling, rollout, model losses,
value/critic, optimizer) and by kind (matrix products, elementwise, reductions, random numbers,
data movement), with the matrix products' fraction of the peak and each phase's wall time (the
time during which one of its operations ran; op time counts operations that run side by side
twice) (:mod:`macfw.profiling`).

Host memory: like ``python -m macfw.run``, the command keeps freed host memory mapped
(:func:`macfw.memory.retain_freed_memory`; the JSON's ``retained_freed_memory``), so each dispatch
reuses its buffer's pages instead of page-faulting 43 MB in again at ``cpu-small``;
``MACFW_RETAIN_MEMORY=0`` times it with ``malloc``'s defaults.

On a GPU: ``python -m macfw.bench --preset paper --json bench.json`` (bf16 matrix products
with ``--compute-dtype bfloat16``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from macfw.bench_setup import (  # noqa: F401  (matmul_peak: re-exported as macfw.bench.matmul_peak)
    PRESETS,
    REPO,
    build_agent,
    matmul_peak,
    peak_meter,
    synthetic_data,
)
from macfw.bench_setup import setup_agent as _setup
from macfw.bench_setup import time_fn as _time
from macfw.data.batches import sample_for
from macfw.memory import retain_freed_memory
from macfw.reference import parse_only, reference_computation
from macfw.spec import Spec


def _flops(compiled) -> float:
    compiled = getattr(compiled, "compiled", compiled)  # equinox wraps jax's Compiled
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", 0.0)) if ca else 0.0


def _first_call(step, data, state):
    """Seconds of ``step``'s first call (tracing, compilation or a cache hit, one dispatch), and its state."""
    t0 = time.perf_counter()
    state, m = step(data, state)
    jax.block_until_ready(m)
    return time.perf_counter() - t0, state


def first_dispatch(preset: str = "cpu-small", **model) -> dict:
    """Wall seconds of the first training dispatch (tracing, XLA compilation or a persistent-cache
    hit, one dispatch of K updates; the same span as :func:`run`'s ``compile_s``), and of the second
    dispatch alone (``dispatch_s``), so ``first_dispatch_s - dispatch_s`` is the compile share.
    ``model``: :func:`run`'s keyword arguments other than ``dispatches``."""
    _, _, data, state, step, K, _ = _setup(preset, **model)
    first, state = _first_call(step, data, state)
    second, _ = _first_call(step, data, state)
    return {"first_dispatch_s": first, "dispatch_s": second, "steps_per_dispatch": K}


def against_reference(preset: str = "cpu-small", *, pairs: int = 8, only=None, **model) -> dict:
    """The update against its reference computation (:mod:`macfw.reference`), in one process: both built
    from the same seed on the same synthetic data, compiled, then ``pairs`` dispatches of each
    alternated (so both see the same machine). Returns per-update seconds of every dispatch, the
    medians, ``speedup`` (reference / current median), and ``max_rel_diff``: the largest relative
    difference between the two's metrics after the same number of updates (the same computation:
    float rounding only), ``metrics`` (each one's last-dispatch means) and ``updates`` (per program,
    ``(1 + pairs) * K``). ``only``: the reference with just these speed-ups off (names from
    :data:`macfw.reference.SPEEDUPS`, or a comma-separated string; None: all). ``model``: :func:`run`'s
    keyword arguments other than ``dispatches``.

    Raises:
      ValueError: ``pairs < 1``; an unknown speed-up name in ``only`` (lists the names).
    """
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    only = parse_only(only)
    with reference_computation(only=only):  # traced and compiled inside: its first call is here
        _, _, data_r, st_r, step_r, K, _ = _setup(preset, **model)
        _, st_r = _first_call(step_r, data_r, st_r)
    _, _, data_n, st_n, step_n, K, _ = _setup(preset, **model)
    _, st_n = _first_call(step_n, data_n, st_n)
    times = {"reference": [], "current": []}
    for _ in range(pairs):
        for name in times:
            t0 = time.perf_counter()
            if name == "reference":
                st_r, m_r = step_r(data_r, st_r)
                jax.block_until_ready(m_r)
            else:
                st_n, m_n = step_n(data_n, st_n)
                jax.block_until_ready(m_n)
            times[name].append((time.perf_counter() - t0) / K)
    med = {k: float(np.median(v)) for k, v in times.items()}
    diffs = [
        float(np.max(np.abs(np.asarray(m_n[k]) - np.asarray(m_r[k])) / np.maximum(np.abs(np.asarray(m_r[k])), 1e-6)))
        for k in m_r
        if np.issubdtype(np.asarray(m_r[k]).dtype, np.floating)
    ]
    means = lambda m: {k: float(np.mean(np.asarray(v))) for k, v in m.items()}  # noqa: E731
    return {
        "preset": preset,
        "only": sorted(only) if only else None,
        "steps_per_dispatch": K,
        "pairs": pairs,
        "updates": int(st_n.step),
        "update_s": times,
        "reference_update_s": med["reference"],
        "current_update_s": med["current"],
        "speedup": med["reference"] / med["current"],
        "max_rel_diff": max(diffs) if diffs else 0.0,
        "metrics": {"reference": means(m_r), "current": means(m_n)},
    }


def compile_times(preset: str = "cpu-small", *, cache_dir: str | Path | None = None, extra_args=()) -> dict:
    """:func:`first_dispatch` in three fresh processes: no persistent compilation cache (``off``),
    an empty one (``cold``: compiles and writes it) and the same one again (``warm``).

    ``cache_dir``: the cache folder to use (it must be empty or absent; default a temporary folder,
    removed afterwards). ``extra_args``: more ``python -m macfw.bench`` arguments (``--gin_file``...).

    Raises:
      ValueError: ``cache_dir`` exists and is not empty (its entries would make ``cold`` a warm start).
      RuntimeError: a child process failed (its stderr is in the message).
    """
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    tmp = None
    if cache_dir is None:
        tmp = cache_dir = tempfile.mkdtemp(prefix="macfw-compile-cache-")
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise ValueError(f"compile-time cache folder {str(cache_dir)!r} is not empty; pass an empty or new folder")
    out = {}
    try:
        for label in ("off", "cold", "warm"):
            env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
            cmd = [sys.executable, "-m", "macfw.bench", "--preset", preset, "--_first-dispatch", *extra_args]
            if label != "off":
                cmd += ["--_compilation-cache", str(cache_dir)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
            if r.returncode != 0:
                raise RuntimeError(f"compile-time child ({label}) exited {r.returncode}:\n{r.stderr[-4000:]}")
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "preset": preset,
        "off_s": out["off"]["first_dispatch_s"],
        "cold_s": out["cold"]["first_dispatch_s"],
        "warm_s": out["warm"]["first_dispatch_s"],
        "dispatch_s": out["off"]["dispatch_s"],
        "cold_over_warm": out["cold"]["first_dispatch_s"] / out["warm"]["first_dispatch_s"],
        "runs": out,
    }


def _timed_dispatches(step, data, state, dispatches: int, compute_dtype) -> tuple[float, object, list, list]:
    """The real training step (K updates per dispatch) timed: its first call, then ``dispatches``
    dispatches, each followed by the peak matrix product, so that every dispatch has a peak figure
    measured beside it (a shared machine's speed drifts by 15% within minutes): utilisation is the
    median over these pairs. Returns ``(compile_s, state, dispatch seconds, peak FLOP/s)``."""
    compile_s, state = _first_call(step, data, state)
    meter = peak_meter(jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32)
    dispatch_s, peaks = [], []
    for _ in range(dispatches):
        t0 = time.perf_counter()
        state, m = step(data, state)
        jax.block_until_ready(m)
        dispatch_s.append(time.perf_counter() - t0)
        peaks.append(meter())
    return compile_s, state, dispatch_s, peaks


def _update_flops(agent, spec: Spec, data, B: int, count_executed: bool) -> tuple[float, float | None, float]:
    """FLOPs per update: XLA cost analysis of the counting variant, plus what it misses.

    Twice: the reference computation, which is what the method computes and what utilisation counts,
    and (``count_executed``) the program that runs, with products of inputs shared across candidates
    and ODE steps (macfw.nn.mlp.MLP.prefix); a fresh step function each, as JAX caches traces per
    function. Returns ``(flops, executed flops or None, seconds spent compiling them)``."""
    from macfw.step import make_train_step

    agent_c = agent.for_flop_count()
    state_c = agent_c.init(spec, jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    with reference_computation(rolled_threefry=False):  # (XLA counts a loop body once)
        step_c = make_train_step(agent_c, batch_size=B, steps_per_dispatch=1, template=state_c)
        flops = _flops(step_c.lower(data, state_c).compile()) + agent_c.uncounted_flops(state_c, B)
    executed = None
    if count_executed:
        step_c = make_train_step(agent_c, batch_size=B, steps_per_dispatch=1, template=state_c)
        executed = _flops(step_c.lower(data, state_c).compile()) + agent_c.uncounted_flops(state_c, B)
    return flops, executed, time.perf_counter() - t0


def run(
    preset: str = "cpu-small",
    *,
    gin_files=("gin/mac.gin",),
    gin_bindings=(),
    ob_dim: int = 28,
    act_dim: int = 5,
    goal_dim: int = 0,
    compute_dtype=None,
    steps_per_dispatch: int | None = None,
    dispatches: int = 5,
    count_executed: bool = True,
) -> dict:
    """Time one agent's training step at ``preset``'s sizes on synthetic data; returns the figures.
    ``count_executed=False`` skips the second FLOP count (the executed program's; its figures are then
    None)."""
    agent, spec, data, state, step, K, B = _setup(
        preset,
        gin_files=gin_files,
        gin_bindings=gin_bindings,
        ob_dim=ob_dim,
        act_dim=act_dim,
        goal_dim=goal_dim,
        compute_dtype=compute_dtype,
        steps_per_dispatch=steps_per_dispatch,
    )
    bspec = agent.batch_spec
    p = PRESETS[preset]

    compile_s, state, dispatch_s, peaks = _timed_dispatches(step, data, state, dispatches, compute_dtype)
    ups = dispatches * K / sum(dispatch_s)
    flops, executed, count_compile_s = _update_flops(agent, spec, data, B, count_executed)
    peak = float(np.median(peaks))
    pair_util = [flops * K / d / pk for d, pk in zip(dispatch_s, peaks)]

    # --- the parts the agent names, alone
    batch = sample_for(bspec, data, jax.random.PRNGKey(3), B, goal_conditioned=spec.goal_conditioned)
    parts = {}
    for name, (fn, args) in agent.benchmark_parts(state, batch).items():
        parts[f"{name}_s"] = _time(fn, *args)[0]
        parts[f"{name}_per_s"] = 1.0 / parts[f"{name}_s"]

    achieved = flops * ups
    return {
        "preset": preset,
        "agent": type(agent).__name__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "num_devices": jax.device_count(),
        "compute_dtype": compute_dtype or "float32",
        "steps_per_dispatch": K,
        "compiler_options": step.compiler_options,
        "compile_s": compile_s,
        "count_compile_s": count_compile_s,
        "updates_per_s": ups,
        "flops_per_update": flops,
        "achieved_flops": achieved,
        "matmul_peak_flops": peak,
        "utilisation": float(np.median(pair_util)),
        "utilisation_range": [float(min(pair_util)), float(max(pair_util))],
        "executed_flops_per_update": executed,
        "hardware_utilisation": None if executed is None else float(np.median(pair_util)) * executed / flops,
        **parts,
        "config": {
            "batch": B,
            "steps_per_dispatch": K,
            "bindings": {k: v for k, v in p["bindings"].items()},
            "gin_files": list(gin_files),
            "gin_bindings": list(gin_bindings),
            "batch_spec": dataclasses.asdict(bspec),
            "ob_dim": ob_dim,
            "act_dim": act_dim,
            "goal_dim": goal_dim,
        },
        "versions": {"jax": jax.__version__},
    }


def count_flops(
    *,
    gin_files=("gin/mac.gin",),
    gin_bindings=(),
    ob_dim: int = 28,
    act_dim: int = 5,
    goal_dim: int = 0,
    batch_size: int | None = None,
) -> dict:
    """FLOPs of one update of the agent exactly as its Gin files configure it (no preset's sizes: its
    own ``HIDDEN`` and ``train.batch_size``, unless ``batch_size`` is given), by XLA's count of the
    reference computation as :func:`run` counts it; compiled only, nothing timed (a paper-size agent
    compiles on a CPU in a minute or two). Returns ``{"flops_per_update", "batch_size", "agent",
    "ob_dim", "act_dim", "goal_dim"}``.

    Raises:
      FileNotFoundError, GinConfigError: as :func:`build_agent`.
    """
    import gin

    from macfw.step import make_train_step

    agent = build_agent({"bindings": {}}, gin_files=gin_files, gin_bindings=gin_bindings)
    try:  # (the networks are built from the Gin config at init)
        B = int(batch_size or gin.query_parameter("train.batch_size"))
        spec = Spec(ob_dim=ob_dim, act_dim=act_dim, goal_dim=goal_dim, chunk_len=agent.batch_spec.chunk_len)
        data = synthetic_data(spec, window=agent.batch_spec.window)
        agent_c = agent.for_flop_count()
        state_c = agent_c.init(spec, jax.random.PRNGKey(0))
        with reference_computation(rolled_threefry=False):  # (XLA counts a loop body once)
            step_c = make_train_step(agent_c, batch_size=B, steps_per_dispatch=1, template=state_c)
            flops = _flops(step_c.lower(data, state_c).compile()) + agent_c.uncounted_flops(state_c, B)
    finally:
        gin.clear_config()
    return {
        "flops_per_update": flops,
        "batch_size": B,
        "agent": type(agent).__name__,
        "ob_dim": ob_dim,
        "act_dim": act_dim,
        "goal_dim": goal_dim,
    }


def agent_gin_files() -> dict[str, str]:
    """Every agent's Gin file: ``{'mac': 'gin/mac.gin', 'mopo': 'gin/baselines/mopo.gin', ...}``."""
    out = {"mac": "gin/mac.gin"}
    out.update({p.stem: f"gin/baselines/{p.name}" for p in sorted((REPO / "gin" / "baselines").glob("*.gin"))})
    return out


def goal_conditioned_by_default(gin_file: str) -> bool:
    """Whether the agent's Gin file sets ``OGBenchDataset.task_mode = 'oraclerep'`` (its data has goals)."""
    import re

    text = (REPO / gin_file).read_text()
    return re.search(r"^\s*OGBenchDataset\.task_mode\s*=\s*'oraclerep'", text, re.M) is not None


def run_all_agents(preset: str = "cpu-small", *, goal_dim: int = 3, dispatches: int = 5, **kw) -> list[dict]:
    """:func:`run` for every registered agent's Gin file at ``preset``'s sizes (goal-conditioned agents
    with ``goal_dim`` goals); one result dict per agent."""
    out = []
    for name, f in agent_gin_files().items():
        gd = goal_dim if goal_conditioned_by_default(f) else 0
        r = run(preset, gin_files=(f,), goal_dim=gd, dispatches=dispatches, **kw)
        out.append(dict(r, name=name, gin_file=f))
        print(
            f"[bench] {name:>12}: {r['updates_per_s']:8.2f} updates/s, utilisation {r['utilisation']:.3f}, "
            f"{r['flops_per_update']:.3g} FLOP/update",
            flush=True,
        )
    return out


def _dump(path: str | None, obj) -> None:
    """Write the figures as JSON to ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, default=str)


def _profile_main(a, model: dict, argv) -> int:
    """``--profile``: :func:`macfw.profiling.profile` in this process when XLA_FLAGS already has the CPU
    trace flag (or the backend is not the CPU), else in a child process started with it."""
    import os
    import subprocess
    import sys

    from macfw import profiling

    flags = os.environ.get("XLA_FLAGS", "")
    if profiling.TRACEME_FLAG not in flags and jax.default_backend() == "cpu":
        env = dict(os.environ, XLA_FLAGS=f"{flags} {profiling.TRACEME_FLAG}".strip())
        args = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "macfw.bench", *args], env=env).returncode
    r = profiling.profile(a.preset, dispatches=a.dispatches, **model)
    print(profiling.format_table(r))
    _dump(a.json, r)
    return 0


def _parser() -> argparse.ArgumentParser:
    """``python -m macfw.bench``'s command line."""
    ap = argparse.ArgumentParser(
        prog="python -m macfw.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    ap.add_argument(
        "--gin_file",
        action="append",
        default=None,
        help="Gin file binding train.agent (repeatable; default gin/mac.gin)",
    )
    ap.add_argument("--gin_bindings", action="append", default=[], help="extra Gin binding (repeatable)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    ap.add_argument(
        "--compute-dtype",
        default=None,
        choices=[None, "bfloat16", "float32"],
        help="matrix-product dtype (parameters stay float32)",
    )
    ap.add_argument("--steps-per-dispatch", type=int, default=None)
    ap.add_argument("--dispatches", type=int, default=5)
    ap.add_argument("--ob-dim", type=int, default=28)
    ap.add_argument("--act-dim", type=int, default=5)
    ap.add_argument("--goal-dim", type=int, default=0)
    ap.add_argument(
        "--all-agents",
        action="store_true",
        help="bench every agent's Gin file (gin/mac.gin, gin/baselines/*.gin) at the preset's sizes",
    )
    ap.add_argument(
        "--compile-time",
        action="store_true",
        help="time the first dispatch in fresh processes without, with an empty and with a filled "
        "persistent compilation cache",
    )
    ap.add_argument(
        "--against-reference",
        action="store_true",
        help="time the update against its reference computation (macfw.reference), alternated in "
        "one process (--dispatches pairs), and compare their losses",
    )
    ap.add_argument(
        "--only",
        default=None,
        metavar="NAME[,NAME]",
        help="with --against-reference: turn off just these speed-ups in the reference "
        "(macfw.reference.SPEEDUPS), to measure what each saves",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="op time per gradient step by phase (sampling, rollout, losses, optimizer) and kind "
        "(matrix products, elementwise, reductions, random numbers, data movement), from a "
        "profiler trace of --dispatches dispatches (macfw.profiling)",
    )
    ap.add_argument("--_first-dispatch", dest="first_dispatch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_compilation-cache", dest="compilation_cache", default=None, help=argparse.SUPPRESS)
    return ap


def _against_reference_main(a: argparse.Namespace, model: dict[str, Any]) -> int:
    """``--against-reference``: :func:`against_reference`, printed and written as JSON."""
    r = against_reference(a.preset, pairs=a.dispatches, only=a.only, **model)
    print(f"preset {a.preset}, {r['pairs']} alternated pairs of dispatches ({r['steps_per_dispatch']} updates each):")
    off = ", ".join(r["only"]) if r["only"] else "all"
    print(f"  reference computation ({off} off): {1e3 * r['reference_update_s']:.2f} ms per update (median)")
    print(f"  current:               {1e3 * r['current_update_s']:.2f} ms per update (median)")
    print(f"  speed-up {r['speedup']:.3f}x; largest relative difference of the metrics {r['max_rel_diff']:.2e}")
    _dump(a.json, r)
    return 0


def _compile_time_main(a: argparse.Namespace) -> int:
    """``--compile-time``: :func:`compile_times` with the model arguments passed on to the children, printed
    and written as JSON."""
    extra = [x for f in (a.gin_file or []) for x in ("--gin_file", f)]
    extra += [x for b in a.gin_bindings for x in ("--gin_bindings", b)]
    extra += ["--ob-dim", str(a.ob_dim), "--act-dim", str(a.act_dim), "--goal-dim", str(a.goal_dim)]
    extra += ["--steps-per-dispatch", str(a.steps_per_dispatch)] if a.steps_per_dispatch else []
    extra += ["--compute-dtype", a.compute_dtype] if a.compute_dtype else []
    r = compile_times(a.preset, extra_args=extra)
    print(f"first dispatch ({r['runs']['off']['steps_per_dispatch']} updates), preset {a.preset}, seconds:")
    print(f"  no compilation cache: {r['off_s']:.2f}")
    print(f"  empty cache (cold):   {r['cold_s']:.2f}")
    print(f"  filled cache (warm):  {r['warm_s']:.2f}   cold / warm = {r['cold_over_warm']:.2f}")
    print(f"  one later dispatch:   {r['dispatch_s']:.3f}")
    _dump(a.json, r)
    return 0


def _all_agents_main(a: argparse.Namespace) -> int:
    """``--all-agents``: :func:`run_all_agents`, as a Markdown table and JSON."""
    rows = run_all_agents(
        a.preset,
        goal_dim=a.goal_dim or 3,
        dispatches=a.dispatches,
        ob_dim=a.ob_dim,
        act_dim=a.act_dim,
        compute_dtype=a.compute_dtype,
        steps_per_dispatch=a.steps_per_dispatch,
    )
    print(f"\n| agent | updates/s | utilisation | FLOP per update |  (preset {a.preset}, {rows[0]['device']})")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['updates_per_s']:.2f} | {r['utilisation']:.3f} | {r['flops_per_update']:.3g} |")
    _dump(a.json, rows)
    return 0


def _run_main(a: argparse.Namespace, model: dict[str, Any], retained: bool) -> int:
    """The default command: :func:`run` for one agent, its figures printed and written as JSON."""
    out = run(a.preset, dispatches=a.dispatches, **model)
    out["retained_freed_memory"] = retained
    keys = (
        "preset",
        "agent",
        "device",
        "num_devices",
        "compute_dtype",
        "compiler_options",
        "steps_per_dispatch",
        "compile_s",
        "updates_per_s",
        "flops_per_update",
        "achieved_flops",
        "matmul_peak_flops",
        "utilisation",
        "executed_flops_per_update",
        "hardware_utilisation",
    )
    for k in keys + tuple(k for k in out if k.endswith("_s") and k not in keys and k != "count_compile_s"):
        v = out[k]
        print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
    _dump(a.json, out)
    return 0


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    retained = retain_freed_memory()  # as python -m macfw.run does (macfw.memory): the dispatches timed are training's
    if a.only is not None and not a.against_reference:
        ap.error(f"--only {a.only} goes with --against-reference (it selects the speed-ups the reference turns off)")
    model: dict[str, Any] = dict(
        gin_files=a.gin_file or ("gin/mac.gin",),
        gin_bindings=a.gin_bindings,
        ob_dim=a.ob_dim,
        act_dim=a.act_dim,
        goal_dim=a.goal_dim,
        compute_dtype=a.compute_dtype,
        steps_per_dispatch=a.steps_per_dispatch,
    )
    if a.first_dispatch:  # a child of --compile-time: one JSON line
        if a.compilation_cache:
            jax.config.update("jax_compilation_cache_dir", a.compilation_cache)
        print(json.dumps(first_dispatch(a.preset, **model)))
        return 0
    if a.profile:
        return _profile_main(a, model, argv)
    if a.against_reference:
        return _against_reference_main(a, model)
    if a.compile_time:
        return _compile_time_main(a)
    if a.all_agents:
        return _all_agents_main(a)
    return _run_main(a, model, retained)


if __name__ == "__main__":
    raise SystemExit(main())
