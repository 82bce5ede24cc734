"""``Adamax``: torch.optim.Adamax's algorithm (Adam with the infinity norm) as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._adam import _betas, _check_adam_like
from diffprog.optim._pure import Overrides, PureOptimizer, clone_all, device_groups
from diffprog.optim._select import ParamSettings, Selection
from diffprog.optim._torch_options import accept_torch_options

__all__ = ["Adamax"]


class Adamax(PureOptimizer):
    """Adamax (Kingma & Ba, the infinity-norm variant of Adam): ``torch.optim.Adamax``'s
    algorithm, as a value.

    ``m = b1 m + (1 - b1) g``, ``u = max(b2 u, |g| + eps)``, and
    ``p - lr / (1 - b1^t) * m / u`` at a parameter's step ``t``; ``g`` includes the L2 term
    ``weight_decay * p``. Written with ``_foreach_`` operations in torch's multi-tensor order
    (torch has no fused Adamax kernel): it equals ``torch.optim.Adamax(foreach=True)`` bit for
    bit, and torch's default for-loop on the CPU to float rounding.

    Attributes:
        betas, eps, weight_decay, maximize: as ``torch.optim.Adamax``'s.
        count: the number of steps taken (the argument of a learning-rate schedule).
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``, which sets the bias correction); empty while each trained
            parameter has been updated by all ``count`` steps. A parameter the loss does not
            reach (``used``) is left alone.
        exp_avg: the first moment ``m``; exp_inf: the infinity norm ``u``: one tensor per
            trained parameter (``None`` for a frozen one), in ``flatten_parameters`` order.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).

    Example:
        >>> p = make_independent(torch.tensor([1.0, -1.0]))
        >>> new, opt = Adamax.init([p]).step(0.1, [torch.tensor([0.5, -2.0])], [p])
        >>> new, opt.exp_inf
        ([tensor([ 0.9000, -0.9000])], (tensor([0.5000, 2.0000]),))
    """

    _hyper: ClassVar[tuple[str, ...]] = ("betas", "eps", "weight_decay", "maximize")
    _state_fields: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_inf")

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    maximize: bool = False
    count: int = 0
    param_counts: tuple[int, ...] = ()
    exp_avg: tuple[torch.Tensor | None, ...] = ()
    exp_inf: tuple[torch.Tensor | None, ...] = ()
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
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        donate: bool = False,
    ) -> Adamax:
        """Adamax for ``model``: ``torch.optim.Adamax``'s hyper-parameters and defaults, but
        ``lr`` (given to each step).

        Args:
            model: the model, or a list of its parameters.
            betas: the decay rates of the first moment and of the infinity norm.
            eps: added to ``|g|`` before the maximum.
            weight_decay: L2 penalty added to the gradient.
            maximize: ascend instead of descend.
            foreach, capturable: accepted as torch accepts them; they choose nothing here.
            differentiable: must be False (a pure step carries no graph).
            overrides: per-parameter settings, ``{selection: {name: value}}`` (any of the
                hyper-parameters above, and ``lr_scale``).
            freeze: the parameters not to train (no update, no state).
            donate: let each step reuse this optimizer's state (see :class:`Adam`).

        Returns:
            The optimizer, its state at zero.

        Raises:
            ValueError: a hyper-parameter is out of range (torch.optim's message), a selection
                matches nothing, or ``differentiable=True``.

        Example:
            >>> Adamax.init([make_independent(torch.zeros(2))], weight_decay=-0.1)
            Traceback (most recent call last):
            ...
            ValueError: Invalid weight_decay value: -0.1 (must be >= 0).
        """
        accept_torch_options(
            "Adamax", foreach=foreach, capturable=capturable, differentiable=differentiable
        )
        hyper = {
            "betas": _betas(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        return cls._build(model, hyper, overrides, freeze, donate)

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        _check_adam_like(hyper)

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
        lists = [new, grads, state["exp_avg"], state["exp_inf"]]
        for _, (ps, gs, ms, us) in device_groups(*lists):
            _foreach_adamax(hyper, float(lr), count + 1, ps, gs, ms, us)
        return new


def _foreach_adamax(
    hyper: Mapping[str, Any],
    lr: float,
    step: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_infs: list[torch.Tensor],
) -> None:
    """torch's ``_multi_tensor_adamax`` (not capturable) for parameters that have all taken
    ``step - 1`` steps: ``params`` and the state are updated in place, ``grads`` are not."""
    beta1, beta2 = hyper["betas"]
    weight_decay = hyper["weight_decay"]
    if hyper["maximize"]:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_infs, beta2)
    norms = torch._foreach_abs(grads)
    torch._foreach_add_(norms, hyper["eps"])
    torch._foreach_maximum_(exp_infs, norms)
    step_size = (lr / (1 - beta1**step)) * -1
    torch._foreach_addcdiv_(params, exp_avgs, exp_infs, step_size)
