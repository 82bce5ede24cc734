"""How each kind of value is traversed: the registry of Parameterized instances.

Every type a model may contain maps to one *node* object that knows how to

* ``flatten`` a value of that type (append its parameters to a list, depth first),
* ``replace`` its parameters from a :class:`~diffprog.ParamStream`, and
* list its ``children`` with path keys and ``rebuild`` it from new children (the slow,
  general traversal used for names, ``repr`` and diagnostics).

The node of a type is resolved once and cached (for a dataclass that is its *plan*: the
ordered field names), so a traversal costs one dict lookup per value.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as torch_pytree

from diffprog._codegen import make_flatten, make_replace
from diffprog._errors import (
    HiddenParameterError,
    InstanceError,
    ModelError,
    ParameterCountError,
    PathKey,
)
from diffprog._signature import Signed, has_repeats

if TYPE_CHECKING:
    from diffprog._stream import ParamStream

__all__ = [
    "Node",
    "flatten_into",
    "node_for",
    "register_parameterized",
    "replace_value",
    "unique",
]

Parameter = torch.nn.Parameter


class Node:
    """How values of one type are traversed. Subclasses override what applies."""

    __slots__ = ()

    #: True for leaves that can never hold a parameter (numbers, strings, constant tensors...).
    static = False

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        """Append the parameters inside ``value`` to ``out``, depth first.

        A parameter met twice (a tie) is appended twice; ``flatten_parameters`` removes the
        repeats once at the end, which is cheaper than checking at every parameter.
        """
        for key, child in self.children(value):
            try:
                flatten_into(child, out)
            except ModelError as e:
                e.push(*key)
                raise

    def replace(self, value: Any, stream: ParamStream) -> Any:
        """Return ``value`` with its parameters taken from ``stream``, in flatten order.

        A container met again in the same replace (shared at several paths) gets the version
        built the first time, so sharing survives (see ``ParamStream._rebuilt``).
        """
        built = stream._rebuilt(value)
        if built is not None:
            return built
        children = self.children(value)
        new: list[Any] = []
        changed = False
        for key, child in children:
            try:
                replaced = replace_value(child, stream)
            except ModelError as e:
                e.push(*key)
                raise
            changed = changed or replaced is not child
            new.append(replaced)
        if not changed:
            return value
        return stream._keep(value, self.rebuild(value, new))

    def children(self, value: Any) -> list[tuple[PathKey, Any]]:
        """The direct sub-values of ``value`` with their path keys, in traversal order."""
        return []

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        """A copy of ``value`` whose children (in ``children`` order) are replaced."""
        return value


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


class FieldsNode(Node):
    """A dataclass (every ``Parameterized``): its fields in declaration order.

    Built once per class: the field names are its flatten/replace plan, and for the usual
    classes (fields in ``__dict__``) ``flatten``/``replace`` are functions generated for it.
    """

    __slots__ = ("cached", "cls", "flatten", "kinds", "names", "replace", "uses_dict")

    def __init__(self, cls: type, names: tuple[str, ...], inline: frozenset[str] = frozenset()):
        self.cls = cls
        self.names = names
        self.kinds = tuple("inline" if n in inline else "attr" for n in names)
        self.cached = tuple(
            name
            for c in cls.__mro__
            for name, attr in vars(c).items()
            if isinstance(attr, functools.cached_property)
        )
        # Instances keep their fields in __dict__ (not __slots__): read it directly.
        # (Empty __slots__, as in Generic and Protocol, hold nothing: they don't count.)
        self.uses_dict = cls.__dictoffset__ != 0 and not any(
            vars(c).get("__slots__") for c in cls.__mro__[:-1] if c is not Signed
        )
        if self.uses_dict and all(n.isidentifier() for n in names):
            env = {"STATIC": _STATIC_SEEN, "CACHE": _CACHE, "node_for": node_for}
            self.flatten = make_flatten(names, env)  # type: ignore[method-assign]
            self.replace = make_replace(cls, names, env, self.cached)  # type: ignore[method-assign]
        else:
            self.flatten = self._flatten_generic  # type: ignore[method-assign]
            self.replace = self._replace_generic  # type: ignore[method-assign]

    def _flatten_generic(self, value: Any, out: list[Parameter]) -> None:
        for name in self.names:
            try:
                flatten_into(getattr(value, name), out)
            except ModelError as e:
                e.push("attr", name)
                raise

    def _replace_generic(self, value: Any, stream: ParamStream) -> Any:
        built = stream._rebuilt(value)  # shared at several paths: built already
        if built is not None:
            return built
        changes: dict[str, Any] = {}
        for name in self.names:
            child = getattr(value, name)
            try:
                new = replace_value(child, stream)
            except ModelError as e:
                e.push("attr", name)
                raise
            if new is not child:
                changes[name] = new
        if not changes:
            return value
        return stream._keep(value, self._with(value, changes))

    def _with(self, value: Any, changes: dict[str, Any]) -> Any:
        # Bypass __init__/__post_init__ (and frozen __setattr__): the value was already
        # validated when it was built; only parameter slots change.
        new = object.__new__(type(value))
        if self.uses_dict:
            state = new.__dict__  # filled directly: no frozen __setattr__ in the way
            state.update(value.__dict__)
            state.update(changes)
            for name in self.cached:  # computed from the old fields
                state.pop(name, None)
        else:
            for name in self.names:
                object.__setattr__(new, name, changes.get(name, getattr(value, name)))
        return new

    def children(self, value: Any) -> list[tuple[PathKey, Any]]:
        return [((k, n), getattr(value, n)) for k, n in zip(self.kinds, self.names)]

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        return self._with(value, dict(zip(self.names, children)))


class _SequenceNode(Node):
    """``list`` and ``tuple``."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        # The node of the previous child is reused for the next one of the same type: the
        # layers of a list usually are.
        last: type | None = None
        flatten: Any = None
        child: Any = None
        try:
            for child in value:
                t = type(child)
                if t is Parameter:
                    out.append(child)
                elif t is last:
                    flatten(child, out)
                elif t not in _STATIC_SEEN:
                    last = t
                    flatten = (_CACHE.get(t) or node_for(t)).flatten
                    flatten(child, out)
        except ModelError as e:
            e.push("index", _position(value, child))
            raise

    def replace(self, value: Any, stream: ParamStream) -> Any:
        built = stream._rebuilt(value)  # shared at several paths: built already
        if built is not None:
            return built
        new: list[Any] | None = None
        last: type | None = None
        replace: Any = None
        child: Any = None
        try:
            for index, child in enumerate(value):
                t = type(child)
                if t is Parameter:
                    replaced = stream.take(child)
                elif t is last:
                    replaced = replace(child, stream)
                elif t in _STATIC_SEEN:
                    continue
                else:
                    last = t
                    replace = (_CACHE.get(t) or node_for(t)).replace
                    replaced = replace(child, stream)
                if replaced is not child:
                    if new is None:
                        new = list(value)
                    new[index] = replaced
        except ModelError as e:
            e.push("index", _position(value, child))
            raise
        if new is None:
            return value
        return stream._keep(value, new if self.cls is list else tuple(new))

    def children(self, value: Any) -> list[tuple[PathKey, Any]]:
        return [(("index", i), child) for i, child in enumerate(value)]

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        return list(children) if self.cls is list else tuple(children)


def _position(seq: Any, child: Any) -> int:
    """The index of ``child`` in ``seq`` (its first, for an object found twice: the error it
    raised is the same at each)."""
    return next((i for i, c in enumerate(seq) if c is child), -1)


class _NamedTupleNode(Node):
    """A ``typing.NamedTuple`` / ``collections.namedtuple``: its fields by name."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def children(self, value: Any) -> list[tuple[PathKey, Any]]:
        return [(("attr", name), child) for name, child in zip(value._fields, value)]

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        return type(value)(*children)


class _DictNode(Node):
    """``dict``, ``OrderedDict`` and ``defaultdict``, in insertion order."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def children(self, value: Any) -> list[tuple[PathKey, Any]]:
        return [(("key", k), v) for k, v in value.items()]

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        items = zip(value.keys(), children)
        if isinstance(value, defaultdict):
            return type(value)(value.default_factory, items)
        return type(value)(items)


class _PytreeNode(Node):
    """A type registered with ``torch.utils._pytree`` (e.g. ``collections.deque``)."""

    __slots__ = ("flatten_fn", "unflatten_fn")

    def __init__(self, flatten_fn: Callable[..., Any], unflatten_fn: Callable[..., Any]) -> None:
        self.flatten_fn = flatten_fn
        self.unflatten_fn = unflatten_fn

    def children(self, value: Any) -> list[tuple[PathKey, Any]]:
        children, _ = self.flatten_fn(value)
        return [(("index", i), c) for i, c in enumerate(children)]

    def replace(self, value: Any, stream: ParamStream) -> Any:
        result = super().replace(value, stream)
        if result is not value:  # its unflatten may keep other tensors than those given
            stream._foreign = True
        return result

    def rebuild(self, value: Any, children: list[Any]) -> Any:
        _, context = self.flatten_fn(value)
        return self.unflatten_fn(children, context)


class HandWrittenNode(Node):
    """A hand-written instance: ``flatten(value) -> list`` and ``replace(value, stream)``.

    Ties and checks still hold: before the instance's own ``replace`` runs, each parameter its
    ``flatten`` lists is matched against the stream (shape and dtype checked, a parameter seen
    earlier in the model reused), and the instance reads the results from a stream of its own.
    """

    __slots__ = ("cls", "flatten_fn", "replace_fn")

    def __init__(
        self,
        cls: type,
        flatten_fn: Callable[[Any], list[torch.Tensor]],
        replace_fn: Callable[[Any, ParamStream], Any],
    ) -> None:
        self.cls = cls
        self.flatten_fn = flatten_fn
        self.replace_fn = replace_fn

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
        return params

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        out.extend(self.own(value))  # type: ignore[arg-type]

    def replace(self, value: Any, stream: ParamStream) -> Any:
        from diffprog._stream import ParamStream

        old = self.own(value)
        if not old:  # nothing to replace: the value stays as it is
            return value
        built = stream._rebuilt(value)  # shared at several paths: built already
        if built is not None:
            return built
        stream._foreign = True  # its replace may keep other tensors than those given
        new: list[torch.Tensor] = []
        for index, p in enumerate(old):
            try:
                new.append(stream.take(p))
            except ModelError as e:
                e.push("index", index)
                raise
        if stream._tied_so_far():
            # A tie, which an optimistic stream handed the wrong tensors: give up before the
            # instance's own code sees them; the replace reruns with a ParamStream.
            raise StopIteration
        own = ParamStream(new)
        name = self.cls.__name__
        try:
            result = self.replace_fn(value, own)
        except ParameterCountError as e:
            raise InstanceError(
                f"the replace_own_parameters of {name} asked for more parameters than its "
                f"flatten_parameters lists ({len(old)})",
                "Make both methods walk the same parameters in the same order.",
            ) from e
        if own.remaining:
            raise InstanceError(
                f"the replace_own_parameters of {name} used {len(old) - own.remaining} of "
                f"the {len(old)} parameters its flatten_parameters lists",
                "Make both methods walk the same parameters in the same order.",
            )
        own.verify()
        return stream._keep(value, result)

    def children(self, value: Any) -> list[tuple[PathKey, Any]]:
        return [(("index", i), p) for i, p in enumerate(self.own(value))]


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

    def flatten(self, value: Any, out: list[Parameter]) -> None:
        self._check(value)

    def replace(self, value: Any, stream: ParamStream) -> Any:
        self._check(value)
        return value


# How far into a plain object (or set, partial) diffprog looks for a Parameter that would
# otherwise be skipped. Bounded so that a large opaque attribute (a vocabulary, a dataset)
# cannot slow every traversal down.
_SCAN_BUDGET = 256


def _scan_hidden(value: Any) -> tuple[list[PathKey], str] | None:
    """Look for a Parameter inside an opaque value; return its path and what holds it."""
    budget = [_SCAN_BUDGET]

    def visit(v: Any, path: list[PathKey], depth: int) -> tuple[list[PathKey], str] | None:
        budget[0] -= 1
        if budget[0] < 0 or depth > 6:
            return None
        if isinstance(v, Parameter):
            return path, "a Parameter"
        if isinstance(v, torch.nn.Module):
            for name, _ in v.named_parameters():
                return path, f"a torch.nn.Module with parameter {name!r}"
            return None
        t = type(v)
        if t in _STATIC_TYPES or isinstance(v, (torch.Tensor, enum.Enum, type)):
            return None
        if isinstance(v, (list, tuple, set, frozenset)):
            items: Iterator[tuple[PathKey, Any]] = ((("index", i), c) for i, c in enumerate(v))
        elif isinstance(v, dict):
            items = ((("key", k), c) for k, c in v.items())
        elif isinstance(v, functools.partial):
            items = iter(
                [(("attr", f"args[{i}]"), a) for i, a in enumerate(v.args)]
                + [(("attr", f"keywords[{k!r}]"), a) for k, a in v.keywords.items()]
            )
        elif hasattr(v, "__dict__"):
            items = ((("attr", k), c) for k, c in vars(v).items())
        else:
            return None
        for key, child in items:
            found = visit(child, [*path, key], depth + 1)
            if found is not None:
                return found
        return None

    return visit(value, [], 0)


class _OpaqueNode(Node):
    """A value diffprog does not traverse: a plain object, a set, a ``functools.partial``.

    It is kept as it is, after checking (within a budget) that no Parameter hides inside.
    """

    __slots__ = ("advice",)

    def __init__(self, advice: str) -> None:
        self.advice = advice

    def _check(self, value: Any) -> None:
        found = _scan_hidden(value)
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


_OBJECT_ADVICE = (
    "Make its class a diffprog.Parameterized (or a dataclass), register an instance for it "
    "with diffprog.register_parameterized, or give it flatten_parameters and "
    "replace_own_parameters methods."
)
_SET_ADVICE = "Sets are unordered, so their parameters have no stable order: use a tuple or list."

_STATIC_TYPES: set[type] = {
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
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.BuiltinMethodType,
    types.MethodWrapperType,
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


def _resolve(t: type) -> Node:
    for base in t.__mro__:
        if base in _REGISTERED:
            return _REGISTERED[base]
    if issubclass(t, Parameter):
        return PARAMETER
    if issubclass(t, torch.Tensor):
        return STATIC  # a constant (buffer): never a parameter, as in Hasktorch
    if t in _STATIC_TYPES or issubclass(t, (enum.Enum, type)):
        return STATIC
    flatten_m = getattr(t, "flatten_parameters", None)
    replace_m = getattr(t, "replace_own_parameters", None)
    hand_flatten = callable(flatten_m) and not _is_default(flatten_m)
    hand_replace = callable(replace_m) and not _is_default(replace_m)
    if hand_flatten and hand_replace:
        return HandWrittenNode(
            t, lambda v: v.flatten_parameters(), lambda v, s: v.replace_own_parameters(s)
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
    if issubclass(t, torch.nn.Module):
        return _ModuleNode()
    if issubclass(t, (set, frozenset)):
        return _OpaqueNode(_SET_ADVICE)
    if issubclass(t, (types.FunctionType, types.BuiltinFunctionType)):
        return STATIC
    return _OpaqueNode(_OBJECT_ADVICE)


INLINE = "diffprog.inline"


def fields_node(cls: type) -> FieldsNode:
    """The plan of a dataclass: its field names in order, and which are inlined in paths."""
    fields = dataclasses.fields(cls)
    inline = frozenset(f.name for f in fields if f.metadata.get(INLINE, False))
    return FieldsNode(cls, tuple(f.name for f in fields), inline)


def node_for(t: type) -> Node:
    """The node of type ``t``, resolved once and cached."""
    node = _CACHE.get(t)
    if node is None:
        node = _resolve(t)
        _CACHE[t] = node
        if node.static:
            _STATIC_SEEN.add(t)
    return node


def unique(params: list[Parameter]) -> list[Parameter]:
    """``params`` without repeats (tied parameters), first occurrences kept, order kept."""
    if not has_repeats(params):  # the usual case
        return params
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # type: ignore[func-returns-value]


def flatten_into(value: Any, out: list[Parameter]) -> None:
    """Append the parameters of ``value`` to ``out`` (depth first, each object once)."""
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
    for a sub-value). Subclasses of ``cls`` use the same instance unless they have their own.

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
