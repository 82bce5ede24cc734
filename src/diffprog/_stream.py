"""``ParamStream``: the parameters a replace consumes, Hasktorch's ``State [Parameter]``."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
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
    :meth:`keep` for each container or sub-model they rebuild.

    Args:
        params: the new parameters, in ``flatten_parameters`` order.

    Example:
        >>> stream = ParamStream([torch.zeros(2), torch.ones(3)])
        >>> stream.next_parameter().shape, stream.remaining
        (torch.Size([2]), 1)
    """

    __slots__ = ("_alive", "_built", "_memo", "_olds", "_params", "_slotless", "traced")

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self._params: list[Any] = list(params)
        # id(old parameter) -> its replacement: a parameter reachable at several paths (tied
        # weights) consumes one entry and gets the same replacement at each of them.
        self._memo: dict[int, Any] = {}
        # The parameter each consumed entry replaced (None where next_parameter took it without
        # a slot), for verify(); its length is the position in the stream.
        self._olds: list[torch.Tensor | None] = []
        self._slotless = 0  # how many of them next_parameter() took
        # id(old sub-model or container) -> its first rebuilt version, see keep().
        self._built: dict[int, Any] = {}
        self._alive: list[Any] = []
        # Whether torch.compile is tracing this replace (the loss of diffprog.func.compile_step):
        # then object identities are not asked for (id() would make dynamo guard on these very
        # objects, recompiling for every new model; `is` between containers does not trace),
        # and tied parameters are found with `is`, which dynamo guards as the model's structure.
        self.traced = torch.compiler.is_compiling()

    @property
    def params(self) -> list[Any]:
        """The parameters this stream hands out, in order."""
        return self._params

    def substream(self, params: Iterable[torch.Tensor]) -> ParamStream:
        """A stream over ``params`` (a hand-written instance's own list) that shares this
        stream's record of rebuilt values (see :meth:`keep`).

        Why: a sub-model reachable both inside a hand-written instance and at another path
        must stay one object in the result (its state, BatchNorm's running statistics, stays
        shared), whichever of the two is rebuilt first.
        """
        # Of this stream's own type: a map's unchecked stream stays unchecked inside a nested
        # hand-written instance, a checking one stays checking.
        sub = type(self)(params)
        sub._built = self._built
        sub._alive = self._alive
        sub.traced = self.traced
        return sub

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
        self._slotless += 1
        return self._params[len(self._olds) - 1]  # type: ignore[no-any-return]

    def take(self, old: torch.Tensor) -> Any:
        """The replacement for the parameter slot holding ``old`` (the same again for a tie).

        It only records ``old``: :meth:`verify` checks shapes and dtypes afterwards, all at
        once, which costs less than a check per slot.

        Raises:
            ParameterCountError: the stream is exhausted.
        """
        if self.traced:
            return self._take_traced(old)
        memo = self._memo
        new = memo.get(id(old), _NOT_TAKEN)
        if new is _NOT_TAKEN:
            olds = self._olds
            if len(olds) == len(self._params):
                raise self._exhausted()
            new = memo[id(old)] = self._params[len(olds)]
            olds.append(old)
        return new

    def _take_traced(self, old: torch.Tensor) -> Any:
        # take() while traced (see __init__): a tie is found by `is` among the parameters
        # taken so far. Quadratic in the number of parameters, but it runs only while tracing.
        olds = self._olds
        for k, seen in enumerate(olds):
            if seen is old:
                return self._params[k]
        if len(olds) == len(self._params):
            raise self._exhausted()
        olds.append(old)
        return self._params[len(olds) - 1]

    def replace(self, value: T) -> T:
        """Rebuild ``value`` (any model or sub-model) with parameters read from this stream.

        Shapes and dtypes are checked by :meth:`verify` (``replace_parameters`` calls it).
        """
        from diffprog._nodes import replace_value  # the nodes use the stream: import late

        return replace_value(value, self)  # type: ignore[no-any-return]

    def keep(self, value: Any, rebuilt: T) -> T:
        """The version of ``value`` rebuilt first in this replace: ``rebuilt``, unless ``value``
        was met (and rebuilt) before, at another path.

        Every node hands what it rebuilt through here, so that a value reachable at several
        paths (a shared block) stays one object in the result, as in PyTorch, and its state
        (BatchNorm's running statistics) stays shared. Its parameters are the same at every
        path (the memo of :meth:`take`), so the versions built at later paths are equal to the
        first and are dropped.
        """
        if self.traced:
            # While traced (see __init__) the rebuilt model is only read by the loss; its tied
            # parameters stay tied (take), but a shared block is rebuilt once per path.
            return rebuilt
        first = self._built.setdefault(id(value), rebuilt)
        if first is rebuilt:
            # Keep the old value alive, so that its id, the key, cannot be reused by a
            # temporary during the replace.
            self._alive.append(value)
        return first  # type: ignore[no-any-return]

    def verify(self) -> None:
        """Check every replacement taken so far against the slot it filled.

        A replacement must have its slot's shape, dtype and device, except that a slot on the
        ``meta`` device (a shape-only skeleton) takes a replacement on any device: that is how
        a skeleton is filled with loaded parameters.

        Raises:
            ParameterTypeError: a replacement is not a tensor.
            ParameterShapeError: a replacement's shape, dtype or device differs from its slot's.
        """
        olds = self._olds
        news = self._params if len(olds) == len(self._params) else self._params[: len(olds)]
        # While traced the plain loop below runs (is_same_size returns no tensor, which
        # dynamo cannot trace); the shapes are known then, so it costs nothing at run time.
        if not self._slotless and not self.traced:
            # The usual case in C-level map()s, without a Python frame per parameter (and
            # is_same_size makes no torch.Size objects for the garbage collector to count).
            # Only a wrong replacement (not a tensor) raises: the loop below then names it.
            # A meta slot filled from a real device fails the device test here and is let
            # through by the loop (loading is not the hot path).
            try:
                if (
                    all(map(_same_size, news, olds))
                    and list(map(_dtype, news)) == list(map(_dtype, olds))
                    and list(map(_device, news)) == list(map(_device, olds))
                ):
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
_device = operator.attrgetter("device")
_same_size: Callable[[Any, Any], bool] = torch.Tensor.is_same_size


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
            "Pass the parameters in flatten_parameters order, with their shapes and dtypes "
            "(to convert a whole model, buffers included, use diffprog.to(model, dtype=...)).",
        )
    if new.device != old.device and old.device.type != "meta":
        raise ParameterShapeError(
            f"parameter #{index} is on device {new.device} but its slot is on {old.device}",
            "replace_parameters does not move a model (its buffers would stay behind): move "
            "the whole model first with diffprog.to(model, device=...), then replace.",
        )


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
