"""Per-parameter settings and freezing, against torch.optim's parameter groups."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog import Parameterized, flatten_parameters, make_independent, named_parameters
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
    RAdam,
    RMSprop,
    Rprop,
    run_step,
    select,
)


class Net(Parameterized):
    encoder: Linear
    head: Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


def _pair() -> tuple[Net, torch.nn.Sequential]:
    gen = torch.Generator().manual_seed(0)
    ours = Net(
        dp.sample(LinearSpec(4, 6), generator=gen), dp.sample(LinearSpec(6, 2), generator=gen)
    )
    theirs = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    with torch.no_grad():
        for t, p in zip(theirs.parameters(), flatten_parameters(ours), strict=True):
            t.copy_(p)
    return ours, theirs


DATA = [
    (torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
    for g in [torch.Generator().manual_seed(i) for i in range(3)]
]


def _train_both(
    model: Net, net: torch.nn.Module, opt: Any, topt: torch.optim.Optimizer, steps: int = 50
) -> tuple[Net, Any]:
    for i in range(steps):
        x, y = DATA[i % len(DATA)]
        topt.zero_grad()
        F.mse_loss(net(x), y).backward()
        topt.step()
        model, opt = run_step(model, opt, F.mse_loss(model(x), y), 0.01)
    return model, opt


def _assert_same(model: Net, net: torch.nn.Module) -> None:
    torch.testing.assert_close(
        [p.detach() for p in flatten_parameters(model)], [p.detach() for p in net.parameters()]
    )


def test_no_weight_decay_on_biases_equals_torch_param_groups() -> None:
    model, net = _pair()
    decay = [p for n, p in net.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in net.named_parameters() if n.endswith("bias")]
    topt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.01, weight_decay=0.5
    )
    opt = AdamW.init(model, weight_decay=0.5, overrides={"*.bias": {"weight_decay": 0.0}})
    model, opt = _train_both(model, net, opt, topt)
    _assert_same(model, net)
    assert [g.indices for g in opt.settings.groups] == [(0, 2), (1, 3)]


def test_lr_scale_equals_a_torch_group_learning_rate() -> None:
    model, net = _pair()
    topt = torch.optim.SGD(
        [
            {"params": list(net[0].parameters()), "lr": 0.001},
            {"params": list(net[2].parameters())},
        ],
        lr=0.01,
        momentum=0.9,
    )
    opt = GDM.init(model, momentum=0.9, overrides={"encoder.*": {"lr_scale": 0.1}})
    model, _ = _train_both(model, net, opt, topt)
    _assert_same(model, net)


def test_overrides_per_parameter_variants_and_state() -> None:
    model, net = _pair()
    topt = torch.optim.Adam(
        [
            {"params": [net[0].weight], "amsgrad": True, "betas": (0.8, 0.9)},
            {"params": [net[0].bias, net[2].weight, net[2].bias]},
        ],
        lr=0.01,
    )
    opt = Adam.init(model, overrides=[("encoder.weight", {"amsgrad": True, "betas": (0.8, 0.9)})])
    assert opt.max_exp_avg_sq[0] is not None and opt.max_exp_avg_sq[1:] == (None, None, None)
    model, opt = _train_both(model, net, opt, topt)
    _assert_same(model, net)
    torch.testing.assert_close(opt.max_exp_avg_sq[0], topt.state[net[0].weight]["max_exp_avg_sq"])


def test_later_overrides_win() -> None:
    model, _ = _pair()
    opt = Adam.init(
        model,
        overrides=[("*", {"weight_decay": 0.1, "eps": 1e-6}), ("head.*", {"weight_decay": 0.2})],
    )
    by_index = {i: dict(g.overrides) for g in opt.settings.groups for i in g.indices}
    assert by_index[0] == {"weight_decay": 0.1, "eps": 1e-6}
    assert by_index[3] == {"weight_decay": 0.2, "eps": 1e-6}


def test_frozen_parameters_get_no_update_and_no_state_and_the_rest_trains_as_torch() -> None:
    model, net = _pair()
    for p in net[0].parameters():
        p.requires_grad_(False)
    topt = torch.optim.AdamW(net[2].parameters(), lr=0.01, weight_decay=0.5)
    opt = AdamW.init(model, weight_decay=0.5, freeze="encoder.*")
    assert opt.exp_avg[:2] == (None, None) and opt.exp_avg_sq[:2] == (None, None)
    assert opt.trainable == (False, False, True, True)
    frozen_before = [p.detach().clone() for p in flatten_parameters(model)[:2]]
    model, opt = _train_both(model, net, opt, topt)
    _assert_same(model, net)
    torch.testing.assert_close(
        [p.detach() for p in flatten_parameters(model)[:2]], frozen_before, rtol=0, atol=0
    )
    assert opt.exp_avg[:2] == (None, None)


ALL = [
    (GD, {}),
    (GDM, {"momentum": 0.9, "weight_decay": 0.1}),
    (Adam, {"weight_decay": 0.1}),
    (AdamW, {"weight_decay": 0.1}),
    (Adagrad, {"weight_decay": 0.1}),
    (RMSprop, {"weight_decay": 0.1, "momentum": 0.9, "centered": True}),
    (Lion, {"weight_decay": 0.1}),
    (SGD, {"momentum": 0.9, "weight_decay": 0.1}),
    (NAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    (RAdam, {"weight_decay": 0.1}),
    (Adamax, {"weight_decay": 0.1}),
    (Adadelta, {"weight_decay": 0.1}),
    (Rprop, {"step_sizes": (0.0, 50.0)}),  # a least step size of 0: lr_scale 0 stays put
    (ASGD, {"weight_decay": 0.1}),
    (Adafactor, {"weight_decay": 0.1}),
]


@pytest.mark.parametrize(("cls", "options"), ALL, ids=[c.__name__ for c, _ in ALL])
def test_freezing_and_overrides_work_for_every_optimizer(cls: Any, options: dict[str, Any]) -> None:
    model, _ = _pair()
    params = flatten_parameters(model)
    grads = [torch.ones_like(p) for p in params]
    overrides = {"head.bias": {"lr_scale": 0.0}}
    freeze = select(where=lambda path, p: p.ndim == 1)
    opt = cls.init(model, freeze=freeze, overrides=overrides, **options)
    new, opt = opt.step(0.1, grads, params)
    assert new[1] is params[1] and new[3] is params[3]  # frozen: the very same tensors
    assert not torch.equal(new[0], params[0]) and not torch.equal(new[2], params[2])
    for name in type(opt).declaration().state:
        held = getattr(opt, name)
        assert held == () or (held[1] is None and held[3] is None)
    # every parameter trained, the head's bias with learning rate 0: it stays (even with decay)
    opt = cls.init(model, overrides=overrides, **options)
    new, _ = opt.step(0.1, grads, params)
    torch.testing.assert_close(new[3], params[3].detach(), rtol=0, atol=0)
    assert not torch.equal(new[1], params[1])


def test_selectors_by_glob_regex_predicate_and_combination() -> None:
    model, _ = _pair()
    named = named_parameters(model)

    def chosen(selector: Any) -> list[str]:
        return [path for path, p in named if selector(path, p)]

    assert chosen(select("*.bias")) == ["encoder.bias", "head.bias"]
    assert chosen(select(re.compile(r"^head\."))) == ["head.weight", "head.bias"]
    assert chosen(select(where=lambda path, p: p.shape == (2,))) == ["head.bias"]
    assert chosen(select("encoder.*") & select("*.weight")) == ["encoder.weight"]
    assert chosen(select("encoder.*") | select("*.bias")) == [
        "encoder.weight",
        "encoder.bias",
        "head.bias",
    ]
    assert chosen(~select("*.bias")) == ["encoder.weight", "head.weight"]


def test_plain_selections_are_accepted_everywhere() -> None:
    model, _ = _pair()
    as_list = Adam.init(model, freeze=["encoder.weight", re.compile("head.b")])
    assert as_list.settings.frozen == (0, 3)
    as_predicate = Adam.init(model, freeze=lambda path, p: path.startswith("head"))
    assert as_predicate.settings.frozen == (2, 3)


def test_parameter_lists_are_named_by_position() -> None:
    params = [make_independent(torch.zeros(2)), make_independent(torch.zeros(3))]
    opt = Adam.init(params, freeze="1")
    assert opt.trainable == (True, False)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"overrides": {"*.bias": {"momentum": 0.9}}}, ValueError, "no per-parameter setting"),
        (
            {"overrides": {"decoder.*": {"eps": 1e-6}}},
            ValueError,
            "override for .decoder.* selects no parameter",
        ),
        ({"freeze": "decoder.*"}, ValueError, "selects no parameter"),
        ({"freeze": 3}, TypeError, "cannot select parameters"),
        ({"overrides": {"*.bias": {"betas": (2.0, 0.9)}}}, ValueError, "beta parameter"),
    ],
)
def test_mistakes_are_explained(kwargs: dict[str, Any], error: type, message: str) -> None:
    model, _ = _pair()
    with pytest.raises(error, match=message):
        Adam.init(model, **kwargs)


def test_select_refuses_non_patterns() -> None:
    with pytest.raises(TypeError, match="where="):
        select(lambda path, p: True)  # type: ignore[arg-type]


PATHS = ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]


@given(
    frozen=st.sets(st.sampled_from(PATHS)),
    overrides=st.lists(
        st.tuples(st.sets(st.sampled_from(PATHS), min_size=1), st.floats(0.0, 1.0)),
        max_size=4,
    ),
)
@settings(max_examples=60, deadline=None)
def test_groups_partition_the_trained_parameters_and_later_overrides_win(
    frozen: set[str], overrides: list[tuple[set[str], float]]
) -> None:
    model, _ = _pair()
    opt = Adam.init(
        model,
        freeze=sorted(frozen) if frozen else None,
        overrides=[(sorted(paths), {"weight_decay": wd}) for paths, wd in overrides],
    )
    assert opt.settings is not None
    grouped = [i for g in opt.settings.groups for i in g.indices]
    assert sorted(grouped + list(opt.settings.frozen)) == [0, 1, 2, 3]
    assert {PATHS[i] for i in opt.settings.frozen} == frozen
    for group in opt.settings.groups:
        for i in group.indices:
            expected = [wd for paths, wd in overrides if PATHS[i] in paths]
            got = dict(group.overrides).get("weight_decay")
            assert got == (expected[-1] if expected else None)
    if len(frozen) == len(PATHS):
        assert opt.exp_avg == ()  # no parameter needs this state at all
    else:
        assert [m is None for m in opt.exp_avg] == [path in frozen for path in PATHS]
