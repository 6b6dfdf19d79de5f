"""The habits of a well-kept library (issue 30): CONTRIBUTING.md's layout matches the tree, no function
is over 100 lines, and no two of macfw's modules import each other (not even inside functions).

Ruff and pyright themselves run in ``.ci/run`` and pre-commit (``.pre-commit-config.yaml``), not here:
they are tools of the ``[dev]`` extra, which the README's test install does not include.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "macfw"
CHECKED = ("macfw", "experiments", "tests", "docs", "examples")
MAX_LINES = 100


def _layout_block() -> str:
    text = (REPO / "CONTRIBUTING.md").read_text()
    m = re.search(r"## Layout\s*```\n(.*?)```", text, re.S)
    assert m, "CONTRIBUTING.md has no '## Layout' code block"
    return m.group(1)


def test_contributing_layout_lists_every_module_and_nothing_else():
    listed, in_pkg = set(), False
    for line in _layout_block().splitlines():
        if line.startswith("macfw/"):
            in_pkg = True
            continue
        if line and not line.startswith(" "):
            in_pkg = False
            top = line.split()[0].rstrip(",")
            assert (REPO / top).exists(), f"CONTRIBUTING.md's layout lists {top!r}, which does not exist"
            continue
        if in_pkg and line.strip():
            listed.add(line.split()[0])
    actual = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py")} - {
        str(p.relative_to(PKG)) for p in PKG.rglob("__init__.py") if p.parent != PKG
    }
    assert sorted(actual - listed) == [], "modules missing from CONTRIBUTING.md's layout"
    assert sorted(listed - actual) == [], "CONTRIBUTING.md's layout lists modules that do not exist"


def test_no_function_is_over_100_lines():
    """Counted from the ``def`` line to the last line, the docstring included."""
    long = []
    for root in CHECKED:
        for p in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = (node.end_lineno or node.lineno) - node.lineno + 1
                    if n > MAX_LINES:
                        long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The macfw modules ``path`` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in modules}
    return out


def test_no_two_modules_import_each_other():
    """Pairs that import each other in both directions (``bench`` <-> ``profiling`` and
    ``ogbench_data`` <-> ``shards`` were the last): the shared part belongs in a lower module.
    (A package's ``__init__`` re-exporting its members is not a cycle.)"""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: _imported_modules(p, set(files)) - {m} for m, p in files.items()}
    pairs = sorted(
        f"{a} <-> {b}"
        for a, deps in graph.items()
        for b in deps
        if a < b and a in graph.get(b, set()) and not files[a].name == "__init__.py" and files[b].name != "__init__.py"
    )
    assert pairs == []
