"""One registry for every component kind.

A component registers itself where it is defined::

    @macfw.register("sampler")
    class TopKMeanSampler(Sampler):
        ...

Registering does two things: the class becomes selectable by name through :func:`get`, and it
becomes a Gin configurable (under the same name), so a Gin file can bind its hyperparameters
(``TopKMeanSampler.k = 4``) and pick it for a slot (``MAC.sampler = @TopKMeanSampler()``).
A user's own module registers variants the same way; importing it (``--import my_module`` on the
command line, or a plain ``import`` in Python) is all that is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

import gin

T = TypeVar("T", bound=type)

#: The component kinds macfw knows. A new kind can be added with :func:`add_kind`.
KINDS: tuple[str, ...] = (
    "network",
    "dynamics",
    "future_model",
    "policy",
    "sampler",
    "critic",
    "value",
    "success",
    "reward",
    "actor",
    "temperature",
    "agent",
    "dataset",
    "evaluator",
    "goals",
    "logger",
)

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}


class UnknownComponentError(KeyError, ValueError):
    """A component name that is not registered (under the requested kind, or at all)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def add_kind(kind: str) -> None:
    """Declare a new component kind (no-op when it exists)."""
    _REGISTRY.setdefault(kind, {})


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise UnknownComponentError(
            f"Unknown component kind {kind!r}. Known kinds: {sorted(_REGISTRY)}. "
            "Declare a new kind with macfw.registry.add_kind(kind)."
        )


def register(kind: str, name: str | None = None) -> Callable[[T], T]:
    """Class decorator: register ``cls`` under ``kind`` and make it Gin-configurable.

    Args:
      kind: one of :data:`KINDS` (or one added with :func:`add_kind`).
      name: registered and Gin name; defaults to the class name.

    Raises:
      UnknownComponentError: ``kind`` is not a known kind.
      ValueError: another class is already registered under ``name`` for ``kind``.
    """
    _check_kind(kind)

    def decorator(cls: T) -> T:
        reg_name = name or cls.__name__
        existing = _REGISTRY[kind].get(reg_name)
        if existing is not None and existing is not cls:
            same_place = getattr(existing, "__module__", None) == getattr(cls, "__module__", None) and getattr(
                existing, "__qualname__", None
            ) == getattr(cls, "__qualname__", None)
            if same_place:  # the same module imported twice: keep the first registration
                return cast(T, existing)
            raise ValueError(
                f"A {kind} named {reg_name!r} is already registered "
                f"({existing.__module__}.{existing.__qualname__}); pass name=... to register "
                f"{cls.__module__}.{cls.__qualname__} under another name."
            )
        # gin.configurable returns the class it decorates; pyright misreads its untyped decorator factory
        configurable = cast(T, gin.configurable(reg_name)(cls))  # pyright: ignore[reportCallIssue]
        _REGISTRY[kind][reg_name] = configurable
        return configurable

    return decorator


def get(kind: str, name: str) -> type:
    """The class registered as ``name`` under ``kind``.

    Raises:
      UnknownComponentError: naming the value received and listing the registered names.
    """
    _check_kind(kind)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise UnknownComponentError(
            f"Unknown {kind} {name!r}. Registered {kind} components: {registered(kind)}. "
            "Register a new one with @macfw.register(" + repr(kind) + ")."
        ) from None


def registered(kind: str | None = None) -> list[str] | dict[str, list[str]]:
    """Sorted registered names of ``kind``, or a dict of all kinds when ``kind`` is None."""
    if kind is None:
        return {k: sorted(v) for k, v in _REGISTRY.items()}
    _check_kind(kind)
    return sorted(_REGISTRY[kind])


def kind_of(name: str) -> list[str]:
    """The kinds under which ``name`` is registered (usually one, possibly none)."""
    return [k for k, v in _REGISTRY.items() if name in v]
