"""``broadcast_model``: every rank starts from rank 0's model (parameters, buffers, frozen)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from diffprog import DiffprogError, map_tensors, named_tensors, tensors
from diffprog.distributed._collective import (
    Group,
    all_max,
    blocking,
    coalesced,
    control_device,
    group_info,
    run,
    waited,
    wire,
)

__all__ = ["broadcast_model", "check_replicas", "start_sync", "sync_tensors"]

M = TypeVar("M")


def broadcast_model(model: M, *, src: int = 0, group: Group = None) -> M:
    """Rank ``src``'s model on every rank: a new model, ``model`` itself unchanged.

    Every tensor travels: parameters, frozen parameters and buffers (BatchNorm's running
    statistics), one flat buffer per dtype and device, so one backend call each. A tensor at
    several paths (a tie) travels once and stays tied; a Parameter stays a trainable leaf.
    Call it on every rank of ``group`` after building the model (from a seed or a checkpoint)
    and before the first step: ``DataParallel`` then keeps the ranks identical.

    Args:
        model: this rank's model; every rank's must have the same structure (paths, shapes,
            dtypes, devices by kind: each rank may use its own GPU).
        src: the rank whose values everyone gets.
        group: the process group (``None``: the default group).

    Returns:
        The model with rank ``src``'s values (on ``src`` too: the same values, new tensors).

    Raises:
        DiffprogError: ``torch.distributed`` is not initialised, or the ranks' models differ
            in structure (the message names the first path that differs).
        CollectiveError: a rank died or timed out during the broadcast.

    Example:
        >>> import torch.distributed as dist
        >>> from diffprog.nn import LinearSpec
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> model = sample(LinearSpec(2, 1))
        >>> same = broadcast_model(model)
        >>> torch.equal(same.weight, model.weight), same.weight is model.weight
        (True, False)
        >>> dist.destroy_process_group()
    """
    rank, _ = group_info(group, "broadcast_model")
    _check_same_structure(named_tensors(model), group)
    every = tensors(model)  # a tie once
    values = sync_tensors(every, "broadcast", src=src, group=group)
    new = {id(t): v for t, v in zip(every, values, strict=True)}
    if rank == src:
        new = {key: v.clone() for key, v in new.items()}  # new tensors on src too
    return map_tensors(lambda t: new[id(t)].requires_grad_(False), model)


def sync_tensors(
    tensors: Sequence[torch.Tensor],
    how: Literal["broadcast", "average"],
    *,
    src: int = 0,
    group: Group = None,
) -> list[torch.Tensor]:
    """Rank ``src``'s ``tensors``, or their mean over the ranks, on every rank.

    One backend call per dtype and device (the tensors travel as one flat buffer each). What
    ``DataParallel`` does with the model's buffers (``buffers=``), for any tensors.

    Args:
        tensors: this rank's tensors; every rank gives the same shapes and dtypes, in order.
        how: ``"broadcast"`` (rank ``src``'s values) or ``"average"`` (the mean over the
            ranks of the floating point and complex ones; the others are broadcast).
        src: the rank whose values are broadcast.
        group: the process group (``None``: the default group).

    Returns:
        New tensors (detached), in the order given; the ones given are not changed.

    Raises:
        DiffprogError: ``torch.distributed`` is not initialised.
        CollectiveError: a rank died or timed out.

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> sync_tensors([torch.tensor([1.0, 3.0]), torch.tensor([7])], "average")
        [tensor([1., 3.]), tensor([7])]
        >>> dist.destroy_process_group()
    """
    return start_sync(tensors, how, src=src, group=group)()


def start_sync(
    tensors: Sequence[torch.Tensor],
    how: Literal["broadcast", "average"],
    *,
    src: int = 0,
    group: Group = None,
) -> Callable[[], list[torch.Tensor]]:
    """:func:`sync_tensors` launched asynchronously: call the result to wait for the tensors."""
    rank, world = group_info(group, "sync_tensors")
    pending = []
    for dtype, device, indices in coalesced(tensors):
        with torch.no_grad():
            if rank == src or how == "average":
                flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
            else:
                size = sum(tensors[i].numel() for i in indices)
                flat = torch.empty(size, dtype=dtype, device=device)
        averaged = how == "average" and (dtype.is_floating_point or dtype.is_complex)
        what = f"the {'all-reduce' if averaged else 'broadcast'} of the {dtype} tensors"
        source = dist.get_global_rank(group, src) if group is not None else src
        work = run(what, group, functools.partial(_launch, flat, averaged, source, group))
        pending.append((what, work, flat, indices, averaged))

    def result() -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for what, work, flat, indices, averaged in pending:
            waited(what, group, work)
            if averaged:
                flat.div_(world)
            offset = 0
            for i in indices:
                n = tensors[i].numel()
                out[i] = flat[offset : offset + n].view(tensors[i].shape)
                offset += n
        return [t for t in out if t is not None]

    return result


def _launch(flat: torch.Tensor, averaged: bool, source: int, group: Group) -> Any:
    """The asynchronous all-reduce (sum) or broadcast of ``flat``; its work handle."""
    if averaged:
        return dist.all_reduce(wire(flat), group=group, async_op=True)
    return dist.broadcast(wire(flat), source, group=group, async_op=True)


def _check_same_structure(named: list[tuple[str, torch.Tensor]], group: Group) -> None:
    """Raise on every rank unless every rank's model has the same paths, shapes and dtypes."""
    rows = [(path, tuple(t.shape), str(t.dtype), t.device.type) for path, t in named]
    digest = hashlib.sha256(repr(rows).encode()).digest()
    code = int.from_bytes(digest[:7], "little")  # fits an int64
    both = torch.tensor([code, -code], dtype=torch.int64, device=control_device(group))
    all_max("the structure check", both, group)
    high, low = both.tolist()
    if high == -low:
        return
    everyone: list[object] = [None] * dist.get_world_size(group)
    blocking("the structure check", group, lambda: dist.all_gather_object(everyone, rows, group))
    first = everyone[0]
    assert isinstance(first, list)
    for r, other in enumerate(everyone):
        assert isinstance(other, list)
        if other != first:
            # strict=False: the lists may differ in length, which the default says.
            diff = next(
                (
                    f"{a} on rank 0 but {b} on rank {r}"
                    for a, b in zip(first, other, strict=False)
                    if a != b
                ),
                f"{len(first)} tensors on rank 0 but {len(other)} on rank {r}",
            )
            raise DiffprogError(
                f"the ranks' models differ in structure ({diff}; as (path, shape, dtype, "
                "device type)). Build the same model on every rank (same spec, same "
                "dtype), then broadcast it."
            )


def check_replicas(tensors: Sequence[torch.Tensor], group: Group) -> None:
    """Raise on every rank unless every rank holds the same tensors, bit for bit.

    One all-reduce of four integers: a hash of the shapes and dtypes, and a fingerprint of the
    values (the sum of their bit patterns as integers, weighted by position: exact, whatever
    the order of summation). ``DataParallel`` calls it before its first step with the
    model's parameters and frozen tensors (not its buffers, which each rank's forward pass has
    just updated), so that a model not broadcast (each rank drew its own) is refused rather
    than trained as diverging replicas.
    """
    group_info(group, "DataParallel")  # says how to start torch.distributed if it is not
    rows = [(tuple(t.shape), str(t.dtype)) for t in tensors]
    digest = hashlib.sha256(repr(rows).encode()).digest()
    code = int.from_bytes(digest[:7], "little")
    device = control_device(group)
    total = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for i, t in enumerate(tensors):
            total += (_bits(t).sum(dtype=torch.int64) * (i + 1)).to(device)
    notes = torch.stack([torch.tensor(code, device=device), torch.tensor(-code, device=device)])
    notes = torch.cat([notes, torch.stack([total, -total])])
    all_max("the replica check", notes, group)
    high_code, low_code, high, low = (int(v) for v in notes.tolist())
    if high_code != -low_code:
        raise DiffprogError(
            "the ranks' models differ in structure (the shapes or dtypes of their parameters or "
            "frozen tensors): build the same model on every rank, then "
            "broadcast_model(model) before the first step."
        )
    if high != -low:
        raise DiffprogError(
            "the ranks' models hold different values at the first step (parameters or frozen "
            "tensors): each rank would train its own copy with the same averaged "
            "gradients, and they would never agree. Call "
            "model = broadcast_model(model) on every rank before training (or load the same "
            "checkpoint on every rank)."
        )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers of its element size (a view; complex as pairs)."""
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    kind = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return flat.view(kind)
