"""``GD``: plain gradient descent, the stateless optimizer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffprog import Parameterized
from diffprog.optim._optimizer import Gradients, LearningRate

__all__ = ["GD"]


class GD(Parameterized):
    """Gradient descent: ``p - lr * g``. Hasktorch's ``GD``; torch.optim.SGD without momentum.

    Example:
        >>> new, opt = GD().step(0.1, [torch.tensor([1.0])], [torch.tensor([2.0])])
        >>> new
        [tensor([1.9000])]
    """

    def step(
        self, lr: LearningRate, gradients: Gradients, params: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], GD]:
        """One step of gradient descent (out of place)."""
        params, gradients = list(params), list(gradients)
        with torch.no_grad():
            if isinstance(lr, torch.Tensor):
                new = torch._foreach_sub(params, torch._foreach_mul(gradients, lr))
            else:
                new = torch._foreach_add(params, gradients, alpha=-lr)
        return list(new), self
