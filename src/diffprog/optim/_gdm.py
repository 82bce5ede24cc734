"""``GDM``: gradient descent with momentum, exactly ``torch.optim.SGD``'s algorithm."""

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
)

__all__ = ["GDM"]


class GDM(PureOptimizer, torch_options=("foreach", "differentiable", "fused")):
    """Gradient descent with momentum: ``torch.optim.SGD``'s algorithm, as a value.

    With ``g = grad + weight_decay * p`` (negated first if ``maximize``), the momentum buffer
    is ``b = momentum * b + (1 - dampening) * g`` (``b = g`` on the first step), and the step is
    ``p - lr * b``, or ``p - lr * (g + momentum * b)`` with ``nesterov``. Hasktorch's ``GDM``
    (``beta`` is ``momentum`` here, its ``momentum`` list is ``momentum_buffer``).

    Attributes:
        momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``'s.
        count: the number of steps taken.
        param_counts: the number of steps that updated each parameter (empty while each
            trained parameter has been updated by all ``count`` steps). A parameter's first
            update starts its buffer at its gradient, as torch.optim.SGD does for a parameter
            without a ``momentum_buffer``; a parameter the loss does not reach (``used``) is
            left alone.
        momentum_buffer: one buffer per trained parameter (``None`` for frozen ones); empty
            when ``momentum == 0``.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> opt = GDM.init([p], momentum=0.9)
        >>> new, opt = opt.step(0.1, [torch.tensor([1.0])], [p])
        >>> new, opt.momentum_buffer
        ([tensor([0.9000])], (tensor([1.]),))
    """

    _elementwise: ClassVar[bool] = True  # runs on the shards of DTensor parameters

    momentum: float = hyper(0.0, doc="the momentum factor", check=non_negative)
    dampening: float = hyper(0.0, doc="dampening of the momentum")
    weight_decay: float = hyper(0.0, doc="L2 penalty added to the gradient", check=non_negative)
    nesterov: bool = hyper(False, doc="Nesterov momentum (needs momentum > 0, dampening 0)")
    maximize: bool = hyper(False, doc="ascend instead of descend")
    momentum_buffer: tuple[torch.Tensor | None, ...] = state(doc="torch's momentum_buffer")

    _differentiable_ok: ClassVar[bool] = True

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        if hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening.")

    @classmethod
    def _state_names(cls, hyper: Mapping[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if hyper["momentum"] != 0 else ()

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
        buffers = state.get("momentum_buffer", [])
        grads = fused_layouts(new, grads, *([buffers] if buffers else []))
        for device, (ps, gs, *bs) in device_groups(new, grads, *([buffers] if buffers else [])):
            if has_fused("_fused_sgd_", device):
                torch._fused_sgd_(
                    ps,
                    gs,
                    bs[0] if bs else [],
                    weight_decay=hyper["weight_decay"],
                    momentum=hyper["momentum"],
                    lr=lr_on(lr, device),
                    dampening=hyper["dampening"],
                    nesterov=hyper["nesterov"],
                    maximize=hyper["maximize"],
                    is_first_step=count == 0,
                )
            else:
                _foreach_sgd(hyper, float(lr), count == 0, ps, gs, bs[0] if bs else [])
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
        # torch.optim.SGD's single-tensor path, out of place. One difference: torch starts
        # the buffer at grad.detach() on a parameter's first step, which cuts the gradient
        # of that step's update with respect to the gradient; here it is the gradient itself.
        momentum, damp, decay = hyper["momentum"], hyper["dampening"], hyper["weight_decay"]
        buffers = state.get("momentum_buffer", [])
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            if _nonzero(decay):
                g = g + decay * p
            if _nonzero(momentum):
                b = g if count == 0 else buffers[i] * momentum + (1 - damp) * g
                buffers[i] = b
                g = g + momentum * b if hyper["nesterov"] else b
            new.append(p - g * lr)
        return new


def _nonzero(value: float | torch.Tensor) -> bool:
    """Whether a hyper-parameter (a float, or a tensor to learn) is not 0."""
    return bool(value != 0)


def _foreach_sgd(
    hyper: Mapping[str, Any],
    lr: float,
    first: bool,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor],
) -> None:
    """SGD with ``_foreach_`` operations, in torch's multi-tensor order, on devices without the
    fused kernel: ``params`` and ``buffers`` are updated in place, ``grads`` are not."""
    if hyper["maximize"]:
        grads = list(torch._foreach_neg(grads))
    if hyper["weight_decay"] != 0:
        grads = list(torch._foreach_add(grads, params, alpha=hyper["weight_decay"]))
    momentum = hyper["momentum"]
    if momentum != 0:
        if first:
            torch._foreach_copy_(buffers, grads)
        else:
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads, alpha=1 - hyper["dampening"])
        if hyper["nesterov"]:
            grads = list(torch._foreach_add(grads, buffers, alpha=momentum))
        else:
            grads = buffers
    torch._foreach_add_(params, grads, alpha=-lr)
