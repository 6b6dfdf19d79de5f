"""Shared parts of the parity harness (``experiments/parity.py``, issue 29).

The harness compares each macfw agent with the authors' implementation (kwanyoungpark/MAC), imported
from a checkout the user gives (``--reference-dir``) and never copied: both built with the same
initial parameters, fed the same batches and the same random draws, and their loss terms, metrics
and updated parameters compared. Each agent has a module ``experiments/parity_cases/<agent>.py``
with ``run(ref, opts) -> dict`` (the agent's entry of the JSON, see :func:`agent_result`).

Here: loading the reference code (:func:`load_reference`), mapping macfw's Equinox MLPs to and from
the authors' Flax parameter trees (:func:`mlp_to_flax`, :func:`flax_to_mlp`; ensembles
:func:`ensemble_to_flax`; an MLP split as hidden layers + a final Dense :func:`mlp_to_flax_split`), relative errors of
numbers and trees (:func:`rel_err`, :func:`tree_rel_err`), macfw's update compiled as its training
step compiles it (:func:`macfw_update`), timing two update functions alternated in
one process (:func:`alternate`), XLA's FLOP count of a jitted function (:func:`xla_flops`), and the
JSON entry (:func:`agent_result`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: Files every reference checkout must have (kwanyoungpark/MAC's layout).
REFERENCE_FILES = ("agents/mac.py", "utils/networks.py", "utils/flax_utils.py")


#: The sizes the updates are timed at: ``cpu-small`` (``macfw.bench``'s preset and issue 29's
#: acceptance) and ``paper`` (the paper's 4 x 1024 networks and batch 1024, DESIGN §2.6; for an
#: accelerator: an update is seconds on a 2-core CPU). Other settings are the cases' own (MAC:
#: n = 10, H = 10, N = 8, 10 flow steps at both).
SPEED_SIZES: dict[str, dict] = {
    "cpu-small": {"hidden": (256, 256), "batch": 256},
    "paper": {"hidden": (1024, 1024, 1024, 1024), "batch": 1024},
}


class ReferenceCodeError(RuntimeError):
    """The reference checkout or its dependencies are missing (the message names the fix)."""


@dataclasses.dataclass
class Options:
    """What every case is asked to do.

    Attributes:
      updates: updates after which the terms and the parameters are compared again (10).
      speed: time both updates (at ``speed_sizes``, alternated in one process).
      pairs: alternated timing pairs.
      steps_per_dispatch: macfw's updates per compiled call when timed as its training loop runs
        them (``train.steps_per_dispatch``, gin/base.gin: 10); also the updates per timed call of the
        single-call and reference timings.
      seed: of the parameters, the batches and the draws.
      speed_sizes: the sizes both updates are timed at, a name in :data:`SPEED_SIZES` (``cpu-small``,
        the acceptance's; ``paper``, the paper's networks and batch, for an accelerator).
    """

    updates: int = 10
    speed: bool = True
    pairs: int = 5
    steps_per_dispatch: int = 10
    seed: int = 0
    speed_sizes: str = "cpu-small"

    @property
    def speed_hidden(self) -> tuple[int, ...]:
        """Hidden sizes of every network when timed (:data:`SPEED_SIZES`)."""
        return SPEED_SIZES[self.speed_sizes]["hidden"]

    @property
    def speed_batch(self) -> int:
        """Batch size when timed (MAC: also its rollout batch; MOPO/MOBILE: real + model halves)."""
        return SPEED_SIZES[self.speed_sizes]["batch"]


def load_reference(ref_dir: str | Path) -> types.SimpleNamespace:
    """Import the authors' code from ``ref_dir`` (a checkout of kwanyoungpark/MAC): its ``agents`` and
    ``utils`` packages become importable (``ref_dir`` goes first on ``sys.path``). Returns a namespace
    with ``dir`` and ``agent(name)`` (the module ``agents.<name>``).

    Raises:
      ReferenceCodeError: ``ref_dir`` lacks the expected files, or flax/distrax/ml_collections are missing.
    """
    ref_dir = Path(ref_dir).expanduser().absolute()
    missing = [f for f in REFERENCE_FILES if not (ref_dir / f).is_file()]
    if missing:
        raise ReferenceCodeError(
            f"--reference-dir {str(ref_dir)!r} is not a checkout of kwanyoungpark/MAC (missing {missing}). "
            "Clone or export the authors' repository there (its docs/ folder is not needed)."
        )
    for mod in ("flax", "distrax", "ml_collections"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ReferenceCodeError(
                f"the reference code needs {mod} ({e}); install the extra: pip install -e '.[parity]'"
            ) from e
    if str(ref_dir) not in sys.path:
        sys.path.insert(0, str(ref_dir))
    for name in list(sys.modules):  # another checkout's modules of the same names must not be reused
        if name in ("agents", "utils") or name.startswith(("agents.", "utils.")):
            mod = sys.modules[name]
            if not str(getattr(mod, "__file__", "") or "").startswith(str(ref_dir)):
                del sys.modules[name]

    def agent(name: str):
        return importlib.import_module(f"agents.{name}")

    return types.SimpleNamespace(dir=ref_dir, agent=agent)


# ------------------------------------------------------------------------------ parameters
def mlp_to_flax(mlp) -> dict:
    """A macfw :class:`~macfw.nn.mlp.MLP` as the authors' ``utils.networks.MLP`` parameters:
    ``{'Dense_i': {'kernel': (in, out), 'bias': (out,)}, 'LayerNorm_i': {'scale', 'bias'}}``
    (flax numbers its Dense and LayerNorm layers separately)."""
    import jax.numpy as jnp

    out = {}
    for i, layer in enumerate(mlp.layers):
        out[f"Dense_{i}"] = {"kernel": jnp.asarray(layer.weight).T, "bias": jnp.asarray(layer.bias)}
    for i, norm in enumerate(mlp.norms):
        if norm is not None:
            out[f"LayerNorm_{i}"] = {"scale": jnp.asarray(norm.weight), "bias": jnp.asarray(norm.bias)}
    return out


def flax_to_mlp(params: dict, mlp):
    """``mlp`` (a macfw MLP of the same sizes) with the weights of the authors' MLP ``params``."""
    import equinox as eqx
    import jax.numpy as jnp

    layers = tuple(
        eqx.tree_at(
            lambda lin: (lin.weight, lin.bias),
            layer,
            (jnp.asarray(params[f"Dense_{i}"]["kernel"]).T, jnp.asarray(params[f"Dense_{i}"]["bias"])),
        )
        for i, layer in enumerate(mlp.layers)
    )
    norms = tuple(
        None
        if n is None
        else eqx.tree_at(
            lambda m: (m.weight, m.bias),
            n,
            (jnp.asarray(params[f"LayerNorm_{i}"]["scale"]), jnp.asarray(params[f"LayerNorm_{i}"]["bias"])),
        )
        for i, n in enumerate(mlp.norms)
    )
    return eqx.tree_at(lambda m: (m.layers, m.norms), mlp, (layers, norms), is_leaf=lambda x: x is None)


def ensemble_to_flax(mlp) -> dict:
    """A macfw MLP whose array leaves have a leading ensemble axis ``(k, ...)`` (the ``net`` of an
    :class:`~macfw.nn.ensemble.Ensemble`'s ``members``) as the authors' ``ensemblize``d (``nn.vmap``)
    MLP parameters: :func:`mlp_to_flax` per member, stacked on a leading ``(k,)`` axis
    (``{'Dense_i': {'kernel': (k, in, out), 'bias': (k, out)}, ...}``)."""
    import equinox as eqx

    return eqx.filter_vmap(mlp_to_flax)(mlp)


def mlp_to_flax_split(mlp) -> tuple[dict, dict]:
    """A macfw MLP as the authors' two-module layout ``MLP(hidden_dims, activate_final=True)`` + a
    final ``nn.Dense`` (``GCActor``'s ``actor_net`` / ``mean_net``): ``(hidden params, final Dense
    params)``; the hidden part holds ``Dense_0 .. Dense_{h-1}`` and every ``LayerNorm_i``."""
    full = mlp_to_flax(mlp)
    last = f"Dense_{len(mlp.layers) - 1}"
    return {k: v for k, v in full.items() if k != last}, full[last]


# ------------------------------------------------------------------------------ random draws
@contextlib.contextmanager
def unjitted(cls, names=("update", "total_loss")):
    """Within: the authors' ``@jax.jit`` methods ``names`` of ``cls`` (those it has) as plain functions,
    so that one outer ``jax.jit`` traces them inline and draws replayed by :func:`replay` are that
    trace's arguments (new arrays every call, no retracing)."""
    saved = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
    for n, f in saved.items():
        setattr(cls, n, getattr(f, "__wrapped__", f))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(cls, n, f)


@contextlib.contextmanager
def replay(tape: list, *, unroll_scan: bool = False):
    """Within: ``jax.random.normal``, ``uniform`` and ``choice`` return the arrays of ``tape`` in
    order, whatever key they are given (a tape: the issue's method (a)). Each entry is ``(function
    name, array)``, checked by name and element count and reshaped to the requested shape (distrax
    asks ``(1, B, d)`` for a batch-level ``(B, d)`` sample). With ``unroll_scan``, ``jax.lax.scan``
    runs as a Python loop of the same semantics (per-step draws become separate calls). Yields the
    list of entries not drawn yet (empty when the reference drew exactly the tape)."""
    import jax
    import jax.numpy as jnp

    queue = list(tape)
    orig = {
        "normal": jax.random.normal,
        "uniform": jax.random.uniform,
        "choice": jax.random.choice,
        "scan": jax.lax.scan,
    }

    def take(name, shape, dtype):
        shape = tuple(shape) if not isinstance(shape, int) else (shape,)
        if not queue:
            raise RuntimeError(f"the reference drew more than the tape holds: {name}{shape}")
        f, a = queue.pop(0)
        if f != name or int(np.prod(shape)) != int(np.prod(np.shape(a))):
            raise RuntimeError(f"the reference drew {name}{shape} where the tape has {f}{tuple(np.shape(a))}")
        return jnp.reshape(jnp.asarray(a), shape).astype(dtype)

    def normal(key, shape=(), dtype=jnp.float32, *a, **k):
        return take("normal", shape, dtype)

    def uniform(key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0, *a, **k):
        return minval + (maxval - minval) * take("uniform", shape, dtype)

    def choice(key, a, shape=(), replace=True, p=None, axis=0, *args, **kw):
        return take("choice", shape, jnp.int32)

    def scan(f, init, xs=None, length=None, reverse=False, **kw):
        if xs is not None:
            n = int(jax.tree_util.tree_leaves(xs)[0].shape[0])
        elif length is not None:
            n = int(length)
        else:
            raise ValueError("scan: give xs or length (got xs = None and length = None)")
        carry, ys = init, [None] * n
        for i in reversed(range(n)) if reverse else range(n):
            carry, ys[i] = f(carry, None if xs is None else jax.tree_util.tree_map(lambda x: x[i], xs))  # noqa: B023  (called within this iteration)
        return carry, (None if ys and ys[0] is None else jax.tree_util.tree_map(lambda *y: jnp.stack(y), *ys))

    jax.random.normal, jax.random.uniform, jax.random.choice = normal, uniform, choice
    if unroll_scan:
        jax.lax.scan = scan
    try:
        yield queue
    finally:
        jax.random.normal, jax.random.uniform, jax.random.choice = orig["normal"], orig["uniform"], orig["choice"]
        jax.lax.scan = orig["scan"]


# ------------------------------------------------------------------------------ comparisons
def rel_err(a, b, floor: float = 1e-6) -> float:
    """Largest ``|a - b| / max(|b|, floor)`` over the elements (``b``: the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor)))


def tree_rel_err(a, b, floor: float = 1e-6) -> float:
    """:func:`rel_err` over the leaves of two pytrees of the same structure, relative to each leaf's
    largest magnitude (so a parameter near zero in a large matrix does not dominate)."""
    import jax

    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        raise ValueError(f"tree structures differ:\n{ta}\n{tb}")
    worst = 0.0
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(float(np.max(np.abs(y))) if y.size else 0.0, floor)
        worst = max(worst, float(np.max(np.abs(x - y))) / scale if y.size else 0.0)
    return worst


def compare_terms(macfw: dict[str, float], reference: dict[str, float]) -> dict[str, dict]:
    """``{name: {"macfw", "reference", "rel_err"}}`` for the names both sides report."""
    return {
        k: {"macfw": float(macfw[k]), "reference": float(reference[k]), "rel_err": rel_err(macfw[k], reference[k])}
        for k in reference
        if k in macfw
    }


# ------------------------------------------------------------------------------ speed
def xla_flops(jitted: Callable, *args) -> float:
    """XLA's FLOP count of one call of ``jitted`` (a ``jax.jit`` or ``eqx.filter_jit`` function) on ``args``."""
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    compiled = getattr(compiled, "compiled", compiled)
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", 0.0)) if ca else 0.0


def macfw_update(agent, state, steps: int = 1):
    """macfw's ``agent.update`` compiled as its training step compiles it (:class:`macfw.step.TrainStep`):
    one ``jax.jit`` over the state's arrays (the static rest closed over), the state donated, with
    :func:`macfw.compiler.compiler_options` for the device (on the CPU: 512-bit vectors). With
    ``steps > 1``, ``steps`` updates per call in one ``lax.scan``, as the training loop runs
    ``train.steps_per_dispatch`` updates per compiled call; the batch argument then holds one batch per
    update on a leading axis (:func:`stacked`) and the metrics are the last update's.

    Returns ``(step, arrays)``: ``step(arrays, batch) -> (arrays, metrics)`` and ``state``'s arrays
    (``eqx.combine(arrays, static)`` is the state). Donation invalidates the ``arrays`` passed in:
    chain the returned ones (``xla_flops(step, arrays, batch)`` only lowers, so it may use any).
    """
    import equinox as eqx
    import jax

    from macfw.compiler import compiler_options

    arrays, static = eqx.partition(state, eqx.is_array)

    def one(arrays, batch):
        new, metrics = agent.update(eqx.combine(arrays, static), batch)
        return eqx.partition(new, eqx.is_array)[0], metrics

    def step(arrays, batch):
        if steps == 1:
            return one(arrays, batch)
        arrays, metrics = jax.lax.scan(one, arrays, batch)
        return arrays, jax.tree_util.tree_map(lambda m: m[-1], metrics)

    platform = jax.tree_util.tree_leaves(arrays)[0].devices().pop().platform
    jitted = jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options(platform))
    return jitted, jax.tree_util.tree_map(lambda x: x.copy(), arrays)  # a copy: donation must not free ``state``'s


@contextlib.contextmanager
def jax_threefry():
    """Within: programs lowered use JAX's own CPU lowering of threefry (the authors' setting; ``import
    macfw`` registers a written-out one, :mod:`macfw._threefry`, which would speed up their programs
    too). Compile (first call, or ``xla_flops``) the authors' jitted update inside."""
    from macfw import _threefry

    was = _threefry.is_unrolled()
    _threefry.unroll_threefry_on_cpu(False)
    try:
        yield
    finally:
        _threefry.unroll_threefry_on_cpu(was)


def alternate(fns: dict[str, Callable[[], Any]], pairs: int = 5) -> dict[str, float]:
    """Median seconds of each zero-argument function (each returns something to block on), called in
    turn ``pairs`` times after one warm-up call each, in one process: the machine's drift hits both."""
    import jax

    for f in fns.values():
        jax.block_until_ready(f())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(pairs):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def stacked(batch, n: int):
    """``n`` copies of ``batch`` (a pytree of arrays) on a new leading axis: one batch per update of a
    :func:`macfw_update` step with ``steps = n``. The copies are slices of one input array, so the
    compiler cannot tell them apart or hoist work on them out of the loop."""
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), batch)


def time_updates(agent, state, batch, reference_update: Callable[[], Any], flops: dict, opts: Options) -> dict:
    """Both sides' update rates at equal sizes, alternated in one process (issue 29), and the case's
    speed entry of the JSON.

    macfw's update is timed as its training loop runs it, ``opts.steps_per_dispatch`` (K) updates per
    compiled call (:func:`macfw_update` with ``steps = K``: the ``lax.scan`` of
    :class:`macfw.step.TrainStep`, the state donated, the K batches already on the device), and also
    one update per call (``updates_per_s_single_call``). ``reference_update()`` runs one of the
    authors' jitted updates on their batch (already on the device; the closure keeps their state) and
    returns its output: one call per update, as their training loop calls it. It is first called
    inside :func:`jax_threefry`, so a first compilation is theirs. Each timed call is K updates of
    one side; the matrix-product peak is timed in the same alternation.

    Args:
      agent, state: macfw's agent and its state (not donated: copied).
      batch: macfw's batch for ``agent.update`` (arrays).
      reference_update: see above.
      flops: ``{"macfw", "reference"}`` FLOPs of one update (XLA's count).
      opts: ``pairs`` and ``steps_per_dispatch``.

    Returns:
      ``updates_per_s`` (``macfw``: K per dispatch; ``reference``), ``updates_per_s_single_call``
      (``macfw``), ``steps_per_dispatch``, ``flops_per_update``, ``utilisation`` (from
      ``updates_per_s``), ``matmul_peak_flops``, ``load_average``.
    """
    import os

    import jax

    K = int(opts.steps_per_dispatch)
    if K < 1:
        raise ValueError(f"Options.steps_per_dispatch must be >= 1, got {K}")
    batch = jax.device_put(batch)
    batches = jax.device_put(stacked(batch, K))
    single, arrays_1 = macfw_update(agent, state)
    scanned, arrays_k = macfw_update(agent, state, K)
    box = {"one": arrays_1, "k": arrays_k}

    def macfw_scanned():
        box["k"], out = scanned(box["k"], batches)
        return out

    def macfw_single():
        out = None
        for _ in range(K):
            box["one"], out = single(box["one"], batch)
        return out

    def reference():
        out = None
        for _ in range(K):
            out = reference_update()
        return out

    with jax_threefry():  # the authors' update compiled as their code compiles it
        jax.block_until_ready(reference_update())
    meter, meter_flops = _peak_meter()
    secs = alternate(
        {"macfw": macfw_scanned, "macfw_single_call": macfw_single, "reference": reference, "peak": meter},
        pairs=opts.pairs,
    )
    peak = meter_flops / secs.pop("peak")
    ups = {"macfw": K / secs["macfw"], "reference": K / secs["reference"]}
    return {
        "updates_per_s": ups,
        "updates_per_s_single_call": {"macfw": K / secs["macfw_single_call"]},
        "steps_per_dispatch": K,
        "flops_per_update": dict(flops),
        "utilisation": {k: flops[k] * ups[k] / peak for k in ups},
        "matmul_peak_flops": peak,
        "load_average": list(os.getloadavg()),
    }


def _peak_meter(n: int = 2048) -> tuple[Callable[[], Any], float]:
    """A zero-argument function running one ``n x n`` float32 matrix product (for :func:`alternate`),
    and its FLOPs."""
    import jax

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a, b = jax.random.normal(ka, (n, n)), jax.random.normal(kb, (n, n))
    mm = jax.jit(lambda a, b: a @ b)

    def run():
        return mm(a, b)

    return run, 2.0 * n**3


def matmul_peak() -> float:
    """The practical FLOP/s peak of this device (a large plain matrix product, :func:`macfw.bench.matmul_peak`)."""
    from macfw.bench import matmul_peak as peak

    return peak()


def agent_result(
    terms_1: dict,
    terms_n: dict,
    params_rel_err: float,
    *,
    skipped: dict[str, str] | None = None,
    defects: dict[str, dict] | None = None,
    speed: dict | None = None,
    updates: int = 10,
) -> dict:
    """One agent's JSON entry (issue 29):

    ``terms``: ``{name: {"macfw", "reference", "rel_err"}}``, each loss term and metric after 1 update
    (``name``) and after ``updates`` (``name@10``), plus ``params@10`` (the updated parameters);
    ``max_rel_err``; ``skipped``: ``{name: reason}`` (only the authors' known defects, DESIGN §9);
    ``defects``: ``{name: {"macfw", "reference", "reason"}}``, the values of each side where a defect
    makes them differ; ``updates_per_s``, ``flops_per_update``, ``utilisation``: ``{"macfw",
    "reference"}`` each, and ``matmul_peak_flops`` (one peak for both) when timed.
    """
    terms = dict(terms_1)
    terms.update({f"{k}@{updates}": v for k, v in terms_n.items()})
    terms[f"params@{updates}"] = {"macfw": None, "reference": None, "rel_err": float(params_rel_err)}
    out = {
        "terms": terms,
        "max_rel_err": max(v["rel_err"] for v in terms.values()),
        "skipped": dict(skipped or {}),
        "defects": dict(defects or {}),
    }
    if speed:
        out.update(speed)
    return out
