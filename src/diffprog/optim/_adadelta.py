"""``Adadelta``: torch.optim.Adadelta's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import hyper, non_negative, state
from diffprog.optim._pure import PureOptimizer

__all__ = ["Adadelta"]


def _in_unit_interval(name: str, value: Any) -> None:
    """The check of ``rho``: in ``[0, 1]``, in torch.optim.Adadelta's words."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name} value: {value} (must be in [0, 1]).")


class Adadelta(PureOptimizer, torch_options=("foreach", "capturable", "differentiable")):
    """Adadelta (Zeiler), exactly ``torch.optim.Adadelta``'s algorithm, as a value.

    ``v = rho v + (1 - rho) g^2``, ``d = sqrt(u + eps) / sqrt(v + eps) * g``,
    ``u = rho u + (1 - rho) d^2`` and ``p - lr * d``, ``g`` including the L2 term
    ``weight_decay * p``. Written with ``torch._foreach_*`` operations in torch's
    multi-tensor order (torch's for-loop path gives the same numbers). torch.optim's default
    learning rate for Adadelta is 1.0.

    Attributes:
        rho, eps, weight_decay, maximize: as ``torch.optim.Adadelta``'s.
        count: the number of steps taken.
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``, which Adadelta's update does not read); empty while each
            trained parameter has been updated by all ``count`` steps.
        square_avg, acc_delta: ``v`` and ``u``, one tensor per trained parameter (``None`` for
            a frozen one), in ``flatten_parameters`` order.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> new, opt = Adadelta.init([p], rho=0.5, eps=1e-2).step(1.0, [torch.tensor([2.0])], [p])
        >>> new, opt.square_avg, opt.acc_delta
        ([tensor([0.8589])], (tensor([2.]),), (tensor([0.0100]),))
    """

    _elementwise: ClassVar[bool] = True  # runs on the shards of DTensor parameters

    rho: float = hyper(0.9, doc="the decay rate of the running averages", check=_in_unit_interval)
    eps: float = hyper(1e-6, doc="added inside both square roots", check=non_negative)
    weight_decay: float = hyper(0.0, doc="L2 penalty added to the gradient", check=non_negative)
    maximize: bool = hyper(False, doc="ascend instead of descend")
    square_avg: tuple[torch.Tensor | None, ...] = state(doc="the running average of g^2")
    acc_delta: tuple[torch.Tensor | None, ...] = state(doc="the running average of the steps^2")

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
        rho, eps, weight_decay = hyper["rho"], hyper["eps"], hyper["weight_decay"]
        if hyper["maximize"]:
            grads = list(torch._foreach_neg(grads))
        if weight_decay != 0:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
        square_avgs, acc_deltas = state["square_avg"], state["acc_delta"]
        torch._foreach_mul_(square_avgs, rho)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - rho)
        std = torch._foreach_add(square_avgs, eps)
        torch._foreach_sqrt_(std)
        deltas = torch._foreach_add(acc_deltas, eps)
        torch._foreach_sqrt_(deltas)
        torch._foreach_div_(deltas, std)
        torch._foreach_mul_(deltas, grads)
        torch._foreach_mul_(acc_deltas, rho)
        torch._foreach_addcmul_(acc_deltas, deltas, deltas, value=1 - rho)
        return list(torch._foreach_add(params, deltas, alpha=-lr))

    def _update_differentiable(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        # torch.optim.Adadelta's single-tensor path, out of place (eps keeps both square
        # roots away from 0).
        rho, eps, decay = hyper["rho"], hyper["eps"], hyper["weight_decay"]
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            if bool(decay != 0):
                g = g + decay * p
            v = state["square_avg"][i] * rho + (1 - rho) * g * g
            delta = (state["acc_delta"][i] + eps).sqrt() / (v + eps).sqrt() * g
            u = state["acc_delta"][i] * rho + (1 - rho) * delta * delta
            state["square_avg"][i], state["acc_delta"][i] = v, u
            new.append(p - lr * delta)
        return new
