"""Choosing parameters by path or predicate: per-parameter settings and freezing.

A *selection* picks parameters by their ``named_parameters`` path (glob patterns or regular
expressions) or by a predicate ``(path, param) -> bool``. Every optimizer's ``init`` takes

* ``overrides``: ``{selection: {hyper-parameter: value}}``, the parameters' own settings
  (torch.optim's parameter groups, chosen by name), resolved once at ``init``;
* ``freeze``: a selection of parameters that are not trained at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from diffprog import Frozen, named_parameters
from diffprog._filter import Filter, Selector, as_selector, leaf_places, select

__all__ = [
    "ParamGroup",
    "ParamSettings",
    "Selection",
    "Selector",
    "resolve_settings",
    "select",
]

Selection = Filter
"""What picks parameters: the core's filter language (``diffprog.Filter``), one implementation
for the optimizers and for ``diffprog.partition``/``freeze``: a glob pattern (``"*.bias"``), a
compiled regular expression (``re.compile(r"norm")``, matched with ``search``), a type
(``diffprog.nn.Linear``: the parameters inside such layers), a predicate
``(path, param) -> bool``, a :class:`Selector`, or a list of these (any of them)."""


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


def _parameters_with_paths(model: Any) -> list[tuple[str, torch.Tensor, tuple[Any, ...]]]:
    # A list of Parameters is a model like any other (a tie counts once, as flatten_parameters
    # does). A list holding plain tensors is an explicit list of the tensors to optimize with
    # step() directly: each entry is one slot. A frozen parameter (Frozen) is part of a model,
    # not such a tensor: a list of Parameters and Frozen ones is a model, and skips them.
    if (
        isinstance(model, (list, tuple))
        and all(isinstance(p, torch.Tensor) for p in model)
        and not all(isinstance(p, (torch.nn.Parameter, Frozen)) for p in model)
    ):
        return [(str(i), p, ()) for i, p in enumerate(model)]
    named = named_parameters(model)  # (refuses two parameters with the same name)
    # What encloses each parameter at its first path, for the type filters (dp.nn.Linear).
    enclosing: dict[int, tuple[Any, ...]] = {}
    for place in leaf_places(model):
        enclosing.setdefault(id(place.value), place.ancestors)
    return [(path, p, enclosing[id(p)]) for path, p in named]


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
    for i, (path, p, ancestors) in enumerate(named):
        key = tuple(j for j, (s, _) in enumerate(selectors) if s(path, p, ancestors))
        for j in key:
            used[j] = True
        if frozen_sel is not None and frozen_sel(path, p, ancestors):
            frozen.append(i)
        else:
            by_key.setdefault(key, []).append(i)
    for (selection, _), was_used in zip(pairs, used, strict=True):
        if not was_used:
            raise ValueError(
                f"the override for {selection!r} selects no parameter of the model; "
                f"its parameters are: {', '.join(path for path, _, _ in named) or '(none)'}."
            )
    if freeze is not None and not frozen:
        raise ValueError(
            f"freeze={freeze!r} selects no parameter of the model; its parameters are: "
            f"{', '.join(path for path, _, _ in named) or '(none)'}."
        )
    groups = []
    for key, indices in by_key.items():
        merged: dict[str, Any] = {}
        for j in key:
            merged.update(selectors[j][1])
        groups.append(ParamGroup(tuple(indices), tuple(merged.items())))
    settings = ParamSettings(len(named), tuple(groups), tuple(frozen))
    return settings, [p for _, p, _ in named]
