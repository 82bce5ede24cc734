"""Per-example gradients in one call (``torch.func.vmap`` of ``torch.func.grad``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

import diffprog as dp

__all__ = ["per_example_grads"]

M = TypeVar("M")


def per_example_grads(
    loss_fn: Callable[..., torch.Tensor], model: M, *batch: torch.Tensor
) -> tuple[M, torch.Tensor]:
    """The gradient of ``loss_fn`` for each example of ``batch``, in one vectorised call.

    torch's recipe (``vmap(grad(...))``, as in its per-sample-gradients tutorial), with the
    model as the argument: ``loss_fn(model, *example)`` is called on each example as a batch of
    one (each tensor of ``batch`` sliced on its first axis, keeping that axis), so a loss
    written for batches works unchanged. Gradients are taken with respect to the model's
    Parameters only (frozen parameters and buffers, integer ones included, are held constant).
    The model's layers must not mix examples (BatchNorm in training mode does).

    Args:
        loss_fn: ``loss_fn(model, *example) -> scalar tensor``.
        model: the model.
        *batch: tensors whose first axis is the example axis (inputs, targets...), of one size
            ``N``.

    Returns:
        ``(grads, losses)``: ``grads`` is a model of the same structure holding, at each
        Parameter's place, a tensor ``[N, *parameter.shape]`` (gradient ``i`` at index ``i``)
        and ``None`` at every other tensor's place; ``losses`` is ``[N]``, each example's
        loss. ``torch.utils._pytree.tree_leaves(grads)`` lists the gradients in
        ``flatten_parameters(model)`` order.

    Raises:
        ValueError: no batch tensors, or their first axes differ.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> layer = dp.sample(LinearSpec(3, 1))
        >>> x, y = torch.randn(5, 3), torch.randn(5, 1)
        >>> def loss_fn(model, x, y):
        ...     return torch.nn.functional.mse_loss(model(x), y)
        >>> grads, losses = per_example_grads(loss_fn, layer, x, y)
        >>> tuple(grads.weight.shape), tuple(losses.shape)
        ((5, 1, 3), (5,))
    """
    if not batch:
        raise ValueError("per_example_grads needs at least one batch tensor (the inputs).")
    sizes = {t.shape[0] if t.dim() else None for t in batch}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "per_example_grads: every batch tensor needs the example axis first, of one size; "
            f"got shapes {[tuple(t.shape) for t in batch]}."
        )
    params, rest = dp.partition(model, dp.Parameter)

    def one(params: Any, *example: torch.Tensor) -> torch.Tensor:
        # vmap hands over each example without its axis: give it back as a batch of one.
        return loss_fn(dp.combine(params, rest), *(t.unsqueeze(0) for t in example))

    grads, losses = torch.func.vmap(
        torch.func.grad_and_value(one), in_dims=(None, *(0 for _ in batch))
    )(params, *batch)
    return grads, losses
