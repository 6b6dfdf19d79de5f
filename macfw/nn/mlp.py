"""Multilayer perceptrons: the building block of every MAC network (paper §4, DESIGN §2.2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from macfw import reference
from macfw.errors import check, check_dims

_SQRT_2_OVER_PI = 0.7978845608028654


def gelu(x: Array) -> Array:
    """GELU, tanh approximation (``jax.nn.gelu(x)``'s default and flax's ``nn.gelu``, as in the paper's
    code), written out: the same function; on a (2048, 256) array about 15% faster than ``jax.nn.gelu``
    on one 2-core CPU and as fast on another (2026-12-02)."""
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x))))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


#: flax's ``nn.LayerNorm`` epsilon (the authors' networks; equinox's default is 1e-5).
LAYER_NORM_EPS = 1e-6


def _linear_layer(in_dim: int, out_dim: int, scale: float, key: PRNGKeyArray) -> eqx.nn.Linear:
    """A linear layer initialised as the authors' ``nn.Dense(kernel_init=default_init(scale))``: weights
    ``(out_dim, in_dim)`` uniform in ``+-sqrt(3 scale / fan_avg)`` (variance ``scale / fan_avg``,
    ``fan_avg = (in_dim + out_dim) / 2``), bias zero."""
    layer = eqx.nn.Linear(in_dim, out_dim, key=key)
    init = jax.nn.initializers.variance_scaling(scale, "fan_avg", "uniform")
    weight = init(key, (in_dim, out_dim), layer.weight.dtype).T
    return eqx.tree_at(lambda lin: (lin.weight, lin.bias), layer, (weight, jnp.zeros_like(_bias(layer))))


def _bias(layer: eqx.nn.Linear) -> Array:
    """``layer.bias``: every linear layer of an :class:`MLP` has one (:func:`_linear_layer`)."""
    assert layer.bias is not None
    return layer.bias


class MLP(eqx.Module):
    """``Linear -> act -> LayerNorm`` blocks, then a final linear layer.

    Written for one example: ``x: (in_dim,) -> (out_dim,)``; batch with ``jax.vmap``.
    The paper's default is 4 hidden layers of 1024 with GELU and LayerNorm after each
    hidden activation.

    Args:
      in_dim: input size.
      out_dim: output size.
      hidden_dims: sizes of the hidden layers, e.g. ``(1024, 1024, 1024, 1024)``.
      activation: one of :data:`ACTIVATIONS`.
      layer_norm: apply LayerNorm after each hidden activation.
      final_init_scale: the variance scale of the final layer's initial weights (small values start
        outputs near zero; the authors' ``final_fc_init_scale``: weights ~ ``default_init(scale)``).

    Initialisation (the authors' ``utils/networks.py``, ``default_init``): every weight matrix
    ``W (out, in)`` uniform with variance ``scale / fan_avg``, ``fan_avg = (in + out) / 2``
    (flax's ``variance_scaling(scale, 'fan_avg', 'uniform')``; scale 1 except the final layer's
    ``final_init_scale``), biases zero; LayerNorm with epsilon 1e-6 (flax's ``nn.LayerNorm``), scale
    one, bias zero.
      key: PRNG key (keyword-only).
      name: the configurable that owns this MLP (e.g. ``"QCritic"``): errors name its binding
        (``QCritic.hidden_dims``).

    Raises:
      ConfigError: ``hidden_dims`` not a non-empty tuple of positive ints, or a ``compute_dtype``
        that is not a floating dtype.
      ValueError: unknown ``activation`` (the message lists the known ones), a negative ``in_dim``
        or a non-positive ``out_dim``.
    """

    layers: tuple[eqx.nn.Linear, ...]
    norms: tuple[eqx.nn.LayerNorm | None, ...]
    activation: str = eqx.field(static=True)
    compute_dtype: str | None = eqx.field(static=True, default=None)
    #: per layer after the first, ``(W' (out, in), W' 1 (out,), W beta + b (out,))`` from
    #: :meth:`with_folded_layer_norms` (the last ``W'`` with the zero rows of :meth:`_padded`); None in
    #: every trained, saved MLP
    folded: tuple[tuple[Array, Array, Array], ...] | None = None

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dims: Sequence[int] = (1024, 1024, 1024, 1024),
        *,
        key: PRNGKeyArray,
        activation: str = "gelu",
        layer_norm: bool = True,
        final_init_scale: float = 1.0,
        compute_dtype: str | None = None,
        name: str = "MLP",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        try:
            floating = compute_dtype is None or jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating)
        except TypeError:
            floating = False
        check(f"{name}.compute_dtype", compute_dtype, floating, "None or a floating dtype name, e.g. 'bfloat16'")
        dims = [int(in_dim), *check_dims(f"{name}.hidden_dims", hidden_dims), int(out_dim)]
        if dims[0] < 0 or dims[-1] < 1:
            raise ValueError(f"MLP sizes from the data must be in_dim >= 0, out_dim >= 1; got {in_dim}, {out_dim}.")
        keys = jax.random.split(key, len(dims) - 1)
        scales = [1.0] * (len(dims) - 2) + [float(final_init_scale)]
        self.layers = tuple(
            _linear_layer(max(a, 1), b, scale, k) for a, b, scale, k in zip(dims[:-1], dims[1:], scales, keys)
        )
        self.norms = tuple(eqx.nn.LayerNorm(h, eps=LAYER_NORM_EPS) if layer_norm else None for h in dims[1:-1])
        self.activation = activation
        self.compute_dtype = compute_dtype

    def __call__(self, x: Float[Array, " in_dim"]) -> Float[Array, " out_dim"]:
        out_dtype = x.dtype
        if x.shape[-1] == 0:  # an empty input (e.g. no goal, no inputs): a learned constant
            x = jnp.zeros((1,), x.dtype)
        return self._rest(self._linear(self.layers[0], x)).astype(out_dtype)

    # ---------------------------------------------------------------- shared input products
    def prefix(self, head: Float[Array, " h"]) -> Float[Array, " hidden0"]:
        """The first layer's pre-activation share of the leading ``h`` inputs: ``W[:, :h] head + b``.

        With :meth:`from_prefix`, ``self(concat([head, tail])) == self.from_prefix(self.prefix(head),
        tail)`` up to float rounding (the sum over inputs split in two): a ``head`` shared by many
        ``tail`` s (a state and goal with N candidate chunks, or with every step of an ODE solve) is
        multiplied once instead of N times. Inside :func:`macfw.reference.reference_computation` the
        pair computes the plain concatenation instead (``prefix`` then returns ``head`` itself).
        """
        if reference.active("prefix"):
            return head
        layer = self.layers[0]
        return self._dot(head, layer.weight[:, : head.shape[-1]]) + _bias(layer)

    def from_prefix(self, pre: Float[Array, " hidden0"], tail: Float[Array, " t"]) -> Float[Array, " out_dim"]:
        """The output for inputs ``concat([head, tail])`` given ``pre = self.prefix(head)`` (see :meth:`prefix`).

        Raises:
          ValueError: ``tail`` of the wrong size for this MLP's input (names both sizes).
        """
        layer = self.layers[0]
        if reference.active("prefix"):
            return self(jnp.concatenate([pre, tail]))
        if pre.shape[-1] != layer.weight.shape[0] or tail.shape[-1] > layer.weight.shape[1]:
            raise ValueError(
                f"from_prefix: pre {pre.shape} and tail {tail.shape} do not fit the first layer "
                f"{layer.weight.shape} (out, in); pass pre = mlp.prefix(head)."
            )
        h = layer.weight.shape[1] - tail.shape[-1]
        return self._rest(pre + self._dot(tail, layer.weight[:, h:])).astype(tail.dtype)

    def _rest(self, h: Array) -> Array:
        """Everything after the first layer's product: activation, norm, the other layers
        (:meth:`_rest_folded` for an MLP from :meth:`with_folded_layer_norms`)."""
        if self.folded is not None:
            return self._rest_folded(h)
        act = ACTIVATIONS[self.activation]
        for i, norm in enumerate(self.norms):
            if i > 0:
                h = self._linear(self.layers[i], h)
            h = act(h)
            if norm is not None:
                h = _layer_norm(norm, h.astype(jnp.float32)).astype(h.dtype)
        return self._output(h)

    # ---------------------------------------------------------------- LayerNorms folded into products
    def with_folded_layer_norms(self) -> MLP:
        """This MLP with each LayerNorm folded into the product after it, for forward passes without a
        gradient that reuse the weights many times (MAC's imagined rollout, :func:`fold_layer_norms`).

        For ``a = act(h)`` with mean ``m`` and ``rstd = 1 / sqrt(var + eps)`` (the norm's scale ``w``,
        offset ``beta``), ``LN(a) W^T + b = rstd (a W'^T) - rstd m (W' 1) + (W beta + b)`` with
        ``W' = W diag(w)``: the same function with its sums in another order (outputs agree to about
        1e-6 relative), and the normalised activations are never written out, which saves a pass over
        each hidden layer's outputs (issue 12). ``W'``, ``W' 1`` and ``W beta + b`` are computed here,
        once: folded inside every call, the weight-sized work made a 4 x 1024 MLP on 512 rows slower
        (23.1 ms against 20.6 on a 2-core CPU) and added work to the losses' weight gradients.

        Returns ``self`` unchanged for an MLP without a LayerNorm after every hidden layer, with a
        low-precision ``compute_dtype`` (the cancellation in ``rstd (a W'^T) - rstd m W' 1`` would cost
        bits), for one already folded, or inside :func:`macfw.reference.reference_computation`
        (``"folded_layer_norm"``). The result is differentiable (gradients reach the weights through
        the folding), but it is meant for stretches of forward passes without a gradient.
        """
        if (
            self.folded is not None
            or not self.norms
            or self.compute_dtype is not None
            or any(n is None for n in self.norms)
            or reference.active("folded_layer_norm")
        ):
            return self
        folded = []
        for i, norm in enumerate(self.norms):
            assert norm is not None  # a LayerNorm after every hidden layer (checked above)
            layer = self.layers[i + 1]
            weight = layer.weight if norm.weight is None else layer.weight * norm.weight
            shift = _bias(layer) if norm.bias is None else _bias(layer) + layer.weight @ norm.bias
            colsum = jnp.sum(weight, axis=1)
            if i == len(self.norms) - 1:
                weight = self._padded(weight)
            folded.append((weight, colsum, shift))
        out = object.__new__(MLP)  # a copy with ``folded`` set (eqx.tree_at cannot replace a None field)
        for f in dataclasses.fields(self):
            object.__setattr__(out, f.name, tuple(folded) if f.name == "folded" else getattr(self, f.name))
        return out

    def _rest_folded(self, h: Array) -> Array:
        """:meth:`_rest` with the folded products of :meth:`with_folded_layer_norms`."""
        assert self.folded is not None  # _rest calls this for a folded MLP only
        act = ACTIVATIONS[self.activation]
        for norm, (weight, colsum, shift) in zip(self.norms, self.folded):
            assert norm is not None  # folded only with a LayerNorm after every hidden layer
            a = act(h)
            mean = jnp.mean(a)
            var = jnp.maximum(jnp.mean(a * a) - mean * mean, 0.0)  # the one-pass variance of _layer_norm
            rstd = jax.lax.rsqrt(var + norm.eps)
            y = self._dot(a, weight)[..., : shift.shape[-1]]
            h = rstd * y - (rstd * mean) * colsum + shift
        return h

    def _output(self, h: Array) -> Array:
        """The last layer ``h W^T + b``. With more than 16 outputs, not a multiple of 16, ``W`` gets zero
        rows up to the next multiple of 16 and the extra outputs are sliced off before the bias: the
        same numbers (an output's sum does not depend on the other rows of ``W``), and XLA's CPU
        product of ``(2048, 256) x (256, 50)`` took 0.31 ms against 0.21 for 64 outputs (AVX-512,
        issue 12; the rejection sampler's one-step policy on N candidates). Inside
        :func:`macfw.reference.reference_computation` (``"padded_outputs"``) the plain product."""
        layer = self.layers[-1]
        out = layer.weight.shape[0]
        return self._dot(h, self._padded(layer.weight))[..., :out] + _bias(layer)

    def _padded(self, weight: Array) -> Array:
        """``weight (out, in)`` with zero rows up to a multiple of 16 when ``out > 16`` is not one
        (:meth:`_output`); otherwise, and for the reference computation, ``weight`` itself."""
        out = weight.shape[0]
        pad = -out % 16
        if out <= 16 or pad == 0 or reference.active("padded_outputs"):
            return weight
        return jnp.pad(weight, ((0, pad), (0, 0)))

    def _dot(self, x: Array, weight: Array) -> Array:
        if self.compute_dtype is None:
            return jnp.dot(x, weight.T)
        dt = jnp.dtype(self.compute_dtype)
        return jnp.dot(x.astype(dt), weight.T.astype(dt), preferred_element_type=jnp.float32)

    def _linear(self, layer: eqx.nn.Linear, x: Array) -> Array:
        """``W x + b`` written as ``x W^T + b``: batched with vmap, the product comes out
        batch-major, ``(batch, out)``, so the LayerNorm after it reduces along contiguous memory.
        (``W @ x`` leaves XLA's CPU backend a feature-major layout and a transposing copy per layer,
        about a fifth of an update's time at 2 x 256.)"""
        return self._dot(x, layer.weight) + _bias(layer)


def _layer_norm(norm: eqx.nn.LayerNorm, x: Float[Array, " dim"]) -> Float[Array, " dim"]:
    """``norm(x)`` with the one-pass variance ``E[x^2] - E[x]^2`` (flax's ``use_fast_variance``, as in the
    paper's code): one read of ``x`` for both moments instead of two. Uses ``norm``'s parameters.

    Its gradient is the closed form of :func:`_layer_norm_bwd` (a custom VJP), the same derivative
    that autodiff of this function gives, as one expression: with autodiff's graph of the moments,
    ``maximum`` and ``rsqrt`` after a GELU, XLA's CPU code for a 2 x 256 MLP's backward pass on 2,560
    examples took 25 ms instead of 10 (issue 12's profile; 10 ms also without the norm or with ReLU).
    Inside :func:`macfw.reference.reference_computation` autodiff's gradient is used.
    ``tests/test_fast_paths.py`` checks that both gradients agree.
    """
    w = norm.weight if norm.use_weight else None
    b = norm.bias if norm.use_bias else None
    if reference.active("layer_norm_vjp"):  # the reference computation: autodiff's gradient
        return _layer_norm_autodiff(x, w, b, float(norm.eps))
    return _layer_norm_fn(x, w, b, float(norm.eps))


def _layer_norm_autodiff(x, w, b, eps):
    """The forward of :func:`_layer_norm` (``x: (dim,)``; ``w``, ``b``: ``(dim,)`` or None), differentiated
    by autodiff when called directly (the reference the custom VJP is tested against)."""
    return _layer_norm_fwd(x, w, b, eps)[0]


def _layer_norm_fwd(x, w, b, eps):
    mean = jnp.mean(x)
    var = jnp.maximum(jnp.mean(x * x) - mean * mean, 0.0)
    rstd = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    y = xhat if w is None else xhat * w
    if b is not None:
        y = y + b
    return y, (xhat, rstd, w, b)


def _layer_norm_bwd(eps, res, dy):
    """``dx = rstd (dy w - mean(dy w) - xhat mean(dy w xhat))``, ``dw = dy xhat``, ``db = dy`` (per example;
    vmap sums ``dw``, ``db`` over the batch). Exact for the variance ``mean((x - mean)^2)`` that the
    one-pass form computes; where the ``maximum`` clamps (variance rounding below 0, a constant ``x``)
    autodiff's derivative through the variance is 0 and this one keeps ``xhat``'s term, which is 0
    there too (``xhat = 0``)."""
    xhat, rstd, w, b = res
    g = dy if w is None else dy * w
    dx = rstd * (g - jnp.mean(g) - xhat * jnp.mean(g * xhat))
    return dx, None if w is None else dy * xhat, None if b is None else dy


_layer_norm_fn = jax.custom_vjp(_layer_norm_autodiff, nondiff_argnums=(3,))
_layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def joint_first_layer(mlps: Sequence[MLP], x: Float[Array, " in_dim"]) -> list[Array]:
    """``[m(x) for m in mlps]`` for MLPs on the same input ``x: (in_dim,)``, their first layers' products
    as one (the weights concatenated along outputs; each output is its own call's sums, so the same
    numbers). Falls back to the separate calls for a single MLP, an empty input, MLPs of different
    input sizes or compute dtypes, and inside :func:`macfw.reference.reference_computation`
    (``"joint_first_layer"``). Used by :func:`macfw.nn.models.evaluate_jointly`."""
    if (
        len(mlps) < 2
        or x.shape[-1] == 0
        or reference.active("joint_first_layer")
        or len({(m.layers[0].weight.shape[1], m.compute_dtype) for m in mlps}) != 1
    ):
        return [m(x) for m in mlps]
    weight = jnp.concatenate([m.layers[0].weight for m in mlps], axis=0)
    bias = jnp.concatenate([_bias(m.layers[0]) for m in mlps], axis=0)
    h = mlps[0]._dot(x, weight) + bias
    outs, start = [], 0
    for m in mlps:
        n = m.layers[0].weight.shape[0]
        outs.append(m._rest(h[..., start : start + n]).astype(x.dtype))
        start += n
    return outs


def fold_layer_norms(tree):
    """``tree`` (any pytree of modules, e.g. MAC's networks) with every :class:`MLP` replaced by
    :meth:`MLP.with_folded_layer_norms`: for a stretch of forward passes without gradients, such as
    MAC's imagined rollout (the weights are folded once, before its loop)."""
    return jax.tree_util.tree_map(
        lambda x: x.with_folded_layer_norms() if isinstance(x, MLP) else x, tree, is_leaf=lambda x: isinstance(x, MLP)
    )
