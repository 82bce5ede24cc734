"""Sharded checkpoints: one file per rank, loaded by all, on any number of ranks.

A sharded checkpoint is a folder ``step-<step>`` holding one ordinary diffprog checkpoint per
rank (``save_checkpoint``: atomic, with CRCs; each holds its rank's shards, the buffers and
its rank's random states) and, written by rank 0 once every rank has written its file, a
marker ``complete.safetensors`` (also written atomically). A folder without the marker (a
crash during a save) is never loaded. A re-save of a step removes the old marker before any
rank writes, and every rank file and the marker carry the save's token (rank 0's, broadcast):
a folder mixing files of two saves (a re-save that crashed half way) is refused on load.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from diffprog import (
    Checkpoint,
    DiffprogError,
    LoadError,
    Parameter,
    flatten_parameters,
    load_checkpoint,
    load_tensors,
    map_parameters,
    map_tensors,
    save_checkpoint,
    save_tensors,
    tensors,
)
from diffprog.distributed._shard import shard, shard_optimizer
from diffprog.optim import TorchOptimizer

__all__ = [
    "gather_checkpoint",
    "latest_sharded_checkpoint",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
]

M = TypeVar("M")
OptT = TypeVar("OptT")

_MARKER = "complete.safetensors"
_STEP = re.compile(r"step-(\d+)")
_RANK = "rank-{rank:05d}-of-{world:05d}.safetensors"
_TOKEN = "sharded_save_token"  # in every rank file's metadata and (as bytes) in the marker


def _mesh_of(model: Any) -> DeviceMesh:
    for p in flatten_parameters(model):
        if isinstance(p, DTensor):
            return p.device_mesh
    raise DiffprogError(
        "save_sharded_checkpoint needs a sharded model (diffprog.distributed.shard), and this "
        "one has no DTensor parameter. Save an unsharded model with save_checkpoint on one rank."
    )


def _refuse_torch_optimizer(optimizer: Any, caller: str) -> None:
    """Refuse a TorchOptimizer (or a wrapper around one): its state lives in a torch.optim
    optimizer, outside the values whose shards a rank file holds."""
    inner = optimizer
    while inner is not None:
        if isinstance(inner, TorchOptimizer):
            raise DiffprogError(
                f"{caller} does not take a TorchOptimizer: its state is a torch.optim "
                "optimizer's, not sharded values. Use a pure optimizer (diffprog.optim.Adam, "
                "...) on a sharded model, or unshard the model and save_checkpoint it on one "
                "rank."
            )
        inner = getattr(inner, "inner", None)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def save_sharded_checkpoint(
    folder: str | os.PathLike[str],
    *,
    model: Any,
    optimizer: Any,
    step: int,
    **extra: Any,
) -> Path:
    """Every rank writes its shards of ``model`` and ``optimizer``: one file per rank.

    Every rank of the model's mesh calls it, with the same ``step``. Each writes
    ``folder/step-<step>/rank-<r>-of-<n>.safetensors`` with :func:`~diffprog.save_checkpoint`
    (atomic, with CRCs and its own random states); after a barrier rank 0 writes the marker
    that makes the folder complete. Saving a step again first removes its marker (the
    folder is incomplete until the new one is written), and each file and the marker carry
    this save's token, so that files of two saves never load together. Nothing is
    gathered: each rank writes only what it holds.

    Args:
        folder: the run's checkpoint folder (created if missing).
        model: the sharded model.
        optimizer: its optimizer (pure, with sharded state, or a chain around one), or ``None``.
        step: the number of steps taken.
        **extra: JSON-able metadata, as for ``save_checkpoint``.

    Returns:
        The step folder written.

    Raises:
        DiffprogError: ``model`` has no sharded parameter, or its mesh has more than one
            dimension; ``optimizer`` is (or wraps) a ``TorchOptimizer``; ``extra`` uses the
            name ``sharded_save_token``.
        SaveError: as ``save_checkpoint``.

    Example:
        >>> import tempfile, torch.distributed as dist
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> from diffprog.distributed import shard
        >>> from diffprog.nn import LinearSpec
        >>> mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        >>> model = shard(sample(LinearSpec(2, 3)), mesh)
        >>> save_sharded_checkpoint(tempfile.mkdtemp(), model=model, optimizer=None, step=7).name
        'step-000000007'
        >>> dist.destroy_process_group()
    """
    _refuse_torch_optimizer(optimizer, "save_sharded_checkpoint")
    mesh = _mesh_of(model)
    if mesh.ndim != 1:
        raise DiffprogError(
            f"save_sharded_checkpoint takes a model sharded over a 1-D mesh, not {mesh.ndim}-D."
        )
    if _TOKEN in extra:
        raise DiffprogError(
            f"save_sharded_checkpoint: the metadata name {_TOKEN!r} is its own (it ties each "
            "rank's file to the save that wrote it): name your metadata otherwise."
        )
    rank, world = mesh.get_local_rank(), mesh.size()
    group = mesh.get_group()
    target = Path(folder) / f"step-{step:09d}"
    # One token per save, rank 0's, in every rank file and in the marker: a folder that holds
    # files of two saves of this step (a re-save that crashed half way) never loads as one.
    token = torch.tensor(list(uuid.uuid4().bytes), dtype=torch.uint8, device=mesh.device_type)
    dist.broadcast(token, src=dist.get_global_rank(group, 0), group=group)
    token = token.cpu()
    if rank == 0:
        target.mkdir(parents=True, exist_ok=True)
        # A re-save of this step: the folder is incomplete from now until its new marker.
        (target / _MARKER).unlink(missing_ok=True)
    dist.barrier(group=group)  # nobody writes its file before the old marker is gone
    target.mkdir(parents=True, exist_ok=True)
    local_model = map_parameters(_local, model)
    local_optimizer = None if optimizer is None else map_tensors(_local, optimizer)
    save_checkpoint(
        target / _RANK.format(rank=rank, world=world),
        model=local_model,
        optimizer=local_optimizer,
        step=step,
        **{**extra, _TOKEN: bytes(token.tolist()).hex()},
    )
    dist.barrier(group=group)  # every rank's file is whole before the marker says so
    if rank == 0:
        marker = {"world": torch.tensor([world]), "step": torch.tensor([step]), "token": token}
        save_tensors(marker, target / _MARKER)
    dist.barrier(group=group)  # and nobody goes on (or loads) before the marker is there
    return target


def latest_sharded_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The step folder of the newest complete sharded checkpoint in ``folder``, or ``None``.

    Example:
        >>> import tempfile
        >>> latest_sharded_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    root = Path(folder)
    if not root.is_dir():
        return None
    found = [
        (int(match.group(1)), entry)
        for entry in root.iterdir()
        if (match := _STEP.fullmatch(entry.name)) and (entry / _MARKER).is_file()
    ]
    return max(found)[1] if found else None


def _complete(path: str | os.PathLike[str]) -> tuple[Path, int, str | None]:
    """The step folder ``path`` names (or the newest in it), the number of ranks it has and
    its save's token (``None`` for a checkpoint written before tokens)."""
    source = Path(path)
    if not (source / _MARKER).is_file():
        latest = latest_sharded_checkpoint(source)
        if latest is None:
            raise LoadError(
                f"{source}: no complete sharded checkpoint (a step-* folder with its "
                f"{_MARKER}; a folder without it was left by an interrupted save).",
                source=os.fspath(source),
            )
        source = latest
    marker = load_tensors(source / _MARKER)
    world = int(marker["world"][0])
    token = bytes(marker["token"].tolist()).hex() if "token" in marker else None
    missing = [
        name
        for r in range(world)
        if not (source / (name := _RANK.format(rank=r, world=world))).is_file()
    ]
    if missing:
        raise LoadError(
            f"{source}: the rank files {missing} are missing.", source=os.fspath(source)
        )
    return source, world, token


def _of_save(
    loaded: Checkpoint[Any, Any],
    token: str | None,
    file: Path,
    agree: Callable[[bool], bool] = bool,
) -> Checkpoint[Any, Any]:
    """``loaded`` (a rank's file) without the save's token, once the token is the marker's
    (on every rank: ``agree`` takes a rank's finding to all ranks').

    Raises:
        LoadError: the file was written by another save than the marker (a re-save of the
            step that did not finish).
    """
    extra = dict(loaded.extra)
    found = extra.pop(_TOKEN, None)
    if not agree(found == token):
        raise LoadError(
            f"{file} (or another rank's file) was written by another save of this step than "
            "the folder's marker (a re-save that did not finish left files of two saves). "
            "Save the step again, or load an earlier step.",
            source=os.fspath(file),
        )
    return Checkpoint(loaded.model, loaded.optimizer, loaded.step, extra, loaded.path)


def _piece(n: int, index: int, pieces: int) -> int:
    """The length of piece ``index`` of ``torch.chunk(range(n), pieces)`` (DTensor's Shard)."""
    size = -(-n // pieces)
    return max(0, min(n, (index + 1) * size) - index * size)


def _local_skeleton(value: Any, index: int, pieces: int, only_parameters: bool) -> Any:
    """``value`` with each sharded tensor replaced by an empty one of piece ``index``'s shape."""

    def one(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or (only_parameters and not isinstance(t, Parameter)):
            return t
        shape = (_piece(t.shape[0], index, pieces), *t.shape[1:])
        return torch.empty(shape, dtype=t.dtype, device=t.device)

    return map_tensors(one, value)


def _assembled(skeleton: Any, parts: Sequence[Any], only_parameters: bool) -> Any:
    """The first of ``parts`` (loaded values: counts and settings included) with each tensor
    the concatenation along dimension 0 of its pieces in ``parts``; a tensor that is not
    sharded (which ``skeleton``'s tensors tell) is the first part's."""
    slots = iter(tensors(skeleton))
    pieces: Iterator[tuple[torch.Tensor, ...]] = zip(*(tensors(p) for p in parts), strict=True)

    def one(t: torch.Tensor) -> torch.Tensor:
        slot, mine = next(slots), next(pieces)
        if slot.dim() == 0 or (only_parameters and not isinstance(slot, Parameter)):
            return mine[0]
        return torch.cat([piece.detach() for piece in mine])

    return map_tensors(one, parts[0])


def _read_all(
    source: Path,
    world: int,
    token: str | None,
    model: Any,
    optimizer: Any,
    restore: Callable[[int], bool],
) -> tuple[Any, Any, Checkpoint[Any, Any]]:
    """The whole model and optimizer, from every rank's file of ``source``."""
    loaded = []
    for r in range(world):
        file = source / _RANK.format(rank=r, world=world)
        loaded.append(
            _of_save(
                load_checkpoint(
                    file,
                    model=_local_skeleton(model, r, world, True),
                    optimizer=None
                    if optimizer is None
                    else _local_skeleton(optimizer, r, world, False),
                    restore_rng=restore(r),
                ),
                token,
                file,
            )
        )
    full_model = _assembled(model, [c.model for c in loaded], True)
    full_optimizer = (
        None if optimizer is None else _assembled(optimizer, [c.optimizer for c in loaded], False)
    )
    return full_model, full_optimizer, loaded[0]


def load_sharded_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: M,
    optimizer: OptT,
    mesh: DeviceMesh,
    restore_rng: bool = True,
) -> Checkpoint[M, OptT]:
    """Load a sharded checkpoint on ``mesh``, whatever the number of ranks that saved it.

    Every rank calls it. On the number of ranks that saved it, each rank reads only its own
    file (checked as ``load_checkpoint`` checks) and restores the random states it holds
    (with ``restore_rng``). On another number, each reads every rank's file, puts the whole
    model and optimizer state together (holding the whole model for a moment) and shards
    them over ``mesh`` (:func:`~diffprog.distributed.shard`, :func:`shard_optimizer`); no
    random state is restored (there is no rank it belongs to). So a checkpoint saved on
    ``n`` ranks loads on ``m``, and on one process with :func:`gather_checkpoint`.

    Args:
        path: a step folder, or the run's folder (its newest complete step is loaded).
        model: the unsharded model's skeleton (e.g. ``sample(spec)``), not changed.
        optimizer: the skeleton of its optimizer, built for the unsharded skeleton with the
            saved settings (``Adam.init(skeleton)``), or ``None``.
        mesh: the 1-D mesh to shard over (as :func:`~diffprog.distributed.shard` does).
        restore_rng: restore the random states (same number of ranks only).

    Returns:
        The :class:`~diffprog.Checkpoint`, its model and optimizer sharded over ``mesh``.

    Raises:
        LoadError: no complete checkpoint, a rank's file missing or not fitting the
            skeletons, or written by another save of the step than the marker (a re-save
            that did not finish).
        DiffprogError: ``mesh`` has more than one dimension; ``optimizer`` is (or wraps) a
            ``TorchOptimizer``.
    """
    _refuse_torch_optimizer(optimizer, "load_sharded_checkpoint")
    source, world, token = _complete(path)
    if mesh.ndim != 1:
        raise DiffprogError(
            f"load_sharded_checkpoint shards over a 1-D mesh, not a {mesh.ndim}-D one."
        )
    rank = mesh.get_local_rank()
    if world == mesh.size():  # each rank reads its own file: its shards, as they were saved
        file = source / _RANK.format(rank=rank, world=world)
        own = _of_save(
            load_checkpoint(
                file,
                model=_local_skeleton(model, rank, world, True),
                optimizer=None
                if optimizer is None
                else _local_skeleton(optimizer, rank, world, False),
                restore_rng=restore_rng,
            ),
            token,
            file,
            lambda ok: _on_every_rank(ok, mesh),
        )
        sharded_model = _rewrapped(model, own.model, mesh, True)
        sharded_optimizer = (
            None if optimizer is None else _rewrapped(optimizer, own.optimizer, mesh, False)
        )
        return Checkpoint(sharded_model, sharded_optimizer, own.step, own.extra, source)  # type: ignore[arg-type]
    full_model, full_optimizer, first = _read_all(
        source, world, token, model, optimizer, lambda r: False
    )
    sharded_model = shard(full_model, mesh)
    sharded_optimizer = None if full_optimizer is None else shard_optimizer(full_optimizer, mesh)
    return Checkpoint(sharded_model, sharded_optimizer, first.step, first.extra, source)  # type: ignore[arg-type]


def _on_every_rank(ok: bool, mesh: DeviceMesh) -> bool:
    """Whether ``ok`` holds on every rank of ``mesh`` (so that all raise, or none)."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=mesh.device_type)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group())
    return bool(flag.item())


def _rewrapped(skeleton: Any, local: Any, mesh: DeviceMesh, only_parameters: bool) -> Any:
    """``local`` (a rank's loaded shards) with each shard a DTensor placed as ``shard`` and
    ``shard_optimizer`` place it, of the global shape of ``skeleton``'s tensor."""
    slots = iter(tensors(skeleton))

    def one(t: torch.Tensor) -> torch.Tensor:
        slot = next(slots)
        if only_parameters and not isinstance(slot, Parameter):
            return t  # a buffer: whole on every rank
        if slot.dim() == 0:
            if not only_parameters:
                return t  # scalar state: the same on every rank, plain
            return DTensor.from_local(t.detach(), mesh, [Replicate()], run_check=False)
        return DTensor.from_local(
            t.detach(),
            mesh,
            [Shard(0)],
            run_check=False,
            shape=slot.shape,
            stride=torch.empty(slot.shape, device="meta").stride(),
        )

    return map_tensors(one, local)


def gather_checkpoint(
    path: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    model: Any,
    optimizer: Any,
) -> Path:
    """Write one whole checkpoint (``save_checkpoint``'s) from a sharded one, in one process.

    No process group is needed: the rank files are read and put together. The result loads
    with :func:`~diffprog.load_checkpoint` into the unsharded model (on one process, or on
    each rank before :func:`~diffprog.distributed.shard`); it holds rank 0's random states.

    Args:
        path: a step folder, or the run's folder (its newest complete step).
        target: the file to write (``.safetensors``).
        model: the unsharded model's skeleton.
        optimizer: its optimizer's skeleton (as for :func:`load_sharded_checkpoint`), or
            ``None``.

    Returns:
        The file written.

    Raises:
        LoadError: as :func:`load_sharded_checkpoint`.
        DiffprogError: ``optimizer`` is (or wraps) a ``TorchOptimizer``.
    """
    _refuse_torch_optimizer(optimizer, "gather_checkpoint")
    source, world, token = _complete(path)
    full_model, full_optimizer, first = _read_all(
        source, world, token, model, optimizer, lambda r: False
    )
    return save_checkpoint(
        target, model=full_model, optimizer=full_optimizer, step=first.step, **first.extra
    )
