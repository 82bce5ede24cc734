"""Training mode and state updates: how stateful layers stay pure.

A forward pass never changes the model it was given. Inside :func:`training`, layers with
state (BatchNorm's running statistics) compute their new state and *record* the updated layer;
when the pass ends, :func:`training` rebuilds the model with those layers swapped in and hands
it back with the result. A user's own model needs no code for this: its ``__call__`` just calls
its layers. Layers with randomness (Dropout) take it from the generator given to
:func:`training`, or one passed to them explicitly.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch

from diffprog._traverse import substitute

__all__ = ["current", "is_training", "record", "training", "training_generator"]

M = TypeVar("M")
R = TypeVar("R")
L = TypeVar("L")
P = ParamSpec("P")


class _Pass:
    """One training pass: its generator and the updated layers recorded so far."""

    __slots__ = ("generator", "updates")

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        # id(layer as found in the model) -> (that layer, its latest updated version). The
        # original is kept so that its id cannot be reused while the pass runs.
        self.updates: dict[int, tuple[Any, Any]] = {}


_ACTIVE: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar(
    "diffprog_training_pass", default=None
)


def training(
    fn: Callable[Concatenate[M, P], R],
    model: M,
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> tuple[R, M]:
    """Run ``fn(model, *args, **kwargs)`` in training mode; return its result and the updated model.

    In training mode BatchNorm normalises with batch statistics and updates its running ones,
    and Dropout drops. The returned model has every updated layer in place; ``model`` itself is
    unchanged. Randomness comes from the keyword ``generator`` if given (a
    ``torch.Generator``; it is not passed on to ``fn``), else from torch's global generator.

    Args:
        fn: computes the result (an output or a loss) from the model.
        model: the model to run.
        *args: further arguments for ``fn``.
        **kwargs: further keyword arguments for ``fn``; ``generator=`` is taken by ``training``.

    Returns:
        ``(fn's result, model with updated state)``.

    Example:
        >>> from diffprog.nn import Dropout
        >>> def loss_fn(m, x):
        ...     return m(x).sum()
        >>> g = torch.Generator().manual_seed(0)
        >>> loss, _ = training(loss_fn, Dropout(p=0.5), torch.ones(1000), generator=g)
        >>> 800 < loss.item() < 1200  # about half dropped, the rest doubled
        True
    """
    generator = kwargs.pop("generator", None)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
    active = _Pass(generator)
    token = _ACTIVE.set(active)
    try:
        result = fn(model, *args, **kwargs)
    finally:
        _ACTIVE.reset(token)
    updated = substitute(model, {k: new for k, (_, new) in active.updates.items()})
    return result, updated


def is_training() -> bool:
    """Whether a :func:`training` pass is running (layers then use training behaviour)."""
    return _ACTIVE.get() is not None


def training_generator() -> torch.Generator | None:
    """The generator of the running training pass (``None``: torch's global generator)."""
    active = _ACTIVE.get()
    return active.generator if active is not None else None


def current(layer: L) -> L:
    """The latest version of a stateful layer in this pass (itself if not yet updated).

    A layer called twice in one pass (a shared block) updates its state twice, as in PyTorch.
    """
    active = _ACTIVE.get()
    if active is None:
        return layer
    entry = active.updates.get(id(layer))
    return layer if entry is None else entry[1]


def record(layer: Any, updated: Any) -> None:
    """Record ``updated`` as the new version of ``layer`` (as found in the model) in this pass.

    Called by stateful layers in training mode; outside a pass it does nothing.
    """
    active = _ACTIVE.get()
    if active is not None:
        active.updates[id(layer)] = (layer, updated)
