"""Comparing whole models: ``tree_equal`` (exact) and ``allclose``, naming the first difference."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Any

import torch

from diffprog._errors import PathKey, render_path
from diffprog._frozen import Frozen
from diffprog._nodes import HandWrittenNode, fields_node, node_for
from diffprog._repr import leaf_text

__all__ = ["Comparison", "allclose", "tree_equal"]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The result of :func:`tree_equal` / :func:`allclose`: truthy when the models agree.

    When they differ it is falsy and names the first difference (depth first, in field
    order: ``flatten_parameters`` order, except inside a hand-written instance that lists
    its fields in another order), so ``assert dp.tree_equal(a, b)`` fails with a message that
    says where and why.

    Attributes:
        equal: whether the two values agree.
        path: where they first differ, Python-accessor style (``blocks[2].linear.weight``,
            ``<root>`` for the values themselves); ``None`` when equal.
        keys: the same place as path keys (as ``walk_keys`` gives them, except inside a
            hand-written instance that is not a dataclass, which is compared attribute by
            attribute and named by them); ``()`` when equal.
        reason: what differs there (``"values differ: ..."``, ``"shape [2, 3] vs [3, 2]"``...);
            ``None`` when equal.

    Example:
        >>> import diffprog as dp
        >>> a = {"w": dp.make_independent(torch.zeros(2))}
        >>> b = {"w": dp.make_independent(torch.tensor([0.0, 1.0]))}
        >>> result = dp.tree_equal(a, b)
        >>> bool(result), result.path
        (False, "['w']")
        >>> result.reason
        'values differ: 1 of 2 elements, largest |a - b| = 1.0 at index (1,) (0.0 vs 1.0)'
    """

    equal: bool
    path: str | None = None
    keys: tuple[PathKey, ...] = ()
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.equal

    def __repr__(self) -> str:
        if self.equal:
            return "Comparison(equal=True)"
        return f"Comparison(equal=False, path={self.path!r}, reason={self.reason!r})"

    def __str__(self) -> str:
        return "equal" if self.equal else f"differ at {self.path}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class _Tolerance:
    """How tensor values are compared: exactly (``close=False``) or as ``torch.isclose``."""

    close: bool
    rtol: float
    atol: float
    equal_nan: bool


def tree_equal(a: Any, b: Any, *, equal_nan: bool = False) -> Comparison:
    """Whether two models are the same value: structure, static fields and tensors exactly.

    Compared: the types of every sub-value (a ``Parameter``, a frozen parameter and a plain
    tensor are different kinds, so the same numbers held as a Parameter in one model and as a
    buffer in the other are a difference), static fields (``==``), container lengths, dict keys
    and their order (the order of ``flatten_parameters``), ties (a tensor shared at two paths in
    one model but not in the other), and each tensor's shape, dtype, device and values
    (``torch.equal``). Meta tensors have no values: two with the same shape, dtype and kind are
    equal.

    Args:
        a: a model (any value diffprog traverses).
        b: the other.
        equal_nan: count NaN as equal to NaN (as ``torch.allclose``'s ``equal_nan``).

    Returns:
        A :class:`Comparison`: truthy when equal, else falsy with the ``path`` and ``reason`` of
        the first difference, which ``assert`` shows.

    Example:
        >>> import diffprog as dp
        >>> from diffprog.nn import LinearSpec
        >>> layer = dp.sample(LinearSpec(3, 2))
        >>> bool(dp.tree_equal(layer, dp.replace_parameters(layer, dp.flatten_parameters(layer))))
        True
        >>> dp.tree_equal(layer, dp.sample(LinearSpec(3, 2))).path
        'weight'
    """
    return _Comparer(_Tolerance(False, 0.0, 0.0, equal_nan)).run(a, b)


def allclose(
    a: Any, b: Any, *, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False
) -> Comparison:
    """Whether two models have the same structure and tensors close to each other.

    As :func:`tree_equal`, but floating and complex tensor values are compared as
    ``torch.allclose`` does (``|a - b| <= atol + rtol * |b|``, with its defaults); integer and
    bool tensors, and static fields (numbers included), must still be equal.

    Args:
        a: a model.
        b: the other (the reference: ``rtol`` scales with ``|b|``, as in ``torch.allclose``).
        rtol: relative tolerance.
        atol: absolute tolerance.
        equal_nan: count NaN as equal to NaN.

    Returns:
        A :class:`Comparison`, truthy when close.

    Example:
        >>> import diffprog as dp
        >>> a = (dp.make_independent(torch.ones(3)),)
        >>> b = (dp.make_independent(torch.ones(3) + 1e-7),)
        >>> bool(dp.allclose(a, b)), bool(dp.tree_equal(a, b))
        (True, False)
    """
    return _Comparer(_Tolerance(True, rtol, atol, equal_nan)).run(a, b)


class _Difference(Exception):
    """Raised at the first difference, with its path collected while it unwinds (only the
    failing comparison pays for the path)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reversed_keys: list[PathKey] = []


def _kind(t: torch.Tensor) -> str:
    """What a tensor is in a model: its type and role."""
    if isinstance(t, torch.nn.Parameter):
        name = type(t).__name__
        return "a Parameter" if name == "Parameter" else f"a Parameter ({name})"
    if isinstance(t, Frozen):
        return "a frozen parameter (Frozen)"
    if type(t) is torch.Tensor:
        return "a plain tensor (constant)"
    return f"a {type(t).__name__} tensor"


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


class _Comparer:
    """One comparison: the tolerance, and the first path of each tensor on either side (ties)."""

    def __init__(self, tolerance: _Tolerance) -> None:
        self.tolerance = tolerance
        # id of a tensor -> the path where it was first met, in a and in b
        self.first_a: dict[int, tuple[PathKey, ...]] = {}
        self.first_b: dict[int, tuple[PathKey, ...]] = {}
        # pairs (id(a), id(b)) of containers being compared, to stop at a cycle
        self.active: set[tuple[int, int]] = set()
        # pairs found equal: a sub-model shared at several paths on both sides is compared
        # once (its tensors were met at the same first paths on both sides, so its ties agree)
        self.equal: set[tuple[int, int]] = set()

    def run(self, a: Any, b: Any) -> Comparison:
        try:
            self.compare(a, b, ())
        except _Difference as d:
            keys = tuple(reversed(d.reversed_keys))
            return Comparison(False, render_path(keys), keys, d.reason)
        return Comparison(True)

    def compare(self, a: Any, b: Any, path: tuple[PathKey, ...]) -> None:
        # The same static object is equal; the same sub-model is still walked, as its tensors
        # may be tied to others differently on each side.
        if a is b and not isinstance(a, torch.Tensor) and node_for(type(a)).static:
            return
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            self.tensors(a, b, path)
            return
        if type(a) is not type(b):
            raise _Difference(f"type {_type_names(type(a), type(b))}")
        children = self.children(a, b)
        if children is None:
            self.static(a, b)
            return
        pair = (id(a), id(b))
        if pair in self.active or pair in self.equal:
            return  # a cycle (met again while comparing it), or a pair found equal before
        self.active.add(pair)
        try:
            for key, x, y in children:
                try:
                    self.compare(x, y, (*path, key))
                except _Difference as d:
                    d.reversed_keys.append(key)
                    raise
        finally:
            self.active.discard(pair)
        self.equal.add(pair)

    def children(self, a: Any, b: Any) -> list[tuple[PathKey, Any, Any]] | None:
        """The children of ``a`` and ``b`` (of one type) paired by key, or ``None`` for leaves.

        Raises a difference when the keys themselves differ (lengths, dict keys).
        """
        node = node_for(type(a))
        if node.static:
            return None
        if isinstance(node, HandWrittenNode):
            if dataclasses.is_dataclass(a):
                node = fields_node(type(a))  # its fields hold everything it is made of
            else:
                return _paired(_attributes(a), _attributes(b), "attributes")
        xs, ys = node.children(a), node.children(b)
        if not xs and not ys:
            # an opaque value (a plain object, a torch.nn.Module): equal by ``==``, or by
            # attributes where its class keeps identity equality
            if _by_attributes(a):
                return _paired(_attributes(a), _attributes(b), "attributes")
            return None
        what = "keys" if isinstance(a, dict) else "fields" if dataclasses.is_dataclass(a) else ""
        return _paired(xs, ys, what)

    def static(self, a: Any, b: Any) -> None:
        if a is b:
            return
        if self.tolerance.equal_nan and isinstance(a, float) and math.isnan(a) and math.isnan(b):
            return
        try:
            same = bool(a == b)
        except Exception:  # a value whose == is not a truth value (an array): by identity
            same = False
        if not same:
            raise _Difference(f"{leaf_text(a)} vs {leaf_text(b)}")

    def tensors(self, a: Any, b: Any, path: tuple[PathKey, ...]) -> None:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            what_a = _kind(a) if isinstance(a, torch.Tensor) else type(a).__qualname__
            what_b = _kind(b) if isinstance(b, torch.Tensor) else type(b).__qualname__
            raise _Difference(f"{what_a} vs {what_b}")
        if type(a) is not type(b):
            raise _Difference(f"{_kind(a)} vs {_kind(b)}")
        self.ties(a, b, path)
        if a.shape != b.shape:
            raise _Difference(f"shape {_shape(a)} vs {_shape(b)}")
        if a.dtype != b.dtype:
            raise _Difference(f"dtype {a.dtype} vs {b.dtype}")
        if a.device != b.device:
            raise _Difference(f"device {a.device} vs {b.device}")
        if a is b or a.device.type == "meta":  # meta tensors have no values to compare
            return
        reason = _values_differ(a.detach(), b.detach(), self.tolerance)
        if reason is not None:
            raise _Difference(reason)

    def ties(self, a: torch.Tensor, b: torch.Tensor, path: tuple[PathKey, ...]) -> None:
        """A tensor met before on one side must be met before, at the same path, on the other."""
        at_a = self.first_a.setdefault(id(a), path)
        at_b = self.first_b.setdefault(id(b), path)
        if at_a != at_b:
            raise _Difference(f"ties differ: {_tie(at_a, path)} in a, {_tie(at_b, path)} in b")


def _type_names(a: type, b: type) -> str:
    """``Linear vs Identity``; with the modules where the names alone are the same."""
    if a.__qualname__ != b.__qualname__:
        return f"{a.__qualname__} vs {b.__qualname__}"
    return f"{a.__module__}.{a.__qualname__} vs {b.__module__}.{b.__qualname__}"


def _tie(first: tuple[PathKey, ...], path: tuple[PathKey, ...]) -> str:
    return "not tied" if first == path else f"the same tensor as at {render_path(first)}"


def _paired(
    xs: list[tuple[PathKey, Any]], ys: list[tuple[PathKey, Any]], what: str
) -> list[tuple[PathKey, Any, Any]]:
    keys_a, keys_b = [k for k, _ in xs], [k for k, _ in ys]
    if keys_a != keys_b:
        if len(xs) != len(ys) and not what:
            raise _Difference(f"length {len(xs)} vs {len(ys)}")
        names_a, names_b = [k for _, k in keys_a], [k for _, k in keys_b]
        if sorted(map(repr, names_a)) == sorted(map(repr, names_b)):
            raise _Difference(f"the same {what or 'keys'} in another order: {names_a} vs {names_b}")
        raise _Difference(f"{what or 'keys'} {names_a} vs {names_b}")
    return [(k, x, y) for (k, x), (_, y) in zip(xs, ys, strict=True)]


# Values compared by identity even though they have attributes: two functions with no
# attributes of their own are still different functions.
_BY_IDENTITY = (
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    functools.partial,
    type,
)


def _by_attributes(value: Any) -> bool:
    """Whether an opaque value is compared by its attributes: a ``torch.nn.Module`` (a
    ``ReLU()`` field), or a plain object whose class keeps identity equality."""
    if isinstance(value, torch.nn.Module):
        return True
    return (
        type(value).__eq__ is object.__eq__  # type: ignore[comparison-overlap]
        and hasattr(value, "__dict__")
        and not isinstance(value, _BY_IDENTITY)
        and type(value).__module__ != "builtins"
    )


def _attributes(value: Any) -> list[tuple[PathKey, Any]]:
    """An object's attributes: its ``__dict__``, then its slots (those that are set)."""
    out = [(("attr", name), v) for name, v in getattr(value, "__dict__", {}).items()]
    for cls in type(value).__mro__:
        slots = vars(cls).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                out.append((("attr", name), getattr(value, name)))
    return out


def _values_differ(a: torch.Tensor, b: torch.Tensor, tol: _Tolerance) -> str | None:
    """Why the values of two tensors of one shape, dtype and device differ, or ``None``."""
    inexact = a.is_floating_point() or a.is_complex()
    if tol.close and inexact:
        same = torch.isclose(a, b, rtol=tol.rtol, atol=tol.atol, equal_nan=tol.equal_nan)
    elif inexact:
        same = a == b
        if tol.equal_nan:
            same |= a.isnan() & b.isnan()
    else:
        return None if torch.equal(a, b) else _describe(a, b, a != b, tol)
    if bool(same.all()):
        return None
    return _describe(a, b, ~same, tol)


def _describe(a: torch.Tensor, b: torch.Tensor, differ: torch.Tensor, tol: _Tolerance) -> str:
    """``values differ: 3 of 6 elements, largest |a - b| = 0.5 at index (1, 0) (1.5 vs 1.0)``."""
    if a.dtype == torch.bool:
        gap = differ.double()
    elif a.is_floating_point() or a.is_complex():
        gap = (a - b).abs().double()
    else:
        gap = (a.long() - b.long()).abs().double()
    # NaN against a number counts as the largest difference of all
    inf = float("inf")
    ranked = torch.where(differ, gap.nan_to_num(nan=inf, posinf=inf), torch.zeros_like(gap))
    flat = int(ranked.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    largest = gap.flatten()[flat].item()
    if not (a.is_floating_point() or a.is_complex()):
        largest = int(largest)
    text = (
        f"values differ: {int(differ.sum())} of {a.numel()} elements, largest |a - b| = "
        f"{_item(largest)} at index {index} ({_item(a.flatten()[flat])} vs "
        f"{_item(b.flatten()[flat])})"
    )
    if tol.close and (a.is_floating_point() or a.is_complex()):
        text += f" (rtol={tol.rtol}, atol={tol.atol})"
    return text


def _item(value: Any) -> Any:
    """A number to show: a float with 6 significant digits (a message, not a record)."""
    number = value.item() if isinstance(value, torch.Tensor) else value
    if isinstance(number, float):
        return _float(number)
    if isinstance(number, complex):
        return f"({_float(number.real)}{'+' if number.imag >= 0 else ''}{_float(number.imag)}j)"
    return number


def _float(x: float) -> str:
    text = f"{x:.6g}"
    return text if any(c in text for c in ".eni") else text + ".0"  # 1.0, not 1
