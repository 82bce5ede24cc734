"""The free functions over any model value: flatten, replace, named parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch

from diffprog._errors import (
    CycleError,
    ModelError,
    NameClashError,
    ParameterCountError,
    PathKey,
    render_path,
    state_dict_path,
)
from diffprog._nodes import (
    _CACHE,
    HandWrittenNode,
    fields_node,
    node_for,
    replace_value,
    scan_children,
    unique,
)
from diffprog._stream import CheckingStream, ParamStream

__all__ = [
    "flatten_parameters",
    "named_parameters",
    "replace_parameters",
    "name_clash_error",
    "substitute",
    "walk",
    "walk_keys",
]

T = TypeVar("T")
_Parameter = torch.nn.Parameter


def flatten_parameters(value: Any) -> list[torch.nn.Parameter]:
    """Unroll a model into the list of its parameters (Hasktorch's ``flattenParameters``).

    Works on any value: a Parameterized model, a tuple of layers, a dict of models...
    The order is deterministic: depth first, fields in declaration order, sequences by
    index, dicts in insertion order. A Parameter reachable at several paths (tied weights)
    appears once, at its first path.

    Args:
        value: the model.

    Returns:
        The parameters, in the order ``replace_parameters`` consumes them.

    Raises:
        HiddenParameterError: a Parameter sits where diffprog cannot traverse (inside a plain
            object or a ``torch.nn.Module``).
        CycleError: the value contains itself.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> layer = sample(LinearSpec(3, 1), generator=torch.Generator().manual_seed(0))
        >>> [tuple(p.shape) for p in flatten_parameters(layer)]
        [(1, 3), (1,)]
    """
    out: list[torch.nn.Parameter] = []
    try:
        t = type(value)
        if t is _Parameter:
            return [value]
        (_CACHE.get(t) or node_for(t)).flatten(value, out)
    except (ModelError, RecursionError) as e:
        _explain(value, e)
        raise
    return unique(out)


def replace_parameters(value: T, params: Iterable[torch.Tensor]) -> T:
    """Rebuild ``value`` with new parameters, in ``flatten_parameters`` order.

    Hasktorch's ``replaceParameters``. Pure: the result is a new value and ``value`` itself is
    unchanged and still usable. Parts of the model without parameters are shared, not copied.
    Tied weights stay tied: one entry of ``params`` fills every path of the tie.

    Args:
        value: the model whose structure to keep.
        params: exactly one tensor per entry of ``flatten_parameters(value)``, with the same
            shape, dtype and device (a slot on the ``meta`` device takes a tensor on any device:
            that fills a shape-only skeleton; to move or convert a model, use
            :func:`~diffprog.to`). Pass Parameters (e.g. from ``make_independent``) to get a
            trainable model; plain tensors are put in as they are (as ``torch.func``
            transformations need), and are then not parameters of the result.

    Returns:
        The rebuilt value, of the same type.

    Raises:
        ParameterCountError: too few or too many parameters.
        ParameterShapeError: a parameter's shape, dtype or device differs from its slot.
        ParameterTypeError: something that is not a tensor where a parameter goes.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> layer = sample(LinearSpec(3, 1))
        >>> zeroed = replace_parameters(
        ...     layer, [make_independent(torch.zeros_like(p)) for p in flatten_parameters(layer)]
        ... )
        >>> zeroed.weight.abs().sum().item(), layer is not zeroed
        (0.0, True)
    """
    params = list(params)
    stream = ParamStream(params)
    try:
        new = replace_value(value, stream)
        if stream.remaining:
            raise ParameterCountError(
                f"{stream.remaining} parameters left unconsumed: the model has "
                f"{stream.consumed} parameters but {len(params)} were given",
                "Pass exactly the parameters flatten_parameters returns, in its order.",
            )
        _verify(value, params, stream)
    except ParameterCountError as e:
        if stream.remaining == 0:  # ran out, rather than left some over
            needed = len(flatten_parameters(value))
            e.problem = f"too few parameters: the model has {needed} but {len(params)} were given"
        _explain(value, e)
        raise
    except (ModelError, RecursionError) as e:
        _explain(value, e)
        raise
    return new  # type: ignore[no-any-return]


def _verify(value: Any, params: list[Any], stream: ParamStream) -> None:
    """Check the shapes and dtypes of the replacements ``stream`` handed out for ``value``.

    The check runs once, over all parameters (cheaper than one check per slot), so it knows
    which parameter is wrong but not where its slot is. To name the path, the replace is
    replayed on a :class:`CheckingStream`, which raises at the slot: the error then travels up
    through the nodes, which add the path, as every other error does.
    """
    try:
        stream.verify()
        return
    except ModelError as e:
        error = e
    replace_value(value, CheckingStream(params))  # raises with the path
    raise error  # (not reached: the replay meets the same slots)


def named_parameters(value: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters with their paths, in ``state_dict`` style (``layers.0.weight``).

    Same order as ``flatten_parameters``; a tied parameter is named by its first path. Dict keys
    are path parts as they are (``str(key)``); a hand-written instance's parameters are named by
    the field that holds them, or by their position in its list.

    Raises:
        NameClashError: two different parameters would get the same name (dict keys ``1`` and
            ``"1"``, or a key ``"a.b"`` beside a key ``"a"`` holding ``{"b": ...}``); names must
            be unique for selecting by path and for state dicts.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> [name for name, _ in named_parameters({"head": sample(LinearSpec(3, 1))})]
        ['head.weight', 'head.bias']
    """
    result: list[tuple[str, torch.nn.Parameter]] = []
    seen: set[int] = set()
    # name -> the path keys of the parameter it was given to, to report a clash
    named: dict[str, tuple[PathKey, ...]] = {}
    for keys, leaf in walk_keys(value):
        if isinstance(leaf, torch.nn.Parameter) and id(leaf) not in seen:
            seen.add(id(leaf))
            name = state_dict_path(keys)
            first = named.setdefault(name, keys)
            if first is not keys:
                raise name_clash_error(value, name, first, keys)
            result.append((name, leaf))
    return result


def name_clash_error(
    value: Any,
    name: str,
    first: tuple[PathKey, ...],
    second: tuple[PathKey, ...],
    what: str = "parameters",
) -> NameClashError:
    """The error for two different ``what`` (parameters, tensors) both named ``name``: the
    first at path keys ``first``, the second (where the error is raised) at ``second``."""
    err = NameClashError(
        f"two different {what} are both named {name!r}: the one at {render_path(first)} "
        f"and the one here",
        "Names join fields and dict keys with '.', so keys 1 and '1', or a key 'a.b' and a "
        "key 'a' holding a key 'b', collide: rename a dict key so that the names differ.",
    )
    for key in reversed(second):
        err.push(*key)
    err.root = type(value).__name__
    return err


def walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every leaf of ``value`` with its ``state_dict``-style path, depth first in flatten order.

    Leaves are tensors (parameters and constants) and static values (numbers, strings,
    functions...); containers and models are descended into. A leaf reachable at several
    paths (a tied parameter, a shared block) is yielded at each of them. A hand-written
    instance yields the tensors its ``flatten_parameters`` lists, at the paths of the fields
    that hold them where those can be found. For the tensors alone (a tied one once), use
    :func:`~diffprog.named_tensors`; for the values of one type, :func:`~diffprog.collect`.

    Raises:
        HiddenParameterError: a Parameter sits where diffprog cannot traverse.
        CycleError: the value contains itself.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> [(path, type(leaf).__name__) for path, leaf in walk({"head": sample(LinearSpec(3, 1))})]
        [('head.weight', 'Parameter'), ('head.bias', 'Parameter')]
    """
    for keys, leaf in walk_keys(value):
        yield state_dict_path(keys), leaf


def walk_keys(value: Any) -> Iterator[tuple[tuple[PathKey, ...], Any]]:
    """:func:`walk` with each path as its keys (``("attr", "weight")``, ``("index", 2)``,
    ``("key", k)``), which keep what a string path loses (a dict key ``1`` from ``"1"``)."""

    return _walk(value, (), set(), value)


# Why module-level functions rather than closures: a nested function that calls itself holds
# itself through its closure cell, a reference cycle. The cycle would keep whatever the closure
# captured (the model being walked, the values rebuilt) alive after the call, until Python's
# cyclic garbage collector runs: a whole copy of the parameters, when an optimizer's init
# walks a large model.
def _walk(
    v: Any, path: tuple[PathKey, ...], active: set[int], root: Any
) -> Iterator[tuple[tuple[PathKey, ...], Any]]:
    node = node_for(type(v))
    if node.static or isinstance(v, torch.Tensor):
        yield path, v
        return
    if id(v) in active:
        raise _cycle_error(path)
    active.add(id(v))
    try:
        if isinstance(node, HandWrittenNode):
            try:
                own = node.own(v)  # raises for an inconsistent instance
            except ModelError as e:
                raise _located(e, path, root) from None
            yield from _hand_written_leaves(own, v, path)
        else:
            children = node.children(v)
            if not children:
                try:
                    node.flatten(v, [])  # raises for hidden parameters
                except ModelError as e:
                    raise _located(e, path, root) from None
                yield path, v
            for key, child in children:
                yield from _walk(child, (*path, key), active, root)
    finally:
        active.discard(id(v))


def substitute(
    value: T,
    replacements: Mapping[int, Any],
    found: set[int] | None = None,
    unreachable: set[int] | None = None,
) -> T:
    """``value`` with each sub-value whose ``id`` is a key of ``replacements`` swapped for the
    mapped value; containers on the way are rebuilt, everything else is shared.

    The primitive behind state updates (a BatchNorm layer handing back its new running
    statistics): the caller holds the originals alive while the ids are in use. If ``found``
    is given, the ids that were found (and so replaced) are added to it; a sub-value inside a
    hand-written instance or an opaque object is not looked for. If ``unreachable`` is given,
    the ids of ``replacements`` that sit inside a hand-written instance (and so could not be
    replaced there) are added to it.

    Example:
        >>> a, b = [1], [2]
        >>> substitute({"x": a, "y": (b,)}, {id(b): [3]})
        {'x': [1], 'y': ([3],)}
    """
    if not replacements:
        return value
    built: dict[int, Any] = {}  # a container shared at several paths is rebuilt once
    return _substitute(value, replacements, found, unreachable, built)  # type: ignore[no-any-return]


def _substitute(
    v: Any,
    replacements: Mapping[int, Any],
    found: set[int] | None,
    unreachable: set[int] | None,
    built: dict[int, Any],
) -> Any:
    new = replacements.get(id(v), _MISSING)
    if new is not _MISSING:
        if found is not None:
            found.add(id(v))
        return new
    node = node_for(type(v))
    if isinstance(node, HandWrittenNode):
        if unreachable is not None:
            unreachable.update(_held_inside(v, replacements))
        return v
    if node.static:
        return v
    if id(v) in built:
        return built[id(v)]
    children = node.children(v)
    rebuilt = [_substitute(child, replacements, found, unreachable, built) for _, child in children]
    if all(n is c for n, (_, c) in zip(rebuilt, children, strict=True)):
        return v
    result = built[id(v)] = node.rebuild(v, rebuilt)
    return result


_MISSING = object()


def _held_inside(value: Any, ids: Mapping[int, Any]) -> set[int]:
    """The keys of ``ids`` that are ids of objects anywhere inside ``value`` (``value`` itself
    not counted), looked for as the hidden-parameter scan looks (``scan_children``)."""
    inside: set[int] = set()
    seen: set[int] = set()
    stack: list[Any] = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in ids and v is not value:
            inside.add(id(v))
        children = scan_children(v)
        if isinstance(children, list):
            stack.extend(child for _, child in children)
    return inside


def _located(error: ModelError, path: tuple[PathKey, ...], root: Any) -> ModelError:
    """``error`` (raised at ``path`` in ``root``) with the path and the root's name added."""
    for key in reversed(path):
        error.push(*key)
    error.root = error.root or type(root).__name__
    return error


def _hand_written_leaves(
    own: list[torch.Tensor], v: Any, path: tuple[PathKey, ...]
) -> Iterator[tuple[tuple[PathKey, ...], Any]]:
    """The parameters a hand-written instance lists, each at the path of the field that holds
    it (the fields as the derived instance would see them), or at its position in the list."""
    # Every field path of each tensor, in field order: a tensor listed twice (a tie inside
    # the instance, ``[self.enc, self.dec]`` with enc is dec) gets its n-th path at its n-th
    # entry, so that each entry has a path of its own.
    where: dict[int, list[tuple[PathKey, ...]]] = {}
    fields = fields_node(type(v)).children(v) if dataclasses.is_dataclass(v) else []
    for key, child in fields:
        try:
            for keys, leaf in walk_keys(child):
                if isinstance(leaf, torch.Tensor):
                    where.setdefault(id(leaf), []).append((key, *keys))
        except ModelError:  # a field the instance does not traverse may hold anything
            continue
    used: dict[int, int] = {}
    for index, p in enumerate(own):
        paths = where.get(id(p), [])
        n = used.get(id(p), 0)
        used[id(p)] = n + 1
        yield (*path, *(paths[n] if n < len(paths) else (("index", index),))), p


def _cycle_error(path: tuple[PathKey, ...]) -> CycleError:
    err = CycleError(
        "this value is one of its own ancestors (a cycle)",
        "A model must be a tree (shared sub-values are fine, loops are not): "
        "remove the back-reference.",
    )
    for key in reversed(path):
        err.push(*key)
    return err


def _explain(value: Any, error: BaseException) -> None:
    """Complete an error from a fast traversal before it propagates: name the model in a
    ``ModelError``, and turn deep recursion into a ``CycleError`` when (and only when) it comes
    from a cycle. Returns for the caller to re-raise ``error`` itself."""
    if isinstance(error, ModelError):
        if not error.root:
            error.root = type(value).__name__
        return
    # The fast paths keep no record of where they are, so look for the cycle now.
    try:
        for _ in walk_keys(value):
            pass
    except CycleError as e:
        e.root = type(value).__name__
        raise e from None
