"""The pieces of a training step: ``value_and_grad``, ``apply_updates``, the non-finite check.

``run_step`` is ``value_and_grad`` + an optimizer's ``step`` + ``replace_parameters``; these are
the parts for loops that need to see in between (gradient accumulation, logging gradient
norms, custom update rules), with the same guarantees: pure, and the model's structure kept.
"""

from __future__ import annotations

import cmath
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch

from diffprog import (
    DiffprogError,
    Parameterized,
    Randomizable,
    flatten_parameters,
    grad,
    make_independent,
    named_parameters,
    replace_parameters,
)
from diffprog._errors import render_path, state_dict_path
from diffprog._traverse import walk_keys
from diffprog.optim._dtensor import any_dtensor, finite_each, local_shards, same_on_all_ranks

__all__ = [
    "NonFiniteError",
    "NothingToTrainError",
    "OnNonFinite",
    "apply_updates",
    "flatten_like",
    "value_and_grad",
]

M = TypeVar("M")

OnNonFinite = Literal["raise", "skip", "ignore"]
"""What ``run_step`` does when the loss or a gradient is NaN or infinite: ``"raise"`` a
:class:`NonFiniteError` (the default), ``"skip"`` the step (the model and optimizer come back
unchanged), or ``"ignore"`` the check altogether (no cost, no protection)."""

_ON_NONFINITE = ("raise", "skip", "ignore")


class NonFiniteError(DiffprogError, FloatingPointError):
    """The loss or some gradients of a training step are NaN or infinite; the step was not taken.

    Attributes:
        loss: the loss's value (``nan``, ``inf``, or finite when only gradients are bad).
        paths: the ``named_parameters`` paths of the parameters whose gradient is not finite.
    """

    def __init__(self, loss: float, paths: Sequence[str]) -> None:
        self.loss = loss
        self.paths = tuple(paths)
        problems = []
        if not math.isfinite(loss):
            problems.append(f"the loss is {loss}")
        if self.paths:
            shown = ", ".join(self.paths[:10])
            more = f" and {len(self.paths) - 10} more" if len(self.paths) > 10 else ""
            what = "gradient of" if len(self.paths) == 1 else "gradients of"
            verb = "contains" if len(self.paths) == 1 else "contain"
            problems.append(f"the {what} {shown}{more} {verb} NaN or inf")
        text = " and ".join(problems) or "a value is not finite"
        super().__init__(
            f"non-finite training step: {text}. The step was not taken; the model and optimizer "
            "passed in are unchanged. Find the source with torch.autograd.set_detect_anomaly("
            "True) (log of 0, division by 0, overflow), lower the learning rate or clip "
            "gradients, or pass on_nonfinite='skip' to run_step to skip such steps."
        )


class NothingToTrainError(DiffprogError, ValueError):
    """A training step was asked for on a model with no parameter to train.

    The model has no ``Parameter`` at all (specs where layers belong, plain tensors, a plain
    object), or the optimizer freezes every one of them. ``run_step`` raises it for every
    optimizer, ``TorchOptimizer.init`` already when it is built (torch.optim cannot be built
    over no parameters). It is also a ``ValueError``.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import GD, run_step
        >>> loss = torch.tensor(1.0, requires_grad=True) * 2
        >>> run_step({"layer": LinearSpec(2, 1)}, GD(), loss, 0.1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        diffprog.optim._grad.NothingToTrainError: ... model['layer'] holds a LinearSpec, a spec ...
    """


def check_trains_something(
    model: Any, num_params: int, trainable: Sequence[bool] | None, owner: str
) -> None:
    """Raise :class:`NothingToTrainError` unless a step on ``model`` trains some parameter.

    Args:
        model: the model (searched for a spec, to name it, only when raising).
        num_params: ``len(flatten_parameters(model))``.
        trainable: the optimizer's ``trainable`` (``None``: every parameter).
        owner: the optimizer's name, for the message.

    Raises:
        NothingToTrainError: the model has no parameter, or ``trainable`` has no ``True``.
    """
    if num_params and (trainable is None or any(trainable)):
        return
    if num_params:
        raise NothingToTrainError(
            f"every parameter of the model is frozen, so {owner} has nothing to train. "
            "Freeze fewer parameters (freeze= in the optimizer's init)."
        )
    spec = _find_spec(model)
    if spec is not None:
        path, found = spec
        name = type(found).__name__
        where = "it is" if path == "model" else f"{path} holds"
        raise NothingToTrainError(
            f"the model ({type(model).__name__}) has no Parameters, so {owner} has nothing to "
            f"train: {where} a {name}, a spec where a layer belongs. Build the layer with "
            f"sample({name}(...)) and put that in the model."
        )
    raise NothingToTrainError(
        f"the model ({type(model).__name__}) has no Parameters, so {owner} has nothing to "
        "train. Did you put specs where layers belong? sample(...) them. Only a "
        "diffprog.Parameter (torch.nn.Parameter, as make_independent makes) is trained; "
        "plain tensors are constants."
    )


def _find_spec(model: Any) -> tuple[str, Any] | None:
    """The first spec (an object with a ``sample`` method) inside ``model``, with its path.

    Only for an error message: follows the paths of ``walk_keys`` from the root, skipping a path
    that cannot be followed (a set's members have no index to look up).
    """
    if _is_spec(model):
        return "model", model
    try:
        leaves = list(walk_keys(model))
    except DiffprogError:
        return None
    for keys, _ in leaves:
        node = model
        for depth, (kind, key) in enumerate(keys):
            try:
                node = getattr(node, key) if kind in ("attr", "inline") else node[key]
            except (LookupError, AttributeError, TypeError):
                break
            if _is_spec(node):
                return render_path(keys[: depth + 1], "model"), node
    return None


def _is_spec(value: Any) -> bool:
    # A layer may have a sample method of its own (a VAE's): only a non-model is a spec.
    return isinstance(value, Randomizable) and not isinstance(value, Parameterized)


def check_loss_reaches_parameters(reached: bool) -> None:
    """Raise unless the loss depends on some parameter the step trains (``reached``).

    One check for both kinds of step (pure and ``TorchOptimizer``): a loss computed from a
    stale model or under ``torch.no_grad()`` has zero gradients everywhere, and a step on
    them would move the weights on momentum and weight decay alone.
    """
    if not reached:
        raise DiffprogError(
            "the loss does not depend on any parameter this step trains: its gradients are all "
            "zero, so a step would only move the weights on momentum and weight decay (and "
            "count a step, and move a scheduler, for nothing). Compute the loss from the "
            "model you pass to run_step (not from the model of an earlier step, which run_step "
            "replaces, nor from another model), and not under torch.no_grad()."
        )


def check_on_nonfinite(on_nonfinite: str) -> None:
    """Raise ``ValueError`` unless ``on_nonfinite`` is one of :data:`OnNonFinite`."""
    if on_nonfinite not in _ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'ignore', got {on_nonfinite!r}.")


_LOCAL = threading.local()  # per thread and device: (a zero flag, a one)


def _flag_and_one(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] | None = getattr(
        _LOCAL, "cache", None
    )
    if cache is None:
        cache = _LOCAL.cache = {}
    found = cache.get(device)
    if found is None:
        one = torch.ones((), dtype=torch.float32, device=device)
        found = cache[device] = (torch.zeros_like(one), one)
    return found


_LARGE = 1 << 20  # elements: from here a read-only norm beats the checking kernel on CPU


def all_finite(loss: torch.Tensor, grads: Sequence[torch.Tensor | None]) -> bool:
    """Whether ``loss`` and every gradient are finite: one fused reduction, one read.

    Up to about a million gradient elements this is the multi-tensor kernel behind
    ``torch.amp.GradScaler`` (``_amp_foreach_non_finite_check_and_unscale_`` with scale 1,
    which leaves the values as they are) and one flag; above, where that kernel's write-back
    costs more than it saves, a read-only ``torch._foreach_norm`` with one ``isfinite``. A
    failed fast check is confirmed tensor by tensor (so a norm that overflows on huge but
    finite gradients is no false alarm), as are gradients the kernels do not take (expanded,
    complex, ``None``, on several devices). A CPU loss is read directly.
    """
    if any_dtensor(grads):
        # Sharded gradients: each rank checks its loss and its shards, and all agree, so
        # that no rank skips or raises a step another takes.
        return same_on_all_ranks(all_finite(loss, local_shards(grads)), grads)
    loss = loss.detach()
    on_cpu = loss.device.type == "cpu"
    if on_cpu and not cmath.isfinite(loss.item()):
        return False
    if not grads:
        return on_cpu or bool(torch.isfinite(loss).all())
    try:
        if sum(g.numel() for g in grads) < _LARGE:  # type: ignore[union-attr, misc]
            ok = _check_small(loss, grads, on_cpu)  # type: ignore[arg-type]
        else:
            norms = torch._foreach_norm(grads)  # type: ignore[arg-type]
            total = torch.stack([n.float() for n in norms] + ([] if on_cpu else [loss.float()]))
            ok = bool(torch.isfinite(total).all())
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        ok = False
    return ok or _all_finite_slow(loss, grads)


def _check_small(loss: torch.Tensor, grads: list[torch.Tensor], on_cpu: bool) -> bool:
    device = grads[0].device
    flag, one = _flag_and_one(device)  # the flag stays 0 until a check fails
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, one)
        if on_cpu:
            ok = not flag.item()
        else:
            ok = not (flag + torch.logical_not(torch.isfinite(loss)).to(device)).item()
    except BaseException:
        flag.zero_()
        raise
    if not ok:
        flag.zero_()
    return ok


def _all_finite_slow(loss: torch.Tensor, grads: Sequence[torch.Tensor | None]) -> bool:
    checks = [torch.isfinite(loss).all()]
    checks += [torch.isfinite(_dense_values(g)).all() for g in grads if g is not None]
    return all(bool(c) for c in checks)


def _dense_values(g: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient: those of a sparse one (``Embedding(sparse=True)``)."""
    return g.coalesce().values() if g.is_sparse else g


def nonfinite_error(
    model: Any, loss: torch.Tensor, grads: Sequence[torch.Tensor | None], indices: Sequence[int]
) -> NonFiniteError:
    """The error for a failed :func:`all_finite` check (the slow path, run only on failure).

    ``grads[k]`` is the gradient of parameter ``indices[k]`` in ``flatten_parameters(model)``
    order; the paths come from ``named_parameters(model)``.
    """
    names = [name for name, _ in named_parameters(model)]
    shards = local_shards(grads)  # sharded gradients: each rank checks its shards, all agree
    finite = finite_each(
        [g is None or bool(torch.isfinite(_dense_values(g)).all()) for g in shards], grads
    )
    bad = [
        names[i] if i < len(names) else str(i)
        for i, ok in zip(indices, finite, strict=True)
        if not ok
    ]
    return NonFiniteError(float(loss.detach().reshape(-1)[0]), bad)


def value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """Turn ``loss_fn(model, *args)`` into a function returning the loss and its gradients.

    JAX's ``value_and_grad`` for diffprog models: the gradients come back in the model's own
    structure, the model with each parameter replaced by its gradient (a plain tensor), so
    ``grads.layers[0].weight`` is the gradient of ``model.layers[0].weight``. A parameter the
    loss does not depend on gets zeros. The model is not changed.

    Args:
        loss_fn: a function of the model (first argument) returning a scalar tensor, or with
            ``has_aux=True`` a pair ``(loss, aux)``.
        has_aux: whether ``loss_fn`` returns auxiliary data beside the loss.

    Returns:
        A function ``(model, *args, **kwargs) -> (loss, grads)`` (with ``has_aux``:
        ``((loss, aux), grads)``); ``loss`` is detached from the graph.

    Raises:
        DiffprogError: (when called) the loss has more than one element.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> layer = sample(LinearSpec(2, 1), generator=torch.Generator().manual_seed(0))
        >>> loss, grads = value_and_grad(lambda m, x: m(x).sum())(layer, torch.ones(3, 2))
        >>> grads.weight
        tensor([[3., 3.]])
        >>> type(grads).__name__, grads.bias
        ('Linear', tensor([3.]))
    """

    def loss_and_grads(model: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        params = flatten_parameters(model)
        out = loss_fn(model, *args, **kwargs)
        loss, aux = out if has_aux else (out, None)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"value_and_grad's loss_fn must return a scalar tensor"
                f"{' as the first of (loss, aux)' if has_aux else ''}, got {type(loss).__name__}."
                + ("" if has_aux else " If it returns (loss, aux), pass has_aux=True.")
            )
        # Nothing can use the loss's graph again (the loss comes back detached): free it.
        grads = replace_parameters(model, grad(loss, params, retain_graph=False))
        value = loss.detach()
        return ((value, aux) if has_aux else value), grads

    return loss_and_grads


def flatten_like(model: Any, tree: Any) -> list[torch.Tensor]:
    """The tensors of ``tree`` that sit where ``model`` has its parameters, in flatten order.

    ``flatten_parameters`` for a value of the model's structure whose leaves are plain tensors
    (the gradients from :func:`value_and_grad`, updates), which ``flatten_parameters`` itself
    would not collect: the result lines up with ``flatten_parameters(model)``, ready for an
    optimizer's ``step``.

    Args:
        model: the model that gives the structure.
        tree: a value of the same structure.

    Returns:
        One tensor per parameter of ``model``.

    Raises:
        DiffprogError: ``tree`` does not have ``model``'s structure.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> layer = sample(LinearSpec(2, 1))
        >>> grads = replace_parameters(layer, [torch.zeros(1, 2), torch.ones(1)])
        >>> flatten_like(layer, grads)
        [tensor([[0., 0.]]), tensor([1.])]
    """
    model_leaves = list(walk_keys(model))
    tree_leaves = list(walk_keys(tree))
    if len(model_leaves) != len(tree_leaves) or any(
        a[0] != b[0] for a, b in zip(model_leaves, tree_leaves, strict=True)
    ):
        raise DiffprogError(
            f"the tree does not have the model's structure ({type(tree).__name__} with "
            f"{len(tree_leaves)} leaves against the model's {type(model).__name__} with "
            f"{len(model_leaves)}). Build it from the model, e.g. with value_and_grad or "
            "replace_parameters(model, tensors)."
        )
    out: list[torch.Tensor] = []
    # id(parameter) -> (its first path, the tensor the tree holds there)
    first: dict[int, tuple[tuple[Any, ...], Any]] = {}
    for (path, leaf), (_, value) in zip(model_leaves, tree_leaves, strict=True):
        if not isinstance(leaf, torch.nn.Parameter):
            continue
        if id(leaf) in first:
            # A tied parameter: the tree must hold the same tensor at each of its places (as
            # value_and_grad's trees do); two different ones would silently lose one.
            first_path, kept = first[id(leaf)]
            if value is not kept:
                raise DiffprogError(
                    f"the tree holds two different tensors for one tied parameter, at "
                    f"{state_dict_path(first_path)} and {state_dict_path(path)}; only one "
                    "would be used. "
                    "Put their sum at both places (the gradient of a tied parameter is the "
                    "sum over its uses), or pass a list in flatten_parameters order."
                )
            continue
        first[id(leaf)] = (path, value)
        if not isinstance(value, torch.Tensor):
            raise DiffprogError(
                f"the tree holds a {type(value).__name__} where the model has a parameter; "
                "every parameter's place needs a tensor."
            )
        out.append(value)
    return out


def apply_updates(model: M, updates: Any) -> M:
    """Add ``updates`` to the model's parameters: optax's ``apply_updates``, out of place.

    Args:
        model: the model.
        updates: one tensor per parameter, either as a list in ``flatten_parameters`` order or
            as a value of the model's structure (e.g. ``grads`` from :func:`value_and_grad`
            scaled by ``-lr``), each of its parameter's shape.

    Returns:
        A new model whose parameters are ``p + u``, fresh trainable leaves; ``model`` and its
        parameters are unchanged.

    Raises:
        DiffprogError: ``updates`` has the wrong number of entries or the wrong structure.

    Example:
        >>> w = make_independent(torch.ones(2))
        >>> model = {"w": w}
        >>> new = apply_updates(model, {"w": torch.tensor([-0.5, 0.5])})
        >>> new["w"].detach(), w.detach()
        (tensor([0.5000, 1.5000]), tensor([1., 1.]))
    """
    params: list[torch.Tensor] = list(flatten_parameters(model))
    if (
        isinstance(updates, (list, tuple))
        and len(updates) == len(params)
        and all(isinstance(u, torch.Tensor) for u in updates)
    ):
        deltas = list(updates)
    else:
        deltas = flatten_like(model, updates)
    if len(deltas) != len(params):
        raise DiffprogError(
            f"apply_updates got {len(deltas)} updates for a model with {len(params)} "
            "parameters. Pass one per parameter, in flatten_parameters order."
        )
    with torch.no_grad():
        new = torch._foreach_add(params, deltas) if params else []
    return replace_parameters(model, [make_independent(p) for p in new])
