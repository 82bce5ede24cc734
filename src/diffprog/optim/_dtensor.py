"""Steps on sharded parameters (``torch.distributed.tensor.DTensor``): what stays global.

A pure optimizer's step on DTensor parameters must never treat a rank's shard as the whole
tensor. Two things decide it, both here: an update that is *elementwise* (each element of
the new parameter and state depends on the same element of the parameter, gradient and
state, and on scalars) gives the same numbers on shards as on the whole, so it runs on the
local shards with the plain kernels (fused and multi-tensor, which DTensor does not all
dispatch); any other update (Adafactor's factored moments) is refused on DTensors. And a
decision taken from the values (the non-finite check) is taken over all ranks, so that no
rank skips or raises a step that another takes.

Nothing here runs unless ``torch.distributed.tensor`` was imported: no DTensor can exist
before, and the single-process step pays one dictionary look-up.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffprog import DiffprogError, named_parameters

__all__ = [
    "any_dtensor",
    "dtensor_type",
    "finite_each",
    "local_shards",
    "max_norm_over_ranks",
    "refuse_plain_among_sharded",
    "run_on_shards",
    "same_on_all_ranks",
]

_MODULE = "torch.distributed.tensor"


def dtensor_type() -> Any:
    """``DTensor`` if ``torch.distributed.tensor`` is loaded (else ``None``: none exists)."""
    module = sys.modules.get(_MODULE)
    return None if module is None else module.DTensor


def any_dtensor(tensors: Sequence[Any]) -> bool:
    """Whether some entry of ``tensors`` is a DTensor.

    Example:
        >>> any_dtensor([torch.zeros(2)])
        False
    """
    cls = dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def _local(t: Any, cls: Any) -> Any:
    return t.to_local() if isinstance(t, cls) else t


def run_on_shards(
    update: Callable[..., list[torch.Tensor]],
    hyper: Any,
    lr: float | torch.Tensor,
    count: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: dict[str, list[torch.Tensor]],
) -> list[torch.Tensor]:
    """An elementwise ``_update`` run on the local shards, its results DTensors again.

    Each new parameter and each state tensor that was a DTensor (state made by
    ``zeros_like`` of a DTensor parameter is one) becomes a DTensor with the placements,
    global shape and stride of its parameter; scalar state (NAdam's ``mu_product``, ASGD's
    ``eta``) is a plain tensor, the same on every rank, and stays one. A parameter and its
    gradient must be placed alike (reduce-scattered gradients are).

    Raises:
        DiffprogError: a gradient is placed otherwise than its parameter; or the step is
            differentiable and the learning rate (or a hyper-parameter tensor) requires grad.
    """
    cls = dtensor_type()
    assert cls is not None  # the caller found a DTensor
    if torch.is_grad_enabled():  # a differentiable step (the caller sets the grad mode)
        wanted = [
            name
            for name, value in (("lr", lr), *hyper.items())
            if isinstance(value, torch.Tensor) and value.requires_grad
        ]
        if wanted:
            # Each rank's shard step would give the hyper-parameter only its own shard's
            # part of the gradient: a wrong meta-gradient, different on every rank.
            raise DiffprogError(
                f"a differentiable step on sharded (DTensor) parameters with {wanted[0]} a "
                "tensor that requires grad: its gradient would come from each rank's shard "
                "only (wrong, and different per rank). Take the meta-gradient on an unsharded "
                f"model (diffprog.distributed.unshard), or pass {wanted[0]} detached."
            )
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        p_: Any = p
        if isinstance(p_, cls) and not (
            isinstance(g, cls) and g.placements == p_.placements and g.device_mesh == p_.device_mesh
        ):
            where = getattr(g, "placements", "a plain tensor")
            raise DiffprogError(
                f"parameter {i} is a DTensor placed as {p_.placements} (sharded) but its "
                f"gradient is {where}. Compute the loss from diffprog.distributed.gathered"
                "(model), whose gradients come back placed as the parameters."
            )
    was = {name: [isinstance(t, cls) for t in values] for name, values in state.items()}
    local_state = {name: [_local(t, cls) for t in values] for name, values in state.items()}
    outs = update(
        hyper,
        lr,
        count,
        [_local(p, cls) for p in params],
        [_local(g, cls) for g in grads],
        local_state,
    )
    for name, values in local_state.items():
        state[name][:] = [
            _like(v, p, cls) if dist else v
            for v, p, dist in zip(values, params, was[name], strict=True)
        ]
    if len(outs) != len(params):
        return outs  # the caller's check names the mistake
    return [
        _like(o, p, cls) if isinstance(p, cls) else o for o, p in zip(outs, params, strict=True)
    ]


def _like(local: torch.Tensor, param: Any, cls: Any) -> Any:
    """``local`` (a shard) as a DTensor placed as ``param``."""
    return cls.from_local(
        local,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def refuse_plain_among_sharded(model: Any, params: Sequence[Any]) -> None:
    """Refuse a plain Parameter among DTensor ones sharded over more than one rank.

    Its gradient is each rank's own (``gathered`` averages only the sharded ones'), so each
    rank would step it differently and the ranks' models would drift apart.

    Args:
        model: the model, to name the parameter's path.
        params: its parameters (``flatten_parameters(model)``).

    Raises:
        DiffprogError: such a parameter, named by its path.

    Example:
        >>> refuse_plain_among_sharded({"w": torch.nn.Parameter(torch.zeros(1))}, [])
    """
    cls = dtensor_type()
    if cls is None or not any(isinstance(p, cls) and p.device_mesh.size() > 1 for p in params):
        return
    plain = next((i for i, p in enumerate(params) if not isinstance(p, cls)), None)
    if plain is None:
        return
    path = named_parameters(model)[plain][0]
    raise DiffprogError(
        f"{path} is a plain Parameter in a model sharded over more than one rank: its "
        "gradient is each rank's own, never averaged, so the ranks would drift apart. Shard "
        "the model again after unfreezing or adding it: diffprog.distributed.shard("
        "diffprog.distributed.unshard(model), mesh) (and its optimizer with shard_optimizer)."
    )


def max_norm_over_ranks(tensors: Sequence[Any]) -> torch.Tensor:
    """The infinity norm of ``tensors`` (DTensors among them) over all ranks, as a plain
    0-dim tensor: each rank's max over its non-empty shards (an empty one adds nothing),
    then the max over the ranks of the DTensors' meshes.

    Example:
        >>> max_norm_over_ranks([torch.tensor([-3.0, 1.0]), torch.zeros(0)])
        tensor(3.)
    """
    import torch.distributed as dist

    local = [t for t in local_shards(tensors) if t.numel() > 0]
    dtype = tensors[0].dtype
    device = _flag_device(tensors)
    mine = (
        torch.stack([t.abs().amax().to(device, dtype) for t in local]).amax()
        if local
        else torch.zeros((), dtype=dtype, device=device)
    )
    # A NaN is carried as a flag beside the max: a backend's MAX need not propagate it.
    nan = mine.isnan()
    pair = torch.stack([torch.where(nan, torch.zeros_like(mine), mine), nan.to(dtype)])
    for group in _groups(tensors):
        dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=group)
    return torch.where(pair[1] > 0, torch.full_like(pair[0], float("nan")), pair[0])


def local_shards(tensors: Sequence[Any]) -> list[Any]:
    """Each DTensor of ``tensors`` as its rank's shard (other entries as they are)."""
    cls = dtensor_type()
    return list(tensors) if cls is None else [_local(t, cls) for t in tensors]


def finite_each(flags: list[bool], tensors: Sequence[Any]) -> list[bool]:
    """Per-tensor flags computed from shards, each agreed over the ranks (all must hold).

    Example:
        >>> finite_each([True, False], [torch.zeros(1), torch.zeros(1)])
        [True, False]
    """
    groups = _groups(tensors)
    if not groups or not flags:
        return flags
    import torch.distributed as dist

    flag = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=_flag_device(tensors))
    for group in groups:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return [bool(f) for f in flag.tolist()]


def _groups(tensors: Sequence[Any]) -> list[Any]:
    """The process groups of the meshes of the DTensors in ``tensors``, each once."""
    cls = dtensor_type()
    groups: list[Any] = []
    if cls is None:
        return groups
    for t in tensors:
        if isinstance(t, cls):
            for group in t.device_mesh.get_all_groups():
                if group not in groups:
                    groups.append(group)
    return groups


def same_on_all_ranks(ok: bool, tensors: Sequence[Any]) -> bool:
    """``ok`` where it holds on every rank of the meshes of the DTensors in ``tensors``.

    A decision taken from a rank's shards (its loss, its part of the gradients) is agreed
    over the mesh with one all-reduce (MIN of the flag), so that every rank takes it alike.
    ``ok`` unchanged when ``tensors`` holds no DTensor.

    Example:
        >>> same_on_all_ranks(True, [torch.zeros(1)])
        True
    """
    return finite_each([ok], tensors)[0]


def _flag_device(tensors: Sequence[Any]) -> torch.device:
    """Where the flags go: the device of the first DTensor (NCCL reduces on the GPU)."""
    cls = dtensor_type()
    for t in tensors:
        if cls is not None and isinstance(t, cls):
            device: torch.device = t.device
            return device
    return torch.device("cpu")
