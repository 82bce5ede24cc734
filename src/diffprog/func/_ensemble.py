"""Ensembles as one model: ``stack``, ``unstack`` and ``sample_stack``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from diffprog._errors import render_path
from diffprog._frozen import Frozen
from diffprog._pytree import Key, Structure, tree_flatten_model, tree_unflatten_model
from diffprog._random import DeviceLike, Randomizable, sample

__all__ = ["sample_stack", "stack", "unstack"]

M = TypeVar("M")


def _like(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` as the same kind of tensor as ``old``: a Parameter (an independent leaf keeping
    ``requires_grad``), a frozen parameter, or a plain tensor (a buffer)."""
    if isinstance(old, torch.nn.Parameter):
        return torch.nn.Parameter(new.detach(), requires_grad=old.requires_grad)
    if isinstance(old, Frozen):
        return Frozen(new)
    return new


def _difference(a: Key, b: Key, path: tuple[Any, ...]) -> tuple[tuple[Any, ...], str] | None:
    """Where two structure keys first differ (path keys), and how; None if they are equal."""
    if a == b:
        return None
    kind_a, kind_b = a[0], b[0]
    if kind_a == "static" and kind_b == "static":
        return path, f"static values differ: {a[1]!r} and {b[1]!r}"
    if isinstance(kind_a, type) and kind_a is kind_b and a[1] == b[1]:
        for key, child_a, child_b in zip(a[1], a[2], b[2], strict=True):
            found = _difference(child_a, child_b, (*path, key))
            if found is not None:
                return found
    if isinstance(kind_a, type) and kind_a is kind_b:
        return path, f"the {kind_a.__name__} values have different children"
    return path, f"{_kind_name(a)} and {_kind_name(b)}"


def _kind_name(key: Key) -> str:
    kind = key[0]
    if kind == "leaf":
        return "a tensor"
    if kind == "tie":
        return "a tensor tied to an earlier one"
    if kind == "static":
        return f"the static value {key[1]!r}"
    return f"a {kind.__name__}"


def _check_same_structure(structures: list[Structure]) -> None:
    first = structures[0]
    for index, other in enumerate(structures[1:], start=1):
        found = _difference(first.key, other.key, ())
        if found is not None:
            path, how = found
            raise ValueError(
                f"stack: model {index} differs from model 0 at {render_path(path, 'model')}: "
                f"{how}. Only models of one structure (types, static fields, ties) stack; "
                "their tensors' values may differ."
            )


def _kind(t: torch.Tensor) -> str:
    if isinstance(t, Frozen):
        return "frozen parameter"
    return "Parameter" if isinstance(t, torch.nn.Parameter) else "buffer"


def _check_column(column: list[torch.Tensor], path: str) -> None:
    """Refuse tensors at one path that differ in kind (Parameter, frozen, buffer), shape,
    dtype or device (``torch.stack`` would promote mixed dtypes silently)."""
    first = column[0]
    for index, t in enumerate(column[1:], start=1):
        if (_kind(t), t.requires_grad) != (_kind(first), first.requires_grad):
            # The stacked tensor takes one kind: a member's frozen (or trainable) tensor would
            # silently become trainable (or frozen) in the ensemble.
            raise ValueError(
                f"stack: the tensors at {path!r} are of different kinds: model 0 has a "
                f"{_kind(first)} (requires_grad={first.requires_grad}), model {index} a "
                f"{_kind(t)} (requires_grad={t.requires_grad}). Freeze or unfreeze the members "
                "alike before stacking them."
            )
        if (t.shape, t.dtype, t.device) != (first.shape, first.dtype, first.device):
            raise ValueError(
                f"stack: the tensors at {path!r} do not stack: model 0 has "
                f"{first.dtype} {tuple(first.shape)} on {first.device}, model {index} "
                f"{t.dtype} {tuple(t.shape)} on {t.device}. Stack models of one spec, "
                "converted alike (dp.to)."
            )


def stack(models: Sequence[M]) -> M:
    """One model whose every tensor is the models' tensors stacked on a new leading axis.

    ``torch.func.stack_module_state`` for values: the ensemble of ``K`` models as one model
    that ``torch.func.vmap`` maps over (``in_dims=0``) and a pure optimizer trains as any
    other. Parameters stay Parameters (new independent leaves), frozen parameters stay frozen,
    buffers are stacked too; ties stay tied. Static fields (activations, sizes) are shared, so
    they must be equal: the models must have one structure.

    Args:
        models: ``K >= 1`` models of one structure (e.g. sampled from one spec).

    Returns:
        A model of the same type, each tensor of shape ``[K, *shape]``.

    Raises:
        ValueError: no models; the structures differ (the message names the first path where
            they do and how), or two tensors at one path differ in kind (Parameter, frozen,
            buffer), shape, dtype or device.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> ensemble = stack([sample(LinearSpec(3, 2)) for _ in range(4)])
        >>> tuple(ensemble.weight.shape), type(ensemble.weight).__name__
        ((4, 2, 3), 'Parameter')
    """
    if not models:
        raise ValueError("stack needs at least one model.")
    flat = [tree_flatten_model(m) for m in models]
    _check_same_structure([s for _, s in flat])
    template_leaves, structure = flat[0]
    stacked: list[torch.Tensor] = []
    for index, old in enumerate(template_leaves):
        column = [leaves[index] for leaves, _ in flat]
        _check_column(column, structure.paths[index])
        stacked.append(_like(old, torch.stack([t.detach() for t in column])))
    return tree_unflatten_model(stacked, structure)  # type: ignore[no-any-return]


def unstack(model: M) -> list[M]:
    """The members of a stacked model: ``stack``'s inverse.

    Member ``i`` holds ``t[i]`` of each tensor ``t`` (sharing its storage); Parameters are
    new independent leaves, frozen parameters stay frozen.

    Args:
        model: a model whose every tensor has the same leading size ``K``.

    Returns:
        ``K`` models of the same type.

    Raises:
        ValueError: the model has no tensors, or a tensor's leading size differs from the first
            one's (the message names its path).

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> ensemble = stack([sample(LinearSpec(3, 2)) for _ in range(4)])
        >>> [tuple(m.weight.shape) for m in unstack(ensemble)][:2]
        [(2, 3), (2, 3)]
    """
    leaves, structure = tree_flatten_model(model)
    if not leaves:
        raise ValueError("unstack: the model has no tensors to unstack.")
    sizes = [t.shape[0] if t.dim() else None for t in leaves]
    for path, size in zip(structure.paths, sizes, strict=True):
        if size != sizes[0]:
            raise ValueError(
                f"unstack: the tensor at {path!r} has leading size {size}, the tensor at "
                f"{structure.paths[0]!r} {sizes[0]}: every tensor of a stacked model has the "
                "ensemble's size as its first dimension."
            )
    count = sizes[0]
    assert count is not None
    return [
        tree_unflatten_model([_like(t, t.detach()[i]) for t in leaves], structure)
        for i in range(count)
    ]


def sample_stack(
    spec: Randomizable[M],
    generators: Sequence[torch.Generator | int],
    *,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
) -> M:
    """``K`` models sampled from ``spec``, one per generator (or seed), stacked.

    Equal to ``stack([sample(spec, generator=g) for g in generators])``, member for member:
    member ``i`` is bit for bit the model ``sample`` draws from generator ``i``.

    Args:
        spec: the spec (e.g. ``MLPSpec([1, 32, 1])``).
        generators: one ``torch.Generator`` or integer seed per member (a seed ``s`` means
            ``torch.Generator().manual_seed(s)``).
        device: as :func:`~diffprog.sample`.
        dtype: as :func:`~diffprog.sample`.

    Returns:
        The stacked model (see :func:`stack`).

    Raises:
        ValueError: no generators.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> ensemble = sample_stack(LinearSpec(3, 1), [0, 1, 2])
        >>> first = sample(LinearSpec(3, 1), generator=torch.Generator().manual_seed(0))
        >>> torch.equal(ensemble.weight[0], first.weight)
        True
    """
    if not generators:
        raise ValueError("sample_stack needs at least one generator or seed.")
    members = [
        sample(
            spec,
            generator=torch.Generator().manual_seed(g) if isinstance(g, int) else g,
            device=device,
            dtype=dtype,
        )
        for g in generators
    ]
    return stack(members)
