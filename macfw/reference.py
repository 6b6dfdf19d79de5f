"""The reference computation: what an update computes with every same-result speed-up turned off.

Issue 12 made the update faster without changing what it computes. Each speed-up has a name and
keeps its plain form, used while tracing inside :func:`reference_computation`:

* ``"prefix"``: :meth:`macfw.nn.mlp.MLP.prefix` / ``from_prefix``, the state's first-layer product
  shared across the rejection sampler's N candidates and the flow ODE's steps -> the plain
  ``MLP(concat(...))``;
* ``"layer_norm_vjp"``: LayerNorm's closed-form gradient (:func:`macfw.nn.mlp._layer_norm`) ->
  autodiff of its forward;
* ``"vmap_steps"``: :func:`macfw.agents.base.vmap_steps` (one vmap over ``H * B``) -> two nested vmaps;
* ``"threefry"``: threefry on the CPU written out (:mod:`macfw._threefry`) -> JAX's rolled loop;
* ``"lambda_one"``: MAC's lambda-returns at ``lambda = 1`` from ``V'(s_H)`` alone
  (:func:`macfw.agents.mac.monte_carlo_returns`) -> ``V'`` on all ``H + 1`` states and
  :func:`~macfw.agents.mac.lambda_returns`;
* ``"padded_outputs"``: an MLP's last layer with its outputs padded by zero rows to a multiple of 16
  (:meth:`macfw.nn.mlp.MLP._output`; the padding is sliced off) -> the plain product;
* ``"joint_first_layer"``: MLPs on the same input with their first layers as one product
  (:func:`macfw.nn.mlp.joint_first_layer`; MAC's rollout heads, :func:`macfw.nn.models.evaluate_jointly`)
  -> one call per MLP;
* ``"folded_layer_norm"``: in MAC's imagined rollout, each MLP's LayerNorms folded into the next
  layer's product (:meth:`macfw.nn.mlp.MLP.with_folded_layer_norms`) -> normalise, then multiply;
* ``"wide_vectors"``: the CPU training step compiled with 512-bit vectors
  (:func:`macfw.compiler.compiler_options`, read when :class:`macfw.step.TrainStep` is built) -> XLA's
  default of 256;
* ``"members_outer"``: an ensemble over a batch with the members as the outer axis
  (:meth:`macfw.nn.ensemble.Ensemble.over_batch`; MOPO/MOBILE's models, critics and penalty) -> the
  rows outermost, each row calling every member;
* ``"heads_after_rollout"``: MAC's imagined rollout runs only the sampler and the dynamics inside its
  loop and labels the ``H x B`` (state, chunk) pairs with the success and reward heads after it
  (:meth:`macfw.agents.mac.MAC.rollout`) -> every head inside the loop, on each step's ``B`` rows.

``macfw.bench`` counts FLOPs on the reference (what the method computes) and
``python -m macfw.bench --against-reference [--only NAME,...]`` times the two alternately in one
process (``--only``: the reference with just those speed-ups off, to measure each one); the tests
compare their outputs. The switch is read while tracing and lowering, and JAX caches a function's
trace: jit a function made inside the context and call it there first (it compiles there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

#: The named same-result speed-ups (module docstring).
SPEEDUPS = (
    "prefix",
    "layer_norm_vjp",
    "vmap_steps",
    "threefry",
    "lambda_one",
    "padded_outputs",
    "joint_first_layer",
    "folded_layer_norm",
    "wide_vectors",
    "members_outer",
    "heads_after_rollout",
)

_OFF: list[frozenset] = [frozenset()]


def active(name: str | None = None) -> bool:
    """Whether code is being traced inside :func:`reference_computation` with speed-up ``name`` turned
    off (``name=None``: with any turned off).

    Raises:
      ValueError: ``name`` not in :data:`SPEEDUPS` (the message lists them).
    """
    if name is None:
        return bool(_OFF[0])
    if name not in SPEEDUPS:
        raise ValueError(f"Unknown speed-up {name!r}; the named speed-ups are {list(SPEEDUPS)}.")
    return name in _OFF[0]


def parse_only(only: str | Iterable[str] | None) -> frozenset | None:
    """``only`` as a set of speed-up names: ``None`` stays None (every speed-up), a string is split at
    commas.

    Raises:
      ValueError: an empty selection or a name not in :data:`SPEEDUPS` (lists them).
    """
    if only is None:
        return None
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    bad = [n for n in names if n not in SPEEDUPS]
    if bad or not names:
        raise ValueError(
            f"--only / only= takes speed-up names from {list(SPEEDUPS)} (comma-separated); got "
            f"{only!r}" + (f" (unknown: {bad})" if bad else "")
        )
    return frozenset(names)


@contextlib.contextmanager
def reference_computation(*, rolled_threefry: bool = True, only: str | Iterable[str] | None = None):
    """Trace (and compile) inside this to get the reference computation (module docstring).

    Args:
      rolled_threefry: ``False`` keeps the written-out threefry (the same bits): for counting FLOPs,
        since XLA's cost analysis counts a loop body once and the rolled loop would hide 4 of its 5
        iterations' integer operations.
      only: turn off just these speed-ups (names from :data:`SPEEDUPS`, or a comma-separated string);
        None: all of them.

    Raises:
      ValueError: an unknown name in ``only`` (see :func:`parse_only`).
    """
    from macfw import _threefry

    names = parse_only(only)
    off = frozenset(SPEEDUPS) if names is None else names
    old, was_unrolled = _OFF[0], _threefry.is_unrolled()
    _OFF[0] = off
    if rolled_threefry and "threefry" in off:
        _threefry.unroll_threefry_on_cpu(False)
    try:
        yield
    finally:
        _OFF[0] = old
        _threefry.unroll_threefry_on_cpu(was_unrolled)
