"""``TorchOptimizer``: any ``torch.optim`` optimizer behind diffprog's optimizer protocol.

The in-place fast path (Hasktorch's libtorch optimizer bindings and their ``unsafeStep``): the
wrapped ``torch.optim`` object updates the model's own parameters and its own state in place,
so a step allocates nothing beyond what torch.optim itself does. The price is aliasing; see
:class:`TorchOptimizer` for exactly what is shared.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from typing_extensions import Self

from diffprog import DiffprogError, flatten_parameters
from diffprog.optim._dtensor import refuse_plain_among_sharded
from diffprog.optim._grad import (
    NonFiniteError,
    OnNonFinite,
    all_finite,
    check_loss_reaches_parameters,
    check_on_nonfinite,
    check_trains_something,
    nonfinite_error,
)
from diffprog.optim._optimizer import (
    Gradients,
    LearningRate,
    check_gradient,
    learning_rate_at,
    used_mask,
)
from diffprog.optim._pure import DIFFERENTIABLE, in_layout_of
from diffprog.optim._select import Selection, resolve_settings

__all__ = ["TorchOptimizer"]

M = TypeVar("M")

Scheduler = Any  # torch.optim.lr_scheduler.LRScheduler or ReduceLROnPlateau
Overrides = Mapping[Any, Mapping[str, Any]] | Iterable[tuple[Any, Mapping[str, Any]]]


class _Abort(Exception):
    """Raised inside a closure to stop a torch step at a non-finite evaluation."""


class TorchOptimizer:
    """A ``torch.optim`` optimizer as a diffprog optimizer: the in-place fast path.

    Built with :meth:`init` from a model and any ``torch.optim`` class with its options
    (``fused=True``, ``foreach=True``, ``LBFGS``, per-parameter groups chosen by path), it
    follows the same protocol as the pure optimizers, so a loop written with
    ``run_step(model, optimizer, loss, lr)`` runs unchanged with either. ``lr`` sets the
    torch optimizer's learning rate (of every group, times its ``lr_scale``) for that one step;
    ``lr=None`` uses the torch optimizer's own, e.g. as a ``torch.optim.lr_scheduler`` moves it.

    **Aliasing** (Hasktorch's ``unsafeStep`` caveat). After
    ``new_model, new_opt = run_step(model, opt, loss, lr)``:

    * ``new_model is model``: the model is not rebuilt. Its parameters are the same
      ``Parameter`` objects, overwritten in place with the new values, so ``model``, every
      value holding those parameters (a tuple of layers, another model built by
      ``replace_parameters`` with them, a list from ``flatten_parameters``) and every view
      of them now hold the *new* values. Copy first to keep the old ones:
      ``old = [p.detach().clone() for p in flatten_parameters(model)]``.
    * ``new_opt is opt``: one torch optimizer, whose state (Adam's moments, the step count)
      was updated in place; there is no older optimizer value to go back to.
      ``opt.state_dict()`` copies it out (``opt.optimizer.state_dict()`` does not: its
      tensors are the live state).
    * The parameters' ``.grad`` is ``None`` again after each step: gradients are handed to
      torch.optim through ``.grad`` during the step only.
    * ``loss``'s graph was built from the old values and is consumed by the step.

    A step whose loss or gradient is not finite is refused before anything is written
    (``run_step``'s ``on_nonfinite``), so the model and the optimizer keep their values. With
    a closure (``loss`` a function, for ``LBFGS``), a non-finite value at a later evaluation
    inside the step also restores both, from a copy taken before the step.

    The generic protocol also works: ``opt.step(lr, gradients, params)`` takes the tensors of
    ``flatten_parameters(model)`` (or fresh ones sharing their storage, as ``make_independent``
    makes; the torch optimizer is moved over to those), writes the new values into them, and
    returns ``(params, opt)``: the same tensors and the same optimizer.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import TorchOptimizer, run_step
        >>> model = sample(LinearSpec(2, 1), generator=torch.Generator().manual_seed(0))
        >>> opt = TorchOptimizer.init(model, torch.optim.Adam, fused=True)
        >>> weight = model.weight.detach().clone()
        >>> new_model, new_opt = run_step(model, opt, model(torch.ones(1, 2)).sum(), 0.1)
        >>> new_model is model, new_opt is opt
        (True, True)
        >>> torch.allclose(model.weight, weight - 0.1)
        True
    """

    __slots__ = ("_count", "_model", "_optimizer", "_params", "_scheduler", "_trained")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor],
        *,
        scheduler: Scheduler | None = None,
    ) -> None:
        """Wrap an existing torch optimizer over ``params`` (prefer :meth:`init`).

        Args:
            optimizer: a ``torch.optim.Optimizer`` whose parameter groups hold tensors of
                ``params``.
            params: every parameter of the model, in ``flatten_parameters`` order.
            scheduler: a learning-rate scheduler of ``optimizer``, stepped after each step.

        Raises:
            DiffprogError: the optimizer holds a tensor that is not one of ``params``.
            ValueError: a parameter group has ``differentiable=True``.
        """
        _refuse_differentiable(optimizer)
        params = list(params)
        where = {id(p): i for i, p in enumerate(params)}
        trained: list[int] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in where:
                    raise DiffprogError(
                        f"the torch optimizer holds a tensor of shape {tuple(p.shape)} that is "
                        "not a parameter of the model. Build it over flatten_parameters(model), "
                        "or use TorchOptimizer.init(model, torch.optim.X, ...)."
                    )
                trained.append(where[id(p)])
            if group.get("fused"):
                _require_dense(group["params"], where)
        self._optimizer = optimizer
        self._params = params
        self._trained = sorted(trained)
        self._scheduler = scheduler
        self._count = 0
        self._model: Any = None

    @classmethod
    def init(
        cls,
        model: Any,
        optimizer: type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer],
        /,
        *,
        overrides: Overrides = (),
        freeze: Selection | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Scheduler] | None = None,
        **options: Any,
    ) -> Self:
        """Wrap ``optimizer(model's parameters, **options)``.

        Args:
            model: the model (or a list of parameters).
            optimizer: a ``torch.optim.Optimizer`` class (``torch.optim.Adam``,
                ``torch.optim.LBFGS``, ...), or any callable taking parameter groups first.
            overrides: per-parameter settings as torch.optim parameter groups chosen by path,
                ``{selection: {option: value}}`` (e.g. ``{"*.bias": {"weight_decay": 0.0}}``);
                a selection is a filter (``diffprog.Filter``): a glob pattern over
                ``named_parameters`` paths, a compiled regex, a type (``diffprog.nn.Linear``),
                a predicate ``(path, param) -> bool`` or ``diffprog.select(...)``.
                Besides the optimizer's options, ``lr_scale`` multiplies the ``lr`` given to
                ``run_step`` for those parameters.
            freeze: a selection of parameters not to train: the torch optimizer never sees
                them, they get no gradient, no update and no state.
            scheduler: a function from the torch optimizer to a
                ``torch.optim.lr_scheduler`` scheduler, stepped after every step (a
                ``ReduceLROnPlateau`` with the step's loss).
            **options: the optimizer's options (``lr``, ``betas``, ``fused``, ...).

        Returns:
            The wrapped optimizer.

        Raises:
            ValueError: an override names an option the optimizer does not take, or a
                selection matches no parameter.
            NothingToTrainError: (a ``DiffprogError`` and a ``ValueError``) the model has no
                ``Parameter`` (specs where layers belong?), or every parameter is frozen.

        Example:
            >>> from diffprog.nn import LinearSpec
            >>> from diffprog.optim import TorchOptimizer
            >>> model = sample(LinearSpec(2, 1))
            >>> opt = TorchOptimizer.init(
            ...     model, torch.optim.AdamW, lr=1e-3, overrides={"bias": {"weight_decay": 0.0}}
            ... )
            >>> [g["weight_decay"] for g in opt.optimizer.param_groups]
            [0.01, 0.0]
        """
        known = _option_names(optimizer)
        owner = getattr(optimizer, "__name__", type(optimizer).__name__)
        settings, params = resolve_settings(model, overrides, freeze, known, owner)
        check_trains_something(model, settings.num_params, settings.trainable, owner)
        groups = [
            {"params": [params[i] for i in group.indices], **dict(group.overrides)}
            for group in settings.groups
        ]
        torch_optimizer = optimizer(groups, **options)
        sched = None if scheduler is None else scheduler(torch_optimizer)
        return cls(torch_optimizer, params, scheduler=sched)

    # --- what it wraps ------------------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped ``torch.optim`` optimizer (shared, not a copy)."""
        return self._optimizer

    @property
    def scheduler(self) -> Scheduler | None:
        """The learning-rate scheduler stepped after each step, if any."""
        return self._scheduler

    @property
    def count(self) -> int:
        """How many steps this optimizer has taken (the argument of a schedule ``lr``)."""
        return self._count

    @property
    def trainable(self) -> tuple[bool, ...]:
        """For each parameter of the model whether the torch optimizer trains it."""
        trained = set(self._trained)
        return tuple(i in trained for i in range(len(self._params)))

    def state_dict(self) -> dict[str, Any]:
        """A copy of the torch optimizer's (and scheduler's) state, to save with the model.

        Unlike ``torch.optim.Optimizer.state_dict``, whose tensors are the live state that the
        next step overwrites, this is a snapshot (a deep copy): later steps do not reach it.
        """
        out: dict[str, Any] = {"optimizer": self._optimizer.state_dict(), "count": self._count}
        if self._scheduler is not None:
            out["scheduler"] = self._scheduler.state_dict()
        return copy.deepcopy(out)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (in place, as torch.optim does)."""
        self._optimizer.load_state_dict(state["optimizer"])
        self._count = int(state.get("count", 0))
        if self._scheduler is not None and "scheduler" in state:
            self._scheduler.load_state_dict(state["scheduler"])

    def __repr__(self) -> str:
        groups = self._optimizer.param_groups
        defaults = _option_defaults(type(self._optimizer))
        shown = ", ".join(
            f"{k}={v!r}"
            for k, v in groups[0].items()
            if k == "lr" or (k != "params" and v is not None and not _same(v, defaults.get(k)))
        )
        frozen = len(self._params) - len(self._trained)
        extra = f", {frozen} frozen" if frozen else ""
        if len(groups) > 1:
            extra += f", {len(groups)} groups"
        return (
            f"TorchOptimizer({type(self._optimizer).__name__}({shown}), "
            f"{len(self._trained)} parameters{extra}, count={self._count})"
        )

    # --- the protocol -------------------------------------------------------------------------

    def step(
        self,
        lr: LearningRate | None,
        gradients: Gradients,
        params: Sequence[torch.Tensor],
        *,
        used: Sequence[bool] | None = None,
    ) -> tuple[list[torch.Tensor], Self]:
        """One step of the wrapped optimizer, in place: the protocol's ``step``.

        Args:
            lr: the learning rate for this step (``None``: the optimizer's own).
            gradients: one gradient per parameter of the model, each with its parameter's
                shape, dtype and device (those of frozen parameters are ignored).
            params: the model's parameters, as ``flatten_parameters`` lists them.
            used: for each parameter whether the loss reaches it (``None``: every one). An
                unused parameter's ``.grad`` stays ``None``, so torch.optim leaves it alone
                (its gradient is not read and may be ``None``).

        Returns:
            ``(params, self)``: the same tensors, now holding the new values, and this
            optimizer, its state updated.

        Raises:
            DiffprogError: the parameters or gradients do not fit this optimizer.
            ValueError: a gradient's shape or device differs from its parameter's, ``used``
                has the wrong length, or the learning rate is negative.
            TypeError: a gradient read by the step is not a tensor, or has another dtype.
        """
        params = list(params)
        gradients = list(gradients)
        if len(gradients) != len(params):
            raise DiffprogError(
                f"TorchOptimizer.step got {len(params)} parameters but {len(gradients)} "
                "gradients. Pass one gradient per parameter, in flatten_parameters order."
            )
        mask = used_mask(used, len(params), "TorchOptimizer")
        self._adopt(params)
        trained = [params[i] for i in self._trained]
        for i in self._trained:
            if mask is None or mask[i]:
                check_gradient("TorchOptimizer", i, gradients[i], params[i])
        with torch.no_grad():
            for p, i in zip(trained, self._trained, strict=True):
                if mask is None or mask[i]:
                    # torch.autograd.grad may return expanded gradients (of a sum, say), which
                    # the fused kernels misread (torch 2.13, CPU): give them p's layout.
                    p.grad = in_layout_of(gradients[i], p)
        try:
            self._torch_step(lr, None, None)
        finally:
            for p in trained:
                p.grad = None
        return params, self

    def step_model(
        self,
        model: M,
        loss: torch.Tensor | Callable[[], torch.Tensor],
        lr: LearningRate | None,
        *,
        on_nonfinite: OnNonFinite = "raise",
    ) -> tuple[M, Self]:
        """The whole training step for ``run_step``: gradients, check, the torch step.

        Args:
            model: the model; its parameters are updated in place.
            loss: the loss computed from ``model``, or a closure recomputing it from the
                current parameters (called as often as the optimizer needs, e.g. by LBFGS).
            lr: the learning rate for this step (``None``: the optimizer's own).
            on_nonfinite: see ``run_step``.

        Returns:
            ``(model, self)``.

        Raises:
            NonFiniteError: a non-finite loss or gradient with ``on_nonfinite="raise"``.
            DiffprogError: the loss depends on none of the trained parameters (computed from
                another model, or under ``torch.no_grad()``): the same check as the pure path;
                a plain Parameter among parameters sharded over more than one rank.

        A refused step (either error, or ``"skip"``) leaves the parameters, their ``.grad``,
        the torch optimizer, its scheduler and ``count`` as they were.
        """
        check_on_nonfinite(on_nonfinite)
        params = self._params_of(model)
        refuse_plain_among_sharded(model, params)
        trained = params if len(self._trained) == len(params) else self._trained_params()
        if callable(loss) and not isinstance(loss, torch.Tensor):
            return self._closure_step(model, loss, lr, on_nonfinite, trained)
        if not loss.requires_grad:  # no graph at all (torch.no_grad()): nothing reaches them
            check_loss_reaches_parameters(False)
        saved = _take_grads(trained)
        taken = False
        try:
            torch.autograd.backward(loss, inputs=trained)
            grads = [p.grad for p in trained]
            # A loss of another model leaves every .grad None: torch.optim would skip every
            # parameter but still count the step and move the scheduler.
            check_loss_reaches_parameters(any(g is not None for g in grads))
            if on_nonfinite != "ignore" and not all_finite(loss, grads):
                if on_nonfinite == "skip":
                    return model, self
                raise nonfinite_error(model, loss, grads, self._trained_indices())
            del grads
            taken = True
            self._torch_step(lr, None, loss)
        finally:
            _put_grads(trained, None if taken else saved)
        return model, self

    # --- internals ----------------------------------------------------------------------------

    def _trained_params(self) -> list[torch.Tensor]:
        return [self._params[i] for i in self._trained]

    def _trained_indices(self) -> list[int]:
        return list(self._trained)

    def _params_of(self, model: Any) -> list[torch.Tensor]:
        """The model's parameters, with the torch optimizer holding exactly those tensors."""
        if model is self._model:
            return self._params
        params: list[torch.Tensor] = list(flatten_parameters(model))
        self._adopt(params)
        self._model = model
        return params

    def _adopt(self, params: list[torch.Tensor]) -> None:
        """Make the torch optimizer hold ``params``: after ``make_independent`` or a reload the
        model has new tensor objects in the places of the old ones (state moves with them)."""
        old = self._params
        if len(params) == len(old) and all(a is b for a, b in zip(params, old, strict=True)):
            return
        if len(params) != len(old):
            raise DiffprogError(
                f"this TorchOptimizer was built for a model with {len(old)} parameters, but the "
                f"model given has {len(params)}. Build it from this model: "
                "TorchOptimizer.init(model, torch.optim.X, ...)."
            )
        for i, (a, b) in enumerate(zip(params, old, strict=True)):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise DiffprogError(
                    f"parameter {i} of the model given has shape {tuple(a.shape)} ({a.dtype}, "
                    f"{a.device}) but this TorchOptimizer holds {tuple(b.shape)} ({b.dtype}, "
                    f"{b.device}) there. Use the optimizer with the model it was built from."
                )
        moved = {id(b): a for a, b in zip(params, old, strict=True)}
        for group in self._optimizer.param_groups:
            # In place: LBFGS keeps a reference to its first group's list.
            group["params"][:] = [moved.get(id(p), p) for p in group["params"]]
        state = self._optimizer.state
        entries = list(state.items())
        state.clear()
        for key, value in entries:
            state[moved.get(id(key), key)] = value
        self._params = params
        self._model = None

    def _torch_step(
        self,
        lr: LearningRate | None,
        closure: Callable[[], torch.Tensor] | None,
        loss: torch.Tensor | None,
    ) -> Any:
        """The wrapped step, with ``lr`` in every group for its duration, then the schedule."""
        groups = self._optimizer.param_groups
        saved: list[Any] = []
        if lr is not None:
            value = learning_rate_at(lr, self._count)
            for group in groups:
                old = group["lr"]
                saved.append(old)
                scale = group.get("lr_scale", 1.0)
                new = value * scale if scale != 1.0 else value
                if isinstance(old, torch.Tensor):
                    group["lr"] = torch.as_tensor(new, dtype=old.dtype, device=old.device)
                else:
                    group["lr"] = float(new)
        try:
            if closure is not None:
                result = self._optimizer.step(closure)  # type: ignore[arg-type]
            else:
                result = None
                self._optimizer.step()
        finally:
            if saved:  # empty when lr is None: no group's lr was set
                for group, old in zip(groups, saved, strict=True):
                    group["lr"] = old
        self._count += 1
        if self._scheduler is not None:
            if isinstance(self._scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = result if loss is None else loss
                if isinstance(metric, torch.Tensor):
                    metric = metric.detach()
                self._scheduler.step(float(metric))  # type: ignore[arg-type]
            else:
                self._scheduler.step()
        return result

    def _closure_step(
        self,
        model: M,
        loss_fn: Callable[[], torch.Tensor],
        lr: LearningRate | None,
        on_nonfinite: OnNonFinite,
        trained: list[torch.Tensor],
    ) -> tuple[M, Self]:
        check = on_nonfinite != "ignore"
        backup: tuple[list[torch.Tensor], dict[Any, Any]] | None = None
        if check:
            with torch.no_grad():
                values = [p.detach().clone() for p in trained]
            backup = (values, {k: copy.deepcopy(v) for k, v in self._optimizer.state.items()})
        bad: list[DiffprogError] = []

        def closure() -> torch.Tensor:
            for p in trained:
                p.grad = None
            value = loss_fn()
            if value.requires_grad:
                torch.autograd.backward(value, inputs=trained)
            grads = [p.grad for p in trained]
            try:
                # The pure path's check, at every evaluation: LBFGS's first one comes before
                # any update, so a closure of another model (or under no_grad) changes nothing.
                check_loss_reaches_parameters(any(g is not None for g in grads))
                if check and not all_finite(value, grads):
                    raise nonfinite_error(model, value, grads, self._trained_indices())
            except DiffprogError as error:
                bad.append(error)
                raise _Abort from None
            return value.detach()

        saved = _take_grads(trained)
        taken = False
        try:
            self._torch_step(lr, closure, None)
            taken = True
        except _Abort:
            if backup is not None:
                with torch.no_grad():
                    torch._foreach_copy_(trained, backup[0])
                self._optimizer.state.clear()
                self._optimizer.state.update(backup[1])
            error = bad[0]
            if on_nonfinite == "skip" and isinstance(error, NonFiniteError):
                return model, self
            raise error from None
        finally:
            _put_grads(trained, None if taken else saved)
        return model, self


def _take_grads(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The ``.grad`` of each of ``params`` (usually ``None``), now cleared for a backward pass."""
    saved = [p.grad for p in params]
    for p, g in zip(params, saved, strict=True):
        if g is not None:
            p.grad = None
    return saved


def _put_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None] | None) -> None:
    """Set each ``.grad`` of ``params`` to ``grads`` (``None``: clear them all)."""
    if grads is None:
        for p in params:
            p.grad = None
    else:
        for p, g in zip(params, grads, strict=True):
            p.grad = g


def _require_dense(params: Sequence[torch.Tensor], where: Mapping[int, int]) -> None:
    """Refuse a parameter that is not dense (a strided slice) for a fused torch optimizer.

    torch's fused kernels walk a parameter as one flat block of memory, so they update a
    slice's gaps instead of its elements: a silent wrong result (torch 2.13, CPU).
    """
    for p in params:
        # empty_like keeps the strides of a dense tensor only; on "meta" it allocates nothing.
        if torch.empty_like(p, device="meta").stride() != p.stride():
            raise DiffprogError(
                f"parameter {where[id(p)]} (shape {tuple(p.shape)}, strides {p.stride()}) is "
                "not dense (a strided slice of a larger tensor), which torch's fused kernels "
                "misread. Make it a tensor of its own (p.clone()), or use fused=False."
            )


def _refuse_differentiable(optimizer: torch.optim.Optimizer) -> None:
    """Refuse a torch optimizer with ``differentiable=True``: a TorchOptimizer steps it in
    place on the model's leaf parameters under ``torch.no_grad()``, so its steps could never
    carry a meta-gradient (torch would fail at the first step, on a leaf written in place)."""
    for group in optimizer.param_groups:
        if group.get("differentiable"):
            name = type(optimizer).__name__
            pure = (
                f"diffprog.optim.{name}.init(model, differentiable=True)"
                if name in DIFFERENTIABLE
                else "a pure optimizer of diffprog.optim with differentiable=True"
            )
            raise ValueError(
                f"TorchOptimizer does not take {name}(differentiable=True): it steps torch.optim "
                "in place on the model's parameters, so a step carries no meta-gradient. Use "
                f"{pure} (docs/optim.md, 'Differentiable steps')."
            )


def _option_names(optimizer: Callable[..., Any]) -> tuple[str, ...]:
    """The options ``optimizer`` takes (for per-group settings), plus ``lr_scale``."""
    try:
        signature = inspect.signature(optimizer)
    except (TypeError, ValueError):
        return ("lr", "lr_scale")
    names = [
        name
        for name, parameter in signature.parameters.items()
        if name != "params"
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]
    return (*names, "lr_scale")


def _option_defaults(optimizer: Callable[..., Any]) -> dict[str, Any]:
    """The default values of ``optimizer``'s options (empty where they cannot be read)."""
    try:
        signature = inspect.signature(optimizer)
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError):
        return False
