"""How each kind of value is traversed: the registry of Parameterized instances.

Every type a model may contain maps to one *node* object. A node describes the children of a
value once, with :meth:`Node.children` (the sub-values with their path keys, in order) and
:meth:`Node.rebuild` (the value again, from new children). Every traversal derives from that
description, so that all of them agree on the order:

* ``flatten`` (append the parameters to a list, depth first) and ``replace`` (take new ones
  from a :class:`~diffprog.ParamStream`) loop over the children; a dataclass's generated
  functions (``_codegen.py``) are unrolled from the same field keys;
* ``walk`` (names and paths), ``substitute`` and ``repr`` read the same children.

The node of a type is resolved once and cached, so a traversal costs one dict lookup per value.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import gc
import operator
import types
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as torch_pytree

from diffprog._codegen import make_flatten, make_rebuild, make_replace
from diffprog._errors import (
    HiddenParameterError,
    InstanceError,
    ModelError,
    ParameterCountError,
    PathKey,
)

if TYPE_CHECKING:
    from diffprog._stream import ParamStream

__all__ = [
    "Node",
    "flatten_into",
    "node_for",
    "register_parameterized",
    "replace_value",
    "scan_children",
    "scan_hidden",
    "unique",
]

Parameter = torch.nn.Parameter
_FUNCTION = types.FunctionType
_BUILTIN = types.BuiltinFunctionType  # torch.tanh, abs; and a method of a C object, p.mul
# The owners (``__self__``) of builtins that are plain functions: None (torch.tanh), a module
# (abs, math.sin). A builtin bound to anything else (a Parameter's p.mul) is looked into.
_UNBOUND: frozenset[type] = frozenset({type(None), types.ModuleType})


class Node:
    """How values of one type are traversed.

    A subclass describes a value's children once: :meth:`values` (in traversal order),
    :meth:`keys` (their path keys, asked for only by errors, names and ``repr``) and
    :meth:`rebuild`. Flatten, replace and :meth:`children` follow from them. Leaves and opaque
    values override flatten and replace instead.
    """

    __slots__ = ()

    #: True for leaves that can never hold a parameter (numbers, strings, constant tensors...).
    static = False

    def values(self, value: Any) -> Sequence[Any]:
        """The direct sub-values of ``value``, in traversal order."""
        return ()

    def keys(self, value: Any) -> Sequence[PathKey]:
        """The path keys of :meth:`values`, in the same order."""
        return ()

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        """A copy of ``value`` with new children (in :meth:`values` order)."""
        return value

    def children(self, value: Any) -> list[tuple[PathKey, Any]]:
        """The sub-values of ``value`` with their path keys, in traversal order."""
        return list(zip(self.keys(value), self.values(value), strict=True))

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        """Append the parameters inside ``value`` to ``out``, depth first.

        A parameter met twice (a tie) is appended twice; ``flatten_parameters`` removes the
        repeats once at the end, which is cheaper than checking at every parameter.
        """
        index = -1
        try:
            for index, child in enumerate(self.values(value)):  # noqa: B007 (read by except)
                t = type(child)  # flatten_into(child, out), inlined: one frame less per child
                if t is Parameter:
                    out.append(child)
                else:
                    (_CACHE.get(t) or node_for(t)).flatten(child, out)
        except ModelError as e:
            self._push(e, value, index)
            raise

    def replace(self, value: Any, stream: ParamStream) -> Any:
        """Return ``value`` with its parameters taken from ``stream``, in flatten order.

        ``value`` itself comes back if no parameter inside it changed (sharing of unchanged
        parts); a rebuilt value goes through ``stream.keep``, so that a value met at several
        paths stays one object.
        """
        old = self.values(value)
        new: list[Any] = []
        try:
            for child in old:
                t = type(child)  # replace_value(child, stream), inlined
                if t is Parameter:
                    new.append(stream.take(child))
                else:
                    new.append((_CACHE.get(t) or node_for(t)).replace(child, stream))
        except ModelError as e:
            self._push(e, value, len(new))  # the child that failed is the next one
            raise
        if not stream.traced and all(map(operator.is_, new, old)):
            return value  # (not while torch.compile traces: see ParamStream.traced)
        return stream.keep(value, self.rebuild(value, new))

    def _push(self, error: ModelError, value: Any, index: int) -> None:
        """Add the key of child ``index`` (-1: the error came before the first child) to the
        path of ``error``."""
        if index >= 0:
            error.push(*self.keys(value)[index])


class _StaticNode(Node):
    """A leaf that holds no parameter: numbers, strings, dtypes, functions, constant tensors."""

    __slots__ = ()
    static = True

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        return None

    def replace(self, value: Any, stream: ParamStream) -> Any:
        return value


STATIC = _StaticNode()


class _ParameterNode(Node):
    """A ``Parameter`` (or a subclass of it): the only leaf that is flattened."""

    __slots__ = ()

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        out.append(value)

    def replace(self, value: Any, stream: ParamStream) -> Any:
        return stream.take(value)


PARAMETER = _ParameterNode()


class _TensorSubclassNode(Node):
    """A tensor of a wrapper subclass (``DTensor``): a parameter when torch counts it as one.

    ``torch.nn.Parameter(t)`` of such a tensor is not a ``Parameter`` subclass: torch marks the
    instance (``_is_param``) and ``isinstance(t, Parameter)`` reads the mark, so whether it is a
    parameter or a constant is decided per value, not per type.
    """

    __slots__ = ()

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        if isinstance(value, Parameter):
            out.append(value)

    def replace(self, value: Any, stream: ParamStream) -> Any:
        return stream.take(value) if isinstance(value, Parameter) else value


TENSOR_SUBCLASS = _TensorSubclassNode()


class FieldsNode(Node):
    """A dataclass (every ``Parameterized``): its fields in declaration order.

    Built once per class. Its field keys (``("attr", name)``, or ``("inline", name)`` for a
    field left out of ``state_dict`` names) are the description of its children; for the usual
    classes (fields in ``__dict__``) ``flatten``, ``replace`` and ``rebuild`` are functions
    generated from them (see ``_codegen.py``), otherwise the loops of :class:`Node`.
    """

    __slots__ = (
        "cached",
        "cls",
        "field_keys",
        "flatten",
        "names",
        "rebuild",
        "replace",
        "uses_dict",
    )

    def __init__(self, cls: type, names: tuple[str, ...], inline: frozenset[str] = frozenset()):
        self.cls = cls
        self.names = names
        self.field_keys: tuple[PathKey, ...] = tuple(
            ("inline" if n in inline else "attr", n) for n in names
        )
        self.cached = tuple(
            name
            for c in cls.__mro__
            for name, attr in vars(c).items()
            if isinstance(attr, functools.cached_property)
        )
        # Instances keep their fields in __dict__ (not __slots__): read it directly.
        # (Empty __slots__, as in Generic and Protocol, hold nothing: they don't count.)
        self.uses_dict = cls.__dictoffset__ != 0 and not any(
            vars(c).get("__slots__") for c in cls.__mro__[:-1]
        )
        if self.uses_dict and all(n.isidentifier() for n in names):
            self.rebuild = make_rebuild(cls, self.field_keys, self.cached, {})  # type: ignore[method-assign]
            env = {
                "STATIC": _STATIC_SEEN,
                "CACHE": _CACHE,
                "node_for": node_for,
                "FUNCTION": _FUNCTION,
                "PLAIN": PLAIN_FUNCTIONS,
                "BUILTIN": _BUILTIN,
                "UNBOUND": _UNBOUND,
            }
            self.flatten = make_flatten(cls, self.field_keys, env)  # type: ignore[method-assign]
            self.replace = make_replace(cls, self.field_keys, self.cached, env)  # type: ignore[method-assign]
        else:
            self.rebuild = self._rebuild_with_setattr  # type: ignore[method-assign]
            self.flatten = types.MethodType(Node.flatten, self)  # type: ignore[method-assign]
            self.replace = types.MethodType(Node.replace, self)  # type: ignore[method-assign]

    def values(self, value: Any) -> Sequence[Any]:
        return [getattr(value, name) for name in self.names]

    def keys(self, value: Any) -> Sequence[PathKey]:
        return self.field_keys

    def _rebuild_with_setattr(self, value: Any, children: list[Any]) -> Any:
        """``rebuild`` for a class with fields in ``__slots__`` (or names that are not
        identifiers): a copy bypassing ``__init__`` and the frozen ``__setattr__``."""
        new = object.__new__(type(value))
        if self.uses_dict:
            new.__dict__.update(value.__dict__)  # attributes set in __post_init__
            for name in self.cached:
                new.__dict__.pop(name, None)
        for name, child in zip(self.names, children, strict=True):
            object.__setattr__(new, name, child)
        return new


class _SequenceNode(Node):
    """``list`` and ``tuple``."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def values(self, value: Any) -> Sequence[Any]:
        return value  # type: ignore[no-any-return]

    def keys(self, value: Any) -> Sequence[PathKey]:
        return [("index", i) for i in range(len(value))]

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        return children if self.cls is list else tuple(children)


class _NamedTupleNode(Node):
    """A ``typing.NamedTuple`` / ``collections.namedtuple``: its fields by name."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def values(self, value: Any) -> Sequence[Any]:
        return value  # type: ignore[no-any-return]

    def keys(self, value: Any) -> Sequence[PathKey]:
        return [("attr", name) for name in value._fields]

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        return type(value)(*children)


class _DictNode(Node):
    """``dict``, ``OrderedDict`` and ``defaultdict``, in insertion order."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def values(self, value: Any) -> Sequence[Any]:
        return list(value.values())

    def keys(self, value: Any) -> Sequence[PathKey]:
        return [("key", k) for k in value]

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        items = zip(value.keys(), children, strict=True)
        if isinstance(value, defaultdict):
            return type(value)(value.default_factory, items)
        return type(value)(items)


class _PytreeNode(Node):
    """A type registered with ``torch.utils._pytree`` (e.g. ``collections.deque``)."""

    __slots__ = ("flatten_fn", "unflatten_fn")

    def __init__(self, flatten_fn: Callable[..., Any], unflatten_fn: Callable[..., Any]) -> None:
        self.flatten_fn = flatten_fn
        self.unflatten_fn = unflatten_fn

    def values(self, value: Any) -> Sequence[Any]:
        children, _ = self.flatten_fn(value)
        return list(children)

    def keys(self, value: Any) -> Sequence[PathKey]:
        return [("index", i) for i in range(len(self.values(value)))]

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        _, context = self.flatten_fn(value)
        return self.unflatten_fn(children, context)


class HandWrittenNode(Node):
    """A hand-written instance: ``flatten(value) -> list`` and ``replace(value, stream)``.

    Its children are the parameters its ``flatten`` lists (by position). Ties and checks still
    hold: before the instance's own ``replace`` runs, each listed parameter is taken from the
    model's stream (so a parameter met earlier in the model gets the same replacement), and
    the instance reads the results from a stream of its own.
    """

    __slots__ = ("cls", "flatten_fn", "replace_fn", "unknown_fields")

    def __init__(
        self,
        cls: type,
        flatten_fn: Callable[[Any], list[torch.Tensor]],
        replace_fn: Callable[[Any, ParamStream], Any],
        unknown_fields: tuple[str, ...] = (),
    ) -> None:
        self.cls = cls
        self.flatten_fn = flatten_fn
        self.replace_fn = replace_fn
        # Fields a subclass added below the class whose hand-written methods it inherits.
        self.unknown_fields = unknown_fields

    def own(self, value: Any) -> list[torch.Tensor]:
        """The parameter list the instance declares, checked to hold only tensors."""
        params = list(self.flatten_fn(value))
        for index, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise InstanceError(
                    f"the flatten_parameters of {self.cls.__name__} returned a "
                    f"{type(p).__name__} at position {index}",
                    "A hand-written flatten_parameters must return a list of Parameters.",
                )
        if self.unknown_fields:
            self._check_unknown_fields(value, params)
        return params

    def _check_unknown_fields(self, value: Any, params: list[torch.Tensor]) -> None:
        """A subclass's new field holding a parameter that the inherited instance does not
        list would silently not be trained: refuse it."""
        listed = {id(p) for p in params}
        for name in self.unknown_fields:
            found: list[Parameter] = []
            flatten_into(getattr(value, name), found)
            if any(id(p) not in listed for p in found):
                err = InstanceError(
                    f"{type(value).__qualname__} adds this field, which holds a parameter that "
                    f"the hand-written instance it inherits does not list",
                    f"Define flatten_parameters and replace_own_parameters in "
                    f"{type(value).__qualname__} too (they may call the base's through super()).",
                )
                err.push("attr", name)
                raise err

    def values(self, value: Any) -> Sequence[Any]:
        return self.own(value)

    def keys(self, value: Any) -> Sequence[PathKey]:
        return [("index", i) for i in range(len(self.own(value)))]

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        # A plain tensor the instance lists (put there by a replace with plain tensors) is a
        # constant, as in a derived instance: only Parameters are flattened.
        out.extend(p for p in self.own(value) if isinstance(p, Parameter))

    def replace(self, value: Any, stream: ParamStream) -> Any:
        old = self.own(value)
        if not [p for p in old if isinstance(p, Parameter)]:  # nothing to replace
            return value
        return stream.keep(value, self._run(value, stream.substream(_take_listed(old, stream))))

    def _run(self, value: Any, own: ParamStream) -> Any:
        """The instance's own replace, reading its new parameters from ``own`` (a stream of
        its own), checked to read them all and to keep the value's type."""
        new = own.params
        name = self.cls.__name__
        try:
            result = self.replace_fn(value, own)
        except ParameterCountError as e:
            raise InstanceError(
                f"the replace_own_parameters of {name} asked for more parameters than its "
                f"flatten_parameters lists ({len(new)})",
                "Make both methods walk the same parameters in the same order.",
            ) from e
        if own.remaining:
            raise InstanceError(
                f"the replace_own_parameters of {name} used {len(new) - own.remaining} of "
                f"the {len(new)} parameters its flatten_parameters lists",
                "Make both methods walk the same parameters in the same order.",
            )
        own.verify()
        if type(result) is not type(value):
            # Hasktorch's replaceOwnParameters keeps the type. Typically an instance of a base
            # class rebuilt a subclass as the base, losing what the subclass adds.
            raise InstanceError(
                f"the replace of {name} turned a {type(value).__qualname__} into a "
                f"{type(result).__qualname__}",
                f"Rebuild the value's own type (type(value)(...) or dataclasses.replace), or "
                f"give {type(value).__qualname__} an instance of its own.",
            )
        return result


def _take_listed(old: list[torch.Tensor], stream: ParamStream) -> list[torch.Tensor]:
    """The replacements, from the model's stream, of the parameters a hand-written instance
    lists (a tied one gets the replacement of its first path); a constant stays as it is."""
    new: list[torch.Tensor] = []
    for index, p in enumerate(old):
        if not isinstance(p, Parameter):  # the instance reads it back as is
            new.append(p)
            continue
        try:
            new.append(stream.take(p))
        except ModelError as e:
            e.push("index", index)
            raise
    return new


class _ModuleNode(Node):
    """A ``torch.nn.Module``: allowed as a parameter-free function (``nn.ReLU()``), never with
    parameters, which diffprog would otherwise silently leave out of training."""

    __slots__ = ()
    _FIX = (
        "diffprog cannot see parameters inside a torch.nn.Module. Use the diffprog.nn layer of "
        "the same name, or copy its weights into Parameter fields of a Parameterized class."
    )

    def _check(self, value: Any) -> None:
        for name, _ in value.named_parameters():
            raise HiddenParameterError(
                f"a torch.nn.Module ({type(value).__name__}) holding parameter {name!r}",
                self._FIX,
            )
        found = scan_hidden(value)  # attributes torch does not register (a list of them)
        if found is not None:
            path, what = found
            err = HiddenParameterError(
                f"{what} hidden in a torch.nn.Module ({type(value).__name__})", self._FIX
            )
            for key in reversed(path):
                err.push(*key)
            raise err

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        self._check(value)

    def replace(self, value: Any, stream: ParamStream) -> Any:
        self._check(value)
        return value


# Values that hold nothing: static in a model, and leaves of the hidden-parameter scan.
_PLAIN_VALUES: tuple[type, ...] = (
    int,
    float,
    complex,
    bool,
    str,
    bytes,
    type(None),
    type(Ellipsis),
    type(NotImplemented),
    slice,
    range,
    torch.dtype,
    torch.device,
    torch.Size,
    torch.layout,
    torch.memory_format,
    torch.Generator,
)


# What an opaque value holds is looked at completely (no budget, no depth limit), each time the
# value is flattened or replaced: a Parameter that a fixed budget missed would silently not be
# trained. A value met twice (sharing, cycles) is looked at once.
#
# Not looked into, by design: classes (their attributes are shared, not part of the value),
# modules and a function's globals (the same), non-Parameter tensors (constants), and objects of
# C types that report no references to Python's garbage collector. Builtin functions and
# methods (``torch.tanh``, ``p.add``) are static at the top of a model (they are its most common
# field, checked at every step), and looked into (``__self__``) inside an opaque value.
_SCAN_LEAVES: frozenset[type] = frozenset(
    {
        *_PLAIN_VALUES,
        types.ModuleType,
        types.CodeType,
        types.FrameType,
        types.WrapperDescriptorType,
        types.MethodDescriptorType,
        types.GetSetDescriptorType,
        types.MemberDescriptorType,
    }
)


def scan_children(v: Any) -> list[tuple[PathKey, Any]] | str | None:
    """What the scan looks at inside ``v``: its children with their path keys, or a text
    saying that ``v`` is itself a parameter holder (found), or None for a leaf.

    Deliberately wider than the nodes' ``children``: the scan looks for what a traversal would
    miss, so it reads every attribute of an object (not only a dataclass's fields) and never
    asks an object's own methods (a hand-written ``flatten_parameters``) what it holds.
    """
    if isinstance(v, Parameter):
        return "a Parameter"
    if isinstance(v, (torch.Tensor, enum.Enum, type)):
        return None
    if isinstance(v, torch.nn.Module):
        for name, _ in v.named_parameters():
            return f"a torch.nn.Module with parameter {name!r}"
        # what torch does not register: the module's own attributes (a list of tensors, a
        # `_cache`), not the bookkeeping every Module has (hooks, `_buffers`: constants), and
        # the sub-modules
        return [(("attr", k), c) for k, c in vars(v).items() if k not in _MODULE_INTERNALS] + [
            (("attr", k), m) for k, m in v._modules.items() if m is not None
        ]
    if isinstance(v, (list, tuple, set, frozenset, deque)):
        return [(("index", i), c) for i, c in enumerate(v)]
    if isinstance(v, dict):
        return [(("key", k), c) for k, c in v.items()]
    if isinstance(v, functools.partial):
        return [
            (("attr", "func"), v.func),
            *((("attr", f"args[{i}]"), a) for i, a in enumerate(v.args)),
            *((("attr", f"keywords[{k!r}]"), a) for k, a in v.keywords.items()),
        ]
    if isinstance(v, types.MethodType):
        return [(("attr", "__self__"), v.__self__), (("attr", "__func__"), v.__func__)]
    if isinstance(v, types.FunctionType):
        cells = v.__closure__ or ()
        return [
            *((("attr", f"__defaults__[{i}]"), d) for i, d in enumerate(v.__defaults__ or ())),
            *((("attr", f"__kwdefaults__[{k!r}]"), d) for k, d in (v.__kwdefaults__ or {}).items()),
            *(
                (("attr", f"<closure {name}>"), _cell_contents(cell))
                for name, cell in zip(v.__code__.co_freevars, cells, strict=True)
            ),
            *((("attr", k), c) for k, c in vars(v).items()),
        ]
    if isinstance(v, (types.BuiltinMethodType, types.MethodWrapperType)):
        owner = getattr(v, "__self__", None)
        return [(("attr", "__self__"), owner)]
    children = [(("attr", k), c) for k, c in getattr(v, "__dict__", {}).items()]
    slots = [s for c in type(v).__mro__ for s in _slot_names(c)]
    children += [(("attr", s), getattr(v, s)) for s in slots if hasattr(v, s)]
    if not children and not hasattr(v, "__dict__") and not slots:
        # A C object: what it refers to, as the garbage collector sees it.
        children = [(("attr", f"<referent {i}>"), c) for i, c in enumerate(gc.get_referents(v))]
    return children


# The attributes torch.nn.Module.__init__ gives every module: its bookkeeping, not the module's
# own data.
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a name not bound yet)
        return None


def _slot_names(cls: type) -> tuple[str, ...]:
    slots = vars(cls).get("__slots__", ())
    names = (slots,) if isinstance(slots, str) else tuple(slots)
    return tuple(n for n in names if n not in ("__dict__", "__weakref__"))


def scan_hidden(value: Any) -> tuple[list[PathKey], str] | None:
    """Look for a Parameter inside an opaque value; return its path and what holds it.

    Depth first with an explicit stack (no recursion limit), each object once.
    """
    # id -> the object, kept alive so that its id cannot be reused by another during the scan
    seen: dict[int, Any] = {}
    # the parent record and key of each object looked into, to rebuild the path of a find
    records: list[tuple[int, PathKey | None]] = []
    stack: list[tuple[Any, int, PathKey | None]] = [(value, -1, None)]
    while stack:
        v, parent, key = stack.pop()
        if id(v) in seen:
            continue
        seen[id(v)] = v
        records.append((parent, key))
        found = scan_children(v)
        if found is None:
            continue
        if isinstance(found, str):
            return _scan_path(records, len(records) - 1), found
        here = len(records) - 1
        stack.extend((c, here, k) for k, c in reversed(found) if type(c) not in _SCAN_LEAVES)
    return None


def _scan_path(records: list[tuple[int, PathKey | None]], index: int) -> list[PathKey]:
    keys: list[PathKey] = []
    while index > 0:
        index, key = records[index]
        keys.append(key)  # type: ignore[arg-type]
    return keys[::-1]


class _OpaqueNode(Node):
    """A value diffprog does not traverse: a plain object, a set, a ``functools.partial``.

    It is kept as it is, after checking (completely, see ``scan_hidden``) that no Parameter
    hides inside.
    """

    __slots__ = ("advice",)

    def __init__(self, advice: str) -> None:
        self.advice = advice

    def _check(self, value: Any) -> None:
        found = scan_hidden(value)
        if found is not None:
            path, what = found
            err = HiddenParameterError(
                f"{what} hidden inside an instance of {type(value).__name__}, which diffprog "
                "does not traverse",
                self.advice,
            )
            for key in reversed(path):
                err.push(*key)
            raise err

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        self._check(value)

    def replace(self, value: Any, stream: ParamStream) -> Any:
        self._check(value)
        return value


class _FunctionNode(_OpaqueNode):
    """A Python function (an activation, a lambda): a static value unless its defaults or
    closure hold a parameter."""

    __slots__ = ()

    def _check(self, value: Any) -> None:
        # The usual function (no closure, immutable static defaults) is settled once and
        # remembered (see PLAIN_FUNCTIONS); the hot loops then skip it as a static value.
        if value in PLAIN_FUNCTIONS:
            return
        if (
            value.__closure__ is None
            and value.__kwdefaults__ is None
            and not value.__dict__
            and all(type(d) in _SCAN_LEAVES for d in value.__defaults__ or ())
        ):
            if len(PLAIN_FUNCTIONS) >= _PLAIN_FUNCTIONS_MAX:  # bounded: lambdas come and go
                PLAIN_FUNCTIONS.clear()
            PLAIN_FUNCTIONS.add(value)
            return
        super()._check(value)


class _BuiltinNode(_OpaqueNode):
    """A builtin (``torch.tanh``, ``abs``) or a method of a C object (``p.mul``, ``p.__add__``):
    static unless it is bound to something holding a parameter."""

    __slots__ = ()

    def _check(self, value: Any) -> None:
        if type(getattr(value, "__self__", None)) in _UNBOUND:
            return
        super()._check(value)


# Python functions found to hold nothing (no closure, no keyword defaults, no attributes,
# defaults of immutable static types): functions are common fields (activations), and
# looking into one at every flatten and replace would cost as much as the rest of a small
# layer. What could change such a function afterwards is assigning its __defaults__,
# __kwdefaults__ or an attribute, which the docs ask not to do to a function inside a model.
PLAIN_FUNCTIONS: set[types.FunctionType] = set()
_PLAIN_FUNCTIONS_MAX = 4096


_OBJECT_ADVICE = (
    "Make its class a diffprog.Parameterized (or a dataclass), register an instance for it "
    "with diffprog.register_parameterized, or give it flatten_parameters and "
    "replace_own_parameters methods."
)
_SET_ADVICE = "Sets are unordered, so their parameters have no stable order: use a tuple or list."
_FUNCTION_ADVICE = (
    "diffprog does not traverse a function's defaults and closure: make the parameter a field "
    "of a Parameterized model (or store the layer itself, which is callable)."
)
_METHOD_ADVICE = (
    "diffprog does not traverse a bound method: store the object itself (a layer is callable) "
    "rather than its method."
)

_STATIC_TYPES: set[type] = {
    *_PLAIN_VALUES,
    # Python functions, builtins (torch.tanh: the most common field of all) and bound methods
    # are not static: they are looked into (the hot loops skip a plain one quickly, see
    # PLAIN_FUNCTIONS and _UNBOUND).
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ModuleType,
}

_CACHE: dict[type, Node] = {}
# The types whose node is STATIC, for a quick membership test in the hot loops.
_STATIC_SEEN: set[type] = set()
_REGISTERED: dict[type, Node] = {}


def _is_default(method: Any) -> bool:
    return bool(getattr(method, "__diffprog_default__", False))


def _defining_level(mro: tuple[type, ...], name: str) -> int:
    """The position in ``mro`` of the class whose own ``__dict__`` defines ``name``."""
    return next((i for i, c in enumerate(mro) if name in vars(c)), len(mro))


def _own_level(t: type, hand_written: bool) -> int:
    """How specific the instance that ``t`` declares itself is: the position in its MRO of
    the class that declares it (0: ``t`` itself), or ``len(mro)`` for none.

    A hand-written instance is declared by the class that defines its methods (Python's own
    method lookup); a derived one by the class whose dataclass declaration lists the fields,
    which for a ``Parameterized`` subclass is always the subclass itself.
    """
    mro = t.__mro__
    if hand_written:
        return min(
            _defining_level(mro, m) for m in ("flatten_parameters", "replace_own_parameters")
        )
    if dataclasses.is_dataclass(t):
        return _defining_level(mro, "__dataclass_fields__")
    return len(mro)


def _fields_added_below(t: type, definer: type) -> tuple[str, ...]:
    """The dataclass fields of ``t`` that ``definer`` (a base of ``t``) does not have."""
    if t is definer or not dataclasses.is_dataclass(t):
        return ()
    known = (
        {f.name for f in dataclasses.fields(definer)}
        if dataclasses.is_dataclass(definer)
        else set()
    )
    return tuple(f.name for f in dataclasses.fields(t) if f.name not in known)


def _registered(t: type) -> tuple[int, Node] | None:
    """The instance registered for the closest class in ``t``'s MRO, with its position."""
    for level, base in enumerate(t.__mro__):
        node = _REGISTERED.get(base)
        if node is not None:
            return level, node
    return None


def _resolve(t: type) -> Node:
    if issubclass(t, Parameter):
        return PARAMETER
    if issubclass(t, torch.Tensor):
        if t.__torch_dispatch__ is torch.Tensor.__torch_dispatch__:
            return STATIC  # a constant (buffer, Frozen): never a parameter, as in Hasktorch
        # A wrapper subclass (DTensor, with its own __torch_dispatch__): torch.nn.Parameter
        # marks the instance instead of changing its type.
        return TENSOR_SUBCLASS
    flatten_m = getattr(t, "flatten_parameters", None)
    replace_m = getattr(t, "replace_own_parameters", None)
    hand_flatten = callable(flatten_m) and not _is_default(flatten_m)
    hand_replace = callable(replace_m) and not _is_default(replace_m)
    # The most specific instance wins: one registered for a base class does not override a
    # subclass's own (hand-written, or derived from its own fields), which would silently drop
    # the subclass's parameters and rebuild it as the base. At the same class, a registration
    # (made from outside, on purpose) wins over the class's methods.
    registered = _registered(t)
    if registered is not None and registered[0] <= _own_level(t, hand_flatten and hand_replace):
        return registered[1]
    if t in _STATIC_TYPES or issubclass(t, (enum.Enum, type)):
        return STATIC
    if issubclass(t, torch.nn.Module):
        # Before the hand-written check: torch's RNN modules have a flatten_parameters method
        # of their own (cuDNN's weight layout), which is not diffprog's.
        return _ModuleNode()
    if hand_flatten and hand_replace:
        return HandWrittenNode(
            t,
            lambda v: v.flatten_parameters(),
            lambda v, s: v.replace_own_parameters(s),
            _fields_added_below(t, t.__mro__[_own_level(t, True)]),
        )
    if hand_flatten or hand_replace:
        have, lack = (
            ("flatten_parameters", "replace_own_parameters")
            if hand_flatten
            else ("replace_own_parameters", "flatten_parameters")
        )
        raise InstanceError(
            f"{t.__qualname__} defines {have} but not {lack}",
            "A hand-written instance needs both methods.",
        )
    if dataclasses.is_dataclass(t):
        return fields_node(t)
    if t is list or t is tuple:
        return _SequenceNode(t)
    if issubclass(t, tuple) and hasattr(t, "_fields"):
        return _NamedTupleNode(t)
    if t is dict or t is OrderedDict or t is defaultdict:
        return _DictNode(t)
    if t in torch_pytree.SUPPORTED_NODES:
        entry = torch_pytree.SUPPORTED_NODES[t]
        return _PytreeNode(entry.flatten_fn, entry.unflatten_fn)
    if issubclass(t, (set, frozenset)):
        return _OpaqueNode(_SET_ADVICE)
    if t is types.FunctionType:
        return _FunctionNode(_FUNCTION_ADVICE)
    if t is types.MethodType:
        return _OpaqueNode(_METHOD_ADVICE)
    if t is types.BuiltinFunctionType or t is types.MethodWrapperType:
        return _BuiltinNode(_METHOD_ADVICE)
    return _OpaqueNode(_OBJECT_ADVICE)


INLINE = "diffprog.inline"


def fields_node(cls: type) -> FieldsNode:
    """The node of a dataclass by its fields (which are inlined in paths), built once.

    It is also the node of a hand-written dataclass shown by its fields (``repr``, the paths
    of its parameters) or calling the derived methods through ``super()``.
    """
    node = _FIELDS_NODES.get(cls)
    if node is None:
        fields = dataclasses.fields(cls)
        inline = frozenset(f.name for f in fields if f.metadata.get(INLINE, False))
        node = _FIELDS_NODES[cls] = FieldsNode(cls, tuple(f.name for f in fields), inline)
    return node


_FIELDS_NODES: dict[type, FieldsNode] = {}


def node_for(t: type) -> Node:
    """The node of type ``t``, resolved once and cached."""
    node = _CACHE.get(t)
    if node is None:
        node = _resolve(t)
        _CACHE[t] = node
        if isinstance(node, HandWrittenNode):
            _register_pytree(t)
        if node.static:
            _STATIC_SEEN.add(t)
    return node


def unique(params: list[Parameter]) -> list[Parameter]:
    """``params`` without repeats (tied parameters), first occurrences kept, order kept."""
    if torch.compiler.is_compiling():
        # While torch.compile traces (diffprog.func.compile_step flattens the model inside
        # its graph), a repeat is found by `is`: dynamo guards every id() it reads on that
        # object, so a new model of the same structure (every step's) would recompile.
        # Quadratic in the number of parameters, but it runs only while tracing.
        kept: list[Parameter] = []
        for p in params:
            if not any(p is q for q in kept):
                kept.append(p)
        return kept
    if len(set(map(id, params))) == len(params):  # the usual case: no tie
        return params
    return list({id(p): p for p in params}.values())  # a repeat is the same object


def flatten_into(value: Any, out: list[Parameter]) -> None:
    """Append the parameters of ``value`` to ``out``, depth first (a tied parameter at each of
    its paths: ``unique`` removes the repeats)."""
    t = type(value)
    if t is Parameter:
        out.append(value)
        return
    node = _CACHE.get(t) or node_for(t)
    node.flatten(value, out)


def replace_value(value: Any, stream: ParamStream) -> Any:
    """``value`` with its parameters taken from ``stream``."""
    t = type(value)
    if t is Parameter:
        return stream.take(value)
    node = _CACHE.get(t) or node_for(t)
    return node.replace(value, stream)


def register_parameterized(
    cls: type,
    *,
    flatten: Callable[[Any], list[torch.Tensor]],
    replace: Callable[[Any, ParamStream], Any],
) -> None:
    """Declare a Parameterized instance for a type you do not own.

    The counterpart of a hand-written ``instance Parameterized T`` in Hasktorch. ``flatten``
    lists the value's parameters; ``replace`` rebuilds the value reading the new ones, in the
    same order, from the stream with ``stream.next_parameter()`` (or ``stream.replace(sub)``
    for a sub-value). Subclasses of ``cls`` use the same instance unless they have their own:
    the most specific instance in a class's MRO wins, so a subclass's hand-written methods, or
    the derived instance of a ``Parameterized`` (or dataclass) subclass, are used for it. A
    registration for the class itself wins over its own methods. ``replace`` must return a
    value of the type it was given (``InstanceError`` otherwise).

    Args:
        cls: the type to declare the instance for.
        flatten: ``flatten(value) -> list[Parameter]``.
        replace: ``replace(value, stream) -> value``.

    Raises:
        InstanceError: ``cls`` is ``torch.Tensor`` or a ``Parameter`` type.

    Example:
        >>> class Affine:  # a class we do not own
        ...     def __init__(self, scale): self.scale = scale
        >>> register_parameterized(
        ...     Affine,
        ...     flatten=lambda a: [a.scale],
        ...     replace=lambda a, s: Affine(s.next_parameter()),
        ... )
        >>> len(flatten_parameters([Affine(make_independent(torch.ones(2)))]))
        1
    """
    if issubclass(cls, torch.Tensor):
        raise InstanceError(
            f"cannot register an instance for the tensor type {cls.__qualname__}",
            "Parameters and tensors have fixed meanings in diffprog.",
        )
    _REGISTERED[cls] = HandWrittenNode(cls, flatten, replace)
    _CACHE.clear()
    _STATIC_SEEN.clear()
    _register_pytree(cls)


def _register_pytree(cls: type) -> None:
    """Register a type with a hand-written instance in torch's pytree registry (so that
    torch.func and torch.compile take its values), unless it is there already."""
    from diffprog._pytree import register_pytree  # imports this module

    register_pytree(cls)
