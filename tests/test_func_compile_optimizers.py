"""compile_step with the pure optimizers beyond those of tests/test_func_compile.py: each that
compiles with ``fullgraph=True`` gives run_step's numbers, in its donated form.

(NAdam, ASGD and Adafactor, whose state is not shaped as the parameters, are not taken by
compile_step yet: see the report of issue 12's audit.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import diffprog as dp
from diffprog.func import compile_step
from diffprog.nn import LinearSpec, SequentialSpec
from diffprog.optim import (
    GDM,
    Adadelta,
    Adagrad,
    Adamax,
    Lion,
    RAdam,
    RMSprop,
    Rprop,
    run_step,
)

OPTIMIZERS: list[tuple[str, Any]] = [
    (
        "GDM nesterov wd",
        lambda m, d: GDM.init(m, momentum=0.9, nesterov=True, weight_decay=0.1, donate=d),
    ),
    ("RMSprop centered", lambda m, d: RMSprop.init(m, centered=True, momentum=0.5, donate=d)),
    ("Adagrad", lambda m, d: Adagrad.init(m, lr_decay=0.1, weight_decay=0.1, donate=d)),
    ("Adamax maximize", lambda m, d: Adamax.init(m, maximize=True, donate=d)),
    ("Adadelta", lambda m, d: Adadelta.init(m, weight_decay=0.1, donate=d)),
    # beta2 = 0.9: steps 6.. are rectified, so both branches run
    (
        "RAdamW",
        lambda m, d: RAdam.init(
            m, betas=(0.9, 0.9), weight_decay=0.1, decoupled_weight_decay=True, donate=d
        ),
    ),
    ("Rprop", lambda m, d: Rprop.init(m, donate=d)),
    ("Lion", lambda m, d: Lion.init(m, weight_decay=0.1, donate=d)),
]


def mse(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


@pytest.mark.parametrize(("name", "make"), OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_compile_step_matches_run_step_for_more_optimizers(name: str, make: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    spec = SequentialSpec(LinearSpec(4, 8), torch.tanh, LinearSpec(8, 3))
    model = dp.sample(spec, generator=gen)
    x, y = torch.randn(6, 4, generator=gen), torch.randn(6, 3, generator=gen)
    # fullgraph=True, the default; the donated form (its in-place writes through aot_eager's
    # functionalization), against run_step's pure steps. (The pure compiled form shares the
    # optimizer's math and compile_step's bookkeeping with tests/test_func_compile.py.)
    step = compile_step(mse, 0.05, backend="aot_eager")
    ours, ours_opt = model, make(model, True)
    ref, ref_opt = model, make(model, False)
    for _ in range(7):
        ours, ours_opt, loss = step(ours, ours_opt, x, y)
        expected = mse(ref, x, y)
        ref, ref_opt = run_step(ref, ref_opt, expected, 0.05)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    for p, q in zip(dp.flatten_parameters(ours), dp.flatten_parameters(ref), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert ours_opt.count == ref_opt.count == 7
    for kind in type(ref_opt).declaration().state:
        for s, t in zip(getattr(ours_opt, kind), getattr(ref_opt, kind), strict=True):
            torch.testing.assert_close(s, t, rtol=1e-6, atol=1e-7)
