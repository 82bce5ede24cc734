"""Training mode and state updates: how stateful layers stay pure.

A forward pass never changes the model it was given. Inside :func:`training`, layers with
state (BatchNorm's running statistics) compute their new state and *record* the updated layer;
when the pass ends, :func:`training` rebuilds the model with those layers swapped in and hands
it back with the result. A user's own model needs no code for this: its ``__call__`` just calls
its layers. Layers with randomness (Dropout) take it from the generator given to
:func:`training`, or one passed to them explicitly.

How a layer takes part (what ``BatchNorm`` does)::

    def __call__(self, input):
        if not is_training():
            ...  # eval: use self's state
        layer = current(self)  # the latest version of self in this pass
        output, new_state = ...  # computed from layer's state, never in place
        record(self, dataclasses.replace(layer, state=new_state))
        return output

Layers are matched by identity: ``training`` swaps each recorded layer for its latest version
wherever that same object sits in the model (fields of Parameterized values, lists, tuples,
named tuples, dicts). A layer used twice in one pass updates twice, as in PyTorch.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

import torch

from diffprog import DiffprogError
from diffprog._traverse import substitute

__all__ = ["StateUpdateError", "current", "is_training", "record", "training", "training_generator"]

M = TypeVar("M")
R = TypeVar("R")
L = TypeVar("L")
P = ParamSpec("P")


class StateUpdateError(DiffprogError, ValueError):
    """A stateful layer updated its state in a training pass but is not part of the model.

    Its update would be lost, so :func:`training` refuses to return a stale model.
    """


class _Pass:
    """One training pass: its generator and the updated layers recorded so far."""

    __slots__ = ("generator", "own", "updates")

    def __init__(self, generator: torch.Generator | None, outer: _Pass | None) -> None:
        self.generator = generator
        # id(layer as found in the model) -> (that layer, its latest updated version). The
        # original is kept so that its id cannot be reused while the pass runs. A nested pass
        # starts from the enclosing pass's updates, so that current() sees them.
        self.updates: dict[int, tuple[Any, Any]] = {} if outer is None else dict(outer.updates)
        # The ids recorded in this pass itself.
        self.own: set[int] = set()


_ACTIVE: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar(
    "diffprog_training_pass", default=None
)


@overload
def training(
    fn: Callable[Concatenate[M, P], R], model: M, /, *args: P.args, **kwargs: P.kwargs
) -> tuple[R, M]: ...


@overload
def training(
    fn: Callable[..., R],
    model: M,
    /,
    *args: Any,
    generator: torch.Generator | None,
    **kwargs: Any,
) -> tuple[R, M]: ...


def training(
    fn: Callable[..., Any],
    model: Any,
    /,
    *args: Any,
    generator: object = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Run ``fn(model, *args, **kwargs)`` in training mode; return its result and the updated model.

    In training mode BatchNorm normalises with batch statistics and updates its running ones,
    and Dropout drops. The returned model has every updated layer in place; ``model`` itself is
    unchanged. Randomness comes from the keyword ``generator`` if given (a
    ``torch.Generator``; it is not passed on to ``fn``), else from an enclosing pass's, else
    from torch's global generator. A pass nested in another hands its updates on to the
    enclosing pass as well.

    Args:
        fn: computes the result (an output or a loss) from the model.
        model: the model to run.
        *args: further arguments for ``fn``.
        generator: the random source of the pass (keyword only; not passed on to ``fn``).
        **kwargs: further keyword arguments for ``fn``.

    Returns:
        ``(fn's result, model with updated state)``; the model is ``model`` itself when no
        layer recorded an update.

    Raises:
        TypeError: ``generator`` is not a ``torch.Generator``.
        StateUpdateError: a layer recorded an update but is not in ``model`` (a layer captured
            from elsewhere, a copy made inside ``fn``, or one hidden in a closure), so its
            update would be lost.

    Example:
        >>> from diffprog.nn import Dropout
        >>> def loss_fn(m, x):
        ...     return m(x).sum()
        >>> g = torch.Generator().manual_seed(0)
        >>> loss, _ = training(loss_fn, Dropout(p=0.5), torch.ones(1000), generator=g)
        >>> 800 < loss.item() < 1200  # about half dropped, the rest doubled
        True
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
    outer = _ACTIVE.get()
    if generator is None and outer is not None:
        generator = outer.generator
    active = _Pass(generator, outer)
    token = _ACTIVE.set(active)
    try:
        result = fn(model, *args, **kwargs)
    finally:
        _ACTIVE.reset(token)
    if not active.own:
        return result, model
    found: set[int] = set()
    updated = substitute(model, {k: new for k, (_, new) in active.updates.items()}, found)
    lost = [active.updates[k][0] for k in active.own if k not in found]
    if lost:
        names = ", ".join(sorted({type(layer).__name__ for layer in lost}))
        raise StateUpdateError(
            f"{len(lost)} stateful layer(s) ({names}) updated their state in this training "
            "pass but are not part of the model given to training, so the updates would be "
            "lost. Call the layers of the model that fn receives (not copies of it, e.g. from "
            "replace_parameters inside fn, nor layers captured from elsewhere), and hold them "
            "in fields, lists, tuples or dicts (not in closures or hand-written instances)."
        )
    if outer is not None:  # a nested pass: the enclosing one takes its updates over
        for k in active.own:
            outer.updates[k] = active.updates[k]
            outer.own.add(k)
    return result, updated


def is_training() -> bool:
    """Whether a :func:`training` pass is running (layers then use training behaviour).

    Returns:
        ``True`` inside :func:`training`, else ``False`` (eval mode).

    Example:
        >>> from diffprog.nn import training
        >>> is_training(), training(lambda m: is_training(), None)[0]
        (False, True)
    """
    return _ACTIVE.get() is not None


def training_generator() -> torch.Generator | None:
    """The generator of the running training pass.

    Returns:
        The ``generator`` given to :func:`training`; ``None`` outside a pass or when none was
        given (then layers draw from torch's global generator).

    Example:
        >>> from diffprog.nn import training
        >>> g = torch.Generator()
        >>> training(lambda m: training_generator(), None, generator=g)[0] is g
        True
    """
    active = _ACTIVE.get()
    return active.generator if active is not None else None


def current(layer: L) -> L:
    """The latest version of a stateful layer in this pass (itself if not yet updated).

    A stateful layer starts its training-mode computation from ``current(self)``, so that a
    layer called twice in one pass (a shared block) updates its state twice, as in PyTorch.

    Args:
        layer: the layer as found in the model (``self`` in its ``__call__``).

    Returns:
        The version last given to :func:`record` for ``layer`` in this pass, else ``layer``.

    Example:
        >>> from diffprog.nn import training
        >>> def fn(model):
        ...     record(model, "updated")
        ...     return current(model)
        >>> training(fn, "layer")
        ('updated', 'updated')
    """
    active = _ACTIVE.get()
    if active is None:
        return layer
    entry = active.updates.get(id(layer))
    return layer if entry is None else entry[1]


def record(layer: Any, updated: Any) -> None:
    """Record ``updated`` as the new version of ``layer`` (as found in the model) in this pass.

    Called by stateful layers in training mode; :func:`training` then puts ``updated`` where
    ``layer`` sits in the model it returns. Outside a pass it does nothing.

    Args:
        layer: the layer as found in the model (``self``, not ``current(self)``).
        updated: its new version, e.g. ``dataclasses.replace(current(self), state=...)``.

    Example:
        >>> from diffprog.nn import training
        >>> training(lambda model: record(model[0], [9]), ([1], [2]))
        (None, ([9], [2]))
    """
    active = _ACTIVE.get()
    if active is not None:
        active.updates[id(layer)] = (layer, updated)
        active.own.add(id(layer))
