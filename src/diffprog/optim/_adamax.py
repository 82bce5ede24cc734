"""``Adamax``: torch.optim.Adamax's algorithm (Adam with the infinity norm) as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import betas_in, hyper, non_negative, pair_of_floats, state
from diffprog.optim._pure import PureOptimizer, clone_all, device_groups

__all__ = ["Adamax"]


class Adamax(PureOptimizer, torch_options=("foreach", "differentiable", "capturable")):
    """Adamax (Kingma & Ba, the infinity-norm variant of Adam): ``torch.optim.Adamax``'s
    algorithm, as a value.

    ``m = b1 m + (1 - b1) g``, ``u = max(b2 u, |g| + eps)``, and
    ``p - lr / (1 - b1^t) * m / u`` at a parameter's step ``t``; ``g`` includes the L2 term
    ``weight_decay * p``. Written with ``_foreach_`` operations in torch's multi-tensor order
    (torch has no fused Adamax kernel): it equals ``torch.optim.Adamax(foreach=True)`` bit for
    bit, and torch's default for-loop on the CPU to float rounding.

    Attributes:
        betas, eps, weight_decay, maximize: as ``torch.optim.Adamax``'s.
        count: the number of steps taken (the argument of a learning-rate schedule).
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``, which sets the bias correction); empty while each trained
            parameter has been updated by all ``count`` steps. A parameter the loss does not
            reach (``used``) is left alone.
        exp_avg: the first moment ``m``; exp_inf: the infinity norm ``u``: one tensor per
            trained parameter (``None`` for a frozen one), in ``flatten_parameters`` order.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).

    Example:
        >>> p = make_independent(torch.tensor([1.0, -1.0]))
        >>> new, opt = Adamax.init([p]).step(0.1, [torch.tensor([0.5, -2.0])], [p])
        >>> new, opt.exp_inf
        ([tensor([ 0.9000, -0.9000])], (tensor([0.5000, 2.0000]),))
        >>> Adamax.init([p], weight_decay=-0.1)
        Traceback (most recent call last):
        ...
        ValueError: Invalid weight_decay value: -0.1 (must be >= 0).
    """

    _elementwise: ClassVar[bool] = True  # runs on the shards of DTensor parameters

    betas: tuple[float, float] = hyper(
        (0.9, 0.999),
        doc="the decay rates of the first moment and of the infinity norm",
        check=betas_in(1.0, closed=False),
        convert=pair_of_floats,
    )
    eps: float = hyper(1e-8, doc="added to ``|g|`` before the maximum", check=non_negative)
    weight_decay: float = hyper(0.0, doc="L2 penalty added to the gradient", check=non_negative)
    maximize: bool = hyper(False, doc="ascend instead of descend")
    exp_avg: tuple[torch.Tensor | None, ...] = state(doc="the first moment, torch's exp_avg")
    exp_inf: tuple[torch.Tensor | None, ...] = state(doc="the infinity norm, torch's exp_inf")

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
        new = clone_all(params)
        lists = [new, grads, state["exp_avg"], state["exp_inf"]]
        for _, (ps, gs, ms, us) in device_groups(*lists):
            _foreach_adamax(hyper, float(lr), count + 1, ps, gs, ms, us)
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
        # torch.optim.Adamax's single-tensor path (differentiable=True), out of place: the
        # maximum as torch's amax over the two stacked candidates (ties share the gradient).
        beta1, beta2 = hyper["betas"]
        decay = hyper["weight_decay"]
        step_size = lr / (1 - beta1 ** (count + 1))
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            if bool(decay != 0):
                g = g + decay * p
            m = torch.lerp(state["exp_avg"][i], g, 1 - beta1)
            candidates = torch.stack([state["exp_inf"][i] * beta2, g.abs() + hyper["eps"]])
            u = torch.amax(candidates, 0)
            state["exp_avg"][i], state["exp_inf"][i] = m, u
            new.append(p - step_size * m / u)
        return new


def _foreach_adamax(
    hyper: Mapping[str, Any],
    lr: float,
    step: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_infs: list[torch.Tensor],
) -> None:
    """torch's ``_multi_tensor_adamax`` (not capturable) for parameters that have all taken
    ``step - 1`` steps: ``params`` and the state are updated in place, ``grads`` are not."""
    beta1, beta2 = hyper["betas"]
    weight_decay = hyper["weight_decay"]
    if hyper["maximize"]:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_infs, beta2)
    norms = torch._foreach_abs(grads)
    torch._foreach_add_(norms, hyper["eps"])
    torch._foreach_maximum_(exp_infs, norms)
    step_size = (lr / (1 - beta1**step)) * -1
    torch._foreach_addcdiv_(params, exp_avgs, exp_infs, step_size)
