"""``summary(model)``: a table of a model's tensors, with parameter counts and memory."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch

from diffprog._errors import ModelError, PathKey, state_dict_path
from diffprog._frozen import Frozen
from diffprog._nodes import FieldsNode, HandWrittenNode, _NamedTupleNode, fields_node, node_for
from diffprog._traverse import name_clash_error, walk_keys

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["Summary", "SummaryRow", "human_bytes", "summary"]

Kind = Literal["trainable", "frozen", "buffer"]
_KINDS: tuple[Kind, ...] = ("trainable", "frozen", "buffer")


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One tensor of a model at one path (a tied tensor has a row at each of its paths).

    Attributes:
        path: its ``state_dict``-style path (``blocks.0.linear.weight``).
        keys: the same path as path keys (as ``walk_keys`` gives them).
        layer: the path of the layer that holds it (``blocks.0.linear``; ``""``: the model).
        layer_type: the type name of that layer (``Linear``): the closest enclosing
            Parameterized value, dataclass, hand-written instance or NamedTuple, else the
            model's own type (``dict``).
        kind: ``"trainable"`` (a ``Parameter``), ``"frozen"`` (a frozen parameter) or
            ``"buffer"`` (any other tensor: running statistics, masks, constants).
        shape: its shape.
        dtype: its dtype.
        device: its device.
        numel: its number of elements.
        nbytes: ``numel`` times its element size: the memory it takes (or, on the ``meta``
            device, will take once materialised).
        tied_to: for a tensor met before (a tie), the path where it was first met; its
            elements and bytes are counted there only.
    """

    path: str
    keys: tuple[PathKey, ...]
    layer: str
    layer_type: str
    kind: Kind
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    numel: int
    nbytes: int
    tied_to: str | None = None


def summary(model: Any, *, depth: int | None = None, fold: bool = True) -> Summary:
    """A table of the tensors of ``model``: paths, layers, shapes, dtypes, devices, counts.

    Reads no tensor values, so it works on a ``meta`` model. Each tensor has a row at each path
    where it is reachable; a tied one is counted once, where it is first met (``flatten``
    order). The table shows a run of identical items of a list or tuple once, as ``repr``
    does (``layers.0-23.linear.weight``, ``24 x Linear``). ``str()`` (and ``repr()``) of the
    result is a plain-text table; ``rich`` and Jupyter render it as a table (``__rich__``,
    ``_repr_html_``).

    Args:
        model: any value diffprog traverses (a Parameterized model, a dict of them...).
        depth: show only the first ``depth`` parts of each path, one row per group with its
            totals (``depth=1``: one row per top-level layer). ``None``: one row per tensor.
            Only the rendering depends on it; ``rows`` always lists every tensor.
        fold: show the rows of a run of identical items of a list or tuple (the 24 blocks
            of a transformer: same type, same tensor names, kinds, shapes, dtypes, devices and
            ties) once, as ``repr`` does: ``layers.0-23.linear.weight``, ``24 x Linear``, with
            the totals of the 24. ``False``: every row. ``rows`` always lists every tensor.

    Returns:
        A :class:`Summary`.

    Raises:
        ValueError: ``depth`` is negative.
        ModelError: the model cannot be traversed (a cycle, a hidden parameter).
        NameClashError: two different tensors would get the same path (dict keys 1 and
            ``"1"``), as in ``named_tensors`` and ``state_dict``.

    Example:
        >>> import diffprog as dp
        >>> from diffprog.nn import LinearSpec
        >>> s = dp.summary({"head": dp.sample(LinearSpec(3, 2))})
        >>> s.total_parameters, s.trainable_parameters, s.total_bytes
        (8, 8, 32)
        >>> [row.path for row in s.rows]
        ['head.weight', 'head.bias']
    """
    if depth is not None and depth < 0:
        raise ValueError(f"summary: depth must be None or at least 0, got {depth}.")
    leaves = [(keys, leaf) for keys, leaf in walk_keys(model) if isinstance(leaf, torch.Tensor)]
    values = _values_at(model)
    rows: list[SummaryRow] = []
    first: dict[int, str] = {}
    # Two different tensors with one path (dict keys 1 and "1") are refused, as
    # named_tensors and state_dict refuse them.
    by_path: dict[str, tuple[tuple[PathKey, ...], torch.Tensor]] = {}
    for keys, tensor in leaves:
        path = state_dict_path(keys)
        other_keys, other = by_path.setdefault(path, (keys, tensor))
        if other is not tensor:
            raise name_clash_error(model, path, other_keys, keys, "tensors")
        layer_keys = _layer_of(keys, values)
        tied_to = first.get(id(tensor))
        if tied_to is None:
            first[id(tensor)] = path
        rows.append(
            SummaryRow(
                path=path,
                keys=keys,
                layer=state_dict_path(layer_keys),
                layer_type=_type_name(values.get(layer_keys, model)),
                kind=_kind(tensor),
                shape=tuple(tensor.shape),
                dtype=tensor.dtype,
                device=tensor.device,
                numel=tensor.numel(),
                nbytes=tensor.numel() * tensor.element_size(),
                tied_to=tied_to,
            )
        )
    # Without a depth, every tensor is a group of its own (so only the folding groups them).
    deepest = max((len(row.keys) for row in rows), default=0)
    groups = _groups(rows, values, deepest if depth is None else depth, model, fold)
    return Summary(_type_name(model), tuple(rows), depth, groups)


@dataclasses.dataclass(frozen=True)
class _Group:
    """A row of the table: one tensor, or (with ``depth``) the totals of a group of them."""

    path: str
    type: str
    shape: str
    dtype: str
    device: str
    counts: dict[Kind, int]
    nbytes: int
    tied_to: str | None = None


@dataclasses.dataclass(frozen=True, repr=False)
class Summary:
    """The summary of a model: its rows and totals; prints as a table.

    Attributes:
        model_type: the type name of the model.
        rows: one :class:`SummaryRow` per tensor and path, in ``flatten`` order.
        depth: the depth the table groups paths at (``None``: every tensor).

    Example:
        >>> import diffprog as dp
        >>> print(dp.summary({"w": dp.make_independent(torch.zeros(2, 3))}))
        dict: 6 parameters (6 trainable), 24 B
        Path   Layer  Shape   Dtype    Device  Trainable  Memory
        w      dict   [2, 3]  float32  cpu             6    24 B
        -----  -----  ------  -------  ------  ---------  ------
        Total                                          6    24 B
    """

    model_type: str
    rows: tuple[SummaryRow, ...]
    depth: int | None = None
    _groups: tuple[_Group, ...] | None = dataclasses.field(default=None, compare=False)

    def _unique(self) -> Iterator[SummaryRow]:
        return (row for row in self.rows if row.tied_to is None)

    def _count(self, kind: Kind) -> int:
        return sum(row.numel for row in self._unique() if row.kind == kind)

    def _bytes(self, *kinds: Kind) -> int:
        return sum(row.nbytes for row in self._unique() if row.kind in kinds)

    @property
    def trainable_parameters(self) -> int:
        """Elements of the ``Parameter``s (ties counted once)."""
        return self._count("trainable")

    @property
    def frozen_parameters(self) -> int:
        """Elements of the frozen parameters."""
        return self._count("frozen")

    @property
    def total_parameters(self) -> int:
        """Trainable plus frozen parameters (as torchinfo's "Total params"); no buffers."""
        return self.trainable_parameters + self.frozen_parameters

    @property
    def buffer_elements(self) -> int:
        """Elements of the other tensors (running statistics, masks, constants)."""
        return self._count("buffer")

    @property
    def parameter_bytes(self) -> int:
        """Memory of the parameters, trainable and frozen."""
        return self._bytes("trainable", "frozen")

    @property
    def buffer_bytes(self) -> int:
        """Memory of the buffers."""
        return self._bytes("buffer")

    @property
    def total_bytes(self) -> int:
        """Memory of every tensor, each counted once."""
        return self._bytes(*_KINDS)

    def table(self) -> tuple[list[str], list[list[str]], list[str]]:
        """The table as text cells: the header, the rows, and the totals row."""
        groups = self._groups if self._groups is not None else tuple(map(_tensor, self.rows))
        header = ["Path", "Layer" if self.depth is None else "Type", "Shape", "Dtype", "Device"]
        header += ["Trainable", "Frozen", "Buffer", "Memory"]
        body = [_cells(group) for group in groups]
        total = ["Total", "", "", "", ""]
        total += [f"{self._count(kind):,}" for kind in _KINDS] + [human_bytes(self.total_bytes)]
        # the Frozen and Buffer columns only where the model has such tensors
        present = {row.kind for row in self.rows}
        keep = [
            i
            for i, name in enumerate(header)
            if name.lower() not in {"frozen", "buffer"} or name.lower() in present
        ]
        return (
            [header[i] for i in keep],
            [[cells[i] for i in keep] for cells in body],
            [total[i] for i in keep],
        )

    def title(self) -> str:
        """One line: ``Net: 1,234 parameters (1,000 trainable, 234 frozen), 4.8 KiB``."""
        parts = [f"{self.trainable_parameters:,} trainable"]
        if self.frozen_parameters:
            parts.append(f"{self.frozen_parameters:,} frozen")
        text = f"{self.model_type}: {self.total_parameters:,} parameters ({', '.join(parts)})"
        if self.buffer_elements:
            text += f", {self.buffer_elements:,} buffer elements"
        text += f", {human_bytes(self.total_bytes)}"
        if self.rows and all(row.device.type == "meta" for row in self.rows):
            text += " once materialised (meta)"
        return text

    def __str__(self) -> str:
        header, body, total = self.table()
        widths = [max(len(row[i]) for row in [header, *body, total]) for i in range(len(header))]
        right = [name in _NUMERIC for name in header]
        lines = [self.title(), _line(header, widths, right)]
        lines += [_line(cells, widths, right) for cells in body]
        lines.append(_line(["-" * w for w in widths], widths, right))
        lines.append(_line(total, widths, right))
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        """The table as HTML (Jupyter)."""
        header, body, total = self.table()
        right = {i for i, name in enumerate(header) if name in _NUMERIC}

        def row(cells: list[str], tag: str) -> str:
            out = "".join(
                f'<{tag} style="text-align:{"right" if i in right else "left"}">'
                f"{html.escape(cell)}</{tag}>"
                for i, cell in enumerate(cells)
            )
            return f"<tr>{out}</tr>"

        return (
            f"<table><caption>{html.escape(self.title())}</caption>"
            f"<thead>{row(header, 'th')}</thead>"
            f"<tbody>{''.join(row(cells, 'td') for cells in body)}</tbody>"
            f"<tfoot>{row(total, 'th')}</tfoot></table>"
        )

    def __rich__(self) -> Table:
        """The table for ``rich`` (``rich.print(dp.summary(model))``); needs rich installed."""
        from rich import box
        from rich.table import Table

        header, body, total = self.table()
        table = Table(title=self.title(), show_footer=True, box=box.SIMPLE_HEAD)
        for name, foot in zip(header, total, strict=True):
            # in a narrow terminal the paths fold over several lines, the rest stays whole
            table.add_column(
                name,
                footer=foot,
                justify="right" if name in _NUMERIC else "left",
                no_wrap=name != "Path",
                overflow="fold",
            )
        for cells in body:
            table.add_row(*cells)
        return table


_NUMERIC = frozenset({"Trainable", "Frozen", "Buffer", "Memory"})


def _line(cells: list[str], widths: list[int], right: list[bool]) -> str:
    texts = [
        cell.rjust(width) if numeric else cell.ljust(width)
        for cell, width, numeric in zip(cells, widths, right, strict=True)
    ]
    return "  ".join(texts).rstrip()


def _cells(group: _Group) -> list[str]:
    counts = [
        ("tied" if group.tied_to is not None and kind in group.counts else "-")
        if not group.counts.get(kind)
        else f"{group.counts[kind]:,}"
        for kind in _KINDS
    ]
    if group.tied_to is None:
        path, memory = group.path, human_bytes(group.nbytes)
    else:
        path, memory = f"{group.path} (tied to {group.tied_to})", "-"
    return [path, group.type, group.shape, group.dtype, group.device, *counts, memory]


def _tensor(row: SummaryRow) -> _Group:
    counted = row.numel if row.tied_to is None else 0
    return _Group(
        path=row.path,
        type=row.layer_type,
        shape=str(list(row.shape)),
        dtype=str(row.dtype).removeprefix("torch."),
        device=str(row.device),
        counts={row.kind: counted},
        nbytes=row.nbytes if row.tied_to is None else 0,
        tied_to=row.tied_to,
    )


# A group of the table: its path prefix and its rows.
_Entry = tuple[tuple[PathKey, ...], list[SummaryRow]]
# A row of the table: its path (with ("index", "0-23") where items are folded) and the groups
# it stands for (one, or the same group of each of several identical items).
_Line = tuple[tuple[PathKey, ...], list[_Entry]]


def _groups(
    rows: list[SummaryRow],
    values: dict[tuple[PathKey, ...], Any],
    depth: int,
    model: Any,
    fold: bool,
) -> tuple[_Group, ...]:
    """The rows grouped by the first ``depth`` parts of their paths, with their totals; with
    ``fold``, the groups of a run of identical items of a list or tuple (``layers.0``,
    ``layers.1``...) shown once (``layers.0-23``)."""
    members: dict[tuple[PathKey, ...], list[SummaryRow]] = {}
    for row in rows:
        members.setdefault(_prefix(row.keys, depth), []).append(row)
    entries = list(members.items())
    lines = (
        _fold(entries, 0, values) if fold else [(prefix, [(prefix, g)]) for prefix, g in entries]
    )
    return tuple(_group_row(path, together, values, model) for path, together in lines)


def _fold(entries: list[_Entry], level: int, values: dict[tuple[PathKey, ...], Any]) -> list[_Line]:
    """The lines of ``entries`` (which share their first ``level`` path keys), with each run of
    identical neighbouring items of a list or tuple shown once, at every level."""
    # the children of the node at ``level``, each with its entries (None: the node's own)
    children: list[tuple[PathKey | None, list[_Entry]]] = []
    for entry in entries:
        key = entry[0][level] if len(entry[0]) > level else None
        if key is not None and children and children[-1][0] == key:
            children[-1][1].append(entry)
        else:
            children.append((key, [entry]))
    lines: list[_Line] = []
    start = 0
    while start < len(children):
        end = start + 1
        while end < len(children) and _alike(children[end - 1], children[end], level, values):
            end += 1
        run = children[start:end]
        first, last = run[0][0], run[-1][0]
        if first is None or last is None:  # an entry at this very level
            lines.extend((prefix, [(prefix, group)]) for prefix, group in run[0][1])
        elif len(run) == 1:
            lines.extend(_fold(run[0][1], level + 1, values))
        else:
            # identical items give the same lines; each line stands for its group in all
            folded = [_fold(group, level + 1, values) for _, group in run]
            span: PathKey = ("index", f"{first[1]}-{last[1]}")  # torch's 0-23
            for position, (path, _) in enumerate(folded[0]):
                together = [entry for lines_of in folded for entry in lines_of[position][1]]
                lines.append(((*path[:level], span, *path[level + 1 :]), together))
        start = end
    return lines


def _alike(
    before: tuple[PathKey | None, list[_Entry]],
    here: tuple[PathKey | None, list[_Entry]],
    level: int,
    values: dict[tuple[PathKey, ...], Any],
) -> bool:
    """Whether ``here`` is the item after ``before`` in the same list or tuple, of the same
    type, with tensors of the same names, kinds, shapes, dtypes, devices and ties."""
    (key_before, entries_before), (key_here, entries_here) = before, here
    if key_before is None or key_here is None:
        return False
    if key_before[0] != "index" or key_here[0] != "index" or key_here[1] != key_before[1] + 1:
        return False
    return _structure(entries_before, level, values) == _structure(entries_here, level, values)


def _structure(
    entries: list[_Entry], level: int, values: dict[tuple[PathKey, ...], Any]
) -> list[Any]:
    """What must agree for two items to be shown once: the item's type, and each group's path
    below the item, type, and tensors."""
    item = entries[0][0][: level + 1]
    return [
        type(values.get(item)),
        *[
            (prefix[level + 1 :], type(values.get(prefix)), _signature(prefix, rows))
            for prefix, rows in entries
        ],
    ]


def _group_row(
    path: tuple[PathKey, ...],
    together: list[_Entry],
    values: dict[tuple[PathKey, ...], Any],
    model: Any,
) -> _Group:
    """One row of the table: a group, or the same group of several identical items."""
    prefix, group = together[0]
    tensor_row = _is_tensor_row(prefix, group)
    if len(together) == 1 and tensor_row:  # a tensor at most depth parts deep
        return _tensor(group[0])
    every = [row for _, rows in together for row in rows]
    kind = group[0].layer_type if tensor_row else _type_name(values.get(prefix, model))
    shape = str(list(group[0].shape)) if tensor_row else _tensor_count(every)
    if len(together) > 1:  # torch's way: 24 x Block
        kind = f"{len(together)} x {kind}"
        tied = sum(row.tied_to is not None for row in every)
        if tensor_row and tied:
            shape += f" ({tied} tied)"
    counts: dict[Kind, int] = {}
    for row in every:
        if row.tied_to is None:
            counts[row.kind] = counts.get(row.kind, 0) + row.numel
    return _Group(
        path=state_dict_path(path),
        type=kind,
        shape=shape,
        dtype=_common(str(row.dtype).removeprefix("torch.") for row in every),
        device=_common(str(row.device) for row in every),
        counts=counts,
        nbytes=sum(row.nbytes for row in every if row.tied_to is None),
    )


def _is_tensor_row(prefix: tuple[PathKey, ...], group: list[SummaryRow]) -> bool:
    return len(group) == 1 and group[0].keys == prefix


def _signature(prefix: tuple[PathKey, ...], rows: list[SummaryRow]) -> list[Any]:
    # The layer type too: a folded row names one type for all the items, so two items whose
    # tensors sit in layers of different types (same field names) must not fold.
    return [
        (r.keys[len(prefix) :], r.layer_type, r.kind, r.shape, r.dtype, r.device, r.tied_to is None)
        for r in rows
    ]


def _tensor_count(group: list[SummaryRow]) -> str:
    """``3 tensors``, ``2 tensors (1 tied)``: how many tensors a group row stands for."""
    text = f"{len(group):,} tensor{'s' if len(group) > 1 else ''}"
    tied = sum(row.tied_to is not None for row in group)
    return f"{text} ({tied} tied)" if tied else text


def _common(texts: Iterator[str]) -> str:
    """The dtypes (or devices) of a group: up to three, else ``mixed``."""
    distinct = sorted(set(texts))
    return ", ".join(distinct) if len(distinct) <= 3 else "mixed"


def _prefix(keys: tuple[PathKey, ...], depth: int) -> tuple[PathKey, ...]:
    """The shortest start of ``keys`` with ``depth`` parts that appear in ``state_dict`` paths
    (an inline field, which does not, goes with the part after it)."""
    if depth == 0:
        return ()
    seen = 0
    for i, (kind, _) in enumerate(keys):
        if kind != "inline":
            seen += 1
            if seen == depth:
                return keys[: i + 1]
    return keys


def _kind(t: torch.Tensor) -> Kind:
    if isinstance(t, torch.nn.Parameter):
        return "trainable"
    return "frozen" if isinstance(t, Frozen) else "buffer"


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_layer(value: Any) -> bool:
    node = node_for(type(value))
    return isinstance(node, (FieldsNode, HandWrittenNode, _NamedTupleNode))


def _layer_of(
    keys: tuple[PathKey, ...], values: dict[tuple[PathKey, ...], Any]
) -> tuple[PathKey, ...]:
    """The path of the closest layer above a tensor at ``keys`` (``()``: the model)."""
    for end in range(len(keys) - 1, 0, -1):
        prefix = keys[:end]
        if prefix in values and _is_layer(values[prefix]):
            return prefix
    return ()


def _values_at(model: Any) -> dict[tuple[PathKey, ...], Any]:
    """Every container and layer inside ``model`` by its path (tensors and static values
    left out), as ``walk`` reaches them; a hand-written dataclass is entered by its fields."""
    found: dict[tuple[PathKey, ...], Any] = {}
    stack: list[tuple[tuple[PathKey, ...], Any]] = [((), model)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, torch.Tensor) or path in found:
            continue
        try:
            node = node_for(type(value))
        except ModelError:  # a field a hand-written instance does not traverse
            continue
        if node.static:
            continue
        found[path] = value
        if isinstance(node, HandWrittenNode):
            if not dataclasses.is_dataclass(value):
                continue
            node = fields_node(type(value))
        try:
            children = node.children(value)
        except ModelError:
            continue
        stack.extend(((*path, key), child) for key, child in reversed(children))
    return found


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units: ``"512 B"``, ``"1.5 KiB"``, ``"12.0 MiB"``.

    Example:
        >>> human_bytes(1536), human_bytes(3 * 2**30)
        ('1.5 KiB', '3.0 GiB')
    """
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"
