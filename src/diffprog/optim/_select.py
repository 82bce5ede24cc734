"""Choosing parameters by path or predicate: per-parameter settings and freezing.

A *selection* picks parameters by their ``named_parameters`` path (glob patterns or regular
expressions) or by a predicate ``(path, param) -> bool``. Every optimizer's ``init`` takes

* ``overrides``: ``{selection: {hyper-parameter: value}}``, the parameters' own settings
  (torch.optim's parameter groups, chosen by name), resolved once at ``init``;
* ``freeze``: a selection of parameters that are not trained at all.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch

from diffprog import named_parameters

__all__ = [
    "ParamGroup",
    "ParamSettings",
    "Selection",
    "Selector",
    "resolve_settings",
    "select",
]

Predicate = Callable[[str, torch.Tensor], bool]

Selection = Union[str, "re.Pattern[str]", "Selector", Predicate, Sequence[Any]]
"""What picks parameters: a glob pattern (``"*.bias"``), a compiled regular expression
(``re.compile(r"norm")``, matched with ``search``), a predicate ``(path, param) -> bool``, a
:class:`Selector`, or a list of these (any of them)."""


@dataclasses.dataclass(frozen=True)
class Selector:
    """A parameter selection, combinable with ``|``, ``&`` and ``~``; build it with :func:`select`.

    Example:
        >>> no_decay = select("*.bias") | select(where=lambda path, p: p.ndim < 2)
        >>> no_decay("head.bias", torch.zeros(3)), no_decay("head.weight", torch.zeros(3, 3))
        (True, False)
    """

    patterns: tuple[str | re.Pattern[str], ...] = ()
    where: Predicate | None = None
    op: str = "any"
    parts: tuple[Selector, ...] = ()

    def __call__(self, path: str, param: torch.Tensor) -> bool:
        """Whether the parameter at ``path`` is selected."""
        if self.op == "or":
            return any(part(path, param) for part in self.parts)
        if self.op == "and":
            return all(part(path, param) for part in self.parts)
        if self.op == "not":
            return not self.parts[0](path, param)
        for pattern in self.patterns:
            if isinstance(pattern, str):
                if fnmatch.fnmatchcase(path, pattern):
                    return True
            elif pattern.search(path):
                return True
        return self.where is not None and bool(self.where(path, param))

    def __or__(self, other: Selection) -> Selector:
        return Selector(op="or", parts=(self, as_selector(other)))

    def __and__(self, other: Selection) -> Selector:
        return Selector(op="and", parts=(self, as_selector(other)))

    def __invert__(self) -> Selector:
        return Selector(op="not", parts=(self,))


def select(*patterns: str | re.Pattern[str], where: Predicate | None = None) -> Selector:
    """Select the parameters whose path matches any of ``patterns``, or for which ``where`` holds.

    Paths are ``diffprog.named_parameters`` paths (torch ``state_dict`` keys, e.g.
    ``layers.0.bias``). A string is a glob pattern matched against the whole path (``*`` also
    crosses dots: ``"*.bias"`` is every bias, ``"encoder.*"`` everything under ``encoder``); a
    compiled regular expression is matched with ``search``.

    Args:
        *patterns: glob patterns and compiled regular expressions.
        where: a predicate ``(path, param) -> bool``.

    Returns:
        The selector.

    Raises:
        TypeError: a pattern is neither a string nor a compiled regular expression.

    Example:
        >>> s = select("*.bias", re.compile(r"(^|\\.)norm"))
        >>> [s(path, torch.zeros(1)) for path in ["0.bias", "norm.weight", "0.weight"]]
        [True, True, False]
    """
    for p in patterns:
        if not isinstance(p, (str, re.Pattern)):
            raise TypeError(
                f"select takes glob strings and compiled regular expressions, got "
                f"{type(p).__name__}; pass a predicate as where=..."
            )
    return Selector(tuple(patterns), where)


def as_selector(selection: Selection) -> Selector:
    """Turn any :data:`Selection` into a :class:`Selector`."""
    if isinstance(selection, Selector):
        return selection
    if isinstance(selection, (str, re.Pattern)):
        return Selector((selection,))
    if callable(selection):
        return Selector(where=selection)
    if isinstance(selection, Iterable):
        parts = tuple(as_selector(s) for s in selection)
        return Selector(op="or", parts=parts)
    raise TypeError(
        f"cannot select parameters with a {type(selection).__name__}: use a glob string, a "
        "compiled regex, a predicate (path, param) -> bool, or diffprog.optim.select(...)."
    )


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """Parameters (by position in ``flatten_parameters`` order) sharing their settings.

    Attributes:
        indices: the positions of the parameters.
        overrides: the settings that differ from the optimizer's own fields, as
            ``(name, value)`` pairs.
    """

    indices: tuple[int, ...]
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class ParamSettings:
    """Which parameters an optimizer trains, and with which settings: built by ``init``.

    Attributes:
        num_params: how many parameters the model has (trained or not).
        groups: the trained parameters, grouped by their settings.
        frozen: the positions of the frozen parameters (no update, no state).
    """

    num_params: int
    groups: tuple[ParamGroup, ...]
    frozen: tuple[int, ...] = ()

    @property
    def trainable(self) -> tuple[bool, ...]:
        """For each parameter, whether it is trained."""
        frozen = set(self.frozen)
        return tuple(i not in frozen for i in range(self.num_params))

    @property
    def is_plain(self) -> bool:
        """True when every parameter is trained with the optimizer's own settings."""
        return not self.frozen and len(self.groups) == 1 and not self.groups[0].overrides


def _parameters_with_paths(model: Any) -> list[tuple[str, torch.Tensor]]:
    # A list of Parameters is a model like any other (a tie counts once, as flatten_parameters
    # does). A list holding plain tensors is an explicit list of the tensors to optimize with
    # step() directly: each entry is one slot.
    if (
        isinstance(model, (list, tuple))
        and all(isinstance(p, torch.Tensor) for p in model)
        and not all(isinstance(p, torch.nn.Parameter) for p in model)
    ):
        return [(str(i), p) for i, p in enumerate(model)]
    return list(named_parameters(model))


def resolve_settings(
    model: Any,
    overrides: Mapping[Any, Mapping[str, Any]] | Iterable[tuple[Any, Mapping[str, Any]]],
    freeze: Selection | None,
    known: Sequence[str],
    owner: str,
) -> tuple[ParamSettings, list[torch.Tensor]]:
    """Resolve selections against ``model`` into :class:`ParamSettings`.

    Args:
        model: a model, or a list of parameters (named ``"0"``, ``"1"``, ...).
        overrides: ``{selection: settings}`` or ``[(selection, settings), ...]``; a parameter
            selected by several gets all their settings, later ones winning.
        freeze: the parameters not to train.
        known: the setting names the optimizer accepts.
        owner: the optimizer's name, for messages.

    Returns:
        The settings and the parameters, in ``flatten_parameters`` order.

    Raises:
        ValueError: an unknown setting name, a negative ``lr_scale``, or a selection that
            matches no parameter.
    """
    named = _parameters_with_paths(model)
    pairs = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    selectors: list[tuple[Selector, dict[str, Any]]] = []
    for selection, settings in pairs:
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(
                f"{owner} has no per-parameter setting {', '.join(unknown)}; the settings it "
                f"takes are: {', '.join(known)}."
            )
        scale = settings.get("lr_scale", 1.0)
        if not scale >= 0.0:  # it multiplies the learning rate, which must not be negative
            raise ValueError(f"Invalid learning rate scale: {scale} (for {selection!r}).")
        selectors.append((as_selector(selection), dict(settings)))
    frozen_sel = None if freeze is None else as_selector(freeze)
    used = [False] * len(selectors)
    frozen: list[int] = []
    by_key: dict[tuple[int, ...], list[int]] = {}
    for i, (path, p) in enumerate(named):
        key = tuple(j for j, (s, _) in enumerate(selectors) if s(path, p))
        for j in key:
            used[j] = True
        if frozen_sel is not None and frozen_sel(path, p):
            frozen.append(i)
        else:
            by_key.setdefault(key, []).append(i)
    for (selection, _), was_used in zip(pairs, used, strict=True):
        if not was_used:
            raise ValueError(
                f"the override for {selection!r} selects no parameter of the model; "
                f"its parameters are: {', '.join(path for path, _ in named) or '(none)'}."
            )
    if freeze is not None and not frozen:
        raise ValueError(
            f"freeze={freeze!r} selects no parameter of the model; its parameters are: "
            f"{', '.join(path for path, _ in named) or '(none)'}."
        )
    groups = []
    for key, indices in by_key.items():
        merged: dict[str, Any] = {}
        for j in key:
            merged.update(selectors[j][1])
        groups.append(ParamGroup(tuple(indices), tuple(merged.items())))
    settings = ParamSettings(len(named), tuple(groups), tuple(frozen))
    return settings, [p for _, p in named]
