"""``Rprop``: torch.optim.Rprop's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from diffprog.optim._pure import Overrides, PureOptimizer
from diffprog.optim._select import ParamSettings, Selection
from diffprog.optim._torch_options import accept_torch_options

__all__ = ["Rprop"]


class Rprop(PureOptimizer):
    """Rprop (Riedmiller & Braun), exactly ``torch.optim.Rprop``'s algorithm, as a value.

    Each element has its own step size: where the gradient keeps its sign from the previous
    step, the step size is multiplied by ``etaplus``, where it flips by ``etaminus`` (and that
    element does not move this step, its gradient counted as 0), clamped to ``step_sizes``;
    the element then moves by its step size against the gradient's sign. Written with
    ``torch._foreach_*`` operations in torch's multi-tensor order (torch's for-loop path gives
    the same numbers).

    The learning rate is only read at a parameter's first step, as torch.optim reads it: it is
    the initial step size (times the parameter's ``lr_scale``). A schedule therefore has no
    effect after that.

    Attributes:
        etas: ``(etaminus, etaplus)``; step_sizes: ``(min, max)``; maximize: as torch's.
        count: the number of steps taken.
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``; the step size starts at the learning rate at a parameter's
            first update); empty while each trained parameter has been updated by all
            ``count`` steps.
        prev: the previous gradient (0 where its sign flipped); step_size: each element's step
            size (zero until the parameter's first update). One tensor per trained parameter
            (``None`` for a frozen one), in ``flatten_parameters`` order.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).

    Example:
        >>> p = make_independent(torch.tensor([1.0, 1.0]))
        >>> opt = Rprop.init([p])
        >>> new, opt = opt.step(0.1, [torch.tensor([2.0, -2.0])], [p])
        >>> new, opt = opt.step(0.1, [torch.tensor([2.0, 2.0])], new)  # the second sign flipped
        >>> new, opt.step_size
        ([tensor([0.7800, 1.1000])], (tensor([0.1200, 0.0500]),))
    """

    _hyper: ClassVar[tuple[str, ...]] = ("etas", "step_sizes", "maximize")
    _state_fields: ClassVar[tuple[str, ...]] = ("prev", "step_size")

    etas: tuple[float, float] = (0.5, 1.2)
    step_sizes: tuple[float, float] = (1e-6, 50.0)
    maximize: bool = False
    count: int = 0
    param_counts: tuple[int, ...] = ()
    prev: tuple[torch.Tensor | None, ...] = ()
    step_size: tuple[torch.Tensor | None, ...] = ()
    settings: ParamSettings | None = None
    donate: bool = False

    @classmethod
    def init(
        cls,
        model: Any,
        *,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50.0),
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        donate: bool = False,
    ) -> Rprop:
        """Rprop for ``model``; the hyper-parameters are ``torch.optim.Rprop``'s.

        Args:
            model: the model, or a list of its parameters.
            etas: ``(etaminus, etaplus)``, the factors that shrink and grow a step size,
                ``0 < etaminus < 1 < etaplus``.
            step_sizes: the least and the greatest step size.
            maximize: ascend instead of descend.
            foreach, capturable: accepted as torch.optim accepts them; no effect (both of
                torch's paths give these numbers).
            differentiable: must be False (a pure step is not differentiable).
            overrides: per-parameter settings, ``{selection: {name: value}}``.
            freeze: the parameters not to train.
            donate: let each step reuse this optimizer's state (see :class:`Adam`).

        Returns:
            The optimizer; each parameter's step size is set at its first update.

        Raises:
            ValueError: ``etas`` are out of range (torch.optim's message), or
                ``differentiable=True``.

        Example:
            >>> Rprop.init([make_independent(torch.zeros(2))], etas=(0.4, 1.5)).etas
            (0.4, 1.5)
        """
        accept_torch_options(cls.__name__, differentiable=differentiable)
        hyper = {"etas": _pair(etas), "step_sizes": _pair(step_sizes), "maximize": maximize}
        return cls._build(model, hyper, overrides, freeze, donate)

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        etaminus, etaplus = hyper["etas"]
        if not 0.0 < etaminus < 1.0 < etaplus:
            raise ValueError(
                f"Invalid eta values: {etaminus}, {etaplus} (must be 0 < etaminus < 1 < etaplus)."
            )

    def _update(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        prevs, step_sizes = state["prev"], state["step_size"]
        if count == 0:
            # torch.optim creates the step size at a parameter's first update, full of the
            # learning rate (complex: lr + lr i, which is what filling the real view gives).
            for s in step_sizes:
                s.fill_(float(lr))
        etaminus, etaplus = hyper["etas"]
        step_size_min, step_size_max = hyper["step_sizes"]
        signs = torch._foreach_mul(grads, prevs)
        if hyper["maximize"]:
            torch._foreach_neg_(signs)
        # As torch: prev's memory takes the (possibly negated) gradient, then its zeroed
        # elements, and is used as the gradient from here on.
        torch._foreach_copy_(prevs, grads)
        if hyper["maximize"]:
            torch._foreach_neg_(prevs)
        torch._foreach_sign_(signs)
        for sign in signs:
            sign[sign.gt(0)] = etaplus
            sign[sign.lt(0)] = etaminus
            sign[sign.eq(0)] = 1
        torch._foreach_mul_(step_sizes, signs)
        for step_size in step_sizes:
            step_size.clamp_(step_size_min, step_size_max)
        for prev, sign in zip(prevs, signs, strict=True):
            prev.copy_(torch.where(sign.eq(etaminus), 0, prev))
        del signs
        grad_signs = [prev.sign() for prev in prevs]
        return list(torch._foreach_addcmul(params, grad_signs, step_sizes, value=-1))


def _pair(values: Sequence[float]) -> tuple[float, float]:
    first, second = values
    return (float(first), float(second))
