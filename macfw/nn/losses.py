"""Regression losses of value functions: MSE, BCE (values as probabilities) and expectile.

Pure elementwise functions of a prediction and a target of the same shape; callers take means.
Used by the Q and V ensembles of the baselines (DESIGN §9) and selectable by name through
:func:`value_loss` (``'mse'``, ``'bce'``, ``'expectile'``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax
from jaxtyping import Array

from macfw.errors import check_choice, check_float


def mse(pred: Array, target: Array) -> Array:
    """``(pred - target)^2``."""
    return (pred - target) ** 2


def bce(logit: Array, target: Array) -> Array:
    """Binary cross-entropy of ``sigmoid(logit)`` against a target in [0, 1] (soft targets allowed):
    ``-(t log sigmoid(x) + (1 - t) log sigmoid(-x))``."""
    return optax.sigmoid_binary_cross_entropy(logit, target)


def expectile(pred: Array, target: Array, tau: float) -> Array:
    """Asymmetric squared loss ``|tau - 1[target < pred]| (target - pred)^2`` (IQL's expectile
    regression, Kostrikov et al. 2022): ``tau = 0.5`` is half the MSE; ``tau > 0.5`` weighs targets
    above the prediction more, so the minimiser is an upper expectile of the target."""
    diff = target - pred
    weight = jnp.where(diff > 0, tau, 1.0 - tau)
    return weight * diff**2


LOSSES = ("mse", "bce", "expectile")


def value_loss(kind: str, *, tau: float = 0.5, binding: str = "value_loss") -> Callable[[Array, Array], Array]:
    """The loss ``(pred, target) -> elementwise loss`` named ``kind`` (``tau`` for ``'expectile'``).

    Raises:
      ConfigError: an unknown ``kind`` or ``tau`` outside (0, 1), naming ``binding``.
    """
    check_choice(binding, kind, LOSSES)
    if kind == "mse":
        return mse
    if kind == "bce":
        return bce
    tau = check_float(f"{binding.rsplit('.', 1)[0]}.expectile", tau, low=0.0, high=1.0, low_open=True, high_open=True)
    return lambda pred, target: expectile(pred, target, tau)
