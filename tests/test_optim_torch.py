"""TorchOptimizer: parity with torch.optim itself, the lr protocol, and the documented aliasing."""

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
    GD,
    ClipGradNorm,
    NonFiniteError,
    TorchOptimizer,
    fold_loop,
    run_step,
    select,
    value_and_grad,
)

Model = tuple[Linear, Linear]


def make_model(seed: int = 0) -> Model:
    gen = torch.Generator().manual_seed(seed)
    return (
        dp.sample(LinearSpec(4, 8), generator=gen),
        dp.sample(LinearSpec(8, 1), generator=gen),
    )


def forward(model: Model, x: torch.Tensor) -> torch.Tensor:
    first, second = model
    return second(torch.tanh(first(x)))


def torch_copy(model: Model) -> torch.nn.Sequential:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        for ours, theirs in zip(model, [net[0], net[2]], strict=True):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return net


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)


def loss_of(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(forward(model, x), y)


def values(model: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in dp.flatten_parameters(model)]


CONFIGS = [
    (torch.optim.Adam, {"lr": 1e-2, "fused": True}),
    (torch.optim.Adam, {"lr": 1e-2, "foreach": True, "weight_decay": 0.1}),
    (torch.optim.AdamW, {"lr": 1e-2, "fused": True}),
    (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    (torch.optim.RMSprop, {"lr": 1e-3, "foreach": False}),
    (torch.optim.Adagrad, {"lr": 1e-2}),
]


@pytest.mark.parametrize(("cls", "options"), CONFIGS, ids=lambda c: getattr(c, "__name__", ""))
def test_matches_torch_optim_on_a_module(cls: type[torch.optim.Optimizer], options: Any) -> None:
    model = make_model()
    net = torch_copy(model)
    reference = cls(net.parameters(), **options)
    x, y = data()
    opt = TorchOptimizer.init(model, cls, **options)
    for _ in range(20):
        model, opt = run_step(model, opt, loss_of(model, x, y), None)
        reference.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        reference.step()
    assert_close(dp.flatten_parameters(model), list(net.parameters()))


def test_lr_sets_every_group_for_that_step_only() -> None:
    model = make_model()
    net = torch_copy(model)
    x, y = data()
    opt = TorchOptimizer.init(model, torch.optim.Adam, lr=1.0, overrides={"*.bias": {"lr": 2.0}})
    reference = torch.optim.Adam(net.parameters(), lr=0.0)
    for lr in [1e-2, 3e-2, 1e-3]:
        model, opt = run_step(model, opt, loss_of(model, x, y), lr)
        for group in reference.param_groups:
            group["lr"] = lr
        reference.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        reference.step()
    assert_close(dp.flatten_parameters(model), list(net.parameters()))
    assert [g["lr"] for g in opt.optimizer.param_groups] == [1.0, 2.0]


def test_lr_scale_and_schedules() -> None:
    model = make_model()
    x, y = data()
    opt = TorchOptimizer.init(model, torch.optim.SGD, lr=0.0, overrides={"1.*": {"lr_scale": 0.5}})
    seen: list[list[float]] = []

    def schedule(count: int) -> float:
        return 0.1 * (count + 1)

    hook = opt.optimizer.register_step_pre_hook(
        lambda o, args, kwargs: seen.append([g["lr"] for g in o.param_groups])
    )
    for _ in range(3):
        model, opt = run_step(model, opt, loss_of(model, x, y), schedule)
    hook.remove()
    assert opt.count == 3
    expected = [[0.1, 0.05], [0.2, 0.1], [0.3, 0.15]]
    assert [pytest.approx(row) for row in expected] == seen


def test_lr_none_keeps_an_attached_scheduler() -> None:
    model = make_model()
    net = torch_copy(model)
    x, y = data()
    opt = TorchOptimizer.init(
        model,
        torch.optim.SGD,
        lr=0.1,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    )
    reference = torch.optim.SGD(net.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(reference, step_size=2, gamma=0.5)
    for _ in range(5):
        model, opt = run_step(model, opt, loss_of(model, x, y), None)
        reference.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        reference.step()
        schedule.step()
    assert_close(dp.flatten_parameters(model), list(net.parameters()))
    assert opt.optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"] == 0.025


def test_reduce_on_plateau_gets_the_loss() -> None:
    model = make_model()
    x, y = data()
    opt = TorchOptimizer.init(
        model,
        torch.optim.SGD,
        lr=0.1,
        scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    )
    frozen_loss = loss_of(model, x, y).detach()
    for _ in range(3):  # the same loss every time: no improvement, so the lr drops
        loss = loss_of(model, x, y) * 0 + frozen_loss
        model, opt = run_step(model, opt, loss, None)
    assert opt.optimizer.param_groups[0]["lr"] < 0.1


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


def test_lbfgs_with_a_closure_matches_torch() -> None:
    start = torch.tensor([-1.2, 1.0])
    ours = {"xy": dp.make_independent(start.clone())}
    theirs = torch.nn.Parameter(start.clone())
    options = {"lr": 1.0, "max_iter": 20, "line_search_fn": "strong_wolfe"}
    opt = TorchOptimizer.init(ours, torch.optim.LBFGS, **options)
    reference = torch.optim.LBFGS([theirs], **options)

    def closure() -> torch.Tensor:
        reference.zero_grad()
        loss = rosenbrock(theirs)
        loss.backward()
        return loss

    point = ours["xy"]  # updated in place: the closure sees the current values
    for _ in range(3):
        ours, opt = run_step(ours, opt, lambda: rosenbrock(point), None)
        reference.step(closure)
    assert_close(ours["xy"], theirs)
    assert ours["xy"].grad is None


def test_lbfgs_non_finite_later_in_the_step_restores_everything() -> None:
    model = {"xy": dp.make_independent(torch.tensor([-1.2, 1.0]))}
    opt = TorchOptimizer.init(model, torch.optim.LBFGS, lr=1.0, max_iter=5)
    model, opt = run_step(model, opt, lambda: rosenbrock(model["xy"]), None)
    before = values(model)
    state_before = {k: v for k, v in opt.optimizer.state[model["xy"]].items() if k != "d"}
    calls = {"n": 0}

    def poisoned() -> torch.Tensor:
        calls["n"] += 1
        loss = rosenbrock(model["xy"])
        return loss * math.nan if calls["n"] == 2 else loss  # fine first, NaN once moved

    with pytest.raises(NonFiniteError, match="xy"):
        run_step(model, opt, poisoned, None)
    assert calls["n"] == 2
    assert_close(values(model), before)
    assert opt.optimizer.state[model["xy"]]["n_iter"] == state_before["n_iter"]
    calls["n"] = 0
    same, same_opt = run_step(model, opt, poisoned, None, on_nonfinite="skip")
    assert same is model
    assert same_opt is opt
    assert_close(values(model), before)


def test_overrides_and_freeze_select_by_path() -> None:
    model = make_model()
    x, y = data()
    opt = TorchOptimizer.init(
        model,
        torch.optim.AdamW,
        lr=1e-2,
        overrides={select("*.bias"): {"weight_decay": 0.0}},
        freeze="0.weight",
    )
    assert opt.trainable == (False, True, True, True)
    groups = opt.optimizer.param_groups
    assert [len(g["params"]) for g in groups] == [2, 1]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.01]
    frozen = model[0].weight.detach().clone()
    model, opt = run_step(model, opt, loss_of(model, x, y), None)
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight not in opt.optimizer.state
    assert len(opt.optimizer.state) == 3


def test_bad_options_are_reported() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="momentum"):
        TorchOptimizer.init(model, torch.optim.Adam, overrides={"*.bias": {"momentum": 0.9}})
    with pytest.raises(ValueError, match="frozen"):
        TorchOptimizer.init(model, torch.optim.Adam, freeze="*")
    opt = TorchOptimizer.init(model, torch.optim.Adam)
    x, y = data()
    other = (make_model()[0],)
    with pytest.raises(dp.DiffprogError, match="model given has 2"):
        run_step(other, opt, loss_of(model, x, y), 1e-3)
    with pytest.raises(ValueError, match="on_nonfinite"):
        run_step(model, opt, loss_of(model, x, y), 1e-3, on_nonfinite="warn")  # type: ignore[arg-type]


# --- the documented aliasing, point by point ---------------------------------------------------


def test_aliasing_the_model_is_updated_in_place() -> None:
    model = make_model()
    x, y = data()
    old_params = dp.flatten_parameters(model)
    old_weight = model[0].weight
    view = model[0].weight[0]
    same_params = dp.replace_parameters(make_model(1), old_params)  # another value, same tensors
    before = values(model)
    opt = TorchOptimizer.init(model, torch.optim.Adam, lr=0.1)
    new_model, new_opt = run_step(model, opt, loss_of(model, x, y), None)
    # The same value, the same Parameter objects, holding the new values.
    assert new_model is model
    assert all(a is b for a, b in zip(dp.flatten_parameters(new_model), old_params, strict=True))
    assert new_model[0].weight is old_weight
    assert not torch.equal(old_weight, before[0])
    assert torch.equal(view, old_weight[0])
    assert all(
        torch.equal(a, b)
        for a, b in zip(dp.flatten_parameters(same_params), old_params, strict=True)
    )
    # The optimizer: one torch optimizer whose state moved in place.
    assert new_opt is opt
    assert opt.optimizer.state[old_weight]["step"].item() == 1
    # No gradients left behind.
    assert all(p.grad is None for p in dp.flatten_parameters(model))


def test_aliasing_the_loss_graph_is_consumed() -> None:
    model = make_model()
    x, y = data()
    opt = TorchOptimizer.init(model, torch.optim.SGD, lr=0.1)
    loss = loss_of(model, x, y)
    run_step(model, opt, loss, None)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_aliasing_a_clone_keeps_the_old_values() -> None:
    model = make_model()
    x, y = data()
    opt = TorchOptimizer.init(model, torch.optim.Adam, lr=0.1)
    model, opt = run_step(model, opt, loss_of(model, x, y), None)
    old = [p.detach().clone() for p in dp.flatten_parameters(model)]
    snapshot = opt.state_dict()
    live = opt.optimizer.state_dict()
    moment = snapshot["optimizer"]["state"][0]["exp_avg"].clone()
    run_step(model, opt, loss_of(model, x, y), None)
    assert not torch.equal(old[0], model[0].weight)
    # opt.state_dict() is a snapshot; torch's own state_dict() is the live state.
    assert torch.equal(snapshot["optimizer"]["state"][0]["exp_avg"], moment)
    assert not torch.equal(live["state"][0]["exp_avg"], moment)


def test_pure_optimizer_by_contrast_keeps_the_old_model() -> None:
    model = make_model()
    x, y = data()
    before = values(model)
    new_model, _ = run_step(model, GD(), loss_of(model, x, y), 0.1)
    assert new_model is not model
    assert_close(values(model), before)


def test_generic_protocol_path_matches_run_step() -> None:
    """flatten, grad, step, make_independent, replace: the torch optimizer follows the new
    Parameter objects (which share storage with the old ones)."""
    model_a, model_b = make_model(), make_model()
    x, y = data()
    opt_a = TorchOptimizer.init(model_a, torch.optim.Adam, lr=1e-2)
    opt_b = TorchOptimizer.init(model_b, torch.optim.Adam, lr=1e-2)
    first_b = model_b
    for _ in range(5):
        model_a, opt_a = run_step(model_a, opt_a, loss_of(model_a, x, y), None)
        params = dp.flatten_parameters(model_b)
        gradients = dp.grad(loss_of(model_b, x, y), params)
        new_params, new_opt_b = opt_b.step(None, gradients, params)
        assert new_opt_b is opt_b
        assert all(a is b for a, b in zip(new_params, params, strict=True))
        model_b = dp.replace_parameters(model_b, [dp.make_independent(p) for p in new_params])
    assert_close(values(model_a), values(model_b))
    # The first model shares storage with the latest one: it saw every update.
    assert_close(values(first_b), values(model_b))
    # The torch optimizer holds the tensors it was last given (and moves on at the next step).
    assert len(opt_b.optimizer.state) == 4
    assert all(p in opt_b.optimizer.state for p in params)


def test_non_finite_gradient_leaves_model_and_state_untouched() -> None:
    model = make_model()
    x, y = data()
    opt = TorchOptimizer.init(model, torch.optim.Adam, lr=1e-2, fused=True)
    model, opt = run_step(model, opt, loss_of(model, x, y), None)
    before = values(model)
    state = {k: v.clone() for k, v in opt.optimizer.state[model[1].bias].items()}
    bad = loss_of(model, x, y) + model[1].bias.sum() * math.inf
    with pytest.raises(NonFiniteError, match=r"1\.bias") as info:
        run_step(model, opt, bad, None)
    assert info.value.paths == ("1.bias",)
    assert_close(values(model), before)
    assert_close(dict(opt.optimizer.state[model[1].bias]), state)
    assert all(p.grad is None for p in dp.flatten_parameters(model))
    same, same_opt = run_step(
        model, opt, loss_of(model, x, y) * math.nan, None, on_nonfinite="skip"
    )
    assert same is model
    assert same_opt.count == 1
    assert_close(values(model), before)


def test_state_dict_round_trip() -> None:
    model = make_model()
    x, y = data()
    opt = TorchOptimizer.init(model, torch.optim.Adam, lr=1e-2)
    model, opt = run_step(model, opt, loss_of(model, x, y), None)
    saved = opt.state_dict()
    twin = dp.replace_parameters(model, [dp.make_independent(v) for v in values(model)])
    twin_opt = TorchOptimizer.init(twin, torch.optim.Adam, lr=1e-2)
    twin_opt.load_state_dict(saved)
    assert twin_opt.count == 1
    model, opt = run_step(model, opt, loss_of(model, x, y), None)
    twin, twin_opt = run_step(twin, twin_opt, loss_of(twin, x, y), None)
    assert_close(values(model), values(twin))
    assert "Adam(" in repr(opt)
    assert "4 parameters" in repr(opt)


def test_same_loop_runs_with_pure_and_torch_optimizers() -> None:
    x, y = data()

    def train(model: Model, opt: Any) -> float:
        def body(state: tuple[Model, Any], i: int) -> tuple[Model, Any]:
            model, opt = state
            return run_step(model, opt, loss_of(model, x, y), 1e-2)

        model, _ = fold_loop((model, opt), 30, body)
        return float(value_and_grad(loss_of)(model, x, y)[0])

    start = float(loss_of(make_model(), x, y).detach())
    pure = train(make_model(), GD())
    model = make_model()
    in_place = train(model, TorchOptimizer.init(model, torch.optim.SGD, lr=0.0))
    assert pure < start
    # SGD in place from the same start: same numbers as the pure GD, up to rounding.
    assert in_place == pytest.approx(pure, rel=1e-5)


def test_wrapping_an_existing_torch_optimizer() -> None:
    model = make_model()
    x, y = data()
    params = dp.flatten_parameters(model)
    sgd = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.0}], lr=0.1)
    opt = TorchOptimizer(sgd, params)
    head = values(model[1])
    model, opt = run_step(model, opt, loss_of(model, x, y), None)
    assert opt.optimizer is sgd
    assert_close(values(model[1]), head)  # its second group has lr 0
    stranger = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(dp.DiffprogError, match="not a parameter of the model"):
        TorchOptimizer(torch.optim.SGD([stranger], lr=0.1), params)


def test_generic_step_with_expanded_gradients_under_fused_adam() -> None:
    # torch.autograd.grad gives the gradient of a sum as an expanded tensor; torch's fused Adam
    # misreads those, so the generic step hands it a dense copy.
    fused = {"w": dp.make_independent(torch.zeros(3, 2))}
    plain = {"w": dp.make_independent(torch.zeros(3, 2))}
    opt_fused = TorchOptimizer.init(fused, torch.optim.Adam, lr=0.1, fused=True)
    opt_plain = TorchOptimizer.init(plain, torch.optim.Adam, lr=0.1, foreach=False)
    for model, opt in [(fused, opt_fused), (plain, opt_plain)]:
        gradients = dp.grad(model["w"].sum(), [model["w"]])
        assert gradients[0].stride() == (0, 0)
        opt.step(None, gradients, [model["w"]])
    assert_close(fused["w"], torch.full((3, 2), -0.1))
    assert_close(fused["w"], plain["w"])
    direct = {"w": dp.make_independent(torch.zeros(3, 2))}
    opt_direct = TorchOptimizer.init(direct, torch.optim.Adam, lr=0.1, fused=True)
    run_step(direct, opt_direct, direct["w"].sum(), None)
    assert_close(direct["w"], plain["w"])


@settings(max_examples=15, deadline=None)
@given(
    lrs=st.lists(st.floats(1e-4, 0.5), min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_in_place_sgd_follows_pure_gd_for_any_lr_sequence(lrs: list[float], seed: int) -> None:
    x, y = data(seed)
    pure, pure_opt = make_model(seed), GD()
    in_place = make_model(seed)
    opt = TorchOptimizer.init(in_place, torch.optim.SGD, lr=123.0)
    for lr in lrs:
        pure, pure_opt = run_step(pure, pure_opt, loss_of(pure, x, y), lr)
        in_place, opt = run_step(in_place, opt, loss_of(in_place, x, y), lr)
    assert_close(values(in_place), values(pure))
    assert opt.optimizer.param_groups[0]["lr"] == 123.0


def test_a_protocol_wrapper_around_a_torch_optimizer() -> None:
    """ClipGradNorm knows nothing of TorchOptimizer: run_step takes the generic path, and the
    torch optimizer follows the rebuilt model's new Parameter objects from step to step."""
    model = make_model()
    net = torch_copy(model)
    x, y = data()
    opt: Any = ClipGradNorm(TorchOptimizer.init(model, torch.optim.SGD, lr=0.1), max_norm=0.01)
    reference = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        model, opt = run_step(model, opt, loss_of(model, x, y), None)
        reference.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
        reference.step()
    assert_close(values(model), [p.detach() for p in net.parameters()])
