"""The collectives every part of ``diffprog.distributed`` uses: coalesced, checked, named.

A list of tensors travels as one flat buffer per (dtype, device): one call of the backend per
group, not one per tensor. Every wait goes through :func:`waited`, which turns the backend's
failure (a dead peer, a timeout) into a :class:`CollectiveError` naming what failed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from diffprog import DiffprogError
from diffprog.distributed._errors import CollectiveError

__all__ = [
    "Group",
    "all_max",
    "blocking",
    "coalesced",
    "control_device",
    "group_devices",
    "group_info",
    "run",
    "waited",
    "wire",
]

Group = Any  # a torch.distributed ProcessGroup, or None for the default group
T = TypeVar("T")


def group_info(group: Group, caller: str) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size.

    Raises:
        DiffprogError: ``torch.distributed`` is not initialised (says how to do it).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise DiffprogError(
            f"{caller} needs torch.distributed: call torch.distributed.init_process_group("
            '"gloo") (CPU) or ("nccl") (GPU) first in every process, e.g. under torchrun '
            "(docs/distributed.md)."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def run(what: str, group: Group, call: Callable[[], T]) -> T:
    """``call()``, the launch of an asynchronous collective, with the backend's refusal raised
    as a ``CollectiveError`` that says so (``stage="start"``: not a dead peer, which a wait
    reports)."""
    return _checked(what, group, call, "start")


def blocking(what: str, group: Group, call: Callable[[], T]) -> T:
    """``call()``, a collective that launches and waits in one (``all_gather_object``), its
    failure raised as a ``CollectiveError`` of a wait."""
    return _checked(what, group, call, "wait")


def waited(what: str, group: Group, work: Any) -> None:
    """Wait for an asynchronous collective, naming ``what`` if it fails."""
    if work is not None:
        _checked(what, group, work.wait, "wait")


def _checked(what: str, group: Group, call: Callable[[], T], stage: Literal["start", "wait"]) -> T:
    try:
        return call()
    except (RuntimeError, OSError) as e:  # DistBackendError, gloo's IOError are RuntimeErrors
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise CollectiveError(what, rank, world, e, stage=stage) from e


def all_max(what: str, notes: torch.Tensor, group: Group) -> None:
    """``notes`` (small integers on :func:`control_device`) made their maximum over the ranks,
    in place: launched, then waited for (each failure named as such)."""
    work = run(what, group, lambda: dist.all_reduce(notes, dist.ReduceOp.MAX, group, True))
    waited(what, group, work)


def group_devices(group: Group) -> list[str]:
    """The device types ``group``'s backend serves (``["cuda"]`` for NCCL).

    Read from ``torch.distributed.get_backend(group)``: a device map (``"cpu:gloo,cuda:nccl"``)
    names them; a single backend's are ``torch.distributed.Backend.backend_capability``'s
    (a backend it does not know: ``["cpu"]``).
    """
    backend = str(dist.get_backend(group))
    if ":" in backend:
        return [part.split(":", 1)[0].strip() for part in backend.split(",")]
    return list(dist.Backend.backend_capability.get(backend.lower(), ["cpu"]))


def control_device(group: Group) -> torch.device:
    """Where the small control tensors of ``group``'s collectives go (flags, checks, barriers).

    The CPU when the group's backend serves it (gloo, a ``"cpu:gloo,cuda:nccl"`` map), else
    this process's current device of the first type it serves (NCCL: the current CUDA device,
    which ``torch.cuda.set_device(local_rank)`` chose).

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> control_device(None)
        device(type='cpu')
        >>> dist.destroy_process_group()
    """
    kinds = group_devices(group)
    if "cpu" in kinds or not kinds:
        return torch.device("cpu")
    kind = kinds[0]
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    module = getattr(torch, kind, None)
    current = getattr(module, "current_device", None)
    return torch.device(kind, current()) if callable(current) else torch.device(kind)


def wire(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` as the backends take it: complex as real pairs, bool as bytes (a view)."""
    if flat.is_complex():
        return torch.view_as_real(flat)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat


def coalesced(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.dtype, torch.device, list[int]]]:
    """The indices of ``tensors`` grouped by (dtype, device), in order of first appearance."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return [(dtype, device, indices) for (dtype, device), indices in groups.items()]
