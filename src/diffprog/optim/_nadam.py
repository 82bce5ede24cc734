"""``NAdam``: torch.optim.NAdam's algorithm (Adam with Nesterov momentum) as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._adam import _betas, _check_adam_like
from diffprog.optim._pure import (
    Overrides,
    PureOptimizer,
    clone_all,
    device_groups,
    require_non_negative,
)
from diffprog.optim._select import ParamSettings, Selection
from diffprog.optim._torch_options import accept_torch_options

__all__ = ["NAdam"]


class NAdam(PureOptimizer):
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

    Example:
        >>> p = make_independent(torch.tensor([1.0, -1.0]))
        >>> new, opt = NAdam.init([p]).step(0.1, [torch.tensor([0.5, -0.5])], [p])
        >>> new, opt.mu_product
        ([tensor([ 0.8944, -0.8944])], (tensor(0.4501),))
    """

    _hyper: ClassVar[tuple[str, ...]] = (
        "betas",
        "eps",
        "weight_decay",
        "momentum_decay",
        "decoupled_weight_decay",
        "maximize",
    )
    _state_fields: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "mu_product")

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum_decay: float = 4e-3
    decoupled_weight_decay: bool = False
    maximize: bool = False
    count: int = 0
    param_counts: tuple[int, ...] = ()
    exp_avg: tuple[torch.Tensor | None, ...] = ()
    exp_avg_sq: tuple[torch.Tensor | None, ...] = ()
    mu_product: tuple[torch.Tensor | None, ...] = ()
    settings: ParamSettings | None = None
    donate: bool = False

    @classmethod
    def init(
        cls,
        model: Any,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        donate: bool = False,
    ) -> NAdam:
        """NAdam for ``model``: ``torch.optim.NAdam``'s hyper-parameters and defaults, but ``lr``
        (given to each step).

        Args:
            model: the model, or a list of its parameters.
            betas: the decay rates of the first and second moments.
            eps: added to the denominator.
            weight_decay: the weight decay (an L2 term in the gradient, or decoupled).
            momentum_decay: the decay of the momentum coefficient ``mu_t``.
            decoupled_weight_decay: shrink the parameters as AdamW does (NAdamW).
            maximize: ascend instead of descend.
            foreach, capturable: accepted as torch accepts them; they choose nothing here.
            differentiable: must be False (a pure step carries no graph).
            overrides: per-parameter settings, ``{selection: {name: value}}`` (any of the
                hyper-parameters above, and ``lr_scale``).
            freeze: the parameters not to train (no update, no state).
            donate: let each step reuse this optimizer's state (see :class:`Adam`).

        Returns:
            The optimizer, its moments at zero and its ``mu_product`` at one.

        Raises:
            ValueError: a hyper-parameter is out of range (torch.optim's message), a selection
                matches nothing, or ``differentiable=True``.

        Example:
            >>> from diffprog.nn import LinearSpec
            >>> opt = NAdam.init(sample(LinearSpec(3, 2)), decoupled_weight_decay=True)
            >>> opt.mu_product, opt.decoupled_weight_decay
            ((tensor(1.), tensor(1.)), True)
        """
        accept_torch_options(
            "NAdam", foreach=foreach, capturable=capturable, differentiable=differentiable
        )
        hyper = {
            "betas": _betas(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
        }
        return cls._build(model, hyper, overrides, freeze, donate)

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        _check_adam_like(hyper)
        require_non_negative(hyper, "momentum_decay")

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


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives its scalar state (``step``, ``mu_product``): float64 under
    a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


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
