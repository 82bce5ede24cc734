"""How a pure optimizer declares its settings and state once: ``hyper()``, ``state()``.

A ``PureOptimizer`` subclass declares each hyper-parameter as a field with :func:`hyper`
(default, meaning, check) and each kind of state with :func:`state`. From these, this module
derives what used to be written by hand in each optimizer: ``init`` (keyword signature and
defaults, visible to ``inspect.signature``), its docstring, the validation, the names
``overrides`` may set, and the docs table (:func:`settings_table`). It also adds the fields
every optimizer has (``count``, ``param_counts``, ``settings``, ``donate``, ``lease``).
``_pure.py`` holds the step.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from diffprog.optim._select import ParamSettings

__all__ = [
    "TORCH_OPTIONS",
    "Check",
    "Declaration",
    "HyperParameter",
    "Lease",
    "add_common_fields",
    "betas_in",
    "declaration_of",
    "declare",
    "hyper",
    "non_negative",
    "pair_of_floats",
    "settings_table",
    "state",
]

_HYPER = "diffprog.optim.hyper"
_STATE = "diffprog.optim.state"

Check = Callable[[str, Any], None]
"""A hyper-parameter's check: ``check(name, value)`` raises ``ValueError`` (torch's words)."""


@dataclasses.dataclass(frozen=True)
class HyperParameter:
    """What :func:`hyper` declares about a field (kept in its ``metadata``)."""

    doc: str
    check: Check | None = None
    convert: Callable[[Any], Any] | None = None
    settable: bool = True


def hyper(
    default: Any,
    *,
    doc: str,
    check: Check | None = None,
    convert: Callable[[Any], Any] | None = None,
    settable: bool = True,
) -> Any:
    """Declare a hyper-parameter field of a :class:`PureOptimizer`: the one place it is written.

    ``init``'s keyword argument (same name and default), its validation, per-parameter
    ``overrides``, the ``repr`` and the docs table all come from this declaration, as torch's
    ``defaults = dict(...)`` is the one place of a ``torch.optim`` optimizer's settings.

    Args:
        default: the default (torch.optim's, for an optimizer torch has).
        doc: what it means, one phrase (the docs table and ``init``'s docstring show it).
        check: raises ``ValueError`` for an invalid value, with torch.optim's message;
            run at ``init`` on the value and on each group's override.
        convert: normalises the value ``init`` is given (e.g. betas to a tuple of floats).
        settable: ``False`` for a setting fixed by the class (AdamW's decoupled decay):
            neither ``init`` nor ``overrides`` take it.

    Returns:
        A ``dataclasses.field`` carrying the declaration.

    Example:
        >>> from diffprog.optim import PureOptimizer
        >>> class Step(PureOptimizer):
        ...     scale: float = hyper(1.0, doc="multiplies the step", check=non_negative)
        ...     def _update(self, hyper, lr, count, params, grads, state):
        ...         return list(torch._foreach_add(params, grads, alpha=-lr * hyper["scale"]))
        >>> list(inspect.signature(Step.init).parameters)
        ['model', 'scale', 'overrides', 'freeze', 'donate']
        >>> Step.init([torch.zeros(1)], scale=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: Invalid scale value: -1.0 (must be >= 0).
    """
    info = HyperParameter(doc, check, convert, settable)
    return dataclasses.field(default=default, metadata={_HYPER: info})


def state(*, doc: str) -> Any:
    """Declare a kind of optimizer state (a moment): one tuple, a tensor per trained parameter.

    Args:
        doc: what it holds (torch.optim's ``state[name]`` it matches, where there is one).

    Returns:
        A ``dataclasses.field``, empty by default (``init`` fills it with the zero state).
    """
    return dataclasses.field(default=(), metadata={_STATE: doc})


def non_negative(name: str, value: Any) -> None:
    """The check of a hyper-parameter that must be at least 0, in torch.optim's words.

    Example:
        >>> non_negative("eps", -1.0)
        Traceback (most recent call last):
        ...
        ValueError: Invalid epsilon value: -1.0 (must be >= 0).
    """
    if value < 0.0:
        label = "epsilon" if name == "eps" else name  # torch.optim's word
        raise ValueError(f"Invalid {label} value: {value} (must be >= 0).")


def pair_of_floats(betas: Sequence[Any]) -> tuple[Any, Any]:
    """``betas`` as a tuple of two floats (a list, or 0-dim tensors, as torch takes them).

    A tensor that requires grad is kept as it is (a hyper-parameter of a ``differentiable``
    optimizer, to be learned): ``float`` would cut its gradient silently.
    """
    b1, b2 = betas
    return (_float_unless_learned(b1), _float_unless_learned(b2))


def _float_unless_learned(value: Any) -> Any:
    if getattr(value, "requires_grad", False):
        return value
    return float(value)


def betas_in(upper: float, *, closed: bool) -> Check:
    """The check of ``betas``: each in ``[0, upper)`` (``closed``: ``[0, upper]``), torch's words.

    Example:
        >>> betas_in(1.0, closed=False)("betas", (0.9, 1.0))
        Traceback (most recent call last):
        ...
        ValueError: Invalid beta parameter at index 1: 1.0 (must be in [0, 1)).
    """
    bracket = "]" if closed else ")"

    def check(name: str, betas: Any) -> None:
        for i, b in enumerate(betas):
            if not (0.0 <= b <= upper if closed else 0.0 <= b < upper):
                raise ValueError(
                    f"Invalid beta parameter at index {i}: {b} (must be in [0, {upper:g}{bracket})."
                )

    return check


@dataclasses.dataclass(eq=False)
class Lease:
    """Who may update a donating optimizer's state in place: the optimizer that holds it.

    A step with ``donate=True`` marks its optimizer's lease ``spent`` before it writes into the
    state, and gives the optimizer it returns a fresh lease; a spent lease refuses to step
    again (its state now belongs to the newer optimizer). The one mutable part of an
    optimizer value, declared as its ``lease`` field so that it can be seen.
    """

    spent: bool = False


@dataclasses.dataclass(frozen=True)
class Declaration:
    """What a :class:`PureOptimizer` subclass declares, read from its fields once."""

    hyper: tuple[dataclasses.Field[Any], ...]
    state: tuple[str, ...]
    donates: bool
    torch_options: tuple[str, ...]

    @property
    def settable(self) -> tuple[str, ...]:
        """The hyper-parameters ``init`` and ``overrides`` take."""
        return tuple(f.name for f in self.hyper if f.metadata[_HYPER].settable)

    @property
    def fixed(self) -> tuple[tuple[str, Any], ...]:
        """``(name, value)`` of each hyper-parameter a class fixes (``settable=False``)."""
        return tuple((f.name, f.default) for f in self.hyper if not f.metadata[_HYPER].settable)

    def defaults(self) -> dict[str, Any]:
        """The declared default of every hyper-parameter."""
        return {f.name: f.default for f in self.hyper}

    def check(self, hyper: Mapping[str, Any]) -> None:
        """Run each hyper-parameter's declared check on its value in ``hyper``."""
        for f in self.hyper:
            check = f.metadata[_HYPER].check
            if check is not None:
                check(f.name, hyper[f.name])


_DECLARATIONS: dict[type, Declaration] = {}

# The fields every pure optimizer has, added to each subclass (see add_common_fields):
# (name, type, default), the first two after the hyper-parameters, the rest after the state.
_COMMON_BEFORE_STATE = (("count", int, 0), ("param_counts", tuple[int, ...], ()))
_COMMON_AFTER_STATE = (
    ("settings", ParamSettings | None, None),
    ("donate", bool, False),
    ("differentiable", bool, False),
    ("lease", Lease | None, None),
)

#: torch.optim options with no pure meaning, which ``init`` accepts where torch accepts them.
TORCH_OPTIONS = ("foreach", "capturable", "differentiable", "fused")


def declare(cls: Any, torch_options: tuple[str, ...]) -> None:
    """Read what the dataclass ``cls`` declares, and give it a derived ``init`` unless it
    writes its own (``torch_options``: the class keyword, else the base's)."""
    unknown = set(torch_options) - set(TORCH_OPTIONS)
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown torch_options {sorted(unknown)}")
    inherited = next((d.torch_options for b in cls.__mro__[1:] if (d := _DECLARATIONS.get(b))), ())
    fields = dataclasses.fields(cls)
    hyper = tuple(f for f in fields if _HYPER in f.metadata)
    # A switch that chooses something (ASGD's foreach) is a setting, not an ignored option.
    both = set(torch_options or inherited) & {f.name for f in hyper}
    if both:
        raise TypeError(
            f"{cls.__name__}: {sorted(both)} declared both as hyper() fields and as "
            "torch_options; an option that changes the numbers is a hyper() field alone"
        )
    _DECLARATIONS[cls] = Declaration(
        hyper=hyper,
        state=tuple(f.name for f in fields if _STATE in f.metadata),
        donates=any(f.name == "donate" for f in fields),
        torch_options=torch_options or inherited,
    )
    if "init" not in cls.__dict__:
        cls.init = _derived_init(cls)


def declaration_of(cls: type) -> Declaration:
    """What ``cls`` (a ``PureOptimizer`` subclass) declares."""
    return _DECLARATIONS[cls]


def add_common_fields(cls: type) -> None:
    """Declare ``count``, ``param_counts``, ``settings``, ``donate`` and ``lease`` on ``cls``
    (before it becomes a dataclass), where no base declares them yet: the hyper-parameters
    first, then ``count`` and ``param_counts``, the state, and the rest, so that the ``repr``
    reads settings, progress, state. A field the class declares itself (GD's ``donate`` as a
    ``ClassVar``) is left as it is."""
    if any("count" in getattr(base, "__dataclass_fields__", {}) for base in cls.__mro__[1:]):
        return
    own: dict[str, Any] = dict(inspect.get_annotations(cls))

    def is_state(name: str) -> bool:
        value = cls.__dict__.get(name)
        return isinstance(value, dataclasses.Field) and _STATE in value.metadata

    ordered = {k: v for k, v in own.items() if not is_state(k)}
    ordered.update(_common(cls, own, _COMMON_BEFORE_STATE))
    ordered.update({k: v for k, v in own.items() if is_state(k)})
    ordered.update(_common(cls, own, _COMMON_AFTER_STATE))
    cls.__annotations__ = ordered


def _common(
    cls: type, own: Mapping[str, Any], common: tuple[tuple[str, Any, Any], ...]
) -> dict[str, Any]:
    """The annotations of the ``common`` fields ``cls`` does not declare itself, their defaults
    set on ``cls``. A class whose ``donate`` is a ``ClassVar`` (GD: no state to donate) gets no
    ``lease`` field, only ``lease = None``."""
    added: dict[str, Any] = {}
    for name, kind, default in common:
        if name == "lease" and "ClassVar" in str(own.get("donate", "")):
            setattr(cls, name, None)
        elif name not in own:
            added[name] = kind
            setattr(cls, name, default)
    return added


def _derived_init(cls: Any) -> classmethod[Any, Any, Any]:
    """``cls.init``, its keyword arguments the declared hyper-parameters with their defaults
    (and ``overrides``, ``freeze``, ``donate``, and the accepted torch options)."""
    declared = _DECLARATIONS[cls]
    keyword = inspect.Parameter.KEYWORD_ONLY
    settable = [f for f in declared.hyper if f.metadata[_HYPER].settable]
    params = [
        inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Any"),
        *(
            inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type)
            for f in settable
        ),
        inspect.Parameter("overrides", keyword, default=(), annotation="Overrides"),
        inspect.Parameter("freeze", keyword, default=None, annotation="Selection | None"),
    ]
    if declared.donates:
        params.append(inspect.Parameter("donate", keyword, default=False, annotation="bool"))
    for option in declared.torch_options:
        default = False if option in ("capturable", "differentiable") else None
        annotation = "bool" if default is False else "bool | None"
        params.append(inspect.Parameter(option, keyword, default=default, annotation=annotation))
    signature = inspect.Signature(params, return_annotation=cls.__name__)
    fixed = {f.name: f.default for f in declared.hyper if not f.metadata[_HYPER].settable}

    def init(cls: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(cls, *args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        options = {k: given.pop(k) for k in declared.torch_options}
        _check_torch_options(cls.__name__, options)
        settings: dict[str, Any] = dict(fixed)
        for f in settable:
            convert = f.metadata[_HYPER].convert
            value = given[f.name]
            settings[f.name] = value if convert is None else convert(value)
        return cls._build(
            given["model"],
            settings,
            given["overrides"],
            given["freeze"],
            given.get("donate", False),
            differentiable=bool(options.get("differentiable", False)),
        )

    init.__signature__ = signature  # type: ignore[attr-defined]
    init.__name__ = "init"
    init.__qualname__ = f"{cls.__qualname__}.init"
    init.__module__ = cls.__module__
    init.__doc__ = _init_doc(cls, settable)
    return classmethod(init)


def _check_torch_options(owner: str, options: Mapping[str, Any]) -> None:
    """Check the torch.optim implementation switches ``init`` accepts, as torch checks them.

    They choose nothing in a pure step, which always runs torch's fused kernel where the device
    has one, else ``_foreach_`` operations in torch's multi-tensor order, on fresh tensors (so
    ``capturable``'s CUDA-graph bookkeeping has nothing to do). ``differentiable`` does choose
    something (a step with autograd on, see ``PureOptimizer``): ``init`` hands it to the
    optimizer, which refuses it where it has no differentiable step. (A switch that does
    choose something, ASGD's and Adafactor's ``foreach``, is a :func:`hyper` field.)

    Args:
        owner: the optimizer's name, for the messages.
        options: the switches ``init`` was given, of :data:`TORCH_OPTIONS`.

    Raises:
        RuntimeError: ``fused`` with ``differentiable`` or ``foreach`` (torch's own errors, in
            torch's order).

    Example:
        >>> _check_torch_options("SGD", {"foreach": True, "fused": False})
        >>> _check_torch_options("SGD", {"foreach": True, "fused": True})
        Traceback (most recent call last):
        ...
        RuntimeError: `fused` and `foreach` cannot be `True` together.
    """
    differentiable = options.get("differentiable", False)
    if options.get("fused"):
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if options.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def _init_doc(cls: Any, settable: list[dataclasses.Field[Any]]) -> str:
    """``init``'s docstring, from the declarations."""
    declared = _DECLARATIONS[cls]
    lines = [
        f"{cls.__name__} for ``model``, its state at zero (derived from the declared fields).",
        "",
        "Args:",
        "    model: the model, or a list of its parameters.",
    ]
    lines += [
        f"    {f.name}: {f.metadata[_HYPER].doc} (default ``{f.default!r}``)." for f in settable
    ]
    lines += [
        "    overrides: per-parameter settings, ``{selection: {name: value}}`` (any of the",
        "        above, and ``lr_scale``).",
        "    freeze: the parameters not to train (no update, no state).",
    ]
    if declared.donates:
        lines.append("    donate: let each step reuse this optimizer's state (see ``Adam``).")
    if declared.torch_options:
        names = ", ".join(f"``{o}``" for o in declared.torch_options)
        lines.append(
            f"    {names}: accepted as torch.optim accepts them (docs/optim.md);"
            " ``differentiable=True`` makes the step differentiable where supported."
        )
    lines += [
        "",
        "Returns:",
        "    The optimizer.",
        "",
        "Raises:",
        "    ValueError: a hyper-parameter is out of range (torch.optim's message), or a",
        "        selection matches nothing.",
        "    TypeError: an unknown keyword argument.",
    ]
    return "\n".join(lines)


def settings_table(cls: Any) -> str:
    """The Markdown table of ``cls``'s hyper-parameters: name, default, meaning (docs/optim.md).

    Example:
        >>> from diffprog.optim import Lion
        >>> print(settings_table(Lion))
        | setting | default | meaning |
        |---|---|---|
        | `betas` | `(0.9, 0.99)` | the interpolation factors of the update and of the momentum |
        | `weight_decay` | `0.0` | decoupled weight decay |
        | `maximize` | `False` | ascend instead of descend |
    """
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for f in _DECLARATIONS[cls].hyper:
        if f.metadata[_HYPER].settable:
            rows.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata[_HYPER].doc} |")
    return "\n".join(rows)
