"""Training a stacked ensemble in one step with every pure optimizer (docs/transformations.md,
"Ensembles and per-example gradients"): an element-by-element optimizer gives each member the
steps it would take alone; Adafactor and a global-norm clip couple the members, as the docs
say (train such members apart)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import diffprog as dp
from diffprog.func import stack, unstack
from diffprog.nn import MLPSpec
from diffprog.optim import (
    ASGD,
    GD,
    GDM,
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
    run_step,
)

SPEC = MLPSpec([2, 8, 1], activation=torch.tanh)
STEPS = 5

ELEMENTWISE: dict[str, Any] = {
    "GD": lambda m: GD(),
    "GDM": lambda m: GDM.init(m, momentum=0.9, nesterov=True, weight_decay=0.1),
    "Adam": lambda m: Adam.init(m, amsgrad=True),
    "AdamW": AdamW.init,
    "RMSprop": lambda m: RMSprop.init(m, centered=True, momentum=0.5),
    "Adagrad": Adagrad.init,
    "Adamax": Adamax.init,
    "Adadelta": Adadelta.init,
    "NAdam": NAdam.init,
    # beta2 = 0.9: the last steps are rectified
    "RAdam": lambda m: RAdam.init(m, betas=(0.9, 0.9)),
    "Rprop": Rprop.init,
    "ASGD": lambda m: ASGD.init(m, t0=1.0),
    "Lion": Lion.init,
}
COUPLED: dict[str, Any] = {
    "Adafactor": Adafactor.init,
    "ClipGradNorm(Adam)": lambda m: ClipGradNorm(Adam.init(m), 0.1),
}


def _mse(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def _worst_difference(make: Any) -> float:
    """The largest difference between a member trained in the ensemble and trained alone."""
    members = [dp.sample(SPEC, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 16, 2, generator=gen), torch.randn(3, 16, 1, generator=gen)
    ensemble = stack(members)
    optimizer = make(ensemble)
    for _ in range(STEPS):
        loss = torch.func.vmap(_mse)(ensemble, x, y).sum()
        ensemble, optimizer = run_step(ensemble, optimizer, loss, 0.05)
    worst = 0.0
    for i, member in enumerate(unstack(ensemble)):
        alone, alone_opt = members[i], make(members[i])
        for _ in range(STEPS):
            alone, alone_opt = run_step(alone, alone_opt, _mse(alone, x[i], y[i]), 0.05)
        for p, q in zip(dp.flatten_parameters(member), dp.flatten_parameters(alone), strict=True):
            worst = max(worst, float((p - q).detach().abs().max()))
    return worst


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_an_elementwise_optimizer_steps_each_member_as_alone(name: str) -> None:
    assert _worst_difference(ELEMENTWISE[name]) < 1e-5


@pytest.mark.parametrize("name", list(COUPLED))
def test_adafactor_and_a_global_clip_couple_the_members_as_documented(name: str) -> None:
    assert _worst_difference(COUPLED[name]) > 1e-3
