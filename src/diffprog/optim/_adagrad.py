"""``Adagrad``: torch.optim.Adagrad's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import hyper, non_negative, state
from diffprog.optim._pure import (
    PureOptimizer,
    clone_all,
    device_groups,
    fused_layouts,
    has_fused,
    lr_on,
    sqrt_of_moment,
)

__all__ = ["Adagrad"]


class Adagrad(PureOptimizer, torch_options=("foreach", "differentiable", "fused")):
    """Adagrad (Duchi et al.), exactly ``torch.optim.Adagrad``'s algorithm, as a value.

    ``s = s + g^2`` and ``p - clr * g / (sqrt(s) + eps)`` with ``clr = lr / (1 + (t - 1) *
    lr_decay)`` at step ``t = count + 1``, ``g`` including ``weight_decay * p``. Runs torch's
    fused Adagrad kernel on fresh copies.

    Attributes:
        lr_decay, weight_decay, initial_accumulator_value, eps, maximize: as torch's.
        count: the number of steps taken.
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``, which sets the learning-rate decay); empty while each trained
            parameter has been updated by all ``count`` steps.
        sum: the accumulated squared gradients, one tensor per trained parameter (torch's
            ``state["sum"]``; ``None`` for a frozen parameter).
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> new, opt = Adagrad.init([p]).step(0.1, [torch.tensor([2.0])], [p])
        >>> new, opt.sum
        ([tensor([0.9000])], (tensor([4.]),))
    """

    _elementwise: ClassVar[bool] = True  # runs on the shards of DTensor parameters

    lr_decay: float = hyper(0.0, doc="learning-rate decay per step", check=non_negative)
    weight_decay: float = hyper(0.0, doc="L2 penalty added to the gradient", check=non_negative)
    initial_accumulator_value: float = hyper(
        0.0, doc="the starting value of ``sum``", check=non_negative
    )
    eps: float = hyper(1e-10, doc="added to the denominator", check=non_negative)
    maximize: bool = hyper(False, doc="ascend instead of descend")
    sum: tuple[torch.Tensor | None, ...] = state(doc="the accumulated squared gradients")

    _differentiable_ok: ClassVar[bool] = True

    @classmethod
    def _init_state(cls, name: str, param: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
        init = hyper["initial_accumulator_value"]
        if param.is_complex():
            init = complex(init, init)
        return torch.full_like(param, init, memory_format=torch.preserve_format)

    def _update(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        new = clone_all(params)
        grads = fused_layouts(new, grads, state["sum"])
        for device, (ps, gs, ss) in device_groups(new, grads, state["sum"]):
            if has_fused("_fused_adagrad_", device):
                torch._fused_adagrad_(
                    ps,
                    gs,
                    ss,
                    [torch.full((), count + 1.0, device=device) for _ in ps],
                    lr=lr_on(lr, device),
                    lr_decay=hyper["lr_decay"],
                    weight_decay=hyper["weight_decay"],
                    eps=hyper["eps"],
                    maximize=hyper["maximize"],
                )
            else:
                _foreach_adagrad(hyper, float(lr), count + 1, ps, gs, ss)
        return new

    def _update_differentiable(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        # torch.optim.Adagrad's single-tensor path (dense gradients), out of place.
        decay, eps = hyper["weight_decay"], hyper["eps"]
        clr = lr / (1 + count * hyper["lr_decay"])
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            if bool(decay != 0):
                g = g + decay * p
            s = state["sum"][i] + g * g
            state["sum"][i] = s
            new.append(p - clr * g / (sqrt_of_moment(s) + eps))
        return new


def _foreach_adagrad(
    hyper: Mapping[str, Any],
    lr: float,
    step: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    sums: list[torch.Tensor],
) -> None:
    """Adagrad with ``_foreach_`` operations, in torch's multi-tensor order, on devices without
    the fused kernel: ``params`` and ``sums`` are updated in place, ``grads`` are not."""
    if hyper["maximize"]:
        grads = list(torch._foreach_neg(grads))
    if hyper["weight_decay"] != 0:
        grads = list(torch._foreach_add(grads, params, alpha=hyper["weight_decay"]))
    minus_clr = -lr / (1 + (step - 1) * hyper["lr_decay"])
    torch._foreach_addcmul_(sums, grads, grads, value=1)
    std = torch._foreach_sqrt(sums)
    torch._foreach_add_(std, hyper["eps"])
    numerator = torch._foreach_mul(grads, minus_clr)
    torch._foreach_addcdiv_(params, numerator, std)
