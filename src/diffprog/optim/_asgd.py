"""``ASGD``: torch.optim.ASGD's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._pure import Overrides, PureOptimizer, require_non_negative
from diffprog.optim._select import ParamSettings, Selection
from diffprog.optim._torch_options import accept_torch_options

__all__ = ["ASGD"]

# The device types torch.optim runs its multi-tensor (foreach) path on when foreach=None.
_FOREACH_DEVICES = ("cuda", "xpu")


class ASGD(PureOptimizer):
    """Averaged SGD (Polyak & Juditsky), exactly ``torch.optim.ASGD``'s algorithm, as a value.

    At step ``t`` a parameter moves to ``p (1 - lambd eta) - eta g`` (``g`` including
    ``weight_decay * p``), its average to ``ax + mu (p - ax)``; then
    ``eta = lr / (1 + lambd lr t)^alpha`` and ``mu = 1 / max(1, t - t0)`` for the next step.
    ``eta`` starts at the learning rate of a parameter's first update, ``mu`` at 1. The
    averaged parameters ``ax`` are state, as in torch.optim: read them from :attr:`ax`.

    torch.optim's two paths round differently here (to float32 tolerance): its for-loop path
    (``foreach=False``, the default on CPU) and its multi-tensor one (``foreach=True``, the
    default on CUDA). ``foreach`` chooses between them as in torch, so the numbers are those of
    ``torch.optim.ASGD`` with the same ``foreach``.

    Attributes:
        lambd, alpha, t0, weight_decay, maximize, foreach: as ``torch.optim.ASGD``'s.
        count: the number of steps taken.
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``, which sets ``eta`` and ``mu``); empty while each trained
            parameter has been updated by all ``count`` steps.
        ax: the averaged parameters; eta, mu: each parameter's step size and averaging
            factor for its next step (0-dim tensors of torch's step dtype, float32 unless the
            default dtype is float64). One entry per trained parameter (``None`` for a frozen
            one), in ``flatten_parameters`` order.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> new, opt = ASGD.init([p], lambd=0.0).step(0.1, [torch.tensor([2.0])], [p])
        >>> new, opt.ax, opt.eta
        ([tensor([0.8000])], (tensor([0.8000]),), (tensor(0.1000),))
    """

    _hyper: ClassVar[tuple[str, ...]] = (
        "lambd",
        "alpha",
        "t0",
        "weight_decay",
        "maximize",
        "foreach",
    )
    _state_fields: ClassVar[tuple[str, ...]] = ("ax", "eta", "mu")

    lambd: float = 1e-4
    alpha: float = 0.75
    t0: float = 1e6
    weight_decay: float = 0.0
    maximize: bool = False
    foreach: bool | None = None
    count: int = 0
    param_counts: tuple[int, ...] = ()
    ax: tuple[torch.Tensor | None, ...] = ()
    eta: tuple[torch.Tensor | None, ...] = ()
    mu: tuple[torch.Tensor | None, ...] = ()
    settings: ParamSettings | None = None
    donate: bool = False

    @classmethod
    def init(
        cls,
        model: Any,
        *,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        donate: bool = False,
    ) -> ASGD:
        """ASGD for ``model``; the hyper-parameters are ``torch.optim.ASGD``'s.

        Args:
            model: the model, or a list of its parameters.
            lambd: the decay term.
            alpha: the power of ``eta``'s decay.
            t0: the step from which averaging starts.
            weight_decay: L2 penalty added to the gradient.
            foreach: which of torch's paths to follow in rounding (``None``: torch's choice,
                the multi-tensor path on CUDA and XPU, the for-loop path elsewhere).
            maximize: ascend instead of descend.
            differentiable: must be False (a pure step is not differentiable).
            capturable: accepted as torch.optim accepts it; the step computes as torch's
                ``capturable=False`` path does.
            overrides: per-parameter settings, ``{selection: {name: value}}``.
            freeze: the parameters not to train.
            donate: let each step reuse this optimizer's state (see :class:`Adam`).

        Returns:
            The optimizer; each parameter's ``eta`` is set at its first update.

        Raises:
            ValueError: ``weight_decay`` is negative (torch.optim's message), or
                ``differentiable=True``.

        Example:
            >>> ASGD.init([make_independent(torch.zeros(2))], t0=10.0).t0
            10.0
        """
        accept_torch_options(cls.__name__, differentiable=differentiable)
        hyper = {
            "lambd": lambd,
            "alpha": alpha,
            "t0": t0,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
        }
        return cls._build(model, hyper, overrides, freeze, donate)

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        require_non_negative(hyper, "weight_decay")

    @classmethod
    def _init_state(cls, name: str, param: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
        if name == "ax":
            return torch.zeros_like(param, memory_format=torch.preserve_format)
        # eta is set at the parameter's first update, to the learning rate then.
        fill = 0.0 if name == "eta" else 1.0
        return torch.full((), fill, dtype=_step_dtype(), device=param.device)

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
        axs, etas, mus = state["ax"], state["eta"], state["mu"]
        if count == 0:
            for eta in etas:
                eta.fill_(lr)
        new = [p.clone() for p in params]
        foreach = hyper["foreach"]
        if foreach is None:
            foreach = all(p.device.type in _FOREACH_DEVICES for p in params)
        step = count + 1
        if foreach:
            _multi_tensor_asgd(hyper, lr, step, new, grads, axs, etas, mus)
        else:
            _single_tensor_asgd(hyper, lr, step, new, grads, axs, etas, mus)
        return new


def _step_dtype() -> torch.dtype:
    """The dtype of torch.optim's step-like state (``_get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _single_tensor_asgd(
    hyper: Mapping[str, Any],
    lr: float,
    step: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    axs: list[torch.Tensor],
    etas: list[torch.Tensor],
    mus: list[torch.Tensor],
) -> None:
    """torch.optim's for-loop ASGD: ``params``, ``axs``, ``etas``, ``mus`` in place."""
    lambd, alpha, t0 = hyper["lambd"], hyper["alpha"], hyper["t0"]
    weight_decay = hyper["weight_decay"]
    for param, grad, ax, eta, mu in zip(params, grads, axs, etas, mus, strict=True):
        if hyper["maximize"]:
            grad = -grad
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        eta_value = eta.item()
        param.mul_(1 - lambd * eta_value)
        param.add_(grad, alpha=-eta_value)
        if mu.item() != 1:
            ax.add_(param.sub(ax).mul_(mu))
        else:
            ax.copy_(param)
        eta.copy_(torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha)))
        mu.copy_(torch.as_tensor(1 / max(1, step - t0)))


def _multi_tensor_asgd(
    hyper: Mapping[str, Any],
    lr: float,
    step: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    axs: list[torch.Tensor],
    etas: list[torch.Tensor],
    mus: list[torch.Tensor],
) -> None:
    """torch.optim's multi-tensor ASGD, in its order: ``params``, ``axs``, ``etas``, ``mus``
    in place."""
    lambd, alpha, t0 = hyper["lambd"], hyper["alpha"], hyper["t0"]
    weight_decay = hyper["weight_decay"]
    if hyper["maximize"]:
        grads = list(torch._foreach_neg(grads))
    # p (1 - lambd eta) - eta g = p - eta (g + lambd p), rounded as torch rounds it
    if weight_decay != 0:
        intermediate = list(torch._foreach_add(grads, params, alpha=weight_decay))
        torch._foreach_add_(intermediate, params, alpha=lambd)
    else:
        intermediate = list(torch._foreach_add(grads, params, alpha=lambd))
    torch._foreach_addcmul_(params, intermediate, etas, value=-1)
    intermediate = list(torch._foreach_sub(params, axs))
    torch._foreach_addcmul_(axs, intermediate, mus)
    del intermediate
    for eta, mu in zip(etas, mus, strict=True):
        # torch computes eta from its step tensor (float32 arithmetic), mu from its value
        step_t = torch.full((), float(step), dtype=eta.dtype, device=eta.device)
        eta.copy_(lr / ((1 + lambd * lr * step_t) ** alpha))
        mu.copy_(torch.as_tensor(1 / max(1, step - t0), device=mu.device))
