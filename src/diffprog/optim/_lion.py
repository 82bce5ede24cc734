"""``Lion``: the sign-momentum optimizer found by program search (Chen et al., 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import betas_in, hyper, non_negative, pair_of_floats, state
from diffprog.optim._pure import PureOptimizer

__all__ = ["Lion"]


class Lion(PureOptimizer, torch_options=("differentiable",)):
    """Lion (EvoLved Sign Momentum; Chen et al., "Symbolic Discovery of Optimization
    Algorithms", 2023), as a value. Not in torch.optim; the published algorithm:

    ``c = b1 m + (1 - b1) g``; ``p = p - lr * (sign(c) + weight_decay * p)``;
    ``m = b2 m + (1 - b2) g``. Every coordinate moves by ``lr``, so Lion wants a learning rate
    3-10x smaller than AdamW's and a weight decay 3-10x larger.

    Attributes:
        betas: ``(b1, b2)``, default ``(0.9, 0.99)``.
        weight_decay: decoupled weight decay (default 0).
        maximize: ascend instead of descend.
        count: the number of steps taken.
        exp_avg: the momentum ``m``, one tensor per trained parameter (``None`` for frozen).
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).
        differentiable: when True, a step runs with autograd on (the option torch.optim's
            optimizers have): the new parameters and momentum are differentiable functions of
            the old ones, the gradients, ``lr``, ``betas`` and ``weight_decay`` (tensors that
            may require grad). ``sign`` has derivative 0, so the update's direction passes no
            gradient: the meta-gradient reaches the gradients, the momentum and ``betas`` only
            through the momentum, which the update reads through ``sign`` (0 wherever defined).

    Example:
        >>> p = make_independent(torch.tensor([1.0, 1.0]))
        >>> new, opt = Lion.init([p]).step(0.1, [torch.tensor([3.0, -0.5])], [p])
        >>> new
        [tensor([0.9000, 1.1000])]
    """

    betas: tuple[float, float] = hyper(
        (0.9, 0.99),
        doc="the interpolation factors of the update and of the momentum",
        check=betas_in(1.0, closed=True),
        convert=pair_of_floats,
    )
    weight_decay: float = hyper(0.0, doc="decoupled weight decay", check=non_negative)
    maximize: bool = hyper(False, doc="ascend instead of descend")
    exp_avg: tuple[torch.Tensor | None, ...] = state(doc="the momentum m")

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
        lr = float(lr)
        beta1, beta2 = hyper["betas"]
        if hyper["maximize"]:
            grads = list(torch._foreach_neg(grads))
        exp_avg = state["exp_avg"]
        update = torch._foreach_lerp(exp_avg, grads, 1 - beta1)
        torch._foreach_sign_(update)
        if hyper["weight_decay"] != 0:
            new = torch._foreach_mul(params, 1 - lr * hyper["weight_decay"])
            torch._foreach_add_(new, update, alpha=-lr)
        else:
            new = torch._foreach_add(params, update, alpha=-lr)
        torch._foreach_lerp_(exp_avg, grads, 1 - beta2)
        return list(new)

    def _update_differentiable(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        # _update's algorithm, out of place.
        beta1, beta2 = hyper["betas"]
        decay = hyper["weight_decay"]
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            m = state["exp_avg"][i]
            update = torch.lerp(m, g, 1 - beta1).sign()
            if bool(decay != 0):
                p = p * (1 - lr * decay)
            new.append(p - lr * update)
            state["exp_avg"][i] = torch.lerp(m, g, 1 - beta2)
        return new
