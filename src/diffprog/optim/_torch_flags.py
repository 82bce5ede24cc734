"""torch.optim's options that have no meaning for a pure step, accepted where torch accepts them.

``foreach`` and ``capturable`` choose how torch.optim runs a step (one kernel per tensor or per
list; the step count kept on the device for CUDA graphs): a pure optimizer accepts them and
computes the same numbers either way (where torch's two paths round differently, the
optimizer's docstring says which one it follows). ``differentiable=True`` asks for a step
autograd can see through; a pure step runs under ``torch.no_grad()``, so it is refused.
"""

from __future__ import annotations

__all__ = ["refuse_differentiable"]


def refuse_differentiable(owner: str, differentiable: bool) -> None:
    """Raise ``ValueError`` for ``differentiable=True``, which a pure step cannot honour.

    Example:
        >>> refuse_differentiable("Rprop", False)
        >>> refuse_differentiable("Rprop", True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Rprop(differentiable=True) is not supported: a pure step runs under ...
    """
    if differentiable:
        raise ValueError(
            f"{owner}(differentiable=True) is not supported: a pure step runs under "
            'torch.no_grad() (see docs/optim.md, "Steps are not differentiable"). '
            "Leave differentiable=False."
        )
