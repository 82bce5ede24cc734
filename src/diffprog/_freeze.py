"""Selecting and freezing: ``partition``/``combine``, ``freeze``/``unfreeze``,
``count_parameters``.

Freezing is Hasktorch's distinction between a ``Parameter`` (trainable) and a ``Tensor``
(constant): a frozen parameter is a :class:`~diffprog.Frozen` tensor, which
``flatten_parameters`` skips as it skips any constant, so that no optimizer sees it (no
gradient, no state). ``Frozen`` rather than a plain tensor, so that ``unfreeze`` can tell it
from a buffer (a running mean must never become trainable).
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

import torch

from diffprog._autograd import make_independent
from diffprog._errors import DiffprogError, ModelError, PathKey, state_dict_path
from diffprog._filter import Filter, Place, as_selector, is_container, places
from diffprog._frozen import Frozen
from diffprog._nodes import HandWrittenNode, node_for
from diffprog._surgery import SurgeryError, rebuild_at
from diffprog._traverse import _hand_written_leaves, flatten_parameters

__all__ = ["combine", "count_parameters", "freeze", "partition", "unfreeze"]

T = TypeVar("T")
_Parameter = torch.nn.Parameter


def _selected_leaves(model: Any, filter: Filter | None) -> tuple[list[Place], set[int]]:
    """The places of the parameters (trainable or frozen) of ``model``, and the ids of those
    ``filter`` selects at one place at least (all of them for ``None``).

    The filter sees parameters only, as the optimizers' ``freeze=`` does: a predicate may
    read ``value.ndim`` without meeting an activation function or a buffer.
    """
    leaves = [p for p in places(model) if p.leaf and isinstance(p.value, (_Parameter, Frozen))]
    if filter is None:
        return leaves, {id(p.value) for p in leaves}
    selector = as_selector(filter)
    return leaves, {id(p.value) for p in leaves if selector(p.path, p.value, p.ancestors)}


def _refuse_selecting_nothing(
    owner: str, filter: Filter | None, leaves: list[Place], chosen: set[int]
) -> None:
    """A filter that selects no parameter (trainable or frozen) is a mistake, most likely a
    typo: refuse it rather than silently freeze (or unfreeze) nothing. Selecting parameters
    that are already frozen (or trainable) is fine: freezing twice is freezing once."""
    if filter is None or any(id(p.value) in chosen for p in leaves):
        return
    raise ValueError(
        f"{owner}: {filter!r} selects no parameter of the model; its parameters are: "
        f"{', '.join(dict.fromkeys(p.path for p in leaves)) or '(none)'}."
    )


def freeze(model: T, filter: Filter | None = None) -> T:
    """Freeze the selected parameters: each becomes a :class:`~diffprog.Frozen` constant.

    A frozen parameter gets no gradient and no optimizer state: ``flatten_parameters`` (so
    every optimizer, ``run_step`` and ``grad``) skips it, as it skips buffers. It keeps its
    storage (no copy) and can be turned back with :func:`unfreeze`. A tied parameter is frozen
    at all its paths when the filter selects it at any of them (the tie is kept).

    Args:
        model: any model value.
        filter: which parameters (a glob over their paths, a type, a predicate; see
            ``diffprog.select``); ``None``: all of them.

    Returns:
        The new model; everything else is shared with ``model``.

    Raises:
        ValueError: the filter selects no parameter, trainable or frozen (a typo would
            otherwise freeze nothing).
        DiffprogError: a selected parameter is sharded (a DTensor): freeze before ``shard``.

    Example:
        >>> import diffprog as dp
        >>> from diffprog.nn import LinearSpec
        >>> model = {"backbone": dp.sample(LinearSpec(3, 4)), "head": dp.sample(LinearSpec(4, 1))}
        >>> frozen = dp.freeze(model, "backbone.*")
        >>> [name for name, _ in dp.named_parameters(frozen)]
        ['head.weight', 'head.bias']
        >>> type(frozen["backbone"].weight).__name__
        'Frozen'
    """
    leaves, chosen = _selected_leaves(model, filter)
    _refuse_selecting_nothing("freeze", filter, leaves, chosen)
    picked = [p for p in leaves if isinstance(p.value, _Parameter) and id(p.value) in chosen]
    _refuse_sharded(picked)
    made: dict[int, Frozen] = {}
    changes: dict[tuple[PathKey, ...], Any] = {}
    for place in picked:
        p = place.value
        if id(p) not in made:
            made[id(p)] = Frozen(p)
        changes[place.keys] = made[id(p)]
    return rebuild_at(model, changes)


def _refuse_sharded(picked: list[Place]) -> None:
    """Refuse to freeze a sharded (DTensor) parameter: a frozen one must be whole on every
    rank (``diffprog.distributed.shard`` leaves frozen parameters whole)."""
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before
    if module is None:
        return
    for place in picked:
        if isinstance(place.value, module.DTensor):
            raise DiffprogError(
                f"freeze: {state_dict_path(place.keys)} is sharded (a DTensor); a frozen "
                "parameter stays whole on every rank. Freeze before shard: "
                "shard(freeze(diffprog.distributed.unshard(model), ...), mesh)."
            )


def unfreeze(model: T, filter: Filter | None = None) -> T:
    """Turn frozen parameters (:class:`~diffprog.Frozen`) back into trainable Parameters.

    Buffers (plain tensors) never become parameters: only what :func:`freeze` froze is
    unfrozen. The new Parameters share the storage of the frozen tensors.

    After unfreezing, the model has more parameters than the optimizer built for it: build a
    new optimizer (``Adam.init(model)``); stepping the old one raises.

    Args:
        model: any model value.
        filter: which frozen parameters; ``None``: all of them.

    Returns:
        The new model.

    Raises:
        ValueError: the filter selects no parameter, frozen or trainable.

    Example:
        >>> import diffprog as dp
        >>> from diffprog.nn import LinearSpec
        >>> layer = dp.freeze(dp.sample(LinearSpec(3, 1)))
        >>> len(dp.flatten_parameters(layer)), len(dp.flatten_parameters(dp.unfreeze(layer)))
        (0, 2)
    """
    leaves, chosen = _selected_leaves(model, filter)
    _refuse_selecting_nothing("unfreeze", filter, leaves, chosen)
    made: dict[int, _Parameter] = {}
    changes: dict[tuple[PathKey, ...], Any] = {}
    for place in leaves:
        f = place.value
        if isinstance(f, Frozen) and id(f) in chosen:
            if id(f) not in made:
                made[id(f)] = make_independent(f.as_subclass(torch.Tensor))
            changes[place.keys] = made[id(f)]
    return rebuild_at(model, changes)


def count_parameters(model: Any, filter: Filter | None = None) -> int:
    """The number of parameter elements of ``model`` (a tied parameter counted once).

    Counts trainable and frozen parameters, as ``sum(p.numel() for p in
    module.parameters())`` counts torch's (frozen ones there have ``requires_grad=False``);
    buffers are not counted. ``count_parameters(model, torch.nn.Parameter)`` counts the
    trainable ones only, ``count_parameters(model, diffprog.Frozen)`` the frozen ones.

    Args:
        model: any model value.
        filter: which parameters to count (selected at one path at least); ``None``: all.

    Returns:
        The number of elements.

    Example:
        >>> import diffprog as dp
        >>> from diffprog.nn import LinearSpec
        >>> model = {"a": dp.sample(LinearSpec(3, 4)), "b": dp.sample(LinearSpec(4, 1))}
        >>> model = dp.freeze(model, "a.*")
        >>> dp.count_parameters(model), dp.count_parameters(model, torch.nn.Parameter)
        (21, 5)
    """
    leaves, chosen = _selected_leaves(model, filter)
    counted = {
        id(p.value): p.value
        for p in leaves
        if isinstance(p.value, (_Parameter, Frozen)) and id(p.value) in chosen
    }
    return sum(t.numel() for t in counted.values())


def partition(model: T, filter: Filter) -> tuple[T, T]:
    """Split ``model`` in two halves of the same structure: ``(selected, rest)``.

    Equinox's ``partition``. The filter is applied to every leaf (parameters, buffers and
    non-tensor values such as a layer's ``stride`` or activation: a predicate sees them all);
    ``selected`` holds the selected leaves and ``None`` in place of the others, ``rest`` the
    opposite. :func:`combine` puts them back together. A hand-written instance is not split:
    it goes whole to the half that its listed parameters all go to.

    Args:
        model: any model value.
        filter: which leaves (a glob over paths, a type, a predicate ``(path, value)``...).

    Returns:
        ``(selected, rest)``; the leaves are the model's own objects (not copies).

    Raises:
        SurgeryError: the filter selects some, but not all, of the parameters of a
            hand-written instance.

    Example:
        >>> import diffprog as dp
        >>> from diffprog.nn import LinearSpec
        >>> layer = dp.sample(LinearSpec(2, 1))
        >>> biases, rest = dp.partition(layer, "bias")
        >>> biases.weight is None, rest.bias is None, dp.combine(biases, rest).bias is layer.bias
        (True, True, True)
    """
    flatten_parameters(model)  # the errors of a malformed model, with their paths
    selector = as_selector(filter)
    try:
        selected, rest, _ = _split(model, (), (), selector, {})
    except ModelError as e:
        e.root = e.root or type(model).__name__
        raise
    return selected, rest


def _split(
    v: Any,
    keys: tuple[PathKey, ...],
    ancestors: tuple[Any, ...],
    selector: Any,
    memo: dict[Any, tuple[Any, Any]],
) -> tuple[Any, Any, tuple[bool, ...]]:
    """``(selected half, rest half, which leaves were selected)`` of ``v``."""
    node = node_for(type(v))
    if isinstance(node, HandWrittenNode):
        return _split_hand_written(v, node, keys, ancestors, selector)
    if isinstance(v, torch.Tensor) or not is_container(node):
        chosen = _ask(selector, keys, v, ancestors)
        return (v, None, (True,)) if chosen else (None, v, (False,))
    inner = (*ancestors, v)
    halves = [_split(child, (*keys, key), inner, selector, memo) for key, child in node.children(v)]
    bits = tuple(b for _, _, bs in halves for b in bs)
    # A value shared at several paths and split the same way at each stays shared.
    known = memo.get((id(v), bits))
    if known is not None:
        return (*known, bits)
    children = [c for _, c in node.children(v)]
    selected = _rebuilt(node, v, [a for a, _, _ in halves], children)
    rest = _rebuilt(node, v, [b for _, b, _ in halves], children)
    memo[(id(v), bits)] = (selected, rest)
    return selected, rest, bits


def _ask(selector: Any, keys: tuple[PathKey, ...], value: Any, ancestors: tuple[Any, ...]) -> bool:
    """The filter's answer for one leaf; a predicate that fails on a leaf it did not expect
    (partition shows it every leaf, an activation function too) is named with its path."""
    try:
        return bool(selector(state_dict_path(keys), value, ancestors))
    except Exception as e:
        err = SurgeryError(
            f"the filter raised {type(e).__name__}: {e}, on this {type(value).__name__}",
            "partition's filter sees every leaf (parameters, buffers, and non-tensor fields "
            "such as activations and strides): check the type first, e.g. "
            "lambda path, v: isinstance(v, torch.Tensor) and v.ndim < 2.",
        )
        for key in reversed(keys):
            err.push(*key)
        raise err from e


def _rebuilt(node: Any, v: Any, new: list[Any], old: list[Any]) -> Any:
    if all(a is b for a, b in zip(new, old, strict=True)):
        return v
    return node.rebuild(v, new)


def _split_hand_written(
    v: Any,
    node: HandWrittenNode,
    keys: tuple[PathKey, ...],
    ancestors: tuple[Any, ...],
    selector: Any,
) -> tuple[Any, Any, tuple[bool, ...]]:
    inner = (*ancestors, v)
    listed = list(_hand_written_leaves(node.own(v), v, keys))
    if not listed:
        bits: tuple[bool, ...] = (_ask(selector, keys, v, ancestors),)
    else:
        bits = tuple(_ask(selector, k, p, inner) for k, p in listed)
    if all(bits):
        return v, None, bits
    if not any(bits):
        return None, v, bits
    err = SurgeryError(
        f"the filter selects some but not all of the parameters of the hand-written instance "
        f"{type(v).__qualname__}",
        "partition cannot split it (its replace_own_parameters needs all of them): select "
        "all or none of its parameters.",
    )
    for key in reversed(keys):
        err.push(*key)
    raise err


def combine(*trees: Any) -> Any:
    """Put halves made by :func:`partition` back together: at each leaf, the first value
    that is not ``None``.

    Args:
        *trees: values of the same structure (``None`` where a half holds nothing).

    Returns:
        The combined model; leaves (and values held whole by a half) are shared.

    Raises:
        SurgeryError: the trees differ in structure (naming the path).

    Example:
        >>> combine({"a": 1, "b": None}, {"a": None, "b": 2})
        {'a': 1, 'b': 2}
    """
    if not trees:
        raise TypeError("combine needs at least one tree.")
    try:
        return _combine(list(trees), {})
    except ModelError as e:
        e.root = e.root or type(next((t for t in trees if t is not None), None)).__name__
        raise


def _combine(values: list[Any], memo: dict[tuple[int, ...], Any]) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if len(present) == 1 or all(p is first for p in present[1:]):
        return first
    node = node_for(type(first))
    if isinstance(first, torch.Tensor) or not is_container(node):
        return first  # two leaves here: the first wins
    key = tuple(map(id, values))
    if key in memo:
        return memo[key]
    columns = [node.children(p) for p in present]
    for p, c in zip(present[1:], columns[1:], strict=True):
        if type(p) is not type(first) or [k for k, _ in c] != [k for k, _ in columns[0]]:
            raise SurgeryError(
                f"the trees differ here: a {type(first).__name__} with "
                f"{len(columns[0])} children and a {type(p).__name__} with {len(c)}",
                "combine takes halves of the same structure, as partition makes them.",
            )
    combined = []
    for i, (k, _) in enumerate(columns[0]):
        try:
            combined.append(_combine([col[i][1] for col in columns], memo))
        except ModelError as e:
            e.push(*k)
            raise
    result = _rebuilt(node, first, combined, [c for _, c in columns[0]])
    memo[key] = result
    return result
