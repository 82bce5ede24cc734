"""No reference cycle keeps a model alive after a traversal, an optimizer's init or a step.

Memory is part of the contract of models as values: an old model must go as soon as nothing
refers to it, not whenever Python's cyclic garbage collector next runs (a whole copy of a large
model's parameters, in the memory benchmark). These tests run with the collector off.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import diffprog as dp
import diffprog.optim as optim
from diffprog.nn import BatchNorm1dSpec, LinearSpec, Sequential, training

PURE = sorted(
    (
        cls
        for cls in vars(optim).values()
        if isinstance(cls, type)
        and issubclass(cls, optim.PureOptimizer)
        and cls is not optim.PureOptimizer
    ),
    key=lambda cls: cls.__name__,
)


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def make_model() -> Any:
    gen = torch.Generator().manual_seed(0)
    return Sequential(
        dp.sample(LinearSpec(3, 4), generator=gen), dp.sample(LinearSpec(4, 2), generator=gen)
    )


@pytest.mark.usefixtures("no_cyclic_gc")
def test_traversals_leave_no_cycle_holding_the_model() -> None:
    model = make_model()
    first = weakref.ref(dp.flatten_parameters(model)[0])
    list(dp.walk(model))
    dp.named_parameters(model)
    repr(model)
    dp.replace_parameters(model, [p.detach() for p in dp.flatten_parameters(model)])
    del model
    assert first() is None


@pytest.mark.usefixtures("no_cyclic_gc")
@pytest.mark.parametrize("cls", PURE, ids=lambda cls: cls.__name__)
def test_init_and_a_step_leave_no_cycle_holding_the_old_model(cls: Any) -> None:
    model = make_model()
    first = weakref.ref(dp.flatten_parameters(model)[0])
    opt = cls.init(model)
    loss = model(torch.ones(2, 3)).square().sum()
    new_model, opt = optim.run_step(model, opt, loss, 1e-3)
    del model, loss
    assert first() is None
    assert new_model is not None and opt is not None


@pytest.mark.usefixtures("no_cyclic_gc")
def test_a_training_pass_with_state_updates_leaves_no_cycle_holding_the_old_model() -> None:
    gen = torch.Generator().manual_seed(0)
    model = Sequential(
        dp.sample(LinearSpec(3, 4), generator=gen), dp.sample(BatchNorm1dSpec(4), generator=gen)
    )
    # The Linear layer is shared with the new model (unchanged parts are); the old BatchNorm
    # (whose running statistics the pass updated) and the old Sequential must go.
    old_model, old_norm = weakref.ref(model), weakref.ref(model.layers[1])
    _, new_model = training(lambda m: m(torch.randn(5, 3, generator=gen)).sum(), model)
    del model
    assert old_model() is None and old_norm() is None
    assert new_model is not None
