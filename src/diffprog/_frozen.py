"""Frozen parameters: a parameter turned into a constant that remembers it was one.

Hasktorch tells trainable leaves (``Parameter``) from constants (``Tensor``) by type; freezing a
parameter is turning it into a constant. A plain tensor cannot be told from a buffer (a running
mean must never become trainable), so a frozen parameter gets a type of its own: a tensor
subclass made exactly as ``torch.nn.Parameter`` is (``__torch_function__`` disabled, so every
operation on it gives plain tensors and costs nothing extra), but not a ``Parameter``:
``flatten_parameters`` skips it like any other constant.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Frozen"]


class Frozen(torch.Tensor):
    """A frozen parameter: a constant (no gradient, no optimizer state) that can be unfrozen.

    Made from a tensor without copying it (the result shares its storage, detached from any
    graph). Operations on it give plain tensors.

    Example:
        >>> f = Frozen(torch.nn.Parameter(torch.ones(2)))
        >>> f.requires_grad, isinstance(f, torch.nn.Parameter), type(f * 2).__name__
        (False, False, 'Tensor')
    """

    def __new__(cls, data: torch.Tensor) -> Frozen:
        """Freeze ``data``.

        Args:
            data: the parameter (or any tensor) to freeze.

        Returns:
            A frozen parameter sharing ``data``'s storage.

        Raises:
            TypeError: ``data`` is not a tensor.
        """
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"Frozen expects a torch.Tensor, got {type(data).__name__}.")
        return torch.Tensor._make_subclass(cls, data.detach(), False)

    # As torch.nn.Parameter: operations see a plain tensor and return plain tensors.
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return "Frozen containing:\n" + str(torch.Tensor.__repr__(self))  # type: ignore[no-untyped-call]

    def __deepcopy__(self, memo: dict[int, Any]) -> Frozen:
        if id(self) in memo:
            return memo[id(self)]  # type: ignore[no-any-return]
        result = Frozen(self.detach().clone(memory_format=torch.preserve_format))
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto: Any) -> Any:
        return (Frozen, (self.detach().clone(),))
