"""Issue 8 (optimizer numerics): every pure optimizer against torch.optim itself, on every path,
for gradients in any memory layout (items 1), for parameters the loss does not reach (item 2),
and the checks of the learning rate (item 13) and of the gradients handed to ``step`` (1, 14).

The grids run each optimizer on a model of differently laid out parameters (contiguous,
transposed, channels-last, sliced) for a few steps, through each path a step can take:
``step`` called directly (fused kernels, or the ``_foreach_`` fallbacks), ``run_step`` (one
piece, or piece by piece for large models), with donated state, and with per-parameter
overrides and a frozen parameter; the reference is the torch.optim optimizer with the same
hyper-parameters, the same gradients assigned to ``.grad`` (``None`` where unused).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

import diffprog.optim._pure
from diffprog import DiffprogError, make_independent
from diffprog.optim import (
    ASGD,
    GD,
    GDM,
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    ClipGradNorm,
    Lion,
    NAdam,
    RAdam,
    RMSprop,
    Rprop,
    TorchOptimizer,
    run_step,
    step,
)

LR = 0.05
STEPS = 5


class _ReferenceLion(torch.optim.Optimizer):
    """Lion as published (Chen et al. 2023), one tensor at a time, in torch.optim's manner
    (a parameter whose ``.grad`` is None is skipped): the reference for diffprog's ``Lion``,
    which torch.optim does not have."""

    def __init__(self, params: Iterable[Any], lr: float, betas: Any, weight_decay: float):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = torch.lerp(m, p.grad, 1 - beta1).sign_()
                p.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
                m.lerp_(p.grad, 1 - beta2)


# (id, our optimizer from (model, extra init options), torch.optim class, options)
OPTIMIZERS: list[tuple[str, Callable[..., Any], Callable[..., torch.optim.Optimizer], dict]] = [
    ("GD", lambda m, **kw: GD.init(m, **kw), torch.optim.SGD, {}),
    (
        "GDM-dampening",
        lambda m, **kw: GDM.init(m, momentum=0.9, dampening=0.2, weight_decay=0.01, **kw),
        torch.optim.SGD,
        {"momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01},
    ),
    (
        "GDM-nesterov",
        lambda m, **kw: GDM.init(m, momentum=0.8, nesterov=True, **kw),
        torch.optim.SGD,
        {"momentum": 0.8, "nesterov": True},
    ),
    ("Adam", lambda m, **kw: Adam.init(m, **kw), torch.optim.Adam, {}),
    (
        "Adam-amsgrad-wd",
        lambda m, **kw: Adam.init(m, amsgrad=True, weight_decay=0.01, maximize=True, **kw),
        torch.optim.Adam,
        {"amsgrad": True, "weight_decay": 0.01, "maximize": True},
    ),
    (
        "AdamW",
        lambda m, **kw: AdamW.init(m, weight_decay=0.1, **kw),
        torch.optim.AdamW,
        {"weight_decay": 0.1},
    ),
    (
        "Adagrad",
        lambda m, **kw: Adagrad.init(
            m, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1, **kw
        ),
        torch.optim.Adagrad,
        {"lr_decay": 0.05, "weight_decay": 0.01, "initial_accumulator_value": 0.1},
    ),
    (
        "RMSprop",
        lambda m, **kw: RMSprop.init(m, centered=True, momentum=0.5, weight_decay=0.01, **kw),
        torch.optim.RMSprop,
        {"centered": True, "momentum": 0.5, "weight_decay": 0.01},
    ),
    (
        "Lion",
        lambda m, **kw: Lion.init(m, weight_decay=0.1, **kw),
        _ReferenceLion,
        {"betas": (0.9, 0.99), "weight_decay": 0.1},
    ),
    (
        "SGD",
        lambda m, **kw: SGD.init(m, momentum=0.9, nesterov=True, weight_decay=0.01, **kw),
        torch.optim.SGD,
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    (
        "NAdam",
        lambda m, **kw: NAdam.init(m, weight_decay=0.01, momentum_decay=0.01, **kw),
        torch.optim.NAdam,
        {"weight_decay": 0.01, "momentum_decay": 0.01},
    ),
    (
        "NAdam-decoupled",
        lambda m, **kw: NAdam.init(m, weight_decay=0.1, decoupled_weight_decay=True, **kw),
        torch.optim.NAdam,
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
    ),
    (
        "RAdam",
        lambda m, **kw: RAdam.init(m, betas=(0.9, 0.9), weight_decay=0.01, maximize=True, **kw),
        torch.optim.RAdam,
        {"betas": (0.9, 0.9), "weight_decay": 0.01, "maximize": True},
    ),
    (
        "Adamax",
        lambda m, **kw: Adamax.init(m, weight_decay=0.01, **kw),
        torch.optim.Adamax,
        {"weight_decay": 0.01},
    ),
    (
        "Adadelta",
        lambda m, **kw: Adadelta.init(m, rho=0.8, weight_decay=0.01, **kw),
        torch.optim.Adadelta,
        {"rho": 0.8, "weight_decay": 0.01},
    ),
    (
        "Rprop",
        lambda m, **kw: Rprop.init(m, etas=(0.4, 1.3), step_sizes=(1e-3, 0.2), **kw),
        torch.optim.Rprop,
        {"etas": (0.4, 1.3), "step_sizes": (1e-3, 0.2)},
    ),
    (
        "ASGD",
        lambda m, **kw: ASGD.init(m, lambd=0.01, t0=2.0, weight_decay=0.01, **kw),
        torch.optim.ASGD,
        {"lambd": 0.01, "t0": 2.0, "weight_decay": 0.01},
    ),
    (
        "Adafactor",
        lambda m, **kw: Adafactor.init(m, weight_decay=0.01, d=1.5, **kw),
        torch.optim.Adafactor,
        {"weight_decay": 0.01, "d": 1.5},
    ),
    (
        "Clip-Adam",
        lambda m, **kw: ClipGradNorm(Adam.init(m, **kw), max_norm=0.5),
        torch.optim.Adam,
        {},
    ),
    (
        "Clip-GDM",
        lambda m, **kw: ClipGradNorm(GDM.init(m, momentum=0.9, dampening=0.2, **kw), 0.5),
        torch.optim.SGD,
        {"momentum": 0.9, "dampening": 0.2},
    ),
    (
        "Clip-Adagrad",
        lambda m, **kw: ClipGradNorm(Adagrad.init(m, lr_decay=0.05, **kw), max_norm=0.5),
        torch.optim.Adagrad,
        {"lr_decay": 0.05},
    ),
]
OPTIMIZER_IDS = [o[0] for o in OPTIMIZERS]


def _parameters(dense: bool = False) -> list[torch.Tensor]:
    """Parameters in every layout a model can hold: contiguous, transposed (dense, not
    contiguous), channels-last, sliced (not dense; with ``dense``, rows of a larger tensor),
    a vector and a scalar."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(4, 6, generator=gen),
        torch.randn(4, 6, generator=gen).t(),
        torch.randn(2, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last),
        torch.randn(5, 3, generator=gen)[1:] if dense else torch.randn(4, 6, generator=gen)[:, ::2],
        torch.randn(5, generator=gen),
        torch.randn((), generator=gen),
    ]


def _laid_out(layout: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random gradient of ``shape`` in the memory layout ``layout``."""
    n = len(shape)
    if layout == "contiguous" or n == 0:
        return torch.randn(shape, generator=gen)
    if layout == "expanded":  # stride 0 along the first dimension, as the gradient of a sum
        return torch.randn(shape[1:], generator=gen).expand(shape)
    if layout == "transposed":  # every dimension reversed, as the gradient of W.T
        return torch.randn(shape[::-1], generator=gen).permute(*reversed(range(n)))
    if layout == "sliced":  # every other element of the last dimension
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]
    if layout == "channels_last":  # the first dimension innermost (channels-last for 4-d)
        if n == 4:
            return torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
        return torch.randn(*shape[1:], shape[0], generator=gen).movedim(-1, 0)
    if layout == "offset":  # contiguous, but not at the start of its storage
        numel = int(torch.Size(shape).numel())
        return torch.randn(numel + 3, generator=gen)[3:].view(shape)
    raise AssertionError(layout)


LAYOUTS = ["contiguous", "expanded", "transposed", "sliced", "channels_last", "offset"]

# For each step, whether the loss reaches each parameter: parameter 2 is first used at the
# third step (GDM's buffer starts at its gradient then, Adam's bias correction starts at 1).
USED = [
    [True, True, False, True, False, True],
    [False, True, False, True, True, True],
    [True, False, True, True, True, False],
    [True, True, True, False, True, True],
    [False, True, True, True, False, True],
]


def _gradients(layout: str, unused: bool) -> list[list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(1)
    shapes = [tuple(p.shape) for p in _parameters()]
    steps: list[list[torch.Tensor | None]] = []
    for s in range(STEPS):
        grads = [_laid_out(layout, shape, gen) for shape in shapes]
        steps.append([g if not unused or USED[s][i] else None for i, g in enumerate(grads)])
    return steps


class _Inject(torch.autograd.Function):
    """A zero loss term whose gradient with respect to ``p`` is ``g`` itself (its layout
    kept), so that ``run_step`` meets exactly the gradients the test chose."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.g = g
        return p.new_zeros(())

    @staticmethod
    def backward(ctx: Any, out: torch.Tensor) -> Any:  # type: ignore[override]
        return ctx.g, None


PATHS = ["step", "foreach", "run_step", "pieces", "donate", "groups"]
FROZEN = 4  # the parameter frozen on the "groups" path
SCALED = 0  # the parameter whose learning rate is halved on the "groups" path


def _our_run(
    make: Callable[..., Any],
    path: str,
    steps: list[list[torch.Tensor | None]],
    monkeypatch: pytest.MonkeyPatch,
    dense: bool = False,
) -> list[torch.Tensor]:
    monkeypatch.setattr(diffprog.optim._pure, "USE_FUSED", path != "foreach")
    if path in ("pieces", "donate"):
        monkeypatch.setattr(diffprog.optim._pure, "PIECE_BYTES", 100)  # a piece or two each
    params = [make_independent(p) for p in _parameters(dense)]  # layouts kept (shared storage)
    extra: dict[str, Any] = {}
    if path == "donate":
        extra["donate"] = True
    if path == "groups":
        extra = {"overrides": {str(SCALED): {"lr_scale": 0.5}}, "freeze": str(FROZEN)}
    try:
        opt = make(params, **extra)
    except TypeError:  # GD has no state to donate
        opt = make(params)
    for grads in steps:
        used = [g is not None for g in grads]
        if path in ("step", "foreach"):
            if all(used):
                new, opt = opt.step(LR, grads, params)
            else:
                new, opt = opt.step(LR, grads, params, used=used)
            params = [make_independent(p) for p in new]
            continue
        loss = sum(
            (_Inject.apply(p, g) for p, g in zip(params, grads, strict=True) if g is not None),
            torch.zeros(()),
        )
        params, opt = run_step(params, opt, loss, LR)
    return [p.detach() for p in params]


def _torch_run(
    cls: Callable[..., torch.optim.Optimizer],
    options: dict[str, Any],
    path: str,
    steps: list[list[torch.Tensor | None]],
    clip: bool,
    dense: bool = False,
) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(p.clone()) for p in _parameters(dense)]
    trained = params
    groups: list[dict[str, Any]] = [{"params": params}]
    if path == "groups":
        trained = [p for i, p in enumerate(params) if i != FROZEN]
        groups = [
            {"params": [params[SCALED]], "lr": LR * 0.5},
            {"params": [p for i, p in enumerate(params) if i not in (SCALED, FROZEN)]},
        ]
    opt = cls(groups, lr=LR, **options)
    for grads in steps:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        if clip:
            torch.nn.utils.clip_grad_norm_(trained, max_norm=0.5)
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "ours", "theirs", "options"), OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_every_optimizer_matches_torch_for_gradients_in_any_layout(
    name: str,
    ours: Callable[..., Any],
    theirs: Callable[..., torch.optim.Optimizer],
    options: dict[str, Any],
    layout: str,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = _gradients(layout, unused=False)
    expected = _torch_run(theirs, options, path, steps, clip=name.startswith("Clip"))
    got = _our_run(ours, path, steps, monkeypatch)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("name", "ours", "theirs", "options"), OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_a_parameter_the_loss_does_not_reach_is_left_alone_as_torch_does(
    name: str,
    ours: Callable[..., Any],
    theirs: Callable[..., torch.optim.Optimizer],
    options: dict[str, Any],
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = _gradients("transposed", unused=True)
    expected = _torch_run(theirs, options, path, steps, clip=name.startswith("Clip"))
    got = _our_run(ours, path, steps, monkeypatch)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("path", ["step", "run_step", "groups"])
@pytest.mark.parametrize("unused", [False, True])
def test_torch_optimizer_matches_torch_for_any_layout_and_unused_parameters(
    fused: bool, path: str, unused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(model: Any, **extra: Any) -> TorchOptimizer:
        if "overrides" in extra:
            extra["overrides"] = {str(SCALED): {"lr_scale": 0.5}}
        return TorchOptimizer.init(model, torch.optim.Adam, lr=LR, fused=fused, **extra)

    # torch's fused kernels cannot update a sliced parameter (see the next test)
    steps = _gradients("sliced" if unused else "expanded", unused=unused)
    expected = _torch_run(torch.optim.Adam, {}, path, steps, clip=False, dense=fused)
    got = _our_run(make, path, steps, monkeypatch, dense=fused)
    torch.testing.assert_close(got, expected)


def test_torch_optimizer_refuses_a_sliced_parameter_for_a_fused_kernel() -> None:
    # torch.optim.Adam(fused=True) itself updates the gaps of a strided slice: refuse it.
    sliced = torch.nn.Parameter(torch.zeros(4, 6)[:, ::2])
    with pytest.raises(DiffprogError, match=r"parameter 1 .* is not dense"):
        TorchOptimizer.init(
            [make_independent(torch.zeros(2)), sliced], torch.optim.Adam, fused=True
        )
    TorchOptimizer.init([sliced], torch.optim.Adam, fused=False)
    TorchOptimizer.init([torch.nn.Parameter(torch.zeros(4, 6).t())], torch.optim.Adam, fused=True)


def test_the_expanded_gradient_of_a_sum_moves_every_element_alike() -> None:
    # The repro: Adam read the stride-0 gradient of 0.5 * w.sum() as six elements.
    w = make_independent(torch.zeros(6))
    for cls in (
        GD,
        GDM,
        Adam,
        AdamW,
        Adagrad,
        RMSprop,
        Lion,
        SGD,
        NAdam,
        RAdam,
        Adamax,
        Adadelta,
        Rprop,
        ASGD,
        Adafactor,
    ):
        (new,), _ = run_step([w], cls.init([w]), 0.5 * w.sum(), 0.1)
        assert torch.equal(new, torch.full((6,), new[0].item())), cls.__name__


@pytest.mark.parametrize("kernels", ["fused", "foreach"])
@pytest.mark.parametrize(
    "name",
    [
        "Adam",
        "AdamW",
        "GDM",
        "Adagrad",
        "RMSprop",
        "SGD",
        "NAdam",
        "RAdam",
        "Adamax",
        "Adadelta",
        "Rprop",
        "ASGD",
    ],
)
def test_parameters_given_in_another_layout_than_at_init_still_match_torch(
    name: str, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The state is made in the layout of the parameters init saw; a later step may get the
    # same values laid out otherwise (transposed), and complex ones: the fused kernels must
    # not pair elements of one layout with the other's.
    monkeypatch.setattr(diffprog.optim._pure, "USE_FUSED", kernels == "fused")
    _, ours, theirs, options = next(o for o in OPTIMIZERS if o[0].startswith(name))
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(4, 6, generator=gen), torch.randn(3, 5, dtype=torch.cfloat, generator=gen)]
    reference = [torch.nn.Parameter(p.clone()) for p in start]
    topt = theirs(reference, lr=LR, **options)
    opt = ours([make_independent(p) for p in start])
    params = [make_independent(p.t().contiguous().t()) for p in start]  # now column-major
    for _ in range(STEPS):
        grads = [
            torch.randn(p.shape, dtype=p.dtype, generator=gen).t().contiguous().t() for p in start
        ]
        new, opt = opt.step(LR, [g.t().contiguous().t().contiguous() for g in grads], params)
        params = [make_independent(p) for p in new]
        for p, g in zip(reference, grads, strict=True):
            p.grad = g.clone()
        topt.step()
    torch.testing.assert_close([p.detach() for p in params], [p.detach() for p in reference])


# --- state that does not advance for an unused parameter -------------------------------------


def test_per_parameter_step_counts_are_a_declared_field() -> None:
    a, b = make_independent(torch.ones(2)), make_independent(torch.ones(3))
    opt = Adam.init([a, b])
    _, opt = opt.step(LR, [torch.ones(2), torch.ones(3)], [a, b])
    assert opt.param_counts == () and opt.count == 1  # all alike: nothing kept per parameter
    _, opt = opt.step(LR, [torch.ones(2), None], [a, b], used=[True, False])
    assert opt.param_counts == (2, 1) and opt.count == 2
    assert "param_counts" in {f for f in type(opt).__dataclass_fields__}
    assert set(vars(opt)) <= set(type(opt).__dataclass_fields__) | {"_pieces"}


@pytest.mark.parametrize("donate", [False, True])
def test_an_unused_parameter_keeps_its_state_and_value(donate: bool) -> None:
    a, b = make_independent(torch.ones(2)), make_independent(torch.ones(3))
    opt = Adam.init([a, b], donate=donate)
    _, opt = opt.step(LR, [torch.ones(2), torch.ones(3)], [a, b])
    moments = opt.exp_avg[1].clone(), opt.exp_avg_sq[1].clone()
    (new_a, new_b), opt = opt.step(LR, [torch.ones(2), None], [a, b], used=[True, False])
    assert new_b is b and not torch.equal(new_a, a)
    assert torch.equal(opt.exp_avg[1], moments[0]) and torch.equal(opt.exp_avg_sq[1], moments[1])


def test_built_without_init_an_unused_parameter_gets_zero_state_when_first_used() -> None:
    a, b = make_independent(torch.ones(2)), make_independent(torch.ones(3))
    ours = Adam()
    theirs = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in (a, b)], lr=LR)
    params: list[torch.Tensor] = [a, b]
    for used in ([True, False], [True, True], [False, True]):
        grads = [torch.full_like(p, 0.5) if u else None for p, u in zip(params, used, strict=True)]
        new, ours = ours.step(LR, grads, params, used=used)
        params = [make_independent(p) for p in new]
        for p, g in zip(theirs.param_groups[0]["params"], grads, strict=True):
            p.grad = g
        theirs.step()
    expected = [p.detach() for p in theirs.param_groups[0]["params"]]
    torch.testing.assert_close([p.detach() for p in params], expected)


def test_run_step_tells_used_only_to_an_optimizer_whose_step_takes_it() -> None:
    class Recording(GD):
        def step(self, lr: Any, gradients: Any, params: Any) -> Any:  # no ``used``
            seen.append([g.clone() for g in gradients])
            return super().step(lr, gradients, params)

    seen: list[list[torch.Tensor]] = []
    a, b = make_independent(torch.ones(2)), make_independent(torch.ones(3))
    (_, new_b), _ = run_step([a, b], Recording(), a.sum(), 0.1)
    assert torch.equal(seen[0][1], torch.zeros(3))  # grad's zeros, as the step was written for
    assert torch.equal(new_b, b)


# --- the gradients handed to step ------------------------------------------------------------

PURE = [
    GD,
    lambda m: GDM.init(m, momentum=0.9),
    Adam.init,
    AdamW.init,
    Adagrad.init,
    RMSprop.init,
    Lion.init,
    lambda m: SGD.init(m, momentum=0.9),
    NAdam.init,
    RAdam.init,
    Adamax.init,
    Adadelta.init,
    Rprop.init,
    ASGD.init,
    Adafactor.init,
    lambda m: ClipGradNorm(Adam.init(m), max_norm=1.0),
    lambda m: TorchOptimizer.init(m, torch.optim.Adam, lr=0.1, fused=True),
]
PURE_IDS = [
    "GD",
    "GDM",
    "Adam",
    "AdamW",
    "Adagrad",
    "RMSprop",
    "Lion",
    "SGD",
    "NAdam",
    "RAdam",
    "Adamax",
    "Adadelta",
    "Rprop",
    "ASGD",
    "Adafactor",
    "Clip",
    "Torch",
]


def _two() -> list[torch.Tensor]:
    return [make_independent(torch.zeros(2, 3)), make_independent(torch.zeros(100_000))]


def _opt(make: Any, params: list[torch.Tensor]) -> Any:
    return make() if make is GD else make(params)


@pytest.mark.parametrize(
    ("grad", "error", "message"),
    [
        (torch.ones(3, 2), ValueError, r"parameter 0 has shape \(3, 2\), but the parameter has"),
        (torch.ones(2, 3, dtype=torch.float64), TypeError, "parameter 0 has dtype torch.float64"),
        (torch.ones(2, 3, device="meta"), ValueError, "parameter 0 is on meta"),
        (None, TypeError, r"got NoneType as the gradient of parameter 0 .*used="),
    ],
    ids=["shape", "dtype", "device", "None"],
)
@pytest.mark.parametrize("make", PURE, ids=PURE_IDS)
def test_a_gradient_that_does_not_fit_its_parameter_is_refused(
    make: Any, grad: Any, error: type[Exception], message: str
) -> None:
    params = _two()
    opt = _opt(make, params)
    with pytest.raises(error, match=message):
        opt.step(0.1, [grad, torch.ones(100_000)], params)
    with pytest.raises(ValueError, match="parameter 1 has shape"):
        opt.step(0.1, [torch.ones(2, 3), torch.ones(1)], params)  # one element for 100k


@pytest.mark.parametrize("make", PURE, ids=PURE_IDS)
def test_a_wrong_number_of_gradients_or_used_flags_is_refused(make: Any) -> None:
    params = _two()
    opt = _opt(make, params)
    with pytest.raises(DiffprogError, match="got 2 parameters but 1 gradients"):
        opt.step(0.1, [torch.ones(2, 3)], params)
    with pytest.raises(ValueError, match="got 2 parameters but 3 flags in used="):
        opt.step(0.1, [torch.ones(2, 3), torch.ones(100_000)], params, used=[True] * 3)


@pytest.mark.parametrize("make", PURE, ids=PURE_IDS)
def test_a_none_gradient_is_fine_for_a_parameter_marked_unused(make: Any) -> None:
    params = _two()
    new, _ = _opt(make, params).step(0.1, [None, torch.ones(100_000)], params, used=[False, True])
    assert torch.equal(new[0], torch.zeros(2, 3))
    assert bool((new[1] < 0).all())


# --- the learning rate -----------------------------------------------------------------------

LEARNING_RATES = [
    pytest.param(-0.1, "Invalid learning rate: -0.1", id="float"),
    pytest.param(torch.tensor(-0.1), "Invalid learning rate: -0.1", id="tensor"),
    pytest.param(lambda count: 0.1 - count, "Invalid learning rate: -0.9", id="schedule"),
    pytest.param(torch.ones(2), "Tensor lr must be 1-element", id="tensor-of-two"),
]


@pytest.mark.parametrize(("lr", "message"), LEARNING_RATES)
@pytest.mark.parametrize("make", PURE, ids=PURE_IDS)
def test_an_invalid_learning_rate_is_refused_as_torch_refuses_it(
    make: Any, lr: Any, message: str
) -> None:
    params = _two()
    opt = _opt(make, params)
    if callable(lr):  # the first value is fine; the second step's is not
        _, opt = opt.step(lr, [torch.ones(2, 3), torch.ones(100_000)], params)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=message):
        opt.step(lr, [torch.ones(2, 3), torch.ones(100_000)], params)
    if not callable(lr):
        assert all(
            torch.equal(p, q) for p, q in zip(params, before, strict=True)
        )  # nothing written
    with pytest.raises(ValueError, match=message):  # torch.optim says the same at init
        torch.optim.SGD(params, lr=lr(1) if callable(lr) else lr)


@pytest.mark.parametrize("make", PURE, ids=PURE_IDS)
def test_run_step_refuses_a_negative_learning_rate(make: Any) -> None:
    params = _two()
    loss = params[0].sum() + params[1].sum()
    with pytest.raises(ValueError, match="Invalid learning rate: -0.01"):
        run_step(params, _opt(make, params), loss, -0.01)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: Adam.init(m, overrides={"0": {"lr_scale": -1.0}}),
        lambda m: TorchOptimizer.init(m, torch.optim.Adam, overrides={"0": {"lr_scale": -1.0}}),
    ],
    ids=["pure", "torch"],
)
def test_a_negative_learning_rate_scale_is_refused(make: Any) -> None:
    with pytest.raises(ValueError, match="Invalid learning rate scale: -1.0"):
        make(_two())


@pytest.mark.parametrize("make", PURE, ids=PURE_IDS)
def test_a_nan_learning_rate_is_refused_where_torch_accepts_it(make: Any) -> None:
    # A difference from torch.optim (docs/optim.md): torch.optim.SGD(params, lr=nan) is
    # accepted, and every parameter it steps becomes NaN.
    params = _two()
    torch.optim.SGD(params, lr=float("nan"))
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        _opt(make, params).step(float("nan"), [torch.ones(2, 3), torch.ones(100_000)], params)


def test_the_free_step_passes_used_on() -> None:
    a, b = make_independent(torch.ones(2)), make_independent(torch.ones(3))
    (_, new_b), opt = step(LR, [torch.ones(2), None], [a, b], Adam.init([a, b]), used=[True, False])
    assert new_b is b and opt.param_counts == (1, 0)


@pytest.mark.parametrize("make", PURE[:-1], ids=PURE_IDS[:-1])  # TorchOptimizer keeps its lr
def test_a_one_element_tensor_learning_rate_steps_as_its_float(make: Any) -> None:
    # Found by review: GD's kernel refused a [1]-shaped lr that the check had accepted.
    p = [make_independent(torch.linspace(-1.0, 1.0, 6).reshape(2, 3))]
    grads = [torch.linspace(0.5, -0.5, 6).reshape(2, 3)]
    with_tensor, _ = _opt(make, p).step(torch.tensor([0.01]), grads, p)
    with_float, _ = _opt(make, p).step(0.01, grads, p)
    torch.testing.assert_close(with_tensor[0], with_float[0], rtol=0, atol=1e-7)
