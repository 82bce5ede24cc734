"""``ASGD``: torch.optim.ASGD's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import hyper, non_negative, state
from diffprog.optim._pure import PureOptimizer, scalar_dtype

__all__ = ["ASGD"]

# The device types torch.optim runs its multi-tensor (foreach) path on when foreach=None.
_FOREACH_DEVICES = ("cuda", "xpu")


class ASGD(PureOptimizer, torch_options=("differentiable", "capturable")):
    """Averaged SGD (Polyak & Juditsky), exactly ``torch.optim.ASGD``'s algorithm, as a value.

    At step ``t`` a parameter moves to ``p (1 - lambd eta) - eta g`` (``g`` including
    ``weight_decay * p``), its average to ``ax + mu (p - ax)``; then
    ``eta = lr / (1 + lambd lr t)^alpha`` and ``mu = 1 / max(1, t - t0)`` for the next step.
    ``eta`` starts at the learning rate of a parameter's first update, ``mu`` at 1. The
    averaged parameters ``ax`` are state, as in torch.optim: read them from the optimizer's
    ``ax`` field.

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
        differentiable: when True, a step runs with autograd on (torch.optim's
            ``differentiable=True``, its single-tensor path, out of place, whatever
            ``foreach``: torch refuses ``foreach=True`` with it): the new parameters, ``ax``,
            ``eta`` and ``mu`` are differentiable functions of the old ones, the gradients,
            the learning rate and the hyper-parameters (``lambd``, ``alpha``, ``t0``,
            ``weight_decay`` may be tensors that require grad). Unlike torch.optim's, whose
            step reads ``eta`` as a number (``eta.item()``), the gradient flows through ``eta``
            to the learning rate, ``lambd`` and ``alpha``.

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> new, opt = ASGD.init([p], lambd=0.0).step(0.1, [torch.tensor([2.0])], [p])
        >>> new, opt.ax, opt.eta
        ([tensor([0.8000])], (tensor([0.8000]),), (tensor(0.1000),))
    """

    lambd: float = hyper(1e-4, doc="the decay term")
    alpha: float = hyper(0.75, doc="the power of ``eta``'s decay")
    t0: float = hyper(1e6, doc="the step from which averaging starts")
    weight_decay: float = hyper(0.0, doc="L2 penalty added to the gradient", check=non_negative)
    maximize: bool = hyper(False, doc="ascend instead of descend")
    # torch's two paths round differently here, so this switch is a setting (see above).
    foreach: bool | None = hyper(
        None, doc="round as torch's multi-tensor path (``None``: on CUDA and XPU) or for-loop path"
    )
    ax: tuple[torch.Tensor | None, ...] = state(doc="the averaged parameters, torch's ax")
    eta: tuple[torch.Tensor | None, ...] = state(doc="the step size of the next step")
    mu: tuple[torch.Tensor | None, ...] = state(doc="the averaging factor of the next step")

    _differentiable_ok: ClassVar[bool] = True

    @classmethod
    def _param_shaped_state(cls) -> tuple[str, ...]:
        return ("ax",)  # eta and mu are scalars

    @classmethod
    def _init_state(cls, name: str, param: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
        if name == "ax":
            return torch.zeros_like(param, memory_format=torch.preserve_format)
        # eta is set at the parameter's first update, to the learning rate then.
        fill = 0.0 if name == "eta" else 1.0
        return torch.full((), fill, dtype=scalar_dtype(), device=param.device)

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

    def _update_differentiable(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        # torch.optim.ASGD's single-tensor path (differentiable=True), out of place, with eta
        # and mu kept as tensors (torch reads eta as a number, cutting its gradient).
        lambd, alpha, t0 = hyper["lambd"], hyper["alpha"], hyper["t0"]
        decay, step = hyper["weight_decay"], count + 1
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            if bool(decay != 0):
                g = g + decay * p
            ax, eta, mu = state["ax"][i], state["eta"][i], state["mu"][i]
            if count == 0:
                eta = _scalar_as(lr, eta)  # torch's eta starts at the learning rate
            e = eta.to(p.dtype)  # torch reads eta's value as a Python number (float64)
            p = p * (1 - lambd * e) - e * g
            # ax follows a copy of p (not p itself: a later donated step writes into ax)
            ax = ax + (p - ax) * mu if bool(mu != 1) else p.clone()
            state["ax"][i] = ax
            state["eta"][i] = _scalar_as(lr / ((1 + lambd * lr * step) ** alpha), eta)
            state["mu"][i] = _scalar_as(1 / _at_least_one(step - t0), mu)
            new.append(p)
        return new


def _scalar_as(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device (its graph kept)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device).reshape(())
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _at_least_one(value: float | torch.Tensor) -> float | torch.Tensor:
    """``max(1, value)``, as torch's ``max(1, step - t0)``, for a number or a tensor."""
    if isinstance(value, torch.Tensor):
        return torch.clamp(value, min=1)
    return max(1, value)


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
