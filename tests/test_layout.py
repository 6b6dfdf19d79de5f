"""The package's shape: the loop, evaluation, checkpoints and the benchmark know agents only through
the interface (macfw/agents/base.py), and the loop's modules do not import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "macfw"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth: module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_module_outside_agents_imports_mac():
    offenders = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if "agents" not in p.relative_to(PKG).parts and "macfw.agents.mac" in _imports(p)
    ]
    assert offenders == [], offenders
    # the loop and its helpers do not even name MAC's state or networks
    for name in ("train.py", "step.py", "evaluation.py", "checkpoint.py", "bench.py"):
        text = (PKG / name).read_text()
        assert "TrainState" not in text and "Networks" not in text, name


def test_train_and_evaluation_do_not_import_each_other():
    assert not any(m.startswith("macfw.train") for m in _imports(PKG / "evaluation.py"))
    assert not any(m.startswith("macfw.train") for m in _imports(PKG / "evaluate.py"))
