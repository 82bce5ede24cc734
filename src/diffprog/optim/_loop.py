"""The training loop: ``run_step`` and ``fold_loop`` (Hasktorch's ``runStep``, ``foldLoop``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from diffprog import (
    DiffprogError,
    Parameter,
    flatten_parameters,
    make_independent,
    replace_parameters,
)
from diffprog._autograd import gradients as grads_and_used
from diffprog.optim._dtensor import refuse_plain_among_sharded
from diffprog.optim._grad import (
    OnNonFinite,
    all_finite,
    check_loss_reaches_parameters,
    check_on_nonfinite,
    check_trains_something,
    flatten_like,
    nonfinite_error,
)
from diffprog.optim._optimizer import LearningRate, Optimizer, step_with_used
from diffprog.optim._pure import PureOptimizer, consuming_step

__all__ = ["apply_gradients", "fold_loop", "run_step"]

M = TypeVar("M")
OptT = TypeVar("OptT", bound=Optimizer)
A = TypeVar("A")


def run_step(
    model: M,
    optimizer: OptT,
    loss: torch.Tensor | Callable[[], torch.Tensor],
    lr: LearningRate | None,
    *,
    on_nonfinite: OnNonFinite = "raise",
) -> tuple[M, OptT]:
    """One training step: gradients of ``loss``, an optimizer step, a rebuilt model.

    Hasktorch's ``runStep``: the gradients of ``loss`` with respect to
    ``flatten_parameters(model)``, the optimizer's ``step``, ``make_independent`` on the results,
    and ``replace_parameters``. With a pure optimizer, ``model`` and ``optimizer`` are left as
    they were. An optimizer that defines ``step_model(model, loss, lr, *, on_nonfinite)``
    takes the whole step itself: :class:`~diffprog.optim.TorchOptimizer` does, updating
    ``model``'s parameters in place (see its aliasing notes). Parameters an optimizer does not
    train (its ``trainable`` is ``False`` for them, e.g. frozen ones) get no gradient computed.
    A parameter the loss does not reach is left alone, and its optimizer state does not
    advance, as torch.optim skips a parameter whose ``.grad`` is ``None``: the optimizer is
    told with ``step(..., used=...)`` (every optimizer of diffprog takes it; one whose ``step``
    does not gets zero gradients for those parameters, which is what :func:`~diffprog.grad`
    gives).

    Before anything is written the loss and the gradients are checked, with one fused
    reduction: a NaN or infinite value raises :class:`~diffprog.optim.NonFiniteError`, naming
    the parameters whose gradient is affected, and ``model`` and ``optimizer`` stay valid.

    Args:
        model: the model ``loss`` was computed with.
        optimizer: the optimizer (its state).
        loss: a scalar tensor computed from ``model``, or a function of no arguments computing
            it (a closure, which ``torch.optim.LBFGS`` calls several times per step).
        lr: the learning rate: a float, a 0-dim tensor or a schedule of the optimizer's step
            count; ``None`` for a ``TorchOptimizer`` (also inside a wrapper such as
            ``ClipGradNorm``) to keep its own.
        on_nonfinite: ``"raise"`` (default), ``"skip"`` (return ``(model, optimizer)``
            unchanged) or ``"ignore"`` (no check) when the loss or a gradient is not finite.

    Returns:
        ``(new_model, new_optimizer)``.

    Raises:
        NonFiniteError: the loss or a gradient is NaN or infinite (with ``"raise"``).
        DiffprogError: the loss depends on none of the parameters the step trains (it was
            computed from another model, e.g. the one before the last step, or under
            ``torch.no_grad()``); or, as a :class:`~diffprog.optim.NothingToTrainError`, the
            model has no parameter to train (no ``Parameter`` at all, e.g. specs where
            layers belong, or every one frozen). Both are raised, for every optimizer,
            before anything is written. Also: a plain Parameter in a model sharded over
            more than one rank (its path named), and a differentiable sharded step whose
            learning rate requires grad.
        ValueError: ``on_nonfinite`` is not one of the three, or ``lr`` is ``None`` for a
            pure optimizer.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import GD
        >>> model = sample(LinearSpec(2, 1), generator=torch.Generator().manual_seed(0))
        >>> loss = model(torch.ones(1, 2)).pow(2).sum()
        >>> new_model, _ = run_step(model, GD(), loss, 0.1)
        >>> bool(new_model(torch.ones(1, 2)).pow(2).sum() < loss)
        True
    """
    step_model = getattr(optimizer, "step_model", None)
    if step_model is not None:
        return step_model(model, loss, lr, on_nonfinite=on_nonfinite)  # type: ignore[no-any-return]
    check_on_nonfinite(on_nonfinite)
    if lr is None and isinstance(optimizer, PureOptimizer):
        raise ValueError(
            f"run_step needs a learning rate for {type(optimizer).__name__} (lr=None keeps a "
            "TorchOptimizer's own): pass a float, a 0-dim tensor or a schedule."
        )
    if not isinstance(loss, torch.Tensor):
        loss = loss()
    params = flatten_parameters(model)
    trainable = getattr(optimizer, "trainable", None)
    check_trains_something(model, len(params), trainable, type(optimizer).__name__)
    # A differentiable step needs the gradients as functions of the parameters (second order).
    graph = is_differentiable(optimizer)
    if trainable is None or all(trainable):
        gradients, reached = grads_and_used(loss, params, create_graph=graph)
        indices: list[int] | range = range(len(params))
        checked = gradients
        used = reached
    else:
        indices = [i for i, t in enumerate(trainable) if t]
        checked, reached = grads_and_used(loss, [params[i] for i in indices], create_graph=graph)
        # Frozen parameters get a zero of their shape that takes no memory (never read).
        gradients = [_zero_like(p) for p in params]
        used = [True] * len(params)  # a frozen parameter is not trained either way
        for k, i in enumerate(indices):  # no loop variable left holding a gradient
            gradients[i] = checked[k]
            used[i] = reached[k]
    check_loss_reaches_parameters(any(reached))
    # The parameters the loss does not reach are left alone (torch.optim skips a .grad that
    # is None), told to the optimizer apart from their zero gradients.
    mask = None if all(reached) else used
    if on_nonfinite != "ignore" and not all_finite(loss, checked):
        if on_nonfinite == "skip":
            return model, optimizer
        raise nonfinite_error(model, loss, checked, indices)
    del checked  # the step frees each gradient once its update is done
    return _step_and_rebuild(
        model, optimizer, lr, gradients, params, mask, consume=True, differentiable=graph
    )


def apply_gradients(
    model: M,
    optimizer: OptT,
    grads: Any,
    lr: LearningRate | None,
    *,
    on_nonfinite: OnNonFinite = "raise",
) -> tuple[M, OptT]:
    """One optimizer step with gradients you computed: ``run_step`` without the backward pass.

    optax's ``apply_updates`` after ``update``, for gradients accumulated over micro-batches,
    computed with ``torch.func``, or averaged across processes: the same checks, treatment of
    frozen parameters, non-finite check, donation and rebuilt model as :func:`run_step`, with
    no flatten/replace by hand. Which parameters the loss did not reach is known only from
    ``None`` entries of a list: a model-shaped tree (``value_and_grad``'s) holds zeros there,
    so such a parameter is stepped on a zero gradient (momentum, weight decay) unless you
    pass the list form with ``None`` for it. An optimizer that defines
    ``apply_model(model, grads, lr, *, on_nonfinite)`` takes the whole step itself, as
    ``step_model`` for :func:`run_step`: ``diffprog.distributed.DataParallel`` does (it averages
    the gradients over the ranks before any check, so that every rank decides alike).

    Args:
        model: the model the gradients are for.
        optimizer: the optimizer (its state): pure, ``TorchOptimizer``, or a chain.
        grads: one gradient per parameter, as a list in ``flatten_parameters(model)`` order
            (a ``None`` entry: the parameter is unused, left alone as torch.optim leaves a
            parameter whose ``.grad`` is ``None``) or as a value of the model's structure
            (``value_and_grad``'s ``grads``). Each has its parameter's shape, dtype and device.
            They are not changed. Those of frozen parameters are not read.
        lr: the learning rate (or schedule); ``None`` keeps a ``TorchOptimizer``'s own.
        on_nonfinite: as :func:`run_step`'s (the loss counts as finite).

    Returns:
        ``(new_model, new_optimizer)``; with a pure optimizer ``model`` and ``optimizer`` are
        unchanged (``TorchOptimizer`` steps in place, as in ``run_step``).

    Raises:
        DiffprogError: ``grads`` does not fit the model (count or structure), every trained
            parameter's gradient is ``None``, or the model has nothing to train; a plain
            Parameter in a model sharded over more than one rank.
        NonFiniteError: a gradient is NaN or infinite (with ``"raise"``).
        TypeError, ValueError: a gradient's type, dtype, shape or device does not fit its
            parameter (raised by the optimizer's ``step``, naming the parameter's index).

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import GD
        >>> model = sample(LinearSpec(2, 1))
        >>> grads = [torch.ones(1, 2), None]  # the bias is left alone
        >>> new_model, _ = apply_gradients(model, GD(), grads, 0.5)
        >>> new, old = new_model, model
        >>> torch.equal(new.weight, old.weight - 0.5), torch.equal(new.bias, old.bias)
        (True, True)
    """
    apply_model = getattr(optimizer, "apply_model", None)
    if apply_model is not None:  # a wrapper that takes the whole step (DataParallel)
        return apply_model(model, grads, lr, on_nonfinite=on_nonfinite)  # type: ignore[no-any-return]
    check_on_nonfinite(on_nonfinite)
    owner = type(optimizer).__name__
    if lr is None and isinstance(optimizer, PureOptimizer):
        raise ValueError(
            f"apply_gradients needs a learning rate for {owner} (lr=None keeps a "
            "TorchOptimizer's own): pass a float, a 0-dim tensor or a schedule."
        )
    params = flatten_parameters(model)
    gradients = _gradient_list(model, grads, len(params))
    trainable = getattr(optimizer, "trainable", None)
    check_trains_something(model, len(params), trainable, owner)
    # As in run_step: frozen parameters count as used (never read), unused ones get a None.
    used = [
        g is not None or (trainable is not None and not trainable[i])
        for i, g in enumerate(gradients)
    ]
    trained = [i for i in range(len(params)) if trainable is None or trainable[i]]
    if not any(gradients[i] is not None for i in trained):
        raise DiffprogError(
            f"apply_gradients got None for the gradient of every parameter {owner} trains, "
            "so there is nothing to step. Pass a tensor for at least one (None marks a "
            "parameter the loss does not reach)."
        )
    checked = [gradients[i] for i in trained]
    if on_nonfinite != "ignore" and not all_finite(_FINITE_LOSS, checked):
        if on_nonfinite == "skip":
            return model, optimizer
        raise nonfinite_error(model, _FINITE_LOSS, checked, trained)
    mask = None if all(used) else used
    return _step_and_rebuild(
        model,
        optimizer,
        lr,
        gradients,
        params,
        mask,
        consume=False,
        differentiable=is_differentiable(optimizer),
    )


_FINITE_LOSS = torch.zeros(())  # apply_gradients has no loss: the check reads the gradients


def _gradient_list(model: Any, grads: Any, n: int) -> list[torch.Tensor | None]:
    """``grads`` as a list in ``flatten_parameters(model)`` order (see apply_gradients)."""
    if isinstance(grads, (list, tuple)) and all(
        g is None or isinstance(g, torch.Tensor) for g in grads
    ):
        if len(grads) != n:
            raise DiffprogError(
                f"apply_gradients got {len(grads)} gradients for a model with {n} parameters. "
                "Pass one per parameter in flatten_parameters order (None for one the loss "
                "does not reach), or a value of the model's structure."
            )
        return list(grads)
    return list(flatten_like(model, grads))


def _step_and_rebuild(
    model: M,
    optimizer: OptT,
    lr: LearningRate | None,
    gradients: list[Any],
    params: list[Any],
    mask: list[bool] | None,
    *,
    consume: bool,
    differentiable: bool,
) -> tuple[M, OptT]:
    """The optimizer's step on checked gradients, then the model rebuilt around the result.

    With ``consume``, the gradients come from autograd for these very parameters (they fit,
    and nobody else holds them): a pure optimizer skips re-checking them and frees each one
    once its update is done. With ``differentiable`` (the optimizer's, looked up once by the
    caller) the new parameters keep the step's autograd history.
    """
    refuse_plain_among_sharded(model, params)
    stepper = consuming_step(optimizer)
    if stepper is not None:
        new_params, stepped = stepper(lr, gradients, params, consume, mask)  # type: ignore[arg-type]
    else:
        # lr may be None for a wrapper of a TorchOptimizer (ClipGradNorm(TorchOptimizer(...))).
        new_params, stepped = step_with_used(optimizer, lr, gradients, params, mask)
    new_optimizer = cast(OptT, stepped)
    if differentiable:
        # The new parameters stay in the graph of the step: Parameters (what flatten_parameters
        # finds) that are not leaves. as_subclass keeps the autograd history; make_independent
        # would cut it.
        rebuilt = [_in_graph(p) for p in new_params]
    else:
        rebuilt = [make_independent(p) for p in new_params]
    return replace_parameters(model, rebuilt), new_optimizer


def _in_graph(p: torch.Tensor) -> torch.Tensor:
    """``p`` (a new parameter with autograd history) as a Parameter that keeps the history."""
    if type(p).__torch_dispatch__ is torch.Tensor.__torch_dispatch__:  # a plain tensor
        return p.as_subclass(Parameter)
    # A wrapper subclass (a DTensor: a step on sharded parameters) cannot become a Parameter
    # subclass; torch marks such a Parameter on the instance, as Parameter(t) does. ``p`` is
    # the step's fresh result, held by nobody else.
    p._is_param = True
    return p


def is_differentiable(optimizer: object) -> bool:
    """Whether ``optimizer`` takes differentiable steps (``differentiable=True``).

    Example:
        >>> from diffprog.optim import GD
        >>> is_differentiable(GD()), is_differentiable(GD(differentiable=True))
        (False, True)
    """
    return getattr(optimizer, "differentiable", False) is True


def _zero_like(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p)


def fold_loop(init: A, count: int, body: Callable[[A, int], A]) -> A:
    """Thread a value through ``count`` calls of ``body(value, i)``, ``i`` from 1 to ``count``.

    Hasktorch's ``foldLoop``, the usual shape of a training loop.

    Example:
        >>> fold_loop(0, 4, lambda total, i: total + i)
        10
    """
    value = init
    for i in range(1, count + 1):
        value = body(value, i)
    return value
