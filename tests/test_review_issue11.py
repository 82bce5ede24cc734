"""Regression tests for the confirmed review findings on the issue-11 code (traversals,
surgery, freezing, inspect, optimizer state checks): one test per finding."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import diffprog as dp
from diffprog import nn


class Wrapper(dp.Parameterized):
    """The delegating hand-written instance of docs/core.md."""

    inner: Any
    extra: torch.nn.Parameter

    def flatten_parameters(self) -> list[torch.nn.Parameter]:
        return [self.extra, *dp.flatten_parameters(self.inner)]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Wrapper:
        extra = stream.next_parameter()
        return Wrapper(stream.replace(self.inner), extra)


def _wrapper() -> Wrapper:
    return Wrapper(dp.sample(nn.LinearSpec(2, 2)), torch.nn.Parameter(torch.randn(3)))


class Listing(dp.Parameterized):
    """A hand-written instance listing its sub-model's tensors itself."""

    inner: Any
    extra: torch.nn.Parameter

    def flatten_parameters(self) -> list[torch.Tensor]:
        return [self.extra, self.inner.weight, self.inner.bias]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Listing:
        extra, weight, bias = (
            stream.next_parameter(),
            stream.next_parameter(),
            stream.next_parameter(),
        )
        return Listing(dataclasses.replace(self.inner, weight=weight, bias=bias), extra)


def test_freeze_inside_delegating_instance_is_refused_naming_the_place() -> None:
    w = _wrapper()
    with pytest.raises(dp.SurgeryError, match=r"inner\.weight.*Wrapper.*list that tensor itself"):
        dp.freeze(w, "inner.*")
    # an instance listing the tensors itself freezes and unfreezes them (round trip)
    listing = Listing(w.inner, w.extra)
    f = dp.freeze(listing, "inner.*")
    assert isinstance(f.inner.weight, dp.Frozen)
    assert dp.count_parameters(f) == dp.count_parameters(listing) == 9
    u = dp.unfreeze(f)
    assert type(u.inner.weight) is torch.nn.Parameter
    assert len(dp.flatten_parameters(u)) == 3


class Tied(dp.Parameterized):
    """A hand-written instance listing one tied Parameter twice."""

    enc: torch.nn.Parameter
    dec: torch.nn.Parameter

    def flatten_parameters(self) -> list[torch.nn.Parameter]:
        return [self.enc, self.dec]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Tied:
        return Tied(stream.next_parameter(), stream.next_parameter())


def test_tie_listed_twice_by_hand_written_instance_is_kept_by_at_and_freeze() -> None:
    w = torch.nn.Parameter(torch.randn(2))
    t = Tied(w, w)
    for name in ("enc", "dec"):
        r = dp.at(t, name).set(torch.zeros(2))
        assert r.enc is r.dec and r.enc.sum() == 0, name
    r = dp.at(t, lambda q: q.dec).set(torch.ones(2))
    assert r.enc is r.dec and r.enc.sum() == 2
    for filter in (None, "enc", "dec"):
        f = dp.freeze(t, filter)
        assert f.enc is f.dec and isinstance(f.enc, dp.Frozen), filter
        u = dp.unfreeze(f)
        assert u.enc is u.dec and type(u.enc) is torch.nn.Parameter
    assert dp.at(t, "dec").paths == ["dec"]
    # untie=True changes the one entry named
    r = dp.at(t, "dec").set(torch.zeros(2), untie=True)
    assert r.enc is w and r.dec.sum() == 0


class Pool(dp.Parameterized):
    size: tuple[int, int]


def test_tensor_free_values_python_shares_are_visited_at_every_path() -> None:
    m = {"p1": Pool((2, 2)), "p2": Pool((2, 2))}
    m["p2"] = Pool(m["p1"].size)  # one tuple object at two paths, as CPython folds constants
    assert m["p1"].size is m["p2"].size
    assert [p for p, _ in dp.collect(m, int, with_path=True)] == [
        "p1.size.0",
        "p1.size.1",
        "p2.size.0",
        "p2.size.1",
    ]
    assert len(dp.collect(m, tuple)) == 2
    for target in ("p1", "p2"):
        r = dp.replace_values(
            m, int, lambda path, v, t=target: 4 if path.startswith(t + ".") else v, with_path=True
        )
        assert r[target].size == (4, 4)
        assert r["p2" if target == "p1" else "p1"].size == (2, 2)
    # a block holding tensors, shared at two paths, is still visited once and kept shared
    layer = dp.sample(nn.LinearSpec(2, 2))
    shared = {"a": layer, "b": layer}
    assert len(dp.collect(shared, nn.Linear)) == 1
    r = dp.replace_values(shared, nn.Linear, lambda v: dataclasses.replace(v))
    assert r["a"] is r["b"]


class MyLinear(dp.Parameterized):
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter


class Holder(dp.Parameterized):
    inner: Any


def test_summary_does_not_fold_items_whose_inner_layers_differ_in_type() -> None:
    linear = dp.sample(nn.LinearSpec(3, 2))
    mine = MyLinear(torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(2)))
    text = str(dp.summary([Holder(linear), Holder(mine)]))
    assert "2 x" not in text
    assert "MyLinear" in text and "Linear" in text.replace("MyLinear", "")
    same = str(dp.summary([Holder(linear), Holder(dp.sample(nn.LinearSpec(3, 2)))]))
    assert "2 x Linear" in same


def test_tensor_traversals_refuse_a_torch_module_holding_buffers() -> None:
    m = {"fc": dp.sample(nn.LinearSpec(3, 3)), "norm": torch.nn.BatchNorm1d(3, affine=False)}
    calls = [
        lambda: dp.to(m, torch.float64),
        lambda: dp.map_tensors(lambda t: t, m),
        lambda: dp.tensors(m),
        lambda: dp.named_tensors(m),
        lambda: dp.state_dict(m),
    ]
    for call in calls:
        with pytest.raises(
            dp.InstanceError, match=r"BatchNorm1d.*running_mean.*\['norm'\].*from_torch"
        ):
            call()
    # a parameter-free module without buffers is still fine, and parameters-only traversals too
    ok = {"fc": m["fc"], "act": torch.nn.ReLU()}
    assert dp.to(ok, torch.float64)["act"] is ok["act"]
    assert len(dp.map_parameters(lambda p: p, m)) == 2


def test_maps_reach_through_nested_hand_written_instances_unchecked() -> None:
    w = Wrapper(_wrapper(), torch.nn.Parameter(torch.randn(1)))
    for r in (
        dp.to(w, torch.float64),
        dp.map_parameters(lambda p: p.double(), w),
        dp.map_tensors(lambda t: t.double(), w),
    ):
        assert [t.dtype for t in dp.tensors(r)] == [torch.float64] * 4
        assert isinstance(r.inner, Wrapper) and isinstance(r.inner.inner, nn.Linear)
    meta = dp.map_tensors(lambda t: t.to("meta"), w)
    assert {t.device.type for t in dp.tensors(meta)} == {"meta"}


def test_maps_keep_a_sub_model_shared_with_a_hand_written_instance_one_object() -> None:
    inner = dp.sample(nn.LinearSpec(2, 2))
    extra = torch.nn.Parameter(torch.randn(3))
    for model in (
        {"w": Wrapper(inner, extra), "o": inner},
        {"o": inner, "w": Wrapper(inner, extra)},
    ):
        for r in (
            dp.to(model, torch.float64),
            dp.map_parameters(lambda p: p * 2, model),
            dp.map_tensors(lambda t: t * 2, model),
        ):
            assert r["w"].inner is r["o"]
            assert r["o"].weight.dtype == torch.float64 or torch.equal(
                r["o"].weight, inner.weight * 2
            )


def _optimizer_makers() -> list[tuple[str, Any]]:
    from diffprog import optim

    pure = sorted(
        (
            cls
            for cls in vars(optim).values()
            if isinstance(cls, type)
            and issubclass(cls, optim.PureOptimizer)
            and cls is not optim.PureOptimizer
        ),
        key=lambda cls: cls.__name__,
    )
    rows: list[tuple[str, Any]] = [(cls.__name__, cls.init) for cls in pure]
    rows.append(("TorchOptimizer", lambda m: optim.TorchOptimizer.init(m, torch.optim.Adam)))
    return rows


@pytest.mark.parametrize(
    ("name", "make"), _optimizer_makers(), ids=[n for n, _ in _optimizer_makers()]
)
def test_optimizers_skip_a_frozen_tensor_of_a_plain_list_model(name: str, make: Any) -> None:
    from diffprog.optim import run_step

    p0 = torch.nn.Parameter(torch.randn(2))
    p1 = torch.nn.Parameter(torch.randn(3))
    frozen = dp.freeze([p0, p1], "0")
    alone = [p1]
    opt_f, opt_a = make(frozen), make(alone)
    for _ in range(3):
        frozen, opt_f = run_step(frozen, opt_f, (frozen[0] * 2).sum() + (frozen[1] ** 2).sum(), 0.1)
        alone, opt_a = run_step(alone, opt_a, (alone[0] ** 2).sum(), 0.1)
    assert isinstance(frozen[0], dp.Frozen) and torch.equal(frozen[0], p0)
    assert torch.equal(frozen[1], alone[0])


def _pure_optimizers() -> list[type[Any]]:
    from diffprog import optim

    return sorted(
        (
            cls
            for cls in vars(optim).values()
            if isinstance(cls, type)
            and issubclass(cls, optim.PureOptimizer)
            and cls is not optim.PureOptimizer
        ),
        key=lambda cls: cls.__name__,
    )


@pytest.mark.parametrize("cls", _pure_optimizers(), ids=lambda c: c.__name__)
def test_state_of_the_wrong_nonzero_length_is_refused_naming_optimizer_and_kind(cls: Any) -> None:
    params = [dp.make_independent(torch.ones(3)), dp.make_independent(torch.ones(3))]
    grads = [torch.ones(3), torch.ones(3)]
    kw = {"momentum": 0.9} if cls.__name__ in ("SGD", "GDM") else {}
    base = cls.init(params, **kw)
    kinds = [n for n in type(base).declaration().state if getattr(base, n)]
    if not kinds:  # no state to get wrong (GD)
        return
    for kind in kinds:
        short = dataclasses.replace(base, **{kind: getattr(base, kind)[:1]})
        with pytest.raises(
            dp.DiffprogError, match=rf"{cls.__name__}'s state {kind} holds 1 entries.*2 parameters"
        ):
            short.step(0.1, grads, params)
    # an empty tuple still means "no state held": it starts from zero
    empty = dataclasses.replace(base, **{kind: () for kind in kinds})
    empty.step(0.1, grads, params)


def test_state_kind_turned_on_for_a_group_without_it_starts_at_zero_as_torch() -> None:
    from diffprog.optim import Adam, run_step

    start = {"a": torch.randn(3), "b": torch.randn(2)}
    model = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = dataclasses.replace(Adam.init(model, overrides={"a": {"amsgrad": True}}), amsgrad=True)
    ref = [torch.nn.Parameter(start["a"].clone()), torch.nn.Parameter(start["b"].clone())]
    torch_opt = torch.optim.Adam(ref, lr=0.1, amsgrad=True)
    for _ in range(3):
        model, opt = run_step(model, opt, sum((p**3).sum() for p in model.values()), 0.1)
        torch_opt.zero_grad()
        sum((p**3).sum() for p in ref).backward()  # type: ignore[union-attr]
        torch_opt.step()
    torch.testing.assert_close(model["a"], ref[0].detach())
    torch.testing.assert_close(model["b"], ref[1].detach())


def test_summary_refuses_two_tensors_with_one_path_as_state_dict_does() -> None:
    clash = {1: torch.nn.Parameter(torch.ones(2)), "1": torch.nn.Parameter(torch.ones(3))}
    for call in (dp.summary, dp.named_tensors, dp.state_dict):
        with pytest.raises(dp.NameClashError, match="both named '1'"):
            call(clash)
    p = torch.nn.Parameter(torch.ones(2))
    assert len(dp.summary({1: p, "1": p}).rows) == 2  # one tensor at both: a tie, as state_dict


def test_selector_combines_with_a_glob_or_type_on_the_left() -> None:
    m = {"a": dp.sample(nn.LinearSpec(2, 2)), "b": dp.sample(nn.LinearSpec(2, 3))}
    two_d = dp.select(where=lambda p, v: isinstance(v, torch.Tensor) and v.ndim == 2)
    assert dp.at(m, "a.*" | two_d).paths == ["a.weight", "a.bias", "b.weight"]
    assert dp.at(m, nn.Linear & two_d).paths == ["a.weight", "b.weight"]
    assert dp.at(m, ("a.*" | two_d) & ~dp.select("b.*")).paths == ["a.weight", "a.bias"]


def test_at_names_the_place_where_a_filter_predicate_fails() -> None:
    m = {"fc": dp.sample(nn.LinearSpec(2, 2)), "scale": 2.0}
    with pytest.raises(dp.SurgeryError, match=r"AttributeError.*float.*\['scale'\].*isinstance"):
        dp.at(m, dp.select(where=lambda p, v: v.ndim == 1))


def test_unfreeze_gives_a_trainable_parameter_whatever_requires_grad_was() -> None:
    p = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    back = dp.unfreeze(dp.freeze(p))
    assert type(back) is torch.nn.Parameter and back.requires_grad  # documented in freezing.md


def test_frozen_tensor_loads_with_weights_only_once_frozen_is_allowed() -> None:
    import io
    import pickle

    buffer = io.BytesIO()
    torch.save({"w": dp.freeze(torch.nn.Parameter(torch.ones(2)))}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)
    buffer.seek(0)
    with torch.serialization.safe_globals([dp.Frozen]):
        loaded = torch.load(buffer, weights_only=True)
    assert type(loaded["w"]) is dp.Frozen and torch.equal(loaded["w"], torch.ones(2))


@pytest.mark.parametrize("cls", _pure_optimizers(), ids=lambda c: c.__name__)
def test_state_of_another_dtype_than_its_parameter_is_refused(cls: Any) -> None:
    from diffprog.optim import run_step

    model = {"w": dp.make_independent(torch.ones(3)), "v": dp.make_independent(torch.ones(2, 2))}
    kw = {"momentum": 0.9} if cls.__name__ in ("SGD", "GDM") else {}
    opt = cls.init(model, **kw)
    model, opt = run_step(model, opt, sum((p**2).sum() for p in model.values()), 0.1)
    if not any(getattr(opt, n) for n in type(opt).declaration().state):
        return  # no state (GD)
    wide = dp.to(model, dtype=torch.float64)
    with pytest.raises(dp.DiffprogError, match=r"state .* is torch\.float32 .* torch\.float64"):
        run_step(wide, opt, sum((p**2).sum() for p in wide.values()), 0.1)
    # the optimizer converted the same way steps
    run_step(wide, dp.to(opt, dtype=torch.float64), sum((p**2).sum() for p in wide.values()), 0.1)
