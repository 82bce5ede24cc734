"""Checkpoints of data-parallel training: rank 0 writes, every rank loads.

Built on ``diffprog.save_checkpoint`` / ``load_checkpoint`` (one safetensors file, written
under a temporary name, fsynced and renamed: a crash leaves the previous checkpoint whole).
The model and the optimizer are the same on every rank, so one file holds the training state
of any number of ranks, and a run resumes on another number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

import diffprog as dp
from diffprog import Checkpoint, DiffprogError, LoadError, SaveError
from diffprog.distributed._collective import Group, all_max, control_device, group_info, run, waited
from diffprog.distributed._data_parallel import DataParallel

__all__ = ["load_checkpoint", "save_checkpoint"]

M = TypeVar("M")
O = TypeVar("O")  # noqa: E741 (the optimizer's type, as M is the model's)


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: Any,
    optimizer: Any,
    step: int,
    group: Group = None,
    generators: Mapping[str, torch.Generator] | None = None,
    keep_last: int | None = None,
    **extra: Any,
) -> Path:
    """Rank 0 saves a training checkpoint; every rank returns once the file is complete.

    Call it on every rank with the same arguments. Rank 0 writes with
    :func:`diffprog.save_checkpoint` (atomically: a crash leaves the previous checkpoint whole),
    then tells the others whether it succeeded: that message is the barrier, so when this
    returns on any rank the file is there, and when rank 0 failed every rank raises. A
    ``DataParallel`` optimizer is saved as its inner optimizer (the state every rank holds), so
    the file is the same as one process's and loads on any number of ranks.

    Args:
        path: the file (``.safetensors``), on storage rank 0 writes to and every rank reads.
        model: the model (the same on every rank).
        optimizer: the optimizer: a ``DataParallel`` (at the end of an accumulation window),
            or any optimizer :func:`diffprog.save_checkpoint` takes, or ``None``.
        step: the optimizer steps taken.
        group: the process group (``None``: a ``DataParallel`` optimizer's, else the default
            group).
        generators: named ``torch.Generator`` s to save (rank 0's).
        keep_last: keep only this many checkpoints in the folder (see
            :func:`diffprog.save_checkpoint`).
        **extra: JSON-able metadata.

    Returns:
        The path written.

    Raises:
        DiffprogError: ``optimizer`` is a ``DataParallel`` in the middle of an accumulation
            window (its pending gradients are not saved: save after the step that syncs).
        SaveError: rank 0 could not write (on rank 0 the original error; on the others a
            ``SaveError`` saying so).
        CollectiveError: a rank died or timed out.

    Example:
        >>> import tempfile, pathlib
        >>> import torch.distributed as dist
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import Adam
        >>> from diffprog.distributed import DataParallel, load_checkpoint, save_checkpoint
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> model = sample(LinearSpec(2, 1))
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "step-0.safetensors"
        >>> path = save_checkpoint(path, model=model, optimizer=DataParallel(Adam.init(model)),
        ...                        step=0, epoch=1)
        >>> loaded = load_checkpoint(path, model=model, optimizer=DataParallel(Adam.init(model)))
        >>> loaded.extra, type(loaded.optimizer).__name__
        ({'epoch': 1}, 'DataParallel')
        >>> dist.destroy_process_group()
    """
    if group is None and isinstance(optimizer, DataParallel):
        group = optimizer.group
    rank, _ = group_info(group, "save_checkpoint")
    inner = _unwrapped(optimizer)
    error: BaseException | None = None
    target = Path(path)
    if rank == 0:
        try:
            target = dp.save_checkpoint(
                path,
                model=model,
                optimizer=inner,
                step=step,
                generators=generators,
                keep_last=keep_last,
                **extra,
            )
        except Exception as e:  # told to the others, then raised here
            error = e
    flag = torch.tensor(
        [0 if error is None else 1], dtype=torch.int64, device=control_device(group)
    )
    source = dist.get_global_rank(group, 0) if group is not None else 0
    what = "the checkpoint's barrier"
    work = run(what, group, lambda: dist.broadcast(flag, source, group=group, async_op=True))
    waited(what, group, work)
    if error is not None:
        raise error
    if int(flag) != 0:
        raise SaveError(
            f"rank 0 could not write the checkpoint {os.fspath(path)!r} (its error says why); "
            "the previous checkpoint, if any, is whole."
        )
    return target


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: M,
    optimizer: O,
    group: Group = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = False,
) -> Checkpoint[M, O]:
    """Every rank loads the checkpoint into its skeletons; all succeed or all raise.

    Each rank reads the file with :func:`diffprog.load_checkpoint` (crash-safe files, checked
    CRCs; the skeletons are not changed). Then the ranks compare notes: if any rank failed (a
    file missing on its host, say), every rank raises; if they loaded different steps (one read
    an older file), every rank raises. A ``DataParallel`` skeleton gets the saved state in its
    inner optimizer, with an empty accumulation window. The number of ranks may differ from
    the run that saved: the state is the same on every rank.

    Args:
        path: the checkpoint file, readable by every rank.
        model: this rank's model skeleton.
        optimizer: this rank's optimizer skeleton (a ``DataParallel`` around the optimizer the
            checkpoint was saved with), or ``None``.
        group: the process group (``None``: a ``DataParallel`` skeleton's, else the default
            group).
        generators: ``torch.Generator`` s to restore by name (rank 0's saved states).
        restore_rng: restore the global random states saved by rank 0. Off by default: each
            rank should draw its own numbers (dropout); seed each rank from the step instead.

    Returns:
        The :class:`diffprog.Checkpoint` (``.model``, ``.optimizer``, ``.step``, ...).

    Raises:
        LoadError: this rank could not load the file (the original error), or another rank
            could not, or the ranks loaded different steps.
        CollectiveError: a rank died or timed out.

    Example: see :func:`save_checkpoint`.
    """
    if group is None and isinstance(optimizer, DataParallel):
        group = optimizer.group
    rank, world = group_info(group, "load_checkpoint")
    inner = _unwrapped(optimizer)
    loaded: Checkpoint[M, Any] | None = None
    error: BaseException | None = None
    try:
        loaded = dp.load_checkpoint(
            path, model=model, optimizer=inner, generators=generators, restore_rng=restore_rng
        )
    except Exception as e:  # told to the others, then raised here
        error = e
    step = loaded.step if loaded is not None else 0
    notes = torch.tensor(
        [0 if error is None else 1, step, -step], dtype=torch.int64, device=control_device(group)
    )
    all_max("the checkpoint's agreement", notes, group)
    if error is not None:
        raise error
    failed, high, low = notes.tolist()
    low = -low
    name = os.fspath(path)
    if failed:
        raise LoadError(
            f"{name}: another rank (of {world}) could not load the checkpoint (its error says "
            "why; is the file on storage every rank reads?). This rank loaded it, but no rank "
            "goes on alone.",
            source=name,
        )
    assert loaded is not None
    if high != low:
        raise LoadError(
            f"{name}: the ranks loaded different steps ({low} to {high}; this rank, {rank}, "
            f"step {loaded.step}): a rank read an older file. Pass every rank the same path, "
            "on shared storage, once save_checkpoint has returned.",
            source=name,
        )
    new_optimizer: Any = loaded.optimizer
    if isinstance(optimizer, DataParallel):
        new_optimizer = optimizer._fresh(loaded.optimizer)
    return Checkpoint(loaded.model, new_optimizer, loaded.step, loaded.extra, loaded.path)


def _unwrapped(optimizer: Any) -> Any:
    """The optimizer a ``DataParallel`` wraps (refused mid-window), or ``optimizer``."""
    if not isinstance(optimizer, DataParallel):
        return optimizer
    if optimizer.micro:
        raise DiffprogError(
            f"this DataParallel is in the middle of an accumulation window ({optimizer.micro} "
            f"of {optimizer.accumulate} micro-batches taken): their gradients are not saved. "
            "Save after the step that syncs (when opt.micro == 0)."
        )
    return optimizer.inner
