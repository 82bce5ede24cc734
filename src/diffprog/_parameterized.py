"""``Parameterized``: the base class whose one declaration derives the whole interface."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from typing_extensions import Self, dataclass_transform

from diffprog._errors import HiddenParameterError, InstanceError
from diffprog._layer_fields import install_check
from diffprog._nodes import INLINE, fields_node, scan_hidden, unique
from diffprog._pytree import register_pytree
from diffprog._repr import tree_repr
from diffprog._stream import ParamStream

__all__ = ["Parameterized", "field"]

_DATACLASS_OPTIONS = {"init", "order", "unsafe_hash", "match_args", "kw_only"}


def field(*, inline: bool = False, **kwargs: Any) -> Any:
    """A Parameterized field with options: ``dataclasses.field`` plus ``inline``.

    Args:
        inline: leave this field's name out of ``named_parameters``/``state_dict`` paths, so a
            container field reads like the container itself: ``Sequential``'s ``layers`` field
            gives ``0.weight`` as ``torch.nn.Sequential`` does, not ``layers.0.weight``.
        **kwargs: ``default``, ``default_factory``, ``init``, ``repr``, ``kw_only``, ``metadata``
            as for ``dataclasses.field``.

    Returns:
        The field specifier.

    Example:
        >>> class Stack(Parameterized):
        ...     layers: tuple = field(inline=True, default=())
        >>> p = make_independent(torch.zeros(1))
        >>> [name for name, _ in named_parameters(Stack(({"w": p},)))]
        ['0.w']
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    if inline:
        metadata[INLINE] = True
    return dataclasses.field(metadata=metadata, **kwargs)


@dataclass_transform(
    frozen_default=True, eq_default=False, field_specifiers=(dataclasses.field, field)
)
class Parameterized:
    """Base class of models: subclassing it is the whole declaration.

    The Python counterpart of ``instance Parameterized M`` with Hasktorch's generic deriving:
    a subclass with annotated fields becomes a frozen (immutable) dataclass, and
    ``flatten_parameters``/``replace_parameters`` are derived from its fields, in declaration
    order. Fields may hold Parameters, constant tensors, other Parameterized values,
    containers of them, and anything static (numbers, strings, functions, dtypes...).

    To write an instance by hand instead (as Hasktorch's RNN examples do), define both
    ``flatten_parameters(self) -> list[Parameter]`` and
    ``replace_own_parameters(self, stream) -> Self``.

    Equality and hashing are by identity (models hold tensors, which have no single truth
    value). Dataclass options may be passed as class keywords:
    ``class M(Parameterized, kw_only=True)``.

    Example:
        >>> class Affine(Parameterized):
        ...     scale: Parameter
        ...     shift: Parameter
        ...     def __call__(self, x):
        ...         return x * self.scale + self.shift
        >>> m = Affine(make_independent(torch.ones(3)), make_independent(torch.zeros(3)))
        >>> m
        Affine(scale=f32[3], shift=f32[3])
        >>> [p.shape for p in flatten_parameters(m)]
        [torch.Size([3]), torch.Size([3])]
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _DATACLASS_OPTIONS}
        super().__init_subclass__(**kwargs)
        hand = tuple(
            not getattr(getattr(cls, name), "__diffprog_default__", False)
            for name in ("flatten_parameters", "replace_own_parameters")
        )
        if any(hand) and not all(hand):
            have, lack = (
                ("flatten_parameters", "replace_own_parameters")
                if hand[0]
                else ("replace_own_parameters", "flatten_parameters")
            )
            raise InstanceError(
                f"{cls.__qualname__} defines {have} but not {lack}",
                "A hand-written instance needs both methods; delete both to derive them.",
            )
        dataclasses.dataclass(cls, frozen=True, eq=False, repr=False, **options)
        install_check(cls)  # a spec where a layer belongs is refused at construction
        _refuse_parameters_outside_fields(cls)
        # torch.func, torch.compile and torch.export read torch's pytree registry.
        register_pytree(cls)

    def flatten_parameters(self) -> list[Any]:
        """This value's parameters, depth first in field order (the derived default).

        Prefer the free function ``diffprog.flatten_parameters(value)``, which works on any
        value and handles errors and cycles; this method is what a subclass overrides for a
        hand-written instance.
        """
        out: list[Any] = []
        fields_node(type(self)).flatten(self, out)
        return unique(out)

    def replace_own_parameters(self, stream: ParamStream) -> Self:
        """Rebuild this value reading its parameters from ``stream`` (the derived default)."""
        return fields_node(type(self)).replace(self, stream)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return tree_repr(self)


def _refuse_parameters_outside_fields(cls: type) -> None:
    """Make construction refuse a Parameter that ``__post_init__`` stores outside the fields.

    Such an attribute (a cache, a derived tensor) is neither flattened nor replaced, so a
    Parameter there would silently not be trained. Only a class with a ``__post_init__`` can
    have one (the value is frozen), so only such a class pays for the check.
    """
    init = vars(cls).get("__init__")
    if init is None or not any("__post_init__" in vars(c) for c in cls.__mro__):
        return
    names = frozenset(f.name for f in dataclasses.fields(cls))

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for name, value in self.__dict__.items():
            if name not in names:
                found = scan_hidden(value)
                if found is not None:
                    path, what = found
                    error = HiddenParameterError(
                        f"{what} in attribute {name!r}, which is not a field",
                        "Declare it as a field (field(init=False) if __post_init__ computes "
                        "it), so that it is flattened and replaced like the others.",
                    )
                    for key in reversed([("attr", name), *path]):
                        error.push(*key)
                    error.root = type(self).__name__
                    raise error

    type.__setattr__(cls, "__init__", __init__)


Parameterized.flatten_parameters.__diffprog_default__ = True  # type: ignore[attr-defined]
Parameterized.replace_own_parameters.__diffprog_default__ = True  # type: ignore[attr-defined]
