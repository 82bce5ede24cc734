"""A readable ``repr`` of a model tree: structure, shapes and dtypes, never tensor contents."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch

from diffprog._errors import PathKey
from diffprog._nodes import (
    FieldsNode,
    HandWrittenNode,
    _DictNode,
    _NamedTupleNode,
    _SequenceNode,
    fields_node,
    node_for,
)

__all__ = ["tensor_summary", "tree_repr"]

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
    """``f32[1,3]``: dtype and shape; ``const`` marks a non-Parameter tensor, ``@`` a device.

    Example:
        >>> tensor_summary(torch.zeros(2, 3, dtype=torch.float64))
        'const f64[2,3]'
    """
    dtype = _DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))
    text = f"{dtype}[{','.join(str(d) for d in t.shape)}]"
    if t.device.type != "cpu":
        text += f"@{t.device}"
    if not isinstance(t, torch.nn.Parameter):
        text = "const " + text
    return text


# Deeper sub-values are folded to ``Name(...)``: a long chain of nested models would otherwise
# recurse past Python's limit, and print a text quadratic in its depth (each level indented).
_MAX_DEPTH = 32


def tree_repr(value: Any) -> str:
    """Render ``value`` on one line if it fits in 88 columns, else indented over several.

    Sub-values nested deeper than 32 levels are folded to ``Name(...)``, ``[...]``, ``{...}``.

    Example:
        >>> tree_repr({"w": make_independent(torch.zeros(2)), "n": 3})
        "{'w': f32[2], 'n': 3}"
    """
    return _render(value, 0, set())


def _leaf(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return tensor_summary(value)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return f"<function {getattr(value, '__name__', '?')}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _render(value: Any, indent: int, active: set[int]) -> str:
    if isinstance(value, torch.Tensor):
        return tensor_summary(value)
    node = node_for(type(value))
    if isinstance(node, HandWrittenNode) and dataclasses.is_dataclass(value):
        node = fields_node(type(value))  # show a hand-written instance by its fields
    if not isinstance(node, (FieldsNode, _NamedTupleNode, _SequenceNode, _DictNode)):
        return _leaf(value)
    # The children as every traversal sees them; the node's kind decides the brackets.
    items = [(_label(key), v) for key, v in node.children(value)]
    if isinstance(node, (FieldsNode, _NamedTupleNode)):
        opening, closing = f"{type(value).__name__}(", ")"
    elif isinstance(node, _DictNode):
        opening, closing = "{", "}"
    elif isinstance(value, list):
        opening, closing = "[", "]"
    else:
        opening, closing = "(", ",)" if len(items) == 1 else ")"
    if id(value) in active:
        return "<cycle>"
    if indent >= 2 * _MAX_DEPTH and items:
        return f"{opening}...{closing.lstrip(',')}"
    active.add(id(value))
    try:
        parts = [(label, _render(v, indent + 2, active)) for label, v in items]
    finally:
        active.discard(id(value))
    one_line = opening + ", ".join(label + text for label, text in parts) + closing
    if len(one_line) + indent <= _WIDTH and "\n" not in one_line:
        return one_line
    pad = " " * (indent + 2)
    body = ",\n".join(pad + label + text for label, text in parts)
    return f"{opening}\n{body},\n{' ' * indent}{closing.lstrip(',')}"


def _label(key: PathKey) -> str:
    """What stands before a child: ``name=`` for a field, ``'k': `` for a dict key."""
    kind, name = key
    if kind == "key":
        return f"{name!r}: "
    return "" if kind == "index" else f"{name}="
