"""Griffe extension (mkdocs.yml, mkdocstrings ``extensions``): macfw's docstrings use a few
reStructuredText habits that Markdown would print literally. Before rendering, each docstring gets:

* Sphinx roles ``:func:`macfw.x.f``` / ``:class:`~macfw.x.C``` -> code spans `macfw.x.f` / `C`;
* a paragraph ending in ``::`` (reST's "a literal block follows") -> ``:``; the indented block after
  it is already a Markdown code block.

The docstrings themselves stay as they are (they are read in editors and ``help()`` too).
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const|func):`(~?)([^`]+)`")
LITERAL = re.compile(r"(\S)::[ \t]*$", re.M)


def clean(text: str) -> str:
    """``text`` with Sphinx roles as code spans and reST's ``::`` as ``:``."""
    text = ROLE.sub(lambda m: f"`{m.group(2).split('.')[-1] if m.group(1) else m.group(2)}`", text)
    return LITERAL.sub(r"\1:", text)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = clean(obj.docstring.value)
