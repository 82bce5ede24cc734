"""The filter language: which parts of a model a function acts on.

A *filter* picks leaves of a model (its parameters, buffers and other values) by

* a glob pattern over their ``state_dict``-style path (``"layers.0.*"``, ``"*.bias"``; ``*``
  also crosses dots), or a compiled regular expression (matched with ``search``);
* a type: a leaf of that type, or any leaf inside a value of that type (``diffprog.nn.Linear``
  picks every parameter of every Linear layer, ``torch.Tensor`` every tensor);
* a predicate ``f(path, value) -> bool``;
* a :class:`Selector` (combinable with ``|``, ``&``, ``~``), or a list of any of these (any
  of them).

The same language serves ``partition``, ``freeze``, ``count_parameters`` and the optimizers'
``freeze=`` and ``overrides=`` (one implementation). This module also lists the *places* of a
model (every sub-value with its path), which the filters and surgery read.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Union

import torch

from diffprog._errors import PathKey, state_dict_path
from diffprog._nodes import HandWrittenNode, Node, fields_node, node_for
from diffprog._traverse import _cycle_error, _hand_written_leaves, _located, flatten_parameters

__all__ = [
    "Filter",
    "Place",
    "Predicate",
    "Selector",
    "as_selector",
    "is_container",
    "leaf_places",
    "places",
    "select",
]

Predicate = Callable[[str, Any], bool]

Filter = Union[str, "re.Pattern[str]", type, "Selector", Predicate, Sequence[Any]]
"""What picks parts of a model: a glob pattern (``"*.bias"``), a compiled regular expression
(``re.compile(r"norm")``, matched with ``search``), a type (``diffprog.nn.Linear``: every leaf
inside such a value; ``torch.Tensor``: every tensor), a predicate ``(path, value) -> bool``, a
:class:`Selector`, or a list of these (any of them)."""


@dataclasses.dataclass(frozen=True)
class Selector:
    """A filter, combinable with ``|``, ``&`` and ``~``; build it with :func:`select`.

    Call it as ``selector(path, value)`` (or ``selector(path, value, ancestors)``, the values
    enclosing the leaf, outermost first, which type filters also look at).

    Example:
        >>> no_decay = select("*.bias") | select(where=lambda path, p: p.ndim < 2)
        >>> no_decay("head.bias", torch.zeros(3)), no_decay("head.weight", torch.zeros(3, 3))
        (True, False)
    """

    patterns: tuple[str | re.Pattern[str], ...] = ()
    where: Predicate | None = None
    op: str = "any"
    parts: tuple[Selector, ...] = ()
    types: tuple[type, ...] = ()

    def __call__(self, path: str, value: Any, ancestors: Sequence[Any] = ()) -> bool:
        """Whether the leaf ``value`` at ``path`` (inside ``ancestors``) is selected."""
        if self.op == "or":
            return any(part(path, value, ancestors) for part in self.parts)
        if self.op == "and":
            return all(part(path, value, ancestors) for part in self.parts)
        if self.op == "not":
            return not self.parts[0](path, value, ancestors)
        for pattern in self.patterns:
            if isinstance(pattern, str):
                if fnmatch.fnmatchcase(path, pattern):
                    return True
            elif pattern.search(path):
                return True
        if self.types and (
            isinstance(value, self.types) or any(isinstance(a, self.types) for a in ancestors)
        ):
            return True
        return self.where is not None and bool(self.where(path, value))

    def __or__(self, other: Filter) -> Selector:
        return Selector(op="or", parts=(self, as_selector(other)))

    def __and__(self, other: Filter) -> Selector:
        return Selector(op="and", parts=(self, as_selector(other)))

    # The reflected forms: ``"*.bias" | select(...)`` and ``Linear & select(...)`` (a string
    # or a type on the left does not know how to combine with a Selector).
    def __ror__(self, other: Filter) -> Selector:
        return Selector(op="or", parts=(as_selector(other), self))

    def __rand__(self, other: Filter) -> Selector:
        return Selector(op="and", parts=(as_selector(other), self))

    def __invert__(self) -> Selector:
        return Selector(op="not", parts=(self,))


def select(*patterns: str | re.Pattern[str] | type, where: Predicate | None = None) -> Selector:
    """Select the leaves whose path matches any of ``patterns``, or for which ``where`` holds.

    Paths are ``state_dict``-style (``diffprog.named_parameters`` paths, e.g.
    ``layers.0.bias``). A string is a glob pattern matched against the whole path (``*`` also
    crosses dots: ``"*.bias"`` is every bias, ``"encoder.*"`` everything under ``encoder``); a
    compiled regular expression is matched with ``search``; a type selects the leaves of that
    type and every leaf inside a value of that type.

    Args:
        *patterns: glob patterns, compiled regular expressions and types.
        where: a predicate ``(path, value) -> bool``.

    Returns:
        The selector.

    Raises:
        TypeError: a pattern is neither a string, a compiled regular expression nor a type.

    Example:
        >>> s = select("*.bias", re.compile(r"(^|\\.)norm"))
        >>> [s(path, torch.zeros(1)) for path in ["0.bias", "norm.weight", "0.weight"]]
        [True, True, False]
    """
    texts: list[str | re.Pattern[str]] = []
    types: list[type] = []
    for p in patterns:
        if isinstance(p, type):
            types.append(p)
        elif isinstance(p, (str, re.Pattern)):
            texts.append(p)
        else:
            raise TypeError(
                f"select takes glob strings, compiled regular expressions and types, got "
                f"{type(p).__name__}; pass a predicate as where=..."
            )
    return Selector(tuple(texts), where, types=tuple(types))


def as_selector(selection: Filter) -> Selector:
    """Turn any :data:`Filter` into a :class:`Selector`.

    Raises:
        TypeError: ``selection`` is none of the forms a filter takes.
    """
    if isinstance(selection, Selector):
        return selection
    if isinstance(selection, (str, re.Pattern)):
        return Selector((selection,))
    if isinstance(selection, type):  # before callable: a class is callable too
        return Selector(types=(selection,))
    if callable(selection):
        return Selector(where=selection)
    if isinstance(selection, Iterable):
        parts = tuple(as_selector(s) for s in selection)
        return Selector(op="or", parts=parts)
    raise TypeError(
        f"cannot select parameters (or other parts of a model) with a {type(selection).__name__}: "
        "use a glob string, a compiled "
        "regex, a type, a predicate (path, value) -> bool, or diffprog.select(...)."
    )


class Place(NamedTuple):
    """One place in a model: a sub-value with its path.

    Attributes:
        keys: the path keys from the root.
        value: the value held there.
        ancestors: the values enclosing it, outermost first (the root included).
        leaf: True for a leaf (a tensor, a static value, an opaque object, a parameter listed
            by a hand-written instance), False for a container or model (descended into).
        holder: for a parameter listed by a hand-written instance, that instance (it can only
            be replaced through the instance's ``replace_own_parameters``); else None.
    """

    keys: tuple[PathKey, ...]
    value: Any
    ancestors: tuple[Any, ...]
    leaf: bool
    holder: Any = None

    @property
    def path(self) -> str:
        """The path in ``state_dict`` style (inlined fields left out): ``layers.0.weight``."""
        return state_dict_path(self.keys)

    @property
    def full_path(self) -> str:
        """The path with inlined field names too, dot-joined: ``layers.0.weight``."""
        return ".".join(str(key) for _, key in self.keys)


def is_container(node: Node) -> bool:
    """Whether values of ``node`` are descended into and rebuilt from their children
    (dataclasses, sequences, dicts, NamedTuples, pytree nodes), rather than kept whole."""
    return not node.static and not isinstance(node, HandWrittenNode) and _overrides_values(node)


def _overrides_values(node: Node) -> bool:
    # Opaque values (plain objects, modules, functions) describe no children: they inherit
    # Node.values, which gives none.
    return type(node).values is not Node.values


def places(model: Any) -> list[Place]:
    """Every place of ``model``, depth first in ``flatten_parameters`` order, the root first.

    A value held at several paths (a tie, a shared block) has one place per path. The model is
    checked first as ``flatten_parameters`` checks it (hidden parameters, cycles).

    Example:
        >>> [p.path for p in places({"a": (1, 2)})]
        ['', 'a', 'a.0', 'a.1']
    """
    flatten_parameters(model)  # the errors of a malformed model, with their paths
    out: list[Place] = []
    out.extend(_places(model, (), (), set(), model))
    return out


def leaf_places(model: Any) -> list[Place]:
    """The leaves among :func:`places` (what filters are applied to)."""
    return [p for p in places(model) if p.leaf]


def _places(
    v: Any, keys: tuple[PathKey, ...], ancestors: tuple[Any, ...], active: set[int], root: Any
) -> Iterator[Place]:
    node = node_for(type(v))
    if isinstance(v, torch.Tensor) or not (is_container(node) or isinstance(node, HandWrittenNode)):
        yield Place(keys, v, ancestors, True)
        return
    if id(v) in active:
        raise _located(_cycle_error(()), keys, root)
    yield Place(keys, v, ancestors, False)
    inner = (*ancestors, v)
    if isinstance(node, HandWrittenNode):
        for sub, p in _hand_written_leaves(node.own(v), v, ()):
            # The values between the instance and the parameter (a Linear it holds), so
            # that a type filter sees them too.
            yield Place((*keys, *sub), p, (*inner, *_along(v, sub)), True, v)
        return
    active.add(id(v))
    try:
        for key, child in node.children(v):
            yield from _places(child, (*keys, key), inner, active, root)
    finally:
        active.discard(id(v))


def _along(value: Any, keys: tuple[PathKey, ...]) -> tuple[Any, ...]:
    """The values strictly between ``value`` and the end of the path ``keys`` inside it
    (the path of a parameter a hand-written instance lists, through its fields)."""
    found: list[Any] = []
    current = value
    for key in keys[:-1]:
        node = fields_node(type(current)) if current is value else node_for(type(current))
        current = dict(node.children(current)).get(key, _MISSING)
        if current is _MISSING:  # named by its position in the instance's list
            return ()
        found.append(current)
    return tuple(found)


_MISSING = object()
