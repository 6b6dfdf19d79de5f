"""MkDocs hook: fill the generated parts of the pages at every build (``hooks:`` in mkdocs.yml).

A page marks a generated part with an HTML comment on a line of its own:

* ``<!-- generated: components -->``: every registered component by kind (docs/gen_components.py);
* ``<!-- generated: protocol -->``: the paper's tables, cell by cell (docs/gen_protocol.py);
* ``<!-- generated: performance NAME -->``: the measurements in docs/data/NAME.json
  (docs/gen_performance.py).

Since the hook runs at every ``mkdocs build`` / ``mkdocs serve``, the pages always show the registry,
the protocol and the JSON files of the tree being built. An unknown marker fails the build.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

MARKER = re.compile(r"^<!-- generated: (\w+)(?: ([\w.-]+))? -->$", re.M)


def _module(name: str):
    """docs/<name>.py (docs/ is not a package, and MkDocs takes its folder off sys.path after loading
    this hook)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load docs/{name}.py: no module spec for {HERE / f'{name}.py'}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def generate(what: str, arg: str | None) -> str:
    if what == "components":
        return _module("gen_components").markdown()
    if what == "protocol":
        return _module("gen_protocol").markdown()
    if what == "performance" and arg:
        return _module("gen_performance").render(arg)
    raise ValueError(f"unknown generated part {what!r} {arg!r} (docs/hooks.py)")


def fill(markdown: str) -> str:
    """``markdown`` with every marker replaced by its generated Markdown."""
    return MARKER.sub(lambda m: generate(m.group(1), m.group(2)), markdown)


def on_page_markdown(markdown, page, config, files, **kwargs):
    return fill(markdown)
