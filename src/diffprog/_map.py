"""Whole-model traversals: map the parameters or every tensor, read or replace values by type.

One engine (:class:`_Rebuild`) does them all. It descends through the model as every other
traversal does (the nodes' ``children`` and ``rebuild``), calls a function on each value that
matches, and rebuilds the containers on the way; everything that holds no match is shared, not
copied. A value reachable at several paths (a tied parameter, a shared block) is visited once
and stays one object in the result; a plain value (a number, a string) is visited at each path,
since Python shares equal small values by accident.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

import torch

from diffprog._errors import (
    CycleError,
    InstanceError,
    ModelError,
    ParameterTypeError,
    PathKey,
    render_path,
    state_dict_path,
)
from diffprog._frozen import Frozen
from diffprog._nodes import _SCAN_LEAVES, HandWrittenNode, node_for, scan_children
from diffprog._random import DeviceLike
from diffprog._stream import ParamStream
from diffprog._traverse import _hand_written_leaves, _located, name_clash_error

__all__ = [
    "collect",
    "map_parameters",
    "map_tensors",
    "named_tensors",
    "replace_values",
    "tensors",
    "to",
]

T = TypeVar("T")
V = TypeVar("V")
_Parameter = torch.nn.Parameter
Keys = tuple[PathKey, ...]


@overload
def map_parameters(
    f: Callable[[torch.nn.Parameter], torch.Tensor], model: T, *, with_path: Literal[False] = False
) -> T: ...
@overload
def map_parameters(
    f: Callable[[str, torch.nn.Parameter], torch.Tensor], model: T, *, with_path: Literal[True]
) -> T: ...
def map_parameters(f: Callable[..., torch.Tensor], model: T, *, with_path: bool = False) -> T:
    """``model`` with each Parameter ``p`` replaced by ``f(p)`` (or ``f(path, p)``).

    What ``f`` returns becomes a Parameter as :func:`~diffprog.make_independent` makes one: a
    new leaf sharing the result's storage, cut off from any graph, keeping the old parameter's
    ``requires_grad`` (as ``torch.nn.Module`` conversions do). ``f`` may change the dtype, the
    device or the shape; returning the parameter itself keeps it. A tied parameter is mapped
    once and stays tied; everything without parameters is shared, not copied. Buffers and other
    constants are left as they are (:func:`map_tensors` maps them too). A hand-written instance
    gets its new parameters through its own ``replace_own_parameters``.

    Args:
        f: the function, called once per parameter in ``flatten_parameters`` order.
        model: the model (any value).
        with_path: call ``f(path, p)``, ``path`` being the ``state_dict`` key of ``p``
            (``"layers.0.weight"``, as ``named_parameters`` names it).

    Returns:
        The new model, of the same type.

    Raises:
        ParameterTypeError: ``f`` returned something that is not a floating point or complex
            tensor (the message names the path). An exception ``f`` raises propagates with a
            note naming the path.
        HiddenParameterError, CycleError: as ``flatten_parameters``.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> layer = sample(LinearSpec(3, 1))
        >>> zeroed = map_parameters(torch.zeros_like, layer)
        >>> zeroed.weight.abs().sum().item(), type(zeroed.weight).__name__
        (0.0, 'Parameter')
        >>> def halve_bias(path, p):
        ...     return p / 2 if path == "bias" else p
        >>> halved = map_parameters(halve_bias, layer, with_path=True)
        >>> halved.weight is layer.weight
        True
    """
    engine = _Rebuild(model, _is_parameter, _call(f, with_path), _settle_strict, "map_parameters")
    return engine.run()  # type: ignore[no-any-return]


@overload
def map_tensors(
    f: Callable[[torch.Tensor], torch.Tensor], model: T, *, with_path: Literal[False] = False
) -> T: ...
@overload
def map_tensors(
    f: Callable[[str, torch.Tensor], torch.Tensor], model: T, *, with_path: Literal[True]
) -> T: ...
def map_tensors(f: Callable[..., torch.Tensor], model: T, *, with_path: bool = False) -> T:
    """``model`` with every tensor ``t`` (parameters AND buffers) replaced by ``f(t)``.

    Each tensor keeps what it is: a Parameter's result becomes a Parameter (as in
    :func:`map_parameters`), a frozen parameter's (``Frozen``) stays frozen, and a constant's
    (a buffer: BatchNorm's running statistics) is put in as ``f`` returns it. Returning the
    tensor itself keeps it. A tensor reachable at several paths (a tie, a buffer shared by two
    layers) is mapped once and stays shared.

    A hand-written instance's tensors are those its ``flatten_parameters`` lists (it may list
    its buffers there: only Parameters are flattened, listed constants are read back as they
    are). A tensor it holds without listing it cannot be reached, and is refused with an
    ``InstanceError`` naming its path rather than left behind, as is a ``torch.nn.Module``
    holding buffers (convert it with ``diffprog.nn.from_torch``). Tensors inside other values
    diffprog does not traverse (a plain object, a function's closure) are not reached, as
    ``flatten_parameters`` does not reach them.

    Args:
        f: the function, called once per tensor, in the order of :func:`tensors`.
        model: the model (any value).
        with_path: call ``f(path, t)``, ``path`` being the ``state_dict`` key of ``t``.

    Returns:
        The new model, of the same type.

    Raises:
        ParameterTypeError: ``f`` returned a non-tensor, a non-floating tensor for a
            Parameter, or a Parameter for a constant (the message names the path). An
            exception ``f`` raises propagates with a note naming the path.
        InstanceError: a hand-written instance holds a tensor it does not list.

    Example:
        >>> from diffprog.nn import BatchNorm1dSpec
        >>> bn = sample(BatchNorm1dSpec(3))
        >>> on_meta = map_tensors(lambda t: t.to("meta"), bn)
        >>> on_meta.weight.device.type, on_meta.running_mean.device.type
        ('meta', 'meta')
    """
    return _map_tensors(_call(f, with_path), model, "map_tensors")


def _map_tensors(call: Callable[[Keys, Any], Any], model: T, caller: str) -> T:
    engine = _Rebuild(model, _is_tensor, call, _settle_strict, caller)
    engine.needs_every_tensor = True
    return engine.run()  # type: ignore[no-any-return]


def to(
    model: T,
    device: DeviceLike | torch.dtype = None,
    dtype: torch.dtype | None = None,
    *,
    non_blocking: bool = False,
) -> T:
    """``model`` with its parameters AND buffers moved to ``device`` and/or converted to ``dtype``.

    ``torch.nn.Module.to`` as a pure function, with torch's rules: ``dtype`` must be a floating
    point or complex dtype, and converts only the floating point and complex tensors (integer
    and bool buffers, ``num_batches_tracked`` or a mask, keep their dtype; every tensor moves to
    ``device``). Parameters stay independent leaves (``is_leaf``, their ``requires_grad``
    kept), a frozen parameter stays frozen, ties stay tied, and what needs no change is shared,
    not copied (a model already there comes back as it is). ``device="meta"`` gives a
    shape-only model. Tensors are reached as :func:`map_tensors` reaches them.

    Unlike ``torch.nn.Module.to``, a complex ``dtype`` gives no warning (torch warns that its
    modules may not support complex tensors), and there is no ``memory_format``.

    Args:
        model: the model (any value).
        device: where to move every tensor (``None``: where it is). A dtype here, with no
            ``dtype`` given, is taken as the dtype (``to(model, torch.float64)``, as torch).
        dtype: the floating point or complex dtype for floating point and complex tensors
            (``None``: keep).
        non_blocking: as ``torch.Tensor.to``.

    Returns:
        The converted model, of the same type; ``model`` itself is unchanged.

    Raises:
        TypeError: ``dtype`` is not a floating point or complex dtype.
        NotImplementedError: moving a ``meta`` tensor to a real device (it has no data); the
            note names its path.

    Example:
        >>> from diffprog.nn import BatchNorm1dSpec
        >>> bn = sample(BatchNorm1dSpec(3))
        >>> bn64 = to(bn, dtype=torch.float64)
        >>> bn64.weight.dtype, bn64.running_mean.dtype, bn64.num_batches_tracked.dtype
        (torch.float64, torch.float64, torch.int64)
    """
    if isinstance(device, torch.dtype) and dtype is None:  # to(model, torch.float64), as torch
        device, dtype = None, device
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"to expects a torch.dtype for dtype, got {type(dtype).__name__}.")
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"to only accepts floating point or complex dtypes (as torch.nn.Module.to), but got "
            f"dtype={dtype}. Integer and bool tensors keep their dtype when a model is converted."
        )
    if isinstance(device, torch.dtype):
        raise TypeError("to got two dtypes: pass the device first, then the dtype.")
    target = torch.device(device) if device is not None else None

    def convert(t: torch.Tensor) -> torch.Tensor:
        floating = t.is_floating_point() or t.is_complex()
        try:
            return t.to(target, dtype if floating else None, non_blocking)
        except NotImplementedError as e:
            if str(e) != "Cannot copy out of meta tensor; no data!":
                raise
            raise NotImplementedError(
                f"{e} A meta model has shapes only: sample its spec on the device instead, or "
                "fill it with loaded parameters (replace_parameters accepts real tensors in "
                "meta slots)."
            ) from None

    return _map_tensors(lambda keys, t: convert(t), model, "to")


def tensors(model: Any) -> list[torch.Tensor]:
    """Every tensor of ``model``: parameters, frozen parameters and buffers (constants).

    In flatten order (depth first, fields in declaration order); a tensor reachable at several
    paths (tied) appears once, at its first path. Reaches what :func:`map_tensors` reaches.

    Example:
        >>> from diffprog.nn import BatchNorm1dSpec
        >>> [tuple(t.shape) for t in tensors(sample(BatchNorm1dSpec(3)))]
        [(3,), (3,), (3,), (3,), ()]
    """
    return [t for _, t in _collect(model, (torch.Tensor,), "tensors")]


def named_tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``model`` with its ``state_dict`` key (``"layers.0.running_mean"``).

    As :func:`~diffprog.named_parameters`, for every tensor: same order as :func:`tensors`, a
    tied tensor named by its first path.

    Raises:
        NameClashError: two different tensors would get the same name (dict keys ``1`` and
            ``"1"``...).
        InstanceError: a hand-written instance holds a tensor it does not list.

    Example:
        >>> from diffprog.nn import BatchNorm1dSpec
        >>> [name for name, _ in named_tensors({"bn": sample(BatchNorm1dSpec(3))})]
        ['bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var', 'bn.num_batches_tracked']
    """
    found = _collect(model, (torch.Tensor,), "named_tensors")
    result: list[tuple[str, torch.Tensor]] = []
    named: dict[str, Keys] = {}
    for keys, t in found:
        name = state_dict_path(keys)
        first = named.setdefault(name, keys)
        if first is not keys:
            raise name_clash_error(model, name, first, keys, "tensors")
        result.append((name, t))
    return result


@overload
def collect(model: Any, of_type: type[V], *, with_path: Literal[False] = False) -> list[V]: ...
@overload
def collect(
    model: Any, of_type: tuple[type, ...], *, with_path: Literal[False] = False
) -> list[Any]: ...
@overload
def collect(model: Any, of_type: type[V], *, with_path: Literal[True]) -> list[tuple[str, V]]: ...
@overload
def collect(
    model: Any, of_type: tuple[type, ...], *, with_path: Literal[True]
) -> list[tuple[str, Any]]: ...
def collect(model: Any, of_type: type | tuple[type, ...], *, with_path: bool = False) -> list[Any]:
    """Every value of type ``of_type`` inside ``model`` (Hasktorch's ``types @T`` traversal).

    Looks at every value (layers, containers, tensors, numbers, strings, functions), the
    root included, with ``isinstance``: ``collect(model, nn.Linear)`` gives every Linear
    layer, ``collect(model, float)`` every float, ``collect(model, dp.Parameter)`` the
    parameters. A match is not looked into (the outermost match wins). A value reachable at
    several paths (a tied tensor, a shared block holding tensors) is listed once, at its first
    path; a plain value (a number, a string, a tuple without tensors) at each path where it
    sits.

    Not looked into: a hand-written instance (except the tensors its ``flatten_parameters``
    lists) and values diffprog does not traverse (plain objects, ``torch.nn.Module``), which
    can still match themselves.

    Args:
        model: the model (any value).
        of_type: a type or a tuple of types, as ``isinstance`` takes (so ``int`` matches
            ``bool`` values, and ``torch.Tensor`` every tensor).
        with_path: give ``(path, value)`` pairs, ``path`` in ``state_dict`` style (``""`` for
            the root).

    Returns:
        The matches, depth first in flatten order.

    Example:
        >>> from diffprog.nn import DropoutSpec, LinearSpec
        >>> model = {"fc": sample(LinearSpec(3, 2)), "drop": sample(DropoutSpec(0.1))}
        >>> [type(v).__name__ for v in collect(model, (type(model["fc"]), float))]
        ['Linear', 'float']
        >>> collect(model, float, with_path=True)
        [('drop.p', 0.1)]
    """
    types = of_type if isinstance(of_type, tuple) else (of_type,)
    found = _collect(model, types, "collect")
    if with_path:
        return [(state_dict_path(keys), v) for keys, v in found]
    return [v for _, v in found]


@overload
def replace_values(
    model: T, of_type: type[V], f: Callable[[V], Any], *, with_path: Literal[False] = False
) -> T: ...
@overload
def replace_values(
    model: T,
    of_type: tuple[type, ...],
    f: Callable[[Any], Any],
    *,
    with_path: Literal[False] = False,
) -> T: ...
@overload
def replace_values(
    model: T, of_type: type[V], f: Callable[[str, V], Any], *, with_path: Literal[True]
) -> T: ...
@overload
def replace_values(
    model: T, of_type: tuple[type, ...], f: Callable[[str, Any], Any], *, with_path: Literal[True]
) -> T: ...
def replace_values(
    model: T, of_type: type | tuple[type, ...], f: Callable[..., Any], *, with_path: bool = False
) -> T:
    """``model`` with each value ``v`` that :func:`collect` finds replaced by ``f(v)``.

    The values are found as :func:`collect` finds them (the outermost match; a value shared by
    several paths is replaced once and stays shared). What ``f`` returns is put in as it is,
    except that a plain tensor put where a Parameter was becomes a Parameter (as
    :func:`map_parameters` makes it), and one put where a frozen parameter was stays frozen.
    Everything else is shared, not copied. A hand-written instance's listed tensors are
    replaced through its ``replace_own_parameters``; nothing else inside it is reached.

    Args:
        model: the model (any value).
        of_type: a type or a tuple of types, as ``isinstance`` takes.
        f: the function, called once per match, in the order of :func:`collect`.
        with_path: call ``f(path, v)`` with the ``state_dict``-style path.

    Returns:
        The new model, of the same type.

    Raises:
        Exception: whatever ``f`` raises, propagated with a note naming the path.

    Example:
        >>> import dataclasses
        >>> from diffprog.nn import Dropout, DropoutSpec, LinearSpec
        >>> model = [sample(LinearSpec(3, 2)), sample(DropoutSpec(0.1))]
        >>> less = replace_values(model, Dropout, lambda d: dataclasses.replace(d, p=0.3))
        >>> less[1].p, less[0] is model[0]
        (0.3, True)
    """
    types = of_type if isinstance(of_type, tuple) else (of_type,)

    def match(v: Any) -> bool:
        return isinstance(v, types)

    engine = _Rebuild(model, match, _call(f, with_path), _settle_loose, "replace_values")
    engine.needs_every_tensor = _wants_tensors(types)
    return engine.run()  # type: ignore[no-any-return]


# --- the engine ---------------------------------------------------------------------------------


def _is_parameter(v: Any) -> bool:
    return isinstance(v, _Parameter)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _wants_tensors(types: tuple[type, ...]) -> bool:
    return any(issubclass(t, torch.Tensor) for t in types)


def _call(f: Callable[..., Any], with_path: bool) -> Callable[[Keys, Any], Any]:
    """``f`` as the engine calls it: with the path keys, turned into a string if asked."""
    if with_path:
        return lambda keys, v: f(state_dict_path(keys), v)
    return lambda keys, v: f(v)


def _collect(model: Any, types: tuple[type, ...], caller: str) -> list[tuple[Keys, Any]]:
    """The matches of ``types`` in ``model`` with their path keys (see :func:`collect`)."""
    found: list[tuple[Keys, Any]] = []

    def record(keys: Keys, v: Any) -> Any:
        found.append((keys, v))
        return v

    def match(v: Any) -> bool:
        return isinstance(v, types)

    engine = _Rebuild(model, match, record, _settle_loose, caller)
    engine.needs_every_tensor = _wants_tensors(types)
    engine.run()
    return found


# A settle function puts the result of the user's function where the old value was:
# settle(old, new, keys, caller) -> the value to put in.
Settle = Callable[[Any, Any, Keys, str], Any]


def _settle_strict(old: Any, new: Any, keys: Keys, caller: str) -> Any:
    """map_parameters / map_tensors: each tensor keeps what it is (Parameter, frozen, constant)."""
    if new is old:
        return old
    if not isinstance(new, torch.Tensor):
        raise ParameterTypeError(
            f"the function given to {caller} returned a {type(new).__name__} for this "
            f"{_kind(old)}, which must stay a tensor",
            "Return a tensor from the function; to put other values in, use "
            "replace_values (or at(...).set).",
        )
    if isinstance(old, _Parameter):
        return _as_parameter(old, new, caller)
    if isinstance(old, Frozen):
        return new if type(new) is Frozen else Frozen(new)
    if isinstance(new, (_Parameter, Frozen)):
        raise ParameterTypeError(
            f"the function given to {caller} returned a {type(new).__name__} for this constant "
            "(a buffer); a constant stays a constant",
            "Return a plain tensor (e.g. t.detach()); to make a constant trainable, set it with "
            "replace_values or at(...).set.",
        )
    return new


def _settle_loose(old: Any, new: Any, keys: Keys, caller: str) -> Any:
    """replace_values: the result as it is, except that a plain tensor put where a Parameter
    (or a frozen one) was becomes one."""
    if new is old or type(new) is not torch.Tensor:
        return new
    if isinstance(old, _Parameter):
        return _as_parameter(old, new, caller)
    if isinstance(old, Frozen):
        return Frozen(new)
    return new


def _as_parameter(old: torch.nn.Parameter, new: torch.Tensor, caller: str) -> torch.nn.Parameter:
    """``new`` as a Parameter in ``old``'s place: make_independent, keeping requires_grad."""
    if old.requires_grad and not (new.is_floating_point() or new.is_complex()):
        raise ParameterTypeError(
            f"the function given to {caller} returned a {new.dtype} tensor for this parameter; "
            "a parameter that requires grad must be floating point or complex",
            "Return a floating point tensor (integer buffers are converted by to() without "
            "changing their dtype).",
        )
    return _Parameter(new.detach(), requires_grad=old.requires_grad)


def _kind(v: Any) -> str:
    if isinstance(v, _Parameter):
        return "parameter"
    if isinstance(v, Frozen):
        return "frozen parameter"
    return "constant"


class _UncheckedStream(ParamStream):
    """The stream a hand-written instance reads its mapped tensors from: a map may change
    their dtype, device or shape, so nothing is checked against the old ones."""

    __slots__ = ()

    def verify(self) -> None:
        """Check nothing (see the class)."""
        return None


class _Rebuild:
    """One traversal: find the values ``match`` accepts, put ``settle(old, call(keys, old))``
    in their place, rebuild the containers on the way (see the module's docstring)."""

    def __init__(
        self,
        root: Any,
        match: Callable[[Any], bool],
        call: Callable[[Keys, Any], Any],
        settle: Settle,
        caller: str,
    ) -> None:
        self.root = root
        self.match = match
        self.call = call
        self.settle = settle
        self.caller = caller
        # Refuse a hand-written instance holding a tensor it does not list (which a traversal
        # of tensors would silently leave behind).
        self.needs_every_tensor = False
        # id(old value) -> its new version, for a value met again at another path; the old
        # values are kept alive (alive) so that their ids cannot be reused meanwhile.
        self.done: dict[int, Any] = {}
        self.alive: list[Any] = []
        self.active: set[int] = set()  # the values being rebuilt, to detect a cycle
        # How many tensors the traversal has met so far: a container is remembered by id only
        # if it holds one (see ``value``).
        self.tensors_met = 0

    def run(self) -> Any:
        return self.value(self.root, ())

    def value(self, v: Any, keys: Keys) -> Any:
        if isinstance(v, torch.Tensor):
            self.tensors_met += 1
        if self.match(v):
            return self.leaf(v, keys)
        if isinstance(v, torch.Tensor):
            return v
        node = node_for(type(v))
        if node.static:
            return v
        new = self.done.get(id(v), _MISSING)
        if new is not _MISSING:
            self.tensors_met += 1  # only values holding tensors are remembered
            return new
        if id(v) in self.active:
            raise _located(_cycle(), keys, self.root)
        self.active.add(id(v))
        before = self.tensors_met
        try:
            if isinstance(node, HandWrittenNode):
                new = self.hand_written(node, v, keys)
            else:
                new = self.children(node, v, keys)
        finally:
            self.active.discard(id(v))
        # Why only a value holding tensors: that is a real tie or shared block, to be visited
        # once and kept shared. One without tensors may be shared by accident (Python folds
        # equal constant tuples into one object): it is visited at each of its paths, so that
        # a function of the path sees every place.
        return self.remember(v, new) if self.tensors_met > before else new

    def remember(self, v: Any, new: Any) -> Any:
        self.done[id(v)] = new
        self.alive.append(v)
        return new

    def leaf(self, v: Any, keys: Keys) -> Any:
        """The new value for a match: once per object, except plain values (see the module)."""
        # As for containers (see ``value``): a non-tensor match is one object at several
        # paths only when it holds tensors (a shared block), else it is met at each path.
        shared = isinstance(v, torch.Tensor) or (not node_for(type(v)).static and _holds_tensor(v))
        if shared:
            new = self.done.get(id(v), _MISSING)
            if new is not _MISSING:
                return new
        try:
            result = self.call(keys, v)
        except ModelError:
            raise
        except Exception as e:
            _note(
                e,
                f"(raised by the function given to {self.caller}, at "
                f"{render_path(keys)} of the {type(self.root).__name__})",
            )
            raise
        try:
            new = self.settle(v, result, keys, self.caller)
        except ModelError as e:
            raise _located(e, keys, self.root) from None
        return self.remember(v, new) if shared else new

    def children(self, node: Any, v: Any, keys: Keys) -> Any:
        children = node.children(v)
        if not children:
            try:
                node.flatten(v, [])  # raises for a hidden parameter (an opaque value)
            except ModelError as e:
                raise _located(e, keys, self.root) from None
            if self.needs_every_tensor and isinstance(v, torch.nn.Module):
                self.refuse_module_buffers(v, keys)
            return v
        old = [c for _, c in children]
        new = [self.value(c, (*keys, key)) for key, c in children]
        if all(map(operator.is_, new, old)):
            return v
        return node.rebuild(v, new)

    def hand_written(self, node: HandWrittenNode, v: Any, keys: Keys) -> Any:
        """A hand-written instance: its listed tensors, given back through its own replace."""
        try:
            own = node.own(v)
        except ModelError as e:
            raise _located(e, keys, self.root) from None
        if self.needs_every_tensor:
            self.refuse_unlisted(v, own, keys)
        leaves = list(_hand_written_leaves(own, v, keys))
        new = [self.value(t, k) for k, t in leaves]
        if all(map(operator.is_, new, own)):
            return v
        try:
            return node._run(v, self.stream_of(new))
        except ModelError as e:
            raise _located(e, keys, self.root) from None

    def stream_of(self, new: list[Any]) -> _UncheckedStream:
        """The stream a hand-written instance reads ``new`` from, sharing this traversal's
        record of rebuilt values.

        Why: a sub-model the instance rebuilds with ``stream.replace`` and that is also held
        at another path must stay one object in the result, whichever path comes first (as
        ``ParamStream.substream`` does for ``replace_parameters``).
        """
        stream = _UncheckedStream(new)
        stream._built = self.done
        stream._alive = self.alive
        return stream

    def refuse_module_buffers(self, module: torch.nn.Module, keys: Keys) -> None:
        """Raise if ``module`` (a torch.nn.Module held as a parameter-free function) holds
        buffers: a traversal of tensors cannot reach them (``to`` would leave them in the old
        dtype, ``state_dict`` would leave them out)."""
        for name, _ in module.named_buffers():
            err = InstanceError(
                f"a torch.nn.Module ({type(module).__name__}) holding buffer {name!r}, which "
                f"{self.caller} cannot reach",
                "diffprog sees no tensor inside a torch.nn.Module: convert it with "
                "diffprog.nn.from_torch (or use the diffprog.nn layer of the same name), so "
                "that its buffers become tensors of the model.",
            )
            raise _located(err, keys, self.root)

    def refuse_unlisted(self, v: Any, own: list[torch.Tensor], keys: Keys) -> None:
        """Raise if ``v`` holds a tensor its ``flatten_parameters`` does not list (looked for
        as the hidden-parameter scan looks, ``scan_children``)."""
        listed = {id(t) for t in own}
        seen: set[int] = set()
        stack: list[tuple[Any, Keys]] = [(v, ())]
        while stack:
            x, inner = stack.pop()
            if id(x) in seen:
                continue
            seen.add(id(x))
            if isinstance(x, torch.Tensor):
                if id(x) not in listed:
                    err = InstanceError(
                        f"{type(v).__qualname__} is a hand-written instance holding this tensor "
                        f"without listing it in its flatten_parameters, so {self.caller} cannot "
                        "reach it",
                        "List it in flatten_parameters (a constant may be listed: only "
                        "Parameters are flattened, and replace_own_parameters reads it back "
                        "with next_parameter), or make the class a derived Parameterized.",
                    )
                    raise _located(err, (*keys, *inner), self.root)
                continue
            children = scan_children(x)
            if isinstance(children, list):
                stack.extend(
                    (c, (*inner, k)) for k, c in reversed(children) if type(c) not in _SCAN_LEAVES
                )


_MISSING = object()


def _holds_tensor(value: Any) -> bool:
    """Whether ``value`` holds a tensor anywhere inside (as the hidden-parameter scan looks,
    ``scan_children``)."""
    seen: set[int] = set()
    stack: list[Any] = [value]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            return True
        children = scan_children(x)
        if isinstance(children, list):
            stack.extend(c for _, c in children if type(c) not in _SCAN_LEAVES)
    return False


def _cycle() -> CycleError:
    return CycleError(
        "this value is one of its own ancestors (a cycle)",
        "A model must be a tree (shared sub-values are fine, loops are not): "
        "remove the back-reference.",
    )


def _note(error: BaseException, text: str) -> None:
    add_note = getattr(error, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(text)
