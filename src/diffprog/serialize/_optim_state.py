"""A pure optimizer's state by parameter path, and to and from ``torch.optim`` state dicts.

Two forms of one thing:

* :func:`optimizer_state` / :func:`load_optimizer_state`: diffprog's own form, what
  checkpoints store. Each state tensor is keyed ``"<kind>.<parameter path>"``
  (``exp_avg.layers.0.weight``: torch.optim's state name, then the model's ``state_dict``
  key of the parameter), so that it reads, and loads, by name rather than by position; the
  rest (class, settings, step counts) is JSON-able metadata.
* :func:`optimizer_state_dict` / :func:`load_optimizer_state_dict`: ``torch.optim``'s own
  ``state_dict()`` format, to move training between ``torch.optim.X`` and diffprog's pure
  ``X`` mid-run.

Only the public API of :mod:`diffprog.optim` is used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from diffprog import flatten_parameters, named_parameters
from diffprog.optim import (
    ASGD,
    GD,
    GDM,
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    Chain,
    ClipGradNorm,
    LearningRate,
    Lease,
    NAdam,
    ParamGroup,
    ParamSettings,
    PureOptimizer,
    RAdam,
    RMSprop,
    Rprop,
    learning_rate_at,
)
from diffprog.serialize._errors import LoadError

__all__ = [
    "OptimizerState",
    "OptimizerStateError",
    "load_optimizer_state",
    "load_optimizer_state_dict",
    "optimizer_state",
    "optimizer_state_dict",
]

OptT = TypeVar("OptT")


class OptimizerStateError(LoadError):
    """Optimizer state that does not fit the optimizer or the model it is loaded into (a
    :class:`LoadError`: nothing was loaded)."""


@dataclasses.dataclass(frozen=True)
class OptimizerState:
    """A pure optimizer's state, split for saving: tensors by name, the rest JSON-able.

    Attributes:
        tensors: ``{"<kind>.<parameter path>": tensor}``, e.g. ``exp_avg.layers.0.weight``
            (torch.optim's name of the state, then the ``state_dict`` key of its parameter). The
            tensors are the optimizer's own, as ``torch.optim``'s ``state_dict()`` hands out
            its own: clone them to keep a copy that a donating optimizer cannot overwrite.
        meta: the class, its hyper-parameters, the step counts, the parameter groups (by
            path) and which parameter has which state: JSON-able (``json.dumps`` takes it).
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


# --- diffprog's own form: by parameter path ------------------------------------------------


def optimizer_state(optimizer: Any, model: Any) -> OptimizerState:
    """The state of a pure optimizer (or a ``chain``/``ClipGradNorm`` around one) by path.

    Args:
        optimizer: a pure optimizer (``Adam``, ``GD``, ...), or a ``Chain`` /
            ``ClipGradNorm`` around one (their transforms hold no state: the inner
            optimizer's is saved, and the wrapper's class name is checked on loading).
        model: the model it trains (the names of the state come from its parameters).

    Returns:
        The :class:`OptimizerState`.

    Raises:
        OptimizerStateError: the optimizer was built for another number of parameters.
        TypeError: it is not a pure optimizer (a ``TorchOptimizer``'s state is
            ``opt.state_dict()``).

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import Adam
        >>> model = sample(LinearSpec(2, 1))
        >>> sorted(optimizer_state(Adam.init(model), model).tensors)
        ['exp_avg.bias', 'exp_avg.weight', 'exp_avg_sq.bias', 'exp_avg_sq.weight']
    """
    paths = _paths(model)
    return _state_of(optimizer, paths)


def load_optimizer_state(
    optimizer: OptT, model: Any, state: OptimizerState, *, source: str = ""
) -> OptT:
    """``optimizer`` (the skeleton: built with ``init`` for ``model``) with the saved state.

    Everything is checked before anything is built: the class, the hyper-parameters and the
    parameter groups must be the skeleton's (a differing setting is refused, not adopted:
    build the skeleton with the saved settings), every state tensor must be there with the
    skeleton's shape, and no unknown tensor may be. Tensors are moved to the skeleton's device
    (kept where they are for a skeleton on ``meta``) and dtype. The skeleton is not changed.

    Args:
        optimizer: the skeleton, e.g. ``Adam.init(model, weight_decay=0.1)``.
        model: the model, whose parameter paths name the state.
        state: what :func:`optimizer_state` returned (or a checkpoint holds).
        source: where the state comes from (a file name), for the messages.

    Returns:
        The optimizer with the saved step counts and state.

    Raises:
        OptimizerStateError: anything that does not fit, naming the setting or the keys.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import Adam
        >>> model = sample(LinearSpec(2, 1))
        >>> opt = Adam.init(model)
        >>> new, opt = opt.step(0.1, [torch.ones(1, 2), torch.ones(1)], flatten_parameters(model))
        >>> load_optimizer_state(Adam.init(model), model, optimizer_state(opt, model)).count
        1
    """
    paths = _paths(model)
    where = f" in {source}" if source else ""
    loaded: OptT = _load(optimizer, paths, state.tensors, state.meta, where, set(state.tensors))
    return loaded


def _paths(model: Any) -> list[str]:
    return [name for name, _ in named_parameters(model)]


def wrapped(optimizer: Any) -> Any | None:
    """The optimizer a ``Chain`` or ``ClipGradNorm`` wraps (None for any other value)."""
    return optimizer.inner if isinstance(optimizer, (Chain, ClipGradNorm)) else None


def _state_of(optimizer: Any, paths: list[str]) -> OptimizerState:
    inner = wrapped(optimizer)
    if inner is not None:
        got = _state_of(inner, paths)
        return OptimizerState(got.tensors, {"class": type(optimizer).__name__, "inner": got.meta})
    if not isinstance(optimizer, PureOptimizer):
        raise TypeError(
            f"{type(optimizer).__name__} is not a pure optimizer: its state is not saved by "
            "path. A TorchOptimizer's is opt.state_dict() (save_checkpoint takes either); a "
            "DataParallel's is its inner optimizer's: diffprog.distributed.save_checkpoint "
            "saves it (or pass optimizer.inner)."
        )
    settings = _settings_for(optimizer, len(paths))
    declared = type(optimizer).declaration()
    tensors: dict[str, torch.Tensor] = {}
    held: dict[str, list[str]] = {}
    for kind in declared.state:
        values = getattr(optimizer, kind)
        if not values:
            continue
        held[kind] = []
        for path, value in zip(paths, values, strict=True):
            if value is not None:
                tensors[f"{kind}.{path}"] = value.detach()
                held[kind].append(path)
    counts = optimizer.param_counts
    meta = {
        "class": type(optimizer).__name__,
        "hyper": {f.name: _jsonable(getattr(optimizer, f.name)) for f in declared.hyper},
        "count": optimizer.count,
        "param_counts": dict(zip(paths, counts, strict=True)) if counts else None,
        "groups": None if optimizer.settings is None else _groups_meta(settings, paths),
        "state": held,
    }
    return OptimizerState(tensors, meta)


def _settings_for(optimizer: PureOptimizer, n: int) -> ParamSettings:
    """The optimizer's settings (one plain group when built without ``init``), checked
    against the model's ``n`` parameters."""
    settings = optimizer.settings
    if settings is None:
        return ParamSettings(n, (ParamGroup(tuple(range(n))),))
    if settings.num_params != n:
        raise OptimizerStateError(
            f"this {type(optimizer).__name__} was built for {settings.num_params} parameters "
            f"but the model has {n}: pass the model it trains."
        )
    return settings


def _groups_meta(settings: ParamSettings, paths: list[str]) -> dict[str, Any]:
    return {
        "groups": [
            {"params": [paths[i] for i in g.indices], "overrides": _jsonable(dict(g.overrides))}
            for g in settings.groups
        ],
        "frozen": [paths[i] for i in settings.frozen],
    }


def _jsonable(value: Any) -> Any:
    """``value`` as JSON keeps it (tuples as lists, 0-dim tensors as numbers), to compare."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values (NaN equal to NaN)."""
    a, b = _jsonable(a), _jsonable(b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _load(
    optimizer: Any,
    paths: list[str],
    tensors: Mapping[str, torch.Tensor],
    meta: Any,
    where: str,
    unread: set[str],
) -> Any:
    meta = _expect_dict(meta, "the optimizer metadata", where)
    saved_class = meta.get("class")
    if saved_class != type(optimizer).__name__:
        raise OptimizerStateError(
            f"the optimizer state{where} is of a {saved_class!r}, not of a "
            f"{type(optimizer).__name__!r}: load it into the optimizer it was saved from."
        )
    inner = wrapped(optimizer)
    if inner is not None:
        loaded = _load(inner, paths, tensors, meta.get("inner"), where, unread)
        return dataclasses.replace(optimizer, inner=loaded)
    if not isinstance(optimizer, PureOptimizer):
        raise TypeError(
            f"{type(optimizer).__name__} is not a pure optimizer (a DataParallel loads its "
            "inner optimizer: diffprog.distributed.load_checkpoint, or pass optimizer.inner)."
        )
    settings = _settings_for(optimizer, len(paths))
    _check_hyper(optimizer, meta.get("hyper"), where)
    _check_groups(optimizer, settings, paths, meta.get("groups"), where)
    fields = _state_fields(optimizer, paths, tensors, meta.get("state"), where, unread)
    if unread:
        raise OptimizerStateError(
            f"unexpected optimizer state{where}: {_listed(unread)} (no such state of this "
            f"{type(optimizer).__name__}, or no such parameter in the model).",
            unexpected_keys=sorted(unread),
        )
    count = meta.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise OptimizerStateError(f"the optimizer's step count{where} is not a count: {count!r}.")
    fields["count"] = count
    fields["param_counts"] = _param_counts(meta.get("param_counts"), paths, where)
    return _rebuilt(optimizer, fields)


def _rebuilt(optimizer: PureOptimizer, fields: dict[str, Any]) -> Any:
    """The skeleton with ``fields`` replaced (a fresh lease: the skeleton keeps its own)."""
    if optimizer.lease is not None:
        fields["lease"] = Lease()
    return dataclasses.replace(optimizer, **fields)


def _expect_dict(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OptimizerStateError(f"{what}{where} is not a JSON object: {type(value).__name__}.")
    return value


def _listed(keys: set[str] | list[str], most: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _check_hyper(optimizer: PureOptimizer, saved: Any, where: str) -> None:
    saved = _expect_dict(saved, "the optimizer's hyper-parameters", where)
    owner = type(optimizer).__name__
    differ = []
    for f in type(optimizer).declaration().hyper:
        if f.name not in saved:
            differ.append(f"{f.name} (missing in the file)")
        elif not _same(getattr(optimizer, f.name), saved[f.name]):
            differ.append(f"{f.name}={saved[f.name]!r} saved, {getattr(optimizer, f.name)!r} here")
    if differ:
        raise OptimizerStateError(
            f"the {owner} state{where} was saved with other settings: {'; '.join(differ)}. "
            f"Build the skeleton with the saved settings, {owner}.init(model, ...)."
        )


def _check_groups(
    optimizer: PureOptimizer, settings: ParamSettings, paths: list[str], saved: Any, where: str
) -> None:
    here = _groups_meta(settings, paths)
    # None: saved from an optimizer built without init (GD()), which trains every parameter
    # alike, as one built with init and no overrides (GD.init(model)) does.
    plain = _groups_meta(ParamSettings(len(paths), (ParamGroup(tuple(range(len(paths)))),)), paths)
    if _jsonable(plain if saved is None else saved) != here:
        raise OptimizerStateError(
            f"the {type(optimizer).__name__} state{where} has other parameter groups (overrides "
            f"or frozen parameters) than this one: saved {saved!r}, here {here!r}. Build the "
            "skeleton with the same overrides and freeze."
        )


def _state_fields(
    optimizer: PureOptimizer,
    paths: list[str],
    tensors: Mapping[str, torch.Tensor],
    saved: Any,
    where: str,
    unread: set[str],
) -> dict[str, Any]:
    saved = _expect_dict(saved, "the optimizer's state listing", where)
    owner = type(optimizer).__name__
    declared = type(optimizer).declaration().state
    unknown = set(saved) - set(declared)
    if unknown:
        raise OptimizerStateError(f"{owner} has no state {_listed(unknown)} (listed{where}).")
    index = {p: i for i, p in enumerate(paths)}
    fields: dict[str, Any] = {}
    for kind in declared:
        held = saved.get(kind)
        mine = getattr(optimizer, kind)
        if held is None:
            if any(v is not None for v in mine):
                raise OptimizerStateError(
                    f"the {owner} state{where} has no {kind!r}, which this one keeps: "
                    "was it saved with other settings?"
                )
            continue
        if not isinstance(held, list) or not all(isinstance(p, str) for p in held):
            raise OptimizerStateError(f"the listing of {kind!r}{where} is not a list of paths.")
        expected = {paths[i] for i, v in enumerate(mine) if v is not None} if mine else None
        if expected is not None and set(held) != expected:
            raise OptimizerStateError(
                f"the {owner} state{where} holds {kind!r} for other parameters than this "
                f"one: missing {_listed(expected - set(held))}, unexpected "
                f"{_listed(set(held) - expected)}.",
                missing_keys=sorted(f"{kind}.{p}" for p in expected - set(held)),
                unexpected_keys=sorted(f"{kind}.{p}" for p in set(held) - expected),
            )
        values: list[torch.Tensor | None] = [None] * len(paths)
        missing = [f"{kind}.{p}" for p in held if f"{kind}.{p}" not in tensors]
        if missing:
            raise OptimizerStateError(
                f"missing optimizer state{where}: {_listed(missing)}.", missing_keys=missing
            )
        for p in held:
            if p not in index:
                raise OptimizerStateError(
                    f"the optimizer state{where} names a parameter {p!r} the model lacks."
                )
            key = f"{kind}.{p}"
            unread.discard(key)
            i = index[p]
            values[i] = _fitted(tensors[key], mine[i] if mine else None, key, where)
        fields[kind] = tuple(values)
    return fields


def _fitted(value: Any, like: torch.Tensor | None, key: str, where: str) -> torch.Tensor:
    """``value`` checked against the skeleton's tensor ``like`` and moved to its device (unless
    that is ``meta``) and dtype (a copy: the loaded optimizer must own its state, which a
    donating step writes)."""
    if not isinstance(value, torch.Tensor):
        raise OptimizerStateError(f"optimizer state {key!r}{where} is not a tensor.")
    if like is None:
        return value.detach().clone()
    if value.shape != like.shape:
        raise OptimizerStateError(
            f"optimizer state {key!r}{where} has shape {tuple(value.shape)}, but "
            f"{tuple(like.shape)} is expected here.",
            mismatched_keys=[key],
        )
    if value.is_complex() != like.is_complex() or value.is_floating_point() != (
        like.is_floating_point()
    ):
        raise OptimizerStateError(
            f"optimizer state {key!r}{where} has dtype {value.dtype}, where {like.dtype} is "
            "expected."
        )
    # A skeleton sampled on meta has meta state: the loaded state stays where it was read.
    device = value.device if like.is_meta else like.device
    return value.detach().to(device=device, dtype=like.dtype, copy=True)


def _param_counts(saved: Any, paths: list[str], where: str) -> tuple[int, ...]:
    if saved is None:
        return ()
    saved = _expect_dict(saved, "the per-parameter step counts", where)
    if set(saved) != set(paths) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in saved.values()
    ):
        raise OptimizerStateError(
            f"the per-parameter step counts{where} do not name each parameter of the model "
            "once with a count."
        )
    return tuple(saved[p] for p in paths)


# --- torch.optim's state_dict ----------------------------------------------------------------

# diffprog's class -> torch.optim's class name (looked up on torch.optim: Adafactor is recent).
_TORCH_NAMES: dict[type, str] = {
    GD: "SGD",
    GDM: "SGD",
    SGD: "SGD",
    Adam: "Adam",
    AdamW: "AdamW",
    Adagrad: "Adagrad",
    RMSprop: "RMSprop",
    NAdam: "NAdam",
    RAdam: "RAdam",
    Adamax: "Adamax",
    Adadelta: "Adadelta",
    Rprop: "Rprop",
    ASGD: "ASGD",
    Adafactor: "Adafactor",
}

# GD is torch.optim.SGD with these settings (GD has none of its own).
_GD_AS_SGD = {"momentum": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}


def _torch_class(optimizer: Any) -> type[torch.optim.Optimizer]:
    for cls in type(optimizer).__mro__:
        name = _TORCH_NAMES.get(cls)
        if name is not None and hasattr(torch.optim, name):
            found: type[torch.optim.Optimizer] = getattr(torch.optim, name)
            return found
    raise OptimizerStateError(
        f"{type(optimizer).__name__} has no torch.optim counterpart in this torch "
        f"({torch.__version__}): its state can be saved by path (optimizer_state, checkpoints) "
        "but not as a torch.optim state dict."
    )


def _pure(optimizer: Any) -> PureOptimizer:
    inner = wrapped(optimizer)
    if inner is not None:
        return _pure(inner)
    if not isinstance(optimizer, PureOptimizer):
        raise TypeError(
            f"{type(optimizer).__name__} is not a pure optimizer (a TorchOptimizer's torch "
            "state dict is opt.optimizer.state_dict())."
        )
    return optimizer


def _keeps_step(torch_cls: type) -> bool:
    """Whether ``torch_cls`` keeps a per-parameter ``step`` (all but SGD)."""
    return torch_cls is not torch.optim.SGD


def optimizer_state_dict(
    optimizer: Any, model: Any, *, lr: LearningRate, **options: Any
) -> dict[str, Any]:
    """A pure optimizer's state as ``torch.optim.X(...).state_dict()`` for the same model.

    ``torch.optim.X`` is the optimizer of the same name (``GD`` and ``GDM`` are
    ``torch.optim.SGD``). The parameter groups are the optimizer's: one group over every
    parameter in ``model``'s order (torch's ``module.parameters()`` order for ``diffprog.nn``
    layers) for a plain optimizer, else one group per set of ``overrides``, frozen parameters
    left out: the groups ``TorchOptimizer.init(model, torch.optim.X, overrides=..., freeze=...)``
    builds. Load it with ``torch_optimizer.load_state_dict(...)`` into a torch optimizer built
    with the same groups, and training goes on with the same numbers. A ``Chain`` or
    ``ClipGradNorm`` gives its inner optimizer's state (torch.optim has no clipping: clip the
    gradients yourself with ``torch.nn.utils.clip_grad_norm_``).

    The state tensors are copies (torch.optim updates its state in place; this optimizer's
    must not change). A parameter no step has updated yet has no state, as in torch.optim
    (Adagrad's, which torch creates with the optimizer, apart).

    Args:
        optimizer: the pure optimizer (or a ``Chain``/``ClipGradNorm`` around one).
        model: the model it trains.
        lr: the learning rate to write into the groups (times each group's ``lr_scale``); a
            schedule is read at the optimizer's ``count``. torch's ``load_state_dict`` adopts
            it, as it adopts every setting saved.
        **options: torch's implementation switches (``fused=True``, ``foreach=True``, ...),
            which have no pure meaning but which the groups carry and torch's
            ``load_state_dict`` adopts: pass those the torch optimizer is built with, or it runs
            with torch's defaults after loading.

    Returns:
        ``{"state": {index: {name: tensor}}, "param_groups": [...]}``, torch.optim's format.

    Raises:
        OptimizerStateError: the optimizer has no torch.optim counterpart (``Lion``), or was
            built for another model.
        TypeError: the optimizer is not a pure one.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import SGD
        >>> model = sample(LinearSpec(2, 1))
        >>> sd = optimizer_state_dict(SGD.init(model, momentum=0.9), model, lr=0.1)
        >>> sd["param_groups"][0]["momentum"], sd["param_groups"][0]["params"]
        (0.9, [0, 1])
    """
    pure = _pure(optimizer)
    torch_cls = _torch_class(pure)
    params = flatten_parameters(model)
    settings = _settings_for(pure, len(params))
    declared = type(pure).declaration()
    base = {f.name: getattr(pure, f.name) for f in declared.hyper}
    switches = options
    options = {k: v for k, v in base.items() if k in declared.settable}
    lr_now = float(learning_rate_at(lr, pure.count))
    groups = []
    for group in settings.groups:
        overrides = dict(group.overrides)
        scale = float(overrides.get("lr_scale", 1.0))
        groups.append(
            {**overrides, "params": [params[i] for i in group.indices], "lr": lr_now * scale}
        )
    if isinstance(pure, GD) and not isinstance(pure, GDM):
        options = {}
    # torch.optim itself builds the groups, so that they hold every option it keeps, with its
    # defaults (foreach, fused, ...), in its order.
    shadow = torch_cls(groups, lr=lr_now, **{**options, **switches})  # type: ignore[call-arg]
    counts = pure.param_counts or tuple(pure.count if t else 0 for t in settings.trainable)
    shadow.state.clear()
    for group in settings.groups:
        for i in group.indices:
            entry = _torch_entry(pure, torch_cls, i, counts[i], params[i])
            if entry:
                shadow.state[params[i]] = entry
    out = shadow.state_dict()
    shadow.state.clear()
    return out


def _torch_entry(
    pure: PureOptimizer, torch_cls: type, i: int, count: int, param: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Parameter ``i``'s state as torch.optim keeps it (empty before its first update, as
    torch's, but for Adagrad, which torch gives state at construction)."""
    if count == 0 and not isinstance(pure, Adagrad):
        return {}
    entry: dict[str, torch.Tensor] = {}
    if _keeps_step(torch_cls):
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        entry["step"] = torch.tensor(float(count), dtype=dtype)
    for kind in type(pure).declaration().state:
        values = getattr(pure, kind)
        value = values[i] if values else None
        # Adafactor keeps an empty tensor for the kind a parameter's shape does not use.
        if value is not None and not (value.numel() == 0 and param.numel() != 0):
            entry[kind] = value.detach().clone()
    return entry


def load_optimizer_state_dict(
    optimizer: OptT, model: Any, state_dict: Mapping[str, Any], *, count: int | None = None
) -> OptT:
    """``optimizer`` (a skeleton) with the state of a ``torch.optim`` optimizer's state dict.

    The inverse of :func:`optimizer_state_dict`: ``state_dict`` is
    ``torch.optim.X(groups, ...).state_dict()`` for the same model, its groups those of the
    skeleton (see :func:`optimizer_state_dict`; for a plain optimizer, one group over
    ``module.parameters()``). Unlike torch's ``load_state_dict``, which adopts the saved
    settings, a saved setting that differs from the skeleton's is refused (the learning rate
    apart: diffprog takes it at each step). Each parameter's step count is torch's ``step``;
    a parameter without state in torch (never updated) keeps the skeleton's initial state.
    State tensors are copied to the skeleton's device and dtype, as torch casts them to its
    parameters'.

    Args:
        optimizer: the skeleton, e.g. ``Adam.init(model, betas=(0.9, 0.99))``.
        model: the model.
        state_dict: the torch optimizer's ``state_dict()``.
        count: the optimizer's step count (the argument of a learning-rate schedule); by
            default the largest per-parameter ``step`` in the state dict. torch.optim.SGD
            keeps no step count: pass it for a schedule to go on where it was.

    Returns:
        The optimizer with the state. The skeleton is not changed.

    Raises:
        OptimizerStateError: the groups, settings, state names or shapes do not fit, naming
            the group, setting or parameter path.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import Adam
        >>> model = sample(LinearSpec(2, 1))
        >>> torch_opt = torch.optim.Adam(flatten_parameters(model), lr=0.1)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> torch_opt.step()
        >>> load_optimizer_state_dict(Adam.init(model), model, torch_opt.state_dict()).count
        1
    """
    pure = _pure(optimizer)
    torch_cls = _torch_class(pure)
    paths = _paths(model)
    settings = _settings_for(pure, len(paths))
    groups = _torch_groups(state_dict, settings, paths)
    _check_torch_settings(pure, settings, groups)
    state = state_dict.get("state")
    if not isinstance(state, Mapping):
        raise OptimizerStateError("the torch state dict's 'state' is not a dict.")
    owner = type(pure).__name__
    index = {
        tid: i
        for g, gs in zip(settings.groups, groups, strict=True)
        for tid, i in zip(gs["params"], g.indices, strict=True)
    }
    unknown = [k for k in state if k not in index]
    if unknown:
        raise OptimizerStateError(
            f"the torch state dict has state for parameter ids {unknown[:8]} that no group lists."
        )
    kinds = type(pure).declaration().state
    per_param: list[int] = [0] * len(paths)
    # Copies, not the skeleton's own tensors: a parameter torch has no state for yet keeps
    # its initial state, which a donating optimizer then updates in place.
    values = {k: [None if t is None else t.clone() for t in getattr(pure, k)] for k in kinds}
    for tid, entry in state.items():
        i = index[tid]
        if not isinstance(entry, Mapping):
            raise OptimizerStateError(f"torch state of parameter {paths[i]!r} is not a dict.")
        extra = set(entry) - set(kinds) - {"step"}
        if extra:
            raise OptimizerStateError(
                f"torch state of {paths[i]!r} holds {_listed(extra)}, which {owner} does not "
                "keep: is it the state of another optimizer?"
            )
        per_param[i] = _torch_count(entry, torch_cls, paths[i], count)
        for kind in kinds:
            mine = values[kind]
            like = mine[i] if mine else None
            key = f"{kind}.{paths[i]}"
            if kind in entry:
                if like is None:
                    raise OptimizerStateError(
                        f"torch state holds {kind!r} for {paths[i]!r}, which this {owner} does "
                        f"not keep there: build the skeleton with {owner}.init(model, ...) and "
                        "the torch optimizer's settings."
                    )
                mine[i] = _fitted(entry[kind], like, key, " in the torch state dict")
            elif like is not None and like.numel() != 0 and (entry or isinstance(pure, Adagrad)):
                raise OptimizerStateError(f"torch state of {paths[i]!r} lacks {kind!r}.")
    total = max(per_param, default=0) if count is None else count
    trained = settings.trainable
    counts = tuple(per_param)
    all_same = all(c == total for c, t in zip(counts, trained, strict=True) if t)
    fields: dict[str, Any] = {k: tuple(v) if v else () for k, v in values.items()}
    fields["count"] = total
    fields["param_counts"] = () if all_same else counts
    new = _rebuilt(pure, fields)
    return _rewrapped(optimizer, new)  # type: ignore[no-any-return]


def _rewrapped(optimizer: Any, pure: Any) -> Any:
    inner = wrapped(optimizer)
    if inner is None:
        return pure
    return dataclasses.replace(optimizer, inner=_rewrapped(inner, pure))


def _torch_count(entry: Mapping[str, Any], torch_cls: type, path: str, count: int | None) -> int:
    if not _keeps_step(torch_cls):
        # torch.optim.SGD keeps no count: a momentum buffer means at least one update.
        return max(count or 0, 1) if "momentum_buffer" in entry else 0
    step = entry.get("step")
    if step is None:
        return 0 if not entry else _bad_step(path, step)
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
        value = float(step.item())
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        value = float(step)
    else:
        return _bad_step(path, step)
    if not (value >= 0 and math.isfinite(value) and value == int(value)):
        return _bad_step(path, step)
    return int(value)


def _bad_step(path: str, step: Any) -> int:
    raise OptimizerStateError(f"torch state of {path!r} has no valid 'step': {step!r}.")


def _torch_groups(
    state_dict: Mapping[str, Any], settings: ParamSettings, paths: list[str]
) -> list[Mapping[str, Any]]:
    groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    if not isinstance(groups, Sequence) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), Sequence) for g in groups
    ):
        raise OptimizerStateError(
            "not a torch.optim state dict: it needs 'param_groups', a list of dicts with 'params'."
        )
    mine = [len(g.indices) for g in settings.groups]
    theirs = [len(g["params"]) for g in groups]
    if mine != theirs:
        names = [[paths[i] for i in g.indices] for g in settings.groups]
        raise OptimizerStateError(
            f"the torch state dict's parameter groups hold {theirs} parameters, this "
            f"optimizer's {mine} (parameters {names}). Build the torch optimizer over the "
            "same parameters in the same groups: "
            "module.parameters(), or TorchOptimizer.init(model, ..., overrides=..., freeze=...)."
        )
    return list(groups)


def _check_torch_settings(
    pure: PureOptimizer, settings: ParamSettings, groups: list[Mapping[str, Any]]
) -> None:
    declared = type(pure).declaration()
    base = {f.name: getattr(pure, f.name) for f in declared.hyper}
    if isinstance(pure, GD) and not isinstance(pure, GDM):
        base = dict(_GD_AS_SGD)
    differ = []
    for n, (group, theirs) in enumerate(zip(settings.groups, groups, strict=True)):
        merged = {**base, **dict(group.overrides)}
        merged.pop("lr_scale", None)
        for name, value in merged.items():
            if name in theirs and not _same(value, theirs[name]):
                differ.append(f"group {n}: {name}={theirs[name]!r} in torch, {value!r} here")
    if differ:
        owner = type(pure).__name__
        raise OptimizerStateError(
            f"the torch optimizer's settings differ from this {owner}'s: {'; '.join(differ)}. "
            f"Build the skeleton with torch's settings, {owner}.init(model, ...)."
        )
