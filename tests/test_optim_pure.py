"""The pure optimizers against torch.optim itself: 100 steps from the same parameters and
gradients."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
import diffprog.optim._pure
from diffprog import DiffprogError, Parameterized, flatten_parameters, make_independent
from diffprog.nn import Linear, LinearSpec
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
    clip_grad_norm,
    mk_adam,
    run_step,
    step,
)

SHAPES = [(3, 4), (4,), (2, 3, 2), ()]
STEPS = 100


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _grads(seed: int = 1, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(STEPS)]


def _torch_run(
    cls: type[torch.optim.Optimizer],
    options: dict[str, Any],
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    lr: float,
) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = cls(ps, lr=lr, **options)
    for gs in grads:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


def _our_run(opt: Any, params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: Any) -> Any:
    ps = [make_independent(p.clone()) for p in params]
    for gs in grads:
        new, opt = opt.step(lr, gs, ps)
        ps = [make_independent(p) for p in new]
    return [p.detach() for p in ps], opt


# (our class, torch class, options, learning rate, our state field -> torch state key)
CASES = [
    (GDM, torch.optim.SGD, {}, 0.05, {}),
    (GDM, torch.optim.SGD, {"momentum": 0.9}, 0.05, {"momentum_buffer": "momentum_buffer"}),
    (GDM, torch.optim.SGD, {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}, 0.05, {}),
    (GDM, torch.optim.SGD, {"momentum": 0.8, "nesterov": True, "weight_decay": 0.01}, 0.05, {}),
    (GDM, torch.optim.SGD, {"momentum": 0.9, "maximize": True}, 0.01, {}),
    (GDM, torch.optim.SGD, {"weight_decay": 0.1}, 0.05, {}),
    (Adam, torch.optim.Adam, {}, 0.01, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
    (Adam, torch.optim.Adam, {"weight_decay": 0.1, "betas": (0.8, 0.99)}, 0.01, {}),
    (Adam, torch.optim.Adam, {"amsgrad": True}, 0.01, {"max_exp_avg_sq": "max_exp_avg_sq"}),
    (Adam, torch.optim.Adam, {"maximize": True, "eps": 1e-6}, 0.01, {}),
    (AdamW, torch.optim.AdamW, {}, 0.01, {"exp_avg": "exp_avg"}),
    (AdamW, torch.optim.AdamW, {"weight_decay": 0.3, "amsgrad": True}, 0.01, {}),
    (Adagrad, torch.optim.Adagrad, {}, 0.05, {"sum": "sum"}),
    (
        Adagrad,
        torch.optim.Adagrad,
        {"lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
        0.05,
        {"sum": "sum"},
    ),
    (RMSprop, torch.optim.RMSprop, {}, 0.01, {"square_avg": "square_avg"}),
    (RMSprop, torch.optim.RMSprop, {"centered": True}, 0.01, {"grad_avg": "grad_avg"}),
    (
        RMSprop,
        torch.optim.RMSprop,
        {"momentum": 0.9, "weight_decay": 0.1, "centered": True},
        0.01,
        {"momentum_buffer": "momentum_buffer", "square_avg": "square_avg"},
    ),
    (RMSprop, torch.optim.RMSprop, {"maximize": True, "alpha": 0.9}, 0.01, {}),
    (
        SGD,
        torch.optim.SGD,
        {"momentum": 0.9, "nesterov": True},
        0.05,
        {"momentum_buffer": "momentum_buffer"},
    ),
    (NAdam, torch.optim.NAdam, {"weight_decay": 0.1}, 0.01, {"mu_product": "mu_product"}),
    (
        NAdam,
        torch.optim.NAdam,
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        0.01,
        {"exp_avg": "exp_avg"},
    ),
    (RAdam, torch.optim.RAdam, {"weight_decay": 0.1}, 0.01, {"exp_avg_sq": "exp_avg_sq"}),
    (RAdam, torch.optim.RAdam, {"decoupled_weight_decay": True, "weight_decay": 0.1}, 0.01, {}),
    (Adamax, torch.optim.Adamax, {"weight_decay": 0.1}, 0.01, {"exp_inf": "exp_inf"}),
    (
        Adadelta,
        torch.optim.Adadelta,
        {"rho": 0.8, "weight_decay": 0.1, "maximize": True},
        1.0,
        {"square_avg": "square_avg", "acc_delta": "acc_delta"},
    ),
    (
        Rprop,
        torch.optim.Rprop,
        {"etas": (0.4, 1.3), "step_sizes": (1e-4, 0.5)},
        0.01,
        {"prev": "prev", "step_size": "step_size"},
    ),
    (
        ASGD,
        torch.optim.ASGD,
        {"lambd": 0.01, "t0": 20.0, "weight_decay": 0.1},
        0.05,
        {"ax": "ax", "eta": "eta", "mu": "mu"},
    ),
    (Adafactor, torch.optim.Adafactor, {"weight_decay": 0.1, "d": 1.2}, 0.05, {}),
]


def _case_id(case: Any) -> str:
    ours, _, options, _, _ = case
    return f"{ours.__name__}-" + ("-".join(f"{k}={v}" for k, v in options.items()) or "defaults")


@pytest.mark.parametrize("kernels", ["fused", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_torch_optim_for_100_steps(
    case: Any, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "foreach": the _foreach_ fallbacks used on devices without torch's fused kernels
    monkeypatch.setattr(diffprog.optim._pure, "USE_FUSED", kernels == "fused")
    ours, theirs, options, lr, state_keys = case
    params, grads = _params(), _grads()
    expected, topt = _torch_run(theirs, options, params, grads, lr)
    got, opt = _our_run(ours.init(params, **options), params, grads, lr)
    torch.testing.assert_close(got, expected)
    assert opt.count == STEPS
    tparams = topt.param_groups[0]["params"]
    for field, key in state_keys.items():
        torch.testing.assert_close(list(getattr(opt, field)), [topt.state[p][key] for p in tparams])


@given(
    decoupled=st.booleans(),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.floats(1e-10, 1e-2),
    weight_decay=st.floats(0.0, 0.5),
    amsgrad=st.booleans(),
    lr=st.floats(1e-4, 0.1),
)
@settings(max_examples=30, deadline=None)
def test_adam_matches_torch_for_any_hyper_parameters(
    decoupled: bool,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    lr: float,
) -> None:
    ours, theirs = (AdamW, torch.optim.AdamW) if decoupled else (Adam, torch.optim.Adam)
    options = {
        "betas": (beta1, beta2),
        "eps": eps,
        "weight_decay": weight_decay,
        "amsgrad": amsgrad,
    }
    params, grads = _params(), _grads()[:10]
    expected, _ = _torch_run(theirs, options, params, grads, lr)
    got, _ = _our_run(ours.init(params, **options), params, grads, lr)
    torch.testing.assert_close(got, expected)


def test_gd_matches_torch_sgd() -> None:
    params, grads = _params(), _grads()
    expected, _ = _torch_run(torch.optim.SGD, {}, params, grads, 0.05)
    got, opt = _our_run(GD(), params, grads, 0.05)
    torch.testing.assert_close(got, expected)
    assert opt.count == STEPS


def _lion_reference(
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Lion as published (Chen et al. 2023, Algorithm 2), one tensor at a time."""
    beta1, beta2 = betas
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    for gs in grads:
        for i, g in enumerate(gs):
            c = beta1 * ms[i] + (1 - beta1) * g
            ps[i] = ps[i] - lr * (torch.sign(c) + weight_decay * ps[i])
            ms[i] = beta2 * ms[i] + (1 - beta2) * g
    return ps, ms


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_lion_matches_the_published_algorithm(weight_decay: float) -> None:
    params, grads = _params(), _grads()
    expected, moments = _lion_reference(params, grads, 1e-3, (0.9, 0.99), weight_decay)
    got, opt = _our_run(Lion.init(params, weight_decay=weight_decay), params, grads, 1e-3)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(list(opt.exp_avg), moments)


def test_lion_maximize_follows_the_gradient() -> None:
    params, grads = _params(), _grads()[:3]
    negated = [[-g for g in gs] for gs in grads]
    up, _ = _our_run(Lion.init(params, maximize=True), params, grads, 1e-2)
    down, _ = _our_run(Lion.init(params), params, negated, 1e-2)
    torch.testing.assert_close(up, down)


ALL = [
    (GD, {}),
    (GDM, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    (GDM, {"momentum": 0.9, "maximize": True, "weight_decay": 0.1}),
    (Adam, {"weight_decay": 0.1, "amsgrad": True, "maximize": True}),
    (AdamW, {"weight_decay": 0.1, "maximize": True}),
    (Adagrad, {"weight_decay": 0.1, "maximize": True, "lr_decay": 0.1}),
    (RMSprop, {"weight_decay": 0.1, "momentum": 0.5, "centered": True, "maximize": True}),
    (Lion, {"weight_decay": 0.1, "maximize": True}),
    (SGD, {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1, "maximize": True}),
    (NAdam, {"weight_decay": 0.1, "maximize": True}),
    (RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
    (Adamax, {"weight_decay": 0.1, "maximize": True}),
    (Adadelta, {"weight_decay": 0.1, "maximize": True}),
    (Rprop, {"maximize": True}),
    (ASGD, {"weight_decay": 0.1, "maximize": True, "t0": 1.0}),
    (Adafactor, {"weight_decay": 0.1, "maximize": True}),
]
ALL_IDS = [f"{cls.__name__}{i}" for i, (cls, _) in enumerate(ALL)]


def _snapshot(value: Any) -> list[torch.Tensor]:
    return [t.clone() for _, t in dp.walk(value) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("kernels", ["fused", "foreach"])
@pytest.mark.parametrize(("cls", "options"), ALL, ids=ALL_IDS)
def test_step_is_pure(
    cls: Any, options: dict[str, Any], kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diffprog.optim._pure, "USE_FUSED", kernels == "fused")
    params = [make_independent(p) for p in _params()]
    opt = cls.init(params, **options)
    opt, _ = opt.step(0.1, _grads()[0], params)[1], None  # non-zero state to start from
    grads = _grads(seed=5)[0]
    if cls is Rprop:  # Rprop leaves an element alone where its gradient's sign flipped
        grads = [2 * g for g in _grads()[0]]
    before = (_snapshot(params), _snapshot(grads), _snapshot(opt), opt.count)
    new, new_opt = opt.step(0.1, grads, params)
    after = (_snapshot(params), _snapshot(grads), _snapshot(opt), opt.count)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert new_opt is not opt and new_opt.count == opt.count + 1
    assert all(not torch.equal(a, b) for a, b in zip(new, params, strict=True))
    # A second step from the same old state gives the same answer: nothing was consumed.
    again, _ = opt.step(0.1, grads, params)
    torch.testing.assert_close(again, new, rtol=0, atol=0)
    assert flatten_parameters(new_opt) == []


@pytest.mark.parametrize(("cls", "options"), ALL[1:], ids=ALL_IDS[1:])
def test_donated_state_matches_and_the_old_optimizer_refuses_to_step(
    cls: Any, options: dict[str, Any]
) -> None:
    params, grads = _params(), _grads()[:5]
    expected, expected_opt = _our_run(cls.init(params, **options), params, grads, 0.1)
    got, opt = _our_run(cls.init(params, donate=True, **options), params, grads, 0.1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(_snapshot(opt), _snapshot(expected_opt), rtol=0, atol=0)
    ps = [make_independent(p) for p in params]
    kept = _snapshot(ps)
    _, newer = opt.step(0.1, grads[0], ps)
    torch.testing.assert_close(_snapshot(ps), kept, rtol=0, atol=0)  # parameters never donated
    with pytest.raises(DiffprogError, match="donate=True"):
        opt.step(0.1, grads[0], ps)
    newer.step(0.1, grads[0], ps)


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize(("cls", "options"), ALL, ids=ALL_IDS)
def test_tensor_learning_rate_equals_float(cls: Any, options: dict[str, Any], lr_kind: str) -> None:
    params, grads = _params(), _grads()[:5]
    lr: Any = 0.01 if lr_kind == "float" else torch.tensor(0.01)
    got, _ = _our_run(cls.init(params, **options), params, grads, lr)
    expected, _ = _our_run(cls.init(params, **options), params, grads, 0.01)
    torch.testing.assert_close(got, expected)


def test_built_without_init_starts_from_zero_state() -> None:
    params, grads = _params(), _grads()[:10]
    expected, _ = _torch_run(torch.optim.Adam, {}, params, grads, 0.01)
    got, opt = _our_run(Adam(), params, grads, 0.01)
    torch.testing.assert_close(got, expected)
    assert len(opt.exp_avg) == len(params)


@pytest.mark.parametrize("kernels", ["fused", "foreach"])
def test_complex_parameters_match_torch(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diffprog.optim._pure, "USE_FUSED", kernels == "fused")
    params, grads = _params(dtype=torch.complex64), _grads(dtype=torch.complex64)[:20]
    for ours, theirs, options in [
        (Adam, torch.optim.Adam, {"weight_decay": 0.1}),
        (GDM, torch.optim.SGD, {"momentum": 0.9}),
        (RMSprop, torch.optim.RMSprop, {"centered": True}),
        (Adagrad, torch.optim.Adagrad, {}),
        (SGD, torch.optim.SGD, {"momentum": 0.9}),
        (NAdam, torch.optim.NAdam, {"weight_decay": 0.1}),
        (RAdam, torch.optim.RAdam, {"decoupled_weight_decay": True, "weight_decay": 0.1}),
        (Adamax, torch.optim.Adamax, {}),
        (Adadelta, torch.optim.Adadelta, {"weight_decay": 0.1}),
        (Rprop, torch.optim.Rprop, {}),
        (ASGD, torch.optim.ASGD, {"t0": 5.0, "weight_decay": 0.1}),
    ]:
        expected, _ = _torch_run(theirs, options, params, grads, 0.01)
        got, _ = _our_run(ours.init(params, **options), params, grads, 0.01)
        torch.testing.assert_close(got, expected)


def test_float64_parameters_match_torch() -> None:
    params, grads = _params(dtype=torch.float64), _grads(dtype=torch.float64)[:20]
    expected, _ = _torch_run(torch.optim.AdamW, {}, params, grads, 0.01)
    got, _ = _our_run(AdamW.init(params), params, grads, 0.01)
    torch.testing.assert_close(got, expected)
    assert got[0].dtype == torch.float64


def test_mixed_dtypes_in_one_model() -> None:
    params = [torch.randn(3), torch.randn(2, dtype=torch.float64)]
    grads = [[torch.randn(3), torch.randn(2, dtype=torch.float64)] for _ in range(10)]
    expected, _ = _torch_run(torch.optim.Adam, {}, params, grads, 0.01)
    got, _ = _our_run(Adam.init(params), params, grads, 0.01)
    torch.testing.assert_close(got, expected)


def test_mk_adam_is_hasktorchs_constructor() -> None:
    params = [make_independent(p) for p in _params()]
    opt = mk_adam(0, 0.8, 0.99, params)
    assert (opt.betas, opt.count, opt.eps) == ((0.8, 0.99), 0, 1e-8)
    assert all(
        torch.equal(m, torch.zeros_like(p)) for m, p in zip(opt.exp_avg, params, strict=True)
    )
    grads = _grads()
    expected, _ = _torch_run(torch.optim.Adam, {"betas": (0.8, 0.99)}, _params(), grads, 0.01)
    got, _ = _our_run(opt, _params(), grads, 0.01)
    torch.testing.assert_close(got, expected)
    assert mk_adam(7, 0.9, 0.999, params).count == 7


def test_free_step_in_hasktorch_order() -> None:
    params = [make_independent(p) for p in _params()]
    grads = _grads()[0]
    opt = Adam.init(params)
    a, opt_a = step(0.1, grads, params, opt)
    b, opt_b = opt.step(0.1, grads, params)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt_a.count == opt_b.count == 1


def test_optimizers_print_and_hold_no_parameters() -> None:
    params = [make_independent(p) for p in _params()]
    opt = RMSprop.init(params, momentum=0.9)
    text = repr(opt)
    assert "square_avg=(const f32[3,4]" in text and "momentum_buffer=(" in text
    assert "grad_avg=()" in text
    assert flatten_parameters(opt) == []
    assert all(not isinstance(t, torch.nn.Parameter) for t in opt.square_avg)


def test_wrong_sizes_are_reported() -> None:
    params = [make_independent(p) for p in _params()]
    opt = Adam.init(params)
    with pytest.raises(DiffprogError, match="built for 4 parameters but step got 3"):
        opt.step(0.1, _grads()[0][:3], params[:3])
    with pytest.raises(DiffprogError, match="4 parameters but 3 gradients"):
        opt.step(0.1, _grads()[0][:3], params)


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (Adam, {"betas": (1.0, 0.9)}, "beta parameter at index 0"),
        (AdamW, {"eps": -1.0}, "epsilon"),
        (GDM, {"nesterov": True}, "Nesterov"),
        (RMSprop, {"alpha": -0.1}, "alpha"),
        (Adagrad, {"lr_decay": -0.1}, "lr_decay"),
        (Lion, {"weight_decay": -1.0}, "weight_decay"),
        (SGD, {"nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
        (NAdam, {"momentum_decay": -0.1}, "Invalid momentum_decay value: -0.1"),
        (RAdam, {"betas": (0.9, 1.0)}, "beta parameter at index 1"),
        (Adamax, {"eps": -1.0}, "Invalid epsilon value"),
        (Adadelta, {"rho": 1.5}, r"Invalid rho value: 1.5"),
        (Rprop, {"etas": (1.5, 1.2)}, "Invalid eta values: 1.5, 1.2"),
        (ASGD, {"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
        (Adafactor, {"d": 0.5}, "Clipping threshold d should be >= 1 but is: 0.5"),
    ],
)
def test_invalid_hyper_parameters_are_refused(
    cls: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cls.init(_params(), **options)


# --- through run_step, with gradients of a real loss ---


class MLP(Parameterized):
    layers: tuple[Linear, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def _mlp_pair(seed: int = 0) -> tuple[MLP, torch.nn.Sequential]:
    gen = torch.Generator().manual_seed(seed)
    ours = MLP(tuple(dp.sample(LinearSpec(a, b), generator=gen) for a, b in [(5, 8), (8, 3)]))
    theirs = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for t, p in zip(theirs.parameters(), flatten_parameters(ours), strict=True):
            t.copy_(p)
    return ours, theirs


@pytest.mark.parametrize(
    ("ours", "theirs", "options"),
    [
        (Adam, torch.optim.Adam, {"weight_decay": 0.01}),
        (AdamW, torch.optim.AdamW, {}),
        (GDM, torch.optim.SGD, {"momentum": 0.9}),
        (RMSprop, torch.optim.RMSprop, {"centered": True}),
        (Adagrad, torch.optim.Adagrad, {}),
        (SGD, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
        (NAdam, torch.optim.NAdam, {"decoupled_weight_decay": True, "weight_decay": 0.1}),
        (RAdam, torch.optim.RAdam, {"weight_decay": 0.01}),
        (Adamax, torch.optim.Adamax, {"weight_decay": 0.01}),
    ],
)
def test_run_step_training_matches_torch(ours: Any, theirs: Any, options: dict[str, Any]) -> None:
    model, net = _mlp_pair()
    gen = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(4)
    ]
    topt = theirs(net.parameters(), lr=0.01, **options)
    opt = ours.init(model, **options)
    for i in range(STEPS):
        x, y = data[i % len(data)]
        topt.zero_grad()
        F.mse_loss(net(x), y).backward()
        topt.step()
        model, opt = run_step(model, opt, F.mse_loss(model(x), y), 0.01)
    torch.testing.assert_close(
        [p.detach() for p in flatten_parameters(model)], [p.detach() for p in net.parameters()]
    )


# --- gradient clipping ---


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_matches_torch(norm_type: float) -> None:
    grads = [g * 10 for g in _grads()[0]]
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    for p, g in zip(ps, grads, strict=True):
        p.grad = g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(ps, 1.5, norm_type)
    clipped, norm = clip_grad_norm(grads, 1.5, norm_type)
    torch.testing.assert_close(norm, expected_norm)
    torch.testing.assert_close(clipped, [p.grad for p in ps])
    assert not torch.equal(clipped[0], grads[0])  # the input is left alone


def test_clip_grad_norm_refuses_non_finite_when_asked() -> None:
    with pytest.raises(DiffprogError, match="nan"):
        clip_grad_norm([torch.tensor([float("nan")])], 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize(
    ("ours", "theirs", "options"),
    [(Adam, torch.optim.Adam, {}), (GDM, torch.optim.SGD, {"momentum": 0.9}), (GD, None, {})],
)
def test_clipping_wraps_any_optimizer_like_clip_grad_norm_(
    ours: Any, theirs: Any, options: dict[str, Any]
) -> None:
    params = _params()
    grads = [[g * (1 + i % 3) for g in gs] for i, gs in enumerate(_grads())]
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    topt = (theirs or torch.optim.SGD)(ps, lr=0.01, **options)
    for gs in grads:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(ps, 2.0)
        topt.step()
    inner = ours.init(params, **options)
    got, opt = _our_run(ClipGradNorm(inner, max_norm=2.0), params, grads, 0.01)
    torch.testing.assert_close(got, [p.detach() for p in ps])
    assert opt.count == STEPS and isinstance(opt.inner, ours)


def test_clipping_ignores_frozen_parameters() -> None:
    params = _params()
    grads = [[g * 5 for g in gs] for gs in _grads()[:20]]
    trained = [torch.nn.Parameter(p.clone()) for p in params[1:]]
    topt = torch.optim.Adam(trained, lr=0.01)
    for gs in grads:
        for p, g in zip(trained, gs[1:], strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        topt.step()
    opt = ClipGradNorm(Adam.init(params, freeze="0"), max_norm=1.0)
    got, _ = _our_run(opt, params, grads, 0.01)
    torch.testing.assert_close(got[0], params[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1:], [p.detach() for p in trained])


# --- large models: stepping in pieces, gradients released as the step goes ---

ALL_PURE = [
    (GD, {}),
    (GDM, {"momentum": 0.9, "nesterov": True}),
    (Adam, {"weight_decay": 0.01, "amsgrad": True}),
    (AdamW, {}),
    (Adagrad, {}),
    (RMSprop, {"centered": True, "momentum": 0.5}),
    (Lion, {}),
    (SGD, {"momentum": 0.9, "dampening": 0.5}),
    (NAdam, {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    (RAdam, {"weight_decay": 0.1}),
    (Adamax, {}),
    (Adadelta, {"weight_decay": 0.1}),
    (Rprop, {"maximize": True}),
    (ASGD, {"t0": 1.0, "foreach": True}),
    (ASGD, {"t0": 1.0, "foreach": False}),
    (Adafactor, {"weight_decay": 0.1, "foreach": True}),
]


@pytest.mark.parametrize(("cls", "options"), ALL_PURE)
@pytest.mark.parametrize("how", ["plain", "overrides", "frozen"])
def test_stepping_in_pieces_changes_no_number(
    cls: Any, options: dict[str, Any], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra: dict[str, Any] = {
        "plain": {},
        "overrides": {"overrides": {"*bias": {"lr_scale": 0.5}}},
        "frozen": {"freeze": "layers.0.bias"},
    }[how]
    results = []
    for piece_bytes in (2**40, 64):  # one piece; then a piece per parameter or two
        monkeypatch.setattr(diffprog.optim._pure, "PIECE_BYTES", piece_bytes)
        model, _ = _mlp_pair()
        opt = cls.init(model, **options, **extra)
        gen = torch.Generator().manual_seed(5)
        for _ in range(5):
            x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)
            model, opt = run_step(model, opt, F.mse_loss(model(x), y), 0.01)
        results.append([p.detach() for p in flatten_parameters(model)])
        pieces = diffprog.optim._pure.pieces_of(flatten_parameters(model))
        assert (pieces is None) == (piece_bytes == 2**40)
        # the pieces are worked out per step, not kept in the value: only declared fields
        assert set(opt.__dict__) == {f.name for f in dataclasses.fields(opt)}
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


class _Probe(Adam):
    """Adam that records, at each piece, how many earlier gradients are still alive."""

    def _update(self, hyper: Any, lr: Any, count: int, params: Any, grads: Any, state: Any) -> Any:
        earlier = self.__dict__.setdefault("_refs", [])
        self.__dict__.setdefault("_alive", []).append(sum(r() is not None for r in earlier))
        earlier.extend(weakref.ref(g) for g in grads)
        return super()._update(hyper, lr, count, params, grads, state)


def test_run_step_frees_each_pieces_gradients_before_the_next_piece(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(diffprog.optim._pure, "PIECE_BYTES", 64)
    model, _ = _mlp_pair()
    opt = _Probe.init(model)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    run_step(model, opt, F.mse_loss(model(x), y), 0.01)
    alive = opt.__dict__["_alive"]
    assert len(alive) > 2 and alive == [0] * len(alive)


def test_step_called_directly_leaves_the_callers_gradients_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(diffprog.optim._pure, "PIECE_BYTES", 64)
    model, _ = _mlp_pair()
    params = flatten_parameters(model)
    grads = [torch.ones_like(p) for p in params]
    new, _ = Adam.init(model).step(0.1, grads, params)
    assert all(g is not None and torch.equal(g, torch.ones_like(g)) for g in grads)
    torch.testing.assert_close(new, [p.detach() - 0.1 for p in params])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"freeze": "layers.0.weight", "overrides": {"*bias": {"lr_scale": 0.5}}},
        {"donate": True},
    ],
)
@pytest.mark.parametrize("clip", [False, True])
def test_every_gradient_is_freed_piece_by_piece(
    options: dict[str, Any], clip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diffprog.optim._pure, "PIECE_BYTES", 64)
    model, _ = _mlp_pair()
    inner = _Probe.init(model, **options)
    opt: Any = ClipGradNorm(inner, max_norm=0.5) if clip else inner
    run_step(model, opt, F.mse_loss(model(torch.randn(8, 5)), torch.randn(8, 3)), 0.01)
    alive = inner.__dict__["_alive"]
    assert len(alive) > 1 and alive == [0] * len(alive)


def test_run_step_goes_through_an_overridden_step() -> None:
    class Zeroed(GD):
        def step(self, lr: Any, gradients: Any, params: Any) -> Any:
            return super().step(lr, [torch.zeros_like(g) for g in gradients], params)

    p = make_independent(torch.ones(2))
    (new,), _ = run_step([p], Zeroed(), (p * p).sum(), 0.1)
    assert torch.equal(new, torch.ones(2))


def test_a_donated_step_that_fails_halfway_leaves_an_optimizer_that_refuses_to_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(diffprog.optim._pure, "PIECE_BYTES", 64)

    class Failing(Adam):
        def _update(self, hyper: Any, lr: Any, count: int, *rest: Any) -> Any:
            calls = self.__dict__.setdefault("_calls", [])
            calls.append(1)
            if len(calls) == 2:
                raise MemoryError("out of memory in the second piece")
            return super()._update(hyper, lr, count, *rest)

    model, _ = _mlp_pair()
    opt = Failing.init(model, donate=True)
    loss = F.mse_loss(model(torch.randn(8, 5)), torch.randn(8, 3))
    with pytest.raises(MemoryError):
        run_step(model, opt, loss, 0.01)
    with pytest.raises(DiffprogError, match="donate=True and has already stepped"):
        run_step(model, opt, F.mse_loss(model(torch.randn(8, 5)), torch.randn(8, 3)), 0.01)


def test_a_subclass_may_have_its_own_step_helper() -> None:
    class Halved(GD):
        def _step(self, lr: float) -> float:  # a name of the user's own
            return lr / 2

        def step(self, lr: Any, gradients: Any, params: Any) -> Any:
            return super().step(self._step(lr), gradients, params)

    p = make_independent(torch.ones(2))
    (new,), _ = run_step([p], Halved(), (p * p).sum(), 0.1)
    torch.testing.assert_close(new, torch.full((2,), 0.9))
