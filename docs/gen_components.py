"""Every registered component, by kind, as Markdown: the body of docs/configuration/components.md.

The page's source holds the marker ``<!-- generated: components -->``; the MkDocs hook
(``docs/hooks.py``) replaces it with :func:`markdown` at every build, so the page lists what
``macfw.registry`` holds when the site is built (nothing to regenerate by hand).
``python docs/gen_components.py`` prints the same Markdown.

Listed per kind (``macfw.registry.KINDS`` and kinds added with ``add_kind``): the registered (Gin)
name, the class, the first line of its docstring and its constructor's parameters with their
defaults (those are the Gin bindings ``Name.parameter = value``; ``spec`` and ``key`` are given by
the agent, never by Gin). Then the Gin configurables that are not components (``train``,
``evaluate``, ``make_mesh``, ``SlurmLauncher``).
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any, cast

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
NOT_BOUND = {"self", "spec", "key", "args", "kwargs"}  # given by the code, never by Gin


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    first = ROLE.sub(lambda m: f"`{m.group(2).split('.')[-1] if m.group(1) else m.group(2)}`", first)
    return first.replace("|", "\\|")


def _default(v) -> str:
    if isinstance(v, type):
        return f"@{v.__name__}"
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _params(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    out = []
    for p in sig.parameters.values():
        if p.name in NOT_BOUND or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out.append(f"`{p.name}`" if p.default is p.empty else f"`{p.name} = {_default(p.default)}`")
    return ", ".join(out).replace("|", "\\|")


def components() -> dict[str, list[tuple[str, type]]]:
    """``{kind: [(name, class), ...]}`` of every registered component (importing macfw registers them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import macfw  # noqa: F401
        import macfw.launch  # noqa: F401  (SlurmLauncher's Gin bindings)
        from macfw import registry
    all_names = cast(dict[str, list[str]], registry.registered())  # no ``kind``: the dict of every kind
    return {kind: [(n, registry.get(kind, n)) for n in names] for kind, names in all_names.items()}


def other_configurables() -> list[tuple[str, Callable[..., Any]]]:
    """Gin configurables of macfw that are not registered components (``train``, ``make_mesh``, ...)."""
    registered = {id(c) for entries in components().values() for _, c in entries}
    try:
        from gin import config as gin_config

        items = list(gin_config._REGISTRY.items())  # noqa: SLF001 (gin has no public listing)
    except Exception:  # pragma: no cover - a gin without the private registry
        return []
    out = []
    for _, c in items:
        fn = getattr(c, "wrapped", None)
        if c.module.startswith("macfw") and fn is not None and id(fn) not in registered:
            out.append((c.name, fn))
    return sorted(out, key=lambda x: x[0].lower())


def markdown() -> str:
    comps = components()
    total = sum(len(v) for v in comps.values())
    lines = [
        f"{total} registered components in {sum(1 for v in comps.values() if v)} kinds "
        f"(kinds with none registered: {', '.join(k for k, v in comps.items() if not v) or 'none'}).",
        "",
    ]
    for kind, entries in comps.items():
        if not entries:
            continue
        lines += [f"### `{kind}`", "", "| name | class | what it is | Gin parameters (defaults) |", "|---|---|---|---|"]
        for name, cls in entries:
            path = f"{cls.__module__}.{cls.__qualname__}"
            lines.append(f"| `{name}` | `{path}` | {_summary(cls)} | {_params(cls)} |")
        lines.append("")
    others = other_configurables()
    if others:
        lines += [
            "### Other Gin configurables (not components)",
            "",
            "| name | object | what it is | Gin parameters (defaults) |",
            "|---|---|---|---|",
        ]
        for name, fn in others:
            lines.append(f"| `{name}` | `{fn.__module__}.{fn.__qualname__}` | {_summary(fn)} | {_params(fn)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
