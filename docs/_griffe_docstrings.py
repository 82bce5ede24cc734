"""Griffe extension for the API reference: read our docstrings as they are written.

Two habits of the house that Google's style (griffe's parser) reads otherwise:

- a docstring's doctest is headed ``Example:``; griffe names that section ``Examples:`` and
  reads ``Example:`` as an admonition of Markdown text, where a doctest's printed list
  (``['head.weight', 'head.bias']``) becomes a broken reference link;
- references are Sphinx roles (``:func:`load_state_dict```, ``:class:`~diffprog.Frozen```);
  they become cross-references (``[`load_state_dict`][load_state_dict]``), resolved from the
  docstring's scope, so a reference to a name that is not documented fails the strict build.

The extension rewrites both as the docstrings are loaded; the source is left as it is.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj):`(?P<tilde>~?)(?P<target>[^`]+)`"
)


def _crossref(match: re.Match[str]) -> str:
    target = match["target"]
    shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
    return f"[`{shown}`][{target}]"


class DocstringHabits(griffe.Extension):
    """Read ``Example:`` as ``Examples:`` and Sphinx roles as cross-references."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring (called once per loaded object)."""
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\g<indent>Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_crossref, text)
