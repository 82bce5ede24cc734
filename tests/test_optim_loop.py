"""The loop and its pieces: run_step with every optimizer, non-finite handling, value_and_grad,
apply_updates, flatten_like."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

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
    NonFiniteError,
    RAdam,
    RMSprop,
    Rprop,
    TorchOptimizer,
    apply_updates,
    flatten_like,
    fold_loop,
    run_step,
    step,
    value_and_grad,
)

Model = dict[str, Linear]


def make_model(seed: int = 0) -> Model:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden": dp.sample(LinearSpec(3, 6), generator=gen),
        "head": dp.sample(LinearSpec(6, 1), generator=gen),
    }


def forward(model: Model, x: torch.Tensor) -> torch.Tensor:
    return model["head"](torch.tanh(model["hidden"](x)))


def loss_of(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(forward(model, x), y)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=gen)
    return x, x.sum(dim=1, keepdim=True).sin()


def values(model: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in dp.flatten_parameters(model)]


OPTIMIZERS = {
    "GD": (lambda m: GD(), 0.1),
    "GDM": (lambda m: GDM.init(m, momentum=0.9), 0.05),
    "Adam": (lambda m: Adam.init(m), 1e-2),
    "AdamW": (lambda m: AdamW.init(m), 1e-2),
    "Adagrad": (lambda m: Adagrad.init(m), 5e-2),
    "RMSprop": (lambda m: RMSprop.init(m), 1e-3),
    "Lion": (lambda m: Lion.init(m), 1e-3),
    "SGD": (lambda m: SGD.init(m, momentum=0.9, nesterov=True), 0.05),
    "NAdam": (lambda m: NAdam.init(m), 1e-2),
    "RAdam": (lambda m: RAdam.init(m), 1e-2),
    "Adamax": (lambda m: Adamax.init(m), 1e-2),
    "Adadelta": (lambda m: Adadelta.init(m), 1.0),
    "Rprop": (lambda m: Rprop.init(m), 1e-2),
    "ASGD": (lambda m: ASGD.init(m), 1e-2),
    "Adafactor": (lambda m: Adafactor.init(m), 1e-2),
    "ClipGradNorm(Adam)": (lambda m: ClipGradNorm(Adam.init(m), 1.0), 1e-2),
    "TorchOptimizer(Adam)": (lambda m: TorchOptimizer.init(m, torch.optim.Adam, fused=True), 1e-2),
    "TorchOptimizer(SGD)": (lambda m: TorchOptimizer.init(m, torch.optim.SGD, momentum=0.9), 0.05),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fold_loop_of_run_step_trains_with_every_optimizer(name: str) -> None:
    make_opt, lr = OPTIMIZERS[name]
    x, y = data()
    model = make_model()
    start = float(loss_of(model, x, y).detach())

    def body(state: tuple[Model, Any], i: int) -> tuple[Model, Any]:
        model, opt = state
        return run_step(model, opt, loss_of(model, x, y), lr)

    trained, _ = fold_loop((model, make_opt(model)), 40, body)
    assert float(loss_of(trained, x, y).detach()) < start
    assert all(p.is_leaf and p.requires_grad for p in dp.flatten_parameters(trained))


@pytest.mark.parametrize("name", ["GD", "Adam", "TorchOptimizer(Adam)"])
def test_a_closure_is_a_loss_too(name: str) -> None:
    make_opt, lr = OPTIMIZERS[name]
    x, y = data()
    twin = make_model()
    by_tensor, _ = run_step(twin, make_opt(twin), loss_of(twin, x, y), lr)
    model = make_model()
    by_closure, _ = run_step(model, make_opt(model), lambda: loss_of(model, x, y), lr)
    assert_close(values(by_closure), values(by_tensor))


def test_pieces_give_run_step() -> None:
    x, y = data()
    model, opt = make_model(), Adam.init(make_model())
    expected, expected_opt = run_step(model, opt, loss_of(model, x, y), 1e-2)
    loss, grads = value_and_grad(loss_of)(model, x, y)
    new_params, new_opt = step(1e-2, flatten_like(model, grads), dp.flatten_parameters(model), opt)
    rebuilt = dp.replace_parameters(model, [dp.make_independent(p) for p in new_params])
    assert_close(values(rebuilt), values(expected))
    assert new_opt.count == expected_opt.count == 1
    assert loss.requires_grad is False


def test_value_and_grad_matches_torch_autograd_in_the_model_structure() -> None:
    x, y = data()
    model = make_model()
    loss, grads = value_and_grad(loss_of)(model, x, y)
    params = dp.flatten_parameters(model)
    expected = torch.autograd.grad(loss_of(model, x, y), params)
    assert isinstance(grads, dict)
    assert type(grads["head"]) is Linear
    assert_close(loss, loss_of(model, x, y).detach())
    assert_close(grads["hidden"].weight, expected[0])
    assert_close(flatten_like(model, grads), list(expected))
    assert dp.flatten_parameters(grads) == []  # plain tensors, not parameters


def test_value_and_grad_with_aux_and_unused_parameters() -> None:
    x, _ = data()
    model = {**make_model(), "unused": dp.make_independent(torch.ones(2))}

    def fn(m: dict[str, Any], x: torch.Tensor, *, scale: float) -> tuple[torch.Tensor, str]:
        return scale * m["head"](m["hidden"](x)).sum(), "aux"

    (loss, aux), grads = value_and_grad(fn, has_aux=True)(model, x, scale=2.0)
    assert aux == "aux"
    assert_close(loss, fn(model, x, scale=2.0)[0].detach())
    assert torch.equal(grads["unused"], torch.zeros(2))
    with pytest.raises(TypeError, match="has_aux=True"):
        value_and_grad(fn)(model, x, scale=1.0)


def test_apply_updates_list_and_tree_forms() -> None:
    model = make_model()
    before = values(model)
    _, grads = value_and_grad(loss_of)(model, *data())
    as_list = [-0.1 * g for g in flatten_like(model, grads)]
    by_list = apply_updates(model, as_list)
    tree = dp.replace_parameters(model, as_list)
    by_tree = apply_updates(model, tree)
    assert_close(values(by_list), values(by_tree))
    assert_close(
        values(by_list),
        [p - 0.1 * g for p, g in zip(before, flatten_like(model, grads), strict=True)],
    )
    assert_close(values(model), before)  # out of place
    assert all(p.is_leaf and p.requires_grad for p in dp.flatten_parameters(by_tree))
    with pytest.raises(dp.DiffprogError, match="structure"):
        apply_updates(model, {"head": tree["head"]})
    with pytest.raises(dp.DiffprogError, match="structure"):
        flatten_like(model, [torch.zeros(1)])


@settings(max_examples=15, deadline=None)
@given(
    bad=st.sets(st.integers(0, 3)),
    kind=st.sampled_from([math.nan, math.inf, -math.inf]),
    loss_bad=st.booleans(),
)
def test_non_finite_error_names_exactly_the_affected_parameters(
    bad: set[int], kind: float, loss_bad: bool
) -> None:
    x, y = data()
    model = make_model()
    opt = Adam.init(model)
    params = dp.flatten_parameters(model)
    loss = loss_of(model, x, y)
    # A term whose value is 0 (or `kind`, when the loss itself should be bad) and whose
    # gradient is non-finite exactly for the chosen parameters.
    for i in sorted(bad):
        loss = loss + (params[i].sum() * kind) * 0.0
    if loss_bad:
        loss = loss + kind
    names = [n for n, _ in dp.named_parameters(model)]
    if not bad and not loss_bad:
        new_model, _ = run_step(model, opt, loss, 1e-2)
        assert new_model is not model
        return
    before = values(model)
    with pytest.raises(NonFiniteError) as info:
        run_step(model, opt, loss, 1e-2)
    # NaN*0 and inf*0 are NaN: the loss is non-finite whenever a parameter is.
    assert info.value.paths == tuple(names[i] for i in sorted(bad))
    for i in bad:
        assert names[i] in str(info.value)
    assert "on_nonfinite='skip'" in str(info.value)
    assert_close(values(model), before)
    assert opt.count == 0


def test_non_finite_gradient_with_a_finite_loss() -> None:
    model = {
        "w": dp.make_independent(torch.tensor([0.0, 1.0])),
        "b": dp.make_independent(torch.ones(1)),
    }
    loss = model["w"].sqrt().sum() + model["b"].sum()  # d sqrt(w)/dw = inf at 0
    with pytest.raises(NonFiniteError) as info:
        run_step(model, GD(), loss, 0.1)
    assert math.isfinite(info.value.loss)
    assert info.value.paths == ("w",)
    assert str(info.value).startswith("non-finite training step: the gradient of w contains NaN")


def test_non_finite_error_message_reads_as_a_sentence() -> None:
    one = NonFiniteError(1.0, ["w"])
    assert "the gradient of w contains NaN or inf." in str(one)
    two = NonFiniteError(math.nan, ["a", "b"])
    assert "the loss is nan and the gradients of a, b contain NaN or inf." in str(two)
    many = NonFiniteError(1.0, [f"p{i}" for i in range(12)])
    assert "the gradients of p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 and 2 more contain NaN" in str(
        many
    )


def test_skip_and_ignore() -> None:
    x, y = data()
    model, opt = make_model(), Adam.init(make_model())
    bad = loss_of(model, x, y) * math.nan
    same, same_opt = run_step(model, opt, bad, 1e-2, on_nonfinite="skip")
    assert same is model
    assert same_opt is opt
    poisoned, _ = run_step(model, opt, loss_of(model, x, y) * math.nan, 1e-2, on_nonfinite="ignore")
    assert torch.isnan(poisoned["head"].weight).all()
    assert not torch.isnan(model["head"].weight).any()
    with pytest.raises(ValueError, match="on_nonfinite"):
        run_step(model, opt, loss_of(model, x, y), 1e-2, on_nonfinite="warn")  # type: ignore[arg-type]


def test_expanded_and_complex_gradients_are_checked() -> None:
    w = dp.make_independent(torch.zeros(3, 2))  # grad of w.sum() is an expanded tensor
    z = dp.make_independent(torch.tensor([1 + 1j, 2 - 1j]))
    new, _ = run_step({"w": w, "z": z}, GD(), w.sum() + z.abs().sum(), 0.1)
    assert_close(new["w"], torch.full((3, 2), -0.1))
    with pytest.raises(NonFiniteError, match="z"):
        run_step({"w": w, "z": z}, GD(), w.sum() + (z * math.inf).abs().sum() * 0, 0.1)


def test_frozen_parameters_get_no_gradient_and_are_not_checked() -> None:
    x, y = data()
    model = make_model()
    opt = Adam.init(model, freeze="hidden.*")
    loss = loss_of(model, x, y) + (model["hidden"].bias.sum() * math.nan) * 0.0
    with pytest.raises(NonFiniteError):  # the loss itself is NaN
        run_step(model, opt, loss, 1e-2)
    # A non-finite gradient in frozen parameters only: no complaint, no update there.
    loss = loss_of(model, x, y) + (model["hidden"].bias * 0).sqrt().sum()  # d/db = nan
    hidden = values(model["hidden"])
    new, _ = run_step(model, opt, loss, 1e-2)
    assert_close(values(new["hidden"]), hidden)
    assert not torch.equal(new["head"].weight, model["head"].weight)


def test_lr_none_needs_a_torch_optimizer() -> None:
    x, y = data()
    model = make_model()
    with pytest.raises(ValueError, match="learning rate"):
        run_step(model, GD(), loss_of(model, x, y), None)


def test_large_models_and_huge_finite_gradients_are_checked_exactly() -> None:
    # Over a million elements the check is a norm, which overflows for huge finite gradients:
    # that must not read as non-finite, while a real NaN still does.
    w = dp.make_independent(torch.zeros(1100, 1000))
    huge, _ = run_step({"w": w}, GD(), (w * 1e30).sum(), 1e-40)
    assert torch.isfinite(huge["w"]).all()
    with pytest.raises(NonFiniteError, match="gradient of w"):
        run_step({"w": w}, GD(), (w * 1e30).sum() + (w[0, 0] * math.nan) * 0, 1e-40)


def test_tied_parameters_get_one_gradient_and_one_update() -> None:
    w = dp.make_independent(torch.tensor([1.0, 2.0]))
    model = {"encoder": w, "decoder": w}
    loss, grads = value_and_grad(lambda m: (m["encoder"] * m["decoder"]).sum())(model)
    assert loss.item() == 5.0
    assert grads["encoder"] is grads["decoder"]
    assert_close(flatten_like(model, grads), [2 * w.detach()])
    new = apply_updates(model, grads)
    assert new["encoder"] is new["decoder"]
    assert_close(new["encoder"].detach(), torch.tensor([3.0, 6.0]))
