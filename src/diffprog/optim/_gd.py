"""``GD``: plain gradient descent, the optimizer without state (but for its step count)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._pure import PureOptimizer

__all__ = ["GD"]


class GD(PureOptimizer, torch_options=("differentiable",)):
    """Gradient descent: ``p - lr * g``. Hasktorch's ``GD``; ``torch.optim.SGD`` without momentum.

    ``GD()`` trains every parameter; ``GD.init(model, ...)`` adds per-parameter learning-rate
    scales (``overrides={"*.bias": {"lr_scale": 2.0}}``) and freezing. The step count is kept
    for learning-rate schedules.

    Attributes:
        count: the number of steps taken.
        settings: which parameters are trained and how (``None``: all, alike).

    Example:
        >>> new, opt = GD().step(0.1, [torch.tensor([1.0])], [torch.tensor([2.0])])
        >>> new, opt.count
        ([tensor([1.9000])], 1)
        >>> from diffprog.nn import LinearSpec
        >>> GD.init(sample(LinearSpec(2, 1)), freeze="bias").trainable
        (True, False)
    """

    _elementwise: ClassVar[bool] = True  # runs on the shards of DTensor parameters

    donate: ClassVar[bool] = False  # no state to donate

    _sparse_ok: ClassVar[bool] = True
    _differentiable_ok: ClassVar[bool] = True

    def _update(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        if isinstance(lr, torch.Tensor):
            return list(torch._foreach_sub(params, torch._foreach_mul(grads, lr)))
        return list(torch._foreach_add(params, grads, alpha=-lr))

    def _update_differentiable(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        # torch.optim.SGD's single-tensor path: p - lr * g, out of place.
        return [p - g * lr for p, g in zip(params, grads, strict=True)]
