"""Checks of configured values: each failure is one :class:`ConfigError` line naming the binding.

Every message reads ``BINDING = VALUE is out of range: must be RANGE. Fix the Gin binding BINDING.``
with the binding spelled as a user writes it (``MAC.horizon``, ``QCritic.hidden_dims``), so
``python -m macfw.run`` can print it as its one ``macfw: error:`` line (exit code 2).
Constructors and :func:`macfw.train.train` run these checks before they build or write anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any, Literal, overload


class ConfigError(ValueError):
    """A configurable got a value outside its allowed range; the message names the binding, the value
    and the range."""


def check(binding: str, value: Any, ok: bool, must: str) -> None:
    """Raise :class:`ConfigError` ``"{binding} = {value!r} is out of range: must be {must}. ..."`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{binding} = {value!r} is out of range: must be {must}. Fix the Gin binding {binding}.")


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


@overload
def check_int(
    binding: str,
    value: Any,
    *,
    minimum: int = 1,
    maximum: int | None = None,
    allow_none: Literal[False] = False,
    note: str = "",
) -> int: ...
@overload
def check_int(
    binding: str, value: Any, *, minimum: int = 1, maximum: int | None = None, allow_none: bool, note: str = ""
) -> int | None: ...
def check_int(
    binding: str, value: Any, *, minimum: int = 1, maximum: int | None = None, allow_none: bool = False, note: str = ""
) -> int | None:
    """``value`` as an int in ``minimum..maximum`` (or None when ``allow_none``); bools are refused.

    ``note`` is added to the range in the message, e.g. ``"train.chunk_len = 5"``.

    Raises:
      ConfigError: not an integer, or outside the range.
    """
    if allow_none and value is None:
        return None
    rng = f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"
    rng = ("None or " if allow_none else "") + rng + (f" ({note})" if note else "")
    check(binding, value, _is_int(value) and value >= minimum and (maximum is None or value <= maximum), rng)
    return int(value)


@overload
def check_float(
    binding: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: Literal[False] = False,
    note: str = "",
) -> float: ...
@overload
def check_float(
    binding: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool,
    note: str = "",
) -> float | None: ...
def check_float(
    binding: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    note: str = "",
) -> float | None:
    """``value`` as a float in the interval from ``low`` to ``high`` (None: unbounded; open ends where
    asked; NaN never passes). ``note`` is added to the range in the message.

    Raises:
      ConfigError: not a real number, or outside the interval.
    """
    if allow_none and value is None:
        return None
    if low is not None and high is not None:
        rng = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        rng = f"a number {'>' if low_open else '>='} {low}"
    elif high is not None:
        rng = f"a number {'<' if high_open else '<='} {high}"
    else:
        rng = "a finite number"
    ok = isinstance(value, Real) and not isinstance(value, bool)
    v = float(value) if ok else 0.0
    ok = (
        ok
        and abs(v) < float("inf")
        and (low is None or (v > low if low_open else v >= low))
        and (high is None or (v < high if high_open else v <= high))
    )
    check(binding, value, ok, ("None or " if allow_none else "") + rng + (f" ({note})" if note else ""))
    return v


def check_choice(binding: str, value: Any, choices: Iterable) -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
      ConfigError: any other value (the message lists the choices).
    """
    choices = list(choices)
    check(binding, value, any(value == c and type(value) is type(c) for c in choices), f"one of {choices}")
    return value


def check_dims(binding: str, value: Any) -> tuple[int, ...]:
    """``value`` as a non-empty tuple of positive ints (layer sizes, e.g. ``(256, 256)``).

    Raises:
      ConfigError: not a tuple/list, empty, or a size that is not a positive integer.
    """
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(_is_int(h) and h >= 1 for h in value)
    check(binding, value, ok, "a non-empty tuple of positive integers, e.g. (256, 256)")
    return tuple(int(h) for h in value)
