"""The safetensors format, read and written directly.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (each
tensor's dtype, shape and byte range, plus an optional ``__metadata__`` dict of strings), then
the tensors' bytes. Why not call ``safetensors.torch``: its reader builds every tensor in the
file (a model loaded into a skeleton needs only the model's keys) and its errors come from deep
inside its Rust core; reading the header here first lets every check run before any tensor is
allocated, and lets each tensor be read straight into the one buffer it will live in (loading
into a ``meta`` skeleton allocates the model once, not file mapping plus copies). The files are
standard: ``safetensors.torch.load_file`` reads what this writes, and this reads what it writes.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import torch

from diffprog.serialize._errors import LoadError, SaveError

__all__ = ["DTYPES", "Entry", "Header", "map_tensor", "read_header", "read_tensor", "write"]

# safetensors' dtype names (as safetensors.torch maps them).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The safetensors library refuses headers above 100 MB; so does this reader.
MAX_HEADER = 100_000_000
# safetensors stores little-endian bytes; the tensors' own bytes are written and read as they
# are, which is right on every platform torch supports (all little-endian).
assert sys.byteorder == "little", "diffprog.serialize needs a little-endian machine"


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: where its bytes are and what they hold."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset of the first byte, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A checked header: the tensors by key, in the file's order, and the metadata."""

    entries: dict[str, Entry]
    metadata: dict[str, str]


def _bad(path: str, problem: str) -> LoadError:
    return LoadError(f"{path} is not a valid safetensors file: {problem}.", source=path)


def read_header(f: BinaryIO, size: int, path: str) -> Header:
    """Read and check the header of the safetensors file ``f`` of ``size`` bytes.

    Every check the format asks for runs here, before any tensor is read: a readable JSON
    object, known dtypes, non-negative integer shapes, byte ranges that match the shapes and
    cover the data exactly, once, with no holes (so a truncated file is caught here too).

    Raises:
        LoadError: naming ``path`` and what is wrong.
    """
    if size < 8:
        raise _bad(path, f"it has {size} bytes, fewer than the 8 of the header's length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER:
        raise _bad(path, f"its header length {n} is over the {MAX_HEADER} bytes allowed")
    if 8 + n > size:
        raise _bad(path, f"its header says {n} bytes but the file has {size - 8} after the length")
    raw = f.read(n)
    try:
        if not raw.startswith(b"{"):
            raise ValueError("the header does not start with '{'")
        parsed = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError too
        raise _bad(path, f"its header is not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise _bad(path, "its header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "its __metadata__ is not an object of strings")
    entries = {key: _entry(key, info, path) for key, info in parsed.items()}
    _check_layout(entries, 8 + n, size, path)
    start = 8 + n
    return Header(
        {k: Entry(e.dtype, e.shape, start + e.begin, e.nbytes) for k, e in entries.items()},
        metadata,
    )


def _entry(key: str, info: object, path: str) -> Entry:
    """One header entry, checked: ``{"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}``."""
    if not isinstance(info, dict):
        raise _bad(path, f"the entry of {key!r} is not an object")
    dtype = DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise _bad(path, f"{key!r} has an unknown dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(path, f"{key!r} has a bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"{key!r} has bad data_offsets {offsets!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(
            path,
            f"{key!r} has shape {shape} of {dtype} ({nbytes} bytes) but data_offsets "
            f"{offsets} ({offsets[1] - offsets[0]} bytes)",
        )
    return Entry(dtype, tuple(shape), offsets[0], nbytes)


def _check_layout(entries: Mapping[str, Entry], start: int, size: int, path: str) -> None:
    """The byte ranges follow each other from 0 and end where the file ends."""
    end = 0
    for key, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].nbytes)):
        if e.begin != end:
            what = "overlaps the previous tensor" if e.begin < end else "leaves a gap before it"
            raise _bad(path, f"the data of {key!r} {what}")
        end = e.begin + e.nbytes
    if start + end != size:
        if start + end > size:
            problem = f"it is truncated: the header needs {start + end} bytes, the file has {size}"
        else:
            problem = f"{size - start - end} bytes follow the last tensor"
        raise _bad(path, problem)


def read_tensor(f: io.BufferedReader, entry: Entry, key: str, path: str) -> torch.Tensor:
    """Read one tensor into a new CPU tensor (its only buffer: no copy)."""
    t = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        f.seek(entry.begin)
        view = _bytes_of(t)
        done = 0
        while done < entry.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise _bad(path, f"it ended inside the data of {key!r} (truncated while reading)")
            done += got
    _check_bool(t, entry, key, path)
    return t


def map_tensor(
    f: io.BufferedReader, storage: torch.UntypedStorage, entry: Entry, key: str, path: str
) -> torch.Tensor:
    """One tensor as a view of ``storage``, the file mapped into memory (nothing is read until
    the tensor is used); read into memory instead if its offset is not aligned for its dtype."""
    if entry.begin % entry.dtype.itemsize:
        return read_tensor(f, entry, key, path)
    strides = [1] * len(entry.shape)  # contiguous
    for i in range(len(entry.shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(entry.shape[i + 1], 1)
    t = torch.empty(0, dtype=entry.dtype).set_(
        storage, entry.begin // entry.dtype.itemsize, entry.shape, strides
    )
    _check_bool(t, entry, key, path)
    return t


def _check_bool(t: torch.Tensor, entry: Entry, key: str, path: str) -> None:
    if entry.dtype is torch.bool and entry.nbytes and int(t.view(torch.uint8).max()) > 1:
        # torch assumes bool bytes are 0 or 1; anything else gives wrong comparisons.
        raise _bad(path, f"the bool tensor {key!r} holds bytes other than 0 and 1")


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a writable buffer (no numpy needed)."""
    nbytes = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def write(
    f: BinaryIO, tensors: Iterable[tuple[str, torch.Tensor]], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` (keys unique, each stored as given) and ``metadata`` to ``f``.

    Raises:
        SaveError: a tensor has no data (``meta``) or a dtype safetensors cannot store.
    """
    items = [(key, _host(key, t)) for key, t in tensors]
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, t in items:
        nbytes = t.numel() * t.element_size()
        header[key] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writes it
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, t in items:
        if t.numel():
            f.write(_bytes_of(t))


def _host(key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous, little-endian CPU tensor, ready to be written as bytes."""
    if t.is_meta:
        raise SaveError(
            f"{key!r} is on the meta device and has no values to save. Load or compute "
            "the model's values first."
        )
    if t.layout != torch.strided:
        raise SaveError(f"{key!r} is a {t.layout} tensor; only dense tensors can be saved.")
    if t.dtype not in _NAMES:
        raise SaveError(
            f"{key!r} has dtype {t.dtype}, which safetensors cannot store. Convert it first, "
            "or save a .pt file."
        )
    return t.detach().to("cpu").contiguous()
