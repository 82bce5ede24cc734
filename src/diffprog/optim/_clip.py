"""Gradient transforms (clipping) put in front of any optimizer: ``chain``, as optax's.

``chain(clip_by_global_norm(1.0), Adam.init(model))`` is an optimizer: each step passes the
gradients the optimizer reads through the transforms, in order, then steps it. A transform is
any value with ``transform(grads, params) -> (new_grads, new_transform)`` (the
:class:`GradientTransform` protocol), pure like the optimizers. ``ClipGradNorm(optimizer,
max_norm)`` is the chain of one :class:`ClipByGlobalNorm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch
from typing_extensions import Self

from diffprog import DiffprogError, Parameterized
from diffprog.optim._dtensor import any_dtensor, max_norm_over_ranks
from diffprog.optim._optimizer import (
    Gradients,
    LearningRate,
    Optimizer,
    check_gradient,
    step_with_used,
    used_mask,
)
from diffprog.optim._pure import consuming_step

__all__ = [
    "Chain",
    "ClipByGlobalNorm",
    "ClipByValue",
    "ClipGradNorm",
    "GradientTransform",
    "chain",
    "clip_by_global_norm",
    "clip_by_value",
    "clip_grad_norm",
    "clip_grad_value",
]

OptT = TypeVar("OptT", bound=Optimizer)


def clip_grad_norm(
    gradients: Gradients,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Scale ``gradients`` so that their global norm is at most ``max_norm``, out of place.

    ``torch.nn.utils.clip_grad_norm_``'s numerics on gradients given as values: the total norm
    is the ``norm_type`` norm of the per-tensor norms, and every gradient is multiplied by
    ``min(1, max_norm / (total_norm + 1e-6))``.

    Args:
        gradients: the gradients (unchanged).
        max_norm: the largest global norm allowed.
        norm_type: the p of the p-norm (``float("inf")`` for the max norm).
        error_if_nonfinite: raise if the total norm is nan or inf.

    Returns:
        ``(clipped_gradients, total_norm)``, ``total_norm`` being the norm before clipping.

    Raises:
        DiffprogError: ``error_if_nonfinite`` and the norm is not finite.

    Example:
        >>> clipped, norm = clip_grad_norm([torch.tensor([3.0]), torch.tensor([4.0])], 1.0)
        >>> norm.item(), [round(g.item(), 4) for g in clipped]
        (5.0, [0.6, 0.8])
    """
    grads = list(gradients)
    if not grads:
        return [], torch.tensor(0.0)
    with torch.no_grad():
        if norm_type == float("inf") and any_dtensor(grads):
            # A rank may hold an empty piece, whose max has no identity in torch's norm.
            total = max_norm_over_ranks(grads)
        else:
            norms = torch._foreach_norm(grads, norm_type)
            device = grads[0].device
            total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise DiffprogError(
                f"the total norm of order {norm_type} of the gradients is {total.item()}, so "
                "they cannot be clipped. Find the nan/inf in the loss or the model, or pass "
                "error_if_nonfinite=False."
            )
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        clipped = torch._foreach_mul(grads, coef)
    return list(clipped), total


def clip_grad_value(gradients: Gradients, clip_value: float) -> list[torch.Tensor]:
    """Clamp every gradient element to ``[-clip_value, clip_value]``, out of place.

    ``torch.nn.utils.clip_grad_value_``'s numerics on gradients given as values.

    Example:
        >>> clip_grad_value([torch.tensor([3.0, -0.5, -4.0])], 1.0)
        [tensor([ 1.0000, -0.5000, -1.0000])]
    """
    grads = list(gradients)
    if not grads:
        return []
    with torch.no_grad():
        clipped = torch._foreach_clamp_min(grads, -clip_value)
        torch._foreach_clamp_max_(clipped, clip_value)
    return list(clipped)


@runtime_checkable
class GradientTransform(Protocol):
    """A pure transformation of the gradients before an optimizer's step (optax's
    ``GradientTransformation``): ``transform(grads, params) -> (new_grads, new_transform)``.

    ``grads`` are those the optimizer will read (of the parameters it trains and the loss
    reaches), with ``params`` aligned; a stateless transform returns itself.
    """

    def transform(
        self, grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], Any]:
        """The transformed gradients and the transform's next state."""
        ...


class ClipByGlobalNorm(Parameterized):
    """Scale the gradients to a global norm of at most ``max_norm``: ``clip_grad_norm_``.

    Example:
        >>> grads, _ = ClipByGlobalNorm(1.0).transform([torch.tensor([3.0, 4.0])], [])
        >>> grads
        [tensor([0.6000, 0.8000])]
    """

    max_norm: float
    norm_type: float = 2.0
    error_if_nonfinite: bool = False

    def transform(
        self, grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], Self]:
        """The clipped gradients (see :func:`clip_grad_norm`), and this transform."""
        clipped, _ = clip_grad_norm(grads, self.max_norm, self.norm_type, self.error_if_nonfinite)
        return clipped, self


class ClipByValue(Parameterized):
    """Clamp each gradient element to ``[-clip_value, clip_value]``: ``clip_grad_value_``.

    Example:
        >>> ClipByValue(0.5).transform([torch.tensor([2.0, -0.1])], [])[0]
        [tensor([ 0.5000, -0.1000])]
    """

    clip_value: float

    def transform(
        self, grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], Self]:
        """The clamped gradients (see :func:`clip_grad_value`), and this transform."""
        return clip_grad_value(grads, self.clip_value), self


def clip_by_global_norm(
    max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> ClipByGlobalNorm:
    """optax's name for :class:`ClipByGlobalNorm` (``torch.nn.utils.clip_grad_norm_``)."""
    return ClipByGlobalNorm(max_norm, norm_type, error_if_nonfinite)


def clip_by_value(clip_value: float) -> ClipByValue:
    """optax's ``clip`` for :class:`ClipByValue` (``torch.nn.utils.clip_grad_value_``)."""
    return ClipByValue(clip_value)


class Chained(Generic[OptT]):
    """The step of an optimizer behind gradient transforms; :class:`Chain` and
    :class:`ClipGradNorm` are the values that hold them (``transforms`` and ``inner``)."""

    inner: OptT

    def __post_init__(self) -> None:
        _refuse_whole_step(type(self).__name__, self.inner)

    def _transforms(self) -> tuple[Any, ...]:
        """The gradient transforms, applied in order."""
        raise NotImplementedError

    def _with(self, transforms: tuple[Any, ...], inner: OptT) -> Self:
        """This value after a step: ``inner`` (and ``transforms``, where they keep state)."""
        raise NotImplementedError

    def step(
        self,
        lr: LearningRate,
        gradients: Gradients,
        params: Sequence[torch.Tensor],
        *,
        used: Sequence[bool] | None = None,
    ) -> tuple[list[torch.Tensor], Self]:
        """Transform ``gradients``, then step the inner optimizer; out of place.

        Args:
            lr: the learning rate (or schedule), passed to the inner optimizer.
            gradients: one gradient per parameter.
            params: the current parameters.
            used: for each parameter whether the loss reaches it (``None``: every one). An
                unused parameter's gradient is not transformed (nor counted towards a norm,
                as ``clip_grad_norm_`` skips a ``.grad`` that is None) and is not updated.

        Returns:
            ``(new_params, new_optimizer)``.
        """
        return self._diffprog_step(lr, list(gradients), list(params), False, used)

    def _diffprog_step(
        self,
        lr: LearningRate,
        grads: list[Any],
        params: list[torch.Tensor],
        consume: bool,
        used: Sequence[bool] | None = None,
    ) -> tuple[list[torch.Tensor], Self]:
        """:meth:`step`; with ``consume``, the caller hands ``grads`` over: they are dropped
        once transformed, and the transformed ones are handed to the inner optimizer in turn."""
        _refuse_whole_step(type(self).__name__, self.inner)  # a value not built by __init__
        if getattr(self.inner, "differentiable", False) is True:
            # The transforms run under torch.no_grad(): the meta-gradient would be cut silently.
            raise DiffprogError(
                f"{type(self).__name__} does not take a differentiable inner optimizer "
                f"({type(self.inner).__name__} has differentiable=True): its gradient "
                "transforms are not differentiable. Transform the gradients yourself and "
                "call apply_gradients with the differentiable optimizer."
            )
        read = self._read(grads, params, consume, used)
        chosen = [grads[i] for i in read]
        transforms = []
        for t in self._transforms():
            chosen, t = t.transform(chosen, [params[i] for i in read])
            # What a transform returns is checked as a direct step's gradients are, whatever
            # the caller: a fused kernel given a gradient of another shape would read past its
            # end (the caller's gradients came from autograd, a transform's need not fit).
            _check_transformed(type(self).__name__, t, chosen, read, params)
            transforms.append(t)
        new_grads = _scattered(grads, read, chosen)
        del chosen  # no name left holding a transformed gradient: the step frees them
        mask = used_mask(used, len(params), type(self).__name__)
        inner_step = consuming_step(self.inner) if consume else None
        if inner_step is not None:
            grads[:] = [None] * len(grads)  # free the untransformed gradients before the step
            new_params, new_inner = inner_step(lr, new_grads, params, True, mask)
        else:
            new_params, new_inner = step_with_used(self.inner, lr, new_grads, params, mask)
        return new_params, self._with(tuple(transforms), new_inner)

    def _read(
        self, grads: list[Any], params: list[torch.Tensor], consume: bool, used: Any
    ) -> list[int]:
        """The indices of the gradients the inner optimizer reads (trained and used), checked
        unless handed over by ``run_step`` (autograd's: they fit)."""
        owner = type(self).__name__
        if len(grads) != len(params):
            raise DiffprogError(
                f"{owner}.step got {len(params)} parameters but {len(grads)} gradients. "
                "Pass one gradient per parameter, in flatten_parameters order."
            )
        mask = used_mask(used, len(params), owner)
        trainable = self.trainable
        read = [
            i
            for i in range(len(params))
            if (trainable is None or trainable[i]) and (mask is None or mask[i])
        ]
        if not consume:  # the gradients transformed here are the ones the inner step reads
            for i in read:
                check_gradient(owner, i, grads[i], params[i])
        return read

    @property
    def trainable(self) -> tuple[bool, ...] | None:
        """The inner optimizer's ``trainable`` (``None``: every parameter)."""
        found: tuple[bool, ...] | None = getattr(self.inner, "trainable", None)
        return found

    @property
    def count(self) -> int:
        """The inner optimizer's step count."""
        return int(getattr(self.inner, "count", 0))


def _refuse_whole_step(owner: str, inner: object) -> None:
    """Raise if ``inner`` takes the whole step given the model (``apply_model``: a wrapper that
    communicates, ``diffprog.distributed.DataParallel``).

    Behind gradient transforms it would only get their ``step``, after ``run_step`` had judged
    non-finite values on this rank alone: one rank could skip a step another takes, and the
    ranks' collectives would pair across different steps.
    """
    if callable(getattr(inner, "apply_model", None)):
        raise DiffprogError(
            f"{owner} cannot wrap {type(inner).__name__}: it takes the whole step itself "
            "(averaging over the ranks, judging non-finite values on all of them), which a "
            "gradient transform in front would bypass and let the ranks drift out of step. "
            "Wrap DataParallel outermost: DataParallel(chain(...)), e.g. "
            "DataParallel(chain(clip_by_global_norm(1.0), Adam.init(model))) or "
            "DataParallel(ClipGradNorm(Adam.init(model), 1.0))."
        )


def _check_transformed(
    owner: str, transform: object, grads: Sequence[Any], read: list[int], params: list[torch.Tensor]
) -> None:
    """Raise unless ``transform`` returned one fitting gradient per parameter it was given."""
    where = f"{owner} (after {type(transform).__name__}.transform)"
    if len(grads) != len(read):
        raise DiffprogError(
            f"{where} got {len(grads)} gradients for {len(read)} parameters: a transform must "
            "return one gradient per gradient it is given, in the same order."
        )
    for i, g in zip(read, grads, strict=True):
        check_gradient(where, i, g, params[i])


def _scattered(grads: list[Any], read: list[int], chosen: list[torch.Tensor]) -> list[Any]:
    """``grads`` with ``chosen[k]`` at index ``read[k]``."""
    out = list(grads)
    for i, g in zip(read, chosen, strict=True):
        out[i] = g
    return out


class Chain(Chained[OptT], Parameterized):
    """Gradient transforms in front of an optimizer (optax's ``chain``): build with :func:`chain`.

    Attributes:
        transforms: the gradient transforms, applied in order.
        inner: the optimizer (pure, ``TorchOptimizer``, or any with the protocol's ``step``).

    Example:
        >>> from diffprog.optim import GD
        >>> p = make_independent(torch.zeros(2))
        >>> opt = chain(clip_by_value(1.0), clip_by_global_norm(1.0), GD())
        >>> new, opt = opt.step(1.0, [torch.tensor([3.0, 0.0])], [p])
        >>> [round(v, 4) for v in new[0].tolist()], type(opt).__name__
        ([-1.0, 0.0], 'Chain')
    """

    transforms: tuple[Any, ...]
    inner: OptT

    def _transforms(self) -> tuple[Any, ...]:
        return self.transforms

    def _with(self, transforms: tuple[Any, ...], inner: OptT) -> Self:
        new = object.__new__(type(self))
        object.__setattr__(new, "__dict__", {"transforms": transforms, "inner": inner})
        return new


def chain(*parts: Any) -> Chain[Any]:
    """Gradient transforms, then the optimizer (the last argument), as one optimizer.

    Args:
        parts: transforms (values with ``transform(grads, params)``), then the optimizer.

    Returns:
        The :class:`Chain`.

    Raises:
        TypeError: a part before the last is not a transform, or no optimizer is given.

    Example:
        >>> from diffprog.optim import Adam
        >>> opt = chain(clip_by_global_norm(1.0), Adam.init([make_independent(torch.zeros(2))]))
        >>> [type(t).__name__ for t in opt.transforms], type(opt.inner).__name__
        (['ClipByGlobalNorm'], 'Adam')
    """
    if not parts:
        raise TypeError("chain needs an optimizer as its last argument.")
    *transforms, inner = parts
    for t in transforms:
        if not isinstance(t, GradientTransform):
            raise TypeError(
                f"chain's arguments before the optimizer must be gradient transforms (with "
                f"transform(grads, params)), got {type(t).__name__}. The optimizer comes last."
            )
    if isinstance(inner, GradientTransform):
        raise TypeError("chain's last argument must be the optimizer, not a transform.")
    if isinstance(inner, type) or not callable(getattr(inner, "step", None)):
        what = inner.__name__ if isinstance(inner, type) else type(inner).__name__
        raise TypeError(
            f"chain's last argument must be an optimizer value (with a step method), got "
            f"{what}{' (a class)' if isinstance(inner, type) else ''}: build it first, e.g. "
            "Adam.init(model)."
        )
    return Chain(tuple(transforms), inner)


class ClipGradNorm(Chained[OptT], Parameterized):
    """Any optimizer, its gradients first clipped to a global norm of at most ``max_norm``.

    ``torch.nn.utils.clip_grad_norm_`` before the inner optimizer's step, on the parameters the
    inner optimizer trains (frozen ones do not count towards the norm): the chain of one
    :class:`ClipByGlobalNorm`, ``chain(clip_by_global_norm(max_norm), inner)``, kept under
    this name.

    Attributes:
        inner: the wrapped optimizer (its state lives there).
        max_norm: the largest global gradient norm.
        norm_type: the p of the p-norm.
        error_if_nonfinite: raise when the norm is nan or inf.

    Example:
        >>> from diffprog.optim import GD
        >>> p = make_independent(torch.tensor([0.0, 0.0]))
        >>> new, opt = ClipGradNorm(GD(), max_norm=1.0).step(1.0, [torch.tensor([3.0, 4.0])], [p])
        >>> [round(x, 4) for x in new[0].tolist()]
        [-0.6, -0.8]
    """

    inner: OptT
    max_norm: float
    norm_type: float = 2.0
    error_if_nonfinite: bool = False

    @property
    def transforms(self) -> tuple[ClipByGlobalNorm]:
        """The one transform: clipping by ``max_norm``."""
        return (ClipByGlobalNorm(self.max_norm, self.norm_type, self.error_if_nonfinite),)

    def _transforms(self) -> tuple[Any, ...]:
        return self.transforms

    def _with(self, transforms: tuple[Any, ...], inner: OptT) -> Self:
        new = object.__new__(type(self))
        object.__setattr__(new, "__dict__", {**self.__dict__, "inner": inner})
        return new
