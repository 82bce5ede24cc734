"""Training checkpoints: model, optimizer, step, random states and metadata in one file.

A checkpoint is one safetensors file (``.safetensors``): every tensor (the model's
``state_dict`` under ``model.``, the optimizer's state under ``optimizer.``, the random
generators' states under ``rng.``) in the tensor section, and the rest as one JSON document in
the file's metadata under ``"diffprog.checkpoint"``: the step, the user's metadata, the
optimizer's settings, Python's and NumPy's random states, and a CRC-32 of every tensor's bytes
(the JSON part's own CRC-32 beside it, under ``"diffprog.checkpoint.crc32"``).
Nothing is pickled, so loading a checkpoint never runs code; any safetensors tool reads it.

One file makes a save atomic with one rename (``save_tensors`` writes a temporary file beside
the target, fsyncs it, renames it over the target and fsyncs the folder): after a crash the
path holds the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from diffprog import DiffprogWarning
from diffprog.optim import TorchOptimizer
from diffprog.serialize import _safetensors
from diffprog.serialize._errors import LoadError, SaveError, quoted
from diffprog.serialize._files import load_tensors, save_tensors
from diffprog.serialize._optim_state import (
    OptimizerState,
    OptimizerStateError,
    load_optimizer_state,
    optimizer_state,
    wrapped,
)
from diffprog.serialize._state_dict import load_state_dict, state_dict

__all__ = ["Checkpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

M = TypeVar("M")
O = TypeVar("O")  # noqa: E741 (the optimizer's type, as M is the model's)

#: The metadata key of a checkpoint's JSON part, and of that part's CRC-32 (a flipped digit
#: in a random state or a step would otherwise load as a different, valid-looking value).
KEY = "diffprog.checkpoint"
CRC_KEY = "diffprog.checkpoint.crc32"
_FORMAT = 1
_SUFFIX = ".safetensors"


@dataclasses.dataclass(frozen=True)
class Checkpoint(Generic[M, O]):
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the model, built from the skeleton given.
        optimizer: the optimizer with its saved state (for a ``TorchOptimizer``, the one given,
            loaded in place), or ``None`` when none was saved and none given.
        step: the step saved.
        extra: the user's metadata, as JSON gives it back (tuples as lists).
        path: the file read.
    """

    model: M
    optimizer: O
    step: int
    extra: dict[str, Any]
    path: Path


# --- saving ----------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: Any,
    optimizer: Any,
    step: int,
    generators: Mapping[str, torch.Generator] | None = None,
    keep_last: int | None = None,
    **extra: Any,
) -> Path:
    """Save a training checkpoint to ``path`` (one ``.safetensors`` file), atomically.

    It holds the model (its :func:`state_dict`: parameters and buffers), the optimizer's state
    (a pure optimizer's by parameter path, a ``TorchOptimizer``'s ``state_dict()``), ``step``,
    the random states that a resumed run needs to draw the same numbers (torch's global CPU
    generator, every CUDA device's when CUDA is initialised, the ``generators`` given by name,
    Python's ``random`` and, if NumPy has been imported, NumPy's global state) and ``extra``.
    The file is written beside ``path`` under a temporary name, fsynced, renamed over ``path``
    and the folder fsynced: a crash leaves the previous file whole.

    Args:
        path: the file (``.safetensors``); replaced if it exists.
        model: the model.
        optimizer: its optimizer (pure, ``Chain``/``ClipGradNorm`` around one, or
            ``TorchOptimizer``), or ``None``.
        step: the number of steps taken (what :func:`latest_checkpoint` orders by).
        generators: explicit ``torch.Generator`` s to save by name, e.g. ``{"data": g}``; give
            the same names to :func:`load_checkpoint` to restore them.
        keep_last: keep only this many checkpoints in ``path``'s folder (the newest by step,
            this one always among them), deleting older diffprog checkpoints there (of any
            run: give each run its own folder).
        **extra: JSON-able metadata (epoch, config, metrics, ...).

    Returns:
        The path written.

    Raises:
        SaveError: ``extra`` is not JSON-able, ``step`` is not a non-negative integer, a
            tensor cannot be saved, or a ``TorchOptimizer``'s state holds something other
            than tensors and JSON values.

    Example:
        >>> import tempfile, pathlib
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import Adam
        >>> model = sample(LinearSpec(2, 1))
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> path = save_checkpoint(folder / "step-0.safetensors", model=model,
        ...                        optimizer=Adam.init(model), step=0, epoch=1)
        >>> load_checkpoint(path, model=model, optimizer=Adam.init(model)).extra
        {'epoch': 1}
    """
    target = Path(path)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise SaveError(f"step must be a non-negative int, got {step!r}.")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise SaveError(f"keep_last must be a positive int, got {keep_last!r}.")
    tensors: dict[str, torch.Tensor] = {f"model.{key}": t for key, t in state_dict(model).items()}
    document: dict[str, Any] = {
        "format": _FORMAT,
        "step": step,
        "saved_at": time.time_ns(),
        "extra": _checked_extra(extra),
        "optimizer": _save_optimizer(optimizer, model, tensors),
        "rng": _save_rng(generators or {}, tensors),
    }
    document["crc32"] = {key: _crc(t) for key, t in tensors.items()}
    text = json.dumps(document, separators=(",", ":"))
    metadata = {KEY: text, CRC_KEY: str(zlib.crc32(text.encode("utf-8")))}
    save_tensors(tensors, target, format="safetensors", metadata=metadata)
    if keep_last is not None:
        _rotate(target, keep_last)
    return target


def _checked_extra(extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise SaveError(
                f"checkpoint metadata {key}={value!r} is not JSON-able ({e}); pass numbers, "
                "strings, booleans, None, lists and dicts of them."
            ) from None
    return extra


def _save_optimizer(optimizer: Any, model: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if optimizer is None:
        return None
    wrappers, innermost = _unwrapped(optimizer)
    if isinstance(innermost, TorchOptimizer):
        encoded = _encode(innermost.state_dict(), "optimizer.torch", tensors)
        return {"kind": "torch", "wrappers": wrappers, "state": encoded}
    try:
        state = optimizer_state(optimizer, model)
    except TypeError as e:
        raise SaveError(f"cannot save the optimizer: {e}") from None
    for key, t in state.tensors.items():
        tensors[f"optimizer.{key}"] = t
    return {"kind": "pure", "meta": state.meta}


def _unwrapped(optimizer: Any) -> tuple[list[str], Any]:
    """The class names of the ``Chain`` / ``ClipGradNorm`` around an optimizer, and it."""
    names: list[str] = []
    inner = wrapped(optimizer)
    while inner is not None:
        names.append(type(optimizer).__name__)
        optimizer, inner = inner, wrapped(inner)
    return names, optimizer


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` (a torch state dict) as JSON, its tensors moved to ``tensors``.

    A tensor becomes ``{"tensor": key}``, a tuple ``{"tuple": [...]}`` and a dict whose keys
    are not all strings (torch's parameter indices) ``{"items": [[key, value], ...]}``, so that
    decoding gives back exactly what torch's ``load_state_dict`` expects.
    """
    if isinstance(value, torch.Tensor):
        key = where
        while key in tensors:  # a key with a dot beside a nested one: keep both
            key += "_"
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _encode(v, f"{where}.{k}", tensors) for k, v in value.items()}}
        items = []
        for k, v in value.items():
            if not isinstance(k, (int, str)) or isinstance(k, bool):
                raise SaveError(f"the optimizer state has a key {k!r} at {where}: not JSON-able.")
            items.append([k, _encode(v, f"{where}.{k}", tensors)])
        return {"items": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SaveError(
        f"the optimizer state holds a {type(value).__name__} at {where}, which a checkpoint "
        "cannot store without pickling: only tensors, numbers, strings and containers."
    )


def _save_rng(generators: Mapping[str, torch.Generator], tensors: dict[str, torch.Tensor]) -> Any:
    rng: dict[str, Any] = {"torch": "rng.torch"}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        cuda = torch.cuda.get_rng_state_all()
        rng["cuda"] = [f"rng.cuda.{i}" for i in range(len(cuda))]
        for i, s in enumerate(cuda):
            tensors[f"rng.cuda.{i}"] = s
    named = {}
    for name, g in generators.items():
        if not isinstance(g, torch.Generator):
            raise SaveError(f"generators[{name!r}] is a {type(g).__name__}, not a torch.Generator.")
        key = f"rng.generator.{name}"
        tensors[key] = g.get_state()
        named[name] = {"tensor": key, "device": str(g.device)}
    rng["generators"] = named
    version, internal, gauss = random.getstate()
    rng["python"] = [version, list(internal), gauss]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        rng["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return rng


def _crc(t: torch.Tensor) -> int:
    host = t.detach().to("cpu").contiguous()
    return zlib.crc32(_safetensors._bytes_of(host)) if host.numel() else 0


def _rotate(target: Path, keep: int) -> None:
    """Delete the diffprog checkpoints of ``target``'s folder beyond the newest ``keep``."""
    found = _checkpoints_in(target.parent)
    mine = target.resolve()
    others = sorted((c for c in found if c[2].resolve() != mine), reverse=True)
    for _, _, old in others[keep - 1 :]:
        old.unlink(missing_ok=True)


# --- finding -------------------------------------------------------------------------------


def _checkpoints_in(folder: Path) -> list[tuple[int, int, Path]]:
    """``(step, saved_at, path)`` of each complete diffprog checkpoint in ``folder``."""
    found = []
    for path in folder.glob(f"*{_SUFFIX}"):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            document = _document(path)
        except (LoadError, OSError):
            continue  # not a complete checkpoint
        found.append((document["step"], document.get("saved_at", 0), path))
    return found


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``folder``: the highest step (then the latest saved).

    A file counts when it is a whole diffprog checkpoint: its header parses, its byte ranges
    end where the file ends (not truncated) and its JSON part is readable. Temporary files of
    an interrupted save (hidden, ``.tmp``) never count.

    Args:
        folder: the folder to look in (not its subfolders).

    Returns:
        The path, or ``None`` when the folder holds no checkpoint (or does not exist).

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    root = Path(folder)
    if not root.is_dir():
        return None
    found = _checkpoints_in(root)
    return max(found)[2] if found else None


def _document(path: Path) -> dict[str, Any]:
    """The checked JSON part of the checkpoint ``path`` (its header checked too)."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        header = _safetensors.read_header(f, os.fstat(f.fileno()).st_size, name)
    text = header.metadata.get(KEY)
    if text is None:
        raise LoadError(
            f"{name} is not a diffprog checkpoint: its safetensors metadata has no {KEY!r} "
            "(a model file? load it with load_params).",
            source=name,
        )
    if header.metadata.get(CRC_KEY) != str(zlib.crc32(text.encode("utf-8"))):
        raise LoadError(
            f"{name}: the checkpoint's JSON part is corrupt (its CRC-32 differs from the one "
            "saved).",
            source=name,
        )
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as e:
        problem = f"{name}: the checkpoint's JSON part is corrupt ({e})."
        raise LoadError(problem, source=name) from None
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise LoadError(
            f"{name}: the checkpoint's JSON part is not a diffprog checkpoint of format {_FORMAT}.",
            source=name,
        )
    step = document.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise LoadError(f"{name}: the checkpoint's step is not a count: {step!r}.", source=name)
    saved_at = document.get("saved_at", 0)
    if not isinstance(saved_at, int) or isinstance(saved_at, bool):
        raise LoadError(f"{name}: the checkpoint's saved_at is not a time.", source=name)
    for part, kind in (("extra", dict), ("crc32", dict), ("rng", dict)):
        if not isinstance(document.get(part), kind):
            raise LoadError(
                f"{name}: the checkpoint's JSON part has no valid {part!r}.", source=name
            )
    return document


# --- loading -------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: M,
    optimizer: O,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = True,
) -> Checkpoint[M, O]:
    """Load a checkpoint written by :func:`save_checkpoint` into skeletons.

    Everything is read and checked before anything is built or restored: the file's header and
    JSON part, the CRC-32 of every tensor, the model's keys, shapes and dtypes (as
    :func:`load_state_dict`, strictly), the optimizer's class, settings and state, and the
    random states. A problem raises one ``LoadError`` naming the file and the keys, and leaves
    the skeletons, the global random states and ``generators`` as they were. Then the random
    states are restored (with ``restore_rng``): torch's CPU generator, each CUDA device's that
    was saved and is present, Python's ``random``, NumPy's (if saved) and each of
    ``generators``, by name.

    Args:
        path: the checkpoint file.
        model: the model's skeleton (e.g. ``sample(spec)``, or on ``meta``); not changed.
        optimizer: the optimizer's skeleton, built for ``model`` with the saved settings
            (``Adam.init(model, ...)``), or ``None``. A ``TorchOptimizer`` is loaded in place
            (as ``torch.optim`` loads), and adopts the loaded model's parameters at its next
            step.
        generators: ``torch.Generator`` s to restore, by the names they were saved under (a
            saved one not given is not restored, with a ``DiffprogWarning``).
        restore_rng: restore the global random states (torch, CUDA, Python, NumPy).

    Returns:
        The :class:`Checkpoint`: ``.model``, ``.optimizer``, ``.step``, ``.extra``, ``.path``.

    Raises:
        LoadError: the file is missing, truncated, corrupt, not a checkpoint, of another
            model or optimizer, or lacks a generator asked for.
    """
    source = Path(path)
    name = os.fspath(source)
    try:
        document = _document(source)
        tensors = load_tensors(source, format="safetensors")
    except FileNotFoundError:
        raise LoadError(f"{name}: no such checkpoint file.", source=name) from None
    _check_crc(tensors, document["crc32"], name)
    loaded_model = _load_model(model, tensors, name)
    loaded_optimizer, torch_state = _load_optimizer(optimizer, model, tensors, document, name)
    restore = _rng_restorers(document["rng"], tensors, generators or {}, restore_rng, name)
    # From here on nothing can fail for a reason found in the file: state is changed.
    if torch_state is not None:
        _load_torch_optimizer(_unwrapped(loaded_optimizer)[1], torch_state, name)
    for apply in restore:
        apply()
    _warn_unrestored(document["rng"].get("generators"), generators or {}, name)
    return Checkpoint(loaded_model, loaded_optimizer, document["step"], document["extra"], source)


def _check_crc(tensors: Mapping[str, torch.Tensor], crcs: Mapping[str, Any], name: str) -> None:
    missing = sorted(set(crcs) - set(tensors))
    unlisted = sorted(set(tensors) - set(crcs))
    if missing or unlisted:
        raise LoadError(
            f"{name}: the checkpoint's tensors do not match its listing: missing "
            f"{quoted(missing) or 'none'}; not listed {quoted(unlisted) or 'none'}.",
            source=name,
            missing_keys=missing,
            unexpected_keys=unlisted,
        )
    bad = [key for key, t in tensors.items() if _crc(t) != crcs[key]]
    if bad:
        raise LoadError(
            f"{name}: the data of {quoted(bad)} is corrupt (its CRC-32 differs from the one "
            "saved).",
            source=name,
            mismatched_keys=bad,
        )


def _part(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {key[n:]: t for key, t in tensors.items() if key.startswith(prefix)}


def _load_model(model: M, tensors: Mapping[str, torch.Tensor], name: str) -> M:
    try:
        return load_state_dict(model, _part(tensors, "model."), assign=True)
    except LoadError as e:
        raise LoadError(
            f"{name}: the checkpoint's model does not fit the skeleton: {e}",
            source=name,
            missing_keys=e.missing_keys,
            unexpected_keys=e.unexpected_keys,
            mismatched_keys=e.mismatched_keys,
        ) from None


def _load_optimizer(
    optimizer: O, model: Any, tensors: Mapping[str, torch.Tensor], document: Any, name: str
) -> tuple[O, Any]:
    """The loaded pure optimizer; or, for a ``TorchOptimizer``, itself and its decoded state
    (loaded in place later, once everything else is checked)."""
    saved = document.get("optimizer")
    part = _part(tensors, "optimizer.")
    if optimizer is None:
        if saved is not None:
            raise LoadError(
                f"{name} holds an optimizer's state: pass its skeleton as optimizer=.",
                source=name,
            )
        return optimizer, None
    kind = saved.get("kind") if isinstance(saved, dict) else None
    wrappers, innermost = _unwrapped(optimizer)
    if isinstance(innermost, TorchOptimizer):
        if kind != "torch" or saved.get("wrappers") != wrappers:
            raise LoadError(
                f"{name} holds {'no optimizer' if saved is None else 'another optimizer'}'s "
                f"state, not a TorchOptimizer's{' inside ' + str(wrappers) if wrappers else ''}"
                ": pass the skeleton it was saved with.",
                source=name,
            )
        try:
            return optimizer, _decode(saved.get("state"), part, name)
        except RecursionError:
            problem = f"{name}: the optimizer's state is nested too deep."
            raise LoadError(problem, source=name) from None
    if kind != "pure":
        raise LoadError(
            f"{name} holds {'no optimizer' if saved is None else 'a TorchOptimizer'}'s state, "
            f"not a {type(optimizer).__name__}'s: pass the skeleton it was saved with.",
            source=name,
        )
    try:
        loaded = load_optimizer_state(
            optimizer,
            model,
            OptimizerState(part, saved.get("meta")),
            source=name,
        )
    except OptimizerStateError as e:
        # Named as in the file, where the optimizer's tensors sit under "optimizer.".
        e.source = name
        for keys in (e.missing_keys, e.unexpected_keys, e.mismatched_keys):
            keys[:] = [f"optimizer.{k}" for k in keys]
        raise
    return loaded, None


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], name: str) -> Any:
    """The inverse of :func:`_encode` (``tensors`` without the ``optimizer.`` prefix)."""
    if isinstance(value, list):
        return [_decode(v, tensors, name) for v in value]
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            key = value["tensor"]
            short = key[len("optimizer.") :] if isinstance(key, str) else ""
            if short not in tensors:
                raise LoadError(
                    f"{name}: the optimizer's state names a tensor {key!r} the file lacks.",
                    source=name,
                    missing_keys=[str(key)],
                )
            return tensors[short]
        if set(value) == {"tuple"} and isinstance(value["tuple"], list):
            return tuple(_decode(v, tensors, name) for v in value["tuple"])
        if set(value) == {"dict"} and isinstance(value["dict"], dict):
            return {k: _decode(v, tensors, name) for k, v in value["dict"].items()}
        if set(value) == {"items"} and isinstance(value["items"], list):
            pairs = value["items"]
            if all(isinstance(p, list) and len(p) == 2 for p in pairs):
                return {k: _decode(v, tensors, name) for k, v in pairs}
        raise LoadError(f"{name}: the optimizer's state is corrupt.", source=name)
    return value


def _load_torch_optimizer(optimizer: Any, state: Any, name: str) -> None:
    if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
        raise LoadError(f"{name}: the TorchOptimizer's state is corrupt.", source=name)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        # torch.optim checks the groups before it changes anything.
        raise LoadError(
            f"{name}: the TorchOptimizer's state does not fit this one: {e}", source=name
        ) from None


# --- random states ---------------------------------------------------------------------------


def _rng_restorers(
    rng: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    generators: Mapping[str, torch.Generator],
    restore_rng: bool,
    name: str,
) -> list[Any]:
    """Checked functions restoring each random state: each state is tried on a scratch
    generator first, so that a bad one is refused before any is set."""
    out: list[Any] = []
    named = rng.get("generators", {})
    if not isinstance(named, dict):
        raise LoadError(f"{name}: the checkpoint's generator listing is corrupt.", source=name)
    lacking = sorted(set(generators) - set(named))
    if lacking:
        raise LoadError(
            f"{name} holds no generator {quoted(lacking)} (it holds {quoted(sorted(named))}).",
            source=name,
            missing_keys=[f"rng.generator.{n}" for n in lacking],
        )
    for gname, g in generators.items():
        entry = named[gname]
        key = entry.get("tensor") if isinstance(entry, dict) else None
        state = _rng_tensor(key, tensors, name)
        _try_state(torch.Generator(device=g.device), state, f"generator {gname!r}", name)
        out.append(lambda g=g, state=state: g.set_state(state))
    if not restore_rng:
        return out
    cpu = _rng_tensor(rng.get("torch"), tensors, name)
    _try_state(torch.Generator(), cpu, "torch's CPU generator", name)
    out.append(lambda: torch.set_rng_state(cpu))
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        states = [_rng_tensor(k, tensors, name) for k in cuda] if isinstance(cuda, list) else None
        if states is None:
            problem = f"{name}: the checkpoint's CUDA random states are corrupt."
            raise LoadError(problem, source=name)
        count = min(len(states), torch.cuda.device_count())
        out.extend(
            (lambda i=i, s=states[i]: torch.cuda.set_rng_state(s, device=i)) for i in range(count)
        )
    out.append(_python_restorer(rng.get("python"), name))
    numpy_state = rng.get("numpy")
    if numpy_state is not None:
        out.append(_numpy_restorer(numpy_state, name))
    return out


def _warn_unrestored(named: Any, generators: Mapping[str, torch.Generator], name: str) -> None:
    """Warn of saved generators that were not restored: not an error (a run may not need them),
    but a resumed run that draws from a fresh generator instead silently differs from the
    uninterrupted one."""
    left = sorted(set(named) - set(generators))
    if left:
        warnings.warn(
            f"{name} holds the state of generator(s) {quoted(left)}, which are not restored: "
            f"pass generators={{{left[0]!r}: g, ...}} to load_checkpoint to resume them.",
            DiffprogWarning,
            stacklevel=3,
        )


def _rng_tensor(key: Any, tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    t = tensors.get(key) if isinstance(key, str) else None
    if t is None or t.dtype != torch.uint8 or t.dim() != 1:
        raise LoadError(
            f"{name}: the random state {key!r} is missing or not a byte tensor.",
            source=name,
            missing_keys=[str(key)],
        )
    return t


def _try_state(scratch: torch.Generator, state: torch.Tensor, what: str, name: str) -> None:
    try:
        scratch.set_state(state)
    except (RuntimeError, ValueError) as e:
        raise LoadError(f"{name}: the state of {what} is corrupt ({e}).", source=name) from None


def _python_restorer(saved: Any, name: str) -> Any:
    try:
        version, internal, gauss = saved
        state = (version, tuple(internal), gauss)
        random.Random().setstate(state)  # checked on a scratch generator first
    except (TypeError, ValueError, OverflowError) as e:
        raise LoadError(f"{name}: Python's random state is corrupt ({e}).", source=name) from None
    return lambda: random.setstate(state)


def _numpy_restorer(saved: Any, name: str) -> Any:
    try:
        import numpy
    except ModuleNotFoundError:
        return lambda: None  # saved where NumPy was used; nothing to restore without it
    try:
        kind, keys, pos, has_gauss, cached = saved
        state = (kind, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached)
        numpy.random.RandomState().set_state(state)
    except (TypeError, ValueError, OverflowError) as e:
        raise LoadError(f"{name}: NumPy's random state is corrupt ({e}).", source=name) from None
    return lambda: numpy.random.set_state(state)
