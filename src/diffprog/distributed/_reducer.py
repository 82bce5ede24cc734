"""The gradient reducer: bucketed, coalesced all-reduce, launched during the backward pass.

torch DDP's ``Reducer`` for gradients given as values. The trained parameters are assigned to
buckets once per step, in reverse order (the order in which a backward pass usually produces
their gradients), a bucket per dtype and device closing when it reaches ``cap_bytes`` (DDP's
``bucket_cap_mb``). Each bucket is one flat buffer: a gradient is copied into its slot as it
arrives (from a tensor hook on the parameter, which autograd calls during
``torch.autograd.grad`` too), and a bucket whose every slot is written is all-reduced
asynchronously, while the backward pass goes on. Buckets are launched strictly in index order
on every rank (a full bucket waits for the ones before it), so the ranks issue the same
collectives in the same order whatever order their gradients arrive in. :meth:`Reducer.finish`
fills what the backward pass did not reach (zeros, or the gradient accumulated so far), writes
which parameters this rank reached and whether its loss was finite at the end of the last
bucket (so they need no collective of their own), launches the rest, and waits.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from diffprog import DiffprogError
from diffprog.distributed._collective import Group, run, waited, wire

__all__ = ["Reduced", "Reducer"]


class _Bucket:
    """One flat buffer of gradients of one dtype and device, and its all-reduce."""

    __slots__ = ("device", "dtype", "flat", "missing", "offsets", "positions", "size", "work")

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self.positions: list[int] = []
        self.offsets: list[int] = []
        self.size = 0
        self.missing = 0
        self.flat: torch.Tensor | None = None
        self.work: Any = None

    def buffer(self) -> torch.Tensor:
        if self.flat is None:
            self.flat = torch.empty(self.size, dtype=self.dtype, device=self.device)
        return self.flat


class Reduced:
    """What :meth:`Reducer.finish` gives: the mean gradients and who reached what.

    Attributes:
        grads: per trained parameter, the sum over the ranks times ``scale`` (a view of a
            bucket), or ``None`` where no rank reached the parameter.
        bad_loss_ranks: the ranks whose loss was not finite.
    """

    __slots__ = ("bad_loss_ranks", "grads")

    def __init__(self, grads: list[torch.Tensor | None], bad_loss_ranks: list[int]) -> None:
        self.grads = grads
        self.bad_loss_ranks = bad_loss_ranks


class Reducer:
    """One step's reduction of the gradients of ``params`` (see the module docstring).

    Args:
        params: the trained parameters, in ``flatten_parameters`` order.
        pending: per parameter, the gradient accumulated over earlier micro-batches (added to
            this one's), or ``None``.
        scale: what the sum over the ranks is multiplied by (``1 / (world * micro-batches)``).
        cap_bytes: the size at which a bucket closes.
        group: the process group.
        name: the path of parameter ``i`` in the model, for errors (``None``: its position).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        pending: Sequence[torch.Tensor | None],
        scale: float,
        cap_bytes: int,
        group: Group,
        name: Callable[[int], str] | None = None,
    ) -> None:
        self.params = list(params)
        self.name = name
        self.pending = list(pending)
        self.scale = scale
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.reached = [False] * len(self.params)
        self.buckets: list[_Bucket] = []
        self.where: list[tuple[_Bucket, int]] = [None] * len(self.params)  # type: ignore[list-item]
        self.next = 0  # the first bucket not launched
        # Autograd calls the hooks of parameters on different devices from one thread per
        # device: the bookkeeping and the launches (in index order) take turns.
        self.lock = threading.Lock()
        open_: dict[tuple[torch.dtype, torch.device], _Bucket] = {}
        for i in reversed(range(len(self.params))):
            p = self.params[i]
            key = (p.dtype, p.device)
            bucket = open_.get(key)
            if bucket is None:
                bucket = open_[key] = _Bucket(p.dtype, p.device)
                self.buckets.append(bucket)
            self.where[i] = (bucket, len(bucket.positions))
            bucket.positions.append(i)
            bucket.offsets.append(bucket.size)
            bucket.size += p.numel()
            bucket.missing += 1
            if bucket.size * p.element_size() >= cap_bytes:
                del open_[key]
        # The flags (which parameters this rank reached, whether its loss was finite) travel
        # at the end of the last bucket, filled by finish (that bucket holds the first
        # parameters, whose gradients come last anyway): no collective of their own where the
        # bucket's dtype holds them (small whole numbers, exact in any floating dtype;
        # only "> 0" is read), else one small all-reduce.
        self.meta: tuple[_Bucket, int] | None = None
        last = self.buckets[-1] if self.buckets else None
        if last is not None and last.dtype.is_floating_point:
            self.meta = (last, last.size)
            last.size += len(self.params) + self.world
            last.missing += 1

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Hooks on the parameters for the duration: each gradient goes to its bucket.

        A parameter that does not require grad gets none (no gradient reaches it); every hook
        registered is removed on the way out, whatever is raised.
        """
        handles: list[Any] = []
        try:
            for i, p in enumerate(self.params):
                if p.requires_grad:
                    handles.append(p.register_hook(self._hook(i)))  # type: ignore[no-untyped-call]
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, i: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            self.put(i, grad)

        return hook

    def put(self, i: int, grad: torch.Tensor) -> None:
        """Write parameter ``i``'s gradient (plus its pending one) into its bucket's slot.

        Raises:
            DiffprogError: parameter ``i``'s gradient already landed in this step (its hook
                ran twice: a ``torch.autograd.grad`` of it inside the backward pass).
        """
        if self.reached[i]:
            where = self.name(i) if self.name is not None else f"parameter {i}"
            raise DiffprogError(
                f"DataParallel: the gradient of {where} arrived twice in one backward pass (its "
                "tensor hook ran again, e.g. a torch.autograd.grad with respect to it inside a "
                "custom backward). Averaging would use the wrong one. Differentiate a detached "
                "copy inside the backward (p.detach().requires_grad_()), as torch DDP requires."
            )
        bucket, k = self.where[i]
        with torch.no_grad():
            if grad.layout != torch.strided:  # a sparse gradient (Embedding(sparse=True))
                grad = grad.to_dense()
            n = self.params[i].numel()
            offset = bucket.offsets[k]
            slot = bucket.buffer()[offset : offset + n]
            before = self.pending[i]
            if before is None:
                slot.copy_(grad.reshape(-1))
            else:
                torch.add(before.reshape(-1), grad.reshape(-1), out=slot)
        with self.lock:
            self.reached[i] = True
            bucket.missing -= 1
            if bucket.missing == 0:
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next < len(self.buckets) and self.buckets[self.next].missing == 0:
            bucket = self.buckets[self.next]
            flat = bucket.buffer()
            bucket.work = run(
                self._what(self.next),
                self.group,
                functools.partial(dist.all_reduce, wire(flat), group=self.group, async_op=True),
            )
            self.next += 1

    def _what(self, index: int) -> str:
        return f"the all-reduce of gradient bucket {index} (of {len(self.buckets)})"

    def finish(self, bad_loss: torch.Tensor) -> Reduced:
        """Fill what was not reached, launch what is left, wait, and scale.

        Args:
            bad_loss: a 0-dim tensor, ``> 0`` when this rank's loss (over the micro-batches)
                was not finite (a tensor: no wait for the device before the all-reduce).
        """
        with torch.no_grad():
            for bucket in self.buckets[self.next :]:
                for i, offset in zip(bucket.positions, bucket.offsets, strict=True):
                    if self.reached[i]:
                        continue
                    n = self.params[i].numel()
                    slot = bucket.buffer()[offset : offset + n]
                    before = self.pending[i]
                    if before is None:
                        slot.zero_()
                    else:
                        slot.copy_(before.reshape(-1))
                bucket.missing = 0
        n = len(self.params)
        used = [r or p is not None for r, p in zip(self.reached, self.pending, strict=True)]
        with torch.no_grad():
            if self.meta is not None:
                bucket, offset = self.meta
                meta = bucket.buffer()[offset:]
            else:
                device = self.params[0].device if self.params else torch.device("cpu")
                meta = torch.empty(n + self.world, device=device)
            meta.zero_()
            meta[:n] = torch.tensor(used, dtype=meta.dtype)
            meta[n + self.rank] = bad_loss.to(device=meta.device, dtype=meta.dtype)
        self._launch_ready()
        work = None
        what = "the all-reduce of which parameters the ranks reached"
        if self.meta is None:
            work = run(
                what,
                self.group,
                functools.partial(dist.all_reduce, meta, async_op=True, group=self.group),
            )
        for index, bucket in enumerate(self.buckets):
            waited(self._what(index), self.group, bucket.work)
        waited(what, self.group, work)
        counts = meta.tolist()  # before the scaling below
        grads: list[torch.Tensor | None] = [None] * n
        with torch.no_grad():
            for bucket in self.buckets:
                flat = bucket.buffer()
                if self.meta is not None and bucket is self.meta[0]:
                    flat = flat[: self.meta[1]]
                flat.mul_(self.scale)
                for i, offset in zip(bucket.positions, bucket.offsets, strict=True):
                    if counts[i] > 0:
                        p = self.params[i]
                        grads[i] = flat[offset : offset + p.numel()].view(p.shape)
        bad = [r for r in range(self.world) if counts[n + r] > 0]
        return Reduced(grads, bad)
