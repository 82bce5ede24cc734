"""Optimizer steps are not differentiable by default: no meta-gradient flows through a step.

``differentiable=True`` makes them so (tests/test_optim_differentiable.py); the default stays
``False``, as torch.optim's. The docs say so (docs/optim.md, docs/autograd.md, README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
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
    apply_updates,
    run_step,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"

PURE: dict[str, Callable[[Any], Any]] = {
    "GD": lambda m: GD(),
    "GDM": lambda m: GDM.init(m, momentum=0.9, nesterov=True),
    "Adam": lambda m: Adam.init(m, weight_decay=0.1),
    "AdamW": lambda m: AdamW.init(m),
    "Adagrad": lambda m: Adagrad.init(m),
    "RMSprop": lambda m: RMSprop.init(m, momentum=0.5, centered=True),
    "Lion": lambda m: Lion.init(m),
    "SGD": lambda m: SGD.init(m, momentum=0.9),
    "NAdam": lambda m: NAdam.init(m, weight_decay=0.1),
    "RAdam": lambda m: RAdam.init(m, decoupled_weight_decay=True, weight_decay=0.1),
    "Adamax": lambda m: Adamax.init(m),
    "Adadelta": lambda m: Adadelta.init(m, weight_decay=0.1),
    "Rprop": lambda m: Rprop.init(m),
    "ASGD": lambda m: ASGD.init(m, t0=0.0),
    "Adafactor": lambda m: Adafactor.init(m, weight_decay=0.1),
    "ClipGradNorm(Adam)": lambda m: ClipGradNorm(Adam.init(m), 0.1),
}


def make_model() -> Linear:
    return dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))


def loss_of(model: Linear) -> torch.Tensor:
    return model(torch.linspace(-1.0, 1.0, 6).reshape(2, 3)).square().sum()


@pytest.mark.parametrize("name", list(PURE))
def test_no_gradient_flows_through_a_step(name: str) -> None:
    model = make_model()
    old = dp.flatten_parameters(model)
    opt = PURE[name](model)
    lr = torch.tensor(0.1, requires_grad=True)  # not even to a learning rate that asks for one
    grads = dp.grad(loss_of(model), old, create_graph=True)
    new_params, _ = opt.step(lr, grads, old)
    assert not any(p.requires_grad or p.grad_fn is not None for p in new_params)
    new_model, _ = run_step(model, opt, loss_of(model), lr)
    assert all(p.is_leaf for p in dp.flatten_parameters(new_model))
    after = loss_of(new_model)
    assert torch.autograd.grad(after, [*old, lr], allow_unused=True) == (None,) * (len(old) + 1)


def test_apply_updates_is_not_differentiable_either() -> None:
    model = make_model()
    old = dp.flatten_parameters(model)
    grads = dp.grad(loss_of(model), old, create_graph=True)
    new_model = apply_updates(model, [-0.1 * g for g in grads])
    after = loss_of(new_model)
    assert torch.autograd.grad(after, old, allow_unused=True) == (None,) * len(old)


def test_a_hand_written_inner_step_does_carry_the_meta_gradient() -> None:
    """The way the docs give instead: p - lr * g with create_graph and replace_parameters,
    checked against torch.func on the same function."""
    model = make_model()
    old = dp.flatten_parameters(model)

    def outer_loss(params: list[torch.Tensor]) -> torch.Tensor:
        current = dp.replace_parameters(model, params)
        inner = torch.autograd.grad(loss_of(current), params, create_graph=True)
        return loss_of(
            dp.replace_parameters(model, [p - 0.1 * g for p, g in zip(params, inner, strict=True)])
        )

    meta = dp.grad(outer_loss(old), old)
    expected = torch.func.grad(outer_loss)([p.detach().requires_grad_() for p in old])
    torch.testing.assert_close(meta, list(expected))


def test_the_docs_say_steps_are_not_differentiable_by_default() -> None:
    optim = (DOCS / "optim.md").read_text()
    assert "**Steps are not differentiable by default.**" in optim
    assert "### Differentiable steps" in optim
    assert "are **not differentiable**" in (DOCS / "autograd.md").read_text()
    assert "with `differentiable=True` a step is itself" in (DOCS.parent / "README.md").read_text()


@pytest.mark.parametrize("name", [n for n in PURE if n not in ("ClipGradNorm(Adam)",)])
def test_differentiable_defaults_to_false(name: str) -> None:
    assert PURE[name](make_model()).differentiable is False
