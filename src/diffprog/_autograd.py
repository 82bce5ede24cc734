"""Independent tensors (trainable leaves) and gradients: Hasktorch's ``Torch.Autograd``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffprog._errors import DiffprogError

__all__ = ["IndependentTensor", "Parameter", "grad", "make_independent", "to_dependent"]

Parameter = torch.nn.Parameter
"""A trainable leaf tensor: exactly ``torch.nn.Parameter``.

Only values of this type are collected by ``flatten_parameters``; arithmetic works on them
directly, and any torch tooling that accepts ``nn.Parameter`` accepts them.
"""

IndependentTensor = Parameter
"""Hasktorch's name for :data:`Parameter` (``type Parameter = IndependentTensor``)."""

_make_subclass = torch.Tensor._make_subclass


def make_independent(t: torch.Tensor) -> Parameter:
    """Make a fresh trainable leaf from ``t``, cut off from any graph ``t`` was part of.

    The result shares storage with ``t`` (no copy, as Hasktorch's ``makeIndependent``);
    ``t`` itself is not changed.

    Args:
        t: a floating point or complex tensor.

    Returns:
        A new :data:`Parameter` with ``requires_grad=True``.

    Raises:
        TypeError: ``t`` is not a tensor, or its dtype cannot carry gradients.

    Example:
        >>> p = make_independent(torch.ones(2) * 3)
        >>> p.is_leaf, p.requires_grad
        (True, True)
    """
    if type(t) is torch.Tensor and (t.is_floating_point() or t.is_complex()):
        # The hot path of every training step. _make_subclass is what Parameter.__new__ calls
        # for a plain tensor: it detaches (a new leaf sharing t's storage) and sets
        # requires_grad, without Parameter.__new__'s Python overhead.
        return _make_subclass(Parameter, t, True)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"make_independent expects a torch.Tensor, got {type(t).__name__}.")
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(
            f"make_independent needs a floating point or complex tensor to differentiate, got "
            f"dtype {t.dtype}. Convert it first, e.g. make_independent(t.float())."
        )
    return Parameter(t.detach(), requires_grad=True)


def to_dependent(p: torch.Tensor) -> torch.Tensor:
    """Use an independent tensor as an ordinary (dependent) tensor.

    Hasktorch's ``toDependent``. A :data:`Parameter` already works in any expression, so this
    returns ``p`` itself, typed as a plain tensor; it exists for code that mirrors Hasktorch.

    Example:
        >>> p = make_independent(torch.ones(2))
        >>> (to_dependent(p) * 2).sum().item()
        4.0
    """
    return p


def grad(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool = True,
) -> list[torch.Tensor]:
    """Gradients of a scalar ``loss`` with respect to ``params``, in their order.

    A parameter the loss does not depend on (or that does not require grad) gets a zero
    tensor of its shape, never ``None``.

    Like Hasktorch's ``grad`` (whose C++ side runs the engine with ``keep_graph = true``), this
    is a pure function of ``loss``: the graph of ``loss`` is kept, so ``grad`` can be called
    again on the same loss, and ``run_step`` can still take a step with it. The price is
    memory: the tensors the graph saved for the backward pass live as long as ``loss`` does.
    In a loop ``loss = f(model); gs = grad(loss, ps)``, the previous loss and its graph are
    still alive while the next one is built, which can double the peak. Where the graph is
    not needed again, pass ``retain_graph=False`` (torch's name and default; the graph is freed
    as this call ends) or ``del loss``. ``run_step`` always frees it.

    Args:
        loss: a tensor with one element.
        params: the tensors to differentiate with respect to, usually
            ``flatten_parameters(model)``.
        create_graph: build a graph of the gradients themselves (for higher-order gradients,
            e.g. a meta-gradient through an inner step ``p - lr * g``, or through the
            optimizers' steps with ``differentiable=True``).
        retain_graph: keep the graph of ``loss`` for another backward pass (default ``True``,
            unlike ``torch.autograd.grad``; ``False`` frees it).

    Returns:
        One gradient tensor per parameter.

    Raises:
        DiffprogError: ``loss`` has more than one element.

    Example:
        >>> w = make_independent(torch.tensor([1.0, 2.0]))
        >>> unused = make_independent(torch.zeros(3))
        >>> loss = (w * w).sum()
        >>> grad(loss, [w, unused])
        [tensor([2., 4.]), tensor([0., 0., 0.])]
        >>> grad(loss, [w])  # the graph was kept: the same loss again
        [tensor([2., 4.])]
    """
    return gradients(loss, params, create_graph=create_graph, retain_graph=retain_graph)[0]


def gradients(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> tuple[list[torch.Tensor], list[bool]]:
    """:func:`grad`, and for each of ``params`` whether the loss depends on it.

    A training step uses the flags to refuse a loss that depends on none of the parameters it
    trains (computed from a stale model, or under ``torch.no_grad()``), and to leave alone the
    parameters the loss does not reach, as torch.optim skips a ``.grad`` that is ``None``.
    """
    params = list(params)
    if loss.numel() != 1:
        raise DiffprogError(
            f"grad needs a scalar loss, got a tensor of shape {tuple(loss.shape)}. "
            "Reduce it first, e.g. loss.mean() or loss.sum()."
        )
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    out: list[torch.Tensor | None] = [None] * len(params)
    if wanted and loss.requires_grad:
        computed = torch.autograd.grad(
            loss,
            [params[i] for i in wanted],
            allow_unused=True,
            create_graph=create_graph,
            retain_graph=retain_graph,
        )
        for i, g in zip(wanted, computed, strict=True):
            out[i] = g
    used = [g is not None for g in out]
    return [
        g if g is not None else torch.zeros_like(p) for g, p in zip(out, params, strict=True)
    ], used
