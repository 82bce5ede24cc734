"""The training loop: ``run_step`` and ``fold_loop`` (Hasktorch's ``runStep``, ``foldLoop``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from diffprog import flatten_parameters, grad, make_independent, replace_parameters
from diffprog.optim._optimizer import LearningRate, Optimizer

__all__ = ["fold_loop", "run_step"]

M = TypeVar("M")
OptT = TypeVar("OptT", bound=Optimizer)
A = TypeVar("A")


def run_step(model: M, optimizer: OptT, loss: torch.Tensor, lr: LearningRate) -> tuple[M, OptT]:
    """One training step: gradients of ``loss``, an optimizer step, a rebuilt model.

    Hasktorch's ``runStep``: the gradients of ``loss`` with respect to
    ``flatten_parameters(model)``, the optimizer's ``step``, ``make_independent`` on the results,
    and ``replace_parameters``. ``model`` and ``optimizer`` are left as they were.

    Args:
        model: the model ``loss`` was computed with.
        optimizer: the optimizer (its state).
        loss: a scalar tensor computed from ``model``.
        lr: the learning rate.

    Returns:
        ``(new_model, new_optimizer)``.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import GD
        >>> model = sample(LinearSpec(2, 1), generator=torch.Generator().manual_seed(0))
        >>> loss = model(torch.ones(1, 2)).pow(2).sum()
        >>> new_model, _ = run_step(model, GD(), loss, 0.1)
        >>> bool(new_model(torch.ones(1, 2)).pow(2).sum() < loss)
        True
    """
    params = flatten_parameters(model)
    gradients = grad(loss, params)
    new_params, new_optimizer = optimizer.step(lr, gradients, params)
    new_model = replace_parameters(model, [make_independent(p) for p in new_params])
    return new_model, new_optimizer


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
