"""Per-class flatten, replace and rebuild functions, generated once per class from its fields.

Why generate code: a model is traversed at every training step, and the generic loop over a
class's fields (``Node.flatten``/``Node.replace``) pays for a list of children and a call per
child. A function unrolled over the fields (what ``dataclasses`` itself does for ``__init__``)
reads each field from the instance ``__dict__`` and handles the common cases inline: a
Parameter (taken from the stream), a static value, a function already found to hold nothing.
Anything else goes to the node of its type, as in the generic loop. It measured about half the
cost of the generic loops (benchmarks/README.md).

Generated code is ordinary code to read and debug. Each function is named after its class
(``<replace of Linear>``) and its source is registered with ``linecache``, so tracebacks and
``pdb`` show its lines and ``inspect.getsource`` returns it::

    import inspect
    from diffprog._nodes import node_for
    print(inspect.getsource(node_for(Linear).replace))
"""

from __future__ import annotations

import itertools
import linecache
from collections.abc import Callable
from typing import Any

import torch

from diffprog._errors import ModelError, PathKey

__all__ = ["make_flatten", "make_rebuild", "make_replace"]


def _plain(name: str) -> str:
    """The test, in generated code, that the field value ``name`` (of type ``t``) is static: a
    static type, a plain Python function (checked once, then remembered), or a builtin bound
    to no object (``torch.tanh``)."""
    return (
        f"t in STATIC or (t is BUILTIN and type({name}.__self__) in UNBOUND)"
        f" or (t is FUNCTION and {name} in PLAIN)"
    )


def make_flatten(cls: type, keys: tuple[PathKey, ...], env: dict[str, Any]) -> Callable[..., None]:
    """``flatten(value, out)`` for instances of ``cls``, whose fields (in ``__dict__``) are
    ``keys`` (``("attr", name)`` or ``("inline", name)``): appends their parameters to ``out``."""
    lines = ["def flatten(value, out):", "    d = value.__dict__", "    try:"]
    for key in keys:
        name = key[1]
        lines += [
            f"        key = {key!r}",
            f"        child = d[{name!r}]",
            "        t = type(child)",
            "        if t is Parameter:",
            "            out.append(child)",
            f"        elif not ({_plain('child')}):",
            "            (CACHE.get(t) or node_for(t)).flatten(child, out)",
        ]
    lines += _error_path(keys)
    return _compile("flatten", cls, lines, env)


def make_replace(
    cls: type, keys: tuple[PathKey, ...], cached: tuple[str, ...], env: dict[str, Any]
) -> Callable[..., Any]:
    """``replace(value, stream)`` for instances of ``cls`` (fields as for :func:`make_flatten`):
    ``value`` itself if no parameter inside changed, else a copy with the new fields (made by
    the same lines as :func:`make_rebuild`'s)."""
    lines = [
        "def replace(value, stream):",
        "    d = value.__dict__",
        "    take = stream.take",
        "    try:",
    ]
    for key in keys:
        name = key[1]
        old, new = f"old_{name}", f"new_{name}"
        lines += [
            f"        key = {key!r}",
            f"        {old} = d[{name!r}]",
            f"        t = type({old})",
            "        if t is Parameter:",
            f"            {new} = take({old})",
            f"        elif {_plain(old)}:",
            f"            {new} = {old}",
            "        else:",
            f"            {new} = (CACHE.get(t) or node_for(t)).replace({old}, stream)",
        ]
    lines += _error_path(keys)
    same = " and ".join(f"new_{n} is old_{n}" for _, n in keys) or "True"
    lines += [
        # (Not while torch.compile traces: see ParamStream.traced.)
        f"    if not stream.traced and {same}:",
        "        return value",
        *_copy_lines(keys, cached, "d", [f"new_{n}" for _, n in keys]),
        "    # keep(): the version built first, if this value is shared at several paths",
        "    return stream.keep(value, built)",
    ]
    return _compile("replace", cls, lines, {**env, "CLS": cls, "object_new": object.__new__})


def make_rebuild(
    cls: type, keys: tuple[PathKey, ...], cached: tuple[str, ...], env: dict[str, Any]
) -> Callable[..., Any]:
    """``rebuild(value, children)`` for instances of ``cls`` (fields as for
    :func:`make_flatten`): a copy of ``value`` whose fields are ``children``, in order.

    ``cached`` names the class's ``functools.cached_property`` attributes, dropped from the
    copy: they were computed from the old fields.
    """
    names = [name for _, name in keys]
    news = [f"new_{name}" for name in names]
    lines = [
        "def rebuild(value, children):",
        *([f"    {', '.join(news)}, = children"] if names else []),
        *_copy_lines(keys, cached, "value.__dict__", news),
        "    return built",
    ]
    return _compile("rebuild", cls, lines, {**env, "CLS": cls, "object_new": object.__new__})


def _copy_lines(
    keys: tuple[PathKey, ...], cached: tuple[str, ...], state: str, children: list[str]
) -> list[str]:
    """Lines making ``built``: a copy of the instance whose ``__dict__`` is ``state`` (an
    expression), with the fields ``keys`` set to the variables ``children``.

    (Every variable of the generated code that a field names starts with ``old_`` or
    ``new_``, and no other does, so that no field name can clash with another variable.)
    """
    return [
        "    # Bypass __init__/__post_init__ and the frozen __setattr__: the value was validated",
        "    # when it was built, and only parameter slots change. Attributes set in",
        "    # __post_init__ are kept, cached_property values (computed from the old fields) not.",
        "    built = object_new(CLS)",
        "    built_dict = built.__dict__",
        f"    built_dict.update({state})",
        *(f"    built_dict[{n!r}] = {child}" for (_, n), child in zip(keys, children, strict=True)),
        *(f"    built_dict.pop({name!r}, None)" for name in cached),
    ]


def _error_path(keys: tuple[PathKey, ...]) -> list[str]:
    """The end of the ``try`` around the fields: an error from a field gets the field's key
    (``key``, set before each field) in its path."""
    return [
        *(["        pass  # a class without fields"] if not keys else []),
        "    except ModelError as e:",
        "        e.push(*key)",
        "        raise",
    ]


_COUNT = itertools.count()


def _compile(kind: str, cls: type, lines: list[str], env: dict[str, Any]) -> Callable[..., Any]:
    """Compile the function ``kind`` defined by ``lines``, named ``<kind of Class>``, and
    register its source so that tracebacks, ``pdb`` and ``inspect`` can show it."""
    name = f"<{kind} of {cls.__qualname__}>"
    # Unique per class (two classes may share a qualified name: a class made in a function).
    filename = f"<diffprog {kind} of {cls.__module__}.{cls.__qualname__} #{next(_COUNT)}>"
    source = "\n".join(lines) + "\n"
    namespace: dict[str, Any] = {"Parameter": torch.nn.Parameter, "ModelError": ModelError, **env}
    exec(compile(source, filename, "exec"), namespace)
    fn = namespace[kind]
    fn.__code__ = fn.__code__.replace(co_name=name, co_qualname=name)
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = cls.__module__
    # mtime None: linecache.checkcache() keeps the entry (there is no file to compare with).
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return fn  # type: ignore[no-any-return]
