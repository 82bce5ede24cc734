"""``RMSprop``: torch.optim.RMSprop's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._pure import Overrides, PureOptimizer, require_non_negative
from diffprog.optim._select import ParamSettings, Selection

__all__ = ["RMSprop"]


class RMSprop(PureOptimizer):
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

    _hyper: ClassVar[tuple[str, ...]] = (
        "alpha",
        "eps",
        "weight_decay",
        "momentum",
        "centered",
        "maximize",
    )
    _state_fields: ClassVar[tuple[str, ...]] = ("square_avg", "momentum_buffer", "grad_avg")

    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False
    count: int = 0
    square_avg: tuple[torch.Tensor | None, ...] = ()
    momentum_buffer: tuple[torch.Tensor | None, ...] = ()
    grad_avg: tuple[torch.Tensor | None, ...] = ()
    settings: ParamSettings | None = None
    donate: bool = False

    @classmethod
    def init(
        cls,
        model: Any,
        *,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        maximize: bool = False,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        donate: bool = False,
    ) -> RMSprop:
        """RMSprop for ``model``; the hyper-parameters are ``torch.optim.RMSprop``'s.

        Args:
            model: the model, or a list of its parameters.
            alpha: the smoothing constant of ``square_avg``.
            eps: added to the denominator.
            weight_decay: L2 penalty added to the gradient.
            momentum: the momentum factor.
            centered: normalise by an estimate of the gradient's variance.
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
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "centered": centered,
            "maximize": maximize,
        }
        return cls._build(model, hyper, overrides, freeze, donate)

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        require_non_negative(hyper, "alpha", "eps", "weight_decay", "momentum")

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
