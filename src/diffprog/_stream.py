"""``ParamStream``: the parameters a replace consumes, Hasktorch's ``State [Parameter]``."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, TypeVar

import torch

from diffprog._errors import ParameterCountError, ParameterShapeError, ParameterTypeError
from diffprog._nodes import replace_value
from diffprog._signature import has_repeats

__all__ = ["CheckingStream", "OptimisticStream", "ParamStream"]

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

    __slots__ = ("_built", "_foreign", "_memo", "_next", "_olds", "_params", "_untracked")

    # Whether this stream assumes no ties (the generated code inlines its take()).
    _optimistic = False

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self._params: list[Any] = list(params)
        # id(old parameter) -> its replacement: a parameter reachable at several paths (tied
        # weights) consumes one entry and gets the same replacement at each of them.
        self._memo: dict[int, Any] = {}
        # The parameter each consumed entry replaced (None where next_parameter took it without
        # a slot), for verify(); its length is the position in the stream.
        self._olds: list[torch.Tensor | None] = []
        self._untracked = False
        # Whether a hand-written or pytree-registered instance rebuilt something: the new
        # model's slots may then hold other tensors than the ones given.
        self._foreign = False
        # id(old sub-model or container) -> (it, its rebuilt version): a layer object reachable
        # at several paths (a shared block) is rebuilt once, so it stays one object, and its
        # state (BatchNorm's running statistics) stays shared, as in PyTorch. The old value is
        # kept alive here so that its id, the key, cannot be reused by a temporary.
        self._built: dict[int, tuple[Any, Any]] = {}

    def _rebuilt(self, value: Any) -> Any:
        """The version of ``value`` rebuilt earlier in this replace (None: not yet).

        Nodes ask before rebuilding a container or sub-model and :meth:`_keep` what they
        rebuild, so a value met at several paths stays one object.
        """
        found = self._built.get(id(value))
        return None if found is None else found[1]

    def _keep(self, value: Any, rebuilt: T) -> T:
        """Remember ``rebuilt`` as the new ``value`` (see :meth:`_rebuilt`); return it."""
        self._built[id(value)] = (value, rebuilt)
        return rebuilt

    def _tied_so_far(self) -> bool:
        """Whether a parameter has filled two slots so far that this stream got wrong (never:
        a ParamStream handles ties; see :class:`OptimisticStream`)."""
        return False

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
        pos = len(self._olds)
        if pos >= len(self._params):
            raise self._exhausted()
        self._olds.append(None)  # no slot to check it against
        self._untracked = True
        return self._params[pos]  # type: ignore[no-any-return]

    def _exhausted(self) -> ParameterCountError:
        return ParameterCountError(
            f"ran out of parameters after {len(self._olds)}",
            "Give replace_parameters as many parameters as flatten_parameters returns.",
        )

    def replace(self, value: T) -> T:
        """Rebuild ``value`` (any model or sub-model) with parameters read from this stream.

        Shapes and dtypes are checked by :meth:`verify` (``replace_parameters`` calls it).
        """
        return replace_value(value, self)  # type: ignore[no-any-return]

    def take(self, old: torch.Tensor) -> Any:
        """The replacement for the parameter ``old`` (the same one again for a tie).

        The hot path of every replace: it only records ``old``; :meth:`verify` checks the
        replacements against their slots afterwards, all at once.
        """
        i = id(old)
        memo = self._memo
        new = memo.get(i)
        if new is None:
            olds = self._olds
            try:
                new = self._params[len(olds)]
            except IndexError:
                raise self._exhausted() from None
            memo[i] = new
            olds.append(old)
        return new

    def verify(self) -> None:
        """Check every replacement taken so far against the slot it filled.

        Raises:
            ParameterTypeError: a replacement is not a tensor.
            ParameterShapeError: a replacement's shape or dtype differs from its slot's.
        """
        olds = self._olds
        news = self._params[: len(olds)]
        if self._untracked:  # next_parameter() took some without a slot: check one by one
            for index, (new, old) in enumerate(zip(news, olds)):
                if old is not None:
                    _check(index, new, old)
            return
        # Fast path: map() over C-level accessors, no Python frame per item. Tensor.size
        # raises TypeError for a non-tensor, which the slow path below then names.
        try:
            same_sizes = list(map(_size, news)) == list(map(_size, olds))  # type: ignore[arg-type]
            if same_sizes and list(map(_dtype, news)) == list(map(_dtype, olds)):
                return
        except TypeError:
            pass
        for index, (new, old) in enumerate(zip(news, olds)):
            _check(index, new, old)  # type: ignore[arg-type]


_dtype = operator.attrgetter("dtype")
_size = torch.Tensor.size


class OptimisticStream(ParamStream):
    """A stream that assumes the model has no tied parameters, and so keeps no memo.

    ``replace_parameters`` runs it first: it is the fast path of every training step. When a
    parameter turns up twice (:meth:`has_ties`) or the stream runs out (``StopIteration``),
    the result is discarded and the replace runs again with a :class:`ParamStream`. The
    generated replace functions inline :meth:`take`: ``stream._next()``, then
    ``stream._olds.append(old)``.
    """

    __slots__ = ("_seen", "_seen_upto")  # for _tied_so_far(), set on first use
    _optimistic = True
    _seen: set[int]
    _seen_upto: int

    def __init__(self, params: list[Any]) -> None:  # no copy: replace_parameters owns it
        self._params = params
        self._next = iter(params).__next__
        self._olds = []  # no _memo and no _built: see _rebuilt()
        self._untracked = False
        self._foreign = False

    def _rebuilt(self, value: Any) -> Any:
        """Always None: this stream remembers nothing it rebuilt.

        It needs not. Every node returns a value unchanged unless a parameter inside it
        changed, so a value met at two paths that needs rebuilding holds a parameter met
        twice: a tie, which sends the replace to a :class:`ParamStream`, which remembers.
        """
        return None

    def _keep(self, value: Any, rebuilt: T) -> T:
        """``rebuilt``, remembered nowhere (see :meth:`_rebuilt`)."""
        return rebuilt

    def next_parameter(self) -> torch.nn.Parameter:
        """Consume and return the next parameter (see :meth:`ParamStream.next_parameter`)."""
        try:
            new = self._next()
        except StopIteration:
            raise self._exhausted() from None
        self._olds.append(None)
        self._untracked = True
        return new  # type: ignore[no-any-return]

    def take(self, old: torch.Tensor) -> Any:
        """The next parameter, for the slot ``old`` (``StopIteration`` when exhausted)."""
        new = self._next()
        self._olds.append(old)
        return new

    def has_ties(self) -> bool:
        """Whether some parameter filled two slots (a tie, which this stream cannot handle)."""
        return has_repeats(self._olds)

    def _tied_so_far(self) -> bool:
        """:meth:`has_ties` for the slots taken so far, in time linear over all calls.

        A hand-written instance asks before its own code runs: with a tie, this stream would
        hand it the wrong tensors.
        """
        try:
            seen, start = self._seen, self._seen_upto
        except AttributeError:
            seen, start = set(), 0
            self._seen = seen
        olds = self._olds
        for k in range(start, len(olds)):
            old = olds[k]
            if old is not None:  # None: taken by next_parameter(), without a slot
                if id(old) in seen:
                    return True
                seen.add(id(old))
        self._seen_upto = len(olds)
        return False


class CheckingStream(ParamStream):
    """A stream that checks each replacement as it is taken, so an error can name its path.

    Used to locate a problem :meth:`ParamStream.verify` found.
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
