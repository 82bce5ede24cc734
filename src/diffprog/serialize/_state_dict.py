"""State dicts: a model's tensors by PyTorch key, and loading them back into a model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar, overload

import torch

from diffprog._autograd import make_independent
from diffprog._errors import ModelError, PathKey, state_dict_path
from diffprog._frozen import Frozen
from diffprog._map import map_tensors, tensors
from diffprog._random import DeviceLike
from diffprog._traverse import (
    name_clash_error,
    walk_keys,
)
from diffprog.serialize._errors import LoadError, quoted

__all__ = ["KeyMap", "LoadResult", "Stored", "load_into", "load_state_dict", "state_dict"]

T = TypeVar("T")

KeyMap = Callable[[str], "str | None"] | Mapping[str, str]
"""How a source's keys become the model's: a function (returning ``None`` to skip a key) or a
dict ``{source key: model key}`` (keys not in it are kept as they are)."""


class LoadResult(NamedTuple):
    """What a non-strict load returns: the new model and what could not be matched.

    Like ``torch.nn.Module.load_state_dict``'s ``_IncompatibleKeys``, with the model in front
    (a diffprog model is a value: loading returns a new one).
    """

    model: Any
    missing_keys: list[str]
    """Keys of the model the source lacks; those tensors keep the skeleton's values."""
    unexpected_keys: list[str]
    """Keys of the source (as written there) the model does not have; they were not used."""


@dataclass
class _Slot:
    """One tensor of the model with every key it is found at (several for a tie)."""

    leaf: torch.Tensor
    path: tuple[PathKey, ...]
    keys: list[str] = field(default_factory=list)


def _slots(model: Any) -> dict[str, _Slot]:
    """The model's tensors by state-dict key, in ``walk`` order (torch's for ``diffprog.nn``).

    Raises:
        NameClashError: two different tensors would get the same key.
    """
    # A hand-written instance holding a tensor it does not list would leave that tensor out
    # of every state dict and file without a word: tensors() refuses it, naming the path.
    tensors(model)
    by_id: dict[int, _Slot] = {}
    by_key: dict[str, _Slot] = {}
    for path, leaf in walk_keys(model):
        if not isinstance(leaf, torch.Tensor):
            continue
        key = state_dict_path(path)
        slot = by_id.setdefault(id(leaf), _Slot(leaf, path))
        other = by_key.setdefault(key, slot)
        if other is not slot:
            raise name_clash_error(model, key, other.path, path, "tensors")
        if key not in slot.keys:
            slot.keys.append(key)
    return by_key


def state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` (parameters, frozen parameters and buffers) by PyTorch key.

    For ``diffprog.nn`` layers the keys and their order are ``torch.nn``'s ``state_dict()``
    for the equivalent module (``layers.0.weight``, ``bn.running_mean``,
    ``bn.num_batches_tracked``). As in torch, the values are detached tensors sharing the
    model's storage (copy them to keep values that an in-place optimizer will overwrite), and a
    tied tensor appears under each of its keys (here as one tensor object).

    Args:
        model: any model value.

    Returns:
        A new dict ``{key: tensor}``, plain tensors (no ``Parameter``), in the model's order.

    Raises:
        NameClashError: two different tensors would get the same key.

    Example:
        >>> import diffprog as dp
        >>> from diffprog.nn import BatchNorm1dSpec
        >>> list(dp.state_dict(dp.sample(BatchNorm1dSpec(3))))
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """
    detached: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, slot in _slots(model).items():
        t = detached.get(id(slot.leaf))
        if t is None:
            t = detached[id(slot.leaf)] = slot.leaf.detach()
        out[key] = t
    return out


@dataclass(frozen=True)
class Stored:
    """A tensor of a source (a state dict or a file), described before it is read."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    ident: object
    """Equal for keys that hold one stored tensor (a tie, an alias): read once."""
    read: Callable[[], torch.Tensor]
    """Give the tensor (for a file: read it now)."""


# How loaded tensors relate to the source's: "copy" (a user's state dict: the model must not
# share storage with it), "fresh" (read from a file: the source gives tensors that nothing else
# holds and that never overlap in memory, except keys with one ident) or "assign" (the user
# asked to use the given tensors themselves).
_Mode = Literal["copy", "fresh", "assign"]


def _source_of(name: str) -> str:
    """A LoadError's ``source`` for the ``name`` a message shows: a file's path as it is
    (messages say ``file PATH``), else the name (``the state dict``)."""
    return name.removeprefix("file ")


def _describe(dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> str:
    return f"{str(dtype).removeprefix('torch.')}[{', '.join(map(str, shape))}]"


def _map_key(key_map: KeyMap | None, key: str) -> str | None:
    if key_map is None:
        return key
    if callable(key_map):
        return key_map(key)
    return key_map.get(key, key)


def _dtype_ok(stored: torch.dtype, leaf: torch.Tensor, dtype: torch.dtype | None) -> bool:
    if dtype is not None and leaf.dtype.is_floating_point:
        return stored.is_floating_point
    return stored == leaf.dtype


def load_into(
    model: T,
    source: Mapping[str, Stored],
    *,
    name: str,
    strict: bool,
    device: DeviceLike,
    dtype: torch.dtype | None,
    key_map: KeyMap | None,
    check_finite: bool,
    mode: _Mode,
) -> LoadResult:
    """Load ``source`` into a copy of ``model``: the one implementation of every load.

    Every check on keys, shapes and dtypes runs before any tensor is read; the model is built
    only once every tensor was read and checked, so an error never leaves half a model.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype= converts floating-point tensors; {dtype} is not one.")
    slots = _slots(model)
    mapped: dict[str, tuple[str, Stored]] = {}  # model key -> (source key, stored tensor)
    unexpected: list[str] = []
    problems: list[str] = []
    bad: list[str] = []
    for source_key, stored in source.items():
        key = _map_key(key_map, source_key)
        if key is None:
            continue
        if key not in slots:
            unexpected.append(source_key)
            continue
        first = mapped.setdefault(key, (source_key, stored))
        if first[1].ident != stored.ident:
            problems.append(f"{first[0]!r} and {source_key!r} both map to {key!r}")
            bad.append(source_key)
    missing = [key for key in slots if key not in mapped]
    for key, (source_key, stored) in mapped.items():
        leaf = slots[key].leaf
        if tuple(stored.shape) != tuple(leaf.shape) or not _dtype_ok(stored.dtype, leaf, dtype):
            named = repr(key) if key == source_key else f"{source_key!r} (as {key!r})"
            problems.append(
                f"{named}: the source has {_describe(stored.dtype, stored.shape)}, the "
                f"model has {_describe(leaf.dtype, leaf.shape)}"
            )
            bad.append(key)
    if problems or (strict and (missing or unexpected)):
        raise _error(name, model, missing, unexpected, problems, bad, strict)
    new = _read_all(slots, mapped, name, device, dtype, check_finite, mode)
    return LoadResult(_rebuild(model, new, name), missing, unexpected)


def _read_all(
    slots: Mapping[str, _Slot],
    mapped: Mapping[str, tuple[str, Stored]],
    name: str,
    device: DeviceLike,
    dtype: torch.dtype | None,
    check_finite: bool,
    mode: _Mode,
) -> dict[int, torch.Tensor]:
    """The new tensor of each slot (by the id of the skeleton's tensor), read and checked."""
    new: dict[int, torch.Tensor] = {}
    used: set[object] = set()  # the idents read so far
    problems: list[str] = []
    bad: list[str] = []
    for slot in {id(slot.leaf): slot for slot in slots.values()}.values():
        present = [(key, *mapped[key]) for key in slot.keys if key in mapped]
        if not present:
            new[id(slot.leaf)] = _wrap(slot.leaf, _keep(slot.leaf, device, dtype))
            continue
        _, source_key, stored = present[0]
        t = _convert(stored.read(), slot.leaf, device, dtype, mode)
        if mode == "fresh" and stored.ident in used:
            # One stored tensor (a tie in the file) at two untied places of the model: each
            # gets its own memory, so that an in-place update of one never moves the other.
            t = t.clone()
        used.add(stored.ident)
        for other_key, other_source_key, other in present[1:]:
            if other.ident != stored.ident:
                u = _convert(other.read(), slot.leaf, device, dtype, "assign")
                if not _same(t, u):
                    problems.append(
                        f"{source_key!r} and {other_source_key!r} hold different values but "
                        f"are one tied tensor of the model"
                    )
                    bad.append(other_key)
        floating = t.is_floating_point() or t.is_complex()
        if check_finite and floating and not bool(torch.isfinite(t).all()):
            problems.append(f"{source_key!r} holds NaN or infinite values")
            bad.extend(present_key for present_key, _, _ in present)
        new[id(slot.leaf)] = _wrap(slot.leaf, t)
    if problems:
        raise LoadError(
            f"cannot load {name}: " + "; ".join(problems) + ".",
            source=_source_of(name),
            mismatched_keys=bad,
        )
    return new


def _target(
    t: torch.Tensor, leaf: torch.Tensor, device: DeviceLike, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Where a loaded tensor goes: the skeleton's device (the source's for a ``meta``
    skeleton) and dtype, unless ``device=``/``dtype=`` (floating point only) say otherwise."""
    if device is not None:
        where = torch.device(device)
    else:
        where = t.device if leaf.is_meta else leaf.device
    kind = dtype if dtype is not None and leaf.dtype.is_floating_point else leaf.dtype
    return where, kind


def _convert(
    t: torch.Tensor,
    leaf: torch.Tensor,
    device: DeviceLike,
    dtype: torch.dtype | None,
    mode: _Mode,
) -> torch.Tensor:
    where, kind = _target(t, leaf, device, dtype)
    return t.detach().to(device=where, dtype=kind, copy=mode == "copy")


def _keep(leaf: torch.Tensor, device: DeviceLike, dtype: torch.dtype | None) -> torch.Tensor:
    """A copy of a skeleton's tensor that the source lacks (non-strict): a ``meta`` one stays
    on ``meta`` (it has no values to move)."""
    where, kind = _target(leaf, leaf, device, dtype)
    if leaf.is_meta:
        return torch.empty_like(leaf.detach(), dtype=kind, device="meta")
    return leaf.detach().to(device=where, dtype=kind, copy=True)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN in the same place."""
    if a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _wrap(leaf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kind of tensor ``leaf`` is: a trainable leaf, a frozen one, or a buffer."""
    if isinstance(leaf, torch.nn.Parameter):
        if t.is_floating_point() or t.is_complex():
            return make_independent(t)
        return torch.nn.Parameter(t, requires_grad=False)
    if isinstance(leaf, Frozen):
        return Frozen(t)
    return t


def _rebuild(model: T, new: Mapping[int, torch.Tensor], name: str) -> T:
    """``model`` with each tensor swapped for its new one (by id).

    ``map_tensors`` does it: ties stay ties, what holds no tensor is shared, and the tensors a
    hand-written instance lists (parameters, frozen ones and buffers alike) go back through
    its own ``replace_own_parameters``; one it holds without listing is refused, never left
    with the skeleton's value.
    """
    try:
        return map_tensors(lambda t: new.get(id(t), t), model)
    except ModelError as e:
        raise LoadError(
            f"cannot put the loaded tensors into {type(model).__name__}: {e}",
            source=_source_of(name),
        ) from e


def _error(
    name: str,
    model: Any,
    missing: list[str],
    unexpected: list[str],
    problems: list[str],
    bad: list[str],
    strict: bool,
) -> LoadError:
    parts: list[str] = []
    fixes: list[str] = []
    if strict and missing:
        parts.append(f"{len(missing)} missing key(s): {quoted(missing)}")
    if strict and unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {quoted(unexpected)}")
    if strict and (missing or unexpected):
        fixes.append(
            "pass key_map= if the names differ, or strict=False to load the keys that match"
        )
    if problems:
        parts.append(f"{len(problems)} mismatch(es): " + "; ".join(problems[:50]))
        fixes.append(
            "pass dtype= to convert floating-point tensors from another floating-point dtype"
        )
    return LoadError(
        f"cannot load {name} into {type(model).__name__}: " + "; ".join(parts) + ". "
        "Nothing was loaded. Check that the source was saved from this model, or "
        + "; ".join(fixes)
        + ".",
        source=_source_of(name),
        missing_keys=missing if strict else (),
        unexpected_keys=unexpected if strict else (),
        mismatched_keys=bad,
    )


def _dict_source(state: Mapping[str, torch.Tensor], name: str) -> dict[str, Stored]:
    """A user's state dict as a source, each value checked to be a dense tensor with values."""
    if not isinstance(state, Mapping):
        raise LoadError(
            f"{name} is a {type(state).__name__}, not a mapping of keys to tensors.", source=name
        )
    out: dict[str, Stored] = {}
    for key, t in state.items():
        problem = not_loadable(key, t)
        if problem:
            raise LoadError(
                f"cannot load {name}: {problem}.",
                source=_source_of(name),
                mismatched_keys=[str(key)],
            )
        ident = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())
        out[key] = Stored(t.dtype, tuple(t.shape), ident, t.detach)
    return out


def not_loadable(key: object, t: object) -> str:
    """Why ``key: t`` of a state dict cannot be loaded ("" if it can)."""
    if not isinstance(key, str):
        return f"the key {key!r} is not a string"
    if not isinstance(t, torch.Tensor):
        return f"{key!r} holds a {type(t).__name__}, not a tensor"
    if t.layout != torch.strided:
        return f"{key!r} is a {t.layout} tensor; only dense tensors load"
    if t.is_meta:
        return f"{key!r} is on the meta device and has no values"
    return ""


@overload
def load_state_dict(
    model: T,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: Literal[True] = True,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
    key_map: KeyMap | None = None,
    check_finite: bool = False,
    assign: bool = False,
) -> T: ...
@overload
def load_state_dict(
    model: T,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: Literal[False],
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
    key_map: KeyMap | None = None,
    check_finite: bool = False,
    assign: bool = False,
) -> LoadResult: ...
@overload
def load_state_dict(
    model: T,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
    key_map: KeyMap | None = None,
    check_finite: bool = False,
    assign: bool = False,
) -> T | LoadResult: ...
def load_state_dict(
    model: T,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
    key_map: KeyMap | None = None,
    check_finite: bool = False,
    assign: bool = False,
) -> T | LoadResult:
    """A copy of ``model`` holding the tensors of ``state_dict`` (``torch.nn``'s semantics).

    ``model`` is the skeleton and is never changed. Each of its tensors is looked up by its
    :func:`state_dict` key; the result holds trainable leaves where the skeleton has
    parameters (fresh ``make_independent`` leaves), frozen parameters where it has ``Frozen``
    ones and plain buffers where it has buffers. A tied tensor is one tensor again at all its
    keys (the keys present must hold equal values). Tensors go to the skeleton's device and
    dtype (for a ``meta`` skeleton: the source's device), and are copies: the result never
    shares storage with ``state_dict`` unless ``assign=True``.

    Every problem is found before anything is built and reported in one ``LoadError``:
    missing and unexpected keys (when ``strict``) and shape or dtype mismatches (always, as
    torch reports size mismatches even with ``strict=False``). Unlike torch, which casts
    silently, a dtype that differs from the skeleton's is a mismatch unless ``dtype=`` is given.

    Args:
        model: the skeleton (e.g. ``sample(spec, device="meta")``).
        state_dict: ``{key: tensor}``, e.g. from :func:`state_dict` or a ``torch.nn``
            module's ``state_dict()``.
        strict: refuse missing and unexpected keys (the default). With ``strict=False``, a
            :class:`LoadResult` ``(model, missing_keys, unexpected_keys)`` is returned and the
            missing tensors keep the skeleton's values (copied; ``meta`` stays ``meta``).
        device: put every tensor there instead.
        dtype: convert every floating-point tensor to this dtype (from any floating-point
            dtype in the source); other tensors must match the skeleton's dtype.
        key_map: rename the source's keys to the model's: a function (``None`` skips the
            key) or a dict ``{source key: model key}``.
        check_finite: refuse floating-point tensors with NaN or infinite values.
        assign: use the given tensors themselves where no conversion is needed (no copy; the
            result then shares storage with ``state_dict``).

    Returns:
        The new model; with ``strict=False``, a :class:`LoadResult`.

    Raises:
        LoadError: naming every offending key; nothing is loaded.
        NameClashError: two tensors of the model would get the same key.

    Example:
        >>> import diffprog as dp
        >>> from diffprog.nn import LinearSpec
        >>> layer = dp.sample(LinearSpec(3, 2))
        >>> zeros = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
        >>> new = dp.load_state_dict(layer, zeros)
        >>> new.weight.abs().sum().item(), new.weight.is_leaf, new.weight.requires_grad
        (0.0, True, True)
        >>> dp.load_state_dict(layer, {"weight": torch.zeros(2, 3)}, strict=False).missing_keys
        ['bias']
    """
    name = "the state dict"
    result = load_into(
        model,
        _dict_source(state_dict, name),
        name=name,
        strict=strict,
        device=device,
        dtype=dtype,
        key_map=key_map,
        check_finite=check_finite,
        mode="assign" if assign else "copy",
    )
    return result.model if strict else result
