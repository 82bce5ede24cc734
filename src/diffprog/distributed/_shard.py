"""Sharded parameters (ZeRO style) on ``torch.distributed.tensor``: ``shard``, ``gathered``,
``unshard``.

A sharded model is an ordinary model whose Parameters are DTensors placed ``Shard(0)`` on a
device mesh: each rank holds a slice of every parameter along its first dimension, and an
optimizer built for it (``Adam.init(sharded)``) holds its state in the same slices. The
forward pass runs on :func:`gathered` (the full parameters, all-gathered with autograd), whose
gradients come back reduce-scattered into the slices, averaged over the ranks; ``run_step``
and ``apply_gradients`` then step the slices (see ``diffprog.optim``'s elementwise updates).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_tensor,
)

from diffprog import (
    DiffprogError,
    flatten_parameters,
    map_parameters,
    map_tensors,
    replace_parameters,
)

__all__ = ["gathered", "is_sharded", "shard", "shard_optimizer", "unshard"]

T = TypeVar("T")


def _placements(t: torch.Tensor) -> list[Placement]:
    """``Shard(0)`` for a tensor with dimensions, ``Replicate`` for a 0-dim one."""
    return [Shard(0) if t.dim() > 0 else Replicate()]


def _check_mesh(mesh: Any, caller: str) -> None:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"{caller} takes a torch.distributed DeviceMesh, got {type(mesh).__name__}: make "
            'one with torch.distributed.device_mesh.init_device_mesh("cpu", (world_size,)).'
        )
    if mesh.ndim != 1:
        raise DiffprogError(
            f"{caller} shards over a 1-D mesh, not a {mesh.ndim}-D one: pass one dimension "
            'of it (mesh["name"]) or init_device_mesh("cpu", (world_size,)).'
        )


def _distributed(path: str, t: torch.Tensor, mesh: DeviceMesh, caller: str) -> torch.Tensor:
    if isinstance(t, DTensor):
        raise DiffprogError(
            f"{caller}: {path} is already a DTensor (placed {t.placements}). Shard an "
            "unsharded model (diffprog.distributed.unshard gives one back)."
        )
    if t.device.type != mesh.device_type:
        raise DiffprogError(
            f"{caller}: {path} is on {t.device} but the mesh is of {mesh.device_type} "
            f"devices. Move the model first: diffprog.to(model, device=...)."
        )
    return distribute_tensor(t.detach(), mesh, _placements(t))


def shard(model: T, mesh: DeviceMesh) -> T:
    """``model`` with each Parameter sharded over ``mesh`` along its first dimension.

    Every rank calls it with the same model structure; the values come from rank 0's model
    (scattered from it, so every rank starts from the same parameters whatever its own
    held). Each Parameter becomes a DTensor Parameter placed ``Shard(0)`` (a 0-dim one is
    replicated): rank ``r`` holds the ``r``-th of ``torch.chunk``'s pieces along dimension 0,
    so a first dimension not divisible by the number of ranks gives smaller last pieces, and
    one shorter than the number of ranks leaves some ranks with empty pieces. Buffers and
    frozen parameters stay plain tensors, replicated (each rank keeps its own). A tied
    parameter is sharded once and stays tied. ``model`` is not changed.

    Args:
        model: an unsharded model, its tensors on the mesh's device type.
        mesh: a 1-D device mesh (``init_device_mesh("cpu", (world_size,))``).

    Returns:
        The sharded model, of the same type.

    Raises:
        TypeError: ``mesh`` is not a DeviceMesh.
        DiffprogError: ``mesh`` has more than one dimension; a parameter is already a
            DTensor, or on another device type than the mesh (the message names its path).

    Example:
        >>> import torch.distributed as dist
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> from diffprog.nn import LinearSpec
        >>> mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        >>> sharded = shard(sample(LinearSpec(4, 6)), mesh)
        >>> sharded.weight.shape, sharded.weight.placements
        (torch.Size([6, 4]), (Shard(dim=0),))
        >>> dist.destroy_process_group()
    """
    _check_mesh(mesh, "shard")
    return map_parameters(
        lambda path, p: _distributed(path, p, mesh, "shard"), model, with_path=True
    )


def shard_optimizer(optimizer: T, mesh: DeviceMesh) -> T:
    """An optimizer's state sharded as :func:`shard` shards the parameters it belongs to.

    For resuming: an optimizer built for (or loaded with) the unsharded model becomes the
    optimizer of ``shard(model, mesh)``. Every state tensor with dimensions is placed
    ``Shard(0)``, a 0-dim one (step counts, NAdam's ``mu_product``) stays a plain tensor,
    the same on every rank. State made by ``Adam.init(shard(model, mesh))`` is sharded
    already; this is for state that came whole.

    Args:
        optimizer: a pure optimizer (or a chain around one) whose state is unsharded.
        mesh: the mesh the model is sharded over.

    Returns:
        The optimizer with sharded state.

    Raises:
        TypeError: ``mesh`` is not a DeviceMesh.
        DiffprogError: ``mesh`` has more than one dimension, or a state tensor is already a
            DTensor.

    Example:
        >>> import torch.distributed as dist
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import Adam
        >>> mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        >>> opt = shard_optimizer(Adam.init(sample(LinearSpec(4, 6))), mesh)
        >>> type(opt.exp_avg[0]).__name__
        'DTensor'
        >>> dist.destroy_process_group()
    """
    _check_mesh(mesh, "shard_optimizer")

    def one(path: str, t: torch.Tensor) -> torch.Tensor:
        return t if t.dim() == 0 else _distributed(path, t, mesh, "shard_optimizer")

    return map_tensors(one, optimizer, with_path=True)


def unshard(value: T) -> T:
    """``value`` with every DTensor gathered into a full tensor on each rank.

    Parameters stay Parameters (plain ones), state tensors stay state: ``unshard(model)``
    is the unsharded model, ``unshard(optimizer)`` its optimizer with whole state, both
    usable in one process (to save a whole checkpoint, to evaluate, to go on without
    ``torch.distributed``). It communicates (an all-gather per tensor): every rank calls it.
    ``value`` is not changed.

    Args:
        value: a model or an optimizer (any value).

    Returns:
        The value with plain tensors.

    Example:
        >>> import torch.distributed as dist
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> from diffprog.nn import LinearSpec
        >>> mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        >>> model = sample(LinearSpec(4, 6))
        >>> back = unshard(shard(model, mesh))
        >>> type(back.weight).__name__, torch.equal(back.weight, model.weight)
        ('Parameter', True)
        >>> dist.destroy_process_group()
    """
    return map_tensors(lambda t: t.full_tensor() if isinstance(t, DTensor) else t, value)


def _gather(p: torch.Tensor) -> torch.Tensor:
    if not isinstance(p, DTensor):
        return p
    mesh = p.device_mesh
    full = p.redistribute(mesh, [Replicate()] * mesh.ndim)
    # The gradient of each rank's full parameter is its own: Partial("avg") makes the way back
    # a reduce-scatter that averages the ranks' gradients into each rank's shard.
    return full.to_local(grad_placements=[Partial("avg")] * mesh.ndim)


def gathered(model: T) -> T:
    """``model`` with its sharded parameters all-gathered, for the forward pass.

    Compute the loss from ``gathered(model)``; the gradients of ``model``'s (sharded)
    parameters are then the average over the ranks of each rank's gradient, reduce-scattered
    into the shards: ``run_step(model, optimizer, loss_of(gathered(model)), lr)``. With each
    rank on its own part of the batch, this is data-parallel training on the whole batch
    (as torch's DDP and FSDP average). The full parameters are plain tensors that live as
    long as the loss and its graph do (all at once: the whole model is gathered, not layer
    by layer). It communicates: every rank calls it, in the same order.

    Args:
        model: a sharded model (unsharded parameters are used as they are).

    Returns:
        The model with full, plain tensors where the sharded parameters were (not
        Parameters: they are functions of the shards).

    Example:
        >>> import torch.distributed as dist
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> from diffprog.nn import LinearSpec
        >>> mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        >>> sharded = shard(sample(LinearSpec(4, 6)), mesh)
        >>> gathered(sharded)(torch.ones(2, 4)).shape
        torch.Size([2, 6])
        >>> dist.destroy_process_group()
    """
    return replace_parameters(model, [_gather(p) for p in flatten_parameters(model)])


def is_sharded(value: Any) -> bool:
    """Whether some parameter of ``value`` is a DTensor (a sharded model).

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> is_sharded(sample(LinearSpec(2, 2)))
        False
    """
    return any(isinstance(p, DTensor) for p in flatten_parameters(value))
