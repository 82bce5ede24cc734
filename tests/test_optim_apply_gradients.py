"""apply_gradients: a step with gradients computed elsewhere, equal to run_step's.

Every optimizer x both gradient forms (list, model-shaped), unused (None) and frozen
parameters, micro-batch accumulation, the refusals, non-finite gradients and donation.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

import diffprog as dp
from diffprog.nn import Linear, LinearSpec
from diffprog.optim import (
    GD,
    GDM,
    Adagrad,
    Adam,
    AdamW,
    ClipGradNorm,
    Lion,
    NonFiniteError,
    RMSprop,
    TorchOptimizer,
    apply_gradients,
    flatten_like,
    run_step,
    value_and_grad,
)

Model = dict[str, Linear]


def make_model(seed: int = 0) -> Model:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden": dp.sample(LinearSpec(3, 6), generator=gen),
        "head": dp.sample(LinearSpec(6, 1), generator=gen),
    }


def loss_of(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model["head"](torch.tanh(model["hidden"](x)))
    return torch.nn.functional.mse_loss(out, y)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=gen)
    return x, x.sum(dim=1, keepdim=True).sin()


def values(model: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in dp.flatten_parameters(model)]


OPTIMIZERS = {
    "GD": (lambda m, **kw: GD.init(m, **kw), 0.1),
    "GDM": (lambda m, **kw: GDM.init(m, momentum=0.9, dampening=0.1, **kw), 0.05),
    "Adam": (lambda m, **kw: Adam.init(m, amsgrad=True, **kw), 1e-2),
    "AdamW": (lambda m, **kw: AdamW.init(m, **kw), 1e-2),
    "Adagrad": (lambda m, **kw: Adagrad.init(m, **kw), 5e-2),
    "RMSprop": (lambda m, **kw: RMSprop.init(m, momentum=0.5, centered=True, **kw), 1e-3),
    "Lion": (lambda m, **kw: Lion.init(m, **kw), 1e-3),
    "ClipGradNorm(Adam)": (lambda m, **kw: ClipGradNorm(Adam.init(m, **kw), 0.1), 1e-2),
}


def torch_adam(m: Model, **kw: Any) -> TorchOptimizer:
    return TorchOptimizer.init(m, torch.optim.Adam, lr=1e-2)


@pytest.mark.parametrize("form", ["list", "tree"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_apply_gradients_equals_run_step_for_every_optimizer(name: str, form: str) -> None:
    make_opt, lr = OPTIMIZERS[name]
    x, y = data()
    model = make_model()
    expected_model, expected_opt = run_step(model, make_opt(model), loss_of(model, x, y), lr)
    expected_model, _ = run_step(expected_model, expected_opt, loss_of(expected_model, x, y), lr)
    opt = make_opt(model)
    for _ in range(2):
        _, grads = value_and_grad(loss_of)(model, x, y)
        given = flatten_like(model, grads) if form == "list" else grads
        before = [g.clone() for g in flatten_like(model, grads)]
        old_model, old_params = model, values(model)
        model, opt = apply_gradients(model, opt, given, lr)
        # pure: the inputs are unchanged
        assert_close(values(old_model), old_params, rtol=0, atol=0)
        assert_close(flatten_like(old_model, grads), before, rtol=0, atol=0)
    assert_close(values(model), values(expected_model))
    assert all(p.is_leaf and p.requires_grad for p in dp.flatten_parameters(model))


def test_apply_gradients_with_a_torch_optimizer_equals_run_step() -> None:
    x, y = data()
    twin = make_model()
    expected, _ = run_step(twin, torch_adam(twin), loss_of(twin, x, y), None)
    model = make_model()
    _, grads = value_and_grad(loss_of)(model, x, y)
    stepped, _ = apply_gradients(model, torch_adam(model), grads, None)
    assert_close(values(stepped), values(expected))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_none_gradient_leaves_the_parameter_and_its_state_as_run_step_does(name: str) -> None:
    """The head's bias unused in the first step: None there, as run_step's used flags."""
    make_opt, lr = OPTIMIZERS[name]
    x, y = data()

    def loss_without_head_bias(model: Model) -> torch.Tensor:
        out = torch.tanh(model["hidden"](x)) @ model["head"].weight.T
        return torch.nn.functional.mse_loss(out, y)

    twin = make_model()
    expected, expected_opt = run_step(twin, make_opt(twin), loss_without_head_bias(twin), lr)
    expected, _ = run_step(expected, expected_opt, loss_of(expected, x, y), lr)

    model = make_model()
    params = dp.flatten_parameters(model)
    grads: list[torch.Tensor | None] = list(
        torch.autograd.grad(loss_without_head_bias(model), params[:3])
    )
    model, opt = apply_gradients(model, make_opt(model), [*grads, None], lr)
    assert torch.equal(model["head"].bias, twin["head"].bias)
    _, g = value_and_grad(loss_of)(model, x, y)
    model, _ = apply_gradients(model, opt, g, lr)
    assert_close(values(model), values(expected))


@pytest.mark.parametrize("name", ["GD", "Adam", "ClipGradNorm(Adam)"])
def test_frozen_parameters_gradients_are_not_read(name: str) -> None:
    make_opt, lr = OPTIMIZERS[name]
    x, y = data()
    twin = make_model()
    expected, _ = run_step(twin, make_opt(twin, freeze="hidden.*"), loss_of(twin, x, y), lr)
    model = make_model()
    _, grads = value_and_grad(loss_of)(model, x, y)
    flat: list[torch.Tensor | None] = list(flatten_like(model, grads))
    flat[0] = flat[1] = None  # frozen: never read
    stepped, _ = apply_gradients(model, make_opt(model, freeze="hidden.*"), flat, lr)
    assert_close(values(stepped), values(expected))


def test_accumulating_four_micro_batches_equals_one_step_on_the_whole_batch() -> None:
    x, y = data()
    model = make_model()
    whole, _ = run_step(model, Adam.init(model), loss_of(model, x, y), 1e-2)
    # the docs recipe (docs/training.md)
    grads = [
        value_and_grad(loss_of)(model, xb, yb)[1]
        for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True)
    ]
    mean = [sum(gs) / 4 for gs in zip(*(flatten_like(model, g) for g in grads), strict=True)]
    accumulated, _ = apply_gradients(model, Adam.init(model), mean, 1e-2)
    assert_close(values(accumulated), values(whole))


def test_apply_gradients_refuses_what_does_not_fit() -> None:
    model = make_model()
    params = dp.flatten_parameters(model)
    zeros = [torch.zeros_like(p) for p in params]
    with pytest.raises(dp.DiffprogError, match="3 gradients for a model with 4 parameters"):
        apply_gradients(model, Adam.init(model), zeros[:3], 0.1)
    with pytest.raises(ValueError, match="gradient of parameter 1 has shape"):
        apply_gradients(model, Adam.init(model), [zeros[0], zeros[0], *zeros[2:]], 0.1)
    with pytest.raises(dp.DiffprogError, match="None for the gradient of every parameter"):
        apply_gradients(model, Adam.init(model), [None] * 4, 0.1)
    with pytest.raises(dp.DiffprogError, match="structure"):
        apply_gradients(model, Adam.init(model), {"hidden": zeros[0]}, 0.1)
    with pytest.raises(ValueError, match="needs a learning rate"):
        apply_gradients(model, Adam.init(model), zeros, None)


def test_non_finite_gradients_raise_or_skip() -> None:
    model = make_model()
    opt = Adam.init(model)
    grads = [torch.zeros_like(p) for p in dp.flatten_parameters(model)]
    grads[2] = grads[2].clone().fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="head.weight"):
        apply_gradients(model, opt, grads, 0.1)
    assert apply_gradients(model, opt, grads, 0.1, on_nonfinite="skip") == (model, opt)


def test_a_donated_optimizer_refuses_to_step_again_after_apply_gradients() -> None:
    model = make_model()
    opt = Adam.init(model, donate=True)
    grads = [torch.ones_like(p) for p in dp.flatten_parameters(model)]
    _, new_opt = apply_gradients(model, opt, grads, 0.1)
    assert new_opt.count == 1
    with pytest.raises(dp.DiffprogError, match="donate=True and has already stepped"):
        apply_gradients(model, opt, grads, 0.1)


def test_two_different_gradients_for_one_tied_parameter_are_refused() -> None:
    # Found by review: flatten_like kept the first and silently dropped the second.
    lin = dp.sample(LinearSpec(2, 2), generator=torch.Generator().manual_seed(0))
    model = {"enc": lin, "dec": lin}
    ga = dp.replace_parameters(lin, [torch.ones(2, 2), torch.ones(2)])
    gb = dp.replace_parameters(lin, [10 * torch.ones(2, 2), 10 * torch.ones(2)])
    with pytest.raises(dp.DiffprogError, match=r"at enc.weight and dec.weight"):
        apply_gradients(model, GD(), {"enc": ga, "dec": gb}, 1.0)
    # the same tensors at both places (as value_and_grad gives them) are one gradient
    new, _ = apply_gradients(model, GD(), {"enc": ga, "dec": ga}, 1.0)
    assert new["enc"] is new["dec"]
    assert torch.equal(new["enc"].weight, lin.weight - 1.0)
