"""The ``Optimizer`` protocol: a pure step from (gradients, parameters, state) to new ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar, runtime_checkable

import torch
from typing_extensions import Self

__all__ = ["Gradients", "LearningRate", "Optimizer", "step"]

LearningRate = float | torch.Tensor
"""A learning rate: a Python float or a 0-dim tensor."""

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
