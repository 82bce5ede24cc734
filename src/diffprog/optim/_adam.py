"""``Adam`` (and Hasktorch's ``mk_adam``): torch.optim.Adam's algorithm as a value."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from diffprog.optim._declare import (
    TORCH_OPTIONS,
    betas_in,
    hyper,
    non_negative,
    pair_of_floats,
    state,
)
from diffprog.optim._pure import (
    PureOptimizer,
    clone_all,
    device_groups,
    fused_layouts,
    has_fused,
    lr_on,
    sqrt_of_moment,
)

__all__ = ["Adam", "mk_adam"]


class Adam(PureOptimizer, torch_options=TORCH_OPTIONS):
    """Adam (Kingma & Ba), exactly ``torch.optim.Adam``'s algorithm, as a value.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, and
    ``p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` at step ``t = count + 1``,
    ``g`` including the L2 term ``weight_decay * p``, or with ``decoupled_weight_decay`` (torch
    2.13's option; :class:`AdamW`) the decay ``p * (1 - lr * weight_decay)`` applied to the
    parameter instead. ``amsgrad`` uses the running maximum of ``v``. The step runs torch's fused
    Adam kernel on fresh copies of the parameters and moments, so the old ones stay valid (on a
    device without the kernel, ``_foreach_`` operations in torch's multi-tensor order).
    ``Adam.init(model, ...)`` takes torch's keyword arguments with torch's defaults (and
    ``foreach``, ``capturable``, ``fused``, which change nothing here, and ``differentiable``).

    Hasktorch's ``Adam`` holds ``beta1``, ``beta2``, ``m1``, ``m2`` and ``iter``: here
    ``betas``, ``exp_avg``, ``exp_avg_sq`` and ``count`` (torch's names). Its ``eps`` is fixed
    at 1e-37; here it is torch's ``eps=1e-8``.

    Attributes:
        betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: torch's.
        count: the number of steps taken (the argument of a learning-rate schedule).
        param_counts: the number of steps that updated each parameter (torch's per-parameter
            ``state["step"]``, which sets the bias correction), in ``flatten_parameters``
            order; empty while each trained parameter has been updated by all ``count`` steps.
            A step leaves a parameter the loss does not reach (``used``) alone, as torch.optim
            does when its ``.grad`` is None: its count and moments stay as they were.
        exp_avg, exp_avg_sq: the moments, one plain tensor per trained parameter (``None`` for
            a frozen one), in ``flatten_parameters`` order.
        max_exp_avg_sq: the running maximum of ``exp_avg_sq`` (with ``amsgrad``), else empty.
        settings: which parameters are trained and how (``None``: all, alike).
        donate: when True, a step updates this value's moments in place and hands them to the
            optimizer it returns, and this value can no longer step: less memory and time, at
            the price of the old optimizer (never the old parameters).
        differentiable: when True, a step runs with autograd on (torch.optim's
            ``differentiable=True``): the new parameters and moments are differentiable
            functions of the old ones, the gradients and the hyper-parameters (``lr``,
            ``betas``, ``eps``, ``weight_decay`` may be tensors that require grad).
        lease: with ``donate``, whether this value still holds its state (see ``Lease``).

    Example:
        >>> p = make_independent(torch.tensor([1.0, -1.0]))
        >>> opt = Adam.init([p])
        >>> new, opt = opt.step(0.1, [torch.tensor([0.5, -0.5])], [p])
        >>> new, opt.count
        ([tensor([ 0.9000, -0.9000])], 1)
        >>> from diffprog.nn import LinearSpec
        >>> Adam.init(sample(LinearSpec(3, 2)), overrides={"bias": {"weight_decay": 0.0}})
        Adam(
          betas=(0.9, 0.999),
          eps=1e-08,
          weight_decay=0.0,
          amsgrad=False,
          maximize=False,
          decoupled_weight_decay=False,
          count=0,
          param_counts=(),
          exp_avg=(const f32[2,3], const f32[2]),
          exp_avg_sq=(const f32[2,3], const f32[2]),
          max_exp_avg_sq=(),
          settings=ParamSettings(
            num_params=2,
            groups=(
              ParamGroup(indices=(0,), overrides=()),
              ParamGroup(indices=(1,), overrides=(('weight_decay', 0.0),)),
            ),
            frozen=(),
          ),
          donate=False,
          differentiable=False,
          lease=None,
        )
    """

    _elementwise: ClassVar[bool] = True  # runs on the shards of DTensor parameters

    betas: tuple[float, float] = hyper(
        (0.9, 0.999),
        doc="the decay rates of the first and second moments",
        check=betas_in(1.0, closed=False),
        convert=pair_of_floats,
    )
    eps: float = hyper(1e-8, doc="added to the denominator", check=non_negative)
    weight_decay: float = hyper(0.0, doc="L2 penalty added to the gradient", check=non_negative)
    amsgrad: bool = hyper(False, doc="use the AMSGrad variant (the running maximum of v)")
    maximize: bool = hyper(False, doc="ascend instead of descend")
    decoupled_weight_decay: bool = hyper(
        False, doc="decay the parameters directly, as AdamW (torch 2.13's option)"
    )
    exp_avg: tuple[torch.Tensor | None, ...] = state(doc="the first moment, torch's exp_avg")
    exp_avg_sq: tuple[torch.Tensor | None, ...] = state(doc="the second moment")
    max_exp_avg_sq: tuple[torch.Tensor | None, ...] = state(doc="the maximum of exp_avg_sq")

    _differentiable_ok: ClassVar[bool] = True

    @classmethod
    def _state_names(cls, hyper: Mapping[str, Any]) -> tuple[str, ...]:
        moments = ("exp_avg", "exp_avg_sq")
        return (*moments, "max_exp_avg_sq") if hyper["amsgrad"] else moments

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
        moments = [state["exp_avg"], state["exp_avg_sq"]]
        if hyper["amsgrad"]:
            moments.append(state["max_exp_avg_sq"])
        lists = [new, fused_layouts(new, grads, *moments), *moments]
        decoupled = hyper["decoupled_weight_decay"]
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        for device, (ps, gs, ms, vs, *maxs) in device_groups(*lists):
            if has_fused(kernel.__name__, device):
                beta1, beta2 = hyper["betas"]
                kernel(
                    ps,
                    gs,
                    ms,
                    vs,
                    maxs[0] if maxs else [],
                    [torch.full((), count + 1.0, device=device)] * len(ps),
                    lr=lr_on(lr, device),
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=hyper["weight_decay"],
                    eps=hyper["eps"],
                    amsgrad=hyper["amsgrad"],
                    maximize=hyper["maximize"],
                )
            else:
                # Traced by diffprog.func.compile_step, lr stays a tensor (an input of the graph).
                step_lr = lr if torch.compiler.is_compiling() else float(lr)
                _foreach_adam(hyper, step_lr, count + 1, ps, gs, ms, vs, maxs, decoupled)
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
        # torch.optim.Adam's single-tensor path (differentiable=True), out of place.
        beta1, beta2 = hyper["betas"]
        decay, eps, t = hyper["weight_decay"], hyper["eps"], count + 1
        # The bias corrections and step size, as torch computes them for a tensor step count.
        step_size = lr / (1 - beta1**t)
        correction2_sqrt = (1 - beta2**t) ** 0.5
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if hyper["maximize"]:
                g = -g
            if bool(decay != 0):
                if hyper["decoupled_weight_decay"]:
                    p = p * (1 - lr * decay)
                else:
                    g = g + decay * p
            m = torch.lerp(state["exp_avg"][i], g, 1 - beta1)
            v = state["exp_avg_sq"][i] * beta2 + (1 - beta2) * g * g
            state["exp_avg"][i], state["exp_avg_sq"][i] = m, v
            if hyper["amsgrad"]:
                v = torch.maximum(state["max_exp_avg_sq"][i], v)
                state["max_exp_avg_sq"][i] = v
            new.append(p - step_size * m / (sqrt_of_moment(v) / correction2_sqrt + eps))
        return new


def mk_adam(iter: int, beta1: float, beta2: float, params: Sequence[torch.Tensor]) -> Adam:
    """Hasktorch's ``mkAdam``: Adam with zero moments, having taken ``iter`` steps.

    The other hyper-parameters are torch's defaults (``eps=1e-8``, where Hasktorch uses 1e-37).

    Args:
        iter: the step count to start from (usually 0).
        beta1: the decay rate of the first moment.
        beta2: the decay rate of the second moment.
        params: the parameters (``flatten_parameters(model)``), or the model itself.

    Returns:
        The optimizer.

    Example:
        >>> opt = mk_adam(0, 0.9, 0.999, [make_independent(torch.zeros(2))])
        >>> opt.betas, opt.count, opt.exp_avg
        ((0.9, 0.999), 0, (tensor([0., 0.]),))
    """
    settings = {**Adam._hyper_defaults(), "betas": pair_of_floats((beta1, beta2))}
    return Adam._build(params, settings, (), None, False, count=iter)


def _foreach_adam(
    hyper: Mapping[str, Any],
    lr: float | torch.Tensor,
    step: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[list[torch.Tensor]],
    decoupled: bool,
) -> None:
    """Adam with ``_foreach_`` operations, in torch's multi-tensor order, on devices without
    the fused kernel: ``params`` and the moments are updated in place, ``grads`` are not."""
    beta1, beta2 = hyper["betas"]
    weight_decay = hyper["weight_decay"]
    if hyper["maximize"]:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    traced = torch.compiler.is_compiling()
    if traced:
        # Under torch.compile (diffprog.func.compile_step) the step count is a symbol, and
        # the bias corrections 0-dim float64 tensors (computed in float64 as the Python
        # numbers are, used in the parameters' dtype): see _traced_power.
        t = torch.scalar_tensor(step, dtype=torch.float64, device=params[0].device)
        step_size = (-lr / (1 - _traced_power(beta1, t))).to(params[0].dtype)
        bias_correction2_sqrt = ((1 - _traced_power(beta2, t)) ** 0.5).to(params[0].dtype)
    else:
        step_size = -lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if max_exp_avg_sqs:
        torch._foreach_maximum_(max_exp_avg_sqs[0], exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs[0])
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, hyper["eps"])
    if traced:
        torch._foreach_add_(
            params, torch._foreach_mul(torch._foreach_div(exp_avgs, denom), step_size)
        )
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


def _traced_power(base: float | torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``base ** step`` for a step count traced by ``torch.compile``, as ``exp(step * log(base))``.

    Why: inductor computes a 0-dim value read by many loops once (it realizes it) only when
    the value holds an expensive op such as ``exp``; a ``pow`` it inlines into every vector of
    every loop it feeds, and the C++ compiler cannot hoist it (``pow`` may set ``errno``):
    on the medium benchmark MLP that was most of the optimizer's time. In float64 the two
    forms differ by a few units in the last place, far below the parameters' float32.
    """
    if isinstance(base, torch.Tensor):  # a learned hyper-parameter: pow, as eager
        return base**step
    if base == 0.0:  # 0 ** step for step >= 1 (log(0) is undefined)
        return torch.zeros_like(step)
    return torch.exp(step * math.log(base))
