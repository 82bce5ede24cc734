"""Per-class flatten and replace functions, generated once per class (the derived plan).

Why generate code: a model is traversed at every training step, and a generic loop over a
class's fields pays for the loop, a dict of changes and a method call per parameter. A
function unrolled over the class's fields (what ``dataclasses`` itself does for ``__init__``)
halves the cost of a round trip. The generated code only reads fields from the instance
``__dict__`` and handles the two common cases inline (a Parameter, a static value); anything
else goes through the node of its type, exactly as in the generic loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffprog._errors import ModelError

__all__ = ["make_flatten", "make_replace"]


def make_flatten(names: tuple[str, ...], env: dict[str, Any]) -> Callable[..., None]:
    """``flatten(value, out)`` for a class with fields ``names`` (read from __dict__)."""
    lines = ["def flatten(value, out):", "    d = value.__dict__", "    field = None"]
    lines.append("    try:")
    for name in names:
        lines += [
            f"        field = {name!r}",
            f"        c = d[{name!r}]",
            "        t = type(c)",
            "        if t is Parameter:",
            "            out.append(c)",
            "        elif t not in STATIC:",
            "            (CACHE.get(t) or node_for(t)).flatten(c, out)",
        ]
    lines += [
        "        pass",  # a class without fields
        "    except ModelError as e:",
        "        e.push('attr', field)",
        "        raise",
    ]
    return _compile("flatten", lines, env)


def make_replace(
    names: tuple[str, ...], env: dict[str, Any], cached: tuple[str, ...] = ()
) -> Callable[..., Any]:
    """``replace(value, stream)`` for a class with fields ``names`` (read from __dict__).

    ``cached`` names the class's ``functools.cached_property`` attributes, dropped from the
    rebuilt value.
    """
    lines = [
        "def replace(value, stream):",
        "    d = value.__dict__",
        # The optimistic stream's take() (the training-step fast path) is inlined below;
        # any other stream's is called.
        "    if type(stream) is OptimisticStream:",
        "        take = None",
        "        olds = stream._olds",
        "        params = stream._params",
        "    else:",
        "        take = stream.take",
        # A sub-model met again (shared at several paths) gets the version built before.
        "        built = stream._built.get(id(value))",
        "        if built is not None:",
        "            return built",
        "    field = None",
        "    try:",
    ]
    for k, name in enumerate(names):
        lines += [
            f"        field = {name!r}",
            f"        c{k} = d[{name!r}]",
            f"        t = type(c{k})",
            "        if t is Parameter:",
            "            if take is None:",
            f"                n{k} = params[len(olds)]",
            f"                olds.append(c{k})",
            "            else:",
            f"                n{k} = take(c{k})",
            "        elif t in STATIC:",
            f"            n{k} = c{k}",
            "        else:",
            f"            n{k} = (CACHE.get(t) or node_for(t)).replace(c{k}, stream)",
        ]
    lines += [
        "        pass",  # a class without fields
        "    except ModelError as e:",
        "        e.push('attr', field)",
        "        raise",
    ]
    same = " and ".join(f"n{k} is c{k}" for k in range(len(names))) or "True"
    lines += [
        f"    if {same}:",
        "        return value",
        # Bypass __init__/__post_init__ and the frozen __setattr__: the value was validated
        # when it was built, and only parameter slots change. Attributes set in
        # __post_init__ are kept; cached_property values, computed from the old fields, not.
        "    new = object_new(type(value))",
        "    nd = new.__dict__",
        "    nd.update(d)",
    ]
    lines += [f"    nd[{name!r}] = n{k}" for k, name in enumerate(names)]
    lines += [f"    nd.pop({name!r}, None)" for name in cached]
    lines += [
        "    if take is not None:",
        "        stream._built[id(value)] = new",
        "    return new",
    ]
    return _compile("replace", lines, env)


def _compile(name: str, lines: list[str], env: dict[str, Any]) -> Callable[..., Any]:
    namespace: dict[str, Any] = {
        "Parameter": torch.nn.Parameter,
        "ModelError": ModelError,
        "object_new": object.__new__,
        **env,
    }
    exec(compile("\n".join(lines), f"<diffprog generated {name}>", "exec"), namespace)
    return namespace[name]  # type: ignore[no-any-return]
