"""``SGD``: torch.optim.SGD under its own name (``GDM``'s algorithm, torch's messages)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffprog.optim._gdm import GDM

__all__ = ["SGD"]


class SGD(GDM):
    """Stochastic gradient descent, optionally with momentum: ``torch.optim.SGD``, as a value.

    The algorithm, the settings (torch's, with torch's defaults), the torch options
    (``foreach``, ``differentiable``, ``fused``) and the fields are :class:`GDM`'s (Hasktorch's
    name for the same thing): ``g = grad + weight_decay * p`` (negated first with
    ``maximize``), the momentum buffer ``b = momentum * b + (1 - dampening) * g`` (``b = g`` on
    a parameter's first update), and ``p - lr * b``, or ``p - lr * (g + momentum * b)`` with
    ``nesterov``; plain ``p - lr * g`` when ``momentum == 0``. It runs torch's fused SGD kernel
    where the device has one, else ``_foreach_`` operations in torch's multi-tensor order.
    Invalid settings are refused in torch.optim.SGD's words.

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> opt = SGD.init([p], momentum=0.9, nesterov=True)
        >>> new, opt = opt.step(0.1, [torch.tensor([1.0])], [p])
        >>> new, opt.momentum_buffer
        ([tensor([0.8100])], (tensor([1.]),))
        >>> SGD.init([p], nesterov=True)
        Traceback (most recent call last):
        ...
        ValueError: Nesterov momentum requires a momentum and zero dampening
    """

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        """torch.optim.SGD's check across settings, in its words."""
        if hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
