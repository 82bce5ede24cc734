"""The ``Optimizer`` protocol: a pure step from (gradients, parameters, state) to new ones."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import torch
from typing_extensions import Self

__all__ = ["Gradients", "LearningRate", "Optimizer", "Schedule", "learning_rate_at", "step"]

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
    """

    def step(
        self, lr: LearningRate, gradients: Gradients, params: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], Self]:
        """One update: new parameters (plain tensors, not yet independent) and new state."""
        ...


def step(
    lr: LearningRate, gradients: Gradients, params: Sequence[torch.Tensor], state: OptT
) -> tuple[list[torch.Tensor], OptT]:
    """Apply one optimizer step, in Hasktorch's argument order.

    Args:
        lr: the learning rate.
        gradients: one gradient per parameter.
        params: the current parameters.
        state: the optimizer (its state).

    Returns:
        ``(new_params, new_state)``; the inputs are unchanged.

    Example:
        >>> from diffprog.optim import GD
        >>> new, _ = step(0.5, [torch.ones(2)], [torch.zeros(2)], GD())
        >>> new
        [tensor([-0.5000, -0.5000])]
    """
    return state.step(lr, gradients, params)


def learning_rate_at(lr: LearningRate, count: int) -> float | torch.Tensor:
    """The learning rate to use for the step after ``count`` steps: ``lr(count)`` for a schedule.

    Args:
        lr: a float, a 0-dim tensor, or a schedule.
        count: the number of steps taken so far.

    Returns:
        The learning rate as a float or a 0-dim tensor.

    Raises:
        TypeError: ``lr`` is none of the above.

    Example:
        >>> learning_rate_at(0.1, 5), learning_rate_at(lambda count: 0.1 / (count + 1), 4)
        (0.1, 0.02)
    """
    if isinstance(lr, torch.Tensor):
        return lr
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        return float(lr)
    if callable(lr):
        return lr(count)
    raise TypeError(
        f"the learning rate must be a float, a 0-dim tensor or a schedule (a function of the "
        f"step count), got {type(lr).__name__}."
    )
