"""Out-of-place surgery: ``at(model, where).set(value)`` and ``.apply(fn)``.

Equinox's ``tree_at`` for diffprog models. ``where`` names places of the model (a path string
or a selector function); the result is a new model in which only those places (and the
containers on the way to them) are new: everything else is the same object as before.

Ties: a tensor (or a sub-model holding tensors) reachable at several paths is *one* value, as
in PyTorch and in ``replace_parameters``; changing it at one of its paths changes it at all of
them (the tie is kept), unless ``untie=True`` asks to change only the places named.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch

from diffprog._autograd import make_independent
from diffprog._errors import ModelError, PathKey, render_path
from diffprog._filter import Filter, Place, Selector, as_selector, places
from diffprog._frozen import Frozen
from diffprog._nodes import HandWrittenNode, node_for
from diffprog._stream import ParamStream
from diffprog._traverse import _hand_written_leaves

__all__ = ["At", "SurgeryError", "at", "rebuild_at"]

T = TypeVar("T")
_Parameter = torch.nn.Parameter


class SurgeryError(ModelError, ValueError):
    """``at`` could not tell which places of the model to change, or cannot change them."""


class _Marker:
    """What a selector sees in place of a non-tensor leaf (an int, a string, None, a
    function): a fresh object per place, so that the place it returns is known even when the
    value (a small int, None) is shared by Python between many places."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<the leaf at place {self.index}>"


class At(Generic[T]):
    """Places of a model, to change out of place with :meth:`set` or :meth:`apply`.

    Made by :func:`at`; holds the model and the places found (``paths`` lists them).
    """

    def __init__(
        self, model: T, targets: list[list[Place]], unsure: Sequence[bool] | None = None
    ) -> None:
        self._model = model
        # One entry per place asked for: the place itself first, then the other places of
        # the same value when it is shared (a tie).
        self._targets = targets
        # Per entry: reached by a selector through a tied value, so that which of its places
        # the selector went through is unknown (it matters only with untie=True).
        self._unsure = list(unsure) if unsure is not None else [False] * len(targets)

    @property
    def paths(self) -> list[str]:
        """The ``state_dict``-style paths of the places asked for, in order."""
        return [group[0].path for group in self._targets]

    def set(self, value: Any, *, untie: bool = False) -> T:
        """A new model with ``value`` at the place (or, for several places, ``value[i]`` at
        the i-th place).

        Where a ``Parameter`` was, a plain tensor becomes a ``Parameter`` (sharing its
        storage, cut from any graph: ``make_independent``); where a frozen parameter was, it
        becomes ``Frozen``. A ``Parameter`` or ``Frozen`` given is put in as it is.

        Args:
            value: the new value, or a sequence of one per place when ``where`` named several.
            untie: change only the places named, not the other places of a tied value.

        Returns:
            The new model; every value not on the way to a changed place is shared.

        Raises:
            SurgeryError: several places but ``value`` is not a sequence of as many values;
                a tie whose places would get different values; a value a hand-written
                instance cannot take.
        """
        if len(self._targets) == 1:
            values = [value]
        else:
            if not isinstance(value, (list, tuple)) or len(value) != len(self._targets):
                raise SurgeryError(
                    f"at(...) names {len(self._targets)} places ({', '.join(self.paths)}) "
                    f"but set was given {_describe_count(value)}",
                    "Pass a tuple or list of one value per place, in the order of where.",
                )
            values = list(value)
        return self._rebuild(values, untie)

    def apply(self, fn: Callable[[Any], Any], *, untie: bool = False) -> T:
        """A new model with ``fn(old)`` at each place.

        ``fn`` is called once per distinct value: places holding the same value (a tie) get
        the same result, so ties are kept. Tensors are converted as in :meth:`set`.

        Args:
            fn: old value -> new value.
            untie: change only the places named, not the other places of a tied value.

        Returns:
            The new model.

        Example:
            >>> import diffprog as dp
            >>> from diffprog.nn import LinearSpec
            >>> layer = dp.sample(LinearSpec(2, 2))
            >>> new = dp.at(layer, "bias").apply(torch.zeros_like)
            >>> new.bias.tolist(), new.weight is layer.weight, type(new.bias).__name__
            ([0.0, 0.0], True, 'Parameter')
        """
        memo: dict[int, Any] = {}
        values = []
        for group in self._targets:
            old = group[0].value
            if id(old) not in memo:
                memo[id(old)] = fn(old)
            values.append(memo[id(old)])
        return self._rebuild(values, untie)

    def _rebuild(self, values: list[Any], untie: bool) -> T:
        if untie:
            self._refuse_unsure()
        changes: dict[tuple[PathKey, ...], Any] = {}
        given: dict[tuple[PathKey, ...], Place] = {}
        converted: dict[tuple[int, int], Any] = {}
        for group, new in zip(self._targets, values, strict=True):
            asked = group[0]
            given[asked.keys] = asked
            changes[asked.keys] = _converted(asked, new, converted)
        if not untie:
            for group, new in zip(self._targets, values, strict=True):
                for tied in group[1:]:
                    self._add_tied(changes, given, group[0], tied, _converted(tied, new, converted))
        return rebuild_at(self._model, changes)

    def _refuse_unsure(self) -> None:
        for group, unsure in zip(self._targets, self._unsure, strict=True):
            if unsure:
                paths = ", ".join(repr(p.path) for p in group)
                raise SurgeryError(
                    f"the selector returned a tied value, held at {paths}: which of these "
                    f"places it means cannot be told, and untie=True changes only that one",
                    "Name the place to change by its path string.",
                )

    def _add_tied(
        self,
        changes: dict[tuple[PathKey, ...], Any],
        given: dict[tuple[PathKey, ...], Place],
        asked: Place,
        tied: Place,
        new: Any,
    ) -> None:
        if tied.keys in given:  # named explicitly: its own value wins
            return
        if tied.keys in changes and changes[tied.keys] is not new:
            raise SurgeryError(
                f"{tied.path or '<root>'} holds the same value as several places named, "
                f"which get different values",
                "Name it too (with its own value), or pass untie=True to change only the "
                "places named.",
            )
        changes[tied.keys] = new


def _describe_count(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"one {type(value).__name__}"


def _converted(place: Place, new: Any, memo: dict[tuple[int, int], Any]) -> Any:
    """``new`` as it goes where ``place``'s value was: a plain tensor where a Parameter (or a
    frozen parameter) was becomes one, once per tensor (the same tensor set at several places
    gives one Parameter: a tie).

    Raises:
        SurgeryError: a tensor that cannot be a Parameter (an integer one) where one was.
    """
    old = place.value
    if not isinstance(new, torch.Tensor) or isinstance(new, (_Parameter, Frozen)):
        return new
    if isinstance(old, _Parameter):
        key = (id(new), 0)
        if key not in memo:
            if not (new.is_floating_point() or new.is_complex()):
                raise SurgeryError(
                    f"a Parameter is at {place.path!r}, and the {new.dtype} tensor given for "
                    f"it cannot become one (a Parameter needs a floating point or complex "
                    f"dtype)",
                    "Convert it (t.float()), or replace the value that holds the place.",
                )
            memo[key] = make_independent(new)
        return memo[key]
    if isinstance(old, Frozen):
        key = (id(new), 1)
        if key not in memo:
            memo[key] = Frozen(new)
        return memo[key]
    return new


def at(model: T, where: str | Sequence[str] | Callable[[T], Any] | Selector | type) -> At[T]:
    """Places of ``model`` to change out of place (Equinox's ``tree_at``).

    Args:
        model: any model value (Parameterized values, tuples, lists, dicts, NamedTuples,
            dataclasses, hand-written instances).
        where: a path string in ``state_dict`` style (``"layers.3.weight"``, as
            ``named_parameters`` names parameters; an inlined field may also be named:
            ``"layers.0.weight"`` for ``Sequential``'s ``0.weight``), a list of such paths,
            or a selector function ``lambda m: m.layers[-1].weight``, which may return a
            tuple or list of several places (``lambda m: (m.a.bias, m.b.bias)``). A selector
            only navigates: it sees placeholders for the non-tensor leaves (ints, strings,
            None), so it can return them but not compute with them. Or a filter made with
            ``diffprog.select`` (or a type): every leaf it selects (``apply`` is the way to
            change them: ``at(model, dp.select(Linear) & "*.weight").apply(init)``).

    Returns:
        An :class:`At` with ``set(value)`` and ``apply(fn)``.

    Raises:
        SurgeryError: a path that does not exist (naming the nearest existing ones), a
            selector that reaches nothing in the model (a new object), or a place inside a
            hand-written instance that is not one of the parameters it lists.

    Example:
        >>> import diffprog as dp
        >>> from diffprog.nn import LinearSpec
        >>> model = {"enc": dp.sample(LinearSpec(3, 4)), "head": dp.sample(LinearSpec(4, 1))}
        >>> new = dp.at(model, lambda m: m["head"].bias).set(torch.zeros(1))
        >>> new["head"].bias, new["enc"] is model["enc"]
        (Parameter containing:
        tensor([0.], requires_grad=True), True)
    """
    all_places = places(model)
    unsure: list[bool] | None = None
    if isinstance(where, (Selector, type, re.Pattern)):
        found = _by_filter(model, all_places, where)
    elif isinstance(where, str):
        found = [_by_path(model, all_places, where)]
    elif isinstance(where, (list, tuple)) and all(isinstance(w, str) for w in where):
        if not where:
            raise _error(model, "at(...) was given an empty list of paths", "Name a place.")
        found = [_by_path(model, all_places, w) for w in where]
    elif callable(where):
        found, unsure = _by_selector(model, all_places, where)
    else:
        raise TypeError(
            f"at takes a path string, a list of path strings or a selector function, got "
            f"{type(where).__name__}."
        )
    ties = _Ties(all_places)
    return At(model, [ties.of(place) for place in found], unsure)


def _by_filter(model: Any, all_places: list[Place], where: Filter) -> list[Place]:
    selector = as_selector(where)
    found = [p for p in all_places if p.leaf and _asks(selector, p)]
    if not found:
        raise _error(
            model,
            f"the filter {where!r} selects no leaf of the model",
            "Check it against diffprog.named_parameters (paths are state_dict style).",
        )
    return found


def _asks(selector: Selector, place: Place) -> bool:
    """The filter's answer for one leaf; a predicate that fails on a leaf it did not expect
    (it sees every leaf, a float or an activation too) is named with its path, as in
    ``partition``."""
    try:
        return selector(place.path, place.value, place.ancestors)
    except Exception as e:
        err = SurgeryError(
            f"the filter raised {type(e).__name__}: {e}, on this {type(place.value).__name__}",
            "at's filter sees every leaf (parameters, buffers, and non-tensor fields such as "
            "activations and strides): check the type first, e.g. "
            "lambda path, v: isinstance(v, torch.Tensor) and v.ndim == 1.",
        )
        for key in reversed(place.keys):
            err.push(*key)
        raise err from e


class _Ties:
    """Which places hold the same value, and which values are ties (built once per ``at``).

    A value held at several places is a tie when it is a tensor or holds tensors; ints,
    strings and None shared by Python, and parameter-free sub-values, are not: for them only
    the place named changes.
    """

    def __init__(self, all_places: list[Place]) -> None:
        self.by_id: dict[int, list[Place]] = {}
        self.holding: set[int] = set()  # ids of the tensors and of the values around them
        for place in all_places:
            self.by_id.setdefault(id(place.value), []).append(place)
            if place.leaf and isinstance(place.value, torch.Tensor):
                self.holding.add(id(place.value))
                self.holding.update(map(id, place.ancestors))

    def holds_tensor(self, value: Any) -> bool:
        return id(value) in self.holding

    def of(self, place: Place) -> list[Place]:
        """``place`` first, then the other places of its value if that value is a tie."""
        if not self.holds_tensor(place.value):
            return [place]
        return [place, *(p for p in self.by_id[id(place.value)] if p.keys != place.keys)]


def _by_path(model: Any, all_places: list[Place], where: str) -> Place:
    if where == "":
        raise SurgeryError(
            "at(...) was given an empty path", "Name a place inside the model, e.g. 'weight'."
        )
    matches = [p for p in all_places if p.keys and where in (p.path, p.full_path)]
    distinct = {p.keys: p for p in matches}
    if not distinct:
        for p in all_places:
            if (
                not p.leaf
                and isinstance(node_for(type(p.value)), HandWrittenNode)
                and (
                    not p.keys
                    or any(where.startswith(f"{path}.") for path in (p.path, p.full_path))
                )
            ):
                raise _error(
                    model,
                    f"{where!r} is inside the hand-written instance at {p.path!r} but is not "
                    f"one of the tensors its flatten_parameters lists",
                    "Inside a hand-written instance, at changes only the tensors it lists "
                    "(through its replace_own_parameters); replace the whole instance instead.",
                )
        raise _not_found(model, all_places, f"no place has the path {where!r}", where)
    if len(distinct) > 1:
        raise _error(
            model,
            f"the path {where!r} names several places: "
            f"{', '.join(render_path(k) for k in distinct)}",
            "Rename the dict keys that make their paths collide, or use a selector function.",
        )
    return next(iter(distinct.values()))


def _not_found(model: Any, all_places: list[Place], problem: str, near: str) -> SurgeryError:
    paths = sorted(
        {p.path for p in all_places if p.keys} | {p.full_path for p in all_places if p.keys}
    )
    nearest = difflib.get_close_matches(near, paths, n=3, cutoff=0.0)
    hint = ", ".join(repr(p) for p in nearest) or "(the model has no places)"
    return _error(
        model,
        f"{problem}; the nearest existing paths are {hint}",
        "List them all with diffprog.named_parameters, or select with a function.",
    )


def _error(model: Any, problem: str, fix: str) -> SurgeryError:
    # The problem names its paths itself (they are the point of the message), so the error
    # carries no path of its own, only the model's type.
    return SurgeryError(f"{problem} (in the {type(model).__name__})", fix)


def _by_selector(
    model: Any, all_places: list[Place], where: Callable[[Any], Any]
) -> tuple[list[Place], list[bool]]:
    """The places a selector returns, found by identity in a copy of the model where every
    container is a new object and every non-tensor leaf a marker (one per place); and for
    each, whether it was reached through a tied value (held at several places)."""
    index_of: dict[int, list[int]] = {}
    shadow = _shadow(model, all_places, index_of, iter(range(len(all_places))), [])
    try:
        result = where(shadow)
    except (AttributeError, KeyError, IndexError, TypeError) as e:
        raise _selector_failed(model, all_places, index_of, e) from e
    found = _find(result, index_of)
    if found is None and isinstance(result, types.GeneratorType):
        result = tuple(result)  # lambda m: (layer.weight for layer in m.layers)
    if found is None and isinstance(result, (tuple, list)):
        items = [_find(r, index_of) for r in result]
        for r, f in zip(result, items, strict=True):
            if f is None:
                raise _unreached(model, all_places, r)
        indices = [f for f in items if f is not None]
    elif found is None:
        raise _unreached(model, all_places, result)
    else:
        indices = [found]
    ties = _Ties(all_places)
    return [_one(model, all_places, ties, i) for i in indices], [len(i) > 1 for i in indices]


def _find(value: Any, index_of: dict[int, list[int]]) -> list[int] | None:
    return index_of.get(id(value))


def _one(model: Any, all_places: list[Place], ties: _Ties, indices: list[int]) -> Place:
    """The place a selector reached: the first of ``indices`` (the places of one value kept
    as it is in the shadow copy: a tensor, a hand-written instance). Several places of a
    tensor are a tie, which a change keeps; several places of anything else cannot be told
    apart."""
    first = all_places[indices[0]]
    if len(indices) > 1 and not ties.holds_tensor(first.value):
        paths = ", ".join(all_places[i].path or "<root>" for i in indices)
        raise _error(
            model,
            f"the selector returned a {type(first.value).__name__} held at several places "
            f"({paths}), which it cannot tell apart",
            "Name the place by its path string instead.",
        )
    return first


def _shadow(
    v: Any,
    all_places: list[Place],
    index_of: dict[int, list[int]],
    counter: Any,
    alive: list[Any],
) -> Any:
    """The model as the selector sees it (same order as ``places``): containers rebuilt as
    new objects, non-tensor leaves replaced by markers; tensors and hand-written instances
    kept (found by identity)."""
    index = next(counter)
    place = all_places[index]
    if place.leaf:
        if isinstance(v, torch.Tensor):
            index_of.setdefault(id(v), []).append(index)
            return v
        marker = _Marker(index)
        alive.append(marker)
        index_of[id(marker)] = [index]
        return marker
    node = node_for(type(v))
    if isinstance(node, HandWrittenNode):
        index_of.setdefault(id(v), []).append(index)
        for _ in node.own(v):  # its listed parameters: kept, found by identity
            i = next(counter)
            index_of.setdefault(id(all_places[i].value), []).append(i)
        return v
    children = [
        _shadow(child, all_places, index_of, counter, alive) for _, child in node.children(v)
    ]
    try:
        new = node.rebuild(v, children)
    except Exception:  # a pytree type whose rebuild checks its children: keep the original
        new = v
    alive.append(new)
    index_of.setdefault(id(new), []).append(index)
    return new


def _unreached(model: Any, all_places: list[Place], value: Any) -> SurgeryError:
    if isinstance(value, torch.Tensor):
        views = [
            p
            for p in all_places
            if p.leaf
            and isinstance(p.value, torch.Tensor)
            and p.value.device.type != "meta"
            and value.device == p.value.device
            and value.untyped_storage().data_ptr() == p.value.untyped_storage().data_ptr()
        ]
        if views:
            return _error(
                model,
                f"the selector returned a new tensor computed from the one at "
                f"{views[0].path!r} (a view or an operation), not a place of the model",
                f"Return the tensor itself: select {views[0].path!r}.",
            )
    for place in all_places:
        if (
            not place.leaf
            and isinstance(node_for(type(place.value)), HandWrittenNode)
            and any(value is v for v in getattr(place.value, "__dict__", {}).values())
        ):
            return _error(
                model,
                f"the selector returned a {type(value).__name__} held inside the "
                f"hand-written instance at {place.path or '<root>'!r}, which is not one "
                f"of the tensors its flatten_parameters lists",
                "Inside a hand-written instance, at changes only the tensors it lists "
                "(through its replace_own_parameters); replace the whole instance instead.",
            )
    same_type = [p.path for p in all_places if p.keys and type(p.value) is type(value)]
    where = (
        f"; the model holds values of this type at {', '.join(map(repr, same_type[:5]))}"
        if same_type
        else ""
    )
    return _error(
        model,
        f"the selector returned a {type(value).__name__} that is not part of the model (a new "
        f"object){where}",
        "Return a value of the model itself, e.g. lambda m: m.layers[0].weight.",
    )


def _selector_failed(
    model: Any, all_places: list[Place], index_of: dict[int, list[int]], e: Exception
) -> SurgeryError:
    obj = getattr(e, "obj", None) if isinstance(e, AttributeError) else None
    name = getattr(e, "name", None) if isinstance(e, AttributeError) else None
    if obj is not None and id(obj) in index_of:
        place = all_places[index_of[id(obj)][0]]
        if isinstance(obj, _Marker):
            return _error(
                model,
                f"the selector went past the leaf {place.path!r} (a "
                f"{type(place.value).__name__}): {e}",
                "A selector returns places of the model; it sees placeholders for ints, "
                "strings and other non-tensor leaves, so it cannot compute with them. Select "
                f"{place.path!r} itself, or use a path string.",
            )
        near = f"{place.full_path}.{name}" if place.keys else str(name)
        return _not_found(model, all_places, f"the selector failed: {e}", near)
    return _error(
        model,
        f"the selector failed on the model: {type(e).__name__}: {e}",
        "A selector only navigates (attributes, indices, keys) and sees placeholders for "
        "non-tensor leaves (ints, strings...): compute nothing with them, or use a path string.",
    )


# --- rebuilding ---------------------------------------------------------------------------

_HERE = ("<here>", None)


def rebuild_at(model: T, changes: dict[tuple[PathKey, ...], Any]) -> T:
    """``model`` with the value at each path of ``changes`` replaced; containers on the way
    are rebuilt, everything else shared (a value shared at several paths and changed the same
    way at each is rebuilt once, so it stays shared).

    A parameter listed by a hand-written instance is replaced through the instance's own
    ``replace_own_parameters``.

    Raises:
        SurgeryError: one place inside another (the inner change would be lost), a change
            inside a hand-written instance other than one of the tensors it lists, or a
            non-tensor value for one of them.
    """
    trie: dict[Any, Any] = {}
    for keys, new in changes.items():
        level = trie
        for depth, key in enumerate(keys):
            if _HERE in level:
                raise _overlap(model, keys[:depth], keys)
            level = level.setdefault(key, {})
        if len(level) > (_HERE in level):  # places below this one are changed too
            inner = next(k for k in changes if len(k) > len(keys) and k[: len(keys)] == keys)
            raise _overlap(model, keys, inner)
        level[_HERE] = new
    if _HERE in trie:
        return trie[_HERE]  # type: ignore[no-any-return]
    return _rebuild(model, trie, {}, ())  # type: ignore[no-any-return]


def _overlap(model: Any, outer: tuple[PathKey, ...], inner: tuple[PathKey, ...]) -> SurgeryError:
    return _error(
        model,
        f"the places {render_path(outer)} and {render_path(inner)} overlap (one holds the "
        f"other), so the change at the inner one would be lost",
        "Change the outer place only (with a value that has the inner change), or the inner "
        "ones; mind that a tied value changes at all its places (untie=True: only there).",
    )


def _signature(trie: dict[Any, Any]) -> Any:
    return frozenset(
        (key, id(sub)) if key == _HERE else (key, _signature(sub)) for key, sub in trie.items()
    )


def _rebuild(v: Any, trie: dict[Any, Any], memo: dict[Any, Any], keys: tuple[PathKey, ...]) -> Any:
    if _HERE in trie:
        return trie[_HERE]
    memo_key = (id(v), _signature(trie))
    if memo_key in memo:
        return memo[memo_key]
    node = node_for(type(v))
    if isinstance(node, HandWrittenNode):
        new = _rebuild_hand_written(v, node, trie, keys)
    else:
        children = node.children(v)
        rebuilt = [
            _rebuild(child, trie[key], memo, (*keys, key)) if key in trie else child
            for key, child in children
        ]
        new = (
            v
            if all(a is b for a, b in zip(rebuilt, (c for _, c in children), strict=True))
            else node.rebuild(v, rebuilt)
        )
    memo[memo_key] = new
    return new


def _flat(trie: dict[Any, Any], prefix: tuple[PathKey, ...] = ()) -> dict[tuple[PathKey, ...], Any]:
    out: dict[tuple[PathKey, ...], Any] = {}
    for key, sub in trie.items():
        if key == _HERE:
            out[prefix] = sub
        else:
            out.update(_flat(sub, (*prefix, key)))
    return out


def _rebuild_hand_written(
    v: Any, node: HandWrittenNode, trie: dict[Any, Any], keys: tuple[PathKey, ...]
) -> Any:
    """A hand-written instance with some of the tensors it lists replaced, rebuilt by its own
    ``replace_own_parameters`` (reading its whole list, the others unchanged)."""
    own = node.own(v)
    slot_of = {sub: i for i, (sub, _) in enumerate(_hand_written_leaves(own, v, ()))}
    new_list = list(own)
    for sub, new in _flat(trie).items():
        index = slot_of.get(sub)
        if index is None:
            raise _inside_hand_written(v, keys, sub, "is not one of the tensors it lists")
        if not isinstance(new, torch.Tensor):
            raise _inside_hand_written(
                v, keys, sub, f"would get a {type(new).__name__}, but it takes only tensors"
            )
        new_list[index] = new
    rebuilt = node._run(v, ParamStream(new_list))
    _check_still_listed(rebuilt, node, new_list, slot_of, keys)
    return rebuilt


def _check_still_listed(
    rebuilt: Any,
    node: HandWrittenNode,
    new_list: list[torch.Tensor],
    slot_of: dict[tuple[PathKey, ...], int],
    keys: tuple[PathKey, ...],
) -> None:
    """Refuse a rebuilt hand-written instance that no longer lists a tensor it was given.

    Why: an instance that delegates to a sub-model (``[self.extra,
    *dp.flatten_parameters(self.inner)]``) lists only the sub-model's *Parameters*; a tensor
    put there that is not one (a ``Frozen`` one, a plain tensor) silently drops out of its
    list, so that counting, unfreezing and ``to`` would no longer see it.
    """
    listed = {id(t) for t in node.own(rebuilt)}
    for sub, index in slot_of.items():
        if id(new_list[index]) not in listed:
            raise _inside_hand_written(
                rebuilt,
                keys,
                sub,
                "would drop out of its flatten_parameters once replaced (its list skips "
                f"a {type(new_list[index]).__name__}, e.g. by listing a sub-model through "
                "dp.flatten_parameters, which lists trainable Parameters only)",
                fix="Make the instance's flatten_parameters list that tensor itself "
                "(self.inner.weight) and its replace_own_parameters read it back, so that it "
                "stays listed whatever its type; or leave this instance's tensors out of the "
                "filter.",
            )


def _inside_hand_written(
    v: Any, keys: tuple[PathKey, ...], sub: tuple[PathKey, ...], problem: str, fix: str = ""
) -> SurgeryError:
    err = SurgeryError(
        f"{render_path(sub)} inside the hand-written instance {type(v).__qualname__} {problem}",
        fix
        or "Inside a hand-written instance, at changes only the tensors its flatten_parameters "
        "lists (through its replace_own_parameters); replace the whole instance instead.",
    )
    for key in reversed(keys):
        err.push(*key)
    return err
