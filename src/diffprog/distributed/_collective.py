"""The collectives every part of ``diffprog.distributed`` uses: coalesced, checked, named.

A list of tensors travels as one flat buffer per (dtype, device): one call of the backend per
group, not one per tensor. Every wait goes through :func:`waited`, which turns the backend's
failure (a dead peer, a timeout) into a :class:`CollectiveError` naming what failed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from diffprog import DiffprogError
from diffprog.distributed._errors import CollectiveError

__all__ = ["Group", "coalesced", "group_info", "run", "waited", "wire"]

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
    """``call()``, a collective, with the backend's failure raised as a ``CollectiveError``."""
    try:
        return call()
    except (RuntimeError, OSError) as e:  # DistBackendError, gloo's IOError are RuntimeErrors
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise CollectiveError(what, rank, world, e) from e


def waited(what: str, group: Group, work: Any) -> None:
    """Wait for an asynchronous collective, naming ``what`` if it fails."""
    if work is not None:
        run(what, group, work.wait)


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
