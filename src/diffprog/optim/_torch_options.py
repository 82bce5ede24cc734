"""torch.optim's implementation switches (``foreach``, ``fused``, ``capturable``,
``differentiable``), which the pure optimizers accept where torch.optim does but which choose
nothing in them."""

from __future__ import annotations

__all__ = ["accept_torch_options"]


def accept_torch_options(
    owner: str,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> None:
    """Check the implementation switches of torch.optim's ``owner`` as torch checks them.

    They have no pure meaning: a pure step always runs torch's fused kernel where the device
    has one, else ``_foreach_`` operations in torch's multi-tensor order, on fresh tensors (so
    ``capturable``'s CUDA-graph bookkeeping has nothing to do). ``differentiable=True`` is
    refused: a pure step runs under ``torch.no_grad()`` and carries no graph.

    Args:
        owner: the optimizer's name, for the messages.
        foreach, fused, capturable, differentiable: as torch.optim's.

    Raises:
        RuntimeError: ``fused`` with ``foreach`` or ``differentiable`` (torch's own errors).
        ValueError: ``differentiable=True``.

    Example:
        >>> accept_torch_options("SGD", foreach=True, capturable=True)
        >>> accept_torch_options("SGD", foreach=True, fused=True)
        Traceback (most recent call last):
        ...
        RuntimeError: `fused` and `foreach` cannot be `True` together.
    """
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable:
        raise ValueError(
            f"{owner}(differentiable=True) is not supported: a pure step runs under "
            "torch.no_grad() and its result carries no graph (docs/optim.md, 'Steps are not "
            "differentiable'). Write a differentiable inner step by hand with "
            "dp.grad(..., create_graph=True), or leave differentiable=False."
        )
