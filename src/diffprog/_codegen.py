"""Per-class flatten and replace functions, generated once per class (the derived plan).

Why generate code: a model is traversed at every training step, and a generic loop over a
class's fields pays for the loop, a dict of changes and a method call per parameter. A
function unrolled over the class's fields (what ``dataclasses`` itself does for ``__init__``)
halves the cost of a round trip. The generated code only reads fields from the instance
``__dict__`` and handles the common cases inline (a Parameter, a static value, a function
already found to hold nothing); anything else goes through the node of its type, exactly as
in the generic loop.

An error from a field must name that field in its path. Rather than record the current field
at every step, the handler looks up the line the error came from (each field has its own
lines) in a table built with the code: the hot path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffprog._errors import ModelError

__all__ = ["make_flatten", "make_replace"]


def make_flatten(names: tuple[str, ...], env: dict[str, Any]) -> Callable[..., None]:
    """``flatten(value, out)`` for a class with fields ``names`` (read from __dict__)."""
    lines = ["def flatten(value, out):", "    d = value.__dict__"]
    fields = _per_field(
        lines,
        names,
        lambda k, name: [
            f"        c = d[{name!r}]; t = type(c)",
            "        if t is Parameter: out.append(c)",
            "        elif t in STATIC or (t is FUNCTION and c in PLAIN): pass",
            "        else: (CACHE.get(t) or node_for(t)).flatten(c, out)",
        ],
    )
    return _compile("flatten", lines, {**env, "FIELDS": fields})


def make_replace(
    cls: type, names: tuple[str, ...], env: dict[str, Any], cached: tuple[str, ...] = ()
) -> Callable[..., Any]:
    """``replace(value, stream)`` for instances of exactly ``cls``, with fields ``names`` (read
    from __dict__).

    ``cached`` names the class's ``functools.cached_property`` attributes, dropped from the
    rebuilt value.
    """
    lines = [
        "def replace(value, stream):",
        "    d = value.__dict__",
        # The optimistic stream's take() (the training-step fast path) is inlined below;
        # any other stream's is called.
        "    if stream._optimistic:",
        "        take = None",
        "        olds = stream._olds",
        "        pull = stream._next",
        "    else:",
        "        take = stream.take",
        # A sub-model met again (shared at several paths) gets the version built before.
        "        built = stream._rebuilt(value)",
        "        if built is not None:",
        "            return built",
    ]
    fields = _per_field(
        lines,
        names,
        lambda k, name: [
            f"        c{k} = d[{name!r}]; t = type(c{k})",
            "        if t is Parameter:",
            f"            if take is None: n{k} = pull(); olds.append(c{k})",
            f"            else: n{k} = take(c{k})",
            f"        elif t in STATIC or (t is FUNCTION and c{k} in PLAIN): n{k} = c{k}",
            f"        else: n{k} = (CACHE.get(t) or node_for(t)).replace(c{k}, stream)",
        ],
    )
    same = " and ".join(f"n{k} is c{k}" for k in range(len(names))) or "True"
    lines += [
        f"    if {same}:",
        "        return value",
        # Bypass __init__/__post_init__ and the frozen __setattr__: the value was validated
        # when it was built, and only parameter slots change. Attributes set in
        # __post_init__ are kept; cached_property values, computed from the old fields, not.
        "    new = object_new(CLS)",
        "    nd = new.__dict__",
        "    nd.update(d)",
    ]
    lines += [f"    nd[{name!r}] = n{k}" for k, name in enumerate(names)]
    lines += [f"    nd.pop({name!r}, None)" for name in cached]
    lines += [
        "    if take is not None:",
        "        stream._keep(value, new)",
        "    return new",
    ]
    return _compile("replace", lines, {**env, "FIELDS": fields, "CLS": cls})


def _per_field(
    lines: list[str], names: tuple[str, ...], code: Callable[[int, str], list[str]]
) -> dict[int, str]:
    """Append a ``try`` block running ``code(k, name)`` for each field to ``lines``.

    Returns the table from line number to field that its ``except`` uses to name the field an
    error came from: no bookkeeping on the hot path.
    """
    fields: dict[int, str] = {}
    lines.append("    try:")
    for k, name in enumerate(names):
        first = len(lines) + 1  # the line number of the next line
        lines += code(k, name)
        fields.update(dict.fromkeys(range(first, len(lines) + 1), name))
    lines += [
        "        pass",  # a class without fields
        "    except ModelError as e:",
        "        e.push('attr', FIELDS[e.__traceback__.tb_lineno])",
        "        raise",
    ]
    return fields


def _compile(name: str, lines: list[str], env: dict[str, Any]) -> Callable[..., Any]:
    namespace: dict[str, Any] = {
        "Parameter": torch.nn.Parameter,
        "ModelError": ModelError,
        "object_new": object.__new__,
        **env,
    }
    exec(compile("\n".join(lines), f"<diffprog generated {name}>", "exec"), namespace)
    return namespace[name]  # type: ignore[no-any-return]
