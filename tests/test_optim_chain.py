"""Gradient transforms compose in front of any optimizer (optax's chain): clipping by global
norm and by value, against torch.nn.utils' clip_grad_norm_/clip_grad_value_ + torch.optim."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import diffprog as dp
from diffprog.nn import Linear, LinearSpec
from diffprog.optim import (
    GD,
    GDM,
    SGD,
    Adam,
    Chain,
    ClipByGlobalNorm,
    ClipGradNorm,
    Lion,
    TorchOptimizer,
    apply_gradients,
    chain,
    clip_by_global_norm,
    clip_by_value,
    clip_grad_value,
    run_step,
)

Model = dict[str, Linear]


def make_model(seed: int = 0) -> Model:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden": dp.sample(LinearSpec(3, 6), generator=gen),
        "head": dp.sample(LinearSpec(6, 1), generator=gen),
    }


def loss_of(model: Model | torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(model, torch.nn.Module):
        out = model(x)
    else:
        out = model["head"](torch.tanh(model["hidden"](x)))
    return torch.nn.functional.mse_loss(out, y) * 50  # large gradients: the clips bite


def module_of(model: Model) -> torch.nn.Sequential:
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    with torch.no_grad():
        for p, q in zip(net.parameters(), dp.flatten_parameters(model), strict=True):
            p.copy_(q)
    return net


def norm_clip(params: Any) -> None:
    torch.nn.utils.clip_grad_norm_(params, 0.5)


def value_clip(params: Any) -> None:
    torch.nn.utils.clip_grad_value_(params, 0.05)


def both_clips(params: Any) -> None:
    params = list(params)
    value_clip(params)
    norm_clip(params)


# name: (our transforms, torch's in-place clipping of the .grads)
CLIPS: dict[str, tuple[Callable[[], list[Any]], Callable[[Any], None]]] = {
    "norm": (lambda: [clip_by_global_norm(0.5)], norm_clip),
    "value": (lambda: [clip_by_value(0.05)], value_clip),
    "value, norm": (lambda: [clip_by_value(0.05), clip_by_global_norm(0.5)], both_clips),
}

# name: (our optimizer, torch's, lr for run_step)
OPTIMIZERS: dict[str, tuple[Callable[[Model], Any], Callable[[Any], Any], float | None]] = {
    "Adam": (lambda m: Adam.init(m), lambda ps: torch.optim.Adam(ps, lr=1e-2), 1e-2),
    "GDM": (
        lambda m: GDM.init(m, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
        1e-2,
    ),
    "TorchOptimizer(Adam)": (
        lambda m: TorchOptimizer.init(m, torch.optim.Adam, lr=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        None,
    ),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip_name", list(CLIPS))
def test_any_clip_in_front_of_any_optimizer_matches_torch(clip_name: str, opt_name: str) -> None:
    transforms, torch_clip = CLIPS[clip_name]
    make_ours, make_theirs, lr = OPTIMIZERS[opt_name]
    model = make_model()
    net = module_of(model)
    reference = make_theirs(net.parameters())
    opt = chain(*transforms(), make_ours(model))
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        x = torch.randn(16, 3, generator=gen)
        y = x.sum(dim=1, keepdim=True).sin()
        reference.zero_grad()
        loss_of(net, x, y).backward()
        torch_clip(net.parameters())
        reference.step()
        model, opt = run_step(model, opt, loss_of(model, x, y), lr)
    assert isinstance(opt, Chain) and opt.count == 20
    assert_close(dp.flatten_parameters(model), list(net.parameters()))


def test_clip_grad_norm_is_the_chain_of_one_clip_not_a_step_of_its_own() -> None:
    assert "step" not in vars(ClipGradNorm) and "_diffprog_step" not in vars(ClipGradNorm)
    opt = ClipGradNorm(Lion.init(make_model()), max_norm=0.3, norm_type=1.0)
    assert repr(opt.transforms) == repr((ClipByGlobalNorm(0.3, 1.0, False),))
    model, x = make_model(), torch.randn(8, 3)
    a, _ = run_step(
        model, ClipGradNorm(Lion.init(model), 0.3, 1.0), loss_of(model, x, x[:, :1]), 1e-2
    )
    b, _ = run_step(
        model,
        chain(clip_by_global_norm(0.3, 1.0), Lion.init(model)),
        loss_of(model, x, x[:, :1]),
        1e-2,
    )
    assert_close(dp.flatten_parameters(a), dp.flatten_parameters(b), rtol=0, atol=0)


def test_frozen_and_unused_parameters_are_not_transformed_nor_counted() -> None:
    """As clip_grad_norm_ over the parameters torch.optim steps (a .grad that is None)."""
    model = make_model()
    net = module_of(model)
    trained = [net[0].weight, net[2].weight]  # hidden.bias frozen, head.bias unused
    reference = torch.optim.Adam(trained, lr=1e-2)
    opt: Any = chain(
        clip_by_value(0.05), clip_by_global_norm(0.1), Adam.init(model, freeze="hidden.bias")
    )
    x = torch.randn(16, 3)

    def loss(m: Any) -> torch.Tensor:  # does not reach the head's bias
        hidden = torch.tanh(torch.nn.functional.linear(x, m["hidden"].weight, m["hidden"].bias))
        return (hidden @ m["head"].weight.T).pow(2).sum()

    for _ in range(5):
        reference.zero_grad()
        hidden = torch.tanh(net[0](x))
        (hidden @ net[2].weight.T).pow(2).sum().backward()
        torch.nn.utils.clip_grad_value_(trained, 0.05)
        torch.nn.utils.clip_grad_norm_(trained, 0.1)
        reference.step()
        model, opt = run_step(model, opt, loss(model), 1e-2)
    assert_close(dp.flatten_parameters(model), list(net.parameters()))


class _Counting(dp.Parameterized):
    """A transform with state: it counts its calls and scales by 1 / calls."""

    calls: int = 0

    def transform(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> Any:
        calls = self.calls + 1
        return [g / calls for g in grads], _Counting(calls)


def test_a_transform_with_state_advances_and_the_old_chain_is_unchanged() -> None:
    model, x = make_model(), torch.randn(8, 3)
    opt = chain(_Counting(), Adam.init(model))
    model2, opt2 = run_step(model, opt, loss_of(model, x, x[:, :1]), 1e-2)
    _, opt3 = run_step(model2, opt2, loss_of(model2, x, x[:, :1]), 1e-2)
    assert (opt.transforms[0].calls, opt2.transforms[0].calls, opt3.transforms[0].calls) == (
        0,
        1,
        2,
    )
    assert (opt.count, opt2.count, opt3.count) == (0, 1, 2)


def test_chain_refuses_parts_in_the_wrong_place() -> None:
    with pytest.raises(TypeError, match="optimizer comes last"):
        chain(Adam.init(make_model()), clip_by_value(1.0))
    with pytest.raises(TypeError, match="must be the optimizer"):
        chain(clip_by_value(1.0))
    with pytest.raises(TypeError, match="needs an optimizer"):
        chain()
    # found by review: the class instead of a value failed later with an unrelated error
    with pytest.raises(TypeError, match=r"got Adam \(a class\): build it first"):
        chain(clip_by_value(1.0), Adam)
    with pytest.raises(TypeError, match="an optimizer value"):
        chain(clip_by_value(1.0), "Adam")


def test_apply_gradients_goes_through_the_chain() -> None:
    model, x = make_model(), torch.randn(8, 3)
    expected, _ = run_step(
        model, chain(clip_by_value(0.01), Adam.init(model)), loss_of(model, x, x[:, :1]), 1e-2
    )
    grads = torch.autograd.grad(loss_of(model, x, x[:, :1]), dp.flatten_parameters(model))
    got, _ = apply_gradients(model, chain(clip_by_value(0.01), Adam.init(model)), grads, 1e-2)
    assert_close(dp.flatten_parameters(got), dp.flatten_parameters(expected))


def test_clip_grad_value_is_torchs_out_of_place() -> None:
    grads = [torch.randn(4, 3), torch.randn(5)]
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_value_(ps, 0.3)
    before = [g.clone() for g in grads]
    assert_close(clip_grad_value(grads, 0.3), [p.grad for p in ps], rtol=0, atol=0)
    assert_close(grads, before, rtol=0, atol=0)


class _BadTransform(dp.Parameterized):
    """A user transform with a bug: what it returns does not fit the parameters."""

    kind: str

    def transform(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> Any:
        if self.kind == "row mean":  # forgot keepdim
            return [g.mean(0) for g in grads], self
        if self.kind == "transposed":
            return [g.reshape(g.shape[::-1]) for g in grads], self
        if self.kind == "none":
            return [None for _ in grads], self
        if self.kind == "float64":
            return [g.double() for g in grads], self
        return grads[:-1], self  # "too few"


@pytest.mark.parametrize("kind", ["row mean", "transposed", "none", "float64", "too few"])
@pytest.mark.parametrize(
    "inner",
    [
        lambda p: GD(),
        lambda p: Adam.init(p),
        lambda p: Adam.init(p, donate=True),
        lambda p: SGD.init(p),
        lambda p: TorchOptimizer.init(p, torch.optim.Adam, fused=True),
    ],
    ids=["GD", "Adam", "Adam-donate", "SGD", "TorchOptimizer"],
)
@pytest.mark.parametrize("route", ["run_step", "step"])
def test_what_a_transform_returns_is_checked_on_every_route(
    kind: str, inner: Callable[[Any], Any], route: str
) -> None:
    # Under run_step the gradients come from autograd and are not checked again; a transform's
    # output must be, or a fused kernel reads past a tensor's end (found by review: garbage
    # values of 1e14 in the new parameters).
    p = [dp.make_independent(torch.zeros(3, 4)), dp.make_independent(torch.zeros(2, 5))]
    opt = chain(_BadTransform(kind), inner(p))
    loss = (p[0] * torch.arange(12.0).reshape(3, 4)).sum() + p[1].sum()
    grads = dp.grad(loss, p)

    def take_the_step() -> object:
        return run_step(p, opt, loss, 1.0) if route == "run_step" else opt.step(1.0, grads, p)

    with pytest.raises((ValueError, TypeError, dp.DiffprogError), match="_BadTransform"):
        take_the_step()
