"""Selecting and freezing: the filter language (shared with the optimizers), partition and
combine, freeze/unfreeze with every optimizer, count_parameters."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
import diffprog.optim as optim
from diffprog._filter import places
from diffprog.nn import (
    BatchNorm1dSpec,
    EmbeddingSpec,
    Linear,
    LinearSpec,
    Sequential,
    training,
)
from diffprog.optim import TorchOptimizer, run_step
from diffprog.optim._declare import declaration_of

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


class Net(dp.Parameterized):
    backbone: Sequential
    head: Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.backbone(x)))


def net(seed: int = 0) -> Net:
    gen = torch.Generator().manual_seed(seed)
    return Net(
        Sequential(
            dp.sample(LinearSpec(4, 6), generator=gen),
            torch.tanh,
            dp.sample(LinearSpec(6, 6), generator=gen),
        ),
        dp.sample(LinearSpec(6, 2), generator=gen),
    )


class Written(dp.Parameterized):
    a: dp.Parameter
    b: dp.Parameter

    def flatten_parameters(self) -> list[Any]:
        return [self.a, self.b]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Written:
        return Written(stream.next_parameter(), stream.next_parameter())


class Pair(NamedTuple):
    left: Any
    right: Any


def p(*shape: int) -> dp.Parameter:
    return dp.make_independent(torch.randn(*shape))


# --- the filter language --------------------------------------------------------------------


def test_the_optimizers_select_is_the_cores_one_implementation() -> None:
    assert optim.select is dp.select and optim.Selector is dp.Selector
    from diffprog import _filter
    from diffprog.optim import _select

    assert _select.as_selector is _filter.as_selector


def test_filters_by_glob_regex_type_predicate_and_combinations() -> None:
    model = net()

    def names(f: Any) -> list[str]:
        chosen = dp.select(f)
        return [
            pl.path for pl in places(model) if pl.leaf and chosen(pl.path, pl.value, pl.ancestors)
        ]

    assert names("backbone.0.*") == ["backbone.0.weight", "backbone.0.bias"]
    assert names("*.bias") == ["backbone.0.bias", "backbone.2.bias", "head.bias"]
    linear_leaves = names(Linear)
    assert "head.weight" in linear_leaves
    assert "backbone.1" not in linear_leaves  # torch.tanh is not inside a Linear
    counts = {
        "glob": dp.count_parameters(model, "head.*"),
        "regex": dp.count_parameters(model, re.compile(r"^backbone\.2\.")),
        "type": dp.count_parameters(model, Linear),
        "predicate": dp.count_parameters(model, lambda path, v: v.ndim == 1),
        "list": dp.count_parameters(model, ["head.*", re.compile("backbone.0.weight")]),
        "and/not": dp.count_parameters(model, dp.select(Linear) & ~dp.select("*.weight")),
    }
    assert counts == {
        "glob": 14,
        "regex": 42,
        "type": 30 + 42 + 14,
        "predicate": 6 + 6 + 2,
        "list": 14 + 24,
        "and/not": 14,
    }


def test_optimizer_freeze_and_overrides_take_type_filters() -> None:
    model = net()
    opt = optim.Adam.init(model, freeze=dp.select(Sequential))
    assert opt.trainable == (False, False, False, False, True, True)
    opt = optim.SGD.init(model, overrides={Sequential: {"lr_scale": 0.5}})
    assert opt.settings is not None and len(opt.settings.groups) == 2


# --- partition and combine --------------------------------------------------------------------


def _pool() -> list[dp.Parameter]:
    return [dp.make_independent(torch.zeros(k)) for k in range(1, 6)]


def models(pool: list[dp.Parameter]) -> st.SearchStrategy[Any]:
    parameters = st.sampled_from(pool)
    leaves = st.one_of(
        parameters,
        st.just(torch.zeros(1)),
        st.integers(-2, 2),
        st.none(),
        st.just(torch.tanh),
        st.builds(Written, parameters, parameters),
    )

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(st.sampled_from("xyz"), children, max_size=3),
            st.builds(Pair, children, children),
            st.builds(Net, children, children),
        )

    return st.recursive(leaves, extend, max_leaves=8)


FILTERS = [
    "*.0",
    "x.*",
    torch.Tensor,
    dp.Parameter,
    Written,
    lambda path, v: isinstance(v, int),
    lambda path, v: isinstance(v, torch.Tensor) and v.numel() > 2,
]


def _leaves(value: Any) -> list[tuple[Any, Any]]:
    return [(pl.keys, pl.value) for pl in places(value) if pl.leaf]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_property_combine_of_partition_gives_the_model_back_sharing_every_leaf(
    data: st.DataObject,
) -> None:
    model = data.draw(models(_pool()))
    selection = data.draw(st.sampled_from(FILTERS))
    try:
        selected, rest = dp.partition(model, selection)
    except dp.SurgeryError as e:  # a hand-written instance split in two: refused clearly
        message = str(e)
        assert "hand-written" in message
        return
    back = dp.combine(selected, rest)
    assert type(back) is type(model)
    original = _leaves(model)
    rebuilt = _leaves(back)
    assert [k for k, _ in rebuilt] == [k for k, _ in original]
    assert all(a is b for (_, a), (_, b) in zip(rebuilt, original, strict=True))
    assert [id(t) for t in dp.flatten_parameters(back)] == [
        id(t) for t in dp.flatten_parameters(model)
    ]
    # each leaf is in one half, None in the other
    for keys, value in original:
        s, r = _read(selected, keys), _read(rest, keys)
        assert (s is value and r is None) or (r is value and s is None) or value is None


def _read(model: Any, keys: tuple[Any, ...]) -> Any:
    v = model
    for kind, key in keys:
        if v is None:
            return None
        if isinstance(v, Written):  # whole in one half: read its field
            return getattr(v, key) if kind == "attr" else v.flatten_parameters()[key]
        v = getattr(v, key) if kind in ("attr", "inline") else v[key]
    return v


def test_partition_keeps_structure_and_static_fields_go_by_the_filter() -> None:
    model = net()
    params, static = dp.partition(model, dp.Parameter)
    assert type(params) is Net and params.backbone.layers[1] is None
    assert static.backbone.layers[1] is torch.tanh and static.head.weight is None
    back = dp.combine(params, static)
    assert back.head.weight is model.head.weight and back.backbone.layers[1] is torch.tanh


def test_partition_keeps_a_shared_block_shared_and_refuses_splitting_a_hand_written_one() -> None:
    block = dp.sample(LinearSpec(2, 2))
    model = {"a": block, "b": block, "w": Written(p(2), p(3))}
    sel, rest = dp.partition(model, "*.bias")
    assert sel["a"] is sel["b"] and rest["a"] is rest["b"]
    back = dp.combine(sel, rest)
    assert back["a"] is back["b"] and back["w"] is model["w"]
    with pytest.raises(dp.SurgeryError, match="some but not all .* Written"):
        dp.partition(model, "w.a")
    sel, rest = dp.partition(model, "w.*")
    assert sel["w"] is model["w"] and rest["w"] is None


def test_partition_names_the_leaf_a_predicate_fails_on() -> None:
    with pytest.raises(dp.SurgeryError, match=r"AttributeError.*at backbone.layers\[1\]"):
        dp.partition(net(), lambda path, v: v.ndim < 2)


def test_combine_refuses_different_structures_naming_the_path() -> None:
    with pytest.raises(dp.SurgeryError, match=r"differ.*at \['a'\]"):
        dp.combine({"a": (1, 2)}, {"a": [1, 2, 3]})


# --- freeze and unfreeze -------------------------------------------------------------------


def test_freeze_turns_selected_parameters_into_frozen_constants() -> None:
    model = net()
    frozen = dp.freeze(model, "backbone.*")
    assert [n for n, _ in dp.named_parameters(frozen)] == ["head.weight", "head.bias"]
    w = frozen.backbone.layers[0].weight
    assert type(w) is dp.Frozen and not w.requires_grad
    assert w.data_ptr() == model.backbone.layers[0].weight.data_ptr()  # no copy
    assert frozen.head is model.head  # everything else shared
    with pytest.raises(ValueError, match="selects no parameter"):
        dp.freeze(model, "backbone.9.*")
    with pytest.raises(ValueError, match="unfreeze: 'head.wieght' selects no parameter"):
        dp.unfreeze(frozen, "head.wieght")
    # freezing twice is freezing once; unfreezing what is trainable changes nothing
    again = dp.freeze(frozen, "backbone.*")
    assert again.backbone is frozen.backbone
    assert dp.unfreeze(frozen, "head.*") is frozen


def test_freeze_a_tie_at_one_path_freezes_it_at_every_path() -> None:
    emb = dp.sample(EmbeddingSpec(5, 3))
    model = {"embed": emb, "out": Linear(emb.weight, None)}
    frozen = dp.freeze(model, "out.weight")
    assert frozen["embed"].weight is frozen["out"].weight
    assert type(frozen["embed"].weight) is dp.Frozen
    back = dp.unfreeze(frozen)
    assert back["embed"].weight is back["out"].weight
    assert isinstance(back["embed"].weight, dp.Parameter)


def test_unfreeze_never_turns_buffers_into_parameters() -> None:
    bn = dp.sample(BatchNorm1dSpec(3))
    frozen = dp.freeze(bn)
    assert dp.flatten_parameters(frozen) == []
    back = dp.unfreeze(frozen)
    assert [n for n, _ in dp.named_parameters(back)] == ["weight", "bias"]
    assert type(back.running_mean) is torch.Tensor
    assert type(back.num_batches_tracked) is torch.Tensor


def test_unfreeze_with_a_filter_and_the_counts() -> None:
    model = dp.freeze(net())
    assert dp.count_parameters(model, dp.Parameter) == 0
    part = dp.unfreeze(model, "head.*")
    assert dp.count_parameters(part, dp.Parameter) == 14
    assert dp.count_parameters(part, dp.Frozen) == 30 + 42
    assert dp.count_parameters(part) == dp.count_parameters(net())


def test_freeze_through_a_hand_written_instance() -> None:
    model = {"w": Written(p(2), p(3))}
    frozen = dp.freeze(model, "w.b")
    assert type(frozen["w"]) is Written and type(frozen["w"].b) is dp.Frozen
    assert dp.flatten_parameters(frozen) == [model["w"].a]
    back = dp.unfreeze(frozen)
    assert len(dp.flatten_parameters(back)) == 2


def test_freeze_a_meta_model() -> None:
    model = dp.sample(LinearSpec(3, 2), device="meta")
    frozen = dp.freeze(model, "weight")
    assert frozen.weight.device.type == "meta" and type(frozen.weight) is dp.Frozen
    assert dp.count_parameters(frozen) == 8


def test_count_parameters_matches_torch() -> None:
    torch_model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2)
    )
    model = Sequential(
        dp.sample(LinearSpec(4, 6)), dp.sample(BatchNorm1dSpec(6)), dp.sample(LinearSpec(6, 2))
    )
    assert dp.count_parameters(model) == sum(t.numel() for t in torch_model.parameters())
    torch_model[0].requires_grad_(False)
    frozen = dp.freeze(model, "0.*")
    trainable = sum(t.numel() for t in torch_model.parameters() if t.requires_grad)
    assert dp.count_parameters(frozen, dp.Parameter) == trainable


# --- with every optimizer ------------------------------------------------------------------

DATA = [
    (torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
    for g in [torch.Generator().manual_seed(i) for i in range(3)]
]


def _train(model: Any, opt: Any, steps: int = 3) -> tuple[Any, Any]:
    for i in range(steps):
        x, y = DATA[i % len(DATA)]
        model, opt = run_step(model, opt, F.mse_loss(model(x), y), 0.01)
    return model, opt


def _optimizers() -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [(cls.__name__, cls.init) for cls in PURE]
    rows.append(("TorchOptimizer", lambda m, **kw: TorchOptimizer.init(m, torch.optim.Adam, **kw)))
    return rows


@pytest.mark.parametrize(("name", "make"), _optimizers(), ids=[n for n, _ in _optimizers()])
def test_a_frozen_model_trains_as_the_optimizers_freeze_and_unfreezing_needs_a_new_optimizer(
    name: str, make: Any
) -> None:
    frozen = dp.freeze(net(), "backbone.*")
    model_f, opt_f = _train(frozen, make(frozen))
    reference, _ = _train(net(), make(net(), freeze="backbone.*"))
    # the frozen tensors are the very same objects: never updated, no gradient
    assert model_f.backbone is frozen.backbone
    tensors = [pl.value for pl in places(model_f.backbone) if pl.leaf and pl.value is not None]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    assert len(tensors) == 4 and all(type(t) is dp.Frozen and t.grad is None for t in tensors)
    for a, b in zip(
        dp.flatten_parameters(model_f.head), dp.flatten_parameters(reference.head), strict=True
    ):
        torch.testing.assert_close(a, b)
    # no state for the frozen ones: the optimizer knows only the two head parameters
    if name != "TorchOptimizer":
        for field in type(opt_f).__dataclass_fields__:
            held = getattr(opt_f, field)
            if isinstance(held, tuple) and held and isinstance(held[0], (torch.Tensor, type(None))):
                assert len(held) == 2, field
    else:  # the torch optimizer holds (and keeps state for) the two head parameters only
        torch_opt = opt_f.optimizer
        held_params = [t for group in torch_opt.param_groups for t in group["params"]]
        assert len(held_params) == 2 and len(torch_opt.state) == 2
        assert all(t.shape in [(2, 6), (2,)] for t in held_params)
    # unfreezing: the old optimizer refuses the bigger model, a new one trains everything
    unfrozen = dp.unfreeze(model_f)
    x, y = DATA[0]
    with pytest.raises(dp.DiffprogError, match="built for"):
        run_step(unfrozen, opt_f, F.mse_loss(unfrozen(x), y), 0.01)
    before = [t.detach().clone() for t in dp.flatten_parameters(unfrozen)]
    trained, _ = _train(unfrozen, make(unfrozen), steps=1)
    after = dp.flatten_parameters(trained)
    assert len(after) == 6
    assert not torch.equal(after[0], before[0])  # the backbone trains again


def test_a_frozen_batchnorm_keeps_updating_its_running_statistics_in_training_mode() -> None:
    model = Sequential(dp.sample(LinearSpec(4, 3)), dp.sample(BatchNorm1dSpec(3)))
    frozen = dp.freeze(model, "1.*")
    x = torch.randn(8, 4)
    _, updated = training(lambda m: m(x), frozen)
    assert not torch.equal(updated.layers[1].running_mean, frozen.layers[1].running_mean)
    assert type(updated.layers[1].weight) is dp.Frozen


@pytest.mark.parametrize("cls", PURE, ids=lambda c: c.__name__)
def test_a_state_built_before_freeze_changed_the_parameters_is_refused_not_broadcast(
    cls: type[optim.PureOptimizer],
) -> None:
    """Freeze one layer, step; then train another layer of the same parameter count but
    other shapes with the same optimizer: its state does not fit and must be refused (the
    multi-tensor kernels would otherwise broadcast it silently)."""
    model = {"a": dp.sample(LinearSpec(2, 3)), "b": dp.sample(LinearSpec(2, 2))}
    x = torch.randn(4, 2)
    first = dp.freeze(model, "b.*")
    opt = cls.init(first)
    _, opt = run_step(first, opt, first["a"](x).sum() + first["b"](x).sum(), 0.01)
    second = dp.freeze(dp.unfreeze(first), "a.*")
    loss = second["a"](x).sum() + second["b"](x).sum()
    kinds = declaration_of(cls).state
    if not any(getattr(opt, kind) for kind in kinds):  # GD, SGD without momentum: no state
        run_step(second, opt, loss, 0.01)  # nothing to mismatch: any parameters step
        return
    with pytest.raises(dp.DiffprogError, match=r"state .* of parameter 0 .*Build a new one"):
        run_step(second, opt, loss, 0.01)


class Block(dp.Parameterized):
    """A sum type: ``mixer`` is a Linear or an Identity; ``scale`` optional."""

    mixer: Linear | dp.nn.Identity
    scale: dp.Parameter | None = None


def test_freeze_and_partition_across_the_branches_of_a_sum_type() -> None:
    model = [Block(dp.sample(LinearSpec(2, 2))), Block(dp.nn.Identity(), p(2))]
    frozen = dp.freeze(model, Linear)
    assert [n for n, _ in dp.named_parameters(frozen)] == ["1.scale"]
    assert frozen[1] is model[1]
    sel, rest = dp.partition(model, Linear)
    # Identity has no leaves at all: it is structure, in both halves (as in Equinox)
    assert sel[1].mixer is rest[1].mixer is model[1].mixer
    assert rest[0].mixer.weight is None and sel[0].mixer.weight is model[0].mixer.weight
    assert rest[0].scale is None and sel[0].scale is None  # a None leaf: None in both
    back = dp.combine(sel, rest)
    assert back[0].mixer is model[0].mixer and back[1].scale is model[1].scale


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_property_places_agree_with_walk_and_named_parameters(data: st.DataObject) -> None:
    """The filters' view of a model (``places``) is walk's: same tensors, same paths, same
    order; and its first path of each parameter is named_parameters'."""

    model = data.draw(models(_pool()))
    ours = [(pl.path, pl.value) for pl in places(model) if isinstance(pl.value, torch.Tensor)]
    walked = [(p, v) for p, v in dp.walk(model) if isinstance(v, torch.Tensor)]
    assert [p for p, _ in ours] == [p for p, _ in walked]
    assert all(a is b for (_, a), (_, b) in zip(ours, walked, strict=True))
    first: dict[int, str] = {}
    for path, value in ours:
        if isinstance(value, dp.Parameter):
            first.setdefault(id(value), path)
    try:
        named = dp.named_parameters(model)
    except dp.NameClashError:
        return
    assert [first[id(p)] for _, p in named] == [n for n, _ in named]
