"""The ``Optimizer`` protocol: a pure step from (gradients, parameters, state) to new ones."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from typing_extensions import Self

__all__ = [
    "Gradients",
    "LearningRate",
    "Optimizer",
    "Schedule",
    "check_gradient",
    "check_learning_rate",
    "learning_rate_at",
    "step",
    "step_with_used",
    "takes_used",
    "used_mask",
]

Schedule = Callable[[int], float | torch.Tensor]
"""A learning-rate schedule: the learning rate as a function of the optimizer's step count.

The count is the number of steps taken before the one being made (0 for the first step), as
in optax. ``diffprog.optim`` provides ready ones (``cosine_decay_schedule``, ...).
"""

LearningRate = float | torch.Tensor | Schedule
"""A learning rate: a Python float, a 0-dim tensor, or a :data:`Schedule` of the step count."""

Gradients = Sequence[torch.Tensor]
"""Gradients, one per parameter, in ``flatten_parameters`` order (Hasktorch's ``Gradients``)."""

OptT = TypeVar("OptT", bound="Optimizer")


@runtime_checkable
class Optimizer(Protocol):
    """A pure optimizer: Hasktorch's ``class Optimizer o``.

    The optimizer value *is* its state (moments, step count, hyper-parameters): ``step``
    returns the new parameters and a new optimizer value, and leaves its inputs untouched.
    In Hasktorch: ``step :: LearningRate -> Gradients -> [Tensor] -> o -> ([Tensor], o)``;
    here ``o`` is ``self``, and :func:`step` gives that exact argument order.

    A ``step`` may also take a keyword ``used: Sequence[bool] | None``, the parameters the loss
    reaches (``False``: torch.optim's ``.grad is None``, so no update and no change of state).
    Every optimizer of diffprog does; ``run_step`` passes it to an optimizer whose ``step``
    has that keyword, and to any other gives zero gradients for the parameters the loss does
    not reach (``grad``'s contract).
    """

    def step(
        self, lr: LearningRate, gradients: Gradients, params: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], Self]:
        """One update: new parameters (plain tensors, not yet independent) and new state."""
        ...


def step(
    lr: LearningRate,
    gradients: Gradients,
    params: Sequence[torch.Tensor],
    state: OptT,
    *,
    used: Sequence[bool] | None = None,
) -> tuple[list[torch.Tensor], OptT]:
    """Apply one optimizer step, in Hasktorch's argument order.

    Args:
        lr: the learning rate.
        gradients: one gradient per parameter.
        params: the current parameters.
        state: the optimizer (its state).
        used: for each parameter whether the loss reaches it (``None``: every one); see
            :class:`Optimizer`.

    Returns:
        ``(new_params, new_state)``; the inputs are unchanged.

    Example:
        >>> from diffprog.optim import GD
        >>> new, _ = step(0.5, [torch.ones(2)], [torch.zeros(2)], GD())
        >>> new
        [tensor([-0.5000, -0.5000])]
    """
    new_params, new_state = step_with_used(state, lr, gradients, params, used)
    return new_params, new_state


def learning_rate_at(lr: LearningRate, count: int) -> float | torch.Tensor:
    """The learning rate to use for the step after ``count`` steps: ``lr(count)`` for a schedule.

    Args:
        lr: a float, a 0-dim tensor, or a schedule.
        count: the number of steps taken so far.

    Returns:
        The learning rate as a float or a one-element tensor, checked by
        ``check_learning_rate``.

    Raises:
        TypeError: ``lr`` (or what the schedule returned) is none of the above.
        ValueError: the learning rate is negative or NaN (torch.optim's ``Invalid learning
            rate``), or a tensor of more than one element.

    Example:
        >>> learning_rate_at(0.1, 5), learning_rate_at(lambda count: 0.1 / (count + 1), 4)
        (0.1, 0.02)
        >>> learning_rate_at(lambda count: 0.1 - 0.05 * count, 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Invalid learning rate: -0.05... (the value the schedule gave for step count 3)
    """
    if type(lr) is float and lr >= 0.0:  # the usual case, first
        return lr
    if callable(lr) and not isinstance(lr, torch.Tensor):
        value = lr(count)
        try:
            return check_learning_rate(value)
        except ValueError as e:
            raise ValueError(f"{e} (the value the schedule gave for step count {count})") from None
    return check_learning_rate(lr)


def check_learning_rate(lr: object) -> float | torch.Tensor:
    """``lr`` as a float or a one-element tensor, refused as torch.optim refuses it.

    A tensor on an accelerator is not compared with zero: that would wait for the device on
    every step (and fail inside CUDA graph capture); torch.optim does not check it at step
    time either.

    Args:
        lr: a learning rate (not a schedule).

    Returns:
        ``float(lr)`` for a number, ``lr`` itself for a tensor.

    Raises:
        TypeError: ``lr`` is neither a real number nor a tensor.
        ValueError: ``lr`` is negative or NaN (``Invalid learning rate``), or a tensor of more
            than one element (``Tensor lr must be 1-element``).

    Example:
        >>> check_learning_rate(-0.1)
        Traceback (most recent call last):
        ...
        ValueError: Invalid learning rate: -0.1
    """
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}.")
        if lr.device.type == "cpu" and not float(lr.detach()) >= 0.0:
            raise ValueError(f"Invalid learning rate: {float(lr.detach())}")
        return lr.reshape(())  # a [1] tensor too, as torch.optim takes it: the kernels want 0-dim
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        value = float(lr)
        if not value >= 0.0:  # NaN too (torch.optim lets NaN through)
            raise ValueError(f"Invalid learning rate: {value}")
        return value
    raise TypeError(
        f"the learning rate must be a float, a 0-dim tensor or a schedule (a function of the "
        f"step count returning one of those), got {type(lr).__name__}."
    )


def used_mask(used: Sequence[bool] | None, n: int, owner: str) -> list[bool] | None:
    """``used`` checked against ``n`` parameters; None when every parameter is used.

    Args:
        used: for each parameter whether the loss reaches it, or None (all of them).
        n: the number of parameters.
        owner: the optimizer's name, for messages.

    Returns:
        A list of ``n`` flags with at least one False, or None.

    Raises:
        ValueError: ``used`` does not have one flag per parameter.

    Example:
        >>> used_mask([True, True], 2, "Adam"), used_mask([True, False], 2, "Adam")
        (None, [True, False])
    """
    if used is None:
        return None
    flags = [bool(u) for u in used]
    if len(flags) != n:
        raise ValueError(
            f"{owner}.step got {n} parameters but {len(flags)} flags in used=. Pass one flag "
            "per parameter, in flatten_parameters order (False: the loss does not reach it)."
        )
    return None if all(flags) else flags


def check_gradient(owner: str, index: int, grad: object, param: torch.Tensor) -> None:
    """Raise unless ``grad`` can be the gradient of ``param`` (parameter ``index``).

    torch.optim refuses such a gradient when it is assigned to ``.grad``; a fused kernel given
    one would read past its end or in the wrong order.

    Args:
        owner: the optimizer's name, for messages.
        index: the parameter's position in ``flatten_parameters`` order.
        grad: the gradient given for it.
        param: the parameter.

    Raises:
        TypeError: ``grad`` is not a tensor (``None``, say), or its dtype differs.
        ValueError: its shape or device differs.

    Example:
        >>> check_gradient("Adam", 0, torch.zeros(3, 2), torch.zeros(2, 3))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Adam.step: the gradient of parameter 0 has shape (3, 2), but the parameter ...
    """
    if not isinstance(grad, torch.Tensor):
        raise TypeError(
            f"{owner}.step got {type(grad).__name__} as the gradient of parameter {index} "
            f"(shape {tuple(param.shape)}). Pass a tensor shaped like the parameter (zeros if "
            f"it has no gradient), or leave the parameter alone as torch.optim does when "
            f".grad is None: pass used= with False at index {index}."
        )
    if grad.shape != param.shape:
        raise ValueError(
            f"{owner}.step: the gradient of parameter {index} has shape {tuple(grad.shape)}, "
            f"but the parameter has shape {tuple(param.shape)}. Pass one gradient per "
            "parameter, shaped like it, in flatten_parameters order."
        )
    if grad.dtype != param.dtype:
        raise TypeError(
            f"{owner}.step: the gradient of parameter {index} has dtype {grad.dtype}, but the "
            f"parameter has dtype {param.dtype}. Convert it, e.g. grad.to(param.dtype)."
        )
    if grad.device != param.device:
        raise ValueError(
            f"{owner}.step: the gradient of parameter {index} is on {grad.device}, but the "
            f"parameter is on {param.device}. Move it, e.g. grad.to(param.device)."
        )


_TAKES_USED: dict[type, bool] = {}


def takes_used(optimizer: object) -> bool:
    """Whether ``optimizer.step`` takes the keyword ``used`` (cached per class).

    Example:
        >>> from diffprog.optim import GD
        >>> takes_used(GD()), takes_used(object())
        (True, False)
    """
    cls = type(optimizer)
    found = _TAKES_USED.get(cls)
    if found is None:
        method = getattr(cls, "step", None)
        try:
            found = method is not None and "used" in inspect.signature(method).parameters
        except (TypeError, ValueError):
            found = False
        _TAKES_USED[cls] = found
    return found


def step_with_used(
    optimizer: Any,
    lr: LearningRate | None,
    gradients: Sequence[Any],
    params: Sequence[torch.Tensor],
    used: Sequence[bool] | None,
) -> tuple[list[torch.Tensor], Any]:
    """``optimizer.step(lr, gradients, params)``, told which parameters the loss reaches.

    An optimizer whose ``step`` takes ``used`` gets it; any other gets a zero gradient for each
    unused parameter instead (what ``grad`` gives), as its ``step`` was written for.

    Args:
        optimizer: the optimizer.
        lr: the learning rate.
        gradients: one gradient per parameter (``None`` allowed where ``used`` is False).
        params: the parameters.
        used: for each parameter whether the loss reaches it, or None (all of them).

    Returns:
        What ``optimizer.step`` returns.
    """
    if used is None:
        return optimizer.step(lr, gradients, params)  # type: ignore[no-any-return]
    if takes_used(optimizer):
        return optimizer.step(lr, gradients, params, used=used)  # type: ignore[no-any-return]
    filled = [
        torch.zeros_like(p) if g is None and not u else g
        for g, p, u in zip(gradients, params, used, strict=True)
    ]
    return optimizer.step(lr, filled, params)  # type: ignore[no-any-return]
