"""A griffe extension for the API reference: vhdcore's docstrings use Sphinx
roles (:func:`flatten`, :class:`~vhdcore.errors.VhdError`); render them as
inline code, showing the last component of a ``~``-prefixed name.

mkdocs.yml loads it with ``extensions: [docs/griffe_rst.py]`` in the Python
handler's options.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?P<role>func|meth|class|mod|attr|data|exc|obj|const):`(?P<target>[^`]+)`"
)


def _role(m: re.Match[str]) -> str:
    role, target = m["role"], m["target"]
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    if role in ("func", "meth") and not target.endswith(")"):
        target += "()"
    return f"`{target}`"


def convert(text: str) -> str:
    """The docstring with every Sphinx role turned into Markdown inline code."""
    return _ROLE.sub(_role, text)


class SphinxRoles(griffe.Extension):
    """Rewrite roles in every docstring that griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
