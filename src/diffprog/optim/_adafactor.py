"""``Adafactor``: torch.optim.Adafactor's algorithm as a value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import Check, hyper, state
from diffprog.optim._pure import PureOptimizer
from diffprog.optim._select import ParamSettings

__all__ = ["Adafactor"]


def _bound(label: str, relation: str, bound: int) -> Check:
    """The check that a setting is ``<= bound`` or ``>= bound`` (``relation``), in
    torch.optim.Adafactor's words, which are its own (not its other optimizers'):
    "``label`` should be ``relation bound`` but is: ..."."""

    def check(name: str, value: Any) -> None:
        # written as not (value within), so that NaN is refused as torch refuses it
        if not (value <= bound if relation == "<=" else value >= bound):
            raise ValueError(f"{label} should be {relation} {bound} but is: {value}")

    return check


def _eps_at_least_zero(name: str, eps: Any) -> None:
    """The check of ``eps = (eps1, eps2)``: each at least 0 (``eps1`` may be None)."""
    eps1, eps2 = eps
    if eps1 is not None and not eps1 >= 0.0:
        raise ValueError(f"epsilon1 should be >= 0 but is: {eps1}")
    if not eps2 >= 0.0:
        raise ValueError(f"epsilon2 should be >= 0 but is: {eps2}")


def _eps(eps: tuple[float | None, float]) -> tuple[float | None, float]:
    """``eps`` as ``init`` keeps it: floats, ``eps1`` None or a float; a tensor that requires
    grad (a hyper-parameter of a ``differentiable`` optimizer) is kept, not cut by ``float``."""
    eps1, eps2 = eps
    return (None if eps1 is None else _float_unless_learned(eps1), _float_unless_learned(eps2))


def _float_unless_learned(value: Any) -> Any:
    return value if getattr(value, "requires_grad", False) else float(value)


class Adafactor(PureOptimizer, torch_options=("differentiable",)):
    """Adafactor (Shazeer & Stern), exactly ``torch.optim.Adafactor``'s algorithm, as a value.

    At a parameter's step ``t`` (``t = param_counts[i] + 1``): ``beta2 = 1 - t^beta2_decay``,
    ``rho = min(lr, 1 / sqrt(t))`` and ``alpha = max(eps2, RMS(p)) rho``; then ``p`` decays to
    ``p (1 - lr weight_decay)``. A parameter of 2 or more dimensions keeps its second moment
    factored over its last two dimensions: the running means of ``g^2`` along each row
    (``row_var``) and each column (``col_var``), whose product over the mean of ``row_var``
    estimates it; a vector or scalar keeps ``variance``, the running mean of ``g^2``. The
    update ``u = g / sqrt(max(estimate, eps1^2))`` is scaled down to an RMS of at most ``d``,
    and ``p - alpha u``.

    torch.optim's two paths round the last step differently (to float32 tolerance): its
    for-loop path (``foreach=None`` or ``False``, the default on every device) and its
    multi-tensor one (``foreach=True``). ``foreach`` chooses between them as in torch.
    ``eps1=None`` (the default) is the machine epsilon of each parameter's dtype (torch takes
    the first parameter's dtype for its whole group).

    Attributes:
        beta2_decay, eps, d, weight_decay, maximize, foreach: as ``torch.optim.Adafactor``'s.
        count: the number of steps taken.
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``, which sets ``beta2`` and ``rho``); empty while each trained
            parameter has been updated by all ``count`` steps.
        row_var, col_var: the factored second moment of a parameter of 2 or more dimensions,
            of its shape with the last, and the second to last, dimension 1; an empty tensor
            for a vector or scalar parameter.
        variance: the second moment of a vector or scalar parameter; an empty tensor for one
            of 2 or more dimensions. All three hold one entry per trained parameter (``None``
            for a frozen one), in ``flatten_parameters`` order.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: whether a step may reuse this value's state (see :class:`Adam`).
        differentiable: when True, a step runs with autograd on (the option torch.optim's
            optimizers have; ``torch.optim.Adafactor`` itself lacks it): the new parameters
            and second moments are differentiable functions of the old ones, the gradients,
            ``lr`` and the hyper-parameters (``beta2_decay``, ``eps``, ``d``,
            ``weight_decay`` may be tensors that require grad). The minima and maxima
            (``rho``, ``alpha``'s floor, the floors of the estimate, the RMS clipping) pass the
            gradient to the side they take. It rounds as the for-loop path, whatever
            ``foreach``.

    Example:
        >>> w = make_independent(torch.ones(2, 3))
        >>> new, opt = Adafactor.init([w]).step(0.01, [torch.ones(2, 3)], [w])
        >>> new[0][0], opt.row_var[0].shape, opt.col_var[0].shape, opt.variance[0].shape
        (tensor([0.9900, 0.9900, 0.9900]), torch.Size([2, 1]), torch.Size([1, 3]), torch.Size([0]))
        >>> Adafactor.init([w], eps=[1e-30, 1e-3]).eps
        (1e-30, 0.001)
        >>> Adafactor.init([w], eps=(None, -1.0))
        Traceback (most recent call last):
        ...
        ValueError: epsilon2 should be >= 0 but is: -1.0
    """

    beta2_decay: float = hyper(
        -0.8, doc="the power of ``t`` in ``1 - beta2``", check=_bound("beta2_decay", "<=", 0)
    )
    eps: tuple[float | None, float] = hyper(
        (None, 1e-3),
        doc="``(eps1, eps2)``: the floor of the second-moment estimate (``None``: the dtype's "
        "machine epsilon) and of the parameter's RMS",
        check=_eps_at_least_zero,
        convert=_eps,
    )
    d: float = hyper(
        1.0,
        doc="the clipping threshold of the update's RMS",
        check=_bound("Clipping threshold d", ">=", 1),
    )
    weight_decay: float = hyper(
        0.0,
        doc="decoupled weight decay, times the learning rate",
        check=_bound("weight_decay", ">=", 0),
    )
    maximize: bool = hyper(False, doc="ascend instead of descend")
    # torch's two paths round differently here, so this switch is a setting (see above).
    foreach: bool | None = hyper(
        None, doc="round as torch's multi-tensor path (``None``: the for-loop path, as torch)"
    )
    row_var: tuple[torch.Tensor | None, ...] = state(doc="the running mean of g^2 along rows")
    col_var: tuple[torch.Tensor | None, ...] = state(doc="the running mean of g^2 along columns")
    variance: tuple[torch.Tensor | None, ...] = state(doc="the running mean of g^2 (vectors)")

    _differentiable_ok: ClassVar[bool] = True

    @classmethod
    def _zero_state(
        cls,
        settings: ParamSettings,
        params: Sequence[torch.Tensor],
        hyper: Mapping[str, Any],
        kinds: Sequence[str] | None = None,
    ) -> dict[str, list[torch.Tensor | None]]:
        for group in settings.groups:
            for i in group.indices:
                _refuse_complex(params[i], i)
        return super()._zero_state(settings, params, hyper, kinds)

    def _check_state_fits(
        self, held: Mapping[str, tuple[torch.Tensor | None, ...]], params: list[torch.Tensor]
    ) -> None:
        # Factored state (a row and a column, or an empty tensor): each kind's shape from the
        # parameter's, as _init_state makes it.
        for name, entries in held.items():
            if not entries:
                continue  # none held: starts at zero
            if len(entries) != len(params):
                raise self._state_count_misfit(name, len(entries), len(params))
            for i, (entry, param) in enumerate(zip(entries, params, strict=True)):
                if entry is not None and (
                    entry.shape != _state_shape(name, param)
                    or entry.dtype != param.dtype
                    or entry.device != param.device
                ):
                    raise self._state_misfit(name, i, entry, param)

    @classmethod
    def _init_state(cls, name: str, param: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
        _refuse_complex(param, None)
        if name == "variance" and param.dim() <= 1:
            return torch.zeros_like(param, memory_format=torch.preserve_format)
        return param.new_zeros(_state_shape(name, param))

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
        step = float(count + 1)
        eps1, eps2 = hyper["eps"]
        beta2_decay, d, weight_decay = hyper["beta2_decay"], hyper["d"], hyper["weight_decay"]
        one_minus_beta2_t = step**beta2_decay
        rho_t = min(lr, 1 / (step**0.5))
        if hyper["maximize"]:
            grads = list(torch._foreach_neg(grads))
        new = [p.clone() for p in params]
        updates: list[torch.Tensor] = []
        alphas: list[float] = []
        rows, cols, variances = state["row_var"], state["col_var"], state["variance"]
        for param, grad, row_var, col_var, variance in zip(
            new, grads, rows, cols, variances, strict=True
        ):
            floor = torch.finfo(param.dtype).eps if eps1 is None else eps1
            alphas.append(max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho_t)
            if weight_decay != 0:
                param.mul_(1 - lr * weight_decay)
            if grad.dim() > 1:
                estimate = _factored_estimate(grad, row_var, col_var, one_minus_beta2_t, floor)
            else:
                variance.lerp_(grad * grad, one_minus_beta2_t)
                estimate = variance.clone()  # the update below must not write into variance
            # eps1 squared: the square root below brings it back to eps1's magnitude
            update = estimate.clamp_(min=floor * floor).rsqrt_()
            update.mul_(grad)
            updates.append(update)
        _apply(hyper["foreach"], new, updates, alphas, d)
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
        # _update's algorithm (torch's for-loop path), out of place, its numbers kept as tensors.
        step = float(count + 1)
        eps1, eps2 = hyper["eps"]
        beta2_decay, d, weight_decay = hyper["beta2_decay"], hyper["d"], hyper["weight_decay"]
        one_minus_beta2_t = step**beta2_decay
        rho_t = _smaller(lr, 1 / (step**0.5))
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            floor = torch.finfo(p.dtype).eps if eps1 is None else eps1
            alpha = torch.maximum(p.norm(2) / (p.numel() ** 0.5), _as(eps2, p)) * rho_t
            if bool(weight_decay != 0):
                p = p * (1 - lr * weight_decay)
            if g.dim() > 1:
                row_mean = torch.norm(g, dim=-1, keepdim=True).square() / g.size(-1)
                row_var = torch.lerp(state["row_var"][i], row_mean, one_minus_beta2_t)
                col_mean = torch.norm(g, dim=-2, keepdim=True).square() / g.size(-2)
                col_var = torch.lerp(state["col_var"][i], col_mean, one_minus_beta2_t)
                state["row_var"][i], state["col_var"][i] = row_var, col_var
                row_floor = torch.maximum(row_var.mean(dim=-2, keepdim=True), _as(floor, p))
                estimate = (row_var @ col_var) / row_floor
            else:
                estimate = torch.lerp(state["variance"][i], g * g, one_minus_beta2_t)
                state["variance"][i] = estimate
            update = torch.maximum(estimate, _as(floor * floor, p)).rsqrt() * g
            rms = update.norm(2) / ((update.numel() ** 0.5) * d)
            new.append(p + update * (-alpha / torch.clamp(rms, min=1.0)))
        return new


def _factored_estimate(
    grad: torch.Tensor,
    row_var: torch.Tensor,
    col_var: torch.Tensor,
    one_minus_beta2_t: float,
    floor: float,
) -> torch.Tensor:
    """Advance ``row_var`` and ``col_var`` (in place) and return the second-moment estimate,
    in torch's order: the mean of ``g^2`` along a row is its norm squared over its length."""
    row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
    row_var.lerp_(row_mean, one_minus_beta2_t)
    col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
    col_var.lerp_(col_mean, one_minus_beta2_t)
    estimate = row_var @ col_var
    return estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=floor))


def _apply(
    foreach: bool | None,
    params: list[torch.Tensor],
    updates: list[torch.Tensor],
    alphas: list[float],
    d: float,
) -> None:
    """``p - alpha u / max(1, RMS(u) / d)`` in place, rounded as torch's chosen path rounds:
    the for-loop path adds ``u`` times a scalar, the multi-tensor one multiplies first."""
    scales = [
        -alpha / max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))
        for alpha, update in zip(alphas, updates, strict=True)
    ]
    if foreach:
        torch._foreach_mul_(updates, scales)
        torch._foreach_add_(params, updates)
        return
    for param, update, scale in zip(params, updates, scales, strict=True):
        param.add_(update, alpha=scale)


def _smaller(a: float | torch.Tensor, b: float) -> float | torch.Tensor:
    """``min(a, b)`` for a number or a tensor ``a`` (a tensor keeps its graph)."""
    if isinstance(a, torch.Tensor):
        return torch.clamp(a, max=b)
    return min(a, b)


def _as(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device (a tensor keeps its graph)."""
    return torch.as_tensor(value).to(dtype=like.dtype, device=like.device)


def _refuse_complex(param: torch.Tensor, index: int | None) -> None:
    if param.is_complex():
        which = "a parameter" if index is None else f"parameter {index}"
        raise TypeError(
            f"Adafactor does not support complex parameters ({which} is {param.dtype}), as "
            "torch.optim.Adafactor does not. Freeze it (freeze=...) or train it with another "
            "optimizer."
        )


def _state_shape(name: str, param: torch.Tensor) -> torch.Size:
    """The shape of Adafactor's state ``name`` for ``param``: a matrix (or more) keeps a row
    and a column of second moments, a vector or scalar the full ``variance``; the other kinds
    are empty."""
    factored = param.dim() > 1
    if name == "variance":
        return torch.Size([0]) if factored else param.shape
    if not factored:
        return torch.Size([0])
    shape = list(param.shape)
    shape[-1 if name == "row_var" else -2] = 1
    return torch.Size(shape)
