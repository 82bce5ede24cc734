"""Issue 9, "the rest of torch.optim, pure": ``SGD``, ``NAdam``, ``RAdam`` and ``Adamax`` against
torch.optim itself.

Every option torch has, over 100 steps, against each of torch's own implementations: the
multi-tensor one (``foreach=True``; ours is written in its order, so bit for bit), the
for-loop one (``foreach=False``, torch's default on the CPU; float rounding apart) and, for
SGD, the fused one (bit for bit where ours runs the fused kernel). Then every path a step can
take (``step``, ``run_step``, donated state, per-parameter overrides with a frozen parameter)
with gradients in other memory layouts and parameters the loss does not reach in some steps,
where torch's per-parameter state (``step``, NAdam's ``mu_product``) must follow.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog.optim._pure
from diffprog import DiffprogError, make_independent
from diffprog.optim import GDM, SGD, Adamax, NAdam, RAdam, run_step

SHAPES = [(3, 4), (4,), (2, 3, 2), ()]
STEPS = 100
LR = 0.01

# (our class, torch class, options): every option torch has, each in some row
CASES: list[tuple[Any, Any, dict[str, Any]]] = [
    (SGD, torch.optim.SGD, {}),
    (SGD, torch.optim.SGD, {"momentum": 0.9}),
    (SGD, torch.optim.SGD, {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
    (SGD, torch.optim.SGD, {"momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    (SGD, torch.optim.SGD, {"momentum": 0.9, "maximize": True}),
    (SGD, torch.optim.SGD, {"weight_decay": 0.1, "maximize": True}),
    (NAdam, torch.optim.NAdam, {}),
    (NAdam, torch.optim.NAdam, {"weight_decay": 0.1, "momentum_decay": 0.01}),
    (NAdam, torch.optim.NAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    (NAdam, torch.optim.NAdam, {"maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
    (RAdam, torch.optim.RAdam, {}),
    (RAdam, torch.optim.RAdam, {"weight_decay": 0.1, "betas": (0.8, 0.9)}),
    (RAdam, torch.optim.RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    (RAdam, torch.optim.RAdam, {"maximize": True, "eps": 1e-6}),
    (Adamax, torch.optim.Adamax, {}),
    (Adamax, torch.optim.Adamax, {"weight_decay": 0.1, "betas": (0.8, 0.99)}),
    (Adamax, torch.optim.Adamax, {"maximize": True, "eps": 1e-3}),
]

# our state field -> torch's state key
STATE_KEYS = {
    SGD: {"momentum_buffer": "momentum_buffer"},
    NAdam: {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "mu_product": "mu_product"},
    RAdam: {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    Adamax: {"exp_avg": "exp_avg", "exp_inf": "exp_inf"},
}


def _case_id(case: Any) -> str:
    ours, _, options = case
    return f"{ours.__name__}-" + ("-".join(f"{k}={v}" for k, v in options.items()) or "defaults")


def _params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def _grads(steps: int = STEPS, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(steps)]


def _torch_run(
    cls: Any, options: dict[str, Any], params: list[torch.Tensor], grads: list[list[Any]]
) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = cls(ps, lr=LR, **options)
    for gs in grads:
        for p, g in zip(ps, gs, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


def _our_run(opt: Any, params: list[torch.Tensor], grads: list[list[Any]]) -> Any:
    ps = [make_independent(p.clone()) for p in params]
    for gs in grads:
        used = [g is not None for g in gs]
        new, opt = opt.step(LR, gs, ps, used=None if all(used) else used)
        ps = [make_independent(p) for p in new]
    return [p.detach() for p in ps], opt


# torch's implementations, by the flags that choose them
REFERENCES = {
    "foreach": {"foreach": True},
    "for-loop": {"foreach": False},
    "fused": {"fused": True},
}


# torch has a fused kernel for SGD alone of these
GRID = [(c, r) for c in CASES for r in REFERENCES if r != "fused" or c[0] is SGD]


@pytest.mark.parametrize(("case", "reference"), GRID, ids=[f"{_case_id(c)}-{r}" for c, r in GRID])
def test_matches_each_of_torchs_implementations_for_100_steps(
    case: Any, reference: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs, options = case
    # Ours runs torch's fused SGD kernel where the device has one (the CPU has), else the
    # multi-tensor order: each is compared bit for bit with torch's same implementation.
    monkeypatch.setattr(diffprog.optim._pure, "USE_FUSED", reference == "fused")
    params, grads = _params(), _grads()
    expected, topt = _torch_run(theirs, {**options, **REFERENCES[reference]}, params, grads)
    got, opt = _our_run(ours.init(params, **options), params, grads)
    exact = {"rtol": 0, "atol": 0} if reference != "for-loop" else {}
    torch.testing.assert_close(got, expected, **exact)
    assert opt.count == STEPS and opt.param_counts == ()
    tparams = topt.param_groups[0]["params"]
    for field, key in STATE_KEYS[ours].items():
        if getattr(opt, field) or key in topt.state[tparams[0]]:
            mine = list(getattr(opt, field))
            torch.testing.assert_close(mine, [topt.state[p][key] for p in tparams], **exact)


# --- every path, gradients in other layouts, parameters the loss does not reach ------------


def _parameters() -> list[torch.Tensor]:
    """Parameters in several layouts: contiguous, transposed, channels-last, sliced, a vector,
    a scalar."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(4, 6, generator=gen),
        torch.randn(4, 6, generator=gen).t(),
        torch.randn(2, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last),
        torch.randn(4, 6, generator=gen)[:, ::2],
        torch.randn(5, generator=gen),
        torch.randn((), generator=gen),
    ]


def _non_contiguous(shape: tuple[int, ...], step: int, gen: torch.Generator) -> torch.Tensor:
    """A random gradient of ``shape``, laid out otherwise than a contiguous tensor: expanded
    (stride 0), transposed or sliced, by turns."""
    n = len(shape)
    if n == 0:
        return torch.randn((), generator=gen)
    kind = step % 3
    if kind == 0:
        return torch.randn(shape[1:], generator=gen).expand(shape)
    if kind == 1:
        return torch.randn(shape[::-1], generator=gen).permute(*reversed(range(n)))
    return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]


def _steps(count: int, unused: bool) -> list[list[torch.Tensor | None]]:
    """``count`` steps of non-contiguous gradients; with ``unused``, parameter ``i`` is not
    reached in the steps ``s`` with ``(s + i) % 4 == 0`` and parameter 2 before step 7 (so its
    state starts late, and the per-parameter step counts drift apart)."""
    gen = torch.Generator().manual_seed(1)
    shapes = [tuple(p.shape) for p in _parameters()]
    steps: list[list[torch.Tensor | None]] = []
    for s in range(count):
        grads: list[torch.Tensor | None] = [_non_contiguous(sh, s, gen) for sh in shapes]
        if unused:
            grads = [
                None if (s + i) % 4 == 0 or (i == 2 and s < 7) else g for i, g in enumerate(grads)
            ]
        steps.append(grads)
    return steps


class _Inject(torch.autograd.Function):
    """A zero loss term whose gradient with respect to ``p`` is ``g`` itself (its layout
    kept), so that ``run_step`` meets exactly the chosen gradients."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.g = g
        return p.new_zeros(())

    @staticmethod
    def backward(ctx: Any, out: torch.Tensor) -> Any:  # type: ignore[override]
        return ctx.g, None


PATHS = ["step", "foreach", "run_step", "pieces", "donate", "groups"]
FROZEN = 4  # the parameter frozen on the "groups" path
SCALED = 0  # the parameter with its own learning rate and hyper-parameter on the "groups" path
# a hyper-parameter to override per optimizer on the "groups" path (torch: a param group's)
GROUP_OVERRIDE = {
    SGD: {"momentum": 0.5},
    NAdam: {"betas": (0.8, 0.99)},
    RAdam: {"betas": (0.8, 0.9)},
    Adamax: {"eps": 1e-3},
}


def _our_path(
    cls: Any,
    options: dict[str, Any],
    path: str,
    steps: list[list[torch.Tensor | None]],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[torch.Tensor], Any]:
    monkeypatch.setattr(diffprog.optim._pure, "USE_FUSED", path != "foreach")
    if path in ("pieces", "donate"):
        monkeypatch.setattr(diffprog.optim._pure, "PIECE_BYTES", 100)  # a piece or two each
    extra: dict[str, Any] = {"donate": path == "donate"}
    if path == "groups":
        override = {"lr_scale": 0.5, **GROUP_OVERRIDE[cls]}
        extra["overrides"] = {str(SCALED): override}
        extra["freeze"] = str(FROZEN)
    params = [make_independent(p) for p in _parameters()]  # layouts kept
    opt = cls.init(params, **options, **extra)
    for grads in steps:
        used = [g is not None for g in grads]
        if path in ("step", "foreach"):
            new, opt = opt.step(LR, grads, params, used=used)
            params = [make_independent(p) for p in new]
            continue
        loss = sum(
            (_Inject.apply(p, g) for p, g in zip(params, grads, strict=True) if g is not None),
            torch.zeros(()),
        )
        params, opt = run_step(params, opt, loss, LR)
    return [p.detach() for p in params], opt


def _torch_path(
    cls: Any, options: dict[str, Any], ours: Any, path: str, steps: list[list[torch.Tensor | None]]
) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = [torch.nn.Parameter(p.clone()) for p in _parameters()]
    groups: list[dict[str, Any]] = [{"params": params}]
    if path == "groups":
        groups = [
            {"params": [params[SCALED]], "lr": LR * 0.5, **GROUP_OVERRIDE[ours]},
            {"params": [p for i, p in enumerate(params) if i not in (SCALED, FROZEN)]},
        ]
    opt = cls(groups, lr=LR, **options)
    for grads in steps:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach() for p in params], opt


# the richest option row of each optimizer (every state kind in use)
RICH = [
    (SGD, torch.optim.SGD, {"momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}),
    (SGD, torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "maximize": True}),
    (NAdam, torch.optim.NAdam, {"weight_decay": 0.1, "momentum_decay": 0.01}),
    (NAdam, torch.optim.NAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    (RAdam, torch.optim.RAdam, {"weight_decay": 0.1, "betas": (0.9, 0.95)}),
    (RAdam, torch.optim.RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    (Adamax, torch.optim.Adamax, {"weight_decay": 0.1, "maximize": True}),
]


@pytest.mark.parametrize("unused", [False, True], ids=["all-used", "some-unused"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", RICH, ids=[_case_id(c) for c in RICH])
def test_every_path_matches_torch_with_unused_parameters_and_any_layout(
    case: Any, path: str, unused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs, options = case
    steps = _steps(30, unused)
    expected, topt = _torch_path(theirs, options, ours, path, steps)
    got, opt = _our_path(ours, options, path, steps, monkeypatch)
    torch.testing.assert_close(got, expected)
    if path == "groups":
        assert torch.equal(got[FROZEN], _parameters()[FROZEN])
    # torch's per-parameter state, step count included, follows
    counts = opt.param_counts or (opt.count,) * len(got)
    for i, p in enumerate(_torch_param_order(topt, path)):
        state = topt.state.get(p, {}) if p is not None else {}
        if "step" in state:
            assert counts[i] == int(state["step"].item()), i
        for field, key in STATE_KEYS[ours].items():
            if key in state:
                torch.testing.assert_close(getattr(opt, field)[i], state[key])


def _torch_param_order(topt: torch.optim.Optimizer, path: str) -> list[Any]:
    """torch's parameters in our ``flatten_parameters`` order (``None`` for the frozen one)."""
    if path != "groups":
        return list(topt.param_groups[0]["params"])
    rest = iter(topt.param_groups[1]["params"])
    return [
        topt.param_groups[0]["params"][0] if i == SCALED else None if i == FROZEN else next(rest)
        for i in range(len(_parameters()))
    ]


# --- torch's signature, checks and implementation switches -----------------------------------

TORCH = {
    SGD: torch.optim.SGD,
    NAdam: torch.optim.NAdam,
    RAdam: torch.optim.RAdam,
    Adamax: torch.optim.Adamax,
}


@pytest.mark.parametrize("ours", list(TORCH), ids=lambda c: c.__name__)
def test_init_takes_every_option_of_torch_with_its_default(ours: Any) -> None:
    theirs = inspect.signature(TORCH[ours]).parameters
    mine = inspect.signature(ours.init).parameters
    for name, param in theirs.items():
        if name in ("params", "lr"):  # the model; the learning rate goes to each step
            continue
        assert name in mine, name
        assert mine[name].default == param.default, name
        assert mine[name].kind is inspect.Parameter.KEYWORD_ONLY, name


INVALID = [
    (SGD, {"momentum": -0.1}),
    (SGD, {"weight_decay": -0.1}),
    (SGD, {"nesterov": True}),
    (SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}),
    (NAdam, {"eps": -1.0}),
    (NAdam, {"betas": (1.0, 0.9)}),
    (NAdam, {"betas": (0.9, -0.1)}),
    (NAdam, {"weight_decay": -0.1}),
    (NAdam, {"momentum_decay": -0.1}),
    (RAdam, {"eps": -1.0}),
    (RAdam, {"betas": (0.9, 1.0)}),
    (RAdam, {"weight_decay": -0.1}),
    (Adamax, {"eps": -1.0}),
    (Adamax, {"betas": (-0.5, 0.9)}),
    (Adamax, {"weight_decay": -1.0}),
]


@pytest.mark.parametrize(
    ("ours", "options"), INVALID, ids=[_case_id((o, 0, k)) for o, k in INVALID]
)
@pytest.mark.parametrize("where", ["init", "overrides"])
def test_invalid_hyper_parameters_are_refused_in_torchs_words(
    ours: Any, options: dict[str, Any], where: str
) -> None:
    with pytest.raises(ValueError) as theirs:
        TORCH[ours](_params(), lr=LR, **options)
    kwargs = options if where == "init" else {"overrides": {"1": options}}
    with pytest.raises(ValueError) as mine:
        ours.init(_params(), **kwargs)
    # torch's message, which ours completes with the range: "... (must be >= 0)."
    assert str(mine.value).startswith(str(theirs.value)), (str(mine.value), str(theirs.value))


@pytest.mark.parametrize("ours", list(TORCH), ids=lambda c: c.__name__)
def test_implementation_switches_are_accepted_and_change_no_number(ours: Any) -> None:
    theirs = inspect.signature(TORCH[ours]).parameters
    switches: list[dict[str, Any]] = [{"foreach": None}, {"foreach": True}, {"foreach": False}]
    if "capturable" in theirs:
        switches += [{"capturable": True}, {"capturable": False}]
    if "fused" in theirs:
        switches += [{"fused": True}, {"fused": False}, {"fused": None, "foreach": True}]
    switches.append({"differentiable": False})
    params, grads = _params(), _grads(10)
    expected, _ = _our_run(ours.init(params), params, grads)
    for switch in switches:
        TORCH[ours](_params(), lr=LR, **switch)  # torch accepts these too
        got, _ = _our_run(ours.init(params, **switch), params, grads)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("ours", list(TORCH), ids=lambda c: c.__name__)
def test_differentiable_steps_are_taken_by_each(ours: Any) -> None:
    # (tests/test_optim_differentiable.py tests their numbers and meta-gradients)
    assert ours._differentiable_ok and ours.init(_params(), differentiable=True).differentiable


@pytest.mark.parametrize(
    "flags", [{"fused": True, "foreach": True}, {"fused": True, "differentiable": True}]
)
def test_sgd_refuses_fused_with_foreach_or_differentiable_as_torch_does(
    flags: dict[str, Any],
) -> None:
    with pytest.raises(RuntimeError) as theirs:
        torch.optim.SGD(_params(), lr=LR, **flags)
    with pytest.raises(RuntimeError) as mine:
        SGD.init(_params(), **flags)
    assert str(mine.value) == str(theirs.value)


def test_sgd_is_gdm_under_torchs_name() -> None:
    params, grads = _params(), _grads(20)
    options = {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}
    expected, gdm = _our_run(GDM.init(params, **options), params, grads)
    got, sgd = _our_run(SGD.init(params, **options), params, grads)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert isinstance(sgd, GDM) and type(sgd).__name__ == "SGD"
    assert repr(sgd).startswith("SGD(") and repr(sgd)[3:] == repr(gdm)[3:]


# --- other dtypes, built without init, any hyper-parameters ----------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64], ids=str)
@pytest.mark.parametrize("case", RICH, ids=[_case_id(c) for c in RICH])
def test_complex_and_float64_parameters_match_torch(
    case: Any, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diffprog.optim._pure, "USE_FUSED", False)  # torch's foreach order
    ours, theirs, options = case
    params, grads = _params(dtype), _grads(20, dtype)
    expected, topt = _torch_run(theirs, {**options, "foreach": True}, params, grads)
    got, opt = _our_run(ours.init(params, **options), params, grads)
    # torch's SGD (alone of these) steps complex tensors as complex, not through their real
    # views, and complex arithmetic rounds a multiply-add otherwise: float rounding apart.
    exact = {} if ours is SGD and dtype.is_complex else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got, expected, **exact)
    assert got[0].dtype == dtype
    if ours is NAdam:  # torch's scalar dtype follows the default dtype, not the parameters'
        state = topt.state[topt.param_groups[0]["params"][0]]
        assert opt.mu_product[0].dtype == state["mu_product"].dtype == torch.float32


def test_nadam_mu_product_has_torchs_scalar_dtype_under_a_float64_default() -> None:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params, grads = _params(), _grads(5)
        _, topt = _torch_run(torch.optim.NAdam, {}, params, grads)
        _, opt = _our_run(NAdam.init(params), params, grads)
    finally:
        torch.set_default_dtype(before)
    expected = [topt.state[p]["mu_product"] for p in topt.param_groups[0]["params"]]
    assert expected[0].dtype == torch.float64
    torch.testing.assert_close(list(opt.mu_product), expected, rtol=0, atol=0)


@pytest.mark.parametrize("ours", list(TORCH), ids=lambda c: c.__name__)
def test_built_without_init_starts_from_torchs_initial_state(ours: Any) -> None:
    params, grads = _params(), _grads(10)
    steps: list[list[Any]] = [
        [g if (s + i) % 3 else None for i, g in enumerate(gs)] for s, gs in enumerate(grads)
    ]
    expected, _ = _torch_run(TORCH[ours], {"foreach": True}, params, steps)
    got, opt = _our_run(ours(), params, steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert opt.count == 10 and len(opt.param_counts) == len(params)


@given(
    which=st.sampled_from(list(TORCH)),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.floats(1e-10, 1e-2),
    weight_decay=st.floats(0.0, 0.5),
    flag=st.booleans(),
    momentum_decay=st.floats(0.0, 0.1),
)
@settings(max_examples=40, deadline=None)
def test_any_hyper_parameters_match_torch_bit_for_bit(
    which: Any,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    flag: bool,
    momentum_decay: float,
) -> None:
    options: dict[str, Any]
    if which is SGD:
        # beta1 as the momentum, beta2 - 0.5 as the dampening; flag: Nesterov (no dampening)
        options = {"momentum": beta1, "weight_decay": weight_decay, "nesterov": flag and beta1 > 0}
        options["dampening"] = 0.0 if options["nesterov"] else beta2 - 0.5
    else:
        options = {"betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay}
        options.update(
            {
                NAdam: {"momentum_decay": momentum_decay, "decoupled_weight_decay": flag},
                RAdam: {"decoupled_weight_decay": flag},
                Adamax: {"maximize": flag},
            }[which]
        )
    params, grads = _params(), _grads(10)
    expected, _ = _torch_run(TORCH[which], {**options, "foreach": True}, params, grads)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffprog.optim._pure, "USE_FUSED", False)
        got, _ = _our_run(which.init(params, **options), params, grads)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("ours", list(TORCH), ids=lambda c: c.__name__)
def test_a_donated_optimizer_refuses_a_second_step(ours: Any) -> None:
    params = [make_independent(p) for p in _params()]
    opt = ours.init(params, donate=True)
    _, newer = opt.step(LR, _grads(1)[0], params)
    with pytest.raises(DiffprogError, match="donate=True"):
        opt.step(LR, _grads(1)[0], params)
    newer.step(LR, _grads(1)[0], params)


def test_sgd_refuses_sparse_gradients_which_torchs_sgd_takes() -> None:
    # A difference from torch.optim.SGD (docs/optim.md): GD takes them, SGD (fused kernel,
    # dense momentum buffers) refuses them with a pointer to GD.
    weight = torch.nn.Parameter(torch.zeros(5, 3))
    sparse = torch.sparse_coo_tensor([[1, 2]], torch.ones(2, 3), (5, 3), check_invariants=True)
    weight.grad = sparse.clone()
    torch.optim.SGD([weight], lr=LR).step()
    params = [make_independent(torch.zeros(5, 3))]
    with pytest.raises(DiffprogError, match="SGD does not take sparse gradients .* Use GD"):
        SGD.init(params).step(LR, [sparse], params)
