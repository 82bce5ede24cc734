"""``ParamStream``: the parameters a replace consumes, Hasktorch's ``State [Parameter]``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import torch

from diffprog._errors import ParameterCountError, ParameterShapeError, ParameterTypeError
from diffprog._nodes import replace_value

__all__ = ["ParamStream"]

T = TypeVar("T")


class ParamStream:
    """A cursor over a list of parameters, consumed in order while a model is rebuilt.

    The Python form of Hasktorch's ``type ParamStream a = State [Parameter] a``: a hand-written
    ``replace_own_parameters(self, stream)`` reads its new parameters with
    :meth:`next_parameter` (``nextParameter``) and rebuilds sub-values with :meth:`replace`.

    Args:
        params: the new parameters, in ``flatten_parameters`` order.

    Example:
        >>> stream = ParamStream([torch.zeros(2), torch.ones(3)])
        >>> stream.next_parameter().shape, stream.remaining
        (torch.Size([2]), 1)
    """

    __slots__ = ("_memo", "_params", "_pos")

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self._params: list[Any] = list(params)
        self._pos = 0
        # id(old parameter) -> its replacement: a parameter reachable at several paths (tied
        # weights) consumes one entry and gets the same replacement at each of them.
        self._memo: dict[int, Any] = {}

    @property
    def remaining(self) -> int:
        """How many parameters are left to consume."""
        return len(self._params) - self._pos

    @property
    def consumed(self) -> int:
        """How many parameters have been consumed."""
        return self._pos

    def next_parameter(self) -> torch.nn.Parameter:
        """Consume and return the next parameter (Hasktorch's ``nextParameter``).

        Raises:
            ParameterCountError: the stream is exhausted.
        """
        pos = self._pos
        if pos >= len(self._params):
            raise ParameterCountError(
                f"ran out of parameters after {pos}",
                "Give replace_parameters as many parameters as flatten_parameters returns.",
            )
        self._pos = pos + 1
        new = self._params[pos]
        return new  # type: ignore[no-any-return]

    def replace(self, value: T) -> T:
        """Rebuild ``value`` (any model or sub-model) with parameters read from this stream."""
        return replace_value(value, self)  # type: ignore[no-any-return]

    def take(self, old: torch.Tensor) -> Any:
        """The replacement for the parameter ``old``: checked, and the same one for a tie."""
        memo = self._memo
        new = memo.get(id(old))
        if new is not None:
            return new
        new = self.next_parameter()
        if not isinstance(new, torch.Tensor):
            raise ParameterTypeError(
                f"a {type(new).__name__} was given for parameter #{self._pos - 1}, "
                f"which must be a tensor (the slot holds {_describe(old)})",
                "Pass tensors; wrap values with make_independent to keep them trainable.",
            )
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ParameterShapeError(
                f"parameter #{self._pos - 1} is {_describe(new)} but its slot holds "
                f"{_describe(old)}",
                "Pass the parameters in flatten_parameters order, with their shapes and dtypes.",
            )
        memo[id(old)] = new
        return new


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
