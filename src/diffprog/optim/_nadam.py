"""``NAdam``: torch.optim.NAdam's algorithm (Adam with Nesterov momentum) as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import betas_in, hyper, non_negative, pair_of_floats, state
from diffprog.optim._pure import (
    PureOptimizer,
    clone_all,
    device_groups,
    scalar_dtype,
    sqrt_of_moment,
)

__all__ = ["NAdam"]


class NAdam(PureOptimizer, torch_options=("foreach", "capturable", "differentiable")):
    """NAdam (Dozat, "Incorporating Nesterov Momentum into Adam"): ``torch.optim.NAdam``'s
    algorithm, as a value.

    At a parameter's step ``t`` the momentum coefficient is
    ``mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay))`` and ``mu_product`` is the product of
    ``mu_1 .. mu_t``; with ``m``, ``v`` Adam's moments,
    ``p - lr (1 - mu_t) / (1 - mu_product) g / d - lr mu_(t+1) / (1 - mu_product mu_(t+1)) m / d``
    where ``d = sqrt(v / (1 - b2^t)) + eps``. ``g`` includes the L2 term ``weight_decay * p``,
    or with ``decoupled_weight_decay`` (NAdamW) the parameter is shrunk by
    ``1 - lr * weight_decay`` instead. The step is written with ``_foreach_`` operations in
    torch's multi-tensor order (torch has no fused NAdam kernel), so it equals
    ``torch.optim.NAdam(foreach=True)`` bit for bit, and the default for-loop of torch on the
    CPU to float rounding.

    Attributes:
        betas, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize: as
            ``torch.optim.NAdam``'s.
        count: the number of steps taken (the argument of a learning-rate schedule).
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``); empty while each trained parameter has been updated by all
            ``count`` steps. A parameter the loss does not reach (``used``) is left alone: its
            count, moments and ``mu_product`` stay as they were.
        exp_avg, exp_avg_sq: Adam's moments, one tensor per trained parameter (``None`` for a
            frozen one), in ``flatten_parameters`` order.
        mu_product: each trained parameter's product of momentum coefficients, a 0-dim CPU
            tensor of torch's scalar dtype (float32, float64 under a float64 default dtype),
            as torch keeps it in ``state["mu_product"]``.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).
        differentiable: when True, a step runs with autograd on (torch.optim's
            ``differentiable=True``, its single-tensor path, out of place): the new parameters
            and state are differentiable functions of the old ones, the gradients and the
            hyper-parameters (``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``momentum_decay`` may be tensors that require grad; ``mu_product`` then carries
            its graph).

    Example:
        >>> p = make_independent(torch.tensor([1.0, -1.0]))
        >>> new, opt = NAdam.init([p]).step(0.1, [torch.tensor([0.5, -0.5])], [p])
        >>> new, opt.mu_product
        ([tensor([ 0.8944, -0.8944])], (tensor(0.4501),))
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
    momentum_decay: float = hyper(
        4e-3, doc="the decay of the momentum coefficient ``mu_t``", check=non_negative
    )
    decoupled_weight_decay: bool = hyper(False, doc="shrink the parameters as AdamW does (NAdamW)")
    maximize: bool = hyper(False, doc="ascend instead of descend")
    exp_avg: tuple[torch.Tensor | None, ...] = state(doc="the first moment, torch's exp_avg")
    exp_avg_sq: tuple[torch.Tensor | None, ...] = state(doc="the second moment")
    mu_product: tuple[torch.Tensor | None, ...] = state(
        doc="the product of the momentum coefficients, torch's mu_product"
    )

    _differentiable_ok: ClassVar[bool] = True

    @classmethod
    def _param_shaped_state(cls) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")  # mu_product is a scalar

    @classmethod
    def _init_state(cls, name: str, param: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
        if name == "mu_product":
            # torch.optim.NAdam's (non-capturable) state: a CPU scalar of its scalar dtype.
            return torch.tensor(1.0, dtype=scalar_dtype())
        return torch.zeros_like(param, memory_format=torch.preserve_format)

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
        lists = [new, grads, state["exp_avg"], state["exp_avg_sq"], state["mu_product"]]
        for _, (ps, gs, ms, vs, mus) in device_groups(*lists):
            _foreach_nadam(hyper, float(lr), count + 1, ps, gs, ms, vs, mus)
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
        # torch.optim.NAdam's single-tensor path (differentiable=True), out of place.
        beta1, beta2 = hyper["betas"]
        decay, momentum_decay, t = hyper["weight_decay"], hyper["momentum_decay"], count + 1
        bias_correction2 = 1 - beta2**t
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * momentum_decay)))
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            if bool(decay != 0):
                if hyper["decoupled_weight_decay"]:
                    p = p * (1 - lr * decay)
                else:
                    g = g + decay * p
            held = state["mu_product"][i]
            mu_product = (held * mu).to(held.dtype)  # its dtype kept, as torch's in place *=
            m = torch.lerp(state["exp_avg"][i], g, 1 - beta1)
            v = state["exp_avg_sq"][i] * beta2 + (1 - beta2) * g * g
            state["exp_avg"][i], state["exp_avg_sq"][i] = m, v
            state["mu_product"][i] = mu_product
            denom = sqrt_of_moment(v / bias_correction2) + hyper["eps"]
            grad_size = -lr * (1.0 - mu) / (1.0 - mu_product)
            avg_size = -lr * mu_next / (1.0 - mu_product * mu_next)
            new.append(p + (g * grad_size) / denom + (m * avg_size) / denom)
        return new


def _foreach_nadam(
    hyper: Mapping[str, Any],
    lr: float,
    step: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    mu_products: list[torch.Tensor],
) -> None:
    """torch's ``_multi_tensor_nadam`` (not capturable) for parameters that have all taken
    ``step - 1`` steps: ``params``, the moments and ``mu_products`` are updated in place,
    ``grads`` are not."""
    beta1, beta2 = hyper["betas"]
    weight_decay, momentum_decay = hyper["weight_decay"], hyper["momentum_decay"]
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
    denom = torch._foreach_sqrt(exp_avg_sqs)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    # mu_product is a float32 (scalar dtype) tensor, as in torch: multiplying it rounds as
    # torch's does, and the step sizes below read the rounded value back.
    torch._foreach_mul_(mu_products, mu)
    torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
    torch._foreach_add_(denom, hyper["eps"])
    products = [m.item() for m in mu_products]
    grad_sizes = [(lr * (1.0 - mu) / (1.0 - prod)) * -1 for prod in products]
    avg_sizes = [(lr * mu_next / (1.0 - prod * mu_next)) * -1 for prod in products]
    torch._foreach_addcdiv_(params, grads, denom, grad_sizes)
    torch._foreach_addcdiv_(params, exp_avgs, denom, avg_sizes)
