"""Griffe extension for the API reference: read our classes and docstrings as they are written.

Habits of the house that griffe (Google's docstring style, static analysis) reads otherwise:

- a docstring's doctest is headed ``Example:``; griffe names that section ``Examples:`` and
  reads ``Example:`` as an admonition of Markdown text, where a doctest's printed list
  (``['head.weight', 'head.bias']``) becomes a broken reference link;
- references are Sphinx roles (``:func:`load_state_dict```, ``:class:`~diffprog.Frozen```);
  they become cross-references (``[`load_state_dict`][load_state_dict]``), resolved from the
  docstring's scope, so a reference to a name that is not documented fails the strict build;
- names that share a description are listed together (``betas, eps, weight_decay: torch's.``
  under ``Args:`` or ``Attributes:``); each becomes its own entry;
- a ``Parameterized`` subclass is a dataclass made by ``__init_subclass__``, which static
  analysis cannot see: its constructor's signature is read from the class itself (imported
  from the documented sources), so a layer's entry shows ``Linear(weight, bias)`` with types.

The source is left as it is.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj):`(?P<tilde>~?)(?P<target>[^`]+)`"
)
_NAMED_SECTION = re.compile(
    r"^(?P<indent>[ \t]*)(?:Args|Arguments|Params|Parameters|Attributes|Keyword Args"
    r"|Keyword Arguments|Other Parameters):[ \t]*$"
)
_GROUPED_ITEM = re.compile(
    r"^(?P<indent>[ \t]+)(?P<names>\w+(?:, \w+)+)(?P<rest>(?: \([^)]*\))?:(?: .*)?)$"
)


def _crossref(match: re.Match[str]) -> str:
    target = match["target"]
    shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
    return f"[`{shown}`][{target}]"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_grouped_items(text: str) -> str:
    """``a, b: text`` in a section of named items becomes ``a: text`` and ``b: text``."""
    lines = text.split("\n")
    out: list[str] = []
    section: int | None = None  # the indentation of the current named-items section
    i = 0
    while i < len(lines):
        line = lines[i]
        if (heading := _NAMED_SECTION.match(line)) is not None:
            section = len(heading["indent"])
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        grouped = _GROUPED_ITEM.match(line) if section is not None else None
        if grouped is None or len(grouped["indent"]) <= (section or 0):
            out.append(line)
            i += 1
            continue
        end = i + 1  # the item's continuation lines: indented deeper than the item
        while end < len(lines) and lines[end].strip() and _indent(lines[end]) > _indent(line):
            end += 1
        for name in grouped["names"].split(", "):
            out += [f"{grouped['indent']}{name}{grouped['rest']}", *lines[i + 1 : end]]
        i = end
    return "\n".join(out)


def _dataclass_init(cls: griffe.Class, runtime: type) -> griffe.Function:
    """An ``__init__`` for ``cls`` with the parameters of the runtime dataclass's."""
    parameters = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
    for parameter in inspect.signature(runtime).parameters.values():
        field = cls.all_members.get(parameter.name)
        annotation = getattr(field, "annotation", None) or (
            parameter.annotation
            if isinstance(parameter.annotation, str)
            else inspect.formatannotation(parameter.annotation)
        )
        parameters.append(
            griffe.Parameter(
                parameter.name,
                annotation=annotation,
                kind=griffe.ParameterKind[parameter.kind.name.lower()],
                default=None if parameter.default is parameter.empty else repr(parameter.default),
            )
        )
    return griffe.Function(
        "__init__", parameters=griffe.Parameters(*parameters), returns="None", parent=cls
    )


class DocstringHabits(griffe.Extension):
    """Read our docstrings' habits as griffe's, and ``Parameterized`` classes' signatures."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring (called once per loaded object)."""
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\g<indent>Examples:", obj.docstring.value)
            obj.docstring.value = _split_grouped_items(_ROLE.sub(_crossref, text))

    def on_class(self, *, cls: griffe.Class, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Give a dataclass made at run time (a ``Parameterized`` subclass) its ``__init__``."""
        # Classes griffe sees as dataclasses (decorated) or with an __init__ already have one.
        if "__init__" in cls.members or not cls.path.startswith("diffprog."):
            return
        runtime = griffe.dynamic_import(cls.path, loader.finder.search_paths)
        if isinstance(runtime, type) and dataclasses.is_dataclass(runtime):
            cls.set_member("__init__", _dataclass_init(cls, runtime))
