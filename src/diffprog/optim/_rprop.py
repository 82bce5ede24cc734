"""``Rprop``: torch.optim.Rprop's algorithm as a value."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import hyper, pair_of_floats, state
from diffprog.optim._pure import PureOptimizer

__all__ = ["Rprop"]


def _etas_around_one(name: str, etas: Any) -> None:
    """The check of ``etas``: ``0 < etaminus < 1 < etaplus``, in torch.optim.Rprop's words."""
    etaminus, etaplus = etas
    if not 0.0 < etaminus < 1.0 < etaplus:
        raise ValueError(
            f"Invalid eta values: {etaminus}, {etaplus} (must be 0 < etaminus < 1 < etaplus)."
        )


class Rprop(PureOptimizer, torch_options=("capturable", "foreach", "differentiable")):
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
        differentiable: when True, a step runs with autograd on (torch.optim's
            ``differentiable=True``, its single-tensor path, out of place): the new parameters
            and step sizes are differentiable functions of the old ones, the learning rate
            (through the first step size) and the hyper-parameters (``etas`` and
            ``step_sizes`` may be tensors that require grad; a clamped step size follows the
            bound). The signs are choices, not functions: their derivative is 0, so the
            gradient reaches a parameter only through the parameters before it.

    Example:
        >>> p = make_independent(torch.tensor([1.0, 1.0]))
        >>> opt = Rprop.init([p])
        >>> new, opt = opt.step(0.1, [torch.tensor([2.0, -2.0])], [p])
        >>> new, opt = opt.step(0.1, [torch.tensor([2.0, 2.0])], new)  # the second sign flipped
        >>> new, opt.step_size
        ([tensor([0.7800, 1.1000])], (tensor([0.1200, 0.0500]),))
        >>> Rprop.init([p], etas=(1.5, 1.2))
        Traceback (most recent call last):
        ...
        ValueError: Invalid eta values: 1.5, 1.2 (must be 0 < etaminus < 1 < etaplus).
    """

    etas: tuple[float, float] = hyper(
        (0.5, 1.2),
        doc="``(etaminus, etaplus)``, the factors that shrink and grow a step size",
        check=_etas_around_one,
        convert=pair_of_floats,
    )
    step_sizes: tuple[float, float] = hyper(
        (1e-6, 50.0), doc="the least and the greatest step size", convert=pair_of_floats
    )
    maximize: bool = hyper(False, doc="ascend instead of descend")
    prev: tuple[torch.Tensor | None, ...] = state(doc="the previous gradient, torch's prev")
    step_size: tuple[torch.Tensor | None, ...] = state(doc="each element's step size")

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

    def _update_differentiable(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        # torch.optim.Rprop's single-tensor path (differentiable=True), out of place.
        etaminus, etaplus = hyper["etas"]
        low, high = hyper["step_sizes"]
        clamp = _clamp_between(low, high)
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            prev, step_size = state["prev"][i], state["step_size"][i]
            if count == 0:
                # torch.optim's first step size: the learning rate (lr + lr i if complex)
                step_size = torch.zeros_like(step_size) + lr
            sign = (g * prev).sign()
            factor = torch.where(
                sign > 0, etaplus, torch.where(sign < 0, etaminus, torch.ones_like(sign))
            )
            step_size = clamp(step_size * factor)
            g = torch.where(sign < 0, torch.zeros_like(g), g)  # a flipped sign: no move
            state["prev"][i], state["step_size"][i] = g, step_size
            new.append(torch.addcmul(p, g.sign(), step_size, value=-1))
        return new


def _clamp_between(
    low: float | torch.Tensor, high: float | torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``clamp(low, high)`` as a function, for bounds that are numbers or tensors (a learned
    bound gets the gradient of the step sizes it clamps)."""
    if not isinstance(low, torch.Tensor) and not isinstance(high, torch.Tensor):
        return lambda x: x.clamp(low, high)

    def clamp(x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(
            torch.maximum(x, torch.as_tensor(low).to(x)), torch.as_tensor(high).to(x)
        )

    return clamp
