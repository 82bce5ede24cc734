"""``differentiable=True``: meta-gradients through K pure optimizer steps.

Checked against central finite differences of the same K steps taken by the default
(non-differentiable) step, and against torch.optim with ``differentiable=True`` on the same
weights (new parameters and meta-gradients), for every pure optimizer and the options of each;
float64 throughout (the default dtype too, so that torch's scalar state, ``mu_product``,
``eta``, ``mu``, ``step``, is float64 as the finite differences need).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import diffprog as dp
import diffprog.optim
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
    PureOptimizer,
    RAdam,
    RMSprop,
    Rprop,
    TorchOptimizer,
    apply_gradients,
    run_step,
)
from diffprog.optim._pure import DIFFERENTIABLE

K = 3
X = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(4, 3)
Y = torch.tensor([[0.5, -1.0], [1.0, 0.0], [-0.5, 2.0], [0.0, 1.0]], dtype=torch.float64)

# name -> (diffprog optimizer from (model, settings), torch.optim class (None: torch has no
# differentiable form), settings, lr)
Case = tuple[Callable[..., Any], type[torch.optim.Optimizer] | None, dict[str, Any], float]
CASES: dict[str, Case] = {
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
    # lr 0.2: the gradients shrink, so that exp_inf's decayed old value wins (beta2 matters)
    "Adamax-decreasing": (Adamax.init, torch.optim.Adamax, {"betas": (0.8, 0.99)}, 0.2),
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
    "NAdam": (NAdam.init, torch.optim.NAdam, {"weight_decay": 0.1, "momentum_decay": 0.1}, 0.05),
    "NAdamW-maximize": (
        NAdam.init,
        torch.optim.NAdam,
        {
            "weight_decay": 0.5,
            "decoupled_weight_decay": True,
            "maximize": True,
            "betas": (0.8, 0.9),
        },
        0.01,
    ),
    "RAdam": (RAdam.init, torch.optim.RAdam, {"weight_decay": 0.1}, 0.05),
    "RAdamW-maximize-rectified": (
        RAdam.init,
        torch.optim.RAdam,
        {
            "weight_decay": 0.5,
            "decoupled_weight_decay": True,
            "maximize": True,
            "betas": (0.8, 0.9),
        },
        0.01,
    ),
    # lr 0.2: some gradient signs flip at the second step (etaminus then matters)
    "Rprop": (Rprop.init, torch.optim.Rprop, {}, 0.2),
    "Rprop-clamped": (
        Rprop.init,
        torch.optim.Rprop,
        {"etas": (0.4, 1.5), "step_sizes": (0.09, 0.25)},  # both bounds reached
        0.2,
    ),
    "Rprop-maximize": (Rprop.init, torch.optim.Rprop, {"maximize": True}, 0.05),
    "ASGD": (
        ASGD.init,
        torch.optim.ASGD,
        {"lambd": 0.5, "t0": 1.5, "weight_decay": 0.1},  # t0: away from max(1, t - t0)'s kink
        0.05,
    ),
    "ASGD-maximize": (
        ASGD.init,
        torch.optim.ASGD,
        {"lambd": 0.2, "alpha": 0.5, "maximize": True},
        0.01,
    ),
    "Lion": (Lion.init, None, {"weight_decay": 0.1}, 0.01),
    "Lion-maximize": (Lion.init, None, {"maximize": True, "betas": (0.5, 0.9)}, 0.01),
    # d and eps where they bind: the RMS clipping, both floors
    "Adafactor": (Adafactor.init, None, {"weight_decay": 0.1, "d": 1.05}, 0.05),
    "Adafactor-maximize": (
        Adafactor.init,
        None,
        {"maximize": True, "eps": (0.3, 0.3), "beta2_decay": -0.5},
        0.01,
    ),
}
# The steps of a case's inner loop: RAdam rectifies from its 6th step (beta2=0.9) on.
STEPS = {"RAdamW-maximize-rectified": 8}
# Where torch.optim's differentiable=True gives no correct meta-gradient (the tests
# test_torch_... pin how): ours is compared with finite differences only (and with torch's new
# parameters, which it does compute).
TORCH_CUTS = {
    "SGD-momentum",
    "GDM-nesterov",
    "Adam-amsgrad",
    "RMSprop-centered-momentum",
    "Adamax",
    "Adamax-decreasing",
    "Rprop",
    "Rprop-clamped",
    "Rprop-maximize",
}
# torch.optim's RMSprop, Adagrad, Adamax and Adadelta take no tensor lr in their differentiable
# path (``addcdiv_(value=lr)``), and its Rprop and ASGD cut it (their first step size, eta,
# is ``full_like(lr)``, ``as_tensor(lr).clone().detach()``, and ASGD reads eta with
# ``.item()``): compared with torch w.r.t. the initial weights only.
TORCH_FLOAT_LR = {
    "RMSprop",
    "RMSprop-centered-momentum",
    "Adagrad",
    "Adamax",
    "Adamax-decreasing",
    "Adadelta",
    "Rprop",
    "Rprop-clamped",
    "Rprop-maximize",
    "ASGD",
    "ASGD-maximize",
    # torch's NAdam with a tensor lr saves exp_avg for lr's gradient, then writes it in place
    # (exp_avg.lerp_) at the next step: the backward pass through K > 1 steps refuses
    "NAdam",
    "NAdamW-maximize",
}
WITH_TORCH = [n for n, case in CASES.items() if case[1] is not None]


@pytest.fixture(autouse=True)
def _float64_default() -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def steps_of(name: str) -> int:
    return STEPS.get(name, K)


def make_model() -> Linear:
    model = dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))
    return dp.to(model, dtype=torch.float64)


def loss_of(model: Linear) -> torch.Tensor:
    return (model(X) - Y).square().mean()


def inner_loop(model: Linear, optimizer: Any, lr: Any, steps: int = K) -> tuple[Linear, Any]:
    for _ in range(steps):
        model, optimizer = run_step(model, optimizer, loss_of(model), lr)
    return model, optimizer


def outer_value(name: str, params: list[torch.Tensor], lr: float, **hyper: Any) -> float:
    """The loss after the case's steps, default (non-differentiable) ones, from ``params``."""
    make, _, settings, _ = CASES[name]
    model = dp.replace_parameters(make_model(), [dp.make_independent(p) for p in params])
    after, _ = inner_loop(model, make(model, **{**settings, **hyper}), lr, steps_of(name))
    return float(loss_of(after).detach())


@pytest.mark.parametrize("name", list(CASES))
def test_meta_gradient_matches_finite_differences(name: str) -> None:
    make, _, settings, lr0 = CASES[name]
    model = make_model()
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    optimizer = make(model, **settings, differentiable=True)
    after, _ = inner_loop(model, optimizer, lr, steps_of(name))
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
    assert float(meta[-1]) != 0.0  # the learning rate reaches the loss in every case


def test_radam_case_takes_rectified_steps() -> None:
    """The rectified case's steps 6.. are rectified (rho_t > 5), its first ones are not, so
    the grid above covers both of RAdam's branches."""
    beta2 = CASES["RAdamW-maximize-rectified"][2]["betas"][1]
    rho_inf = 2 / (1 - beta2) - 1
    rho = [rho_inf - 2 * t * beta2**t / (1 - beta2**t) for t in range(1, 9)]
    assert [r > 5 for r in rho] == [False] * 5 + [True] * 3
    assert all(r <= 5 for r in rho[:K])  # the K-step case stays unrectified


def torch_run(
    name: str, steps: int | None = None, tensor_lr: bool | None = None
) -> tuple[list[torch.Tensor], Callable[[], list[torch.Tensor]]]:
    """torch.optim's ``differentiable=True`` steps (its documented use: non-leaf parameters,
    .grad set by hand) from the same weights: the new parameters, and a function giving the
    meta-gradient w.r.t. the initial weights (and lr, where torch keeps a tensor lr's graph)."""
    _, torch_cls, settings, lr0 = CASES[name]
    assert torch_cls is not None
    shell = make_model()
    leaves = [p.detach().clone().requires_grad_() for p in dp.flatten_parameters(shell)]
    tensor_lr = name not in TORCH_FLOAT_LR if tensor_lr is None else tensor_lr
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True) if tensor_lr else lr0
    work = [p.clone() for p in leaves]  # torch steps these in place, keeping the graph
    optimizer = torch_cls(work, lr=lr, differentiable=True, **settings)
    for _ in range(steps_of(name) if steps is None else steps):
        loss = loss_of(dp.replace_parameters(shell, work))
        for p, g in zip(work, torch.autograd.grad(loss, work, create_graph=True), strict=True):
            p.grad = g
        optimizer.step()
    inputs = [*leaves, lr] if isinstance(lr, torch.Tensor) else leaves

    def meta() -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss_of(dp.replace_parameters(shell, work)), inputs))

    return [w.detach() for w in work], meta


def torch_meta_gradient(name: str) -> list[torch.Tensor]:
    """The meta-gradient with torch.optim's ``differentiable=True`` (see torch_run)."""
    return torch_run(name)[1]()


def our_run(name: str, steps: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Our differentiable steps: the new parameters and the meta-gradient w.r.t. the initial
    weights and lr."""
    make, _, settings, lr0 = CASES[name]
    model = make_model()
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    optimizer = make(model, **settings, differentiable=True)
    after, _ = inner_loop(model, optimizer, lr, steps_of(name) if steps is None else steps)
    meta = torch.autograd.grad(loss_of(after), [*dp.flatten_parameters(model), lr])
    return [p.detach() for p in dp.flatten_parameters(after)], list(meta)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("name", WITH_TORCH)
def test_new_parameters_match_torch_optim_differentiable(name: str) -> None:
    ours, _ = our_run(name)
    theirs, _ = torch_run(name)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("name", [n for n in WITH_TORCH if n not in TORCH_CUTS])
def test_meta_gradient_matches_torch_optim_differentiable(name: str) -> None:
    _, ours = our_run(name)
    theirs = torch_meta_gradient(name)
    torch.testing.assert_close(ours[: len(theirs)], theirs)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("name", ["NAdam", "NAdamW-maximize"])
def test_torch_nadam_with_a_tensor_lr_fails_through_steps_where_ours_works(name: str) -> None:
    """torch.optim.NAdam(differentiable=True) with a tensor lr saves exp_avg (for lr's
    gradient) and writes it in place at the next step; with a float lr it matches ours (test
    above), and ours matches finite differences with a tensor lr (test further above)."""
    _, meta = torch_run(name, tensor_lr=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        meta()
    _, one_step = torch_run(name, steps=1, tensor_lr=True)  # one step works, lr's gradient too
    torch.testing.assert_close(our_run(name, steps=1)[1], one_step())


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("name", ["Rprop", "Rprop-clamped", "Rprop-maximize"])
def test_rprop_one_step_meta_gradient_matches_torch_optim_differentiable(name: str) -> None:
    """Through one step torch's differentiable Rprop gives its meta-gradient (through more,
    see test_torch_in_place_state_meta_gradient_fails_where_ours_works)."""
    _, ours = our_run(name, steps=1)
    theirs = torch_run(name, steps=1)[1]()
    torch.testing.assert_close(ours[: len(theirs)], theirs)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_torch_sgd_nesterov_cuts_the_first_buffer_where_ours_does_not() -> None:
    """The documented difference (docs/optim.md): torch.optim.SGD(differentiable=True) starts
    its momentum buffer at grad.detach(), so its meta-gradient misses the first step's
    dependence on the gradient; ours matches finite differences (test above)."""
    _, ours = our_run("GDM-nesterov")
    theirs = torch_meta_gradient("GDM-nesterov")
    assert not all(torch.allclose(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("name", sorted(TORCH_CUTS - {"GDM-nesterov"}))
def test_torch_in_place_state_meta_gradient_fails_where_ours_works(name: str) -> None:
    """torch.optim.SGD(momentum>0), Adam(amsgrad=True), RMSprop(centered=True), Adamax and
    Rprop with differentiable=True update state in place (``buf.mul_(momentum).add_(...)``,
    ``max_exp_avg_sq.copy_(...)``, ``grad_avg.lerp_(...)``, ``exp_avg.lerp_(...)``,
    ``step_size.mul_(sign).clamp_(...)``), which the backward pass through K > 1 steps
    refuses; ours is out of place and matches finite differences (test above)."""
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
        ("Adamax-decreasing", "betas", 1),
        ("Adadelta", "rho", None),
        ("Adadelta", "eps", None),
        ("Adagrad", "lr_decay", None),
        ("Adagrad", "weight_decay", None),
        ("NAdam", "betas", 0),
        ("NAdam", "betas", 1),
        ("NAdam", "momentum_decay", None),
        ("NAdam", "eps", None),
        ("NAdam", "weight_decay", None),
        ("NAdamW-maximize", "weight_decay", None),
        ("RAdam", "betas", 0),
        ("RAdam", "weight_decay", None),
        ("RAdamW-maximize-rectified", "betas", 0),
        ("RAdamW-maximize-rectified", "betas", 1),
        ("RAdamW-maximize-rectified", "eps", None),
        ("RAdamW-maximize-rectified", "weight_decay", None),
        ("Rprop", "etas", 0),
        ("Rprop", "etas", 1),
        ("Rprop-clamped", "step_sizes", 0),
        ("Rprop-clamped", "step_sizes", 1),
        ("ASGD", "lambd", None),
        ("ASGD", "alpha", None),
        ("ASGD", "weight_decay", None),
        ("ASGD-maximize", "lambd", None),
        ("Lion", "weight_decay", None),
        ("Adafactor", "weight_decay", None),
        ("Adafactor", "beta2_decay", None),
        ("Adafactor", "d", None),
        ("Adafactor-maximize", "eps", 0),
        ("Adafactor-maximize", "eps", 1),
    ],
)
def test_meta_gradient_of_a_tensor_hyper_parameter(
    name: str, hyper: str, value: int | None
) -> None:
    make, _, settings, lr0 = CASES[name]
    defaults = make.__self__.declaration().defaults()  # type: ignore[attr-defined]
    given = settings.get(hyper, defaults[hyper])
    x0 = float(given[value] if value is not None else given)
    if hyper == "eps" and x0 < 1e-2:
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
    after, _ = inner_loop(model, optimizer, lr0, steps_of(name))
    (meta,) = torch.autograd.grad(loss_of(after), [x])
    base = [p.detach() for p in dp.flatten_parameters(model)]
    h = 1e-6
    up = outer_value(name, base, lr0, **{hyper: setting(x0 + h)})
    down = outer_value(name, base, lr0, **{hyper: setting(x0 - h)})
    assert float(meta) == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-8)
    assert float(meta) != 0.0  # each case is chosen so that the setting matters


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


PURE_CLASSES = [
    c
    for c in vars(diffprog.optim).values()
    if isinstance(c, type) and issubclass(c, PureOptimizer) and c is not PureOptimizer
]


def test_every_pure_optimizer_is_in_the_grid() -> None:
    assert len(PURE_CLASSES) == 15
    covered = {CASES[name][0](make_model()).__class__ for name in CASES}
    assert covered == set(PURE_CLASSES)
    assert sorted(c.__name__ for c in PURE_CLASSES) == sorted(DIFFERENTIABLE)


@pytest.mark.parametrize("cls", PURE_CLASSES, ids=lambda c: c.__name__)
def test_every_pure_optimizer_takes_differentiable_steps(cls: Any) -> None:
    assert cls._differentiable_ok and cls.init(make_model(), differentiable=True).differentiable


class _NoDifferentiableStep(GD):
    """A user's optimizer that writes ``_update`` only."""

    _differentiable_ok = False


def test_a_pure_optimizer_without_a_differentiable_step_refuses_it() -> None:
    message = r"_NoDifferentiableStep has no differentiable step \(it writes no _update_diff"
    with pytest.raises(ValueError, match=message):
        _NoDifferentiableStep.init(make_model(), differentiable=True)
    with pytest.raises(ValueError, match=message):
        _NoDifferentiableStep(differentiable=True)


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
    # (Adafactor refuses complex parameters, as torch's)
    c = [1.0, -0.5] if name.startswith("Adafactor") else [1 + 2j, -0.5j]
    model = {
        "a": dp.make_independent(torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)),
        "b": dp.make_independent(torch.tensor([0.5, -0.25], dtype=torch.float64)),
        "c": dp.make_independent(torch.tensor(c)),
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


@pytest.mark.parametrize("name", list(CASES))
def test_differentiable_steps_of_a_parameter_the_loss_skips_match_the_default_steps(
    name: str,
) -> None:
    """Per-parameter step counts (a parameter the first step's loss does not reach keeps its
    state and count, and later steps run its update at its own count): the differentiable
    step's values are the default step's, and its meta-gradient matches finite differences."""
    make, _, settings, lr0 = CASES[name]
    model = make_model()

    def loss(m: Linear, step: int) -> torch.Tensor:
        out = X @ m.weight.T + (m.bias if step > 0 else 0.0)
        return (out - Y).square().mean()

    def after(lr: Any, differentiable: bool, start: Linear = model) -> Linear:
        current, optimizer = start, make(start, **settings, differentiable=differentiable)
        for step in range(K):
            current, optimizer = run_step(current, optimizer, loss(current, step), lr)
        assert optimizer.param_counts == (K, K - 1)
        return current

    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    meta = after(lr, True)
    plain = after(lr0, False)
    for a, b in zip(dp.flatten_parameters(meta), dp.flatten_parameters(plain), strict=True):
        torch.testing.assert_close(a.detach(), b)
    (d_lr,) = torch.autograd.grad(loss(meta, K), [lr])
    h = 1e-6
    up = float(loss(after(lr0 + h, False), K).detach())
    down = float(loss(after(lr0 - h, False), K).detach())
    assert float(d_lr) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


def test_asgd_averaged_parameters_are_differentiable_too() -> None:
    """ASGD's ``ax`` (the averaged parameters, the model ASGD gives) is a differentiable
    function of the initial weights, the learning rate, ``lambd``, ``alpha`` and ``t0`` (which
    reaches nothing but ``ax``, through ``mu``): a meta-loss on it matches finite
    differences."""
    make, _, settings, lr0 = CASES["ASGD"]
    names = ("lambd", "alpha", "t0")
    base = [p.detach() for p in dp.flatten_parameters(make_model())]

    def averaged_loss(
        params: list[torch.Tensor], lr: Any, differentiable: bool, **hyper: Any
    ) -> Any:
        model = dp.replace_parameters(make_model(), params)
        optimizer = make(model, **{**settings, **hyper}, differentiable=differentiable)
        _, optimizer = inner_loop(model, optimizer, lr, K + 1)
        return loss_of(dp.replace_parameters(model, list(optimizer.ax)))

    x0 = {name: float(settings.get(name, ASGD.declaration().defaults()[name])) for name in names}
    hyper = {name: torch.tensor(v, requires_grad=True) for name, v in x0.items()}
    start = [dp.make_independent(p) for p in base]
    lr = torch.tensor(lr0, requires_grad=True)
    meta = torch.autograd.grad(
        averaged_loss(start, lr, True, **hyper), [*start, lr, *hyper.values()]
    )
    h = 1e-6

    def value(params: list[torch.Tensor] = base, lr: float = lr0, **changed: float) -> float:
        start = [dp.make_independent(p) for p in params]
        return float(averaged_loss(start, lr, False, **{**x0, **changed}).detach())

    d = [torch.cos(torch.arange(p.numel(), dtype=p.dtype) + 1.0).reshape(p.shape) for p in base]
    along = sum(float((g * e).sum()) for g, e in zip(meta[: len(base)], d, strict=True))
    plus = value([p + h * e for p, e in zip(base, d, strict=True)])
    minus = value([p - h * e for p, e in zip(base, d, strict=True)])
    assert along == pytest.approx((plus - minus) / (2 * h), rel=1e-5)
    numeric = [(value(lr=lr0 + h) - value(lr=lr0 - h)) / (2 * h)]
    numeric += [(value(**{n: x0[n] + h}) - value(**{n: x0[n] - h})) / (2 * h) for n in names]
    for got, expected in zip(meta[len(base) :], numeric, strict=True):
        assert float(got) == pytest.approx(expected, rel=1e-5) and expected != 0.0


def _meta_on(name: str, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Our differentiable steps of case ``name`` on ``device``: the new parameters and the
    meta-gradient w.r.t. the initial weights and a tensor lr (hyper-parameters as floats)."""
    make, _, settings, lr0 = CASES[name]
    model = dp.to(make_model(), device=device)
    x, y = X.to(device), Y.to(device)
    lr = torch.tensor(lr0, dtype=torch.float64, device=device, requires_grad=True)
    current, optimizer = model, make(model, **settings, differentiable=True)
    for _ in range(steps_of(name)):
        loss = (current(x) - y).square().mean()
        current, optimizer = run_step(current, optimizer, loss, lr)
    outer = (current(x) - y).square().mean()
    meta = torch.autograd.grad(outer, [*dp.flatten_parameters(model), lr])
    return [p.detach().cpu() for p in dp.flatten_parameters(current)], [g.cpu() for g in meta]


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_differentiable_steps_on_cuda_equal_those_on_the_cpu(name: str) -> None:
    """CUDA puts state where the CPU does not (NAdam's mu_product stays a CPU scalar, ASGD's
    eta and mu follow the parameters): the differentiable step mixes them as torch does."""
    cpu_values, cpu_meta = _meta_on(name, "cpu")
    cuda_values, cuda_meta = _meta_on(name, "cuda")
    torch.testing.assert_close(cuda_values, cpu_values)
    torch.testing.assert_close(cuda_meta, cpu_meta)


@pytest.mark.parametrize("name", ["NAdam", "ASGD", "Rprop", "Adafactor"])
def test_the_device_check_runs_here_on_the_cpu(name: str) -> None:
    """The CUDA test's helper, run on the CPU (so that it is known to run): it gives what
    our_run gives."""
    values, meta = _meta_on(name, "cpu")
    ours_values, ours_meta = our_run(name)
    torch.testing.assert_close(values, ours_values, rtol=0, atol=0)
    torch.testing.assert_close(meta, ours_meta, rtol=0, atol=0)


@pytest.mark.parametrize(
    "torch_cls",
    [torch.optim.SGD, torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Rprop],
    ids=lambda c: c.__name__,
)
def test_torch_optimizer_refuses_differentiable_naming_the_pure_optimizer(torch_cls: Any) -> None:
    """TorchOptimizer steps torch.optim in place on the model's leaves: differentiable=True
    there could never give a meta-gradient, so it is refused up front (not torch's in-place
    error at the first step), however it is asked for."""
    model = make_model()
    name = torch_cls.__name__
    message = rf"does not take {name}\(differentiable=True\).*diffprog\.optim\.{name}\.init"
    with pytest.raises(ValueError, match=message):
        TorchOptimizer.init(model, torch_cls, lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match=message):
        TorchOptimizer.init(model, torch_cls, lr=0.1, overrides={"bias": {"differentiable": True}})
    params = dp.flatten_parameters(model)
    with pytest.raises(ValueError, match=message):
        TorchOptimizer(torch_cls(params, lr=0.1, differentiable=True), params)
    TorchOptimizer.init(model, torch_cls, lr=0.1, differentiable=False)  # accepted as torch's


@hypothesis_settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(CASES)),
    shapes=st.lists(
        st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**16),
)
def test_differentiable_steps_give_the_default_steps_numbers_on_random_steps(
    name: str, shapes: list[tuple[int, ...]], seed: int
) -> None:
    """Property: for any parameters and gradients (any shapes, scalars included), K
    differentiable steps give the default steps' numbers (float64 rounding)."""
    make, _, settings_, lr0 = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    params = [dp.make_independent(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps_of(name))]
    plain, plain_opt = params, make(params, **settings_)
    meta, meta_opt = params, make(params, **settings_, differentiable=True)
    for step_grads in grads:
        new, plain_opt = plain_opt.step(lr0, step_grads, plain)
        plain = [dp.make_independent(p) for p in new]
        meta, meta_opt = meta_opt.step(lr0, step_grads, meta)
    torch.testing.assert_close([p.detach() for p in meta], plain)
