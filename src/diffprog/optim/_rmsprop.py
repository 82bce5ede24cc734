"""``RMSprop``: torch.optim.RMSprop's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import hyper, non_negative, state
from diffprog.optim._pure import PureOptimizer, sqrt_of_moment

__all__ = ["RMSprop"]


class RMSprop(PureOptimizer, torch_options=("capturable", "foreach", "differentiable")):
    """RMSprop (Hinton), exactly ``torch.optim.RMSprop``'s algorithm, as a value.

    ``v = alpha v + (1 - alpha) g^2``; the denominator is ``sqrt(v) + eps``, or with
    ``centered`` ``sqrt(v - a^2) + eps`` where ``a = alpha a + (1 - alpha) g``; the step is
    ``p - lr * g / denominator``, or with ``momentum`` ``b = momentum b + g / denominator``
    and ``p - lr * b``. ``g`` includes ``weight_decay * p``. Written with ``torch._foreach_*``
    operations in torch's own order.

    Attributes:
        alpha, eps, weight_decay, momentum, centered, maximize: as torch's.
        count: the number of steps taken.
        square_avg: ``v``; ``momentum_buffer``: ``b`` (when ``momentum > 0``); ``grad_avg``:
            ``a`` (when ``centered``): one tensor per trained parameter, ``None`` for frozen.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> new, opt = RMSprop.init([p], alpha=0.75).step(0.1, [torch.tensor([2.0])], [p])
        >>> new, opt.square_avg
        ([tensor([0.8000])], (tensor([1.]),))
    """

    _elementwise: ClassVar[bool] = True  # runs on the shards of DTensor parameters

    alpha: float = hyper(0.99, doc="the smoothing constant of ``square_avg``", check=non_negative)
    eps: float = hyper(1e-8, doc="added to the denominator", check=non_negative)
    weight_decay: float = hyper(0.0, doc="L2 penalty added to the gradient", check=non_negative)
    momentum: float = hyper(0.0, doc="the momentum factor", check=non_negative)
    centered: bool = hyper(False, doc="normalise by an estimate of the gradient's variance")
    maximize: bool = hyper(False, doc="ascend instead of descend")
    square_avg: tuple[torch.Tensor | None, ...] = state(doc="the running average of g^2")
    momentum_buffer: tuple[torch.Tensor | None, ...] = state(doc="with momentum > 0")
    grad_avg: tuple[torch.Tensor | None, ...] = state(doc="with centered, the average of g")

    _differentiable_ok: ClassVar[bool] = True

    @classmethod
    def _state_names(cls, hyper: Mapping[str, Any]) -> tuple[str, ...]:
        names = ["square_avg"]
        if hyper["momentum"] > 0:
            names.append("momentum_buffer")
        if hyper["centered"]:
            names.append("grad_avg")
        return tuple(names)

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
        alpha, eps, weight_decay = hyper["alpha"], hyper["eps"], hyper["weight_decay"]
        if hyper["maximize"]:
            grads = list(torch._foreach_neg(grads))
        if weight_decay != 0:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
        square_avg = state["square_avg"]
        torch._foreach_mul_(square_avg, alpha)
        torch._foreach_addcmul_(square_avg, grads, grads, value=1 - alpha)
        if hyper["centered"]:
            grad_avg = state["grad_avg"]
            torch._foreach_lerp_(grad_avg, grads, 1 - alpha)
            avg = torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(square_avg)
        torch._foreach_add_(avg, eps)
        if hyper["momentum"] > 0:
            buf = state["momentum_buffer"]
            torch._foreach_mul_(buf, hyper["momentum"])
            torch._foreach_addcdiv_(buf, grads, avg)
            return list(torch._foreach_add(params, buf, alpha=-lr))
        return list(torch._foreach_addcdiv(params, grads, avg, value=-lr))

    def _update_differentiable(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        # torch.optim.RMSprop's single-tensor path, out of place.
        alpha, eps, decay = hyper["alpha"], hyper["eps"], hyper["weight_decay"]
        momentum = hyper["momentum"]
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            if bool(decay != 0):
                g = g + decay * p
            v = state["square_avg"][i] * alpha + (1 - alpha) * g * g
            state["square_avg"][i] = v
            if hyper["centered"]:
                a = torch.lerp(state["grad_avg"][i], g, 1 - alpha)
                state["grad_avg"][i] = a
                v = v - a * a
            avg = sqrt_of_moment(v) + eps
            if bool(momentum > 0):
                b = state["momentum_buffer"][i] * momentum + g / avg
                state["momentum_buffer"][i] = b
                new.append(p - lr * b)
            else:
                new.append(p - lr * g / avg)
        return new
