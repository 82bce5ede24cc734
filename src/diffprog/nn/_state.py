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

Evaluation is the default, as the absence of a pass. Because a torch.nn user expects
``model.train()`` behaviour instead, a layer whose behaviour depends on the mode warns
(:class:`ModeWarning`) when it runs with gradients recorded while no mode was chosen; the
:func:`evaluating` context chooses evaluation explicitly.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

import torch

from diffprog import DiffprogError, DiffprogWarning
from diffprog._traverse import substitute

__all__ = [
    "ModeWarning",
    "StateUpdateError",
    "current",
    "evaluating",
    "is_training",
    "record",
    "training",
    "training_generator",
]

M = TypeVar("M")
R = TypeVar("R")
L = TypeVar("L")
P = ParamSpec("P")


class StateUpdateError(DiffprogError, ValueError):
    """A stateful layer updated its state in a training pass but is not part of the model.

    Its update would be lost, so :func:`training` refuses to return a stale model.
    """


class ModeWarning(DiffprogWarning):
    """A layer whose behaviour depends on the mode ran in evaluation mode by default.

    Given when Dropout (any of the family, ``p > 0``), a norm with running statistics
    (BatchNorm, InstanceNorm with ``track_running_stats``), an RNN/LSTM/GRU with dropout
    between layers, or a MultiheadAttention with ``dropout > 0`` runs

    - outside :func:`training` and outside :func:`evaluating`, without a ``training=`` keyword,
    - while gradients are recorded: ``torch.is_grad_enabled()`` and one of the tensors the layer
      computes from (its inputs, its parameters and, for RNNs, the initial state) requires grad.

    Such a call is most likely a forgotten :func:`training` (a torch.nn module starts in
    ``train()`` mode, a diffprog layer evaluates unless told otherwise). It is given through
    the ``warnings`` module, attributed to the first line outside ``diffprog.nn`` (your code), so
    Python's default rule shows it once per layer type and place in your code.
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
# Whether an evaluating() block runs (and no training pass inside it): evaluation was chosen.
_EVALUATING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "diffprog_evaluating", default=False
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
    eval_token = _EVALUATING.set(False)  # a pass inside evaluating() trains
    try:
        result = fn(model, *args, **kwargs)
    finally:
        _EVALUATING.reset(eval_token)
        _ACTIVE.reset(token)
    if not active.own:
        return result, model
    found: set[int] = set()
    unreachable: set[int] = set()
    replacements = {k: new for k, (_, new) in active.updates.items()}
    updated = substitute(model, replacements, found, unreachable)
    hidden = [active.updates[k][0] for k in active.own if k in unreachable and k in found]
    if hidden:
        # Updated where the model holds it plainly but not inside the hand-written instance
        # that holds it too: the two places would silently disagree. (A layer held only
        # inside one is not found at all: the error below.)
        names = ", ".join(sorted({type(layer).__name__ for layer in hidden}))
        raise StateUpdateError(
            f"{len(hidden)} stateful layer(s) ({names}) updated their state in this training "
            "pass but are held inside a hand-written instance (flatten_parameters / "
            "replace_own_parameters methods), which training cannot rebuild, so the update "
            "would be lost there. Hold stateful layers in fields of Parameterized classes, "
            "lists, tuples or dicts."
        )
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


@contextlib.contextmanager
def evaluating() -> Iterator[None]:
    """Run the block in evaluation mode, chosen explicitly: torch.nn's ``model.eval()``.

    Layers evaluate outside :func:`training` anyway; inside this block they do so without a
    :class:`ModeWarning` when gradients are recorded (e.g. gradients with respect to the
    input of a trained model, or a validation loss computed without ``torch.no_grad``).
    Inside a training pass, the block evaluates too (BatchNorm uses and keeps its running
    statistics, Dropout is the identity); a :func:`training` pass inside the block trains.

    Example:
        >>> from diffprog.nn import DropoutSpec, training
        >>> drop = sample(DropoutSpec(p=0.5))
        >>> x = torch.ones(4, requires_grad=True)
        >>> with evaluating():
        ...     y = drop(x)  # the identity, no warning
        >>> torch.equal(y, x), is_training()
        (True, False)
        >>> def fn(model):
        ...     with evaluating():
        ...         return is_training()
        >>> training(fn, None)[0]  # evaluating inside a training pass
        False
    """
    token = _EVALUATING.set(True)
    try:
        yield
    finally:
        _EVALUATING.reset(token)


def is_training() -> bool:
    """Whether a :func:`training` pass is running (layers then use training behaviour).

    Returns:
        ``True`` inside :func:`training` (but not in an :func:`evaluating` block within it),
        else ``False`` (eval mode).

    Example:
        >>> from diffprog.nn import training
        >>> is_training(), training(lambda m: is_training(), None)[0]
        (False, True)
    """
    return _ACTIVE.get() is not None and not _EVALUATING.get()


_NN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside ``diffprog.nn`` (the user's call)."""
    level, frame = 2, sys._getframe(2)  # the caller of warn_unless_mode_chosen's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_NN_DIR):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    return level


def warn_unless_mode_chosen(
    layer: object, effect: str, tensors: Iterable[torch.Tensor | None]
) -> None:
    """Give a :class:`ModeWarning` if ``layer`` evaluates by default while gradients are recorded.

    A layer whose behaviour depends on the mode calls this when it was given no ``training=``
    keyword and :func:`is_training` is ``False``. Nothing happens inside :func:`training` or
    :func:`evaluating`, under ``torch.no_grad()``, or when none of ``tensors`` requires grad.

    Args:
        layer: the layer (its class names it in the message).
        effect: what evaluation mode does in that layer, e.g. ``"no dropout"``.
        tensors: what the layer computes from: inputs, parameters (``None`` entries skipped).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_unless_mode_chosen(object(), "no dropout", [torch.ones(1)])
        ...     warn_unless_mode_chosen(object(), "no dropout", [torch.ones(1).requires_grad_()])
        >>> [w.category.__name__ for w in caught]
        ['ModeWarning']
    """
    if _ACTIVE.get() is not None or _EVALUATING.get() or not torch.is_grad_enabled():
        return
    if not any(t is not None and t.requires_grad for t in tensors):
        return
    name = type(layer).__name__
    warnings.warn(
        f"{name} ran in evaluation mode ({effect}) while gradients are being recorded, because "
        "no mode was chosen: diffprog layers evaluate unless told otherwise (a torch.nn module "
        "starts in train() mode). To train, compute the loss inside "
        "diffprog.nn.training(loss_fn, model, ...); to evaluate, run the layer inside "
        "`with diffprog.nn.evaluating():` (or pass training=False), which silences this.",
        ModeWarning,
        stacklevel=_caller_stacklevel(),
    )


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
