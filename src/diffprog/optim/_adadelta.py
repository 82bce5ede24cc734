"""``Adadelta``: torch.optim.Adadelta's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._pure import Overrides, PureOptimizer, require_non_negative
from diffprog.optim._select import ParamSettings, Selection
from diffprog.optim._torch_options import accept_torch_options

__all__ = ["Adadelta"]


class Adadelta(PureOptimizer):
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

    _hyper: ClassVar[tuple[str, ...]] = ("rho", "eps", "weight_decay", "maximize")
    _state_fields: ClassVar[tuple[str, ...]] = ("square_avg", "acc_delta")

    rho: float = 0.9
    eps: float = 1e-6
    weight_decay: float = 0.0
    maximize: bool = False
    count: int = 0
    param_counts: tuple[int, ...] = ()
    square_avg: tuple[torch.Tensor | None, ...] = ()
    acc_delta: tuple[torch.Tensor | None, ...] = ()
    settings: ParamSettings | None = None
    donate: bool = False

    @classmethod
    def init(
        cls,
        model: Any,
        *,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        donate: bool = False,
    ) -> Adadelta:
        """Adadelta for ``model``; the hyper-parameters are ``torch.optim.Adadelta``'s.

        Args:
            model: the model, or a list of its parameters.
            rho: the decay rate of the running averages, in ``[0, 1]``.
            eps: added inside both square roots.
            weight_decay: L2 penalty added to the gradient.
            maximize: ascend instead of descend.
            foreach, capturable: accepted as torch.optim accepts them; no effect (both of
                torch's paths give these numbers).
            differentiable: must be False (a pure step is not differentiable).
            overrides: per-parameter settings, ``{selection: {name: value}}``.
            freeze: the parameters not to train.
            donate: let each step reuse this optimizer's state (see :class:`Adam`).

        Returns:
            The optimizer, its averages at zero.

        Raises:
            ValueError: a hyper-parameter is out of range (torch.optim's message), or
                ``differentiable=True``.

        Example:
            >>> Adadelta.init([make_independent(torch.zeros(2))], rho=0.95).rho
            0.95
        """
        accept_torch_options(cls.__name__, differentiable=differentiable)
        hyper = {"rho": rho, "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
        return cls._build(model, hyper, overrides, freeze, donate)

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        if not 0.0 <= hyper["rho"] <= 1.0:
            raise ValueError(f"Invalid rho value: {hyper['rho']} (must be in [0, 1]).")
        require_non_negative(hyper, "eps", "weight_decay")

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
