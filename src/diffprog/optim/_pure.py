"""What every pure optimizer shares: the step around its ``_update``.

A pure optimizer is a :class:`~diffprog.Parameterized` value whose class declares its settings
with ``hyper()`` and its state with ``state()`` (see ``_declare.py``, which derives ``init``,
validation, overrides and the docs table from them) and writes the math in ``_update``. This
module holds the base class and the step: check, group and piece, update, advance (per-parameter
counts, donation, complex numbers), and the helpers the fused kernels need.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from typing_extensions import Self

from diffprog import DiffprogError, Parameterized
from diffprog.optim._declare import Declaration, Lease, add_common_fields, declaration_of, declare
from diffprog.optim._optimizer import (
    Gradients,
    LearningRate,
    check_gradient,
    learning_rate_at,
    used_mask,
)
from diffprog.optim._select import ParamGroup, ParamSettings, Selection, resolve_settings

__all__ = ["PureOptimizer", "consuming_step", "pieces_of", "sqrt_of_moment"]

Overrides = Mapping[Any, Mapping[str, Any]] | Iterable[tuple[Any, Mapping[str, Any]]]


class PureOptimizer(Parameterized):
    """The base of the pure optimizers (``GD``, ``Adam``, ...): see the module docstring.

    A subclass declares its hyper-parameters with :func:`hyper` and its state with
    :func:`state`, and writes ``_update(hyper, lr, count, params, grads, state)`` (and, where
    needed, ``_check`` for checks across settings, ``_state_names``, ``_init_state``). The
    class keyword ``torch_options=(...)`` names the torch.optim options (of
    ``TORCH_OPTIONS``) that its ``init`` accepts and ignores. CONTRIBUTING.md has the
    recipe.

    Example:
        >>> from diffprog.optim import GD, Lion
        >>> isinstance(GD(), PureOptimizer), Lion.declaration().state
        (True, ('exp_avg',))
    """

    #: Whether ``_update`` takes sparse gradients (``EmbeddingSpec(sparse=True)``).
    _sparse_ok: ClassVar[bool] = False

    #: Whether the class writes ``_update_differentiable`` (``differentiable=True``).
    _differentiable_ok: ClassVar[bool] = False

    if TYPE_CHECKING:  # added to every subclass as dataclass fields (see the module docstring)

        @property
        def count(self) -> int:
            """The number of steps taken."""

        @property
        def param_counts(self) -> tuple[int, ...]:
            """The number of steps that updated each parameter (empty: all ``count``)."""

        @property
        def settings(self) -> ParamSettings | None:
            """Which parameters are trained, and how."""

        @property
        def donate(self) -> bool:
            """Whether a step may reuse this value's state."""

        @property
        def differentiable(self) -> bool:
            """Whether a step runs with autograd on (a differentiable function of its inputs)."""

        @property
        def lease(self) -> Lease | None:
            """With ``donate``, whether this value still holds its state."""

        @classmethod
        def init(cls, model: Any, **settings: Any) -> Self:
            """Derived from the declared fields: see :func:`hyper`."""

    def __init_subclass__(cls, torch_options: tuple[str, ...] = (), **kwargs: Any) -> None:
        add_common_fields(cls)
        super().__init_subclass__(**kwargs)
        declare(cls, torch_options)

    @classmethod
    def declaration(cls) -> Declaration:
        """What this class declares: its hyper-parameter fields and state kinds, in order."""
        return declaration_of(cls)

    # --- what a subclass provides -------------------------------------------------------------

    @classmethod
    def _check(cls, hyper: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` for invalid settings together (each alone is its field's
        ``check``), as torch.optim does."""

    @classmethod
    def _state_names(cls, hyper: Mapping[str, Any]) -> tuple[str, ...]:
        """The state a parameter needs under ``hyper`` (default: every declared kind)."""
        return declaration_of(cls).state

    @classmethod
    def _init_state(cls, name: str, param: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
        """The initial value of state ``name`` for ``param``."""
        return torch.zeros_like(param, memory_format=torch.preserve_format)

    @classmethod
    def _param_shaped_state(cls) -> tuple[str, ...]:
        """The state kinds whose tensors have their parameter's shape (default: every kind;
        a subclass with scalar or factored state names the others out). Each step checks
        them against the parameters: see :meth:`_check_state_fits`."""
        return declaration_of(cls).state

    def _update(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """Return new parameters and update ``state`` (fresh copies, or donated) in place.

        ``params`` and ``grads`` must be left unchanged. ``count`` is the number of steps taken
        before this one (by these parameters: per-parameter counts call this once per count).
        """
        raise NotImplementedError

    def _update_differentiable(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """``_update`` for ``differentiable=True``: out-of-place operations only, run with
        autograd on, so the new parameters and state (put in ``state``'s lists in place of
        the old entries) are differentiable functions of ``params``, ``grads``, ``lr``, the
        old state and the hyper-parameters (which may be tensors that require grad).

        torch.optim's ``differentiable=True`` runs its single-tensor path; this is that
        algorithm, in its order, without writing into any tensor.
        """
        raise NotImplementedError

    # --- building -----------------------------------------------------------------------------

    def __post_init__(self) -> None:
        # A value built directly (Adam(betas=...), dataclasses.replace) is checked as init's
        # are; a step builds its successor without __init__, so it does not pay for this.
        for name, value in declaration_of(type(self)).fixed:
            if getattr(self, name) != value:
                raise TypeError(
                    f"{type(self).__name__}.{name} is fixed at {value!r}, got "
                    f"{getattr(self, name)!r}."
                )
        type(self)._validate(self._defaults())
        self._check_differentiable()

    def _check_differentiable(self) -> None:
        """Refuse ``differentiable=True`` where this class has no differentiable step, and
        a learned (grad-requiring) hyper-parameter without it: a step would cut its gradient
        silently."""
        owner = type(self).__name__
        if self.differentiable:
            if not self._differentiable_ok:
                raise ValueError(
                    f"{owner}(differentiable=True) is not supported: {owner} has no "
                    "differentiable step (it writes no _update_differentiable, see "
                    f"CONTRIBUTING.md). Write one, use one of {', '.join(DIFFERENTIABLE)} "
                    "(docs/optim.md, 'Differentiable steps'), or leave differentiable=False."
                )
            if self.donate:
                raise ValueError(
                    f"{owner}: donate=True and differentiable=True cannot be combined: a "
                    "donated step writes into the old state, which the graph of a "
                    "differentiable step still needs. Leave donate=False."
                )
            return
        learned = [
            f.name
            for f in declaration_of(type(self)).hyper
            if _requires_grad(getattr(self, f.name))
        ]
        if learned:
            raise ValueError(
                f"{owner}: the hyper-parameter(s) {', '.join(learned)} are tensors that "
                "require grad, but a step with differentiable=False runs under "
                "torch.no_grad() and would cut their gradient. Pass differentiable=True."
            )

    def _defaults(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in declaration_of(type(self)).hyper}

    @classmethod
    def _hyper_defaults(cls) -> dict[str, Any]:
        """The declared defaults of every hyper-parameter."""
        return declaration_of(cls).defaults()

    @classmethod
    def _validate(cls, hyper: Mapping[str, Any]) -> None:
        """Each declared check, then the class's checks across settings."""
        declaration_of(cls).check(hyper)
        cls._check(hyper)

    @classmethod
    def _build(
        cls,
        model: Any,
        hyper: dict[str, Any],
        overrides: Overrides,
        freeze: Selection | None,
        donate: bool,
        count: int = 0,
        *,
        differentiable: bool = False,
    ) -> Self:
        """Resolve the settings against ``model`` and create the zero state."""
        declared = declaration_of(cls)
        cls._validate(hyper)
        settings, params = resolve_settings(
            model, overrides, freeze, (*declared.settable, "lr_scale"), cls.__name__
        )
        for group in settings.groups:
            cls._validate({**hyper, **dict(group.overrides)})
        state = cls._zero_state(settings, params, hyper)
        fields: dict[str, Any] = {
            name: tuple(values) if any(v is not None for v in values) else ()
            for name, values in state.items()
        }
        if declared.donates:
            fields["donate"] = donate
            fields["lease"] = Lease() if donate else None
        fields["count"], fields["settings"] = count, settings
        fields["differentiable"] = differentiable
        return cls(**hyper, **fields)

    @classmethod
    def _zero_state(
        cls,
        settings: ParamSettings,
        params: Sequence[torch.Tensor],
        hyper: Mapping[str, Any],
        kinds: Sequence[str] | None = None,
    ) -> dict[str, list[torch.Tensor | None]]:
        """The initial state of each kind (``kinds``: every one), ``None`` where a parameter
        has none (frozen, or its group's settings do not need that kind)."""
        kinds = declaration_of(cls).state if kinds is None else kinds
        state: dict[str, list[torch.Tensor | None]] = {
            name: [None] * settings.num_params for name in kinds
        }
        with torch.no_grad():
            for group in settings.groups:
                merged = {**hyper, **dict(group.overrides)}
                for name in cls._state_names(merged):
                    if name not in state:
                        continue
                    for i in group.indices:
                        state[name][i] = cls._init_state(name, params[i], merged)
        return state

    @property
    def trainable(self) -> tuple[bool, ...] | None:
        """For each parameter whether this optimizer trains it (``None``: all of them)."""
        return None if self.settings is None else self.settings.trainable

    # --- stepping -----------------------------------------------------------------------------

    def step(
        self,
        lr: LearningRate,
        gradients: Gradients,
        params: Sequence[torch.Tensor],
        *,
        used: Sequence[bool] | None = None,
    ) -> tuple[list[torch.Tensor], Self]:
        """One optimizer step, out of place.

        Args:
            lr: the learning rate: a float, a 0-dim tensor, or a schedule of :attr:`count`.
            gradients: one gradient per parameter, in ``flatten_parameters`` order, each with
                its parameter's shape, dtype and device (any strides: an expanded or
                transposed gradient is copied into the parameter's layout where a fused kernel
                needs it). Those of frozen and of unused parameters are not read.
            params: the current parameters.
            used: for each parameter whether the loss reaches it (``None``: every one). An
                unused parameter is left as it is and its state does not advance, as
                torch.optim skips a parameter whose ``.grad`` is ``None``; its gradient may be
                ``None``. ``run_step`` passes this.

        Returns:
            ``(new_params, new_optimizer)``. ``params``, ``gradients`` and this optimizer are
            unchanged (with ``donate=True``, this optimizer's state is handed to the new one
            and this value can no longer step).

        Raises:
            DiffprogError: the number of parameters or gradients does not match, the state
                was donated already, or a gradient is sparse and this optimizer takes none.
            ValueError: a gradient's shape or device differs from its parameter's, ``used``
                has the wrong length, or the learning rate is negative.
            TypeError: a gradient read by the step is not a tensor (``None``) or has another
                dtype than its parameter.

        Example:
            >>> from diffprog.optim import Adam
            >>> p = make_independent(torch.zeros(2))
            >>> opt = Adam.init([p])
            >>> new, opt2 = opt.step(0.1, [torch.ones(2)], [p])
            >>> new[0], opt.count, opt2.count, p
            (tensor([-0.1000, -0.1000]), 0, 1, Parameter containing:
            tensor([0., 0.], requires_grad=True))
        """
        return self._diffprog_step(lr, list(gradients), list(params), False, used)

    def _diffprog_step(
        self,
        lr: LearningRate,
        gradients: list[Any],
        params: list[torch.Tensor],
        consume: bool,
        used: Sequence[bool] | None = None,
    ) -> tuple[list[torch.Tensor], Self]:
        """:meth:`step` in four named parts: check, group (and piece), update, advance.

        With ``consume`` the caller hands ``gradients`` over (``run_step`` does): their
        fit is known (autograd made them for these parameters) and each entry is set to None
        as soon as its update is done. Why: the old parameters and state stay valid while the
        new ones are written, so a pure step holds 6 copies of the parameters besides the
        gradients; on a large model the step runs piece by piece (:data:`PIECE_BYTES` at
        most) and drops each piece's gradients after its update, so that the peak is near 6
        copies rather than 7. A small model is one piece: no cost.
        """
        settings, mask = self._check_step(gradients, params, consume, used)
        count = self.count
        lr_now = learning_rate_at(lr, count)
        defaults = self._defaults()
        held = self._held_state(settings, params, defaults, mask)
        self._check_state_fits(held, params)
        if self.donate:
            # From here on this value's state is being updated in place: if anything below
            # fails halfway, stepping this value again must be refused, not half-repeated.
            self._spend_lease()
        pieces = pieces_of(params) if consume else None
        new_params, new_state = self._update_groups(
            settings, defaults, lr_now, params, gradients, held, mask, pieces, consume
        )
        return new_params, self._advanced(settings, mask, new_state)

    def _check_step(
        self,
        gradients: list[Any],
        params: list[torch.Tensor],
        consume: bool,
        used: Sequence[bool] | None,
    ) -> tuple[ParamSettings, list[bool] | None]:
        """Refuse a step this optimizer cannot take; return its settings and used mask."""
        owner = type(self).__name__
        if self.lease is not None and self.lease.spent:
            raise DiffprogError(
                f"this {owner} was created with donate=True and has already "
                "stepped, so its state now belongs to the optimizer that step returned. Step "
                "that one instead, or init with donate=False to keep old optimizers valid."
            )
        if self.donate and self.lease is None:
            raise DiffprogError(
                f"this {owner} has donate=True but no lease, so a second step from it could "
                f"not be refused. Build it with {owner}.init(model, donate=True)."
            )
        n = len(params)
        if len(gradients) != n:
            raise DiffprogError(
                f"{owner}.step got {n} parameters but {len(gradients)} gradients. "
                "Pass one gradient per parameter, in flatten_parameters order."
            )
        settings = self.settings
        if settings is None:
            settings = ParamSettings(n, (ParamGroup(tuple(range(n))),))
        elif settings.num_params != n:
            raise DiffprogError(
                f"this {owner} was built for {settings.num_params} parameters but "
                f"step got {n}. Build it from the same model: {owner}.init(model)."
            )
        mask = None if used is None else used_mask(used, n, owner)
        if not consume:
            self._check_gradients(gradients, params, settings, mask)
        elif not self._sparse_ok and any(map(_is_sparse, gradients)):
            # run_step (consume) has its gradients from autograd for these very parameters,
            # so their shapes, dtypes and devices fit; but an Embedding may give sparse ones.
            raise self._sparse_error(next(i for i, g in enumerate(gradients) if g.is_sparse))
        return settings, mask

    def _check_state_fits(
        self, held: Mapping[str, tuple[torch.Tensor | None, ...]], params: list[torch.Tensor]
    ) -> None:
        """Refuse state made for other parameters than ``params``.

        Why: an optimizer's state is matched to parameters by position. After ``freeze`` or
        ``unfreeze`` changed which parameters a model has, a state built before may have the
        right count but belong to other parameters; the fused and multi-tensor kernels would
        then broadcast it silently. All kinds are made together, for the same parameters, so
        one kind held for every parameter tells; it is compared in one C-level ``map``
        (``is_same_size``), with a loop only where some entries are None (frozen in the
        optimizer). Cost: about 3% of an Adam step over 100 parameters of 16x16, less for
        larger ones.
        """
        kinds = self._param_shaped_state()
        # Lengths first, of every kind, scalar ones too (a len per kind): only an empty tuple
        # means "none held".
        for name in declaration_of(type(self)).state:
            count = len(held.get(name, ()))
            if count and count != len(params):
                raise self._state_count_misfit(name, count, len(params))
        for name in kinds:
            entries = held.get(name, ())
            if not entries:
                continue  # no state of this kind held (built without init): nothing to check
            try:
                if (
                    all(map(_same_size, entries, params))
                    and list(map(_dtype, entries)) == list(map(_dtype, params))
                    and list(map(_device, entries)) == list(map(_device, params))
                ):
                    return
            except (TypeError, AttributeError):  # some entries are None
                pass
            for i, (entry, param) in enumerate(zip(entries, params, strict=True)):
                if entry is not None and (
                    entry.shape != param.shape
                    or entry.dtype != param.dtype
                    or entry.device != param.device
                ):
                    raise self._state_misfit(name, i, entry, param)
            return

    def _state_count_misfit(self, name: str, held: int, params: int) -> DiffprogError:
        """The error for state of kind ``name`` held for another number of parameters (only
        an empty tuple means "no state held": any other length must be one per parameter)."""
        owner = type(self).__name__
        return DiffprogError(
            f"this {owner}'s state {name} holds {held} entries, but the step has {params} "
            f"parameters. The state must hold one entry per parameter (or be empty, to start "
            f"from zero): build it with {owner}.init(model), or leave {name} empty."
        )

    def _state_misfit(
        self, name: str, index: int, entry: torch.Tensor, param: torch.Tensor
    ) -> DiffprogError:
        owner = type(self).__name__
        if entry.dtype != param.dtype or entry.device != param.device:
            return DiffprogError(
                f"this {owner}'s state {name} of parameter {index} is {entry.dtype} on "
                f"{entry.device}, but the parameter is {param.dtype} on {param.device} (was the "
                f"model converted with dp.to after the optimizer was built?). Convert the "
                f"optimizer the same way (dp.to(opt, ...)) or build a new one: "
                f"{owner}.init(model)."
            )
        return DiffprogError(
            f"this {owner}'s state {name} of parameter {index} has shape "
            f"{tuple(entry.shape)}, which does not fit the parameter's {tuple(param.shape)}: "
            f"the state was built for other parameters (did freeze or unfreeze change the "
            f"model's parameters?). Build a new one: {owner}.init(model)."
        )

    def _spend_lease(self) -> None:
        assert self.lease is not None  # _check_step refused donate without a lease
        self.lease.spent = True

    def _held_state(
        self,
        settings: ParamSettings,
        params: list[torch.Tensor],
        defaults: Mapping[str, Any],
        mask: list[bool] | None,
    ) -> dict[str, tuple[torch.Tensor | None, ...]]:
        """The state this optimizer holds, kind by kind."""
        held = {name: getattr(self, name) for name in declaration_of(type(self)).state}
        missing = [] if mask is None else [name for name, values in held.items() if not values]
        if missing:
            # Built without init: give every trained parameter its zero state now, so that a
            # parameter unused in this step has one when it is used later.
            for name, zero in self._zero_state(settings, params, defaults, missing).items():
                if any(v is not None for v in zero):
                    held[name] = tuple(zero)
        return held

    def _update_groups(
        self,
        settings: ParamSettings,
        defaults: dict[str, Any],
        lr: float | torch.Tensor,
        params: list[torch.Tensor],
        gradients: list[Any],
        held: Mapping[str, tuple[torch.Tensor | None, ...]],
        mask: list[bool] | None,
        pieces: list[int] | None,
        consume: bool,
    ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor | None]]]:
        """``_update`` on each batch of each group: the new parameters and the new state
        (kind by kind, only the kinds some batch updated)."""
        counts = self.param_counts
        whole = settings.is_plain and pieces is None and mask is None and not counts
        new_params = list(params)
        new_state: dict[str, list[torch.Tensor | None]] = {}
        # torch.optim's differentiable=True sets the grad mode to it, whatever the caller's.
        with torch.set_grad_enabled(self.differentiable):
            for group in settings.groups:
                hyper = {**defaults, **dict(group.overrides)} if group.overrides else defaults
                scale = hyper.get("lr_scale", 1.0)
                group_lr = lr if scale == 1.0 else lr * scale
                for idx, steps in _batches(group.indices, pieces, mask, counts, self.count):
                    ps = params if whole else [params[i] for i in idx]
                    gs = gradients if whole else [gradients[i] for i in idx]
                    work = self._state_for(hyper, held, idx, ps, whole)
                    outs = self._run(hyper, group_lr, steps, ps, gs, work)
                    del gs
                    if consume:
                        for i in idx:
                            gradients[i] = None
                    if whole:
                        return outs, dict(work)  # type: ignore[arg-type]
                    for i, out in zip(idx, outs, strict=True):
                        new_params[i] = out
                    for name, values in work.items():
                        # A parameter not in this batch keeps its state (unused: not advanced).
                        before = list(held[name]) or [None] * len(params)
                        target = new_state.setdefault(name, before)
                        for i, v in zip(idx, values, strict=True):
                            target[i] = v
        return new_params, new_state

    def _advanced(
        self,
        settings: ParamSettings,
        mask: list[bool] | None,
        new_state: Mapping[str, list[torch.Tensor | None]],
    ) -> Self:
        """This optimizer one step on: the count, per-parameter counts, state and lease."""
        fields = dict(self.__dict__)
        count = self.count
        fields["count"] = count + 1
        if mask is not None or self.param_counts:
            fields["param_counts"] = _counts_after(self.param_counts, count, settings, mask)
        for name, values in new_state.items():
            fields[name] = tuple(values)
        if self.lease is not None:
            fields["lease"] = Lease()
        # Fields are copied, not re-checked: the __init__ checks ran when this value was built.
        new = object.__new__(type(self))
        object.__setattr__(new, "__dict__", fields)
        return new

    def _check_gradients(
        self,
        gradients: list[Any],
        params: list[torch.Tensor],
        settings: ParamSettings,
        mask: list[bool] | None,
    ) -> None:
        """Raise for a gradient the step would read that does not fit its parameter."""
        owner = type(self).__name__
        for group in settings.groups:
            for i in group.indices:
                if mask is not None and not mask[i]:
                    continue
                grad, param = gradients[i], params[i]
                # Inline the usual case (a fitting tensor): this runs for every parameter.
                if not (
                    isinstance(grad, torch.Tensor)
                    and grad.shape == param.shape
                    and grad.dtype == param.dtype
                    and grad.device == param.device
                ):
                    check_gradient(owner, i, grad, param)
                if grad.is_sparse and not self._sparse_ok:
                    raise self._sparse_error(i)

    def _sparse_error(self, index: int) -> DiffprogError:
        return DiffprogError(
            f"{type(self).__name__} does not take sparse gradients (parameter {index}'s is "
            "sparse: from an Embedding with sparse=True). Use GD, an Embedding with "
            "sparse=False, or TorchOptimizer.init(model, torch.optim.SparseAdam)."
        )

    def _state_for(
        self,
        hyper: Mapping[str, Any],
        states: Mapping[str, tuple[torch.Tensor | None, ...]],
        idx: tuple[int, ...],
        params: list[torch.Tensor],
        whole: bool,
    ) -> dict[str, list[torch.Tensor]]:
        """The state the update of parameters ``idx`` writes: fresh copies of the held state
        (the held state itself when donated), or zero state where none is held yet."""
        work: dict[str, list[torch.Tensor]] = {}
        copied: list[str] = []
        for name in self._state_names(hyper):
            held = states[name]
            if not held:  # built without init: state starts at zero on the first step
                work[name] = [self._init_state(name, p, hyper) for p in params]
                continue
            entries = list(held) if whole else [held[i] for i in idx]
            if not all(map(operator.is_not, entries, itertools.repeat(None))):
                # A kind held for some groups only (amsgrad's max_exp_avg_sq), now needed by a
                # group that had none (a dataclasses.replace turned it on): zero state there,
                # as a fresh torch optimizer starts it.
                entries = [
                    self._init_state(name, p, hyper) if e is None else e
                    for e, p in zip(entries, params, strict=True)
                ]
            work[name] = entries  # type: ignore[assignment]
            copied.append(name)
        if copied and not self.donate and not self.differentiable:
            # (A differentiable step writes into no tensor: it needs no copies.)
            # Every kind copied in one multi-tensor call: one dispatch rather than one per kind
            # (a small model's step is dominated by such per-call costs).
            copies = clone_all([t for name in copied for t in work[name]])
            for k, name in enumerate(copied):
                work[name] = copies[k * len(params) : (k + 1) * len(params)]
        return work

    def _checked(self, outs: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """``outs`` if it has one tensor per parameter, else a clear error (not a parameter
        silently left unstepped)."""
        if len(outs) != len(params):
            raise DiffprogError(
                f"{type(self).__name__}._update returned {len(outs)} tensors for "
                f"{len(params)} parameters. Return one new tensor per parameter, in order."
            )
        return outs

    def _run(
        self,
        hyper: Mapping[str, Any],
        lr: float | torch.Tensor,
        count: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """``_update`` on real views of complex tensors (as torch.optim does), its result
        checked: one new tensor per parameter."""
        update = self._update_differentiable if self.differentiable else self._update
        if not any(map(torch.Tensor.is_complex, params)):
            return self._checked(update(hyper, lr, count, params, grads, state), params)
        real = torch.view_as_real
        r_params = [real(p) if p.is_complex() else p for p in params]
        r_grads = [real(g) if g.is_complex() else g for g in grads]
        r_state = {k: [real(t) if t.is_complex() else t for t in v] for k, v in state.items()}
        outs = self._checked(update(hyper, lr, count, r_params, r_grads, r_state), params)
        for name, values in r_state.items():
            # _update may have replaced a state tensor (by a copy in its parameter's layout,
            # see fused_layouts): hand the replacement on.
            held = state[name]
            held[:] = [
                torch.view_as_complex(r) if t.is_complex() else r
                for r, t in zip(values, held, strict=True)
            ]
        return [
            torch.view_as_complex(o) if p.is_complex() else o
            for o, p in zip(outs, params, strict=True)
        ]


ConsumingStep = Callable[
    [LearningRate, list[Any], list[torch.Tensor], bool, Sequence[bool] | None], tuple[Any, Any]
]


def consuming_step(optimizer: object) -> ConsumingStep | None:
    """The ``_diffprog_step(lr, grads, params, consume, used)`` of ``optimizer``, which may free the
    gradients it is handed (a pure optimizer's, ``ClipGradNorm``'s); else None.

    None too where a subclass overrides ``step`` without its own ``_diffprog_step``: the step
    it wrote must run.

    Example:
        >>> from diffprog.optim import GD
        >>> consuming_step(GD()) is not None, consuming_step(object())
        (True, None)
    """
    cls = type(optimizer)
    consumes = _CONSUMES.get(cls)
    if consumes is None:
        consumes = _CONSUMES[cls] = _consumes(cls)
    return optimizer._diffprog_step if consumes else None  # type: ignore[attr-defined]


# Whether a class's step is its _diffprog_step, per class: looked up on every training step.
_CONSUMES: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _consumes(cls: type) -> bool:
    for base in cls.__mro__:
        if "_diffprog_step" in vars(base):
            return getattr(cls, "step", None) is vars(base).get("step")
    return False


DIFFERENTIABLE = (
    "GD",
    "GDM",
    "SGD",
    "Adam",
    "AdamW",
    "RMSprop",
    "Adagrad",
    "Adamax",
    "Adadelta",
    "NAdam",
    "RAdam",
    "Rprop",
    "ASGD",
    "Lion",
    "Adafactor",
)
"""The pure optimizers with a differentiable step (``differentiable=True``): all of diffprog's."""


def sqrt_of_moment(v: torch.Tensor) -> torch.Tensor:
    """``v.sqrt()`` for a differentiable step, its gradient 0 where ``v`` is 0 (not NaN).

    Why: a second moment is 0 only where every gradient so far was 0, and then so is the
    numerator it divides (the first moment, the gradient), so the update's true derivative
    through the square root is 0; autograd's ``sqrt`` gives ``inf * 0 = nan`` there (as
    torch.optim's ``differentiable=True`` does), for an entry the loss never moves.

    Example:
        >>> v = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> sqrt_of_moment(v).sum().backward()
        >>> v.grad
        tensor([0.0000, 0.2500])
    """
    zero = v == 0  # (a negative v, from rounding, gives NaN as sqrt does)
    return torch.where(zero, 0.0, torch.where(zero, 1.0, v).sqrt())


def _requires_grad(value: Any) -> bool:
    """Whether ``value`` (a hyper-parameter) is, or holds, a tensor that requires grad."""
    if isinstance(value, tuple):
        return any(map(_requires_grad, value))
    return isinstance(value, torch.Tensor) and value.requires_grad


PIECE_BYTES = 64 * 2**20
"""Above this many parameter bytes, ``run_step`` steps a pure optimizer piece by piece (see
``PureOptimizer._diffprog_step``)."""


def pieces_of(params: list[torch.Tensor]) -> list[int] | None:
    """The piece of each parameter for a step piece by piece (None: one piece, the usual case).

    Pieces hold :data:`PIECE_BYTES` of parameters at most (a larger tensor alone), in order.
    Worked out on each step: one ``numel`` per parameter.

    Example:
        >>> pieces_of([torch.zeros(2)]) is None
        True
    """
    if sum(map(torch.Tensor.numel, params)) * 16 <= PIECE_BYTES:  # 16: the widest element
        return None  # the usual case, told with one numel() per parameter
    sizes = [p.numel() * p.element_size() for p in params]
    if sum(sizes) <= PIECE_BYTES:
        return None
    pieces: list[int] = []
    piece = filled = 0
    for size in sizes:
        if filled and filled + size > PIECE_BYTES:
            piece, filled = piece + 1, 0
        pieces.append(piece)
        filled += size
    return pieces


def _split(indices: tuple[int, ...], pieces: list[int] | None) -> list[tuple[int, ...]]:
    """``indices`` cut where the piece changes (``pieces``: the piece of each parameter)."""
    if pieces is None or not indices:
        return [indices]
    out: list[tuple[int, ...]] = []
    start = 0
    for k in range(1, len(indices)):
        if pieces[indices[k]] != pieces[indices[k - 1]]:
            out.append(indices[start:k])
            start = k
    out.append(indices[start:])
    return out


_is_sparse = operator.attrgetter("is_sparse")
_same_size: Callable[[Any, Any], bool] = torch.Tensor.is_same_size
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")


def _batches(
    indices: tuple[int, ...],
    pieces: list[int] | None,
    mask: list[bool] | None,
    counts: tuple[int, ...] | None,
    count: int,
) -> list[tuple[tuple[int, ...], int]]:
    """The parameters of one group to update together, each batch with its step count.

    Unused parameters (``mask``) are left out; the rest is cut where the piece changes, and
    where per-parameter ``counts`` differ, into one batch per count (the kernels take one).
    """
    if mask is None and pieces is None and not counts:  # the usual case: one batch
        return [(indices, count)] if indices else []
    if mask is not None:
        indices = tuple(i for i in indices if mask[i])
    batches: list[tuple[tuple[int, ...], int]] = []
    for idx in _split(indices, pieces):
        if not idx:
            continue
        if not counts:
            batches.append((idx, count))
            continue
        by_count: dict[int, list[int]] = {}
        for i in idx:
            by_count.setdefault(counts[i], []).append(i)
        batches.extend((tuple(same), c) for c, same in by_count.items())
    return batches


def _counts_after(
    counts: tuple[int, ...], count: int, settings: ParamSettings, mask: list[bool] | None
) -> tuple[int, ...]:
    """The per-parameter step counts after a step that updated the trained parameters
    ``mask`` selects (``counts`` empty: each trained one had taken ``count`` steps)."""
    after = list(counts) if counts else [count if t else 0 for t in settings.trainable]
    for group in settings.groups:
        for i in group.indices:
            if mask is None or mask[i]:
                after[i] += 1
    return tuple(after)


def clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh copies of ``tensors`` (strides kept), in one multi-tensor call."""
    return list(torch._foreach_clone(tensors)) if tensors else []


def device_groups(
    params: list[torch.Tensor], *lists: list[torch.Tensor]
) -> list[tuple[torch.device, list[list[torch.Tensor]]]]:
    """Split ``params`` and the aligned ``lists`` by device and dtype, for the fused kernels.

    Returns ``[(device, [params, *lists])]`` slices; one slice (the lists themselves) when every
    parameter has the same device and dtype, the usual case.
    """
    if not params:
        return []
    first = params[0]
    device, dtype = first.device, first.dtype
    if all(p.device == device and p.dtype == dtype for p in params):
        return [(device, [params, *lists])]
    keys: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        keys.setdefault((p.device, p.dtype), []).append(i)
    return [
        (dev, [[seq[i] for i in idx] for seq in (params, *lists)]) for (dev, _), idx in keys.items()
    ]


def lr_on(lr: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
    """``lr`` as a fused kernel takes it: a float, or a tensor on ``device``."""
    if isinstance(lr, torch.Tensor) and lr.device != device:
        return lr.to(device)
    return lr


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one shape) lay their elements out in the same order.

    Example:
        >>> x = torch.zeros(2, 3)
        >>> same_layout(x, torch.ones(2, 3)), same_layout(x, torch.ones(3, 2).t())
        (True, False)
    """
    return (a.is_contiguous() and b.is_contiguous()) or a.stride() == b.stride()


def in_layout_of(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values laid out as ``like`` is: ``tensor`` itself when it already is (or is
    sparse), else a copy.

    torch's fused optimizer kernels walk a parameter, its gradient and its state as flat
    memory, so they read an expanded (stride 0), transposed or sliced gradient wrongly; the
    gradients of ``torch.autograd.grad`` are often such views (of a sum, an einsum, a ``.T``).

    Example:
        >>> g = torch.ones(()).expand(3)
        >>> in_layout_of(g, torch.zeros(3)).stride(), in_layout_of(torch.ones(3), g) is not None
        ((1,), True)
    """
    if tensor.layout is not torch.strided or same_layout(tensor, like):
        return tensor
    return torch.empty_like(like).copy_(tensor)


def fused_layouts(
    params: list[torch.Tensor], grads: list[torch.Tensor], *states: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``grads`` in the layouts of ``params`` (copied only where they differ), for a fused
    kernel; each state list's entries too, replaced in the list where they differ.

    ``params`` are the fresh copies the kernel writes (dense, in the old parameters' layout);
    the state normally has that layout already (it was created like the parameters).
    """
    if all(map(torch.Tensor.is_contiguous, itertools.chain(params, grads, *states))):
        return grads  # the usual case: one is_contiguous() per tensor, nothing to copy
    out = list(grads)
    for i, p in enumerate(params):
        out[i] = in_layout_of(grads[i], p)
        for state in states:
            state[i] = in_layout_of(state[i], p)
    return out


USE_FUSED = True
"""Use torch's fused kernels where the device has them (tests turn this off to check the
``_foreach_`` fallbacks)."""

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS", "xpu": "XPU", "hpu": "HPU"}
_FUSED_CACHE: dict[tuple[str, str], bool] = {}


def has_fused(op: str, device: torch.device) -> bool:
    """Whether ``torch.ops.aten.<op>`` has a kernel for ``device``'s type (cached).

    Example:
        >>> has_fused("_fused_adam_", torch.device("cpu"))
        True
    """
    if not USE_FUSED:
        return False
    if torch.compiler.is_compiling():
        # Traced (diffprog.func.compile_step): torch.compile cannot functionalize the fused
        # kernels (they mutate their inputs and have no fake kernels for a tensor lr), while
        # it fuses the _foreach_ fallbacks into loops of its own, as for torch.optim's
        # compiled step.
        return False
    key = (op, device.type)
    found = _FUSED_CACHE.get(key)
    if found is None:
        dispatch = _DISPATCH_KEYS.get(device.type)
        found = dispatch is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"aten::{op}", dispatch
        )
        _FUSED_CACHE[key] = found
    return found


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives its scalar state (``step``, ``mu_product``): float64 under
    a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
