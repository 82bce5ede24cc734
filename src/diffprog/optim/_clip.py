"""Gradient clipping by global norm, as a wrapper around any optimizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import torch
from typing_extensions import Self

from diffprog import DiffprogError, Parameterized
from diffprog.optim._optimizer import (
    Gradients,
    LearningRate,
    Optimizer,
    check_gradient,
    step_with_used,
    used_mask,
)
from diffprog.optim._pure import consuming_step

__all__ = ["ClipGradNorm", "clip_grad_norm"]

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


class ClipGradNorm(Parameterized, Generic[OptT]):
    """Any optimizer, its gradients first clipped to a global norm of at most ``max_norm``.

    ``torch.nn.utils.clip_grad_norm_`` before the inner optimizer's step, on the parameters the
    inner optimizer trains (frozen ones do not count towards the norm).

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

    def step(
        self,
        lr: LearningRate,
        gradients: Gradients,
        params: Sequence[torch.Tensor],
        *,
        used: Sequence[bool] | None = None,
    ) -> tuple[list[torch.Tensor], Self]:
        """Clip ``gradients``, then step the inner optimizer; out of place.

        Args:
            lr: the learning rate (or schedule), passed to the inner optimizer.
            gradients: one gradient per parameter.
            params: the current parameters.
            used: for each parameter whether the loss reaches it (``None``: every one). An
                unused parameter's gradient does not count towards the norm (as
                ``clip_grad_norm_`` skips a ``.grad`` that is None) and is not updated.

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
        once clipped, and the clipped ones are handed to the inner optimizer in turn."""
        owner = type(self).__name__
        if len(grads) != len(params):
            raise DiffprogError(
                f"{owner}.step got {len(params)} parameters but {len(grads)} gradients. "
                "Pass one gradient per parameter, in flatten_parameters order."
            )
        mask = used_mask(used, len(params), owner)
        trainable = self.trainable
        if mask is not None:
            trainable = tuple(
                u and t for u, t in zip(mask, trainable or (True,) * len(mask), strict=True)
            )
        if not consume:  # run_step's gradients (consume) come from autograd: they fit
            # The gradients clipped here are the ones the inner step reads: check them first.
            for i, (g, p) in enumerate(zip(grads, params)):
                if trainable is None or trainable[i]:
                    check_gradient(owner, i, g, p)
        if trainable is None or all(trainable):
            clipped, _ = clip_grad_norm(
                grads, self.max_norm, self.norm_type, self.error_if_nonfinite
            )
        else:
            chosen = [g for g, t in zip(grads, trainable) if t]
            scaled, _ = clip_grad_norm(
                chosen, self.max_norm, self.norm_type, self.error_if_nonfinite
            )
            del chosen
            it = iter(scaled)
            clipped = [next(it) if t else g for g, t in zip(grads, trainable)]
            del scaled, it
        inner_step = consuming_step(self.inner) if consume else None
        if inner_step is not None:
            grads[:] = [None] * len(grads)  # free the unclipped gradients before the step
            new_params, new_inner = inner_step(lr, clipped, params, True, mask)
        else:
            new_params, new_inner = step_with_used(self.inner, lr, clipped, params, mask)
        new = object.__new__(type(self))
        object.__setattr__(new, "__dict__", {**self.__dict__, "inner": new_inner})
        return new_params, new

    @property
    def trainable(self) -> tuple[bool, ...] | None:
        """The inner optimizer's ``trainable`` (``None``: every parameter)."""
        found: tuple[bool, ...] | None = getattr(self.inner, "trainable", None)
        return found

    @property
    def count(self) -> int:
        """The inner optimizer's step count."""
        return int(getattr(self.inner, "count", 0))
