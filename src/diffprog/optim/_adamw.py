"""``AdamW``: Adam with decoupled weight decay, torch.optim.AdamW's algorithm as a value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from diffprog.optim._adam import Adam, _betas
from diffprog.optim._pure import Overrides
from diffprog.optim._select import Selection

__all__ = ["AdamW"]


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): Adam whose weight decay shrinks the parameters directly,
    ``p * (1 - lr * weight_decay)``, instead of adding to the gradient. Exactly
    ``torch.optim.AdamW`` (default ``weight_decay=1e-2``); fields as :class:`Adam`'s.

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> new, _ = AdamW.init([p], weight_decay=0.5).step(0.1, [torch.tensor([0.0])], [p])
        >>> new
        [tensor([0.9500])]
    """

    _kernel: ClassVar[Callable[..., None]] = torch._fused_adamw_
    _decoupled: ClassVar[bool] = True

    weight_decay: float = 1e-2

    @classmethod
    def init(
        cls,
        model: Any,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        donate: bool = False,
    ) -> AdamW:
        """AdamW for ``model``; the hyper-parameters are ``torch.optim.AdamW``'s.

        Args:
            model: the model, or a list of its parameters.
            betas: the decay rates of the first and second moments.
            eps: added to the denominator.
            weight_decay: decoupled weight decay.
            amsgrad: use the AMSGrad variant.
            maximize: ascend instead of descend.
            overrides: per-parameter settings, ``{selection: {name: value}}``.
            freeze: the parameters not to train (no update, no decay, no state).
            donate: let each step reuse this optimizer's moments (see :class:`Adam`).

        Returns:
            The optimizer, its moments at zero.

        Raises:
            ValueError: a hyper-parameter is out of range, or a selection matches nothing.
        """
        hyper = {
            "betas": _betas(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
        }
        return cls._build(model, hyper, overrides, freeze, donate)
