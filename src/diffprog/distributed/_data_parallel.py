"""``DataParallel``: any diffprog optimizer made data-parallel, as a value (torch DDP's job).

``DataParallel(optimizer)`` is an optimizer: ``run_step`` and ``apply_gradients`` take it
unchanged. Its step averages the gradients over the ranks of the process group before the
inner optimizer's step: during the backward pass when it has the loss (``run_step``, through
``step_model``), over gradients given otherwise (``apply_gradients``, through
``apply_model``; ``step``). Gradient accumulation is part of the value: with
``accumulate=k``, the first ``k - 1`` calls of a window only add their gradients to the ones
the value holds (no communication, the model unchanged: torch DDP's ``no_sync``), the ``k``-th
averages the sum over the micro-batches and the ranks and steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

import torch
from torch.distributed.tensor import DTensor

from diffprog import (
    DiffprogError,
    Frozen,
    Parameter,
    Parameterized,
    flatten_parameters,
    map_tensors,
    named_parameters,
    tensors,
)
from diffprog.distributed._broadcast import check_replicas, start_sync
from diffprog.distributed._collective import Group, group_info
from diffprog.distributed._reducer import Reduced, Reducer
from diffprog.optim import (
    LearningRate,
    NonFiniteError,
    OnNonFinite,
    Optimizer,
    apply_gradients,
    flatten_like,
    step,
)

__all__ = ["BufferSync", "DataParallel"]

M = TypeVar("M")
OptT = TypeVar("OptT", bound=Optimizer)

BufferSync = Literal["broadcast", "average", "local"]
"""What a synchronising step does with the model's buffers (running statistics):
``"broadcast"`` rank 0's to every rank (torch DDP's ``broadcast_buffers=True``), ``"average"``
the mean over the ranks of floating point ones (integer ones, such as
``num_batches_tracked``, from rank 0), ``"local"`` nothing (each rank keeps its own)."""

_NONFINITE = ("raise", "skip", "ignore")


class DataParallel(Parameterized, Generic[OptT]):
    """``inner``, data-parallel: each step averages the gradients over the ranks first.

    Every rank runs the same loop on its own share of the batch (a ``DistributedSampler``),
    with the same model (:func:`broadcast_model` it once) and this optimizer around the same
    inner optimizer; each step all-reduces the gradients, so every rank takes the same step
    and the ranks stay identical: the step equals one process's on the concatenated batches
    when each rank's loss is the mean over an equal share. With ``run_step`` the all-reduce
    overlaps the backward pass: gradients are copied into flat buckets of ``bucket_cap_mb``
    (one per dtype and device) as autograd produces them, and each full bucket is reduced
    asynchronously while autograd goes on (see ``docs/distributed.md`` for what overlaps).
    The inner optimizer is any diffprog optimizer: pure (its state replicated on every
    rank), ``TorchOptimizer`` (in place, as without this wrapper), a ``Chain``.

    A parameter no rank's loss reaches is left alone (``None`` gradient); one that some
    ranks reach is averaged with zeros from the others (what the concatenated batch gives).
    Non-finite values are judged after the all-reduce, so every rank raises or skips the same
    step; a non-finite loss on any rank counts for all (the error names the ranks). Before its
    first step it checks that every rank holds the same parameters and frozen tensors (a model
    not broadcast is refused, rather than trained as replicas that never agree).

    Attributes:
        inner: the optimizer stepped with the averaged gradients (its state lives there).
        bucket_cap_mb: the size of a gradient bucket in MiB (torch DDP's default, 25).
        accumulate: micro-batches per optimizer step (``1``: every call steps).
        buffers: what a stepping call does with the model's buffers (:data:`BufferSync`).
        group: the process group (``None``: the default group).
        micro: the micro-batches of the current window taken so far (0 after a step).
        pending: the gradients summed over those micro-batches, per parameter.
        bad_loss: ``> 0`` when a loss of the current window was not finite (0-dim tensor).

    Example:
        >>> import torch.distributed as dist
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import Adam, run_step
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> model = sample(LinearSpec(2, 1))
        >>> opt = DataParallel(Adam.init(model), accumulate=2)
        >>> loss = model(torch.ones(4, 2)).pow(2).mean()
        >>> same, opt = run_step(model, opt, loss, 0.1)  # accumulated, not stepped
        >>> same is model, opt.micro
        (True, 1)
        >>> loss = model(torch.ones(4, 2)).pow(2).mean()
        >>> new, opt = run_step(model, opt, loss, 0.1)  # averaged and stepped
        >>> opt.micro, opt.count, torch.equal(new.weight, model.weight)
        (0, 1, False)
        >>> dist.destroy_process_group()
    """

    inner: OptT
    bucket_cap_mb: float = 25.0
    accumulate: int = 1
    buffers: BufferSync = "broadcast"
    group: Group = None
    micro: int = 0
    pending: tuple[torch.Tensor | None, ...] = ()
    bad_loss: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.inner, type) or not callable(getattr(self.inner, "step", None)):
            what = getattr(self.inner, "__name__", type(self.inner).__name__)
            raise TypeError(
                f"DataParallel wraps an optimizer value (with a step method), got {what}: "
                "build it first, e.g. DataParallel(Adam.init(model))."
            )
        if isinstance(self.inner, DataParallel):
            raise DiffprogError("DataParallel(DataParallel(...)) would average twice: wrap once.")
        if getattr(self.inner, "differentiable", False) is True:
            raise DiffprogError(
                "DataParallel does not take a differentiable optimizer "
                f"({type(self.inner).__name__} has differentiable=True): torch.distributed's "
                "all-reduce is not differentiable, so the meta-gradient would be cut silently."
            )
        if not isinstance(self.accumulate, int) or isinstance(self.accumulate, bool):
            raise TypeError(f"accumulate must be an int, got {type(self.accumulate).__name__}.")
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {self.accumulate}.")
        if not self.bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {self.bucket_cap_mb}.")
        if self.buffers not in ("broadcast", "average", "local"):
            raise ValueError(
                f"buffers must be 'broadcast', 'average' or 'local', got {self.buffers!r}."
            )

    # --- what it wraps ------------------------------------------------------------------------

    @property
    def trainable(self) -> tuple[bool, ...] | None:
        """The inner optimizer's ``trainable`` (``None``: every parameter)."""
        found: tuple[bool, ...] | None = getattr(self.inner, "trainable", None)
        return found

    @property
    def count(self) -> int:
        """The inner optimizer's step count (optimizer steps, not micro-batches)."""
        return int(getattr(self.inner, "count", 0))

    @property
    def syncs_next(self) -> bool:
        """Whether the next call communicates and steps (the last micro-batch of a window)."""
        return self.micro + 1 >= self.accumulate

    # --- the seams of run_step and apply_gradients --------------------------------------------

    def step_model(
        self,
        model: M,
        loss: torch.Tensor | Callable[[], torch.Tensor],
        lr: LearningRate | None,
        *,
        on_nonfinite: OnNonFinite = "raise",
    ) -> tuple[M, DataParallel[OptT]]:
        """The whole step for ``run_step``: backward pass with overlapped all-reduce, then
        the inner optimizer's step on the averaged gradients (or, within an accumulation
        window, only the backward pass).

        Args:
            model: the model ``loss`` was computed from (with its updated buffers, if any).
            loss: this rank's loss (a scalar tensor; a closure is refused).
            lr: the learning rate, as for ``run_step``.
            on_nonfinite: as for ``run_step``, judged on the averaged gradients and on every
                rank's loss.

        Returns:
            ``(new_model, new_optimizer)``; within a window ``model`` itself.

        Raises:
            DiffprogError: ``loss`` is a closure, it reaches no trained parameter on any rank,
                or (before the first step) the ranks' models differ.
            NonFiniteError: a loss or an averaged gradient is not finite (with ``"raise"``).
            CollectiveError: a rank died or timed out.
        """
        _check_on_nonfinite(on_nonfinite)
        if not isinstance(loss, torch.Tensor):
            raise DiffprogError(
                "DataParallel takes the loss as a tensor, not a closure: a closure is evaluated "
                "several times per step (LBFGS), and each evaluation would need its own "
                "all-reduce. Use a first-order optimizer, or average the closure's gradients "
                "yourself."
            )
        params: list[torch.Tensor] = list(flatten_parameters(model))
        trained = self._trained(len(params))
        if not trained:  # the same on every rank: refused before any collective
            new_model, new_inner = apply_gradients(model, self.inner, [None] * len(params), lr)
            return new_model, self._fresh(new_inner)  # not reached: apply_gradients raised
        chosen = [params[i] for i in trained]
        self._check_first(self._replicated(model))
        pending = self._pending(len(params))
        bad = _bad(loss, self.bad_loss)
        if not self.syncs_next:
            local = _local_grads(loss, chosen)
            summed = _added(pending, trained, local, own=True)
            return model, dataclasses.replace(
                self, micro=self.micro + 1, pending=summed, bad_loss=bad
            )
        finish_buffers = self._start_buffers(model)
        reducer = self._reducer(chosen, [pending[i] for i in trained], _namer(model, trained))
        wanted = [p for p in chosen if p.requires_grad]
        if loss.requires_grad and wanted:
            with reducer.hooked():
                got = torch.autograd.grad(loss, wanted, allow_unused=True)
            del got
        return self._apply(model, trained, reducer.finish(bad), finish_buffers, lr, on_nonfinite)

    def apply_model(
        self,
        model: M,
        grads: Any,
        lr: LearningRate | None,
        *,
        on_nonfinite: OnNonFinite = "raise",
    ) -> tuple[M, DataParallel[OptT]]:
        """``apply_gradients`` with this optimizer: average ``grads`` over the ranks, then step.

        Args:
            model: the model the gradients are for.
            grads: this rank's gradients, as ``apply_gradients`` takes them (a list in
                ``flatten_parameters`` order with ``None`` for an unused parameter, or a value
                of the model's structure). Within a window a copy is held: the caller may
                write into them afterwards (a reused buffer, ``.grad`` zeroed in place).
            lr: the learning rate.
            on_nonfinite: as for ``apply_gradients``, judged on the averaged gradients.

        Returns:
            ``(new_model, new_optimizer)``; within an accumulation window ``model`` itself.

        Raises:
            DiffprogError: ``grads`` does not fit the model, or (before the first step) the
                ranks' models differ.
            NonFiniteError: an averaged gradient is not finite (with ``"raise"``).
            CollectiveError: a rank died or timed out.
        """
        _check_on_nonfinite(on_nonfinite)
        params: list[torch.Tensor] = list(flatten_parameters(model))
        local = _gradient_list(model, grads, params)
        trained = self._trained(len(params))
        if not trained:  # the same on every rank: refused before any collective
            new_model, new_inner = apply_gradients(model, self.inner, local, lr)
            return new_model, self._fresh(new_inner)  # not reached: apply_gradients raised
        self._check_first(self._replicated(model))
        pending = self._pending(len(params))
        if not self.syncs_next:
            summed = _added(pending, trained, [local[i] for i in trained], own=False)
            return model, dataclasses.replace(self, micro=self.micro + 1, pending=summed)
        finish_buffers = self._start_buffers(model)
        reducer = self._reducer(
            [params[i] for i in trained], [pending[i] for i in trained], _namer(model, trained)
        )
        _put_all(reducer, [local[i] for i in trained])
        reduced = reducer.finish(_bad(None, self.bad_loss))
        return self._apply(model, trained, reduced, finish_buffers, lr, on_nonfinite)

    def step(
        self,
        lr: LearningRate,
        gradients: Sequence[torch.Tensor | None],
        params: Sequence[torch.Tensor],
        *,
        used: Sequence[bool] | None = None,
    ) -> tuple[list[torch.Tensor], DataParallel[OptT]]:
        """The optimizer protocol's step: average ``gradients`` over the ranks, step ``inner``.

        No overlap (the gradients are all there) and no check of non-finite values (``run_step``
        and ``apply_gradients`` do it). Within an accumulation window ``params`` come back as
        they are, and the window holds a copy of ``gradients`` (the caller may reuse them).
        The first step's replica check sees ``params`` only (no model: its frozen tensors are
        not known here; ``run_step`` and ``apply_gradients`` check them too).

        Args:
            lr: the learning rate.
            gradients: this rank's gradients, one per parameter.
            params: the parameters.
            used: for each parameter whether this rank's loss reaches it (``None``: all).

        Returns:
            ``(new_params, new_optimizer)``.
        """
        params = list(params)
        if len(gradients) != len(params):
            raise DiffprogError(
                f"DataParallel.step got {len(params)} parameters but {len(gradients)} "
                "gradients. Pass one gradient per parameter, in flatten_parameters order."
            )
        local = [g if used is None or used[i] else None for i, g in enumerate(gradients)]
        trained = self._trained(len(params))
        self._check_first(params)
        pending = self._pending(len(params))
        if not self.syncs_next:
            summed = _added(pending, trained, [local[i] for i in trained], own=False)
            return params, dataclasses.replace(self, micro=self.micro + 1, pending=summed)
        reducer = self._reducer([params[i] for i in trained], [pending[i] for i in trained])
        _put_all(reducer, [local[i] for i in trained])
        reduced = reducer.finish(_bad(None, self.bad_loss))
        full: list[Any] = [None] * len(params)
        for k, i in enumerate(trained):
            full[i] = reduced.grads[k]
        chosen = set(trained)
        mask = [g is not None or i not in chosen for i, g in enumerate(full)]
        filled = [
            torch.zeros_like(p) if g is None else g for g, p in zip(full, params, strict=True)
        ]
        new_params, new_inner = step(lr, filled, params, self.inner, used=mask)
        return new_params, self._fresh(new_inner)

    # --- internals ----------------------------------------------------------------------------

    def _check_first(self, replicated: list[torch.Tensor]) -> None:
        """Before the first step (no step taken, no micro-batch held): refuse ranks whose
        models differ (one small all-reduce, once); and always, a sharded model."""
        if any(isinstance(p, DTensor) for p in replicated):
            raise DiffprogError(
                "DataParallel around the optimizer of a sharded model (DTensor parameters): "
                "a sharded model already averages its gradients in gathered, so do not wrap "
                "its optimizer in DataParallel; step it as it is."
            )
        if self.count == 0 and self.micro == 0:
            check_replicas(replicated, self.group)

    def _replicated(self, model: Any) -> list[torch.Tensor]:
        """What must be the same on every rank at the first step: every parameter and frozen
        tensor. Not the buffers: the model given to a step carries the running statistics its
        own rank's forward pass just updated (BatchNorm), which differ by design."""
        return [t for t in tensors(model) if isinstance(t, (Parameter, Frozen))]

    def _trained(self, n: int) -> list[int]:
        trainable = self.trainable
        if trainable is not None and len(trainable) != n:
            raise DiffprogError(
                f"this DataParallel's optimizer was built for {len(trainable)} parameters, but "
                f"the model has {n}. Build it from this model."
            )
        return [i for i in range(n) if trainable is None or trainable[i]]

    def _pending(self, n: int) -> list[torch.Tensor | None]:
        if not self.pending:
            return [None] * n
        if len(self.pending) != n:
            raise DiffprogError(
                f"this DataParallel holds gradients accumulated for {len(self.pending)} "
                f"parameters, but the model has {n}: finish the window with the same model."
            )
        return list(self.pending)

    def _reducer(
        self,
        params: list[torch.Tensor],
        pending: list[torch.Tensor | None],
        name: Callable[[int], str] | None = None,
    ) -> Reducer:
        _, world = group_info(self.group, "DataParallel")
        scale = 1.0 / (world * self.accumulate)
        cap = max(1, int(self.bucket_cap_mb * 2**20))
        return Reducer(params, pending, scale, cap, self.group, name)

    def _start_buffers(self, model: Any) -> Callable[[Any], Any]:
        """Launch the buffers' synchronisation; the result puts them into a model."""
        if self.buffers == "local":
            return lambda m: m
        found = [t for t in tensors(model) if not isinstance(t, (Parameter, Frozen))]
        if not found:
            return lambda m: m
        finish = start_sync(found, self.buffers, group=self.group)

        def put(m: Any) -> Any:
            values = {id(t): v for t, v in zip(found, finish(), strict=True)}
            return map_tensors(lambda t: values.get(id(t), t), m)

        return put

    def _fresh(self, inner: OptT) -> DataParallel[OptT]:
        return dataclasses.replace(self, inner=inner, micro=0, pending=(), bad_loss=None)

    def _apply(
        self,
        model: M,
        trained: list[int],
        reduced: Reduced,
        put_buffers: Callable[[Any], Any],
        lr: LearningRate | None,
        on_nonfinite: OnNonFinite,
    ) -> tuple[M, DataParallel[OptT]]:
        """The inner step on the averaged gradients, the buffers synchronised."""
        synced_model = put_buffers(model)  # waits: no collective is left in flight below
        full: list[torch.Tensor | None] = [None] * len(flatten_parameters(model))
        for k, i in enumerate(trained):
            full[i] = reduced.grads[k]
        if reduced.bad_loss_ranks and on_nonfinite != "ignore":
            if on_nonfinite == "skip":
                return synced_model, self._fresh(self.inner)
            error = NonFiniteError(float("nan"), [])
            ranks = ", ".join(map(str, reduced.bad_loss_ranks))
            error.args = (f"{error} (DataParallel: on rank(s) {ranks} of the group.)",)
            raise error
        if not any(g is not None for g in full):
            raise DiffprogError(
                "the loss depends on none of the parameters the step trains, on every rank (it "
                "was computed from another model, e.g. the one before the last step, or under "
                "torch.no_grad()). Compute it from the model passed in."
            )
        new_model, new_inner = apply_gradients(
            synced_model, self.inner, full, lr, on_nonfinite=on_nonfinite
        )
        return new_model, self._fresh(new_inner)


def _check_on_nonfinite(on_nonfinite: object) -> None:
    if on_nonfinite not in _NONFINITE:
        raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'ignore', got {on_nonfinite!r}.")


def _bad(loss: torch.Tensor | None, before: torch.Tensor | None) -> torch.Tensor:
    """A 0-dim float tensor, ``> 0`` when ``loss`` or an earlier loss was not finite."""
    if loss is None:
        return torch.zeros(()) if before is None else before
    now = (~torch.isfinite(loss.detach())).any().float()
    return now if before is None else now + before.to(now.device)


def _namer(model: Any, trained: list[int]) -> Callable[[int], str]:
    """The path of the ``k``-th trained parameter of ``model`` (looked up when an error asks)."""

    def name(k: int) -> str:
        return f"parameter {named_parameters(model)[trained[k]][0]!r}"

    return name


def _local_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """This micro-batch's gradients (``None`` for a parameter that does not require grad)."""
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    out: list[torch.Tensor | None] = [None] * len(params)
    if not loss.requires_grad or not wanted:
        return out
    got = torch.autograd.grad(loss, [params[i] for i in wanted], allow_unused=True)
    for i, g in zip(wanted, got, strict=True):
        out[i] = g
    return out


def _added(
    pending: list[torch.Tensor | None],
    trained: list[int],
    local: Sequence[torch.Tensor | None],
    *,
    own: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``pending`` plus this micro-batch's gradients (out of place; sparse ones made dense).

    Args:
        own: the gradients are this call's own (autograd's, for ``step_model``): held as they
            are. Otherwise they are the caller's, who may write into them after the call (a
            reused buffer, ``.grad`` zeroed in place): the window starts from a copy.
    """
    out = list(pending)
    with torch.no_grad():
        for i, g in zip(trained, local, strict=True):
            if g is None:
                continue
            before = out[i]
            if g.layout != torch.strided:
                g = g.to_dense()  # a new tensor
            elif before is None and not own:
                g = g.clone()
            out[i] = g.detach() if before is None else before + g
    return tuple(out)


def _put_all(reducer: Reducer, local: list[torch.Tensor | None]) -> None:
    """Hand given gradients to the reducer, last first (the order its buckets fill in)."""
    for k in reversed(range(len(local))):
        g = local[k]
        if g is not None:
            reducer.put(k, g)


def _gradient_list(model: Any, grads: Any, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``grads`` as a list in ``flatten_parameters(model)`` order, each checked."""
    if isinstance(grads, (list, tuple)) and all(
        g is None or isinstance(g, torch.Tensor) for g in grads
    ):
        if len(grads) != len(params):
            raise DiffprogError(
                f"apply_gradients got {len(grads)} gradients for a model with {len(params)} "
                "parameters. Pass one per parameter in flatten_parameters order (None for one "
                "the loss does not reach), or a value of the model's structure."
            )
        local: list[torch.Tensor | None] = list(grads)
    else:
        local = list(flatten_like(model, grads))
    for i, (g, p) in enumerate(zip(local, params, strict=True)):
        if g is not None and (g.shape != p.shape or g.dtype != p.dtype or g.device != p.device):
            raise DiffprogError(
                f"DataParallel: the gradient of parameter {i} is {tuple(g.shape)} {g.dtype} on "
                f"{g.device}, but the parameter is {tuple(p.shape)} {p.dtype} on {p.device}. "
                "Pass one gradient per parameter, shaped like it, in flatten_parameters order."
            )
    return local
