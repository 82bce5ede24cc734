"""The construction check of ``Parameterized`` fields: a spec where a layer belongs is an error.

``Classifier(LinearSpec(4, 16), LinearSpec(16, 3))`` would otherwise build a model without
parameters, which then trains "successfully" and changes nothing. A field whose annotation
names a layer type (a ``Parameterized`` class, or a container of them: ``list[Linear]``,
``tuple[Linear, ...]``, ``dict[str, Linear]``, ``Linear | None`` ...) refuses a spec (an object
with a ``sample`` method, see ``diffprog.Randomizable``) at construction. A field annotated with
a spec type, ``Any``, or not understood here, accepts anything, as before.

The annotations are resolved once per class, into one checker per field that names a layer
type: when the class is created, or at its first construction if an annotation names a class
not defined yet (a forward reference). A class without such fields keeps its ``__init__`` and
pays nothing; ``replace_parameters`` does not construct (it copies the fields), so it pays
nothing either.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from diffprog._errors import PathKey, UnsampledSpecError, render_path

__all__ = ["field_checks", "install_check"]

# A field checker: the place (path keys below the field), the spec and what was expected there,
# or None when the value is fine.
Found = tuple[list[PathKey], Any, str]
Checker = Callable[[Any], "Found | None"]

# Container origins (typing.get_origin maps typing.List and the like to these too).
_SEQUENCES: dict[Any, type] = {
    list: list,
    tuple: tuple,
    collections.abc.Sequence: collections.abc.Sequence,
    collections.abc.MutableSequence: collections.abc.MutableSequence,
}
_SEQUENCE_KINDS = frozenset(_SEQUENCES.values())
_MAPPINGS: dict[Any, type] = {
    dict: dict,
    collections.OrderedDict: collections.OrderedDict,
    collections.defaultdict: collections.defaultdict,
    collections.abc.Mapping: collections.abc.Mapping,
    collections.abc.MutableMapping: collections.abc.MutableMapping,
}


def install_check(cls: type) -> None:
    """Make ``cls``'s ``__init__`` refuse a spec in a layer-typed field (see the module doc).

    The annotations are resolved now if they can be: a class without layer-typed fields (most
    layers) keeps its ``__init__`` as it is and pays nothing. A class whose annotations name a
    class not defined yet (a forward reference) resolves them at its first construction.
    """
    init = vars(cls).get("__init__")
    if init is None:  # init=False: no constructor of its own
        return
    checks = field_checks(cls, complete=True)
    if checks == []:
        return
    type.__setattr__(cls, "__init__", _checked_init(cls, init, checks))


def _checked_init(
    cls: type, init: Callable[..., None], checks: list[tuple[str, Checker]] | None
) -> Callable[..., None]:
    """``init`` followed by the check of ``cls``'s layer-typed fields (``checks``; None:
    resolved at the first construction)."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal checks
        init(self, *args, **kwargs)
        if checks is None:  # resolved at the first construction, once
            checks = field_checks(cls, complete=False) or []
        fields = self.__dict__
        for name, check in checks:
            found = check(fields.get(name))
            if found is not None:
                raise _spec_error(cls, name, *found)

    return __init__


def field_checks(cls: type, *, complete: bool) -> list[tuple[str, Checker]] | None:
    """One checker per field of ``cls`` whose annotation names a layer type.

    With ``complete``, None if some annotation does not resolve (yet); otherwise a field whose
    annotation does not resolve is not checked.
    """
    from diffprog._parameterized import Parameterized

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation
        if complete:
            return None
        hints = _some_hints(cls)
    checks = []
    for f in dataclasses.fields(cls):
        if f.name in hints:
            check = _checker(hints[f.name], Parameterized)
            if check is not None:
                checks.append((f.name, check))
    return checks


def _some_hints(cls: type) -> dict[str, Any]:
    """The annotations of ``cls`` that resolve, one by one; one that does not (a name defined
    inside a function, under ``from __future__ import annotations``) is left out."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        globalns = vars(module) if module is not None else {}
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            try:
                if isinstance(annotation, str):
                    annotation = eval(annotation, globalns, dict(vars(klass)))
                hints[name] = annotation
            except Exception:
                hints.pop(name, None)
    return hints


def _checker(tp: Any, layer: type) -> Checker | None:
    """The checker of annotation ``tp``, or None if it names no layer type (or is not
    understood: then anything is accepted, as without the check)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _checker(args[0], layer)
    if origin is typing.Union or origin is types.UnionType:
        return _union(args, layer)
    if origin is None:
        if isinstance(tp, type) and issubclass(tp, layer):
            return _union((tp,), layer)
        return None
    if origin in _SEQUENCES or origin in _MAPPINGS:
        return _union((tp,), layer)
    return None


def _union(members: tuple[Any, ...], layer: type) -> Checker | None:
    """The checker of ``members[0] | members[1] | ...``: a value that is an instance of one
    plain class among them, or a container whose items pass, is fine; a spec that is none of
    them is the error."""
    plain: list[type] = []
    containers: list[tuple[type, Checker]] = []
    for member in members:
        origin = typing.get_origin(member)
        if member is None or member is type(None):
            plain.append(type(None))
        elif origin is None and isinstance(member, type):
            plain.append(member)
        elif origin in _SEQUENCES or origin in _MAPPINGS:
            items = _items(origin, typing.get_args(member), layer)
            if items is None:  # a container of anything
                plain.append(_SEQUENCES.get(origin) or _MAPPINGS[origin])
            else:
                containers.append((_SEQUENCES.get(origin) or _MAPPINGS[origin], items))
        else:
            return None  # Callable, Literal, a TypeVar...: accept anything
    if not containers and not any(issubclass(t, layer) for t in plain):
        return None
    accepted = tuple(plain)
    expected = " or ".join(_expected_name(m) for m in members if m is not type(None))

    def check(value: Any) -> Found | None:
        if isinstance(value, accepted):
            return None
        for kind, items in containers:
            # A list given for a tuple[...] field (or the reverse) is looked into all the same:
            # what matters is whether a spec sits where a layer belongs, not the container.
            if isinstance(value, kind) or (
                kind in _SEQUENCE_KINDS and isinstance(value, (list, tuple))
            ):
                return items(value)
        return ([], value, expected) if _is_spec(value) else None

    return check


def _items(origin: Any, args: tuple[Any, ...], layer: type) -> Checker | None:
    """The checker of a container's items (by index, or by key for a mapping)."""
    if origin in _MAPPINGS:
        value_check = _checker(args[1], layer) if len(args) == 2 else None
        if value_check is None:
            return None
        checks_values: Checker = value_check

        def check_mapping(value: Any) -> Found | None:
            for key, item in value.items():
                found = checks_values(item)
                if found is not None:
                    found[0].insert(0, ("key", key))
                    return found
            return None

        return check_mapping
    if not args:
        return None
    per_position = origin is tuple and args[-1] is not Ellipsis
    # tuple[A, B]: one checker per position; list[A], tuple[A, ...]: one for all
    positional = [_checker(a, layer) for a in (args if per_position else args[:1])]
    if all(c is None for c in positional):
        return None

    def check_sequence(value: Any) -> Found | None:
        for index, item in enumerate(value):
            if not per_position:
                check = positional[0]
            else:
                check = positional[index] if index < len(positional) else None
            found = check(item) if check is not None else None
            if found is not None:
                found[0].insert(0, ("index", index))
                return found
        return None

    return check_sequence


def _is_spec(value: Any) -> bool:
    """Whether ``value`` is a spec: not a model, and with a ``sample`` method (as
    ``diffprog.sample`` requires)."""
    from diffprog._parameterized import Parameterized

    return not isinstance(value, (Parameterized, type)) and callable(
        getattr(type(value), "sample", None)
    )


def _expected_name(tp: Any) -> str:
    """``Linear``, ``list[Linear]``, ``dict[str, Linear]``: an annotation as written."""
    if tp is Ellipsis:
        return "..."
    if tp is None or tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is None:
        return tp.__qualname__ if isinstance(tp, type) else repr(tp).replace("typing.", "")
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_expected_name(a) for a in typing.get_args(tp))
    name = getattr(origin, "__qualname__", repr(origin))
    return f"{name}[{', '.join(_expected_name(a) for a in typing.get_args(tp))}]"


def _spec_error(
    cls: type, name: str, keys: list[PathKey], spec: Any, expected: str
) -> UnsampledSpecError:
    text = repr(spec)
    if len(text) > 60:
        text = text[:57] + "..."
    where = render_path([("attr", name), *keys])
    return UnsampledSpecError(
        f"field `{where}` of {cls.__qualname__} expects a {expected} but got {text}",
        f"Did you mean `sample({type(spec).__qualname__}(...))`? Sample a spec into a layer "
        "before building the model; to keep a spec on purpose, annotate the field with the "
        "spec's type (or Any).",
    )
