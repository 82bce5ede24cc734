"""``differentiable=True``: meta-gradients through K pure optimizer steps.

Checked against central finite differences of the same K steps taken by the default
(non-differentiable, fused) step, and against torch.optim with ``differentiable=True`` on the
same weights, for each optimizer that has a differentiable step; float64 throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import diffprog as dp
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
    apply_gradients,
    run_step,
)

K = 3
X = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(4, 3)
Y = torch.tensor([[0.5, -1.0], [1.0, 0.0], [-0.5, 2.0], [0.0, 1.0]], dtype=torch.float64)

# name -> (diffprog optimizer from (model, settings), torch.optim class, settings, lr)
CASES: dict[str, tuple[Callable[..., Any], type[torch.optim.Optimizer], dict[str, Any], float]] = {
    "GD": (lambda m, **s: GD.init(m, **s), torch.optim.SGD, {}, 0.1),
    "SGD": (lambda m, **s: SGD.init(m, **s), torch.optim.SGD, {"weight_decay": 0.1}, 0.1),
    "SGD-maximize": (lambda m, **s: SGD.init(m, **s), torch.optim.SGD, {"maximize": True}, 0.01),
    "SGD-momentum": (SGD.init, torch.optim.SGD, {"momentum": 0.9, "dampening": 0.1}, 0.05),
    "GDM-nesterov": (
        GDM.init,
        torch.optim.SGD,
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        0.05,
    ),
    "Adam": (Adam.init, torch.optim.Adam, {"weight_decay": 0.1}, 0.05),
    "Adam-amsgrad": (Adam.init, torch.optim.Adam, {"amsgrad": True, "betas": (0.8, 0.9)}, 0.05),
    "Adam-maximize": (Adam.init, torch.optim.Adam, {"maximize": True}, 0.01),
    "AdamW": (AdamW.init, torch.optim.AdamW, {"weight_decay": 0.5}, 0.05),
    "RMSprop": (RMSprop.init, torch.optim.RMSprop, {"weight_decay": 0.1}, 0.01),
    "RMSprop-centered-momentum": (
        RMSprop.init,
        torch.optim.RMSprop,
        {"centered": True, "momentum": 0.5, "alpha": 0.9, "maximize": True},
        0.01,
    ),
    "Adamax": (
        Adamax.init,
        torch.optim.Adamax,
        {"weight_decay": 0.1, "betas": (0.8, 0.9), "maximize": True},
        0.01,
    ),
    "Adadelta": (
        Adadelta.init,
        torch.optim.Adadelta,
        {"rho": 0.8, "eps": 1e-3, "weight_decay": 0.1},
        1.0,
    ),
    "Adagrad": (
        Adagrad.init,
        torch.optim.Adagrad,
        {"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
        0.05,
    ),
}
# Where torch.optim's differentiable=True gives no correct meta-gradient (the tests
# test_torch_... pin how): ours is compared with finite differences only.
TORCH_CUTS = {
    "SGD-momentum",
    "GDM-nesterov",
    "Adam-amsgrad",
    "RMSprop-centered-momentum",
    "Adamax",
}
# torch.optim's RMSprop, Adagrad, Adamax and Adadelta take no tensor lr in their differentiable
# path (``addcdiv_(value=lr)``): compared with torch w.r.t. the initial weights only.
TORCH_FLOAT_LR = {"RMSprop", "RMSprop-centered-momentum", "Adagrad", "Adamax", "Adadelta"}


def make_model() -> Linear:
    model = dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))
    return dp.to(model, dtype=torch.float64)


def loss_of(model: Linear) -> torch.Tensor:
    return (model(X) - Y).square().mean()


def inner_loop(model: Linear, optimizer: Any, lr: Any) -> tuple[Linear, Any]:
    for _ in range(K):
        model, optimizer = run_step(model, optimizer, loss_of(model), lr)
    return model, optimizer


def outer_value(name: str, params: list[torch.Tensor], lr: float, **hyper: Any) -> float:
    """The loss after K default (fused, non-differentiable) steps from ``params``."""
    make, _, settings, _ = CASES[name]
    model = dp.replace_parameters(make_model(), [dp.make_independent(p) for p in params])
    after, _ = inner_loop(model, make(model, **{**settings, **hyper}), lr)
    return float(loss_of(after).detach())


@pytest.mark.parametrize("name", list(CASES))
def test_meta_gradient_matches_finite_differences(name: str) -> None:
    make, _, settings, lr0 = CASES[name]
    model = make_model()
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    after, _ = inner_loop(model, make(model, **settings, differentiable=True), lr)
    params = dp.flatten_parameters(model)
    meta = torch.autograd.grad(loss_of(after), [*params, lr])
    base = [p.detach() for p in params]
    directions = [
        torch.cos(torch.arange(p.numel(), dtype=p.dtype) + 1.0).reshape(p.shape) for p in base
    ]
    h = 1e-6
    plus = outer_value(name, [p + h * d for p, d in zip(base, directions, strict=True)], lr0)
    minus = outer_value(name, [p - h * d for p, d in zip(base, directions, strict=True)], lr0)
    along = sum(float((g * d).sum()) for g, d in zip(meta[:-1], directions, strict=True))
    assert along == pytest.approx((plus - minus) / (2 * h), rel=1e-5, abs=1e-8)
    d_lr = (outer_value(name, base, lr0 + h) - outer_value(name, base, lr0 - h)) / (2 * h)
    assert float(meta[-1]) == pytest.approx(d_lr, rel=1e-5, abs=1e-8)


def torch_meta_gradient(name: str) -> list[torch.Tensor]:
    """The meta-gradient w.r.t. the initial weights and lr, with torch.optim's
    ``differentiable=True`` (its documented use: non-leaf parameters, .grad set by hand)."""
    _, torch_cls, settings, lr0 = CASES[name]
    shell = make_model()
    # torch keeps its step count in the default dtype's scalar type: float64 here, as ours.
    torch.set_default_dtype(torch.float64)
    try:
        return _torch_meta_gradient(shell, torch_cls, settings, lr0, name not in TORCH_FLOAT_LR)
    finally:
        torch.set_default_dtype(torch.float32)


def _torch_meta_gradient(
    shell: Linear,
    torch_cls: type[torch.optim.Optimizer],
    settings: dict[str, Any],
    lr0: float,
    tensor_lr: bool,
) -> list[torch.Tensor]:
    leaves = [p.detach().clone().requires_grad_() for p in dp.flatten_parameters(shell)]
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True) if tensor_lr else lr0
    work = [p.clone() for p in leaves]  # torch steps these in place, keeping the graph
    optimizer = torch_cls(work, lr=lr, differentiable=True, **settings)
    for _ in range(K):
        loss = loss_of(dp.replace_parameters(shell, work))
        for p, g in zip(work, torch.autograd.grad(loss, work, create_graph=True), strict=True):
            p.grad = g
        optimizer.step()
    inputs = [*leaves, lr] if isinstance(lr, torch.Tensor) else leaves
    return list(torch.autograd.grad(loss_of(dp.replace_parameters(shell, work)), inputs))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("name", [n for n in CASES if n not in TORCH_CUTS])
def test_meta_gradient_matches_torch_optim_differentiable(name: str) -> None:
    make, _, settings, lr0 = CASES[name]
    model = make_model()
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    after, _ = inner_loop(model, make(model, **settings, differentiable=True), lr)
    ours = torch.autograd.grad(loss_of(after), [*dp.flatten_parameters(model), lr])
    theirs = torch_meta_gradient(name)
    torch.testing.assert_close(list(ours)[: len(theirs)], theirs)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_torch_sgd_nesterov_cuts_the_first_buffer_where_ours_does_not() -> None:
    """The documented difference (docs/optim.md): torch.optim.SGD(differentiable=True) starts
    its momentum buffer at grad.detach(), so its meta-gradient misses the first step's
    dependence on the gradient; ours matches finite differences (test above)."""
    make, _, settings, lr0 = CASES["GDM-nesterov"]
    model = make_model()
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    after, _ = inner_loop(model, make(model, **settings, differentiable=True), lr)
    ours = torch.autograd.grad(loss_of(after), [*dp.flatten_parameters(model), lr])
    theirs = torch_meta_gradient("GDM-nesterov")
    assert not all(torch.allclose(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize(
    "name", ["SGD-momentum", "Adam-amsgrad", "RMSprop-centered-momentum", "Adamax"]
)
def test_torch_in_place_state_meta_gradient_fails_where_ours_works(name: str) -> None:
    """torch.optim.SGD(momentum>0), Adam(amsgrad=True), RMSprop(centered=True) and Adamax
    with differentiable=True update state in place (``buf.mul_(momentum).add_(...)``,
    ``max_exp_avg_sq.copy_(...)``, ``grad_avg.lerp_(...)``, ``exp_avg.lerp_(...)``), which
    the backward pass through K > 1 steps refuses; ours is out of place and matches finite
    differences (test above)."""
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch_meta_gradient(name)


@pytest.mark.parametrize(
    ("name", "hyper", "value"),
    [
        ("Adam", "betas", 0),
        ("Adam", "betas", 1),
        ("Adam", "weight_decay", None),
        ("Adam", "eps", None),
        ("AdamW", "weight_decay", None),
        ("SGD-momentum", "momentum", None),
        ("SGD-momentum", "dampening", None),
        ("GDM-nesterov", "weight_decay", None),
        ("RMSprop-centered-momentum", "alpha", None),
        ("RMSprop-centered-momentum", "momentum", None),
        ("Adamax", "betas", 0),
        ("Adamax", "betas", 1),
        ("Adadelta", "rho", None),
        ("Adadelta", "eps", None),
        ("Adagrad", "lr_decay", None),
        ("Adagrad", "weight_decay", None),
    ],
)
def test_meta_gradient_of_a_tensor_hyper_parameter(
    name: str, hyper: str, value: int | None
) -> None:
    make, _, settings, lr0 = CASES[name]
    defaults = make.__self__.declaration().defaults()  # type: ignore[attr-defined]
    given = settings.get(hyper, defaults[hyper])
    x0 = float(given[value] if value is not None else given)
    if hyper == "eps":
        x0 = 1e-2  # large enough for finite differences to see
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)

    def setting(v: Any) -> Any:
        if value is None:
            return v
        pair = list(given)
        pair[value] = v
        return tuple(pair)

    model = make_model()
    optimizer = make(model, **{**settings, hyper: setting(x)}, differentiable=True)
    after, _ = inner_loop(model, optimizer, lr0)
    (meta,) = torch.autograd.grad(loss_of(after), [x])
    base = [p.detach() for p in dp.flatten_parameters(model)]
    h = 1e-6
    up = outer_value(name, base, lr0, **{hyper: setting(x0 + h)})
    down = outer_value(name, base, lr0, **{hyper: setting(x0 - h)})
    assert float(meta) == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("name", list(CASES))
def test_differentiable_steps_leave_the_old_model_and_optimizer_unchanged(name: str) -> None:
    make, _, settings, lr0 = CASES[name]
    model = make_model()
    optimizer = make(model, **settings, differentiable=True)
    _, optimizer = run_step(model, optimizer, loss_of(model), lr0)  # some state to keep
    before = [p.detach().clone() for p in dp.flatten_parameters(model)]
    state = [t.detach().clone() for t in dp.tensors(optimizer)]
    after, stepped = inner_loop(model, optimizer, lr0)
    again, _ = inner_loop(model, optimizer, lr0)  # a value: the same steps again
    assert all(torch.equal(a, b) for a, b in zip(dp.flatten_parameters(model), before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(dp.tensors(optimizer), state, strict=True))
    assert stepped.count == optimizer.count + K and stepped.differentiable
    for a, b in zip(dp.flatten_parameters(after), dp.flatten_parameters(again), strict=True):
        assert torch.equal(a, b) and a.grad_fn is not None and isinstance(a, dp.Parameter)


@pytest.mark.parametrize("name", list(CASES))
def test_apply_gradients_is_differentiable_as_run_step_is(name: str) -> None:
    make, _, settings, lr0 = CASES[name]
    model = make_model()
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    by_run, _ = inner_loop(model, make(model, **settings, differentiable=True), lr)
    current, optimizer = model, make(model, **settings, differentiable=True)
    for _ in range(K):
        params = dp.flatten_parameters(current)
        grads = dp.grad(loss_of(current), params, create_graph=True)
        current, optimizer = apply_gradients(current, optimizer, grads, lr)
    inputs = [*dp.flatten_parameters(model), lr]
    expected = torch.autograd.grad(loss_of(by_run), inputs)
    torch.testing.assert_close(torch.autograd.grad(loss_of(current), inputs), expected)


def test_the_default_step_stays_non_differentiable() -> None:
    model = make_model()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    after, _ = run_step(model, Adam.init(model), loss_of(model), lr)
    assert all(p.is_leaf for p in dp.flatten_parameters(after))


@pytest.mark.parametrize("cls", [NAdam, RAdam, Rprop, ASGD])
def test_an_optimizer_without_a_differentiable_step_refuses_it(cls: Any) -> None:
    with pytest.raises(ValueError, match=r"has no differentiable step yet\. Use one of GD, GDM"):
        cls.init(make_model(), differentiable=True)


@pytest.mark.parametrize("cls", [Lion, Adafactor])
def test_optimizers_without_the_option_refuse_it_when_built_directly(cls: Any) -> None:
    with pytest.raises(ValueError, match=r"has no differentiable step yet"):
        cls(differentiable=True)


def test_a_learned_hyper_parameter_needs_differentiable() -> None:
    decay = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(ValueError, match=r"weight_decay are tensors that require grad.*"):
        Adam.init(make_model(), weight_decay=decay)
    with pytest.raises(ValueError, match=r"betas are tensors that require grad"):
        Adam.init(make_model(), betas=(decay, 0.999))


def test_differentiable_with_donate_is_refused() -> None:
    with pytest.raises(ValueError, match=r"donate=True and differentiable=True cannot"):
        Adam.init(make_model(), donate=True, differentiable=True)


def test_gradient_transforms_refuse_a_differentiable_inner_optimizer() -> None:
    model = make_model()
    clipped = ClipGradNorm(Adam.init(model, differentiable=True), 1.0)
    with pytest.raises(dp.DiffprogError, match=r"does not take a differentiable inner"):
        run_step(model, clipped, loss_of(model), 0.1)


@pytest.mark.parametrize("name", list(CASES))
def test_differentiable_steps_give_the_default_steps_numbers_with_overrides_and_freezing(
    name: str,
) -> None:
    """The grid a step runs through (groups with their own settings, a parameter frozen in
    the optimizer, complex parameters): the differentiable step's values are the default
    step's (float64 rounding), and its meta-gradient is defined."""
    make, _, settings, lr0 = CASES[name]
    model = {
        "a": dp.make_independent(torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)),
        "b": dp.make_independent(torch.tensor([0.5, -0.25], dtype=torch.float64)),
        "c": dp.make_independent(torch.tensor([1 + 2j, -0.5j], dtype=torch.complex128)),
        "frozen": dp.make_independent(torch.ones(2, dtype=torch.float64)),
    }

    def loss(m: dict[str, torch.Tensor]) -> torch.Tensor:
        out = (m["a"] @ torch.arange(3.0, dtype=torch.float64)) * m["b"] + m["frozen"]
        return out.square().sum() + (m["c"] * m["c"].conj()).real.sum() * m["b"].sum()

    options: dict[str, Any] = {"freeze": "frozen", "overrides": {"b": {"lr_scale": 0.5}}}
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    plain, plain_opt = model, make(model, **settings, **options)
    meta, meta_opt = model, make(model, **settings, **options, differentiable=True)
    for _ in range(K):
        plain, plain_opt = run_step(plain, plain_opt, loss(plain), lr0)
        meta, meta_opt = run_step(meta, meta_opt, loss(meta), lr)
    for a, b in zip(dp.flatten_parameters(meta), dp.flatten_parameters(plain), strict=True):
        torch.testing.assert_close(a.detach(), b)
    assert torch.equal(meta["frozen"].detach(), model["frozen"].detach())
    (d_lr,) = torch.autograd.grad(loss(meta), [lr])

    def after(lr_value: float) -> float:
        current, optimizer = model, make(model, **settings, **options)
        for _ in range(K):
            current, optimizer = run_step(current, optimizer, loss(current), lr_value)
        return float(loss(current).detach())

    h = 1e-6
    # a[:, 0] gets a zero gradient at every step: sqrt of a zero moment (sqrt_of_moment)
    assert float(d_lr) == pytest.approx((after(lr0 + h) - after(lr0 - h)) / (2 * h), rel=1e-5)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_zero_second_moment_gives_a_zero_not_a_nan_meta_gradient_unlike_torch() -> None:
    """An entry whose gradient is 0 at every step has a zero second moment; torch.optim's
    differentiable Adam differentiates sqrt at 0 (inf * 0 = nan), ours gives the true 0."""
    w0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    x = torch.tensor([1.0, 0.0], dtype=torch.float64)  # w[1] never gets a gradient

    def loss(w: torch.Tensor) -> torch.Tensor:
        return ((w * x).sum() - 3.0) ** 2

    model = {"w": dp.make_independent(w0)}
    current, optimizer = model, Adam.init(model, differentiable=True)
    for _ in range(K):
        current, optimizer = run_step(current, optimizer, loss(current["w"]), 0.1)
    (ours,) = torch.autograd.grad(loss(current["w"]), [model["w"]])
    assert torch.isfinite(ours).all() and float(ours[1]) == 0.0
    leaf = w0.clone().requires_grad_()
    work = leaf.clone()
    theirs_opt = torch.optim.Adam([work], lr=0.1, differentiable=True)
    for _ in range(K):
        (work.grad,) = torch.autograd.grad(loss(work), [work], create_graph=True)
        theirs_opt.step()
    (theirs,) = torch.autograd.grad(loss(work), [leaf])
    assert torch.isnan(theirs).all()  # the nan spreads to every entry of the tensor

    def after(first: float) -> float:
        current, optimizer = model, Adam.init(model)
        start = {"w": dp.make_independent(torch.tensor([first, 2.0], dtype=torch.float64))}
        current = start
        for _ in range(K):
            current, optimizer = run_step(current, optimizer, loss(current["w"]), 0.1)
        return float(loss(current["w"]).detach())

    h = 1e-6
    assert float(ours[0]) == pytest.approx((after(1.0 + h) - after(1.0 - h)) / (2 * h), rel=1e-5)
