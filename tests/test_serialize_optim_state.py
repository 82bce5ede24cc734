"""Issue 10, "Optimizer state": every pure optimizer's state saves and loads by parameter path,
and converts to and from ``torch.optim``'s ``state_dict()`` so that training moves between
torch.optim and diffprog mid-run with torch's numbers.

The round trips go through real bytes (safetensors for the tensors, JSON for the rest), over the
whole grid: every optimizer x a model with a tie, frozen parameters and per-parameter overrides,
plain and donating. The interop is checked against torch.optim itself: N steps in torch, convert,
M steps in diffprog equals N + M steps in torch, and the reverse.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import safetensors.torch
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
    chain,
    clip_by_value,
)
from diffprog.serialize import (
    OptimizerState,
    OptimizerStateError,
    load_optimizer_state,
    load_optimizer_state_dict,
    optimizer_state,
    optimizer_state_dict,
)

# (class, settings): every pure optimizer, each with settings that use all of its state kinds
OPTIMIZERS: list[tuple[Any, dict[str, Any]]] = [
    (GD, {}),
    (GDM, {"momentum": 0.9}),
    (SGD, {"momentum": 0.9, "nesterov": True}),
    (SGD, {}),
    (Adam, {}),
    (Adam, {"amsgrad": True, "weight_decay": 0.1}),
    (AdamW, {}),
    (Adagrad, {"initial_accumulator_value": 0.1, "lr_decay": 0.01}),
    (RMSprop, {"momentum": 0.5, "centered": True}),
    (RMSprop, {}),
    (Lion, {}),
    (NAdam, {}),
    (RAdam, {}),
    (Adamax, {}),
    (Adadelta, {}),
    (Rprop, {}),
    (ASGD, {"t0": 2.0}),
    (Adafactor, {}),
]


def _name(cls: Any, settings: dict[str, Any]) -> str:
    return f"{cls.__name__}-" + ("-".join(f"{k}={v}" for k, v in settings.items()) or "defaults")


def _model() -> dict[str, Any]:
    """A model with a tie (``dec.weight`` is ``enc.weight``), a vector and a matrix per layer."""
    gen = torch.Generator().manual_seed(0)
    enc = dp.sample(LinearSpec(3, 3), generator=gen)
    head = dp.sample(LinearSpec(3, 2), generator=gen)
    bias = dp.make_independent(torch.randn(3, generator=gen))
    return {"enc": enc, "dec": Linear(enc.weight, bias), "head": head}


# layout name -> init keywords: plain, per-parameter overrides, frozen parameters
LAYOUTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "overrides": {"overrides": {"*.bias": {"lr_scale": 0.5}}},
    "frozen": {"freeze": "head.*", "overrides": {"dec.bias": {"lr_scale": 2.0}}},
    "donated": {"donate": True, "overrides": {"*.bias": {"lr_scale": 0.5}}},
}


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _steps(opt: Any, params: list[torch.Tensor], first: int, n: int) -> tuple[Any, list[Any]]:
    for k in range(first, first + n):
        new, opt = opt.step(0.01, _grads(params, k), params)
        params = [dp.make_independent(p) for p in new]
    return opt, params


def _through_bytes(state: OptimizerState) -> OptimizerState:
    """``state`` written out and read back as a checkpoint stores it: safetensors + JSON."""
    data = safetensors.torch.save(state.tensors)
    return OptimizerState(safetensors.torch.load(data), json.loads(json.dumps(state.meta)))


def _is_state(value: Any) -> bool:
    return (
        isinstance(value, tuple)
        and any(isinstance(v, torch.Tensor) for v in value)
        and all(isinstance(v, torch.Tensor | None) for v in value)
    )


def _assert_same_optimizer(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    for name, value in vars(a).items():
        other = vars(b)[name]
        if name == "lease":
            assert (value is None) == (other is None)
        elif _is_state(value):
            assert len(value) == len(other)
            for x, y in zip(value, other, strict=True):
                assert (x is None and y is None) or torch.equal(x, y)
        elif not hasattr(value, "inner"):
            assert value == other, name


# every optimizer x every layout (GD has no state to donate)
GRID = [
    (cls, settings, layout)
    for cls, settings in OPTIMIZERS
    for layout in LAYOUTS
    if layout != "donated" or cls.declaration().donates
]
GRID_IDS = [f"{_name(cls, settings)}-{layout}" for cls, settings, layout in GRID]


@pytest.mark.parametrize(("cls", "settings", "layout"), GRID, ids=GRID_IDS)
def test_every_optimizer_state_round_trips_by_path_and_training_goes_on_bit_for_bit(
    cls: Any, settings: dict[str, Any], layout: str
) -> None:
    model = _model()
    params = dp.flatten_parameters(model)
    opt, trained = _steps(cls.init(model, **settings, **LAYOUTS[layout]), params, 0, 3)
    model = dp.replace_parameters(model, trained)
    saved = _through_bytes(optimizer_state(opt, model))
    loaded = load_optimizer_state(cls.init(model, **settings, **LAYOUTS[layout]), model, saved)
    _assert_same_optimizer(loaded, opt)
    # and the next steps are the same, bit for bit
    cont, p1 = _steps(opt, trained, 3, 2)
    cont2, p2 = _steps(loaded, trained, 3, 2)
    for x, y in zip(p1, p2, strict=True):
        assert torch.equal(x, y)
    _assert_same_optimizer(cont, cont2)


def test_state_keys_are_the_kind_then_the_parameters_state_dict_key() -> None:
    model = _model()
    opt = Adam.init(model, freeze="head.*")
    keys = sorted(optimizer_state(opt, model).tensors)
    # the tie (dec.weight) is enc.weight: one entry; the frozen head has none
    assert keys == [
        "exp_avg.dec.bias",
        "exp_avg.enc.bias",
        "exp_avg.enc.weight",
        "exp_avg_sq.dec.bias",
        "exp_avg_sq.enc.bias",
        "exp_avg_sq.enc.weight",
    ]
    meta = optimizer_state(opt, model).meta
    assert meta["class"] == "Adam" and meta["count"] == 0
    assert meta["groups"]["frozen"] == ["head.weight", "head.bias"]


@pytest.mark.parametrize("donate", [False, True])
def test_a_donating_optimizer_round_trips_and_the_loaded_one_owns_its_state(donate: bool) -> None:
    model = _model()
    params = dp.flatten_parameters(model)
    opt, trained = _steps(Adam.init(model, donate=donate), params, 0, 2)
    state = optimizer_state(opt, model)
    loaded = load_optimizer_state(Adam.init(model, donate=donate), model, state)
    kept = [t.clone() for t in state.tensors.values()]
    _steps(loaded, trained, 2, 2)
    # stepping the loaded optimizer (in place when donating) leaves the saved tensors alone
    for before, after in zip(kept, state.tensors.values(), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("wrap", ["chain", "clip_grad_norm"])
def test_chained_and_clipped_optimizers_round_trip_their_inner_state(wrap: str) -> None:
    model = _model()
    params = dp.flatten_parameters(model)

    def build() -> Any:
        inner = Adam.init(model)
        return chain(clip_by_value(0.5), inner) if wrap == "chain" else ClipGradNorm(inner, 1.0)

    opt, _ = _steps(build(), params, 0, 2)
    saved = _through_bytes(optimizer_state(opt, model))
    assert saved.meta["class"] == type(opt).__name__ and saved.meta["inner"]["class"] == "Adam"
    loaded = load_optimizer_state(build(), model, saved)
    _assert_same_optimizer(loaded.inner, opt.inner)
    with pytest.raises(OptimizerStateError, match="not of a 'Adam'"):
        load_optimizer_state(Adam.init(model), model, saved)


def _saved_adam() -> tuple[dict[str, Any], OptimizerState]:
    model = _model()
    opt, trained = _steps(Adam.init(model, weight_decay=0.1), dp.flatten_parameters(model), 0, 1)
    return dp.replace_parameters(model, trained), optimizer_state(opt, model)


def test_a_state_saved_with_other_settings_is_refused_naming_them() -> None:
    model, state = _saved_adam()
    with pytest.raises(OptimizerStateError, match=r"weight_decay=0.1 saved, 0.0 here"):
        load_optimizer_state(Adam.init(model), model, state)
    with pytest.raises(OptimizerStateError, match="other parameter groups"):
        load_optimizer_state(Adam.init(model, weight_decay=0.1, freeze="head.*"), model, state)
    with pytest.raises(OptimizerStateError, match="not of a 'AdamW'"):
        load_optimizer_state(AdamW.init(model, weight_decay=0.1), model, state)


def test_plain_and_grouped_optimizers_do_not_load_each_others_state() -> None:
    model = _model()
    params = dp.flatten_parameters(model)
    plain, _ = _steps(GDM(momentum=0.9), params, 0, 1)  # built without init: settings None
    state = optimizer_state(plain, model)
    assert state.meta["groups"] is None
    assert load_optimizer_state(GDM.init(model, momentum=0.9), model, state).count == 1
    grouped = GDM.init(model, momentum=0.9, overrides={"*.bias": {"lr_scale": 0.5}})
    with pytest.raises(OptimizerStateError, match="other parameter groups"):
        load_optimizer_state(grouped, model, state)
    with pytest.raises(OptimizerStateError, match="other parameter groups"):
        load_optimizer_state(plain, model, optimizer_state(_steps(grouped, params, 0, 1)[0], model))


def test_missing_unexpected_and_misshapen_state_is_refused_naming_the_keys() -> None:
    model, state = _saved_adam()
    skeleton = Adam.init(model, weight_decay=0.1)
    missing = {k: v for k, v in state.tensors.items() if k != "exp_avg.enc.bias"}
    with pytest.raises(
        OptimizerStateError, match=r"missing optimizer state in f.st: 'exp_avg.enc.bias'"
    ):
        load_optimizer_state(skeleton, model, OptimizerState(missing, state.meta), source="f.st")
    extra = {**state.tensors, "exp_avg.nowhere": torch.zeros(1)}
    with pytest.raises(OptimizerStateError, match="unexpected optimizer state.*'exp_avg.nowhere'"):
        load_optimizer_state(skeleton, model, OptimizerState(extra, state.meta))
    wrong = {**state.tensors, "exp_avg.enc.bias": torch.zeros(4)}
    with pytest.raises(OptimizerStateError, match=r"'exp_avg.enc.bias' has shape \(4,\)") as e:
        load_optimizer_state(skeleton, model, OptimizerState(wrong, state.meta))
    assert e.value.mismatched_keys == ["exp_avg.enc.bias"]
    other_model = {"enc": dp.sample(LinearSpec(3, 3)), "dec": dp.sample(LinearSpec(3, 3))}
    with pytest.raises(OptimizerStateError):
        load_optimizer_state(Adam.init(other_model, weight_decay=0.1), other_model, state)
    bad_count = OptimizerState(state.tensors, {**state.meta, "count": "3"})
    with pytest.raises(OptimizerStateError, match="step count"):
        load_optimizer_state(skeleton, model, bad_count)


# --- torch.optim interop ------------------------------------------------------------------

# (ours, settings, torch class, torch's implementation flags that ours matches bit for bit)
TORCH_CASES: list[tuple[Any, dict[str, Any], Any, dict[str, Any]]] = [
    (GD, {}, torch.optim.SGD, {"fused": True}),
    (SGD, {"momentum": 0.9, "weight_decay": 0.01}, torch.optim.SGD, {"fused": True}),
    (GDM, {"momentum": 0.9, "nesterov": True}, torch.optim.SGD, {"fused": True}),
    (Adam, {}, torch.optim.Adam, {"fused": True}),
    (Adam, {"amsgrad": True, "weight_decay": 0.1}, torch.optim.Adam, {"fused": True}),
    (AdamW, {}, torch.optim.AdamW, {"fused": True}),
    (Adagrad, {"lr_decay": 0.01}, torch.optim.Adagrad, {"fused": True}),
    (RMSprop, {"momentum": 0.5, "centered": True}, torch.optim.RMSprop, {"foreach": True}),
    (NAdam, {}, torch.optim.NAdam, {"foreach": True}),
    (RAdam, {}, torch.optim.RAdam, {"foreach": True}),
    (Adamax, {}, torch.optim.Adamax, {"foreach": True}),
    (Adadelta, {}, torch.optim.Adadelta, {"foreach": True}),
    (Rprop, {}, torch.optim.Rprop, {"foreach": True}),
    (ASGD, {"t0": 2.0, "foreach": False}, torch.optim.ASGD, {"foreach": False}),
    (Adafactor, {}, torch.optim.Adafactor, {}),
]
TORCH_IDS = [_name(cls, settings) for cls, settings, _, _ in TORCH_CASES]
LR = 0.01
N, M = 3, 2


def _torch_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _as_diffprog(module: torch.nn.Sequential) -> list[Linear]:
    return [
        Linear(
            dp.make_independent(m.weight.detach().clone()),
            dp.make_independent(m.bias.detach().clone()),
        )
        for m in (module[0], module[2])
    ]


def _torch_settings(settings: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    return {**settings, **flags}


def _torch_steps(module: torch.nn.Module, opt: torch.optim.Optimizer, first: int, n: int) -> None:
    params = list(module.parameters())
    for k in range(first, first + n):
        for p, g in zip(params, _grads(params, k), strict=True):
            p.grad = g
        opt.step()


def _torch_run(cls: Any, options: dict[str, Any], steps: int) -> tuple[torch.nn.Module, Any]:
    module = _torch_model()
    opt = cls(module.parameters(), lr=LR, **options)
    _torch_steps(module, opt, 0, steps)
    return module, opt


@pytest.mark.parametrize(("ours", "settings", "theirs", "flags"), TORCH_CASES, ids=TORCH_IDS)
def test_torch_steps_then_diffprog_steps_give_torchs_numbers(
    ours: Any, settings: dict[str, Any], theirs: Any, flags: dict[str, Any]
) -> None:
    expected, _ = _torch_run(theirs, _torch_settings(settings, flags), N + M)
    module, topt = _torch_run(theirs, _torch_settings(settings, flags), N)
    model = _as_diffprog(module)
    count = N if theirs is torch.optim.SGD else None  # torch's SGD keeps no count
    skeleton = ours.init(model, **settings)
    opt = load_optimizer_state_dict(skeleton, model, topt.state_dict(), count=count)
    assert opt.count == N
    _, params = _steps(opt, dp.flatten_parameters(model), N, M)
    for got, want in zip(params, expected.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("ours", "settings", "theirs", "flags"), TORCH_CASES, ids=TORCH_IDS)
def test_diffprog_steps_then_torch_steps_give_torchs_numbers(
    ours: Any, settings: dict[str, Any], theirs: Any, flags: dict[str, Any]
) -> None:
    expected, _ = _torch_run(theirs, _torch_settings(settings, flags), N + M)
    model = _as_diffprog(_torch_model())
    opt, params = _steps(ours.init(model, **settings), dp.flatten_parameters(model), 0, N)
    model = dp.replace_parameters(model, params)
    module = _torch_model()
    with torch.no_grad():
        for p, q in zip(module.parameters(), params, strict=True):
            p.copy_(q)
    topt = theirs(module.parameters(), lr=LR, **_torch_settings(settings, flags))
    topt.load_state_dict(optimizer_state_dict(opt, model, lr=LR, **flags))
    _torch_steps(module, topt, N, M)
    for got, want in zip(module.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_groups_and_frozen_parameters_map_to_torchs_param_groups_both_ways() -> None:
    model = _as_diffprog(_torch_model())
    overrides = {"1.bias": {"weight_decay": 0.0, "lr_scale": 0.5}}
    opt, params = _steps(
        AdamW.init(model, overrides=overrides, freeze="0.weight"),
        dp.flatten_parameters(model),
        0,
        2,
    )
    model = dp.replace_parameters(model, params)
    sd = optimizer_state_dict(opt, model, lr=LR)
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    assert [g["lr"] for g in sd["param_groups"]] == [LR, LR * 0.5]
    assert [g["weight_decay"] for g in sd["param_groups"]] == [0.01, 0.0]
    back = load_optimizer_state_dict(
        AdamW.init(model, overrides=overrides, freeze="0.weight"), model, sd
    )
    _assert_same_optimizer(back, opt)
    with pytest.raises(OptimizerStateError, match="parameter groups hold"):
        load_optimizer_state_dict(AdamW.init(model), model, sd)


def test_torch_settings_that_differ_are_refused_naming_the_group_and_setting() -> None:
    _, topt = _torch_run(torch.optim.Adam, {"betas": (0.8, 0.9)}, 1)
    model = _as_diffprog(_torch_model())
    with pytest.raises(OptimizerStateError, match=r"group 0: betas=\(0.8, 0.9\) in torch"):
        load_optimizer_state_dict(Adam.init(model), model, topt.state_dict())
    _, sgd = _torch_run(torch.optim.SGD, {"momentum": 0.9}, 1)
    with pytest.raises(OptimizerStateError, match="'momentum_buffer'"):
        load_optimizer_state_dict(Adam.init(model), model, sgd.state_dict())


def test_lion_has_no_torch_counterpart_and_says_so() -> None:
    model = _as_diffprog(_torch_model())
    with pytest.raises(OptimizerStateError, match="Lion has no torch.optim counterpart"):
        optimizer_state_dict(Lion.init(model), model, lr=LR)


def test_sgd_count_comes_from_the_caller_as_torch_keeps_none() -> None:
    _, topt = _torch_run(torch.optim.SGD, {"momentum": 0.9}, 3)
    model = _as_diffprog(_torch_model())
    skeleton = SGD.init(model, momentum=0.9)
    assert load_optimizer_state_dict(skeleton, model, topt.state_dict()).count == 1
    assert load_optimizer_state_dict(skeleton, model, topt.state_dict(), count=3).count == 3


@pytest.mark.parametrize("direction", ["torch-then-diffprog", "diffprog-then-torch"])
def test_groups_and_frozen_parameters_continue_with_torchs_numbers(direction: str) -> None:
    # diffprog's groups (overrides, frozen 0.weight left out) as TorchOptimizer.init builds them
    overrides = {"1.bias": {"weight_decay": 0.0, "lr_scale": 0.5}}
    flags = {"fused": True}

    def torch_groups(module: torch.nn.Sequential) -> list[dict[str, Any]]:
        return [
            {"params": [module[0].bias, module[2].weight]},
            {"params": [module[2].bias], "weight_decay": 0.0, "lr": LR * 0.5},
        ]

    def torch_steps(module: torch.nn.Sequential, opt: Any, first: int, n: int) -> None:
        params = list(module.parameters())
        for k in range(first, first + n):
            for p, g in zip(params, _grads(params, k), strict=True):
                p.grad = None if p is module[0].weight else g
            opt.step()

    expected = _torch_model()
    torch_steps(expected, torch.optim.AdamW(torch_groups(expected), lr=LR, **flags), 0, N + M)
    if direction == "torch-then-diffprog":
        module = _torch_model()
        topt = torch.optim.AdamW(torch_groups(module), lr=LR, **flags)
        torch_steps(module, topt, 0, N)
        model = _as_diffprog(module)
        skeleton = AdamW.init(model, overrides=overrides, freeze="0.weight")
        opt = load_optimizer_state_dict(skeleton, model, topt.state_dict())
        _, got = _steps(opt, dp.flatten_parameters(model), N, M)
    else:
        model = _as_diffprog(_torch_model())
        opt = AdamW.init(model, overrides=overrides, freeze="0.weight")
        opt, params = _steps(opt, dp.flatten_parameters(model), 0, N)
        model = dp.replace_parameters(model, params)
        module = _torch_model()
        with torch.no_grad():
            for p, q in zip(module.parameters(), params, strict=True):
                p.copy_(q)
        topt = torch.optim.AdamW(torch_groups(module), lr=LR, **flags)
        topt.load_state_dict(optimizer_state_dict(opt, model, lr=LR, **flags))
        torch_steps(module, topt, N, M)
        got = list(module.parameters())
    for mine, want in zip(got, expected.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), want.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("cls", "settings"), OPTIMIZERS, ids=[_name(*o) for o in OPTIMIZERS])
def test_per_parameter_step_counts_round_trip_by_path(cls: Any, settings: dict[str, Any]) -> None:
    # Parameters the loss does not reach in some steps (used=False) fall behind: torch's
    # per-parameter "step", kept in param_counts and saved under each parameter's path.
    model = _model()
    params = dp.flatten_parameters(model)
    opt = cls.init(model, **settings)
    masks = [[True, False, True, True, False], [True, True, False, True, False]]
    for k, used in enumerate(masks):
        new, opt = opt.step(0.01, _grads(params, k), params, used=used)
        params = [dp.make_independent(p) for p in new]
    assert opt.param_counts == (2, 1, 1, 2, 0)
    state = _through_bytes(optimizer_state(opt, model))
    assert state.meta["param_counts"] == {
        "enc.weight": 2,
        "enc.bias": 1,
        "dec.bias": 1,
        "head.weight": 2,
        "head.bias": 0,
    }
    loaded = load_optimizer_state(cls.init(model, **settings), model, state)
    _assert_same_optimizer(loaded, opt)
    _, p1 = _steps(opt, params, 5, 2)
    _, p2 = _steps(loaded, params, 5, 2)
    assert all(torch.equal(x, y) for x, y in zip(p1, p2, strict=True))


def test_a_parameter_torch_has_not_updated_yet_keeps_its_initial_state_both_ways() -> None:
    module, topt = _torch_run(torch.optim.Adam, {"fused": True}, 0)
    params = list(module.parameters())
    for k in range(2):  # the last bias gets no gradient: torch keeps no state for it
        for p, g in zip(params, _grads(params, k), strict=True):
            p.grad = None if p is params[-1] else g
        topt.step()
    model = _as_diffprog(module)
    opt = load_optimizer_state_dict(Adam.init(model), model, topt.state_dict())
    assert opt.count == 2 and opt.param_counts == (2, 2, 2, 0)
    assert torch.equal(opt.exp_avg[3], torch.zeros(2))
    back = optimizer_state_dict(opt, model, lr=LR, fused=True)
    assert sorted(back["state"]) == [0, 1, 2]  # as torch's: no state before the first update
