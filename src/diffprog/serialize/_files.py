"""Model files: safetensors (the default) and weights-only ``.pt`` state dicts."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar, overload

import torch

from diffprog._random import DeviceLike
from diffprog.serialize import _safetensors
from diffprog.serialize._atomic import atomic_write
from diffprog.serialize._errors import LoadError, SaveError
from diffprog.serialize._state_dict import (
    KeyMap,
    LoadResult,
    Stored,
    load_into,
    not_loadable,
    state_dict,
)

__all__ = ["Format", "load_params", "load_tensors", "save_params", "save_tensors"]

T = TypeVar("T")
Format = Literal["safetensors", "pt"]
PathLike = str | os.PathLike[str]

_SUFFIXES: dict[str, Format] = {
    ".safetensors": "safetensors",
    ".pt": "pt",
    ".pth": "pt",
    ".bin": "pt",
}
# The metadata key under which a safetensors file lists its aliases (tied keys stored once):
# a JSON object {alias: stored key}.
ALIASES = "diffprog.aliases"


def _format_for_saving(path: PathLike, format: Format | None) -> Format:
    if format is not None:
        if format not in ("safetensors", "pt"):
            raise ValueError(f"format must be 'safetensors' or 'pt', not {format!r}.")
        return format
    suffix = Path(path).suffix.lower()
    found = _SUFFIXES.get(suffix)
    if found is None:
        raise ValueError(
            f"cannot tell the format of {os.fspath(path)!r} from its suffix {suffix!r}: name "
            "it .safetensors (or .pt/.pth/.bin), or pass format='safetensors' or format='pt'."
        )
    return found


def _sniff(head: bytes) -> Format | None:
    """The format the first bytes of a file show, if any."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip archive: torch.save's format
        return "pt"
    if head[8:9] == b"{":  # a length, then a JSON header (a zip or torch pickle has no '{' there)
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle (protocol 2 or later): torch.save's legacy format
        return "pt"
    return None


def _format_for_loading(path: PathLike, f: BinaryIO, format: Format | None) -> Format:
    """The format to read ``f`` as: ``format`` if given (and the content agrees), else the one
    its first bytes show, else the one its suffix names."""
    head = f.read(9)
    f.seek(0)
    seen = _sniff(head)
    if format is not None:
        if format not in ("safetensors", "pt"):
            raise ValueError(f"format must be 'safetensors' or 'pt', not {format!r}.")
        if seen is not None and seen != format:
            raise LoadError(
                f"{os.fspath(path)} is not a {format} file: it looks like a {seen} file. "
                f"Pass format={seen!r} or format=None.",
                source=os.fspath(path),
            )
        return format
    chosen = seen or _SUFFIXES.get(Path(path).suffix.lower())
    if chosen is None:
        raise LoadError(
            f"{os.fspath(path)} is neither a safetensors file nor a torch .pt file "
            f"(it starts with {head!r}).",
            source=os.fspath(path),
        )
    return chosen


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    format: Format | None = None,
    metadata: Mapping[str, str] | None = None,
    durable: bool = True,
) -> None:
    """Write a state dict to ``path``: safetensors, or a ``.pt`` file ``torch.load`` reads.

    The format is ``format``, else the suffix's (``.safetensors``; ``.pt``, ``.pth``,
    ``.bin``). Keys that hold one tensor (the same tensor object, or the same view of the same
    memory: a tie) are stored once: in safetensors under the first key, the others listed in
    the metadata as aliases (``"diffprog.aliases"``); in a ``.pt`` file as one shared storage,
    as ``torch.save`` does. The file is written to a temporary file and renamed, so a crash
    never leaves a half-written file under ``path`` (``torch.save`` and
    ``safetensors.torch.save_file`` write in place).

    Args:
        tensors: ``{key: tensor}`` (e.g. :func:`state_dict`); any device.
        path: the file to write (replaced if it exists).
        format: ``"safetensors"`` or ``"pt"``; by default from the suffix.
        metadata: strings to store in a safetensors file's ``__metadata__``.
        durable: fsync the file before the rename and the folder after it, so that the file
            survives a power loss or an OS crash too (the default). ``durable=False`` is
            still safe against a killed process. (On ext4 the fsync costs little: renaming
            over an existing file makes the kernel write the new one out anyway, and without
            the fsync that measured slower, see ``benchmarks/README.md``.)

    Raises:
        SaveError: a value is not a dense tensor with values (``meta``, sparse), or its dtype
            cannot be stored in safetensors.
        ValueError: the format cannot be told, or ``metadata`` is given for a ``.pt`` file.
    """
    chosen = _format_for_saving(path, format)
    unique, aliases = _dedup(tensors)
    if chosen == "pt":
        if metadata:
            raise ValueError("metadata= is stored in safetensors files only.")
        # Plain CPU tensors in a plain dict: what torch.load's safe default (weights_only)
        # reads. One tensor object per tie, so torch.save stores it once.
        hosted = {key: _plain(key, t) for key, t in unique.items()}
        out = {key: hosted[aliases.get(key, key)] for key in tensors}
        with atomic_write(path, durable) as f:
            torch.save(out, f)
        return
    meta = {"format": "pt"}  # what Hugging Face tools expect of a file written from torch
    if aliases:
        meta[ALIASES] = json.dumps(aliases)
    for key, value in (metadata or {}).items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise ValueError(f"metadata must map strings to strings; got {key!r}: {value!r}.")
        if key == ALIASES:
            raise ValueError(f"the metadata key {ALIASES!r} is diffprog's own.")
        meta[key] = value
    with atomic_write(path, durable) as f:
        _safetensors.write(f, unique.items(), meta)


def _dedup(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store (first key of each tie) and the aliases {later key: first key}."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[object, str] = {}
    for key, t in tensors.items():
        if not isinstance(key, str) or key == "__metadata__":
            raise SaveError(
                f"the key {key!r} cannot be saved: keys are strings, not '__metadata__'."
            )
        if not isinstance(t, torch.Tensor):
            raise SaveError(f"{key!r} holds a {type(t).__name__}, not a tensor.")
        if t.layout != torch.strided:
            raise SaveError(f"{key!r} is a {t.layout} tensor; only dense tensors can be saved.")
        if t.is_meta:
            raise SaveError(
                f"{key!r} is on the meta device and has no values to save. Load or compute "
                "the model's values first."
            )
        if type(t).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
            # A wrapper subclass (DTensor) holds no memory of its own: writing its data
            # pointer would crash or save a shard as if it were the whole tensor.
            raise SaveError(
                f"{key!r} is a {type(t).__name__} (a sharded tensor), which cannot be saved "
                "as one tensor. Save the whole model with diffprog.distributed.unshard(model) "
                "first, or each rank's shards with diffprog.distributed.save_sharded_checkpoint."
            )
        # The same view of the same memory is a tie (torch's state_dict gives tied weights as
        # separate tensors sharing storage). Empty tensors hold no memory to share.
        ident = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride()) if t.numel() else key
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
            unique[key] = t
    return unique, aliases


def _plain(key: str, t: torch.Tensor) -> torch.Tensor:
    """A plain, compact CPU tensor for a ``.pt`` file (no subclass: weights_only reads it)."""
    t = t.detach().to("cpu")
    if type(t) is not torch.Tensor:
        t = t.as_subclass(torch.Tensor)
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)  # a view: not its whole storage
    return t


def save_params(
    model: Any,
    path: PathLike,
    *,
    format: Format | None = None,
    metadata: Mapping[str, str] | None = None,
    durable: bool = True,
) -> None:
    """Save every tensor of ``model`` (its :func:`state_dict`) to a file.

    Hasktorch's ``saveParams``, by name: a standard safetensors file (``.safetensors``, read
    by ``safetensors.torch.load_file`` and every safetensors tool) or a ``.pt`` state dict
    that plain ``torch.load`` reads; the keys are the :func:`state_dict` keys and a tied
    tensor is stored once (see :func:`save_tensors`). Written atomically.

    Args:
        model: any model value.
        path: the file; its suffix chooses the format unless ``format`` is given.
        format: ``"safetensors"`` or ``"pt"``.
        metadata: strings to store in a safetensors file's ``__metadata__``.
        durable: fsync the file and its folder (see :func:`save_tensors`).

    Raises:
        SaveError: a tensor of the model has no values (``meta``) or cannot be stored.

    Example:
        >>> import diffprog as dp, tempfile, os
        >>> from diffprog.nn import LinearSpec
        >>> layer = dp.sample(LinearSpec(3, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "layer.safetensors")
        >>> dp.save_params(layer, path)
        >>> back = dp.load_params(dp.sample(LinearSpec(3, 2), device="meta"), path)
        >>> torch.equal(back.weight, layer.weight), back.weight.requires_grad
        (True, True)
    """
    save_tensors(state_dict(model), path, format=format, metadata=metadata, durable=durable)


def _safetensors_source(
    f: io.BufferedReader, name: str, mmap: bool = False, wanted: Collection[str] = ()
) -> dict[str, Stored]:
    """A safetensors file's tensors (aliases included), described; read on demand (or, with
    ``mmap``, mapped: views of the file's pages, read as they are used). ``wanted``: the keys
    a skeleton asks for, which a ``save_model`` tie entry of the metadata may supply."""
    size = os.fstat(f.fileno()).st_size
    header = _safetensors.read_header(f, size, name)
    # MAP_PRIVATE: writes to the tensors stay in this process; the file is never written.
    storage: torch.UntypedStorage | None = None
    if mmap:
        mapped = torch.UntypedStorage.from_file(name, shared=False, nbytes=size)
        assert isinstance(mapped, torch.UntypedStorage)
        storage = mapped
    out: dict[str, Stored] = {}
    for key, entry in header.entries.items():

        def read(entry: _safetensors.Entry = entry, key: str = key) -> torch.Tensor:
            if storage is not None:
                return _safetensors.map_tensor(f, storage, entry, key, name)
            return _safetensors.read_tensor(f, entry, key, name)

        out[key] = Stored(entry.dtype, entry.shape, key, read)
    for alias, target in _aliases(header.metadata, name).items():
        if target not in out:
            raise LoadError(
                f"{name} is not a valid safetensors file: the alias {alias!r} names "
                f"{target!r}, which it does not hold.",
                source=name,
                mismatched_keys=[alias],
            )
        out.setdefault(alias, out[target])
    # safetensors.torch.save_model stores a tied tensor once and records each key it dropped
    # in the metadata as {dropped key: kept key}, which its load_model reads only for a key the
    # model asks for and the file lacks. Do the same: any other metadata entry is the user's,
    # whatever its value (an entry {"init": "weight"} is no tensor).
    for wanted_key in wanted:
        kept = header.metadata.get(wanted_key)
        if wanted_key not in out and kept is not None and kept in header.entries:
            out[wanted_key] = out[kept]
    return out


def _aliases(metadata: Mapping[str, str], name: str) -> dict[str, str]:
    text = metadata.get(ALIASES)
    if text is None:
        return {}
    try:
        aliases = json.loads(text)
    except (ValueError, RecursionError):
        aliases = None
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise LoadError(
            f"{name} is not a valid diffprog safetensors file: its {ALIASES!r} metadata is "
            "not a JSON object of strings.",
            source=name,
        )
    return aliases


def _pt_source(path: PathLike, name: str) -> dict[str, Stored]:
    """A ``.pt`` file's tensors, read with ``torch.load(weights_only=True)`` only."""
    try:
        # weights_only=True: torch's restricted unpickler, which builds tensors and plain
        # containers and refuses every other global, so a file can never run code. Passed
        # explicitly, it is not overridden by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
        data = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise LoadError(
            f"{name} was refused: it is not a plain torch file of tensors "
            f"(torch.load(weights_only=True) says: {_first_line(e)}). diffprog never unpickles "
            "other objects, which could run code. Load only files from sources you trust; "
            "to read one you trust that holds other objects, use torch.load yourself and pass "
            "its state dict to load_state_dict.",
            source=name,
        ) from None
    except Exception as e:  # a truncated or corrupt archive fails in many ways inside torch
        raise LoadError(
            f"{name} is not a readable torch .pt file ({type(e).__name__}: {_first_line(e)}).",
            source=name,
        ) from None
    if not isinstance(data, Mapping):
        raise LoadError(
            f"{name} holds a {type(data).__name__}, not a state dict (a mapping of keys to "
            "tensors).",
            source=name,
        )
    out: dict[str, Stored] = {}
    owners: dict[int, set[object]] = {}  # storage -> the idents of the tensors viewing it
    for key, t in data.items():
        problem = not_loadable(key, t)
        if problem:
            raise LoadError(f"{name}: {problem}.", source=name, mismatched_keys=[str(key)])
        storage = t.untyped_storage().data_ptr()
        ident = (t.dtype, storage, t.storage_offset(), tuple(t.shape), t.stride())
        owners.setdefault(storage, set()).add(ident)
        out[key] = Stored(t.dtype, tuple(t.shape), ident, t.detach)
    for key, stored in out.items():
        t = data[key]
        shared = len(owners[t.untyped_storage().data_ptr()]) > 1
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if shared or not whole or not t.is_contiguous():
            # Two keys that view one storage (torch.save keeps views as views) would be two
            # parameters sharing memory: an in-place update of one would write into the
            # other. Each gets its own copy (keys of one tie share one ident: one copy). A
            # view of a larger storage is compacted, not to keep the rest alive.
            out[key] = Stored(stored.dtype, stored.shape, stored.ident, _compact(t))
    return out


def _compact(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t.detach().clone(memory_format=torch.contiguous_format)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 300 else line[:300] + "..."


def load_tensors(path: PathLike, *, format: Format | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors or ``.pt`` file, on the CPU.

    Aliases (tied keys stored once) come back under each key, as one tensor object. A
    ``.pt`` file is read with ``torch.load(weights_only=True)`` only.

    Args:
        path: the file.
        format: ``"safetensors"`` or ``"pt"``; by default the file's content decides.

    Returns:
        ``{key: tensor}`` in the file's order.

    Raises:
        LoadError: the file is truncated, corrupt, of another format, or not a state dict.
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        if _format_for_loading(path, f, format) == "pt":
            source = _pt_source(path, name)
        else:
            source = _safetensors_source(f, name)
        read: dict[object, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for key, stored in source.items():
            t = read.get(stored.ident)
            if t is None:
                t = read[stored.ident] = stored.read()
            out[key] = t
    return out


@overload
def load_params(
    skeleton: T,
    path: PathLike,
    *,
    strict: Literal[True] = True,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
    key_map: KeyMap | None = None,
    check_finite: bool = False,
    format: Format | None = None,
    mmap: bool = True,
) -> T: ...
@overload
def load_params(
    skeleton: T,
    path: PathLike,
    *,
    strict: Literal[False],
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
    key_map: KeyMap | None = None,
    check_finite: bool = False,
    format: Format | None = None,
    mmap: bool = True,
) -> LoadResult: ...
@overload
def load_params(
    skeleton: T,
    path: PathLike,
    *,
    strict: bool,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
    key_map: KeyMap | None = None,
    check_finite: bool = False,
    format: Format | None = None,
    mmap: bool = True,
) -> T | LoadResult: ...
def load_params(
    skeleton: T,
    path: PathLike,
    *,
    strict: bool = True,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
    key_map: KeyMap | None = None,
    check_finite: bool = False,
    format: Format | None = None,
    mmap: bool = True,
) -> T | LoadResult:
    """A copy of ``skeleton`` holding the tensors of a safetensors or ``.pt`` file.

    Hasktorch's ``loadParams``, by name: :func:`load_state_dict`'s semantics (strict keys,
    shape and dtype checks, trainable leaves, buffers, frozen parameters, ties), reading from
    the file only the tensors the skeleton has, each straight into its final buffer. Sample
    the skeleton on ``meta`` (``sample(spec, device="meta")``) to load a large model without
    initialising it first or allocating it twice. Every check runs before the model is built,
    so an error never leaves half a model; a ``.pt`` file is read with
    ``torch.load(weights_only=True)`` only, so a file can never run code.

    Args:
        skeleton: the model whose structure to fill (never changed).
        path: a file written by :func:`save_params`, ``safetensors.torch.save_file`` or
            ``torch.save(module.state_dict())``.
        strict, device, dtype, key_map, check_finite: as :func:`load_state_dict`.
        format: ``"safetensors"`` or ``"pt"``; by default the file's content decides.
        mmap: (safetensors) map the file rather than read it, as
            ``safetensors.torch.load_file`` does (the default): the CPU tensors that need no
            conversion are views of the file's pages, read as they are first used. The model
            then depends on the file: do not change the file in place while it is in use
            (writing it anew, as :func:`save_params` does, is safe; a tool writing into the
            same file can change the model's values or crash the process). The mapping is
            private: writes to the tensors never reach the file. ``mmap=False`` reads the
            file into memory the model owns.

    Returns:
        The new model; with ``strict=False``, a :class:`LoadResult`.

    Raises:
        LoadError: naming the file and every offending key (truncated or corrupt file,
            another format, a pickle with other objects, missing or unexpected keys, shape or
            dtype mismatches, tied keys with different values, non-finite values when
            ``check_finite``). Nothing is loaded.
        FileNotFoundError: there is no such file.
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        if _format_for_loading(path, f, format) == "pt":
            source = _pt_source(path, name)
        else:
            # The skeleton's keys, for a tie a save_model file records in its metadata (with
            # a key_map the file's keys are other names: no such look-up).
            wanted = state_dict(skeleton).keys() if key_map is None else ()
            source = _safetensors_source(f, name, mmap, wanted)
        result = load_into(
            skeleton,
            source,
            name=f"file {name}",
            strict=strict,
            device=device,
            dtype=dtype,
            key_map=key_map,
            check_finite=check_finite,
            mode="fresh",
        )
    return result.model if strict else result
