"""Slot signatures: the shapes and dtypes of a model's parameter slots, remembered per model.

``replace_parameters`` checks every new parameter against the shape and dtype of the slot it
fills. Reading a tensor's shape or dtype goes through torch's Python bindings (about 100 ns
each), so reading both sides costs as much as the rebuild itself. But the slots of a model are
the new parameters of the replace that built it, whose shapes and dtypes that replace has
just read. So each replace remembers them in the model it returns (and, on a miss, in the
model it was given), and the next replace of that model reads only the new side: a training
loop reads one side per step instead of two.

The signature lives in a slot of the model (:class:`Signed`, a base of ``Parameterized``), so
it dies with the model. It is used only if the slot tensors met now are the very objects it
remembers (compared by identity; it holds them, so no id can be reused meanwhile): a list
inside the model that was edited since, or a tensor that was swapped, is a miss, read afresh
and remembered anew. No replace, copy or pickle carries it to another object. Values other
than ``Parameterized`` ones (tuples, lists, dicts) never remember one, nor does a model rebuilt
by a hand-written or pytree-registered instance (whose slots may hold other tensors than the
ones given).

The contract (docs/core.md, "Speed"): a parameter's shape and dtype are part of the model
value. A slot tensor changed in place (``.data =``, ``set_``, ``resize_``) is checked against
its shape as built; a replacement that fits its shape as it is now still passes, since a
mismatch with the memory only sends the replace to the slow path, which reads both sides.
"""

from __future__ import annotations

import contextlib
import copyreg
import operator
from typing import Any

import torch

__all__ = ["Signed", "check_signatures", "has_repeats"]


class Signed:
    """The base of values that remember the signature of their parameter slots."""

    __slots__ = ("__dict__", "__diffprog_signature__", "__weakref__")

    def __getstate__(self) -> Any:
        # The state the class would give without this base (a mixin's own __getstate__, or
        # object's default), less the signature, which copy and pickle would otherwise restore
        # (through the frozen __setattr__) into an object it does not fit.
        parent = getattr(super(), "__getstate__", None)
        if parent is not None:  # Python >= 3.11 always has object.__getstate__
            state = parent()
        else:
            slots = {}
            for name in copyreg._slotnames(type(self)):  # type: ignore[attr-defined]
                with contextlib.suppress(AttributeError):  # AttributeError: never set
                    slots[name] = object.__getattribute__(self, name)
            state = (self.__dict__, slots) if slots else self.__dict__
        if (
            isinstance(state, tuple)
            and len(state) == 2
            and isinstance(state[1], dict)
            and "__diffprog_signature__" in state[1]
        ):
            slots = {k: v for k, v in state[1].items() if k != "__diffprog_signature__"}
            state = (state[0], slots) if slots else state[0]
        return state


_SLOT = Signed.__dict__["__diffprog_signature__"]
_read = _SLOT.__get__
_is = operator.is_
_size = torch.Tensor.size
_dtype = operator.attrgetter("dtype")

# A signature is a list (the cheapest object to make, and made at every step):
# [slot tensors (one per slot, a tie repeats), their sizes, their dtypes, whether a tensor
# fills two slots (None: not known yet)].
SLOTS, SIZES, DTYPES, TIED = range(4)


def has_repeats(items: list[Any]) -> bool:
    """Whether an object appears twice in ``items`` (by identity): a tie, among slots."""
    return len(set(map(id, items))) != len(items)


def check_signatures(
    value: Any, new: Any, olds: list[Any], news: list[Any], news_in_slots: bool
) -> bool:
    """Whether ``news`` may fill the slots ``olds`` of ``value`` as they did to build ``new``:
    no tensor fills two slots (looked at only if not known) and every new tensor has its
    slot's shape and dtype. Remembers what it read in ``value``, and in ``new`` if
    ``news_in_slots`` (the slots of ``new`` hold exactly ``news``: no hand-written or
    pytree-registered instance rebuilt anything).

    False means: look closer (a tie, a non-tensor, a wrong shape or dtype).
    """
    known: list[Any] | None = None
    if isinstance(value, Signed):
        try:  # the slot itself: a class's own __getattr__ must not be asked for it
            known = _read(value, Signed)
        except AttributeError:  # never set
            known = None
    if known is not None and (
        len(known[SLOTS]) != len(olds) or not all(map(_is, known[SLOTS], olds))
    ):
        known = None  # the slots changed since: read both sides
    tied = None if known is None else known[TIED]
    if tied is None:
        tied = has_repeats(olds)
        if known is not None:
            known[TIED] = tied
    if tied:
        return False
    try:
        sizes = list(map(_size, news))
        dtypes = list(map(_dtype, news))
    except (TypeError, AttributeError):  # not a tensor
        return False
    if known is None:
        known = [olds, list(map(_size, olds)), list(map(_dtype, olds)), False]
        if sizes != known[SIZES] or dtypes != known[DTYPES]:
            return False
        if isinstance(value, Signed):
            _SLOT.__set__(value, known)
    elif sizes != known[SIZES] or dtypes != known[DTYPES]:
        return False
    if news_in_slots and new is not value and isinstance(new, Signed):
        _SLOT.__set__(new, [news, sizes, dtypes, None])
    return True
