"""Where an update's time goes: op time by phase and by kind, from a JAX profiler trace (issue 12).

    python -m macfw.bench --preset cpu-small --profile [--gin_file gin/baselines/leq.gin] [--json P]

One agent's compiled training step (the program :mod:`macfw.bench` times) runs ``dispatches`` times
under :func:`jax.profiler.trace`; every executed XLA operation (a fusion, a matrix product, a copy)
is attributed to

* a **phase**, the innermost of the named scopes the update code opens (:data:`PHASES`:
  ``sampling`` in :mod:`macfw.step`, ``rollout`` in :func:`macfw.rollout.imagine`, ``loss`` and
  ``optimizer`` in :func:`macfw.agents.base.gradient_step`, MAC's ``model_losses`` and
  ``value_critic`` inside its loss); operations outside every scope are ``other``;
* a **kind** (:data:`KINDS`): matrix products, elementwise, reductions, random numbers (the
  threefry bits and their transformation to normals), data movement (copies, slices, transposes).

Figures are milliseconds of op time per gradient step (sums over the ops' spans divided by the
updates profiled) and, for matrix products, their FLOPs (from the shapes in the compiled program)
and the fraction of the matrix-product peak measured in the same process
(:func:`macfw.bench_setup.matmul_peak`) that they reach. Op time is not wall time: XLA's CPU runtime runs
independent operations at once, so the sum of op time can exceed the update's wall time
(``op_time_ms`` vs ``wall_ms``), and an operation that shares the cores with another one takes longer
and shows a lower fraction of the peak than it would alone. Each phase's **wall** figure is therefore
also given: the time during which at least one of its operations ran (the union of their spans), so
that the phases' wall figures add up to about the update's wall time, less what they overlap, and
``busy_ms`` the time during which any operation of the step ran. Loop operations (``while``,
``conditional``, ``call``) are left out: their spans contain their bodies' operations.

On the CPU the trace names XLA's operations only with ``--xla_cpu_enable_xprof_traceme=true`` in
``XLA_FLAGS``, read when the backend starts: ``python -m macfw.bench --profile`` re-runs itself with
the flag when it is missing. :func:`profile` raises a ``RuntimeError`` that says so when the trace
holds no operation of the step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass

import jax

#: Named scopes that mark the phases of an update, most specific first (the innermost one found in
#: an op's name stack wins; ``loss`` only when no more specific phase is in it).
PHASES = ("sampling", "rollout", "model_losses", "value_critic", "optimizer", "loss")
KINDS = ("matrix products", "elementwise", "reductions", "random numbers", "data movement")
TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"

_RANDOM = (
    "threefry",
    "random_bits",
    "jit(_normal",
    "_normal_real",
    "jit(_uniform",
    "erf_inv",
    "random_split",
    "random_wrap",
)
_MOVE_PRIMS = {
    "dynamic_update_slice",
    "dynamic_slice",
    "concatenate",
    "transpose",
    "copy",
    "gather",
    "scatter",
    "scatter_add",
    "slice",
    "pad",
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "expand_dims",
    "rev",
}
_MOVE_OPS = {
    "copy",
    "dynamic-update-slice",
    "dynamic-slice",
    "transpose",
    "concatenate",
    "gather",
    "scatter",
    "slice",
    "pad",
    "broadcast",
    "bitcast",
    "reshape",
    "copy-start",
    "copy-done",
}
_REDUCE_PRIMS = {"argmax", "argmin", "cumsum", "cumlogsumexp", "cummax", "cummin", "cumprod"}
_LOOP_OPS = {"while", "conditional", "call"}
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?|\w+\[\]) ([\w\-]+)\((.*)$")
_SCOPES = {p: re.compile(rf"(?:^|[/(]){p}(?=[/)]|$)") for p in PHASES}


@dataclass(frozen=True)
class Op:
    """One operation of the compiled program: its phase, kind and FLOPs of matrix products per execution."""

    phase: str
    kind: str
    flops: float
    shape: str = ""
    op_name: str = ""


def phase_of(op_name: str) -> str:
    """The phase of an op from its name stack (``jit(run)/while/body/loss/transpose(jvp(value_critic))/...``):
    the innermost scope of :data:`PHASES` found in it, preferring any other phase over ``loss``;
    ``'other'`` when none is."""
    best, pos = None, -1
    for p in PHASES[:-1]:
        for m in _SCOPES[p].finditer(op_name):
            if m.start() > pos:
                best, pos = p, m.start()
    if best is not None:
        return best
    return "loss" if _SCOPES["loss"].search(op_name) else "other"


def kind_of(op_name: str, opcode: str, name: str = "") -> str:
    """The kind (:data:`KINDS`) of an op from its name stack's last primitive, its HLO opcode and name."""
    prim = op_name.rsplit("/", 1)[-1] if op_name else ""
    if "dot_general" in prim or opcode in ("dot", "convolution"):
        return "matrix products"
    if any(r in op_name for r in _RANDOM) or opcode == "rng-bit-generator":
        return "random numbers"
    if prim.startswith("reduce") or prim in _REDUCE_PRIMS or opcode in ("reduce", "reduce-window", "sort"):
        return "reductions"
    if prim in _MOVE_PRIMS or opcode in _MOVE_OPS or (opcode == "fusion" and re.match(r"^(copy|transpose)", name)):
        return "data movement"
    return "elementwise"


def _dims(shape: str) -> list[int] | None:
    m = re.match(r"^\w+\[([\d,]*)\]", shape)
    if m is None:
        return None
    return [int(d) for d in m.group(1).split(",") if d]


def parse_hlo(text: str) -> tuple[str, dict[str, Op]]:
    """The module name and every operation the runtime executes (the instructions of the entry and loop
    computations, not those inside fusions) of a compiled HLO module's text (``compiled.as_text()``):
    ``{instruction name: Op}``. Matrix-product FLOPs are ``2 * prod(output dims) * prod(contracting
    dims)`` of each ``dot``, summed over a fusion's computation (and the computations it calls). A
    fusion with a product inside is a matrix product in that product's phase, whatever its root: XLA's
    CPU backend fuses, e.g., a LayerNorm fold's weight scaling and column sums (a ``reduce_sum``) into
    the product that reads them."""
    module = re.search(r"^HloModule (\S+?),?\s", text, re.M)
    shapes: dict[str, list[int] | None] = {}
    rows = []  # (computation, name, shape, opcode, rest)
    comp = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{\s*$", line)
        if head:
            comp = head.group(1)
            continue
        m = _INSTR.match(line)
        if m is None:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name] = _dims(shape)
        rows.append((comp, name, shape, opcode, rest))
    comp_flops: dict[str, float] = collections.defaultdict(float)
    comp_calls: dict[str, list[str]] = collections.defaultdict(list)
    comp_dot_name: dict[str, str] = {}  # the name stack of a computation's first product
    for comp, name, _shape, opcode, rest in rows:
        if opcode == "dot":
            comp_flops[comp] += _dot_flops(shapes[name], rest, shapes)
            meta = re.search(r'op_name="([^"]*)"', rest)
            comp_dot_name.setdefault(comp, meta.group(1) if meta else "")
        for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", rest):
            comp_calls[comp].append(callee)

    def total(c, seen=()):
        return comp_flops.get(c, 0.0) + sum(total(k, seen + (c,)) for k in comp_calls.get(c, ()) if k not in seen)

    def dot_name(c, seen=()):
        if c in comp_dot_name:
            return comp_dot_name[c]
        names = (dot_name(k, seen + (c,)) for k in comp_calls.get(c, ()) if k not in seen)
        return next((n for n in names if n is not None), None)

    inner = {c for cs in comp_calls.values() for c in cs}  # fused and reducer computations: not run as ops
    ops = {}
    for comp, name, shape, opcode, rest in rows:
        if comp in inner:
            continue
        meta = re.search(r'op_name="([^"]*)"', rest)
        op_name = meta.group(1) if meta else ""
        if opcode == "dot":
            flops = _dot_flops(shapes[name], rest, shapes)
        elif opcode == "fusion":
            callees = re.findall(r"calls=%([\w.\-]+)", rest)
            flops = sum(total(c) for c in callees)
            inner_dot = next((n for n in map(dot_name, callees) if n is not None), None)
            if flops > 0 and inner_dot:
                # a fusion around a product (its root, e.g. a LayerNorm fold's reduce_sum, may name
                # it otherwise) is the product, in the product's phase
                op_name = inner_dot
        else:
            flops = 0.0
        kind = "loop" if opcode in _LOOP_OPS else kind_of(op_name, opcode, name)
        if kind != "matrix products":
            flops = 0.0
        ops[name] = Op(phase=phase_of(op_name), kind=kind, flops=flops, shape=shape.split("{")[0], op_name=op_name)
    return (module.group(1) if module else ""), ops


def _dot_flops(out: list[int] | None, rest: str, shapes: dict) -> float:
    lhs = re.match(r"\s*%([\w.\-]+)", rest)
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    if out is None or lhs is None or shapes.get(lhs.group(1)) is None:
        return 0.0
    ldims = shapes[lhs.group(1)]
    k = math.prod(ldims[int(d)] for d in contract.group(1).split(",") if d) if contract else 1
    return 2.0 * math.prod(out) * k


def trace_op_spans(trace_dir: str, module: str) -> list[tuple[str, float, float]]:
    """Every execution of module ``module``'s operations in the profiler trace under ``trace_dir`` (the
    ``perfetto_trace.json.gz`` that ``jax.profiler.trace(..., create_perfetto_trace=True)`` writes),
    as ``(op name, start, end)`` in microseconds.

    Raises:
      RuntimeError: no trace file under ``trace_dir``.
    """
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"No perfetto_trace.json.gz under {trace_dir}; jax.profiler wrote no trace.")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    spans = []
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            start = float(e.get("ts", 0.0))
            spans.append((args["hlo_op"], start, start + float(e.get("dur", 0.0))))
    return spans


def op_times(spans) -> dict[str, tuple[float, int]]:
    """``{op name: (total microseconds, executions)}`` from :func:`trace_op_spans`' spans."""
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for name, start, end in spans:
        acc = out[name]
        acc[0] += end - start
        acc[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def trace_op_times(trace_dir: str, module: str) -> dict[str, tuple[float, int]]:
    """``{op name: (total microseconds, executions)}`` of module ``module``'s operations in the
    profiler trace under ``trace_dir`` (:func:`trace_op_spans`, summed per operation).

    Raises:
      RuntimeError: no trace file under ``trace_dir``.
    """
    return op_times(trace_op_spans(trace_dir, module))


def covered(intervals) -> float:
    """The length of the union of ``(start, end)`` intervals: time during which at least one ran."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def breakdown(
    ops: dict[str, Op], times: dict[str, tuple[float, int]], updates: int, peak_flops: float, top: int = 15, spans=None
) -> dict:
    """The phase x kind table from :func:`parse_hlo`'s ops and :func:`trace_op_times`' times.

    Returns ``{"phases": {phase: {kind: ms per update, ..., "total": ms, "matmul_flops": FLOPs per
    update, "matmul_fraction_of_peak": ...}}, "op_time_ms": ..., "matched_ops": n, "unmatched_ops": n,
    "top_ops": [...]}``; ``top_ops`` lists the ``top`` ops with the most time (name, phase, kind,
    ms per update, executions per update, output shape, the end of the op's name stack). With the
    trace's ``spans`` (:func:`trace_op_spans`), each phase also gets ``"wall"``: ms per update during
    which at least one of its operations ran (:func:`covered`), and the result ``"busy_ms"``: the same
    for every operation of the table.
    """
    table: dict[str, dict] = {}
    matched = unmatched = 0
    for name, (us, count) in times.items():
        op = ops.get(name)
        if op is None:
            unmatched += 1
            continue
        if op.kind == "loop":
            continue
        matched += 1
        row = table.setdefault(op.phase, dict({k: 0.0 for k in KINDS}, total=0.0, matmul_flops=0.0))
        ms = us / 1e3 / updates
        row[op.kind] += ms
        row["total"] += ms
        row["matmul_flops"] += op.flops * count / updates
    for row in table.values():
        t = row["matrix products"] / 1e3
        row["matmul_fraction_of_peak"] = (row["matmul_flops"] / t / peak_flops) if t > 0 and peak_flops else None
    if spans is not None:
        by_phase = collections.defaultdict(list)
        for name, start, end in spans:
            op = ops.get(name)
            if op is not None and op.kind != "loop":
                by_phase[op.phase].append((start, end))
        for phase, row in table.items():
            row["wall"] = covered(by_phase[phase]) / 1e3 / updates
    order = [p for p in PHASES + ("other",) if p in table]
    ranked = sorted(((us, n) for n, (us, _) in times.items() if n in ops and ops[n].kind != "loop"), reverse=True)
    top_ops = [
        {
            "name": n,
            "phase": ops[n].phase,
            "kind": ops[n].kind,
            "ms": us / 1e3 / updates,
            "executions": times[n][1] / updates,
            "shape": ops[n].shape,
            "op_name": ops[n].op_name[-80:],
        }
        for us, n in ranked[:top]
    ]
    out = {
        "phases": {p: table[p] for p in order},
        "op_time_ms": sum(r["total"] for r in table.values()),
        "matched_ops": matched,
        "unmatched_ops": unmatched,
        "top_ops": top_ops,
    }
    if spans is not None:
        out["busy_ms"] = covered([(s, e) for n, s, e in spans if n in ops and ops[n].kind != "loop"]) / 1e3 / updates
    return out


def profile(preset: str = "cpu-small", *, dispatches: int = 3, **model) -> dict:
    """Profile ``dispatches`` dispatches of an agent's training step at ``preset``'s sizes.

    ``model``: :func:`macfw.bench.run`'s model arguments (``gin_files``, ``goal_dim``, ...). Returns
    :func:`breakdown`'s dict (with each phase's ``wall`` and ``busy_ms``) plus ``wall_ms`` (per update,
    the profiled dispatches' wall time),
    ``matmul_peak_flops`` and the agent's name.

    Raises:
      RuntimeError: the trace has none of the step's operations (on the CPU: ``XLA_FLAGS`` lacks
        ``--xla_cpu_enable_xprof_traceme=true``).
    """
    from macfw.bench_setup import matmul_peak, setup_agent

    agent, spec, data, state, step, K, B = setup_agent(preset, **model)
    compiled = step.lower(data, state).compile()
    hlo = getattr(compiled, "compiled", compiled).as_text()
    if hlo is None:
        raise RuntimeError(f"XLA returned no HLO text for the compiled training step of preset {preset!r}.")
    module, ops = parse_hlo(hlo)
    data_p, arrays = step._placed(data, state)
    arrays, m = compiled(data_p, arrays)  # warm
    jax.block_until_ready(m)
    with tempfile.TemporaryDirectory(prefix="macfw-profile-") as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(dispatches):
                arrays, m = compiled(data_p, arrays)
            jax.block_until_ready(m)
            wall = time.perf_counter() - t0
        spans = trace_op_spans(d, module)
        times = op_times(spans)
    if not times:
        raise RuntimeError(
            f"The profiler trace names no operation of module {module!r}. On the CPU, XLA names its operations "
            f"in traces only with XLA_FLAGS={TRACEME_FLAG} set before JAX starts (python -m macfw.bench "
            f"--profile sets it itself); XLA_FLAGS is {os.environ.get('XLA_FLAGS', '')!r}."
        )
    peak = matmul_peak()
    out = breakdown(ops, times, dispatches * K, peak, spans=spans)
    out.update(
        preset=preset,
        agent=type(agent).__name__,
        steps_per_dispatch=K,
        dispatches=dispatches,
        wall_ms=1e3 * wall / (dispatches * K),
        matmul_peak_flops=peak,
    )
    return out


def format_table(r: dict) -> str:
    """:func:`profile`'s result as a Markdown table (ms of op time per gradient step; ``wall``: ms during
    which the phase had an operation running, when the result has it)."""
    walls = all("wall" in row for row in r["phases"].values()) and "busy_ms" in r
    head = ["phase", *(["wall"] if walls else []), "total", *KINDS, "matmul FLOP", "matmul / peak"]
    busy = f", some operation running for {r['busy_ms']:.2f} ms of it" if walls else ""
    lines = [
        f"{r['agent']} at preset {r['preset']}: op time per gradient step (ms); wall time "
        f"{r['wall_ms']:.2f} ms per step{busy}, op time {r['op_time_ms']:.2f} ms (ops run concurrently); "
        f"matrix-product peak {r['matmul_peak_flops']:.3g} FLOP/s",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for p, row in r["phases"].items():
        frac = row["matmul_fraction_of_peak"]
        lines.append(
            "| "
            + " | ".join(
                [
                    p,
                    *([f"{row['wall']:.2f}"] if walls else []),
                    f"{row['total']:.2f}",
                    *(f"{row[k]:.2f}" for k in KINDS),
                    f"{row['matmul_flops']:.3g}",
                    "-" if frac is None else f"{frac:.2f}",
                ]
            )
            + " |"
        )
    tot = {k: sum(row[k] for row in r["phases"].values()) for k in (*KINDS, "total", "matmul_flops")}
    mm = tot["matrix products"] / 1e3
    frac = tot["matmul_flops"] / mm / r["matmul_peak_flops"] if mm > 0 else None
    lines.append(
        "| "
        + " | ".join(
            [
                "**all**",
                *([f"{r['busy_ms']:.2f}"] if walls else []),
                f"{tot['total']:.2f}",
                *(f"{tot[k]:.2f}" for k in KINDS),
                f"{tot['matmul_flops']:.3g}",
                "-" if frac is None else f"{frac:.2f}",
            ]
        )
        + " |"
    )
    if r.get("top_ops"):
        lines += ["", "The operations with the most time (ms per gradient step, executions per step):"]
        for o in r["top_ops"]:
            lines.append(
                f"  {o['ms']:7.3f} ms  x{o['executions']:<5g} {o['phase']:>12} {o['kind']:<15} "
                f"{o['shape']:<22} {o['name']}  ({o['op_name']})"
            )
    return "\n".join(lines)


__all__ = [
    "PHASES",
    "KINDS",
    "Op",
    "phase_of",
    "kind_of",
    "parse_hlo",
    "trace_op_spans",
    "op_times",
    "trace_op_times",
    "covered",
    "breakdown",
    "profile",
    "format_table",
]
