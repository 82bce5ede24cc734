"""Optimizers declared once: init's signature, validation, overrides, repr and the docs table
come from the hyper()/state() fields; Adam's decoupled_weight_decay and torch's options with no
pure meaning; only declared fields in a value (no hidden caches); _update's result checked."""

from __future__ import annotations

import dataclasses
import inspect
import math
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import diffprog as dp
import diffprog.optim._declare
import diffprog.optim._pure
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
    Lion,
    NAdam,
    PureOptimizer,
    RAdam,
    RMSprop,
    Rprop,
    hyper,
    run_step,
    settings_table,
)

PURE: list[type[PureOptimizer]] = [GD, GDM, Adam, AdamW, Adagrad, RMSprop, Lion]
PURE += [SGD, NAdam, RAdam, Adamax, Adadelta, Rprop, ASGD, Adafactor]
# each pure optimizer that torch.optim has, with torch's class
TORCH = {GDM: torch.optim.SGD, Adam: torch.optim.Adam, AdamW: torch.optim.AdamW}
TORCH |= {Adagrad: torch.optim.Adagrad, RMSprop: torch.optim.RMSprop}
TORCH |= {SGD: torch.optim.SGD, NAdam: torch.optim.NAdam, RAdam: torch.optim.RAdam}
TORCH |= {Adamax: torch.optim.Adamax, Adadelta: torch.optim.Adadelta, Rprop: torch.optim.Rprop}
TORCH |= {ASGD: torch.optim.ASGD, Adafactor: torch.optim.Adafactor}

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


def keyword_defaults(fn: Any) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize("cls", PURE, ids=lambda c: c.__name__)
def test_init_signature_is_derived_from_the_declared_fields(cls: type[PureOptimizer]) -> None:
    declared = cls.declaration()
    params = inspect.signature(cls.init).parameters
    settable = [f.name for f in declared.hyper if f.metadata["diffprog.optim.hyper"].settable]
    expected = ["model", *settable, "overrides", "freeze"]
    expected += ["donate"] if declared.donates else []
    expected += list(declared.torch_options)
    assert list(params) == expected
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in expected[1:])
    for f in declared.hyper:
        if f.name in params:
            assert params[f.name].default == f.default == getattr(cls.init([]), f.name)
    assert cls.init.__doc__ is not None and all(name in cls.init.__doc__ for name in settable)


@pytest.mark.parametrize("cls", list(TORCH), ids=lambda c: c.__name__)
def test_init_takes_torchs_keywords_with_torchs_defaults(cls: type[PureOptimizer]) -> None:
    ours = keyword_defaults(cls.init)
    theirs = keyword_defaults(TORCH[cls].__init__)
    theirs.pop("lr")
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for name, default in theirs.items():
        assert ours[name] == default, name


# (optimizer, setting, invalid value): each against torch.optim's own message
INVALID = [
    (Adam, "eps", -1.0),
    (Adam, "weight_decay", -0.5),
    (Adam, "betas", (1.0, 0.999)),
    (Adam, "betas", (0.9, -0.1)),
    (AdamW, "eps", -1e-3),
    (AdamW, "betas", (0.9, 1.0)),
    (AdamW, "weight_decay", -1.0),
    (GDM, "momentum", -0.1),
    (GDM, "weight_decay", -0.1),
    (Adagrad, "lr_decay", -1.0),
    (Adagrad, "weight_decay", -1.0),
    (Adagrad, "initial_accumulator_value", -1.0),
    (Adagrad, "eps", -1.0),
    (RMSprop, "alpha", -1.0),
    (RMSprop, "eps", -1.0),
    (RMSprop, "weight_decay", -1.0),
    (RMSprop, "momentum", -1.0),
    (SGD, "momentum", -0.1),
    (SGD, "weight_decay", -0.1),
    (NAdam, "eps", -1.0),
    (NAdam, "betas", (1.0, 0.9)),
    (NAdam, "weight_decay", -0.1),
    (NAdam, "momentum_decay", -0.1),
    (RAdam, "eps", -1.0),
    (RAdam, "betas", (0.9, 1.0)),
    (RAdam, "weight_decay", -0.1),
    (Adamax, "eps", -1.0),
    (Adamax, "betas", (-0.5, 0.9)),
    (Adamax, "weight_decay", -1.0),
    (Adadelta, "rho", 1.5),
    (Adadelta, "rho", -0.1),
    (Adadelta, "eps", -1.0),
    (Adadelta, "weight_decay", -1.0),
    (Rprop, "etas", (1.5, 1.2)),
    (Rprop, "etas", (0.5, 0.9)),
    (Rprop, "etas", (0.0, 1.2)),
    (ASGD, "weight_decay", -0.5),
    (Adafactor, "beta2_decay", 0.5),
    (Adafactor, "eps", (-1.0, 1e-3)),
    (Adafactor, "eps", (None, -1.0)),
    (Adafactor, "d", 0.5),
    (Adafactor, "weight_decay", -1.0),
]


@pytest.mark.parametrize(("cls", "name", "value"), INVALID, ids=str)
@pytest.mark.parametrize("where", ["init", "override"])
def test_validation_says_what_torch_optim_says(
    cls: type[PureOptimizer], name: str, value: Any, where: str
) -> None:
    with pytest.raises(ValueError) as theirs:
        TORCH[cls]([torch.zeros(1, requires_grad=True)], **{name: value})
    model = make_model()
    given: dict[str, Any] = {name: value} if where == "init" else {}
    if where == "override":
        given["overrides"] = {"head.*": {name: value}}
    with pytest.raises(ValueError) as ours:
        cls.init(model, **given)
    assert str(ours.value).startswith(str(theirs.value))


def test_gdm_checks_nesterov_as_torch_does() -> None:
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], nesterov=True)
    with pytest.raises(ValueError) as ours:
        GDM.init(make_model(), nesterov=True)
    # torch's words, with what "a momentum" means
    assert str(ours.value).startswith("Nesterov momentum requires a momentum")
    assert str(theirs.value).startswith("Nesterov momentum requires a momentum")


@pytest.mark.parametrize("where", ["init", "override"])
@pytest.mark.parametrize("options", [{"nesterov": True}, {"momentum": 0.9, "dampening": 0.1}])
def test_sgd_checks_nesterov_across_settings_in_torchs_very_words(
    options: dict[str, Any], where: str
) -> None:
    given = {"nesterov": True, **options}
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], **given)
    # in an override, a group's settings together (SGD's _check, after the per-field checks)
    kwargs = given if where == "init" else {"overrides": {"head.*": given}}
    with pytest.raises(ValueError) as ours:
        SGD.init(make_model(), **kwargs)
    assert str(ours.value) == str(theirs.value)
    SGD.init(make_model(), nesterov=True, momentum=0.9)  # valid: momentum, no dampening


@pytest.mark.parametrize("cls", PURE, ids=lambda c: c.__name__)
def test_an_unknown_keyword_or_setting_is_refused(cls: type[PureOptimizer]) -> None:
    with pytest.raises(TypeError, match="lr"):
        cls.init(make_model(), lr=0.1)
    with pytest.raises(TypeError, match="positional"):
        cls.init(make_model(), 0.9)
    with pytest.raises(ValueError, match="no per-parameter setting colour"):
        cls.init(make_model(), overrides={"head.*": {"colour": 1}})


@pytest.mark.parametrize("cls", PURE, ids=lambda c: c.__name__)
def test_the_docs_table_of_settings_is_the_declared_one(cls: type[PureOptimizer]) -> None:
    page = (pathlib.Path(__file__).parents[1] / "docs" / "optim.md").read_text()
    assert settings_table(cls) in page


@pytest.mark.parametrize("cls", PURE, ids=lambda c: c.__name__)
@pytest.mark.parametrize("how", ["plain", "pieces", "unused", "donate"])
def test_a_value_holds_only_its_declared_fields(
    cls: type[PureOptimizer], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No hidden caches in a frozen value's __dict__ (the pieces, the donation flag)."""
    if how == "pieces":
        monkeypatch.setattr(diffprog.optim._pure, "PIECE_BYTES", 64)
    donate = how == "donate" and cls.declaration().donates
    model = make_model()
    opt: Any = cls.init(model, donate=True) if donate else cls.init(model)
    x = torch.randn(8, 3)
    for _ in range(3):
        loss = model["head"].weight.sum() if how == "unused" else loss_of(model, x, x[:, :1])
        model, opt = run_step(model, opt, loss, 1e-3)
    assert set(opt.__dict__) == {f.name for f in dataclasses.fields(opt)}
    assert opt.count == 3


def test_a_donated_optimizers_lease_is_declared_and_spent_by_its_step() -> None:
    model = make_model()
    opt = Adam.init(model, donate=True)
    assert opt.lease is not None and not opt.lease.spent and "lease=Lease(" in repr(opt)
    x = torch.randn(8, 3)
    _, new = run_step(model, opt, loss_of(model, x, x[:, :1]), 1e-3)
    assert opt.lease.spent and new.lease is not None and not new.lease.spent
    with pytest.raises(dp.DiffprogError, match="already stepped"):
        run_step(model, opt, loss_of(model, x, x[:, :1]), 1e-3)
    built = Adam(donate=True)  # no lease: a second step could not be refused, so none is taken
    with pytest.raises(dp.DiffprogError, match="no lease"):
        built.step(0.1, [torch.ones(1)], [torch.zeros(1)])


def test_adamw_is_adam_with_decoupled_weight_decay() -> None:
    assert issubclass(AdamW, Adam)
    assert "decoupled_weight_decay" not in inspect.signature(AdamW.init).parameters
    assert AdamW.init([]).decoupled_weight_decay is True
    model, x = make_model(), torch.randn(8, 3)
    a, _ = run_step(model, AdamW.init(model), loss_of(model, x, x[:, :1]), 1e-2)
    b, _ = run_step(
        model,
        Adam.init(model, weight_decay=1e-2, decoupled_weight_decay=True),
        loss_of(model, x, x[:, :1]),
        1e-2,
    )
    assert_close(dp.flatten_parameters(a), dp.flatten_parameters(b), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_decoupled_weight_decay_matches_torch_over_100_steps(
    fused: bool, amsgrad: bool, maximize: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diffprog.optim._pure, "USE_FUSED", fused)
    options = {"weight_decay": 0.1, "amsgrad": amsgrad, "maximize": maximize}
    model = make_model()
    module = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    with torch.no_grad():
        for p, q in zip(module.parameters(), dp.flatten_parameters(model), strict=True):
            p.copy_(q)
    reference = torch.optim.Adam(
        module.parameters(), lr=1e-2, decoupled_weight_decay=True, **options
    )
    opt = Adam.init(model, decoupled_weight_decay=True, **options)
    gen = torch.Generator().manual_seed(3)
    for _ in range(100):
        x = torch.randn(8, 3, generator=gen)
        y = x.sum(dim=1, keepdim=True).sin()
        reference.zero_grad()
        torch.nn.functional.mse_loss(module(x), y).backward()
        reference.step()
        model, opt = run_step(model, opt, loss_of(model, x, y), 1e-2)
    assert_close(dp.flatten_parameters(model), list(module.parameters()))


def test_decoupled_weight_decay_can_be_set_per_parameter() -> None:
    model, x = make_model(), torch.randn(8, 3)
    options = {"weight_decay": 0.5, "overrides": {"head.*": {"decoupled_weight_decay": True}}}
    mixed, _ = run_step(model, Adam.init(model, **options), loss_of(model, x, x[:, :1]), 1e-2)
    coupled, _ = run_step(
        model, Adam.init(model, weight_decay=0.5), loss_of(model, x, x[:, :1]), 1e-2
    )
    decoupled, _ = run_step(
        model, AdamW.init(model, weight_decay=0.5), loss_of(model, x, x[:, :1]), 1e-2
    )
    assert_close(mixed["hidden"].weight, coupled["hidden"].weight, rtol=0, atol=0)
    assert_close(mixed["head"].weight, decoupled["head"].weight, rtol=0, atol=0)


@pytest.mark.parametrize("cls", list(TORCH), ids=lambda c: c.__name__)
def test_torchs_options_without_pure_meaning_are_accepted_where_torch_accepts_them(
    cls: type[PureOptimizer],
) -> None:
    torch_params = inspect.signature(TORCH[cls].__init__).parameters
    settings = {f.name for f in cls.declaration().hyper}
    # an option that chooses something (ASGD's and Adafactor's foreach) is a setting instead;
    # every pure optimizer takes differentiable (torch.optim.Adafactor lacks it)
    options = [
        o
        for o in diffprog.optim._declare.TORCH_OPTIONS
        if (o in torch_params or o == "differentiable") and o not in settings
    ]
    assert list(cls.declaration().torch_options) == [
        o for o in inspect.signature(cls.init).parameters if o in options
    ]
    assert sorted(cls.declaration().torch_options) == sorted(options)
    model = make_model()
    plain = cls.init(model)
    for option in options:
        value = option != "differentiable"
        if option in torch_params:
            TORCH[cls]([torch.zeros(1, requires_grad=True)], **{option: value})  # torch takes it
        given = cls.init(model, **{option: value})
        assert repr(given) == repr(plain)  # no effect, nothing kept
    assert cls.init(model, differentiable=True).differentiable  # docs/optim.md
    # torch refuses fused with foreach or differentiable with its RuntimeError, and when all
    # three are given, names differentiable
    flag_sets = [
        {"foreach": True},
        {"differentiable": True},
        {"foreach": True, "differentiable": True},
    ]
    for flags in flag_sets if "fused" in options else []:
        with pytest.raises(RuntimeError) as theirs:
            TORCH[cls]([torch.zeros(1, requires_grad=True)], fused=True, **flags)
        with pytest.raises(RuntimeError) as ours:
            cls.init(model, fused=True, **flags)
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("cls", [ASGD, Adafactor], ids=lambda c: c.__name__)
def test_a_foreach_that_chooses_torchs_rounding_is_a_setting_kept_in_the_value(
    cls: type[PureOptimizer],
) -> None:
    assert "foreach" not in cls.declaration().torch_options
    assert [f.default for f in cls.declaration().hyper if f.name == "foreach"] == [None]
    model = make_model()
    assert cls.init(model, foreach=True).foreach is True  # type: ignore[attr-defined]
    assert "foreach=True" in repr(cls.init(model, foreach=True))
    opt = cls.init(model, overrides={"head.*": {"foreach": True}})
    assert opt.settings is not None
    assert ("foreach", True) in opt.settings.groups[-1].overrides


def test_an_option_cannot_be_both_a_setting_and_an_ignored_torch_option() -> None:
    with pytest.raises(TypeError, match=r"\['foreach'\] declared both as hyper\(\) fields"):

        class Both(PureOptimizer, torch_options=("foreach",)):
            foreach: bool | None = hyper(None, doc="chooses something")


def test_lion_takes_no_torch_options() -> None:
    with pytest.raises(TypeError, match="fused"):
        Lion.init(make_model(), fused=True)


class _Short(Adam):
    """An Adam whose _update forgets the last parameter."""

    def _update(self, hyper: Any, lr: Any, count: int, params: Any, grads: Any, state: Any) -> Any:
        return super()._update(hyper, lr, count, params, grads, state)[:-1]


@pytest.mark.parametrize("how", ["plain", "frozen", "pieces"])
def test_an_update_returning_too_few_tensors_is_an_error_not_an_unstepped_parameter(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "pieces":
        monkeypatch.setattr(diffprog.optim._pure, "PIECE_BYTES", 64)
    model, x = make_model(), torch.randn(8, 3)
    opt = _Short.init(model, freeze="hidden.bias" if how == "frozen" else None)
    with pytest.raises(dp.DiffprogError, match=r"_Short._update returned \d tensors for \d"):
        run_step(model, opt, loss_of(model, x, x[:, :1]), 1e-2)


def test_the_derived_init_builds_the_same_optimizer_as_before() -> None:
    """Adam.init with every setting, against the fields it must hold."""
    model = make_model()
    opt = Adam.init(model, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.1, amsgrad=True)
    assert opt.betas == (0.8, 0.9) and isinstance(opt.betas, tuple)
    assert (opt.eps, opt.weight_decay, opt.amsgrad, opt.maximize) == (1e-6, 0.1, True, False)
    assert len(opt.max_exp_avg_sq) == 4 and opt.count == 0 and not opt.donate
    assert math.isclose(AdamW.init(model).weight_decay, 1e-2)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: Adam(betas=(2.0, 0.9)), ValueError, "Invalid beta parameter at index 0"),
        (lambda: Adam(eps=-1.0), ValueError, "Invalid epsilon value"),
        (lambda: SGD(nesterov=True), ValueError, "Nesterov momentum requires a momentum"),
        (lambda: Rprop(etas=(1.5, 0.5)), ValueError, "Invalid eta values"),
        (lambda: ASGD(weight_decay=-1.0), ValueError, "Invalid weight_decay value"),
        (lambda: AdamW(decoupled_weight_decay=False), TypeError, "is fixed at True"),
        (
            lambda: dataclasses.replace(Adam.init(make_model()), betas=(1.5, 0.9)),
            ValueError,
            "Invalid beta parameter at index 0",
        ),
    ],
)
def test_a_value_built_directly_is_checked_as_init_checks(
    build: Callable[[], Any], error: type[Exception], message: str
) -> None:
    # Found by review: Adam(betas=(2.0, 0.9)) built without init stepped without complaint.
    with pytest.raises(error, match=message):
        build()
