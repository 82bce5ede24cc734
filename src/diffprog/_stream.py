"""``ParamStream``: the parameters a replace consumes, Hasktorch's ``State [Parameter]``."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from diffprog._errors import ParameterCountError, ParameterShapeError, ParameterTypeError

__all__ = ["CheckingStream", "ParamStream"]

T = TypeVar("T")


class ParamStream:
    """A cursor over a list of parameters, consumed in order while a model is rebuilt.

    The Python form of Hasktorch's ``type ParamStream a = State [Parameter] a``: a hand-written
    ``replace_own_parameters(self, stream)`` reads its new parameters with
    :meth:`next_parameter` (``nextParameter``) and rebuilds sub-values with :meth:`replace`.
    Every replace runs on one stream: the nodes call :meth:`take` for each parameter slot and
    :meth:`rebuilt`/:meth:`keep` around each container or sub-model they rebuild.

    Args:
        params: the new parameters, in ``flatten_parameters`` order.

    Example:
        >>> stream = ParamStream([torch.zeros(2), torch.ones(3)])
        >>> stream.next_parameter().shape, stream.remaining
        (torch.Size([2]), 1)
    """

    __slots__ = ("_built", "_memo", "_olds", "_params")

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self._params: list[Any] = list(params)
        # id(old parameter) -> its replacement: a parameter reachable at several paths (tied
        # weights) consumes one entry and gets the same replacement at each of them.
        self._memo: dict[int, Any] = {}
        # The parameter each consumed entry replaced (None where next_parameter took it without
        # a slot), for verify(); its length is the position in the stream.
        self._olds: list[torch.Tensor | None] = []
        # id(old sub-model or container) -> (it, its rebuilt version): a layer object reachable
        # at several paths (a shared block) is rebuilt once, so it stays one object, and its
        # state (BatchNorm's running statistics) stays shared, as in PyTorch. The old value is
        # kept alive here so that its id, the key, cannot be reused by a temporary.
        self._built: dict[int, tuple[Any, Any]] = {}

    @property
    def remaining(self) -> int:
        """How many parameters are left to consume."""
        return len(self._params) - len(self._olds)

    @property
    def consumed(self) -> int:
        """How many parameters have been consumed."""
        return len(self._olds)

    def next_parameter(self) -> torch.nn.Parameter:
        """Consume and return the next parameter (Hasktorch's ``nextParameter``).

        Raises:
            ParameterCountError: the stream is exhausted.
        """
        if not self.remaining:
            raise self._exhausted()
        self._olds.append(None)  # no slot to check it against
        return self._params[len(self._olds) - 1]  # type: ignore[no-any-return]

    def take(self, old: torch.Tensor) -> Any:
        """The replacement for the parameter slot holding ``old`` (the same again for a tie).

        It only records ``old``: :meth:`verify` checks shapes and dtypes afterwards, all at
        once, which costs less than a check per slot.

        Raises:
            ParameterCountError: the stream is exhausted.
        """
        memo = self._memo
        new = memo.get(id(old), _NOT_TAKEN)
        if new is _NOT_TAKEN:
            olds = self._olds
            if len(olds) == len(self._params):
                raise self._exhausted()
            new = memo[id(old)] = self._params[len(olds)]
            olds.append(old)
        return new

    def replace(self, value: T) -> T:
        """Rebuild ``value`` (any model or sub-model) with parameters read from this stream.

        Shapes and dtypes are checked by :meth:`verify` (``replace_parameters`` calls it).
        """
        from diffprog._nodes import replace_value  # the nodes use the stream: import late

        return replace_value(value, self)  # type: ignore[no-any-return]

    def rebuilt(self, value: Any) -> Any:
        """The version of ``value`` rebuilt earlier in this replace, or None.

        A node asks before it rebuilds a container or sub-model and :meth:`keep`\\ s what it
        built, so a value met at several paths stays one object.
        """
        found = self._built.get(id(value))
        return None if found is None else found[1]

    def keep(self, value: Any, rebuilt: T) -> T:
        """Remember ``rebuilt`` as the new ``value`` (see :meth:`rebuilt`); return it."""
        self._built[id(value)] = (value, rebuilt)
        return rebuilt

    def verify(self) -> None:
        """Check every replacement taken so far against the slot it filled.

        Raises:
            ParameterTypeError: a replacement is not a tensor.
            ParameterShapeError: a replacement's shape or dtype differs from its slot's.
        """
        olds = self._olds
        news = self._params[: len(olds)]
        # The usual case in C-level map()s, without a Python frame per parameter. Tensor.size
        # raises TypeError for a non-tensor (or a None: a slot-less next_parameter()), which
        # the loop below then sorts out.
        try:
            if list(map(_size, news)) == list(map(_size, olds)) and list(
                map(_dtype, news)
            ) == list(map(_dtype, olds)):
                return
        except (TypeError, AttributeError):
            pass
        for index, (new, old) in enumerate(zip(news, olds, strict=True)):
            if old is not None:
                _check(index, new, old)

    def _exhausted(self) -> ParameterCountError:
        return ParameterCountError(
            f"ran out of parameters after {len(self._olds)}",
            "Give replace_parameters as many parameters as flatten_parameters returns.",
        )


_NOT_TAKEN = object()
_dtype = operator.attrgetter("dtype")
_size: Callable[[Any], torch.Size] = torch.Tensor.size


class CheckingStream(ParamStream):
    """A stream that checks each replacement as it is taken, so that the error names its path.

    Only for errors: when :meth:`ParamStream.verify` finds a wrong parameter, the replace is
    replayed on this stream and the error raised at the slot travels up through the nodes,
    which add the path to it.
    """

    __slots__ = ()

    def take(self, old: torch.Tensor) -> Any:
        """Take the replacement for ``old``, checking it at once."""
        before = self.consumed
        new = super().take(old)
        if self.consumed != before:
            _check(before, new, old)
        return new


def _check(index: int, new: Any, old: torch.Tensor) -> None:
    if not isinstance(new, torch.Tensor):
        raise ParameterTypeError(
            f"a {type(new).__name__} was given for parameter #{index}, which must be a tensor "
            f"(the slot holds {_describe(old)})",
            "Pass tensors; wrap values with make_independent to keep them trainable.",
        )
    if new.shape != old.shape or new.dtype != old.dtype:
        raise ParameterShapeError(
            f"parameter #{index} is {_describe(new)} but its slot holds {_describe(old)}",
            "Pass the parameters in flatten_parameters order, with their shapes and dtypes.",
        )


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
