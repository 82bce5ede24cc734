"""A readable ``repr`` of a model tree: structure, shapes and dtypes, never tensor contents."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch

from diffprog._errors import PathKey
from diffprog._frozen import Frozen
from diffprog._nodes import (
    FieldsNode,
    HandWrittenNode,
    _DictNode,
    _NamedTupleNode,
    _SequenceNode,
    fields_node,
    node_for,
)

__all__ = ["leaf_text", "tensor_summary", "tree_repr"]

_WIDTH = 88
_DTYPES = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.complex64: "c64",
    torch.complex128: "c128",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "bool",
}


def tensor_summary(t: torch.Tensor) -> str:
    """``f32[1,3]``: dtype and shape; ``const`` marks a constant (buffer), ``frozen`` a frozen
    parameter, ``@`` a device.

    Example:
        >>> tensor_summary(torch.zeros(2, 3, dtype=torch.float64))
        'const f64[2,3]'
    """
    dtype = _DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))
    text = f"{dtype}[{','.join(str(d) for d in t.shape)}]"
    if t.device.type != "cpu":
        text += f"@{t.device}"
    if isinstance(t, Frozen):
        text = "frozen " + text
    elif not isinstance(t, torch.nn.Parameter):
        text = "const " + text
    return text


# Deeper sub-values are folded to ``Name(...)``: a long chain of nested models would otherwise
# recurse past Python's limit, and print a text quadratic in its depth (each level indented).
_MAX_DEPTH = 32
# A sub-value is also folded to ``Name(...)`` when fewer columns than this are left for it.
_MIN_ROOM = 24


def tree_repr(value: Any, *, width: int = _WIDTH, fold: bool = True) -> str:
    """Render ``value`` on one line if it fits in ``width`` columns, else indented over several.

    A list or tuple too long for one line shows runs of identical items once, as
    ``torch.nn.ModuleList`` does: ``(0-23): 24 x Block(...)`` (identical: same type and same
    text, so same structure, shapes and static fields; values are not compared). Lines stay
    within ``width`` columns, except where a single tensor's summary or a short static value
    is longer than what is left of the line. Sub-values nested deeper than 32 levels, or with
    fewer than 24 columns left, are folded to ``Name(...)``, ``[...]``, ``{...}``.

    Args:
        value: the model (any value).
        width: the number of columns to fit in.
        fold: fold runs of identical items; ``False`` shows every item.

    Returns:
        The text.

    Example:
        >>> tree_repr({"w": make_independent(torch.zeros(2)), "n": 3})
        "{'w': f32[2], 'n': 3}"
        >>> tree_repr([make_independent(torch.zeros(2)) for _ in range(30)])
        '[(0-29): 30 x f32[2]]'
    """
    return _Renderer(width, fold).render(value, 0, 0, 0)


def leaf_text(value: Any) -> str:
    """A static value (or tensor) as ``repr`` shows it: short, functions by name."""
    if isinstance(value, torch.Tensor):
        return tensor_summary(value)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return f"<function {getattr(value, '__name__', '?')}>"
    return _clip(repr(value), 60)


def _clip(text: str, room: int) -> str:
    return text if len(text) <= room else text[: max(room, 4) - 3] + "..."


class _Renderer:
    """One rendering: the width, whether to fold, and the values being rendered (cycles)."""

    def __init__(self, width: int, fold: bool) -> None:
        self.width = width
        self.fold = fold
        self.active: set[int] = set()
        # A sub-value shared at several paths is rendered once per place on the line: without
        # this, a list holding one list three times, twelve levels deep, takes 3**12 renders.
        self.done: dict[tuple[int, int, int, int], str] = {}
        self.signatures: dict[int, Any] = {}  # see _signature

    def render(self, value: Any, col: int, indent: int, tail: int) -> str:
        """``value``'s text, whose first line starts at column ``col`` (after its label) and
        whose other lines are indented by ``indent``; ``tail`` columns follow it (a comma)."""
        if isinstance(value, torch.Tensor):
            return tensor_summary(value)
        key = (id(value), col, indent, tail)
        text = self.done.get(key)
        if text is None:
            text = self.render_value(value, col, indent, tail)
            if "<cycle>" not in text:  # (a cycle's text depends on where it is entered)
                self.done[key] = text
        return text

    def render_value(self, value: Any, col: int, indent: int, tail: int) -> str:
        """:meth:`render`, not remembered."""
        node = node_for(type(value))
        if isinstance(node, HandWrittenNode) and dataclasses.is_dataclass(value):
            node = fields_node(type(value))  # show a hand-written instance by its fields
        if not isinstance(node, (FieldsNode, _NamedTupleNode, _SequenceNode, _DictNode)):
            text = leaf_text(value)
            return _clip(text, max(self.width - col - tail, 20))
        # The children as every traversal sees them; the node's kind decides the brackets. A
        # long label (a dict key) is clipped to leave at least 12 columns for its value.
        room = max(8, self.width - indent - 2 - 12)
        items = [(self.label(key, room), v) for key, v in node.children(value)]
        if isinstance(node, (FieldsNode, _NamedTupleNode)):
            opening, closing = f"{type(value).__name__}(", ")"
        elif isinstance(node, _DictNode):
            opening, closing = "{", "}"
        elif isinstance(value, list):
            opening, closing = "[", "]"
        else:
            opening, closing = "(", ",)" if len(items) == 1 else ")"
        if id(value) in self.active:
            return "<cycle>"
        if items and (
            indent >= 2 * _MAX_DEPTH
            or self.width - indent < _MIN_ROOM
            or col + len(opening) + 4 > self.width  # a long label: no room for the opening
        ):
            return f"{opening}...{closing.lstrip(',')}"
        self.active.add(id(value))
        try:
            parts = [(label, self.child(v, label, indent)) for label, v in items]
            if self.fits(opening, parts, closing, col, tail):
                return self.one_line(opening, parts, closing)
            if self.fold and isinstance(node, _SequenceNode):
                folded = self.folded([v for _, v in items], parts, indent)
                if folded is not None:
                    parts = folded
                    if self.fits(opening, parts, closing, col, tail):
                        return self.one_line(opening, parts, closing)
        finally:
            self.active.discard(id(value))
        pad = " " * (indent + 2)
        body = ",\n".join(pad + label + text for label, text in parts)
        return f"{opening}\n{body},\n{' ' * indent}{closing.lstrip(',')}"

    def child(self, value: Any, label: str, indent: int) -> str:
        return self.render(value, indent + 2 + len(label), indent + 2, 1)

    def fits(
        self, opening: str, parts: list[tuple[str, str]], closing: str, col: int, tail: int
    ) -> bool:
        if any("\n" in text for _, text in parts):
            return False
        length = len(opening) + len(closing) + sum(len(a) + len(b) + 2 for a, b in parts)
        return col + length + tail <= self.width

    @staticmethod
    def one_line(opening: str, parts: list[tuple[str, str]], closing: str) -> str:
        return opening + ", ".join(label + text for label, text in parts) + closing

    def folded(
        self, values: list[Any], parts: list[tuple[str, str]], indent: int
    ) -> list[tuple[str, str]] | None:
        """The items of a sequence with each run of identical ones shown once, labelled
        torch's way (``(0-23): 24 x ``, ``(24): `` for an item on its own); ``None`` if no
        two neighbours are identical."""
        runs: list[tuple[int, int]] = []  # (first index, last index)
        for i, value in enumerate(values):
            first = runs[-1][0] if runs else 0
            if runs and _same(values[first], parts[first][1], value, parts[i][1], self.signatures):
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
        if len(runs) == len(values):
            return None
        out: list[tuple[str, str]] = []
        for first, last in runs:
            label = f"({first}): " if first == last else f"({first}-{last}): {last - first + 1} x "
            text = parts[first][1]
            if "\n" not in text and indent + 2 + len(label) + len(text) + 1 > self.width:
                text = self.child(values[first], label, indent)  # re-fit after the label
            out.append((label, text))
        return out

    @staticmethod
    def label(key: PathKey, room: int) -> str:
        """What stands before a child: ``name=`` for a field, ``'k': `` for a dict key; at
        most ``room`` columns (and 42 for a dict key)."""
        kind, name = key
        if kind == "key":
            return f"{_clip(repr(name), min(40, room - 2))}: "
        return "" if kind == "index" else f"{_clip(str(name), room - 1)}="


def _same(a: Any, text_a: str, b: Any, text_b: str, memo: dict[int, Any]) -> bool:
    """Items shown once for a run: the same text and the same structure, whatever their values.

    The text alone is not enough: it is shortened (deep or narrow sub-values folded to
    ``Name(...)``, long static values and dict keys clipped, functions shown by name), so two
    items that differ in a shape or a static field can print alike.
    """
    return (
        type(a) is type(b)
        and text_a == text_b
        and _signature(a, memo, frozenset()) == _signature(b, memo, frozenset())
    )


def _signature(value: Any, memo: dict[int, Any], active: frozenset[int]) -> Any:
    """What makes two items identical for folding: types, structure (keys), tensors' kind,
    dtype, shape and device, and static values (by ``repr``; functions by identity).

    ``memo`` holds the signature of each sub-value by ``id`` (for this rendering, whose
    values stay alive): a sub-value shared at many paths is described once.
    """
    if isinstance(value, torch.Tensor):
        return (type(value), value.dtype, tuple(value.shape), value.device)
    node = node_for(type(value))
    if isinstance(node, HandWrittenNode) and dataclasses.is_dataclass(value):
        node = fields_node(type(value))
    if not isinstance(node, (FieldsNode, _NamedTupleNode, _SequenceNode, _DictNode)):
        if callable(value) and not isinstance(value, type):
            return (type(value), id(value))  # two functions are alike only if they are one
        return (type(value), repr(value))
    known = memo.get(id(value))
    if known is not None:
        return known
    if id(value) in active or len(active) > _MAX_SIGNATURE_DEPTH:
        return (type(value), id(value))  # a cycle, or too deep to compare: never folded
    inner = active | {id(value)}
    signature = (
        type(value),
        tuple((key, _signature(v, memo, inner)) for key, v in node.children(value)),
    )
    memo[id(value)] = signature
    return signature


_MAX_SIGNATURE_DEPTH = 200
