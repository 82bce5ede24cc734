"""run_step refuses a step that cannot train anything, on every route and for every optimizer.

* A loss that does not reach the model (computed under ``torch.no_grad()`` or from another
  model): the pure path, ``TorchOptimizer`` (tensor loss and closure, LBFGS included) and a
  wrapper around it refuse it with the same error, and leave the parameters, their ``.grad``,
  the optimizer state, the scheduler and the count as they were.
* A model with nothing to train (no Parameters: specs where layers belong, constants, a plain
  object; or every parameter frozen): a clear ``DiffprogError`` for every optimizer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import diffprog as dp
from diffprog.nn import Embedding, Linear, LinearSpec
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
    NothingToTrainError,
    RAdam,
    RMSprop,
    Rprop,
    TorchOptimizer,
    run_step,
)

Model = dict[str, Linear]
DISCONNECTED = "does not depend on any parameter this step trains"


def make_model(seed: int = 0) -> Model:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden": dp.sample(LinearSpec(3, 5), generator=gen),
        "head": dp.sample(LinearSpec(5, 1), generator=gen),
    }


def loss_of(model: Model) -> torch.Tensor:
    x = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)
    return model["head"](torch.tanh(model["hidden"](x))).square().mean()


def step_lr(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)


def plateau(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0)


# Every route into a step: (optimizer factory, lr, whether the loss is passed as a closure).
ROUTES: dict[str, tuple[Callable[[Model], Any], float | None, bool]] = {
    "Adam": (lambda m: Adam.init(m), 1e-2, False),
    "GDM(freeze head.bias)": (lambda m: GDM.init(m, momentum=0.9, freeze="head.bias"), 0.1, False),
    "ClipGradNorm(Adam)": (lambda m: ClipGradNorm(Adam.init(m), 1.0), 1e-2, False),
    "TorchOptimizer(SGD, StepLR)": (
        lambda m: TorchOptimizer.init(m, torch.optim.SGD, lr=0.1, momentum=0.9, scheduler=step_lr),
        None,
        False,
    ),
    "TorchOptimizer(Adam fused)": (
        lambda m: TorchOptimizer.init(m, torch.optim.Adam, fused=True),
        1e-2,
        False,
    ),
    "TorchOptimizer(Adam, plateau, freeze)": (
        lambda m: TorchOptimizer.init(
            m, torch.optim.Adam, lr=0.1, freeze="hidden.bias", scheduler=plateau
        ),
        None,
        False,
    ),
    "ClipGradNorm(TorchOptimizer(SGD, StepLR))": (
        lambda m: ClipGradNorm(
            TorchOptimizer.init(m, torch.optim.SGD, lr=0.1, scheduler=step_lr), 1.0
        ),
        None,
        False,
    ),
    "TorchOptimizer(SGD) closure": (
        lambda m: TorchOptimizer.init(m, torch.optim.SGD, lr=0.1, scheduler=step_lr),
        None,
        True,
    ),
    "TorchOptimizer(LBFGS) closure": (
        lambda m: TorchOptimizer.init(m, torch.optim.LBFGS, lr=0.5, max_iter=4),
        None,
        True,
    ),
}


def no_grad_loss(model: Model) -> torch.Tensor:
    with torch.no_grad():
        return loss_of(model)


def other_model_loss(model: Model) -> torch.Tensor:
    return loss_of(make_model(seed=7))


BAD_LOSSES: dict[str, Callable[[Model], torch.Tensor]] = {
    "under no_grad": no_grad_loss,
    "of another model": other_model_loss,
    "a constant": lambda model: torch.tensor(0.5),
}


def torch_optimizers(opt: Any) -> list[Any]:
    """The TorchOptimizer inside ``opt`` (itself or a wrapper's inner one), if any."""
    inner = getattr(opt, "inner", opt)
    return [inner] if isinstance(inner, TorchOptimizer) else []


def snapshot(model: Model, opt: Any) -> dict[str, Any]:
    """Everything a refused step must leave as it was, copied."""
    found: dict[str, Any] = {
        "values": [p.detach().clone() for p in dp.flatten_parameters(model)],
        "objects": [id(p) for p in dp.flatten_parameters(model)],
        "grads": [p.grad for p in dp.flatten_parameters(model)],
        "count": getattr(opt, "count", None),
    }
    for t in torch_optimizers(opt):
        found["torch_state"] = copy.deepcopy(t.optimizer.state_dict())
        found["lrs"] = [g["lr"] for g in t.optimizer.param_groups]
        if t.scheduler is not None:
            found["scheduler"] = copy.deepcopy(t.scheduler.state_dict())
    return found


def assert_same_state(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b or (a != a and b != b)  # nan == nan for a plateau's best


@pytest.mark.parametrize("bad", list(BAD_LOSSES))
@pytest.mark.parametrize("route", list(ROUTES))
def test_a_loss_that_does_not_reach_the_model_is_refused_and_nothing_moves(
    route: str, bad: str
) -> None:
    make, lr, as_closure = ROUTES[route]
    model = make_model()
    opt = make(model)
    first: Any = (lambda: loss_of(model)) if as_closure else loss_of(model)
    model, opt = run_step(model, opt, first, lr)  # some state and a moved schedule
    for p in dp.flatten_parameters(model):  # a user's own .grad must survive a refused step
        p.grad = torch.full_like(p, 7.0)
    before = snapshot(model, opt)
    loss: Any = (lambda: BAD_LOSSES[bad](model)) if as_closure else BAD_LOSSES[bad](model)
    with pytest.raises(dp.DiffprogError, match=DISCONNECTED):
        run_step(model, opt, loss, lr)
    assert_same_state(snapshot(model, opt), before)
    # and the optimizer still takes a correct step afterwards
    for p in dp.flatten_parameters(model):
        p.grad = None
    good: Any = (lambda: loss_of(model)) if as_closure else loss_of(model)
    run_step(model, opt, good, lr)


@pytest.mark.parametrize("route", [r for r in ROUTES if "TorchOptimizer" in r])
def test_torch_optimizer_refuses_with_exactly_the_pure_paths_error(route: str) -> None:
    make, lr, as_closure = ROUTES[route]
    model = make_model()
    with torch.no_grad():
        frozen_loss = loss_of(model)
    with pytest.raises(dp.DiffprogError) as pure:
        run_step(model, Adam.init(model), frozen_loss, 1e-2)
    opt = make(model)
    loss: Any = (lambda: frozen_loss) if as_closure else frozen_loss
    with pytest.raises(dp.DiffprogError) as ours:
        run_step(model, opt, loss, lr)
    assert type(ours.value) is type(pure.value)
    assert str(ours.value) == str(pure.value)


def test_a_refused_lbfgs_closure_does_not_step_the_scheduler_or_count() -> None:
    """The reported case: before, LBFGS saw zero gradients, returned early, and the scheduler
    and count moved for a step that trained nothing."""
    model = make_model()
    opt = TorchOptimizer.init(model, torch.optim.LBFGS, lr=0.5, scheduler=step_lr)
    with pytest.raises(dp.DiffprogError, match=DISCONNECTED):
        run_step(model, opt, lambda: no_grad_loss(model), None)
    assert opt.count == 0
    assert opt.optimizer.param_groups[0]["lr"] == 0.5
    assert opt.scheduler.last_epoch == 0


# --- nothing to train -------------------------------------------------------------------------


class Untyped(dp.Parameterized):
    """Fields without a layer type: a spec there is allowed at construction."""

    first: Any
    second: Any


def constant_embedding() -> Embedding:
    return Embedding.from_pretrained(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))


NOTHING: dict[str, tuple[Callable[[], Any], str]] = {
    "specs in untyped fields": (
        lambda: Untyped(LinearSpec(3, 4), LinearSpec(4, 1)),
        r"no Parameters.*model\.first holds a LinearSpec.*sample\(LinearSpec\(\.\.\.\)\)",
    ),
    "specs in a dict": (
        lambda: {"encoder": [LinearSpec(3, 4)]},
        r"no Parameters.*model\['encoder'\]\[0\] holds a LinearSpec",
    ),
    "a spec as the model": (lambda: LinearSpec(3, 4), r"no Parameters.*it is a LinearSpec"),
    "constants only": (
        lambda: {"w": torch.ones(3), "table": constant_embedding()},
        r"no Parameters.*Did you put specs where layers belong\? sample\(\.\.\.\) them",
    ),
    "a plain object": (lambda: object(), r"model \(object\) has no Parameters"),
    "every parameter frozen": (make_model, r"every parameter of the model is frozen"),
}

# name: (factory taking freeze=..., lr, the optimizer the message names)
OPTIMIZERS: dict[str, tuple[Callable[..., Any], float | None, str]] = {
    "GD": (lambda m, **kw: GD.init(m, **kw), 0.1, "GD"),
    "GDM": (lambda m, **kw: GDM.init(m, momentum=0.9, **kw), 0.1, "GDM"),
    "Adam": (lambda m, **kw: Adam.init(m, **kw), 1e-2, "Adam"),
    "AdamW": (lambda m, **kw: AdamW.init(m, **kw), 1e-2, "AdamW"),
    "Adagrad": (lambda m, **kw: Adagrad.init(m, **kw), 1e-2, "Adagrad"),
    "RMSprop": (lambda m, **kw: RMSprop.init(m, **kw), 1e-2, "RMSprop"),
    "Lion": (lambda m, **kw: Lion.init(m, **kw), 1e-3, "Lion"),
    "SGD": (lambda m, **kw: SGD.init(m, momentum=0.9, **kw), 0.1, "SGD"),
    "NAdam": (lambda m, **kw: NAdam.init(m, **kw), 1e-2, "NAdam"),
    "RAdam": (lambda m, **kw: RAdam.init(m, **kw), 1e-2, "RAdam"),
    "Adamax": (lambda m, **kw: Adamax.init(m, **kw), 1e-2, "Adamax"),
    "Adadelta": (lambda m, **kw: Adadelta.init(m, **kw), 1.0, "Adadelta"),
    "Rprop": (lambda m, **kw: Rprop.init(m, **kw), 1e-2, "Rprop"),
    "ASGD": (lambda m, **kw: ASGD.init(m, **kw), 1e-2, "ASGD"),
    "Adafactor": (lambda m, **kw: Adafactor.init(m, **kw), 1e-2, "Adafactor"),
    "ClipGradNorm(Adam)": (
        lambda m, **kw: ClipGradNorm(Adam.init(m, **kw), 1.0),
        1e-2,
        "ClipGradNorm",
    ),
    "TorchOptimizer(SGD)": (
        lambda m, **kw: TorchOptimizer.init(m, torch.optim.SGD, **kw),
        0.1,
        "SGD",
    ),
    "TorchOptimizer(Adam)": (
        lambda m, **kw: TorchOptimizer.init(m, torch.optim.Adam, **kw),
        None,
        "Adam",
    ),
    "ClipGradNorm(TorchOptimizer(SGD))": (
        lambda m, **kw: ClipGradNorm(TorchOptimizer.init(m, torch.optim.SGD, lr=0.1, **kw), 1.0),
        None,
        "SGD",  # the inner TorchOptimizer.init refuses first
    ),
}


def attempt_step(make: Callable[..., Any], model: Any, lr: float | None, frozen: bool) -> None:
    # TorchOptimizer.init refuses already (torch.optim cannot be built over no parameters);
    # the pure optimizers are values that may exist, and run_step refuses the step.
    opt = make(model, freeze="*") if frozen else make(model)
    loss = torch.tensor(2.0, requires_grad=True) * 3
    run_step(model, opt, loss, lr)


@pytest.mark.parametrize("case", list(NOTHING))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_model_with_nothing_to_train_is_refused_by_every_optimizer(name: str, case: str) -> None:
    make, lr, owner = OPTIMIZERS[name]
    build, expected = NOTHING[case]
    model = build()
    with pytest.raises(NothingToTrainError, match=expected) as raised:
        attempt_step(make, model, lr, frozen=case == "every parameter frozen")
    assert isinstance(raised.value, dp.DiffprogError)
    assert isinstance(raised.value, ValueError)  # TorchOptimizer.init raised ValueError before
    assert f"so {owner} has nothing to train" in str(raised.value)


def test_plain_gd_without_init_is_refused_too() -> None:
    """GD() needs no model: the refusal comes from run_step itself (it crashed in torch)."""
    with pytest.raises(NothingToTrainError, match="has no Parameters"):
        run_step(Untyped(LinearSpec(3, 4), 1), GD(), torch.tensor(1.0, requires_grad=True) * 2, 0.1)


def test_a_torch_optimizer_given_a_model_without_parameters_is_refused() -> None:
    model = make_model()
    opt = TorchOptimizer.init(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(dp.DiffprogError):
        run_step({"w": torch.ones(2)}, opt, torch.tensor(1.0, requires_grad=True) * 2, None)
    assert opt.count == 0


def test_a_layer_with_a_sample_method_is_not_taken_for_a_spec() -> None:
    class Generative(dp.Parameterized):
        scale: Any

        def sample(self, **kwargs: Any) -> torch.Tensor:
            return torch.randn(2) * self.scale

    with pytest.raises(NothingToTrainError) as raised:
        run_step({"vae": Generative(2.0)}, GD(), torch.tensor(1.0, requires_grad=True) * 2, 0.1)
    assert "holds" not in str(raised.value)
    assert "Did you put specs where layers belong?" in str(raised.value)


def test_a_spec_is_found_past_a_set() -> None:
    model = {"tags": frozenset({"a", "b"}), "head": [3, LinearSpec(2, 1)]}
    with pytest.raises(NothingToTrainError, match=r"model\['head'\]\[1\] holds a LinearSpec"):
        run_step(model, GD(), torch.tensor(1.0, requires_grad=True) * 2, 0.1)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip", "ignore"])
@pytest.mark.parametrize(
    "make",
    [
        lambda m: Adam.init(m, freeze="head.*"),
        lambda m: TorchOptimizer.init(m, torch.optim.Adam, lr=0.1, freeze="head.*"),
    ],
    ids=["Adam", "TorchOptimizer(Adam)"],
)
def test_a_loss_reaching_only_frozen_parameters_is_refused_whatever_on_nonfinite_says(
    make: Callable[[Model], Any], on_nonfinite: Any
) -> None:
    model = make_model()
    opt = make(model)
    loss = model["head"].weight.sum()  # only the frozen head
    with pytest.raises(dp.DiffprogError, match=DISCONNECTED):
        run_step(model, opt, loss, 0.1, on_nonfinite=on_nonfinite)
    assert opt.count == 0
