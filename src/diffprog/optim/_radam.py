"""``RAdam``: torch.optim.RAdam's algorithm (rectified Adam) as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import betas_in, hyper, non_negative, pair_of_floats, state
from diffprog.optim._pure import PureOptimizer, clone_all, device_groups, sqrt_of_moment

__all__ = ["RAdam"]


class RAdam(PureOptimizer, torch_options=("foreach", "capturable", "differentiable")):
    """RAdam (Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond"):
    ``torch.optim.RAdam``'s algorithm, as a value.

    Adam's moments ``m``, ``v``; at a parameter's step ``t``, with ``rho_inf = 2 / (1 - b2) - 1``
    and ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``: while ``rho_t <= 5`` the step is SGD with
    momentum, ``p - lr m / (1 - b1^t)``; after, the adaptive step rectified by
    ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``,
    ``p - lr m / (1 - b1^t) * r_t sqrt(1 - b2^t) / (sqrt(v) + eps)``. ``g`` includes the L2
    term ``weight_decay * p``, or with ``decoupled_weight_decay`` (RAdamW) the parameter is
    shrunk by ``1 - lr * weight_decay`` instead. Written with ``_foreach_`` operations in
    torch's multi-tensor order (torch has no fused RAdam kernel): it equals
    ``torch.optim.RAdam(foreach=True)`` bit for bit, and torch's default for-loop on the CPU
    to float rounding.

    Attributes:
        betas, eps, weight_decay, decoupled_weight_decay, maximize: as
            ``torch.optim.RAdam``'s.
        count: the number of steps taken (the argument of a learning-rate schedule).
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``, which sets ``rho_t`` and the bias corrections); empty while
            each trained parameter has been updated by all ``count`` steps. A parameter the
            loss does not reach (``used``) is left alone.
        exp_avg, exp_avg_sq: the moments, one tensor per trained parameter (``None`` for a
            frozen one), in ``flatten_parameters`` order.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).
        differentiable: when True, a step runs with autograd on (torch.optim's
            ``differentiable=True``, its single-tensor path, out of place): the new parameters
            and moments are differentiable functions of the old ones, the gradients and the
            hyper-parameters (``lr``, ``betas``, ``eps``, ``weight_decay`` may be tensors that
            require grad). Whether a step is rectified (``rho_t > 5``) is a choice, not a
            function: its derivative is that of the branch taken.

    Example:
        >>> p = make_independent(torch.tensor([1.0, -1.0]))
        >>> new, opt = RAdam.init([p]).step(0.1, [torch.tensor([0.5, -0.5])], [p])
        >>> new  # the first steps are momentum steps: p - lr * g
        [tensor([ 0.9500, -0.9500])]
        >>> RAdam.init([p], betas=(0.9, 1.0))
        Traceback (most recent call last):
        ...
        ValueError: Invalid beta parameter at index 1: 1.0 (must be in [0, 1)).
    """

    betas: tuple[float, float] = hyper(
        (0.9, 0.999),
        doc="the decay rates of the first and second moments",
        check=betas_in(1.0, closed=False),
        convert=pair_of_floats,
    )
    eps: float = hyper(1e-8, doc="added to the denominator", check=non_negative)
    weight_decay: float = hyper(
        0.0, doc="the weight decay (an L2 term in the gradient, or decoupled)", check=non_negative
    )
    decoupled_weight_decay: bool = hyper(False, doc="shrink the parameters as AdamW does (RAdamW)")
    maximize: bool = hyper(False, doc="ascend instead of descend")
    exp_avg: tuple[torch.Tensor | None, ...] = state(doc="the first moment, torch's exp_avg")
    exp_avg_sq: tuple[torch.Tensor | None, ...] = state(doc="the second moment")

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
        lists = [new, grads, state["exp_avg"], state["exp_avg_sq"]]
        for _, (ps, gs, ms, vs) in device_groups(*lists):
            _foreach_radam(hyper, float(lr), count + 1, ps, gs, ms, vs)
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
        # torch.optim.RAdam's single-tensor path (differentiable=True), out of place.
        beta1, beta2 = hyper["betas"]
        decay, t = hyper["weight_decay"], count + 1
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * (beta2**t) / bias_correction2
        rectified = bool(rho_t > 5.0)
        if rectified:
            rect = (
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            ) ** 0.5
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            if bool(decay != 0):
                if hyper["decoupled_weight_decay"]:
                    p = p * (1 - lr * decay)
                else:
                    g = g + decay * p
            m = torch.lerp(state["exp_avg"][i], g, 1 - beta1)
            v = state["exp_avg_sq"][i] * beta2 + (1 - beta2) * g * g
            state["exp_avg"][i], state["exp_avg_sq"][i] = m, v
            corrected = m / bias_correction1
            if rectified:
                adaptive = (bias_correction2**0.5) / (sqrt_of_moment(v) + hyper["eps"])
                new.append(p - corrected * lr * adaptive * rect)
            else:
                new.append(p - corrected * lr)
        return new


def _step_sizes(beta1: float, beta2: float, lr: float, step: int) -> tuple[float, float]:
    """torch's two step sizes at ``step`` (not capturable): that of the unrectified (momentum)
    update, and the rectified one's ``sqrt(1 - b2^t) * lr * r_t / (1 - b1^t)``, both negated;
    exactly one is zero (the rectified one while ``rho_t <= 5``)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / (1 - beta2**step)
    rect: float = (
        ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        if rho_t > 5
        else 0
    )
    unrectified = 0 if rect > 0 else 1.0
    bias_correction1 = 1 - beta1**step
    unrect_step_size = (lr * unrectified / bias_correction1) * -1
    rect_step_size = ((1 - beta2**step) ** 0.5) * (lr * rect / bias_correction1) * -1
    return unrect_step_size, rect_step_size


def _foreach_radam(
    hyper: Mapping[str, Any],
    lr: float,
    step: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
) -> None:
    """torch's ``_multi_tensor_radam`` (not capturable) for parameters that have all taken
    ``step - 1`` steps: ``params`` and the moments are updated in place, ``grads`` are not."""
    beta1, beta2 = hyper["betas"]
    weight_decay = hyper["weight_decay"]
    if hyper["maximize"]:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        if hyper["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    unrect_step_size, rect_step_size = _step_sizes(beta1, beta2, lr, step)
    # buffer = rect_step_size / (sqrt(v) + eps) + unrect_step_size, in torch's order: while
    # the step is unrectified, (sqrt(v) + eps) / -0.0 is -inf and its reciprocal -0.0.
    buffer = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(buffer, hyper["eps"])
    torch._foreach_div_(buffer, rect_step_size)
    torch._foreach_reciprocal_(buffer)
    torch._foreach_add_(buffer, unrect_step_size)
    torch._foreach_addcmul_(params, exp_avgs, buffer)
