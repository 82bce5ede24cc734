"""``Adagrad``: torch.optim.Adagrad's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._pure import (
    Overrides,
    PureOptimizer,
    clone_all,
    device_groups,
    fused_layouts,
    has_fused,
    lr_on,
    require_non_negative,
)
from diffprog.optim._select import ParamSettings, Selection

__all__ = ["Adagrad"]


class Adagrad(PureOptimizer):
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

    _hyper: ClassVar[tuple[str, ...]] = (
        "lr_decay",
        "weight_decay",
        "initial_accumulator_value",
        "eps",
        "maximize",
    )
    _state_fields: ClassVar[tuple[str, ...]] = ("sum",)

    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    maximize: bool = False
    count: int = 0
    param_counts: tuple[int, ...] = ()
    sum: tuple[torch.Tensor | None, ...] = ()
    settings: ParamSettings | None = None
    donate: bool = False

    @classmethod
    def init(
        cls,
        model: Any,
        *,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        maximize: bool = False,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        donate: bool = False,
    ) -> Adagrad:
        """Adagrad for ``model``; the hyper-parameters are ``torch.optim.Adagrad``'s.

        Args:
            model: the model, or a list of its parameters.
            lr_decay: learning-rate decay per step.
            weight_decay: L2 penalty added to the gradient.
            initial_accumulator_value: the starting value of ``sum``.
            eps: added to the denominator.
            maximize: ascend instead of descend.
            overrides: per-parameter settings, ``{selection: {name: value}}``.
            freeze: the parameters not to train.
            donate: let each step reuse this optimizer's state (see :class:`Adam`).

        Returns:
            The optimizer.

        Raises:
            ValueError: a hyper-parameter is out of range.
        """
        hyper = {
            "lr_decay": lr_decay,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "eps": eps,
            "maximize": maximize,
        }
        return cls._build(model, hyper, overrides, freeze, donate)

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        require_non_negative(hyper, "lr_decay", "weight_decay", "initial_accumulator_value", "eps")

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
