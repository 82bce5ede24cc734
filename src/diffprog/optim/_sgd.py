"""``SGD``: torch.optim.SGD under its own name (``GDM``'s algorithm, torch's signature)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffprog.optim._gdm import GDM
from diffprog.optim._pure import Overrides, require_non_negative
from diffprog.optim._select import Selection
from diffprog.optim._torch_options import accept_torch_options

__all__ = ["SGD"]


class SGD(GDM):
    """Stochastic gradient descent, optionally with momentum: ``torch.optim.SGD``, as a value.

    The algorithm and the fields are :class:`GDM`'s (Hasktorch's name for the same thing):
    ``g = grad + weight_decay * p`` (negated first with ``maximize``), the momentum buffer
    ``b = momentum * b + (1 - dampening) * g`` (``b = g`` on a parameter's first update), and
    ``p - lr * b``, or ``p - lr * (g + momentum * b)`` with ``nesterov``; plain
    ``p - lr * g`` when ``momentum == 0``. It runs torch's fused SGD kernel where the device
    has one, else ``_foreach_`` operations in torch's multi-tensor order.

    Attributes:
        momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``'s.
        count: the number of steps taken.
        param_counts: the number of steps that updated each parameter (empty while each
            trained parameter has been updated by all ``count`` steps): a parameter the loss
            does not reach (``used``) is left alone, and its first update starts its buffer.
        momentum_buffer: one buffer per trained parameter (``None`` for frozen ones); empty
            when ``momentum == 0``.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> opt = SGD.init([p], momentum=0.9, nesterov=True)
        >>> new, opt = opt.step(0.1, [torch.tensor([1.0])], [p])
        >>> new, opt.momentum_buffer
        ([tensor([0.8100])], (tensor([1.]),))
    """

    @classmethod
    def init(
        cls,
        model: Any,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        donate: bool = False,
    ) -> SGD:
        """SGD for ``model``: ``torch.optim.SGD``'s hyper-parameters and defaults, but ``lr``.

        The learning rate is given to each step, as for every pure optimizer, and the
        hyper-parameters are keywords: ``torch.optim.SGD(params, 0.1)`` means ``lr=0.1``, so
        ``SGD.init(model, 0.1)`` could only be misread.

        Args:
            model: the model, or a list of its parameters.
            momentum: the momentum factor.
            dampening: dampening of the momentum.
            weight_decay: L2 penalty added to the gradient.
            nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
            maximize: ascend instead of descend.
            foreach, fused: accepted as torch accepts them, and choose nothing: the step runs
                the fused kernel where the device has one, else ``_foreach_`` operations.
            differentiable: must be False (a pure step carries no graph).
            overrides: per-parameter settings, ``{selection: {name: value}}`` (any of the
                hyper-parameters above, and ``lr_scale``).
            freeze: the parameters not to train.
            donate: let each step reuse this optimizer's momentum buffers (see :class:`Adam`).

        Returns:
            The optimizer, its momentum buffers at zero.

        Raises:
            ValueError: a hyper-parameter is out of range (torch.optim's message), or
                ``differentiable=True``.
            RuntimeError: ``fused`` with ``foreach`` or ``differentiable`` (as torch).

        Example:
            >>> from diffprog.nn import LinearSpec
            >>> opt = SGD.init(sample(LinearSpec(3, 2)), momentum=0.9, freeze="bias")
            >>> opt.momentum_buffer
            (tensor([[0., 0., 0.],
                    [0., 0., 0.]]), None)
        """
        accept_torch_options("SGD", foreach=foreach, fused=fused, differentiable=differentiable)
        hyper = {
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        return cls._build(model, hyper, overrides, freeze, donate)

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        """torch.optim.SGD's checks, in its order and words."""
        require_non_negative(hyper, "momentum", "weight_decay")
        if hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
