"""``compile_step``: a whole training step under ``torch.compile``.

The compiled region is a pure function of tensors: the model (its parameters are the graph's
inputs: it is flattened inside), the optimizer's state, the learning rate and the batch go
in; the gradients (``torch.func.grad_and_value`` over ``replace_parameters``), the optimizer's
update and the non-finite check run inside; new parameters, new state, the loss and the
check's flags come out. The checks, the optimizer's bookkeeping (count, lease) and the
rebuild run outside, in Python: they hold no tensor math.
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from diffprog import (
    DiffprogError,
    flatten_parameters,
    make_independent,
    named_parameters,
    replace_parameters,
)
from diffprog.optim import (
    LearningRate,
    NonFiniteError,
    OnNonFinite,
    ParamGroup,
    ParamSettings,
    PureOptimizer,
)
from diffprog.optim import learning_rate_at as _learning_rate_at

__all__ = ["CompiledStep", "compile_step"]

M = TypeVar("M")
OptT = TypeVar("OptT", bound=PureOptimizer)
Core = Callable[
    ..., tuple[list[torch.Tensor], dict[str, list[torch.Tensor]], torch.Tensor, Any, Any]
]


def compile_step(
    loss_fn: Callable[..., torch.Tensor],
    lr: LearningRate,
    *,
    on_nonfinite: OnNonFinite = "raise",
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    fullgraph: bool = True,
    dynamic: bool | None = None,
) -> CompiledStep:
    """A training step ``step(model, optimizer, *args) -> (model, optimizer, loss)``, compiled.

    ``loss_fn(model, *args, **kwargs)`` returns a scalar loss. Each call of the step does what
    ``run_step(model, optimizer, loss_fn(model, *args), lr)`` does, with a pure optimizer,
    in one compiled graph (``fullgraph=True``: no graph break): the forward, the loss, the
    gradients, the optimizer's update and the non-finite check. One difference: a parameter
    the loss does not reach is stepped on a zero gradient (weight decay and momentum move it),
    where ``run_step`` leaves it alone. ``model`` and ``optimizer``
    are values and change every step, so they are arguments of the step, not of
    ``compile_step``; a new model of the same structure and shapes reuses the compiled code.

    With an optimizer built with ``donate=True`` its state is updated in place (the compiled
    graph writes into the state tensors it was given) and handed to the returned optimizer;
    the parameters are always new tensors.

    Args:
        loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar tensor``; traced by
            ``torch.compile``, so it must be traceable (no ``.item()``, no printing).
        lr: the learning rate: a float, a 0-dim tensor, or a schedule of the step count
            (evaluated outside the graph and passed in as a tensor: no recompile per value).
        on_nonfinite: as ``run_step``'s. ``"raise"`` and ``"skip"`` read one flag after the
            call (one device sync); ``"ignore"`` computes no check.
        backend, mode, dynamic: passed to ``torch.compile`` (``backend="eager"`` traces
            without generating code: quick to compile, for tests and docs).
        fullgraph: passed to ``torch.compile``; True makes any graph break an error.

    Returns:
        A :class:`CompiledStep`.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> from diffprog.optim import Adam
        >>> model = sample(LinearSpec(3, 1), generator=torch.Generator().manual_seed(0))
        >>> step = compile_step(lambda m, x, y: (m(x) - y).pow(2).mean(), 0.1, backend="eager")
        >>> x, y = torch.ones(4, 3), torch.zeros(4, 1)
        >>> opt = Adam.init(model)
        >>> for _ in range(3):
        ...     model, opt, loss = step(model, opt, x, y)
        >>> opt.count, loss.shape
        (3, torch.Size([]))
    """
    if on_nonfinite not in ("raise", "skip", "ignore"):
        raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'ignore', got {on_nonfinite!r}.")
    options: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
    if mode is not None:
        options["mode"] = mode
    return CompiledStep(loss_fn, lr, on_nonfinite, options)


class CompiledStep:
    """A compiled training step: see :func:`compile_step`.

    Attributes:
        loss_fn: the loss function.
        lr: the learning rate or schedule.
        on_nonfinite: what a non-finite loss or gradient does.
    """

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        lr: LearningRate,
        on_nonfinite: OnNonFinite,
        options: Mapping[str, Any],
    ) -> None:
        self.loss_fn = loss_fn
        self.lr = lr
        self.on_nonfinite = on_nonfinite
        _mark_count_dynamic()
        core = _make_core(loss_fn, check=on_nonfinite != "ignore")
        # One compiled function; dynamo keys its cache on the model's structure, the
        # optimizer's type and settings, donation, and the shapes of the tensors.
        self._compiled: Core = torch.compile(core, **options)
        self._last_lr: tuple[float, torch.device, torch.Tensor] | None = None

    def __call__(
        self, model: M, optimizer: OptT, *args: Any, **kwargs: Any
    ) -> tuple[M, OptT, torch.Tensor]:
        """One step: ``(new_model, new_optimizer, loss)`` (the loss of ``model``, detached).

        Raises:
            NonFiniteError: the loss or a gradient is NaN or infinite (``"raise"``); the model
                and optimizer passed in are unchanged (a donated state is left as it was).
            DiffprogError: ``optimizer`` is not a pure optimizer, trains a subset of the
                parameters, has per-parameter settings or counts (use ``run_step``), was
                donated already, or does not fit the model; the model is sharded.
        """
        params = flatten_parameters(model)
        _refuse_sharded(model, params)
        _check_optimizer(optimizer, len(params))
        state = _held_state(optimizer, params)
        lr = self._lr_input(_learning_rate_at(self.lr, optimizer.count), params[0])
        # Under no_grad: the model's Parameters, the graph's inputs, require grad, and with
        # grad mode on AOTAutograd would compile a training graph (forward and backward) for
        # the compiled call itself. The gradients inside come from torch.func.grad_and_value,
        # which turns grad mode on for the loss whatever the mode outside.
        with torch.no_grad():
            new_params, new_state, loss, ok, flags = self._compiled(
                model, optimizer, state, lr, optimizer.count, args, kwargs
            )
        if ok is not None and not bool(ok):  # one flag read: the per-tensor ones on failure
            if self.on_nonfinite == "skip":
                return model, optimizer, loss
            raise _nonfinite_error(model, loss, flags)
        if optimizer.lease is not None:
            optimizer.lease.spent = True
        settings = optimizer.settings or _plain_settings(len(params))
        held: dict[str, list[torch.Tensor | None]] = {k: list(v) for k, v in new_state.items()}
        new_optimizer = optimizer._advanced(settings, None, held)
        new_model = replace_parameters(model, [make_independent(p) for p in new_params])
        return new_model, new_optimizer, loss

    def _lr_input(self, lr: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The learning rate as a 0-dim float64 tensor on ``like``'s device: an input of the
        graph, so that a new value (a schedule's) does not recompile.

        A float is made a tensor once and reused while the value and device stay the same
        (``_last_lr``, the one cache of this object besides dynamo's): building a tensor
        costs more than the rest of the step's bookkeeping. The graph only reads it.
        """
        if isinstance(lr, torch.Tensor):
            return lr.detach().to(like.device)
        last = self._last_lr
        # The same float, its sign included (-0.0 == 0.0, but not in the update's last bit).
        if (
            last is not None
            and last[0] == lr
            and math.copysign(1.0, last[0]) == math.copysign(1.0, lr)
            and last[1] == like.device
        ):
            return last[2]
        tensor = torch.tensor(lr, dtype=torch.float64, device=like.device)
        self._last_lr = (lr, like.device, tensor)
        return tensor


def _plain_settings(n: int) -> ParamSettings:
    """Every one of ``n`` parameters trained alike (an optimizer built without ``init``)."""
    return ParamSettings(n, (ParamGroup(tuple(range(n))),))


_DYNAMIC_SOURCES = ("L['diffprog_step_count']",)


def _mark_count_dynamic() -> None:
    """Have dynamo trace the step count as a symbol from the first call.

    Why: dynamo specializes an int argument on its first value and makes it symbolic only
    when a second value recompiles; the count changes every step, so without this the
    second step would recompile once. The source name is this module's own argument name,
    so no other compiled code is affected.
    """
    config = torch.compiler.config
    sources = [s for s in config.dynamic_sources.split(",") if s]
    missing = [s for s in _DYNAMIC_SOURCES if s not in sources]
    if missing:
        config.dynamic_sources = ",".join([*sources, *missing])


def _make_core(loss_fn: Callable[..., torch.Tensor], check: bool) -> Core:
    """The pure function of tensors that is compiled (see the module docstring)."""

    def core(
        model: Any,
        optimizer: PureOptimizer,
        state: dict[str, list[torch.Tensor]],
        lr: torch.Tensor,
        diffprog_step_count: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]], torch.Tensor, Any, Any]:
        # The model's own Parameters are the inputs (not detached copies passed beside the
        # model: dynamo would see each tensor twice, as an input and inside the model, and
        # guard and copy both).
        params: list[torch.Tensor] = list(flatten_parameters(model))

        def loss_of(ps: list[torch.Tensor]) -> torch.Tensor:
            return loss_fn(replace_parameters(model, ps), *args, **kwargs)

        # torch.func.grad rather than torch.autograd.grad: it traces without
        # trace_autograd_ops and needs no requires_grad_ on the inputs.
        grads, loss = torch.func.grad_and_value(loss_of)(params)
        flags = ok = None
        if check:
            # The check as tensor ops (one flag for the loss, one per gradient, and their
            # conjunction), read after the call: a Python `if` on a tensor's value would break
            # the graph. The caller reads `ok` only; `flags` names the culprits on failure.
            flags = torch.stack(
                [torch.isfinite(loss).all()] + [torch.isfinite(g).all() for g in grads]
            )
            ok = flags.all()
        work = {name: [t.clone() for t in held] for name, held in state.items()}
        with torch.no_grad():
            new_params = optimizer._run(
                optimizer._defaults(), lr, diffprog_step_count, params, grads, work
            )
            if optimizer.donate:
                # Donated: the new state is written into the tensors passed in (an input
                # mutation, which the compiled code does in place); where the check fails
                # the old values are written back, so a refused step changes nothing.
                for name, held in state.items():
                    for old, new in zip(held, work[name], strict=True):
                        old.copy_(new if ok is None else torch.where(ok, new, old))
                work = state
        return new_params, work, loss.detach(), ok, flags

    # A code object of its own for each compiled step: dynamo keeps its cache (and counts
    # recompiles against its limit) per code object, and every step compiles this one.
    code = core.__code__.replace()
    return types.FunctionType(code, core.__globals__, core.__name__, None, core.__closure__)


def _refuse_sharded(model: Any, params: Sequence[torch.Tensor]) -> None:
    """Refuse a sharded model (DTensor parameters): the compiled step is not built for them."""
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before
    if module is None:
        return
    # The paths only for the error: naming every parameter each step cost 0.1x of a small step.
    sharded = next((i for i, p in enumerate(params) if isinstance(p, module.DTensor)), None)
    if sharded is not None:
        path = named_parameters(model)[sharded][0]
        raise DiffprogError(
            f"compile_step does not step sharded (DTensor) parameters ({path} is one): "
            "train a sharded model with diffprog.optim.run_step(model, optimizer, "
            "loss_of(diffprog.distributed.gathered(model)), lr)."
        )


def _check_optimizer(optimizer: Any, num_params: int) -> None:
    """Refuse an optimizer the compiled step does not take (see ``CompiledStep.__call__``)."""
    if not isinstance(optimizer, PureOptimizer):
        raise DiffprogError(
            f"compile_step takes a pure optimizer (GD, Adam, ...), got "
            f"{type(optimizer).__name__}. Use run_step for TorchOptimizer and chains."
        )
    owner = type(optimizer).__name__
    if num_params == 0:
        raise DiffprogError(
            f"the model has no Parameters, so {owner} has nothing to train: sample(...) its specs."
        )
    settings = optimizer.settings
    if settings is not None and (settings.num_params != num_params or not settings.is_plain):
        raise DiffprogError(
            f"compile_step takes an optimizer that trains every parameter alike; this {owner} "
            f"has {settings.num_params} parameters with per-parameter settings or frozen ones "
            f"(the model has {num_params}). Use run_step, or {owner}.init(model) without "
            "overrides and freeze."
        )
    if optimizer.param_counts:
        raise DiffprogError(
            f"this {owner} has per-parameter step counts (some step left a parameter unused), "
            "which compile_step does not take: use run_step."
        )
    if optimizer.lease is not None and optimizer.lease.spent:
        raise DiffprogError(
            f"this {owner} was created with donate=True and has already stepped, so its state "
            "now belongs to the optimizer that step returned. Step that one instead."
        )
    if optimizer.donate and optimizer.lease is None:
        raise DiffprogError(
            f"this {owner} has donate=True but no lease. Build it with "
            f"{owner}.init(model, donate=True)."
        )


def _held_state(
    optimizer: PureOptimizer, params: Sequence[torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    """The optimizer's state, kind by kind (zero state where it holds none yet).

    The optimizer's own check refuses state built for other parameters (the one ``run_step``
    makes): it knows which kinds are shaped as the parameters and which are scalars or
    factored moments (NAdam's ``mu_product``, ASGD's ``eta``, Adafactor's ``row_var``).
    """
    hyper = optimizer._defaults()
    names = type(optimizer)._state_names(hyper)
    held = {name: getattr(optimizer, name) for name in names}
    optimizer._check_state_fits(held, list(params))
    state: dict[str, list[torch.Tensor]] = {}
    for name in names:
        if held[name]:
            state[name] = list(held[name])
        else:
            with torch.no_grad():
                state[name] = [type(optimizer)._init_state(name, p, hyper) for p in params]
    return state


def _nonfinite_error(model: Any, loss: torch.Tensor, flags: torch.Tensor) -> NonFiniteError:
    names = [name for name, _ in named_parameters(model)]
    bad = [names[i] for i, ok in enumerate(flags[1:].tolist()) if not ok]
    return NonFiniteError(float(loss), bad)
